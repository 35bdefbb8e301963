"""Image sizes for the vision tower: what sizes it takes (`check_image_size`), and the resize of its
dynamic-resolution mode (NaViT / Qwen2-VL style native resolution)."""
from __future__ import annotations

import math

from gmaivl_rt.errors import InputError


def dynamic_resize_shape(height: int, width: int, patch_size: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size an image of `height` x `width` is resized to before patch embedding in dynamic-resolution mode.

    Both sides become multiples of `patch_size`, the aspect ratio is kept as closely as that allows, and the area
    new_h * new_w lies within [min_pixels, max_pixels] - the rule of Qwen2-VL's `smart_resize` (round each side to
    the patch size; if the area is out of budget, rescale both sides by the same factor and round towards the
    budget). Beyond it: every side is at least one patch; when a very narrow budget or an extreme aspect ratio
    would still break max_pixels, the longer side gives way (the ratio is then only approximately kept); and when
    rounding down lands under min_pixels, patches are added back while max_pixels allows (max_pixels wins when
    both cannot hold).
    Returns (new_h, new_w) as ints."""
    for name, value in (("height", height), ("width", width), ("patch_size", patch_size),
                        ("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"dynamic_resize_shape: {name} must be a positive int, got {value!r}")
    if max_pixels < patch_size * patch_size:
        raise ValueError(f"dynamic_resize_shape: max_pixels={max_pixels} is below one patch "
                         f"({patch_size}x{patch_size} = {patch_size * patch_size} pixels)")
    if min_pixels > max_pixels:
        raise ValueError(f"dynamic_resize_shape: min_pixels={min_pixels} exceeds max_pixels={max_pixels}")

    def to_patches(side: float, rounding) -> int:
        return max(patch_size, rounding(side / patch_size) * patch_size)

    new_h, new_w = to_patches(height, round), to_patches(width, round)
    if new_h * new_w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        new_h, new_w = to_patches(height / shrink, math.floor), to_patches(width / shrink, math.floor)
    elif new_h * new_w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        new_h, new_w = to_patches(height * grow, math.ceil), to_patches(width * grow, math.ceil)
    # Rounding up for min_pixels can overshoot a tight max_pixels, and the one-patch floor can push an extreme
    # aspect ratio over it: take patches off the longer side until the budget holds.
    while new_h * new_w > max_pixels:
        if new_h >= new_w:
            new_h = max(patch_size, (max_pixels // new_w) // patch_size * patch_size)
        else:
            new_w = max(patch_size, (max_pixels // new_h) // patch_size * patch_size)
    # Rounding both sides down for max_pixels can fall under a narrow [min_pixels, max_pixels]: add patches back,
    # each time to the side that keeps the aspect ratio best, while the budget allows.
    target = math.log(height / width)
    while new_h * new_w < min_pixels:
        options = [(h, w) for h, w in ((new_h + patch_size, new_w), (new_h, new_w + patch_size)) if h * w <= max_pixels]
        if not options:
            break
        new_h, new_w = min(options, key=lambda hw: abs(math.log(hw[0] / hw[1]) - target))
    return new_h, new_w


def check_image_size(vision, height: int, width: int, role: str = "image") -> None:
    """The one rule of what image sizes the vision tower takes (the model and the graph backends check it alike):
    in dynamic-resolution mode sides that are multiples of the patch size, else exactly image_size x image_size.
    vision: a VisionConfig. Raises InputError naming `role`."""
    size, patch = vision.image_size, vision.patch_size
    if vision.dynamic_resolution:
        if height % patch or width % patch:
            raise InputError(f"{role} is {height}x{width}; dynamic resolution needs sides that are multiples of "
                             f"the patch size {patch}")
    elif (height, width) != (size, size):
        raise InputError(f"{role} is {height}x{width} but this model takes {size}x{size} images (preprocess them "
                         "with gmaivl_rt.model.preprocess.preprocess_image, or enable vision.dynamic_resolution)")
