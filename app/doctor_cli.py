"""``quantscope doctor PATH [--json] [--full]``: the checkpoint doctor on the command line.

Exit status: 0 no errors, 1 errors found, 2 the checkpoint cannot be opened at all.
"""

from __future__ import annotations

import json
import sys


def run_doctor(args) -> int:
    """Run the doctor on ``args.path``; print the report (text or ``--json``); return the exit code."""
    from quantscope.backend.doctor import format_report, run_diagnosis
    from quantscope.backend.outfile import printable, terminal_lines

    report = run_diagnosis(args.path, full=bool(getattr(args, "full", False)))
    if getattr(args, "json", False):
        from quantscope import __version__
        json.dump(printable({"quantscope_version": __version__, **report.to_dict()}), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(terminal_lines(format_report(report)) + "\n")
    if not report.opened:
        return 2
    return 1 if report.summary["error"] else 0

