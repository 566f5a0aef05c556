"""The paper's scaling claims against tedmoe's planner: largest trainable base model with TED vs
expert + data parallelism alone (with ZeRO-1 as in the paper, and with ZeRO-2, ZeRO-3 and ZeRO-3
with cpu or disk offload), and the communication saved by DTD + CAC on its four models.

Reproduce:  .venv/bin/python benchmarks/paper_reproduction.py
Writes benchmarks/results/paper_reproduction-<date>.json and its report,
benchmarks/reports/<date>-paper_reproduction.md.
"""

from __future__ import annotations

import dataclasses

from tedmoe.planner.hardware import PRESETS, fits as fits_hardware
from tedmoe.parallel.topology import ParallelDims
from tedmoe.planner.predict import Plan, eq5_lower_bound, memory, model_state_bytes, param_counts, step_comm, step_time
from tedmoe.planner.search import paper_model, paper_train
from tedmoe.planner.zero import state_coefficients

import common

EXPERTS = 16


def family(hidden: int, layers: int = 32):
    """A GPT-3-shaped base model of width ``hidden`` (head dim 128) with 16 experts every other block."""
    m = paper_model("6.7b", EXPERTS)
    moe = dataclasses.replace(m.moe, ffn_hidden_size=4 * hidden)
    return dataclasses.replace(m, hidden_size=hidden, num_heads=hidden // 128, num_layers=layers, ffn_hidden_size=4 * hidden,
                               moe=moe)


def zero(stage: int, offload: str = "none"):
    """The paper's training settings (fp16, 16M-element tiles), plain checkpointing, at this ZeRO stage and offload."""
    return dataclasses.replace(paper_train("plain"), zero_stage=stage, offload=offload,
                               offload_path="/nvme" if offload == "disk" else None)


CONFIGS = {"ZeRO-1": zero(1), "ZeRO-2": zero(2), "ZeRO-3": zero(3), "ZeRO-3 + cpu": zero(3, "cpu"),
           "ZeRO-3 + disk": zero(3, "disk")}


def fitting_memory(model, hw, gpus: int, tp: int, train=None) -> dict | None:
    """``predict.memory`` of the first expert-parallel degree that fits ``model`` at this tp (the
    device, and the node's host memory or disk for what is offloaded), or None."""
    for ep in (e for e in range(1, EXPERTS + 1) if EXPERTS % e == 0):
        try:
            ParallelDims(gpus, tp, ep)
            model.validate(tp, ep)
        except ValueError:
            continue
        mem = memory(Plan(model, gpus, tp, ep, 1, 2048, 1, train or zero(1)))
        if fits_hardware(mem, hw):
            return {**mem, "ep": ep}
    return None


def largest_base(hw, gpus: int, tps: list[int], train=None) -> tuple[float, int, int]:
    """(NP_base, hidden, tp) of the widest family member that fits with one of ``tps``; widths
    are multiples of 128 x tp so the heads divide."""
    best = (0.0, 0, 0)
    for tp in tps:
        if gpus % tp:
            continue
        lo, hi = 0, 1024 // tp  # width = k * 128 * tp, up to 131072
        while lo < hi:  # largest k that fits (memory grows with k)
            k = (lo + hi + 1) // 2
            if fitting_memory(family(k * 128 * tp), hw, gpus, tp, train) is not None:
                lo = k
            else:
                hi = k - 1
        assert lo < 1024 // tp, "the search's widest model fits: raise its bound"
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


def part3() -> tuple[list[str], list[dict]]:
    GiB = 2**30
    lines = ["## 3. Largest base model by ZeRO stage and offload", "",
             "The family and settings of section 1 (fp16, plain checkpointing, micro-batch 1 x 2048 tokens, "
             "16M-element optimizer tiles) at each ZeRO stage, and ZeRO-3 with the optimizer states in host memory "
             "(cpu) or in files on the node's NVMe (disk); in both the offloaded fp32 master is the parameter shards' "
             "only copy. "
             "A model fits when the device "
             "memory is within the GPU's and what is offloaded within the GPU's share of its node's host memory or "
             "disk (`Hardware.host_memory_bytes`, `disk_bytes`). Memory columns: the TED layout's per GPU.", "",
             "| machine | GPUs | config | largest base, EP+DP | largest base, TED (tp, ep) | ratio | "
             "device GiB | host GiB | disk GiB |", "|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for name in ("summit", "dgx-a100", "dgx-h100"):
        hw = PRESETS[name]
        for gpus in (128, 512):
            for label, train in CONFIGS.items():
                base = largest_base(hw, gpus, [1], train)
                ted = largest_base(hw, gpus, list(range(1, hw.gpus_per_node + 1)), train)
                mem = fitting_memory(family(ted[1]), hw, gpus, ted[2], train) if ted[0] else None
                ratio = ted[0] / base[0] if base[0] else float("inf")
                rows.append({"machine": name, "gpus": gpus, "config": label, "zero_stage": train.zero_stage,
                             "offload": train.offload, "ep_dp_np": base[0], "ted_np": ted[0], "ted_tp": ted[2],
                             "ted_hidden": ted[1], "ratio": ratio, "ted_memory": mem})
                split = " | ".join(f"{mem[k] / GiB:.1f}" if mem and (mem[k] or k == "total") else "-"
                                   for k in ("total", "host", "disk"))
                lines.append(f"| {hw.name} | {gpus} | {label} | {base[0] / 1e9:.2f}B | {ted[0] / 1e9:.2f}B "
                             f"(tp {ted[2]}, ep {mem['ep'] if mem else '-'}) | {ratio:.2f}x | {split} |")
    return lines, rows


def eq5_generalised() -> tuple[list[str], list[dict]]:
    """Eq. 5 for every stage and offload: the coefficients, and a check on the 6.7B model."""
    GiB = 2**30
    model, t, ep, g = family(4096), 4, EXPERTS, 128
    full = param_counts(model)
    n_ne, n_e = full["total"] - full["expert_total"], full["expert_total"]
    np_base = 12 * model.num_layers * model.hidden_size**2
    lines = ["## Eq. 5 generalised to ZeRO-2, ZeRO-3 and offload", "",
             "Model states per GPU, 16-bit training, `N_ne` non-expert and `N_e` expert parameters, experts "
             "split over `t x ep` and everything sharded over the `G` ranks (experts over `edp`, `t ep edp = G`):", "",
             "`M_place >= a (N_ne / t + N_e / (t ep)) + c_place (N_ne + N_e) / G  (+ W on the device)`", "",
             "and with the paper's `N_ne = 2/3 NP_base`, `N_e = E/3 NP_base`, one expert per EP rank (`ep = E`):", "",
             "`M_place >= NP_base (a / t + c_place (E + 2) / (3 G))  (+ W)`;  ZeRO-1 without offload "
             "(`a = 4`, `c = 12`) is Eq. 5, `4 NP_base (1/t + (E + 2)/G)`.", "",
             "`a`: 16-bit parameters (2) and gradients (2) kept whole per tp (x ep) group; `c`: the sharded "
             "states: fp32 master and Adam moments (12), at ZeRO-2/3 the fp32 gradient shard (4; ZeRO's usual "
             "16-bit gradient shard would make it 2 and ZeRO-3's total the familiar 16), at ZeRO-3 the 16-bit "
             "parameter shard (2). `W`, the working set on the device that is not a model state: ZeRO-2 the open "
             "gradient buckets (2 x bucket x 2 bytes); ZeRO-3 the root units (embedding, head, final norm) and "
             "two consecutive blocks whole while used, `2 (2 V h / t + 2 NP_base / (L t))` bytes with `ep = E`, "
             "plus the 16-bit gradients staged until a unit's last one arrives (the root's, through the whole "
             "backward, and the running block's); disk offload the step's 3 x 3 fp32 "
             "tiles. Offload moves the 12 bytes of optimizer states (fp32 master and moments; offloaded, fp32 "
             "training keeps its master there too) from `c_device` to `c_host` or `c_disk`; at ZeRO-3 with disk "
             "the 2-byte parameter shard leaves the device as well, since the gather reads the master from the "
             "file. With `a = 0` at ZeRO-3, Eq. 6's TED advantage "
             "`(a + c (E+2)/(3G)) / (a/t + c (E+2)/(3G))` tends to 1: tensor parallelism then saves only `W` "
             "and activations.", "",
             f"Check on the 6.7B family member (h 4096, 32 layers, {EXPERTS} experts), tp {t}, ep {ep}, {g} GPUs "
             "(formula with the model's real `N_ne`, `N_e`; planner: parameters + gradients + optimizer "
             "on the device, the rest of `memory()`'s keys):", "",
             "| config | a | c device | c host | c disk | formula device GiB | formula host / disk GiB | "
             "planner device GiB (W included) | planner host / disk GiB |", "|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for label, train in CONFIGS.items():
        coef = state_coefficients(train.zero_stage, train.offload)
        states = {w: model_state_bytes(n_ne, n_e, t, ep, g, train.zero_stage, train.offload, w)
                  for w in ("device", "host", "disk")}
        mem = memory(Plan(model, g, t, ep, 1, 2048, 1, train))
        device = mem["parameters"] + mem["gradients"] + mem["optimizer"]
        rows.append({"config": label, "coefficients": coef, "formula": states, "planner_device": device,
                     "planner_host": mem["host"], "planner_disk": mem["disk"],
                     "eq5_form": np_base * (coef["device"][0] / t + coef["device"][1] * (EXPERTS + 2) / (3 * g))})
        lines.append(f"| {label} | {coef['device'][0]:g} | {coef['device'][1]:g} | {coef['host'][1]:g} | "
                     f"{coef['disk'][1]:g} | {states['device'] / GiB:.2f} | "
                     f"{states['host'] / GiB:.2f} / {states['disk'] / GiB:.2f} | {device / GiB:.2f} | "
                     f"{mem['host'] / GiB:.2f} / {mem['disk'] / GiB:.2f} |")
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
    l3, r3 = part3()
    l5, r5 = eq5_generalised()
    configs = {label: {"zero_stage": c.zero_stage, "offload": c.offload, "precision": c.precision,
                       "checkpointing": c.checkpointing, "tile_size": c.tile_size,
                       "reduce_bucket_size": c.reduce_bucket_size} for label, c in CONFIGS.items()}
    hardware = {name: dataclasses.asdict(PRESETS[name]) for name in ("summit", "perlmutter", "dgx-a100", "dgx-h100")}
    result = common.write_result("paper_reproduction", {"experts": EXPERTS, "zero_configs": configs,
                                                        "hardware": hardware},
                                 {"largest_base": r1, "dtd_cac": r2, "largest_base_zero": r3, "eq5_generalised": r5})
    report = common.report_path(result)
    eq5 = eq5_lower_bound(6.7e9, EXPERTS, 4, 128)
    zero3 = [r["ratio"] for r in r3 if r["config"] == "ZeRO-3"]
    share = {"host": "host_memory_bytes", "disk": "disk_bytes"}
    used = max(r["ted_memory"][k] / (getattr(PRESETS[r["machine"]], share[k]) / PRESETS[r["machine"]].gpus_per_node)
               for r in r3 if r["ted_memory"] for k in share if r["ted_memory"][k])
    text = "\n".join([
        "# tedmoe planner vs the DeepSpeed-TED paper", "",
        f"Generated on {report.name[:10]} by `{common.command()}`; the numbers are in "
        f"`{result.relative_to(common.ROOT)}`. All numbers are "
        "predictions of `tedmoe.planner` (no GPU was used); the paper's numbers are quoted beside them.", "",
        f"Eq. 5 check: 6.7B base, 16 experts, tp 4, 128 GPUs: `4 NP (1/t + (E+2)/G)` = {eq5 / 2**30:.1f} GiB of "
        "model states per GPU (the planner's model-state formula reduces to it exactly; see tests/unit/test_planner.py).", "",
        *l1, "", *l2, "", *l3, "", *l5, "", "## Where the model disagrees, and why", "",
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
        "- Efficiency is a single constant (40% of peak) for every GEMM size.",
        "- Section 3 is memory only. The time model has no host-device (PCIe) or NVMe transfer term, so the "
        "offload rows say what fits, not how fast it trains; ZeRO-3's per-block gathers (each block twice per "
        "micro-batch, forward and backward) are in `step_time`, and they are why ZeRO-3 with many micro-batches "
        "per step moves far more bytes than ZeRO-1.",
        "- Host memory and disk per GPU are the node's (published node specifications) divided by its GPUs; the "
        "operating system, pinned staging buffers and the data loader take part of the host memory. In section 3 "
        f"the offloaded bytes use at most {100 * used:.0f}% of a GPU's share: the device memory is what limits. The "
        "DGX-H100 rows equal the DGX-A100 rows: both presets have 80 GB per GPU, 2 TiB of host memory and "
        "8 x 3.84 TB of NVMe per node; they differ in speed only.",
        f"- With ZeRO-3 the TED advantage shrinks ({min(zero3):.2f}-{max(zero3):.2f}x without offload) because the "
        "model states are sharded "
        "over all G ranks whatever t (`a = 0` above); tp still divides the working set (two blocks whole, the "
        "embedding and head) and part of the activations, which is what remains on the device once offload has "
        "moved the states away, so the ratio grows again with cpu and disk offload.",
        "- The gradient shard is kept in fp32 (4 bytes) at ZeRO-2 and 3, so where `edp = 1` (experts not "
        "sharded) ZeRO-2 keeps the experts' whole gradient in fp32, twice ZeRO-1's 16-bit gradient; the planner "
        "predicts this, and it can make ZeRO-2 fit fewer layers than ZeRO-1 in such layouts.", ""])
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text)
    print(text)
    print(f"wrote {report.relative_to(common.ROOT)}")


if __name__ == "__main__":
    main()
