"""GPU readiness: every kernel's default config compiles for sm_80 and sm_90 without register spills, within the
shared-memory limits, and GEMM-bearing kernels use tensor cores. The compiles run ahead of time (no GPU needed),
in a child process because this session interprets Triton; the report is built once per test session. The specs
the report compiles are the launches the ops make (num_stages included)."""
import json
import os
from pathlib import Path

import pytest
import torch

from gmaivl_rt.kernels import report
from gmaivl_rt.kernels._dispatch import kernels
from gmaivl_rt.kernels.attention import attention

ARCHS = (80, 90)


@pytest.fixture(scope="module")
def default_rows():
    return report.build_report(ARCHS, defaults_only=True, progress=False)


def _describe(rows):
    return "\n".join(f"{r['kernel']} [{r['config']}] sm_{r['arch']}: {'; '.join(r['problems'])}" for r in rows)


def test_report_covers_every_kernel_module(default_rows):
    kernel_files = {p.stem for p in Path(report.__file__).parent.glob("*.py")
                    if not p.stem.startswith("_") and p.stem != "report"}
    assert kernel_files == set(report.KERNEL_MODULES), "kernels/ and report.KERNEL_MODULES disagree"
    missing = [r for r in default_rows if r["arch"] is None]
    assert not missing, "kernel modules without report specs:\n" + "\n".join(
        f"{r['module']}: {r['error']}" for r in missing)
    assert {r["module"] for r in default_rows} == set(report.KERNEL_MODULES)


def test_every_default_config_compiles_for_both_archs(default_rows):
    compiled = [r for r in default_rows if r["arch"] is not None]
    failed = [r for r in compiled if r["error"]]
    assert not failed, _describe(failed)
    for kernel in {r["kernel"] for r in compiled}:
        assert sorted(r["arch"] for r in compiled if r["kernel"] == kernel) == list(ARCHS), kernel


def test_default_configs_do_not_spill(default_rows):
    spilling = [r for r in default_rows if r["arch"] is not None and not r["error"] and r["spill_bytes"]]
    assert not spilling, _describe(spilling)


def test_default_configs_fit_shared_memory(default_rows):
    too_big = [r for r in default_rows if r["arch"] is not None and not r["error"]
               and r["shared_bytes"] > {80: 163 * 1024, 90: 227 * 1024}[r["arch"]]]
    assert not too_big, _describe(too_big)


def test_gemm_kernels_use_tensor_cores(default_rows):
    gemms = [r for r in default_rows if r["arch"] is not None and not r["error"] and r["uses_dot"]]
    # attention, patch embedding, projector and the fused cross-entropy all carry GEMMs
    assert {r["module"] for r in gemms} >= {"attention", "patch_embed", "projector", "fused_linear_cross_entropy"}
    without = [r for r in gemms if not (r["mma"] > 0 if r["arch"] == 80 else r["mma"] + r["wgmma"] > 0)]
    assert not without, _describe(without)


def _attention_tensor_core_problems(rows):
    """Attention rows on sm_90 without wgmma (its products have >= 64 rows: mma.sync there leaves Hopper idle)."""
    return [r for r in rows if r["module"] == "attention" and r["arch"] == 90 and r["uses_dot"] and not r["wgmma"]]


def _offered_archs_by_config():
    """{(kernel, config): archs} of every attention config the kernel file offers to some archs or head dims only,
    straight from its config lists (AttentionConfig.archs via report_specs)."""
    import importlib

    attention = importlib.import_module("gmaivl_rt.kernels.attention")
    return {(s.kernel, s.config): set(s.archs) for s in attention.report_specs() if report.restricted(s)}


@pytest.fixture(scope="module")
def restricted_attention_rows():
    return report.build_report(ARCHS, modules=("attention",), restricted_only=True, progress=False)


def test_arch_filtered_attention_tiles_are_clean_on_their_archs(restricted_attention_rows):
    """Each attention config offered to some archs or head dims only (the sm_90 tiles, the head-dim-64 tile) is
    compiled for exactly the archs it is offered to, at the largest head dim it is offered at, and is spill-free,
    within shared memory and on tensor cores there (wgmma on sm_90). Mutant: the report's `arch in spec.archs`
    filter dropped (every config compiled for both archs): the sm_90 tiles then get sm_80 rows, where they spill
    (the 128x128 forward tile: 40 B of stack), and this fails."""
    rows = [r for r in restricted_attention_rows if r["arch"] is not None]
    compiled = {}
    for r in rows:
        compiled.setdefault((r["kernel"], r["config"]), set()).add(r["arch"])
    offered = _offered_archs_by_config()
    assert {90} in offered.values() and compiled == offered
    broken = [r for r in rows if r["problems"]] + _attention_tensor_core_problems(rows)
    assert not broken, _describe(broken)


def test_default_attention_configs_use_wgmma_on_sm90(default_rows):
    without = _attention_tensor_core_problems(default_rows)
    assert not without, _describe(without)


def test_every_kernel_has_a_roofline(default_rows):
    for r in default_rows:
        if r["arch"] is None or r["error"]:
            continue
        assert r["shape"] and r["flops"] >= 0 and r["bytes"] > 0, r["kernel"]
        assert r["h100_us"] < r["a100_us"], r["kernel"]  # H100 beats A100 on both roofs


def test_cli_prints_table_and_writes_json(default_rows, tmp_path, capsys):
    from gmaivl_rt.cli import main

    out = tmp_path / "report.json"
    code = main(["kernels", "report", "--json", str(out), "--arch", "80,90", "--defaults-only", "--no-progress"])
    printed = capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["archs"] == [80, 90]
    assert [(r["kernel"], r["arch"]) for r in written["rows"]] == [(r["kernel"], r["arch"]) for r in default_rows]
    assert "kernel" in printed and "wgmma" in printed and "Roofline" in printed
    assert code == (1 if any(r["problems"] and r["default"] is not False for r in default_rows) else 0)


def test_parse_resource_usage_reads_cuobjdump_format():
    text = ("\nResource usage:\n Common:\n  GLOBAL:0\n Function _patch_embed_fwd_kernel:\n"
            "  REG:203 STACK:16 SHARED:1024 LOCAL:8 CONSTANT[0]:456 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    assert report.parse_resource_usage(text, "_patch_embed_fwd_kernel") == {
        "registers": 203, "stack": 16, "shared": 1024, "local": 8}
    with pytest.raises(ValueError, match="no 'Function"):
        report.parse_resource_usage("Resource usage:\n Common:\n  GLOBAL:0\n")


def test_count_tensor_core_instructions_counts_instructions_not_mentions():
    ptx = "\n".join([
        "\t// wgmma and mma in a comment do not count",
        "\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%r1}, {%r2}, {%r3}, {%r1};",
        "\t@%p1 mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%r1}, {%r2}, {%r3}, {%r1};",
        "\twgmma.fence.sync.aligned;",
        "\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r1}, %rd1, %rd2, 0, 1, 1, 0, 1;",
        "\twgmma.commit_group.sync.aligned;",
    ])
    assert report.count_tensor_core_instructions(ptx) == (2, 1)


def test_modules_without_specs_are_reported_not_fatal():
    specs, missing = report.collect_specs(("patch_embed", "no_such_kernel"))
    assert {module for module, _ in specs} == {"patch_embed"}
    assert list(missing) == ["no_such_kernel"] and missing["no_such_kernel"].startswith("import failed")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("GMAIVL_FULL_REPORT") != "1",
                    reason="compiles ~220 configs (~20 min on 2 cores): GMAIVL_FULL_REPORT=1, or `make report`")
def test_every_autotune_config_compiles_within_limits():
    """All candidates and variants, not only the defaults: the autotuner may pick any of them on a real GPU."""
    rows = [r for r in report.build_report(ARCHS, progress=False) if r["arch"] is not None]
    broken = [r for r in rows if r["error"] or r["shared_bytes"] > {80: 163 * 1024, 90: 227 * 1024}[r["arch"]]
              or (r["uses_dot"] and r["mma"] + r["wgmma"] == 0)]
    assert not broken, _describe(broken)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("GMAIVL_FULL_REPORT") != "1",
                    reason="compiles every attention config and variant (~100 compiles, ~10 min on 2 cores): "
                           "GMAIVL_FULL_REPORT=1, or `gmaivl-rt kernels report --module attention`")
def test_every_attention_config_is_clean_on_its_archs():
    """Every attention autotune config, on each arch it is offered to: spill-free (unlike the all-kernel check above,
    which allows spilling non-defaults), within shared memory, on tensor cores (wgmma on sm_90)."""
    rows = [r for r in report.build_report(ARCHS, modules=("attention",), progress=False) if r["arch"] is not None]
    broken = [r for r in rows if r["problems"]] + _attention_tensor_core_problems(rows)
    assert not broken, _describe(broken)


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
