"""`--audit-log FILE`: one JSON line per /v1 request, with the outcome `gmaivl:requests_total` counts it by, its
status, token counts as the official `openai` client sees them in `usage`, and SHA-256 digests equal to hashlib's of
the bytes sent; never the question, a patient's name or ID from the DICOM header, a file name, a URL or a header
value. The file is 0600, its lines whole under concurrent requests, and a failing write never fails a request."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import threading
import time
from datetime import datetime, timedelta

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from server_fixtures import PATIENT_ID, PATIENT_NAME, QUESTION, data_uri, dicom_with_identity  # noqa: E402

from gmaivl_rt.server import create_app  # noqa: E402

MODEL = "tiny-audit"
HEADER_SECRET = "header-value-that-must-not-leak"
FILE_NAME = f"{PATIENT_NAME}-{PATIENT_ID}.dcm"
KEYS = {"time", "request_id", "client", "endpoint", "outcome", "status", "prompt_tokens", "completion_tokens",
        "images", "image_sha256"}


@pytest.fixture(scope="module")
def media_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("audit_media")
    (folder / FILE_NAME).write_bytes(dicom_with_identity())
    return folder


@pytest.fixture(scope="module")
def audited(serving_engine, serve, media_folder, tmp_path_factory):
    """(server, audit log path) of a server over the shared engine writing an audit log."""
    path = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    app = create_app(serving_engine, served_model_name=MODEL, audit_log=path, allowed_local_media_path=media_folder)
    with serve(app) as server:
        yield server, path


def lines_of(path) -> list[dict]:
    """The log's lines; none while the file does not exist (a removed log is created again by the next line, which
    is written after its answer was sent)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="ascii").splitlines()]


def new_lines(path, before: int, count: int = 1, timeout_s: float = 20.0) -> list[dict]:
    """The lines after the first `before`, once there are `count` of them (a line is written when the answer has
    been sent, so the client may see its answer first); asserts no more than `count` came."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = lines_of(path)[before:]
        if len(lines) >= count:
            break
        time.sleep(0.05)
    time.sleep(0.2)  # a second line for the same request would come now
    lines = lines_of(path)[before:]
    assert len(lines) == count, f"expected {count} new audit line(s), found {len(lines)}: {lines}"
    for line in lines:
        assert set(line) == KEYS, line
        moment = datetime.fromisoformat(line["time"].replace("Z", "+00:00"))
        assert moment.utcoffset() == timedelta(0)
        assert line["client"] == "127.0.0.1"
    return lines


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0,
                         default_headers={"X-Clinic-Note": HEADER_SECRET})


def ask(content, **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0,
            **fields}


def test_answers_streams_and_refusals_get_one_line_each(audited):
    server, path = audited
    before = len(lines_of(path))
    answer = client(server).chat.completions.create(**ask(QUESTION))
    [line] = new_lines(path, before)
    assert line["endpoint"] == "/v1/chat/completions" and line["outcome"] == "success" and line["status"] == 200
    assert line["request_id"] == answer.id
    assert (line["prompt_tokens"], line["completion_tokens"]) == (answer.usage.prompt_tokens,
                                                                   answer.usage.completion_tokens)
    assert line["completion_tokens"] > 0 and line["images"] == 0 and line["image_sha256"] == []

    before += 1
    chunks = list(client(server).chat.completions.create(**ask(QUESTION, stream=True,
                                                                stream_options={"include_usage": True})))
    usage = chunks[-1].usage
    [line] = new_lines(path, before)
    assert (line["outcome"], line["status"], line["request_id"]) == ("success", 200, chunks[0].id)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (usage.prompt_tokens, usage.completion_tokens)

    before += 1
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(**dict(ask(QUESTION), model="no-such-model"))
    [line] = new_lines(path, before)
    assert (line["outcome"], line["status"], line["completion_tokens"]) == ("client_error", 404, 0)

    before += 1
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(**ask(QUESTION, temperature=-3))
    [line] = new_lines(path, before)
    assert (line["outcome"], line["status"]) == ("client_error", 400)

    before += 1
    assert [m.id for m in client(server).models.list()] == [MODEL]
    [line] = new_lines(path, before)
    assert (line["endpoint"], line["outcome"], line["status"]) == ("/v1/models", "success", 200)

    before += 1
    assert httpx.get(f"{server.url}/v1/{PATIENT_ID}", timeout=30).status_code == 404
    [line] = new_lines(path, before)  # a path outside the routes is not written: it could carry text
    assert (line["endpoint"], line["outcome"], line["status"]) == ("/v1/(other)", "client_error", 404)


def test_a_stream_the_client_leaves_is_cancelled(audited):
    server, path = audited
    before = len(lines_of(path))
    stream = client(server).chat.completions.create(**ask(QUESTION, max_tokens=300, stream=True))
    first = next(iter(stream))
    stream.close()  # hang up after the first chunk, far from the end
    [line] = new_lines(path, before)
    assert (line["outcome"], line["status"], line["request_id"]) == ("cancelled", 200, first.id)
    assert line["completion_tokens"] < 300


def test_images_are_counted_and_digested_never_named(audited, media_folder):
    server, path = audited
    dicom = dicom_with_identity()
    broken = dicom_with_identity(truncate_pixels=True)
    before = len(lines_of(path))
    content = [{"type": "image_url", "image_url": {"url": data_uri(dicom, "application/dicom")}},
               {"type": "image_url", "image_url": {"url": (media_folder / FILE_NAME).as_uri()}},
               {"type": "text", "text": QUESTION}]
    answer = client(server).chat.completions.create(**ask(content))
    [line] = new_lines(path, before)
    assert (line["outcome"], line["images"], line["prompt_tokens"]) == ("success", 2, answer.usage.prompt_tokens)
    assert line["image_sha256"] == [hashlib.sha256(dicom).hexdigest()] * 2  # the file holds the same bytes

    before += 1
    with pytest.raises(openai.BadRequestError):  # an image that cannot decode: refused, still digested
        client(server).chat.completions.create(**ask([
            {"type": "image_url", "image_url": {"url": data_uri(broken, "application/dicom")}},
            {"type": "text", "text": QUESTION}]))
    [line] = new_lines(path, before)
    assert (line["outcome"], line["status"], line["images"]) == ("client_error", 400, 1)
    assert line["image_sha256"] == [hashlib.sha256(broken).hexdigest()]

    before += 1
    preview = httpx.post(server.url + "/v1/gmaivl/preview", timeout=60,
                         json={"image_url": {"url": data_uri(dicom, "application/dicom")}})
    assert preview.status_code == 200
    [line] = new_lines(path, before)
    assert (line["endpoint"], line["images"]) == ("/v1/gmaivl/preview", 1)
    assert line["image_sha256"] == [hashlib.sha256(dicom).hexdigest()]


def test_the_file_holds_no_text_and_is_private(audited):
    """Run after the requests above (pytest keeps file order): nothing they sent is in the file."""
    _, path = audited
    text = path.read_text(encoding="ascii")
    assert text.count("\n") >= 10
    dicom_b64 = base64.b64encode(dicom_with_identity()).decode("ascii")
    for secret in (QUESTION, PATIENT_NAME, PATIENT_ID, PATIENT_NAME.split("^")[0], FILE_NAME, HEADER_SECRET,
                   "file://", "data:", dicom_b64[:40], "OpenAI", "temperature"):
        assert secret not in text, f"{secret!r} reached the audit log"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_concurrent_requests_write_whole_lines(audited):
    server, path = audited
    before = len(lines_of(path))
    errors: list = []

    def one():
        try:
            client(server).chat.completions.create(**ask(QUESTION))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=one) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors
    lines = new_lines(path, before, count=12)  # each parses as JSON: none interleaved
    assert len({line["request_id"] for line in lines}) == 12
    assert all(line["outcome"] == "success" for line in lines)


def test_a_failing_audit_write_never_fails_the_request(serving_engine, serve, tmp_path, caplog):
    """/dev/full answers every write with ENOSPC (a full disk); a removed log file is created again."""
    app = create_app(serving_engine, served_model_name=MODEL, audit_log="/dev/full")
    with serve(app) as server:
        for _ in range(3):
            assert client(server).chat.completions.create(**ask(QUESTION)).choices[0].message.content is not None
        time.sleep(0.3)
        warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("audit log")]
        assert len(warnings) == 1 and "No space left on device" in warnings[0], warnings
        assert QUESTION not in server.log.text

    path = tmp_path / "audit.jsonl"
    app = create_app(serving_engine, served_model_name=MODEL, audit_log=path)
    with serve(app) as server:
        client(server).chat.completions.create(**ask(QUESTION))
        new_lines(path, 0)
        path.unlink()
        client(server).chat.completions.create(**ask(QUESTION))
        new_lines(path, 0)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_an_unwritable_audit_log_stops_the_start(serving_engine, tmp_path):
    from gmaivl_rt.errors import InputError

    with pytest.raises(InputError, match=r"--audit-log cannot be opened .*No such file") as refused:
        create_app(serving_engine, served_model_name=MODEL, audit_log=tmp_path / "no-such-folder" / "audit.jsonl")
    assert "no-such-folder" not in str(refused.value)
