"""Segmentation masks read beside their image, in its geometry: a 2D label image (PNG / TIFF / BMP, one page or one
per frame) for DICOM and ordinary images, a NIfTI volume of the image's shape for NIfTI, sliced and resampled to
square pixels exactly as the image is (nearest neighbour, so labels stay labels)."""
from __future__ import annotations

import os

import numpy as np

from gmaivl_rt.medical.base import MaskError, MedicalImageError, detect_format, source_label, square_pixels
from gmaivl_rt.medical.dicom import DicomSource
from gmaivl_rt.medical.images import pillow_frame, pillow_open
from gmaivl_rt.medical.nifti import NiftiSource, load_nifti, orient_slice


def _binary_to_labels(labels: np.ndarray) -> np.ndarray:
    """A 0/255 (or 0/65535) binary mask becomes 0/1; label maps (0, 1, 2, ...) are kept as they are."""
    values = np.unique(labels)
    if values.size <= 2 and values.max(initial=0) in (255, 65535):
        return (labels > 0).astype(np.int32)
    return labels.astype(np.int32)


class MaskSlices:
    """Label slices of a mask file, in the same geometry as the image source they belong to."""

    def __init__(self, path, source):
        self.path, self.source = path, source
        image_name = source_label(source.path)
        if isinstance(source, NiftiSource):
            if detect_format(path) != "nifti":
                raise MaskError(f"{source_label(path)}: a NIfTI image needs a NIfTI mask")
            data, self.zooms, _ = load_nifti(path, 0, what="NIfTI mask")
            if data.shape != source.data.shape:
                raise MaskError(f"{source_label(path)}: mask shape {data.shape} does not match image "
                                        f"{image_name} shape {source.data.shape}")
            self.volume = np.rint(np.nan_to_num(data)).astype(np.int32)
            return
        # 2D image (or each DICOM frame): one 2D label map, or one per frame in a multi-page TIFF.
        img = pillow_open(path) if detect_format(path) not in ("dicom", "nifti") else None
        if img is None:
            raise MaskError(f"{source_label(path)}: 2D masks must be PNG / TIFF / BMP label images")
        pages = []
        for i in range(int(getattr(img, "n_frames", 1))):
            page = pillow_frame(path, img, i)
            page = page.convert("L") if page.mode in ("RGB", "RGBA", "LA", "1") else page
            pages.append(_binary_to_labels(np.asarray(page)))
        expected = (source.rows, source.columns) if isinstance(source, DicomSource) else \
            (source.img.size[1], source.img.size[0])
        if pages[0].shape != expected:
            raise MaskError(f"{source_label(path)}: mask size {pages[0].shape[1]}x{pages[0].shape[0]} does "
                                    f"not match image {image_name} size {expected[1]}x{expected[0]}")
        if len(pages) not in (1, source.count):
            raise MaskError(f"{source_label(path)}: mask has {len(pages)} frames, image {image_name} has "
                                    f"{source.count}")
        self.pages = pages

    def slice(self, index: int) -> np.ndarray:
        """(H, W) int32 labels for picture `index` of the image, the same size as its pixels."""
        if isinstance(self.source, NiftiSource):
            plane2d, spacing = orient_slice(self.volume, self.zooms, self.source.plane, index)
            return square_pixels(np.ascontiguousarray(plane2d), spacing, nearest=True)[0]
        page = self.pages[index if len(self.pages) > 1 else 0]
        if isinstance(self.source, DicomSource) and self.source.spacing is not None:
            page = square_pixels(page, self.source.spacing, nearest=True)[0]
        return page


def open_mask(path, source) -> MaskSlices:
    """The mask file `path` for an opened image `source` (DicomSource, NiftiSource or PillowSource); a mask that
    is missing, unreadable or does not fit raises MaskError."""
    if not os.path.isfile(path):
        raise MaskError(f"{source_label(path)}: no such mask file")
    try:
        return MaskSlices(path, source)
    except MaskError:
        raise
    except MedicalImageError as e:  # the mask file itself is unreadable
        raise MaskError(f"mask {e}") from None
