"""The whole GPT-MoE under the engine, in many layouts, against the single-process engine.

The single-process reference runs the same global batch as micro-batches (one per DP shard
and accumulation step, each with its own capacity), which is what DESIGN.md section 5 defines.
Ranks return gathered results; the parent compares them with the reference it computed itself.
"""

import pytest
import torch

from tedmoe.config import ModelConfig, MoEConfig, TrainConfig
from tedmoe.model.transformer import GPTMoE
from tedmoe.parallel.activation_checkpoint import apply_checkpointing
from tedmoe.parallel.topology import Topology
from tedmoe.runtime.engine import Engine
from tests.distributed.harness import assert_matches_reference, train_and_gather

LAYOUTS = {4: [(2, 2), (1, 4), (4, 1)], 8: [(2, 2), (4, 2), (1, 4), (2, 4)]}  # (tp, ep); dp = world / tp
GLOBAL_SEQS, SEQ, MICRO_BATCHES, STEPS = 16, 16, 8, 10  # 8 micro-batches of 2 sequences per step


def model_config():
    moe = MoEConfig(ffn_hidden_size=32, num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=1)
    return ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64,
                       max_seq_len=SEQ, moe=moe)


def train_config(**kw):
    return TrainConfig(**{"lr": 1e-2, "warmup_steps": 2, "max_steps": STEPS, "grad_clip": 0.3, "tile_size": 100, **kw})


def micro_batches(step, dp=1, dp_rank=0):
    """The global batch of ``step`` as MICRO_BATCHES micro-batches; DP rank d takes its
    consecutive 1/dp of them (so every layout sees micro-batches of the same size)."""
    g = torch.Generator().manual_seed(100 + step)
    start = torch.randint(0, 64, (GLOBAL_SEQS, 1), generator=g)
    inc = torch.randint(1, 4, (GLOBAL_SEQS, 1), generator=g)
    data = (start + inc * torch.arange(SEQ + 1)) % 64  # learnable: a stride per sequence
    mbs = list(zip(data[:, :-1].chunk(MICRO_BATCHES), data[:, 1:].chunk(MICRO_BATCHES)))
    per = MICRO_BATCHES // dp
    return mbs[dp_rank * per:(dp_rank + 1) * per]


def build(topology, train_cfg, checkpointing="none", model_cfg=None):
    model = GPTMoE(model_cfg or model_config(), topology)
    model.init_weights(seed=0)
    apply_checkpointing(model, checkpointing)
    return Engine(model, topology, train_cfg)


def rank_batches(step, topology):
    """This rank's micro-batches: its DP share, and with sp > 1 its chunk of every sequence."""
    sp = topology.axis("sp")
    return [(i.chunk(sp.size, 1)[sp.rank], t.chunk(sp.size, 1)[sp.rank])
            for i, t in micro_batches(step, topology.size("dp"), topology.coord("dp"))]


def run(topology, train_cfg, checkpointing="none", steps=STEPS, model_cfg=None):
    """(first-step loss, its full synchronised gradients, the (loss, grad norm) of ``steps`` steps)."""
    engine = build(topology, train_cfg, checkpointing, model_cfg)
    return train_and_gather(engine, lambda step: rank_batches(step, topology), steps, MICRO_BATCHES)


def check_layouts(world):
    out = {}
    for tp, ep in LAYOUTS[world]:
        topo = Topology(world, tp=tp, ep=ep)
        result = run(topo, train_config())
        out[(tp, ep)] = result if torch.distributed.get_rank() == 0 else None
    return out


@pytest.fixture(scope="module")
def reference():
    return run(Topology.single(), train_config())


@pytest.mark.parametrize("world", [4, 8])
def test_whole_model_matches_single_process(world, request, reference):
    results = request.getfixturevalue(f"world{world}").run(check_layouts, world)[0]
    ref_losses = reference[2]
    assert ref_losses[-1][0] < ref_losses[0][0] - 0.5  # it trains
    assert all(norm > 0.3 for _, norm in ref_losses)  # and clipping (grad_clip=0.3) acts on every step
    for (tp, ep), result in results.items():
        assert_matches_reference(f"tp={tp} ep={ep} dp={world // tp}", result, reference)


def check_disagreeing_ranks():
    """A rank with a different micro-batch shape is caught before any collective can hang."""
    topo = Topology(4, tp=2, ep=2)
    engine = build(topo, train_config())
    mbs = micro_batches(0, topo.size("dp"), topo.coord("dp"))
    if torch.distributed.get_rank() == 3:
        mbs = [(i[:1], t[:1]) for i, t in mbs]
    try:
        engine.train_step(mbs)
    except ValueError as err:
        return str(err)
    return None


def test_disagreeing_ranks_fail_together(world4):
    messages = world4.run(check_disagreeing_ranks, timeout=60)
    assert all(m is not None and "ranks disagree on the micro-batches" in m and "ranks [3]" in m for m in messages)
