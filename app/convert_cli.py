"""``quantscope convert``: MLX (exact repack where possible) or dense output, with a per-layer report."""

from __future__ import annotations

import logging
import sys

from .progress_bar import ProgressBar

_logger = logging.getLogger(__name__)


def run_convert(args) -> int:
    """Run the conversion described by the parsed ``convert`` arguments; print the report.

    Bad input raises a :class:`~quantscope.backend.errors.QuantscopeError` subclass, which the
    command line prints as one line (exit status 2).
    """
    from quantscope.backend.convert import convert, summary_lines

    bar = ProgressBar("converting")
    try:
        rep = convert(args.src, args.dst, to=args.to, bits=args.bits, group_size=args.group_size,
                      mode=args.mode, recipe=args.recipe, dtype=args.dtype, overwrite=args.overwrite,
                      engine=args.engine, progress=bar, scales=args.scales)
    finally:
        bar.close()
    sys.stdout.write("\n".join(summary_lines(rep)) + "\n")
    for w in rep.suspect[:3]:  # on stderr too: a script reading only the exit status must not miss it
        print(f"quantscope: warning: {w}", file=sys.stderr)
    bad = [p for p in rep.nonfinite_layers if p not in rep.overflowed]
    if bad:  # NaN/inf carried into the output (as compare: done, but not a clean result)
        print(f"quantscope: warning: NaN/inf values in {len(bad)} converted layer(s), e.g. {bad[0]}: the source "
              "holds them (`quantscope doctor` names the tensors)", file=sys.stderr)
    if rep.overflowed:
        from quantscope.backend.convert import _OVERFLOW_ADVICE
        print(f"quantscope: warning: inf in {len(rep.overflowed)} converted layer(s), e.g. {rep.overflowed[0]}: "
              f"finite source values beyond the output's range{_OVERFLOW_ADVICE[rep.to]}", file=sys.stderr)
    # written as the config says, but likely not what the file holds (as dequant): not a success
    return 1 if rep.suspect or bad or rep.overflowed else 0
