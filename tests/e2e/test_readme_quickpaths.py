"""The quick paths of the README and of docs/, run as written, so docs that lie fail CI.

Quick paths: the first fenced ```bash block under each docs heading in QUICK_PATHS (later blocks are synopses or
recipes for scale: a Slurm array, a shell loop). Each block is split into commands (shlex: comments dropped, `\\`
continuations joined) and every command runs, in QUICK_PATHS order, in one temporary folder (the docs' relative
paths are relative to it). The README's own "Quick start" repeats some of them: each of its commands must be one of
these, word for word, so it runs too (`gmaivl-rt serve` alone is only parsed; tests/server/ start the server). To fit
CI, MAPPING rewrites them first, rule by rule, and nothing else is changed:

    --demo                      -> --input scans/     (scans/ holds pydicom's CT_small.dcm and one PNG, not the whole
                                                        pydicom/nibabel test sets; `data build` only: `eval --demo`
                                                        builds its benchmark from the shipped files as written)
    runs/demo/stage3            -> runs/s3             (the stage III model these quick paths train, not `make demo`'s)
    --preset compact            -> --preset tiny
    --max-steps N               -> --max-steps 1       (the next command, `--resume`, then has a step left)
    train --stage ...           +  --config quick.yaml --no-progress   (global batch 1, 2 steps)
    scan.dcm                    -> pydicom's CT_small.dcm
    ask ...                     +  --max-new-tokens 4
    torchrun --nproc_per_node 8 -m gmaivl_rt.cli ARGS
                                -> ARGS are parsed by the CLI only (tests/train/test_train_distributed.py runs this command
                                   with 2 gloo ranks)
    data merge shards/K ... --out D
                                -> the shard folders named are first built from the manifest line's sources.yaml
                                   with --shard K/N (N: how many are named), and the merge writes D-merged, which
                                   must equal the unsharded D file for file (annotations, meta, errors, summary)
    export onnx ...             -> run in a fresh process, whose stderr must hold no warnings (torchvision notices)
    export tensorrt ...         -> without the tensorrt package: must exit 2 naming TensorRT >= 10.15

The manifest line reads `sources.yaml` = docs/data.md's own manifest example (its ```yaml block), with the two
images and `cls.csv` it names. After the commands, the output files the docs name are checked.
"""
import csv
import importlib.util
import json
import os
import re
import shlex
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from pydicom.data import get_testdata_file

from gmaivl_rt.cli import main as cli_main
from gmaivl_rt.data.synth.questions import QUESTION_TYPES
from gmaivl_rt.eval.report import summary_line

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
README_QUICK_START = "Quick start"
QUICK_PATHS = (  # (page, "## heading"), in the order their commands run
    ("docs/data.md", "Building a dataset"),
    ("docs/training.md", "One stage at a time"),
    ("docs/export.md", "Exporting"),
    ("docs/runtime.md", "Asking a question"),
    ("docs/evaluation.md", "The demo's held-out benchmark"),
)
README_MAX_BYTES = 12 * 1024
QUICK_CONFIG = {"batch": {"global_batch_size": 1}, "schedule": {"total_steps": 2}}
CT = get_testdata_file("CT_small.dcm")
MAPPING = [  # (pattern, replacement) on the command line, in order
    (r"^(gmaivl-rt data build .*?)(?<=\s)--demo(?=\s|$)", r"\1--input scans/"),
    (r"runs/demo/stage3", "runs/s3"),
    (r"--preset compact", "--preset tiny"),
    (r"--max-steps \d+", "--max-steps 1"),
    (r"^(gmaivl-rt train --stage .*)$", r"\1 --config quick.yaml --no-progress"),
    (r"(?<=\s)scan\.dcm(?=\s|$)", lambda match: CT),
    (r"^(gmaivl-rt ask .*)$", r"\1 --max-new-tokens 4"),
    # a 2-step tiny model's logits are nearly tied, so its quantized variants agree with fp32 by chance: the quick
    # path checks that quantized files are written, not the agreement (tests/export checks that)
    (r"--quantize (\S+)", lambda match: f"--quantize {match[1]} --min-agreement "
                                         + ",".join(f"{v}=0" for v in match[1].split(","))),
]


def sections(page: Path) -> dict[str, str]:
    """'## Heading' -> the text under it."""
    parts = re.split(r"^## (.+)$", page.read_text(), flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.M | re.S)


def block_commands(block: str) -> list[str]:
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(shlex.join(words))
    return commands


def quick_path_commands() -> list[str]:
    commands = []
    for page, heading in QUICK_PATHS:
        found = sections(ROOT / page)
        assert heading in found, f"{page} lost its quick-path section '## {heading}'"
        for block in fenced_blocks(found[heading], "(?:bash|sh)")[:1]:
            commands += block_commands(block)
    return commands


def readme_quick_start_commands() -> list[str]:
    found = sections(README)
    assert README_QUICK_START in found, f"README lost its '## {README_QUICK_START}' section"
    return [command for block in fenced_blocks(found[README_QUICK_START], "(?:bash|sh)")
            for command in block_commands(block)]


def check_readme_quick_start(commands: list[str]) -> None:
    """Every command of the README's quick start is a quick path run here, word for word (`serve` is parsed)."""
    readme_commands = readme_quick_start_commands()
    assert sum(c.startswith("gmaivl-rt ") for c in readme_commands) >= 8  # ask, serve, data, train, eval, export
    for command in readme_commands:
        argv = shlex.split(command)
        if argv[:2] == ["gmaivl-rt", "serve"]:
            _parses(argv[1:])
            continue
        assert command in commands, f"README quick start runs nowhere: {command}\n(quick paths: {QUICK_PATHS})"


def mapped(command: str) -> str:
    for pattern, replacement in MAPPING:
        command = re.sub(pattern, replacement, command)
    return command


def _write_sources(root: Path) -> None:
    """docs/data.md's manifest example as sources.yaml, with the files it names."""
    page, heading = QUICK_PATHS[0]
    blocks = fenced_blocks(sections(ROOT / page)[heading], "yaml")
    assert len(blocks) == 1, f"{page} '## {heading}' should hold one manifest example"
    (root / "sources.yaml").write_text(blocks[0])
    dataset = yaml.safe_load(blocks[0])["datasets"][0]
    images = root / dataset["image_root"]
    images.mkdir()
    rows = ["image,label"]
    for i, label in enumerate(dataset["labels"][:2]):
        Image.fromarray(np.full((24, 24), 60 + 80 * i, np.uint8)).save(images / f"x{i}.png")
        rows.append(f"x{i}.png,{label}")
    (root / dataset["annotations"]).write_text("\n".join(rows) + "\n")


def test_readme_quick_paths_run_as_written(tmp_path, monkeypatch, capsys):
    commands = quick_path_commands()
    assert sum(c.startswith("gmaivl-rt ") for c in commands) >= 12  # the blocks were found and parsed
    check_readme_quick_start(commands)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scans").mkdir()
    os.symlink(CT, tmp_path / "scans" / "ct.dcm")
    Image.fromarray(np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)).save(tmp_path / "scans" / "photo.png")
    _write_sources(tmp_path)
    (tmp_path / "quick.yaml").write_text(yaml.safe_dump(QUICK_CONFIG))
    have_tensorrt = importlib.util.find_spec("tensorrt") is not None
    answers, printed_by = {}, {}  # ask's answer per backend; each command's stdout
    for readme_command in commands:
        command = mapped(readme_command)
        argv = shlex.split(command)
        if argv[0] == "torchrun":
            assert argv[1:4] == ["--nproc_per_node", "8", "-m"] and argv[4] == "gmaivl_rt.cli", readme_command
            _parses(argv[5:])
            continue
        assert argv[0] == "gmaivl-rt", f"quick path command with no mapping: {readme_command}"
        if argv[1:3] == ["export", "tensorrt"]:
            if have_tensorrt:
                continue  # engines need a GPU: tests/export/test_tensorrt.py
            assert cli_main(argv[1:]) == 2, readme_command
            assert "TensorRT >= 10.15" in capsys.readouterr().err
            continue
        if argv[1:3] == ["data", "merge"]:
            _merge_built_shards(argv, capsys)
            continue
        if argv[1:3] == ["export", "onnx"]:
            _run_quietly(argv[1:])
            continue
        code = cli_main(argv[1:])
        printed = capsys.readouterr()
        assert code == 0, f"{readme_command}\n(run as: {command})\n{printed.out[-2000:]}\n{printed.err[-2000:]}"
        printed_by[" ".join(argv[1:3])] = printed.out
        if argv[1] == "ask":
            assert printed.out.endswith("\n") and printed.out.count("\n") == 1, command  # one answer line
            backend = argv[argv.index("--backend") + 1] if "--backend" in argv else "torch"
            answers[backend] = (printed.out, [a for a in argv if a not in ("--backend", backend)])

    # the outputs the docs name
    for name in ("annotations", "images", "meta.json", "errors.jsonl", "summary.json", "summary.png",
                 "build.log"):
        assert (tmp_path / "data/demo" / name).exists(), name
    assert (tmp_path / "data/gm/annotations/chest_cls.jsonl").is_file()  # the manifest example's dataset name
    for stage in ("s1", "s2", "s3"):
        for name in ("config.json", "tokenizer.json", "train_config.yaml", "log.jsonl", "history.jsonl", "loss.png"):
            assert (tmp_path / "runs" / stage / name).is_file(), (stage, name)
    assert (tmp_path / "runs/s3/checkpoints/step-00000002").is_dir()  # docs/training.md's example name
    assert (tmp_path / "runs/demo/onnx/gmaivl_deploy.json").is_file()
    for name in ("predictions.jsonl", "scores.json", "scores_by_category.csv", "scores.png", "run.json"):
        assert (tmp_path / "runs/demo/eval" / name).is_file(), name
    _check_outcomes(tmp_path, answers, printed_by)


def _check_outcomes(root: Path, answers: dict, printed_by: dict) -> None:
    """What the quick paths made, judged by content. Mutants, each applied by hand and caught here: tokenizer.json
    without its ByteLevel decoder; the train CLI dropping --init; `export onnx` writing a decoder whose final
    RMSNorm is skipped; `ask` passing its generation flags to the torch backend only. (Not caught here: the onnx
    backend's decode positions off by one - the 2-step tiny model's answers do not depend on them;
    tests/export/test_export_onnx.py compares 32 greedy tokens with transformers.)"""
    import torch
    from onnx_graphs import graph_next_token_logits, ort_run
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from gmaivl_rt import GMAIVL, load
    from gmaivl_rt.train.tokenizer import SPECIAL_TOKENS, conversation_texts

    # `gmaivl-rt tokenizer`: what it printed is what it saved; transformers loads it; it round-trips the data's text
    report = json.loads(printed_by["tokenizer --data"])
    tokenizer = AutoTokenizer.from_pretrained(root / report["out"])
    assert report["vocab_size"] == len(tokenizer) > 263  # past the special tokens + 256 bytes: merges learned
    assert tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS)))
    texts = list(conversation_texts(root / "data/demo"))
    assert texts
    for text in texts + ["Größe 3 mm, ünïcode ✓"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
    assert sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts) < sum(len(t.encode()) for t in texts)

    # `data build --manifest`: each annotated image gives its caption and open + multiple-choice classification
    # records, with the manifest's modality and the image's label; the picture stored once, pixels unchanged
    dataset = yaml.safe_load((root / "sources.yaml").read_text())["datasets"][0]
    rows = (root / dataset["annotations"]).read_text().split()[1:]
    labels = dict(row.split(",") for row in rows)
    modality = dataset["modality"].lower()
    records = [json.loads(line) for line in (root / "data/gm/annotations/chest_cls.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(
        f"2d#{kind}#{modality}#{dataset['name']}#{label}#{Path(name).stem}"
        for name, label in labels.items() for kind in ("cap", "cls", "cls-mc"))
    for r in records:
        name = r["id"].split("#")[-1] + ".png"
        with Image.open(root / "data/gm/images" / r["image"]) as stored, \
                Image.open(root / dataset["image_root"] / name) as source:
            assert np.array_equal(np.asarray(stored), np.asarray(source.convert("RGB")))
        if "#cls#" in r["id"]:
            assert labels[name] in r["conversations"][1]["value"].lower()

    # `train --init`: stage II (projector + vision tower) starts from stage I, so the language model is stage I's
    s1, s2 = load_file(str(root / "runs/s1/model.safetensors")), load_file(str(root / "runs/s2/model.safetensors"))
    lm = [k for k in s1 if k.startswith("language_model.")]
    assert lm and all(torch.equal(s1[k], s2[k]) for k in lm)
    stage1_log = [json.loads(line) for line in (root / "runs/s1/log.jsonl").read_text().splitlines()]
    history = [json.loads(line) for line in (root / "runs/s2/history.jsonl").read_text().splitlines()]
    assert stage1_log and history[:len(stage1_log)] == stage1_log  # carried over from --init

    # `export onnx`: ONNX Runtime on the exported graphs gives the torch model's next-token logits
    vlm = load(root / "runs/s3")
    inputs = vlm.prepare([{"role": "user", "content": "<image>\nWhich plane does this image show?"}],
                         images=[Image.open(root / "scans/photo.png")])
    model = GMAIVL.from_pretrained(root / "runs/s3")
    with torch.no_grad():
        expected = model(inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits[0, -1]
    got = graph_next_token_logits(root / "runs/demo/onnx", inputs["input_ids"], inputs["pixel_values"],
                                  model.config.image_token_index, ort_run)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

    # `ask --backend onnx`: the same question about the same image answers as the torch backend does
    (torch_answer, torch_argv), (onnx_answer, onnx_argv) = answers["torch"], answers["onnx"]
    assert torch_argv[3:] == onnx_argv[3:]  # same image, question and limits
    assert onnx_answer == torch_answer

    # `eval --demo`: every held-out question answered once and scored, by the question types the generated
    # held-out file holds
    scores = json.loads((root / "runs/demo/eval/scores.json").read_text())
    predictions = (root / "runs/demo/eval/predictions.jsonl").read_text().splitlines()
    assert scores["predicted"] == scores["count"] == len(predictions) > 0
    with open(root / "runs/demo/eval/heldout.tsv", newline="") as f:
        categories = {row["category"] for row in csv.DictReader(f, delimiter="\t")}
    assert set(scores["by"]["category"]) == categories and categories <= set(QUESTION_TYPES)
    assert printed_by["eval --demo"].startswith("held-out scenes") and summary_line(scores) in printed_by["eval --demo"]


def _merge_built_shards(argv, capsys):
    out = argv[argv.index("--out") + 1]
    shards = [a for a in argv[3:argv.index("--out")]]
    for k, folder in enumerate(shards):
        assert folder.endswith(f"/{k}"), f"shard folders should be numbered from 0: {argv}"
        assert cli_main(["data", "build", "--manifest", "sources.yaml", "--out", folder, "--shard",
                         f"{k}/{len(shards)}", "--no-progress"]) == 0
    assert cli_main(["data", "merge", *shards, "--out", out + "-merged"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    for name in ("meta.json", "errors.jsonl", "summary.json", *(f"annotations/{p.name}" for p in
                                                                   (Path(out) / "annotations").iterdir())):
        assert (Path(out) / name).read_bytes() == (Path(out + "-merged") / name).read_bytes(), name


def _run_quietly(args):
    """`export onnx` in a fresh process (the exporter builds its op registry, where it looks for torchvision, once
    per process): it must succeed without the exporter's "torchvision is not installed" notices."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_DEFAULT_FP_FUSION", "PYTHONWARNINGS")}
    run = subprocess.run([sys.executable, "-m", "gmaivl_rt.cli", *args], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    for noise in ("torchvision", "FP_FUSION", "Warning"):
        assert noise not in run.stderr, run.stderr[-3000:]


def _parses(argv):
    """The CLI accepts these arguments (argparse exits on an unknown flag or a missing value)."""
    import argparse

    from gmaivl_rt.cli import _registrars

    parser = argparse.ArgumentParser(prog="gmaivl-rt")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in _registrars():
        register(sub)
    parser.parse_args(argv)


def test_mapping_rewrites_only_what_it_documents():
    assert mapped("gmaivl-rt data build --demo --out data/demo") == "gmaivl-rt data build --input scans/ --out data/demo"
    assert mapped("gmaivl-rt eval --demo runs/demo/stage3 --out runs/demo/eval") == \
        "gmaivl-rt eval --demo runs/s3 --out runs/demo/eval"
    assert mapped("gmaivl-rt train --stage 1 --preset compact --max-steps 20") == \
        "gmaivl-rt train --stage 1 --preset tiny --max-steps 1 --config quick.yaml --no-progress"
    assert mapped("gmaivl-rt train --out runs/s3 --resume") == "gmaivl-rt train --out runs/s3 --resume"
    assert mapped("gmaivl-rt ask runs/demo/stage3 --image scan.dcm") == \
        f"gmaivl-rt ask runs/s3 --image {CT} --max-new-tokens 4"
    assert mapped("gmaivl-rt export onnx M --out W --layout transformers.js --quantize q8,q4") == \
        "gmaivl-rt export onnx M --out W --layout transformers.js --quantize q8,q4 --min-agreement q8=0,q4=0"


def test_readme_quick_start_is_among_the_quick_paths():
    """Cheap guard for the slow test above: the README's quick start names no command the quick paths skip."""
    check_readme_quick_start(quick_path_commands())


def _docs_pages() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_install_commands_name_real_extras():
    """Every `.[extra]` / `gmaivl-rt` extra the README and docs/ tell people to install exists in pyproject.toml."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = set()
    for page in _docs_pages():
        text = page.read_text()
        code = fenced_blocks(text, "[a-z]*")  # install lines, then the inline code spans of the prose
        code += re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S))
        for snippet in code:
            named |= set(re.findall(r"\[([a-z][a-z-]*)\]", snippet))
    named -= {"fp16", "bf16", "fp32"}  # `[--fp16 ...]`-style option groups are not extras
    assert named and named <= set(extras), named - set(extras)


def test_readme_stays_short():
    """A newcomer's README (issue 23): reference material belongs in docs/."""
    assert len(README.read_bytes()) <= README_MAX_BYTES


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_docs_links_resolve():
    """Every relative link in README.md and docs/ names a file that exists and, with #anchor, a heading in it."""
    broken = []
    for page in [*_docs_pages(), *sorted((ROOT / "docs").glob("*/*.md"))]:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and file.suffix == ".md" and anchor not in {_anchor(h) for h in re.findall(
                    r"^#+ (.+)$", re.sub(r"^```.*?^```", "", file.read_text(), flags=re.M | re.S), flags=re.M)}:
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
