"""The auto mode's routing on CUDA (fp32 and unsupported head dims take the reference), decided by a pure function
so it is checked here without a GPU, and the forced triton mode's refusal of unsupported head dims."""
import os
import sys

import pytest
import torch

from gmaivl_rt.kernels import _dispatch
from gmaivl_rt.kernels._dispatch import kernels
from gmaivl_rt.kernels.attention import attention
from gmaivl_rt.kernels.decode_attention import decode_attention


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gemm_ops_take_triton_on_cuda(dtype):
    assert _dispatch.reference_reason("cuda", dtype, gemm=True) is None
    assert _dispatch.reference_reason("cuda", dtype, gemm=True, head_dim=128) is None
    assert _dispatch.reference_reason("cuda", dtype, gemm=True, head_dim=80) is None


def test_fp32_gemm_ops_take_the_reference_on_cuda_but_row_ops_do_not():
    assert "fp32" in _dispatch.reference_reason("cuda", torch.float32, gemm=True)
    assert _dispatch.reference_reason("cuda", torch.float32) is None  # rms_norm, rope, swiglu: no tiles to spill


@pytest.mark.parametrize("head_dim", [256, 160, 136])
def test_unsupported_head_dims_take_the_reference_on_cuda(head_dim):
    reason = _dispatch.reference_reason("cuda", torch.bfloat16, gemm=True, head_dim=head_dim)
    assert reason and f"head_dim {head_dim}" in reason and "128" in reason


def test_cpu_takes_the_reference():
    assert _dispatch.reference_reason("cpu", torch.bfloat16, gemm=True) == "not a CUDA tensor"


def test_autocast_dtype_decides_under_autocast():
    x = torch.randn(2, 2)
    assert _dispatch.compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _dispatch.compute_dtype(x) == torch.bfloat16


def test_auto_mode_routes_by_the_policy(monkeypatch):
    """use_triton in auto mode asks reference_reason with the op's compute dtype and head dim (CUDA faked: the
    tensors' is_cuda is all this machine lacks)."""
    seen = []
    monkeypatch.setattr(_dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(_dispatch, "reference_reason",
                        lambda device, dtype, **kw: seen.append((device, dtype, kw)) or "no")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with kernels("auto"):
        assert not _dispatch.use_triton(torch.randn(2).half(), gemm=True, head_dim=64)
    assert seen == [("cuda", torch.float16, {"gemm": True, "head_dim": 64})]


@pytest.mark.parametrize("head_dim", [256, 136])
def test_forced_triton_refuses_unsupported_head_dims_clearly(head_dim):
    q = torch.randn(1, 3, 2, head_dim)
    with kernels("triton"), pytest.raises(ValueError, match=f"head_dim {head_dim} is not supported"):
        attention(q, q, q)
    with kernels("triton"), pytest.raises(ValueError, match=f"head_dim {head_dim} is not supported"):
        decode_attention(q[:, 0], q, q, torch.tensor([3], dtype=torch.int32))
    with kernels("auto"):  # on CPU: the reference, whatever the head dim
        torch.testing.assert_close(attention(q, q, q), torch.nn.functional.scaled_dot_product_attention(
            *(q.transpose(1, 2),) * 3).transpose(1, 2))


# ---- survivors of `make mutate` on kernels/_dispatch.py (docs/mutation/mutation-report.md): each test names its mutants


def test_head_dim_bounds():
    """128 is the largest supported head dim, 0 and negatives are not (mutants: MAX_HEAD_DIM 127 / 129,
    `0 < head_dim <= MAX` -> `0 != head_dim <= MAX`, `0 is not head_dim`, `head_dim < MAX`)."""
    assert _dispatch.unsupported_head_dim(128) is None and _dispatch.unsupported_head_dim(8) is None
    for head_dim in (129, 0, -8):
        assert f"head_dim {head_dim} is not supported" in _dispatch.unsupported_head_dim(head_dim)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Tensors report is_cuda and triton imports: what auto mode on a GPU machine sees."""
    monkeypatch.setattr(_dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))


def test_use_triton_per_mode_on_cpu(monkeypatch):
    """CPU tensors: torch and auto take the reference, triton takes the kernel under the interpreter and is refused
    clearly without it (mutants: `mode == "torch"` -> `<` / `is`, its `return False` -> True, `not on_cuda and not
    interpreting()` negated)."""
    x = torch.randn(4).half()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for mode, want in (("torch", False), ("auto", False), ("triton", True)):
        with kernels(mode):
            assert _dispatch.use_triton(x) is want, mode
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with kernels("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _dispatch.use_triton(x)


def test_use_triton_auto_on_cuda(fake_cuda, monkeypatch):
    """Auto mode on CUDA: 16-bit GEMM ops take Triton, the first tensor's (the activation's) dtype decides, and
    without triton everything takes the reference (mutants: `on_cuda and triton_available()` -> `or`, the `not`
    dropped or doubled, `return False` -> True, `is None` -> `is not None`, `tensors[0]` -> `tensors[-1]`, the
    default `gemm=False` -> True)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    half, single = torch.randn(4).half(), torch.randn(4)
    with kernels("auto"):
        assert _dispatch.use_triton(half, single, gemm=True, head_dim=64) is True
        assert _dispatch.use_triton(single, half, gemm=True) is False
        assert _dispatch.use_triton(half, head_dim=256) is False
        assert _dispatch.use_triton(single) is True  # fp32 row ops (no GEMM) take Triton on CUDA
        with kernels("triton"):  # forced: no interpreter needed on CUDA
            assert _dispatch.use_triton(single, gemm=True) is True
        monkeypatch.setattr(_dispatch, "triton_available", lambda: False)
        assert _dispatch.use_triton(half, gemm=True) is False
        with kernels("triton"), pytest.raises(RuntimeError, match="triton cannot be imported"):
            _dispatch.use_triton(half)


def test_triton_available_is_false_when_the_import_fails(monkeypatch):
    """A failed `import triton` means no Triton, not an exception (mutant: `except Exception` narrowed)."""
    _dispatch.triton_available.cache_clear()
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    try:
        assert _dispatch.triton_available() is False
    finally:
        _dispatch.triton_available.cache_clear()


def test_kernels_context_restores_the_environment(monkeypatch):
    """`kernels(mode)` restores GMAIVL_KERNELS as it was: unset or set (mutants: `if old is None` negated)."""
    monkeypatch.delenv("GMAIVL_KERNELS", raising=False)
    with kernels("torch"):
        assert os.environ["GMAIVL_KERNELS"] == "torch"
    assert "GMAIVL_KERNELS" not in os.environ
    monkeypatch.setenv("GMAIVL_KERNELS", "triton")
    with kernels("torch"):
        assert _dispatch.kernel_mode() == "torch"
    assert os.environ["GMAIVL_KERNELS"] == "triton"
    with pytest.raises(ValueError, match="kernel mode 'gpu'"):
        with kernels("gpu"):
            pass


def test_forced_config_picks_bounds_and_nests():
    """pick_config takes the default (index 0) unless forced_config pins another; the index must be inside the
    list; nesting restores the outer pin (mutants: default_index 1, each comparison of the bounds check (`<` ->
    `!=` / `is not` let len + 1 through), `if old is None` negated, the contextmanager decorator removed)."""
    configs = ["a", "b", "c"]
    assert _dispatch.pick_config(configs) == "a" and not _dispatch.config_forced(configs)
    with _dispatch.forced_config(configs, 2) as picked:
        assert picked == "c" and _dispatch.pick_config(configs) == "c" and _dispatch.config_forced(configs)
        with _dispatch.forced_config(configs, 0):
            assert _dispatch.pick_config(configs) == "a"
        assert _dispatch.pick_config(configs) == "c"
    assert _dispatch.pick_config(configs) == "a" and not _dispatch.config_forced(configs)
    for index in (1, 0, len(configs) - 1):
        with _dispatch.forced_config(configs, index):
            assert _dispatch.pick_config(configs) == configs[index]
    for index in (-1, len(configs), len(configs) + 1):
        with pytest.raises(ValueError, match=f"config index {index} is outside the 3 configs"):
            with _dispatch.forced_config(configs, index):
                pass


def test_only_cuda_devices_are_cuda():
    """Any device type but "cuda" is not CUDA, whichever string object names it (mutants: `!= "cuda"` -> `<`,
    which lets "mps" through, or `is not`, which refuses a "cuda" built at run time)."""
    assert _dispatch.reference_reason("mps", torch.bfloat16) == "not a CUDA tensor"
    assert _dispatch.reference_reason("".join(["cu", "da"]), torch.bfloat16) is None
