"""The ``tedmoe`` command: train, generate, serve, export, compress, plot, data, plan, demo. Thin: the work lives in the library."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import typing

from tedmoe.config import PRESETS, TrainConfig
from tedmoe.config.validation import field_hints
from tedmoe.compress.model import METHODS
from tedmoe.parallel import launch


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one ``tedmoe: error: ...`` line (exit 2), not usage + error."""

    def error(self, message: str):
        where = self.prog.removeprefix("tedmoe").strip()
        _say(f"tedmoe: error: {where + ': ' if where else ''}{message} (see {self.prog} --help)")
        raise SystemExit(2)


def _number(kind: type, low: float, strict: bool = False):
    """An argparse type: a finite ``kind`` >= low (> low when ``strict``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if strict else '>='} {low:g}")
        return value
    return parse


POSITIVE_INT, NONNEG_INT, POSITIVE = _number(int, 1), _number(int, 0), _number(float, 0, strict=True)


def _port(text: str) -> int:
    port = NONNEG_INT(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port (0-65535; 0 picks a free one)")
    return port


def _engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nproc", type=POSITIVE_INT, default=1, help="ranks to run the model on (TP x EP from "
                   "--set parallel.tp=.. --set parallel.ep=..); ignored under torchrun")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="parallel.KEY=VALUE",
                   help="the serving layout: parallel.tp, parallel.ep, parallel.backend, parallel.timeout_s")
    p.add_argument("--kv-memory-gib", type=POSITIVE, default=0.25, help="KV cache per rank, allocated once "
                   "(default: %(default)s)")
    p.add_argument("--block-size", type=POSITIVE_INT, default=16, help="tokens per KV cache block")
    p.add_argument("--routing", choices=("dropless", "training"), default="dropless", help="dropless: every "
                   "routed token computed (default); training: the capacity the model was trained with")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tedmoe", description="Mixture-of-Experts training with TED parallelism")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors "
                   "(also TEDMOE_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a GPT-MoE (default: 4 CPU ranks, TP 2 x DP 2, EP 2, DTD on)")
    t.add_argument("--config", help="a TOML file (applied over the preset)")
    t.add_argument("--preset", default="default", choices=PRESETS, help="starting config (default: %(default)s)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=50 (repeatable)")
    t.add_argument("--nproc", type=POSITIVE_INT, help="ranks to launch here (default: parallel.nproc); ignored under torchrun")
    t.add_argument("--nnodes", type=POSITIVE_INT, default=1, help="machines in the run, each starting the same "
                   "command with the same --nproc (needs --rdzv-endpoint)")
    t.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="where the machines meet (torchrun's c10d "
                   "rendezvous), e.g. the first machine's address and a free port")
    t.add_argument("--rdzv-id", default="tedmoe", help="a name shared by the machines of one run")
    t.add_argument("--out", help="run directory (same as --set out_dir=...)")
    t.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    t.add_argument("--overwrite", action="store_true", help="start afresh in a run directory that holds a run "
                   "(the old run is moved aside to RUN.old-N, never deleted)")
    t.add_argument("--accept-changes", action="store_true", help="with --resume: continue although the data, "
                   "batch size, schedule or optimizer settings differ from the checkpoint's")
    t.add_argument("--init-from", metavar="DIR", help="start from a Hugging Face model directory (Mixtral "
                   "layout): its architecture and weights, this run's data, routing and optimizer settings")
    t.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")

    g = sub.add_parser("generate", help="sample text from a checkpoint")
    g.add_argument("--ckpt", required=True, help="a checkpoint, a run directory (its latest checkpoint) or a "
                   "Hugging Face directory (Mixtral or Qwen3-MoE)")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--max-new-tokens", type=POSITIVE_INT, default=200)
    g.add_argument("--temperature", type=POSITIVE, default=0.8)
    g.add_argument("--top-k", type=POSITIVE_INT, default=40, help="sample among the k most likely tokens")
    g.add_argument("--greedy", action="store_true", help="always take the most likely token")
    g.add_argument("--seed", type=NONNEG_INT, default=0)
    _engine_options(g)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat, models, health, "
                        "metrics) on the engine, on one process or across ranks")
    sv.add_argument("--ckpt", required=True, help="a run, a checkpoint or a Hugging Face directory")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=_port, default=8000, help="0 picks a free port (printed)")
    sv.add_argument("--model-name", help="the model id the API reports (default: the directory's name)")
    sv.add_argument("--policy", choices=("splitfuse", "prefill-first", "static"), default="splitfuse",
                    help="scheduling: Dynamic SplitFuse (default), prefill-first continuous batching, static batches")
    sv.add_argument("--token-budget", type=POSITIVE_INT, default=512, help="tokens per forward (SplitFuse; "
                    "default: %(default)s, the best of 128/256/512 in benchmarks/serving.py on a 2-core CPU)")
    sv.add_argument("--max-seqs", type=POSITIVE_INT, default=32, help="sequences per forward")
    _engine_options(sv)

    cp = sub.add_parser("compress", help="write a compressed model: INT8/INT4 weights (group-wise scales), or the "
                        "packed binary/ternary/N:M weights of a quantisation-aware run; served by integer kernels")
    cp.add_argument("ckpt", help="a run, a checkpoint or a Hugging Face directory")
    cp.add_argument("--method", required=True, choices=tuple(METHODS), help="int8 / int4: weight-only; zeroquant: "
                    "INT8 weights and token-wise INT8 activations (W8A8); binary / ternary / nm: a run trained with "
                    "that compress.method, packed 8 / 4 weights per byte or as N:M values and a bitmap")
    cp.add_argument("--group-size", type=POSITIVE_INT, default=None, help="input columns per scale for int8, int4 "
                    "and zeroquant (default: 128)")
    cp.add_argument("--lkd", action="store_true", help="int8 / int4 / zeroquant: ZeroQuant's layer-by-layer knowledge "
                    "distillation on a calibration set from the run's training data before quantising")
    cp.add_argument("--calibration-batches", type=POSITIVE_INT, default=8, help="--lkd: batches of the run's "
                    "training data (default: %(default)s)")
    cp.add_argument("--lkd-steps", type=POSITIVE_INT, default=100, help="--lkd: optimizer steps per layer "
                    "(default: %(default)s)")
    cp.add_argument("--lkd-lr", type=POSITIVE, default=1e-5, help="--lkd: Adam learning "
                    "rate, decayed linearly to 0 (default: %(default)s)")
    cp.add_argument("--out", required=True, help="a new directory (an existing one is refused)")

    ex = sub.add_parser("export", help="write a run's model as a Hugging Face directory (Mixtral, or "
                        "Qwen3-MoE for models with model.qk_norm)")
    ex.add_argument("ckpt", help="a run directory (its latest checkpoint) or a checkpoint directory")
    ex.add_argument("--format", choices=("hf",), default="hf", help="hf: config.json + safetensors for transformers")
    ex.add_argument("--out", required=True, help="a new directory (an existing one is refused)")

    pl = sub.add_parser("plot", help="write PNG plots of a run's metrics into RUN_DIR/plots")
    pl.add_argument("run_dir")

    d = sub.add_parser("data", help="prepare token files")
    dsub = d.add_subparsers(dest="data_command", required=True)
    prep = dsub.add_parser("prepare", help="tokenize text files into a memory-mapped train/val split")
    prep.add_argument("inputs", nargs="+", help="files or directories (*.txt, *.md, *.py)")
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--tokenizer", default="byte", metavar="{byte,bpe,DIR}",
                      help="byte, bpe (trained on the inputs), or a Hugging Face model or tokenizer directory "
                      "holding tokenizer.json (its ids, e.g. for train --init-from DIR)")
    prep.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size (> 256)")
    prep.add_argument("--val-fraction", type=float, default=0.05, help="share held out for validation, in (0, 1)")

    pn = sub.add_parser("plan", help="rank the layouts of a model on a cluster by predicted step time")
    pn.add_argument("--model", default="6.7b", help="1.3b, 2.7b, 6.7b, 13b (paper base models) or a TOML file "
                    "with a [model] table")
    pn.add_argument("--experts", type=POSITIVE_INT, default=16, help="experts per MoE layer (paper models)")
    pn.add_argument("--gpus", type=POSITIVE_INT, default=128)
    pn.add_argument("--hardware", default="summit", help="summit, perlmutter, dgx-a100, dgx-h100 or a TOML file")
    pn.add_argument("--global-batch", type=POSITIVE_INT, default=512, help="sequences per step")
    pn.add_argument("--micro-batch", type=POSITIVE_INT, default=1)
    pn.add_argument("--seq-len", type=POSITIVE_INT, default=2048)
    pn.add_argument("--memory-gib", type=POSITIVE, help="memory cap per device (default: the hardware's)")
    pn.add_argument("--checkpointing", choices=typing.get_args(field_hints(TrainConfig)["checkpointing"]), default="cac")
    pn.add_argument("--zero-stage", type=int, choices=(1, 2, 3), default=1, help="1: optimizer states sharded; 2: "
                    "gradients too; 3: parameters too, gathered per block while used (default: %(default)s)")
    pn.add_argument("--offload", choices=typing.get_args(field_hints(TrainConfig)["offload"]), default="none",
                    help="where the optimizer states live: on the device (none), in host memory (cpu) or in files "
                    "on the node's disk (disk; at ZeRO-3 the parameter shards too) (default: %(default)s)")
    pn.add_argument("--no-dtd", action="store_true", help="predict without duplicate token dropping")
    pn.add_argument("--tp", type=POSITIVE_INT, help="evaluate only this tensor-parallel degree")
    pn.add_argument("--ep", type=POSITIVE_INT, help="evaluate only this expert-parallel degree")
    pn.add_argument("--json", action="store_true", help="print JSON instead of a table")

    demo = sub.add_parser("demo", help="TP layers and the TED MoE layer on N ranks checked against one process")
    demo.add_argument("--nproc", type=POSITIVE_INT, default=4, help="ranks to launch when not already under torchrun")
    return p


def _train(args, argv: list[str]) -> int:
    from tedmoe.config import dump_run_config, load_run_config
    from tedmoe.runtime import rundir
    from tedmoe.runtime.trainer import _finished_message, check_before_launch, train

    overrides = args.overrides + ([f"out_dir={args.out!r}".replace("'", '"')] if args.out else [])
    if args.init_from:
        overrides = overrides + [f"init_from={args.init_from!r}".replace("'", '"')]
    cfg = load_run_config(args.config, args.preset, overrides)
    if cfg.init_from is not None:
        from tedmoe.interop import hf

        hf.apply_init_from(cfg)  # the model's architecture comes from the directory
    if args.print_config:
        print(dump_run_config(cfg), end="")
        return 0
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other; pass one of them")
    if launch.launched():  # torchrun, SLURM, or our own relaunch
        train(cfg, resume=args.resume, overwrite=args.overwrite, accept_changes=args.accept_changes)
        return 0
    nproc = args.nproc or cfg.parallel.nproc
    rundir.refuse_if_in_use(cfg.out_dir)
    if args.nnodes > 1:
        if not args.rdzv_endpoint:
            raise ValueError(f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT (the same on every machine)")
        check_before_launch(cfg, nproc * args.nnodes, args.resume, args.accept_changes)
        # rank 0, wherever the rendezvous puts it, claims the (shared) run directory
        return launch.relaunch(nproc, argv, nnodes=args.nnodes, rdzv_endpoint=args.rdzv_endpoint,
                               rdzv_id=args.rdzv_id)
    status = check_before_launch(cfg, nproc, args.resume, args.accept_changes)
    if status["finished"]:
        print(f"tedmoe: {_finished_message(cfg, status['step'])}")
        return 0
    lock, notes = rundir.claim(cfg.out_dir, args.resume, args.overwrite)
    for note in notes:
        print(f"tedmoe: {note}", file=sys.stderr)
    os.environ["TEDMOE_RUN_CLAIMED"] = "1"  # the ranks inherit it: this process holds the lock
    try:
        if nproc == 1:
            train(cfg, resume=args.resume, accept_changes=args.accept_changes)
            return 0
        return launch.relaunch(nproc, argv)
    finally:
        os.environ.pop("TEDMOE_RUN_CLAIMED", None)
        lock.release()


def _serving_layout(overrides: list[str], command: str = "generate"):
    """The ``parallel`` settings of ``generate``'s or ``serve``'s ``--set`` options (nothing else is taken)."""
    from tedmoe.config import ParallelConfig, apply_values
    from tedmoe.config.loader import parse_override

    par = ParallelConfig()
    for item in overrides:
        if not item.startswith("parallel."):
            raise ValueError(f"--set {item}: {command} takes only parallel.* settings (tp, ep, backend, timeout_s); "
                             "the model's settings come from the checkpoint")
        apply_values(par, parse_override(item)["parallel"], "parallel.")
    if par.sp != 1:
        raise ValueError(f"parallel.sp={par.sp}: generation runs TP x EP layouts; leave parallel.sp=1")
    par.check_backend()
    return par


def _on_engine(args, argv: list[str], leader, stop_is_clean: bool = False) -> int:
    """Load ``args.ckpt`` into the serving layout (relaunching on ``--nproc`` ranks first) and
    build the engine; rank 0 runs ``leader(engine, tokenizer, where)`` and then releases the
    others, which follow its forwards. ``stop_is_clean``: a signal ends the work normally (serve)."""
    import signal

    from tedmoe.inference.engine import InferenceEngine
    from tedmoe.inference.generate import load_model, model_config_of
    from tedmoe.parallel.topology import ParallelDims, Topology

    par = _serving_layout(args.overrides, args.command)
    world = int(os.environ["WORLD_SIZE"]) if launch.launched() else args.nproc
    ParallelDims(world, par.tp, par.ep)  # a layout that does not fit the ranks is refused here
    model_config_of(args.ckpt).validate(par.tp, par.ep)  # before any rank starts
    if world > 1 and not launch.launched():
        code = launch.relaunch(world, argv)
        # Ctrl-C / SIGTERM reach every rank: rank 0 stops the work and says so, the others follow it
        return 0 if stop_is_clean and code in (128 + signal.SIGINT, 128 + signal.SIGTERM) else code
    if world > 1:
        launch.init_distributed(par.backend, par.timeout_s)
    try:
        topo = Topology(world, tp=par.tp, ep=par.ep, timeout_s=par.timeout_s) if world > 1 else Topology.single()
        model, tok = load_model(args.ckpt, topo, routing=args.routing, device=topo.device)
        engine = InferenceEngine(model, block_size=args.block_size, kv_bytes=int(args.kv_memory_gib * 2**30))
        if engine.rank != 0:
            for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 decides when to stop, and says so
                signal.signal(sig, signal.SIG_IGN)
            engine.follow()
            return 0
        where = f"{world} ranks (tp={par.tp}, ep={par.ep})" if world > 1 else "1 process"
        where += (f"; KV cache {engine.capacity_tokens:,} tokens per rank ({engine.cache.nbytes / 2**20:,.1f} MiB, "
                  f"{engine.bytes_per_token:,} bytes per token)")
        try:
            return leader(engine, tok, where)
        finally:
            engine.stop()
    finally:
        launch.shutdown_distributed()


def _generate(args, argv: list[str]) -> int:
    from tedmoe.inference.generate import generate_batch, sampling_params

    params = sampling_params(args.temperature, args.top_k, args.greedy)
    if not args.prompt:  # before any model is loaded or rank started
        raise ValueError("the prompt is empty; give at least one character with --prompt (the model continues it)")

    def leader(engine, tok, where):
        print(f"tedmoe: {where}", file=sys.stderr)
        bos = [tok.bos_id] if getattr(tok, "bos_id", None) is not None else []  # as the documents start
        ids = tok.encode(args.prompt)
        out = generate_batch(engine, [bos + ids], args.max_new_tokens, params, args.seed)[0]
        print(tok.decode(out[len(bos):]))
        return 0

    return _on_engine(args, argv, leader)


def _serve(args, argv: list[str]) -> int:
    from pathlib import Path

    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client", "jinja2") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"tedmoe serve needs {', '.join(missing)}: pip install 'tedmoe[serve]'")
    from tedmoe.serve.app import ServingLoop, serve_http

    name = args.model_name or Path(args.ckpt).resolve().name

    def leader(engine, tok, where):
        loop = ServingLoop(engine, tok, args.policy, args.token_budget, args.max_seqs)
        finished, cancelled = serve_http(loop, name, args.host, args.port, f"({args.policy}; {where})")
        said = f"{finished} request(s) in flight finished, {len(cancelled)} cancelled" + \
            (f" (ids {', '.join(map(str, cancelled))})" if cancelled else "")
        print(f"tedmoe: server stopped; {said}", file=sys.stderr, flush=True)
        return 0

    return _on_engine(args, argv, leader, stop_is_clean=True)


def _compress(args) -> int:
    from pathlib import Path

    from tedmoe.compress import model as compressed
    from tedmoe.inference.generate import load_model, trained_compression

    if compressed.is_compressed(args.ckpt):
        raise ValueError(f"{args.ckpt} is compressed already ({compressed.read_meta(args.ckpt)['method']}); "
                         "compress the float run or Hugging Face directory it came from")
    if Path(args.out).exists():
        raise ValueError(f"--out {args.out} exists; compress into a new directory (nothing is overwritten)")
    method, trained = args.method, trained_compression(args.ckpt)
    if method in compressed.TRAINED:
        if args.group_size is not None:
            raise ValueError(f"--group-size is for int8, int4 and zeroquant; {method} weights keep "
                             + ("their values" if method == "nm" else "one scale per row"))
        if trained.method != method:
            raise ValueError(f"--method {method} packs the weights of a run trained with --set compress.method={method}; "
                             f"{args.ckpt} was trained with compress.method={trained.method} (use int8, int4 or "
                             "zeroquant, or train with that setting first)")
    if args.lkd and method not in compressed.GROUPED:
        raise ValueError(f"--lkd distils each layer towards its INT8/INT4 form (int8, int4, zeroquant); {method} "
                         "weights come from quantisation-aware training (add compress.teacher there instead)")
    group = args.group_size or 128
    model, tok = load_model(args.ckpt)
    state, lkd = model.state_dict(), None
    if args.lkd:
        from tedmoe.compress import lkd as distil

        state, lkd = distil.distil(model, args.ckpt, group, args.calibration_batches, args.lkd_steps, args.lkd_lr,
                                   compressed.BITS[method])
    report = compressed.save(state, model.config, method, group, args.out, tok, source=str(Path(args.ckpt).resolve()),
                             n=trained.n, m=trained.m)
    what = f"{method} (group {group})" if method in compressed.GROUPED else (
        f"{trained.n}:{trained.m} sparse" if method == "nm" else method)
    mib = 2 ** 20
    print(f"wrote {args.out}: {report['quantized_tensors']} weights as {what}{' after LKD' if lkd else ''}; "
          f"{report['bytes_on_disk'] / mib:,.2f} MiB on disk ({report['ratio']:.2f}x smaller than fp32 "
          f"{report['fp32_bytes'] / mib:,.2f} MiB, bf16 {report['bf16_bytes'] / mib:,.2f} MiB), "
          f"{report['bytes_in_memory'] / mib:,.2f} MiB in memory when served")
    if lkd:
        print(f"LKD: {lkd}")
    return 0


def _export(args) -> int:
    from pathlib import Path

    from tedmoe.inference.generate import load_model, model_config_of
    from tedmoe.interop import families, hf

    if Path(args.out).exists():
        raise ValueError(f"--out {args.out} exists; export into a new directory (nothing is overwritten)")
    family = families.family_of(model_config_of(args.ckpt))  # refuses before any weight is read
    model, tokenizer = load_model(args.ckpt)
    out = hf.save(model.state_dict(), model.config, args.out, tokenizer)
    print(f"wrote {out} ({family.name} layout: transformers' AutoModelForCausalLM and AutoTokenizer load it)")
    return 0


def _plan(args) -> int:
    import dataclasses
    import json

    from tedmoe.config import check_batch, load_model_config
    from tedmoe.parallel.topology import ParallelDims
    from tedmoe.planner.hardware import load_hardware
    from tedmoe.planner.search import GiB, largest_layers, layouts, paper_model, paper_train, smallest_cluster, table

    hw = load_hardware(args.hardware)
    model = load_model_config(args.model) if args.model.endswith(".toml") else paper_model(args.model, args.experts)
    if args.tp or args.ep:  # an explicit layout: say which constraint it breaks
        tp, ep = args.tp or 1, args.ep or 1
        dims = ParallelDims(args.gpus, tp, ep)
        model.validate(tp, ep)
        check_batch(args.global_batch, args.micro_batch, dims.dp, ("--global-batch", "--micro-batch"))
    train = dataclasses.replace(paper_train(args.checkpointing), zero_stage=args.zero_stage, offload=args.offload)
    kw = {"micro_batch": args.micro_batch, "seq_len": args.seq_len, "train": train,
          "memory_cap": args.memory_gib * GiB if args.memory_gib else None, "dtd": not args.no_dtd}
    cands = [c for c in layouts(model, args.gpus, hw, args.global_batch, **kw,
                                max_tp=max(args.tp or 1, hw.gpus_per_node))
             if (args.tp is None or c.tp == args.tp) and (args.ep is None or c.ep == args.ep)]
    if not cands:
        raise ValueError(f"no layout of {args.gpus} GPUs suits this model and batch (global batch {args.global_batch} "
                         f"must be a multiple of micro-batch {args.micro_batch} x dp for some layout; "
                         f"try --global-batch {args.micro_batch * args.gpus})")
    if args.json:
        print(json.dumps([dataclasses.asdict(c) for c in cands], indent=2))
    else:
        print(f"{args.model} ({model.moe.num_experts} experts) on {args.gpus} x {hw.name}, global batch "
              f"{args.global_batch} x {args.seq_len} tokens, checkpointing {args.checkpointing}, "
              f"ZeRO-{args.zero_stage}, offload {args.offload}, DTD {'off' if args.no_dtd else 'on'}")
        print(table(cands))
    device = f"{(kw['memory_cap'] or hw.memory_bytes) / GiB:.1f} GiB per device"
    offloaded = ""
    if args.offload != "none":  # what fits is checked against the GPU's share of its node's host memory or disk
        where = {"cpu": ("host", "host memory", hw.host_memory_bytes), "disk": ("disk", "disk", hw.disk_bytes)}
        key, place, node = where[args.offload]
        offloaded = (f" and {node / hw.gpus_per_node / GiB:.1f} GiB of {place} (its share of the node's)" if node
                     else f" ({place}: not stated by the hardware, not checked)")
        if not args.json:
            print(f"dev GiB: on the device; {key} GiB: offloaded to {place}; a layout fits within {device}{offloaded}")
    if not any(c.fits for c in cands):
        smallest = smallest_cluster(model, hw, args.global_batch, **kw)
        layers = largest_layers(model, args.gpus, hw, args.global_batch, **kw)
        raise ValueError(f"no layout fits in {device}{offloaded}; "
                         + (f"the smallest cluster that fits is {smallest} GPUs" if smallest else "no cluster fits")
                         + (f"; on {args.gpus} GPUs at most {layers} layers fit" if layers else ""))
    return 0


def _say(line: str, every_rank: bool = False) -> None:
    """One line on stderr (from rank 0 only, unless ``every_rank``). A rank that ``tedmoe train``
    relaunched stays quiet and leaves the line for the launcher, which prints the first failure's."""
    launch.record_error(line)
    if launch.relaunched():
        return
    rank = os.environ.get("RANK")
    if rank not in (None, "0") and not every_rank and launch.launched():
        # under torchrun every rank meets the same mistake; let rank 0 say it (the agent stops the
        # others when it exits), and speak only if rank 0 did not (a mistake of this rank alone)
        time.sleep(5)
        every_rank = True
    if every_rank or rank in (None, "0"):
        print(line, file=sys.stderr, flush=True)


def _run(args, argv: list[str]) -> int:
    if args.command == "train":
        return _train(args, argv)
    if args.command == "generate":
        return _generate(args, argv)
    if args.command == "serve":
        return _serve(args, argv)
    if args.command == "plan":
        return _plan(args)
    if args.command == "export":
        return _export(args)
    if args.command == "compress":
        return _compress(args)
    if args.command == "plot":
        from tedmoe.runtime.plots import plot_run

        for path in plot_run(args.run_dir):
            print(path)
        return 0
    if args.command == "data":
        from tedmoe.data.dataset import prepare

        out = prepare(args.inputs, args.out, args.tokenizer, args.vocab_size, args.val_fraction)
        print(f"wrote {out}")
        return 0
    if args.nproc > 1 and not launch.launched():
        return launch.relaunch(args.nproc, argv)
    from tedmoe.examples import demo

    if launch.launched():
        launch.init_distributed()
    try:
        return demo.main()
    finally:
        launch.shutdown_distributed()


def main(argv: list[str] | None = None) -> int:
    """The ``tedmoe`` command. A mistake ends in one ``tedmoe: error: ...`` line and exit code 2
    (3: non-finite gradients, 1: a failed rank or an internal error, 130: interrupted);
    ``--debug`` or ``TEDMOE_DEBUG=1`` shows tracebacks instead."""
    if argv is None:
        argv = sys.argv[1:] or launch.launched_argv() or []
    try:
        args = _parser().parse_args(argv)
    except SystemExit as done:  # --help, or a mistake already said in one line
        return done.code if isinstance(done.code, int) else 2
    if args.debug:
        os.environ["TEDMOE_DEBUG"] = "1"  # relaunched ranks inherit it
    if os.environ.get("TEDMOE_DEBUG") == "1":
        return _run(args, argv)
    try:
        return _run(args, argv)
    except KeyboardInterrupt as err:  # the trainer's Interrupted says what it kept
        if os.environ.get("RANK") in (None, "0"):
            print(f"tedmoe: {err}" if str(err) else "tedmoe: interrupted", file=sys.stderr, flush=True)
        return 130
    except FloatingPointError as err:
        _say(f"tedmoe: error: {err}")
        return 3
    except (ValueError, OSError) as err:  # user mistakes; OSError: a path that is missing, a file, unreadable
        _say(f"tedmoe: error: {_one_line(err)}")
        return 2
    except RuntimeError as err:
        if launch.launched():  # a peer died or a collective timed out: say so in one line
            _say(f"tedmoe: error: {launch.describe_failure(err)}", every_rank=True)
            return 1
        _say(f"tedmoe: error: internal error: {type(err).__name__}: {_one_line(err)} ({_DEBUG_HINT})")
        return 1
    except Exception as err:  # a bug: still one line, with the way to see more
        _say(f"tedmoe: error: internal error: {type(err).__name__}: {_one_line(err)} ({_DEBUG_HINT})")
        return 1


_DEBUG_HINT = "run again with --debug for the traceback"


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    text = str(err).strip()
    return text.splitlines()[0][:500] if text else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
