"""The inference engine: ragged batches over a blocked KV cache, on one process or many.

``put(uids, chunks)`` runs one forward over every sequence's next chunk at once (whole prompts,
pieces of prompts that continue a cached prefix, single decode tokens, mixed) and returns each
sequence's next-token logits; ``can_schedule`` says beforehand whether the cache holds what a
``put`` needs (running out is never a crash in the forward); ``query`` tells a sequence's state;
``flush`` frees its blocks.

Across ranks (TP x EP, launched by torchrun): rank 0 is the leader. Its ``put``/``flush`` calls are
broadcast on a control group (gloo, with a long timeout, so idle followers wait quietly) and every
rank runs the same forward with its shards: attention heads and dense MLPs split over ``tp``, experts
over ``ep`` (dropless all-to-all per MoE layer). The other ranks call ``follow()``, which returns
when the leader calls ``stop()``. Every rank keeps the same block tables (same calls, same
deterministic allocator), each with its own kv heads in the blocks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from tedmoe.inference.kv_cache import KVCache, Prefill, RaggedBatch, bytes_per_block


@dataclass
class SequenceState:
    """What the cache holds for one sequence: ``length`` tokens in ``blocks``."""

    length: int = 0
    blocks: list[int] = field(default_factory=list)


def inference_config(cfg, routing: str = "dropless"):
    """The model config to serve with: ``dropless`` (every routed token computed, the default) or
    ``training`` (the capacity the model was trained with, for evaluation)."""
    if routing not in ("dropless", "training"):
        raise ValueError(f"routing={routing!r}: use 'dropless' (serving) or 'training' (the training-time capacity)")
    if routing == "dropless":
        return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dropless=True))
    return cfg


class InferenceEngine:
    """Serve ``model`` (a ``GPTMoE`` of any TP x EP layout, ``sp = 1``) with a KV cache of
    ``num_blocks`` blocks of ``block_size`` tokens, or as many as ``kv_bytes`` per rank holds."""

    def __init__(self, model, *, block_size: int = 16, num_blocks: int | None = None, kv_bytes: int | None = None,
                 control_timeout: timedelta = timedelta(days=7)):
        topo = model.topology
        if topo.size("sp") > 1:
            raise ValueError("the inference engine runs TP x EP layouts; set parallel.sp=1 (sequence parallelism "
                             "is for training long sequences)")
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1 (e.g. 16)")
        if (num_blocks is None) == (kv_bytes is None):
            raise ValueError("give the KV cache either num_blocks or kv_bytes")
        self.model = model.eval()
        self.config, self.topology = model.config, topo
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        per_block = bytes_per_block(self.config, topo.size("tp"), block_size, self.dtype)
        self.bytes_per_token = per_block // block_size
        if num_blocks is None:
            num_blocks = int(kv_bytes // per_block)
        self.cache = KVCache(self.config, topo.size("tp"), num_blocks, block_size, self.dtype, self.device)
        self.seqs: dict[int, SequenceState] = {}
        self.rank = torch.distributed.get_rank() if topo.world_size > 1 else 0
        self._control = None
        if topo.world_size > 1:
            self._control = torch.distributed.new_group(backend="gloo", timeout=control_timeout)

    # ---- the leader's API -------------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return self.cache.capacity_tokens

    @property
    def free_blocks(self) -> int:
        return self.cache.allocator.free_blocks

    def query(self, uid: int) -> SequenceState | None:
        """The cached state of ``uid`` (tokens and blocks), or ``None`` if the engine holds none."""
        return self.seqs.get(uid)

    def blocks_needed(self, uid: int, tokens: int) -> int:
        """More blocks ``uid`` needs to take ``tokens`` more tokens."""
        state = self.seqs.get(uid, SequenceState())
        return self.cache.blocks_for(state.length + tokens) - len(state.blocks)

    def can_schedule(self, uids: list[int], lengths: list[int]) -> bool:
        """Whether ``put`` of chunks of these lengths fits: enough free blocks for all of them, and
        every sequence within the model's ``max_seq_len``."""
        need = 0
        for uid, n in zip(uids, lengths):
            state = self.seqs.get(uid, SequenceState())
            if state.length + n > self.config.max_seq_len:
                return False
            need += self.blocks_needed(uid, n)
        return need <= self.free_blocks

    def put(self, uids: list[int], chunks: list[list[int]]) -> torch.Tensor:
        """One forward over the next chunk of each sequence; ``[len(uids), V]`` next-token logits
        (float32). A new uid starts a sequence. ``ValueError`` (before any rank computes anything)
        for a bad request or one that does not fit (see ``can_schedule``)."""
        self._check(uids, chunks)
        self._broadcast(("put", list(uids), [list(map(int, c)) for c in chunks]))
        return self._put(uids, chunks)

    def flush(self, uid: int) -> None:
        """Forget ``uid`` and free its blocks (unknown uids are ignored)."""
        self._broadcast(("flush", uid))
        self._flush(uid)

    def stop(self) -> None:
        """Leader: release the followers (their ``follow`` returns)."""
        self._broadcast(("stop",))

    # ---- followers --------------------------------------------------------------------------
    def follow(self) -> None:
        """Non-leader ranks: run the leader's calls until it stops."""
        while True:
            (op,) = self._receive()
            if op[0] == "put":
                self._put(op[1], op[2])
            elif op[0] == "flush":
                self._flush(op[1])
            else:
                return

    # ---- internals --------------------------------------------------------------------------
    def _broadcast(self, op) -> None:
        if self._control is not None:
            torch.distributed.broadcast_object_list([op], src=0, group=self._control)

    def _receive(self):
        box = [None]
        torch.distributed.broadcast_object_list(box, src=0, group=self._control)
        return box

    def _check(self, uids, chunks) -> None:
        if len(uids) != len(chunks):
            raise ValueError(f"{len(uids)} uids but {len(chunks)} chunks; give one chunk per uid")
        if len(set(uids)) != len(uids):
            raise ValueError("a uid appears twice in one put; give each sequence one chunk per forward")
        if not uids:
            raise ValueError("put needs at least one sequence")
        V = self.config.vocab_size
        for uid, chunk in zip(uids, chunks):
            if len(chunk) == 0:
                raise ValueError(f"uid {uid}: empty chunk; give at least one token")
            if any(not 0 <= int(t) < V for t in chunk):
                raise ValueError(f"uid {uid}: token ids outside the model's vocabulary of {V}")
            length = self.seqs.get(uid, SequenceState()).length + len(chunk)
            if length > self.config.max_seq_len:
                raise ValueError(f"uid {uid}: {length} tokens exceed the model's max_seq_len="
                                 f"{self.config.max_seq_len}")
        if not self.can_schedule(uids, [len(c) for c in chunks]):
            need = sum(self.blocks_needed(u, len(c)) for u, c in zip(uids, chunks))
            raise ValueError(f"the KV cache has {self.free_blocks} free blocks and this put needs {need}; "
                             "check can_schedule first, or flush finished sequences")

    def _put(self, uids, chunks) -> torch.Tensor:
        b, dev = self.cache.block_size, self.device
        ids, positions, slots, last = [], [], [], []
        decode_rows, decode_tables, decode_context, prefills = [], [], [], []
        row = 0
        for uid, chunk in zip(uids, chunks):
            state = self.seqs.setdefault(uid, SequenceState())
            n = len(chunk)
            state.blocks += self.cache.allocator.allocate(self.blocks_needed(uid, n))
            pos = torch.arange(state.length, state.length + n)
            table = torch.tensor(state.blocks)
            ids.append(torch.as_tensor(chunk, dtype=torch.long))
            positions.append(pos)
            slots.append(table[pos // b] * b + pos % b)
            context = state.length + n
            used = table[:self.cache.blocks_for(context)]
            if n == 1:
                decode_rows.append(row)
                decode_tables.append(used)
                decode_context.append(context)
            else:
                prefills.append(Prefill(row, n, context, used.to(dev)))
            row += n
            last.append(row - 1)
            state.length = context
        width = max((len(t) for t in decode_tables), default=0)
        padded = torch.zeros(len(decode_tables), width, dtype=torch.long)
        for i, t in enumerate(decode_tables):
            padded[i, :len(t)] = t
        batch = RaggedBatch(positions=torch.cat(positions).to(dev), slots=torch.cat(slots).to(dev),
                            decode_rows=torch.tensor(decode_rows, dtype=torch.long, device=dev),
                            decode_tables=padded.to(dev), decode_context=torch.tensor(decode_context, device=dev),
                            prefills=prefills, last_rows=torch.tensor(last, device=dev))
        return self.model.forward_cached(torch.cat(ids).to(dev), batch, self.cache).float()

    def _flush(self, uid: int) -> None:
        state = self.seqs.pop(uid, None)
        if state is not None:
            self.cache.allocator.free(state.blocks)
