"""The question text each protocol sends and its decoding settings (both recorded in run.json: each moves scores
by points). The chat template around the text is the runtime's own (`gmaivl_rt.model.chat` through `prepare`)."""
from __future__ import annotations

import re

from gmaivl_rt.model.chat import IMAGE_TOKEN

MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
MCQ_INSTRUCTION_ZH = "请直接回答选项字母。"
CLOSED_OPEN_INSTRUCTION = "Answer the question using a single word or phrase."
CLOSED_OPEN_INSTRUCTION_ZH = "请用一个词或短语回答问题。"  # lmms-eval slake_zh.yaml post_prompt

# Greedy, no repetition penalty or n-gram ban: VLMEvalKit's LLaVA-XTuner wrapper for MCQ (do_sample=False,
# num_beams=1, max_new_tokens=5) and lmms-eval's short-answer VQA (greedy, 32 new tokens).
DECODING = {
    "mcq": {"max_new_tokens": 5, "do_sample": False, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0},
    "closed-open": {"max_new_tokens": 32, "do_sample": False, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0},
}
# HuatuoGPT-Vision's eval.py decodes up to --max_new_tokens 256 (its chatbot samples at temperature 0.2 with
# repetition penalty 1.2; greedy here, so a run is reproducible); its scorer reads the first standalone letter.
HUATUO_MAX_NEW_TOKENS = 256
_CHINESE = re.compile("[\u4e00-\u9fff]")


def mcq_prompt(question: str, options: dict[str, str], hint: str | None = None, language: str | None = None) -> str:
    """VLMEvalKit's LLaVA-XTuner `build_prompt`: "{hint}\\n{question}\\nA. ...\\nB. ...\\n" + the instruction
    (its Chinese form when the question holds Chinese characters, as `cn_string` decides). language "en": always
    the English instruction (HuatuoGPT-Vision's `llava_prompt`, which has the same shape, no hint)."""
    text = f"{hint}\n{question}" if hint is not None else question
    for letter, option in options.items():
        text += f"\n{letter}. {option}"
    chinese = language == "zh" or (language is None and _CHINESE.search(text))
    return text + "\n" + (MCQ_INSTRUCTION_ZH if chinese else MCQ_INSTRUCTION)


def closed_open_prompt(question: str, language: str | None = None) -> str:
    """lmms-eval's short-answer VQA prompt (slake `doc_to_text`): the stripped question, a newline, the
    single-word-or-phrase instruction (its Chinese post_prompt for language "zh")."""
    instruction = CLOSED_OPEN_INSTRUCTION_ZH if language == "zh" else CLOSED_OPEN_INSTRUCTION
    return f"{question.strip()}\n{instruction}"


def item_text(item) -> str:
    """The protocol's text for one `readers.Item` (what `build_request` gets as the question)."""
    if item.kind == "mcq":
        return mcq_prompt(item.question, item.options, item.hint, item.language)
    return closed_open_prompt(item.question, item.language)


def item_prompt(item) -> str:
    """The user turn as recorded in predictions.jsonl: one `<image>` line per image (the slots the chat template
    puts first, as LLaVA-XTuner does), then the protocol's text."""
    return f"{IMAGE_TOKEN}\n" * len(item.images) + item_text(item)


def decoding_for(protocol: str, format: str | None = None) -> dict:
    """The protocol's decoding; HuatuoGPT-Vision's file (format "huatuo", mcq) decodes up to 256 new tokens."""
    decoding = dict(DECODING[protocol])
    if format == "huatuo" and protocol == "mcq":
        decoding["max_new_tokens"] = HUATUO_MAX_NEW_TOKENS
    return decoding
