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
  5. throughput   autotuning on: first call (compile + tune) time, steady time against the reference, the winners;
  6. decode       decode tokens/s at batch 16 (issue 29): the engine's compiled decode step (CUDA graphs) against
                  the eager engine and transformers' generate with SDPA, the compact preset (decode_checks.py).
A check whose turn comes after the budget is spent is recorded as "skipped". `--smoke` runs the same plumbing at
tiny sizes on the CPU under the Triton interpreter (what CI runs); there a config that differs from an earlier one
only in num_warps / num_stages, which the interpreter ignores, is recorded as skipped with "same_as" naming it.
Exit status 1 when any check failed or errored. Without a CUDA device (and without --smoke) nothing runs: one
"skipped" line says why, exit status 0. Each line: {"check", "priority", "status": pass|fail|error|skipped, "seconds", ...measurements}.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from gmaivl_rt.gpu_check.decode_checks import check_decode
from gmaivl_rt.gpu_check.kernel_checks import check_configs, check_determinism, check_scale
from gmaivl_rt.gpu_check.model_checks import check_model, check_throughput
from gmaivl_rt.gpu_check.recording import FULL, SMOKE, Recorder
from gmaivl_rt.processes import ends_with_parent

CHECKS = (check_configs, check_determinism, check_scale, check_model, check_throughput, check_decode)
NO_GPU = ("no CUDA device here (torch.cuda.is_available() is False): the GPU checks need one; --smoke runs their "
          "plumbing on the CPU under the Triton interpreter")


def record_no_gpu(out_dir: str | Path) -> dict:
    """The one line a run without a CUDA device writes: every check skipped, and why."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    row = {"check": "all", "priority": 0, "status": "skipped", "seconds": 0.0, "reason": NO_GPU,
           "checks": [check.__name__ for check in CHECKS], "torch": torch.__version__,
           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Recorder(out / "gpu_check.jsonl", 0).write(row)
    return row

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
        # the re-run ends with this process (kill -9 included)
        return subprocess.run([sys.executable, "-m", "gmaivl_rt.gpu_check", *(argv or sys.argv[1:])],
                              env=env, **ends_with_parent()).returncode
    if not args.smoke and not torch.cuda.is_available():
        record_no_gpu(args.out)
        print(f"gpu_check: skipped: {NO_GPU} -> {Path(args.out) / 'gpu_check.jsonl'}")
        return 0
    rows = run(args.out, args.budget, args.smoke)
    counts = {s: sum(r["status"] == s for r in rows[1:]) for s in ("pass", "fail", "error", "skipped")}
    print(f"gpu_check: {counts} -> {Path(args.out) / 'gpu_check.jsonl'}")
    for r in rows[1:]:
        if r["status"] in ("fail", "error"):
            label = " ".join(str(r[k]) for k in ("kernel", "config", "case", "model") if k in r)
            print(f"  {r['status'].upper()} {r['check']} {label}: {r.get('error') or r.get('errors') or ''}")
    return 1 if counts["fail"] or counts["error"] else 0


