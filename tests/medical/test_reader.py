"""The medical readers on the files pydicom and nibabel ship, checked against pydicom's own LUT functions and against
orientation / spacing facts computed independently from nibabel affines. Tolerance: 1 grey level (uint8
rounding of the [0, 1] mapping) unless stated."""
import os

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_files import DICOM_DIR
from nibabel.testing import data_path as NIFTI_DIR
from PIL import Image
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, convert_color_space, get_decoder

from gmaivl_rt.medical.base import MedicalImageError
from gmaivl_rt.medical.reader import count_images, iter_medical_images, read_medical_image
from gmaivl_rt.medical.windowing import CT_WINDOWS


def dcm(name):
    path = os.path.join(DICOM_DIR, name)
    if not os.path.isfile(path):  # pydicom fetches some test files on demand; never from here
        pytest.skip(f"{name} is not shipped on disk")
    return path


def nii(name):
    return os.path.join(NIFTI_DIR, name)


def voi_to_uint8(values, ds):
    """pydicom's VOI output mapped to 0..255: its output range is read off by feeding it extreme inputs."""
    out = apply_voi_lut(np.concatenate([values.ravel().astype(np.float64), [-1e9, 1e9]]), ds, index=0)
    lo, hi = out[-2], out[-1]
    return ((out[:-2] - lo) / (hi - lo) * 255.0).reshape(values.shape)


def assert_grey(image):
    assert image.pixels.dtype == np.uint8 and image.pixels.ndim == 3 and image.pixels.shape[2] == 3
    assert np.array_equal(image.pixels[..., 0], image.pixels[..., 2])


# ---------------------------------------------------------------------------------------------------- DICOM
@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
                                  "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"])
def test_mr_file_window_matches_pydicom(name):
    ds = pydicom.dcmread(dcm(name))
    expected = voi_to_uint8(apply_modality_lut(ds.pixel_array, ds), ds)
    image = read_medical_image(dcm(name))
    assert_grey(image)
    assert image.window == (600.0, 1600.0) and image.window_name == "file"
    assert np.abs(image.pixels[..., 0].astype(np.float64) - expected).max() <= 1.0


def test_compressed_and_big_endian_decode_to_the_same_picture():
    reference = read_medical_image(dcm("MR_small.dcm")).pixels
    for name in ("MR_small_bigendian.dcm", "MR_small_RLE.dcm", "MR_small_implicit.dcm"):
        assert np.array_equal(read_medical_image(dcm(name)).pixels, reference), name


def test_ct_without_window_gets_a_named_ct_window_in_hounsfield_units():
    ds = pydicom.dcmread(dcm("CT_small.dcm"))
    assert "WindowCenter" not in ds and ds.Modality == "CT"
    image = read_medical_image(dcm("CT_small.dcm"))
    assert image.window_name in CT_WINDOWS and image.window == CT_WINDOWS[image.window_name]
    hu = apply_modality_lut(ds.pixel_array, ds)  # rescale slope/intercept -> HU
    windowed = ds.copy()
    windowed.WindowCenter, windowed.WindowWidth = image.window
    expected = voi_to_uint8(hu, windowed)
    assert np.abs(image.pixels[..., 0].astype(np.float64) - expected).max() <= 1.0
    # user windows: by name and as (centre, width) in HU
    lung = read_medical_image(dcm("CT_small.dcm"), window="lung")
    windowed.WindowCenter, windowed.WindowWidth = CT_WINDOWS["lung"]
    assert np.abs(lung.pixels[..., 0].astype(np.float64) - voi_to_uint8(hu, windowed)).max() <= 1.0
    assert np.array_equal(read_medical_image(dcm("CT_small.dcm"), window=CT_WINDOWS["lung"]).pixels, lung.pixels)
    with pytest.raises(MedicalImageError, match="unknown window"):
        read_medical_image(dcm("CT_small.dcm"), window="liver-ish")


def test_first_of_several_windows_and_monochrome1(tmp_path):
    ds = pydicom.dcmread(dcm("MR_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = [300, 900], [500, 100]
    several = tmp_path / "several.dcm"
    ds.save_as(several)
    image = read_medical_image(several)
    assert image.window == (300.0, 500.0)
    expected = voi_to_uint8(apply_modality_lut(ds.pixel_array, ds), ds)  # index=0: the first window
    assert np.abs(image.pixels[..., 0].astype(np.float64) - expected).max() <= 1.0
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = tmp_path / "mono1.dcm"
    ds.save_as(inverted)
    assert np.abs(read_medical_image(inverted).pixels.astype(int) - (255 - image.pixels.astype(int))).max() <= 1


def test_voi_lut_sequence_is_applied(tmp_path):
    ds = pydicom.dcmread(dcm("MR_small.dcm"))
    item = pydicom.Dataset()
    item.add_new("LUTDescriptor", "US", [256, 0, 8])
    item.add_new("LUTData", "US", [int(v) for v in (np.arange(256) ** 2 // 255)])  # a non-linear 8-bit curve
    ds.VOILUTSequence = [item]
    del ds.WindowCenter, ds.WindowWidth
    path = tmp_path / "lut.dcm"
    ds.save_as(path)
    ds = pydicom.dcmread(path)
    expected = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds, index=0) / 255.0 * 255.0
    image = read_medical_image(path)
    assert image.window_name == "file VOI LUT"
    assert np.abs(image.pixels[..., 0] - expected).max() <= 1.0


def test_enhanced_multiframe_functional_groups(tmp_path):
    ds = pydicom.dcmread(dcm("MR_small.dcm"))
    raw = ds.pixel_array.astype(np.float64)
    for keyword in ("PixelSpacing", "WindowCenter", "WindowWidth", "ImageOrientationPatient"):
        delattr(ds, keyword)

    def item(**attrs):
        out = pydicom.Dataset()
        for k, v in attrs.items():
            setattr(out, k, v)
        return out

    shared = item(PixelMeasuresSequence=[item(PixelSpacing=[0.5, 0.5])],
                  PlaneOrientationSequence=[item(ImageOrientationPatient=[1, 0, 0, 0, 0, -1])],
                  FrameVOILUTSequence=[item(WindowCenter=1100, WindowWidth=3000)],
                  PixelValueTransformationSequence=[item(RescaleSlope=2, RescaleIntercept=-100)])
    ds.SharedFunctionalGroupsSequence = [shared]
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path)
    image = read_medical_image(path)
    assert image.pixel_spacing == (0.5, 0.5) and image.orientation == "coronal" and image.window == (1100, 3000)
    reference = ds.copy()
    reference.WindowCenter, reference.WindowWidth = 1100, 3000
    expected = voi_to_uint8(raw * 2 - 100, reference)
    assert np.abs(image.pixels[..., 0] - expected).max() <= 1.0


def test_rgb_ybr_and_palette_colour():
    rgb = read_medical_image(dcm("SC_rgb_rle.dcm"))
    assert np.array_equal(rgb.pixels, pydicom.dcmread(dcm("SC_rgb_rle.dcm")).pixel_array) and rgb.is_color
    ds = pydicom.dcmread(dcm("SC_ybr_full_422_uncompressed.dcm"))
    ds.pixel_array_options(as_rgb=False)
    expected = convert_color_space(ds.pixel_array, "YBR_FULL", "RGB")
    assert np.abs(read_medical_image(dcm("SC_ybr_full_422_uncompressed.dcm")).pixels.astype(int)
                  - expected.astype(int)).max() <= 1
    ds = pydicom.dcmread(dcm("examples_palette.dcm"))
    lut = apply_color_lut(ds.pixel_array, ds)
    bits = ds.RedPaletteColorLookupTableDescriptor[2]
    expected = np.rint(lut / (2.0 ** bits - 1) * 255)
    assert np.abs(read_medical_image(dcm("examples_palette.dcm")).pixels - expected).max() <= 1
    sixteen = pydicom.dcmread(dcm("SC_rgb_rle_16bit.dcm")).pixel_array
    assert np.abs(read_medical_image(dcm("SC_rgb_rle_16bit.dcm")).pixels - sixteen / 65535.0 * 255).max() <= 1


def test_multiframe_all_frames_and_one_frame():
    path = dcm("SC_rgb_rle_2frame.dcm")
    frames = pydicom.dcmread(path).pixel_array
    images = list(iter_medical_images(path))
    assert [im.index for im in images] == [0, 1] and all(im.count == 2 for im in images)
    for i, im in enumerate(images):
        assert np.array_equal(im.pixels, frames[i])
        assert np.array_equal(read_medical_image(path, frame=i).pixels, im.pixels)
    assert count_images(dcm("rtdose.dcm")) == 15
    with pytest.raises(MedicalImageError, match="out of range"):
        read_medical_image(path, frame=2)


def test_metadata_is_clean():
    ds = pydicom.dcmread(dcm("CT_small.dcm"))
    image = read_medical_image(dcm("CT_small.dcm"))
    assert (image.modality, image.orientation, image.source_format, image.count) == ("CT", "axial", "dicom", 1)
    assert image.pixel_spacing == pytest.approx(tuple(float(v) for v in ds.PixelSpacing))
    text = repr(image)
    for value in (str(ds.PatientName), ds.PatientID, ds.StudyInstanceUID, ds.SOPInstanceUID, ds.StudyDate):
        assert value not in text


def test_missing_decoder_names_transfer_syntax_and_package():
    path = dcm("MR_small_jpeg_ls_lossless.dcm")
    uid = pydicom.dcmread(path).file_meta.TransferSyntaxUID
    if get_decoder(uid).is_available:
        assert np.array_equal(read_medical_image(path).pixels, read_medical_image(dcm("MR_small.dcm")).pixels)
        return
    with pytest.raises(MedicalImageError) as err:
        read_medical_image(path)
    message = str(err.value)
    assert "MR_small_jpeg_ls_lossless.dcm" in message and "JPEG-LS Lossless" in message
    assert "pylibjpeg-libjpeg" in message or "pyjpegls" in message


@pytest.mark.parametrize("name, problem", [("MR_truncated.dcm", "cannot decode"), ("badVR.dcm", "bad DICOM"),
                                           ("rtplan.dcm", "no pixel data")])
def test_broken_dicom_files_raise_a_named_error(name, problem):
    with pytest.raises(MedicalImageError, match=problem) as err:
        read_medical_image(dcm(name))
    assert name in str(err.value)


def test_text_file_and_truncated_copy(tmp_path):
    fake = tmp_path / "notes.dcm"
    fake.write_text("this is not a DICOM file\n" * 20)
    with pytest.raises(MedicalImageError, match="notes.dcm: not a DICOM file"):
        read_medical_image(fake)
    data = open(dcm("CT_small.dcm"), "rb").read()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(MedicalImageError, match="cut.dcm"):
        read_medical_image(cut)


# ---------------------------------------------------------------------------------------------------- NIfTI
def test_nifti_orientation_is_radiological_after_canonical_reorientation(tmp_path):
    # An LPS-stored volume with one bright voxel at the anterior, right, superior corner (world coordinates).
    data = np.zeros((6, 8, 5), np.float32)
    affine = np.diag([-2.0, -3.0, 4.0, 1.0])  # i -> left, j -> posterior, k -> superior
    corner = (0, 0, 4)  # i=0: most right, j=0: most anterior, k=4: most superior
    data[corner] = 100.0
    path = tmp_path / "lps.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    axial = read_medical_image(path, plane="axial", slice_index=4)
    coronal = read_medical_image(path, plane="coronal", slice_index=7)   # canonical y index of the anterior end
    sagittal = read_medical_image(path, plane="sagittal", slice_index=5)  # canonical x index of the right end
    for image in (axial, coronal, sagittal):
        grey = image.pixels[..., 0]
        ys, xs = np.nonzero(grey == grey.max())
        assert ys.min() == 0 and xs.min() == 0, image.orientation  # anterior/superior top, right/anterior left
    # square pixels: physical extent kept, spacing = the finer voxel side
    assert axial.pixel_spacing == (2.0, 2.0) and axial.pixels.shape[:2] == (12, 6)  # 8*3 mm tall, 6*2 mm wide
    assert coronal.pixels.shape[:2] == (10, 6) and sagittal.pixels.shape[:2] == (7, 8)  # 20 x 24 mm at 3 mm


def test_nifti_spacing_keeps_aspect_ratio_on_shipped_file():
    img = nib.as_closest_canonical(nib.load(nii("standard.nii.gz")))
    zooms = img.header.get_zooms()
    for plane, (rows_axis, cols_axis) in {"axial": (1, 0), "coronal": (2, 0), "sagittal": (2, 1)}.items():
        image = read_medical_image(nii("standard.nii.gz"), plane=plane)
        sp = image.pixel_spacing[0]
        assert image.pixel_spacing[0] == image.pixel_spacing[1] == min(zooms[rows_axis], zooms[cols_axis])
        assert abs(image.height * sp - img.shape[rows_axis] * zooms[rows_axis]) <= sp / 2 + 1e-6
        assert abs(image.width * sp - img.shape[cols_axis] * zooms[cols_axis]) <= sp / 2 + 1e-6


def test_nifti_percentile_normalisation_and_all_slices():
    volume = nib.as_closest_canonical(nib.load(nii("anatomical.nii"))).get_fdata()
    lo, hi = np.percentile(volume, [0.5, 99.5])
    images = list(iter_medical_images(nii("anatomical.nii"), plane="axial"))
    assert len(images) == volume.shape[2] == images[0].count
    stack = np.stack([im.pixels[..., 0] for im in images])
    assert (stack == 255).mean() >= 0.004 and (stack == 0).mean() >= 0.004  # the clipped tails
    k = 12
    expected = np.clip((volume[:, :, k].T[::-1, ::-1] - lo) / (hi - lo), 0, 1) * 255
    assert np.abs(images[k].pixels[..., 0] - expected).max() <= 1.0
    assert np.array_equal(read_medical_image(nii("anatomical.nii"), slice_index=k).pixels, images[k].pixels)


def test_nifti_4d_volume_index():
    img = nib.as_closest_canonical(nib.load(nii("example4d.nii.gz")))
    first = read_medical_image(nii("example4d.nii.gz"), volume=0, slice_index=10)
    second = read_medical_image(nii("example4d.nii.gz"), volume=1, slice_index=10)
    assert first.volume == 0 and second.volume == 1 and not np.array_equal(first.pixels, second.pixels)
    raw = np.asarray(img.dataobj[..., 1], np.float64)
    lo, hi = np.percentile(raw, [0.5, 99.5])
    expected = np.clip((raw[:, :, 10].T[::-1, ::-1] - lo) / (hi - lo), 0, 1) * 255
    assert np.abs(second.pixels[..., 0] - expected).max() <= 1
    with pytest.raises(MedicalImageError, match="volume 2 out of range"):
        read_medical_image(nii("example4d.nii.gz"), volume=2)


def test_nifti_mask_slices_follow_the_image(tmp_path):
    img = nib.load(nii("anatomical.nii"))
    data = np.asarray(img.dataobj, np.float32)
    threshold = np.percentile(data, 70)
    mask_path = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image((data > threshold).astype(np.uint8), img.affine), mask_path)
    lo, hi = np.percentile(data, [0.5, 99.5])
    level = (threshold - lo) / (hi - lo) * 255
    for plane in ("axial", "sagittal"):
        for image in iter_medical_images(nii("anatomical.nii"), plane=plane, mask=mask_path, step=5):
            grey = image.pixels[..., 0].astype(float)
            assert image.mask.shape == grey.shape
            assert (grey[image.mask == 1] >= level - 1).all() and (grey[image.mask == 0] <= level + 1).all()
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), img.affine), tmp_path / "small.nii.gz")
    with pytest.raises(MedicalImageError, match="does not match"):
        read_medical_image(nii("anatomical.nii"), mask=tmp_path / "small.nii.gz")


# ---------------------------------------------------------------------------------------------------- Pillow
def test_16bit_greyscale_png_is_scaled_by_its_bit_depth(tmp_path):
    values = np.linspace(0, 4095, 64 * 48).reshape(48, 64).astype(np.uint16)  # 12-bit data in 16-bit PNG
    path = tmp_path / "twelve_bit.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    image = read_medical_image(path)
    assert_grey(image)
    assert np.abs(image.pixels[..., 0] - values / 4095.0 * 255).max() <= 0.5 + 1e-6


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".jpg"])
def test_ordinary_formats_round_trip(tmp_path, suffix):
    yy, xx = np.mgrid[0:20, 0:30]
    rgb = np.stack([xx * 8, yy * 12, 255 - xx * 8], -1).astype(np.uint8)  # smooth, so JPEG stays close
    path = tmp_path / f"x{suffix}"
    Image.fromarray(rgb).save(path, **({"quality": 95} if suffix == ".jpg" else {}))
    image = read_medical_image(path)
    assert image.pixels.shape == (20, 30, 3) and image.source_format == {".tif": "tiff", ".jpg": "jpeg"}.get(
        suffix, suffix[1:])
    tolerance = 3.0 if suffix == ".jpg" else 0.0  # mean absolute error; JPEG is lossy
    assert np.abs(image.pixels.astype(int) - rgb).mean() <= tolerance


def test_multipage_tiff_frames(tmp_path):
    pages = [Image.fromarray(np.full((8, 8), 40 * i, np.uint8)) for i in range(3)]
    path = tmp_path / "stack.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    images = list(iter_medical_images(path))
    assert [int(im.pixels[0, 0, 0]) for im in images] == [0, 40, 80]


def test_decompression_bombs_and_corrupt_png_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((60, 60), np.uint8)).save(path)
    for limit in (3000, 1000):  # over the limit (warning) and over twice the limit (error)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(MedicalImageError, match="big.png: refused.*decompression bomb"):
            read_medical_image(path)
    monkeypatch.undo()
    data = path.read_bytes()
    broken = tmp_path / "broken.png"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(MedicalImageError, match="broken.png"):
        read_medical_image(broken)


def test_2d_mask_must_match_the_image(tmp_path):
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(np.zeros((10, 11), np.uint8)).save(tmp_path / "bad.png")
    labels = np.zeros((10, 12), np.uint8)
    labels[2:4, 3:6] = 255  # binary 0/255 mask -> label 1
    Image.fromarray(labels).save(tmp_path / "good.png")
    image = read_medical_image(tmp_path / "img.png", mask=tmp_path / "good.png")
    assert image.mask.sum() == 6 and image.mask.max() == 1
    with pytest.raises(MedicalImageError, match="bad.png: mask size 11x10 does not match image img.png"):
        read_medical_image(tmp_path / "img.png", mask=tmp_path / "bad.png")


def test_a_plain_path_read_obeys_the_default_pixel_limit(tmp_path):
    """A 9400x9400 1-bit PNG is 11 kB on disk and ~88 MP decoded: refused from its header, also when read by path
    (the data builder's way), before any decoding. Mutant: limits applied to to_medical_image only."""
    from PIL import Image

    from gmaivl_rt.errors import LimitError
    from gmaivl_rt.limits import DEFAULT_LIMITS

    path = tmp_path / "bomb.png"
    Image.new("1", (9400, 9400)).save(path)
    assert path.stat().st_size < 100_000 and 9400 * 9400 > DEFAULT_LIMITS.max_image_pixels
    with pytest.raises(LimitError, match="over the limit"):
        read_medical_image(path)
