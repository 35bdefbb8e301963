"""The answer report (a Comprehensive SR built with highdicom), read back by pydicom and by highdicom's own SR
reader, and checked by dicom3tools' `dciodvfy` where Debian's dicom3tools is installed: SOP class, evidence,
question and answer text, the IHE AIR fields, and nothing of the source header beyond the Patient and Study
modules."""
from __future__ import annotations

import io
import shutil
import subprocess

import pydicom
import pytest

pytest.importorskip("highdicom", reason="the [hospital] extra (highdicom) is not installed")

from orthanc import ct_volume, read_shipped  # noqa: E402

from gmaivl_rt import InputError  # noqa: E402
from gmaivl_rt.medical.structured_report import (SERIES_DESCRIPTION, Algorithm, answer_report,  # noqa: E402
                                                 report_bytes)

ALGORITHM = Algorithm(name="tiny-vlm", version="sha256:0123456789abcdef", weights_sha256="ab" * 32,
                      software_version="gmaivl-rt 0.1.0")
QUESTION, ANSWER = "Which plane does this image show?", "An axial CT slice of the abdomen."
# Patient, General Study and Patient Study modules (PS3.3 C.7.1.1, C.7.2.1, C.7.2.2): the source attributes a
# report filed in the study carries; and the attributes every object has whatever its source (UIDs, dates made here).
PATIENT_AND_STUDY = {
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "OtherPatientIDsSequence", "PatientAge",
    "PatientWeight", "PatientSize", "AdditionalPatientHistory", "StudyInstanceUID", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription"}
MADE_HERE = {"SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "SeriesNumber", "InstanceNumber", "Modality",
             "Manufacturer", "ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime",
             "SeriesDescription"}


def read_back(report) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(report_bytes(report)))


def text_items(ds) -> dict:
    """(scheme, code) -> TEXT value, over the whole content tree."""
    found = {}

    def walk(items):
        for item in items:
            if item.ValueType == "TEXT":
                code = item.ConceptNameCodeSequence[0]
                found[(code.CodingSchemeDesignator, code.CodeValue)] = item.TextValue
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return found


def test_report_carries_question_answer_evidence_and_the_air_fields():
    """pydicom reads back: Comprehensive SR, UNVERIFIED, COMPLETE, the not-for-diagnostic series description,
    Contributing Equipment with the model's name, versions, weights SHA-256, a Device UID and Processing Equipment;
    the question (DCM 121062) and answer (DCM 121071) text; evidence and IMAGE references naming every source
    instance. Mutants seen failing: is_verified=True (VERIFIED), the Finding's IMAGE children dropped."""
    sources = ct_volume(3)
    ds = read_back(answer_report(sources, QUESTION, ANSWER, ALGORITHM))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR Storage
    assert (ds.VerificationFlag, ds.CompletionFlag, ds.Modality) == ("UNVERIFIED", "COMPLETE", "SR")
    assert ds.SeriesDescription == SERIES_DESCRIPTION and "not for diagnostic use" in ds.SeriesDescription
    assert ds.StudyInstanceUID == sources[0].StudyInstanceUID and ds.SeriesInstanceUID != sources[0].SeriesInstanceUID
    ours = [e for e in ds.ContributingEquipmentSequence if e.Manufacturer == "gmaivl-rt"]
    assert len(ours) == 1
    equipment = ours[0]
    assert equipment.ManufacturerModelName == "tiny-vlm"
    assert list(equipment.SoftwareVersions) == ["gmaivl-rt 0.1.0", "sha256:0123456789abcdef", "ab" * 32]
    assert equipment.DeviceUID == ALGORITHM.device_uid() and pydicom.uid.UID(equipment.DeviceUID).is_valid
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    texts = text_items(ds)
    assert texts[("DCM", "121062")] == QUESTION and texts[("DCM", "121071")] == ANSWER
    assert texts[("DCM", "111001")] == "tiny-vlm" and "ab" * 32 in texts[("DCM", "111002")]
    evidence = {ref.ReferencedSOPInstanceUID for study in ds.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert evidence == {s.SOPInstanceUID for s in sources}
    finding = next(item for item in ds.ContentSequence if item.ValueType == "TEXT"
                   and item.ConceptNameCodeSequence[0].CodeValue == "121071")
    images = [c.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for c in finding.ContentSequence]
    assert images == [s.SOPInstanceUID for s in sources]
    assert {c.RelationshipType for c in finding.ContentSequence} == {"INFERRED FROM"}


def test_highdicom_reads_it_back_as_the_same_document():
    """highdicom's SR reader (its own structural checks) gives back the text and references."""
    import highdicom as hd

    sources = [read_shipped("CT_small.dcm")]
    report = hd.sr.srread(io.BytesIO(report_bytes(answer_report(sources, QUESTION, ANSWER, ALGORITHM))))
    assert isinstance(report, hd.sr.ComprehensiveSR)
    root = report.content[0]
    texts = [item.value for item in root.ContentSequence if item.value_type == hd.sr.ValueTypeValues.TEXT]
    assert QUESTION in texts and ANSWER in texts
    assert report.get_evidence()[0][0] == sources[0].StudyInstanceUID


def test_nothing_of_the_source_header_beyond_patient_and_study():
    """Every top-level attribute the report shares with the source belongs to the Patient / Study modules or is
    one the report makes itself, and no other source text value (manufacturer, institution, station, model,
    descriptions) occurs anywhere in the file. Mutant seen failing: highdicom's acquisition-equipment item kept
    (it copies the source's institution and station name)."""
    source = read_shipped("CT_small.dcm")
    report = answer_report([source], QUESTION, ANSWER, ALGORITHM)
    ds = read_back(report)
    shared = {e.keyword for e in ds if e.keyword in {s.keyword for s in source}}
    assert shared <= PATIENT_AND_STUDY | MADE_HERE, shared - PATIENT_AND_STUDY - MADE_HERE
    for keyword in PATIENT_AND_STUDY & {e.keyword for e in source}:
        assert ds.get(keyword) == source.get(keyword), keyword  # copied as the source has it
    data = report_bytes(report)
    for element in source:
        if element.keyword in PATIENT_AND_STUDY or element.VR not in ("LO", "SH", "ST", "LT", "UT", "PN"):
            continue
        value = str(element.value).strip()
        if len(value) >= 4:
            assert value.encode() not in data, element.keyword


def test_dciodvfy_finds_no_error(tmp_path):
    """dicom3tools' validator on the written file: no line says Error (warnings are printed for the source's
    zero PatientWeight and for Device UID in the Contributing Equipment item, which this dicom3tools' tables
    predate)."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian's dicom3tools) is not installed")
    path = tmp_path / "report.dcm"
    path.write_bytes(report_bytes(answer_report(ct_volume(2), QUESTION, ANSWER, ALGORITHM)))
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    out = run.stdout + run.stderr
    assert "ComprehensiveSR" in out
    assert not [line for line in out.splitlines() if line.startswith("Error")], out


def test_any_answer_text_survives_the_file():
    """Answers in any script are kept exactly (the report is UTF-8 whatever the source's Latin-1 says), the patient
    name keeps its characters; control characters DICOM text cannot hold become U+FFFD. Mutant seen failing:
    SpecificCharacterSet left as the source's ISO_IR 100 (the CJK and the replacement characters read back as
    '?')."""
    source = read_shipped("CT_small.dcm")
    answer = "Kein Befund \u00e9\u00fc \u80ba \ufffd, line\nbreak \x17 end"
    ds = read_back(answer_report([source], QUESTION, answer, ALGORITHM))
    assert text_items(ds)[("DCM", "121071")] == answer.replace("\x17", "\ufffd")
    assert ds.PatientName == source.PatientName and ds.SpecificCharacterSet == "ISO_IR 192"


def test_refuses_what_dicom_cannot_hold():
    """Sources of two studies, no sources, a name over LO's 64 characters, a digest that is not 64 hex digits."""
    one, other = read_shipped("CT_small.dcm"), read_shipped("MR_small.dcm")
    with pytest.raises(InputError, match="more than one study"):
        answer_report([one, other], QUESTION, ANSWER, ALGORITHM)
    with pytest.raises(InputError, match="no source instances"):
        answer_report([], QUESTION, ANSWER, ALGORITHM)
    for bad in (Algorithm("x" * 65, "1", "ab" * 32, "gmaivl-rt 0.1.0"), Algorithm("x", "1", "AB" * 32, "g")):
        with pytest.raises(InputError, match="structured report"):
            answer_report([one], QUESTION, ANSWER, bad)


def findings_answers() -> list[dict]:
    """Answers valid under examples/findings.schema.json that between them use every value of every field."""
    import json
    from pathlib import Path

    import jsonschema

    schema = json.loads((Path(__file__).parents[2] / "examples" / "findings.schema.json").read_text())
    props = schema["properties"]
    enums = [props["modality"]["enum"], props["plane"]["enum"], props["body_part"]["enum"],
             props["lesion"]["properties"]["side"]["enum"], [True, False], [0, 7, 500]]
    count = max(len(values) for values in enums)
    answers = [{"modality": m, "plane": p, "body_part": b,
                "lesion": {"present": present, "side": side, "size_mm": size}}
               for m, p, b, side, present, size in (
                   [values[(k + i) % len(values)] for i, values in enumerate(enums)] for k in range(count))]
    for values, taken in zip(enums, zip(*[(a["modality"], a["plane"], a["body_part"], a["lesion"]["side"],
                                          a["lesion"]["present"], a["lesion"]["size_mm"]) for a in answers])):
        assert set(values) <= set(taken)  # every value used at least once
    for answer in answers:
        jsonschema.validate(answer, schema)
    return answers, schema


def test_coded_findings_read_back_equal_the_json_answer():
    """Answers under the findings schema that between them use every value of every field: pydicom reads the
    report's CODE / NUM items back (decoded with pydicom's own code dictionary, tests/support/sr_findings.py) and
    they equal the answer's codable fields; the text finding still holds the JSON. Mutants seen failing: left and
    right swapped in FINDING_CODES; laterality as HAS PROPERTIES instead of HAS CONCEPT MOD; the diameter coded for
    an absent lesion; True/False presence swapped."""
    import json

    from sr_findings import codable, findings_from_report

    answers, _ = findings_answers()
    source = read_shipped("CT_small.dcm")
    for answer in answers:
        text = json.dumps(answer, separators=(",", ":"))
        ds = read_back(answer_report([source], QUESTION, text, ALGORITHM, findings=answer))
        assert findings_from_report(ds) == codable(answer), answer
        assert text_items(ds)[("DCM", "121071")] == text
    plain = read_back(answer_report([source], QUESTION, json.dumps(answers[0]), ALGORITHM))
    assert findings_from_report(plain) == {} and not [i for i in plain.ContentSequence if i.ValueType == "CODE"]


def test_every_findings_value_is_coded_from_its_context_group_or_named_uncoded():
    """Each value of the findings schema is either coded (with the code pydicom's dictionary gives it, a member of
    the DICOM context group the mapping names, per pydicom's CID tables) or in the documented no-code set, and the
    table codes nothing the schema does not have."""
    from pydicom.sr import _cid_dict
    from pydicom.sr.codedict import codes
    from sr_findings import UNCODED, VALUES

    from gmaivl_rt.medical.structured_report import FINDING_CODES

    _, schema = findings_answers()
    props = schema["properties"]
    enums = {"modality": props["modality"]["enum"], "plane": props["plane"]["enum"],
             "body_part": props["body_part"]["enum"], "lesion.side": props["lesion"]["properties"]["side"]["enum"],
             "lesion.present": [True, False]}
    assert set(FINDING_CODES) == set(enums)
    for field, values in enums.items():
        table, cid = VALUES[field]
        assert set(table) | UNCODED.get(field, set()) == set(values) and not set(table) & UNCODED.get(field, set())
        for value, code in table.items():
            assert FINDING_CODES[field][value][:2] == (code.scheme_designator, code.value), (field, value)
            members = {(scheme, getattr(getattr(codes, scheme), keyword).value)
                       for scheme, keywords in _cid_dict.cid_concepts[cid].items() for keyword in keywords}
            assert (code.scheme_designator, code.value) in members, (field, value, cid)


def test_dciodvfy_finds_no_error_with_coded_findings(tmp_path):
    """dciodvfy on a report with every kind of coded item (modality, plane, region, a present lesion with side and
    diameter): no line says Error."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian's dicom3tools) is not installed")
    findings = {"modality": "MR", "plane": "coronal", "body_part": "head",
                "lesion": {"present": True, "side": "left", "size_mm": 14}}
    path = tmp_path / "coded.dcm"
    path.write_bytes(report_bytes(answer_report(ct_volume(2), QUESTION, "{}", ALGORITHM, findings=findings)))
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    out = run.stdout + run.stderr
    assert "ComprehensiveSR" in out
    assert not [line for line in out.splitlines() if line.startswith("Error")], out
