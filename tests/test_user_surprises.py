"""What a new user tripped over (issue 16): each silent surprise, now said out loud or fixed, checked end to end."""
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from gmaivl_rt.cli import main as cli_main


def _read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


# ------------------------------------------------------------------------------------------------- data builder
def test_metadata_questions_for_an_image_without_modality_say_it_is_not_recorded(tmp_path):
    """A PNG records no modality: the text must not become "a medical image image" / "The modality is medical
    image." but say the modality is unknown; a DICOM CT keeps its modality answer."""
    import pydicom.data

    from gmaivl_rt.data.build import build_dataset
    from gmaivl_rt.data.manifest import DatasetSpec

    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):  # several images so several answer phrasings are drawn
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(src / f"p{i}.png")
    ct = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files", "CT_small.dcm")
    os.symlink(ct, src / "ct.dcm")
    spec = DatasetSpec(name="mixed", task="caption", image_root=str(src), metadata_vqa=True)
    build_dataset(tmp_path / "out", datasets=[spec], progress=False)
    records = _read_jsonl(tmp_path / "out/annotations/mixed.jsonl")
    png_vqa = [r for r in records if "#vqa#" in r["id"] and r["id"].endswith(tuple(f"p{i}" for i in range(6)))]
    assert len(png_vqa) == 6
    png_text = " ".join(t["value"] for r in records if "p" in r["id"].split("#")[-1] for t in r["conversations"])
    assert "image image" not in png_text and "modality is medical image" not in png_text.lower()
    answers = [t["value"] for r in png_vqa for q, t in zip(r["conversations"][::2], r["conversations"][1::2])
               if "modality" in q["value"].lower() or "kind of" in q["value"].lower()]
    assert answers and all("not record" in a for a in answers)
    ct_vqa = [r for r in records if "#vqa#" in r["id"] and r["id"].endswith("ct")]
    assert any("CT" in t["value"] for r in ct_vqa for t in r["conversations"][1::2])


def test_rewriter_module_in_the_current_folder_is_found(tmp_path, monkeypatch):
    """`--rewriter mymod:fn` from the console script finds mymod.py in the current folder, as `python -m` would;
    a module that exists nowhere is a clear error."""
    from gmaivl_rt.data.build import load_rewriter

    (tmp_path / "my_rewriter_16.py").write_text("def shout(text, context):\n    return text.upper()\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_rewriter_16", raising=False)
    assert load_rewriter("my_rewriter_16:shout")("abc", {}) == "ABC"
    with pytest.raises(ValueError, match="no module 'no_such_rewriter_16'.*current folder"):
        load_rewriter("no_such_rewriter_16:fn")
    with pytest.raises(ValueError, match="has no 'missing'"):
        load_rewriter("my_rewriter_16:missing")


# ------------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_reports_the_size_it_reached_and_why(tmp_path, capsys, caplog):
    """A small dataset cannot fill 2048 tokens: the CLI prints the size reached (as tokenizer.json holds it),
    the size asked for, and why; a size the text can reach gives no note."""
    from train_fixtures import make_dataset

    data = make_dataset(tmp_path / "data", records_per_source=(6, 4))
    assert cli_main(["tokenizer", "--data", str(data), "--out", str(tmp_path / "tok"), "--vocab-size", "2048"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    reached = len(saved["model"]["vocab"])
    assert printed["vocab_size"] == reached < 2048 and printed["requested_vocab_size"] == 2048
    assert f"reached {reached} tokens, not the 2048 asked for" in printed["note"]
    assert "min-frequency" in printed["note"]
    assert any("reached" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert cli_main(["tokenizer", "--data", str(data), "--out", str(tmp_path / "tok2"), "--vocab-size", "280"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["vocab_size"] == 280 and "note" not in printed


# ------------------------------------------------------------------------------------------------- training
def test_resume_restores_the_runs_own_settings_and_refuses_contradicting_flags(tmp_path, capsys, caplog):
    """A run stopped early and resumed with only `--out O --resume` continues exactly like the same resume given
    every original flag (its config has a non-default lr and schedule, so a fresh default merge would differ);
    flags that contradict the saved run are refused, each named."""
    import shutil

    from train_fixtures import make_training_setup, write_config

    data, tokenizer = make_training_setup(tmp_path, records_per_source=(8, 4))
    config = write_config(tmp_path / "cfg.yaml", {"batch": {"global_batch_size": 2}, "schedule": {"total_steps": 3},
                                                  "optimizer": {"lr": 3e-3}, "train": {"save_every": 1}})
    flags = ["--stage", "3", "--data", str(data), "--preset", "tiny", "--tokenizer", str(tokenizer),
             "--config", str(config), "--no-progress"]
    stopped = tmp_path / "stopped"
    assert cli_main(["train", "--out", str(stopped), "--max-steps", "2"] + flags) == 0
    assert "starts from random weights" in caplog.text and "'tiny' preset" in caplog.text
    saved = (stopped / "train_config.yaml").read_text()
    shutil.copytree(stopped, tmp_path / "bare")
    capsys.readouterr()

    assert cli_main(["train", "--out", str(stopped), "--resume"] + flags) == 0
    assert cli_main(["train", "--out", str(tmp_path / "bare"), "--resume", "--no-progress"]) == 0
    full, bare = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert bare["steps"] == full["steps"] == bare["total_steps"] == 3
    assert _read_jsonl(tmp_path / "bare/log.jsonl") and \
        [r["loss"] for r in _read_jsonl(tmp_path / "bare/log.jsonl")] == \
        [r["loss"] for r in _read_jsonl(stopped / "log.jsonl")]
    assert (tmp_path / "bare/train_config.yaml").read_text() == saved  # not overwritten by a fresh merge

    other = write_config(tmp_path / "other.yaml", {"batch": {"global_batch_size": 2},
                                                    "schedule": {"total_steps": 3}, "optimizer": {"lr": 1e-4},
                                                    "train": {"save_every": 1}})
    bad = [(["--preset", "compact"], "--preset compact (the run uses tiny)"),
           (["--stage", "2"], "--stage 2 (the run is stage 3)"),
           (["--config", str(other)], "optimizer.lr (0.003 -> 0.0001)"),
           (["--data", str(tmp_path)], f"--data {tmp_path} (the run used {data.resolve()})"),
           (["--init", str(stopped)], "--init"),
           (["--stage", "1", "--preset", "compact"], "--stage 1 (the run is stage 3); --preset compact")]
    for extra, named in bad:
        assert cli_main(["train", "--out", str(tmp_path / "bare"), "--resume", "--no-progress"] + extra) == 2
        err = capsys.readouterr().err
        assert "contradict" in err and named in err, (extra, err)
    assert (tmp_path / "bare/train_config.yaml").read_text() == saved
    # without a saved run there is nothing to restore: stage and data are required
    assert cli_main(["train", "--out", str(tmp_path / "new"), "--resume"]) == 2
    assert "give the stage and --data" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- noise
_QUIET_SCRIPT = r"""
import sys, tempfile, warnings
warnings.simplefilter("always")  # show every warning once raised, so none hides behind a filter of ours
import torch
from gmaivl_rt import GMAIVL, GMAIVLConfig
from gmaivl_rt.train.tokenizer import model_vocab_fields, train_bpe_tokenizer
folder = tempfile.mkdtemp()
tokenizer = train_bpe_tokenizer(["a short text to learn from"] * 20, folder, vocab_size=280, min_frequency=1)
GMAIVL(GMAIVLConfig.preset("tiny").replace(**model_vocab_fields(tokenizer))).save_pretrained(folder)
# 1. a kernel compile asks Triton whether FP fusion is on (what `kernels report` does for every kernel)
import gmaivl_rt.kernels
from triton import knobs
assert knobs.language.fp_fusion_enabled(None)
# 2. decode of one 1-D sequence
import gmaivl_rt
vlm = gmaivl_rt.load(folder)
ids = tokenizer.encode("a short text", add_special_tokens=False)
assert vlm.decode(torch.tensor(ids)) == vlm.decode([ids]) == vlm.decode(ids) == [tokenizer.decode(ids)]
print("ok")
"""


def test_kernels_and_decode_are_quiet():
    """Triton's FP_FUSION default warning and decode of a 1-D sequence (transformers' batch_decode deprecation)
    print nothing, in a fresh process where each would. (`export onnx`: tests/test_readme_quickpaths.py.)"""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_DEFAULT_FP_FUSION", "PYTHONWARNINGS")}
    run = subprocess.run([sys.executable, "-c", _QUIET_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
    for noise in ("FP_FUSION", "deprecated"):
        assert noise not in run.stderr, run.stderr[-3000:]
