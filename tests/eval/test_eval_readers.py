"""Each benchmark format read from small files written here, as the public kits read them."""
import pytest
from eval_fixtures import image_file, png_base64, write_csv, write_json, write_tsv

from gmaivl_rt.errors import InputError
from gmaivl_rt.eval.prompts import item_prompt
from gmaivl_rt.eval.readers import MISSING_ANSWER, Base64Image, detect_format, read_benchmark
from gmaivl_rt.eval.scoring import score_prediction


def test_vlmevalkit_tsv_image_reuse_nan_options_hint_and_unscored_rows(tmp_path):
    red = png_base64((200, 0, 0))
    path = write_tsv(tmp_path / "bench.tsv", [
        {"index": 1, "image": red, "question": "Colour?", "hint": "Look closely.", "A": "red", "B": "blue",
         "C": "green", "D": "grey", "answer": "A", "category": "colour", "l2-category": "basic", "split": "dev",
         "clinical vqa task": "AR", "department": "radiology"},
        # image "1" (<= 64 chars) reuses row 1's image; C empty and D "NaN" are absent options, as pandas reads them
        {"index": 2, "image": "1", "question": "Colour again?", "hint": None, "A": "red", "B": "blue", "C": None,
         "D": "NaN", "answer": "B", "category": "colour", "l2-category": "basic", "split": "dev"},
        # no answer while other rows have one: VLMEvalKit's answer map holds NaN, so it counts wrong
        {"index": 3, "image": "1", "question": "And now?", "A": "red", "B": "blue", "C": "x", "D": "y",
         "answer": None, "category": "colour", "split": "test"},
    ])
    bench = read_benchmark(path)
    assert (bench.format, bench.protocol) == ("vlmevalkit", "mcq")
    first, second, third = bench.items
    assert first.images == [Base64Image(red)] and second.images == [Base64Image(red)] == third.images
    assert second.options == {"A": "red", "B": "blue"}
    assert third.answer == MISSING_ANSWER and first.answer == "A"
    assert score_prediction(third, "A")["correct"] is False
    assert first.groups == {"category": "colour", "l2-category": "basic", "clinical vqa task": "AR",
                            "department": "radiology"}
    assert (first.split, third.split) == ("dev", "test")  # reported per split, never as a group of the pool
    # LLaVA-XTuner's prompt: hint, question, options, the instruction; image first
    assert item_prompt(first) == ("<image>\nLook closely.\nColour?\nA. red\nB. blue\nC. green\nD. grey\n"
                                  "Answer with the option's letter from the given choices directly.")
    assert item_prompt(second) == ("<image>\nColour again?\nA. red\nB. blue\n"
                                   "Answer with the option's letter from the given choices directly.")


def test_vlmevalkit_tsv_bad_rows_are_named(tmp_path):
    rows = [{"index": 1, "image": "7", "question": "q", "A": "a", "B": "b", "answer": "A"}]
    with pytest.raises(InputError, match="index 1: its image refers to index '7'"):
        read_benchmark(write_tsv(tmp_path / "a.tsv", rows))


def test_vlmevalkit_tsv_open_question_scored_as_mmmu_preproc_does(tmp_path):
    """VLMEvalKit e8e78f0 `mcq_vanilla_eval`: for a dataset named *MMMU*, `MMMU_preproc` makes an option-less
    row A = its answer, B = "Other Answers", and the answer map keeps a one-capital-letter answer, else A.
    Mutant seen failing: gold always A (the old rule) fails the "B" row of test_mmmu_single_letter_answers."""
    path = write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", [{"index": 5, "image": png_base64((0, 0, 9)),
                                                      "question": "Dose in mg?", "A": None, "B": None,
                                                      "answer": "42"}])
    item = read_benchmark(path).items[0]
    assert item.options == {} and item_prompt(item).endswith("Dose in mg?\nAnswer with the option's letter from "
                                                             "the given choices directly.")
    assert item.scoring_options == {"A": "42", "B": "Other Answers"} and item.answer == "A"
    assert score_prediction(item, "42 mg")["correct"] is True
    assert score_prediction(item, "7 mg")["correct"] is False


def test_vlmevalkit_tsv_image_path_and_chinese_instruction(tmp_path):
    image_file(tmp_path / "images" / "x.png")
    path = write_tsv(tmp_path / "p.tsv", [{"index": 0, "image_path": "x.png", "question": "这是什么颜色？",
                                           "A": "红", "B": "蓝", "answer": "A"}])
    item = read_benchmark(path).items[0]
    assert item.images == [tmp_path / "images" / "x.png"]
    assert item_prompt(item).endswith("\n请直接回答选项字母。")


def test_huatuo_json_mcq_filters_like_score_mix_llava(tmp_path):
    """HuatuoGPT-Vision eval.py `TestDataset` numbers the items 1..N as test_id (whatever the file says), and
    scorer.py `score_mix_llava` drops open items and items without options: a repeated test_id in the file keeps
    both items. Mutant seen failing: keeping the first item per file test_id (the old rule)."""
    image_file(tmp_path / "images" / "a.png")
    data = [
        {"question": "Q1", "options": ["left", "right"], "answer": "right", "image": ["images/a.png"],
         "dataset": "VQA-RAD", "subset": "", "question_type": "closed", "test_id": 1},
        {"question": "Q1 again", "options": ["left", "right"], "answer": "left", "image": ["images/a.png"],
         "dataset": "VQA-RAD", "question_type": "closed", "test_id": 1},            # same test_id: renumbered, kept
        {"question": "Q2", "options": [], "answer": "x", "image": [], "dataset": "SLAKE", "test_id": 2},  # no options
        {"question": "Q3", "options": ["a", "b"], "answer": "a", "image": [], "dataset": "SLAKE",
         "question_type": "open", "test_id": 3},                                   # open: dropped
        {"question": "Q4", "options": ["CT", "MRI", "X-ray"], "answer": "?", "image": [], "dataset": "PMC-VQA",
         "subset": "s1", "test_id": 4},
    ]
    bench = read_benchmark(write_json(tmp_path / "medical_multimodel_evaluation_data.json", data))
    assert (bench.format, bench.protocol) == ("huatuo", "mcq")
    assert [i.index for i in bench.items] == ["1", "2", "5"]
    first, second, last = bench.items
    assert first.answer == "B" and first.options == {"A": "left", "B": "right"} and first.scorer == "huatuo"
    assert second.answer == "A"
    assert first.images == [tmp_path / "images" / "a.png"]
    assert last.answer == "?" and last.groups == {"dataset": "PMC-VQA", "subset": "PMC-VQA_s1"}
    closed_open = read_benchmark(tmp_path / "medical_multimodel_evaluation_data.json", protocol="closed-open")
    assert [i.kind for i in closed_open.items] == ["closed", "closed", "closed", "open", "closed"]


def test_slake_english_questions_and_image_folder(tmp_path):
    image_file(tmp_path / "imgs" / "xmlab1" / "source.jpg")
    data = [
        {"qid": 11, "img_name": "xmlab1/source.jpg", "question": "Is this a CT?", "answer": "Yes",
         "answer_type": "CLOSED", "q_lang": "en", "modality": "CT", "content_type": "Modality", "location": "Lung"},
        {"qid": 12, "img_name": "xmlab1/source.jpg", "question": "这是CT吗？", "answer": "是", "answer_type": "CLOSED",
         "q_lang": "zh", "modality": "CT"},
        {"qid": 13, "img_name": "xmlab1/source.jpg", "question": "Which organ?", "answer": "Lung",
         "answer_type": "OPEN", "q_lang": "en", "modality": "CT", "content_type": "Organ", "location": "Lung"},
    ]
    bench = read_benchmark(write_json(tmp_path / "test.json", data))
    assert (bench.format, bench.protocol) == ("slake", "closed-open")
    assert [(i.index, i.kind) for i in bench.items] == [("11", "closed"), ("13", "open")]
    assert bench.items[0].images == [tmp_path / "imgs" / "xmlab1" / "source.jpg"]
    assert bench.items[1].groups == {"answer_type": "open", "modality": "CT", "content_type": "Organ",
                                     "location": "Lung"}
    assert item_prompt(bench.items[1]) == "<image>\nWhich organ?\nAnswer the question using a single word or phrase."
    with pytest.raises(InputError, match="SLAKE has no options"):
        read_benchmark(tmp_path / "test.json", protocol="mcq")


def test_vqa_rad_osf_json_test_split_and_csv_rows(tmp_path):
    data = [
        {"qid": 1, "image_name": "synpic1.jpg", "question": "Is there a fracture?", "answer": "no",
         "answer_type": "CLOSED", "question_type": "ABN", "phrase_type": "test_freeform"},
        {"qid": 2, "image_name": "synpic1.jpg", "question": "Where?", "answer": "left", "answer_type": "OPEN",
         "question_type": "POS", "phrase_type": "freeform"},                     # training question: dropped
        {"qid": 3, "image_name": "synpic2.jpg", "question": "Which lobe?", "answer": "right upper lobe",
         "answer_type": "OPEN ", "question_type": "POS", "phrase_type": "test_para"},
    ]
    image_file(tmp_path / "VQA_RAD Image Folder" / "synpic1.jpg")
    bench = read_benchmark(write_json(tmp_path / "VQA_RAD Dataset Public.json", data))
    assert (bench.format, bench.protocol) == ("vqa-rad", "closed-open")
    assert [(i.index, i.kind, i.groups["question_type"]) for i in bench.items] == [("1", "closed", "ABN"),
                                                                                   ("3", "open", "POS")]
    assert bench.items[0].images == [tmp_path / "VQA_RAD Image Folder" / "synpic1.jpg"]
    rows = write_csv(tmp_path / "vqa_rad_test.csv", ["image", "question", "answer"],
                     [["a.jpg", "Is it normal?", "Yes"], ["a.jpg", "What organ?", "liver"]])
    assert [i.kind for i in read_benchmark(rows).items] == ["closed", "open"]


def test_pmc_vqa_csv_strips_option_prefixes(tmp_path):
    path = write_csv(tmp_path / "test_clean.csv",
                     ["Figure_path", "Question", "Answer", "Choice A", "Choice B", "Choice C", "Choice D",
                      "Answer_label"],
                     [["PMC1_F1.jpg", "What is shown?", "CT", "A:CT", "B: MRI ", "C:X-ray", "D:Ultrasound", "A"]])
    bench = read_benchmark(path)
    assert (bench.format, bench.protocol) == ("pmc-vqa", "mcq")
    item = bench.items[0]
    assert item.options == {"A": "CT", "B": "MRI", "C": "X-ray", "D": "Ultrasound"} and item.answer == "A"
    assert item.images == [tmp_path / "PMC1_F1.jpg"]


def test_unknown_format_is_named(tmp_path):
    path = write_json(tmp_path / "other.json", [{"foo": 1}])
    with pytest.raises(InputError, match="cannot tell its format"):
        detect_format(path)
    with pytest.raises(InputError, match="does not exist"):
        read_benchmark(tmp_path / "missing.tsv")
