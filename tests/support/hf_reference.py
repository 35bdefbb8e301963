"""Tiny transformers-made Llava checkpoints: the independent reference for the model tests."""
from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 120
VOCAB = 128


def tiny_llava_config(image_size=28, patch=14, vocab=VOCAB, image_token=IMAGE_TOKEN, tie=False, vision=None,
                      text=None, **llava) -> LlavaConfig:
    """vision / text / llava: overrides of the CLIP, Llama and Llava config fields (e.g. non-default eps)."""
    vision = CLIPVisionConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=2, image_size=image_size, patch_size=patch,
                                        projection_dim=16), **(vision or {})})
    text = LlamaConfig(**{**dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256,
                                 rope_theta=10000.0, tie_word_embeddings=tie), **(text or {})})
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                       tie_word_embeddings=tie, **llava)


def make_hf_llava(path=None, seed=0, **config_kwargs) -> LlavaForConditionalGeneration:
    """Random-weight Llava (CLIP vision + Llama text with grouped-query attention); saved to `path` if given."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(**config_kwargs)).eval()
    with torch.no_grad():  # transformers initialises norms to 1 and biases to 0: perturb so the test sees them
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    if path is not None:
        model.save_pretrained(path)
    return model


def prompt_with_image(n_image_tokens: int, text_before: list, text_after: list) -> list:
    return text_before + [IMAGE_TOKEN] * n_image_tokens + text_after
