"""`tedmoe train` refuses every bad input before any process starts, in one line with exit code 2,
and never loses a run: a directory holding a run, a live run's lock, a resume that would change
the data or the schedule."""

import json
import os
from pathlib import Path

import pytest

from tedmoe.cli import main
from tedmoe.config import load_run_config
from tedmoe.runtime import rundir
from tedmoe.runtime.trainer import train


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    os.environ["TEDMOE_CACHE"] = str(path)
    yield path
    os.environ.pop("TEDMOE_CACHE")


def run(capsys, *args):
    """Exit code and stderr lines of ``tedmoe train --preset tiny ARGS`` in this process."""
    code = main(["train", "--preset", "tiny", *map(str, args)])
    return code, capsys.readouterr().err.splitlines()


def sets(*overrides):
    return [a for o in overrides for a in ("--set", o)]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 2-step single-process run with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("run") / "r"
    train(load_run_config(None, "tiny", ["train.max_steps=2", "checkpoint_every=1", f'out_dir="{out}"']))
    return out


BAD = [  # (overrides, nproc, message): layout and model mistakes
    (["parallel.tp=3"], 4, "tp=3 does not divide world_size=4; choose tp from the divisors of 4"),
    (["parallel.ep=3"], 4, "ep=3 does not divide the data-parallel size dp=4"),
    (["parallel.sp=3"], 4, "sp=3 does not divide world_size / tp = 4"),
    (["parallel.ep=8"], 8, "num_experts=4 is not divisible by ep=8"),
    (["parallel.tp=4", "model.moe.ffn_hidden_size=66"], 4, "ffn_hidden_size=66 is not divisible by tp=4"),
    (["parallel.tp=8", "model.ffn_hidden_size=64"], 8, "num_heads=4 is not divisible by tp=8"),
    (["parallel.tp=2", "parallel.sp=4", "seq_len=32"], 8, "heads per TP rank is not divisible by sp=4"),
    (["model.num_kv_heads=3"], 1, "num_heads=4 is not a multiple of num_kv_heads=3"),
    (["model.hidden_size=30"], 1, "hidden_size=30 is not divisible by num_heads=4"),
    (["model.moe.top_k=5"], 1, "top_k=5 exceeds num_experts=4; set top_k <= 4"),
    (["seq_len=64"], 1, "seq_len=64 exceeds model.max_seq_len=32"),
    (["parallel.sp=4", "seq_len=30"], 4, "seq_len=30 is not divisible by sp=4"),
    (["global_batch_size=7"], 1, "global_batch_size=7 is not a multiple of micro_batch_size=2 x dp=1"),
    (["global_batch_size=8"], 8, "global_batch_size=8 is not a multiple of micro_batch_size=2 x dp=8 = 16"),
    (['data.path="/nonexistent/tokens"'], 1, "/nonexistent/tokens is not a prepared dataset (no meta.json)"),
    (["model.vocab_size=128"], 1, "the data's tokenizer has 256 tokens but model.vocab_size=128"),
    (["train.warmup_steps=50"], 1, "warmup_steps=50 must be between 0 and max_steps=6"),
    (["model.moe.gumbel_noise=true"], 1, "gumbel_noise applies to top-1 routing only"),
    (["parallel.backend=nccl"], 1, "parallel.backend='nccl' needs CUDA GPUs and this machine has none"),
    (["global_batch_size=2000000000", "micro_batch_size=1"], 1, "GiB per rank (global batch"),
    (["model.moe.ffn_hidden_size=1000000000"], 1, "GiB per rank (global batch 0.0, model, optimizer and activations"),
    (["data.curriculum.seqlen.schedule=fixed_linear", "data.curriculum.seqlen.start=24",
      "data.curriculum.seqlen.end=16"], 1, "data.curriculum.seqlen.start=24 is above end=16; a curriculum grows from easy"),
    (["data.curriculum.seqlen.schedule=fixed_linear", "data.curriculum.seqlen.end=64"], 1,
     "data.curriculum.seqlen.end=64 exceeds the full difficulty 32"),
    (["data.curriculum.rarity.schedule=fixed_root", "data.curriculum.rarity.start=150"], 1,
     "data.curriculum.rarity.start=150 is above end=100"),
    (["data.curriculum.rarity.schedule=fixed_discrete", "data.curriculum.rarity.values=[10, 50, 100]",
      "data.curriculum.rarity.boundaries=[5]"], 1, "needs values (easiest first) and one fewer boundaries, got 3 value(s)"),
    (["data.curriculum.rarity.schedule=fixed_discrete", "data.curriculum.rarity.values=[50, 10]",
      "data.curriculum.rarity.boundaries=[5]"], 1, "values and boundaries must increase"),
    (["data.curriculum.seqlen.schedule=fixed_root", "data.curriculum.seqlen.multiple=6", "parallel.sp=4"], 4,
     "data.curriculum.seqlen.multiple=6 is not divisible by sp=4"),
    (["data.curriculum.seqlen.schedule=quadratic"], 1, "data.curriculum.seqlen.schedule='quadratic' is not allowed"),
    (["model.num_layers=4", "model.random_ltd.layers=[3]"], 1,
     "model.random_ltd.layers=[3]: [3] out of range; random-LTD drops tokens in middle blocks only (1..2 of 4)"),
    (["model.random_ltd.layers=[1]"], 1, "middle blocks only (and a model of 2 blocks has none)"),
    (["model.num_layers=4", "model.random_ltd.layers=[1]", "model.random_ltd.multiple=6",
      "model.random_ltd.segments=4"], 1, "model.random_ltd.multiple=6 is not a multiple of segments=4"),
    (["model.num_layers=4", "model.random_ltd.layers=[1, 2]", "parallel.sp=2"], 2,
     "model.random_ltd.segments=1 is not divisible by sp=2; set segments to a multiple of 2"),
    (["model.num_layers=4", "model.random_ltd.layers=[1]", "model.random_ltd.start=64"], 1,
     "model.random_ltd.start=64 is above seq_len=32"),
    (["train.zero_stage=4"], 1, "train.zero_stage=4 is not allowed: it must be an integer in [1, 3]"),
    (["train.offload=disk"], 1, "train.offload='disk' needs train.offload_path: a writable directory on a fast disk"),
    (["train.offload=nvme"], 1, "train.offload='nvme' is not allowed: it must be one of 'none', 'cpu', 'disk'"),
    (["train.offload_path=/tmp"], 1, "train.offload_path is set but train.offload='none' does not use it; set "
     "train.offload='disk' or remove offload_path"),
    (["train.offload=disk", "train.offload_path=/no/such/dir"], 1,
     "train.offload_path='/no/such/dir' is not a directory; create it (on a fast disk) or point offload_path at one"),
    (["train.offload=disk", "train.offload_path=/proc"], 1, "train.offload_path='/proc' is not writable"),
    (["compress.distill_weight=0"], 1, "compress.distill_weight=0 is not allowed: it must be a finite number in (0, 1]"),
]

TYPES = [  # (override, message): every field's type and range, from its annotation
    ('train.lr="0.001"', "train.lr='0.001' is not allowed: it must be a finite number > 0 (write numbers without quotes)"),
    ("train.lr=-0.001", "train.lr=-0.001 is not allowed: it must be a finite number > 0"),
    ("train.lr=0", "train.lr=0 is not allowed: it must be a finite number > 0"),
    ("train.lr=nan", "train.lr=nan is not allowed: it must be a finite number > 0"),
    ("model.num_layers=0", "model.num_layers=0 is not allowed: it must be an integer >= 1"),
    ("model.num_heads=0", "model.num_heads=0 is not allowed: it must be an integer >= 1"),
    ("model.num_kv_heads=0", "model.num_kv_heads=0 is not allowed: it must be an integer >= 1 (or unset)"),
    ("model.num_layers=2.5", "model.num_layers=2.5 is not allowed: it must be an integer >= 1"),
    ("train.max_steps=10.0", "train.max_steps=10.0 is not allowed: it must be an integer >= 1 (write 10, without"),
    ("train.max_steps=1e3", "train.max_steps=1000.0 is not allowed: it must be an integer >= 1 (write 1000, without"),
    ("seq_len=0", "seq_len=0 is not allowed: it must be an integer >= 1"),
    ("eval_batches=0", "eval_batches=0 is not allowed: it must be an integer >= 1"),
    ("micro_batch_size=0", "micro_batch_size=0 is not allowed: it must be an integer >= 1"),
    ("global_batch_size=-8", "global_batch_size=-8 is not allowed: it must be an integer >= 1"),
    ("stop_after=0", "stop_after=0 is not allowed: it must be an integer >= 1 (or unset)"),
    ("keep_checkpoints=-1", "keep_checkpoints=-1 is not allowed: it must be an integer >= 0"),
    ("checkpoint_every=-5", "checkpoint_every=-5 is not allowed: it must be an integer >= 0"),
    ("seed=-1", "seed=-1 is not allowed: it must be an integer in [0, 2.14748e+09)"),
    ("model.moe.capacity_factor=inf", "model.moe.capacity_factor=inf is not allowed: it must be a finite number > 0"),
    ("model.moe.capacity_factor=0.0", "model.moe.capacity_factor=0.0 is not allowed: it must be a finite number > 0"),
    ("model.moe.eval_capacity_factor=-1.0", "model.moe.eval_capacity_factor=-1.0 is not allowed"),
    ("model.moe.router_jitter=1.0", "model.moe.router_jitter=1.0 is not allowed: it must be a finite number in [0, 1)"),
    ("model.moe.drop_policy=oldest", "model.moe.drop_policy='oldest' is not allowed: it must be one of 'position',"),
    ("model.moe.dropless=1", "model.moe.dropless=1 is not allowed: it must be true or false"),
    ("model.moe.min_capacity=-1", "model.moe.min_capacity=-1 is not allowed: it must be an integer >= 0"),
    ("model.moe.activation=relu", "model.moe.activation='relu' is not allowed: it must be one of 'gelu', 'swiglu'"),
    ("model.norm_eps=0", "model.norm_eps=0 is not allowed: it must be a finite number > 0"),
    ("model.rope_theta=-10000", "model.rope_theta=-10000 is not allowed"),
    ("model.aux_loss_coef=-0.01", "model.aux_loss_coef=-0.01 is not allowed: it must be a finite number >= 0"),
    ("model.moe_every=-1", "model.moe_every=-1 is not allowed: it must be an integer >= 0"),
    ("train.betas=[0.9, 1.5]", "train.betas=[0.9, 1.5] is not allowed: it must be a list of 2 values, each a finite"),
    ("train.betas=0.9", "train.betas=0.9 is not allowed: it must be a list of 2 values"),
    ("train.betas=[-0.1, 0.9]", "train.betas=[-0.1, 0.9] is not allowed"),
    ("train.weight_decay=-0.1", "train.weight_decay=-0.1 is not allowed: it must be a finite number >= 0"),
    ("train.min_lr_ratio=2.0", "train.min_lr_ratio=2.0 is not allowed: it must be a finite number in [0, 1]"),
    ("train.eps=0", "train.eps=0 is not allowed: it must be a finite number > 0"),
    ("train.grad_clip=0.0", "train.grad_clip=0.0 is not allowed: it must be a finite number > 0 (or unset)"),
    ("train.tile_size=0", "train.tile_size=0 is not allowed: it must be an integer >= 1 (or unset)"),
    ("train.max_bad_steps=-1", "train.max_bad_steps=-1 is not allowed: it must be an integer >= 0"),
    ("train.precision=fp8", "train.precision='fp8' is not allowed: it must be one of 'fp32', 'bf16', 'fp16'"),
    ("train.checkpointing=sometimes", "train.checkpointing='sometimes' is not allowed: it must be one of 'none',"),
    ("train.loss_scale_window=0", "train.loss_scale_window=0 is not allowed: it must be an integer >= 1"),
    ("parallel.tp=0", "parallel.tp=0 is not allowed: it must be an integer >= 1"),
    ("parallel.timeout_s=0", "parallel.timeout_s=0 is not allowed: it must be a finite number > 0"),
    ("parallel.backend=smoke", "parallel.backend='smoke' is not allowed: it must be one of 'gloo', 'nccl'"),
    ("parallel.nproc=0", "parallel.nproc=0 is not allowed: it must be an integer >= 1"),
    ("data.val_fraction=1.5", "data.val_fraction=1.5 is not allowed: it must be a finite number in (0, 1)"),
    ("data.val_fraction=1.0", "data.val_fraction=1.0 is not allowed: it must be a finite number in (0, 1)"),
    ("data.bpe_vocab_size=10", "data.bpe_vocab_size=10 is not allowed: it must be an integer >= 257"),
    ("data.tokenizer=words", "data.tokenizer='words' is not allowed: it must be one of 'byte', 'bpe'"),
    ("data.corpus_bytes=0", "data.corpus_bytes=0 is not allowed: it must be an integer >= 1"),
    ("out_dir=3", "out_dir=3 is not allowed: it must be a string"),
    ("progress=yes", "progress='yes' is not allowed: it must be true or false"),
    ("train.lrr=1", "unknown config key 'train.lrr'; valid keys in [train]: betas, checkpointing,"),
    ("seed", "--set 'seed' is not key=value"),
    ("model=3", "model is a table; set its keys"),
    ("train.lr.x=3", "train.lr is a value, not a table"),
]


def _one_line(code, err, message):
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("tedmoe: error: "), err
    assert message in err[0], err[0]


@pytest.mark.parametrize("overrides,nproc,message", BAD, ids=[m[:40] for _, _, m in BAD])
def test_bad_layouts_and_models(capsys, tmp_path, overrides, nproc, message):
    code, err = run(capsys, "--nproc", nproc, "--out", tmp_path / "r", *sets(*overrides))
    _one_line(code, err, message)
    assert not (tmp_path / "r").exists()  # refused before anything was written


@pytest.mark.parametrize("override,message", TYPES, ids=[t[0] for t in TYPES])
def test_every_field_is_type_and_range_checked(capsys, tmp_path, override, message):
    code, err = run(capsys, "--out", tmp_path / "r", "--set", override)
    _one_line(code, err, message)


def test_wrong_types_in_a_toml_file(capsys, tmp_path):
    for text, message in [('[train]\nlr = "fast"\n', "train.lr='fast' is not allowed"),
                          ("[model]\nnum_layers = 2.0\n", "model.num_layers=2.0 is not allowed"),
                          ("[model.moe]\ntop_k = true\n", "model.moe.top_k=true is not allowed: it must be an integer"),
                          ("train = 3\n", "train is a table"),
                          ("[model\n", "is not valid TOML")]:
        (tmp_path / "c.toml").write_text(text)
        code, err = run(capsys, "--config", tmp_path / "c.toml")
        _one_line(code, err, message)


@pytest.mark.parametrize("args,message", [
    (["--nproc", "0"], "argument --nproc: 0 must be >= 1"),
    (["--nproc", "two"], "argument --nproc: 'two' is not an integer"),
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["--config", "missing.toml"], "config file missing.toml does not exist"),
    (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments(capsys, args, message):
    code, err = run(capsys, *args)
    _one_line(code, err, message)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Hugging Face directories that ``--init-from`` must refuse, each for one reason."""
    from tedmoe.config import ModelConfig, MoEConfig
    from tedmoe.interop import hf
    from tedmoe.model.transformer import GPTMoE
    from tedmoe.parallel.topology import Topology

    root = tmp_path_factory.mktemp("hf")
    for name, vocab in (("good", 256), ("small_vocab", 64)):
        cfg = ModelConfig(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=32, moe_every=1,
                          moe=MoEConfig(ffn_hidden_size=32, num_experts=4, activation="swiglu"))
        hf.save(GPTMoE(cfg, Topology.single()).state_dict(), cfg, root / name)
    config = json.loads((root / "good" / "config.json").read_text())
    for name, change in (("llama", {"model_type": "llama"}), ("wider", {"intermediate_size": 48}),
                         ("deeper", {"num_hidden_layers": 3})):
        (root / name).mkdir()
        (root / name / "model.safetensors").write_bytes((root / "good" / "model.safetensors").read_bytes())
        (root / name / "config.json").write_text(json.dumps({**config, **change}))
    (root / "no_weights").mkdir()
    (root / "no_weights" / "config.json").write_text(json.dumps(config))
    return root


@pytest.mark.parametrize("name,message", [
    ("missing", "missing has no config.json; pass a Hugging Face model directory"),
    ("llama", "config.json has model_type='llama'; this reader takes 'mixtral' or 'qwen3_moe'"),
    ("no_weights", "has neither model.safetensors nor model.safetensors.index.json"),
    ("wider", "block_sparse_moe.experts.0.w1.weight has shape (32, 32) but the config needs (48, 32)"),
    ("deeper", "the checkpoint lacks 19 tensor(s) the config needs, e.g. model.layers.2.block_sparse_moe"),
    ("small_vocab", "the data's tokenizer has 256 tokens but model.vocab_size=64"),
])
def test_bad_init_from_directories(capsys, tmp_path, hf_dirs, name, message):
    code, err = run(capsys, "--init-from", hf_dirs / name, "--out", tmp_path / "out")
    _one_line(code, err, message)
    assert not (tmp_path / "out").exists()


def test_out_dir_and_cache_that_are_files(capsys, tmp_path, monkeypatch):
    (tmp_path / "f").write_text("mine")
    _one_line(*run(capsys, "--out", tmp_path / "f"), "out_dir " + str(tmp_path / "f") + " is a file")
    _one_line(*run(capsys, "--out", tmp_path / "f" / "r"), "which is a file")
    monkeypatch.setenv("TEDMOE_CACHE", str(tmp_path / "f"))
    _one_line(*run(capsys, "--out", tmp_path / "r"), "is a file; set TEDMOE_CACHE to a directory")
    assert (tmp_path / "f").read_text() == "mine"


def test_a_directory_of_user_files_is_never_written(capsys, tmp_path):
    home = tmp_path / "home"
    (home / "sub").mkdir(parents=True)
    (home / "config.toml").write_text("mine")
    (home / "sub" / "data.bin").write_bytes(bytes(range(256)))
    before = snapshot(home)
    for extra in ([], ["--overwrite"], ["--resume"]):
        code, err = run(capsys, "--out", home, *extra)
        _one_line(code, err, "is not empty and holds no tedmoe run; choose a new or empty directory")
    assert snapshot(home) == before and sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_a_run_is_refused_kept_or_moved_aside(capsys, run_dir, tmp_path):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(run_dir, run)
    before = snapshot(run)
    code, err = main(["train", "--preset", "tiny", "--out", str(run)]), capsys.readouterr().err.splitlines()
    _one_line(code, err, "holds a run already; pass --resume to continue it, --overwrite to move it aside")
    assert snapshot(run) == before
    # a finished run says so and changes nothing
    assert main(["train", "--preset", "tiny", "--out", str(run), "--resume", "--set", "train.max_steps=2",
                 "--set", "checkpoint_every=1"]) == 0
    assert "finished at step 2 (train.max_steps=2): nothing to do" in capsys.readouterr().out
    assert snapshot(run) == before
    # --overwrite moves it aside, byte for byte, and starts afresh
    assert main(["train", "--preset", "tiny", "--out", str(run), "--overwrite", "--set", "train.max_steps=2"]) == 0
    assert "moved the old run" in capsys.readouterr().err
    assert snapshot(tmp_path / "r.old-1") == before
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not (run / ".lock").exists()


def test_resume_refuses_changed_settings_and_names_them(capsys, run_dir):
    base = ["--out", run_dir, "--resume", "--set", "train.max_steps=2", "--set", "checkpoint_every=1"]
    before = snapshot(run_dir)
    for extra, message in [(["--set", "train.max_steps=4"], "train.max_steps 2 -> 4"),
                           (["--set", "global_batch_size=4"], "global_batch_size 8 -> 4"),
                           (["--set", "train.lr=0.01"], "train.lr 0.003 -> 0.01"),
                           (["--set", "seed=5"], "seed 0 -> 5"),
                           (["--set", "data.val_fraction=0.1"], "data.val_fraction 0.05 -> 0.1"),
                           (["--set", "model.num_layers=4"], "was made for another model config")]:
        code, err = run(capsys, *base, *extra)
        _one_line(code, err, message)
        assert "--accept-changes" in err[0] or "model" in message
    assert snapshot(run_dir) == before


def test_resume_refuses_a_changed_dataset(capsys, run_dir, tmp_path):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(run_dir, run)
    meta_path = run / "checkpoints" / "step_0000002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["data"]["train"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    code, err = run_cli(capsys, "--out", run, "--resume", "--set", "train.max_steps=2", "--set", "checkpoint_every=1")
    _one_line(code, err, "the dataset's contents (token checksums differ); pass --accept-changes")


def run_cli(capsys, *args):
    return run(capsys, *args)


def test_bad_checkpoints_are_refused(capsys, run_dir, tmp_path):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(run_dir, run)
    args = ["--out", run, "--resume", "--set", "train.max_steps=3", "--set", "checkpoint_every=1", "--accept-changes"]
    meta = run / "checkpoints" / "step_0000002" / "meta.json"
    good = meta.read_text()
    meta.write_text(good[:50])
    _one_line(*run_cli(capsys, *args), "meta.json is corrupted (not JSON)")
    meta.write_text(good)
    shard = next((run / "checkpoints" / "step_0000002").glob("*.distcp"))
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    _one_line(*run_cli(capsys, *args), f"{shard.name} does not match its checksum")
    shard.write_bytes(data)
    assert json.loads(good)["step"] == 2


def test_resume_says_what_it_does(capsys, run_dir, tmp_path):
    import shutil

    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "new"), "--resume",
                 "--set", "train.max_steps=2"]) == 0
    assert f"no checkpoint in {tmp_path / 'new'}: starting at step 0" in capsys.readouterr().err
    run = tmp_path / "r"
    shutil.copytree(run_dir, run)
    assert main(["train", "--preset", "tiny", "--out", str(run), "--resume", "--accept-changes",
                 "--set", "train.max_steps=3", "--set", "checkpoint_every=1"]) == 0
    assert f"resuming from step 2 of {run} (step_0000002)" in capsys.readouterr().err
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_live_lock_refuses_and_a_stale_one_is_replaced(capsys, tmp_path):
    import socket
    import subprocess
    import sys

    run = tmp_path / "r"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "time": 0}))
        for extra in ([], ["--resume"], ["--overwrite"]):
            code, err = run_cli(capsys, "--out", run, "--set", "train.max_steps=2", *extra)
            _one_line(code, err, f"is in use by another tedmoe run (pid {sleeper.pid} on {socket.gethostname()}")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert main(["train", "--preset", "tiny", "--out", str(run), "--set", "train.max_steps=2"]) == 0
    assert f"a stale lock of pid {sleeper.pid} (no longer running)" in capsys.readouterr().err
    assert not (run / ".lock").exists()


def test_lock_is_exclusive_within_a_host(tmp_path):
    first = rundir.RunLock(tmp_path)
    assert first.acquire() is None
    with pytest.raises(ValueError, match="is in use by another tedmoe run"):
        rundir.RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / ".lock").exists()


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    """Even beside newer checkpoints of another history, the new one and its predecessors stay."""
    from tedmoe.model.transformer import GPTMoE
    from tedmoe.parallel.topology import Topology
    from tedmoe.runtime import checkpoint as ckpt
    from tedmoe.runtime.engine import Engine

    cfg = load_run_config(None, "tiny")
    topo = Topology.single()
    model = GPTMoE(cfg.model, topo)
    engine = Engine(model, topo, cfg.train)
    root = tmp_path / "checkpoints"
    for step in (300, 1, 2, 3):
        ckpt.save_checkpoint(root, step, model, engine.optimizer, topo, {"config": {}}, keep=2)
    names = sorted(p.name for p in root.glob("step_*"))
    assert names == ["step_0000002", "step_0000003", "step_0000300"], names
    assert (root / "latest").read_text() == "step_0000003"
    assert ckpt.latest_checkpoint(root).name == "step_0000003"
    assert ckpt.read_meta(root / "step_0000003")["step"] == 3


def test_offload_path_without_room(capsys, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - (1 << 16), 1 << 16))
    code, err = run(capsys, "--out", tmp_path / "r", *sets("train.offload=disk", f"train.offload_path={tmp_path}"))
    _one_line(code, err, f"train.offload_path='{tmp_path}' has 0 MiB free but the offloaded optimizer states need "
              "about")
    assert "free space there or choose a larger disk" in err[0]
    assert not (tmp_path / "r").exists() and list(tmp_path.iterdir()) == []
