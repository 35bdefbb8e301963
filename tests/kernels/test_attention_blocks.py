"""Attention kernels past their first block, and every autotune config, under the interpreter against the reference.

The kernels tile queries in blocks of BLOCK_M (128 in the default config) and keys in blocks of BLOCK_N: sequences
longer than one block run the `start_m > 0` programs, whose causal key range, LSE rows and dq rows the short shapes of
test_attention.py never reach. On a GPU every config of FWD_CONFIGS / BWD_DKDV_CONFIGS / BWD_DQ_CONFIGS /
SPLIT_CONFIGS may be picked by the autotuner; the interpreter launches only the first, so each entry is forced here in
turn (read from the kernel modules, so configs added there are checked without editing this file).

fp32, one or two heads of dim 16: the smallest problem that still crosses the block boundaries. Tolerance 1e-4 as in
test_attention.py (fp32 products, O(1) values); every mutant below is off by > 0.1.
"""
import importlib

import pytest
import torch
from attention_checks import check_against_fp32

from gmaivl_rt.kernels.attention import attention_reference

from gmaivl_rt.kernels.decode_attention import decode_attention_reference
attention_module = importlib.import_module("gmaivl_rt.kernels.attention")
decode_module = importlib.import_module("gmaivl_rt.kernels.decode_attention")

FWD_TOL = GRAD_TOL = 1e-4


def _inputs(q_shape, kv_shape):
    return [torch.randn(shape).requires_grad_() for shape in (q_shape, kv_shape, kv_shape)]


def _check(q, k, v, causal, cu_seqlens=None, max_seqlen=None, grads=True):
    out = attention_module._attention_triton(q, k, v, causal, None, cu_seqlens, max_seqlen)
    ref = attention_reference(q, k, v, causal=causal, cu_seqlens=cu_seqlens)
    torch.testing.assert_close(out, ref, atol=FWD_TOL, rtol=0, msg=lambda m: f"forward: {m}")
    if not grads:
        return
    grad_out = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    want = torch.autograd.grad(ref, (q, k, v), grad_out)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g, w, atol=GRAD_TOL, rtol=GRAD_TOL, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("seq, causal", [(129, True), (200, True), (300, True), (200, False)],
                         ids=["129-causal", "200-causal", "300-causal", "200-bidirectional"])
def test_padded_past_one_query_block(seq, causal):
    """Mutant: `hi = tl.minimum(len_k, BLOCK_M)` (start_m dropped from the causal key range in _key_range): the
    second q block then never sees keys past 128 (off by ~0.4 at S=200). Mutant: `full_hi = (tl.minimum(start_m,
    len_k) // BLOCK_N + 1) * BLOCK_N` (an unmasked block that crosses the diagonal: later rows' future keys
    leak). Both need S > 128; 129 puts a single row in the second block, 300 a third, partial block."""
    _check(*_inputs((1, seq, 1, 16), (1, seq, 1, 16)), causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_packed_sequences_longer_than_one_block(causal):
    """Packed sequences of 150 and 131 tokens (after a 3-token one): each has a second q block whose keys start at
    its own sequence start. Mutant: the LSE row written at `head * total_q + rows` (start_q dropped: the backward
    pass reads another sequence's LSE)."""
    lengths = [3, 150, 131]
    cu_seqlens = torch.tensor([0, 3, 153, 284], dtype=torch.int32)
    total = sum(lengths)
    q, k, v = _inputs((total, 2, 16), (total, 1, 16))
    _check(q, k, v, causal, cu_seqlens=cu_seqlens, max_seqlen=max(lengths))


def test_query_longer_than_keys_with_a_later_block():
    """Sq = 200 > Sk = 70 with the causal (top-left) mask: rows 70..199 see every key, including the rows of the
    second q block, whose unmasked key range must be clipped by len_k. Mutant: `full_hi = start_m // BLOCK_N *
    BLOCK_N` (the len_k clip dropped: the second block reads unmasked keys past the sequence) passes
    test_attention.py and fails here."""
    q = torch.randn(1, 200, 2, 16, requires_grad=True)
    k, v = (torch.randn(1, 70, 1, 16, requires_grad=True) for _ in range(2))
    _check(q, k, v, True)


def _force(module, chosen: dict, monkeypatch):
    """Make the module's interpreter launcher use `chosen[list_name]` for each kernel whose config list is named
    there; return a list that records every config the launcher picked (so a test can prove the forced ones ran)."""
    by_list = {id(getattr(module, name)): config for name, config in chosen.items()}
    real_pick = module.pick_config
    picked = []

    def pick(candidates, default_index=0):
        chosen_config = by_list.get(id(candidates)) or real_pick(candidates, default_index)
        picked.append(chosen_config)
        return chosen_config

    monkeypatch.setattr(module, "pick_config", pick)
    return picked


ATTENTION_CONFIGS = [(name, cfg) for name in ("FWD_CONFIGS", "BWD_DKDV_CONFIGS", "BWD_DQ_CONFIGS")
                     for cfg in getattr(attention_module, name)]


@pytest.mark.parametrize("list_name, config", ATTENTION_CONFIGS, ids=lambda x: str(x).replace(" ", "_"))
def test_every_attention_config(list_name, config, monkeypatch):
    """Each autotune config against the reference, causal, at 136 tokens (past every BLOCK_M and BLOCK_N in the
    lists, ending mid-block), with a GQA group of 2. A config whose block sizes break the kernel (e.g. a BLOCK_N that the dk/dv kernel's
    causal start `start_n // BLOCK_M * BLOCK_M` rounds wrongly for) fails only here."""
    picked = _force(attention_module, {list_name: config}, monkeypatch)
    _check(*_inputs((1, 136, 2, 16), (1, 136, 1, 16)), True, grads=list_name != "FWD_CONFIGS")
    assert config in picked


ATTENTION_LISTS = ("FWD_CONFIGS", "BWD_DKDV_CONFIGS", "BWD_DQ_CONFIGS")


@pytest.mark.parametrize("index", range(max(len(getattr(attention_module, name)) for name in ATTENTION_LISTS)))
def test_every_attention_config_fp16_bidirectional(index, monkeypatch):
    """test_every_attention_config runs each config fp32 and causal; here each runs fp16 and bidirectional (so every
    entry, the arch- and head-dim-filtered tiles included, meets both dtypes and both masks), again at 136 tokens
    with a GQA group of 2. The index-th config of every list runs in one forward + backward (a shorter list wraps
    around) to keep the interpreter time down. Tolerances: the fp16 ones of attention_checks.TOL (fp32 reference on
    the same fp16 values). Mutant: `_key_visible`'s bidirectional bound `len_k - 1` -> `len_k` (one padding key, loaded
    as 0, joins every softmax) fails every index."""
    chosen = {name: getattr(attention_module, name)[index % len(getattr(attention_module, name))]
              for name in ATTENTION_LISTS}
    picked = _force(attention_module, chosen, monkeypatch)
    q = torch.randn(1, 136, 2, 16).half().requires_grad_()
    k, v = (torch.randn(1, 136, 1, 16).half().requires_grad_() for _ in range(2))
    check_against_fp32(q, k, v, False)
    assert set(chosen.values()) <= set(picked)


@pytest.mark.parametrize("config", decode_module.SPLIT_CONFIGS, ids=lambda c: str(c).replace(" ", ""))
def test_every_decode_config(config, monkeypatch):
    """Each decode split config at cache lengths that cross several BLOCK_N blocks inside a split (300 tokens in two
    splits) and end mid-block (173), against the masked SDPA reference."""
    picked = _force(decode_module, {"SPLIT_CONFIGS": config}, monkeypatch)
    q = torch.randn(2, 4, 16)
    k_cache, v_cache = torch.randn(2, 300, 2, 16), torch.randn(2, 300, 2, 16)
    cache_seqlens = torch.tensor([300, 173], dtype=torch.int32)
    out = decode_module._decode_attention_triton(q, k_cache, v_cache, cache_seqlens, None, 2)
    torch.testing.assert_close(out, decode_attention_reference(q, k_cache, v_cache, cache_seqlens), atol=1e-5,
                               rtol=0)
    assert picked == [config]
