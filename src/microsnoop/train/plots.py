"""Loss curves of training runs (``log.csv`` of ``microsnoop train``), for model cards.

Why: a card's "final loss" is one noisy step; the smoothed curve shows whether a run converged,
diverged or was still improving when it stopped, and lets two recipes be compared on one axis.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..core.errors import MicrosnoopError
from ..io.atomic import atomic_path


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (shorter at the start), so the curve is defined from step 0."""
    c = np.cumsum(np.insert(np.asarray(values, np.float64), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_training_logs(runs: Sequence[tuple[str, str | Path]], output: str | Path, window: int = 25,
                       column: str = "loss") -> Path:
    """One figure: ``column`` per step (raw, faint; moving average, solid) and the LR, for each (label, run dir or log.csv)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for label, run in runs:
        path = Path(run) / "log.csv" if Path(run).is_dir() else Path(run)
        if not path.exists():
            raise MicrosnoopError("no training log", path)
        log = pd.read_csv(path)
        if column not in log.columns:
            raise MicrosnoopError(f"training log has no '{column}' column", path)
        line, = ax.plot(log["step"], smooth(log[column].to_numpy(), window), label=label)
        ax.plot(log["step"], log[column], color=line.get_color(), alpha=0.15, linewidth=0.8)
        ax_lr.plot(log["step"], log["lr"], color=line.get_color())
    ax.set_yscale("log")
    ax.set_ylabel(f"{column} ({window}-step mean)")
    ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    output = Path(output)
    with atomic_path(output) as tmp:
        fig.savefig(tmp, dpi=110, format=output.suffix.lstrip(".") or "png")
    plt.close(fig)
    return output
