"""De-identification guards for the converter.

The converter only ever reads whitelisted, non-identifying DICOM attributes (see medical_io.MedicalImage), so
identity should never get into its output in the first place. This module is the second line: it collects the
identity values a DICOM file carries (names, IDs, dates, times, institution, physicians, accession number, UIDs)
and checks every record, id, file name and error message against them before anything is written.
"""
from __future__ import annotations

import hashlib
import os
import re

# Identity attributes (DICOM PS3.15 Annex E basic profile, the ones that name or date a person or a visit).
PHI_KEYWORDS = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate", "PatientBirthTime",
    "PatientAddress", "PatientTelephoneNumbers", "PatientMotherBirthName", "MilitaryRank", "EthnicGroup",
    "IssuerOfPatientID", "PatientAge", "MedicalRecordLocator",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
    "ReferringPhysicianName", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "OperatorsName",
    "PhysiciansOfRecord", "RequestingPhysician", "ScheduledPerformingPhysicianName",
    "AccessionNumber", "StudyID", "DeviceSerialNumber", "RequestedProcedureID", "PerformedProcedureStepID",
    "StudyDescription", "SeriesDescription", "ProtocolName", "AdditionalPatientHistory", "PatientComments",
)
_NON_IDENTIFYING_VALUES = {"", "anonymous", "anonymized", "none", "unknown", "n/a", "na", "0", "00", "1"}
_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_UID_LIKE = re.compile(r"^\d+(\.\d+){3,}$")


def phi_values(dataset) -> set[str]:
    """Identity strings in a pydicom Dataset: PHI keywords above, every DA/DT/TM value and every UI value
    outside the DICOM standard root (instance/study/series UIDs), at any sequence depth. Person names add their
    components too. Values too short to identify anyone are dropped (they would match everywhere): fewer than
    3 characters, or fewer than 6 when they hold no letter (DICOM dates have 8, times 6)."""
    found: set[str] = set()

    def add(value):
        text = str(value).strip()
        if text.lower() not in _NON_IDENTIFYING_VALUES and _significant(text):
            found.add(text)

    def visit(ds):
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value or ():
                    visit(item)
                continue
            if elem.keyword in PHI_KEYWORDS or elem.VR in ("DA", "DT", "TM", "PN") or (
                    elem.VR == "UI" and not str(elem.value).startswith("1.2.840.10008.")):
                values = elem.value if isinstance(elem.value, (list, tuple)) or \
                    type(elem.value).__name__ == "MultiValue" else [elem.value]
                for v in values:
                    if v is None:
                        continue
                    add(v)
                    if elem.VR == "PN":
                        for part in re.split(r"[\^= ]+", str(v)):
                            add(part)

    from gmaivl_rt.medical_io import quiet_pydicom

    with quiet_pydicom():
        try:
            visit(dataset)
            if getattr(dataset, "file_meta", None) is not None:
                visit(dataset.file_meta)
        except Exception:  # damaged headers: whatever was collected so far still guards
            pass
    return found


def phi_values_of_file(path: str | os.PathLike) -> set[str]:
    """`phi_values` of a DICOM file's header (no pixel data read); empty for non-DICOM or unreadable files."""
    import pydicom

    from gmaivl_rt.medical_io import quiet_pydicom

    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:
        return set()
    return phi_values(ds)


def _significant(text: str) -> bool:
    return len(text) >= 3 and (any(c.isalpha() for c in text) or len(text) >= 6)


def _pattern(value: str) -> re.Pattern:
    # Whole-token match: a surname 'Mid' must not hit 'middle', a time '120000' must not hit '1200001'.
    return re.compile(r"(?<![A-Za-z0-9])" + re.escape(value) + r"(?![A-Za-z0-9])", re.IGNORECASE)


def find_phi(text: str, phi: set[str]) -> str | None:
    """The first identity value occurring in `text` as a whole token (case-insensitive), or None."""
    for value in phi:
        if _pattern(value).search(text):
            return value
    return None


def scrub(text: str, phi: set[str]) -> str:
    """Replace every identity value in `text` by '[removed]'."""
    for value in sorted(phi, key=len, reverse=True):
        text = _pattern(value).sub("[removed]", text)
    return text


def safe_stem(source_path: str, phi: set[str]) -> str:
    """A file-name part for ids: the sanitized source stem, or a short hash when the stem looks like a UID or
    contains an identity value of the file (DICOM files are often named after UIDs or patients)."""
    base = os.path.basename(source_path)
    for suffix in (".nii.gz", ".nii", ".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"):
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    stem = _SAFE_CHARS.sub("_", base).strip("._-")[:64]
    if not stem or _UID_LIKE.match(base) or find_phi(base, phi) or find_phi(stem, phi):
        return "file-" + hashlib.sha256(source_path.encode()).hexdigest()[:12]
    return stem


def safe_token(text: str) -> str:
    """Lower-case id token: letters, digits, '.', '_' and '-' only (no '#', the id separator)."""
    return _SAFE_CHARS.sub("_", str(text).strip().lower()).strip("_") or "none"
