"""The ask-a-question path: a real DICOM from pydicom's test data through reading, preprocessing, template,
generation and decoding, checked piece by piece against the components it must agree with."""
import pytest
import torch
from pydicom.data import get_testdata_file

from gmaivl_rt import GMAIVL, GMAIVLConfig
from gmaivl_rt.assistant import Assistant
from gmaivl_rt.chat import IMAGE_TOKEN, build_prompt, preprocess_image
from gmaivl_rt.medical_io import read_medical_image
from gmaivl_rt.train.tokenizer import model_vocab_fields, train_bpe_tokenizer

TEXTS = ["<image>\nWhat modality is this image?", "This is a CT scan of the chest.", "Which plane is shown?",
         "An axial slice.", "Describe the image.", "A magnetic resonance image of the head."] * 20


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("assistant")
    tokenizer = train_bpe_tokenizer(TEXTS, path, vocab_size=300, min_frequency=1)
    config = GMAIVLConfig.preset("tiny").replace(**model_vocab_fields(tokenizer))
    torch.manual_seed(0)
    GMAIVL(config).save_pretrained(path)
    return path


def test_prepare_builds_the_chat_prompt_with_image_tokens(folder):
    assistant = Assistant.from_pretrained(folder)
    ct = get_testdata_file("CT_small.dcm")
    ids, pixels = assistant.prepare("What modality is this image?", ct)
    cfg = assistant.config
    assert int((ids == cfg.image_token_index).sum()) == cfg.num_image_tokens
    expected_pixels = preprocess_image(read_medical_image(ct).pixels, cfg.vision.image_size)
    torch.testing.assert_close(pixels[0], expected_pixels)
    prompt = build_prompt([{"role": "user", "content": f"{IMAGE_TOKEN}\nWhat modality is this image?"}])
    text = assistant.tokenizer.decode(ids[0][ids[0] != cfg.image_token_index])
    assert text == prompt.replace(IMAGE_TOKEN, "")


def test_ask_decodes_what_generate_produces(folder):
    assistant = Assistant.from_pretrained(folder)
    ct = get_testdata_file("CT_small.dcm")
    answer = assistant.ask("What modality is this image?", ct, max_new_tokens=6)
    ids, pixels = assistant.prepare("What modality is this image?", ct)
    out = GMAIVL.from_pretrained(folder).generate(ids, pixel_values=pixels, max_new_tokens=6,
                                                  eos_token_id=assistant.eos_token_ids, repetition_penalty=1.12,
                                                  no_repeat_ngram_size=5)
    assert answer == assistant.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_tokenizer_model_mismatch_is_refused(folder):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = GMAIVLConfig.from_pretrained(folder).replace(image_token_index=7)
    with pytest.raises(ValueError, match="image_token_index is 7"):
        Assistant(None, tokenizer, config)
