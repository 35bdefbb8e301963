"""Weight-only quantization of exported graphs with ONNX Runtime's own tools, and how far each variant's answers stay
from the fp32 torch model.

Variants (transformers.js' names and file suffixes):
    q8     `onnxruntime.quantization.quantize_dynamic`: int8 weights of MatMul and Gather (the token embedding),
           activations quantized on the fly (DynamicQuantizeLinear + MatMulInteger)      -> *_quantized.onnx
    q4     `MatMulNBitsQuantizer`: every MatMul weight 4-bit block-wise (symmetric, `block_size` 32 or 128), the
           `MatMulNBits` contrib op; the embedding table stays fp32                       -> *_q4.onnx
    q4f16  the same over the fp16 export (`export onnx --dtype fp16`), with fp32 at the boundaries JavaScript feeds
           and reads (pixel_values, image_features, inputs_embeds; logits are fp32 already); the KV cache stays fp16,
           so any mix of variants per graph fits together                               -> *_q4f16.onnx
Agreement (`agreement_report`): greedy tokens and per-position top-1 of each variant, run through the onnx backend,
against the fp32 torch model on held-out prompts and images.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gmaivl_rt.errors import InputError
from gmaivl_rt.runtime.deploy_format import DEPLOY_JSON, GRAPH_FILES

log = logging.getLogger(__name__)

VARIANTS = ("q8", "q4", "q4f16")
SUFFIXES = {"fp32": "", "q8": "_quantized", "q4": "_q4", "q4f16": "_q4f16"}  # transformers.js' dtype -> suffix
BLOCK_SIZES = (32, 128)
# Greedy-token agreement a variant must reach to be shipped (issue 30's goals); `--min-agreement` changes them.
MIN_AGREEMENT = {"q8": 0.99, "q4": 0.95, "q4f16": 0.95}
# Boundaries that stay fp32 in q4f16 graphs: what transformers.js fills from JavaScript or copies between graphs.
FP32_INTERFACE = {"vision_encoder": ("pixel_values", "image_features"), "embed_tokens": ("inputs_embeds",),
                  "decoder_model_merged": ("inputs_embeds", "logits")}


def parse_variants(text: str) -> tuple[str, ...]:
    """'q8,q4' -> ('q8', 'q4'); InputError naming --quantize for an unknown or repeated name."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or len(set(names)) != len(names):
        raise InputError(f"--quantize {text!r}: choose names from {', '.join(VARIANTS)}, each once")
    return names


def parse_thresholds(text: str) -> dict[str, float]:
    """'q4=0.9,q8=0.99' -> MIN_AGREEMENT updated; InputError naming --min-agreement when malformed."""
    out = dict(MIN_AGREEMENT)
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if name not in VARIANTS or not 0.0 <= number <= 1.0:
            raise InputError(f"--min-agreement {item!r}: expected VARIANT=FRACTION with VARIANT in "
                             f"{', '.join(VARIANTS)} and FRACTION in [0, 1]")
        out[name] = number
    return out


# ---------------------------------------------------------------------------------------------------- quantizers
def _over_limit(weight_bytes: int) -> bool:
    """Whether a graph's weights need external data (export/onnx_export.EXTERNAL_DATA_BYTES, the one threshold)."""
    from . import onnx_export

    return weight_bytes > onnx_export.EXTERNAL_DATA_BYTES


def _save(model, dst: Path) -> None:
    """Save a quantized graph, its weights in one `dst.name + '.data'` file when over the limit (as export onnx)."""
    import onnx

    big = _over_limit(sum(len(t.raw_data) for t in model.graph.initializer))
    onnx.save_model(model, str(dst), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)
    onnx.checker.check_model(str(dst), full_check=False)  # path form: works for external data too


def quantize_q8(src: Path, dst: Path) -> None:
    """int8 dynamic quantization of the MatMul and Gather weights (ONNX Runtime's quantize_dynamic)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source_bytes = sum(p.stat().st_size for p in src.parent.glob(src.name + "*"))  # the graph and its .data
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gather"],
                     use_external_data_format=_over_limit(source_bytes))


def quantize_q4(src: Path, dst: Path, block_size: int) -> None:
    """4-bit symmetric block-wise MatMul weights (`MatMulNBits`, ONNX Runtime's MatMulNBitsQuantizer)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if block_size not in BLOCK_SIZES:
        raise InputError(f"--block-size {block_size}: choose {' or '.join(map(str, BLOCK_SIZES))}")
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=block_size, is_symmetric=True,
                                     op_types_to_quantize=("MatMul",))
    quantizer.process()
    _save(quantizer.model.model, dst)


def fp32_interface(model, names) -> None:
    """Give the fp16 graph `model` fp32 inputs/outputs called `names` (a Cast inside each), in place (checked when
    saved)."""
    import onnx
    from onnx import TensorProto, helper

    graph = model.graph
    for value in graph.input:
        if value.name in names and value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            inner = value.name + "_fp16"
            for node in graph.node:
                node.input[:] = [inner if i == value.name else i for i in node.input]
            graph.node.insert(0, helper.make_node("Cast", [value.name], [inner], to=TensorProto.FLOAT16,
                                                  name=f"{value.name}_to_fp16"))
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    for value in graph.output:
        if value.name in names and value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            inner = value.name + "_fp16"
            for node in graph.node:
                node.output[:] = [inner if o == value.name else o for o in node.output]
                node.input[:] = [inner if i == value.name else i for i in node.input]
            graph.node.append(helper.make_node("Cast", [inner], [value.name], to=TensorProto.FLOAT,
                                               name=f"{value.name}_to_fp32"))
            value.type.tensor_type.elem_type = TensorProto.FLOAT


def quantize_folder(fp32_dir: Path, fp16_dir: Path | None, variant: str, out_dir: Path, block_size: int = 32) -> Path:
    """Write `variant` of the three graphs of an export folder into `out_dir` under the standard names, with the
    deploy JSON beside them, so the onnx backend loads it as any export. fp16_dir: the fp16 export (q4f16)."""
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, file in GRAPH_FILES.items():
        log.info("quantizing %s to %s", name, variant)
        if variant == "q8":
            quantize_q8(fp32_dir / file, out_dir / file)
        elif variant == "q4":
            quantize_q4(fp32_dir / file, out_dir / file, block_size)
        elif variant == "q4f16":
            quantize_q4(fp16_dir / file, out_dir / file, block_size)
            model = onnx.load(str(out_dir / file))
            fp32_interface(model, FP32_INTERFACE[name])
            _save(model, out_dir / file)
        else:
            raise InputError(f"quantize: unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    deploy = json.loads((fp32_dir / DEPLOY_JSON).read_text())
    deploy["quantization"] = {"variant": variant, "block_size": None if variant == "q8" else block_size}
    (out_dir / DEPLOY_JSON).write_text(json.dumps(deploy, indent=2))
    for extra in fp32_dir.iterdir():  # tokenizer files, generation_config.json: the folder must load as an export
        if extra.is_file() and extra.suffix != ".onnx" and extra.name != DEPLOY_JSON and not extra.name.endswith(".data"):
            shutil.copyfile(extra, out_dir / extra.name)
    return out_dir


# ----------------------------------------------------------------------------------------------------- agreement
@dataclass(frozen=True)
class HeldOutItem:
    question: str
    image: object  # anything `to_medical_image` reads: a path, a PIL image, a uint8 array


HELD_OUT_QUESTIONS = ("What imaging modality is shown?", "Is there an abnormality in this image?",
                      "Describe the main finding.", "Which organ is visible?", "Is the image normal or abnormal?",
                      "What colour dominates the image?", "Where is the bright region?", "Answer yes or no: is there "
                      "a lesion?")


def default_held_out(count: int = 8, side: int = 64, seed: int = 1234) -> list[HeldOutItem]:
    """`count` questions, each with its own synthetic picture (seeded noise, a bright disc and a gradient: images
    no checkpoint has seen)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side]
    items = []
    for i in range(count):
        cy, cx, r = rng.integers(side // 4, 3 * side // 4, 2).tolist() + [int(rng.integers(4, side // 3))]
        grey = 40 + 60 * xx / side + rng.normal(0, 12, (side, side))
        grey[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += 120
        rgb = np.clip(np.stack([grey, grey * (0.8 + 0.05 * i), grey * 0.9], -1), 0, 255).astype(np.uint8)
        items.append(HeldOutItem(HELD_OUT_QUESTIONS[i % len(HELD_OUT_QUESTIONS)], rgb))
    return items


def read_held_out(path: Path) -> list[HeldOutItem]:
    """A JSONL file of {"question": str, "image": path relative to the file} -> items; InputError naming the file,
    the line and the problem."""
    path = Path(path)
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            question, image = row["question"], row["image"]
            if not isinstance(question, str) or not isinstance(image, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise InputError(f"agreement set {path} line {number}: expected {{\"question\": str, \"image\": "
                             f"path}}") from None
        image_path = (path.parent / image)
        if not image_path.is_file():
            raise InputError(f"agreement set {path} line {number}: image file {image!r} does not exist")
        items.append(HeldOutItem(question, image_path))
    if not items:
        raise InputError(f"agreement set {path}: no items")
    return items


def _greedy(backend, inputs: dict, max_new_tokens: int) -> list[int]:
    out = backend.generate(inputs["input_ids"], pixel_values=inputs["pixel_values"],
                           attention_mask=inputs["attention_mask"], max_new_tokens=max_new_tokens, do_sample=False,
                           eos_token_id=backend.eos_token_ids, pad_token_id=backend.config.text.pad_token_id)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = set(backend.eos_token_ids)
    for i, token in enumerate(new):
        if token in eos:
            return new[:i + 1]
    return new


@torch.no_grad()
def reference_answers(model_dir: Path, items, max_new_tokens: int = 24) -> list[dict]:
    """The fp32 torch model's greedy answers to `items`: per item the prepared inputs, its new tokens and the
    top-1 token at each of their positions under teacher forcing (the tokens themselves, by construction)."""
    from gmaivl_rt.runtime.backends import load

    torch_model = load(model_dir, "torch", generation_config="none")
    answers = []
    for item in items:
        inputs = torch_model.prepare([{"role": "user", "content": f"<image>\n{item.question}"}], [item.image])
        answers.append({"inputs": inputs, "tokens": _greedy(torch_model, inputs, max_new_tokens)})
    return answers


def _teacher_forced_logits(backend, input_ids, pixel_values) -> torch.Tensor:
    """Every position's logits of one unpadded row in one decoder pass: input_ids (1, S) int64 -> (1, S, V) fp32.
    The graph backend's own prompt embedding and decoder call, with logits_indices = every position."""
    mask = torch.ones_like(input_ids)
    every = torch.arange(input_ids.shape[1])[None]
    logits, _ = backend._decode(backend._prompt_embeds(input_ids, pixel_values), mask, every, every,
                                backend._empty_past(1))
    return logits.float()


@torch.no_grad()
def variant_agreement(folder: Path, answers: list[dict]) -> dict:
    """One variant's agreement with the reference answers, through the onnx backend:
    greedy: the fraction of reference tokens the variant's own greedy answer matches position for position;
    top1: the fraction of reference positions where the variant's argmax, fed the reference prefix, is the reference
    token; exact: answers identical up to eos."""
    from gmaivl_rt.runtime.backends import load

    backend = load(folder, "onnx", generation_config="none", providers=["CPUExecutionProvider"])
    same = top1 = total = exact = 0
    for answer in answers:
        inputs, want = answer["inputs"], answer["tokens"]
        got = _greedy(backend, inputs, len(want))
        same += sum(a == b for a, b in zip(got, want))
        exact += got == want
        prompt = inputs["input_ids"]
        full = torch.cat([prompt, torch.tensor([want[:-1]], dtype=torch.long)], dim=1) if len(want) > 1 else prompt
        logits = _teacher_forced_logits(backend, full, inputs["pixel_values"])
        picks = logits[0, prompt.shape[1] - 1:].argmax(-1).tolist()
        top1 += sum(a == b for a, b in zip(picks, want))
        total += len(want)
    total = max(total, 1)
    return {"greedy_agreement": same / total, "top1_agreement": top1 / total, "exact_answers": exact,
            "answers": len(answers), "tokens": total}


def graph_sizes(folder: Path) -> dict[str, int]:
    """Bytes of each graph of an export folder (its external data included)."""
    sizes = {}
    for name, file in GRAPH_FILES.items():
        sizes[name] = sum(p.stat().st_size for p in folder.glob(file + "*"))
    return sizes
