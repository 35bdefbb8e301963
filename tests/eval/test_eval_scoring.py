"""The scoring rules, each against predictions chosen to tell its anchor's rule from a near miss. Expected values
are worked out from the anchor's rule in the comment beside each case."""
import pytest

from gmaivl_rt.eval.readers import Item
from gmaivl_rt.eval.scoring import (can_infer_option, can_infer_text, closed_open_score, extract_option,
                                    huatuo_match_choice, llava_med_closed, llava_med_normalize, llava_med_open,
                                    lmms_eval_normalize, score_prediction)

CHOICES = {"A": "Pneumonia", "B": "Normal", "C": "Effusion", "D": "Edema"}  # option texts: 9+6+8+5 = 28 chars


@pytest.mark.parametrize("prediction, expected", [
    # "**" become spaces -> tokens [The, answer, is, B]: one option letter, index 3 > 4 - 5 -> B
    ("The answer is **B**", ("B", True)),
    # tokens [B, Pneumonia]: the letter decides before any text match (the text alone would say A)
    ("B. Pneumonia", ("B", True)),
    # no letter token, no "answer is": can_infer_text finds "pneumonia" only -> A
    ("pneumonia", ("A", True)),
    # two option letters: can_infer_option gives up; neither option text occurs -> unparsed "Z"
    ("A or B", ("Z", False)),
    # a VLMEvalKit refusal string -> "Z", read (parsed) as no option
    ("Cannot determine the answer from this image.", ("Z", True)),
    # 96 characters > 2 x 28: can_infer_text refuses although "pneumonia" occurs -> unparsed
    ("I think the image shows clear signs of pneumonia in the left lower lobe with air bronchograms.", ("Z", False)),
    ("It shows pneumonia", ("A", True)),  # the same text, short enough
    # full-width punctuation is not in `.()[],:;!*#{}`: "答案是B。" and "（B）" stay one token each, no letter token
    ("答案是B。", ("Z", False)),
    ("（B）", ("Z", False)),
    ("B.", ("B", True)),
    ("**B**", ("B", True)),  # "*" is spaced like "." : the bare token B remains
    # one letter but first at index 0 of 8 tokens (not > 3); the regex needs "answer is" -> falls through -> "Z"
    ("B is the right choice for this one", ("Z", False)),
    # no letter token ("c" is lower case); the case-insensitive "answer is" regex reads c -> C
    ("The correct answer is c", ("C", True)),
    # "E" is no option here and the regex only knows A-D -> unparsed
    ("The answer is E", ("Z", False)),
    ("Z", ("Z", True)),  # a bare Z token with no option letter
    ("  D  ", ("D", True)),  # whitespace never makes a token
])
def test_vlmevalkit_extraction(prediction, expected):
    assert extract_option(prediction, CHOICES) == expected


def test_vlmevalkit_letter_position_window():
    # 5 tokens: index 1 > 0 -> accepted; 6 tokens: index 1 > 1 fails -> rejected (then nothing else matches)
    assert can_infer_option("so B is it then", CHOICES) == "B"
    assert can_infer_option("so B is it then ok", CHOICES) is None


def test_vlmevalkit_answer_is_regex_knows_only_a_to_d_and_only_options():
    five = {**CHOICES, "E": "Atelectasis"}
    # two letter tokens (A, E): the option rule gives up; the regex reads A-D only, so "E" is not taken -> "Z"
    assert extract_option("A is wrong, the answer is E", five) == ("Z", False)
    assert extract_option("A is wrong, the answer is D", five) == ("D", True)
    # D matches the regex but is no option of this row: not taken
    assert extract_option("A or maybe the answer is D", {"A": "x", "B": "y", "C": "z"}) == ("Z", False)


def test_vlmevalkit_text_rule_needs_a_unique_option():
    choices = {"A": "left lung", "B": "lung", "C": "heart"}
    assert can_infer_text("the left lung", choices) is None  # "lung" and "left lung" both occur
    assert can_infer_text("the heart", choices) == "C"


def test_vlmevalkit_length_guard_sees_whitespace_padding():
    """VLMEvalKit e8e78f0 `extract_answer_from_item` passes `item['prediction']` to `can_infer` unstripped, and
    `can_infer_text` gives up when `len(answer) > 2 * sum(len(option texts))`: "coronal" + 60 spaces (or + 80
    newlines) is Z there (checked by running the kit's mcq_vanilla_eval: hit 0), "coronal" alone is B.
    Mutant seen failing: `extract_option` stripping the prediction first (the old rule)."""
    plane = {"A": "axial", "B": "coronal", "C": "sagittal"}  # 20 characters: the guard is 40
    assert extract_option("coronal" + " " * 60, plane) == ("Z", False)
    assert extract_option("coronal" + "\n" * 80, plane) == ("Z", False)
    assert extract_option("coronal", plane) == ("B", True)
    assert extract_option(" B ", plane) == ("B", True)  # a letter token is found whatever the padding


def test_vlmevalkit_choices_are_the_rows_options_only():
    # "C" is a letter token, but with only A and B as options it is no option: count 0 -> text rule -> none
    assert extract_option("C", {"A": "yes", "B": "no"}) == ("Z", False)


@pytest.mark.parametrize("text, expected", [
    ("The answer is **B**", ("B", 1)),     # "*" before and after B: a standalone letter
    ("B. Pneumonia", ("B", 1)),            # at the start (^), "." after
    ("答案是B", ("B", 1)),                   # "是" is one of its left contexts
    ("Pneumonia", ("A", 2)),               # no standalone letter: the option text that occurs -> A
    ("It is a pneumonia", ("A", 2)),       # "a " is excluded by (?![aA] ): not option A by letter, by text
    ("the answer is b", ("b", 1)),         # kept lower case, as its regex returns it (wrong against "B")
    ("effusion and edema, but effusion more likely", ("C", 2)),  # both occur: the one occurring last -> C
    ("pneumonai", ("A", 3)),               # nothing occurs: difflib's closest option text
])
def test_huatuo_match_choice(text, expected):
    assert huatuo_match_choice(text, CHOICES) == expected


def test_huatuo_difflib_ties_go_to_the_later_option():
    # both options are equally (un)like the text: its `>=` keeps the later one
    assert huatuo_match_choice("zzz", {"A": "xx", "B": "yy"}) == ("B", 3)


@pytest.mark.parametrize("text, expected", [
    # LLaVA-Med v1.0.0 glossary.normalize_word (outputs checked by running it): "-" touching no space is spaced,
    # the period deleted, number words -> digits, articles dropped
    ("the x-ray shows two nodules.", "x ray shows 2 nodules"),
    ("1,000 ml, 2.5 cm", "1000 ml 2.5 cm"),       # a digit-comma-digit anywhere: every mark deleted, not spaced
    ("an (enlarged) heart!", "enlarged heart"),    # "(" and ")" touch a space: deleted; "!" does not: spaced
    ("dont", "don't"),                             # the VQA contraction table
    ("a" * 3 + "." * 40, "aaa" + "." * 8),         # its re.UNICODE lands in sub's count: 32 periods go
])
def test_llava_med_normalize(text, expected):
    assert llava_med_normalize(text) == expected


@pytest.mark.parametrize("prediction, gold, closed, recall", [
    # LLaVA-Med v1.0.0 run_eval.py (verdicts checked by running its evaluate/normalize_word/calculate_f1score):
    # closed = ("yes" in p or "no" in p) and g in p, substrings of the normalised texts
    ("not", "No", True, 0.0),          # "no" is a substring of "not"
    ("Nodule", "no", True, 0.0),       # ... and of "nodule"
    ("CT scan", "CT", False, 1.0),     # neither yes nor no: closed wrong; open recall 1
    ("xray", "X-Ray", False, 0.0),     # gold normalises to "x ray": no shared word
    ("2", "Two", False, 1.0),
    ("There is no tumor", "no", True, 1.0),
    ("yes", "No", False, 0.0),
    ("lung lung", "left lung", False, 2 / 3),  # tp counts the prediction's copies: 2 / (2 + 1)
])
def test_llava_med_closed_and_open(prediction, gold, closed, recall):
    """Mutant seen failing: closed requiring whole words (the old rule) fails "not"/"Nodule"."""
    assert llava_med_closed(prediction, gold) is closed
    assert llava_med_open(prediction, gold)["recall"] == pytest.approx(recall)


def test_llava_med_open_metrics_follow_its_counts():
    # calculate_f1score / calculate_exactmatch: "Yes, it is" vs "yes" -> tp 1, fp 2: precision 1/3, f1 0.5;
    # exact match = distinct gold words found / the prediction's words = 1/3
    assert llava_med_open("Yes, it is", "yes") == pytest.approx(
        {"recall": 1.0, "precision": 1 / 3, "f1": 0.5, "exact_match": 1 / 3})


@pytest.mark.parametrize("prediction, gold, equal", [
    # lmms-eval 75571cf tasks/slake/utils.py normalize_answer + `pred_norm == target_norm` (checked by running it)
    ("not", "No", False),
    ("CT scan", "CT", False),
    ("xray", "X-Ray", True),       # punctuation -> space: "x ray" -> the whole-answer alias "xray"
    ("2", "Two", False),           # no number words
    ("No.", "no", True),
    ("The left lung.", "left lung", False),  # no article dropping
    ("Yeah", "yes", True),
    ("Yeah it is", "yes it is", False),      # synonyms fold only as the whole answer
    ("是的", "是", True),            # Chinese yes synonyms
    ("Liver (left lobe)", "liver", True),    # parenthesised text dropped
])
def test_lmms_eval_exact_match(prediction, gold, equal):
    """Mutant seen failing: normalising yes/no synonyms word by word instead of the whole answer."""
    assert (lmms_eval_normalize(prediction) == lmms_eval_normalize(gold)) is equal
    assert closed_open_score("closed", prediction, gold, "lmms-eval")["correct"] is equal


def test_score_prediction_routes_each_item_to_its_rule():
    mcq = Item(index="1", question="q", kind="mcq", answer="A", scorer="vlmevalkit", options=CHOICES)
    huatuo = Item(index="2", question="q", kind="mcq", answer="A", scorer="huatuo", options=CHOICES)
    # "It is a pneumonia": VLMEvalKit sees no letter token ("a" is lower case) and finds the text -> A as well,
    # but "The answer is b" separates them: VLMEvalKit's regex upper-cases, HuatuoGPT's letter stays "b"
    assert score_prediction(mcq, "The answer is b")["correct"] is False  # regex only knows A-D: b -> B != A
    assert score_prediction(huatuo, "a pneumonia")["correct"] is True
    unscored = Item(index="3", question="q", kind="mcq", answer=None, scorer="vlmevalkit", options=CHOICES)
    assert score_prediction(unscored, "A")["correct"] is None
    opened = Item(index="4", question="q", kind="open", answer="left lung", scorer="closed-open")
    result = score_prediction(opened, "the left lung")
    assert result["correct"] is True and result["recall"] == 1.0 and result["score"] == 1.0  # LLaVA-Med default
    assert score_prediction(opened, "the left lung", "lmms-eval")["correct"] is False
    assert score_prediction(opened, "lung", "llava-med")["score"] == 0.5  # an open item's score is its recall
