"""Image URLs of a chat request -> the raw bytes or file path the request boundary reads.

Accepted: `data:<type>;base64,...` (any image/* or application/* type: the boundary sniffs the content, so DICOM,
NIfTI, gzip, PNG, JPEG ... all work), `file://` URLs inside the server's allowed local media folder, and http(s)
only when the server allows remote media (off by default: no outbound traffic), behind the SSRF guard of
`gmaivl_rt.server.remote_media`. Sizes are checked before anything
is decoded. Errors name the image by its role ("image 1") and never quote the URL, its file name or its bytes.
"""
from __future__ import annotations

import base64
import binascii
import os
import re
import urllib.parse
from pathlib import Path

from gmaivl_rt.errors import InputError, LimitError
from gmaivl_rt.server.remote_media import fetch_remote_image

_DATA_URI = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.ASCII)
_WHITESPACE = re.compile(rb"\s+")


def decoded_size(payload_chars: int) -> int:
    """An upper bound on the bytes `payload_chars` base64 characters decode to."""
    return (payload_chars + 3) // 4 * 3


def read_image_url(url: str, *, role: str, max_bytes: int, allowed_local_media_path: str | os.PathLike | None = None,
                   allow_remote_media: bool = False, allowed_media_domains=None,
                   remote_timeout_s: float = 10.0) -> bytes | Path:
    """url -> the image's bytes (data URI, http(s)) or its path (file://), at most `max_bytes` bytes.
    http(s) goes through `gmaivl_rt.server.remote_media` (its SSRF guard; `allowed_media_domains` there)."""
    if url.startswith("data:"):
        return _read_data_uri(url, role, max_bytes)
    scheme = url.split(":", 1)[0].lower() if ":" in url[:16] else ""
    if scheme == "file":
        return _local_file(url, role, max_bytes, allowed_local_media_path)
    if scheme in ("http", "https"):
        if not allow_remote_media:
            raise InputError(f"{role}: http(s) image URLs are refused by this server (it makes no outbound "
                             "requests); send the image inline as a data URI")
        return fetch_remote_image(url, role=role, max_bytes=max_bytes, timeout_s=remote_timeout_s,
                                  allowed_domains=allowed_media_domains)
    raise InputError(f"{role}: unsupported image URL scheme; use a data: URI (base64), or file:// under the "
                     "server's allowed local media path")


def data_uri_head(url: str, head_bytes: int) -> bytes | None:
    """The first `head_bytes` bytes (or all, if fewer) of a base64 data URI, decoded from its first characters alone
    (so an image's header can be read without decoding the rest); None for any other URL, or one whose start is
    not plain base64 (`read_image_url` then reads it whole and says what is wrong)."""
    head = _DATA_URI.match(url, 0, 512) if url.startswith("data:") else None
    if head is None or not head.group("b64"):
        return None
    try:
        chars = url[head.end():head.end() + (head_bytes + 2) // 3 * 4]  # whole base64 quanta
        return base64.b64decode(chars, validate=True)[:head_bytes] or None
    except (binascii.Error, ValueError):
        return None


def _read_data_uri(url: str, role: str, max_bytes: int) -> bytes:
    head = _DATA_URI.match(url, 0, 512)
    if head is None:
        raise InputError(f"{role}: malformed data URI (expected data:<media type>;base64,<data>)")
    media_type = (head.group("type") or "").lower()
    if not media_type.startswith(("image/", "application/")):
        raise InputError(f"{role}: data URI media type must be image/* or application/* (DICOM, NIfTI)")
    if not head.group("b64"):
        raise InputError(f"{role}: data URI must be base64-encoded (';base64,')")
    payload_chars = len(url) - head.end()
    if decoded_size(payload_chars) > max_bytes + 3:
        raise LimitError(f"{role}: about {decoded_size(payload_chars)} bytes once decoded, over the limit of "
                         f"{max_bytes} bytes per image")
    payload = url[head.end():].encode("ascii", errors="replace")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        try:  # clients that wrap base64 in lines
            data = base64.b64decode(_WHITESPACE.sub(b"", payload), validate=True)
        except (binascii.Error, ValueError):
            raise InputError(f"{role}: data URI is not valid base64") from None
    if not data:
        raise InputError(f"{role}: data URI holds no bytes")
    if len(data) > max_bytes:
        raise LimitError(f"{role}: {len(data)} bytes, over the limit of {max_bytes} bytes per image")
    return data


def _local_file(url: str, role: str, max_bytes: int, allowed) -> Path:
    if allowed is None:
        raise InputError(f"{role}: file:// image URLs are refused (the server was started without "
                         "--allowed-local-media-path)")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # e.g. an unclosed '[' where a host would be
        raise InputError(f"{role}: malformed file:// URL") from None
    if parts.netloc not in ("", "localhost"):
        raise InputError(f"{role}: file:// URLs must name a local file (no host)")
    name = urllib.parse.unquote(parts.path)
    if "\x00" in name:
        raise InputError(f"{role}: file:// URL holds a NUL character")
    # The OS's own errors quote the path (a file name may carry a patient's name): only their kind is kept.
    try:
        path = Path(name).resolve()
        root = Path(allowed).resolve()
        # resolve() follows symlinks and '..', so a link out of the folder is refused too.
        if not path.is_relative_to(root):
            raise InputError(f"{role}: file:// URL is outside the server's allowed local media path")
        if not path.is_file():
            raise InputError(f"{role}: file:// URL names no file")
        size = path.stat().st_size
    except InputError:
        raise
    except RuntimeError:  # Python 3.11's resolve() on a symlink loop
        raise InputError(f"{role}: file:// URL names a symbolic link loop") from None
    except (OSError, ValueError) as error:  # too long a name, a loop (ELOOP), not UTF-8 encodable, ...
        reason = os.strerror(error.errno) if isinstance(error, OSError) and error.errno else "not a usable path"
        raise InputError(f"{role}: file:// URL names no readable file ({reason})") from None
    if size > max_bytes:
        raise LimitError(f"{role}: {size} bytes, over the limit of {max_bytes} bytes per image")
    return path
