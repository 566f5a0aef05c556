"""Turn benchmark result files into dated markdown reports: benchmarks/results/<name>-<date>.json
becomes benchmarks/reports/<date>-<name>.md, with the command that reproduces it, the machine and
versions, the table, and what the numbers show.

Reproduce:  .venv/bin/python benchmarks/report.py benchmarks/results/moe_layer-2026-11-23.json   (any number of files)

Knows moe_layer, optimizer_memory, activation_memory and sequence_parallel (paper_reproduction.py
writes its own report). Reads only the JSON, so the same file always gives the same report.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import common

MB = 2**20


def table(head: list[str], rows: list[list]) -> list[str]:
    """A markdown table, the first column left-aligned and the rest right-aligned."""
    rule = "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(head))) + "|"
    return ["| " + " | ".join(head) + " |", rule, *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def span(values, fmt: str) -> str:
    """'a' if all values print alike, else 'lo-hi'."""
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return lo if lo == hi else f"{lo}-{hi}"


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def moe_layer(d: dict) -> tuple[str, list[str], list[str]]:
    c, rows, slopes = d["config"], d["rows"], d.get("loglog_slopes", {})
    lines = [f"H={c['hidden']} F={c['ffn']} E={c['experts']} k={c['top_k']}, fp32, capacity factor 1.0, best of "
             f"{c['repeats']} (the einsum baseline: best of 2 up to S=4096, else 1).", "",
             *table(["S", "C", "ours ms", "einsum ms", "einsum/ours", "limit ms", "ours/limit",
                     "prof: outside GEMMs", "outside MLP"],
                    [[r["tokens"], r["capacity"], f"{1e3 * r['ours_s']:.1f}", f"{1e3 * r['einsum_s']:.1f}",
                      f"{r['einsum_over_ours']:.2f}", f"{1e3 * r['gemm_s']:.1f}",
                      f"{r.get('ours_over_limit', r['ours_s'] / r['gemm_s']):.3f}",
                      pct(r["outside_gemms_profiled"]), pct(r["outside_expert_mlp_profiled"])] for r in rows])]
    if slopes:
        lines += ["", "Log-log slope of time vs S: " + ", ".join(f"{k[:-2]} {v:.2f}" for k, v in slopes.items()) + "."]
    first, last = rows[0], rows[-1]
    reading = [f"With the one-hot einsum dispatch the layer took {first['einsum_over_ours']:.2f}x the time it took "
               f"with tedmoe's index dispatch at S={first['tokens']} and {last['einsum_over_ours']:.2f}x at "
               f"S={last['tokens']}."]
    if slopes:
        reading.append(f"On log-log axes its time grew with slope {slopes['einsum_s']:.2f} in S, against "
                       f"{slopes['ours_s']:.2f} for the layer with index dispatch and {slopes['gemm_s']:.2f} for "
                       "the experts alone.")
    mlp = span([100 * r["outside_expert_mlp_profiled"] for r in rows], ".1f")
    gemms = span([100 * r["outside_gemms_profiled"] for r in rows], ".1f")
    reading.append(f"In profiled runs of tedmoe's layer, {mlp}% of self CPU time was outside the expert MLP and "
                   f"{gemms}% outside the expert GEMMs, over the {len(rows)} token counts measured.")
    return "MoE layer: index dispatch vs one-hot einsum vs the experts alone", lines, reading


def optimizer_memory(d: dict) -> tuple[str, list[str], list[str]]:
    rows = d["rows"]
    shard, untiled = rows[0]["largest_shard"], rows[0]
    lines = [f"Expert params {rows[0]['expert_params']:,} of {rows[0]['total_params']:,}; largest shard {shard:,} "
             "elements; bf16 params/grads, fp32 master + AdamW; each setting in a fresh process.", "",
             *table(["tile", "tile/shard", "spike MB", "vs untiled", "step s"],
                    [[r["tile_size"] or "untiled", f"{(r['tile_size'] or shard) / shard:.4f}",
                      f"{r['spike_bytes'] / MB:.1f}", f"{r['reduction']:.1f}x", f"{r['step_seconds']:.2f}"]
                     for r in rows])]
    best = min(rows, key=lambda r: r["spike_bytes"])
    reading = [f"Untiled, the optimizer step raised peak resident memory by {untiled['spike_bytes'] / MB:.0f} MB "
               f"({untiled['spike_bytes'] / shard:.1f} bytes per element of the largest shard)."]
    if best is not untiled:
        reading.append(f"With tiles of {best['tile_size']:,} elements it rose by {best['spike_bytes'] / MB:.1f} MB, "
                       f"{best['reduction']:.0f}x less.")
    if len(rows) > 1:
        reading.append(f"The step itself took {span([r['step_seconds'] for r in rows], '.2f')} s across the "
                       f"{len(rows)} settings.")
    return "Optimizer step memory: untiled vs tiled", lines, reading


def activation_memory(d: dict) -> tuple[str, list[str], list[str]]:
    c, rows = d["config"], {r["mode"]: r for r in d["rows"]}
    total = {m: r["activation_bytes"] + r["stash_bytes"] for m, r in rows.items()}
    lines = [f"GPT-MoE H={c['hidden']} L={c['layers']} seq={c['seq']} batch={c['batch']}/rank, 8 experts top-2, "
             "TP 2 x EP 2 x DP 2 on 4 ranks, fp32; per rank.", "",
             *table(["mode", "saved MB", "stash MB", "total MB", "+recompute MB", "a2a MB", "all-reduce MB", "calls"],
                    [[m, f"{r['activation_bytes'] / MB:.2f}", f"{r['stash_bytes'] / MB:.2f}", f"{total[m] / MB:.2f}",
                      f"{(r['recompute_block_bytes'] if m != 'none' else 0) / MB:.2f}",
                      f"{r['all_to_all_bytes'] / MB:.2f}", f"{r['all_reduce_bytes'] / MB:.2f}", r["calls"]]
                     for m, r in rows.items()])]
    none, plain, cac = rows["none"], rows["plain"], rows["cac"]

    def moved(r) -> str:
        a2a, ar = (r[k] / none[k] for k in ("all_to_all_bytes", "all_reduce_bytes"))
        if a2a == ar == 1:
            return "the same all-to-all and all-reduce bytes as"
        return f"{a2a:.2f}x the all-to-all and {ar:.2f}x the all-reduce bytes of"

    reading = [f"Plain checkpointing kept {total['plain'] / MB:.1f} MB per rank for backward against "
               f"{total['none'] / MB:.1f} MB without ({total['none'] / total['plain']:.1f}x less) and moved "
               f"{moved(plain)} no checkpointing.",
               f"CAC kept {total['cac'] / MB:.1f} MB ({cac['stash_bytes'] / MB:.1f} MB of it the stash, "
               f"{total['none'] / total['cac']:.1f}x less than without) and moved {moved(cac)} no checkpointing.",
               f"With either kind of checkpointing, recomputing one MoE block during backward holds another "
               f"{plain['recompute_block_bytes'] / MB:.1f} MB while it runs."]
    return "Activation memory and communication: checkpointing off, plain, CAC", lines, reading


def sequence_parallel(d: dict) -> tuple[str, list[str], list[str]]:
    c, rows, memory = d.get("config", {}), d["bytes"], d["activations"]
    shape = f"H={c['hidden']}, {c['heads']} heads, batch {c['batch']}, " if c else ""
    unrecorded = "" if c else " (Hidden size, heads and batch are constants of the script; this result omits them.)"
    lines = [f"{shape}fp32; MB sent per rank, forward + backward, T = 512 P. A layer is attention + MLP.{unrecorded}",
             "",
             *table(["P", "seq", "Ulysses attn", "Meg-SP attn", "ratio", "Meg-SP layer", "layer ratio"],
                    [[r["P"], r["seq_len"], f"{r['ulysses_bytes'] / MB:.2f}", f"{r['megatron_sp_bytes'] / MB:.2f}",
                      f"{r['ratio_attention']:.2f}",
                      f"{(r['megatron_sp_bytes'] + r['megatron_sp_mlp_bytes']) / MB:.2f}", f"{r['ratio_layer']:.2f}"]
                     for r in rows]),
             "", f"Activations saved for backward per rank by one attention layer, T={memory[0]['seq_len']}:", "",
             *table(["P", "MB", "x P / (P=1)"],
                    [[m["P"], f"{m['saved_bytes'] / MB:.2f}", f"{m['relative_times_P']:.2f}"] for m in memory])]
    attention = ", ".join(f"{r['ratio_attention']:.2f}" for r in rows)
    layer = ", ".join(f"{r['ratio_layer']:.2f}" for r in rows)
    exact = all(abs(r["ratio_layer"] - r["P"]) < 0.01 and abs(r["ratio_attention"] - r["P"] / 2) < 0.01 for r in rows)
    reading = [f"At P = {', '.join(str(r['P']) for r in rows)}, Megatron-style SP sent {attention}x Ulysses' bytes "
               f"for attention alone and {layer}x for a whole layer{', i.e. P/2 and P' if exact else ''}.",
               f"Ulysses' bytes per rank went from {rows[0]['ulysses_bytes'] / MB:.2f} to "
               f"{rows[-1]['ulysses_bytes'] / MB:.2f} MB while the sequence grew "
               f"{rows[-1]['seq_len'] // rows[0]['seq_len']}x.",
               f"Saved activations per rank were {memory[0]['saved_bytes'] / MB:.2f} MB at P={memory[0]['P']} and "
               f"{memory[-1]['saved_bytes'] / MB:.2f} MB at P={memory[-1]['P']}; times P, that is "
               f"{span([m['relative_times_P'] for m in memory[1:]], '.2f')}x the single-process amount for P > 1."]
    return "Sequence parallelism: Ulysses vs Megatron-style, bytes and activations per rank", lines, reading


MACHINE = (("platform", "platform"), ("machine", "machine"), ("cpu_count", "CPUs"), ("threads", "threads per process"),
           ("world_size", "ranks"), ("torch", "torch"), ("python", "Python"))
ALWAYS_RECORDED = ("platform", "cpu_count", "threads", "torch", "python")  # by common.write_result

RENDER = {"moe_layer": (moe_layer, True), "optimizer_memory": (optimizer_memory, True),
          "activation_memory": (activation_memory, True), "sequence_parallel": (sequence_parallel, False)}


def rebuilt_command(name: str, config: dict, flags: bool) -> str:
    """The command for a result that predates recorded commands: the script with its config as flags."""
    args = []
    for key, value in (config.items() if flags else ()):
        if key != "out":
            args += [f"--{key.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
    return shlex.join([".venv/bin/python", f"benchmarks/{name}.py", *args])


def write_report(path: Path) -> Path:
    """Write the report for one result file and return its path."""
    path = path.resolve()
    name, date, _ = common.result_parts(path)
    out = common.report_path(path)
    if name not in RENDER:
        raise SystemExit(f"report.py: no report for {path.name}: knows {', '.join(RENDER)} "
                         "(paper_reproduction.py writes its own)")
    d = json.loads(path.read_text())
    render, flags = RENDER[name]
    title, body, reading = render(d)
    command = d.get("command")
    if command:
        reproduce = f"`{command}`"
    else:
        how = "rebuilt from the recorded config" if flags else "the script takes no options"
        reproduce = (f"`{rebuilt_command(name, d.get('config', {}), flags)}` ({how}; this result predates "
                     "recorded command lines)")
    machine = "; ".join(f"{label} {d[key]}" for key, label in MACHINE if key in d) or "nothing recorded"
    missing = [label for key, label in MACHINE if key in ALWAYS_RECORDED and key not in d]
    if missing:
        machine += f" (not recorded: {', '.join(missing)})"
    text = "\n".join([f"# {title}", "", f"Date: {d.get('date', date)}. Result: `{path.relative_to(common.ROOT)}`.",
                      "",
                      f"Reproduce: {reproduce}", "", f"Machine: {machine}.", "", *body, "", "## Reading", "",
                      " ".join(reading), ""])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path, help="result files, benchmarks/results/<name>-<date>.json")
    for path in p.parse_args().results:
        print(f"wrote {write_report(path).relative_to(common.ROOT)}")


if __name__ == "__main__":
    main()
