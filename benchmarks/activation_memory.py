"""Activation memory and communication of one training step with activation checkpointing off,
plain, and communication-aware (CAC), on 4 CPU ranks: (TP, EP, DP) = (2, 2, 2).

Reproduce:  .venv/bin/python benchmarks/activation_memory.py      (starts its 4 ranks itself)
            .venv/bin/python benchmarks/activation_memory.py --layers 2 --seq 64 --batch 1   (quick)

Activation memory is counted exactly, not sampled: every tensor autograd saves for backward
outside a checkpointed region (unique storages, parameters excluded), plus the CAC stash. The
transient recompute of one block during backward is reported beside it. Communication is the
ledger's bytes per rank for the step (forward, recompute, backward, optimizer). Prints a table on
rank 0 and writes benchmarks/results/activation_memory-<date>.json (benchmarks/report.py makes it a
dated report).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from tedmoe.config import ModelConfig, MoEConfig, TrainConfig
from tedmoe.model.transformer import GPTMoE
from tedmoe.parallel import comm, launch
from tedmoe.parallel.activation_checkpoint import apply_checkpointing
from tedmoe.parallel.topology import Topology
from tedmoe.runtime.engine import Engine

import common


def saved_bytes(model, fn) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def measure(args, mode: str) -> dict:
    topo = Topology(dist.get_world_size(), tp=2, ep=2)
    moe = MoEConfig(ffn_hidden_size=args.hidden * 2, num_experts=8, top_k=2)
    cfg = ModelConfig(vocab_size=256, hidden_size=args.hidden, num_layers=args.layers, num_heads=8,
                      ffn_hidden_size=args.hidden * 4, max_seq_len=args.seq, moe=moe)
    model = GPTMoE(cfg, topo)
    apply_checkpointing(model, mode)
    model.init_weights(0)
    engine = Engine(model, topo, TrainConfig())
    g = torch.Generator().manual_seed(topo.coord("dp"))
    ids = torch.randint(0, 256, (args.batch, args.seq + 1), generator=g)
    with comm.LEDGER.capture():
        activations, (loss, _) = saved_bytes(model, lambda: model(ids[:, :-1], ids[:, 1:]))
        stash = model.checkpointing.stash_bytes
        loss.backward()
        engine.optimizer.step(1)
    x = model.embed(ids[:, :-1]).detach()
    block, _ = saved_bytes(model, lambda: model.blocks[1](x))  # an MoE block, as the recompute saves it
    ledger = comm.LEDGER
    return {"mode": mode, "activation_bytes": activations, "stash_bytes": stash, "recompute_block_bytes": block,
            "all_to_all_bytes": ledger.total(kind="all_to_all").bytes,
            "all_reduce_bytes": ledger.total(kind="all_reduce").bytes,
            "all_gather_bytes": ledger.total(kind="all_gather").bytes,
            "reduce_scatter_bytes": ledger.total(kind="reduce_scatter").bytes,
            "calls": ledger.total().calls}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    if not launch.launched():
        return common.start_ranks(4)
    launch.init_distributed()
    rows = [measure(args, mode) for mode in ("none", "plain", "cac")]
    if dist.get_rank() == 0:
        mb = 2 ** 20
        print(f"GPT-MoE H={args.hidden} L={args.layers} seq={args.seq} batch={args.batch}/rank, 8 experts top-2, "
              f"TP 2 x EP 2 x DP 2, fp32; per rank")
        print(f"{'mode':>6} {'saved MB':>9} {'stash MB':>9} {'total MB':>9} {'+recompute MB':>14} "
              f"{'a2a MB':>7} {'all-reduce MB':>13} {'calls':>6}")
        for r in rows:
            total = r["activation_bytes"] + r["stash_bytes"]
            print(f"{r['mode']:>6} {r['activation_bytes'] / mb:>9.2f} {r['stash_bytes'] / mb:>9.2f} {total / mb:>9.2f} "
                  f"{(r['recompute_block_bytes'] if r['mode'] != 'none' else 0) / mb:>14.2f} "
                  f"{r['all_to_all_bytes'] / mb:>7.2f} {r['all_reduce_bytes'] / mb:>13.2f} {r['calls']:>6}")
        common.write_result("activation_memory", vars(args), {"rows": rows})
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
