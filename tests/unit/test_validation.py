"""Every bad input fails before any process group exists, with a message that names the fix."""

import json
import os

import pytest

from tedmoe.configfile import load_run_config
from tedmoe.runtime.trainer import check_before_launch, train


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    os.environ["TEDMOE_CACHE"] = str(path)
    yield path
    os.environ.pop("TEDMOE_CACHE")


@pytest.fixture(scope="module")
def run_dir(cache, tmp_path_factory):
    """A finished 2-step single-process run with checkpoints."""
    out = tmp_path_factory.mktemp("run") / "r"
    train(load_run_config(None, "tiny", ["train.max_steps=2", "checkpoint_every=1", f'out_dir="{out}"']))
    return out


BAD = [  # (overrides, world size, message)
    (["parallel.tp=3"], 4, "tp=3 does not divide world_size=4; choose tp from the divisors of 4"),
    (["parallel.ep=3"], 4, "ep=3 does not divide the data-parallel size dp=4"),
    (["parallel.sp=3"], 4, "sp=3 does not divide world_size / tp = 4"),
    (["parallel.tp=0"], 4, "tp=0 must be a positive integer"),
    (["parallel.ep=8"], 8, "num_experts=4 is not divisible by ep=8"),
    (["parallel.tp=4", "model.moe.ffn_hidden_size=66"], 4, "ffn_hidden_size=66 is not divisible by tp=4"),
    (["parallel.tp=8", "model.ffn_hidden_size=64"], 8, "num_heads=4 is not divisible by tp=8"),
    (["parallel.tp=2", "parallel.sp=4", "seq_len=32"], 8, "heads per TP rank is not divisible by sp=4"),
    (["model.num_kv_heads=3"], 1, "num_heads=4 is not a multiple of num_kv_heads=3"),
    (["model.hidden_size=30"], 1, "hidden_size=30 is not divisible by num_heads=4"),
    (["model.moe.top_k=5"], 1, "top_k=5 exceeds num_experts=4; set top_k <= 4"),
    (["model.moe.capacity_factor=0.0"], 1, "capacity_factor=0.0 must be > 0"),
    (["model.moe.drop_policy='oldest'"], 1, "drop_policy='oldest' is not one of"),
    (["seq_len=64"], 1, "seq_len=64 exceeds model.max_seq_len=32"),
    (["parallel.sp=4", "seq_len=30"], 4, "seq_len=30 is not divisible by sp=4"),
    (["global_batch_size=7"], 1, "global_batch_size=7 is not a multiple of micro_batch_size=2 x dp=1"),
    (["global_batch_size=8"], 8, "global_batch_size=8 is not a multiple of micro_batch_size=2 x dp=8 = 16"),
    (["micro_batch_size=0"], 1, "is not a multiple of micro_batch_size=0"),
    (['data.path="/nonexistent/tokens"'], 1, "/nonexistent/tokens is not a prepared dataset (no meta.json)"),
    (["data.val_fraction=1.5"], 1, "data.val_fraction=1.5 must be between 0 and 1"),
    (["model.vocab_size=128"], 1, "the data's tokenizer has 256 tokens but model.vocab_size=128"),
    (["train.precision='fp8'"], 1, "precision='fp8' is not one of 'fp32', 'bf16', 'fp16'"),
    (["train.tile_size=0"], 1, "tile_size=0 must be >= 1"),
    (["train.grad_clip=0.0"], 1, "grad_clip=0.0 must be > 0"),
    (["train.warmup_steps=50"], 1, "warmup_steps=50 must be between 0 and max_steps=6"),
    (["train.checkpointing='sometimes'"], 1, "checkpointing='sometimes' is not one of"),
    (["train.max_bad_steps=-1"], 1, "max_bad_steps=-1 must be >= 0"),
]


@pytest.mark.parametrize("overrides,world,message", BAD, ids=[m[:40] for _, _, m in BAD])
def test_bad_config_is_refused_before_launch(cache, overrides, world, message):
    with pytest.raises(ValueError) as err:
        check_before_launch(load_run_config(None, "tiny", overrides), world, resume=False)
    assert message in str(err.value)


@pytest.mark.parametrize("text,message", [
    ("train.lrr=1", "unknown config key 'train.lrr'; valid keys in [train]: betas, checkpointing,"),
    ("seed", "--set 'seed' is not key=value"),
    ("model=3", "model is a table; set its keys"),
])
def test_bad_overrides(text, message):
    with pytest.raises(ValueError) as err:
        load_run_config(None, "tiny", [text])
    assert message in str(err.value)


def test_missing_config_file():
    with pytest.raises(ValueError, match="config file nope.toml does not exist"):
        load_run_config("nope.toml")


def test_bad_checkpoints_are_refused(run_dir):
    cfg = lambda *o: load_run_config(None, "tiny", [f'out_dir="{run_dir}"', *o])  # noqa: E731
    check_before_launch(cfg(), 1, resume=True)  # the good one passes
    with pytest.raises(ValueError, match="was made for another model config"):
        check_before_launch(cfg("model.num_layers=4"), 1, resume=True)
    meta = run_dir / "checkpoints" / "step_0000002" / "meta.json"
    good = meta.read_text()
    meta.write_text(good[:50])
    with pytest.raises(ValueError, match=r"meta.json is corrupted \(not JSON\)"):
        check_before_launch(cfg(), 1, resume=True)
    meta.write_text(good)
    shard = next((run_dir / "checkpoints" / "step_0000002").glob("*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match=f"{shard.name} does not match its checksum"):
        check_before_launch(cfg(), 1, resume=True)
    shard.write_bytes(data)
    assert json.loads(good)["step"] == 2
