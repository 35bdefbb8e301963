"""The serving engine against the plain decoding path: every request's tokens must equal `GMAIVL.generate` run on
that request alone (greedy, and sampled with the same seed), whatever else is in flight; the paged KV pool, the
prefix cache, cancellation and limits are checked through `engine.stats()` with the scheduler stepped by hand."""
import asyncio
import random
import threading
import time

import numpy as np
import pytest
import torch

import gmaivl_rt
from gmaivl_rt import Engine
from gmaivl_rt.errors import InputError, LimitError
from gmaivl_rt.model.sampling import DecodeTrace

TEXTS = ["<image>\nWhat modality is this image?", "This is a CT scan of the chest.", "Which plane is shown?",
         "An axial slice.", "Describe the image.", "A magnetic resonance image of the head.",
         "You are a careful radiology assistant."] * 20
SYSTEM = "You are a careful radiology assistant."
NO_STOP = {"eos_token_id": []}  # run to max_new_tokens


@pytest.fixture(scope="module")
def folder(tiny_model_folder):
    return tiny_model_folder(TEXTS, "engine")


@pytest.fixture(scope="module")
def dynamic_folder(tiny_model_folder):
    """Native dynamic resolution: each image size gives its own number of image tokens."""
    return tiny_model_folder(TEXTS, "engine_dynamic",
                             vision={"dynamic_resolution": True, "min_pixels": 28 * 28, "max_pixels": 70 * 70})


def _image(height, width, seed):
    return (np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8)


def _alone(backend, question, image=None, system=None, seed=None, **generation):
    """The request's generated ids from `GMAIVL.generate` on it alone (contiguous KV cache, batch of one)."""
    prepared = backend.build_request(question, image, system=system, **generation)
    options = dict(prepared.generation)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    out = backend.generate(prepared.input_ids, prepared.pixel_values, generator=generator, **options)
    return out[0, prepared.input_ids.shape[1]:].tolist()


class StepGate:
    """Runs the engine's scheduler loop one step (schedule, run, postprocess) at a time, on the test's command."""

    def __init__(self, engine):
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        step = engine._step

        def gated():
            while not self.go.acquire(timeout=0.05):
                if engine._closed:  # a failed test leaves the `with`: let close() drain without the test
                    break
            try:
                step()
            finally:
                self.done.release()
        engine._step = gated

    def steps(self, n=1):
        for _ in range(n):
            self.go.release()
            assert self.done.acquire(timeout=30)


def _wait_prepared(engine, count):
    deadline = time.time() + 30
    while engine.stats()["waiting"] + engine.stats()["running"] < count or engine._preparing:
        assert time.time() < deadline
        time.sleep(0.01)


def test_concurrent_mixed_requests_equal_each_request_alone(dynamic_folder):
    backend = gmaivl_rt.load(dynamic_folder)
    sizes = [(28, 28), (42, 70), (56, 28), None, (70, 42), (28, 56)]
    cases = []
    for i in range(12):
        size = sizes[i % len(sizes)]
        image = None if size is None else _image(*size, seed=i)
        question = ["What modality is this image?", "Which plane is shown?", "Describe the image."][i % 3]
        generation = {"max_new_tokens": 4 + 3 * (i % 4)}
        if i % 3 == 2:  # seeded sampling
            generation.update(do_sample=True, temperature=1.3, top_k=40, seed=100 + i)
        cases.append((question, image, SYSTEM if i % 4 == 1 else None, generation))
    expected = [_alone(backend, q, im, system=s, **g) for q, im, s, g in cases]

    results = [None] * len(cases)
    with Engine(dynamic_folder, max_batch_size=6, kv_cache_tokens=1024, block_size=8) as engine:
        def client(thread):
            rng = random.Random(thread)
            for i in range(thread, len(cases), 4):
                time.sleep(rng.uniform(0, 0.05))  # staggered arrivals: requests join a running batch
                q, im, s, g = cases[i]
                results[i] = engine.submit(q, image=im, system=s, **g)

        threads = [threading.Thread(target=client, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        answers = [r.result(timeout=60) for r in results]
        stats = engine.stats()
    for i, (request, ids) in enumerate(zip(results, expected)):
        assert request.token_ids == ids, f"request {i} differs from the same request alone"
        assert answers[i] == backend.tokenizer.decode(ids, skip_special_tokens=True).strip()
        assert request.finish_reason in ("stop", "length")
        assert request.arrival_time <= request.first_token_time <= request.finish_time
    assert stats["generated_tokens"] == sum(len(ids) for ids in expected)
    assert stats["prompt_tokens"] == sum(r.prompt_tokens for r in results)
    assert stats["kv_blocks_used"] == 0 and stats["running"] == stats["waiting"] == 0


def test_streamed_deltas_join_to_the_answer_and_async_stream_does_not_block_the_loop(folder):
    image = _image(30, 40, seed=1)
    with Engine(folder, max_batch_size=4) as engine:
        request = engine.submit("What modality is this image?", image=image, max_new_tokens=10)
        deltas = list(request)
        assert "".join(deltas) == request.result() == engine.ask("What modality is this image?", image,
                                                                 max_new_tokens=10)
        assert request.generated_tokens == 10 and request.finish_reason == "length"

        async def main():
            ticks = 0

            async def ticker():
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0)

            task = asyncio.create_task(ticker())
            parts = [d async for d in engine.stream("What modality is this image?", image=image,
                                                    max_new_tokens=10)]
            task.cancel()
            return parts, ticks

        parts, ticks = asyncio.run(main())
        assert "".join(parts) == request.result()
        assert ticks > 10  # the loop kept running while the engine worked

        # a stop string ends the answer before it
        answer = request.result()
        cut = answer[len(answer) // 2:len(answer) // 2 + 2]
        stopped = engine.submit("What modality is this image?", image=image, max_new_tokens=10, stop=[cut])
        assert stopped.result(timeout=30) == answer[:answer.index(cut)].rstrip()
        assert stopped.finish_reason == "stop" and stopped.generated_tokens < 10
        with pytest.raises(InputError, match="stop"):
            engine.submit("Describe the image.", stop=[""]).result(timeout=30)


def test_cancel_mid_stream_frees_the_blocks_and_leaves_the_others_alone(folder):
    backend = gmaivl_rt.load(folder)
    image = _image(28, 28, seed=2)
    expected_b = _alone(backend, "Which plane is shown?", max_new_tokens=12)
    with Engine(folder, max_batch_size=4, kv_cache_tokens=256, block_size=4) as engine:
        gate = StepGate(engine)
        a = engine.submit("What modality is this image?", image=image, max_new_tokens=40)
        b = engine.submit("Which plane is shown?", max_new_tokens=12)
        _wait_prepared(engine, 2)
        gate.steps(5)
        blocks = engine.stats()["kv_blocks_used"]
        bs = 4
        # after each step a sequence holds the blocks of every token it has fed (all but its newest)
        assert blocks == sum(-(-(r.prompt_tokens + r.generated_tokens - 1) // bs) for r in (a, b))
        a.cancel()
        gate.steps(1)  # the cancel is taken before the next step runs
        assert a.finish_reason == "cancelled" and a.done and a.generated_tokens == 5
        assert engine.stats()["kv_blocks_used"] == -(-(b.prompt_tokens + b.generated_tokens - 1) // bs)
        assert engine.stats()["running"] == 1
        while not b.done:
            gate.steps(1)
        assert b.token_ids == expected_b
        assert engine.stats()["kv_blocks_used"] == 0
        assert a.result() == "".join(list(a))  # the partial answer stays readable


def test_full_pool_queues_requests_and_all_complete(folder):
    backend = gmaivl_rt.load(folder)
    questions = ["What modality is this image?", "Which plane is shown?", "Describe the image."] * 2
    images = [_image(28 + 7 * i, 28, seed=i) if i % 2 == 0 else None for i in range(len(questions))]
    expected = [_alone(backend, q, im, max_new_tokens=12) for q, im in zip(questions, images)]
    # room for about two requests at a time (each needs ~30 tokens of KV)
    with Engine(folder, max_batch_size=8, kv_cache_tokens=64, block_size=8) as engine:
        gate = StepGate(engine)
        requests = [engine.submit(q, image=im, max_new_tokens=12) for q, im in zip(questions, images)]
        _wait_prepared(engine, len(requests))
        gate.steps(1)
        stats = engine.stats()
        assert stats["running"] < len(requests) and stats["waiting"] > 0, stats
        assert stats["kv_blocks_used"] <= 8
        peak = 0
        while not all(r.done for r in requests):
            gate.steps(1)
            peak = max(peak, engine.stats()["kv_blocks_used"])
        assert peak <= 8
    assert [r.token_ids for r in requests] == expected


def test_a_request_that_can_never_fit_is_refused_and_a_bad_image_fails_only_itself(folder, tmp_path):
    with Engine(folder, max_batch_size=4, kv_cache_tokens=64, block_size=8) as engine:
        too_long = engine.submit("Describe the image.", max_new_tokens=200)
        broken = tmp_path / "broken.png"
        broken.write_bytes(b"not a png at all")
        bad = engine.submit("Describe the image.", image=broken, max_new_tokens=4)
        good = engine.submit("Describe the image.", max_new_tokens=4)
        with pytest.raises(LimitError, match="KV blocks"):
            too_long.result(timeout=30)
        with pytest.raises(InputError):
            bad.result(timeout=30)
        assert too_long.finish_reason == bad.finish_reason == "error"
        assert good.result(timeout=30) and good.finish_reason == "length"


def test_follow_up_on_the_same_image_reuses_the_prefix(folder):
    image = _image(36, 30, seed=3)
    backend = gmaivl_rt.load(folder)
    follow_up = "Which plane is shown?"
    expected = _alone(backend, follow_up, image, system=SYSTEM, max_new_tokens=8)
    with Engine(folder, max_batch_size=4, block_size=4) as engine:
        encoded = []
        encode = engine.backend.model.encode_images
        engine.backend.model.encode_images = lambda pixels: encoded.append(len(pixels)) or encode(pixels)
        engine.ask("What modality is this image?", image, system=SYSTEM, max_new_tokens=8)
        assert encoded == [1] and engine.stats()["prefix_cache_hits"] == 0
        again = engine.submit(follow_up, image=image, system=SYSTEM, max_new_tokens=8)
        again.result(timeout=30)
        stats = engine.stats()
        other_image = engine.submit(follow_up, image=_image(36, 30, seed=4), system=SYSTEM, max_new_tokens=8)
        other_image.result(timeout=30)
    assert again.token_ids == expected
    assert stats["prefix_cache_hits"] == 1
    # the system prompt, the image and the tokens up to the question came from the cache: no vision tower run
    ids = backend.build_request(follow_up, image, system=SYSTEM).input_ids[0].tolist()
    first = backend.build_request("What modality is this image?", image, system=SYSTEM).input_ids[0].tolist()
    image_end = max(i for i, t in enumerate(ids) if t == backend.config.image_token_index) + 1
    # up to the token where the prompts part, inside a block too (the partial-block reuse)
    assert image_end <= stats["prefix_cache_hit_tokens"] == _shared(ids, first)
    assert encoded == [1, 1]  # only the different image ran the vision tower again
    assert engine.stats()["prefix_cache_hits"] == 2  # its system prompt still came from the cache


def _shared(a: list, b: list) -> int:
    """How many leading tokens two id lists share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_a_follow_up_computes_only_what_follows_the_shared_prefix(folder):
    """Follow-up TTFT (issue 29): the prefix cache gives every token a follow-up shares with an earlier request,
    not only whole KV blocks, so the first forward of a follow-up feeds just the tokens after the point where the
    prompts part (counted at the runner). Block size 16: the prompts part inside a block. Three follow-ups after a
    first question about an image: another question in a new prompt, the same conversation (question, answer,
    next question: it parts from the first request's answer inside that request's last, partly filled block), and
    the same question about another image (its image tokens share the id but not the image: they are computed).
    Every answer equals `GMAIVL.generate` on the request alone (no cache). Mutants seen failing: no partial-block
    reuse (the follow-ups feed up to 15 tokens more), the copy of the shared keys/values skipped (other tokens),
    `block_contents` without the image's key (the other image's follow-up reuses the first image's keys/values:
    other tokens), the finished request's partly filled last block not registered (the conversation feeds more)."""
    backend = gmaivl_rt.load(folder)
    image, other = _image(36, 30, seed=11), _image(36, 30, seed=12)
    first_q = "What modality is this image?"
    answer_ids = _alone(backend, first_q, image, system=SYSTEM, max_new_tokens=6, **NO_STOP)
    answer = backend.decode([answer_ids])[0].strip()
    turns = [{"role": "user", "content": "<image>\n" + first_q}, {"role": "assistant", "content": answer},
             {"role": "user", "content": "Which plane is shown?"}]
    follow_ups = {"new prompt": dict(question="Which plane is shown?", image=image),
                  "conversation": dict(messages=turns, images=[image]),
                  "other image": dict(question=first_q, image=other)}

    def prompt(request):
        return backend.build_request(system=SYSTEM, **request).input_ids[0].tolist()

    with Engine(folder, max_batch_size=4, block_size=16) as engine:
        run, fed = engine.runner.run, []

        def counted(batch):
            fed.append(sum(len(seq.ids) - seq.cached if batch.feeds is None else batch.feeds[r]
                           for r, seq in enumerate(batch.seqs)))
            return run(batch)

        engine.runner.run = counted
        engine.ask(first_q, image, system=SYSTEM, max_new_tokens=6, **NO_STOP)
        first_ids = prompt(dict(question=first_q, image=image)) + answer_ids[:-1]  # the tokens it fed
        for name, request in follow_ups.items():
            fed.clear()
            submitted = engine.submit(system=SYSTEM, max_new_tokens=4, **NO_STOP, **request)
            submitted.result(timeout=30)
            ids = prompt(request)
            shared = _shared(ids, first_ids)
            if name == "other image":  # the same prompt ids, another image: only the part before the image
                shared = min(shared, ids.index(backend.config.image_token_index))
            assert shared % 16, f"{name}: the prompts should part inside a block for this test to mean anything"
            assert fed[0] == len(ids) - shared, name
            assert submitted.token_ids == _alone(backend, **{"question": None, **request}, system=SYSTEM,
                                                 max_new_tokens=4, **NO_STOP), name


def test_onnx_backend_serves_through_the_same_api(folder, tmp_path):
    from gmaivl_rt.export.onnx_export import export_onnx

    export_onnx(folder, tmp_path / "onnx")
    backend = gmaivl_rt.load(tmp_path / "onnx", backend="onnx")
    cases = [("What modality is this image?", _image(30, 40, seed=5), {"max_new_tokens": 6}),
             ("Which plane is shown?", None, {"max_new_tokens": 9}),
             ("Describe the image.", _image(28, 28, seed=6), {"max_new_tokens": 7, "do_sample": True, "seed": 3})]
    expected = [_alone(backend, q, im, **g) for q, im, g in cases]
    with Engine(tmp_path / "onnx", backend="onnx", max_batch_size=4) as engine:
        gate = StepGate(engine)
        requests = [engine.submit(q, image=im, **g) for q, im, g in cases]
        doomed = engine.submit("Describe the image.", max_new_tokens=20)
        _wait_prepared(engine, 4)
        gate.steps(3)  # one static batch of all four: prefill and two decode steps
        assert engine.stats()["running"] == 4
        doomed.cancel()
        while not all(r.done for r in requests):
            gate.steps(1)
        assert doomed.finish_reason == "cancelled" and doomed.generated_tokens == 3
        late = engine.submit("Which plane is shown?", max_new_tokens=9)  # the next batch
        while not late.done:
            gate.steps(1)
    assert [r.token_ids for r in requests] == expected
    assert late.token_ids == expected[1]


def test_running_requests_that_outgrow_the_pool_are_preempted_and_still_answer_alike(folder):
    backend = gmaivl_rt.load(folder)
    cases = [("Which plane is shown?", None), ("Describe the image.", _image(28, 28, seed=8))]
    expected = [_alone(backend, q, im, max_new_tokens=30, **NO_STOP) for q, im in cases]
    # 10 blocks of 8 tokens: both prompts fit at once, and each request alone (prompt + 30 new), both do not
    with Engine(folder, max_batch_size=4, kv_cache_tokens=80, block_size=8) as engine:
        gate = StepGate(engine)
        requests = [engine.submit(q, image=im, max_new_tokens=30, **NO_STOP) for q, im in cases]
        _wait_prepared(engine, 2)
        gate.steps(1)
        assert engine.stats()["running"] == 2
        while not all(r.done for r in requests):
            gate.steps(1)
        answers = [r.result() for r in requests]
        stats = engine.stats()
    assert stats["preemptions"] >= 1 and stats["kv_blocks_peak"] <= 10
    assert [r.token_ids for r in requests] == expected
    assert all(len(ids) == 30 for ids in expected) and all(answers)


def test_a_forward_that_fails_on_one_request_fails_only_that_request(folder):
    """When the batched forward raises, each request runs alone to find the one at fault: it ends with the error,
    the others answer as they would alone and the engine keeps serving."""
    backend = gmaivl_rt.load(folder)
    expected = _alone(backend, "Which plane is shown?", max_new_tokens=6)
    with Engine(folder, max_batch_size=4) as engine:
        gate = StepGate(engine)
        run = engine.runner.run
        good = [engine.submit("Which plane is shown?", max_new_tokens=6) for _ in range(2)]
        bad = engine.submit("Describe the image.", max_new_tokens=6)

        def failing(batch):
            if any(seq.request is bad for seq in batch.seqs) and bad.generated_tokens == 2:
                raise RuntimeError("broken row")
            return run(batch)

        engine.runner.run = failing
        _wait_prepared(engine, 3)
        while not all(r.done for r in [*good, bad]):
            gate.steps(1)
        with pytest.raises(RuntimeError, match="broken row"):
            bad.result()
        assert bad.finish_reason == "error" and bad.generated_tokens == 2
        assert [r.token_ids for r in good] == [expected, expected]
        assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["running"] == 0
        late = engine.submit("Which plane is shown?", max_new_tokens=6)
        while not late.done:
            gate.steps(1)
        assert late.token_ids == expected


def test_rows_sampled_in_one_batched_call_answer_as_each_request_alone(folder, monkeypatch):
    """Requests sharing GMAI-VL's recommended settings (repetition penalty, n-gram ban, top_p), greedy and seeded
    sampled, some with logprobs, prompts of different lengths: the engine samples each group in one `decode_rows`
    call (checked: calls with several rows happen), and every request's tokens and logprobs equal `generate` on it
    alone. Mutants: `Engine._sample_rows` passing the first row's generator for every row, or its history for
    every row: seen failing."""
    import gmaivl_rt.engine.engine as engine_module

    backend = gmaivl_rt.load(folder)
    recommended = {"repetition_penalty": 1.12, "no_repeat_ngram_size": 5, "top_p": 0.9, "max_new_tokens": 10,
                   **NO_STOP}
    questions = ["What modality is this image?", "Which plane is shown?", "Describe the image.",
                 "This is a CT scan of the chest. Which plane is shown?"]
    cases = []
    for i in range(8):
        generation = dict(recommended)
        if i % 2:
            generation.update(do_sample=True, temperature=0.8, seed=40 + i)
        if i % 3 == 0:
            generation.update(logprobs=True, top_logprobs=2)
        cases.append((questions[i % 4], _image(28, 28, seed=i) if i % 4 == 0 else None, generation))
    expected = []
    for q, im, g in cases:
        g = dict(g)
        seed = g.pop("seed", None)
        prepared = backend.build_request(q, im, **g)
        trace = DecodeTrace()
        out = backend.generate(prepared.input_ids, prepared.pixel_values, trace=trace,
                               generator=None if seed is None else torch.Generator().manual_seed(seed),
                               **dict(prepared.generation))
        expected.append((out[0, prepared.input_ids.shape[1]:].tolist(), trace.logprobs[0]))

    sizes = []
    decode_rows = engine_module.decode_rows

    def counted(step_logits, histories, *args, **kwargs):
        sizes.append(len(histories))
        return decode_rows(step_logits, histories, *args, **kwargs)

    monkeypatch.setattr(engine_module, "decode_rows", counted)
    with Engine(folder, max_batch_size=8) as engine:
        gate = StepGate(engine)
        requests = [engine.submit(q, image=im, **g) for q, im, g in cases]
        _wait_prepared(engine, len(requests))
        while not all(r.done for r in requests):
            gate.steps(1)
    assert max(sizes) >= 2, sizes
    for i, (request, (ids, logprobs)) in enumerate(zip(requests, expected)):
        assert request.token_ids == ids, f"request {i} differs from the same request alone"
        if cases[i][2].get("logprobs"):
            # the batched forward's logits may differ from the alone forward's in the last fp32 bit
            assert [(p.token, [i for i, _ in p.top]) for p in request.logprobs] == \
                [(p.token, [i for i, _ in p.top]) for p in logprobs]
            got = [v for p in request.logprobs for v in (p.logprob, *(v for _, v in p.top))]
            assert got == pytest.approx([v for p in logprobs for v in (p.logprob, *(v for _, v in p.top))], abs=1e-5)


def test_block_table_rows_follow_each_sequence_through_growth_preemption_and_cancel(folder):
    """The scheduler writes its block table only where blocks change (and remakes the batch only when the running
    set changes); after every step of a run with preemption and a cancel, each running sequence's table row holds
    exactly its blocks, the rows are distinct, and a step that changed nothing reused the batch.
    Mutants: `_table_blocks` not writing the blocks a growing sequence gets (`start` past them): rows differ from
    seq.blocks and tokens differ; a freed slot not returned: slots run out (IndexError); `_set_running` not
    resetting the batch: a retired row stays in the batch. Each seen failing."""
    backend = gmaivl_rt.load(folder)
    cases = [("Which plane is shown?", None), ("Describe the image.", _image(28, 28, seed=8)),
             ("What modality is this image?", None)]
    expected = [_alone(backend, q, im, max_new_tokens=24, **NO_STOP) for q, im in cases]
    with Engine(folder, max_batch_size=4, kv_cache_tokens=96, block_size=4) as engine:
        gate = StepGate(engine)
        scheduler = engine.scheduler
        requests = [engine.submit(q, image=im, max_new_tokens=24, **NO_STOP) for q, im in cases]
        doomed = engine.submit("An axial slice.", max_new_tokens=24, **NO_STOP)
        _wait_prepared(engine, 4)
        previous, reused = None, 0
        while not all(r.done for r in [*requests, doomed]):
            gate.steps(1)
            if doomed.generated_tokens == 3:
                doomed.cancel()
            with engine._cv:
                running = list(scheduler.running)
                for seq in running:
                    assert scheduler.block_table[seq.slot, :len(seq.blocks)].tolist() == seq.blocks
                assert len({seq.slot for seq in running}) == len(running)
                batch = scheduler._batch
                if batch is not None:
                    assert batch.seqs == running
                    reused += batch is previous
                previous = batch
        stats = engine.stats()
    assert stats["preemptions"] >= 1 and doomed.finish_reason == "cancelled"
    assert reused >= 10
    assert [r.token_ids for r in requests] == expected
