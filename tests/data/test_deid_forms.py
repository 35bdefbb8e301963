"""gmaivl_rt.data.deid's matching rules, one function at a time on hand-made values (fast: no files): the survivors
of `make mutate` on deid.py (docs/mutation/mutation-report.md), each test naming the mutants it kills. The end-to-end
guarantees (no identity value in any output of a real conversion) are tests/data/test_deid.py's."""
import hashlib

import pydicom
import pytest
from pydicom.dataset import Dataset

from gmaivl_rt.data.deid import find_phi, identity_forms, phi_values, phi_values_of_file, safe_path, safe_stem, scrub


def test_placeholder_values_are_not_identities():
    """'ANONYMOUS', 'Unknown' and 'N/A' are placeholders, not someone's identity: they would match everywhere
    (mutant: `not in _NON_IDENTIFYING_VALUES and _significant` -> `or`)."""
    ds = Dataset()
    ds.PatientName = "ANONYMOUS"
    ds.OperatorsName = "Unknown"
    ds.InstitutionName = "N/A"
    ds.PatientID = "QX-4417"
    assert phi_values(ds) == {"QX-4417"}


def test_a_six_digit_time_identifies_five_digits_do_not():
    """Values without letters count from 6 characters (a DICOM time has 6), shorter ones would match everywhere
    (mutant: `len(text) >= 6` -> `> 6`)."""
    ds = Dataset()
    ds.PatientBirthTime = "093015"
    ds.PatientID = "12345"
    assert phi_values(ds) == {"093015"}


def test_a_file_without_the_dicom_preamble_is_still_read(tmp_path):
    """A bare dataset (no preamble, no file meta: pydicom refuses it unless forced) still has its identity
    values collected (mutant: `force=False`, which gives an empty set)."""
    ds = Dataset()
    ds.PatientID = "QX-4417"
    ds.PatientName = "Quixote^Alonso"
    path = tmp_path / "bare.dcm"
    ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(path)
    assert phi_values_of_file(path) == {"QX-4417", "Quixote^Alonso", "Quixote", "Alonso"}


def test_dates_take_every_valid_day_and_month():
    """A date of the 1st, the 31st or in December is also matched as DDMMYYYY and MMDDYYYY; month 13 is no date
    (mutants: `1 <= day` -> `1 < day` / `2 <= day`, `day <= 31` -> `day != 31`, `month <= 12` -> `<= 11`,
    `1 <= month` -> `1 is not month`)."""
    for date, day_first, month_first in (("19470301", "01031947", "03011947"), ("19470131", "31011947", "01311947"),
                                         ("19471205", "05121947", "12051947"), ("19470115", "15011947", "01151947")):
        assert {date, day_first, month_first} <= identity_forms(date), date
    assert identity_forms("19471305") == {"19471305"}


def test_a_short_name_part_matches_as_one_whole_word():
    """A form under 6 characters matches a whole word of free text, or a run of two or three words, and not inside
    another word; from 6 characters a form matches anywhere (mutants: runs `(1, 2, 3)` -> `(2, 2, 3)` or
    `(1, 2, 4)`, `_WORD_ONLY_BELOW` 6 -> 7)."""
    assert find_phi("seen by Roe today", {"Roe"}) == "Roe"
    assert find_phi("seen by Ann Roe today", {"Roe^Ann"}) == "Roe^Ann"
    assert find_phi("sent to Le Bo A ward", {"Le Bo A"}) == "Le Bo A"
    assert find_phi("a roebuck was seen", {"Roe"}) is None
    assert find_phi("the xalonsox file", {"Alonso"}) == "Alonso"


def test_scrub_removes_a_name_inside_a_file_name():
    """A chunk holding an identity in any form is removed even when the identity is not a whole word of it
    (file names: 'RoeScan.dcm'), while other chunks stay (mutant: the chunk pass with `name=False`)."""
    assert scrub("wrote RoeScan.dcm and notes.txt", {"Roe"}) == "wrote [removed] and notes.txt"


def test_hashed_names_are_12_hex_digits_of_the_sha256():
    """Folders and files named after a patient show as 'dir-' / 'file-' + the first 12 hex digits of the name's
    SHA-256, as documented (mutants: 11 or 13 digits)."""
    phi = {"Quixote^Alonso"}
    want = "dir-" + hashlib.sha256(b"Quixote^Alonso").hexdigest()[:12] + "/scan.dcm"
    assert safe_path("Quixote^Alonso/scan.dcm", phi) == want


def test_a_long_stem_keeps_64_characters():
    """A readable stem is cut to 64 characters (mutant: 63)."""
    assert safe_stem("scan_" + "a" * 80 + ".dcm", set()) == ("scan_" + "a" * 80)[:64]


def test_phi_values_walk_sequences_multivalues_and_file_meta_and_nothing_else():
    """The exact identity set of a header holding a name two sequences deep, a multi-valued name element, an
    address with spaces, a private UL number and a non-standard UID in the file meta (mutants: sequences not
    walked (`for item in []`, `elem.value and ()`), MultiValue not iterated (`__name__ < / <=
    "MultiValue"`, `isinstance(...) or` -> `and`), name components added for other VRs (`VR >= "PN"`), numbers
    taken as UIDs (`VR >= "UI"`), file meta skipped (`is not None` negated)). Not killable in CPython: `VR is
    "SQ"` / `"PN"` and `__name__ is "MultiValue"` (pydicom's VRs and class names are the same interned strings)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.sequence import Sequence

    inner = Dataset()
    inner.PersonName = "Quinlan^Rosalind"
    outer = Dataset()
    outer.ContentSequence = Sequence([inner])
    ds = Dataset()
    ds.ContentSequence = Sequence([outer])
    ds.OtherPatientNames = ["Vantongeren^Maximilian", "Okonkwo^Adaeze"]
    ds.PatientAddress = "221 Baker Street"
    ds.StationName = "Suite West 3"  # SH: a whole value, not split into words as names are
    ds.add_new(0x00091001, "UL", 12345678)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPInstanceUID = "2.25.99887766554433"
    assert phi_values(ds) == {
        "Quinlan^Rosalind", "Quinlan", "Rosalind",
        "Vantongeren^Maximilian", "Vantongeren", "Maximilian", "Okonkwo^Adaeze", "Okonkwo", "Adaeze",
        "221 Baker Street", "Suite West 3", "2.25.99887766554433"}


def test_identity_forms_of_names_and_dates_exactly():
    """Name parts: every order of two of the first three parts and of all of them; dates: only valid ones get their
    other orders (mutants: parts `[:3]` -> `[:4]` / `[:2]`, sizes `{2, len}` -> `{1, len}`, month `1 <=` -> `0 <=`,
    day `<= 31` -> `<= 32`, day `1 <=` -> `0 <=`, the day read from the month's group)."""
    import itertools

    parts = ["doe", "john", "paul"]
    expected = {"doejohnpauljr"} | {"".join(p) for n in (2, 3) for p in itertools.permutations(parts, n)}
    assert identity_forms("Doe^John^Paul^Jr") == expected
    assert identity_forms("19471225") == {"19471225", "25121947", "12251947"}
    for invalid in ("19470013", "19470132", "19470540", "19470500"):  # month 00, day 32, day 40 (month 05), day 00
        assert identity_forms(invalid) == {invalid}


def test_free_text_matching_rules():
    """Forms of 6+ characters match inside longer tokens, shorter ones only as whole words or runs of two or three
    words; two-character values identify nobody (mutants: `len(form) >= _WORD_ONLY_BELOW` -> `==`,
    `_WORD_ONLY_BELOW` 6 -> 5, word runs `(1, 2, 3)` -> `(1, 1, 3)`, `len(text) >= 3` -> `>= 2`)."""
    assert find_phi("seen: QuixoteAlonso1947", {"Quixote^Alonso"}) == "Quixote^Alonso"
    assert find_phi("blacksmithing at noon", {"Smith"}) is None
    assert find_phi("Smith at noon", {"Smith"}) == "Smith"
    assert find_phi("Bo Ng came in", {"Ng^Bo"}) == "Ng^Bo"
    ds = Dataset()
    ds.PatientName = "Ng^Bo"
    assert phi_values(ds) == {"Ng^Bo"}


def test_file_names_match_identity_anywhere_and_scrub_takes_the_longest_value_first():
    """In file and folder names a short identity matches inside a token ('scanlee01'); scrub replaces longer
    values before their parts, so no remainder of a hyphenated name survives (mutants: `find_phi(..., name=True)`
    -> `False` in `safe_stem` / `safe_path`, `sorted(..., reverse=True)` -> `False`, the suffix loop's `break` ->
    `continue`)."""
    assert safe_stem("scanlee01.dcm", {"Lee"}).startswith("file-")
    assert safe_path("scanlee01/x.dcm", {"Lee"}).startswith("dir-")
    assert safe_path("scanlee01/x.dcm", {"Lee"}).endswith("/x.dcm")
    assert "Smith" not in scrub("Seen by Lee-Smith today", {"Lee-Smith", "Lee"})
    assert safe_stem("scan.png.dcm", set()) == "scan.png"


def test_empty_values_are_skipped_and_a_damaged_header_keeps_what_was_read():
    """A None inside a multi-value does not end the element's values; an exception while walking a damaged header
    still returns what was collected before it (mutants: the None `continue` -> `break`, `except Exception` narrowed
    away)."""
    ds = Dataset()
    ds.OtherPatientNames = [None, "Doe^Jane"]
    assert phi_values(ds) == {"Doe^Jane", "Doe", "Jane"}

    class DamagedHeader(Dataset):
        def __iter__(self):
            yield from list(super().__iter__())
            raise ValueError("truncated element")

    damaged = DamagedHeader()
    damaged.PatientName = "Quinlan^Rosalind"
    assert phi_values(damaged) == {"Quinlan^Rosalind", "Quinlan", "Rosalind"}


def test_an_unreadable_file_has_no_identity_values(tmp_path):
    """A file pydicom cannot parse even with force=True, or a folder, gives an empty set instead of an error
    (mutant: `except Exception` in `phi_values_of_file` narrowed away)."""
    assert phi_values_of_file(tmp_path) == set()
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"DICM" * 3)
    assert phi_values_of_file(broken) == set()
