"""The house plan is checked, not just drawn: import-linter's contracts (pyproject.toml [tool.importlinter]) pass on
the package as it is, and fail, naming the import, once a lower layer imports a higher one or a cycle appears.

Each case runs `lint-imports` on a copy of the package (links followed, so kernels/, train/ and export/ come along
under gmaivl_rt/) in a temporary folder that Python finds first."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


@pytest.fixture
def package_copy(tmp_path):
    if not LINT.exists():
        pytest.skip("lint-imports is not installed (pip install 'gmaivl-rt[test]')")
    shutil.copytree(ROOT / "gmaivl_rt", tmp_path / "gmaivl_rt", symlinks=False,
                    ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _lint(folder: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(folder)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + "\n" + line + "\n")


def test_the_package_keeps_every_contract(package_copy):
    run = _lint(package_copy)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "BROKEN" not in run.stdout and run.stdout.count("KEPT") >= 3


@pytest.mark.parametrize("module, line, broken", [
    ("model/config.py", "import gmaivl_rt.runtime.request  # noqa", "gmaivl_rt.model is not allowed to import gmaivl_rt.runtime"),
    ("kernels/rope.py", "import gmaivl_rt.model.modeling  # noqa", "gmaivl_rt.kernels is not allowed to import gmaivl_rt.model"),
    ("eval/scoring.py", "import gmaivl_rt.engine.engine  # noqa", "gmaivl_rt.eval is not allowed to import gmaivl_rt.engine"),
    ("runtime/batching.py", "import gmaivl_rt.runtime.request  # noqa", "No cycles are allowed in gmaivl_rt.runtime"),
])
def test_an_upward_import_or_a_cycle_breaks_a_contract(package_copy, module, line, broken):
    _append(package_copy / "gmaivl_rt" / module, line)
    run = _lint(package_copy)
    assert run.returncode != 0
    assert broken in run.stdout, run.stdout[-3000:]
