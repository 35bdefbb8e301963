"""Dynamic-resolution mode: images of different sizes packed through the vision tower (packed attention,
interpolated position embeddings) give, per image, what transformers' CLIP gives for that image alone with
`interpolate_pos_encoding=True`. fp32 tolerance 8 x eps x max|expected| (2.6e-7 on features <= 0.27, 5.8e-7 on
logits <= 0.61): measured 3.0e-8 and 1.8e-7, packed attention summing in another order than per-image SDPA (the
former 1e-4 was 500-3000x that)."""
import pytest
import torch
from hf_reference import IMAGE_TOKEN, make_hf_llava

from gmaivl_rt import GMAIVL


def _assert_close_on_scale(got, want, ulps=8.0):
    torch.testing.assert_close(got, want, atol=ulps * torch.finfo(torch.float32).eps * want.abs().max().item(), rtol=0)


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
    _assert_close_on_scale(got, torch.cat(expected))


def test_forward_with_dynamic_images_matches_transformers(models):
    """Two images of different sizes in one prompt: our logits equal transformers' language model fed, at the image
    slots, transformers' CLIP features of each image alone (this used to check the logits' shape only). Mutant: the
    features written over the image slots in reverse order (`features.flip(0)` in GMAIVL._embed)."""
    hf, ours = models
    images = [torch.randn(3, 28, 42), torch.randn(3, 14, 28)]  # 6 and 2 patches
    ids = torch.tensor([[1] + [IMAGE_TOKEN] * 6 + [2] + [IMAGE_TOKEN] * 2 + [3]])
    with torch.no_grad():
        features = [hf.model.multi_modal_projector(hf.model.vision_tower(
            img[None], output_hidden_states=True, interpolate_pos_encoding=True).hidden_states[-2][0, 1:])
            for img in images]
        embeds = hf.get_input_embeddings()(ids)
        embeds[ids == IMAGE_TOKEN] = torch.cat(features)
        want = hf(inputs_embeds=embeds).logits
        got = ours(ids, pixel_values=images).logits
    _assert_close_on_scale(got, want)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        ours(ids, pixel_values=[torch.randn(3, 20, 28)])


def test_fixed_mode_rejects_other_sizes(models, tmp_path):
    hf, _ = models
    hf.save_pretrained(tmp_path)
    fixed = GMAIVL.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="enable vision.dynamic_resolution"):
        fixed.encode_images([torch.randn(3, 28, 42)])
