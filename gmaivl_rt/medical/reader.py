"""Medical image reading: DICOM, NIfTI and ordinary image files to an RGB uint8 picture plus clean metadata.

One entry point, `read_medical_image(path)`, used by the data converter and at inference, and
`iter_medical_images(path)` for every frame of a multi-frame DICOM / every slice of a NIfTI volume (with the
matching slice of a segmentation mask). Each format has its own module: `dicom`, `nifti`, `images` (PNG / JPEG /
TIFF / BMP through Pillow), intensity mapping in `windowing`, masks in `masks`; `convert.to_medical_image` takes
whatever a service holds (bytes, arrays, PIL images, ...) to these readers.

Metadata only ever carries whitelisted, non-identifying attributes (modality, body part, spacing, orientation,
photometric interpretation); no patient or study identity is read into it. Errors raise `MedicalImageError`, whose
message names the file and the problem and never quotes header values.
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Iterator

from gmaivl_rt.medical.base import ImageSource, MedicalImage, MedicalImageError, detect_format, source_label
from gmaivl_rt.medical.dicom import DicomSource
from gmaivl_rt.medical.images import PillowSource
from gmaivl_rt.medical.masks import open_mask
from gmaivl_rt.medical.nifti import PLANES, NiftiSource


def read_medical_image(path: str | os.PathLike, *, frame: int | None = None, window=None, plane: str = "axial",
                       slice_index: int | None = None, volume: int = 0,
                       mask: str | os.PathLike | None = None) -> MedicalImage:
    """Read one 2D picture from `path` as RGB uint8 (H, W, 3) plus metadata.

    frame: DICOM / TIFF frame (default 0). slice_index: NIfTI slice along `plane` (default the middle one).
    window: None (the file's own window, a named CT window, or a percentile stretch), a name from `CT_WINDOWS`,
            or a (centre, width) pair in modality units (e.g. Hounsfield units).
    plane: "axial" | "coronal" | "sagittal" for NIfTI volumes. volume: 4D NIfTI volume index.
    mask: optional label mask file (PNG/TIFF/BMP 2D or NIfTI 3D) sliced and resampled like the image.
    """
    source = _open_source(path, window=window, plane=plane, volume=volume)
    index = slice_index if slice_index is not None else frame
    index = source.default_index() if index is None else int(index)
    if not 0 <= index < source.count:
        raise MedicalImageError(f"{source_label(path)}: index {index} out of range (it has {source.count})")
    image = source.image(index)
    if mask is not None:
        image = replace(image, mask=open_mask(mask, source).slice(index))
    return image


def iter_medical_images(path: str | os.PathLike, *, window=None, plane: str = "axial", volume: int = 0,
                        mask: str | os.PathLike | None = None, step: int = 1) -> Iterator[MedicalImage]:
    """Yield every frame (DICOM, TIFF) or every `step`-th slice along `plane` (NIfTI), with its mask slice.

    Arguments as in `read_medical_image`. The file is decoded once; each yield is identical to the
    `read_medical_image` call with that index.
    """
    source = _open_source(path, window=window, plane=plane, volume=volume)
    masks = open_mask(mask, source) if mask is not None else None
    if isinstance(source, DicomSource):
        source.preload_frames()
    for index in range(0, source.count, max(1, int(step))):
        image = source.image(index)
        if masks is not None:
            image = replace(image, mask=masks.slice(index))
        yield image


def count_images(path: str | os.PathLike, *, plane: str = "axial", volume: int = 0) -> int:
    """How many frames / slices `iter_medical_images(path, plane=plane, volume=volume)` yields with step 1."""
    return _open_source(path, window=None, plane=plane, volume=volume).count


def _open_source(path, *, window, plane, volume):
    """The reader of `path`'s format (by the ImageSource's format, else by suffix / magic), opened."""
    if plane not in PLANES:
        raise MedicalImageError(f"{source_label(path)}: plane must be one of {PLANES}, got {str(plane)[:20]!r}")
    if isinstance(path, ImageSource):
        fmt = path.format
    else:
        if not os.path.isfile(path):
            raise MedicalImageError(f"{source_label(path)}: no such file")
        fmt = detect_format(path)
    if fmt == "dicom":
        return DicomSource(path, window)
    if fmt == "nifti":
        return NiftiSource(path, window, plane, volume)
    return PillowSource(path, fmt, window)

