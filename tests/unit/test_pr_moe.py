"""PR-MoE (a pyramid: experts per MoE layer) and Residual-MoE (a dense branch beside the experts,
mixed by a learned per-token coefficient) from DeepSpeed-MoE: what the layers compute, checked
against a loop written here, the config's refusals, and serving them with the engine."""

import random

import pytest
import torch
import torch.nn.functional as F

from tedmoe.config import ModelConfig, MoEConfig, load_run_config
from tedmoe.inference.engine import InferenceEngine
from tedmoe.model.transformer import GPTMoE
from tedmoe.moe.layer import MoE
from tedmoe.parallel.topology import Topology
from tests.unit.test_inference_engine import build, random_schedule


def pyramid_config(**kw):
    moe = MoEConfig(ffn_hidden_size=24, num_experts=4, top_k=2, activation="swiglu", residual=True, dropless=True)
    return ModelConfig(**{"vocab_size": 64, "hidden_size": 32, "num_layers": 3, "num_heads": 4, "max_seq_len": 64,
                          "moe_every": 1, "expert_counts": (2, 4, 8), "moe": moe, **kw})


def test_the_pyramid_gives_each_layer_its_expert_count():
    model = GPTMoE(pyramid_config(), Topology.single())
    assert [b.mlp.experts.w1.shape[0] for b in model.blocks] == [2, 4, 8]
    assert [b.mlp.router.weight.shape[0] for b in model.blocks] == [2, 4, 8]


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_residual_moe_mixes_the_dense_branch_by_the_learned_coefficient(activation):
    """y = softmax(coefficient(x))[0] * experts(x) + [1] * dense(x), against a loop over tokens."""
    torch.manual_seed(0)
    cfg = MoEConfig(ffn_hidden_size=12, num_experts=4, top_k=2, activation=activation, residual=True, dropless=True)
    layer = MoE(16, cfg, Topology.single())
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(10, 16)
    y, _ = layer(x)
    w = layer.experts
    act = (lambda a, b: F.silu(a) * b) if activation == "swiglu" else (lambda a, b: F.gelu(a))
    for s in range(10):
        probs = (x[s] @ layer.router.weight.t()).softmax(-1)
        top = probs.topk(2)
        gates = top.values / top.values.sum()
        moe = sum(g * (act(x[s] @ w.w1[e], x[s] @ w.w3[e] if w.w3 is not None else None) @ w.w2[e])
                  for g, e in zip(gates, top.indices))
        r = layer.residual
        dense = act(r.w1.weight @ x[s], r.w3.weight @ x[s] if r.w3 is not None else None) @ r.w2.weight.t()
        coef = (layer.coefficient.weight @ x[s] + layer.coefficient.bias).softmax(-1)
        torch.testing.assert_close(y[s], coef[0] * moe + coef[1] * dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("override,message", [
    ("model.expert_counts=[2, 4]", "model.expert_counts has 2 entries but the model has 4 MoE layers"),
    ("model.expert_counts=[2, 4, 3, 8]", r"model.expert_counts\[2\] \(block 3\): num_experts=3 is not divisible by ep=2"),
    ("model.expert_counts=[2, 1, 4, 4]", r"model.expert_counts\[1\] \(block 2\): top_k=2 exceeds num_experts=1"),
    ("model.expert_counts=[2, 0, 4, 4]", "model.expert_counts=.* is not allowed: it must be a list of values, each an "
                                          "integer >= 1"),
])
def test_bad_pyramids_are_one_line(override, message):
    with pytest.raises(ValueError, match=message):  # the default layout: tp 2, ep 2 on 4 ranks
        load_run_config(None, "default", [override]).validate(4)


def test_pyramid_and_residual_print_and_load_back():
    from tedmoe.config import dump_run_config

    cfg = load_run_config(None, "default", ["model.expert_counts=[2, 4, 4, 8]", "model.moe.residual=true"])
    text = dump_run_config(cfg)
    assert "expert_counts = [2, 4, 4, 8]" in text and "residual = true" in text
    cfg.validate(4)


def test_the_engine_serves_pyramid_residual_models():
    model = build(pyramid_config(qk_norm=True, num_kv_heads=2))
    engine = InferenceEngine(model, block_size=4, num_blocks=40)
    rng = random.Random(1)
    g = torch.Generator().manual_seed(2)
    seqs = {u: torch.randint(0, 64, (rng.randint(3, 25),), generator=g).tolist() for u in range(3)}
    assert random_schedule(engine, model, seqs, rng) > 3


def test_export_refuses_them_naming_the_setting(tmp_path):
    from tedmoe.interop import families

    with pytest.raises(ValueError, match=r"model.expert_counts \(PR-MoE's pyramid\): Mixtral has the same experts"):
        families.family_of(pyramid_config())
    with pytest.raises(ValueError, match=r"model.moe.residual \(Residual-MoE\)"):
        families.family_of(pyramid_config(expert_counts=()))
