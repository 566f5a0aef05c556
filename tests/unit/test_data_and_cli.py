"""Data preparation, sampling, config files, generation and launch helpers, in one process."""

import pytest
import torch

from tedmoe.config import ModelConfig, MoEConfig
from tedmoe.config import dump_run_config, from_dict, load_run_config, parse_override, to_dict
from tedmoe.data.dataset import BatchSampler, TokenDataset, prepare
from tedmoe.generate import generate
from tedmoe.model.transformer import GPTMoE
from tedmoe.parallel.launch import adopt_slurm_env
from tedmoe.parallel.topology import Topology


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


TOML = """
seed = 7
[model]
hidden_size = 64
[model.moe]
num_experts = 8
"""


def test_config_overrides_and_round_trip(tmp_path):
    assert parse_override("model.moe.top_k=1") == {"model": {"moe": {"top_k": 1}}}
    assert parse_override("train.precision=bf16") == {"train": {"precision": "bf16"}}
    (tmp_path / "c.toml").write_text(TOML)
    cfg = load_run_config(str(tmp_path / "c.toml"), "tiny", ["train.max_steps=9"])
    assert (cfg.seed, cfg.model.hidden_size, cfg.model.moe.hidden_size, cfg.model.moe.num_experts,
            cfg.train.max_steps) == (7, 64, 64, 8, 9)
    assert from_dict(to_dict(cfg)) == cfg
    assert "[model.moe]" in dump_run_config(cfg)
    with pytest.raises(ValueError, match="is not key=value"):
        parse_override("seed")
    with pytest.raises(ValueError, match="model is a table"):
        load_run_config(None, "tiny", ["model=3"])


def test_top_k_one_sampling_is_greedy():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=64, max_seq_len=16,
                      moe=MoEConfig(hidden_size=32, ffn_hidden_size=32, num_experts=4))
    model = GPTMoE(cfg, Topology.single())
    model.init_weights(1)
    greedy = generate(model, [1, 2, 3], 20, greedy=True)
    assert greedy == generate(model, [1, 2, 3], 20, temperature=0.7, top_k=1, seed=5)
    assert len(greedy) == 23  # the context is cropped to max_seq_len=16, the output is not
    sampled = [generate(model, [1, 2, 3], 20, temperature=2.0, seed=s) for s in (0, 1)]
    assert sampled[0] != sampled[1] and sampled[0] == generate(model, [1, 2, 3], 20, temperature=2.0, seed=0)


def test_slurm_environment_is_adopted():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.5"}
    adopt_slurm_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == \
        ("3", "8", "1", "10.0.0.5", "29500")
    torchrun = {"RANK": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "8"}
    adopt_slurm_env(torchrun)
    assert torchrun["RANK"] == "0" and "WORLD_SIZE" not in torchrun
