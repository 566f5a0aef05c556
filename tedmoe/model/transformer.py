"""GPT-MoE: a decoder-only transformer whose MLP is an MoE layer every ``moe_every`` blocks.

Legend: B batch, T sequence, H hidden, V vocabulary (V/n local), n = tp.
Model code never builds process groups: it receives a ``Topology``.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from tedmoe.config import ModelConfig
from tedmoe.model.attention import Attention
from tedmoe.model.norm import RMSNorm
from tedmoe.moe.layer import MoE
from tedmoe.moe.noise import TokenContext
from tedmoe.parallel import comm
from tedmoe.parallel.sharding import init_layout_invariant, is_expert
from tedmoe.parallel.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                             vocab_parallel_cross_entropy, vocab_parallel_kl)
from tedmoe.parallel.topology import Topology


class MLP(nn.Module):
    """Dense tensor-parallel MLP: column-parallel up, GELU, row-parallel down."""

    def __init__(self, config: ModelConfig, topology: Topology, device=None, dtype=None):
        super().__init__()
        tp, H, F_ = topology.axis("tp"), config.hidden_size, config.ffn_hidden_size
        self.fc1 = ColumnParallelLinear(H, F_, tp, device=device, dtype=dtype)
        self.fc2 = RowParallelLinear(F_, H, tp, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``+ mlp(norm(x))`` (dense or MoE).
    Returns ``(x, aux_loss, z_loss)``; dense blocks return zero losses."""

    def __init__(self, config: ModelConfig, topology: Topology, index: int, device=None, dtype=None,
                 context: TokenContext | None = None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps, **kw)
        self.attn = Attention(config, topology, **kw)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps, **kw)
        self.is_moe = config.is_moe_layer(index)
        self.mlp = MoE(config.hidden_size, config.moe_for(index), topology, layer=index, context=context, **kw) \
            if self.is_moe \
            else MLP(config, topology, **kw)
        self.stats = None

    def forward(self, x: torch.Tensor, kv=None, positions: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``positions`` ``[B, t]``: the tokens are an ordered subset of their sequences (random-LTD)."""
        x = x + self.attn(self.attn_norm(x), kv, positions)
        if not self.is_moe:
            zero = x.new_zeros((), dtype=torch.float32)
            return x + self.mlp(self.mlp_norm(x)), zero, zero
        y, self.stats = self.mlp(self.mlp_norm(x), positions)
        return x + y, self.stats.aux_loss, self.stats.z_loss


class GPTMoE(nn.Module):
    """``forward(ids [B, T], targets [B, T])`` returns ``(loss, parts)``: the training loss
    (mean cross-entropy over non-ignored targets + weighted mean aux and z losses) and its
    parts, detached, for logging. With ``sp > 1`` the inputs are this rank's chunk of each
    sequence and the loss is this rank's share: the SP ranks' losses sum to the sequence's.

    With a teacher (``set_teacher``: a model of the same vocabulary in the same topology) the
    cross-entropy term becomes ``(1 - w) CE + w T^2 KL(teacher || student)``, the KL of the
    temperature-``T`` distributions averaged over the same tokens."""

    def __init__(self, config: ModelConfig, topology: Topology, device=None, dtype=None):
        super().__init__()
        config.validate(topology.size("tp"), topology.size("ep"), topology.size("sp"))
        self.config, self.topology = config, topology
        tp, kw = topology.axis("tp"), {"device": device, "dtype": dtype}
        self.embed = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp, **kw)
        self.token_context = TokenContext()  # set per micro-batch by the engine (keys the routers' draws)
        self.blocks = nn.ModuleList(Block(config, topology, i, context=self.token_context, **kw)
                                    for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps, **kw)
        self.head = ColumnParallelLinear(config.hidden_size, config.vocab_size, tp, bias=False, **kw)
        self.set_teacher(None)

    def set_teacher(self, teacher: GPTMoE | None, weight: float = 0.5, temperature: float = 1.0) -> None:
        """Distil from ``teacher`` (kept outside this module: not a submodule, not in the state
        dict, not trained, always in eval mode); ``None`` removes it."""
        if teacher is not None:
            if teacher.config.vocab_size != self.config.vocab_size:
                raise ValueError(f"the teacher's vocabulary ({teacher.config.vocab_size}) differs from the model's "
                                 f"({self.config.vocab_size}); distil from a model of the same tokenizer")
            teacher.eval().requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)  # plain attribute: nn.Module would register it
        self.distill = (weight, temperature)

    @contextlib.contextmanager
    def _whole_sequences(self, length: int):
        self.token_context.sequence_length = length
        try:
            yield
        finally:
            self.token_context.sequence_length = None

    @contextlib.contextmanager
    def without_teacher(self):
        """The plain loss (cross-entropy and MoE losses) inside, e.g. for validation."""
        teacher = self.teacher
        object.__setattr__(self, "teacher", None)
        try:
            yield self
        finally:
            object.__setattr__(self, "teacher", teacher)

    def init_weights(self, seed: int, only: set[int] | None = None) -> None:
        """The same weights in every layout: N(0, 0.02), output projections scaled by
        ``1/sqrt(2 L)``, norms 1, biases 0. ``only``: ids of the parameters to initialise (ZeRO-3
        materialises a model built on the meta device one block at a time)."""
        scale = 0.02 / math.sqrt(2 * self.config.num_layers)

        def init_full(name, shape, g):
            if name.endswith("norm.weight"):
                return torch.ones(shape)
            if name.endswith("bias"):
                return torch.zeros(shape)
            std = scale if name.endswith(("o.weight", "fc2.weight", "experts.w2", "residual.w2.weight")) else 0.02
            return torch.randn(shape, generator=g) * std

        init_layout_invariant(self, self.topology, seed, init_full, only)

    def kept_tokens(self, layer: int, batch: int, length: int, device=None) -> torch.Tensor | None:
        """Random-LTD: the local indices ``[B, r_local]`` (ascending) of the tokens block ``layer``
        keeps in this forward, or ``None`` (all). Each sequence's draw depends on (seed, optimizer
        step, its index in the global batch, the block) only, over the whole sequence cut into
        ``segments``; an SP rank takes its own segments' tokens: every layout keeps the same ones."""
        ltd, ctx = self.config.random_ltd, self.token_context
        if layer not in ltd.layers or not self.training:
            return None
        sp = self.topology.axis("sp")
        full = ctx.sequence_length or length
        r = ltd.keep(ctx.step, full)
        if r >= full:
            return None
        seg, keep = full // ltd.segments, r // ltd.segments
        mine = range(sp.rank * ltd.segments // sp.size, (sp.rank + 1) * ltd.segments // sp.size)
        rows = []
        for b in range(batch):
            key = ((ltd.seed * 1_000_003 + ctx.step) * 1_000_033 + ctx.first_sequence + b) * 1_009 + layer
            g = torch.Generator().manual_seed(key % (1 << 62))
            picks = torch.rand(ltd.segments, seg, generator=g).argsort(-1)[:, :keep].sort(-1).values
            rows.append(torch.cat([picks[i] + i * seg for i in mine]) - ctx.first_position)
        return torch.stack(rows).to(device)

    def forward(self, ids_BT: torch.Tensor, targets_BT: torch.Tensor, ignore_index: int = -100):
        ctx = self.token_context
        if self.config.random_ltd.layers and ctx.sequence_length is None:  # called outside the engine
            with self._whole_sequences(ids_BT.shape[1] * self.topology.size("sp")):
                return self.forward(ids_BT, targets_BT, ignore_index)
        x = self.embed(ids_BT)
        aux, z = [], []
        for i, block in enumerate(self.blocks):
            kept = self.kept_tokens(i, x.shape[0], x.shape[1], x.device)
            if kept is None:
                x, a, zl = block(x)
            else:  # the kept tokens through the block, the others around it
                index = kept.unsqueeze(-1).expand(-1, -1, x.shape[-1])
                positions = kept + self.token_context.first_position
                y, a, zl = block(x.gather(1, index), None, positions)
                x = x.scatter(1, index, y)
            if block.is_moe:
                aux.append(a)
                z.append(zl)
        logits = self.head(self.norm(x))
        per_token = vocab_parallel_cross_entropy(logits.flatten(0, 1), targets_BT.flatten(), self.topology.axis("tp"),
                                                 ignore_index)
        # normalised by the whole sequence's token count: with sp > 1 the SP ranks' losses sum to it
        valid = (targets_BT != ignore_index).sum()
        if self.topology.size("sp") > 1:
            valid = comm.all_reduce(valid, self.topology.axis("sp"))
        ce = per_token.sum() / valid.clamp(min=1)
        loss = ce
        parts = {"ce": ce.detach()}
        if self.teacher is not None:
            weight, temperature = self.distill
            kl = vocab_parallel_kl(logits.flatten(0, 1), self._teacher_logits(ids_BT).flatten(0, 1),
                                   self.topology.axis("tp"), temperature)
            kd = kl.masked_fill(targets_BT.flatten() == ignore_index, 0.0).sum() / valid.clamp(min=1)
            kd = kd * temperature ** 2
            loss = (1 - weight) * ce + weight * kd
            parts["kd"] = kd.detach()
        if aux:
            aux_mean, z_mean = torch.stack(aux).mean(), torch.stack(z).mean()
            loss = loss + self.config.aux_loss_coef * aux_mean + self.config.z_loss_coef * z_mean
            parts.update(aux=aux_mean.detach(), z=z_mean.detach())
        return loss, parts

    @torch.no_grad()
    def _teacher_logits(self, ids_BT: torch.Tensor) -> torch.Tensor:
        """The teacher's vocab-sharded logits of the same tokens (its routers see the same token context)."""
        teacher = self.teacher
        vars(teacher.token_context).update(vars(self.token_context))
        x = teacher.embed(ids_BT)
        for block in teacher.blocks:
            x = block(x)[0]
        return teacher.head(teacher.norm(x))

    @torch.no_grad()
    def logits(self, ids_BT: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits ``[B, T, V]`` on every rank (for generation and export checks)."""
        x = self.embed(ids_BT)
        for block in self.blocks:
            x = block(x)[0]
        return comm.gather_split(self.head(self.norm(x)), self.topology.axis("tp"), -1)

    @torch.no_grad()
    def forward_cached(self, ids_N: torch.Tensor, batch, cache) -> torch.Tensor:
        """Inference over a ragged batch with a KV cache (``tedmoe.inference``): the N tokens of
        every sequence's chunk, flattened; returns the full-vocabulary logits ``[S, V]`` of each
        sequence's last token (``batch.last_rows``), on every rank."""
        x = self.embed(ids_N[None])
        for i, block in enumerate(self.blocks):
            x = block(x, (batch, cache.k[i], cache.v[i]))[0]
        x = x[0, batch.last_rows]
        return comm.gather_split(self.head(self.norm(x)), self.topology.axis("tp"), -1)

    def moe_stats(self) -> list:
        """The last forward's ``MoEStats`` of every MoE block, in order."""
        return [b.stats for b in self.blocks if b.is_moe]


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Parameters of the full model: total, expert, non-expert, and active per token
    (non-expert + ``top_k / E`` of each MoE layer's expert parameters, E its expert count)."""
    model = GPTMoE(config, Topology.single(), device="meta")
    expert = sum(p.numel() for p in model.parameters() if is_expert(p))
    total = sum(p.numel() for p in model.parameters())
    # each expert weight is [E_layer, ...]: a token uses top_k of its layer's E_layer experts
    active = total - expert + sum(p.numel() * config.moe.top_k // p.shape[0] for p in model.parameters() if is_expert(p))
    return {"total": total, "expert": expert, "non_expert": total - expert, "active_per_token": active}
