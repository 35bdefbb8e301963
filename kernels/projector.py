"""Projector GEMMs: linear with bias and GELU fused in the epilogue; the `mlp2x_gelu` projector.

One tiled Triton GEMM (`matmul`) serves every product here, forward and backward, and also the chunk GEMMs of
the fused linear cross-entropy: it reads A (M, K) and B (K, N) through arbitrary strides, so a transposed operand
is just swapped strides and never a copy. Its epilogue optionally adds a bias, stores the pre-activation for the
backward pass, applies the exact (erf) GELU and accumulates into the output.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import config_forced, interpreting, pick_config, use_triton
from ._spec import KernelSpec, Roofline

_INT32_LIMIT = 2**31                 # offsets are computed in int32

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). The first is the default (interpreter / no
# autotuning). Chosen from sm_80 and sm_90 compiles with bf16 operands: no spills, shared memory within 163 KB, mma
# on sm_80 and wgmma on sm_90 (a 128x128 tile needs 8 warps on sm_90 or it spills).
GEMM_CONFIGS = [
    (128, 128, 64, 8, 8, 3),
    (128, 128, 64, 8, 8, 4),
    (64, 128, 64, 8, 4, 4),
    (128, 64, 64, 8, 4, 4),
    (64, 64, 64, 8, 4, 4),
]
GELU_BWD_BLOCK = 1024


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, pre_ptr,
    M, N, K, M_BUCKET, K_BUCKET, alpha,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, APPLY_GELU: tl.constexpr, STORE_PRE: tl.constexpr, ACCUMULATE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C = epilogue(alpha * (A @ B)). A tiles are cast to B's dtype before tl.dot (tensor-core operands must match),
    so an fp32 A (the cross-entropy's logit gradients) meets 16-bit weights directly. fp32 accumulation throughout;
    alpha is applied to the fp32 accumulator (a tiny scale such as 1/n_tokens would underflow an fp16 operand).
    M_BUCKET, K_BUCKET: unused here; the autotuner keys on them (see `tune_bucket`)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped launch order: GROUP_M consecutive row blocks sweep the column blocks together, so B tiles are
    # reused from L2 instead of re-read from HBM.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge wrap around (modulo) instead of being masked: the loads stay unmasked in M and N
    # and the wrapped results are dropped by the masked store.
    a_rows = offs_m % M
    b_cols = offs_n % N
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + b_cols[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a.to(b.dtype), b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    acc = acc * alpha
    if HAS_BIAS:
        acc += tl.load(bias_ptr + b_cols).to(tl.float32)[None, :]
    c_offsets = offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if STORE_PRE:  # the GELU input, kept for the backward pass
        tl.store(pre_ptr + c_offsets, acc.to(pre_ptr.dtype.element_ty), mask=c_mask)
    if APPLY_GELU:
        acc = _gelu(acc)
    if ACCUMULATE:
        acc += tl.load(c_ptr + c_offsets, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptr + c_offsets, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _gelu_backward_kernel(grad_ptr, pre_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    """out = grad * gelu'(pre), gelu'(z) = Phi(z) + z * phi(z) (exact erf form), computed in fp32."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
    pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
    tl.store(out_ptr + offs, (grad * (cdf + z * pdf)).to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _triton_config(cfg):
    block_m, block_n, block_k, group_m, warps, stages = cfg
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m},
                         num_warps=warps, num_stages=stages)


# The autotuner keys on sizes bucketed to powers of two, not on M and K themselves: every new pack length would
# otherwise re-benchmark all configs (~0.7 s, stalling the other DDP ranks). N (a model width) is fixed per call site.
TUNE_KEY = ["M_BUCKET", "N", "K_BUCKET", "stride_ak", "stride_bk"]


def tune_bucket(size: int) -> int:
    """The autotuning bucket of a GEMM size: the next power of two (at least 16)."""
    return max(16, triton.next_power_of_2(int(size)))


@functools.lru_cache(maxsize=2)
def _autotuned_matmul(accumulate: bool):
    # Built on first GPU use only: autotuning needs a driver, which the interpreter does not have. An accumulating
    # launch reads its output, so only that one restores it between trials (a clone of e.g. the 1.5 GB fp32 dW).
    return triton.autotune(configs=[_triton_config(c) for c in GEMM_CONFIGS], key=TUNE_KEY,
                           restore_value=["c_ptr"] if accumulate else None)(_matmul_kernel)


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 operands follow torch's own matmul setting (TF32 off by default); 16-bit operands ignore it.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def matmul(a, b, out=None, *, bias=None, gelu=False, pre=None, accumulate=False, alpha=1.0):
    """out = [gelu](alpha * (a @ b) + bias), or out += alpha * (a @ b) with `accumulate`.

    a: (M, K), b: (K, N), any strides (pass `w.t()` for a transposed operand: no copy). a is cast to b's dtype
    tile by tile. out: (M, N), any strides; allocated in b's dtype when None. bias: (N,) or None. pre: (M, N) tensor
    with out's strides that receives the pre-activation (only with `gelu`). alpha: a float applied in fp32 to the
    accumulator. fp32 accumulation. Returns out.
    """
    M, K = a.shape
    K_b, N = b.shape
    if K != K_b:
        raise ValueError(f"matmul: a is {tuple(a.shape)} and b is {tuple(b.shape)}; inner dimensions differ")
    if out is None:
        out = torch.empty((M, N), device=a.device, dtype=b.dtype)
    if out.shape != (M, N):
        raise ValueError(f"matmul: out has shape {tuple(out.shape)}, expected {(M, N)}")
    if pre is not None and (pre.shape != out.shape or pre.stride() != out.stride()):
        raise ValueError("matmul: pre must have out's shape and strides")
    for name, t in (("a", a), ("b", b), ("out", out)):
        if t.numel() >= _INT32_LIMIT:
            raise ValueError(f"matmul: {name} has {t.numel()} elements; offsets are int32 (limit 2**31)")
    if M == 0 or N == 0:
        return out
    if K == 0:  # empty reduction: the epilogue alone
        z = torch.zeros((M, N), device=a.device, dtype=torch.float32)  # alpha * 0 = 0
        z = z + bias.float() if bias is not None else z
        if pre is not None:
            pre.copy_(z)
        z = F.gelu(z) if gelu else z
        return out.add_(z) if accumulate else out.copy_(z)

    args = (a, b, out, bias if bias is not None else out, pre if pre is not None else out, M, N, K,
            tune_bucket(M), tune_bucket(K), float(alpha), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            out.stride(0), out.stride(1))
    flags = dict(HAS_BIAS=bias is not None, APPLY_GELU=gelu, STORE_PRE=pre is not None, ACCUMULATE=accumulate,
                 INPUT_PRECISION=_input_precision(b.dtype))

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    if a.is_cuda and not interpreting() and not config_forced(GEMM_CONFIGS):
        _autotuned_matmul(accumulate)[grid](*args, **flags)
    else:
        block_m, block_n, block_k, group_m, warps, stages = pick_config(GEMM_CONFIGS)
        _matmul_kernel[grid](*args, **flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
                             num_warps=warps, num_stages=stages)
    return out


def gelu_backward(grad, pre):
    """grad * gelu'(pre), elementwise (exact erf GELU). grad, pre: same shape; returns grad's dtype."""
    grad = grad.contiguous()
    pre = pre.contiguous()
    out = torch.empty_like(grad)
    n = grad.numel()
    if n:
        _gelu_backward_kernel[(triton.cdiv(n, GELU_BWD_BLOCK),)](grad, pre, out, n, BLOCK=GELU_BWD_BLOCK,
                                                                 num_warps=4)
    return out


def autocast_operands(*tensors):
    """The operands as F.linear sees them under torch.autocast: floating tensors cast (differentiably) to the
    autocast dtype; unchanged when autocast is off. Our autograd Functions then run with autocast disabled."""
    device_type = next(t for t in tensors if t is not None).device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias, apply_gelu, grad_enabled):
        # Keep the pre-activation only when a backward pass will need GELU's derivative (needs_input_grad alone
        # stays True under torch.no_grad, hence grad_enabled from the caller).
        keep_pre = apply_gelu and grad_enabled and any(ctx.needs_input_grad[:3])
        y = torch.empty((x2d.shape[0], weight.shape[0]), device=x2d.device, dtype=x2d.dtype)
        pre = torch.empty_like(y) if keep_pre else None
        matmul(x2d, weight.t(), y, bias=bias, gelu=apply_gelu, pre=pre)
        ctx.save_for_backward(x2d, weight, pre)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x2d, weight, pre = ctx.saved_tensors
        grad_z = gelu_backward(grad_y, pre) if pre is not None else grad_y
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = matmul(grad_z, weight, torch.empty_like(x2d))          # (M, N) @ (N, K)
        if ctx.needs_input_grad[1]:
            grad_w = matmul(grad_z.t(), x2d, torch.empty_like(weight))      # (N, M) @ (M, K)
        if ctx.needs_input_grad[2]:
            grad_b = grad_z.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
def fused_linear(x, weight, bias=None, activation=None):
    """y = act(x @ weight.T + bias). x: (..., K); weight: (N, K); bias: (N,) or None;
    activation: None or "gelu" (exact, erf). Returns (..., N) in x's dtype.
    x and weight share one dtype (fp32, fp16 or bf16); bias may be any float dtype."""
    if activation not in (None, "gelu"):
        raise ValueError(f"fused_linear: activation {activation!r} is not None or 'gelu'")
    if use_triton(x, weight, gemm=True):
        return _fused_linear_triton(x, weight, bias, activation)
    return fused_linear_reference(x, weight, bias, activation)


def fused_linear_reference(x, weight, bias=None, activation=None):
    y = F.linear(x, weight, bias)
    return F.gelu(y) if activation == "gelu" else y


def mlp2x_gelu(x, w1, b1, w2, b2):
    """LLaVA's projector: Linear -> GELU -> Linear. x: (..., C_vision) -> (..., C_text)."""
    return fused_linear(fused_linear(x, w1, b1, "gelu"), w2, b2)


def _fused_linear_triton(x, weight, bias, activation):
    x, weight, bias = autocast_operands(x, weight, bias)
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fused_linear: x {tuple(x.shape)} does not match weight {tuple(weight.shape)} "
                         "(expected x (..., K), weight (N, K))")
    if x.dtype != weight.dtype:
        raise TypeError(f"fused_linear: x is {x.dtype} but weight is {weight.dtype}; cast one of them")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"fused_linear: bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    x2d = x.reshape(-1, x.shape[-1])
    with torch.autocast(x.device.type, enabled=False):
        y = _FusedLinear.apply(x2d, weight, bias, activation == "gelu", torch.is_grad_enabled())
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# GPU readiness report
# ----------------------------------------------------------------------------------------------------------------
# Unit strides per operand layout: a launch specializes a stride of 1 into a constant, and so does the report.
_UNIT_STRIDES = {
    "nt": ("stride_ak", "stride_bk", "stride_cn"),   # x @ W.T (forward, CE logits)
    "nn": ("stride_ak", "stride_bn", "stride_cn"),   # dZ @ W (dX, CE grad_hidden)
    "tn": ("stride_am", "stride_bn", "stride_cn"),   # dZ.T @ X (dW, CE grad_weight)
}
_MATMUL_INTS = ("M", "N", "K", "M_BUCKET", "K_BUCKET", "stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm",
                "stride_cn")
_MATMUL_FLAGS = ("HAS_BIAS", "APPLY_GELU", "STORE_PRE", "ACCUMULATE", "INPUT_PRECISION", "BLOCK_M", "BLOCK_N",
                 "BLOCK_K", "GROUP_M")


def matmul_specs(kernel: str, roofline: Roofline, *, layout: str, a: str = "*bf16", b: str = "*bf16",
                 c: str = "*bf16", **flags) -> list[KernelSpec]:
    """One KernelSpec of `_matmul_kernel` per autotune config (the first is the default), compiled as a launch at a
    shape whose sizes and strides are multiples of 16 sees it: unit strides constant, the other integer arguments
    and every pointer 16-divisible (`extra["attrs"]`, Triton's `tt.divisibility` specialization, for ASTSource)."""
    signature = {"a_ptr": a, "b_ptr": b, "c_ptr": c, "bias_ptr": c, "pre_ptr": c, **dict.fromkeys(_MATMUL_INTS, "i32"),
                 "alpha": "fp32", **dict.fromkeys(_MATMUL_FLAGS, "constexpr")}
    unit = _UNIT_STRIDES[layout]
    signature.update(dict.fromkeys(unit, "constexpr"))
    divisible = [name for name, ty in signature.items() if ty not in ("constexpr", "fp32")]
    attrs = {(_matmul_kernel.arg_names.index(name),): (("tt.divisibility", 16),) for name in divisible}
    flags = dict(dict(HAS_BIAS=False, APPLY_GELU=False, STORE_PRE=False, ACCUMULATE=False), **flags)
    specs = []
    for i, (block_m, block_n, block_k, group_m, warps, stages) in enumerate(GEMM_CONFIGS):
        constexprs = dict(flags, **dict.fromkeys(unit, 1), INPUT_PRECISION="ieee", BLOCK_M=block_m, BLOCK_N=block_n,
                          BLOCK_K=block_k, GROUP_M=group_m)
        specs.append(KernelSpec(kernel=kernel, fn=_matmul_kernel, signature=signature, constexprs=constexprs,
                                num_warps=warps, num_stages=stages, default=i == 0, uses_dot=True,
                                roofline=roofline, extra={"attrs": attrs, "layout": layout}))
    return specs


def _gemm_roofline(shape: str, m: int, n: int, k: int, elem: int = 2, extra_bytes: float = 0.0) -> Roofline:
    return Roofline(shape=shape, flops=2.0 * m * n * k, bytes=elem * (m * k + k * n + m * n) + extra_bytes)


def report_specs() -> list[KernelSpec]:
    """Projector GEMMs at GMAI-VL scale: 8 images x 576 patches, CLIP-L (1024) -> 4096 -> 4096, bf16."""
    tokens, c_vis, c_txt = 576 * 8, 1024, 4096
    specs = []
    # linear_1 forward: bias + GELU in the epilogue, pre-activation stored for the backward pass.
    specs += matmul_specs(
        "projector_linear_gelu_fwd",
        _gemm_roofline(f"M={tokens} K={c_vis} N={c_txt} bf16, +bias+GELU, stores pre", tokens, c_txt, c_vis,
                       extra_bytes=2.0 * tokens * c_txt),
        layout="nt", HAS_BIAS=True, APPLY_GELU=True, STORE_PRE=True)
    # linear_2 forward: bias only.
    specs += matmul_specs(
        "projector_linear_fwd",
        _gemm_roofline(f"M={tokens} K={c_txt} N={c_txt} bf16, +bias", tokens, c_txt, c_txt),
        layout="nt", HAS_BIAS=True)
    # backward GEMMs: dX = dZ @ W (K-major B) and dW = dZ.T @ X (A read transposed) - the same kernel, other strides.
    specs += matmul_specs(
        "projector_linear_bwd_dx",
        _gemm_roofline(f"M={tokens} K={c_txt} N={c_txt} bf16 (dZ @ W)", tokens, c_txt, c_txt),
        layout="nn")
    specs += matmul_specs(
        "projector_linear_bwd_dw",
        _gemm_roofline(f"M={c_txt} K={tokens} N={c_txt} bf16 (dZ.T @ X)", c_txt, c_txt, tokens),
        layout="tn")
    n = tokens * c_txt
    specs.append(KernelSpec(
        kernel="projector_gelu_bwd", fn=_gelu_backward_kernel,
        signature={"grad_ptr": "*bf16", "pre_ptr": "*bf16", "out_ptr": "*bf16", "n_elements": "i32",
                   "BLOCK": "constexpr"},
        constexprs={"BLOCK": GELU_BWD_BLOCK}, num_warps=4, default=True,
        roofline=Roofline(shape=f"{tokens}x{c_txt} bf16", flops=12.0 * n, bytes=2.0 * 3 * n)))
    return specs
