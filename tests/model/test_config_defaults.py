"""GMAIVLConfig.from_hf_config's fallbacks and bounds against transformers' own config classes (fast: no model):
survivors of `make mutate` on config.py (docs/mutation/mutation-report.md), each test naming the mutants it kills."""
import pytest
from transformers import LlamaConfig, LlavaConfig

from gmaivl_rt import GMAIVLConfig
from gmaivl_rt.model.config import VisionConfig


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


def test_text_attention_bias_falls_back_to_llamas_default():
    """A text config without `attention_bias` (nor InternLM2's `bias`) means no q/k/v/o biases, as LlamaConfig
    (mutant: the inner fallback `tc.get("bias", False)` -> True)."""
    assert GMAIVLConfig.from_hf_config(_llava_dict()).text.attention_bias is LlamaConfig().attention_bias is False
    assert GMAIVLConfig.from_hf_config(_llava_dict(bias=True)).text.attention_bias is True


def test_layers_used_is_the_hidden_state_transformers_selects():
    """`layers_used` = how many layers run to reach `hidden_states[feature_layer]`, hidden_states holding the
    embeddings and each of the L layers' outputs: for every valid index, Python's own indexing of range(L + 1)
    (mutant: `feature_layer >= 0` -> `>= -1`, which made -1, the last layer, run -1 layers)."""
    tiny = GMAIVLConfig.preset("tiny")
    layers = tiny.vision.num_layers
    for index in range(-layers - 1, layers + 1):
        assert tiny.replace(vision={"feature_layer": index}).vision.layers_used == range(layers + 1)[index], index


def test_each_validation_rule_refuses_on_its_own():
    """Each rule of `validate` refuses alone, with the others satisfied (mutants: the heads check's `or` -> `and`;
    the projector check `!=` -> `<` / `>`, which let names sorting on one side through)."""
    tiny = GMAIVLConfig.preset("tiny")
    text = tiny.text
    with pytest.raises(ValueError, match="must divide evenly"):  # hidden % heads only
        tiny.replace(text={"hidden_size": text.hidden_size + text.num_heads // 2})
    with pytest.raises(ValueError, match="must divide evenly"):  # heads % kv heads only
        tiny.replace(text={"num_kv_heads": 3})
    for projector in ("linear", "mlp3x_gelu", "identity"):  # sorting before and after "mlp2x_gelu"
        with pytest.raises(ValueError, match=f"projector '{projector}' is not supported"):
            tiny.replace(projector=projector)


def test_replace_takes_a_whole_vision_or_text_config():
    """`replace(vision=VisionConfig(...))` swaps the whole part, as dataclasses.replace would; a dict changes
    fields (mutant: `key in (...) and isinstance(value, dict)` -> `or`, which sent the dataclass down the
    dict path)."""
    tiny = GMAIVLConfig.preset("tiny")
    vision = VisionConfig(hidden_size=48, num_layers=1, num_heads=3, intermediate_size=96, image_size=42,
                          patch_size=14)
    assert tiny.replace(vision=vision).vision == vision
    assert tiny.replace(text=tiny.text).text == tiny.text


def test_a_config_without_text_config_is_not_a_llava_config():
    """Either part missing is refused by name, not a KeyError (mutant: `or` -> `and` in the Llava check)."""
    for part in ("text_config", "vision_config"):
        hf = _llava_dict()
        del hf[part]
        with pytest.raises(ValueError, match="not a Llava config"):
            GMAIVLConfig.from_hf_config(hf)


def test_projector_activation_and_bias_are_checked_as_transformers_spells_them():
    """Llava's projector is GELU with biases; a config without `multimodal_projector_bias` (transformers 4.x)
    means biases (LlavaConfig's default), any other activation is refused whatever its name sorts like, and so is
    a bias-less projector (mutants: `!= "gelu"` -> `<` / `>`, the `or` -> `and`, the bias fallback True ->
    False)."""
    assert LlavaConfig().multimodal_projector_bias is True
    hf = _llava_dict()
    hf.pop("multimodal_projector_bias", None)
    assert GMAIVLConfig.from_hf_config(hf).projector == "mlp2x_gelu"
    for act in ("fast_gelu", "quick_gelu", "relu"):  # sorting before and after "gelu"
        with pytest.raises(ValueError, match="only the mlp2x_gelu projector"):
            GMAIVLConfig.from_hf_config({**_llava_dict(), "projector_hidden_act": act})
    with pytest.raises(ValueError, match="only the mlp2x_gelu projector"):
        GMAIVLConfig.from_hf_config({**_llava_dict(), "multimodal_projector_bias": False})


def test_a_transformers_llava_config_is_fixed_resolution():
    """A config transformers wrote (no "gmaivl" section) is a fixed-size model, as LlavaForConditionalGeneration
    runs it (mutant: VisionConfig's `dynamic_resolution` default False -> True)."""
    config = GMAIVLConfig.from_hf_config(_llava_dict())
    assert config.vision.dynamic_resolution is False
    assert config.num_image_tokens == (LlavaConfig().vision_config.image_size // config.vision.patch_size) ** 2


def test_dynamic_resolution_pixel_budget():
    """The lower bound is Qwen2-VL's (whose `smart_resize` rule `dynamic_resize_shape` follows): its image
    processor's `shortest_edge` of 56 * 56 pixels; the default budget keeps the checkpoint's own 336 x 336 images
    as they are; a budget `dynamic_resize_shape` would refuse is refused when the config is made, naming the field
    (mutants: min_pixels / max_pixels' factors or operators changed, except max_pixels off by one row)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from gmaivl_rt.model.vision_sizes import dynamic_resize_shape

    vision = VisionConfig()
    assert vision.min_pixels == Qwen2VLImageProcessorPil().size.shortest_edge
    assert dynamic_resize_shape(336, 336, vision.patch_size, vision.min_pixels, vision.max_pixels) == (336, 336)
    seven_b = GMAIVLConfig.preset("gmai-vl-7b")
    assert seven_b.replace(vision={"dynamic_resolution": True}).vision.dynamic_resolution
    with pytest.raises(ValueError, match="pixel budget: min_pixels=5000 exceeds max_pixels=4000"):
        seven_b.replace(vision={"dynamic_resolution": True, "min_pixels": 5000, "max_pixels": 4000})
    with pytest.raises(ValueError, match="pixel budget: max_pixels=100 is below one patch"):
        seven_b.replace(vision={"dynamic_resolution": True, "max_pixels": 100})
    seven_b.replace(vision={"max_pixels": 100})  # unused while dynamic resolution is off


def test_a_corrupt_config_json_names_the_file(tmp_path):
    """Not JSON: a ValueError naming the file and saying so (mutant: the `except json.JSONDecodeError` not
    matching, which let json's own message through without the file)."""
    (tmp_path / "config.json").write_text('{"vision_config": {')
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        GMAIVLConfig.from_pretrained(tmp_path)


def test_replace_refuses_a_name_that_is_not_a_field():
    """`replace(vocab_size=...)` once set a stray top-level attribute nothing reads (the text vocabulary kept the
    preset's size): an unknown name, top-level or in `text=`/`vision=`, is refused and names the field."""
    tiny = GMAIVLConfig.preset("tiny")
    with pytest.raises(ValueError, match="GMAIVLConfig has no field 'vocab_size'"):
        tiny.replace(vocab_size=300)
    with pytest.raises(ValueError, match="text config has no field 'vocab'"):
        tiny.replace(text={"vocab": 300})
    with pytest.raises(ValueError, match="vision config has no field 'size'"):
        tiny.replace(vision={"size": 28})
    assert tiny.replace(text={"vocab_size": 300}).text.vocab_size == 300
