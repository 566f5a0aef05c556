"""Tokenizers: raw bytes by default, or BPE from the ``tokenizers`` library (trained offline)."""

from __future__ import annotations

import json
from pathlib import Path


class ByteTokenizer:
    """Every UTF-8 byte is a token: vocabulary 256, nothing to train, nothing unknown."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

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
