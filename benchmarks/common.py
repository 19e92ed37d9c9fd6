"""What every benchmark shares: interleaved timing, peak-memory meters, the machine description, reports.

Timing: the variants of one comparison run side by side in the same process, one call of each per round
(A, B, then B, A in the next round, so a slow drift of the machine hits both alike), and the median of the
rounds is reported. Warm-up calls are never timed.

Memory: :class:`RSSMeter` reads the resident-set high-water mark of this process (``VmHWM`` in
``/proc/self/status``), reset to the current RSS by writing ``5`` to ``/proc/self/clear_refs`` (Linux),
after a garbage collection and a ``malloc_trim`` so freed heap pages are not silently reused. It sees every
allocation (numpy, torch, Python). Where the reset is not possible it falls back to ``tracemalloc``, which
sees Python and numpy allocations but not torch's; the method used is always reported with the number.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
import tracemalloc
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


# ------------------------------------------------------------------------------------------- timing
def interleaved_times(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int,
    *,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
    meter: Any = None,
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Time each callable ``repeats`` times, interleaved (A, B / B, A / ...), after ``warmup`` untimed rounds.

    Args:
        fns: name -> zero-argument callable (the variants of one comparison).
        repeats: timed rounds (>= 1).
        warmup: untimed rounds before (their results are returned, e.g. for equality checks).
        sync: called before starting and after stopping each clock (``torch.cuda.synchronize`` on GPU).
        meter: optional :class:`RSSMeter` / :class:`CudaMeter`; reset before each timed call (outside the
            clock) and read after it; the peaks land in ``first_results["peak_bytes"][name]`` (a list).

    Returns:
        ``(times, first_results)``: seconds per timed call of each variant, and each variant's result of its
        first call (warm-up if any, else the first timed call).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    sync = sync or (lambda: None)
    names = list(fns)
    first: dict[str, Any] = {}
    for _ in range(warmup):
        for name in names:
            result = fns[name]()
            first.setdefault(name, result)
    times: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, list[int]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            if meter is not None:
                meter.reset()
            sync()
            start = time.perf_counter()
            result = fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
            if meter is not None:
                peaks[name].append(meter.peak())
            first.setdefault(name, result)
            del result
    if meter is not None:
        first["peak_bytes"] = peaks
    return times, first


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(values))


def cuda_sync() -> None:
    """``torch.cuda.synchronize()`` when CUDA is initialised, else nothing."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{_STATUS}: no {field} line")
    return int(match.group(1))


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_reset_supported() -> bool:
    """Whether the resident-set high-water mark can be read and reset (Linux >= 4.0)."""
    try:
        _CLEAR_REFS.write_text("5")
        _status_kib("VmHWM")
    except (OSError, RuntimeError):
        return False
    return True


class RSSMeter:
    """Peak resident memory above a baseline, with :meth:`reset` / :meth:`peak` usable around any phases.

    ``method`` is ``"rss_hwm"`` (VmHWM after a clear_refs reset; every allocation counts) or
    ``"tracemalloc"`` (fallback: Python and numpy allocations only, torch tensors unseen).
    """

    def __init__(self) -> None:
        self.method = "rss_hwm" if rss_reset_supported() else "tracemalloc"
        self.baseline = 0

    def reset(self, new_baseline: bool = True) -> None:
        """Start a measurement: trim the heap, (optionally) take the baseline, reset the high-water mark."""
        _trim_heap()
        if self.method == "rss_hwm":
            if new_baseline:
                self.baseline = _status_kib("VmRSS") * 1024
            _CLEAR_REFS.write_text("5")
        else:
            if tracemalloc.is_tracing():
                tracemalloc.reset_peak()
            else:
                tracemalloc.start()
            if new_baseline:
                self.baseline = tracemalloc.get_traced_memory()[0]

    def peak(self) -> int:
        """Bytes of the high-water mark above the baseline since the last :meth:`reset`."""
        return max(0, self.absolute_peak() - self.baseline)

    def absolute_peak(self) -> int:
        """The high-water mark itself (whole-process RSS, or traced bytes for tracemalloc)."""
        if self.method == "rss_hwm":
            return _status_kib("VmHWM") * 1024
        return tracemalloc.get_traced_memory()[1]

    def stop(self) -> None:
        """Stop tracemalloc if this meter started it."""
        if self.method == "tracemalloc" and tracemalloc.is_tracing():
            tracemalloc.stop()


class CudaMeter:
    """Peak CUDA memory (``torch.cuda.max_memory_allocated``) with the same interface as :class:`RSSMeter`.

    Args:
        device: the CUDA device measured.
    """

    method = "cuda_max_memory_allocated"

    def __init__(self, device: torch.device | str = "cuda") -> None:
        self.device = torch.device(device)
        self.baseline = 0

    def reset(self, new_baseline: bool = True) -> None:
        """Synchronise, (optionally) take the allocated bytes as baseline, reset the peak statistics."""
        gc.collect()
        torch.cuda.synchronize(self.device)
        if new_baseline:
            self.baseline = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        """Bytes of the peak above the baseline since the last :meth:`reset`."""
        torch.cuda.synchronize(self.device)
        return max(0, torch.cuda.max_memory_allocated(self.device) - self.baseline)

    def absolute_peak(self) -> int:
        """``torch.cuda.max_memory_allocated`` since the last reset (weights included)."""
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device))

    def stop(self) -> None:
        """Nothing to release."""


def make_meter(device: torch.device | str) -> RSSMeter | CudaMeter:
    """The memory meter of a device: :class:`CudaMeter` for CUDA, :class:`RSSMeter` otherwise."""
    return CudaMeter(device) if torch.device(device).type == "cuda" else RSSMeter()


def measure_peak(fn: Callable[[], Any]) -> tuple[Any, int, str]:
    """Run ``fn`` once; returns ``(result, peak bytes above the RSS before the call, method)``."""
    meter = RSSMeter()
    meter.reset()
    try:
        result = fn()
        return result, meter.peak(), meter.method
    finally:
        meter.stop()


# ------------------------------------------------------------------------------------------ machine
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """The machine and software a result was measured on (no host names, no user names)."""
    import diffusers
    import numpy

    env: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "diffusers": diffusers.__version__,
        "cuda": None,
    }
    if torch.cuda.is_available():
        env["cuda"] = {"device": torch.cuda.get_device_name(0), "runtime": torch.version.cuda}
    return env


# ------------------------------------------------------------------------------------------ reports
def find_file(folder: str | os.PathLike, name: str) -> Path | None:
    """The first file called ``name`` below ``folder`` (sorted paths), or None: a stage's run-folder output
    (``selection.json``, ``reward_history.json``) wherever its logger put it."""
    found = sorted(Path(folder).rglob(name))
    return found[0] if found else None


def command_line(name: str, argv: Sequence[str] | None) -> str:
    """How a benchmark was invoked: ``python -m benchmarks <name>`` and its arguments (``argv``, or the
    process's own when None)."""
    return " ".join(["python -m benchmarks", name, *(sys.argv[1:] if argv is None else argv)])


def report_header(name: str, quick: bool, command: str | None, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The first keys of a benchmark report: its name, size, command line, machine, threads and settings."""
    return {
        "benchmark": name,
        "quick": quick,
        "command": command or f"python -m benchmarks {name}" + (" --quick" if quick else ""),
        "environment": environment(),
        "threads": torch.get_num_threads(),
        "settings": dict(settings),
    }


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (first column left-aligned, the others right-aligned)."""
    align = ["---"] + ["---:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"table row has {len(row)} cells, the header {len(headers)}")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines) + "\n"


def md_environment(env: Mapping[str, Any]) -> str:
    """One markdown line describing the machine of a report."""
    cuda = env.get("cuda")
    gpu = f", GPU {cuda['device']} (CUDA {cuda['runtime']})" if cuda else ""
    return (
        f"Measured {env['date_utc']} UTC on {env['cpu']} ({env['logical_cpus']} logical CPUs, "
        f"{env['torch_threads']} torch threads{gpu}); {env['platform']}; Python {env['python']}, "
        f"torch {env['torch']}, numpy {env['numpy']}, diffusers {env['diffusers']}.\n"
    )


def mib(num_bytes: float) -> str:
    """Bytes as a MiB string with one decimal."""
    return f"{num_bytes / 2**20:.1f}"


def write_report(out: str | os.PathLike, name: str, report: Mapping[str, Any], markdown: str) -> Path:
    """Write ``<out>/<name>.json`` and ``<out>/<name>.md``; returns the JSON path."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / f"{name}.json"
    json_path.write_text(json.dumps(report, indent=2, sort_keys=False, default=_jsonable) + "\n")
    (folder / f"{name}.md").write_text(markdown)
    return json_path


def publish(out: str | os.PathLike, name: str, report: Mapping[str, Any], markdown: str) -> Path:
    """:func:`write_report`, then print the markdown and where it went; returns the JSON path."""
    path = write_report(out, name, report, markdown)
    print(markdown)
    print(f"wrote {path}")
    return path


def sample_batched(
    generator: Any,
    labels: Sequence[int],
    seeds: Sequence[int],
    *,
    init: Any = None,
    batch_size: int = 64,
    **sampler: Any,
) -> Any:
    """``sampling.sample`` of ``labels`` in batches of ``batch_size``: sample i from ``seeds[i]`` and, with
    ``init`` (N, C, S, S) images in [-1, 1], from image i (SDEdit: pass ``strength``), so no image depends on
    the others in its batch. The decoded images (N, C, S, S) on the CPU."""
    import torch

    from rgsd_lightning.diffusion.sampling import sample

    if len(labels) != len(seeds):
        raise ValueError(f"{len(labels)} labels but {len(seeds)} seeds")
    out = []
    for start in range(0, len(labels), batch_size):
        stop = start + batch_size
        start_images = (
            {} if init is None else {"init": generator.encode(init[start:stop].to(generator.device))}
        )
        batch = sample(
            generator, list(labels[start:stop]), seeds=list(seeds[start:stop]), **start_images, **sampler
        )
        out.append(batch.images.cpu())
    return torch.cat(out)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ------------------------------------------------------------------------------------------ runner
def render_report(
    title: str, report: Mapping[str, Any], renderers: Mapping[str, Callable[[Any], str]]
) -> str:
    """The markdown of a report: title, machine line, command, then each section (or its failure)."""
    parts = [f"# {title}\n\n", md_environment(report["environment"])]
    if report.get("command"):
        parts.append(f"\nCommand: `{report['command']}`\n")
    for name, renderer in renderers.items():
        if name in report["results"]:
            parts.append("\n" + renderer(report["results"][name]))
        elif name in report["errors"]:
            parts.append(f"\n## {name}: FAILED\n\n```\n{report['errors'][name]}```\n")
    return "".join(parts)


def run_sections(
    out: str | os.PathLike,
    name: str,
    title: str,
    sections: Mapping[str, Callable[[], Any]],
    renderers: Mapping[str, Callable[[Any], str]],
    meta: Mapping[str, Any],
) -> dict[str, Any]:
    """Run each section and rewrite ``<out>/<name>.json/.md`` after every one (a timeout keeps what ran).

    A section that raises is recorded with its traceback (also printed) and the others still run; the
    caller turns ``report["errors"]`` into a non-zero exit status.
    """
    report: dict[str, Any] = {**meta, "environment": environment(), "results": {}, "errors": {}, "wall_s": {}}
    for key, fn in sections.items():
        print(f"[benchmarks] {key} ...", flush=True)
        start = time.perf_counter()
        try:
            report["results"][key] = fn()
        except Exception:  # recorded, printed, and made a non-zero exit by the caller
            report["errors"][key] = traceback.format_exc()
            print(report["errors"][key], flush=True)
        report["wall_s"][key] = time.perf_counter() - start
        print(f"[benchmarks] {key}: {report['wall_s'][key]:.1f} s", flush=True)
        write_report(out, name, report, render_report(title, report, renderers))
    return report
