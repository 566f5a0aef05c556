"""Model compression end to end on CPU: a float run, post-training INT8 / INT4 / W8A8 (with and without
ZeroQuant's layer-by-layer distillation), XTC-style quantisation-aware binary / ternary / 2:4 runs
(ternary also with a teacher), each compressed by ``tedmoe compress`` and measured in one run: bytes
on disk and in memory, validation perplexity, decode tokens/s on the engine and greedy tokens
against the float model.

Reproduce:  TEDMOE_CACHE=/tmp/tedmoe-cache .venv/bin/python benchmarks/compression.py
                                            (H=128, 4 layers, 4 heads, 4 SwiGLU experts F=256, top-2,
                                             byte tokenizer, the embedded corpus; 400 float steps, then
                                             200 more per continuation; group size 128; ~27 minutes
                                             here: 15 training, 2 compressing, 10 measuring)
            TEDMOE_CACHE=/tmp/tedmoe-cache .venv/bin/python benchmarks/compression.py --quick
                                            (40 + 20 steps, 2 validation batches, 1 round: a smoke run)

``TEDMOE_CACHE`` is where the embedded corpus (the running Python's standard library sources, 4 MB,
byte tokens) is prepared once (default ``~/.cache/tedmoe``). Runs and compressed models go to a
temporary directory, deleted at the end (``--work DIR`` keeps them there). Every training and
compression step is the ``tedmoe`` CLI (``python -m tedmoe.cli``) in a child process with
``OMP_NUM_THREADS=--threads`` (default 1); the commands are printed and kept in the JSON.

1. Float run: ``tedmoe train --preset default --nproc 1`` with ``parallel.tp=1 parallel.ep=1``, the
   experts' F=256 (so that the group size 128 divides every quantised weight's inputs: H=128, the
   attention output's 4 x 32 and the experts' F) and ``train.max_steps=--steps`` (400); the default
   preset's optimiser (AdamW, lr 3e-3, 20 warmup steps, cosine to 0.1x over ``max_steps``), global
   batch 16 x 128 tokens, seed 0.
2. Continuations (XTC's recipe: start from the trained float model): the float run's last
   checkpoint copied into a new run directory, then ``tedmoe train ... --resume --accept-changes
   --set train.max_steps=<steps + qat-steps>`` with ``compress.method=binary``, ``ternary``, ``nm``
   (2:4, masks by magnitude refreshed every 100 steps), ``ternary`` with ``compress.teacher=<the
   float run> compress.distill_weight=0.5 compress.temperature=1``, and without compression (the
   float reference those four are compared with: the same steps and data). Raising ``max_steps``
   stretches the cosine schedule, so every continuation starts again at the learning rate of step
   ``steps`` of the longer schedule (about 1e-3 for 400 of 600) and decays to 3e-4; all five alike.
3. ``tedmoe compress``: ``int8``, ``int4``, ``zeroquant`` (W8A8), ``zeroquant --lkd`` and ``int4 --lkd``
   (its defaults: 8 calibration batches of the training split, 100 Adam steps per block, lr 1e-5)
   from the float run, group size ``--group-size``; ``binary``, ``ternary`` (twice) and ``nm`` from
   their runs. Embeddings, the output head, norms and routers stay fp32 in every method.
4. Measured in this process (``torch.set_num_threads(--threads)``), every model loaded by
   ``tedmoe.inference.generate.load_model`` with dropless routing (what ``tedmoe generate`` and
   ``serve`` use), the float ones from their runs:

   - bytes on disk: ``model.safetensors`` (the float run's export for fp32); bits per quantised
     weight: the stored bytes of the quantised weights (values, scales, masks) x 8 / their count;
   - bytes in memory: parameters + buffers of the loaded model (its kernels' integer weights and
     scales, the float embeddings and head, the rotary tables); N:M is expanded to dense fp32 at
     load (no CPU kernel for sparse products), so it holds what fp32 holds;
   - validation loss: mean cross-entropy (``model(ids, targets)[1]["ce"]``, no gradients) over the
     first ``--val-batches`` (16) global batches of the trainer's validation sampler (``BatchSampler``
     of the val split, seed + 1: the trainer's own evaluation batches come first), in micro-batches
     of 4, the same batches for every model; perplexity = exp of it. "vs ref" divides it by the
     perplexity of the float model with as many training steps: the float run for the post-training
     methods, the float continuation for the trained ones. Also (JSON): the untrained model's loss;
     the float run's loss as the trainer computes it (its training routing, its first
     ``eval_batches`` batches, the whole loss: CE + the weighted aux and z terms), which must equal
     the last ``val_loss`` of its metrics.jsonl; and each trained run's own float forward (its
     weights baked in fp32) beside its packed directory;
   - decode tokens/s on an ``InferenceEngine`` per model (blocks of 16): ``--batches`` (1 and 8)
     prompts of ``--prompt-len`` (64) tokens from the validation split, greedy, ``--new-tokens``
     (32): one ``put`` with the prompts, then one ``put`` per token. Within a round the models'
     prefills run back to back and their decode steps alternate step by step (the order reversed
     every other step, the first model rotating from round to round), so drift on this shared
     machine falls on all alike. Decode tok/s = B x (N - 1) / the sum of the N - 1 steps; "x fp32"
     = median over ``--rounds`` (5) of the ratio to the float run's in the same round; tok/s =
     median of the rounds. One untimed warm-up generation per model first;
   - greedy agreement: the fraction of generated tokens equal, position by position, to the float
     run's (and to the reference's), over the decodes of the first round (every batch size
     together); also the mean length of the agreeing prefix (after the first difference the
     contexts differ).

Prints the table and writes benchmarks/results/compression-<date>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import common

MIB = 2 ** 20
FP32, FP32_MORE, UNTRAINED = "fp32", "fp32 (continued)", "untrained"


@dataclasses.dataclass
class Contender:
    """One row: a model directory (a run or a compressed directory) and what it is compared with."""

    name: str
    path: Path
    source: str  # the run it came from
    method: str  # fp32, int8, ..., nm
    ref: str  # the float row whose perplexity it is compared with
    report: str = ""  # tedmoe compress's report line (and LKD's)
    results: dict = dataclasses.field(default_factory=dict)


# ---- the CLI in child processes -------------------------------------------------------------------


def cli(args, work: Path, argv: list[str], log: str) -> tuple[str, float]:
    """``python -m tedmoe.cli ARGV`` with ``OMP_NUM_THREADS``; returns (its output, seconds). Its
    output goes to ``work/logs/LOG``; a failure prints its tail and stops the benchmark."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "tedmoe.cli", *argv]
    args.commands.append(" ".join(cmd[1:]))
    print(f"$ tedmoe {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=common.ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    out = done.stdout + done.stderr
    (work / "logs").mkdir(exist_ok=True)
    (work / "logs" / f"{log}.log").write_text(out)
    if done.returncode:
        print(out[-3000:], file=sys.stderr)
        raise SystemExit(f"compression.py: `tedmoe {argv[0]}` failed (exit code {done.returncode}); "
                         f"log: {work / 'logs' / (log + '.log')}")
    return out, seconds


def train_overrides(args) -> list[str]:
    sets = ["parallel.tp=1", "parallel.ep=1", f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}",
            f"model.num_heads={args.heads}", f"model.moe.num_experts={args.experts}",
            f"model.moe.ffn_hidden_size={args.expert_ffn}", "progress=false", "checkpoint_every=0",
            f"eval_every={args.eval_every}", "seed=0"]
    return [x for s in sets for x in ("--set", s)]


def run_summary(run: Path, seconds: float, start_step: int = 0) -> dict:
    """What a training invocation did, from its metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["step"] > start_step]
    vals = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    return {"steps": [rows[0]["step"], rows[-1]["step"]], "seconds": seconds,
            "train_loss_first": rows[0]["loss"], "train_loss_last": rows[-1]["loss"], "val_loss": vals,
            "seconds_per_step": statistics.median(r["step_seconds"] for r in rows)}


def train_all(args, work: Path) -> tuple[dict, Path]:
    """The float run and its continuations; returns their summaries and the float run."""
    from tedmoe.runtime.checkpoint import latest_checkpoint

    base = train_overrides(args)
    runs = {}
    fp32 = work / "fp32"
    _, s = cli(args, work, ["train", "--preset", "default", "--nproc", "1", "--out", str(fp32), *base,
                            "--set", f"train.max_steps={args.steps}"], "train-fp32")
    runs["fp32"] = run_summary(fp32, s)
    print(f"  {s:.0f} s; val loss {runs['fp32']['val_loss']}", flush=True)
    last = latest_checkpoint(fp32 / "checkpoints")
    total = args.steps + args.qat_steps
    variants = {"fp32-continued": [], "binary": ["compress.method=binary"], "ternary": ["compress.method=ternary"],
                "ternary-kd": ["compress.method=ternary", f"compress.teacher={fp32}", "compress.distill_weight=0.5",
                               "compress.temperature=1"],
                "nm": ["compress.method=nm", "compress.n=2", "compress.m=4", f"compress.refresh_every={args.refresh_every}"]}
    for name, sets in variants.items():
        out = work / name
        (out / "checkpoints").mkdir(parents=True)
        shutil.copytree(last, out / "checkpoints" / last.name)
        (out / "checkpoints" / "latest").write_text(last.name)
        _, s = cli(args, work, ["train", "--preset", "default", "--nproc", "1", "--out", str(out), "--resume",
                                "--accept-changes", *base, "--set", f"train.max_steps={total}",
                                *[x for v in sets for x in ("--set", v)]], f"train-{name}")
        runs[name] = run_summary(out, s, start_step=args.steps)
        print(f"  {s:.0f} s; val loss {runs[name]['val_loss']}", flush=True)
    return runs, fp32


def compress_all(args, work: Path) -> list[Contender]:
    g = ["--group-size", str(args.group_size)]
    lkd = ["--lkd", "--lkd-steps", str(args.lkd_steps)]
    plan = [("int8", "fp32", ["--method", "int8", *g]), ("int4", "fp32", ["--method", "int4", *g]),
            ("zeroquant", "fp32", ["--method", "zeroquant", *g]),
            ("zeroquant+LKD", "fp32", ["--method", "zeroquant", *g, *lkd]),
            ("int4+LKD", "fp32", ["--method", "int4", *g, *lkd]),
            ("binary", "binary", ["--method", "binary"]), ("ternary", "ternary", ["--method", "ternary"]),
            ("ternary+KD", "ternary-kd", ["--method", "ternary"]), ("nm 2:4", "nm", ["--method", "nm"])]
    rows = [Contender(FP32, work / "fp32", "fp32", "fp32", FP32)]
    for name, run, argv in plan:
        out = work / "compressed" / name.replace(" ", "-").replace(":", "_").replace("+", "-")
        out.parent.mkdir(exist_ok=True)
        text, s = cli(args, work, ["compress", str(work / run), *argv, "--out", str(out)], f"compress-{out.name}")
        report = " | ".join(line for line in text.splitlines() if line.startswith(("wrote", "LKD")))
        print(f"  {s:.0f} s: {report}", flush=True)
        ref = FP32 if run == "fp32" else FP32_MORE
        rows.append(Contender(name, out, run, argv[1], ref, report))
        if name == "int4+LKD":  # the trained ones follow their float reference
            rows.append(Contender(FP32_MORE, work / "fp32-continued", "fp32-continued", "fp32", FP32_MORE))
    return rows


# ---- measurements in this process ---------------------------------------------------------------


def stored_bits(path: Path, meta: dict, counts: dict[str, int]) -> float:
    """Bits per quantised weight as stored: every tensor of a quantised weight (values, scales,
    masks) x 8 / the number of weights they stand for."""
    from safetensors import safe_open

    total, quantized = 0, set(meta["quantized"])
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for key in f.keys():
            if key.rsplit(".", 1)[0] in quantized:
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    return 8 * total / sum(counts[n] for n in meta["quantized"])


def memory_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@torch.no_grad()
def val_loss(model, batches: list[torch.Tensor], micro: int) -> float:
    losses = [model(m[:, :-1], m[:, 1:])[1]["ce"].item() for b in batches for m in b.split(micro)]
    return sum(losses) / len(losses)


class Decoder:
    """Greedy decoding of a batch on one model's engine, a step at a time."""

    def __init__(self, model, max_batch: int, tokens: int, block_size: int = 16):
        from tedmoe.inference.engine import InferenceEngine

        self.engine = InferenceEngine(model, block_size=block_size, num_blocks=max_batch * -(-tokens // block_size))

    def prefill(self, prompts):
        uids = list(range(len(prompts)))
        return uids, [[t] for t in self.engine.put(uids, prompts).argmax(-1).tolist()]

    def step(self, state):
        uids, out = state
        for o, t in zip(out, self.engine.put(uids, [o[-1:] for o in out]).argmax(-1).tolist()):
            o.append(t)
        return state

    def finish(self, state):
        uids, out = state
        for uid in uids:
            self.engine.flush(uid)
        return out


def decode_round(decoders: dict[str, Decoder], order: list[str], prompts, n: int) -> dict:
    states, res = {}, {}
    for name in order:
        t0 = time.perf_counter()
        states[name] = decoders[name].prefill(prompts)
        res[name] = {"prefill_s": time.perf_counter() - t0, "steps_s": []}
    for i in range(n - 1):
        for name in order if i % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            states[name] = decoders[name].step(states[name])
            res[name]["steps_s"].append(time.perf_counter() - t0)
    for name in order:
        res[name]["tokens"] = decoders[name].finish(states[name])
    return res


def agreement(mine: list[list[int]], ref: list[list[int]]) -> dict:
    n = len(ref[0])
    prefix = [next((i for i in range(n) if a[i] != b[i]), n) for a, b in zip(mine, ref)]
    return {"tokens": len(ref) * n, "equal": sum(a[i] == b[i] for a, b in zip(mine, ref) for i in range(n)),
            "first_equal": sum(a[0] == b[0] for a, b in zip(mine, ref)), "sequences": len(ref),
            "agreeing_prefix_mean": statistics.mean(prefix)}


def measure(args, work: Path, rows: list[Contender]) -> dict:
    from tedmoe.compress import model as compressed
    from tedmoe.config import from_dict
    from tedmoe.data.dataset import BatchSampler, TokenDataset
    from tedmoe.inference.generate import load_model, resolve_checkpoint
    from tedmoe.model.transformer import GPTMoE
    from tedmoe.parallel.topology import Topology
    from tedmoe.runtime.checkpoint import read_meta
    from tedmoe.runtime.trainer import data_dir

    torch.set_num_threads(args.threads)
    cfg = from_dict(read_meta(resolve_checkpoint(work / "fp32"))["config"])
    val = TokenDataset(data_dir(cfg), "val", verify=False)
    sampler = BatchSampler(val, cfg.seq_len, cfg.global_batch_size, cfg.seed + 1)
    batches = [sampler.batch(i) for i in range(args.val_batches)]
    micro = cfg.micro_batch_size
    extra = {"data": str(data_dir(cfg)), "val_tokens": sum(b[:, 1:].numel() for b in batches)}

    untrained = GPTMoE(cfg.model, Topology.single())
    untrained.init_weights(cfg.seed)
    extra["untrained_val_loss"] = val_loss(untrained.eval(), batches, micro)
    # the trainer's own evaluation (its routing, its batches, its loss: CE + aux + z terms) of the float run
    trained_routing, _ = load_model(work / "fp32")
    with torch.no_grad():
        losses = [trained_routing(m[:, :-1], m[:, 1:])[0].item()
                  for i in range(cfg.eval_batches) for m in sampler.batch(i).split(micro)]
    extra["fp32_trainer_check"] = {"val_loss_here": sum(losses) / len(losses),
                                   "val_loss_metrics": run_summary(work / "fp32", 0)["val_loss"][-1][1]}
    del trained_routing
    print(f"validation: {args.val_batches} batches x {cfg.global_batch_size} x {cfg.seq_len} tokens; untrained "
          f"model's loss {extra['untrained_val_loss']:.4f}; float run with its training routing on the trainer's "
          f"batches {extra['fp32_trainer_check']['val_loss_here']:.4f} (its metrics: "
          f"{extra['fp32_trainer_check']['val_loss_metrics']:.4f})", flush=True)

    fp32_model, _ = load_model(work / "fp32", routing="dropless")
    counts = {n: p.numel() for n, p in fp32_model.state_dict().items()}
    models = {}
    for row in rows:
        model, _ = load_model(row.path, routing="dropless")
        models[row.name] = model
        r = row.results
        if compressed.is_compressed(row.path):
            meta = compressed.read_meta(row.path)
            r["bits_per_weight"] = stored_bits(row.path, meta, counts)
            r["quantized_weights"] = sum(counts[n] for n in meta["quantized"])
            r["group_size"] = meta["group_size"]
        else:
            r["bits_per_weight"] = 32.0
        r["disk_bytes"] = (row.path / "model.safetensors").stat().st_size
        r["memory_bytes"] = memory_bytes(model)
        r["val_loss"] = val_loss(model, batches, micro)
        if row.source not in ("fp32", "fp32-continued"):  # the trained run's own (baked float) forward
            baked, _ = load_model(work / row.source, routing="dropless")
            r["run_float_val_loss"] = val_loss(baked, batches, micro)
            del baked
        print(f"  {row.name:<18} val loss {r['val_loss']:.4f}, {r['disk_bytes'] / MIB:6.2f} MiB on disk, "
              f"{r['memory_bytes'] / MIB:6.2f} MiB in memory"
              + (f" (its run's float forward: {r['run_float_val_loss']:.4f})" if "run_float_val_loss" in r else ""),
              flush=True)
    del fp32_model
    extra["parameters"] = sum(counts.values())

    tokens = args.prompt_len + args.new_tokens
    decoders = {name: Decoder(m, max(args.batches), tokens) for name, m in models.items()}
    g = torch.Generator().manual_seed(args.seed)
    prompts = {B: val.windows(torch.randint(0, len(val) - args.prompt_len, (B,), generator=g), args.prompt_len).tolist()
               for B in args.batches}
    names = list(decoders)
    decode_round(decoders, names, [p[:16] for p in prompts[max(args.batches)][:2]], 3)  # warm-up
    raw = {B: {name: [] for name in names} for B in args.batches}
    t0 = time.perf_counter()
    for rnd in range(args.rounds):
        for B in args.batches:
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            res = decode_round(decoders, order, prompts[B], args.new_tokens)
            for name, x in res.items():
                x["decode_tok_s"] = B * (args.new_tokens - 1) / sum(x["steps_s"])
                x["prompt_tok_s"] = B * args.prompt_len / x["prefill_s"]
                raw[B][name].append(x)
            print(f"  round {rnd} B={B}: fp32 {res[FP32]['decode_tok_s']:.1f} decode tok/s; "
                  + ", ".join(f"{n} {res[n]['decode_tok_s'] / res[FP32]['decode_tok_s']:.2f}x"
                              for n in names if n != FP32), flush=True)
    extra["decode_seconds"] = time.perf_counter() - t0

    by_name = {row.name: row for row in rows}
    for name in names:
        r = by_name[name].results
        ref = by_name[by_name[name].ref].results
        r["ppl"] = math.exp(r["val_loss"])
        r["ppl_vs_ref"] = r["ppl"] / math.exp(ref["val_loss"])
        r["ppl_vs_fp32"] = r["ppl"] / math.exp(by_name[FP32].results["val_loss"])
        r["decode"], agree, agree_ref = {}, [], []
        for B in args.batches:
            runs, base = raw[B][name], raw[B][FP32]
            ratios = [x["decode_tok_s"] / b["decode_tok_s"] for x, b in zip(runs, base)]
            a = agreement(runs[0]["tokens"], base[0]["tokens"])
            agree.append(a)
            agree_ref.append(agreement(runs[0]["tokens"], raw[B][by_name[name].ref][0]["tokens"]))
            r["decode"][str(B)] = {
                "decode_tok_s": statistics.median(x["decode_tok_s"] for x in runs),
                "prompt_tok_s": statistics.median(x["prompt_tok_s"] for x in runs),
                "vs_fp32": statistics.median(ratios), "vs_fp32_rounds": ratios,
                "ms_per_step": statistics.median(sum(x["steps_s"]) / len(x["steps_s"]) for x in runs) * 1e3,
                "deterministic": all(x["tokens"] == runs[0]["tokens"] for x in runs), "agreement": a,
                "tokens_first_round": runs[0]["tokens"]}
        r["agreement"] = sum(a["equal"] for a in agree) / sum(a["tokens"] for a in agree)
        r["agreement_vs_ref"] = sum(a["equal"] for a in agree_ref) / sum(a["tokens"] for a in agree_ref)
        r["agreeing_prefix_mean"] = sum(a["agreeing_prefix_mean"] * a["sequences"] for a in agree) / \
            sum(a["sequences"] for a in agree)
    return extra


# ---- the table ------------------------------------------------------------------------------------


def print_table(args, rows: list[Contender], extra: dict) -> None:
    b1, b2 = (str(b) for b in (args.batches[0], args.batches[-1]))
    print(f"\nvalidation perplexity over {extra['val_tokens']:,} tokens (untrained model: "
          f"{math.exp(extra['untrained_val_loss']):.2f}); 'vs ref': / the float model with as many steps (fp32 for "
          f"post-training methods, fp32 (continued) for trained ones); decode tok/s at B={b1} and B={b2}, 'x' = median "
          f"over {args.rounds} rounds of the ratio to fp32 in the same round; agree = share of greedy tokens equal to fp32's "
          "(then to the reference's)")
    head = (f"| {'method':<18} | {'from':<14} | {'bits/w':>6} | {'MiB disk':>8} | {'MiB mem':>7} | {'val loss':>8} | "
            f"{'ppl':>6} | {'vs ref':>6} | {'tok/s B=' + b1:>10} | {'x':>5} | {'tok/s B=' + b2:>10} | {'x':>5} | "
            f"{'agree':>5} | {'vs ref':>6} |")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for row in rows:
        r = row.results
        d1, d2 = r["decode"][b1], r["decode"][b2]
        print(f"| {row.name:<18} | {row.source:<14} | {r['bits_per_weight']:>6.2f} | {r['disk_bytes'] / MIB:>8.2f} | "
              f"{r['memory_bytes'] / MIB:>7.2f} | {r['val_loss']:>8.4f} | {r['ppl']:>6.2f} | {r['ppl_vs_ref']:>6.3f} | "
              f"{d1['decode_tok_s']:>10.1f} | {d1['vs_fp32']:>5.2f} | {d2['decode_tok_s']:>10.1f} | "
              f"{d2['vs_fp32']:>5.2f} | {r['agreement']:>5.2f} | {r['agreement_vs_ref']:>6.2f} |")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="40 + 20 steps, 2 validation batches, 1 round: a smoke run")
    p.add_argument("--work", help="keep the runs and compressed models in this (new) directory")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--expert-ffn", type=int, default=256)
    p.add_argument("--steps", type=int, help="float run's steps (default 400; quick 40)")
    p.add_argument("--qat-steps", type=int, help="steps of every continuation (default 200; quick 20)")
    p.add_argument("--eval-every", type=int, help="the runs' validation interval (default 100; quick 20)")
    p.add_argument("--refresh-every", type=int, default=100, help="N:M mask refresh interval")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--lkd-steps", type=int, help="LKD steps per block (default 100, tedmoe compress's; quick 10)")
    p.add_argument("--val-batches", type=int, help="validation batches of 16 x 128 tokens (default 16; quick 2)")
    p.add_argument("--batches", type=int, nargs="+", help="decode batch sizes (default 1 8; quick 1 4)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, help="default 32; quick 8")
    p.add_argument("--rounds", type=int, help="default 5; quick 1")
    p.add_argument("--threads", type=int, default=1, help="torch threads here and OMP_NUM_THREADS of the CLI")
    p.add_argument("--seed", type=int, default=0, help="of the prompts")
    args = p.parse_args()
    defaults = dict(steps=40, qat_steps=20, eval_every=20, lkd_steps=10, val_batches=2, batches=[1, 4], new_tokens=8,
                    rounds=1) if args.quick else \
        dict(steps=400, qat_steps=200, eval_every=100, lkd_steps=100, val_batches=16, batches=[1, 8], new_tokens=32,
             rounds=5)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> int:
    args = parse_args()
    args.commands = []
    t_start = time.perf_counter()
    if args.work:
        work = Path(args.work).absolute()
        work.mkdir(parents=True, exist_ok=False)
    else:
        work = Path(tempfile.mkdtemp(prefix="tedmoe-compression-"))
    print(f"model: V=256 (bytes) H={args.hidden} layers={args.layers} heads={args.heads}, {args.experts} SwiGLU "
          f"experts F={args.expert_ffn} top-2 in every block; {args.steps} float steps + {args.qat_steps} per "
          f"continuation; group size {args.group_size}; {args.threads} thread(s); work: {work}", flush=True)
    try:
        runs, _ = train_all(args, work)
        t_train = time.perf_counter() - t_start
        rows = compress_all(args, work)
        t_compress = time.perf_counter() - t_start - t_train
        extra = measure(args, work, rows)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print_table(args, rows, extra)
    elapsed = time.perf_counter() - t_start
    print(f"\nwall time {elapsed / 60:.1f} min (training {t_train / 60:.1f}, compressing {t_compress / 60:.1f})")
    config = {k: v for k, v in vars(args).items() if k != "commands"}
    result = {"elapsed_s": elapsed, "training_s": t_train, "compress_s": t_compress, "cli_commands": args.commands,
              "runs": runs, **extra,
              "rows": [{"name": r.name, "source": r.source, "method": r.method, "ref": r.ref, "report": r.report,
                        **r.results} for r in rows]}
    common.write_result("compression", config, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
