"""The request boundary (`build_request` / `ask` / CLI `ask`): every bad case of issue 9 ends in the right error
class with a short message that names the input and echoes none of it; prompts never get special tokens from
user text; generation options are refused alike by the torch and onnx backends."""
import io
import os

import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file

import gmaivl_rt
from gmaivl_rt import InputError, LimitError, Limits
from gmaivl_rt.model.chat import IMAGE_TOKEN, build_prompt
from gmaivl_rt.cli import main
from gmaivl_rt.runtime.generation_config import PLAIN_GREEDY
from gmaivl_rt.runtime.request import PreparedRequest

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")

TEXTS = ["<image>\nWhat modality is this image?", "A CT scan of the chest.", "Which plane is shown?",
         "An axial slice.", "Describe the image.", "An MRI of the head."] * 20


@pytest.fixture(scope="module")
def folder(tiny_model_folder):
    return tiny_model_folder(TEXTS, "boundary")


@pytest.fixture(scope="module")
def runtime(folder):
    return gmaivl_rt.load(folder)


def assert_clean(error, cls, *words, forbidden=()):
    """The error is exactly of class `cls` (or a subclass), names `words`, is short and quotes nothing forbidden."""
    assert isinstance(error, cls), type(error)
    message = str(error)
    assert len(message) <= 300, message
    for word in words:
        assert word in message, message
    for text in forbidden:
        assert text not in message, message


# ------------------------------------------------------------------------------------------------- generation
BAD_GENERATION = [
    ({"max_new_tokens": 0}, InputError, "max_new_tokens"),
    ({"max_new_tokens": -5}, InputError, "max_new_tokens"),
    ({"max_new_tokens": 1.5}, InputError, "max_new_tokens"),
    ({"max_new_tokens": "8"}, InputError, "max_new_tokens"),
    ({"max_new_tokens": True}, InputError, "max_new_tokens"),
    ({"max_new_tokens": None}, InputError, "max_new_tokens"),
    ({"temperature": 0, "do_sample": True}, InputError, "temperature"),
    ({"temperature": "hot"}, InputError, "temperature"),
    ({"temperature": float("nan")}, InputError, "temperature"),
    ({"top_p": 0.0}, InputError, "top_p"),
    ({"top_p": 1.5}, InputError, "top_p"),
    ({"top_k": -1}, InputError, "top_k"),
    ({"top_k": 2.5}, InputError, "top_k"),
    ({"repetition_penalty": 0}, InputError, "repetition_penalty"),
    ({"repetition_penalty": [1.1]}, InputError, "repetition_penalty"),
    ({"no_repeat_ngram_size": -1}, InputError, "no_repeat_ngram_size"),
    ({"no_repeat_ngram_size": True}, InputError, "no_repeat_ngram_size"),
    ({"do_sample": "yes"}, InputError, "do_sample"),
    ({"eos_token_id": "x"}, InputError, "eos_token_id"),
    ({"beams": 4}, InputError, "beams"),
]
IDS = [f"{next(iter(kw))}={list(kw.values())[0]!r}" for kw, _, _ in BAD_GENERATION]


@pytest.mark.parametrize("options, cls, word", BAD_GENERATION, ids=IDS)
def test_bad_generation_options_through_ask(runtime, options, cls, word):
    with pytest.raises(cls) as e:
        runtime.ask("What modality is this image?", CT, **options)
    assert_clean(e.value, cls, word)


def test_context_and_new_token_limits_name_both_numbers(folder, runtime):
    # tiny preset: context 1024
    with pytest.raises(LimitError) as e:
        runtime.ask("What modality?", max_new_tokens=5000)
    assert_clean(e.value, LimitError, "5000", "4096")  # over Limits.max_new_tokens first
    with pytest.raises(LimitError) as e:
        runtime.ask("What modality?", max_new_tokens=1020)
    prompt = runtime.build_request("What modality?", max_new_tokens=1).prompt_tokens
    assert_clean(e.value, LimitError, str(prompt), "1020", "1024")
    roomy = gmaivl_rt.load(folder, limits=Limits(max_text_chars=100_000))
    question = "Describe the image. " * 500  # 10,000 chars, ~2,000+ tokens > 1024
    with pytest.raises(LimitError) as e:
        roomy.ask(question, max_new_tokens=4)
    assert_clean(e.value, LimitError, "1024", forbidden=("Describe",))
    # exactly at the context is fine
    request = runtime.build_request("What modality?", max_new_tokens=1024 - prompt)
    assert request.prompt_tokens + request.generation["max_new_tokens"] == 1024


def test_question_and_message_checks(runtime):
    cases = [
        (dict(question=None), InputError, "question"),
        (dict(question=123), InputError, "question"),
        (dict(question="x" * 50_000), LimitError, "question"),
        (dict(question="a", messages=[{"role": "user", "content": "b"}]), InputError, "not both"),
        (dict(messages="hello"), InputError, "messages"),
        (dict(messages=[]), InputError, "messages"),
        (dict(messages=[{"role": "robot", "content": "x"}]), InputError, "message 0"),
        (dict(messages=[{"role": "user", "content": 5}]), InputError, "message 0"),
        (dict(messages=[{"role": "user", "content": [{"type": "audio"}]}]), InputError, "message 0 part 0"),
        (dict(messages=[{"role": "user", "content": "y" * 20_000}]), LimitError, "message 0"),
        (dict(messages=[{"role": "user", "content": "<image> <image>"}], images=[CT]), InputError, "2 image slot"),
        (dict(question="q", system="s" * 20_000), LimitError, "system"),
        (dict(question="q", system=7), InputError, "system"),
        (dict(question="q", image=CT, images=[CT]), InputError, "not both"),
        (dict(question="q", images=CT), InputError, "images"),
    ]
    for kwargs, cls, word in cases:
        with pytest.raises(cls) as e:
            runtime.ask(**kwargs, max_new_tokens=2)
        assert_clean(e.value, cls, word, forbidden=("x" * 50, "y" * 50, "s" * 50))
    many = Limits(max_images_per_request=1, max_messages=2)
    runtime.limits = many
    try:
        with pytest.raises(LimitError) as e:
            runtime.ask("q", images=[CT, CT], max_new_tokens=1)
        assert_clean(e.value, LimitError, "2 images", "1")
        with pytest.raises(LimitError):
            runtime.ask(messages=[{"role": "user", "content": "a"}] * 3, max_new_tokens=1)
    finally:
        runtime.limits = Limits()


def test_image_input_errors_through_ask(runtime, tmp_path):
    with pytest.raises(InputError) as e:
        runtime.ask("q", b"not an image at all", max_new_tokens=1)
    assert_clean(e.value, InputError, "image 1", forbidden=("not an image at all",))
    with pytest.raises(InputError) as e:
        runtime.ask("q", images=[CT, object()], max_new_tokens=1)
    assert_clean(e.value, InputError, "image 2", "object")
    with pytest.raises(InputError) as e:  # a bad option is refused before any image is decoded
        runtime.ask("q", b"not an image", max_new_tokens=0)
    assert_clean(e.value, InputError, "max_new_tokens")


# ------------------------------------------------------------------------------------------------- accepted forms
def test_ask_takes_every_form_of_the_same_dicom(runtime):
    expected = runtime.ask("What modality is this image?", CT, max_new_tokens=3)
    raw = open(CT, "rb").read()
    import pydicom

    for form in (os.fsencode(CT), raw, io.BytesIO(raw), pydicom.dcmread(CT)):
        assert runtime.ask("What modality is this image?", form, max_new_tokens=3) == expected


@pytest.mark.parametrize("kind", ["uint8", "uint16", "float32"])
def test_every_form_gives_identical_pixel_values(runtime, tmp_path, kind):
    from PIL import Image

    rng = np.random.default_rng(0)
    values = {"uint8": rng.integers(0, 256, (30, 41)).astype(np.uint8),
              "uint16": rng.integers(0, 4096, (30, 41)).astype(np.uint16),
              "float32": rng.normal(0, 1, (30, 41)).astype(np.float32)}[kind]
    path = tmp_path / ("x.tif" if kind == "float32" else "x.png")
    Image.fromarray(values).save(path)
    data = path.read_bytes()
    forms = [path, str(path), os.fsencode(path), data, io.BytesIO(data), Image.open(path), values,
             torch.from_numpy(values)]
    pixel_values = [runtime.build_request("q", form, max_new_tokens=1).pixel_values for form in forms]
    for i, got in enumerate(pixel_values[1:], 1):
        assert torch.equal(got, pixel_values[0]), (kind, i)
    # and the file read as before the boundary existed: the medical reader, then CLIP preprocessing
    from gmaivl_rt.model.preprocess import preprocess_image
    from gmaivl_rt.medical.reader import read_medical_image

    expected = preprocess_image(read_medical_image(path).pixels, runtime.config.vision.image_size)[None]
    assert torch.equal(pixel_values[0], expected)


def test_prepared_request_is_what_generate_needs(runtime):
    request = runtime.build_request("What modality is this image?", CT, max_new_tokens=3, top_k=5)
    assert isinstance(request, PreparedRequest)
    assert request.input_ids.shape == (1, request.prompt_tokens) and request.input_ids.dtype == torch.int64
    assert torch.equal(request.attention_mask, torch.ones_like(request.input_ids))
    assert request.pixel_values.shape == (1, 3, 28, 28)
    assert request.generation == {**PLAIN_GREEDY, "max_new_tokens": 3, "top_k": 5,
                                  "eos_token_id": runtime.eos_token_ids, "pad_token_id": runtime.tokenizer.pad_token_id}
    out = runtime.generate(**request.generate_inputs(), **request.generation)
    assert runtime.decode(out[:, request.prompt_tokens:])[0].strip() == \
        runtime.ask("What modality is this image?", CT, max_new_tokens=3, top_k=5)
    # image keys: equal for the same picture in another form, different for another picture
    same = runtime.build_request("q", open(CT, "rb").read(), max_new_tokens=1)
    other = runtime.build_request("q", MR, max_new_tokens=1)
    assert same.image_keys == request.image_keys and other.image_keys != request.image_keys
    assert len(request.image_keys[0]) == 64


def test_messages_forms_tokenize_like_the_rendered_template(runtime):
    """str content with <image> slots, OpenAI-style parts and the question form give the prompt the plain
    template gives (rendered, expanded, tokenized whole): safety changes nothing for ordinary text."""
    n = runtime.config.num_image_tokens
    history = [{"role": "user", "content": "<image>\nWhat modality is this image?"},
               {"role": "assistant", "content": "This is a CT scan."}, {"role": "user", "content": "Which plane?"}]
    text = build_prompt(history, system="Describe the image.").replace(IMAGE_TOKEN, IMAGE_TOKEN * n)
    expected = runtime.tokenizer.encode(text, add_special_tokens=False)
    got = runtime.build_request(messages=history, images=[CT], system="Describe the image.", max_new_tokens=1)
    assert got.input_ids[0].tolist() == expected
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat modality is this image?"}]},
             *history[1:]]
    assert runtime.build_request(messages=parts, images=[CT], system="Describe the image.",
                                 max_new_tokens=1).input_ids[0].tolist() == expected
    no_slot = [{"role": "user", "content": "What modality is this image?"}, *history[1:]]
    assert runtime.build_request(messages=no_slot, images=[CT], system="Describe the image.",
                                 max_new_tokens=1).input_ids[0].tolist() == expected


def test_typed_special_tokens_stay_text(runtime):
    tokenizer = runtime.tokenizer
    specials = sorted(set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab()))
    special_ids = {tokenizer.convert_tokens_to_ids(t) for t in specials}
    assert {"<|im_start|>", "<|im_end|>", "<image>", "</s>"} <= set(specials)
    typed = "Is this " + " and ".join(specials) + "?"

    def special_counts(ids):
        return {i: ids.count(i) for i in special_ids if ids.count(i)}

    plain = runtime.build_request("Is this?", CT, system="Be brief.", max_new_tokens=1).input_ids[0].tolist()
    forged = runtime.build_request(typed, CT, system="Be " + typed, max_new_tokens=1).input_ids[0].tolist()
    assert special_counts(forged) == special_counts(plain)  # only what the template placed
    assert special_counts(plain)[runtime.config.image_token_index] == runtime.config.num_image_tokens
    # as chat messages: text parts are literal; in str content <image> is the documented slot marker, every other
    # special token stays text
    for content in ([{"type": "image"}, {"type": "text", "text": typed}], "<image>" + typed.replace("<image>", "")):
        ids = runtime.build_request(messages=[{"role": "user", "content": content}], images=[CT], system="Be brief.",
                                    max_new_tokens=1).input_ids[0].tolist()
        assert special_counts(ids) == special_counts(plain)
    # and the typed text decodes back to what was typed
    ids = runtime.build_request(typed, max_new_tokens=1).input_ids[0].tolist()
    assert typed in tokenizer.decode(ids)


# ------------------------------------------------------------------------------------------------- backends agree
BAD_DIRECT = [{"max_new_tokens": 0}, {"max_new_tokens": -5}, {"max_new_tokens": 1.5}, {"max_new_tokens": "8"},
              {"max_new_tokens": True}, {"max_new_tokens": 10_000}, {"temperature": -1.0}, {"top_p": 2.0},
              {"top_k": "3"}, {"repetition_penalty": 0.0}, {"no_repeat_ngram_size": 1.5}, {"do_sample": 1}]


def test_torch_and_onnx_generate_refuse_bad_options_alike(hf_checkpoint, exported):
    pytest.importorskip("onnxruntime")
    torch_backend = gmaivl_rt.load(hf_checkpoint, backend="torch")
    onnx_backend = gmaivl_rt.load(exported("fp32"), backend="onnx")
    ids = torch.tensor([[1, 5, 9, 3]])
    for options in BAD_DIRECT:
        kwargs = {"max_new_tokens": 2, **options}
        classes = []
        for backend in (torch_backend, onnx_backend):
            with pytest.raises(InputError) as e:
                backend.generate(ids, **kwargs)
            assert len(str(e.value)) <= 300
            classes.append(type(e.value))
        assert classes[0] is classes[1], (options, classes)
        expected = LimitError if options.get("max_new_tokens") == 10_000 else InputError
        assert classes[0] is expected, options
    assert torch.equal(torch_backend.generate(ids, max_new_tokens=3), onnx_backend.generate(ids, max_new_tokens=3))


# ------------------------------------------------------------------------------------------------- CLI
def run_cli(capsys, *argv):
    code = main(["ask", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("extra, word", [
    (["--max-new-tokens", "0"], "max_new_tokens"), (["--max-new-tokens", "-5"], "max_new_tokens"),
    (["--max-new-tokens", "5000"], "max_new_tokens"), (["--window", "nonsense"], "window"),
    (["--window", "40,x"], "window"), (["--frame", "3"], "index 3")])
def test_cli_bad_input_is_one_line(folder, capsys, extra, word):
    code, out, err = run_cli(capsys, folder, "--image", CT, "--question", "q", *extra)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gmaivl-rt ask: error: ") and word in lines[0], err
    assert len(lines[0]) <= 300


def test_cli_long_question_and_bad_image(folder, capsys, tmp_path):
    code, _, err = run_cli(capsys, folder, "--question", "x" * 50_000)
    assert code == 2 and "question" in err and "x" * 50 not in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "scan.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 50)
    code, _, err = run_cli(capsys, folder, "--image", bad, "--question", "q")
    assert code == 2 and err.startswith("gmaivl-rt ask: error: image 1") and "garbage" not in err


def test_cli_reader_options_reach_the_reader(folder, capsys):
    from nibabel.testing import data_path

    nii = os.path.join(data_path, "anatomical.nii")
    expected = gmaivl_rt.load(folder).ask("q", nii, plane="sagittal", slice_index=2, window="minmax",
                                          max_new_tokens=3)
    code, out, _ = run_cli(capsys, folder, "--image", nii, "--question", "q", "--plane", "sagittal", "--slice", "2",
                           "--window", "minmax", "--max-new-tokens", "3")
    assert code == 0 and out.strip() == expected
    code, out, _ = run_cli(capsys, folder, "--image", CT, "--question", "q", "--window", "40,400",
                           "--max-new-tokens", "3")
    assert code == 0 and out.strip() == gmaivl_rt.load(folder).ask("q", CT, window=(40, 400), max_new_tokens=3)


# ------------------------------------------------------------------------------------------------- PHI
PATIENT_NAME, PATIENT_ID = "Zyxwabc^Jonquil", "PID-48213-QX"


def phi_dicoms(tmp_path):
    """CT_small with a known patient name / ID: intact, with its pixel data cut short, and cut in the header."""
    import pydicom

    ds = pydicom.dcmread(CT)
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.InstitutionName = "Jonquil Clinic"
    ds.save_as(tmp_path / "good.dcm")
    good = (tmp_path / "good.dcm").read_bytes()
    ds.PixelData = ds.PixelData[:1000]
    ds.save_as(tmp_path / "short.dcm")
    short = (tmp_path / "short.dcm").read_bytes()
    cut = good[: good.index(PATIENT_ID.encode()) + 40]
    (tmp_path / "cut.dcm").write_bytes(cut)
    return good, short, cut


def test_patient_identifiers_reach_no_message_log_or_traceback(runtime, tmp_path, caplog):
    import logging
    import traceback
    import warnings

    import pydicom

    good, short, cut = phi_dicoms(tmp_path)
    assert PATIENT_NAME.encode() in good and PATIENT_ID.encode() in short and PATIENT_ID.encode() in cut
    secrets = (PATIENT_NAME, PATIENT_ID, "Zyxwabc", "Jonquil", "48213")
    texts = []
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bad_forms = [short, io.BytesIO(short), pydicom.dcmread(io.BytesIO(short)), tmp_path / "short.dcm",
                     str(tmp_path / "short.dcm"), os.fsencode(tmp_path / "short.dcm"), cut, io.BytesIO(cut),
                     tmp_path / "cut.dcm"]
        for form in bad_forms:
            with pytest.raises(InputError) as e:
                runtime.ask("What modality is this image?", form, max_new_tokens=2)
            assert len(str(e.value)) <= 300 and "image 1" in str(e.value)
            texts.append("".join(traceback.format_exception(e.value)))
        # refused by a limit, and answered: no identifier anywhere either
        small = Limits(max_image_pixels=100)
        runtime.limits = small
        try:
            for form in (good, pydicom.dcmread(io.BytesIO(good))):
                with pytest.raises(LimitError) as e:
                    runtime.ask("q", form, max_new_tokens=2)
                texts.append("".join(traceback.format_exception(e.value)))
        finally:
            runtime.limits = Limits()
        for form in (good, io.BytesIO(good), pydicom.dcmread(io.BytesIO(good)), tmp_path / "good.dcm"):
            texts.append(runtime.ask("What modality is this image?", form, max_new_tokens=2))
    texts += [record.getMessage() for record in caplog.records]
    texts += [str(w.message) for w in caught]
    for text in texts:
        for secret in secrets:
            assert secret not in text, text


def test_cli_refuses_a_pixel_bomb_and_an_all_nan_volume(folder, capsys, tmp_path):
    import nibabel as nib
    from PIL import Image

    Image.fromarray(np.zeros((9400, 9400), bool)).save(tmp_path / "bomb.png")
    nib.save(nib.Nifti1Image(np.full((4, 5, 6), np.nan, np.float32), np.eye(4)), tmp_path / "nan.nii.gz")
    for name, word in (("bomb.png", "limit"), ("nan.nii.gz", "no finite value")):
        code, out, err = run_cli(capsys, folder, "--image", tmp_path / name, "--question", "q")
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
        assert err.startswith("gmaivl-rt ask: error: image 1") and word in err and name not in err
