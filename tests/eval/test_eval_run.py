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


def test_shards_merge_into_the_unsharded_run(colour_model_dir, colour_bench_file, full_run, tmp_path, capsys):
    """`eval --shard I/N` answers batches I, I+N, ... of the unsharded run's fixed batches; `eval merge` joins the
    folders into predictions equal to the unsharded run's, line for line, and the same scores. Mutants seen
    failing: merge writing the shards one after another (order by shard, not benchmark); a shard taking every
    N-th item instead of whole batches (the batches, so the padding, would differ from the unsharded run's)."""
    assert main(["eval", str(colour_model_dir), "--data", str(colour_bench_file), "--out", str(tmp_path / "s1"),
                 "--batch-size", "4", "--shard", "1/2", "--no-progress"]) == 0
    first = evaluate(colour_model_dir, colour_bench_file, tmp_path / "s0", batch_size=4, shard=(0, 2), progress=False)
    full_out, full_scores = full_run
    unsharded = [line["index"] for line in _lines(full_out / "predictions.jsonl")]
    assert [line["index"] for line in _lines(tmp_path / "s0" / "predictions.jsonl")] == unsharded[:4]  # batch 0
    assert first["predicted"] == 4
    assert main(["eval", "merge", str(tmp_path / "s1"), "--out", str(tmp_path / "bad")]) == 2
    assert "a merge needs each of 0..1 once" in capsys.readouterr().err
    assert main(["eval", "merge", str(tmp_path / "s1"), str(tmp_path / "s0"), "--out", str(tmp_path / "m")]) == 0
    merged = _lines(tmp_path / "m" / "predictions.jsonl")
    assert merged == _lines(full_out / "predictions.jsonl")
    assert json.loads((tmp_path / "m" / "scores.json").read_text()) == full_scores
    run = json.loads((tmp_path / "m" / "run.json").read_text())
    assert run["status"] == "done" and run["shard"] is None and len(run["merged_from"]) == 2


def test_a_failed_first_batch_leaves_no_predictions_and_a_failed_run_json(colour_model_dir, tmp_path):
    """Mutants seen failing: the predictions file opened before the first answer (an empty file that makes a
    plain rerun refuse); run.json left "running"."""
    from eval_fixtures import write_tsv

    garbage = base64.b64encode(b"not an image at all " * 8).decode()
    path = write_tsv(tmp_path / "bad.tsv", [{"index": 7, "image": garbage, "question": "q", "A": "x", "B": "y",
                                             "answer": "A"}])
    with pytest.raises(ValueError):
        evaluate(colour_model_dir, path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "predictions.jsonl").exists()
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["status"] == "failed" and "benchmark items 7..7" in run["error"]


def test_closed_open_run_records_its_scorer(colour_model_dir, tmp_path):
    """run.json and scores.json name the closed/open rule; `eval score --scorer` rescoring the run's answers under
    the other kit gives that kit's verdicts (`closed_open_score`). Mutant seen failing: run.json without the
    scorer."""
    from eval_fixtures import image_file, write_json

    from gmaivl_rt.eval.scoring import closed_open_score

    image_file(tmp_path / "imgs" / "red.png")
    data = write_json(tmp_path / "test.json", [
        {"qid": 1, "img_name": "red.png", "question": "Is the image red?", "answer": "Yes", "answer_type": "CLOSED",
         "q_lang": "en"},
        {"qid": 2, "img_name": "red.png", "question": "Which colour is the image?", "answer": "red",
         "answer_type": "OPEN", "q_lang": "en"}])
    assert main(["eval", str(colour_model_dir), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--scorer", "lmms-eval", "--no-progress"]) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    scores = json.loads((tmp_path / "run" / "scores.json").read_text())
    assert run["scorer"] == scores["scorer"] == "lmms-eval" and run["decoding"]["max_new_tokens"] == 32
    lines = _lines(tmp_path / "run" / "predictions.jsonl")
    assert main(["eval", "score", str(tmp_path / "run" / "predictions.jsonl"), "--data", str(data), "--out",
                 str(tmp_path / "rescored"), "--scorer", "llava-med"]) == 0
    rescored = _lines(tmp_path / "rescored" / "predictions.jsonl")
    for line, again, kind, gold in zip(lines, rescored, ("closed", "open"), ("Yes", "red")):
        assert line["correct"] == closed_open_score(kind, line["prediction"], gold, "lmms-eval")["correct"]
        assert again["correct"] == closed_open_score(kind, line["prediction"], gold, "llava-med")["correct"]
    assert json.loads((tmp_path / "rescored" / "scores.json").read_text())["scorer"] == "llava-med"
