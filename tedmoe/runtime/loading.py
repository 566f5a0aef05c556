"""Loading a trained model from anywhere it is kept: a run, a checkpoint, a Hugging Face or a
compressed directory, into one process or this rank's shards of any layout (each rank reading
only its slices). Training uses it for distillation teachers, ``tedmoe.inference`` for serving."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tedmoe.config import ModelConfig, from_dict
from tedmoe.config.loader import model_config_from_dict
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
    """The ``ModelConfig`` of a run, a checkpoint, a Hugging Face or a compressed directory, without its weights."""
    from tedmoe.compress import model as compressed

    if compressed.is_compressed(path):
        return model_config_from_dict(compressed.read_meta(path)["model"])
    if is_hf_directory(path):
        from tedmoe.interop import hf

        return hf.read_config(path)
    return from_dict(read_meta(resolve_checkpoint(path))["config"]).model


def trained_compression(path: str | Path):
    """The ``CompressConfig`` a run or checkpoint was trained with (a Hugging Face directory: none)."""
    from tedmoe.config import CompressConfig

    if is_hf_directory(path):
        return CompressConfig()
    return from_dict(read_meta(resolve_checkpoint(path))["config"]).compress


def load_model(path: str | Path, topology: Topology | None = None,
               adapt: Callable[[ModelConfig], ModelConfig] | None = None, device=None) -> tuple[GPTMoE, object]:
    """A run, a checkpoint, a Hugging Face or a compressed directory as a model in eval mode (one process, or
    this rank's shards of ``topology``, each rank reading only its slices), and its tokenizer.
    ``adapt``: changes to the saved model config that keep its weights (e.g. the routing used
    for serving)."""
    from tedmoe.compress import model as compressed

    topology = topology or Topology.single()
    if compressed.is_compressed(path):  # integer weights, computed by integer kernels
        cfg = model_config_of(path)
        model = GPTMoE(cfg if adapt is None else adapt(cfg), topology, device=device)
        compressed.load_into(model, path)
        return model.eval(), load_tokenizer(path)
    if is_hf_directory(path):
        from tedmoe.interop import hf

        if not (Path(path) / "tokenizer.json").is_file():
            raise ValueError(f"{path} has no tokenizer.json; generation needs the model's tokenizer "
                             "(tedmoe export writes one)")
        cfg = hf.read_config(path)
        model = GPTMoE(cfg if adapt is None else adapt(cfg), topology, device=device)
        hf.load_into(model, path)
        return model.eval(), load_tokenizer(path)
    ckpt = resolve_checkpoint(path)
    run = from_dict(read_meta(ckpt)["config"])
    cfg = run.model
    model = GPTMoE(cfg if adapt is None else adapt(cfg), topology, device=device)
    if run.compress.method != "none":  # trained with binary/ternary/N:M weights: use them as the forward did
        from tedmoe.compress import qat

        c = run.compress
        qat.apply(model, c.method, c.n, c.m, c.refresh_every)
        load_model_weights(ckpt, model, topology)  # with the N:M masks in use when it was saved
        qat.bake(model)
    else:
        load_model_weights(ckpt, model, topology)
    return model.eval(), load_tokenizer(ckpt)
