"""What routing means, computed here without the library's routing code: a loop-based MoE (per
token, per choice, in priority order), the capacity formula, and both load-balancing losses."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from tedmoe.config import MoEConfig
from tedmoe.moe.layer import MoE
from tedmoe.moe.router import Router
from tedmoe.parallel.topology import Topology


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


@pytest.mark.parametrize("cfg,tokens,training,want", [
    (dict(num_experts=4, top_k=2, capacity_factor=1.25), 10, True, 7),  # ceil(6.25) = 7, floor would be 6
    (dict(num_experts=4, top_k=2, capacity_factor=1.0), 12, True, 6),  # exact
    (dict(num_experts=3, top_k=1, capacity_factor=0.3, min_capacity=0), 7, True, 1),  # ceil(0.7) = 1
    (dict(num_experts=3, top_k=2, capacity_factor=1.1, min_capacity=0), 10, True, 8),  # ceil(7.33) = 8
    (dict(num_experts=4, top_k=2, capacity_factor=1.25, min_capacity=8), 10, True, 8),  # the floor
    (dict(num_experts=4, top_k=2, capacity_factor=1.0, eval_capacity_factor=2.0), 10, False, 10),
    (dict(num_experts=4, top_k=2, capacity_factor=1.0, eval_capacity_factor=2.0), 10, True, 5),
])
def test_capacity_formula(cfg, tokens, training, want):
    config = MoEConfig(**cfg)
    assert config.capacity(tokens, training) == want
    router = Router(4, config).train(training)
    assert router(torch.randn(tokens, 4)).capacity == want


# Logits are the inputs themselves (router weight = identity): 4 tokens, 3 experts, top-2.
LOGITS = [[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.5], [0.5, 0.2, 0.1]]


def test_both_load_balancing_conventions_by_hand():
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in LOGITS]
    # choices (by probability): token 0 -> (0, 1), 1 -> (1, 2), 2 -> (2, 0), 3 -> (0, 1)
    mean_p = [sum(p[e] for p in probs) / 4 for e in range(3)]
    all_f = [3 / 8, 3 / 8, 2 / 8]  # expert 0: tokens 0, 2, 3; expert 1: 0, 1, 3; expert 2: 1, 2
    switch_f = [2 / 4, 1 / 4, 1 / 4]  # first choices: 0, 1, 2, 0
    for kind, f in (("all_choices", all_f), ("switch", switch_f)):
        cfg = MoEConfig(num_experts=3, top_k=2, capacity_factor=2.0, aux_loss_type=kind)
        router = Router(3, cfg)
        with torch.no_grad():
            router.weight.copy_(torch.eye(3))
        out = router(torch.tensor(LOGITS))
        assert out.expert_SK.tolist() == [[0, 1], [1, 2], [2, 0], [0, 1]]
        want = 3 * sum(fe * pe for fe, pe in zip(f, mean_p))
        assert out.aux_loss.item() == pytest.approx(want, rel=1e-6), kind
    assert 3 * sum(a * p for a, p in zip(all_f, mean_p)) != pytest.approx(3 * sum(a * p for a, p in zip(switch_f, mean_p)))


def test_conventions_agree_for_top1():
    x = torch.randn(32, 4)
    losses = []
    for kind in ("all_choices", "switch"):
        router = Router(4, MoEConfig(num_experts=4, top_k=1, aux_loss_type=kind))
        with torch.no_grad():
            router.weight.copy_(torch.arange(16.0).view(4, 4).sin())
        losses.append(router(x).aux_loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-7)


def test_checkpoint_recomputes_draw_the_same_numbers():
    """Jitter and random selection under plain and CAC checkpointing: gradients bit-identical to
    no checkpointing (the recompute draws what the forward drew)."""
    from tedmoe.config import ModelConfig
    from tedmoe.model.transformer import GPTMoE
    from tedmoe.parallel.activation_checkpoint import apply_checkpointing

    moe = MoEConfig(ffn_hidden_size=16, num_experts=4, top_k=2, capacity_factor=0.5,
                    drop_policy="random", router_jitter=0.3, min_capacity=1)
    cfg = ModelConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, ffn_hidden_size=32, max_seq_len=8,
                      moe_every=1, moe=moe)
    ids = torch.randint(0, 32, (3, 8), generator=torch.Generator().manual_seed(0))
    grads = {}
    for mode in ("none", "plain", "cac"):
        model = GPTMoE(cfg, Topology.single())
        model.init_weights(0)
        apply_checkpointing(model, mode)
        model.token_context.step, model.token_context.first_sequence = 5, 7
        model(ids, ids.roll(1, 1))[0].backward()
        grads[mode] = [p.grad.clone() for p in model.parameters()]
    for mode in ("plain", "cac"):
        assert all(torch.equal(a, b) for a, b in zip(grads[mode], grads["none"])), mode
