"""GMAI-VL's three-stage training recipe on our model and kernels (see `recipe` for the loop)."""
from .recipe import train

__all__ = ["train"]
