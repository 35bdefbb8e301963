"""The data builder's rewriter (`--rewriter`): a Python callable, an OpenAI-compatible URL, a `module:function`
found from the current folder or on PYTHONPATH through the console script; only the answers it is given change."""
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml
from dicom_files import DICOM_DIR
from PIL import Image
from run_outputs import read_jsonl

from gmaivl_rt.data.build import build_dataset
from gmaivl_rt.data.rewriter import load_rewriter


class _EchoUpper(http.server.BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible server: answers with the user text upper-cased."""

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/chat/completions"
        text = body["messages"][-1]["content"].split("Text: ", 1)[1]
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": text.upper()}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_rewriter_callable_and_url(tmp_path):
    src = tmp_path / "scans"
    src.mkdir()
    shutil.copy(os.path.join(DICOM_DIR, "CT_small.dcm"), src / "a.dcm")
    seen = []

    def rewrite(text, context):
        seen.append(context)
        return "REWRITTEN: " + text

    summary = build_dataset(tmp_path / "cb", input_dir=src, rewriter=rewrite, progress=False)
    records = read_jsonl(tmp_path / "cb/annotations/scans.jsonl")
    assert summary["records"] == 1 and records[0]["conversations"][1]["value"].startswith("REWRITTEN: ")
    assert seen[0]["modality"] == "CT"
    server = http.server.HTTPServer(("127.0.0.1", 0), _EchoUpper)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        build_dataset(tmp_path / "url", input_dir=src, rewriter=f"http://127.0.0.1:{server.server_port}",
                      progress=False)
    finally:
        server.shutdown()
    answer = read_jsonl(tmp_path / "url/annotations/scans.jsonl")[0]["conversations"][1]["value"]
    assert answer == answer.upper() and "CT" in answer

    def broken(text, context):
        raise RuntimeError("server down")

    failed = build_dataset(tmp_path / "broken", input_dir=src, rewriter=broken, progress=False)
    assert failed["rewrite_failures"] == 1 and failed["records"] == 1


def test_rewriter_module_in_the_current_folder_is_found(tmp_path, monkeypatch):
    """`--rewriter mymod:fn` from the console script finds mymod.py in the current folder, as `python -m` would;
    a module that exists nowhere is a clear error."""
    (tmp_path / "my_rewriter_16.py").write_text("def shout(text, context):\n    return text.upper()\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_rewriter_16", raising=False)
    assert load_rewriter("my_rewriter_16:shout")("abc", {}) == "ABC"
    with pytest.raises(ValueError, match="no module 'no_such_rewriter_16'.*current folder"):
        load_rewriter("no_such_rewriter_16:fn")
    with pytest.raises(ValueError, match="has no 'missing'"):
        load_rewriter("my_rewriter_16:missing")


# ------------------------------------------------------------------------------------------------- command line
REWRITER_MODULE = '''
def rewrite(text, context):
    return "REWRITTEN " + text.upper() + " | " + str(context["label"])
'''


def _expected_rewrite(text: str, label) -> str:
    return "REWRITTEN " + text.upper() + " | " + str(label)


def test_data_build_manifest_with_a_rewriter_package_from_the_command_line(tmp_path, cli_in_process):
    """`gmaivl-rt data build --manifest M --out D` gives, per annotated image, its caption and open and
    multiple-choice classification records with the image's label, and stores each picture once with its pixels;
    the same build through the console script with `--rewriter hooks.rewriting:rewrite` (a package found on
    PYTHONPATH, run from another folder) rewrites exactly the caption and classification answers: each is the
    rewriter applied to the plain build's answer; questions, ids, images and multiple-choice answers are unchanged.
    Mutants: the CLI not passing the rewriter on, `_rewrite` skipped, the rewriter's text dropped (templated text
    kept), load_rewriter importing only from the current folder, the manifest's modality override ignored."""
    sources = tmp_path / "sources"
    (sources / "images").mkdir(parents=True)
    labels = {"a.png": "normal", "b.png": "pneumonia", "c.png": "effusion"}
    pictures = {}
    for i, name in enumerate(labels):
        pixels = np.zeros((20 + 4 * i, 24, 3), np.uint8)
        pixels[..., i] = 60 + 50 * i
        pixels[5:9, 3:7] = 255
        Image.fromarray(pixels).save(sources / "images" / name)
        pictures[name] = pixels
    (sources / "cls.csv").write_text("image,label\n" + "".join(f"{n},{lab}\n" for n, lab in labels.items()))
    (sources / "m.yaml").write_text(yaml.safe_dump({"datasets": [{
        "name": "chest", "task": "classification", "image_root": "images", "annotations": "cls.csv",
        "labels": ["normal", "pneumonia", "effusion"], "modality": "X-ray"}]}))

    plain = tmp_path / "plain"
    printed = json.loads(cli_in_process("data", "build", "--manifest", sources / "m.yaml", "--out", plain,
                                        "--seed", "4", "--workers", "1", "--no-progress"))
    records = read_jsonl(plain / "annotations/chest.jsonl")
    expected_ids = {f"2d#{kind}#x-ray#chest#{label}#{Path(name).stem}"
                    for name, label in labels.items() for kind in ("cap", "cls", "cls-mc")}
    assert {r["id"] for r in records} == expected_ids and printed["records"] == len(records) == 9
    assert json.loads((plain / "meta.json").read_text())["chest"]["length"] == 9
    for r in records:
        name = r["id"].split("#")[-1] + ".png"
        with Image.open(plain / "images" / r["image"]) as stored:
            assert np.array_equal(np.asarray(stored.convert("RGB")), pictures[name]), r["id"]
        assert (r["width"], r["height"]) == (24, pictures[name].shape[0])
        if "#cls#" in r["id"]:
            assert labels[name] in r["conversations"][1]["value"].lower()
    assert len(list((plain / "images").rglob("*.png"))) == 3

    hooks = tmp_path / "hooks_root" / "hooks"
    hooks.mkdir(parents=True)
    (hooks / "__init__.py").write_text("")
    (hooks / "rewriting.py").write_text(REWRITER_MODULE)
    console = Path(sys.executable).with_name("gmaivl-rt")
    command = [str(console)] if console.is_file() else [sys.executable, "-m", "gmaivl_rt.cli"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks.parent), os.environ.get("PYTHONPATH", "")])}
    work = tmp_path / "elsewhere"
    work.mkdir()
    run = subprocess.run([*command, "data", "build", "--manifest", str(sources / "m.yaml"), "--out",
                          str(tmp_path / "rewritten"), "--seed", "4", "--workers", "1", "--no-progress",
                          "--rewriter", "hooks.rewriting:rewrite"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rewritten = {r["id"]: r for r in read_jsonl(tmp_path / "rewritten/annotations/chest.jsonl")}
    assert rewritten.keys() == expected_ids
    changed = 0
    for r in records:
        new = rewritten[r["id"]]
        assert new["image"] == r["image"]
        label = r["id"].split("#")[4]
        for turn, new_turn in zip(r["conversations"], new["conversations"], strict=True):
            if turn["from"] == "gpt" and r["id"].split("#")[1] in ("cap", "cls"):
                assert new_turn["value"] == _expected_rewrite(turn["value"], label), r["id"]
                changed += 1
            else:
                assert new_turn == turn, r["id"]
    assert changed >= 6
