"""TensorRT backend: `gmaivl_rt.load(engine_dir, backend="tensorrt")` over engines from `gmaivl-rt export tensorrt`.

Inputs and outputs are torch CUDA tensors handed to the execution contexts by address (`set_tensor_address`,
`execute_async_v3` on torch's current stream); the KV cache stays on the GPU between steps. The decoder switches
between its "prefill" and "decode" optimization profiles. The generation loop is `GraphBackend`'s.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from gmaivl_rt.runtime.trt_plugin import import_tensorrt, register_plugin
from gmaivl_rt.model.checkpoint import DTYPE_NAMES
from gmaivl_rt.runtime.deploy_format import DEPLOY_JSON, ENGINE_FILES, ENGINE_JSON, past_names, present_names
from gmaivl_rt.runtime.graph_backend import GraphBackend


class _Engine:
    def __init__(self, trt, runtime, file: Path, name: str, device):
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing from the engine folder")
        self.trt, self.name, self.device = trt, name, device
        self.engine = runtime.deserialize_cuda_engine(file.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{file.name}: TensorRT could not deserialize it (built by another TensorRT version "
                               "or for another GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.profile = 0
        self._placeholder = torch.empty(1, dtype=torch.float32, device=device)  # address for empty tensors

    def torch_dtype(self, name):
        t = self.trt.DataType
        table = {t.FLOAT: torch.float32, t.HALF: torch.float16, t.BF16: torch.bfloat16, t.INT32: torch.int32,
                 t.INT64: torch.int64, t.BOOL: torch.bool}
        return table[self.engine.get_tensor_dtype(name)]

    def _check(self, name, shape):
        lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
        if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
            raise ValueError(f"{self.name}: input {name!r} of shape {tuple(shape)} is outside the engine's profile "
                             f"{self.profile} range {tuple(lo)}..{tuple(hi)}; rebuild with larger --max sizes")

    def run(self, feeds: dict, profile: int = 0) -> dict:
        stream = torch.cuda.current_stream(self.device)
        if profile != self.profile:
            self.context.set_optimization_profile_async(profile, stream.cuda_stream)
            self.profile = profile
        keep = []
        for name in self.inputs:
            if name not in feeds:
                raise ValueError(f"{self.name}: missing input {name!r}")
            t = feeds[name].to(self.device, self.torch_dtype(name)).contiguous()
            self._check(name, t.shape)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr() if t.numel() else self._placeholder.data_ptr())
            keep.append(t)
        outputs = {}
        for name in self.outputs:
            out = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.torch_dtype(name),
                              device=self.device)
            self.context.set_tensor_address(name, out.data_ptr() if out.numel() else self._placeholder.data_ptr())
            outputs[name] = out
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.name}: TensorRT execution failed")
        return outputs


class TensorRTBackend(GraphBackend):
    name = "tensorrt"

    def __init__(self, path, device="cuda"):
        trt, _ = import_tensorrt()
        if not torch.cuda.is_available():
            raise RuntimeError("the TensorRT backend needs a CUDA GPU and a CUDA build of torch")
        self.path = Path(path)
        info_file, deploy_file = self.path / ENGINE_JSON, self.path / DEPLOY_JSON
        if not info_file.is_file() or not deploy_file.is_file():
            raise FileNotFoundError(f"{self.path}: no {ENGINE_JSON}/{DEPLOY_JSON}; build engines with "
                                    "`gmaivl-rt export tensorrt`")
        self.info = json.loads(info_file.read_text())
        self._init_from_deploy(json.loads(deploy_file.read_text()))
        if any(e["plugins"] for e in self.info["engines"].values()):
            register_plugin()  # the plugin creator must exist before an engine holding it is deserialized
        self.device = torch.device(device)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engines = {name: _Engine(trt, self._runtime, self.path / ENGINE_FILES[name], name, self.device)
                        for name in ENGINE_FILES}
        if "logits_indices" not in self.engines["decoder_model_merged"].inputs:  # else logits[:, 0] = first token's
            raise ValueError(f"{self.path}: this decoder engine was built from a graph without logits_indices; "
                             "export the model again with `gmaivl-rt export onnx`, then rebuild the engines")
        self.past_names = past_names(self.config.text.num_layers)
        self.present_names = present_names(self.config.text.num_layers)
        self.profiles = self.info.get("decoder_profiles", {"prefill": 0, "decode": 1})

    @property
    def placement(self) -> dict:
        """{"device": "cuda:0", "dtype": the dtype the graphs were exported in (deploy.json), named as torch names
        it ("bfloat16")}."""
        dtype = DTYPE_NAMES[self.deploy.get("dtype", "fp32")]
        return {"device": str(self.device), "dtype": str(dtype).removeprefix("torch.")}

    def _vision(self, pixel_values):
        out = self.engines["vision_encoder"].run({"pixel_values": pixel_values})
        return out["image_features"].float().cpu()

    def _embed(self, ids):
        return self.engines["embed_tokens"].run({"input_ids": ids})["inputs_embeds"]

    def _empty_past(self, batch):
        t = self.config.text
        empty = torch.empty(batch, t.num_kv_heads, 0, t.head_dim, device=self.device)
        return [empty] * len(self.past_names)

    def _decode(self, embeds, attention_mask, position_ids, logits_indices, past):
        profile = self.profiles["prefill"] if past[0].shape[2] == 0 else self.profiles["decode"]
        feeds = {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": position_ids,
                 "logits_indices": logits_indices, **dict(zip(self.past_names, past))}
        out = self.engines["decoder_model_merged"].run(feeds, profile)
        return out["logits"].float().cpu(), [out[n] for n in self.present_names]
