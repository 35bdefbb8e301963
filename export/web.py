"""`gmaivl-rt export web TJS_DIR --out SITE`: a static site that answers in the browser. The page
(`export/web/index.html`, `page.mjs`), transformers.js' browser bundle and onnxruntime-web's WASM runtime (from
the npm packages of `js/`, installed by `make js`), and the model (an `export onnx --layout transformers.js`
folder) under one folder, so any static file server (or `python -m http.server`) serves it from one origin. The
picture is read by the page and never leaves the browser.

    SITE/index.html, SITE/page.mjs, SITE/site.json      the page and its settings (weights offered, answer length)
    SITE/medical.mjs                                    pictures read as gmaivl_rt reads them (DICOM windowing, ...)
    SITE/lib/dicomParser.min.js                         dicom-parser (npm), for DICOM files
    SITE/lib/{openjpegwasm,charlswasm}_decode.{js,wasm}  OpenJPEG and CharLS (@cornerstonejs/codec-*): JPEG 2000, JPEG-LS
    SITE/lib/transformers.min.js                        @huggingface/transformers' browser bundle
    SITE/lib/ort-wasm-simd-threaded.asyncify.{mjs,wasm}  the onnxruntime-web build that bundle loads
    SITE/model/                                          the transformers.js folder
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from gmaivl_rt.atomic import atomic_write_json, staged_files

from .quantize import SUFFIXES

PAGE = Path(__file__).parent / "web"
PAGE_FILES = ("index.html", "page.mjs", "medical.mjs")
ORT_WASM = "ort-wasm-simd-threaded.asyncify"  # what transformers.js' bundle picks by default (WebGPU and WASM)
# the WebAssembly DICOM decoders the page loads (JPEG 2000, JPEG-LS): build name -> npm package
DICOM_CODECS = {"openjpegwasm": "codec-openjpeg", "charlswasm": "codec-charls"}
DEFAULT_JS_MODULES = Path(__file__).resolve().parent.parent / "js" / "node_modules"  # the checkout's `make js`


def library_files(js_modules: Path) -> dict[str, Path]:
    """SITE/lib/ name -> the npm file it is copied from; FileNotFoundError naming `make js` when one is missing."""
    files = {"transformers.min.js": js_modules / "@huggingface" / "transformers" / "dist" / "transformers.min.js",
             f"{ORT_WASM}.mjs": js_modules / "onnxruntime-web" / "dist" / f"{ORT_WASM}.mjs",
             f"{ORT_WASM}.wasm": js_modules / "onnxruntime-web" / "dist" / f"{ORT_WASM}.wasm",
             "dicomParser.min.js": js_modules / "dicom-parser" / "dist" / "dicomParser.min.js",
             **{f"{codec}_decode.{ext}": js_modules / "@cornerstonejs" / package / "dist" / f"{codec}_decode.{ext}"
                for codec, package in DICOM_CODECS.items() for ext in ("js", "wasm")}}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"export web: the npm packages are not installed ({missing[0]} is missing): run "
                                "`make js` (npm ci in js/) or pass --js-modules DIR/node_modules")
    return files


def shipped_dtypes(model_dir: Path) -> list[str]:
    """The transformers.js dtypes whose three graphs are all in model_dir/onnx, fp32 first."""
    graphs = ("embed_tokens", "vision_encoder", "decoder_model_merged")
    return [d for d, s in SUFFIXES.items() if all((model_dir / "onnx" / f"{g}{s}.onnx").is_file() for g in graphs)]


def export_web(model_dir, out_dir, *, js_modules=None, max_new_tokens: int = 64, webgpu: bool = True) -> Path:
    """Write the static site for the transformers.js folder `model_dir` into `out_dir`; returns its index.html."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file() or "transformers.js_config" not in json.loads(
            (model_dir / "config.json").read_text()):
        raise FileNotFoundError(f"export web: {model_dir} is not a transformers.js export (run `gmaivl-rt export "
                                "onnx MODEL_DIR --out DIR --layout transformers.js` first)")
    dtypes = shipped_dtypes(model_dir)
    if not dtypes:
        raise FileNotFoundError(f"export web: {model_dir}/onnx lacks the three graphs of any dtype")
    libraries = library_files(Path(js_modules) if js_modules else DEFAULT_JS_MODULES)
    with staged_files(out_dir, prefix=".export-web-") as tmp:
        for name in PAGE_FILES:
            shutil.copyfile(PAGE / name, tmp / name)
        (tmp / "lib").mkdir()
        for name, source in libraries.items():
            shutil.copyfile(source, tmp / "lib" / name)
        shutil.copytree(model_dir, tmp / "model")
        atomic_write_json(tmp / "site.json", {"dtypes": dtypes, "max_new_tokens": max_new_tokens,
                                              "ort_wasm": ORT_WASM, "webgpu": webgpu})
    return out_dir / "index.html"
