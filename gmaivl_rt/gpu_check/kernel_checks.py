"""Checks 1-3: every autotune config on its own, determinism, and scale (sizes the CPU cannot reach)."""
from __future__ import annotations

import torch

from gmaivl_rt.gpu_check.recording import (SMOKE, Recorder, Sizes, compare, forward_backward, poison_free_memory,
                                            triton_and_reference)


# ----------------------------------------------------------------------------------------------------------------
# 1. every autotune config on its own
# ----------------------------------------------------------------------------------------------------------------
def _config_cases(sz: Sizes):
    """(kernel name, config list, op, reference, inputs) for every autotuned kernel."""
    import importlib

    from gmaivl_rt.model import ops as K

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


def offered_inputs(config, configs, inputs, device: str):
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
            inputs, not_offered = offered_inputs(config, configs, case_inputs, sz.device)
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
                    got, want = triton_and_reference(fn, reference, inputs)
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
                first, second = forward_backward(fn, inputs), forward_backward(fn, inputs)
            return {"ok": all(torch.equal(a, b) for a, b in zip(first, second))}
        rec.run("determinism", 2, twice, kernel=name)


def check_scale(rec: Recorder, sz: Sizes) -> None:
    from gmaivl_rt.model import ops as K

    dev, dt = sz.device, sz.dtype

    def loss_head():
        n, h, v = sz.loss_head
        hidden = torch.randn(n, h, device=dev).to(dt)
        weight = (torch.randn(v, h, device=dev) / h ** 0.5).to(dt)
        labels = torch.randint(0, v, (n,), device=dev)
        got, want = triton_and_reference(lambda h, w: K.fused_linear_cross_entropy(h, w, labels)[None],
                           lambda h, w: K.fused_linear_cross_entropy_reference(h, w, labels)[None], [hidden, weight])
        return compare({"loss": (got[0], want[0]), "grad_hidden": (got[1], want[1]),
                        "grad_weight": (got[2], want[2])}, sz.tolerance)

    def long_attention():
        t, hq, hkv, d = sz.long_attention
        cu = torch.tensor([0, t], dtype=torch.int32, device=dev)
        qkv = [torch.randn(t, h, d, device=dev).to(dt) for h in (hq, hkv, hkv)]
        got, want = triton_and_reference(lambda q, k, v: K.attention(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=t),
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
