"""A blocked KV cache: a fixed pool of key/value blocks per attention layer, a free-list allocator,
block tables per sequence, and the ragged batch that tells attention where each token's keys go
and which blocks each sequence reads.

Legend: N tokens in a forward (all sequences' chunks, flattened), P blocks in the pool, b tokens
per block, G kv heads on this rank (G / tp), D head size, S sequences in the batch.

The pool is allocated once, from a byte budget; a sequence holds ``ceil(length / b)`` blocks, the
last one partly filled. Token ``t`` of a sequence lives in slot ``table[t // b] * b + t % b``.
Every rank of a tensor-parallel group keeps the same block tables (the allocator is deterministic
and all ranks see the same requests), each with its own kv heads in the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tedmoe.config import ModelConfig


class BlockAllocator:
    """Hands out block ids from a free list; ``free`` returns them. Lowest ids first, so that every
    rank making the same calls gets the same blocks."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: pop() gives the lowest id

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"KV cache exhausted: {n} blocks wanted, {len(self._free)} free "
                               "(check can_schedule before put)")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


def bytes_per_block(cfg: ModelConfig, tp: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes on one rank, keys and values of every layer."""
    item = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * (cfg.kv_heads // tp) * cfg.head_size * item


class KVCache:
    """Keys and values of every layer: ``k[layer]``, ``v[layer]`` are ``[P, b, G, D]``."""

    def __init__(self, cfg: ModelConfig, tp: int, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device=None):
        if num_blocks < 1:
            raise ValueError(f"the KV cache budget holds {num_blocks} blocks of {block_size} tokens; give it "
                             f"at least {bytes_per_block(cfg, tp, block_size, dtype)} bytes per rank")
        shape = (num_blocks, block_size, cfg.kv_heads // tp, cfg.head_size)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.block_size, self.num_blocks = block_size, num_blocks
        self.allocator = BlockAllocator(num_blocks)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)


@dataclass
class Prefill:
    """One sequence's chunk of more than one token: rows ``[start, start + length)`` of the batch,
    attending to the first ``context`` tokens of the sequence (its cached prefix and the chunk)."""

    start: int
    length: int
    context: int
    table: torch.Tensor  # [ceil(context / b)] block ids


@dataclass
class RaggedBatch:
    """Where a forward's N tokens belong: each token's position and cache slot, the single-token
    (decode) rows batched together, the longer chunks one by one."""

    positions: torch.Tensor  # [N]
    slots: torch.Tensor  # [N] flat slot index in a layer's [P * b] keys
    decode_rows: torch.Tensor  # [Sd] batch rows of the one-token chunks
    decode_tables: torch.Tensor  # [Sd, max blocks] (padded with block 0)
    decode_context: torch.Tensor  # [Sd] tokens each attends to (the chunk's token included)
    prefills: list[Prefill] = field(default_factory=list)
    last_rows: torch.Tensor | None = None  # [S] each sequence's last row (its next-token logits)


def attend(q_NhD: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
           v_cache: torch.Tensor, batch: RaggedBatch) -> torch.Tensor:
    """Write the new keys/values ``[N, G, D]`` into their slots, then causal attention of every
    query over its sequence's cached tokens: ``[N, h, D]`` out."""
    P, b, G, D = k_cache.shape
    k_cache.view(P * b, G, D).index_copy_(0, batch.slots, k_new)
    v_cache.view(P * b, G, D).index_copy_(0, batch.slots, v_new)
    out = torch.empty_like(q_NhD)
    gqa = q_NhD.shape[1] != G
    if len(batch.decode_rows):
        S, nb = batch.decode_tables.shape
        flat = batch.decode_tables.reshape(-1)  # index_select: several times faster than k_cache[tables]
        k = k_cache.index_select(0, flat).view(S, nb * b, G, D).transpose(1, 2)  # [S, G, L, D]
        v = v_cache.index_select(0, flat).view(S, nb * b, G, D).transpose(1, 2)
        q = q_NhD[batch.decode_rows].unsqueeze(2)  # [S, h, 1, D]
        mask = (torch.arange(nb * b, device=q.device)[None, :] < batch.decode_context[:, None])[:, None, None, :]
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        out[batch.decode_rows] = y.squeeze(2)
    for p in batch.prefills:
        nb = len(p.table)
        k = k_cache.index_select(0, p.table).view(nb * b, G, D)[:p.context].transpose(0, 1).unsqueeze(0)  # [1, G, ctx, D]
        v = v_cache.index_select(0, p.table).view(nb * b, G, D)[:p.context].transpose(0, 1).unsqueeze(0)
        q = q_NhD[p.start:p.start + p.length].transpose(0, 1).unsqueeze(0)  # [1, h, len, D]
        if p.context == p.length:  # a whole prompt: plain causal
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:  # a chunk after a cached prefix: query i sees keys up to its own position
            first = p.context - p.length
            mask = torch.arange(p.context, device=q.device)[None, :] <= \
                (first + torch.arange(p.length, device=q.device))[:, None]
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        out[p.start:p.start + p.length] = y[0].transpose(0, 1)
    return out
