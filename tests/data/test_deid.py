"""De-identification: no patient / study identity from a DICOM header reaches the converter's output.

The end-to-end test converts every DICOM file pydicom ships (plus a copy carrying made-up identity, named after
its patient, and a broken copy of it) and then looks for the identity values - collected here with pydicom
directly, not with the module under test - in every text file, log and file name under the output folder."""
import json
import os
import re
import shutil
import warnings

import pydicom
import pytest
from dicom_files import DICOM_DIR
from pydicom._uid_dict import UID_dictionary

from gmaivl_rt.data.build import build_dataset
from gmaivl_rt.data.deid import find_phi, phi_values, safe_stem, scrub

IDENTITY_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "StudyDate", "SeriesDate",
                     "AcquisitionDate", "ContentDate", "InstitutionName", "InstitutionAddress",
                     "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "AccessionNumber",
                     "StudyID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


def identity_values(path) -> set[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some test files are deliberately odd
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    found = set()
    for keyword in IDENTITY_KEYWORDS:
        value = ds.get(keyword)
        if value in (None, ""):
            continue
        for v in (value if isinstance(value, pydicom.multival.MultiValue) else [value]):
            texts = [str(v)]
            if isinstance(v, pydicom.valuerep.PersonName):
                texts += [v.family_name, v.given_name]
            for text in texts:
                text = text.strip()
                # long enough to be identifying (and not to match by chance inside a hex hash)
                if (any(c.isalpha() for c in text) and len(text) >= 4) or len(text) >= 8:
                    found.add(text)
    return found


def make_phi_rich_copy(folder):
    ds = pydicom.dcmread(os.path.join(DICOM_DIR, "MR_small.dcm"))
    ds.PatientName = "Quixote^Alonso^Quijano"
    ds.PatientID = "MRN-99887766"
    ds.PatientBirthDate = "19470321"
    ds.StudyDate = ds.SeriesDate = "20240229"
    ds.InstitutionName = "Hospital de la Mancha"
    ds.ReferringPhysicianName = "Carrasco^Sanson"
    ds.AccessionNumber = "ACC20240229X"
    ds.StudyDescription = "Quixote head follow-up"
    ds.BodyPartExamined = "HEAD"
    path = folder / "Quixote_Alonso_MRN-99887766.dcm"
    ds.save_as(path)
    data = path.read_bytes()
    (folder / "Quixote_Alonso_broken.dcm").write_bytes(data[: len(data) - 3000])


def test_phi_values_cover_identity_and_skip_standard_uids():
    ds = pydicom.dcmread(os.path.join(DICOM_DIR, "CT_small.dcm"))
    values = phi_values(ds)
    assert str(ds.PatientName) in values and ds.PatientID in values
    assert ds.StudyDate in values and ds.SOPInstanceUID in values and ds.StudyInstanceUID in values
    assert ds.file_meta.TransferSyntaxUID not in values  # standard UIDs identify nobody


def test_find_phi_matches_whole_tokens_case_insensitively():
    phi = {"Mid", "20240229", "Quixote"}
    assert find_phi("the middle slice", phi) is None
    assert find_phi("QUIXOTE_scan", phi) == "Quixote" and find_phi("date 20240229.", phi) == "20240229"
    assert scrub("Quixote_Alonso.dcm", {"Quixote", "Alonso"}) == "[removed]_[removed].dcm"


def test_safe_stem_hides_uid_and_patient_file_names():
    assert safe_stem("scans/CT_small.dcm", set()) == "CT_small"
    uid_name = "1.2.840.113619.2.30.1.1762295590.1623.978668949.886.dcm"
    assert safe_stem(uid_name, set()).startswith("file-")
    assert safe_stem("Quixote_Alonso_0001.dcm", {"Quixote^Alonso", "Quixote", "Alonso"}).startswith("file-")
    assert "#" not in safe_stem("a#b c.png", set())


@pytest.mark.slow
def test_no_identity_value_anywhere_in_the_output(tmp_path):
    src = tmp_path / "dicom"
    src.mkdir()
    for name in sorted(os.listdir(DICOM_DIR)):
        if name.endswith(".dcm"):
            shutil.copy(os.path.join(DICOM_DIR, name), src / name)
    make_phi_rich_copy(src)
    phi = set()
    for name in os.listdir(src):
        phi |= identity_values(src / name)
    assert {"Quixote^Alonso^Quijano", "MRN-99887766", "Hospital de la Mancha"} <= phi
    # Test files use placeholder names such as 'Lastname^First'; 'First' also occurs in standard transfer
    # syntax names ('First-Order Prediction') that error messages quote, so such words do not count.
    standard = " ".join(entry[0] for entry in UID_dictionary.values()).lower()
    phi = {v for v in phi if v.lower() not in standard}
    assert len(phi) > 50

    out = tmp_path / "out"
    summary = build_dataset(out, input_dir=src, progress=False)
    assert summary["records"] > 50 and summary["errors"] > 0  # SR / RT plan files etc. are not images
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    # the broken copy, named after its patient, is reported under a hashed name
    assert any(e["source"].startswith("file-") and "decode" in e["reason"] for e in errors)
    records = [json.loads(line) for line in (out / "annotations" / "dicom.jsonl").read_text().splitlines()]
    # the rich copy itself was converted (the only MRI of the head), under a hashed name
    rich = [r for r in records if "#mri#" in r["id"] and "head" in json.dumps(r)]
    assert rich and all(r["id"].split("#")[-1].startswith("file-") for r in rich)

    scanned = 0
    for path in out.rglob("*"):
        rel = str(path.relative_to(out)).lower()
        hits = [v for v in phi if v.lower() in rel]
        assert not hits, f"identity in a file name: {path.name}"
        if path.is_file() and path.suffix in (".json", ".jsonl", ".log"):
            text = path.read_text(encoding="utf-8").lower()
            hits = [v for v in phi if v.lower() in text]
            assert not hits, f"identity value(s) {hits} in {rel}"
            scanned += 1
    assert scanned >= 5  # annotations, errors, meta, summary, log (+ per-item work files)


# ------------------------------------------------------------------------------------ normalised matching
IDENTITY = {"PatientName": "Quixote^Alonso", "PatientID": "MRN-99887766", "PatientBirthDate": "19470321"}
# Every form the identity above takes once separators are gone (computed here, not by the module under test).
IDENTITY_FORMS = ("quixotealonso", "alonsoquixote", "19470321", "21031947", "mrn99887766")
# File and folder names built from that identity: concatenated, reordered, other separators, other date forms.
IDENTITY_NAMES = ("QuixoteAlonso19470321.dcm", "AlonsoQuixote.dcm", "quixote.alonso_1947-03-21.dcm",
                  "21.03.1947_QUIXOTE-ALONSO.dcm", "MRN99887766.dcm", "scan_19470321.dcm", "alonso quixote.dcm",
                  "Quixote^Alonso/scan.dcm", "1947-03-21/a.dcm", "ALONSO_QUIXOTE/sub/b.dcm", "mrn-99887766/c.dcm",
                  "21.03.1947/broken.dcm")


def _identity_dicom(path, broken=False):
    ds = pydicom.dcmread(os.path.join(DICOM_DIR, "MR_small.dcm"))
    for keyword, value in IDENTITY.items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    if broken:  # the header survives, the pixel data does not
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 3000])


def test_find_phi_sees_identity_in_concatenations_reorderings_and_date_forms():
    ds = pydicom.dcmread(os.path.join(DICOM_DIR, "MR_small.dcm"))
    for keyword, value in IDENTITY.items():
        setattr(ds, keyword, value)
    phi = phi_values(ds)
    for name in IDENTITY_NAMES:
        assert find_phi(name, phi, name=True), name
        assert safe_stem(name, phi).startswith("file-") or "/" in name, name
    for text in ("Patient QuixoteAlonso born 21.03.1947", "id mrn99887766", "ALONSO, QUIXOTE", "03/21/1947"):
        assert find_phi(text, phi), text
    assert find_phi("an axial MRI slice of the head at 1.2 mm", phi) is None
    ds = pydicom.Dataset()
    ds.PatientName = "Ng^Bo"
    short = phi_values(ds)
    for text in ("Bo Ng", "seen: BO-NG.", "ng^bo"):  # a short name matches whole words only, in either order
        assert find_phi(text, short), text
    assert find_phi("the bongo sound", short) is None and find_phi("scanBoNg2.dcm", short, name=True)


def test_identity_in_file_and_folder_names_never_reaches_the_output(tmp_path):
    src = tmp_path / "scans"
    for name in IDENTITY_NAMES:
        _identity_dicom(src / name, broken="broken" in name)
    out = tmp_path / "out"
    summary = build_dataset(out, input_dir=src, progress=False)
    assert summary["records"] >= len(IDENTITY_NAMES) - 1 and summary["errors"] == 1
    records = [json.loads(line) for line in (out / "annotations" / "scans.jsonl").read_text().splitlines()]
    stems = {r["id"].split("#")[-1] for r in records}  # only files in identity-named folders keep their name
    assert {s for s in stems if not s.startswith("file-")} == {"scan", "a", "b", "c"}
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert errors[0]["source"].startswith("dir-") and errors[0]["source"].endswith("/broken.dcm")
    checked = 0
    for path in out.rglob("*"):
        squeezed_name = re.sub(r"[\W_]+", "", str(path.relative_to(out)).casefold())
        assert not [f for f in IDENTITY_FORMS if f in squeezed_name], path
        if path.is_file() and path.suffix in (".json", ".jsonl", ".log"):
            squeezed = re.sub(r"[\W_]+", "", path.read_text(encoding="utf-8").casefold())
            assert not [f for f in IDENTITY_FORMS if f in squeezed], path
            checked += 1
    assert checked >= 5
