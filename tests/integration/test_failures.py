"""Failures end runs loudly and lose nothing: a dead rank, a hung rank, a kill during a save, a
crash then --resume, non-finite gradients. Faults are injected with TEDMOE_FAULT (tedmoe/runtime/faults.py)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY4 = ["--preset", "tiny", "--nproc", "4", "--set", "parallel.tp=2", "--set", "parallel.ep=2",
         "--set", "checkpoint_every=3", "--set", "keep_checkpoints=3"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import os

    return {**os.environ, "TEDMOE_CACHE": str(tmp_path_factory.mktemp("cache")), "OMP_NUM_THREADS": "1"}


def tedmoe(env, *args, fault=None, timeout=240):
    e = dict(env, TEDMOE_FAULT=fault) if fault else env
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "tedmoe.cli", *args], env=e, capture_output=True, text=True,
                         timeout=timeout, start_new_session=True)  # its own process group, as in a terminal
    return out, time.monotonic() - t0


def leftover_ranks() -> list[str]:
    """Rank processes still alive (polled for a few seconds: the agent reaps them)."""
    for _ in range(20):
        ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout.splitlines()
        alive = [line for line in ps if "-m tedmoe.cli" in line and "ps -eo" not in line]
        if not alive:
            return []
        time.sleep(0.25)
    return alive


def losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def uninterrupted(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("ok") / "run"
    res, _ = tedmoe(env, "train", *TINY4, "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    return losses(out)


def test_dead_rank_ends_the_run_with_its_name(env, tmp_path):
    res, seconds = tedmoe(env, "train", *TINY4, "--set", "parallel.timeout_s=60", "--out", str(tmp_path / "r"),
                          fault="kill@2:3")
    assert res.returncode != 0
    assert "tedmoe: error: rank 2 was killed by SIGKILL; the run stopped" in res.stderr, res.stderr[-2000:]
    assert seconds < 60, seconds  # well inside the collective timeout: the agent sees the death at once
    assert leftover_ranks() == []
    print(f"dead rank: run ended {seconds:.1f} s after launch")


def test_hung_rank_times_out(env, tmp_path):
    res, seconds = tedmoe(env, "train", *TINY4, "--set", "parallel.timeout_s=8", "--out", str(tmp_path / "r"),
                          fault="hang@1:3")
    assert res.returncode == 1, res.stderr[-2000:]
    assert res.stderr.startswith("tedmoe: error: rank 1 stopped answering"), res.stderr[-2000:]  # the hung one
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert seconds < 8 + 70, seconds  # start-up, two steps, then the 8 s collective timeout (2 busy cores)
    assert leftover_ranks() == []
    print(f"hung rank: run ended {seconds:.1f} s after launch (timeout 8 s)")


def test_crash_then_resume_equals_uninterrupted(env, tmp_path, uninterrupted):
    run = tmp_path / "r"
    res, _ = tedmoe(env, "train", *TINY4, "--out", str(run), fault="kill@1:5")
    assert res.returncode != 0 and "rank 1 was killed" in res.stderr
    assert (run / "checkpoints" / "latest").read_text() == "step_0000003"
    res, _ = tedmoe(env, "train", *TINY4, "--out", str(run), "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert losses(run) == uninterrupted


DATA_EFFICIENT = ["--set", "train.zero_stage=2", "--set", "train.reduce_bucket_size=2000", "--set", "model.num_layers=3",
                  "--set", "model.random_ltd.layers=[1]", "--set", "model.random_ltd.start=8",
                  "--set", "model.random_ltd.steps=5", "--set", "data.curriculum.seqlen.schedule=fixed_linear",
                  "--set", "data.curriculum.seqlen.start=16", "--set", "data.curriculum.seqlen.steps=4",
                  "--set", "data.curriculum.rarity.schedule=fixed_root", "--set", "data.curriculum.rarity.start=20",
                  "--set", "data.curriculum.rarity.steps=4"]


def test_crash_then_resume_with_zero2_curriculum_and_random_ltd(env, tmp_path):
    """A rank killed mid-run under ZeRO-2, a curriculum and random-LTD: the resumed run's losses are
    the uninterrupted run's (the sampler and the draws are functions of the step)."""
    whole, run = tmp_path / "whole", tmp_path / "r"
    res, _ = tedmoe(env, "train", *TINY4, *DATA_EFFICIENT, "--out", str(whole))
    assert res.returncode == 0, res.stderr[-2000:]
    res, _ = tedmoe(env, "train", *TINY4, *DATA_EFFICIENT, "--out", str(run), fault="kill@2:5")
    assert res.returncode != 0 and "rank 2 was killed" in res.stderr
    res, _ = tedmoe(env, "train", *TINY4, *DATA_EFFICIENT, "--out", str(run), "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert losses(run) == losses(whole)
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [r["curriculum"]["seq_len"] for r in rows] == [16, 16, 24, 24, 32, 32]


def test_kill_during_save_keeps_the_previous_checkpoint(env, tmp_path, uninterrupted):
    run = tmp_path / "r"
    res, _ = tedmoe(env, "train", *TINY4, "--out", str(run), fault="kill_in_save@0:6")
    assert res.returncode != 0
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_0000003"  # never moved to the half-written save
    assert (ckpts / ".tmp-step_0000006").is_dir() and not (ckpts / "step_0000006").exists()
    res, _ = tedmoe(env, "train", *TINY4, "--out", str(run), "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert losses(run) == uninterrupted and not (ckpts / ".tmp-step_0000006").exists()


def test_non_finite_gradients_stop_or_skip(env, tmp_path):
    one = ["--preset", "tiny", "--nproc", "1", "--set", "checkpoint_every=3"]
    res, _ = tedmoe(env, "train", *one, "--out", str(tmp_path / "a"), fault="nan@all:4")
    assert res.returncode == 3
    assert "tedmoe: error: gradient norm is nan at step 4" in res.stderr
    assert f"The last good checkpoint is {tmp_path / 'a' / 'checkpoints' / 'step_0000003'}" in res.stderr
    assert "Traceback" not in res.stderr
    res, _ = tedmoe(env, "train", *one, "--set", "train.max_bad_steps=1", "--out", str(tmp_path / "b"),
                    fault="nan@all:4")
    assert res.returncode == 0 and "step 4 skipped (non-finite gradients)" in res.stderr
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [False, False, False, True, False, False]


@pytest.mark.parametrize("nproc", [4, 1])
def test_ctrl_c_saves_says_what_it_kept_and_resumes(env, tmp_path, uninterrupted, nproc):
    run = tmp_path / "r"
    args = TINY4 if nproc == 4 else ["--preset", "tiny", "--nproc", "1", "--set", "checkpoint_every=3"]
    res, seconds = tedmoe(env, "train", *args, "--out", str(run), fault="sigint@0:4")  # Ctrl-C during step 4
    assert res.returncode == 130, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert lines == [f"tedmoe: interrupted after step 4; kept the checkpoint {run / 'checkpoints' / 'step_0000004'} "
                     "(continue with --resume)"], res.stderr[-2000:]
    assert (run / "checkpoints" / "latest").read_text() == "step_0000004"
    assert sorted(losses(run)) == [1, 2, 3, 4] and not (run / ".lock").exists()
    res, _ = tedmoe(env, "train", *args, "--out", str(run), "--resume")
    assert res.returncode == 0 and "resuming from step 4 of" in res.stderr, res.stderr[-2000:]
    if nproc == 4:
        assert losses(run) == uninterrupted
    assert leftover_ranks() == []


def test_crash_then_resume_with_zero3_and_disk_offload(env, tmp_path, uninterrupted):
    """ZeRO-3 with the optimizer states and parameter shards in files: the same losses as the
    uninterrupted ZeRO-1 run, a rank killed at step 5 and ``--resume`` continues exactly; a run that
    ends removes its files (a killed rank cannot: its directory stays, named for its rank)."""
    offload = tmp_path / "nvme"
    offload.mkdir()
    sets = ["--set", "train.zero_stage=3", "--set", "train.offload=disk", "--set", f"train.offload_path={offload}"]
    run = tmp_path / "r"
    res, _ = tedmoe(env, "train", *TINY4, *sets, "--out", str(run), fault="kill@2:5")
    assert res.returncode != 0 and "rank 2 was killed" in res.stderr
    left = {p.name.split("-")[2] for p in offload.iterdir()}
    assert left <= {f"rank{r}" for r in range(4)}
    res, _ = tedmoe(env, "train", *TINY4, *sets, "--out", str(run), "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert losses(run) == pytest.approx(uninterrupted, rel=1e-5)
    assert {p.name.split("-")[2] for p in offload.iterdir()} == left  # the resumed run cleaned up after itself
