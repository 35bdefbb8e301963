"""`gmaivl-rt serve MODEL --dicomweb URL` as a real process (the command a deployment runs, its own uvicorn) against
a real archive: Orthanc + DICOMweb with basic authentication, the credentials reaching the server only through the
environment (`GMAIVL_DICOMWEB_USER`, `GMAIVL_DICOMWEB_PASSWORD_FILE`). The official openai client asks about a study
under the findings schema with `write_sr`; the Structured Report that Orthanc then returns is read with pydicom:
question, answer text, evidence, and coded findings equal to the JSON answer. Bounded: the server gets a deadline to
answer /health, is stopped at the end (SIGTERM, then SIGKILL), and dies with the test process."""
from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path

import pydicom
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("dicomweb_client", reason="the [hospital] extra (dicomweb-client) is not installed")
pytest.importorskip("highdicom", reason="the [hospital] extra (highdicom) is not installed")

from orthanc import ct_volume, free_port, orthanc_archive, read_shipped  # noqa: E402
from server_fixtures import wait_until_serving  # noqa: E402
from sr_findings import codable, findings_from_report  # noqa: E402

USER, PASSWORD = "radiology", "pa55-w0rd-archive"
API_KEY = "serve-archive-key"
START_SECONDS = 180
FINDINGS_SCHEMA = Path(__file__).parents[2] / "examples" / "findings.schema.json"
TEXTS = ["<image>\nWhat modality is this image?", "This is a CT scan of the abdomen.", "Report the finding.",
         '{"modality":"CT","plane":"axial","body_part":"abdomen","lesion":{"present":false,"side":"none",'
         '"size_mm":0}}'] * 20


def _die_with_parent() -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass



def study_instances(archive, study: str) -> list[dict]:
    found = [s for s in archive.rest("/studies?expand") if s["MainDicomTags"]["StudyInstanceUID"] == study]
    return archive.rest(f"/studies/{found[0]['ID']}/instances") if found else []


def test_serve_process_asks_the_archive_and_stores_a_coded_report(tiny_model_folder, start_child, tmp_path):
    """The served process, asked through the archive route by the openai client under the findings schema with
    write_sr: the reply's JSON is valid, the study gains one Comprehensive SR (Orthanc's REST API), pydicom reads
    it: the question, the answer text, the five slices as evidence, the served model's name, and CODE items equal
    to the JSON answer; without credentials in the environment the same request is a 400 naming dicomweb with
    HTTP 401 and nothing is stored; the server's stderr holds no UID, patient value or password. Mutants seen
    failing: the archive route not passing `findings` to `file_report` (no CODE items); `serve` ignoring
    --dicomweb (404 on the route)."""
    import jsonschema
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    folder = tiny_model_folder(TEXTS, "serve_dicomweb_process")
    schema = json.loads(FINDINGS_SCHEMA.read_text())
    password_file = tmp_path / "archive-password"
    password_file.write_text(PASSWORD + "\n")
    key_file = tmp_path / "api-key"
    key_file.write_text(API_KEY + "\n")
    with orthanc_archive(tmp_path / "orthanc", users={USER: PASSWORD}) as archive:
        volume, mr = ct_volume(5), read_shipped("MR_small.dcm")
        stored = DICOMwebClient(archive.dicomweb, session=create_session_from_user_pass(USER, PASSWORD)) \
            .store_instances([*volume, mr])
        assert not stored.get("FailedSOPSequence")
        study = str(volume[0].StudyInstanceUID)
        before = {i["MainDicomTags"]["SOPInstanceUID"] for i in study_instances(archive, study)}
        environ = {k: v for k, v in os.environ.items() if not k.startswith("GMAIVL_DICOMWEB_")}
        servers = []
        for credentials in (True, False):
            port = free_port()
            env = {**environ, "GMAIVL_DICOMWEB_USER": USER, "GMAIVL_DICOMWEB_PASSWORD_FILE": str(password_file)} \
                if credentials else environ
            child = start_child(["serve", folder, "--host", "127.0.0.1", "--port", port, "--served-model-name",
                                 "tiny", "--api-key-file", key_file, "--max-batch-size", 2,
                                 "--dicomweb", archive.dicomweb], env=env, preexec_fn=_die_with_parent)
            servers.append((child, f"http://127.0.0.1:{port}"))
        for child, url in servers:
            wait_until_serving(child, url, START_SECONDS)
        (child, url), (bare, bare_url) = servers
        client = openai.OpenAI(base_url=url + "/v1/gmaivl/archive", api_key=API_KEY, max_retries=0, timeout=600)
        question = "Report the finding."
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": question}], max_tokens=200, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "finding", "schema": schema}},
            extra_body={"dicomweb": {"study": study}, "write_sr": True})
        text = reply.choices[0].message.content
        answer = json.loads(text)
        jsonschema.validate(answer, schema)
        report = reply.model_extra["report"]
        assert report["stored"] is True
        new = [i for i in study_instances(archive, study) if i["MainDicomTags"]["SOPInstanceUID"] not in before]
        assert [i["MainDicomTags"]["SOPInstanceUID"] for i in new] == [report["sop_instance_uid"]]
        sr = pydicom.dcmread(io.BytesIO(archive.rest_bytes(f"/instances/{new[0]['ID']}/file")))
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33" and sr.StudyInstanceUID == study
        texts = {i.ConceptNameCodeSequence[0].CodeValue: i.TextValue for i in sr.ContentSequence
                 if i.ValueType == "TEXT"}
        assert texts["121062"] == question and texts["121071"] == text
        evidence = {r.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                    for series in s.ReferencedSeriesSequence for r in series.ReferencedSOPSequence}
        assert evidence == {str(ds.SOPInstanceUID) for ds in volume}
        assert next(e for e in sr.ContributingEquipmentSequence if e.Manufacturer == "gmaivl-rt") \
            .ManufacturerModelName == "tiny"
        coded = findings_from_report(sr)
        assert coded == codable(answer) and "lesion" in coded

        refused = httpx.post(bare_url + "/v1/gmaivl/archive/chat/completions", timeout=120,
                             headers={"Authorization": f"Bearer {API_KEY}"},
                             json={"messages": [{"role": "user", "content": question}], "max_tokens": 4,
                                   "dicomweb": {"study": study}, "write_sr": True})
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == "dicomweb" and "HTTP 401" in error["message"]
        assert len(study_instances(archive, study)) == len(before) + 1  # nothing more stored

        for running, _ in servers:
            running.process.send_signal(signal.SIGTERM)
        for running, _ in servers:
            assert running.process.wait(timeout=60) is not None
            log = Path(running.stderr_file).read_text()
            for value in (study, str(volume[0].SeriesInstanceUID), PASSWORD, str(mr.PatientName),
                          str(volume[0].PatientID)):
                assert value not in log, value
