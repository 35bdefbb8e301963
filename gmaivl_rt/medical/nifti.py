"""NIfTI (nibabel) -> `MedicalImage`: reoriented to the closest canonical (RAS+) orientation, sliced along axial /
coronal / sagittal in radiological display convention (patient right on image left, anterior / superior at the
top), resampled so pixels are square (the voxel spacing sets the aspect ratio), normalised by the 0.5-99.5
percentiles of the whole volume; 4D images take a volume index. Volume and slice sizes are checked from the header
before the voxels are read."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from gmaivl_rt.errors import LimitError
from gmaivl_rt.medical.base import (NIFTI_SUFFIXES, ImageSource, MedicalImage, MedicalImageError, check_finite,
                                    check_pixels, safe_reason, source_label, source_limits, square_pixels)
from gmaivl_rt.medical.windowing import PERCENTILES, apply_window, parse_window, to_uint8

PLANES = ("axial", "coronal", "sagittal")
_PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}  # RAS axis normal to each plane


def load_nifti(path, volume: int, what: str = "NIfTI"):
    """A NIfTI file (path or `ImageSource`) -> (RAS+ canonical (X, Y, Z) float32 array of `volume`, voxel sizes
    (3,) in mm, number of volumes). what: how errors name the file ("NIfTI", "NIfTI mask")."""
    import nibabel as nib

    try:
        img = _open_nifti(path)
        img = nib.as_closest_canonical(img)
        shape = img.shape
        if len(shape) == 4:
            if not 0 <= volume < shape[3]:
                raise MedicalImageError(f"{source_label(path)}: volume {volume} out of range (4D image has {shape[3]})")
            data = np.asarray(img.dataobj[..., volume], dtype=np.float32)
        elif len(shape) in (2, 3):
            data = np.asarray(img.dataobj, dtype=np.float32)
            data = data[..., None] if data.ndim == 2 else data
        else:
            raise MedicalImageError(f"{source_label(path)}: {what} image has {len(shape)} dimensions; expected 3 or 4")
        zooms = tuple(round(float(z), 6) for z in img.header.get_zooms()[:3])
    except (MedicalImageError, LimitError):
        raise
    except Exception as e:
        raise MedicalImageError(f"{source_label(path)}: unreadable {what} file ({safe_reason(e)})") from None
    zooms = zooms + (1.0,) * (3 - len(zooms))
    return data, zooms, (shape[3] if len(shape) == 4 else 1)


def _open_nifti(path):
    """The nibabel image of a NIfTI file (path or `ImageSource`), its header read and checked (`_check_volume`), its
    voxels not read."""
    import nibabel as nib

    if isinstance(path, ImageSource) and path.obj is not None:
        img = path.obj
    elif isinstance(path, ImageSource) and (path.data is not None or not path.path.lower().endswith(NIFTI_SUFFIXES)):
        # bytes, or a file whose name nibabel cannot type (nibabel goes by the suffix)
        img = _nifti_from_bytes(path.data if path.data is not None else Path(path.path).read_bytes())
    else:
        img = nib.load(path.path if isinstance(path, ImageSource) else os.fspath(path))
    _check_volume(path, tuple(int(n) for n in img.shape))
    return img


def nifti_decoded_voxels(path, what: str = "NIfTI") -> int:
    """Voxels `NiftiSource(path, ...)` decodes, from the header alone: the whole 3D volume (the reader loads one
    volume of a 4D image to take a slice from it). Raises MedicalImageError / LimitError as the reader would."""
    try:
        shape = tuple(int(n) for n in _open_nifti(path).shape)
    except (MedicalImageError, LimitError):
        raise
    except Exception as e:
        raise MedicalImageError(f"{source_label(path)}: unreadable {what} file ({safe_reason(e)})") from None
    return int(np.prod(shape[:3], dtype=np.int64))


def _nifti_from_bytes(data: bytes):
    """A NIfTI-1 or -2 image (optionally gzipped) from its bytes; the voxels stay unread until asked for."""
    import gzip

    import nibabel as nib

    stream = gzip.GzipFile(fileobj=io.BytesIO(data)) if data[:2] == b"\x1f\x8b" else io.BytesIO(data)
    head = stream.read(4)
    stream.seek(0)
    nifti2 = 540 in (int.from_bytes(head, "little"), int.from_bytes(head, "big"))
    return (nib.Nifti2Image if nifti2 else nib.Nifti1Image).from_stream(stream)


def _check_volume(path, shape: tuple) -> None:
    """Refuse a volume over limits.max_volume_voxels, or slices over max_image_pixels, from its header."""
    limits = source_limits(path)
    if limits is None:
        return
    voxels = int(np.prod(shape, dtype=np.int64)) if shape else 0
    if voxels > limits.max_volume_voxels:
        raise LimitError(f"{source_label(path)}: volume of {'x'.join(map(str, shape))} = {voxels} voxels is over the "
                         f"limit of {limits.max_volume_voxels}")
    sides = sorted(shape[:3], reverse=True)
    if len(sides) >= 2:
        check_pixels(path, sides[0], sides[1], "slice")


def orient_slice(volume3d: np.ndarray, zooms, plane: str, index: int):
    """RAS+ (X, Y, Z) volume -> (H, W) slice `index` along `plane` in radiological display orientation (a view, same
    dtype) and its (row, col) spacing."""
    axis = _PLANE_AXIS[plane]
    a, b = [ax for ax in range(3) if ax != axis]
    # a view (axes a, b): np.take would copy the whole (Fortran-ordered) volume into C order for every slice
    plane2d = volume3d[(slice(None),) * axis + (index,)]
    # rows follow axis b from its positive end (anterior/superior at the top), columns axis a from its
    # positive end (patient right on the image's left, anterior on the left for sagittal).
    return plane2d.T[::-1, ::-1], (zooms[b], zooms[a])


class NiftiSource:
    """One NIfTI volume (a path or an `ImageSource`) loaded for slicing: `count` slices along `plane`,
    `image(index)` -> MedicalImage. window: as `read_medical_image` takes it; volume: the 4D volume index."""

    def __init__(self, path, window, plane, volume):
        self.path, self.plane, self.volume_index = path, plane, volume
        self.window, self.window_name = parse_window(window, path)
        self.data, self.zooms, self.volumes = load_nifti(path, volume)
        self.count = self.data.shape[_PLANE_AXIS[plane]]
        check_finite(self.data, source_label(path))
        if self.window is None:
            finite = self.data[np.isfinite(self.data)]
            if self.window_name == "minmax":
                self.lo, self.hi = float(finite.min()), float(finite.max())
            else:
                self.lo, self.hi = np.percentile(finite, PERCENTILES)
            if self.hi <= self.lo:
                self.hi = self.lo + 1.0

    def default_index(self) -> int:
        return self.count // 2

    def image(self, index: int) -> MedicalImage:
        plane2d, spacing = orient_slice(self.data, self.zooms, self.plane, index)
        source_size = plane2d.shape
        if self.window is not None:
            unit = apply_window(plane2d, *self.window)
        else:
            unit = np.clip((np.nan_to_num(plane2d, nan=self.lo) - self.lo) / (self.hi - self.lo), 0, 1)
        unit, spacing = square_pixels(unit, spacing, nearest=False, path=self.path)
        return MedicalImage(pixels=to_uint8(unit), pixel_spacing=spacing, orientation=self.plane, index=index,
                            count=self.count, volume=self.volume_index if self.volumes > 1 else None,
                            source_format="nifti", window=self.window,
                            window_name=self.window_name or "percentile", photometric="MONOCHROME2",
                            source_size=source_size)

