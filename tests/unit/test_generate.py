"""Sampling from a model: greedy, top-k, temperature, seeds."""

from tedmoe.config import ModelConfig, MoEConfig
from tedmoe.inference.generate import generate
from tedmoe.model.transformer import GPTMoE
from tedmoe.parallel.topology import Topology


def test_top_k_one_sampling_is_greedy():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64, max_seq_len=16,
                      moe=MoEConfig(ffn_hidden_size=32, num_experts=4))
    model = GPTMoE(cfg, Topology.single())
    model.init_weights(1)
    greedy = generate(model, [1, 2, 3], 20, greedy=True)
    assert greedy == generate(model, [1, 2, 3], 20, temperature=0.7, top_k=1, seed=5)
    assert len(greedy) == 23  # the context is cropped to max_seq_len=16, the output is not
    sampled = [generate(model, [1, 2, 3], 20, temperature=2.0, seed=s) for s in (0, 1)]
    assert sampled[0] != sampled[1] and sampled[0] == generate(model, [1, 2, 3], 20, temperature=2.0, seed=0)
