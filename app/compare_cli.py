"""``quantscope compare``: per-layer error of variants against a reference, as a table, JSON or CSV."""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import sys
import threading

from quantscope.backend.compare import ANOTHER_MODEL, smoothing_mark
from quantscope.backend.errors import QuantscopeError
from quantscope.backend.outfile import (
    atomic_output,
    printable,
    terminal_lines,
    terminal_text,
)

from .progress_bar import ProgressBar, kernels_ready

_logger = logging.getLogger(__name__)


def _fmt(v, spec: str) -> str:
    if v is None:
        return "—"
    width = int(spec.split(".")[0])
    if isinstance(v, float) and math.isinf(v):  # as wide as the numbers around it
        return format("inf" if v > 0 else "-inf", f">{width}")
    # fewer decimals where the number is too wide, then the exponent form (rel_fro 672.21883
    # widened its cell: the column lost its alignment)
    for digits in range(int(spec.split(".")[1].rstrip("f")), -1, -1):
        out = format(v, f"{width}.{digits}f")
        if len(out) <= width:
            return out
    return format(v, f"{width}.{max(1, width - 6)}g")


def short_names(labels: list[str]) -> dict[str, str]:
    """Each path's last components, as few as keep the names apart (``a/model``, ``b/model``); a
    file (``model.safetensors``, an index) with its folder, which is what names the model."""
    # (".", "..", "model.safetensors" given from inside the folder: named by the folder, not as typed)
    parts = {lb: os.path.abspath(lb).split(os.sep) if os.path.normpath(lb) in (".", "..") or os.sep not in
             os.path.normpath(lb) and lb.endswith((".safetensors", ".json")) else os.path.normpath(lb).split(os.sep)
             for lb in labels}
    out = {}
    for lb in labels:
        first = 2 if len(parts[lb]) > 1 and parts[lb][-1].endswith((".safetensors", ".json")) else 1
        for k in range(first, len(parts[lb]) + 1):
            name = "/".join(parts[lb][-k:])
            if not any(o != lb and "/".join(parts[o][-k:]) == name for o in labels):
                break
        out[lb] = name or lb
    return out


def _summary(result, labels: list[str], short: dict[str, str]) -> list[str]:
    """Per variant: the mean and median rel_fro over its layers, its bit widths, and its worst
    layer (the table alone left a researcher to scan hundreds of rows for it)."""
    out = []
    for lb in labels:
        rows = [r for r in result.rows if r.variant == lb]
        fin = [r for r in rows if math.isfinite(r.rel_fro)]
        if not fin:
            continue
        errs = [r.rel_fro for r in fin]
        worst = max(fin, key=lambda r: r.rel_fro)
        bits = sorted({r.bits for r in rows if r.bits is not None})
        extra = f" at {'/'.join(map(str, bits))} bit" if bits else ""
        out.append(f"{short[lb]}: {len(rows)} layers{extra}; rel_fro mean {statistics.fmean(errs):.4f}, median "
                   f"{statistics.median(errs):.4f}, worst {worst.rel_fro:.4f} ({worst.name})")
    return [""] + out if out else []


def format_table(result, labels: list[str]) -> str:
    """Layers × variants with rel_fro and sqnr_db per variant."""
    short = short_names(labels)
    by = {(r.name, r.variant): r for r in result.rows}
    names = list(dict.fromkeys(r.name for r in result.rows))
    w0 = max([len("layer")] + [len(n) for n in names])
    cols = [max(17, len(short[lb])) for lb in labels]
    lines = ["  ".join([" " * w0] + [short[lb].rjust(c) for lb, c in zip(labels, cols)]),
             "  ".join(["layer".ljust(w0)] + [f"{'rel_fro':>8} {'sqnr_db':>8}".rjust(c) for c in cols])]
    for n in names:
        cells = []
        for lb, c in zip(labels, cols):
            r = by.get((n, lb))
            # how the smoothing was undone, per cell: * exactly (from the norms), ~ an estimate
            mark = (smoothing_mark(r.smoothing) if r else "") or " "
            cells.append((f"{_fmt(r.rel_fro, '8.5f')}{mark}{_fmt(r.sqnr_db, '8.2f')}" if r else "—").rjust(c))
        lines.append("  ".join([n.ljust(w0)] + cells))
    lines.extend(_summary(result, labels, short))
    undone = [r for r in result.rows if r.smoothing != "none"]
    if undone:
        kinds = sorted({k.split(":")[0] for r in undone for k in r.smoothing.split("+")})
        how = {"norm": "norm: exact, the reference's norm weights over the variant's",
               "match": "match: the variant brought to the quantized reference's norm weights, which may be the "
                        "smoothed ones",
               "lstsq": "lstsq: estimated by least squares from the preceding layer's rows",
               "rows": "rows: the rows of that preceding layer, rescaled by the same estimate",
               "mup": "mup: a multiplier of config.json the converter folded into the weights (mlx-lm's Falcon-H1), "
                      "divided out as it was multiplied in",
               "mup-in": "mup-in: a multiplier of config.json the reference's converter folded into its weights "
                         "(mlx-lm's Falcon-H1), multiplied into the variant's",
               "norm-head": "norm-head: lm_head normalized by the converter (mlx-lm's Bailing norm_head columns, "
                            "Baichuan-M1's rows; transformers normalizes at run time), the reference's own norms "
                            "multiplied back in",
               "norm-head-in": "norm-head-in: the reference's lm_head normalized by its converter (mlx-lm's), the "
                               "variant's divided by its own norms to match"}
        lines.append("")
        mult = {"mup", "mup-in"} & set(kinds)
        normed = bool({"norm-head", "norm-head-in"} & set(kinds))
        rest = set(kinds) - mult - {"norm-head", "norm-head-in"}
        said = [*([" AWQ-style smoothing"] if rest else []), *([" folded multipliers"] if mult else []),
                *([" the converter's normalization of lm_head"] if normed else [])]
        matched = "match" in kinds or all(k in ("mup-in", "norm-head-in") for k in kinds)
        what = ("matching" if matched else "undoing") + " and".join(said)
        est = sum(smoothing_mark(r.smoothing) == "~" for r in undone)
        marks = ("* exactly, ~ estimated" if est and est < len(undone) else "~ estimated" if est else "* exactly")
        lines.append(f"{marks}: {len(undone)} measured after {what} ("
                     + "; ".join(how.get(k, k) for k in kinds)
                     + "); the JSON/CSV's `smoothing` says how for each, and `rel_fro_raw` is the error of the "
                       "layers as stored")
    for variant, (_, warning) in result.warnings().items():
        if variant in result.failed:
            continue  # said on stderr, as an error
        lines.append("")
        lines.append(f"! {short.get(variant, variant)}: {warning}")
    ref_bad = set(result.reference_nonfinite)
    if ref_bad:
        lines.append("")
        lines.append(f"NaN/inf in the reference's own weights ({len(ref_bad)} layer(s); every variant's error there "
                     "is NaN) — `quantscope doctor` on the reference names the tensors:")
        lines.extend(f"  reference: {n}" for n in result.reference_nonfinite)
    bad = [r for r in result.rows if not math.isfinite(r.rel_fro) and r.name not in ref_bad]
    # a finite error over ‖W‖ = 0: the reference layer is all zero (the variant was blamed)
    zero = sorted({r.name for r in bad if math.isfinite(r.mse)})
    if zero:
        lines.append("")
        lines.append(f"all-zero reference layer ({len(zero)}): ‖W‖ = 0, no relative error — `quantscope doctor` on "
                     "the reference flags it:")
        lines.extend(f"  reference: {n}" for n in zero)
    bad = [r for r in bad if r.name not in zero]
    # (a variant that looks like another model is said so above, not layer by layer)
    odd = [r for r in result.implausible() if ANOTHER_MODEL not in result.data_warnings.get(r.variant, "")]
    if odd:
        lines.append("")
        lines.append(f"! implausible error ({len(odd)}): rel_fro >= 0.99, the decode holds next to nothing of the "
                     "reference (all zeros give 1) — broken or mislabelled scales? `quantscope doctor` on the variant "
                     "checks them:")
        lines.extend(f"  {short.get(r.variant, r.variant)}: {r.name} (rel_fro {r.rel_fro:.4g})" for r in odd)
    if bad:
        lines.append("")
        lines.append(f"non-finite error ({len(bad)}): NaN/inf in the variant's decode — `quantscope doctor` on "
                     "each variant names the tensors:")
        for r in bad:
            lines.append(f"  {short.get(r.variant, r.variant)}: {r.name}")
    if result.added:
        lines.append("")
        lines.append(f"+ also measured, beyond --layers, for every variant ({len(result.added)}): "
                     + ", ".join(result.added) + " — an AWQ-style variant's smoothing of a chosen layer is undone "
                     "from its rows")
    unmatched = [u for u in result.unmatched if u.variant not in result.failed]  # (those: one error each)
    if unmatched:
        lines.append("")
        lines.append(f"not compared ({len(unmatched)}):")
        for u in unmatched:
            lines.append(f"  {short.get(u.variant, u.variant)}: {u.layer}: {u.reason}")
    # each line escaped as a whole: a name holding a newline (a folder named so) split its line
    return "\n".join(terminal_text(ln) for ln in lines)


def _compare_json(head: bytes) -> bool:
    """Whether a file beginning with ``head`` is a JSON report compare (or the window's export of
    it) wrote: any JSON file was replaced, another model's config.json or index among them, and
    doctor's and info's reports begin with quantscope_version too."""
    if head.startswith((b'{\n "reference"', b'{\n "layers"')):  # (before quantscope_version was written)
        return True
    return head.startswith(b'{\n "quantscope_version"') and b'\n "reference": ' in head


def _layers_csv(head: bytes) -> bool:
    """Whether a file beginning with ``head`` is a CSV of layer rows compare wrote (not its
    per-head CSV, which begins with ``name,`` too)."""
    from quantscope.backend.compare import HEAD_CSV_START
    return head.startswith(b"name,") and not head.startswith(HEAD_CSV_START)


def run_compare(args) -> int:
    """Run ``quantscope compare`` (args: reference, variants, json_out, csv_out, engine); exit status."""
    from quantscope.backend.checkpoint import open_checkpoint, refuse_writing_into
    from quantscope.backend.compare import HEAD_CSV_START, sweep
    from quantscope.backend.schemes import analyze

    from .cli import _is_stdout, check_output_path, refuse_another_kind

    heads_csv = getattr(args, "heads_csv", None)
    if heads_csv:
        args.heads = True
    outs = {"--json": args.json_out, "--csv": args.csv_out, "--heads-csv": heads_csv}
    for out in outs.values():
        if out:
            check_output_path(out)
    named = [(k, v) for k, v in outs.items() if v]
    # (/dev/stdout, or the file stdout is redirected to, is stdout as "-" is)
    out_std = [f"{k} {v}" for k, v in named if v in ("-", "/dev/stdout", "/dev/fd/1") or _is_stdout(v)]
    if len(out_std) > 1:
        raise QuantscopeError(", ".join(out_std[:-1]) + f" and {out_std[-1]} cannot "
                              f"{'both' if len(out_std) == 2 else 'all'} write to stdout")
    for i, (k1, v1) in enumerate(named):
        for k2, v2 in named[i + 1:]:
            if "-" not in (v1, v2) and os.path.realpath(v1) == os.path.realpath(v2):
                raise QuantscopeError(f"{k1} and {k2} both name {v2}: one would replace the other")
    ref = analyze(open_checkpoint(args.reference))
    variants = {}
    unopened: dict[str, Exception] = {}  # variants that cannot be opened: each said, the others compared
    seen: dict[str, str] = {}  # the reference itself may be a variant: a check that gives 0 error
    for path in args.variants:
        real = os.path.realpath(path)
        if real in seen:  # the same folder twice: one column, said so (the rows were merged silently)
            if seen[real] in unopened:
                continue  # (its error is said once)
            again = f"{path} given twice" if path == seen[real] else f"{path} is {seen[real]} again"
            print(terminal_text(f"quantscope: {again}: compared once"), file=sys.stderr)
            continue
        seen[real] = path
        try:
            variants[path] = analyze(open_checkpoint(path))
        except (QuantscopeError, OSError) as exc:
            unopened[path] = exc
    if not variants:  # nothing to compare: the (first) reason is the error
        raise next(iter(unopened.values()))
    for out, ours, what in ((args.json_out, _compare_json, "compare's JSON"), (args.csv_out, _layers_csv, "compare's CSV"),
                            (heads_csv, lambda h: h.startswith(HEAD_CSV_START), "compare's per-head CSV")):
        refuse_writing_into(out, [ref, *variants.values()])
        if out:  # (an existing file of another kind is not replaced)
            refuse_another_kind(out, None, what, ours=ours)
    kernels_ready()
    bar = ProgressBar("comparing")
    cancel = threading.Event()
    try:
        result = sweep(ref, variants, engine=getattr(args, "engine", "auto") or "auto", progress=bar, cancel=cancel,
                       layers=getattr(args, "layers", None))
    finally:
        bar.close()
    head_rows = []
    if getattr(args, "heads", False):
        from quantscope.backend.compare import head_sweep
        bar = ProgressBar("heads")
        try:
            head_rows = head_sweep(ref, {v: m for v, m in variants.items() if v not in result.failed},
                                   engine=getattr(args, "engine", "auto") or "auto", layers=getattr(args, "layers", None),
                                   cancel=cancel, progress=bar)
        finally:
            bar.close()
    data = result.to_json()
    if getattr(args, "heads", False):
        data["heads"] = [h.to_json() for h in head_rows]
    from quantscope import __version__
    data = {"quantscope_version": __version__, "reference": args.reference, "variants": list(variants), **data}
    data["failed"] = data.get("failed", []) + [
        {"variant": v, "file": getattr(e, "file", None) or getattr(e, "filename", None) or v, "reason": _reason(e)}
        for v, e in unopened.items()]
    if getattr(args, "layers", None) is not None:  # what was asked, and what came along with it
        data["layers_pattern"] = args.layers
        data["added_layers"] = result.added
    data = printable(data)  # a variant's path that is not UTF-8: its odd bytes as \xNN, valid JSON
    to_stdout = bool(out_std)  # ("-", /dev/stdout, or the file stdout goes to: the table to stderr)
    labels = [v for v in variants if v not in result.failed]
    table = format_table(result, labels) + (("\n" + worst_heads(head_rows, labels))
                                            if getattr(args, "heads", False) else "")
    if to_stdout:  # the table first, on stderr: a reader that closes the pipe early (| head) must not lose it
        sys.stderr.write(terminal_lines(table) + "\n")
    if args.json_out == "-":
        json.dump(data, sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif args.json_out:
        with atomic_output(args.json_out) as fh:  # a full disk or an interrupt leaves no half report
            json.dump(data, fh, indent=1)
            fh.write("\n")
    if args.csv_out:
        result.to_csv(sys.stdout if args.csv_out == "-" else args.csv_out)
    if heads_csv:
        from quantscope.backend.compare import heads_to_csv
        heads_to_csv(head_rows, sys.stdout if heads_csv == "-" else heads_csv)
    if not to_stdout:
        sys.stdout.write(terminal_lines(table) + "\n")
    quantized = sorted({lay.scheme for lay in ref.layers.values() if lay.quantized})
    if quantized:  # (verifying a conversion, or the paths swapped): said, as the window says it
        print(terminal_text(f"quantscope: note: the reference {args.reference} is quantized ({', '.join(quantized)}): "
                            "the errors are measured against its decode, not against dense weights"), file=sys.stderr)
    for err in [*result.failed.values(), *map(_reason, unopened.values())]:  # the others were compared
        print(terminal_text(f"quantscope: error: {err}"), file=sys.stderr)
    # 1: compared, but a variant's config is contradicted by its own tensors (as dequant/convert),
    # or some of its layers could not be decoded (listed with the layers not compared)
    undecodable = any("cannot be decoded" in u.reason for u in result.unmatched)
    # and figures that are no figures: NaN/inf in a variant's decode or the reference's weights,
    # an all-zero reference layer (each listed below the table; they exited 0)
    nonfinite = any(not math.isfinite(r.rel_fro) for r in result.rows)
    # a file whose smoothing is folded unevenly (AutoAWQ on a CPU: applied twice) does not compute
    # the reference's function: as broken as a misread config (it exited 0, "a note")
    uneven = any(c.warning for v, c in result.smoothing_checks.items() if v not in result.failed)
    return 2 if result.failed or unopened else 1 if (result.data_warnings or undecodable or result.implausible()
                                                      or nonfinite or uneven) else 0


#: Heads listed per variant below the table by ``--heads``.
WORST_HEADS = 5


def worst_heads(rows, labels: list[str]) -> str:
    """Each variant's heads the quantization hurt most against the rest of their layer (their
    error over the layer's), :data:`WORST_HEADS` of them, with their figures."""
    n = len({r.name for r in rows})
    if not rows:
        return ("--heads: no attention layer was split into heads (its counts come from the reference's config.json: "
                "num_attention_heads, num_key_value_heads, head_dim; the window's Heads view says why for a layer)")
    lines = ["", f"worst heads (error of the head, × its layer's; {n} attention layers measured head by head):"]
    short = short_names(labels)
    for label in labels:
        cand = [(e / r.layer_rel_fro, e, h, r.name) for r in rows if r.variant == label and r.layer_rel_fro > 0
                for h, e in zip(r.heads, r.rel_fro) if math.isfinite(e) and len(r.heads) > 1]
        cand.sort(key=lambda c: -c[0])
        bad = [f"{r.name} {h}" for r in rows if r.variant == label for h, e in zip(r.heads, r.rel_fro)
               if not math.isfinite(e)]
        if cand or bad:
            lines.append(f"  {short.get(label, label)}:")
            lines.extend(f"    {n} {h}  {e:.4g}  ({x:.2f}×)" for x, e, h, n in cand[:WORST_HEADS])
        if bad:  # (NaN or inf: a NaN weight or scale, or a reference head all zero)
            lines.append(f"    NaN/inf in {len(bad)} head(s): " + ", ".join(bad[:6]) + (" …" if len(bad) > 6 else ""))
    return "\n".join(lines)


def _reason(exc: Exception) -> str:
    """One line for a checkpoint that could not be opened (as ``main`` says it when it is the only one)."""
    if isinstance(exc, OSError) and not isinstance(exc, QuantscopeError):
        return f"{exc.filename}: {exc.strerror or exc}" if exc.filename is not None else str(exc)
    return str(exc)

