"""Checks 4-5: the model's loss and gradients Triton against PyTorch, and kernel throughput with autotuning."""
from __future__ import annotations

import time

import torch

from gmaivl_rt.gpu_check.recording import Recorder, Sizes, compare


# ----------------------------------------------------------------------------------------------------------------
# 4. model, 5. throughput
# ----------------------------------------------------------------------------------------------------------------
def _model_config(preset: str, overrides: dict):
    from gmaivl_rt.model.config import GMAIVLConfig

    cfg = GMAIVLConfig.preset(preset)
    return cfg.replace(**overrides) if overrides else cfg


def check_model(rec: Recorder, sz: Sizes) -> None:
    from gmaivl_rt.model.modeling import GMAIVL
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
        model = None  # free the weights before the next preset (the closures above have run)

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

    from gmaivl_rt.model import ops as K

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
