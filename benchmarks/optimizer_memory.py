"""Peak memory of the optimizer step, untiled vs tiled, for a GPT-MoE whose expert optimizer
states dominate (bf16 parameters and gradients, fp32 master weights and AdamW moments).

Reproduce:  .venv/bin/python benchmarks/optimizer_memory.py
            .venv/bin/python benchmarks/optimizer_memory.py --experts 8 --tiles 0 65536   (quick)

Each configuration runs in a fresh process with MALLOC_MMAP_THRESHOLD_=65536, so every large
tensor is its own mapping and is returned to the OS when freed; the process's peak resident set
is reset (/proc/self/clear_refs) just before ``optimizer.step`` and read after it. The spike is
that peak minus the resident set before the step. Prints a table, writes
benchmarks/results/optimizer_memory-<date>.json (benchmarks/report.py makes it a dated report).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import common


def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                if k in ("VmRSS", "VmHWM")}


def worker(args) -> dict:
    import torch

    from tedmoe.config import ModelConfig, MoEConfig, TrainConfig
    from tedmoe.model.transformer import GPTMoE, count_parameters
    from tedmoe.parallel.topology import Topology
    from tedmoe.runtime.engine import Engine

    torch.manual_seed(0)
    moe = MoEConfig(ffn_hidden_size=args.expert_ffn, num_experts=args.experts, top_k=2)
    cfg = ModelConfig(vocab_size=256, hidden_size=args.hidden, num_layers=2, num_heads=4,
                      ffn_hidden_size=4 * args.hidden, max_seq_len=64, moe=moe)
    topo = Topology.single()
    model = GPTMoE(cfg, topo)
    model.init_weights(0)
    tile = args.worker or None
    engine = Engine(model, topo, TrainConfig(precision="bf16", tile_size=tile, warmup_steps=0))
    ids = torch.randint(0, 256, (4, 65))
    loss, _ = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    del loss
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status()["VmRSS"]
    t0 = time.perf_counter()
    engine.optimizer.step(1)
    seconds = time.perf_counter() - t0
    spike = _status()["VmHWM"] - before
    counts = count_parameters(cfg)
    shard = max(g.shard for g in engine.optimizer.groups)
    return {"tile_size": tile, "spike_bytes": spike, "step_seconds": seconds, "largest_shard": shard,
            "expert_params": counts["expert"], "total_params": counts["total"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--expert-ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--tiles", type=int, nargs="+", default=[0, 1 << 22, 1 << 20, 1 << 18, 1 << 16],
                   help="tile sizes in elements; 0 = untiled")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(args)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    rows = []
    base = [sys.executable, __file__, "--hidden", str(args.hidden), "--expert-ffn", str(args.expert_ffn),
            "--experts", str(args.experts)]
    for tile in args.tiles:
        out = subprocess.run(base + ["--worker", str(tile)], env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    untiled = rows[0]["spike_bytes"]
    shard = rows[0]["largest_shard"]
    print(f"expert params {rows[0]['expert_params']:,} of {rows[0]['total_params']:,}; largest shard {shard:,} "
          f"elements; bf16 params/grads, fp32 master + AdamW")
    print(f"{'tile':>10} {'tile/shard':>10} {'spike MB':>9} {'vs untiled':>10} {'step s':>7}")
    for r in rows:
        tile = r["tile_size"] or shard
        r["reduction"] = untiled / r["spike_bytes"] if r["spike_bytes"] else float("inf")
        print(f"{r['tile_size'] or 'untiled':>10} {tile / shard:>10.4f} {r['spike_bytes'] / 2**20:>9.1f} "
              f"{r['reduction']:>9.1f}x {r['step_seconds']:>7.2f}")
    config = {k: v for k, v in vars(args).items() if k != "worker"}
    common.write_result("optimizer_memory", config, {"rows": rows}, threads=int(env["OMP_NUM_THREADS"]))


if __name__ == "__main__":
    main()
