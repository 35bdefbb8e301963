"""Export-friendly torch modules for the three deployment graphs, built from a GMAIVL state dict.

The model's own forward is written for torch inference (packed sequences, a growing KV cache, kernel dispatch).
Exporters want a static graph instead, so these modules re-state the same maths with plain torch ops and HF's
padded-cache convention:

- `VisionEncoderGraph`: pixel_values (B, 3, H, W) -> projected image features (B, N, text_hidden).
- `EmbedTokensGraph`:   input_ids (B, S) int64 -> inputs_embeds (B, S, text_hidden).
- `DecoderGraph`:       inputs_embeds (B, S, hidden), attention_mask (B, P + S) int64, position_ids (B, S) int64,
                        logits_indices (B, K) int64, past key/values (B, Hkv, P, D) per layer
                        -> logits (B, K, V) fp32, present (B, Hkv, P + S, D).
                        One graph serves prefill (P = 0) and decode (S = 1). `logits_indices` picks, per row, the
                        positions (0 <= i < S) whose logits are computed, as `logits_to_keep` does in transformers:
                        generation asks for each row's last real token (K = 1), so a prefill returns (B, 1, V)
                        instead of (B, S, V) fp32 (760 MB at S = 2048, V = 92544); all S positions remain available.

Attention is `F.scaled_dot_product_attention`, which `torch.onnx.export(dynamo=True, opset_version>=23)` lowers to
the standard ONNX `Attention` op with 4-D Q/K/V (the form TensorRT's parser accepts: the cache concat stays outside
the op). With `attention="trt_plugin"` it becomes a custom node for our TensorRT plugin instead
(see `gmaivl_rt.runtime.trt_plugin`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gmaivl_rt.kernels.rope import apply_rope_reference

from gmaivl_rt.kernels.rms_norm import rms_norm_reference
from gmaivl_rt.model.modeling import ACTIVATIONS

ATTENTION_IMPLS = ("sdpa", "trt_plugin")


def bicubic_matrix(out_size, in_size: int) -> torch.Tensor:
    """(out_size, in_size) fp32 matrix M with M @ x == 1-D bicubic resize of x (A = -0.75, align_corners=False,
    no antialias: torch's `upsample_bicubic2d`). `out_size` may be a symbolic size, so the export keeps it dynamic;
    applying M along both axes reproduces `F.interpolate(mode="bicubic")` with ONNX ops TensorRT supports
    (TensorRT's Resize has no cubic mode)."""
    a = -0.75
    dst = torch.arange(out_size, dtype=torch.float32)
    src = (dst + 0.5) * (in_size / out_size) - 0.5
    base = torch.floor(src)
    t = src - base
    weights = (
        ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
        ((a + 2) * t - (a + 3)) * t * t + 1,
        ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
        ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a,
    )
    columns = torch.arange(in_size, dtype=torch.int64)
    matrix = torch.zeros((), dtype=torch.float32)
    for offset, w in zip((-1, 0, 1, 2), weights):
        tap = torch.clamp(base.to(torch.int64) + offset, 0, in_size - 1)
        matrix = matrix + w[:, None] * (tap[:, None] == columns[None, :]).to(torch.float32)
    return matrix


class _CLIPLayer(nn.Module):
    def __init__(self, hidden, heads, intermediate, eps, act, attention):
        super().__init__()
        self.heads, self.act, self.attention = heads, ACTIVATIONS[act], attention
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)
        self.self_attn = nn.ModuleDict({n: nn.Linear(hidden, hidden) for n in ("q_proj", "k_proj", "v_proj",
                                                                                 "out_proj")})
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(hidden, intermediate), "fc2": nn.Linear(intermediate, hidden)})

    def forward(self, x):  # (B, T, C)
        B, T, C = x.shape
        h = self.layer_norm1(x)
        q, k, v = (self.self_attn[n](h).reshape(B, T, self.heads, C // self.heads)
                   for n in ("q_proj", "k_proj", "v_proj"))
        if self.attention == "trt_plugin":  # our Triton kernel inside TensorRT: (B, T, H, D) in and out
            from gmaivl_rt.runtime.trt_plugin import plugin_attention

            attn = plugin_attention(q, k, v)
        else:
            attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            attn = attn.transpose(1, 2)
        x = x + self.self_attn["out_proj"](attn.reshape(B, T, C))
        return x + self.mlp["fc2"](self.act(self.mlp["fc1"](self.layer_norm2(x))))


class VisionEncoderGraph(nn.Module):
    """pixel_values (B, 3, H, W) float (CLIP-normalised) -> image features (B, N, text_hidden) in the graph dtype.

    Fixed mode: H = W = image_size, N = (image_size / patch)^2. Dynamic-resolution mode: H and W any multiples of
    the patch size; position embeddings are bicubically interpolated to the (H / patch, W / patch) grid in-graph."""

    def __init__(self, vision, text_hidden, attention="sdpa"):
        super().__init__()
        C, P = vision.hidden_size, vision.patch_size
        self.grid = vision.image_size // P
        self.dynamic = bool(vision.dynamic_resolution)
        self.keep_cls = vision.select_strategy == "full"
        self.embeddings = nn.Module()
        self.embeddings.patch_embedding = nn.Conv2d(3, C, P, stride=P, bias=False)
        self.embeddings.class_embedding = nn.Parameter(torch.empty(C))
        self.embeddings.position_embedding = nn.Embedding(1 + self.grid * self.grid, C)
        self.pre_layrnorm = nn.LayerNorm(C, eps=vision.layer_norm_eps)
        self.layers = nn.ModuleList(_CLIPLayer(C, vision.num_heads, vision.intermediate_size, vision.layer_norm_eps,
                                               vision.hidden_act, attention) for _ in range(vision.layers_used))
        self.linear_1 = nn.Linear(C, text_hidden)
        self.linear_2 = nn.Linear(text_hidden, text_hidden)

    def _patch_positions(self, gh, gw):
        table = self.embeddings.position_embedding.weight[1:]
        if not self.dynamic:
            return table
        grid = table.reshape(self.grid, self.grid, -1).to(torch.float32)
        rows = bicubic_matrix(gh, self.grid)  # (gh, G)
        cols = bicubic_matrix(gw, self.grid)  # (gw, G)
        out = torch.einsum("ai,ijc,bj->abc", rows, grid, cols)
        return out.reshape(-1, table.shape[-1]).to(table.dtype)

    def forward(self, pixel_values):
        emb = self.embeddings
        x = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype))  # (B, C, gh, gw)
        gh, gw = x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2) + self._patch_positions(gh, gw)
        cls = (emb.class_embedding + emb.position_embedding.weight[0]).expand(x.shape[0], 1, -1)
        x = self.pre_layrnorm(torch.cat([cls.to(x.dtype), x], dim=1))
        for layer in self.layers:
            x = layer(x)
        if not self.keep_cls:
            x = x[:, 1:]
        return self.linear_2(F.gelu(self.linear_1(x)))  # the mlp2x_gelu projector


class EmbedTokensGraph(nn.Module):
    """input_ids (B, S) int64 -> inputs_embeds (B, S, hidden) in the graph dtype."""

    def __init__(self, vocab_size, hidden):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, hidden)

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)


class _RMSNorm(nn.Module):
    def __init__(self, hidden, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(hidden)), eps

    def forward(self, x):  # the model's own reference: fp32 statistics, as HF Llama
        return rms_norm_reference(x, self.weight, self.eps)


class _DecoderLayer(nn.Module):
    def __init__(self, text):
        super().__init__()
        H, D, bias = text.hidden_size, text.head_dim, bool(getattr(text, "attention_bias", False))
        self.hq, self.hkv, self.d = text.num_heads, text.num_kv_heads, D
        self.input_layernorm = _RMSNorm(H, text.rms_norm_eps)
        self.post_attention_layernorm = _RMSNorm(H, text.rms_norm_eps)
        self.self_attn = nn.ModuleDict({
            "q_proj": nn.Linear(H, self.hq * D, bias=bias), "k_proj": nn.Linear(H, self.hkv * D, bias=bias),
            "v_proj": nn.Linear(H, self.hkv * D, bias=bias), "o_proj": nn.Linear(self.hq * D, H, bias=bias)})
        self.mlp = nn.ModuleDict({"gate_proj": nn.Linear(H, text.intermediate_size, bias=False),
                                  "up_proj": nn.Linear(H, text.intermediate_size, bias=False),
                                  "down_proj": nn.Linear(text.intermediate_size, H, bias=False)})

    def forward(self, x, cos, sin, allowed, past_k, past_v):
        B, S, _ = x.shape
        h = self.input_layernorm(x)
        a = self.self_attn
        q = a["q_proj"](h).reshape(B, S, self.hq, self.d)
        k = a["k_proj"](h).reshape(B, S, self.hkv, self.d)
        q, k = (t.transpose(1, 2) for t in apply_rope_reference(q, k, cos, sin))
        v = a["v_proj"](h).reshape(B, S, self.hkv, self.d).transpose(1, 2)
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=self.hq != self.hkv)
        x = x + a["o_proj"](out.transpose(1, 2).reshape(B, S, self.hq * self.d))
        m = self.mlp
        h = self.post_attention_layernorm(x)
        return x + m["down_proj"](F.silu(m["gate_proj"](h)) * m["up_proj"](h)), k, v


class DecoderGraph(nn.Module):
    """The language model with a padded KV cache (see the module docstring for the I/O contract)."""

    def __init__(self, text):
        super().__init__()
        self.head_dim, self.theta = text.head_dim, float(text.rope_theta)
        self.rope_scaling, self.max_positions = text.rope_scaling, text.max_position_embeddings
        self.register_buffer("exponents", torch.arange(0, text.head_dim, 2, dtype=torch.int64).float()
                             / text.head_dim, persistent=False)
        self.layers = nn.ModuleList(_DecoderLayer(text) for _ in range(text.num_layers))
        self.norm = _RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)

    def _inv_freq(self, position_ids):
        """(D/2,) fp32 RoPE frequencies; with dynamic NTK scaling (InternLM2.5) the base grows once a position
        passes the trained context, computed in-graph from this call's largest position as the model does."""
        if not self.rope_scaling:
            return 1.0 / (self.theta ** self.exponents)
        factor, d = float(self.rope_scaling["factor"]), self.head_dim
        length = position_ids.max().to(torch.float32) + 1
        stretched = self.theta * ((factor * length / self.max_positions) - (factor - 1)) ** (d / (d - 2))
        theta = torch.where(length > self.max_positions, stretched, torch.full_like(stretched, self.theta))
        return 1.0 / (theta ** self.exponents)

    def forward(self, inputs_embeds, attention_mask, position_ids, logits_indices, past_key_values):
        """logits_indices: (B, K) int64 positions in 0..S-1 per row; past_key_values: flat list
        [k_0, v_0, k_1, v_1, ...], each (B, Hkv, P, D).
        Returns (logits (B, K, V) fp32 at those positions, flat list of presents (B, Hkv, P + S, D))."""
        S = inputs_embeds.shape[1]
        T = attention_mask.shape[1]
        past = T - S
        # Causal over absolute cache positions, padded keys hidden. A query may always see itself, so a left-pad
        # query never has an empty row (an all-masked softmax row is NaN and would leak into the cache).
        q_pos = torch.arange(S, device=inputs_embeds.device)[:, None] + past
        k_pos = torch.arange(T, device=inputs_embeds.device)[None, :]
        key_ok = attention_mask[:, None, None, :].to(torch.bool) | (k_pos == q_pos)[None, None]
        allowed = (k_pos <= q_pos)[None, None] & key_ok  # (B, 1, S, T)
        freqs = position_ids.to(torch.float32)[..., None] * self._inv_freq(position_ids)  # (B, S, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, D)
        cos, sin = emb.cos().to(inputs_embeds.dtype), emb.sin().to(inputs_embeds.dtype)
        x, presents = inputs_embeds, []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, allowed, past_key_values[2 * i], past_key_values[2 * i + 1])
            presents += [k, v]
        # Gather before the final norm and the head: only the K asked-for rows pay for the (H x V) product.
        kept = torch.gather(x, 1, logits_indices[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, H)
        logits = self.lm_head(self.norm(kept)).to(torch.float32)
        return logits, presents


def build_graphs(config, state_dict, *, dtype=torch.float32, attention="sdpa"):
    """GMAIVLConfig + the model's state dict (names as in `GMAIVL.state_dict()`) -> dict of the three export
    modules {"vision_encoder", "embed_tokens", "decoder_model_merged"}, in `dtype`, weights shared with
    `state_dict` where dtypes already match."""
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"attention={attention!r} is not one of {ATTENTION_IMPLS}")
    vision, text = config.vision, config.text
    modules = {
        "vision_encoder": VisionEncoderGraph(vision, text.hidden_size, attention),
        "embed_tokens": EmbedTokensGraph(text.vocab_size, text.hidden_size),
        "decoder_model_merged": DecoderGraph(text),
    }
    sd = dict(state_dict)
    if "lm_head.weight" not in sd:  # tied word embeddings
        sd["lm_head.weight"] = sd["language_model.embed_tokens.weight"]
    renames = {
        "vision_encoder": [("vision_tower.encoder.layers.", "layers."), ("vision_tower.", ""),
                           ("multi_modal_projector.", "")],
        "embed_tokens": [("language_model.embed_tokens.", "embed_tokens.")],
        "decoder_model_merged": [("language_model.", ""), ("lm_head.", "lm_head.")],
    }
    for name, module in modules.items():
        wanted = module.state_dict().keys()
        picked = {}
        for key, tensor in sd.items():
            for old, new in renames[name]:
                if key.startswith(old):
                    local = new + key[len(old):]
                    if local in wanted:
                        picked[local] = tensor.detach().to(dtype)
                    break
        missing = sorted(set(wanted) - set(picked))
        if missing:
            raise KeyError(f"{name}: the state dict lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        module.load_state_dict(picked, strict=True, assign=True)
        module.to(dtype).eval()
        if isinstance(module, DecoderGraph):
            module.exponents = module.exponents.float()  # rope angles stay fp32 in every graph dtype
    return modules
