"""GMAI-VL's chat format: the internlm2 chatml template, its special tokens, and `<image>` expanded to one token
per image feature. Plain text only (no torch), so the data pipeline reads it cheaply; images: `preprocess`."""
from __future__ import annotations

from gmaivl_rt.errors import InputError

IMAGE_TOKEN = "<image>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# The internlm2 chatml template for `apply_chat_template`: the same text `gmaivl_rt.model.chat.build_prompt` renders
# (no BOS: our tokenizers have none; tests/train/test_tokenizer.py checks the two agree).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
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
