"""Ulysses sequence parallelism: attention against one process on the full sequence, the
all-to-all round trip, and the whole model in layouts that combine SP with TP and EP."""

import dataclasses

import pytest
import torch

from tedmoe.config import ModelConfig, MoEConfig
from tedmoe.model.attention import Attention
from tedmoe.parallel import comm
from tedmoe.parallel.ulysses import heads_to_seq, seq_to_heads
from tedmoe.parallel.sharding import load_full_state_dict
from tedmoe.parallel.topology import Topology
from tests.distributed.harness import assert_matches_reference
from tests.distributed import test_engine as te

TOL = {"rtol": 1e-5, "atol": 1e-6}


def attn_config(kv_heads):
    return ModelConfig(vocab_size=64, hidden_size=64, num_layers=1, num_heads=8, num_kv_heads=kv_heads,
                       ffn_hidden_size=64, max_seq_len=32)


def check_attention(sp, kv_heads):
    topo = Topology(4, sp=sp)
    axis = topo.axis("sp")
    cfg = attn_config(kv_heads)
    torch.manual_seed(0)
    ref = Attention(cfg, Topology.single())
    layer = Attention(cfg, topo)
    load_full_state_dict(layer, ref.state_dict(), topo)
    g = torch.Generator().manual_seed(topo.coord("dp"))
    x_full, w_full = torch.randn(2, 32, 64, generator=g), torch.randn(2, 32, 64, generator=g)
    x_ref = x_full.clone().requires_grad_(True)
    (ref(x_ref) * w_full).sum().backward()
    chunk = lambda t: t.chunk(sp, 1)[axis.rank]  # noqa: E731
    x = chunk(x_full).clone().requires_grad_(True)
    y = layer(x)
    (y * chunk(w_full)).sum().backward()
    with torch.no_grad():
        torch.testing.assert_close(y, chunk(ref(x_full)), **TOL)
    torch.testing.assert_close(x.grad, chunk(x_ref.grad), **TOL)
    for (name, p), q in zip(layer.named_parameters(), ref.parameters()):  # weights are replicated over sp
        # sums of 64 products per element: allow round-off relative to the tensor's own scale
        torch.testing.assert_close(comm.all_reduce(p.grad, axis), q.grad, rtol=1e-5, atol=1e-6 * q.grad.abs().max(),
                                   msg=lambda m: f"{name}: {m}")
    # the exchange and its inverse are the identity, forward and backward
    z = torch.randn(2, 32 // sp, 8, 4, requires_grad=True)
    back = heads_to_seq(seq_to_heads(z, axis), axis)
    assert torch.equal(back, z)
    back.backward(z.detach() * 3)
    assert torch.equal(z.grad, z.detach() * 3)


@pytest.mark.parametrize("sp,kv_heads", [(2, 8), (4, 8), (2, 2), (4, 2), (4, 1)])
def test_ulysses_attention_matches_full_sequence(world4, sp, kv_heads):
    world4.run(check_attention, sp, kv_heads)


def sp_model_config():
    cfg = te.model_config()
    return dataclasses.replace(cfg, num_heads=8, num_kv_heads=2, moe=dataclasses.replace(cfg.moe, dropless=True))


def run_sp(topology):
    return te.run(topology, te.train_config(), model_cfg=sp_model_config())


LAYOUTS = {4: [(2, 1, 2), (2, 1, 4), (4, 1, 1)], 8: [(2, 2, 2), (4, 2, 1), (2, 1, 2)]}  # (sp, tp, ep)


def check_sp_layouts(world):
    out = {}
    for sp, tp, ep in LAYOUTS[world]:
        result = run_sp(Topology(world, tp=tp, ep=ep, sp=sp))
        out[(sp, tp, ep)] = result if torch.distributed.get_rank() == 0 else None
    return out


@pytest.fixture(scope="module")
def reference():
    return run_sp(Topology.single())


@pytest.mark.parametrize("world", [4, 8])
def test_whole_model_with_sequence_parallelism(world, request, reference):
    results = request.getfixturevalue(f"world{world}").run(check_sp_layouts, world)[0]
    ref_curve = reference[2]
    assert ref_curve[-1][0] < ref_curve[0][0] - 0.5
    for (sp, tp, ep), result in results.items():
        assert_matches_reference(f"sp={sp} tp={tp} ep={ep} dp={world // (sp * tp)}", result, reference)


def test_bad_sequence_parallel_settings():
    with pytest.raises(ValueError, match="num_heads / tp = 4 heads per TP rank is not divisible by sp=8"):
        attn_config(8).__class__(num_heads=8, hidden_size=64).validate(tp=2, sp=8)
    with pytest.raises(ValueError, match="kv heads per TP rank and sp=4: one must divide the other"):
        ModelConfig(num_heads=12, num_kv_heads=6, hidden_size=96, moe=MoEConfig()).validate(sp=4)
    from tedmoe.config import preset

    cfg = preset("tiny")
    cfg.parallel.sp, cfg.seq_len = 4, 30
    with pytest.raises(ValueError, match="seq_len=30 is not divisible by sp=4"):
        cfg.validate(4)
