"""The scoring rules, each against predictions chosen to tell its anchor's rule from a near miss. Expected values
are worked out from the anchor's rule in the comment beside each case."""
import pytest

from gmaivl_rt.eval.readers import Item
from gmaivl_rt.eval.scoring import (can_infer_option, can_infer_text, closed_correct, extract_option,
                                    huatuo_match_choice, normalize_answer, open_scores, score_prediction)

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
    ("  D  ", ("D", True)),  # the prediction is stripped first
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


def test_vlmevalkit_strips_the_prediction_before_the_length_guard():
    # options "ab" + "cd": the text rule gives up above 8 characters; stripped, "    ab    " is "ab" -> A
    assert extract_option("    ab    ", {"A": "ab", "B": "cd"}) == ("A", True)


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
    ("The X-ray shows Two nodules.", "xray shows 2 nodules"),
    ("x ray", "xray"),
    ("Yeah.", "yes"),
    ("1,000 ml, 2.5 cm", "1000 ml 2.5 cm"),
    ("An (enlarged) heart!", "enlarged heart"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("prediction, gold, expected", [
    ("Yes, there is.", "yes", True),
    ("yes and no", "yes", False),          # both yes and no: not exactly one
    ("Nodule present", "no", False),       # "no" must be a word, not a prefix of "nodule"
    ("Yeah", "Yes", True),                 # synonym folded
    ("No.", "No", True),
    ("No", "yes", False),
    ("the left lung", "Left lung", True),  # gold words in order
    ("lung, left", "Left lung", False),
])
def test_closed_correct(prediction, gold, expected):
    assert closed_correct(prediction, gold) is expected


def test_open_scores_follow_llava_med_counts():
    # LLaVA-Med: tp sums the prediction's counts of shared words: "lung lung" vs "left lung" -> tp 2, fn 1,
    # fp 0 -> recall 2/3, precision 1, f1 0.8
    assert open_scores("lung lung", "left lung") == pytest.approx({"recall": 2 / 3, "f1": 0.8, "exact_match": 0.0})
    assert open_scores("The Left Lung.", "left lung") == {"recall": 1.0, "f1": 1.0, "exact_match": 1.0}
    assert open_scores("heart", "left lung") == {"recall": 0.0, "f1": 0.0, "exact_match": 0.0}


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
    result = score_prediction(opened, "left lung")
    assert result["correct"] is True and result["recall"] == 1.0
