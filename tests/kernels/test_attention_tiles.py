"""Arch-filtered attention tiles: which configs a GPU of a given compute capability autotunes over, and that the CUDA
launcher (and the one-shot GPU check) use exactly those. No GPU here: the CUDA launch path is driven with a stand-in
tensor and a stubbed `torch.cuda.get_device_capability`; whether each config is spill-free on the archs it is
offered to is tests/kernels/test_kernel_report.py's part."""
import importlib

import pytest
import torch

from gmaivl_rt import gpu_check
from gmaivl_rt.kernels._dispatch import MAX_HEAD_DIM, forced_config

att = importlib.import_module("gmaivl_rt.kernels.attention")  # the package's `attention` is the function
LISTS = {"fwd": att.FWD_CONFIGS, "dkdv": att.BWD_DKDV_CONFIGS, "dq": att.BWD_DQ_CONFIGS}
A100, H100 = (8, 0), (9, 0)


@pytest.mark.parametrize("capability, arch", [((8, 0), 80), ((8, 6), 80), ((8, 9), 80), ((9, 0), 90),
                                              ((10, 0), 80), ((12, 0), 80)])
def test_tuned_arch(capability, arch):
    """Only Hopper (9.x) gets the sm_90-checked tiles; any other GPU the sm_80 ones (the smaller footprint)."""
    assert att.tuned_arch(capability) == arch


@pytest.mark.parametrize("name", LISTS)
def test_filter_keeps_the_configs_naming_the_arch_and_head_dim(name):
    configs = LISTS[name]
    for capability, arch in ((A100, 80), (H100, 90)):
        for head_dim in (16, 64, 80, 128):
            offered = att.offered_configs(configs, capability, head_dim)
            assert offered == [c for c in configs if arch in c.archs and head_dim <= c.max_head_dim]
            assert configs[0] in offered  # the default (interpreter, TensorRT plugin) is offered everywhere
    assert configs[0][4:] == att.ALL_ARCHS_AND_HEAD_DIMS and configs[0].max_head_dim == MAX_HEAD_DIM


def test_hopper_gets_its_larger_tiles_and_ampere_does_not():
    """The issue's tiles: sm_90 autotunes over the 128x128 (8 warps) forward tile and a 128-row dq tile with 64-key
    blocks, sm_80 over neither (both spill there: the 128x128 forward at 255 registers and 40 B of stack, bf16 head
    dim 128); sm_80 and sm_90 both get the 128x64 (4 warps) forward tile at head dim 64, neither at 80 or 128 (it
    spills there: BLOCK_D 128). Mutant: the 128x128 tile offered to sm_80 (`archs=(80, 90)`) fails here."""
    def tiles(name, capability, head_dim):
        return {(c.block_m, c.block_n, c.num_warps) for c in att.offered_configs(LISTS[name], capability, head_dim)}

    assert (128, 128, 8) in tiles("fwd", H100, 128) and (128, 128, 8) not in tiles("fwd", A100, 128)
    assert (128, 64, 8) in tiles("dq", H100, 128) and (128, 64, 8) not in tiles("dq", A100, 128)
    for capability in (A100, H100):
        assert (128, 64, 4) in tiles("fwd", capability, 64)
        assert (128, 64, 4) not in tiles("fwd", capability, 80) | tiles("fwd", capability, 128)
    for name in LISTS:  # sm_90 is offered a superset of sm_80's list
        assert tiles(name, A100, 128) < tiles(name, H100, 128)


class _CudaTensor:
    """What `_launch` reads of the tensor it is given, as a CUDA tensor would answer."""
    is_cuda = True
    device = torch.device("cuda", 0)


@pytest.mark.parametrize("capability", [A100, H100], ids=["sm_80", "sm_90"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_launch_autotunes_over_the_offered_configs_only(capability, head_dim, monkeypatch):
    """Mutant: `_autotuner(kernel, tuple(configs))` (every config, whatever the GPU) fails on sm_80."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    launched = []

    class Tuner:  # stands in for triton's Autotuner: `tuner[grid](*args, **constexprs)`
        def __init__(self, kernel, configs):
            self.kernel, self.configs = kernel, configs

        def __getitem__(self, grid):
            return lambda *args, **constexprs: launched.append((self.kernel, self.configs, constexprs))

    monkeypatch.setattr(att, "_autotuner", Tuner)
    monkeypatch.setattr(att, "_LAST_TUNER", {})  # what `best_config` reads: keep the stand-ins out of it
    for kernel, configs in ((att._attn_fwd_kernel, att.FWD_CONFIGS), (att._attn_bwd_dq_kernel, att.BWD_DQ_CONFIGS)):
        att._launch(kernel, configs, lambda bm, bn: (1, 1), _CudaTensor(), HEAD_DIM=head_dim)
        assert launched[-1][:2] == (kernel, tuple(att.offered_configs(configs, capability, head_dim)))
    # the real autotuner gets exactly those block sizes, warps and stages
    monkeypatch.undo()
    offered = tuple(att.offered_configs(att.FWD_CONFIGS, capability, head_dim))
    tuner = att._autotuner(att._attn_fwd_kernel, offered)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in tuner.configs] == \
        [c[:4] for c in offered]


def test_a_forced_config_must_be_offered_to_the_gpu(monkeypatch):
    """The GPU check forces each config in turn; forcing the sm_90 tile on an sm_80 GPU is refused by name."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: A100)
    index = next(i for i, c in enumerate(att.FWD_CONFIGS) if 80 not in c.archs)
    with forced_config(att.FWD_CONFIGS, index), pytest.raises(ValueError, match="not offered to sm_80"):
        att._launch(att._attn_fwd_kernel, att.FWD_CONFIGS, lambda bm, bn: (1, 1), _CudaTensor(), HEAD_DIM=128)


def test_gpu_check_runs_each_attention_config_where_it_is_offered(monkeypatch):
    """On a GPU the config sweep skips a config its arch is not offered (with the reason) and runs a head-dim-limited
    one at its largest head dim; on the CPU (--smoke) every config runs."""
    qkv = [torch.randn(5, 2, 128), torch.randn(5, 1, 128), torch.randn(5, 1, 128)]
    sm90_only = next(c for c in att.FWD_CONFIGS if 80 not in c.archs)
    up_to_64 = next(c for c in att.FWD_CONFIGS if c.max_head_dim == 64)
    for capability in (A100, H100):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        inputs, why = gpu_check.offered_inputs(sm90_only, att.FWD_CONFIGS, qkv, "cuda")
        assert (inputs is None, why) == ((True, "not offered to sm_80") if capability == A100 else (False, None))
        inputs, why = gpu_check.offered_inputs(up_to_64, att.FWD_CONFIGS, qkv, "cuda")
        assert why is None and [t.shape[-1] for t in inputs] == [64] * 3
        assert torch.equal(inputs[0], qkv[0][..., :64])
    assert gpu_check.offered_inputs(sm90_only, att.FWD_CONFIGS, qkv, "cpu") == (qkv, None)
