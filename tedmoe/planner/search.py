"""Enumerate the valid layouts of a model on a cluster, predict each, rank by step time."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tedmoe.config import ModelConfig, MoEConfig, TrainConfig, check_batch
from tedmoe.parallel.topology import ParallelDims
from tedmoe.planner.hardware import Hardware, fits
from tedmoe.planner.predict import Plan, memory, step_time

GiB = 2**30


def paper_model(name: str, num_experts: int = 16, top_k: int = 1) -> ModelConfig:
    """The paper's base models (GPT-3 shapes) with an MoE MLP every other block. The 13B model's
    hidden size is 5120 (the GPT-3 table's 5140 is not divisible by its 40 heads)."""
    shapes = {"1.3b": (24, 2048, 16), "2.7b": (32, 2560, 32), "6.7b": (32, 4096, 32), "13b": (40, 5120, 40)}
    if name not in shapes:
        raise ValueError(f"unknown model {name!r}; use one of {', '.join(shapes)} or a TOML file")
    layers, hidden, heads = shapes[name]
    moe = MoEConfig(ffn_hidden_size=4 * hidden, num_experts=num_experts, top_k=top_k,
                    capacity_factor=1.0)
    return ModelConfig(vocab_size=51200, hidden_size=hidden, num_layers=layers, num_heads=heads,
                       ffn_hidden_size=4 * hidden, max_seq_len=2048, moe=moe)


@dataclass
class Candidate:
    tp: int
    ep: int
    dp: int
    edp: int
    micro_batches: int
    memory: dict
    time: dict
    fits: bool


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def paper_train(checkpointing: str = "cac") -> TrainConfig:
    """The paper's training settings: fp16 with ZeRO-1, a 16M-element optimizer tile."""
    return TrainConfig(precision="fp16", checkpointing=checkpointing, tile_size=1 << 24)


def layouts(model: ModelConfig, gpus: int, hw: Hardware, global_batch: int, micro_batch: int = 1, seq_len: int = 2048,
            train: TrainConfig | None = None, memory_cap: float | None = None, dtd: bool = True,
            max_tp: int | None = None) -> list[Candidate]:
    """Every valid (tp, ep) for ``gpus`` devices (tp up to ``max_tp``, default one node), predicted;
    fitting layouts first, fastest first. ``train`` defaults to ``paper_train()``; its ZeRO stage
    and offload decide the memory. A layout fits when its device memory is within ``memory_cap``
    (default the GPU's) and what it offloads within the GPU's share of the node's host memory or
    disk (``hardware.fits``)."""
    train = train or paper_train()
    out = []
    for tp in _divisors(gpus):
        if tp > (max_tp or hw.gpus_per_node):
            continue
        for ep in _divisors(gpus // tp):
            try:
                dims = ParallelDims(gpus, tp, ep)
                model.validate(tp, ep)
                micro_batches = check_batch(global_batch, micro_batch, dims.dp)
            except ValueError:
                continue
            plan = Plan(dataclasses.replace(model, moe=dataclasses.replace(model.moe, dtd=dtd)), gpus, tp, ep,
                        micro_batch, seq_len, micro_batches, train)
            mem = memory(plan)
            out.append(Candidate(tp, ep, dims.dp, dims.edp, plan.micro_batches, mem, step_time(plan, hw),
                                 fits(mem, hw, memory_cap)))
    out.sort(key=lambda c: (not c.fits, c.time["total"]))
    return out


def smallest_cluster(model: ModelConfig, hw: Hardware, global_batch: int, **kw) -> int | None:
    """The fewest whole nodes' GPUs on which some layout fits (None beyond 65536 GPUs)."""
    gpus = hw.gpus_per_node
    while gpus <= 65536:
        batch = -(-global_batch // gpus) * gpus  # a multiple of every dp the layouts can have
        if any(c.fits for c in layouts(model, gpus, hw, batch, **kw)):
            return gpus
        gpus *= 2
    return None


def largest_layers(model: ModelConfig, gpus: int, hw: Hardware, global_batch: int, **kw) -> int:
    """The most transformer blocks (same width, an even number) that fit on ``gpus`` devices with
    the ``layouts`` settings in ``kw`` (the ZeRO stage and offload of ``train`` included); 0 if
    none, at most 65536. Memory grows with the depth, so: doubling, then bisection."""

    def ok(layers: int) -> bool:
        deeper = dataclasses.replace(model, num_layers=layers)
        return any(c.fits for c in layouts(deeper, gpus, hw, global_batch, **kw))

    if not ok(2):
        return 0
    lo, hi = 2, 4  # ok(lo), and hi is the next to try
    while hi <= 65536 and ok(hi):
        lo, hi = hi, 2 * hi
    hi = min(hi, 65538)  # not ok (or past the limit)
    while hi - lo > 2:
        mid = (lo + hi) // 4 * 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def table(cands: list[Candidate], limit: int = 12) -> str:
    """The first ``limit`` candidates, one line each; memory per GPU on the device, and in host
    memory and on disk when something is offloaded there."""
    places = [("total", "dev GiB")] + [(k, f"{k} GiB") for k in ("host", "disk")
                                       if any(c.memory.get(k) for c in cands)]
    mem_head = " ".join(f"{label:>8}" for _, label in places)
    head = f"{'tp':>3} {'ep':>3} {'dp':>4} {'edp':>4} {mem_head} {'fits':>5} {'step s':>8} {'compute':>8} {'comm':>8}"
    rows = [head, "-" * len(head)]
    for c in cands[:limit]:
        comm_s = c.time["total"] - c.time["compute"]
        mem = " ".join(f"{c.memory.get(k, 0.0) / GiB:>8.1f}" for k, _ in places)
        rows.append(f"{c.tp:>3} {c.ep:>3} {c.dp:>4} {c.edp:>4} {mem} "
                    f"{'yes' if c.fits else 'no':>5} {c.time['total']:>8.3f} {c.time['compute']:>8.3f} {comm_s:>8.3f}")
    return "\n".join(rows)
