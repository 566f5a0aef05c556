"""Mistakes under every launch: `tedmoe train --nproc N`, several machines (`--nnodes`), torchrun
and SLURM end in one `tedmoe: error: ...` line with a non-zero exit and no traceback from tedmoe."""

import os
import socket
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**os.environ, "TEDMOE_CACHE": str(tmp_path_factory.mktemp("cache")), "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tedmoe(env, *args, **extra):
    return subprocess.run([sys.executable, "-m", "tedmoe.cli", *map(str, args)], env={**env, **extra},
                          capture_output=True, text=True, timeout=240)


def test_a_failing_rank_is_one_line(env, tmp_path):
    res = tedmoe(env, "train", "--preset", "tiny", "--nproc", "2", "--out", tmp_path / "r", TEDMOE_FAULT="raise@1:2")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == ["tedmoe: error: rank 1: injected failure on rank 1 at step 2"], res.stderr


def test_debug_shows_the_traceback(env, tmp_path):
    res = tedmoe(env, "--debug", "train", "--preset", "tiny", "--out", tmp_path / "r", "--set", "seq_len=0")
    assert res.returncode != 0 and "Traceback" in res.stderr and "seq_len=0 is not allowed" in res.stderr


def test_machines_without_a_meeting_point(env, tmp_path):
    res = tedmoe(env, "train", "--preset", "tiny", "--nproc", "2", "--nnodes", "2", "--out", tmp_path / "r")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["tedmoe: error: --nnodes 2 needs --rdzv-endpoint HOST:PORT (the same "
                                               "on every machine)"]


def test_slurm_task_with_a_bad_setting(env, tmp_path):
    res = tedmoe(env, "train", "--preset", "tiny", "--out", tmp_path / "r", "--set", "parallel.tp=3",
                 SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_LOCALID="0", SLURM_LAUNCH_NODE_IPADDR="127.0.0.1",
                 MASTER_PORT=str(free_port()))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["tedmoe: error: tp=3 does not divide world_size=1; choose tp from the "
                                               "divisors of 1: [1]"], res.stderr


def test_torchrun_with_a_bad_setting(env, tmp_path):
    """Our line comes first and is torchrun's root cause; torchrun's agent then prints its own
    failure report (that process is torchrun's, not ours)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "tedmoe.cli",
           "train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--set", "train.lr=-1"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode != 0
    line = "tedmoe: error: train.lr=-1 is not allowed: it must be a finite number > 0"
    ours = [x for x in res.stderr.splitlines() if x.startswith("tedmoe:")]
    assert ours == [line], res.stderr
    assert f"traceback : {line}" in res.stderr  # the agent's report names our line as the root cause
    assert 'File "' not in res.stderr.split(line)[0] and "tedmoe/" not in res.stderr  # no traceback of ours
