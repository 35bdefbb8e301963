"""The ask-a-question path: a real DICOM from pydicom's test data through reading, preprocessing, template,
generation and decoding, checked piece by piece against the components it must agree with."""
import pytest
import torch
from pydicom.data import get_testdata_file
from train_fixtures import make_tiny_chat_model

import gmaivl_rt
from gmaivl_rt import GMAIVL
from gmaivl_rt.chat import IMAGE_TOKEN, build_prompt, preprocess_image
from gmaivl_rt.cli import main
from gmaivl_rt.medical_io import read_medical_image

TEXTS = ["<image>\nWhat modality is this image?", "This is a CT scan of the chest.", "Which plane is shown?",
         "An axial slice.", "Describe the image.", "A magnetic resonance image of the head."] * 20
QUESTION = "What modality is this image?"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_chat_model(tmp_path_factory.mktemp("ask"), TEXTS)


def test_ask_reads_the_dicom_and_decodes_what_generate_produces(folder):
    backend = gmaivl_rt.load(folder)
    ct = get_testdata_file("CT_small.dcm")
    answer = backend.ask(QUESTION, ct, max_new_tokens=6)
    # the same pipeline written out from its components
    cfg = backend.config
    prompt = build_prompt([{"role": "user", "content": f"{IMAGE_TOKEN}\n{QUESTION}"}])
    prompt = prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * cfg.num_image_tokens)
    ids = torch.tensor([backend.tokenizer.encode(prompt, add_special_tokens=False)])
    assert int((ids == cfg.image_token_index).sum()) == cfg.num_image_tokens
    pixels = preprocess_image(read_medical_image(ct).pixels, cfg.vision.image_size)[None]
    out = GMAIVL.from_pretrained(folder).generate(ids, pixel_values=pixels, max_new_tokens=6,
                                                  eos_token_id=backend.eos_token_ids, repetition_penalty=1.12,
                                                  no_repeat_ngram_size=5)
    assert answer == backend.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_cli_ask_says_what_the_api_says(folder, capsys):
    ct = get_testdata_file("CT_small.dcm")
    expected = gmaivl_rt.load(folder).ask(QUESTION, ct, max_new_tokens=5)
    assert main(["ask", str(folder), "--image", ct, "--question", QUESTION, "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() == expected


def test_ask_through_the_onnx_backend_gives_the_same_answer(folder, tmp_path):
    from gmaivl_rt.export.onnx_export import export_onnx

    export_onnx(folder, tmp_path / "onnx")
    ct = get_testdata_file("CT_small.dcm")
    expected = gmaivl_rt.load(folder).ask(QUESTION, ct, max_new_tokens=8)
    assert gmaivl_rt.load(tmp_path / "onnx", backend="onnx").ask(QUESTION, ct, max_new_tokens=8) == expected
