"""Bad and unusual request bodies against the real server (uvicorn on a free loopback port): every bad input gets a
4xx JSON error naming the field or image by role, never a 500, a traceback in the log or a dropped keep-alive
connection; no file name or DICOM header text reaches a response or a log line; the preview shows only closed
vocabularies; vLLM's sampling fields are honoured (answers equal `Engine.ask` with the same options, spoken to by
the official `openai` client), unimplemented OpenAI fields and unknown fields are refused naming them, and the
documented harmless fields are ignored."""
from __future__ import annotations

import io
import json
import urllib.parse

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from pydicom.data import get_testdata_file  # noqa: E402
from server_fixtures import PATIENT_ID, PATIENT_NAME, QUESTION, data_uri, dicom_with_identity  # noqa: E402

from gmaivl_rt.server import create_app  # noqa: E402

PROBE = "Qwxz^Probe_PRB-99-ZZ"  # stands for identity in a file name or a free-text header
SECRETS = (PROBE, "PRB-99-ZZ", "Qwxz", "qwxz", "Probe", PATIENT_NAME, PATIENT_ID)
TOKENS = 6


def probe_dicom(**attributes) -> bytes:
    """pydicom's CT_small.dcm with header values set (keyword=value; file_meta keywords too)."""
    import pydicom

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for keyword, value in attributes.items():
        setattr(ds.file_meta if keyword == "TransferSyntaxUID" else ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("allowed_media")
    (root / "ct.dcm").write_bytes(open(get_testdata_file("CT_small.dcm"), "rb").read())
    (root / "loop.dcm").symlink_to("loop.dcm")  # a link to itself
    (root / "ring_a.dcm").symlink_to("ring_b.dcm")
    (root / "ring_b.dcm").symlink_to("ring_a.dcm")
    (root / f"{PROBE}.dcm").write_bytes(b"\x00" * 200)  # undecodable, its name carries the probe
    return root


@pytest.fixture(scope="module")
def server(serving_engine, media, serve):
    app = create_app(serving_engine, served_model_name="tiny", allowed_local_media_path=media)
    with serve(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="-", timeout=60, max_retries=0)


def chat(url: str | None = None, text: str = QUESTION, **fields) -> dict:
    content = [{"type": "text", "text": text}]
    if url is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return {"messages": [{"role": "user", "content": content}], "max_tokens": TOKENS, "temperature": 0, **fields}


def long_name_url(media) -> str:
    return "file://" + urllib.parse.quote(f"{media}/{PROBE}_{'a' * (300 - len(PROBE) - 5)}.dcm")  # 300 characters


BAD_INPUTS = {
    # name: (body builder (media folder -> body dict or raw bytes), words the message names)
    "seed 2**64": (lambda m: chat(seed=2 ** 64, temperature=1.0), "seed"),
    "seed below int64": (lambda m: chat(seed=-2 ** 63 - 1, temperature=1.0), "seed"),
    "lone surrogate in text": (lambda m: chat(text="Hi \ud800"), "Unicode"),
    "lone surrogate as content": (lambda m: {"messages": [{"role": "user", "content": "Hi \udfff"}]}, "Unicode"),
    "lone surrogate in the model name": (lambda m: chat(model="m\ud800"), "model"),
    "lone surrogate in a stop string": (lambda m: chat(stop=["\ud800"]), "stop"),
    "file url with %00": (lambda m: chat((m / "ct.dcm").as_uri() + "%00.png"), "image 1"),
    "300-character file name": (lambda m: chat(long_name_url(m)), "image 1"),
    "symlink to itself": (lambda m: chat((m / "loop.dcm").as_uri()), "image 1"),
    "symlink ring": (lambda m: chat((m / "ring_a.dcm").as_uri()), "image 1"),
    "undecodable file with a telling name": (lambda m: chat((m / f"{PROBE}.dcm").as_uri()), "image 1"),
    "transfer syntax UID holding text": (lambda m: chat(data_uri(probe_dicom(TransferSyntaxUID="PRB-99-ZZ"),
                                                                 "application/dicom")), "image 1"),
    "undecodable DICOM with identity": (lambda m: chat(data_uri(dicom_with_identity(truncate_pixels=True),
                                                                "application/dicom")), "image 1"),
    "NaN temperature": (lambda m: b'{"messages":[{"role":"user","content":"Hi"}],"temperature":NaN}', "temperature"),
    "Infinity top_p": (lambda m: b'{"messages":[{"role":"user","content":"Hi"}],"top_p":Infinity}', "top_p"),
    "max_tokens true": (lambda m: chat(max_tokens=True), "max_tokens"),
    "max_tokens 2.0": (lambda m: chat(max_tokens=2.0), "max_tokens"),
    "max_tokens as text": (lambda m: chat(max_tokens="4"), "max_tokens"),
    "stream 'yes'": (lambda m: chat(stream="yes"), "stream"),
    "stream 1": (lambda m: chat(stream=1), "stream"),
    "include_usage 'true'": (lambda m: chat(stream=True, stream_options={"include_usage": "true"}), "include_usage"),
    "n true": (lambda m: chat(n=True), "n"),
    "frame 1.0": (lambda m: {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": (m / "ct.dcm").as_uri(), "frame": 1.0}}]}]}, "frame"),
    "unknown part type": (lambda m: {"messages": [{"role": "user", "content": [{"type": PROBE, "text": "x"}]}]},
                          "type"),
    "unknown field named by identity": (lambda m: {**chat(), PROBE: 1}, "unknown field"),
    "integer beyond JSON's digits": (lambda m: b'{"messages":[],"max_tokens":' + b"9" * 5000 + b"}", "body"),
    "deep nesting": (lambda m: b'{"messages":' + b"[" * 100000 + b"]" * 100000 + b"}", "body"),
    "not UTF-8": (lambda m: b'{"messages":[{"role":"user","content":"\xff\xfe"}]}', ""),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_a_4xx_json_answer_that_keeps_the_connection(case, server, media, keep_alive):
    build, words = BAD_INPUTS[case]
    body = build(media)
    lines_before = len(server.log.lines)
    connection = keep_alive(server)
    try:
        status, headers, text = connection.request("POST", "/v1/chat/completions",
                                                   **({"raw": body} if isinstance(body, bytes) else {"body": body}))
        assert 400 <= status < 500, (status, text)
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
        assert words.lower() in error["message"].lower(), error["message"]
        assert headers.get("connection", "").lower() != "close"
        # the same socket answers the next request
        assert connection.request("GET", "/v1/models")[0] == 200
    finally:
        connection.close()
    logged = "\n".join(server.log.lines[lines_before:])
    assert "Traceback" not in logged and " ERROR " not in logged, logged
    for secret in SECRETS:
        assert secret not in text and secret not in logged, secret


def test_a_good_file_url_still_answers(server, client, serving_engine, media):
    """The guard rails above leave a good file:// URL working, answered as Engine.ask answers the file."""
    reply = client.chat.completions.create(model="tiny", max_tokens=TOKENS, temperature=0, messages=chat(
        (media / "ct.dcm").as_uri())["messages"])
    assert reply.choices[0].message.content == serving_engine.ask(QUESTION, image=str(media / "ct.dcm"),
                                                                  max_new_tokens=TOKENS)


# ------------------------------------------------------------------------------------------------ identity
def test_the_preview_shows_only_closed_vocabularies(server):
    """Free text in Modality / BodyPartExamined never reaches the preview; DICOM's own terms do."""
    def preview(**attributes):
        url = data_uri(probe_dicom(**attributes), "application/dicom")
        response = httpx.post(server.url + "/v1/gmaivl/preview", json={"image_url": {"url": url}}, timeout=60)
        assert response.status_code == 200, response.text
        return response.text, response.json()["metadata"]

    text, meta = preview(Modality="Qwxz", BodyPartExamined="qwxz^probe")
    assert (meta["modality"], meta["body_part"], meta["modality_name"]) == (None, None, None)
    assert "qwxz" not in text.lower() and "probe" not in text.lower()
    _, meta = preview(Modality="CT", BodyPartExamined="CHEST")
    assert (meta["modality"], meta["body_part"], meta["modality_name"]) == ("CT", "chest", "CT")
    _, meta = preview(Modality="MR", BodyPartExamined="HEAD")
    assert (meta["modality"], meta["body_part"]) == ("MR", "head")
    for value in meta.values():  # numbers, lists of numbers, or short words
        assert value is None or isinstance(value, (int, float, list)) or (isinstance(value, str) and len(value) < 24)


# ------------------------------------------------------------------------------------------------ fields
def _asked(engine, count=24, **options):
    return engine.ask(QUESTION, max_new_tokens=count, **options)


def test_vllm_sampling_fields_are_honoured(client, serving_engine):
    """repetition_penalty, no_repeat_ngram_size, top_k, min_p and seed, sent as vLLM's clients send them
    (extra_body), decode as Engine.ask does with the same options."""
    def ask(**fields):
        extra = {k: fields.pop(k) for k in ("repetition_penalty", "no_repeat_ngram_size", "top_k", "min_p")
                 if k in fields}
        reply = client.chat.completions.create(model="tiny", max_tokens=24, extra_body=extra or None,
                                               messages=[{"role": "user", "content": QUESTION}], **fields)
        return reply.choices[0].message.content

    plain = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
    strong = {"repetition_penalty": 3.0, "no_repeat_ngram_size": 2}
    expected_plain = _asked(serving_engine, do_sample=False, **plain)
    expected_strong = _asked(serving_engine, do_sample=False, **strong)
    assert expected_plain != expected_strong  # the fields matter for this model and question
    assert ask(temperature=0, **plain) == expected_plain
    assert ask(temperature=0, **strong) == expected_strong
    # top_k 1 samples the most likely token: greedy, whatever the seed
    assert ask(temperature=1.0, top_k=1, seed=11, **plain) == expected_plain
    sampled = _asked(serving_engine, do_sample=True, temperature=1.0, seed=5, **plain)
    assert sampled != expected_plain  # sampling differs from greedy here, so the top_k check above means something
    assert ask(temperature=1.0, seed=5, **plain) == sampled
    assert ask(temperature=1.0, seed=5, top_k=-1, **plain) == sampled  # vLLM's "top_k off"
    # min_p 1 keeps only the most likely token: greedy; a middling min_p decodes as the engine's
    assert ask(temperature=1.0, seed=5, min_p=1.0, **plain) == expected_plain
    assert ask(temperature=1.0, seed=5, min_p=0.05, **plain) == _asked(serving_engine, do_sample=True, temperature=1.0,
                                                                      seed=5, min_p=0.05, **plain)


def _refusal(client, **fields):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": "Hi"}],
                                       **fields)
    return caught.value.response.json()["error"]


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    ("tool_choice", "required"), ("logit_bias", {"17": 5}), ("presence_penalty", 0.5),
    ("frequency_penalty", -0.5), ("parallel_tool_calls", False),
])  # response_format, logprobs and top_logprobs are implemented: tests/server/test_server_structured.py
def test_unimplemented_fields_are_refused_naming_them(client, field, value):
    error = _refusal(client, extra_body={field: value})
    assert error["param"] == field and error["message"].startswith(f"{field}: not supported"), error


@pytest.mark.parametrize("field, value", [("logprobs", False), ("presence_penalty", 0), ("frequency_penalty", 0.0),
                                          ("tool_choice", "none"), ("tools", []), ("response_format", {"type": "text"}),
                                          ("top_logprobs", 0), ("logit_bias", None)])
def test_unimplemented_fields_at_their_neutral_value_are_accepted(client, field, value):
    reply = client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": "Hi"}],
                                           extra_body={field: value})
    assert reply.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("where", ["top level", "message", "image_url", "stream_options"])
def test_unknown_fields_are_refused_naming_them(server, where):
    body = chat(data_uri(open(get_testdata_file("CT_small.dcm"), "rb").read(), "application/dicom"))
    target = {"top level": body, "message": body["messages"][0],
              "image_url": body["messages"][0]["content"][0]["image_url"]}.get(where)
    if where == "stream_options":
        body.update(stream=True, stream_options={"include_usage": True})
        target = body["stream_options"]
    target["temprature"] = 0.5
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"].endswith("temprature") and "unknown field" in error["message"], error


def test_harmless_client_fields_are_ignored(client, serving_engine):
    """`user`, `metadata`, a message's `name` and an image part's `detail` change nothing."""
    url = data_uri(open(get_testdata_file("CT_small.dcm"), "rb").read(), "application/dicom")
    messages = [{"role": "user", "name": "reader-1", "content": [
        {"type": "image_url", "image_url": {"url": url, "detail": "high"}}, {"type": "text", "text": QUESTION}]}]
    reply = client.chat.completions.create(model="tiny", max_tokens=TOKENS, temperature=0, messages=messages,
                                           user="user-42", metadata={"study": "demo"})
    assert reply.choices[0].message.content == serving_engine.ask(
        QUESTION, image=get_testdata_file("CT_small.dcm"), max_new_tokens=TOKENS)


def test_an_answer_echoed_back_as_history_is_accepted(client):
    """The official client's assistant message, dumped and sent back (refusal / tool_calls null), as chat UIs do."""
    first = client.chat.completions.create(model="tiny", max_tokens=3, temperature=0,
                                           messages=[{"role": "user", "content": "Hi"}])
    echoed = first.choices[0].message.model_dump()
    echoed["content"] = echoed["content"] or "ok"
    reply = client.chat.completions.create(model="tiny", max_tokens=3, temperature=0, messages=[
        {"role": "user", "content": "Hi"}, echoed, {"role": "user", "content": "And?"}])
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_the_transfer_syntax_error_names_no_header_text():
    """At the reader: an unregistered transfer syntax UID is named as such, not quoted."""
    from gmaivl_rt.errors import InputError
    from gmaivl_rt.medical.convert import to_medical_image

    with pytest.raises(InputError) as caught:
        to_medical_image(probe_dicom(TransferSyntaxUID="PRB-99-ZZ"), role="image 3")
    assert str(caught.value).startswith("image 3: ") and "PRB" not in str(caught.value)
    assert "unregistered transfer syntax" in str(caught.value)
    # a registered syntax is still named, by its registered name
    with pytest.raises(InputError, match="transfer syntax 'Explicit VR Little Endian'"):
        to_medical_image(dicom_with_identity(truncate_pixels=True), role="image 3")


def test_each_layer_keeps_header_text_out():
    """The reader keeps only closed-vocabulary terms, and the preview checks again whatever image it is given."""
    import numpy as np

    from gmaivl_rt.medical.base import MedicalImage
    from gmaivl_rt.medical.convert import to_medical_image
    from gmaivl_rt.server.preview import safe_metadata

    image = to_medical_image(probe_dicom(Modality="Qwxz", BodyPartExamined="qwxz^probe"))
    assert (image.modality, image.body_part) == (None, None)
    image = to_medical_image(probe_dicom(Modality="ct", BodyPartExamined="Chest"))
    assert (image.modality, image.body_part) == ("CT", "chest")
    free_text = MedicalImage(pixels=np.zeros((4, 4, 3), np.uint8), modality="Qwxz", body_part="qwxz^probe",
                             orientation="qwxz", window=(float("nan"), 1.0), pixel_spacing=(0.5, 0.5))
    meta = safe_metadata(free_text)
    assert (meta["modality"], meta["body_part"], meta["orientation"], meta["window"]) == (None, None, None, None)
    assert meta["pixel_spacing"] == [0.5, 0.5]
    json.dumps(meta, allow_nan=False)  # what the JSON response encoder demands


def test_an_internal_failure_is_a_500_without_traceback_and_the_connection_stays(serving_engine, serve, keep_alive):
    """The last resort: an engine that fails unexpectedly (a fault injected into `submit`) gets a generic 500 JSON
    answer and one log line naming the error's type and code location, never its text or a traceback."""
    class FailingEngine:
        def __getattr__(self, name):
            return getattr(serving_engine, name)

        def submit(self, *args, **kwargs):
            raise RuntimeError(f"failed near {PROBE}")

    with serve(create_app(FailingEngine(), served_model_name="tiny")) as server:
        connection = keep_alive(server)
        try:
            status, _, text = connection.request("POST", "/v1/chat/completions", body=chat())
            assert status == 500 and json.loads(text)["error"]["message"] == "internal server error"
            assert connection.request("GET", "/v1/models")[0] == 200
        finally:
            connection.close()
        logged = server.log.text
    assert "internal error: RuntimeError at test_server_inputs.py:" in logged
    assert "Traceback" not in logged and PROBE not in logged and PROBE not in text
