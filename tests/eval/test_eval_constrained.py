"""`gmaivl-rt eval --constrained` (issue 26 item 3): multiple-choice items decode under choice = their option
letters, closed yes/no items under choice = yes/no, each row of a batch under its own constraint. References: the
benchmark file's own option letters (read back with pandas, not our reader), `ask` on each item alone with the same
choice, and the unconstrained run of the same file (kept apart: a constrained run never resumes or merges with it)."""
from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("llguidance", reason="structured output needs the grammar engine: pip install 'gmaivl-rt[structured]'")
pd = pytest.importorskip("pandas")

import gmaivl_rt  # noqa: E402
from gmaivl_rt.cli import main  # noqa: E402
from gmaivl_rt.errors import InputError  # noqa: E402
from gmaivl_rt.eval import evaluate  # noqa: E402
from gmaivl_rt.eval.prompts import DECODING, mcq_prompt  # noqa: E402
from gmaivl_rt.eval.readers import read_benchmark  # noqa: E402
from gmaivl_rt.eval.run import CONSTRAINED_NOTE  # noqa: E402


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(colour_model_dir, colour_bench_file, tmp_path_factory):
    free, constrained = tmp_path_factory.mktemp("free"), tmp_path_factory.mktemp("constrained")
    return (free, evaluate(colour_model_dir, colour_bench_file, free, batch_size=4, progress=False),
            constrained, evaluate(colour_model_dir, colour_bench_file, constrained, batch_size=4, progress=False,
                                  constrained=True))


def test_constrained_mcq_answers_are_option_letters_each_as_alone(colour_model_dir, colour_bench_file, runs):
    """Every prediction is one of its row's option letters in the TSV (a row with three options never answers
    D), parsed, and equal to `ask` with that choice on the item alone (a batch of 4 rows with their own choice
    lists); run.json and scores.json say the run was constrained, the unconstrained run says it was not.
    Mutants seen failing: `item_constraint` giving every item A-D (row 5 may answer D); the per-row constraint
    list replaced by the first row's constraint; the note left out."""
    free, free_scores, constrained, scores = runs
    table = pd.read_csv(colour_bench_file, sep="\t", dtype=str, keep_default_na=False)
    letters = {str(row["index"]): [c for c in "ABCD" if row.get(c, "")] for _, row in table.iterrows()}
    lines = _lines(constrained / "predictions.jsonl")
    assert len(lines) == len(table) and any(len(v) == 3 for v in letters.values())
    for line in lines:
        assert line["prediction"] in letters[str(line["index"])], line
        assert line["parsed"] is True
    backend = gmaivl_rt.load(colour_model_dir)
    for item, line in zip(read_benchmark(colour_bench_file).items, lines):
        image = base64.b64decode(item.images[0].data) if hasattr(item.images[0], "data") else item.images[0]
        assert line["prediction"] == backend.ask(mcq_prompt(item.question, item.options, item.hint), image,
                                                 choice=list(item.options), **DECODING["mcq"])
    run, free_run = (json.loads((d / "run.json").read_text()) for d in (constrained, free))
    assert run["constrained"] is True and free_run["constrained"] is False
    assert CONSTRAINED_NOTE in run["notes"] and CONSTRAINED_NOTE in scores["notes"]
    assert CONSTRAINED_NOTE not in free_scores["notes"]
    assert scores["unparsed"] == 0


def test_a_constrained_run_never_resumes_or_merges_an_unconstrained_one(colour_model_dir, colour_bench_file, runs,
                                                                        tmp_path):
    """Mutants seen failing: "constrained" left out of the resume check; left out of the merge check."""
    free, _, constrained, _ = runs
    shutil.copytree(free, tmp_path / "free")
    with pytest.raises(InputError, match="constrained differs"):
        evaluate(colour_model_dir, colour_bench_file, tmp_path / "free", batch_size=4, progress=False,
                 resume=True, constrained=True)
    for i, flag in enumerate((False, True)):
        evaluate(colour_model_dir, colour_bench_file, tmp_path / f"shard{i}", batch_size=4, progress=False,
                 shard=(i, 2), constrained=flag)
    with pytest.raises(InputError, match="constrained differs"):
        from gmaivl_rt.eval.run import merge

        merge([tmp_path / "shard0", tmp_path / "shard1"], tmp_path / "merged")


def test_cli_constrained_closed_yes_no(colour_model_dir, tmp_path):
    """A closed yes/no question answers "yes" or "no" under --constrained; an open one stays free. Mutant: the
    yes/no rule removed from `item_constraint`."""
    from eval_fixtures import image_file, write_json

    image_file(tmp_path / "imgs" / "red.png")
    data = write_json(tmp_path / "test.json", [
        {"qid": i, "img_name": "red.png", "question": q, "answer": a, "answer_type": t, "q_lang": "en"}
        for i, (q, a, t) in enumerate([("Is the image red?", "Yes", "CLOSED"), ("Is it blue?", "no", "CLOSED"),
                                       ("Which colour is the image?", "red", "OPEN")])])
    assert main(["eval", str(colour_model_dir), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--constrained", "--no-progress"]) == 0
    lines = _lines(tmp_path / "run" / "predictions.jsonl")
    assert [line["prediction"] in ("yes", "no") for line in lines[:2]] == [True, True]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["constrained"] is True
