"""Tensor-parallel layers against the full single-process layers: outputs, input grads and
weight grads (gathered to full shape), fp32, for TP in {1, 2, 4} on 4 ranks (DP = 4 / TP;
each DP rank checks its own shard of the global batch against the reference on that shard)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tedmoe.parallel import comm
from tedmoe.parallel.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                             vocab_parallel_cross_entropy)
from tedmoe.parallel.topology import Topology

TOL = {"rtol": 1e-5, "atol": 1e-6}


def _setup(tp, seed=0):
    topo = Topology(4, tp=tp)
    torch.manual_seed(seed)  # identical full weights and global batch on every rank
    return topo, topo.axis("tp"), topo.axis("dp")


def _shard(x, dp):
    return x.chunk(dp.size, 0)[dp.rank]


def check_linear_pairs(tp):
    topo, axis, dp = _setup(tp)
    fc1, fc2 = nn.Linear(8, 16), nn.Linear(16, 12)
    x_full = _shard(torch.randn(8, 5, 8), dp)
    w_out = _shard(torch.randn(8, 5, 12), dp)
    # reference: the full MLP on this DP shard
    x_ref = x_full.clone().requires_grad_(True)
    y_ref = fc2(F.gelu(fc1(x_ref)))
    (y_ref * w_out).sum().backward()
    # sharded: column-parallel then row-parallel, one all-reduce forward, one backward
    col, row = ColumnParallelLinear.from_full(fc1, axis), RowParallelLinear.from_full(fc2, axis)
    x = x_full.clone().requires_grad_(True)
    with comm.LEDGER.capture():
        y = row(F.gelu(col(x)))
        (y * w_out).sum().backward()
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    torch.testing.assert_close(col.full_weight(col.weight.grad), fc1.weight.grad, **TOL)
    torch.testing.assert_close(col.full_bias(col.bias.grad), fc1.bias.grad, **TOL)
    torch.testing.assert_close(row.full_weight(row.weight.grad), fc2.weight.grad, **TOL)
    torch.testing.assert_close(row.bias.grad, fc2.bias.grad, **TOL)
    assert torch.equal(col.full_weight(), fc1.weight) and torch.equal(row.full_weight(), fc2.weight)
    calls = {p: {k: v["calls"] for k, v in d.items()} for p, d in comm.LEDGER.as_dict().items()}
    assert calls == ({} if tp == 1 else {"fwd": {"all_reduce/tp": 1}, "bwd": {"all_reduce/tp": 1}})


def check_gathered_and_unsplit_variants(tp):
    topo, axis, dp = _setup(tp, seed=1)
    fc1, fc2 = nn.Linear(6, 8, bias=False), nn.Linear(8, 4)
    x_full = _shard(torch.randn(8, 6), dp)
    x_ref = x_full.clone().requires_grad_(True)
    h_ref = fc1(x_ref)
    y_ref = fc2(h_ref)
    (y_ref.square().sum() + h_ref.sum()).backward()
    col = ColumnParallelLinear.from_full(fc1, axis, gather_output=True)  # full [N, 8] on every rank
    row = RowParallelLinear.from_full(fc2, axis, input_is_parallel=False)  # splits its input itself
    x = x_full.clone().requires_grad_(True)
    h = col(x)
    y = row(h)
    (y.square().sum() + h.sum()).backward()
    torch.testing.assert_close(h, h_ref, **TOL)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    torch.testing.assert_close(col.full_weight(col.weight.grad), fc1.weight.grad, **TOL)
    torch.testing.assert_close(row.full_weight(row.weight.grad), fc2.weight.grad, **TOL)
    assert col.bias is None


def check_embedding(tp):
    topo, axis, dp = _setup(tp, seed=2)
    full = nn.Embedding(16, 6)
    ids = _shard(torch.randint(0, 16, (8, 7)), dp)
    ids[0, :4] = torch.tensor([0, 3, 4, 15])  # both ends of every shard's range
    grad = torch.randn(ids.shape + (6,))
    ref = full(ids)
    ref.backward(grad)
    emb = VocabParallelEmbedding.from_full(full, axis)
    out = emb(ids)
    out.backward(grad)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(emb.full_weight(emb.weight.grad), full.weight.grad, **TOL)
    assert torch.equal(emb.full_weight(), full.weight)


def check_cross_entropy(tp):
    topo, axis, dp = _setup(tp, seed=3)
    logits_full = _shard(torch.randn(16, 20) * 4, dp)
    target = _shard(torch.randint(0, 20, (16,)), dp)
    target[:3] = torch.tensor([0, 19, -100])  # first and last class, and an ignored token
    weights = torch.rand(target.shape)
    ref_in = logits_full.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_in, target, reduction="none")
    (ref * weights).sum().backward()
    local = logits_full.chunk(axis.size, -1)[axis.rank].clone().requires_grad_(True)
    with comm.LEDGER.capture():
        loss = vocab_parallel_cross_entropy(local, target, axis)
        (loss * weights).sum().backward()
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(local.grad, ref_in.grad.chunk(axis.size, -1)[axis.rank], **TOL)
    n = len(target)
    expect = {} if tp == 1 else {"fwd": {"all_reduce/tp": {  # max, then [target logit; sum exp]
        "calls": 2, "payload": 4 * n + 8 * n,
        "bytes": comm.sent_bytes("all_reduce", tp, n, 4) + comm.sent_bytes("all_reduce", tp, 2 * n, 4)}}}
    assert comm.LEDGER.as_dict() == expect
    # the mean loss the model will use, through autograd
    local.grad = None
    ref_in.grad = None
    F.cross_entropy(ref_in, target).backward()
    valid = (target != -100).sum()
    (vocab_parallel_cross_entropy(local, target, axis).sum() / valid).backward()
    torch.testing.assert_close(local.grad, ref_in.grad.chunk(axis.size, -1)[axis.rank], **TOL)


def check_bad_shapes(tp):
    topo, axis, dp = _setup(tp)
    for build, msg in [
        (lambda: ColumnParallelLinear(8, 10, axis), f"out_features=10 is not divisible by tp={tp}"),
        (lambda: RowParallelLinear(6, 8, axis), f"in_features=6 is not divisible by tp={tp}"),
        (lambda: VocabParallelEmbedding(50257, 8, axis), f"num_embeddings (vocabulary size)=50257 is not divisible by tp={tp}"),
    ]:
        with pytest.raises(ValueError) as err:
            build()
        assert msg in str(err.value) and f"use a multiple of {tp}" in str(err.value)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tensor_parallel_layers_match_full_layers(world4, tp):
    for check in (check_linear_pairs, check_gathered_and_unsplit_variants, check_embedding, check_cross_entropy):
        world4.run(check, tp)


def test_bad_shapes_name_the_fix(world4):
    world4.run(check_bad_shapes, 4)
