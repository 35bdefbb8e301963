"""The TensorRT op inventory check: our exported graphs pass; hand-made graphs with what TensorRT's ONNX parser
rejects (per onnx-tensorrt's operator table for TensorRT 10.15) are reported node by node."""
from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from gmaivl_rt.export import tensorrt_onnx_ops
from gmaivl_rt.export.op_inventory import check_folder, check_graph
from gmaivl_rt.runtime.trt_plugin import PLUGIN_ID


def _model(nodes, inputs, outputs, opset=23, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in extra_opsets]
    return helper.make_model(graph, opset_imports=opsets)


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


@pytest.mark.parametrize("variant", ["fp32", "fp16"])
def test_exported_graphs_pass(variant, exported):
    reports = check_folder(exported(variant))
    assert [r.graph for r in reports] == ["decoder_model_merged.onnx", "embed_tokens.onnx", "vision_encoder.onnx"]
    for report in reports:
        assert report.ok, str(report)
        assert report.opset == 23
    decoder = reports[0]
    assert decoder.op_counts["Attention"] == 2 and decoder.op_counts["MatMul"] > 0


def test_dynamic_resolution_graph_passes(exported):
    """Bicubic position-embedding interpolation is built from ops TensorRT has (its Resize has no cubic)."""
    report = check_graph(exported("dynamic") / "vision_encoder.onnx")
    assert report.ok, str(report)
    assert report.op_counts["Floor"] and report.op_counts["Einsum"]  # the in-graph bicubic weights
    assert "Resize" not in report.op_counts


def test_unsupported_and_unknown_ops_are_named():
    model = _model([helper.make_node("Unique", ["x"], ["u"], name="uniq"),
                    helper.make_node("Relu", ["u"], ["y"], name="relu"),
                    helper.make_node("MyOp", ["y"], ["z"], name="mine")],
                   [_vi("x", [4])], [_vi("z", [4])])
    report = check_graph(model, name="toy")
    assert not report.ok
    assert [(p.node, p.op_type) for p in report.problems] == [("uniq", "Unique"), ("mine", "MyOp")]
    text = str(report)
    assert "2 unsupported by TensorRT 10.15" in text
    assert "node 'uniq' (Unique): not supported" in text and "node 'mine' (MyOp): not in TensorRT's ONNX" in text


def test_restrictions_attention_with_cache_and_cubic_resize():
    q, k, v = _vi("q", [1, 2, 3, 4]), _vi("k", [1, 2, 5, 4]), _vi("v", [1, 2, 5, 4])
    past = [_vi("pk", [1, 2, 2, 4]), _vi("pv", [1, 2, 2, 4])]
    cached = helper.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["o", "present_k", "present_v"],
                              name="attn_cache")
    plain = helper.make_node("Attention", ["q", "k", "v"], ["o2"], name="attn_plain")
    resize = helper.make_node("Resize", ["img", "", "scales"], ["big"], mode="cubic", name="upsample")
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    model = _model([cached, plain, resize], [q, k, v, *past, _vi("img", [1, 1, 4, 4])],
                   [_vi("o", None), _vi("o2", None), _vi("big", None)])
    model.graph.initializer.append(scales)
    report = check_graph(model)
    reasons = {p.node: p.reason for p in report.problems}
    assert set(reasons) == {"attn_cache", "upsample"}
    assert "past_key/past_value" in reasons["attn_cache"]
    assert "cubic" in reasons["upsample"]


def test_attention_must_be_4d():
    q = _vi("q", [1, 3, 8])  # 3-D (batch, seq, hidden) form: TensorRT wants 4-D
    node = helper.make_node("Attention", ["q", "q", "q"], ["o"], name="attn3d", q_num_heads=2, kv_num_heads=2)
    report = check_graph(_model([node], [q], [_vi("o", None)]))
    assert [p.node for p in report.problems] == ["attn3d"]
    assert "Q must be 4-D, got rank 3" in report.problems[0].reason


def test_contrib_and_plugin_domains():
    gqa = helper.make_node("GroupQueryAttention", ["x"], ["y"], domain="com.microsoft", name="gqa")
    plugin = helper.make_node("flash_attention", ["y"], ["z"], domain="gmaivl", name="fa", plugin_namespace="gmaivl",
                              aot=1)
    model = _model([gqa, plugin], [_vi("x", [1])], [_vi("z", [1])], extra_opsets=("com.microsoft", "gmaivl"))
    assert [p.node for p in check_graph(model).problems] == ["gqa", "fa"]
    report = check_graph(model, plugins={PLUGIN_ID})
    assert [p.node for p in report.problems] == ["gqa"]
    assert "com.microsoft::GroupQueryAttention" in str(report)


def test_subgraphs_and_opset_range():
    then_branch = helper.make_graph([helper.make_node("Unique", ["x"], ["t"], name="inner_unique")], "then", [],
                                    [_vi("t", [4])])
    else_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="inner_id")], "else", [],
                                    [_vi("e", [4])])
    node = helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch, name="branch")
    model = _model([node], [_vi("c", [], TensorProto.BOOL), _vi("x", [4])], [_vi("y", [4])], opset=25)
    report = check_graph(model)
    assert [p.node for p in report.problems] == ["<model>", "inner_unique"]
    assert f"outside the parser's range {tensorrt_onnx_ops.OPSET_MIN}..{tensorrt_onnx_ops.OPSET_MAX}" in str(report)


def test_table_is_consistent_with_onnx():
    """Every op in the embedded table is a real ONNX op, and no op is both supported and unsupported."""
    schemas = {s.name for s in onnx.defs.get_all_schemas_with_history() if s.domain == ""}
    legacy = {"ImageScaler", "ParametricSoftplus", "ScaledTanh", "Scatter", "Upsample"}  # old ops the table keeps
    assert not (set(tensorrt_onnx_ops.SUPPORTED) & tensorrt_onnx_ops.UNSUPPORTED)
    unknown = (set(tensorrt_onnx_ops.SUPPORTED) | tensorrt_onnx_ops.UNSUPPORTED) - schemas - legacy
    assert not unknown, unknown


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a file"):
        check_graph(tmp_path / "nope.onnx")
    with pytest.raises(FileNotFoundError, match="no .onnx files"):
        check_folder(tmp_path)
