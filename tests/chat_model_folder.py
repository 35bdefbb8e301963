"""A tiny model folder that can answer text: our BPE tokenizer trained on a few medical questions and a `tiny`
preset model sized to it (random weights, seed 0). Shared by the ask, boundary and load-check tests."""
from __future__ import annotations

import torch

from gmaivl_rt import GMAIVL, GMAIVLConfig
from gmaivl_rt.train.tokenizer import model_vocab_fields, train_bpe_tokenizer

TEXTS = ["<image>\nWhat modality is this image?", "This is a CT scan of the chest.", "Which plane is shown?",
         "An axial slice.", "Describe the image.", "A magnetic resonance image of the head."] * 20


def make_chat_model_folder(path, texts=TEXTS):
    """Write tokenizer files and a tiny GMAIVL checkpoint into `path`; returns `path`."""
    tokenizer = train_bpe_tokenizer(texts, path, vocab_size=300, min_frequency=1)
    config = GMAIVLConfig.preset("tiny").replace(**model_vocab_fields(tokenizer))
    torch.manual_seed(0)
    GMAIVL(config).save_pretrained(path)
    return path
