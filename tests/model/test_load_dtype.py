"""The dtype `gmaivl_rt.load` puts weights in: on CUDA with no dtype given an fp32 checkpoint loads in bf16 (fp16
before sm_80), an explicit dtype wins, CPU keeps what is stored. Checked on CPU: the policy takes the device and the
GPU's capability as arguments, and the torch backend's wiring is checked with the loader recording what it got."""
import pytest
import torch

from gmaivl_rt import GMAIVL, GMAIVLConfig
from gmaivl_rt.model.checkpoint import inference_dtype, stored_float_dtype
from gmaivl_rt.runtime.torch_backend import TorchBackend

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.mark.parametrize("device, stored, capability, want", [
    ("cuda", F32, (9, 0), BF16), ("cuda:1", F32, (8, 0), BF16), (torch.device("cuda", 0), F32, (8, 6), BF16),
    ("cuda", F32, (7, 5), F16), ("cuda", torch.float64, (9, 0), BF16),
    ("cuda", BF16, (9, 0), None), ("cuda", F16, (7, 0), None),            # 16-bit checkpoints load as stored
    ("cpu", F32, None, None), (None, F32, None, None),                    # CPU keeps fp32
])
def test_default_dtype_by_device_and_checkpoint(device, stored, capability, want):
    assert inference_dtype(device, stored=stored, capability=capability) == want


@pytest.mark.parametrize("explicit", [F32, F16, BF16])
def test_an_explicit_dtype_wins(explicit):
    assert inference_dtype("cuda", explicit, stored=F32, capability=(9, 0)) == explicit


def test_stored_float_dtype_reads_the_headers(tmp_path):
    model = GMAIVL(GMAIVLConfig.preset("tiny"))
    model.save_pretrained(tmp_path / "fp32")
    model.to(BF16).save_pretrained(tmp_path / "bf16")
    assert stored_float_dtype(tmp_path / "fp32") == F32 and stored_float_dtype(tmp_path / "bf16") == BF16


def test_torch_backend_on_cuda_loads_an_fp32_checkpoint_in_bf16(tmp_path, monkeypatch):
    GMAIVL(GMAIVLConfig.preset("tiny")).save_pretrained(tmp_path)
    asked, load_on_cpu = [], GMAIVL.from_pretrained

    def record(path, dtype=None, device=None):  # no GPU here: remember what was asked, load on the CPU
        asked.append((dtype, device))
        return load_on_cpu(path, dtype=dtype)

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(GMAIVL, "from_pretrained", staticmethod(record))
    backend = TorchBackend(tmp_path, device="cuda")
    assert asked[-1] == (BF16, "cuda") and backend.model.lm_head.weight.dtype == BF16
    TorchBackend(tmp_path, device="cuda", dtype=F32)
    assert asked[-1] == (F32, "cuda")
    TorchBackend(tmp_path)
    assert asked[-1] == (None, None)
