"""RoPE Triton kernel (interpreted) against the PyTorch reference + autograd (run in a wider precision on the
upcast inputs as the ground truth, in the test dtype as the yardstick: tests/support/rowwise_checks.py) and transformers'
Llama rotary embedding. Mutant, applied by hand to kernels/rope.py: the sign of the first half's rotation flipped
(`x1 * cos1 + x2 * sin1`): 13 tests fail, every dtype."""
import pytest
import torch
from rowwise_checks import DTYPES, assert_close_to_truth, check_matches_reference

from gmaivl_rt.kernels.rope import apply_rope, apply_rope_reference, rope_cos_sin

Q_AND_K = (0, 1)  # cos/sin take no gradient: only q's and k's are compared


def _inputs(lead, n_q_heads, n_k_heads, head_dim, dtype, positions=None):
    q = torch.randn(*lead, n_q_heads, head_dim).to(dtype)
    k = torch.randn(*lead, n_k_heads, head_dim).to(dtype)
    if positions is None:
        positions = torch.arange(lead[-1]).expand(lead)
    cos, sin = rope_cos_sin(positions, head_dim, theta=10000.0, dtype=dtype)
    return q, k, cos, sin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,n_q_heads,n_k_heads,head_dim", [(1, 4, 2, 80), (17, 3, 1, 96), (127, 2, 2, 64)])
def test_rope_packed_tokens_matches_reference(triton_path, tokens, n_q_heads, n_k_heads, head_dim, dtype):
    # Packed layout: q (T, Hq, D), k (T, Hkv, D), cos/sin (T, D); positions restart per sample.
    positions = torch.cat([torch.arange(tokens // 2), torch.arange(tokens - tokens // 2)])
    inputs = _inputs((tokens,), n_q_heads, n_k_heads, head_dim, dtype, positions)
    check_matches_reference(apply_rope, apply_rope_reference, inputs, dtype, grad_of=Q_AND_K)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_batched_matches_reference(triton_path, dtype):
    # Padded layout: q (B, S, Hq, D) with cos/sin (B, S, D), then (1, S, D) broadcast over the batch.
    q, k, cos, sin = _inputs((2, 9), 4, 2, 96, dtype)
    check_matches_reference(apply_rope, apply_rope_reference, (q, k, cos, sin), dtype, grad_of=Q_AND_K)
    check_matches_reference(apply_rope, apply_rope_reference, (q, k, cos[:1], sin[:1]), dtype, grad_of=Q_AND_K)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_non_contiguous_inputs(triton_path, dtype):
    # q and k sliced out of a fused qkv projection, as an InternLM2 wqkv produces them: strided views.
    tokens, head_dim = 17, 64
    qkv = torch.randn(tokens, 4 + 2 + 2, head_dim).to(dtype)
    q, k = qkv[:, :4], qkv[:, 4:6]
    assert not q.is_contiguous() and not k.is_contiguous()
    cos, sin = rope_cos_sin(torch.arange(tokens), head_dim, dtype=dtype)
    check_matches_reference(apply_rope, apply_rope_reference, (q, k, cos, sin), dtype, grad_of=Q_AND_K)


def test_rope_matches_transformers_llama(triton_path):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    head_dim = 64
    positions = torch.arange(17)[None]
    q = torch.randn(1, 17, 4, head_dim)
    k = torch.randn(1, 17, 2, head_dim)
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(q, positions)
    # transformers works in (B, heads, S, D); ours in (B, S, heads, D).
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), hf_cos, hf_sin)
    cos, sin = rope_cos_sin(positions, head_dim, theta=10000.0)
    out_q, out_k = apply_rope(q, k, cos, sin)
    assert_close_to_truth(out_q, hf_q.transpose(1, 2), None, torch.float32, "q")
    assert_close_to_truth(out_k, hf_k.transpose(1, 2), None, torch.float32, "k")


def test_rope_rejects_bad_shapes(triton_path):
    q, k, cos, sin = _inputs((5,), 4, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="same leading dims"):
        apply_rope(q, k[:4], cos, sin)
    with pytest.raises(ValueError, match="cos has shape"):
        apply_rope(q, k, cos[:, :32], sin)
    with pytest.raises(ValueError, match="sin has shape"):
        apply_rope(q, k, cos, sin[:4])
    with pytest.raises(ValueError, match="must be even"):
        apply_rope(q[..., :63], k[..., :63], cos[:, :63], sin[:, :63])
