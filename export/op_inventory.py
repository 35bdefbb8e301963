"""Check, without TensorRT, that every node of an ONNX graph is one TensorRT's ONNX parser supports.

`check_graph(model_or_path, plugins=...)` walks the graph (and If/Loop/Scan subgraphs), compares each node with
the table in `tensorrt_onnx_ops` and with the documented restrictions that matter for our graphs (Attention with a
KV cache, cubic Resize, ...), and returns an `InventoryReport`. Nodes in a custom domain pass only when they name
a plugin we register (`plugins`, e.g. {"gmaivl::flash_attention"}).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import tensorrt_onnx_ops as table

DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass
class Problem:
    node: str
    op_type: str
    domain: str
    reason: str

    def __str__(self):
        op = f"{self.domain}::{self.op_type}" if self.domain else self.op_type
        return f"node {self.node!r} ({op}): {self.reason}"


@dataclass
class InventoryReport:
    graph: str
    opset: int | None
    op_counts: Counter = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self):
        head = (f"{self.graph}: opset {self.opset}, {sum(self.op_counts.values())} nodes, "
                f"{len(self.op_counts)} op types -> "
                + ("all supported by TensorRT " + table.TENSORRT_VERSION if self.ok
                   else f"{len(self.problems)} unsupported by TensorRT {table.TENSORRT_VERSION}"))
        return "\n".join([head] + [f"  - {p}" for p in self.problems])


def _attr(node, name, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _ranks(model) -> dict[str, int]:
    """Tensor name -> rank, from ONNX shape inference (best effort: unknown ranks are simply absent)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shape inference is advisory here
        inferred = model
    ranks = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = v.type.tensor_type
        if t.HasField("shape"):
            ranks[v.name] = len(t.shape.dim)
    return ranks


def _restriction(node, ranks) -> str | None:
    """The documented restriction this node breaks, or None."""
    op = node.op_type
    if op == "Attention":
        given = lambda i: len(node.input) > i and node.input[i] != ""  # noqa: E731
        used = lambda i: len(node.output) > i and node.output[i] != ""  # noqa: E731
        if given(4) or given(5):
            return "past_key/past_value inputs are unsupported (concatenate the cache outside the op)"
        if given(6):
            return "the nonpad_kv_seqlen input is unsupported"
        if used(1) or used(2) or used(3):
            return "present_key/present_value/qk_matmul_output outputs are unsupported"
        if _attr(node, "softcap", 0.0) or _attr(node, "qk_matmul_output_mode", 0):
            return "softcap and qk_matmul_output_mode are unsupported"
        for i, what in ((0, "Q"), (1, "K"), (2, "V"), (3, "attn_mask")):
            if given(i) and ranks.get(node.input[i], 4) != 4:
                return f"{what} must be 4-D, got rank {ranks[node.input[i]]}"
    elif op == "Resize":
        mode = _attr(node, "mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode not in ("nearest", "linear"):
            return f"Resize mode {mode!r} is unsupported (nearest and linear only)"
        if _attr(node, "antialias", 0):
            return "Resize antialiasing is unsupported"
    elif op == "TopK" and _attr(node, "sorted", 1) != 1:
        return "TopK needs sorted=1"
    elif op == "ScatterND" and (_attr(node, "reduction", b"none") or b"none") not in (b"none", "none"):
        return "ScatterND reduction other than none is unsupported"
    elif op == "LayerNormalization" and any(o for o in list(node.output)[1:]):
        return "only LayerNormalization's first output is supported"
    elif op == "MaxPool" and len(node.output) > 1 and node.output[1]:
        return "MaxPool's Indices output is unsupported"
    return None


def _walk(graph, report, ranks, plugins):
    import onnx

    for node in graph.node:
        domain = node.domain or ""
        report.op_counts[f"{domain}::{node.op_type}" if domain not in DEFAULT_DOMAINS else node.op_type] += 1
        name = node.name or (node.output[0] if node.output else "?")
        if domain not in DEFAULT_DOMAINS:
            namespace = _attr(node, "plugin_namespace", b"")
            namespace = namespace.decode() if isinstance(namespace, bytes) else namespace
            if f"{namespace or domain}::{node.op_type}" not in plugins:
                report.problems.append(Problem(name, node.op_type, domain,
                                               f"custom-domain op is not a registered TensorRT plugin "
                                               f"(known plugins: {sorted(plugins) or 'none'})"))
            continue
        if node.op_type in table.UNSUPPORTED:
            report.problems.append(Problem(name, node.op_type, domain, "not supported by TensorRT's ONNX parser"))
        elif node.op_type not in table.SUPPORTED:
            report.problems.append(Problem(name, node.op_type, domain, "not in TensorRT's ONNX operator table"))
        else:
            broken = _restriction(node, ranks)
            if broken:
                report.problems.append(Problem(name, node.op_type, domain, broken))
        for attr in node.attribute:  # If / Loop / Scan bodies
            if attr.type == onnx.AttributeProto.GRAPH:
                _walk(attr.g, report, ranks, plugins)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _walk(g, report, ranks, plugins)


def check_graph(model_or_path, *, plugins=(), name=None) -> InventoryReport:
    """model_or_path: an onnx.ModelProto or a .onnx path (external data is not loaded: only the graph is read).
    plugins: "namespace::name" of TensorRT plugins that custom-domain nodes may use."""
    import onnx

    if isinstance(model_or_path, (str, Path)):
        path = Path(model_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"op inventory: {str(path)!r} is not a file")
        model = onnx.load(str(path), load_external_data=False)
        name = name or path.name
    else:
        model = model_or_path
    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), None)
    report = InventoryReport(graph=name or model.graph.name, opset=opset)
    if opset is not None and not table.OPSET_MIN <= opset <= table.OPSET_MAX:
        report.problems.append(Problem("<model>", "opset", "", f"opset {opset} is outside the parser's range "
                                                               f"{table.OPSET_MIN}..{table.OPSET_MAX}"))
    _walk(model.graph, report, _ranks(model), set(plugins))
    return report


def check_folder(onnx_dir, *, plugins=()) -> list[InventoryReport]:
    """Check every .onnx file of an export folder."""
    paths = sorted(Path(onnx_dir).glob("*.onnx"))
    if not paths:
        raise FileNotFoundError(f"op inventory: no .onnx files in {str(onnx_dir)!r}")
    return [check_graph(p, plugins=plugins) for p in paths]
