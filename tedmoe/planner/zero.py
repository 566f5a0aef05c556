"""The ZeRO stages and offload in the planner: per-rank units, their collectives and model-state memory.

Stages 1 and 2 shard two groups per rank: the non-expert parameters over ``dp`` (``dsp``,
named ``dp`` without sequence parallelism) and the experts over ``edp``. Stage 3 shards
*units* (``runtime/zero_stages.py``'s ``Stage3``): the root (embedding, final norm, head)
and, per block, its non-expert parameters and its experts, each split over its axis. A unit
of ``c`` elements on an axis of ``n`` ranks keeps ``ceil(c / n)`` of them per rank; on an
axis of size 1 it is always whole and never gathered.
"""

from __future__ import annotations

import math

from tedmoe.config import ModelConfig, TrainConfig
from tedmoe.parallel.ledger import add as _add
from tedmoe.parallel.topology import ParallelDims

AXES = ("dp", "edp")  # non-expert, expert
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def units(model: ModelConfig, tp: int = 1, ep: int = 1) -> list[dict[str, int]]:
    """ZeRO-3's units on one rank, in order: the root, then one per block; each
    ``{"dp": non-expert elements, "edp": expert elements}`` after the tp and ep splits (a
    block's non-expert unit holds its attention, norms, router and any dense MLP)."""
    H, V, F, D = model.hidden_size, model.vocab_size, model.ffn_hidden_size, model.head_size
    attn = H * model.num_heads * D + 2 * H * model.kv_heads * D + model.num_heads * D * H  # q, k, v, o
    per_expert = H * model.moe.ffn_hidden_size * (3 if model.moe.activation == "swiglu" else 2)
    out = [{"dp": 2 * V * H // tp + H, "edp": 0}]  # embedding, head (tp-split), final norm
    for i in range(model.num_layers):
        non_expert = attn // tp + 2 * H + (2 * D if model.qk_norm else 0)  # + two norms (and qk norms)
        experts = 0
        if model.is_moe_layer(i):
            num_experts = model.moe_for(i).num_experts
            non_expert += num_experts * H  # the router, replicated over tp
            experts = num_experts * per_expert // (tp * ep)
            if model.moe.residual:
                non_expert += per_expert // tp + 2 * H + 2
        else:
            non_expert += (2 * H * F + F) // tp + H  # fc1 (with bias) split, fc2's bias replicated
        out.append({"dp": non_expert, "edp": experts})
    return out


def largest_parameter(model: ModelConfig, tp: int = 1, ep: int = 1) -> int:
    """Elements of the largest parameter tensor on one rank: the embedding or head (vocab split
    over tp), an attention or dense-MLP matrix, or one MoE layer's local experts' ``w1`` (all its
    experts are one tensor, split over ep and tp)."""
    H, V, F, D = model.hidden_size, model.vocab_size, model.ffn_hidden_size, model.head_size
    sizes = [V * H // tp, H * model.num_heads * D // tp]
    if any(not model.is_moe_layer(i) for i in range(model.num_layers)):
        sizes.append(H * F // tp)
    for i in range(model.num_layers):
        if model.is_moe_layer(i):
            sizes.append(model.moe_for(i).num_experts // ep * H * model.moe.ffn_hidden_size // tp)
    return max(sizes)


def shard(numel: int, n: int) -> int:
    """Elements one rank keeps of ``numel`` split over ``n`` ranks (padded to ``n`` equal pieces)."""
    return math.ceil(numel / n)


def stage3_comm(out: dict, model: ModelConfig, dims: ParallelDims, item: int, micro_batches: int) -> None:
    """Add ZeRO-3's collectives of one step to the ledger dict ``out``: per micro-batch, an
    all-gather of every unit in the forward, of every block's units again in the backward (the
    root stays gathered until its gradient is reduced), and a reduce-scatter of every padded
    unit in the backward. The step updates the shards only: no collective."""
    for k, unit in enumerate(units(model, dims.tp, dims.ep)):
        for axis in AXES:
            n, numel = dims.size(axis), unit[axis]
            if not numel or n == 1:
                continue
            s = shard(numel, n)
            _add(out, "fwd", "all_gather", axis, n, s, item, calls=micro_batches)
            _add(out, "bwd", "all_gather", axis, n, s, item, calls=micro_batches if k else 0)
            _add(out, "bwd", "reduce_scatter", axis, n, n * s, item, calls=micro_batches)


def stage12_comm(out: dict, counts: dict[str, int], dims: ParallelDims, train: TrainConfig, item: int,
                 micro_batches: int) -> None:
    """Add ZeRO-1's (one reduce-scatter and all-gather per group in the step) or ZeRO-2's
    (bucket reduce-scatters every micro-batch in the backward, bucket all-gathers in the step)
    collectives to ``out``."""
    for key, axis in (("non_expert", "dp"), ("expert", "edp")):
        n = dims.size(axis)
        if not counts[key] or n == 1:
            continue
        if train.zero_stage == 2:
            bucket = max(n, shard(min(train.reduce_bucket_size, counts[key]), n) * n)
            buckets = math.ceil(counts[key] / bucket)
            _add(out, "bwd", "reduce_scatter", axis, n, bucket, item, calls=buckets * micro_batches)
            _add(out, "step", "all_gather", axis, n, bucket // n, item, calls=buckets)
        else:
            s = shard(counts[key], n)
            _add(out, "step", "reduce_scatter", axis, n, s * n, item)
            _add(out, "step", "all_gather", axis, n, s, item)


def model_states(model: ModelConfig, dims: ParallelDims, train: TrainConfig, counts: dict[str, int]) -> dict:
    """Bytes per rank of parameters, gradients and optimizer states, where they live.

    Device keys ``parameters``, ``gradients``, ``optimizer`` and ``optimizer_spike`` (the step's
    tile, about 12 bytes an element); ``host`` and ``disk`` hold what offload moved away.
    ``offload="cpu"`` moves the optimizer states to host memory, ``"disk"`` to files, leaving on
    the device only the step's tile buffers (3 fp32 states x 3 tiles: the current one, the
    prefetched next one, the one being written back). Without offload fp32 training keeps no
    separate master (the parameters, or their shards, are it); offloaded, the fp32 master is one
    of the states. At stage 3 offload keeps no parameter shard on the device: the gather reads
    the master from host memory or the file (a unit on an axis of size 1 is never sharded and
    stays whole)."""
    item = DTYPE_BYTES[train.precision]
    aliased = train.precision == "fp32" and train.offload == "none"
    state_bytes = 8 if aliased else 12  # Adam m, v and the fp32 master unless the parameters are it
    if train.zero_stage == 3:
        sizes = [{a: (u[a], dims.size(a)) for a in AXES} for u in units(model, dims.tp, dims.ep)]
        kept = [shard(c, n) for u in sizes for c, n in u.values()]  # per rank, sharded or not
        owned = sum(kept)
        whole = [sum(n * shard(c, n) for c, n in u.values() if n > 1) for u in sizes]  # gathered while used
        blocks = whole[1:]
        in_use = whole[0] + max((sum(blocks[i:i + 2]) for i in range(max(len(blocks) - 1, 1))), default=0)
        # gradients staged in the model dtype until a unit's last one arrives: the root's for the whole
        # backward (the embedding's comes last), and the running block's
        staged = [sum(n * shard(c, n) for c, n in u.values()) for u in sizes]
        sharded = sum(shard(c, n) for u in sizes for c, n in u.values() if n > 1)
        params = owned * item + in_use * item
        grads = 4 * owned + (staged[0] + max(staged[1:], default=0)) * item
    else:
        ne = shard(counts["non_expert"], dims.dp)
        ex = shard(counts["expert"], dims.edp) if counts["expert"] else 0
        kept, owned, sharded = [ne, ex], ne + ex, 0
        params = (ne * dims.dp + ex * dims.edp) * item
        # the whole buffer, and during the step the reduce-scattered shard of each group sharded over n > 1
        grads = params + ((ne if dims.dp > 1 else 0) + (ex if dims.edp > 1 else 0)) * item
        if train.zero_stage == 2:  # the fp32 shard and the staged buckets: those one gradient spans, and one more
            total = ne * dims.dp + ex * dims.edp
            bucket = min(train.reduce_bucket_size, total)
            spans = math.ceil(largest_parameter(model, dims.tp, dims.ep) / bucket) + 1
            grads = 4 * owned + min(spans * bucket, total) * item
    biggest = max(kept, default=0)
    tile = min(train.tile_size or biggest, biggest)
    out = {"parameters": params, "gradients": grads, "optimizer": state_bytes * owned, "optimizer_spike": 12 * tile,
           "host": 0.0, "disk": 0.0}
    if train.offload == "cpu":
        out["host"], out["optimizer"] = out["optimizer"], 0.0
    elif train.offload == "disk":
        out["disk"], out["optimizer"] = out["optimizer"], 3 * 4 * tile * 3
    if train.offload != "none" and train.zero_stage == 3:
        # no shard on the device; the prefetched block's shard is copied from the master for its gather
        prefetched = max((sum(shard(c, n) for c, n in u.values() if n > 1) for u in sizes[1:]), default=0)
        out["parameters"] += (prefetched - sharded) * item
    return out


def state_coefficients(stage: int, offload: str = "none") -> dict[str, tuple[float, float]]:
    """Bytes per parameter of the model states for 16-bit training, as ``{place: (a, c)}``: ``a``
    per element held whole on each rank of a tp (x ep) group, ``c`` per element sharded over all
    ranks; ``M = a (N_ne / t + N_e / (t ep)) + c (N_ne + N_e) / G`` in each place. Offload moves
    the 12 bytes of fp32 master and Adam moments; at stage 3 the 2-byte parameter shard is dropped
    as well (the offloaded master is its only copy)."""
    device = {1: (4.0, 12.0), 2: (2.0, 16.0), 3: (0.0, 18.0)}[stage]  # 3: 2-byte shard, fp32 gradient, 12
    out = {"device": device, "host": (0.0, 0.0), "disk": (0.0, 0.0)}
    if offload != "none":
        dropped = 2.0 if stage == 3 else 0.0
        out["device"] = (device[0], device[1] - 12.0 - dropped)
        out["host" if offload == "cpu" else "disk"] = (0.0, 12.0)
    return out
