"""dynamic_resize_shape against transformers' Qwen2-VL smart_resize, plus the budget / patch / aspect properties."""
import math
import random

import pytest
import torch

from gmaivl_rt.vision_sizes import dynamic_resize_shape, resize_for_dynamic_resolution

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


def test_resize_for_dynamic_resolution_gives_the_planned_grid():
    image = torch.rand(3, 300, 451)
    resized = resize_for_dynamic_resolution(image, PATCH, MIN_PIXELS, 200 * 200)
    assert tuple(resized.shape) == (3, *dynamic_resize_shape(300, 451, PATCH, MIN_PIXELS, 200 * 200))
    flat = torch.full((3, 90, 40), 0.25)  # resampling keeps a constant image constant
    torch.testing.assert_close(resize_for_dynamic_resolution(flat, PATCH, MIN_PIXELS, MAX_PIXELS),
                               torch.full((3, *dynamic_resize_shape(90, 40, PATCH, MIN_PIXELS, MAX_PIXELS)), 0.25))
    with pytest.raises(ValueError, match=r"\(C, H, W\) float tensor"):
        resize_for_dynamic_resolution(torch.zeros(3, 20, 20, dtype=torch.uint8), PATCH, MIN_PIXELS, MAX_PIXELS)
