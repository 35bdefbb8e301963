"""The OpenAI-compatible HTTP server (`gmaivl-rt serve`, extra `[serve]`): `create_app(engine, ...)` -> ASGI app."""


def create_app(engine, **options):
    """The ASGI app serving a `gmaivl_rt.Engine`; see `gmaivl_rt.server.app.create_app` for the options."""
    from gmaivl_rt.extras import require

    require("fastapi", "uvicorn", "prometheus_client", extra="serve")
    from gmaivl_rt.server.app import create_app as _create_app

    return _create_app(engine, **options)


__all__ = ["create_app"]
