"""The TED MoE layer against the single-process layer, for every layout, k, DTD and mode.

Layouts (TP, EP, DP) on worlds of 2, 4 and 8 ranks. Each DP rank runs its own shard of the
global batch; the reference is the single-process layer on that shard. Expert gradients
gathered to full shape must equal the sum of the reference gradients over the shards of the
rank's EP group (those are the tokens its experts saw; the EDP reduction is the engine's).
"""

import itertools

import pytest
import torch

from tedmoe.config import MoEConfig
from tedmoe.moe.dispatch_comm import capacity_comm
from tedmoe.moe.layer import MoE
from tedmoe.parallel import comm
from tedmoe.parallel.topology import Topology

TOL = {"rtol": 1e-5, "atol": 1e-6}
LAYOUTS = {2: [(2, 1), (1, 2)], 4: [(1, 4), (2, 2)], 6: [(3, 2), (1, 3), (2, 3)],
           8: [(2, 2), (4, 2)]}  # (tp, ep); dp = world / tp
H, S = 8, 12
SIZES = {6: (24, 6)}  # world -> (ffn F, experts E) where TP 3 / EP 3 need them; else (16, 4)


def sizes(world):
    return SIZES.get(world, (16, 4))


def _full_weights(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    E, F = cfg.num_experts, cfg.ffn_hidden_size
    router = torch.randn(E, H, generator=g) * H ** -0.5
    experts = {"w1": torch.randn(E, H, F, generator=g) * 0.3, "w2": torch.randn(E, F, H, generator=g) * 0.3}
    if cfg.activation == "swiglu":
        experts["w3"] = torch.randn(E, H, F, generator=g) * 0.3
    return router, experts


def _batch(dp_size, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dp_size, S, H, generator=g), torch.randn(dp_size, S, H, generator=g)


def _step(layer, x, r):
    x = x.clone().requires_grad_(True)
    y, stats = layer(x)
    ((y * r).sum() + 0.1 * stats.aux_loss + 0.01 * stats.z_loss).backward()
    return y.detach(), x.grad, stats


def check_layouts(world):
    F, E = sizes(world)
    results = {}
    for tp, ep in LAYOUTS[world]:
        topo = Topology(world, tp=tp, ep=ep)
        dp, dp_rank = topo.size("dp"), topo.coord("dp")
        group_shards = [dp_rank - topo.coord("ep") + j for j in range(ep)]
        xs, rs = _batch(dp)
        for k, dropless, dtd in itertools.product((1, 2), (False, True), (True, False)):
            cfg = MoEConfig(ffn_hidden_size=F, num_experts=E, top_k=k, capacity_factor=0.75,
                            min_capacity=1, dropless=dropless, dtd=dtd, activation="swiglu" if k == 2 else "gelu")
            router_w, experts_w = _full_weights(cfg)
            refs = {}
            for d in group_shards:
                ref = MoE(H, cfg, Topology.single())
                ref.load_full(router_w, experts_w)
                refs[d] = (ref, *_step(ref, xs[d], rs[d]))
            layer = MoE(H, cfg, topo)
            layer.load_full(router_w, experts_w)
            y, x_grad, stats = _step(layer, xs[dp_rank], rs[dp_rank])
            ref, y_ref, x_grad_ref, stats_ref = refs[dp_rank]
            where = f"tp={tp} ep={ep} dp={dp} k={k} dropless={dropless} dtd={dtd}"
            torch.testing.assert_close(y, y_ref, **TOL, msg=lambda m: f"{where}: output\n{m}")
            torch.testing.assert_close(x_grad, x_grad_ref, **TOL, msg=lambda m: f"{where}: input grad\n{m}")
            torch.testing.assert_close(layer.router.weight.grad, ref.router.weight.grad, **TOL,
                                       msg=lambda m: f"{where}: router grad\n{m}")
            assert torch.equal(stats.tokens_per_expert, stats_ref.tokens_per_expert), where
            assert torch.equal(stats.drop_fraction, stats_ref.drop_fraction), where
            full_grads = layer.experts.full_tensors(grads=True)
            for name, g in full_grads.items():
                expect = sum(refs[d][0].experts.full_tensors(grads=True)[name] for d in group_shards)
                torch.testing.assert_close(g, expect, **TOL, msg=lambda m: f"{where}: expert {name} grad\n{m}")
            results[(tp, ep, k, dropless, dtd)] = (y, x_grad, float(stats.drop_fraction))
    for (tp, ep, k, dropless, dtd), (y, x_grad, _) in results.items():
        if dtd:  # DTD on and off give the same numbers
            y_off, x_grad_off, _ = results[(tp, ep, k, dropless, False)]
            torch.testing.assert_close(y, y_off, **TOL)
            torch.testing.assert_close(x_grad, x_grad_off, **TOL)
    return {key: v[2] for key, v in results.items()}


def check_ledger(world):
    """Capacity mode: ledger = docstring formulas; DTD divides the a2a bytes by C / ceil(C / TP)
    (exactly TP when TP divides the capacity C; world 6 has C = 8 with TP 3: padded)."""
    F, E = sizes(world)
    C = -(-2 * 2 * S // E)  # top-2, capacity factor 1.0, 2S tokens
    out = {}
    for tp, ep in LAYOUTS[world]:
        topo = Topology(world, tp=tp, ep=ep)
        x, r = _batch(topo.size("dp"))
        x = torch.cat([x, x], 1)[topo.coord("dp")]  # 24 tokens, capacity ceil(2 * 1.0 * 24 / E)
        r = torch.cat([r, r], 1)[topo.coord("dp")]
        a2a = {}
        for dtd in (True, False):
            cfg = MoEConfig(ffn_hidden_size=F, num_experts=E, top_k=2, capacity_factor=1.0, dtd=dtd)
            layer = MoE(H, cfg, topo)
            layer.load_full(*_full_weights(cfg))
            with comm.LEDGER.capture():
                _step(layer, x, r)
            got = comm.LEDGER.as_dict()
            assert got == capacity_comm(2 * S, H, E, 2, C, tp, ep, dtd), (tp, ep, dtd, got)
            a2a[dtd] = comm.LEDGER.total(kind="all_to_all").bytes
        if ep > 1:
            assert a2a[True] * C == a2a[False] * -(-C // tp), (tp, ep, C, a2a)
        out[(tp, ep)] = (C, a2a)
        # dropless: the same collectives, plus one all-to-all of the int64 [ep, E / ep] segment lengths
        cfg = MoEConfig(ffn_hidden_size=F, num_experts=E, top_k=2, dropless=True)
        layer = MoE(H, cfg, topo)
        layer.load_full(*_full_weights(cfg))
        with comm.LEDGER.capture():
            _step(layer, x, r)
        calls = {p: {k: v["calls"] for k, v in d.items()} for p, d in comm.LEDGER.as_dict().items()}
        expect = {p: {k: v["calls"] for k, v in d.items()} for p, d in capacity_comm(2 * S, H, E, 2, C, tp, ep, True).items()}
        if ep > 1:
            expect["fwd"]["all_to_all/ep"] += 1
        assert calls == expect, (tp, ep, calls)
    return out


def check_rts_layouts(world):
    """Random token selection: the seeded router makes the same choices in every layout."""
    tp, ep = LAYOUTS[world][-1]
    F, E = sizes(world)
    topo = Topology(world, tp=tp, ep=ep)
    cfg = MoEConfig(ffn_hidden_size=F, num_experts=E, top_k=2, capacity_factor=0.5,
                    min_capacity=1, drop_policy="random")
    xs, rs = _batch(topo.size("dp"))
    ref = MoE(H, cfg, Topology.single())
    ref.load_full(*_full_weights(cfg))
    layer = MoE(H, cfg, topo)
    layer.load_full(*_full_weights(cfg))
    d = topo.coord("dp")
    ref.context.first_sequence = layer.context.first_sequence = d  # shard d holds the batch's sequence d
    y_ref, g_ref, s_ref = _step(ref, xs[d], rs[d])
    y, g, s = _step(layer, xs[d], rs[d])
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(g, g_ref, **TOL)
    assert float(s.drop_fraction) > 0


@pytest.mark.parametrize("world", [2, 4, 6, 8])
def test_moe_layer_matches_single_process(world, request):
    w = request.getfixturevalue(f"world{world}")
    drops = w.run(check_layouts, world)[0]
    assert any(f > 0 for (_, _, _, dropless, _), f in drops.items() if not dropless)  # capacity really drops
    assert all(f == 0 for (_, _, _, dropless, _), f in drops.items() if dropless)
    w.run(check_rts_layouts, world)


@pytest.mark.parametrize("world", [2, 4, 6, 8])
def test_moe_layer_communication(world, request):
    w = request.getfixturevalue(f"world{world}")
    a2a = w.run(check_ledger, world)
    for (tp, ep), (C, per) in a2a[0].items():
        if ep > 1 and tp > 1:
            cut = per[False] / per[True]
            assert cut == C / -(-C // tp) and per[True] > 0
            assert (cut == tp) == (C % tp == 0)  # exactly TP only when TP divides the capacity
            if world == 6 and tp == 3:
                assert (C, cut) == (8, 8 / 3)  # padded: 3 slots of 8/3 per TP rank
