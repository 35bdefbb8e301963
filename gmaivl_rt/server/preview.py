"""The preview endpoint's answer: the picture the model would see for an image URL (a DICOM frame, a NIfTI slice,
an ordinary image, after windowing), as PNG, and what the file says about itself, never who the patient is."""
from __future__ import annotations

import base64
import io
import math

from gmaivl_rt.medical.base import body_part_term, modality_code, modality_name

PLANES = ("axial", "coronal", "sagittal", "oblique")


def safe_metadata(image) -> dict:
    """What the page shows about a `MedicalImage`: numbers, and text only from closed vocabularies (DICOM modality
    codes, body part terms, planes, the reader's own format and window names), never free text from a header.
    The readers already keep only such terms; the preview checks again, as its answer leaves the server."""
    modality = modality_code(image.modality)
    return {"format": image.source_format, "modality": modality,
            "modality_name": modality_name(modality) if modality else None,
            "body_part": body_part_term(image.body_part), "width": image.width, "height": image.height,
            "source_size": list(image.source_size) if image.source_size else None,
            "index": image.index, "count": image.count,
            "orientation": image.orientation if image.orientation in PLANES else None,
            "pixel_spacing": _finite(image.pixel_spacing), "window": _finite(image.window),
            "window_name": image.window_name}


def _finite(values) -> list[float] | None:
    """A pair of numbers for JSON, or None when absent or not finite (a header's NaN would fail the encoder)."""
    if not values or not all(math.isfinite(float(v)) for v in values):
        return None
    return [float(v) for v in values]


def png_data_uri(pixels) -> str:
    """(H, W, 3) uint8 pixels -> a PNG `data:` URI."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")



def preview(image) -> dict:
    """POST /v1/gmaivl/preview's answer for a `MedicalImage`: the picture the model sees as a PNG data URI, and
    its safe metadata."""
    return {"image": png_data_uri(image.pixels), "metadata": safe_metadata(image)}
