"""Layout-invariant random routing (tedmoe/moe/noise.py): random token selection, input jitter
and Gumbel noise give the single-process loss, gradients and training curve in odd-degree
layouts (world 6: TP 3, EP 3, SP 2; the deterministic ``position`` option is the control), and
no two data-parallel ranks share noise.

The reference is the single-process engine on the same global batch, as micro-batches; each
token's draws depend on its place in the global batch (tedmoe/moe/noise.py), not on its rank.
"""

import pytest
import torch

from tedmoe.config import ModelConfig, MoEConfig, TrainConfig
from tedmoe.model.transformer import GPTMoE
from tedmoe.moe import noise
from tedmoe.parallel import comm
from tedmoe.parallel.topology import Topology
from tedmoe.runtime.engine import Engine
from tests.distributed.harness import assert_matches_reference, train_and_gather

GLOBAL_SEQS, SEQ, MICRO_BATCHES, STEPS = 12, 16, 6, 5
OPTIONS = {  # name -> MoE settings (all but the first draw random numbers)
    "position": {"top_k": 2, "capacity_factor": 0.75},
    "random_selection": {"top_k": 2, "capacity_factor": 0.5, "drop_policy": "random"},
    "jitter": {"top_k": 2, "capacity_factor": 1.0, "router_jitter": 0.3},
    "gumbel": {"top_k": 1, "capacity_factor": 1.0, "gumbel_noise": True},
    "dropless_jitter_gumbel": {"top_k": 1, "dropless": True, "router_jitter": 0.3, "gumbel_noise": True},
}
LAYOUTS = [  # (sp, tp, ep) on 6 ranks, with the options each runs (capacity is per rank's tokens, so SP
    # is compared in dropless mode, as README "Sequence parallelism" states)
    ((1, 3, 2), ("position", "random_selection", "jitter", "gumbel")),
    ((1, 1, 3), ("random_selection", "jitter", "gumbel")),
    ((1, 2, 3), ("position", "random_selection", "jitter", "gumbel")),
    ((2, 1, 3), ("dropless_jitter_gumbel",)),
]


def model_config(option):
    moe = MoEConfig(ffn_hidden_size=48, num_experts=6, min_capacity=1, **OPTIONS[option])
    return ModelConfig(vocab_size=72, hidden_size=48, num_layers=2, num_heads=6, ffn_hidden_size=96,
                       max_seq_len=SEQ, moe_every=1, moe=moe)


def micro_batches(step, topology):
    """This rank's micro-batches of ``step``: its consecutive DP share, its SP chunk of each sequence."""
    g = torch.Generator().manual_seed(200 + step)
    start = torch.randint(0, 72, (GLOBAL_SEQS, 1), generator=g)
    inc = torch.randint(1, 4, (GLOBAL_SEQS, 1), generator=g)
    data = (start + inc * torch.arange(SEQ + 1)) % 72
    mbs = list(zip(data[:, :-1].chunk(MICRO_BATCHES), data[:, 1:].chunk(MICRO_BATCHES)))
    dp, d, sp = topology.size("dp"), topology.coord("dp"), topology.axis("sp")
    per = MICRO_BATCHES // dp
    return [(i.chunk(sp.size, 1)[sp.rank], t.chunk(sp.size, 1)[sp.rank]) for i, t in mbs[d * per:(d + 1) * per]]


def run(topology, option):
    """(first-step loss, its full gradients, the (loss, grad norm) curve of STEPS steps)."""
    model = GPTMoE(model_config(option), topology)
    model.init_weights(seed=0)
    engine = Engine(model, topology, TrainConfig(lr=1e-2, warmup_steps=1, max_steps=STEPS, grad_clip=0.3,
                                                 tile_size=100))
    return train_and_gather(engine, lambda step: micro_batches(step, topology), STEPS, MICRO_BATCHES)


def check_layouts():
    out = {}
    for (sp, tp, ep), options in LAYOUTS:
        topo = Topology(6, tp=tp, ep=ep, sp=sp)
        for option in options:
            result = run(topo, option)
            out[(sp, tp, ep, option)] = result if torch.distributed.get_rank() == 0 else None
    return out


def check_ranks_draw_different_noise():
    """The first micro-batch's random-selection priorities on each DP rank (TP 3 x DP 2): equal on
    the TP ranks of a group (they must route alike), different across DP ranks."""
    topo = Topology(6, tp=3, ep=2)
    model = GPTMoE(model_config("random_selection"), topo)
    engine = Engine(model, topo, TrainConfig())
    mbs = micro_batches(0, topo)
    engine.set_token_context(mbs, 0)
    ctx = model.token_context
    ids = ctx.token_ids(mbs[0][0].shape[0], mbs[0][0].shape[1])
    u = model.blocks[0].mlp.router.draws(noise.SELECTION, ctx.step, ids, 2)
    return comm.all_gather(u.unsqueeze(0), topo.axis("world"))


@pytest.fixture(scope="module")
def references():
    return {option: run(Topology.single(), option) for option in OPTIONS}


def test_random_routing_matches_single_process(world6, references):
    results = world6.run(check_layouts)[0]
    assert len(results) == 12
    for (sp, tp, ep, option), result in results.items():
        assert_matches_reference(f"{option} sp={sp} tp={tp} ep={ep} dp={6 // (sp * tp)}", result, references[option])


def test_data_parallel_ranks_draw_different_noise(world6):
    draws = world6.run(check_ranks_draw_different_noise)[0]  # [6, S, K], ranks = dp * 3 + tp
    for dp in range(2):
        for tp in range(1, 3):
            assert torch.equal(draws[dp * 3 + tp], draws[dp * 3])
    assert not torch.equal(draws[0], draws[3])
    assert (draws[0] - draws[3]).abs().mean() > 0.1  # independent, not merely shifted


def test_the_options_really_draw():
    """Each option's routing depends on its draws: another seed changes the first-step loss."""
    for option in list(OPTIONS)[1:]:
        cfg = model_config(option)
        losses = []
        for seed in (1, 2):
            cfg.moe.router_seed = seed
            model = GPTMoE(cfg, Topology.single())
            model.init_weights(0)
            ids, targets = micro_batches(0, Topology.single())[0]
            losses.append(model(ids, targets)[0].item())
        assert losses[0] != losses[1], option
