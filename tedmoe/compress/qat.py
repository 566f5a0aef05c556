"""Quantisation-aware training and structured sparsity: the forward uses transformed weights, the
backward passes the gradient straight through to the float weights (the straight-through
estimator), which the optimizer keeps updating.

- ``binary`` (XTC's 1-bit weights): ``sign(w) * mean|w|`` per output row.
- ``ternary`` (XTC's 2-bit, after TWN): with ``d = 0.7 mean|w|`` per row, weights with ``|w| > d``
  become ``sign(w) * a`` (``a`` their mean magnitude), the others 0.
- ``int8`` / ``int4`` (for ZeroQuant's layer-by-layer distillation, ``tedmoe.compress.lkd``): the
  weight quantised and dequantised exactly as ``tedmoe compress`` stores it (group-wise
  symmetric), one process only.
- ``nm`` (N:M sparsity): of every M consecutive input weights of a row, the N largest in magnitude
  are kept; the masks are recomputed every ``refresh_every`` training steps (and kept between);
  checkpoints keep them (``masks``), so a resumed run continues with the masks it had.

Which weights: the same as post-training compression (``tedmoe.compress.model``): the blocks'
linear and expert weights. A row's statistics run over all its input columns; where tensor
parallelism splits the inputs (row-parallel layers, the experts' ``w2``) the sums are all-reduced
over ``tp``, so every layout computes the single-process weights. N:M groups never straddle two
ranks' columns (``M`` must divide each rank's share).
"""

from __future__ import annotations

import torch

from tedmoe.parallel import comm

THRESHOLD = 0.7


class _StraightThrough(torch.autograd.Function):
    """Forward: the transformed weight; backward: the gradient unchanged, to the float weight."""

    @staticmethod
    def forward(ctx, w, transformed):
        return transformed

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _row_sum(x: torch.Tensor, in_dim: int, axis) -> torch.Tensor:
    """Sum over the input dim, completed over ``axis`` when it splits that dim (``axis`` None: local)."""
    s = x.sum(in_dim, keepdim=True)
    return s if axis is None else comm.all_reduce(s, axis)


class WeightTransform:
    """The forward's weight for one parameter. ``in_dim`` is its input (K) dimension; ``axis`` the
    tp axis when that dimension is split over it, else ``None``; ``inputs`` the full K."""

    def __init__(self, method: str, in_dim: int, inputs: int, axis=None, n: int = 2, m: int = 4,
                 refresh_every: int = 100, group_size: int = 128):
        self.method, self.in_dim, self.inputs, self.axis = method, in_dim, inputs, axis
        self.n, self.m, self.refresh_every, self.group_size = n, m, refresh_every, group_size
        self.mask: torch.Tensor | None = None
        self.step = 0  # set by the trainer before each step (mask refresh)
        self._mask_step = -1

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self._target(w.detach())
        return _StraightThrough.apply(w, target)

    def ensure_mask(self, w: torch.Tensor) -> torch.Tensor:
        """The N:M mask in use (computed from ``w`` if none was yet), to save or to load into."""
        if self.mask is None:
            self.mask, self._mask_step = self._nm_mask(w.detach().abs().float()), self.step
        return self.mask

    def restored(self, step: int) -> None:
        """The mask was loaded from a checkpoint written after ``step`` training steps: keep it
        until the next refresh the uninterrupted run would have made."""
        self._mask_step = step - 1

    def _target(self, w: torch.Tensor) -> torch.Tensor:
        a = w.abs().float()
        if self.method == "binary":
            scale = _row_sum(a, self.in_dim, self.axis) / self.inputs
            return (torch.sign(w).float() * scale).to(w.dtype)
        if self.method in ("int8", "int4"):
            from tedmoe.compress import quant

            moved = w.movedim(self.in_dim, -1)
            q, scales = quant.quantize(moved.reshape(-1, moved.shape[-1]), int(self.method[3:]), self.group_size)
            return quant.dequantize(q, scales).reshape(moved.shape).movedim(-1, self.in_dim).to(w.dtype)
        if self.method == "ternary":
            delta = THRESHOLD * _row_sum(a, self.in_dim, self.axis) / self.inputs
            keep = (a > delta).float()
            count = _row_sum(keep, self.in_dim, self.axis).clamp(min=1)
            alpha = _row_sum(a * keep, self.in_dim, self.axis) / count
            return (torch.sign(w).float() * keep * alpha).to(w.dtype)
        if self.mask is None or (self.step // self.refresh_every != self._mask_step // self.refresh_every):
            self.mask, self._mask_step = self._nm_mask(a), self.step
        return w * self.mask.to(w.dtype)

    def _nm_mask(self, a: torch.Tensor) -> torch.Tensor:
        moved = a.movedim(self.in_dim, -1)
        groups = moved.reshape(*moved.shape[:-1], -1, self.m)
        top = groups.topk(self.n, dim=-1).indices
        mask = torch.zeros_like(groups).scatter_(-1, top, 1.0)
        return mask.reshape(moved.shape).movedim(-1, self.in_dim)


def apply(model, method: str, n: int = 2, m: int = 4, refresh_every: int = 100,
          group_size: int = 128) -> list[WeightTransform]:
    """Give the blocks' linear and expert weights of ``model`` (any layout) the transform; returns
    them (the trainer sets their ``step``)."""
    from tedmoe.compress.model import quantized_weights
    from tedmoe.parallel.sharding import tp_dim

    tp = model.topology.axis("tp")
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    out = []
    for name, kind in quantized_weights(model).items():
        module_name, attr = name.rsplit(".", 1)
        p = params[name]
        if kind == "linear":  # [N, K]: column-parallel splits N (dim 0), row-parallel splits K (dim 1)
            in_dim, split = 1, tp_dim(p) == 1
        else:  # ours: w1/w3 [L, H, F/tp] (K = H, whole), w2 [L, F/tp, H] (K = F, split)
            in_dim, split = 1, attr == "w2"
        local = p.shape[in_dim]
        inputs = local * (tp.size if split else 1)
        if method == "nm" and local % m:
            raise ValueError(f"{name}: N:M groups of m={m} must divide the {local} input columns each rank holds; "
                             f"pick m dividing {local} or a smaller tp")
        if method in ("int8", "int4") and tp.size > 1:
            raise ValueError(f"{method} weights in the forward run in one process (tedmoe compress --lkd)")
        t = WeightTransform(method, in_dim, inputs, tp if split and tp.size > 1 else None, n, m, refresh_every,
                            group_size)
        module = modules[module_name]
        if module.weight_transforms is None:
            module.weight_transforms = {}
        module.weight_transforms[attr] = t
        out.append(t)
    return out


def masks(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``name -> (mask, parameter)`` of every N:M transform of ``model`` (checkpoints save and
    load them in place)."""
    out = {}
    for name, module in model.named_modules():
        for attr, t in (getattr(module, "weight_transforms", None) or {}).items():
            if t.method == "nm":
                p = getattr(module, attr)
                out[f"{name}.{attr}"] = (t.ensure_mask(p), p)
    return out


def restored(model, step: int) -> None:
    """Masks were loaded from a checkpoint of ``step`` (see ``WeightTransform.restored``)."""
    for module in model.modules():
        for t in (getattr(module, "weight_transforms", None) or {}).values():
            t.restored(step)


def bake(model) -> None:
    """Replace each transformed weight by what the forward uses (N:M: with the mask in use, if
    any), and drop the transforms (for inference and export: the model then computes the same
    without them)."""
    with torch.no_grad():
        for module in model.modules():
            transforms = getattr(module, "weight_transforms", None)
            for attr, t in (transforms or {}).items():
                p = getattr(module, attr)
                p.copy_(p * t.mask.to(p.dtype) if t.method == "nm" and t.mask is not None else t._target(p))
            if transforms:
                module.weight_transforms = None


def effective_state(model, state: dict[str, torch.Tensor], topology) -> dict[str, torch.Tensor]:
    """A full state dict of ``model`` (gathered from any layout; every rank calls this, since N:M
    masks are gathered like the weights) with each transformed weight replaced by what the
    forward uses."""
    from tedmoe.parallel.sharding import full_of

    out, params = dict(state), dict(model.named_parameters())
    for name, module in model.named_modules():
        for attr, t in (getattr(module, "weight_transforms", None) or {}).items():
            key = f"{name}.{attr}"
            if t.method == "nm":
                mask = t.mask if t.mask is not None else t._nm_mask(params[key].detach().abs().float())
                out[key] = state[key] * full_of(mask.to(state[key].dtype), params[key], topology)
            else:  # on the full tensor every row is whole: no reduction over ranks
                out[key] = WeightTransform(t.method, t.in_dim, t.inputs)._target(state[key])
    return out
