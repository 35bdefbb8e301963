"""`gmaivl-rt serve MODEL_DIR`: the OpenAI-compatible HTTP server and the web page, over one `Engine`."""
from __future__ import annotations

import argparse

from gmaivl_rt.runtime.cli import add_backend_options, backend_options


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API and a web page")
    p.add_argument("model", help="model folder (torch) or exported folder (onnx / tensorrt)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    add_backend_options(p)
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: folder name)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 endpoints")
    p.add_argument("--max-request-bytes", type=int, default=64 * 2**20, help="larger bodies get 413")
    p.add_argument("--max-images-per-request", type=int, default=None)
    p.add_argument("--max-waiting", type=int, default=None,
                   help="answer 429 while this many requests wait (default: queue without bound)")
    p.add_argument("--allowed-local-media-path", default=None,
                   help="folder whose files may be named by file:// image URLs (default: none)")
    p.add_argument("--allow-remote-media", action="store_true",
                   help="allow http(s) image URLs (the server then makes outbound requests)")
    p.set_defaults(func=_serve_cli)


def _serve_cli(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gmaivl_rt.extras import require

    require("fastapi", "uvicorn", "prometheus_client", extra="serve")
    import uvicorn

    from gmaivl_rt.engine.engine import Engine
    from gmaivl_rt.server.app import create_app

    engine_kwargs = backend_options(args)
    if args.max_images_per_request is not None:
        from gmaivl_rt.limits import Limits

        engine_kwargs["limits"] = Limits(max_images_per_request=args.max_images_per_request)
    with Engine(args.model, backend=args.backend, max_batch_size=args.max_batch_size, **engine_kwargs) as engine:
        app = create_app(engine, served_model_name=args.served_model_name or Path(args.model).resolve().name,
                         api_key=args.api_key, max_request_bytes=args.max_request_bytes,
                         max_images_per_request=args.max_images_per_request, max_waiting=args.max_waiting,
                         allowed_local_media_path=args.allowed_local_media_path,
                         allow_remote_media=args.allow_remote_media)
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
