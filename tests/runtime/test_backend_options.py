"""--backend / --device / --dtype: one definition (`runtime.add_backend_options` / `backend_options`) that `ask`,
`serve` and `eval` share, and where each backend says it runs (`placement`, read from the model's weights or from
ONNX Runtime's own session, and recorded in the evaluation's run.json)."""
import json

import pytest
import torch

import gmaivl_rt
from gmaivl_rt.cli import main
from gmaivl_rt.errors import InputError
from gmaivl_rt.eval import evaluate

@pytest.fixture(scope="module")
def onnx_dir(colour_model_dir, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from gmaivl_rt.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("onnx")
    export_onnx(colour_model_dir, out)
    return out


def test_eval_dtype_reaches_the_model_as_the_python_api_passes_it(colour_model_dir, colour_bench_file, tmp_path):
    """`eval --dtype bf16` runs the model in bf16 (read back from its weights into run.json) and predicts what
    `evaluate(..., dtype=torch.bfloat16)` predicts. Mutants: the eval CLI not passing `backend_options` (fp32
    weights), `DTYPE_NAMES` bf16 -> float16, `placement` reading a fixed dtype."""
    assert main(["eval", str(colour_model_dir), "--data", str(colour_bench_file), "--out", str(tmp_path / "cli"), "--dtype", "bf16",
                 "--batch-size", "3", "--no-progress"]) == 0
    run = json.loads((tmp_path / "cli" / "run.json").read_text())
    assert run["placement"] == {"device": "cpu", "dtype": "bfloat16"}
    api_scores = evaluate(colour_model_dir, colour_bench_file, tmp_path / "api", batch_size=3, progress=False,
                          dtype=torch.bfloat16)
    assert json.loads((tmp_path / "cli" / "scores.json").read_text()) == api_scores
    as_stored = gmaivl_rt.load(colour_model_dir).placement
    assert as_stored == {"device": "cpu", "dtype": "float32"}  # without --dtype the checkpoint's own dtype


def test_dtype_is_refused_for_graph_backends(onnx_dir, colour_bench_file, tmp_path, capsys, monkeypatch):
    """A graph backend runs the dtype it was exported in: `--dtype` with it is an error naming the option, for
    `eval` and `serve` alike, before anything loads (one parser, one rule). Mutants: the refusal dropped, `serve`
    not calling `backend_options` (the server's run is intercepted, so such a server fails instead of serving)."""
    pytest.importorskip("fastapi")
    from gmaivl_rt.server import hosting

    def started(config):
        raise AssertionError("serve started a server despite --dtype with the onnx backend")

    monkeypatch.setattr(hosting, "serve_until_stopped", started)
    assert main(["eval", str(onnx_dir), "--backend", "onnx", "--dtype", "bf16", "--data", str(colour_bench_file),
                 "--out", str(tmp_path / "out")]) == 2
    assert "--dtype applies to the torch backend only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["serve", str(onnx_dir), "--backend", "onnx", "--dtype", "fp16"]) == 2
    assert "--dtype applies to the torch backend only" in capsys.readouterr().err


def test_onnx_device_chooses_ort_providers(onnx_dir):
    """`device` for the onnx backend maps to ONNX Runtime providers, checked against the providers the session
    itself reports; a CUDA device without onnxruntime-gpu is refused (not silently run on the CPU)."""
    import onnxruntime as ort

    from gmaivl_rt.runtime.ort_backend import OnnxBackend

    assert gmaivl_rt.load(onnx_dir, backend="onnx", device="cpu").placement == {
        "device": "CPUExecutionProvider", "dtype": "float32"}
    with pytest.raises(InputError, match="cpu, cuda or cuda:N"):
        OnnxBackend(onnx_dir, device="gpu0")
    with pytest.raises(InputError, match="cpu, cuda or cuda:N"):
        OnnxBackend(onnx_dir, device="cuda:first")
    with pytest.raises(TypeError, match="providers or device"):
        OnnxBackend(onnx_dir, device="cpu", providers=["CPUExecutionProvider"])
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert OnnxBackend(onnx_dir, device="cuda:0").placement["device"] == "CUDAExecutionProvider"
    else:
        with pytest.raises(InputError, match="onnxruntime-gpu"):
            OnnxBackend(onnx_dir, device="cuda")


def test_serve_dtype_reaches_the_engines_model(colour_model_dir, monkeypatch):
    """`serve --dtype bf16`: the engine behind the app uvicorn would run holds bf16 weights (the server's run is
    intercepted). Mutant: `serve` building its Engine without `backend_options`."""
    pytest.importorskip("fastapi")
    from gmaivl_rt.server import hosting

    seen = {}
    monkeypatch.setattr(hosting, "serve_until_stopped",
                        lambda config: seen.update(config.app.state.engine.backend.placement))
    assert main(["serve", str(colour_model_dir), "--dtype", "bf16", "--device", "cpu", "--max-batch-size", "1"]) == 0
    assert seen == {"device": "cpu", "dtype": "bfloat16"}


def _spinning(session) -> tuple[str, str]:
    options = session.get_session_options()  # read back from ONNX Runtime's own session (InferenceSession._sess)
    return tuple(options.get_session_config_entry(f"session.{pool}.allow_spinning") for pool in ("intra_op", "inter_op"))


def test_onnx_sessions_do_not_spin_unless_asked(onnx_dir):
    """Every session the onnx backend builds (all three graphs) has ONNX Runtime's spin-waiting off by default, read
    back from the session itself: spinning threads slow the torch work and Python that run next on a small CPU
    (issue 29). `allow_spinning=True` turns it back on; thread counts reach the session; bad values are refused by
    role. Mutants seen failing: `session_options` or `OnnxBackend` default allow_spinning=True; "0" written as "1"; the
    inter-op entry dropped; OnnxBackend building its own SessionOptions instead of `session_options` (the readback
    raises: no entry); `inter_op_threads` not passed on."""
    from gmaivl_rt.runtime.ort_backend import OnnxBackend, session_options

    helper_default = session_options()
    assert [helper_default.get_session_config_entry(f"session.{pool}.allow_spinning")
            for pool in ("intra_op", "inter_op")] == ["0", "0"]
    default = gmaivl_rt.load(onnx_dir, backend="onnx", device="cpu")
    assert sorted(default.graphs) == ["decoder_model_merged", "embed_tokens", "vision_encoder"]
    for graph in default.graphs.values():
        assert _spinning(graph.session) == ("0", "0"), graph.name
    spinning = OnnxBackend(onnx_dir, device="cpu", threads=1, inter_op_threads=1, allow_spinning=True)
    for graph in spinning.graphs.values():
        assert _spinning(graph.session) == ("1", "1"), graph.name
        options = graph.session.get_session_options()
        assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    with pytest.raises(InputError, match="inter_op_threads must be an int"):
        session_options(inter_op_threads=-1)
    with pytest.raises(InputError, match="allow_spinning must be a bool"):
        session_options(allow_spinning="no")
