"""gmaivl_rt.data.deid's matching rules, one function at a time on hand-made values (fast: no files): the survivors
of `make mutate` on deid.py (docs/mutation-report.md), each test naming the mutants it kills. The end-to-end
guarantees (no identity value in any output of a real conversion) are tests/test_deid.py's."""
import hashlib

from pydicom.dataset import Dataset

from gmaivl_rt.data.deid import find_phi, identity_forms, phi_values, safe_path, scrub


def test_placeholder_values_are_not_identities():
    """'ANONYMOUS', 'Unknown' and 'N/A' are placeholders, not someone's identity: they would match everywhere
    (mutant: `not in _NON_IDENTIFYING_VALUES and _significant` -> `or`)."""
    ds = Dataset()
    ds.PatientName = "ANONYMOUS"
    ds.OperatorsName = "Unknown"
    ds.InstitutionName = "N/A"
    ds.PatientID = "QX-4417"
    assert phi_values(ds) == {"QX-4417"}


def test_dates_take_every_valid_day_and_month():
    """A date of the 1st, the 31st or in December is also matched as DDMMYYYY and MMDDYYYY; month 13 is no date
    (mutants: `1 <= day` -> `1 < day`, `day <= 31` -> `day != 31`, `month <= 12` -> `<= 11`)."""
    for date, day_first, month_first in (("19470301", "01031947", "03011947"), ("19470131", "31011947", "01311947"),
                                         ("19471205", "05121947", "12051947")):
        assert {date, day_first, month_first} <= identity_forms(date), date
    assert identity_forms("19471305") == {"19471305"}


def test_a_short_name_part_matches_as_one_whole_word():
    """A name part under 6 characters matches a whole word of free text, alone or in a run of words, and not
    inside another word (mutant: single words dropped from the runs, `(1, 2, 3)` -> `(2, 2, 3)`)."""
    assert find_phi("seen by Roe today", {"Roe"}) == "Roe"
    assert find_phi("seen by Ann Roe today", {"Roe^Ann"}) == "Roe^Ann"
    assert find_phi("a roebuck was seen", {"Roe"}) is None


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
