"""Every pydicom test file with pixel data either decodes (through the [dicom-codecs] decoders where compressed) or
fails with a MedicalImageError that names the problem - and, for a decode failure, the transfer syntax.
Only files on disk are used: pydicom's shipped ones and any external ones already cached (never downloaded)."""
import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_files import DICOM_DIR
from pydicom.data.data_manager import get_testdata_file, get_url_map

from gmaivl_rt.medical.base import MedicalImageError
from gmaivl_rt.medical.reader import read_medical_image

# Files no decoder reads, and why (each also fails in pydicom's own test suite or is damaged on purpose).
UNREADABLE = {
    "JPEG-lossy.dcm": "JPEG stream with a misplaced marker segment",
    "JPEG2000-embedded-sequence-delimiter.dcm": "J2K codestream cut by an embedded delimiter",
    "MR_truncated.dcm": "pixel data truncated",
    "badVR.dcm": "Rows holds a non-number",
    "meta_missing_tsyntax.dcm": "no Rows",
    "nested_priv_SQ.dcm": "no Rows",
}


def pydicom_files_with_pixel_data() -> tuple[list[str], int]:
    """(paths of local test files that carry pixel data, how many external test files were not on disk)."""
    local = sorted(str(p) for p in Path(DICOM_DIR).rglob("*") if p.is_file()
                   and not p.name.endswith(".py"))
    external = [get_testdata_file(name, download=False) for name in get_url_map()]
    found = []
    for path in local + [p for p in external if p]:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, force=True, defer_size=256)
        except Exception:
            continue
        if "PixelData" in ds:
            found.append(path)
    return found, sum(1 for p in external if not p)


def test_every_pydicom_file_with_pixel_data_decodes_or_fails_clearly():
    files, missing = pydicom_files_with_pixel_data()
    assert len(files) > 80
    decoded, failed, compressed_decoded = [], {}, 0
    for path in files:
        name = os.path.basename(path)
        syntax = pydicom.dcmread(path, force=True, stop_before_pixels=True).file_meta.get("TransferSyntaxUID")
        try:
            image = read_medical_image(path)
        except MedicalImageError as e:
            failed[name] = str(e)
            if "cannot decode" in str(e):
                assert f"transfer syntax '{syntax.name}'" in str(e), str(e)
            continue
        assert image.pixels.dtype == np.uint8 and image.pixels.ndim == 3 and image.pixels.shape[2] == 3
        decoded.append(name)
        compressed_decoded += bool(syntax is not None and syntax.is_compressed)
    print(f"\ndecoded {len(decoded)} of {len(files)} pydicom test files with pixel data "
          f"({compressed_decoded} compressed); {len(failed)} clear errors; {missing} external files not on disk")
    assert set(failed) == set(UNREADABLE), {k: v for k, v in failed.items() if k not in UNREADABLE}
    assert compressed_decoded >= 35  # JPEG baseline/extended/lossless, JPEG-LS, J2K and RLE files


TWINS = {"MR_small_jpeg_ls_lossless.dcm": "MR_small.dcm", "MR_small_jp2klossless.dcm": "MR_small.dcm",
         "MR_small_RLE.dcm": "MR_small.dcm"}


@pytest.mark.parametrize("name", sorted(TWINS))
def test_lossless_files_decode_like_their_uncompressed_twins(name):
    """JPEG-LS, J2K and RLE lossless test files give the same picture as the native file they were made from."""
    image = read_medical_image(get_testdata_file(name, download=False))
    reference = read_medical_image(get_testdata_file(TWINS[name], download=False))
    np.testing.assert_array_equal(image.pixels, reference.pixels)


def test_12_bit_jpeg_extended_decodes():
    """Pillow refuses 12-bit JPEG Extended; the [dicom-codecs] decoder (pylibjpeg-libjpeg) reads it."""
    image = read_medical_image(get_testdata_file("JPGExtended.dcm", download=False))
    assert image.pixels.std() > 10  # a picture, not a blank
