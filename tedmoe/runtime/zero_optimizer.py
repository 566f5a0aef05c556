"""ZeRO AdamW (stages 1-3, offload) with the tiled step, exact global-norm clipping and fp16 loss scaling.

Parameters form two groups: non-expert (gradients reduced and states sharded over ``dsp``,
the data x sequence-parallel ranks, which is ``dp`` without sequence parallelism) and expert
(over ``edp``). Each group is one flat, padded buffer; this rank owns the slice
``[rank * shard, (rank + 1) * shard)`` of it along the group's axis and keeps its fp32 master
weights and Adam moments. A step:

1. reduce-scatter the flat gradient buffer (``p.grad`` are views of it) over the axis: each
   rank receives its shard, summed;
2. sum of squares of the shard, counting each element of the model once (elements of
   parameters replicated over ``tp`` count on tp rank 0 only; every element of a shard lives
   on exactly one rank of its axis), then **one** all-reduce over the world: the global norm,
   which is also the fp16 overflow test (inf/nan);
3. walk the shard in tiles of ``tile_size`` elements: upcast, unscale and clip (one factor),
   AdamW on the fp32 master tile, write the tile back in the model dtype, free;
4. all-gather the updated shard over the axis into the parameters.

The tiled and untiled steps do the same elementwise operations, so they agree bit for bit;
the norm is summed in fixed chunks (``NORM_CHUNK``) independent of the tile size.

Stage 2 (``BucketedShard``) reduce-scatters the gradients bucket by bucket during the backward
and keeps only this rank's fp32 gradient shard; stage 3 (``ParameterShard`` units driven by
``Stage3``) shards the parameters per block and axis as well, gathered before use and freed
after. Steps 2 and 3 are the same at every stage. The states live where ``train.offload`` says
(``runtime/offload.py``): the step reads its tiles from there.

Other places the ZeRO-1 step touches: ``parallel/sharding.py`` (``replica_axis`` picks each
parameter's group, ``counted_once`` its norm flags), ``runtime/checkpoint.py`` (saves the
states per parameter, so a checkpoint loads into any layout), ``runtime/engine.py`` (calls
``step`` after the micro-batches), ``planner/predict.py`` (the states' memory and the tile's spike).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import math

import torch
from torch import nn

from tedmoe.config import TrainConfig
from tedmoe.parallel import comm
from tedmoe.parallel.sharding import counted_once, replica_axis
from tedmoe.parallel.topology import Axis, Topology
from tedmoe.runtime.offload import OffloadDirectory, make_states

NORM_CHUNK = 1 << 16


@dataclasses.dataclass
class Offload:
    """Where the groups' optimizer states go (``train.offload``), and the stores made so far."""

    kind: str = "none"
    directory: OffloadDirectory | None = None
    tag: str = "rank0"
    made: list = dataclasses.field(default_factory=list)


class Runs:
    """A boolean vector stored as its true ranges; ``runs[a:b]`` is that slice as a bool tensor."""

    def __init__(self, runs: list[tuple[int, int]], length: int, device=None):
        self.runs, self.length, self.device = runs, length, device
        self.starts = [a for a, _ in runs]

    def __getitem__(self, s: slice) -> torch.Tensor:
        a, b = s.start or 0, min(self.length, self.length if s.stop is None else s.stop)
        out = torch.zeros(b - a, dtype=torch.bool, device=self.device)
        for lo, hi in self.runs[max(bisect.bisect_right(self.starts, a) - 1, 0):]:
            if lo >= b:
                break
            if hi > a:
                out[max(lo, a) - a:min(hi, b) - a] = True
        return out


class FlatShard:
    """One parameter group's ZeRO-1 state on this rank."""

    def __init__(self, params: list[nn.Parameter], axis: Axis, tp: Axis, offload: Offload | None = None):
        self.params, self.axis = params, axis
        self.offload = offload or Offload()
        self._layout(sum(p.numel() for p in params))
        self.dtype = params[0].dtype if params else torch.float32
        device = params[0].device if params else None
        # parameters become views of one flat buffer: updated tiles are written straight into
        # them and the all-gather fills the buffer in place (no shard-sized staging copy)
        self.param_buffer = self._flat([p.detach() for p in params]).to(self.dtype)
        offset = 0
        for p in params:
            p.data = self.param_buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        # per-element flags of this shard: weight decay (matrices), and "counts in the norm"
        self.decay = self._runs([p.dim() >= 2 for p in params], device)
        self.counted = self._runs([counted_once(p, tp.rank) for p in params], device)
        self._own_state()
        self.attach_grads()

    def _pieces(self) -> list[tuple[int, int, int]]:
        """This rank's shard as ``(shard start, flat start, length)`` pieces of the flat buffer."""
        return [(0, self.lo, self.shard)]

    def _runs(self, flags: list[bool], device) -> Runs:
        """A per-parameter flag for every element of this rank's shard (padding: False), kept as
        the shard ranges where it is true rather than one byte per element."""
        starts = [0]
        for p in self.params:
            starts.append(starts[-1] + p.numel())
        runs = []
        for s0, f0, length in self._pieces():
            i = max(bisect.bisect_right(starts, f0) - 1, 0)
            while i < len(self.params) and starts[i] < f0 + length:
                lo, hi = max(starts[i], f0), min(starts[i + 1], f0 + length)
                if flags[i] and hi > lo:
                    a, b = s0 + lo - f0, s0 + hi - f0
                    if runs and runs[-1][1] == a:
                        runs[-1] = (runs[-1][0], b)
                    else:
                        runs.append((a, b))
                i += 1
        return Runs(runs, self.shard, device)

    def _layout(self, numel: int) -> None:
        self.shard = math.ceil(numel / self.axis.size) if self.params else 0
        self.padded = self.shard * self.axis.size
        self.lo = self.axis.rank * self.shard

    def own(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a flat ``[padded]`` tensor (a view)."""
        return flat[self.lo:self.lo + self.shard]

    def _master_alias(self) -> torch.Tensor | None:
        """The tensor that is the fp32 master weights when the parameters are (fp32, not offloaded)."""
        if self.dtype == torch.float32 and self.offload.kind == "none":
            return self.own(self.param_buffer)
        return None

    def _make_states(self) -> None:
        """The fp32 master (unless the parameters are it) and Adam's moments, where ``offload`` says."""
        self._alias = self._master_alias()
        names = [n for n in self.STATES if not (n == "master" and self._alias is not None)]
        self.states = make_states(self.offload.kind, names, self.shard, self.param_buffer.device,
                                  self.offload.directory, f"{self.offload.tag}-{len(self.offload.made)}")
        self.offload.made.append(self.states)
        if "master" in names and self.shard:
            self.states.set("master", self.own(self.param_buffer).float())

    def _state(self, name: str) -> torch.Tensor:
        """A whole state (a copy when it lives on disk)."""
        return self._alias if name == "master" and self._alias is not None else self.states.get(name)

    master = property(lambda self: self._state("master"))
    exp_avg = property(lambda self: self._state("exp_avg"))
    exp_avg_sq = property(lambda self: self._state("exp_avg_sq"))

    def _set_state(self, name: str, value: torch.Tensor) -> None:
        if name == "master" and self._alias is not None:
            self._alias.copy_(value)
        else:
            self.states.set(name, value)

    def _own_state(self) -> None:
        self._make_states()
        # gradients accumulate in place in one flat buffer (``p.grad`` are views of it), so
        # the reduce-scatter reads it directly, with no concatenated copy
        self.grad_buffer = torch.zeros(self.padded, dtype=self.dtype, device=self.param_buffer.device)

    def _write_own(self, a: int, p: torch.Tensor) -> None:
        """Elements ``[a, a + len(p))`` of this rank's shard of the parameters = the updated master."""
        if self._alias is None:
            self.param_buffer[self.lo + a:self.lo + a + p.numel()] = p

    def attach_grads(self) -> None:
        """Point every ``p.grad`` at its slice of the (zeroed) flat gradient buffer."""
        self.grad_buffer.zero_()
        offset = 0
        for p in self.params:
            p.grad = self.grad_buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()

    def _flat(self, tensors: list[torch.Tensor], dtype=None) -> torch.Tensor:
        flat = torch.cat([t.reshape(-1).to(dtype) if dtype else t.reshape(-1) for t in tensors]) if tensors \
            else torch.zeros(0)
        return torch.nn.functional.pad(flat, (0, self.padded - flat.numel()))

    STATES = ("master", "exp_avg", "exp_avg_sq")

    def per_param_states(self) -> dict[str, list[torch.Tensor]]:
        """Each fp32 state gathered over the axis and cut per parameter (shaped like it): the
        layout-independent form that checkpoints hold."""
        return {state: self._per_param(self._gather(getattr(self, state))) for state in self.STATES}

    def _gather(self, shard: torch.Tensor) -> torch.Tensor:
        """Every rank's ``shard`` of a flat tensor, in the flat order."""
        return comm.all_gather(shard, self.axis) if self.params else shard

    def _per_param(self, full: torch.Tensor) -> list[torch.Tensor]:
        out, offset = [], 0
        for p in self.params:
            out.append(full[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        return out

    def load_per_param_states(self, states: dict[str, list[torch.Tensor]]) -> None:
        """Inverse of ``per_param_states``: keep this rank's slice of each state."""
        for state in self.STATES:
            flat = self._flat(states[state], torch.float32)
            self._set_state(state, flat[self.lo:self.lo + self.shard])

    def reduce_grads(self) -> torch.Tensor:
        """Step 1: this rank's shard of the gradient, summed over the axis."""
        offset = 0
        for p in self.params:  # someone may have replaced a view (e.g. zero_grad(set_to_none=True))
            view = self.grad_buffer[offset:offset + p.numel()]
            if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(view))
            offset += p.numel()
        if not self.params:
            return self.grad_buffer
        return comm.reduce_scatter(self.grad_buffer, self.axis)

    def sq_norm(self, grad: torch.Tensor, scale: float) -> torch.Tensor:
        """Step 2 (local part): sum of squares of the counted elements of ``scale * grad``."""
        total = torch.zeros((), dtype=torch.float32, device=grad.device)
        for a in range(0, self.shard, NORM_CHUNK):
            g = grad[a:a + NORM_CHUNK].float() * scale  # a new tensor: never square the gradient in place
            total += g.square_().masked_fill_(~self.counted[a:a + NORM_CHUNK], 0.0).sum()
        return total

    def step(self, grad: torch.Tensor, factor: float, cfg: TrainConfig, lr: float, step: int,
             tile_size: int | None) -> None:
        """Steps 3 and 4."""
        b1, b2 = cfg.betas
        bc1, bc2_sqrt = 1 - b1 ** step, math.sqrt(1 - b2 ** step)
        tile = tile_size or max(self.shard, 1)
        for s, tiles in self.states.tiles(tile):
            p = tiles["master"] if "master" in tiles else self._alias[s]
            m, v = tiles["exp_avg"], tiles["exp_avg_sq"]
            g = grad[s].to(p.device, torch.float32) * factor
            if cfg.weight_decay:
                p.copy_(torch.where(self.decay[s].to(p.device), p * (1 - lr * cfg.weight_decay), p))
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / bc2_sqrt).add_(cfg.eps)
            p.addcdiv_(m, denom, value=-lr / bc1)
            self._write_own(s.start, p)
            del g, denom
        self.publish()

    def publish(self) -> None:
        """Step 4: every rank's updated shard into every rank's parameters."""
        if self.params:
            comm.all_gather_into(self.param_buffer, self.param_buffer[self.lo:self.lo + self.shard], self.axis)

    def micro_batch_done(self) -> None:
        """Called after each micro-batch's backward (ZeRO-1: gradients stay accumulated in place)."""


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
        if not self.shards or self.whole:
            return
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
                u.gather(wait=False, phase=phase)
                if wait:
                    u.ready()

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


class ZeroAdamW:
    """AdamW over a tensor/expert/data-parallel model, ZeRO-sharded (see the module docstring)."""

    def __init__(self, model: nn.Module, topology: Topology, config: TrainConfig, materialize=None):
        config.validate()
        if materialize is not None and config.zero_stage != 3:
            raise ValueError("only ZeRO-3 builds a model from the meta device (train.zero_stage=3)")
        self.config, self.topology = config, topology
        params = [p for p in model.parameters() if p.requires_grad]
        tp = topology.axis("tp")
        directory = OffloadDirectory(config.offload_path, topology.rank) if config.offload == "disk" else None
        self.offload = Offload(config.offload, directory, f"rank{topology.rank}")
        # one group per replica axis: non-expert parameters over dsp, then experts over edp
        self.stage3 = None
        if config.zero_stage == 3:
            self.stage3 = Stage3(model, params, topology, self.offload, materialize)
            self.groups = self.stage3.units
        elif config.zero_stage == 2:
            self.groups = [BucketedShard([p for p in params if replica_axis(p) == axis], topology.axis(axis), tp,
                                         config.reduce_bucket_size, self.offload) for axis in ("dsp", "edp")]
        else:
            self.groups = [FlatShard([p for p in params if replica_axis(p) == axis], topology.axis(axis), tp,
                                     self.offload) for axis in ("dsp", "edp")]
        self.loss_scale = config.initial_loss_scale if config.precision == "fp16" else 1.0
        self.good_steps = 0
        self.step_count = 0
        self.bad_in_a_row = 0

    def close(self) -> None:
        """Release what offloading holds (its files and their directory); idempotent."""
        for states in self.offload.made:
            states.close()
        if self.offload.directory is not None:
            self.offload.directory.close()

    def lr_at(self, step: int) -> float:
        """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""
        c = self.config
        if step <= c.warmup_steps and c.warmup_steps > 0:
            return c.lr * step / c.warmup_steps
        progress = min(1.0, (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps))
        return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def micro_batch_done(self) -> None:
        """After each micro-batch's backward: ZeRO-2 sends the gradient buckets still open."""
        for g in self.groups:
            g.micro_batch_done()
        if self.stage3 is not None:
            self.stage3.release()

    def whole_parameters(self, loading: bool = False):
        """A context in which every parameter is whole (ZeRO-3 gathers them; other stages keep
        them whole anyway). ``loading``: what is written into them inside is kept."""
        return self.stage3.whole(loading) if self.stage3 is not None else contextlib.nullcontext()

    def step(self, num_micro_batches: int) -> dict[str, float]:
        """Reduce, clip and apply the accumulated gradients of ``num_micro_batches`` micro-batches
        per rank. Returns the step's grad norm, lr, loss scale and whether it was skipped."""
        c = self.config
        with comm.LEDGER.phase("step"):
            grads = [g.reduce_grads() for g in self.groups]
            # mean over the global batch (dp ranks x micro-batches; SP ranks' losses add up to a
            # sequence's) and undo the loss scale
            scale = 1.0 / (self.topology.size("dp") * num_micro_batches * self.loss_scale)
            sq = sum(g.sq_norm(gr, scale) for g, gr in zip(self.groups, grads))
            norm = math.sqrt(comm.all_reduce(sq, self.topology.axis("world")).item())
            if not math.isfinite(norm):  # every rank sees the same norm, so all skip or stop together
                for g in self.groups:
                    g.attach_grads()
                if c.precision != "fp16":
                    self.bad_in_a_row += 1
                    if self.bad_in_a_row > c.max_bad_steps:
                        raise FloatingPointError(
                            f"gradient norm is {norm} at step {self.step_count + 1} ({c.precision}; "
                            f"{self.bad_in_a_row} bad step(s) in a row, train.max_bad_steps={c.max_bad_steps})")
                else:
                    self.loss_scale /= 2
                    self.good_steps = 0
                return {"grad_norm": norm, "lr": self.lr_at(self.step_count + 1), "loss_scale": self.loss_scale,
                        "skipped": True}
            self.bad_in_a_row = 0
            clip = 1.0
            if c.grad_clip is not None:
                clip = min(1.0, c.grad_clip / (norm + 1e-6))
            self.step_count += 1
            lr = self.lr_at(self.step_count)
            for g, gr in zip(self.groups, grads):
                g.step(gr, scale * clip, c, lr, self.step_count, c.tile_size)
            del grads
        for g in self.groups:
            g.attach_grads()
        if c.precision == "fp16":
            self.good_steps += 1
            if self.good_steps % c.loss_scale_window == 0:
                self.loss_scale *= 2
        return {"grad_norm": norm, "lr": lr, "loss_scale": self.loss_scale, "skipped": False}
