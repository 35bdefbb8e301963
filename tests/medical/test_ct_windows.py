"""The CT window a file without one gets, checked against values written down here (the usual radiology
conventions: mediastinum W350/L50, brain W80/L40, bone W1800/L400, abdomen W400/L40), not against the
implementation's own table, and the pixels against pydicom's apply_windowing with that window.
Tolerance: 1 grey level (uint8 rounding of the [0, 1] mapping)."""
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_windowing

from gmaivl_rt.medical.reader import read_medical_image

EXPECTED = [  # (BodyPartExamined, name, (centre, width))
    ("CHEST", "mediastinum", (50.0, 350.0)),
    ("HEAD", "brain", (40.0, 80.0)),
    ("SPINE", "bone", (400.0, 1800.0)),
    (None, "abdomen", (40.0, 400.0)),  # no body part: the abdomen window
]


@pytest.mark.parametrize("body_part, name, window", EXPECTED, ids=[e[1] for e in EXPECTED])
def test_ct_window_by_body_part_matches_pydicom_windowing(tmp_path, body_part, name, window):
    """Mutants: the body-part table lookup ignored (every CT gets the fallback), or a window's centre and width
    swapped in CT_WINDOWS; the old test accepted whichever window the reader chose."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert "WindowCenter" not in ds
    if body_part is None:
        ds.pop("BodyPartExamined", None)
    else:
        ds.BodyPartExamined = body_part
    path = tmp_path / "ct.dcm"
    ds.save_as(path)
    image = read_medical_image(path)
    assert (image.window_name, image.window) == (name, window)

    windowed = pydicom.dcmread(path)
    windowed.WindowCenter, windowed.WindowWidth = window
    hu = apply_modality_lut(windowed.pixel_array, windowed)
    lo, hi = apply_windowing(np.array([-1e9, 1e9]), windowed)  # the output range pydicom maps onto
    expected = (apply_windowing(hu, windowed) - lo) / (hi - lo) * 255.0
    assert np.abs(image.pixels[..., 0].astype(np.float64) - expected).max() <= 1.0
    assert 0 < expected.mean() < 255  # the window cuts through the image's values, so the check has content
