"""OpenAI chat-completions requests -> what the engine's `submit` takes: the system prompt, chat turns with image
slots, the image URLs in order, and the generation options."""
from __future__ import annotations

from gmaivl_rt.errors import InputError
from gmaivl_rt.model.constraint import constraint_from_options
from gmaivl_rt.runtime.request import image_slots
from gmaivl_rt.server import protocol


def chat_turns(messages: list[protocol.ChatMessage]) -> tuple[str | None, list[dict], list[protocol.ImageURL]]:
    """OpenAI messages -> (system prompt, chat turns for the request boundary, image URLs in order).

    Turns carry content parts (`gmaivl_rt.model.chat.chat_parts`), so text a client sends stays literal text (a typed
    `<image>` or `<|im_start|>` is not a slot or a marker). As vLLM does for InternVL-family models, a turn's image
    slots come first, each followed by a newline (`gmaivl_rt.runtime.request.image_slots`), then its text parts
    joined by newlines: [image, text] and [text, image] both ask exactly what `Engine.ask(text, image)` asks.
    """
    system_parts, turns, images = [], [], []
    for i, message in enumerate(messages):
        content = message.content
        if content is None or content == "" or content == []:
            raise InputError(f"messages[{i}]: content is empty")
        if isinstance(content, str):
            texts, urls = [content], []
        else:
            texts = [p.text for p in content if p.type == "text"]
            urls = [p.image_url for p in content if p.type == "image_url"]
        if message.role in ("system", "developer"):
            if urls:
                raise InputError(f"messages[{i}]: a {message.role} message cannot carry images")
            system_parts.append("\n".join(texts))
            continue
        if urls and message.role == "assistant":
            raise InputError(f"messages[{i}]: an assistant message cannot carry images")
        images.extend(urls)
        content = image_slots(len(urls)) + [{"type": "text", "text": "\n".join(texts)}]
        turns.append({"role": message.role, "content": content})
    if not turns or turns[-1]["role"] != "user":
        raise InputError("messages: the last message must be a user message")
    return ("\n".join(system_parts) if system_parts else None), turns, images


def generation_options(body: protocol.ChatCompletionRequest) -> dict:
    """OpenAI sampling fields, and vLLM's `top_k`, `min_p` and `repetition_penalty` and our `no_repeat_ngram_size`
    -> the engine's generation keywords; fields a request leaves out are not passed, so the model folder's decoding
    defaults (`gmaivl_rt.runtime.generation_config`) apply. temperature 0 means greedy; top_k -1 (vLLM's "off")
    is 0. The values are checked where every backend checks them (`gmaivl_rt.model.sampling.check_generation`)."""
    options = {}
    max_new_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_new_tokens is not None:
        options["max_new_tokens"] = max_new_tokens
    if body.temperature is not None:
        options.update(do_sample=False) if body.temperature == 0 else \
            options.update(do_sample=True, temperature=body.temperature)
    if body.top_k is not None:
        options["top_k"] = 0 if body.top_k == -1 else body.top_k
    for name in ("top_p", "min_p", "repetition_penalty", "no_repeat_ngram_size", "seed"):
        if getattr(body, name) is not None:
            options[name] = getattr(body, name)
    if body.stop:
        options["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop)
    constraint = structured_output(body)
    if constraint is not None:
        options["constraint"] = constraint
    if body.logprobs is not None:
        options["logprobs"] = body.logprobs
    if body.top_logprobs is not None:
        options["top_logprobs"] = body.top_logprobs
    return options


def structured_output(body: protocol.ChatCompletionRequest):
    """OpenAI's `response_format` (json_object: any JSON object; json_schema: its `schema`) or vLLM's
    `guided_json`, `guided_choice`, `guided_regex` (at most one) -> the request's checked
    `gmaivl_rt.model.constraint.Constraint`, or None. InputError / LimitError naming the field and the problem
    (the schema is compiled for the tokenizer when the engine prepares the request, still before any decoding)."""
    fields = {}
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        fields["response_format"] = {"json_schema": {"type": "object"}}
    elif fmt is not None and fmt.type == "json_schema":
        fields["response_format.json_schema.schema"] = {"json_schema": fmt.json_schema.schema_}
    for name, option in (("guided_json", "json_schema"), ("guided_choice", "choice"), ("guided_regex", "regex")):
        if getattr(body, name) is not None:
            fields[name] = {option: getattr(body, name)}
    if len(fields) > 1:
        raise InputError(f"{' and '.join(fields)}: give at most one way to constrain the answer")
    for field, option in fields.items():
        try:
            return constraint_from_options(**option)
        except InputError as error:  # LimitError too: the same class, named by its field
            raise type(error)(f"{field}: {error}") from None
    return None
