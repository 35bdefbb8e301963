"""GMAI-VL's image preprocessing, as the CLIP image processor does it: an image padded to a square with the mean
colour, resized (bicubic), CLIP-normalised; or, in dynamic-resolution mode, resized to the planned patch grid."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from gmaivl_rt.model.vision_sizes import dynamic_resize_shape

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(f"image array must be uint8 (H, W) or (H, W, 1|3|4), got {array.dtype} {array.shape}")
    return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[2] == 1 else array).convert("RGB")


def normalise(pixels) -> torch.Tensor:
    """uint8 RGB (..., H, W, 3) -> float32 (..., 3, H, W), CLIP mean/std: one picture or a stack of them (the
    same values either way)."""
    x = torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 255.0).movedim(-1, -3)
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def square_resized(image, image_size: int) -> Image.Image:
    """PIL image or uint8 array -> RGB PIL image_size x image_size: padded to a square with the CLIP mean colour
    (LLaVA's expand2square), bicubic resize. PIL only (no torch), so worker processes can run it."""
    image = _to_pil(image)
    w, h = image.size
    if w != h:
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in CLIP_MEAN))
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        image = canvas
    return image.resize((image_size, image_size), Image.Resampling.BICUBIC)


def preprocess_image(image, image_size: int) -> torch.Tensor:
    """PIL image or uint8 array -> (3, image_size, image_size) float32: `square_resized`, CLIP mean/std."""
    return normalise(square_resized(image, image_size))


def preprocess_image_dynamic(image, patch_size: int, min_pixels: int, max_pixels: int) -> torch.Tensor:
    """Native-resolution preprocessing: aspect ratio kept, sides rounded to the patch size within the pixel budget.
    Returns (3, H, W) float32 with H, W multiples of patch_size."""

    image = _to_pil(image)
    h, w = dynamic_resize_shape(image.height, image.width, patch_size, min_pixels, max_pixels)
    return normalise(image.resize((w, h), Image.Resampling.BICUBIC))
