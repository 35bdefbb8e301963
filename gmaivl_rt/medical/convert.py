"""Whatever a service holds as an image -> one `MedicalImage`, through the readers of `gmaivl_rt.medical.reader`.

Accepted (`to_medical_image`):
* a path: str, bytes (`os.fsencode`) or os.PathLike; the format is sniffed from the file's first bytes, then
  taken from its suffix;
* raw bytes (bytes, bytearray, memoryview) or a binary file object (`.read()`), sniffed by magic: DICOM (the
  128-byte preamble + "DICM", or a preamble-less dataset), PNG, JPEG, TIFF, BMP, GIF, WebP, NIfTI-1/-2 (.nii, or
  gzip -> .nii.gz);
* a `pydicom.Dataset`, a nibabel NIfTI image, a PIL image in any mode (16-bit and float read exactly as the same
  data read from a PNG/TIFF file);
* a numpy array or torch tensor, (H, W), (H, W, 1) or (H, W, 3|4), of uint8, uint16, int16, int32 or float.
  Windowing (`window=`), the same rule as for files (`windowing.grey_unit`): by default uint8 is taken as is,
  other non-negative integers are scaled by their bit depth (12-bit data by 4095, 16-bit by 65535), signed data
  with negatives and floats by the 0.5-99.5 percentiles; or window="percentile", "minmax", a CT window name
  ("lung", "bone", ...) or a DICOM-style (centre, width) pair in the array's units;
* a `MedicalImage` (returned as is after a shape check).
Anything else: `InputError` naming the type. Errors name the image by its role ("image 1") and the problem, never
its bytes, file name or header values. Limits (`gmaivl_rt.limits.Limits`) are checked before decoding.
"""
from __future__ import annotations

import os

import numpy as np

from gmaivl_rt.errors import InputError, LimitError
from gmaivl_rt.limits import DEFAULT_LIMITS, Limits, type_name
from gmaivl_rt.medical.base import ImageSource, MedicalImage, MedicalImageError, detect_format
from gmaivl_rt.medical.nifti import PLANES
from gmaivl_rt.medical.reader import read_medical_image
from gmaivl_rt.medical.windowing import grey_unit, parse_window, to_uint8

ARRAY_DTYPES = (np.uint8, np.uint16, np.int16, np.int32, np.float16, np.float32, np.float64)
# the leading bytes `sniff_format` reads: the DICOM preamble (132) and a NIfTI-2 header's magic (4..8) / NIfTI-1's
# (344..348)
HEAD_BYTES = 552


def sniff_format(head: bytes) -> str | None:
    """'dicom' | 'nifti' | 'image' (what Pillow opens) from a file's first bytes, or None when unknown."""
    if head[128:132] == b"DICM":
        return "dicom"
    if head[:2] == b"\x1f\x8b":  # gzip: NIfTI is the gzipped format we read
        return "nifti"
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] in (b"n+2\x00", b"ni2\x00"):
        return "nifti"
    if (head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM", b"GIF87a", b"GIF89a"))
            or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")):
        return "image"
    # A DICOM dataset without preamble starts with a group 0x0002 or 0x0008 element (little endian).
    if head[:2] in (b"\x02\x00", b"\x08\x00") and len(head) >= 8:
        return "dicom"
    return None


def _check_index(value, role: str):
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise InputError(f"{role} must be an int >= 0, got {type_name(value)}")
    return int(value)


def _from_bytes(data: bytes, role: str, limits: Limits) -> ImageSource:
    if len(data) > limits.max_image_bytes:
        raise LimitError(f"{role}: {len(data)} bytes is over the limit of {limits.max_image_bytes}")
    if not data:
        raise InputError(f"{role}: empty image data")
    fmt = sniff_format(data[:HEAD_BYTES])
    if fmt is None:
        raise InputError(f"{role}: not a recognised image (expected DICOM, NIfTI, PNG, JPEG, TIFF, BMP, GIF or WebP "
                         "bytes)")
    return ImageSource(label=role, format=fmt, data=data, limits=limits)


def _from_path(path, role: str, limits: Limits) -> ImageSource:
    try:
        name = os.fsdecode(path)
    except (TypeError, ValueError):
        raise InputError(f"{role}: not a usable path") from None
    if "\x00" in name:
        raise InputError(f"{role}: a path cannot contain NUL characters (raw image bytes must be given as bytes "
                         "that start like an image file)")
    try:
        exists = os.path.isfile(name)
        if exists:
            size = os.path.getsize(name)
            with open(name, "rb") as f:
                head = f.read(HEAD_BYTES)
    except OSError as e:
        raise InputError(f"{role}: cannot open the file ({e.strerror})") from None
    except ValueError:  # e.g. a name the OS cannot take
        raise InputError(f"{role}: not a usable path") from None
    if not exists:
        raise InputError(f"{role}: no such file")
    if size > limits.max_image_bytes:
        raise LimitError(f"{role}: file of {size} bytes is over the limit of {limits.max_image_bytes}")
    fmt = sniff_format(head) or detect_format(name)
    return ImageSource(label=role, format=fmt, path=name, limits=limits)


def looks_like_path(data: bytes) -> bool:
    """A bytes object that is a file name (os.fsencode(path)) rather than image data: the one rule the converter
    and the runtime's prepared-image cache (gmaivl_rt/runtime/prepared_images.py) both read bytes by."""
    return len(data) < 4096 and b"\x00" not in data and sniff_format(data[:HEAD_BYTES]) is None \
        and os.path.isfile(os.fsdecode(data))


def _array_image(obj, role: str, window, limits: Limits) -> MedicalImage:
    if type(obj).__module__.startswith("torch"):
        obj = obj.detach().cpu().numpy()
    array = np.asarray(obj)
    if array.dtype not in ARRAY_DTYPES:
        raise InputError(f"{role}: array dtype {array.dtype} is not one of "
                         f"{', '.join(np.dtype(d).name for d in ARRAY_DTYPES)}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))) or 0 in array.shape:
        raise InputError(f"{role}: array shape {tuple(array.shape)} is not (H, W), (H, W, 1) or (H, W, 3|4)")
    if array.shape[0] * array.shape[1] > limits.max_image_pixels:
        raise LimitError(f"{role}: {array.shape[1]}x{array.shape[0]} = {array.shape[0] * array.shape[1]} pixels is "
                         f"over the limit of {limits.max_image_pixels}")
    if array.ndim == 3:
        array = array[..., :3]  # alpha dropped, as PIL's RGBA -> RGB does
    parsed, name = parse_window(window, ImageSource(label=role, format="array"))
    unit, how = grey_unit(array, parsed, name, role)
    return MedicalImage(pixels=to_uint8(unit), source_format="array", window=parsed, window_name=how,
                        photometric="RGB" if array.ndim == 3 else "MONOCHROME2", source_size=array.shape[:2])


def _check_medical_image(image: MedicalImage, role: str, limits: Limits) -> MedicalImage:
    pixels = image.pixels
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise InputError(f"{role}: MedicalImage.pixels must be an (H, W, 3) uint8 array")
    if pixels.shape[0] * pixels.shape[1] > limits.max_image_pixels:
        raise LimitError(f"{role}: {pixels.shape[1]}x{pixels.shape[0]} pixels is over the limit of "
                         f"{limits.max_image_pixels}")
    return image


def to_medical_image(obj, *, role: str = "image 1", limits: Limits | None = None, frame: int | None = None,
                     slice_index: int | None = None, plane: str | None = None, window=None) -> MedicalImage:
    """Any accepted image form (see the module docstring) -> MedicalImage with pixels (H, W, 3) uint8.

    frame: DICOM / TIFF / GIF frame; slice_index: NIfTI slice along `plane` ("axial" default, "coronal",
    "sagittal"); window: None, "percentile", "minmax", a CT window name or (centre, width).
    Raises InputError (MedicalImageError for unreadable data) or LimitError, naming `role`."""
    limits = limits or DEFAULT_LIMITS
    frame = _check_index(frame, "frame")
    slice_index = _check_index(slice_index, "slice_index")
    if plane is not None and plane not in PLANES:
        raise InputError(f"plane must be one of {', '.join(PLANES)}, got {type_name(plane)}")
    reader = {"frame": frame, "slice_index": slice_index, "plane": plane or "axial", "window": window}

    if isinstance(obj, MedicalImage):
        return _check_medical_image(obj, role, limits)
    source = _byte_source(obj, role, limits)
    if source is None:
        source = _object_source(obj, role, limits)
        if source is None:
            if type(obj).__module__.split(".")[0] in ("numpy", "torch"):
                if frame is not None or slice_index is not None:
                    raise InputError(f"{role}: frame / slice_index given, but an array holds one picture")
                return _array_image(obj, role, window, limits)
            raise InputError(f"{role}: unsupported image type {type_name(obj)} (give a path, bytes, a binary file, "
                             "a pydicom Dataset, a nibabel image, a PIL image, an array or a MedicalImage)")
    try:
        return read_medical_image(source, **reader)
    except InputError:  # MedicalImageError, LimitError: already named by role
        raise
    except MemoryError:
        raise LimitError(f"{role}: not enough memory to decode it") from None
    except Exception as e:  # a decoder's own failure on damaged data: its text may quote the data, so only its type
        raise MedicalImageError(f"{role}: cannot decode the image ({type(e).__name__})") from None


def _byte_source(obj, role: str, limits: Limits, rewind: bool = False):
    """bytes (or a path given as bytes), a path, or a binary file object -> its source; None for any other type.
    rewind: seek a seekable file object back to where it was (its bytes are read again later)."""
    if isinstance(obj, (bytearray, memoryview)):
        obj = bytes(obj)
    if isinstance(obj, bytes):
        return _from_path(obj, role, limits) if looks_like_path(obj) else _from_bytes(obj, role, limits)
    if isinstance(obj, str) or hasattr(obj, "__fspath__"):
        return _from_path(obj, role, limits)
    if not (hasattr(obj, "read") and callable(obj.read)):
        return None
    position = obj.tell() if rewind and hasattr(obj, "tell") and hasattr(obj, "seek") else None
    try:
        data = obj.read(limits.max_image_bytes + 1)
        if position is not None:
            obj.seek(position)
    except Exception as e:  # closed file, text-mode file, a stream that fails
        raise InputError(f"{role}: the file object cannot be read ({type(e).__name__})") from None
    if not isinstance(data, (bytes, bytearray)):
        raise InputError(f"{role}: the file object gave {type_name(data)}, not bytes (open it in binary mode)")
    return _from_bytes(bytes(data), role, limits)


def decoded_pixels(obj, *, role: str = "image 1", limits: Limits | None = None) -> int:
    """How many pixel values `to_medical_image(obj, ...)` decodes, read from the image's header alone, nothing
    decoded (Pillow's lazy open, pydicom without the pixel data, the NIfTI header): for a picture (PNG, JPEG, ...,
    a DICOM frame) its width x height, three times that when it is read as colour; for a NIfTI file its whole 3D
    volume (the reader loads the volume to take a slice). Frame, slice and plane do not change it (one frame is
    decoded; the whole volume is loaded for any slice). obj: bytes, a path or a binary file object, as
    `to_medical_image` takes them. Raises what the reader raises for the same header (InputError naming `role`,
    MedicalImageError, LimitError over the per-image limits), so a refused header costs no decoding."""
    from gmaivl_rt.medical.dicom import dicom_decoded_pixels
    from gmaivl_rt.medical.images import pillow_decoded_pixels
    from gmaivl_rt.medical.nifti import nifti_decoded_voxels

    limits = limits or DEFAULT_LIMITS
    source = _byte_source(obj, role, limits, rewind=True)
    if source is None:
        raise InputError(f"{role}: decoded_pixels takes bytes, a path or a binary file object, not {type_name(obj)}")
    try:
        if source.format == "dicom":
            return dicom_decoded_pixels(source)
        if source.format == "nifti":
            return nifti_decoded_voxels(source)
        return pillow_decoded_pixels(source)
    except InputError:
        raise
    except MemoryError:
        raise LimitError(f"{role}: not enough memory to read its header") from None
    except Exception as e:  # as in to_medical_image: a library's own failure on damaged data names only its type
        raise MedicalImageError(f"{role}: cannot read the image header ({type(e).__name__})") from None


def _object_source(obj, role: str, limits: Limits) -> ImageSource | None:
    """pydicom Dataset / nibabel image / PIL image -> ImageSource; None for anything else."""
    module = type(obj).__module__.split(".")[0]
    if module == "pydicom":
        from pydicom import Dataset

        if isinstance(obj, Dataset):
            return ImageSource(label=role, format="dicom", obj=obj, limits=limits)
    if module == "nibabel":
        from nibabel.spatialimages import SpatialImage

        if isinstance(obj, SpatialImage):
            return ImageSource(label=role, format="nifti", obj=obj, limits=limits)
    if module == "PIL":
        from PIL import Image

        if isinstance(obj, Image.Image):
            return ImageSource(label=role, format=(obj.format or "image").lower(), obj=obj, limits=limits)
    return None
