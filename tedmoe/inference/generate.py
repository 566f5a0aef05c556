"""Text generation from a checkpoint (any layout) on one process: greedy, top-k, temperature."""

from __future__ import annotations

from pathlib import Path

import torch

from tedmoe.config import from_dict
from tedmoe.data.tokenizer import load_tokenizer
from tedmoe.model.transformer import GPTMoE
from tedmoe.parallel.topology import Topology
from tedmoe.runtime.checkpoint import CheckpointError, latest_checkpoint, load_model_weights, read_meta


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest one of a run directory or a ``checkpoints/`` directory."""
    from tedmoe.data.dataset import is_dataset

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{path} does not exist; pass a run directory or a checkpoint directory")
    if is_dataset(p):
        raise CheckpointError(f"{path} is a prepared dataset, not a checkpoint; pass a run directory "
                              "(e.g. runs/default) or one of its checkpoints/step_* directories")
    if (p / "meta.json").is_file() and "config" in read_meta(p):
        return p
    for root in (p / "checkpoints", p):
        found = latest_checkpoint(root) if root.is_dir() else None
        if found is not None:
            return found
    raise CheckpointError(f"no complete checkpoint at {path}")


def is_hf_directory(path: str | Path) -> bool:
    """A Hugging Face model directory (its config.json names a ``model_type``; a run directory's
    config.json is tedmoe's own)."""
    import json

    p = Path(path) / "config.json"
    try:
        return p.is_file() and "model_type" in json.loads(p.read_text())
    except (ValueError, OSError):
        return False


def model_config_of(path: str | Path):
    """The ``ModelConfig`` of a run, a checkpoint or a Hugging Face directory, without its weights."""
    if is_hf_directory(path):
        from tedmoe.interop import hf

        return hf.read_config(path)
    return from_dict(read_meta(resolve_checkpoint(path))["config"]).model


def load_model(path: str | Path) -> tuple[GPTMoE, object]:
    """A run, a checkpoint or a Hugging Face directory (Mixtral layout) as a one-process model in
    eval mode, and its tokenizer."""
    if is_hf_directory(path):
        from tedmoe.interop import hf

        if not (Path(path) / "tokenizer.json").is_file():
            raise ValueError(f"{path} has no tokenizer.json; generation needs the model's tokenizer "
                             "(tedmoe export writes one)")
        cfg, state = hf.load(path)
        model = GPTMoE(cfg, Topology.single())
        model.load_state_dict(state)
        return model.eval(), load_tokenizer(path)
    ckpt = resolve_checkpoint(path)
    cfg = from_dict(read_meta(ckpt)["config"])
    model = GPTMoE(cfg.model, Topology.single())
    load_model_weights(ckpt, model, Topology.single())
    model.eval()
    return model, load_tokenizer(ckpt)


@torch.no_grad()
def generate(model: GPTMoE, ids: list[int], max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             greedy: bool = False, seed: int = 0) -> list[int]:
    """Append ``max_new_tokens`` tokens to ``ids`` (the context is cropped to ``max_seq_len``)."""
    if not ids:
        raise ValueError("the prompt is empty; give at least one character with --prompt (the model continues it)")
    if any(not 0 <= i < model.config.vocab_size for i in ids):
        raise ValueError(f"the prompt has token ids outside the model's vocabulary of {model.config.vocab_size}")
    if temperature <= 0 and not greedy:
        raise ValueError(f"temperature={temperature} must be > 0 (or use --greedy)")
    g = torch.Generator().manual_seed(seed)
    out = list(ids)
    for _ in range(max_new_tokens):
        context = torch.tensor([out[-model.config.max_seq_len:]])
        logits = model.logits(context)[0, -1].float()
        if greedy:
            out.append(int(logits.argmax()))
            continue
        logits = logits / temperature
        if top_k is not None and top_k < logits.numel():
            kth = torch.topk(logits, top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        out.append(int(torch.multinomial(logits.softmax(-1), 1, generator=g)))
    return out
