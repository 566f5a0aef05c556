"""What every benchmark shares: starting its ranks, and writing its result as a dated JSON file.

A multi-rank benchmark starts like this, so that the same command works with or without torchrun::

    if not launch.launched():
        return common.start_ranks(4)
    launch.init_distributed()

and every benchmark ends with ``common.write_result(name, config, result)`` (on rank 0).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
REPORTS = HERE / "reports"
_COMMAND = "TEDMOE_BENCH_COMMAND"  # the launching process's command, handed to its ranks


def command() -> str:
    """This run's command line, with paths inside the repository made relative to its root (so it
    can be pasted there); inside a rank, the command that started the ranks."""
    if _COMMAND in os.environ:
        return os.environ[_COMMAND]

    def rel(path: str) -> str:
        p = Path(path).absolute()
        return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else path

    return shlex.join([rel(sys.executable), rel(sys.argv[0]), *sys.argv[1:]])


def start_ranks(nproc: int) -> int:
    """Run this script on ``nproc`` local ranks under ``torch.distributed.run`` (standalone, one
    thread per rank) with the same arguments, and wait. Returns the exit code: 0, or 1 after one
    line naming the first rank that failed. This is ``tedmoe.parallel.launch.relaunch`` for a script:
    that one always runs the ``tedmoe`` CLI module."""
    import logging

    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ[_COMMAND] = command()
    for name in list(logging.Logger.manager.loggerDict):  # the ranks' own output says what failed
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run.run(run.parse_args(["--standalone", f"--nproc-per-node={nproc}", sys.argv[0], *sys.argv[1:]]))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        print(f"{Path(sys.argv[0]).name}: rank {rank} failed (exit code {failure.exitcode})", file=sys.stderr)
        return 1
    return 0


def write_result(name: str, config: dict, result: dict, threads: int | None = None) -> Path:
    """Write ``result`` to ``results/<name>-<YYYY-MM-DD>.json`` (``-2``, ``-3``, ... if that day's
    file exists; never overwrite) with what reproducing it needs: the date, the command, ``config``,
    torch and Python versions, platform, CPU count, threads (``threads`` if the work ran in other
    processes) and, under torch.distributed, the world size. Prints and returns the path."""
    import torch
    import torch.distributed as dist

    date = time.strftime("%Y-%m-%d")
    record = {"date": date, "command": command(), "config": config, "torch": torch.__version__,
              "python": platform.python_version(), "platform": platform.platform(),
              "cpu_count": os.cpu_count(), "threads": threads if threads is not None else torch.get_num_threads()}
    if dist.is_available() and dist.is_initialized():
        record["world_size"] = dist.get_world_size()
    text = json.dumps({**record, **result}, indent=2, default=str)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = RESULTS / f"{name}-{date}{'' if n == 1 else f'-{n}'}.json"
        try:
            with open(path, "x") as f:
                f.write(text + "\n")
            break
        except FileExistsError:
            continue
    else:
        raise RuntimeError(f"too many {name} results for {date} in {RESULTS}")
    print(f"wrote {path.relative_to(ROOT)}")
    return path


def result_parts(result: Path) -> tuple[str, str, str]:
    """``results/<name>-<YYYY-MM-DD>[-N].json`` -> (name, date, ``""`` or ``"-N"``)."""
    stem = Path(result).stem
    for i in range(len(stem) - 10):
        date, rest = stem[i + 1:i + 11], stem[i + 11:]
        if stem[i] == "-" and _is_date(date) and (rest == "" or (rest[0] == "-" and rest[1:].isdigit())):
            return stem[:i], date, rest
    raise ValueError(f"{Path(result).name} is not named <name>-<YYYY-MM-DD>[-N].json")


def report_path(result: Path) -> Path:
    """The report that belongs to a result file: ``reports/<date>-<name>[-N].md``."""
    name, date, rest = result_parts(result)
    return REPORTS / f"{date}-{name}{rest}.md"


def _is_date(text: str) -> bool:
    try:
        time.strptime(text, "%Y-%m-%d")
    except ValueError:
        return False
    return True
