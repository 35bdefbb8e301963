"""Answer extraction and scoring, each rule as one public evaluation kit writes it (our code, their rules).

- `can_infer_option`, `can_infer_text`, `can_infer`, `extract_option`: VLMEvalKit's deterministic MCQ chain
  (`vlmeval/utils/matching_util.py` and `dataset/utils/multiple_choice.py`, `exact_matching` policy: no LLM judge).
- `huatuo_match_choice`: HuatuoGPT-Vision's `match_choice3` (its `scorer.py`).
- `normalize_answer`, `closed_correct`, `open_scores`: LLaVA-Med's `normalize_word` / `calculate_f1score` and
  lmms-eval's single-word VQA conventions for closed (yes/no) and open questions.
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
    """VLMEvalKit `extract_answer_from_item` under the `exact_matching` policy (no judge model): the stripped
    prediction through `can_infer`; nothing inferred -> "Z" (counted wrong). Returns (letter, parsed)."""
    letter = can_infer(str(prediction).strip(), dict(choices))
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
# LLaVA-Med's normalize_word: number words to digits, articles dropped; plus lmms-eval's "x ray" -> "xray" and
# yes/no synonyms folded so "yeah" scores like "yes".
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_YES_NO = {"yes": "yes", "yeah": "yes", "yep": "yes", "true": "yes", "no": "no", "nope": "no", "false": "no"}
_PUNCTUATION = re.compile(r"[!\"#$%&'()*+,\-/:;<=>?@\[\\\]^_`{|}~。，、；：？！“”‘’（）《》【】…·]")


def normalize_answer(text: str) -> str:
    """Lower case; "x ray" / "x-ray" -> "xray"; commas inside numbers dropped, a period kept only between digits,
    other punctuation -> space; number words -> digits; articles dropped; yes/no synonyms -> yes/no."""
    text = str(text).lower()
    text = re.sub(r"\bx[\s\-]*ray", "xray", text)
    text = re.sub(r"(?<=\d),(?=\d)", "", text)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text)
    text = _PUNCTUATION.sub(" ", text)
    words = []
    for word in text.split():
        word = _YES_NO.get(word, _NUMBER_WORDS.get(word, word))
        if word not in _ARTICLES:
            words.append(word)
    return " ".join(words)


def closed_correct(prediction: str, gold: str) -> bool:
    """A closed question's answer (LLaVA-Med / lmms-eval, on normalised words): for a yes/no gold the prediction
    must contain exactly one of yes/no and it must be the gold one; otherwise the gold's words must occur in the
    prediction as a contiguous run."""
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if wanted in (["yes"], ["no"]):
        return {w for w in predicted if w in ("yes", "no")} == set(wanted)
    if not wanted:
        return False
    n = len(wanted)
    return any(predicted[i:i + n] == wanted for i in range(len(predicted) - n + 1))


def open_scores(prediction: str, gold: str) -> dict[str, float]:
    """An open question's scores on normalised words: `recall` and `f1` as LLaVA-Med's `calculate_f1score` counts
    them (true positives sum the prediction's counts of shared words), `exact_match` 1.0 when the normalised texts
    are equal."""
    predicted, wanted = Counter(normalize_answer(prediction).split()), Counter(normalize_answer(gold).split())
    exact = float(bool(wanted) and predicted == wanted)
    if not predicted or not wanted:
        return {"recall": 0.0, "f1": 0.0, "exact_match": exact}
    tp = sum(count for word, count in predicted.items() if word in wanted)
    fp = sum(count for word, count in predicted.items() if word not in wanted)
    fn = sum(count for word, count in wanted.items() if word not in predicted)
    if tp == 0:
        return {"recall": 0.0, "f1": 0.0, "exact_match": exact}
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return {"recall": recall, "f1": 2 * precision * recall / (precision + recall), "exact_match": exact}


# ------------------------------------------------------------------------------------------------ one item
def score_prediction(item, prediction: str) -> dict:
    """One item's scoring by its rule: {"extracted", "correct" (None when the item has no gold answer), "parsed"}
    plus {"recall", "f1", "exact_match"} for open questions. item: a `readers.Item`."""
    if item.kind == "mcq":
        choices = item.scoring_options or item.options
        if item.scorer == "huatuo":
            letter, rule = huatuo_match_choice(str(prediction), choices)
            extracted, parsed = letter, rule == 1
        else:
            extracted, parsed = extract_option(prediction, choices)
        correct = None if item.answer is None else extracted == item.answer
        return {"extracted": extracted, "correct": correct, "parsed": parsed}
    extracted = normalize_answer(prediction)
    if item.kind == "closed":
        correct = None if item.answer is None else closed_correct(prediction, item.answer)
        return {"extracted": extracted, "correct": correct, "parsed": bool(extracted)}
    scores = open_scores(prediction, item.answer) if item.answer is not None else {}
    correct = None if item.answer is None else scores["exact_match"] == 1.0
    return {"extracted": extracted, "correct": correct, "parsed": bool(extracted), **scores}
