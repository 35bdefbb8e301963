"""Chat template and image preprocessing, against transformers' Llava image processor (pad-to-square)."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaImageProcessorPil

from gmaivl_rt.chat import (CLIP_MEAN, CLIP_STD, IMAGE_TOKEN, build_prompt, chat_segments, expand_image_tokens,
                            preprocess_image)


@pytest.mark.parametrize("size", [(40, 60), (60, 40), (33, 33), (7, 91)])
def test_preprocess_matches_llava_image_processor(size):
    processor = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 28},
                                       crop_size={"height": 28, "width": 28}, image_mean=list(CLIP_MEAN),
                                       image_std=list(CLIP_STD))
    image = (np.random.default_rng(0).random((*size, 3)) * 255).astype(np.uint8)
    expected = processor(image, return_tensors="pt")["pixel_values"][0]
    got = preprocess_image(image, 28)
    assert got.shape == (3, 28, 28) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_preprocess_accepts_grey_and_rgba_and_rejects_floats():
    grey = np.zeros((10, 20), np.uint8)
    assert preprocess_image(grey, 14).shape == (3, 14, 14)
    assert preprocess_image(Image.new("RGBA", (5, 9)), 14).shape == (3, 14, 14)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_image(np.zeros((4, 4), np.float32), 14)


def test_internlm2_chatml_template():
    messages = [{"from": "human", "value": "<image>\nWhat modality?"}, {"from": "gpt", "value": "CT."},
                {"role": "user", "content": "Which plane?"}]
    text = build_prompt(messages, system="Be brief.")
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\nWhat modality?<|im_end|>\n"
                    "<|im_start|>assistant\nCT.<|im_end|>\n<|im_start|>user\nWhich plane?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    trained = [t for t, is_reply in chat_segments(messages[:2]) if is_reply]
    assert trained == ["CT.<|im_end|>"]
    with pytest.raises(ValueError, match="message 0"):
        build_prompt([{"from": "robot", "value": "x"}])


def test_expand_image_tokens():
    assert expand_image_tokens("a<image>b", 3) == f"a{IMAGE_TOKEN * 3}b"
    assert expand_image_tokens("<image><image>", [1, 2]) == IMAGE_TOKEN * 3
    with pytest.raises(ValueError, match="2 <image> placeholders but 1"):
        expand_image_tokens("<image><image>", [1])
