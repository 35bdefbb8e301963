"""De-identification guards for the converter.

The converter only ever reads whitelisted, non-identifying DICOM attributes (see medical.base.MedicalImage), so
identity should never get into its output in the first place. This module is the second line: it collects the
identity values a DICOM file carries (names, IDs, dates, times, institution, physicians, accession number, UIDs)
and checks every record, id, file name and error message against them before anything is written.

Matching is on normalised text (case folded, separators such as `^ _ - . space` removed), so an identity hides
neither in concatenations (`QuixoteAlonso19470321.dcm`) nor behind other separators. A name also matches with
its parts in any order, a date as YYYYMMDD, YYYY-MM-DD, DD.MM.YYYY or MM/DD/YYYY.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
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
_SEPARATORS = re.compile(r"[\W_]+")  # everything but letters and digits
_DATE = re.compile(r"(\d{4})(\d{2})(\d{2})")
# A form shorter than this matches only a whole word of free text (a surname 'Mid' must not hit 'middle');
# longer forms, and every form inside names (files, folders, ids), match anywhere.
_WORD_ONLY_BELOW = 6
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

    from gmaivl_rt.medical.dicom import quiet_pydicom

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

    from gmaivl_rt.medical.dicom import quiet_pydicom

    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:
        return set()
    return phi_values(ds)


def _significant(text: str) -> bool:
    return len(text) >= 3 and (any(c.isalpha() for c in text) or len(text) >= 6)


def normalise(text: str) -> str:
    """Case-folded text with every separator removed: 'Quixote^Alonso' and 'quixote-alonso' -> 'quixotealonso'."""
    return _SEPARATORS.sub("", str(text).casefold())


@functools.lru_cache(maxsize=4096)
def identity_forms(value: str) -> frozenset[str]:
    """The normalised forms one identity value can take in text: itself; a person name's parts concatenated in
    any order (two of them, or all, up to three); a date as YYYYMMDD, DDMMYYYY and MMDDYYYY. Forms too short to
    identify anyone are dropped."""
    forms = {normalise(value)}
    if "^" in value or "=" in value:  # DICOM PN: family^given^middle^prefix^suffix, '=' between representations
        for group in value.split("="):
            parts = [normalise(p) for p in group.split("^") if normalise(p)][:3]
            for size in {2, len(parts)}:
                forms.update("".join(order) for order in itertools.permutations(parts, size))
    for digits in (forms.copy()):
        date = _DATE.match(digits)
        if date and 1 <= int(date[2]) <= 12 and 1 <= int(date[3]) <= 31:
            year, month, day = date.groups()
            forms.update({year + month + day, day + month + year, month + day + year})
    return frozenset(f for f in forms if _significant(f))


def _pattern(value: str) -> re.Pattern:
    # Whole-token match: a surname 'Mid' must not hit 'middle', a time '120000' must not hit '1200001'.
    return re.compile(r"(?<![A-Za-z0-9])" + re.escape(value) + r"(?![A-Za-z0-9])", re.IGNORECASE)


def find_phi(text: str, phi: set[str], *, name: bool = False) -> str | None:
    """The first identity value (by `identity_forms`) found in `text`, or None. name=True for file and folder
    names and ids: every form matches anywhere. In free text a form shorter than 6 characters must be a whole
    word (letters and digits between separators) or a run of up to three whole words."""
    if not phi:
        return None
    squeezed = normalise(text)
    words = None
    for value in sorted(phi):
        for form in identity_forms(value):
            if name or len(form) >= _WORD_ONLY_BELOW:
                if form in squeezed:
                    return value
            else:
                if words is None:  # each word, and runs of up to three ('Bo Ng' is the name 'Ng^Bo' too)
                    split = [w for w in _SEPARATORS.split(text.casefold()) if w]
                    words = {"".join(split[i:i + n]) for n in (1, 2, 3) for i in range(len(split))}
                if form in words:
                    return value
    return None


def scrub(text: str, phi: set[str]) -> str:
    """Replace every identity value in `text` by '[removed]': exact occurrences, then every whitespace- or
    slash-separated chunk that holds one in any form (e.g. a file name 'QuixoteAlonso1947.dcm')."""
    if not phi:
        return text
    for value in sorted(phi, key=len, reverse=True):
        text = _pattern(value).sub("[removed]", text)
    return re.sub(r"[^\s/\\]+", lambda m: "[removed]" if find_phi(m.group(), phi, name=True) else m.group(), text)


def safe_stem(source_path: str, phi: set[str]) -> str:
    """A file-name part for ids: the sanitized source stem, or a short hash when the stem looks like a UID or
    contains an identity value of the file (DICOM files are often named after UIDs or patients)."""
    base = os.path.basename(source_path)
    for suffix in (".nii.gz", ".nii", ".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"):
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    stem = _SAFE_CHARS.sub("_", base).strip("._-")[:64]
    if not stem or _UID_LIKE.match(base) or find_phi(base, phi, name=True):
        return "file-" + _short_hash(source_path)
    return stem


def safe_path(relative_path: str, phi: set[str]) -> str:
    """A source path as reports show it: every folder or file name holding an identity value (in any form) is
    replaced by a short hash of it ('dir-1a2b3c4d5e6f/scan.dcm'); the others stay readable."""
    parts = str(relative_path).replace("\\", "/").split("/")
    return "/".join(("dir-" if i < len(parts) - 1 else "file-") + _short_hash(part)
                    if part and find_phi(part, phi, name=True) else part for i, part in enumerate(parts))


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def safe_token(text: str) -> str:
    """Lower-case id token: letters, digits, '.', '_' and '-' only (no '#', the id separator)."""
    return _SAFE_CHARS.sub("_", str(text).strip().lower()).strip("_") or "none"
