"""Tokenizers: raw bytes by default, or BPE from the ``tokenizers`` library (trained offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def read_utf8(path: str | Path) -> str:
    """A file's text, refused with the file and byte offset when it is not valid UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not valid UTF-8 (byte offset {err.start}: {data[err.start:err.end]!r}); "
                         "BPE needs UTF-8 text: use --tokenizer byte, or convert the file to UTF-8") from None


class ByteTokenizer:
    """Every byte is a token: vocabulary 256, nothing to train, nothing unknown. Files are
    tokenized as raw bytes, so any file, UTF-8 or not, round-trips exactly."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_file(self, path: str | Path) -> np.ndarray:
        """The file's bytes, one token each."""
        return np.frombuffer(Path(path).read_bytes(), dtype=np.uint8)

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, directory: Path) -> None:
        (directory / "tokenizer.json").write_text(json.dumps({"kind": "byte"}))


class BPETokenizer:
    """Byte-level BPE from the ``tokenizers`` library."""

    kind = "bpe"

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, files: list[str], vocab_size: int) -> BPETokenizer:
        """Learn merges from ``files``; each must be UTF-8 text (checked first, with the offending file
        and byte offset named, rather than failing inside ``tokenizers``)."""
        if vocab_size <= 256:
            raise ValueError(f"--vocab-size {vocab_size} is too small for BPE: byte-level BPE starts from the "
                             "256 byte tokens, so the vocabulary must be > 256 (e.g. 2048)")
        for f in files:
            read_utf8(f)
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train(files, trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def encode_file(self, path: str | Path) -> np.ndarray:
        """The tokens of a UTF-8 text file."""
        return np.asarray(self.encode(read_utf8(path)), dtype=np.int64)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def save(self, directory: Path) -> None:
        self.tok.save(str(directory / "tokenizer.json"))


def load_tokenizer(directory: str | Path):
    """The tokenizer saved beside a prepared dataset or checkpoint."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{path} is missing; prepare the data with `tedmoe data prepare`")
    spec = json.loads(path.read_text())
    if spec.get("kind") == "byte":
        return ByteTokenizer()
    from tokenizers import Tokenizer

    return BPETokenizer(Tokenizer.from_file(str(path)))
