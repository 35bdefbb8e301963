"""Issue 30, the block-128 miss investigated: q4 of the demo model's decoder at block 128 with every MatMul 4-bit,
at block 128 with the LM head (the MatMul feeding `logits`) kept fp32, and at block 32, each measured as
bench/quantize_agreement.py measures (greedy and per-position top-1 agreement with the fp32 torch model on the
demo's held-out scenes, open questions).

    python bench/quantize_keep_lm_head.py --demo runs/demo [--items 24] [--max-new-tokens 32]

The vision encoder and embed_tokens are quantized as `export onnx --quantize q4` does; only the decoder's LM head is
left out in the second case (MatMulNBitsQuantizer's nodes_to_exclude). Prints one JSON line per case. Not a test.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from quantize_agreement import held_out_items


def lm_head_nodes(decoder) -> list[str]:
    """Names of the MatMul nodes whose output reaches the `logits` output through shape-only ops."""
    producer = {o: n for n in decoder.graph.node for o in n.output}
    found, todo, seen = [], ["logits"], set()
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type == "MatMul":
            found.append(node.name)
        elif node.op_type in ("Cast", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Transpose"):
            todo += list(node.input)
    return found


def main(argv=None) -> int:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from gmaivl_rt.export import quantize as q
    from gmaivl_rt.export.onnx_export import export_onnx
    from gmaivl_rt.runtime.deploy_format import GRAPH_FILES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", required=True, type=Path)
    parser.add_argument("--items", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    model, work = args.demo / "stage3", args.demo / "quantize_keep_lm_head"
    if not (work / "fp32" / "gmaivl_deploy.json").is_file():
        export_onnx(model, work / "fp32")
    answers = q.reference_answers(model, held_out_items(args.demo, args.items, work / "heldout"), args.max_new_tokens)
    head = lm_head_nodes(onnx.load(str(work / "fp32" / GRAPH_FILES["decoder_model_merged"])))
    original = q.quantize_q4
    for label, block, exclude in (("block 128, all MatMuls", 128, []), ("block 128, LM head fp32", 128, head),
                                  ("block 32, all MatMuls", 32, [])):
        out = work / label.replace(" ", "_").replace(",", "")
        shutil.rmtree(out, ignore_errors=True)

        def quantize_q4(src, dst, block_size, exclude=exclude):
            quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=block_size, is_symmetric=True,
                                             op_types_to_quantize=("MatMul",),
                                             nodes_to_exclude=exclude if "decoder" in src.name else [])
            quantizer.process()
            q._save(quantizer.model.model, dst)

        q.quantize_q4 = quantize_q4
        try:
            q.quantize_folder(work / "fp32", None, "q4", out, block)
        finally:
            q.quantize_q4 = original
        ratio = q.graph_sizes(out)["decoder_model_merged"] / q.graph_sizes(work / "fp32")["decoder_model_merged"]
        print(json.dumps({"case": label, "lm_head": head, "decoder_ratio": round(ratio, 3),
                          **q.variant_agreement(out, answers)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
