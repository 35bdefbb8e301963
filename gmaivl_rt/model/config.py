"""GMAIVLConfig: the vision tower, projector and language model dimensions, read from and written as the
`config.json` of a transformers Llava (CLIP vision config + Llama or InternLM2 text config)."""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from gmaivl_rt.errors import ModelError


@dataclass
class VisionConfig:
    """CLIP ViT. `feature_layer` indexes hidden states as transformers does (0 = embeddings after the
    pre-LayerNorm, -1 = last layer); `select_strategy` "default" drops the CLS token, "full" keeps it."""
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 336
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    feature_layer: int = -2
    select_strategy: str = "default"
    # Native dynamic resolution (off for GMAI-VL checkpoints, which are fixed at 336x336).
    dynamic_resolution: bool = False
    min_pixels: int = 56 * 56
    max_pixels: int = 672 * 672

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def tokens_per_image(self, height: int | None = None, width: int | None = None) -> int:
        """Image features (= image tokens in input_ids) of one image of height x width pixels as fed to the tower
        (default: the fixed image_size): one per patch, plus the CLS token under the "full" strategy."""
        h, w = height or self.image_size, width or self.image_size
        return (h // self.patch_size) * (w // self.patch_size) + (self.select_strategy == "full")

    @property
    def layers_used(self) -> int:
        """How many encoder layers run to produce the selected hidden state."""
        return self.feature_layer if self.feature_layer >= 0 else self.num_layers + 1 + self.feature_layer


@dataclass
class TextConfig:
    """Llama-family decoder. `arch` is the family the checkpoint came in ("llama" or "internlm2"); weights are
    held in Llama layout either way. `rope_scaling` None or {"type": "dynamic", "factor": f} (InternLM2.5)."""
    arch: str = "llama"
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    intermediate_size: int = 14336
    vocab_size: int = 92544
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def context_length(self) -> int:
        """Tokens one sequence may hold (prompt + generated): max_position_embeddings, times the factor of dynamic
        NTK scaling where the checkpoint has it (InternLM2.5's rope_scaling exists to run past the trained context)."""
        if self.rope_scaling:
            return int(self.max_position_embeddings * float(self.rope_scaling["factor"]))
        return self.max_position_embeddings


@dataclass
class GMAIVLConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projector: str = "mlp2x_gelu"
    image_token_index: int = 92544

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        self.validate()

    def validate(self):
        v, t = self.vision, self.text
        problems = []
        if v.hidden_size % v.num_heads:
            problems.append(f"vision hidden_size {v.hidden_size} is not divisible by num_heads {v.num_heads}")
        if v.image_size % v.patch_size:
            problems.append(f"vision image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        if not -v.num_layers - 1 <= v.feature_layer <= v.num_layers:
            problems.append(f"vision feature_layer {v.feature_layer} is outside the {v.num_layers} layers")
        if v.select_strategy not in ("default", "full"):
            problems.append(f"vision select_strategy {v.select_strategy!r} is not 'default' or 'full'")
        if v.dynamic_resolution:  # the pixel budget is checked by the rule that uses it, at load, not per image
            from gmaivl_rt.model.vision_sizes import dynamic_resize_shape

            try:
                dynamic_resize_shape(v.image_size, v.image_size, v.patch_size, v.min_pixels, v.max_pixels)
            except ValueError as e:
                problems.append(f"vision pixel budget: {str(e).removeprefix('dynamic_resize_shape: ')}")
        if t.hidden_size % t.num_heads or t.num_heads % t.num_kv_heads:
            problems.append(f"text heads: hidden {t.hidden_size}, heads {t.num_heads}, kv heads {t.num_kv_heads} "
                            "must divide evenly")
        if t.arch not in ("llama", "internlm2"):
            problems.append(f"text arch {t.arch!r} is not 'llama' or 'internlm2'")
        if self.projector != "mlp2x_gelu":
            problems.append(f"projector {self.projector!r} is not supported (only 'mlp2x_gelu')")
        if problems:
            raise ValueError("invalid GMAIVLConfig: " + "; ".join(problems))

    @property
    def num_image_tokens(self) -> int:
        """Image features (= image tokens in input_ids) per image at the fixed resolution."""
        return self.vision.tokens_per_image()

    # ---------------------------------------------------------------- presets
    @classmethod
    def preset(cls, name: str) -> "GMAIVLConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return copy.deepcopy(PRESETS[name])

    def replace(self, **changes) -> "GMAIVLConfig":
        """A copy with top-level fields changed; `vision=`/`text=` take dicts of field changes. A name that is not
        a field is refused (ValueError) rather than set as a stray attribute nothing reads."""
        new = copy.deepcopy(self)
        for key, value in changes.items():
            if key in ("vision", "text") and isinstance(value, dict):
                part = getattr(new, key)
                for k, val in value.items():
                    if k not in {f.name for f in fields(part)}:
                        raise ValueError(f"{key} config has no field {k!r}")
                    setattr(part, k, val)
            elif key not in {f.name for f in fields(new)}:
                raise ValueError(f"GMAIVLConfig has no field {key!r}")
            else:
                setattr(new, key, value)
        new.validate()
        return new

    def to_dict(self) -> dict:
        return asdict(self)

    # ---------------------------------------------------------------- transformers config.json
    @classmethod
    def from_hf_config(cls, hf: dict) -> "GMAIVLConfig":
        """From a transformers LlavaConfig dict (text config llama or internlm2; 4.x or 5.x spelling)."""
        if "vision_config" not in hf or "text_config" not in hf:
            raise ValueError("config.json is not a Llava config: it needs 'vision_config' and 'text_config'")
        vc, tc = hf["vision_config"], hf["text_config"]
        defaults = VisionConfig()
        feature_layer = hf.get("vision_feature_layer", -2)
        if isinstance(feature_layer, (list, tuple)):
            raise ValueError("vision_feature_layer lists (multi-layer features) are not supported")
        extra = hf.get("gmaivl", {})
        vision = VisionConfig(
            hidden_size=vc.get("hidden_size", defaults.hidden_size),
            num_layers=vc.get("num_hidden_layers", defaults.num_layers),
            num_heads=vc.get("num_attention_heads", defaults.num_heads),
            intermediate_size=vc.get("intermediate_size", defaults.intermediate_size),
            image_size=vc.get("image_size", defaults.image_size),
            patch_size=vc.get("patch_size", defaults.patch_size),
            hidden_act=vc.get("hidden_act", defaults.hidden_act),
            layer_norm_eps=vc.get("layer_norm_eps", defaults.layer_norm_eps),
            feature_layer=feature_layer,
            select_strategy=hf.get("vision_feature_select_strategy", "default"),
            **{k: extra[k] for k in ("dynamic_resolution", "min_pixels", "max_pixels") if k in extra},
        )
        arch = tc.get("model_type", "llama")
        if arch not in ("llama", "internlm2"):
            raise ValueError(f"text model_type {arch!r} is not supported (llama or internlm2)")
        rope = tc.get("rope_parameters") or {}
        rope_scaling = tc.get("rope_scaling")
        if rope.get("rope_type", "default") not in ("default", None):
            rope_scaling = {"type": rope["rope_type"], "factor": rope.get("factor", 1.0)}
        # transformers 4.x spells the kind "type", later ones "rope_type" (either may be alone)
        scaling_kind = rope_scaling.get("type", rope_scaling.get("rope_type")) if rope_scaling else None
        if rope_scaling and scaling_kind not in ("dynamic", "default"):
            raise ValueError(f"rope scaling {rope_scaling} is not supported (default or dynamic NTK)")
        # The MLP is SwiGLU and the kernel's gate is SiLU (= swish): another activation would load and run, wrong.
        text_act = tc.get("hidden_act", "silu")
        if text_act not in ("silu", "swish"):
            raise ModelError(f"text_config.hidden_act {text_act!r} is not supported (the MLP gate is SiLU: "
                             "'silu' or 'swish')")
        heads = tc.get("num_attention_heads", 32)
        hidden = tc.get("hidden_size", 4096)
        if tc.get("head_dim") not in (None, hidden // heads):
            raise ValueError(f"text head_dim {tc['head_dim']} != hidden_size / num_attention_heads")
        text = TextConfig(
            arch=arch,
            hidden_size=hidden,
            num_layers=tc.get("num_hidden_layers", 32),
            num_heads=heads,
            num_kv_heads=tc.get("num_key_value_heads") or heads,
            intermediate_size=tc.get("intermediate_size", 11008),
            vocab_size=tc.get("vocab_size", 32000),
            rope_theta=rope.get("rope_theta", tc.get("rope_theta", 10000.0)),
            rope_scaling={"type": "dynamic", "factor": rope_scaling["factor"]} if scaling_kind == "dynamic" else None,
            rms_norm_eps=tc.get("rms_norm_eps", 1e-6),
            max_position_embeddings=tc.get("max_position_embeddings", 2048),
            tie_word_embeddings=tc.get("tie_word_embeddings", hf.get("tie_word_embeddings", False)),
            attention_bias=tc.get("attention_bias", tc.get("bias", False)),
            bos_token_id=tc.get("bos_token_id"),
            eos_token_id=tc.get("eos_token_id"),
            pad_token_id=tc.get("pad_token_id"),
        )
        if hf.get("projector_hidden_act", "gelu") != "gelu" or not hf.get("multimodal_projector_bias", True):
            raise ValueError("only the mlp2x_gelu projector (GELU, with bias) is supported")
        return cls(vision=vision, text=text, image_token_index=hf.get("image_token_index", hf.get("image_token_id")))

    def to_hf_config(self) -> dict:
        """A transformers 5.x LlavaConfig dict (text config in Llama layout, as `save_pretrained` writes weights)."""
        v, t = self.vision, self.text
        text_config = {
            "model_type": "llama", "hidden_size": t.hidden_size, "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim,
            "intermediate_size": t.intermediate_size, "vocab_size": t.vocab_size, "hidden_act": "silu",
            "rms_norm_eps": t.rms_norm_eps, "max_position_embeddings": t.max_position_embeddings,
            "tie_word_embeddings": t.tie_word_embeddings, "attention_bias": t.attention_bias, "mlp_bias": False,
            "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id,
            "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
        }
        if t.rope_scaling:
            text_config["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": t.rope_theta,
                                              "factor": t.rope_scaling["factor"]}
        return {
            "architectures": ["LlavaForConditionalGeneration"],
            "model_type": "llava",
            "image_token_index": self.image_token_index,
            "image_seq_length": self.num_image_tokens,
            "projector_hidden_act": "gelu",
            "multimodal_projector_bias": True,
            "vision_feature_layer": v.feature_layer,
            "vision_feature_select_strategy": v.select_strategy,
            "tie_word_embeddings": t.tie_word_embeddings,
            "vision_config": {
                "model_type": "clip_vision_model", "hidden_size": v.hidden_size, "num_hidden_layers": v.num_layers,
                "num_attention_heads": v.num_heads, "intermediate_size": v.intermediate_size,
                "image_size": v.image_size, "patch_size": v.patch_size, "hidden_act": v.hidden_act,
                "layer_norm_eps": v.layer_norm_eps, "num_channels": 3, "projection_dim": 768,
            },
            "text_config": text_config,
            "gmaivl": {"dynamic_resolution": v.dynamic_resolution, "min_pixels": v.min_pixels,
                       "max_pixels": v.max_pixels},
        }

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "GMAIVLConfig":
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no config.json (a model folder needs one)")
        try:
            hf = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
        return cls.from_hf_config(hf)


def _seven_b() -> GMAIVLConfig:
    # CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336) + InternLM2.5-7B (internlm/internlm2_5-7b-chat):
    # the InternLM2 vocabulary of 92544 plus `<image>`, padded to a multiple of 64 as XTuner's Llava export does.
    return GMAIVLConfig(
        vision=VisionConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, image_size=336,
                            patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5),
        text=TextConfig(arch="internlm2", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                        intermediate_size=14336, vocab_size=92608, rope_theta=1_000_000.0,
                        rope_scaling={"type": "dynamic", "factor": 2.0}, rms_norm_eps=1e-5,
                        max_position_embeddings=32768, bos_token_id=1, eos_token_id=2, pad_token_id=2),
        image_token_index=92544,
    )


PRESETS = {
    "gmai-vl-7b": _seven_b(),
    # Trains through all three stages in minutes on 2 CPU cores: the demo's model. vocab_size and
    # image_token_index are set from the tokenizer trained on the demo data. 28-pixel patches: 16 image tokens per
    # image, so a step sees 2-3x more images than with 14-pixel patches (64 tokens) for the same time, and a ViT
    # trained from scratch needs the images (a modality probe on its features: 82 % held-out after 300 steps of 8
    # images at patch 28, 85 % at patch 14 in 2.3x the time).
    "compact": GMAIVLConfig(
        vision=VisionConfig(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512, image_size=112,
                            patch_size=28),
        text=TextConfig(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=704,
                        vocab_size=4096, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=2048,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None),
        image_token_index=4095,
    ),
    # For tests: a few thousand parameters per layer, still grouped-query attention.
    "tiny": GMAIVLConfig(
        vision=VisionConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, image_size=28,
                            patch_size=14),
        text=TextConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                        vocab_size=512, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=1024,
                        bos_token_id=None, eos_token_id=None, pad_token_id=None),
        image_token_index=511,
    ),
}

__all__ = ["GMAIVLConfig", "VisionConfig", "TextConfig", "PRESETS"]
