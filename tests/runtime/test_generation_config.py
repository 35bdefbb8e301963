"""Decoding defaults from the model folder's generation_config.json: one file, read by transformers'
`GenerationConfig.from_pretrained` (the independent reference) and by us alike, written by the trainer and carried by
the export, and resolved once (`resolve_generation_config`) for `ask`, the engine, the server and `eval`."""
import json
import shutil

import pytest
from pydicom.data import get_testdata_file

import gmaivl_rt
from gmaivl_rt.cli import main
from gmaivl_rt.errors import ModelError
from gmaivl_rt.eval.prompts import DECODING
from gmaivl_rt.runtime.generation_config import (DECODING_FIELDS, GENERATION_CONFIG, PLAIN_GREEDY,
                                                 RECOMMENDED_GENERATION, resolve_generation_config,
                                                 write_generation_config)

transformers = pytest.importorskip("transformers")

TEXTS = ["<image>\nWhat modality is this image?", "This is a CT scan of the chest.", "Which plane is shown?",
         "An axial slice.", "Describe the image.", "A magnetic resonance image of the head."] * 20
QUESTION = "What modality is this image?"
CT = get_testdata_file("CT_small.dcm")
LONG = 24  # enough tokens for a random tiny model to repeat itself, so the penalties change its answer


@pytest.fixture(scope="module")
def plain_folder(tiny_model_folder):
    """A model folder without generation_config.json."""
    return tiny_model_folder(TEXTS, "no_generation_config")


@pytest.fixture(scope="module")
def recommended_folder(plain_folder, tmp_path_factory):
    """The same weights with GMAI-VL's recommended settings written into generation_config.json."""
    folder = tmp_path_factory.mktemp("recommended") / "model"
    shutil.copytree(plain_folder, folder)
    write_generation_config(folder)
    return folder


def _transformers_fields(folder) -> dict:
    config = transformers.GenerationConfig.from_pretrained(folder)
    return {k: getattr(config, k) for k in DECODING_FIELDS}


def test_what_we_write_transformers_reads_and_what_transformers_writes_we_read(tmp_path):
    """Round trips through transformers' GenerationConfig, both ways. Mutants: a field written under another name
    (e.g. `repetition_penalty` -> `penalty`), the reader taking a field from PLAIN_GREEDY over the file's."""
    write_generation_config(tmp_path / "ours", token_ids={"eos_token_id": [2, 7], "pad_token_id": 0,
                                                          "bos_token_id": None})
    assert _transformers_fields(tmp_path / "ours") == RECOMMENDED_GENERATION
    hf = transformers.GenerationConfig.from_pretrained(tmp_path / "ours")
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == ([2, 7], 0, None)
    assert resolve_generation_config("auto", tmp_path / "ours").options == RECOMMENDED_GENERATION

    theirs = transformers.GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20,
                                           repetition_penalty=1.05, no_repeat_ngram_size=3, max_new_tokens=40)
    theirs.save_pretrained(tmp_path / "theirs")
    resolved = resolve_generation_config(tmp_path / "theirs" / GENERATION_CONFIG)
    assert resolved.options == _transformers_fields(tmp_path / "theirs")
    assert resolved.origin == str((tmp_path / "theirs" / GENERATION_CONFIG).resolve())
    # a folder path is read as vLLM's --generation-config DIR
    assert resolve_generation_config(tmp_path / "theirs").options == resolved.options
    # fields the file leaves out keep plain greedy's values; token ids alone change nothing
    transformers.GenerationConfig(eos_token_id=3).save_pretrained(tmp_path / "ids_only")
    assert resolve_generation_config("auto", tmp_path / "ids_only").options == PLAIN_GREEDY


def test_auto_none_and_missing_file(plain_folder, recommended_folder):
    assert resolve_generation_config("auto", plain_folder).options == PLAIN_GREEDY
    assert resolve_generation_config("none", recommended_folder).options == PLAIN_GREEDY
    assert resolve_generation_config("auto", recommended_folder).options == RECOMMENDED_GENERATION
    with pytest.raises(FileNotFoundError, match="generation config .* does not exist"):
        resolve_generation_config(plain_folder / "nowhere.json")


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not a readable JSON file"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"temperature": "hot"}', "temperature must be a number"),
    ('{"top_p": 1.5}', r"top_p must be in \(0, 1\]"),
    ('{"max_new_tokens": 0}', "max_new_tokens must be an int >= 1"),
    ('{"do_sample": "yes"}', "do_sample must be a bool"),
])
def test_a_bad_file_is_refused_naming_it_and_the_field(tmp_path, content, problem, capsys, plain_folder):
    path = tmp_path / GENERATION_CONFIG
    path.write_text(content)
    with pytest.raises(ModelError, match=f"{GENERATION_CONFIG}: {problem}"):
        resolve_generation_config(path)
    # at the command line: exit 2 and the same message, before any image is read
    assert main(["ask", str(plain_folder), "--question", "q", "--generation-config", str(path)]) == 2
    assert problem.replace("\\", "") in capsys.readouterr().err


def test_ask_engine_and_cli_decode_with_the_folders_defaults(plain_folder, recommended_folder, capsys):
    """The recommended file makes `ask` (API and CLI) and the engine decode with the penalties, exactly as
    passing them by hand does on the plain folder; `none` gives plain greedy back; a flag wins over the file.
    Mutants: build_request merging PLAIN_GREEDY instead of the backend's defaults; load() ignoring its
    generation_config; the CLI's flags defaulting to fixed values again."""
    from gmaivl_rt import Engine

    plain = gmaivl_rt.load(plain_folder)
    greedy = plain.ask(QUESTION, CT, max_new_tokens=LONG)
    penalised = plain.ask(QUESTION, CT, **{**RECOMMENDED_GENERATION, "max_new_tokens": LONG})
    assert greedy != penalised, "the penalties should change a random model's 24-token answer"

    model = gmaivl_rt.load(recommended_folder)
    assert model.generation_defaults == RECOMMENDED_GENERATION
    assert model.ask(QUESTION, CT, max_new_tokens=LONG) == penalised
    assert gmaivl_rt.load(recommended_folder, generation_config="none").ask(QUESTION, CT,
                                                                            max_new_tokens=LONG) == greedy
    with Engine(recommended_folder, max_batch_size=2) as engine:
        assert engine.ask(QUESTION, CT, max_new_tokens=LONG) == penalised
    with Engine(recommended_folder, max_batch_size=2, generation_config="none") as engine:
        assert engine.ask(QUESTION, CT, max_new_tokens=LONG) == greedy

    def cli(*flags):
        assert main(["ask", str(recommended_folder), "--image", CT, "--question", QUESTION, "--max-new-tokens",
                     str(LONG), *flags]) == 0
        return capsys.readouterr().out.strip()

    assert cli() == penalised
    assert cli("--generation-config", "none") == greedy
    assert cli("--repetition-penalty", "1.0", "--no-repeat-ngram-size", "0") == greedy


def test_eval_records_the_decoding_it_used(recommended_folder, colour_bench_file, tmp_path):
    """run.json holds every decoding option the answers were made with (the folder's defaults with the protocol's
    decoding over them) and where the defaults came from; --resume under other decoding is refused.
    Mutants: run.json recording only the protocol's fields; the resume check dropped."""
    from gmaivl_rt.eval import evaluate

    custom = tmp_path / "custom.json"
    custom.write_text(json.dumps({"temperature": 0.5, "top_p": 0.7, "top_k": 3, "max_new_tokens": 50}))
    out = tmp_path / "run"
    assert main(["eval", str(recommended_folder), "--data", str(colour_bench_file), "--out", str(out), "--limit",
                 "2", "--no-progress", "--generation-config", str(custom)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["decoding"] == {**PLAIN_GREEDY, "temperature": 0.5, "top_p": 0.7, "top_k": 3, **DECODING["mcq"]}
    assert run["generation_config"] == str(custom.resolve())
    with pytest.raises(gmaivl_rt.InputError, match="--resume: the decoding differs"):
        evaluate(recommended_folder, colour_bench_file, out, limit=2, resume=True, progress=False)
    api = evaluate(recommended_folder, colour_bench_file, tmp_path / "api", limit=2, progress=False)
    recorded = json.loads((tmp_path / "api" / "run.json").read_text())
    assert recorded["decoding"] == {**RECOMMENDED_GENERATION, **DECODING["mcq"]}
    assert recorded["generation_config"] == str((recommended_folder / GENERATION_CONFIG).resolve())
    assert api["predicted"] == 2  # one per split (dev, test): splits are reported separately


def test_trainer_writes_the_recommended_settings(tmp_path):
    """A trained folder's generation_config.json, read by transformers: GMAI-VL's recommended decoding and the
    model's own token ids. Mutant: the trainer not writing the file (transformers then finds none)."""
    from train_fixtures import make_init_model, make_training_setup

    from gmaivl_rt.train.recipe import train

    data, tokenizer_dir = make_training_setup(tmp_path, records_per_source=(4, 4))
    make_init_model(tmp_path / "init", tokenizer_dir)
    train(1, data, tmp_path / "s1", preset="tiny", init=tmp_path / "init", tokenizer=tokenizer_dir,
          overrides={"batch": {"global_batch_size": 2}, "schedule": {"total_steps": 1, "warmup_ratio": 0.0}},
          progress=False)
    assert _transformers_fields(tmp_path / "s1") == RECOMMENDED_GENERATION
    model = gmaivl_rt.load(tmp_path / "s1")
    hf = transformers.GenerationConfig.from_pretrained(tmp_path / "s1")
    assert hf.eos_token_id == model.config.text.eos_token_id
    assert model.generation_defaults == RECOMMENDED_GENERATION


def test_export_decodes_as_its_model_folder(recommended_folder, tmp_path):
    """The ONNX export carries the folder's generation_config.json, so the onnx backend's default answer equals
    the torch backend's. Mutant: the export writing plain greedy whatever the folder holds."""
    pytest.importorskip("onnxruntime")
    from gmaivl_rt.export.onnx_export import export_onnx

    export_onnx(recommended_folder, tmp_path / "onnx")
    assert _transformers_fields(tmp_path / "onnx") == RECOMMENDED_GENERATION
    onnx = gmaivl_rt.load(tmp_path / "onnx", backend="onnx")
    assert onnx.generation_defaults == RECOMMENDED_GENERATION
    assert onnx.ask(QUESTION, CT, max_new_tokens=LONG) == gmaivl_rt.load(recommended_folder).ask(
        QUESTION, CT, max_new_tokens=LONG)
