"""Load-time checks: a model folder that cannot serve fails at `load()` with ModelError (CheckpointError) naming
the folder / file / tensor: missing or broken tokenizer, non-finite weights, bytes changed in place (caught by the
SHA-256 save_pretrained writes, computed here independently with hashlib); files without a digest still load."""
import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

import gmaivl_rt
from gmaivl_rt import GMAIVL, GMAIVLConfig, ModelError
from gmaivl_rt.model.checkpoint import DIGEST_KEY, CheckpointError, verify_safetensors
from gmaivl_rt.cli import main

TEXTS = ["<image>\nWhat modality is this image?", "This is a CT scan of the chest."] * 20


@pytest.fixture(scope="module")
def folder(tiny_model_folder):
    return tiny_model_folder(TEXTS, "served")


def header_of(file):
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), 8 + n, data


def test_saved_files_carry_the_sha256_of_their_tensor_bytes(folder):
    header, start, data = header_of(folder / "model.safetensors")
    assert header["__metadata__"][DIGEST_KEY] == hashlib.sha256(data[start:]).hexdigest()
    assert verify_safetensors(folder / "model.safetensors")["__metadata__"][DIGEST_KEY]
    # the file is still an ordinary safetensors file
    assert set(load_file(folder / "model.safetensors")) == {n for n, _ in header.items() if n != "__metadata__"}


def test_sharded_save_has_a_digest_per_shard(tmp_path):
    torch.manual_seed(0)
    GMAIVL(GMAIVLConfig.preset("tiny")).save_pretrained(tmp_path, max_shard_bytes=200_000)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    for shard in shards:
        header, start, data = header_of(shard)
        assert header["__metadata__"][DIGEST_KEY] == hashlib.sha256(data[start:]).hexdigest()
    victim = shards[-1]
    raw = bytearray(victim.read_bytes())
    raw[-3] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="SHA-256") as e:
        GMAIVL.from_pretrained(tmp_path)
    assert victim.name in str(e.value)


def test_bytes_overwritten_in_place_are_caught(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    header, start, data = header_of(file)
    size = file.stat().st_size
    raw = bytearray(data)
    raw[start + 100:start + 132] = bytes(32)  # same size, different weights
    file.write_bytes(bytes(raw))
    assert file.stat().st_size == size
    with pytest.raises(ModelError, match="SHA-256"):
        gmaivl_rt.load(tmp_path / "m")
    code = main(["ask", str(tmp_path / "m"), "--question", "q"])
    assert code == 2


def test_files_without_a_digest_load(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    save_file(load_file(file), str(file), metadata={"format": "pt"})
    assert DIGEST_KEY not in header_of(file)[0]["__metadata__"]
    reference = GMAIVL.from_pretrained(folder)
    loaded = GMAIVL.from_pretrained(tmp_path / "m")
    for (name, a), (_, b) in zip(reference.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("with_digest", [True, False])
def test_non_finite_weights_are_named(folder, tmp_path, bad, with_digest):
    model = GMAIVL.from_pretrained(folder)
    with torch.no_grad():
        model.language_model.layers[1].mlp.down_proj.weight[3, 7] = bad
    model.save_pretrained(tmp_path)
    shutil.copy(folder / "tokenizer.json", tmp_path)
    file = tmp_path / "model.safetensors"
    if not with_digest:
        save_file(load_file(file), str(file), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        gmaivl_rt.load(tmp_path)
    message = str(e.value)
    assert "language_model.model.layers.1.mlp.down_proj.weight" in message and "non-finite" in message
    assert len(message) <= 300
    with pytest.raises(CheckpointError, match="down_proj"):
        verify_safetensors(file)


def test_missing_or_broken_tokenizer(folder, tmp_path):
    # tokenizer_config.json without tokenizer.json: refused at load, naming the folder and the files
    shutil.copytree(folder, tmp_path / "partial")
    (tmp_path / "partial" / "tokenizer.json").unlink()
    with pytest.raises(ModelError) as e:
        gmaivl_rt.load(tmp_path / "partial")
    message = str(e.value)
    # one short line beside the folder's name (its length is the test machine's; pytest-xdist's is longer)
    folder_name = str(tmp_path / "partial")
    assert folder_name in message and "tokenizer.json" in message and len(message) - len(folder_name) <= 250
    # a tokenizer that does not fit the model (another <image> id)
    shutil.copytree(folder, tmp_path / "mismatch")
    config = json.loads((tmp_path / "mismatch" / "config.json").read_text())
    config["image_token_index"] = 3
    (tmp_path / "mismatch" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="image_token_index"):
        gmaivl_rt.load(tmp_path / "mismatch")
    # no tokenizer at all: generate() on ids works, ask names what is missing
    shutil.copytree(folder, tmp_path / "bare")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "bare" / name).unlink()
    bare = gmaivl_rt.load(tmp_path / "bare")
    prompt = torch.tensor([[8, 9, 10]])
    want = LlavaForConditionalGeneration.from_pretrained(tmp_path / "bare").eval().generate(
        input_ids=prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(bare.generate(prompt, max_new_tokens=2, eos_token_id=[]), want)  # was: its shape only
    with pytest.raises(ModelError) as e:
        bare.ask("What modality?", max_new_tokens=2)
    assert "tokenizer.json" in str(e.value) and str(tmp_path / "bare") in str(e.value)
    assert main(["ask", str(tmp_path / "bare"), "--question", "q"]) == 2
