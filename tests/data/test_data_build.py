"""The converter end to end: a manifest with every task, good and bad items, on pydicom / nibabel shipped files
and small synthetic images; output checked against the annotations it came from (boxes, labels, masks)."""
import json
import os
import re
import shutil

import numpy as np
import pytest
from dicom_files import DICOM_DIR
from manifest_sources import LABELS, make_sources
from nibabel.testing import data_path as NIFTI_DIR
from PIL import Image
from run_outputs import read_jsonl

from gmaivl_rt.cli import main as cli_main
from gmaivl_rt.data.build import build_dataset


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    manifest, expect = make_sources(root)
    out = root / "out"
    summary = build_dataset(out, manifest=manifest, seed=7, progress=False)
    return out, manifest, summary, expect


def records_of(out, name):
    return read_jsonl(out / "annotations" / f"{name}.jsonl")


def test_output_layout_and_record_format(built):
    out, _, summary, _ = built
    meta = json.loads((out / "meta.json").read_text())
    assert set(meta) == {"chest_cls", "organ_seg", "lesion_det", "ct_reports", "small_vqa"}
    total = 0
    for name, entry in meta.items():
        assert set(entry) == {"image_dir", "annotations", "sample_ratio", "length", "data_augment"}
        records = read_jsonl(out / entry["annotations"])
        assert entry["length"] == len(records) > 0
        total += len(records)
        ids = [r["id"] for r in records]
        assert len(set(ids)) == len(ids), "ids must be unique"
        for r in records:
            assert set(r) == {"image", "conversations", "id", "width", "height"}
            with Image.open(out / entry["image_dir"] / r["image"]) as im:
                assert im.size == (r["width"], r["height"]) and im.mode == "RGB"
            conv = r["conversations"]
            assert len(conv) >= 2 and len(conv) % 2 == 0
            assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
            assert conv[0]["value"].startswith("<image>\n")
            assert sum(t["value"].count("<image>") for t in conv) == 1
            assert all(t["value"].strip() for t in conv)
            dim, task, modality, dataset, label, file_part = r["id"].split("#")
            assert dim in ("2d", "3d") and dataset == name and re.fullmatch(r"[a-z0-9._+-]+", modality + label)
    assert summary["records"] == total
    # images are named by content: the same picture used by several datasets is stored once
    pngs = [p for p in (out / "images").rglob("*.png")]
    assert len(pngs) == len({p.name for p in pngs}) == summary["new_png_files"]
    assert len(pngs) < summary["images_converted"]


def test_bad_items_land_in_errors_and_good_items_are_all_written(built):
    out, _, summary, expect = built
    errors = read_jsonl(out / "errors.jsonl")
    assert {(e["dataset"], e["source"]) for e in errors} == expect["bad"]
    assert summary["errors"] == len(errors) == 8  # organ_seg/seg.png fails 3 times (size, empty, unnamed value)
    reasons = " | ".join(e["reason"] for e in errors)
    for needle in ("corrupt.png", "truncated.dcm", "notes.dcm: not a DICOM file", "badvr.dcm",
                   "does not match", "mask is empty", "mask values [7] have no label name",
                   "xray1.png: question and answer must both be text, or lists of the same length"):
        assert needle in reasons
    cls_sources = {r["id"].split("#")[-1] for r in records_of(out, "chest_cls")}
    assert cls_sources == {"xray0", "xray1", "xray2", "xray3", "ct"}
    assert summary["errors_by_kind"]["mask"] == 3


def test_classification_open_and_multiple_choice_are_grounded(built):
    out = built[0]
    records = records_of(out, "chest_cls")
    truth = {f"xray{i}": LABELS[i] for i in range(4)} | {"ct": "nodule"}
    kinds = {r["id"].split("#")[1] for r in records}
    assert kinds == {"cap", "cls", "cls-mc"}
    for r in records:
        _, kind, _, _, label, stem = r["id"].split("#")
        assert label == truth[stem]
        question, answer = r["conversations"][0]["value"], r["conversations"][1]["value"]
        if kind == "cls":
            assert truth[stem].lower() in answer.lower()
        if kind == "cls-mc":
            options = dict(re.findall(r"^([A-H])\. (.+)$", question, flags=re.M))
            assert truth[stem] in options.values() and set(options.values()) <= set(LABELS)
            assert len(options) == 4
            letter = answer.split(".")[0]
            assert options[letter] == truth[stem]


def test_segmentation_location_and_size_come_from_the_mask(built):
    out, _, summary, expect = built
    records = records_of(out, "organ_seg")
    seg2d = [r for r in records if r["id"].split("#")[1] == "seg" and r["id"].endswith("#seg")]
    assert len(seg2d) == 1
    text = json.dumps(seg2d[0]["conversations"])
    mask = np.asarray(Image.open(out.parent / "images" / "seg_mask.png"))
    ys, xs = np.nonzero(mask == 2)  # label value 2 -> "kidney"
    box = [xs.min() / 64, ys.min() / 48, (xs.max() + 1) / 64, (ys.max() + 1) / 48]
    assert "[" + ", ".join(f"{v:.3f}" for v in box) + "]" in text
    assert "kidney" in text and f"{100 * (mask == 2).mean():.1f}%" in text
    assert "upper" in text  # rows 10..19 of 48
    # 3D: 4 labelled slices kept, empty slices kept every 5th
    slices = [r for r in records if "anat_axial" in r["id"] and r["id"].split("#")[1] == "seg"]
    labelled = [r for r in slices if r["id"].split("#")[4] == "liver"]
    empty = expect["anat_axial_slices"] - expect["anat_mask_slices"]
    assert len(labelled) == expect["anat_mask_slices"]
    assert len(slices) - len(labelled) == (empty + 4) // 5
    assert summary["empty_slices_skipped"] == empty - (empty + 4) // 5


def test_detection_boxes_are_normalised_with_three_decimals(built):
    out = built[0]
    records = {r["id"].split("#")[-1]: r for r in records_of(out, "lesion_det") if "#det#" in r["id"]}
    answer = records["mr"]["conversations"][1]["value"]
    assert "[0.125, 0.250, 0.500, 0.750]" in answer and "[0.625, 0.000, 1.000, 0.156]" in answer  # 64x64 MR
    assert "no lesion" in records["xray1"]["conversations"][1]["value"].lower() or \
        "none" in records["xray1"]["conversations"][1]["value"].lower()


def test_report_and_vqa_keep_their_text(built):
    out = built[0]
    rep = [r for r in records_of(out, "ct_reports") if "#rep#" in r["id"]][0]
    assert "Small nodule in the left lower lobe." in rep["conversations"][1]["value"]
    assert "Follow-up CT in 6 months." in rep["conversations"][1]["value"]
    vqa = {r["id"].split("#")[-1]: r for r in records_of(out, "small_vqa") if "#vqa#" in r["id"]}
    q, a = vqa["mr"]["conversations"][0]["value"], vqa["mr"]["conversations"][1]["value"]
    options = dict(re.findall(r"^([A-H])\. (.+)$", q, flags=re.M))
    assert set(options.values()) == {"T1", "T2", "FLAIR"} and options[a.split(".")[0]] == "T1"
    assert vqa["xray2"]["conversations"][1]["value"] == "left"
    # a multi-turn row is one record: the image slot once, each turn's answer kept, options lettered per turn
    turns = vqa["ct"]["conversations"]
    assert [t["from"] for t in turns] == ["human", "gpt"] * 2
    assert turns[0]["value"] == "<image>\nWhich organ is shown?" and turns[1]["value"] == "lung"
    assert "<image>" not in turns[2]["value"] and turns[2]["value"].startswith("Is there contrast?\nA. ")
    options = dict(re.findall(r"^([A-H])\. (.+)$", turns[2]["value"], flags=re.M))
    assert options[turns[3]["value"].split(".")[0]] == "no"


def test_rerun_resumes_and_is_deterministic(built, tmp_path):
    out, manifest, first, _ = built
    before = {p: p.read_bytes() for p in (out / "annotations").glob("*.jsonl")}
    again = build_dataset(out, manifest=manifest, seed=7, progress=False)
    assert again["items_resumed"] == sum(1 for _ in (out / ".work").rglob("*.json")) > 0
    assert again["new_png_files"] == 0 and again["records"] == first["records"]
    assert {p: p.read_bytes() for p in before} == before
    fresh = build_dataset(tmp_path / "fresh", manifest=manifest, seed=7, progress=False)
    assert fresh["items_resumed"] == 0
    assert (tmp_path / "fresh/annotations/chest_cls.jsonl").read_bytes() == before[out / "annotations/chest_cls.jsonl"]
    other = build_dataset(tmp_path / "other", manifest=manifest, seed=8, progress=False)
    assert other["records"] == first["records"]
    assert (tmp_path / "other/annotations/chest_cls.jsonl").read_bytes() != before[out / "annotations/chest_cls.jsonl"]
    # a moved source folder resumes, except for the one file that changed (the fixture's sources stay as they are)
    sources = tmp_path / "sources"
    shutil.copytree(out.parent, sources, ignore=shutil.ignore_patterns("out"))
    shutil.copytree(out, tmp_path / "resumed")
    Image.fromarray(np.full((40, 50), 7, np.uint8)).save(sources / "images" / "xray3.png")
    changed = build_dataset(tmp_path / "resumed", manifest=sources / "manifest.yaml", seed=7, progress=False)
    assert changed["new_png_files"] == 1 and changed["items_resumed"] == again["items_resumed"] - 1


def test_demo_build_and_template_variety(tmp_path):
    summary = build_dataset(tmp_path, demo=True, progress=False)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert summary["errors"] == 0 and summary["records"] >= 300
    assert set(meta) == {"demo_dicom", "demo_nifti_brain_mri"}
    records = [r for name in meta for r in read_jsonl(tmp_path / meta[name]["annotations"])]
    questions = {r["conversations"][0]["value"] for r in records if "#cap#" in r["id"]}
    assert len(questions) >= 5
    modality_answers = [t["value"] for r in records if "#vqa#ct#" in r["id"] for t in r["conversations"]
                        if t["from"] == "gpt" and "CT" in t["value"]]
    assert modality_answers, "the demo must teach the modality of a DICOM"
    assert {"MRI", "CT", "ultrasound"} <= set(summary["by_modality"])
    assert (tmp_path / "summary.png").stat().st_size > 10_000
    with Image.open(tmp_path / "summary.png") as im:
        assert im.format == "PNG"


def test_cli_input_folder_captions(tmp_path, capsys):
    src = tmp_path / "folder"
    (src / "sub").mkdir(parents=True)
    shutil.copy(os.path.join(DICOM_DIR, "MR_small.dcm"), src / "sub" / "scan.dcm")
    shutil.copy(os.path.join(NIFTI_DIR, "standard.nii.gz"), src / "vol.nii.gz")
    shutil.copy(os.path.join(DICOM_DIR, "CT_small.dcm"), src / "sub" / "IM0001")  # DICOM without a suffix
    (src / "README.txt").write_text("not an image")
    (src / "NOTES").write_text("no suffix, not DICOM")
    assert cli_main(["data", "build", "--input", str(src), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    records = read_jsonl(tmp_path / "out/annotations/folder.jsonl")
    assert printed["records"] == len(records) == 2 + 7  # two DICOM files + 7 axial slices
    # the two stray files are skipped with a line each in errors.jsonl and the summary, not silently
    assert printed["errors"] == 2
    errors = read_jsonl(tmp_path / "out/errors.jsonl")
    assert sorted(e["source"] for e in errors) == ["NOTES", "README.txt"]
    assert {e["kind"] for e in errors} == {"not_an_image"}
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["errors_by_kind"] == {"not_an_image": 2}
    assert all("#cap#" in r["id"] for r in records)
    assert any("MRI" in r["conversations"][1]["value"] for r in records)


def test_manifest_errors_name_the_file_and_field(tmp_path):
    from gmaivl_rt.data.manifest import ManifestError, load_manifest

    bad = tmp_path / "m.json"
    cases = [({"datasets": [{"name": "a", "task": "ocr", "image_root": "."}]}, "task 'ocr'"),
             ({"datasets": [{"name": "a", "task": "classification", "image_root": ".", "annotations": "x.csv"}]},
              "needs 'labels'"),
             ({"datasets": [{"name": "a b", "task": "caption", "image_root": "."}]}, "name 'a b'"),
             ({"datasets": [{"name": "a", "task": "caption", "image_root": ".", "colour": 1}]}, "unknown field"),
             ({"datasets": []}, "non-empty 'datasets'")]
    for manifest, needle in cases:
        bad.write_text(json.dumps(manifest))
        with pytest.raises(ManifestError, match=re.escape(needle)) as err:
            load_manifest(bad)
        assert "m.json" in str(err.value)


def test_json_manifest_with_json_list_annotations(tmp_path):
    shutil.copy(os.path.join(DICOM_DIR, "CT_small.dcm"), tmp_path / "ct.dcm")
    (tmp_path / "rows.json").write_text(json.dumps([{"image": "ct.dcm", "label": "nodule"}]))
    (tmp_path / "m.json").write_text(json.dumps({"datasets": [
        {"name": "ct", "task": "classification", "image_root": ".", "annotations": "rows.json",
         "labels": ["nodule", "mass"], "window": "lung"},
        {"name": "lost", "task": "report", "image_root": ".", "annotations": "missing.jsonl"}]}))
    summary = build_dataset(tmp_path / "out", manifest=tmp_path / "m.json", progress=False)
    records = read_jsonl(tmp_path / "out/annotations/ct.jsonl")
    errors = read_jsonl(tmp_path / "out/errors.jsonl")
    assert [(e["dataset"], e["kind"]) for e in errors] == [("lost", "annotation")]  # the run went on
    assert "missing.jsonl" in errors[0]["reason"] and "lost" not in json.loads((tmp_path / "out/meta.json").read_text())
    assert summary["errors"] == 1 and {r["id"].split("#")[1] for r in records} == {"cap", "cls", "cls-mc"}
    from gmaivl_rt.medical.reader import read_medical_image

    lung = read_medical_image(tmp_path / "ct.dcm", window="lung").pixels  # the manifest's window was used
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out/images" / records[0]["image"])), lung)


def test_templates_vary_but_keep_the_facts():
    import random

    from gmaivl_rt.data import templates as T

    rng = random.Random(0)
    facts = T.ImageFacts(modality="CT", body_part="chest", plane="axial", labels=["nodule", "mass", "normal"])
    questions, answers = set(), set()
    for _ in range(200):
        (q, a), = T.classification_open_turns(facts, rng, "nodule")
        questions.add(q)
        answers.add(a)
        assert "nodule" in a.lower()
        turns = T.segmentation_turns(facts, rng, {"mass": {"box": [0.7, 0.1, 0.9, 0.3], "fraction": 0.01,
                                                          "pixels": 40}})
        assert any("[0.700, 0.100, 0.900, 0.300]" in a and "upper right" in a for _, a in turns)
        assert any(a.startswith("No") and "nodule" in q for q, a in turns) or \
            any(a.startswith("No") and "normal" in q for q, a in turns)
    assert len(questions) >= 5 and len(answers) >= 5
    assert [T.article(w) for w in ("MRI", "CT", "X-ray", "ultrasound", "PET", "axial")] == \
        ["an MRI", "a CT", "an X-ray", "an ultrasound", "a PET", "an axial"]
    unknown = T.caption_text(T.ImageFacts(modality="medical image"), random.Random(1))
    assert unknown.split(".")[0].endswith("medical image")


def test_caption_labels_read_as_labels_whether_noun_or_adjective():
    """A classification label ends a caption as the label itself, whatever its part of speech: the demo data once
    said "It shows a normal." (an article put before an adjective label)."""
    import random

    from gmaivl_rt.data import templates as T

    facts = T.ImageFacts(modality="X-ray", body_part="chest")
    endings = set()
    for seed in range(60):
        for label in ("normal", "pneumonia"):
            caption = T.caption_text(facts, random.Random(seed), label)
            last = caption.rsplit(". ", 1)[-1]
            assert last.endswith(f" {label}.") and f"a {label}" not in caption and f"an {label}" not in caption
            endings.add(last.removesuffix(f" {label}."))
    assert len(endings) == 3  # every phrasing came up


def test_metadata_questions_for_an_image_without_modality_say_it_is_not_recorded(tmp_path):
    """A PNG records no modality: the text must not become "a medical image image" / "The modality is medical
    image." but say the modality is unknown; a DICOM CT keeps its modality answer."""
    from gmaivl_rt.data.manifest import DatasetSpec

    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):  # several images so several answer phrasings are drawn
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(src / f"p{i}.png")
    ct = os.path.join(DICOM_DIR, "CT_small.dcm")
    os.symlink(ct, src / "ct.dcm")
    spec = DatasetSpec(name="mixed", task="caption", image_root=str(src), metadata_vqa=True)
    build_dataset(tmp_path / "out", datasets=[spec], progress=False)
    records = read_jsonl(tmp_path / "out/annotations/mixed.jsonl")
    png_vqa = [r for r in records if "#vqa#" in r["id"] and r["id"].endswith(tuple(f"p{i}" for i in range(6)))]
    assert len(png_vqa) == 6
    png_text = " ".join(t["value"] for r in records if "p" in r["id"].split("#")[-1] for t in r["conversations"])
    assert "image image" not in png_text and "modality is medical image" not in png_text.lower()
    answers = [t["value"] for r in png_vqa for q, t in zip(r["conversations"][::2], r["conversations"][1::2])
               if "modality" in q["value"].lower() or "kind of" in q["value"].lower()]
    assert answers and all("not record" in a for a in answers)
    ct_vqa = [r for r in records if "#vqa#" in r["id"] and r["id"].endswith("ct")]
    assert any("CT" in t["value"] for r in ct_vqa for t in r["conversations"][1::2])
