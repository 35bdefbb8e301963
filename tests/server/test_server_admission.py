"""Image admission control over HTTP (issue 25 item 5): a request's decoded pixels are read from the image headers and
refused before anything is decoded (413 over the per-request budget, 429 with Retry-After over the server's), decoding
runs in a pool of its own, and the page, its files and /health are answered while that pool and the HTTP thread pool
are both taken. Real uvicorn servers on free loopback ports, httpx as the client."""
from __future__ import annotations

import asyncio
import io
import re
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402
from server_fixtures import data_uri, wait_until  # noqa: E402

from gmaivl_rt.limits import DecodeBudget  # noqa: E402
from gmaivl_rt.server import app as app_module  # noqa: E402
from gmaivl_rt.server import create_app  # noqa: E402

MODEL = "tiny-admission"


def png16(height: int, width: int) -> bytes:
    """A 16-bit greyscale PNG of a smooth ramp (compresses well: large pictures, small requests)."""
    ramp = (np.add.outer(np.arange(height), np.arange(width)) % 4096).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    return buffer.getvalue()


def chat_body(*images: bytes) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_uri(data, "image/png")}} for data in images]
    return {"model": MODEL, "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe the image."}]}]}


def post(server, body, timeout=120):
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=timeout)


def gauge(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


@pytest.fixture
def counted_decodes(monkeypatch):
    """Every call of the server's decode step (`boundary.decode_images`), counted image by image."""
    calls = []
    real = app_module.decode_images

    def counting(received, limits):
        calls.extend(image.role for image in received)
        return real(received, limits)

    monkeypatch.setattr(app_module, "decode_images", counting)
    return calls


@pytest.fixture
def gated_decodes(monkeypatch):
    """The server's decode step held at a gate: `started` lists the requests that reached it (in the decode pool),
    `gate.set()` lets them go on."""
    gate, started, lock = threading.Event(), [], threading.Lock()
    real = app_module.decode_images

    def gated(received, limits):
        with lock:
            started.append(threading.current_thread().name)
        assert gate.wait(120), "the test never opened the gate"
        return real(received, limits)

    monkeypatch.setattr(app_module, "decode_images", gated)
    yield gate, started
    gate.set()


def test_the_reports_request_is_refused_with_413_from_the_headers_before_any_decoding(serving_engine, serve,
                                                                                         counted_decodes):
    """The report's request: eight 16-bit 7000x7000 PNGs (each under the 50 MP per-image limit). With the default
    budget it gets a 413 at the header that takes it over the limit (the first k images' k x 7000 x 7000 pixels,
    counted here from the arrays the test made) naming the limit, and no image is decoded; one small picture on the
    same server is decoded (the counter sees decodes).
    Mutant: `ImageDecoding.check_request` never refusing: the eight pictures are decoded (and answered)."""
    big = png16(7000, 7000)
    with serve(create_app(serving_engine, served_model_name=MODEL)) as server:
        refused = post(server, chat_body(*[big] * 8))
        assert counted_decodes == []
        small = post(server, chat_body(png16(64, 48)))
    assert refused.status_code == 413, refused.text
    error = refused.json()["error"]
    assert error["type"] == "RequestEntityTooLarge" and error["code"] == 413
    limit = DecodeBudget().max_request_pixels
    over = next(k for k in range(1, 9) if k * 7000 * 7000 > limit)
    assert f"images 1 to {over} decode to {over * 7000 * 7000} pixel values" in error["message"]
    assert f"the limit per request is {limit}" in error["message"]
    assert small.status_code == 200, small.text
    assert counted_decodes == ["image 1"]


def test_colour_counts_three_times_and_dicom_frames_are_counted_from_their_header(serving_engine, serve,
                                                                                  counted_decodes):
    """The per-request budget counts what the reader decodes: a colour picture three values per pixel (an RGB PNG of
    100x100 = 30000 values is over a 20000 budget, the same size greyscale is not); a DICOM's Rows x Columns read
    by pydicom from its header (CT_small: 128 x 128 = 16384, over a 16000 budget, refused undecoded).
    Mutant: `pillow_decoded_pixels` counting one value per colour pixel: the RGB picture is decoded and answered."""
    import pydicom
    from pydicom.data import get_testdata_file

    rgb, grey = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (100, 100), (10, 200, 30)).save(rgb, format="PNG")
    Image.new("L", (100, 100), 90).save(grey, format="PNG")
    ct = open(get_testdata_file("CT_small.dcm"), "rb").read()
    header = pydicom.dcmread(io.BytesIO(ct), stop_before_pixels=True)
    budget = DecodeBudget(max_request_pixels=20_000, max_server_pixels=40_000)
    with serve(create_app(serving_engine, served_model_name=MODEL, decode_budget=budget)) as server:
        colour = post(server, chat_body(rgb.getvalue()))
        assert counted_decodes == []
        grey_answer = post(server, chat_body(grey.getvalue()))
    budget = DecodeBudget(max_request_pixels=16_000, max_server_pixels=40_000)
    with serve(create_app(serving_engine, served_model_name=MODEL, decode_budget=budget)) as server:
        dicom_body = chat_body()
        dicom_body["messages"][0]["content"].insert(0, {"type": "image_url", "image_url": {
            "url": data_uri(ct, "application/dicom")}})
        dicom = post(server, dicom_body)
    assert colour.status_code == 413 and "image 1 decodes to 30000 pixel values" in colour.json()["error"]["message"]
    assert grey_answer.status_code == 200, grey_answer.text
    assert dicom.status_code == 413
    assert f"{header.Rows * header.Columns} pixel values" in dicom.json()["error"]["message"]
    assert counted_decodes == ["image 1"]  # the greyscale picture only


def test_requests_over_the_server_budget_get_429_while_the_admitted_ones_are_served(serving_engine, serve,
                                                                                   gated_decodes):
    """A server budget of two pictures: two requests are admitted and held in the decode pool (the test's gate);
    two more sent meanwhile get 429 with Retry-After at once, undecoded; once the gate opens the first two answer
    200, and when their pictures are freed the budget is whole again (the gauge reads 0), so a later request is
    served. Mutant: `PixelBudget.try_reserve` never refusing: the later two wait in the pool and answer 200."""
    gate, started = gated_decodes
    picture = png16(300, 400)  # 120000 values
    budget = DecodeBudget(max_request_pixels=120_000, max_server_pixels=240_000, decode_workers=2)
    with serve(create_app(serving_engine, served_model_name=MODEL, decode_budget=budget)) as server:
        admitted = []
        threads = [threading.Thread(target=lambda: admitted.append(post(server, chat_body(picture))))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(started) == 2, what="two requests decoding")
        assert gauge(server, "gmaivl:image_decode_pixels_in_use") == 240_000
        excess = [post(server, chat_body(picture), timeout=30) for _ in range(2)]
        assert len(started) == 2  # refused before the decode step
        gate.set()
        for thread in threads:
            thread.join(120)
        wait_until(lambda: gauge(server, "gmaivl:image_decode_pixels_in_use") == 0, what="the budget to come back")
        later = post(server, chat_body(picture))
    assert [r.status_code for r in admitted] == [200, 200], [r.text for r in admitted]
    for response in excess:
        assert response.status_code == 429, response.text
        assert response.headers["retry-after"] == str(budget.retry_after_s)
        assert response.json()["error"]["type"] == "TooManyRequests"
        assert "120000" in response.json()["error"]["message"]
    assert later.status_code == 200


def _exhaust_thread_pool(loop) -> callable:
    """Take every token of anyio's default thread limiter on the server's event loop `loop` (the pool
    `run_in_threadpool`, FileResponse and StaticFiles use). Returns a function that gives them back."""
    borrowers = []

    async def take():
        import anyio.to_thread

        limiter = anyio.to_thread.current_default_thread_limiter()
        while limiter.available_tokens:
            borrower = object()
            await limiter.acquire_on_behalf_of(borrower)
            borrowers.append((limiter, borrower))

    asyncio.run_coroutine_threadsafe(take(), loop).result(30)

    def give_back():
        async def release():
            for limiter, borrower in borrowers:
                limiter.release_on_behalf_of(borrower)

        asyncio.run_coroutine_threadsafe(release(), loop).result(30)

    return give_back


def test_page_files_and_health_answer_while_the_decode_pool_and_the_thread_pool_are_taken(serving_engine, serve,
                                                                                          gated_decodes):
    """The decode pool (one worker) held by a request at the test's gate with a second request queued behind it,
    and every token of the HTTP thread pool taken: GET /, /static/app.js, /static/style.css, /health, /metrics and
    /v1/models all answer 200 with their content, before the gate opens (so they did not wait on either pool); the
    image requests are answered once both are given back.
    Mutant: the page served by FileResponse again (a file read in the thread pool): GET / times out."""
    gate, started = gated_decodes
    budget = DecodeBudget(decode_workers=1)
    app = create_app(serving_engine, served_model_name=MODEL, decode_budget=budget)
    loops = []

    async def loop_catcher(scope, receive, send):  # the server's event loop, for the thread pool's limiter
        if not loops:
            loops.append(asyncio.get_running_loop())
        await app(scope, receive, send)

    with serve(loop_catcher) as server:
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(post(server, chat_body(png16(64, 64)))))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(started) == 1 and gauge(server, "gmaivl:image_decode_requests") == 2,
                   what="one request decoding and one queued")
        give_back = _exhaust_thread_pool(loops[0])
        try:
            with httpx.Client(base_url=server.url, timeout=10) as client:
                served = {path: client.get(path) for path in ("/", "/static/app.js", "/static/style.css", "/health",
                                                                "/metrics", "/v1/models")}
            assert not gate.is_set() and len(started) == 1
        finally:
            give_back()
            gate.set()
        for thread in threads:
            thread.join(120)
    assert {path: r.status_code for path, r in served.items()} == dict.fromkeys(served, 200)
    static = app_module.STATIC
    assert served["/"].content == (static / "index.html").read_bytes()
    assert served["/"].headers["content-type"].startswith("text/html")
    assert served["/static/app.js"].content == (static / "app.js").read_bytes()
    assert "javascript" in served["/static/app.js"].headers["content-type"]
    assert served["/static/style.css"].headers["content-type"].startswith("text/css")
    assert "gmaivl:image_decode_requests 2.0" in served["/metrics"].text
    assert [r.status_code for r in answers] == [200, 200]


def _sample_images() -> dict:
    """Images of every reader, as bytes: PNG (16-bit grey, 8-bit RGB), a JPEG whose ICC profile pushes its header
    past HEAD_BYTES (a large ICC profile), a TIFF, DICOMs (pydicom's CT, MR and a multi-frame colour one), NIfTI
    plain and gzipped."""
    import gzip

    import nibabel as nib
    from pydicom.data import get_testdata_file

    from gmaivl_rt.server.boundary import HEAD_BYTES

    def saved(array, fmt, **kwargs):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=fmt, **kwargs)
        return buffer.getvalue()

    rgb = (np.arange(120 * 90 * 3).reshape(120, 90, 3) % 251).astype(np.uint8)
    icc = bytes(range(256)) * (HEAD_BYTES // 256 + 8)  # stored in APP2 segments before the frame header
    volume = nib.Nifti1Image(np.arange(20 * 18 * 6, dtype=np.int16).reshape(20, 18, 6), np.eye(4))
    nifti = volume.to_bytes()
    return {"png16": png16(300, 200), "png rgb": saved(rgb, "PNG"), "jpeg big icc": saved(rgb, "JPEG", icc_profile=icc),
            "tiff": saved(rgb, "TIFF"), "ct dicom": open(get_testdata_file("CT_small.dcm"), "rb").read(),
            "mr dicom": open(get_testdata_file("MR_small.dcm"), "rb").read(),
            "colour dicom": open(get_testdata_file("examples_ybr_color.dcm"), "rb").read(),
            "nifti": nifti, "nifti gz": gzip.compress(nifti)}


def test_the_head_gives_the_whole_files_count_or_none():
    """`head_pixels` reads only an inline image's first HEAD_BYTES bytes; so that a refusal from it is the refusal
    the whole file would get, every header cut short must give no count (the readers raise on it) and a head holding
    the whole header the whole file's count. Checked for each reader's format at cuts from 8 bytes to the whole file,
    against `decoded_pixels` of the whole file and, for the pictures, Pillow's / pydicom's own sizes.
    Mutant: `head_pixels` counting a head the reader refused as 0 pixels (not None): failed (a count of 0)."""
    import pydicom

    from gmaivl_rt.medical.convert import decoded_pixels
    from gmaivl_rt.server import boundary
    from gmaivl_rt.server.media import data_uri_head

    for name, data in _sample_images().items():
        whole = decoded_pixels(io.BytesIO(data))
        if name.startswith(("png", "jpeg", "tiff")):
            picture = Image.open(io.BytesIO(data))
            assert whole == picture.size[0] * picture.size[1] * (1 if picture.mode in ("L", "I;16") else 3), name
        elif "dicom" in name:
            ds = pydicom.dcmread(io.BytesIO(data))
            assert whole == ds.Rows * ds.Columns * int(ds.SamplesPerPixel), name
        counts = {}
        for cut in sorted({8, 16, 40, 200, 1000, 3000, 10000, 40000, len(data) - 1, len(data)}):
            if 0 < cut <= len(data):
                url = data_uri(data[:cut], "application/octet-stream")
                counts[cut] = boundary.head_pixels(url, "image 1", boundary.Limits())
                assert data_uri_head(url, boundary.HEAD_BYTES) == data[:cut][:boundary.HEAD_BYTES]
        assert set(counts.values()) <= {None, whole}, (name, counts)
        whole_url = data_uri(data, "application/octet-stream")
        head = boundary.head_pixels(whole_url, "image 1", boundary.Limits())
        if name == "jpeg big icc":  # its header ends past the head: read whole
            assert head is None and len(data) > boundary.HEAD_BYTES
        elif name != "tiff":  # Pillow may read a TIFF's directory from past the head, or not: either is right
            assert head == whole, name


def test_a_request_over_its_budget_is_refused_without_reading_its_images_whole(serving_engine, serve,
                                                                               monkeypatch, tmp_path):
    """Three 300x200 16-bit PNGs against a per-request budget of two: 413 at image 3, and no image's base64 was
    decoded whole (`read_image_url` never called: each header came from its head); admitted under a larger budget,
    all three are read whole and answered. With an audit log, the refused request's images are still all read and
    digested (the log records what was sent).
    Mutant: the head check left out of `receive_images`: images 1 and 2 read whole before the refusal (2 calls)."""
    from gmaivl_rt.server import boundary

    reads = []
    real = boundary.read_image_url

    def counting(url, **kwargs):
        reads.append(kwargs["role"])
        return real(url, **kwargs)

    monkeypatch.setattr(boundary, "read_image_url", counting)
    picture = png16(300, 200)
    tight = DecodeBudget(max_request_pixels=2 * 300 * 200)
    with serve(create_app(serving_engine, served_model_name=MODEL, decode_budget=tight)) as server:
        refused = post(server, chat_body(picture, picture, picture))
        refused_reads, reads[:] = list(reads), []
    audit = tmp_path / "audit.jsonl"
    with serve(create_app(serving_engine, served_model_name=MODEL, decode_budget=tight, audit_log=audit)) as server:
        audited = post(server, chat_body(picture, picture, picture))
        audited_reads, reads[:] = list(reads), []
    with serve(create_app(serving_engine, served_model_name=MODEL)) as server:
        admitted = post(server, chat_body(picture, picture, picture))
    assert refused.status_code == 413, refused.text
    assert f"images 1 to 3 decode to {3 * 300 * 200} pixel values" in refused.json()["error"]["message"]
    assert refused_reads == []
    assert audited.status_code == 413 and audited_reads == ["image 1", "image 2", "image 3"]
    import hashlib
    import json

    logged = json.loads(audit.read_text().splitlines()[-1])
    assert logged["image_sha256"] == [hashlib.sha256(picture).hexdigest()] * 3
    assert admitted.status_code == 200, admitted.text
    assert reads == ["image 1", "image 2", "image 3"]
