"""GPU readiness report: `gmaivl-rt kernels report [--json FILE] [--arch 80,90] [--defaults-only] [--module M]`.

Compiles every (kernel, config) that each kernel file declares in `report_specs()` ahead of time for sm_80 (A100)
and sm_90 (H100) - no GPU needed; a config offered to some archs only (KernelSpec.archs) just for those - and reads
from the result:
- registers, spills (STACK + LOCAL) and static shared memory from the cubin (`cuobjdump --dump-resource-usage`,
  shipped in the triton wheel), dynamic shared memory from Triton's metadata;
- tensor-core use: `mma.sync` (sm_80) and `wgmma.mma_async` (sm_90) instructions in the PTX;
- an analytic roofline per kernel at a named shape: predicted time at peak = max(flops / tensor peak, bytes / HBM).

Under `TRITON_INTERPRET=1`, `@triton.jit` yields interpreter objects that cannot be compiled, so the compile work
runs in a child process with the variable removed.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

KERNEL_MODULES = ("attention", "decode_attention", "rms_norm", "layer_norm", "rope", "swiglu", "projector",
                  "fused_linear_cross_entropy", "patch_embed")
# the serving engine's paged KV cache (issue 10)
KERNEL_MODULES += ("paged_decode_attention",)
# (dense fp16/bf16 tensor-core FLOP/s, HBM bytes/s)
PEAKS = {"A100": (312e12, 2.0e12), "H100": (989e12, 3.35e12)}
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes per block
TESTED_TRITON = "3.9"  # the version the configs' figures (registers, spills) were taken with; pyproject bounds it
MAX_REGISTERS = 255

_RESOURCE_LINE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_FUNCTION_LINE = re.compile(r"^\s*Function\s+(\S+):\s*$")
# an instruction, optionally predicated: "@%p1 mma.sync.aligned..." / "wgmma.mma_async.sync..."
_MMA = re.compile(r"^\s*(?:@!?%\w+\s+)?mma\.", re.MULTILINE)
_WGMMA = re.compile(r"^\s*(?:@!?%\w+\s+)?wgmma\.mma_async", re.MULTILINE)


def cuobjdump_path() -> str:
    import triton.backends.nvidia as nvidia_backend

    path = os.path.join(os.path.dirname(nvidia_backend.__file__), "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found at {path}; the triton wheel should ship it")
    return path


def parse_resource_usage(text: str, function: str | None = None) -> dict:
    """Parse `cuobjdump --dump-resource-usage` output, e.g.

        Resource usage:
         Common:
          GLOBAL:0
         Function my_kernel:
          REG:71 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0

    into {"registers", "stack", "shared", "local"} for `function` (or the only function)."""
    found, current = {}, None
    for line in text.splitlines():
        header = _FUNCTION_LINE.match(line)
        if header:
            current = header.group(1)
            continue
        usage = _RESOURCE_LINE.search(line)
        if usage and current is not None:
            reg, stack, shared, local = map(int, usage.groups())
            found[current] = {"registers": reg, "stack": stack, "shared": shared, "local": local}
    if not found:
        raise ValueError(f"no 'Function ...: REG:.. STACK:.. SHARED:.. LOCAL:..' entry in cuobjdump output:\n{text}")
    if function is not None and function in found:
        return found[function]
    if len(found) != 1:
        raise ValueError(f"cuobjdump lists functions {sorted(found)}; expected one named {function!r}")
    return next(iter(found.values()))


def count_tensor_core_instructions(ptx: str) -> tuple[int, int]:
    """(mma.sync count, wgmma.mma_async count): static instruction counts in the PTX."""
    return len(_MMA.findall(ptx)), len(_WGMMA.findall(ptx))


def collect_specs(modules=KERNEL_MODULES):
    """Import each kernel module and call its `report_specs()`.
    Returns ([(module, spec), ...], {module: why it has no specs})."""
    specs, missing = [], {}
    for name in modules:
        try:
            module = importlib.import_module(f"gmaivl_rt.kernels.{name}")
        except Exception as e:  # a module mid-edit must not take the whole report down
            missing[name] = f"import failed: {type(e).__name__}: {e}"
            continue
        make = getattr(module, "report_specs", None)
        if make is None:
            missing[name] = "no report_specs()"
            continue
        try:
            found = list(make())
        except Exception as e:
            missing[name] = f"report_specs() failed: {type(e).__name__}: {e}"
            continue
        if not found:
            missing[name] = "report_specs() returned no kernels"
        specs.extend((name, spec) for spec in found)
    return specs, missing


@functools.lru_cache(maxsize=None)
def _compile_cached(fn, signature: tuple, constexprs: tuple, num_warps: int, num_stages: int, arch: int,
                    attrs: tuple = ()) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # attrs: the argument specialization a real launch derives (e.g. 16-divisible pointers and strides)
    source = ASTSource(fn=fn, signature=dict(signature), constexprs=dict(constexprs), attrs=dict(attrs))
    from ._dispatch import fp_fusion

    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages,
                                       "enable_fp_fusion": fp_fusion()})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        dump = subprocess.run([cuobjdump_path(), "--dump-resource-usage", cubin], capture_output=True, text=True,
                              check=True).stdout
    usage = parse_resource_usage(dump, compiled.metadata.name)
    mma, wgmma = count_tensor_core_instructions(compiled.asm["ptx"])
    return {"registers": usage["registers"], "spill_bytes": usage["stack"] + usage["local"],
            "shared_bytes": max(usage["shared"], int(compiled.metadata.shared)), "mma": mma, "wgmma": wgmma}


def compile_spec(spec, arch: int) -> dict:
    """Compile one KernelSpec for sm_<arch>; registers, spill_bytes, shared_bytes, mma, wgmma."""
    return _compile_cached(spec.fn, tuple(spec.signature.items()), tuple(spec.constexprs.items()),
                           spec.num_warps, spec.num_stages, arch, tuple(spec.extra.get("attrs", {}).items()))


def roofline_fields(roofline) -> dict:
    if roofline is None:
        return {"shape": None, "flops": None, "bytes": None, "intensity": None,
                **{f"{gpu.lower()}_us": None for gpu in PEAKS}}
    fields = {"shape": roofline.shape, "flops": roofline.flops, "bytes": roofline.bytes,
              "intensity": roofline.flops / roofline.bytes if roofline.bytes else None}
    for gpu, (flops_per_s, bytes_per_s) in PEAKS.items():
        fields[f"{gpu.lower()}_us"] = max(roofline.flops / flops_per_s, roofline.bytes / bytes_per_s) * 1e6
    return fields


def row_problems(row: dict) -> list[str]:
    """Why a compiled row is not GPU-ready (empty when it is)."""
    if row.get("error"):
        return [row["error"]]
    problems = []
    if row["spill_bytes"]:
        problems.append(f"spills {row['spill_bytes']} B")
    if row["registers"] > MAX_REGISTERS:
        problems.append(f"{row['registers']} registers")
    limit = SHARED_LIMIT.get(row["arch"])
    if limit is not None and row["shared_bytes"] > limit:
        problems.append(f"shared {row['shared_bytes']} B > {limit} B")
    if row["uses_dot"]:
        tensor_cores = row["mma"] > 0 if row["arch"] < 90 else row["mma"] + row["wgmma"] > 0
        if not tensor_cores:
            problems.append("GEMM without tensor-core instructions")
    return problems


def _compile_row(job) -> dict:
    """Compile one (module, spec index, arch) job; runs in a worker process (specs are found again by index, as
    Triton functions do not pickle)."""
    module, index, arch = job
    spec = _module_specs(module)[index]
    row = {"module": module, "kernel": spec.kernel, "config": spec.config, "arch": arch, "default": spec.default,
           "variant": bool(spec.extra.get("variant")),
           "uses_dot": spec.uses_dot, "num_warps": spec.num_warps, "num_stages": spec.num_stages}
    started = time.perf_counter()
    try:
        row.update(compile_spec(spec, arch))
        row["error"] = None
    except Exception as e:  # report a config that does not compile instead of stopping
        row["error"] = _short(f"compile failed: {type(e).__name__}: {' '.join(str(e).split())}", 300)
    row["compile_s"] = round(time.perf_counter() - started, 2)
    row.update(roofline_fields(spec.roofline))
    return row


@functools.lru_cache(maxsize=None)
def _module_specs(module: str) -> list:
    return list(importlib.import_module(f"gmaivl_rt.kernels.{module}").report_specs())


def restricted(spec) -> bool:
    """A config its kernel file offers only to some archs or head dims (it sets extra["restricted"])."""
    return bool(spec.extra.get("restricted"))


def _report_rows(archs, defaults_only: bool, progress: bool, jobs: int, modules=None,
                 restricted_only: bool = False) -> list[dict]:
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    specs, missing = collect_specs(modules or KERNEL_MODULES)
    by_module: dict = {}
    work = []
    for module, spec in specs:
        index = by_module[module] = by_module.get(module, -1) + 1
        if (spec.default or not defaults_only) and (restricted(spec) or not restricted_only):
            # a config is compiled for the archs it is offered to (a launcher never runs it elsewhere)
            work.extend((module, index, arch) for arch in archs if spec.archs is None or arch in spec.archs)
    rows = [{"module": module, "kernel": module, "config": None, "arch": None, "default": None,
             "error": f"missing: {why}"} for module, why in missing.items()]
    bar = functools.partial(tqdm, total=len(work), desc="compiling kernels", unit="kernel", disable=not progress,
                            file=sys.stderr)
    if jobs > 1 and len(work) > 1:
        import multiprocessing

        # fork: the workers inherit the imported kernel modules instead of importing torch and triton again
        context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            rows.extend(bar(pool.map(_compile_row, work)))
    else:
        rows.extend(bar(map(_compile_row, work)))
    for row in rows:
        row["problems"] = row_problems(row) if row["arch"] is not None else [row["error"]]
    return rows


def default_jobs() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


_CHILD_RESULTS: dict = {}


def build_report(archs=(80, 90), *, defaults_only: bool = False, progress: bool = True,
                 jobs: int | None = None, modules=None, restricted_only: bool = False) -> list[dict]:
    """Compile every kernel spec for each arch; one dict per (kernel, config, arch) with kernel, config, arch,
    default, registers, spill_bytes, shared_bytes, mma, wgmma, uses_dot, roofline fields (shape, flops, bytes,
    intensity, a100_us, h100_us), error and problems (empty when GPU-ready). Modules without `report_specs()`
    appear as one row each with arch None and an error starting "missing:". `jobs` compile processes (default: up
    to 4, one per available core). modules: only these kernel modules; restricted_only: only the configs offered
    to some archs or head dims (`restricted`), each on its own archs."""
    archs = tuple(int(a) for a in archs)
    jobs = default_jobs() if jobs is None else max(1, int(jobs))
    from ._dispatch import interpreting

    modules = tuple(modules) if modules else None
    if not interpreting():
        return _report_rows(archs, defaults_only, progress, jobs, modules, restricted_only)
    key = (archs, defaults_only, modules, restricted_only)
    if key not in _CHILD_RESULTS:
        _CHILD_RESULTS[key] = _build_in_child(archs, defaults_only, progress, jobs, modules, restricted_only)
    return [dict(row) for row in _CHILD_RESULTS[key]]


def _build_in_child(archs, defaults_only, progress, jobs, modules=None, restricted_only=False):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # fusion knob: set by the package
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        command = [sys.executable, "-m", "gmaivl_rt.kernels.report", "--json", out, "--quiet",
                   "--arch", ",".join(map(str, archs)), "--jobs", str(jobs)]
        if defaults_only:
            command.append("--defaults-only")
        if modules:
            command += ["--module", ",".join(modules)]
        if restricted_only:
            command.append("--restricted-only")
        if not progress:
            command.append("--no-progress")
        # the child exits 1 when a default config fails a check; the rows say why, so only a missing file is fatal
        child = subprocess.run(command, env=env, stdout=subprocess.DEVNULL)
        if not os.path.exists(out):
            raise RuntimeError(f"kernel report child process failed (exit {child.returncode}): {' '.join(command)}")
        with open(out) as f:
            return json.load(f)["rows"]


# ----------------------------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------------------------

def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _table(header, lines) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]

    def fmt(cells):  # the first two columns (names) left-aligned, numbers right-aligned
        return "  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(line) for line in lines)])


def format_table(rows) -> str:
    compiled = [r for r in rows if r["arch"] is not None]

    def resource_line(r):
        measured = ("-",) * 5 if r["error"] else (r["registers"], r["spill_bytes"], r["shared_bytes"], r["mma"],
                                                  r["wgmma"])
        status = _short("FAIL: " + "; ".join(r["problems"]), 60) if r["problems"] else "ok"
        return (r["kernel"], r["config"], f"sm_{r['arch']}", "*" if r["default"] else "", *measured,
                "yes" if r["uses_dot"] else "", status)

    resources = _table(
        ("kernel", "config", "arch", "default", "regs", "spill", "smem", "mma", "wgmma", "dot", "status"),
        [resource_line(r) for r in compiled])
    seen, roof_lines = set(), []
    for r in compiled:
        if r["flops"] is None or r["kernel"] in seen:
            continue
        seen.add(r["kernel"])
        bound = "compute" if r["flops"] / PEAKS["H100"][0] >= r["bytes"] / PEAKS["H100"][1] else "memory"
        roof_lines.append((r["kernel"], r["shape"], f"{r['flops'] / 1e9:.2f}", f"{r['bytes'] / 1e6:.2f}",
                           "-" if r["intensity"] is None else f"{r['intensity']:.1f}", f"{r['a100_us']:.1f}",
                           f"{r['h100_us']:.1f}", bound))
    roofline = _table(("kernel", "shape", "GFLOP", "MB", "FLOP/B", "A100 us", "H100 us", "H100 bound"),
                      roof_lines)
    return resources + "\n\nRoofline (predicted time at peak = max(flops/peak, bytes/bandwidth)):\n" + roofline


def format_summary(rows) -> str:
    """Counts and failing rows, headed by the Triton version (figures move between versions)."""
    import triton

    from ._dispatch import fp_fusion
    missing = [r for r in rows if r["arch"] is None]
    compiled = [r for r in rows if r["arch"] is not None]
    failing = [r for r in compiled if r["problems"]]
    failing_defaults = [r for r in failing if r["default"]]
    kernels = {r["kernel"] for r in compiled}
    lines = [f"triton {triton.__version__} (figures taken with {TESTED_TRITON}), fp fusion "
             f"{'on' if fp_fusion() else 'off'}",
             f"{len(compiled)} compiled rows ({len(kernels)} kernels from "
             f"{len({r['module'] for r in compiled})} modules), {len(failing)} failing a check "
             f"({len(failing_defaults)} default configs)"]
    for r in failing:
        lines.append(f"  {'DEFAULT ' if r['default'] else ''}{r['kernel']} [{r['config']}] sm_{r['arch']}: "
                     + "; ".join(r["problems"]))
    for r in missing:
        lines.append(f"  {r['module']}: {r['error']}")
    return "\n".join(lines)


def _parse_archs(text: str) -> tuple[int, ...]:
    try:
        archs = tuple(int(a.strip().removeprefix("sm_")) for a in text.split(",") if a.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--arch {text!r}: expected a comma-separated list such as 80,90")
    if not archs:
        raise argparse.ArgumentTypeError("--arch: no architecture given")
    return archs


def _parse_modules(text: str) -> tuple[str, ...]:
    modules = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = sorted(set(modules) - set(KERNEL_MODULES))
    if not modules or unknown:
        raise argparse.ArgumentTypeError(f"--module {text!r}: expected names from {', '.join(KERNEL_MODULES)}")
    return modules


def _add_arguments(parser):
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    parser.add_argument("--arch", type=_parse_archs, default=(80, 90), help="CUDA archs, e.g. 80,90 (default)")
    parser.add_argument("--defaults-only", action="store_true", help="only the default config of each kernel")
    parser.add_argument("--module", type=_parse_modules, default=None,
                        help="only these kernel modules, e.g. attention,decode_attention (default: all)")
    parser.add_argument("--restricted-only", action="store_true",
                        help="only the configs offered to some archs or head dims (e.g. sm_90-only tiles)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: cores, <= 4)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--quiet", action="store_true", help="no table on stdout")


def run(args) -> int:
    rows = build_report(args.arch, defaults_only=args.defaults_only, progress=not args.no_progress, jobs=args.jobs,
                        modules=args.module, restricted_only=args.restricted_only)
    if args.json:
        import triton

        from gmaivl_rt.atomic import atomic_write_json

        from ._dispatch import fp_fusion

        atomic_write_json(args.json, {"triton_version": triton.__version__, "fp_fusion": fp_fusion(),
                                      "tested_triton": TESTED_TRITON, "archs": list(args.arch),
                                      "peaks": {gpu: {"flops_per_s": f, "bytes_per_s": b}
                                                for gpu, (f, b) in PEAKS.items()},
                                      "rows": rows})
    if not args.quiet:
        print(format_table(rows))
        print()
        print(format_summary(rows))
    # a default config (at the named shape, or a variant's: another head dim / dtype / mask the model runs) that is
    # not GPU-ready, or a missing module, fails the command
    return 1 if any(r["problems"] and (r["default"] or r.get("variant") or r["arch"] is None) for r in rows) else 0


def register(subparsers) -> None:
    kernels = subparsers.add_parser("kernels", help="Triton kernel tools")
    sub = kernels.add_subparsers(dest="kernels_command", required=True)
    report = sub.add_parser("report", help="compile every kernel config for sm_80/sm_90; registers, spills, "
                                           "shared memory, tensor-core use and a roofline")
    _add_arguments(report)
    report.set_defaults(func=run)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gmaivl_rt.kernels.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
