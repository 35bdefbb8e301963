"""Check 6 (issue 29): decode tokens/s at batch 16, the serving engine's compiled decode step (CUDA graphs on a GPU,
`gmaivl_rt.engine.compiled_decode`) against the eager engine and transformers' `generate` with SDPA, on the same
weights (the compact preset, random weights, a byte-level BPE trained here: nothing is downloaded).

Written against the documented APIs only: `gmaivl_rt.Engine` (compile=True / False, device, dtype; a request's
first_token_time and finish_time) and transformers' `LlavaForConditionalGeneration.from_pretrained(folder,
attn_implementation="sdpa")`, which reads our checkpoint as it is saved. Every side decodes the same 16 text
prompts greedily, every row for exactly `new_tokens` tokens (no eos, no penalties).

Decode tokens/s: the engine's, the sum over its requests of (new_tokens - 1) / (finish - first token), i.e. the
decode steps after each row's prefill (the rows are submitted at once and decode side by side); transformers',
rows x (new_tokens - 1) / (generate(new_tokens) - generate(1)): the same steps with the prefill taken out. Rounds
alternate the sides (first call of each not timed); medians and ranges go to the report line, with the compiled
engine's warm-up seconds and whether it fell back to eager. The smoke run (CPU, Triton interpreter) takes the same
path at tiny sizes with the compiled side recorded as skipped (compiling takes minutes on a CPU)."""
from __future__ import annotations

import statistics
import tempfile
import time

import torch

from gmaivl_rt.gpu_check.recording import Recorder, Sizes

TEXTS = ["What modality is this image?", "This is a CT scan of the chest.", "Which plane is shown?",
         "An axial slice through the upper abdomen.", "Describe the image in detail.",
         "A magnetic resonance image of the head showing the ventricles.", "Is there a fracture?",
         "No acute fracture is seen.", "You are a careful radiology assistant."] * 20
QUESTIONS = ["What modality is this image?", "Which plane is shown?", "Describe the image in detail.",
             "Is there a fracture?"]
GREEDY_NO_EOS = {"eos_token_id": [], "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
ROUNDS = 3


def decode_model_folder(path, preset: str) -> str:
    """A model folder at `path`: the `preset` with seeded random weights and a BPE tokenizer trained on TEXTS."""
    from gmaivl_rt.model.config import GMAIVLConfig
    from gmaivl_rt.model.modeling import GMAIVL
    from gmaivl_rt.runtime.tokenizer import model_vocab_fields
    from gmaivl_rt.train.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(TEXTS, path, vocab_size=512, min_frequency=1)
    torch.manual_seed(0)
    GMAIVL(GMAIVLConfig.preset(preset).replace(**model_vocab_fields(tokenizer))).save_pretrained(path)
    return str(path)


def engine_decode_tokens_per_s(engine, prompts: list, new_tokens: int) -> float:
    """Submit `prompts` at once, greedy, `new_tokens` each; decode tokens/s after each row's first token."""
    requests = [engine.submit(p, max_new_tokens=new_tokens, **GREEDY_NO_EOS) for p in prompts]
    for request in requests:
        request.result(timeout=600)
    return sum((new_tokens - 1) / max(1e-9, r.finish_time - r.first_token_time) for r in requests)


def check_decode(rec: Recorder, sz: Sizes) -> None:
    preset, rows, new_tokens, compile_too = sz.decode

    def measure():
        from transformers import LlavaForConditionalGeneration

        from gmaivl_rt.engine.engine import Engine  # gmaivl_rt.Engine
        from gmaivl_rt.runtime.batching import left_padded_batch

        folder = decode_model_folder(tempfile.mkdtemp(prefix="gmaivl-gpu-check-decode-"), preset)
        prompts = [QUESTIONS[i % len(QUESTIONS)] for i in range(rows)]
        options = dict(device=sz.device, dtype=sz.dtype)
        engines = {}
        started = time.perf_counter()
        if compile_too:
            engines["compiled"] = Engine(folder, max_batch_size=rows, compile=True, **options)
            engines["compiled"].ask("Warm up.", max_new_tokens=2)  # after the warm-up compile
        warm_up_s = time.perf_counter() - started
        engines["eager"] = Engine(folder, max_batch_size=rows, compile=False, **options)
        try:
            backend = engines["eager"].backend
            built = [backend.build_request(p, max_new_tokens=new_tokens, **GREEDY_NO_EOS) for p in prompts]
            pad = built[0].generation["pad_token_id"]
            ids, mask = left_padded_batch([b.input_ids[0] for b in built], pad)
            ids, mask = ids.to(sz.device), mask.to(sz.device)
            hf = LlavaForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa",
                                                               dtype=sz.dtype).to(sz.device).eval()

            def hf_seconds(n: int) -> float:
                if sz.device == "cuda":
                    torch.cuda.synchronize()
                begun = time.perf_counter()
                with torch.no_grad():
                    hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=pad)
                if sz.device == "cuda":
                    torch.cuda.synchronize()
                return time.perf_counter() - begun

            sides = {name: (lambda e=engine: engine_decode_tokens_per_s(e, prompts, new_tokens))
                     for name, engine in engines.items()}
            sides["transformers_sdpa"] = lambda: rows * (new_tokens - 1) / max(1e-9, hf_seconds(new_tokens)
                                                                               - hf_seconds(1))
            for fn in sides.values():  # warm-up, not timed
                fn()
            rates = {name: [] for name in sides}
            names = list(sides)
            for r in range(ROUNDS):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    rates[name].append(sides[name]())
        finally:
            for engine in engines.values():
                engine.close()
        result = {"preset": preset, "rows": rows, "new_tokens": new_tokens, "rounds": ROUNDS,
                  "device_name": torch.cuda.get_device_name() if sz.device == "cuda" else "cpu",
                  "dtype": str(sz.dtype).replace("torch.", ""),
                  "decode_tokens_per_s": {name: statistics.median(v) for name, v in rates.items()},
                  "decode_tokens_per_s_range": {name: [min(v), max(v)] for name, v in rates.items()}}
        eager = rates["eager"]
        result["eager_vs_transformers"] = statistics.median(
            e / t for e, t in zip(eager, rates["transformers_sdpa"]))
        if compile_too:
            compiled = rates["compiled"]
            result.update(
                compiled_vs_transformers=statistics.median(c / t for c, t in zip(compiled,
                                                                                 rates["transformers_sdpa"])),
                compiled_vs_eager=statistics.median(c / e for c, e in zip(compiled, eager)),
                warm_up_s=warm_up_s, compile_fell_back=bool(engines["compiled"].runner.compiled.failed))
        else:
            result["compiled"] = "skipped: compiling the decode step takes minutes on a CPU (the GPU run has it)"
        # a failure is a side that did not run; the speed itself is reported, not judged
        result["ok"] = all(v > 0 for v in result["decode_tokens_per_s"].values())
        return result

    rec.run("decode", 6, measure, case=f"batch {rows} decode tokens/s")
