"""``tedmoe plot RUN_DIR``: PNGs of the loss, the expert load over steps and the communication."""

from __future__ import annotations

from pathlib import Path

from tedmoe.runtime.metrics import read_metrics


def plot_run(run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    run_dir = Path(run_dir)
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl has no training steps yet")
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    steps = [r["step"] for r in records]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], label="train")
    val = [r for r in records if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.legend()
    written.append(_save(fig, out_dir / "loss.png"))

    if "tokens_per_expert" in records[0]:
        load = np.array([np.concatenate([np.asarray(layer) / max(1, sum(layer)) for layer in r["tokens_per_expert"]])
                         for r in records])
        bounds = np.cumsum([len(layer) for layer in records[0]["tokens_per_expert"]])  # experts may differ per layer
        fig, ax = plt.subplots(figsize=(7, 4))
        im = ax.imshow(load.T, aspect="auto", interpolation="nearest", cmap="viridis",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, bounds[-1] - 0.5, -0.5))
        ax.set(xlabel="step", ylabel="MoE layer x expert", title="share of each layer's tokens per expert")
        for b in bounds[:-1]:
            ax.axhline(b - 0.5, color="white", linewidth=0.8)
        fig.colorbar(im, ax=ax)
        written.append(_save(fig, out_dir / "expert_load.png"))

    kinds = sorted({k for r in records for k in r.get("comm_bytes", {})})
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in kinds:
        ax.plot(steps, [r.get("comm_bytes", {}).get(k, 0) / 2**20 for r in records], label=k)
    ax.set(xlabel="step", ylabel="MB sent by rank 0", title="communication per step")
    if kinds:
        ax.legend()
    written.append(_save(fig, out_dir / "communication.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
