"""Fixes from the GPU review of kernels/ (issue 13), each checked on CPU: the Triton kernels run interpreted.

- decode under autocast with fp32 weights: the KV cache holds the activation dtype, Triton and PyTorch agree;
- packed attention with cu_seqlens[-1] < T: rows past the last sequence are 0 in the output and in every gradient,
  on both paths (the Triton backward used to leave them uninitialised);
- decode splits each sequence's own length (no empty split programs) and grids stay within CUDA's limits;
- fp16 loss gradients are scaled in fp32 (1/n_valid applied before the fp16 cast underflowed).
"""
import importlib

import pytest
import torch

from gmaivl_rt import GMAIVL, GMAIVLConfig
from gmaivl_rt.kernels.attention import attention, attention_reference
from gmaivl_rt.kernels._dispatch import kernels


def _nan_filled_empty_like(monkeypatch):
    """torch.empty_like returns NaN-filled memory for float tensors, so an output a kernel never writes shows."""
    real = torch.empty_like

    def empty_like(t, *args, **kwargs):
        out = real(t, *args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty_like", empty_like)


# ---------------------------------------------------------------------------------------------------- bug 1
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return GMAIVL(GMAIVLConfig.preset("tiny")).eval()


def test_cache_takes_the_activation_dtype_under_autocast(tiny_model):
    assert tiny_model.new_cache(1, 4).keys[0].dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tiny_model.new_cache(1, 4).keys[0].dtype == torch.bfloat16


def test_decode_under_autocast_with_fp32_weights(tiny_model):
    """fp32 weights, bf16 autocast: q comes out of the projections in bf16; the Triton decode kernel used to refuse
    the fp32 cache. Both paths now decode, and greedily pick the same tokens."""
    cfg = tiny_model.config
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20]])
    outs = {}
    for mode in ("torch", "triton"):
        with kernels(mode), torch.autocast("cpu", dtype=torch.bfloat16):
            outs[mode] = tiny_model.generate(ids, max_new_tokens=3, eos_token_id=cfg.text.vocab_size + 1)
    assert outs["triton"].shape == (2, 11)
    assert torch.equal(outs["triton"], outs["torch"])


# ---------------------------------------------------------------------------------------------------- bug 2
@pytest.mark.parametrize("causal", [False, True])
def test_rows_past_the_last_sequence_are_zero_on_both_paths(monkeypatch, causal):
    """cu_seqlens ends at 7 of 11 tokens: output rows 7.. and their dq/dk/dv rows are 0 (as autograd gives for
    rows the reference never reads), not whatever the allocator returned."""
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


def test_decode_attention_op_under_autocast_takes_mixed_dtypes_on_both_paths():
    """A caller's own fp32 cache with a bf16 q under autocast: both paths compute as SDPA under autocast does."""
    from gmaivl_rt.kernels.decode_attention import decode_attention

    q = torch.randn(2, 4, 16).bfloat16()
    k_cache, v_cache = torch.randn(2, 20, 2, 16), torch.randn(2, 20, 2, 16)
    seqlens = torch.tensor([5, 20], dtype=torch.int32)
    outs = {}
    for mode in ("torch", "triton"):
        with kernels(mode), torch.autocast("cpu", dtype=torch.bfloat16):
            outs[mode] = decode_attention(q, k_cache, v_cache, seqlens)
    assert outs["triton"].dtype == outs["torch"].dtype == torch.bfloat16
    torch.testing.assert_close(outs["triton"].float(), outs["torch"].float(), atol=2e-2, rtol=0)


# ---------------------------------------------------------------------------------------------------- items 8, 9
def test_decode_splits_each_sequence_not_the_cache(monkeypatch):
    """A long cache (max_new_tokens sized) holding short sequences: every split program gets keys of its own
    sequence (partial sum > 0) instead of the later splits falling past the sequence and idling. The partial sums
    are read where the reduce kernel receives them."""
    from gmaivl_rt.kernels.decode_attention import decode_attention_reference

    dec = importlib.import_module("gmaivl_rt.kernels.decode_attention")
    real_reduce, seen = dec._decode_reduce_kernel, []

    class Recording:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: (seen.append(args[1].clone()), real_reduce[grid](*args, **kwargs))

    monkeypatch.setattr(dec, "_decode_reduce_kernel", Recording())
    block_n, splits = dec.SPLIT_CONFIGS[0][0], 4
    q, k_cache, v_cache = torch.randn(2, 4, 16), torch.randn(2, 1024, 2, 16), torch.randn(2, 1024, 2, 16)
    seqlens = torch.tensor([splits * block_n, splits * block_n + 5], dtype=torch.int32)
    out = dec._decode_attention_triton(q, k_cache, v_cache, seqlens, None, splits)
    (part_l,) = seen
    assert part_l.shape == (2, 4, splits)
    assert bool((part_l > 0).all()), part_l
    torch.testing.assert_close(out, decode_attention_reference(q, k_cache, v_cache, seqlens), atol=1e-5, rtol=0)


def test_attention_grid_holds_thousands_of_sequences(monkeypatch):
    """2048 sequences x 32 heads = 65536 (sequence, head) programs: more than grid axis 1 or 2 may hold (65535),
    so they must sit on axis 0. Records every grid the packed forward and backward launch with."""
    import importlib

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


# ---------------------------------------------------------------------------------------------------- item 6
@pytest.mark.parametrize("mode", ["triton", "torch"])
def test_fp16_loss_gradient_does_not_underflow(mode):
    """fp16, one logit 12 above the rest: every other softmax entry is ~6e-6, and times 1/n_valid (256 tokens) ~2e-8,
    below half of fp16's smallest subnormal (6e-8). Scaling before the fp16 cast flushed those entries, zeroing the
    grad_weight rows of every token that is neither the label nor the favourite (~6e-6 each, representable in
    fp16). Both paths now scale in fp32 after the GEMMs; checked against fp32 autograd on the same fp16 values."""
    from gmaivl_rt.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference

    n, h, v = 256, 16, 256
    hidden = (1.0 + 0.1 * torch.randn(n, h)).half()
    weight = 0.01 * torch.randn(v, h)
    weight[0] = 12.0 / h  # logit 0 ~ 12, the others ~ 0
    weight = weight.half()
    labels = torch.randint(1, 8, (n,))
    hid, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with kernels(mode):
        fused_linear_cross_entropy(hid, w, labels).backward()
    hid_ref, w_ref = hidden.float().requires_grad_(), weight.float().requires_grad_()
    fused_linear_cross_entropy_reference(hid_ref, w_ref, labels).backward()
    for name, got, ref in (("grad_weight", w.grad, w_ref.grad), ("grad_hidden", hid.grad, hid_ref.grad)):
        err = (got.float() - ref).abs().max() / ref.abs().max()
        assert err < 1e-2, f"{name}: max error {err:.3g} of the largest gradient"
    rest, rest_ref = w.grad[8:].float(), w_ref.grad[8:]  # rows of tokens never the label nor the favourite
    assert float(rest_ref.abs().min()) > 1e-6
    torch.testing.assert_close(rest, rest_ref, rtol=5e-2, atol=float(rest_ref.abs().max()) * 2e-2)


# ---------------------------------------------------------------------------------------------------- item 3
def test_gemm_autotune_keys_on_bucketed_sizes():
    """Pack lengths 1100 and 2048 share one autotune entry; the raw M and K are not in the key."""
    from gmaivl_rt.kernels import projector

    assert projector.tune_bucket(1100) == projector.tune_bucket(2048) == 2048
    assert projector.tune_bucket(1) == 16 and projector.tune_bucket(2049) == 4096
    assert "M" not in projector.TUNE_KEY and "K" not in projector.TUNE_KEY
    assert {"M_BUCKET", "K_BUCKET"} <= set(projector.TUNE_KEY) <= set(projector._matmul_kernel.arg_names) | {
        "ACCUMULATE"}


# ---------------------------------------------------------------------------------------------------- item 11
def test_report_specs_name_the_stages_and_warps_launches_use(monkeypatch):
    """Every kernel launched by the ops (interpreted here) is declared in its module's report_specs() with the
    num_stages it is launched with (a launch that names none gets triton's CUDA default, 3): the report compiles
    what runs. Row kernels were declared with 1-2 stages while launched with 3."""
    import importlib

    from triton.runtime.interpreter import InterpretedFunction

    from gmaivl_rt.kernels import _spec, report
    from gmaivl_rt.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
    from gmaivl_rt.kernels.projector import fused_linear
    from gmaivl_rt.kernels.rope import apply_rope
    from gmaivl_rt.kernels.decode_attention import decode_attention
    from gmaivl_rt.kernels.layer_norm import layer_norm
    from gmaivl_rt.kernels.rms_norm import rms_norm
    from gmaivl_rt.kernels.swiglu import swiglu

    launched = {}
    real_run = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        launched[self] = kwargs.get("num_stages", _spec.LAUNCH_NUM_STAGES)
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    x = torch.randn(3, 32, requires_grad=True)
    w = torch.ones(32, requires_grad=True)
    with kernels("triton"):
        rms_norm(x, w, 1e-5).sum().backward()
        layer_norm(x, w, w, 1e-5).sum().backward()
        swiglu(x, x).sum().backward()
        fused_linear(x, torch.randn(16, 32, requires_grad=True), None, "gelu").sum().backward()
        fused_linear_cross_entropy(x, torch.randn(40, 32, requires_grad=True), torch.tensor([1, 2, 3])).backward()
        q = torch.randn(1, 5, 2, 16, requires_grad=True)
        attention(q, q, q, causal=True).sum().backward()
        cos, sin = torch.ones(5, 16), torch.zeros(5, 16)
        apply_rope(q[0], q[0], cos, sin)[0].sum().backward()
        decode_attention(q[:, 0], q, q, torch.tensor([5], dtype=torch.int32))
    declared = {}
    for module in report.KERNEL_MODULES:
        for spec in importlib.import_module(f"gmaivl_rt.kernels.{module}").report_specs():
            declared.setdefault(spec.fn, set()).add(spec.num_stages)
    assert len(launched) >= 12
    for fn, stages in launched.items():
        assert fn in declared, f"{fn.__name__} launches but no report spec declares it"
        assert stages in declared[fn], f"{fn.__name__} launches with num_stages={stages}, specs say {declared[fn]}"


# ---------------------------------------------------------------------------------------------------- item 4
def test_cuda_loss_chunk_comes_from_a_memory_budget():
    """The trainer's pack (2048 tokens, V=92544) is one chunk on CUDA with the default 2 GiB budget; a tight budget
    still keeps 1024-row chunks; CPU keeps Liger's rule."""
    flce = importlib.import_module("gmaivl_rt.kernels.fused_linear_cross_entropy")

    assert flce.chunk_rows(2048, 92544, 4096, budget_bytes=flce.CUDA_LOGITS_BUDGET_BYTES) == 2048
    assert flce.chunk_rows(8192, 92544, 4096, budget_bytes=flce.CUDA_LOGITS_BUDGET_BYTES) == 5760
    assert flce.chunk_rows(8192, 92544, 4096, budget_bytes=100 << 20) == 1024
    assert flce.chunk_rows(8192, 92544, 4096) == 512


@pytest.mark.parametrize("mode", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_chunk_writes_grad_weight_directly(mode, dtype):
    """One chunk (no fp32 dW accumulator, the GEMM stores dW in the weight's dtype) and several chunks agree with
    autograd through the materialised logits."""
    from gmaivl_rt.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference

    hidden, weight = torch.randn(37, 16).to(dtype), (torch.randn(50, 16) / 4).to(dtype)
    labels = torch.randint(0, 50, (37,))
    labels[::5] = -100
    ref_h, ref_w = hidden.float().clone().requires_grad_(), weight.float().clone().requires_grad_()
    fused_linear_cross_entropy_reference(ref_h, ref_w, labels).backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for chunk in (37, 16):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with kernels(mode):
            fused_linear_cross_entropy(h, w, labels, chunk_size=chunk).backward()
        assert w.grad.dtype == dtype
        torch.testing.assert_close(w.grad.float(), ref_w.grad, atol=tol, rtol=tol)
        torch.testing.assert_close(h.grad.float(), ref_h.grad, atol=tol, rtol=tol)
