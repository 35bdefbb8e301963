"""The preview endpoint's answer: the picture the model would see for an image URL (a DICOM frame, a NIfTI slice,
an ordinary image, after windowing), as PNG, and what the file says about itself, never who the patient is."""
from __future__ import annotations

import base64
import io

from gmaivl_rt.medical.base import modality_name


def safe_metadata(image) -> dict:
    """What the page shows about a `MedicalImage`: whitelisted, non-identifying fields only (MedicalImage carries
    no patient or study identity in the first place)."""
    return {"format": image.source_format, "modality": image.modality,
            "modality_name": modality_name(image.modality) if image.modality else None,
            "body_part": image.body_part, "width": image.width, "height": image.height,
            "source_size": list(image.source_size) if image.source_size else None,
            "index": image.index, "count": image.count, "orientation": image.orientation,
            "pixel_spacing": list(image.pixel_spacing) if image.pixel_spacing else None,
            "window": list(image.window) if image.window else None, "window_name": image.window_name}


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
