"""One request, checked once: question or chat messages + images + generation options -> `PreparedRequest`.

`build_request` (reached as `runtime.build_request(...)` on every backend) is the boundary `ask`, `prepare`, the
CLI, the serving engine and the HTTP server share: text within `Limits`, images through
`gmaivl_rt.medical.convert.to_medical_image`, the chat template of `gmaivl_rt.model.chat` with user text tokenized
literally (only the template places `<|im_start|>`, `<|im_end|>` and image slots), and generation options through
`gmaivl_rt.model.sampling.check_generation` (prompt + max_new_tokens within the model's context). What comes out is
ready for `generate(**request.generate_inputs(), **request.generation)` and needs no further validation.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from gmaivl_rt.errors import InputError, LimitError
from gmaivl_rt.limits import DEFAULT_LIMITS, Limits, check_text, type_name
from gmaivl_rt.model.sampling import check_generation
from gmaivl_rt.runtime.batching import pixel_batch


@dataclass
class PreparedRequest:
    """A checked request.

    input_ids:      (1, S) int64, the chat prompt with each image slot expanded to its image tokens.
    attention_mask: (1, S) int64 ones.
    pixel_values:   (N, 3, H, W) float32 CLIP-normalised, a list of (3, H_i, W_i) in dynamic-resolution mode, or
                    None without images.
    generation:     validated options for `generate()`: max_new_tokens, sampling options, eos_token_id, pad_token_id,
                    and where asked `constraint` (compiled for the runtime's tokenizer), logprobs, top_logprobs.
    prompt_tokens:  S.
    image_keys:     one hex SHA-256 per image of its preprocessed pixels (and shape): equal keys, equal image
                    features, so a cache may reuse them.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | list | None
    generation: dict
    prompt_tokens: int
    image_keys: list[str] = field(default_factory=list)

    def generate_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "pixel_values": self.pixel_values}


def _check_messages(messages, limits: Limits) -> list:
    if not isinstance(messages, (list, tuple)):
        raise InputError(f"messages must be a list of {{'role', 'content'}} dicts, got {type_name(messages)}")
    if not messages:
        raise InputError("messages is empty")
    if len(messages) > limits.max_messages:
        raise LimitError(f"messages has {len(messages)} turns; the limit is {limits.max_messages}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InputError(f"message {i} must be a dict with role and content, got {type_name(message)}")
        content = message.get("content", message.get("value"))
        if isinstance(content, str):
            check_text(content, f"message {i}", limits)
        elif isinstance(content, (list, tuple)):
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "text":
                    check_text(part.get("text"), f"message {i} part {j}", limits)
        elif content is None:
            raise InputError(f"message {i} has no content")
    return list(messages)


def image_slots(n_images: int) -> list[dict]:
    """The content parts that place `n_images` images in a turn: each image slot followed by a newline, all before
    the turn's text (GMAI-VL's `<image>\\n` prefix; vLLM's order for InternVL-family models). Every path that puts
    images into a chat (a question, messages without slots, the HTTP server's OpenAI messages) uses this."""
    return [{"type": "image"}, {"type": "text", "text": "\n"}] * n_images


def chat_messages(question, messages, n_images: int, limits: Limits) -> list:
    """question (literal text) or messages -> chat messages with exactly n_images image slots."""
    from gmaivl_rt.model.chat import chat_parts

    if (question is None) == (messages is None):
        raise InputError("give either question (a str) or messages (a list of chat turns)" if question is None
                         else "give question or messages, not both")
    if question is not None:
        check_text(question, "question", limits)
        return [{"role": "user", "content": image_slots(n_images) + [{"type": "text", "text": question}]}]
    messages = _check_messages(messages, limits)
    slots = sum(kind == "image" for kind, *_ in chat_parts(messages))
    if slots == 0 and n_images:  # no placeholder: the images go before the first user turn's text
        first = next((i for i, m in enumerate(messages) if m.get("role", m.get("from")) in ("user", "human")), None)
        if first is None:
            raise InputError("messages have no user turn to attach the images to")
        content = messages[first].get("content", messages[first].get("value"))
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
        messages = list(messages)
        messages[first] = {"role": "user", "content": image_slots(n_images) + parts}
    elif slots != n_images:
        raise InputError(f"messages hold {slots} image slot(s) but {n_images} image(s) were given")
    return messages


def encode_chat(tokenizer, messages, system, image_token_counts, image_token_id: int) -> list[int]:
    """Chat -> token ids. Template markers become their special token ids, image slots `count` image tokens each,
    and every piece of text (role names, content, system prompt) is tokenized with special-token parsing off, so
    typed `<|im_start|>` or `<image>` stay text. Text between two markers is tokenized as one piece, as the
    tokenizer does for the whole rendered prompt; all pieces in one call of the tokenizer (one call per piece cost
    more than the tokenizing on short prompts). Starts with what the tokenizer puts before a prompt (InternLM2's
    `<s>`), as training does (`train.dataset.ConversationEncoder`)."""
    from gmaivl_rt.model.chat import chat_parts

    counts = iter(image_token_counts)
    pieces, texts, pending = [], [], []  # pieces: fixed ids, or the index of a text in `texts`

    def flush():
        if pending:
            pieces.append(len(texts))
            texts.append("".join(pending))
            pending.clear()

    for kind, text, _, _ in chat_parts(messages, system, add_generation_prompt=True):
        if kind == "text":
            pending.append(text)
            continue
        flush()
        if kind == "image":
            pieces.append([image_token_id] * next(counts))
        else:
            pieces.append([int(tokenizer.convert_tokens_to_ids(text))])
    flush()
    encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"] if texts else []
    ids = list(tokenizer("", add_special_tokens=True)["input_ids"])
    for piece in pieces:
        ids.extend(encoded[piece] if isinstance(piece, int) else piece)
    return ids


def preprocess_image(image, vision) -> tuple[torch.Tensor, int, str]:
    """One MedicalImage -> its (3, H, W) float32 pixels, image token count and content key (hex SHA-256 of the
    pixels and their shape)."""
    from gmaivl_rt.model import preprocess

    if vision.dynamic_resolution:
        pixels = preprocess.preprocess_image_dynamic(image.pixels, vision.patch_size, vision.min_pixels,
                                                     vision.max_pixels)
    else:
        pixels = preprocess.preprocess_image(image.pixels, vision.image_size)
    key = hashlib.sha256(repr(tuple(pixels.shape)).encode() + pixels.contiguous().numpy().tobytes()).hexdigest()
    return pixels, vision.tokens_per_image(pixels.shape[1], pixels.shape[2]), key


def prepare_images(given, vision, limits: Limits, cache=None, **reader) -> list:
    """The request's images -> one `PreparedImage` each (`gmaivl_rt.runtime.prepared_images`), read with the reader
    options (frame, slice_index, plane, window) and preprocessed; through `cache` (a `PreparedImageCache`, or None)
    where an image has a content digest, so an image seen before is neither decoded, resized nor hashed again."""
    from gmaivl_rt.runtime.prepared_images import PreparedImage, content_digest

    out = []
    for i, obj in enumerate(given):
        found = content_digest(obj, reader, limits, vision) if cache is not None and cache.max_bytes else None
        if found is not None:
            prepared = cache.get(found[0])
            if prepared is not None:
                out.append(prepared)
                continue
            obj = found[1]  # a file: the bytes just hashed, not the file read again
        prepared = PreparedImage(*preprocess_image(_read_image(obj, role=f"image {i + 1}", limits=limits, **reader),
                                                   vision))
        if found is not None:
            cache.put(found[0], prepared)
        out.append(prepared)
    return out


def _read_image(obj, **reader):
    """One request image -> MedicalImage: a `DicomWebRef` is read from its archive (`archive_image`), anything else
    by `to_medical_image`; both with the same role, limits and reader options."""
    from gmaivl_rt.medical.convert import to_medical_image
    from gmaivl_rt.medical.dicomweb import DicomWebRef, archive_image

    return archive_image(obj, **reader) if isinstance(obj, DicomWebRef) else to_medical_image(obj, **reader)


def build_request(runtime, question=None, image=None, *, messages=None, images=None, system=None, frame=None,
                  slice_index=None, plane=None, window=None, generation: dict | None = None,
                  limits: Limits | None = None) -> PreparedRequest:
    """The request boundary (see the module docstring). runtime: a backend with `.config` and `.tokenizer`.
    generation: options over the runtime's decoding defaults (`runtime.generation_defaults`, resolved from the
    model folder's generation_config.json by `gmaivl_rt.runtime.generation_config`), or None for prompt-only use
    (`prepare`), which skips them."""
    limits = limits or DEFAULT_LIMITS
    if image is not None and images is not None:
        raise InputError("give image or images, not both")
    given = [] if image is None and images is None else [image] if image is not None else images
    if not isinstance(given, (list, tuple)):
        raise InputError(f"images must be a list, got {type_name(given)}")
    if len(given) > limits.max_images_per_request:
        raise LimitError(f"{len(given)} images; the limit is {limits.max_images_per_request} per request")
    if system is not None:
        check_text(system, "system", limits)
    messages = chat_messages(question, messages, len(given), limits)
    context = runtime.config.text.context_length
    options = None
    if generation is not None:  # the cheap checks before any image is decoded
        options = check_generation({**runtime.generation_defaults, **generation}, prompt_tokens=None,
                                   context=context, limits=limits)
        if options.get("constraint") is not None:  # compiled (or refused) before any image is read
            options["constraint"] = runtime.compile_constraint(options["constraint"])
    images = prepare_images(given, runtime.config.vision, limits, getattr(runtime, "prepared_images", None),
                            frame=frame, slice_index=slice_index, plane=plane, window=window)
    tokenizer = runtime.tokenizer
    ids = encode_chat(tokenizer, messages, system, [im.tokens for im in images], runtime.config.image_token_index)
    if options is not None:
        options = check_generation(
            {"eos_token_id": runtime.eos_token_ids, "pad_token_id": tokenizer.pad_token_id or 0, **options},
            prompt_tokens=len(ids), context=context, limits=limits)
    input_ids = torch.tensor([ids], dtype=torch.long)
    pixel_values = pixel_batch([im.pixels for im in images], runtime.config.vision.dynamic_resolution)
    return PreparedRequest(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                           pixel_values=pixel_values, generation=options or {}, prompt_tokens=len(ids),
                           image_keys=[im.key for im in images])
