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


class IncrementalDetokenizer:
    """The text of a growing answer, decoded a few ids at a time (vLLM's incremental detokenizer), so one more
    token costs a short window's decode rather than the whole answer's (the engine streams every running request's
    text each step: decoding each answer whole cost ~1.5 ms a step at 16 requests of 32 tokens).

    `update(ids)`: ids is the answer so far (the ids passed before, then new ones); returns the text added. `text`
    is `tokenizer.decode(ids, skip_special_tokens=True)` whenever that ends in a complete character; ids that end
    inside a multi-byte character (byte-level or byte-fallback pieces) are held until it completes. `final(ids)`: that whole decode,
    once, as `ask` makes it (what the stream could not show yet, a lone undecodable byte included). `holding`: the
    last id fed added no text (part of a character, or a special token).

    How, by tokenizer: a transformers tokenizer backed by Hugging Face `tokenizers` whose decode adds nothing on
    top (no clean_up_tokenization_spaces) steps `tokenizers`' own `DecodeStream` (Rust: it re-decodes a window of
    the last ids and emits the new part once it is valid UTF-8); any other tokenizer decodes a window of ids from
    the one before the last emitted piece on (TGI's and vLLM's prefix/read offsets), except one whose decode
    cleans up spaces (" ." -> ".", "don ' t" -> "don't"), which rewrites text already decoded: it decodes the whole
    answer and shows it only up to its last space, where every unfinished rewrite starts."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = ""  # what update() has returned, joined
        self._seen = 0  # ids consumed
        self._prefix = self._read = 0  # windowed mode: window start, and the first id not yet shown
        self._stream = None
        self.holding = False  # the last id fed added no text (a character still incomplete, a skipped token)
        cleans_up = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and not cleans_up:
            from tokenizers.decoders import DecodeStream

            self._backend, self._stream = backend, DecodeStream(skip_special_tokens=True)
            self.mode = "stream"
        else:
            self.mode = "whole" if cleans_up else "window"

    def update(self, ids: list) -> str:
        """Feed the ids after those already seen; returns the text they add (often "", while a character is
        incomplete)."""
        shown = len(self.text)
        while self.mode == "stream" and self._seen < len(ids):
            try:
                piece = self._stream.step(self._backend, ids[self._seen])
            except Exception:  # noqa: BLE001 (tokenizers raises a bare Exception when its window disagrees with
                # the text it gave): decode the whole answer from here on
                self.mode = "whole"
                break
            self._seen += 1
            self.holding = not piece
            if piece:
                self.text += piece
        if self.mode != "stream":
            self._seen = len(ids)
            piece = self._window(ids) if self.mode == "window" else self._whole(ids)
            self.text += piece
            self.holding = not piece
        return self.text[shown:]

    def final(self, ids: list) -> str:
        """The whole answer's text, `tokenizer.decode(ids, skip_special_tokens=True)` (one full decode)."""
        self._seen = len(ids)
        self.text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return self.text

    def _window(self, ids: list) -> str:
        decode = self.tokenizer.decode
        shown = decode(ids[self._prefix:self._read], skip_special_tokens=True)
        now = decode(ids[self._prefix:], skip_special_tokens=True)
        if len(now) <= len(shown) or now.endswith("\ufffd") or not now.startswith(shown):
            return ""  # nothing new yet, or a character still incomplete: wait for more ids
        self._prefix, self._read = self._read, len(ids)
        return now[len(shown):]

    def _whole(self, ids: list) -> str:
        now = self.tokenizer.decode(ids, skip_special_tokens=True)
        # transformers' clean-up rewrites a space and what follows it (" ' s" -> "'s", " ." -> "."), and every
        # unfinished rewrite starts at the text's last space: shown only up to it
        now = now[:max(0, now.rfind(" "))]
        if now.endswith("\ufffd") or not now.startswith(self.text):
            return ""
        return now[len(self.text):]
