"""The serving engine: requests batched as they arrive, tokens streamed as they are produced.

    from gmaivl_rt import Engine
    with Engine("model_dir", backend="torch", max_batch_size=16) as engine:
        request = engine.submit("Which plane is this?", image="scan.dcm", max_new_tokens=64)
        for delta in request:          # text deltas; joined they equal request.result()
            print(delta, end="")
        engine.ask(question, image)    # = engine.submit(...).result()
        async for delta in engine.stream(question, image=...): ...
        engine.stats()

How it works (nano-vllm's shape):
- engine.py (here): the API, a worker pool that reads and preprocesses each request's images and builds its prompt
  (the runtime's request boundary, `backend.build_request`), and the scheduler thread's loop:
  `batch = scheduler.schedule(); logits = runner.run(batch); tokens = decode_step(...);
  scheduler.postprocess(batch, tokens)`. Tokens are picked by the decoding step every backend shares
  (`gmaivl_rt.model.sampling.decode_step`).
- sequence.py: `Request` (the handle `submit` returns) and `Sequence` (what the scheduler keeps per request).
- scheduler.py: `Scheduler`, owner of the waiting and running sequences, the KV blocks, admission, preemption and
  retirement. Torch backend: continuous batching over a paged KV cache, with a prefix cache, so a follow-up about
  the same image skips the vision tower and the prefill of the shared part. Graph backends (onnx, tensorrt): the
  requests waiting together run as one static batch.
- torch_runner.py / graph_runner.py: run a batch they are given, return logits. Beside them, paged_cache.py (the
  torch runner's KV tensors) and block_pool.py (the scheduler's block accounting and prefix cache).
"""
from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading

import torch

from gmaivl_rt.engine.loop_deltas import LoopDeltas, one_wakeup_per_loop
from gmaivl_rt.engine.scheduler import Batch, Scheduler, check_step_tokens
from gmaivl_rt.engine.sequence import END_OF_ANSWER, Request, Sequence, fail_request, sequence_from_request
from gmaivl_rt.errors import InputError
from gmaivl_rt.model.sampling import TokenLogprob, decode_rows, decode_step
from gmaivl_rt.runtime.backends import load

log = logging.getLogger("gmaivl_rt.engine")


class Engine:
    """Continuous batching over a paged KV cache (torch backend) or static batches per step (graph backends).

    model_dir: a model folder (torch) or an exported folder (onnx / tensorrt); backend: "torch" | "onnx" |
    "tensorrt"; max_batch_size: requests decoded together; kv_cache_tokens: KV pool size in tokens (default:
    max_batch_size x 1024, at most the model's context per request); block_size: tokens per KV block;
    workers: threads that read images and build prompts; compile (torch backend): run decode steps and short
    text-only prefills (one row per token) through torch.compile, warmed up for bucketed batch sizes
    (compile_buckets, default `compiled_decode.buckets_for`: powers of two up to max_batch_size, and 16) as the
    engine starts (requests submitted meanwhile wait); None reads GMAIVL_COMPILE (default: on for CUDA and
    the CPU; GMAIVL_COMPILE=0 or compile=False turns it off); a compile failure falls back to eager with one warning
    naming the cause
    (gmaivl_rt/engine/compiled_decode.py); max_step_tokens (torch backend): the most tokens one step feeds, at
    least max_batch_size (None, the default: no budget). Prompts (image tokens included) longer than what is left
    after the running requests' one decode token each are prefilled in chunks over several steps, so the running
    requests keep getting a token every step (chunked prefill; docs/engine.md); backend_kwargs go to `gmaivl_rt.load` (dtype, device, providers, ...)."""

    def __init__(self, model_dir, backend: str = "torch", max_batch_size: int = 16, kv_cache_tokens: int | None = None,
                 *, block_size: int = 16, workers: int = 2, compile: bool | None = None,
                 compile_buckets: list[int] | None = None, max_step_tokens: int | None = None, **backend_kwargs):
        if max_batch_size < 1 or block_size < 1:
            raise ValueError(f"max_batch_size ({max_batch_size}) and block_size ({block_size}) must be >= 1")
        check_step_tokens(max_step_tokens, max_batch_size, paged=backend == "torch")  # before loading the model
        self.backend = load(model_dir, backend=backend, **backend_kwargs)
        self.tokenizer = self.backend.tokenizer
        self.max_batch_size = max_batch_size
        # each runner imported where it is chosen: the torch runner pulls in the kernels, a graph engine needs none
        if backend == "torch":
            from gmaivl_rt.engine.torch_runner import TorchRunner

            from gmaivl_rt.engine.compiled_decode import compile_wanted

            model = self.backend.model
            self.runner = TorchRunner(model, block_size, kv_cache_tokens, max_batch_size,
                                      compile=compile_wanted(compile, model.lm_head.weight.device),
                                      compile_buckets=compile_buckets)
            self.scheduler = Scheduler(max_batch_size, self.runner.block_pool, self.tokenizer,
                                       self.runner.block_pool.blocks_for(self.backend.config.text.context_length),
                                       max_step_tokens=max_step_tokens, copy_tokens=self.runner.cache.copy_tokens)
        else:
            from gmaivl_rt.engine.graph_runner import GraphRunner

            self.runner = GraphRunner(self.backend)
            self.scheduler = Scheduler(max_batch_size, None, self.tokenizer)
        self._ids = itertools.count()
        self._cv = threading.Condition()  # guards the scheduler, _preparing and _closed
        self._preparing = 0
        self._closed = False
        self._prep_pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gmaivl-prep")
        # constraint masks are computed here while the runner runs the batch (the grammar engine frees the GIL)
        self._mask_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gmaivl-mask")
        self._thread = threading.Thread(target=self._loop, name="gmaivl-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API
    def submit(self, question: str | None = None, image=None, *, messages=None, images=None, system=None,
               sink=None, **options) -> Request:
        """Queue one request and return at once (thread-safe). question + image, or chat `messages` with `images`,
        as `backend.build_request` takes them (also frame, slice_index, plane, window); options: the generation
        options (max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty, no_repeat_ngram_size,
        eos_token_id, pad_token_id, generator) plus seed (int: reproducible sampling, alone or batched) and stop
        (strings that end the answer, not included): the options the runtime's `ask` takes
        (`gmaivl_rt.runtime.base.Backend.answer_options`). Errors in the input (InputError, LimitError) surface
        from the request (result / iteration), never from the engine. `sink`: called with each text delta and then
        `END_OF_ANSWER`, from the engine's threads (it must not block; one that raises is dropped and the request
        cancelled): how an event loop takes deltas without a thread waiting on each (`stream`, the server)."""
        request = Request(self, next(self._ids), sink=sink)
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
        """Async iterator of text deltas; never blocks the event loop. Leaving the loop early (break, an exception,
        aclose()) cancels the request; so does closing the event loop while it runs (the engine goes on serving)."""
        # one wake-up of the loop per engine step, whatever the number of streams; the sink raises once the loop is
        # closed, and the engine then drops it and cancels the request
        deltas = LoopDeltas()
        request = self.submit(question, image, sink=deltas.sink, **kwargs)
        try:
            while (item := await deltas.get()) is not END_OF_ANSWER:
                yield item
            if request.error is not None:
                raise request.error
        finally:
            if not request.done:
                request.cancel()

    def stats(self) -> dict:
        """running, waiting (being prepared or queued), kv_blocks_used, kv_blocks_free, kv_blocks_cached,
        kv_blocks_peak (most in use at once), kv_block_size, kv_block_bytes (zeros on graph backends),
        generated_tokens, prompt_tokens, prefix_cache_hits, prefix_cache_hit_tokens, preemptions, finished."""
        with self._cv:
            stats = self.scheduler.stats()
            stats["waiting"] += self._preparing
        return {**stats, "kv_block_bytes": self.runner.block_bytes}

    def wake(self) -> None:
        """Wake the scheduler thread (a request was cancelled: it is dropped at the next step)."""
        with self._cv:
            self._cv.notify_all()

    def close(self, cancel: bool = False) -> None:
        """Stop taking requests; finish the ones in flight (or cancel them with cancel=True); join the thread."""
        with self._cv:
            if self._closed and not self._thread.is_alive():
                return
            self._closed = True
            self._cv.notify_all()
        self._prep_pool.shutdown(wait=True)
        with self._cv:
            if cancel:
                self.scheduler.cancel_all()
            self._cv.notify_all()
        self._thread.join()
        self._mask_pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(cancel=exc[0] is not None)

    # ------------------------------------------------------------------ preparation (worker pool)
    def _prepare(self, request, question, image, messages, images, system, options):
        try:
            generation, stop = self.backend.answer_options(options)
            prepared = self.backend.build_request(question, image, messages=messages, images=images, system=system,
                                                  **generation)
            seq = sequence_from_request(request, prepared, stop, self.backend.config, self.runner.device,
                                        self.runner.dtype)
            self.scheduler.check_fits(seq)
        except BaseException as e:  # a bad request fails itself only
            with self._cv:
                self._preparing -= 1
                self._cv.notify_all()
            fail_request(request, e)
            return
        with self._cv:
            self._preparing -= 1
            self.scheduler.add(seq)
            self._cv.notify_all()

    # ------------------------------------------------------------------ scheduler thread
    def _loop(self):
        compiled = getattr(self.runner, "compiled", None)
        if compiled is not None:  # before the first step: submitted requests wait in the queue meanwhile
            compiled.warm_up()
        while True:
            with self._cv:
                while not self.scheduler.has_work and not (self._closed and not self._preparing):
                    self._cv.wait()
                if not self.scheduler.has_work and self._closed and not self._preparing:
                    return
            try:
                self._step()
            except Exception as e:  # a failure outside any one request: fail those in flight, keep serving
                try:
                    with self._cv:
                        self.scheduler.fail_running(e)
                except Exception as again:  # nothing a request or its reader does may end this thread
                    # the type only: a message might quote a request's input
                    log.error("the scheduler could not fail the running requests: %s", type(again).__name__)

    def _step(self) -> None:
        """One iteration: schedule, run the batch, pick one token per row, hand them back to the scheduler."""
        with self._cv:
            batch = self.scheduler.schedule()
        if batch is None:
            return
        constrained = [seq for seq, active in zip(batch.seqs, batch.active)
                       if active and seq.matcher is not None and not seq.eos]
        masks = self._mask_pool.submit(self._masks, constrained) if constrained else None
        logits, failed = self._run(batch)
        try:
            masks = masks.result() if masks is not None else {}
        except Exception:  # computed again row by row in `_next_token`, where a failure ends that row alone
            masks = {}
        tokens = self._sample(batch, logits, masks, failed)
        with self._cv, one_wakeup_per_loop():  # the step's deltas for all rows wake a streaming event loop once
            for seq, error in failed.items():
                self.scheduler.retire(seq, "error", error)
            self.scheduler.postprocess(batch, tokens)

    def _sample(self, batch: Batch, logits, masks: dict, failed: dict) -> list:
        """Per row the sampled id, or None (inactive, cancelled, failed). Unconstrained rows sharing their sampling
        settings are sampled in one batched call (`decode_rows`; seeded rows still draw from their own generator);
        constrained rows, and the rows of a batched call that raised, one by one (`decode_step`), so a row whose
        logits cannot be sampled (nan, ...) fails alone. logits: (rows, V) fp32, or per row (1, V) or None."""
        tokens = [None] * len(batch)
        groups = {}
        for r, (seq, active) in enumerate(zip(batch.seqs, batch.active)):
            if not active or (isinstance(logits, list) and logits[r] is None) or not self.scheduler.wants_token(seq):
                continue
            groups.setdefault(None if seq.matcher is not None else seq.sampling_key, []).append(r)
        for key, rows in groups.items():
            if key is not None:
                try:
                    self._sample_rows(batch, logits, rows, tokens)
                    continue
                except Exception:  # one of these rows cannot be sampled: find it, row by row
                    pass
            for r in rows:
                seq = batch.seqs[r]
                try:
                    tokens[r] = self._next_token(seq, logits[r:r + 1] if torch.is_tensor(logits) else logits[r],
                                                 masks.get(seq))
                except Exception as error:  # this row's logits could not be sampled (nan, ...): it alone fails
                    failed[seq] = error
        return tokens

    @staticmethod
    def _sample_rows(batch: Batch, logits, rows: list, tokens: list) -> None:
        """Sample `rows` (unconstrained, one sampling key) in one `decode_rows` call; their state advances only when
        all succeeded."""
        seqs = [batch.seqs[r] for r in rows]
        first = seqs[0]
        if torch.is_tensor(logits):
            step_logits = logits if len(rows) == len(batch) else logits[torch.tensor(rows, device=logits.device)]
        else:
            step_logits = torch.cat([logits[r] for r in rows])
        generators = [seq.generator for seq in seqs] if first.params.do_sample else None
        # a failed call is redone row by row: each seeded row's stream then starts where it stood
        states = [(g, g.get_state()) for g in generators or () if g is not None]
        try:
            step = decode_rows(step_logits, [seq.ids for seq in seqs], first.params, first.stop, generators,
                               top_logprobs=first.top_logprobs)
        except Exception:
            for generator, state in states:
                generator.set_state(state)
            raise
        picked, done = step.next_tokens.tolist(), step.finished.tolist()
        for i, (r, seq) in enumerate(zip(rows, seqs)):
            tokens[r], seq.eos = picked[i], done[i]
            if step.logprobs is not None:
                seq.request.logprobs.append(TokenLogprob.from_step(step.logprobs, i, picked[i]))

    def _run(self, batch: Batch) -> tuple:
        """The logits (rows, V) fp32 of the batch and {} ; or, when the batch failed, per row its logits (1, V) or
        None, and {sequence: error} of the active rows that failed. A static batch fails together; when a mixed
        batch fails, each row runs alone to find the ones at fault, so the others go on."""
        try:
            return self.runner.run(batch), {}
        except Exception as error:
            if batch.phase != "mixed" or len(batch) == 1:
                return [None] * len(batch), {seq: error for seq, active in zip(batch.seqs, batch.active) if active}
        logits, failed = [], {}
        for r, seq in enumerate(batch.seqs):
            try:  # the row alone, feeding what it fed in the batch (its chunk, when prefilled in chunks)
                feeds = None if batch.feeds is None else [batch.feeds[r]]
                logits.append(self.runner.run(Batch([seq], "mixed", [True], feeds=feeds)))
            except Exception as error:
                logits.append(None)
                failed[seq] = error
        return logits, failed

    @staticmethod
    def _masks(seqs: list) -> dict:
        """{sequence: its constraint mask (1, V) bool}, every constrained row's in one batched computation (each
        from its own matcher: one request's constraint never touches another's row)."""
        from gmaivl_rt.model.constraint import allowed_tokens

        return {seq: row[None] for seq, row in zip(seqs, allowed_tokens([seq.matcher for seq in seqs]))}

    @staticmethod
    def _next_token(seq: Sequence, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> int:
        """The next token of `seq` from its last-position logits (1, V) and its constraint mask `allowed` (1, V)
        (`decode_step`, the step every backend shares); its sampling state (ids so far, eos seen, the constraint's
        matcher, logprobs) advances. InputError when its constraint leaves no token (that request alone ends)."""
        if seq.matcher is not None and allowed is None:  # a row whose mask was not computed ahead (none expected)
            allowed = Engine._masks([seq])[seq]
        history = torch.tensor([seq.ids], dtype=torch.int64, device=logits.device)
        running = torch.zeros(1, dtype=torch.bool, device=logits.device)  # a row that produced eos has left
        step = decode_step(logits, history, running, seq.params, seq.stop, seq.generator,
                           allowed=allowed, top_logprobs=seq.top_logprobs)
        if bool(step.failed[0]):
            raise InputError("the constraint allows no next token: the answer cannot be finished under it")
        token = int(step.next_tokens[0])
        seq.eos = bool(step.finished[0])
        if seq.matcher is not None:
            seq.matcher.advance(token)
            seq.request.constraint_complete = seq.matcher.complete
        if step.logprobs is not None:
            seq.request.logprobs.append(TokenLogprob.from_step(step.logprobs, 0, token))
        return token
