"""`gmaivl-rt serve --dicomweb URL` (create_app(dicomweb=...)) against a real archive (Orthanc + DICOMweb, started
here): a chat completion about a study named by its UIDs answers as the same picture uploaded answers, and with
`write_sr` stores a Structured Report that Orthanc's REST API and pydicom read back; the browse routes give only
UIDs, modality codes, dates and counts (checked against pydicom's reading of the stored files); bad input is a 400
naming the field, the decode budget refuses before download, nothing is written on failure, and no UID or patient
value reaches the server's log; the page browses the archive and asks in headless Chromium."""
from __future__ import annotations

import base64
import io

import pydicom
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("dicomweb_client", reason="the [hospital] extra (dicomweb-client) is not installed")
pytest.importorskip("highdicom", reason="the [hospital] extra (highdicom) is not installed")

from orthanc import stocked_archive
from server_fixtures import ask_on_page

from gmaivl_rt.limits import DecodeBudget
from gmaivl_rt.medical.structured_report import dicom_text
from gmaivl_rt.server import create_app

API_KEY = "archive-key-1"
QUESTION = "What modality is this image?"
TOKENS = 6
ASK = "/v1/gmaivl/archive/chat/completions"
PREVIEW = "/v1/gmaivl/archive/preview"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    with stocked_archive(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


@pytest.fixture(scope="module")
def server(serving_engine, serve, archive):
    """The server, its log recorded at every level (gmaivl_rt's loggers at DEBUG while it runs)."""
    import logging

    ours = logging.getLogger("gmaivl_rt")
    level = ours.level
    ours.setLevel(logging.DEBUG)
    app = create_app(serving_engine, served_model_name="tiny", api_key=API_KEY, dicomweb=archive.dicomweb)
    try:
        with serve(app) as running:
            yield running
    finally:
        ours.setLevel(level)


def post(server, path, body, key=API_KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=300)


def study_instances(archive, study: str) -> list[dict]:
    """Orthanc's own view (REST API, not DICOMweb): the study's instances."""
    found = [s for s in archive.rest("/studies?expand") if s["MainDicomTags"]["StudyInstanceUID"] == study]
    return archive.rest(f"/studies/{found[0]['ID']}/instances") if found else []


def patient_values(ds) -> list[str]:
    """The source's patient and free-text header values that must never show (names, IDs, birth date, ...)."""
    values = []
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyDescription",
                    "ReferringPhysicianName", "InstitutionName", "StudyID"):
        value = str(ds.get(keyword, "") or "")
        if len(value) >= 3:
            values.append(value)
    return values


def uploaded_reply(server, ds) -> dict:
    """The choice /v1/chat/completions gives (greedy, with logprobs) for the picture uploaded as a DICOM data URI."""
    buffer = io.BytesIO()
    ds.save_as(buffer)
    url = "data:application/dicom;base64," + base64.b64encode(buffer.getvalue()).decode()
    reply = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}],
        "max_tokens": TOKENS, "temperature": 0, "logprobs": True, "top_logprobs": 1})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]


def uploaded_answer(server, ds) -> str:
    return uploaded_reply(server, ds)["message"]["content"]


def logprob_values(content) -> list[float]:
    return [entry["logprob"] if isinstance(entry, dict) else entry.logprob for entry in content]


def test_ask_by_uids_answers_as_the_upload_and_stores_the_report(server, archive):
    """The openai client, pointed at the archive route: the volume study's middle slice (the study-only rule)
    answers exactly as that slice uploaded answers; with write_sr a Comprehensive SR appears in the same study
    (Orthanc's REST API), pydicom reads it: the question and answer, references to the five slices, UNVERIFIED, the
    served model's name; the reply names its UID; no UID or patient value in the server's log.
    The answers' logprobs are compared too: this tiny model may give the same few tokens for two slices, never the
    same logprobs (checked for the first slice). Mutants seen failing: the series' first instance asked about
    instead of the chosen read (logprobs differ); `file_report` called with write_sr=False (no SR in Orthanc); the
    study UID logged by the ask route."""
    volume = archive.volume
    study = str(volume[0].StudyInstanceUID)
    upload = uploaded_reply(server, volume[2])
    expected = upload["message"]["content"]
    other = logprob_values(uploaded_reply(server, volume[0])["logprobs"]["content"])
    want = logprob_values(upload["logprobs"]["content"])
    assert other != pytest.approx(want, abs=1e-4)  # the model tells these slices apart: the check below can fail
    before = len(study_instances(archive, study))
    client = openai.OpenAI(base_url=server.url + "/v1/gmaivl/archive", api_key=API_KEY, max_retries=0,
                           timeout=300)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=TOKENS, temperature=0, logprobs=True, top_logprobs=1,
                                           extra_body={"dicomweb": {"study": study}, "write_sr": True})
    assert reply.choices[0].message.content == expected
    assert logprob_values(reply.choices[0].logprobs.content) == pytest.approx(want, abs=1e-4)
    report = reply.model_extra["report"]
    assert report["stored"] is True
    instances = study_instances(archive, study)
    assert len(instances) == before + 1
    stored = [i for i in instances if i["MainDicomTags"]["SOPInstanceUID"] == report["sop_instance_uid"]]
    assert len(stored) == 1
    sr = pydicom.dcmread(io.BytesIO(archive.rest_bytes(f"/instances/{stored[0]['ID']}/file")))
    assert sr.SOPClassUID == COMPREHENSIVE_SR and sr.StudyInstanceUID == study
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.ContributingEquipmentSequence[0].ManufacturerModelName == "tiny"
    texts = {item.ConceptNameCodeSequence[0].CodeValue: item.get("TextValue") for item in sr.ContentSequence}
    assert texts["121062"] == QUESTION and texts["121071"] == dicom_text(expected)
    evidence = {ref.ReferencedSOPInstanceUID for item in sr.CurrentRequestedProcedureEvidenceSequence
                for series in item.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert evidence == {str(ds.SOPInstanceUID) for ds in volume}
    seen = server.log.text
    assert ASK in seen  # the recorder did capture the access log
    for value in (study, str(volume[0].SeriesInstanceUID), *patient_values(volume[0])):
        assert value not in seen


def test_browse_shows_only_what_is_needed_to_choose(server, archive):
    """GET studies / POST series: each stored study with its date, modality codes and counts as pydicom reads the
    stored files; the series with its modality, number and instance count; no patient or free-text value anywhere
    in the answers, and no UID in the log (UIDs travel in bodies). Mutants seen failing: `browse_studies` passing
    QIDO's items through (fields beyond the five appear); the date passed as given ("20040119", not "2004-01-19");
    `browse_series` without the instance count."""
    volume, mr = archive.volume, archive.mr
    answer = httpx.get(server.url + "/v1/gmaivl/archive/studies", params={"limit": 100},
                       headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert answer.status_code == 200, answer.text
    studies = {s["study"]: s for s in answer.json()["data"]}
    for ds, count in ((volume[0], len(volume)), (mr, 1)):
        entry = studies[str(ds.StudyInstanceUID)]
        date = str(ds.StudyDate)
        assert entry["date"] == f"{date[:4]}-{date[4:6]}-{date[6:]}"
        # an SR may have been stored by another test: the study's series as Orthanc's REST API lists them
        found = [s for s in archive.rest("/studies?expand") if s["MainDicomTags"]["StudyInstanceUID"] == entry["study"]]
        series = archive.rest(f"/studies/{found[0]['ID']}/series")
        assert str(ds.Modality) in entry["modalities"]
        assert entry["modalities"] == sorted({s["MainDicomTags"]["Modality"] for s in series})
        assert entry["series"] == len(series) and entry["instances"] == len(study_instances(archive, entry["study"]))
        assert entry["instances"] >= count
        assert set(entry) == {"study", "date", "modalities", "series", "instances"}
    series = post(server, "/v1/gmaivl/archive/series", {"study": str(mr.StudyInstanceUID)})
    assert series.status_code == 200, series.text
    assert series.json()["data"] == [{"series": str(mr.SeriesInstanceUID), "modality": "MR",
                                      "number": int(mr.SeriesNumber), "instances": 1}]
    for value in (*patient_values(volume[0]), *patient_values(mr)):
        assert value not in answer.text + series.text
    assert str(mr.StudyInstanceUID) not in server.log.text


def test_bad_requests_are_400s_naming_the_field_and_write_nothing(server, archive):
    """A malformed UID, an unknown study, an instance without its series, an image_url part, an unknown field, a
    bad generation option with write_sr (nothing stored), a wrong key: each one 4xx JSON naming the field, never a 500, no UID in
    the message or the log. Mutants seen failing: the UID type without its check (refused later, by DicomWebRef,
    naming dicomweb only); `_refused` naming no param."""
    study = str(archive.volume[0].StudyInstanceUID)
    missing = "1.2.3.4.5.6.7.8.9"
    base = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": TOKENS}
    cases = [
        ({**base, "dicomweb": {"study": "1.2.abc"}}, 400, "dicomweb.study"),
        ({**base, "dicomweb": {"study": missing}}, 400, "dicomweb"),
        ({**base, "dicomweb": {"study": study, "instance": study}}, 400, "dicomweb"),
        ({**base, "dicomweb": {"study": study, "serie": study}}, 400, "dicomweb.serie"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "text", "text": QUESTION}]}], "dicomweb": {"study": study}}, 400, "messages"),
    ]
    for body, status, param in cases:
        reply = post(server, ASK, body)
        assert reply.status_code == status, (param, reply.text)
        error = reply.json()["error"]
        assert error["param"] == param, error
        assert missing not in error["message"] and study not in error["message"]
    assert "study not found" in post(server, ASK, cases[1][0]).json()["error"]["message"]
    before = len(study_instances(archive, study))
    reply = post(server, ASK, {**base, "top_p": 5, "dicomweb": {"study": study}, "write_sr": True})
    assert reply.status_code == 400 and "top_p" in reply.json()["error"]["message"]
    assert len(study_instances(archive, study)) == before
    assert post(server, ASK, {**base, "dicomweb": {"study": study}}, key=None).status_code == 401
    assert post(server, "/v1/gmaivl/archive/series", {"study": missing}).json()["error"]["param"] == "study"
    assert "archive request refused (400)" in server.log.text  # our own records are captured
    assert study not in server.log.text and missing not in server.log.text


def test_decode_budget_refuses_before_download(serving_engine, serve, archive):
    """The server's decode budget, from QIDO metadata before any pixel data is downloaded: the 5-slice volume
    (81920 voxels) over a 20000 per-request limit is a 413 with the budget's message; the 64x64 MR study while all
    but 1000 of the server's 100000 are reserved is a 429 with Retry-After; once released it is answered. Mutant
    seen failing: fetch_study without the `admit` call (no 413)."""
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2}
    app = create_app(serving_engine, dicomweb=archive.dicomweb,
                     decode_budget=DecodeBudget(max_request_pixels=20_000, max_server_pixels=100_000))
    with serve(app) as running:
        reply = post(running, ASK, {**body, "dicomweb": {"study": str(archive.volume[0].StudyInstanceUID)}}, key=None)
        assert reply.status_code == 413, reply.text
        assert "81920" in reply.json()["error"]["message"] and "--max-request-pixels" in reply.text
        mr = {**body, "dicomweb": {"study": str(archive.mr.StudyInstanceUID)}}
        held = app.state.decoding.pixels.try_reserve(99_000)
        try:
            busy = post(running, ASK, mr, key=None)
        finally:
            held.release()
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1", busy.text
        assert post(running, ASK, mr, key=None).status_code == 200


def test_page_browses_the_archive_and_asks(server, archive, browser):
    """Headless Chromium: after the key, the page lists the archive's studies (date, modalities); choosing the MR
    study and its series and asking with "write back" shows the answer the API gives for the same picture
    uploaded and the stored report's UID, which Orthanc then lists in the study; the answer comes streamed, and
    the chosen series' picture is shown as the archive preview route renders it (the same PNG). Mutants seen
    failing: `ask()` not sending to the archive route when a series is chosen (the upload route refuses: no
    picture); `write_sr` left out of the page's request (no report line, no SR); `previewArchive` not called on
    Choose (no picture); the page's stream reader ignoring the report chunk (no report line)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    mr = archive.mr
    study = str(mr.StudyInstanceUID)
    expected = uploaded_answer(server, mr)
    before = len(study_instances(archive, study))
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 120)
    key = browser.find_element(By.ID, "api-key")
    wait.until(lambda d: key.is_displayed())
    key.send_keys(API_KEY + Keys.TAB)
    wait.until(lambda d: d.find_element(By.ID, "archive").is_displayed())
    row = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f'#studies tr[data-study="{study}"]'))
    date = str(mr.StudyDate)
    assert f"{date[:4]}-{date[4:6]}-{date[6:]}" in row.text and "MR" in row.text
    row.find_element(By.TAG_NAME, "button").click()
    series = wait.until(lambda d: d.find_element(By.CSS_SELECTOR,
                                                 f'#series tr[data-series="{mr.SeriesInstanceUID}"]'))
    series.find_element(By.TAG_NAME, "button").click()
    wait.until(lambda d: d.find_element(By.ID, "ask").is_enabled())
    shown = post(server, PREVIEW, {"dicomweb": {"study": study, "series": str(mr.SeriesInstanceUID)}}).json()["image"]
    wait.until(lambda d: d.find_element(By.ID, "preview").get_attribute("src") == shown)
    assert browser.find_element(By.ID, "preview").is_displayed()
    ask_on_page(browser, wait, QUESTION, TOKENS, "write-sr")
    status = browser.find_element(By.ID, "status").text
    assert browser.find_element(By.ID, "answer").get_attribute("data-done") == "true", status
    assert browser.find_element(By.ID, "answer").get_attribute("textContent") == expected
    instances = study_instances(archive, study)
    assert len(instances) == before + 1
    new = {i["MainDicomTags"]["SOPInstanceUID"] for i in instances} - {str(mr.SOPInstanceUID)}
    assert any(uid in browser.find_element(By.ID, "report").text for uid in new)
    for value in patient_values(mr):
        assert value not in browser.find_element(By.TAG_NAME, "body").text


def test_the_archive_image_goes_with_the_last_user_turn(server, archive):
    """A follow-up conversation: the archive image is placed in the last user turn, where the question is, as an
    upload placed there answers (logprobs equal). Mutant seen failing: `_with_image_slot` returning the parts as
    they are (the boundary then puts the image in the first user turn: logprobs differ)."""
    mr = archive.mr
    buffer = io.BytesIO()
    mr.save_as(buffer)
    url = "data:application/dicom;base64," + base64.b64encode(buffer.getvalue()).decode()
    earlier = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "An axial slice."}]
    fields = {"max_tokens": TOKENS, "temperature": 0, "logprobs": True, "top_logprobs": 1}
    upload = post(server, "/v1/chat/completions", {**fields, "messages": [*earlier, {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}]})
    assert upload.status_code == 200, upload.text
    reply = post(server, ASK, {**fields, "messages": [*earlier, {"role": "user", "content": QUESTION}],
                               "dicomweb": {"study": str(mr.StudyInstanceUID)}})
    assert reply.status_code == 200, reply.text
    want, got = (r.json()["choices"][0] for r in (upload, reply))
    assert got["message"]["content"] == want["message"]["content"]
    assert logprob_values(got["logprobs"]["content"]) == pytest.approx(logprob_values(want["logprobs"]["content"]),
                                                                       abs=1e-4)


def test_write_sr_about_a_model_without_weight_files_is_a_400(serving_folder, serve, archive, tmp_path):
    """A served model whose folder lost its weight files: `write_sr` is a 400 naming write_sr and saying why (the
    report must carry the weights' SHA-256), before the archive is read or a token generated; nothing is stored;
    the same ask without write_sr is answered. Mutant seen failing: the route checking the model's identity only
    when writing (ModelError escapes: a 500)."""
    import shutil

    from gmaivl_rt import Engine

    copy = tmp_path / "weightless"
    shutil.copytree(serving_folder, copy)
    mr = archive.mr
    study = str(mr.StudyInstanceUID)
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2, "dicomweb": {"study": study}}
    with Engine(copy, backend="torch", max_batch_size=1) as engine:
        for weights in copy.glob("*.safetensors"):
            weights.unlink()
        with serve(create_app(engine, dicomweb=archive.dicomweb)) as running:
            before = len(study_instances(archive, study))
            reply = post(running, ASK, {**body, "write_sr": True}, key=None)
            assert reply.status_code == 400, reply.text
            error = reply.json()["error"]
            assert error["param"] == "write_sr" and "no weight files" in error["message"]
            assert str(copy) not in error["message"] and study not in error["message"]
            assert len(study_instances(archive, study)) == before
            assert post(running, ASK, body, key=None).status_code == 200
            assert "Traceback" not in running.log.text


def test_the_archive_answer_streams_as_chat_completions_do(server, archive):
    """`stream: true` with the openai client: the deltas make up the answer the same picture uploaded gets (and
    the logprobs with it), a usage chunk comes when asked for, and with write_sr a last chunk carries the stored
    report, which Orthanc returns with the streamed answer as its text; raw, the events end with `[DONE]` after
    the report chunk. Mutants seen failing: the report chunk left out of the stream (`_with_report` passing
    events through); the stream branch removed (a whole chat.completion: the client finds no chunks)."""
    mr = archive.mr
    study = str(mr.StudyInstanceUID)
    upload = uploaded_reply(server, mr)
    before = len(study_instances(archive, study))
    client = openai.OpenAI(base_url=server.url + "/v1/gmaivl/archive", api_key=API_KEY, max_retries=0, timeout=300)
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=TOKENS, temperature=0,
        logprobs=True, top_logprobs=1, stream=True, stream_options={"include_usage": True},
        extra_body={"dicomweb": {"study": study}, "write_sr": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == upload["message"]["content"] and len([c for c in chunks if c.choices]) > 2
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert logprob_values(streamed) == pytest.approx(logprob_values(upload["logprobs"]["content"]), abs=1e-4)
    assert any(c.usage is not None and c.usage.completion_tokens > 0 for c in chunks)
    reports = [c.model_extra["report"] for c in chunks if (c.model_extra or {}).get("report")]
    assert len(reports) == 1 and reports[0]["stored"] is True
    instances = study_instances(archive, study)
    assert len(instances) == before + 1
    stored = [i for i in instances if i["MainDicomTags"]["SOPInstanceUID"] == reports[0]["sop_instance_uid"]]
    sr = pydicom.dcmread(io.BytesIO(archive.rest_bytes(f"/instances/{stored[0]['ID']}/file")))
    texts = {item.ConceptNameCodeSequence[0].CodeValue: item.get("TextValue") for item in sr.ContentSequence}
    assert texts["121071"] == dicom_text(text)
    raw = httpx.post(server.url + ASK, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300, json={
        "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2, "stream": True,
        "dicomweb": {"study": study}, "write_sr": True})
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and '"report":' in events[-2]
    for value in patient_values(mr):
        assert value not in raw.text


def test_archive_preview_is_the_picture_an_upload_preview_shows(server, archive):
    """POST /v1/gmaivl/archive/preview: for the MR instance, the same PNG and metadata /v1/gmaivl/preview gives
    for the file uploaded; for the volume study (the study-only rule: the middle axial slice), the same PNG as
    that slice uploaded; no patient or header value in either answer; a study without the instance is a 400
    naming dicomweb. Mutant seen failing: the preview rendering the series' first instance instead of the read
    picture (the volume's PNG differs)."""
    def uploaded_preview(ds):
        buffer = io.BytesIO()
        ds.save_as(buffer)
        url = "data:application/dicom;base64," + base64.b64encode(buffer.getvalue()).decode()
        reply = post(server, "/v1/gmaivl/preview", {"image_url": {"url": url}})
        assert reply.status_code == 200, reply.text
        return reply.json()

    mr, volume = archive.mr, archive.volume
    reply = post(server, PREVIEW, {"dicomweb": {"study": str(mr.StudyInstanceUID)}})
    assert reply.status_code == 200, reply.text
    assert reply.json() == uploaded_preview(mr)
    stacked = post(server, PREVIEW, {"dicomweb": {"study": str(volume[0].StudyInstanceUID)}})
    assert stacked.status_code == 200, stacked.text
    assert stacked.json()["image"] == uploaded_preview(volume[2])["image"]
    assert stacked.json()["image"] != uploaded_preview(volume[0])["image"]  # the slices do differ
    for value in (*patient_values(mr), *patient_values(volume[0])):
        assert value not in reply.text + stacked.text
    missing = post(server, PREVIEW, {"dicomweb": {"study": "1.2.3.4.5.6.7.8.9"}})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "dicomweb"


def test_large_archive_bodies_are_parsed_off_the_event_loop(server, archive, monkeypatch):
    """The POST archive routes (ask, preview, series) read their bodies as /v1/chat/completions does
    (`server.body.parsed_body`): each request sent plain and padded with spaces past OFF_LOOP_BYTES gets the same
    answer (the answer's text and usage, the preview, the series; a bad UID the same 400 naming dicomweb.study), the
    plain body parsed on the event loop, the padded one in a worker thread (no running loop there). Mutant (seen
    failing): the routes taking their bodies as FastAPI parameters, as before (parsed on the loop, `parse_body`
    never called)."""
    import asyncio
    import json

    from gmaivl_rt.server import body as body_module

    parsed = []
    parse = body_module.parse_body

    def recording(raw, content_type, model):
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        parsed.append((model.__name__, len(raw) >= body_module.OFF_LOOP_BYTES, on_loop))
        return parse(raw, content_type, model)

    monkeypatch.setattr(body_module, "parse_body", recording)
    mr = str(archive.mr.StudyInstanceUID)
    ask = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": TOKENS, "temperature": 0}
    cases = [(ASK, {**ask, "dicomweb": {"study": mr}}), (ASK, {**ask, "dicomweb": {"study": "1.2.abc"}}),
             (PREVIEW, {"dicomweb": {"study": mr}}), ("/v1/gmaivl/archive/series", {"study": mr})]
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}

    def essence(reply):
        body = reply.json()
        if "choices" in body:  # a fresh id and time per answer
            return reply.status_code, body["choices"][0]["message"]["content"], body["usage"]
        return reply.status_code, body

    for path, body in cases:
        raw = json.dumps(body).encode()
        plain, padded = (essence(httpx.post(server.url + path, content=content, headers=headers, timeout=300))
                         for content in (raw, raw + b" " * body_module.OFF_LOOP_BYTES))
        assert padded == plain, path
    assert essence(httpx.post(server.url + ASK, json=cases[1][1], headers=headers, timeout=60))[1]["error"][
        "param"] == "dicomweb.study"
    models = ["ArchiveChatRequest", "ArchiveChatRequest", "ArchivePreviewRequest", "SeriesRequest"]
    assert parsed[:8] == [call for name in models for call in ((name, False, True), (name, True, False))]
