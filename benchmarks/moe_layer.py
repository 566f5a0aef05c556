"""MoE layer forward+backward time: tedmoe's index dispatch vs the one-hot einsum dispatch
(GShard: ``einsum("sec,sm->ecm")`` and back) vs the experts alone (the two GEMMs and the
activation on a full ``[E, C, H]`` buffer: the limit), in one run.

Reproduce:  .venv/bin/python benchmarks/moe_layer.py            (H=512, F=2048, E=8, k=2)
            .venv/bin/python benchmarks/moe_layer.py --tokens 512 1024 --repeats 2   (quick)

Single process, fp32, capacity factor 1.0. Times are best-of-N wall clock (the layer and the
experts alone interleaved); the "prof:" columns attribute self CPU time by operator within profiled
runs of the layer itself, which is steadier than a difference of two noisy timings.
Prints a table and writes benchmarks/results/moe_layer-<date>.json; benchmarks/report.py turns that
into a dated report.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from tedmoe.config import MoEConfig
from tedmoe.moe.layer import MoE
from tedmoe.parallel.topology import Topology

import common


def timed(fns, repeats: int) -> list[float]:
    """Best-of-``repeats`` seconds of each function, run interleaved so drifts hit all alike."""
    times = [[] for _ in fns]
    for i in range(repeats + 1):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            if i:  # the first round warms up
                ts.append(time.perf_counter() - t0)
    return [min(ts) for ts in times]


def ours(layer, x):
    def run():
        xg = x.detach().requires_grad_(True)
        y, _ = layer(xg)
        y.sum().backward()
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
    def run():
        xg = x_ECH.detach().requires_grad_(True)
        layer.experts(xg).sum().backward()
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    torch.manual_seed(0)
    cfg = MoEConfig(ffn_hidden_size=args.ffn, num_experts=args.experts,
                    top_k=args.top_k, capacity_factor=1.0, dtd=False)
    layer = MoE(args.hidden, cfg, Topology.single())
    rows = []
    head = (f"{'S':>6} {'C':>5} {'ours ms':>9} {'einsum ms':>10} {'einsum/ours':>11} {'experts ms':>10} "
            f"{'outside experts':>15} {'prof: outside GEMMs':>19} {'outside MLP':>11}")
    print(f"H={args.hidden} F={args.ffn} E={args.experts} k={args.top_k} fp32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(head)
    for S in args.tokens:
        x = torch.randn(S, args.hidden)
        C = cfg.capacity(S)
        t_ours, t_gemm = timed([ours(layer, x), gemms_only(layer, torch.randn(args.experts, C, args.hidden))],
                               args.repeats)
        (t_ein,) = timed([einsum_baseline(layer, x, C)], 2 if S <= 4096 else 1)  # the slow baseline: fewer runs
        gemm_share, mlp_share = profile_shares(ours(layer, x))
        row = {"tokens": S, "capacity": C, "ours_s": t_ours, "einsum_s": t_ein, "gemm_s": t_gemm,
               "einsum_over_ours": t_ein / t_ours, "outside_experts_timed": 1 - t_gemm / t_ours,
               "outside_gemms_profiled": 1 - gemm_share, "outside_expert_mlp_profiled": 1 - mlp_share}
        rows.append(row)
        print(f"{S:>6} {C:>5} {1e3 * t_ours:>9.1f} {1e3 * t_ein:>10.1f} {t_ein / t_ours:>11.2f} "
              f"{1e3 * t_gemm:>10.1f} {100 * row['outside_experts_timed']:>14.1f}% "
              f"{100 * row['outside_gemms_profiled']:>18.1f}% {100 * row['outside_expert_mlp_profiled']:>10.1f}%")
    slopes = {}
    for key in ("ours_s", "einsum_s", "gemm_s") if len(rows) > 1 else ():
        xs = [math.log(r["tokens"]) for r in rows]
        ys = [math.log(r[key]) for r in rows]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        slopes[key] = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    if slopes:
        print("log-log slope of time vs S: " + ", ".join(f"{k[:-2]} {v:.2f}" for k, v in slopes.items()))
    common.write_result("moe_layer", vars(args), {"rows": rows, "loglog_slopes": slopes})


if __name__ == "__main__":
    main()
