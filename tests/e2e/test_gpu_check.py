"""gmaivl_rt.gpu_check: the one-shot GPU check's plumbing, run on the CPU under the Triton interpreter at tiny sizes
(--smoke): every autotune config is run on its own and compared with the reference, results are appended as JSON
lines as they come, a spent budget skips the rest, a broken check or a wrong kernel is reported, not fatal."""
import importlib
import json

import torch

from gmaivl_rt import gpu_check


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_smoke_run_passes_and_covers_every_config(tmp_path):
    code = gpu_check.main(["--smoke", "--out", str(tmp_path), "--budget", "900"])
    rows = _lines(tmp_path / "gpu_check.jsonl")
    assert rows[0]["check"] == "header" and rows[0]["smoke"] is True
    bad = [r for r in rows if r["status"] in ("fail", "error")]
    assert not bad and code == 0, bad
    assert [r["priority"] for r in rows] == sorted(r["priority"] for r in rows)
    assert {r["check"] for r in rows if r["status"] == "pass"} >= {"configs", "determinism", "scale", "model",
                                                                   "throughput"}
    att = importlib.import_module("gmaivl_rt.kernels.attention")
    dec = importlib.import_module("gmaivl_rt.kernels.decode_attention")
    proj = importlib.import_module("gmaivl_rt.kernels.projector")
    pe = importlib.import_module("gmaivl_rt.kernels.patch_embed")
    swept = {}
    for r in rows:
        if r["check"] == "configs":
            swept.setdefault(r["kernel"], []).append(r["config_index"])
    want = {"attention_fwd causal": att.FWD_CONFIGS, "attention_bwd_dkdv causal": att.BWD_DKDV_CONFIGS,
            "attention_bwd_dq causal": att.BWD_DQ_CONFIGS, "decode_attention_split": dec.SPLIT_CONFIGS,
            "projector_matmul": proj.GEMM_CONFIGS, "patch_embed_fwd": pe._FWD_CONFIGS,
            "patch_embed_dweight": pe._DWEIGHT_CONFIGS}
    assert swept == {name: list(range(len(configs))) for name, configs in want.items()}
    # Under the interpreter a config differing from an earlier one only in num_warps / num_stages runs as that one;
    # every distinct set of block sizes still runs.
    for name, configs in want.items():
        kernel_rows = {r["config_index"]: r for r in rows if r["check"] == "configs" and r["kernel"] == name}
        ran = {gpu_check.interpreter_key(configs[i]) for i, r in kernel_rows.items() if r["status"] == "pass"}
        assert ran == {gpu_check.interpreter_key(c) for c in configs}, name
        for i, r in kernel_rows.items():
            if r["status"] == "skipped":
                assert kernel_rows[r["same_as"]]["status"] == "pass", r
                assert gpu_check.interpreter_key(configs[r["same_as"]]) == gpu_check.interpreter_key(configs[i])


def test_interpreter_key_keeps_blocks_and_drops_warps_and_stages():
    assert gpu_check.interpreter_key((128, 32, 8, 3)) == gpu_check.interpreter_key((128, 32, 4, 2)) == (128, 32)
    assert gpu_check.interpreter_key((64, 32, 8, 3)) != gpu_check.interpreter_key((128, 32, 8, 3))
    a = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3)
    assert gpu_check.interpreter_key(a) == gpu_check.interpreter_key({**a, "num_warps": 4})
    assert gpu_check.interpreter_key(a) != gpu_check.interpreter_key({**a, "BLOCK_N": 128})
    C = importlib.import_module("gmaivl_rt.kernels.attention").AttentionConfig
    assert gpu_check.interpreter_key(C(128, 32, 8, 3)) == gpu_check.interpreter_key(C(128, 32, 4, 2))
    assert gpu_check.interpreter_key(C(128, 64, 4, 3)) != gpu_check.interpreter_key(C(128, 64, 4, 3, max_head_dim=64))


def test_forced_config_is_the_one_launched(monkeypatch):
    """forced_config pins the config a launcher takes (the sweep's premise)."""
    from gmaivl_rt.kernels import _dispatch

    att = importlib.import_module("gmaivl_rt.kernels.attention")
    assert _dispatch.pick_config(att.FWD_CONFIGS) == att.FWD_CONFIGS[0]
    with _dispatch.forced_config(att.FWD_CONFIGS, 2):
        assert _dispatch.pick_config(att.FWD_CONFIGS) == att.FWD_CONFIGS[2]
        assert _dispatch.config_forced(att.FWD_CONFIGS) and not _dispatch.config_forced(att.BWD_DQ_CONFIGS)
        assert _dispatch.pick_config(att.BWD_DQ_CONFIGS) == att.BWD_DQ_CONFIGS[0]
    assert _dispatch.pick_config(att.FWD_CONFIGS) == att.FWD_CONFIGS[0]


def test_a_wrong_result_fails_and_a_broken_check_errors_without_stopping(tmp_path, monkeypatch):
    from gmaivl_rt.model import ops as kernels

    real = kernels.rms_norm_reference
    monkeypatch.setattr(kernels, "rms_norm_reference", lambda x, w, eps: real(x, w, eps) + 0.01)
    monkeypatch.setattr(kernels, "decode_attention_reference", lambda *a, **k: 1 / 0)
    rec = gpu_check.Recorder(tmp_path / "out.jsonl", budget_s=600)
    gpu_check.check_scale(rec, gpu_check.SMOKE)
    rows = {r["case"]: r for r in _lines(tmp_path / "out.jsonl")}
    assert rows["rms_norm"]["status"] == "fail" and rows["rms_norm"]["errors"]["tail rows"] > 1e-3
    assert rows["decode"]["status"] == "error" and "ZeroDivisionError" in rows["decode"]["error"]
    assert rows["loss head"]["status"] == rows["attention"]["status"] == "pass"


def test_unwritten_output_shows_as_nan_and_fails():
    result = gpu_check.compare({"out": (torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]))}, 1e-3)
    assert not result["ok"] and result["errors"]["out"] != result["errors"]["out"]


def test_spent_budget_skips_every_check_but_still_reports(tmp_path):
    rows = gpu_check.run(tmp_path, budget_s=0, smoke=True)
    assert len(rows) > 10 and all(r["status"] == "skipped" for r in rows[1:])
    assert _lines(tmp_path / "gpu_check.jsonl") == json.loads(json.dumps(rows, default=str))


def test_without_a_gpu_nothing_runs_and_the_reason_is_recorded(tmp_path, monkeypatch, capsys):
    """`make gpu-check` on a machine without CUDA: exit status 0, one "skipped" line naming the reason and the
    checks it covers (the decode check among them). Mutant: main going on to `run` (its RuntimeError), seen
    failing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path), "--budget", "60"]) == 0
    (row,) = _lines(tmp_path / "gpu_check.jsonl")
    assert row["status"] == "skipped" and "no CUDA device" in row["reason"] and row["reason"] == gpu_check.NO_GPU
    assert "check_decode" in row["checks"] and len(row["checks"]) == len(gpu_check.CHECKS)
    assert "skipped: no CUDA device" in capsys.readouterr().out


def test_decode_check_smoke_reports_every_side(tmp_path):
    """The decode check (issue 29's GPU decode benchmark) at smoke sizes on the CPU: the eager engine and
    transformers + SDPA each decoded and timed, their ratio, and the compiled side skipped with the reason (it runs
    on a GPU). Mutant: a side's rate left out of the report (the eager engine's), seen failing."""
    rec = gpu_check.Recorder(tmp_path / "out.jsonl", budget_s=600)
    gpu_check.check_decode(rec, gpu_check.SMOKE)
    (row,) = _lines(tmp_path / "out.jsonl")
    assert row["check"] == "decode" and row["priority"] == 6 and row["status"] == "pass", row
    preset, rows, new_tokens, _ = gpu_check.SMOKE.decode
    assert (row["preset"], row["rows"], row["new_tokens"]) == (preset, rows, new_tokens)
    assert set(row["decode_tokens_per_s"]) == {"eager", "transformers_sdpa"}
    assert all(v > 0 for v in row["decode_tokens_per_s"].values())
    low, high = row["decode_tokens_per_s_range"]["eager"]
    assert low <= row["decode_tokens_per_s"]["eager"] <= high
    assert row["eager_vs_transformers"] > 0 and row["compiled"].startswith("skipped: ")
