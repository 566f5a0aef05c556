"""PR-MoE (pyramid) and Residual-MoE across layouts: training gives the single-process loss,
gradients and 10-step curve in TP x EP layouts with every checkpointing mode, and the inference
engine serves them in TP 2 x EP 2 with the single-process logits."""

import dataclasses

import torch

import tests.distributed.test_engine as te
from tedmoe.inference.engine import InferenceEngine
from tedmoe.parallel.topology import Topology
from tests.distributed.harness import assert_matches_reference
from tests.distributed.test_inference import scheduled
from tests.unit.test_inference_engine import TOL, build

TRAIN_LAYOUTS = [(2, 2, "none"), (1, 4, "cac"), (4, 1, "plain"), (2, 2, "cac")]  # tp, ep, checkpointing


def model_config():
    cfg = te.model_config()  # capacity routing, GELU experts
    return dataclasses.replace(cfg, moe_every=1, expert_counts=(4, 8),
                               moe=dataclasses.replace(cfg.moe, residual=True))


def check_train_layouts():
    out = {}
    for tp, ep, ckpt in TRAIN_LAYOUTS:
        result = te.run(Topology(4, tp=tp, ep=ep), te.train_config(), ckpt, model_cfg=model_config())
        out[(tp, ep, ckpt)] = result if torch.distributed.get_rank() == 0 else None
    return out


def test_pyramid_residual_training_matches_single_process(world4):
    reference = te.run(Topology.single(), te.train_config(), model_cfg=model_config())
    assert reference[2][-1][0] < reference[2][0][0] - 0.5  # it trains
    assert reference[1]["blocks.1.mlp.coefficient.weight"].abs().max() > 0  # the mixing coefficient learns
    for (tp, ep, ckpt), result in world4.run(check_train_layouts)[0].items():
        assert_matches_reference(f"tp={tp} ep={ep} checkpointing={ckpt}", result, reference)


def serve():
    engine = InferenceEngine(build(model_config(), topology=Topology(4, tp=2, ep=2)), block_size=4, num_blocks=32)
    if engine.rank != 0:
        engine.follow()
        return None
    try:
        return scheduled(engine, 4)
    finally:
        engine.stop()


def test_the_engine_serves_them_across_ranks(world4):
    reference = scheduled(InferenceEngine(build(model_config()), block_size=4, num_blocks=32), 4)
    logits, outs, free = world4.run(serve)[0]
    for step, (got, want) in enumerate(zip(logits, reference[0])):
        torch.testing.assert_close(got, want, **TOL, msg=lambda m: f"forward {step}: {m}")
    assert outs == reference[1] and free == 32
