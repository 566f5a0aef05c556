"""Typed configuration. Every field has a docstring; ``validate`` raises ``ValueError`` naming the fix."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Annotated, Literal

from tedmoe.config.validation import Fraction, NonNegFloat, NonNegInt, PosFloat, PosInt, Range, Seed, check_fields

DropPolicy = Literal["position", "probs", "random"]
Backend = Literal["gloo", "nccl", "mpi", "ucc", "xccl"]
Beta = Annotated[float, Range(ge=0, lt=1)]


@dataclass
class MoEConfig:
    """One Mixture-of-Experts layer (its width H is the model's ``hidden_size``, given to the
    layer when it is built)."""

    ffn_hidden_size: PosInt = 256
    """Hidden width F of each expert MLP; split over ``tp``."""
    num_experts: PosInt = 8
    """Experts E in the layer; split ``E / ep`` per expert-parallel rank."""
    top_k: PosInt = 2
    """Experts each token is sent to."""
    capacity_factor: PosFloat = 1.0
    """Training capacity per expert is ``ceil(top_k * capacity_factor * S / E)`` tokens."""
    eval_capacity_factor: PosFloat | None = None
    """Capacity factor in eval mode; ``None`` uses ``capacity_factor``."""
    min_capacity: NonNegInt = 4
    """Lower bound on the capacity of each expert."""
    drop_policy: DropPolicy = "position"
    """Who keeps a slot when an expert overflows: ``position`` (first choices first, then token
    order), ``probs`` (highest router probability) or ``random`` (random token selection)."""
    dropless: bool = False
    """Compute every routed token: no capacity, uneven all-to-all."""
    normalize_gates: bool = True
    """For ``top_k > 1``, renormalise the chosen experts' probabilities to sum to 1."""
    router_jitter: Annotated[float, Range(ge=0, lt=1)] = 0.0
    """Multiply the router's input by ``U(1 - jitter, 1 + jitter)`` in training (0 disables)."""
    gumbel_noise: bool = False
    """Top-1 only: pick the expert from logits plus Gumbel noise in training (gates stay clean)."""
    router_seed: Seed = 1234
    """Seed of the router's noise and random token selection. Draws are a function of (seed,
    layer, step, token's global position), so every layout draws what one process draws."""
    aux_loss_type: Literal["all_choices", "switch"] = "all_choices"
    """Load-balancing loss counts: ``all_choices`` (fraction of all top-k assignments per expert)
    or ``switch`` (first choices only, as Switch Transformer and DeepSpeed); equal for top-1."""
    activation: Literal["gelu", "swiglu"] = "gelu"
    """Expert MLP activation."""
    dtd: bool = True
    """Duplicate token dropping: each TP rank sends 1/TP of the dispatch buffer."""
    residual: bool = False
    """Residual-MoE (DeepSpeed-MoE): a dense MLP like one expert (same activation and width,
    tensor-parallel) runs on every token beside the routed experts; a learned per-token coefficient
    (softmax over two, from a linear layer) mixes the two outputs."""

    def capacity(self, num_tokens: int, training: bool = True) -> int:
        cf = self.capacity_factor if training or self.eval_capacity_factor is None else self.eval_capacity_factor
        return max(self.min_capacity, math.ceil(self.top_k * cf * num_tokens / self.num_experts))

    def validate(self, tp: int = 1, ep: int = 1) -> None:
        """Raise ``ValueError`` for a setting that cannot work with these degrees (field types and
        ranges are checked by their annotations, here too when the layer is built on its own)."""
        check_fields(self)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}; "
                             f"set top_k <= {self.num_experts} or add experts")
        if self.num_experts % ep:
            raise ValueError(f"num_experts={self.num_experts} is not divisible by ep={ep}; "
                             f"make num_experts a multiple of {ep} or pick ep from the divisors of {self.num_experts}")
        if self.ffn_hidden_size % tp:
            raise ValueError(f"ffn_hidden_size={self.ffn_hidden_size} is not divisible by tp={tp}; "
                             f"make it a multiple of {tp} (e.g. {math.ceil(self.ffn_hidden_size / tp) * tp})")
        if self.gumbel_noise and self.top_k != 1:
            raise ValueError("gumbel_noise applies to top-1 routing only; set top_k=1 or gumbel_noise=false")


@dataclass
class RandomLTDConfig:
    """Random layerwise token dropping (random-LTD): in the listed middle blocks each sequence
    keeps a random subset of ``r`` of its tokens (in order, with their positions for rotary);
    the others bypass the block. ``r`` grows linearly from ``start`` to the whole sequence over
    ``steps`` optimizer steps (the monotonic sequence-length growth schedule), a multiple of
    ``multiple``. Training only; evaluation and inference see every token."""

    layers: tuple[NonNegInt, ...] = ()
    """Block indices (0-based) that drop tokens; not the first nor the last block. Empty: off."""
    start: PosInt = 16
    """Tokens kept per sequence at step 0."""
    steps: PosInt = 1000
    """Optimizer steps until every token is kept."""
    multiple: PosInt = 8
    """``r`` is rounded down to a multiple of this (at least one multiple)."""
    segments: PosInt = 1
    """The sequence is cut into this many equal segments, each keeping ``r / segments`` tokens;
    with sequence parallelism ``sp`` must divide it (each rank keeps its segments' tokens)."""
    seed: Seed = 4321
    """Seed of the draws (with the step, the sequence and the block)."""

    def keep(self, step: int, length: int) -> int:
        """Tokens each sequence of ``length`` keeps at optimizer step ``step`` (0-based)."""
        r = self.start + (length - self.start) * min(1.0, step / self.steps)
        return min(length, max(self.multiple, int(r) - int(r) % self.multiple))


@dataclass
class ModelConfig:
    """A decoder-only GPT with an MoE MLP every ``moe_every`` layers."""

    vocab_size: PosInt = 256
    """Vocabulary size V (256 for the byte tokenizer); split over ``tp``."""
    hidden_size: PosInt = 64
    """Model width H."""
    num_layers: PosInt = 4
    """Transformer blocks."""
    num_heads: PosInt = 4
    """Attention heads; split over ``tp``."""
    num_kv_heads: PosInt | None = None
    """Key/value heads for grouped-query attention; ``None`` means ``num_heads``."""
    head_dim: PosInt | None = None
    """Width D of each attention head; ``None`` means ``hidden_size / num_heads`` (Qwen3-MoE sets
    its own, so ``num_heads x head_dim`` may differ from ``hidden_size``)."""
    qk_norm: bool = False
    """RMSNorm over each head's query and key (learned weight of size ``head_dim``, shared by the
    heads) before the rotary embedding, as Qwen3 does."""
    ffn_hidden_size: PosInt = 256
    """Hidden width of the dense MLP blocks."""
    max_seq_len: PosInt = 256
    """Longest sequence the rotary tables cover."""
    rope_theta: PosFloat = 10000.0
    """Rotary embedding base."""
    norm_eps: PosFloat = 1e-5
    """RMSNorm epsilon."""
    moe_every: NonNegInt = 2
    """Every ``moe_every``-th block (1-based: blocks 2, 4, ... by default) uses an MoE MLP; 0 = none."""
    aux_loss_coef: NonNegFloat = 0.01
    """Weight of the mean load-balancing loss in the training loss."""
    z_loss_coef: NonNegFloat = 0.001
    """Weight of the mean router z-loss in the training loss."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """The MoE layers' settings (their experts' ``ffn_hidden_size`` is their own)."""
    expert_counts: tuple[PosInt, ...] = ()
    """PR-MoE's pyramid: the number of experts of each MoE layer, first to last (e.g. ``[4, 4, 8,
    8]``, more experts in the later layers); empty: ``moe.num_experts`` in every MoE layer."""
    random_ltd: RandomLTDConfig = field(default_factory=RandomLTDConfig)
    """Random layerwise token dropping in middle blocks (training only)."""

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        """Width D of each attention head."""
        return self.head_dim or self.hidden_size // self.num_heads

    def is_moe_layer(self, index: int) -> bool:
        return self.moe_every > 0 and (index + 1) % self.moe_every == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    def moe_for(self, index: int) -> MoEConfig:
        """The MoE settings of block ``index`` (its pyramid level's expert count, if any)."""
        if not self.expert_counts:
            return self.moe
        return dataclasses.replace(self.moe, num_experts=self.expert_counts[self.moe_layers.index(index)])

    def validate(self, tp: int = 1, ep: int = 1, sp: int = 1) -> None:
        """Raise ``ValueError`` for a setting that cannot work with these degrees."""
        check_fields(self, "model.")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                             "change one of them or set model.head_dim")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.kv_heads}")
        for name, value in (("num_heads", self.num_heads), ("num_kv_heads", self.kv_heads),
                            ("ffn_hidden_size", self.ffn_hidden_size), ("vocab_size", self.vocab_size)):
            if value % tp:
                raise ValueError(f"{name}={value} is not divisible by tp={tp}; "
                                 f"use a multiple of {tp} or a tp that divides {value}")
        if (self.num_heads // tp) % sp:
            raise ValueError(f"num_heads / tp = {self.num_heads // tp} heads per TP rank is not divisible by sp={sp}; "
                             "Ulysses splits heads over sp: pick sp dividing it, or more heads")
        kv = self.kv_heads // tp
        if kv % sp and sp % kv:
            raise ValueError(f"num_kv_heads / tp = {kv} kv heads per TP rank and sp={sp}: one must divide the other "
                             "(kv heads are replicated up to sp)")
        if self.head_size % 2:
            raise ValueError(f"head dim {self.head_size} must be even for rotary embeddings")
        layers = self.moe_layers
        if self.expert_counts and len(self.expert_counts) != len(layers):
            raise ValueError(f"model.expert_counts has {len(self.expert_counts)} entries but the model has "
                             f"{len(layers)} MoE layers (blocks {[i + 1 for i in layers]}); give one count per MoE "
                             "layer, or leave it empty")
        if not self.expert_counts and layers:
            self.moe.validate(tp, ep)
        for j, i in enumerate(layers if self.expert_counts else []):
            try:
                self.moe_for(i).validate(tp, ep)
            except ValueError as err:
                raise ValueError(f"model.expert_counts[{j}] (block {i + 1}): {err}") from None
        ltd = self.random_ltd
        if ltd.layers:
            bad = [i for i in ltd.layers if not 0 < i < self.num_layers - 1]
            if bad:
                where = f"1..{self.num_layers - 2} of {self.num_layers}" if self.num_layers > 2 else \
                    f"and a model of {self.num_layers} blocks has none"
                raise ValueError(f"model.random_ltd.layers={list(ltd.layers)}: {bad} out of range; random-LTD drops "
                                 f"tokens in middle blocks only ({where})")
            if ltd.multiple % ltd.segments:
                raise ValueError(f"model.random_ltd.multiple={ltd.multiple} is not a multiple of "
                                 f"segments={ltd.segments}; every segment keeps as many tokens")
            if ltd.segments % sp:
                raise ValueError(f"model.random_ltd.segments={ltd.segments} is not divisible by sp={sp}; set "
                                 f"segments to a multiple of {sp} (each SP rank keeps its own segments' tokens)")


@dataclass
class TrainConfig:
    """Optimisation and memory settings of the engine."""

    lr: PosFloat = 3e-3
    """Peak learning rate (after warmup)."""
    min_lr_ratio: Annotated[float, Range(ge=0, le=1)] = 0.1
    """The cosine decay ends at ``lr * min_lr_ratio``."""
    warmup_steps: NonNegInt = 10
    """Linear warmup steps from 0 to ``lr``."""
    max_steps: PosInt = 200
    """Optimizer steps; the cosine decay spans ``warmup_steps..max_steps``."""
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    """AdamW betas."""
    eps: PosFloat = 1e-8
    """AdamW epsilon."""
    weight_decay: NonNegFloat = 0.1
    """AdamW decoupled weight decay, on parameters with 2 or more dims."""
    grad_clip: PosFloat | None = 1.0
    """Clip the global gradient norm to this; ``None`` disables."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Parameter and activation dtype; master weights and optimizer states are always fp32."""
    initial_loss_scale: PosFloat = 2.0 ** 16
    """fp16 only: the starting dynamic loss scale."""
    loss_scale_window: PosInt = 1000
    """fp16 only: steps without overflow before the scale doubles."""
    tile_size: PosInt | None = 1 << 20
    """Elements per tile of the optimizer step (``None``: the whole shard at once)."""
    zero_stage: Annotated[int, Range(ge=1, le=3)] = 1
    """ZeRO stage: 1 shards the optimizer states (the gradients of a step are kept whole until
    the step), 2 the gradients as well: each bucket of gradients is reduce-scattered to its owners
    as soon as the backward has produced it, and no whole gradient is kept; 3 the parameters as
    well: each block's parameters are gathered just before the block runs (forward and backward)
    and freed after, the next block's gather overlapping the current block's compute."""
    reduce_bucket_size: PosInt = 1 << 22
    """ZeRO-2: elements per gradient bucket (each rank owns 1/n of every bucket)."""
    offload: Literal["none", "cpu", "disk"] = "none"
    """Where the optimizer states live (ZeRO-Offload / ZeRO-Infinity): on the device, in host
    memory (``cpu``; the same as ``none`` when the device is the CPU) or in files under
    ``offload_path`` (``disk``; NVMe in practice), streamed through the step tile by tile with
    the next tile's read overlapped with the current tile's update. At stage 3 ``disk`` keeps
    this rank's parameter shards in the files as well."""
    offload_path: str | None = None
    """``offload = "disk"``: an existing, writable directory on a fast disk; each rank writes
    its files into a new subdirectory of it and removes that subdirectory when it ends."""
    max_bad_steps: NonNegInt = 0
    """Steps in a row whose gradients are NaN or infinite (bf16/fp32) that are skipped before
    the run stops; fp16 overflow is handled by the loss scale instead."""
    checkpointing: Literal["none", "plain", "cac"] = "none"
    """Activation checkpointing per block: off, plain (collectives run again in the
    recompute) or communication-aware (collective outputs stashed and replayed)."""

    def validate(self) -> None:
        check_fields(self, "train.")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be between 0 and max_steps={self.max_steps}")
        if self.offload == "disk":
            if self.offload_path is None:
                raise ValueError("train.offload='disk' needs train.offload_path: a writable directory on a fast disk")
            if self.tile_size is None:
                raise ValueError("train.offload='disk' streams the optimizer step tile by tile; set train.tile_size "
                                 "(e.g. 1048576) instead of null")
        elif self.offload_path is not None:
            raise ValueError(f"train.offload_path is set but train.offload={self.offload!r} does not use it; set "
                             "train.offload='disk' or remove offload_path")


@dataclass
class ParallelConfig:
    """The rank grid and how ranks talk."""

    tp: PosInt = 1
    """Tensor-parallel degree (innermost axis; keep it inside a node)."""
    ep: PosInt = 1
    """Expert-parallel degree; divides ``dp x sp = world_size / tp`` and ``num_experts``."""
    sp: PosInt = 1
    """Sequence-parallel degree (DeepSpeed-Ulysses); divides ``seq_len`` and the heads per TP rank."""
    nproc: PosInt = 1
    """Ranks ``tedmoe train`` launches itself when not already started by torchrun or SLURM."""
    backend: Backend | None = None
    """``torch.distributed`` backend; ``None`` picks NCCL with CUDA, else gloo."""
    timeout_s: PosFloat = 300.0
    """Seconds a collective may wait before the run fails."""

    def check_backend(self) -> None:
        """Refuse a backend this machine cannot run (before any process starts)."""
        import torch
        import torch.distributed as dist

        if self.backend is None:
            return
        if self.backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("parallel.backend='nccl' needs CUDA GPUs and this machine has none; "
                             "leave parallel.backend unset (gloo on CPU) or set it to 'gloo'")
        available = getattr(dist, "is_backend_available", None)
        if available is not None and not available(self.backend):
            raise ValueError(f"parallel.backend={self.backend!r} is not available in this PyTorch build; "
                             "leave parallel.backend unset (NCCL with CUDA, else gloo)")


@dataclass
class ScheduleConfig:
    """A curriculum's difficulty over the training steps (DeepSpeed's data-efficiency schedules):
    ``fixed_linear`` from ``start`` to ``end`` over ``steps`` steps, ``fixed_root`` the same along
    ``(step / steps) ** (1 / root_degree)`` (fast at first), ``fixed_discrete`` ``values[i]`` from
    step ``boundaries[i - 1]`` on; ``end`` afterwards. ``none``: always the hardest."""

    schedule: Literal["none", "fixed_linear", "fixed_root", "fixed_discrete"] = "none"
    """How the difficulty grows."""
    start: PosFloat = 1.0
    """The first step's difficulty (seqlen: tokens per sequence; rarity: percent of the windows,
    easiest first, to sample from)."""
    end: PosFloat | None = None
    """The difficulty at ``steps`` and after; ``None``: all (seq_len, or 100 percent)."""
    steps: PosInt = 1000
    """Steps from ``start`` to ``end`` (fixed_linear, fixed_root)."""
    root_degree: PosInt = 2
    """fixed_root's root."""
    values: tuple[PosFloat, ...] = ()
    """fixed_discrete: the difficulties, easiest first."""
    boundaries: tuple[PosInt, ...] = ()
    """fixed_discrete: the steps at which ``values[1:]`` begin (one fewer than ``values``)."""
    multiple: PosInt = 8
    """seqlen: lengths are rounded down to a multiple of this (at least one multiple)."""

    def validate(self, prefix: str, full: float) -> None:
        check_fields(self, prefix)
        if self.schedule == "none":
            return
        end = full if self.end is None else self.end
        if self.end is not None and self.end > full:
            raise ValueError(f"{prefix}end={self.end:g} exceeds the full difficulty {full:g}")
        if self.schedule == "fixed_discrete":
            if not self.values or len(self.boundaries) != len(self.values) - 1:
                raise ValueError(f"{prefix}schedule=fixed_discrete needs values (easiest first) and one fewer "
                                 f"boundaries, got {len(self.values)} value(s) and {len(self.boundaries)} boundaries")
            if list(self.values) != sorted(self.values) or list(self.boundaries) != sorted(set(self.boundaries)):
                raise ValueError(f"{prefix}values and boundaries must increase (a curriculum goes from easy to hard)")
            if self.values[-1] > full:
                raise ValueError(f"{prefix}values end at {self.values[-1]:g}, above the full difficulty {full:g}")
            return
        if self.start > end:
            raise ValueError(f"{prefix}start={self.start:g} is above end={end:g}; a curriculum grows from easy to hard")


@dataclass
class CurriculumConfig:
    """Curriculum learning: easier samples first. ``seqlen`` truncates every sequence to the
    scheduled length; ``rarity`` samples from the windows of lowest vocabulary rarity (mean
    negative log unigram frequency, computed at ``data prepare`` time), the scheduled percent of
    them. The sampler stays a function of (seed, step), so a resume continues exactly."""

    seqlen: ScheduleConfig = field(default_factory=ScheduleConfig)
    rarity: ScheduleConfig = field(default_factory=ScheduleConfig)

    @property
    def active(self) -> bool:
        return self.seqlen.schedule != "none" or self.rarity.schedule != "none"


@dataclass
class DataConfig:
    """Where tokens come from."""

    path: str | None = None
    """A directory written by ``tedmoe data prepare``; ``None`` uses the embedded corpus (the
    running Python's standard library sources), prepared once and cached."""
    tokenizer: Literal["byte", "bpe"] = "byte"
    """Tokenizer for the embedded corpus: raw bytes (vocabulary 256) or BPE trained on it."""
    bpe_vocab_size: Annotated[int, Range(ge=257)] = 2048
    """Vocabulary of a BPE tokenizer trained by ``prepare``."""
    corpus_bytes: PosInt = 4_000_000
    """How much of the embedded corpus to use."""
    val_fraction: Fraction = 0.05
    """Share of tokens (the tail of each file list) held out for validation."""
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    """Curriculum learning (``data.curriculum.seqlen``, ``data.curriculum.rarity``)."""


@dataclass
class CompressConfig:
    """Quantisation-aware training and sparsity (``tedmoe.compress.qat``); post-training
    compression is ``tedmoe compress``."""

    method: Literal["none", "binary", "ternary", "nm"] = "none"
    """``binary`` (1-bit, scale mean|w| per row), ``ternary`` (threshold 0.7 mean|w|), ``nm`` (N:M
    sparsity by magnitude) weights in the forward, straight-through gradients; ``none`` disables."""
    n: PosInt = 2
    """N of N:M: weights kept in every group of M consecutive inputs."""
    m: PosInt = 4
    """M of N:M."""
    refresh_every: PosInt = 100
    """Steps between recomputations of the N:M masks."""
    teacher: str | None = None
    """Distil from this model (a run, checkpoint or Hugging Face directory with the same vocabulary):
    the loss mixes cross-entropy with the KL divergence from the teacher's token distribution."""
    distill_weight: Annotated[float, Range(gt=0, le=1)] = 0.5
    """Weight of the distillation term: ``(1 - w) CE + w T^2 KL(teacher || student)``."""
    temperature: PosFloat = 1.0
    """Softmax temperature ``T`` of both distributions in the distillation term."""

    def validate(self, model: ModelConfig | None = None, tp: int = 1) -> None:
        check_fields(self, "compress.")
        if self.n > self.m:
            raise ValueError(f"compress.n={self.n} exceeds compress.m={self.m}; N:M keeps N of every M weights")
        if self.method == "nm" and model is not None:  # groups of m inputs must not straddle two TP ranks
            inputs = {"model.hidden_size": model.hidden_size,
                      "heads x head size / tp": model.num_heads * model.head_size // tp,
                      "model.ffn_hidden_size / tp": model.ffn_hidden_size // tp,
                      "model.moe.ffn_hidden_size / tp": model.moe.ffn_hidden_size // tp}
            for what, k in inputs.items():
                if k % self.m:
                    raise ValueError(f"N:M groups of m={self.m} must divide the {k} input columns each rank holds "
                                     f"({what}); pick m dividing {k} or a smaller tp")


@dataclass
class RunConfig:
    """Everything ``tedmoe train`` needs. Loadable from TOML; ``--set key=value`` overrides."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and memory settings."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Degrees and launch."""
    data: DataConfig = field(default_factory=DataConfig)
    """Tokens."""
    compress: CompressConfig = field(default_factory=CompressConfig)
    """Quantisation-aware training and sparsity."""
    out_dir: str = "runs/default"
    """Run directory: metrics, checkpoints, plots, exports."""
    seed: Seed = 0
    """Seed of the weights and of the data order."""
    seq_len: PosInt = 128
    """Tokens per training sequence."""
    global_batch_size: PosInt = 16
    """Sequences per optimizer step, over all data-parallel ranks."""
    micro_batch_size: PosInt = 4
    """Sequences per forward/backward on one rank; the rest is gradient accumulation."""
    eval_every: NonNegInt = 50
    """Steps between validation losses (0: only at the end)."""
    eval_batches: PosInt = 4
    """Micro-batches per validation."""
    checkpoint_every: NonNegInt = 100
    """Steps between checkpoints (0: only at the end)."""
    keep_checkpoints: NonNegInt = 2
    """Complete checkpoints kept (0: all); older ones are deleted after a newer one is complete,
    never the one just written."""
    tensorboard: bool = False
    """Also write TensorBoard event files (needs the tensorboard package)."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    export: bool = True
    """At the end, write the full model as ``model.safetensors`` + ``model_config.json``."""
    init_from: str | None = None
    """A Hugging Face model directory (Mixtral layout) whose weights start the run; its
    architecture replaces ``[model]``'s (the routing options used in training stay this config's)."""
    stop_after: PosInt | None = None
    """End this invocation after this step, with a checkpoint (for time-limited jobs: a later
    ``--resume`` continues; the schedule still follows ``train.max_steps``)."""

    def validate(self, world_size: int) -> None:
        """Every check that needs no process group; raises ``ValueError`` naming the fix."""
        from tedmoe.parallel.topology import ParallelDims

        check_fields(self)
        self.parallel.check_backend()

        dims = ParallelDims(world_size, self.parallel.tp, self.parallel.ep, self.parallel.sp)
        self.model.validate(dims.tp, dims.ep, dims.sp)
        if self.seq_len % dims.sp:
            raise ValueError(f"seq_len={self.seq_len} is not divisible by sp={dims.sp}; use a multiple of {dims.sp}")
        ltd = self.model.random_ltd
        if ltd.layers and ltd.start > self.seq_len:
            raise ValueError(f"model.random_ltd.start={ltd.start} is above seq_len={self.seq_len}; the kept tokens "
                             "grow from start to the whole sequence")
        if ltd.layers and (self.seq_len // dims.sp) % (ltd.segments // dims.sp):
            raise ValueError(f"seq_len={self.seq_len} does not split into model.random_ltd.segments={ltd.segments} "
                             "equal segments")
        cur = self.data.curriculum
        cur.seqlen.validate("data.curriculum.seqlen.", self.seq_len)
        cur.rarity.validate("data.curriculum.rarity.", 100.0)
        if cur.seqlen.schedule != "none" and cur.seqlen.multiple % dims.sp:
            raise ValueError(f"data.curriculum.seqlen.multiple={cur.seqlen.multiple} is not divisible by sp={dims.sp}; "
                             "every scheduled length must split over the sequence-parallel ranks")
        self.train.validate()
        self.compress.validate(self.model, dims.tp)
        if self.seq_len > self.model.max_seq_len:
            raise ValueError(f"seq_len={self.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
                             f"raise model.max_seq_len or shorten seq_len")
        check_batch(self.global_batch_size, self.micro_batch_size, dims.dp)


def check_batch(global_batch_size: int, micro_batch_size: int, dp: int,
                names: tuple[str, str] = ("global_batch_size", "micro_batch_size")) -> int:
    """Micro-batches per step on each rank; ``ValueError`` unless the global batch splits evenly
    into micro-batches over the ``dp`` data-parallel ranks (``names``: what the user calls the two)."""
    per_step = micro_batch_size * dp
    if global_batch_size % per_step:
        raise ValueError(f"{names[0]}={global_batch_size} is not a multiple of {names[1]}="
                         f"{micro_batch_size} x dp={dp} = {per_step}; make it a multiple of {per_step}")
    return global_batch_size // per_step


def preset(name: str) -> RunConfig:
    """Named starting points: ``default`` (what ``tedmoe train`` runs: 4 CPU ranks, a few
    minutes), ``tiny`` (seconds; tests) and ``small`` (a longer CPU run) are Mixtral-style models
    (SwiGLU experts in every block, so ``tedmoe export`` hands them to transformers); ``paper`` is
    the default's size with the paper's GPT-MoE block (GELU experts every other block, dense GELU
    MLPs between)."""
    if name == "default":
        moe = MoEConfig(ffn_hidden_size=192, num_experts=4, top_k=2, capacity_factor=1.25, activation="swiglu")
        return RunConfig(model=ModelConfig(vocab_size=256, hidden_size=128, num_layers=4, num_heads=4,
                                           ffn_hidden_size=512, max_seq_len=128, moe_every=1, moe=moe),
                         train=TrainConfig(lr=3e-3, warmup_steps=20, max_steps=300, tile_size=1 << 16),
                         parallel=ParallelConfig(tp=2, ep=2, nproc=4), seq_len=128, global_batch_size=16,
                         micro_batch_size=4, eval_every=100, checkpoint_every=150)
    if name == "paper":
        cfg = preset("default")
        cfg.model.moe_every = 2
        cfg.model.moe = MoEConfig(ffn_hidden_size=256, num_experts=4, top_k=2, capacity_factor=1.25)
        return cfg
    if name == "tiny":
        moe = MoEConfig(ffn_hidden_size=64, num_experts=4, top_k=2, capacity_factor=1.25, activation="swiglu")
        return RunConfig(model=ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4,
                                           ffn_hidden_size=64, max_seq_len=32, moe_every=1, moe=moe),
                         train=TrainConfig(lr=3e-3, warmup_steps=2, max_steps=6, tile_size=1 << 12),
                         parallel=ParallelConfig(tp=1, ep=1, nproc=1), seq_len=32, global_batch_size=8,
                         micro_batch_size=2, eval_every=3, eval_batches=2, checkpoint_every=3,
                         data=DataConfig(corpus_bytes=300_000), progress=False)
    if name == "small":
        cfg = preset("default")
        cfg.model.num_layers, cfg.model.moe.num_experts, cfg.train.max_steps = 6, 8, 2000
        return cfg
    raise ValueError(f"unknown preset {name!r}; presets are {', '.join(PRESETS)}")


PRESETS = ("default", "tiny", "small", "paper")
