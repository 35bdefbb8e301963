"""Fused linear + cross-entropy: loss of (hidden @ weight.T) against labels without materialising the
(tokens, vocab) logits; tokens are processed in chunks and gradients computed in the forward pass.

The Liger-Kernel algorithm. Per chunk of tokens:
  logits = h_chunk @ W.T                     (chunk, V) fp32, the only vocab-sized buffer, reused across chunks
  loss   = logsumexp(logits) - logits[label]
  logits <- softmax(logits) - onehot(label)  in place: d loss / d logits up to the reduction's scale (ignored rows 0)
  grad_hidden[chunk] = scale * (dlogits @ W),  grad_weight += scale * (dlogits.T @ h_chunk)   (scale in fp32)
so the backward pass only scales the stored gradients by grad_output. Two implementations of the per-chunk step
share the loop and the autograd Function: Triton (GEMMs from `projector.matmul`, a row-wise online-softmax kernel)
and chunked PyTorch (CPU tensors, `GMAIVL_KERNELS=torch`).

Edge cases: with reduction="mean" and every label ignored the loss is 0 and all gradients are 0 (torch's
F.cross_entropy gives NaN there); a weight that does not require grad (frozen LLM) skips the grad_weight GEMMs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import use_triton
from ._spec import KernelSpec, Roofline
from .projector import autocast_operands, matmul, matmul_specs

# Vocabulary block of the row kernel: a row of 92544 logits is swept in 46 blocks, twice (statistics, gradient).
CE_BLOCK_V = 2048
CE_NUM_WARPS = 8
# A chunk GEMM re-reads the whole weight, so chunks below this many rows turn it memory-bound on a GPU
# (H100's ridge is ~300 FLOP/byte; a chunk of m rows does m FLOP per weight byte in bf16).
MIN_CHUNK_ROWS = 256
# On CUDA the chunk is sized from a memory budget for its fp32 logits instead: the trainer's pack (<= 2048 tokens at
# V=92544, 758 MB of logits) is then one chunk, whose GEMMs are compute-bound, whose grad-hidden GEMM has 512
# 128x128 tiles to spread over the SMs (256-row chunks gave 64), and which needs no fp32 dW accumulator.
CUDA_LOGITS_BUDGET_BYTES = 2 << 30
CUDA_MIN_CHUNK_ROWS = 1024
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel: loss and logit gradient of one chunk, row by row, in place
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _cross_entropy_chunk_kernel(
    logits_ptr, stride_row, labels_ptr, loss_ptr, V, ignore_index,
    BLOCK_V: tl.constexpr,
):
    """One program per row. Pass 1: online max / sum-exp over the vocabulary in BLOCK_V blocks (one read).
    Pass 2: overwrite the row with softmax - onehot (unscaled: the GEMMs that consume it apply the reduction's
    scale to their fp32 accumulators, as a 1/n_tokens factor here would underflow once cast to fp16).
    loss_ptr[row] = logsumexp - logit[label], 0 when the label is ignore_index (whose row of gradients is zeroed)."""
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    label = tl.load(labels_ptr + row)
    offs = tl.arange(0, BLOCK_V)
    if label == ignore_index:
        for start in range(0, V, BLOCK_V):
            tl.store(row_ptr + start + offs, tl.zeros((BLOCK_V,), tl.float32), mask=start + offs < V)
        tl.store(loss_ptr + row, 0.0)
    else:
        running_max = tl.full((), float("-inf"), tl.float32)
        running_sum = tl.full((), 0.0, tl.float32)
        for start in range(0, V, BLOCK_V):
            x = tl.load(row_ptr + start + offs, mask=start + offs < V, other=float("-inf"))
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        target_logit = tl.load(row_ptr + label)
        for start in range(0, V, BLOCK_V):
            mask = start + offs < V
            x = tl.load(row_ptr + start + offs, mask=mask, other=0.0)
            grad = tl.exp(x - lse)
            grad = tl.where(start + offs == label, grad - 1.0, grad)
            tl.store(row_ptr + start + offs, grad, mask=mask)
        tl.store(loss_ptr + row, lse - target_logit)


# ----------------------------------------------------------------------------------------------------------------
# The per-chunk step, two ways. Both fill loss_rows (fp32, per token), grad_hidden rows (or skip when None) and
# write (first chunk) or add into grad_weight (skip when None). `logits` is the reusable (rows, V) fp32 buffer; it
# receives the unscaled softmax - onehot, and `scale` (the reduction's 1/n_valid) is applied in fp32 after each
# gradient GEMM.
# ----------------------------------------------------------------------------------------------------------------
def _chunk_step_triton(h, weight, labels, logits, scale, ignore_index, loss_rows, grad_hidden, grad_weight,
                       accumulate):
    matmul(h, weight.t(), logits)                                   # (rows, H) @ (H, V) -> fp32
    _cross_entropy_chunk_kernel[(h.shape[0],)](logits, logits.stride(0), labels, loss_rows, logits.shape[1],
                                               ignore_index, BLOCK_V=CE_BLOCK_V, num_warps=CE_NUM_WARPS)
    if grad_hidden is not None:
        matmul(logits, weight, grad_hidden, alpha=scale)            # (rows, V) @ (V, H), logits cast to W's dtype
    if grad_weight is not None:
        matmul(logits.t(), h, grad_weight, accumulate=accumulate, alpha=scale)  # (V, rows) @ (rows, H) [+=]


def _chunk_step_torch(h, weight, labels, logits, scale, ignore_index, loss_rows, grad_hidden, grad_weight,
                      accumulate):
    if h.dtype == torch.float32:
        torch.matmul(h, weight.t(), out=logits)
    else:  # half logits upcast, as lm_head + .float() would give
        logits.copy_(h @ weight.t())
    valid = labels != ignore_index
    target = torch.where(valid, labels, 0).unsqueeze(1)
    lse = torch.logsumexp(logits, dim=1, keepdim=True)
    loss_rows.copy_(torch.where(valid, (lse - logits.gather(1, target)).squeeze(1), 0.0))
    # softmax - onehot in place (unscaled, as the Triton kernel); ignored rows 0
    logits.sub_(lse).exp_().mul_(valid.unsqueeze(1))
    logits.scatter_add_(1, target, torch.where(valid, -1.0, 0.0).unsqueeze(1))
    if grad_hidden is not None:  # the scale in fp32, after the product
        grad_hidden.copy_(torch.matmul(logits.to(weight.dtype), weight).float().mul_(scale))
    if grad_weight is not None and accumulate:
        grad_weight.addmm_(logits.t(), h.float(), alpha=scale)
    elif grad_weight is not None:
        grad_weight.copy_(torch.mm(logits.t(), h.float()).mul_(scale))


def chunk_rows(n_tokens: int, vocab: int, hidden_size: int, budget_bytes: int | None = None) -> int:
    """Tokens per chunk, never more than n_tokens. Without a budget (CPU): the chunk's fp32 logits about as large
    as the hidden states (Liger's rule), but at least MIN_CHUNK_ROWS, a power of two. With budget_bytes (CUDA, see
    `cuda_logits_budget`): as many rows as the budget holds (a multiple of 128), at least CUDA_MIN_CHUNK_ROWS."""
    if budget_bytes is not None:
        rows = budget_bytes // (4 * vocab) // 128 * 128
        return max(1, min(n_tokens, max(rows, CUDA_MIN_CHUNK_ROWS)))
    rows = triton.next_power_of_2(triton.cdiv(n_tokens, triton.cdiv(vocab, hidden_size)))
    return max(1, min(n_tokens, max(rows, MIN_CHUNK_ROWS)))


def cuda_logits_budget(device) -> int:
    """Bytes the chunk logits may take on a CUDA device: CUDA_LOGITS_BUDGET_BYTES, at most a quarter of free memory."""
    free, _ = torch.cuda.mem_get_info(device)
    return min(CUDA_LOGITS_BUDGET_BYTES, free // 4)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, chunk_size, step, grad_enabled):
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        n_valid = int((labels != ignore_index).sum())
        # "mean" divides by the non-ignored tokens; with none, every row contributes 0 (loss 0, zero gradients).
        scale = 1.0 / n_valid if reduction == "mean" and n_valid > 0 else 1.0
        # Gradients only for inputs that need them, and none under torch.no_grad (an eval loss), where
        # needs_input_grad alone would still say True.
        grad_hidden = torch.empty_like(hidden) if grad_enabled and ctx.needs_input_grad[0] else None
        budget = cuda_logits_budget(hidden.device) if hidden.is_cuda else None
        rows = chunk_size or chunk_rows(n_tokens, vocab, hidden.shape[1], budget)
        # several chunks: fp32 accumulation, cast to the weight's dtype at the end; one chunk writes dW directly
        # (fp32 accumulation inside its GEMM)
        accumulator = torch.float32 if n_tokens > rows else weight.dtype
        new_grad_weight = torch.empty if n_tokens else torch.zeros  # no chunk writes it when there are no tokens
        grad_weight = (new_grad_weight(weight.shape, device=weight.device, dtype=accumulator)
                       if grad_enabled and ctx.needs_input_grad[1] else None)
        loss_rows = torch.empty(n_tokens, device=hidden.device, dtype=torch.float32)
        logits = torch.empty((min(rows, n_tokens), vocab), device=hidden.device, dtype=torch.float32)
        for start in range(0, n_tokens, rows):
            end = min(start + rows, n_tokens)
            step(hidden[start:end], weight, labels[start:end], logits[: end - start], scale, ignore_index,
                 loss_rows[start:end], None if grad_hidden is None else grad_hidden[start:end], grad_weight,
                 start > 0)
        loss = loss_rows.sum() * scale
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        # The gradients were computed for d loss = 1; the chain rule only scales them (in place: they are ours).
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_output.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _check_inputs(hidden, weight, labels, reduction, chunk_size):
    if reduction not in ("mean", "sum"):
        raise ValueError(f"fused_linear_cross_entropy: reduction {reduction!r} is not 'mean' or 'sum'")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: hidden {tuple(hidden.shape)} and weight "
                         f"{tuple(weight.shape)} must be (N, H) and (V, H)")
    if hidden.dtype not in _FLOAT_DTYPES or hidden.dtype != weight.dtype:
        raise TypeError(f"fused_linear_cross_entropy: hidden is {hidden.dtype} and weight {weight.dtype}; "
                        "expected one float dtype (float32, float16 or bfloat16) for both")
    if labels.shape != (hidden.shape[0],) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"fused_linear_cross_entropy: labels is {labels.dtype} {tuple(labels.shape)}; expected "
                         f"integer ({hidden.shape[0]},)")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"fused_linear_cross_entropy: chunk_size {chunk_size} must be positive")


def _check_labels(labels, vocab, ignore_index):
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        raise ValueError(f"fused_linear_cross_entropy: labels outside [0, {vocab}) that are not ignore_index "
                         f"({ignore_index}), e.g. {labels[bad][0].item()}")


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------
def fused_linear_cross_entropy(hidden, weight, labels, *, ignore_index=-100, reduction="mean", chunk_size=None):
    """hidden: (N, H); weight: (V, H); labels: (N,) int64 (already shifted), `ignore_index` skipped.
    reduction: "mean" (over non-ignored tokens; 0 when all are ignored) or "sum". Returns a 0-d fp32 tensor.
    hidden and weight share a dtype (fp32/fp16/bf16): logits and loss in fp32, gradients in that dtype.
    chunk_size: tokens per chunk (default `chunk_rows`). Never materialises the (N, V) logits: Triton kernels when
    `use_triton`, else the same chunked algorithm in PyTorch."""
    hidden, weight = autocast_operands(hidden, weight)  # as lm_head's F.linear would run under autocast
    _check_inputs(hidden, weight, labels, reduction, chunk_size)
    _check_labels(labels, weight.shape[0], ignore_index)
    step = _chunk_step_triton if use_triton(hidden, weight, gemm=True) else _chunk_step_torch
    with torch.autocast(hidden.device.type, enabled=False):
        return _FusedLinearCrossEntropy.apply(hidden, weight, labels.contiguous(), ignore_index, reduction,
                                              chunk_size, step, torch.is_grad_enabled())


def fused_linear_cross_entropy_reference(hidden, weight, labels, *, ignore_index=-100, reduction="mean"):
    """Naive: materialises the logits in fp32. The independent reference for tests."""
    logits = (hidden @ weight.T).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


# ----------------------------------------------------------------------------------------------------------------
# GPU readiness report
# ----------------------------------------------------------------------------------------------------------------
def report_specs() -> list[KernelSpec]:
    """InternLM2-7B's head at the trainer's shape: one pack of 2048 tokens, H=4096, V=92544, bf16, chunked as on
    CUDA (`chunk_rows` with the default logits budget: one chunk, so dW is stored directly, no fp32 accumulator)."""
    tokens, hidden_size, vocab = 2048, 4096, 92544
    rows = chunk_rows(tokens, vocab, hidden_size, CUDA_LOGITS_BUDGET_BYTES)
    chunks = triton.cdiv(tokens, rows)
    shape = f"N={tokens} H={hidden_size} V={vocab} bf16, {chunks} chunks of {rows}"
    gemm_flops = 2.0 * tokens * hidden_size * vocab
    weight_bytes = 2.0 * vocab * hidden_size
    hidden_bytes = 2.0 * tokens * hidden_size
    logits_bytes = 4.0 * tokens * vocab   # fp32 chunk logits, summed over all chunks
    # Each GEMM re-reads the weight once per chunk (grad_weight reads and writes its fp32 accumulator instead);
    # hidden is read once; the chunk logits are written / read in fp32.
    rooflines = {
        "logits": Roofline(f"{shape}: logits = h @ W.T", gemm_flops, chunks * weight_bytes + hidden_bytes
                           + logits_bytes),
        "grad_hidden": Roofline(f"{shape}: dlogits @ W", gemm_flops, chunks * weight_bytes + logits_bytes
                                + hidden_bytes),
        "grad_weight": Roofline(f"{shape}: grad_W {'+' if chunks > 1 else ''}= dlogits.T @ h", gemm_flops,
                                (chunks * 2 * 2 * weight_bytes if chunks > 1 else weight_bytes) + logits_bytes
                                + hidden_bytes),
    }
    specs = []
    specs += matmul_specs("flce_logits", rooflines["logits"], layout="nt", c="*fp32")
    specs += matmul_specs("flce_grad_hidden", rooflines["grad_hidden"], layout="nn", a="*fp32")
    specs += matmul_specs("flce_grad_weight", rooflines["grad_weight"], layout="tn", a="*fp32",
                          **(dict(c="*fp32", ACCUMULATE=True) if chunks > 1 else {}))
    specs.append(KernelSpec(
        kernel="flce_softmax_grad", fn=_cross_entropy_chunk_kernel,
        signature={"logits_ptr": "*fp32", "stride_row": "i32", "labels_ptr": "*i64", "loss_ptr": "*fp32", "V": "i32",
                   "ignore_index": "i32", "BLOCK_V": "constexpr"},
        constexprs={"BLOCK_V": CE_BLOCK_V}, num_warps=CE_NUM_WARPS, default=True,
        roofline=Roofline(f"{shape}: row softmax/loss/grad in place", 6.0 * tokens * vocab, 3 * logits_bytes)))
    return specs
