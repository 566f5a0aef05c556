"""``tedmoe train``: data, model, engine, the loop, evaluation, checkpoints, export."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tedmoe.config import RunConfig
from tedmoe.config.loader import model_differences
from tedmoe.fileio import write_atomic
from tedmoe.data.dataset import BatchSampler, TokenDataset, embedded_corpus_files, prepare
from tedmoe.data.tokenizer import copy_tokenizer
from tedmoe.model.transformer import GPTMoE
from tedmoe.parallel import comm, launch
from tedmoe.parallel.activation_checkpoint import apply_checkpointing
from tedmoe.parallel.sharding import full_state_dict
from tedmoe.parallel.topology import Topology
from tedmoe.runtime import checkpoint as ckpt
from tedmoe.runtime import faults, rundir
from tedmoe.runtime.engine import Engine
from tedmoe.runtime.metrics import MetricsWriter, read_metrics, summary


def cache_dir() -> Path:
    """Where the embedded corpus is prepared: ``$TEDMOE_CACHE`` or ``~/.cache/tedmoe``."""
    path = Path(os.environ.get("TEDMOE_CACHE", Path.home() / ".cache" / "tedmoe"))
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise ValueError(f"the data cache {path} cannot be a directory: {p} is a file; set TEDMOE_CACHE "
                             "to a directory")
    return path


def data_dir(cfg: RunConfig) -> Path:
    """The prepared dataset: ``data.path``, or the embedded corpus prepared once into the cache."""
    if cfg.data.path is not None:
        return Path(cfg.data.path)
    d = cfg.data
    name = f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-{d.tokenizer}"
    name += f"{d.bpe_vocab_size if d.tokenizer == 'bpe' else ''}-{d.corpus_bytes}-{d.val_fraction}"
    return cache_dir() / name


def ensure_data(cfg: RunConfig) -> Path:
    """Prepare the embedded corpus if it is not cached yet (call on one process only)."""
    path = data_dir(cfg)
    if cfg.data.path is None and not (path / "meta.json").is_file():
        d = cfg.data
        prepare(embedded_corpus_files(d.corpus_bytes), path, d.tokenizer, d.bpe_vocab_size, d.val_fraction)
    return path


def predicted_memory(cfg: RunConfig, world: int) -> dict[str, float]:
    """The planner's bytes per rank of this run (``tedmoe.planner.predict.memory``)."""
    from tedmoe.parallel.topology import ParallelDims
    from tedmoe.planner.predict import Plan, memory

    dims = ParallelDims(world, cfg.parallel.tp, cfg.parallel.ep, cfg.parallel.sp)
    return memory(Plan(cfg.model, world, dims.tp, dims.ep, cfg.micro_batch_size, cfg.seq_len // dims.sp,
                       train=cfg.train))


def check_memory(cfg: RunConfig, world: int) -> None:
    """Refuse a run that cannot fit in this machine's memory, with the estimate (CPU ranks share
    one machine's RAM; on CUDA each rank has its device)."""
    from tedmoe.parallel.topology import ParallelDims

    dims = ParallelDims(world, cfg.parallel.tp, cfg.parallel.ep, cfg.parallel.sp)
    predicted = predicted_memory(cfg, world)
    model_bytes = predicted["total"]
    on_gpu = torch.cuda.is_available() and cfg.parallel.backend in (None, "nccl")
    if not on_gpu:  # offload="cpu" moves the states to host memory, which is the same memory here
        model_bytes += predicted.get("host", 0)
    batch_bytes = 3 * 8 * cfg.global_batch_size * (cfg.seq_len + 1)  # every rank draws the global batch (int64)
    logits = 3 * 4 * cfg.micro_batch_size * cfg.seq_len * cfg.model.vocab_size / dims.tp / dims.sp
    per_rank = model_bytes + batch_bytes + logits
    if on_gpu:
        budget, ranks, where = torch.cuda.get_device_properties(0).total_memory, 1, "each GPU has"
    else:
        try:
            budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return
        ranks, where = min(world, int(os.environ.get("LOCAL_WORLD_SIZE", world))), "this machine has"
    if per_rank * ranks > budget:
        gib = 2**30
        raise ValueError(f"this run needs about {per_rank / gib:,.1f} GiB per rank (global batch {batch_bytes / gib:,.1f}, "
                         f"model, optimizer and activations {(model_bytes + logits) / gib:,.1f}) x {ranks} ranks, but "
                         f"{where} {budget / gib:,.1f} GiB free; lower global_batch_size, micro_batch_size or seq_len, "
                         "or use more ranks")


def check_offload_path(cfg: RunConfig, world: int) -> None:
    """``train.offload_path`` is a writable directory with room for this machine's ranks' files."""
    path, where = Path(cfg.train.offload_path), f"train.offload_path={cfg.train.offload_path!r}"
    if not path.is_dir():
        raise ValueError(f"{where} is not a directory; create it (on a fast disk) or point offload_path at one")
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"{where} is not writable ({err.strerror}); choose a directory you can write to") from None
    per_rank = predicted_memory(cfg, world)["disk"]  # fp32 master, exp_avg, exp_avg_sq of the rank's shards
    ranks = min(world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    free = shutil.disk_usage(path).free
    if per_rank * ranks > free:
        mib = 2**20
        raise ValueError(f"{where} has {free / mib:,.0f} MiB free but the offloaded optimizer states need about "
                         f"{per_rank * ranks / mib:,.0f} MiB ({ranks} ranks x {per_rank / mib:,.0f} MiB); free space "
                         "there or choose a larger disk")


def check_before_launch(cfg: RunConfig, world: int, resume: bool, accept_changes: bool = False) -> dict:
    """Everything that can be checked without process groups, so a mistake fails once, early.
    Returns what a resume would do: ``{"checkpoint": path or None, "step": N, "finished": bool}``."""
    cfg.validate(world)
    check_memory(cfg, world)
    path = ensure_data(cfg)
    ds = TokenDataset(path, "train", verify=True)
    val = TokenDataset(path, "val", verify=True)
    if ds.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the data's tokenizer has {ds.vocab_size} tokens but model.vocab_size="
                         f"{cfg.model.vocab_size}; set model.vocab_size >= {ds.vocab_size} (a multiple of tp)")
    if cfg.data.curriculum.rarity.schedule != "none":
        from tedmoe.data.curriculum import ensure_metrics

        ensure_metrics(path)  # datasets prepared before the metrics existed get them once
    train_sampler(cfg, ds)
    BatchSampler(val, cfg.seq_len, cfg.global_batch_size, cfg.seed + 1)
    if cfg.compress.teacher is not None:
        check_teacher(cfg, world)
    if cfg.train.offload == "disk":
        check_offload_path(cfg, world)
    found = ckpt.latest_checkpoint(Path(cfg.out_dir) / "checkpoints") if resume else None
    if found is None:
        return {"checkpoint": None, "step": 0, "finished": False}
    meta = ckpt.read_meta(found)
    if model_differences(meta.get("config", {}).get("model"), dataclasses.asdict(cfg.model)):
        raise ckpt.CheckpointError(f"checkpoint {found} was made for another model config; "
                                   "use another out_dir or the same model settings")
    changes = rundir.resume_changes(meta.get("config", {}), dataclasses.asdict(cfg), meta.get("data"),
                                    dataset_digest(ds))
    if changes and not accept_changes:
        raise ckpt.CheckpointError(f"checkpoint {found} was made with other settings: {'; '.join(changes)}; pass "
                                   "--accept-changes to continue with the new ones, or resume with the old ones")
    ckpt.verify(found)
    return {"checkpoint": found, "step": meta["step"], "finished": meta["step"] >= cfg.train.max_steps}


def train_sampler(cfg: RunConfig, ds: TokenDataset):
    """The training batches: random windows, or with ``data.curriculum`` the scheduled ones."""
    if cfg.data.curriculum.active:
        from tedmoe.data.curriculum import CurriculumSampler

        return CurriculumSampler(ds, cfg.seq_len, cfg.global_batch_size, cfg.seed, cfg.data.curriculum)
    return BatchSampler(ds, cfg.seq_len, cfg.global_batch_size, cfg.seed)


def check_teacher(cfg: RunConfig, world: int) -> None:
    """The distillation teacher exists, shares the vocabulary and fits the run's layout."""
    from tedmoe.runtime.loading import model_config_of

    where = f"compress.teacher={cfg.compress.teacher}"
    try:
        teacher = model_config_of(cfg.compress.teacher)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if teacher.vocab_size != cfg.model.vocab_size:
        raise ValueError(f"{where} has a vocabulary of {teacher.vocab_size}, the model {cfg.model.vocab_size}; "
                         "distil from a model trained with the same tokenizer")
    p = cfg.parallel
    try:
        teacher.validate(p.tp, p.ep, p.sp)
    except ValueError as err:
        raise ValueError(f"{where} cannot run in this layout (tp={p.tp}, ep={p.ep}, sp={p.sp}): {err}") from None


def dataset_digest(ds: TokenDataset) -> dict:
    """The checksums that identify a prepared dataset (stored in checkpoints, compared on resume)."""
    return {split: ds.meta[split]["sha256"] for split in ("train", "val")}


def _finished_message(cfg: RunConfig, step: int) -> str:
    return (f"{cfg.out_dir} finished at step {step} (train.max_steps={cfg.train.max_steps}): nothing to do; "
            "raise train.max_steps and pass --accept-changes to train further")


def seq_chunks(micro_batches: list, topo: Topology) -> list:
    """This SP rank's chunk of every sequence (the identity without sequence parallelism)."""
    sp = topo.axis("sp")
    return [(i.chunk(sp.size, 1)[sp.rank], t.chunk(sp.size, 1)[sp.rank]) for i, t in micro_batches]


def _val_loss(model, sampler: BatchSampler, topo: Topology, micro: int, batches: int) -> float:
    model.eval()
    total = torch.zeros(1)
    with torch.no_grad(), model.without_teacher():  # distillation trains on its mix; validation is the model's loss
        for i in range(batches):
            sampler.step = i
            for ids, targets in seq_chunks(sampler.micro_batches(topo.size("dp"), topo.coord("dp"), micro), topo):
                total += model(ids, targets)[0].float()
    model.train()
    per_rank = batches * (sampler.global_batch // topo.size("dp") // micro)
    with comm.LEDGER.phase("eval"):  # SP ranks' losses add up to a sequence's: sum over dsp, mean over dp
        return comm.all_reduce(total, topo.axis("dsp")).item() / (per_rank * topo.size("dp"))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) ended the run after a step; the message says what was kept."""


class _StopSignals:
    """SIGINT / SIGTERM set a flag that the loop reads between steps (so a step is never cut in
    half); a second Ctrl-C in a single process stops at once. Restores the handlers on exit."""

    def __init__(self):
        import signal
        import threading

        self.requested, self.count, self.saved = False, 0, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        import signal

        self.requested = True
        self.count += signum == signal.SIGINT
        if self.count > 1 and not launch.launched():  # a launcher forwards Ctrl-C too: count only ours
            raise KeyboardInterrupt

    def agreed(self, world: int) -> bool:
        """True when any rank was asked to stop (one tiny all-reduce, so all ranks stop together)."""
        if world == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        import signal

        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False, accept_changes: bool = False) -> dict:
    """Run training on the launched ranks (or one process). Returns the final metrics on rank 0.
    Unless the launching process has already claimed the run directory (``TEDMOE_RUN_CLAIMED``),
    rank 0 checks everything and claims it here (a torchrun or SLURM launch)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if cfg.init_from is not None:
        from tedmoe.interop import hf

        hf.apply_init_from(cfg)
    cfg.validate(world)
    out = Path(cfg.out_dir)
    lock = None
    if rank == 0:
        if not os.environ.get("TEDMOE_RUN_CLAIMED"):
            rundir.refuse_if_in_use(out)
        status = check_before_launch(cfg, world, resume, accept_changes)  # idempotent; prepares the corpus
        if not os.environ.get("TEDMOE_RUN_CLAIMED") and not status["finished"]:
            lock, notes = rundir.claim(out, resume, overwrite)
            for note in notes:
                print(f"tedmoe: {note}", file=sys.stderr, flush=True)
    try:
        return _train(cfg, resume, world, rank, out)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: RunConfig, resume: bool, world: int, rank: int, out: Path) -> dict:
    if world > 1:
        launch.init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
        dist.barrier()  # rank 0 has the data ready and the run directory claimed
    found = ckpt.latest_checkpoint(out / "checkpoints") if resume else None
    if found is not None and ckpt.read_meta(found)["step"] >= cfg.train.max_steps:
        if rank == 0:
            print(f"tedmoe: {_finished_message(cfg, ckpt.read_meta(found)['step'])}", flush=True)
        launch.shutdown_distributed()
        return {}
    topo = Topology(world, tp=cfg.parallel.tp, ep=cfg.parallel.ep, sp=cfg.parallel.sp,
                    timeout_s=cfg.parallel.timeout_s if world > 1 else None)
    path = data_dir(cfg)
    train_ds, val_ds = TokenDataset(path, "train", verify=False), TokenDataset(path, "val", verify=False)
    # ZeRO-3 never holds the whole model: it is built on the meta device and each unit gets its
    # values (initialised, or read from --init-from) just before it is sharded
    stage3 = cfg.train.zero_stage == 3
    model = GPTMoE(cfg.model, topo, device="meta" if stage3 else None)

    def materialize(params=None) -> None:
        only = None if params is None else {id(p) for p in params}
        model.init_weights(cfg.seed, only)
        if cfg.init_from is not None and found is None:
            from tedmoe.interop import hf

            hf.load_into(model, cfg.init_from, only)  # each rank reads its own slices

    if not stage3:
        materialize()
    transforms = []
    if cfg.compress.method != "none":  # quantisation-aware training / N:M sparsity
        from tedmoe.compress import qat

        c = cfg.compress
        transforms = qat.apply(model, c.method, c.n, c.m, c.refresh_every)
    if cfg.compress.teacher is not None:  # distillation: the teacher in the same layout, each rank its slices
        from tedmoe.runtime.loading import load_model

        teacher, _ = load_model(cfg.compress.teacher, topo)
        model.set_teacher(teacher, cfg.compress.distill_weight, cfg.compress.temperature)
    apply_checkpointing(model, cfg.train.checkpointing)
    engine = Engine(model, topo, cfg.train, materialize if stage3 else None)
    sampler = train_sampler(cfg, train_ds)
    val_sampler = BatchSampler(val_ds, cfg.seq_len, cfg.global_batch_size, cfg.seed + 1)
    start = 0
    if found is not None:
        meta = ckpt.load_checkpoint(found, model, engine.optimizer, topo, dataclasses.asdict(cfg.model))
        sampler.load_state_dict(meta["sampler"])
        start = meta["step"]
    if rank == 0 and resume:
        print(f"tedmoe: resuming from step {start} of {out} ({found.name})" if found is not None
              else f"tedmoe: no checkpoint in {out}: starting at step 0", file=sys.stderr, flush=True)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
        copy_tokenizer(path, out)
    writer = MetricsWriter(out / "metrics.jsonl", rank == 0, start if found else None,
                           out / "tensorboard" if cfg.tensorboard else None)
    dp, dp_rank, micro = topo.size("dp"), topo.coord("dp"), cfg.micro_batch_size
    tokens_per_step = cfg.global_batch_size * cfg.seq_len
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.max_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    record: dict = {}
    last = min(cfg.train.max_steps, cfg.stop_after or cfg.train.max_steps)
    stop = _StopSignals()
    saved_step = start
    try:
        for step in range(start + 1, last + 1):
            launch.beat(step)
            for t in transforms:
                t.step = step - 1
            faults.maybe_fail("step", rank, step)
            engine.poison_next_step = faults.active("nan", rank, step)
            t0 = time.perf_counter()
            with comm.LEDGER.capture():
                try:
                    metrics = engine.train_step(seq_chunks(sampler.micro_batches(dp, dp_rank, micro), topo))
                except FloatingPointError as err:
                    good = ckpt.latest_checkpoint(out / "checkpoints")
                    raise FloatingPointError(f"{err}; stopping. The last good checkpoint is "
                                             f"{good if good else 'none (none was written yet)'}") from None
                totals = {k: comm.LEDGER.total(kind=k) for k in comm.KINDS}
                by_kind = {k: t.bytes for k, t in totals.items() if t.calls}
            seconds = time.perf_counter() - t0
            tokens = tokens_per_step if not cfg.data.curriculum.active else cfg.global_batch_size * sampler.length(step - 1)
            record = {"step": step, **metrics, "tokens_per_s": tokens / seconds, "step_seconds": seconds,
                      "comm_bytes": by_kind}
            if cfg.data.curriculum.active:  # what this step trained on
                record["tokens"] = tokens
                record["curriculum"] = {"seq_len": sampler.length(step - 1), "rarity_percent": sampler.share(step - 1)}
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.train.max_steps:
                record["val_loss"] = _val_loss(model, val_sampler, topo, micro, cfg.eval_batches)
            writer.write(record)
            if record.get("skipped") and rank == 0:
                why = "fp16 overflow" if cfg.train.precision == "fp16" else "non-finite gradients"
                print(f"tedmoe: step {step} skipped ({why}); loss scale {record['loss_scale']:g}", file=sys.stderr,
                      flush=True)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
            interrupted = stop.agreed(world)
            if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == last or interrupted:
                _save(cfg, out, step, model, engine, topo, sampler, train_ds, world)
                saved_step = step
            if interrupted:
                raise Interrupted(f"interrupted after step {step}; kept the checkpoint "
                                  f"{out / 'checkpoints' / f'step_{step:07d}'} (continue with --resume)")
    except KeyboardInterrupt as err:
        if bar is not None:
            bar.close()
        if isinstance(err, Interrupted):
            raise
        kept = ckpt.latest_checkpoint(out / "checkpoints")
        raise Interrupted(f"interrupted during step {saved_step + 1}; the last checkpoint is "
                          f"{kept if kept else 'none'}") from None
    finally:
        stop.restore()
        writer.close()
    if bar is not None:
        bar.close()
    if cfg.export and last == cfg.train.max_steps:
        with engine.optimizer.whole_parameters():  # ZeRO-3: gathered for the export
            export(model, topo, cfg, out)
    engine.optimizer.close()
    if rank == 0 and record:
        layout = f"TP {topo.size('tp')} x EP {topo.size('ep')} x DP {dp}" + (
            f" x SP {topo.size('sp')}" if topo.size("sp") > 1 else "")
        print(summary(read_metrics(out), out, world, layout), flush=True)
    if world > 1:
        dist.barrier()
    launch.shutdown_distributed()
    return record


def _save(cfg: RunConfig, out: Path, step: int, model, engine: Engine, topo: Topology, sampler: BatchSampler,
          train_ds: TokenDataset, world: int) -> None:
    meta = {"config": dataclasses.asdict(cfg), "sampler": sampler.state_dict(), "world_size": world,
            "data": dataset_digest(train_ds) if "val" in train_ds.meta else None,
            "layout": {"tp": topo.size("tp"), "ep": topo.size("ep"), "dp": topo.size("dp"), **(
                {"sp": topo.size("sp")} if topo.size("sp") > 1 else {})}}
    saved = ckpt.save_checkpoint(out / "checkpoints", step, model, engine.optimizer, topo, meta,
                                 cfg.keep_checkpoints)
    if topo.rank == 0:
        copy_tokenizer(out, saved)


def export(model, topo: Topology, cfg: RunConfig, out: Path) -> Path:
    """Gather the full model and write ``model.safetensors`` + ``model_config.json`` (rank 0)."""
    from safetensors.torch import save_file

    state = full_state_dict(model, topo)
    if cfg.compress.method != "none":  # the weights the forward uses (binary, ternary, masked)
        from tedmoe.compress import qat

        state = qat.effective_state(model, state, topo)
    path = out / "model.safetensors"
    if topo.rank == 0:
        tmp = out / "model.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
        (out / "model_config.json").write_text(json.dumps(dataclasses.asdict(cfg.model), indent=2))
    return path
