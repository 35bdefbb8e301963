"""A byte-level BPE tokenizer for our own presets, trained on a built dataset's conversation text.

Real checkpoints bring their own tokenizer; the `tiny` and `compact` presets get one of these, sized by the
config (`tokenizer.vocab_size`). It is saved as `tokenizer.json` + `tokenizer_config.json` (with the internlm2
chat template) so `transformers.AutoTokenizer.from_pretrained(dir)` loads it, and the model config takes its
`vocab_size` and `image_token_index` from it (`model_vocab_fields`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Iterator

from gmaivl_rt.atomic import staged_files

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
IM_START, IM_END, IMAGE = "<|im_start|>", "<|im_end|>", "<image>"
# Order fixes their ids: 0..6, so every tokenizer we train agrees on where the special tokens live.
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, IM_START, IM_END, IMAGE]

# The internlm2 chatml template for `apply_chat_template`: the same text `gmaivl_rt.chat.build_prompt` renders
# (no BOS: our tokenizers have none; tests/test_tokenizer.py checks the two agree).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def conversation_texts(data) -> Iterator[str]:
    """Every human/gpt turn of a built dataset (a data folder or meta-list path), `<image>` placeholders kept."""
    from .dataset import iter_records, load_meta

    for source in load_meta(data):
        for record in iter_records(source):
            for turn in record.get("conversations", []):
                yield str(turn.get("value", ""))


def train_bpe_tokenizer(texts: Iterable[str], out_dir, vocab_size: int = 4096, min_frequency: int = 2):
    """Train a byte-level BPE on `texts` and save it under `out_dir`; returns the loaded transformers tokenizer.

    vocab_size counts the 7 special tokens and the 256 byte symbols, so it must exceed 263.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size <= len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size={vocab_size} must exceed {len(SPECIAL_TOKENS) + 256} "
                         "(special tokens + the 256 byte symbols of a byte-level BPE)")
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # `<image>` is a special token: splitting it out before training keeps it from shaping merges.
    tokenizer.train_from_iterator((t.replace(IMAGE, " ") for t in texts), trainer=trainer)
    shortfall = vocab_size_shortfall(tokenizer.get_vocab_size(), vocab_size, min_frequency)
    if shortfall:
        logging.getLogger(__name__).warning("tokenizer: %s", shortfall)
    return save_tokenizer(tokenizer, out_dir)


def vocab_size_shortfall(reached: int, requested: int, min_frequency: int) -> str | None:
    """Why a BPE stopped below the size asked for (None when it reached it): BPE merges only pairs of symbols
    seen at least `min_frequency` times, so a small text runs out of merges."""
    if reached >= requested:
        return None
    return (f"reached {reached} tokens, not the {requested} asked for: the text has no more symbol pairs seen at "
            f"least {min_frequency} times (more text or a lower --min-frequency gives more merges)")


def save_tokenizer(tokenizer, out_dir):
    """Wrap a `tokenizers.Tokenizer` for transformers and save it atomically (temp dir + os.replace per file)."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END, IMAGE],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1_000_000,
    )
    save_hf_tokenizer(hf, out_dir)
    return load_tokenizer(out_dir)


def save_hf_tokenizer(tokenizer, out_dir) -> None:
    """`tokenizer.save_pretrained(out_dir)`, each file landing whole (written to a temp dir, then os.replace)."""
    with staged_files(out_dir, prefix=".tok-") as tmp:
        tokenizer.save_pretrained(tmp)


def load_tokenizer(path):
    """Load a tokenizer directory (ours or a real checkpoint's) with transformers."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        raise FileNotFoundError(f"tokenizer: no tokenizer.json or tokenizer_config.json in {path}")
    return AutoTokenizer.from_pretrained(str(path))


def image_token_id(tokenizer) -> int:
    """The id of `<image>`; an error naming the tokenizer when it has none (it must be one token)."""
    ids = tokenizer.convert_tokens_to_ids([IMAGE])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no {IMAGE} token")
    return int(ids[0])


def model_vocab_fields(tokenizer) -> dict:
    """The model config fields a tokenizer decides: the text vocab size and the image token's id."""
    return {"vocab_size": len(tokenizer), "image_token_index": image_token_id(tokenizer)}


def chat_stop_ids(tokenizer) -> list[int]:
    """Where a chat reply ends: the tokenizer's eos, then `<|im_end|>` (unknown or missing ones left out)."""
    ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)]
    return list(dict.fromkeys(i for i in ids if i is not None and i != tokenizer.unk_token_id))


def check_tokenizer_fits(model_config, tokenizer, where) -> None:
    """A clear error (naming `where`) when a tokenizer and a model config disagree: `<image>` ids, or more tokens
    than the model's vocabulary."""
    fields = model_vocab_fields(tokenizer)
    if fields["image_token_index"] != model_config.image_token_index:
        raise ValueError(f"tokenizer {where}: {IMAGE} is id {fields['image_token_index']} but the model's "
                         f"image_token_index is {model_config.image_token_index}")
    if fields["vocab_size"] > model_config.text.vocab_size:
        raise ValueError(f"tokenizer {where} has {fields['vocab_size']} tokens, more than the model's "
                         f"vocab_size {model_config.text.vocab_size}")
