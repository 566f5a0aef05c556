"""The real CLI, as a user runs it: under torchrun as a subprocess, asserting on what it wrote."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tedmoe.config import model_config_from_dict
from tedmoe.inference.generate import load_model
from tedmoe.model.transformer import GPTMoE
from tedmoe.parallel.topology import Topology

TINY = ["--preset", "tiny", "--set", "checkpoint_every=3", "--set", "keep_checkpoints=3"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**os.environ, "TEDMOE_CACHE": str(tmp_path_factory.mktemp("cache")), "OMP_NUM_THREADS": "1"}


def torchrun(env, nproc, *args, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "tedmoe.cli", *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def tedmoe(env, *args):
    return subprocess.run([sys.executable, "-m", "tedmoe.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def losses(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def run_a(env, tmp_path_factory):
    """6 steps on 4 ranks, TP 2 x EP 2 x DP 2, checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("run") / "a"
    torchrun(env, 4, "train", *TINY, "--set", "parallel.tp=2", "--set", "parallel.ep=2", "--out", str(out))
    return out


def test_train_writes_metrics_checkpoints_and_export(run_a):
    rows = [json.loads(line) for line in (run_a / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "ce", "aux", "z", "lr", "grad_norm", "tokens_per_s", "tokens_per_expert", "drop_fraction",
                "comm_bytes"):
        assert key in rows[-1], key
    assert {"all_to_all", "all_reduce", "all_gather", "reduce_scatter"} <= set(rows[-1]["comm_bytes"])
    assert len(rows[-1]["tokens_per_expert"]) == 2 and len(rows[-1]["tokens_per_expert"][0]) == 4  # 2 MoE blocks
    assert "val_loss" in rows[2] and "val_loss" in rows[5]
    assert rows[-1]["loss"] < rows[0]["loss"]
    ckpts = run_a / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_0000006"
    assert (ckpts / "step_0000003" / "meta.json").is_file() and not list(ckpts.glob(".tmp-*"))
    meta = json.loads((ckpts / "step_0000006" / "meta.json").read_text())
    assert meta["layout"] == {"tp": 2, "ep": 2, "dp": 2} and meta["sampler"]["step"] == 6


def test_export_loads_into_one_process_with_equal_logits(run_a):
    cfg = model_config_from_dict(json.loads((run_a / "model_config.json").read_text()))
    exported = GPTMoE(cfg, Topology.single())
    exported.load_state_dict(load_file(str(run_a / "model.safetensors")))
    from_ckpt, _ = load_model(run_a)  # the step-6 DCP checkpoint, resharded to one process
    ids = torch.randint(0, 256, (2, 20))
    torch.testing.assert_close(exported.logits(ids), from_ckpt.logits(ids), rtol=0, atol=0)


def test_resume_is_bit_exact(env, run_a, tmp_path):
    out = tmp_path / "b"
    args = ["train", *TINY, "--set", "parallel.tp=2", "--set", "parallel.ep=2", "--out", str(out)]
    torchrun(env, 4, *args, "--set", "stop_after=3")
    assert sorted(losses(out)) == [1, 2, 3] and not (out / "model.safetensors").exists()
    torchrun(env, 4, *args, "--resume")
    assert losses(out) == losses(run_a)


def test_reshard_resumes_in_another_layout(env, run_a, tmp_path):
    out = tmp_path / "c"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(run_a / "checkpoints" / "step_0000003", out / "checkpoints" / "step_0000003")
    shutil.copy(run_a / "metrics.jsonl", out / "metrics.jsonl")
    torchrun(env, 4, "train", *TINY, "--set", "parallel.tp=1", "--set", "parallel.ep=4", "--out", str(out), "--resume")
    got, want = losses(out), losses(run_a)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    meta = json.loads((out / "checkpoints" / "step_0000006" / "meta.json").read_text())
    assert meta["layout"] == {"tp": 1, "ep": 4, "dp": 4}


def test_plot_and_generate(env, run_a):
    out = tedmoe(env, "plot", str(run_a))
    assert out.returncode == 0, out.stderr
    for name in ("loss.png", "expert_load.png", "communication.png"):
        data = (run_a / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    out = tedmoe(env, "generate", "--ckpt", str(run_a), "--prompt", "def ", "--max-new-tokens", "30", "--greedy")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("def ") and len(out.stdout.rstrip("\n")) > len("def ")


def test_generate_across_ranks_gives_the_one_process_text(env, run_a):
    """``tedmoe generate --nproc N`` launches the engine on N ranks (the checkpoint, saved in
    TP 2 x EP 2 x DP 2, resharded to each serving layout): the same greedy text everywhere."""
    args = ["generate", "--ckpt", str(run_a), "--prompt", "def main(", "--max-new-tokens", "24", "--greedy"]
    one = tedmoe(env, *args)
    assert one.returncode == 0, one.stderr
    for layout in (["--nproc", "2", "--set", "parallel.ep=2"], ["--nproc", "4", "--set", "parallel.tp=2",
                                                                  "--set", "parallel.ep=2"]):
        out = tedmoe(env, *args, *layout)
        assert out.returncode == 0, out.stderr
        assert out.stdout == one.stdout, layout
        assert "KV cache" in out.stderr and "tokens per rank" in out.stderr


@pytest.mark.parametrize("nproc", [1, 2])
def test_serve_answers_the_openai_client_and_stops_cleanly_on_sigterm(env, run_a, nproc):
    """``tedmoe serve`` (one process, and 2 ranks EP 2): the official client gets the greedy text
    ``tedmoe generate`` gives; SIGTERM stops it with exit 0 and a line saying what was in flight."""
    import signal
    import socket

    openai = pytest.importorskip("openai")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    layout = ["--nproc", "2", "--set", "parallel.ep=2"] if nproc == 2 else []
    proc = subprocess.Popen([sys.executable, "-m", "tedmoe.cli", "serve", "--ckpt", str(run_a), "--port", str(port),
                             *layout], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not any("tedmoe: serving" in line for line in lines):
            line = proc.stderr.readline()
            assert line, f"the server exited: {''.join(lines)}"
            lines.append(line)
        assert f"at http://127.0.0.1:{port}/v1" in lines[-1] and "KV cache" in lines[-1]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        text = client.completions.create(model=run_a.name, prompt="def main(", max_tokens=16,
                                         temperature=0).choices[0].text
        want = tedmoe(env, "generate", "--ckpt", str(run_a), "--prompt", "def main(", "--max-new-tokens", "16",
                      "--greedy").stdout
        assert "def main(" + text + "\n" == want
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "tedmoe: server stopped; 0 request(s) in flight finished, 0 cancelled" in err, err


@pytest.mark.parametrize("args,message", [
    (["--nproc", "3", "--set", "parallel.tp=2"], "tp=2 does not divide world_size=3"),
    (["--set", "model.hidden_size=8"], "generate takes only parallel.* settings"),
    (["--set", "parallel.sp=2", "--nproc", "2"], "generation runs TP x EP layouts"),
    (["--nproc", "2", "--set", "parallel.ep=3"], "ep=3"),
])
def test_generate_refuses_bad_layouts_before_starting_ranks(env, run_a, args, message):
    out = tedmoe(env, "generate", "--ckpt", str(run_a), "--prompt", "x", *args)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_print_config_and_data_prepare(env, tmp_path):
    out = tedmoe(env, "train", "--preset", "tiny", "--set", "model.moe.top_k=1", "--print-config")
    assert out.returncode == 0 and "[model.moe]" in out.stdout and "top_k = 1" in out.stdout
    (tmp_path / "a.txt").write_text("hello tedmoe " * 400)
    out = tedmoe(env, "data", "prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "ds"))
    assert out.returncode == 0, out.stderr
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["train"]["tokens"] + meta["val"]["tokens"] == len("hello tedmoe " * 400)


@pytest.mark.parametrize("args,message", [
    (["--config", "missing.toml"], "config file missing.toml does not exist"),
    (["--set", "model.moe.topk=2"], "unknown config key 'model.moe.topk'; valid keys in [model.moe]: activation,"),
    (["--nproc", "3", "--set", "parallel.tp=2"], "tp=2 does not divide world_size=3"),
    (["--set", "data.path=\"/nonexistent\""], "/nonexistent is not a prepared dataset"),
    (["--set", "global_batch_size=7"], "global_batch_size=7 is not a multiple of micro_batch_size=2 x dp=1"),
])
def test_bad_input_is_one_line(env, args, message):
    out = tedmoe(env, "train", "--preset", "tiny", *args)
    assert out.returncode == 2
    assert out.stderr.startswith("tedmoe: error: ") and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_corrupted_checkpoint_is_refused_and_kept(env, run_a, tmp_path):
    out = tmp_path / "d"
    shutil.copytree(run_a, out)
    shard = sorted((out / "checkpoints" / "step_0000006").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    res = tedmoe(env, "train", *TINY, "--nproc", "4", "--set", "parallel.tp=2", "--set", "parallel.ep=2",
                 "--out", str(out), "--resume")
    assert res.returncode == 2 and "is corrupted" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}  # nothing overwritten
