"""Answer extraction and scoring, each rule as one public evaluation kit writes it (our code, their rules).

- `can_infer_option`, `can_infer_text`, `can_infer`, `extract_option`: VLMEvalKit's deterministic MCQ chain
  (`vlmeval/utils/matching_util.py` and `dataset/utils/multiple_choice.py`, `exact_matching` policy: no LLM judge).
- `huatuo_match_choice`: HuatuoGPT-Vision's `match_choice3` (its `scorer.py`).
- closed / open questions (SLAKE, VQA-RAD), one scorer per kit (`CLOSED_OPEN_SCORERS`):
  `llava_med_normalize`, `llava_med_closed`, `llava_med_open`: LLaVA-Med v1.0.0 `llava/eval/run_eval.py` with
  `eval_metrics/glossary.py` `normalize_word` and `evaluate_metrics.py` `calculate_f1score` / `calculate_exactmatch`;
  `lmms_eval_normalize`: lmms-eval 75571cf `lmms_eval/tasks/slake/utils.py` `normalize_answer` (exact match).
"""
from __future__ import annotations

import difflib
import re
from collections import Counter

# ------------------------------------------------------------------------------------------------ VLMEvalKit
# VLMEvalKit's refusal strings: an answer containing one is read as "Z" (no option).
VLMEVALKIT_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_VLMEVALKIT_SPACED = ".()[],:;!*#{}"
_VLMEVALKIT_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def can_infer_option(answer: str, choices: dict[str, str]) -> str | None:
    """VLMEvalKit `can_infer_option` (matching_util.py, current main). choices: {letter: option text}.

    A refusal string -> "Z". Otherwise each of `.()[],:;!*#{}` becomes a space and the answer splits on
    whitespace: when exactly one option letter is a token, it is the answer if its first occurrence is among the
    last four tokens (index > len(tokens) - 5); when no option letter but a "Z" token occurs -> "Z"; else the
    regex `(?i)(?:correct\\s+)?answer\\s+is\\s+\\**([ABCD])\\**` on the raw answer, when its letter is an option.
    None where VLMEvalKit returns False."""
    if "Failed to obtain answer via API" in answer:
        return None
    if any(refusal in answer for refusal in VLMEVALKIT_REFUSALS):
        return "Z"
    spaced = answer
    for char in _VLMEVALKIT_SPACED:
        spaced = spaced.replace(char, " ")
    tokens = spaced.split()
    present = [letter for letter in choices if letter in tokens]
    if len(present) == 1:
        letter = present[0]
        if tokens.index(letter) > len(tokens) - 5:
            return letter
    elif not present and "Z" in tokens:
        return "Z"
    match = _VLMEVALKIT_ANSWER_IS.search(answer)
    if match and match.group(1).upper() in choices:
        return match.group(1).upper()
    return None


def can_infer_text(answer: str, choices: dict[str, str]) -> str | None:
    """VLMEvalKit `can_infer_text`: none when the lower-cased answer is longer than twice the summed length of the
    option texts; else the option whose lower-cased text is a substring of the answer, when exactly one is."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(text)) for text in choices.values()):
        return None
    found = [letter for letter, text in choices.items() if str(text).lower() in answer]
    return found[0] if len(found) == 1 else None


def can_infer(answer, choices: dict[str, str]) -> str | None:
    """VLMEvalKit `can_infer`: `can_infer_option`, then `can_infer_text`."""
    answer = str(answer)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


def extract_option(prediction: str, choices: dict[str, str]) -> tuple[str, bool]:
    """VLMEvalKit `extract_answer_from_item` under the `exact_matching` policy (no judge model): the prediction as
    written (not stripped: the kit's length guard sees padding) through `can_infer`; nothing inferred -> "Z"
    (counted wrong). Returns (letter, parsed)."""
    letter = can_infer(str(prediction), dict(choices))
    return (letter, True) if letter else ("Z", False)


# ------------------------------------------------------------------------------------------------ HuatuoGPT-Vision
_HUATUO_LETTER = re.compile(r"(is |是|\*|\W|\ |\(|为|^|'|\"|#)(?![aA] )([abcdefghijklmnABCDEFGHIJKLMN])(\W|$)", re.S)


def huatuo_match_choice(text: str, options: dict[str, str]) -> tuple[str, int]:
    """HuatuoGPT-Vision `match_choice3` (scorer.py). options: {letter: option text} in the file's order.

    1. the first standalone letter a-n / A-N by its regex (kept as written: a lower-case letter never equals the
       upper-case gold label, as in the original); 2. else the option whose lower-cased text occurs last in the
    lower-cased answer; 3. else the option most similar by `difflib.SequenceMatcher` ratio (ties: the later one,
    as its `>=` does). Returns (letter, rule number 1-3). (The original passes the whole record as `options`; its
    text fallbacks read the option texts, which is what this takes.)"""
    match = _HUATUO_LETTER.search(text)
    if match:
        return match.group(2), 1
    lowered = text.lower()
    found = [(letter, lowered.rindex(str(option).lower())) for letter, option in options.items()
             if str(option).lower() in lowered]
    if found:
        return sorted(found, key=lambda pair: pair[1], reverse=True)[0][0], 2
    best, best_ratio = None, 0.0
    for letter, option in options.items():
        ratio = difflib.SequenceMatcher(None, str(option).lower(), lowered).ratio()
        if ratio >= best_ratio:
            best, best_ratio = letter, ratio
    return best, 3


# ------------------------------------------------------------------------------------------------ closed / open
CLOSED_OPEN_SCORERS = ("llava-med", "lmms-eval")
# LLaVA-Med reports closed accuracy and open recall, the pair medical VQA papers (LLaVA-Med, HuatuoGPT-Vision,
# GMAI-VL's comparisons) quote: the default. lmms-eval scores every item by exact match after its normalisation.
DEFAULT_CLOSED_OPEN_SCORER = "llava-med"

# LLaVA-Med v1.0.0 glossary.py: the VQA evaluation's punctuation and number words
_LLAVA_MED_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                    "?", "!")
_LLAVA_MED_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # (sic): a lookahead, so every "." not before a digit
_LLAVA_MED_COMMA = re.compile(r"(\d)(\,)(\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")


def llava_med_normalize(text: str) -> str:
    """LLaVA-Med `normalize_word`: each punctuation mark of the VQA list is deleted where it touches a space (or
    anywhere, once the text holds a digit-comma-digit) and spaced otherwise; up to 32 periods not followed by a
    digit deleted (its `re.UNICODE` lands in `sub`'s count); lower case; number words -> digits; articles dropped;
    the VQA contraction table; commas dropped."""
    from gmaivl_rt.eval.vqa_contractions import CONTRACTIONS

    token = str(text)
    out = token
    for mark in _LLAVA_MED_PUNCT:
        if mark + " " in token or " " + mark in token or _LLAVA_MED_COMMA.search(token):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    out = _LLAVA_MED_PERIOD.sub("", out, count=32)
    words = [_NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words).replace(",", "")


def llava_med_closed(prediction: str, gold: str) -> bool:
    """LLaVA-Med `run_eval.evaluate`, CLOSED items: on the lower-cased, normalised texts, "yes" or "no" must occur
    in the prediction as a substring and the whole gold text must be a substring of it (so gold "no" + "not" is
    right, gold "CT" + "CT scan" is wrong: neither yes nor no occurs)."""
    predicted, wanted = llava_med_normalize(str(prediction).lower()), llava_med_normalize(str(gold).lower())
    return ("yes" in predicted or "no" in predicted) and wanted in predicted


def _word_counts(text: str) -> Counter:
    return Counter(text.lower().strip().split())


def llava_med_open(prediction: str, gold: str) -> dict[str, float]:
    """LLaVA-Med `run_eval.evaluate`, OPEN items, on texts normalised once there and again inside the metrics:
    `calculate_f1score` -> recall, precision, f1 (word counts: true positives count the prediction's copies of a
    shared word, false negatives the gold's missing words; all 0 when no word is shared) and
    `calculate_exactmatch` (distinct gold words found in the prediction / the prediction's word count)."""
    predicted = llava_med_normalize(llava_med_normalize(str(prediction).lower()))
    wanted = llava_med_normalize(llava_med_normalize(str(gold).lower()))
    cand, ref = _word_counts(predicted), _word_counts(wanted)
    total = sum(cand.values())
    exact = (sum(1 for w in ref if w in cand) / total) if total else 0.0
    if not cand or not ref:
        return {"recall": 0.0, "precision": 0.0, "f1": 0.0, "exact_match": exact}
    tp = sum(n for w, n in cand.items() if w in ref)
    fp = sum(n for w, n in cand.items() if w not in ref)
    fn = sum(n for w, n in ref.items() if w not in cand)
    if tp == 0:
        return {"recall": 0.0, "precision": 0.0, "f1": 0.0, "exact_match": exact}
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return {"recall": recall, "precision": precision, "f1": 2 * precision * recall / (precision + recall),
            "exact_match": exact}


_LMMS_EN_YES, _LMMS_EN_NO = {"yes", "yeah", "yep", "true"}, {"no", "nope", "false"}
_LMMS_ZH_YES = {"是", "是的", "有", "包含", "可以", "能", "会", "正常"}
_LMMS_ZH_NO = {"否", "不是", "没有", "无", "不包含", "不能", "不会", "不可以", "不正常", "异常"}
_LMMS_ZH_PUNCTUATION = "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～、，。；：《》？【】（）"


def lmms_eval_normalize(answer) -> str:
    """lmms-eval SLAKE `normalize_answer`: None -> ""; strip, lower case; parenthesised text (ASCII or full-width)
    dropped; ASCII and Chinese punctuation -> spaces; whitespace collapsed; then the WHOLE answer "x ray" / "xray"
    -> "xray" and a whole-answer yes/no synonym (English or Chinese) -> "yes" / "no"."""
    import string

    text = "" if answer is None else str(answer)
    text = text.strip().lower()
    text = re.sub(r"\([^)]*\)", " ", text)
    text = re.sub(r"（[^）]*）", " ", text)
    text = text.translate(str.maketrans({c: " " for c in string.punctuation + _LMMS_ZH_PUNCTUATION}))
    text = re.sub(r"\s+", " ", text).strip()
    if text in {"x ray", "xray"}:
        text = "xray"
    if text in _LMMS_EN_YES or text in _LMMS_ZH_YES:
        return "yes"
    if text in _LMMS_EN_NO or text in _LMMS_ZH_NO:
        return "no"
    return text


def closed_open_score(kind: str, prediction: str, gold: str, scorer: str) -> dict:
    """One closed or open item under `scorer` ("llava-med" | "lmms-eval") -> {"extracted", "score" (the item's
    figure in [0, 1]: LLaVA-Med's closed hit or open recall, lmms-eval's exact match), "correct" (score == 1)}
    plus LLaVA-Med's "recall", "precision", "f1", "exact_match" for its open items."""
    if scorer == "lmms-eval":
        extracted = lmms_eval_normalize(prediction)
        hit = float(extracted == lmms_eval_normalize(gold))
        return {"extracted": extracted, "score": hit, "correct": hit == 1.0}
    if scorer != "llava-med":
        raise ValueError(f"closed/open scorer {scorer!r} is not one of {', '.join(CLOSED_OPEN_SCORERS)}")
    extracted = llava_med_normalize(str(prediction).lower())
    if kind == "closed":
        hit = float(llava_med_closed(prediction, gold))
        return {"extracted": extracted, "score": hit, "correct": hit == 1.0}
    metrics = llava_med_open(prediction, gold)
    return {"extracted": extracted, "score": metrics["recall"], "correct": metrics["recall"] == 1.0, **metrics}


# ------------------------------------------------------------------------------------------------ one item
def score_prediction(item, prediction: str, scorer: str = DEFAULT_CLOSED_OPEN_SCORER) -> dict:
    """One item's scoring by its rule: {"extracted", "correct" (None when the item has no gold answer), "score"
    (1.0 / 0.0, or an open item's recall under LLaVA-Med; None unscored), "parsed"} plus LLaVA-Med's open metrics.
    item: a `readers.Item`; scorer: the closed/open rule (MCQ items follow their file's kit)."""
    if item.kind == "mcq":
        choices = item.options if item.scoring_options is None else item.scoring_options
        if item.scorer == "huatuo":
            letter, rule = huatuo_match_choice(str(prediction), choices)
            extracted, parsed = letter, rule == 1
        else:
            extracted, parsed = extract_option(prediction, choices)
        correct = None if item.answer is None else extracted == item.answer
        return {"extracted": extracted, "correct": correct, "score": None if correct is None else float(correct),
                "parsed": parsed}
    if item.answer is None:
        return {"extracted": str(prediction), "correct": None, "score": None, "parsed": bool(str(prediction))}
    result = closed_open_score(item.kind, prediction, item.answer, scorer)
    return {**result, "parsed": bool(result["extracted"])}
