"""Chat template and image preprocessing, against transformers' Llava image processor (pad-to-square)."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaImageProcessorPil

from gmaivl_rt.model.chat import IM_END, IM_START, IMAGE_TOKEN, build_prompt, chat_parts, chat_segments, expand_image_tokens
from gmaivl_rt.model.preprocess import CLIP_MEAN, CLIP_STD, preprocess_image
from gmaivl_rt.errors import InputError


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


def test_preprocess_grey_one_channel_and_rgba_as_the_llava_processor_sees_them_in_rgb():
    """Grey (H, W) and (H, W, 1) arrays and an RGBA image give what transformers' Llava processor gives for the same
    pixels converted to RGB by PIL (this used to check the output shape only, on flat images). Mutants: (H, W, 1) or
    (H, W, 4) arrays refused (`(1, 3, 4)` -> `(0, 3, 4)` / `(1, 3, 5)`), (H, W, 1) not squeezed (`squeeze(not 1)`,
    `shape[2] < 1`)."""
    processor = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": 14}, crop_size={"height": 14, "width": 14},
                                       image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (10, 20), dtype=np.uint8)
    rgba = Image.fromarray(rng.integers(0, 256, (9, 5, 4), dtype=np.uint8), "RGBA")
    grey_rgb = Image.fromarray(grey).convert("RGB")
    rgba_array = np.asarray(rgba)
    for image, rgb in ((grey, grey_rgb), (grey[..., None], grey_rgb), (rgba, rgba.convert("RGB")),
                       (rgba_array, rgba.convert("RGB"))):
        want = processor(np.asarray(rgb), return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(preprocess_image(image, 14), want, atol=1e-5, rtol=0)
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


# ---- survivors of `make mutate` on gmaivl_rt/model/chat.py (docs/mutation/mutation-report.md): each test names its mutants


def test_system_prompt_is_its_own_segment_outside_the_loss():
    """The system turn is one piece, never an assistant reply, before the first message (mutants: a system part's
    message index -1 -> +1 / -2 / 0, its `<|im_end|>` or newline marked as a reply)."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert chat_segments(messages, system="Be brief.") == [
        ("<|im_start|>system\nBe brief.<|im_end|>\n", False),
        ("<|im_start|>user\nHi<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False), ("Hello.<|im_end|>", True), ("\n", False)]
    parts = chat_parts(messages, system="Be brief.")
    assert parts[:4] == [("special", IM_START, False, -1), ("text", "system\nBe brief.", False, -1),
                         ("special", IM_END, False, -1), ("text", "\n", False, -1)]


def test_parts_keep_no_empty_text():
    """An `<image>` at either end of str content leaves no empty text part (mutant: the filter testing the kind,
    `p[0]`, instead of the text)."""
    parts = chat_parts([{"role": "user", "content": "<image>\nWhat?<image>"}])
    assert [(kind, text) for kind, text, _, _ in parts] == [
        ("special", IM_START), ("text", "user\n"), ("image", IMAGE_TOKEN), ("text", "\nWhat?"),
        ("image", IMAGE_TOKEN), ("special", IM_END), ("text", "\n")]


def test_list_content_openai_style():
    """OpenAI-style list content: text parts are literal (an `<image>` inside one is text, not a slot), image and
    image_url parts are slots; anything else is refused naming the part (mutants: `isinstance(part, dict)` negated,
    `kind == "text"` -> `!=` or negated)."""
    content = [{"type": "text", "text": "Compare <image> and"}, {"type": "image"},
               {"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": ""}]
    parts = chat_parts([{"role": "user", "content": content}])
    assert [(kind, text) for kind, text, _, _ in parts[2:-2]] == [
        ("text", "Compare <image> and"), ("image", IMAGE_TOKEN), ("image", IMAGE_TOKEN)]
    for bad in (["plain string"], [{"type": "audio"}], [{"type": "text", "text": 3}]):
        with pytest.raises(InputError, match="message 0 part 0 must be"):
            chat_parts([{"role": "user", "content": bad}])


def test_normalisation_constants_are_openai_clips():
    """The processors above take our CLIP_MEAN / CLIP_STD as given: compare them with transformers' own (mutant:
    CLIP_STD's green 0.2613 -> 1.2613, which every other test passed)."""
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    assert CLIP_MEAN == tuple(OPENAI_CLIP_MEAN) and CLIP_STD == tuple(OPENAI_CLIP_STD)


def test_generation_prompt_is_one_piece_outside_the_loss():
    """The assistant header added by add_generation_prompt is prompt, not reply (mutants: its `<|im_start|>` or its
    "assistant\\n" part marked as a reply)."""
    messages = [{"role": "user", "content": "Hi"}]
    assert chat_segments(messages, add_generation_prompt=True)[-1] == ("<|im_start|>assistant\n", False)


def test_content_parsed_from_json_is_recognised():
    """Part types come from JSON request bodies as fresh strings, not the interned literals of our source (mutant:
    `kind == "text"` -> `kind is "text"`)."""
    import json
    content = json.loads('[{"type": "te' + 'xt", "text": "Which plane?"}, {"type": "image"}]')
    parts = chat_parts([{"role": "user", "content": content}])
    assert [(kind, text) for kind, text, _, _ in parts[2:-2]] == [("text", "Which plane?"), ("image", IMAGE_TOKEN)]


def test_more_image_counts_than_images_are_refused():
    """One count per `<image>`, no more and no fewer (mutant: `len(counts) != ...` -> `<`)."""
    with pytest.raises(ValueError, match="1 <image> placeholders but 2"):
        expand_image_tokens("a<image>b", [1, 2])


@pytest.mark.parametrize("shape, dtype", [((8, 8, 2), np.uint8), ((8, 8, 5), np.uint8), ((2, 8, 8, 3), np.uint8),
                                          ((8, 8, 3), np.int8), ((8, 8, 3), np.bool_), ((8, 8, 3), np.float32)])
def test_image_arrays_other_than_uint8_grey_rgb_rgba_are_refused(shape, dtype):
    """PIL would take some of these silently (an (H, W, 2) array as grey + alpha, int8 or bool values reinterpreted)
    (mutants: the channel check `ndim == 3` -> `> 3` / `== 4`, its `or` -> `and`, `dtype != uint8` -> `>`)."""
    with pytest.raises(ValueError, match="image array must be uint8"):
        preprocess_image(np.zeros(shape, dtype), 28)
