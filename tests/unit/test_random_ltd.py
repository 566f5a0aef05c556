"""Random-LTD in one process: the kept-token count schedule, the draws (ordered, per segment, per
sequence, block and step), the positions path (a block on a prefix of its sequence with those
positions computes what it computes on the whole sequence, restricted), and that evaluation keeps
every token."""

import dataclasses

import pytest
import torch

from tedmoe.config import ModelConfig, MoEConfig
from tedmoe.config.schema import RandomLTDConfig
from tedmoe.model.transformer import GPTMoE
from tedmoe.parallel.topology import Topology


def test_the_kept_count_grows_to_the_whole_sequence():
    ltd = RandomLTDConfig(layers=(1,), start=16, steps=100, multiple=8)
    assert [ltd.keep(s, 128) for s in (0, 10, 50, 99, 100, 500)] == [16, 24, 72, 120, 128, 128]
    assert RandomLTDConfig(start=3, multiple=8).keep(0, 64) == 8  # at least one multiple


def model(**ltd):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, ffn_hidden_size=64, max_seq_len=32,
                      moe=MoEConfig(ffn_hidden_size=32, num_experts=4, dropless=True),
                      random_ltd=RandomLTDConfig(**{"layers": (1, 2), "start": 8, "steps": 4, "multiple": 4, **ltd}))
    m = GPTMoE(cfg, Topology.single())
    m.init_weights(0)
    return m


def test_the_draws():
    m = model(segments=2)
    m.token_context.sequence_length = 32
    kept = m.kept_tokens(1, 3, 32)
    assert kept.shape == (3, 8)
    for row in kept:
        assert torch.equal(row, row.sort().values) and len(set(row.tolist())) == 8
        assert ((row < 16).sum(), (row >= 16).sum()) == (4, 4)  # r / segments in each segment
    assert not torch.equal(kept[0], kept[1])  # each sequence its own draw
    assert torch.equal(kept, m.kept_tokens(1, 3, 32))  # a function of its keys
    assert not torch.equal(kept, m.kept_tokens(2, 3, 32))  # another block, another draw
    m.token_context.first_sequence = 1
    assert torch.equal(m.kept_tokens(1, 2, 32)[0], kept[1])  # keyed on the sequence's place in the batch
    m.token_context.step = 2
    assert m.kept_tokens(1, 3, 32).shape == (3, 20)  # 8 + 24 * 2 / 4
    m.token_context.step = 4
    assert m.kept_tokens(1, 3, 32) is None  # all tokens: the plain path
    m.token_context.step = 0
    assert m.kept_tokens(0, 3, 32) is None and m.kept_tokens(3, 3, 32) is None  # only the listed blocks
    m.eval()
    assert m.kept_tokens(1, 3, 32) is None  # evaluation sees every token


def test_a_block_on_kept_tokens_sees_their_positions_and_only_them():
    """Keeping a prefix: causal attention and a dropless MoE give the prefix's outputs of the
    whole sequence, only if the rotary angles are the tokens' own positions."""
    m = model()
    block = m.blocks[1]
    m.token_context.sequence_length = 20  # the routers key their draws on the whole sequence
    with torch.no_grad():  # sharper attention than at initialisation, so that positions matter visibly
        block.attn.q.weight.mul_(30)
        block.attn.k.weight.mul_(30)
    x = torch.randn(2, 20, 32, generator=torch.Generator().manual_seed(0))
    whole = block(x)[0]
    prefix = block(x[:, :12], None, torch.arange(12).expand(2, 12))[0]
    torch.testing.assert_close(prefix, whole[:, :12], rtol=1e-5, atol=1e-5)
    attn = block.attn(block.attn_norm(x))[:, :12]
    spread = block.attn(block.attn_norm(x[:, :12]), None, (2 * torch.arange(12)).expand(2, 12))  # (rotary is
    torch.testing.assert_close(block.attn(block.attn_norm(x[:, :12]), None, torch.arange(12).expand(2, 12)), attn,
                               rtol=1e-5, atol=1e-6)                                           # shift-invariant)
    assert (spread - attn).abs().max() > 0.01 * attn.abs().max()  # the positions enter the rotary angles


def test_training_drops_tokens_and_evaluation_does_not():
    m = model()
    plain = dataclasses.replace(m.config, random_ltd=RandomLTDConfig())
    ref = GPTMoE(plain, Topology.single())
    ref.load_state_dict(m.state_dict())
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    targets = ids.roll(-1, 1)
    assert m(ids, targets)[0].item() != pytest.approx(ref(ids, targets)[0].item(), rel=1e-6)
    m.eval(), ref.eval()
    assert m(ids, targets)[0].item() == ref(ids, targets)[0].item()
    assert m.token_context.sequence_length is None  # a call outside the engine leaves the context as it was
