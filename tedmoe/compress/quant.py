"""Integer weights that stay integers: group-wise symmetric INT8 and INT4 quantisation, INT4
packing two values per byte, and matrix products computed by torch's integer kernels.

Legend: a weight ``W [N, K]`` (``nn.Linear`` layout: N outputs, K inputs) is cut along K into
groups of ``g`` columns; each (row, group) has one fp32 scale ``s = max|w| / qmax`` (127 for INT8,
7 for INT4) and ``q = round(w / s)`` clamped to ``[-qmax - 1, qmax]``.

Kernels (CPU, torch 2.13): ``aten._weight_int8pack_mm(x, q, s)`` computes ``x @ (q * s)^T`` with
one scale per row, so a grouped INT8 weight is ``K / g`` such products summed (each over its
group's columns); ``aten._weight_int4pack_mm_for_cpu(x, packed, g, sz)`` takes group-wise
``(scale, zero)`` pairs and its own packed layout (``(q + 8)`` nibbles via
``_convert_weight_to_int4pack_for_cpu``), dequantising ``(q' - 8) s + z`` inside the kernel.
``torch._int_mm`` multiplies int8 by int8 into int32: with token-wise dynamic INT8 activations
(ZeroQuant's W8A8) both operands are integers. Nothing is dequantised at load.

Which INT8 path (``int8_linear``, also binary and ternary weights): torch 2.13's
``_weight_int8pack_mm`` on a CPU without AVX-512 costs more than the same product in fp32 with the
weight dequantised for the call, at every row count measured (2-core AVX2 EPYC, one thread, a
1024 x 1024 weight: 1.3 ms vs 1.0 ms for one row, 9.3 ms vs 1.1 ms for eight). So ``auto`` (the
default) dequantises one weight at a time into a transient fp32 matrix there, and uses the kernel
elsewhere for up to ``KERNEL_ROWS`` rows; ``TEDMOE_INT8_MATMUL=kernel|dequant`` forces a path.
Either way the model keeps only the integers and scales.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

QMAX = {8: 127, 4: 7}
INT4_GROUPS = (32, 64, 128, 256)  # group sizes the CPU INT4 kernel takes


def check_group_size(K: int, group_size: int, bits: int, name: str = "weight") -> None:
    """``ValueError`` naming the fix when ``group_size`` does not fit a weight with ``K`` inputs."""
    if group_size < 1 or K % group_size:
        fits = [d for d in (32, 64, 128, 256) if K % d == 0]
        raise ValueError(f"group size {group_size} does not divide {name}'s {K} input columns; pick a divisor of {K}"
                         + (f" ({', '.join(map(str, fits))})" if fits else ""))
    if bits == 4 and group_size not in INT4_GROUPS:
        raise ValueError(f"group size {group_size}: the INT4 kernel takes {', '.join(map(str, INT4_GROUPS))}")
    if bits == 4 and K % 2:
        raise ValueError(f"{name} has {K} input columns; INT4 packs two per byte, so K must be even")


def quantize(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> ``(q int8 [N, K], scales fp32 [N, K / g])``, symmetric per (row, group)."""
    N, K = w.shape
    check_group_size(K, group_size, bits)
    groups = w.detach().float().reshape(N, K // group_size, group_size)
    qmax = QMAX[bits]
    scales = groups.abs().amax(-1).clamp(min=1e-12) / qmax
    q = torch.round(groups / scales[..., None]).clamp_(-qmax - 1, qmax).to(torch.int8)
    return q.reshape(N, K), scales


def dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float weight ``q`` and ``scales`` stand for (for checks and references only)."""
    N, K = q.shape
    g = K // scales.shape[1]
    return (q.float().reshape(N, -1, g) * scales[..., None]).reshape(N, K)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """INT4 values ``[N, K]`` in ``[-8, 7]`` -> bytes ``[N, K / 2]``: column ``2j`` in the low nibble,
    ``2j + 1`` in the high one, each stored as ``q + 8`` (the on-disk format)."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    low, high = (packed & 0xF).to(torch.int8) - 8, (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """0/1 values ``[..., K]`` (K a multiple of 8) -> bytes ``[..., K / 8]``, column ``8j + i`` in bit ``i``."""
    b = bits.to(torch.uint8).reshape(*bits.shape[:-1], -1, 8)
    return (b << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    return ((packed[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(*packed.shape[:-1], -1)


def pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """Values in ``[0, 3]`` ``[..., K]`` (K a multiple of 4) -> bytes ``[..., K / 4]``, column ``4j + i`` in bits ``2i, 2i + 1``."""
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], -1, 4)
    return (c << torch.arange(0, 8, 2, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def unpack_2bit(packed: torch.Tensor) -> torch.Tensor:
    return ((packed[..., None] >> torch.arange(0, 8, 2, dtype=torch.uint8)) & 3).reshape(*packed.shape[:-1], -1)


def by_group(q: torch.Tensor, scales: torch.Tensor, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """An INT8 weight laid out for the kernels, once at load: ``[G, N, g]`` int8 (``[G, g, N]``
    with ``transpose``, for ``torch._int_mm``) and ``[G, N]`` scales, each group contiguous."""
    N, K = q.shape
    G = scales.shape[1]
    qg = q.reshape(N, G, K // G).permute(1, 2, 0) if transpose else q.reshape(N, G, K // G).transpose(0, 1)
    return qg.contiguous(), scales.t().contiguous()


KERNEL_ROWS = 4  # rows up to which ``auto`` uses the INT8 kernel where it is vectorised


def int8_path(rows: int, device: torch.device) -> str:
    """``kernel`` or ``dequant`` for a product of ``rows`` rows (see the module docstring)."""
    forced = os.environ.get("TEDMOE_INT8_MATMUL", "auto")
    if forced in ("kernel", "dequant"):
        return forced
    if forced != "auto":
        raise ValueError(f"TEDMOE_INT8_MATMUL={forced!r}: use auto, kernel or dequant")
    if device.type == "cpu" and not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return "dequant"
    return "kernel" if rows <= KERNEL_ROWS else "dequant"


def int8_linear(x: torch.Tensor, qg: torch.Tensor, sg: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """``x [..., K] @ W^T`` for an INT8 weight laid out by ``by_group`` (weight-only: ``x`` stays
    float): one ``_weight_int8pack_mm`` per group, summed; or (``dequant``) one float product with
    the weight dequantised for this call only."""
    shape, (G, N, g) = x.shape, qg.shape
    x2 = x.reshape(-1, shape[-1])
    if (path or int8_path(x2.shape[0], x.device)) == "dequant":
        w = (qg.to(x.dtype) * sg.to(x.dtype)[..., None]).transpose(0, 1).reshape(N, G * g)
        return F.linear(x2, w).reshape(*shape[:-1], N)
    y = torch.ops.aten._weight_int8pack_mm(x2 if G == 1 else x2[:, :g].contiguous(), qg[0], sg[0].to(x.dtype))
    for i in range(1, G):
        y += torch.ops.aten._weight_int8pack_mm(x2[:, i * g:(i + 1) * g].contiguous(), qg[i], sg[i].to(x.dtype))
    return y.reshape(*shape[:-1], N)


def int4_kernel_weight(packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU INT4 kernel's operands from the on-disk bytes: its packed weight and the
    ``[K / g, N, 2]`` (scale, zero) pairs (zero 0: the quantisation is symmetric)."""
    kernel_q = torch.ops.aten._convert_weight_to_int4pack_for_cpu((unpack_int4(packed).to(torch.int32) + 8), 1)
    sz = torch.stack([scales.t(), torch.zeros_like(scales.t())], dim=-1).contiguous()
    return kernel_q, sz


def int4_linear(x: torch.Tensor, kernel_q: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    shape = x.shape
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]), kernel_q, group_size, sz.to(x.dtype))
    return y.reshape(*shape[:-1], y.shape[-1])


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ZeroQuant's token-wise dynamic activation quantisation: one scale per row of ``x [M, K]``."""
    scale = x.detach().abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / 127
    return torch.round(x.float() / scale).clamp_(-128, 127).to(torch.int8), scale


def w8a8_linear(x: torch.Tensor, qt: torch.Tensor, sg: torch.Tensor) -> torch.Tensor:
    """``x @ W^T`` with both operands INT8 (``torch._int_mm``, int32 accumulation) for a weight laid
    out by ``by_group(..., transpose=True)``: activations quantised per token, one product per group."""
    shape, (G, g, N) = x.shape, qt.shape
    xq, sx = quantize_tokens(x.reshape(-1, shape[-1]))
    M = xq.shape[0]
    if M <= 16:  # _int_mm takes more than 16 rows: pad with zero rows
        xq = torch.cat([xq, xq.new_zeros(17 - M, xq.shape[1])])
    y = None
    for i in range(G):
        part = torch._int_mm(xq[:, i * g:(i + 1) * g].contiguous() if G > 1 else xq, qt[i])[:M].float() * sg[i]
        y = part if y is None else y + part
    return (y * sx).to(x.dtype).reshape(*shape[:-1], N)
