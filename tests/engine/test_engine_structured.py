"""Structured output through every way of running the model: `ask`/`answer` (torch), the ONNX Runtime backend, and
the engine with constrained and unconstrained requests batched together. References: `jsonschema` for the
answers, `re.fullmatch` for regexes, and each request's answer computed alone (`Backend.answer`, a batch of one);
logprobs against `log_softmax` of the model's own logits (teacher-forced, `GMAIVL.last_logits`) masked by a
brute-force choice rule."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("llguidance", reason="structured output needs the grammar engine: pip install 'gmaivl-rt[structured]'")
jsonschema = pytest.importorskip("jsonschema")

import gmaivl_rt  # noqa: E402
from gmaivl_rt import Engine, InputError  # noqa: E402

FINDINGS = json.loads((Path(__file__).parents[2] / "examples" / "findings.schema.json").read_text())
TEXTS = ["<image>\nWhat modality is this image?", "This is a CT scan of the chest.", "Which plane is shown?",
         "An axial slice.", "Describe the image.", "yes no", "{\"modality\": \"CT\", \"plane\": \"axial\"}"] * 20
PLANES = ["axial", "coronal", "sagittal"]
REGEX = r"[0-9]{2} mm (left|right)"
SAMPLED = {"do_sample": True, "temperature": 1.0, "max_new_tokens": 160}


@pytest.fixture(scope="module")
def folder(tiny_model_folder):
    return tiny_model_folder(TEXTS, "structured")


@pytest.fixture(scope="module")
def backend(folder):
    return gmaivl_rt.load(folder)


REQUESTS = [
    ("What modality is this image?", {"json_schema": FINDINGS, "seed": 1, "logprobs": True, "top_logprobs": 3}),
    ("Which plane is shown?", {"choice": PLANES, "seed": 2, "logprobs": True}),
    ("Describe the image.", {"seed": 3, "max_new_tokens": 12}),
    ("An axial slice.", {"regex": REGEX, "seed": 4}),
    ("Describe the image.", {"json_schema": FINDINGS, "seed": 5}),
    ("Which plane is shown?", {"seed": 6, "max_new_tokens": 12, "logprobs": True, "top_logprobs": 2}),
]


def _check_valid(text: str, options: dict):
    if "json_schema" in options:
        jsonschema.validate(json.loads(text), options["json_schema"])
    elif "choice" in options:
        assert text in options["choice"]
    elif "regex" in options:
        assert re.fullmatch(options["regex"], text), text


def test_engine_batches_constrained_and_free_requests_each_as_alone(backend, folder):
    """Six sampled requests (three kinds of constraint, two free ones) submitted together to one engine: each
    answer (text, ids, logprobs, finish reason) equals `answer` on that request alone, and each constrained one is
    valid by its own reference. Mutants: `Engine._masks` pairing sequences with the masks in reverse order (one
    request's constraint applied to another); the mask not passed to `decode_step` in `_next_token`; the matcher
    not advanced after a token (the mask stays the first step's)."""
    alone = [backend.answer(q, **{**SAMPLED, **o}) for q, o in REQUESTS]
    for answer, (_, options) in zip(alone, REQUESTS):
        if not options.keys() & {"json_schema", "choice", "regex"}:
            assert answer.complete is None
            continue
        assert answer.finish_reason == "stop" and answer.complete, answer
        _check_valid(answer.text, options)
    with Engine(folder, max_batch_size=len(REQUESTS)) as engine:
        submitted = [engine.submit(q, **{**SAMPLED, **o}) for q, o in REQUESTS]
        texts = [r.result(timeout=600) for r in submitted]
    assert max(r.scheduled_time for r in submitted) < min(r.finish_time for r in submitted), "not batched together"
    for request, text, answer, (_, options) in zip(submitted, texts, alone, REQUESTS):
        assert text == answer.text
        assert request.token_ids == answer.token_ids
        assert request.finish_reason == answer.finish_reason
        assert request.constraint_complete == answer.complete
        if options.get("logprobs"):
            assert len(request.logprobs) == len(answer.logprobs) == len(request.token_ids)
            for a, b in zip(request.logprobs, answer.logprobs):  # paged and contiguous attention: float noise
                assert a.token == b.token and [t for t, _ in a.top] == [t for t, _ in b.top]
                assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
                assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-5)
            k = options.get("top_logprobs", 0)  # fewer where the constraint allows fewer tokens
            assert all(len(e.top) == k if "json_schema" not in options else len(e.top) <= k
                       for e in request.logprobs)
        else:
            assert request.logprobs == [] and answer.logprobs is None


def test_logprobs_are_the_masked_model_distribution(backend):
    """Greedy under a regex whose next character is never forced ([a-z ], 1 to 12 of them): each reported logprob
    (and the top 3) equals log_softmax of the model's own logits for that prefix (teacher-forced through
    `GMAIVL.last_logits`, no cache) with the tokens a brute-force rule bans set to -inf (a token whose text leaves
    the class or the length; the stop tokens before one character): what the token was chosen from. (Forced text
    is left out on purpose: there llguidance allows only the canonical tokenization, a subset.) Mutant seen
    failing: logprobs from the unmasked logits (`step_logits.float().log_softmax`)."""
    tokenizer = backend.tokenizer
    answer = backend.answer("Which plane is shown?", regex="[a-z ]{1,12}", max_new_tokens=16, logprobs=True,
                            top_logprobs=3)
    assert re.fullmatch("[a-z ]{1,12}", answer.text) and len(answer.logprobs) == len(answer.token_ids)
    prompt = backend.build_request("Which plane is shown?").input_ids
    stop_ids = list(backend.eos_token_ids)
    vocab = backend.config.text.vocab_size
    pieces = {i: tokenizer.decode([i]) for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids}
    text, ids = "", prompt
    with torch.no_grad():
        for entry in answer.logprobs:
            logits = backend.model.last_logits(ids)[0]
            allowed = torch.zeros(vocab, dtype=torch.bool)
            allowed[[i for i, p in pieces.items() if re.fullmatch("[a-z ]+", p) and len(text + p) <= 12]] = True
            if text:
                allowed[stop_ids] = True
            want = logits.masked_fill(~allowed, -float("inf")).log_softmax(-1)
            assert bool(allowed[entry.token])
            assert entry.logprob == pytest.approx(float(want[entry.token]), abs=1e-4)
            top = torch.topk(want, 3)
            finite = top.values > -float("inf")  # banned tokens are never listed
            assert [t for t, _ in entry.top] == top.indices[finite].tolist()
            assert [v for _, v in entry.top] == pytest.approx(top.values[finite].tolist(), abs=1e-4)
            if entry.token in stop_ids:
                break
            text += tokenizer.decode([entry.token])
            ids = torch.cat([ids, torch.tensor([[entry.token]])], dim=1)
    assert len(answer.logprobs) > 2


def test_an_answer_cut_by_max_new_tokens_is_flagged_partial(backend, folder):
    """A schema the budget cannot finish: finish_reason "length" and complete False (never a finished-looking
    answer), in `answer` and in the engine. Mutant seen failing: `ConstraintMatcher.complete` always True."""
    answer = backend.answer("What modality is this image?", json_schema=FINDINGS, max_new_tokens=6)
    assert answer.finish_reason == "length" and answer.complete is False
    with pytest.raises(ValueError):
        json.loads(answer.text)
    with Engine(folder, max_batch_size=2) as engine:
        request = engine.submit("What modality is this image?", json_schema=FINDINGS, max_new_tokens=6)
        assert request.result(timeout=300) == answer.text
        assert request.finish_reason == "length" and request.constraint_complete is False


def test_a_constraint_with_no_token_left_fails_that_request_alone(backend, folder):
    """The constraint's only answer repeats a word, and no_repeat_ngram_size=1 bans every token already seen:
    midway no allowed token survives. `answer` raises InputError; in the engine that request fails with it while
    a request batched with it answers as it does alone. Mutant seen failing: `failed` ignored in
    `Engine._next_token` (the request goes on with padding and ends "stop")."""
    dead = {"choice": ["yes yes yes yes yes yes"], "no_repeat_ngram_size": 1, "max_new_tokens": 20}
    with pytest.raises(InputError, match="the constraint allows no next token"):
        backend.answer("Which plane is shown?", **dead)
    live_options = {"seed": 9, "do_sample": True, "max_new_tokens": 16, "eos_token_id": []}
    want = backend.answer("Describe the image.", **live_options)
    with Engine(folder, max_batch_size=2) as engine:
        live = engine.submit("Describe the image.", **live_options)
        poisoned = engine.submit("Which plane is shown?", **dead)
        with pytest.raises(InputError, match="the constraint allows no next token"):
            poisoned.result(timeout=300)
        assert poisoned.finish_reason == "error"
        assert live.result(timeout=300) == want.text and live.token_ids == want.token_ids


def test_bad_constraints_fail_before_any_decoding(backend, folder, monkeypatch):
    """Every refusal comes from the request boundary: `generate` is never reached (it is made to fail the test),
    and the engine fails that request alone. Mutant seen failing: `build_request` not compiling the constraint
    (the uncompiled one reaches generation)."""
    monkeypatch.setattr(type(backend), "generate", lambda *a, **k: pytest.fail("decoding started"))
    for options, match in [({"choice": []}, "choice is empty"), ({"regex": "(ab"}, "unclosed group"),
                           ({"json_schema": {"type": "strin"}}, "not a valid JSON Schema"),
                           ({"json_schema": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
                           ({"logprobs": "yes"}, "logprobs must be a bool"),
                           ({"logprobs": True, "top_logprobs": 21}, r"top_logprobs must be in \[0, 20\]")]:
        with pytest.raises(InputError, match=match):
            backend.ask("Which plane is shown?", **options)
    monkeypatch.undo()
    with Engine(folder, max_batch_size=2) as engine:
        bad = engine.submit("Which plane is shown?", regex="(ab")
        good = engine.submit("Which plane is shown?", choice=PLANES)
        with pytest.raises(InputError, match="unclosed group"):
            bad.result(timeout=120)
        assert good.result(timeout=300) in PLANES


def test_onnx_backend_answers_the_constrained_request_as_torch_does(backend, folder, tmp_path):
    """The graph backends share `generate_tokens`, so the exported model under a schema and a choice gives the
    torch backend's answer and logprobs (to ONNX Runtime's float tolerance), alone and through its engine.
    Mutant: GraphBackend.generate not passing `constraint` on (an unconstrained answer)."""
    pytest.importorskip("onnxruntime")
    from gmaivl_rt.export.onnx_export import export_onnx

    export_onnx(folder, tmp_path / "onnx")
    onnx = gmaivl_rt.load(tmp_path / "onnx", backend="onnx")
    for question, options in [("What modality is this image?", {"json_schema": FINDINGS}),
                              ("Which plane is shown?", {"choice": PLANES})]:
        options = {**options, "max_new_tokens": 160, "logprobs": True, "top_logprobs": 2}
        want, got = backend.answer(question, **options), onnx.answer(question, **options)
        assert got.text == want.text and got.complete and got.token_ids == want.token_ids
        _check_valid(got.text, options)
        for a, b in zip(got.logprobs, want.logprobs):
            assert a.token == b.token and a.logprob == pytest.approx(b.logprob, abs=1e-3)
        with Engine(tmp_path / "onnx", backend="onnx", max_batch_size=2) as engine:
            assert engine.ask(question, **options) == want.text
