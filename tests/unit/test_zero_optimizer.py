"""The ZeRO-1 optimizer and the engine in one process: clipping + AdamW against torch, the tiled step,
fp16, bf16, the lr schedule, bad train settings."""

import copy

import pytest
import torch

from tedmoe.config import TrainConfig
from tedmoe.parallel.topology import Topology
from tests.distributed.test_engine import build, micro_batches, model_config
from tedmoe.model.transformer import GPTMoE, count_parameters


def _engine(**kw):
    cfg = TrainConfig(**{"lr": 1e-2, "warmup_steps": 0, "max_steps": 10, "grad_clip": 0.05, **kw})
    return build(Topology.single(), cfg)


def test_clipping_and_adamw_match_torch():
    engine = _engine(weight_decay=0.1)
    ref = copy.deepcopy(engine.model)
    params = list(ref.parameters())
    torch_opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=1e-2, betas=engine.config.betas, eps=engine.config.eps)
    for step in range(3):
        mbs = micro_batches(step)
        out = engine.train_step(mbs)
        for ids, targets in mbs:
            (ref(ids, targets)[0] / len(mbs)).backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 0.05)
        assert out["grad_norm"] == pytest.approx(norm.item(), rel=1e-5) and norm > 0.05  # clipping acts
        for group in torch_opt.param_groups:
            group["lr"] = engine.optimizer.lr_at(step + 1)
        torch_opt.step()
        torch_opt.zero_grad()
    for (name, p), q in zip(engine.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_tiled_step_is_bit_identical():
    engines = [_engine(tile_size=None), _engine(tile_size=37), _engine(tile_size=1 << 30)]
    for step in range(4):
        for e in engines:
            e.train_step(micro_batches(step))
    for e in engines[1:]:
        for p, q in zip(engines[0].model.parameters(), e.model.parameters()):
            assert torch.equal(p, q)
        for g0, g in zip(engines[0].optimizer.groups, e.optimizer.groups):
            assert torch.equal(g0.exp_avg_sq, g.exp_avg_sq) and torch.equal(g0.master, g.master)


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_zero2_and_3_keep_no_whole_gradient_and_step_like_zero1(precision, stage):
    """Stages 2 and 3 in one process: the same updates as stage 1 (fp32: to rounding; the buckets
    sum the micro-batches in another order), every ``p.grad`` freed once its bucket is sent, and
    the only gradient storage the shard-sized fp32 sum."""
    one = _engine(precision=precision, initial_loss_scale=1024.0)
    two = _engine(precision=precision, initial_loss_scale=1024.0, zero_stage=stage, reduce_bucket_size=500,
                  tile_size=77)
    numel = sum(p.numel() for p in two.model.parameters())
    for step in range(3):
        a, b = one.train_step(micro_batches(step)), two.train_step(micro_batches(step))
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5 if precision == "fp32" else 2e-2)
        assert b["loss_scale"] == a["loss_scale"]
        assert all(p.grad is None for p in two.model.parameters())
    for g in two.optimizer.groups:
        assert not hasattr(g, "grad_buffer") and g.grad_shard.numel() <= g.padded
        if stage == 2:
            assert g.buckets == -(-sum(p.numel() for p in g.params) // 500)
        else:  # one unit per block and axis (and the root), each one bucket
            assert g.buckets == (1 if g.params else 0)
    if stage == 3:
        assert len(two.optimizer.groups) == 2 * (1 + len(two.model.blocks))
    assert sum(g.grad_shard.numel() for g in two.optimizer.groups) < numel + 1000
    if precision == "fp32":
        for p, q in zip(one.model.parameters(), two.model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_zero2_needs_micro_batch_done_between_backwards():
    engine = _engine(zero_stage=2, reduce_bucket_size=500)
    (ids, targets), = micro_batches(0)[:1]
    engine.model(ids, targets)[0].backward()
    with pytest.raises(RuntimeError, match="call the optimizer's micro_batch_done"):
        engine.model(ids, targets)[0].backward()


def test_fp16_overflow_skips_the_step_and_lowers_the_scale():
    engine = _engine(precision="fp16", initial_loss_scale=1024.0, loss_scale_window=2)
    assert engine.model.embed.weight.dtype == torch.float16
    before = [p.detach().clone() for p in engine.model.parameters()]
    engine.optimizer.loss_scale = 1e30  # the scaled backward overflows fp16
    out = engine.train_step(micro_batches(0))
    assert out["skipped"] and out["loss_scale"] == 5e29
    assert all(torch.equal(a, b) for a, b in zip(before, engine.model.parameters()))
    assert engine.optimizer.step_count == 0
    engine.optimizer.loss_scale = 1024.0
    outs = [engine.train_step(micro_batches(s)) for s in range(4)]
    assert not any(o["skipped"] for o in outs) and engine.optimizer.step_count == 4
    assert outs[-1]["loss_scale"] == 4096.0  # doubled after every window of 2 good steps
    assert outs[-1]["loss"] < outs[0]["loss"]


def test_bf16_trains():
    engine = _engine(precision="bf16", grad_clip=1.0)
    assert engine.model.blocks[1].mlp.experts.w1.dtype == torch.bfloat16
    assert engine.optimizer.groups[1].master.dtype == torch.float32
    losses = [engine.train_step(micro_batches(s))["loss"] for s in range(10)]
    assert losses[-1] < losses[0] - 0.3


def test_nonfinite_loss_in_fp32_stops_with_the_step():
    engine = _engine()
    with torch.no_grad():
        engine.model.head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="gradient norm is nan at step 1"):
        engine.train_step(micro_batches(0))


def test_parameter_counts():
    cfg = model_config()
    counts = count_parameters(cfg)
    model = GPTMoE(cfg, Topology.single())
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    expert = 2 * 4 * 32 * 32  # one MoE block: w1 and w2 of 4 experts, 32 x 32
    assert counts["expert"] == expert
    assert counts["active_per_token"] == counts["total"] - expert + expert * 2 // 4


@pytest.mark.parametrize("change,message", [
    ({"precision": "fp8"}, "train.precision='fp8' is not allowed: it must be one of 'fp32', 'bf16', 'fp16'"),
    ({"tile_size": 0}, "train.tile_size=0 is not allowed: it must be an integer >= 1"),
    ({"checkpointing": "always"}, "train.checkpointing='always' is not allowed: it must be one of 'none'"),
    ({"grad_clip": 0.0}, "train.grad_clip=0.0 is not allowed: it must be a finite number > 0"),
    ({"warmup_steps": 20, "max_steps": 10}, "warmup_steps=20 must be between 0 and max_steps=10"),
    ({"zero_stage": 4}, r"train.zero_stage=4 is not allowed: it must be an integer in \[1, 3\]"),
    ({"offload": "disk", "offload_path": "/tmp", "tile_size": None},
     "train.offload='disk' streams the optimizer step tile by tile; set train.tile_size"),
    ({"reduce_bucket_size": 0}, "train.reduce_bucket_size=0 is not allowed: it must be an integer >= 1"),
])
def test_bad_train_config(change, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**change).validate()


def test_lr_schedule_warmup_then_cosine():
    opt = _engine(lr=1.0, warmup_steps=4, max_steps=12, min_lr_ratio=0.1).optimizer
    assert [opt.lr_at(s) for s in (1, 2, 4)] == [0.25, 0.5, 1.0]
    assert opt.lr_at(8) == pytest.approx(0.55)  # half-way through the decay: (1 + 0.1) / 2
    assert opt.lr_at(12) == pytest.approx(0.1) and opt.lr_at(50) == pytest.approx(0.1)


def test_shard_flags_kept_as_runs_equal_the_per_element_flags():
    """Weight decay and norm flags are kept as true ranges of the shard (not a byte per element):
    every slice equals the flags built element by element, for every rank, axis size and bucketing."""
    import itertools
    from types import SimpleNamespace

    from tedmoe.runtime.zero_optimizer import FlatShard
    from tedmoe.runtime.zero_stages import BucketedShard

    shapes = [(7, 5), (13,), (3, 4, 2), (1,), (50,), (9, 9)]
    for n, bucket in itertools.product([1, 2, 3, 4], [6, 25, 1000]):
        for r in range(n):
            params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
            axis, tp = SimpleNamespace(size=n, rank=r, name="dsp"), SimpleNamespace(size=1, rank=0)
            for shard in (FlatShard(params, axis, tp), BucketedShard(params, axis, tp, bucket)):
                flags = torch.cat([torch.full((p.numel(),), p.dim() >= 2) for p in params])
                ref = shard.own(torch.nn.functional.pad(flags, (0, shard.padded - flags.numel())))
                for a, length in itertools.product(range(0, shard.shard, 7), (1, 11, shard.shard)):
                    assert torch.equal(shard.decay[a:a + length], ref[a:a + length]), (n, r, bucket, a)
