"""Ask a model about a medical image: read it (DICOM, NIfTI or an ordinary image), preprocess it as GMAI-VL does,
apply the chat template, generate, decode. The CLI's `gmaivl-rt ask` is this, from the shell."""
from __future__ import annotations

import numpy as np
import torch

from gmaivl_rt.chat import IM_END, IMAGE_TOKEN, build_prompt, expand_image_tokens, preprocess_image, \
    preprocess_image_dynamic
from gmaivl_rt.config import GMAIVLConfig

# GMAI-VL's demo decoding, greedy for reproducible answers.
DEFAULT_GENERATION = {"max_new_tokens": 128, "repetition_penalty": 1.12, "no_repeat_ngram_size": 5}


class Assistant:
    """model: anything with GMAIVL's `generate` (a GMAIVL, or a `gmaivl_rt.load` backend); tokenizer: a
    transformers tokenizer whose `<image>` id is the config's image_token_index."""

    def __init__(self, model, tokenizer, config: GMAIVLConfig, system: str | None = None):
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_id != config.image_token_index:
            raise ValueError(f"the tokenizer maps {IMAGE_TOKEN} to {image_id} but the model's image_token_index is "
                             f"{config.image_token_index}")
        self.model, self.tokenizer, self.config, self.system = model, tokenizer, config, system
        self.eos_token_ids = sorted({i for i in (tokenizer.convert_tokens_to_ids(IM_END), tokenizer.eos_token_id)
                                     if i is not None and i != tokenizer.unk_token_id})

    @classmethod
    def from_pretrained(cls, path, backend: str = "torch", system: str | None = None, **load_kwargs):
        from transformers import AutoTokenizer

        import gmaivl_rt

        return cls(gmaivl_rt.load(path, backend=backend, **load_kwargs), AutoTokenizer.from_pretrained(path),
                   GMAIVLConfig.from_pretrained(path), system=system)

    def pixels_for(self, image) -> torch.Tensor:
        """A path (DICOM / NIfTI / PNG / JPEG / TIFF / BMP), MedicalImage, PIL image or uint8 array ->
        (3, H, W) model input."""
        from gmaivl_rt.medical_io import MedicalImage, read_medical_image

        if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
            image = read_medical_image(image)
        if isinstance(image, MedicalImage):
            image = image.pixels
        v = self.config.vision
        if v.dynamic_resolution:
            return preprocess_image_dynamic(image, v.patch_size, v.min_pixels, v.max_pixels)
        return preprocess_image(image, v.image_size)

    def prepare(self, question: str, image=None):
        """Returns input_ids (1, S) and pixel_values ((1, 3, S, S), a one-image list in dynamic mode, or None)."""
        pixel_values, text = None, question
        if image is not None:
            pixels = self.pixels_for(image)
            patch = self.config.vision.patch_size
            n_tokens = (pixels.shape[1] // patch) * (pixels.shape[2] // patch)
            if self.config.vision.select_strategy == "full":
                n_tokens += 1
            if IMAGE_TOKEN not in text:
                text = f"{IMAGE_TOKEN}\n{text}"
            text = expand_image_tokens(text, n_tokens)
            pixel_values = [pixels] if self.config.vision.dynamic_resolution else pixels[None]
        prompt = build_prompt([{"role": "user", "content": text}], system=self.system)
        ids = self.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return ids, pixel_values

    def ask(self, question: str, image=None, **generation) -> str:
        """Answer one question about one image (or none). `generation` overrides DEFAULT_GENERATION."""
        ids, pixel_values = self.prepare(question, image)
        options = {**DEFAULT_GENERATION, "eos_token_id": self.eos_token_ids,
                   "pad_token_id": self.tokenizer.pad_token_id or 0, **generation}
        out = self.model.generate(ids, pixel_values=pixel_values, **options)
        new = np.asarray(out[0, ids.shape[1]:].tolist())
        return self.tokenizer.decode(new, skip_special_tokens=True).strip()


def register(subparsers) -> None:
    p = subparsers.add_parser("ask", help="answer a question about a medical image with a model folder")
    p.add_argument("model", help="model folder (config.json, safetensors, tokenizer.json) or exported folder")
    p.add_argument("--image", help="DICOM, NIfTI, PNG, JPEG, TIFF or BMP file")
    p.add_argument("--question", required=True)
    p.add_argument("--backend", default="torch", choices=["torch", "onnx", "tensorrt"])
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_GENERATION["max_new_tokens"])
    p.add_argument("--system", default=None, help="optional system prompt")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    assistant = Assistant.from_pretrained(args.model, backend=args.backend, system=args.system)
    print(assistant.ask(args.question, args.image, max_new_tokens=args.max_new_tokens))
    return 0
