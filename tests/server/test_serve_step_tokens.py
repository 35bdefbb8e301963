"""`gmaivl-rt serve --max-step-tokens N` says what `Engine(max_step_tokens=N)` says (chunked prefill; the engine's
behaviour is tested in tests/engine/test_engine_chunked.py)."""
import pytest

from gmaivl_rt.cli import main


@pytest.mark.parametrize("flags, message", [
    (["--max-batch-size", "4", "--max-step-tokens", "2"], "max_step_tokens (2) must be >= max_batch_size (4)"),
    (["--backend", "onnx", "--max-step-tokens", "64"], "max_step_tokens (chunked prefill) needs the torch backend")])
def test_serve_refuses_a_bad_step_budget_before_loading_the_model(tmp_path, capsys, flags, message):
    """The flag reaches the engine, whose check runs before the (here missing) model folder is read: exit 2 and
    one line naming the budget.
    Mutant (seen failing): the flag not passed to the engine (the missing folder's error instead)."""
    pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, prometheus_client) is not installed")
    assert main(["serve", str(tmp_path / "missing"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
