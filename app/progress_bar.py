"""A terminal progress bar for the long command-line jobs (compare, convert)."""

from __future__ import annotations

import sys


def kernels_ready(stream=None) -> None:
    """On a first run (numba's cache empty) and with two cores or more, compile the kernels in
    child processes, one per core (:mod:`quantscope.backend.precompile`), saying so on a terminal:
    the first comparison otherwise compiled them in its own process for 16 s, its bar at 0%."""
    from quantscope.backend.precompile import kernels_cached, precompile, usable_cores
    if usable_cores() < 2 or kernels_cached():
        return
    stream = stream or sys.stderr
    tty = bool(getattr(stream, "isatty", lambda: False)())
    note = "compiling the kernels (first run only)..."
    if tty:
        stream.write(note)
        stream.flush()
    try:
        precompile()
    finally:
        if tty:
            stream.write("\r" + " " * len(note) + "\r")
            stream.flush()


class ProgressBar:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal.

    Call it with a fraction 0..1 (it is a backend ``progress`` callback); ``close()`` erases it.
    """

    def __init__(self, label: str, stream=None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = -1

    def __call__(self, fraction: float) -> None:
        if not self.enabled:
            return
        pct = int(fraction * 100)
        if pct == self._last:
            return
        self._last = pct
        fill = int(30 * fraction)
        self.stream.write(f"\r{self.label} [{'#' * fill}{'.' * (30 - fill)}] {pct:3d}%")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._last >= 0:
            self.stream.write("\r" + " " * 50 + "\r")
            self.stream.flush()
