"""Shared pieces of the HTTP server tests and benchmark: the chat texts their tiny model's tokenizer is trained on,
data URIs, a DICOM that carries a known patient name and ID, and a log recorder."""
from __future__ import annotations

import base64
import io
import logging
import time

TEXTS = ["<image>\nWhat modality is this image?", "This is a CT scan of the chest.", "Which plane is shown?",
         "An axial slice.", "Describe the image.", "A magnetic resonance image of the head."] * 20
QUESTION = "What modality is this image?"
PATIENT_NAME, PATIENT_ID = "Quixote^Dulcinea", "PID-7731-QX"


def data_uri(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def dicom_with_identity(truncate_pixels: bool = False) -> bytes:
    """pydicom's CT_small.dcm with a known patient name and ID; with `truncate_pixels` its pixel data is cut so it
    cannot decode (bad input that still carries the identity in its header)."""
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    if truncate_pixels:
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class LogRecorder(logging.Handler):
    """Every log record of the named loggers (and the root), formatted with its traceback, kept as text."""

    LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "gmaivl_rt", "pydicom")

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record):
        self.lines.append(self.format(record))

    def __enter__(self):
        for name in self.LOGGERS:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc):
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def wait_until(condition, timeout: float = 60.0, what: str = "condition") -> None:
    """Poll `condition()` every 10 ms until it is true; fail the test naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def wait_until_serving(child, url: str, timeout: float = 180.0) -> None:
    """Poll a served process's /health (every 0.5 s) until it answers 200; fail naming the child's state (`child`:
    conftest's start_child handle) if it dies or `timeout` seconds pass first."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert child.alive(), child.why()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the server did not answer /health within {timeout:.0f} s; {child.why()}")


def ask_on_page(browser, wait, question: str, max_tokens: int, *toggles: str) -> None:
    """On the served page (selenium `browser`, `wait` a WebDriverWait): type `question` and `max_tokens`, click each
    of `toggles` (element ids, e.g. "structured", "write-sr"), press Ask and wait until the answer has ended
    (`#answer[data-done]` "true" or "error")."""
    from selenium.webdriver.common.by import By

    for field, value in (("question", question), ("max-tokens", str(max_tokens))):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    for toggle in toggles:
        browser.find_element(By.ID, toggle).click()
    browser.find_element(By.ID, "ask").click()
    wait.until(lambda d: d.find_element(By.ID, "answer").get_attribute("data-done") in ("true", "error"))
