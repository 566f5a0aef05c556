"""Sharded checkpoints with ``torch.distributed.checkpoint``: atomic, resumable, reshardable.

Layout of a run's ``checkpoints/`` directory::

    step_0000100/     a complete checkpoint: DCP shards + meta.json
    latest            the name of the newest complete checkpoint (moved only after a save completes)
    .tmp-step_...     a save in progress (ignored; removed by the next save of that step)

Every tensor is saved as a DTensor over the topology's meshes (experts sharded over ``ep`` and
``tp``, the rest over ``tp`` or replicated), optimizer states per parameter in the same layout,
so DCP can load a checkpoint into any other layout, including one process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from tedmoe.config import upgrade
from tedmoe.config.loader import model_differences
from tedmoe.fileio import sha256_file, write_atomic
from tedmoe.runtime import faults
from tedmoe.parallel.sharding import as_dtensor
from tedmoe.parallel.topology import Topology


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, incomplete, corrupted or for another model."""


@contextlib.contextmanager
def _quiet():
    """DCP warns that one process means no process group; that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier(topology: Topology) -> None:
    if topology.world_size > 1:
        dist.barrier()


def _masks(model, topology: Topology) -> dict:
    """N:M sparsity masks in use (``tedmoe.compress.qat``), sharded like their weights."""
    from tedmoe.compress import qat

    return {f"qat/mask/{name}": as_dtensor(mask, p, topology) for name, (mask, p) in qat.masks(model).items()}


def _state(model, optimizer, topology: Topology) -> tuple[dict, list]:
    """The DCP state dict (views of the live parameters and N:M masks; fresh optimizer-state tensors)."""
    state, optim = {}, []
    names = {id(p): n for n, p in model.named_parameters()}
    for name, p in model.named_parameters():
        state[f"model/{name}"] = as_dtensor(p.data, p, topology)
    state.update(_masks(model, topology))
    for group in optimizer.groups:
        states = group.per_param_states()
        optim.append((group, states))
        for kind, tensors in states.items():
            for p, t in zip(group.params, tensors):
                state[f"optim/{kind}/{names[id(p)]}"] = as_dtensor(t, p, topology)
    return state, optim


def save_checkpoint(root: str | Path, step: int, model, optimizer, topology: Topology, meta: dict,
                    keep: int = 2) -> Path:
    """Save atomically: shards and meta.json into a temporary directory, then rename it and move
    ``latest``. A crash at any point leaves the previous complete checkpoint in place."""
    root = Path(root)
    final, tmp = root / f"step_{step:07d}", root / f".tmp-step_{step:07d}"
    rank0 = topology.rank == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(topology)
    with optimizer.whole_parameters():  # ZeRO-3: gathered for the save, freed after
        state, _ = _state(model, optimizer, topology)
        if any(k.startswith("qat/mask/") for k in state):
            meta = {**meta, "nm_masks": True}
        with _quiet():
            dcp.save(state, checkpoint_id=str(tmp), no_dist=topology.world_size == 1)
        del state
    faults.maybe_fail("save", topology.rank, step)
    if rank0:
        meta = {**meta, "step": step, "files": {f.name: sha256_file(f) for f in sorted(tmp.iterdir())},
                "loss_scale": optimizer.loss_scale, "good_steps": optimizer.good_steps,
                "optimizer_steps": optimizer.step_count}
        write_atomic(tmp / "meta.json", json.dumps(meta, indent=2))
    _barrier(topology)
    if rank0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_atomic(root / "latest", final.name)
        # rotation: only checkpoints older than this one, never the one just written
        older = sorted(p for p in root.glob("step_*") if (p / "meta.json").is_file() and p.name < final.name)
        for old in older[:max(0, len(older) - (keep - 1))] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(topology)
    return final


def verify(path: str | Path) -> dict:
    """Check every file of a checkpoint against the checksums in its meta.json."""
    meta = read_meta(path)
    for name, digest in meta.get("files", {}).items():
        f = Path(meta["path"]) / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {meta['path']} is incomplete: {name} is missing")
        if sha256_file(f) != digest:
            raise CheckpointError(f"checkpoint {meta['path']} is corrupted: {name} does not match its checksum")
    return meta


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (following ``latest``), or ``None``."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if (path / "meta.json").is_file():
            return path
    complete = sorted(p for p in root.glob("step_*") if (p / "meta.json").is_file())
    return complete[-1] if complete else None


def read_meta(path: str | Path) -> dict:
    """A checkpoint's meta.json, or a ``CheckpointError`` saying what is wrong."""
    path = Path(path)
    if path.is_dir() and not (path / "meta.json").exists() and latest_checkpoint(path):
        path = latest_checkpoint(path)
    meta_path = path / "meta.json"
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not meta_path.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no meta.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{meta_path} is corrupted (not JSON)") from None
    if isinstance(meta.get("config"), dict):
        meta["config"] = upgrade(meta["config"])  # written by an older tedmoe: today's form
    meta["path"] = str(path)
    return meta


def load_checkpoint(path: str | Path, model, optimizer, topology: Topology, model_config: dict) -> dict:
    """Load a checkpoint (saved in any layout) into this layout; returns its meta."""
    meta = read_meta(path)
    diff = model_differences(meta.get("config", {}).get("model"), model_config)
    if diff:
        raise CheckpointError(f"checkpoint {meta['path']} was made for another model (differs in {', '.join(diff)})")
    with optimizer.whole_parameters(loading=True):
        state, optim = _state(model, optimizer, topology)
        _load(meta, state, model, topology)
        del state
    for group, states in optim:  # after: ZeRO-3 keeps the loaded parameters as shards, then the exact master
        group.load_per_param_states(states)
    optimizer.loss_scale, optimizer.good_steps = meta["loss_scale"], meta["good_steps"]
    optimizer.step_count = meta["optimizer_steps"]  # the routers' draws continue from it
    return meta


def load_model_weights(path: str | Path, model, topology: Topology) -> dict:
    """Only the model weights of a checkpoint (for generation), in any layout."""
    meta = read_meta(path)
    state = {f"model/{n}": as_dtensor(p.data, p, topology) for n, p in model.named_parameters()}
    _load(meta, {**state, **_masks(model, topology)}, model, topology)
    return meta


def _load(meta: dict, state: dict, model, topology: Topology) -> None:
    """Read ``state`` in place. N:M masks come from checkpoints that have them (older ones: the
    masks stay computed from the loaded weights at the next forward)."""
    from tedmoe.compress import qat

    masks = [k for k in state if k.startswith("qat/mask/")]
    if masks and not meta.get("nm_masks"):
        state = {k: v for k, v in state.items() if k not in masks}
    try:
        with _quiet():
            dcp.load(state, checkpoint_id=meta["path"], no_dist=topology.world_size == 1)
    except Exception as err:  # DCP raises many kinds; all mean this checkpoint cannot be read
        raise CheckpointError(f"checkpoint {meta['path']} cannot be read: {str(err).splitlines()[0][:200]}") from None
    if masks and meta.get("nm_masks"):
        qat.restored(model, meta["step"])
    elif masks:
        for _, module in model.named_modules():
            for t in (getattr(module, "weight_transforms", None) or {}).values():
                t.mask = None
