"""`decoded_pixels`: what decoding an image will take, read from its header alone (the server's image admission
control refuses from it before decoding). Checked against what `to_medical_image` then decodes, and against
pydicom's, nibabel's and Pillow's own reading of the same files."""
from __future__ import annotations

import gzip
import io

import numpy as np
import pytest
from PIL import Image

from gmaivl_rt.errors import LimitError
from gmaivl_rt.limits import Limits
from gmaivl_rt.medical.base import MedicalImageError
from gmaivl_rt.medical.convert import decoded_pixels, to_medical_image

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")
from pydicom.data import get_testdata_file  # noqa: E402


def _png(array, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", **save)
    return buffer.getvalue()


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "SC_rgb_jpeg.dcm", "examples_palette.dcm",
                                  "rtdose.dcm", "SC_rgb_rle_2frame.dcm", "JPEG2000.dcm"])
def test_dicom_header_counts_one_decoded_frame(name):
    """Rows x Columns of one frame (the reader decodes one frame whatever NumberOfFrames says), x3 for colour
    (samples per pixel 3, or a palette): the same as pydicom's own full read of the file, and as the size of the
    frame `to_medical_image` returns (its source_size).
    Mutant: the count multiplied by NumberOfFrames: rtdose (15 frames) and the 2-frame file fail."""
    path = get_testdata_file(name)
    data = open(path, "rb").read()
    ds = pydicom.dcmread(path)
    colour = int(ds.SamplesPerPixel) == 3 or ds.PhotometricInterpretation == "PALETTE COLOR"
    expected = int(ds.Rows) * int(ds.Columns) * (3 if colour else 1)
    assert decoded_pixels(data) == expected
    try:
        image = to_medical_image(data)
    except MedicalImageError:  # a compressed syntax without its decoder here: the header count stands alone
        return
    assert image.source_size == (int(ds.Rows), int(ds.Columns))


def test_dicom_header_is_read_without_the_pixel_data():
    """A DICOM whose pixel data is cut to a third still gets its count (the header alone is read), while decoding it
    fails: what the server refuses from the count costs no decoding.
    Mutant: `dicom_decoded_pixels` reading the whole file (`read_dataset(path)` without stop_before_pixels) and its
    pixel array: it raises instead of counting."""
    from server_fixtures import dicom_with_identity

    data = dicom_with_identity(truncate_pixels=True)
    assert decoded_pixels(data) == 128 * 128
    with pytest.raises(MedicalImageError):
        to_medical_image(data)


@pytest.mark.parametrize("mode", ["L", "I;16", "RGB", "RGBA", "P"])
def test_pillow_header_counts_as_the_reader_decodes(mode):
    """Width x height, x3 for every mode the reader converts to colour (RGB, RGBA, palette), x1 for the greyscale
    modes; the file is never loaded by the count (Pillow's lazy open: `im.load` is not called).
    Mutant: `is_grey_mode` true for every mode: the colour ones count once."""
    if mode == "I;16":
        data = _png(np.arange(30 * 50, dtype=np.uint16).reshape(30, 50))
    else:
        data = _png(np.asarray(Image.new(mode, (50, 30))))
    opened = Image.open(io.BytesIO(data))
    assert opened.size == (50, 30)
    expected = 50 * 30 * (1 if opened.mode in ("L", "I;16", "I", "F") else 3)
    assert decoded_pixels(data) == expected
    image = to_medical_image(data)
    assert image.source_size == (30, 50)


def test_pillow_header_of_a_huge_picture_costs_nothing_to_read():
    """A 7000x7000 16-bit PNG (49 M pixels) is counted from its header: its pixels are never decoded (Pillow's
    ImageFile.load is replaced by one that fails for the duration)."""
    data = _png(np.zeros((7000, 7000), np.uint16))
    from PIL import ImageFile

    original = ImageFile.ImageFile.load

    def refuse(self):
        raise AssertionError("decoded")

    ImageFile.ImageFile.load = refuse
    try:
        assert decoded_pixels(data) == 7000 * 7000
    finally:
        ImageFile.ImageFile.load = original


@pytest.mark.parametrize("shape", [(30, 40, 50), (20, 30, 10, 4)])
@pytest.mark.parametrize("compress", [False, True])
def test_nifti_header_counts_one_whole_volume(shape, compress):
    """A NIfTI file counts its whole 3D volume (the reader loads the volume to take a slice), one volume of a 4D
    image; gzipped or not. Checked against nibabel's own shape and the voxels `load_nifti` returns.
    Mutant: the count taken from every dimension: the 4D file counts 4 volumes."""
    from gmaivl_rt.medical.base import ImageSource
    from gmaivl_rt.medical.nifti import load_nifti

    data = nib.Nifti1Image(np.random.RandomState(0).rand(*shape).astype(np.float32), np.eye(4)).to_bytes()
    data = gzip.compress(data) if compress else data
    expected = int(np.prod(shape[:3]))
    assert decoded_pixels(data) == expected
    volume, _, _ = load_nifti(ImageSource(label="image 1", format="nifti", data=data, limits=Limits()), 0)
    assert volume.size == expected


def test_header_errors_are_the_readers():
    """A damaged or oversized header raises what decoding would: an over-limit picture a LimitError, unreadable
    bytes a MedicalImageError naming the image by its role (never quoting the data)."""
    data = _png(np.zeros((300, 200), np.uint8))
    with pytest.raises(LimitError, match="image 2: 200x300"):
        decoded_pixels(data, role="image 2", limits=Limits(max_image_pixels=50_000))
    with pytest.raises(MedicalImageError, match="^image 3: "):
        decoded_pixels(data[:40], role="image 3")
    with pytest.raises(MedicalImageError, match="^image 1: "):
        decoded_pixels(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
