"""A model's answer about archive images as a DICOM Comprehensive SR, built with highdicom (the `[hospital]` extra)
the way IHE Radiology's AI Results profile (AIR) asks AI results to go back into a study.

Content tree (root: LN 18748-4 "Diagnostic Imaging Report"):
* HAS OBS CONTEXT: DCM 111001 "Algorithm Name", DCM 111003 "Algorithm Version", DCM 111002 "Algorithm Parameters"
  (the weights' SHA-256): TID 4019 Algorithm Identification;
* CONTAINS TEXT DCM 121062 "Request": the question, as asked;
* CONTAINS TEXT DCM 121071 "Finding": the model's answer, INFERRED FROM one IMAGE item (DCM 121112 "Source of
  Measurement") per source instance the answer was made from;
* with `findings` (an answer made under the findings JSON schema, examples/findings.schema.json), CONTAINS CODE
  items for its fields that have a standard code (`FINDING_CODES`, `coded_findings`; docs/hospital.md has the
  table): DCM 121139 "Modality", DCM 123014 "Target Region", DCM 113764 "Acquisition Plane", and DCM 121071
  "Finding" = SCT 52988006 "Lesion" with HAS PROPERTIES DCM 121052 "Presence of property" (SCT Present / Absent),
  HAS CONCEPT MOD SCT 272741003 "Laterality" and, for a present lesion, HAS PROPERTIES NUM SCT 81827009
  "Diameter" in mm.

Text: UTF-8 (Specific Character Set ISO_IR 192), control characters DICOM text cannot hold replaced (`dicom_text`).
Header: the source's Patient and Study modules (highdicom copies them from the evidence, as an object filed in the
study must carry them) and nothing else of the source header; Current Requested Procedure Evidence Sequence lists
the source instances; `VerificationFlag` UNVERIFIED, `CompletionFlag` COMPLETE; a new series whose description says
it is AI output not for diagnostic use; Contributing Equipment (0018,A001): Manufacturer "gmaivl-rt", the model's
name as Manufacturer's Model Name, Software Versions (gmaivl-rt's version, the model's version, the weights'
SHA-256), a Device UID derived from the weights' SHA-256 and purpose of reference DCM 109102 "Processing
Equipment" (highdicom adds its own item after it; the item highdicom would copy from the source's acquisition
equipment is left out).
"""
from __future__ import annotations

from dataclasses import dataclass

from gmaivl_rt.errors import InputError

MANUFACTURER = "gmaivl-rt"
SERIES_DESCRIPTION = "CAUTION: AI output (gmaivl-rt), not for diagnostic use"  # LO: at most 64 characters
SERIES_NUMBER = 9901  # a high number, out of the way of the modality's series
UID_ROOT_ENTROPY = "gmaivl-rt model device"


@dataclass(frozen=True)
class Algorithm:
    """Who made the answer: the model's name and version and the SHA-256 of its weights (hex, 64 characters), and
    the version of gmaivl-rt that ran it."""

    name: str
    version: str
    weights_sha256: str
    software_version: str

    def device_uid(self) -> str:
        """A DICOM UID that is the same for the same weights (derived from their SHA-256)."""
        from pydicom.uid import generate_uid

        return generate_uid(entropy_srcs=[UID_ROOT_ENTROPY, self.weights_sha256])


def _check_text(value: str, role: str, limit: int = 64) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > limit or "\\" in value:
        raise InputError(f"structured report: {role} must be 1 to {limit} characters without a backslash")
    return value


# C0 control characters DICOM text (UT) may not hold: all but TAB, LF, FF, CR (and ESC, for ISO 2022 only).
_CONTROL = {code: "\ufffd" for code in range(32) if code not in (9, 10, 12, 13)}


def dicom_text(text: str) -> str:
    """Text as a report holds it: characters DICOM's text repertoire excludes (C0 controls other than TAB, LF, FF,
    CR; DEL) become U+FFFD; everything else is kept (the report is UTF-8, ISO_IR 192)."""
    return text.translate({**_CONTROL, 127: "\ufffd"})


# The findings schema's values -> (scheme, code value, meaning) of the standard code, per field. Values left out have
# no single standard code and stay in the answer text only: "XR" (DICOM codes a radiograph by how it was taken: CR,
# DX, RG), "other", "not applicable", a lesion side "none".
FINDING_CODES = {
    "modality": {  # CID 29 Acquisition Modality
        "CT": ("DCM", "CT", "Computed Tomography"), "MR": ("DCM", "MR", "Magnetic Resonance"),
        "US": ("DCM", "US", "Ultrasound"), "PT": ("DCM", "PT", "Positron emission tomography"),
        "NM": ("DCM", "NM", "Nuclear Medicine")},
    "plane": {  # CID 6312 Cross-sectional Scan Plane Orientation
        "axial": ("SCT", "24422004", "Axial"), "coronal": ("SCT", "81654009", "Coronal"),
        "sagittal": ("SCT", "30730003", "Sagittal"), "oblique": ("SCT", "21114003", "Oblique")},
    "body_part": {  # CID 4031 Common Anatomic Regions
        "head": ("SCT", "69536005", "Head"), "neck": ("SCT", "45048000", "Neck"),
        "chest": ("SCT", "816094009", "Chest"), "abdomen": ("SCT", "818981001", "Abdomen"),
        "pelvis": ("SCT", "816092008", "Pelvis"), "spine": ("SCT", "421060004", "Spine"),
        "extremity": ("SCT", "66019005", "Extremity")},
    "lesion.present": {  # CID 241 Present-Absent Only
        True: ("SCT", "52101004", "Present"), False: ("SCT", "272519000", "Absent")},
    "lesion.side": {  # CID 245 Laterality with Median
        "left": ("SCT", "7771000", "Left"), "right": ("SCT", "24028007", "Right"),
        "bilateral": ("SCT", "51440002", "Bilateral"), "midline": ("DCM", "130290", "Median")},
}
# The concept each field is the value of.
FINDING_CONCEPTS = {
    "modality": ("DCM", "121139", "Modality"), "plane": ("DCM", "113764", "Acquisition Plane"),
    "body_part": ("DCM", "123014", "Target Region"), "lesion": ("DCM", "121071", "Finding"),
    "lesion.present": ("DCM", "121052", "Presence of property"), "lesion.side": ("SCT", "272741003", "Laterality"),
    "lesion.size_mm": ("SCT", "81827009", "Diameter")}
LESION = ("SCT", "52988006", "Lesion")


def _code(triple):
    from highdicom.sr import CodedConcept

    scheme, value, meaning = triple
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _coded(findings: dict, field: str):
    """The code of `findings`' value at the dotted `field`, or None (absent, not a value the table has)."""
    value = findings
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    table = FINDING_CODES[field]
    if isinstance(value, bool) != isinstance(next(iter(table)), bool):
        return None  # JSON true is not the string "true", nor 1
    try:
        return table.get(value)
    except TypeError:  # a list or object where a value should be
        return None


def coded_findings(findings: dict) -> list:
    """An answer made under the findings JSON schema (its parsed object) -> the CONTAINS content items coding what
    has a standard code (`FINDING_CODES`): Modality, Acquisition Plane, Target Region as CODE items; the lesion as
    Finding = Lesion with its presence, laterality and (when present) its diameter in mm. Fields without a code
    (or not in the answer) give no item; [] when none has one."""
    from highdicom.sr import CodeContentItem, NumContentItem, RelationshipTypeValues

    contains = RelationshipTypeValues.CONTAINS
    items = []
    for field in ("modality", "plane", "body_part"):
        if (code := _coded(findings, field)) is not None:
            items.append(CodeContentItem(name=_code(FINDING_CONCEPTS[field]), value=_code(code),
                                         relationship_type=contains))
    presence = _coded(findings, "lesion.present")
    if presence is None:
        return items
    lesion = CodeContentItem(name=_code(FINDING_CONCEPTS["lesion"]), value=_code(LESION), relationship_type=contains)
    details = [CodeContentItem(name=_code(FINDING_CONCEPTS["lesion.present"]), value=_code(presence),
                               relationship_type=RelationshipTypeValues.HAS_PROPERTIES)]
    if (side := _coded(findings, "lesion.side")) is not None:
        details.append(CodeContentItem(name=_code(FINDING_CONCEPTS["lesion.side"]), value=_code(side),
                                       relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD))
    size = findings["lesion"].get("size_mm")
    if findings["lesion"]["present"] is True and isinstance(size, int) and not isinstance(size, bool) and size >= 0:
        details.append(NumContentItem(name=_code(FINDING_CONCEPTS["lesion.size_mm"]), value=size,
                                      unit=_code(("UCUM", "mm", "millimeter")),
                                      relationship_type=RelationshipTypeValues.HAS_PROPERTIES))
    lesion.ContentSequence = details
    return [*items, lesion]


def answer_report(sources: list, question: str, answer: str, algorithm: Algorithm, findings: dict | None = None):
    """sources: the pydicom Datasets the answer was made from (one study); question / answer: text; findings: the
    answer's parsed JSON object when it was made under the findings JSON schema (its coded items are added,
    `coded_findings`). Returns the highdicom `ComprehensiveSR` (a pydicom Dataset). Raises InputError for sources of
    several studies or none, and for algorithm fields DICOM cannot hold (LO: 64 characters)."""
    import highdicom as hd
    from highdicom.sr import (CodedConcept, ComprehensiveSR, ContainerContentItem, ImageContentItem,
                              RelationshipTypeValues, TextContentItem)
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from gmaivl_rt.medical.dicom import quiet_pydicom
    from gmaivl_rt.medical.dicomweb import quiet_archive

    if not sources:
        raise InputError("structured report: no source instances to reference")
    if len({str(ds.StudyInstanceUID) for ds in sources}) != 1:
        raise InputError("structured report: the source instances belong to more than one study")
    for role in ("name", "version", "software_version"):
        _check_text(getattr(algorithm, role), f"the algorithm's {role.replace('_', ' ')}")
    if len(algorithm.weights_sha256) != 64 or any(c not in "0123456789abcdef" for c in algorithm.weights_sha256):
        raise InputError("structured report: the weights' SHA-256 must be 64 lower-case hex digits")
    contains, context = RelationshipTypeValues.CONTAINS, RelationshipTypeValues.HAS_OBS_CONTEXT
    with quiet_pydicom(), quiet_archive():
        evidence = [ImageContentItem(name=codes.DCM.SourceOfMeasurement,
                                     referenced_sop_class_uid=ds.SOPClassUID,
                                     referenced_sop_instance_uid=ds.SOPInstanceUID,
                                     relationship_type=RelationshipTypeValues.INFERRED_FROM) for ds in sources]
        finding = TextContentItem(name=codes.DCM.Finding, value=dicom_text(answer), relationship_type=contains)
        finding.ContentSequence = evidence
        items = [
            TextContentItem(name=codes.DCM.AlgorithmName, value=algorithm.name, relationship_type=context),
            TextContentItem(name=codes.DCM.AlgorithmVersion, value=algorithm.version, relationship_type=context),
            TextContentItem(name=codes.DCM.AlgorithmParameters, value=f"weights SHA-256 {algorithm.weights_sha256}",
                            relationship_type=context),
            TextContentItem(name=codes.DCM.Request, value=dicom_text(question), relationship_type=contains),
            finding,
            *(coded_findings(findings) if isinstance(findings, dict) else []),
        ]
        root = ContainerContentItem(name=CodedConcept("18748-4", "LN", "Diagnostic Imaging Report"))
        root.ContentSequence = items
        equipment = hd.ContributingEquipment(
            manufacturer=MANUFACTURER, purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=algorithm.name,
            software_versions=[algorithm.software_version, algorithm.version, algorithm.weights_sha256],
            contribution_description="AI model answer to a question about the referenced images")
        equipment.DeviceUID = algorithm.device_uid()
        report = ComprehensiveSR(
            evidence=sources, content=root, series_instance_uid=generate_uid(), series_number=SERIES_NUMBER,
            sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
            is_final=False, is_verified=False, series_description=SERIES_DESCRIPTION,
            contributing_equipment=[equipment])
        # A model's answer may hold any character: UTF-8, whatever the source's character set (the patient's
        # values keep their characters, re-encoded).
        report.SpecificCharacterSet = "ISO_IR 192"
        # highdicom also lists the source's acquisition equipment (its manufacturer, institution, station name):
        # source header values this report does not carry.
        report.ContributingEquipmentSequence = [
            item for item in report.ContributingEquipmentSequence
            if item.PurposeOfReferenceCodeSequence[0].CodeValue != codes.DCM.AcquisitionEquipment.value]
    return report


def report_bytes(report) -> bytes:
    """The report as a DICOM Part 10 file's bytes (preamble, file meta, Explicit VR Little Endian)."""
    import io

    from gmaivl_rt.medical.dicom import quiet_pydicom

    buffer = io.BytesIO()
    with quiet_pydicom():
        report.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
