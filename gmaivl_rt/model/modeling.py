"""GMAI-VL: a CLIP ViT vision tower, the mlp2x_gelu projector and a Llama-family decoder, top to bottom.

Every hot op (attention, norms, RoPE, SwiGLU, patch embedding, projector, loss) goes through `gmaivl_rt.model.ops`,
which picks a Triton kernel or its PyTorch reference. Tokens travel packed: (total_tokens, hidden) with int32
`cu_seqlens`, so padding is never computed and soft-packed training batches need no special case.
Parameter names follow transformers' in-memory Llava names (without the leading "model.").
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gmaivl_rt.model import ops
from gmaivl_rt.model.config import GMAIVLConfig
from gmaivl_rt.errors import InputError
from gmaivl_rt.limits import check_context, check_max_new_tokens
from gmaivl_rt.model.sampling import generate_tokens
from gmaivl_rt.model.vision_sizes import check_image_size

IGNORE_INDEX = -100

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim)), eps

    def forward(self, x):
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps)


def _run_layers(layers, hidden, checkpointing, *args):
    for layer in layers:
        if checkpointing and torch.is_grad_enabled():
            hidden = checkpoint(layer, hidden, *args, use_reentrant=False)
        else:
            hidden = layer(hidden, *args)
    return hidden


# ----------------------------------------------------------------------------------------------- vision tower
class VisionEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.position_embedding = nn.Embedding(cfg.grid_size ** 2 + 1, cfg.hidden_size)

    def forward(self, images):
        """images: (N, 3, H, W) or a list of (3, H_i, W_i), CLIP-normalised. Returns packed (T, C) embeddings
        (CLS first in each image), cu_seqlens (N + 1,) int32 and grid sizes (N, 2)."""
        return ops.patch_embed(images, self.patch_embedding.weight, None, self.class_embedding,
                               self.position_embedding.weight)


class VisionAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(cfg.hidden_size, cfg.hidden_size) for _ in range(4))

    def forward(self, x, cu_seqlens, max_seqlen):
        shape = (x.shape[0], self.num_heads, self.head_dim)
        q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)
        out = ops.attention(q, k, v, causal=False, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return self.out_proj(out.reshape(x.shape))


class VisionMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cfg.hidden_size, cfg.intermediate_size), nn.Linear(cfg.intermediate_size,
                                                                                          cfg.hidden_size)
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"vision hidden_act {cfg.hidden_act!r} is not one of {', '.join(ACTIVATIONS)}")
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1, self.self_attn = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps), VisionAttention(cfg)
        self.layer_norm2, self.mlp = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps), VisionMLP(cfg)

    def forward(self, x, cu_seqlens, max_seqlen):
        x = x + self.self_attn(self.layer_norm1(x), cu_seqlens, max_seqlen)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))


class VisionTower(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)  # (sic) CLIP's spelling
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)  # loaded, unused by Llava features
        self.gradient_checkpointing = False

    def forward(self, images):
        """Returns the selected hidden states packed over all images, (tokens, C), and tokens per image."""
        for i, img in enumerate(images):
            check_image_size(self.cfg, *img.shape[-2:], role=f"image {i}")
        hidden, cu_seqlens, _ = self.embeddings(images)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        hidden = self.pre_layrnorm(hidden)
        layers = self.encoder.layers[: self.cfg.layers_used]
        hidden = _run_layers(layers, hidden, self.gradient_checkpointing and self.training, cu_seqlens,
                             max(lengths))
        if self.cfg.select_strategy == "full":
            return hidden, lengths
        keep = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        keep[cu_seqlens[:-1].long()] = False  # drop each image's CLS token
        return hidden[keep], [n - 1 for n in lengths]


class Projector(nn.Module):
    """mlp2x_gelu: Linear -> GELU -> Linear, through the fused projector GEMM."""

    def __init__(self, vision_hidden, text_hidden):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(vision_hidden, text_hidden), nn.Linear(text_hidden, text_hidden)

    def forward(self, x):
        return ops.mlp2x_gelu(x, self.linear_1.weight, self.linear_1.bias, self.linear_2.weight, self.linear_2.bias)


# ----------------------------------------------------------------------------------------------- language model
@dataclass
class TokenBatch:
    """Where the packed tokens of one forward pass come from.
    lengths: new tokens per sequence; cu_seqlens: (n + 1,) int32 over them; positions: (T,) RoPE positions;
    cache_rows, cache_slots: (T,) where each token's key/value goes in the KV cache; cache_starts: tokens each
    sequence already had cached."""
    lengths: list
    cu_seqlens: torch.Tensor
    positions: torch.Tensor
    cache_rows: torch.Tensor
    cache_slots: torch.Tensor
    cache_starts: list

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths, default=0)

    @functools.cached_property
    def cache_seqlens_after(self) -> torch.Tensor:
        """(n,) int32: tokens each sequence holds in the cache once this batch is stored (made once, used per layer)."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]) + torch.tensor(
            self.cache_starts, dtype=torch.int32, device=self.cu_seqlens.device)


class KVCache:
    """Per-layer keys/values (batch, max_length, kv_heads, head_dim), each sequence's entries left-aligned
    (no padding inside), and `lengths`, how many each sequence holds."""

    def __init__(self, cfg: GMAIVLConfig, batch_size: int, max_length: int, dtype, device):
        t = cfg.text
        shape = (batch_size, max_length, t.num_kv_heads, t.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(t.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(t.num_layers)]
        self.lengths = [0] * batch_size
        self.max_length = max_length

    def attend(self, layer: int, q, k, v, batch: TokenBatch):
        """Store the new tokens' k/v, then attend each new query to its sequence's cached and new keys."""
        keys, values = self.keys[layer], self.values[layer]
        keys[batch.cache_rows, batch.cache_slots] = k.to(keys.dtype)
        values[batch.cache_rows, batch.cache_slots] = v.to(values.dtype)
        if all(s == 0 for s in batch.cache_starts):  # prefill: the cache held nothing before
            return ops.attention(q, k, v, causal=True, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
        if all(n == 1 for n in batch.lengths):  # decode: one token per sequence
            return ops.decode_attention(q, keys, values, batch.cache_seqlens_after)
        return _attention_after_prefix(q, keys, values, batch)  # rare: several new tokens after a prefix

    def advance(self, lengths):
        self.lengths = [a + b for a, b in zip(self.lengths, lengths)]


def _attention_after_prefix(q, keys, values, batch: TokenBatch):
    """Reference path for chunks of several new tokens appended to a non-empty cache (not a hot path)."""
    out = torch.empty_like(q)
    bounds = batch.cu_seqlens.tolist()
    for row, (start, n) in enumerate(zip(batch.cache_starts, batch.lengths)):
        if n:
            out[bounds[row]:bounds[row + 1]] = attend_after_prefix(q[bounds[row]:bounds[row + 1]],
                                                                   keys[row, :start + n], values[row, :start + n])
    return out


def attend_after_prefix(q, keys, values):
    """q: (n, Hq, D), the last n of the total = keys.shape[0] positions; keys, values: (total, Hkv, D), the
    sequence's whole cache. Causal attention of those n queries over the cache (SDPA), (n, Hq, D)."""
    n, total = q.shape[0], keys.shape[0]
    qi, ki, vi = q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None]
    allowed = torch.arange(total, device=q.device)[None, :] <= torch.arange(total - n, total, device=q.device)[:, None]
    o = F.scaled_dot_product_attention(qi, ki.to(qi.dtype), vi.to(qi.dtype), attn_mask=allowed,
                                       enable_gqa=qi.shape[1] != ki.shape[1])
    return o[0].transpose(0, 1)


class TextAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=bias)

    def forward(self, x, cos, sin, batch: TokenBatch, cache: KVCache | None, layer: int):
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)
        q, k = ops.apply_rope(q, k, cos.to(q.dtype), sin.to(q.dtype))
        if cache is None:
            out = ops.attention(q, k, v, causal=True, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
        else:
            out = cache.attend(layer, q, k, v, batch)
        return self.o_proj(out.reshape(T, -1))


class TextMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, index: int):
        super().__init__()
        self.index = index
        self.input_layernorm, self.self_attn = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps), TextAttention(cfg)
        self.post_attention_layernorm, self.mlp = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps), TextMLP(cfg)

    def forward(self, x, cos, sin, batch, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, cache, self.index)
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def rope_theta(self, max_position: int) -> float:
        """InternLM2.5's dynamic NTK scaling stretches the base only past the trained context."""
        cfg, theta = self.cfg, self.cfg.rope_theta
        if cfg.rope_scaling and max_position + 1 > cfg.max_position_embeddings:
            factor, d = cfg.rope_scaling["factor"], cfg.head_dim
            theta *= ((factor * (max_position + 1) / cfg.max_position_embeddings) - (factor - 1)) ** (d / (d - 2))
        return theta

    def forward(self, embeds, batch: TokenBatch, cache: KVCache | None = None):
        """embeds: (T, hidden) packed. Returns the final-norm hidden states (T, hidden)."""
        max_position = int(batch.positions.max()) if batch.positions.numel() else 0
        cos, sin = ops.rope_cos_sin(batch.positions, self.cfg.head_dim, self.rope_theta(max_position),
                                    dtype=embeds.dtype)
        hidden = _run_layers(self.layers, embeds, self.gradient_checkpointing and self.training, cos, sin, batch,
                             cache)
        return self.norm(hidden)


# ----------------------------------------------------------------------------------------------- the whole model
@dataclass
class GMAIVLOutput:
    logits: torch.Tensor | None          # (B, S, vocab); zeros at padding; None when only the fused loss ran
    loss: torch.Tensor | None            # mean next-token cross-entropy over labels != -100
    past_key_values: KVCache | None


class GMAIVL(nn.Module):
    def __init__(self, config: GMAIVLConfig):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config.vision)
        self.multi_modal_projector = Projector(config.vision.hidden_size, config.text.hidden_size)
        self.language_model = LanguageModel(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        if config.text.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight
        if self.lm_head.weight.device.type != "meta":
            self.apply(_init_weights)

    # -------------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None) -> "GMAIVL":
        """Load a model folder (config.json + safetensors, single or sharded) in any supported layout."""
        from gmaivl_rt.model.checkpoint import load_pretrained
        return load_pretrained(cls, path, dtype=dtype, device=device)

    def save_pretrained(self, path, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write safetensors + config.json that transformers' LlavaForConditionalGeneration loads."""
        from gmaivl_rt.model.checkpoint import save_pretrained
        save_pretrained(self, path, max_shard_bytes=max_shard_bytes)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.vision_tower.gradient_checkpointing = self.language_model.gradient_checkpointing = enabled

    # -------------------------------------------------------------- forward
    def encode_images(self, pixel_values):
        """pixel_values: (N, 3, S, S) or a list of (3, H_i, W_i) CLIP-normalised images.
        Returns projected image features (total_image_tokens, text_hidden), images in order."""
        features, _ = self.vision_tower(pixel_values)
        return self.multi_modal_projector(features)

    def forward(self, input_ids, pixel_values=None, attention_mask=None, position_ids=None, past_key_values=None,
                labels=None, cu_seqlens=None, return_logits=None) -> GMAIVLOutput:
        """input_ids: (B, S) int64 with one `image_token_index` per image feature; attention_mask: (B, S) 0/1
        (any padding side); position_ids: (B, S) or None (counted per sequence, padding skipped);
        past_key_values: a KVCache to extend (see `new_cache`); labels: (B, S) aligned with input_ids, -100 ignored
        (shifted here, never across sequences); cu_seqlens: (n + 1,) int32 when input_ids (1, T) packs n sequences.
        With labels the loss runs fused and logits are skipped unless return_logits=True."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        cache = past_key_values
        hidden, batch, token_index = self._decoder(input_ids, pixel_values, attention_mask, position_ids,
                                                   cu_seqlens, cache)
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
            targets = _shift_within_sequences(labels.reshape(-1)[token_index], batch.cu_seqlens)
            loss = ops.fused_linear_cross_entropy(hidden, self.lm_head.weight, targets, ignore_index=IGNORE_INDEX)
        logits = None
        if labels is None or return_logits:
            packed = self.lm_head(hidden)
            logits = packed.new_zeros(input_ids.numel(), packed.shape[-1]).index_copy(0, token_index, packed)
            logits = logits.view(*input_ids.shape, -1)
        return GMAIVLOutput(logits=logits, loss=loss, past_key_values=cache)

    def _decoder(self, input_ids, pixel_values, attention_mask, position_ids, cu_seqlens, cache,
                 image_features=None, image_slots=None):
        """Embed the tokens (image features over the image tokens), run the decoder over them packed, extend the
        cache. image_features: projected features (image_tokens, text_hidden) computed earlier, instead of
        pixel_values (the serving engine caches them per image). image_slots: (B, S) bool, where the features go,
        when the caller knows (a recomputed answer may hold generated image-token ids that are not slots); default
        every image-token id. Returns the final hidden states (T, hidden), the TokenBatch, and each token's flat
        index in input_ids."""
        batch, token_index = self._token_batch(input_ids, attention_mask, position_ids, cu_seqlens, cache)
        ids = input_ids.reshape(-1)[token_index]
        slots = None if image_slots is None else image_slots.reshape(-1)[token_index]
        no_images = pixel_values is None and image_features is None
        decoding = no_images and cache is not None and any(batch.cache_starts)
        hidden = self.language_model(self._embed(ids, pixel_values, decoding, image_features, slots), batch, cache)
        if cache is not None:
            cache.advance(batch.lengths)
        return hidden, batch, token_index

    def _embed(self, ids, pixel_values, decoding=False, image_features=None, image_slots=None):
        """Token embeddings with image features (given, or from pixel_values) written over the image tokens
        (`image_slots` (T,) bool where given). While decoding, a generated image-token id is embedded like any
        token (as transformers does)."""
        is_image = ids == self.config.image_token_index if image_slots is None else image_slots
        embeds = self.language_model.embed_tokens(ids)
        n_image_tokens = int(is_image.sum())
        if image_slots is not None and n_image_tokens == 0:
            return embeds
        if pixel_values is None and image_features is None:
            if n_image_tokens and not decoding:
                raise InputError(f"input_ids hold {n_image_tokens} image tokens but no pixel_values were given")
            return embeds
        features = self.encode_images(pixel_values) if image_features is None else image_features
        if features.shape[0] != n_image_tokens:
            raise InputError(f"input_ids hold {n_image_tokens} image tokens but pixel_values give "
                             f"{features.shape[0]} image features (expand <image> to the image token count)")
        return embeds.index_put((is_image.nonzero()[:, 0],), features.to(embeds.dtype))

    @staticmethod
    def _token_batch(input_ids, attention_mask, position_ids, cu_seqlens, cache):
        B, S = input_ids.shape
        device = input_ids.device
        if cu_seqlens is not None:
            if B != 1 or attention_mask is not None or cache is not None:
                raise ValueError("packed input (cu_seqlens) takes input_ids of shape (1, T), no attention_mask and "
                                 "no cache")
            if int(cu_seqlens[-1]) != S or int(cu_seqlens[0]) != 0:
                raise ValueError(f"cu_seqlens {cu_seqlens.tolist()} do not span the {S} packed tokens")
            cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            rows = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                           torch.tensor(lengths, device=device))
            ranks = torch.arange(S, device=device) - cu_seqlens[:-1].long()[rows]
            positions = position_ids.reshape(-1) if position_ids is not None else ranks
            token_index = torch.arange(S, device=device)
            return TokenBatch(lengths, cu_seqlens, positions, rows, ranks, [0] * len(lengths)), token_index
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if mask.shape != input_ids.shape:
            raise InputError(f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(input_ids.shape)}")
        lengths = mask.sum(1).tolist()
        starts = cache.lengths if cache is not None else [0] * B
        if cache is not None:
            if len(starts) != B:
                raise ValueError(f"the cache holds {len(starts)} sequences but input_ids has {B}")
            if max(s + n for s, n in zip(starts, lengths)) > cache.max_length:
                raise ValueError(f"the KV cache holds at most {cache.max_length} tokens per sequence")
        token_index = mask.reshape(-1).nonzero()[:, 0]
        rows = token_index // S
        slots = (mask.long().cumsum(1) - 1).reshape(-1)[token_index] + torch.tensor(starts, device=device)[rows]
        positions = position_ids.reshape(-1)[token_index] if position_ids is not None else slots
        cu_seqlens = F.pad(torch.tensor(lengths, device=device).cumsum(0), (1, 0)).to(torch.int32)
        return TokenBatch(lengths, cu_seqlens, positions, rows, slots, list(starts)), token_index

    # -------------------------------------------------------------- generation
    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        """A cache in the activation dtype: the weights' dtype, or autocast's when it is on (k/v then come out of
        the projections in that dtype, and the decode kernel multiplies them with q)."""
        w = self.lm_head.weight
        dtype = torch.get_autocast_dtype(w.device.type) if torch.is_autocast_enabled(w.device.type) else w.dtype
        return KVCache(self.config, batch_size, max_length, dtype, w.device)

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0, min_p: float = 0.0,
                 eos_token_id=None, pad_token_id=None, generator: torch.Generator | None = None, constraint=None,
                 logprobs: bool = False, top_logprobs: int = 0, trace=None):
        """input_ids: (B, S) left-padded prompts (attention_mask 0 on padding). Returns (B, S + new) int64 like
        transformers: generation stops when every row has produced an eos; finished rows are filled with
        pad_token_id. eos_token_id: int or list (default: the config's). constraint, logprobs, top_logprobs,
        trace: structured output and logprobs, see `gmaivl_rt.model.sampling.generate_tokens`."""
        B, S = input_ids.shape
        # checked before the cache is sized by them (generate_tokens checks them again for every backend)
        max_new_tokens = check_max_new_tokens(max_new_tokens)
        check_context(S, max_new_tokens, self.config.text.context_length)
        cache = self.new_cache(B, S + max_new_tokens)
        return generate_tokens(
            lambda: self.last_logits(input_ids, pixel_values, attention_mask, cache),
            lambda next_tokens: self.last_logits(next_tokens[:, None], None, None, cache),
            input_ids, self.config.text, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
            top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size, min_p=min_p, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, generator=generator, constraint=constraint, logprobs=logprobs,
            top_logprobs=top_logprobs, trace=trace)

    def last_logits(self, input_ids, pixel_values=None, attention_mask=None, cache=None, *, image_features=None,
                    image_slots=None) -> torch.Tensor:
        """One forward step of generation: the tokens run through the model (extending `cache` when given: a
        KVCache, or the engine's PagedKVCache), lm_head only on each sequence's last token.
        input_ids: (B, S) int64; pixel_values, attention_mask: as in `forward`; image_features, image_slots: as in
        `_decoder` (features computed earlier, and where they go). Returns (B, vocab) float32 logits."""
        if attention_mask is not None and bool((attention_mask.sum(1) == 0).any()):
            raise InputError("a prompt is empty (its attention_mask is all zeros)")
        hidden, batch, _ = self._decoder(input_ids, pixel_values, attention_mask, None, None, cache, image_features,
                                         image_slots)
        return self.lm_head(hidden[batch.cu_seqlens[1:].long() - 1]).float()


def _shift_within_sequences(labels, cu_seqlens):
    """Next-token targets for packed labels (T,): each token predicts the next one of its own sequence."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:-1] = labels[1:]
    targets[cu_seqlens[1:].long() - 1] = IGNORE_INDEX
    return targets


def _init_weights(module):
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, VisionEmbeddings):
        nn.init.normal_(module.class_embedding, std=0.02)
