"""Test-wide set-up. The Triton interpreter must be switched on before triton is first imported."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def triton_path(monkeypatch):
    """Force the Triton kernels (interpreted on CPU) for the duration of a test."""
    monkeypatch.setenv("GMAIVL_KERNELS", "triton")


@pytest.fixture
def torch_path(monkeypatch):
    """Force the PyTorch references for the duration of a test."""
    monkeypatch.setenv("GMAIVL_KERNELS", "torch")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
