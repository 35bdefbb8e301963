"""Fuzz `read_medical_image` on mutated copies of real files, in a process of its own (see test_fuzz_readers.py).

    python tests/medical/fuzz_worker.py FORMAT WORK_DIR EXAMPLES SEED_FILE [SEED_FILE ...]

Mutations: bit flips, truncation, length / size fields set to huge values, random bytes and (DICOM) random data
elements inserted, whole header fields replaced. Each input is read from its file and from its bytes through
`to_medical_image` (the service's entry point, default limits) into `read_medical_image`. Each call runs under a
wall-clock bound (SIGALRM) and the process under an address-space bound (RLIMIT_AS), so a hang or a huge allocation
is a finding, not a stuck machine. The only exceptions allowed are InputError's (MedicalImageError, LimitError, and
'not a recognised image' for bytes), naming the input by its role, and none may come from a MemoryError (the reader
must refuse an oversized image from its header, before allocating it). A finding's bytes are saved under
WORK_DIR/findings/ (add them to tests/medical/fuzz_regressions/ once fixed) and the process exits 1 with a JSON report;
success prints the counts."""
from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import struct
import sys
import time

CALL_SECONDS = float(os.environ.get("FUZZ_CALL_SECONDS", "10"))
MEMORY_BYTES = int(float(os.environ.get("FUZZ_MEMORY_GB", "6")) * 2**30)  # address space; torch alone maps ~2 GB
ROLE = "fuzz input"
SUFFIX = {"dicom": ".dcm", "png": ".png", "jpeg": ".jpg", "nifti": ".nii", "nifti-gz": ".nii.gz"}
HUGE = [b"\xff\xff\xff\xff", b"\xff\xff\xff\x7f", b"\x00\x00\x00\x40", b"\xff\xff", b"\xff\x7f", b"\x00\x80"]


class CallTimeout(BaseException):  # BaseException: a reader's `except Exception` must not swallow it
    pass


def _alarm(signum, frame):
    raise CallTimeout()


def mutations(seeds: list[bytes], dicom: bool):
    from hypothesis import strategies as st

    @st.composite
    def mutated(draw):
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(1, 4))):
            if not data:
                break
            # Half the edits land in the first KiB, where the headers a parser branches on live.
            pos = draw(st.integers(0, len(data) - 1) | st.integers(0, min(len(data), 1024) - 1))
            kind = draw(st.sampled_from(["flip", "flip", "truncate", "huge", "insert", "replace"]
                                        + (["element"] if dicom else [])))
            if kind == "flip":
                data[pos] ^= 1 << draw(st.integers(0, 7))
            elif kind == "truncate":
                del data[pos:]
            elif kind == "huge":
                value = draw(st.sampled_from(HUGE))
                data[pos:pos + len(value)] = value
            elif kind == "insert":
                data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
            elif kind == "replace":
                chunk = draw(st.binary(min_size=1, max_size=16))
                data[pos:pos + len(chunk)] = chunk
            else:  # a random explicit-VR data element: group, element, VR, length (often a lie), value
                vr = draw(st.sampled_from([b"US", b"UL", b"OB", b"OW", b"SQ", b"UN", b"DS", b"IS", b"PN", b"UI"]))
                length = draw(st.sampled_from([0, 2, 4, 0xFFFF, 0xFFFFFFFF]))
                head = struct.pack("<HH", draw(st.sampled_from([0x0002, 0x0008, 0x0028, 0x7FE0, 0xFFFE])),
                                   draw(st.integers(0, 0xFFFF))) + vr
                head += struct.pack("<HI", 0, length) if vr in (b"OB", b"OW", b"SQ", b"UN") else \
                    struct.pack("<H", length & 0xFFFF)
                data[pos:pos] = head + draw(st.binary(max_size=16))
        return bytes(data)

    return mutated()


def main(argv: list[str]) -> int:
    fmt, work, examples, seed_files = argv[0], argv[1], int(argv[2]), argv[3:]
    from hypothesis import HealthCheck, Phase, given, settings

    from gmaivl_rt.errors import InputError
    from gmaivl_rt.medical.convert import to_medical_image

    seeds = [open(p, "rb").read() for p in seed_files]
    target = os.path.join(work, "input" + SUFFIX[fmt])
    findings = os.path.join(work, "findings")
    signal.signal(signal.SIGALRM, _alarm)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    stats = {"examples": 0, "decoded": 0, "refused": 0, "slowest_s": 0.0}
    shrink = os.environ.get("FUZZ_SHRINK") == "1"

    def read(data: bytes) -> str | None:
        """None if the reader behaved from the file and from the bytes, else what went wrong (one line)."""
        with open(target, "wb") as f:
            f.write(data)
        for route, source in (("file", target), ("bytes", data)):
            started = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, CALL_SECONDS)
            try:
                to_medical_image(source, role=ROLE)  # the default limits: pixels, voxels, bytes
                stats["decoded"] += 1
            except InputError as e:  # MedicalImageError, LimitError, or 'not a recognised image' for bytes
                stats["refused"] += 1
                if "MemoryError" in str(e) or "not enough memory" in str(e):
                    return f"{route}: allocation over the memory bound, reported as: {e}"
                if not str(e).startswith(ROLE):
                    return f"{route}: error does not name the input by its role: {e}"
            except CallTimeout:
                return f"{route}: no answer within {CALL_SECONDS} s"
            except BaseException as e:  # noqa: BLE001 - anything else is the finding
                return f"{route}: {type(e).__name__} escaped: {' '.join(str(e).split())[:300]}"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                stats["slowest_s"] = max(stats["slowest_s"], round(time.perf_counter() - started, 3))
        return None

    for path in sorted(os.environ.get("FUZZ_REGRESSIONS", "").split(os.pathsep)):
        if path:
            problem = read(open(path, "rb").read())
            if problem:
                print(json.dumps({"format": fmt, "regression": os.path.basename(path), "problem": problem}))
                return 1

    # CI: derandomized (the same inputs every run); `make fuzz` (FUZZ_RANDOM=1): new inputs every run.
    @settings(max_examples=examples, derandomize=os.environ.get("FUZZ_RANDOM") != "1", database=None,
              deadline=None, print_blob=False,
              phases=[Phase.generate, Phase.shrink] if shrink else [Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(mutations(seeds, dicom=fmt == "dicom"))
    def fuzz(data):
        stats["examples"] += 1
        problem = read(data)
        if problem:
            os.makedirs(findings, exist_ok=True)
            saved = os.path.join(findings, f"{fmt}-{hashlib.sha256(data).hexdigest()[:12]}{SUFFIX[fmt]}")
            with open(saved, "wb") as f:
                f.write(data)
            raise AssertionError(f"{problem} (input saved as {saved})")

    try:
        fuzz()
    except AssertionError as e:
        print(json.dumps({"format": fmt, "problem": str(e).splitlines()[0], **stats}))
        return 1
    stats["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(json.dumps({"format": fmt, **stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
