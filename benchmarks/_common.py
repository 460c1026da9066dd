"""Shared helpers for the benchmark scripts (each script prints one JSON object)."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

CACHE = Path(os.environ.get("QUANTSCOPE_BENCH_CACHE", Path(__file__).parent / ".cache"))


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def peak_rss_bytes() -> int:
    """This process's peak resident set. On Linux from /proc (VmHWM): getrusage's ru_maxrss
    survives exec, so a measuring subprocess reported its parent's peak (2.6 GB after the parent
    had built a benchmark's files)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def timeit(fn, repeat: int = 5, warmup: int = 1) -> dict:
    """Run ``fn`` ``warmup + repeat`` times; return min and median seconds of the timed runs."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"min_s": min(ts), "median_s": statistics.median(ts)}


def paired_ratio(fn, base, repeat: int = 9, warmup: int = 1) -> dict:
    """Time ``fn`` and ``base`` alternately, ``repeat`` pairs: the median of the per-pair ratios
    (each pair ran back to back, under the same load of a shared machine) and of each time."""
    for _ in range(warmup):
        fn()
        base()
    tf, tb = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        base()
        t2 = time.perf_counter()
        tf.append(t1 - t0)
        tb.append(t2 - t1)
    return {"ratio": statistics.median(a / b for a, b in zip(tf, tb)),
            "median_s": statistics.median(tf), "base_median_s": statistics.median(tb)}


def sweep_against_dequant(sweep_once, dequant_once) -> tuple[object, int, list[float], list[float]]:
    """A comparison and the dequantization it is measured against, alternated
    (``QUANTSCOPE_BENCH_REPEAT`` rounds, default 3): (the first sweep's result, peak RSS after
    it, the sweeps' seconds, the dequantizations' seconds). ``sweep_once`` returns (seconds,
    result), ``dequant_once`` seconds."""
    t, res = sweep_once()
    rss = peak_rss_bytes()
    sweeps, deqs = [t], [dequant_once()]
    for _ in range(int(os.environ.get("QUANTSCOPE_BENCH_REPEAT", "3")) - 1):
        sweeps.append(sweep_once()[0])
        deqs.append(dequant_once())
    return res, rss, sweeps, deqs


def emit(result: dict) -> None:
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")
