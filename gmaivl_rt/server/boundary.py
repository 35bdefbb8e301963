"""The request boundary as the server applies it: its `Limits` (the engine's unless given, with the server's
images-per-request override), the image count checked before anything is decoded, and image URLs read into
`MedicalImage`s through `gmaivl_rt.medical.convert.to_medical_image` (call from a worker thread: it decodes)."""
from __future__ import annotations

import hashlib
import io
from dataclasses import replace
from pathlib import Path

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


def sha256_hex(source: bytes | Path) -> str:
    """The SHA-256 (hex) of an image's bytes as received: the bytes themselves, or the file's."""
    if isinstance(source, bytes):
        return hashlib.sha256(source).hexdigest()
    digest = hashlib.sha256()
    with open(source, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_images(urls: list[protocol.ImageURL], limits: Limits, digests: list | None = None, **media_options) -> list:
    """Image URLs -> MedicalImages (pixels (H, W, 3) uint8), named "image 1", "image 2", ... in errors.
    media_options: `read_image_url`'s allowed_local_media_path / allow_remote_media. `digests`: a list each image's
    `sha256_hex` is appended to as it is received (before it is decoded, so a refused image has one too)."""
    out = []
    for i, image_url in enumerate(urls, start=1):
        role = f"image {i}"
        source = read_image_url(image_url.url, role=role, max_bytes=int(limits.max_image_bytes), **media_options)
        if digests is not None:
            try:
                digests.append(sha256_hex(source))
            except OSError:  # the file went away: the boundary names that below; its message never names the file
                pass
        if isinstance(source, bytes):  # as a file object: short bytes are never taken for a server path
            source = io.BytesIO(source)
        out.append(to_medical_image(source, role=role, limits=limits, **image_url.reader_options()))
    return out
