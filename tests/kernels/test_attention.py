"""Triton attention (interpreted on CPU) against torch SDPA and autograd: forward and gradients (the check:
tests/support/attention_checks.py).

Tolerances (max abs error vs an fp32 SDPA reference on the same, upcast, inputs; values and gradients are O(1)):
  fp32: 1e-4 forward and gradients
  fp16: 2e-3 forward, 1e-2 gradients (fp16 operands of the tensor-core products, fp32 accumulation)
  bf16: 2e-2 forward, 5e-2 gradients (8-bit mantissa; the interpreter upcasts bf16, see the kernel's UPCAST)
"""
import importlib

import pytest
import torch
from attention_checks import check_against_fp32

from gmaivl_rt.kernels._dispatch import kernels
from gmaivl_rt.kernels.attention import attention, attention_reference


def _inputs(q_shape, kv_shape, dtype):
    q, k, v = torch.randn(q_shape), torch.randn(kv_shape), torch.randn(kv_shape)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


# (batch, seq, q_heads, kv_heads, head_dim): seq 1, 17, 127 and others not a multiple of any block; MHA, GQA, MQA;
# head dims 80 and 96 exercise the masked (non power of two) head dimension; 64 and 128 are the models' own.
PADDED_SHAPES = [(1, 1, 2, 2, 16), (2, 17, 4, 2, 32), (1, 127, 2, 1, 80), (1, 70, 4, 4, 64), (1, 33, 4, 2, 96),
                 (1, 45, 2, 1, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("shape", PADDED_SHAPES, ids=lambda s: "B{}_S{}_Hq{}_Hkv{}_D{}".format(*s))
def test_padded_forward_backward(shape, causal, dtype):
    batch, seq, hq, hkv, d = shape
    check_against_fp32(*_inputs((batch, seq, hq, d), (batch, seq, hkv, d), dtype), causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_packed_unequal_lengths(causal, dtype):
    lengths = [1, 17, 40]  # block-diagonal: no token may see another sequence's keys
    cu_seqlens = torch.tensor([0, 1, 18, 58], dtype=torch.int32)
    total = sum(lengths)
    q, k, v = _inputs((total, 4, 32), (total, 2, 32), dtype)
    check_against_fp32(q, k, v, causal, cu_seqlens=cu_seqlens, max_seqlen=max(lengths))


@pytest.mark.parametrize("group, dtype, causal", [
    (1, torch.float16, False), (2, torch.float32, False), (4, torch.float32, True), (4, torch.float16, False),
], ids=["g1-fp16-bidirectional", "g2-fp32-bidirectional", "g4-fp32-causal", "g4-fp16-bidirectional"])
def test_gqa_groups_dk_dv_summed_over_their_q_heads(group, dtype, causal):
    """dk/dv run one program per q head, each writing its own slot; a GQA group's slots are summed afterwards
    (FlashAttention-2's layout). Packed lengths 1, 17 and 70 (awkward) with 4 q heads over 4 / group kv heads (the
    padded shapes above cover groups 1 and 2 in both dtypes and masks; group 4 is the LM's). Mutants: the group sum
    replaced by the first q head's slot (`.sum(2)` -> `[:, :, 0]`) fails groups 2 and 4 (dk, dv off by O(1)); the
    kernel's slot at `kv_head` instead of `head` (group members overwrite each other) fails them too."""
    cu_seqlens = torch.tensor([0, 1, 18, 88], dtype=torch.int32)
    q, k, v = _inputs((88, 4, 16), (88, 4 // group, 16), dtype)
    check_against_fp32(q, k, v, causal, cu_seqlens=cu_seqlens, max_seqlen=70)


def test_packed_max_seqlen_inferred_and_empty_sequence():
    cu_seqlens = torch.tensor([0, 5, 5, 38], dtype=torch.int32)  # the middle sequence is empty
    q, k, v = _inputs((38, 2, 16), (38, 1, 16), torch.float32)
    check_against_fp32(q, k, v, True, cu_seqlens=cu_seqlens, max_seqlen=None)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_bf16(causal):
    check_against_fp32(*_inputs((1, 45, 4, 64), (1, 45, 2, 64), torch.bfloat16), causal)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_padded_query_and_key_lengths_differ(causal):
    # SDPA's is_causal with Sq != Sk masks top-left (key j visible to query i iff j <= i); the kernel does the same
    q = torch.randn(2, 9, 2, 16, requires_grad=True)
    check_against_fp32(q, *_inputs((2, 23, 2, 16), (2, 23, 2, 16), torch.float32)[1:], causal)


def test_softmax_scale():
    check_against_fp32(*_inputs((1, 33, 2, 32), (1, 33, 2, 32), torch.float32), True, softmax_scale=0.3)


def test_strided_and_misaligned_inputs():
    # q/k/v as views into one fused projection output, and a view whose start is not 16-byte aligned:
    # the launcher must copy into aligned contiguous buffers rather than mis-read them.
    batch, seq, heads, d = 2, 19, 2, 32
    fused = torch.randn(batch, seq, 3, heads, d)
    q, k, v = (fused[:, :, i].requires_grad_() for i in range(3))
    check_against_fp32(q, k, v, True)
    flat = torch.randn(1 + batch * seq * heads * d)
    odd = flat[1:].view(batch, seq, heads, d).requires_grad_()
    assert odd.data_ptr() % 16 != 0
    check_against_fp32(odd, *_inputs((batch, seq, heads, d), (batch, seq, heads, d), torch.float32)[1:], False)


def test_public_entry_point_dispatches_to_triton(triton_path, monkeypatch):
    module = importlib.import_module("gmaivl_rt.kernels.attention")  # the package's `attention` is the function

    calls = []
    real = module._attention_triton
    monkeypatch.setattr(module, "_attention_triton", lambda *a: calls.append(1) or real(*a))
    q, k, v = _inputs((1, 20, 4, 32), (1, 20, 2, 32), torch.float32)
    out = attention(q, k, v, causal=True)
    assert calls == [1]
    torch.testing.assert_close(out, attention_reference(q, k, v, causal=True), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kwargs, q_shape, k_shape, v_shape, match", [
    ({}, (2, 4, 16), (2, 4, 16), (2, 4, 16), "expected \\(batch, seq, heads, head_dim\\)"),
    ({}, (1, 4, 2, 16), (1, 4, 2, 16), (1, 4, 1, 16), "differ"),
    ({}, (1, 4, 3, 16), (1, 4, 2, 16), (1, 4, 2, 16), "kv heads must divide q heads"),
    ({}, (1, 4, 2, 16), (1, 4, 2, 8), (1, 4, 2, 8), "head dims must match"),
    ({"cu_seqlens": torch.tensor([0, 4])}, (4, 2, 16), (4, 2, 16), (4, 2, 16), "int32"),
    ({"cu_seqlens": torch.tensor([0, 4], dtype=torch.int32)}, (4, 2, 16), (3, 2, 16), (3, 2, 16), "tokens"),
    ({"cu_seqlens": torch.tensor([0, 3, 6], dtype=torch.int32)}, (4, 2, 16), (4, 2, 16), (4, 2, 16), "at most"),
    ({"cu_seqlens": torch.tensor([0, 3, 2], dtype=torch.int32)}, (4, 2, 16), (4, 2, 16), (4, 2, 16), "decrease"),
])
def test_attention_shape_errors(triton_path, kwargs, q_shape, k_shape, v_shape, match):
    with pytest.raises(ValueError, match=match):
        attention(torch.randn(q_shape), torch.randn(k_shape), torch.randn(v_shape), **kwargs)


def test_attention_mixed_dtypes_error(triton_path):
    q, k, v = torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16).half(), torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="dtypes differ"):
        attention(q, k, v)


def _nan_filled_empty_like(monkeypatch):
    """torch.empty_like returns NaN-filled memory for float tensors, so an output a kernel never writes shows."""
    real = torch.empty_like

    def empty_like(t, *args, **kwargs):
        out = real(t, *args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty_like", empty_like)


@pytest.mark.parametrize("causal", [False, True])
def test_rows_past_the_last_sequence_are_zero_on_both_paths(monkeypatch, causal):
    """cu_seqlens ends at 7 of 11 tokens: output rows 7.. and their dq/dk/dv rows are 0 (as autograd gives for
    rows the reference never reads), not whatever the allocator returned (the Triton backward used to leave them
    uninitialised)."""
    _nan_filled_empty_like(monkeypatch)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    q, k, v = torch.randn(11, 4, 16), torch.randn(11, 2, 16), torch.randn(11, 2, 16)
    grad = torch.randn(11, 4, 16)
    results = {}
    for name, fn in (("triton", attention), ("torch", attention_reference)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with kernels("triton" if name == "triton" else "torch"):
            out = fn(*leaves, causal=causal, cu_seqlens=cu)
            out.backward(grad)
        results[name] = [out.detach()] + [t.grad for t in leaves]
    for name, tensors in results.items():
        for label, t in zip(("out", "dq", "dk", "dv"), tensors):
            assert torch.equal(t[7:], torch.zeros_like(t[7:])), f"{name} {label} rows past cu_seqlens[-1]"
    for label, a, b in zip(("out", "dq", "dk", "dv"), results["triton"], results["torch"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=label)


def test_attention_grid_holds_thousands_of_sequences(monkeypatch):
    """2048 sequences x 32 heads = 65536 (sequence, head) programs: more than grid axis 1 or 2 may hold (65535),
    so they must sit on axis 0. Records every grid the packed forward and backward launch with."""
    attention_module = importlib.import_module("gmaivl_rt.kernels.attention")  # the package exports a function too

    grids = []

    def record(kernel, configs, grid_of, device_tensor, *args, **constexprs):
        bm, bn = configs[0][:2]
        grids.append(grid_of(bm, bn))

    monkeypatch.setattr(attention_module, "_launch", record)
    cu = torch.tensor([0] + [4] * 2048, dtype=torch.int32)  # one 4-token sequence, 2047 empty ones
    q = torch.randn(4, 32, 16, requires_grad=True)
    with kernels("triton"):
        attention(q, q[:, :8].detach(), q[:, :8].detach(), cu_seqlens=cu, max_seqlen=4).sum().backward()
    assert len(grids) == 3  # forward, dk/dv, dq
    for grid in grids:
        assert all(size <= limit for size, limit in zip(grid, attention_module.GRID_LIMITS)), grid
        assert max(grid[1:], default=1) <= 65535, grid
