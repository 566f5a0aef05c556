"""Tokenizers: raw bytes by default, BPE from the ``tokenizers`` library (trained offline), or the
``tokenizer.json`` of a Hugging Face model directory (to fine-tune that model on its own ids)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CONFIG_FILE = "tokenizer_config.json"  # a Hugging Face directory's tokenizer settings (bos/eos, chat template)


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    """Copy the tokenizer files that ``src`` holds (``tokenizer.json`` and, for a directory's
    tokenizer, ``tokenizer_config.json``) into ``dst``."""
    import shutil

    for name in ("tokenizer.json", CONFIG_FILE):
        if (Path(src) / name).is_file():
            shutil.copy(Path(src) / name, Path(dst) / name)


def read_utf8(path: str | Path) -> str:
    """A file's text, refused with the file and byte offset when it is not valid UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not valid UTF-8 (byte offset {err.start}: {data[err.start:err.end]!r}); "
                         "BPE and directory tokenizers need UTF-8 text: convert the file to UTF-8, or use "
                         "--tokenizer byte") from None


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


class HFTokenizer:
    """The ``tokenizer.json`` of a Hugging Face model or tokenizer directory, used as it is.

    ``encode`` adds no special tokens; ``encode_file`` makes each file one document, between the
    BOS and EOS tokens that the directory's ``tokenizer_config.json`` names (each left out when it
    is not named or not in the vocabulary), as in pretraining. ``save`` writes the tokenizer and
    that ``tokenizer_config.json`` (copied as is: it also carries the chat template), or a minimal
    one when the source has none, so a saved directory always holds both files.

    Attributes: ``tok`` (the ``tokenizers.Tokenizer``), ``bos_id`` and ``eos_id`` (or None),
    ``config_text`` (the source's ``tokenizer_config.json`` as read, or None) and ``source`` (the
    directory it was read from)."""

    kind = "hf"

    def __init__(self, tok, config: dict, source: Path, config_text: str | None):
        self.tok, self.source, self.config_text = tok, source, config_text
        ids = tok.get_vocab(with_added_tokens=True).values()
        # an added token may sit above get_vocab_size's count; every id must fit the embedding
        self.vocab_size = max(tok.get_vocab_size(with_added_tokens=True), max(ids, default=-1) + 1)
        self.bos_id, self.eos_id = (self._token_id(config.get(name)) for name in ("bos_token", "eos_token"))

    def _token_id(self, token) -> int | None:
        """The id of a special token as ``tokenizer_config.json`` writes it: a string or ``{"content": ...}``."""
        if isinstance(token, dict):
            token = token.get("content")
        return self.tok.token_to_id(token) if isinstance(token, str) else None

    @classmethod
    def load(cls, directory: str | Path) -> HFTokenizer:
        """The tokenizer of ``directory`` (which holds ``tokenizer.json``); one line naming the file
        when the ``tokenizers`` library or JSON cannot read it."""
        d = Path(directory)
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        except Exception as err:  # the library raises a plain Exception
            raise ValueError(f"{d / 'tokenizer.json'} cannot be read by the tokenizers library: "
                             f"{' '.join(str(err).split())}") from None
        config_path, text = d / CONFIG_FILE, None
        try:
            if config_path.is_file():
                text = config_path.read_text(encoding="utf-8")
            config = json.loads(text) if text is not None else {}
        except ValueError as err:  # JSON, or not UTF-8
            raise ValueError(f"{config_path} is not valid JSON ({err}); fix or remove it") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_path} is not a JSON object; fix or remove it")
        return cls(tok, config, d.resolve(), text)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_file(self, path: str | Path) -> np.ndarray:
        """The tokens of a UTF-8 text file as one document: ``[bos] + tokens + [eos]`` (an empty
        file gives no tokens)."""
        ids = self.encode(read_utf8(path))
        if ids:
            head = [] if self.bos_id is None else [self.bos_id]
            ids = head + ids + ([] if self.eos_id is None else [self.eos_id])
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: Path) -> None:
        (directory / "tokenizer.json").write_text(self.tok.to_str(), encoding="utf-8")
        text = self.config_text or json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n"
        (directory / CONFIG_FILE).write_text(text, encoding="utf-8")


def load_tokenizer(directory: str | Path):
    """The tokenizer saved beside a prepared dataset or checkpoint, or in a Hugging Face directory.

    ``tokenizer.json`` holding ``{"kind": "byte"}`` is the byte tokenizer. Otherwise the kind is
    told by the file beside it: with a ``tokenizer_config.json`` (which ``HFTokenizer.save`` always
    writes, and which Hugging Face directories hold) it is a directory tokenizer, kind "hf";
    alone, it is tedmoe's BPE (a BPE dataset never holds that file)."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{path} is missing; prepare the data with `tedmoe data prepare`")
    spec = json.loads(path.read_text())
    if spec.get("kind") == "byte":
        return ByteTokenizer()
    if (path.parent / CONFIG_FILE).is_file():
        return HFTokenizer.load(path.parent)
    from tokenizers import Tokenizer

    return BPETokenizer(Tokenizer.from_file(str(path)))
