"""Where a follow-up's time to first token goes, stage by stage (issue 29): the bench's follow-up (same system
prompt and image as the first question, another question; compact preset, random weights, one thread, the
compiled decode step on), 8 rounds per variant, each stage's median time after `submit`:

  submitted (submit returned), prep_start (a worker begins preparing it), built (`build_request` done), add (queued
  for the scheduler), step_enter (the scheduler thread's step begins), scheduled (admitted to a batch), run_start /
  run_end (the runner's forward), step_start / step_end (the compiled graph's call inside it), post (tokens handed
  back), ttft; and the first question's ttft and the ratio.

Variants: pause (0.2 s idle before each request, as the bench), switch (the same with sys.setswitchinterval(1e-4):
the GIL), nopause, weights (every decoder weight read just before submit), step (a dummy 16-row compiled step just
before submit). Then the request's preparation alone (`build_request` and its sequence), warm, 200 times in a
loop.

    flock /tmp/gs/cpu.lock python bench/follow_up_stages.py [variant ...]

Not a test: about 30 s after the warm-up compile."""
from __future__ import annotations

import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from gmaivl_rt import GMAIVL, Engine, GMAIVLConfig
from gmaivl_rt.engine.sequence import Request, sequence_from_request
from gmaivl_rt.runtime.tokenizer import model_vocab_fields
from gmaivl_rt.train.tokenizer import train_bpe_tokenizer

SYSTEM = "You are a careful radiology assistant."
QUESTIONS = ["What modality is this image?", "Which plane is shown?"]
NO_EOS = {"eos_token_id": [], "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
STAGES = ["submitted", "prep_start", "built", "add", "step_enter", "scheduled", "run_start", "step_start",
          "step_end", "run_end", "post"]
VARIANTS = ("pause", "switch", "nopause", "weights", "step")


def model_folder(path) -> None:
    """The follow-up bench's model (bench/test_bench_engine.py): compact preset, seed 0, a BPE tokenizer of its
    texts."""
    texts = ["<image>\nWhat modality is this image?", "This is a CT scan of the chest.", "Which plane is shown?",
             "An axial slice through the upper abdomen.", "Describe the image in detail.",
             "A magnetic resonance image of the head showing the ventricles.", "Is there a fracture?",
             "No acute fracture is seen.", SYSTEM] * 30
    tokenizer = train_bpe_tokenizer(texts, path, vocab_size=512, min_frequency=1)
    torch.manual_seed(0)
    GMAIVL(GMAIVLConfig.preset("compact").replace(**model_vocab_fields(tokenizer))).save_pretrained(path)


def stamp_stages(engine, marks: dict) -> None:
    """Wrap the engine's pieces (instance attributes) so that each records when it first ran into `marks`."""
    def wrap(owner, name, stage, after=False, only_if=None):
        inner = getattr(owner, name)

        def wrapped(*args, **kwargs):
            if not after:
                marks.setdefault(stage, time.perf_counter())
            out = inner(*args, **kwargs)
            if after and (only_if is None or only_if(out)):
                marks.setdefault(stage, time.perf_counter())
            return out
        setattr(owner, name, wrapped)

    wrap(engine, "_prepare", "prep_start")
    wrap(engine.backend, "build_request", "built", after=True)
    wrap(engine.scheduler, "add", "add")
    wrap(engine, "_step", "step_enter")
    wrap(engine.scheduler, "schedule", "scheduled", after=True, only_if=lambda batch: batch is not None)
    wrap(engine.runner, "run", "run_start")
    wrap(engine.runner, "run", "run_end", after=True)
    wrap(engine.runner.compiled, "_step", "step_start")
    wrap(engine.runner.compiled, "_step", "step_end", after=True)
    wrap(engine.scheduler, "postprocess", "post", after=True)


@torch.no_grad()
def main(variants: list) -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        model_folder(folder)
        with Engine(folder, max_batch_size=4) as engine:
            engine.ask("Warm up.", max_new_tokens=2)
            marks = {}
            stamp_stages(engine, marks)
            compiled, scratch = engine.runner.compiled, engine.runner.cache.scratch_slot
            decoder = [*engine.backend.model.language_model.parameters(), engine.backend.model.lm_head.weight]
            for v, variant in enumerate(variants):
                sys.setswitchinterval(1e-4 if variant == "switch" else 0.005)
                rows = []
                for r in range(8):
                    image = (np.random.RandomState(500 + r + 100 * v).rand(96, 128, 3) * 255).astype(np.uint8)
                    for question in QUESTIONS:
                        if variant != "nopause":
                            time.sleep(0.2)
                        if variant == "weights":
                            for weight in decoder:
                                weight.sum()
                        if variant == "step":
                            zeros = torch.zeros(16, dtype=torch.int64)
                            compiled.run(zeros, zeros, torch.zeros(16, 2, dtype=torch.int32),
                                         torch.ones(16, dtype=torch.int32), torch.full((16,), scratch))
                        marks.clear()
                        start = time.perf_counter()
                        request = engine.submit(system=SYSTEM, question=question, image=image, max_new_tokens=4,
                                                **NO_EOS)
                        marks["submitted"] = time.perf_counter()
                        request.result()
                        ttft = 1e3 * (request.first_token_time - request.arrival_time)
                        if question == QUESTIONS[0]:
                            first = ttft
                        else:
                            rows.append({stage: 1e3 * (marks[stage] - start) for stage in STAGES if stage in marks}
                                        | {"ttft": ttft, "first": first})
                shown = [stage for stage in [*STAGES, "ttft", "first"] if all(stage in row for row in rows)]
                forward = [row["run_end"] - row["run_start"] for row in rows]
                print(f"{variant}: ms after submit (medians of {len(rows)}): " + ", ".join(
                    f"{stage} {statistics.median(row[stage] for row in rows):.2f}" for stage in shown)
                    + f"; forward {statistics.median(forward):.2f} ({min(forward):.2f}-{max(forward):.2f}); "
                    f"follow-up / first {statistics.median(row['ttft'] / row['first'] for row in rows):.2f}x",
                    flush=True)
            backend, runner = engine.backend, engine.runner

            def prepare():
                generation, stop = backend.answer_options(dict(max_new_tokens=4, **NO_EOS))
                prepared = backend.build_request(QUESTIONS[1], image, system=SYSTEM, **generation)
                sequence_from_request(Request(engine, -1), prepared, stop, backend.config, runner.device, runner.dtype)
            for _ in range(20):
                prepare()
            start = time.perf_counter()
            for _ in range(200):
                prepare()
            print(f"preparing the follow-up, warm, in a loop: {(time.perf_counter() - start) / 200 * 1e3:.2f} ms")


if __name__ == "__main__":
    asked = sys.argv[1:] or list(VARIANTS)
    if any(v not in VARIANTS for v in asked):
        sys.exit(f"variants: {', '.join(VARIANTS)}")
    main(asked)
