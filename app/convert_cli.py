"""``quantscope convert``: MLX (exact repack where possible) or dense output, with a per-layer report."""

from __future__ import annotations

import logging
import sys

_logger = logging.getLogger(__name__)


class _ProgressBar:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, stream=None) -> None:
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
        self.stream.write(f"\rconverting [{'#' * fill}{'.' * (30 - fill)}] {pct:3d}%")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._last >= 0:
            self.stream.write("\r" + " " * 50 + "\r")
            self.stream.flush()


def run_convert(args) -> int:
    """Run the conversion described by the parsed ``convert`` arguments; print the report.

    Bad input raises a :class:`~quantscope.backend.errors.QuantscopeError` subclass, which the
    command line prints as one line (exit status 2).
    """
    from quantscope.backend.convert import convert, summary_lines

    bar = _ProgressBar()
    try:
        rep = convert(args.src, args.dst, to=args.to, bits=args.bits, group_size=args.group_size,
                      mode=args.mode, recipe=args.recipe, dtype=args.dtype, overwrite=args.overwrite,
                      engine=args.engine, progress=bar)
    finally:
        bar.close()
    sys.stdout.write("\n".join(summary_lines(rep)) + "\n")
    return 0
