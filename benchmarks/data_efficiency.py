"""Data efficiency on CPU: the tokens and the training time a small MoE model needs to reach a fixed
validation loss with a sequence-length curriculum, with random-LTD, and with both, against the
same model trained plainly for the same number of steps.

Reproduce:  OMP_NUM_THREADS=1 TEDMOE_CACHE=/tmp/tedmoe-cache .venv/bin/python benchmarks/data_efficiency.py
                                            (H=128, 4 layers, 4 heads, 4 SwiGLU experts F=192, top-2,
                                             byte tokenizer, the embedded corpus; 300 steps of 16 x 128
                                             tokens per variant, seeds 0 1, validation every 10 steps;
                                             ~30 minutes here; --seeds 0 1 2 for three, ~45 minutes)
            OMP_NUM_THREADS=1 TEDMOE_CACHE=/tmp/tedmoe-cache .venv/bin/python benchmarks/data_efficiency.py --quick
                                            (40 steps, seed 0: a smoke run)
            .venv/bin/python benchmarks/data_efficiency.py --plot benchmarks/results/data_efficiency-<date>.json
                                            (draws a result's PNG again from its JSON)

``TEDMOE_CACHE`` is where the embedded corpus (the running Python's standard library sources, 4 MB,
byte tokens) is prepared once (default ``~/.cache/tedmoe``). Runs go to a temporary directory,
deleted at the end (``--work DIR`` keeps them there; a later invocation with the same ``--work``
reuses the runs that finished, so an interrupted benchmark continues where it stopped). Every run is ``tedmoe train --preset default
--nproc 1`` (``python -m tedmoe.cli``) in a child process with ``OMP_NUM_THREADS=--threads``
(default 1), one at a time; the commands are printed and kept in the JSON.

Variants (all else equal: the default preset's optimiser, AdamW lr 3e-3, 20 warmup steps, cosine to
0.1x over ``--steps``; global batch 16 x 128 tokens; ``parallel.tp=1 parallel.ep=1``):

- baseline: every step trains on 16 full sequences of 128 tokens;
- curriculum: ``data.curriculum.seqlen`` ``fixed_linear`` from ``--cl-start`` (16) tokens per
  sequence to 128 over ``--cl-steps`` (half of ``--steps``), multiples of 8; with ``--curriculum
  seqlen+rarity`` also ``data.curriculum.rarity`` ``fixed_linear`` from ``--rarity-start`` (50)
  percent of the windows, easiest first, to 100 over the same steps (this draws windows at
  64-token block boundaries, so even at 100 percent its batches differ from the baseline's);
- random-LTD: ``model.random_ltd.layers`` ``--ltd-layers`` (1 2: the middle two of four blocks) keep
  ``r`` random tokens per sequence, ``r`` from ``--ltd-start`` (32) to the whole sequence over
  ``--ltd-steps`` (half of ``--steps``); blocks 0 and 3 see every token;
- curriculum+LTD: both (random-LTD keeps ``r`` of the curriculum's shorter sequence; while that
  is no longer than ``r``, every block sees every token).

Every variant runs once per seed (``seed=``, which also seeds the batches); the order is seed by
seed, the four variants in turn, so drift of this shared machine falls on all of them alike.

Measured from each run's ``metrics.jsonl``:

- tokens: the data tokens a step trains on (input positions, 16 x the step's sequence length; the
  row's ``tokens`` under a curriculum), summed over the steps;
- layer-tokens: the sum over the four transformer blocks of the tokens each block processes (16 x
  the sequence length, or 16 x ``r`` in a random-LTD block, from ``RandomLTDConfig.keep`` at the
  step's 0-based optimizer step, as the model does); embeddings and the output head are not counted.
  Checked against the routers' counts: every block is an MoE block, and each row's
  ``tokens_per_expert`` of a block divided by (1 - its ``drop_fraction``) must equal top-2 x its
  layer-tokens; the JSON records the steps that do not match (``ltd_check_mismatches``, expected 0);
- time: the sum of the rows' ``step_seconds`` (forward, backward, optimizer step; not validation,
  not start-up); the run's whole wall time is in the JSON;
- validation loss: the trainer's ``val_loss`` every ``--eval-every`` steps (its 4 validation
  batches of 16 x 128, the same for every run; the whole loss: cross-entropy + 0.01 x aux + z terms,
  every token through every block).

Targets: ``--target`` if given, else per seed the baseline's validation loss at step ``--target-at`` x
``--steps`` (0.75, and 0.5 for a second table; rounded to an evaluation step), so the baseline
reaches it at 75% (50%) of its steps.
Per seed, because the trainer draws its validation batches with ``seed + 1``: the seeds validate on
different 8,192 tokens, and their losses differ by more than the variants do, so every variant is
compared with the baseline of its own seed. A run reaches the target where its validation curve
first gets to or below it, interpolated linearly between that evaluation and the one before, in
tokens, layer-tokens and time. Per variant: the mean over the seeds that reached it (the table says
how many did); "x" is the mean over the seeds of the ratio to the same seed's baseline. Final
validation loss: the last step's, mean and standard deviation over the seeds, and the mean
difference to the same seed's baseline.

Prints the table, writes ``benchmarks/results/data_efficiency-<date>.json`` and beside it a PNG with
the same name: validation loss against layer-tokens and against training time, every variant (mean
over seeds), and the target.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

VARIANTS = ("baseline", "curriculum", "random-LTD", "curriculum+LTD")
BATCH, SEQ = 16, 128  # the default preset's global batch and sequence length


# ---- the CLI in child processes -------------------------------------------------------------------


def cli(args, work: Path, argv: list[str], log: str) -> float:
    """``python -m tedmoe.cli ARGV`` with ``OMP_NUM_THREADS``; returns its seconds. Its output goes
    to ``work/logs/LOG``; a failure prints its tail and stops the benchmark."""
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "tedmoe.cli", *argv]
    args.commands.append(" ".join(cmd[1:]))
    print(f"$ tedmoe {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=common.ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    (work / "logs").mkdir(exist_ok=True)
    (work / "logs" / f"{log}.log").write_text(done.stdout + done.stderr)
    if done.returncode:
        print((done.stdout + done.stderr)[-3000:], file=sys.stderr)
        raise SystemExit(f"data_efficiency.py: `tedmoe {argv[0]}` failed (exit code {done.returncode}); "
                         f"log: {work / 'logs' / (log + '.log')}")
    return seconds


def variant_sets(args, variant: str) -> list[str]:
    curriculum = ["data.curriculum.seqlen.schedule=fixed_linear", f"data.curriculum.seqlen.start={args.cl_start}",
                  f"data.curriculum.seqlen.steps={args.cl_steps}"]
    if args.curriculum == "seqlen+rarity":
        curriculum += ["data.curriculum.rarity.schedule=fixed_linear", f"data.curriculum.rarity.start={args.rarity_start}",
                       f"data.curriculum.rarity.steps={args.cl_steps}"]
    ltd = [f"model.random_ltd.layers=[{','.join(map(str, args.ltd_layers))}]", f"model.random_ltd.start={args.ltd_start}",
           f"model.random_ltd.steps={args.ltd_steps}"]
    return {"baseline": [], "curriculum": curriculum, "random-LTD": ltd, "curriculum+LTD": curriculum + ltd}[variant]


def train(args, work: Path, variant: str, seed: int) -> dict:
    name = f"{variant.replace('+', '-')}-seed{seed}"
    out = work / name
    if finished(out, args.steps):  # reused: an earlier invocation with this --work trained it
        seconds = json.loads((out / "bench.json").read_text())["run_seconds"] if (out / "bench.json").is_file() else None
        print(f"  reusing {out} (finished)", flush=True)
        return summarize(out, seconds)
    if out.exists():  # an unfinished run: again from the start
        shutil.rmtree(out)
    sets = ["parallel.tp=1", "parallel.ep=1", f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}",
            f"model.num_heads={args.heads}", "progress=false", "checkpoint_every=0", f"eval_every={args.eval_every}",
            f"train.max_steps={args.steps}", f"seed={seed}", *variant_sets(args, variant)]
    seconds = cli(args, work, ["train", "--preset", "default", "--nproc", "1", "--out", str(out),
                               *[x for s in sets for x in ("--set", s)]], f"train-{name}")
    (out / "bench.json").write_text(json.dumps({"run_seconds": seconds}))
    return summarize(out, seconds)


# ---- what a run did -------------------------------------------------------------------------------


def summarize(run: Path, seconds: float) -> dict:
    """Cumulative tokens, layer-tokens and training seconds at every evaluation, from metrics.jsonl
    and the run's config.json."""
    from tedmoe.config.schema import RandomLTDConfig

    cfg = json.loads((run / "config.json").read_text())
    ltd_cfg = cfg["model"]["random_ltd"]
    ltd = RandomLTDConfig(**{**ltd_cfg, "layers": tuple(ltd_cfg["layers"])})
    layers, top_k, batch = cfg["model"]["num_layers"], cfg["model"]["moe"]["top_k"], cfg["global_batch_size"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tokens = layer_tokens = train_s = 0.0
    evals, mismatches = [], []
    for r in rows:
        length = r["curriculum"]["seq_len"] if "curriculum" in r else cfg["seq_len"]
        per_layer = [length if i not in ltd.layers else ltd.keep(r["step"] - 1, length) for i in range(layers)]
        tokens += r.get("tokens", batch * length)
        layer_tokens += batch * sum(per_layer)
        train_s += r["step_seconds"]
        routed = [round(sum(c) / (1 - d)) for c, d in zip(r["tokens_per_expert"], r["drop_fraction"])]
        if len(routed) != layers or any(abs(x - top_k * batch * n) > 1 for x, n in zip(routed, per_layer)):
            mismatches.append({"step": r["step"], "routed": routed, "counted": [top_k * batch * n for n in per_layer]})
        if "val_loss" in r:
            evals.append({"step": r["step"], "tokens": tokens, "layer_tokens": layer_tokens, "seconds": train_s,
                          "val_loss": r["val_loss"], "seq_len": length, "kept": per_layer})
    return {"steps": rows[-1]["step"], "run_seconds": seconds, "train_seconds": train_s, "tokens": tokens,
            "layer_tokens": layer_tokens, "final_val_loss": evals[-1]["val_loss"], "evals": evals,
            "median_step_seconds": statistics.median(r["step_seconds"] for r in rows),
            "train_loss_last": rows[-1]["loss"], "ltd_check_mismatches": mismatches[:5],
            "ltd_check_mismatch_count": len(mismatches)}


def crossing(evals: list[dict], target: float) -> dict | None:
    """Where the validation curve first gets to ``target`` or below, interpolated linearly between
    that evaluation and the one before (from the start, if it is the first)."""
    prev = None
    for e in evals:
        if e["val_loss"] <= target:
            if prev is None or prev["val_loss"] == e["val_loss"]:
                return {k: e[k] for k in ("step", "tokens", "layer_tokens", "seconds")}
            f = (prev["val_loss"] - target) / (prev["val_loss"] - e["val_loss"])
            return {k: prev[k] + f * (e[k] - prev[k]) for k in ("step", "tokens", "layer_tokens", "seconds")}
        prev = e
    return None


def mean(xs):
    return statistics.mean(xs) if xs else None


def aggregate(args, runs: dict, targets: dict) -> dict:
    """Per variant: means over the seeds, and ratios to the baseline of the same seed (same
    validation batches, same target), averaged over the seeds where both reach the target."""
    keys = ("step", "tokens", "layer_tokens", "seconds")
    hits = {v: {s: crossing(runs[v][s]["evals"], targets[s]) for s in args.seeds} for v in VARIANTS}
    out = {}
    for variant in VARIANTS:
        rs = {s: runs[variant][s] for s in args.seeds}
        got = [h for h in hits[variant].values() if h is not None]
        finals = [r["final_val_loss"] for r in rs.values()]
        v = out[variant] = {
            "seeds": len(rs), "reached": len(got), "crossings": {str(s): h for s, h in hits[variant].items()},
            **{f"{k}_to_target": mean([h[k] for h in got]) for k in keys},
            "final_val_loss": statistics.mean(finals), "final_val_loss_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "final_val_losses": finals,
            "tokens": statistics.mean(r["tokens"] for r in rs.values()),
            "layer_tokens": statistics.mean(r["layer_tokens"] for r in rs.values()),
            "train_seconds": statistics.mean(r["train_seconds"] for r in rs.values()),
            "run_seconds": mean([r["run_seconds"] for r in rs.values() if r["run_seconds"] is not None])}
        for k in keys:
            ratios = [hits[variant][s][k] / hits["baseline"][s][k] for s in args.seeds
                      if hits[variant][s] is not None and hits["baseline"][s] is not None]
            v[f"{k}_to_target_vs_base"] = mean(ratios)
            v[f"{k}_to_target_vs_base_per_seed"] = ratios
        for k in ("train_seconds", "layer_tokens", "tokens"):
            v[f"{k}_vs_base"] = mean([rs[s][k] / runs["baseline"][s][k] for s in args.seeds])
        v["final_val_loss_vs_base"] = mean([rs[s]["final_val_loss"] - runs["baseline"][s]["final_val_loss"]
                                            for s in args.seeds])
    return out


def seed_targets(args, runs: dict) -> list[tuple[dict, str]]:
    """The targets, each as (per seed, what it is): ``--target``, or per ``--target-at`` fraction
    each seed's baseline there (the trainer's validation batches depend on the seed, so each seed
    has its own)."""
    if args.target is not None:
        return [({s: args.target for s in args.seeds}, f"given, {args.target:g}")]
    out = []
    for fraction in args.target_at:
        at = max(args.eval_every, round(fraction * args.steps / args.eval_every) * args.eval_every)
        out.append(({s: next(e["val_loss"] for e in runs["baseline"][s]["evals"] if e["step"] >= at) for s in args.seeds},
                    f"each seed's baseline at step {at} of {args.steps}"))
    return out


def finished(run: Path, steps: int) -> bool:
    """A run directory whose metrics reach ``steps`` (kept by an earlier invocation with ``--work``)."""
    try:
        last = (run / "metrics.jsonl").read_text().strip().splitlines()[-1]
        return json.loads(last)["step"] == steps and (run / "config.json").is_file()
    except (OSError, IndexError, ValueError, KeyError):
        return False


# ---- table and plot -------------------------------------------------------------------------------


def fmt(x, spec, none="n/a"):
    return none if x is None else format(x, spec)


def print_table(args, agg: dict, targets: dict, where: str) -> None:
    print(f"\ntarget validation loss: {where} ({', '.join(f'seed {s}: {t:.4f}' for s, t in targets.items())}); to "
          f"target: mean over the seeds that reach it, interpolated between evaluations (every {args.eval_every} steps); "
          "x = mean over the seeds of the ratio to the same seed's baseline; M = millions; time = the steps' seconds "
          "(no validation, no start-up); layer-tokens = tokens through each of the 4 blocks, summed; final val loss: "
          "mean ± sd over the seeds, 'vs base' the mean difference to the same seed's baseline")
    head = (f"| {'variant':<15} | {'seeds':>5} | {'steps':>5} | {'reached':>7} | {'tokens to target (M)':>20} | "
            f"{'x':>5} | {'layer-tokens to target (M)':>26} | {'x':>5} | {'time to target (s)':>18} | {'x':>5} | "
            f"{'final val loss':>15} | {'vs base':>7} | {'layer-tokens total (M)':>22} | {'train s':>7} |")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for variant, v in agg.items():
        print(f"| {variant:<15} | {v['seeds']:>5} | {args.steps:>5} | {v['reached']:>3}/{v['seeds']:<3} | "
              f"{fmt(v['tokens_to_target'] and v['tokens_to_target'] / 1e6, '.3f'):>20} | "
              f"{fmt(v['tokens_to_target_vs_base'], '.2f'):>5} | "
              f"{fmt(v['layer_tokens_to_target'] and v['layer_tokens_to_target'] / 1e6, '.3f'):>26} | "
              f"{fmt(v['layer_tokens_to_target_vs_base'], '.2f'):>5} | {fmt(v['seconds_to_target'], '.1f'):>18} | "
              f"{fmt(v['seconds_to_target_vs_base'], '.2f'):>5} | "
              f"{v['final_val_loss']:>8.4f} ± {v['final_val_loss_sd']:.3f} | {v['final_val_loss_vs_base']:>+7.4f} | "
              f"{v['layer_tokens'] / 1e6:>22.3f} | {v['train_seconds']:>7.1f} |")


def plot(args, runs: dict, targets: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    lows = []
    for variant in VARIANTS:
        curves = [runs[variant][s]["evals"] for s in args.seeds]
        n = min(len(c) for c in curves)
        loss = [statistics.mean(c[i]["val_loss"] for c in curves) for i in range(n)]
        lt = [statistics.mean(c[i]["layer_tokens"] for c in curves) / 1e6 for i in range(n)]
        sec = [statistics.mean(c[i]["seconds"] for c in curves) for i in range(n)]
        line, = a.plot(lt, loss, "-", label=variant)
        b.plot(sec, loss, "-", color=line.get_color(), label=variant)
        lows.append(min(loss))
    for ax, xlabel in ((a, "layer-tokens (millions; tokens through each block, summed)"),
                       (b, "training time (s; the steps, no validation)")):
        for target in targets:
            ax.axhline(target, color="gray", ls="--", lw=1)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    a.set_ylabel(f"validation loss (mean of {len(args.seeds)} seed{'s' * (len(args.seeds) > 1)})")
    a.set_ylim(min(lows) - 0.05, max(targets) + 0.8)
    for target in targets:
        a.text(a.get_xlim()[0], target, " target", va="bottom", fontsize=8, color="gray")
    a.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path.relative_to(common.ROOT)}")


# ---- main -------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="40 steps, seed 0: a smoke run")
    p.add_argument("--work", help="keep the runs in this (new) directory")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, help="steps of every run (default 300; quick 40)")
    p.add_argument("--seeds", type=int, nargs="+", help="default 0 1; quick 0")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--curriculum", choices=["seqlen", "seqlen+rarity"], default="seqlen")
    p.add_argument("--cl-start", type=int, default=16, help="first step's tokens per sequence")
    p.add_argument("--cl-steps", type=int, help="curriculum steps (default: half of --steps)")
    p.add_argument("--rarity-start", type=float, default=50.0, help="first step's percent of windows (seqlen+rarity)")
    p.add_argument("--ltd-layers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--ltd-start", type=int, default=32, help="first step's tokens kept per sequence")
    p.add_argument("--ltd-steps", type=int, help="random-LTD steps (default: half of --steps)")
    p.add_argument("--target", type=float, help="validation loss target (default: the baseline's at --target-at)")
    p.add_argument("--target-at", type=float, nargs="+", default=[0.75, 0.5],
                   help="fractions of --steps where the baseline sets a target, one table each")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the CLI")
    p.add_argument("--plot", metavar="RESULT", help="only draw this result file's PNG again (beside it), from its JSON")
    args = p.parse_args()
    defaults = dict(steps=40, seeds=[0]) if args.quick else dict(steps=300, seeds=[0, 1])
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.cl_steps = args.cl_steps or max(1, args.steps // 2)
    args.ltd_steps = args.ltd_steps or max(1, args.steps // 2)
    return args


def main() -> int:
    args = parse_args()
    if args.plot:
        return replot(Path(args.plot).absolute())
    args.commands = []
    t_start = time.perf_counter()
    if args.work:
        work = Path(args.work).absolute()
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="tedmoe-data-efficiency-"))
    print(f"model: V=256 (bytes) H={args.hidden} layers={args.layers} heads={args.heads}, 4 SwiGLU experts F=192 "
          f"top-2 in every block; {args.steps} steps of {BATCH} x {SEQ} tokens; seeds {args.seeds}; curriculum "
          f"{args.curriculum} from {args.cl_start} over {args.cl_steps} steps; random-LTD blocks {args.ltd_layers} from "
          f"{args.ltd_start} over {args.ltd_steps} steps; {args.threads} thread(s); work: {work}", flush=True)
    runs = {v: {} for v in VARIANTS}
    try:
        for seed in args.seeds:
            for variant in VARIANTS:
                r = runs[variant][seed] = train(args, work, variant, seed)
                print(f"  {variant} seed {seed}: {fmt(r['run_seconds'], '.0f', '?')} s ({r['train_seconds']:.0f} s of steps); final "
                      f"val loss {r['final_val_loss']:.4f}; {r['tokens'] / 1e6:.3f} M tokens, "
                      f"{r['layer_tokens'] / 1e6:.3f} M layer-tokens; router check mismatches "
                      f"{r['ltd_check_mismatch_count']}", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    tables = []
    for targets, where in seed_targets(args, runs):
        agg = aggregate(args, runs, targets)
        print_table(args, agg, targets, where)
        tables.append({"target_from": where, "per_seed": {str(s): t for s, t in targets.items()},
                       "mean": statistics.mean(targets.values()), "variants": agg})
    means = [t["mean"] for t in tables]
    elapsed = time.perf_counter() - t_start
    print(f"\nwall time {elapsed / 60:.1f} min")
    config = {k: v for k, v in vars(args).items() if k not in ("commands", "plot")}
    result = {"elapsed_s": elapsed, "targets": tables, "cli_commands": args.commands,
              "variants": agg, "runs": {v: {str(s): r for s, r in rs.items()} for v, rs in runs.items()}}
    path = common.write_result("data_efficiency", config, result)
    plot(args, runs, means, path.with_suffix(".png"), title(args, means))
    return 0


def title(args, targets: list[float]) -> str:
    return (f"H={args.hidden}, {args.layers} MoE blocks, {args.steps} steps x {BATCH} x {SEQ} tokens, seeds "
            f"{' '.join(map(str, args.seeds))}; dashed: targets (means over the seeds) {', '.join(f'{t:.3f}' for t in targets)}\ncurriculum: {args.curriculum} "
            f"{args.cl_start}->{SEQ} over {args.cl_steps} steps; random-LTD: blocks "
            f"{' '.join(map(str, args.ltd_layers))}, {args.ltd_start}->{SEQ} over {args.ltd_steps} steps")


def replot(result: Path) -> int:
    """Draw the PNG of a result file again (beside it), from its runs."""
    record = json.loads(result.read_text())
    args = argparse.Namespace(**record["config"])
    runs = {v: {int(s): r for s, r in rs.items()} for v, rs in record["runs"].items()}
    means = [t["mean"] for t in record["targets"]]
    plot(args, runs, means, result.with_suffix(".png"), title(args, means))
    return 0


if __name__ == "__main__":
    sys.exit(main())
