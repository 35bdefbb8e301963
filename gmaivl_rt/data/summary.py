"""Build summary: counts by modality, task, department, dataset and dimension (summary.json), and a figure in the
spirit of GMAI-VL's Figure 4 (summary.png: pies for modality and original task, bars for department and dataset)."""
from __future__ import annotations

import io
import os
from collections import Counter

TASK_NAMES = {"cls": "classification", "seg": "segmentation", "det": "detection", "rep": "report", "vqa": "VQA",
              "cap": "caption"}


def make_summary(tags: list[dict], errors: list[dict], specs, counters: dict) -> dict:
    """tags: one dict per written record (dataset, modality, task, kind, department, dim). Returns the summary:
    what the dataset holds, nothing about the run that made it (so every way of building it writes the same file)."""
    def count(key):
        return dict(Counter(t[key] for t in tags).most_common())

    per_dataset = Counter(t["dataset"] for t in tags)
    return {
        "records": len(tags),
        "images_converted": counters["images"],
        "errors": len(errors),
        "errors_by_kind": dict(Counter(e["kind"] for e in errors).most_common()),
        "errors_by_dataset": dict(Counter(e["dataset"] for e in errors).most_common()),
        "empty_slices_skipped": counters["empty_slices_skipped"],
        "rewrite_failures": counters["rewrite_failures"],
        "by_modality": count("modality"),
        "by_task": {TASK_NAMES.get(k, k): v for k, v in count("task").items()},
        "by_record_kind": count("kind"),
        "by_department": count("department"),
        "by_dimension": count("dim"),
        "by_dataset": {spec.name: per_dataset.get(spec.name, 0) for spec in specs},
    }


def plot_summary(summary: dict, path: str) -> None:
    """Draw the summary figure (matplotlib, Agg backend) and write it atomically to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from gmaivl_rt.atomic import atomic_write_bytes

    fig, axes = plt.subplots(2, 3, figsize=(16, 11), layout="constrained")
    fig.suptitle(f"{summary['records']} records from {summary['images_converted']} images "
                 f"({summary['errors']} items skipped)", fontsize=14)
    _pie(axes[0][0], summary["by_modality"], "Modality")
    _pie(axes[0][1], summary["by_task"], "Original task")
    _pie(axes[0][2], summary["by_record_kind"], "Record kind")
    _bars(axes[1][0], summary["by_department"], "Department")
    _bars(axes[1][1], summary["by_dataset"], "Dataset")
    _bars(axes[1][2], summary["by_dimension"], "Dimension")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(os.fspath(path), buf.getvalue())


def _pie(ax, counts: dict, title: str, top: int = 8) -> None:
    ax.set_title(title)
    if not counts:
        ax.text(0.5, 0.5, "no records", ha="center", va="center")
        ax.axis("off")
        return
    items = sorted(counts.items(), key=lambda kv: -kv[1])
    if len(items) > top:  # fold the tail so labels stay readable
        items = items[: top - 1] + [("other", sum(v for _, v in items[top - 1:]))]
    labels, values = zip(*items)
    total = sum(values)
    wedges, _ = ax.pie(values, startangle=90, counterclock=False, radius=0.9,
                       wedgeprops={"linewidth": 1, "edgecolor": "white"})
    ax.legend(wedges, [f"{k}: {v} ({100 * v / total:.1f}%)" for k, v in zip(labels, values)],
              loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=9, frameon=False, ncol=2)
    ax.axis("equal")


def _bars(ax, counts: dict, title: str, top: int = 12) -> None:
    ax.set_title(title)
    items = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    if not items:
        ax.text(0.5, 0.5, "no records", ha="center", va="center")
        ax.axis("off")
        return
    labels, values = zip(*items)
    bars = ax.barh(range(len(values)), values, color="#4C72B0")
    ax.set_yticks(range(len(values)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("records")
    for bar, v in zip(bars, values):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v}", va="center", fontsize=9)
    ax.set_xlim(0, max(values) * 1.15)
    ax.spines[["top", "right"]].set_visible(False)
