"""Per-step metrics: a JSONL file on rank 0, optional TensorBoard, a progress bar, the summary."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsWriter:
    """Appends one JSON object per line. On resume, lines after the resumed step are dropped
    so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None, tensorboard_dir: Path | None = None):
        self.path, self.enabled, self.tb = path, enabled, None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.exists():
            keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in keep))
        elif path.exists():
            path.unlink()
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("tensorboard=true needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} does not exist; is {run_dir} a tedmoe run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_balance(tokens_per_expert: list[list[int]]) -> float:
    """Busiest expert's load over the mean load, worst MoE layer (1.0 is perfect balance)."""
    worst = 1.0
    for layer in tokens_per_expert:
        mean = sum(layer) / len(layer)
        if mean > 0:
            worst = max(worst, max(layer) / mean)
    return worst


def summary(records: list[dict], out_dir: Path, world: int, layout: str) -> str:
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    last = train[-1]
    tps = [r["tokens_per_s"] for r in train[1:]] or [train[0]["tokens_per_s"]]
    comm = last.get("comm_bytes", {})
    lines = [f"trained {last['step']} steps on {world} ranks ({layout})",
             f"  train loss {train[0]['loss']:.4f} -> {last['loss']:.4f}"
             + (f"   val loss {val[0]['val_loss']:.4f} -> {val[-1]['val_loss']:.4f}" if val else ""),
             f"  throughput {sum(tps) / len(tps):,.0f} tokens/s (mean after the first step)",
             "  communication per step (rank 0): " + (", ".join(f"{k} {v / 2**20:.2f} MB" for k, v in sorted(comm.items()))
                                                       or "none (one rank)")]
    if "tokens_per_expert" in last:
        lines.append(f"  expert load (busiest / mean, worst layer, last step): {load_balance(last['tokens_per_expert']):.2f}"
                     f"; dropped {100 * sum(last['drop_fraction']) / len(last['drop_fraction']):.1f}% of assignments")
    lines.append(f"  outputs: {out_dir}/metrics.jsonl, {out_dir}/checkpoints/"
                 + (f", {out_dir}/model.safetensors" if (out_dir / "model.safetensors").exists() else "")
                 + f"; plots: tedmoe plot {out_dir}")
    return "\n".join(lines)
