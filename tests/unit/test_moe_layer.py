"""The single-process MoE layer against per-token loops written here without the library's
routing code (the definition: each token, each choice, in priority order, with capacity)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from tedmoe.config import MoEConfig
from tedmoe.moe.layer import MoE
from tedmoe.parallel.topology import Topology

TOL = {"rtol": 1e-5, "atol": 1e-6}


def naive_moe(layer, x_SH):
    """y_s = sum over kept choices of gate * expert_e(x_s), one token at a time."""
    routing = layer.router(x_SH)
    ex = layer.experts
    rows = []
    for s in range(x_SH.shape[0]):
        y = torch.zeros_like(x_SH[s])
        for k in range(routing.expert_SK.shape[1]):
            if routing.slot_SK[s, k] >= 0:
                e = routing.expert_SK[s, k]
                h = x_SH[s] @ ex.w1[e]
                h = F.silu(h) * (x_SH[s] @ ex.w3[e]) if ex.w3 is not None else F.gelu(h)
                y = y + routing.gate_SK[s, k] * (h @ ex.w2[e])
        rows.append(y)
    return torch.stack(rows), routing


@pytest.mark.parametrize("k,dropless,activation", list(itertools.product((1, 2, 3), (False, True), ("gelu", "swiglu"))))
def test_layer_equals_per_token_loop(k, dropless, activation):
    torch.manual_seed(0)
    cfg = MoEConfig(ffn_hidden_size=12, num_experts=4, top_k=k, capacity_factor=0.6,
                    min_capacity=1, dropless=dropless, activation=activation)
    layer = MoE(8, cfg, Topology.single())
    x = torch.randn(3, 10, 8)
    r = torch.randn(3, 10, 8)
    xa = x.clone().requires_grad_(True)
    y, stats = layer(xa)
    (y * r).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    xb = x.clone().requires_grad_(True)
    y_ref, routing = naive_moe(layer, xb.reshape(-1, 8))
    (y_ref.view_as(y) * r).sum().backward()
    torch.testing.assert_close(y, y_ref.view_as(y), **TOL)
    torch.testing.assert_close(xa.grad, xb.grad, **TOL)
    for n, p in layer.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, **TOL, msg=lambda m: f"{n}: {m}")
    assert (stats.drop_fraction > 0) == (not dropless)  # capacity 0.6 really drops
    assert stats.tokens_per_expert.sum().item() == routing.expert_SK.numel() - routing.num_dropped.item()


def test_dropped_tokens_give_zero():
    cfg = MoEConfig(ffn_hidden_size=8, num_experts=2, top_k=1, capacity_factor=0.25, min_capacity=1)
    layer = MoE(4, cfg, Topology.single())
    x = torch.randn(8, 4)
    y, _ = layer(x)
    dropped = layer.router(x).slot_SK[:, 0] < 0
    assert dropped.sum() >= 4 and torch.all(y[dropped] == 0) and torch.all(y[~dropped].abs().sum(-1) > 0)


@pytest.mark.parametrize("change,message", [
    ({"top_k": 5}, "top_k=5 exceeds num_experts=4"),
    ({"capacity_factor": 0}, "capacity_factor=0 is not allowed: it must be a finite number > 0"),
])
def test_layer_validates_config_first(change, message):
    with pytest.raises(ValueError, match=message):
        MoE(64, MoEConfig(num_experts=4, **change), Topology.single())


def loop_moe(x, W, w1, w2, top_k, capacity_factor, min_capacity, drop_policy, dropless, normalize):
    """The definition, one token and one choice at a time (float64 Python loops over the pairs)."""
    S, E = x.shape[0], W.shape[0]
    probs = torch.softmax(x.double() @ W.double().t(), dim=-1).tolist()
    choices = [sorted(range(E), key=lambda e: -p[e])[:top_k] for p in probs]
    gates = []
    for s in range(S):
        g = [probs[s][e] for e in choices[s]]
        total = sum(g)
        gates.append([v / total for v in g] if normalize and top_k > 1 else g)
    pairs = [(s, c) for c in range(top_k) for s in range(S)]  # first choices of every token first
    if drop_policy == "probs":
        pairs = sorted(pairs, key=lambda p: -gates[p[0]][p[1]])
    capacity = max(min_capacity, math.ceil(top_k * capacity_factor * S / E))
    kept, count = set(), [0] * E
    for s, c in pairs:
        e = choices[s][c]
        if dropless or count[e] < capacity:
            kept.add((s, c))
            count[e] += 1
    y = torch.zeros(S, x.shape[1], dtype=torch.float64)
    for s, c in sorted(kept):
        e = choices[s][c]
        y[s] += gates[s][c] * (F.gelu(x[s].double() @ w1[e].double()) @ w2[e].double())
    return y, count, S * top_k - len(kept)


CASES = list(itertools.product((1, 2), ((0.5, False), (1.0, False), (1.25, False), (1.0, True)), ("position", "probs")))


@pytest.mark.parametrize("k,capacity,policy", CASES)
def test_layer_equals_the_loop_definition(k, capacity, policy):
    cf, dropless = capacity
    torch.manual_seed(3)
    S, H, E, F_ = 23, 6, 5, 7
    cfg = MoEConfig(ffn_hidden_size=F_, num_experts=E, top_k=k, capacity_factor=cf,
                    min_capacity=1, drop_policy=policy, dropless=dropless)
    layer = MoE(H, cfg, Topology.single())
    x = torch.randn(S, H)
    with torch.no_grad():
        y, stats = layer(x)
    want_y, want_count, want_dropped = loop_moe(x, layer.router.weight, layer.experts.w1, layer.experts.w2, k, cf,
                                                1, policy, dropless, True)
    torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-6)
    assert stats.tokens_per_expert.tolist() == want_count
    assert stats.drop_fraction.item() == pytest.approx(want_dropped / (S * k))
    if dropless or cf == 0.5:  # the cases do exercise drops
        assert (want_dropped > 0) == (not dropless)
