"""Stored pixel values -> [0, 1] -> uint8: DICOM windowing (PS3.3 C.11.2.1.2), the named CT windows, percentile
and min-max stretches, bit-depth scaling, and the one rule (`grey_unit`) that picks among them for greyscale data
whatever it came from (a file, a PIL image or an array)."""
from __future__ import annotations

import numpy as np

from gmaivl_rt.medical.base import MedicalImageError, check_finite, source_label

# Named CT windows (centre, width) in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "abdomen": (40.0, 400.0),
}
# Which named window a CT without its own window gets, by (lower-cased) BodyPartExamined.
CT_WINDOW_BY_BODY_PART = {
    "head": "brain", "brain": "brain", "skull": "bone", "chest": "mediastinum", "thorax": "mediastinum",
    "lung": "lung", "abdomen": "abdomen", "pelvis": "abdomen", "liver": "abdomen", "spine": "bone",
    "cspine": "bone", "tspine": "bone", "lspine": "bone", "extremity": "bone",
}
PERCENTILES = (0.5, 99.5)


def ct_window_name(body_part: str | None) -> str:
    """The named CT window a CT image without a window of its own is shown with: by body part, else abdomen."""
    return CT_WINDOW_BY_BODY_PART.get((body_part or "").replace(" ", ""), "abdomen")


# Intensity mappings a caller may ask for by name instead of a (centre, width) window.
STRETCHES = ("percentile", "minmax")


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


def parse_window(window, path) -> tuple[tuple[float, float] | None, str | None]:
    """A caller's `window=` -> ((centre, width) or None, how it was named or None).

    None -> (None, None); "percentile" / "minmax" -> (None, that name); a CT window name -> (its window, the name);
    a (centre, width) pair -> ((centre, width), "user"). Anything else raises MedicalImageError naming `path`."""
    if window is None:
        return None, None
    if isinstance(window, str):
        if window.lower() in STRETCHES:
            return None, window.lower()
        if window.lower() not in CT_WINDOWS:
            raise MedicalImageError(f"{source_label(path)}: unknown window {window[:20]!r}; choose one of "
                                    f"{sorted(CT_WINDOWS) + list(STRETCHES)} or give (centre, width)")
        return CT_WINDOWS[window.lower()], window.lower()
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError):
        raise MedicalImageError(f"{source_label(path)}: window must be a name or (centre, width), got "
                                f"{type(window).__name__}") from None
    if not (np.isfinite(center) and np.isfinite(width)) or width <= 0:
        raise MedicalImageError(f"{source_label(path)}: window width must be positive, got {width}")
    return (center, width), "user"


def minmax_unit(values: np.ndarray) -> np.ndarray:
    """Map finite values to [0, 1] by their minimum and maximum (NaN -> 0); constant -> 0."""
    x = np.asarray(values, np.float64)
    finite = x[np.isfinite(x)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    return np.clip((np.nan_to_num(x, nan=lo) - lo) / (hi - lo), 0, 1).astype(np.float32)


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


def bit_depth_unit(values: np.ndarray) -> np.ndarray:
    """Unsigned integer data -> [0, 1] float32 by the smallest bit depth (>= 8) that holds its maximum."""
    vmax = int(values.max()) if values.size else 0
    bits = max(8, vmax.bit_length())
    return (values.astype(np.float32) / float(2 ** bits - 1)).astype(np.float32)


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
        return bit_depth_unit(values), "bit depth"
    return percentile_unit(values), "percentile"


def to_uint8(unit: np.ndarray) -> np.ndarray:
    """[0, 1] float (H, W) or (H, W, 3) -> (H, W, 3) uint8."""
    out = np.clip(np.rint(np.asarray(unit, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(out[..., None], 3, axis=-1) if out.ndim == 2 else out
