"""Where a build's items come from: the embedded demo (the files pydicom and nibabel ship), an unlabelled folder,
and the items of one dataset (its annotation rows, or one row per image file for a caption dataset)."""
from __future__ import annotations

import os

from gmaivl_rt.data.deid import safe_token
from gmaivl_rt.data.manifest import DatasetSpec, read_annotations
from gmaivl_rt.medical.base import DICOM_SUFFIXES, NIFTI_SUFFIXES, PILLOW_SUFFIXES, detect_format

DEMO_DICOM_FILES = (
    "CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm", "MR_small.dcm", "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm", "MR_small_implicit.dcm", "MR_small_jp2klossless.dcm", "examples_overlay.dcm",
    "JPEG2000.dcm", "ExplVR_BigEnd.dcm", "examples_rgb_color.dcm", "examples_ybr_color.dcm", "examples_palette.dcm",
    "examples_jpeg2k.dcm", "SC_rgb.dcm", "SC_rgb_rle.dcm", "SC_rgb_rle_2frame.dcm", "SC_rgb_rle_16bit_2frame.dcm",
    "SC_rgb_jpeg_dcmtk.dcm", "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_small_odd.dcm", "image_dfl.dcm",
    "rtdose.dcm", "liver_1frame.dcm",
)
# (file, volume) for 4D; all brain MRI (anatomical T1 and EPI time series).
DEMO_NIFTI_FILES = ("anatomical.nii", "example4d.nii.gz", "functional.nii", "example_nifti2.nii.gz")


def demo_datasets() -> list[DatasetSpec]:
    """The embedded demo: every frame of pydicom's decodable test images and every slice (three planes) of
    nibabel's brain MRI test volumes, as captions plus metadata questions. Only files present on disk are used
    (pydicom fetches some test files from the internet on demand; this never does)."""
    import nibabel.testing
    import pydicom.data

    dicom_root = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files")
    nifti_root = nibabel.testing.data_path
    dicom = [f for f in DEMO_DICOM_FILES if os.path.isfile(os.path.join(dicom_root, f))]
    nifti = [f for f in DEMO_NIFTI_FILES if os.path.isfile(os.path.join(nifti_root, f))]
    specs = []
    if dicom:
        specs.append(DatasetSpec(name="demo_dicom", task="caption", image_root=dicom_root, files=dicom,
                                 department="radiology", metadata_vqa=True))
    if nifti:
        specs.append(DatasetSpec(name="demo_nifti_brain_mri", task="caption", image_root=nifti_root, files=nifti,
                                 modality="MRI", body_part="brain", department="neurology",
                                 planes=["axial", "coronal", "sagittal"], metadata_vqa=True))
    return specs


def input_dir_dataset(input_dir: str) -> DatasetSpec:
    """An unlabelled folder as a caption dataset named after the folder."""
    name = safe_token(os.path.basename(os.path.normpath(input_dir))) or "input"
    return DatasetSpec(name=name, task="caption", image_root=os.path.abspath(input_dir))


def discover_images(root: str) -> list[str]:
    """Image files under `root` (relative posix paths, sorted): known suffixes, or DICOM by its 'DICM' magic."""
    return discover_files(root)[0]


def discover_files(root: str) -> tuple[list[str], list[str]]:
    """(image files, other files) under `root`, relative posix paths, sorted; hidden files and folders ignored."""
    known = DICOM_SUFFIXES + NIFTI_SUFFIXES + tuple(PILLOW_SUFFIXES)
    found, others = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            relative = os.path.relpath(path, root).replace(os.sep, "/")
            if name.lower().endswith(known) or ("." not in name and detect_format(path) == "dicom"):
                found.append(relative)
            else:
                others.append(relative)
    return found, others


def dataset_items(spec: DatasetSpec) -> tuple[list[dict], list[str]]:
    """(annotation rows, files of the image folder that are not images and are skipped)."""
    if spec.task == "caption" and not spec.annotations:
        files, others = (spec.files, []) if spec.files is not None else discover_files(spec.image_root)
        return [{"image": f} for f in files], others
    return read_annotations(spec), []
