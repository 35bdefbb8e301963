"""GMAIVLConfig.from_hf_config's fallbacks and bounds against transformers' own config classes (fast: no model):
survivors of `make mutate` on config.py (docs/mutation-report.md), each test naming the mutants it kills."""
import pytest
from transformers import LlamaConfig, LlavaConfig

from gmaivl_rt import GMAIVLConfig
from gmaivl_rt.config import VisionConfig


def _llava_dict(**text):
    hf = LlavaConfig().to_dict()
    hf["text_config"] = {"model_type": "llama", **text}  # only what was given: the rest must fall back
    return hf


def test_missing_text_fields_fall_back_to_transformers_llama_defaults():
    """A text config written without a field means transformers' LlamaConfig default for it (mutants: the
    fallbacks of max_position_embeddings, rms_norm_eps, rope_theta, vocab_size, intermediate_size, layers, heads
    changed)."""
    text = GMAIVLConfig.from_hf_config(_llava_dict()).text
    want = LlamaConfig()
    assert (text.max_position_embeddings, text.rms_norm_eps, text.vocab_size, text.intermediate_size) == (
        want.max_position_embeddings, want.rms_norm_eps, want.vocab_size, want.intermediate_size)
    assert (text.num_layers, text.num_heads, text.num_kv_heads, text.hidden_size) == (
        want.num_hidden_layers, want.num_attention_heads, want.num_key_value_heads, want.hidden_size)
    assert text.rope_theta == want.rope_parameters["rope_theta"]


def test_missing_llava_and_vision_fields_fall_back_to_llavas_defaults():
    """No `vision_feature_layer` / `tie_word_embeddings` and an empty vision config mean LlavaConfig's defaults
    (its CLIP ViT-L/14-336), as does a VisionConfig built directly (mutants: the fallback -2 -> -1, -3, `not 2`,
    `+2`; tie False -> True; VisionConfig's default heads, intermediate size, image size or feature layer changed)."""
    hf = _llava_dict()
    del hf["vision_feature_layer"], hf["tie_word_embeddings"]
    hf["vision_config"] = {"model_type": "clip_vision_model"}
    config = GMAIVLConfig.from_hf_config(hf)
    llava = LlavaConfig()
    want = llava.vision_config
    assert config.vision.feature_layer == VisionConfig().feature_layer == llava.vision_feature_layer
    assert config.text.tie_word_embeddings is False and not llava.tie_word_embeddings
    got = config.vision
    assert (got.hidden_size, got.num_layers, got.num_heads, got.intermediate_size, got.image_size, got.patch_size,
            got.hidden_act, got.layer_norm_eps) == (
        want.hidden_size, want.num_hidden_layers, want.num_attention_heads, want.intermediate_size, want.image_size,
        want.patch_size, want.hidden_act, want.layer_norm_eps)


def test_feature_layer_bounds_are_the_hidden_states_transformers_returns():
    """CLIP returns num_layers + 1 hidden states (embeddings first): feature_layer -(L+1)..L is valid, one
    further either way is refused (mutants: `feature_layer <= num_layers` -> `<`, `-num_layers - 1` ->
    `-num_layers * 1`, `-L - 1 <= ` -> `<` / `!=` / `is not`, layers_used's `>= 0` -> `> 0` or `+ 1` -> `+ 2`, the
    error message joined with `//`, replace() ignoring vision={...})."""
    tiny = GMAIVLConfig.preset("tiny")
    layers = tiny.vision.num_layers
    for index in (-layers - 1, 0, layers):
        assert tiny.replace(vision={"feature_layer": index}).vision.layers_used == (index % (layers + 1))
    for index in (-layers - 2, layers + 1):
        with pytest.raises(ValueError, match=f"feature_layer {index} is outside"):
            tiny.replace(vision={"feature_layer": index})


def test_rope_scaling_spelled_with_rope_type_only():
    """transformers 4.4x writes `rope_scaling` as {"rope_type": "dynamic", "factor": f}: dynamic NTK must be
    kept, not silently dropped (mutant: `rope_scaling.get("type") == "dynamic"` -> `>=`, which raised on it;
    the unmutated reader dropped the scaling, fixed with this test)."""
    hf = _llava_dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=64)
    assert GMAIVLConfig.from_hf_config(hf).text.rope_scaling == {"type": "dynamic", "factor": 2.0}
    assert GMAIVLConfig.from_hf_config(hf).text.context_length == 128
