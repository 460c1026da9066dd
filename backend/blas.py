"""Keep numpy's bundled OpenBLAS on one thread.

quantscope parallelises its own work (decode kernel, metrics, doctor) over a thread pool. OpenBLAS's
worker threads on top of that mostly wait and spin, and on a busy 2-core machine they take the CPU
from the threads doing work: a 64k-element ``np.vdot`` measured 4.4 ms instead of 38 us, and the
demo build 14-44 s instead of 6 s. The ``OPENBLAS_NUM_THREADS`` default set in
``quantscope/__init__.py`` only works if numpy is imported after quantscope; the ctypes call here
works either way. An explicit ``OPENBLAS_NUM_THREADS`` other than 1 is respected.
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

_controls = False


def _openblas_thread_controls():
    """``(get, set)`` for the OpenBLAS bundled with numpy's wheels, or None when not found."""
    global _controls
    if _controls is not False:
        return _controls
    _controls = None
    here = Path(np.__file__).resolve().parent
    for lib in sorted([*here.parent.glob("numpy.libs/*openblas*"), *here.glob(".dylibs/*openblas*")]):
        try:
            dll = ctypes.CDLL(str(lib))
        except OSError:
            continue
        for get, put in (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                         ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
                         ("openblas_get_num_threads", "openblas_set_num_threads")):
            if hasattr(dll, get) and hasattr(dll, put):
                _controls = (getattr(dll, get), getattr(dll, put))
                return _controls
    return None


def limit_blas_threads() -> None:
    """Set OpenBLAS to one thread unless the user asked for another count."""
    if os.environ.get("OPENBLAS_NUM_THREADS", "1") != "1":
        return
    controls = _openblas_thread_controls()
    if controls is not None:
        controls[1](1)


@contextmanager
def single_threaded_blas():
    """Run BLAS on one thread for the duration (then restore the previous count). Without
    numpy's OpenBLAS (e.g. Accelerate on macOS) this does nothing."""
    controls = _openblas_thread_controls()
    if controls is None:
        yield
        return
    get, put = controls
    before = get()
    put(1)
    try:
        yield
    finally:
        put(before)
