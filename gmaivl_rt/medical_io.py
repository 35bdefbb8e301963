"""Medical image reading: DICOM, NIfTI and ordinary image files to an RGB uint8 picture plus clean metadata.

One entry point, `read_medical_image(path)`, used by the data converter and at inference, and
`iter_medical_images(path)` for every frame of a multi-frame DICOM / every slice of a NIfTI volume (with the
matching slice of a segmentation mask).

* DICOM (pydicom 3): modality LUT (rescale slope/intercept or LUT), then the file's VOI LUT or its first window
  (PS3.3 C.11.2.1.2 LINEAR / LINEAR_EXACT / SIGMOID); CT files without a window get a named CT window picked from
  the body part; other greyscale files a 0.5-99.5 percentile stretch. MONOCHROME1 is inverted. Colour data
  (RGB, YBR_* - converted to RGB by pydicom's decoder path) and PALETTE COLOR (`apply_color_lut`) are supported.
  Enhanced multi-frame objects take spacing, orientation, rescale and window from their (per-frame or shared)
  functional groups. Compressed transfer syntaxes decode when a decoder plugin is installed; otherwise the error
  names the transfer syntax and the packages that decode it.
* NIfTI (nibabel): reoriented to the closest canonical (RAS+) orientation, sliced along axial / coronal / sagittal
  in radiological display convention (patient right on image left, anterior / superior at the top), resampled so
  pixels are square (the voxel spacing sets the aspect ratio), normalised by the 0.5-99.5 percentiles of the whole
  volume; 4D images take a volume index.
* PNG / JPEG / TIFF / BMP (Pillow): 16-bit greyscale scaled by its bit depth, multi-page TIFF frames, decompression
  bombs (more than `PIL.Image.MAX_IMAGE_PIXELS`) refused.

Metadata only ever carries whitelisted, non-identifying attributes (modality, body part, spacing, orientation,
photometric interpretation); no patient or study identity is read into it. Errors raise `MedicalImageError`, whose
message names the file and the problem and never quotes header values.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from gmaivl_rt.errors import InputError, LimitError

# Named CT windows (centre, width) in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (40.0, 400.0),
}
# Which named window a CT without its own window gets, by (lower-cased) BodyPartExamined.
_CT_WINDOW_BY_BODY_PART = {
    "head": "brain", "brain": "brain", "skull": "bone", "chest": "mediastinum", "thorax": "mediastinum",
    "lung": "lung", "abdomen": "abdomen", "pelvis": "abdomen", "liver": "abdomen", "spine": "bone",
    "cspine": "bone", "tspine": "bone", "lspine": "bone", "extremity": "bone",
}
PERCENTILES = (0.5, 99.5)
# Intensity mappings a caller may ask for by name instead of a (centre, width) window.
STRETCHES = ("percentile", "minmax")
PLANES = ("axial", "coronal", "sagittal")
_PLANE_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}  # RAS axis normal to each plane
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Compressed DICOM: the [dicom-codecs] extra's decoders first (pylibjpeg-libjpeg / -openjpeg / -rle, pyjpegls,
# python-gdcm), then pydicom's own order among whatever else is installed (Pillow).
DICOM_PLUGIN_PREFERENCE = ("pylibjpeg", "pyjpegls", "gdcm")
PILLOW_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff", ".bmp": "bmp"}


class MedicalImageError(InputError):
    """A medical image (or mask) could not be read. The message names the file and the problem, never PHI."""


class MaskError(MedicalImageError):
    """A segmentation mask is unreadable or does not fit its image (size, shape, frame count)."""


@dataclass(frozen=True)
class MedicalImage:
    """One 2D picture taken from a medical image file.

    pixels: (H, W, 3) uint8 RGB, ready for display or CLIP preprocessing.
    mask:   (H, W) int32 label map aligned with `pixels` (0 = background) when a mask was given, else None.
    modality: DICOM modality code ("CT", "MR", "US", ...) or None when the format does not record one.
    body_part: lower-cased BodyPartExamined, or None.
    pixel_spacing: (row, column) spacing in mm of the returned pixels, or None when unknown.
    orientation: anatomical plane of the picture ("axial", "coronal", "sagittal", "oblique") or None.
    index / count: frame (DICOM, TIFF) or slice (NIfTI) index and how many there are.
    volume: the 4D volume index for NIfTI, else None.
    source_format: "dicom", "nifti", "png", "jpeg", "tiff" or "bmp".
    window: (centre, width) applied, in modality units, or None.
    window_name: how intensities were mapped: "file", "file VOI LUT", a CT window name, "user",
                 "percentile", "bit depth" or "none" (already 8-bit / colour).
    photometric: DICOM photometric interpretation of the source ("MONOCHROME2", "RGB", ...) or PIL mode.
    source_size: (height, width) of the frame / slice before square-pixel resampling (what annotations in
                 source pixel coordinates refer to).
    """

    pixels: np.ndarray
    modality: str | None = None
    body_part: str | None = None
    pixel_spacing: tuple[float, float] | None = None
    orientation: str | None = None
    index: int = 0
    count: int = 1
    volume: int | None = None
    source_format: str = ""
    window: tuple[float, float] | None = None
    window_name: str = "none"
    photometric: str = ""
    source_size: tuple[int, int] | None = None
    mask: np.ndarray | None = field(default=None, repr=False)

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def is_color(self) -> bool:
        return not (np.array_equal(self.pixels[..., 0], self.pixels[..., 1])
                    and np.array_equal(self.pixels[..., 1], self.pixels[..., 2]))


@dataclass(frozen=True, eq=False)
class ImageSource:
    """An image given other than by a file name the reader may quote: what `gmaivl_rt.image_input` hands the
    readers below in place of a path.

    label: how errors name it (its role, e.g. "image 1"). format: "dicom", "nifti" or "image" (Pillow).
    Exactly one of path (a file), data (its bytes) or obj (a pydicom Dataset, nibabel image or PIL image).
    limits: a `gmaivl_rt.limits.Limits` checked from headers before decoding, or None."""

    label: str
    format: str
    path: str | None = None
    data: bytes | None = field(default=None, repr=False)
    obj: object = field(default=None, repr=False)
    limits: object = None

    def readable(self):
        """What pydicom / Pillow open: the path, or a fresh stream over the bytes."""
        return self.path if self.path is not None else io.BytesIO(self.data)


# --------------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------------
def detect_format(path: str | os.PathLike) -> str:
    """'dicom' | 'nifti' | 'png' | 'jpeg' | 'tiff' | 'bmp', by suffix, else by the DICOM 'DICM' magic, else 'image'."""
    name = os.fspath(path).lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    for suffix, fmt in PILLOW_SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as e:
        raise MedicalImageError(f"{_label(path)}: cannot open ({e.strerror})") from None
    return "dicom" if head[128:132] == b"DICM" else "image"


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
        raise MedicalImageError(f"{_label(path)}: index {index} out of range (it has {source.count})")
    image = source.image(index)
    if mask is not None:
        image = replace(image, mask=_open_mask(mask, source).slice(index))
    return image


def iter_medical_images(path: str | os.PathLike, *, window=None, plane: str = "axial", volume: int = 0,
                        mask: str | os.PathLike | None = None, step: int = 1) -> Iterator[MedicalImage]:
    """Yield every frame (DICOM, TIFF) or every `step`-th slice along `plane` (NIfTI), with its mask slice.

    Arguments as in `read_medical_image`. The file is decoded once; each yield is identical to the
    `read_medical_image` call with that index.
    """
    source = _open_source(path, window=window, plane=plane, volume=volume)
    masks = _open_mask(mask, source) if mask is not None else None
    if isinstance(source, _DicomSource):
        source.preload_frames()
    for index in range(0, source.count, max(1, int(step))):
        image = source.image(index)
        if masks is not None:
            image = replace(image, mask=masks.slice(index))
        yield image


def count_images(path: str | os.PathLike, *, plane: str = "axial", volume: int = 0) -> int:
    """How many frames / slices `iter_medical_images(path, plane=plane, volume=volume)` yields with step 1."""
    return _open_source(path, window=None, plane=plane, volume=volume).count


def apply_window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing to [0, 1]. values: any shape, modality units. Returns float32, same shape."""
    x = np.asarray(values, dtype=np.float64)
    function = (function or "LINEAR").upper()
    if function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif function == "LINEAR_EXACT":
        out = np.clip((x - center) / width + 0.5, 0.0, 1.0)
    else:
        if width < 1:
            raise ValueError(f"window width must be >= 1 for LINEAR windows, got {width}")
        if width == 1:  # PS3.3: a step at the centre
            out = (x > center - 0.5).astype(np.float64)
        else:
            out = np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    return out.astype(np.float32)


UNKNOWN_MODALITY = "medical image"  # modality_name() of a file that records no modality


def modality_name(code: str | None) -> str:
    """Human name of a DICOM modality code, for text ("MR" -> "MRI"); unknown codes pass through; no code at all
    gives UNKNOWN_MODALITY."""
    names = {"CT": "CT", "MR": "MRI", "MRI": "MRI", "US": "ultrasound", "CR": "X-ray", "DX": "X-ray",
             "DR": "X-ray", "XR": "X-ray", "X-RAY": "X-ray", "MG": "mammography", "NM": "nuclear medicine",
             "PT": "PET", "PET": "PET", "XA": "angiography", "RF": "fluoroscopy", "OT": "secondary capture",
             "SC": "secondary capture", "RTDOSE": "radiotherapy dose map", "SM": "pathology slide",
             "OP": "fundus photograph", "OCT": "OCT", "ES": "endoscopy", "SEG": "segmentation"}
    if not code:
        return UNKNOWN_MODALITY
    return names.get(code.upper(), code)


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------
def _label(path) -> str:
    """The file as errors name it: its base name only (directories may carry site or patient names), or the
    role of an `ImageSource`."""
    if isinstance(path, ImageSource):
        return path.label
    return os.path.basename(os.fspath(path)) or os.fspath(path)


def _limits(path):
    """The limits a read obeys: the request's (to_medical_image) or, for a plain path, the defaults, so no reader
    (the data builder's included) decodes a decompression bomb."""
    from gmaivl_rt.limits import DEFAULT_LIMITS

    if isinstance(path, ImageSource):
        return path.limits
    return DEFAULT_LIMITS


def _check_pixels(path, height: int, width: int, what: str = "picture") -> None:
    """Refuse a picture over limits.max_image_pixels (from its header, before decoding)."""
    limits = _limits(path)
    if limits is not None and height * width > limits.max_image_pixels:
        raise LimitError(f"{_label(path)}: {width}x{height} = {height * width} pixels per {what} is over the "
                         f"limit of {limits.max_image_pixels}")


def check_finite(values: np.ndarray, label: str) -> None:
    """Refuse pixel data with no finite value (all NaN / inf would otherwise become a blank picture)."""
    if values.dtype.kind in "fc" and not np.isfinite(values).any():
        raise MedicalImageError(f"{label}: pixel data has no finite value (all NaN or infinite)")


def minmax_unit(values: np.ndarray) -> np.ndarray:
    """Map finite values to [0, 1] by their minimum and maximum (NaN -> 0); constant -> 0."""
    x = np.asarray(values, np.float64)
    finite = x[np.isfinite(x)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    return np.clip((np.nan_to_num(x, nan=lo) - lo) / (hi - lo), 0, 1).astype(np.float32)


def grey_unit(values: np.ndarray, window=None, window_name: str | None = None, label: str = "image"):
    """Stored numbers (H, W) or (H, W, C) -> ([0, 1] float32, how), the one rule for 16-bit / float / signed
    data whether it came from a file (PNG, TIFF), a PIL image or an array:
    a (centre, width) window if given; "percentile" (0.5-99.5) or "minmax" if named; else uint8 as is (/255),
    other non-negative integers by their bit depth, signed integers with negatives and floats by percentiles."""
    values = np.asarray(values)
    check_finite(values, label)
    if window is not None:
        return apply_window(values, *window), window_name or "user"
    if window_name == "minmax":
        return minmax_unit(values), "minmax"
    if window_name == "percentile":
        return percentile_unit(values), "percentile"
    if values.dtype == np.uint8:
        return values.astype(np.float32) / 255.0, "none"
    if values.dtype.kind in "ui" and (values.size == 0 or values.min() >= 0):
        return _bit_depth_unit(values), "bit depth"
    return percentile_unit(values), "percentile"


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    """[0, 1] float (H, W) or (H, W, 3) -> (H, W, 3) uint8."""
    out = np.clip(np.rint(np.asarray(unit, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(out[..., None], 3, axis=-1) if out.ndim == 2 else out


def percentile_unit(values: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Map values to [0, 1] by the 0.5 / 99.5 percentiles of `reference` (default: values); constant -> 0."""
    ref = values if reference is None else reference
    finite = np.asarray(ref, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return np.zeros(np.shape(values), np.float32)
    lo, hi = np.percentile(finite, PERCENTILES)
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((np.nan_to_num(np.asarray(values, np.float64), nan=lo) - lo) / (hi - lo), 0, 1).astype(np.float32)


def _bit_depth_unit(values: np.ndarray) -> np.ndarray:
    """Unsigned integer data -> [0, 1] by the smallest bit depth (>= 8) that holds its maximum."""
    vmax = int(values.max()) if values.size else 0
    bits = max(8, vmax.bit_length())
    return (values.astype(np.float32) / float(2 ** bits - 1)).astype(np.float32)


def _square_pixels(plane2d: np.ndarray, spacing, nearest: bool, path=None) -> tuple[np.ndarray,
                                                                                    tuple[float, float] | None]:
    """Resample a (H, W) float/int plane so both pixel sides equal the finer spacing. Returns (plane, spacing).
    path: the image, whose pixel limit (if any) the resampled size must keep (a header's spacing sets it)."""
    if spacing is None:
        return plane2d, None
    row, col = float(spacing[0]), float(spacing[1])
    if row <= 0 or col <= 0 or abs(row - col) <= 1e-3 * max(row, col):
        return plane2d, (row, col)
    from PIL import Image

    target = min(row, col)
    h, w = plane2d.shape
    new_h, new_w = max(1, round(h * row / target)), max(1, round(w * col / target))
    if path is not None:
        _check_pixels(path, new_h, new_w, "picture resampled to square pixels")
    if nearest:
        img = Image.fromarray(plane2d.astype(np.int32), mode="I").resize((new_w, new_h), Image.NEAREST)
        return np.asarray(img).astype(np.int32), (target, target)
    img = Image.fromarray(plane2d.astype(np.float32), mode="F").resize((new_w, new_h), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32), (target, target)


def _parse_window(window, path) -> tuple[tuple[float, float] | None, str | None]:
    if window is None:
        return None, None
    if isinstance(window, str):
        if window.lower() in STRETCHES:
            return None, window.lower()
        if window.lower() not in CT_WINDOWS:
            raise MedicalImageError(f"{_label(path)}: unknown window {window[:20]!r}; choose one of "
                                    f"{sorted(CT_WINDOWS) + list(STRETCHES)} or give (centre, width)")
        return CT_WINDOWS[window.lower()], window.lower()
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError):
        raise MedicalImageError(f"{_label(path)}: window must be a name or (centre, width), got "
                                f"{type(window).__name__}") from None
    if not (np.isfinite(center) and np.isfinite(width)) or width <= 0:
        raise MedicalImageError(f"{_label(path)}: window width must be positive, got {width}")
    return (center, width), "user"


def _open_source(path, *, window, plane, volume):
    if plane not in PLANES:
        raise MedicalImageError(f"{_label(path)}: plane must be one of {PLANES}, got {str(plane)[:20]!r}")
    if isinstance(path, ImageSource):
        fmt = path.format
    else:
        if not os.path.isfile(path):
            raise MedicalImageError(f"{_label(path)}: no such file")
        fmt = detect_format(path)
    if fmt == "dicom":
        return _DicomSource(path, window)
    if fmt == "nifti":
        return _NiftiSource(path, window, plane, volume)
    return _PillowSource(path, fmt, window)


# --------------------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_pydicom():
    """Silence pydicom's warnings and its logger for the block: both quote raw header values (UIDs, names)."""
    pydicom_logger = logging.getLogger("pydicom")
    was_disabled, was_propagating = pydicom_logger.disabled, pydicom_logger.propagate
    # disabled silences pydicom's own logger; its children (pydicom.pixels.decoders.base logs decode failures)
    # still propagate to the root's handlers unless the parent stops propagation.
    pydicom_logger.disabled, pydicom_logger.propagate = True, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_logger.disabled, pydicom_logger.propagate = was_disabled, was_propagating


_UID_OR_NUMBER = re.compile(r"\d[\d.]{5,}")
# Quoted text and file paths in library messages may carry header values or names (patients, sites).
_QUOTED_OR_PATH = re.compile(r"'[^']*'|\"[^\"]*\"|b'[^']*'|(?:[A-Za-z]:)?[\\/]\S+")


def safe_reason(error: BaseException) -> str:
    """An exception's class and message with quoted text, paths and long numbers / UIDs masked (messages may
    quote header values or file names)."""
    text = " ".join(str(error).split())[:160]
    text = _UID_OR_NUMBER.sub("#", _QUOTED_OR_PATH.sub("…", text))
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _is_decoder_panic(error: BaseException) -> bool:
    """A Rust decoder's panic on damaged data (pyo3's PanicException, e.g. pylibjpeg-rle): a BaseException, so
    `except Exception` misses it, but it only means the data cannot be decoded."""
    return type(error).__name__ == "PanicException"


def _plane_from_iop(iop) -> str | None:
    try:
        v = np.asarray([float(x) for x in iop], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if v.shape != (6,):
        return None
    normal = np.abs(np.cross(v[:3], v[3:]))
    if normal.max() < 0.8:
        return "oblique"
    return ("sagittal", "coronal", "axial")[int(normal.argmax())]


class _DicomSource:
    def __init__(self, path, window):
        import pydicom
        from pydicom.errors import InvalidDicomError

        self.path = path
        self.window, self.window_name = _parse_window(window, path)
        given = path.obj if isinstance(path, ImageSource) else None
        readable = path.readable if isinstance(path, ImageSource) else lambda: path
        try:
            with quiet_pydicom():
                try:
                    ds = given if given is not None else pydicom.dcmread(readable())
                except InvalidDicomError:
                    # No preamble: legal for old files, so retry leniently but demand an image.
                    ds = pydicom.dcmread(readable(), force=True)
                    if "PixelData" not in ds or "Rows" not in ds:
                        raise MedicalImageError(f"{_label(path)}: not a DICOM file (no 'DICM' marker "
                                                "and no image attributes)") from None
        except MedicalImageError:
            raise
        except Exception as e:  # pydicom raises many types on damaged files
            raise MedicalImageError(f"{_label(path)}: unreadable DICOM ({safe_reason(e)})") from None
        if "PixelData" not in ds:
            raise MedicalImageError(f"{_label(path)}: DICOM file has no pixel data (not an image)")
        self.ds = ds
        self._check_decoder()
        with quiet_pydicom():
            self._read_attributes()
        self.frames: np.ndarray | None = None  # all decoded frames, when iterating a multi-frame file

    def _read_attributes(self):
        ds, path = self.ds, self.path
        try:
            self.count = int(ds.get("NumberOfFrames", 1) or 1)
            self.samples = int(ds.get("SamplesPerPixel", 1))
            self.photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
            self.rows, self.columns = int(ds.Rows), int(ds.Columns)
            spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing") or \
                _functional_group(ds, "PixelMeasuresSequence", "PixelSpacing")
            self.spacing = (round(float(spacing[0]), 6), round(float(spacing[1]), 6)) \
                if spacing and len(spacing) >= 2 else None
        except Exception as e:
            raise MedicalImageError(f"{_label(path)}: bad DICOM image attributes ({safe_reason(e)})") from None
        if self.count < 1:
            raise MedicalImageError(f"{_label(path)}: DICOM NumberOfFrames is {self.count}")
        _check_pixels(path, self.rows, self.columns, "frame")
        modality = str(ds.get("Modality", "") or "").strip().upper()
        body_part = str(ds.get("BodyPartExamined", "") or "").strip().lower()
        self.modality = modality or None
        self.body_part = body_part or None
        iop = ds.get("ImageOrientationPatient") or \
            _functional_group(ds, "PlaneOrientationSequence", "ImageOrientationPatient")
        self.orientation = _plane_from_iop(iop) if iop else None

    def _check_decoder(self):
        """Refuse a compressed transfer syntax nothing installed decodes; choose the plugins to try, in order."""
        from pydicom.pixels import get_decoder

        meta = getattr(self.ds, "file_meta", None)
        uid = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
        self._syntax, self._plugins = uid, [""]  # "": pydicom picks among every available plugin
        try:
            compressed = uid is not None and uid.is_compressed
        except Exception:  # a damaged or private transfer syntax UID
            compressed = False
        if not compressed:
            return
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:
            raise MedicalImageError(f"{_label(self.path)}: transfer syntax '{uid.name}' ({uid}) has no pixel "
                                    "data decoder in pydicom") from None
        if not decoder.is_available:
            raise MedicalImageError(
                f"{_label(self.path)}: transfer syntax '{uid.name}' ({uid}) needs a decoder package; install one "
                f"of: {'; '.join(decoder.missing_dependencies)}")
        preferred = [p for p in DICOM_PLUGIN_PREFERENCE if p in decoder.available_plugins]
        self._plugins = preferred + [""]

    def default_index(self) -> int:
        return 0

    def _decode(self, index: int | None) -> np.ndarray:
        """Stored values of frame `index` (None: all frames). Compressed data tries the dedicated codec packages
        (DICOM_PLUGIN_PREFERENCE) before pydicom's own choice among the rest (Pillow's JPEG and J2K decoders
        fail on 12-bit JPEG Extended and some J2K files the dedicated ones read)."""
        error = None
        for plugin in self._plugins:
            try:
                with quiet_pydicom():
                    self.ds.pixel_array_options(index=index, decoding_plugin=plugin)
                    return self.ds.pixel_array
            except BaseException as e:  # pydicom and its plugins raise many types on damaged or unsupported data
                if not (isinstance(e, Exception) or _is_decoder_panic(e)):
                    raise  # KeyboardInterrupt, SystemExit, ...
                error = error or e
            finally:
                self.ds._pixel_array = None  # do not keep a frame cached under the all-frames options
        syntax = f"transfer syntax '{self._syntax.name}'" if self._syntax is not None else "unknown transfer syntax"
        raise MedicalImageError(f"{_label(self.path)}: cannot decode DICOM pixel data ({syntax}; "
                                f"{safe_reason(error)})") from None

    def preload_frames(self) -> None:
        """Decode every frame of a multi-frame file at once (faster than one decode per frame)."""
        if self.count > 1 and self.frames is None:
            self.frames = self._decode(None)

    def frame_pixels(self, index: int) -> np.ndarray:
        """Stored values of one frame: (H, W) or (H, W, 3) (colour already RGB by pydicom)."""
        if self.count == 1:
            return self._decode(None)
        return self.frames[index] if self.frames is not None else self._decode(index)

    def image(self, index: int) -> MedicalImage:
        arr = self.frame_pixels(index)
        check_finite(arr, _label(self.path))
        try:
            with quiet_pydicom():
                unit, window, window_name = self._to_unit(arr, index)
        except MedicalImageError:
            raise
        except Exception as e:
            raise MedicalImageError(f"{_label(self.path)}: cannot map DICOM pixel values ({safe_reason(e)})") \
                from None
        spacing = self.spacing
        if unit.ndim == 2:
            unit, spacing = _square_pixels(unit, spacing, nearest=False, path=self.path)
        return MedicalImage(pixels=_to_uint8(unit), modality=self.modality, body_part=self.body_part,
                            pixel_spacing=spacing, orientation=self.orientation, index=index, count=self.count,
                            source_format="dicom", window=window, window_name=window_name,
                            photometric=self.photometric, source_size=(self.rows, self.columns))

    def _to_unit(self, arr: np.ndarray, index: int = 0):
        """Stored values -> [0, 1] float32, plus the window (centre, width) and how it was chosen."""
        from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

        ds = self.ds
        if self.photometric == "PALETTE COLOR":
            rgb = apply_color_lut(arr, ds)
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
            return rgb.astype(np.float32) / float(2 ** bits - 1), None, "palette"
        if arr.ndim == 3:  # colour: pydicom's decoders already converted YBR_* to RGB
            if arr.dtype == np.uint8:
                return arr.astype(np.float32) / 255.0, None, "none"
            bits = int(ds.get("BitsStored", arr.dtype.itemsize * 8))
            return arr.astype(np.float32) / float(2 ** bits - 1), None, "bit depth"
        values = apply_modality_lut(arr, ds)
        if "RescaleSlope" not in ds and "ModalityLUTSequence" not in ds:  # enhanced multi-frame objects
            slope = _functional_group(ds, "PixelValueTransformationSequence", "RescaleSlope", index)
            intercept = _functional_group(ds, "PixelValueTransformationSequence", "RescaleIntercept", index)
            if slope is not None:
                values = values * float(slope) + float(intercept or 0.0)
        frame_center = _functional_group(ds, "FrameVOILUTSequence", "WindowCenter", index)
        frame_width = _functional_group(ds, "FrameVOILUTSequence", "WindowWidth", index)
        if self.window is not None:
            unit, window, name = apply_window(values, *self.window), self.window, self.window_name
        elif self.window_name in STRETCHES:
            unit, name = grey_unit(values, None, self.window_name, _label(self.path))
            window = None
        elif "VOILUTSequence" in ds:
            lut = ds.VOILUTSequence[0]
            data = np.asarray(lut.LUTData)
            lo, hi = float(data.min()), float(data.max())
            voi = apply_voi_lut(values, ds, index=0, prefer_lut=True)
            unit, window, name = (voi - lo) / max(hi - lo, 1.0), None, "file VOI LUT"
        elif ("WindowCenter" in ds and "WindowWidth" in ds) or (frame_center is not None and frame_width is not None):
            if "WindowCenter" in ds and "WindowWidth" in ds:
                center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
                function = ds.get("VOILUTFunction")
            else:
                center, width = _first(frame_center), _first(frame_width)
                function = _functional_group(ds, "FrameVOILUTSequence", "VOILUTFunction", index)
            function = str(function or "LINEAR")
            unit, window, name = apply_window(values, center, width, function), (center, width), "file"
        elif self.modality == "CT":
            name = _CT_WINDOW_BY_BODY_PART.get((self.body_part or "").replace(" ", ""), "abdomen")
            window = CT_WINDOWS[name]
            unit = apply_window(values, *window)
        else:
            unit, window, name = percentile_unit(values), None, "percentile"
        if self.photometric == "MONOCHROME1":  # low values are white
            unit = 1.0 - unit
        return np.asarray(unit, np.float32), window, name


def _functional_group(ds, sequence: str, keyword: str, frame: int = 0):
    """`keyword` from an enhanced multi-frame object's per-frame functional group of `frame`, else from the
    shared functional groups, else None (e.g. PixelMeasuresSequence / PixelSpacing)."""
    for groups, item_index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        try:
            group = ds.get(groups)[item_index]
            value = group.get(sequence)[0].get(keyword)
        except (TypeError, IndexError, AttributeError):
            continue
        if value is not None and value != "":
            return value
    return None


def _first(value) -> float:
    """First entry of a possibly multi-valued DICOM number (several windows -> the first one)."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


# --------------------------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------------------------
def _load_nifti(path, volume: int, what: str = "NIfTI"):
    """-> (RAS+ canonical 3D float32 array, voxel sizes (3,), number of volumes)."""
    import nibabel as nib

    try:
        if isinstance(path, ImageSource) and path.obj is not None:
            img = path.obj
        elif isinstance(path, ImageSource) and (path.data is not None or not
                                                 path.path.lower().endswith(NIFTI_SUFFIXES)):
            # bytes, or a file whose name nibabel cannot type (nibabel goes by the suffix)
            img = _nifti_from_bytes(path.data if path.data is not None else Path(path.path).read_bytes())
        else:
            img = nib.load(path.path if isinstance(path, ImageSource) else os.fspath(path))
        _check_volume(path, tuple(int(n) for n in img.shape))
        img = nib.as_closest_canonical(img)
        shape = img.shape
        if len(shape) == 4:
            if not 0 <= volume < shape[3]:
                raise MedicalImageError(f"{_label(path)}: volume {volume} out of range (4D image has {shape[3]})")
            data = np.asarray(img.dataobj[..., volume], dtype=np.float32)
        elif len(shape) in (2, 3):
            data = np.asarray(img.dataobj, dtype=np.float32)
            data = data[..., None] if data.ndim == 2 else data
        else:
            raise MedicalImageError(f"{_label(path)}: {what} image has {len(shape)} dimensions; expected 3 or 4")
        zooms = tuple(round(float(z), 6) for z in img.header.get_zooms()[:3])
    except (MedicalImageError, LimitError):
        raise
    except Exception as e:
        raise MedicalImageError(f"{_label(path)}: unreadable {what} file ({safe_reason(e)})") from None
    zooms = zooms + (1.0,) * (3 - len(zooms))
    return data, zooms, (shape[3] if len(shape) == 4 else 1)


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
    limits = _limits(path)
    if limits is None:
        return
    voxels = int(np.prod(shape, dtype=np.int64)) if shape else 0
    if voxels > limits.max_volume_voxels:
        raise LimitError(f"{_label(path)}: volume of {'x'.join(map(str, shape))} = {voxels} voxels is over the "
                         f"limit of {limits.max_volume_voxels}")
    sides = sorted(shape[:3], reverse=True)
    if len(sides) >= 2:
        _check_pixels(path, sides[0], sides[1], "slice")


def _orient_slice(volume3d: np.ndarray, zooms, plane: str, index: int):
    """RAS+ volume -> (H, W) slice in radiological display orientation and its (row, col) spacing."""
    axis = _PLANE_AXIS[plane]
    a, b = [ax for ax in range(3) if ax != axis]
    # a view (axes a, b): np.take would copy the whole (Fortran-ordered) volume into C order for every slice
    plane2d = volume3d[(slice(None),) * axis + (index,)]
    # rows follow axis b from its positive end (anterior/superior at the top), columns axis a from its
    # positive end (patient right on the image's left, anterior on the left for sagittal).
    return plane2d.T[::-1, ::-1], (zooms[b], zooms[a])


class _NiftiSource:
    def __init__(self, path, window, plane, volume):
        self.path, self.plane, self.volume_index = path, plane, volume
        self.window, self.window_name = _parse_window(window, path)
        self.data, self.zooms, self.volumes = _load_nifti(path, volume)
        self.count = self.data.shape[_PLANE_AXIS[plane]]
        check_finite(self.data, _label(path))
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
        plane2d, spacing = _orient_slice(self.data, self.zooms, self.plane, index)
        source_size = plane2d.shape
        if self.window is not None:
            unit = apply_window(plane2d, *self.window)
        else:
            unit = np.clip((np.nan_to_num(plane2d, nan=self.lo) - self.lo) / (self.hi - self.lo), 0, 1)
        unit, spacing = _square_pixels(unit, spacing, nearest=False, path=self.path)
        return MedicalImage(pixels=_to_uint8(unit), pixel_spacing=spacing, orientation=self.plane, index=index,
                            count=self.count, volume=self.volume_index if self.volumes > 1 else None,
                            source_format="nifti", window=self.window,
                            window_name=self.window_name or "percentile", photometric="MONOCHROME2",
                            source_size=source_size)


# --------------------------------------------------------------------------------------------------------------
# Pillow (PNG / JPEG / TIFF / BMP)
# --------------------------------------------------------------------------------------------------------------
def _pillow_open(path):
    """Open with decompression-bomb warnings turned into errors (and an `ImageSource`'s pixel limit checked from
    the header before decoding). Returns an Image (loaded) or raises."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(path, ImageSource) and path.obj is not None:
                img = path.obj
            else:
                img = Image.open(path.readable() if isinstance(path, ImageSource) else path)
            _check_pixels(path, img.size[1], img.size[0])
            img.load()
            return img
    except (LimitError, MedicalImageError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MedicalImageError(f"{_label(path)}: refused: more pixels than PIL.Image.MAX_IMAGE_PIXELS "
                                f"({Image.MAX_IMAGE_PIXELS}), a possible decompression bomb") from None
    except UnidentifiedImageError:
        raise MedicalImageError(f"{_label(path)}: not a readable image file") from None
    except Exception as e:  # Pillow's plugins raise many types (OSError, SyntaxError, TypeError, KeyError, ...)
        raise MedicalImageError(f"{_label(path)}: corrupt or truncated image ({safe_reason(e)})") from None


def _pillow_frame(path, img, index: int):
    if index:
        try:
            img.seek(index)
            img.load()
        except Exception as e:  # damaged later frames fail as variously as the first
            raise MedicalImageError(f"{_label(path)}: cannot read frame {index} ({safe_reason(e)})") from None
    return img


class _PillowSource:
    def __init__(self, path, fmt, window=None):
        self.path = path
        self.window, self.window_name = _parse_window(window, path)
        self.img = _pillow_open(path)
        self.fmt = fmt if fmt != "image" else (self.img.format or "image").lower()
        try:
            self.count = int(getattr(self.img, "n_frames", 1))
        except Exception as e:  # counting frames walks a damaged file
            raise MedicalImageError(f"{_label(path)}: corrupt image frames ({safe_reason(e)})") from None

    def default_index(self) -> int:
        return 0

    def image(self, index: int) -> MedicalImage:
        img = _pillow_frame(self.path, self.img, index)
        mode = img.mode
        try:
            if mode.startswith("I;16") or mode in ("I", "F", "L"):
                unit, name = grey_unit(np.asarray(img), self.window, self.window_name, _label(self.path))
            else:
                unit, name = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0, "none"
        except MedicalImageError:
            raise
        except Exception as e:  # a damaged file can fail as late as the conversion
            raise MedicalImageError(f"{_label(self.path)}: corrupt image data ({safe_reason(e)})") from None
        return MedicalImage(pixels=_to_uint8(unit), index=index, count=self.count, source_format=self.fmt,
                            window_name=name, photometric=mode, source_size=(img.size[1], img.size[0]))


# --------------------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------------------
def _binary_to_labels(labels: np.ndarray) -> np.ndarray:
    """A 0/255 (or 0/65535) binary mask becomes 0/1; label maps (0, 1, 2, ...) are kept as they are."""
    values = np.unique(labels)
    if values.size <= 2 and values.max(initial=0) in (255, 65535):
        return (labels > 0).astype(np.int32)
    return labels.astype(np.int32)


class _MaskSlices:
    """Label slices of a mask file, in the same geometry as the image source they belong to."""

    def __init__(self, path, source):
        self.path, self.source = path, source
        image_name = _label(source.path)
        if isinstance(source, _NiftiSource):
            if detect_format(path) != "nifti":
                raise MaskError(f"{_label(path)}: a NIfTI image needs a NIfTI mask")
            data, self.zooms, _ = _load_nifti(path, 0, what="NIfTI mask")
            if data.shape != source.data.shape:
                raise MaskError(f"{_label(path)}: mask shape {data.shape} does not match image "
                                        f"{image_name} shape {source.data.shape}")
            self.volume = np.rint(np.nan_to_num(data)).astype(np.int32)
            return
        # 2D image (or each DICOM frame): one 2D label map, or one per frame in a multi-page TIFF.
        img = _pillow_open(path) if detect_format(path) not in ("dicom", "nifti") else None
        if img is None:
            raise MaskError(f"{_label(path)}: 2D masks must be PNG / TIFF / BMP label images")
        pages = []
        for i in range(int(getattr(img, "n_frames", 1))):
            page = _pillow_frame(path, img, i)
            page = page.convert("L") if page.mode in ("RGB", "RGBA", "LA", "1") else page
            pages.append(_binary_to_labels(np.asarray(page)))
        expected = (source.rows, source.columns) if isinstance(source, _DicomSource) else \
            (source.img.size[1], source.img.size[0])
        if pages[0].shape != expected:
            raise MaskError(f"{_label(path)}: mask size {pages[0].shape[1]}x{pages[0].shape[0]} does "
                                    f"not match image {image_name} size {expected[1]}x{expected[0]}")
        if len(pages) not in (1, source.count):
            raise MaskError(f"{_label(path)}: mask has {len(pages)} frames, image {image_name} has "
                                    f"{source.count}")
        self.pages = pages

    def slice(self, index: int) -> np.ndarray:
        if isinstance(self.source, _NiftiSource):
            plane2d, spacing = _orient_slice(self.volume, self.zooms, self.source.plane, index)
            return _square_pixels(np.ascontiguousarray(plane2d), spacing, nearest=True)[0]
        page = self.pages[index if len(self.pages) > 1 else 0]
        if isinstance(self.source, _DicomSource) and self.source.spacing is not None:
            page = _square_pixels(page, self.source.spacing, nearest=True)[0]
        return page


def _open_mask(path, source) -> _MaskSlices:
    if not os.path.isfile(path):
        raise MaskError(f"{_label(path)}: no such mask file")
    try:
        return _MaskSlices(path, source)
    except MaskError:
        raise
    except MedicalImageError as e:  # the mask file itself is unreadable
        raise MaskError(f"mask {e}") from None
