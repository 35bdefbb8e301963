"""Next-token selection shared by every backend (torch, ONNX Runtime, TensorRT), in transformers' order:
repetition penalty, no-repeat n-gram ban, then temperature, top-k and top-p when sampling."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.no_repeat_ngram_size < 0:
            raise ValueError("top_k and no_repeat_ngram_size must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(scores, sequences, penalty):
    """scores: (B, V) fp32; sequences: (B, S) ids seen so far. CTRL-style penalty, as transformers applies it."""
    if penalty == 1.0:
        return scores
    seen = torch.gather(scores, 1, sequences)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, sequences, seen)


def ban_repeated_ngrams(scores, sequences, n):
    """Forbid any token that would complete an n-gram already present in its row of `sequences` (B, S)."""
    if n <= 0 or sequences.shape[1] + 1 < n:
        return scores
    scores = scores.clone()
    prefix_len = n - 1
    for row, seq in enumerate(sequences.tolist()):
        prefix = tuple(seq[len(seq) - prefix_len:]) if prefix_len else ()
        banned = {seq[i + prefix_len] for i in range(len(seq) - n + 1) if tuple(seq[i:i + prefix_len]) == prefix}
        if banned:
            scores[row, list(banned)] = -float("inf")
    return scores


def select_next_token(logits, sequences, params: SamplingParams, generator=None):
    """logits: (B, V) last-position logits; sequences: (B, S) ids so far (prompt included). Returns (B,) int64."""
    scores = logits.float()
    scores = apply_repetition_penalty(scores, sequences, params.repetition_penalty)
    scores = ban_repeated_ngrams(scores, sequences, params.no_repeat_ngram_size)
    if not params.do_sample:
        return scores.argmax(-1)
    scores = scores / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - params.top_p
        drop[:, -1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
