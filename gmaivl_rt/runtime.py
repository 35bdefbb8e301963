"""`gmaivl_rt.load(path, backend=...)`: one generate() over three backends.

- "torch":    `TorchBackend`, a thin wrapper over `GMAIVL.from_pretrained(path)` (a model folder).
- "onnx":     `gmaivl_rt.export.ort_backend.OnnxBackend` over a folder written by `gmaivl-rt export onnx`.
- "tensorrt": `gmaivl_rt.export.trt_backend.TensorRTBackend` over a folder written by `gmaivl-rt export tensorrt`.

Every backend's `generate` follows `GMAIVL.generate`: left-padded prompts, image features written over the image
tokens, a KV cache kept between steps, next tokens chosen by `gmaivl_rt.sampling.select_next_token`, finished rows
filled with pad_token_id. Graph backends share the loop in `GraphBackend`; they only run the three graphs.
"""
from __future__ import annotations

from pathlib import Path

import torch

from gmaivl_rt.errors import InputError, ModelError
from gmaivl_rt.limits import DEFAULT_LIMITS, Limits
from gmaivl_rt.request import DEFAULT_GENERATION, PreparedRequest, build_request
from gmaivl_rt.sampling import generate_tokens

BACKENDS = ("torch", "onnx", "tensorrt")
# What a folder's tokenizer is looked for in (transformers' fast tokenizer, or a sentencepiece model + config).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def load(path, backend: str = "torch", *, limits: Limits | None = None, **kwargs):
    """path: a model folder (torch) or an exported folder (onnx / tensorrt). limits: the request `Limits` of this
    runtime (default `Limits()`). kwargs go to the backend: torch: dtype, device; onnx: device or providers, threads;
    tensorrt: device. torch on CUDA without a dtype loads an fp32 checkpoint in bf16 (fp16 on GPUs before sm_80;
    `checkpoint.inference_dtype`); an explicit dtype wins, CPU keeps the stored dtype. A folder with tokenizer
    files has its tokenizer loaded and checked here (ModelError when it cannot serve); a folder without any serves
    `generate()` on token ids only."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"load: {str(path)!r} is not a folder")
    if limits is not None and not isinstance(limits, Limits):
        raise TypeError(f"load: limits must be a gmaivl_rt.Limits, got {type(limits).__name__}")
    if backend == "torch":
        runtime = TorchBackend(path, **kwargs)
    elif backend == "onnx":
        from gmaivl_rt.extras import require
        from gmaivl_rt.export.ort_backend import OnnxBackend

        require("onnxruntime")

        runtime = OnnxBackend(path, **kwargs)
    elif backend == "tensorrt":
        from gmaivl_rt.export.trt_backend import TensorRTBackend

        runtime = TensorRTBackend(path, **kwargs)
    else:
        raise ValueError(f"load: backend {backend!r} is not one of {', '.join(BACKENDS)}")
    runtime.limits = limits or DEFAULT_LIMITS
    if any((path / name).exists() for name in TOKENIZER_FILES):
        runtime.tokenizer  # noqa: B018  (fail at load, not at the first request)
    return runtime


class _ChatHelpers:
    """Tokenizer and template helpers shared by the backends (need the tokenizer files in the folder)."""

    path: Path
    config = None
    limits: Limits = DEFAULT_LIMITS
    _tokenizer = None

    @property
    def tokenizer(self):
        """The folder's tokenizer, loaded once and checked against the model; ModelError naming the folder and the
        files looked for when it is missing, unloadable or does not fit."""
        if self._tokenizer is None:
            from gmaivl_rt.train.tokenizer import check_tokenizer_fits, load_tokenizer

            looked_for = ", ".join(TOKENIZER_FILES)
            if not any((self.path / name).exists() for name in TOKENIZER_FILES):
                raise ModelError(f"{self.path}: no tokenizer (looked for {looked_for}); this folder can run "
                                 "generate() on token ids but not answer text")
            try:
                tokenizer = load_tokenizer(self.path)
            except Exception as e:  # transformers raises many types for a broken or partial tokenizer
                raise ModelError(f"{self.path}: the tokenizer cannot be loaded from {looked_for} "
                                 f"({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None
            try:
                check_tokenizer_fits(self.config, tokenizer, self.path)
            except ValueError as e:
                raise ModelError(str(e)) from None
            self._tokenizer = tokenizer
        return self._tokenizer

    def build_request(self, question=None, image=None, *, messages=None, images=None, system=None, frame=None,
                      slice_index=None, plane=None, window=None, **generation) -> PreparedRequest:
        """The checked request (`gmaivl_rt.request.build_request`): a question about `image` (or none), or chat
        `messages` (str content with `<image>` slots, or OpenAI-style text / image parts) with `images` in slot
        order. Images: any form `gmaivl_rt.image_input.to_medical_image` takes; frame / slice_index / plane /
        window reach its reader. generation: options over DEFAULT_GENERATION, validated for every backend alike.
        Raises InputError / LimitError (bad or oversized request), ModelError (no usable tokenizer)."""
        return build_request(self, question, image, messages=messages, images=images, system=system, frame=frame,
                             slice_index=slice_index, plane=plane, window=window, generation=generation,
                             limits=self.limits)

    def prepare(self, messages, images=(), system=None) -> dict:
        """Chat messages (with one `<image>` per image) and images (any `to_medical_image` form) -> generate()
        inputs: input_ids (1, S) int64, attention_mask (1, S), pixel_values (N, 3, S, S) float32, a list in dynamic
        mode, or None. The same checks as `build_request`, without generation options."""
        request = build_request(self, messages=messages, images=list(images), system=system, limits=self.limits)
        return request.generate_inputs()

    def decode(self, ids, skip_special_tokens=True) -> list[str]:
        """ids: (batch, seq) or one sequence (seq,), tensor, array or lists -> one string per sequence."""
        if getattr(ids, "ndim", 2) == 1:  # one sequence: as a batch of one (batch_decode of 1-D is deprecated)
            ids = ids[None]
        elif isinstance(ids, (list, tuple)) and ids and not isinstance(ids[0], (list, tuple)) \
                and getattr(ids[0], "ndim", 0) == 0:
            ids = [list(ids)]
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def eos_token_ids(self) -> list[int]:
        """Where a chat reply ends: the tokenizer's eos and `<|im_end|>`."""
        from gmaivl_rt.train.tokenizer import chat_stop_ids

        return chat_stop_ids(self.tokenizer)

    def ask(self, question=None, image=None, *, messages=None, images=None, system=None, frame=None,
            slice_index=None, plane=None, window=None, **generation) -> str:
        """Answer a question about an image (or none), or the next turn of `messages`: `build_request` (all its
        checks), then generate and decode. image: a path, bytes, a file object, a pydicom Dataset, a nibabel or
        PIL image, an array or a MedicalImage. `generation` overrides DEFAULT_GENERATION (GMAI-VL's demo
        settings, greedy)."""
        request = self.build_request(question, image, messages=messages, images=images, system=system, frame=frame,
                                     slice_index=slice_index, plane=plane, window=window, **generation)
        out = self.generate(**request.generate_inputs(), **request.generation)
        return self.decode(out[:, request.prompt_tokens:])[0].strip()


class TorchBackend(_ChatHelpers):
    """`GMAIVL.from_pretrained(path)` behind the common backend interface."""

    name = "torch"

    def __init__(self, path, dtype=None, device=None):
        from gmaivl_rt.checkpoint import inference_dtype, stored_float_dtype
        from gmaivl_rt.model import GMAIVL

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


class GraphBackend(_ChatHelpers):
    """The generation loop over exported graphs. Subclasses implement:
    `_vision(pixel_values (N, 3, H, W) float32 torch) -> (N, T, hidden) torch`,
    `_embed(ids (B, S) int64 torch) -> (B, S, hidden) torch`,
    `_decode(embeds, attention_mask (B, P+S), position_ids (B, S), logits_indices (B, K) int64, past)
    -> (logits (B, K, V) fp32 torch at those positions of the S new ones, past)`,
    `_empty_past(batch)`; `past` is whatever the backend keeps its cache in (arrays, device buffers).
    Generation asks only for each row's last real token (`last_token_indices`), so a prefill computes one row of
    logits per sequence, not S."""

    name = "graphs"

    def _init_from_deploy(self, deploy: dict):
        from gmaivl_rt.config import GMAIVLConfig

        self.deploy = deploy
        self.config = GMAIVLConfig.from_hf_config(deploy["config"])
        self.image_token_index = int(deploy["image"]["image_token_index"])

    # ------------------------------------------------------------------ inputs
    def _check_pixels(self, pixel_values) -> list[torch.Tensor]:
        """-> a list of (n, 3, H, W) float32 batches, each of one image size, in image order."""
        vision = self.config.vision
        if isinstance(pixel_values, (list, tuple)):
            images = [torch.as_tensor(p) for p in pixel_values]
            for i, img in enumerate(images):
                if img.dim() != 3:
                    raise InputError(f"pixel_values[{i}] has shape {tuple(img.shape)}; expected (3, H, W)")
            batches = [img[None] for img in images]
        else:
            pixel_values = torch.as_tensor(pixel_values)
            if pixel_values.dim() != 4:
                raise InputError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected (num_images, 3, H, W)")
            batches = [pixel_values]
        for b in batches:
            if not b.is_floating_point():
                raise InputError(f"pixel_values must be floating point (CLIP-normalised), got {b.dtype}")
            n, c, h, w = b.shape
            if c != 3:
                raise InputError(f"pixel_values has {c} channels; expected 3")
            if vision.dynamic_resolution:
                if h % vision.patch_size or w % vision.patch_size:
                    raise InputError(f"image of {h}x{w}: dynamic resolution needs sides that are multiples of the "
                                     f"patch size {vision.patch_size}")
            elif (h, w) != (vision.image_size, vision.image_size):
                raise InputError(f"image of {h}x{w}, but this model takes {vision.image_size}x{vision.image_size} "
                                 "images (preprocess them with gmaivl_rt.chat.preprocess_image)")
        if vision.dynamic_resolution and len(batches) > 1:  # group consecutive equal sizes into one run
            grouped = [batches[0]]
            for b in batches[1:]:
                if b.shape[2:] == grouped[-1].shape[2:]:
                    grouped[-1] = torch.cat([grouped[-1], b])
                else:
                    grouped.append(b)
            batches = grouped
        return [b.to(torch.float32) for b in batches]

    def encode_images(self, pixel_values) -> torch.Tensor:
        """(N, 3, H, W) or a list of (3, H_i, W_i) -> projected features (total_image_tokens, hidden) fp32."""
        feats = [self._vision(batch) for batch in self._check_pixels(pixel_values)]
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in feats]).float()

    def _prompt_embeds(self, input_ids, pixel_values):
        embeds = self._embed(input_ids)
        is_image = input_ids == self.image_token_index
        n_tokens = int(is_image.sum())
        if pixel_values is None:
            if n_tokens:
                raise InputError(f"input_ids hold {n_tokens} image tokens but no pixel_values were given")
            return embeds
        features = self.encode_images(pixel_values)
        if features.shape[0] != n_tokens:
            raise InputError(f"input_ids hold {n_tokens} image tokens but pixel_values give {features.shape[0]} "
                             "image features (expand <image> to the image token count)")
        embeds = embeds.clone()
        embeds[is_image.to(embeds.device)] = features.to(embeds.device, embeds.dtype)
        return embeds

    @staticmethod
    def _check_ids(input_ids, attention_mask):
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise InputError(f"input_ids must be a (batch, seq) integer tensor, got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        mask = torch.ones_like(input_ids) if attention_mask is None else torch.as_tensor(attention_mask)
        if mask.shape != input_ids.shape:
            raise InputError(f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(input_ids.shape)}")
        mask = mask.to(torch.int64)
        if bool((mask.sum(1) == 0).any()):
            raise InputError("a prompt is empty (its attention_mask is all zeros)")
        if bool((mask[:, -1] == 0).any()):
            raise InputError("attention_mask has padding at the end of a row: pad prompts on the left")
        return input_ids.to(torch.int64), mask

    @staticmethod
    def last_token_indices(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
        """attention_mask (B, P+S) -> (B, 1) int64: per row, the index among the last `seq_len` positions of its
        last real (mask 1) token, whatever the padding side (S - 1 under left padding)."""
        window = attention_mask[:, -seq_len:].to(torch.int64)
        ranks = window * torch.arange(1, seq_len + 1, device=window.device)
        return ranks.argmax(dim=1, keepdim=True)

    # ------------------------------------------------------------------ generation
    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor, pixel_values=None) -> tuple[torch.Tensor, dict]:
        """Run a left-padded prompt batch through the graphs.
        input_ids, mask (B, S) int64 -> (logits (B, V) fp32 at each row's last real token, step state). The state
        (mask, next positions, the graphs' cache) is what `advance` takes; `generate` and the engine's
        `GraphStepper` both go through these two, so their mask/position bookkeeping is one piece."""
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits, past = self._decode(self._prompt_embeds(input_ids, pixel_values), mask, positions,
                                    self.last_token_indices(mask, mask.shape[1]), self._empty_past(mask.shape[0]))
        return logits[:, 0], {"mask": mask, "position": positions[:, -1:] + 1, "past": past}

    def advance(self, state: dict, next_tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row: next_tokens (B,) int64 -> logits (B, V) fp32; `state` (from `prefill`) advances
        in place."""
        state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=1)
        logits, state["past"] = self._decode(self._embed(next_tokens[:, None]), state["mask"], state["position"],
                                             self.last_token_indices(state["mask"], 1), state["past"])
        state["position"] = state["position"] + 1
        return logits[:, 0]

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0, eos_token_id=None,
                 pad_token_id=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """As `GMAIVL.generate`: input_ids (B, S) left-padded -> (B, S + new) int64 on the CPU."""
        input_ids, mask = self._check_ids(input_ids, attention_mask)
        state = {}

        def prefill():
            logits, prefilled = self.prefill(input_ids, mask, pixel_values)
            state.update(prefilled)
            return logits

        return generate_tokens(prefill, lambda next_tokens: self.advance(state, next_tokens), input_ids,
                               self.config.text, max_new_tokens=max_new_tokens,
                               do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
                               repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                               eos_token_id=eos_token_id, pad_token_id=pad_token_id, generator=generator)

    # ------------------------------------------------------------------ for subclasses
    def _vision(self, pixel_values):
        raise NotImplementedError

    def _embed(self, ids):
        raise NotImplementedError

    def _decode(self, embeds, attention_mask, position_ids, logits_indices, past):
        raise NotImplementedError

    def _empty_past(self, batch):
        raise NotImplementedError


def add_backend_options(parser) -> None:
    """--backend, --device and --dtype, as `ask`, `serve` and `eval` all take them; `backend_options` reads them."""
    parser.add_argument("--backend", default="torch", choices=BACKENDS)
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: torch cpu; onnx CUDA when onnxruntime-gpu has it, "
                             "else cpu; tensorrt cuda)")
    from gmaivl_rt.checkpoint import DTYPE_NAMES

    parser.add_argument("--dtype", default=None, choices=tuple(DTYPE_NAMES),
                        help="torch backend weight dtype (default: as stored; on CUDA an fp32 checkpoint loads in "
                             "bf16, fp16 on GPUs before sm_80)")


def backend_options(args) -> dict:
    """The parsed --backend/--device/--dtype -> `load()`'s keyword arguments for that backend (backend excluded).
    --dtype with a graph backend is refused rather than ignored."""
    from gmaivl_rt.checkpoint import DTYPE_NAMES

    if args.backend == "torch":
        return {"device": args.device, "dtype": DTYPE_NAMES.get(args.dtype)}
    if args.dtype is not None:
        raise InputError(f"--dtype applies to the torch backend only; the {args.backend} backend runs the dtype "
                         "its graphs were exported in")
    return {} if args.device is None else {"device": args.device}


def register(subparsers) -> None:
    p = subparsers.add_parser("ask", help="answer a question about a medical image with a model or exported folder")
    p.add_argument("model", help="model folder (config.json, safetensors, tokenizer.json) or exported folder")
    p.add_argument("--image", help="DICOM, NIfTI, PNG, JPEG, TIFF or BMP file")
    p.add_argument("--question", required=True)
    add_backend_options(p)
    p.add_argument("--system", default=None, help="optional system prompt")
    g = DEFAULT_GENERATION
    p.add_argument("--max-new-tokens", type=int, default=g["max_new_tokens"], help="default %(default)s")
    p.add_argument("--do-sample", action="store_true", default=g["do_sample"],
                   help="sample (with --temperature, --top-p, --top-k) instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=g["temperature"], help="default %(default)s")
    p.add_argument("--top-p", type=float, default=g["top_p"], help="default %(default)s")
    p.add_argument("--top-k", type=int, default=g["top_k"], help="default %(default)s (0: off)")
    p.add_argument("--repetition-penalty", type=float, default=g["repetition_penalty"], help="default %(default)s")
    p.add_argument("--no-repeat-ngram-size", type=int, default=g["no_repeat_ngram_size"],
                   help="default %(default)s (0: off)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling RNG (reproducible --do-sample)")
    p.add_argument("--frame", type=int, default=None, help="DICOM / TIFF frame (default 0)")
    p.add_argument("--slice", type=int, default=None, dest="slice_index",
                   help="NIfTI slice along --plane (default the middle one)")
    p.add_argument("--plane", default=None, choices=("axial", "coronal", "sagittal"), help="NIfTI plane")
    p.add_argument("--window", default=None,
                   help="intensity window: a CT window name (lung, mediastinum, bone, brain, abdomen), percentile, "
                        "minmax, or CENTRE,WIDTH")
    p.set_defaults(func=_ask_cli)


def _cli_window(text):
    if text is None or "," not in text:
        return text
    try:
        centre, width = (float(v) for v in text.split(","))
    except ValueError:
        raise InputError("--window must be a name or CENTRE,WIDTH (two numbers)") from None
    return centre, width


def _ask_cli(args) -> int:
    backend = load(args.model, backend=args.backend, **backend_options(args))
    backend.tokenizer  # noqa: B018  (a folder without a tokenizer cannot answer: say so before reading the image)
    generation = {key: getattr(args, key) for key in DEFAULT_GENERATION}
    if args.seed is not None:  # logits reach the sampler on the model's device (torch) or the CPU (graphs)
        model = getattr(backend, "model", None)
        device = model.lm_head.weight.device if model is not None else "cpu"
        generation["generator"] = torch.Generator(device=device).manual_seed(args.seed)
    print(backend.ask(args.question, args.image, system=args.system, frame=args.frame,
                      slice_index=args.slice_index, plane=args.plane, window=_cli_window(args.window), **generation))
    return 0
