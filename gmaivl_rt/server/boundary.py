"""The request boundary as the server applies it: its `Limits` (the engine's unless given, with the server's
images-per-request override), the image count checked before anything is decoded, and image URLs received with
their headers read (`receive_images`), then decoded into `MedicalImage`s through
`gmaivl_rt.medical.convert.to_medical_image` (`decode_images`, in the decode pool of `gmaivl_rt.server.decoding`)."""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, replace
from pathlib import Path

from gmaivl_rt.errors import LimitError
from gmaivl_rt.limits import Limits
from gmaivl_rt.medical.convert import decoded_pixels, to_medical_image
from gmaivl_rt.server import protocol
from gmaivl_rt.server.media import data_uri_head, read_image_url


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


@dataclass(frozen=True, eq=False)
class ReceivedImage:
    """One image of a request as received, not yet decoded: `source` (its bytes, or its path for file:// URLs), the
    reader options of its `image_url` (frame, slice_index, plane, window) and `pixels`, the pixel values decoding
    it will take, read from its header (`gmaivl_rt.medical.convert.decoded_pixels`)."""

    role: str
    source: bytes | Path
    options: dict
    pixels: int


def receive_images(urls: list[protocol.ImageURL], limits: Limits, digests: list | None = None, check=None,
                   **media_options) -> list[ReceivedImage]:
    """Image URLs -> `ReceivedImage`s, named "image 1", "image 2", ... in errors; only headers are read (a bad one
    raises the reader's InputError, naming the image by role). media_options: `read_image_url`'s
    allowed_local_media_path / allow_remote_media / allowed_media_domains / remote_timeout_s. `digests`: a list each
    image's `sha256_hex` is appended to as it is received (before its header is read, so a refused image has one
    too). `check`: called with the pixel counts read so far after each header (it may raise: a request over its
    budget is refused at the header that takes it over, the rest never read), first with the counts of the inline
    images' heads (`head_pixels`), so such a request is refused before any image is read whole. Blocking (fetches,
    reads files): call from a worker thread."""
    def read(i: int):
        return read_image_url(urls[i].url, role=f"image {i + 1}", max_bytes=int(limits.max_image_bytes),
                              **media_options)

    if check is not None:
        _check_heads(urls, limits, check, read, digests)
    out = []
    for i, image_url in enumerate(urls):
        role = f"image {i + 1}"
        source = read(i)
        if digests is not None:
            _digest(source, digests)
        # bytes as a file object: short bytes are never taken for a server path
        header = io.BytesIO(source) if isinstance(source, bytes) else source
        out.append(ReceivedImage(role, source, image_url.reader_options(),
                                 decoded_pixels(header, role=role, limits=limits)))
        if check is not None:
            check([image.pixels for image in out])
    return out


def _check_heads(urls, limits: Limits, check, read, digests: list | None) -> None:
    """`check` the pixel counts of the request's leading inline images read from their heads (`head_pixels`),
    before any image is read whole: a request over its budget is refused without decoding its images' base64.
    Stops at the first image whose head gives no count (the whole-image pass then counts it and the rest). A refused
    request's images up to the refused one are still read and digested for the audit log, as they are sent."""
    counts = []
    for i, image_url in enumerate(urls):
        count = head_pixels(image_url.url, f"image {i + 1}", limits)
        if count is None:
            return
        counts.append(count)
        try:
            check(counts)
        except Exception:
            if digests is not None:
                for j in range(i + 1):
                    _digest(read(j), digests)
            raise


def _digest(source: bytes | Path, digests: list) -> None:
    try:
        digests.append(sha256_hex(source))
    except OSError:  # the file went away: the boundary names that later; its message never names the file
        pass


# An inline image's first 64 KiB: where the headers `decoded_pixels` reads end in practice (PNG's IHDR at byte 16,
# DICOM's geometry in group 0028 before any long element, NIfTI's 348 bytes).
HEAD_BYTES = 64 * 1024


def head_pixels(url: str, role: str, limits: Limits) -> int | None:
    """The pixel values a data-URI image decodes to, read from the header in its first HEAD_BYTES bytes (only
    those are base64-decoded), so a request over its budget is refused without decoding its images' base64 whole;
    None where that head does not hold the whole header (a JPEG with a large ICC profile, a TIFF whose directory is
    at its end, any reader error: the image is then read whole, as before) or the URL is not a data URI. A header
    cut short never yields a count of its own: the readers raise on it, so a count read here is the whole file's."""
    head = data_uri_head(url, HEAD_BYTES)
    if head is None:
        return None
    try:
        return decoded_pixels(io.BytesIO(head), role=role, limits=limits)
    except Exception:  # not all of the header is in the head, or a bad one: the whole image says which
        return None


def decode_images(received: list[ReceivedImage], limits: Limits) -> list:
    """`ReceivedImage`s -> MedicalImages (pixels (H, W, 3) uint8), through `to_medical_image`. Call from the decode
    pool (`gmaivl_rt.server.decoding`): it decodes."""
    out = []
    for image in received:
        source = io.BytesIO(image.source) if isinstance(image.source, bytes) else image.source
        out.append(to_medical_image(source, role=image.role, limits=limits, **image.options))
    return out


def read_images(urls: list[protocol.ImageURL], limits: Limits, digests: list | None = None, **media_options) -> list:
    """Image URLs -> MedicalImages: `receive_images` then `decode_images`, in the calling thread (no budget: the
    server itself goes through `gmaivl_rt.server.decoding`)."""
    return decode_images(receive_images(urls, limits, digests, **media_options), limits)
