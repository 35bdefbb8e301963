"""`gmaivl-rt ask --json-schema FILE | --choice ... | --regex ...` says what `ask(json_schema=..., choice=...,
regex=...)` says (the CLI and the Python API take the same constraint); its errors are one line, exit status 2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("llguidance", reason="structured output needs the grammar engine: pip install 'gmaivl-rt[structured]'")
jsonschema = pytest.importorskip("jsonschema")

import gmaivl_rt  # noqa: E402
from gmaivl_rt.cli import main  # noqa: E402

SCHEMA_FILE = Path(__file__).parents[2] / "examples" / "findings.schema.json"
TEXTS = ["What modality is this image?", "A CT scan.", "axial coronal sagittal", "{\"plane\": \"axial\"}"] * 20


@pytest.fixture(scope="module")
def folder(tiny_model_folder):
    return tiny_model_folder(TEXTS, "ask_structured")


def test_cli_constraints_say_what_the_api_says(folder, capsys):
    """Mutant: `_constraint_options` not merged into the generation options (prose printed)."""
    api = gmaivl_rt.load(folder)
    sampled = ["--do-sample", "--temperature", "1.0", "--seed", "5", "--max-new-tokens", "160"]
    for flags, options in [(["--json-schema", str(SCHEMA_FILE)], {"json_schema": json.loads(SCHEMA_FILE.read_text())}),
                           (["--choice", "axial", "coronal", "sagittal"], {"choice": ["axial", "coronal", "sagittal"]}),
                           (["--regex", "[0-9]{2} mm"], {"regex": "[0-9]{2} mm"})]:
        assert main(["ask", str(folder), "--question", "Which plane?", *sampled, *flags]) == 0
        printed = capsys.readouterr().out.strip()
        assert printed == api.ask("Which plane?", do_sample=True, temperature=1.0, seed=5, max_new_tokens=160,
                                  **options)
    jsonschema.validate(json.loads(api.ask("Which plane?", json_schema=json.loads(SCHEMA_FILE.read_text()),
                                           max_new_tokens=160)), json.loads(SCHEMA_FILE.read_text()))


@pytest.mark.parametrize("flags, message", [
    (["--json-schema", "/nonexistent/schema.json"], "--json-schema: the file cannot be read"),
    (["--choice", "a", "--regex", "b"], "not choice and regex"),
    (["--regex", "(ab"], "regex cannot be compiled"),
])
def test_cli_constraint_errors_are_one_line(folder, capsys, flags, message, tmp_path):
    assert main(["ask", str(folder), "--question", "Which plane?", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gmaivl-rt ask: error:") and message in err and len(err.splitlines()) == 1, err
