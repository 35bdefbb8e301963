"""The evaluation runner end to end with a tiny model: batched answers equal one-by-one `ask`, rescoring equals
the run, a run killed with SIGKILL resumes to the same scores, and the onnx backend predicts what torch does."""
import base64
import json
import time
from pathlib import Path

import pytest

import gmaivl_rt
from gmaivl_rt.cli import main
from gmaivl_rt.eval import evaluate, score
from gmaivl_rt.eval.prompts import DECODING, mcq_prompt
from gmaivl_rt.eval.readers import read_benchmark
from gmaivl_rt.runtime.generation_config import PLAIN_GREEDY

@pytest.fixture(scope="module")
def full_run(colour_model_dir, colour_bench_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return out, evaluate(colour_model_dir, colour_bench_file, out, batch_size=4, progress=False)


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_batched_answers_equal_one_by_one_ask(colour_model_dir, colour_bench_file, full_run):
    out, scores = full_run
    lines = _lines(out / "predictions.jsonl")
    items = read_benchmark(colour_bench_file).items
    assert [line["index"] for line in lines] == [item.index for item in items]
    backend = gmaivl_rt.load(colour_model_dir)
    for item, line in zip(items[:4], lines):
        image = base64.b64decode(item.images[0].data)  # the TSV's PNG bytes, as ask takes them
        assert line["prediction"] == backend.ask(mcq_prompt(item.question, item.options, item.hint), image,
                                                 **DECODING["mcq"])
    # every output the issue names is there, and run.json records how the answers were made
    for name in ("scores.json", "scores_by_category.csv", "scores_by_split.csv", "scores.png", "run.json"):
        assert (out / name).is_file(), name
    run = json.loads((out / "run.json").read_text())
    assert run["decoding"] == {**PLAIN_GREEDY, **DECODING["mcq"]} and run["status"] == "done"
    assert run["backend"] == "torch" and run["generation_config"].startswith("auto: no generation_config.json")
    # splits are reported separately (VLMEvalKit report_acc), the headline being "test"
    assert scores["split"] == "test" and set(scores["splits"]) == {"dev", "test"}
    for name, figures in scores["splits"].items():
        mine = [line for line in lines if line["split"] == name]
        assert figures["count"] == len(mine) == 4
        assert figures["overall"] == pytest.approx(sum(line["correct"] for line in mine) / 4)
        low, high = figures["ci95"]
        assert low <= figures["overall"] <= high
    assert scores["overall"] == scores["splits"]["test"]["overall"] and set(scores["by"]) == {"category"}


def test_rescoring_gives_the_runs_scores(colour_bench_file, full_run, tmp_path):
    out, scores = full_run
    # only `index` and `prediction` are needed
    slim = tmp_path / "slim.jsonl"
    slim.write_text("".join(json.dumps({"index": line["index"], "prediction": line["prediction"]}) + "\n"
                            for line in _lines(out / "predictions.jsonl")))
    assert score(slim, colour_bench_file, tmp_path / "rescored") == scores
    assert main(["eval", "score", str(out / "predictions.jsonl"), "--data", str(colour_bench_file), "--out",
                 str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "scores.json").read_text()) == json.loads((out / "scores.json").read_text())


def test_resume_after_sigkill_equals_an_uninterrupted_run(colour_model_dir, colour_bench_file, full_run, tmp_path, start_child):
    out = tmp_path / "killed"
    child = start_child(["eval", colour_model_dir, "--data", colour_bench_file, "--out", out, "--batch-size", "4", "--no-progress"])
    predictions = out / "predictions.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.alive():
        if predictions.is_file() and predictions.read_text().count("\n") >= 1:
            break
        time.sleep(0.02)
    child.kill()  # fails with the child's exit code and stderr if it died on its own
    written = predictions.read_text().count("\n")
    assert 1 <= written, "the run wrote nothing before the deadline"
    with open(predictions, "a") as f:  # what a kill in the middle of a write leaves
        f.write('{"index": "10')
    assert main(["eval", str(colour_model_dir), "--data", str(colour_bench_file), "--out", str(out), "--batch-size", "4",
                 "--no-progress"]) == 2  # predictions exist: refuses without --resume
    assert main(["eval", str(colour_model_dir), "--data", str(colour_bench_file), "--out", str(out), "--batch-size", "4",
                 "--resume", "--no-progress"]) == 0
    full_out, full_scores = full_run
    assert json.loads((out / "scores.json").read_text()) == full_scores
    resumed = sorted(_lines(predictions), key=lambda line: line["index"])
    assert resumed == sorted(_lines(full_out / "predictions.jsonl"), key=lambda line: line["index"])


def test_onnx_backend_predicts_what_torch_predicts(colour_model_dir, colour_bench_file, full_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from gmaivl_rt.export.onnx_export import export_onnx

    export_onnx(colour_model_dir, tmp_path / "onnx")
    scores = evaluate(tmp_path / "onnx", colour_bench_file, tmp_path / "out", backend="onnx", batch_size=4, progress=False)
    full_out, full_scores = full_run
    onnx_lines = _lines(tmp_path / "out" / "predictions.jsonl")
    assert [line["prediction"] for line in onnx_lines] == [line["prediction"]
                                                           for line in _lines(full_out / "predictions.jsonl")]
    assert scores == full_scores
    assert json.loads((tmp_path / "out" / "run.json").read_text())["backend"] == "onnx"


def test_an_unreadable_image_names_its_rows(colour_model_dir, tmp_path):
    from eval_fixtures import write_tsv

    garbage = base64.b64encode(b"not an image at all " * 8).decode()
    path = write_tsv(tmp_path / "bad.tsv", [{"index": 7, "image": garbage, "question": "q", "A": "x", "B": "y",
                                             "answer": "A"}])
    with pytest.raises(ValueError, match=r"benchmark items 7\.\.7: image 1"):
        evaluate(colour_model_dir, path, tmp_path / "out", progress=False)
