"""Compile the kernels in other processes on a first run, so that the caller's never waits on it.

numba compiles a kernel on its first call and keeps the machine code in its on-disk cache
(``__pycache__`` beside the module, or ``NUMBA_CACHE_DIR``). With that cache empty (a fresh
install) the kernels :func:`.formats.fast.warm_up` loads take ~18 s of compilation on one core,
most of it with the GIL held: a window's event loop then stalls for 100-400 ms at a time, and one
process compiles one kernel at a time whatever the number of cores.

:func:`precompile` runs :data:`.formats.fast.WARM_PARTS` in child processes instead (at most one
per usable core, the parts shared out by their measured cost), which fill the same cache; the
caller then only loads from it (0.3 s). :func:`kernels_cached` says, in milliseconds, whether
there is anything to do.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import tempfile
import time

from .errors import Cancelled
from .formats.kernel import usable_cores

_logger = logging.getLogger(__name__)

#: Seconds of one core each part took to compile from an empty cache, each in a process of its
#: own (AMD EPYC, 2026-12-07): the longest go to different processes first.
PART_COST = {"measure": 7.7, "gptq-awq": 6.0, "codes": 4.7, "views": 4.1, "mlx": 3.6}
#: Kernels whose cache entries stand for all of them: the costliest of each part's.
_WITNESSES = ("fast._pair_stats", "fast._kth", "fast._hist_intervals", "fast._mlx_affine_words",
              "fast._gptq_tiled", "fast._awq_tiled", "histo._count", "codehist._group_range")


def kernels_cached() -> bool:
    """Whether numba's cache holds current machine code for the kernels (an index entry for each
    witness whose source stamp matches; numba's own checks decide the rest at load time).
    False when numba is missing or its cache cannot be read this way."""
    try:
        from .formats import codehist, fast, histo
        if not fast.AVAILABLE:
            return False
        mods = {"fast": fast, "histo": histo, "codehist": codehist}
        for w in _WITNESSES:
            mod, name = w.split(".")
            if not getattr(mods[mod], name)._cache._cache_file._load_index():
                return False
        return True
    except Exception:  # noqa: BLE001 - numba's internals moved: assume not, precompiling costs a second then
        return False


def plan(processes: int, parts=None) -> list[list[str]]:
    """The parts (all by default) shared out over at most ``processes`` children, costliest first,
    each to the least loaded."""
    parts = list(PART_COST if parts is None else parts)
    n = max(1, min(processes, len(parts)))
    groups: list[list[str]] = [[] for _ in range(n)]
    load = [0.0] * n
    for part in sorted(parts, key=lambda p: PART_COST.get(p, 1.0), reverse=True):
        i = load.index(min(load))
        groups[i].append(part)
        load[i] += PART_COST.get(part, 1.0)
    return groups


_CHILD = ("import os, sys\n"
          "try:\n    os.nice(5)\nexcept (AttributeError, OSError):\n    pass\n"
          "from quantscope.backend.formats import fast\n"
          "fast.warm_up(sys.argv[1:])\n")


def precompile(cancel=None, processes: int | None = None, force: bool = False, parts=None, progress=None) -> bool:
    """Fill numba's cache from child processes unless it is current already (``force``: always);
    ``parts``: names of :data:`.formats.fast.WARM_PARTS` (all by default).
    Returns True where children ran and all succeeded; False where there was nothing to do or a
    child failed (the caller's own first calls then compile what is missing, as without this).
    ``cancel.is_set()`` stops the children (killed: numba writes each cache file whole, by
    renaming) and raises :class:`Cancelled`. ``progress(fraction)``: the share of children done."""
    from .formats import fast
    if not fast.AVAILABLE or (not force and kernels_cached()):
        return False
    groups = plan(processes or usable_cores(), parts)
    t0 = time.perf_counter()
    # (their messages to files: a pipe not read while waiting fills at 64 KB and stops them)
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in groups]
        children = [subprocess.Popen([sys.executable, "-c", _CHILD, *g], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=log) for g, log in zip(groups, logs)]
        try:
            done = 0
            while True:
                now = sum(c.poll() is not None for c in children)
                if now != done and progress is not None:
                    progress(now / len(children))
                done = now
                if done == len(children):
                    break
                if cancel is not None and cancel.is_set():
                    raise Cancelled("compiling the kernels cancelled")
                time.sleep(0.05)
        finally:
            for c in children:
                if c.poll() is None:
                    c.kill()
                    c.wait()
        ok = True
        for g, c, log in zip(groups, children, logs):
            if c.returncode != 0:
                ok = False
                log.seek(0)
                last = log.read().decode(errors="replace").strip().splitlines()[-1:]
                _logger.warning("compiling the kernels %s in a child process failed (exit %s)%s", g, c.returncode,
                                f": {last[0]}" if last else "")
    _logger.info("compiled the kernels in %d processes in %.1f s", len(groups), time.perf_counter() - t0)
    return ok
