"""Starting ranks: relaunch under ``torch.distributed.run`` or join an existing launch."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def adopt_slurm_env(env: dict | None = None) -> None:
    """Under ``srun`` (one task per rank, no torchrun), derive torch's rendezvous variables from
    SLURM's: RANK, WORLD_SIZE and LOCAL_RANK from the task ids, MASTER_ADDR from the launch node
    (unless already set), MASTER_PORT 29500 unless set."""
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in env and "SLURM_LAUNCH_NODE_IPADDR" in env:
        env["MASTER_ADDR"] = env["SLURM_LAUNCH_NODE_IPADDR"]
    env.setdefault("MASTER_PORT", "29500")


def launched() -> bool:
    """True inside a rank started by torchrun or srun (or anything that sets torch's variables)."""
    adopt_slurm_env()
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def relaunched() -> bool:
    """True inside a rank that ``relaunch`` started: the launching process reports failures."""
    return "TEDMOE_ARGV" in os.environ and launched()


def relaunch(nproc: int, argv: list[str], nnodes: int = 1, rdzv_endpoint: str | None = None,
             rdzv_id: str = "tedmoe") -> int:
    """Run ``python -m tedmoe.cli ARGV`` on ``nproc`` local ranks through torch.distributed.run.
    ARGV travels in the environment (``TEDMOE_ARGV``) so torchrun's own options never clash.
    Returns the exit code; a failure is one ``tedmoe: error: ...`` line naming the rank."""
    import logging
    import signal

    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["TEDMOE_ARGV"] = json.dumps(argv)
    # On Ctrl-C the ranks finish their step and save; give them time before the agent kills them.
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "60")
    for name in list(logging.Logger.manager.loggerDict):  # our own one-line summary follows
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    where = (["--standalone"] if nnodes == 1 else
             [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"])
    args = run.parse_args([*where, f"--nproc-per-node={nproc}", "--module", "tedmoe.cli"])
    try:
        run.run(args)
    except SignalException as err:  # Ctrl-C or SIGTERM: the ranks have said what they kept
        return 128 + int(err.sigval)
    except ChildFailedError as err:  # the agent stopped every other rank; name the root cause
        first_rank, first = err.get_first_failure()
        if first.exitcode == 130:  # interrupted: the ranks stopped together and rank 0 said what they kept
            return 130
        reason = _recorded_error(first.error_file)
        if reason and any(p in reason.lower() for p in _PEER_LOST):  # it lost a peer: was one killed?
            killed = [(r, f) for r, f in err.failures.items() if f.exitcode < 0 and f.timestamp <= first.timestamp + 1]
            if killed:
                first_rank, first = min(killed, key=lambda kv: (-kv[1].exitcode == signal.SIGTERM, kv[1].timestamp))
                reason = None
        if reason:  # the rank left its own one-line reason
            print(reason if reason.startswith("tedmoe: ") else f"tedmoe: error: {reason}", file=sys.stderr)
            return first.exitcode if first.exitcode > 0 else 1
        how = (f"was killed by {signal.Signals(-first.exitcode).name}" if first.exitcode < 0
               else f"exited with code {first.exitcode}")
        others = sorted(r for r in err.failures if r != first_rank)
        print(f"tedmoe: error: rank {first_rank} {how}; the run stopped"
              + (f" (ranks {others} failed after it)" if others else ""), file=sys.stderr)
        return 1
    return 0


_PEER_LOST = ("connection reset", "connection closed", "broken pipe", "connection refused")


def _recorded_error(path: str | None) -> str | None:
    """The one-line reason a rank left with ``record_error``, if any."""
    try:
        with open(path) as f:
            message = json.load(f)["message"]
        return str(message["message"] if isinstance(message, dict) else message)
    except (OSError, TypeError, ValueError, KeyError):
        return None


def record_error(line: str) -> None:
    """Leave a failed rank's one-line reason where the launching agent reads it (torchrun's
    error file), so the launcher can print it instead of a traceback."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or not launched():
        return
    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as f:
            json.dump(data, f)
    except OSError:
        pass


def _store():
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store() if dist.is_initialized() else None
    except Exception:  # no store (one process, or a torch without it): no heartbeats
        return None


def beat(step: int) -> None:
    """Tell the launch's key-value store that this rank starts ``step`` (to name a hung rank later)."""
    store = _store()
    if store is not None and dist.get_world_size() > 1:
        store.set(f"tedmoe/step/{dist.get_rank()}", str(step))


def _stalled(store, world: int, rank: int) -> str | None:
    """Which ranks stopped answering, from the heartbeats: those behind the others' step, or
    (all at one step) those that did not time out themselves within a short grace period."""
    store.set(f"tedmoe/timeout/{rank}", "1")
    steps = {r: int(store.get(f"tedmoe/step/{r}")) if store.check([f"tedmoe/step/{r}"]) else 0 for r in range(world)}
    top = max(steps.values())
    behind = [r for r, s in steps.items() if s < top]
    if behind:
        last = min(steps[r] for r in behind)
        return (f"rank{'s' if len(behind) > 1 else ''} {', '.join(map(str, behind))} stopped answering "
                f"(last started step {last}; the others are at step {top})")
    for _ in range(20):  # the other ranks' timeouts land within moments of ours
        silent = [r for r in range(world) if not store.check([f"tedmoe/timeout/{r}"])]
        if len(silent) <= 1:
            break
        time.sleep(0.25)
    if 0 < len(silent) < world:
        return (f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} stopped answering "
                f"during step {top} (the other ranks timed out waiting)")
    return None


def describe_failure(err: BaseException) -> str:
    """One line for a distributed failure seen on this rank; after a collective timeout it
    names the rank that stopped answering, not merely the one whose wait ran out first."""
    text = str(err).strip()
    first = text.splitlines()[0][:300] if text else type(err).__name__
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    if "timed out" in text.lower() or "timeout" in text.lower():
        store = _store()
        try:
            who = _stalled(store, dist.get_world_size(), rank) if store is not None else None
        except Exception:  # the store itself may be gone; fall back to what this rank saw
            who = None
        if who:
            return f"{who}; rank {rank}'s collective timed out; the run stopped"
        return f"rank {rank}: a collective timed out ({first}); the run stopped"
    return f"rank {rank}: {first}"


def shutdown_distributed() -> None:
    """Leave the process group, if this process joined one (an abandoned group aborts at exit)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def launched_argv() -> list[str] | None:
    """The arguments ``relaunch`` handed to this rank, if it started us."""
    text = os.environ.get("TEDMOE_ARGV")
    return json.loads(text) if text is not None and launched() else None


def init_distributed(backend: str | None = None, timeout_s: float = 300.0) -> None:
    """Join the launched process group: NCCL with one device per local rank where CUDA exists, else gloo."""
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
