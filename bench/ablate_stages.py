"""Issue 24 item 6: does GMAI-VL's three-stage recipe beat stage III alone at the same step budget, and does the
fused-kernel path (`GMAIVL_KERNELS=triton`, under `TRITON_INTERPRET=1` on a CPU) train the same model?

    python bench/ablate_stages.py --out runs/ablation [--scenes 160] [--steps 200] [--kernel-steps 12]

One generated task (the modality questions of `--scenes` scenes, `gmaivl_rt.data.synth.task_subset`), one tokenizer,
then four runs, each scored on held-out scenes of an unseen seed and on the same questions with one grey image
(the image-blind control), with VLMEvalKit's rules:

  recipe   stages I + II + III (4 + 4 + steps - 8 optimizer steps), the compact preset, torch reference kernels
  stage3   stage III alone for `steps` steps from random weights, otherwise the same
  kernels  the tiny preset, stages I + II + III for `--kernel-steps` steps, reference kernels vs the Triton kernels
           (interpreted: minutes per step at the compact size, so a small model; the loss curves and the answers
           are compared, not the accuracy)

Prints a markdown table and writes OUT/ablation.json. Not a test: minutes to an hour of CPU time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TASK = "modality"
HELD_OUT_SEED, HELD_OUT_SCENES = 777_001, 40


def _config(preset: str, stages: dict) -> dict:
    return {"preset": preset, "data": {"max_length": 384}, "batch": {"global_batch_size": 4},
            "schedule": {"warmup_ratio": 0.05, "min_lr_ratio": 0.1}, "train": {"save_every": 1000000},
            "stages": {k: {"schedule": {"total_steps": v}} | ({"optimizer": {"lr": 1.0e-3}} if k == 3 else {})
                       for k, v in stages.items()}}


def prepare(out: Path, scenes: int) -> tuple[Path, Path, Path, Path]:
    """The task's built data, its tokenizer, the held-out TSV of the task's questions and its blind copy."""
    from gmaivl_rt.data.build import build_dataset
    from gmaivl_rt.data.synth import constant_image_tsv, synthesize, task_subset, write_benchmark
    from gmaivl_rt.train.tokenizer import conversation_texts, train_bpe_tokenizer

    data, tok, heldout = out / "data", out / "tokenizer", out / "heldout"
    if not (data / "meta.json").is_file():
        synthesize(out / "corpus", scenes, seed=21, resume=(out / "corpus").is_dir())
        build_dataset(data, manifest=task_subset(out / "corpus", out / "task", [TASK], volumes=False),
                      progress=False)
    if not (tok / "tokenizer.json").is_file():
        train_bpe_tokenizer(conversation_texts(data), tok, vocab_size=512)
    task_tsv = heldout / "task.tsv"
    if not task_tsv.is_file():
        write_benchmark(heldout, HELD_OUT_SCENES, seed=HELD_OUT_SEED)
        rows = (heldout / "heldout.tsv").read_text().splitlines()
        category = rows[0].split("\t").index("category")
        task_tsv.write_text("\n".join([rows[0]] + [r for r in rows[1:] if r.split("\t")[category] == TASK]) + "\n")
    return data, tok, task_tsv, constant_image_tsv(task_tsv, heldout / "blind.tsv")


def run(name: str, out: Path, data: Path, tok: Path, tsv: Path, blind: Path, config: dict, env: dict) -> dict:
    """Train the stages of `config` in a child process (so GMAIVL_KERNELS / TRITON_INTERPRET apply from the start),
    then score it. Returns {"name", "seconds", "losses", "real", "blind"}."""
    import yaml

    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    script = (
        "import json, sys; from pathlib import Path\n"
        "from gmaivl_rt.train.recipe import train\n"
        "folder, data, tok, stages = Path(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4])\n"
        "init, losses = None, []\n"
        "for s in stages:\n"
        "    r = train(s, data, folder / f'stage{s}', config=folder / 'config.yaml', init=init, tokenizer=tok,"
        " progress=False)\n"
        "    init, losses = folder / f'stage{s}', losses + r['losses']\n"
        "(folder / 'losses.json').write_text(json.dumps({'model': str(init), 'losses': losses}))\n")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", script, str(folder), str(data), str(tok),
                    json.dumps(sorted(config["stages"]))], check=True, env={**os.environ, **env})
    seconds = time.perf_counter() - started
    trained = json.loads((folder / "losses.json").read_text())
    from gmaivl_rt.eval.run import evaluate

    real = evaluate(trained["model"], tsv, folder / "eval", progress=False)
    blind_scores = evaluate(trained["model"], blind, folder / "eval_blind", progress=False)
    answers = [json.loads(line)["prediction"] for line in
               (folder / "eval" / "predictions.jsonl").read_text().splitlines()]
    return {"name": name, "seconds": round(seconds, 1), "losses": trained["losses"], "answers": answers,
            "real": real["overall"], "blind": blind_scores["overall"], "count": real["count"],
            "chance": real["chance"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--scenes", type=int, default=160)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--kernel-steps", type=int, default=12)
    p.add_argument("--skip-kernels", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    data, tok, tsv, blind = prepare(out, args.scenes)
    reference = {"GMAIVL_KERNELS": "torch"}
    rows = [run("recipe", out, data, tok, tsv, blind, _config("compact", {1: 4, 2: 4, 3: args.steps - 8}),
                reference),
            run("stage3", out, data, tok, tsv, blind, _config("compact", {3: args.steps}), reference)]
    if not args.skip_kernels:
        small = _config("tiny", {1: 2, 2: 2, 3: args.kernel_steps - 4})
        rows.append(run("tiny-torch", out, data, tok, tsv, blind, small, reference))
        rows.append(run("tiny-triton", out, data, tok, tsv, blind, small,
                        {"GMAIVL_KERNELS": "triton", "TRITON_INTERPRET": "1"}))
    from gmaivl_rt.atomic import atomic_write_json

    atomic_write_json(out / "ablation.json", rows)
    print("| run | stages | steps | held-out | image-blind | chance | n | final loss | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        stages = "III" if r["name"] == "stage3" else "I+II+III"
        print(f"| {r['name']} | {stages} | {len(r['losses'])} | {100 * r['real']:.1f} % | {100 * r['blind']:.1f} % "
              f"| {100 * r['chance']:.0f} % | {r['count']} | {r['losses'][-1]:.3f} | {r['seconds']:.0f} |")
    if not args.skip_kernels:
        a, b = rows[-2], rows[-1]
        gap = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
        same = sum(x == y for x, y in zip(a["answers"], b["answers"]))
        print(f"\nTriton vs reference kernels (tiny preset): largest loss difference over {len(a['losses'])} steps "
              f"{gap:.2e}; {same} of {len(a['answers'])} held-out answers identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
