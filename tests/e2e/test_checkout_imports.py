"""The checkout's top-level kernels/, train/ and export/ folders never take the import name of an installed
distribution, however Python is started in the checkout root (issue 22: transformers imports Hugging Face's
`kernels`, which the folder used to shadow, and every `python -m ...` from the root failed at import).

Each check runs in a fresh process whose working directory is the checkout root: `python -c` and `python -m` put
that directory first on sys.path, as an interactive `python` there does."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _in_root(args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"exit code {run.returncode}; stderr ends with:\n{run.stderr[-3000:]}"
    return run.stdout


def test_hugging_face_kernels_is_the_installed_distribution_from_the_checkout_root(tiny_model_folder):
    """transformers' hub integration imports `kernels` (the distribution it depends on): from the root it must get
    that distribution, and the model must then load with its tokenizer."""
    model = tiny_model_folder(["a chest radiograph", "an axial CT slice"], "m")
    out = _in_root(["-c", f"""
import importlib.metadata, pathlib, kernels, transformers.integrations.hub_kernels, gmaivl_rt
assert hasattr(kernels, "CUDAProperties"), kernels.__file__
assert pathlib.Path(kernels.__file__).resolve().parent != pathlib.Path({str(ROOT / "kernels")!r}), kernels.__file__
print(importlib.metadata.version("kernels"))
model = gmaivl_rt.load({str(model)!r})
print(type(model).__name__, model.tokenizer is not None)
"""])
    version, loaded = out.split("\n")[:2]
    assert version and loaded.endswith("True")


def test_the_cli_starts_from_the_checkout_root():
    assert "usage: gmaivl-rt" in _in_root(["-m", "gmaivl_rt.cli", "--help"])


@pytest.mark.parametrize("name", ["kernels", "train", "export"])
def test_a_top_level_folder_is_ours_only_under_gmaivl_rt(name):
    """`import NAME` from the root never gives the checkout's folder: the installed distribution of that name if
    there is one, else ModuleNotFoundError; `gmaivl_rt.NAME` is the folder."""
    out = _in_root(["-c", f"""
import importlib, pathlib
ours = importlib.import_module("gmaivl_rt.{name}")
print(pathlib.Path(ours.__file__).resolve().parent.name)
try:
    bare = importlib.import_module("{name}")
except ModuleNotFoundError as e:
    print("missing", e.name)
else:
    print("installed", pathlib.Path(bare.__file__).resolve().parent != pathlib.Path({str(ROOT / name)!r}))
"""])
    folder, bare = out.split("\n")[:2]
    assert folder == name
    assert bare in (f"missing {name}", "installed True")
    if name == "kernels":  # a transformers dependency: always installed
        assert bare == "installed True"
