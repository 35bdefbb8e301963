"""A real DICOMweb archive for the tests: Debian's Orthanc with its DICOMweb plugin, started as a plain process on
127.0.0.1 with free ports and a throw-away storage folder, stopped by the test that started it (`orthanc_archive`).
Where Orthanc or the plugin is missing the tests skip and say why (`make archive` installs them as root on apt
machines). Also: study series built from the files pydicom ships (`ct_volume`), and a loopback HTTP server that
answers with a redirect (`redirecting_server`)."""
from __future__ import annotations

import contextlib
import copy
import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from dicom_files import DICOM_DIR

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
START_SECONDS = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_orthanc() -> None:
    if not os.access(ORTHANC, os.X_OK):
        pytest.skip("Orthanc is not installed (Debian: apt-get install orthanc orthanc-dicomweb; `make archive`)")
    if not os.path.exists(DICOMWEB_PLUGIN):
        pytest.skip("Orthanc's DICOMweb plugin is not installed (Debian: apt-get install orthanc-dicomweb)")


@dataclass
class Orthanc:
    """A running Orthanc: `url` (REST root), `dicomweb` (DICOMweb root); `rest(path)` GETs its REST API as JSON,
    `rest_bytes(path)` as bytes (both with the basic-auth user when it has one)."""

    process: subprocess.Popen
    port: int
    folder: Path
    users: dict

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def _open(self, path: str):
        request = urllib.request.Request(self.url + path)
        if self.users:
            import base64

            user, password = next(iter(self.users.items()))
            request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        return urllib.request.urlopen(request, timeout=30)

    def rest(self, path: str):
        with self._open(path) as answer:
            return json.loads(answer.read())

    def rest_bytes(self, path: str) -> bytes:
        with self._open(path) as answer:
            return answer.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the test process dies, even by SIGKILL (Linux prctl
    PR_SET_PDEATHSIG), so no archive outlives the tests that started it."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except OSError:
        pass


@contextlib.contextmanager
def orthanc_archive(folder: Path, users: dict | None = None):
    """Start Orthanc + DICOMweb in `folder` (config, storage, log); yield an `Orthanc`; stop it on the way out.
    users: {"name": "password"} switches basic authentication on."""
    require_orthanc()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {"Name": "gmaivl-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
              "HttpPort": port, "DicomServerEnabled": False, "DicomPort": free_port(),
              "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(users), "RegisteredUsers": users or {},
              "Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
              "HttpTimeout": 30, "StableAge": 1}
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "w")
    process = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                               cwd=folder, preexec_fn=_die_with_parent)
    archive = Orthanc(process, port, folder, users or {})
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {process.returncode}: "
                                   f"{(folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    pass
                archive.rest("/system")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not answer within {START_SECONDS} s") from None
                time.sleep(0.1)
        yield archive
    finally:
        archive.stop()
        log.close()


@contextlib.contextmanager
def stocked_archive(folder: Path):
    """`orthanc_archive` holding a 5-slice CT series (`.volume`, from CT_small) and pydicom's MR_small (`.mr`),
    stored through STOW-RS: the archive the ask and serve tests read."""
    from dicomweb_client.api import DICOMwebClient

    with orthanc_archive(folder) as server:
        server.volume = ct_volume(5)
        server.mr = read_shipped("MR_small.dcm")
        assert not DICOMwebClient(server.dicomweb).store_instances([*server.volume, server.mr]) \
            .get("FailedSOPSequence")
        yield server


def read_shipped(name: str):
    import pydicom

    return pydicom.dcmread(os.path.join(DICOM_DIR, name))


def ct_volume(slices: int = 5, offset: int = 50, study: str | None = None, series: str | None = None) -> list:
    """`slices` copies of pydicom's CT_small.dcm as one axial series (one study): positions 0.661468 mm apart (its
    pixel spacing, so the volume has cubic voxels), pixel values raised by `offset` * slice so each slice differs,
    InstanceNumber counting the other way than position (the stacking must sort by position), new UIDs."""
    from pydicom.uid import generate_uid

    source = read_shipped("CT_small.dcm")
    study, series = study or generate_uid(), series or generate_uid()
    made = []
    for k in range(slices):
        ds = copy.deepcopy(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        x, y, z = (float(v) for v in source.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + 0.661468 * k]
        ds.SliceLocation = z + 0.661468 * k
        ds.InstanceNumber = slices - k
        pixels = source.pixel_array + offset * k
        ds.PixelData = pixels.astype(source.pixel_array.dtype).tobytes()
        made.append(ds)
    return made


def with_uids(ds, study: str | None = None, series: str | None = None):
    """A copy of `ds` with a new SOP Instance UID (and the given study / series UIDs)."""
    from pydicom.uid import generate_uid

    ds = copy.deepcopy(ds)
    if study:
        ds.StudyInstanceUID = study
    if series:
        ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def mpeg2_instance():
    """MR_small relabelled as MPEG-2 (a transfer syntax pydicom has no decoder for), in a study of its own."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import generate_uid

    ds = with_uids(read_shipped("MR_small.dcm"), study=generate_uid(), series=generate_uid())
    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    return ds


@contextlib.contextmanager
def redirecting_server(location: str):
    """A loopback HTTP server that answers every GET with 302 to `location`; yields its root URL."""
    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
