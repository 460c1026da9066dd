"""A terminal progress bar for the long command-line jobs (compare, convert)."""

from __future__ import annotations

import shutil
import sys
import time


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

    Call it with a fraction 0..1 (it is a backend ``progress`` callback); where the value also
    counts layers and bytes (a sweep's :class:`~quantscope.backend.compare.SweepProgress`), the
    line says them. ``close()`` erases it.
    """

    def __init__(self, label: str, stream=None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last = None
        self._width = 0
        self._drawn = 0.0

    def __call__(self, fraction: float) -> None:
        if not self.enabled:
            return
        pct = int(fraction * 100)
        layers = getattr(fraction, "layers_total", None)
        state = (pct, getattr(fraction, "layers_done", None))
        if state == self._last:
            return
        # a new percentage is drawn at once, a new count of layers at most every 0.1 s (an MoE
        # sweep finishes 15,000 expert layers: a line each)
        now = time.monotonic()
        finished = layers is not None and fraction.layers_done == layers  # (the last count always drawn:
        # throttled, "100% 13/14 layers" stood as the last frame)
        if self._last is not None and pct == self._last[0] and now - self._drawn < 0.1 and not finished:
            return
        self._last, self._drawn = state, now
        fill = int(30 * fraction)
        line = f"{self.label} [{'#' * fill}{'.' * (30 - fill)}] {pct:3d}%"
        # within the terminal's width (a longer line wraps, and each redraw then adds a line): the
        # bytes left out first, then the layers
        room = max(20, shutil.get_terminal_size((80, 24)).columns - 1)
        if layers:
            full = f"{line}  {fraction.text()}"
            short = f"{line}  {fraction.layers_done}/{layers} layers"
            line = full if len(full) <= room else short if len(short) <= room else line
        line = line[:room]
        pad = " " * max(0, self._width - len(line))  # (a shorter line clears the last one's end)
        self._width = len(line)
        self.stream.write("\r" + line + pad)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._last is not None:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()

