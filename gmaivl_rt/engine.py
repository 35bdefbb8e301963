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
import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from gmaivl_rt.limits import SAMPLING_OPTIONS
from gmaivl_rt.sampling import SamplingParams, StopRule, decode_step

_END = object()


class Request:
    """One submitted question. Iterate it for text deltas (blocks until each arrives); `result(timeout)` waits
    for the whole answer (str); `cancel()` stops it and frees its slot and KV blocks.
    prompt_tokens, generated_tokens: counts; token_ids: the generated ids (eos included); finish_reason: None while running, then "stop" | "length" |
    "cancelled" | "error"; arrival_time (submit), scheduled_time (first admitted to a batch), first_token_time
    (first token produced), finish_time: time.time() stamps (None until reached)."""

    def __init__(self, engine, request_id: int, sink=None):
        self.id, self._engine = request_id, engine
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.arrival_time = time.time()
        self.scheduled_time: float | None = None
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
    def _scheduled(self) -> None:
        if self.scheduled_time is None:  # a preempted request keeps its first admission time
            self.scheduled_time = time.time()

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
               _sink=None, **options) -> Request:
        """Queue one request and return at once (thread-safe). question + image, or chat `messages` with `images`,
        as `backend.build_request` takes them (also frame, slice_index, plane, window); generation options:
        max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty, no_repeat_ngram_size,
        eos_token_id, pad_token_id, plus seed (int: reproducible sampling, alone or batched) and stop (strings
        that end the answer, not included). Errors in the input (InputError, LimitError) surface from the request
        (result / iteration), never from the engine."""
        request = Request(self, next(self._ids), sink=_sink)
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._preparing += 1
        self._prep_pool.submit(self._prepare, request, question, image, messages, images, system, options)
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
    def _prepare(self, request, question, image, messages, images, system, options):
        try:
            own, rest = split_engine_options(options)
            prepared = self.backend.build_request(question, image, messages=messages, images=images, system=system,
                                                  **rest)
            seq = self._stepper.make_sequence(request, prepared, own)
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
ENGINE_OPTIONS = ("seed", "stop")  # generation options the engine handles itself; the rest go to build_request


def split_engine_options(options: dict) -> tuple[dict, dict]:
    """(engine options: seed (int) and stop (str or list of str), checked; everything else, for build_request)."""
    from gmaivl_rt.errors import InputError

    own = {k: options[k] for k in ENGINE_OPTIONS if options.get(k) is not None}
    rest = {k: v for k, v in options.items() if k not in ENGINE_OPTIONS}
    if "seed" in own and (isinstance(own["seed"], bool) or not isinstance(own["seed"], int)):
        raise InputError(f"seed must be an int, got {type(own['seed']).__name__}")
    stop = own.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise InputError("stop must be a non-empty string or a list of at most 16 of them")
    own["stop"] = list(stop)
    return own, rest


def sequence_from_request(request: Request, prepared, engine_options: dict, text_config, image_token_index: int,
                          tokens_per_image, device=None) -> Sequence:
    """The scheduler's view of a `gmaivl_rt.request.PreparedRequest` (generation options already validated
    there): sampling parameters, stop rule, a generator seeded from `seed`, stop strings, and each image's token
    span in the prompt."""
    options = dict(prepared.generation)
    max_new_tokens = options.pop("max_new_tokens")
    stop = StopRule.from_config(text_config, options.pop("eos_token_id", None), options.pop("pad_token_id", None))
    params = SamplingParams(**{k: options.pop(k) for k in SAMPLING_OPTIONS if k in options})
    generator = options.pop("generator", None)
    if engine_options.get("seed") is not None:
        generator = torch.Generator(device=device or "cpu").manual_seed(engine_options["seed"])
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
                    generator, engine_options.get("stop", []),
                    sequences=prepared.input_ids.to(device=device, dtype=torch.int64))
