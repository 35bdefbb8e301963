"""Conversion throughput of `gmaivl-rt data build --demo` (images per second), against decoding the same
pictures with the medical reader alone (no PNG, no text, no files) in the same run. Reported in extra_info; no
timing assertions."""
from __future__ import annotations

import os
import statistics
import time

from gmaivl_rt.data.build import build_dataset
from gmaivl_rt.data.sources import demo_datasets
from gmaivl_rt.medical.reader import iter_medical_images, read_medical_image


def _decode_demo() -> int:
    """Decode every picture the demo converts; returns how many."""
    count = 0
    for spec in demo_datasets():
        for name in spec.files:
            path = os.path.join(spec.image_root, name)
            for plane in spec.planes if name.endswith((".nii", ".nii.gz")) else ["axial"]:
                count += sum(1 for _ in iter_medical_images(path, plane=plane, volume=spec.volume))
    return count


def test_demo_conversion_throughput(benchmark, tmp_path):
    read_medical_image(os.path.join(demo_datasets()[0].image_root, "CT_small.dcm"))  # warm imports
    runs = iter(range(100))
    summaries = []

    def build():
        summaries.append(build_dataset(tmp_path / f"run{next(runs)}", demo=True, progress=False))

    benchmark.pedantic(build, rounds=2, iterations=1, warmup_rounds=1)
    build_s = statistics.median(benchmark.stats.stats.data)
    images = summaries[-1]["images_converted"]
    decode_times = []
    _decode_demo()  # warm-up, as the build had
    for _ in range(2):
        start = time.perf_counter()
        decoded = _decode_demo()
        decode_times.append(time.perf_counter() - start)
    decode_s = statistics.median(decode_times)
    assert decoded == images and summaries[-1]["errors"] == 0
    benchmark.extra_info.update(images=images, records=summaries[-1]["records"], build_s=build_s,
                                images_per_second=images / build_s, decode_only_images_per_second=images / decode_s,
                                build_vs_decode_time_ratio=build_s / decode_s,
                                # the build's own figure, without the summary plot and imports
                                conversion_images_per_second=summaries[-1]["images_per_second"])
    print(f"\ndemo build: {images} images, {summaries[-1]['records']} records in {build_s:.2f} s "
          f"({images / build_s:.0f} images/s end to end, {summaries[-1]['images_per_second']:.0f} without the "
          f"summary figure); decoding alone {images / decode_s:.0f} images/s "
          f"(build takes {build_s / decode_s:.2f}x the decode time)")
