"""Why `kernels/`, `train/` and `export/` never answer to their bare names.

The design card puts those three folders at the top of the checkout, and they are installed as `gmaivl_rt.kernels`,
`gmaivl_rt.train` and `gmaivl_rt.export` (`gmaivl_rt/kernels` etc. are links to them). But Python started in the
checkout root (`python -m pytest`, `python -c`, `python -m gmaivl_rt.cli`, an interactive `python`) puts the root
first on `sys.path`, where the folders also look like top-level packages named `kernels`, `train` and `export`.
Those are import names of other distributions: transformers imports Hugging Face's `kernels` when it loads. So each
folder's `__init__.py` calls `hand_over` when it is imported by its bare name: the installed distribution of that
name takes the name, or the import fails as it would outside the checkout. Standard library only: this runs in the
middle of another package's import (transformers'), before anything of ours may load.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def hand_over(name: str, init_file: str) -> None:
    """Replace `sys.modules[name]` (a top-level folder of the checkout imported by its bare `name`) with the
    installed package of that name, found on `sys.path` without the checkout root; ModuleNotFoundError if none."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != checkout]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    if spec is None or spec.loader is None:
        del sys.modules[name]
        raise ModuleNotFoundError(
            f"No module named {name!r} (the checkout's {name}/ folder is gmaivl_rt.{name}, not {name!r})", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # importlib returns whatever sys.modules holds for the name once this file finishes
    spec.loader.exec_module(module)
