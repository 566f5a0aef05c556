"""Tensor-parallel layers over one mesh axis (usually ``tp``), after Megatron-LM.

Legend: N tokens, I in-features, O out-features, V vocabulary, D embedding dim, n axis size.
Each layer can be built from the full single-process layer (``from_full``) so that it
computes exactly what that layer computes, and gathers its shards back (``full_*``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tedmoe.parallel import comm
from tedmoe.parallel.sharding import mark
from tedmoe.parallel.topology import Axis


def shard_size(total: int, axis: Axis, what: str) -> int:
    """``total / axis.size``, or a ValueError saying how to make it divide."""
    if total % axis.size:
        raise ValueError(
            f"{what}={total} is not divisible by {axis.name}={axis.size}; "
            f"use a multiple of {axis.size} (e.g. {math.ceil(total / axis.size) * axis.size}) or change {axis.name}"
        )
    return total // axis.size


def _take_shard(full: torch.Tensor, axis: Axis, dim: int) -> torch.Tensor:
    return comm.local_slice(full.detach(), axis, dim).clone()


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with W split by rows (output features) over ``axis``.

    Input: ``x [..., I]``, identical on every rank. Output: ``[..., O/n]`` (this rank's
    columns), or ``[..., O]`` on every rank with ``gather_output=True``.
    """

    def __init__(self, in_features: int, out_features: int, axis: Axis, bias: bool = True,
                 gather_output: bool = False, copy_input: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.axis = in_features, out_features, axis
        self.gather_output, self.copy_input = gather_output, copy_input
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(shard_size(out_features, axis, "out_features"), in_features, **kw))
        self.bias = nn.Parameter(torch.empty(self.weight.shape[0], **kw)) if bias else None
        bound = 1 / math.sqrt(in_features)
        for p in (self.weight, self.bias):
            if p is not None:
                nn.init.uniform_(p, -bound, bound)
        mark(self.weight, tp_dim=0)
        mark(self.bias, tp_dim=0)
        self.quantized = None  # an integer weight (tedmoe.compress) computing x W^T in its place
        self.weight_transforms = None  # quantisation-aware training: the forward's weight (tedmoe.compress.qat)

    @classmethod
    def from_full(cls, full: nn.Linear, axis: Axis, gather_output: bool = False) -> ColumnParallelLinear:
        layer = cls(full.in_features, full.out_features, axis, full.bias is not None, gather_output,
                    device=full.weight.device, dtype=full.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(_take_shard(full.weight, axis, 0))
            if full.bias is not None:
                layer.bias.copy_(_take_shard(full.bias, axis, 0))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy_input:  # off when the caller entered the region once for several layers
            x = comm.copy_to_region(x, self.axis)
        if self.quantized is not None:
            y = self.quantized(x, self.bias)
        else:
            w = self.weight if self.weight_transforms is None else self.weight_transforms["weight"](self.weight)
            y = F.linear(x, w, self.bias)
        return comm.gather_split(y, self.axis, -1) if self.gather_output else y

    def full_weight(self, shard: torch.Tensor | None = None) -> torch.Tensor:
        """The full ``[O, I]`` weight (or any tensor shaped like the shard, e.g. its grad)."""
        return comm.all_gather(self.weight.detach() if shard is None else shard, self.axis, 0)

    def full_bias(self, shard: torch.Tensor | None = None) -> torch.Tensor:
        return comm.all_gather(self.bias.detach() if shard is None else shard, self.axis, 0)


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with W split by columns (input features) over ``axis``.

    Input: ``x [..., I/n]`` (already split, ``input_is_parallel=True``) or ``[..., I]``.
    Output: ``[..., O]``, all-reduced over the axis; with ``reduce_output=False`` the
    un-reduced partial sum (no bias) for a caller that reduces it another way.
    """

    def __init__(self, in_features: int, out_features: int, axis: Axis, bias: bool = True,
                 input_is_parallel: bool = True, reduce_output: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.axis = in_features, out_features, axis
        self.input_is_parallel, self.reduce_output = input_is_parallel, reduce_output
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, shard_size(in_features, axis, "in_features"), **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        bound = 1 / math.sqrt(in_features)
        for p in (self.weight, self.bias):
            if p is not None:
                nn.init.uniform_(p, -bound, bound)
        mark(self.weight, tp_dim=1)
        mark(self.bias)
        self.quantized = None  # an integer weight (tedmoe.compress) computing x W^T in its place
        self.weight_transforms = None  # quantisation-aware training: the forward's weight (tedmoe.compress.qat)

    @classmethod
    def from_full(cls, full: nn.Linear, axis: Axis, input_is_parallel: bool = True,
                  reduce_output: bool = True) -> RowParallelLinear:
        layer = cls(full.in_features, full.out_features, axis, full.bias is not None, input_is_parallel,
                    reduce_output, device=full.weight.device, dtype=full.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(_take_shard(full.weight, axis, 1))
            if full.bias is not None:
                layer.bias.copy_(full.bias.detach())
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = comm.split_along(x, self.axis, -1)
        if self.quantized is not None:
            y = self.quantized(x)
        else:
            y = F.linear(x, self.weight if self.weight_transforms is None else self.weight_transforms["weight"](self.weight))
        if not self.reduce_output:
            return y
        y = comm.reduce_from_region(y, self.axis)
        return y if self.bias is None else y + self.bias

    def full_weight(self, shard: torch.Tensor | None = None) -> torch.Tensor:
        """The full ``[O, I]`` weight (or any tensor shaped like the shard, e.g. its grad)."""
        return comm.all_gather(self.weight.detach() if shard is None else shard, self.axis, 1)


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by rows (vocabulary) over ``axis``; output identical on every rank.

    Each rank looks up the ids in its range ``[start, start + V/n)``, zeros the rest,
    and one all-reduce sums the rows.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, axis: Axis, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.axis = num_embeddings, embedding_dim, axis
        rows = shard_size(num_embeddings, axis, "num_embeddings (vocabulary size)")
        self.vocab_start = axis.rank * rows
        self.weight = nn.Parameter(torch.empty(rows, embedding_dim, device=device, dtype=dtype))
        nn.init.normal_(self.weight)
        mark(self.weight, tp_dim=0)

    @classmethod
    def from_full(cls, full: nn.Embedding, axis: Axis) -> VocabParallelEmbedding:
        layer = cls(full.num_embeddings, full.embedding_dim, axis, device=full.weight.device, dtype=full.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(_take_shard(full.weight, axis, 0))
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.axis.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return comm.reduce_from_region(out, self.axis)

    def full_weight(self, shard: torch.Tensor | None = None) -> torch.Tensor:
        return comm.all_gather(self.weight.detach() if shard is None else shard, self.axis, 0)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward: per-token cross-entropy from vocab-sharded logits, with two all-reduces of
    ``[N]`` vectors (max, then [target logit, sum of exp] together); the full ``[N, V]``
    logits are never formed. Backward: ``softmax - onehot`` on the local shard, no communication."""

    @staticmethod
    def forward(ctx, logits_NV, target_N, axis, ignore_index):
        logits = logits_NV.float()
        rows = logits.shape[-1]
        start = axis.rank * rows
        logit_max = comm.all_reduce(logits.max(dim=-1).values, axis, op=torch.distributed.ReduceOp.MAX)
        shifted = logits - logit_max.unsqueeze(-1)
        local_t = target_N - start
        outside = (local_t < 0) | (local_t >= rows)
        local_t = local_t.masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp_()
        both = comm.all_reduce(torch.stack([target_logit, exp.sum(dim=-1)]), axis)
        valid = target_N != ignore_index
        loss = (both[1].log() - both[0]).masked_fill(~valid, 0.0)
        softmax = exp.div_(both[1].unsqueeze(-1))
        ctx.save_for_backward(softmax, local_t, outside, valid)
        ctx.in_dtype = logits_NV.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_N):
        softmax, local_t, outside, valid = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -(~outside).to(grad.dtype).unsqueeze(-1))
        grad.mul_((grad_N * valid).unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None


def vocab_parallel_cross_entropy(logits_NV: torch.Tensor, target_N: torch.Tensor, axis: Axis,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-token cross-entropy (``reduction='none'``, 0 where ``target == ignore_index``) from
    logits whose last dim is this rank's vocabulary shard. Equals
    ``F.cross_entropy(full_logits, target, reduction='none')`` in fp32."""
    if logits_NV.dim() != 2 or target_N.shape != logits_NV.shape[:1]:
        raise ValueError(f"expected logits [N, V/{axis.size}] and target [N], got {tuple(logits_NV.shape)} and {tuple(target_N.shape)}")
    return _VocabParallelCrossEntropy.apply(logits_NV, target_N, axis, ignore_index)


def _sharded_log_softmax(logits: torch.Tensor, axis: Axis) -> torch.Tensor:
    """``log_softmax`` over a vocabulary split along the last dim over ``axis`` (this rank's shard)."""
    top = comm.all_reduce(logits.max(dim=-1).values, axis, op=torch.distributed.ReduceOp.MAX)
    shifted = logits - top.unsqueeze(-1)
    total = comm.all_reduce(shifted.exp().sum(dim=-1), axis)
    return shifted - total.log().unsqueeze(-1)


class _VocabParallelKL(torch.autograd.Function):
    """Forward: per-token ``KL(softmax(t / T) || softmax(s / T))`` from vocab-sharded student
    logits ``s`` and teacher logits ``t``; three all-reduces of ``[N]`` vectors per
    distribution and one for the sum. Backward: ``(p_s - p_t) / T`` on the local shard."""

    @staticmethod
    def forward(ctx, student_NV, teacher_NV, axis, temperature):
        log_s = _sharded_log_softmax(student_NV.float() / temperature, axis)
        log_t = _sharded_log_softmax(teacher_NV.float() / temperature, axis)
        p_t = log_t.exp()
        kl = comm.all_reduce((p_t * (log_t - log_s)).sum(dim=-1), axis)
        ctx.save_for_backward(log_s.exp_(), p_t)
        ctx.temperature, ctx.in_dtype = temperature, student_NV.dtype
        return kl

    @staticmethod
    def backward(ctx, grad_N):
        p_s, p_t = ctx.saved_tensors
        grad = (p_s - p_t).mul_(grad_N.unsqueeze(-1) / ctx.temperature)
        return grad.to(ctx.in_dtype), None, None, None


def vocab_parallel_kl(student_NV: torch.Tensor, teacher_NV: torch.Tensor, axis: Axis,
                      temperature: float = 1.0) -> torch.Tensor:
    """Per-token ``KL(teacher || student)`` of the temperature-``T`` softmaxes, both logits split
    over the vocabulary like ``vocab_parallel_cross_entropy``'s; the teacher gets no gradient.
    Equals ``F.kl_div(log_softmax(s / T), log_softmax(t / T), log_target=True, reduction='none').sum(-1)``."""
    if student_NV.shape != teacher_NV.shape or student_NV.dim() != 2:
        raise ValueError(f"expected student and teacher logits [N, V/{axis.size}] alike, got "
                         f"{tuple(student_NV.shape)} and {tuple(teacher_NV.shape)}")
    return _VocabParallelKL.apply(student_NV, teacher_NV.detach(), axis, temperature)
