"""`gmaivl-rt ask MODEL --image FILE --question TEXT`, and the --backend/--device/--dtype/--generation-config options
that `ask`, `serve` and `eval` share (`add_backend_options` / `backend_options`)."""
from __future__ import annotations

from gmaivl_rt.errors import InputError
from gmaivl_rt.runtime.backends import BACKENDS, load
from gmaivl_rt.runtime.generation_config import DECODING_FIELDS


def add_backend_options(parser) -> None:
    """--backend, --device, --dtype and --generation-config, as `ask`, `serve` and `eval` all take them;
    `backend_options` reads them."""
    parser.add_argument("--backend", default="torch", choices=BACKENDS)
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: torch cpu; onnx CUDA when onnxruntime-gpu has it, "
                             "else cpu; tensorrt cuda)")
    from gmaivl_rt.model.checkpoint import DTYPE_NAMES

    parser.add_argument("--dtype", default=None, choices=tuple(DTYPE_NAMES),
                        help="torch backend weight dtype (default: as stored; on CUDA an fp32 checkpoint loads in "
                             "bf16, fp16 on GPUs before sm_80)")
    parser.add_argument("--generation-config", default="auto", metavar="auto|none|PATH",
                        help="decoding defaults: auto (the model folder's generation_config.json, else plain greedy), "
                             "none (plain greedy) or a generation_config.json / a folder holding one "
                             "(default %(default)s)")


def backend_options(args) -> dict:
    """The parsed --backend/--device/--dtype/--generation-config -> `load()`'s keyword arguments for that backend
    (backend excluded). --dtype with a graph backend is refused rather than ignored."""
    from gmaivl_rt.model.checkpoint import DTYPE_NAMES

    generation = {"generation_config": args.generation_config}
    if args.backend == "torch":
        return {"device": args.device, "dtype": DTYPE_NAMES.get(args.dtype), **generation}
    if args.dtype is not None:
        raise InputError(f"--dtype applies to the torch backend only; the {args.backend} backend runs the dtype "
                         "its graphs were exported in")
    return generation if args.device is None else {"device": args.device, **generation}


def register(subparsers) -> None:
    p = subparsers.add_parser("ask", help="answer a question about a medical image with a model or exported folder")
    p.add_argument("model", help="model folder (config.json, safetensors, tokenizer.json) or exported folder")
    p.add_argument("--image", help="DICOM, NIfTI, PNG, JPEG, TIFF or BMP file")
    p.add_argument("--question", required=True)
    add_backend_options(p)
    p.add_argument("--system", default=None, help="optional system prompt")
    # Decoding flags default to None: what is not given comes from the model's decoding defaults (--generation-config).
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the decoding defaults' (128 without any)")
    p.add_argument("--do-sample", action="store_true", default=None,
                   help="sample (with --temperature, --top-p, --top-k) instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None, help="0: off")
    p.add_argument("--repetition-penalty", type=float, default=None, help="1.0: off")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None, help="0: off")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling RNG (reproducible --do-sample)")
    # structured output (docs/structured-output.md): at most one of the three
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help="answer with JSON valid under this JSON Schema (a .json file)")
    p.add_argument("--choice", nargs="+", default=None, metavar="TEXT", help="answer with exactly one of these")
    p.add_argument("--regex", default=None, help="answer with text that the regular expression matches whole")
    p.add_argument("--frame", type=int, default=None, help="DICOM / TIFF frame (default 0)")
    p.add_argument("--slice", type=int, default=None, dest="slice_index",
                   help="NIfTI slice along --plane (default the middle one)")
    p.add_argument("--plane", default=None, choices=("axial", "coronal", "sagittal"), help="NIfTI plane")
    p.add_argument("--window", default=None,
                   help="intensity window: a CT window name (lung, mediastinum, bone, brain, abdomen), percentile, "
                        "minmax, or CENTRE,WIDTH")
    p.set_defaults(func=_ask_cli)
    from gmaivl_rt.runtime.hospital import add_archive_options

    add_archive_options(p)


def _cli_window(text):
    if text is None or "," not in text:
        return text
    try:
        centre, width = (float(v) for v in text.split(","))
    except ValueError:
        raise InputError("--window must be a name or CENTRE,WIDTH (two numbers)") from None
    return centre, width


def _constraint_options(args) -> dict:
    """--json-schema FILE / --choice / --regex -> ask's json_schema / choice / regex (the file read as JSON)."""
    options = {k: getattr(args, k) for k in ("choice", "regex") if getattr(args, k, None) is not None}
    if getattr(args, "json_schema", None) is not None:
        import json

        try:
            with open(args.json_schema, encoding="utf-8") as f:
                options["json_schema"] = json.load(f)
        except OSError as e:
            raise InputError(f"--json-schema: the file cannot be read ({e.strerror})") from None
        except ValueError as e:
            raise InputError(f"--json-schema: the file is not JSON ({str(e)[:80]})") from None
    return options


def _ask_cli(args) -> int:
    from gmaivl_rt.runtime.hospital import archive_ref_from_args, ask_archive_cli

    archive_ref = archive_ref_from_args(args)  # a half-given --dicomweb set fails before the model loads
    backend = load(args.model, backend=args.backend, **backend_options(args))
    backend.tokenizer  # noqa: B018  (a folder without a tokenizer cannot answer: say so before reading the image)
    generation = {key: getattr(args, key) for key in DECODING_FIELDS if getattr(args, key) is not None}
    generation.update(_constraint_options(args))
    if archive_ref is not None:
        return ask_archive_cli(backend, args, archive_ref, system=args.system, frame=args.frame,
                               slice_index=args.slice_index, plane=args.plane, window=_cli_window(args.window),
                               seed=args.seed, **generation)
    print(backend.ask(args.question, args.image, system=args.system, frame=args.frame,
                      slice_index=args.slice_index, plane=args.plane, window=_cli_window(args.window),
                      seed=args.seed, **generation))
    return 0
