"""Model-state memory per rank of ZeRO stages 1, 2 and 3 (and 3 with cpu or disk offload) on a small
GPT-MoE in bf16, against the ZeRO formulas and tedmoe's planner; the bytes each step communicates,
against the planner's prediction.

Reproduce:  .venv/bin/python benchmarks/zero_memory.py           (starts 2, then 4, then 8 CPU ranks; ~4 min)
            .venv/bin/python benchmarks/zero_memory.py --worlds 2 --timed-steps 1   (quick)
            .venv/bin/python benchmarks/zero_memory.py --report benchmarks/results/zero_memory-<date>.json
                                                  (the report again from a result, without running)

The result records which tedmoe ran: the repository's HEAD and the files in which the imported package
differs from it. To measure one commit while others edit the work tree, run a copy of it:
``git archive <commit> tedmoe | tar -x -C DIR`` and ``PYTHONPATH=DIR`` before the command.

Model: vocab 256, H=128, 4 blocks (4 heads, dense MLP F=512), blocks 1 and 3 MoE with 8 GELU experts of
F=256, top-2, capacity routing (``dropless=false``, capacity factor 1.0). Per rank 2 micro-batches of
2 x 32 tokens, bf16 parameters and gradients, fp32 master and AdamW moments, optimizer tiles of
``TILE`` elements, ZeRO-2 buckets of ``BUCKET`` elements. Layouts (tp, ep): (1, 2) at 2, 4 and 8 ranks,
(2, 2) at 4 and 8, (2, 1) at 2 and (1, 4) at 8. In each layout five engines side by side in the same
ranks: stage 1, 2, 3, 3 with ``offload="cpu"`` (host memory: on this CPU machine the same memory as
the device, so its states count as in memory) and 3 with ``offload="disk"`` (files in a temporary
directory). Each takes a warm-up step, then each its measured step alone, then ``--timed-steps``
timed steps, the five in turns.

During the measured step the live model states of the engine are sampled at every block's forward
start (after ZeRO-3 gathered it) and end (before it is freed), after every parameter's gradient is
accumulated (after ZeRO-2/3's hook staged it), at the start of every group's optimizer step, at every
optimizer tile, and after the step; each sample sums the bytes of distinct storages: parameters (the
parameters' storages, so 0 for a released ZeRO-3 unit, plus ZeRO-3's ``param_shard`` and the source
of a running gather), gradients (``p.grad``, ZeRO-1's ``grad_buffer``, ZeRO-2/3's fp32 ``grad_shard``
and staged buckets, and the reduced gradient shard the step holds) and optimizer states (a
``MemoryStates``' arrays; with disk offload only the tile being updated, also shown on its own); the
bool flags every shard keeps (weight decay, counted in the norm) are reported apart. To see inside
the step this wraps each group's ``reduce_grads``, ``step`` and ``states.tiles`` on the benchmark's
own engine (the library is not changed). The per-category peaks and the peak of their sum are taken
per rank, then the maximum over ranks.

The ZeRO formulas, with each group's Psi (this rank's non-expert elements over N = dsp, expert
elements over N = edp) taken separately: stage 1 2Psi + 2Psi + 12Psi/N, stage 2 2Psi + 2Psi/N +
12Psi/N (DeepSpeed) or + 4Psi/N (tedmoe keeps the gradient shard in fp32), stage 3 16Psi/N
(DeepSpeed) or 18Psi/N; the planner is ``tedmoe.planner.predict.memory`` (which adds ZeRO-2's open
buckets and ZeRO-3's working set). The step's communication is the ledger of the measured step
against ``predict.step_comm`` on every rank. Step times are the median over the timed steps of the
slowest rank (this machine is shared: read the ratios within a layout, not the absolute times).
Offload files are summed at the step. Writes benchmarks/results/zero_memory-<date>.json and
benchmarks/reports/<date>-zero_memory.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tedmoe.config import ModelConfig, MoEConfig, TrainConfig
from tedmoe.model.transformer import GPTMoE
from tedmoe.parallel import launch
from tedmoe.parallel.ledger import LEDGER
from tedmoe.parallel.sharding import replica_axis
from tedmoe.parallel.topology import Topology
from tedmoe.planner.predict import Plan, memory, param_counts, step_comm
from tedmoe.planner.zero import units
from tedmoe.runtime.engine import Engine
from tedmoe.runtime.offload import MemoryStates

import common
from report import table

MODEL = ModelConfig(vocab_size=256, hidden_size=128, num_layers=4, num_heads=4, ffn_hidden_size=512, max_seq_len=32,
                    moe=MoEConfig(ffn_hidden_size=256, num_experts=8, top_k=2, capacity_factor=1.0, dropless=False))
MICRO, SEQ, ACCUM = 2, 32, 2  # sequences per micro-batch, tokens per sequence, micro-batches per step (per rank)
TILE, BUCKET = 1 << 14, 1 << 15  # optimizer tile and ZeRO-2 bucket, elements
LAYOUTS = {2: [(1, 2), (2, 1)], 4: [(1, 2), (2, 2)], 8: [(1, 2), (2, 2), (1, 4)]}  # (tp, ep) per world size
CONFIGS = [(1, "none"), (2, "none"), (3, "none"), (3, "cpu"), (3, "disk")]  # (ZeRO stage, offload)
CATEGORIES = ("parameters", "gradients", "optimizer")
GROUPS = ("dsp", "edp")  # non-expert, expert
_OUT = "TEDMOE_ZERO_MEMORY_OUT"  # where the ranks' rank 0 leaves its world's rows for the launching process
MB = 2**20


class Probe:
    """Samples the live bytes of one engine's parameters, gradients and optimizer states (while ``on``)."""

    def __init__(self, engine: Engine):
        model, opt = engine.model, engine.optimizer
        self.groups, self.directory = opt.groups, opt.offload.directory
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.on, self.step_grads, self.tiles = False, [], []
        self.peak = dict.fromkeys(CATEGORIES + ("tiles", "sum", "flags", "files"), 0)
        self.at_peak: dict = {}
        owner = {id(p): "root" for p in self.params}
        for i, block in enumerate(model.blocks):
            owner.update({id(p): f"block {i}" for p in block.parameters()})
            # after ZeRO-3's hooks: the start sees the block gathered; the end (prepended) runs before it is freed
            block.register_forward_pre_hook(lambda m, a, i=i: self.sample(f"block {i} forward start"))
            block.register_forward_hook(lambda m, a, o, i=i: self.sample(f"block {i} forward end"), prepend=True)
        for p in self.params:  # after ZeRO-2/3's own hook, which moved the gradient into its bucket
            p.register_post_accumulate_grad_hook(lambda p: self.sample(f"{owner[id(p)]} backward"))
        for g in self.groups:  # instance attributes shadow the methods on this engine only
            g.reduce_grads = functools.partial(self._reduce_grads, g.reduce_grads)
            g.step = functools.partial(self._group_step, g.step)
            g.states.tiles = functools.partial(self._tiles, g.states.tiles)

    def _reduce_grads(self, reduce):
        grad = reduce()
        if self.on:
            self.step_grads.append(grad)  # held by the optimizer until its step ends
        return grad

    def _group_step(self, step, *args):
        self.sample("optimizer step", files=True)
        return step(*args)

    def _tiles(self, tiles, tile):
        for s, t in tiles(tile):
            self.tiles = list(t.values())
            self.sample("optimizer tile")
            yield s, t
        self.tiles = []

    def done(self) -> None:
        """After the step: the optimizer dropped the reduced gradients."""
        self.step_grads = []
        self.sample("after the step", files=True)

    def sample(self, where: str, files: bool = False) -> None:
        if not self.on:
            return
        seen: set = set()

        def size(tensors) -> int:
            total = 0
            for t in tensors:
                if t is None:
                    continue
                storage = t.untyped_storage()
                if storage.data_ptr() not in seen:  # a released storage has size 0 whatever its key
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
            return total

        g3 = [g for g in self.groups if hasattr(g, "param_shard")]
        now = {"parameters": size(self.params + [g.param_buffer for g in self.groups]
                                  + [g.param_shard for g in g3] + [g._source for g in g3]),
               "gradients": size([p.grad for p in self.params] + [getattr(g, "grad_buffer", None) for g in self.groups]
                                 + [getattr(g, "grad_shard", None) for g in self.groups]
                                 + [b for g in self.groups for b in getattr(g, "staging", {}).values()]
                                 + self.step_grads),
               "optimizer": size([a for g in self.groups if isinstance(g.states, MemoryStates)
                                  for a in g.states.arrays.values()])}
        now["tiles"] = size(self.tiles)  # disk offload: the tile being updated (in memory) is not a view
        now["optimizer"] += now["tiles"]
        now["sum"] = sum(now[c] for c in CATEGORIES)
        # the weight-decay and norm flags, kept as true ranges of the shard: two 8-byte ints per range
        now["flags"] = sum(16 * len(f.runs) for g in self.groups for f in (g.decay, g.counted))
        if files and self.directory is not None:
            now["files"] = sum(f.stat().st_size for f in self.directory.path.iterdir())
        for key, value in now.items():
            self.peak[key] = max(self.peak[key], value)
        if now["sum"] >= self.at_peak.get("sum", -1):
            self.at_peak = {**now, "where": where}


def psi(model) -> dict[str, int]:
    """This rank's elements per group: non-expert (sharded over dsp) and expert (over edp)."""
    out = dict.fromkeys(GROUPS, 0)
    for p in model.parameters():
        out[replica_axis(p)] += p.numel()
    return out


def formulas(psi_: dict, n: dict, stage: int, offload: str) -> dict[str, dict[str, float]]:
    """Model-state bytes per rank in this machine's memory by the ZeRO paper's formulas
    (``deepspeed``: 16-bit gradient shards; none for disk offload) and with tedmoe's fp32 gradient
    shard (``tedmoe``: at stage 3 offload keeps no 16-bit parameter shard, the offloaded fp32
    master is its only copy; disk offload keeps the optimizer states in files; host memory is
    this machine's memory), per category, summed over the two groups with each group's own N."""
    out = {"deepspeed": dict.fromkeys(CATEGORIES, 0.0), "tedmoe": dict.fromkeys(CATEGORIES, 0.0)}
    for g in GROUPS:
        P, N = psi_[g], n[g]
        for kind, grad_shard in (("deepspeed", 2), ("tedmoe", 4)):
            offloaded = kind == "tedmoe" and offload != "none"
            f = out[kind]
            if stage < 3:
                f["parameters"] += 2 * P
            elif not (offloaded and N > 1):  # a unit on an axis of one is never sharded, so never offloaded
                f["parameters"] += 2 * P / N
            f["gradients"] += 2 * P if stage == 1 else grad_shard * P / N
            f["optimizer"] += 0.0 if kind == "tedmoe" and offload == "disk" else 12 * P / N
    for f in out.values():
        f["sum"] = sum(f[c] for c in CATEGORIES)
    if offload == "disk":
        del out["deepspeed"]
    return out


def batches(step: int, topo: Topology) -> list:
    """This rank's micro-batches of ``step``: the same on the ranks of a tp group."""
    g = torch.Generator().manual_seed(1000 * step + topo.coord("dp"))
    data = torch.randint(0, MODEL.vocab_size, (ACCUM, MICRO, SEQ + 1), generator=g)
    return [(d[:, :-1], d[:, 1:]) for d in data]


def slowest(seconds: float) -> float:
    t = torch.tensor([seconds])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def build(topo: Topology, stage: int, offload: str, root: str) -> tuple[Engine, Probe]:
    train = TrainConfig(precision="bf16", zero_stage=stage, offload=offload, tile_size=TILE, reduce_bucket_size=BUCKET,
                        offload_path=root if offload == "disk" else None)
    model = GPTMoE(MODEL, topo)
    model.init_weights(0)
    engine = Engine(model, topo, train)
    return engine, Probe(engine)


def measure(engine: Engine, probe: Probe) -> dict:
    """The measured step of one configuration on this rank: peaks, formulas, planner and ledger."""
    topo, train = engine.topology, engine.config
    probe.on = True
    with LEDGER.capture():
        engine.train_step(batches(1, topo))
    probe.done()
    probe.on = False
    tp, ep = topo.size("tp"), topo.size("ep")
    plan = Plan(MODEL, topo.world_size, tp, ep, micro_batch=MICRO, seq_len=SEQ, micro_batches=ACCUM, train=train)
    n = {g: topo.size(g) for g in GROUPS}
    counts = param_counts(MODEL, tp, ep)
    own = psi(engine.model)
    return {"world": topo.world_size, "tp": tp, "ep": ep, "N": n, "stage": train.zero_stage, "offload": train.offload,
            "psi": own, "planner_psi_agrees": own == {"dsp": counts["non_expert"], "edp": counts["expert"]},
            "largest_param": max(p.numel() for p in engine.model.parameters()),
            "peak": probe.peak, "at_peak": probe.at_peak, "formula": formulas(own, n, train.zero_stage, train.offload),
            "planner": memory(plan), "ledger": LEDGER.as_dict(), "predicted": step_comm(plan)}


def diff(measured: dict, predicted: dict) -> dict[str, list]:
    """``{"phase kind/axis": [measured, predicted]}`` for every entry that differs."""
    keys = {(ph, k) for d in (measured, predicted) for ph, entries in d.items() for k in entries}
    return {f"{ph} {k}": [measured.get(ph, {}).get(k), predicted.get(ph, {}).get(k)] for ph, k in sorted(keys)
            if measured.get(ph, {}).get(k) != predicted.get(ph, {}).get(k)}


def combine(per_rank: list[dict]) -> dict:
    """One row from every rank's: memory the maximum over ranks, the ledger rank 0's and which ranks differ."""
    row = dict(per_rank[0])
    row["peak"] = {k: max(r["peak"][k] for r in per_rank) for k in row["peak"]}
    row["peak_sum_min_over_ranks"] = min(r["peak"]["sum"] for r in per_rank)
    row["at_peak"] = max((r["at_peak"] for r in per_rank), key=lambda a: a["sum"])
    row["ledger_diff_ranks"] = [i for i, r in enumerate(per_rank) if diff(r["ledger"], r["predicted"])]
    row["ledger_diff"] = diff(row["ledger"], row["predicted"])
    times = row.pop("step_s")
    row["step_ms"] = 1e3 * statistics.median(times) if times else None
    return row


def ranks(timed_steps: int) -> int:
    """Inside a rank: every layout and configuration of this world size; rank 0 writes the rows.
    A layout's configurations live side by side: each is measured alone, then they take their
    timed steps in turns (so a slower moment of this shared machine falls on all of them)."""
    launch.init_distributed("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    rows = []
    for tp, ep in LAYOUTS[world]:
        topo = Topology(world, tp=tp, ep=ep)
        with tempfile.TemporaryDirectory() as root:
            built = [build(topo, stage, offload, root) for stage, offload in CONFIGS]
            for engine, _ in built:
                engine.train_step(batches(0, topo))  # warm-up (and the one-off check that the ranks' batches agree)
            mine = [measure(engine, probe) for engine, probe in built]
            times = [[] for _ in built]
            for step in range(2, 2 + timed_steps):
                for (engine, _), ts in zip(built, times):
                    dist.barrier()
                    t0 = time.perf_counter()
                    engine.train_step(batches(step, topo))
                    ts.append(slowest(time.perf_counter() - t0))
            for (engine, _), m, ts in zip(built, mine, times):
                engine.optimizer.close()
                every = [None] * world if rank == 0 else None
                dist.gather_object({**m, "step_s": ts}, every)
                if rank == 0:
                    rows.append(combine(every))
        if rank == 0:
            print(f"{world} ranks, tp {tp} ep {ep}: done", flush=True)
    if rank == 0:
        Path(os.environ[_OUT], f"{world}.json").write_text(json.dumps(rows))
    dist.destroy_process_group()
    return 0


def name(r: dict) -> str:
    return f"{r['stage']}" + ("" if r["offload"] == "none" else f" + {r['offload']}")


def layout(r: dict) -> str:
    return f"tp {r['tp']} ep {r['ep']} (dsp {r['N']['dsp']}, edp {r['N']['edp']})"


def planned(r: dict) -> dict[str, float]:
    """The planner's bytes per category in this machine's one memory (``host`` is the same memory here)."""
    p = r["planner"]
    out = {"parameters": p["parameters"], "gradients": p["gradients"], "optimizer": p["optimizer"] + p["host"]}
    out["sum"] = sum(out.values())
    return out


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def mib(x: float) -> str:
    return f"{x / MB:.2f}"


def totals(ledger: dict) -> tuple[int, int]:
    """(bytes, calls) of a ledger dict."""
    entries = [e for phase in ledger.values() for e in phase.values()]
    return sum(e["bytes"] for e in entries), sum(e["calls"] for e in entries)


def tables(rows: list[dict]) -> list[str]:
    """The report's tables, as markdown lines (printed, and written into the report)."""
    out = ["### Model-state memory per rank, MiB (peak of the measured step, maximum over ranks)", "",
           *table(["ranks", "layout", "ZeRO", "param", "grad", "optim", "peak sum", "tedmoe formula", "x", "DeepSpeed",
                   "x", "planner", "x", "peak sum at"],
                  [[r["world"], layout(r), name(r), *(mib(r["peak"][c]) for c in CATEGORIES), mib(r["peak"]["sum"]),
                    mib(r["formula"]["tedmoe"]["sum"]), ratio(r["peak"]["sum"], r["formula"]["tedmoe"]["sum"]),
                    *((mib(r["formula"]["deepspeed"]["sum"]), ratio(r["peak"]["sum"], r["formula"]["deepspeed"]["sum"]))
                      if "deepspeed" in r["formula"] else ("-", "-")),
                    mib(planned(r)["sum"]), ratio(r["peak"]["sum"], planned(r)["sum"]), r["at_peak"]["where"]]
                   for r in rows]),
           "", "### Per category: measured / tedmoe formula, measured / planner; and memory neither counts", "",
           *table(["ranks", "layout", "ZeRO", "param", "grad", "optim", "flags MiB", "Psi non-expert", "Psi expert"],
                  [[r["world"], layout(r), name(r),
                    *(f"{ratio(r['peak'][c], r['formula']['tedmoe'][c])} / {ratio(r['peak'][c], planned(r)[c])}"
                      for c in CATEGORIES), mib(r["peak"]["flags"]), f"{r['psi']['dsp']:,}", f"{r['psi']['edp']:,}"]
                   for r in rows]),
           "", "### Bytes communicated per step per rank (ledger of the measured step) vs `predict.step_comm`", "",
           *table(["ranks", "layout", "ZeRO", "measured MiB", "calls", "predicted MiB", "calls", "equal per entry",
                   "ranks differing"],
                  [[r["world"], layout(r), name(r), mib(totals(r["ledger"])[0]), totals(r["ledger"])[1],
                    mib(totals(r["predicted"])[0]), totals(r["predicted"])[1],
                    "yes" if not r["ledger_diff"] else f"no: {len(r['ledger_diff'])} entries",
                    ", ".join(map(str, r["ledger_diff_ranks"])) or "none"] for r in rows])]
    big = max(rows, key=lambda r: (r["world"], r["tp"], r["ep"]))
    detail = [r for r in rows if (r["world"], r["tp"], r["ep"]) == (big["world"], big["tp"], big["ep"])
              and r["offload"] == "none"]
    keys = sorted({(ph, k) for r in detail for d in (r["ledger"], r["predicted"]) for ph in d for k in d[ph]})
    cell = lambda d, ph, k: d.get(ph, {}).get(k, {"bytes": 0, "calls": 0})  # noqa: E731
    out += ["", f"### Per phase, kind and axis, {big['world']} ranks {layout(big)}: measured bytes (calls); "
                "= where the prediction is the same", "",
            *table(["phase", "kind/axis", *(f"ZeRO-{r['stage']}" for r in detail)],
                   [[ph, k, *(f"{cell(r['ledger'], ph, k)['bytes']:,} ({cell(r['ledger'], ph, k)['calls']})"
                              + (" =" if cell(r["ledger"], ph, k) == cell(r["predicted"], ph, k) else " != predicted "
                                 f"{cell(r['predicted'], ph, k)['bytes']:,} ({cell(r['predicted'], ph, k)['calls']})")
                              for r in detail)] for ph, k in keys])]
    rows3 = {(r["world"], r["tp"], r["ep"], r["offload"]): r for r in rows if r["stage"] == 3}
    offload = []
    for (w, tp, ep, kind), r in rows3.items():
        if kind != "disk":
            continue
        none, cpu = rows3[(w, tp, ep, "none")], rows3[(w, tp, ep, "cpu")]
        states = 12 * sum(r["psi"][g] / r["N"][g] for g in GROUPS)
        offload.append([w, layout(r), mib(r["peak"]["files"]), mib(states), mib(r["planner"]["disk"]),
                        f"{r['peak']['tiles'] / 1024:.0f}", f"{r['planner']['optimizer'] / 1024:.0f}",
                        *(f"{x['step_ms']:.0f}" if x["step_ms"] else "-" for x in (none, cpu, r)),
                        ratio(cpu["step_ms"] or 0, none["step_ms"]), ratio(r["step_ms"] or 0, none["step_ms"])])
    out += ["", "### ZeRO-3 offload: bytes in the offload files per rank, tiles in memory, step time (slowest rank, "
                "median)", "",
            *table(["ranks", "layout", "files MiB", "12 Psi/N MiB", "planner disk MiB", "tile KiB (seen)",
                    "planner tiles KiB", "ms none", "ms cpu", "ms disk", "cpu/none", "disk/none"], offload)]
    return out


def write_report(result: Path) -> Path:
    """The dated report of a result file: the command, machine, tables and a reading of them."""
    d = json.loads(Path(result).read_text())
    rows, c = d["rows"], d["config"]
    m = c["model"]
    lines = ["# ZeRO stages 1-3 and offload: model-state memory and communication per rank", "",
             f"Date: {d['date']}. Result: `{Path(result).resolve().relative_to(common.ROOT)}`.", "",
             f"Reproduce: `{d['command']}`", "",
             f"Machine: {d['platform']}; {d['cpu_count']} CPUs shared with other work; {d['threads']} thread per rank; "
             f"torch {d['torch']}; Python {d['python']}. tedmoe: commit {c['commit']} "
             + (f"with changes in {', '.join(c['tedmoe_differs_from_commit'])}" if c["tedmoe_differs_from_commit"]
                else "exactly") + f" (imported from `{c['tedmoe_path']}`"
             + ("" if Path(c["tedmoe_path"]) == common.ROOT / "tedmoe" else
                ", a copy of it put first on PYTHONPATH while others edited the work tree") + ").", "",
             f"Model: vocab {m['vocab_size']}, H={m['hidden_size']}, {m['num_layers']} blocks, {m['num_heads']} heads, "
             f"dense MLP F={m['ffn_hidden_size']}, every {m['moe_every']}nd block MoE with {m['moe']['num_experts']} "
             f"experts F={m['moe']['ffn_hidden_size']} top-{m['moe']['top_k']}, capacity factor "
             f"{m['moe']['capacity_factor']} (not dropless). Per rank {c['micro_batches']} micro-batches of "
             f"{c['micro_batch']} x {c['seq_len']} tokens; {c['precision']}; optimizer tiles of {c['tile_size']:,} "
             f"elements; ZeRO-2 buckets of {c['reduce_bucket_size']:,} elements. How each number is taken: the "
             "docstring of `benchmarks/zero_memory.py`.", "",
             *tables(rows), "", "## Reading", "", *reading(rows), ""]
    out = common.report_path(Path(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return out


def span(values, fmt: str = ".2f") -> str:
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return lo if lo == hi else f"{lo}-{hi}"


def shard_bytes(r: dict, item: int = 2) -> int:
    """Bytes of this rank's shards of the sharded groups (N > 1) in ``item``-byte elements."""
    return sum(item * -(-r["psi"][g] // r["N"][g]) for g in GROUPS if r["N"][g] > 1)


def block_shard_bytes(r: dict) -> int:
    """The largest block's ZeRO-3 shards (sharded units only) in bf16."""
    return max(sum(2 * -(-u[a] // n) for a, n in (("dp", r["N"]["dsp"]), ("edp", r["N"]["edp"])) if n > 1 and u[a])
               for u in units(MODEL, r["tp"], r["ep"])[1:])


def offload_reading(cpu: list[dict], disk: list[dict], base) -> str:
    """What stage 3 with offload kept of the parameters, against stage 3 without offload and the planner."""
    rs = cpu + disk
    same = [c for c in ("gradients", "optimizer") if all(r["peak"][c] == base(r)["peak"][c] for r in cpu)]
    alike = all(c["peak"]["parameters"] == d["peak"]["parameters"] for c, d in zip(cpu, disk))
    drop = [base(r)["peak"]["parameters"] - r["peak"]["parameters"] for r in rs]
    extra = [r["peak"]["parameters"] - r["planner"]["parameters"] for r in rs]
    copies = sum(e == block_shard_bytes(r) for e, r in zip(extra, rs))
    return ("With `offload=\"cpu\"` (states in host memory, here the machine's one memory"
            + (f": its {' and '.join(same)} peaks equalled stage 3's without offload" if same else "")
            + ") and with `offload=\"disk\"` (states in files) the parameters' peak was "
            f"{span([d / 1024 for d in drop], '.0f')} KiB below stage 3's without offload"
            + (", the same with both" if alike else "") + ": the bf16 shards are dropped (the offloaded fp32 master "
            "is their only copy and the gather converts it). It exceeded the planner's by "
            f"{span([e / 1024 for e in extra], '.0f')} KiB: the bf16 copy of a prefetched block's shards, made from "
            "the master for its gather and alive until that gather is waited for, which the planner counts as the "
            f"largest block's shards (the excess equals them in {copies} of {len(rs)} configurations).")


def reading(rows: list[dict]) -> list[str]:
    """What the tables show, computed from them (so the same result always reads the same)."""
    at = {(r["world"], r["tp"], r["ep"], r["stage"], r["offload"]): r for r in rows}
    stage = lambda s, o="none": [r for r in rows if r["stage"] == s and r["offload"] == o]  # noqa: E731
    x = lambda r, c="sum": r["peak"][c] / planned(r)[c]  # noqa: E731
    f = lambda r, c="sum": r["peak"][c] / r["formula"]["tedmoe"][c]  # noqa: E731
    base = lambda r: at[(r["world"], r["tp"], r["ep"], 3, "none")]  # noqa: E731  (stage 3 in memory)
    out = []
    bad = [r for r in rows if r["ledger_diff_ranks"]]
    out.append("**Communication.** " + (
        f"In all {len(rows)} configurations the ledger of the measured step equalled `predict.step_comm` entry "
        "by entry (calls, bytes and payload per phase, kind and axis) on every rank." if not bad else
        f"The ledger differed from `predict.step_comm` in {len(bad)} of {len(rows)} configurations: "
        + "; ".join(f"{r['world']} ranks {layout(r)} ZeRO {name(r)} on ranks {r['ledger_diff_ranks']}: "
                    f"{r['ledger_diff']}" for r in bad) + "."))
    one = stage(1)
    excess = [r["peak"]["gradients"] - r["formula"]["tedmoe"]["gradients"] for r in one]
    exact = all(e == shard_bytes(r) for e, r in zip(excess, one))
    share = lambda rs: span([100 * r["peak"]["optimizer"] / r["peak"]["sum"] for r in rs], ".0f")  # noqa: E731
    lo, hi = min(r["N"]["dsp"] for r in one), max(r["N"]["dsp"] for r in one)
    low, high = ([r for r in one + stage(2) if r["N"]["dsp"] == n] for n in (lo, hi))
    out.append(f"**What dominates.** The optimizer states were {share(low)}% of the peak sum at stages 1 and 2 "
               f"with dsp {lo} and {share(high)}% with dsp {hi}: 12 Psi/N shrinks with N, the whole bf16 "
               f"parameters (and at stage 1 gradients) do not. Stage 1 measured {span([f(r) for r in one])}x its "
               f"formula and {span([x(r) for r in one])}x the planner; the gradients are the whole difference to the "
               "formula: " + (
                   "exactly the reduced bf16 gradient shard (2 Psi/N per sharded group) that the step holds "
                   "beside the whole gradient buffer, in every layout; the planner counts it, the formula does not."
                   if exact else f"{span([e / MB for e in excess])} MiB more than 2 Psi."))
    two = stage(2)
    staged = [(r["peak"]["gradients"] - 4 * sum(-(-r["psi"][g] // BUCKET) * (BUCKET // r["N"][g]) for g in GROUPS))
              / (2 * BUCKET) for r in two]
    spans = [-(-r["largest_param"] // BUCKET) for r in two]
    out.append(f"**Stage 2** measured {span([f(r) for r in two])}x the tedmoe formula (2 Psi + 16 Psi/N), "
               f"{span([r['peak']['sum'] / r['formula']['deepspeed']['sum'] for r in two])}x DeepSpeed's "
               f"(2 Psi + 14 Psi/N) and {span([x(r) for r in two])}x the planner. Parameters and optimizer states "
               f"exceed the formula by the padding to whole buckets ({span([f(r, 'parameters') for r in two])}x, "
               f"{span([f(r, 'optimizer') for r in two])}x). At the gradient peak about "
               f"{span(staged, '.1f')} buckets of {BUCKET:,} elements were staged in bf16 beside the fp32 shard, "
               f"as the planner counts: the largest parameter (one MoE layer's local expert weights, "
               f"{span([r['largest_param'] for r in two], ',')} elements) spans {span(spans, 'd')} buckets and "
               "arrives as one gradient, so all of them are open at once"
               + (" (in every layout exactly its buckets plus one)" if all(k == n + 1 for k, n in zip(staged, spans))
                  else "") + "; gradients measured "
               f"{span([x(r, 'gradients') for r in two])}x the planner's.")
    three = stage(3)
    series = sorted((r for r in three if (r["tp"], r["ep"]) == (1, 2)), key=lambda r: r["world"])
    out.append(f"**Stage 3** measured {span([x(r) for r in three])}x the planner (parameters "
               f"{span([x(r, 'parameters') for r in three])}x, gradients {span([x(r, 'gradients') for r in three])}x: "
               "the planner counts the root's and the largest block's units staged whole at the same time, an "
               f"upper bound this backward did not reach) but {span([f(r) for r in three])}x 18 Psi/N and "
               f"{span([r['peak']['sum'] / r['formula']['deepspeed']['sum'] for r in three])}x DeepSpeed's 16 Psi/N: "
               "the working set (the root units and two blocks whole, a unit's gradient staged) does not shrink "
               "with N. With tp 1 ep 2 at " + ", ".join(f"{r['world']}" for r in series) + " ranks the peak sum was "
               + ", ".join(mib(r["peak"]["sum"]) for r in series) + " MiB (planner "
               + ", ".join(mib(planned(r)["sum"]) for r in series) + "), of which "
               + ", ".join(mib(r["peak"]["sum"] - r["formula"]["tedmoe"]["sum"]) for r in series)
               + " MiB above 18 Psi/N; so it falls with N as the planner predicts, towards the working set. "
               "Where an axis has one rank (edp 1, or dsp 1) its units are never sharded and the fp32 gradient "
               "shard makes stage 3 cost more than stage 1: " + ", ".join(
                   f"{r['world']} ranks {layout(r)}: stage 3 {mib(r['peak']['sum'])} vs stage 1 "
                   f"{mib(at[(r['world'], r['tp'], r['ep'], 1, 'none')]['peak']['sum'])} MiB"
                   for r in three if r["peak"]["sum"] > at[(r["world"], r["tp"], r["ep"], 1, "none")]["peak"]["sum"])
               + ".")
    cpu, disk = stage(3, "cpu"), stage(3, "disk")
    out.append("**Offload.** " + offload_reading(cpu, disk, base))
    files = all(r["peak"]["files"] == 12 * sum(-(-r["psi"][g] // r["N"][g]) for g in GROUPS) for r in disk)
    out[-1] += (" With `offload=\"disk\"` the files held " + (
        "exactly 12 bytes per element of this rank's shards (fp32 master and both moments), what the planner "
        "predicts" if files else f"{span([r['peak']['files'] / MB for r in disk])} MiB")
        + f", and the peak sum fell to {span([r['peak']['sum'] / base(r)['peak']['sum'] for r in disk])}x stage 3's "
        "in memory. In memory the probe sees one tile of the three states "
        f"({span([r['peak']['tiles'] / 1024 for r in disk], '.0f')} KiB); the planner counts three (the read ahead and "
        "the write behind live inside the tile generator, out of the probe's sight), so the measured optimizer "
        "memory is a lower bound.")
    if all(r["step_ms"] for r in rows):
        out[-1] += (f" Step time with disk offload was {span([r['step_ms'] / base(r)['step_ms'] for r in disk])}x "
                    f"the in-memory step (cpu: {span([r['step_ms'] / base(r)['step_ms'] for r in cpu])}x), the "
                    "configurations taking turns step by step on this shared 2-core machine; files of a few MiB stay "
                    "in the page cache, so this measures the copies and system calls, not a disk.")
    out.append(f"**Flags.** Each group's weight-decay and norm flags are kept as the true ranges of its shard "
               f"(two integers per range): {span([r['peak']['flags'] / 1024 for r in rows], '.1f')} KiB per rank "
               "here (a byte per element each before; counted by neither the formulas nor the planner). Blind "
               "spots of this probe: at stages 2 and 3 a parameter's incoming gradient is moved "
               "into its bucket by ZeRO's hook before the probe's hook runs, so the whole gradient of the parameter "
               "being accumulated (up to the largest parameter, in bf16) is not seen; activations are not counted.")
    return ["\n\n".join(out)]


def source() -> dict:
    """Which tedmoe runs: where it is imported from, the repository's HEAD and the files in which
    the imported package differs from HEAD's ``tedmoe/`` (none: it is that commit exactly)."""
    import subprocess

    import tedmoe

    def git(*args, stdin=None) -> str:
        return subprocess.run(["git", *args], cwd=common.ROOT, input=stdin, capture_output=True, text=True).stdout

    committed = {}
    for line in git("ls-tree", "-r", "HEAD", "tedmoe").splitlines():  # "<mode> blob <hash>\t<path>"
        meta, path = line.split("\t")
        committed[path] = meta.split()[2]
    package = Path(tedmoe.__file__).parent
    files = sorted(f for f in package.rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    blobs = git("hash-object", "--stdin-paths", stdin="\n".join(map(str, files))).split()
    imported = {str(f.relative_to(package.parent)): blob for f, blob in zip(files, blobs)}
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "tedmoe_path": str(package),
            "tedmoe_differs_from_commit": sorted(k for k in committed.keys() | imported.keys()
                                                 if committed.get(k) != imported.get(k))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", type=int, nargs="+", default=sorted(LAYOUTS), choices=sorted(LAYOUTS))
    p.add_argument("--timed-steps", type=int, default=3, help="timed steps per configuration after the measured one")
    p.add_argument("--report", type=Path, help="only write the report of this result file")
    args = p.parse_args()
    if launch.launched():
        return ranks(args.timed_steps)
    if args.report:
        print(f"wrote {write_report(args.report).relative_to(common.ROOT)}")
        return 0
    code = source()  # before the ranks start: what they will import
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as out:
        os.environ[_OUT] = out
        for world in args.worlds:
            t0 = time.perf_counter()
            if common.start_ranks(world):
                failed.append(world)
                continue
            rows += json.loads(Path(out, f"{world}.json").read_text())
            print(f"{world} ranks: {time.perf_counter() - t0:.0f} s", flush=True)
    if not rows:
        return 1
    config = {"model": dataclasses.asdict(MODEL), "micro_batch": MICRO, "seq_len": SEQ, "micro_batches": ACCUM,
              "tile_size": TILE, "reduce_bucket_size": BUCKET, "precision": "bf16", "worlds": args.worlds,
              "layouts": {w: LAYOUTS[w] for w in args.worlds}, "configs": CONFIGS, "timed_steps": args.timed_steps,
              "failed_worlds": failed, **code}
    for line in tables(rows):
        print(line)
    result = common.write_result("zero_memory", config, {"rows": rows}, threads=int(os.environ["OMP_NUM_THREADS"]))
    print(f"wrote {write_report(result).relative_to(common.ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
