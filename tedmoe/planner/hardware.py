"""Cluster descriptions for the planner: compute peak, memory, and the two network tiers."""

from __future__ import annotations

import sys
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from typing import Annotated

from tedmoe.config.validation import NonNegFloat, PosFloat, PosInt, Range, coerce, field_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Hardware:
    """One kind of node, repeated. Bandwidths are per GPU, in bytes per second, one direction."""

    name: str
    gpus_per_node: PosInt
    """Devices that share the fast intra-node network."""
    peak_flops: PosFloat
    """16-bit dense peak per GPU (FLOP/s)."""
    memory_bytes: PosFloat
    """Device memory per GPU."""
    intra_bw: PosFloat
    """Intra-node bandwidth per GPU (NVLink)."""
    inter_bw: PosFloat
    """Inter-node bandwidth per node (its NICs), shared by the node's GPUs."""
    intra_latency: NonNegFloat = 5e-6
    """Seconds per message step inside a node."""
    inter_latency: NonNegFloat = 10e-6
    """Seconds per message step between nodes."""
    efficiency: Annotated[float, Range(gt=0, le=1)] = 0.4
    """Fraction of peak the model's GEMMs reach."""
    host_memory_bytes: PosFloat | None = None
    """Host (CPU) memory per node, shared by its GPUs' offloaded optimizer states
    (``train.offload="cpu"``); unset: not checked."""
    disk_bytes: PosFloat | None = None
    """Node-local disk (NVMe) per node, shared by its GPUs' offload files (``train.offload="disk"``);
    unset: not checked."""


GB, GiB = 1e9, 2**30
PRESETS = {  # host memory and node-local NVMe as the machines' published node specifications give them
    "summit": Hardware("Summit (6x V100-16GB per node)", 6, 125e12, 16 * GiB, 50 * GB, 25 * GB,
                       host_memory_bytes=512 * GiB, disk_bytes=1600 * GB),
    "perlmutter": Hardware("Perlmutter (4x A100-40GB per node)", 4, 312e12, 40 * GiB, 600 * GB, 100 * GB,
                           host_memory_bytes=256 * GiB),  # no node-local disk
    "dgx-a100": Hardware("DGX-A100 (8x A100-80GB per node)", 8, 312e12, 80 * GiB, 600 * GB, 200 * GB,
                         host_memory_bytes=2048 * GiB, disk_bytes=8 * 3840 * GB),
    "dgx-h100": Hardware("DGX-H100 (8x H100-80GB per node)", 8, 989e12, 80 * GiB, 900 * GB, 400 * GB,
                         host_memory_bytes=2048 * GiB, disk_bytes=8 * 3840 * GB),
}


def fits(mem: dict, hw: Hardware, device_cap: float | None = None) -> bool:
    """Whether a ``predict.memory`` result fits one GPU of ``hw``: the device total within
    ``device_cap`` (default the GPU's memory), offloaded bytes within the GPU's share of the node's
    host memory and disk (where the hardware states them)."""
    per_gpu = lambda node: None if node is None else node / hw.gpus_per_node  # noqa: E731
    limits = {"total": hw.memory_bytes if device_cap is None else device_cap,
              "host": per_gpu(hw.host_memory_bytes), "disk": per_gpu(hw.disk_bytes)}
    return all(cap is None or mem.get(key, 0.0) <= cap for key, cap in limits.items())


def load_hardware(name_or_path: str) -> Hardware:
    """A preset name, or a TOML file with the ``Hardware`` fields (GB/s as ``*_gbps`` works too)."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"unknown hardware {name_or_path!r}: use one of {', '.join(PRESETS)} or a TOML file")
    try:
        values = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"hardware file {path} is not valid TOML: {err}") from None
    for key in ("intra_bw", "inter_bw"):
        if f"{key}_gbps" in values:
            values[key] = values.pop(f"{key}_gbps") * GB
    valid = {f.name for f in fields(Hardware)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ValueError(f"unknown hardware keys {unknown} in {path}; valid keys: {', '.join(sorted(valid))}")
    values.setdefault("name", path.stem)
    missing = [f.name for f in fields(Hardware) if f.default is MISSING and f.name not in values]
    if missing:
        raise ValueError(f"hardware file {path} lacks {', '.join(missing)}; give every one of them")
    hints = field_hints(Hardware)
    return Hardware(**{k: coerce(k, v, hints[k]) for k, v in values.items()})
