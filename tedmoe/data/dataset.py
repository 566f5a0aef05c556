"""Token files: ``prepare`` writes them, ``TokenDataset`` memory-maps them, ``BatchSampler``
draws deterministic, resumable batches from them.

A prepared directory holds ``train.bin`` and ``val.bin`` (little-endian uint16 or uint32
tokens), ``tokenizer.json`` (with ``tokenizer_config.json`` for a model directory's tokenizer) and
``meta.json`` (format marker, counts, dtype and a checksum of each file), and nothing else:
``prepare`` replaces only directories of exactly that shape.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import torch

from tedmoe.data.tokenizer import CONFIG_FILE, BPETokenizer, ByteTokenizer, HFTokenizer, load_tokenizer
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


DATASET_FILES = ("train.bin", "val.bin", "tokenizer.json", CONFIG_FILE, "meta.json", "train.rarity.f32")
FORMAT = "tedmoe-tokens"
_OLD_META_KEYS = {"tokenizer", "vocab_size", "dtype", "train", "val"}


def is_dataset(directory: Path) -> bool:
    """Whether ``directory`` is a dataset ``prepare`` wrote: nothing but its files, and a
    ``meta.json`` that parses (marked with ``FORMAT``, or with the keys of older datasets)."""
    try:
        entries = list(directory.iterdir())
        if not entries or any(e.name not in DATASET_FILES or not e.is_file() for e in entries):
            return False
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and (meta.get("format") == FORMAT or _OLD_META_KEYS <= meta.keys())


def _directory_tokenizer(name: str) -> HFTokenizer:
    """``--tokenizer DIR``: the ``tokenizer.json`` of a Hugging Face model or tokenizer directory."""
    d = Path(name)
    if not d.is_dir():
        what = "is a file, not a directory" if d.exists() else "does not exist"
        raise ValueError(f"unknown tokenizer {name!r}; use 'byte' or 'bpe', or a directory with tokenizer.json "
                         f"(--tokenizer {name} {what})")
    if not (d / "tokenizer.json").is_file():
        raise ValueError(f"--tokenizer {name} has no tokenizer.json: only the fast tokenizer.json format is read; "
                         "convert a sentencepiece tokenizer.model with transformers, e.g. "
                         "AutoTokenizer.from_pretrained(DIR).save_pretrained(NEW_DIR), and pass NEW_DIR")
    return HFTokenizer.load(d)


def _text_files(inputs: list[str]) -> list[Path]:
    """The input files, and the ``*.txt``, ``*.md``, ``*.py`` files under input directories."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".md", ".py") and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"input {item} does not exist")
    if not files:
        raise ValueError(f"no text files found in {', '.join(inputs)}")
    return files


def _check_out(out: Path, inputs: list[str], files: list[Path]) -> None:
    """Refuse an output directory whose replacement could touch anything but an old dataset."""
    for src in [Path(i).resolve() for i in inputs] + [f.resolve() for f in files]:
        if src == out or out in src.parents or (src.is_dir() and src in out.parents):
            raise ValueError(f"--out {out} overlaps the input {src}, so the sources could be read back or "
                             "replaced; choose an --out outside the inputs")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file; choose a directory path (new, empty, or a "
                         "previous tedmoe dataset)")
    if out.is_dir() and any(out.iterdir()) and not is_dataset(out):
        raise ValueError(f"--out {out} is a non-empty directory that is not a tedmoe dataset; choose a new "
                         "or empty directory (prepare only replaces datasets it wrote)")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"--out {out} is under {parent}, which is a file; choose a directory path")


def _split(tok, files: list[Path], val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Train and val tokens: the last ``val_fraction`` of each file's tokens is validation."""
    train, val = [], []
    for f in files:
        ids = tok.encode_file(f)
        cut = len(ids) - int(len(ids) * val_fraction)
        train.append(ids[:cut])
        val.append(ids[cut:])
    train_ids, val_ids = np.concatenate(train), np.concatenate(val)
    total = len(train_ids) + len(val_ids)
    counts = f"the inputs hold {total} tokens in {len(files)} file(s)"
    if not total:
        raise ValueError(f"{counts}: every input file is empty; add text to them")
    if not len(train_ids):
        raise ValueError(f"{counts} and --val-fraction {val_fraction} leaves the train split empty; "
                         "lower --val-fraction or add more text")
    if not len(val_ids):
        raise ValueError(f"{counts} and --val-fraction {val_fraction} leaves the val split empty (each file "
                         "gives int(tokens x fraction)); raise --val-fraction or add more text")
    return train_ids, val_ids


def _write(tmp: Path, tok, train: np.ndarray, val: np.ndarray, num_files: int) -> None:
    """The dataset files, written into the fresh directory ``tmp``."""
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    meta = {"format": FORMAT, "tokenizer": tok.kind, "vocab_size": tok.vocab_size, "dtype": np.dtype(dtype).name,
            "files": num_files}
    if tok.kind == "hf":  # for information only: the dataset holds the tokenizer itself
        meta["tokenizer_source"] = str(tok.source)
    for split, ids in (("train", train), ("val", val)):
        ids.astype(dtype).tofile(tmp / f"{split}.bin")
        meta[split] = {"tokens": len(ids), "sha256": sha256_file(tmp / f"{split}.bin")}
    from tedmoe.data.curriculum import write_metrics

    meta["metrics"] = write_metrics(tmp, train, tok.vocab_size)  # curriculum difficulty, computed once
    tok.save(tmp)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))


def _remove_dataset(directory: Path) -> None:
    """Delete a dataset ``prepare`` wrote (or an empty directory), by its known file names only."""
    for name in DATASET_FILES:
        (directory / name).unlink(missing_ok=True)
    directory.rmdir()


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an old dataset (or empty directory) there is set aside first and
    removed only once the new one is in place, so a failure leaves it untouched."""
    if not out.exists():
        tmp.rename(out)
        return
    aside = tmp.with_name(tmp.name + ".old")
    out.rename(aside)
    try:
        tmp.rename(out)
    except BaseException:
        aside.rename(out)
        raise
    _remove_dataset(aside)


def prepare(inputs: list[str], out_dir: str | Path, tokenizer: str = "byte", bpe_vocab_size: int = 2048,
            val_fraction: float = 0.05) -> Path:
    """Tokenize text files (directories are searched for ``*.txt``, ``*.md``, ``*.py``) into
    ``out_dir``. The last ``val_fraction`` of each file's tokens goes to validation.

    ``tokenizer`` is ``"byte"``, ``"bpe"`` (trained on the inputs, ``bpe_vocab_size`` tokens) or
    the path of a Hugging Face model or tokenizer directory holding ``tokenizer.json``, whose ids
    are used as they are (each file one document, between its BOS and EOS tokens).

    ``out_dir`` must be new, empty, or a dataset this function wrote earlier (replaced whole, or
    left as it was if anything fails); it may not overlap the inputs."""
    hf = None if tokenizer in ("byte", "bpe") else _directory_tokenizer(tokenizer)
    if not (math.isfinite(val_fraction) and 0 < val_fraction < 1):
        raise ValueError(f"--val-fraction {val_fraction} must be a finite number strictly between 0 and 1 "
                         "(e.g. 0.05)")
    files = _text_files(inputs)
    out = Path(out_dir).resolve()
    _check_out(out, inputs, files)
    if hf is not None:
        tok = hf
    elif tokenizer == "byte":
        tok = ByteTokenizer()
    else:
        tok = BPETokenizer.train([str(f) for f in files], bpe_vocab_size)
    train, val = _split(tok, files, val_fraction)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()  # fails rather than reuse a directory prepare did not just make
    try:
        _write(tmp, tok, train, val, len(files))
        _move_into_place(tmp, out)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp)
        raise
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
        self.meta, self.vocab_size, self.directory = meta, meta["vocab_size"], d
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
