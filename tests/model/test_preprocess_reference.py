"""Fixed-resolution image preprocessing against transformers' CLIP image processor (the PIL one, as CLIP and LLaVA
run it) on a non-flat image: random pixels, not square, so the padding, the resampling filter and the
normalisation all show. LLaVA's expand2square is written out here from its published description (pad the short
side with the mean colour, image centred). Both resample the same uint8 image with PIL: exact to 1e-6."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from gmaivl_rt.model.preprocess import CLIP_MEAN, CLIP_STD, preprocess_image


def expand2square(image: Image.Image, background) -> Image.Image:
    width, height = image.size
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


@pytest.mark.parametrize("height, width", [(30, 50), (61, 20), (40, 40)])
def test_preprocess_matches_clip_processor_on_a_non_flat_image(height, width):
    """Mutants: bicubic resampling replaced by bilinear or nearest; the padding colour or offset changed; mean and
    std swapped. A flat grey image (the old test's) passes all of them."""
    size = 28
    pixels = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                      image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    square = expand2square(Image.fromarray(pixels), tuple(int(m * 255) for m in CLIP_MEAN))
    want = torch.from_numpy(np.asarray(processor(square, return_tensors="np")["pixel_values"][0]))
    got = preprocess_image(pixels, size)
    assert got.shape == (3, size, size) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert float(want.std()) > 0.2  # not flat (padding included)
