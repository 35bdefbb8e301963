"""Structured output (issue 26's goals), CPU, one run, random weights (the worst case for a constraint: the model
knows nothing of JSON), a BPE tokenizer of the demo's size (2048) trained here:

- validity: GMAIVL_BENCH_STRUCTURED_N (default 1000) answers sampled at temperature 1.0 under the findings schema
  (examples/findings.schema.json) parse and validate by `jsonschema` (goal 100 %), and as many under `choice`
  fall inside the set (goal 100 %); both through the engine, 16 at a time;
- throughput: 16 concurrent requests, every one under the findings schema, vs the same 16 unconstrained, generated
  tokens/s through the engine (compact preset; goal >= 0.9x);
- first-token latency of a request with a schema never seen (compiled then) vs the same schema again (cached by its
  hash) vs no schema, and the compile time itself.
Ratios and rates go to extra_info and are printed; nothing is asserted about speed (validity is asserted: it is a
correctness goal).
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from gmaivl_rt import GMAIVL, Engine, GMAIVLConfig  # noqa: E402
from gmaivl_rt.runtime.tokenizer import model_vocab_fields  # noqa: E402
from gmaivl_rt.train.tokenizer import train_bpe_tokenizer  # noqa: E402

FINDINGS = json.loads((Path(__file__).parents[1] / "examples" / "findings.schema.json").read_text())
TEXTS = ["<image>\nWhat modality is this image?", "This is a CT scan of the chest.", "Which plane is shown?",
         "An axial slice through the upper abdomen.", "Describe the image in detail.",
         "{\"modality\": \"CT\", \"plane\": \"axial\", \"lesion\": {\"present\": true, \"side\": \"left\"}}",
         "A magnetic resonance image of the head showing the ventricles.", "Is there a fracture? No.",
         "12 mm 45 mm 3 mm right left bilateral midline none"] * 40
QUESTION = "Report the finding."
PLANES = ["axial", "coronal", "sagittal", "oblique"]
COUNT = int(os.environ.get("GMAIVL_BENCH_STRUCTURED_N", "1000"))
NEW_TOKENS = 48


def _folder(path, preset: str):
    tokenizer = train_bpe_tokenizer(TEXTS, path, vocab_size=2048, min_frequency=1)
    torch.manual_seed(0)
    GMAIVL(GMAIVLConfig.preset(preset).replace(**model_vocab_fields(tokenizer))).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("structured_tiny"), "tiny")


@pytest.fixture(scope="module")
def compact_dir(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("structured_compact"), "compact")


def _run_all(engine, count, **options):
    """`count` sampled answers, 16 in flight at a time: [(text, finish_reason, complete)]."""
    out, pending, seed = [], [], 0
    while len(out) < count:
        while len(pending) < 16 and seed < count:
            pending.append(engine.submit(QUESTION, do_sample=True, temperature=1.0, seed=seed, **options))
            seed += 1
        request = pending.pop(0)
        out.append((request.result(), request.finish_reason, request.constraint_complete))
    return out


def test_sampled_answers_under_the_findings_schema_and_a_choice_are_all_valid(benchmark, tiny_dir):
    with Engine(tiny_dir, max_batch_size=16) as engine:
        def run():
            return (_run_all(engine, COUNT, json_schema=FINDINGS, max_new_tokens=256),
                    _run_all(engine, COUNT, choice=PLANES, max_new_tokens=16))

        start = time.perf_counter()
        schema_answers, choice_answers = benchmark.pedantic(run, rounds=1, iterations=1)
        seconds = time.perf_counter() - start
    valid = 0
    for text, reason, complete in schema_answers:
        try:
            jsonschema.validate(json.loads(text), FINDINGS)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            assert reason == "length" and complete is False, (text, reason)  # cut by the budget, flagged
    inside = sum(text in PLANES for text, _, _ in choice_answers)
    cut = sum(reason == "length" for _, reason, _ in schema_answers)
    benchmark.extra_info.update(count=COUNT, schema_valid=valid / COUNT, schema_cut_by_length=cut,
                                choice_inside=inside / COUNT, seconds=seconds)
    print(f"\n{COUNT} sampled answers (temperature 1.0, random tiny model): findings schema {valid}/{COUNT} parse "
          f"and validate ({cut} cut by max_new_tokens, flagged); choice {inside}/{COUNT} inside the set "
          f"(goal 100 %); {seconds:.0f} s")
    assert valid == COUNT and inside == COUNT


def test_engine_throughput_every_request_constrained_vs_none(benchmark, compact_dir):
    """16 concurrent requests; tokens/s of the generated tokens (a constrained answer may end earlier, so the
    rate, not the time, is compared)."""
    def rate(engine, **options):
        start = time.perf_counter()
        requests = [engine.submit(QUESTION, do_sample=True, temperature=1.0, seed=s, max_new_tokens=NEW_TOKENS,
                                  **options) for s in range(16)]
        for r in requests:
            r.result()
        return sum(r.generated_tokens for r in requests) / (time.perf_counter() - start)

    with Engine(compact_dir, max_batch_size=16) as engine:
        engine.ask(QUESTION, json_schema=FINDINGS, max_new_tokens=4)  # warm-up, and the schema compiled once
        rates = {"free": [], "constrained": []}

        def run():
            for _ in range(3):  # interleaved, so load from other jobs falls on both
                rates["free"].append(rate(engine, eos_token_id=[]))
                rates["constrained"].append(rate(engine, json_schema=FINDINGS))

        benchmark.pedantic(run, rounds=1, iterations=1)
    free, constrained = statistics.median(rates["free"]), statistics.median(rates["constrained"])
    benchmark.extra_info.update(free_tokens_per_s=free, constrained_tokens_per_s=constrained,
                                ratio=constrained / free)
    print(f"\nengine, 16 concurrent, compact preset: unconstrained {free:.1f} tok/s, every request under the findings "
          f"schema {constrained:.1f} tok/s: {constrained / free:.2f}x (goal >= 0.9x)")


def test_first_token_latency_added_by_compiling_a_schema(benchmark, tiny_dir):
    def ttft(engine, **options):
        request = engine.submit(QUESTION, max_new_tokens=1, **options)
        request.result()
        return request.first_token_time - request.arrival_time

    with Engine(tiny_dir, max_batch_size=4) as engine:
        ttft(engine)  # warm-up
        free, cold, warm, compile_s = [], [], [], []

        def run():
            for n in range(5):
                schema = {**FINDINGS, "title": f"finding {n}"}  # a new schema: a new hash, compiled again
                free.append(ttft(engine))
                cold.append(ttft(engine, json_schema=schema))
                warm.append(ttft(engine, json_schema=schema))
                from gmaivl_rt.model.constraint import constraint_from_options

                compile_s.append(engine.backend.compile_constraint(constraint_from_options(json_schema=schema))
                                 .compile_s)

        benchmark.pedantic(run, rounds=1, iterations=1)
    free_ms, cold_ms, warm_ms = (1e3 * statistics.median(v) for v in (free, cold, warm))
    compile_ms = 1e3 * statistics.median(compile_s)
    benchmark.extra_info.update(ttft_free_ms=free_ms, ttft_new_schema_ms=cold_ms, ttft_cached_schema_ms=warm_ms,
                                compile_ms=compile_ms)
    print(f"\ntime to first token: no schema {free_ms:.1f} ms, a new findings schema {cold_ms:.1f} ms "
          f"(compile {compile_ms:.1f} ms), the same schema again (cached) {warm_ms:.1f} ms")
