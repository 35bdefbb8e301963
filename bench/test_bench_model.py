"""Forward and 32-token greedy generation of the `compact` preset: ours vs transformers' Llava with the same
weights, same inputs, same run. Reported as ratios in extra_info (no timing assertions)."""
from __future__ import annotations

import statistics

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from gmaivl_rt import GMAIVL
from measure import compact_checkpoint, image_prompt, median_seconds


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("compact")
    compact_checkpoint(path)
    ours = GMAIVL.from_pretrained(path)
    theirs = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa").eval()
    ids, pixels = image_prompt(ours.config)
    return ours, theirs, ids, pixels


def _compare(benchmark, ours_fn, theirs_fn, rounds):
    ours_fn(), theirs_fn()  # warm-up
    benchmark.pedantic(ours_fn, rounds=rounds, iterations=1)
    ours_s = statistics.median(benchmark.stats.stats.data)
    theirs_s = median_seconds(theirs_fn, rounds)
    benchmark.extra_info.update(ours_s=ours_s, transformers_s=theirs_s, speedup_vs_transformers=theirs_s / ours_s)
    print(f"\n{benchmark.name}: ours {ours_s * 1e3:.1f} ms, transformers {theirs_s * 1e3:.1f} ms, "
          f"speedup {theirs_s / ours_s:.2f}x")


@torch.no_grad()
def test_forward(benchmark, pair):
    ours, theirs, ids, pixels = pair
    _compare(benchmark, lambda: ours(ids, pixel_values=pixels), lambda: theirs(input_ids=ids, pixel_values=pixels),
             rounds=10)


@torch.no_grad()
def test_generate_32_tokens(benchmark, pair):
    ours, theirs, ids, pixels = pair
    _compare(benchmark,
             lambda: ours.generate(ids, pixel_values=pixels, max_new_tokens=32, eos_token_id=[], pad_token_id=0),
             lambda: theirs.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=32, min_new_tokens=32,
                                     do_sample=False, eos_token_id=None, pad_token_id=0),
             rounds=3)
