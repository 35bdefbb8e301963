"""GMAI-VL's chat format and image preprocessing: the internlm2 chatml template, `<image>` expanded to one token
per image feature, images padded to a square with the mean colour, resized, CLIP-normalised."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from gmaivl_rt.errors import InputError

IMAGE_TOKEN = "<image>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def chat_parts(messages, system: str | None = None, add_generation_prompt: bool = False):
    """A conversation as (kind, text, is_assistant_reply, message_index) parts, in prompt order. kind:
    "special": a role marker the template places (`<|im_start|>`, `<|im_end|>`): the only source of those tokens;
    "text":    literal text (role names, newlines, message content): never parsed for special tokens;
    "image":   one image slot (`<image>`).
    messages: [{"role": "system"|"user"|"assistant", "content": str | list of parts}] or GMAI-VL's
    [{"from": "human"|"gpt", "value": str}]. In str content each `<image>` is an image slot; list content holds
    {"type": "text", "text": str} parts (literal, `<image>` included) and {"type": "image"} (or "image_url")
    slots, OpenAI style. The system prompt is literal text."""
    parts = []
    if system:
        parts += [("special", IM_START, False, -1), ("text", f"system\n{system}", False, -1),
                  ("special", IM_END, False, -1), ("text", "\n", False, -1)]
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InputError(f"message {i} must be a dict with role and content, got {type(message).__name__}")
        role = _ROLES.get(message.get("role", message.get("from")))
        content = message.get("content", message.get("value"))
        if role is None:
            raise InputError(f"message {i} has no known role (one of user, assistant, system)")
        body = _content_parts(content, f"message {i}")
        answer = role == "assistant"
        parts += [("special", IM_START, False, i), ("text", f"{role}\n", False, i)]
        parts += [(kind, text, answer, i) for kind, text in body]
        parts += [("special", IM_END, answer, i), ("text", "\n", False, i)]
    if add_generation_prompt:
        parts += [("special", IM_START, False, len(messages)), ("text", "assistant\n", False, len(messages))]
    return parts


def _content_parts(content, role: str) -> list[tuple[str, str]]:
    if isinstance(content, str):
        pieces = content.split(IMAGE_TOKEN)
        out = [("text", pieces[0])]
        for piece in pieces[1:]:
            out += [("image", IMAGE_TOKEN), ("text", piece)]
        return [p for p in out if p[1]]
    if isinstance(content, (list, tuple)):
        out = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                out.append(("text", part["text"]))
            elif kind in ("image", "image_url"):
                out.append(("image", IMAGE_TOKEN))
            else:
                raise InputError(f"{role} part {j} must be {{'type': 'text', 'text': str}} or "
                                 "{'type': 'image'}")
        return [p for p in out if p[1]]
    raise InputError(f"{role} content must be a str or a list of parts, got {type(content).__name__}")


def chat_segments(messages, system: str | None = None, add_generation_prompt: bool = False):
    """Render a conversation as (text, is_assistant_reply) pieces whose concatenation is the prompt (one piece
    per turn, the assistant turns split into header / reply + <|im_end|> / newline).
    The assistant pieces (reply + <|im_end|>) are what training computes loss on."""
    pieces: list[list] = []
    key = None
    for _, text, answer, index in chat_parts(messages, system, add_generation_prompt):
        if (index, answer) != key:
            pieces.append(["", answer])
            key = (index, answer)
        pieces[-1][0] += text
    return [(text, answer) for text, answer in pieces]


def build_prompt(messages, system: str | None = None, add_generation_prompt: bool = True) -> str:
    """The internlm2 chatml text of a conversation, ending with the assistant header by default."""
    return "".join(text for text, _ in chat_segments(messages, system, add_generation_prompt))


def expand_image_tokens(text: str, tokens_per_image) -> str:
    """Replace each `<image>` with as many image tokens as that image has features.
    tokens_per_image: an int for every image, or a list with one count per `<image>` in order."""
    parts = text.split(IMAGE_TOKEN)
    counts = tokens_per_image if isinstance(tokens_per_image, (list, tuple)) else [tokens_per_image] * (len(parts) - 1)
    if len(counts) != len(parts) - 1:
        raise ValueError(f"text has {len(parts) - 1} {IMAGE_TOKEN} placeholders but {len(counts)} image token counts")
    out = [parts[0]]
    for count, part in zip(counts, parts[1:]):
        out.append(IMAGE_TOKEN * count + part)
    return "".join(out)


def _to_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(f"image array must be uint8 (H, W) or (H, W, 1|3|4), got {array.dtype} {array.shape}")
    return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[2] == 1 else array).convert("RGB")


def _normalise(image: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def preprocess_image(image, image_size: int) -> torch.Tensor:
    """PIL image or uint8 array -> (3, image_size, image_size) float32: pad to square with the CLIP mean colour
    (LLaVA's expand2square), bicubic resize, CLIP mean/std."""
    image = _to_pil(image)
    w, h = image.size
    if w != h:
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in CLIP_MEAN))
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        image = canvas
    return _normalise(image.resize((image_size, image_size), Image.Resampling.BICUBIC))


def preprocess_image_dynamic(image, patch_size: int, min_pixels: int, max_pixels: int) -> torch.Tensor:
    """Native-resolution preprocessing: aspect ratio kept, sides rounded to the patch size within the pixel budget.
    Returns (3, H, W) float32 with H, W multiples of patch_size."""
    from gmaivl_rt.vision_sizes import dynamic_resize_shape

    image = _to_pil(image)
    h, w = dynamic_resize_shape(image.height, image.width, patch_size, min_pixels, max_pixels)
    return _normalise(image.resize((w, h), Image.Resampling.BICUBIC))
