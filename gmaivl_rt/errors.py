"""The errors a service embedding gmaivl-rt catches, in one place.

    GmaivlError
    ├── InputError(ValueError)      a request's image, question, messages or generation parameters are bad
    │   ├── LimitError              over a configured limit (context, pixels, bytes, question length, new tokens)
    │   └── MedicalImageError       an image (or mask) file cannot be read (gmaivl_rt.medical.reader)
    └── ModelError(ValueError)      a model folder cannot serve: weights, config, tokenizer
        └── CheckpointError         a checkpoint folder cannot be loaded (gmaivl_rt.model.checkpoint)

Every message names the input by its role ("image 1", "question", "max_new_tokens") and the problem, stays short,
and never carries the input's bytes, its text beyond a short prefix, or a DICOM header value.
"""
from __future__ import annotations


class GmaivlError(Exception):
    """Base of every error gmaivl-rt raises on purpose."""


class InputError(GmaivlError, ValueError):
    """A request's input is unusable: bad image, question, messages or generation parameter."""


class LimitError(InputError):
    """A request is over a configured limit (context, pixels, bytes, characters, new tokens)."""


class ModelError(GmaivlError, ValueError):
    """A model folder that cannot serve: weights, config or tokenizer missing, unreadable or corrupt."""
