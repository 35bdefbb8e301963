"""Confidence intervals (issue 27): every accuracy in scores.json, the CSVs and the chart carries a 95 % bootstrap
interval resampled by image; `eval compare` gives per-group differences with paired intervals and the items whose
verdict changed."""
import csv
import json
import math

import pytest
from eval_fixtures import png_base64, write_tsv

from gmaivl_rt.cli import main
from gmaivl_rt.eval import score
from gmaivl_rt.eval.report import bootstrap_ci
from gmaivl_rt.eval.run import compare


def test_bootstrap_interval_of_independent_items_matches_the_normal_approximation():
    # 400 independent items, half right: the binomial interval is 0.5 +- 1.96 * sqrt(0.25 / 400) = +-0.049
    values = [1.0, 0.0] * 200
    low, high = bootstrap_ci(values, range(400))
    half = 1.96 * math.sqrt(0.25 / 400)
    assert low == pytest.approx(0.5 - half, abs=0.01) and high == pytest.approx(0.5 + half, abs=0.01)


def test_questions_about_one_image_are_resampled_together():
    """100 images, four questions each, every image's questions all right or all wrong: the data hold 100
    independent outcomes, not 400, so the interval must be the one of 100 items (the same resampling draws give
    exactly it), about twice as wide as treating the 400 as independent. Mutant seen failing: resampling items
    (each its own cluster)."""
    per_image = [1.0, 0.0] * 50
    values = [v for v in per_image for _ in range(4)]
    images = [n for n in range(100) for _ in range(4)]
    clustered = bootstrap_ci(values, images)
    assert clustered == bootstrap_ci(per_image, range(100))
    naive = bootstrap_ci(values, range(400))
    assert (clustered[1] - clustered[0]) > 1.7 * (naive[1] - naive[0])


def _run(tmp_path, name, answers, rows):
    predictions = tmp_path / f"{name}.jsonl"
    predictions.write_text("".join(json.dumps({"index": k, "prediction": v}) + "\n" for k, v in answers.items()))
    score(predictions, write_tsv(tmp_path / "bench.tsv", rows), tmp_path / name)
    return tmp_path / name


def _rows():
    images = [png_base64((n, 0, 0)) for n in range(4)]
    return [{"index": i, "image": images[i % 4], "question": "q", "A": "x", "B": "y", "answer": "AB"[i % 2],
             "category": "c" + str(i % 3)} for i in range(12)]


def test_every_accuracy_has_an_interval_in_json_and_csv(tmp_path):
    rows = _rows()
    out = _run(tmp_path, "a", {str(r["index"]): "A" for r in rows}, rows)
    scores = json.loads((out / "scores.json").read_text())
    assert scores["ci95"][0] <= scores["overall"] <= scores["ci95"][1]
    for figures in scores["by"]["category"].values():
        assert figures["ci95"][0] <= figures["accuracy"] <= figures["ci95"][1]
    with open(out / "scores_by_category.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["category"] for r in table] == ["c0", "c1", "c2"]
    assert [float(r["ci95_low"]) for r in table] == pytest.approx(
        [scores["by"]["category"][c]["ci95"][0] for c in ("c0", "c1", "c2")], abs=1e-6)


def test_compare_reports_group_differences_and_changed_items(tmp_path, capsys):
    """Run A answers A everywhere (right on even indexes), run B answers B on 0..5 and A elsewhere: items 0, 2, 4
    turn wrong and 1, 3, 5 right; overall stays 50 %. Computed by hand from the two verdict lists."""
    rows = _rows()
    a = _run(tmp_path, "a", {str(r["index"]): "A" for r in rows}, rows)
    b = _run(tmp_path, "b", {str(r["index"]): "B" if r["index"] < 6 else "A" for r in rows}, rows)
    result = compare(a, b)
    assert result["count"] == 12
    overall = next(g for g in result["groups"] if g["column"] == "overall")
    assert (overall["a"], overall["b"], overall["difference"]) == (0.5, 0.5, 0.0)
    assert overall["ci95"][0] <= 0.0 <= overall["ci95"][1]
    by_category = {g["value"]: g for g in result["groups"] if g["column"] == "category"}
    # c0 = {0, 3, 6, 9}: A right on 0, 6; B right on 3, 6 -> 0.5 / 0.5; c1 = {1, 4, 7, 10}: A 4, 10; B 1, 10
    assert by_category["c0"]["difference"] == 0.0 and by_category["c1"]["difference"] == 0.0
    assert sorted(c["index"] for c in result["changed"]) == ["0", "1", "2", "3", "4", "5"]
    assert main(["eval", "compare", str(a), str(b)]) == 0
    printed = capsys.readouterr().out
    assert "6 items changed verdict" in printed and "category=c2" in printed
