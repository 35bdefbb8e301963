"""Issue 30 goals on a trained model: the transformers.js export's quantized variants against the fp32 torch model.

    python bench/quantize_agreement.py --demo runs/demo [--items 32] [--max-new-tokens 32] [--block-sizes 32,128]
    python bench/quantize_agreement.py --demo /tmp/demo --run-demo      # runs `gmaivl-rt demo --out DIR` first

The model is the demo's stage III model (`gmaivl-rt demo`: a compact model trained on the generated medical corpus);
the held-out prompts are the demo's held-out scenes (DIR/eval/heldout.tsv: a seed no training scene used), each
question asked open (no options, so the answer is a sentence, not one letter) about its own picture. For each
block size, `export onnx --layout transformers.js --quantize q8,q4,q4f16` is run through its Python API with
every threshold at 0 (so every variant is measured and written) and the report's sizes and agreement printed:
greedy agreement (the share of the fp32 torch model's greedy answer tokens, up to eos, that the variant's own greedy
answer matches position by position) and per-position top-1 (the variant fed the reference prefix ranks the
reference token first). Goals (issue 30): q4 decoder <= 0.3x fp32 bytes with greedy >= 0.95; q8 greedy >= 0.99.

Prints a markdown table with the date and the load average and writes OUT/quantize_agreement.json. Not a test:
minutes of CPU time.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GOALS = {"q8": (None, 0.99), "q4": (0.30, 0.95), "q4f16": (0.30, 0.95)}  # variant -> (max decoder ratio, min greedy)


def held_out_items(demo: Path, count: int, folder: Path):
    """`count` open questions from the demo's held-out TSV, one per distinct picture first (then more per picture),
    pictures written as PNG into `folder`."""
    from PIL import Image

    from gmaivl_rt.eval.readers import Base64Image, read_benchmark
    from gmaivl_rt.export.quantize import HeldOutItem

    benchmark = read_benchmark(demo / "eval" / "heldout.tsv")
    folder.mkdir(parents=True, exist_ok=True)
    by_image: dict[str, list] = {}
    for item in benchmark.items:
        image = item.images[0]
        key = image.data if isinstance(image, Base64Image) else str(image)
        by_image.setdefault(key, []).append(item)
    chosen, round_ = [], 0
    while len(chosen) < count and any(len(v) > round_ for v in by_image.values()):
        chosen += [v[round_] for v in by_image.values() if len(v) > round_]
        round_ += 1
    items = []
    for i, item in enumerate(chosen[:count]):
        image = item.images[0]
        path = folder / f"heldout_{i:03d}.png"
        if isinstance(image, Base64Image):
            Image.open(io.BytesIO(base64.b64decode(image.data))).convert("RGB").save(path)
        else:
            Image.open(image).convert("RGB").save(path)
        items.append(HeldOutItem(item.question, path))
    return items


def measure(model_dir: Path, items, out: Path, block_size: int, max_new_tokens: int) -> dict:
    from gmaivl_rt.export import quantize as q
    from gmaivl_rt.export.transformers_js import export_transformers_js

    started = time.perf_counter()
    report = export_transformers_js(model_dir, out / f"tjs_block{block_size}", quantize=q.VARIANTS,
                                    block_size=block_size, held_out=items,
                                    min_agreement={v: 0.0 for v in q.VARIANTS}, max_new_tokens=max_new_tokens)
    report["seconds"] = time.perf_counter() - started
    return report


def table(reports: dict, load: tuple, when: str, items: int) -> str:
    lines = [(f"{when}, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min), {items} "
              "held-out questions"), "",
             "| block | variant | decoder bytes | x fp32 | all graphs x fp32 | greedy | top-1 | exact answers | goal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for block, report in reports.items():
        fp32_total = sum(report["variants"]["fp32"]["bytes"].values())
        for name, entry in report["variants"].items():
            ratio = entry["ratio_to_fp32"]["decoder_model_merged"]
            total = sum(entry["bytes"].values()) / fp32_total
            max_ratio, min_greedy = GOALS.get(name, (None, None))
            if min_greedy is None:
                goal = "reference"
            else:
                met = entry["greedy_agreement"] >= min_greedy and (max_ratio is None or ratio <= max_ratio)
                goal = ("met" if met else "NOT met") + f" (greedy >= {min_greedy}" + (
                    f", <= {max_ratio}x" if max_ratio else "") + ")"
            lines.append(f"| {block} | {name} | {entry['bytes']['decoder_model_merged']} | {ratio:.3f} | {total:.3f} "
                         f"| {entry['greedy_agreement']:.3f} | {entry['top1_agreement']:.3f} | "
                         f"{entry['exact_answers']}/{entry['answers']} | {goal} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", required=True, type=Path, help="a `gmaivl-rt demo --out` folder (stage3/, eval/)")
    parser.add_argument("--run-demo", action="store_true", help="run `gmaivl-rt demo --out DEMO` first")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default DEMO/quantize_agreement)")
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--block-sizes", default="32,128")
    args = parser.parse_args(argv)
    if args.run_demo:
        subprocess.run([sys.executable, "-m", "gmaivl_rt.cli", "demo", "--out", str(args.demo), "--no-progress"],
                       check=True)
    model_dir = args.demo / "stage3"
    if not (model_dir / "config.json").is_file() or not (args.demo / "eval" / "heldout.tsv").is_file():
        print(f"error: {args.demo} is not a finished demo folder (stage3/config.json, eval/heldout.tsv): run "
              "`gmaivl-rt demo --out DIR` or pass --run-demo", file=sys.stderr)
        return 2
    out = args.out or args.demo / "quantize_agreement"
    items = held_out_items(args.demo, args.items, out / "heldout")
    reports = {}
    for block in (int(b) for b in args.block_sizes.split(",")):
        reports[block] = measure(model_dir, items, out, block, args.max_new_tokens)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()
    text = table(reports, load, when, len(items))
    print(text)
    (out / "quantize_agreement.json").write_text(json.dumps(
        {"when": when, "load_average": load, "model": str(model_dir), "items": len(items),
         "max_new_tokens": args.max_new_tokens, "reports": reports}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
