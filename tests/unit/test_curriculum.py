"""Curriculum learning: the schedules' values, the rarity metric against a loop of the test's own,
the sampler drawing only from the easiest windows and truncating to the scheduled length, a pure
function of (seed, step), and a run stopped and resumed under a curriculum equal to the
uninterrupted one."""

import json
import math

import numpy as np
import pytest
import torch

from tedmoe.config.schema import CurriculumConfig
from tedmoe.config.schema import ScheduleConfig
from tedmoe.data import curriculum as cur
from tedmoe.data.dataset import DATASET_FILES, TokenDataset, prepare


def test_the_schedules():
    lin = ScheduleConfig(schedule="fixed_linear", start=8, end=32, steps=10)
    assert [cur.difficulty(lin, s, 64) for s in (0, 5, 10, 99)] == [8, 20, 32, 32]
    root = ScheduleConfig(schedule="fixed_root", start=10, steps=100, root_degree=2)  # end: the full 100
    assert cur.difficulty(root, 25, 100) == pytest.approx(10 + 90 * 0.5)
    disc = ScheduleConfig(schedule="fixed_discrete", values=(16, 24, 32), boundaries=(3, 7))
    assert [cur.difficulty(disc, s, 32) for s in (0, 2, 3, 6, 7, 50)] == [16, 16, 24, 24, 32, 32]
    assert cur.difficulty(ScheduleConfig(), 0, 64) == 64


def test_block_rarity_is_the_mean_negative_log_unigram_frequency():
    tokens = np.random.default_rng(0).integers(0, 7, 200)
    got = cur.block_rarity(tokens, 10)
    freq = {t: list(tokens).count(t) / len(tokens) for t in set(tokens.tolist())}
    for b in range(math.ceil(200 / cur.BLOCK)):
        block = tokens[b * cur.BLOCK:(b + 1) * cur.BLOCK]
        assert got[b] == pytest.approx(sum(-math.log(freq[t]) for t in block.tolist()), rel=1e-5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    # files of common and of rare bytes: windows inside the rare text are the hard ones
    (root / "common.txt").write_text("ab " * 4000)
    (root / "rare.txt").write_text("".join(chr(33 + (i * 7919) % 90) for i in range(6000)))
    out = prepare([str(root / "common.txt"), str(root / "rare.txt")], root / "ds")
    assert cur.RARITY_FILE in DATASET_FILES and (out / cur.RARITY_FILE).is_file()
    return TokenDataset(out, "train")


def window_scores(ds, seq_len):
    """Each block-aligned window's mean negative log unigram frequency, by a plain loop."""
    tokens = np.asarray(ds.tokens, dtype=np.int64)
    counts = np.bincount(tokens, minlength=256)
    nll = -np.log(np.maximum(counts, 1) / len(tokens))
    starts = range(0, len(tokens) - seq_len - 1 + 1, cur.BLOCK)
    span = math.ceil((seq_len + 1) / cur.BLOCK) * cur.BLOCK
    return {s: nll[tokens[s:s + span]].sum() / len(tokens[s:s + span]) for s in starts}


def test_the_sampler_draws_the_easiest_windows_and_truncates(dataset):
    c = CurriculumConfig(seqlen=ScheduleConfig(schedule="fixed_linear", start=16, steps=4),
                         rarity=ScheduleConfig(schedule="fixed_linear", start=20, steps=4))
    sampler = cur.CurriculumSampler(dataset, 64, 32, seed=3, curriculum=c)
    scores = window_scores(dataset, 64)
    ranked = sorted(scores, key=lambda s: scores[s])
    easiest = set(ranked[:math.ceil(len(ranked) * 0.2)])
    tokens = torch.from_numpy(np.asarray(dataset.tokens, dtype=np.int64))
    first = sampler.batch(0)
    assert first.shape == (32, 17)  # 16 tokens + the shifted target
    for row in first:  # every window starts at one of the easiest 20 percent of offsets
        assert any(torch.equal(row, tokens[s:s + 17]) for s in easiest)
    assert sampler.batch(4).shape == (32, 65)
    rare = {s for s in scores if scores[s] > np.median(list(scores.values()))}
    assert not (easiest & rare)  # the common text comes first
    again = cur.CurriculumSampler(dataset, 64, 32, seed=3, curriculum=c)
    for step in (0, 2, 7):
        assert torch.equal(sampler.batch(step), again.batch(step))  # a function of (seed, step)
    assert not torch.equal(sampler.batch(1), cur.CurriculumSampler(dataset, 64, 32, 4, c).batch(1))


def test_kill_and_resume_under_a_curriculum_is_exact(tmp_path, monkeypatch):
    from tedmoe.cli import main

    monkeypatch.setenv("TEDMOE_CACHE", str(tmp_path / "cache"))
    sets = ["--set", "train.max_steps=6", "--set", "progress=false", "--set", "checkpoint_every=2",
            "--set", "data.curriculum.seqlen.schedule=fixed_root", "--set", "data.curriculum.seqlen.start=8",
            "--set", "data.curriculum.seqlen.steps=5", "--set", "data.curriculum.rarity.schedule=fixed_linear",
            "--set", "data.curriculum.rarity.start=5", "--set", "data.curriculum.rarity.steps=5"]

    def train(out, *extra):
        assert main(["train", "--preset", "tiny", "--nproc", "1", "--out", str(tmp_path / out), *sets, *extra]) == 0
        return [json.loads(x) for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]

    whole = train("whole")
    train("resumed", "--set", "stop_after=3")
    resumed = train("resumed", "--resume")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]
    # 8 + 24 sqrt(step / 5), rounded down to a multiple of 8
    assert [r["curriculum"]["seq_len"] for r in whole] == [8, 16, 16, 24, 24, 32]
    assert [r["tokens"] for r in whole] == [8 * r["curriculum"]["seq_len"] for r in whole]
