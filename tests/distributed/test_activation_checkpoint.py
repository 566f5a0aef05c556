"""Activation checkpointing of the whole model on (TP, EP, DP) = (2, 2, 2): plain and CAC give
gradients bit-identical to no checkpointing; CAC moves exactly the bytes of no checkpointing (its
stash dies with each block's backward), plain moves the MoE all-to-alls 1.5 times."""

import gc
import weakref

import torch

from tedmoe.parallel import comm
from tedmoe.parallel.activation_checkpoint import CommStash
from tedmoe.parallel.topology import Topology
from tests.distributed.test_engine import build, micro_batches, train_config


def check_checkpointing():
    """One training step in each checkpointing mode on (TP, EP, DP) = (2, 2, 2): gradients and ledger."""
    topo = Topology(4, tp=2, ep=2)
    dp, dp_rank = topo.size("dp"), topo.coord("dp")
    out = {}
    for mode in ("none", "plain", "cac"):
        engine = build(topo, train_config(), mode)
        mbs = micro_batches(0, dp, dp_rank)
        with comm.LEDGER.capture():
            for ids, targets in mbs:
                loss = engine.model(ids, targets)[0]
                stash = engine.model.checkpointing.stash_bytes
                live = [weakref.ref(s) for s in gc.get_objects() if isinstance(s, CommStash)]
                assert len(live) == (2 if mode == "cac" else 0)  # one per block, held by its checkpoint
                loss.backward()
                del loss
                assert all(r() is None for r in live), "a CAC stash outlived its backward"
        comm.LEDGER.enabled = False
        grads = engine.full_gradients(len(mbs))
        with comm.LEDGER.capture(reset=False):
            engine.optimizer.step(len(mbs))
        out[mode] = (grads, comm.LEDGER.as_dict(), comm.LEDGER.total(kind="all_to_all").bytes, stash)
    return out


def test_checkpointing_modes(world4):
    per_rank = world4.run(check_checkpointing)
    for out in per_rank:
        grads, ledger, a2a, stash = out["none"]
        for mode in ("plain", "cac"):
            for name, g in grads.items():
                assert torch.equal(out[mode][0][name], g), (mode, name)  # bit-identical gradients
        assert out["cac"][1] == ledger  # CAC moves exactly what no checkpointing moves, call for call
        assert out["cac"][3] > 0 and stash == 0  # ...paid for with the stash
        plain = out["plain"][1]
        assert {p: v for p, v in plain.items() if p != "recompute"} == ledger
        assert out["plain"][2] * 2 == a2a * 3  # the MoE layers' all-to-alls run 1.5x
        assert plain["recompute"]["all_to_all/ep"]["bytes"] * 2 == a2a
