"""Token files: ``prepare`` writes them, ``TokenDataset`` memory-maps them, ``BatchSampler``
draws deterministic, resumable batches from them.

A prepared directory holds ``train.bin`` and ``val.bin`` (little-endian uint16 or uint32
tokens), ``tokenizer.json`` and ``meta.json`` (counts, dtype and a checksum of each file).
"""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import torch

from tedmoe.data.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer
from tedmoe.fileio import sha256_file


def embedded_corpus_files(max_bytes: int) -> list[str]:
    """The running interpreter's standard-library ``.py`` files, in a fixed order, up to
    ``max_bytes``: real text on every machine, nothing downloaded or copied."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or not path.is_file():
            continue
        files.append(str(path))
        total += path.stat().st_size
        if total >= max_bytes:
            break
    if not files:
        raise ValueError(f"no Python sources found under {root} for the embedded corpus; pass data.path")
    return files


def prepare(inputs: list[str], out_dir: str | Path, tokenizer: str = "byte", bpe_vocab_size: int = 2048,
            val_fraction: float = 0.05) -> Path:
    """Tokenize text files (directories are searched for ``*.txt``, ``*.md``, ``*.py``) into
    ``out_dir``. The last ``val_fraction`` of each file's tokens goes to validation."""
    files: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(str(f) for f in p.rglob("*") if f.suffix in (".txt", ".md", ".py") and f.is_file())
        elif p.is_file():
            files.append(str(p))
        else:
            raise ValueError(f"input {item} does not exist")
    if not files:
        raise ValueError(f"no text files found in {', '.join(inputs)}")
    tok = ByteTokenizer() if tokenizer == "byte" else BPETokenizer.train(files, bpe_vocab_size)
    train, val = [], []
    for f in files:
        ids = tok.encode(Path(f).read_text(encoding="utf-8", errors="replace"))
        cut = len(ids) - int(len(ids) * val_fraction)
        train += ids[:cut]
        val += ids[cut:]
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    meta = {"tokenizer": tok.kind, "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name, "files": len(files)}
    for split, ids in (("train", train), ("val", val)):
        np.asarray(ids, dtype=dtype).tofile(tmp / f"{split}.bin")
        meta[split] = {"tokens": len(ids), "sha256": sha256_file(tmp / f"{split}.bin")}
    tok.save(tmp)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)  # complete or absent, never half-written
    return out


class TokenDataset:
    """One split of a prepared directory, memory-mapped and checked against ``meta.json``."""

    def __init__(self, directory: str | Path, split: str, verify: bool = True):
        d = Path(directory)
        meta_path = d / "meta.json"
        if not meta_path.is_file():
            raise ValueError(f"{d} is not a prepared dataset (no meta.json); run `tedmoe data prepare`")
        meta = json.loads(meta_path.read_text())
        path = d / f"{split}.bin"
        if not path.is_file():
            raise ValueError(f"{path} is missing; prepare the data again")
        dtype = np.dtype(meta["dtype"])
        expect = meta[split]["tokens"] * dtype.itemsize
        if path.stat().st_size != expect:
            raise ValueError(f"{path} has {path.stat().st_size} bytes, meta.json says {expect}: the file is "
                             "truncated or replaced; prepare the data again")
        if verify and sha256_file(path) != meta[split]["sha256"]:
            raise ValueError(f"{path} does not match its checksum in meta.json: the file is corrupted; "
                             "prepare the data again")
        self.meta, self.vocab_size = meta, meta["vocab_size"]
        self.tokens = np.memmap(path, dtype=dtype, mode="r")
        self.tokenizer = load_tokenizer(d)

    def __len__(self) -> int:
        return len(self.tokens)

    def windows(self, offsets: torch.Tensor, length: int) -> torch.Tensor:
        """``[len(offsets), length]`` int64 tokens starting at each offset."""
        idx = offsets.numpy()[:, None] + np.arange(length)[None, :]
        return torch.from_numpy(self.tokens[idx].astype(np.int64))


class BatchSampler:
    """Global batches of random windows, a pure function of ``(seed, step)``: the same in every
    layout, and resumable from the step number alone (its state is ``{"seed", "step"}``)."""

    def __init__(self, dataset: TokenDataset, seq_len: int, global_batch: int, seed: int):
        if len(dataset) <= seq_len + 1:
            raise ValueError(f"the dataset has {len(dataset)} tokens, too few for seq_len={seq_len}; "
                             "use more data or a shorter seq_len")
        self.dataset, self.seq_len, self.global_batch, self.seed = dataset, seq_len, global_batch, seed
        self.step = 0

    def batch(self, step: int) -> torch.Tensor:
        """``[global_batch, seq_len + 1]`` tokens of this step (inputs and shifted targets)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        offsets = torch.randint(0, len(self.dataset) - self.seq_len - 1, (self.global_batch,), generator=g)
        return self.dataset.windows(offsets, self.seq_len + 1)

    def micro_batches(self, dp: int, dp_rank: int, micro: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This DP rank's consecutive share of the next batch, as micro-batches; advances a step."""
        data = self.batch(self.step)
        self.step += 1
        mine = data.chunk(dp)[dp_rank]
        return [(m[:, :-1], m[:, 1:]) for m in mine.split(micro)]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.step = state["seed"], state["step"]
