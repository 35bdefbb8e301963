"""The kits' own rules where they differ from a plain reading (issue 27), scored through `eval score` on small files
written here. The expected verdicts and figures were checked while writing these tests by running the kit's own
Python code on the same file and predictions: VLMEvalKit main e8e78f0 (`dataset/utils/multiple_choice.py`
`mcq_vanilla_eval` / `mcq_circular_eval` / `report_acc` with `utils/matching_util.py`, as
`ImageMCQDataset.evaluate` feeds them under `exact_matching`), LLaVA-Med v1.0.0 `llava/eval/run_eval.py` and
lmms-eval 75571cf `lmms_eval/tasks/slake/utils.py`; HuatuoGPT-Vision's `eval.py` / `scorer.py` (whose evaluation
code is not in the authors' current repository snapshot) were read from a stored copy, not run. The kits are not
imported here: each docstring states the rule."""
import json

import pytest
from eval_fixtures import image_file, png_base64, write_json, write_tsv

from gmaivl_rt.cli import main
from gmaivl_rt.errors import InputError
from gmaivl_rt.eval import score
from gmaivl_rt.eval.prompts import decoding_for, item_prompt
from gmaivl_rt.eval.readers import read_benchmark

IMAGE = png_base64((1, 2, 3))


def _predictions(path, answers: dict) -> str:
    path.write_text("".join(json.dumps({"index": k, "prediction": v}) + "\n" for k, v in answers.items()))
    return str(path)


def _verdicts(out) -> dict:
    return {line["index"]: line["correct"] for line in map(json.loads, (out / "predictions.jsonl").read_text()
                                                             .splitlines())}


def test_score_writes_per_item_verdicts_and_capitalised_columns_and_tsv_quirks(tmp_path):
    """Items 1 and 6. VLMEvalKit: `ImageBaseDataset` drops rows whose `image` cell is empty (skip_noimg);
    `evaluate` lower-cases every column name but the option letters, so `Category` / `L2-category` are reported;
    the answer map takes `answer` as written, so gold "B " never equals the extracted "B" and an empty answer cell
    (NaN) counts wrong; a row without options outside MMMU has nothing to extract (Z) and counts wrong. The kit's
    hits on this file: {1: 0, 2: 1, 3: 1, 5: 0, 6: 0}; report_acc: Overall 0.4, c1 0.5, c2 1/3, l1 0.0, l2 0.5.
    Mutants seen failing: stripping the answer cell; leaving a missing answer unscored; no lower-casing."""
    rows = [
        {"index": 1, "image": IMAGE, "question": "q", "A": "x", "B": "y", "answer": "B ", "Category": "c1",
         "L2-category": "l1"},
        {"index": 2, "image": IMAGE, "question": "q", "A": "x", "B": "y", "answer": "B", "Category": "c1",
         "L2-category": "l2"},
        {"index": 3, "image": IMAGE, "question": "q", "A": "x", "B": "y", "answer": "A", "Category": "c2",
         "L2-category": "l2"},
        {"index": 4, "image": None, "question": "q", "A": "x", "B": "y", "answer": "A", "Category": "c2",
         "L2-category": "l2"},
        {"index": 5, "image": IMAGE, "question": "q", "A": "x", "B": "y", "answer": None, "Category": "c2",
         "L2-category": "l2"},
        {"index": 6, "image": IMAGE, "question": "open q", "A": None, "B": None, "answer": "7", "Category": "c2",
         "L2-category": "l2"},
    ]
    data = write_tsv(tmp_path / "quirks.tsv", rows)
    predictions = _predictions(tmp_path / "p.jsonl", {"1": "B", "2": "B", "3": "A", "5": "A", "6": "7"})
    assert main(["eval", "score", predictions, "--data", str(data), "--out", str(tmp_path / "out")]) == 0
    assert _verdicts(tmp_path / "out") == {"1": False, "2": True, "3": True, "5": False, "6": False}
    first = json.loads((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()[0])
    assert {"index", "prediction", "extracted", "answer", "correct", "category", "l2-category"} <= set(first)
    assert (first["extracted"], first["answer"]) == ("B", "B ")
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert scores["overall"] == pytest.approx(0.4) and scores["count"] == 5
    assert {v: f["accuracy"] for v, f in scores["by"]["category"].items()} == pytest.approx({"c1": 0.5, "c2": 1 / 3})
    assert {v: f["accuracy"] for v, f in scores["by"]["l2-category"].items()} == pytest.approx({"l1": 0.0, "l2": 0.5})
    assert any("empty image cell dropped" in note for note in scores["notes"])


def test_whitespace_padding_is_seen_by_the_length_guard(tmp_path):
    """Item 2. VLMEvalKit scores `item['prediction']` unstripped: "coronal" + 60 spaces and + 80 newlines are
    longer than twice the option texts (2 x 20), so `can_infer_text` gives up -> Z (kit hits 0, 0, 1, 1: 50 %).
    Mutant seen failing: stripping the prediction before extraction (100 %)."""
    plane = {"A": "axial", "B": "coronal", "C": "sagittal"}
    data = write_tsv(tmp_path / "planes.tsv", [{"index": i, "image": IMAGE, "question": "Plane?", **plane,
                                                "answer": "B"} for i in range(4)])
    predictions = _predictions(tmp_path / "p.jsonl", {"0": "coronal" + " " * 60, "1": "coronal" + "\n" * 80,
                                                       "2": "coronal", "3": " B "})
    scores = score(predictions, data, tmp_path / "out")
    assert _verdicts(tmp_path / "out") == {"0": False, "1": False, "2": True, "3": True}
    assert scores["overall"] == 0.5


def test_mmmu_single_letter_answers_and_splits_reported_separately(tmp_path):
    """Items 3 and 4. VLMEvalKit `mcq_vanilla_eval` for a dataset named *MMMU*: `MMMU_preproc` sets A = the
    answer, B = "Other Answers" where A is empty, and the answer map keeps an answer that is one capital letter,
    else "A". So answer "C" + prediction "C" -> extracted A (text of option A) != "C": wrong; answer "B" +
    prediction "B" -> B: right; "42" + "42 mg" -> A: right. `report_acc` gives one Overall per split: validation
    0.5 (2 of 4), dev 1.0 (kit hits {1: 0, 2: 1, 3: 1, 4: 1, 5: 0}); pooled it would be 60 %.
    Mutants seen failing: gold always A for open rows; pooling splits into `overall`."""
    rows = [
        {"index": 1, "image": IMAGE, "question": "q", "A": None, "B": None, "answer": "C", "split": "validation"},
        {"index": 2, "image": IMAGE, "question": "q", "A": None, "B": None, "answer": "B", "split": "validation"},
        {"index": 3, "image": IMAGE, "question": "q", "A": None, "B": None, "answer": "42", "split": "validation"},
        {"index": 4, "image": IMAGE, "question": "q", "A": "x", "B": "y", "answer": "B", "split": "dev"},
        {"index": 5, "image": IMAGE, "question": "q", "A": "x", "B": "y", "answer": "A", "split": "validation"},
    ]
    data = write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", rows)
    predictions = _predictions(tmp_path / "p.jsonl", {"1": "C", "2": "B", "3": "42 mg", "4": "B", "5": "B"})
    scores = score(predictions, data, tmp_path / "out")
    assert _verdicts(tmp_path / "out") == {"1": False, "2": True, "3": True, "4": True, "5": False}
    assert scores["split"] == "validation" and scores["overall"] == 0.5 and scores["count"] == 4
    assert {name: f["overall"] for name, f in scores["splits"].items()} == {"dev": 1.0, "validation": 0.5}
    # the same open rows in a file not named MMMU: nothing to extract, counted wrong (the kit's generic path)
    other = write_tsv(tmp_path / "other.tsv", rows)
    score(predictions, other, tmp_path / "out2")
    assert _verdicts(tmp_path / "out2") == {"1": False, "2": False, "3": False, "4": True, "5": False}


def _rotations():
    rows = []
    for g in range(4):
        texts = ["red", "green", "blue", "grey"]
        for r in range(2):
            rotated = texts[r:] + texts[:r]
            rows.append({"index": g + r * 1_000_000, "image": IMAGE, "question": f"Colour {g}?",
                         **dict(zip("ABCD", rotated)), "answer": "ABCD"[rotated.index("red")]})
    predictions = {str(r["index"]): r["answer"] for r in rows}
    predictions["1000001"] = "C"      # group 1: its rotation is wrong
    predictions["2"] = "nonsense"     # group 2: its first copy cannot be read
    return rows, predictions


def test_circular_evaluation_where_the_file_has_rotations(tmp_path):
    """Item 5. VLMEvalKit `mcq_circular_eval` (datasets named mmbench / ccbench / circular / mmcr; g_index =
    index % 10**6 when the file has no column): a group counts only if every rotation's `can_infer` equals its own
    gold; under exact matching an unreadable one fails the group. Kit hits per group {0: 1, 1: 0, 2: 0, 3: 1}: 50 %
    where per-row scoring gives 75 % (6 of 8). Mutant seen failing: scoring the rows (vanilla)."""
    rows, answers = _rotations()
    predictions = _predictions(tmp_path / "p.jsonl", answers)
    scores = score(predictions, write_tsv(tmp_path / "MMBench_DEV_EN.tsv", rows), tmp_path / "out")
    assert scores["evaluation"] == "circular" and scores["count"] == 4 and scores["overall"] == 0.5
    lines = {line["index"]: line for line in map(json.loads, (tmp_path / "out" / "predictions.jsonl")
                                                   .read_text().splitlines())}
    assert {i: lines[i]["circular_correct"] for i in ("0", "1", "2", "3")} == {"0": True, "1": False, "2": False,
                                                                              "3": True}
    assert lines["1"]["correct"] is True  # each row keeps its own verdict beside its group's
    # the same rows under another name with a g_index column: circular here too (the kit decides by name)
    with_column = [{**r, "g_index": r["index"] % 1_000_000} for r in rows]
    scores = score(predictions, write_tsv(tmp_path / "rotated.tsv", with_column), tmp_path / "out2")
    assert scores["evaluation"] == "circular" and scores["overall"] == 0.5
    plain = [{k: v for k, v in r.items()} for r in rows]
    assert score(predictions, write_tsv(tmp_path / "plain.tsv", plain), tmp_path / "out3")["overall"] == 0.75


def test_huatuo_options_as_strings_english_prompt_and_decoding(tmp_path):
    """Item 7. HuatuoGPT-Vision eval.py `llava_prompt`: options given as a string are read with
    `ast.literal_eval`, the prompt is "{question}\\n{A. ..}\\nAnswer with the option's letter from the given choices
    directly." whatever the question's language, and `--max_new_tokens` defaults to 256. Mutants seen failing:
    options string taken character by character (13 options, gold "J"); the Chinese instruction."""
    image_file(tmp_path / "a.png")
    data = write_json(tmp_path / "medical_multimodel_evaluation_data.json", [
        {"question": "Is it normal?", "options": "['Yes', 'No']", "answer": "No", "image": ["a.png"],
         "dataset": "VQA-RAD"},
        {"question": "这是什么？", "options": ["CT", "MRI"], "answer": "MRI", "image": ["a.png"], "dataset": "SLAKE"},
    ])
    bench = read_benchmark(data)
    first, second = bench.items
    assert first.options == {"A": "Yes", "B": "No"} and first.answer == "B"
    assert item_prompt(second) == ("<image>\n这是什么？\nA. CT\nB. MRI\nAnswer with the option's letter from the "
                                   "given choices directly.")
    assert decoding_for(bench.protocol, bench.format)["max_new_tokens"] == 256
    assert decoding_for("mcq", "vlmevalkit")["max_new_tokens"] == 5


def _slake(tmp_path):
    image_file(tmp_path / "imgs" / "x.png")
    rows = [("No", "CLOSED", "not"), ("CT", "CLOSED", "CT scan"), ("X-Ray", "OPEN", "xray"), ("Two", "OPEN", "2"),
            ("Yes", "CLOSED", "Yes"), ("left lung", "OPEN", "The left lung.")]
    data = [{"qid": n, "img_name": "x.png", "question": f"  question {n}?  ", "answer": gold, "answer_type": kind,
             "q_lang": "en", "modality": "CT"} for n, (gold, kind, _) in enumerate(rows)]
    data += [{"qid": 100, "img_name": "x.png", "question": "upper-case language", "answer": "Yes",
              "answer_type": "CLOSED", "q_lang": "EN"},
             {"qid": 101, "img_name": "x.png", "question": "no language", "answer": "Yes", "answer_type": "CLOSED"},
             {"qid": 102, "img_name": "x.png", "question": "是CT吗？", "answer": "是", "answer_type": "CLOSED",
              "q_lang": "zh"}]
    answers = {str(n): prediction for n, (_, _, prediction) in enumerate(rows)} | {"100": "yes"}
    return write_json(tmp_path / "test.json", data), answers


def test_slake_scorers_reproduce_llava_med_and_lmms_eval(tmp_path):
    """Item 8. LLaVA-Med v1.0.0 run_eval (closed: "yes" or "no" a substring of the normalised prediction and the
    normalised gold a substring of it; open: token recall) on these seven items: closed 3 of 4 ("not" for No is
    right, "CT scan" for CT wrong, "Yes", "yes"), open recall (0 + 1 + 1) / 3. lmms-eval (exact match after its
    normalize_answer, all items): "xray" = X-Ray and "Yes"/"yes" right, nothing else: closed 2 / 4, open 1 / 3.
    scores.json names the scorer. Mutant seen failing: the default scorer switched to lmms-eval."""
    data, answers = _slake(tmp_path)
    predictions = _predictions(tmp_path / "p.jsonl", answers)
    llava = score(predictions, data, tmp_path / "llava")
    assert llava["scorer"] == "llava-med"
    assert (llava["closed"]["accuracy"], llava["closed"]["count"]) == (0.75, 4)
    assert llava["open"]["recall"] == pytest.approx(2 / 3) and llava["open"]["count"] == 3
    lmms = score(predictions, data, tmp_path / "lmms", scorer="lmms-eval")
    assert lmms["scorer"] == "lmms-eval"
    assert lmms["closed"]["accuracy"] == 0.5 and lmms["open"]["accuracy"] == pytest.approx(1 / 3)
    assert lmms["overall"] == pytest.approx(3 / 7)
    assert _verdicts(tmp_path / "lmms") == {"0": False, "1": False, "2": True, "3": False, "4": True, "5": False,
                                            "100": True}


def test_slake_language_follows_lmms_eval(tmp_path):
    """Item 9. lmms-eval `_process_docs`: keeps the items whose `str(q_lang or "").strip().lower()` is the task's
    language ("EN" kept, a missing q_lang dropped); `slake_doc_to_text` strips the question; slake_zh's
    post_prompt is "\\n请用一个词或短语回答问题。". Mutants seen failing: comparing q_lang as written; a missing
    q_lang read as "en"; the question not stripped."""
    data, _ = _slake(tmp_path)
    english = read_benchmark(data)
    assert [i.index for i in english.items] == ["0", "1", "2", "3", "4", "5", "100"]
    assert item_prompt(english.items[0]) == "<image>\nquestion 0?\nAnswer the question using a single word or phrase."
    chinese = read_benchmark(data, language="zh")
    assert [i.index for i in chinese.items] == ["102"]
    assert item_prompt(chinese.items[0]) == "<image>\n是CT吗？\n请用一个词或短语回答问题。"
    assert len(read_benchmark(data, language="all").items) == 9  # the missing q_lang too
    with pytest.raises(InputError, match="--lang"):
        read_benchmark(data, language="fr")


def test_score_reads_vlmevalkit_prediction_tables_as_the_kit_does(tmp_path):
    """VLMEvalKit writes predictions as `{model}_{dataset}.xlsx` (or .tsv with PRED_FORMAT=tsv): the TSV's columns
    plus `prediction`; its `evaluate` lower-cases column names and takes `str(prediction)`, so an empty cell is the
    text "nan" (unparsed, wrong) and padding is kept (kit hits on this file: 0, 1, 0).
    Mutant seen failing: the table's predictions stripped."""
    plane = {"A": "axial", "B": "coronal", "C": "sagittal"}
    rows = [{"index": i, "image": IMAGE, "question": "Plane?", **plane, "answer": "B"} for i in range(3)]
    data = write_tsv(tmp_path / "planes.tsv", rows)
    table = write_tsv(tmp_path / "model_planes.tsv", [{"Index": r["index"], "question": r["question"],
                                                       "Prediction": p} for r, p in
                                                      zip(rows, ["coronal" + " " * 60, "B", None])])
    scores = score(table, data, tmp_path / "out")
    assert _verdicts(tmp_path / "out") == {"0": False, "1": True, "2": False}
    assert scores["unparsed"] == 2
