"""The slim model against transformers' Llava: logits, greedy generation, checkpoint layouts, save/load, errors.
Tolerances (fp32): logits 1e-4 absolute."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from hf_reference import IMAGE_TOKEN, make_hf_llava
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlavaForConditionalGeneration

from gmaivl_rt import GMAIVL, GMAIVLConfig
from gmaivl_rt.model.checkpoint import CheckpointError

ATOL_FP32 = 1e-4
N_IMG = 4  # (28 / 14)^2 image tokens per image


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_llava")
    make_hf_llava(path)
    return path


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return LlavaForConditionalGeneration.from_pretrained(hf_dir).eval()


def _batch():
    """Two prompts of different lengths with one image each, left-padded."""
    torch.manual_seed(1)
    a = torch.randint(0, 100, (3,)).tolist() + [IMAGE_TOKEN] * N_IMG + torch.randint(0, 100, (5,)).tolist()
    b = [IMAGE_TOKEN] * N_IMG + torch.randint(0, 100, (2,)).tolist()
    width = max(len(a), len(b))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, seq in enumerate((a, b)):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    return ids, mask, torch.randn(2, 3, 28, 28)


def _state(path):
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _write_variant(src, dst, state, config=None):
    dst.mkdir()
    save_file(state, str(dst / "model.safetensors"))
    config = config or json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _assert_logits_match(ours_dir, hf_model):
    ours = GMAIVL.from_pretrained(ours_dir)
    ids, _, pixels = _batch()
    ids = ids[:1, -(N_IMG + 8):]  # unpadded first prompt
    with torch.no_grad():
        expected = hf_model(input_ids=ids, pixel_values=pixels[:1]).logits
        got = ours(ids, pixel_values=pixels[:1]).logits
    torch.testing.assert_close(got, expected, atol=ATOL_FP32, rtol=0)
    return ours


def test_logits_match_transformers(hf_dir, hf_model):
    _assert_logits_match(hf_dir, hf_model)


def test_greedy_generation_matches_transformers_batched_left_padded(hf_dir, hf_model):
    ours = GMAIVL.from_pretrained(hf_dir)
    ids, mask, pixels = _batch()
    expected = hf_model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=20,
                                 min_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = ours.generate(ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=20, eos_token_id=[],
                        pad_token_id=0)
    assert got.shape == (2, ids.shape[1] + 20)
    assert torch.equal(got, expected)


def test_transformers_4x_layout(hf_dir, hf_model, tmp_path):
    state = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in _state(hf_dir).items()}
    assert any(k.startswith("vision_tower.vision_model.") for k in state)
    ours = _assert_logits_match(_write_variant(hf_dir, tmp_path / "v4", state), hf_model)
    ids, mask, pixels = _batch()
    expected = hf_model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=20,
                                 min_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=20,
                                     eos_token_id=[], pad_token_id=0), expected)


def _other_major_in_memory_names(state: dict) -> dict:
    """transformers 5.x in-memory Llava names <-> 4.x (>= 4.52) ones: 4.x wraps the CLIP tower in a CLIPVisionModel
    (`model.vision_tower.vision_model.*`), 5.x holds the transformer itself (`model.vision_tower.*`); the language
    model (`model.language_model.*`), projector and `lm_head.*` are named alike."""
    if any(k.startswith("model.vision_tower.vision_model.") for k in state):
        return {k.replace("model.vision_tower.vision_model.", "model.vision_tower.", 1): v for k, v in state.items()}
    return {k.replace("model.vision_tower.", "model.vision_tower.vision_model.", 1): v for k, v in state.items()}


def test_transformers_in_memory_names_of_both_major_versions(hf_dir, hf_model, tmp_path):
    """A state dict taken from a live transformers Llava (`model.state_dict()`, not what save_pretrained writes)
    loads with the installed version's names and renamed to the other major version's, both giving transformers'
    logits and greedy tokens.
    Mutants: dropping ("model.language_model.", ...), ("model.vision_tower.", ...) or
    ("model.vision_tower.vision_model.", ...) from checkpoint._PREFIXES each fail here (unexpected keys)."""
    import transformers

    installed = hf_model.state_dict()
    major = int(transformers.__version__.split(".")[0])
    assert any(k.startswith("model.language_model.") for k in installed) and "lm_head.weight" in installed
    # the layout this test names as 5.x is the installed 5.x one (README: "5.x Llava (on disk and in-memory names)")
    assert major != 5 or not any(".vision_model." in k for k in installed), transformers.__version__
    other = _other_major_in_memory_names(installed)
    assert other.keys().isdisjoint(k for k in installed if "vision_tower" in k)
    ids, mask, pixels = _batch()
    expected = hf_model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=8,
                                 min_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    for name, state in (("installed", installed), ("other", other)):
        state = {k: v.contiguous() for k, v in state.items()}
        ours = _assert_logits_match(_write_variant(hf_dir, tmp_path / name, state), hf_model)
        got = ours.generate(ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=8, eos_token_id=[],
                            pad_token_id=0)
        assert torch.equal(got, expected), name


def fuse_wqkv(q, k, v, num_heads, num_kv_heads):
    """InternLM2's rule: rows grouped per KV head as [num_kv_heads, q_per_kv + 2, head_dim]; in each group the
    q_per_kv query heads come first, then that group's key head, then its value head."""
    head_dim = q.shape[0] // num_heads
    q_per_kv = num_heads // num_kv_heads
    q = q.reshape(num_kv_heads, q_per_kv, head_dim, -1)
    k = k.reshape(num_kv_heads, 1, head_dim, -1)
    v = v.reshape(num_kv_heads, 1, head_dim, -1)
    return torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])


def test_internlm2_layout(hf_dir, hf_model, tmp_path):
    hf_state = _state(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    tc = config["text_config"]
    heads, kv_heads = tc["num_attention_heads"], tc["num_key_value_heads"]
    state = {k: v for k, v in hf_state.items() if not k.startswith("language_model.")}
    lm = "language_model.model."
    state["language_model.model.tok_embeddings.weight"] = hf_state[lm + "embed_tokens.weight"]
    state["language_model.model.norm.weight"] = hf_state[lm + "norm.weight"]
    state["language_model.output.weight"] = hf_state["language_model.lm_head.weight"]
    for i in range(tc["num_hidden_layers"]):
        src, dst = f"{lm}layers.{i}.", f"{lm}layers.{i}."
        state[dst + "attention.wqkv.weight"] = fuse_wqkv(hf_state[src + "self_attn.q_proj.weight"],
                                                         hf_state[src + "self_attn.k_proj.weight"],
                                                         hf_state[src + "self_attn.v_proj.weight"], heads, kv_heads)
        state[dst + "attention.wo.weight"] = hf_state[src + "self_attn.o_proj.weight"]
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            state[dst + f"feed_forward.{ours}.weight"] = hf_state[src + f"mlp.{theirs}.weight"]
        state[dst + "attention_norm.weight"] = hf_state[src + "input_layernorm.weight"]
        state[dst + "ffn_norm.weight"] = hf_state[src + "post_attention_layernorm.weight"]
    config["text_config"] = {
        "model_type": "internlm2", "hidden_size": tc["hidden_size"], "num_hidden_layers": tc["num_hidden_layers"],
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": tc["intermediate_size"],
        "vocab_size": tc["vocab_size"], "rms_norm_eps": tc["rms_norm_eps"], "rope_theta": 10000.0,
        "max_position_embeddings": tc["max_position_embeddings"], "bias": False, "tie_word_embeddings": False,
    }
    ours = _assert_logits_match(_write_variant(hf_dir, tmp_path / "internlm2", state, config), hf_model)
    assert ours.config.text.arch == "internlm2"
    ids, mask, pixels = _batch()
    expected = hf_model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=20,
                                 min_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=20,
                                     eos_token_id=[], pad_token_id=0), expected)


def test_save_pretrained_loads_in_transformers(hf_dir, hf_model, tmp_path):
    """What we save, transformers loads with every weight accounted for (no parameter left to its initialiser, none
    ignored) and the same logits. Mutant: `to_hf_config` writing `mlp_bias: True` (transformers then builds MLP
    biases our files lack and initialises them to zero: same logits, so only the loading report notices)."""
    ours = GMAIVL.from_pretrained(hf_dir)
    ours.save_pretrained(tmp_path / "saved")
    reloaded, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "saved", output_loading_info=True)
    assert {k: list(v) for k, v in info.items() if v} == {}, "transformers reports weights missing or unused"
    reloaded.eval()
    ids, _, pixels = _batch()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, pixel_values=pixels).logits,
                                   hf_model(input_ids=ids, pixel_values=pixels).logits, atol=ATOL_FP32, rtol=0)


def test_sharded_save_roundtrip(hf_dir, tmp_path):
    ours = GMAIVL.from_pretrained(hf_dir)
    ours.save_pretrained(tmp_path / "sharded", max_shard_bytes=40_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    again = GMAIVL.from_pretrained(tmp_path / "sharded")
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    ours.save_pretrained(tmp_path / "sharded")  # re-save as one file: the stale shards must go
    ours.save_pretrained(tmp_path / "sharded", max_shard_bytes=2**40)
    assert sorted(p.name for p in (tmp_path / "sharded").glob("model*")) == ["model.safetensors"]


def test_loads_into_requested_dtype(hf_dir):
    ours = GMAIVL.from_pretrained(hf_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in ours.parameters())


def test_packed_forward_and_loss_match_separate_sequences(hf_dir, hf_model):
    """Two sequences packed with cu_seqlens give the logits and mean loss of running them separately."""
    ours = GMAIVL.from_pretrained(hf_dir)
    ids, mask, pixels = _batch()
    seqs = [ids[r][mask[r].bool()] for r in range(2)]
    packed = torch.cat(seqs)[None]
    labels = packed.clone()
    labels[packed == IMAGE_TOKEN] = -100
    cu = torch.tensor([0, len(seqs[0]), len(seqs[0]) + len(seqs[1])], dtype=torch.int32)
    out = ours(packed, pixel_values=pixels, labels=labels, cu_seqlens=cu, return_logits=True)
    with torch.no_grad():
        hf_logits = [hf_model(input_ids=s[None], pixel_values=pixels[r:r + 1]).logits[0] for r, s in enumerate(seqs)]
    torch.testing.assert_close(out.logits[0], torch.cat(hf_logits), atol=ATOL_FP32, rtol=0)
    # transformers' loss over the two sequences (no shift across the boundary), token-weighted mean.
    losses, counts = [], []
    for r, s in enumerate(seqs):
        lab = s.clone()
        lab[s == IMAGE_TOKEN] = -100
        n = int((lab[1:] != -100).sum())
        losses.append(hf_model(input_ids=s[None], pixel_values=pixels[r:r + 1], labels=lab[None]).loss * n)
        counts.append(n)
    torch.testing.assert_close(out.loss, sum(losses) / sum(counts), atol=ATOL_FP32, rtol=0)


# ------------------------------------------------------------------------------------------- broken checkpoints
def test_missing_key_is_listed(hf_dir, tmp_path):
    state = _state(hf_dir)
    del state["multi_modal_projector.linear_2.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys \(1\)[\s\S]*multi_modal_projector.linear_2.bias"):
        GMAIVL.from_pretrained(_write_variant(hf_dir, tmp_path / "m", state))


def test_unexpected_key_is_listed(hf_dir, tmp_path):
    state = _state(hf_dir)
    state["vision_tower.extra_head.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\)[\s\S]*vision_tower.extra_head.weight"):
        GMAIVL.from_pretrained(_write_variant(hf_dir, tmp_path / "u", state))


def test_wrong_shape_is_listed(hf_dir, tmp_path):
    state = _state(hf_dir)
    state["multi_modal_projector.linear_1.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"shape mismatches[\s\S]*linear_1.weight: checkpoint \(3, 3\)") as err:
        GMAIVL.from_pretrained(_write_variant(hf_dir, tmp_path / "s", state))
    assert str(err.value).count("linear_1.weight") == 1 and "missing keys" not in str(err.value)  # listed once


def test_truncated_safetensors(hf_dir, tmp_path):
    broken = tmp_path / "t"
    shutil.copytree(hf_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors.*truncated"):
        GMAIVL.from_pretrained(broken)
    (broken / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="too short"):
        GMAIVL.from_pretrained(broken)


def test_config_disagreeing_with_weights(hf_dir, tmp_path):
    broken = tmp_path / "c"
    shutil.copytree(hf_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 80
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json disagree with the weights[\s\S]*mlp.gate_proj"):
        GMAIVL.from_pretrained(broken)


def test_pickle_only_folder_is_refused(hf_dir, tmp_path):
    folder = tmp_path / "p"
    folder.mkdir()
    shutil.copy(hf_dir / "config.json", folder)
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle files, which are never loaded"):
        GMAIVL.from_pretrained(folder)


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        GMAIVL.from_pretrained(tmp_path)


def test_image_token_count_must_match_features(hf_dir):
    ours = GMAIVL.from_pretrained(hf_dir)
    ids = torch.tensor([[1, 2] + [IMAGE_TOKEN] * (N_IMG - 1) + [3]])
    with pytest.raises(ValueError, match="3 image tokens but pixel_values give 4 image features"):
        ours(ids, pixel_values=torch.randn(1, 3, 28, 28))
    with pytest.raises(ValueError, match="takes 28x28 images"):
        ours(torch.tensor([[IMAGE_TOKEN] * 9]), pixel_values=torch.randn(1, 3, 42, 42))


def test_presets_are_valid():
    """The 7B preset's vision tower is CLIP ViT-L/14-336, which transformers' LlavaConfig carries as its default
    vision config: every field is compared with it (mutants: the preset's vision intermediate size or eps off).
    The text side (InternLM2.5-7B, remote code, not in transformers) is checked for its public dimensions."""
    from transformers import LlavaConfig

    seven_b = GMAIVLConfig.preset("gmai-vl-7b")
    clip = LlavaConfig().vision_config
    v = seven_b.vision
    assert (v.hidden_size, v.num_layers, v.num_heads, v.intermediate_size, v.image_size, v.patch_size, v.hidden_act,
            v.layer_norm_eps) == (clip.hidden_size, clip.num_hidden_layers, clip.num_attention_heads,
                                  clip.intermediate_size, clip.image_size, clip.patch_size, clip.hidden_act,
                                  clip.layer_norm_eps)
    # InternLM2.5-7B public dimensions
    assert (seven_b.text.hidden_size, seven_b.text.num_layers, seven_b.text.num_kv_heads) == (4096, 32, 8)
    assert seven_b.num_image_tokens == 576
    with pytest.raises(ValueError, match="unknown preset"):
        GMAIVLConfig.preset("huge")


@pytest.mark.parametrize("name", ["tiny", "compact"])
def test_preset_models_run_as_transformers_runs_them(name, tmp_path):
    """A preset's model, saved, loads in transformers and gives the same logits (it used to assert only "has
    parameters"). Mutants: to_hf_config writing `vision_feature_layer` -1 or `rms_norm_eps` 1e-5, or dropping
    `rope_theta` (transformers' default 10000 is the presets' own, so only eps and the layer show here)."""
    config = GMAIVLConfig.preset(name)
    torch.manual_seed(0)
    ours = GMAIVL(config).eval()
    with torch.no_grad():  # away from the init (norms at 1, biases at 0) so every parameter shows in the logits
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours.save_pretrained(tmp_path)
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[5, 6] + [config.image_token_index] * config.num_image_tokens + [7, 8, 9]])
    pixels = torch.randn(1, 3, config.vision.image_size, config.vision.image_size)
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, pixel_values=pixels).logits
    assert want.std() > 100 * ATOL_FP32
    torch.testing.assert_close(got, want, atol=ATOL_FP32, rtol=0)


def test_cache_continues_a_prompt_in_chunks(hf_dir):
    """A prompt fed as prefill + a multi-token chunk + a one-token step through one KV cache gives the logits of a
    single forward over the whole prompt (prefill, append-after-prefix and decode attention paths)."""
    ours = GMAIVL.from_pretrained(hf_dir)
    ids, _, pixels = _batch()
    ids = ids[:1, -(N_IMG + 8):]  # 3 text, 4 image, 5 text tokens
    with torch.no_grad():
        full = ours(ids, pixel_values=pixels[:1]).logits
        cache = ours.new_cache(1, ids.shape[1])
        first = ours(ids[:, :8], pixel_values=pixels[:1], past_key_values=cache).logits
        middle = ours(ids[:, 8:11], past_key_values=cache).logits
        last = ours(ids[:, 11:], past_key_values=cache).logits
    assert cache.lengths == [ids.shape[1]]
    torch.testing.assert_close(torch.cat([first, middle, last], dim=1), full, atol=ATOL_FP32, rtol=0)
