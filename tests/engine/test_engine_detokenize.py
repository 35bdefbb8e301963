"""The engine streams text incrementally (`IncrementalDetokenizer`, gmaivl_rt/runtime/tokenizer.py): a step decodes
each running answer's new ids, not its whole text, and the streamed deltas still join to the answer `ask` gives
(the runtime's one whole decode: the independent reference here)."""
from __future__ import annotations

import numpy as np

from gmaivl_rt import Engine

TEXTS = ["<image>\nWhat modality is this image?", "This is a CT scan of the chest.", "Which plane is shown?",
         "肺部 CT 扫描显示结节。", "Läsion größer als 5 mm.", "Emoji 🫁🩻 ok", "Is there a fracture?"] * 20
NO_STOP = {"eos_token_id": [], "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}


def test_streaming_decodes_each_answer_whole_once_and_joins_to_ask(tiny_model_folder):
    """Four requests of 24 tokens (random weights: byte tokens split characters, U+FFFD included) streamed
    together: the tokenizer's whole decode runs once per request (at its end), not once per token, and each
    request's deltas join to its result and to `ask`'s answer alone.
    Mutant seen failing: `Sequence.stream_text` decoding the whole answer every step (the code before the
    incremental detokenizer): 96 whole decodes."""
    folder = tiny_model_folder(TEXTS, "engine_detokenize")
    image = (np.random.RandomState(3).rand(30, 40, 3) * 255).astype(np.uint8)
    questions = [("What modality is this image?", image), ("Which plane is shown?", None),
                 ("Describe the image.", image), ("Is there a fracture?", None)]
    with Engine(folder, max_batch_size=4) as engine:
        tokenizer = engine.tokenizer
        calls = []
        whole_decode = tokenizer.decode

        def counted(ids, *args, **kwargs):
            calls.append(len(ids))
            return whole_decode(ids, *args, **kwargs)

        tokenizer.decode = counted
        try:
            requests = [engine.submit(q, image=im, max_new_tokens=24, **NO_STOP) for q, im in questions]
            deltas = [list(r) for r in requests]
        finally:
            del tokenizer.decode
        assert len(calls) == len(questions), calls
        for (question, im), request, parts in zip(questions, requests, deltas):
            assert request.generated_tokens == 24
            assert "".join(parts) == request.result() == engine.backend.ask(question, im, max_new_tokens=24,
                                                                            **NO_STOP)
