"""The ``quantscope`` command: the window by default, and the headless subcommands.

Errors on bad input are one line on stderr naming the file (and tensor) with exit status 2; a
traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import logging
import math
import os
import re
import sys
import traceback

from quantscope.backend.errors import QuantscopeError
from quantscope.backend.outfile import printable

SUBCOMMANDS = ("info", "dequant", "compare", "doctor", "convert", "demo")


def _add_common(p: argparse.ArgumentParser) -> None:
    from quantscope import __version__
    p.add_argument("-V", "--version", action="version", version=f"quantscope {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")


ENGINE_HELP = ("numpy: compiled kernels / vectorised numpy; mlx: mx.dequantize (GPTQ, AWQ and compressed-tensors "
               "integer layers repacked to MLX affine first; FP8, the FP4/MX layouts of other tools than MLX, "
               "bitsandbytes and act-order GPTQ are decoded by numpy; dequant says which); auto (default): mlx on "
               "a GPU, numpy on a CPU")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quantscope", description="Inspect quantized LLM checkpoints. Without a COMMAND, "
                                "the window: quantscope [PATH ...] [--reference REF] [--select LAYER] [--compare] [--heads] [--tab VIEW] "
                                "[--screenshot FILE] (quantscope --compare -h lists its options).",
                                epilog="Exit status: 0 done; 1 done, but something looks wrong: a config its own "
                                       "tensors contradict, NaN/inf values (compare, convert), an implausible error "
                                       "or smoothing folded twice (compare), errors found (doctor); 2 refused or "
                                       "failed (nothing written); 3 internal error; 130 interrupted. COMMAND -h gives "
                                       "each command's.")
    _add_common(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    pi = sub.add_parser("info", help="files, tensors and layers of a checkpoint",
                        description="Files, tensors and layers of a checkpoint. Exit 0: shown (its warnings "
                                    "included); 2: it cannot be opened.")
    pi.add_argument("path", help=".safetensors file, model folder, index .json, or HF-cache repo id")
    pi.add_argument("--json", action="store_true", help="machine-readable output")
    _add_common(pi)
    pd = sub.add_parser("dequant", help="write one layer's float32 weights as .npy",
                        description="Write one layer's float32 weights as .npy. Exit 0: written; 1: written as "
                                    "the config says, but the shapes suggest the config is wrong (the warning on "
                                    "stderr says why); 2: refused or failed, nothing written.")
    pd.add_argument("path", help="checkpoint")
    pd.add_argument("layer", help="module path without the component suffix, e.g. model.layers.0.self_attn.q_proj")
    pd.add_argument("-o", "--output", required=True, help="output .npy file (- for stdout; an existing .npy "
                    "is replaced, any other file refused)")
    pd.add_argument("--engine", choices=["auto", "numpy", "mlx"], default="auto", help=ENGINE_HELP)
    _add_common(pd)
    pc = sub.add_parser("compare", help="per-layer error of variants against a reference",
                        description="Per-layer error of each variant against the reference. Exit 0: all compared; "
                                    "1: compared, but a variant looks broken: its config contradicted by its own "
                                    "tensors, layers that cannot be decoded, an implausible error (rel_fro >= 0.99: "
                                    "next to nothing of the reference; zeros give 1) or NaN/inf in its decode, or the "
                                    "reference's own weights are NaN/inf or all zero in a layer; each said below the "
                                    "table (its figures are of the misread file), or its AWQ-style smoothing is "
                                    "folded unevenly (applied twice: it does not compute the reference's function); "
                                    "2: a variant could not be compared (named on stderr; the others are compared "
                                    "and their figures written).")
    pc.add_argument("--reference", required=True, help="the dense reference checkpoint")
    pc.add_argument("variants", nargs="+", metavar="CKPT", help="quantized checkpoints to compare")
    pc.add_argument("--json", dest="json_out", metavar="OUT",
                    help="write the per-layer metrics as JSON (-: to stdout, the table then goes to stderr; an "
                         "existing JSON file compare wrote is replaced, any other file refused)")
    pc.add_argument("--csv", dest="csv_out", metavar="OUT",
                    help="write the per-layer metrics as CSV (-: to stdout, the table then goes to stderr; a CSV "
                         "compare wrote is replaced, any other file refused)")
    pc.add_argument("--engine", choices=["auto", "numpy", "mlx"], default="auto", help=ENGINE_HELP)
    pc.add_argument("--layers", metavar="REGEX",
                    help="compare only the layers whose reference name matches this regular expression "
                         r"(searched anywhere in the name: 'down_proj', 'layers\.(0|1)\.', 'mlp'); "
                         "a layer whose AWQ smoothing is undone from the layer before it brings that one along")
    pc.add_argument("--heads", action="store_true",
                    help="also measure every attention layer head by head (heads from the reference's config.json; "
                         "q/k/v rows, o_proj columns): the JSON's `heads`, and each variant's worst heads below the "
                         "table (another pass over those layers)")
    pc.add_argument("--heads-csv", dest="heads_csv", metavar="OUT",
                    help="write the per-head errors as CSV, one line per (layer, variant, head): name, variant, "
                         "head, index, axis, rel_fro, ratio (over the layer's), layer_rel_fro, source; implies "
                         "--heads (-: to stdout, the table then goes to stderr)")
    _add_common(pc)
    pdoc = sub.add_parser("doctor", help="find what is wrong with a checkpoint (exit 0 ok, 1 errors, 2 cannot open)",
                          description="Find what is wrong with a checkpoint: structure, index and shards, configs, "
                                      "each quantization format's tensors, and their values (every value of a model "
                                      "up to 512 MB; of a larger one, 64 rows of each tensor, for at most about "
                                      "2 s, unless --full). The report goes to stdout, also when the checkpoint "
                                      "cannot be opened. Exit 0: no errors "
                                      "(warnings allowed); 1: errors found; 2: it cannot be opened.")
    pdoc.add_argument("path", help="checkpoint")
    pdoc.add_argument("--json", action="store_true", help="machine-readable findings")
    pdoc.add_argument("--full", action="store_true", help="check every value of a model over 512 MB too, not a time-boxed sample")
    _add_common(pdoc)
    pconv = sub.add_parser("convert", help="convert to MLX (exact repack where possible) or to dense",
                           description="Write a new checkpoint folder: --to mlx (mlx-lm's layout: GPTQ, AWQ and "
                                       "compressed-tensors integer layers repacked exactly where MLX has their "
                                       "bits and group size, the others dequantized and requantized with "
                                       "mx.quantize, each layer's action reported) or --to dense (every layer "
                                       "decoded to a float dtype). The source is never written; the output folder "
                                       "appears whole or not at all.",
                           epilog="Exit status: 0 converted; 1 converted as the config says, but the shapes "
                                  "suggest the config is wrong, or the source holds NaN/inf values that the output "
                                  "carries (the warning on stderr says why); 2: refused or failed, nothing written.")
    pconv.add_argument("src", help="source checkpoint")
    pconv.add_argument("dst", help="output folder (must not exist unless --overwrite)")
    pconv.add_argument("--to", required=True, choices=["mlx", "dense"],
                       help="mlx: an MLX checkpoint mlx-lm loads (quantized layers repacked exactly where possible); "
                            "dense: every layer decoded to a float dtype (--dtype)")
    pconv.add_argument("--bits", type=int,
                       help="quantize every layer to B bits, the ones the source kept dense (embeddings, lm_head) "
                            "too, as mlx_lm.convert does; without --bits/--group-size/--mode, quantized layers keep "
                            "their settings (repacked exactly where possible, else requantized at their own bit "
                            "width, group 64) and dense ones stay dense; a source with no quantized layer (a "
                            "dense model) is quantized whole, as mlx_lm.convert -q does: 4 bit, group 64")
    pconv.add_argument("--group-size", type=int, help="group size, with the same reach as --bits (default: mode's)")
    pconv.add_argument("--mode", choices=["affine", "mxfp4", "nvfp4", "mxfp8"], default="affine",
                       help="affine (default), or a block-float mode (fixed bits and group), with the same reach as --bits")
    pconv.add_argument("--overwrite", action="store_true",
                       help="replace an existing DST, if quantscope convert wrote it (its .quantscope-convert.json "
                            "says so) or it is empty; never a folder of other files")
    pconv.add_argument("--recipe", help="mlx-lm's mixed_2_6, mixed_3_4, mixed_3_6 or mixed_4_6; or a JSON file of module "
                                        "paths as stored: {\"model.layers.0.mlp.down_proj\": {\"bits\": 8, "
                                        "\"group_size\": 64, \"mode\": \"affine\"}, \"lm_head\": false} (false: kept "
                                        "dense); the layers it does not name get what they would without it")
    pconv.add_argument("--scales", choices=["exact", "source"], default="exact",
                       help="--to mlx, repacked GPTQ/AWQ/compressed-tensors layers: exact (default) keeps the "
                            "scales' dtype where MLX reproduces every stored value with it, else writes float32 "
                            "(mlx-lm then computes that layer in float32); source always keeps the source's dtype "
                            "(fp16), rounding the biases -s·z as mlx-lm's own loaders do (the report gives the error)")
    pconv.add_argument("--dtype", choices=["bf16", "f16", "f32"], default=None,
                       help="dense output dtype (--to dense; default bf16)")
    pconv.add_argument("--engine", choices=["auto", "numpy", "mlx"], default="auto", help=ENGINE_HELP)
    _add_common(pconv)
    pdemo = sub.add_parser("demo", help="write the demo workspace (reference + GPTQ/AWQ/MLX variants) to DIR",
                           description="Write the demo workspace to DIR: a dense bf16 reference and six variants of "
                                       "it (GPTQ, act-order GPTQ, round-to-nearest GPTQ layout, AWQ, MLX 4-bit, MLX "
                                       "mixed 3/6-bit), and under truth/ the true AWQ smoothing scales; `quantscope "
                                       "DIR` opens it. Exit 0: written; 2: refused (DIR holds files) or failed.")
    pdemo.add_argument("dir", help="a folder that does not exist yet, or an empty one")
    _add_common(pdemo)
    return p


#: The window's views, as --tab names them (their tabs' short names).
TABS = ("values", "error", "codes", "scales", "groups", "heads", "layers")


def build_window_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="quantscope", description="Open the quantscope window.",
                                epilog="Subcommands: " + ", ".join(SUBCOMMANDS) + " (quantscope COMMAND -h)")
    p.add_argument("paths", nargs="*", help="checkpoints to open (none: the demo workspace)")
    p.add_argument("--reference", help="the dense reference checkpoint")
    p.add_argument("--select", help="layer to select")
    p.add_argument("--compare", action="store_true", help="run 'Compare all layers'")
    p.add_argument("--heads", action="store_true", help="run 'Compare heads of every layer' (the Heads tab's map)")
    p.add_argument("--tab", choices=TABS, help="the view to show once the rest is done (default: Values after "
                                               "--select, Layers after --compare, Heads after --heads)")
    p.add_argument("--screenshot", help="save a PNG of the window when all jobs are done, then exit")
    _add_common(p)
    return p


def _strict_json(obj):
    """``obj`` with NaN and ±inf (a config may hold them: Python's json reads the bare tokens)
    as the strings "NaN", "Infinity", "-Infinity": the bare tokens are not JSON, and jq or a
    browser refuses the whole output."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {printable(k): _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    return printable(obj)  # (a string: a path that is not UTF-8 keeps its odd bytes as \xNN)


def cmd_info(args) -> int:
    from quantscope.backend.checkpoint import open_checkpoint
    from quantscope.backend.info import checkpoint_summary, human_bytes, human_count

    with open_checkpoint(args.path) as ckpt:
        s = checkpoint_summary(ckpt)
    if args.json:
        from quantscope import __version__
        json.dump(_strict_json({"quantscope_version": __version__, **s}), sys.stdout, indent=1, allow_nan=False)
        sys.stdout.write("\n")
        return 0
    out = [f"{s['path']}"]
    for n in s["notes"]:
        out.append(f"  note: {n}")
    for w in s["warnings"]:
        out.append(f"  warning: {w}")
    out.append(f"files ({len(s['files'])}):")
    for f in s["files"]:
        fmt = (f["metadata"] or {}).get("format", "—")
        out.append(f"  {f['name']:<40} {human_bytes(f['size']):>10}  {f['tensors']:>6} tensors  format={fmt}")
    if s["configs"]:
        out.append("configs: " + ", ".join(s["configs"]))
    out.append(f"tensors: {s['tensor_count']}   data: {human_bytes(s['total_bytes'])}")
    out.append("by dtype:")
    for dt, d in s["dtypes"].items():
        out.append(f"  {dt:<12} {d['tensors']:>7} tensors  {human_bytes(d['bytes']):>10}  "
                   f"{human_count(d['params']):>9} elements")
    q = s["quantization"]
    if q["kind"]:
        g = ", ".join(f"{k}={v}" for k, v in q["globals"].items() if v is not None)
        out.append(f"quantization: {q['kind']} from {q['file']}: {g}")
        if q["overrides"] and q["kind"] == "compressed-tensors":
            # config groups are the scheme itself (group_0 → Linear), not overrides of a global one
            for name, grp in q["overrides"]:
                grp = grp if isinstance(grp, dict) else {}
                w = grp.get("weights") or {}
                parts = [f"{w.get('num_bits')} bit {w.get('type', '')}".strip() if w else "no weight scheme",
                         f"group {w['group_size']}" if w.get("group_size") else w.get("strategy"),
                         None if w.get("symmetric") is None else "symmetric" if w["symmetric"] else "asymmetric"]
                out.append(f"  config group {name}: targets {grp.get('targets')} → {', '.join(p for p in parts if p)}")
        elif q["overrides"]:
            out.append(f"  {len(q['overrides'])} per-layer override(s)")
        for n in q["notes"]:
            out.append(f"  note: {n}")
    inferred = sorted({part for ly in s["layers"] for part in (ly.get("source") or "").split("; ")
                       if "inferred" in part})
    if inferred:  # no config said it: what was read off the tensors (the JSON has it per layer)
        out.append(f"no config gives the quantization{'' if not q['kind'] else ' of some layers'}: "
                   + "; ".join(inferred[:3]) + (f"; … ({len(inferred)} in all)" if len(inferred) > 3 else ""))
    out.append("schemes: " + ", ".join(f"{k} ×{v}" for k, v in s["schemes"].items()))
    broken = [lay for lay in s["layers"] if lay.get("problem")]
    out.append(f"logical parameters: {human_count(s['logical_params'])}")
    if broken:
        # said once near the top: each row said it, far down, and the summary undercounted unseen
        out.append(f"{len(broken)} layer(s) cannot be decoded (each says why below; `quantscope doctor` "
                   f"gives the findings), e.g. {printable(broken[0]['name'])}: {printable(broken[0]['problem'])}")
    # each module's tensors by their own names (gpt-oss's …gate_up_proj_blocks are the stack's
    # "blocks"; a tensor named "." has an empty module and component: rebuilt, a KeyError)
    by_name = {t["name"]: t for t in s["tensors"]}
    out.append("layers:")
    # columns as wide as their longest entry (modelopt-nvfp4, a bitsandbytes quant_state's name
    # pushed the rest out of line)
    sw = max([11] + [len(ly["scheme"]) for ly in s["layers"]])
    cw = max([22] + [len(c) for ly in s["layers"] for c in ly["tensors"]])

    def group_of(layer) -> str:
        g = layer["group_size"]
        if g in (-1, 0):  # (GPTQ's one group over all of K: per channel, "g-1" said nothing)
            return "per-ch"
        block = (layer.get("settings") or {}).get("weight_block_size")
        if layer["scheme"] == "fp8-block" and isinstance(block, list) and len(block) == 2:
            return f"{block[0]}×{block[1]}"
        return f"g{g}" if g else ""

    for layer in s["layers"]:
        mpath = layer["name"]
        shape = "×".join(map(str, layer["shape"])) if layer["shape"] else "?"
        bits = f"{layer['bits']}b" if layer["bits"] else ""
        group = group_of(layer)
        bpw = f"{layer['bits_per_weight']:.2f} bpw" if layer["bits_per_weight"] else ""
        out.append(f"  {mpath:<48} {layer['scheme']:<{sw}} {bits:>4} {group:>7} {shape:>14} {bpw:>10}")
        if layer["problem"]:
            out.append(f"      problem: {layer['problem']}")
        if layer.get("warning"):
            out.append(f"      warning: {layer['warning']}")
        for c in layer["tensors"]:
            t = by_name.get((layer.get("tensor_names") or {}).get(c, ""))
            if t is None:
                continue
            tshape = "×".join(map(str, t["shape"])) or "scalar"
            stored = "" if t["name"] == f"{mpath}.{c}" else f"  as {t['name'].rsplit('.', 1)[-1]}" + (
                " [E, K, N], read transposed" if c in layer.get("transposed", ()) else "")
            out.append(f"      .{c:<{cw}} {t['dtype']:<8} {tshape:<16} {human_bytes(t['bytes']):>10}  {t['file']}"
                       + stored)
    from quantscope.backend.outfile import terminal_text
    # each line escaped whole (a name's own newline is escaped, not taken for a line break)
    sys.stdout.write("\n".join(map(terminal_text, out)) + "\n")
    return 0


def cmd_dequant(args) -> int:
    import numpy as np

    from quantscope.backend.checkpoint import open_checkpoint, refuse_writing_into
    from quantscope.backend.compare_align import stacked_expert
    from quantscope.backend.engines import get_engine
    from quantscope.backend.errors import LayerError
    from quantscope.backend.outfile import terminal_text
    from quantscope.backend.schemes import analyze, data_warning

    check_output_path(args.output, binary=True)
    with open_checkpoint(args.path) as ckpt:
        refuse_writing_into(args.output, [ckpt])
        refuse_another_kind(args.output, (b"\x93NUMPY",), "a .npy file")
        model = analyze(ckpt)
        try:
            stacked = stacked_expert(args.layer, model)
        except LayerError as exc:
            raise exc.naming(ckpt.source, args.layer) from None
        expert = None
        if stacked is not None:  # an expert of a checkpoint that stacks them
            layer, expert = stacked
            print(f"quantscope: {args.layer} is expert {expert} of {layer.path} in this checkpoint", file=sys.stderr)
        else:
            layer = model.layer(args.layer)
        suspect = layer.warning or data_warning(model, layer)
        engine = get_engine(args.engine)
        w = engine.dequantize(model, layer)
        if suspect:  # (once decoded: a layer that cannot be is one error line, nothing before it)
            from quantscope.backend.doctor import STORED_ZEROS_VARY
            if STORED_ZEROS_VARY in suspect:  # (the decode itself is right: said, not only the fault)
                suspect += "; written with the stored zero points, as GPTQModel decodes them"
            print(f"quantscope: warning: {ckpt.source}: {layer.path}: {terminal_text(suspect)}", file=sys.stderr)
        if expert is not None:
            w = np.ascontiguousarray(w[expert])
        _save_npy(args.output, w)
    route = getattr(engine, "last_path", "")
    bad = int(w.size - np.count_nonzero(np.isfinite(w)))
    from quantscope.backend.outfile import terminal_text
    if bad:  # the file's values, written as they are: but said
        print(terminal_text(f"quantscope: warning: {bad:,} of {w.size:,} values of {args.layer} are NaN or inf "
                            f"(`quantscope doctor {args.path}` names the tensors)"), file=sys.stderr)
    print(terminal_text(f"{args.layer}: {layer.scheme} {'×'.join(map(str, w.shape))} float32 -> {args.output} "
                        f"(engine {engine.name}{': ' + route if route else ''})"),
          file=sys.stderr if args.output == "-" or _is_stdout(args.output) else sys.stdout)  # not into the data
    # written as the config says, but likely not what the file holds: a script must not take it as success
    return 1 if suspect else 0


def _is_stdout(path: str) -> bool:
    """Whether ``path`` is where stdout goes (/dev/stdout, or the file stdout is redirected to)."""
    try:
        a, b = os.stat(path), os.fstat(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _save_npy(path: str, w) -> None:
    """``w`` as .npy to ``path`` (whole or not at all; a path that cannot be written is named),
    or to stdout for "-"."""
    from quantscope.backend.outfile import save_npy, write_npy
    if path == "-":
        write_npy(sys.stdout.buffer, w)
        sys.stdout.buffer.flush()
        return
    save_npy(path, w)


def refuse_another_kind(path: str, starts: tuple[bytes, ...] | None, what: str, ours=None) -> None:
    """Refuse to replace an existing regular file unless it begins with one of ``starts`` (one
    this command wrote before: ``what``), ``ours(head)`` says it is one, or it is empty:
    ``-o notes.txt`` replaced the notes."""
    from quantscope.backend.errors import QuantscopeError
    if path == "-" or not os.path.isfile(path) or not os.path.getsize(path) or _is_stdout(path):
        return
    try:
        with open(path, "rb") as fh:
            head = fh.read(512 if starts is None else max(len(x) for x in starts))
    except OSError:
        return  # (said by the write itself)
    if not (ours(head) if ours is not None else head.startswith(starts)):
        raise QuantscopeError(f"{path} exists and is not {what}: not replaced — remove it or give another name")


def check_output_path(path: str, binary: bool = False) -> None:
    """Refuse, before any work, an output file that cannot be written (a folder that does not
    exist, a path that is a folder): the error used to come after the whole comparison, as an
    internal error. ``binary``: "-" is refused on a terminal (the bytes of a .npy were written
    to it)."""
    from quantscope.backend.errors import QuantscopeError
    if path == "-":
        if binary and sys.stdout.isatty():
            raise QuantscopeError("will not write binary .npy data to a terminal: give a file name, or "
                                  "redirect stdout (-o - > w.npy)")
        return
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise QuantscopeError(f"{path} is a folder; give a file name to write")
    if os.path.exists(path):  # written in place (/dev/stdout, a FIFO, a file): its own permission counts
        if not os.access(path, os.W_OK):
            raise QuantscopeError(f"cannot write {path}: it is not writable")
        return
    if not os.path.isdir(parent):
        from quantscope.backend.outfile import file_in_the_way
        up = file_in_the_way(os.path.abspath(path))  # a file where a folder is wanted: said as such
        if up is not None:
            raise QuantscopeError(f"cannot write {path}: {up} is a file, not a folder")
        raise QuantscopeError(f"cannot write {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise QuantscopeError(f"cannot write {path}: the folder {parent} is not writable")


def cmd_compare(args) -> int:
    from quantscope.app.compare_cli import run_compare
    return run_compare(args)


def cmd_doctor(args) -> int:
    from quantscope.app.doctor_cli import run_doctor
    return run_doctor(args)


def cmd_convert(args) -> int:
    from quantscope.app.convert_cli import run_convert
    return run_convert(args)


def cmd_demo(args) -> int:
    import time

    from quantscope.backend.demo import build_demo

    t0 = time.perf_counter()
    ws = build_demo(args.dir)
    print(f"demo workspace written to {ws.root} in {time.perf_counter() - t0:.1f} s")
    print(f"  {'reference':<22} {ws.reference}")
    for label, path in ws.variants.items():
        print(f"  {label:<22} {path}")
    import shlex
    root = shlex.quote(str(ws.root))
    print(f"open it: quantscope {root}\ncompare it: quantscope compare --reference {shlex.quote(str(ws.reference))} "
          + " ".join(shlex.quote(str(p)) for p in ws.variants.values()))
    print("note: the GPTQ variants' weight error (what compare measures) is above round-to-nearest's by design: "
          "GPTQ lowers the layers' output error on calibration inputs, and gptq-w4g128 is symmetric where "
          "rtn-w4g128 is not; each variant's README.md says how it was made")
    return 0


COMMANDS = {"info": cmd_info, "dequant": cmd_dequant, "compare": cmd_compare, "doctor": cmd_doctor,
            "convert": cmd_convert, "demo": cmd_demo}


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _terminate_as_interrupt() -> None:
    """SIGTERM (timeout, a CI runner, docker stop) takes the path of Ctrl+C: a conversion then
    removes its partial output as it does when interrupted (it was left behind, hidden). Either
    is taken once: a second (Ctrl+C pressed again; ``timeout -s INT`` signals the process and
    then its group) interrupted the cleanup or the exit's wait for worker threads, with a
    traceback."""
    import signal

    def interrupt(signum, frame):
        for sig in (signal.SIGTERM, signal.SIGINT):  # once: the cleanup and exit are not interrupted again
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, interrupt)
        signal.signal(signal.SIGINT, interrupt)
    except (ValueError, OSError):  # not the main thread (an embedding caller): leave it as it is
        pass


def _stdout_failing(exc: OSError) -> bool:
    """Whether an OSError without a file name came from standard output (a full disk, /dev/full):
    the files quantscope writes name themselves when they fail (:mod:`..backend.outfile`). Output
    still buffered for it is dropped, so that the exit does not fail on it a second time."""
    import errno
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
        return False
    _drop_stdout()
    return True


def _drop_stdout() -> None:
    """Point standard output at /dev/null: what is still buffered for a reader that went away
    (| head) or a full disk is discarded at exit instead of failing a second time."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Options every command takes may come before the command (`quantscope --debug info X`, as the
    # usage line shows): move them after it, or "info" would be opened as a path in the window.
    i = 0
    while i < len(argv) and (argv[i] in ("--debug", "--verbose") or re.fullmatch(r"-v+", argv[i])):
        i += 1
    if 0 < i < len(argv) and argv[i] in SUBCOMMANDS:
        argv = [argv[i], *argv[:i], *argv[i + 1:]]
    is_sub = any(a in SUBCOMMANDS for a in argv[:1]) or (argv[:1] and argv[0] in ("-h", "--help"))
    debug = "--debug" in argv
    for stream in (sys.stdout, sys.stderr):  # a path that is not UTF-8, printed: \xNN, not a traceback
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    try:
        if is_sub:
            args = build_parser().parse_args(argv)
            if args.command is None:
                build_parser().print_help()
                return 0
            _setup_logging(args.verbose)
            _terminate_as_interrupt()
            return COMMANDS[args.command](args)
        # a misspelt command (doctr) was opened as a path in the window (and, without a display,
        # said there was none to open it on)
        first = argv[0] if argv and not argv[0].startswith("-") else None
        if first is not None and not os.path.lexists(first) and "/" not in first:
            # (a bare name is no Hugging Face repo id either: those are org/name)
            near = difflib.get_close_matches(first, list(SUBCOMMANDS), n=1, cutoff=0.6)
            if near:
                raise QuantscopeError(f"unknown command {first!r} (did you mean {near[0]!r}?); "
                                      f"{first!r} is not a file or folder either")
            raise QuantscopeError(f"{first!r}: no such file or folder, and no command of that name (commands: "
                                  f"{', '.join(SUBCOMMANDS)})")
        args = build_window_parser().parse_args(argv)
        _setup_logging(args.verbose)
        if args.screenshot:  # before the workspace is built and opened, not after
            check_output_path(args.screenshot)
        from quantscope.app.window_main import run_window
        return run_window(args)
    except QuantscopeError as exc:
        if debug:  # the traceback, then the same line and exit status as without --debug
            traceback.print_exc()
        from quantscope.backend.outfile import terminal_text
        print(f"quantscope: error: {terminal_text(str(exc))}", file=sys.stderr)  # one line, whatever a name holds
        return 2
    except KeyboardInterrupt:
        print("quantscope: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (| head): quietly, and no second error at exit
        _drop_stdout()
        return 0
    except OSError as exc:  # a file or folder that cannot be read or written: the user's to fix
        if debug:
            traceback.print_exc()
        where = exc.filename if exc.filename is not None else ("standard output" if _stdout_failing(exc) else "")
        print(f"quantscope: error: {where}{': ' if where else ''}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # never a bare traceback for the user
        if debug:
            traceback.print_exc()
        if isinstance(exc.__context__, KeyboardInterrupt):  # Ctrl+C inside a compiled kernel (SystemError)
            print("quantscope: interrupted", file=sys.stderr)
            return 130
        hint = "" if debug else " (run with --debug for details)"
        print(f"quantscope: internal error: {type(exc).__name__}: {exc}{hint}",
              file=sys.stderr)
        return 3


if __name__ == "__main__":  # python -m quantscope.app.cli did nothing and exited 0
    sys.exit(main())
