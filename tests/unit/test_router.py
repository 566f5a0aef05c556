"""The router: top-k, capacity (the formula, computed by hand), overflow policies, noise, both
load-balancing conventions, and its config checks."""

import math

import pytest
import torch

from tedmoe.config import MoEConfig
from tedmoe.moe.router import Router, assign_slots


def _router(**kw):
    cfg = MoEConfig(**{"num_experts": 2, "top_k": 1, "min_capacity": 0, **kw})
    r = Router(2, cfg)
    with torch.no_grad():
        r.weight.copy_(torch.eye(2) if cfg.num_experts == 2 else torch.zeros(cfg.num_experts, 2))
    return r


# logits = x: tokens 0..5 prefer expert 0 (with these margins), tokens 6 and 7 prefer expert 1
MARGINS = [0.1, 2.0, 0.3, 3.0, 0.2, 1.0]
X = torch.tensor([[m, 0.0] for m in MARGINS] + [[0.0, 1.0], [0.0, 2.0]])


@pytest.mark.parametrize("num_experts,k", [(4, 1), (4, 2), (8, 2), (8, 3)])
def test_uniform_router_aux_loss_is_one(num_experts, k):
    r = _router(num_experts=num_experts, top_k=k)
    out = r(torch.randn(32, 2))
    assert out.aux_loss.item() == pytest.approx(1.0, abs=1e-6)
    assert out.z_loss.item() == pytest.approx(math.log(num_experts) ** 2, rel=1e-6)


def test_overflow_position_policy_keeps_first_tokens():
    out = _router(capacity_factor=1.0)(X)  # C = ceil(1 * 1.0 * 8 / 2) = 4
    assert out.capacity == 4 and out.num_dropped.item() == 2
    assert out.slot_SK[:, 0].tolist() == [0, 1, 2, 3, -1, -1, 0, 1]
    assert out.tokens_per_expert_E.tolist() == [4, 2]


def test_overflow_probs_policy_keeps_most_confident():
    out = _router(capacity_factor=1.0, drop_policy="probs")(X)
    kept = [i for i in range(6) if out.slot_SK[i, 0] >= 0]
    assert out.num_dropped.item() == 2 and kept == [1, 2, 3, 5]  # margins 2.0, 0.3, 3.0, 1.0 beat 0.1 and 0.2
    assert out.slot_SK[3, 0].item() == 0 and out.slot_SK[1, 0].item() == 1  # highest probability first


def test_overflow_top2_drops_second_choices_first():
    out = _router(top_k=2, capacity_factor=0.5)(X)  # C = ceil(2 * 0.5 * 8 / 2) = 4; 16 pairs, 8 slots
    assert out.capacity == 4 and out.num_dropped.item() == 8
    assert out.slot_SK[:, 0].tolist() == [0, 1, 2, 3, -1, -1, 0, 1]  # first choices by position
    assert out.slot_SK[:, 1].tolist() == [2, 3, -1, -1, -1, -1, -1, -1]  # expert 1's leftover slots


def test_random_token_selection_is_seeded_and_reproducible():
    x = torch.randn(64, 2)
    a, b = _router(capacity_factor=0.5, drop_policy="random")(x), _router(capacity_factor=0.5, drop_policy="random")(x)
    c = _router(capacity_factor=0.5, drop_policy="random", router_seed=7)(x)
    assert torch.equal(a.slot_SK, b.slot_SK)
    assert not torch.equal(a.slot_SK, c.slot_SK)
    assert a.num_dropped.item() == c.num_dropped.item() == 64 - a.tokens_per_expert_E.sum().item() > 0
    pos = _router(capacity_factor=0.5)(x)
    assert not torch.equal(a.slot_SK >= 0, pos.slot_SK >= 0)


def test_dropless_keeps_everything_and_capacity_bounds():
    out = _router(dropless=True)(X)
    assert out.capacity is None and out.num_dropped.item() == 0
    assert out.tokens_per_expert_E.tolist() == [6, 2] and out.slot_SK[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1]
    r = _router(capacity_factor=1.0, eval_capacity_factor=2.0, min_capacity=5)
    assert r(X).capacity == 5  # min_capacity wins over ceil(8 / 2) = 4
    r.eval()
    assert r(X).capacity == 8 and r(X).num_dropped.item() == 0


def test_noise_is_seeded_and_training_only():
    x = torch.randn(200, 2)
    for kw in ({"gumbel_noise": True}, {"router_jitter": 0.5}):
        clean = _router(dropless=True)(x).expert_SK
        n1, n2 = _router(dropless=True, **kw)(x).expert_SK, _router(dropless=True, **kw)(x).expert_SK
        assert torch.equal(n1, n2) and not torch.equal(n1, clean)
        r = _router(dropless=True, **kw)
        r.eval()
        assert torch.equal(r(x).expert_SK, clean)


def test_assign_slots_orders_by_priority():
    slot, count = assign_slots(torch.tensor([1, 0, 1, 1, 0]), torch.tensor([5.0, 1.0, 0.0, 2.0, 0.5]), 3)
    assert slot.tolist() == [2, 1, 0, 1, 0] and count.tolist() == [2, 3, 0]


@pytest.mark.parametrize("change,tp,ep,message", [
    ({"num_experts": 6}, 1, 4, "num_experts=6 is not divisible by ep=4; make num_experts a multiple of 4"),
    ({"ffn_hidden_size": 100}, 8, 1, "ffn_hidden_size=100 is not divisible by tp=8; make it a multiple of 8 (e.g. 104)"),
    ({"top_k": 9}, 1, 1, "top_k=9 exceeds num_experts=8; set top_k <= 8 or add experts"),
    ({"capacity_factor": 0.0}, 1, 1, "capacity_factor=0.0 is not allowed: it must be a finite number > 0"),
    ({"capacity_factor": -1.0}, 1, 1, "capacity_factor=-1.0 is not allowed: it must be a finite number > 0"),
    ({"eval_capacity_factor": 0.0}, 1, 1, "eval_capacity_factor=0.0 is not allowed: it must be a finite number > 0"),
    ({"drop_policy": "oldest"}, 1, 1, "drop_policy='oldest' is not allowed: it must be one of 'position'"),
    ({"gumbel_noise": True}, 1, 1, "gumbel_noise applies to top-1 routing only"),
])
def test_bad_moe_config_names_the_fix(change, tp, ep, message):
    with pytest.raises(ValueError) as err:
        MoEConfig(**change).validate(tp, ep)
    assert message in str(err.value)


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
