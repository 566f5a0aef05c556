"""MoE layer forward+backward time: tedmoe's index dispatch vs the one-hot einsum dispatch
(GShard: ``einsum("sec,sm->ecm")`` and back) vs the limit (the experts' six GEMMs and the
activation on a full ``[E, C, H]`` buffer, as plain torch autograd computes them), in one run.

Reproduce:  .venv/bin/python benchmarks/moe_layer.py            (H=512, F=2048, E=8, k=2)
            .venv/bin/python benchmarks/moe_layer.py --tokens 2048 --hidden 256 --ffn 1024 --repeats 20   (the issue shape)
            .venv/bin/python benchmarks/moe_layer.py --tokens 512 1024 --repeats 2   (quick)

Single process, fp32, capacity factor 1.0. Times are best-of-N wall clock (the layer and the
limit interleaved); "ours/limit" is the median over rounds of the ratio within a round (this
machine's speed drifts by tens of percent between seconds; a ratio inside one round does not
see it); the "prof:" columns attribute self CPU time by operator within profiled
runs of the layer itself, which is steadier than a difference of two noisy timings.
Prints a table and writes benchmarks/results/moe_layer-<date>.json; benchmarks/report.py turns that
into a dated report.

Layouts mode: tedmoe's layer (and optionally DeepSpeed's) in multi-rank layouts, in one run.

Reproduce:  .venv/bin/python benchmarks/moe_layer.py --layouts      (tedmoe alone; E=8, H=256, F=1024, k=2)
            ds/bin/python benchmarks/moe_layer.py --layouts --peer deepspeed
                (any virtualenv where `pip install deepspeed` was done; see benchmarks/deepspeed_peer.py)
            .venv/bin/python benchmarks/moe_layer.py --layouts 1,2,2 --tokens 256 --repeats 2   (quick)

A layout is TP,EP,WORLD; by default 1 process (default threads), then 2 ranks EP 2, 4 ranks EP 2 x
TP 2 and 4 ranks EP 4, one thread per rank, started by common.start_ranks (each layout's rank 0
hands its result back in a JSON file). fp32, capacity factor 1.0 (min 4), 2048 tokens per
data-parallel replica (the ranks of a TP group hold the same tokens). A timed step is forward +
backward after a barrier, timed on the slowest rank (all-reduce MAX); tedmoe and the peer alternate
step by step with the layout's limit (each rank runs only its experts' six GEMMs and the GELU on
the rows it receives, by plain torch autograd: no layer can beat it); the table gives the median
and the best step. A second table gives the CPU time all ranks used per step and the share of the
machine's cores it kept busy (with more ranks than cores, a layer near 1 is bound by its CPU work,
not by waiting; overlapping communication can then win at most 1/busy). A third splits tedmoe's self CPU
time (rank 0, two profiled steps) into router, dispatch/combine copies, collectives, expert GEMMs,
activation and other. If `--peer deepspeed` is asked and DeepSpeed does not import, one line says
the peer is skipped and tedmoe runs alone (exit code 0).
Writes benchmarks/results/moe_layer_layouts-<date>.json (benchmarks/report.py does not render it yet).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from tedmoe.config import MoEConfig
from tedmoe.moe.layer import MoE
from tedmoe.parallel import launch
from tedmoe.parallel.topology import Topology

import common


def timed(fns, repeats: int, rounds: list | None = None) -> list[float]:
    """Best-of-``repeats`` seconds of each function, run interleaved so drifts hit all alike;
    ``rounds`` (if given) receives every round's times, for ratios taken round by round."""
    times = [[] for _ in fns]
    for i in range(repeats + 1):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            if i:  # the first round warms up
                ts.append(time.perf_counter() - t0)
    if rounds is not None:
        rounds.extend(zip(*times))
    return [min(ts) for ts in times]


def fwd_bwd(layer, x):
    def run():
        xg = x.detach().requires_grad_(True)
        layer(xg)[0].sum().backward()
    return run


def einsum_baseline(layer, x, capacity):
    """The GShard formulation: dense [S, E, C] dispatch and combine tensors."""
    E = layer.config.num_experts

    def run():
        xg = x.detach().requires_grad_(True)
        routing = layer.router(xg)
        S, K = routing.expert_SK.shape
        kept = routing.slot_SK >= 0
        tok = torch.arange(S).unsqueeze(1).expand(S, K)[kept]
        e, s = routing.expert_SK[kept], routing.slot_SK[kept]
        dispatch_SEC = torch.zeros(S, E, capacity)
        dispatch_SEC[tok, e, s] = 1.0
        combine_SEC = torch.zeros(S, E, capacity).index_put((tok, e, s), routing.gate_SK[kept])
        expert_in = torch.einsum("sec,sm->ecm", dispatch_SEC, xg)
        y = layer.experts(expert_in)
        out = torch.einsum("sec,ecm->sm", combine_SEC, y)
        out.sum().backward()
    return run


def gemms_only(layer, x_ECH):
    """The limit: the experts' six GEMMs and the activation at the layer's shapes, as plain torch
    autograd computes them (not tedmoe's expert code, so the limit does not move with it)."""
    w1, w2 = layer.experts.w1, layer.experts.w2
    act = torch.nn.functional.gelu if layer.config.activation == "gelu" else None
    assert act is not None, "the limit is written for the GELU MLP"

    def run():
        xg = x_ECH.detach().requires_grad_(True)
        torch.bmm(act(torch.bmm(xg, w1)), w2).sum().backward()
    return run


EXPERT_OPS = {"aten::bmm", "aten::gelu", "aten::gelu_backward", "aten::silu", "aten::silu_backward"}


def profile_shares(fn) -> tuple[float, float]:
    """Share of self CPU time in the expert GEMMs, and in the whole expert MLP (GEMMs +
    activation), over two profiled runs of ``fn``: attribution inside the same run."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
        fn()
    rows = prof.key_averages()
    total = sum(r.self_cpu_time_total for r in rows)
    gemm = sum(r.self_cpu_time_total for r in rows if r.key == "aten::bmm")
    expert = sum(r.self_cpu_time_total for r in rows if r.key in EXPERT_OPS)
    return gemm / total, expert / total


LAYOUTS = ["1,1,1", "1,2,2", "2,2,4", "1,4,4"]  # TP,EP,WORLD
CATEGORIES = ("router", "dispatch/combine", "collectives", "expert GEMMs", "activation", "other")
ROUTER_OPS = {"aten::mm", "aten::addmm", "aten::_softmax", "aten::_softmax_backward_data", "aten::topk", "aten::sort"}
ACTIVATION_OPS = {"aten::gelu", "aten::gelu_backward", "aten::silu", "aten::silu_backward"}
COPY_OPS = ("index", "scatter", "gather", "zero", "fill", "cat", "copy_")


def category(name: str, scope: set[str]) -> str:
    """Where an op's self time goes: by its scope (``collective``, ``router``, ``experts``; see
    ``breakdown``), else by its name (backward ops run outside the forward's scopes; tedmoe's
    experts use ``bmm`` only, so a bare ``mm`` is the router's)."""
    if "collective" in scope or name.startswith(("c10d::", "gloo:")):
        return "collectives"
    if name == "aten::bmm" or ("experts" in scope and name in ("aten::mm", "aten::addmm")):
        return "expert GEMMs"
    if name in ACTIVATION_OPS:
        return "activation"
    if "router" in scope or name in ROUTER_OPS:
        return "router"
    return "dispatch/combine" if any(k in name for k in COPY_OPS) else "other"


def breakdown(layer: MoE, step, steps: int = 2) -> dict[str, float] | None:
    """Self CPU time per category on rank 0, ms per step, over ``steps`` profiled steps (every
    rank runs them). For these steps only, the router, the experts and
    ``tedmoe.parallel.comm._run_collective`` run inside ``record_function`` scopes."""
    from torch.profiler import profile, record_function

    from tedmoe.parallel import comm

    def scoped(name, fn):
        def run(*a, **kw):
            with record_function(name if isinstance(name, str) else name(*a)):
                return fn(*a, **kw)
        return run

    run_collective = getattr(comm, "_run_collective", None)
    if run_collective is not None:
        comm._run_collective = scoped(lambda kind, *a: f"collective:{kind}", run_collective)
    layer.router.forward = scoped("router", layer.router.forward)
    layer.experts.forward = scoped("experts", layer.experts.forward)
    try:
        with profile() if dist.get_rank() == 0 else contextlib.nullcontext() as prof:
            for _ in range(steps):
                step_time(scoped("step", step))
    finally:
        del layer.router.forward, layer.experts.forward
        if run_collective is not None:
            comm._run_collective = run_collective
    if prof is None:  # not rank 0
        return None
    ms = dict.fromkeys(CATEGORIES, 0.0)
    for event in prof.events():
        scope, e = set(), event  # the names of the event and of every event enclosing it
        while e is not None:
            scope.add("collective" if e.name.startswith("collective:") else e.name)
            e = e.cpu_parent
        if "step" in scope:  # not the barrier and the all-reduce of the timing
            ms[category(event.name, scope)] += event.self_cpu_time_total / 1e3 / steps
    return ms


def step_time(fn, cpu: list | None = None) -> float:
    """Seconds of one step on the slowest rank, all ranks starting together; ``cpu`` (if given)
    receives the CPU seconds all ranks' processes used in the step (every thread, gloo's included)."""
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    used = torch.tensor([time.process_time() - c0], dtype=torch.float64)
    dist.all_reduce(wall, op=dist.ReduceOp.MAX)
    dist.all_reduce(used)
    if cpu is not None:
        cpu.append(used.item())
    return wall.item()


def measure_layout(args, tp: int, ep: int, world: int) -> dict:
    """Time tedmoe's layer (and the peer's) in this layout; runs on every rank of it."""
    topo = Topology(world, tp=tp, ep=ep)
    cfg = MoEConfig(ffn_hidden_size=args.ffn, num_experts=args.experts, top_k=2, capacity_factor=1.0, min_capacity=4)
    torch.manual_seed(0)  # the same router on every rank
    layer = MoE(args.hidden, cfg, topo)
    x = torch.randn(args.tokens, args.hidden, generator=torch.Generator().manual_seed(1 + topo.coord("dp")))
    name = "1 process" if world == 1 else f"{world} ranks EP {ep}" + (f" x TP {tp}" if tp > 1 else "")
    row = {"layout": name, "tp": tp, "ep": ep, "world": world, "dp": world // tp, "tokens": args.tokens,
           "threads_per_rank": torch.get_num_threads(), "capacity": cfg.capacity(args.tokens),
           "tedmoe_ep_group": list(topo.axis("ep").ranks)}
    with torch.no_grad():
        row["tedmoe_drop_fraction"] = layer(x)[1].drop_fraction.item()
    # the limit: every rank runs only its experts' six GEMMs and the activation, on the rows they
    # receive (L local experts x ep sources x C slots), as plain torch autograd computes them
    C = cfg.capacity(args.tokens)
    steps = {"tedmoe": fwd_bwd(layer, x),
             "limit": gemms_only(layer, torch.randn(args.experts // ep, ep * C, args.hidden))}
    if args.peer:
        import deepspeed_peer

        peer = deepspeed_peer.build(args.hidden, args.ffn, args.experts, tp, ep, router=layer.router.weight)
        row["deepspeed_ep_group"] = dist.get_process_group_ranks(peer.deepspeed_moe.ep_group)
        row["deepspeed_finite"] = deepspeed_peer.finite(peer, x)
        steps["deepspeed"] = fwd_bwd(peer, x)
    times = {key: [] for key in steps}
    cpu = {key: [] for key in steps}
    for i in range(args.warmup + args.repeats):  # interleaved, so drifts hit both layers alike
        for key, fn in steps.items():
            t = step_time(fn, cpu[key] if i >= args.warmup else None)
            if i >= args.warmup:
                times[key].append(t)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for key, ts in times.items():
        # CPU seconds of all ranks per step, and the share of the machine's cores they kept busy:
        # near 1, a layout with more ranks than cores is bound by the CPU work itself, not by waiting
        row[key] = {"median_ms": 1e3 * statistics.median(ts), "best_ms": 1e3 * min(ts), "steps_ms": [1e3 * t for t in ts],
                    "cpu_ms": 1e3 * statistics.median(cpu[key]),
                    "busy": statistics.median(c / (t * cores) for c, t in zip(cpu[key], ts))}
    row["tedmoe_breakdown_ms"] = breakdown(layer, steps["tedmoe"])
    return row


def run_layout(args) -> int:
    """One layout: in this process for one rank, else in its own ranks; rank 0 writes the JSON."""
    tp, ep, world = map(int, args.only_layout.split(","))
    if world == 1:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif not launch.launched():
        return common.start_ranks(world)
    else:
        launch.init_distributed("gloo")
    try:
        row = measure_layout(args, tp, ep, world)
        if dist.get_rank() == 0:
            Path(args.out).write_text(json.dumps(row))
    finally:
        dist.destroy_process_group()
    return 0


def print_tables(args, rows: list[dict]) -> None:
    print(f"\nE={args.experts} H={args.hidden} F={args.ffn} top-2 fp32, capacity factor 1.0, {args.tokens} tokens per "
          f"replica; forward + backward, slowest rank, {args.repeats} steps after {args.warmup}; torch {torch.__version__}")
    print("| layout | DeepSpeed ms | tedmoe ms | DeepSpeed / tedmoe | DeepSpeed best ms | tedmoe best ms | best ratio "
          "| limit ms | tedmoe / limit | DeepSpeed / limit |")
    print("|---" * 10 + "|")
    for r in rows:
        ted, ds, lim = r["tedmoe"], r.get("deepspeed"), r["limit"]["median_ms"]
        cells = [f"{r['layout']} ({r['threads_per_rank']} thr/rank)"]
        for key in ("median_ms", "best_ms"):
            cells += [f"{ds[key]:.1f}", f"{ted[key]:.1f}", f"{ds[key] / ted[key]:.2f}"] if ds else ["-", f"{ted[key]:.1f}", "-"]
        cells += [f"{lim:.1f}", f"{ted['median_ms'] / lim:.2f}", f"{ds['median_ms'] / lim:.2f}" if ds else "-"]
        print("| " + " | ".join(cells) + " |")
    print("\nCPU time of all ranks per step (ms) and the share of the machine's cores it kept busy:")
    print("| layout | DeepSpeed CPU ms | tedmoe CPU ms | DeepSpeed busy | tedmoe busy |\n" + "|---" * 5 + "|")
    for r in rows:
        ted, ds = r["tedmoe"], r.get("deepspeed")
        cells = [f"{ds['cpu_ms']:.0f}", f"{ted['cpu_ms']:.0f}", f"{ds['busy']:.2f}", f"{ted['busy']:.2f}"] if ds \
            else ["-", f"{ted['cpu_ms']:.0f}", "-", f"{ted['busy']:.2f}"]
        print(f"| {r['layout']} | " + " | ".join(cells) + " |")
    print("\ntedmoe self CPU time on rank 0, ms per step (2 profiled steps):")
    print("| layout | " + " | ".join(CATEGORIES) + " | sum |\n" + "|---" * (len(CATEGORIES) + 2) + "|")
    for r in rows:
        ms = r["tedmoe_breakdown_ms"]
        print(f"| {r['layout']} | " + " | ".join(f"{ms[c]:.1f}" for c in CATEGORIES) + f" | {sum(ms.values()):.1f} |")


def run_layouts(args) -> int:
    """Every layout in turn, then the two tables and one dated result."""
    os.environ[common._COMMAND] = common.command()  # what the ranks (and the result) record
    if args.peer:
        import deepspeed_peer

        reason = deepspeed_peer.missing()
        if reason:
            print(f"peer deepspeed skipped: deepspeed is not importable ({reason})")
            args.peer = None
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(args.layouts or LAYOUTS):
            out = Path(tmp) / f"{i}.json"
            argv = [sys.argv[0], "--only-layout", spec, "--out", str(out)] + (["--peer", args.peer] if args.peer else [])
            for key in ("tokens", "hidden", "ffn", "experts", "repeats", "warmup"):
                argv += [f"--{key}", str(getattr(args, key))]
            argv, sys.argv = sys.argv, argv
            try:
                run_layout(parse_args())
            except Exception:  # the one-process layout runs here; a multi-rank one reports itself
                traceback.print_exc()
            finally:
                sys.argv = argv
            if out.exists():
                rows.append(json.loads(out.read_text()))
            else:
                failed.append(spec)
    print_tables(args, rows)
    for spec in failed:
        print(f"layout {spec} failed: no result", file=sys.stderr)
    config = {k: v for k, v in vars(args).items() if k not in ("only_layout", "out", "top_k")}
    config["layouts"] = args.layouts or LAYOUTS
    if args.peer:
        config["deepspeed_version"] = importlib.metadata.version("deepspeed")
    if rows:
        common.write_result("moe_layer_layouts", config, {"layouts": rows})
    return 1 if failed else 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", nargs="*", metavar="TP,EP,WORLD", help=f"layouts mode (default: {' '.join(LAYOUTS)})")
    p.add_argument("--peer", choices=["deepspeed"], help="layouts mode: also time DeepSpeed's MoE layer")
    p.add_argument("--only-layout", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, nargs="+", help="default 512 ... 16384; layouts: one value, default 2048")
    p.add_argument("--hidden", type=int, help="H: default 512, layouts 256")
    p.add_argument("--ffn", type=int, help="F: default 2048, layouts 1024")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2, help="default mode only (layouts are top-2)")
    p.add_argument("--repeats", type=int, help="timed runs: default 5, layouts 10")
    p.add_argument("--warmup", type=int, default=3, help="layouts mode: untimed steps first")
    args = p.parse_args()
    layouts = args.layouts is not None or args.only_layout is not None
    defaults = dict(tokens=[2048], hidden=256, ffn=1024, repeats=10) if layouts else \
        dict(tokens=[512, 1024, 2048, 4096, 8192, 16384], hidden=512, ffn=2048, repeats=5)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if layouts:
        args.tokens = args.tokens[0]
    return args


def main() -> int:
    args = parse_args()
    if args.only_layout:
        return run_layout(args)
    if args.layouts is not None:
        return run_layouts(args)
    return single(args)


def single(args) -> int:
    torch.manual_seed(0)
    cfg = MoEConfig(ffn_hidden_size=args.ffn, num_experts=args.experts,
                    top_k=args.top_k, capacity_factor=1.0, dtd=False)
    layer = MoE(args.hidden, cfg, Topology.single())
    rows = []
    head = (f"{'S':>6} {'C':>5} {'ours ms':>9} {'einsum ms':>10} {'einsum/ours':>11} {'limit ms':>9} "
            f"{'ours/limit':>10} {'prof: outside GEMMs':>19} {'outside MLP':>11}")
    print(f"H={args.hidden} F={args.ffn} E={args.experts} k={args.top_k} fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(head)
    for S in args.tokens:
        x = torch.randn(S, args.hidden)
        C = cfg.capacity(S)
        rounds: list = []
        t_ours, t_gemm = timed([fwd_bwd(layer, x), gemms_only(layer, torch.randn(args.experts, C, args.hidden))],
                               args.repeats, rounds)
        over_limit = statistics.median(a / b for a, b in rounds)  # round by round: steadier than best/best
        (t_ein,) = timed([einsum_baseline(layer, x, C)], 2 if S <= 4096 else 1)  # the slow baseline: fewer runs
        gemm_share, mlp_share = profile_shares(fwd_bwd(layer, x))
        row = {"tokens": S, "capacity": C, "ours_s": t_ours, "einsum_s": t_ein, "gemm_s": t_gemm,
               "einsum_over_ours": t_ein / t_ours, "ours_over_limit": over_limit,
               "ours_over_limit_best": t_ours / t_gemm,
               "outside_gemms_profiled": 1 - gemm_share, "outside_expert_mlp_profiled": 1 - mlp_share}
        rows.append(row)
        print(f"{S:>6} {C:>5} {1e3 * t_ours:>9.1f} {1e3 * t_ein:>10.1f} {t_ein / t_ours:>11.2f} "
              f"{1e3 * t_gemm:>9.1f} {over_limit:>10.3f} "
              f"{100 * row['outside_gemms_profiled']:>18.1f}% {100 * row['outside_expert_mlp_profiled']:>10.1f}%")
    slopes = {}
    for key in ("ours_s", "einsum_s", "gemm_s") if len(rows) > 1 else ():
        xs = [math.log(r["tokens"]) for r in rows]
        ys = [math.log(r[key]) for r in rows]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        slopes[key] = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    if slopes:
        print("log-log slope of time vs S: " + ", ".join(f"{k[:-2]} {v:.2f}" for k, v in slopes.items()))
    config = {k: v for k, v in vars(args).items() if k not in ("layouts", "peer", "only_layout", "out", "warmup")}
    common.write_result("moe_layer", config, {"rows": rows, "loglog_slopes": slopes})
    return 0


if __name__ == "__main__":
    sys.exit(main())
