"""Fuzzing the request JSON of /v1/chat/completions (hypothesis, a bounded number of examples, no deadline) against
the real server: whatever the body, the answer is never a 5xx (nor a 500 error event inside a stream), every error
has vLLM's shape, and the patient identity of the test DICOM (tests/support/server_fixtures.py) reaches no
response and no log line, whether the DICOM decodes or not."""
from __future__ import annotations

import base64
import json

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from server_fixtures import PATIENT_ID, PATIENT_NAME, data_uri, dicom_with_identity  # noqa: E402

from gmaivl_rt.server import create_app  # noqa: E402

SECRETS = (PATIENT_NAME, PATIENT_ID, *PATIENT_NAME.split("^"))
EXAMPLES = 200

GOOD_DICOM = data_uri(dicom_with_identity(), "application/dicom")
BAD_DICOM = data_uri(dicom_with_identity(truncate_pixels=True), "application/dicom")
IMAGE_URLS = [
    GOOD_DICOM, BAD_DICOM, data_uri(open(get_testdata_file("CT_small.dcm"), "rb").read(), "application/octet-stream"),
    "data:image/png;base64," + base64.b64encode(dicom_with_identity()[:700]).decode(),  # cut short
    "data:image/png;base64,@@notbase64@@", "data:text/plain;base64,aGk=", "data:image/png,raw",
    f"file:///tmp/{PATIENT_NAME}.dcm", "http://127.0.0.1:9/x.png", "ftp://x/y", "", "data:", "http://[::1",
]

text = st.one_of(st.text(min_size=1, max_size=40), st.just(""),
                 st.sampled_from(["Hi \ud800", "\udfff", "<image>", "<|im_end|>", "\x00", PATIENT_NAME[:3]]))
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2 ** 70, max_value=2 ** 70),
                    st.floats(allow_nan=True, allow_infinity=True), text)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(text, inner, max_size=3)), max_leaves=8)
small_ints = st.one_of(st.integers(min_value=-2, max_value=4), st.sampled_from([2 ** 64, -2 ** 63 - 1, 10 ** 30]))


def maybe(strategy):
    """The field's own kind of value most of the time, anything JSON now and then."""
    return st.integers(0, 19).flatmap(lambda i: json_values if i == 19 else strategy)


good_ints = st.integers(min_value=1, max_value=4)
image_url = st.fixed_dictionaries({"url": maybe(st.sampled_from(IMAGE_URLS))}, optional={
    "frame": maybe(small_ints), "slice_index": maybe(small_ints),
    "plane": maybe(st.sampled_from(["axial", "coronal", "sagittal", "oblique"])),
    "window": maybe(st.one_of(st.sampled_from(["lung", "bone", "percentile", "minmax", "nope"]),
                              st.tuples(st.floats(allow_nan=True), st.floats(allow_nan=True)).map(list))),
    "detail": maybe(st.sampled_from(["auto", "low", "high"]))})
text_part = st.fixed_dictionaries({"type": st.just("text"), "text": maybe(text)})
image_part = st.fixed_dictionaries({"type": st.just("image_url"), "image_url": maybe(image_url)})
part = st.integers(0, 9).flatmap(lambda i: st.dictionaries(text, json_values, max_size=2) if i == 9 else
                                 text_part if i > 5 else image_part)
message = st.fixed_dictionaries(
    {"role": maybe(st.sampled_from(["user"] * 6 + ["system", "developer", "assistant", "tool"])),
     "content": maybe(st.integers(0, 3).flatmap(lambda i: text if i == 3 else st.lists(part, min_size=1,
                                                                                         max_size=3)))},
    optional={"name": maybe(text)})
# Mostly valid values, so that many examples are answered (200) and the decoding paths run too.
sampling = {
    "model": maybe(st.sampled_from(["tiny", "tiny", "other"])), "max_tokens": maybe(good_ints),
    "max_completion_tokens": maybe(st.one_of(good_ints, small_ints)),
    "temperature": maybe(st.sampled_from([0, 0.0, 0.7, 1, 2.0, -1, 1e-300, 1e-45, 1e300])),
    "top_p": maybe(st.sampled_from([0.1, 0.9, 1, 0, 1.5])), "top_k": maybe(st.one_of(good_ints, small_ints)),
    "seed": maybe(small_ints), "repetition_penalty": maybe(st.sampled_from([0.5, 1, 1.3, 0, -2])),
    "no_repeat_ngram_size": maybe(small_ints), "stop": maybe(st.one_of(text, st.lists(text, max_size=3))),
    "stream": maybe(st.booleans()), "stream_options": maybe(st.fixed_dictionaries(
        {}, optional={"include_usage": maybe(st.booleans())})), "n": maybe(st.sampled_from([1, 1, 2])),
    "user": maybe(text), "logprobs": maybe(st.booleans()), "presence_penalty": maybe(st.sampled_from([0, 0.5])),
    "response_format": maybe(st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "json_schema"},
                                              {"type": "json_schema", "json_schema": {"name": "f", "schema": {
                                                  "type": "object", "properties": {"a": {"enum": ["x", 1]}}}}}])),
    "guided_choice": maybe(st.lists(text, max_size=3)), "guided_regex": maybe(text),
    "guided_json": maybe(st.one_of(text, st.dictionaries(text, json_values, max_size=2))),
    "top_logprobs": maybe(st.one_of(small_ints, good_ints)),
}


@st.composite
def request_body(draw):
    """A chat request with a few of the fields (each mostly valid), sometimes one unknown field, sometimes any
    JSON at all."""
    if draw(st.integers(0, 9)) == 9:
        return draw(json_values)
    body = {"messages": draw(maybe(st.lists(message, min_size=1, max_size=3))),
            "max_tokens": draw(maybe(good_ints))}
    for name in draw(st.lists(st.sampled_from(sorted(sampling)), max_size=4, unique=True)):
        body[name] = draw(sampling[name])
    if draw(st.integers(0, 9)) == 9:
        body[draw(text)] = draw(json_values)
    return body


@pytest.fixture(scope="module")
def server(serving_engine, serve):
    with serve(create_app(serving_engine, served_model_name="tiny")) as running:
        yield running


@pytest.fixture(scope="module")
def http_client(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(body=request_body())
def test_no_request_body_gets_a_5xx_or_leaks_identity(body, server, http_client):
    lines_before = len(server.log.lines)
    payload = json.dumps(body, allow_nan=True).encode()  # NaN / Infinity as Python's json module writes them
    response = http_client.post("/v1/chat/completions", content=payload,
                                headers={"Content-Type": "application/json"})
    text = response.text
    hypothesis.event(f"status {response.status_code}")  # --hypothesis-show-statistics: how the examples fared
    assert response.status_code < 500, (response.status_code, text[:300], payload[:300])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == response.status_code
    elif "text/event-stream" in response.headers.get("content-type", ""):
        assert text.rstrip().endswith("data: [DONE]")
        assert '"code":500' not in text, (text[-300:], payload[:300])
    logged = "\n".join(server.log.lines[lines_before:])
    assert "Traceback" not in logged and " ERROR " not in logged, (logged[-500:], payload[:300])
    for secret in SECRETS:
        assert secret not in text and secret not in logged, secret
