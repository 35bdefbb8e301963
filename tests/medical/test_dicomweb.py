"""Reading images from a real DICOMweb archive (Debian's Orthanc + DICOMweb plugin, started here on a loopback
port): what comes back must be what the DICOM reader makes of the same file from disk (pydicom), a series must stack
like a NIfTI volume (checked against the single instances), the choice rule, limits before download, and one clear
error per failure that quotes no UID, URL, header or patient value."""
from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import pytest

pytest.importorskip("dicomweb_client", reason="the [hospital] extra (dicomweb-client) is not installed")
pytest.importorskip("highdicom", reason="the [hospital] extra (highdicom) is not installed")

from dicom_files import DICOM_DIR  # noqa: E402
from orthanc import (ct_volume, free_port, mpeg2_instance, orthanc_archive, read_shipped,  # noqa: E402
                     redirecting_server, with_uids)

from gmaivl_rt import LimitError, Limits, to_medical_image  # noqa: E402
from gmaivl_rt.medical.base import MedicalImageError  # noqa: E402
from gmaivl_rt.medical.dicomweb import (ArchiveError, DicomWebRef, archive_image, auth_from_env,  # noqa: E402
                                        fetch_study)

PATIENT_VALUES = ("CompressedSamples", "1CT1", "1MR1", "JFK IMAGING")  # what pydicom's CT/MR test files carry


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """One Orthanc for the module, holding: CT_small, MR_small and JPEG2000 (each its own study), a 5-slice CT
    volume, a study mixing series (see `mixed_study`), an MPEG-2 instance nothing decodes, an SR-only study."""
    with orthanc_archive(tmp_path_factory.mktemp("orthanc")) as server:
        from dicomweb_client.api import DICOMwebClient

        client = DICOMwebClient(server.dicomweb)
        server.files = {name: read_shipped(name) for name in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm")}
        server.volume = ct_volume(5)
        server.mixed = mixed_study()
        server.mpeg = mpeg2_instance()
        server.report_only = [with_uids(read_shipped("test-SR.dcm"), study=_uid(), series=_uid())]
        stored = [*server.files.values(), *server.volume, *server.mixed["all"], server.mpeg, *server.report_only]
        answer = client.store_instances(stored)
        assert not answer.get("FailedSOPSequence"), "Orthanc refused a test instance"
        yield server


def _uid():
    from pydicom.uid import generate_uid

    return generate_uid()


def mixed_study() -> dict:
    """A study whose largest *image* series is a 3-slice CT volume: beside it one MR instance, two MR instances
    at one position (not a volume: the lowest InstanceNumber is chosen; their pixels differ) and four SR
    instances (the most instances, but not images)."""
    study = _uid()
    volume = ct_volume(3, study=study)
    single = [with_uids(read_shipped("MR_small.dcm"), study=study, series=_uid())]
    stack_series = _uid()
    pair = []
    for number, offset in ((2, 0), (1, 300)):
        ds = with_uids(read_shipped("MR_small.dcm"), study=study, series=stack_series)
        ds.InstanceNumber = number
        ds.PixelData = (ds.pixel_array + offset).astype(ds.pixel_array.dtype).tobytes()
        pair.append(ds)
    reports_series = _uid()
    reports = [with_uids(read_shipped("test-SR.dcm"), study=study, series=reports_series) for _ in range(4)]
    return {"study": study, "volume": volume, "single": single, "pair": pair, "reports": reports,
            "all": [*volume, *single, *pair, *reports]}


def ref_to(archive, ds, level: str = "instance", **kw) -> DicomWebRef:
    return DicomWebRef(archive.dicomweb, str(ds.StudyInstanceUID),
                       str(ds.SeriesInstanceUID) if level in ("series", "instance") else None,
                       str(ds.SOPInstanceUID) if level == "instance" else None, **kw)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm"])
def test_an_instance_reads_as_the_same_file_from_disk(archive, name):
    """WADO-RS, in the transfer syntax stored (JPEG 2000 stays JPEG 2000), gives the picture the reader makes of the
    file on disk. Mutant seen failing: `retrieve` asking for Explicit VR Little Endian instead of `transfer-syntax=*`
    (Orthanc transcodes JPEG2000.dcm: the syntax check fails). (Leaving the transfer syntax out altogether passes
    with Orthanc 1.10, which then sends what it holds.)"""
    ds = archive.files[name]
    fetched = fetch_study(ref_to(archive, ds))
    assert fetched.sources[0].file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    expected = to_medical_image(os.path.join(DICOM_DIR, name))
    got = archive_image(ref_to(archive, ds))
    np.testing.assert_array_equal(got.pixels, expected.pixels)
    assert (got.modality, got.window_name) == (expected.modality, expected.window_name)


def test_a_series_stacks_into_a_volume_sliced_like_nifti(archive):
    """5 CT slices, InstanceNumber running against position: the volume is in position order; each axial slice is
    the picture the DICOM reader makes of that instance; a coronal slice is the instances' rows stacked (superior
    at the top), each windowed as the reader windows it. Mutants seen failing: `forms_volume` -> False (one
    instance, count 1), the default window (`volume_window`) dropped (percentile stretch: pixels differ), slices
    sorted by InstanceNumber instead of position in `stack_volume`'s sources (order check)."""
    volume = archive.volume
    singles = [to_medical_image(ds).pixels for ds in volume]  # the reader on each instance
    ref = ref_to(archive, volume[0], level="study")
    fetched = fetch_study(ref)
    assert fetched.volume and [s.SOPInstanceUID for s in fetched.sources] == [d.SOPInstanceUID for d in volume]
    middle = archive_image(ref)
    assert (middle.count, middle.index, middle.orientation) == (5, 2, "axial")
    np.testing.assert_array_equal(middle.pixels, singles[2])
    for k in (0, 4):
        np.testing.assert_array_equal(archive_image(ref, slice_index=k).pixels, singles[k])
    rows = volume[0].Rows
    for j in (20, 64):  # RAS coronal index j is image row rows-1-j (rows run posterior)
        coronal = archive_image(ref, plane="coronal", slice_index=j)
        expected = np.stack([singles[k][rows - 1 - j] for k in range(4, -1, -1)])
        np.testing.assert_array_equal(coronal.pixels, expected)


def test_the_study_choice_rule(archive):
    """Study only: the series with the most image instances (the SR series has more instances but no pixels);
    a series of two instances at one position is not a volume: the lowest InstanceNumber. Mutants seen failing:
    `choose_series` ranking by fewest instances; `first_instance` taking the highest InstanceNumber."""
    mixed = archive.mixed
    fetched = fetch_study(DicomWebRef(archive.dicomweb, mixed["study"]))
    assert fetched.volume and len(fetched.sources) == 3
    assert {s.SeriesInstanceUID for s in fetched.sources} == {mixed["volume"][0].SeriesInstanceUID}
    pair = fetch_study(ref_to(archive, mixed["pair"][0], level="series"))
    assert not pair.volume and pair.sources[0].SOPInstanceUID == mixed["pair"][1].SOPInstanceUID  # InstanceNumber 1
    np.testing.assert_array_equal(pair.read().pixels, to_medical_image(mixed["pair"][1]).pixels)


def _messages_clean(text: str, *uids) -> None:
    for value in (*PATIENT_VALUES, *(u for u in uids if u)):
        assert str(value) not in text, f"{value!r} leaked into: {text}"
    assert "127.0.0.1" not in text and "http" not in text


def test_limits_apply_before_any_pixel_data_is_downloaded(archive, monkeypatch):
    """Frame pixels and volume voxels come from QIDO-RS: over a limit, no WADO-RS retrieval is made at all; an
    answer over max_image_bytes is refused from its Content-Length. Mutants seen failing: `check_sizes` not
    called (retrieval happens), the Content-Length check in `guard` removed (no LimitError)."""
    from dicomweb_client.api import DICOMwebClient

    def no_download(*args, **kwargs):
        raise AssertionError("pixel data was downloaded before the limits were checked")

    ct = archive.files["CT_small.dcm"]
    with monkeypatch.context() as patch:
        patch.setattr(DICOMwebClient, "retrieve_instance", no_download)
        patch.setattr(DICOMwebClient, "retrieve_series", no_download)
        with pytest.raises(LimitError, match="pixels per frame is over the limit of 16383") as frame_error:
            fetch_study(ref_to(archive, ct), Limits(max_image_pixels=128 * 128 - 1))
        with pytest.raises(LimitError, match="81920 voxels is over the limit of 81919") as volume_error:
            fetch_study(ref_to(archive, archive.volume[0], level="series"), Limits(max_volume_voxels=5 * 128 * 128 - 1))
    with pytest.raises(LimitError, match="bytes is over the limit of 4096 bytes") as bytes_error:
        fetch_study(ref_to(archive, ct), Limits(max_image_bytes=4096))
    for error in (frame_error, volume_error, bytes_error):
        _messages_clean(str(error.value), ct.StudyInstanceUID, ct.SOPInstanceUID)


def test_bad_references_fail_with_one_clear_error(archive):
    """Unknown study (404 / nothing found), a study without images, an instance that is not in the series, an
    undecodable transfer syntax, an unreachable archive: one error each naming the problem, never a UID, the URL
    or a patient value. Mutant seen failing: `_call` letting requests' ConnectionError through."""
    unknown = _uid()
    cases = [
        (DicomWebRef(archive.dicomweb, unknown), ArchiveError, "not found"),
        (ref_to(archive, archive.report_only[0], level="study"), ArchiveError, "has no image instances"),
        (DicomWebRef(archive.dicomweb, str(archive.volume[0].StudyInstanceUID),
                     str(archive.volume[0].SeriesInstanceUID), unknown), ArchiveError, "not an image of that series"),
        (ref_to(archive, archive.mpeg), MedicalImageError, "MPEG2 .* has no pixel data decoder"),
        (DicomWebRef(f"http://127.0.0.1:{free_port()}/dicom-web", unknown, retries=1), ArchiveError,
         "cannot connect"),
    ]
    for ref, kind, pattern in cases:
        with pytest.raises(kind, match=pattern) as error:
            archive_image(ref)
        _messages_clean(str(error.value), unknown, ref.study, ref.series or "", ref.instance or "")


def test_a_redirect_to_another_host_is_refused(archive):
    """An archive answering with a redirect to another host (here: another port) is refused before it is followed,
    credentials and all. Mutant seen failing: `guard` comparing only host names (ports ignored: followed)."""
    with redirecting_server(archive.dicomweb + "/studies") as url:
        with pytest.raises(ArchiveError, match="redirected to another host") as error:
            fetch_study(DicomWebRef(url, "1.2.3"))
    _messages_clean(str(error.value))


def test_nothing_of_the_study_reaches_logs_or_warnings(archive, caplog):
    """With every logger at DEBUG, reading an instance and a volume leaves no UID and no patient value in any log
    record or warning. Mutant seen failing: `quiet_archive` not silencing urllib3 (it logs the request line with
    the UIDs at DEBUG)."""
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        archive_image(ref_to(archive, archive.files["MR_small.dcm"]))
        archive_image(ref_to(archive, archive.volume[0], level="study"))
    text = caplog.text + "".join(str(w.message) for w in caught)
    ds, vol = archive.files["MR_small.dcm"], archive.volume[0]
    for value in (*PATIENT_VALUES, ds.StudyInstanceUID, ds.SOPInstanceUID, vol.StudyInstanceUID, vol.SeriesInstanceUID):
        assert str(value) not in text


def test_basic_auth_comes_from_the_environment(tmp_path, monkeypatch):
    """An Orthanc with basic authentication: no credentials -> HTTP 401 named as such; the user and password from
    GMAIVL_DICOMWEB_USER and GMAIVL_DICOMWEB_PASSWORD_FILE -> the image; a wrong password -> 401. The password never
    appears in an error. Mutant seen failing: `auth_from_env` ignoring the *_FILE variable."""
    for name in ("GMAIVL_DICOMWEB_TOKEN", "GMAIVL_DICOMWEB_TOKEN_FILE", "GMAIVL_DICOMWEB_USER",
                 "GMAIVL_DICOMWEB_PASSWORD", "GMAIVL_DICOMWEB_PASSWORD_FILE"):
        monkeypatch.delenv(name, raising=False)
    with orthanc_archive(tmp_path / "orthanc", users={"radiology": "pa55-w0rd"}) as server:
        from dicomweb_client.api import DICOMwebClient
        from dicomweb_client.session_utils import create_session_from_user_pass

        ct = read_shipped("CT_small.dcm")
        DICOMwebClient(server.dicomweb, session=create_session_from_user_pass("radiology", "pa55-w0rd")) \
            .store_instances([ct])
        ref = ref_to(server, ct)
        with pytest.raises(ArchiveError, match="HTTP 401") as error:
            archive_image(ref)
        secret = tmp_path / "password"
        secret.write_text("pa55-w0rd\n")
        monkeypatch.setenv("GMAIVL_DICOMWEB_USER", "radiology")
        monkeypatch.setenv("GMAIVL_DICOMWEB_PASSWORD_FILE", str(secret))
        assert auth_from_env() == ("basic", ("radiology", "pa55-w0rd"))
        np.testing.assert_array_equal(archive_image(ref).pixels, to_medical_image(ct).pixels)
        secret.write_text("wrong")
        with pytest.raises(ArchiveError, match="HTTP 401") as wrong:
            archive_image(ref)
        assert "pa55" not in str(wrong.value) and "wrong" not in str(wrong.value) + str(error.value)


def test_a_bearer_token_is_sent_and_errors_map(monkeypatch):
    """GMAIVL_DICOMWEB_TOKEN reaches the archive as `Authorization: Bearer ...`; 403, 404 and 503 (retried
    `retries` times, then reported) are named. Checked against a loopback server that records what it receives.
    Mutants seen failing: the retry count not passed to dicomweb-client (503 asked 5 times); 404 missing from
    `_status_text`'s meanings ("archive error")."""
    import http.server
    import threading

    seen = []

    class Status(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append((self.path, self.headers.get("Authorization")))
            self.send_response(403 if "forbidden" in self.path else 404 if "missing" in self.path else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Status)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.delenv("GMAIVL_DICOMWEB_USER", raising=False)
        monkeypatch.setenv("GMAIVL_DICOMWEB_TOKEN", "t0ken-value")
        root = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(ArchiveError, match="HTTP 403") as forbidden:
            fetch_study(DicomWebRef(root + "/forbidden", "1.2.3"))
        assert seen[-1][1] == "Bearer t0ken-value"
        with pytest.raises(ArchiveError, match=r"HTTP 404 \(not found\)") as missing:
            fetch_study(DicomWebRef(root + "/missing", "1.2.3"))
        seen.clear()
        with pytest.raises(ArchiveError, match="HTTP 503") as unavailable:
            fetch_study(DicomWebRef(root + "/busy", "1.2.3", retries=2))
        assert len(seen) == 2
        for error in (forbidden, missing, unavailable):
            assert "t0ken" not in str(error.value) and root not in str(error.value)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_qido_paging_is_followed_and_bounded(archive, monkeypatch):
    """Instances are searched page by page: with 2 per page the 5-slice volume is still found whole (Orthanc
    honours offset); an archive that ignores offset (the same page every time) ends the search instead of looping
    (the first retrieval then fails on its non-DICOM answer). Mutants seen failing: the `not new` stop removed
    (the loop never ends: the test's timeout), the offset not advanced (3 slices short of the volume)."""
    import http.server
    import json
    import threading

    from gmaivl_rt.medical import dicomweb

    monkeypatch.setattr(dicomweb, "QIDO_PAGE", 2)
    fetched = fetch_study(ref_to(archive, archive.volume[0], level="series"))
    assert fetched.volume and len(fetched.sources) == 5
    page = json.dumps([{"0020000E": {"vr": "UI", "Value": ["1.2.3.4"]}, "00080018": {"vr": "UI", "Value": [f"1.2.3.{n}"]},
                        "00280010": {"vr": "US", "Value": [8]}, "00280011": {"vr": "US", "Value": [8]}}
                       for n in (5, 6)]).encode()
    calls = []

    class SamePage(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            calls.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SamePage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(ArchiveError):
            fetch_study(DicomWebRef(f"http://127.0.0.1:{server.server_address[1]}/dicom-web", "1.2.3"))
        assert sum("/instances?" in c for c in calls) == 2  # the second page repeated the first: stop
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
