"""The optional rewriter hook: a callable fn(text: str, context: dict) -> str that rephrases templated answers
(keeping their facts), given as a callable, a 'package.module:function' name or the URL of an OpenAI-compatible
server. Its identity is part of the resume key, so changing the rewriter reconverts the items."""
from __future__ import annotations

import importlib
import json
import logging
import os
import sys

logger = logging.getLogger("gmaivl_rt.data")

REWRITE_SYSTEM_PROMPT = (
    "You rewrite descriptions of medical images. Keep every fact (modality, anatomy, plane, labels, numbers) "
    "exactly, change only the wording, and answer with the rewritten text alone.")


def openai_rewriter(url: str, model: str = "default", timeout: float = 60.0, api_key: str | None = None):
    """A rewriter calling an OpenAI-compatible endpoint (POST {url}/v1/chat/completions) with urllib.

    Returns fn(text, context) -> str. The API key, if any, comes from `api_key` or $OPENAI_API_KEY."""
    import urllib.request

    endpoint = url.rstrip("/")
    if not endpoint.endswith("/chat/completions"):
        endpoint += "/chat/completions" if endpoint.endswith("/v1") else "/v1/chat/completions"
    key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")

    def rewrite(text: str, context: dict) -> str:
        facts = ", ".join(f"{k}: {v}" for k, v in sorted(context.items()) if v)
        body = {"model": model, "temperature": 0.7, "messages": [
            {"role": "system", "content": REWRITE_SYSTEM_PROMPT},
            {"role": "user", "content": f"Facts: {facts}\nText: {text}"}]}
        request = urllib.request.Request(endpoint, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json",
                                                  **({"Authorization": f"Bearer {key}"} if key else {})})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            reply = json.loads(response.read().decode("utf-8"))
        return str(reply["choices"][0]["message"]["content"]).strip()

    rewrite.identity = f"url:{endpoint}:{model}"
    return rewrite


def _import_from_path_or_cwd(module_name: str):
    """The module, searching the current folder last as `python -m` does (the console script does not);
    None when its top-level package is nowhere."""
    top = module_name.split(".")[0]
    for add_cwd in (False, True):
        if add_cwd:
            if os.getcwd() in sys.path:
                return None
            sys.path.append(os.getcwd())
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != top:
                raise
    return None


def load_rewriter(spec: str):
    """'package.module:function' -> that callable (fn(text: str, context: dict) -> str)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"rewriter {spec!r} must look like 'package.module:function'")
    module = _import_from_path_or_cwd(module_name)
    if module is None:
        raise ValueError(f"rewriter {spec!r}: no module {module_name!r} on the Python path or in the current folder")
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"rewriter {spec!r}: module {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise ValueError(f"rewriter {spec!r} is not callable")
    return fn


def resolve_rewriter(rewriter) -> tuple[object, str]:
    """What `build_dataset(rewriter=...)` takes -> (callable or None, its identity for resume keys: "" for None).
    A str is an http(s) URL of an OpenAI-compatible server or a 'package.module:function' name."""
    if isinstance(rewriter, str):
        rewriter = openai_rewriter(rewriter) if rewriter.startswith(("http://", "https://")) else \
            load_rewriter(rewriter)
    identity = "" if rewriter is None else getattr(rewriter, "identity", None) or \
        f"{getattr(rewriter, '__module__', '')}:{getattr(rewriter, '__qualname__', repr(type(rewriter)))}"
    return rewriter, identity


def rewrite_answers(rewriter, turns, context: dict) -> tuple[list[tuple[str, str]], int]:
    """turns [(question, answer)] with every answer passed through `rewriter(answer, context)`. The hook is
    optional: where it fails or returns no text, the templated answer stays. Returns (turns, failures)."""
    out, failures = [], 0
    for question, answer in turns:
        try:
            new = rewriter(answer, context)
            answer = new.strip() if isinstance(new, str) and new.strip() else answer
        except Exception as e:  # the hook is optional: keep the templated text
            failures += 1
            logger.warning("rewriter failed (%s); keeping the templated text", type(e).__name__)
        out.append((question, answer))
    return out, failures
