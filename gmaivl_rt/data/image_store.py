"""The built dataset's pictures: PNG files named by the hash of their pixels, so identical pictures (the same
slice reached from two annotations, the same frame in two datasets) are stored once."""
from __future__ import annotations

import hashlib
import io
import os

import numpy as np

from gmaivl_rt.atomic import atomic_create_bytes


class ImageStore:
    """PNG files under `root`, named by the SHA-256 of the pixel array (shape included): identical pictures
    are stored once."""

    def __init__(self, root: str):
        self.root = root
        self.written = 0

    def put(self, pixels: np.ndarray) -> str:
        """pixels: (H, W, 3) uint8. Returns the path relative to `root` ('ab/abcdef....png')."""
        from PIL import Image

        digest = hashlib.sha256(repr(pixels.shape).encode() + np.ascontiguousarray(pixels).tobytes()).hexdigest()
        rel = f"{digest[:2]}/{digest[:20]}.png"
        path = os.path.join(self.root, rel)
        if not os.path.exists(path):
            buf = io.BytesIO()
            Image.fromarray(pixels, mode="RGB").save(buf, format="PNG", compress_level=3)
            self.written += atomic_create_bytes(path, buf.getvalue())  # a parallel worker may have won the race
        return rel
