"""Asking about a study in a DICOMweb archive and writing the answer back as a DICOM Structured Report:
`ask_archive(runtime, question, DicomWebRef(...), write_sr=True)`, the `gmaivl-rt ask --dicomweb URL --study UID`
path (docs/hospital.md).

The image is read by `gmaivl_rt.medical.dicomweb.fetch_study` (the series / instance choice rule, limits before
download) and crosses the same request boundary as a file (`Backend.ask`); the report is built by
`gmaivl_rt.medical.structured_report.answer_report` from the instances the answer was made from and the model's
identity (`model_algorithm`: its folder's name, a version and the weights' SHA-256 from the checkpoint metadata), and
is stored with STOW-RS (`write_sr`) and / or written to a file (`sr_out`, atomically). Nothing is written anywhere
before the answer exists, and a failed answer writes nothing.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

# Files of a model or exported folder whose bytes are the model's weights (graphs carry theirs inside or beside).
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".onnx.data", ".onnx_data", ".engine")


def weights_sha256(path) -> str:
    """Hex SHA-256 identifying a folder's weights: a safetensors file's own digest from its header metadata
    (`gmaivl_sha256`, written by save_pretrained; computed for files without it), other weight files' (ONNX graphs and
    their data, TensorRT engines) file SHA-256; one file -> its digest, several -> the SHA-256 of the lines
    "<name> <digest>" in name order. ModelError for a folder without weight files (a report must name its
    weights)."""
    from gmaivl_rt.atomic import file_sha256
    from gmaivl_rt.errors import ModelError

    path = Path(path)
    files = sorted(f for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise ModelError("the model folder has no weight files to name in a structured report (the report carries "
                         f"the weights' SHA-256; looked for {', '.join(WEIGHT_SUFFIXES)})")
    digests = [(f.name, _safetensors_digest(f) if f.suffix == ".safetensors" else file_sha256(f)) for f in files]
    if len(digests) == 1:
        return digests[0][1]
    return hashlib.sha256("".join(f"{name} {digest}\n" for name, digest in digests).encode()).hexdigest()


def _safetensors_digest(file: Path) -> str:
    from gmaivl_rt.model.checkpoint import DIGEST_KEY, data_region_sha256

    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    from safetensors import safe_open

    with safe_open(file, framework="pt", device="cpu") as handle:
        recorded = (handle.metadata() or {}).get(DIGEST_KEY)
    return recorded or data_region_sha256(file, header_len)


def model_algorithm(runtime, name: str | None = None, version: str | None = None):
    """The `Algorithm` a report names: `name` (default the model folder's name, as `gmaivl-rt serve` names the model),
    `version` (default "sha256:" + the first 16 hex digits of the weights' SHA-256) and the weights' SHA-256
    (`weights_sha256`), run by this gmaivl-rt."""
    import gmaivl_rt
    from gmaivl_rt.medical.structured_report import Algorithm

    digest = weights_sha256(runtime.path)
    return Algorithm(name=name or Path(runtime.path).resolve().name, version=version or f"sha256:{digest[:16]}",
                     weights_sha256=digest, software_version=f"gmaivl-rt {gmaivl_rt.__version__}")


@dataclass
class ArchiveAnswer:
    """What `ask_archive` did: the answer; the report (a highdicom ComprehensiveSR) when one was asked for, whether
    it was stored in the archive and the file it was written to."""

    answer: str
    report: object = None
    stored: bool = False
    sr_path: Path | None = None

    @property
    def report_uid(self) -> str | None:
        """The new report's SOP Instance UID (made here; no source value)."""
        return None if self.report is None else str(self.report.SOPInstanceUID)


def ask_archive(runtime, question: str, ref, *, write_sr: bool = False, sr_out=None, algorithm=None,
                system=None, frame=None, slice_index=None, plane=None, window=None, **options) -> ArchiveAnswer:
    """Answer `question` about the image `ref` (a `DicomWebRef`) names, with `runtime` (a loaded model); with
    `write_sr`, store a Structured Report of the answer in the same study (STOW-RS); with `sr_out`, write it to that
    file. algorithm: the `Algorithm` the report names (default `model_algorithm(runtime)`). frame / slice_index /
    plane / window and options (generation options, seed, stop): as `Backend.ask` takes them. Raises ArchiveError /
    InputError / LimitError with nothing written; ModelError (before fetching) for a report about a model folder
    without weight files."""
    from gmaivl_rt.medical.dicomweb import fetch_study

    if write_sr or sr_out:  # a model the report cannot name fails before anything is fetched or generated
        algorithm = algorithm or model_algorithm(runtime)
    fetched = fetch_study(ref, runtime.limits)
    image = fetched.read(limits=runtime.limits, frame=frame, slice_index=slice_index, plane=plane, window=window)
    made = runtime.answer(question, image, system=system, **options)
    if not (write_sr or sr_out):
        return ArchiveAnswer(answer=made.text)
    findings = answer_findings(made.text, made.complete) if options.get("json_schema") is not None else None
    return file_report(ref, fetched.sources, question, made.text, algorithm,
                       limits=runtime.limits, write_sr=write_sr, sr_out=sr_out, findings=findings)


def answer_findings(text: str, complete) -> dict | None:
    """An answer made under a JSON schema -> its object, for the report's coded findings; None when the answer is
    not complete under the schema (cut by the token budget) or is not a JSON object."""
    import json

    if complete is not True:
        return None
    try:
        parsed = json.loads(text)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def file_report(ref, sources: list, question: str, answer: str, algorithm, *, limits=None, write_sr: bool = False,
                sr_out=None, findings: dict | None = None) -> ArchiveAnswer:
    """The answer's Structured Report (`answer_report` over `sources`, the pydicom Datasets the answer was made
    from; `findings`: the answer's object when it was made under a JSON schema, coded as the findings schema's
    fields are), written to `sr_out` (atomically) and / or stored in `ref`'s archive with STOW-RS (`write_sr`). The
    one place `ask_archive` and `gmaivl-rt serve --dicomweb` write reports."""
    from gmaivl_rt.atomic import atomic_write_bytes
    from gmaivl_rt.medical.dicomweb import Archive
    from gmaivl_rt.medical.structured_report import answer_report, report_bytes

    result = ArchiveAnswer(answer=answer, report=answer_report(sources, question, answer, algorithm, findings))
    if sr_out is not None:
        result.sr_path = Path(sr_out)
        atomic_write_bytes(result.sr_path, report_bytes(result.report))
    if write_sr:
        Archive.for_ref(ref, limits).store([result.report])
        result.stored = True
    return result


def add_archive_options(parser) -> None:
    """`gmaivl-rt ask`'s archive options: --dicomweb URL --study UID [--series UID] [--instance UID]
    [--write-sr | --sr-out FILE]."""
    group = parser.add_argument_group("DICOMweb archive (credentials: GMAIVL_DICOMWEB_TOKEN[_FILE] or "
                                      "GMAIVL_DICOMWEB_USER + GMAIVL_DICOMWEB_PASSWORD[_FILE]; docs/hospital.md)")
    group.add_argument("--dicomweb", metavar="URL", default=None,
                       help="the archive's DICOMweb root, e.g. http://pacs:8042/dicom-web (instead of --image)")
    group.add_argument("--study", metavar="UID", default=None, help="Study Instance UID (with --dicomweb)")
    group.add_argument("--series", metavar="UID", default=None,
                       help="Series Instance UID (default: the study's largest image series)")
    group.add_argument("--instance", metavar="UID", default=None,
                       help="SOP Instance UID (default: the series as a volume, or its first instance)")
    report = group.add_mutually_exclusive_group()
    report.add_argument("--write-sr", action="store_true",
                        help="store the answer in the study as a DICOM Structured Report (STOW-RS)")
    report.add_argument("--sr-out", metavar="FILE", default=None,
                        help="write the Structured Report to FILE instead of storing it")


def archive_ref_from_args(args):
    """The parsed archive options -> a DicomWebRef, or None without --dicomweb; InputError for a half-given set."""
    from gmaivl_rt.errors import InputError
    from gmaivl_rt.medical.dicomweb import DicomWebRef

    if args.dicomweb is None:
        for flag in ("study", "series", "instance", "sr_out"):
            if getattr(args, flag) is not None:
                raise InputError(f"--{flag.replace('_', '-')} needs --dicomweb")
        if args.write_sr:
            raise InputError("--write-sr needs --dicomweb")
        return None
    if args.image is not None:
        raise InputError("give --image or --dicomweb, not both")
    if args.study is None:
        raise InputError("--dicomweb needs --study")
    return DicomWebRef(args.dicomweb, args.study, args.series, args.instance)


def ask_archive_cli(runtime, args, ref, **ask_options) -> int:
    """`gmaivl-rt ask --dicomweb ...`: the answer on stdout; where the report went on stderr (its new UID only)."""
    import sys

    result = ask_archive(runtime, args.question, ref, write_sr=args.write_sr, sr_out=args.sr_out, **ask_options)
    print(result.answer)
    if result.stored:
        print(f"structured report stored in the study (SOP Instance UID {result.report_uid})", file=sys.stderr)
    if result.sr_path is not None:
        print(f"structured report written to {result.sr_path}", file=sys.stderr)
    return 0
