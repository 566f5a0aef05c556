"""Compressed models: which weights become integers, the compressed directory's format, and
loading it into any TP x EP layout where the integer kernels compute in place of the float
products.

Quantised: every linear weight of the blocks (attention q, k, v, o; dense MLPs; Residual-MoE's
branch) and every expert weight. Kept as they are: embeddings, the output head, norms and routers
(small, and where rounding costs the most quality).

A compressed directory holds ``model.safetensors`` and ``compression.json`` (format marker,
method, bits, group size, the model config and the names quantised) and the tokenizer. A
quantised linear weight ``NAME`` ``[N, K]`` is stored as ``NAME.qweight`` (int8 ``[N, K]``, or for
INT4 uint8 ``[N, K / 2]``, two values per byte) and ``NAME.scales`` (fp32 ``[N, K / g]``); expert
weights as one such matrix per expert, stacked: ``[E, N, K]`` in the ``nn.Linear`` layout (ours
``w1``/``w3`` are ``[E, H, F]``, so N = F, K = H; ``w2`` gives N = H, K = F).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tedmoe.compress import quant
from tedmoe.config import ModelConfig
from tedmoe.config.loader import model_config_from_dict
from tedmoe.fileio import new_directory

FORMAT = "tedmoe-compressed"
METHODS = {
    "int8": "INT8 weights, group-wise scales, float activations",
    "int4": "INT4 weights two per byte, group-wise scales, float activations",
    "zeroquant": "INT8 weights and token-wise dynamic INT8 activations (W8A8)",
    "binary": "1-bit weights eight per byte, one scale per row (a run trained with compress.method=binary)",
    "ternary": "2-bit weights (-1, 0, 1) four per byte, one scale per row (trained with compress.method=ternary)",
    "nm": "N:M sparse weights: the kept values and a bitmap of their places (trained with compress.method=nm)",
}
BITS = {"int8": 8, "int4": 4, "zeroquant": 8, "binary": 1, "ternary": 2}
GROUPED = ("int8", "int4", "zeroquant")  # post-training, group-wise scales
TRAINED = ("binary", "ternary", "nm")  # store what quantisation-aware training made


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown compression method {method!r}; use one of {', '.join(METHODS)}")


def is_compressed(path: str | Path) -> bool:
    return (Path(path) / "compression.json").is_file()


def quantized_weights(model) -> dict[str, str]:
    """Name of every weight to quantise -> ``linear`` (an ``[N, K]`` weight) or ``expert`` (ours)."""
    from tedmoe.moe.experts import GroupedExperts
    from tedmoe.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and name != "head":
            out[f"{name}.weight"] = "linear"
        elif isinstance(module, GroupedExperts):
            out.update({f"{name}.{w}": "expert" for w in ("w1", "w2", "w3") if getattr(module, w) is not None})
    return out


def _as_linear(t: torch.Tensor) -> torch.Tensor:
    """An expert weight (ours: ``[E, K, N]``, for ``x @ w``) in the ``nn.Linear`` layout ``[E, N, K]``."""
    return t.transpose(1, 2)


def _stored(q: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return q
    return quant.pack_int4(q.reshape(-1, q.shape[-1])).reshape(*q.shape[:-1], q.shape[-1] // 2)


def _unstored(t: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return t
    return quant.unpack_int4(t.reshape(-1, t.shape[-1])).reshape(*t.shape[:-1], t.shape[-1] * 2)


def _trained(w: torch.Tensor, name: str, method: str, n: int, m: int) -> dict[str, torch.Tensor]:
    """Pack the weights a quantisation-aware run's forward used (``[..., N, K]``, linear layout):
    checked to be what the method makes, so a float run is refused rather than rounded."""
    K = w.shape[-1]
    unit = {"binary": 8, "ternary": 4, "nm": max(8, m)}[method]
    if K % unit or (method == "nm" and K % m):
        raise ValueError(f"{name} has {K} input columns; {method} packing needs a multiple of {unit}"
                         + (f" and of m={m}" if method == "nm" else ""))
    w = w.detach().float()
    a = w.abs()
    hint = f"compress a run trained with --set compress.method={method}"
    if method == "nm":
        groups = a.reshape(*a.shape[:-1], K // m, m)
        if ((groups > 0).sum(-1) > n).any():
            raise ValueError(f"{name} is not {n}:{m} sparse (a group of {m} inputs holds more than {n} non-zeros); {hint}")
        top = groups.topk(n, dim=-1).indices
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True).reshape(w.shape)
        return {"values": w[keep].reshape(*w.shape[:-1], K * n // m), "mask": quant.pack_bits(keep)}
    scale = a.amax(-1, keepdim=True)
    nonzero = a > 0 if method == "ternary" else torch.ones_like(a, dtype=torch.bool)
    if ((a - scale).abs() > 1e-5 * scale + 1e-12)[nonzero].any():
        levels = "-a, 0 or a" if method == "ternary" else "-a or a"
        raise ValueError(f"{name} is not {method} (each row must hold {levels}); {hint}")
    if method == "binary":
        return {"qweight": quant.pack_bits(w > 0), "scales": scale}
    return {"qweight": quant.pack_2bit((w > 0).to(torch.uint8) + 2 * (w < 0).to(torch.uint8)), "scales": scale}


def stored_weight(tensors: dict[str, torch.Tensor], name: str, meta: dict):
    """A stored weight back in the linear layout ``[..., N, K]``: ``(q int8, scales)`` for the
    integer methods (binary and ternary as int8 -1/0/1 with ``[..., N, 1]`` scales), the dense
    float weight for ``nm``."""
    method = meta["method"]
    if method == "nm":
        keep = quant.unpack_bits(tensors[f"{name}.mask"]).bool()
        return torch.zeros(keep.shape).masked_scatter_(keep, tensors[f"{name}.values"].float())
    s = tensors[f"{name}.scales"]
    if method == "binary":
        return quant.unpack_bits(tensors[f"{name}.qweight"]).to(torch.int8) * 2 - 1, s
    if method == "ternary":
        codes = quant.unpack_2bit(tensors[f"{name}.qweight"]).to(torch.int8)
        return (codes == 1).to(torch.int8) - (codes == 2).to(torch.int8), s
    return _unstored(tensors[f"{name}.qweight"], meta["bits"]), s


def compress_state(state: dict[str, torch.Tensor], cfg: ModelConfig, method: str, group_size: int | None,
                   n: int = 2, m: int = 4) -> dict[str, torch.Tensor]:
    """A full (single-process) float state dict -> the compressed directory's tensors."""
    from tedmoe.model.transformer import GPTMoE
    from tedmoe.parallel.topology import Topology

    check_method(method)
    kinds = quantized_weights(GPTMoE(cfg, Topology.single(), device="meta"))
    out = {}
    for name, t in state.items():
        kind = kinds.get(name)
        if kind is None:
            out[name] = t.detach().contiguous()
            continue
        w = t if kind == "linear" else _as_linear(t)
        if method in TRAINED:
            out.update({f"{name}.{k}": v.contiguous() for k, v in _trained(w, name, method, n, m).items()})
            continue
        bits = BITS[method]
        quant.check_group_size(w.shape[-1], group_size, bits, name)
        pairs = [quant.quantize(m_, bits, group_size) for m_ in (w if kind == "expert" else w[None])]
        q, s = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        if kind == "linear":
            q, s = q[0], s[0]
        out[f"{name}.qweight"], out[f"{name}.scales"] = _stored(q, bits).contiguous(), s.contiguous()
    return out


def save(state: dict[str, torch.Tensor], cfg: ModelConfig, method: str, group_size: int | None, out: str | Path,
         tokenizer=None, source: str = "", n: int = 2, m: int = 4) -> dict:
    """Compress a full float state dict into the new directory ``out`` (through a temporary
    directory and a rename; an existing ``out`` is refused). ``group_size`` for the post-training
    methods, ``n``/``m`` for ``nm``. Returns the size report: bytes on disk, and in memory once
    loaded (one process), next to the fp32 and bf16 model."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists; compress into a new directory (nothing is overwritten)")
    tensors = compress_state(state, cfg, method, group_size, n, m)  # refuses bad input before writing
    kinds = quantized_weights_of(cfg)
    quantized = sorted(kinds.keys() & state.keys())
    meta = {"format": FORMAT, "method": method, "description": METHODS[method], "bits": BITS.get(method),
            "group_size": group_size if method in GROUPED else None, **({"n": n, "m": m} if method == "nm" else {}),
            "activations": "int8 per token" if method == "zeroquant" else "float", "source": source,
            "model": dataclasses.asdict(cfg), "quantized": quantized}
    with new_directory(out) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "compression.json").write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
    float_bytes = sum(t.numel() * 4 for t in state.values())
    disk = (out / "model.safetensors").stat().st_size
    return {"method": method, "group_size": meta["group_size"], "bytes_on_disk": disk, "fp32_bytes": float_bytes,
            "bf16_bytes": float_bytes // 2, "bytes_in_memory": memory_bytes(out), "ratio": float_bytes / disk,
            "quantized_tensors": len(quantized)}


def quantized_weights_of(cfg: ModelConfig) -> dict[str, str]:
    from tedmoe.model.transformer import GPTMoE
    from tedmoe.parallel.topology import Topology

    return quantized_weights(GPTMoE(cfg, Topology.single(), device="meta"))


def memory_bytes(path: str | Path) -> int:
    """Bytes a one-process model loaded from the compressed directory holds (parameters and
    buffers: the kernels' integer weights and scales)."""
    from tedmoe.model.transformer import GPTMoE
    from tedmoe.parallel.topology import Topology

    model = GPTMoE(model_config_from_dict(read_meta(path)["model"]), Topology.single(), device="meta")
    model.to_empty(device="cpu")
    load_into(model, path)
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def read_meta(path: str | Path) -> dict:
    meta = json.loads((Path(path) / "compression.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}/compression.json is not a tedmoe compressed model")
    return meta


class QuantLinear(nn.Module):
    """``x W^T (+ b)`` with ``W`` an integer matrix in the kernels' layout (built once, at load)."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, method: str, group_size: int):
        super().__init__()
        self.method, self.group_size = method, group_size
        self.out_features = q.shape[0]
        if method == "int4":
            kq, sz = quant.int4_kernel_weight(quant.pack_int4(q), scales)
            self.register_buffer("kernel_q", kq, persistent=False)
            self.register_buffer("sz", sz, persistent=False)
        else:
            qg, sg = quant.by_group(q, scales, transpose=method == "zeroquant")
            self.register_buffer("kernel_q", qg, persistent=False)
            self.register_buffer("sz", sg, persistent=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.method == "int4":
            y = quant.int4_linear(x, self.kernel_q, self.sz, self.group_size)
        elif self.method == "zeroquant":
            y = quant.w8a8_linear(x, self.kernel_q, self.sz)
        else:
            y = quant.int8_linear(x, self.kernel_q, self.sz)
        return y if bias is None else y + bias


class QuantExperts(nn.Module):
    """The local experts with integer weights: each expert's rows through its own products."""

    def __init__(self, w1: list[QuantLinear], w3: list[QuantLinear] | None, w2: list[QuantLinear]):
        super().__init__()
        self.w1, self.w2 = nn.ModuleList(w1), nn.ModuleList(w2)
        self.w3 = nn.ModuleList(w3) if w3 is not None else None

    def forward(self, x_LTH: torch.Tensor, rows_L: list[int] | None = None) -> torch.Tensor:
        """As ``GroupedExperts.forward``: with ``rows_L`` only each expert's real rows are computed."""
        L, T, _ = x_LTH.shape
        out = (x_LTH.new_zeros if rows_L is None else x_LTH.new_empty)(L, T, self.w2[0].out_features)
        for e in range(L):
            r = T if rows_L is None else rows_L[e]
            if r:
                x = x_LTH[e, :r]
                h = self.w1[e](x)
                h = F.gelu(h) if self.w3 is None else F.silu(h) * self.w3[e](x)
                out[e, :r] = self.w2[e](h)
        return out


def load_into(model, path: str | Path) -> dict:
    """Fill ``model`` (a ``GPTMoE`` of any TP x EP layout built from the directory's config) from a
    compressed directory: float tensors sliced as usual, integer weights sliced per rank (rows
    or columns over tp, experts over ep) and set up for the kernels; their float parameters are
    removed. Binary and ternary weights compute as INT8 -1/0/1 with one scale per row. N:M
    weights are expanded to dense float parameters (torch has no CPU kernel for N:M sparse
    products; the directory stores them packed). Returns the directory's ``compression.json``."""
    from safetensors.torch import load_file

    from tedmoe.parallel import comm
    from tedmoe.parallel.sharding import shard_of, tp_dim

    meta = read_meta(path)
    quant.int8_path(1, next(model.parameters()).device)  # a bad TEDMOE_INT8_MATMUL fails here, not mid-request
    method, g = meta["method"], meta["group_size"]
    tensors = load_file(str(Path(path) / "model.safetensors"))
    kinds = quantized_weights(model)
    tp, ep = model.topology.axis("tp"), model.topology.axis("ep")
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    kernel = "int8" if method in ("binary", "ternary") else method
    experts: dict[str, dict[str, list[QuantLinear]]] = {}
    with torch.no_grad():
        for name, p in params.items():
            if name not in kinds:
                p.copy_(shard_of(tensors[name].to(p.dtype), p, model.topology))
                continue
            if method == "nm":
                dense = stored_weight(tensors, name, meta)
                p.copy_(shard_of((dense if kinds[name] == "linear" else _as_linear(dense)).to(p.dtype), p,
                                 model.topology))
                continue
            q, s = stored_weight(tensors, name, meta)
            if kinds[name] == "expert":  # this rank's experts; tp splits w1/w3 by rows (F), w2 by columns (F)
                q, s = comm.local_slice(q, ep, 0), comm.local_slice(s, ep, 0)
                split = 1 if name.endswith(("w1", "w3")) else 2
            else:  # column-parallel layers split rows (N), row-parallel ones columns (K)
                split = 0 if tp_dim(p) == 0 else 1
            if tp.size > 1:
                if split == q.dim() - 1 and s.shape[-1] > 1 and s.shape[-1] % tp.size:
                    raise ValueError(f"{name}: group size {g} does not divide the {q.shape[-1] // tp.size} input columns "
                                     f"each of tp={tp.size} ranks holds; compress with a smaller group size or use "
                                     "a smaller tp")
                q = comm.local_slice(q, tp, split)
                if not (split == q.dim() - 1 and s.shape[-1] == 1):  # one scale per row: every column shard uses it
                    s = comm.local_slice(s, tp, split)
            module_name, attr = name.rsplit(".", 1)
            group = g if method in GROUPED else q.shape[-1]
            if kinds[name] == "linear":
                modules[module_name].quantized = QuantLinear(q.contiguous(), s.contiguous(), kernel, group)
            else:
                experts.setdefault(module_name, {})[attr] = [QuantLinear(q[e].contiguous(), s[e].contiguous(), kernel,
                                                                         group) for e in range(q.shape[0])]
    if method == "nm":
        return meta
    for name in kinds:  # the float weights go; the integers compute in their place
        module_name, attr = name.rsplit(".", 1)
        del modules[module_name]._parameters[attr]
    for module_name, ws in experts.items():
        modules[module_name].quantized = QuantExperts(ws["w1"], ws.get("w3"), ws["w2"])
    return meta
