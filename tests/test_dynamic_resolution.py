"""Dynamic-resolution mode: images of different sizes packed through the vision tower (packed attention,
interpolated position embeddings) give, per image, what transformers' CLIP gives for that image alone with
`interpolate_pos_encoding=True`. fp32 tolerance 1e-4."""
import pytest
import torch
from hf_reference import IMAGE_TOKEN, make_hf_llava

from gmaivl_rt import GMAIVL


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("dyn")
    hf = make_hf_llava(path)
    ours = GMAIVL.from_pretrained(path)
    ours.config.vision.dynamic_resolution = True
    return hf, ours


def test_packed_images_match_per_image_clip(models):
    hf, ours = models
    images = [torch.randn(3, 28, 42), torch.randn(3, 14, 14), torch.randn(3, 56, 28)]
    with torch.no_grad():
        got = ours.encode_images(images)
        expected = []
        for img in images:
            hidden = hf.model.vision_tower(img[None], output_hidden_states=True,
                                           interpolate_pos_encoding=True).hidden_states[-2]
            expected.append(hf.model.multi_modal_projector(hidden[0, 1:]))
    torch.testing.assert_close(got, torch.cat(expected), atol=1e-4, rtol=0)


def test_forward_with_dynamic_images_counts_tokens(models):
    _, ours = models
    images = [torch.randn(3, 28, 42), torch.randn(3, 14, 28)]  # 6 and 2 patches
    ids = torch.tensor([[1] + [IMAGE_TOKEN] * 6 + [2] + [IMAGE_TOKEN] * 2 + [3]])
    assert ours(ids, pixel_values=images).logits.shape == (1, 11, ours.config.text.vocab_size)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        ours(ids, pixel_values=[torch.randn(3, 20, 28)])


def test_fixed_mode_rejects_other_sizes(models, tmp_path):
    hf, _ = models
    hf.save_pretrained(tmp_path)
    fixed = GMAIVL.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="enable vision.dynamic_resolution"):
        fixed.encode_images([torch.randn(3, 28, 42)])
