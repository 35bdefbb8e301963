"""A byte-level BPE tokenizer for our own presets, trained on a built dataset's conversation text.

Real checkpoints bring their own tokenizer; the `tiny` and `compact` presets get one of these, sized by the
config (`tokenizer.vocab_size`). It is saved as `tokenizer.json` + `tokenizer_config.json` (with the internlm2
chat template) so `transformers.AutoTokenizer.from_pretrained(dir)` loads it, and the model config takes its
`vocab_size` and `image_token_index` from it (`model_vocab_fields`).
"""
from __future__ import annotations

import logging
from typing import Iterable, Iterator

from gmaivl_rt.atomic import staged_files
from gmaivl_rt.model.chat import CHAT_TEMPLATE, IM_END, IM_START, IMAGE_TOKEN
from gmaivl_rt.runtime.tokenizer import load_tokenizer

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
# Order fixes their ids: 0..6, so every tokenizer we train agrees on where the special tokens live.
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, IM_START, IM_END, IMAGE_TOKEN]


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
    tokenizer.train_from_iterator((t.replace(IMAGE_TOKEN, " ") for t in texts), trainer=trainer)
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
        additional_special_tokens=[IM_START, IM_END, IMAGE_TOKEN],
        chat_template=CHAT_TEMPLATE,
        model_max_length=1_000_000,
    )
    save_hf_tokenizer(hf, out_dir)
    return load_tokenizer(out_dir)


def save_hf_tokenizer(tokenizer, out_dir) -> None:
    """`tokenizer.save_pretrained(out_dir)`, each file landing whole (written to a temp dir, then os.replace)."""
    with staged_files(out_dir, prefix=".tok-") as tmp:
        tokenizer.save_pretrained(tmp)
