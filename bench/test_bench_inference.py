"""CPU inference latency of the ONNX Runtime backend vs our torch backend vs transformers' generate, on the same
`compact` weights (random init, saved once), same prompt (96 tokens with one image), same run.

- prefill: generate(max_new_tokens=1): vision encoder + prompt prefill + one token.
- decode: per-token latency, (generate 33 tokens - generate 1 token) / 32, greedy, no early stop.
ONNX Runtime gets torch's intra-op thread count (torch.get_num_threads()).
Reported in extra_info as seconds and as ratios (transformers / onnx, torch / onnx: > 1 means ONNX is faster);
no timing assertions.
"""
from __future__ import annotations

import statistics

import pytest
import torch
from transformers import LlavaForConditionalGeneration

import gmaivl_rt
from gmaivl_rt.export.onnx_export import export_onnx
from measure import compact_checkpoint, image_prompt, median_seconds

DECODE_TOKENS = 32


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("compact")
    compact_checkpoint(model_dir)
    onnx_dir = tmp_path_factory.mktemp("compact_onnx")
    export_onnx(model_dir, onnx_dir)
    # Same thread budget for both runtimes (ONNX Runtime otherwise spins one thread per core).
    onnx_backend = gmaivl_rt.load(onnx_dir, backend="onnx", threads=torch.get_num_threads())
    torch_backend = gmaivl_rt.load(model_dir, backend="torch")
    hf = LlavaForConditionalGeneration.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    ids, pixels = image_prompt(torch_backend.config)

    def ours(backend):
        return lambda n: backend.generate(ids, pixel_values=pixels, max_new_tokens=n, eos_token_id=[],
                                          pad_token_id=0)

    @torch.no_grad()
    def transformers_generate(n):
        return hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0)

    return {"onnx": ours(onnx_backend), "torch": ours(torch_backend), "transformers": transformers_generate}


def _report(benchmark, kind, seconds):
    onnx_s = seconds["onnx"]
    benchmark.extra_info.update({f"{name}_{kind}_s": s for name, s in seconds.items()})
    benchmark.extra_info.update(speedup_vs_torch=seconds["torch"] / onnx_s,
                                speedup_vs_transformers=seconds["transformers"] / onnx_s)
    print(f"\n{kind}: " + ", ".join(f"{name} {s * 1e3:.1f} ms" for name, s in seconds.items())
          + f"; onnx speedup {seconds['torch'] / onnx_s:.2f}x vs torch, "
            f"{seconds['transformers'] / onnx_s:.2f}x vs transformers")


def test_prefill_latency(benchmark, runners):
    onnx = runners["onnx"]
    onnx(1)
    benchmark.pedantic(lambda: onnx(1), rounds=5, iterations=1)
    seconds = {"onnx": statistics.median(benchmark.stats.stats.data)}
    for name in ("torch", "transformers"):
        seconds[name] = median_seconds(lambda: runners[name](1), rounds=5)
    _report(benchmark, "prefill", seconds)


def test_decode_latency_per_token(benchmark, runners):
    def per_token(run):
        return (median_seconds(lambda: run(1 + DECODE_TOKENS), 3) - median_seconds(lambda: run(1), 3)) / DECODE_TOKENS

    onnx = runners["onnx"]
    onnx(1 + DECODE_TOKENS)
    benchmark.pedantic(lambda: onnx(1 + DECODE_TOKENS), rounds=3, iterations=1)
    prefill = median_seconds(lambda: onnx(1), 3)
    seconds = {"onnx": (statistics.median(benchmark.stats.stats.data) - prefill) / DECODE_TOKENS}
    for name in ("torch", "transformers"):
        seconds[name] = per_token(runners[name])
    _report(benchmark, "decode_per_token", seconds)
