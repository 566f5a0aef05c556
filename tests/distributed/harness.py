"""Run test functions on N spawned gloo ranks, started once and reused for many checks.

    world = World(4)              # spawns 4 processes, each joins a gloo group (fp32, 1 thread)
    results = world.run(fn, a, b) # calls fn(a, b) on every rank; returns [result of rank 0, ...]
    world.close()

``fn`` must be a module-level function (it is pickled by name). An exception on any rank
fails ``run`` with that rank's traceback; ranks that do not report within ``timeout``
seconds (counted once every rank has joined the group) fail it with their numbers. After a failure that leaves ranks stuck (e.g. in a
collective their peer never joined) the world is torn down and respawned on the next run.
"""

from __future__ import annotations

import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta

import torch.multiprocessing as mp


def _worker(rank: int, nprocs: int, init_file: str, tasks, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=nprocs,
                            timeout=timedelta(seconds=120))
    results.put((rank, None, "ready"))
    while (task := tasks.get()) is not None:
        fn, args = task
        try:
            results.put((rank, True, fn(*args)))
        except BaseException:  # report everything, including assertion failures, to the parent
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class World:
    """``nprocs`` ranks that run whatever ``run`` sends them, until ``close``."""

    def __init__(self, nprocs: int, timeout: float = 300.0, grace: float = 5.0, startup_timeout: float = 180.0):
        self.nprocs, self.timeout, self.grace, self.startup_timeout = nprocs, timeout, grace, startup_timeout
        self.procs: list = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._dir = tempfile.TemporaryDirectory()
        init_file = os.path.join(self._dir.name, "init")
        self.tasks = [ctx.Queue() for _ in range(self.nprocs)]
        self.results = ctx.Queue()
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self.procs = [ctx.Process(target=_worker, args=(r, self.nprocs, init_file, self.tasks[r], self.results),
                                  daemon=True) for r in range(self.nprocs)]
        for p in self.procs:
            p.start()
        # a run's timeout starts once every rank has joined the group (start-up is slow on a busy machine)
        ready, deadline = set(), time.monotonic() + self.startup_timeout
        while len(ready) < self.nprocs:
            dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
            if dead or time.monotonic() > deadline:
                self.close(force=True)
                raise RuntimeError(f"ranks {dead or sorted(set(range(self.nprocs)) - ready)} did not start")
            try:
                rank, _, _ = self.results.get(timeout=0.5)
            except queue.Empty:
                continue
            ready.add(rank)

    def run(self, fn, *args, timeout: float | None = None) -> list:
        """Call ``fn(*args)`` on every rank; return the per-rank results in rank order."""
        if not self.procs:
            self._start()
        for q in self.tasks:
            q.put((fn, args))
        done: dict[int, object] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + (timeout or self.timeout)
        while len(done) + len(errors) < self.nprocs and time.monotonic() < deadline:
            try:
                rank, ok, value = self.results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive() and r not in done and r not in errors]
                for r in dead:
                    errors[r] = f"rank {r} exited with code {self.procs[r].exitcode}"
                continue
            (done if ok else errors)[rank] = value
            if errors:  # the others may be stuck waiting for the failed rank; give them a moment
                deadline = min(deadline, time.monotonic() + self.grace)
        missing = [r for r in range(self.nprocs) if r not in done and r not in errors]
        if missing or errors:
            self.close(force=True)
            lines = [f"{fn.__name__} failed on {self.nprocs} ranks"]
            if missing:
                lines.append(f"ranks {missing} did not finish within the timeout")
            lines += [f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())]
            raise RuntimeError("\n".join(lines))
        return [done[r] for r in range(self.nprocs)]

    def close(self, force: bool = False) -> None:
        """Stop every rank (politely, or at once with ``force``) and forget them."""
        for q in getattr(self, "tasks", []) if not force else []:
            q.put(None)
        for p in self.procs:
            p.join(timeout=0 if force else 10)
            if p.is_alive():
                p.kill()
                p.join()
        self.procs = []
        if hasattr(self, "_dir"):
            self._dir.cleanup()


def assert_matches_reference(where: str, got: tuple, ref: tuple, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """A parallel run against the single-process one: ``(first-step loss, {name: full gradient},
    [(loss, grad norm) per step])`` each, at fp32 tolerance; ``where`` names the layout."""
    import pytest
    import torch

    loss, grads, curve = got
    ref_loss, ref_grads, ref_curve = ref
    assert loss == pytest.approx(ref_loss, rel=rtol), where
    assert grads.keys() == ref_grads.keys(), where
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=rtol, atol=atol, msg=lambda m: f"{where} {name}: {m}")
    torch.testing.assert_close(torch.tensor(curve), torch.tensor(ref_curve), rtol=rtol, atol=atol,
                               msg=lambda m: f"{where} (loss, grad norm) curve: {m}")


def train_and_gather(engine, batches, steps: int, num_micro_batches: int) -> tuple:
    """Train ``engine`` for ``steps`` steps on ``batches(step)`` (this rank's micro-batches) and
    return what ``assert_matches_reference`` compares: the first step's loss (mean over the
    ``num_micro_batches`` of the global batch), its full synchronised gradients (gathered before
    the optimizer changes them, so step 0 runs by hand), and ``[(loss, grad norm)]`` per step."""
    import torch

    from tedmoe.parallel import comm

    mbs = batches(0)
    total = torch.zeros(1)
    for j, (ids, targets) in enumerate(mbs):
        engine.set_token_context(mbs, j)
        loss, _ = engine.model(ids, targets)
        loss.backward()
        engine.optimizer.micro_batch_done()  # ZeRO-2 sends its open gradient buckets
        total += loss.detach()
    first = comm.all_reduce(total, engine.topology.axis("dsp")).item() / num_micro_batches
    grads = engine.full_gradients(len(mbs))
    curve = [(first, engine.optimizer.step(len(mbs))["grad_norm"])]
    for step in range(1, steps):
        out = engine.train_step(batches(step))
        curve.append((out["loss"], out["grad_norm"]))
    return first, grads, curve
