"""The check sizes (smoke on the CPU interpreter, full on a GPU), the JSONL recorder with its time budget, and
the comparisons every check uses."""
from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run: tiny for --smoke (interpreter), the real ones on a GPU."""
    device: str
    dtype: torch.dtype
    tolerance: float                 # max |triton - reference| / max(1, max |reference|)
    attn: tuple                      # (sequence lengths, q heads, kv heads, head dim) of the config sweep
    causal: tuple                    # the attention masks the config sweep covers
    gemm: tuple                      # (M, K, N) of the projector GEMM sweep
    image: tuple                     # (image side, patch side) of the patch-embedding sweep
    loss_head: tuple                 # (tokens, hidden, vocab)
    long_attention: tuple            # (tokens, q heads, kv heads, head dim)
    norm: tuple                      # (rows, hidden) of the norm at scale
    decode_cache: int                # cache length of the decode at scale
    presets: tuple                   # model configs of the model checks: (name, preset, overrides)
    prompt_tokens: int               # text tokens after the image in the model checks' prompt
    new_tokens: int                  # tokens the model checks' greedy decodes generate
    throughput_reps: int
    decode: tuple = ("compact", 16, 64, True)  # (preset, rows, new tokens, compiled side) of the decode check


# The smoke run takes the same code paths at the smallest sizes that still reach them (the interpreter's cost grows
# with programs and launches): one text layer (vision keeps 2: its feature layer -2 runs one), the fewest heads that
# keep GQA (2 q heads per kv head), a short prompt.
SMOKE = Sizes(device="cpu", dtype=torch.float32, tolerance=1e-4, attn=((9,), 2, 1, 16), causal=(True,),
              gemm=(9, 32, 24), image=(8, 4), loss_head=(12, 16, 40), long_attention=(40, 2, 1, 16), norm=(5, 48),
              decode_cache=40,
              presets=(("tiny, 1 text layer, fewer heads", "tiny",
                        {"text": {"num_layers": 1, "num_heads": 2, "num_kv_heads": 1}, "vision": {"num_heads": 1}}),),
              prompt_tokens=4, new_tokens=2, throughput_reps=1, decode=("tiny", 2, 3, False))
FULL = Sizes(device="cuda", dtype=torch.bfloat16, tolerance=6e-2, attn=((1, 17, 127, 300, 1000), 32, 8, 128),
             causal=(False, True),
             gemm=(4608, 1024, 4096), image=(336, 14), loss_head=(2048, 4096, 92544),
             long_attention=(16384, 32, 8, 128), norm=(2**31 // 4096 + 8, 4096), decode_cache=32768,
             presets=(("compact", "compact", {}),
                      ("gmai-vl-7b widths, 2 layers", "gmai-vl-7b",
                       {"text": {"num_layers": 2}, "vision": {"num_layers": 2}})),
             prompt_tokens=30, new_tokens=4, throughput_reps=20)


# ----------------------------------------------------------------------------------------------------------------
# Running and recording
# ----------------------------------------------------------------------------------------------------------------
class Recorder:
    """Appends one JSON line per result to `path` (flushed and synced: a killed run keeps every finished line)
    and keeps the time budget."""

    def __init__(self, path: Path, budget_s: float):
        self.path, self.budget_s, self.started = path, budget_s, time.monotonic()
        self.results: list[dict] = []

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def write(self, row: dict) -> None:
        self.results.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def run(self, check: str, priority: int, fn, **labels) -> dict:
        """Run fn() -> dict of measurements with "ok" (bool), unless the budget is spent."""
        if self.left() <= 0:
            return self.skip(check, priority, "time budget spent", **labels)
        row = {"check": check, "priority": priority, **labels}
        started = time.monotonic()
        try:
            measured = fn()
        except Exception as e:  # a broken check must not stop the others
            return self._finish(row, "error", time.monotonic() - started, error=f"{type(e).__name__}: {e}",
                                traceback=traceback.format_exc(limit=3))
        ok = measured.pop("ok", True)
        return self._finish(row, "pass" if ok else "fail", time.monotonic() - started, **measured)

    def skip(self, check: str, priority: int, reason: str, **labels) -> dict:
        """Record a check this machine does not run, and why."""
        return self._finish({"check": check, "priority": priority, **labels}, "skipped", 0.0, reason=reason)

    def _finish(self, row, status, seconds, **fields):
        row.update(status=status, seconds=round(seconds, 3), **fields)
        self.write(row)
        return row


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max(1, max |want|), NaN when got holds a NaN (an unwritten output in poisoned memory)."""
    got, want = got.detach().float(), want.detach().float()
    if not bool(torch.isfinite(got).all()):
        return float("nan")
    return float((got - want).abs().max()) / max(1.0, float(want.abs().max())) if want.numel() else 0.0


def compare(pairs: dict, tolerance: float) -> dict:
    """{"name": (got, want)} -> {"errors": {...}, "ok": every error finite and within tolerance}."""
    errors = {name: relative_error(got, want) for name, (got, want) in pairs.items()}
    return {"errors": errors, "tolerance": tolerance, "ok": all(e == e and e <= tolerance for e in errors.values())}


def poison_free_memory(device: str) -> None:
    """Fill (most of) the CUDA caching allocator's free memory with NaN and release it to the cache: later
    torch.empty outputs reuse those blocks, so a region a kernel never writes reads NaN. No-op on CPU."""
    if device != "cuda":
        return
    free, _ = torch.cuda.mem_get_info()
    chunk = 256 << 20
    blocks = []
    try:
        for _ in range(int(free * 0.9) // chunk):
            blocks.append(torch.full((chunk // 4,), float("nan"), device=device))
    except torch.OutOfMemoryError:
        pass
    del blocks


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


def forward_backward(fn, inputs, grad_seed=0):
    """Outputs and input gradients of fn(*inputs) against a fixed random output gradient (outputs only for a
    forward-only op such as decode)."""
    leaves = _leaves(*inputs)
    out = fn(*leaves)
    if out.requires_grad:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.device, out.dtype)
        out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves if t.grad is not None]


def triton_and_reference(fn, reference, inputs):
    """(triton results, reference results on the same values upcast to fp32)."""
    from gmaivl_rt.kernels._dispatch import kernels

    with kernels("triton"):
        got = forward_backward(fn, inputs)
    with kernels("torch"):
        want = forward_backward(reference, [t.float() if t.is_floating_point() else t for t in inputs])
    return got, want
