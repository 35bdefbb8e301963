"""GPU readiness: every kernel's default config compiles for sm_80 and sm_90 without register spills, within the
shared-memory limits, and GEMM-bearing kernels use tensor cores. The compiles run ahead of time (no GPU needed),
in a child process because this session interprets Triton; the report is built once per test session."""
import json
import os
from pathlib import Path

import pytest

from gmaivl_rt.kernels import report

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
