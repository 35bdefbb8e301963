"""Structured output and logprobs over HTTP, spoken to by the official `openai` client: OpenAI's `response_format`
(json_object, json_schema) and vLLM's `guided_json`, `guided_choice`, `guided_regex`, streamed or not, answer as
`Engine` answers the same request and validate by `jsonschema`; logprobs come in OpenAI's shape (the client parses
them) and equal the engine's; bad constraints are 400s naming the field, never 500s."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
pytest.importorskip("llguidance", reason="structured output needs the grammar engine: pip install 'gmaivl-rt[structured]'")
jsonschema = pytest.importorskip("jsonschema")

from gmaivl_rt.server import create_app  # noqa: E402

FINDINGS = json.loads((Path(__file__).parents[2] / "examples" / "findings.schema.json").read_text())
QUESTION = "What modality is this image?"
PLANES = ["axial", "coronal", "sagittal"]


@pytest.fixture(scope="module")
def server(serving_engine, serve):
    with serve(create_app(serving_engine, served_model_name="tiny")) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


def _ask(client, **fields):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}], **fields)


def _streamed(client, **fields):
    text, logprobs, last = "", [], None
    for chunk in _ask(client, stream=True, **fields):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].logprobs is not None:
                logprobs += chunk.choices[0].logprobs.content or []
            last = chunk.choices[0]
    return text, logprobs, last


def test_json_schema_answers_validate_streamed_or_not_and_equal_the_engine(client, serving_engine):
    """Sampled at temperature 1 under the findings schema with a seed: the reply parses and validates
    (jsonschema), equals `Engine.ask` with json_schema= and the same seed, streams the same text and logprobs (the
    chunks' logprobs joined), and carries one logprob per completion token, each with its top 2 (fewer where the
    schema allows fewer tokens) in OpenAI's shape. Mutants seen failing: `structured_output` ignoring a json_schema
    response_format (prose comes back); sse_events sending earlier tokens' logprobs again (`sent` not advanced);
    the non-streamed completion without `answer_details` (logprobs null)."""
    fields = dict(max_tokens=200, temperature=1.0, seed=11, logprobs=True, top_logprobs=2,
                  response_format={"type": "json_schema",
                                   "json_schema": {"name": "finding", "schema": FINDINGS, "strict": True}})
    reply = _ask(client, **fields)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.model_extra.get("constraint_satisfied") is True
    jsonschema.validate(json.loads(choice.message.content), FINDINGS)
    engine = serving_engine.submit(QUESTION, json_schema=FINDINGS, do_sample=True, temperature=1.0, seed=11,
                                   max_new_tokens=200, logprobs=True, top_logprobs=2)
    assert choice.message.content == engine.result(timeout=300)
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens == len(engine.token_ids)
    for entry, want in zip(content, engine.logprobs):
        assert entry.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert entry.token == serving_engine.tokenizer.decode([want.token], skip_special_tokens=False)
        assert entry.bytes == list(entry.token.encode("utf-8", errors="replace"))
        assert 1 <= len(entry.top_logprobs) <= 2 and entry.logprob <= entry.top_logprobs[0].logprob + 1e-6
    text, streamed, last = _streamed(client, **fields)
    assert text == choice.message.content
    # the same tokens, bytes and top choices; logprobs within float32 rounding (the two requests' forwards may
    # differ in batch company and in how much of the prompt the prefix cache served: sums in another order)
    assert len(streamed) == len(content)
    for got, want in zip(streamed, content):
        assert (got.token, got.bytes) == (want.token, want.bytes)
        assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert [(t.token, t.bytes) for t in got.top_logprobs] == [(t.token, t.bytes) for t in want.top_logprobs]
        assert [t.logprob for t in got.top_logprobs] == pytest.approx([t.logprob for t in want.top_logprobs], abs=1e-5)
    assert last.finish_reason == "stop" and last.model_extra.get("constraint_satisfied") is True


@pytest.mark.parametrize("fields, check", [
    ({"extra_body": {"guided_choice": PLANES}}, lambda text: text in PLANES),
    ({"extra_body": {"guided_regex": r"[0-9]{1,3} mm"}}, lambda text: re.fullmatch(r"[0-9]{1,3} mm", text)),
    ({"extra_body": {"guided_json": FINDINGS}},
     lambda text: jsonschema.validate(json.loads(text), FINDINGS) is None),
], ids=["guided_choice", "guided_regex", "guided_json"])
def test_vllm_guided_fields_constrain_sampled_answers(client, fields, check):
    """Five seeds each, temperature 1: every answer is inside its constraint (checked by Python's re, json and
    jsonschema). Mutant seen failing: guided_choice dropped in `structured_output`."""
    for seed in range(5):
        reply = _ask(client, max_tokens=200, temperature=1.0, seed=seed, **fields)
        assert reply.choices[0].finish_reason == "stop", reply
        assert check(reply.choices[0].message.content), reply.choices[0].message.content


def test_json_object_is_a_json_object_or_flagged_partial(client):
    """response_format json_object: any JSON object. A random tiny model rarely closes a free object within the
    budget, so each of five sampled answers is either finished and a JSON object (json.loads) or cut at the
    budget, flagged partial, and the start of one. Mutant: json_object mapped to no constraint (prose)."""
    for seed in range(5):
        choice = _ask(client, max_tokens=40, temperature=1.0, seed=seed,
                      response_format={"type": "json_object"}).choices[0]
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
            assert choice.model_extra["constraint_satisfied"] is True
        else:
            assert choice.model_extra["constraint_satisfied"] is False
            assert choice.message.content.startswith("{"), choice.message.content


def test_a_schema_cut_by_max_tokens_is_flagged_partial(client):
    """finish_reason "length" and constraint_satisfied false, streamed and not; the text is no finished JSON.
    Mutant seen failing: constraint_satisfied left out of the last chunk."""
    reply = _ask(client, max_tokens=5, extra_body={"guided_json": FINDINGS})
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].model_extra.get("constraint_satisfied") is False
    with pytest.raises(ValueError):
        json.loads(reply.choices[0].message.content)
    text, _, last = _streamed(client, max_tokens=5, extra_body={"guided_json": FINDINGS})
    assert text == reply.choices[0].message.content
    assert last.finish_reason == "length" and last.model_extra.get("constraint_satisfied") is False


def test_logprobs_without_a_constraint(client, serving_engine):
    """Greedy, unconstrained: top_logprobs 3 per token, the chosen token first among them (greedy picks the most
    likely), logprobs equal to the engine's; no constraint_satisfied field. Mutant seen failing: one more top
    logprob than asked for (`top_logprobs + 1`)."""
    reply = _ask(client, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    assert "constraint_satisfied" not in (choice.model_extra or {})
    want = serving_engine.submit(QUESTION, max_new_tokens=6, logprobs=True, top_logprobs=3)
    want.result(timeout=300)
    assert len(choice.logprobs.content) == len(want.logprobs) == reply.usage.completion_tokens
    for entry, w in zip(choice.logprobs.content, want.logprobs):
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(w.logprob, abs=1e-5)
    assert _ask(client, max_tokens=2, logprobs=False).choices[0].logprobs is None


@pytest.mark.parametrize("fields, param_or_text", [
    ({"extra_body": {"guided_choice": []}}, "guided_choice: choice is empty"),
    ({"extra_body": {"guided_json": {"type": "strin"}}}, "guided_json: json_schema is not a valid JSON Schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 7}}}},
     "response_format.json_schema.schema: json_schema is not a valid JSON Schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "schema"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"extra_body": {"guided_regex": "(ab"}}, "unclosed group"),
    ({"extra_body": {"guided_regex": r"x[^\s\S]"}}, "regex allows no answer"),
    ({"extra_body": {"guided_json": {"type": "array", "uniqueItems": True}}}, "Unimplemented keys"),
    ({"extra_body": {"guided_regex": "a", "guided_choice": ["b"]}}, "give at most one way"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}}, "give at most one way"),
    ({"top_logprobs": 2}, "top_logprobs needs logprobs=True"),
    ({"logprobs": True, "top_logprobs": 21}, r"top_logprobs must be in \[0, 20\]"),
    ({"extra_body": {"guided_json": {"enum": [str(i) * 100 for i in range(700)]}}}, "the limit is 65536"),
])
def test_bad_constraints_are_400s_naming_the_problem(client, fields, param_or_text):
    """Mutant seen failing: the field prefix dropped from `structured_output`'s errors."""
    with pytest.raises(openai.BadRequestError) as caught:
        _ask(client, max_tokens=4, **fields)
    assert re.search(param_or_text, caught.value.response.json()["error"]["message"]), \
        caught.value.response.json()


def test_page_structured_toggle_shows_the_finding_as_a_table(server, browser):
    """The page's "structured" toggle asks under the findings schema (response_format) and shows the answer as a
    table: every leaf of the JSON the API gives for the same request (the openai client, greedy) is one row,
    "lesion.size_mm"-style, with its value. Mutants: the toggle's response_format not sent (prose, no table);
    `flatten` not descending into objects (a "lesion" row holding JSON)."""
    from pydicom.data import get_testdata_file
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from server_fixtures import ask_on_page, data_uri

    ct = get_testdata_file("CT_small.dcm")
    url = data_uri(open(ct, "rb").read(), "application/octet-stream")
    expected = openai.OpenAI(base_url=server.url + "/v1", api_key="none").chat.completions.create(
        model="tiny", max_tokens=160, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}],
        response_format={"type": "json_schema", "json_schema": {"name": "finding", "schema": FINDINGS}},
    ).choices[0].message.content
    finding = json.loads(expected)
    want = [("modality", finding["modality"]), ("plane", finding["plane"]), ("body_part", finding["body_part"]),
            *[(f"lesion.{k}", json.dumps(v) if not isinstance(v, str) else v) for k, v in finding["lesion"].items()]]

    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    upload = browser.find_element(By.ID, "file")
    browser.execute_script("arguments[0].style.display = 'block';", upload)
    upload.send_keys(ct)
    wait.until(lambda d: d.find_element(By.ID, "ask").is_enabled())
    ask_on_page(browser, wait, QUESTION, 160, "structured")
    status = browser.find_element(By.ID, "status").text
    assert browser.find_element(By.ID, "answer").get_attribute("data-done") == "true", status
    assert browser.find_element(By.ID, "answer").get_attribute("textContent") == expected
    table = browser.find_element(By.ID, "finding")
    assert table.is_displayed()
    rows = [tuple(cell.text for cell in row.find_elements(By.TAG_NAME, "td"))
            for row in table.find_elements(By.CSS_SELECTOR, "tbody tr")]
    assert sorted(rows) == sorted(want)
