"""The torch backend: a thin wrapper over `GMAIVL.from_pretrained(path)` (a model folder)."""
from __future__ import annotations

from pathlib import Path

import torch

from gmaivl_rt.runtime.base import Backend


class TorchBackend(Backend):
    """`GMAIVL.from_pretrained(path)` behind the common backend interface."""

    name = "torch"

    def __init__(self, path, dtype=None, device=None):
        from gmaivl_rt.model.checkpoint import inference_dtype, stored_float_dtype
        from gmaivl_rt.model.modeling import GMAIVL

        self.path = Path(path)
        if dtype is None and device is not None:
            dtype = inference_dtype(device, stored=stored_float_dtype(self.path))
        self.model = GMAIVL.from_pretrained(self.path, dtype=dtype, device=device).eval()
        self.config = self.model.config

    @property
    def placement(self) -> dict:
        """Where and in what the model runs, read from its weights: {"device": "cpu", "dtype": "float32"}."""
        weight = self.model.lm_head.weight
        return {"device": str(weight.device), "dtype": str(weight.dtype).removeprefix("torch.")}

    @property
    def sampling_device(self):
        """The logits of `GMAIVL.generate` reach the sampler on the model's device."""
        return self.model.lm_head.weight.device

    def generate(self, input_ids, pixel_values=None, attention_mask=None, **kwargs):
        """`GMAIVL.generate` on the model's device; inputs may be tensors or arrays, the result is on the CPU."""
        weight = self.model.lm_head.weight
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = [torch.as_tensor(p).to(weight.device, weight.dtype) for p in pixel_values]
        elif pixel_values is not None:
            pixel_values = torch.as_tensor(pixel_values).to(weight.device, weight.dtype)
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask).to(weight.device)
        return self.model.generate(torch.as_tensor(input_ids).to(weight.device), pixel_values=pixel_values,
                                   attention_mask=attention_mask, **kwargs).cpu()
