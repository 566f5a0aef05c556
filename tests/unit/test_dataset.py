"""Token files: BPE preparation, the deterministic sampler, corrupted files refused."""

import pytest
import torch

from tedmoe.data.dataset import BatchSampler, TokenDataset, prepare


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    (d / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    (d / "b.md").write_text("pack my box with five dozen liquor jugs! " * 200)
    return d


def test_bpe_prepare_round_trips_text(text_dir, tmp_path):
    out = prepare([str(text_dir)], tmp_path / "bpe", tokenizer="bpe", bpe_vocab_size=300)
    ds = TokenDataset(out, "train")
    assert 256 < ds.vocab_size <= 300 and ds.meta["files"] == 2
    text = "the quick brown fox"
    assert ds.tokenizer.decode(ds.tokenizer.encode(text)) == text
    assert len(ds.tokenizer.encode(text)) < len(text)  # merges learned


def test_sampler_is_a_function_of_seed_and_step(text_dir, tmp_path):
    ds = TokenDataset(prepare([str(text_dir)], tmp_path / "b"), "train")
    a, b = BatchSampler(ds, 16, 8, seed=3), BatchSampler(ds, 16, 8, seed=3)
    parts = []
    for r in (0, 1):  # two DP ranks of one step...
        a.step = 0
        parts += a.micro_batches(2, r, 2)
    a.step = 0
    whole = a.micro_batches(1, 0, 2)  # ...are the one-process step, split the same way
    assert len(parts) == len(whole) == 4 and a.step == 1
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(parts, whole))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.batch(a.step), b.batch(b.step))


def test_corrupted_token_file_is_refused(text_dir, tmp_path):
    out = prepare([str(text_dir)], tmp_path / "c")
    raw = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(raw[:-2])
    with pytest.raises(ValueError, match="is truncated or replaced"):
        TokenDataset(out, "train")
    (out / "train.bin").write_bytes(raw[:-2] + b"\x00\x01")
    with pytest.raises(ValueError, match="does not match its checksum"):
        TokenDataset(out, "train")
