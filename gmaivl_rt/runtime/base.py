"""What every backend shares: the folder's tokenizer (loaded once, checked against the model), the request
boundary (`build_request`), the answer options `seed` and `stop` (`answer_options`, `cut_at_stop`) and `ask`. A
backend adds `generate` over its own way of running the model. The serving engine takes the same options through
the same functions, so `ask` and `Engine.ask` accept one set."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gmaivl_rt.errors import InputError, ModelError
from gmaivl_rt.limits import DEFAULT_LIMITS, Limits
from gmaivl_rt.model.sampling import DecodeTrace, seeded_generator
from gmaivl_rt.runtime.request import PreparedRequest, build_request

# What a folder's tokenizer is looked for in (transformers' fast tokenizer, or a sentencepiece model + config).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# Options about the answer that `generate` does not take: seed (int: reproducible sampling) and stop (strings that
# end the answer, not included). `ask` and `Engine.submit` / `Engine.ask` take them beside the generation options.
ANSWER_OPTIONS = ("seed", "stop")
MAX_STOP_STRINGS = 16


def check_stop(stop) -> list[str]:
    """stop: None, a non-empty string or a list of at most 16 of them -> the list; InputError otherwise."""
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop) \
            or len(stop) > MAX_STOP_STRINGS:
        raise InputError(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them")
    return list(stop)


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """The answer ends before its first stop string: (text cut there, whether any stop string occurred)."""
    stopped = False
    for s in stop:
        at = text.find(s)
        if at >= 0:
            text, stopped = text[:at], True
    return text, stopped


@dataclass
class Answer:
    """One answer with what `ask` leaves out. text: the answer (as `ask` returns it); token_ids: the generated ids
    (eos included); finish_reason: "stop" (an eos or a stop string) | "length" (max_new_tokens reached);
    logprobs: a `gmaivl_rt.model.sampling.TokenLogprob` per generated token when `logprobs=True` was asked, else
    None; complete: with a constraint, whether the answer satisfies it (False: cut by max_new_tokens, partial),
    None without one."""
    text: str
    token_ids: list
    finish_reason: str
    logprobs: list | None = None
    complete: bool | None = None


class Backend:
    """Tokenizer and template helpers shared by the backends (need the tokenizer files in the folder)."""

    path: Path
    config = None
    limits: Limits = DEFAULT_LIMITS
    _tokenizer = None
    _generation = None  # a GenerationDefaults; `load()` sets it from its `generation_config` argument
    _constraint_compiler = None
    _prepared_images = None

    @property
    def prepared_images(self):
        """The images this runtime prepared lately, kept for follow-up questions (a
        `gmaivl_rt.runtime.prepared_images.PreparedImageCache`; `gmaivl_rt.load(..., prepared_image_cache_bytes=N)`
        sizes it, default `gmaivl_rt.limits.PREPARED_IMAGE_CACHE_BYTES`, 0 keeps nothing)."""
        if self._prepared_images is None:
            from gmaivl_rt.runtime.prepared_images import PreparedImageCache

            self._prepared_images = PreparedImageCache()
        return self._prepared_images

    @prepared_images.setter
    def prepared_images(self, value) -> None:
        self._prepared_images = value

    @property
    def generation(self):
        """Where this backend's decoding defaults come from and what they are (`GenerationDefaults`: options,
        origin), resolved by `gmaivl_rt.runtime.generation_config` ("auto" from the folder unless `load()` was
        told otherwise)."""
        if self._generation is None:
            from gmaivl_rt.runtime.generation_config import resolve_generation_config

            self._generation = resolve_generation_config("auto", self.path)
        return self._generation

    @generation.setter
    def generation(self, value) -> None:
        self._generation = value

    @property
    def generation_defaults(self) -> dict:
        """The decoding options a request that leaves one out gets (every field of `DECODING_FIELDS`)."""
        return dict(self.generation.options)

    @property
    def tokenizer(self):
        """The folder's tokenizer, loaded once and checked against the model; ModelError naming the folder and the
        files looked for when it is missing, unloadable or does not fit."""
        if self._tokenizer is None:
            from gmaivl_rt.runtime.tokenizer import check_tokenizer_fits, load_tokenizer

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
        """The checked request (`gmaivl_rt.runtime.request.build_request`): a question about `image` (or none), or chat
        `messages` (str content with `<image>` slots, or OpenAI-style text / image parts) with `images` in slot
        order. Images: any form `gmaivl_rt.medical.convert.to_medical_image` takes; frame / slice_index / plane /
        window reach its reader. generation: options over `generation_defaults`, validated for every backend alike.
        Raises InputError / LimitError (bad or oversized request), ModelError (no usable tokenizer)."""
        return build_request(self, question, image, messages=messages, images=images, system=system, frame=frame,
                             slice_index=slice_index, plane=plane, window=window, generation=generation,
                             limits=self.limits)

    @property
    def sampling_device(self):
        """Where this backend's logits reach the sampler (and a seeded generator must live): the CPU here; the
        torch backend overrides it with the model's device."""
        return "cpu"

    def answer_options(self, options: dict) -> tuple[dict, list[str]]:
        """Split `ask` / `Engine.submit` keyword options: (the generation options for `build_request`, with a
        `seed` turned into its seeded `generator` (it wins over a `generator` given too), the checked stop
        strings). InputError for a bad seed or stop."""
        generation = {k: v for k, v in options.items() if k not in ANSWER_OPTIONS}
        if options.get("seed") is not None:
            generation["generator"] = seeded_generator(options["seed"], self.sampling_device)
        return generation, check_stop(options.get("stop"))

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
        from gmaivl_rt.runtime.tokenizer import chat_stop_ids

        return chat_stop_ids(self.tokenizer)

    def compile_constraint(self, constraint):
        """A `gmaivl_rt.model.constraint.Constraint` -> its CompiledConstraint for this folder's tokenizer (cached
        by the constraint's hash). InputError before any decoding when it cannot be compiled or nothing satisfies
        it."""
        if self._constraint_compiler is None:
            from gmaivl_rt.model.constraint import ConstraintCompiler

            self._constraint_compiler = ConstraintCompiler(self.tokenizer, self.config.text.vocab_size,
                                                           self.eos_token_ids)
        return self._constraint_compiler.compile(constraint)

    def ask(self, question=None, image=None, **kwargs) -> str:
        """Answer a question about an image (or none), or the next turn of `messages`: `build_request` (all its
        checks), then generate and decode. image: a path, bytes, a file object, a pydicom Dataset, a nibabel or
        PIL image, an array or a MedicalImage. Options: generation options over `generation_defaults` (the model
        folder's generation_config.json, else plain greedy; json_schema / choice / regex constrain the answer),
        plus seed and stop (`answer_options`), as `Engine.ask` takes them. `answer(...).text`."""
        return self.answer(question, image, **kwargs).text

    def answer(self, question=None, image=None, *, messages=None, images=None, system=None, frame=None,
               slice_index=None, plane=None, window=None, **options) -> Answer:
        """`ask` with the rest of the answer: an `Answer` (text, token ids, finish reason, logprobs when
        `logprobs=True` (and `top_logprobs=k`), whether a constraint is satisfied). InputError when a constraint
        leaves the answer no token to go on with (the grammar engine reached a dead end)."""
        generation, stop = self.answer_options(options)
        request = self.build_request(question, image, messages=messages, images=images, system=system, frame=frame,
                                     slice_index=slice_index, plane=plane, window=window, **generation)
        trace = DecodeTrace()
        out = self.generate(**request.generate_inputs(), **request.generation, trace=trace)
        if trace.failed and trace.failed[0]:
            raise InputError("the constraint allows no next token: the answer cannot be finished under it")
        ids = out[0, request.prompt_tokens:].tolist()
        stop_ids = request.generation.get("eos_token_id") or []
        stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
        ended = next((i for i, t in enumerate(ids) if t in stop_ids), None)
        if ended is not None:  # anything after the eos is padding
            ids = ids[:ended + 1]
        text, stopped = cut_at_stop(self.decode([ids])[0].lstrip(), stop)
        complete = trace.complete[0] if trace.complete else None
        logprobs = trace.logprobs[0] if request.generation.get("logprobs") else None
        return Answer(text.rstrip(), ids, "stop" if ended is not None or stopped else "length", logprobs, complete)
