"""A run directory's safety: whose it is, who is using it, what a resume may change.

``claim`` is called once per run, before any rank starts: it refuses a directory that holds
another run (unless ``--resume``, or ``--overwrite``, which moves the old run aside and never
deletes it) and a non-empty directory that is not a run at all, then takes a lock file so two
live runs never share a directory. ``resume_changes`` lists the settings a resume would change.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoints")
LOCK = ".lock"

# Settings that change the trained model's history if they differ on resume (the model itself is
# checked separately: a checkpoint never loads into another model).
GUARDED = ("seed", "seq_len", "global_batch_size", "data.", "train.lr", "train.min_lr_ratio",
           "train.warmup_steps", "train.max_steps", "train.betas", "train.eps", "train.weight_decay",
           "train.grad_clip", "train.precision")


def is_run(path: Path) -> bool:
    return any((path / name).exists() for name in RUN_FILES)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``RUN/.lock`` names the live process using a run directory (pid, host, start time)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.held = False

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def check(self) -> str | None:
        """``None`` if free (or stale: its process is gone); else who holds it, in words."""
        info = self.holder()
        if info is None:
            return None
        if info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1))):
            return None
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("time", 0)))
        return f"pid {info.get('pid')} on {info.get('host')}, since {since}"

    def acquire(self) -> str | None:
        """Take the lock or raise ``ValueError``; returns a note when a stale lock was replaced."""
        note = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info, who = self.holder(), self.check()
                if who is not None:
                    raise ValueError(f"{self.path.parent} is in use by another tedmoe run ({who}); wait for it to "
                                     f"finish or choose another --out (if that run is dead, delete {self.path})")
                note = (f"a stale lock of pid {info.get('pid') if info else '?'} (no longer running) "
                        f"in {self.path.parent} was replaced")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}, f)
            self.held = True
            return note
        raise ValueError(f"cannot take the lock {self.path}; another run may be starting there")

    def release(self) -> None:
        if self.held and (self.holder() or {}).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False


def _aside(path: Path) -> Path:
    for n in range(1, 10_000):
        target = path.with_name(f"{path.name}.old-{n}")
        if not target.exists():
            return target
    raise ValueError(f"too many old runs beside {path}; remove some {path.name}.old-* directories")


def refuse_if_in_use(run_dir: str | Path) -> None:
    """A ``ValueError`` if a live tedmoe run holds ``run_dir``'s lock."""
    out = Path(run_dir)
    who = RunLock(out).check() if out.is_dir() else None
    if who is not None:
        raise ValueError(f"{out} is in use by another tedmoe run ({who}); wait for it to finish or choose "
                         f"another --out (if that run is dead, delete {out / LOCK})")


def claim(run_dir: str | Path, resume: bool, overwrite: bool) -> tuple[RunLock, list[str]]:
    """Make ``run_dir`` this run's: refuse what is in the way, move an old run aside on
    ``overwrite``, take the lock. Returns the lock (release it at the end) and notes to print."""
    out = Path(run_dir)
    notes: list[str] = []
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pass one of them")
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} is a file; choose a directory for the run")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"out_dir {out} lies under {parent}, which is a file; choose another directory")
    if out.is_dir():
        refuse_if_in_use(out)
        entries = [p for p in out.iterdir() if p.name != LOCK]
        if entries and not is_run(out):
            raise ValueError(f"out_dir {out} is not empty and holds no tedmoe run; choose a new or empty directory "
                             "(tedmoe does not write among other files)")
        if entries and not resume:
            if not overwrite:
                raise ValueError(f"{out} holds a run already; pass --resume to continue it, --overwrite to move it "
                                 "aside and start afresh, or choose another --out")
            target = _aside(out)
            os.replace(out, target)
            notes.append(f"moved the old run {out} to {target}")
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out)
    note = lock.acquire()
    if note:
        notes.append(note)
    return lock, notes


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(saved: dict, now: dict, saved_data: dict | None, now_data: dict | None) -> list[str]:
    """The guarded settings (and the dataset's checksums) that differ between a checkpoint's
    config and this run's, as ``"name old -> new"``."""
    a, b = _flat(saved), _flat(now)
    out = []
    for key in sorted(set(a) | set(b)):
        if any(key == g or (g.endswith(".") and key.startswith(g)) for g in GUARDED):
            old, new = a.get(key), b.get(key)
            if isinstance(old, list):
                old = tuple(old)
            if isinstance(new, list):
                new = tuple(new)
            if old != new:
                out.append(f"{key} {old!r} -> {new!r}")
    if saved_data and now_data and saved_data != now_data:
        out.append("the dataset's contents (token checksums differ)")
    return out
