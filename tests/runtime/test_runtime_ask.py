"""The ask-a-question path: a real DICOM from pydicom's test data through reading, preprocessing, template,
generation and decoding, checked piece by piece against the components it must agree with."""

import pytest
import torch
from pydicom.data import get_testdata_file

import gmaivl_rt
from gmaivl_rt import GMAIVL
from gmaivl_rt.model.chat import IMAGE_TOKEN, build_prompt
from gmaivl_rt.model.preprocess import preprocess_image
from gmaivl_rt.cli import main
from gmaivl_rt.medical.reader import read_medical_image
from gmaivl_rt.runtime.generation_config import GENERATION_CONFIG, resolve_generation_config

TEXTS = ["<image>\nWhat modality is this image?", "This is a CT scan of the chest.", "Which plane is shown?",
         "An axial slice.", "Describe the image.", "A magnetic resonance image of the head."] * 20
QUESTION = "What modality is this image?"


@pytest.fixture(scope="module")
def folder(tiny_model_folder):
    return tiny_model_folder(TEXTS, "ask")


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
    # the folder has no generation_config.json: plain greedy, no penalties
    out = GMAIVL.from_pretrained(folder).generate(ids, pixel_values=pixels, max_new_tokens=6,
                                                  eos_token_id=backend.eos_token_ids)
    assert answer == backend.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_cli_ask_says_what_the_api_says(folder, capsys):
    ct = get_testdata_file("CT_small.dcm")
    expected = gmaivl_rt.load(folder).ask(QUESTION, ct, max_new_tokens=5)
    assert main(["ask", str(folder), "--image", ct, "--question", QUESTION, "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() == expected


def test_ask_through_the_onnx_backend_gives_the_same_answer(folder, tmp_path):
    from gmaivl_rt.export.onnx_export import export_onnx

    export_onnx(folder, tmp_path / "onnx")
    # the export carries the folder's decoding defaults (here none: plain greedy, written out)
    assert (tmp_path / "onnx" / GENERATION_CONFIG).is_file()
    assert resolve_generation_config("auto", tmp_path / "onnx").options == gmaivl_rt.load(folder).generation_defaults
    ct = get_testdata_file("CT_small.dcm")
    expected = gmaivl_rt.load(folder).ask(QUESTION, ct, max_new_tokens=8)
    assert gmaivl_rt.load(tmp_path / "onnx", backend="onnx").ask(QUESTION, ct, max_new_tokens=8) == expected


def test_cli_ask_sampling_flags_reach_generation(folder, capsys):
    """Every sampling flag of `gmaivl-rt ask` is passed on: --do-sample --top-k 1 is greedy whatever the
    temperature; a seeded hot sample is reproducible and equals the API's with the same seeded generator; the
    penalties change what the API says exactly as the flags do."""
    ct = get_testdata_file("CT_small.dcm")
    api = gmaivl_rt.load(folder)

    def cli(*flags):
        assert main(["ask", str(folder), "--image", ct, "--question", QUESTION, "--max-new-tokens", "6", *flags]) == 0
        return capsys.readouterr().out.strip()

    greedy = api.ask(QUESTION, ct, max_new_tokens=6)
    assert cli("--do-sample", "--top-k", "1", "--temperature", "5") == greedy
    hot = ["--do-sample", "--temperature", "3", "--top-p", "1.0", "--repetition-penalty", "1.0",
           "--no-repeat-ngram-size", "0"]
    sampled = api.ask(QUESTION, ct, max_new_tokens=6, do_sample=True, temperature=3.0, top_p=1.0,
                      repetition_penalty=1.0, no_repeat_ngram_size=0, generator=torch.Generator().manual_seed(7))
    assert cli(*hot, "--seed", "7") == cli(*hot, "--seed", "7") == sampled
    plain = api.ask(QUESTION, ct, max_new_tokens=6, repetition_penalty=1.0, no_repeat_ngram_size=0)
    assert cli("--repetition-penalty", "1.0", "--no-repeat-ngram-size", "0") == plain


def test_onnx_backend_on_a_model_folder_says_to_export_first(folder):
    with pytest.raises(FileNotFoundError, match="is a model folder, not an ONNX export.*gmaivl-rt export onnx"):
        gmaivl_rt.load(folder, backend="onnx")


def test_ask_takes_seed_and_stop_as_the_engine_does(folder):
    """`ask` accepts the options `Engine.ask` accepts, with the same meaning: seed (the same seed gives the same
    sampled answer, equal to a generator seeded alike and to the engine's) and stop (the answer ends before the
    first stop string, as the engine's does); a bad seed or stop is refused by both alike."""
    from gmaivl_rt import Engine, InputError

    backend = gmaivl_rt.load(folder)
    ct = get_testdata_file("CT_small.dcm")
    hot = {"max_new_tokens": 8, "do_sample": True, "temperature": 3.0, "top_p": 1.0, "repetition_penalty": 1.0,
           "no_repeat_ngram_size": 0}
    sampled = backend.ask(QUESTION, ct, seed=11, **hot)
    assert sampled == backend.ask(QUESTION, ct, seed=11, **hot)
    assert sampled == backend.ask(QUESTION, ct, generator=torch.Generator().manual_seed(11), **hot)
    assert sampled != backend.ask(QUESTION, ct, seed=12, **hot)
    plain = {"max_new_tokens": 10, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "eos_token_id": []}
    answer = backend.ask(QUESTION, ct, **plain)
    assert len(answer) >= 4
    cut = answer[len(answer) // 2:len(answer) // 2 + 2]
    stopped = backend.ask(QUESTION, ct, stop=cut, **plain)
    assert stopped == answer[:answer.index(cut)].rstrip()
    with Engine(folder, max_batch_size=2) as engine:
        assert engine.ask(QUESTION, ct, seed=11, **hot) == sampled
        assert engine.ask(QUESTION, ct, stop=[cut], **plain) == stopped
        for bad in ({"seed": "11"}, {"stop": [""]}):
            with pytest.raises(InputError, match=next(iter(bad))):
                engine.ask(QUESTION, ct, **bad, **plain)
            with pytest.raises(InputError, match=next(iter(bad))):
                backend.ask(QUESTION, ct, **bad, **plain)


def test_min_p_reaches_every_path_alike(folder):
    """min_p (vLLM's field) is an option of `ask` and of the engine alike: 1.0 keeps only the most likely token
    (greedy, whatever the seed), a middling value samples as the engine samples with the same seed."""
    from gmaivl_rt import Engine

    backend = gmaivl_rt.load(folder)
    greedy = backend.ask(QUESTION, None, max_new_tokens=12, do_sample=False)
    assert backend.ask(QUESTION, None, max_new_tokens=12, do_sample=True, seed=3, min_p=1.0) == greedy
    sampled = backend.ask(QUESTION, None, max_new_tokens=12, do_sample=True, seed=3, min_p=0.05)
    with Engine(folder) as engine:
        assert engine.ask(QUESTION, None, max_new_tokens=12, do_sample=True, seed=3, min_p=0.05) == sampled
