"""gmaivl-rt: a Triton-kernel-optimized runtime and trainer for GMAI-VL-style medical vision-language models."""
__version__ = "0.1.0"
