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

Stage 2 (``BucketedShard``, in ``runtime/zero_stages.py``) reduce-scatters the gradients bucket by
bucket during the backward and keeps only this rank's fp32 gradient shard; stage 3
(``ParameterShard`` units driven by ``Stage3``, same file) shards the parameters per block and
axis as well, gathered before use and freed after. Steps 2 and 3 are the same at every stage.
The states live where ``train.offload`` says (``runtime/offload.py``): the step reads its tiles
from there.

Other places the ZeRO-1 step touches: ``parallel/sharding.py`` (``replica_axis`` picks each
parameter's group, ``counted_once`` its norm flags), ``runtime/checkpoint.py`` (saves the
states per parameter, so a checkpoint loads into any layout), ``runtime/engine.py`` (calls
``step`` after the micro-batches), ``planner/predict.py`` (the states' memory and the tile's spike).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
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
        from tedmoe.runtime.zero_stages import BucketedShard, Stage3  # they build on FlatShard, defined here

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
        """After each micro-batch's backward: ZeRO-2/3 send the gradient buckets still open, and
        ZeRO-3 frees whatever is still gathered."""
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
