"""What one request may ask of a runtime: the ceilings and the checks every layer shares.

`Limits` holds the configurable ceilings (pixels, bytes, images, characters, new tokens); a runtime takes one
(`gmaivl_rt.load(path, limits=Limits(...))`), the default is `Limits()`. The single validation of generation
options, `gmaivl_rt.model.sampling.check_generation`, builds on the checks here; the decoding loop
(`generate_tokens`) repeats only the two structural rules (`check_max_new_tokens`, `check_context`) so a direct
`generate()` call cannot overrun a cache.
Errors are `InputError` / `LimitError` naming the option by its role and never echoing more than a short value.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from gmaivl_rt.errors import InputError, LimitError


@dataclass(frozen=True)
class Limits:
    """Ceilings for one request. Every field is checked before the expensive work it guards.

    max_image_pixels:   pixels of one decoded 2D picture (frame / slice), read from the header before decoding
                        (well under Pillow's own decompression-bomb threshold of ~89 MP).
    max_volume_voxels:  voxels of a NIfTI volume loaded to take a slice from (2^28 = 1 GiB as float32).
    max_image_bytes:    encoded bytes of one image (file size, raw bytes, file object).
    max_images_per_request: images in one request.
    max_text_chars:     characters of the question, of the system prompt and of each message (or text part).
    max_messages:       chat turns in one request.
    max_new_tokens:     the most tokens one request may generate (the model's context is checked as well).
    """

    max_image_pixels: int = 50_000_000
    max_volume_voxels: int = 1 << 28
    max_image_bytes: int = 512 << 20
    max_images_per_request: int = 8
    max_text_chars: int = 16_000
    max_messages: int = 64
    max_new_tokens: int = 4096

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"Limits.{f.name} must be an int >= 1, got {short_repr(value)}")


DEFAULT_LIMITS = Limits()

# What a runtime keeps of recent images for follow-up questions (`gmaivl_rt.runtime.prepared_images`): the
# preprocessed pixels, at most this many bytes (float32: 64 MiB holds ~1300 images of 112 px, ~110 of 336 px,
# ~27 of 672 px), least recently used out first. Not a per-request ceiling: one per runtime
# (`Backend.prepared_images`; `gmaivl_rt.load(..., prepared_image_cache_bytes=N)`, 0 keeps nothing).
PREPARED_IMAGE_CACHE_BYTES = 64 << 20


@dataclass(frozen=True)
class DecodeBudget:
    """What a server lets image decoding cost (`gmaivl-rt serve --max-request-pixels --max-server-pixels
    --decode-workers`; `create_app(decode_budget=...)`), counted in decoded pixel values: a picture's width x
    height (x3 when read as colour), a NIfTI file's whole volume, as `gmaivl_rt.medical.convert.decoded_pixels`
    reads them from the headers, before anything is decoded.

    max_request_pixels: the most one request's images may decode; more -> 413 at once (default 100 M: two
                        7000x7000 16-bit greyscale pictures, a dozen 2800x2800 ones).
    max_server_pixels:  the most decoded at once by the whole server, counted from a request's admission until its
                        decoded pictures are freed (once the engine has preprocessed them); a request that would go
                        over it -> 429 with Retry-After at once (default 200 M).
    decode_workers:     threads decoding images (a pool of their own, apart from the event loop and the threads that
                        serve the page, /health and streams); one request's images decode one after the other.
    trim_after_pixels:  after a request decoding at least this many values, freed memory is handed back to the
                        operating system (glibc `malloc_trim`; elsewhere nothing).
    retry_after_s:      the Retry-After of a 429 for the server budget.

    Memory: decoding takes at most ~40 bytes per value at its peak (measured: a 16-bit greyscale PNG ~14, a CT
    DICOM ~28, an MR DICOM with a percentile window ~36; a colour pixel, counted three times, ~13 per value) and a
    decoded picture keeps 3 bytes per pixel until the engine has preprocessed it. So the extra resident memory of
    image decoding stays under about decode_workers x 40 B x the largest picture (at most max_image_pixels, and a
    NIfTI volume at most max_request_pixels) + 3 B x max_server_pixels: with the defaults ~4.6 GB, ~2.2 GB when no
    picture is over 25 M pixels (`bench/test_bench_server_images.py` measures it)."""

    max_request_pixels: int = 100_000_000
    max_server_pixels: int = 200_000_000
    decode_workers: int = 2
    trim_after_pixels: int = 16_000_000
    retry_after_s: int = 1

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"DecodeBudget.{f.name} must be an int >= 1, got {short_repr(value)}")
        if self.max_request_pixels > self.max_server_pixels:
            raise InputError(f"DecodeBudget.max_request_pixels ({self.max_request_pixels}) is over max_server_pixels "
                             f"({self.max_server_pixels}): such a request could never be decoded")


# Every option `check_generation` accepts; the sampling ones are validated by `SamplingParams`.
def short_repr(value, chars: int = 24) -> str:
    """A value as an error may quote it: its repr cut to a short prefix (never a whole input)."""
    text = repr(value)
    return text if len(text) <= chars else f"{text[:chars]}... ({len(text)} chars)"


def type_name(value) -> str:
    return type(value).__name__


def check_max_new_tokens(value, role: str = "max_new_tokens") -> int:
    """An int >= 1 (bool, float and str refused: 1.5 or "8" would silently mean something else)."""
    import numpy as np

    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{role} must be an int >= 1, got {type_name(value)} {short_repr(value)}")
    if value < 1:
        raise InputError(f"{role} must be an int >= 1, got {value}")
    return value


def check_context(prompt_tokens: int, max_new_tokens: int, context: int | None) -> None:
    """prompt + new tokens must fit the model's context (TextConfig.context_length)."""
    if context is not None and prompt_tokens + max_new_tokens > context:
        raise LimitError(f"prompt of {prompt_tokens} tokens + max_new_tokens {max_new_tokens} = "
                         f"{prompt_tokens + max_new_tokens} exceeds the model's context of {context} tokens")


def check_text(text, role: str, limits: Limits | None = None, *, allow_empty: bool = True) -> str:
    """A str within limits.max_text_chars; the error quotes nothing of the text but its length."""
    limits = limits or DEFAULT_LIMITS
    if not isinstance(text, str):
        raise InputError(f"{role} must be a str, got {type_name(text)}")
    if len(text) > limits.max_text_chars:
        raise LimitError(f"{role} has {len(text)} characters; the limit is {limits.max_text_chars}")
    if not allow_empty and not text.strip():
        raise InputError(f"{role} is empty")
    return text
