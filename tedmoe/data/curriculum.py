"""Curriculum learning: difficulty metrics stored beside the tokens, schedules over the steps, and
a sampler that stays a pure function of (seed, step).

Vocabulary rarity (the data-efficiency work's best metric with sequence length): the token stream
of the train split is cut into blocks of ``BLOCK`` tokens; ``data prepare`` stores each block's sum
of ``-log p(token)`` under the split's unigram distribution (``train.rarity.f32``). A training
window of ``seq_len + 1`` tokens starting at a block boundary has as difficulty the mean over the
blocks it covers; windows are ranked once per run, and a step at difficulty ``d`` percent draws its
windows uniformly among the easiest ``d`` percent. Sequence length: a step at difficulty ``L``
truncates every sequence of the batch to its first ``L`` tokens (a multiple of ``multiple``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from tedmoe.data.dataset import BatchSampler

BLOCK = 64
RARITY_FILE = "train.rarity.f32"


def difficulty(schedule, step: int, full: float) -> float:
    """The scheduled difficulty at ``step`` (0-based) of a ``ScheduleConfig``."""
    end = full if schedule.end is None else schedule.end
    if schedule.schedule == "none":
        return full
    if schedule.schedule == "fixed_discrete":
        return schedule.values[sum(step >= b for b in schedule.boundaries)]
    progress = min(1.0, step / schedule.steps)
    if schedule.schedule == "fixed_root":
        progress = progress ** (1.0 / schedule.root_degree)
    return schedule.start + (end - schedule.start) * progress


def block_rarity(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """Per block of ``BLOCK`` tokens: the sum of ``-log p`` of its tokens (p: unigram frequency)."""
    counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    nll = -np.log(np.maximum(counts, 1) / max(len(tokens), 1))
    per_token = nll[tokens]
    blocks = math.ceil(len(tokens) / BLOCK)
    padded = np.zeros(blocks * BLOCK)
    padded[:len(tokens)] = per_token
    return padded.reshape(blocks, BLOCK).sum(1).astype(np.float32)


def write_metrics(directory: Path, tokens: np.ndarray, vocab_size: int) -> dict:
    """Write the train split's block rarities into ``directory``; returns the meta.json entry."""
    block_rarity(np.asarray(tokens, dtype=np.int64), vocab_size).tofile(directory / RARITY_FILE)
    return {"block": BLOCK, "rarity": RARITY_FILE}


def ensure_metrics(directory: str | Path) -> None:
    """Datasets prepared before the metrics existed get them once (written atomically)."""
    from tedmoe.fileio import write_atomic

    d = Path(directory)
    if (d / RARITY_FILE).is_file():
        return
    meta = json.loads((d / "meta.json").read_text())
    tokens = np.fromfile(d / "train.bin", dtype=np.dtype(meta["dtype"]))
    tmp = d / f"{RARITY_FILE}.tmp"
    block_rarity(tokens.astype(np.int64), meta["vocab_size"]).tofile(tmp)
    tmp.replace(d / RARITY_FILE)
    meta["metrics"] = {"block": BLOCK, "rarity": RARITY_FILE}
    write_atomic(d / "meta.json", json.dumps(meta, indent=2))


class CurriculumSampler(BatchSampler):
    """``BatchSampler`` with a curriculum: the global batch of step ``s`` depends on (seed, s)
    and the schedules only, so its state is still ``{"seed", "step"}``."""

    def __init__(self, dataset, seq_len: int, global_batch: int, seed: int, curriculum):
        super().__init__(dataset, seq_len, global_batch, seed)
        self.curriculum = curriculum
        self.order = None
        if curriculum.rarity.schedule != "none":
            path = Path(dataset.directory) / RARITY_FILE
            if not path.is_file():
                raise ValueError(f"{dataset.directory} has no vocabulary-rarity metrics; prepare it again with "
                                 "`tedmoe data prepare` (the metrics are computed then)")
            per_block = np.fromfile(path, dtype=np.float32).astype(np.float64)
            span = math.ceil((seq_len + 1) / BLOCK)
            starts = (len(dataset) - seq_len - 1) // BLOCK + 1  # windows starting at a block boundary
            csum = np.concatenate([[0.0], np.cumsum(per_block)])
            ends = np.minimum(np.arange(starts) + span, len(per_block))
            score = (csum[ends] - csum[:starts]) / ((ends - np.arange(starts)) * BLOCK)
            self.order = torch.from_numpy(np.argsort(score, kind="stable") * BLOCK)  # window offsets, easiest first

    def length(self, step: int) -> int:
        c = self.curriculum.seqlen
        if c.schedule == "none":
            return self.seq_len
        L = int(difficulty(c, step, self.seq_len))
        return max(c.multiple, L - L % c.multiple)

    def share(self, step: int) -> float:
        """Percent of the windows, easiest first, that step ``step`` draws from."""
        return difficulty(self.curriculum.rarity, step, 100.0)

    def batch(self, step: int) -> torch.Tensor:
        if self.order is None:
            data = super().batch(step)
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            allowed = max(1, math.ceil(len(self.order) * self.share(step) / 100))
            picks = torch.randint(0, allowed, (self.global_batch,), generator=g)
            data = self.dataset.windows(self.order[picks], self.seq_len + 1)
        return data[:, :self.length(step) + 1]
