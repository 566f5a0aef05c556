"""ZeRO-1 AdamW with the tiled step, exact global-norm clipping and fp16 loss scaling.

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

Other places the ZeRO-1 step touches: ``parallel/sharding.py`` (``replica_axis`` picks each
parameter's group, ``counted_once`` its norm flags), ``runtime/checkpoint.py`` (saves the
states per parameter, so a checkpoint loads into any layout), ``runtime/engine.py`` (calls
``step`` after the micro-batches), ``planner/predict.py`` (the states' memory and the tile's spike).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tedmoe.config import TrainConfig
from tedmoe.parallel import comm
from tedmoe.parallel.sharding import counted_once, replica_axis
from tedmoe.parallel.topology import Axis, Topology

NORM_CHUNK = 1 << 16


class FlatShard:
    """One parameter group's ZeRO-1 state on this rank."""

    def __init__(self, params: list[nn.Parameter], axis: Axis, tp: Axis):
        self.params, self.axis = params, axis
        numel = sum(p.numel() for p in params)
        self.shard = math.ceil(numel / axis.size) if params else 0
        self.padded = self.shard * axis.size
        self.lo = axis.rank * self.shard
        self.dtype = params[0].dtype if params else torch.float32
        device = params[0].device if params else None
        # parameters become views of one flat buffer: updated tiles are written straight into
        # them and the all-gather fills the buffer in place (no shard-sized staging copy)
        self.param_buffer = self._flat([p.detach() for p in params]).to(self.dtype)
        offset = 0
        for p in params:
            p.data = self.param_buffer[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        own = self.param_buffer[self.lo:self.lo + self.shard]
        self.master = own if self.dtype == torch.float32 else own.float()  # fp32: the parameters are the master
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        # per-element flags of this shard: weight decay (matrices), and "counts in the norm"
        decay = self._flat([torch.full((p.numel(),), float(p.dim() >= 2), device=device) for p in params])
        counted = self._flat([torch.full((p.numel(),), float(counted_once(p, tp.rank)), device=device)
                              for p in params])
        self.decay = decay[self.lo:self.lo + self.shard].bool()
        self.counted = counted[self.lo:self.lo + self.shard].bool()
        # gradients accumulate in place in one flat buffer (``p.grad`` are views of it), so
        # the reduce-scatter reads it directly, with no concatenated copy
        self.grad_buffer = torch.zeros(self.padded, dtype=self.dtype, device=device)
        self.attach_grads()

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
        out = {}
        for state in self.STATES:
            full = comm.all_gather(getattr(self, state), self.axis) if self.params else self.master
            out[state], offset = [], 0
            for p in self.params:
                out[state].append(full[offset:offset + p.numel()].view(p.shape))
                offset += p.numel()
        return out

    def load_per_param_states(self, states: dict[str, list[torch.Tensor]]) -> None:
        """Inverse of ``per_param_states``: keep this rank's slice of each state."""
        for state in self.STATES:
            flat = self._flat(states[state], torch.float32)
            getattr(self, state).copy_(flat[self.lo:self.lo + self.shard])

    def reduce_grads(self) -> torch.Tensor:
        """Step 1: this rank's shard of the gradient, summed over the axis."""
        offset = 0
        for p in self.params:  # someone may have replaced a view (e.g. zero_grad(set_to_none=True))
            view = self.grad_buffer[offset:offset + p.numel()]
            if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(view))
            offset += p.numel()
        if not self.params:
            return self.master
        return comm.reduce_scatter(self.grad_buffer, self.axis)

    def sq_norm(self, grad: torch.Tensor, scale: float) -> torch.Tensor:
        """Step 2 (local part): sum of squares of the counted elements of ``scale * grad``."""
        total = torch.zeros((), dtype=torch.float32, device=self.master.device)
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
        own = self.param_buffer[self.lo:self.lo + self.shard]
        for a in range(0, self.shard, tile):
            s = slice(a, a + tile)
            p, m, v = self.master[s], self.exp_avg[s], self.exp_avg_sq[s]
            g = grad[s].float() * factor
            if cfg.weight_decay:
                p.copy_(torch.where(self.decay[s], p * (1 - lr * cfg.weight_decay), p))
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / bc2_sqrt).add_(cfg.eps)
            p.addcdiv_(m, denom, value=-lr / bc1)
            if p.data_ptr() != own[s].data_ptr():
                own[s] = p
            del g, denom
        if self.params:
            comm.all_gather_into(self.param_buffer, own, self.axis)


class ZeroAdamW:
    """AdamW over a tensor/expert/data-parallel model, ZeRO-1 sharded (see the module docstring)."""

    def __init__(self, model: nn.Module, topology: Topology, config: TrainConfig):
        config.validate()
        self.config, self.topology = config, topology
        params = [p for p in model.parameters() if p.requires_grad]
        tp = topology.axis("tp")
        # one group per replica axis: non-expert parameters over dsp, then experts over edp
        self.groups = [FlatShard([p for p in params if replica_axis(p) == axis], topology.axis(axis), tp)
                       for axis in ("dsp", "edp")]
        self.loss_scale = config.initial_loss_scale if config.precision == "fp16" else 1.0
        self.good_steps = 0
        self.step_count = 0
        self.bad_in_a_row = 0

    def lr_at(self, step: int) -> float:
        """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``."""
        c = self.config
        if step <= c.warmup_steps and c.warmup_steps > 0:
            return c.lr * step / c.warmup_steps
        progress = min(1.0, (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps))
        return c.lr * (c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

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
