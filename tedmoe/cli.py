"""The ``tedmoe`` command."""

from __future__ import annotations

import argparse
import sys

from tedmoe.parallel import launch


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tedmoe", description="Mixture-of-Experts training with TED parallelism")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="tensor-parallel layers on N ranks checked against one process")
    demo.add_argument("--nproc", type=int, default=4, help="ranks to launch when not already under torchrun")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.command == "demo":
        if args.nproc < 1:
            print(f"tedmoe: --nproc={args.nproc} must be at least 1", file=sys.stderr)
            return 2
        if args.nproc > 1 and not launch.launched():
            return launch.relaunch(args.nproc, argv)
        from tedmoe import demo

        if launch.launched():
            launch.init_distributed()
        return demo.main()
    return 2


if __name__ == "__main__":
    sys.exit(main())
