"""The loss curves of every stage run so far, one colour per stage, as a PNG (matplotlib's Agg backend)."""
from __future__ import annotations

from pathlib import Path

STAGE_NAMES = {1: "I shallow alignment", 2: "II deep alignment", 3: "III instruction tuning"}


def plot_loss_curves(history: list[dict], path) -> Path:
    """history: step records ({"stage", "step", "loss"}) in run order; steps are laid end to end across stages.
    Writes `path` atomically and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gmaivl_rt.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    offset = 0
    for stage in sorted({r["stage"] for r in history}, key=[r["stage"] for r in history].index):
        records = [r for r in history if r["stage"] == stage]
        xs = [offset + r["step"] for r in records]
        ax.plot(xs, [r["loss"] for r in records], marker="o" if len(history) <= 100 else None, markersize=3,
                label=f"stage {STAGE_NAMES.get(stage, stage)}")
        offset = xs[-1]
        ax.axvline(offset + 0.5, color="0.85", linewidth=0.8)
    ax.set_xlabel("optimizer step (stages laid end to end)")
    ax.set_ylabel("training loss (mean token cross-entropy)")
    ax.set_title("GMAI-VL training: loss per stage")
    ax.grid(alpha=0.3)
    if history:
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
