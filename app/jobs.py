"""The functions the window runs on worker threads. Plain backend calls plus the reductions the
views need (histograms on shared edges, heatmaps reduced to screen resolution); no Qt here."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Imported here, at window start-up, not inside the job functions: a worker thread importing a
# module holds the GIL for the whole import and froze the GUI for ~70 ms (bench_gui).
from quantscope.backend.compare import (
    CompareError,
    layer_alone,
    layer_detail,
    nonfinite_counts,
    sweep,
)
from quantscope.backend.compare_align import stacked_expert
from quantscope.backend.convert import convert
from quantscope.backend.demo import demo_workspace, load_demo_workspace
from quantscope.backend.doctor import diagnose
from quantscope.backend.engines import get_engine, run_on_mlx_thread
from quantscope.backend.errors import Cancelled, QuantscopeError
from quantscope.backend.formats.kernel import workers
from quantscope.backend.formats.mlx import MODE_DEFAULTS
from quantscope.backend.metrics import bulk_histograms, sqnr_db
from quantscope.backend.workspace import load_workspace

MAX_HEATMAP_ROWS = 768


def job_warm_up(*, progress=None, cancel=None) -> None:
    """On a first run (numba's cache empty), the kernels compiled by other processes (see
    :mod:`quantscope.backend.precompile`). Nothing is loaded here: the jobs load what they use
    (0.3 s in all, the GIL held up to 21 ms at a time). Loaded ahead, while the window built its
    first workspace, it stretched the event loop's longest gap at start from 46-61 to 114-298 ms
    (the GUI thread waits for the GIL after each call into Qt)."""
    from quantscope.backend.precompile import precompile
    precompile(cancel, progress=progress)


def job_load(paths, reference=None, *, progress=None, cancel=None):
    """Open checkpoints (headers and configs only) into a Workspace; those that cannot be opened
    are listed in its ``failed`` (an error only when none opens)."""
    # nothing given: the demo; a folder `quantscope demo DIR` wrote: its reference and variants
    demo = (demo_workspace() if not paths and not reference else
            load_demo_workspace(Path(paths[0]).expanduser(), any_version=True) if len(paths) == 1 and not reference
            else None)
    if demo is not None:
        return load_workspace([str(p) for p in demo.variants.values()], str(demo.reference),
                              progress=progress, cancel=cancel)
    return load_workspace(list(paths), reference, progress=progress, cancel=cancel, keep_going=True)


def reduce_rows(m: np.ndarray, max_rows: int = MAX_HEATMAP_ROWS) -> tuple[np.ndarray, int]:
    """Reduce a [rows, groups] map to at most ``max_rows`` rows by the max over row blocks
    (a hot group stays visible when the map is shrunk to the screen; so does a NaN one)."""
    rows = m.shape[0]
    per = max(1, -(-rows // max_rows))
    if per == 1:
        return m, 1
    pad = (-rows) % per
    if pad:  # below every value: the last block's max is its own rows'
        m = np.concatenate([m, np.full((pad, m.shape[1]), -np.inf, m.dtype)])
    return np.max(m.reshape(-1, per, m.shape[1]), axis=1), per


def _finite_range(arrays: dict[str, np.ndarray]):
    """(the finite values of each non-empty array, their overall min, max); (None, 0, 0) when
    there are none."""
    finite = [a[np.isfinite(a)] for a in arrays.values() if a is not None and a.size]
    finite = [a for a in finite if a.size]
    if not finite:
        return None, 0.0, 0.0
    return finite, min(float(a.min()) for a in finite), max(float(a.max()) for a in finite)


def shared_histogram(arrays: dict[str, np.ndarray], bins: int = 128):
    """Exact histograms of several arrays on one set of edges: ``(edges, counts, view)``, fine
    where the values are, ``view`` the bulk's range when outliers stretch the edges (see
    :func:`~quantscope.backend.metrics.bulk_histograms`)."""
    return bulk_histograms(arrays, bins)


def zero_histogram(zeros: dict[str, np.ndarray], top: int | None = None):
    """(edges, counts per key) of zero points: one bin per level when they are integers within
    1024 levels of each other (as every format stores them), else 128 shared bins (a damaged
    file: never one bin per value). (None, {}) when there are none. ``top``: the highest level
    the bit width allows (2^bits - 1): the levels 0..top are all on the axis, so a level no group
    uses shows as one (the axis ran over the levels used only: 0.5-14.5 for 4-bit zeros)."""
    finite, lo, hi = _finite_range(zeros)
    if finite is None:
        return None, {}
    if hi - lo > 1024 or not all(np.array_equal(z, np.round(z)) for z in finite):
        return shared_histogram(zeros)[:2]
    if top is not None and 0 <= lo and hi <= top <= 1024:
        lo, hi = 0.0, float(top)
    edges = np.arange(lo - 0.5, hi + 1.0, 1.0)
    return edges, {k: np.histogram(z, bins=edges)[0] for k, z in zeros.items() if z is not None and z.size}


def job_detail(reference, variants: dict, name: str, *, engine="auto", progress=None, cancel=None) -> dict:
    """Everything the layer views show for one layer; with ``reference`` None, what the
    checkpoints ``variants`` hold of it without a reference (values, codes, scales, zeros)."""
    d = None
    if reference is not None:
        try:
            d = layer_detail(reference, variants, name, engine=engine, cancel=cancel)
        except CompareError:  # no variant covers it (an untied lm_head the reference lacks): values alone
            variants = {"reference": reference, **variants}
    if d is None:
        d = layer_alone(variants, name, engine=engine, cancel=cancel)
    if progress:
        progress(0.9)
    # MLX's affine scales are signed (mx.quantize points the scale from a group's bias to its far
    # end, so about half are negative): shown as |scale|, the step between levels, beside the
    # other formats' positive scales (two mirrored lobes, half hidden under GPTQ's, before)
    # (by the compared row's scheme: a stacked expert or a fused part is stored under another name)
    def scheme_of(k):
        if k in d.metrics:
            return d.metrics[k].scheme
        lay = variants[k].layers.get(name) if k in variants else None
        return None if lay is None else lay.scheme
    signed = [k for k in d.scales if d.scales[k] is not None and scheme_of(k) == "mlx-affine"]
    scales = {k: np.abs(np.asarray(v, np.float64).ravel()) if k in signed else np.asarray(v, np.float64).ravel()
              for k, v in d.scales.items() if v is not None}
    scale_edges, scale_counts, scale_view = shared_histogram(scales)
    scale_nonfinite = nonfinite_counts(scales, scale_counts)
    maps = {k: reduce_rows(np.asarray(v, np.float64)) for k, v in d.group_error.items() if v is not None}
    # Integer zero points (GPTQ/AWQ/compressed-tensors) on one bin per level; MLX's float biases
    # are offsets in weight units, not zero points, so they are left out of this plot.
    zeros = {k: np.asarray(v).ravel() for k, v in d.zeros.items()
             if v is not None and variants[k].layers.get(name) is not None
             and variants[k].layers[name].scheme != "mlx-affine"}
    bits = {variants[k].layers[name].bits for k in zeros}
    # (every level of the widest bit width, 0..2^b-1: with 3- and 4-bit variants, 0..15, where the
    # data's range left a level no group uses out of sight; 4- beside 8-bit, the data's range:
    # 0..255 would squeeze the 4-bit levels into a sliver)
    even = bits and None not in bits and max(bits) - min(bits) <= 1
    zero_edges, zero_counts = zero_histogram(zeros, (1 << max(bits)) - 1 if even else None)
    return {"name": name, "detail": d, "scale_edges": scale_edges, "scale_counts": scale_counts, "scale_abs": signed,
            "scale_view": scale_view, "scale_nonfinite": scale_nonfinite, "maps": maps,
            "by_index": set(d.grouped_by_index), "blocks": dict(d.column_blocks), "zero_edges": zero_edges,
            "zero_counts": zero_counts}


def job_sweep(reference, variants: dict, *, engine="auto", cache=None, layers=None, progress=None, cancel=None):
    # One core fewer than the command line uses: the window's own thread keeps one to itself
    # (on 2 cores, two layer jobs at once starved the GUI thread of CPU and of the GIL: bench_gui).
    return sweep(reference, variants, engine=engine, progress=progress, cancel=cancel, cache=cache,
                 jobs=max(1, workers() - 1), layers=layers)


def job_heads(reference, variants: dict, *, engine="auto", progress=None, cancel=None):
    """Every attention layer's error head by head (:func:`~quantscope.backend.compare.head_sweep`)."""
    from quantscope.backend.compare import head_sweep
    return head_sweep(reference, variants, engine=engine, progress=progress, cancel=cancel)


def job_doctor(path: str, *, progress=None, cancel=None) -> list[dict]:
    return [f.to_dict() for f in diagnose(path, progress=progress, cancel=cancel)]


def job_whatif(reference, name: str, bits: int, group_size: int, mode: str, *, progress=None, cancel=None) -> dict:
    """Requantize the reference layer with mx.quantize and measure the error (float64); an expert
    of a reference that stacks them: its slice of the stack."""
    held = stacked_expert(name, reference)
    layer = reference.layer(name) if held is None else held[0]
    w = get_engine("numpy").dequantize(reference, layer)
    if held is not None:
        w = w[held[1]]
    if cancel is not None and cancel.is_set():
        raise Cancelled()
    if w.ndim < 2:
        raise QuantscopeError("only matrices can be quantized", tensor=name)
    block = group_size if mode == "affine" else MODE_DEFAULTS[mode][1]
    if w.shape[-1] % block:
        # said before MLX says it of "the matrix" in its own words
        raise QuantscopeError(f"in_features {w.shape[-1]} is not a multiple of the "
                              f"{'group size' if mode == 'affine' else mode + ' block'} {block}", tensor=name)

    # in the dtype the reference stores, as mlx-lm converts it (its scales, biases and output in
    # bf16 too): in float32 it missed the MLX variant it mimics (0.1331 against 0.1335)
    stored = layer.tensors.get("weight")
    as_dtype = {"BF16": "bfloat16", "F16": "float16"}.get(stored.dtype) if stored is not None and \
        layer.scheme == "dense" else None

    def requantize():
        import mlx.core as mx
        x = mx.array(w)
        if as_dtype is not None:
            x = x.astype(getattr(mx, as_dtype))
        try:
            if mode == "affine":
                q = mx.quantize(x, group_size=group_size, bits=bits)
                y = mx.dequantize(*q, group_size=group_size, bits=bits)
            else:
                q = mx.quantize(x, mode=mode)
                y = mx.dequantize(q[0], q[1], mode=mode, dtype=mx.float32)
        except ValueError as exc:
            raise QuantscopeError(f"MLX cannot quantize this layer that way: {exc}", tensor=name) from None
        y = y.astype(mx.float32)
        mx.eval(y)
        return np.array(y)

    y = run_on_mlx_thread(requantize)
    err = (y.astype(np.float64) - w)
    rel = float(np.linalg.norm(err) / max(np.linalg.norm(w.astype(np.float64)), 1e-30))
    if mode != "affine":  # the block-float mode's own bits and block size, not the ones it ignored
        bits, group_size = MODE_DEFAULTS[mode]
    return {"name": name, "bits": bits, "group_size": group_size, "mode": mode, "rel_fro": rel,
            "sqnr_db": sqnr_db(rel)}


def job_convert(src: str, dst: str, options: dict, *, engine="auto", progress=None, cancel=None):
    return convert(src, dst, engine=engine, progress=progress, cancel=cancel, **options)


def job_export_dequant(model, name: str, out_path: str, *, expert: int | None = None, engine="auto", progress=None,
                       cancel=None) -> str:
    """Layer ``name`` of ``model`` decoded, as .npy; ``expert``: that expert's ``[N, K]`` of a
    stacked ``[E, N, K]`` layer."""
    w = get_engine(engine).dequantize(model, model.layer(name))
    return _save_npy(out_path, w if expert is None else w[expert])


def job_export_tensor(model, tensor: str, out_path: str, *, progress=None, cancel=None) -> str:
    return _save_npy(out_path, np.array(model.ckpt.tensor(tensor)))


def _save_npy(out_path: str, a: np.ndarray) -> str:
    """``a`` as ``out_path`` (".npy" added when missing, as np.save does), whole or not at all."""
    from quantscope.backend.outfile import save_npy
    out_path = str(out_path) if str(out_path).endswith(".npy") else f"{out_path}.npy"
    save_npy(out_path, a)
    return out_path
