"""What every benchmark here shares: the machine it ran on, timing, memory, keys, tables and
report files. Each benchmark script is then only what it measures.

    from bench.harness import Stopwatch, best, machine, table, write_report
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime as dt
import gc
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def machine(**extra: Any) -> dict[str, Any]:
    """The machine and library versions a figure was measured with (what RESULTS.md states
    beside every figure), with ``extra`` settings of the benchmark's own."""
    import numpy as np

    cpu_model = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "memory_gib": _memory_gib(),
    }
    for name in ("torch", "tenseal"):
        module = sys.modules.get(name)
        if module is not None:  # only what the benchmark loaded: no import for a version
            info[name] = getattr(module, "__version__", "?")
    torch = sys.modules.get("torch")
    if torch is not None:
        cuda = torch.cuda.is_available()
        info["device"] = "cuda: " + torch.cuda.get_device_name(0) if cuda else "cpu"
    return {**info, **extra}


def describe(info: dict[str, Any]) -> str:
    """``machine()`` in one line, for a report's header."""
    words = [f"{info['cpu_count']} CPUs ({info['cpus_usable']} usable)"]
    if info.get("memory_gib"):
        words.append(f"{info['memory_gib']:.0f} GiB")
    words.append(f"Python {info['python']}")
    words += [f"{name} {info[name]}" for name in ("torch", "tenseal") if name in info]
    if "device" in info:
        words.append(info["device"])
    return ", ".join(words)


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    return None


# --- time -----------------------------------------------------------------------------------


class Stopwatch:
    """Wall and CPU seconds of a ``with`` block; CPU counts every thread of this process."""

    def __enter__(self) -> Stopwatch:
        self._wall = time.perf_counter()
        self._cpu = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def best(repeats: int, step: Callable[[], object]) -> float:
    """The fewest wall seconds ``step`` took in ``repeats`` runs: what other processes on a
    shared machine do not inflate."""
    times = []
    for _ in range(repeats):
        with Stopwatch() as watch:
            step()
        times.append(watch.wall)
    return min(times)


# --- memory ---------------------------------------------------------------------------------


def status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``), or None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    """This process's resident memory now, MB (NaN where ``/proc`` is not there)."""
    kib = status_kib("VmRSS")
    return float("nan") if kib is None else kib / 1024


def peak_mb() -> float:
    """This process's peak resident memory (its high-water mark), MB."""
    kib = status_kib("VmHWM")
    return float("nan") if kib is None else kib / 1024


def rusage_kib() -> int:
    """The process's lifetime peak RSS from ``getrusage``, in KiB on every platform."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # macOS reports bytes


def trim_heap() -> None:
    """glibc ``malloc_trim(0)``: return free heap pages to the OS (a no-op elsewhere)."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def reset_hwm() -> bool:
    """Reset the kernel's high-water mark (VmHWM) to the current RSS; False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class PeakRss:
    """Peak resident memory of a ``with`` block, in bytes above the RSS on entry.

    On Linux the kernel's high-water mark (VmHWM) is reset through /proc/self/clear_refs, so the
    peak is exact; where that is refused, a thread samples VmRSS every millisecond; elsewhere
    ``resource.getrusage`` gives the process's lifetime peak, which cannot be reset.
    """

    def __enter__(self) -> PeakRss:
        gc.collect()
        trim_heap()  # hand freed heap back, or reusing it would hide growth from RSS
        self.method = "sampled VmRSS"
        baseline = status_kib("VmRSS")
        if baseline is None:
            self.method = "getrusage ru_maxrss (lifetime peak, not reset)"
            baseline = rusage_kib()
        elif reset_hwm():
            self.method = "VmHWM (reset via /proc/self/clear_refs)"
        self.baseline = baseline
        self._samples: list[int] = [baseline]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.method == "sampled VmRSS":
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            value = status_kib("VmRSS")
            if value is not None:
                self._samples.append(value)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.method.startswith("VmHWM"):
            peak = status_kib("VmHWM") or self.baseline
        elif self.method.startswith("getrusage"):
            peak = rusage_kib()
        else:
            peak = max(self._samples)
        self.peak_bytes = max(peak - self.baseline, 0) * 1024


# --- keys -----------------------------------------------------------------------------------


def keys_for(keys_dir: Path) -> Path:
    """The user's keys in ``keys_dir``, or throwaway ones made for this benchmark when there
    are none; says which on stderr."""
    if (keys_dir / "manifest.json").exists():
        print(f"keys: {keys_dir.resolve()}/", file=sys.stderr)
        return keys_dir
    from secagg import keys
    from secagg.config import CkksParams

    temp = Path(tempfile.mkdtemp(prefix="secagg-bench-keys-"))
    keys.generate(temp, CkksParams())
    print(
        f"keys: none in {keys_dir.resolve()}/ (pass --keys, or run secagg keygen there); "
        f"using throwaway keys made for this benchmark in {temp}/",
        file=sys.stderr,
    )
    return temp


# --- reports --------------------------------------------------------------------------------


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """A markdown table's lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def write_report(
    results: dict[str, Any], markdown: str, out_dir: Path, name: str
) -> tuple[Path, Path]:
    """``name-<date>.md`` (the report a person reads) and ``name-<date>.json`` (every figure,
    for a later summary) in ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    md_path, json_path = out_dir / f"{name}-{stamp}.md", out_dir / f"{name}-{stamp}.json"
    md_path.write_text(markdown)
    json_path.write_text(json.dumps(results, indent=2, default=str))
    return md_path, json_path
