"""TensorRT path. Engines need the `tensorrt` package (>= 10.15, from NVIDIA's index) and a CUDA GPU, neither
available on our CI machines: those tests are skipped there. Everything up to the engine build runs here:
the plugin's kernel (through the Triton interpreter, against the PyTorch reference; fp16 inputs, 2e-3 absolute),
its AOT PTX for sm_80, the plugin node in the exported ONNX graph, profile arithmetic and the error when
TensorRT is absent."""
from __future__ import annotations

import importlib.util
import json

import onnx
import pytest
import torch
import triton

import gmaivl_rt
from gmaivl_rt.export import tensorrt_build
from gmaivl_rt.export.onnx_export import DEPLOY_JSON, GRAPH_FILES
from gmaivl_rt.export.op_inventory import check_graph
from gmaivl_rt.export.profiles import ProfileSizes, Sizes, profile_shapes
from gmaivl_rt.runtime.trt_plugin import (PLUGIN_ID, _attn_fwd_trt, compile_attention_ptx, ptx_entry_params,
                                         strip_hidden_params)
from gmaivl_rt.kernels.attention import _LOG2E, FWD_CONFIGS, attention_reference

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_tensorrt = pytest.mark.skipif(
    not (HAS_TENSORRT and torch.cuda.is_available()),
    reason="needs the tensorrt Python package >= 10.15 (pip install tensorrt-cu12, from NVIDIA's index) and a "
           "CUDA GPU; neither can be installed on the CI machines")


# ------------------------------------------------------------------------------------------ plugin kernel
@pytest.mark.parametrize("causal", [False, True])
def test_plugin_kernel_argument_order_matches_reference(causal):
    """`_attn_fwd_trt` (TensorRT's order: inputs, int args, outputs) under the interpreter vs PyTorch."""
    B, S, H, HKV, D = 2, 37, 4, 2, 16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, S, H, D, generator=g).half()
    k, v = (torch.randn(B, S, HKV, D, generator=g).half() for _ in range(2))
    cu_seqlens = torch.arange(B + 1, dtype=torch.int32) * S
    out, lse = torch.empty_like(q), torch.empty(H, B * S)
    block_m, block_n = FWD_CONFIGS[0][:2]
    _attn_fwd_trt[(B * H, triton.cdiv(S, block_m))](
        q, k, v, cu_seqlens, H, H // HKV, B * S, out, lse, QK_SCALE=D ** -0.5 * _LOG2E, HEAD_DIM=D, BLOCK_D=16,
        BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, UPCAST=False, PRECISION="tf32")
    expected = attention_reference(q.float(), k.float(), v.float(), causal=causal)
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=0)


@pytest.mark.slow
def test_plugin_ptx_for_sm80_has_tensorrts_argument_list():
    kernel = compile_attention_ptx("fp16", 64, False)
    assert ".target sm_80" in kernel.ptx and f".entry {kernel.name}(" in kernel.ptx
    params = ptx_entry_params(kernel.ptx, kernel.name)
    # q, k, v, cu_seqlens | NUM_HEADS, GROUP, TOTAL_Q | out, lse; Triton's hidden scratch pointers removed
    kinds = ["u32" if ".u32" in p else "ptr" for p in params]
    assert kinds == ["ptr"] * 4 + ["u32"] * 3 + ["ptr"] * 2
    assert "mma.sync" in kernel.ptx  # tensor cores
    assert kernel.num_warps * 32 > 0 and kernel.shared_bytes > 0 and kernel.block_m == FWD_CONFIGS[0][0]


def test_strip_hidden_params_refuses_used_scratch():
    ptx = (".visible .entry k(\n\t.param .u64 .ptr .global .align 1 k_param_0,\n\t.param .u32 k_param_1,\n"
           "\t.param .u64 .ptr .global .align 1 k_param_2\n)\n{\n\tld.param.u32 %r1, [k_param_1];\n}\n")
    stripped = strip_hidden_params(ptx, "k", 2)
    assert ptx_entry_params(stripped, "k") == [".param .u64 .ptr .global .align 1 k_param_0", ".param .u32 k_param_1"]
    with pytest.raises(RuntimeError, match="reads hidden parameter k_param_1"):
        strip_hidden_params(ptx, "k", 1)


# ------------------------------------------------------------------------------------------ plugin in ONNX
def test_plugin_graph_structure(exported):
    folder = exported("plugin")
    model = onnx.load(str(folder / GRAPH_FILES["vision_encoder"]))
    onnx.checker.check_model(model)
    nodes = [n for n in model.graph.node if n.op_type == "flash_attention"]
    assert len(nodes) == 2  # one per encoder layer used (3 layers, feature layer -2)
    assert not [n for n in model.graph.node if n.op_type == "Attention"]
    head_dim = 16
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == "gmaivl"
        assert attrs["plugin_namespace"] == b"gmaivl" and attrs["aot"] == 1 and attrs["causal"] == 0
        assert attrs["softmax_scale"] == pytest.approx(head_dim ** -0.5)
        assert len(node.input) == 4 and len(node.output) == 2
    assert any(o.domain == "gmaivl" for o in model.opset_import)
    assert check_graph(model, plugins={PLUGIN_ID}).ok
    assert not check_graph(model).ok  # without the plugin registered TensorRT would reject it
    deploy = json.loads((folder / DEPLOY_JSON).read_text())
    assert deploy["attention"] == "trt_plugin" and deploy["dtype"] == "fp16"


def test_onnx_backend_refuses_plugin_graphs(exported):
    with pytest.raises(ValueError, match="only TensorRT runs"):
        gmaivl_rt.load(exported("plugin"), backend="onnx")


# ------------------------------------------------------------------------------------------ profiles
def test_profile_shapes_from_the_deploy_json(exported):
    deploy = json.loads((exported("fp32") / DEPLOY_JSON).read_text())
    sizes = ProfileSizes(min=Sizes(batch=1, images=1, seq=1, past=1), opt=Sizes(batch=2, images=2, seq=64, past=64),
                         max=Sizes(batch=4, images=8, seq=256, past=512))
    (vision,) = profile_shapes(deploy, "vision_encoder", sizes)
    assert vision == {"pixel_values": ((1, 3, 28, 28), (2, 3, 28, 28), (8, 3, 28, 28))}
    prefill, decode = profile_shapes(deploy, "decoder_model_merged", sizes)
    assert prefill["inputs_embeds"] == ((1, 1, 64), (2, 64, 64), (4, 256, 64))
    assert prefill["past_key_values.1.value"] == ((1, 2, 0, 16), (2, 2, 0, 16), (4, 2, 0, 16))
    assert prefill["attention_mask"] == ((1, 1), (2, 64), (4, 256))
    assert decode["position_ids"] == ((1, 1), (2, 1), (4, 1))
    assert decode["past_key_values.0.key"] == ((1, 2, 1, 16), (2, 2, 64, 16), (4, 2, 512, 16))
    assert decode["attention_mask"] == ((1, 2), (2, 65), (4, 513))
    # generation asks for one row of logits per sequence; a prefill may ask for up to all of its positions
    assert prefill["logits_indices"] == ((1, 1), (2, 1), (4, 256))
    assert decode["logits_indices"] == ((1, 1), (2, 1), (4, 1))
    (embed,) = profile_shapes(deploy, "embed_tokens", sizes)
    assert embed["input_ids"] == ((1, 1), (2, 64), (4, 256))


def test_dynamic_resolution_profiles_round_to_the_patch(exported):
    deploy = json.loads((exported("dynamic") / DEPLOY_JSON).read_text())
    sizes = ProfileSizes(min=Sizes(height=14, width=20), opt=Sizes(height=336, width=448),
                         max=Sizes(images=2, height=672, width=700))
    (vision,) = profile_shapes(deploy, "vision_encoder", sizes)
    assert vision["pixel_values"] == ((1, 3, 14, 14), (1, 3, 336, 448), (2, 3, 672, 700))


def test_sizes_parsing_and_validation():
    assert Sizes.parse("batch=2, seq=128", Sizes(past=7)) == Sizes(batch=2, seq=128, past=7)
    with pytest.raises(ValueError, match="KEY=INT"):
        Sizes.parse("tokens=3")
    with pytest.raises(ValueError, match="min <= opt <= max"):
        ProfileSizes(min=Sizes(seq=8), opt=Sizes(seq=4), max=Sizes(seq=16)).validate()


# ------------------------------------------------------------------------------------------ without TensorRT
@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_missing_tensorrt_is_a_clear_error(tmp_path, capsys, exported):
    from gmaivl_rt.cli import main

    with pytest.raises(ImportError, match=r"TensorRT is not installed.*tensorrt-cu12.*CUDA 12"):
        tensorrt_build.export_tensorrt(exported("fp32"), tmp_path / "engines")
    assert not (tmp_path / "engines").exists()
    with pytest.raises(ImportError, match="TensorRT is not installed"):
        gmaivl_rt.load(exported("fp32"), backend="tensorrt")
    assert main(["export", "tensorrt", str(exported("fp32")), str(tmp_path / "e"), "--fp16"]) == 2
    assert "tensorrt-cu12" in capsys.readouterr().err


def test_tensorrt_export_needs_an_onnx_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="gmaivl-rt export onnx"):
        tensorrt_build.export_tensorrt(tmp_path, tmp_path / "engines")


# ------------------------------------------------------------------------------------------ with TensorRT
@needs_tensorrt
def test_engines_generate_like_the_torch_backend(tmp_path, exported, hf_checkpoint):
    sizes = ProfileSizes(min=Sizes(), opt=Sizes(batch=2, images=2, seq=16, past=16),
                         max=Sizes(batch=2, images=2, seq=64, past=64))
    tensorrt_build.export_tensorrt(exported("fp32"), tmp_path, precision="fp32", sizes=sizes)
    engines = gmaivl_rt.load(tmp_path, backend="tensorrt")
    reference = gmaivl_rt.load(hf_checkpoint, backend="torch")
    ids = torch.tensor([[3, 5] + [120] * 4 + [7, 9]] * 2)
    pixels = torch.randn(2, 3, 28, 28)
    got = engines.generate(ids, pixel_values=pixels, max_new_tokens=16, eos_token_id=[], pad_token_id=0)
    expected = reference.generate(ids, pixel_values=pixels, max_new_tokens=16, eos_token_id=[], pad_token_id=0)
    assert torch.equal(got, expected)


@needs_tensorrt
def test_plugin_engine_matches_torch_fp16(tmp_path, exported, hf_checkpoint):
    tensorrt_build.export_tensorrt(exported("plugin"), tmp_path, precision="fp16", graphs=("vision_encoder",))
    info = json.loads((tmp_path / tensorrt_build.ENGINE_JSON).read_text())
    assert info["engines"]["vision_encoder"]["plugins"] == [PLUGIN_ID]
    engine = tensorrt_build.ENGINE_FILES["vision_encoder"]
    from gmaivl_rt import GMAIVL
    from gmaivl_rt.runtime.trt_backend import _Engine
    from gmaivl_rt.runtime.trt_plugin import import_tensorrt

    trt, _ = import_tensorrt()
    runner = _Engine(trt, trt.Runtime(trt.Logger(trt.Logger.WARNING)), tmp_path / engine, "vision_encoder",
                     torch.device("cuda"))
    pixels = torch.randn(2, 3, 28, 28)
    got = runner.run({"pixel_values": pixels.cuda()})["image_features"].float().cpu()
    with torch.no_grad():
        expected = GMAIVL.from_pretrained(hf_checkpoint).eval().encode_images(pixels)
    torch.testing.assert_close(got.reshape(expected.shape), expected, atol=5e-2, rtol=5e-2)


def test_build_flow_with_a_stand_in_tensorrt(tmp_path, monkeypatch, exported):
    """The builder calls, profiles, timing cache and files of `export_tensorrt`, against a recording stand-in for
    the tensorrt module (the real one cannot be installed here); the real build runs in the skipped tests."""
    from unittest import mock

    trt = mock.MagicMock(name="tensorrt")
    builder = trt.Builder.return_value
    builder.build_serialized_network.return_value = b"serialized-engine"
    config = builder.create_builder_config.return_value
    config.get_timing_cache.return_value.serialize.return_value = b"timing-cache"
    trt.OnnxParser.return_value.parse_from_file.return_value = True
    profiles = []
    builder.create_optimization_profile.side_effect = lambda: profiles.append(mock.MagicMock()) or profiles[-1]
    monkeypatch.setattr(tensorrt_build, "import_tensorrt", lambda *a: (trt, mock.MagicMock()))
    sizes = ProfileSizes(min=Sizes(), opt=Sizes(batch=2, seq=8, past=8), max=Sizes(batch=2, seq=32, past=64))
    info_path = tensorrt_build.export_tensorrt(exported("fp32"), tmp_path, precision="bf16", sizes=sizes)

    for name, file in tensorrt_build.ENGINE_FILES.items():
        assert (tmp_path / file).read_bytes() == b"serialized-engine"
    assert (tmp_path / "timing.cache").read_bytes() == b"timing-cache"
    assert (tmp_path / DEPLOY_JSON).read_text() == (exported("fp32") / DEPLOY_JSON).read_text()
    parsed = [c.args[0] for c in trt.OnnxParser.return_value.parse_from_file.call_args_list]
    assert [p.rsplit("/", 1)[-1] for p in parsed] == list(GRAPH_FILES.values())
    config.set_flag.assert_called_with(trt.BuilderFlag.BF16)
    assert len(profiles) == 4  # vision 1, embed 1, decoder prefill + decode
    decode = {c.args[0]: c.args[1:] for c in profiles[3].set_shape.call_args_list}
    assert decode["attention_mask"] == ((1, 2), (2, 9), (2, 65))
    assert decode["past_key_values.1.key"] == ((1, 2, 1, 16), (2, 2, 8, 16), (2, 2, 64, 16))
    info = json.loads(info_path.read_text())
    assert info["precision"] == "bf16" and info["decoder_profiles"] == {"prefill": 0, "decode": 1}
    assert info["engines"]["decoder_model_merged"]["num_profiles"] == 2


def test_parser_errors_are_reported(tmp_path, monkeypatch, exported):
    from unittest import mock

    trt = mock.MagicMock(name="tensorrt")
    parser = trt.OnnxParser.return_value
    parser.parse_from_file.return_value = False
    parser.num_errors = 1
    error = parser.get_error.return_value
    error.node_name.return_value, error.node_operator.return_value = "node_Attention_7", "Attention"
    error.desc.return_value = "unsupported attribute"
    monkeypatch.setattr(tensorrt_build, "import_tensorrt", lambda *a: (trt, mock.MagicMock()))
    with pytest.raises(RuntimeError, match=r"could not parse embed_tokens.onnx:\n  node 'node_Attention_7' "
                                           r"\(Attention\): unsupported attribute"):
        tensorrt_build.export_tensorrt(exported("fp32"), tmp_path, graphs=("embed_tokens",))
    assert not (tmp_path / "embed_tokens.engine").exists()
