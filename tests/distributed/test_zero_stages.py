"""ZeRO stages: stage 2 (gradients reduce-scattered bucket by bucket during the backward, never
kept whole) gives the single-process loss, gradients and 10-step curve in TP x EP x DP x SP
layouts, with several buckets per group, clipping on and the tiled step; a checkpoint written at
one stage and layout continues at another with the uninterrupted losses."""

import dataclasses

import pytest
import torch

import tests.distributed.test_engine as te
from tedmoe.parallel.topology import Topology
from tedmoe.runtime import checkpoint as ckpt
from tests.distributed.harness import assert_matches_reference

BUCKET = 1000  # elements: a dozen buckets per group of the test model
LAYOUTS = {4: [(2, 2, 1, "none"), (1, 4, 1, "cac"), (4, 1, 1, "plain"), (1, 2, 2, "none")],  # (tp, ep, sp, ckpt)
           6: [(3, 2, 1, "none"), (6, 1, 1, "cac"), (3, 1, 2, "none")]}  # dp must divide the 8 micro-batches


def model_config(world, dropless=False):
    """The engine tests' model; for world 6 one that tp 3 and ep 3 divide (odd degrees)."""
    cfg = te.model_config()
    if world == 6:
        cfg = dataclasses.replace(cfg, vocab_size=66, hidden_size=48, num_heads=6, ffn_hidden_size=66,
                                  moe=dataclasses.replace(cfg.moe, ffn_hidden_size=36, num_experts=6))
    cfg.moe.dropless = dropless  # under SP capacity is per chunk (see DESIGN.md): dropless is invariant
    return cfg


def stage2(**kw):
    return te.train_config(zero_stage=2, reduce_bucket_size=BUCKET, tile_size=300, **kw)


def check_layouts(world):
    out = {}
    for tp, ep, sp, checkpointing in LAYOUTS[world]:
        topo = Topology(world, tp=tp, ep=ep, sp=sp)
        result = te.run(topo, stage2(), checkpointing, model_cfg=model_config(world, sp > 1))
        out[(tp, ep, sp, checkpointing)] = result if torch.distributed.get_rank() == 0 else None
    return out


@pytest.mark.parametrize("world", [4, 6])
def test_stage2_matches_single_process(world, request):
    results = request.getfixturevalue(f"world{world}").run(check_layouts, world)[0]
    references = {}
    for (tp, ep, sp, checkpointing), result in results.items():
        if (sp > 1) not in references:
            references[sp > 1] = te.run(Topology.single(), te.train_config(), model_cfg=model_config(world, sp > 1))
        assert_matches_reference(f"ZeRO-2 tp={tp} ep={ep} sp={sp} {checkpointing}", result, references[sp > 1])


def test_stage2_in_one_process_equals_stage1():
    one = te.run(Topology.single(), stage2(), steps=4)
    ref = te.run(Topology.single(), te.train_config(), steps=4)
    assert_matches_reference("ZeRO-2, one process", one, ref)


def save_then_continue(path, first, then):
    """3 steps in layout/stage ``first``, a checkpoint, 3 more in ``then`` from it: the 6 losses."""
    (tp, ep, stage), (tp2, ep2, stage2_) = first, then
    topo = Topology(4, tp=tp, ep=ep)
    engine = te.build(topo, te.train_config(zero_stage=stage, reduce_bucket_size=BUCKET))
    losses = [engine.train_step(te.rank_batches(s, topo))["loss"] for s in range(3)]
    model = dataclasses.asdict(te.model_config())
    saved = ckpt.save_checkpoint(path, 3, engine.model, engine.optimizer, topo, {"config": {"model": model}})
    topo2 = Topology(4, tp=tp2, ep=ep2)
    engine2 = te.build(topo2, te.train_config(zero_stage=stage2_, reduce_bucket_size=BUCKET))
    engine2.model.init_weights(seed=99)  # nothing of the fresh model survives the load
    ckpt.load_checkpoint(saved, engine2.model, engine2.optimizer, topo2, model)
    losses += [engine2.train_step(te.rank_batches(s, topo2))["loss"] for s in range(3, 6)]
    return losses


@pytest.mark.parametrize("first,then", [((2, 2, 2), (1, 4, 1)), ((1, 4, 1), (2, 2, 2))])
def test_checkpoints_move_between_stages_and_layouts(world4, tmp_path, first, then):
    engine = te.build(Topology.single(), te.train_config())
    want = [engine.train_step(te.micro_batches(s))["loss"] for s in range(6)]
    got = world4.run(save_then_continue, str(tmp_path / "ckpt"), first, then)[0]
    assert got == pytest.approx(want, rel=2e-5)
