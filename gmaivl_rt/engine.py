"""The serving engine: requests batched as they arrive, tokens streamed as they are produced.

    from gmaivl_rt import Engine
    with Engine("model_dir", backend="torch", max_batch_size=16) as engine:
        request = engine.submit("Which plane is this?", image="scan.dcm", max_new_tokens=64)
        for delta in request:          # text deltas; joined they equal request.result()
            print(delta, end="")
        engine.ask(question, image)    # = engine.submit(...).result()
        async for delta in engine.stream(question, image=...): ...
        engine.stats()

How it works (torch backend): `submit` hands the request to a worker pool that reads and preprocesses its images
and builds its prompt (the runtime's request boundary), then to a scheduler thread. Every iteration the scheduler
admits waiting requests while there is room (batch slots and KV blocks), runs one forward over the new requests'
prompts (vision tower + prefill, packed) together with one decode token of every running request, picks each
request's next token with the decoding step every backend shares (`gmaivl_rt.sampling.decode_step`), streams it and
retires finished requests at once. Keys and values live in a `PagedKVCache`; when it runs out of blocks, the
youngest running request is preempted (its blocks freed, recomputed later). Full blocks of finished requests stay
in a prefix cache, so a follow-up about the same image skips the vision tower and the prefill of the shared part.
Graph backends (onnx, tensorrt) run the requests waiting together as one static batch (`gmaivl_rt.engine_graph`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from gmaivl_rt.errors import GmaivlError, LimitError
from gmaivl_rt.sampling import SamplingParams, StopRule, decode_step

_END = object()
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "no_repeat_ngram_size")


class Request:
    """One submitted question. Iterate it for text deltas (blocks until each arrives); `result(timeout)` waits
    for the whole answer (str); `cancel()` stops it and frees its slot and KV blocks.
    prompt_tokens, generated_tokens: counts; token_ids: the generated ids (eos included); finish_reason: None while running, then "stop" | "length" |
    "cancelled" | "error"; arrival_time (submit), first_token_time (first token
    produced), finish_time: time.time() stamps (None until reached)."""

    def __init__(self, engine, request_id: int, sink=None):
        self.id, self._engine = request_id, engine
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.arrival_time = time.time()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.cancel_requested = False
        self._deltas: queue.Queue = queue.Queue()
        self._sink = sink
        self._text: list[str] = []
        self._done = threading.Event()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ user side
    def __iter__(self):
        while True:
            item = self._deltas.get()
            if item is _END:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def result(self, timeout: float | None = None) -> str:
        """The whole answer; raises the request's error (InputError, LimitError, ...) if it failed, TimeoutError
        when it is not done within `timeout` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} is not finished after {timeout} s")
        if self.error is not None:
            raise self.error
        return "".join(self._text)

    def cancel(self) -> None:
        """Stop generating; the answer so far stays in result(). Frees the slot and KV blocks at the next step."""
        self.cancel_requested = True
        self._engine._wake()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def text(self) -> str:
        return "".join(self._text)

    # ------------------------------------------------------------------ engine side
    def _push(self, delta: str) -> None:
        if not delta:
            return
        self._text.append(delta)
        self._emit(delta)

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self.finish_reason, self.error, self.finish_time = reason, error, time.time()
            self._done.set()
        self._emit(_END)

    def _emit(self, item) -> None:
        self._deltas.put(item)
        if self._sink is not None:
            self._sink(item)


@dataclass
class Sequence:
    """What the scheduler keeps for one request: its token ids, images, decoding state and KV blocks."""
    request: Request
    ids: list                 # prompt ids, then generated ids
    prompt_len: int
    pixels: list              # one (3, H, W) tensor per image, in prompt order
    image_spans: list         # [(start, end)) of each image's tokens in ids
    image_keys: list
    params: SamplingParams
    stop: StopRule
    max_new_tokens: int
    generator: torch.Generator | None
    stop_strings: list
    sequences: torch.Tensor = None   # (1, S) int64 ids so far, for the sampling rules
    blocks: list = field(default_factory=list)
    cached: int = 0                 # tokens whose keys/values are in `blocks`
    emitted: str = ""               # text streamed so far
    hit_tokens: int = 0             # prompt tokens found in the prefix cache at admission

    @property
    def generated(self) -> list:
        return self.ids[self.prompt_len:]


class Engine:
    """Continuous batching over a paged KV cache (torch backend) or static batches per step (graph backends).

    model_dir: a model folder (torch) or an exported folder (onnx / tensorrt); backend: "torch" | "onnx" |
    "tensorrt"; max_batch_size: requests decoded together; kv_cache_tokens: KV pool size in tokens (default:
    max_batch_size x 1024, at most the model's context per request); block_size: tokens per KV block;
    workers: threads that read images and build prompts; backend_kwargs go to `gmaivl_rt.load` (dtype, device,
    providers, ...)."""

    def __init__(self, model_dir, backend: str = "torch", max_batch_size: int = 16, kv_cache_tokens: int | None = None,
                 *, block_size: int = 16, workers: int = 2, **backend_kwargs):
        from gmaivl_rt.runtime import load

        if max_batch_size < 1 or block_size < 1:
            raise ValueError(f"max_batch_size ({max_batch_size}) and block_size ({block_size}) must be >= 1")
        self.backend = load(model_dir, backend=backend, **backend_kwargs)
        self.tokenizer = self.backend.tokenizer
        self.max_batch_size = max_batch_size
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._preparing = 0
        self._closed = False
        self._counters = {"generated_tokens": 0, "prompt_tokens": 0, "prefix_cache_hits": 0,
                          "prefix_cache_hit_tokens": 0, "preemptions": 0, "finished": 0}
        self._prep_pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gmaivl-prep")
        if backend == "torch":
            from gmaivl_rt.engine_torch import TorchStepper

            self._stepper = TorchStepper(self, block_size, kv_cache_tokens)
        else:
            from gmaivl_rt.engine_graph import GraphStepper

            self._stepper = GraphStepper(self)
        self._thread = threading.Thread(target=self._loop, name="gmaivl-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API
    def submit(self, question: str | None = None, image=None, *, messages=None, images=None, system=None,
               _sink=None, **generation) -> Request:
        """Queue one request and return at once (thread-safe). question + image (a path, MedicalImage, PIL image
        or uint8 array), or chat `messages` with `images`; generation: max_new_tokens, do_sample, temperature,
        top_p, top_k, repetition_penalty, no_repeat_ngram_size, seed (reproducible sampling), stop (strings),
        eos_token_id, pad_token_id. Errors in the input surface from the request (result / iteration)."""
        request = Request(self, next(self._ids), sink=_sink)
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._preparing += 1
        self._prep_pool.submit(self._prepare, request, question, image, messages, images, system, generation)
        return request

    def ask(self, question: str | None = None, image=None, **kwargs) -> str:
        """submit(...).result(): the whole answer."""
        return self.submit(question, image, **kwargs).result()

    async def stream(self, question: str | None = None, image=None, **kwargs):
        """Async iterator of text deltas; never blocks the event loop. Leaving the loop early cancels the request."""
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue = asyncio.Queue()
        request = self.submit(question, image, _sink=lambda item: loop.call_soon_threadsafe(deltas.put_nowait, item),
                              **kwargs)
        try:
            while (item := await deltas.get()) is not _END:
                yield item
            if request.error is not None:
                raise request.error
        finally:
            if not request.done:
                request.cancel()

    def stats(self) -> dict:
        """running, waiting (being prepared or queued), kv_blocks_used, kv_blocks_free, kv_blocks_cached,
        kv_blocks_peak (most in use at once), kv_block_size, kv_block_bytes, generated_tokens, prompt_tokens, prefix_cache_hits, prefix_cache_hit_tokens, preemptions, finished."""
        with self._cv:
            return {"running": len(self._running), "waiting": len(self._waiting) + self._preparing,
                    **self._stepper.block_stats(), **self._counters}

    def close(self, cancel: bool = False) -> None:
        """Stop taking requests; finish the ones in flight (or cancel them with cancel=True); join the thread."""
        with self._cv:
            if self._closed and not self._thread.is_alive():
                return
            self._closed = True
            self._cv.notify_all()
        self._prep_pool.shutdown(wait=True)
        if cancel:
            with self._cv:
                for seq in [*self._waiting, *self._running]:
                    seq.request.cancel_requested = True
                self._cv.notify_all()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(cancel=exc[0] is not None)

    # ------------------------------------------------------------------ preparation (worker pool)
    def _prepare(self, request, question, image, messages, images, system, generation):
        try:
            seq = self._stepper.make_sequence(request, build_request(self.backend, question, image, messages, images,
                                                                     system, generation))
        except BaseException as e:  # a bad request fails itself only
            with self._cv:
                self._preparing -= 1
            request._finish("error", e if isinstance(e, Exception) else RuntimeError(str(e)))
            return
        with self._cv:
            self._preparing -= 1
            self._counters["prompt_tokens"] += seq.prompt_len
            self._waiting.append(seq)
            self._cv.notify_all()

    # ------------------------------------------------------------------ scheduler thread
    def _wake(self):
        with self._cv:
            self._cv.notify_all()

    def _loop(self):
        while True:
            with self._cv:
                while not (self._waiting or self._running) and not (self._closed and not self._preparing):
                    self._cv.wait()
                if not (self._waiting or self._running) and self._closed and not self._preparing:
                    return
                self._drop_cancelled()
            try:
                self._stepper.step()
            except Exception as e:  # a failure outside any one request: fail those in flight, keep serving
                with self._cv:
                    for seq in [*self._running]:
                        self._retire(seq, "error", e)

    def _drop_cancelled(self):
        for seq in [s for s in self._waiting if s.request.cancel_requested]:
            self._waiting.remove(seq)
            self._retire(seq, "cancelled")
        for seq in [s for s in self._running if s.request.cancel_requested]:
            self._retire(seq, "cancelled")

    def _retire(self, seq: Sequence, reason: str, error: BaseException | None = None):
        """Remove a sequence from the running list, return its blocks, finish its request (under self._cv)."""
        if seq in self._running:
            self._running.remove(seq)
        self._stepper.release(seq, keep_prefix=reason in ("stop", "length"))
        if reason in ("stop", "length", "cancelled"):
            self._flush_text(seq, final=True)
        self._counters["finished"] += 1
        seq.request._finish(reason, error)

    # ------------------------------------------------------------------ tokens -> text
    def _accept_token(self, seq: Sequence, logits: torch.Tensor) -> bool:
        """Pick, record and stream the next token of `seq` from its last-position logits (1, V); True when the
        request is finished (and retired)."""
        finished = torch.zeros(1, dtype=torch.bool, device=seq.sequences.device)
        token, seq.sequences, finished = decode_step(logits, seq.sequences, finished, seq.params, seq.stop,
                                                     seq.generator)
        seq.ids.append(int(token))
        seq.request.token_ids.append(int(token))
        if seq.request.first_token_time is None:
            seq.request.first_token_time = time.time()
        seq.request.generated_tokens += 1
        self._counters["generated_tokens"] += 1
        reason = "stop" if bool(finished) else ("length" if len(seq.generated) >= seq.max_new_tokens else None)
        if reason is None and self._flush_text(seq, final=False):
            reason = "stop"
        if reason is not None:
            with self._cv:
                self._retire(seq, reason)
            return True
        return False

    def _flush_text(self, seq: Sequence, final: bool) -> bool:
        """Stream the new part of the decoded answer. Held back while unsure: an incomplete UTF-8 character,
        trailing spaces (the answer is stripped, as `ask` strips it) and a possible start of a stop string.
        True when a stop string appeared (the text is cut before it)."""
        text = self.tokenizer.decode(seq.generated, skip_special_tokens=True).lstrip()
        stopped = False
        for s in seq.stop_strings:
            at = text.find(s)
            if at >= 0:
                text, stopped, final = text[:at], True, True
        if final:
            text = text.rstrip()
        else:
            if text.endswith("\ufffd"):
                return False
            text = text.rstrip()
            hold = max((len(s) - 1 for s in seq.stop_strings), default=0)
            text = text[:len(text) - hold] if hold else text
        if text.startswith(seq.emitted) and len(text) > len(seq.emitted):
            seq.request._push(text[len(seq.emitted):])
            seq.emitted = text
        return stopped


# ---------------------------------------------------------------------------------------------- request boundary
@dataclass
class PreparedRequest:
    """What the engine needs of one request: input_ids (1, S) int64, pixel_values ((N, 3, H, W), a list of
    (3, H_i, W_i) in dynamic mode, or None), generation options and each image's content key."""
    input_ids: torch.Tensor
    pixel_values: object
    generation: dict
    image_keys: list
    prompt_tokens: int


def build_request(backend, question, image, messages, images, system, generation) -> PreparedRequest:
    """The runtime's request boundary: chat template, image reading and preprocessing, generation defaults.
    (Until `backend.build_request` lands, the same steps `ask` takes, through `backend.prepare`.)"""
    from gmaivl_rt.chat import IMAGE_TOKEN
    from gmaivl_rt.medical_io import MedicalImage, read_medical_image
    from gmaivl_rt.runtime import DEFAULT_GENERATION

    pictures = list(images or ([] if image is None else [image]))
    pictures = [read_medical_image(p) if isinstance(p, (str, bytes)) or hasattr(p, "__fspath__") else p
                for p in pictures]
    pictures = [p.pixels if isinstance(p, MedicalImage) else p for p in pictures]
    if messages is None:
        if question is None:
            raise GmaivlError("a request needs a question or messages")
        if pictures and IMAGE_TOKEN not in question:
            question = f"{IMAGE_TOKEN}\n{question}"
        messages = [{"role": "user", "content": question}]
    inputs = backend.prepare(messages, pictures, system=system)
    options = {**DEFAULT_GENERATION, "eos_token_id": backend.eos_token_ids,
               "pad_token_id": backend.tokenizer.pad_token_id or 0, **generation}
    pixels = inputs["pixel_values"]
    keys = [hashlib.sha256(p.contiguous().numpy().tobytes()).hexdigest() for p in (pixels if pixels is not None else [])]
    ids = inputs["input_ids"]
    return PreparedRequest(ids, pixels, options, keys, ids.shape[1])


def sequence_from_request(request: Request, prepared: PreparedRequest, text_config, image_token_index: int,
                          tokens_per_image, device=None) -> Sequence:
    """The scheduler's view of a prepared request: decoding options split into sampling parameters, stop rule,
    seeded generator and stop strings; image token spans located in the prompt."""
    options = dict(prepared.generation)
    max_new_tokens = int(options.pop("max_new_tokens"))
    seed = options.pop("seed", None)
    stop_strings = options.pop("stop", None) or []
    stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
    stop = StopRule.from_config(text_config, options.pop("eos_token_id", None), options.pop("pad_token_id", None))
    params = SamplingParams(**{k: options.pop(k) for k in SAMPLING_KEYS if k in options})
    if options:
        raise GmaivlError(f"unknown generation options: {', '.join(sorted(options))}")
    if max_new_tokens < 1:
        raise LimitError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device or "cpu").manual_seed(int(seed))
    ids = prepared.input_ids[0].tolist()
    pixels = prepared.pixel_values
    pixels = [] if pixels is None else list(pixels)
    spans, positions = [], [i for i, t in enumerate(ids) if t == image_token_index]
    start = 0
    for p in pixels:
        count = tokens_per_image(p.shape[-2], p.shape[-1])
        spans.append((positions[start], positions[start + count - 1] + 1))
        start += count
    request.prompt_tokens = len(ids)
    return Sequence(request, ids, len(ids), pixels, spans, list(prepared.image_keys), params, stop, max_new_tokens,
                    generator, stop_strings, sequences=prepared.input_ids.to(device=device, dtype=torch.int64))
