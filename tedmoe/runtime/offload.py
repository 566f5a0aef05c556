"""Where a ZeRO shard's optimizer states live: device memory, host memory or files on disk.

Every store holds named fp32 arrays of one length (this rank's shard of one parameter group:
the fp32 master weights when they are not the parameters themselves, and Adam's two moments)
and gives the optimizer step three things: ``tiles(tile)``, an iterator over consecutive tiles
as ``(slice, {name: tensor})`` whose tensors the step updates in place; ``get(name)``, the whole
array (checkpoints); ``set(name, value)``.

* ``MemoryStates``: tensors on a device (``offload = "none"``) or in host memory
  (``offload = "cpu"``, pinned when an accelerator is present, so the copies to and from it
  can run asynchronously); tiles are views, nothing to write back.
* ``DiskStates`` (``offload = "disk"``): one file per shard in a directory of this rank's own
  (created under ``train.offload_path``, removed when the optimizer closes or the process
  exits). ``tiles`` reads tile ``k + 1`` on a background thread while the step updates tile
  ``k``, and writes tile ``k`` back on the same thread while it updates ``k + 1``: at most three
  tiles of every state are in memory (``3 x states x 4 x tile`` bytes), whatever the model size.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import torch


class MemoryStates:
    """Named fp32 arrays of ``numel`` elements on ``device``."""

    def __init__(self, names: list[str], numel: int, device, pin: bool = False):
        self.names, self.numel = list(names), numel
        self.arrays = {n: torch.zeros(numel, dtype=torch.float32, device=device, pin_memory=pin) for n in names}

    def get(self, name: str) -> torch.Tensor:
        return self.arrays[name]

    def set(self, name: str, value: torch.Tensor) -> None:
        self.arrays[name].copy_(value)

    def tiles(self, tile: int) -> Iterator[tuple[slice, dict[str, torch.Tensor]]]:
        for a in range(0, self.numel, tile):
            s = slice(a, min(a + tile, self.numel))
            yield s, {n: t[s] for n, t in self.arrays.items()}

    def close(self) -> None:
        pass


class OffloadDirectory:
    """This rank's own directory under ``root`` (``tedmoe-offload-rank<r>-*``), removed by
    ``close()`` or at interpreter exit; nothing else under ``root`` is touched."""

    def __init__(self, root: str | Path, rank: int):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"train.offload_path={str(root)!r} is not a directory; create it (on a fast disk) or "
                             "point offload_path at one")
        try:
            self.path = Path(tempfile.mkdtemp(prefix=f"tedmoe-offload-rank{rank}-", dir=root))
        except OSError as err:
            raise ValueError(f"train.offload_path={str(root)!r} is not writable ({err.strerror}); choose a "
                             "directory you can write to") from None
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.path, True)

    def close(self) -> None:
        self._cleanup()


class DiskStates:
    """Named fp32 arrays of ``numel`` elements, one after another in the file ``path``."""

    def __init__(self, names: list[str], numel: int, path: Path):
        self.names, self.numel, self.path = list(names), numel, Path(path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._close_fd = weakref.finalize(self, os.close, self.fd)
        self.offsets = {n: i * numel * 4 for i, n in enumerate(self.names)}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="tedmoe-offload")
        zeros = torch.zeros(max(1, min(numel, 1 << 20)), dtype=torch.float32)
        for n in self.names:  # written out now: a full disk fails here, not in the middle of a step
            for a in range(0, numel, zeros.numel()):
                self._write(n, a, zeros[:min(zeros.numel(), numel - a)])

    def _read(self, name: str, a: int, b: int) -> torch.Tensor:
        out = torch.empty(b - a, dtype=torch.float32)
        view, offset = memoryview(out.numpy()).cast("B"), self.offsets[name] + 4 * a
        while view.nbytes:
            got = os.preadv(self.fd, [view], offset)
            if got <= 0:
                raise OSError(f"offload file {self.path} is shorter than expected (truncated by someone else?)")
            view, offset = view[got:], offset + got
        return out

    def _write(self, name: str, a: int, t: torch.Tensor) -> None:
        # a copy: numpy() would make the storage of the caller's tensor (perhaps parameters) unresizable
        view = memoryview(t.detach().to("cpu", torch.float32, copy=True).numpy()).cast("B")
        offset = self.offsets[name] + 4 * a
        try:
            while view.nbytes:
                done = os.pwrite(self.fd, view, offset)
                view, offset = view[done:], offset + done
        except OSError as err:
            raise OSError(f"cannot write the offloaded optimizer states to {self.path}: {err.strerror} (free "
                          "space under train.offload_path, or offload less)") from None

    def get(self, name: str) -> torch.Tensor:
        return self._read(name, 0, self.numel)

    def set(self, name: str, value: torch.Tensor) -> None:
        self._write(name, 0, value.reshape(-1))

    def tiles(self, tile: int) -> Iterator[tuple[slice, dict[str, torch.Tensor]]]:
        def read(a, b):
            return {n: self._read(n, a, b) for n in self.names}

        def write(a, tiles):
            for n, t in tiles.items():
                self._write(n, a, t)

        if not self.numel:
            return
        ahead = self.pool.submit(read, 0, min(tile, self.numel))
        behind = None
        for a in range(0, self.numel, tile):
            b = min(a + tile, self.numel)
            current = ahead.result()
            if b < self.numel:  # the next tile's read overlaps this tile's update
                ahead = self.pool.submit(read, b, min(b + tile, self.numel))
            if behind is not None:
                behind.result()  # at most one tile waiting to be written
            yield slice(a, b), current
            behind = self.pool.submit(write, a, current)
        behind.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self._close_fd()


def make_states(kind: str, names: list[str], numel: int, device, directory: OffloadDirectory | None,
                tag: str):
    """The store for ``train.offload = kind`` (see the module docstring)."""
    if kind == "disk":
        return DiskStates(names, numel, directory.path / f"{tag}.f32")
    if kind == "cpu":
        host = torch.device("cpu")
        pin = torch.device(device).type != "cpu" and torch.cuda.is_available()
        return MemoryStates(names, numel, host, pin)
    return MemoryStates(names, numel, device)
