"""Starting ranks: relaunch under ``torch.distributed.run`` or join an existing launch."""

from __future__ import annotations

import json
import os
import sys
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


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run ``python -m tedmoe.cli ARGV`` on ``nproc`` local ranks through torch.distributed.run.
    ARGV travels in the environment (``TEDMOE_ARGV``) so torchrun's own options never clash."""
    import logging
    import signal

    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["TEDMOE_ARGV"] = json.dumps(argv)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)  # our own summary follows
    args = run.parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "tedmoe.cli"])
    try:
        run.run(args)
    except ChildFailedError as err:  # the agent stopped every other rank; name the first to fail
        first_rank, first = err.get_first_failure()
        how = (f"was killed by {signal.Signals(-first.exitcode).name}" if first.exitcode < 0
               else f"exited with code {first.exitcode}")
        others = sorted(r for r in err.failures if r != first_rank)
        print(f"tedmoe: error: rank {first_rank} {how}; the run stopped"
              + (f" (ranks {others} failed after it)" if others else ""), file=sys.stderr)
        return 1
    return 0


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
