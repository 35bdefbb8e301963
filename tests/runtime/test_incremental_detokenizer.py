"""`IncrementalDetokenizer` (gmaivl_rt/runtime/tokenizer.py) against the whole decode it replaces in the engine's
streaming, `tokenizer.decode(ids, skip_special_tokens=True)` of transformers, on tokenizers of the kinds real
checkpoints use, each built here with Hugging Face `tokenizers` (nothing downloaded): our byte-level BPE (GPT-2 /
InternLM2-style bytes), a Llama-style BPE with byte fallback and a metaspace decoder that strips the first space, a
T5-style metaspace Unigram, BERT's WordPiece (with and without transformers' space clean-up), and a
decode-only tokenizer (no `backend_tokenizer`: the windowed path).

The answers fed in are edge cases: multi-byte characters split across byte tokens (CJK, emoji with zero-width
joiners and skin tones, combining accents), special tokens among the ids (skipped), runs of spaces and newlines,
punctuation after a space, and random id sequences (undecodable byte runs included)."""
from __future__ import annotations

import json
import random

import pytest
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from gmaivl_rt.runtime.tokenizer import IncrementalDetokenizer
from gmaivl_rt.train.tokenizer import SPECIAL_TOKENS, train_bpe_tokenizer

CORPUS = ["The CT scan of the chest shows no acute fracture.", "Axial MR slice through the head, T2 weighted.",
          "肺部 CT 扫描显示右下叶结节。", "Überprüfung der Läsion: größer als 5 mm, naïve café.",
          "Emoji 🫁🩻 👩🏽‍⚕️ 👨‍👩‍👧 ok", "Spaces   and\n\nnewlines\tand tabs .", "don't , won't ! really ?",
          "e\u0301 a\u0308 combining marks", "Ωmega ∑ ∫ ≤ ≥ → ← ✓"] * 20
EDGE_TEXTS = ["肺部 CT 扫描显示结节。", "👩🏽‍⚕️ says 👨‍👩‍👧 and 🫁", "Läsion größer, naïve café",
              "  two leading spaces", "trailing spaces   ", "new\nlines\n\n and .", "don't ! ? , .",
              "e\u0301\u0301 stacked accents", "ü", "→←✓∑"]
SPECIAL_IDS_TEXT = "<|im_start|>assistant\n肺部<|im_end|> ok</s>"


class DecodeOnly:
    """A tokenizer seen only through its decode (no `backend_tokenizer`), as a sentencepiece- or Python-backed
    transformers tokenizer is: the detokenizer's windowed path. The decode is a real one (`tokenizers`)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer

    def decode(self, ids, skip_special_tokens=False):
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode(self, text, add_special_tokens=False):
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def get_vocab(self):
        return self._tokenizer.get_vocab()


def _wrap(tokenizer: Tokenizer, **kwargs) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=SPECIAL_TOKENS[3:], **kwargs)


def _llama_bpe() -> Tokenizer:
    """Llama / Mistral's shape: BPE over '▁'-marked text, unknown characters as <0xNN> byte tokens."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=500, min_frequency=1, special_tokens=SPECIAL_TOKENS + bytes_,
                                  limit_alphabet=60, show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    # the trainer takes the byte tokens into the vocabulary only as special tokens: make them ordinary pieces
    spec = json.loads(tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if not t["content"].startswith("<0x")]
    return Tokenizer.from_str(json.dumps(spec))


def _unigram() -> Tokenizer:
    """T5 / sentencepiece-unigram's shape: metaspace pieces ('▁' for a space, the first one dropped)."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS, unk_token="<unk>",
                                      show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return tokenizer


def _wordpiece() -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=False)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    return tokenizer


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    byte_level = train_bpe_tokenizer(CORPUS, tmp_path_factory.mktemp("byte_bpe"), vocab_size=400, min_frequency=1)
    return {"byte-level BPE (ours)": (byte_level, "stream"),
            "Llama-style BPE, byte fallback": (_wrap(_llama_bpe()), "stream"),
            "Unigram, metaspace": (_wrap(_unigram()), "stream"),
            "WordPiece": (_wrap(_wordpiece(), clean_up_tokenization_spaces=False), "stream"),
            "WordPiece, clean-up": (_wrap(_wordpiece(), clean_up_tokenization_spaces=True), "whole"),
            "decode-only byte-level BPE": (DecodeOnly(byte_level.backend_tokenizer), "window"),
            "decode-only Llama-style BPE": (DecodeOnly(_llama_bpe()), "window")}


def _answers(tokenizer, seed: int) -> list:
    """Id sequences to stream: the edge texts encoded, with special tokens among them, and random ids."""
    encode = lambda text: list(tokenizer.encode(text, add_special_tokens=False))
    answers = [encode(text) for text in EDGE_TEXTS] + [encode(SPECIAL_IDS_TEXT), encode(" ".join(EDGE_TEXTS))]
    # random ids, byte-fallback pieces (<0xNN>) left out: a byte-fallback decoder turns a run of byte pieces that
    # proves invalid UTF-8 into U+FFFD, ASCII bytes it already showed included, and no stream can take text back
    # (the engine then stops streaming that answer; its whole text comes at the end). Runs split from real
    # characters are in the encoded texts.
    pieces = [i for token, i in tokenizer.get_vocab().items() if not token.startswith("<0x")]
    rng = random.Random(seed)
    answers += [[rng.choice(pieces) for _ in range(rng.randrange(1, 40))] for _ in range(40)]
    return answers


def _stream(tokenizer, ids: list, chunk: int = 1) -> tuple:
    """Feed `ids` `chunk` at a time; returns the detokenizer, each step's (ids so far, text so far) and the
    deltas."""
    detokenizer = IncrementalDetokenizer(tokenizer)
    steps, deltas = [], []
    for n in range(chunk, len(ids) + chunk, chunk):
        deltas.append(detokenizer.update(ids[:n]))
        steps.append((ids[:n], detokenizer.text))
    return detokenizer, steps, deltas


@pytest.mark.parametrize("chunk", [1, 3])
def test_streamed_text_is_the_whole_decode_on_every_tokenizer(tokenizers, chunk):
    """Fed one id at a time (or three: the engine catches up on ids it did not stream), on every tokenizer kind:
    the text so far is a prefix of the whole answer's decode, the deltas join to it, and whenever the whole decode
    of the ids so far ends in a complete character the text has caught up with it exactly (a byte-fallback decoder
    turns a run of byte tokens that ends inside a character into one U+FFFD per byte, complete characters of the
    run included, so while a character is incomplete the whole decode is no guide; with
    transformers' space clean-up the text is held from its last space on, where a rewrite such as "don ' t" ->
    "don't" may still start, so only the prefix rule holds; the engine's old whole-answer streaming stopped for
    good at such a rewrite); `final` is the whole decode. The tokenizer takes the path its kind calls for.
    Mutants seen failing: the windowed path moving its window start to the new end (`self._prefix = len(ids)`:
    the metaspace decoder then strips a space the whole text keeps); the held-back check for an incomplete
    character removed from `_window` ("\\ufffd" streamed, then the character); `update` returning its delta
    without adding it to `text`; the stream path with skip_special_tokens=False (special tokens' text streamed);
    the clean-up path showing its text up to the end rather than its last space ("don '" shown, then "don't")."""
    for name, (tokenizer, mode) in tokenizers.items():
        for ids in _answers(tokenizer, seed=len(name)):
            detokenizer, steps, deltas = _stream(tokenizer, ids, chunk)
            assert detokenizer.mode == mode, name
            answer = tokenizer.decode(ids, skip_special_tokens=True)
            for so_far, text in steps:
                whole = tokenizer.decode(so_far, skip_special_tokens=True)
                if not whole.endswith("\ufffd"):
                    assert whole.startswith(text), (name, so_far, text, whole)
                    if mode != "whole":
                        assert text == whole, (name, so_far, text, whole)
                if not answer.endswith("\ufffd"):
                    assert answer.startswith(text), (name, so_far, text, answer)
            assert "".join(deltas) == detokenizer.text, name
            assert detokenizer.final(ids) == tokenizer.decode(ids, skip_special_tokens=True), name


def test_multibyte_character_split_across_tokens_is_held_until_complete(tokenizers):
    """A character whose UTF-8 bytes are several byte tokens: nothing of it is streamed until its last byte
    arrives, then the whole character at once (never U+FFFD). Checked on the tokenizers that spell a character in
    byte tokens (byte-level BPE, byte fallback). Mutant seen failing: the "\\ufffd" hold removed from `_window`."""
    for name in ("byte-level BPE (ours)", "Llama-style BPE, byte fallback", "decode-only byte-level BPE"):
        tokenizer, _ = tokenizers[name]
        ids = list(tokenizer.encode("a 🦴", add_special_tokens=False))
        # the bone emoji (4 UTF-8 bytes) is not in the corpus: spelt in two or more byte tokens
        assert len(tokenizer.encode("🦴", add_special_tokens=False)) >= 2, name
        _, _, deltas = _stream(tokenizer, ids)
        assert all("\ufffd" not in delta for delta in deltas), (name, deltas)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True), name
        assert deltas[-1].endswith("🦴") and "🦴" not in "".join(deltas[:-1]), (name, deltas)
        assert deltas[-2] == "", (name, deltas)  # the emoji's first bytes streamed nothing


def test_a_lone_undecodable_byte_reaches_the_text_at_final(tokenizers):
    """An answer ending in half a character (a stop by length): the stream holds it back, the final decode shows
    what the whole decode shows (U+FFFD), as `ask` would."""
    tokenizer, _ = tokenizers["byte-level BPE (ours)"]
    ids = list(tokenizer.encode("ok 肺", add_special_tokens=False))[:-1]  # the last byte of 肺 cut off
    detokenizer, _, _ = _stream(tokenizer, ids)
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert whole.endswith("\ufffd") and not detokenizer.text.endswith("\ufffd")
    assert detokenizer.final(ids) == whole


def test_a_stream_the_decoder_rewrites_goes_on_by_whole_decodes(tokenizers):
    """tokenizers' DecodeStream raises when its decoder rewrites text it already gave (a byte-fallback run that
    proves invalid: the '"' byte shown, then turned into U+FFFD with the bytes after it). The detokenizer then
    decodes the whole answer, streams nothing that contradicts what it showed, and its final text is the whole
    decode. Mutant seen failing: the exception not caught in `update` (the step raises)."""
    tokenizer, _ = tokenizers["Llama-style BPE, byte fallback"]
    ids = tokenizer.convert_tokens_to_ids(["▁a", "<0x22>", "<0xE5>", "."])
    detokenizer, steps, _ = _stream(tokenizer, ids)
    assert detokenizer.mode == "whole"
    assert steps[1][1].endswith('"')  # shown before the decoder rewrote it
    assert all(text.startswith(steps[1][1]) for _, text in steps[1:])
    assert detokenizer.final(ids) == tokenizer.decode(ids, skip_special_tokens=True)
