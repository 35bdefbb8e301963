"""`export onnx --layout transformers.js` and `--quantize`, checked by transformers.js itself under Node.

The independent side is transformers.js 4.3 (npm, `js/package-lock.json`) with onnxruntime-node's CPU binaries: it
loads the folder as a user does (AutoProcessor + LlavaForConditionalGeneration, local files only, js/answer.mjs)
and answers the same questions about the same pictures as our onnx backend (fp32: the same tokens) and as the
fp32 torch model (quantized variants: the agreement the export's report claims). Pictures are PNGs at the model's
square size, so the two image processors see the same pixels. Skipped, with the reason, where node or js/node_modules
(`make js`, i.e. `npm ci` in js/) are missing.
"""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from gmaivl_rt.errors import ModelError
from gmaivl_rt.export import quantize as q
from gmaivl_rt.export.onnx_export import export_onnx
from gmaivl_rt.export.transformers_js import REPORT_JSON, export_transformers_js, keep_last_logits
from gmaivl_rt.runtime.backends import load
from gmaivl_rt.runtime.deploy_format import GRAPH_FILES, past_names

ROOT = Path(__file__).resolve().parents[2]
JS = ROOT / "js"
QUESTIONS = ["Which colour is the image?", "What is shown?", "Is it red or blue?", "Describe the picture."]
MAX_NEW = 12
LOOSE = {v: 0.0 for v in q.VARIANTS}
# Uncompressed greyscale DICOMs pydicom ships: CT (named window), non-square MR (file window, 2 values), MR big
# endian and implicit VR, 32-bit RT dose (percentiles); and files the page refuses (compressed, 1-bit).
SHIPPED_DICOM = ("CT_small.dcm", "examples_overlay.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
                 "rtdose_1frame.dcm", "MR_small.dcm")
REFUSED_DICOM = ("JPGExtended.dcm", "liver_1frame.dcm")
# Compressed greyscale DICOMs pydicom ships that the page decodes (RLE in JavaScript, JPEG 2000 by OpenJPEG, JPEG-LS
# by CharLS, WebAssembly): 16- and 32-bit RLE (one frame and the first of 15), J2K lossless and lossy (one whose
# codestream's signedness differs from PixelRepresentation), JPEG-LS lossless and near-lossless (8 and 16 bits).
COMPRESSED_DICOM = ("MR_small_RLE.dcm", "rtdose_rle_1frame.dcm", "rtdose_rle.dcm", "MR_small_jp2klossless.dcm",
                    "JPEG2000.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm", "MR_small_jpeg_ls_lossless.dcm",
                    "JPEGLSNearLossless_16.dcm", "JPEGLSNearLossless_08.dcm")  # a random tiny model: every variant shipped, its agreement only measured


def _nibabel_file(name: str) -> Path:
    import nibabel

    return Path(nibabel.__file__).parent / "tests" / "data" / name


def _node_missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed (transformers.js runs under Node 20+)"
    if not (JS / "node_modules" / "@huggingface" / "transformers").is_dir():
        return "js/node_modules is missing: run `make js` (npm ci in js/)"
    return None


needs_node = pytest.mark.skipif(_node_missing() is not None, reason=_node_missing() or "")


@pytest.fixture(scope="module")
def model_dir(tiny_model_folder):
    texts = [f"<image>\n{question}" for question in QUESTIONS] + ["red green blue grey picture image"] * 5
    return tiny_model_folder(texts * 10, "tjs_model")


@pytest.fixture(scope="module")
def held_out(model_dir, tmp_path_factory):
    """Seven questions: four random PNGs (28x28, the model's square; 40x24, padded and resized), two DICOMs
    pydicom ships (a CT without a window, a non-square MR with two windows) and a NIfTI nibabel ships."""
    folder = tmp_path_factory.mktemp("tjs_images")
    rng = np.random.default_rng(7)
    items = []
    for i, question in enumerate(QUESTIONS):
        path = folder / f"picture{i}.png"
        shape = (28, 28, 3) if i % 2 == 0 else (24, 40, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        items.append(q.HeldOutItem(question, path))
    items += [q.HeldOutItem(QUESTIONS[0], Path(get_testdata_file(name))) for name in SHIPPED_DICOM[:2]]
    items.append(q.HeldOutItem(QUESTIONS[1], _nibabel_file("example4d.nii.gz")))  # 4D, gzipped, oblique qform
    return items


@pytest.fixture(scope="module")
def tjs_export(model_dir, held_out, tmp_path_factory):
    out = tmp_path_factory.mktemp("tjs_export") / "tiny-gmaivl"
    report = export_transformers_js(model_dir, out, quantize=q.VARIANTS, held_out=held_out, min_agreement=LOOSE,
                                    max_new_tokens=MAX_NEW)
    return out, report


@pytest.fixture(scope="module")
def gmaivl_exports(model_dir, tmp_path_factory):
    """The same model in the onnx backend's own layout: fp32, and each variant quantized as the export does."""
    work = tmp_path_factory.mktemp("tjs_gmaivl")
    export_onnx(model_dir, work / "fp32")
    export_onnx(model_dir, work / "fp16", dtype="fp16")
    folders = {"fp32": work / "fp32"}
    for variant in q.VARIANTS:
        folders[variant] = q.quantize_folder(work / "fp32", work / "fp16", variant, work / variant)
    return folders


@pytest.fixture(scope="module")
def reference(model_dir, held_out) -> list[list[int]]:
    """The fp32 torch model's greedy answers (through the torch backend)."""
    return [a["tokens"] for a in q.reference_answers(model_dir, held_out, MAX_NEW)]


def _node_answers(folder: Path, dtype, items, tmp_path) -> list[list[int]]:
    request = tmp_path / f"request_{dtype}_{len(items)}.json"
    request.write_text(json.dumps({"model": str(folder), "dtype": dtype, "max_new_tokens": MAX_NEW,
                                   "items": [{"question": i.question, "image": str(i.image)} for i in items]}))
    done = subprocess.run(["node", str(JS / "answer.mjs"), str(request)], capture_output=True, text=True,
                          timeout=300, cwd=JS)
    assert done.returncode == 0, done.stderr[-3000:]
    return [a["tokens"] for a in json.loads(done.stdout.splitlines()[-1])["answers"]]


@pytest.fixture(scope="module")
def node_answers(tjs_export, held_out, tmp_path_factory):
    """node_answers(dtype) -> transformers.js' (Node) answers to the held-out items, computed once per dtype."""
    made = {}

    def answers(dtype):
        if dtype not in made:
            made[dtype] = _node_answers(tjs_export[0], dtype, held_out, tmp_path_factory.mktemp("node"))
        return made[dtype]

    return answers


def _backend_answers(folder: Path, items) -> list[list[int]]:
    backend = load(folder, "onnx", generation_config="none")
    answers = []
    for item in items:
        inputs = backend.prepare([{"role": "user", "content": f"<image>\n{item.question}"}], [item.image])
        out = backend.generate(inputs["input_ids"], pixel_values=inputs["pixel_values"],
                               attention_mask=inputs["attention_mask"], max_new_tokens=MAX_NEW, do_sample=False,
                               eos_token_id=backend.eos_token_ids, pad_token_id=backend.config.text.pad_token_id)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        stops = [i for i, t in enumerate(new) if t in backend.eos_token_ids]
        answers.append(new[:stops[0] + 1] if stops else new)
    return answers


# ------------------------------------------------------------------------------------------------- the folder
def test_folder_has_the_files_transformers_js_reads(tjs_export, model_dir):
    out, _ = tjs_export
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava" and config["transformers.js_config"]["dtype"] == "fp32"
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    assert json.loads((out / "processor_config.json").read_text())["image_token"] == "<image>"
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    for variant, suffix in q.SUFFIXES.items():
        for graph in GRAPH_FILES:
            onnx.checker.check_model(str(out / "onnx" / f"{graph}{suffix}.onnx"))
    assert json.loads((out / REPORT_JSON).read_text())["shipped"] == ["fp32", *q.VARIANTS]


@needs_node
def test_transformers_js_answers_as_our_onnx_backend_fp32(node_answers, gmaivl_exports, held_out):
    """The same tokens, question by question, from transformers.js on the exported folder (unmodified) and from our
    onnx backend on `export onnx`'s folder. Mutants seen failing: preprocessor_config without do_normalize;
    processor_config counting the CLS token (num_additional_image_tokens 1: <image> expands to 5 tokens)."""
    js = node_answers("fp32")
    ours = _backend_answers(gmaivl_exports["fp32"], held_out)
    assert js == ours
    assert all(len(a) > 1 for a in ours)


@needs_node
@pytest.mark.parametrize("variant", q.VARIANTS)
def test_transformers_js_runs_quantized_files_as_reported(variant, tjs_export, node_answers, gmaivl_exports, held_out,
                                                         reference):
    """transformers.js with dtype=VARIANT loads the suffixed files and answers as our onnx backend does on the same
    quantized graphs; its answers agree with the fp32 torch model exactly as much as the export's report says (the
    report's number holds where the files are used). Mutants seen failing: q4f16's fp32 interface left out
    (transformers.js feeds float32 pixel_values: refused); the report counting agreement against the variant
    itself; quantize_q4 with block_size ignored for 128 is caught by test_block_sizes_differ."""
    _, report = tjs_export
    js = node_answers(variant)
    assert js == _backend_answers(gmaivl_exports[variant], held_out)
    same = sum(sum(a == b for a, b in zip(got, want)) for got, want in zip(js, reference))
    entry = report["variants"][variant]
    assert entry["tokens"] == sum(map(len, reference))
    assert same / entry["tokens"] == pytest.approx(entry["greedy_agreement"])
    assert entry["greedy_agreement"] >= entry["min_agreement"]


# ------------------------------------------------------------------------------------------ sizes and agreement
def test_report_sizes_and_agreement(tjs_export, gmaivl_exports, held_out, reference):
    """Sizes are the files' own; fp32 ONNX agrees with fp32 torch on every token; 4-bit decoders are about a third
    of fp32 (tiny matrices: the per-block scales weigh more than at 7B); per-position top-1 (teacher-forced on the
    reference) is at least the share of positions before each answer's first divergence, less one token: the
    teacher-forced pass and the greedy answer's step-by-step decode sum in different orders, so one near-tie may
    fall the other way. (The greedy agreement itself also counts positions where an answer meets the reference
    again after diverging, so top-1 may be below it: seen once, 82 against 83 of 84 tokens.) Mutant seen failing:
    top-1 taken from the variant's own greedy tokens (always 1.0 for q4)."""
    _, report = tjs_export
    fp32 = report["variants"]["fp32"]
    assert fp32["greedy_agreement"] == fp32["top1_agreement"] == 1.0 and fp32["exact_answers"] == fp32["answers"]
    for variant, entry in report["variants"].items():
        for graph, file in GRAPH_FILES.items():
            assert entry["bytes"][graph] == (gmaivl_exports[variant] / file).stat().st_size
        answers = _backend_answers(gmaivl_exports[variant], held_out)
        before_divergence = sum(next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                                for got, want in zip(answers, reference))
        assert entry["top1_agreement"] >= (before_divergence - 1) / entry["tokens"] - 1e-9, (variant, entry)
    assert report["variants"]["q4"]["ratio_to_fp32"]["decoder_model_merged"] < 0.35
    assert report["variants"]["q8"]["ratio_to_fp32"]["decoder_model_merged"] < 0.45
    assert report["variants"]["q4"]["top1_agreement"] < 1.0  # a 4-bit random model does move some argmaxes


def test_block_sizes_differ(gmaivl_exports, tmp_path):
    """block 32 and 128 give MatMulNBits nodes with that block_size (read back from the graph).
    Mutant seen failing: block_size not passed to the quantizer."""
    for block in q.BLOCK_SIZES:
        dst = tmp_path / f"decoder_{block}.onnx"
        q.quantize_q4(gmaivl_exports["fp32"] / GRAPH_FILES["decoder_model_merged"], dst, block)
        nodes = [n for n in onnx.load(str(dst)).graph.node if n.op_type == "MatMulNBits"]
        assert nodes
        assert {a.i for n in nodes for a in n.attribute if a.name == "block_size"} == {block}


def test_num_logits_to_keep_selects_the_last_positions(exported):
    """The rewritten decoder with num_logits_to_keep = 0 / 2 returns the logits the original returns for
    logits_indices = every position / the last two. Mutants seen failing: start = 0 (every position kept: the
    Node test cannot see it, transformers.js reads the last row either way); Where's branches swapped."""
    folder = exported("fp32")
    original = onnx.load(str(folder / GRAPH_FILES["decoder_model_merged"]))
    rewritten = onnx.load(str(folder / GRAPH_FILES["decoder_model_merged"]))
    keep_last_logits(rewritten)
    run_a = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    run_b = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"])
    deploy = json.loads((folder / "gmaivl_deploy.json").read_text())["decoder"]
    rng = np.random.default_rng(0)
    batch, seq = 2, 5
    feeds = {"inputs_embeds": rng.standard_normal((batch, seq, deploy["hidden_size"])).astype(np.float32),
             "attention_mask": np.ones((batch, seq), np.int64),
             "position_ids": np.broadcast_to(np.arange(seq), (batch, seq)).astype(np.int64)}
    empty = np.zeros((batch, deploy["num_kv_heads"], 0, deploy["head_dim"]), np.float32)
    feeds.update({n: empty for n in past_names(deploy["num_layers"])})
    for keep, indices in ((0, np.arange(seq)), (2, np.arange(seq - 2, seq))):
        want = run_a.run(["logits"], {**feeds, "logits_indices": np.broadcast_to(indices, (batch, len(indices)))
                                      .astype(np.int64)})[0]
        got = run_b.run(["logits"], {**feeds, "num_logits_to_keep": np.array(keep, np.int64)})[0]
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------------- graphs over 2 GB
CHUNK_LIMIT = 50_000  # stands for protobuf's 2 GB (onnx_export.EXTERNAL_DATA_BYTES): the tiny model's fp32 decoder
# holds 372 kB of weights, its q4 decoder 58 kB (tensors of at most 77 kB and 10 kB)


def _transformers_js_chunk_files(config: dict, files: list[str]) -> dict[str, list[str]]:
    """transformers.js' own answer (its model-loader.js, under Node) to which external data files it fetches for
    each .onnx file, given config.json's use_external_data_format."""
    loader = JS / "node_modules" / "@huggingface" / "transformers" / "src" / "utils" / "model-loader.js"
    script = (f"const m = await import({json.dumps(loader.as_uri())});"
              f"const config = {json.dumps(config)}; const out = {{}};"
              f"for (const f of {json.dumps(files)}) out[f] = m.getExternalDataChunkNames(f, "
              "m.resolveExternalDataFormat(config, f, f.replace(/(_quantized|_q4f16|_q4)?\\.onnx$/, '')));"
              "process.stdout.write(JSON.stringify(out));")
    done = subprocess.run(["node", "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60,
                          cwd=JS)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@needs_node
def test_graphs_over_the_limit_load_in_transformers_js_from_chunks(model_dir, held_out, monkeypatch, tmp_path):
    """Graphs whose weights exceed the external-data limit (lowered to 100 kB here, standing for protobuf's 2 GB) are
    written with their weights in external data chunks of at most that size (a browser fetches each into one
    ArrayBuffer), under the names transformers.js' own loader asks for given config.json's
    `use_external_data_format` (its model-loader.js, run under Node, lists exactly the files on disk); each .onnx
    holds no weights (tensors under 1 kB stay inline, as `export onnx` leaves them); transformers.js under Node answers from them with the tokens of the self-contained export, fp32
    and q4. Mutants seen failing: use_external_data_format left false (the loader asks for no files); chunks named
    `.data` as export onnx names them; no new chunk started at the limit (one file); never chunked. Survives:
    quantize._over_limit always False (the q4 graph saved inline before the layout re-chunks it: equivalent at this
    size; at real size the inline save would fail)."""
    from gmaivl_rt.export import onnx_export

    inline = tmp_path / "inline"
    export_transformers_js(model_dir, inline, quantize=("q4",), held_out=held_out[:1], min_agreement=LOOSE,
                           max_new_tokens=MAX_NEW)
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", CHUNK_LIMIT)
    out = tmp_path / "chunked"
    export_transformers_js(model_dir, out, quantize=("q4",), held_out=held_out[:1], min_agreement=LOOSE,
                           max_new_tokens=MAX_NEW)
    config = json.loads((out / "config.json").read_text())["transformers.js_config"]
    graphs = sorted(p.name for p in (out / "onnx").glob("*.onnx"))
    asked = _transformers_js_chunk_files(config["use_external_data_format"], graphs)
    on_disk = sorted(p.name for p in (out / "onnx").iterdir() if not p.name.endswith(".onnx"))
    assert sorted(name for names in asked.values() for name in names) == on_disk
    assert len(asked["decoder_model_merged.onnx"]) >= 2 and asked["decoder_model_merged_q4.onnx"]
    for graph, names in asked.items():
        model = onnx.load(str(out / "onnx" / graph), load_external_data=False)
        assert max((len(t.raw_data) for t in model.graph.initializer), default=0) < 1024  # the weights are outside
        tensors_in = {name: 0 for name in names}
        for tensor in model.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                tensors_in[next(e.value for e in tensor.external_data if e.key == "location")] += 1
        for name, count in tensors_in.items():  # only a tensor over the limit by itself makes a bigger file
            assert count == 1 or (out / "onnx" / name).stat().st_size <= CHUNK_LIMIT, name
    assert not list((inline / "onnx").glob("*_data*"))
    for dtype in ("fp32", "q4"):
        want = _node_answers(inline, dtype, held_out[:3], tmp_path)
        assert _node_answers(out, dtype, held_out[:3], tmp_path) == want, dtype


# -------------------------------------------------------------------------------------------------- bad input
def test_refuses_what_transformers_js_cannot_run(dynamic_checkpoint, model_dir, tmp_path):
    """A dynamic-resolution checkpoint without a tokenizer, and a text config transformers.js has no mapping for
    (InternLM2), are refused with every reason, before anything is written."""
    with pytest.raises(ModelError) as refused:
        export_transformers_js(dynamic_checkpoint, tmp_path / "a")
    assert "dynamic resolution" in str(refused.value) and "tokenizer.json" in str(refused.value)
    internlm = tmp_path / "internlm"
    shutil.copytree(model_dir, internlm)
    config = json.loads((internlm / "config.json").read_text())
    config["text_config"]["model_type"] = "internlm2"
    (internlm / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="'internlm2' has no transformers.js config mapping"):
        export_transformers_js(internlm, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_reports_and_leaves_out_a_variant_below_its_threshold(cli, model_dir, held_out, tmp_path):
    """`--min-agreement q4=1.0` on a model whose q4 answers differ: the table names q4 REJECTED, exit status 1,
    no *_q4.onnx written, the fp32 files are. Mutant seen failing: rejected variants written anyway."""
    agreement_set = tmp_path / "held_out.jsonl"
    agreement_set.write_text("\n".join(json.dumps({"question": i.question, "image": str(i.image)})
                                       for i in held_out))
    out = tmp_path / "web"
    done = cli(["export", "onnx", str(model_dir), "--out", str(out), "--layout", "transformers.js",
                "--quantize", "q4", "--min-agreement", "q4=1.0", "--agreement-set", str(agreement_set)], expect=1)
    assert "REJECTED" in done.stdout and "q4" in done.stderr
    assert (out / "onnx" / "decoder_model_merged.onnx").is_file()
    assert not list((out / "onnx").glob("*_q4.onnx"))
    assert json.loads((out / REPORT_JSON).read_text())["rejected"] == ["q4"]


def test_cli_refuses_bad_options(cli, model_dir, tmp_path):
    done = cli(["export", "onnx", str(model_dir), "--out", str(tmp_path / "x"), "--layout", "transformers.js",
                "--quantize", "q3"], expect=2)
    assert "--quantize 'q3'" in done.stderr
    done = cli(["export", "onnx", str(model_dir), str(tmp_path / "y"), "--quantize", "q8"], expect=2)
    assert "--layout transformers.js" in done.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ------------------------------------------------------------------------------------------- the in-browser page
class _StaticSite:
    """The site served as static files from 127.0.0.1 on a free port, every request's method, path and body size
    recorded (a thread; stopped by `close`)."""

    def __init__(self, folder: Path):
        import functools
        import threading
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[str, str, int]] = []
        requests = self.requests

        class Handler(SimpleHTTPRequestHandler):
            extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                              ".js": "text/javascript", ".wasm": "application/wasm", ".json": "application/json"}

            def parse_request(self):
                ok = super().parse_request()
                if ok:
                    requests.append((self.command, self.path, int(self.headers.get("Content-Length") or 0)
                                     + bool(self.headers.get("Transfer-Encoding"))))
                return ok

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/index.html"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _wait_for(predicate, seconds: float, what: str):
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


@needs_node
def test_page_answers_in_the_browser_without_sending_the_picture(browser, tjs_export, held_out, node_answers,
                                                                 tmp_path):
    """`export web`'s page in headless Chromium (onnxruntime-web on WebAssembly), the site served as static files
    from 127.0.0.1: each picture chosen in the file input is answered with the tokens transformers.js gives under
    Node (fp32 and q4), and the server sees only GETs without a body: the picture never leaves the browser.
    Mutants seen failing: the page POSTing the file to the server; wasmPaths not set (onnxruntime-web fetches its
    runtime from a CDN, unreachable: no answer)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from gmaivl_rt.export.web import export_web

    site_dir = tmp_path / "site"
    export_web(tjs_export[0], site_dir, max_new_tokens=MAX_NEW)
    site = _StaticSite(site_dir)
    try:
        browser.get(site.url)
        status = lambda: browser.find_element(By.ID, "status").text  # noqa: E731
        _wait_for(lambda: status() == "ready" or status().startswith("error"), 120, "the model to load")
        assert status() == "ready"
        timings = []
        for dtype, items in (("fp32", held_out), ("q4", held_out[:1])):
            Select(browser.find_element(By.ID, "dtype")).select_by_value(dtype)
            for item, want in zip(items, node_answers(dtype)):
                browser.find_element(By.ID, "image").send_keys(str(item.image))
                question = browser.find_element(By.ID, "question")
                question.clear()
                question.send_keys(item.question)
                answer = browser.find_element(By.ID, "answer")
                browser.execute_script("arguments[0].removeAttribute('data-tokens')", answer)
                browser.find_element(By.ID, "ask").click()
                got = _wait_for(lambda: answer.get_attribute("data-tokens") or answer.get_attribute("data-error"),
                                120, f"the page's {dtype} answer")
                assert got == json.dumps(want, separators=(",", ":")), status()
                timings.append(json.loads(answer.get_attribute("data-timing")))
        print("in-browser timings:", timings)
    finally:
        site.close()
    methods = {method for method, _, _ in site.requests}
    assert methods <= {"GET", "HEAD"}, site.requests
    assert all(body == 0 for _, _, body in site.requests), site.requests
    assert any(path.startswith("/model/onnx/decoder_model_merged_q4") for _, path, _ in site.requests)


@needs_node
def test_page_reads_pictures_as_the_python_reader(tmp_path):
    """export/web/medical.mjs (the page's and js/answer.mjs' reader) under Node against gmaivl_rt's readers on the
    shipped DICOMs (uncompressed, and the compressed ones the page decodes: COMPRESSED_DICOM) and a non-square PNG:
    the windowed grey pixels equal `to_medical_image`'s, and the model's input (expand2square + bicubic + CLIP
    normalisation) equals `preprocess_image`'s, exactly. JPEG Extended and 1-bit files are refused with the reason. Mutants seen failing: MONOCHROME2 inverted instead of MONOCHROME1; CT without a
    window stretched by percentiles instead of the named CT window; PIL's filter support not widened when
    shrinking (no antialiasing); expand2square's padding all on the right; a compressed syntax refused without
    its name; RLE segments taken least significant byte first. (numpy's rint -> Math.round survives
    and is equivalent: the only float32 product u * 255 ending in .5 is 127.5, which both round to 128.)"""
    import base64

    import torch

    from gmaivl_rt.medical.convert import to_medical_image
    from gmaivl_rt.model.preprocess import CLIP_MEAN, CLIP_STD, preprocess_image

    side = 28
    pngs = [tmp_path / "wide.png", tmp_path / "tall.png"]
    rng = np.random.default_rng(3)
    for path, shape in zip(pngs, ((17, 45, 3), (45, 17, 3))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    files = [get_testdata_file(n) for n in SHIPPED_DICOM + COMPRESSED_DICOM + REFUSED_DICOM] + [str(p) for p in pngs]
    done = subprocess.run(["node", str(JS / "read_pictures.mjs"), str(side), *files], capture_output=True, text=True,
                          timeout=120, cwd=JS)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)
    for file, got in zip(files, results):
        if Path(file).name in REFUSED_DICOM:
            assert "cannot be read in the browser" in got["error"], got
            continue
        assert "error" not in got, got
        image = to_medical_image(file)
        if "grey" in got:
            grey = np.frombuffer(base64.b64decode(got["grey"]), np.uint8).reshape(got["height"], got["width"])
            np.testing.assert_array_equal(grey, image.pixels[..., 0], err_msg=file)
        rgb = np.frombuffer(base64.b64decode(got["rgb"]), np.uint8).reshape(side, side, 3)
        normalised = ((torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)
                       - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None])
        torch.testing.assert_close(normalised, preprocess_image(image.pixels, side), rtol=0, atol=0)
    assert {r.get("window_name") for r in results} >= {"abdomen", "file", "percentile"}
    jpeg_extended = results[files.index(get_testdata_file("JPGExtended.dcm"))]["error"]
    assert "compressed (JPEG Extended, transfer syntax 1.2.840.10008.1.2.4.51)" in jpeg_extended
    assert all("grey" not in r and "rgb" in r for r in results[-2:])  # PNGs take the ordinary-picture path


def _fragmented(folder: Path) -> dict[str, Path]:
    """Single-frame RLE and JPEG 2000 files with their one frame split over 3 fragments (PS3.5 A.4 allows it; no
    shipped file does it), and the 15-frame RLE file with a basic offset table (the shipped one has none),
    re-encapsulated by pydicom."""
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    made = {}
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        frames = list(generate_frames(ds.PixelData, number_of_frames=1))
        ds.PixelData = encapsulate(frames, fragments_per_frame=3)
        made[f"fragments3_{name}"] = folder / f"fragments3_{name}"
        ds.save_as(made[f"fragments3_{name}"])
    ds = pydicom.dcmread(get_testdata_file("rtdose_rle.dcm"))  # 15 frames, no offset table: give it one
    ds.PixelData = encapsulate(list(generate_frames(ds.PixelData, number_of_frames=15)), has_bot=True)
    made["offset_table_rtdose_rle.dcm"] = folder / "offset_table_rtdose_rle.dcm"
    ds.save_as(made["offset_table_rtdose_rle.dcm"])
    return made


@needs_node
def test_page_decodes_compressed_dicom_in_the_browser(browser, tmp_path):
    """The exported site in headless Chromium decodes the compressed DICOMs pydicom ships (COMPRESSED_DICOM: RLE in
    the page's JavaScript, JPEG 2000 and JPEG-LS by the OpenJPEG and CharLS WebAssembly builds `export web` copies
    into lib/ from js/node_modules): the page's windowed grey pixels equal `read_medical_image`'s exactly, lossy
    J2K and near-lossless JPEG-LS included (pylibjpeg decodes with the same OpenJPEG and CharLS libraries, so no
    tolerance is needed), and so are three of them re-encapsulated (a frame in 3 fragments; an offset table). The decoders'
    .wasm come from the site itself. JPEG Extended stays refused, naming its
    transfer syntax. The site's model is a stand-in (no model needed to read pictures): medical.mjs is imported in
    the page's origin with the decoder globals index.html loads.
    Mutants seen failing: RLE segments taken least significant byte first; PackBits repeat count 1 - n -> -n;
    the J2K decoder's own signedness used instead of PixelRepresentation; the first fragment only of a
    single-frame file; the offset table's second frame; the second fragment of a multi-frame file without one; index.html without the OpenJPEG script tag; export web not copying the .wasm files."""
    import base64

    from selenium.webdriver.common.by import By

    from gmaivl_rt.export.web import export_web
    from gmaivl_rt.medical.reader import read_medical_image

    stand_in = tmp_path / "model"
    (stand_in / "onnx").mkdir(parents=True)
    (stand_in / "config.json").write_text(json.dumps({"transformers.js_config": {}}))
    for graph in ("embed_tokens", "vision_encoder", "decoder_model_merged"):
        (stand_in / "onnx" / f"{graph}.onnx").write_bytes(b"")
    site_dir = tmp_path / "site"
    export_web(stand_in, site_dir)
    pictures = {name: Path(get_testdata_file(name)) for name in COMPRESSED_DICOM + ("JPGExtended.dcm",)}
    pictures.update(_fragmented(tmp_path))
    names = list(pictures)
    (site_dir / "pictures").mkdir()
    for name, path in pictures.items():
        shutil.copyfile(path, site_dir / "pictures" / name)
    site = _StaticSite(site_dir)
    try:
        browser.get(site.url)
        _wait_for(lambda: browser.find_element(By.ID, "status").text.startswith("error"), 60, "the stand-in model "
                  "to fail loading (the page's scripts have run)")
        results = browser.execute_async_script("""
            const [names, done] = arguments;
            (async () => {
              const medical = await import(new URL('./medical.mjs', location.href).href);
              const codecs = medical.codecLoaders({ OpenJPEGWASM: globalThis.OpenJPEGWASM,
                                                    CharLSWASM: globalThis.CharLSWASM },
                                                  (name) => new URL(`./lib/${name}`, location.href).href);
              const out = {};
              for (const name of names) {
                const bytes = new Uint8Array(await (await fetch(`./pictures/${name}`)).arrayBuffer());
                try {
                  const image = await medical.readDicom(bytes, globalThis.dicomParser, codecs);
                  out[name] = { width: image.width, height: image.height,
                                grey: btoa(Array.from(image.grey, (b) => String.fromCharCode(b)).join('')) };
                } catch (error) { out[name] = { error: String(error.message ?? error) }; }
              }
              return out;
            })().then(done, (error) => done({ failed: String(error) }));""", names)
    finally:
        site.close()
    assert "failed" not in results, results
    for name in (n for n in names if n != "JPGExtended.dcm"):
        got = results[name]
        assert "error" not in got, (name, got)
        grey = np.frombuffer(base64.b64decode(got["grey"]), np.uint8).reshape(got["height"], got["width"])
        np.testing.assert_array_equal(grey, read_medical_image(pictures[name]).pixels[..., 0], err_msg=name)
    assert "compressed (JPEG Extended, transfer syntax 1.2.840.10008.1.2.4.51)" in results["JPGExtended.dcm"]["error"]
    paths = {path for _, path, _ in site.requests}
    assert {"/lib/openjpegwasm_decode.wasm", "/lib/charlswasm_decode.wasm"} <= paths, sorted(paths)


NIBABEL_SHIPPED = ("anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz", "functional.nii",
                   "reoriented_anat_moved.nii", "standard.nii.gz")


def _made_niftis(folder: Path) -> dict[str, Path]:
    """NIfTIs the shipped ones do not cover: axes stored out of order (voxel axis 0 runs along y) with int16
    scaling; a float NIfTI-2 with a NaN, a qform and an unused sform (sform_code 0), whose coronal and sagittal
    slices resample 5 rows to 12.5 (Python rounds half to even); a sheared affine, which the page
    refuses."""
    import nibabel as nib

    rng = np.random.default_rng(5)
    permuted = np.array([[0, -2.5, 0, 10], [1.0, 0, 0, -4], [0, 0, 3.0, 2], [0, 0, 0, 1]])  # voxel i runs along y
    image = nib.Nifti1Image(rng.integers(-300, 900, (9, 14, 6)).astype(np.int16), permuted)
    floats = rng.normal(100, 30, (11, 7, 5)).astype(np.float32)
    floats[3, 3, 2] = np.nan  # in the axial and the (resampled) coronal middle slices
    qform_only = nib.Nifti2Image(floats, None)
    qform_only.set_qform(np.diag([-1.5, 1.5, 3.75, 1.0]), code=1)  # sform_code 0: nibabel takes the qform
    qform_only.set_sform(np.diag([1.5, 1.5, 1.5, 1.0]), code=0)
    sheared = np.array([[1.0, 0.4, 0, 0], [0, 1.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    files = {"permuted_scaled.nii": image, "float_nan.nii.gz": qform_only,
             "sheared.nii": nib.Nifti1Image(floats, sheared)}
    paths = {}
    for name, img in files.items():
        paths[name] = folder / name
        nib.save(img, paths[name])
    scaled = bytearray(paths["permuted_scaled.nii"].read_bytes())  # nibabel's writer sets its own scaling: patch it
    struct.pack_into("<ff", scaled, 112, -0.5, -20.0)  # scl_slope < 0 (a positive one the percentiles undo)
    paths["permuted_scaled.nii"].write_bytes(bytes(scaled))
    assert nib.load(paths["permuted_scaled.nii"]).dataobj.slope == -0.5
    return paths


@needs_node
def test_page_reads_nifti_as_the_python_reader(tmp_path):
    """export/web/medical.mjs reads NIfTI as gmaivl_rt/medical/nifti.py (nibabel) does: on nibabel's shipped files
    (NIfTI-1 and -2, gzipped, 4D, LAS and RAS, an oblique qform, anisotropic voxels) and on made ones (axes stored
    out of order with int16 scaling, float with a NaN), in each plane, the windowed grey slice equals
    `read_medical_image(file, plane=...)`'s and the model's input (axial) equals `preprocess_image`'s, exactly; a
    sheared affine is refused with the reason. Mutants seen failing: no flip of x for LAS; columns not reversed
    (radiological convention); square pixels by rounding half up; the canonical axis order ignored (permuted file);
    scaling ignored; NaN not taken as the low end; sform used when sform_code is 0; the shear check dropped.
    Survives: the percentile's b - a taken in float64 instead of numpy's float32 (no test file makes it differ)."""
    import base64

    import torch

    from gmaivl_rt.medical.reader import read_medical_image
    from gmaivl_rt.model.preprocess import CLIP_MEAN, CLIP_STD, preprocess_image

    side = 28
    shipped = [_nibabel_file(n) for n in NIBABEL_SHIPPED]
    made = _made_niftis(tmp_path)
    files = [*shipped, made["permuted_scaled.nii"], made["float_nan.nii.gz"]]
    args = [f"{f}@{plane}" for f in files for plane in ("axial", "coronal", "sagittal")]
    done = subprocess.run(["node", str(JS / "read_pictures.mjs"), str(side), *args, str(made["sheared.nii"])],
                          capture_output=True, text=True, timeout=120, cwd=JS)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)
    assert "cannot be read in the browser: a sheared" in results[-1]["error"], results[-1]
    for arg, got in zip(args, results):
        assert "error" not in got, got
        file, plane = arg.split("@")
        image = read_medical_image(file, plane=plane)
        grey = np.frombuffer(base64.b64decode(got["grey"]), np.uint8).reshape(got["height"], got["width"])
        np.testing.assert_array_equal(grey, image.pixels[..., 0], err_msg=arg)
        if plane == "axial":
            rgb = np.frombuffer(base64.b64decode(got["rgb"]), np.uint8).reshape(side, side, 3)
            normalised = ((torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)
                           - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None])
            torch.testing.assert_close(normalised, preprocess_image(image.pixels, side), rtol=0, atol=0)
    assert len({r["grey"] for r in results[:-1]}) == len(results) - 1  # every slice its own picture


def test_exporting_again_into_a_folder_replaces_what_was_there(model_dir, tjs_export, tmp_path):
    """A second `export onnx --layout transformers.js` (here fp32 only) into a folder holding an earlier export with
    every quantized variant leaves no earlier graph behind (`export web` would otherwise offer stale q4 weights
    beside new fp32 ones), and `export web` writes over its own earlier site. Mutant seen failing: staged_files
    moving a folder onto an existing one (the OSError 'Directory not empty' both commands hit before); the earlier
    quantization_report.json kept."""
    from gmaivl_rt.export.web import export_web, shipped_dtypes

    folder = tmp_path / "again"
    shutil.copytree(tjs_export[0], folder)
    assert shipped_dtypes(folder) == ["fp32", *q.VARIANTS]
    export_transformers_js(model_dir, folder)
    assert shipped_dtypes(folder) == ["fp32"]
    assert sorted(p.name for p in (folder / "onnx").iterdir()) == sorted(f"{g}.onnx" for g in GRAPH_FILES)
    assert not (folder / REPORT_JSON).exists()  # it described the variants just removed
    site = tmp_path / "site"
    export_web(tjs_export[0], site)
    export_web(folder, site)
    assert json.loads((site / "site.json").read_text())["dtypes"] == ["fp32"]
    assert not list((site / "model" / "onnx").glob("*_q4*"))
    assert [p.name for p in site.iterdir() if p.name.startswith(".")] == []


def test_export_web_needs_a_transformers_js_folder_and_the_npm_packages(model_dir, tjs_export, tmp_path):
    from gmaivl_rt.export.web import export_web

    with pytest.raises(FileNotFoundError, match="not a transformers.js export"):
        export_web(model_dir, tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="make js"):
        export_web(tjs_export[0], tmp_path / "b", js_modules=tmp_path / "nowhere")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
