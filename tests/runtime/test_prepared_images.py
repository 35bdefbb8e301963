"""Prepared images kept for follow-up questions (`gmaivl_rt.runtime.prepared_images`, issue 29): a follow-up about
the same image is neither decoded nor resized again, and what it gets is exactly what the reader and the CLIP
preprocessing make of the image as it is now (a changed file, other reader options or other limits are never
served from the cache). References: the medical reader + `model.preprocess` called directly, and the same runtime
with the cache off (`prepared_image_cache_bytes=0`)."""
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

import gmaivl_rt
from gmaivl_rt import Engine, LimitError, Limits
from gmaivl_rt.medical import convert
from gmaivl_rt.medical.reader import read_medical_image
from gmaivl_rt.model import preprocess
from gmaivl_rt.runtime import prepared_images
from gmaivl_rt.runtime import request as request_module
from gmaivl_rt.runtime.prepared_images import PreparedImage, PreparedImageCache

CT = get_testdata_file("CT_small.dcm")
TEXTS = ["<image>\nWhat modality is this image?", "A CT scan of the chest.", "Which plane is shown?",
         "An axial slice.", "Describe the image.", "Is there a fracture?"] * 20
QUESTIONS = ["What modality is this image?", "Which plane is shown?", "Describe the image.", "Is there a fracture?"]
GREEDY = {"max_new_tokens": 6, "eos_token_id": [], "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}


@pytest.fixture(scope="module")
def folder(tiny_model_folder):
    return tiny_model_folder(TEXTS, "prepared_images")


@pytest.fixture(scope="module")
def loaded(folder):
    return gmaivl_rt.load(folder)


@pytest.fixture
def runtime(loaded):
    """The module's runtime with an empty cache of the default size."""
    loaded.prepared_images = PreparedImageCache()
    return loaded


def _png(path, seed, size=(30, 41)):
    Image.fromarray((np.random.RandomState(seed).rand(*size, 3) * 255).astype(np.uint8)).save(path)
    return path


def _expected(runtime, path, **reader):
    """The file read and preprocessed as the boundary did before the cache: the independent reference."""
    return preprocess.preprocess_image(read_medical_image(path, **reader).pixels, runtime.config.vision.image_size)


@pytest.fixture
def counted(monkeypatch):
    """Counts of image decodes (the medical reader, as `to_medical_image` calls it) and resizes (CLIP
    preprocessing)."""
    counts = {"decode": 0, "resize": 0}
    read, resize = convert.read_medical_image, preprocess.preprocess_image

    def counted_read(*args, **kwargs):
        counts["decode"] += 1
        return read(*args, **kwargs)

    def counted_resize(*args, **kwargs):
        counts["resize"] += 1
        return resize(*args, **kwargs)

    monkeypatch.setattr(convert, "read_medical_image", counted_read)
    monkeypatch.setattr(preprocess, "preprocess_image", counted_resize)
    return counts


def test_three_follow_ups_decode_and_resize_the_image_once(folder, tmp_path, counted):
    """A first question and three follow-ups about one PNG file through the engine: the image is decoded and
    resized once (the old boundary: four times each), and every answer equals the same engine's with the cache
    off. Mutant seen failing: `prepare_images` not consulting the cache (decode 4, resize 4)."""
    path = _png(tmp_path / "scan.png", 1)
    with Engine(folder, max_batch_size=2) as engine:
        cached = [engine.ask(q, str(path), **GREEDY) for q in QUESTIONS]
        assert engine.backend.prepared_images.hits == 3
    assert counted == {"decode": 1, "resize": 1}
    with Engine(folder, max_batch_size=2, prepared_image_cache_bytes=0) as engine:
        uncached = [engine.ask(q, str(path), **GREEDY) for q in QUESTIONS]
        assert len(engine.backend.prepared_images) == 0
    assert counted == {"decode": 5, "resize": 5}
    assert cached == uncached


@pytest.mark.parametrize("form", ["array", "tensor", "medical_image", "bytes"])
def test_every_cached_form_is_prepared_once_and_equal(runtime, tmp_path, counted, form):
    """Arrays, tensors, MedicalImages (what the HTTP server hands the engine) and raw bytes: the follow-up is served
    from the cache with pixel values and keys equal to the first. Mutant seen failing: a digest of an array without
    its values (dtype and shape only): the second array's pixels were the first's."""
    path = _png(tmp_path / "x.png", 2)
    array = np.array(Image.open(path))
    given = {"array": lambda a: a, "tensor": torch.from_numpy, "bytes": lambda a: _png_bytes(a, tmp_path),
             "medical_image": lambda a: convert.to_medical_image(a)}[form]
    expected = _expected(runtime, path)
    first = runtime.build_request("q", given(array), max_new_tokens=1)
    resizes = counted["resize"]
    again = runtime.build_request("another q", given(array.copy()), max_new_tokens=1)
    assert counted["resize"] == resizes
    assert torch.equal(first.pixel_values, again.pixel_values) and first.image_keys == again.image_keys
    assert torch.equal(first.pixel_values[0], expected)
    other = array.copy()
    other[0, 0] = 255 - other[0, 0]
    changed = runtime.build_request("q", given(other), max_new_tokens=1)
    assert counted["resize"] == resizes + 1 and changed.image_keys != first.image_keys


def _png_bytes(array, tmp_path):
    Image.fromarray(array).save(tmp_path / "b.png")
    return (tmp_path / "b.png").read_bytes()


def test_a_changed_file_is_never_served_from_the_cache(runtime, tmp_path, counted):
    """Same path, new bytes (and the old modification time put back, so neither name nor mtime tells): the new
    picture is decoded and served; the same bytes under another path are a hit. Mutant seen failing: the digest of
    a path taken from its name instead of its bytes (the old picture served after the change)."""
    path = tmp_path / "scan.png"
    _png(path, 3)
    first = runtime.build_request("q", path, max_new_tokens=1).pixel_values[0]
    stat = os.stat(path)
    _png(path, 4)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    decodes = counted["decode"]
    after = runtime.build_request("q", path, max_new_tokens=1).pixel_values[0]
    assert counted["decode"] == decodes + 1
    assert torch.equal(after, _expected(runtime, path)) and not torch.equal(after, first)
    copy = tmp_path / "copy.png"
    copy.write_bytes(path.read_bytes())
    assert torch.equal(runtime.build_request("q", copy, max_new_tokens=1).pixel_values[0], after)
    assert counted["decode"] == decodes + 1


def test_a_file_changed_between_hashing_and_decoding_stores_what_was_hashed(runtime, tmp_path, monkeypatch):
    """The file is replaced right after its bytes were hashed: the entry stored under that digest must still be the
    picture of those bytes, so a later request with the first content gets the first picture. Mutant seen failing:
    decoding the path again on a miss instead of the bytes hashed (the second picture stored under the first's
    digest)."""
    path = tmp_path / "race.png"
    _png(path, 5)
    first_bytes = path.read_bytes()
    expected_first = _expected(runtime, path)
    digest = prepared_images.content_digest

    def digest_then_change(obj, *args):
        found = digest(obj, *args)
        _png(path, 6)  # the file changes after it was hashed, before it is decoded
        return found

    monkeypatch.setattr(prepared_images, "content_digest", digest_then_change)
    runtime.build_request("q", path, max_new_tokens=1)
    monkeypatch.setattr(prepared_images, "content_digest", digest)
    path.write_bytes(first_bytes)
    assert torch.equal(runtime.build_request("q", path, max_new_tokens=1).pixel_values[0], expected_first)


def test_reader_options_and_limits_are_part_of_the_key(runtime, counted):
    """A CT DICOM with its own window, then the lung window: each gets its own pixels (equal to the reader's);
    a picture admitted before is refused once the runtime's limits shrink below it. Mutant seen failing: a digest
    without the reader options and limits (the lung window served the file's window; the shrunk limit passed)."""
    plain = runtime.build_request("q", CT, max_new_tokens=1).pixel_values[0]
    lung = runtime.build_request("q", CT, window="lung", max_new_tokens=1).pixel_values[0]
    assert torch.equal(plain, _expected(runtime, CT)) and torch.equal(lung, _expected(runtime, CT, window="lung"))
    assert not torch.equal(plain, lung)
    try:
        runtime.limits = Limits(max_image_pixels=100)
        with pytest.raises(LimitError):
            runtime.build_request("q", CT, max_new_tokens=1)
    finally:
        runtime.limits = Limits()


def _entry(values: int) -> PreparedImage:
    return PreparedImage(torch.zeros(values), 1, str(values))


def test_the_cache_is_a_bounded_lru(folder):
    """At most max_bytes of pixels, least recently used out first, an entry bigger than the bound not kept, 0 keeps
    nothing, a bad size refused. Mutant seen failing: `put` without its eviction loop (bytes over the bound)."""
    cache = PreparedImageCache(max_bytes=3 * 400)  # three entries of 100 float32
    for name in "abc":
        cache.put(name, _entry(100))
    assert cache.get("a") is not None  # a is now the most recent: b goes first
    cache.put("d", _entry(100))
    assert cache.get("b") is None and all(cache.get(k) is not None for k in "acd")
    assert cache.bytes_used == 1200 and len(cache) == 3
    cache.put("big", _entry(301))
    assert cache.get("big") is None and cache.bytes_used == 1200
    cache.put("two", _entry(200))
    assert cache.bytes_used <= 1200 and cache.get("two") is not None
    off = PreparedImageCache(max_bytes=0)
    off.put("a", _entry(1))
    assert len(off) == 0
    for bad in (-1, 1.5, True, "64"):
        with pytest.raises(ValueError):
            PreparedImageCache(max_bytes=bad)
    with pytest.raises(ValueError):
        gmaivl_rt.load(folder, prepared_image_cache_bytes=-1)


def test_threads_preparing_the_same_images_get_the_right_pixels(runtime, tmp_path):
    """8 threads asking about 4 files at once (hits and misses racing): every request gets its file's pixels and
    the cache's byte count matches its entries."""
    paths = [_png(tmp_path / f"{i}.png", 10 + i) for i in range(4)]
    expected = [_expected(runtime, p) for p in paths]
    runtime.prepared_images = PreparedImageCache(max_bytes=3 * expected[0].numel() * 4)  # evictions too
    failures = []

    def work(t):
        for k in range(12):
            i = (t + k) % 4
            got = runtime.build_request("q", paths[i], max_new_tokens=1).pixel_values[0]
            if not torch.equal(got, expected[i]):
                failures.append((t, k))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cache = runtime.prepared_images
    assert not failures
    assert cache.bytes_used == sum(e.pixels.numel() * 4 for e in cache._entries.values()) <= cache.max_bytes
    assert cache.hits and cache.misses


def test_uncacheable_forms_go_the_usual_way(runtime, tmp_path, counted):
    """A file object, a PIL image and a file whose format is known only by its suffix are decoded every time
    (no digest), with the same pixels as the path."""
    path = _png(tmp_path / "y.png", 7)
    want = runtime.build_request("q", path, max_new_tokens=1).pixel_values
    decodes = counted["decode"]
    for _ in range(2):
        with open(path, "rb") as f:
            assert torch.equal(runtime.build_request("q", f, max_new_tokens=1).pixel_values, want)
        assert torch.equal(runtime.build_request("q", Image.open(path), max_new_tokens=1).pixel_values, want)
    assert counted["decode"] == decodes + 4
    assert request_module.prepare_images([], runtime.config.vision, Limits()) == []
