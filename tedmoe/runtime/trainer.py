"""``tedmoe train``: data, model, engine, the loop, evaluation, checkpoints, export."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tedmoe.config import RunConfig
from tedmoe.data.dataset import BatchSampler, TokenDataset, embedded_corpus_files, prepare
from tedmoe.model.transformer import GPTMoE
from tedmoe.parallel import comm, launch
from tedmoe.parallel.sharding import full_state_dict
from tedmoe.parallel.topology import Topology
from tedmoe.runtime import checkpoint as ckpt
from tedmoe.runtime import faults
from tedmoe.runtime.engine import Engine
from tedmoe.runtime.metrics import MetricsWriter, read_metrics, summary


def cache_dir() -> Path:
    return Path(os.environ.get("TEDMOE_CACHE", Path.home() / ".cache" / "tedmoe"))


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


def check_before_launch(cfg: RunConfig, world: int, resume: bool) -> None:
    """Everything that can be checked without process groups, so a mistake fails once, early."""
    cfg.validate(world)
    path = ensure_data(cfg)
    ds = TokenDataset(path, "train", verify=True)
    TokenDataset(path, "val", verify=True)
    if ds.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the data's tokenizer has {ds.vocab_size} tokens but model.vocab_size="
                         f"{cfg.model.vocab_size}; set model.vocab_size >= {ds.vocab_size} (a multiple of tp)")
    BatchSampler(ds, cfg.seq_len, cfg.global_batch_size, cfg.seed)
    if resume:
        found = ckpt.latest_checkpoint(Path(cfg.out_dir) / "checkpoints")
        if found is not None:
            meta = ckpt.read_meta(found)
            if meta.get("config", {}).get("model") != dataclasses.asdict(cfg.model):
                raise ckpt.CheckpointError(f"checkpoint {found} was made for another model config; "
                                           "use another out_dir or the same model settings")
            ckpt.verify(found)


def seq_chunks(micro_batches: list, topo: Topology) -> list:
    """This SP rank's chunk of every sequence (the identity without sequence parallelism)."""
    sp = topo.axis("sp")
    return [(i.chunk(sp.size, 1)[sp.rank], t.chunk(sp.size, 1)[sp.rank]) for i, t in micro_batches]


def _val_loss(model, sampler: BatchSampler, topo: Topology, micro: int, batches: int) -> float:
    model.eval()
    total = torch.zeros(1)
    with torch.no_grad():
        for i in range(batches):
            sampler.step = i
            for ids, targets in seq_chunks(sampler.micro_batches(topo.size("dp"), topo.coord("dp"), micro), topo):
                total += model(ids, targets)[0].float()
    model.train()
    per_rank = batches * (sampler.global_batch // topo.size("dp") // micro)
    with comm.LEDGER.phase("eval"):  # SP ranks' losses add up to a sequence's: sum over dsp, mean over dp
        return comm.all_reduce(total, topo.axis("dsp")).item() / (per_rank * topo.size("dp"))


def train(cfg: RunConfig, resume: bool = False) -> dict:
    """Run training on the launched ranks (or one process). Returns the final metrics on rank 0."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    cfg.validate(world)
    out = Path(cfg.out_dir)
    if rank == 0:
        check_before_launch(cfg, world, resume)  # idempotent; prepares the corpus if needed
    if world > 1:
        launch.init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s)
        dist.barrier()  # rank 0 has the data ready
    topo = Topology(world, tp=cfg.parallel.tp, ep=cfg.parallel.ep, sp=cfg.parallel.sp,
                    timeout_s=cfg.parallel.timeout_s if world > 1 else None)
    path = data_dir(cfg)
    train_ds, val_ds = TokenDataset(path, "train", verify=False), TokenDataset(path, "val", verify=False)
    model = GPTMoE(cfg.model, topo, checkpointing=cfg.train.checkpointing)
    model.init_weights(cfg.seed)
    engine = Engine(model, topo, cfg.train)
    sampler = BatchSampler(train_ds, cfg.seq_len, cfg.global_batch_size, cfg.seed)
    val_sampler = BatchSampler(val_ds, cfg.seq_len, cfg.global_batch_size, cfg.seed + 1)
    start = 0
    found = ckpt.latest_checkpoint(out / "checkpoints") if resume else None
    if found is not None:
        meta = ckpt.load_checkpoint(found, model, engine.optimizer, topo, dataclasses.asdict(cfg.model))
        sampler.load_state_dict(meta["sampler"])
        start = meta["step"]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        shutil.copy(path / "tokenizer.json", out / "tokenizer.json")
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
    for step in range(start + 1, last + 1):
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
        record = {"step": step, **metrics, "tokens_per_s": tokens_per_step / seconds, "step_seconds": seconds,
                  "comm_bytes": by_kind}
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
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == last:
            meta = {"config": dataclasses.asdict(cfg), "sampler": sampler.state_dict(), "world_size": world,
                    "layout": {"tp": topo.size("tp"), "ep": topo.size("ep"), "dp": dp, **(
                        {"sp": topo.size("sp")} if topo.size("sp") > 1 else {})}}
            saved = ckpt.save_checkpoint(out / "checkpoints", step, model, engine.optimizer, topo, meta,
                                         cfg.keep_checkpoints)
            if rank == 0:
                shutil.copy(out / "tokenizer.json", saved / "tokenizer.json")
    if bar is not None:
        bar.close()
    writer.close()
    if cfg.export and last == cfg.train.max_steps:
        export(model, topo, cfg, out)
    if rank == 0 and record:
        layout = f"TP {topo.size('tp')} x EP {topo.size('ep')} x DP {dp}" + (
            f" x SP {topo.size('sp')}" if topo.size("sp") > 1 else "")
        print(summary(read_metrics(out), out, world, layout), flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return record


def export(model, topo: Topology, cfg: RunConfig, out: Path) -> Path:
    """Gather the full model and write ``model.safetensors`` + ``model_config.json`` (rank 0)."""
    from safetensors.torch import save_file

    state = full_state_dict(model, topo)
    path = out / "model.safetensors"
    if topo.rank == 0:
        tmp = out / "model.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
        (out / "model_config.json").write_text(json.dumps(dataclasses.asdict(cfg.model), indent=2))
    return path
