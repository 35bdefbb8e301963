"""`gmaivl-rt data synth`: the generated corpus is real data (pydicom and nibabel read its headers and values back),
its labels are what the pixels show (lesions counted in Hounsfield units), `data build` converts it with every
made-up identity removed, no question is answerable from its text, bad input fails cleanly, a killed run resumes
to the same bytes, and the held-out benchmark files read back through the evaluator's readers."""
import collections
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from gmaivl_rt.data.build import build_dataset
from gmaivl_rt.data.synth import (
    SynthError,
    constant_image_tsv,
    synthesize,
    write_benchmark,
)
from gmaivl_rt.data.synth.questions import training_turns
from gmaivl_rt.data.synth.scenes import draw_scene, scene_rng
from gmaivl_rt.eval.readers import read_benchmark

CLI = [sys.executable, "-m", "gmaivl_rt.cli", "data", "synth"]


def _labels(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "corpus"
    synthesize(out, 25, seed=7)
    return out


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("built")
    summary = build_dataset(out, manifest=corpus / "manifest.yaml", progress=False, workers=1)
    return out, summary


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean image, each as an array of (row, column) pixels (a plain flood fill)."""
    seen = np.zeros_like(mask, bool)
    found = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        stack, pixels = [start], []
        seen[start] = True
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < mask.shape[0] and 0 <= nc < mask.shape[1] and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    stack.append((nr, nc))
        found.append(np.array(pixels))
    return found


def test_headers_and_values_read_back_with_pydicom_and_nibabel(corpus):
    import nibabel

    labels = _labels(corpus)
    codes = collections.Counter()
    for label in labels:
        path = corpus / "files" / label["file"]
        if label["kind"] == "nifti":
            image = nibabel.load(path)
            assert image.shape == (48, 48, 48) and image.header.get_zooms() == (2.5, 2.5, 2.5)
            assert nibabel.aff2axcodes(image.affine) == ("R", "A", "S")
            continue
        ds = pydicom.dcmread(path)
        codes[ds.Modality] += 1
        expected = {"ct": ("CT",), "mr": ("MR",), "xray": ("CR", "DX"), "us": ("US",)}[label["kind"]]
        assert ds.Modality in expected
        assert ds.BodyPartExamined == label["region"].upper()
        assert ds.PatientName and ds.PatientID and ds.InstitutionName  # the identities deid must remove
        if ds.Modality in ("CT", "MR"):
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert [float(v) for v in ds.PixelSpacing] == [2.5, 2.5]
        if ds.Modality == "CT":
            hu = pydicom.pixels.apply_rescale(ds.pixel_array, ds)
            assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
            assert hu.min() < -900 and 600 < hu.max() < 1000  # air and bone in Hounsfield units
            assert ds.WindowCenter is not None and ds.WindowWidth is not None
    assert set(codes) >= {"CT", "MR", "US"} and codes["CR"] + codes["DX"] > 0


def test_ct_lesions_in_hounsfield_units_match_the_labels(tmp_path):
    """The labels are what the pixels show: lesions (their own band of Hounsfield units) counted, sided and
    sized from the CT values pydicom reads, against labels.jsonl; each lesion in a grid cell of its own. Mutant seen
    failing: cells drawn with replacement (two lesions in one patch)."""
    synthesize(tmp_path / "ct", 60, seed=11)
    checked = 0
    for label in _labels(tmp_path / "ct"):
        if label["kind"] != "ct":
            continue
        ds = pydicom.dcmread(tmp_path / "ct" / "files" / label["file"])
        hu = pydicom.pixels.apply_rescale(ds.pixel_array, ds).astype(float)
        # a 3 x 3 median takes the 12 HU noise down to about 5 and keeps the discs' edges; the lesion (100 HU in the
        # head, 150 elsewhere) lies 40 HU and more from organ (60) and fat, far from bone (800): nothing else reaches
        # its band
        padded = np.pad(hu, 1, mode="edge")
        hu = np.median([padded[dy:dy + hu.shape[0], dx:dx + hu.shape[1]] for dy in range(3) for dx in range(3)], 0)
        centre = 100.0 if label["region"] == "head" else 150.0
        blobs = [b for b in _components(np.abs(hu - centre) < 25) if len(b) >= 12]
        assert len(blobs) == label["count"], label
        cells = set()
        for blob in blobs:
            # LPS columns run toward the patient's left
            assert (blob[:, 1].mean() > 64) == (label["side"] == "left"), label
            radius = np.sqrt(len(blob) / np.pi)
            assert (radius > 7.0) == (label["size"] == "large"), (label, radius)
            # each lesion has a 4 x 4 cell of its own (the compact ViT's patches), most of it inside that cell
            cell = tuple(int(v) for v in blob.mean(0) // 32)
            assert np.mean([tuple(p) == cell for p in blob // 32]) > 0.6, label
            cells.add(cell)
        assert len(cells) == label["count"], label
        checked += 1
    assert checked == 12


def _displayed(scene) -> np.ndarray:
    """A scene's file as a viewer shows it, in [0, 1], by each format's own display rule and not the project's reader:
    CT through its header's window (pydicom's modality and VOI LUTs), other DICOM by bit depth (radiographs) or as
    stored (8-bit ultrasound), MR pictures and NIfTI volumes stretched between their 0.5 and 99.5 percentiles (the
    robust stretch MR viewers use; RAS+ volume, nibabel's array)."""
    import io

    import nibabel as nib

    from gmaivl_rt.data.synth import render

    _, data = render.render_file(scene)
    if scene.kind == "nifti":
        values = np.asarray(nib.Nifti1Image.from_bytes(data).dataobj, dtype=float)
    else:
        ds = pydicom.dcmread(io.BytesIO(data))
        values = ds.pixel_array.astype(float)
        if ds.Modality == "CT":
            shown = pydicom.pixels.apply_voi_lut(pydicom.pixels.apply_modality_lut(ds.pixel_array, ds), ds)
            return (np.asarray(shown, float) - shown.min()) / max(1.0, float(np.ptp(shown)))
        if ds.Modality in ("CR", "DX"):
            return values / (2 ** int(ds.BitsStored) - 1)
        if ds.Modality == "US":
            return values / 255.0
    lo, hi = np.percentile(values, (0.5, 99.5))
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def test_every_lesion_shows_at_a_grey_level_of_its_own():
    """As a viewer displays each file (`_displayed`), a lesion's mean grey level lies at least 0.1 of the display range
    from the mean of every other tissue of the same picture (bone, spine and hip bones included: an enhancing focus,
    not a bone look-alike), so every lesion the labels name can be told from the anatomy. Mutants
    seen failing: the volumes without their fat layer (lesions saturate with soft tissue at the 99.5 percentile,
    invisible), CT lesions at 320 HU (saturated like bone in every window), radiograph lesions at bone's attenuation."""
    from gmaivl_rt.data.synth import render

    seen = collections.Counter()
    for index in range(60):
        scene = draw_scene(3, index)
        if not scene.lesion:
            continue
        shown, tissue = _displayed(scene), render.tissue_map(scene)
        lesion = tissue == render.LESION
        level = float(shown[lesion].mean())
        for code in np.unique(tissue[~lesion]):
            other = float(shown[tissue == code].mean())
            assert abs(level - other) >= 0.1, (scene.kind, scene.region, int(code), level, other)
        seen[scene.kind] += 1
    assert min(seen.values()) >= 3 and len(seen) == 5, seen


def test_ultrasound_lesions_lie_inside_the_fan():
    """An ultrasound frame shows only its sector: every lesion of the tissue map lies inside it, so a label never
    names a lesion the picture cannot show. (Mutant seen failing: the old narrower fan, 38 degrees from depth 22, with
    lesions placed over the whole body, as before; with today's fan every cell a lesion may take lies inside it, so
    the `visible` mask guards a future narrower fan.)"""
    from gmaivl_rt.data.synth import render

    fan, _ = render.ultrasound_fan()
    seen = 0
    for index in range(400):
        scene = draw_scene(5, index)
        if scene.kind != "us" or not scene.lesion:
            continue
        tissue = render.scene_tissue(scene, np.random.default_rng(scene.seed), visible=fan)
        lesion = tissue == render.LESION
        assert lesion.any() and not (lesion & ~fan).any(), scene
        seen += 1
    assert seen >= 30


def test_data_build_converts_it_and_removes_every_identity(corpus, built):
    out, summary = built
    assert summary["errors"] == 0 and summary["records"] > 0
    assert set(summary["by_modality"]) == {"CT", "MRI", "X-ray", "ultrasound"}
    identities = set()
    for path in (corpus / "files").rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        for keyword in ("PatientName", "PatientID", "InstitutionName", "ReferringPhysicianName", "AccessionNumber",
                        "PatientBirthDate"):
            value = str(ds.get(keyword))
            identities.add(value)
            identities.update(part for part in value.replace("^", " ").split() if len(part) > 3)
    assert len(identities) > 20
    texts = [str(p.relative_to(out)) for p in out.rglob("*")]
    texts += [p.read_text(errors="replace") for p in out.rglob("*") if p.is_file() and p.suffix != ".png"]
    blob = "\n".join(texts)
    leaked = sorted(v for v in identities if v in blob)
    assert not leaked, f"{len(leaked)} identity values reached the built dataset"
    # the questions arrive as asked: VLMEvalKit's prompt form with the answer named then lettered
    records = [json.loads(line) for line in (out / "annotations" / "synth_ct_vqa.jsonl").read_text().splitlines()]
    asked = [r["conversations"] for r in records if "\nA. " in r["conversations"][0]["value"]]
    assert asked and all(c[0]["value"].endswith("Answer with the option's letter from the given choices directly.")
                         for c in asked)


def test_labels_are_balanced_and_the_text_alone_answers_at_chance():
    """A text-only model (the most frequent answer for each exact question text, options included, learned on
    about 8000 training questions) scores no better than chance + 6 points on held-out questions of another seed, for
    every question type; and each type's answers are spread evenly."""
    def turns(seed, count):
        for index in range(count):
            yield from training_turns(draw_scene(seed, index), scene_rng(seed, index, "questions"))

    def target(answer: str) -> str:  # the letter of an MCQ reply ("axial (B)" -> "B"), else the answer itself
        return answer[-2] if answer.endswith(")") else answer

    learned = collections.defaultdict(collections.Counter)
    by_type = collections.defaultdict(collections.Counter)
    for qtype, question, answer in turns(1, 1200):
        learned[question][target(answer)] += 1
        by_type[qtype, "\nA. " in question, answer.endswith(".")][target(answer)] += 1
    overall = collections.Counter()
    for (qtype, _, _), counts in by_type.items():
        # each answer's count within 4 binomial standard deviations of an even share
        n, k = sum(counts.values()), len(counts)
        spread = 4 * np.sqrt(n * (1 / k) * (1 - 1 / k))
        assert all(abs(c - n / k) <= spread for c in counts.values()), (qtype, counts)
    right = collections.defaultdict(list)
    choices = collections.defaultdict(set)
    for qtype, question, answer in turns(2, 300):
        guess = learned[question].most_common(1)[0][0] if learned[question] else "yes"
        form = "mcq" if "\nA. " in question else "closed" if answer.endswith(".") else "open"
        right[qtype, form].append(guess == target(answer))
        choices[qtype, form].add(target(answer))
        overall[form] += 1
    for key, hits in right.items():
        chance = 1 / len(choices[key])
        assert np.mean(hits) <= chance + 0.06 + 2 / np.sqrt(len(hits)) * 0.5, (key, np.mean(hits), chance)


def _run(args, **kwargs):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=120, **kwargs)


def test_bad_input_one_line_exit_2_nothing_written(tmp_path):
    out = tmp_path / "new"
    result = _run(["--out", out, "--count", -3])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "count" in result.stderr and "-3" in result.stderr and not out.exists()
    result = _run(["--out", out, "--count", 3, "--workers", 0])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--workers" in result.stderr and "got 0" in result.stderr and not out.exists()

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = _run(["--out", blocker / "sub", "--count", 3])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "cannot be written" in result.stderr and blocker.read_text() == "x"

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    result = _run(["--out", busy, "--count", 3])
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--resume" in result.stderr and "--overwrite" in result.stderr
    for flags in ({"overwrite": True}, {"resume": True}):  # a folder synth did not write is never replaced
        with pytest.raises(SynthError, match="not a synth output"):
            synthesize(busy, 3, **flags)
    assert sorted(os.listdir(busy)) == ["notes.txt"]

    done = tmp_path / "done"
    synthesize(done, 3)
    before = _tree(done)
    with pytest.raises(SynthError, match="other settings"):
        synthesize(done, 4, resume=True)
    assert _tree(done) == before
    synthesize(done, 4, overwrite=True)
    assert len(_labels(done)) == 4


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _synth_and_die(out, kill_at):
    """Child process: synthesize, SIGKILL itself right after the kill_at-th file move (os.replace)."""
    real, calls = os.replace, [0]

    def replace(a, b):
        real(a, b)
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace
    synthesize(out, 12, seed=5)


@pytest.fixture(scope="module")
def reference_12(tmp_path_factory):
    """The uninterrupted run's files and how many file moves (os.replace) it makes."""
    out = tmp_path_factory.mktemp("reference") / "out"
    real, calls = os.replace, [0]

    def counting(a, b):
        calls[0] += 1
        real(a, b)

    os.replace = counting
    try:
        synthesize(out, 12, seed=5)
    finally:
        os.replace = real
    return _tree(out), calls[0]


# the settings file, a scan, the last scan, an annotation file, labels.jsonl (the move before the manifest's)
@pytest.mark.parametrize("kill_at", [1, 6, 13, 16, -2])
def test_killed_run_resumes_to_identical_bytes(tmp_path, kill_at, reference_12):
    reference, moves = reference_12
    kill_at = kill_at % moves + 1 if kill_at < 0 else kill_at  # -2: the move before the last one
    out = tmp_path / "killed"
    child = multiprocessing.get_context("fork").Process(target=_synth_and_die, args=(out, kill_at))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert not (out / "manifest.yaml").exists()
    with pytest.raises(SynthError, match="--resume"):  # (the command's exit 2 for this is tested above)
        synthesize(out, 12, seed=5)
    synthesize(out, 12, seed=5, resume=True)
    assert _tree(out) == reference


def test_scans_rendered_by_worker_processes_are_the_same_files(tmp_path, reference_12, monkeypatch):
    """Four tasks over two worker processes write the uninterrupted in-process run's tree; a bad worker count
    fails naming it before anything is written."""
    from gmaivl_rt.data.synth import writer

    monkeypatch.setattr(writer, "WRITE_CHUNK", 3)
    summary = synthesize(tmp_path / "pool", 12, seed=5, workers=2)
    assert summary["files_written"] == 12 and _tree(tmp_path / "pool") == reference_12[0]
    with pytest.raises(SynthError, match="workers must be a whole number >= 1, got 0"):
        synthesize(tmp_path / "bad", 12, seed=5, workers=0)
    assert not (tmp_path / "bad").exists()


def test_kill_9_of_the_command_then_resume(tmp_path):
    """The real command killed with SIGKILL from outside while it writes scans, then resumed."""
    reference = tmp_path / "reference"
    assert _run(["--out", reference, "--count", 40, "--seed", 9]).returncode == 0
    out = tmp_path / "killed"
    process = subprocess.Popen(CLI + ["--out", str(out), "--count", "40", "--seed", "9", "--no-progress"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if process.poll() is not None or len(list((out / "files").rglob("*"))) >= 8:
                break
            import time

            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(30)
    assert _run(["--out", out, "--count", 40, "--seed", 9, "--resume"]).returncode == 0
    assert _tree(out) == _tree(reference)


def test_benchmark_files_read_back_through_the_eval_readers(tmp_path):
    summary = write_benchmark(tmp_path, 15, seed=1234)
    tsv = read_benchmark(tmp_path / "heldout.tsv")
    assert tsv.format == "vlmevalkit" and len(tsv.items) == summary["mcq"]
    by_scene = collections.Counter(item.groups["category"] for item in tsv.items)
    assert set(by_scene) <= {"modality", "region", "plane", "presence", "count", "side", "size"}
    index = 0
    for scene_index in range(15):
        scene = draw_scene(1234, scene_index)
        truth = {"modality": scene.modality, "region": scene.region, "plane": scene.plane,
                 "presence": "yes" if scene.count else "no", "count": str(scene.count), "side": scene.side,
                 "size": scene.size}
        items = [i for i in tsv.items if i.images == tsv.items[index].images]  # the scene's rows share an image
        assert items
        for item in items:  # the reference answer is the scene's label, and the grouping columns say what it is
            assert item.options[item.answer] == truth[item.groups["category"]]
            assert item.groups["modality"] == scene.modality and item.groups["department"]
        index += len(items)
    assert index == len(tsv.items)
    slake = read_benchmark(tmp_path / "heldout_slake" / "heldout.json")
    kinds = collections.Counter(item.kind for item in slake.items)
    assert slake.format == "slake" and kinds["closed"] == summary["closed"] and kinds["open"] == summary["open"]
    assert all(Path(item.images[0]).is_file() for item in slake.items)
    assert {i.answer for i in slake.items if i.kind == "closed"} == {"yes", "no"}
    blind = read_benchmark(constant_image_tsv(tmp_path / "heldout.tsv", tmp_path / "blind.tsv"))
    assert len({item.images[0] for item in blind.items}) == 1
    assert [(i.question, i.options, i.answer) for i in blind.items] == \
        [(i.question, i.options, i.answer) for i in tsv.items]


def test_pretraining_pictures_are_the_corpus_files_as_the_converter_reads_them(corpus, monkeypatch):
    """The vision pretraining's pictures, rendered in memory by worker processes, are the corpus's files read back
    by the converter's reader (the volume slice the labels are about) and preprocessed as the model does, in scene
    order; so are the benchmark's pictures."""
    import torch

    from gmaivl_rt.data.synth import pictures, render
    from gmaivl_rt.medical.reader import read_medical_image
    from gmaivl_rt.model.preprocess import preprocess_image

    monkeypatch.setattr(pictures, "RENDER_CHUNK", 4)  # 7 tasks over the 2 workers, collected in order
    rendered = pictures.scene_pictures(7, 25, 56, workers=2)
    for row in _labels(corpus):
        where = {"plane": row["plane"], "slice_index": row["frame"]} if row["kind"] == "nifti" else {}
        pixels = read_medical_image(corpus / "files" / row["file"], **where).pixels
        assert torch.equal(rendered[row["index"]], preprocess_image(pixels, 56)), row["file"]
        assert np.array_equal(render.scene_pixels(7, row["index"]), pixels), row["file"]


def test_training_prompts_are_the_evaluators_prompts():
    """The corpus asks multiple choice exactly as `gmaivl-rt eval` will (VLMEvalKit's LLaVA-XTuner prompt), and its
    short questions carry lmms-eval's instruction: the data layer's copy of both texts is the eval layer's."""
    from gmaivl_rt.data.synth import questions as Q
    from gmaivl_rt.eval import prompts

    assert Q.MCQ_INSTRUCTION == prompts.MCQ_INSTRUCTION and Q.SHORT_INSTRUCTION == prompts.CLOSED_OPEN_INSTRUCTION
    rng = scene_rng(0, 0, "t")
    q = Q.question(draw_scene(0, 3), "modality", rng)
    options = Q.mcq_options(q, rng)
    assert Q.mcq_prompt(q, options) == prompts.mcq_prompt(q.text, options)


def test_benchmark_command_writes_the_same_files(tmp_path, capsys):
    """`data synth --benchmark` (in process) writes what `write_benchmark` writes, and refuses a non-empty folder."""
    from gmaivl_rt.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "cli"), "--count", "4", "--seed", "31", "--benchmark"]) == 0
    write_benchmark(tmp_path / "api", 4, seed=31)
    for name in ("heldout.tsv", "heldout_slake/heldout.json"):
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "api" / name).read_bytes()
    assert main(["data", "synth", "--out", str(tmp_path / "cli"), "--count", "4", "--seed", "31", "--benchmark"]) == 2
    assert "not empty" in capsys.readouterr().err


def test_dialogues_ask_each_type_once_presence_first_and_task_subset_keeps_only_the_task(tmp_path):
    """A written corpus's dialogues (`training_conversations`) never ask a question type twice (the first answer would
    answer the second) and never ask about the lesion's count, side or size before the presence question (they tell
    that there is one); they hold exactly the turns `training_turns` draws, one form per type per dialogue.
    `task_subset` keeps only the chosen types' turns and drops what is left empty, over the same files.
    Mutants seen failing: dealing every form into one dialogue; skipping the presence reorder; task_subset keeping
    every turn."""
    from gmaivl_rt.data.synth import task_subset
    from gmaivl_rt.data.synth.questions import LESION_DETAILS, training_conversations

    for index in range(200):
        scene = draw_scene(5, index)
        dialogues = training_conversations(scene, scene_rng(5, index, "questions"))
        flat = sorted(t for d in dialogues for t in d)
        assert flat == sorted(training_turns(scene, scene_rng(5, index, "questions")))
        for dialogue in dialogues:
            types = [t[0] for t in dialogue]
            assert len(types) == len(set(types)), types
            if "presence" in types:
                assert not any(t in LESION_DETAILS for t in types[:types.index("presence")]), types

    synthesize(tmp_path / "corpus", 12, seed=3)
    manifest = task_subset(tmp_path / "corpus", tmp_path / "task", ["modality"], volumes=False)
    import yaml

    specs = yaml.safe_load(manifest.read_text())["datasets"]
    assert specs and not any("mri_volume" in s["name"] for s in specs)
    vqa_turns = [t for s in specs if s["task"] == "vqa"
                 for line in (manifest.parent / s["annotations"]).read_text().splitlines()
                 for t in json.loads(line)["question_type"]]
    assert vqa_turns and set(vqa_turns) == {"modality"}
    build = build_dataset(tmp_path / "built", manifest=manifest, progress=False, workers=1)
    assert build["errors"] == 0 and build["records"] > 0


def test_an_ellipse_window_holds_the_full_grids_ellipse():
    """An ellipse computed on its bounding box (`_ellipse_window`, what the lesions' trials test; `_ellipse` puts it in
    the whole picture) is the ellipse's formula over every pixel of the picture exactly: the same pixels inside the
    box and none outside, at the picture's edges too."""
    from gmaivl_rt.data.synth.render import _ellipse, _ellipse_window

    def whole_grid(shape, cy, cx, ry, rx):
        yy, xx = np.mgrid[:shape[0], :shape[1]]
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0

    rng = np.random.default_rng(3)
    shape = (128, 96)
    for _ in range(400):
        cy, cx = rng.uniform(-8, 136), rng.uniform(-8, 104)
        ry, rx = rng.uniform(0.5, 20), rng.uniform(0.5, 20)
        window, mask = _ellipse_window(shape, cy, cx, ry, rx)
        placed = np.zeros(shape, bool)
        placed[window][mask] = True
        want = whole_grid(shape, cy, cx, ry, rx)
        assert np.array_equal(placed, want) and np.array_equal(_ellipse(shape, cy, cx, ry, rx), want), (cy, cx, ry, rx)


def test_the_blur_is_numpys_convolution_along_each_axis():
    """The renderer's separable blur (the kernel's taps as shifted slices) is np.convolve run along each row and then
    each column of the edge-padded picture, to the bit."""
    from gmaivl_rt.data.synth.render import _blur

    image = np.random.default_rng(5).random((40, 56)).astype(np.float32)
    for sigma in (0.8, 1.6):
        radius = max(1, int(3 * sigma))
        kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        kernel /= kernel.sum()
        want = image
        for axis in (0, 1):
            padded = np.pad(want, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
            want = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), axis, padded).astype(np.float32)
        assert np.array_equal(_blur(image, sigma), want), sigma
