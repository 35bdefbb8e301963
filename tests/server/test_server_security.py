"""The server against a hostile network and a careless deployment: remote media behind an SSRF guard (tested only
against 127.0.0.1 servers this test starts: the guard's address rule itself is checked on addresses, with no
connection), API keys from a file or the environment and never empty, the Host header checked against the allowed
hosts, security headers on every response, and a page that asks for the key before it needs it (headless
Chromium, as tests/server/test_server.py drives it)."""
from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from server_fixtures import QUESTION  # noqa: E402
from train_fixtures import make_image  # noqa: E402

from gmaivl_rt.errors import InputError  # noqa: E402
from gmaivl_rt.limits import Limits  # noqa: E402
from gmaivl_rt.server import create_app  # noqa: E402
from gmaivl_rt.server.background import free_port  # noqa: E402
from gmaivl_rt.server.remote_media import is_public_address  # noqa: E402

KEY = "key-5b1e"
TOKENS = 4
FETCH_FAILED = "could not be fetched"


# ------------------------------------------------------------------------------------------------ the guard's rule
@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.8.9.10", "0.0.0.0", "10.1.2.3", "172.16.0.1", "172.31.255.254", "192.168.1.1",
    "169.254.169.254",  # the cloud metadata service (link-local)
    "100.64.0.1", "100.100.100.200",  # shared address space (RFC 6598), a metadata service lives there too
    "224.0.0.1", "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "fd00:ec2::254",
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.0.0.1", "not an address",
])
def test_loopback_private_link_local_and_metadata_addresses_are_not_public(address):
    assert not is_public_address(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "151.101.1.69", "2606:4700:4700::1111",
                                     "2001:4860:4860::8888", "::ffff:8.8.8.8"])
def test_public_addresses_are_public(address):
    assert is_public_address(address)


# ------------------------------------------------------------------------------------------------ remote media
class Target:
    """An HTTP server on 127.0.0.1 standing for a remote host: /image.png, /missing (404), /slow (answers late),
    /drip (a body that trickles in for 6 s), /huge (over the size limit), /redirect?to=URL (301). It counts the
    paths it was asked for."""

    def __init__(self, png: bytes):
        hits, self.hits = [], []
        self.hits = hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hits.append(self.path)
                if self.path == "/image.png":
                    self._send(200, png)
                elif self.path == "/slow":
                    time.sleep(3)
                    self._send(200, png)
                elif self.path == "/drip":
                    self.send_response(200)
                    self.send_header("Content-Length", "60")
                    self.end_headers()
                    try:
                        for _ in range(30):  # each piece well within any socket timeout
                            self.wfile.write(b"xx")
                            self.wfile.flush()
                            time.sleep(0.2)
                    except OSError:
                        pass
                elif self.path == "/huge":
                    self._send(200, b"\x89PNG\r\n\x1a\n" + b"0" * 300_000)
                elif self.path.startswith("/redirect?to="):
                    self.send_response(301)
                    self.send_header("Location", self.path.split("=", 1)[1])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self._send(404, b"no")

            def _send(self, status, body):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:  # the fetcher hung up (size or time limit)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture(scope="module")
def png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("remote") / "square.png"
    make_image(path, "red", size=(40, 32))
    return path


@pytest.fixture(scope="module")
def target(png):
    with Target(png.read_bytes()) as running:
        yield running


def _ask(server, url: str):
    return httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "max_tokens": TOKENS, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}]})


def test_remote_media_on_loopback_is_refused_without_contact(serving_engine, target, serve):
    app = create_app(serving_engine, allow_remote_media=True, remote_media_timeout_s=2)
    before = len(target.hits)
    with serve(app) as server:
        for host in ("127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "127.1", "0x7f000001"):
            response = _ask(server, f"http://{host}:{target.port}/image.png")
            assert response.status_code == 400 and FETCH_FAILED in response.json()["error"]["message"], host
        assert _ask(server, f"ftp://127.0.0.1:{target.port}/image.png").status_code == 400
    assert target.hits[before:] == []  # the guard refused before connecting


def test_allowed_domains_are_fetched_and_redirects_to_others_are_not(serving_engine, target, png, serve):
    """Only `localhost` is allowed: it is fetched (the answer equals Engine.ask on the same PNG); a 301 from it to
    127.0.0.1 (this server's own /metrics, or the target itself) is not followed; every failure reads the same."""
    limits = Limits(max_image_bytes=200_000)
    app = create_app(serving_engine, allow_remote_media=True, allowed_media_domains=["localhost"],
                     remote_media_timeout_s=1.5, limits=limits)
    base = f"http://localhost:{target.port}"
    with serve(app) as server:
        reply = _ask(server, f"{base}/image.png")
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == serving_engine.ask(
            QUESTION, image=str(png), max_new_tokens=TOKENS)

        before, log_before = len(target.hits), len(server.log.lines)
        failures = {
            "redirect to own metrics": f"{base}/redirect?to={server.url}/metrics",
            "redirect to the target by address": f"{base}/redirect?to=http://127.0.0.1:{target.port}/image.png",
            "not allowed host": f"http://127.0.0.1:{target.port}/image.png",
            "404": f"{base}/missing",
            "closed port": f"http://localhost:{free_port()}/image.png",
            "too slow": f"{base}/slow",
            "trickling": f"{base}/drip",
            "too big": f"{base}/huge",
        }
        messages = {}
        for name, url in failures.items():
            started = time.monotonic()
            response = _ask(server, url)
            assert response.status_code == 400, (name, response.text)
            assert time.monotonic() - started < 4.5, name  # the fetch's own limit is 1.5 s
            messages[name] = response.json()["error"]["message"]
        assert len(set(messages.values())) == 1 and FETCH_FAILED in messages["404"], messages
        logged = "\n".join(server.log.lines[log_before:])
        assert "GET /metrics" not in logged  # this server's own endpoint was never fetched
        assert "/image.png" not in target.hits[before:]  # the redirect to 127.0.0.1 was not followed
        assert {"/missing", "/slow", "/huge"} <= set(target.hits[before:])  # allowed host: fetched, then refused


# ------------------------------------------------------------------------------------------------ keys and hosts
def test_an_empty_api_key_is_refused(serving_engine):
    for key in ("", "  "):
        with pytest.raises(InputError, match="empty"):
            create_app(serving_engine, api_key=key)


def _serve_cli(folder, monkeypatch, *args, environ=None, requests=()):
    """`gmaivl-rt serve` in this process with the server's run intercepted: (exit code, stderr, [(status, body)])."""
    from fastapi.testclient import TestClient

    from gmaivl_rt.cli import main
    from gmaivl_rt.server import hosting

    for name in ("GMAIVL_API_KEY",):
        monkeypatch.delenv(name, raising=False)
    for name, value in (environ or {}).items():
        monkeypatch.setenv(name, value)
    answers = []

    def run(config):
        app = config.app
        for path, host_header, key in requests:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            with TestClient(app, base_url=f"http://{host_header}") as local:
                response = local.get(path, headers=headers)
                answers.append((response.status_code, response.headers))

    monkeypatch.setattr(hosting, "serve_until_stopped", run)
    code = main(["serve", str(folder), "--port", "8123", "--max-batch-size", "1", *args])
    return code, answers


def test_keys_come_from_a_file_or_the_environment_and_are_never_empty(serving_folder, monkeypatch, tmp_path,
                                                                       capsys):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    checks = [("/v1/models", "127.0.0.1:8123", None), ("/v1/models", "127.0.0.1:8123", KEY)]
    code, answers = _serve_cli(serving_folder, monkeypatch, "--api-key-file", str(key_file), requests=checks)
    assert code == 0 and [a[0] for a in answers] == [401, 200]
    code, answers = _serve_cli(serving_folder, monkeypatch, environ={"GMAIVL_API_KEY": KEY}, requests=checks)
    assert code == 0 and [a[0] for a in answers] == [401, 200]
    code, answers = _serve_cli(serving_folder, monkeypatch, requests=checks)  # no key anywhere: an open server
    assert code == 0 and [a[0] for a in answers] == [200, 200]
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for args, environ in (((("--api-key", "")), None), (("--api-key-file", str(empty)), None),
                          ((), {"GMAIVL_API_KEY": " "})):
        code, answers = _serve_cli(serving_folder, monkeypatch, *args, environ=environ, requests=checks)
        assert code == 2 and answers == [], args  # refused before serving anything
        assert "empty API key" in capsys.readouterr().err


def test_the_host_header_must_name_an_allowed_host(serving_folder, monkeypatch):
    requests = [("/health", "127.0.0.1:8123", None), ("/health", "localhost:8123", None),
                ("/", "attacker.example:8123", None), ("/health", "attacker.example", None)]
    code, answers = _serve_cli(serving_folder, monkeypatch, requests=requests)
    assert code == 0 and [a[0] for a in answers] == [200, 200, 400, 400]
    code, answers = _serve_cli(serving_folder, monkeypatch, "--allowed-hosts", "scanner.lan", requests=requests)
    assert [a[0] for a in answers] == [400, 400, 400, 400]
    code, answers = _serve_cli(serving_folder, monkeypatch, "--allowed-hosts", "*", requests=requests)
    assert [a[0] for a in answers] == [200, 200, 200, 200]


SECURITY_HEADERS = ("content-security-policy", "x-content-type-options", "x-frame-options")


@pytest.fixture(scope="module")
def keyed_server(serving_engine, serve):
    app = create_app(serving_engine, served_model_name="tiny", api_key=KEY, max_request_bytes=10_000,
                     allowed_hosts=["127.0.0.1", "localhost"])
    with serve(app) as server:
        yield server


def test_every_response_carries_the_security_headers(keyed_server):
    url, auth = keyed_server.url, {"Authorization": f"Bearer {KEY}"}
    chat = {"max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    responses = {
        "page": httpx.get(url + "/"), "script": httpx.get(url + "/static/app.js"),
        "style": httpx.get(url + "/static/style.css"), "health": httpx.get(url + "/health"),
        "metrics": httpx.get(url + "/metrics"), "models": httpx.get(url + "/v1/models", headers=auth),
        "no key": httpx.get(url + "/v1/models"), "unknown path": httpx.get(url + "/nothing", headers=auth),
        "bad host": httpx.get(url + "/", headers={"Host": "attacker.example"}),
        "too large": httpx.post(url + "/v1/chat/completions", headers=auth, content=b"x" * 20_000),
        "bad field": httpx.post(url + "/v1/chat/completions", headers=auth, json={**chat, "tools": [{}]}),
        "answer": httpx.post(url + "/v1/chat/completions", headers=auth, json=chat, timeout=60),
        "stream": httpx.post(url + "/v1/chat/completions", headers=auth, json={**chat, "stream": True}, timeout=60),
    }
    statuses = {name: r.status_code for name, r in responses.items()}
    assert statuses == {"page": 200, "script": 200, "style": 200, "health": 200, "metrics": 200, "models": 200,
                        "no key": 401, "unknown path": 404, "bad host": 400, "too large": 413, "bad field": 400,
                        "answer": 200, "stream": 200}
    for name, response in responses.items():
        for header in SECURITY_HEADERS:
            assert header in response.headers, (name, header)
    page = responses["page"].headers
    assert page["x-frame-options"] == "DENY" and page["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in page["content-security-policy"]
    assert "script-src 'self'" in page["content-security-policy"]


# ------------------------------------------------------------------------------------------------ the page
def test_the_page_asks_for_the_key_first_then_shows_the_model(keyed_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(keyed_server.url + "/")
    wait = WebDriverWait(browser, 30)
    key = browser.find_element(By.ID, "api-key")
    wait.until(lambda d: key.is_displayed())
    status = browser.find_element(By.ID, "key-status")
    assert "needs an API key" in status.text
    assert not browser.find_element(By.ID, "file").is_enabled()  # nothing to pick before the key
    key.send_keys("wrong" + Keys.TAB)
    wait.until(lambda d: "not accepted" in status.text)
    key.clear()
    key.send_keys(KEY + Keys.TAB)
    wait.until(lambda d: browser.find_element(By.ID, "model").text == "model: tiny")
    assert status.text == "" and browser.find_element(By.ID, "file").is_enabled()
    # the CSP let the page's own script and style load: the script ran (above) and the style applied
    assert browser.find_element(By.TAG_NAME, "header").value_of_css_property("display") == "flex"
