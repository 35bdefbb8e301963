"""The command line reports bad input as one clear line (exit 2) instead of a traceback."""
from gmaivl_rt import GMAIVL, GMAIVLConfig
from gmaivl_rt.cli import main


def test_truncated_checkpoint_is_one_clear_line(tmp_path, capsys):
    GMAIVL(GMAIVLConfig.preset("tiny")).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert main(["ask", str(tmp_path), "--question", "Which modality?"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gmaivl-rt ask: error: ") and "truncated" in err and "Traceback" not in err


def test_missing_folder(tmp_path, capsys):
    assert main(["ask", str(tmp_path / "nowhere"), "--question", "?"]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("GMAIVL_DEBUG", "1")
    try:
        main(["ask", str(tmp_path / "nowhere"), "--question", "?"])
    except FileNotFoundError:
        return
    raise AssertionError("GMAIVL_DEBUG=1 should re-raise")


def test_missing_optional_package_names_the_extra(tmp_path, capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else real_find_spec(name, *a))
    assert main(["export", "onnx", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "onnxscript not installed: pip install 'gmaivl-rt[onnx]'" in capsys.readouterr().err


def _long_options(parser, prefix):
    """(command, --option) for every long option of `parser` and of its subcommands, eval's own parsers included."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _long_options(sub, f"{prefix} {name}")
        else:
            yield from ((prefix, o) for o in action.option_strings if o.startswith("--") and o != "--help")


def test_readme_names_every_command_and_option():
    """The CLI and the docs say the same things: each `gmaivl-rt` subcommand appears as `gmaivl-rt NAME` and each
    long option somewhere in README.md or a page of docs/ (all of docs/*.md, read as one text). (A README edit once
    dropped the whole Serving section unnoticed; an option added without a word in the docs fails here too.)"""
    import argparse
    from pathlib import Path

    from gmaivl_rt import cli
    from gmaivl_rt.eval.cli import compare_parser, merge_parser, run_parser, score_parser

    root = Path(__file__).resolve().parents[2]
    pages = sorted((root / "docs").glob("*.md"))
    assert len(pages) >= 10  # the reference pages: architecture, kernels, data, training, export, runtime, ...
    docs_text = "\n".join(path.read_text() for path in [root / "README.md", *pages])
    parser = argparse.ArgumentParser(prog="gmaivl-rt")
    subcommands = parser.add_subparsers(dest="command")
    for register in cli._registrars():
        register(subcommands)
    assert len(subcommands.choices) >= 8  # ask, data, demo, eval, export, kernels, serve, tokenizer, train, ...
    missing = [name for name in subcommands.choices if f"gmaivl-rt {name}" not in docs_text]
    options = [*_long_options(parser, "gmaivl-rt"), *_long_options(run_parser(), "gmaivl-rt eval"),
               *_long_options(score_parser(), "gmaivl-rt eval score"),
               *_long_options(merge_parser(), "gmaivl-rt eval merge"),
               *_long_options(compare_parser(), "gmaivl-rt eval compare")]
    missing += [f"{command} {option}" for command, option in options if option not in docs_text]
    assert not missing, f"neither README.md nor docs/*.md mentions: {missing}"
