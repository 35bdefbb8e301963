"""Prepared images kept for follow-up questions: a bounded LRU from an image's content digest to what the request
boundary made of it (CLIP-preprocessed pixels, image token count, pixel key), so a follow-up about the same image
neither decodes, resizes nor hashes its pixels again (issue 29: preparing a follow-up read, resized and hashed the
image anew every time).

The digest is SHA-256 over the image's own content, taken from the request every time: a file's bytes (read in
full, so a file changed under the same path gets a new digest and is decoded anew; the file is then decoded from
exactly the bytes hashed, so what is stored always belongs to its digest), raw bytes, an array's dtype, shape and
values, a `MedicalImage`'s pixels; with the reader options (frame, slice_index, plane, window), the request
limits and the vision preprocessing settings, since each changes what comes out. Forms with no such digest (file
objects, pydicom / nibabel / PIL objects, archive references, bytes that are not a recognised image) go the usual
way and are not kept. A hit skips only work whose result the digest fixes: the limits, reader options and content
were the same when the entry was made, and its checks passed then.

Bounded by the bytes of the pixels kept (`gmaivl_rt.limits.PREPARED_IMAGE_CACHE_BYTES` by default; 0 keeps
nothing), least recently used first out; thread-safe (the engine's preparation workers share one). The pixels kept
are shared by the requests that use them: read-only (everything downstream copies them: `pixel_batch`, `.to`).
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from gmaivl_rt.limits import PREPARED_IMAGE_CACHE_BYTES, Limits


@dataclass(frozen=True)
class PreparedImage:
    """What the request boundary makes of one image. pixels: (3, H, W) float32, CLIP-normalised (read-only when
    it came from the cache); tokens: its image token count; key: hex SHA-256 of its pixels and shape (the prefix
    and feature caches' key: equal keys, equal image features)."""

    pixels: torch.Tensor
    tokens: int
    key: str

    @property
    def nbytes(self) -> int:
        """The bytes its pixels hold (what the cache's bound counts)."""
        return self.pixels.numel() * self.pixels.element_size()


class PreparedImageCache:
    """content digest -> PreparedImage, LRU, at most `max_bytes` of pixels (0: keeps nothing). Thread-safe."""

    def __init__(self, max_bytes: int = PREPARED_IMAGE_CACHE_BYTES):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, PreparedImage] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def get(self, digest: str) -> PreparedImage | None:
        with self._lock:
            found = self._entries.get(digest)
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
                self._entries.move_to_end(digest)
            return found

    def put(self, digest: str, prepared: PreparedImage) -> None:
        size = prepared.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(digest, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[digest] = prepared
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes


_PLAIN = (type(None), bool, int, float, str)


def _plain(value) -> bool:
    """Options whose repr says all they mean (a key made of anything else could match where the values differ)."""
    if isinstance(value, (list, tuple)):
        return all(type(v) in _PLAIN for v in value)
    return type(value) in _PLAIN


def _file_bytes(path, limits: Limits) -> bytes | None:
    """A file's whole content (None: not a readable regular file within max_image_bytes; the usual path then
    gives the right error)."""
    try:
        name = os.fsdecode(path)
        if "\x00" in name or not os.path.isfile(name) or os.path.getsize(name) > limits.max_image_bytes:
            return None
        with open(name, "rb") as f:
            data = f.read(limits.max_image_bytes + 1)
    except (OSError, TypeError, ValueError):
        return None
    return data if len(data) <= limits.max_image_bytes else None


def content_digest(obj, reader: dict, limits: Limits, vision) -> tuple[str, object] | None:
    """(digest, what to decode on a miss) for an image given as a path, bytes, an array, a tensor or a
    MedicalImage; None for any other form or option (not cached). A path's miss decodes the bytes hashed (the
    file read once), never the file again."""
    from gmaivl_rt.medical.base import MedicalImage
    from gmaivl_rt.medical.convert import (
        ARRAY_DTYPES,
        HEAD_BYTES,
        looks_like_path,
        sniff_format,
    )

    if not all(_plain(v) for v in reader.values()):
        return None
    decode, kind = obj, None
    if isinstance(obj, (bytearray, memoryview)):
        obj = decode = bytes(obj)
    if isinstance(obj, str) or hasattr(obj, "__fspath__") or (isinstance(obj, bytes) and looks_like_path(obj)):
        data = _file_bytes(obj, limits)
        if data is None or sniff_format(data[:HEAD_BYTES]) is None:  # a format known by suffix only: usual way
            return None
        kind, content, decode = b"bytes", [data], data
    elif isinstance(obj, bytes):
        if not obj or len(obj) > limits.max_image_bytes or sniff_format(obj[:HEAD_BYTES]) is None:
            return None
        kind, content = b"bytes", [obj]
    elif isinstance(obj, MedicalImage):
        pixels = obj.pixels
        if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
            return None
        kind, content = b"medical", [repr(pixels.shape).encode(), np.ascontiguousarray(pixels).data]
    elif type(obj).__module__.split(".")[0] in ("numpy", "torch"):
        array = obj.detach().cpu().numpy() if isinstance(obj, torch.Tensor) else obj
        if not isinstance(array, np.ndarray) or array.dtype not in ARRAY_DTYPES:
            return None
        kind, content = b"array", [f"{array.dtype.str}{array.shape}".encode(), np.ascontiguousarray(array).data]
    else:
        return None
    digest = hashlib.sha256(kind)
    digest.update(repr((sorted(reader.items()), limits, vision)).encode())
    for part in content:
        digest.update(part)
    return digest.hexdigest(), decode
