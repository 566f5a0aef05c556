"""The ``tedmoe`` command: train, generate, plot, data, demo. Thin: the work lives in the library."""

from __future__ import annotations

import argparse
import os
import sys

from tedmoe.config import PRESETS
from tedmoe.parallel import launch


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tedmoe", description="Mixture-of-Experts training with TED parallelism")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a GPT-MoE (default: 4 CPU ranks, TP 2 x DP 2, EP 2, DTD on)")
    t.add_argument("--config", help="a TOML file (applied over the preset)")
    t.add_argument("--preset", default="default", choices=PRESETS, help="starting config (default: %(default)s)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=50 (repeatable)")
    t.add_argument("--nproc", type=int, help="ranks to launch here (default: parallel.nproc); ignored under torchrun")
    t.add_argument("--out", help="run directory (same as --set out_dir=...)")
    t.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    t.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")

    g = sub.add_parser("generate", help="sample text from a checkpoint")
    g.add_argument("--ckpt", required=True, help="a checkpoint, or a run directory (its latest checkpoint)")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--greedy", action="store_true", help="always take the most likely token")
    g.add_argument("--seed", type=int, default=0)

    pl = sub.add_parser("plot", help="write PNG plots of a run's metrics into RUN_DIR/plots")
    pl.add_argument("run_dir")

    d = sub.add_parser("data", help="prepare token files")
    dsub = d.add_subparsers(dest="data_command", required=True)
    prep = dsub.add_parser("prepare", help="tokenize text files into a memory-mapped train/val split")
    prep.add_argument("inputs", nargs="+", help="files or directories (*.txt, *.md, *.py)")
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--tokenizer", choices=("byte", "bpe"), default="byte")
    prep.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size")
    prep.add_argument("--val-fraction", type=float, default=0.05)

    pn = sub.add_parser("plan", help="rank the layouts of a model on a cluster by predicted step time")
    pn.add_argument("--model", default="6.7b", help="1.3b, 2.7b, 6.7b, 13b (paper base models) or a TOML file "
                    "with a [model] table")
    pn.add_argument("--experts", type=int, default=16, help="experts per MoE layer (paper models)")
    pn.add_argument("--gpus", type=int, default=128)
    pn.add_argument("--hardware", default="summit", help="summit, perlmutter, dgx-a100, dgx-h100 or a TOML file")
    pn.add_argument("--global-batch", type=int, default=512, help="sequences per step")
    pn.add_argument("--micro-batch", type=int, default=1)
    pn.add_argument("--seq-len", type=int, default=2048)
    pn.add_argument("--memory-gib", type=float, help="memory cap per device (default: the hardware's)")
    pn.add_argument("--checkpointing", choices=("none", "plain", "cac"), default="cac")
    pn.add_argument("--no-dtd", action="store_true", help="predict without duplicate token dropping")
    pn.add_argument("--tp", type=int, help="evaluate only this tensor-parallel degree")
    pn.add_argument("--ep", type=int, help="evaluate only this expert-parallel degree")
    pn.add_argument("--json", action="store_true", help="print JSON instead of a table")

    demo = sub.add_parser("demo", help="TP layers and the TED MoE layer on N ranks checked against one process")
    demo.add_argument("--nproc", type=int, default=4, help="ranks to launch when not already under torchrun")
    return p


def _train(args, argv: list[str]) -> int:
    from tedmoe.configfile import dump_run_config, load_run_config
    from tedmoe.runtime.trainer import check_before_launch, train

    overrides = args.overrides + ([f"out_dir={args.out!r}".replace("'", '"')] if args.out else [])
    cfg = load_run_config(args.config, args.preset, overrides)
    if args.print_config:
        print(dump_run_config(cfg), end="")
        return 0
    if launch.launched():
        train(cfg, resume=args.resume)
        return 0
    nproc = args.nproc or cfg.parallel.nproc
    if nproc < 1:
        raise ValueError(f"--nproc={nproc} must be at least 1")
    check_before_launch(cfg, nproc, args.resume)
    if nproc == 1:
        train(cfg, resume=args.resume)
        return 0
    return launch.relaunch(nproc, argv)


def _generate(args) -> int:
    from tedmoe.generate import generate, load_model

    model, tok = load_model(args.ckpt)
    ids = tok.encode(args.prompt)
    out = generate(model, ids, args.max_new_tokens, args.temperature, args.top_k, args.greedy, args.seed)
    print(tok.decode(out))
    return 0


def _plan(args) -> int:
    import dataclasses
    import json

    from tedmoe.configfile import load_model_config
    from tedmoe.parallel.topology import ParallelDims
    from tedmoe.planner.hardware import load_hardware
    from tedmoe.planner.search import GiB, largest_layers, layouts, paper_model, smallest_cluster, table

    hw = load_hardware(args.hardware)
    model = load_model_config(args.model) if args.model.endswith(".toml") else paper_model(args.model, args.experts)
    if args.tp or args.ep:  # an explicit layout: say which constraint it breaks
        tp, ep = args.tp or 1, args.ep or 1
        dims = ParallelDims(args.gpus, tp, ep)
        model.validate(tp, ep)
        if args.global_batch % (args.micro_batch * dims.dp):
            raise ValueError(f"global batch {args.global_batch} is not a multiple of micro-batch {args.micro_batch} "
                             f"x dp {dims.dp}")
    kw = {"micro_batch": args.micro_batch, "seq_len": args.seq_len, "checkpointing": args.checkpointing,
          "memory_cap": args.memory_gib * GiB if args.memory_gib else None, "dtd": not args.no_dtd}
    cands = [c for c in layouts(model, args.gpus, hw, args.global_batch, **kw,
                                max_tp=max(args.tp or 1, hw.gpus_per_node))
             if (args.tp is None or c.tp == args.tp) and (args.ep is None or c.ep == args.ep)]
    if args.json:
        print(json.dumps([dataclasses.asdict(c) for c in cands], indent=2))
    else:
        print(f"{args.model} ({model.moe.num_experts} experts) on {args.gpus} x {hw.name}, global batch "
              f"{args.global_batch} x {args.seq_len} tokens, checkpointing {args.checkpointing}, "
              f"DTD {'off' if args.no_dtd else 'on'}")
        print(table(cands))
    if not any(c.fits for c in cands):
        smallest = smallest_cluster(model, hw, args.global_batch, **kw)
        layers = largest_layers(model, args.gpus, hw, args.global_batch, **kw)
        raise ValueError(f"no layout fits in {(kw['memory_cap'] or hw.memory_bytes) / GiB:.1f} GiB per device; "
                         + (f"the smallest cluster that fits is {smallest} GPUs" if smallest else "no cluster fits")
                         + (f"; on {args.gpus} GPUs at most {layers} layers fit" if layers else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:] or launch.launched_argv() or []
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            return _train(args, argv)
        if args.command == "generate":
            return _generate(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "plot":
            from tedmoe.plots import plot_run

            for path in plot_run(args.run_dir):
                print(path)
            return 0
        if args.command == "data":
            from tedmoe.data.dataset import prepare

            out = prepare(args.inputs, args.out, args.tokenizer, args.vocab_size, args.val_fraction)
            print(f"wrote {out}")
            return 0
        if args.nproc < 1:
            raise ValueError(f"--nproc={args.nproc} must be at least 1")
        if args.nproc > 1 and not launch.launched():
            return launch.relaunch(args.nproc, argv)
        from tedmoe import demo

        if launch.launched():
            launch.init_distributed()
        return demo.main()
    except (ValueError, FileNotFoundError, FloatingPointError) as err:  # one line, no traceback
        if os.environ.get("RANK") in (None, "0"):
            print(f"tedmoe: error: {err}", file=sys.stderr)
        return 3 if isinstance(err, FloatingPointError) else 2
    except RuntimeError as err:  # a peer died or a collective timed out: say so in one line
        if launch.launched():
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            print(f"tedmoe: rank {os.environ.get('RANK')}: {first}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
