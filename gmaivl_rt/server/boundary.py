"""The request boundary as the server applies it: its `Limits` (the engine's unless given, with the server's
images-per-request override), the image count checked before anything is decoded, and image URLs read into
`MedicalImage`s through `gmaivl_rt.medical.convert.to_medical_image` (call from a worker thread: it decodes)."""
from __future__ import annotations

import io
from dataclasses import replace

from gmaivl_rt.errors import LimitError
from gmaivl_rt.limits import Limits
from gmaivl_rt.medical.convert import to_medical_image
from gmaivl_rt.server import protocol
from gmaivl_rt.server.media import read_image_url


def server_limits(engine, limits, max_images_per_request) -> Limits:
    """The request boundary's `Limits` this server applies: given, else the engine's, else the defaults; with
    `max_images_per_request` overriding its images-per-request ceiling."""
    runtime = getattr(engine, "backend", None)
    limits = limits or getattr(engine, "limits", None) or getattr(runtime, "limits", None) or Limits()
    if max_images_per_request is not None:
        limits = replace(limits, max_images_per_request=int(max_images_per_request))
    return limits


def check_image_count(limits: Limits, count: int) -> None:
    # Checked before any image is decoded, so a request with a thousand images costs nothing.
    if count > limits.max_images_per_request:
        raise LimitError(f"request has {count} images; the limit is {limits.max_images_per_request} "
                         "(--max-images-per-request)")


def read_images(urls: list[protocol.ImageURL], limits: Limits, **media_options) -> list:
    """Image URLs -> MedicalImages (pixels (H, W, 3) uint8), named "image 1", "image 2", ... in errors.
    media_options: `read_image_url`'s allowed_local_media_path / allow_remote_media."""
    out = []
    for i, image_url in enumerate(urls, start=1):
        role = f"image {i}"
        source = read_image_url(image_url.url, role=role, max_bytes=int(limits.max_image_bytes), **media_options)
        if isinstance(source, bytes):  # as a file object: short bytes are never taken for a server path
            source = io.BytesIO(source)
        out.append(to_medical_image(source, role=role, limits=limits, **image_url.reader_options()))
    return out
