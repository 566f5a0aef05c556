"""The paper's scaling claims against tedmoe's planner: largest trainable base model with TED vs
expert + data parallelism alone, and the communication saved by DTD + CAC on its four models.

Reproduce:  .venv/bin/python benchmarks/paper_reproduction.py
Writes benchmarks/results/paper_reproduction-<date>.json and its report,
benchmarks/reports/<date>-paper_reproduction.md.
"""

from __future__ import annotations

import dataclasses

from tedmoe.planner.hardware import PRESETS
from tedmoe.parallel.topology import ParallelDims
from tedmoe.planner.predict import Plan, eq5_lower_bound, memory, step_comm, step_time
from tedmoe.planner.search import paper_model, paper_train

import common

EXPERTS = 16


def family(hidden: int, layers: int = 32):
    """A GPT-3-shaped base model of width ``hidden`` (head dim 128) with 16 experts every other block."""
    m = paper_model("6.7b", EXPERTS)
    moe = dataclasses.replace(m.moe, hidden_size=hidden, ffn_hidden_size=4 * hidden)
    return dataclasses.replace(m, hidden_size=hidden, num_heads=hidden // 128, num_layers=layers, ffn_hidden_size=4 * hidden,
                               moe=moe)


def fits(model, hw, gpus: int, tp: int) -> bool:
    """Whether some expert-parallel degree fits ``model`` at this tp (memory only)."""
    for ep in (e for e in range(1, EXPERTS + 1) if EXPERTS % e == 0):
        try:
            ParallelDims(gpus, tp, ep)
            model.validate(tp, ep)
        except ValueError:
            continue
        plan = Plan(model, gpus, tp, ep, 1, 2048, 1, paper_train("plain"))
        if memory(plan)["total"] <= hw.memory_bytes:
            return True
    return False


def largest_base(hw, gpus: int, tps: list[int]) -> tuple[float, int, int]:
    """(NP_base, hidden, tp) of the widest family member that fits with one of ``tps``; widths
    are multiples of 128 x tp so the heads divide."""
    best = (0.0, 0, 0)
    for tp in tps:
        if gpus % tp:
            continue
        lo, hi = 0, 1024 // tp  # width = k * 128 * tp, up to 131072
        while lo < hi:  # largest k that fits (memory grows with k)
            k = (lo + hi + 1) // 2
            if fits(family(k * 128 * tp), hw, gpus, tp):
                lo = k
            else:
                hi = k - 1
        if lo:
            hidden = lo * 128 * tp
            np_base = 12 * family(hidden).num_layers * hidden**2
            best = max(best, (np_base, hidden, tp))
    return best


def part1() -> tuple[list[str], list[dict]]:
    lines = ["## 1. Largest base model: TED vs expert + data parallelism (DeepSpeed-MoE)", "",
             "Family: GPT-3 shapes, 32 layers, head dim 128, the widest width (a multiple of 128 x tp) that fits, found by bisection, 16 experts every other "
             "block, fp16 with ZeRO-1, micro-batch 1 x 2048 tokens, plain activation checkpointing (the memory-lean mode; CAC adds its stash). `NP_base = 12 L h^2`. "
             "DeepSpeed-MoE is the same search with tp = 1.", "",
             "| machine | GPUs | largest base, EP+DP | largest base, TED (tp) | ratio | Eq. 6 ratio | paper |",
             "|---|---|---|---|---|---|---|"]
    rows = []
    paper = {"summit": "1.09x-4.8x measured on 32-512 GPUs", "perlmutter": "Eq. 6", "dgx-a100": "Eq. 6"}
    for name in ("summit", "perlmutter", "dgx-a100"):
        hw = PRESETS[name]
        for gpus in (32, 64, 128, 256, 512):
            g = gpus  # as in the paper, a GPU count need not fill whole nodes
            base = largest_base(hw, g, [1])
            ted = largest_base(hw, g, list(range(1, hw.gpus_per_node + 1)))
            t = hw.gpus_per_node
            eq6 = (1 + (EXPERTS + 2) / g) / (1 / t + (EXPERTS + 2) / g)
            ratio = ted[0] / base[0] if base[0] else float("inf")
            rows.append({"machine": name, "gpus": g, "ep_dp_np": base[0], "ted_np": ted[0], "ted_tp": ted[2],
                         "ratio": ratio, "eq6": eq6})
            lines.append(f"| {hw.name} | {g} | {base[0] / 1e9:.2f}B | {ted[0] / 1e9:.2f}B (tp {ted[2]}) | {ratio:.2f}x | "
                         f"{eq6:.2f}x (-> {t}x) | {paper[name]} |")
    return lines, rows


def part2() -> tuple[list[str], list[dict]]:
    lines = ["## 2. DTD + CAC on the paper's models (16 experts, Summit)", "",
             "Baseline: no DTD, plain activation checkpointing. Optimized: DTD + CAC. Global batch 512 x 2048 "
             "tokens, micro-batch 1, ep = 16, fp16. Bytes are per GPU per step, from the same formulas the "
             "ledger is tested against.", "",
             "| model | GPUs | tp | all-to-all GB base -> opt | all-reduce GB base -> opt | comm s base -> opt | "
             "step s base -> opt | predicted speedup | paper measured |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = []
    hw = PRESETS["summit"]
    for name, gpus, tp, measured in (("1.3b", 32, 1, 6), ("2.7b", 64, 2, 20), ("6.7b", 128, 4, 25), ("13b", 256, 8, 36)):
        model = paper_model(name, EXPERTS)
        ep = min(EXPERTS, gpus // tp)
        res = {}
        for label, dtd, ckpt in (("base", False, "plain"), ("opt", True, "cac")):
            m = dataclasses.replace(model, moe=dataclasses.replace(model.moe, dtd=dtd))
            plan = Plan(m, gpus, tp, ep, 1, 2048, 512 // (gpus // tp), paper_train(ckpt))
            comm = step_comm(plan)
            by_kind = {}
            for entries in comm.values():
                for key, e in entries.items():
                    by_kind[key.split("/")[0]] = by_kind.get(key.split("/")[0], 0) + e["bytes"]
            res[label] = {"bytes": by_kind, "time": step_time(plan, hw)}
        b, o = res["base"], res["opt"]
        comm_b = b["time"]["total"] - b["time"]["compute"]
        comm_o = o["time"]["total"] - o["time"]["compute"]
        speedup = b["time"]["total"] / o["time"]["total"] - 1
        rows.append({"model": name, "gpus": gpus, "tp": tp, "ep": ep, **{f"{k}_{l}": v for l in res for k, v in res[l].items()},
                     "speedup": speedup, "paper": measured / 100})
        lines.append(f"| {name} | {gpus} | {tp} | {b['bytes'].get('all_to_all', 0) / 1e9:.1f} -> "
                     f"{o['bytes'].get('all_to_all', 0) / 1e9:.1f} | {b['bytes'].get('all_reduce', 0) / 1e9:.1f} -> "
                     f"{o['bytes'].get('all_reduce', 0) / 1e9:.1f} | {comm_b:.2f} -> {comm_o:.2f} | "
                     f"{b['time']['total']:.2f} -> {o['time']['total']:.2f} | {100 * speedup:.0f}% | {measured}% |")
    return lines, rows


def main() -> None:
    l1, r1 = part1()
    l2, r2 = part2()
    result = common.write_result("paper_reproduction", {"experts": EXPERTS}, {"largest_base": r1, "dtd_cac": r2})
    report = common.report_path(result)
    eq5 = eq5_lower_bound(6.7e9, EXPERTS, 4, 128)
    text = "\n".join([
        "# tedmoe planner vs the DeepSpeed-TED paper", "",
        f"Generated on {report.name[:10]} by `{common.command()}`; the numbers are in "
        f"`{result.relative_to(common.ROOT)}`. All numbers are "
        "predictions of `tedmoe.planner` (no GPU was used); the paper's numbers are quoted beside them.", "",
        f"Eq. 5 check: 6.7B base, 16 experts, tp 4, 128 GPUs: `4 NP (1/t + (E+2)/G)` = {eq5 / 2**30:.1f} GiB of "
        "model states per GPU (the planner's model-state formula reduces to it exactly; see tests/unit/test_planner.py).", "",
        *l1, "", *l2, "", "## Where the model disagrees, and why", "",
        "- Eq. 6 is an asymptote (G >> E x GPUs per node) of model states alone; the search above also counts "
        "activations, the optimizer-step spike and width granularity (multiples of 128 x tp), so at 32-64 GPUs the ratio "
        "is far below the asymptote, as in the paper's measured 1.09x at 32 Summit GPUs.",
        "- The time model adds every collective to compute (no overlap) and charges a collective that crosses "
        "nodes the node's whole NIC bandwidth divided among its GPUs. Summit has 6 GPUs per node, so tp = 4 "
        "or 8 groups straddle nodes in a rank-contiguous layout; the paper's runs may have placed ranks "
        "differently. Where the predicted speedup exceeds the paper's, the likely causes are this pessimistic "
        "inter-node model for the baseline's extra all-to-all bytes and the absence of compute/communication "
        "overlap; where it is below, kernel-level effects (the paper's fused DTD kernels, NCCL all-to-all "
        "efficiency at small messages) are not modelled.",
        "- Efficiency is a single constant (40% of peak) for every GEMM size.", ""])
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text)
    print(text)
    print(f"wrote {report.relative_to(common.ROOT)}")


if __name__ == "__main__":
    main()
