"""Annotation-grounded conversation templates (GMAI-VL's MM-Caption / MM-Percept style).

Every builder takes the facts of one picture (`ImageFacts`) and a seeded `random.Random`, and returns a list of
(question, answer) turns. Each question/answer kind has several phrasings picked by the RNG so a model cannot learn
one wording; the facts themselves (modality, labels, boxes, sizes) are never invented - they come from the metadata
and the annotations. The first question gets the `<image>\\n` prefix when the record is assembled (records.py).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from gmaivl_rt.medical.base import UNKNOWN_MODALITY

Turns = list[tuple[str, str]]


@dataclass
class ImageFacts:
    """What is known about one 2D picture: metadata plus (optionally) its annotation."""

    modality: str                      # human name: "CT", "MRI", "X-ray", "ultrasound", ...
    body_part: str | None = None
    plane: str | None = None           # "axial" | "coronal" | "sagittal" | "oblique" | None
    department: str | None = None
    window_name: str | None = None     # a named CT window when one was applied
    is_color: bool = False
    index: int = 0                     # frame / slice index and how many the source has
    count: int = 1
    dim: str = "2d"
    spacing_mm: float | None = None    # square pixel side in mm, when known
    labels: list[str] = field(default_factory=list)  # the dataset's label set (for distractors)


# --------------------------------------------------------------------------------------------------------------
# phrase pools
# --------------------------------------------------------------------------------------------------------------
CAPTION_QUESTIONS = [
    "Describe this image.",
    "What does this medical image show?",
    "Give a short description of this image.",
    "Can you describe the image for me?",
    "Summarize what can be seen in this picture.",
    "Provide a brief caption for this medical image.",
]
CAPTION_OPENINGS = [
    "This is {a_view}.",
    "The image is {a_view}.",
    "Shown here is {a_view}.",
    "This picture shows {a_view}.",
    "It is {a_view}.",
]
MODALITY_QUESTIONS = [
    "What imaging modality was used to acquire this image?",
    "Which modality is this image from?",
    "What kind of scan is this?",
    "Identify the imaging modality.",
    "Is this a CT, MRI, X-ray or another kind of image?",
]
MODALITY_ANSWERS = ["This is {a_modality} image.", "The modality is {modality}.", "It was acquired with {modality}.",
                    "{Modality}.", "This image comes from {a_modality} scan."]
UNKNOWN_MODALITY_ANSWERS = ["The image's metadata does not record the imaging modality.",
                            "The modality is not recorded for this image."]
PLANE_QUESTIONS = ["In which plane is this image displayed?", "What is the orientation of this slice?",
                   "Is this an axial, coronal or sagittal view?", "Which anatomical plane does this image show?"]
PLANE_ANSWERS = ["It is {a_plane} view.", "This is {a_plane} slice.", "The image is shown in the {plane} plane.",
                 "{Plane}."]
BODY_QUESTIONS = ["Which part of the body is imaged?", "What body region does this image cover?",
                  "What anatomy is shown in this image?", "Which body part was examined here?"]
BODY_ANSWERS = ["The {body} is imaged.", "This image shows the {body}.", "It covers the {body} region.",
                "The examined body part is the {body}."]
COLOR_QUESTIONS = ["Is this a colour or a greyscale image?", "Is the image in colour?",
                   "Does this image have colour information or only grey levels?"]
COLOR_ANSWERS = {True: ["It is a colour image.", "The image is in colour.", "Colour."],
                 False: ["It is a greyscale image.", "The image is greyscale, with no colour.", "Greyscale."]}
CLS_OPEN_QUESTIONS = [
    "What is the diagnosis for this image?",
    "Which category does this image belong to?",
    "What finding is shown in this image?",
    "Classify this image.",
    "What condition can be identified in this {modality} image?",
    "Based on the image, what is the most likely label?",
]
CLS_OPEN_ANSWERS = ["The image shows {label}.", "This is {label}.", "{Label}.", "It belongs to the category {label}.",
                    "The finding is {label}.", "The most likely label is {label}."]
CLS_MC_QUESTIONS = [
    "Which of the following best describes this image?",
    "What is shown in this {modality} image? Choose one option.",
    "Select the correct category for this image.",
    "Which option matches the finding in this image?",
]
CLS_MC_SUFFIX = ["Answer with the option's letter from the given choices directly.",
                 "Answer with the letter of the correct option.", "Reply with one option."]
SEG_PRESENT_QUESTIONS = ["Is there {a_label} in this image?", "Can you see the {label} in this image?",
                         "Does this image contain {a_label}?", "Is the {label} visible here?"]
SEG_PRESENT_YES = ["Yes, the {label} is visible.", "Yes, {a_label} can be seen.", "Yes.",
                   "Yes, the image contains {a_label}."]
SEG_PRESENT_NO = ["No, there is no {label} in this image.", "No, the {label} is not visible.", "No.",
                  "No {label} can be seen here."]
SEG_WHAT_QUESTIONS = ["Which structures are visible in this image?", "What structures can be segmented here?",
                      "List the annotated structures present in this image.", "What anatomy or lesions appear here?"]
SEG_WHAT_NONE = ["None of the annotated structures ({labels}) is visible in this image.",
                 "No annotated structure is present; the image shows none of: {labels}."]
SEG_LOCATION_QUESTIONS = ["Where is the {label} located in the image?", "Where is the {label}?",
                          "Locate the {label} in this image.", "Give the position of the {label}."]
SEG_LOCATION_ANSWERS = ["The {label} is in the {region} of the image, within the box {box}.",
                        "It lies in the {region} part of the image, bounding box {box}.",
                        "The {label} occupies the {region} of the image ({box}).",
                        "In the {region} of the image; its bounding box is {box}."]
SEG_SIZE_QUESTIONS = ["How large is the {label}?", "What is the size of the {label} in this image?",
                      "How much of the image does the {label} cover?", "Estimate the extent of the {label}."]
SEG_SIZE_ANSWERS = ["The {label} covers about {percent} of the image{area}.",
                    "It takes up roughly {percent} of the image{area}.",
                    "About {percent} of the image belongs to the {label}{area}.",
                    "The {label} is {size_word}, about {percent} of the image{area}."]
DET_QUESTIONS = ["Detect every {label} in this image and give its bounding box.",
                 "Where are the {label_plural} in this image? Give boxes as [x0, y0, x1, y1].",
                 "Locate all instances of {label} in the image.",
                 "Please output the bounding boxes of the {label_plural}."]
DET_ANSWERS = ["There {is_are} {n} {label_noun}: {boxes}.", "{N} {label_noun} found at {boxes}.",
               "I found {n} {label_noun}, with boxes {boxes}.", "{Boxes_cap}."]
DET_NONE = ["There is no {label} in this image.", "No {label} was found.", "None: no {label} is present."]
REPORT_QUESTIONS = ["Write the findings for this image.", "Please write a radiology report for this image.",
                    "Describe the findings in this {modality} image.", "What are the findings?",
                    "Generate a report for this examination."]
REPORT_IMPRESSION = ["Findings: {findings}\nImpression: {impression}", "{findings} Impression: {impression}",
                     "FINDINGS: {findings}\nIMPRESSION: {impression}"]
VQA_MC_SUFFIX = CLS_MC_SUFFIX

REGIONS = [["upper left", "upper middle", "upper right"],
           ["middle left", "central", "middle right"],
           ["lower left", "lower middle", "lower right"]]


# --------------------------------------------------------------------------------------------------------------
# small text helpers
# --------------------------------------------------------------------------------------------------------------
def article(word: str) -> str:
    """'an MRI', 'a CT', 'an X-ray', 'an ultrasound', 'a PET'."""
    w = word.strip()
    vowel_sound = w[:1].lower() in "aeiou" or (w[:1] in "FHLMNRSX" and (len(w) == 1 or w[1:2].isupper()
                                                                          or w[1:2] in "-"))
    return ("an " if vowel_sound else "a ") + w


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def plural(word: str) -> str:
    return word if word.endswith("s") else word + "s"


def format_box(box) -> str:
    """Normalised [x0, y0, x1, y1] with 3 decimals."""
    return "[" + ", ".join(f"{float(v):.3f}" for v in box) + "]"


def region_of(box) -> str:
    """3x3 grid position of a normalised box's centre ('upper left', 'central', ...)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return REGIONS[min(int(cy * 3), 2)][min(int(cx * 3), 2)]


def _view(f: ImageFacts) -> str:
    name = f.modality if f.modality.endswith(("image", "map", "photograph")) else f"{f.modality} image"
    text = f"{f.plane} {name}" if f.plane in ("axial", "coronal", "sagittal") else name
    if f.body_part:
        text += f" of the {f.body_part}"
    return text


def caption_text(f: ImageFacts, rng: random.Random, label: str | None = None) -> str:
    """A metadata-grounded caption; `label` (a classification label) adds the finding."""
    sentences = [rng.choice(CAPTION_OPENINGS).format(a_view=article(_view(f)))]
    details = []
    if f.count > 1:
        what, whole = ("slice", "volume") if f.dim == "3d" else ("frame", "series")
        details.append(rng.choice([f"It is {what} {f.index + 1} of {f.count}.",
                                   f"This is {what} {f.index + 1} out of {f.count} in the {whole}."]))
    if f.window_name and f.window_name not in ("none", "file", "file VOI LUT", "percentile", "bit depth", "palette",
                                               "user"):
        details.append(rng.choice([f"It is displayed with {article(f.window_name)} window.",
                                   f"{cap(article(f.window_name))} window is applied."]))
    details.append(rng.choice(["The image is in colour.", "It is a colour image."]) if f.is_color else
                   rng.choice(["The image is greyscale.", "It is shown in grey levels."]))
    if f.spacing_mm:
        details.append(rng.choice([f"Each pixel spans about {f.spacing_mm:.2f} mm.",
                                   f"The pixel spacing is {f.spacing_mm:.2f} mm."]))
    if f.department:
        details.append(rng.choice([f"Such images are typically read in {f.department}.",
                                   f"The relevant department is {f.department}."]))
    rng.shuffle(details)
    sentences += details[: rng.randint(1, len(details))]
    if label:
        # Classification labels are often adjectives ("normal", "benign"): no article before them.
        sentences.append(rng.choice(["It is classified as {label}.", "The finding is {label}.",
                                     "It is labelled as {label}."]).format(label=label))
    return " ".join(sentences)


# --------------------------------------------------------------------------------------------------------------
# conversation builders: each returns [(question, answer), ...]
# --------------------------------------------------------------------------------------------------------------
def caption_turns(f: ImageFacts, rng: random.Random, label: str | None = None) -> Turns:
    return [(rng.choice(CAPTION_QUESTIONS), caption_text(f, rng, label))]


def metadata_vqa_turns(f: ImageFacts, rng: random.Random) -> Turns:
    """Questions answerable from metadata alone: modality, plane, body part, colour (2-4 turns, shuffled)."""
    m = f.modality
    if m == UNKNOWN_MODALITY:  # the file records none: say so rather than "This is a medical image image."
        answer = rng.choice(UNKNOWN_MODALITY_ANSWERS)
    else:
        answer = rng.choice(MODALITY_ANSWERS).format(a_modality=article(m), modality=m, Modality=cap(m))
    turns = [(rng.choice(MODALITY_QUESTIONS), answer)]
    if f.plane in ("axial", "coronal", "sagittal"):
        turns.append((rng.choice(PLANE_QUESTIONS),
                      rng.choice(PLANE_ANSWERS).format(a_plane=article(f.plane), plane=f.plane, Plane=cap(f.plane))))
    if f.body_part:
        turns.append((rng.choice(BODY_QUESTIONS), rng.choice(BODY_ANSWERS).format(body=f.body_part)))
    turns.append((rng.choice(COLOR_QUESTIONS), rng.choice(COLOR_ANSWERS[f.is_color])))
    rng.shuffle(turns)
    return turns


def classification_open_turns(f: ImageFacts, rng: random.Random, label: str) -> Turns:
    q = rng.choice(CLS_OPEN_QUESTIONS).format(modality=f.modality)
    return [(q, rng.choice(CLS_OPEN_ANSWERS).format(label=label, Label=cap(label)))]


def multiple_choice(rng: random.Random, answer: str, pool: list[str], max_options: int = 4) -> tuple[str, str]:
    """Options text ('A. x\\nB. y ...') with distractors from `pool`, and the correct 'B. y' answer string."""
    distractors = [p for p in dict.fromkeys(pool) if p != answer]
    options = [answer] + rng.sample(distractors, min(len(distractors), max_options - 1))
    rng.shuffle(options)
    letters = "ABCDEFGH"
    text = "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(options))
    k = options.index(answer)
    return text, f"{letters[k]}. {answer}"


def classification_mc_turns(f: ImageFacts, rng: random.Random, label: str) -> Turns | None:
    """Multiple choice with distractors from the dataset's label set; None when it has no other label."""
    if len([x for x in f.labels if x != label]) < 1:
        return None
    options, answer = multiple_choice(rng, label, f.labels)
    q = f"{rng.choice(CLS_MC_QUESTIONS).format(modality=f.modality)}\n{options}\n{rng.choice(CLS_MC_SUFFIX)}"
    return [(q, answer)]


def mask_facts(mask: np.ndarray, labels: list[str]) -> dict[str, dict]:
    """Per present label: normalised box [x0, y0, x1, y1] (pixel edges / size) and area fraction.

    mask: (H, W) int label map, value i -> labels[i - 1]."""
    h, w = mask.shape
    out = {}
    for value, name in enumerate(labels, start=1):
        ys, xs = np.nonzero(mask == value)
        if ys.size == 0:
            continue
        box = [xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h]
        out[name] = {"box": [round(float(v), 3) for v in box], "fraction": ys.size / float(h * w),
                     "pixels": int(ys.size)}
    return out


def segmentation_turns(f: ImageFacts, rng: random.Random, present: dict[str, dict]) -> Turns:
    """Presence, location (from the mask's box) and size of each present structure, and a negative question."""
    labels = f.labels
    absent = [x for x in labels if x not in present]
    if not present:
        turns = [(rng.choice(SEG_WHAT_QUESTIONS), rng.choice(SEG_WHAT_NONE).format(labels=", ".join(labels)))]
        for name in rng.sample(absent, min(2, len(absent))):
            turns.append(_presence(rng, name, False))
        return turns
    names = list(present)
    turns = [(rng.choice(SEG_WHAT_QUESTIONS), rng.choice(["The image shows ", "Visible structures: ", "It contains "])
              + ", ".join(names) + ".")] if len(labels) > 1 else []
    for name in names:
        info = present[name]
        turns.append(_presence(rng, name, True))
        turns.append((rng.choice(SEG_LOCATION_QUESTIONS).format(label=name),
                      rng.choice(SEG_LOCATION_ANSWERS).format(label=name, region=region_of(info["box"]),
                                                              box=format_box(info["box"]))))
        area = ""
        if f.spacing_mm:
            area_mm2 = info["pixels"] * f.spacing_mm ** 2
            area = f" (about {area_mm2 / 100:.1f} cm\u00b2 in this slice)" if area_mm2 >= 100 else \
                f" (about {area_mm2:.0f} mm\u00b2 in this slice)"
        fraction = info["fraction"]
        size_word = "small" if fraction < 0.02 else "medium-sized" if fraction < 0.15 else "large"
        turns.append((rng.choice(SEG_SIZE_QUESTIONS).format(label=name),
                      rng.choice(SEG_SIZE_ANSWERS).format(label=name, percent=f"{100 * fraction:.1f}%", area=area,
                                                          size_word=size_word)))
    if absent:
        turns.append(_presence(rng, rng.choice(absent), False))
    return turns


def _presence(rng: random.Random, name: str, yes: bool) -> tuple[str, str]:
    q = rng.choice(SEG_PRESENT_QUESTIONS).format(label=name, a_label=article(name))
    return q, rng.choice(SEG_PRESENT_YES if yes else SEG_PRESENT_NO).format(label=name, a_label=article(name))


def detection_turns(f: ImageFacts, rng: random.Random, boxes: dict[str, list[list[float]]]) -> Turns:
    """One question per label of the dataset: its boxes (normalised, 3 decimals) or that there is none."""
    turns = []
    for name in (f.labels or list(boxes)):
        found = boxes.get(name, [])
        q = rng.choice(DET_QUESTIONS).format(label=name, label_plural=plural(name))
        if not found:
            turns.append((q, rng.choice(DET_NONE).format(label=name)))
            continue
        n = len(found)
        box_text = ", ".join(format_box(b) for b in found)
        noun = name if n == 1 else plural(name)
        turns.append((q, rng.choice(DET_ANSWERS).format(is_are="is" if n == 1 else "are", n=n, N=n, label_noun=noun,
                                                        boxes=box_text, Boxes_cap=cap(f"{noun}: {box_text}"))))
    rng.shuffle(turns)
    return turns


def report_turns(f: ImageFacts, rng: random.Random, findings: str, impression: str | None = None) -> Turns:
    q = rng.choice(REPORT_QUESTIONS).format(modality=f.modality)
    answer = findings.strip() if not impression else rng.choice(REPORT_IMPRESSION).format(
        findings=findings.strip(), impression=impression.strip())
    return [(q, answer)]


def vqa_turns(f: ImageFacts, rng: random.Random, question: str, answer: str, options: list[str] | None) -> Turns:
    """A dataset's own question; with options it becomes lettered multiple choice."""
    if options:
        pool = list(options) if answer in options else list(options) + [answer]
        text, letter_answer = multiple_choice(rng, answer, pool, max_options=len(pool))
        return [(f"{question.strip()}\n{text}\n{rng.choice(VQA_MC_SUFFIX)}", letter_answer)]
    return [(question.strip(), answer.strip())]
