"""Hugging Face model directories: ``config.json``, ``generation_config.json`` and the weights as
``model.safetensors`` or shards with ``model.safetensors.index.json``. Reads and writes full
(single-process) state dicts; the architecture's names and shapes live in ``mixtral.py``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from tedmoe.config import ModelConfig
from tedmoe.interop import mixtral

INDEX = "model.safetensors.index.json"


def read_config(path: str | Path) -> ModelConfig:
    """The ``ModelConfig`` of a Hugging Face directory (``ValueError`` for one tedmoe cannot read)."""
    p = Path(path) / "config.json"
    if not p.is_file():
        raise ValueError(f"{path} has no config.json; pass a Hugging Face model directory")
    try:
        hf = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{p} is not valid JSON: {err}") from None
    return mixtral.model_config(hf)


def read_tensors(path: str | Path, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a directory's safetensors file(s), all or only ``names`` (each shard is
    opened lazily, so only the asked-for tensors are read)."""
    from safetensors import safe_open

    root = Path(path)
    if (root / INDEX).is_file():
        weight_map = json.loads((root / INDEX).read_text())["weight_map"]
    elif (root / "model.safetensors").is_file():
        with safe_open(str(root / "model.safetensors"), "pt") as f:
            weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    else:
        raise ValueError(f"{path} has neither model.safetensors nor {INDEX}")
    wanted = sorted(weight_map if names is None else names & set(weight_map))
    out: dict[str, torch.Tensor] = {}
    for shard in sorted({weight_map[n] for n in wanted}):
        if not (root / shard).is_file():
            raise ValueError(f"{path}: shard {shard} named by {INDEX} is missing")
        with safe_open(str(root / shard), "pt") as f:
            out.update({n: f.get_tensor(n) for n in wanted if weight_map[n] == shard})
    return out


def load(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A Hugging Face directory as a tedmoe config and full state dict."""
    cfg = read_config(path)
    return cfg, mixtral.from_hf(read_tensors(path, set(mixtral.to_hf_shapes(cfg))), cfg)


def byte_level_unicode() -> list[str]:
    """The printable character that byte-level BPE writes for each byte 0..255 (printable Latin-1
    bytes stand for themselves, the others for code points from 256 on, in byte order)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def tokenizer_json(tokenizer) -> str:
    """A ``tokenizers`` JSON that gives the same ids as tedmoe's ``tokenizer``: the BPE one as it
    is; the byte one as a byte-level BPE with the 256 byte symbols (byte b is id b) and no merges."""
    if tokenizer.kind == "bpe":
        return tokenizer.tok.to_str()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={c: b for b, c in enumerate(byte_level_unicode())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def save(state: dict[str, torch.Tensor], cfg: ModelConfig, out: str | Path, tokenizer=None) -> Path:
    """Write a full tedmoe state dict (and ``tokenizer``, if given) as a Hugging Face directory
    ``out``, through a temporary directory and a rename; refuses an ``out`` that exists (nothing
    is overwritten)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists; export into a new directory (nothing is overwritten)")
    config = mixtral.hf_config(cfg)  # refuses before anything is written
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in mixtral.to_hf(state, cfg).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps({"do_sample": False}, indent=2) + "\n")
        if tokenizer is not None:
            (tmp / "tokenizer.json").write_text(tokenizer_json(tokenizer))
            (tmp / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len}, indent=2) + "\n")
        os.rename(tmp, out)
    except BaseException:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
        raise
    return out
