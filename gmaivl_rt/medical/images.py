"""Ordinary images (Pillow: PNG / JPEG / TIFF / BMP, and what else Pillow opens) -> `MedicalImage`: 16-bit and
float greyscale through `windowing.grey_unit`, multi-page TIFF frames, decompression bombs (more than
`PIL.Image.MAX_IMAGE_PIXELS`, or over the request's pixel limit, from the header) refused."""
from __future__ import annotations

import warnings

import numpy as np

from gmaivl_rt.errors import LimitError
from gmaivl_rt.medical.base import ImageSource, MedicalImage, MedicalImageError, check_pixels, safe_reason, source_label
from gmaivl_rt.medical.windowing import grey_unit, parse_window, to_uint8


def pillow_open(path, load: bool = True):
    """Open with decompression-bomb warnings turned into errors (and an `ImageSource`'s pixel limit checked from
    the header before decoding). Returns an Image (loaded; with load=False only its header read) or raises."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(path, ImageSource) and path.obj is not None:
                img = path.obj
            else:
                img = Image.open(path.readable() if isinstance(path, ImageSource) else path)
            check_pixels(path, img.size[1], img.size[0])
            if load:
                img.load()
            return img
    except (LimitError, MedicalImageError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MedicalImageError(f"{source_label(path)}: refused: more pixels than PIL.Image.MAX_IMAGE_PIXELS "
                                f"({Image.MAX_IMAGE_PIXELS}), a possible decompression bomb") from None
    except UnidentifiedImageError:
        raise MedicalImageError(f"{source_label(path)}: not a readable image file") from None
    except Exception as e:  # Pillow's plugins raise many types (OSError, SyntaxError, TypeError, KeyError, ...)
        raise MedicalImageError(f"{source_label(path)}: corrupt or truncated image ({safe_reason(e)})") from None


def pillow_frame(path, img, index: int):
    """`img` (opened by `pillow_open`) moved to frame `index` and loaded; errors name `path`."""
    if index:
        try:
            img.seek(index)
            img.load()
        except Exception as e:  # damaged later frames fail as variously as the first
            raise MedicalImageError(f"{source_label(path)}: cannot read frame {index} ({safe_reason(e)})") from None
    return img


def is_grey_mode(mode: str) -> bool:
    """Pillow modes read as one grey channel (`grey_unit`); every other mode is converted to RGB."""
    return mode.startswith("I;16") or mode in ("I", "F", "L")


def pillow_decoded_pixels(path) -> int:
    """Pixel values `PillowSource(path).image(...)` decodes, from the header alone (nothing decoded): width x height,
    three times that for a picture read as colour. Raises what `pillow_open` raises."""
    img = pillow_open(path, load=False)
    try:
        return img.size[0] * img.size[1] * (1 if is_grey_mode(img.mode) else 3)
    finally:
        if not (isinstance(path, ImageSource) and path.obj is not None):
            img.close()


class PillowSource:
    """One image file Pillow reads (a path or an `ImageSource`): `count` frames, `image(index)` -> MedicalImage.
    fmt: the detected format ("png", ... or "image" to take Pillow's); window: as `read_medical_image` takes it."""

    def __init__(self, path, fmt, window=None):
        self.path = path
        self.window, self.window_name = parse_window(window, path)
        self.img = pillow_open(path)
        self.fmt = fmt if fmt != "image" else (self.img.format or "image").lower()
        try:
            self.count = int(getattr(self.img, "n_frames", 1))
        except Exception as e:  # counting frames walks a damaged file
            raise MedicalImageError(f"{source_label(path)}: corrupt image frames ({safe_reason(e)})") from None

    def default_index(self) -> int:
        return 0

    def image(self, index: int) -> MedicalImage:
        img = pillow_frame(self.path, self.img, index)
        mode = img.mode
        try:
            if is_grey_mode(mode):
                unit, name = grey_unit(np.asarray(img), self.window, self.window_name, source_label(self.path))
            else:
                unit, name = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0, "none"
        except MedicalImageError:
            raise
        except Exception as e:  # a damaged file can fail as late as the conversion
            raise MedicalImageError(f"{source_label(self.path)}: corrupt image data ({safe_reason(e)})") from None
        return MedicalImage(pixels=to_uint8(unit), index=index, count=self.count, source_format=self.fmt,
                            window_name=name, photometric=mode, source_size=(img.size[1], img.size[0]))

