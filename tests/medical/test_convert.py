"""to_medical_image: every form a service may hold an image in gives the same picture as the file read by path
(checked against `read_medical_image` on the file, and the 16-bit / float rules against numpy computed here);
limits are checked from headers before decoding; errors name the role and quote nothing of the input."""
import gzip
import io
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from nibabel.testing import data_path as NIFTI_DIR
from PIL import Image
from pydicom.data import get_testdata_file

from gmaivl_rt.errors import InputError, LimitError
from gmaivl_rt.medical.convert import sniff_format, to_medical_image
from gmaivl_rt.limits import Limits
from gmaivl_rt.medical.base import MedicalImage
from gmaivl_rt.medical.reader import read_medical_image
from gmaivl_rt.medical.windowing import apply_window

CT = get_testdata_file("CT_small.dcm")
NIFTI_GZ = os.path.join(NIFTI_DIR, "example4d.nii.gz")
NIFTI = os.path.join(NIFTI_DIR, "anatomical.nii")


def assert_clean(error, role="image 1", *forbidden):
    message = str(error)
    assert role in message and len(message) <= 300, message
    for text in forbidden:
        assert text not in message


def png_bytes(array, fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def forms_of(data: bytes, path: Path):
    """The same file as path str, bytes path, PathLike, raw bytes, bytearray, file object."""
    path.write_bytes(data)
    return {"str": str(path), "fsencode": os.fsencode(path), "pathlike": path, "bytes": data,
            "bytearray": bytearray(data), "file": io.BytesIO(data)}


def check_all_equal(reference: MedicalImage, forms: dict, **kwargs):
    for name, obj in forms.items():
        got = to_medical_image(obj, **kwargs)
        assert np.array_equal(got.pixels, reference.pixels), name


def test_dicom_as_path_bytes_file_and_dataset_reads_like_the_file(tmp_path):
    reference = read_medical_image(CT)
    forms = forms_of(Path(CT).read_bytes(), tmp_path / "x")  # no suffix: sniffed by magic
    forms["dataset"] = pydicom.dcmread(CT)
    check_all_equal(reference, forms)
    # 16-bit stored values: the window the caller passes reaches the DICOM reader
    windowed = to_medical_image(Path(CT).read_bytes(), window=(40, 400))
    assert np.array_equal(windowed.pixels, read_medical_image(CT, window=(40, 400)).pixels)
    assert windowed.window == (40.0, 400.0)


@pytest.mark.parametrize("name", [NIFTI_GZ, NIFTI])
def test_nifti_as_path_bytes_file_and_nibabel_image_reads_like_the_file(name, tmp_path):
    kwargs = {"plane": "coronal", "slice_index": 3}
    reference = read_medical_image(name, **kwargs)
    forms = forms_of(Path(name).read_bytes(), tmp_path / "volume")
    forms["nibabel"] = nib.load(name)
    check_all_equal(reference, forms, **kwargs)
    if name.endswith(".gz"):  # the same volume uncompressed, as bytes
        assert np.array_equal(to_medical_image(gzip.decompress(Path(name).read_bytes()), **kwargs).pixels,
                              reference.pixels)


def test_nifti2_bytes_are_sniffed():
    name = os.path.join(NIFTI_DIR, "example_nifti2.nii.gz")
    raw = gzip.decompress(Path(name).read_bytes())
    assert sniff_format(raw[:552]) == "nifti"
    assert np.array_equal(to_medical_image(raw).pixels, read_medical_image(name).pixels)


def test_8bit_picture_in_every_form(tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, (23, 31), dtype=np.uint8)
    rgb = np.random.default_rng(1).integers(0, 256, (17, 12, 3), dtype=np.uint8)
    for array in (grey, rgb):
        data = png_bytes(array)
        reference = read_medical_image(_write(tmp_path / "a.png", data))
        expected = np.repeat(array[..., None], 3, -1) if array.ndim == 2 else array
        assert np.array_equal(reference.pixels, expected)
        forms = forms_of(data, tmp_path / "b")
        forms.update(pil=Image.open(io.BytesIO(data)), array=array, tensor=torch.from_numpy(array))
        check_all_equal(reference, forms)


def test_16bit_picture_in_every_form_is_scaled_by_its_bit_depth(tmp_path):
    values = np.random.default_rng(0).integers(0, 4096, (20, 30)).astype(np.uint16)
    values[0, 0] = 4095  # a 12-bit range: scaled by 4095, not saturated
    data = png_bytes(values)
    reference = read_medical_image(_write(tmp_path / "a.png", data))
    expected = np.clip(np.rint(values / 4095.0 * 255), 0, 255).astype(np.uint8)
    assert np.abs(reference.pixels[..., 0].astype(int) - expected).max() <= 1
    assert (reference.pixels == 255).mean() < 0.01  # not saturated
    forms = forms_of(data, tmp_path / "b")
    forms.update(pil=Image.open(io.BytesIO(data)), array=values, int32=values.astype(np.int32),
                 tensor=torch.from_numpy(values.astype(np.int32)))
    check_all_equal(reference, forms)
    # a PIL image made in memory in mode I;16 is not saturated either
    assert np.array_equal(to_medical_image(Image.fromarray(values)).pixels, reference.pixels)


def test_float_picture_in_every_form_is_stretched_by_percentiles(tmp_path):
    values = np.random.default_rng(0).normal(100, 30, (25, 19)).astype(np.float32)
    data = png_bytes(values, "TIFF")
    reference = read_medical_image(_write(tmp_path / "a.tif", data))
    lo, hi = np.percentile(values.astype(np.float64), (0.5, 99.5))
    expected = np.rint(np.clip((values - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    assert np.abs(reference.pixels[..., 0].astype(int) - expected).max() <= 1
    forms = forms_of(data, tmp_path / "b")
    forms.update(pil=Image.open(io.BytesIO(data)), array=values, float64=values.astype(np.float64),
                 tensor=torch.from_numpy(values))
    check_all_equal(reference, forms)


def test_array_windowing_choices():
    hu = np.random.default_rng(0).integers(-1000, 1500, (16, 16)).astype(np.int16)
    windowed = to_medical_image(hu, window=(40, 400)).pixels[..., 0]
    expected = np.rint(apply_window(hu, 40, 400) * 255).astype(np.uint8)
    assert np.array_equal(windowed, expected)
    assert np.array_equal(to_medical_image(hu, window="lung").pixels, to_medical_image(hu, window=(-600, 1500)).pixels)
    minmax = to_medical_image(hu, window="minmax").pixels[..., 0]
    expected = np.rint((hu - hu.min()) / (hu.max() - hu.min()) * 255).astype(np.uint8)
    assert np.abs(minmax.astype(int) - expected).max() <= 1
    signed = to_medical_image(hu)  # negatives: the percentile stretch, as a signed image file is read
    assert signed.window_name == "percentile"
    rgba = np.random.default_rng(2).integers(0, 256, (5, 6, 4), dtype=np.uint8)
    assert np.array_equal(to_medical_image(rgba).pixels, rgba[..., :3])


def test_medical_image_passes_through():
    image = read_medical_image(CT)
    assert to_medical_image(image) is image


def test_frame_slice_and_plane_reach_the_reader(tmp_path):
    for plane in ("axial", "sagittal"):
        for index in (0, 5):
            got = to_medical_image(Path(NIFTI).read_bytes(), plane=plane, slice_index=index)
            assert np.array_equal(got.pixels, read_medical_image(NIFTI, plane=plane, slice_index=index).pixels)
    pages = [Image.fromarray(np.full((4, 5), v, np.uint8)) for v in (10, 200)]
    buffer = io.BytesIO()
    pages[0].save(buffer, format="TIFF", save_all=True, append_images=pages[1:])
    assert to_medical_image(buffer.getvalue(), frame=1).pixels[0, 0, 0] == 200
    with pytest.raises(InputError) as e:
        to_medical_image(buffer.getvalue(), frame=2)
    assert_clean(e.value)


@pytest.mark.parametrize("magic, fmt", [
    (b"\0" * 128 + b"DICM", "dicom"), (b"\x89PNG\r\n\x1a\n", "image"), (b"\xff\xd8\xff\xe0", "image"),
    (b"II*\x00", "image"), (b"MM\x00*", "image"), (b"BM", "image"), (b"GIF89a", "image"),
    (b"RIFF\0\0\0\0WEBP", "image"), (b"\x1f\x8b", "nifti"), (b"\0" * 344 + b"n+1\0", "nifti"),
    (b"\0\0\0\0n+2\0", "nifti"), (b"hello world", None), (b"%PDF-1.4", None)])
def test_sniffing(magic, fmt):
    assert sniff_format(magic + b"\0" * 8) == fmt


def test_other_image_formats_as_bytes():
    picture = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    for fmt in ("BMP", "GIF", "WEBP", "JPEG"):
        data = png_bytes(picture, fmt)
        expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert np.array_equal(to_medical_image(data).pixels, expected), fmt


# ------------------------------------------------------------------------------------------------- refusals
def test_unknown_types_and_bytes_are_refused_naming_the_role():
    secret = b"PATIENT-SECRET-1234" * 10
    for obj, cls in [(secret, InputError), (None, InputError), (3.5, InputError), ({"a": 1}, InputError),
                     (np.zeros((3, 3), bool), InputError), (np.zeros((2, 3, 4, 5), np.uint8), InputError),
                     (np.zeros((0, 3), np.uint8), InputError), (b"", InputError),
                     (io.StringIO("text"), InputError), ("/no/such/file.dcm", InputError)]:
        with pytest.raises(cls) as e:
            to_medical_image(obj, role="image 2")
        assert_clean(e.value, "image 2", "PATIENT-SECRET", "/no/such")


def test_a_large_picture_is_refused_from_its_header_before_decoding(monkeypatch):
    # a 9400x9400 1-bit PNG is ~11 kB on disk but 88 MP decoded
    data = png_bytes(np.zeros((9400, 9400), bool))
    assert len(data) < 20_000
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded before the pixel check"))
    with pytest.raises(LimitError) as e:
        to_medical_image(data)
    assert_clean(e.value)
    assert "88360000" in str(e.value) and "50000000" in str(e.value)
    with pytest.raises(LimitError):
        to_medical_image(read_medical_image(CT), limits=Limits(max_image_pixels=100))


def test_dicom_and_nifti_pixel_limits_come_from_the_header(monkeypatch):
    ds = pydicom.dcmread(CT)
    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(lambda self: pytest.fail("decoded")))
    with pytest.raises(LimitError) as e:
        to_medical_image(ds, limits=Limits(max_image_pixels=128 * 128 - 1))
    assert_clean(e.value)
    with pytest.raises(LimitError) as e:
        to_medical_image(Path(NIFTI_GZ).read_bytes(), limits=Limits(max_volume_voxels=1000))
    assert_clean(e.value)
    volume_voxels = int(np.prod(nib.load(NIFTI_GZ).shape))
    to_medical_image(Path(NIFTI_GZ).read_bytes(), limits=Limits(max_volume_voxels=volume_voxels))


def test_byte_limit(tmp_path):
    data = Path(CT).read_bytes()
    limits = Limits(max_image_bytes=len(data) - 1)
    for obj in (data, io.BytesIO(data), _write(tmp_path / "ct.dcm", data)):
        with pytest.raises(LimitError) as e:
            to_medical_image(obj, limits=limits)
        assert_clean(e.value, "image 1", "ct.dcm")
    to_medical_image(data, limits=Limits(max_image_bytes=len(data)))


def test_non_finite_pixel_data_is_refused_partial_nan_kept(tmp_path):
    nan = np.full((6, 7, 5), np.nan, np.float32)
    for volume in (nan, np.full((6, 7, 5), np.inf, np.float32)):
        img = nib.Nifti1Image(volume, np.eye(4))
        nib.save(img, tmp_path / "v.nii.gz")
        for obj in (img, (tmp_path / "v.nii.gz").read_bytes(), tmp_path / "v.nii.gz"):
            with pytest.raises(InputError, match="no finite value"):
                to_medical_image(obj)
        with pytest.raises(InputError, match="no finite value"):
            read_medical_image(tmp_path / "v.nii.gz")
    with pytest.raises(InputError, match="no finite value"):
        to_medical_image(np.full((4, 4), np.nan, np.float32))
    partial = np.arange(6 * 7 * 5, dtype=np.float32).reshape(6, 7, 5)
    partial[0] = np.nan
    img = nib.Nifti1Image(partial, np.eye(4))
    assert to_medical_image(img).pixels.max() > 0  # partial NaN still reads


def test_bad_reader_arguments_name_them():
    data = Path(CT).read_bytes()
    for kwargs, word in [({"frame": -1}, "frame"), ({"frame": 1.5}, "frame"), ({"slice_index": True}, "slice_index"),
                         ({"plane": "diagonal"}, "plane"), ({"window": "nonsense"}, "window"),
                         ({"window": (40, -1)}, "window"), ({"window": object()}, "window")]:
        with pytest.raises(InputError) as e:
            to_medical_image(data, **kwargs)
        assert word in str(e.value) and len(str(e.value)) <= 300


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_header_spacing_cannot_blow_up_the_resampled_picture():
    ds = pydicom.dcmread(CT)
    ds.PixelSpacing = [0.001, 50.0]  # 128x128 stored, 128x6,400,000 once resampled to square pixels
    buffer = io.BytesIO()
    ds.save_as(buffer)
    with pytest.raises(LimitError) as e:
        to_medical_image(buffer.getvalue())
    assert_clean(e.value)
    assert "square pixels" in str(e.value)
    ds.PixelSpacing = [0.5, 1.0]  # an ordinary anisotropic spacing still resamples
    assert to_medical_image(ds).pixels.shape[:2] == (128, 256)


def test_damaged_files_end_in_input_error_or_a_picture():
    """Truncated and bit-flipped DICOM, PNG, TIFF and NIfTI bytes (seeded): every outcome is a picture or an
    InputError naming the role, short, quoting no bytes: never another exception type."""
    rng = np.random.default_rng(0)
    picture = np.random.default_rng(1).integers(0, 4096, (24, 20)).astype(np.uint16)
    originals = [Path(CT).read_bytes(), png_bytes(picture), png_bytes(picture.astype(np.float32), "TIFF"),
                 Path(NIFTI_GZ).read_bytes(), gzip.decompress(Path(NIFTI_GZ).read_bytes())[:60_000]]
    outcomes = {"picture": 0, "refused": 0}
    for original in originals:
        for trial in range(60):
            data = bytearray(original)
            if trial % 3 == 0:
                data = data[: int(rng.integers(1, len(data)))]
            else:
                for at in rng.integers(0, len(data), int(rng.integers(1, 8))):
                    data[at] = int(rng.integers(0, 256))
            try:
                image = to_medical_image(bytes(data), role="image 3", limits=Limits(max_image_pixels=4_000_000))
            except InputError as e:
                message = str(e)
                assert message.startswith("image 3") and len(message) <= 300, message
                assert "\\x" not in message and "b'" not in message, message
                outcomes["refused"] += 1
            else:
                assert image.pixels.dtype == np.uint8 and image.pixels.ndim == 3
                outcomes["picture"] += 1
    assert outcomes["picture"] and outcomes["refused"]
