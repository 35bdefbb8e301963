"""A study in a real archive (Orthanc + DICOMweb, started here) -> `gmaivl-rt ask --dicomweb ... --write-sr` -> the
answer, and a Structured Report back in the study, verified by a second tool: Orthanc's REST API and pydicom /
highdicom reading what Orthanc returns. The answer must be the one `ask` gives for the same file from disk."""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct

import pydicom
import pytest

pytest.importorskip("dicomweb_client", reason="the [hospital] extra (dicomweb-client) is not installed")
pytest.importorskip("highdicom", reason="the [hospital] extra (highdicom) is not installed")

from dicom_files import DICOM_DIR  # noqa: E402
from orthanc import stocked_archive  # noqa: E402

import gmaivl_rt  # noqa: E402
from gmaivl_rt import DicomWebRef  # noqa: E402
from gmaivl_rt.medical.structured_report import dicom_text  # noqa: E402

TEXTS = ["<image>\nWhat modality is this image?", "This is a CT scan of the abdomen.", "Which plane is shown?",
         "An axial slice.", "A magnetic resonance image of the head."] * 20
QUESTION = "What modality is this image?"
PATIENT_VALUES = ("CompressedSamples", "1CT1", "1MR1")


@pytest.fixture(scope="module")
def folder(tiny_model_folder):
    return tiny_model_folder(TEXTS, "ask_dicomweb")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    with stocked_archive(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


def study_instances(archive, study: str) -> list[dict]:
    """Orthanc's own view (REST API, not DICOMweb): the study's instances with their main tags."""
    studies = [s for s in archive.rest("/studies?expand") if s["MainDicomTags"]["StudyInstanceUID"] == study]
    assert len(studies) == 1
    return archive.rest(f"/studies/{studies[0]['ID']}/instances")


def safetensors_sha256(path) -> str:
    """The SHA-256 of a safetensors file's tensor bytes, computed here from the file (header length, then data)."""
    data = open(path, "rb").read()
    header_len = struct.unpack("<Q", data[:8])[0]
    assert json.loads(data[8:8 + header_len])["__metadata__"]["gmaivl_sha256"]
    return hashlib.sha256(data[8 + header_len:]).hexdigest()


def test_ask_a_study_and_store_the_report_in_it(folder, archive, cli):
    """One command: the volume study's middle slice answered as the file of that slice answers, an SR stored in
    the study; Orthanc's REST API lists it in the same study; pydicom reads the stored file: Comprehensive SR, the
    question and answer, references to all five slices, UNVERIFIED, the model's name and the weights' SHA-256
    (computed here from model.safetensors) in Contributing Equipment; no patient value on stdout or stderr.
    Mutants seen failing: `ask_archive` asking about the first slice instead of `fetched.read()` (answer differs),
    `store` not called (no SR in Orthanc), the weights digest taken over the whole file (SHA differs)."""
    volume = archive.volume
    study = str(volume[0].StudyInstanceUID)
    middle = os.path.join(archive.folder, "middle.dcm")
    volume[2].save_as(middle)
    expected = gmaivl_rt.load(folder).ask(QUESTION, middle, max_new_tokens=8)
    before = len(study_instances(archive, study))
    run = cli(["ask", folder, "--question", QUESTION, "--dicomweb", archive.dicomweb, "--study", study,
               "--max-new-tokens", 8, "--write-sr"])
    assert run.stdout.strip() == expected
    for value in (*PATIENT_VALUES, study, str(volume[0].SeriesInstanceUID)):
        assert value not in run.stdout + run.stderr
    instances = study_instances(archive, study)
    assert len(instances) == before + 1
    reports = [i for i in instances if i["MainDicomTags"]["SOPInstanceUID"] not in
               {str(d.SOPInstanceUID) for d in volume}]
    stored = pydicom.dcmread(io.BytesIO(archive.rest_bytes(f"/instances/{reports[0]['ID']}/file")))
    assert stored.SOPInstanceUID in run.stderr  # the one UID printed is the report's own, new one
    assert stored.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33" and stored.VerificationFlag == "UNVERIFIED"
    assert stored.StudyInstanceUID == study and stored.PatientName == volume[0].PatientName
    texts = {item.ConceptNameCodeSequence[0].CodeValue: item.TextValue for item in stored.ContentSequence
             if item.ValueType == "TEXT"}
    assert texts["121062"] == QUESTION and texts["121071"] == dicom_text(expected)
    assert texts["111001"] == os.path.basename(folder)
    evidence = {r.ReferencedSOPInstanceUID for s in stored.CurrentRequestedProcedureEvidenceSequence
                for series in s.ReferencedSeriesSequence for r in series.ReferencedSOPSequence}
    assert evidence == {str(d.SOPInstanceUID) for d in volume}
    equipment = next(e for e in stored.ContributingEquipmentSequence if e.Manufacturer == "gmaivl-rt")
    digest = safetensors_sha256(os.path.join(folder, "model.safetensors"))
    assert equipment.ManufacturerModelName == os.path.basename(folder)
    assert equipment.SoftwareVersions[-1] == digest and equipment.SoftwareVersions[1] == f"sha256:{digest[:16]}"
    assert "not for diagnostic use" in stored.SeriesDescription


def test_sr_out_writes_a_file_and_nothing_to_the_archive(folder, archive, cli, tmp_path):
    """--sr-out FILE: the report in the file (highdicom reads it back with the answer), the archive unchanged; a
    request that fails after the image was fetched (a frame the instance does not have) writes nothing anywhere.
    Mutant seen failing: `ask_archive` storing whenever a report is made (archive grows)."""
    import highdicom as hd

    mr = archive.mr
    study = str(mr.StudyInstanceUID)
    before = len(study_instances(archive, study))
    out = tmp_path / "report.dcm"
    run = cli(["ask", folder, "--question", QUESTION, "--dicomweb", archive.dicomweb, "--study", study,
               "--series", mr.SeriesInstanceUID, "--instance", mr.SOPInstanceUID, "--max-new-tokens", 6,
               "--sr-out", out])
    expected = gmaivl_rt.load(folder).ask(QUESTION, os.path.join(DICOM_DIR, "MR_small.dcm"), max_new_tokens=6)
    assert run.stdout.strip() == expected
    report = hd.sr.srread(out)
    assert dicom_text(expected) in [item.value for item in report.content[0].ContentSequence if hasattr(item, "value")]
    assert len(study_instances(archive, study)) == before
    failed_out = tmp_path / "failed.dcm"
    failed = cli(["ask", folder, "--question", QUESTION, "--dicomweb", archive.dicomweb, "--study", study,
                  "--frame", 3, "--sr-out", failed_out, "--write-sr"], expect=None)
    assert failed.returncode == 2 and "not allowed with argument" in failed.stderr  # one or the other
    failed = cli(["ask", folder, "--question", QUESTION, "--dicomweb", archive.dicomweb, "--study", study,
                  "--frame", 3, "--write-sr"], expect=None)
    assert failed.returncode == 2 and "index 3 out of range" in failed.stderr
    assert not failed_out.exists() and len(study_instances(archive, study)) == before
    for value in (*PATIENT_VALUES, study):
        assert value not in failed.stderr


def test_the_python_api_reads_a_dicomweb_ref_like_a_file(folder, archive):
    """`load(...).ask(question, DicomWebRef(...))` answers as `ask` on the same file, and `ask_archive` returns the
    answer and its report. Mutant seen failing: request.py's `_read_image` passing a DicomWebRef to
    to_medical_image (InputError: unsupported image type)."""
    from gmaivl_rt.runtime.hospital import ask_archive

    vlm = gmaivl_rt.load(folder)
    mr = archive.mr
    ref = DicomWebRef(archive.dicomweb, str(mr.StudyInstanceUID), str(mr.SeriesInstanceUID), str(mr.SOPInstanceUID))
    expected = vlm.ask(QUESTION, os.path.join(DICOM_DIR, "MR_small.dcm"), max_new_tokens=6)
    assert vlm.ask(QUESTION, ref, max_new_tokens=6) == expected
    result = ask_archive(vlm, QUESTION, ref, sr_out=None, write_sr=False, max_new_tokens=6)
    assert result.answer == expected and result.report is None and not result.stored


def test_half_given_archive_options_fail_before_loading(cli, tmp_path):
    """--study without --dicomweb, --dicomweb without --study, --image with --dicomweb: one line, exit 2, before
    the model folder is even looked at (it does not exist here)."""
    missing = tmp_path / "no_model"
    for args, message in ((["--study", "1.2.3"], "--study needs --dicomweb"),
                          (["--dicomweb", "http://127.0.0.1:9/dicom-web"], "--dicomweb needs --study"),
                          (["--dicomweb", "http://127.0.0.1:9/dicom-web", "--study", "1.2", "--image", "x.dcm"],
                           "--image or --dicomweb, not both")):
        run = cli(["ask", missing, "--question", QUESTION, *args], expect=2)
        assert message in run.stderr and "no_model" not in run.stderr


def test_a_structured_answer_goes_into_the_report_as_codes(folder, archive, cli):
    """`ask --json-schema examples/findings.schema.json --write-sr` about the MR study: the SR Orthanc returns holds
    CODE items (read back with pydicom, decoded with pydicom's own code dictionary) equal to the JSON answer printed
    on stdout, besides the answer text. Mutant seen failing: `ask_archive` not passing the findings to
    `file_report` (no CODE items)."""
    from sr_findings import codable, findings_from_report

    mr = archive.mr
    study = str(mr.StudyInstanceUID)
    schema = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "findings.schema.json")
    before = {i["MainDicomTags"]["SOPInstanceUID"] for i in study_instances(archive, study)}
    run = cli(["ask", folder, "--question", "Report the finding.", "--dicomweb", archive.dicomweb, "--study", study,
               "--max-new-tokens", 200, "--json-schema", schema, "--write-sr"])
    answer = json.loads(run.stdout)
    new = [i for i in study_instances(archive, study) if i["MainDicomTags"]["SOPInstanceUID"] not in before]
    assert len(new) == 1
    stored = pydicom.dcmread(io.BytesIO(archive.rest_bytes(f"/instances/{new[0]['ID']}/file")))
    coded = findings_from_report(stored)
    assert coded == codable(answer) and "lesion" in coded
    texts = {item.ConceptNameCodeSequence[0].CodeValue: item.TextValue for item in stored.ContentSequence
             if item.ValueType == "TEXT"}
    assert texts["121071"] == run.stdout.strip()


def test_a_report_about_a_model_without_weight_files_fails_first(folder, archive, monkeypatch, tmp_path):
    """A loaded model whose folder no longer holds weight files (the report must name the weights' SHA-256):
    `ask_archive(..., write_sr=True)` is a ModelError saying so, raised before the archive is even asked, and the
    study is unchanged; without a report the same ask answers. Mutants seen failing: `weights_sha256` raising a
    plain ValueError (not a ModelError); the digest taken after fetching (the archive is asked first)."""
    import shutil

    from gmaivl_rt import ModelError
    from gmaivl_rt.medical import dicomweb
    from gmaivl_rt.runtime import hospital

    copy = tmp_path / "weightless"
    shutil.copytree(folder, copy)
    vlm = gmaivl_rt.load(copy)
    for weights in copy.glob("*.safetensors"):
        weights.unlink()
    mr = archive.mr
    study = str(mr.StudyInstanceUID)
    ref = DicomWebRef(archive.dicomweb, study, str(mr.SeriesInstanceUID), str(mr.SOPInstanceUID))
    before = len(study_instances(archive, study))
    fetch = dicomweb.fetch_study

    def not_yet(*args, **kwargs):
        raise AssertionError("the archive was asked before the model's identity was checked")

    monkeypatch.setattr(dicomweb, "fetch_study", not_yet)
    with pytest.raises(ModelError, match="no weight files to name in a structured report") as error:
        hospital.ask_archive(vlm, QUESTION, ref, write_sr=True, max_new_tokens=4)
    assert study not in str(error.value) and str(copy) not in str(error.value)
    assert len(study_instances(archive, study)) == before
    monkeypatch.setattr(dicomweb, "fetch_study", fetch)
    assert hospital.ask_archive(vlm, QUESTION, ref, max_new_tokens=4).answer


def test_no_bad_input_writes_anything(folder, archive, tmp_path):
    """Each bad input of issue 28 through `ask_archive(..., write_sr=True, sr_out=FILE)`: an unknown study, a
    study without images, an instance whose transfer syntax nothing decodes, an unreachable archive, a redirect to
    another host, a series over the voxel limit (refused from QIDO metadata), a 404 from the archive: one clear
    error each that quotes no UID, URL or patient value, no report file, and Orthanc holds exactly the instances
    it held before. Mutant seen failing: `ask_archive` filing the report right after the fetch, before the image
    is read (the MPEG-2 case left a report file behind)."""
    import http.server
    import threading

    from dicomweb_client.api import DICOMwebClient
    from orthanc import free_port, mpeg2_instance, read_shipped, redirecting_server, with_uids
    from pydicom.uid import generate_uid

    from gmaivl_rt import InputError, LimitError, Limits
    from gmaivl_rt.runtime.hospital import ask_archive

    mpeg = mpeg2_instance()
    report_only = with_uids(read_shipped("test-SR.dcm"), study=generate_uid(), series=generate_uid())
    assert not DICOMwebClient(archive.dicomweb).store_instances([mpeg, report_only]).get("FailedSOPSequence")
    held = set(archive.rest("/instances"))  # Orthanc's own ids of every instance it holds
    vlm = gmaivl_rt.load(folder)
    tight = gmaivl_rt.load(folder, limits=Limits(max_volume_voxels=5 * 128 * 128 - 1))

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    missing_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=missing_server.serve_forever, daemon=True).start()
    volume = archive.volume
    try:
        with redirecting_server(archive.dicomweb + "/studies") as redirect:
            cases = [
                (vlm, DicomWebRef(archive.dicomweb, generate_uid()), "study not found"),
                (vlm, DicomWebRef(archive.dicomweb, str(report_only.StudyInstanceUID)), "has no image instances"),
                (vlm, DicomWebRef(archive.dicomweb, str(mpeg.StudyInstanceUID)), "MPEG2 .* has no pixel data decoder"),
                (vlm, DicomWebRef(f"http://127.0.0.1:{free_port()}/dicom-web", generate_uid()), "cannot connect"),
                (vlm, DicomWebRef(redirect, generate_uid()), "redirected to another host"),
                (tight, DicomWebRef(archive.dicomweb, str(volume[0].StudyInstanceUID)), "voxels is over the limit"),
                (vlm, DicomWebRef(f"http://127.0.0.1:{missing_server.server_address[1]}/dicom-web", generate_uid()),
                 r"HTTP 404 \(not found\)"),
            ]
            for k, (runtime, ref, pattern) in enumerate(cases):
                out = tmp_path / f"report-{k}.dcm"
                with pytest.raises(InputError, match=pattern) as error:
                    ask_archive(runtime, QUESTION, ref, write_sr=True, sr_out=out, max_new_tokens=2)
                message = str(error.value)
                assert isinstance(error.value, (LimitError, InputError)) and "\n" not in message
                for value in (*PATIENT_VALUES, ref.study, "127.0.0.1", "http"):
                    assert value not in message, (pattern, message)
                assert not out.exists(), pattern
    finally:
        missing_server.shutdown()
        missing_server.server_close()
    assert set(archive.rest("/instances")) == held
