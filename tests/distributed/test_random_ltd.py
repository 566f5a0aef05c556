"""Random-LTD in TED layouts: with the middle block keeping a growing random subset of each
sequence's tokens, every layout (TP, EP, SP with segments, every checkpointing mode) gives the
single-process loss, gradients and 10-step curve: the draws depend on the sequence, the block and
the step only."""

import dataclasses

import pytest
import torch

import tests.distributed.test_engine as te
from tedmoe.config.schema import RandomLTDConfig
from tedmoe.parallel.topology import Topology
from tests.distributed.harness import assert_matches_reference

LAYOUTS = [(2, 2, 1, "none"), (1, 4, 1, "cac"), (4, 1, 1, "plain"), (2, 1, 2, "cac"), (1, 2, 2, "plain")]


def model_config(dropless=True):
    cfg = te.model_config()
    ltd = RandomLTDConfig(layers=(1, 2), start=4, steps=6, multiple=4, segments=2)
    return dataclasses.replace(cfg, num_layers=4, random_ltd=ltd,
                               moe=dataclasses.replace(cfg.moe, dropless=dropless))


def check_layouts():
    out = {}
    for tp, ep, sp, checkpointing in LAYOUTS:
        result = te.run(Topology(4, tp=tp, ep=ep, sp=sp), te.train_config(), checkpointing, model_cfg=model_config())
        out[(tp, ep, sp, checkpointing)] = result if torch.distributed.get_rank() == 0 else None
    return out


def test_random_ltd_matches_single_process(world4):
    reference = te.run(Topology.single(), te.train_config(), model_cfg=model_config())
    without = te.run(Topology.single(), te.train_config(),
                     model_cfg=dataclasses.replace(model_config(), random_ltd=RandomLTDConfig()))
    assert abs(reference[0] - without[0]) > 1e-4  # dropping tokens changes the loss
    assert reference[2][-1][0] != pytest.approx(without[2][-1][0], rel=1e-6)
    for (tp, ep, sp, ckpt), result in world4.run(check_layouts)[0].items():
        assert_matches_reference(f"random-LTD tp={tp} ep={ep} sp={sp} {ckpt}", result, reference)


def check_capacity_layouts():
    out = {}
    for tp, ep in ((2, 2), (1, 4)):
        result = te.run(Topology(4, tp=tp, ep=ep), te.train_config(), model_cfg=model_config(dropless=False))
        out[(tp, ep)] = result if torch.distributed.get_rank() == 0 else None
    return out


def test_random_ltd_with_capacity_routing(world4):
    """The MoE block routes only the kept tokens, with its capacity computed from them."""
    reference = te.run(Topology.single(), te.train_config(), model_cfg=model_config(dropless=False))
    for (tp, ep), result in world4.run(check_capacity_layouts)[0].items():
        assert_matches_reference(f"random-LTD capacity tp={tp} ep={ep}", result, reference)
