"""dynamic_resize_shape against transformers' Qwen2-VL smart_resize, plus the budget / patch / aspect properties."""
import math
import random

import pytest
import torch

from gmaivl_rt.model.vision_sizes import dynamic_resize_shape

PATCH = 14
MIN_PIXELS, MAX_PIXELS = 56 * 56, 672 * 672


def _qwen2_vl_smart_resize():
    module = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    return module.smart_resize


def _sizes(count, seed=0, low=20, high=4000):
    rng = random.Random(seed)
    return [(rng.randint(low, high), rng.randint(low, high)) for _ in range(count)]


@pytest.mark.parametrize("min_pixels, max_pixels", [(MIN_PIXELS, MAX_PIXELS), (256 * 28 * 28, 1280 * 28 * 28)])
def test_matches_qwen2_vl_smart_resize(min_pixels, max_pixels):
    smart_resize = _qwen2_vl_smart_resize()
    sizes = _sizes(300) + [(336, 336), (512, 384), (100, 1000), (1080, 1920), (30, 40)]
    for height, width in sizes:
        expected = smart_resize(height, width, factor=PATCH, min_pixels=min_pixels, max_pixels=max_pixels)
        assert dynamic_resize_shape(height, width, PATCH, min_pixels, max_pixels) == expected, (height, width)


@pytest.mark.parametrize("min_pixels, max_pixels", [(MIN_PIXELS, MAX_PIXELS), (14 * 14, 28 * 28 * 4),
                                                    (300 * 300, 320 * 320)])
def test_properties_hold_for_any_size(min_pixels, max_pixels):
    for height, width in _sizes(500, seed=1, low=1, high=6000) + [(1, 5000), (5000, 1), (7, 7), (14, 14)]:
        new_h, new_w = dynamic_resize_shape(height, width, PATCH, min_pixels, max_pixels)
        assert new_h % PATCH == 0 and new_w % PATCH == 0 and new_h >= PATCH and new_w >= PATCH
        assert new_h * new_w <= max_pixels, (height, width, new_h, new_w)
        # min_pixels holds unless max_pixels leaves no multiple-of-patch room for it at this aspect ratio
        if new_h * new_w < min_pixels:
            assert (new_h + PATCH) * new_w > max_pixels or new_h * (new_w + PATCH) > max_pixels
        aspect = 1 / 20 <= height / width <= 20
        if aspect and min(new_h, new_w) >= 4 * PATCH:
            # each side is within one patch of an exact common rescale of the original
            bound = PATCH / (new_h - PATCH) + PATCH / (new_w - PATCH)
            assert abs(math.log(new_h / new_w) - math.log(height / width)) <= bound, (height, width, new_h, new_w)


def test_in_budget_size_is_only_rounded():
    assert dynamic_resize_shape(336, 336, PATCH, MIN_PIXELS, MAX_PIXELS) == (336, 336)
    assert dynamic_resize_shape(300, 450, PATCH, MIN_PIXELS, MAX_PIXELS) == (294, 448)


@pytest.mark.parametrize("kwargs, message", [
    (dict(height=0), "height must be a positive int"),
    (dict(width=12.5), "width must be a positive int"),
    (dict(patch_size=-14), "patch_size must be a positive int"),
    (dict(max_pixels=100), "below one patch"),
    (dict(min_pixels=800 * 800), "exceeds max_pixels"),
])
def test_rejects_bad_arguments(kwargs, message):
    args = dict(height=100, width=200, patch_size=PATCH, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS) | kwargs
    with pytest.raises(ValueError, match=message):
        dynamic_resize_shape(**args)


def test_preprocess_image_dynamic_gives_the_planned_grid():
    """The dynamic-mode preprocessing resizes to dynamic_resize_shape and CLIP-normalises (a flat grey image stays
    flat at its normalised value)."""
    import numpy as np

    from gmaivl_rt.model.preprocess import CLIP_MEAN, CLIP_STD, preprocess_image_dynamic

    image = np.random.default_rng(0).integers(0, 255, (300, 451, 3), dtype=np.uint8)
    pixels = preprocess_image_dynamic(image, PATCH, MIN_PIXELS, 200 * 200)
    assert tuple(pixels.shape) == (3, *dynamic_resize_shape(300, 451, PATCH, MIN_PIXELS, 200 * 200))
    flat = preprocess_image_dynamic(np.full((90, 40, 3), 64, np.uint8), PATCH, MIN_PIXELS, MAX_PIXELS)
    assert tuple(flat.shape[1:]) == dynamic_resize_shape(90, 40, PATCH, MIN_PIXELS, MAX_PIXELS)
    expected = (64 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(flat, expected[:, None, None].expand_as(flat))
