"""ONNX Runtime backend: `gmaivl_rt.load(onnx_dir, backend="onnx")`.

Runs the three graphs `gmaivl-rt export onnx` wrote (their names: `gmaivl_rt.runtime.deploy_format`), with the
generation loop of `gmaivl_rt.runtime.graph_backend.GraphBackend`.
Providers: the CPU provider by default; CUDA (and TensorRT, when asked for) where onnxruntime-gpu is installed.
On CUDA the KV cache stays on the device between steps through I/O binding; on the CPU the present arrays are fed
back as the next step's past as they are.
Threads: every session is built by `session_options`, with ONNX Runtime's spin-waiting off by default: its intra-op
threads otherwise keep spinning on the cores for a while after each call, which on a small CPU slows whatever runs
next in the process (torch work beside the graphs, the engine's Python, the HTTP server).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from gmaivl_rt.errors import InputError
from gmaivl_rt.runtime.deploy_format import DEPLOY_JSON, FORMAT_VERSION, GRAPH_FILES, past_names, present_names
from gmaivl_rt.runtime.graph_backend import GraphBackend

_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return (["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []) + ["CPUExecutionProvider"]


def providers_for_device(device: str) -> list:
    """A torch-style device name ("cpu", "cuda", "cuda:1") -> ONNX Runtime providers running on it. A CUDA device
    needs onnxruntime-gpu: without its CUDA provider this refuses rather than letting ONNX Runtime fall back to
    the CPU unnoticed."""
    import onnxruntime as ort

    kind, _, index = str(device).partition(":")
    if kind == "cpu" and not index:
        return ["CPUExecutionProvider"]
    if kind != "cuda" or (index and not index.isdigit()):
        raise InputError(f"device must be cpu, cuda or cuda:N for the onnx backend, got {str(device)!r}")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise InputError(f"device {device}: this ONNX Runtime has no CUDA execution provider (install "
                         "onnxruntime-gpu)")
    return [("CUDAExecutionProvider", {"device_id": int(index or 0)}), "CPUExecutionProvider"]


def session_options(threads: int | None = None, inter_op_threads: int | None = None,
                    allow_spinning: bool = False):
    """The one place our ONNX Runtime sessions get their `SessionOptions`: all graph optimisations; `threads` /
    `inter_op_threads` intra- / inter-op thread counts (None: ONNX Runtime's choice, one intra-op thread per core);
    `allow_spinning` False (the default) sets `session.intra_op.allow_spinning` and `session.inter_op.allow_spinning`
    to "0", so idle pool threads block instead of spin-waiting on cores the rest of the process needs. True restores
    ONNX Runtime's default (spinning: lower latency between back-to-back calls on a machine with cores to spare)."""
    import onnxruntime as ort

    for role, count in (("threads", threads), ("inter_op_threads", inter_op_threads)):
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
            raise InputError(f"{role} must be an int >= 0 (0: ONNX Runtime's choice), got {count!r}")
    if not isinstance(allow_spinning, bool):
        raise InputError(f"allow_spinning must be a bool, got {type(allow_spinning).__name__}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if inter_op_threads:
        options.inter_op_num_threads = inter_op_threads
    spinning = "1" if allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
    return options


def read_deploy(path: Path) -> dict:
    file = Path(path) / DEPLOY_JSON
    if not file.is_file():
        if (Path(path) / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is a model folder, not an ONNX export (no {DEPLOY_JSON}): export it once with `gmaivl-rt "
                f"export onnx {path} ONNX_DIR`, then load or ask ONNX_DIR with the onnx backend")
        raise FileNotFoundError(f"{path}: no {DEPLOY_JSON}; export the model first with `gmaivl-rt export onnx`")
    return json.loads(file.read_text())


def _dtype_shape(value):
    """(numpy dtype, shape) of a numpy array or an onnxruntime OrtValue."""
    if isinstance(value, np.ndarray):
        return value.dtype, tuple(value.shape)
    return np.dtype(_NP_DTYPES[value.data_type()]), tuple(value.shape())


class _Graph:
    """One InferenceSession with input checks that name the graph, the input and the problem."""

    def __init__(self, name, file, providers, options):
        import onnxruntime as ort

        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing from the export folder")
        self.name = name
        self.session = ort.InferenceSession(str(file), sess_options=options, providers=providers)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.on_cuda = self.session.get_providers()[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")

    def dtype(self, input_name):
        return _NP_DTYPES[self.inputs[input_name].type]

    def check(self, feeds: dict):
        """Refuse feeds whose names, ranks, static dims or dtypes differ from the graph's inputs."""
        missing = set(self.inputs) - set(feeds)
        if missing:
            raise ValueError(f"{self.name}: missing inputs {sorted(missing)}")
        for name, value in feeds.items():
            spec = self.inputs.get(name)
            if spec is None:
                raise ValueError(f"{self.name}: unknown input {name!r}; the graph takes {list(self.inputs)}")
            want = np.dtype(_NP_DTYPES[spec.type])
            dtype, shape = _dtype_shape(value)
            static = [d if isinstance(d, int) else None for d in spec.shape]
            bad_shape = len(shape) != len(static) or any(s is not None and s != d for s, d in zip(static, shape))
            if bad_shape or dtype != want:
                expected = tuple(d if isinstance(d, int) else str(d) for d in spec.shape)
                raise ValueError(f"{self.name}: input {name!r} must be {want.name} of shape {expected}, "
                                 f"got {dtype.name} {shape}")

    def run(self, feeds: dict) -> list:
        self.check(feeds)
        return self.session.run(self.output_names, feeds)


class OnnxBackend(GraphBackend):
    """generate() through ONNX Runtime. providers: list for onnxruntime (default: CUDA if present, else CPU);
    device: "cpu", "cuda" or "cuda:N" instead of providers; threads / inter_op_threads: ONNX Runtime's intra- /
    inter-op thread counts (default: its choice); allow_spinning: let idle pool threads spin-wait (default False:
    `session_options`)."""

    name = "onnx"

    def __init__(self, path, providers=None, threads: int | None = None, device: str | None = None,
                 inter_op_threads: int | None = None, allow_spinning: bool = False):
        self.path = Path(path)
        deploy = read_deploy(self.path)
        if deploy.get("attention") not in (None, "sdpa"):
            raise ValueError(f"{self.path}: these graphs use the {deploy['attention']!r} attention node, which only "
                             "TensorRT runs; export with the default attention for ONNX Runtime")
        if deploy.get("dtype") == "bf16":
            raise ValueError(f"{self.path}: bf16 graphs are meant for TensorRT (numpy and ONNX Runtime's CPU "
                             "provider have no bf16); export fp16 or fp32 for ONNX Runtime")
        self._init_from_deploy(deploy)
        options = session_options(threads, inter_op_threads, allow_spinning)
        if device is not None and providers is not None:
            raise TypeError("OnnxBackend: pass providers or device, not both")
        providers = providers_for_device(device) if device is not None else providers or default_providers()
        self.graphs = {name: _Graph(name, self.path / GRAPH_FILES[name], providers, options)
                       for name in GRAPH_FILES}
        if "logits_indices" not in self.graphs["decoder_model_merged"].inputs:
            raise ValueError(f"{self.path}: this decoder graph predates logits_indices (format_version "
                             f"{deploy.get('format_version')}, this runtime reads {FORMAT_VERSION}); export it again "
                             "with `gmaivl-rt export onnx`")
        self.num_layers = self.config.text.num_layers
        self.past_names, self.present_names = past_names(self.num_layers), present_names(self.num_layers)
        self.on_cuda = self.graphs["decoder_model_merged"].on_cuda
        self.float_dtype = self.graphs["decoder_model_merged"].dtype("inputs_embeds")
        # fp16 in a q4f16 export even where its inputs_embeds are fp32 (gmaivl_rt.export.quantize)
        self.cache_dtype = self.graphs["decoder_model_merged"].dtype(self.past_names[0])

    @property
    def placement(self) -> dict:
        """Where and in what the graphs run, as ONNX Runtime reports it: {"device": "CPUExecutionProvider",
        "dtype": "float32"} (the decoder's first provider and float input type)."""
        decoder = self.graphs["decoder_model_merged"]
        return {"device": decoder.session.get_providers()[0], "dtype": np.dtype(self.float_dtype).name}

    # ------------------------------------------------------------------ graphs
    def _vision(self, pixel_values):
        graph = self.graphs["vision_encoder"]
        (features,) = graph.run({"pixel_values": pixel_values.numpy().astype(graph.dtype("pixel_values"))})
        return torch.from_numpy(features)

    def _embed(self, ids):
        (embeds,) = self.graphs["embed_tokens"].run({"input_ids": ids.numpy()})
        return torch.from_numpy(embeds)

    def _empty_past(self, batch):
        t = self.config.text
        empty = np.zeros((batch, t.num_kv_heads, 0, t.head_dim), dtype=self.cache_dtype)
        if self.on_cuda:
            import onnxruntime as ort

            return [ort.OrtValue.ortvalue_from_numpy(empty, "cuda", 0) for _ in self.past_names]
        return [empty] * len(self.past_names)

    def _decode(self, embeds, attention_mask, position_ids, logits_indices, past):
        feeds = {"inputs_embeds": embeds.numpy().astype(self.float_dtype, copy=False),
                 "attention_mask": attention_mask.numpy(), "position_ids": position_ids.numpy(),
                 "logits_indices": logits_indices.numpy()}
        if self.on_cuda:
            return self._decode_bound(feeds, past)
        outputs = self.graphs["decoder_model_merged"].run({**feeds, **dict(zip(self.past_names, past))})
        return torch.from_numpy(outputs[0]), outputs[1:]

    def _decode_bound(self, feeds, past):
        """CUDA: past/present stay device OrtValues (no host round trip for the cache); only logits come back."""
        graph = self.graphs["decoder_model_merged"]
        graph.check({**feeds, **dict(zip(self.past_names, past))})
        binding = graph.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for name, value in zip(self.past_names, past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, "cuda")
        graph.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return torch.from_numpy(outputs[0].numpy()), list(outputs[1:])
