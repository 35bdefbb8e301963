"""`gmaivl-rt serve MODEL_DIR`: the OpenAI-compatible HTTP server and the web page, over one `Engine`."""
from __future__ import annotations

import argparse

from gmaivl_rt.limits import DecodeBudget
from gmaivl_rt.runtime.cli import add_backend_options, backend_options
from gmaivl_rt.server.hosting import GRACEFUL_SHUTDOWN_S, KEEP_ALIVE_S


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API and a web page")
    p.add_argument("model", help="model folder (torch) or exported folder (onnx / tensorrt)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    add_backend_options(p)
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: folder name)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-step-tokens", type=int, default=None,
                   help="torch backend: the most tokens one engine step feeds, >= --max-batch-size; longer prompts "
                        "(image tokens included) are prefilled in chunks so running streams keep their pace "
                        "(Engine(max_step_tokens=...), docs/engine.md; default: no budget)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 endpoints (visible "
                   "in `ps`: prefer --api-key-file or GMAIVL_API_KEY)")
    p.add_argument("--api-key-file", default=None, help="read the API key from this file (its first line)")
    p.add_argument("--allowed-hosts", nargs="+", default=None, metavar="HOST",
                   help="Host header names answered, '*' for any (default: the bound host and localhost)")
    p.add_argument("--timeout-keep-alive", type=int, default=KEEP_ALIVE_S, metavar="S",
                   help="seconds an idle keep-alive connection is kept; keep it longer than clients keep theirs "
                        f"(httpx and the openai client: 5 s) so they close first (default {KEEP_ALIVE_S})")
    p.add_argument("--timeout-graceful-shutdown", type=float, default=GRACEFUL_SHUTDOWN_S, metavar="S",
                   help="on SIGTERM / SIGINT, seconds open requests may go on before they are cancelled (a stream "
                        "then ends with a 503 error event and [DONE]); the process then closes the engine and "
                        f"exits 0 (default {GRACEFUL_SHUTDOWN_S})")
    p.add_argument("--max-request-bytes", type=int, default=64 * 2**20, help="larger bodies get 413")
    p.add_argument("--max-images-per-request", type=int, default=None)
    p.add_argument("--max-waiting", type=int, default=None,
                   help="answer 429 while this many requests wait (default: queue without bound)")
    p.add_argument("--allowed-local-media-path", default=None,
                   help="folder whose files may be named by file:// image URLs (default: none)")
    p.add_argument("--allow-remote-media", action="store_true",
                   help="allow http(s) image URLs (the server then makes outbound requests, to public addresses)")
    p.add_argument("--allowed-media-domains", nargs="+", default=None, metavar="HOST",
                   help="with --allow-remote-media: the only hosts fetched, wherever they resolve")
    budget = DecodeBudget()
    p.add_argument("--max-request-pixels", type=int, default=budget.max_request_pixels,
                   help="decoded pixel values one request's images may take, read from their headers before "
                        "decoding (a colour pixel counts 3, a NIfTI file its whole volume); more: 413 "
                        f"(default {budget.max_request_pixels})")
    p.add_argument("--max-server-pixels", type=int, default=budget.max_server_pixels,
                   help="decoded pixel values of all requests being decoded or waiting for the engine; a request "
                        f"that would go over it: 429 with Retry-After (default {budget.max_server_pixels})")
    p.add_argument("--decode-workers", type=int, default=budget.decode_workers,
                   help=f"threads decoding images, apart from the HTTP ones (default {budget.decode_workers})")
    p.add_argument("--audit-log", default=None, metavar="FILE",
                   help="append one JSON line per /v1 request to FILE (mode 0600): time, request id, client, "
                        "endpoint, outcome, status, token counts, image count and SHA-256 digests; never text")
    p.add_argument("--dicomweb", metavar="URL", default=None,
                   help="a DICOMweb archive's root: adds endpoints that ask about a study by its UIDs, browse the "
                        "archive and write answers back as Structured Reports (credentials: GMAIVL_DICOMWEB_TOKEN"
                        "[_FILE] or GMAIVL_DICOMWEB_USER + GMAIVL_DICOMWEB_PASSWORD[_FILE]; docs/hospital.md)")
    p.set_defaults(func=_serve_cli)


def api_key(args: argparse.Namespace, environ) -> str | None:
    """The key from --api-key, else --api-key-file's first line, else GMAIVL_API_KEY, else None (an open server).
    An empty key is refused (InputError): it would look protected and be open."""
    from gmaivl_rt.errors import InputError

    if args.api_key is not None:
        key, origin = args.api_key, "--api-key"
    elif args.api_key_file is not None:
        from pathlib import Path

        try:
            lines = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(f"--api-key-file cannot be read ({type(error).__name__})") from None
        key, origin = (lines[0] if lines else ""), "--api-key-file"
    elif "GMAIVL_API_KEY" in environ:
        key, origin = environ["GMAIVL_API_KEY"], "GMAIVL_API_KEY"
    else:
        return None
    key = key.strip()
    if not key:
        raise InputError(f"{origin} gives an empty API key; give a real key, or none for an open server")
    return key


def allowed_hosts(args: argparse.Namespace) -> list[str]:
    """--allowed-hosts, else the bound host and localhost (with the loopback addresses localhost stands for)."""
    if args.allowed_hosts:
        return list(args.allowed_hosts)
    hosts = [args.host, "localhost"]
    if args.host in ("127.0.0.1", "::1", "localhost"):
        hosts += ["127.0.0.1", "::1"]
    return list(dict.fromkeys(hosts))


def _serve_cli(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from gmaivl_rt.extras import require

    require("fastapi", "uvicorn", "prometheus_client", extra="serve")
    import os

    from gmaivl_rt.engine.compiled_decode import COMPILE_ENV
    from gmaivl_rt.engine.engine import Engine
    from gmaivl_rt.server import hosting
    from gmaivl_rt.server.app import create_app

    key = api_key(args, os.environ)  # before the model loads: a bad key or timeout stops the start at once
    hosting.check_timeouts(args.timeout_keep_alive, args.timeout_graceful_shutdown)
    decode_budget = DecodeBudget(max_request_pixels=args.max_request_pixels, max_server_pixels=args.max_server_pixels,
                                 decode_workers=args.decode_workers)
    engine_kwargs = backend_options(args)
    if args.max_step_tokens is not None:
        engine_kwargs["max_step_tokens"] = args.max_step_tokens
    if args.max_images_per_request is not None:
        from gmaivl_rt.limits import Limits

        engine_kwargs["limits"] = Limits(max_images_per_request=args.max_images_per_request)
    # --generation-config (one of the shared backend options) reaches `load` through the engine: the defaults a
    # request that leaves a decoding field out gets, the same `ask` and `eval` resolve for this folder.
    with Engine(args.model, backend=args.backend, max_batch_size=args.max_batch_size, **engine_kwargs) as engine:
        generation = engine.backend.generation
        print(f"decoding defaults ({generation.origin}): {generation.options}", file=sys.stderr, flush=True)
        compiled = getattr(engine.runner, "compiled", None)
        if compiled is not None:  # the warm-up runs in the engine's thread: say why the first answers wait
            print(f"compiling the decode step for batch sizes {list(compiled.buckets)}: requests wait for it (seconds "
                  f"once compiled on this machine, a minute or more the first time on a CPU; {COMPILE_ENV}=0 skips "
                  "it)", file=sys.stderr, flush=True)
        app = create_app(engine, served_model_name=args.served_model_name or Path(args.model).resolve().name,
                         api_key=key, allowed_hosts=allowed_hosts(args), max_request_bytes=args.max_request_bytes,
                         max_images_per_request=args.max_images_per_request, max_waiting=args.max_waiting,
                         allowed_local_media_path=args.allowed_local_media_path,
                         allow_remote_media=args.allow_remote_media,
                         allowed_media_domains=args.allowed_media_domains, audit_log=args.audit_log,
                         decode_budget=decode_budget, dicomweb=args.dicomweb)
        hosting.serve_until_stopped(hosting.uvicorn_config(
            app, args.host, args.port, timeout_keep_alive=args.timeout_keep_alive,
            timeout_graceful_shutdown=args.timeout_graceful_shutdown))
        # stopped: every HTTP request has ended (cancelled past the grace period), so no one waits for an answer
        engine.close(cancel=True)
    return 0
