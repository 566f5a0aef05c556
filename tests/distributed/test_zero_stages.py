"""ZeRO stages: stage 2 (gradients reduce-scattered bucket by bucket during the backward, never
kept whole) and stage 3 (parameters too: gathered per block before use, freed after) give the
single-process loss, gradients and 10-step curve in TP x EP x DP x SP layouts, with several
buckets per group, clipping on and the tiled step; a checkpoint written at one stage and layout
continues at another with the uninterrupted losses."""

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


def stage2(stage=2, **kw):
    return te.train_config(zero_stage=stage, reduce_bucket_size=BUCKET, tile_size=300, **kw)


def check_layouts(world, stage):
    out = {}
    for tp, ep, sp, checkpointing in LAYOUTS[world]:
        topo = Topology(world, tp=tp, ep=ep, sp=sp)
        result = te.run(topo, stage2(stage), checkpointing, model_cfg=model_config(world, sp > 1))
        out[(tp, ep, sp, checkpointing)] = result if torch.distributed.get_rank() == 0 else None
    return out


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("world", [4, 6])
def test_stage_matches_single_process(world, stage, request):
    results = request.getfixturevalue(f"world{world}").run(check_layouts, world, stage)[0]
    references = {}
    for (tp, ep, sp, checkpointing), result in results.items():
        if (sp > 1) not in references:
            references[sp > 1] = te.run(Topology.single(), te.train_config(), model_cfg=model_config(world, sp > 1))
        assert_matches_reference(f"ZeRO-{stage} tp={tp} ep={ep} sp={sp} {checkpointing}", result,
                                 references[sp > 1])


@pytest.mark.parametrize("stage", [2, 3])
def test_stage_in_one_process_equals_stage1(stage):
    one = te.run(Topology.single(), stage2(stage), steps=4)
    ref = te.run(Topology.single(), te.train_config(), steps=4)
    assert_matches_reference(f"ZeRO-{stage}, one process", one, ref)


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
    with engine2.optimizer.whole_parameters(loading=True):  # ZeRO-3 parameters hold no memory outside
        engine2.model.init_weights(seed=99)  # nothing of the fresh model survives the load
    ckpt.load_checkpoint(saved, engine2.model, engine2.optimizer, topo2, model)
    losses += [engine2.train_step(te.rank_batches(s, topo2))["loss"] for s in range(3, 6)]
    return losses


@pytest.mark.parametrize("first,then", [((2, 2, 2), (1, 4, 1)), ((1, 4, 1), (2, 2, 2)), ((2, 2, 3), (1, 4, 2)),
                                         ((1, 4, 1), (2, 2, 3)), ((1, 4, 3), (4, 1, 3)), ((4, 1, 2), (2, 2, 3)),
                                         ((2, 2, 3), (4, 1, 1))])
def test_checkpoints_move_between_stages_and_layouts(world4, tmp_path, first, then):
    engine = te.build(Topology.single(), te.train_config())
    want = [engine.train_step(te.micro_batches(s))["loss"] for s in range(6)]
    got = world4.run(save_then_continue, str(tmp_path / "ckpt"), first, then)[0]
    assert got == pytest.approx(want, rel=2e-5)


def stage3_residency():
    """One ZeRO-3 step in EP 2 x DP 4 (both groups sharded): what is whole when, and the ledger."""
    from tedmoe.parallel.ledger import LEDGER

    topo = Topology(4, tp=1, ep=2)
    engine = te.build(topo, stage2(3))
    stage3 = engine.optimizer.stage3
    live = lambda units: sum(u.param_buffer.untyped_storage().nbytes() for u in units)  # noqa: E731
    seen = []
    for block in engine.model.blocks:  # registered after the optimizer's hooks: runs after its gathers
        block.register_forward_pre_hook(lambda m, a: seen.append(live(stage3.units)))
    with LEDGER.capture() as ledger:
        engine.train_step(te.rank_batches(0, topo))
    whole = lambda units: sum(u.padded * u.param_buffer.element_size() for u in units if u.shards)  # noqa: E731
    sharded = [u for u in stage3.units if u.shards]
    # built on the meta device: each unit gets its values while every earlier one is already freed
    from tedmoe.model.transformer import GPTMoE
    from tedmoe.runtime.engine import Engine

    model = GPTMoE(te.model_config(), topo, device="meta")
    others_whole = []

    def materialize(params):
        only = {id(p) for p in params}
        others_whole.append(sum(p.untyped_storage().nbytes() for p in model.parameters()
                                if not p.is_meta and id(p) not in only))
        model.init_weights(seed=0, only=only)

    lazy = Engine(model, topo, stage2(3), materialize)
    eager = te.build(topo, stage2(3))
    same = [lazy.train_step(te.rank_batches(s, topo))["loss"] == eager.train_step(te.rank_batches(s, topo))["loss"]
            for s in range(2)]
    return {"between_steps": live(sharded), "seen": seen, "ledger": ledger.as_dict(), "lazy": (others_whole, same),
            "root": whole(stage3.root), "blocks": [whole(b) for b in stage3.blocks],
            "one_nth": all(u.param_shard.numel() * u.axis.size == u.padded for u in sharded),
            "units": {axis: [sum(u.shards and u.axis.name == axis for u in units)
                             for units in [stage3.root] + stage3.blocks] for axis in ("dsp", "edp")},
            "micro_batches": len(te.rank_batches(0, topo))}


def test_stage3_gathers_per_block_and_keeps_only_shards(world4):
    r = world4.run(stage3_residency)[0]
    assert r["between_steps"] == 0  # no whole parameter between steps
    others_whole, same = r["lazy"]
    assert len(others_whole) == 3 and not any(others_whole)  # root, block 0, block 1: one unit whole at a time
    assert same == [True, True]  # and the same model as one built whole
    assert r["one_nth"]  # each rank keeps 1/n of every unit (n: the unit's axis)
    blocks, root, mb = r["blocks"], r["root"], r["micro_batches"]
    assert len(blocks) == 2 and all(blocks) and root
    # in block 0: the root, block 0 and block 1 (prefetched); in block 1: the root and block 1
    assert r["seen"] == [root + blocks[0] + blocks[1], root + blocks[1]] * mb
    ledger, units = r["ledger"], r["units"]
    for axis in ("dsp", "edp"):
        per_block = sum(units[axis][1:])
        if not sum(units[axis]):
            continue
        assert ledger["fwd"][f"all_gather/{axis}"]["calls"] == mb * (units[axis][0] + per_block)
        assert ledger["bwd"][f"all_gather/{axis}"]["calls"] == mb * per_block
        assert ledger["bwd"][f"reduce_scatter/{axis}"]["calls"] == mb * sum(units[axis])
    assert not any(k.startswith("all_gather") for k in ledger["step"])  # the step updates shards only


OFFLOADED = [(2, 2, 1, 3, "disk"), (1, 2, 2, 2, "disk"), (1, 4, 1, 3, "cpu")]  # (tp, ep, sp, stage, offload)


def check_offloaded(path):
    out = {}
    for tp, ep, sp, stage, offload in OFFLOADED:
        topo = Topology(4, tp=tp, ep=ep, sp=sp)
        kw = {"offload": offload, "offload_path": path if offload == "disk" else None}
        engine = te.build(topo, stage2(stage, **kw), model_cfg=model_config(4, sp > 1))
        result = te.train_and_gather(engine, lambda step: te.rank_batches(step, topo), te.STEPS, te.MICRO_BATCHES)
        engine.optimizer.close()
        out[(tp, ep, sp, stage, offload)] = result if torch.distributed.get_rank() == 0 else None
    return out


def test_offloaded_states_match_single_process(world4, tmp_path):
    results = world4.run(check_offloaded, str(tmp_path))[0]
    references = {}
    for (tp, ep, sp, stage, offload), result in results.items():
        if (sp > 1) not in references:
            references[sp > 1] = te.run(Topology.single(), te.train_config(), model_cfg=model_config(4, sp > 1))
        assert_matches_reference(f"ZeRO-{stage} offload={offload} tp={tp} ep={ep} sp={sp}", result,
                                 references[sp > 1])
    assert not list(tmp_path.iterdir())  # every rank removed its files


def fp16_stages():
    """fp16 with dynamic loss scaling at stages 1, 2 and 3 in EP 2 x DP 4 (an overflow forced at
    step 2): the same losses, norms, skips and scales."""
    topo = Topology(4, tp=1, ep=2)
    out = {}
    for stage in (1, 2, 3):
        engine = te.build(topo, stage2(stage, precision="fp16", initial_loss_scale=1024.0, loss_scale_window=2))
        rows = []
        for step in range(5):
            if step == 2:
                engine.optimizer.loss_scale = 1e30  # the scaled backward overflows fp16
            r = engine.train_step(te.rank_batches(step, topo))
            if step == 2:
                engine.optimizer.loss_scale = 1024.0
            rows.append((r["loss"], r["grad_norm"], r["skipped"], r["loss_scale"]))
        out[stage] = rows
    return out


def test_fp16_loss_scaling_is_the_same_at_every_stage(world4):
    rows = world4.run(fp16_stages)[0]
    assert [r[2] for r in rows[1]] == [False, False, True, False, False]
    for stage in (2, 3):
        assert [r[2:] for r in rows[stage]] == [r[2:] for r in rows[1]]
        for a, b in zip(rows[1], rows[stage]):
            assert b[0] == pytest.approx(a[0], rel=1e-3)
            if not a[2]:
                assert b[1] == pytest.approx(a[1], rel=1e-2)
