"""Issue 27 item 10: every reader / scorer failure is one line on stderr with exit code 2 and nothing written; the
cases that are not failures (a torn last line, a pipe) are handled and said."""
import json
import os
import threading

import pytest
from eval_fixtures import png_base64, write_csv, write_json, write_tsv

from gmaivl_rt.cli import main
from gmaivl_rt.eval import evaluate, score

IMAGE = png_base64((5, 5, 5))


@pytest.fixture
def bench(tmp_path):
    return write_tsv(tmp_path / "bench.tsv", [{"index": i, "image": IMAGE, "question": "Colour?", "A": "red",
                                               "B": "blue", "answer": "A"} for i in range(3)])


def _fails(capsys, argv, match: str, out=None):
    """Runs the command line; asserts exit 2, one stderr line holding `match`, no traceback, `out` not created."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert match in err, err
    if out is not None:
        assert not out.exists()


def _lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_reader_failures_are_one_line(tmp_path, capsys, bench):
    """Mutants seen failing: the VQA-RAD CSV header check removed (KeyError 'answer' traceback); a non-list
    options string passed on (the kit's IndexError); the CSV decode error not caught."""
    out = tmp_path / "out"
    pmc = write_csv(tmp_path / "test_clean.csv", ["Figure_path", "Question", "Answer", "Choice A", "Choice B",
                                                  "Answer_label"], [["a.jpg", "q", "CT", "A:CT", "B:MRI", "A"]])
    predictions = _lines(tmp_path / "p.jsonl", [{"index": "0", "prediction": "CT"}])
    _fails(capsys, ["eval", "score", predictions, "--data", pmc, "--format", "vqa-rad", "--out", out],
           "missing field(s) image, question, answer", out)
    huatuo = write_json(tmp_path / "h.json", [{"question": "q", "options": "Yes or No", "answer": "Yes",
                                               "image": []}])
    _fails(capsys, ["eval", "score", predictions, "--data", huatuo, "--format", "huatuo", "--out", out],
           "`options` is a string that is not a list literal", out)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("image,question,answer\na.jpg,Is it \u00e9dema?,yes\n".encode("latin-1"))
    _fails(capsys, ["eval", "score", predictions, "--data", latin, "--out", out], "is not a readable UTF-8 CSV", out)
    existing = tmp_path / "a-file"
    existing.write_text("keep me")
    _fails(capsys, ["eval", "score", predictions, "--data", bench, "--out", existing], "is an existing file")
    assert existing.read_text() == "keep me"


@pytest.mark.parametrize("rows, match", [
    ([], "holds no predictions"),
    ([{"index": 0, "prediction": "A"}, {"index": 0, "prediction": "B"}], "index '0' occurs twice"),
    ([{"index": 0, "prediction": None}], "`prediction` is NoneType, not text"),
    # a line from another benchmark whose index happens to exist here: its recorded answer / prompt differ
    ([{"index": 1, "prediction": "A", "answer": "C"}], "not this benchmark's"),
    ([{"index": 2, "prediction": "A", "prompt": "<image>\nWhich organ?"}], "not this benchmark's"),
    (["{not json"], "line 1: not valid JSON"),
])
def test_prediction_file_failures_are_one_line(tmp_path, capsys, bench, rows, match):
    """Mutants seen failing: the duplicate check removed (the last line silently wins); the prompt/answer check
    removed (another dataset's answers scored); `null` accepted (scored as the text "None")."""
    predictions = _lines(tmp_path / "p.jsonl", rows)
    _fails(capsys, ["eval", "score", predictions, "--data", bench, "--out", tmp_path / "out"], match,
           tmp_path / "out")


def test_torn_last_line_is_dropped_with_a_warning_and_a_pipe_is_read(tmp_path, bench):
    predictions = tmp_path / "p.jsonl"
    predictions.write_text(json.dumps({"index": 0, "prediction": "A"}) + "\n" + '{"index": 1, "predi')
    with pytest.warns(UserWarning, match="last line is incomplete"):
        scores = score(predictions, bench, tmp_path / "out")
    assert scores["count"] == 1
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(json.dumps({"index": 2, "prediction": "B"}) + "\n"))
    writer.start()
    scores = score(fifo, bench, tmp_path / "out2")
    writer.join(timeout=30)
    assert scores["count"] == 1 and scores["overall"] == 0.0


def test_a_missing_image_fails_before_the_model_loads(tmp_path, capsys):
    """The model folder does not exist: the error names the image, so it was found first (nothing generated, no
    run.json). Mutant seen failing: `_check_images` not called (the model's error instead)."""
    (tmp_path / "imgs").mkdir()
    data = write_json(tmp_path / "test.json", [{"qid": 1, "img_name": "gone.png", "question": "q", "answer": "Yes",
                                                "answer_type": "CLOSED", "q_lang": "en"}])
    out = tmp_path / "out"
    _fails(capsys, ["eval", tmp_path / "no-model", "--data", data, "--out", out, "--no-progress"],
           "benchmark item 1: image 1 was not found", out)
    with pytest.raises(ValueError, match="image 1 was not found"):
        evaluate(tmp_path / "no-model", data, out, progress=False)
