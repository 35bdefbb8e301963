"""Image admission control: what decoding may cost, checked from the images' headers before anything is decoded,
and decoding in a bounded pool of its own.

The limits are `gmaivl_rt.limits.DecodeBudget`'s. A request's images are received (data URI, file, fetch) and their
headers read (`gmaivl_rt.medical.convert.decoded_pixels`) first; then

* over `max_request_pixels` in all -> 413 (the request could never be decoded);
* over what is left of `max_server_pixels` -> 429 with Retry-After (come back when others are done);
* else the pixels are reserved and the images decoded in `ImageDecoding`'s thread pool (`decode_workers` threads,
  apart from the event loop and from the threads that serve the page, /health and streams).

A reservation lasts until the request's decoded pictures are freed (the engine has preprocessed them: only its
small tensors stay) or the request ends, whichever comes first. After a large request the freed memory is handed back
to the operating system (`return_memory`: glibc keeps freed heap pages otherwise; the report saw RSS stay 1.1 GB
higher after four large requests).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import functools
import sys
import threading
import weakref

from gmaivl_rt.limits import DecodeBudget


class BudgetRefusal(Exception):
    """A request refused by the decode budget: `status` 413 (too large for one request) or 429 (the server budget is
    busy; `retry_after_s`), `message` for the client (numbers only)."""

    def __init__(self, status: int, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after_s = status, message, retry_after_s


class PixelBudget:
    """The server-wide count of decoded pixel values reserved, at most `capacity`; thread-safe, never blocks."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self._lock = threading.Lock()
        self._in_use = 0
        self.peak = 0  # the most reserved at once since the start

    @property
    def in_use(self) -> int:
        return self._in_use

    def try_reserve(self, pixels: int) -> "Reservation | None":
        """A reservation of `pixels`, or None when that would go over the capacity."""
        with self._lock:
            if self._in_use + pixels > self.capacity:
                return None
            self._in_use += pixels
            self.peak = max(self.peak, self._in_use)
        return Reservation(self, pixels)

    def _give_back(self, pixels: int) -> None:
        with self._lock:
            self._in_use -= pixels


class Reservation:
    """Pixels held in a `PixelBudget` until `release()` (idempotent, thread-safe), or until every array passed to
    `release_when_freed` has been freed."""

    def __init__(self, budget: PixelBudget, pixels: int):
        self.budget, self.pixels = budget, pixels
        self._lock = threading.Lock()
        self._held = True
        self._waiting_for = 0
        self.on_release: list = []  # called once, after the pixels went back

    @property
    def held(self) -> bool:
        return self._held

    def release(self) -> None:
        with self._lock:
            if not self._held:
                return
            self._held = False
        self.budget._give_back(self.pixels)
        for callback in self.on_release:
            callback(self)

    def release_when_freed(self, arrays) -> None:
        """Release once every array of `arrays` (numpy arrays: the decoded pictures) has been garbage-collected; an
        empty list releases at once."""
        arrays = list(arrays)
        if not arrays:
            self.release()
            return
        with self._lock:
            self._waiting_for += len(arrays)
        for array in arrays:
            weakref.finalize(array, self._one_freed)

    def _one_freed(self) -> None:
        with self._lock:
            self._waiting_for -= 1
            last = self._waiting_for == 0
        if last:
            self.release()


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and others have no malloc_trim
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def return_memory() -> bool:
    """Hand freed heap memory back to the operating system (glibc `malloc_trim(0)`: the top of every arena and its
    free pages). Large decodes free many mid-sized blocks (Pillow's image blocks, numpy temporaries under glibc's
    mmap threshold) that glibc would otherwise keep mapped. Returns whether anything could be asked (False where the
    C library is not glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def import_readers() -> None:
    """Import the image readers' libraries (Pillow's plugins, pydicom and its pixel handlers, nibabel): a second or
    more on a cold start, otherwise paid by the first image request, its 413 / 429 included."""
    import nibabel  # noqa: F401
    import pydicom.pixels  # noqa: F401
    from PIL import Image

    Image.init()


class ImageDecoding:
    """One server's image admission: the `PixelBudget` and the decode pool.

        reservation = decoding.admit(pixels_per_image)         # raises BudgetRefusal (413 / 429)
        images = await decoding.decode(fn, reservation)         # fn() runs in the decode pool
    """

    def __init__(self, budget: DecodeBudget | None = None):
        self.budget = budget or DecodeBudget()
        self.pixels = PixelBudget(self.budget.max_server_pixels)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.budget.decode_workers,
                                                          thread_name_prefix="gmaivl-decode")
        self._lock = threading.Lock()
        self.decoding = 0  # requests in the pool (running or queued)
        self.pool.submit(import_readers)  # the first image request should not wait for pydicom / nibabel to import

    def check_request(self, pixels_per_image: list[int]) -> None:
        """413 (BudgetRefusal) when the request's first images (their counts so far) already decode to more than
        one request may take."""
        total, limit = sum(pixels_per_image), self.budget.max_request_pixels
        if total > limit:
            count = len(pixels_per_image)
            images = "image 1 decodes" if count == 1 else f"images 1 to {count} decode"
            raise BudgetRefusal(413, f"the request's {images} to {total} pixel values; the limit per request is "
                                     f"{limit} (--max-request-pixels)")

    def admit(self, pixels_per_image: list[int]) -> Reservation:
        """A reservation of the request's pixels in the server budget: BudgetRefusal 413 over the per-request
        limit, 429 (with retry_after_s) when the server budget has not that much left now."""
        self.check_request(pixels_per_image)
        total = sum(pixels_per_image)
        reservation = self.pixels.try_reserve(total)
        if reservation is None:
            retry = self.budget.retry_after_s
            raise BudgetRefusal(429, f"the server is decoding other images ({self.pixels.in_use} of "
                                     f"{self.pixels.capacity} pixel values in use, this request needs {total}); "
                                     f"retry in {retry} s", retry_after_s=retry)
        if total >= self.budget.trim_after_pixels:
            reservation.on_release.append(lambda _: self.pool.submit(return_memory))
        return reservation

    async def decode(self, fn, reservation: Reservation):
        """`fn()` (it decodes the reserved images) in the decode pool, awaited without blocking the event loop. If
        it raises, the reservation is released."""
        with self._lock:
            self.decoding += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(
                self._run, fn, reservation))
        except BaseException:
            reservation.release()
            raise
        finally:
            with self._lock:
                self.decoding -= 1

    def _run(self, fn, reservation: Reservation):
        result = fn()
        if reservation.pixels >= self.budget.trim_after_pixels:
            return_memory()  # the decoders' temporaries are freed by now
        return result

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
