"""Nothing on stderr that a user did not cause: Triton's FP_FUSION default warning and transformers' batch_decode
deprecation stay silent, checked in a fresh process where each would otherwise show."""
import os
import sys
from pathlib import Path

SUPPORT = Path(__file__).resolve().parents[1] / "support"

_QUIET_SCRIPT = r"""
import sys, tempfile, warnings
warnings.simplefilter("always")  # show every warning once raised, so none hides behind a filter of ours
import torch
from gmaivl_rt.runtime.tokenizer import load_tokenizer
from train_fixtures import make_tiny_chat_model  # tests/support, on PYTHONPATH
folder = make_tiny_chat_model(tempfile.mkdtemp(), ["a short text to learn from"] * 20, vocab_size=280)
tokenizer = load_tokenizer(folder)
# 1. a kernel compile asks Triton whether FP fusion is on (what `kernels report` does for every kernel)
import gmaivl_rt.kernels
from triton import knobs
assert knobs.language.fp_fusion_enabled(None)
# 2. decode of one 1-D sequence
import gmaivl_rt
vlm = gmaivl_rt.load(folder)
ids = tokenizer.encode("a short text", add_special_tokens=False)
assert vlm.decode(torch.tensor(ids)) == vlm.decode([ids]) == vlm.decode(ids) == [tokenizer.decode(ids)]
print("ok")
"""


def test_kernels_and_decode_are_quiet():
    """Triton's FP_FUSION default warning and decode of a 1-D sequence (transformers' batch_decode deprecation)
    print nothing, in a fresh process where each would. (`export onnx`: tests/e2e/test_readme_quickpaths.py.)"""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_DEFAULT_FP_FUSION", "PYTHONWARNINGS")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SUPPORT), env.get("PYTHONPATH")) if p)
    run = subprocess.run([sys.executable, "-c", _QUIET_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
    for noise in ("FP_FUSION", "deprecated"):
        assert noise not in run.stderr, run.stderr[-3000:]
