"""The `gmaivl-rt` command line. Each subcommand is a thin layer over the Python API of the same name."""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gmaivl-rt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    # Subcommands register themselves here (see `_register`); each sets `func`.
    for register in _registrars():
        register(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, NotADirectoryError, ImportError) as error:
        # Bad input (a corrupt checkpoint, a wrong path, a missing optional package): one clear line, no traceback,
        # unless GMAIVL_DEBUG=1 asks for it.
        if os.environ.get("GMAIVL_DEBUG", "0") not in ("", "0"):
            raise
        print(f"gmaivl-rt {args.command}: error: {error}", file=sys.stderr)
        return 2


def _registrars():
    """Collect `register(subparsers)` functions from the modules that own each subcommand."""
    import importlib

    found = []
    for module in ("gmaivl_rt.kernels.report", "gmaivl_rt.data.cli", "gmaivl_rt.train.cli",
                   "gmaivl_rt.export.cli", "gmaivl_rt.runtime.cli", "gmaivl_rt.demo", "gmaivl_rt.server.cli",
                   "gmaivl_rt.eval.cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:  # not written yet
                continue
            raise
        found.append(mod.register)
    return found


if __name__ == "__main__":
    sys.exit(main())
