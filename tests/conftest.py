"""Test-wide set-up and the fixtures every layer shares: the tiny model folder, the transformers-made checkpoint and
its ONNX exports, the CLI (in a child process or in this one) and child processes. Plain helper functions live in
tests/support/ (on pytest's pythonpath). The Triton interpreter must be switched on before triton is first
imported."""
import os
import shlex
import signal
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the engine's compiled decode step is on by default on the CPU too, and warms up every bucket as an engine starts
# (11-88 s here): the suite's many engines decode eagerly (the reference); tests/engine/test_engine_compiled.py asks
# for the compiled step itself and tests the default
os.environ.setdefault("GMAIVL_COMPILE", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def triton_path(monkeypatch):
    """Force the Triton kernels (interpreted on CPU) for the duration of a test."""
    monkeypatch.setenv("GMAIVL_KERNELS", "triton")


@pytest.fixture
def torch_path(monkeypatch):
    """Force the PyTorch references for the duration of a test."""
    monkeypatch.setenv("GMAIVL_KERNELS", "torch")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


CLI = [sys.executable, "-m", "gmaivl_rt.cli"]


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


class Child:
    """A command a test starts and later kills or waits for (`python -m gmaivl_rt.cli ...` by default). Its stderr
    goes to a file, so a child that died before the test was done with it is reported by its exit code and the tail
    of its stderr (`why()`), not by whatever the test tried next (`os.kill` of a dead pid, a missing file)."""

    def __init__(self, args, *, stderr_file, command=CLI, **popen):
        self.stderr_file = stderr_file
        self._stderr = open(stderr_file, "w")
        popen.setdefault("stdout", subprocess.DEVNULL)
        self.process = subprocess.Popen([*command, *map(str, args)], stderr=self._stderr, **popen)
        self.pid = self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def why(self) -> str:
        self._stderr.flush()
        return (f"the child exited with code {self.process.poll()}; its stderr ends with:\n"
                f"{tail(open(self.stderr_file).read())}")

    def kill(self, group: bool = False) -> None:
        """SIGKILL the child (its process group with `group`), failing with `why()` if it was already dead."""
        assert self.alive(), self.why()
        (os.killpg if group else os.kill)(self.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def close(self) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait(timeout=30)
        self._stderr.close()


@pytest.fixture
def start_child(tmp_path_factory):
    """start_child(args, **popen) -> Child; every child still running at the end of the test is killed."""
    children = []

    def start(args, **popen):
        log = tmp_path_factory.mktemp("child") / "stderr.txt"
        children.append(Child(args, stderr_file=log, **popen))
        return children[-1]

    yield start
    for child in children:
        child.close()


def run_cli(args, *, expect: int | None = 0, **kwargs) -> subprocess.CompletedProcess:
    """`python -m gmaivl_rt.cli ARGS` to the end; with `expect`, a different exit code fails the test with the
    tail of the child's stderr."""
    kwargs.setdefault("timeout", 600)
    run = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, **kwargs)
    if expect is not None:
        assert run.returncode == expect, f"exit code {run.returncode}; stderr ends with:\n{tail(run.stderr)}"
    return run


@pytest.fixture
def cli():
    """The `run_cli` function, for tests that run the CLI in a child process."""
    return run_cli


@pytest.fixture
def cli_in_process(capsys):
    """cli_in_process(*argv) -> str: `gmaivl-rt ARGV` run in this process (the CLI's main(argv)), its stdout; an
    exit code other than 0 fails the test with the command and the tail of its output."""
    from gmaivl_rt.cli import main

    def run(*argv) -> str:
        code = main([str(a) for a in argv])
        printed = capsys.readouterr()
        assert code == 0, f"gmaivl-rt {shlex.join(map(str, argv))}\n{printed.out[-2000:]}\n{printed.err[-2000:]}"
        return printed.out

    return run


# ------------------------------------------------------------------------------- model folders and their exports
@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory):
    """tiny_model_folder(texts, name="tiny_model", vocab_size=300, seed=0, **config) -> Path: a new folder with a
    `tiny`-preset model (random weights, seeded) and a BPE tokenizer trained on `texts`; `config` holds
    GMAIVLConfig.replace fields (e.g. vision={"dynamic_resolution": True}). Built by
    train_fixtures.make_tiny_chat_model, which bench/ calls directly."""
    from train_fixtures import make_tiny_chat_model

    def make(texts, name: str = "tiny_model", **options) -> Path:
        return make_tiny_chat_model(tmp_path_factory.mktemp(name), texts, **options)

    return make


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory) -> Path:
    """A Llava checkpoint transformers made and saved (tiny CLIP + Llama with grouped-query attention), made once
    per session: the independent reference of the model, export and runtime tests."""
    from hf_reference import make_hf_llava

    path = tmp_path_factory.mktemp("hf_llava")
    make_hf_llava(path)
    return path


@pytest.fixture(scope="session")
def dynamic_checkpoint(hf_checkpoint, tmp_path_factory) -> Path:
    """hf_checkpoint's weights with native dynamic resolution switched on (GMAIVL's own config extension)."""
    from gmaivl_rt import GMAIVL

    model = GMAIVL.from_pretrained(hf_checkpoint)
    model.config = model.config.replace(vision={"dynamic_resolution": True})
    path = tmp_path_factory.mktemp("hf_llava_dynamic")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def exported(hf_checkpoint, dynamic_checkpoint, tmp_path_factory):
    """exported(variant) -> Path: an ONNX export folder, made on first use and shared by the whole session (an
    export takes several seconds). variant: "fp32", "fp16" (all three graphs), "dynamic" (fp32, dynamic-resolution
    checkpoint), "plugin" (fp16 vision encoder with the TensorRT attention plugin node)."""
    made: dict[str, Path] = {}

    def export(variant: str) -> Path:
        if variant in made:
            return made[variant]
        from gmaivl_rt.export.onnx_export import export_onnx

        if variant not in ("fp32", "fp16", "dynamic", "plugin"):
            raise ValueError(variant)
        out = tmp_path_factory.mktemp(f"onnx_{variant}")
        if variant in ("fp32", "fp16"):
            export_onnx(hf_checkpoint, out, dtype=variant)
        elif variant == "dynamic":
            export_onnx(dynamic_checkpoint, out)
        else:
            export_onnx(hf_checkpoint, out, dtype="fp16", attention="trt_plugin", graphs=("vision_encoder",))
        made[variant] = out
        return out

    return export


# ------------------------------------------------------------------ a colour-question benchmark and a model for it
COLOUR_TEXTS = ["<image>\nWhich colour is the image?\nA. red\nB. green\nC. blue\nD. grey\nAnswer with the option's "
                "letter from the given choices directly.", "A", "B", "C", "D", "The answer is B.",
                "red green blue grey"] * 20


@pytest.fixture(scope="session")
def colour_model_dir(tiny_model_folder):
    """A tiny model whose tokenizer knows the colour benchmark's words (random weights: answers are arbitrary but
    deterministic, which is what the evaluation plumbing tests compare)."""
    return tiny_model_folder(COLOUR_TEXTS, "colour_model")


@pytest.fixture(scope="session")
def colour_bench_file(tmp_path_factory):
    """A VLMEvalKit-style TSV of 8 multiple-choice colour questions (eval_fixtures.colour_benchmark)."""
    from eval_fixtures import colour_benchmark

    return colour_benchmark(tmp_path_factory.mktemp("colour_bench") / "colours.tsv", count=8)


# ------------------------------------------------------------------------------------------------ the browser
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def _browser_missing() -> str | None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        return (f"headless browser test: {' and '.join(missing)} not installed (`make test` installs Debian's "
                "chromium and chromium-driver when run as root on an apt machine)")
    return None


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium (selenium), closed after the test; skips, saying why, where it is not installed. Used by
    the server page tests and the in-browser export page test."""
    reason = _browser_missing()
    if reason:
        pytest.skip(reason)
    webdriver = pytest.importorskip("selenium.webdriver", reason="headless browser test: selenium not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 "--disable-sync", "--window-size=1200,900", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
