"""One-shot GPU check: `python -m gmaivl_rt.gpu_check --out DIR --budget SECONDS [--smoke]` (`make gpu-check`).

A GPU may be lent for minutes, once. This runs, in priority order and within the time budget, what the CPU cannot
prove, appending one JSON line per result to DIR/gpu_check.jsonl as it goes (flushed, so a run cut short still
reports what it did):
  1. configs      every autotune config of every tiled kernel on its own against the PyTorch reference, with free
                  memory pre-filled with NaN so an output a kernel fails to write shows (an attention config runs
                  where it is offered: at most its head dim; one not offered to this GPU's arch is "skipped");
  2. determinism  the same inputs twice give bitwise-equal outputs and gradients;
  3. scale        the loss head at 2048 x 4096 x 92544, attention at 16k tokens, a norm past 2**31 elements,
                  decode over a 32k-token cache;
  4. model        loss and every gradient, Triton against PyTorch: the compact preset and a 2-layer model at
                  GMAI-VL-7B widths; greedy decode; fp32 weights under bf16 autocast;
  5. throughput   autotuning on: first call (compile + tune) time, steady time against the reference, the winners.
A check whose turn comes after the budget is spent is recorded as "skipped". `--smoke` runs the same plumbing at
tiny sizes on the CPU under the Triton interpreter (what CI runs); there a config that differs from an earlier one
only in num_warps / num_stages, which the interpreter ignores, is recorded as skipped with "same_as" naming it.
Exit status 1 when any check failed or errored. Each line: {"check", "priority", "status": pass|fail|error|skipped, "seconds", ...measurements}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
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


# The smoke run takes the same code paths at the smallest sizes that still reach them (the interpreter's cost grows
# with programs and launches): one text layer (vision keeps 2: its feature layer -2 runs one), the fewest heads that
# keep GQA (2 q heads per kv head), a short prompt.
SMOKE = Sizes(device="cpu", dtype=torch.float32, tolerance=1e-4, attn=((9,), 2, 1, 16), causal=(True,),
              gemm=(9, 32, 24), image=(8, 4), loss_head=(12, 16, 40), long_attention=(40, 2, 1, 16), norm=(5, 48),
              decode_cache=40,
              presets=(("tiny, 1 text layer, fewer heads", "tiny",
                        {"text": {"num_layers": 1, "num_heads": 2, "num_kv_heads": 1}, "vision": {"num_heads": 1}}),),
              prompt_tokens=4, new_tokens=2, throughput_reps=1)
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


def _forward_backward(fn, inputs, grad_seed=0):
    """Outputs and input gradients of fn(*inputs) against a fixed random output gradient (outputs only for a
    forward-only op such as decode)."""
    leaves = _leaves(*inputs)
    out = fn(*leaves)
    if out.requires_grad:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.device, out.dtype)
        out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves if t.grad is not None]


def _paths(fn, reference, inputs):
    """(triton results, reference results on the same values upcast to fp32)."""
    from gmaivl_rt.kernels._dispatch import kernels

    with kernels("triton"):
        got = _forward_backward(fn, inputs)
    with kernels("torch"):
        want = _forward_backward(reference, [t.float() if t.is_floating_point() else t for t in inputs])
    return got, want


# ----------------------------------------------------------------------------------------------------------------
# 1. every autotune config on its own
# ----------------------------------------------------------------------------------------------------------------
def _config_cases(sz: Sizes):
    """(kernel name, config list, op, reference, inputs) for every autotuned kernel."""
    import importlib

    from gmaivl_rt import ops as K

    att = importlib.import_module("gmaivl_rt.kernels.attention")
    dec = importlib.import_module("gmaivl_rt.kernels.decode_attention")
    proj = importlib.import_module("gmaivl_rt.kernels.projector")
    pe = importlib.import_module("gmaivl_rt.kernels.patch_embed")
    dev, dt = sz.device, sz.dtype
    lengths, hq, hkv, d = sz.attn
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    total = int(cu[-1])
    qkv = [torch.randn(total, h, d, device=dev).to(dt) for h in (hq, hkv, hkv)]

    def attn(causal):
        return (lambda q, k, v: K.attention(q, k, v, causal=causal, cu_seqlens=cu),
                lambda q, k, v: K.attention_reference(q, k, v, causal=causal, cu_seqlens=cu))

    batch, cache = len(lengths), max(lengths)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=dev)
    dq = torch.randn(batch, hq, d, device=dev).to(dt)
    kc, vc = (torch.randn(batch, cache, hkv, d, device=dev).to(dt) for _ in range(2))
    m, k, n = sz.gemm
    x, w, b = torch.randn(m, k, device=dev).to(dt), (torch.randn(n, k, device=dev) / k ** 0.5).to(dt), \
        torch.randn(n, device=dev).to(dt)
    hidden, (side, patch) = 32 if sz is SMOKE else 1024, sz.image
    image = torch.rand(2, 3, side, side, device=dev).to(dt)
    grid = side // patch
    pe_args = [(torch.randn(hidden, 3, patch, patch, device=dev) / 24).to(dt), torch.randn(hidden, device=dev).to(dt),
               torch.randn(hidden, device=dev).to(dt), torch.randn(1 + grid * grid, hidden, device=dev).to(dt)]
    cases = []
    for causal in sz.causal:
        fn, ref = attn(causal)
        for name, configs in (("attention_fwd", att.FWD_CONFIGS), ("attention_bwd_dkdv", att.BWD_DKDV_CONFIGS),
                              ("attention_bwd_dq", att.BWD_DQ_CONFIGS)):
            cases.append((f"{name}{' causal' if causal else ''}", configs, fn, ref, qkv))
    cases.append(("decode_attention_split", dec.SPLIT_CONFIGS,
                  lambda q: K.decode_attention(q, kc, vc, seqlens),
                  lambda q: K.decode_attention_reference(q, kc.float(), vc.float(), seqlens), [dq]))
    cases.append(("projector_matmul", proj.GEMM_CONFIGS, lambda x, w, b: K.fused_linear(x, w, b, "gelu"),
                  lambda x, w, b: K.fused_linear_reference(x, w, b, "gelu"), [x, w, b]))
    for name, configs in (("patch_embed_fwd", pe._FWD_CONFIGS), ("patch_embed_dweight", pe._DWEIGHT_CONFIGS)):
        cases.append((name, configs, lambda *p: K.patch_embed(image, *p)[0],
                      lambda *p: K.patch_embed_reference(image.float(), *p)[0], pe_args))
    return cases


def interpreter_key(config) -> tuple:
    """What the interpreter sees of an autotune config: its block sizes. num_warps and num_stages (a dict's keys of
    those names, a tuple config's last two entries) do not exist there, so configs that differ only in them run
    the same code on the CPU. Named tuples (attention's AttentionConfig) count by field name."""
    if hasattr(config, "_asdict"):
        config = config._asdict()
    if isinstance(config, dict):
        return tuple(sorted((k, v) for k, v in config.items() if k not in ("num_warps", "num_stages")))
    return tuple(config[:-2])


def _offered_inputs(config, configs, inputs, device: str):
    """(inputs to run `config` on, None) or (None, why this GPU does not run it). Attention configs are offered per
    arch and up to a head dim: they run at their largest head dim (q, k, v cut to it), on the archs offered."""
    import importlib

    att = importlib.import_module("gmaivl_rt.kernels.attention")
    if not isinstance(config, att.AttentionConfig):
        return inputs, None
    if inputs[0].shape[-1] > config.max_head_dim:
        inputs = [t[..., :config.max_head_dim].contiguous() for t in inputs]
    if device == "cuda":
        capability = torch.cuda.get_device_capability()
        if config not in att.offered_configs(configs, capability, inputs[0].shape[-1]):
            return None, f"not offered to sm_{att.tuned_arch(capability)}"
    return inputs, None


def check_configs(rec: Recorder, sz: Sizes) -> None:
    from gmaivl_rt.kernels._dispatch import forced_config, interpreting

    for name, configs, fn, reference, case_inputs in _config_cases(sz):
        first_with_blocks = {}
        for index, config in enumerate(configs):
            inputs, not_offered = _offered_inputs(config, configs, case_inputs, sz.device)
            if not_offered:
                rec.skip("configs", 1, not_offered, kernel=name, config_index=index, config=str(config))
                continue
            same = first_with_blocks.setdefault(interpreter_key(config), index)
            if interpreting() and same != index:
                rec.skip("configs", 1, f"under the interpreter it runs as config {same} (same blocks; num_warps and "
                         "num_stages do not apply)", kernel=name, config_index=index, config=str(config),
                         same_as=same)
                continue

            def one(configs=configs, index=index, fn=fn, reference=reference, inputs=inputs):
                poison_free_memory(sz.device)
                with forced_config(configs, index):
                    got, want = _paths(fn, reference, inputs)
                return compare({f"out{i}" if i else "out": (g, w) for i, (g, w) in enumerate(zip(got, want))},
                               sz.tolerance)
            rec.run("configs", 1, one, kernel=name, config_index=index, config=str(config))


# ----------------------------------------------------------------------------------------------------------------
# 2. determinism, 3. scale
# ----------------------------------------------------------------------------------------------------------------
def check_determinism(rec: Recorder, sz: Sizes) -> None:
    from gmaivl_rt.kernels.attention import attention
    from gmaivl_rt.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
    from gmaivl_rt.kernels._dispatch import kernels

    lengths, hq, hkv, d = sz.attn
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=sz.device)
    qkv = [torch.randn(int(cu[-1]), h, d, device=sz.device).to(sz.dtype) for h in (hq, hkv, hkv)]
    n, h, v = sz.loss_head
    n, v = min(n, 1024), min(v, 32000)
    hw = [torch.randn(n, h, device=sz.device).to(sz.dtype),
          (torch.randn(v, h, device=sz.device) / h ** 0.5).to(sz.dtype)]
    labels = torch.randint(0, v, (n,), device=sz.device)
    cases = {"attention": (lambda q, k, v: attention(q, k, v, causal=True, cu_seqlens=cu), qkv),
             "fused_linear_cross_entropy": (lambda h, w: fused_linear_cross_entropy(h, w, labels)[None], hw)}
    for name, (fn, inputs) in cases.items():
        def twice(fn=fn, inputs=inputs):
            with kernels("triton"):
                first, second = _forward_backward(fn, inputs), _forward_backward(fn, inputs)
            return {"ok": all(torch.equal(a, b) for a, b in zip(first, second))}
        rec.run("determinism", 2, twice, kernel=name)


def check_scale(rec: Recorder, sz: Sizes) -> None:
    from gmaivl_rt import ops as K

    dev, dt = sz.device, sz.dtype

    def loss_head():
        n, h, v = sz.loss_head
        hidden = torch.randn(n, h, device=dev).to(dt)
        weight = (torch.randn(v, h, device=dev) / h ** 0.5).to(dt)
        labels = torch.randint(0, v, (n,), device=dev)
        got, want = _paths(lambda h, w: K.fused_linear_cross_entropy(h, w, labels)[None],
                           lambda h, w: K.fused_linear_cross_entropy_reference(h, w, labels)[None], [hidden, weight])
        return compare({"loss": (got[0], want[0]), "grad_hidden": (got[1], want[1]),
                        "grad_weight": (got[2], want[2])}, sz.tolerance)

    def long_attention():
        t, hq, hkv, d = sz.long_attention
        cu = torch.tensor([0, t], dtype=torch.int32, device=dev)
        qkv = [torch.randn(t, h, d, device=dev).to(dt) for h in (hq, hkv, hkv)]
        got, want = _paths(lambda q, k, v: K.attention(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=t),
                           lambda q, k, v: K.attention_reference(q, k, v, causal=True, cu_seqlens=cu), qkv)
        return compare(dict(zip(("out", "dq", "dk", "dv"), zip(got, want))), sz.tolerance)

    def norm():
        rows, hidden = sz.norm
        x = torch.randn(rows, hidden, device=dev).to(dt)
        w = torch.ones(hidden, device=dev).to(dt)
        with K.kernels("triton"), torch.no_grad():
            y = K.rms_norm(x, w, 1e-5)
        tail = slice(rows - 8, rows)  # the rows past 2**31 elements (all of them at smoke size)
        with torch.no_grad():
            want = K.rms_norm_reference(x[tail].float(), w.float(), 1e-5)
        return {**compare({"tail rows": (y[tail], want)}, sz.tolerance), "elements": x.numel()}

    def decode():
        lengths, hq, hkv, d = sz.attn
        length = sz.decode_cache
        q = torch.randn(2, hq, d, device=dev).to(dt)
        kc, vc = (torch.randn(2, length, hkv, d, device=dev).to(dt) for _ in range(2))
        seqlens = torch.tensor([length, length // 3], dtype=torch.int32, device=dev)
        with K.kernels("triton"):
            got = K.decode_attention(q, kc, vc, seqlens)
        want = K.decode_attention_reference(q.float(), kc.float(), vc.float(), seqlens)
        return compare({"out": (got, want)}, sz.tolerance)

    for name, fn in (("loss head", loss_head), ("attention", long_attention), ("rms_norm", norm),
                     ("decode", decode)):
        rec.run("scale", 3, fn, case=name)


# ----------------------------------------------------------------------------------------------------------------
# 4. model, 5. throughput
# ----------------------------------------------------------------------------------------------------------------
def _model_config(preset: str, overrides: dict):
    from gmaivl_rt import GMAIVLConfig

    cfg = GMAIVLConfig.preset(preset)
    return cfg.replace(**overrides) if overrides else cfg


def check_model(rec: Recorder, sz: Sizes) -> None:
    from gmaivl_rt import GMAIVL
    from gmaivl_rt.kernels._dispatch import kernels

    for name, preset, overrides in sz.presets:
        cfg = _model_config(preset, overrides)
        torch.manual_seed(0)
        model = GMAIVL(cfg).to(sz.device, sz.dtype).train()
        img = cfg.image_token_index
        ids = torch.tensor([[3, 4] + [img] * cfg.num_image_tokens + list(range(10, 10 + sz.prompt_tokens))],
                           device=sz.device)
        labels = ids.masked_fill(ids == img, -100)
        pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, device=sz.device).to(sz.dtype)

        def loss_and_grads():
            runs = {}
            for mode in ("torch", "triton"):
                model.zero_grad(set_to_none=True)
                with kernels(mode):
                    out = model(ids, pixel_values=pixels, labels=labels)
                    out.loss.backward()
                runs[mode] = [out.loss.detach()] + [p.grad for p in model.parameters() if p.grad is not None]
            names = ["loss"] + [n for n, p in model.named_parameters() if p.grad is not None]
            result = compare({n: (a, b) for n, a, b in zip(names, runs["triton"], runs["torch"])}, sz.tolerance)
            worst = max(result["errors"], key=lambda n: result["errors"][n])
            return {"ok": result["ok"], "loss_error": result["errors"]["loss"], "worst": worst,
                    "worst_error": result["errors"][worst], "gradients": len(names) - 1}

        def greedy():
            model.eval()
            outs = {}
            for mode in ("torch", "triton"):
                with kernels(mode), torch.no_grad():
                    outs[mode] = model.generate(ids, pixel_values=pixels, max_new_tokens=sz.new_tokens)
            model.train()
            agree = int((outs["torch"] == outs["triton"]).all(0).long().cumprod(0).sum()) - ids.shape[1]
            return {"ok": agree >= 1, "tokens_agreeing": agree, "new_tokens": outs["torch"].shape[1] - ids.shape[1]}

        rec.run("model", 4, loss_and_grads, model=name, case="loss and gradients")
        rec.run("model", 4, greedy, model=name, case="greedy decode")
        del model

    def fp32_under_autocast():
        cfg = _model_config(*sz.presets[0][1:])
        torch.manual_seed(0)
        model = GMAIVL(cfg).to(sz.device).eval()
        ids = torch.tensor([list(range(5, 5 + min(6, sz.prompt_tokens)))], device=sz.device)
        outs = {}
        for mode in ("torch", "triton"):
            with kernels(mode), torch.autocast(sz.device, dtype=torch.bfloat16):
                outs[mode] = model.generate(ids, max_new_tokens=sz.new_tokens)
        return {"ok": outs["triton"].shape == outs["torch"].shape,
                "same_tokens": bool(torch.equal(outs["triton"], outs["torch"]))}

    rec.run("model", 4, fp32_under_autocast, model=sz.presets[0][0], case="fp32 weights under bf16 autocast")


def _timed(fn, reps: int, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / reps


def check_throughput(rec: Recorder, sz: Sizes) -> None:
    import importlib

    from gmaivl_rt import ops as K

    att = importlib.import_module("gmaivl_rt.kernels.attention")
    proj = importlib.import_module("gmaivl_rt.kernels.projector")
    dev, dt = sz.device, sz.dtype
    t, hq, hkv, d = sz.long_attention
    t = min(t, 4096)
    cu = torch.tensor([0, t], dtype=torch.int32, device=dev)
    q, k, v = (torch.randn(t, h, d, device=dev).to(dt) for h in (hq, hkv, hkv))
    m, kk, n = sz.gemm
    x, w = torch.randn(m, kk, device=dev).to(dt), torch.randn(n, kk, device=dev).to(dt)
    cases = {
        "attention forward": (lambda: K.attention(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=t),
                              lambda: K.attention_reference(q, k, v, causal=True, cu_seqlens=cu),
                              lambda: att.best_config(att._attn_fwd_kernel)),
        "projector GEMM": (lambda: K.fused_linear(x, w), lambda: K.fused_linear_reference(x, w),
                           lambda: proj._autotuned_matmul.cache_info().currsize and getattr(
                               proj._autotuned_matmul(False), "best_config", None)),
    }
    for name, (fn, reference, winner) in cases.items():
        def measure(fn=fn, reference=reference, winner=winner):
            with K.kernels("triton"), torch.no_grad():
                first = _timed(fn, 1, dev)  # compile + autotune on a GPU
                steady = _timed(fn, sz.throughput_reps, dev)
            with K.kernels("torch"), torch.no_grad():
                _timed(reference, 1, dev)
                ref = _timed(reference, sz.throughput_reps, dev)
            return {"first_call_s": first, "triton_s": steady, "reference_s": ref,
                    "speedup": ref / steady if steady else None, "winner": str(winner())}
        rec.run("throughput", 5, measure, case=name)


CHECKS = (check_configs, check_determinism, check_scale, check_model, check_throughput)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def run(out_dir: str | Path, budget_s: float, smoke: bool) -> list[dict]:
    """Every check in priority order within budget_s seconds; returns the rows also written to
    out_dir/gpu_check.jsonl (appended to, one line per result, a header line first)."""
    from gmaivl_rt.kernels import _dispatch

    sz = SMOKE if smoke else FULL
    if not smoke and not torch.cuda.is_available():
        raise RuntimeError("gpu_check needs a CUDA device (or --smoke for the CPU interpreter run)")
    if smoke and not _dispatch.interpreting():
        raise RuntimeError("gpu_check --smoke needs TRITON_INTERPRET=1 set before triton is imported")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rec = Recorder(out / "gpu_check.jsonl", budget_s)
    import triton

    rec.write({"check": "header", "priority": 0, "status": "pass", "smoke": smoke, "budget_s": budget_s,
               "triton": triton.__version__, "torch": torch.__version__,
               "device": torch.cuda.get_device_name() if sz.device == "cuda" else "cpu (interpreter)",
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    torch.manual_seed(0)
    for check in CHECKS:
        check(rec, sz)
    return rec.results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gmaivl_rt.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_check.jsonl (appended to)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; later checks are skipped (420)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU under the Triton interpreter")
    args = parser.parse_args(argv)
    if args.budget < 0:
        parser.error(f"--budget {args.budget}: must be >= 0 seconds")
    from gmaivl_rt.kernels import _dispatch

    if args.smoke and not _dispatch.interpreting():  # the interpreter must be on before triton is imported
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.run([sys.executable, "-m", "gmaivl_rt.gpu_check", *(argv or sys.argv[1:])],
                              env=env).returncode
    rows = run(args.out, args.budget, args.smoke)
    counts = {s: sum(r["status"] == s for r in rows[1:]) for s in ("pass", "fail", "error", "skipped")}
    print(f"gpu_check: {counts} -> {Path(args.out) / 'gpu_check.jsonl'}")
    for r in rows[1:]:
        if r["status"] in ("fail", "error"):
            label = " ".join(str(r[k]) for k in ("kernel", "config", "case", "model") if k in r)
            print(f"  {r['status'].upper()} {r['check']} {label}: {r.get('error') or r.get('errors') or ''}")
    return 1 if counts["fail"] or counts["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
