"""Layout-invariant random draws (tedmoe/moe/noise.py) on one process: a checkpointed block's
recompute draws what its forward drew. The distributed half (every layout draws what one process
draws) is tests/distributed/test_noise.py."""

import torch

from tedmoe.config import ModelConfig, MoEConfig
from tedmoe.model.transformer import GPTMoE
from tedmoe.parallel.activation_checkpoint import apply_checkpointing
from tedmoe.parallel.topology import Topology


def test_checkpoint_recomputes_draw_the_same_numbers():
    """Jitter and random selection under plain and CAC checkpointing: gradients bit-identical to
    no checkpointing (the recompute draws what the forward drew)."""
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
