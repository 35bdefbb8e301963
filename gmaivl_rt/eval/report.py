"""Scores from scored rows, in the style of VLMEvalKit's `report_acc` (overall, per split, per category and
l2-category) and GMAI-MMBench's per-group tables (per every grouping column present): scores.json, one CSV per
grouping column and a bar chart."""
from __future__ import annotations

import csv
import io
import re
from collections import defaultdict
from pathlib import Path

from gmaivl_rt.atomic import atomic_path, atomic_write_json, atomic_write_text


def _accuracy(rows) -> dict:
    return {"accuracy": sum(bool(r["correct"]) for r in rows) / len(rows) if rows else 0.0, "count": len(rows)}


def aggregate(rows: list[dict], protocol: str) -> dict:
    """rows: one per item, {"kind", "correct" (None = not scored), "parsed", "n_options", "groups": {col: value}}
    plus "recall", "f1", "exact_match" for open items. Returns
    {"protocol", "overall", "count", "predicted", "unparsed", "by": {column: {value: {"accuracy", "count"}}}}
    plus "chance" (MCQ: mean of 1 / number of options) or "closed" / "open" figures (closed-open)."""
    scored = [r for r in rows if r["correct"] is not None]
    scores = {"protocol": protocol, **_accuracy(scored), "predicted": len(rows),
              "unparsed": sum(not r["parsed"] for r in rows)}
    scores["overall"] = scores.pop("accuracy")
    by = defaultdict(lambda: defaultdict(list))
    for r in scored:
        for column, value in r["groups"].items():
            by[column][value].append(r)
    scores["by"] = {column: {value: _accuracy(values[value]) for value in sorted(values)}
                    for column, values in sorted(by.items())}
    if protocol == "mcq":
        scores["chance"] = sum(1 / r["n_options"] for r in scored) / len(scored) if scored else 0.0
    else:
        closed = [r for r in scored if r["kind"] == "closed"]
        opened = [r for r in scored if r["kind"] == "open"]
        scores["closed"] = _accuracy(closed)
        scores["open"] = {metric: (sum(r[metric] for r in opened) / len(opened) if opened else 0.0)
                          for metric in ("recall", "exact_match", "f1")} | {"count": len(opened)}
    return scores


def _safe_name(column: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", column).strip("_").lower() or "group"


def write_report(out: Path, scores: dict, rows: list[dict]) -> list[Path]:
    """scores.json, `scores_by_<column>.csv` per grouping column, scores.png; all written atomically."""
    out = Path(out)
    atomic_write_json(out / "scores.json", scores)
    written = [out / "scores.json"]
    for column, values in scores["by"].items():
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow([column, "accuracy", "count"])
        for value, figures in values.items():
            writer.writerow([value, f"{figures['accuracy']:.6f}", figures["count"]])
        path = out / f"scores_by_{_safe_name(column)}.csv"
        atomic_write_text(path, buffer.getvalue())
        written.append(path)
    plot_scores(scores, out / "scores.png")
    written.append(out / "scores.png")
    return written


def plot_scores(scores: dict, path: Path, max_bars: int = 30) -> None:
    """Accuracy bars: overall, then one panel per grouping column (its `max_bars` largest groups); MCQ panels mark
    the chance level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("overall", {"all": {"accuracy": scores["overall"], "count": scores["count"]}})]
    panels += list(scores["by"].items())
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), squeeze=False)
    for ax, (column, values) in zip(axes[:, 0], panels):
        shown = sorted(values.items(), key=lambda kv: -kv[1]["count"])[:max_bars]
        labels = [f"{v[:24]} (n={f['count']})" for v, f in shown]
        ax.bar(range(len(shown)), [f["accuracy"] for _, f in shown], color="#4c72b0")
        ax.set_xticks(range(len(shown)), labels, rotation=30 if len(shown) > 3 else 0, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(column, fontsize=10)
        if "chance" in scores:
            ax.axhline(scores["chance"], color="#c44e52", linestyle="--", linewidth=1,
                       label=f"chance {scores['chance']:.2f}")
            ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def summary_line(scores: dict) -> str:
    """One line: accuracy over the scored questions (and chance for MCQ, closed/open figures otherwise)."""
    text = f"accuracy {scores['overall']:.1%} on {scores['count']} scored questions"
    if "chance" in scores:
        text += f" (chance {scores['chance']:.1%})"
    else:
        text += (f" (closed {scores['closed']['accuracy']:.1%} of {scores['closed']['count']}, open recall "
                 f"{scores['open']['recall']:.1%} of {scores['open']['count']})")
    if scores["unparsed"]:
        text += f"; {scores['unparsed']} answers unparsed"
    return text
