"""Config reading against transformers on a checkpoint whose config is NOT transformers' defaults.

tests/support/hf_reference.py's default checkpoint uses transformers' default eps, rope base and activation, which are also
GMAIVLConfig.from_hf_config's fallbacks: a reader that ignored those fields would still pass every test built on it.
Here the reference is made with every field away from its default at once (text rms_norm_eps 0.05, rope_theta 300,
dynamic NTK RoPE with a context of 16 positions, attention biases, tied embeddings; vision layer_norm_eps 0.1, GELU
instead of quick-GELU; select_strategy "full" (CLS kept) and feature_layer 1 instead of -2), then run through the
torch model and the ONNX graphs. fp32 throughout: logits within 1e-4 of transformers' (as test_model.py).
"""
from __future__ import annotations

import functools

import pytest
import torch
from hf_reference import IMAGE_TOKEN, make_hf_llava

import gmaivl_rt
from gmaivl_rt import GMAIVL

ATOL = 1e-4
CONTEXT = 16  # max_position_embeddings: dynamic NTK stretches the rope base for prompts longer than this
N_IMG = 5  # (28 / 14)^2 patches + the CLS token under select_strategy "full"
NON_DEFAULT = dict(
    tie=True,
    text=dict(rms_norm_eps=0.05, max_position_embeddings=CONTEXT, attention_bias=True, rope_theta=300.0,
              rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    vision=dict(layer_norm_eps=0.1, hidden_act="gelu"),
    vision_feature_select_strategy="full",
    vision_feature_layer=1,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("non_default")
    model = make_hf_llava(**NON_DEFAULT)
    with torch.no_grad():
        # Random init gives near-uniform attention, where rotary angles (theta, NTK) hardly change the output:
        # embeddings of order 1 and larger q/k projections make the attention sharp, so the positions matter.
        model.model.language_model.embed_tokens.weight.mul_(50)
        for name, p in model.named_parameters():
            if ".q_proj." in name or ".k_proj." in name:
                p.mul_(10)
    model.save_pretrained(path)
    assert _hf(path).config.text_config.rope_parameters["rope_theta"] == 300.0
    return path


@functools.lru_cache(maxsize=None)
def _hf(path):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(path).eval()


def _prompt(n_before, n_after, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randint(0, 100, (n_before,), generator=g).tolist() + [IMAGE_TOKEN] * N_IMG
           + torch.randint(0, 100, (n_after,), generator=g).tolist())
    return torch.tensor([ids]), torch.randn(1, 3, 28, 28, generator=g)


def test_config_fields_are_read(checkpoint):
    """Each field must come from config.json, not from a fallback (mutant: any `.get(name, default)` of
    from_hf_config replaced by its default)."""
    cfg = GMAIVL.from_pretrained(checkpoint).config
    t, v = cfg.text, cfg.vision
    assert (t.rms_norm_eps, t.rope_theta, t.max_position_embeddings) == (0.05, 300.0, CONTEXT)
    assert t.rope_scaling == {"type": "dynamic", "factor": 2.0}
    assert t.tie_word_embeddings and t.attention_bias
    assert (v.layer_norm_eps, v.hidden_act, v.select_strategy, v.feature_layer) == (0.1, "gelu", "full", 1)
    assert cfg.num_image_tokens == N_IMG


@pytest.mark.parametrize("length", ["inside_context", "past_context"])
def test_torch_model_logits_match_transformers(checkpoint, length):
    """Inside the 16-position context (12 tokens) the rope base must stay 300; past it (27 tokens) dynamic NTK
    stretches it. Mutants (each passed every other test file): rope_theta, rms_norm_eps, layer_norm_eps or
    hidden_act read as their defaults; dynamic NTK dropped (`if cfg.rope_scaling and ...` never true) or applied
    inside the context too (`max_position + 1 > ...` -> `>= 0`); the "full" strategy dropping the CLS token; the
    feature layer counted from the end; attention biases or the tied head ignored."""
    ids, pixels = _prompt(3, 4) if length == "inside_context" else _prompt(10, 12)
    assert (ids.shape[1] <= CONTEXT) == (length == "inside_context")
    ours = GMAIVL.from_pretrained(checkpoint)
    with torch.no_grad():
        want = _hf(checkpoint)(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, pixel_values=pixels).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_onnx_graphs_generate_as_transformers(checkpoint, tmp_path):
    """The same checkpoint exported to ONNX (the decoder graph has its own dynamic-NTK code, export/graphs.py):
    greedy generation from a 13-token prompt runs past the 16-position context and must give transformers' ids.
    Mutant: the graph's `torch.where(length > self.max_positions, stretched, ...)` always taking the base."""
    from gmaivl_rt.export.onnx_export import export_onnx

    export_onnx(checkpoint, tmp_path / "onnx")
    ids, pixels = _prompt(4, 4, seed=1)
    steps = 10
    want = _hf(checkpoint).generate(input_ids=ids, pixel_values=pixels, max_new_tokens=steps, min_new_tokens=steps,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)
    assert want.shape[1] > CONTEXT > ids.shape[1]
    got = gmaivl_rt.load(tmp_path / "onnx", backend="onnx").generate(ids, pixel_values=pixels,
                                                                     max_new_tokens=steps, eos_token_id=[],
                                                                     pad_token_id=0)
    assert torch.equal(got, want)
    ours = GMAIVL.from_pretrained(checkpoint).generate(ids, pixel_values=pixels, max_new_tokens=steps,
                                                       eos_token_id=[], pad_token_id=0)
    assert torch.equal(ours, want)


@pytest.mark.parametrize("activation", ["gelu", "relu", "gelu_pytorch_tanh"])
def test_text_activation_other_than_silu_is_refused(activation):
    """The text MLP is SwiGLU with a SiLU gate (kernels/swiglu.py): a checkpoint trained with another activation
    would load and answer wrongly. Mutant: `hidden_act` not read (silu assumed), as before issue #15."""
    from hf_reference import tiny_llava_config

    from gmaivl_rt.errors import ModelError

    hf = tiny_llava_config(text=dict(hidden_act=activation)).to_dict()
    assert hf["text_config"]["hidden_act"] == activation
    with pytest.raises(ModelError, match=rf"text_config\.hidden_act '{activation}' is not supported"):
        gmaivl_rt.GMAIVLConfig.from_hf_config(hf)


@pytest.mark.parametrize("activation", ["silu", "swish"])
def test_text_activation_silu_and_swish_are_read(activation):
    """transformers' ACT2FN maps both names to SiLU: both load (mutant: only "silu" accepted)."""
    from hf_reference import tiny_llava_config

    hf = tiny_llava_config(text=dict(hidden_act=activation)).to_dict()
    assert gmaivl_rt.GMAIVLConfig.from_hf_config(hf).text.hidden_size == 64
