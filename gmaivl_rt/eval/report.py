"""Scores from scored rows, in the style of VLMEvalKit's `report_acc` (overall, per split, per category and
l2-category; splits are never pooled) and GMAI-MMBench's per-group tables (per every grouping column present),
each accuracy with a 95 % bootstrap interval resampled by image: scores.json, one CSV per grouping column and a
bar chart."""
from __future__ import annotations

import csv
import io
import re
from collections import defaultdict
from pathlib import Path

from gmaivl_rt.atomic import atomic_path, atomic_write_json, atomic_write_text

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
HEADLINE_SPLITS = ("test", "validation", "val")  # VLMEvalKit MMMU report_primary_metric: test, else validation


def bootstrap_ci(values, clusters, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the mean of `values` (floats, one per item), resampling `clusters` (one
    key per item: the item's image) with replacement, so questions about one image move together (the dependence
    lmms-eval's clustered standard errors allow for). Deterministic for a seed. Returns [low, high]."""
    import numpy as np

    if not len(values):
        return [0.0, 0.0]
    keys = {}
    ids = np.array([keys.setdefault(c, len(keys)) for c in clusters])
    sums = np.bincount(ids, weights=np.asarray(values, dtype=np.float64))
    counts = np.bincount(ids).astype(np.float64)
    rng = np.random.default_rng(seed)
    clusters_n = len(keys)
    chunk = max(1, 4_000_000 // clusters_n)  # resamples drawn a chunk at a time: memory stays bounded at 100k images
    stats = []
    for start in range(0, resamples, chunk):
        drawn = rng.integers(0, clusters_n, size=(min(chunk, resamples - start), clusters_n), dtype=np.int64)
        stats.append(sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1))
    stats = np.concatenate(stats)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return [float(low), float(high)]


def paired_bootstrap_ci(a, b, clusters, **kwargs) -> list[float]:
    """Interval of mean(b) - mean(a) over the same items, resampled by cluster (see `bootstrap_ci`)."""
    return bootstrap_ci([y - x for x, y in zip(a, b)], clusters, **kwargs)


def _accuracy(rows, metric: str = "score") -> dict:
    values = [float(r[metric]) for r in rows]
    return {"accuracy": sum(values) / len(values) if values else 0.0, "count": len(values),
            "ci95": bootstrap_ci(values, [r["cluster"] for r in rows])}


def _figures(scored: list[dict], protocol: str, scorer: str | None) -> dict:
    figures = _accuracy(scored)
    figures["overall"] = figures.pop("accuracy")
    by = defaultdict(lambda: defaultdict(list))
    for r in scored:
        for column, value in r["groups"].items():
            by[column][value].append(r)
    figures["by"] = {column: {value: _accuracy(values[value]) for value in sorted(values)}
                     for column, values in sorted(by.items())}
    if protocol == "mcq":
        figures["chance"] = sum(r["chance"] for r in scored) / len(scored) if scored else 0.0
        return figures
    closed = [r for r in scored if r["kind"] == "closed"]
    opened = [r for r in scored if r["kind"] == "open"]
    figures["closed"] = _accuracy(closed)
    if scorer == "llava-med":
        recall = _accuracy(opened)
        figures["open"] = {"recall": recall["accuracy"], "count": recall["count"], "ci95": recall["ci95"],
                           **{m: (sum(r[m] for r in opened) / len(opened) if opened else 0.0)
                              for m in ("precision", "f1", "exact_match")}}
    else:
        figures["open"] = _accuracy(opened)
    return figures


def headline_split(names) -> str:
    """The split a paper quotes when a file has several: test, else validation / val, else the first by name."""
    for name in HEADLINE_SPLITS:
        if name in names:
            return name
    return sorted(names)[0]


def aggregate(rows: list[dict], protocol: str, *, scorer: str | None = None, evaluation: str = "vanilla",
              notes=()) -> dict:
    """rows: one per scored unit (an item, or a circular group), {"kind", "correct" (None = not scored), "score"
    (float), "parsed", "chance" (MCQ: 1 / options; a circular group: the product), "groups": {col: value},
    "split" (None = the file has none), "cluster" (the image key the bootstrap resamples)} plus LLaVA-Med's "precision", "f1", "exact_match" for open items.

    Returns {"protocol", "scorer", "evaluation", "notes", "predicted", "unparsed", "split", "overall", "count",
    "ci95", "by": {column: {value: {"accuracy", "count", "ci95"}}}} plus "chance" (MCQ) or "closed" / "open"
    figures. With several splits the figures are the headline split's (`split` names it) and "splits" holds every
    split's own figures; nothing is pooled across splits."""
    scored = [r for r in rows if r["correct"] is not None]
    scores = {"protocol": protocol, "scorer": scorer, "evaluation": evaluation, "notes": list(notes),
              "predicted": len(rows), "unparsed": sum(not r["parsed"] for r in rows)}
    names = sorted({r["split"] for r in scored if r.get("split") is not None})
    if len(names) <= 1:
        return {**scores, "split": names[0] if names else None, **_figures(scored, protocol, scorer)}
    per_split = {name: _figures([r for r in scored if r["split"] == name], protocol, scorer) for name in names}
    headline = headline_split(names)
    return {**scores, "split": headline, **per_split[headline], "splits": per_split}


def _safe_name(column: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", column).strip("_").lower() or "group"


def write_report(out: Path, scores: dict, rows: list[dict]) -> list[Path]:
    """scores.json, `scores_by_<column>.csv` per grouping column, scores.png; all written atomically."""
    out = Path(out)
    atomic_write_json(out / "scores.json", scores)
    written = [out / "scores.json"]
    splits = scores.get("splits") or {scores.get("split"): scores}
    columns = sorted({column for figures in splits.values() for column in figures["by"]})
    if "splits" in scores:
        columns = ["split"] + columns
    for column in columns:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["split", column, "accuracy", "ci95_low", "ci95_high", "count"])
        for split, figures in splits.items():
            values = ({"all": {"accuracy": figures["overall"], "count": figures["count"], "ci95": figures["ci95"]}}
                      if column == "split" else figures["by"].get(column, {}))
            for value, group in values.items():
                writer.writerow([split if split is not None else "", value, f"{group['accuracy']:.6f}",
                                 f"{group['ci95'][0]:.6f}", f"{group['ci95'][1]:.6f}", group["count"]])
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

    headline = f" ({scores['split']})" if scores.get("split") else ""
    panels = [("overall", {"all": {"accuracy": scores["overall"], "count": scores["count"], "ci95": scores["ci95"]}})]
    if "splits" in scores:
        panels.append(("split", {name: {"accuracy": f["overall"], "count": f["count"], "ci95": f["ci95"]}
                                 for name, f in scores["splits"].items()}))
    panels += [(column + headline, values) for column, values in scores["by"].items()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), squeeze=False)
    for ax, (column, values) in zip(axes[:, 0], panels):
        shown = sorted(values.items(), key=lambda kv: -kv[1]["count"])[:max_bars]
        labels = [f"{v[:24]} (n={f['count']})" for v, f in shown]
        heights = [f["accuracy"] for _, f in shown]
        errors = [[h - f["ci95"][0] for h, (_, f) in zip(heights, shown)],
                  [f["ci95"][1] - h for h, (_, f) in zip(heights, shown)]]
        ax.bar(range(len(shown)), heights, color="#4c72b0", yerr=errors, capsize=3, ecolor="#333333")
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
    """One line: accuracy over the scored questions with its interval (and chance for MCQ, closed/open figures
    otherwise), naming the split, the evaluation and the scorer."""
    low, high = scores["ci95"]
    unit = "circular groups" if scores.get("evaluation") == "circular" else "scored questions"
    text = f"accuracy {scores['overall']:.1%} (95% CI {low:.1%}-{high:.1%}) on {scores['count']} {unit}"
    if scores.get("split"):
        text += f" of split {scores['split']}"
    if "chance" in scores:
        text += f" (chance {scores['chance']:.1%})"
    else:
        open_figures = scores["open"]
        metric = "recall" if "recall" in open_figures else "accuracy"
        text += (f" ({scores['scorer']}: closed {scores['closed']['accuracy']:.1%} of {scores['closed']['count']}, "
                 f"open {metric} {open_figures[metric]:.1%} of {open_figures['count']})")
    if scores["unparsed"]:
        text += f"; {scores['unparsed']} answers unparsed"
    return text
