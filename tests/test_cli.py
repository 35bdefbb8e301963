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
