"""Reading a model folder's tokenizer: loading it, the ids the chat format needs (`<image>`, where a reply ends) and
the check that a tokenizer and a model config agree. (Training our own BPE tokenizer: `gmaivl_rt.train.tokenizer`.)"""
from __future__ import annotations

from pathlib import Path

from gmaivl_rt.model.chat import IM_END, IMAGE_TOKEN


def load_tokenizer(path):
    """Load a tokenizer directory (ours or a real checkpoint's) with transformers."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        raise FileNotFoundError(f"tokenizer: no tokenizer.json or tokenizer_config.json in {path}")
    return AutoTokenizer.from_pretrained(str(path))


def image_token_id(tokenizer) -> int:
    """The id of `<image>`; an error naming the tokenizer when it has none (it must be one token)."""
    ids = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no {IMAGE_TOKEN} token")
    return int(ids[0])


def model_vocab_fields(tokenizer) -> dict:
    """The model config fields a tokenizer decides, as `GMAIVLConfig.replace` takes them: the image token's id and
    the text vocabulary size (`{"image_token_index": int, "text": {"vocab_size": int}}`)."""
    return {"image_token_index": image_token_id(tokenizer), "text": {"vocab_size": len(tokenizer)}}


def chat_stop_ids(tokenizer) -> list[int]:
    """Where a chat reply ends: the tokenizer's eos, then `<|im_end|>` (unknown or missing ones left out)."""
    ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)]
    return list(dict.fromkeys(i for i in ids if i is not None and i != tokenizer.unk_token_id))


def check_tokenizer_fits(model_config, tokenizer, where) -> None:
    """A clear error (naming `where`) when a tokenizer and a model config disagree: `<image>` ids, or more tokens
    than the model's vocabulary."""
    fields = model_vocab_fields(tokenizer)
    if fields["image_token_index"] != model_config.image_token_index:
        raise ValueError(f"tokenizer {where}: {IMAGE_TOKEN} is id {fields['image_token_index']} but the model's "
                         f"image_token_index is {model_config.image_token_index}")
    if fields["text"]["vocab_size"] > model_config.text.vocab_size:
        raise ValueError(f"tokenizer {where} has {fields['text']['vocab_size']} tokens, more than the model's "
                         f"vocab_size {model_config.text.vocab_size}")
