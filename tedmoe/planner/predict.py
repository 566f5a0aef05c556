"""Predicted communication, memory and step time of one training step, per device.

Communication is derived from the same steps the code's docstrings state (the TP layers, the
MoE dispatcher's ``capacity_comm``, the engine's metrics all-reduce and the ZeRO stages in
``zero.py``), so at small scale it equals the ``CommLedger`` measurement exactly
(tests/distributed/test_planner.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tedmoe.config import ModelConfig, TrainConfig
from tedmoe.moe.dispatch_comm import capacity_comm
from tedmoe.parallel.ledger import add as _add
from tedmoe.parallel.ledger import merge as _merge
from tedmoe.parallel.topology import ParallelDims, axis_groups
from tedmoe.planner.hardware import Hardware
from tedmoe.planner.zero import DTYPE_BYTES, model_states, stage3_comm, stage12_comm, state_coefficients


@dataclass
class Plan:
    """A model, a layout and the training settings the prediction depends on."""

    model: ModelConfig
    world_size: int
    tp: int = 1
    ep: int = 1
    micro_batch: int = 1
    """Sequences per micro-batch per rank."""
    seq_len: int = 2048
    micro_batches: int = 1
    """Micro-batches per step per rank (gradient accumulation)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Precision, activation checkpointing and the optimizer's tile size, as training sets them."""

    @property
    def dims(self) -> ParallelDims:
        return ParallelDims(self.world_size, self.tp, self.ep)

    def validate(self) -> None:
        self.model.validate(self.dims.tp, self.dims.ep)
        self.train.validate()


def param_counts(model: ModelConfig, tp: int = 1, ep: int = 1) -> dict[str, int]:
    """Per-rank parameter counts: ``non_expert`` and ``expert`` local elements, and the full
    ``total`` / ``expert_total`` (the layers of ``tedmoe.model``, counted without building them)."""
    H, V, F, L = model.hidden_size, model.vocab_size, model.ffn_hidden_size, model.num_layers
    D = model.head_size
    attn = H * model.num_heads * D + 2 * H * model.kv_heads * D + model.num_heads * D * H  # q, k, v, o
    moe = model.moe
    per_expert = H * moe.ffn_hidden_size * (3 if moe.activation == "swiglu" else 2)
    counts_E = [model.moe_for(i).num_experts for i in model.moe_layers]  # PR-MoE: per layer
    n_moe = len(counts_E)
    experts = sum(counts_E) * per_expert
    replicated = 2 * H * L + H + sum(counts_E) * H + (L - n_moe) * H  # norms, routers, fc2 bias
    replicated += 2 * D * L if model.qk_norm else 0
    sharded = 2 * V * H + L * attn + (L - n_moe) * (2 * H * F + F)
    if moe.residual:  # Residual-MoE: a dense expert-like branch (tp-split) and the coefficient per MoE layer
        sharded += n_moe * per_expert
        replicated += n_moe * (2 * H + 2)
    return {"non_expert": sharded // tp + replicated, "expert": experts // (tp * ep),
            "total": sharded + replicated + experts, "expert_total": experts}


def step_comm(plan: Plan, dtd: bool | None = None) -> dict:
    """The ledger of one training step on one rank (``CommLedger.as_dict()`` form). Capacity
    mode only: a dropless layer's all-to-all sizes depend on where the router sends tokens, so
    it is refused rather than guessed."""
    m, d = plan.model, plan.dims
    if m.expert_counts or m.moe.residual:
        raise ValueError("the planner predicts uniform MoE layers only; plan without model.expert_counts "
                         "(PR-MoE) and model.moe.residual")
    if m.moe.dropless and any(m.is_moe_layer(i) for i in range(m.num_layers)):
        raise ValueError("the planner predicts capacity-mode MoE layers only (a dropless layer's all-to-all sizes "
                         "depend on the routing); plan with model.moe.dropless=false and capacity_factor set to the "
                         "load you expect (1.0 for balanced routing)")
    item = DTYPE_BYTES[plan.train.precision]
    N, H, t = plan.micro_batch * plan.seq_len, m.hidden_size, d.tp
    dtd = m.moe.dtd if dtd is None else dtd
    n_moe = sum(m.is_moe_layer(i) for i in range(m.num_layers))
    n_dense = m.num_layers - n_moe
    micro: dict = {}
    _add(micro, "fwd", "all_reduce", "tp", t, N * H, item, calls=1 + m.num_layers + n_dense)  # embed, attn o, fc2
    _add(micro, "fwd", "all_reduce", "tp", t, N, 4)  # cross-entropy: max
    _add(micro, "fwd", "all_reduce", "tp", t, 2 * N, 4)  # cross-entropy: target logit and sum of exp
    _add(micro, "bwd", "all_reduce", "tp", t, N * H, item, calls=1 + m.num_layers + n_dense)  # head, qkv, fc1 copies
    if n_moe:
        c = m.moe
        layer = capacity_comm(N, H, c.num_experts, c.top_k, c.capacity(N), t, d.ep, dtd, item)
        _merge(micro, layer, n_moe)
    if plan.train.checkpointing == "plain":
        recompute: dict = {}
        _add(recompute, "recompute", "all_reduce", "tp", t, N * H, item, calls=m.num_layers + n_dense)
        if n_moe:
            _merge(recompute, {"recompute": layer["fwd"]} if "fwd" in layer else {}, n_moe)
        _merge(micro, recompute)
    out: dict = {}
    _merge(out, micro, plan.micro_batches)
    _add(out, "metrics", "all_reduce", "dp", d.dp, 4 if n_moe else 2, 4)
    if plan.train.zero_stage == 3:
        stage3_comm(out, m, d, item, plan.micro_batches)
    else:
        stage12_comm(out, param_counts(m, t, d.ep), d, plan.train, item, plan.micro_batches)
    _add(out, "step", "all_reduce", "world", d.world_size, 1, 4)
    return out


def memory(plan: Plan) -> dict[str, float]:
    """Bytes per device: parameters, gradients and optimizer states (``zero.model_states``:
    the ZeRO stage and offload), activations, the CAC stash, and the optimizer-step spike
    (``tile_size`` elements at about 12 bytes each, the constant ``benchmarks/optimizer_memory.py``
    measures). ``total`` is the device memory; ``host`` (``train.offload="cpu"``) and ``disk``
    (``"disk"``) are the bytes offload moved off the device, per rank. On a CPU-only machine the
    host and the device are the same memory, so there ``total + host`` is what a rank needs.

    ZeRO-2: the gradients are this rank's fp32 shard plus at most two open buckets in the model
    dtype. ZeRO-3: the parameters are this rank's shards plus the root units and the two largest
    consecutive blocks whole (the current block and the prefetched next one); the gradients the
    fp32 shard plus, in the model dtype, the root's gradient (staged for the whole backward: the
    embedding's comes last) and the largest block's (staged while its backward runs)."""
    m, d = plan.model, plan.dims
    item = DTYPE_BYTES[plan.train.precision]
    states = model_states(m, d, plan.train, param_counts(m, d.tp, d.ep))
    sbh = plan.micro_batch * plan.seq_len * m.hidden_size
    k_cf = m.moe.top_k * m.moe.capacity_factor
    n_moe = sum(m.is_moe_layer(i) for i in range(m.num_layers))
    # saved activations per layer (16-bit: Korthikanti et al.'s sbh(10 + 24/t) with a fused
    # attention kernel, so no s^2 term); an MoE MLP keeps k * cf copies of its tokens
    dense_layer = sbh * (10 + 24 / d.tp) * item / 2
    moe_layer = dense_layer + sbh * 16 * (k_cf - 1) / d.tp * item / 2
    full = (m.num_layers - n_moe) * dense_layer + n_moe * moe_layer
    stash = 0.0
    if plan.train.checkpointing == "none":
        activations = full
    else:
        activations = m.num_layers * sbh * item + max(dense_layer, moe_layer if n_moe else 0)
        if plan.train.checkpointing == "cac":  # outputs of each block's collectives
            comm_out = sbh * item * (2 + (m.num_layers - n_moe > 0))
            stash = m.num_layers * comm_out + n_moe * 4 * sbh * k_cf * item
    out = {key: states[key] for key in ("parameters", "gradients", "optimizer")}
    out.update(activations=activations, cac_stash=stash, optimizer_spike=states["optimizer_spike"])
    out["total"] = sum(out.values())
    out.update(host=states["host"], disk=states["disk"])
    return out


def eq5_lower_bound(np_base: float, num_experts: int, tp: int, world_size: int) -> float:
    """The paper's Eq. 5: ``M >= 4 NP_base (1/G_tensor + (E + 2)/G)``."""
    return 4 * np_base * (1 / tp + (num_experts + 2) / world_size)


def model_state_bytes(n_non_expert: float, n_expert: float, tp: int, ep: int, world_size: int,
                      stage: int = 1, offload: str = "none", where: str = "device") -> float:
    """Model-state bytes per rank in ``where`` (``device``, ``host`` or ``disk``), 16-bit training.

    ZeRO-1: 16-bit parameters and gradients (4 bytes) whole on each rank of a tp (x ep) group,
    fp32 master weights and Adam moments (12 bytes) over every rank:
    ``4 N_ne / t + 4 N_e / (t ep) + 12 (N_ne + N_e) / G``. With ``N_ne = 2/3 NP_base`` and
    ``N_e = E/3 NP_base`` (MLPs are 2/3 of a block and every other block is MoE) and one expert
    per EP rank (``ep = E``) this is exactly Eq. 5. Stage 2: the 16-bit parameters stay whole,
    the gradients join the sharded states as an fp32 shard (``2 N / t.. + 16 N / G``; DeepSpeed's
    ``2 + 14 / N`` keeps 16-bit gradient shards). Stage 3: everything sharded over all ranks,
    experts over ``edp`` (``t ep edp = G``): ``18 (N_ne + N_e) / G`` (2-byte parameter shard,
    fp32 gradient shard, 12; ZeRO-3's ``16 Psi / N`` keeps 16-bit gradient shards). The working
    set stage 3 adds (units gathered whole while used) is not a model state: ``memory`` counts it.
    Offload moves the 12 bytes of optimizer states to ``host`` (``cpu``) or ``disk``; at stage 3
    with ``disk`` the device keeps no parameter shard either: the fp32 master in the file is its
    only copy (see ``zero.state_coefficients``)."""
    a, c = state_coefficients(stage, offload)[where]
    return a * n_non_expert / tp + a * n_expert / (tp * ep) + c * (n_non_expert + n_expert) / world_size


def crosses_nodes(plan: Plan, axis: str, gpus_per_node: int) -> bool:
    """Whether any group of ``axis`` spans two nodes (ranks fill nodes in order)."""
    return any(len({r // gpus_per_node for r in g}) > 1 for g in axis_groups(plan.dims, axis))


def flops(plan: Plan) -> float:
    """Training FLOPs per device per step: 6 x active parameters x tokens, plus attention scores
    (forward ``4 s^2 h`` per layer and sequence, x3 with backward), plus the recompute."""
    m = plan.model
    counts = param_counts(m)
    active = counts["total"] - counts["expert_total"] + counts["expert_total"] * m.moe.top_k / m.moe.num_experts
    tokens = plan.micro_batch * plan.seq_len * plan.micro_batches * plan.dims.dp
    attention = 3 * 4 * plan.seq_len * m.hidden_size * m.num_layers * tokens
    total = 6 * active * tokens + attention
    if plan.train.checkpointing != "none":
        total *= 4 / 3  # the forward runs twice
    return total / plan.world_size


def step_time(plan: Plan, hw: Hardware, dtd: bool | None = None) -> dict[str, float]:
    """Seconds per step: compute at ``peak x efficiency`` plus every collective, not overlapped.
    A collective on an axis inside a node uses NVLink; one that crosses nodes shares the node's
    network among its GPUs (all of them communicate at once in these collectives)."""
    comm = step_comm(plan, dtd)
    out = {"compute": flops(plan) / (hw.peak_flops * hw.efficiency)}
    for phase, entries in comm.items():
        for key, e in entries.items():
            kind, axis = key.split("/")
            inter = crosses_nodes(plan, axis, hw.gpus_per_node)
            bw = hw.inter_bw / hw.gpus_per_node if inter else hw.intra_bw
            n = plan.dims.size(axis)
            steps = {"all_reduce": 2 * (n - 1), "all_to_all": n - 1}.get(kind, n - 1)
            lat = hw.inter_latency if inter else hw.intra_latency
            t = e["bytes"] / bw + e["calls"] * steps * lat
            out[f"comm/{kind}"] = out.get(f"comm/{kind}", 0.0) + t
    out["total"] = sum(out.values())
    return out
