"""The serving engine on the `compact` preset (random weights, a BPE tokenizer trained here), CPU:

- throughput: 16 concurrent requests (half with an image) through the engine vs the same requests one after
  another through `ask` (generated tokens/s ratio; goal >= 3x) and vs one left-padded `generate` batch of all 16
  (goal >= 1.2x, issue 29), GMAIVL_BENCH_ROUNDS (default 3) interleaved rounds, ranges and the load average;
- time to first token of a follow-up question on the same image vs the first question (goal <= 0.3x);
- peak KV memory of 16 requests of mixed lengths in the paged pool vs a max_batch x max_length cache (goal <= 0.5x);
- Poisson arrivals at a fixed rate for GMAIVL_BENCH_ENGINE_SECONDS (default 60): time to first token p50/p99 and
  tokens/s.
Ratios go to extra_info and are printed; nothing is asserted about speed.
"""
from __future__ import annotations

import random
import statistics
import time

import numpy as np
import os
import pytest
import torch

import gmaivl_rt
from gmaivl_rt import Engine, GMAIVL, GMAIVLConfig
from gmaivl_rt.runtime.batching import left_padded_batch, pixel_batch
from gmaivl_rt.runtime.tokenizer import model_vocab_fields
from gmaivl_rt.train.tokenizer import train_bpe_tokenizer
from measure import interleaved_seconds, load_average

TEXTS = ["<image>\nWhat modality is this image?", "This is a CT scan of the chest.", "Which plane is shown?",
         "An axial slice through the upper abdomen.", "Describe the image in detail.",
         "A magnetic resonance image of the head showing the ventricles.", "Is there a fracture?",
         "No acute fracture is seen.", "You are a careful radiology assistant."] * 30
QUESTIONS = ["What modality is this image?", "Which plane is shown?", "Describe the image in detail.",
             "Is there a fracture?"]
NEW_TOKENS = 32
ROUNDS = int(os.environ.get("GMAIVL_BENCH_ROUNDS", "3"))
NO_EOS = {"eos_token_id": [], "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}  # every request runs its length


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("compact_engine")
    tokenizer = train_bpe_tokenizer(TEXTS, path, vocab_size=512, min_frequency=1)
    torch.manual_seed(0)
    GMAIVL(GMAIVLConfig.preset("compact").replace(**model_vocab_fields(tokenizer))).save_pretrained(path)
    return path


def _image(seed, size=(96, 128)):
    return (np.random.RandomState(seed).rand(*size, 3) * 255).astype(np.uint8)


def _requests(count):
    return [(QUESTIONS[i % 4], _image(i) if i % 2 == 0 else None) for i in range(count)]


def test_engine_throughput_vs_sequential_ask_and_padded_batch(benchmark, model_dir):
    """Three sides on the same 16 requests (half with an image), greedy, every request running NEW_TOKENS: the engine
    with all 16 submitted at once, `ask` one request after another, and one left-padded `generate` batch of all 16
    (our `GMAIVL.generate`, prompts built by the same request boundary, `gmaivl_rt.runtime.batching`: the static
    batch at its best, every request known up front and of one length). ROUNDS interleaved rounds
    (`measure.interleaved_seconds`: rotating order, an idle gap before each side); per-round tokens/s and the
    same-round ratios reported as ranges, with the load average."""
    backend = gmaivl_rt.load(model_dir)
    requests = _requests(16)
    options = dict(max_new_tokens=NEW_TOKENS, **NO_EOS)

    def sequential():
        return [backend.ask(q, im, **options) for q, im in requests]

    def padded_batch():
        built = [backend.build_request(q, im, **options) for q, im in requests]
        ids, mask = left_padded_batch([b.input_ids[0] for b in built], built[0].generation["pad_token_id"])
        pixels = pixel_batch([p for b in built if b.pixel_values is not None for p in b.pixel_values],
                             backend.config.vision.dynamic_resolution)
        out = backend.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **built[0].generation)
        return [text.strip() for text in backend.decode(out[:, ids.shape[1]:])]

    load_before = load_average()
    with Engine(model_dir, max_batch_size=16) as engine:
        def engine_batch():
            submitted = [engine.submit(q, image=im, **options) for q, im in requests]
            return [r.result() for r in submitted]

        answers = {"engine": engine_batch(), "sequential": sequential(), "padded_generate": padded_batch()}
        benchmark.pedantic(engine_batch, rounds=1, iterations=1)
        seconds = interleaved_seconds({"engine": engine_batch, "sequential": sequential,
                                       "padded_generate": padded_batch}, rounds=ROUNDS)
    load_after = load_average()
    tokens = 16 * NEW_TOKENS
    same = all([a.strip() for a in answers[side]] == [a.strip() for a in answers["engine"]] for side in answers)
    tok_s = {side: [tokens / s for s in times] for side, times in seconds.items()}
    vs = {side: [b / e for b, e in zip(seconds[side], seconds["engine"])] for side in ("sequential", "padded_generate")}
    benchmark.extra_info.update({f"{side}_tokens_per_s": v for side, v in tok_s.items()})
    benchmark.extra_info.update({f"engine_vs_{side}": v for side, v in vs.items()})
    benchmark.extra_info.update(same_answers=same, rounds=ROUNDS, load_average_before=load_before,
                                load_average_after=load_after)

    def span(values, fmt="{:.0f}"):
        return (f"{fmt.format(min(values))}-{fmt.format(max(values))} "
                f"(median {fmt.format(statistics.median(values))})")

    print(f"\nthroughput over {ROUNDS} interleaved rounds (16 requests x {NEW_TOKENS} tokens; load average "
          f"{load_before[0]:.1f} before, {load_after[0]:.1f} after): "
          + ", ".join(f"{side} {span(v)} tok/s" for side, v in tok_s.items())
          + f"; engine {span(vs['sequential'], '{:.2f}')}x sequential ask (goal >= 3x), "
            f"{span(vs['padded_generate'], '{:.2f}')}x one padded generate batch (goal >= 1.2x); "
            f"answers identical on every side: {same}")


def test_follow_up_time_to_first_token(benchmark, model_dir):
    image = _image(7)
    with Engine(model_dir, max_batch_size=4) as engine:
        engine.ask("Warm up.", max_new_tokens=2)

        def ttft(question):
            request = engine.submit(question, image=image, system="You are a careful radiology assistant.",
                                    max_new_tokens=4, **NO_EOS)
            request.result()
            return request.first_token_time - request.arrival_time

        first = ttft("What modality is this image?")
        follow_up = benchmark.pedantic(ttft, args=("Which plane is shown?",), rounds=1, iterations=1)
        hits = engine.stats()["prefix_cache_hit_tokens"]
    benchmark.extra_info.update(first_ttft_s=first, follow_up_ttft_s=follow_up, ttft_ratio=follow_up / first,
                                prefix_hit_tokens=hits)
    print(f"\ntime to first token: first question {first * 1e3:.1f} ms, follow-up on the same image "
          f"{follow_up * 1e3:.1f} ms: {follow_up / first:.2f}x (goal <= 0.3x); {hits} prompt tokens from the cache")


def test_peak_kv_memory_vs_contiguous_cache(benchmark, model_dir):
    rng = random.Random(0)
    lengths = [rng.choice([8, 16, 32, 64, 128]) for _ in range(16)]
    requests = _requests(16)
    with Engine(model_dir, max_batch_size=16, block_size=16) as engine:
        def run():
            submitted = [engine.submit(q, image=im, max_new_tokens=n, **NO_EOS)
                         for (q, im), n in zip(requests, lengths)]
            for r in submitted:
                r.result()
            return submitted

        submitted = benchmark.pedantic(run, rounds=1, iterations=1)
        stats = engine.stats()
    per_token = stats["kv_block_bytes"] / stats["kv_block_size"]
    paged = stats["kv_blocks_peak"] * stats["kv_block_bytes"]
    max_length = max(r.prompt_tokens + r.generated_tokens for r in submitted)
    contiguous = 16 * max_length * per_token  # KVCache(batch=16, max_length) as generate() allocates it
    benchmark.extra_info.update(paged_peak_bytes=paged, contiguous_bytes=contiguous, memory_ratio=paged / contiguous)
    print(f"\npeak KV memory: paged {paged / 2**20:.2f} MiB vs contiguous 16 x {max_length} tokens "
          f"{contiguous / 2**20:.2f} MiB: {paged / contiguous:.2f}x (goal <= 0.5x)")


def test_poisson_arrivals(benchmark, model_dir):
    seconds = float(os.environ.get("GMAIVL_BENCH_ENGINE_SECONDS", "60"))
    rate = 2.0  # requests per second
    rng = random.Random(1)
    with Engine(model_dir, max_batch_size=16) as engine:
        engine.ask("Warm up.", max_new_tokens=2)

        def run():
            submitted, start = [], time.perf_counter()
            while time.perf_counter() - start < seconds:
                q, im = QUESTIONS[len(submitted) % 4], _image(len(submitted)) if rng.random() < 0.5 else None
                submitted.append(engine.submit(q, image=im, max_new_tokens=rng.choice([16, 32, 48]), **NO_EOS))
                time.sleep(rng.expovariate(rate))
            for r in submitted:
                r.result(timeout=600)
            return submitted, time.perf_counter() - start

        submitted, elapsed = benchmark.pedantic(run, rounds=1, iterations=1)
    ttft = sorted(r.first_token_time - r.arrival_time for r in submitted)
    p50, p99 = statistics.median(ttft), ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]
    tokens = sum(r.generated_tokens for r in submitted)
    benchmark.extra_info.update(requests=len(submitted), ttft_p50_s=p50, ttft_p99_s=p99,
                                tokens_per_s=tokens / elapsed)
    print(f"\nPoisson arrivals ({rate}/s for {seconds:.0f} s): {len(submitted)} requests, time to first token "
          f"p50 {p50 * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms, {tokens / elapsed:.1f} generated tokens/s")
