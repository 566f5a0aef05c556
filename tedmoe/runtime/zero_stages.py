"""ZeRO stages 2 and 3: gradients (``BucketedShard``) and parameters (``ParameterShard``,
driven per block by ``Stage3``) sharded on top of ZeRO-1's ``FlatShard``, whose optimizer step
(``runtime/zero_optimizer.py``) they share. ``ZeroAdamW`` picks the stage
(``train.zero_stage``)."""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch import nn

from tedmoe.parallel import comm
from tedmoe.parallel.sharding import replica_axis
from tedmoe.parallel.topology import Axis, Topology
from tedmoe.runtime.zero_optimizer import FlatShard, Offload


class BucketedShard(FlatShard):
    """ZeRO-2: one parameter group whose gradients are never kept whole.

    The flat buffer is cut into buckets of ``B`` elements (``B`` a multiple of the axis size
    ``n``); this rank owns the ``r``-th ``B / n`` slice of every bucket (its shard: those slices,
    in bucket order). During the backward, a hook takes each parameter's gradient as soon as it
    is accumulated (and frees it) into its bucket; a bucket whose parameters have all arrived is
    reduce-scattered and added into this rank's shard-sized gradient, in descending bucket order
    on every rank (the backward produces the last parameters first), so the ranks' collectives
    always match. ``micro_batch_done`` sends the buckets still open (parameters that got no
    gradient count as zeros). The step is ZeRO-1's on the shard; the updated slices are
    all-gathered bucket by bucket into the parameters.
    """

    def __init__(self, params: list[nn.Parameter], axis: Axis, tp: Axis, bucket_size: int,
                 offload: Offload | None = None):
        n = axis.size
        numel = sum(p.numel() for p in params)
        self.bucket = max(n, math.ceil(min(bucket_size, max(numel, 1)) / n) * n)
        self.buckets = math.ceil(numel / self.bucket) if params else 0
        self.piece = self.bucket // n
        super().__init__(params, axis, tp, offload)

    def _pieces(self) -> list[tuple[int, int, int]]:
        return [(k * self.piece, k * self.bucket + self.axis.rank * self.piece, self.piece)
                for k in range(self.buckets)]

    def _layout(self, numel: int) -> None:
        self.padded = self.buckets * self.bucket
        self.shard = self.buckets * self.piece
        self.lo = None  # not one contiguous range: a slice of every bucket

    def own(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's slices of a flat ``[padded]`` tensor, as its ``[shard]`` (a copy)."""
        return flat.view(self.buckets, self.axis.size, self.piece)[:, self.axis.rank].reshape(-1)

    def unown(self, gathered: torch.Tensor) -> torch.Tensor:
        """Every rank's shards ``[n * shard]`` (rank-major) back into the flat order ``[padded]``."""
        return gathered.view(self.axis.size, self.buckets, self.piece).transpose(0, 1).reshape(-1)

    def _master_alias(self) -> torch.Tensor | None:
        return None  # this rank's slices are not one contiguous range of the parameters

    def _own_state(self) -> None:
        self._make_states()
        self.grad_shard = torch.zeros(self.shard, dtype=torch.float32, device=self.param_buffer.device)
        self.offsets, offset = {}, 0
        self.waiting = [0] * self.buckets  # per bucket: parameters (pieces) it still waits for
        for p in self.params:
            self.offsets[p] = offset
            for k in range(offset // self.bucket, (offset + p.numel() - 1) // self.bucket + 1):
                self.waiting[k] += 1
            offset += p.numel()
            p.register_post_accumulate_grad_hook(self._arrived)
        self.expected = list(self.waiting)
        self.staging: dict[int, torch.Tensor] = {}
        self.next = self.buckets - 1
        self.arrived: set = set()

    def attach_grads(self) -> None:
        self.grad_shard.zero_()
        for p in self.params:
            p.grad = None

    def _arrived(self, p: nn.Parameter) -> None:
        if p in self.arrived:
            raise RuntimeError("ZeRO-2: a parameter's gradient arrived twice in one micro-batch; call the "
                               "optimizer's micro_batch_done() after each backward")
        self.arrived.add(p)
        g, p.grad = p.grad.reshape(-1), None
        lo = self.offsets[p]
        hi = lo + g.numel()
        for k in range(lo // self.bucket, (hi - 1) // self.bucket + 1):
            a, b = max(lo, k * self.bucket), min(hi, (k + 1) * self.bucket)
            if k not in self.staging:
                self.staging[k] = torch.zeros(self.bucket, dtype=g.dtype, device=g.device)
            self.staging[k][a - k * self.bucket:b - k * self.bucket] += g[a - lo:b - lo]
            self.waiting[k] -= 1
        while self.next >= 0 and self.waiting[self.next] == 0:
            self._send(self.next)

    def _send(self, k: int) -> None:
        """Reduce-scatter bucket ``k`` (zeros if nothing arrived) into this rank's gradient shard."""
        bucket = self.staging.pop(k, None)
        if bucket is None:
            bucket = torch.zeros(self.bucket, dtype=self.dtype, device=self.grad_shard.device)
        piece = comm.reduce_scatter(bucket, self.axis, phase="bwd")
        self.grad_shard[k * self.piece:(k + 1) * self.piece] += piece.float()
        self.next = k - 1

    def micro_batch_done(self) -> None:
        while self.next >= 0:
            self._send(self.next)
        self.next, self.waiting, self.arrived = self.buckets - 1, list(self.expected), set()

    def reduce_grads(self) -> torch.Tensor:
        if self.arrived:  # a caller that ran a backward without micro_batch_done()
            self.micro_batch_done()
        return self.grad_shard

    def _write_own(self, a: int, p: torch.Tensor) -> None:
        mine = self.param_buffer.view(self.buckets, self.axis.size, self.piece)[:, self.axis.rank]
        i, end = a, a + p.numel()
        while i < end:  # the tile may span buckets
            k, o = divmod(i, self.piece)
            c = min(self.piece - o, end - i)
            mine[k, o:o + c] = p[i - a:i - a + c]
            i += c

    def publish(self) -> None:
        if not self.params:
            return
        view = self.param_buffer.view(self.buckets, self.axis.size, self.piece)
        for k in range(self.buckets):
            comm.all_gather_into(view[k].reshape(-1), view[k, self.axis.rank], self.axis)

    def _gather(self, shard: torch.Tensor) -> torch.Tensor:
        return self.unown(comm.all_gather(shard, self.axis)) if self.params else shard

    def load_per_param_states(self, states: dict[str, list[torch.Tensor]]) -> None:
        for state in self.STATES:
            self._set_state(state, self.own(self._flat(states[state], torch.float32)))

    def gradients(self) -> list[torch.Tensor]:
        """The accumulated gradient of every parameter, summed over the axis (tests, debugging)."""
        if self.arrived:
            self.micro_batch_done()
        return self._per_param(self._gather(self.grad_shard))


class ParameterShard(BucketedShard):
    """ZeRO-3: one unit of parameters (a block's non-expert or expert parameters, or the
    parameters outside the blocks) that exists whole only while it is used.

    The unit is one bucket: this rank keeps the contiguous ``[shard]`` slice of its flat buffer
    (``param_shard``, in the model dtype; with fp32 parameters it is also the master weights)
    and the buffer's storage is released (``resize_(0)``) while the unit is not in use, so the
    parameters keep their shapes but hold no memory. ``gather`` all-gathers the slices back into
    the buffer (in the background with ``wait=False``; ``ready`` completes it); ``free`` releases
    it. The backward reduce-scatters the unit's gradient as ZeRO-2 does a bucket, then frees the
    parameters. The step updates ``param_shard`` only: no all-gather after it."""

    def __init__(self, params: list[nn.Parameter], axis: Axis, tp: Axis, offload: Offload | None = None):
        super().__init__(params, axis, tp, 1 << 62, offload)
        self.whole, self.pending, self._source = True, None, None
        self.free()

    def _own_state(self) -> None:
        self.shards = self.axis.size > 1 and bool(self.params)  # an axis of size 1: always whole, never gathered
        own = self.own(self.param_buffer)  # one bucket: this rank's contiguous slice (a view)
        # offloaded (host memory or disk), the fp32 master is the shard's only copy: the gather reads it
        offloaded = self.offload.kind != "none" and self.shards
        self.param_shard = None if offloaded else own.clone() if self.shards else own
        super()._own_state()

    def _master_alias(self) -> torch.Tensor | None:
        if self.dtype == torch.float32 and self.offload.kind == "none":
            return self.param_shard  # fp32 parameters are the master weights
        return None

    def _write_own(self, a: int, p: torch.Tensor) -> None:
        if self.param_shard is not None and self._alias is None:
            self.param_shard[a:a + p.numel()] = p

    def gather(self, wait: bool = True, phase: str | None = None) -> None:
        """Make the unit whole (start its all-gather unless whole or already started); ``wait``:
        also complete it, a prefetch started earlier included."""
        if self.shards and not self.whole:
            self.param_buffer.untyped_storage().resize_(self.padded * self.param_buffer.element_size())
            source = self.param_shard
            if source is None:  # offloaded: from the master in host memory or the file
                source = self.states.get("master").to(self.param_buffer.device, self.dtype)
            self._source = source  # alive until the gather completes
            self.pending = comm.all_gather_into_async(self.param_buffer, source, self.axis, phase)
            self.whole = True
        if wait:
            self.ready()

    def ready(self) -> None:
        """Complete a background gather (if one is running)."""
        if self.pending is not None:
            self.pending.wait()
            self.pending, self._source = None, None

    def free(self) -> None:
        if self.shards and self.whole:
            self.ready()
            self.param_buffer.untyped_storage().resize_(0)
            self.whole = False

    def _send(self, k: int) -> None:
        super()._send(k)
        self.free()  # the unit's backward is over: its gradient has all arrived

    def publish(self) -> None:
        """Nothing: the step wrote this rank's shard; the next gather spreads it."""

    def keep_loaded(self) -> None:
        """After parameters were written into the gathered buffer (a checkpoint load, an
        initialisation): keep this rank's slice of them as its shard and master weights."""
        loaded = self.own(self.param_buffer)
        if self.param_shard is not None:
            self.param_shard.copy_(loaded)
        if self._alias is None and self.shard:
            self._set_state("master", loaded.float())


class Stage3:
    """Gathers each unit just before use and frees it after (ZeRO-3). Units: per block of
    ``model.blocks``, its non-expert parameters (over ``dsp``) and its experts (over ``edp``);
    the parameters outside the blocks (embedding, final norm, head) form the root units, gathered
    when the embedding runs and kept until their gradients are reduced (or, without autograd,
    until the head has run). Forward: block ``i``'s units are gathered (waited for) in its
    pre-hook, block ``i + 1``'s gather starts in the background, and ``i``'s are freed after it
    ran. Backward: when the first gradient of block ``i``'s outputs is computed, its units are
    gathered again and block ``i - 1``'s gather starts; a unit is freed once all its parameters'
    gradients have been reduced. Every rank runs the same graph, so the collectives are
    issued in the same order on all of them. A model built on the meta device gets its values
    unit by unit (``materialize``), each sharded and freed before the next is made."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter], topology: Topology, offload: Offload,
                 materialize=None):
        tp = topology.axis("tp")
        wanted = {id(p) for p in params}
        device = next((p.device for p in model.parameters() if not p.is_meta),
                      next((b.device for b in model.buffers()), torch.device("cpu")))

        def units(ps):
            ps = list(ps)
            empty = [p for p in ps if p.is_meta]  # a model built on the meta device: one unit at a time
            if empty:
                if materialize is None:
                    raise ValueError("the model has parameters on the meta device; pass materialize= to give them "
                                     "values")
                for p in empty:  # a meta tensor cannot take real data: swap in a real parameter, attributes kept
                    real = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), p.requires_grad)
                    real.__dict__.update(p.__dict__)
                    torch.utils.swap_tensors(p, real)
                materialize(empty)
            ps = [p for p in ps if id(p) in wanted]
            return [ParameterShard([p for p in ps if replica_axis(p) == axis], topology.axis(axis), tp, offload)
                    for axis in ("dsp", "edp")]

        blocks = list(getattr(model, "blocks", []))
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        self.root = units([p for p in model.parameters() if id(p) not in in_blocks])
        self.blocks = [units(b.parameters()) for b in blocks]
        self.units = self.root + [u for b in self.blocks for u in b]
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(functools.partial(self._before, i))
            block.register_forward_hook(functools.partial(self._after, i))
        first, last = getattr(model, "embed", None), getattr(model, "head", None)
        if first is not None:
            first.register_forward_pre_hook(self._root_before)
        if last is not None:
            last.register_forward_hook(self._root_after)

    def _root_before(self, module, args) -> None:
        for u in self.root:
            u.gather()

    def _root_after(self, module, args, out) -> None:
        if not torch.is_grad_enabled():  # with autograd: freed once their gradients are reduced
            for u in self.root:
                u.free()

    def _gather_block(self, i: int, wait: bool, phase: str | None = None) -> None:
        if 0 <= i < len(self.blocks):
            for u in self.blocks[i]:
                u.gather(wait, phase)

    def _before(self, i: int, module=None, args=None) -> None:
        self._gather_block(i, wait=True)
        self._gather_block(i + 1, wait=False)  # prefetch: overlaps block i's compute

    def _after(self, i: int, module, args, out) -> None:
        for u in self.blocks[i]:
            u.free()
        if torch.is_grad_enabled():
            tensors = [t for t in (out if isinstance(out, tuple) else (out,))
                       if isinstance(t, torch.Tensor) and t.requires_grad]
            if tensors:
                torch.autograd.graph.register_multi_grad_hook(tensors, lambda grads, i=i: self._backward(i),
                                                              mode="any")

    def _backward(self, i: int) -> None:
        self._gather_block(i, wait=True, phase="bwd")
        self._gather_block(i - 1, wait=False, phase="bwd")

    def release(self) -> None:
        """After a micro-batch's backward: nothing stays gathered."""
        for u in self.units:
            u.free()

    @contextlib.contextmanager
    def whole(self, loading: bool = False):
        """Every parameter whole inside (checkpoints); ``loading``: keep what was written into them."""
        for u in self.units:
            u.gather()
        try:
            yield
        finally:
            for u in self.units:
                if loading:
                    u.keep_loaded()
                u.free()
