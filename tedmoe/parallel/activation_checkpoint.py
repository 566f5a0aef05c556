"""Activation checkpointing of a model's blocks, plain or communication-aware (CAC).

``apply_checkpointing(model, mode)`` wraps each of ``model.blocks`` (the trainer calls it; the
model itself does not know how it is trained):

* ``"plain"``: the block's activations are dropped after its forward and the whole block runs
  again in the backward, its collectives included (the ledger files them under ``recompute``).
* ``"cac"`` (DeepSpeed-TED's communication-aware checkpointing): the forward records the outputs
  of the block's collectives in a ``CommStash``; the recompute replays them in order instead of
  communicating, so a step moves exactly the bytes of a step without checkpointing, and the
  stash's tensors are the memory it costs. The stash dies with its block's backward.

Other places CAC touches: ``parallel/comm.py`` (every collective goes through ``replayable``),
``runtime/trainer.py`` (applies the mode from ``train.checkpointing``), ``planner/predict.py``
(the stash's memory and the recompute's traffic). The router's random draws need no stash: they
are a function of the tokens (``moe/noise.py``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils.checkpoint import checkpoint

from tedmoe.parallel.ledger import LEDGER

MODES = ("none", "plain", "cac")


class CommStash:
    """The outputs of the collectives of one checkpointed forward, recorded, and replayed in
    order by its recompute, so the recompute is local math only."""

    _active: list[CommStash] = []

    def __init__(self) -> None:
        self.items: list = []
        self.mode: str | None = None

    @contextlib.contextmanager
    def _use(self, mode: str) -> Iterator[None]:
        if mode == "replay":
            self.items.reverse()  # pop() from the end returns them in recorded order
        self.mode = mode
        CommStash._active.append(self)
        try:
            yield
        finally:
            CommStash._active.pop()
            self.mode = None

    def recording(self):
        return self._use("record")

    def replaying(self):
        return self._use("replay")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.items if isinstance(t, torch.Tensor))


def replayable(fn):
    """``fn()``, except inside a CAC recompute, where the value recorded in the forward returns."""
    stash = CommStash._active[-1] if CommStash._active else None
    if stash is not None and stash.mode == "replay":
        return stash.items.pop()
    out = fn()
    if stash is not None:
        stash.items.append(out)
    return out


@dataclass
class Checkpointing:
    """What ``apply_checkpointing`` did: the mode, and the bytes the last forward stashed (CAC)."""

    mode: str
    stash_bytes: int = 0
    _stashes: list = field(default_factory=list)


def _checkpointed(block, forward, state: Checkpointing):
    def run(*args):
        if not torch.is_grad_enabled():
            return forward(*args)
        if state.mode == "plain":
            # the whole block runs again, every collective included (the baseline CAC improves on)
            contexts = lambda: (contextlib.nullcontext(), LEDGER.phase("recompute"))  # noqa: E731
            return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts, early_stop=False)
        stash = CommStash()
        state._stashes.append(stash)
        contexts = lambda: (stash.recording(), stash.replaying())  # noqa: E731
        return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts)
    return run


def apply_checkpointing(model: torch.nn.Module, mode: str) -> Checkpointing:
    """Checkpoint every block of ``model.blocks`` (``"none"``, ``"plain"`` or ``"cac"``); parameter
    names and the state dict are unchanged. Returns the ``Checkpointing`` (also ``model.checkpointing``)."""
    if mode not in MODES:
        raise ValueError(f"checkpointing={mode!r} is not one of {', '.join(map(repr, MODES))}")
    state = Checkpointing(mode)
    if mode != "none":
        for block in model.blocks:
            block.forward = _checkpointed(block, block.forward, state)

        def start(module, args):
            state._stashes = []

        def finish(module, args, output):
            state.stash_bytes = sum(s.nbytes() for s in state._stashes)
            state._stashes = []  # only the checkpoints keep them alive, until their backward

        model.register_forward_pre_hook(start)
        model.register_forward_hook(finish)
    model.checkpointing = state
    return state
