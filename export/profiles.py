"""Optimization-profile arithmetic for TensorRT engines: min/opt/max sizes -> per-input shape ranges.

Pure Python (no TensorRT), so it is checked on any machine and the CLI can parse sizes without importing TensorRT.
Symbolic dim names come from the export's `gmaivl_deploy.json` (batch_size, sequence_length, past_sequence_length,
total_sequence_length, num_logits, num_images, height, width).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

SIZE_KEYS = ("batch", "images", "seq", "past", "height", "width")
PRECISIONS = ("fp16", "bf16", "fp32")  # engine precisions `gmaivl-rt export tensorrt` offers


@dataclass
class Sizes:
    """One corner (min, opt or max) of the shapes the engines accept."""
    batch: int = 1        # sequences per generate() call
    images: int = 1       # images per vision run
    seq: int = 1          # prompt tokens per prefill
    past: int = 0         # cached tokens during decode
    height: int = 0       # dynamic resolution only (pixels; 0 = the model's image_size)
    width: int = 0

    @classmethod
    def parse(cls, text: str, base: "Sizes | None" = None) -> "Sizes":
        """"batch=1,seq=512,past=512" -> Sizes (unnamed keys keep `base`'s values)."""
        values = asdict(base or cls())
        for item in filter(None, (t.strip() for t in text.split(","))):
            key, _, value = item.partition("=")
            if key not in SIZE_KEYS or not value.strip().isdigit():
                raise ValueError(f"shape size {item!r}: expected KEY=INT with KEY one of {', '.join(SIZE_KEYS)}")
            values[key] = int(value)
        return cls(**values)


@dataclass
class ProfileSizes:
    min: Sizes = field(default_factory=lambda: Sizes(batch=1, images=1, seq=1, past=1))
    opt: Sizes = field(default_factory=lambda: Sizes(batch=1, images=1, seq=512, past=512))
    max: Sizes = field(default_factory=lambda: Sizes(batch=4, images=4, seq=2048, past=2048))

    def validate(self):
        for key in SIZE_KEYS:
            lo, mid, hi = (getattr(s, key) for s in (self.min, self.opt, self.max))
            if not lo <= mid <= hi:
                raise ValueError(f"profile sizes for {key}: need min <= opt <= max, got {lo}, {mid}, {hi}")
            if key in ("batch", "images", "seq") and lo < 1:
                raise ValueError(f"profile sizes for {key}: the minimum must be at least 1, got {lo}")


def _dim_ranges(deploy: dict, sizes: ProfileSizes, phase: str) -> dict[str, tuple[int, int, int]]:
    """Symbolic dim name -> (min, opt, max) for one profile. phase: "prefill" (no past) | "decode" (one token)."""
    image = deploy["image"]
    patch, side = image["patch_size"], image["image_size"]
    corners = (sizes.min, sizes.opt, sizes.max)
    pick = lambda key: tuple(getattr(c, key) for c in corners)  # noqa: E731
    seq, past = pick("seq"), pick("past")
    if phase == "prefill":
        past = (0, 0, 0)
    elif phase == "decode":
        seq = (1, 1, 1)
        past = tuple(max(p, 1) for p in past)
    pixels = lambda key: tuple((getattr(c, key) or side) // patch * patch for c in corners)  # noqa: E731
    # Generation asks for one row of logits per sequence (its last token); a prefill may ask for up to all of them.
    num_logits = (1, 1, seq[2])
    return {"batch_size": pick("batch"), "num_images": pick("images"), "sequence_length": seq,
            "num_logits": num_logits,
            "past_sequence_length": past, "total_sequence_length": tuple(p + s for p, s in zip(past, seq)),
            "height": pixels("height"), "width": pixels("width")}


def profile_shapes(deploy: dict, graph: str, sizes: ProfileSizes) -> list[dict[str, tuple]]:
    """Optimization profiles of one graph: a list of {input name: (min_shape, opt_shape, max_shape)}.
    Static dims are copied from the graph; symbolic ones come from `sizes` (see `_dim_ranges`)."""
    sizes.validate()
    phases = ("prefill", "decode") if graph == "decoder_model_merged" else ("any",)
    profiles = []
    for phase in phases:
        ranges = _dim_ranges(deploy, sizes, phase)
        profile = {}
        for spec in deploy["graphs"][graph]["inputs"]:
            corners = [[], [], []]
            for dim in spec["shape"]:
                if isinstance(dim, int):
                    lo = mid = hi = dim
                elif dim in ranges:
                    lo, mid, hi = ranges[dim]
                else:
                    raise ValueError(f"{graph}: input {spec['name']} has dim {dim!r} with no profile range")
                for corner, value in zip(corners, (lo, mid, hi)):
                    corner.append(value)
            profile[spec["name"]] = tuple(tuple(c) for c in corners)
        profiles.append(profile)
    return profiles
