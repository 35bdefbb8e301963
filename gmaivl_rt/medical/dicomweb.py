"""Images from a DICOMweb archive (a PACS): QIDO-RS to find, WADO-RS to fetch, STOW-RS to store, through
`dicomweb-client` (the `[hospital]` extra).

`DicomWebRef(url, study, series=None, instance=None)` names what to read; `fetch_study(ref, limits)` reads it into
what `gmaivl_rt.medical.convert.to_medical_image` takes (`to_medical_image(ref)` does both), so an archive image
crosses the same request boundary and limits as a file.

Which image a reference means (the rule, also in docs/hospital.md):
* instance given: that instance (a multi-frame one takes `frame=` as a file does);
* series given: its image instances (those with Rows and Columns); one -> that instance; several that form a volume
  (single-frame, one orientation, one size, distinct positions along the slice normal) -> stacked in position
  order into one volume (highdicom's `get_volume_from_series`, modality LUT applied) and read like a NIfTI file
  (`slice_index=` / `plane=`, default the middle axial slice; the first instance's window, or for CT the named
  window the DICOM reader would choose); several that do not -> the one with the lowest InstanceNumber (then UID);
* only the study: the series with the most image instances (ties: more pixels per instance, then the lower
  SeriesNumber, then the UID), then as above.

Limits apply before any pixel data is downloaded: the sizes come from QIDO-RS (Rows, Columns, NumberOfFrames;
WADO-RS metadata where the archive leaves them out), so a frame over `max_image_pixels` or a volume over
`max_volume_voxels` is refused first, and an answer whose Content-Length is over `max_image_bytes` is refused
before its body is read.

Authentication comes from the environment, never the command line: `GMAIVL_DICOMWEB_TOKEN` (or
`GMAIVL_DICOMWEB_TOKEN_FILE`, a file holding it) sends `Authorization: Bearer ...`; `GMAIVL_DICOMWEB_USER` with
`GMAIVL_DICOMWEB_PASSWORD` (or `GMAIVL_DICOMWEB_PASSWORD_FILE`) sends basic auth. Each request has a connect/read
timeout (`timeout`, default 10 s / 60 s) and is retried with exponential back-off on 408, 429, 503 and 504
(`retries` attempts in all, default 3); an archive that cannot be reached fails at once. A redirect to another
host (scheme, host or port) is refused: credentials and study data go to the archive named and nowhere else.

Errors are `ArchiveError` (an `InputError`) naming "archive" and the problem: never the URL (it may carry
credentials), a UID, a header value or anything of the patient; the library loggers that would quote URLs or
header values are silenced while the archive is used.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

from gmaivl_rt.errors import InputError, LimitError
from gmaivl_rt.limits import DEFAULT_LIMITS, Limits, type_name

TOKEN_ENV, TOKEN_FILE_ENV = "GMAIVL_DICOMWEB_TOKEN", "GMAIVL_DICOMWEB_TOKEN_FILE"
USER_ENV, PASSWORD_ENV, PASSWORD_FILE_ENV = "GMAIVL_DICOMWEB_USER", "GMAIVL_DICOMWEB_PASSWORD", \
    "GMAIVL_DICOMWEB_PASSWORD_FILE"
DEFAULT_TIMEOUT = (10.0, 60.0)  # seconds: connect, read (per request)
DEFAULT_RETRIES = 3  # attempts in all on 408 / 429 / 503 / 504
RETRY_WAIT_MS = 500  # exponential back-off multiplier between attempts
# What QIDO-RS is asked for besides its defaults: enough to choose an image and check limits before downloading.
INSTANCE_FIELDS = ("SeriesInstanceUID", "SOPInstanceUID", "SeriesNumber", "InstanceNumber", "Rows", "Columns",
                   "NumberOfFrames", "ImagePositionPatient", "ImageOrientationPatient", "Modality")
QIDO_PAGE = 1000  # instances per QIDO-RS answer (limit / offset paging)
MAX_INSTANCES = 100_000  # instances one reference may search through
# Loggers that quote URLs (with UIDs), response headers or header values at some level.
_QUIET_LOGGERS = ("dicomweb_client", "urllib3", "requests", "highdicom", "pydicom", "retrying")


class ArchiveError(InputError):
    """The archive could not give (or take) what was asked: unreachable, refused, not found, not an image. The
    message names the archive by its role and the problem only."""


@contextlib.contextmanager
def quiet_archive():
    """Silence the client libraries' loggers and warnings for the block (they quote URLs, UIDs, header values)."""
    saved = []
    for name in _QUIET_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.disabled, logger.propagate))
        logger.disabled, logger.propagate = True, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, disabled, propagate in saved:
            logger.disabled, logger.propagate = disabled, propagate


def _read_secret_file(variable: str) -> str:
    path = os.environ[variable]
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as e:
        raise ArchiveError(f"archive credentials: the file named by {variable} cannot be read ({e.strerror})") \
            from None


def auth_from_env(environ=None) -> tuple[str, object] | None:
    """("bearer", token) | ("basic", (user, password)) | None, from the GMAIVL_DICOMWEB_* variables (a *_FILE
    variable names a file holding the secret). ArchiveError when they are contradictory or half given."""
    env = os.environ if environ is None else environ
    token = env.get(TOKEN_ENV) or (_read_secret_file(TOKEN_FILE_ENV) if env.get(TOKEN_FILE_ENV) else None)
    user = env.get(USER_ENV)
    password = env.get(PASSWORD_ENV) or (_read_secret_file(PASSWORD_FILE_ENV) if env.get(PASSWORD_FILE_ENV)
                                         else None)
    if token and user:
        raise ArchiveError(f"archive credentials: set either {TOKEN_ENV} (bearer) or {USER_ENV} (basic), not both")
    if token:
        return "bearer", token
    if user:
        if password is None:
            raise ArchiveError(f"archive credentials: {USER_ENV} is set but neither {PASSWORD_ENV} nor "
                               f"{PASSWORD_FILE_ENV}")
        return "basic", (user, password)
    return None


@dataclass(frozen=True)
class DicomWebRef:
    """An image in a DICOMweb archive: its root URL (e.g. "http://pacs:8042/dicom-web") and the Study Instance UID,
    optionally the Series and SOP Instance UIDs (see the module docstring for which image that means).
    auth: ("bearer", token) / ("basic", (user, password)) / None; default: from the environment (`auth_from_env`).
    timeout: seconds (connect, read) per request; retries: attempts in all on 408/429/503/504."""

    url: str
    study: str
    series: str | None = None
    instance: str | None = None
    auth: tuple | None = field(default=None, repr=False)
    timeout: tuple[float, float] = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES

    def __post_init__(self):
        for role in ("url", "study"):
            if not isinstance(getattr(self, role), str) or not getattr(self, role).strip():
                raise InputError(f"DicomWebRef.{role} must be a non-empty str, got {type_name(getattr(self, role))}")
        for role in ("series", "instance"):
            value = getattr(self, role)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise InputError(f"DicomWebRef.{role} must be a non-empty str or None, got {type_name(value)}")
        if self.instance is not None and self.series is None:
            raise InputError("DicomWebRef: an instance needs its series (WADO-RS addresses study/series/instance)")
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError("DicomWebRef.url must be an http:// or https:// URL of the archive's DICOMweb root")
        for uid_role in ("study", "series", "instance"):
            value = getattr(self, uid_role)
            if value is not None and not _is_uid(value):
                raise InputError(f"DicomWebRef.{uid_role} is not a DICOM UID (digits and dots, at most 64)")


def _is_uid(text: str) -> bool:
    return 0 < len(text) <= 64 and all(c.isdigit() or c == "." for c in text) and not text.startswith(".")


@dataclass(frozen=True)
class InstanceInfo:
    """One image instance as QIDO-RS (or WADO-RS metadata) describes it: no pixel data, no patient values."""

    series: str
    sop: str
    series_number: int | None
    instance_number: int | None
    rows: int
    columns: int
    frames: int
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    modality: str | None

    @property
    def pixels(self) -> int:
        return self.rows * self.columns * self.frames


@dataclass
class FetchedImage:
    """What `fetch_study` read: `image`, the form `to_medical_image` takes (a pydicom Dataset, or a nibabel image
    for a stacked volume); `sources`, the instances it was made from (pydicom Datasets, in position order for a
    volume), the evidence a report references; `window`, the window a stacked volume is read with by default."""

    image: object
    sources: list
    volume: bool = False
    window: object = None

    def read(self, *, role: str = "image 1", limits: Limits | None = None, frame=None, slice_index=None,
             plane=None, window=None):
        """The picture through `to_medical_image` with the reader options a file takes -> MedicalImage (a stacked
        volume is read with its `window` unless one is given)."""
        from gmaivl_rt.medical.convert import to_medical_image

        return to_medical_image(self.image, role=role, limits=limits, frame=frame, slice_index=slice_index,
                                plane=plane, window=window if window is not None or not self.volume else self.window)


class Archive:
    """One DICOMweb archive, opened with its credentials and limits: `image_instances`, `retrieve`, `store`,
    `studies`. Every call maps the client's failures to one `ArchiveError`."""

    def __init__(self, url: str, *, auth=None, timeout=DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES,
                 limits: Limits | None = None):
        from gmaivl_rt.extras import require

        require("dicomweb_client", "requests", extra="hospital")
        import requests
        from dicomweb_client.api import DICOMwebClient

        self.limits = limits or DEFAULT_LIMITS
        session = requests.Session()
        session.trust_env = False  # no .netrc credentials or proxies from the environment: the archive named only
        # Uncompressed answers, so Content-Length is the size read and the byte limit holds before the body is read.
        session.headers["Accept-Encoding"] = "identity"
        if auth is not None:
            kind, secret = auth
            if kind == "bearer":
                session.headers["Authorization"] = f"Bearer {secret}"
            elif kind == "basic":
                session.auth = tuple(secret)
            else:
                raise InputError("archive auth must be ('bearer', token) or ('basic', (user, password))")
        origin = urlsplit(url)
        self._origin = (origin.scheme, origin.hostname, origin.port)

        def guard(response, *args, **kwargs):
            # Runs on every answer, redirects included, before requests follows them or reads a body.
            if response.is_redirect:
                target = urlsplit(urljoin(response.url, response.headers.get("Location", "")))
                if (target.scheme, target.hostname, target.port) != self._origin:
                    raise ArchiveError("archive: redirected to another host; refused (credentials and study data "
                                       "go only to the archive named)")
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > self.limits.max_image_bytes:
                raise LimitError(f"archive: an answer of {int(length)} bytes is over the limit of "
                                 f"{self.limits.max_image_bytes} bytes per image")
            return response

        session.hooks["response"].append(guard)
        with quiet_archive():
            try:
                self.client = DICOMwebClient(url=url.rstrip("/"), session=session, timeout=tuple(timeout))
            except ValueError:
                raise InputError("archive URL is not usable (expected http(s)://host[:port]/path)") from None
        self.client.set_http_retry_params(retry=retries > 1, max_attempts=max(1, int(retries)),
                                          wait_exponential_multiplier=RETRY_WAIT_MS)
        self.timeout = timeout

    @classmethod
    def for_ref(cls, ref: DicomWebRef, limits: Limits | None = None) -> "Archive":
        """The archive a reference names, with its credentials (from the environment unless it carries them)."""
        auth = ref.auth if ref.auth is not None else auth_from_env()
        return cls(ref.url, auth=auth, timeout=ref.timeout, retries=ref.retries, limits=limits)

    @contextlib.contextmanager
    def _call(self, what: str):
        """Run one transaction: library failures become one ArchiveError naming `what` and the problem."""
        import requests
        from retrying import RetryError

        try:
            with quiet_archive():
                yield
        except (ArchiveError, LimitError):
            raise
        except requests.exceptions.HTTPError as e:
            raise ArchiveError(f"archive: {what} failed: {_status_text(e.response)}") from None
        except RetryError as e:  # still 408 / 429 / 503 / 504 after the last attempt
            last = getattr(e.last_attempt, "value", None)
            raise ArchiveError(f"archive: {what} failed after {e.last_attempt.attempt_number} attempts: "
                               f"{_status_text(last)}") from None
        except requests.exceptions.Timeout:
            raise ArchiveError(f"archive: {what}: no answer within {self.timeout[-1]:g} s") from None
        except requests.exceptions.ConnectionError:
            raise ArchiveError(f"archive: {what}: cannot connect to the archive") from None
        except requests.exceptions.RequestException as e:
            raise ArchiveError(f"archive: {what} failed ({type(e).__name__})") from None
        except Exception as e:
            # a malformed DICOM JSON / multipart / DICOM answer (pydicom, json, the multipart parser raise many
            # types): their text may quote the data, so only the type
            raise ArchiveError(f"archive: {what}: the archive's answer cannot be read ({type(e).__name__})") \
                from None

    def image_instances(self, study: str, series: str | None = None) -> list[InstanceInfo]:
        """The study's (or one series') image instances (with Rows and Columns), from QIDO-RS; WADO-RS metadata
        fills in sizes QIDO left out. ArchiveError when the study (series) is not found."""
        found = self._search_instances(study, series)
        if not found:
            raise ArchiveError(f"archive: {'series' if series else 'study'} not found (no instances)")
        infos = []
        for item in found:
            info = _instance_info(item)
            if info is None and "00280010" not in item and "00280011" not in item:
                # QIDO left Rows/Columns out: ask for the metadata (no pixel data) of that instance
                with self._call("reading instance metadata"):
                    meta = self.client.retrieve_instance_metadata(study, _value(item, "0020000E"),
                                                                  _value(item, "00080018"))
                info = _instance_info({**meta, **{k: v for k, v in item.items() if k not in meta}})
            if info is not None:
                infos.append(info)
        return infos

    def _search_instances(self, study: str, series: str | None) -> list[dict]:
        """QIDO-RS instances, page by page (QIDO_PAGE at a time), bounded: an archive that ignores `offset` (the
        same page again) ends the search, and more than MAX_INSTANCES is refused."""
        found, seen = [], set()
        while True:
            with self._call("searching the study"):
                page = self.client.search_for_instances(study, series, fields=list(INSTANCE_FIELDS),
                                                        limit=QIDO_PAGE, offset=len(found))
            new = [item for item in page if _value(item, "00080018") not in seen]
            found.extend(new)
            seen.update(_value(item, "00080018") for item in new)
            if len(found) > MAX_INSTANCES:
                raise LimitError(f"archive: more than {MAX_INSTANCES} instances to search; name the series")
            if len(page) < QIDO_PAGE or not new:
                return found

    def retrieve(self, study: str, info: InstanceInfo):
        """One instance as a pydicom Dataset, in the transfer syntax the archive holds it in."""
        with self._call("retrieving an instance"):
            return self.client.retrieve_instance(study, info.series, info.sop, media_types=(("application/dicom",
                                                                                             "*"),))

    def retrieve_series(self, study: str, series: str) -> list:
        """Every instance of a series in one WADO-RS request (a volume: one image, so one `max_image_bytes` for
        the whole answer)."""
        with self._call("retrieving a series"):
            return list(self.client.retrieve_series(study, series, media_types=(("application/dicom", "*"),)))

    def store(self, datasets) -> None:
        """STOW-RS the datasets; ArchiveError when the archive refuses any of them."""
        with self._call("storing"):
            answer = self.client.store_instances(list(datasets))
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
            raise ArchiveError(f"archive: refused {len(failed)} of the instances stored (failure reason "
                               f"{', '.join(reasons)})")

    def studies(self, limit: int = 100, offset: int = 0, fields=None) -> list[dict]:
        """QIDO-RS studies as DICOM JSON (for browsing; `browse_studies` keeps only what is needed to choose)."""
        with self._call("searching studies"):
            return self.client.search_for_studies(limit=limit, offset=offset,
                                                  fields=list(fields) if fields else None)

    def series(self, study: str, fields=None) -> list[dict]:
        """QIDO-RS series of one study as DICOM JSON (for browsing: `browse_series`)."""
        with self._call("searching the study's series"):
            return self.client.search_for_series(study, fields=list(fields) if fields else None)


def _status_text(response) -> str:
    code = getattr(response, "status_code", None)
    meaning = {401: "the archive asks for credentials (set GMAIVL_DICOMWEB_TOKEN or GMAIVL_DICOMWEB_USER)",
               403: "the credentials are not allowed to do this", 404: "not found",
               406: "the archive cannot send it in an acceptable form",
               408: "the archive timed out", 413: "the archive refused the size", 429: "too many requests",
               503: "the archive is unavailable", 504: "the archive's gateway timed out"}
    return f"HTTP {code} ({meaning.get(code, 'archive error')})" if code else "no answer"


def _value(item: dict, tag: str, index: int = 0):
    try:
        return item[tag]["Value"][index]
    except (KeyError, IndexError, TypeError):
        return None


def _values(item: dict, tag: str):
    try:
        return tuple(float(v) for v in item[tag]["Value"])
    except (KeyError, TypeError, ValueError):
        return None


def _int(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _instance_info(item: dict) -> InstanceInfo | None:
    """A QIDO / metadata JSON item -> InstanceInfo, or None when it is not an image (no Rows / Columns)."""
    rows, columns = _int(_value(item, "00280010")), _int(_value(item, "00280011"))
    series, sop = _value(item, "0020000E"), _value(item, "00080018")
    if not rows or not columns or not series or not sop:
        return None
    from gmaivl_rt.medical.base import modality_code

    return InstanceInfo(series=str(series), sop=str(sop), series_number=_int(_value(item, "00200011")),
                        instance_number=_int(_value(item, "00200013")), rows=rows, columns=columns,
                        frames=max(1, _int(_value(item, "00280008")) or 1),
                        position=_values(item, "00200032"), orientation=_values(item, "00200037"),
                        modality=modality_code(_value(item, "00080060")))


def choose_series(instances: list[InstanceInfo]) -> str:
    """The series a study-only reference means: the most image instances, then more pixels per instance, then
    the lower SeriesNumber, then the UID (so the choice never depends on the archive's order)."""
    by_series: dict[str, list[InstanceInfo]] = {}
    for info in instances:
        by_series.setdefault(info.series, []).append(info)

    def rank(uid):
        members = by_series[uid]
        number = members[0].series_number
        return (-len(members), -max(m.pixels for m in members), number if number is not None else 1 << 31, uid)

    return min(by_series, key=rank)


def forms_volume(instances: list[InstanceInfo]) -> bool:
    """Several single-frame instances of one size and orientation at distinct positions along the slice normal."""
    import numpy as np

    if len(instances) < 2 or any(i.frames != 1 or i.position is None or i.orientation is None
                                 or len(i.position) != 3 or len(i.orientation) != 6 for i in instances):
        return False
    first = instances[0]
    if any((i.rows, i.columns) != (first.rows, first.columns)
           or not np.allclose(i.orientation, first.orientation, atol=1e-4) for i in instances):
        return False
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    along = np.round([float(np.dot(normal, i.position)) for i in instances], 4)
    return len(set(along.tolist())) == len(instances)


def first_instance(instances: list[InstanceInfo]) -> InstanceInfo:
    return min(instances, key=lambda i: (i.instance_number if i.instance_number is not None else 1 << 31, i.sop))


def check_sizes(instances: list[InstanceInfo], limits: Limits, volume: bool) -> None:
    """The request limits, from metadata, before any pixel data is downloaded."""
    for info in instances:
        if info.rows * info.columns > limits.max_image_pixels:
            raise LimitError(f"archive image: {info.columns}x{info.rows} = {info.rows * info.columns} pixels per "
                             f"frame is over the limit of {limits.max_image_pixels}")
    if volume:
        voxels = sum(i.pixels for i in instances)
        if voxels > limits.max_volume_voxels:
            raise LimitError(f"archive series: {len(instances)} slices of {instances[0].columns}x"
                             f"{instances[0].rows} = {voxels} voxels is over the limit of "
                             f"{limits.max_volume_voxels}")


def decoded_values(chosen: list[InstanceInfo], volume: bool) -> int:
    """The pixel values reading the choice decodes, from metadata: a volume's voxels (read whole, like a NIfTI
    file), one frame of an instance (QIDO does not say whether it is colour: counted as greyscale)."""
    return sum(i.pixels for i in chosen) if volume else chosen[0].rows * chosen[0].columns


def fetch_study(ref: DicomWebRef, limits: Limits | None = None, *, role: str = "image 1",
                admit=None) -> FetchedImage:
    """Read the image `ref` means (module docstring) from the archive: metadata first, limits checked, then the
    pixel data. Raises ArchiveError / LimitError / MedicalImageError (undecodable transfer syntax), none of which
    quote a UID, URL or header value. admit: called with `decoded_values(chosen, volume)` after the limits are
    checked and before any pixel data is downloaded (it may raise: the server's decode budget)."""
    if not isinstance(ref, DicomWebRef):
        raise InputError(f"{role}: expected a DicomWebRef, got {type_name(ref)}")
    limits = limits or DEFAULT_LIMITS
    archive = Archive.for_ref(ref, limits)
    instances = archive.image_instances(ref.study, ref.series)
    if ref.instance is not None:
        instances = [i for i in instances if i.sop == ref.instance]
        if not instances:
            raise ArchiveError("archive: the instance is not an image of that series (or is not there)")
    if not instances:
        raise ArchiveError(f"archive: the {'series' if ref.series else 'study'} has no image instances (no Rows / "
                           "Columns: reports, documents or presentation states only)")
    series = ref.series or choose_series(instances)
    members = [i for i in instances if i.series == series]
    volume = ref.instance is None and forms_volume(members)
    chosen = members if volume else [first_instance(members)]
    check_sizes(chosen, limits, volume)
    if admit is not None:
        admit(decoded_values(chosen, volume))
    if not volume:
        dataset = archive.retrieve(ref.study, chosen[0])
        return FetchedImage(image=dataset, sources=[dataset])
    datasets = archive.retrieve_series(ref.study, series)
    wanted = {i.sop for i in chosen}
    datasets = [ds for ds in datasets if str(getattr(ds, "SOPInstanceUID", "")) in wanted]
    if len(datasets) != len(chosen):
        raise ArchiveError(f"archive: the series answer held {len(datasets)} of its {len(chosen)} image instances")
    return stack_volume(datasets, role, limits)


def stack_volume(datasets: list, role: str, limits: Limits) -> FetchedImage:
    """Single-frame DICOM instances of one volume -> a nibabel image in RAS+ (read like a NIfTI file), through
    highdicom's `get_volume_from_series` (position order, spacing and orientation checked), the modality LUT
    applied. Each instance's transfer syntax and size are checked by the DICOM reader's own rules first."""
    import numpy as np

    from gmaivl_rt.medical.base import ImageSource, MedicalImageError, safe_reason
    from gmaivl_rt.medical.dicom import DicomSource, quiet_pydicom

    for ds in datasets:  # undecodable transfer syntax / pixel limits: the same errors as for a file
        DicomSource(ImageSource(label=role, format="dicom", obj=ds, limits=limits), None)
    try:
        import highdicom

        with quiet_pydicom(), quiet_archive():
            volume = highdicom.get_volume_from_series(datasets, dtype=np.float32, apply_modality_transform=True)
            image = volume.to_nibabel()
    except MedicalImageError:
        raise
    except Exception as e:
        raise MedicalImageError(f"{role}: the series does not form a regular volume ({safe_reason(e)}); name one "
                                "instance instead") from None
    normal = np.cross(np.asarray(datasets[0].ImageOrientationPatient[:3], float),
                      np.asarray(datasets[0].ImageOrientationPatient[3:], float))
    ordered = sorted(datasets, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))
    return FetchedImage(image=image, sources=ordered, volume=True, window=volume_window(ordered[0]))


def volume_window(ds):
    """The window the DICOM reader applies to `ds` by default, for a volume stacked from it (read like a NIfTI file,
    whose own default is a percentile stretch): the file's first (centre, width), else for CT the named window of
    `ct_window_name`, else None. A VOI LUT sequence is not carried over."""
    from gmaivl_rt.medical.base import body_part_term, modality_code
    from gmaivl_rt.medical.dicom import first_number, quiet_pydicom
    from gmaivl_rt.medical.windowing import ct_window_name

    with quiet_pydicom():
        try:
            if "WindowCenter" in ds and "WindowWidth" in ds:
                return first_number(ds.WindowCenter), first_number(ds.WindowWidth)
        except (TypeError, ValueError, IndexError):
            return None
        if modality_code(ds.get("Modality")) == "CT":
            return ct_window_name(body_part_term(ds.get("BodyPartExamined")))
    return None


def archive_image(ref: DicomWebRef, *, role: str = "image 1", limits: Limits | None = None, frame=None,
                  slice_index=None, plane=None, window=None):
    """What `to_medical_image` does for a file, for an archive image: `fetch_study(ref)`, then `FetchedImage.read`
    -> MedicalImage."""
    return fetch_study(ref, limits, role=role).read(role=role, limits=limits, frame=frame, slice_index=slice_index,
                                                    plane=plane, window=window)


# What the archive browse (`gmaivl-rt serve --dicomweb`, docs/hospital.md) asks QIDO-RS for and passes on: UIDs,
# modality codes (DICOM defined terms only), dates as digits, counts. Never a patient value or free text (names, IDs,
# birth dates, descriptions, accession numbers, referring physicians): the clinician picks by date, modality and size.
STUDY_FIELDS = ("StudyInstanceUID", "StudyDate", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                "NumberOfStudyRelatedInstances")
SERIES_FIELDS = ("SeriesInstanceUID", "Modality", "SeriesNumber", "NumberOfSeriesRelatedInstances")
MAX_BROWSE = 100  # studies per browse page


def _dicom_date(value) -> str | None:
    """A DA value "YYYYMMDD" -> "YYYY-MM-DD" when it is eight digits of a plausible date, else None (never
    passed through as given)."""
    text = str(value or "")
    if len(text) != 8 or not text.isdigit():
        return None
    year, month, day = int(text[:4]), int(text[4:6]), int(text[6:])
    if not (1800 <= year <= 9999 and 1 <= month <= 12 and 1 <= day <= 31):
        return None
    return f"{year:04d}-{month:02d}-{day:02d}"


def _uid_or_none(value) -> str | None:
    text = str(value or "")
    return text if _is_uid(text) else None


def browse_studies(archive: Archive, limit: int = MAX_BROWSE, offset: int = 0) -> list[dict]:
    """One page of the archive's studies, as the browse list shows them: {"study": UID, "date": "YYYY-MM-DD" |
    None, "modalities": [codes], "series": int | None, "instances": int | None}; items without a valid Study
    Instance UID are left out. No patient value and no free text (see STUDY_FIELDS)."""
    from gmaivl_rt.medical.base import modality_code

    limit = max(1, min(int(limit), MAX_BROWSE))
    out = []
    for item in archive.studies(limit=limit, offset=max(0, int(offset)), fields=STUDY_FIELDS):
        uid = _uid_or_none(_value(item, "0020000D"))
        if uid is None:
            continue
        try:
            codes = item["00080061"]["Value"]
        except (KeyError, TypeError):
            codes = []
        modalities = sorted({code for code in (modality_code(c) for c in codes) if code})
        out.append({"study": uid, "date": _dicom_date(_value(item, "00080020")), "modalities": modalities,
                    "series": _int(_value(item, "00201206")), "instances": _int(_value(item, "00201208"))})
    return out


def browse_series(archive: Archive, study: str) -> list[dict]:
    """A study's series, as the browse list shows them: {"series": UID, "modality": code | None, "number": int |
    None, "instances": int | None}, in SeriesNumber order (then UID). ArchiveError when the study has none."""
    from gmaivl_rt.medical.base import modality_code

    out = []
    for item in archive.series(study, fields=SERIES_FIELDS):
        uid = _uid_or_none(_value(item, "0020000E"))
        if uid is not None:
            out.append({"series": uid, "modality": modality_code(_value(item, "00080060")),
                        "number": _int(_value(item, "00200011")), "instances": _int(_value(item, "00201209"))})
    if not out:
        raise ArchiveError("archive: study not found (no series)")
    return sorted(out, key=lambda s: (s["number"] if s["number"] is not None else 1 << 31, s["series"]))
