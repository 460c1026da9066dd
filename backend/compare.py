"""Per-layer quantization error of any number of variants against a reference.

:func:`sweep` walks the reference's layers one decoder layer at a time, reads each reference
layer once for all variants, decodes each variant layer once (row blocks for layers over
:data:`BLOCK_ELEMENTS`), undoes equivalent transformations (see :mod:`.compare_align`) and keeps
only the metrics, so memory stays flat in model size. :func:`layer_detail` gives one layer's
histograms, code usage, scales and per-group error map.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import logging
import math
import re
import threading
from collections import OrderedDict, deque
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

from . import fused
from .checkpoint import natural_key
from .compare_align import (
    _BARE_STACK_RE,
    _SWITCH_RE,
    EXPERT_RE,
    Alignment,
    Segment,
    Target,
    Unmatched,
    align,
    canonical,
    expert_stacks,
    layer_index,
    proj_of,
    stack_expert_names,
    stack_expert_row,
    stacked_expert,
    switch_path,
)
from .engines import get_engine, group_values
from .errors import Cancelled, LayerError, QuantscopeError
from .formats import fast, histo
from .formats.codehist import GroupValues, PatternValues, pattern_values
from .formats.kernel import pool, workers
from .heads import HeadLayout, head_layout, head_ratio, head_sums, rel_error
from .metrics import (
    SMALL_ELEMENTS,
    ErrorStats,
    LogAbsDiff,
    bulk_histograms,
    diff_of,
    error_metrics,
)
from .schemes import Layer, Model

__all__ = ["LayerMetrics", "Unmatched", "SweepResult", "LayerDetail", "Alignment", "CompareError", "align",
           "sweep", "layer_detail", "LAYER_KEYS", "BLOCK_ELEMENTS", "SmoothingCheck", "smoothing_power"]

_logger = logging.getLogger(__name__)

#: Layers with more elements than this are decoded and compared in row blocks.
BLOCK_ELEMENTS = 64 * 1024 * 1024
#: Rows per block are chosen so a block holds at most this many elements.
_ROW_BLOCK_ELEMENTS = 16 * 1024 * 1024
#: Elements per row block of a selected layer's views read in blocks (:func:`_layer_detail_in_blocks`).
_VIEW_BLOCK_ELEMENTS = _ROW_BLOCK_ELEMENTS
#: Significance of a least-squares smoothing estimate: median |log s| above this.
_LSTSQ_THRESHOLD = 0.02
_BF16 = np.dtype(ml_dtypes.bfloat16)
CACHE_FILE = "compare-cache.json"
CACHE_VERSION = 7  # 2: file identities as digests; 3: entries say when the reference held NaN/inf;
#: 4: rows name the reference layer holding an expert or a tied head; 5: F64 weights in float64,
#: the fold into a fused gate_up_proj, the norms' storage step (figures that changed); 6: Falcon-H1's
#: multipliers divided out, norms compared as the multipliers the runtime applies (Gemma, Qwen3.5);
#: 7: Hunyuan's grouped qkv_proj and gate_and_up_proj, a head mlx-lm normalized (Bailing, Baichuan-M1)

#: Keys of one JSON/CSV row, in order (the command-line contract plus what the window uses).
LAYER_KEYS = ("name", "variant", "scheme", "bits", "group_size", "rel_fro", "sqnr_db", "cosine", "max_abs", "mse",
              "p50", "p95", "p99", "bits_per_weight", "rel_fro_raw", "smoothing", "variant_layer", "layer_index",
              "proj", "rel_fro_quant", "reference_layer", "expert")


class CompareError(QuantscopeError):
    """A variant cannot be compared with the reference (different model, nothing in common)."""

    default_rule = "compare"


@dataclass
class LayerMetrics:
    """Error of one variant on one reference layer (after undoing equivalent transformations)."""

    name: str
    variant: str
    variant_layer: str
    scheme: str
    bits: int | None
    group_size: int | None
    rel_fro: float
    sqnr_db: float
    cosine: float
    max_abs: float
    mse: float
    p50: float
    p95: float
    p99: float
    bits_per_weight: float | None
    rel_fro_raw: float
    smoothing: str
    layer_index: int | None
    proj: str
    #: Where the smoothing is folded inconsistently (:class:`SmoothingCheck`): the error once the
    #: smoothing is undone to the power measured, i.e. the quantization's alone; else None.
    rel_fro_quant: float | None = None
    #: The reference layer that holds the weights, where it is not ``name``: the stack
    #: (``…switch_mlp.down_proj``) of an expert row named ``…experts.{e}.down_proj``, the tied
    #: embeddings of ``lm_head``; and the expert's index in that stack (else None).
    reference_layer: str | None = None
    expert: int | None = None
    #: ‖Ŵ‖/‖W‖ (not in the JSON/CSV: it tells a layer scaled by a constant, :func:`_scaled`)
    norm_ratio: float | None = None

    def fields(self) -> dict:
        """Every field by name (a flat record: dataclasses.asdict's deep copy took a third of a
        20,000-layer comparison)."""
        return {k: getattr(self, k) for k in _METRIC_FIELDS}

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in LAYER_KEYS}


_METRIC_FIELDS = tuple(f.name for f in dataclasses.fields(LayerMetrics))


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _nonfinite(values: dict) -> dict[str, str]:
    """The figures of ``values`` JSON writes as null, named: ``{"sqnr_db": "inf"}`` (null alone
    cannot tell +inf from NaN)."""
    return {k: str(v) for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)}


#: The reason given for a layer a variant's decoder refuses (listed, its others compared).
UNDECODABLE = "the variant's layer cannot be decoded"


#: How a variant that looks like a quantization of another model is asked about (its data warning
#: says it; the command line's table then lists its layers' implausible errors no more).
ANOTHER_MODEL = "is it a quantization of a different model?"

#: A layer's error from which on it is said to be implausible (see :meth:`SweepResult.implausible`).
IMPLAUSIBLE_REL_FRO = 0.99


class SweepProgress(float):
    """A sweep's ``progress`` value: the fraction done (0..1, weighted by elements compared), a
    float as every progress callback takes, carrying what it counts: ``layers_done`` of
    ``layers_total`` (reference layers, an expert of a stack each, measured or found in the
    cache) and ``bytes_done`` of ``bytes_total`` (the stored bytes of the reference's and the
    variants' layers those read)."""

    layers_done: int
    layers_total: int
    bytes_done: int
    bytes_total: int

    def __new__(cls, fraction: float, layers_done: int, layers_total: int, bytes_done: int, bytes_total: int):
        p = super().__new__(cls, fraction)
        p.layers_done, p.layers_total, p.bytes_done, p.bytes_total = layers_done, layers_total, bytes_done, bytes_total
        return p

    def __reduce__(self):  # (pickled and copied as what it is: float's own needs one argument)
        return (SweepProgress, (float(self), self.layers_done, self.layers_total, self.bytes_done, self.bytes_total))

    __str__ = float.__repr__  # (a number where it is printed or formatted as one)

    def text(self) -> str:
        """``"3/7 layers, 1.5 MB of 4.2 GB"``."""
        from .info import human_bytes
        return (f"{self.layers_done}/{self.layers_total} layers, {human_bytes(self.bytes_done)} of "
                f"{human_bytes(self.bytes_total)}")

    def __repr__(self) -> str:
        return f"SweepProgress({float(self):.4f}, {self.text()})"


@dataclass
class SweepResult:
    """Rows (layer × variant) in reference order, and every layer that found no partner."""

    rows: list[LayerMetrics] = field(default_factory=list)
    unmatched: list[Unmatched] = field(default_factory=list)
    #: Per variant whose norms show folded smoothing: :func:`smoothing_power`'s check.
    smoothing_checks: dict[str, SmoothingCheck] = field(default_factory=dict)
    #: Variants of which no layer could be compared (the others were), with why (naming the file).
    failed: dict[str, CompareError] = field(default_factory=dict)
    #: Layers measured beyond a ``layers`` filter, because a chosen layer's smoothing is undone
    #: from their rows.
    added: list[str] = field(default_factory=list)
    #: Per variant whose config its own tensors contradict (a GPTQ file labelled with the other
    #: checkpoint_format; bits/group that the shapes rule out): what ``dequant`` warns of, as its
    #: figures are then the misreading's, not the quantization's.
    data_warnings: dict[str, str] = field(default_factory=dict)
    #: Layers whose error is non-finite because the reference's own weights hold NaN/inf (not a
    #: variant's decode): every variant's error there is NaN, and the fault is the reference's.
    reference_nonfinite: list[str] = field(default_factory=list)
    #: What decoded the layers: ``name`` (numpy, mlx), ``device``, and for numpy whether its
    #: compiled kernels ran (``compiled``) or the pure-numpy fallback. The figures are the same
    #: either way (every engine decodes bit for bit as the format's reference does); the time is not.
    engine: dict = field(default_factory=dict)

    def relabelled(self, names: dict[str, str]) -> SweepResult:
        """A copy with each variant's label replaced by ``names[label]`` where given (the window
        labels variants by folder; its exports name them by path, as ``compare`` does)."""
        def n(v: str) -> str:
            return names.get(v, v)
        return SweepResult(rows=[dataclasses.replace(r, variant=n(r.variant)) for r in self.rows],
                           unmatched=[dataclasses.replace(u, variant=n(u.variant)) for u in self.unmatched],
                           smoothing_checks={n(v): c for v, c in self.smoothing_checks.items()},
                           failed={n(v): e for v, e in self.failed.items()}, added=list(self.added),
                           data_warnings={n(v): w for v, w in self.data_warnings.items()},
                           reference_nonfinite=list(self.reference_nonfinite), engine=dict(self.engine))

    def to_json(self) -> dict:
        """Plain JSON data: ``layers`` (one object per row), ``unmatched`` (with ``reason``) and
        ``smoothing_checks`` (per variant whose smoothing was checked: ``smoothing_power``, the
        layer it was measured on, and a ``warning`` where it is not 1) and ``failed`` (the
        variants of which no layer could be compared, with the reason).

        Non-finite floats (sqnr of an exact copy: +inf) are written as null, and named in the
        row's ``nonfinite`` (``{"sqnr_db": "inf"}``): null alone could not tell an exact copy's
        +inf from a NaN, as the CSV's ``inf`` / ``nan`` do.
        """
        def row(r) -> dict:
            d = r.to_dict()
            out = {k: _json_safe(v) for k, v in d.items()}
            odd = _nonfinite(d)
            if odd:
                out["nonfinite"] = odd
            return out

        return {"layers": [row(r) for r in self.rows],
                "unmatched": [{"variant": u.variant, "layer": u.layer, "reason": u.reason} for u in self.unmatched],
                "smoothing_checks": {v: c.to_dict() for v, c in self.smoothing_checks.items()},
                "failed": [{"variant": v, "file": e.file, "reason": e.message} for v, e in self.failed.items()],
                "data_warnings": dict(self.data_warnings),
                "reference_nonfinite": list(self.reference_nonfinite),
                "implausible": [{"variant": r.variant, "layer": r.name, "rel_fro": r.rel_fro}
                                for r in self.implausible()],
                "engine": dict(self.engine)}

    def implausible(self) -> list[LayerMetrics]:
        """Rows whose error is about the reference itself or more (rel_fro >= 0.99; an all-zero
        layer has 1: the decode holds next to nothing of it). No quantization does that, at any
        bit width: the layer's scales are broken or mislabelled (zero, F16 bits read as BF16 give
        ~1e-14, one scale of 60,000), and its figures are of a misread file."""
        return [r for r in self.rows if math.isfinite(r.rel_fro) and r.rel_fro >= IMPLAUSIBLE_REL_FRO]

    def warnings(self) -> dict[str, tuple[str, str]]:
        """Per variant not compared, or whose checkpoint does not compute what the reference
        does: ``(short, full)``, the short line for a banner, the full text for the table and
        tooltips."""
        out = {}
        for v, err in self.failed.items():
            out[v] = (f"not compared: {_clip(err.message)}", str(err))
        for v, c in self.smoothing_checks.items():
            if c.warning and v not in self.failed:
                out[v] = (c.short, c.message)
        undecodable: dict[str, list[Unmatched]] = {}
        for u in self.unmatched:
            # refused by its decoder, or known undecodable when aligned (compare_align's reason)
            if u.reason.startswith("the variant's layer") and "cannot be decoded" in u.reason \
                    and u.variant not in self.failed:
                undecodable.setdefault(u.variant, []).append(u)
        notes = dict(self.data_warnings)
        for v, us in undecodable.items():  # the window listed none of these: only the CLI's table did
            why = us[0].reason.partition("cannot be decoded")[2].lstrip(": ")
            msg = f"{len(us)} layer(s) cannot be decoded, not compared (first: {us[0].layer}: {why})"
            notes[v] = f"{notes[v]}\n{msg}" if v in notes else msg
        for v, msg in notes.items():
            if v in self.failed:
                continue
            short = _clip(msg)
            out[v] = (f"{out[v][0]}; {short}", f"{out[v][1]}\n{msg}") if v in out else (short, msg)
        return out

    def to_csv(self, path) -> None:
        """One line per row with :data:`LAYER_KEYS`; unmatched layers follow with their ``reason``.
        ``path``: a file name, or an open text stream (stdout)."""
        _csv_to(path, self._write_csv)

    def _write_csv(self, fh) -> None:
        w = csv.writer(fh, lineterminator="\n")  # (the csv module's default \r\n left \r in awk's last field)
        w.writerow(LAYER_KEYS + ("reason",))
        for r in self.rows:
            d = r.to_dict()
            w.writerow(_csv_cells(["" if d[k] is None else d[k] for k in LAYER_KEYS] + [""]))
        for u in self.unmatched:
            row = dict.fromkeys(LAYER_KEYS, "")
            row.update(name=u.layer, variant=u.variant)
            w.writerow(_csv_cells([row[k] for k in LAYER_KEYS] + [u.reason]))

    def by_variant(self) -> dict[str, list[LayerMetrics]]:
        out: dict[str, list[LayerMetrics]] = {}
        for r in self.rows:
            out.setdefault(r.variant, []).append(r)
        return out


def _clip(msg: str, n: int = 200) -> str:
    """``msg`` cut to ``n`` characters (a one-line summary; the whole in the details)."""
    return msg if len(msg) <= n else msg[:n - 1] + "…"


def _nothing_matches(vm: Model, unmatched: list[Unmatched], rx=None) -> CompareError:
    """Why no layer of ``vm`` (matching ``rx``, a sweep's ``layers`` filter) has a partner: each
    kind of reason in full, with how many layers it stands for (the kind is the reason before its
    first colon, the layer's own name left out)."""
    kinds: dict[str, list[Unmatched]] = {}
    for u in unmatched:
        kinds.setdefault(u.reason.split(":")[0].replace(u.layer, "…"), []).append(u)
    parts = []
    for us in sorted(kinds.values(), key=len, reverse=True)[:3]:
        # the one that says why, where some do (a shape the config's bits/group size misread;
        # lm_head, whose input width says nothing, came first and hid it)
        u = next((x for x in us if "as its config reads it" in x.reason), us[0])
        n = len(us) - 1
        more = f" ({n} more layer{'s' if n > 1 else ''} like it)" if n else ""
        parts.append(f"{u.reason if u.layer in u.reason else f'{u.layer}: {u.reason}'}{more}")
    names_differ = all(u.reason == "absent in the variant" or (u.reason.startswith("shape mismatch")
                                                             and "as its config reads it" not in u.reason)
                       for u in unmatched)
    which = "no layer" if rx is None else f"no layer matching {_selection(rx)}"
    # a selection the variant merely lacks (a partial checkpoint) is no sign of another model
    lacks = rx is not None and all(u.reason == "absent in the variant" for u in unmatched)
    ask = (f" — the variant stores none of them ({len(vm.layers)} layers of its own; `quantscope info` lists them)"
           if lacks else f" — {ANOTHER_MODEL}" if names_differ else "")
    return CompareError(f"{which} can be compared with the reference"
                        + (f" — {'; '.join(parts)}" if parts and not lacks else "") + ask,
                        file=vm.ckpt.source, rule="compare.no-common-layers")


def _unrelated(label: str, rows_out: dict[str, dict[str, LayerMetrics]]) -> str | None:
    """Why ``label``'s weights look like another model's (None where they do not): most of its
    layers are as far from the reference as the reference is from zero, as stored. No
    quantization does that; two unrelated sets of weights of the same size are √2 apart."""
    rows = [r for by in rows_out.values() if (r := by.get(label)) is not None and math.isfinite(r.rel_fro_raw)]
    raw = [r.rel_fro_raw for r in rows]
    if len(raw) < 3 or float(np.median(raw)) < IMPLAUSIBLE_REL_FRO:
        return None
    # ... and as large as the reference, in another direction: a decode that holds next to nothing
    # (misread scales: ‖Ŵ‖ ~ 1e-10 ‖W‖) or far too much (one scale of 60,000) is a broken file,
    # said as such (SweepResult.implausible); ‖Ŵ‖/‖W‖ from rel² = r² + 1 - 2 r cos
    ratio = [r.cosine + math.sqrt(max(0.0, r.cosine ** 2 + r.rel_fro ** 2 - 1)) for r in rows
             if math.isfinite(r.cosine) and math.isfinite(r.rel_fro)]
    cosines = [r.cosine for r in rows if math.isfinite(r.cosine)]  # (a decode of all zeros has none)
    if not ratio or not 0.5 <= float(np.median(ratio)) <= 2.0 or float(np.median(cosines)) > 0.5:
        return None
    return (f"its layers are as far from the reference's as the reference's are from zero (rel_fro as stored: median "
            f"{float(np.median(raw)):.3f} over {len(raw)} layers; two unrelated sets of weights of the same size "
            f"give 1.41): {ANOTHER_MODEL} Its figures say nothing of a quantization")


#: A layer whose best constant factor c (Ŵ ≈ c·W) is this far from 1 ...
_SCALED_BY = 0.1
#: ... and whose error once divided by c is under this share of its error: said to be scaled.
_SCALED_LEAVES = 0.5


def _scaled(label: str, rows_out: dict[str, dict[str, LayerMetrics]]) -> str | None:
    """Why ``label``'s layers look like the reference's times a constant (None where none does):
    a multiplier its converter folded into the weights (mlx-lm's Falcon-H1 sanitize multiplies
    embed_tokens, lm_head, q/k/o, gate/down and the SSM projections by the config's muP
    multipliers, its runtime no longer does), measured as quantization error. From a row's sums:
    ‖Ŵ‖/‖W‖ = r (``norm_ratio``: rel_fro and cosine alone leave two values of it), the best
    c = r cos, and what is left once Ŵ is divided by it is tan θ of the angle between them (a
    quantization's own error: a 2-bit layer's shrinkage of 10% leaves most of its error, and is not
    said)."""
    found = []
    for by in rows_out.values():
        r = by.get(label)
        if r is None or r.norm_ratio is None or not all(map(math.isfinite, (r.rel_fro, r.cosine, r.norm_ratio))) \
                or r.cosine <= 0:
            continue
        c = r.norm_ratio * r.cosine
        left = math.sqrt(max(0.0, 1.0 / r.cosine ** 2 - 1.0))
        if abs(c - 1.0) > _SCALED_BY and left < _SCALED_LEAVES * r.rel_fro:
            found.append((r.name, c, r.rel_fro, left))
    if not found:
        return None
    name, c, rel, left = found[0]
    return (f"{len(found)} layer(s) are the reference's times a constant (first: {name} × {c:.4g}: rel_fro {rel:.3g}, "
            f"{left:.3g} once divided by it): a multiplier folded into the weights by the converter (mlx-lm does so "
            "for Falcon-H1's muP multipliers), or scales stored that many times too large or small; their errors "
            "include it, a quantization's do not")


# -- is the smoothing folded consistently? --------------------------------------------------------

#: Least spread of log s over a norm's channels for the power to be measured at all.
_POWER_MIN_SPREAD = 0.02
#: |power − 1| above this is reported: a consistent fold gives 1 within a few hundredths.
_POWER_TOLERANCE = 0.25
#: Rows of the checked layer used (its first ones: each input channel's scale is fitted over them).
_POWER_ROWS = 512


@dataclass
class SmoothingCheck:
    """How the stored weights of a norm-folded layer scale with the smoothing ``s`` recovered
    from the norms: weights ∝ ``s ** power`` per input channel. A consistent fold gives 1 (the
    norm is divided by s, the weights multiplied by s); 2 means the weights got s twice while
    the norm was divided once, so the checkpoint does not compute the reference's function."""

    variant: str
    layer: str
    power: float
    warning: str = ""
    #: Median, least and largest ``rel_fro_quant`` over the variant's layers (set by the sweep).
    quant_only: tuple[float, float, float] | None = None

    @property
    def short(self) -> str:
        """The warning in one line (the window's banner; the whole in its tooltip)."""
        if not self.warning:
            return ""
        what = "smoothing applied twice" if abs(self.power - 2) <= _POWER_TOLERANCE else "smoothing folded unevenly"
        line = f"{what} (weights × s^{self.power:.2f}, norm ÷ s): not the reference's function, errors include it"
        if self.quant_only is not None:
            line += f"; the quantization alone: rel_fro {self.quant_only[0]:.3f} (median)"
        return line

    @property
    def message(self) -> str:
        """The whole warning, with what undoing the measured power leaves (the quantization's error)."""
        if not self.warning or self.quant_only is None:
            return self.warning
        med, lo, hi = self.quant_only
        return (f"{self.warning}. Undoing s^{self.power:.2f} instead of s leaves the quantization's error alone: "
                f"rel_fro {lo:.3f}–{hi:.3f}, median {med:.3f} (rel_fro_quant per layer in the JSON/CSV)")

    def to_dict(self) -> dict:
        # (unrounded: rel_fro_quant undoes this very power; rounded to 1.999 it could not be rebuilt)
        d = {"smoothing_power": float(self.power), "checked_on": self.layer, "warning": self.message or None}
        if self.quant_only is not None:
            d["rel_fro_quant_median"], d["rel_fro_quant_min"], d["rel_fro_quant_max"] = self.quant_only
        return d


def smoothing_power(w: np.ndarray, wh: np.ndarray, s: np.ndarray) -> float | None:
    """Slope ``b`` of ``log c_j = a + b log s_j`` over input channels ``j``, where ``c_j`` is the
    least-squares scale of the variant's column j against the reference's (``wh ≈ w · c``) and
    ``s`` the smoothing recovered from the norms; None when ``s`` hardly varies (nothing to
    measure) or too few channels are usable."""
    w64, h64 = w.astype(np.float64), wh.astype(np.float64)
    den = np.einsum("ij,ij->j", w64, w64)
    num = np.einsum("ij,ij->j", w64, h64)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = num / den
    ok = np.isfinite(c) & (c > 0) & np.isfinite(s) & (s > 0) & (den > 0)
    if ok.sum() < 16:
        return None
    x, y = np.log(s[ok]), np.log(c[ok])
    if x.std() < _POWER_MIN_SPREAD:
        return None
    return float(np.cov(x, y, bias=True)[0, 1] / x.var())


def _check_smoothing(reference: Model, vs, eng) -> SmoothingCheck | None:
    """The smoothing power of ``vs`` measured on its first norm-folded layer (every layer of a
    file is folded by the same code, so one is enough), on its first :data:`_POWER_ROWS` rows."""
    al = vs.alignment
    if not al.folded_norms:
        return None
    cand = [t for t in al.targets.values() if t.col_scale is not None and t.smoothing != "none"]
    if not cand:
        return None
    t = min(cand, key=lambda t: _order_key(t.name))
    # the first rows only: a layer over BLOCK_ELEMENTS is decoded by row blocks (a smaller one is
    # decoded whole by the engine, as the sweep itself would)
    r1 = min(t.rows, _POWER_ROWS)
    ref_rows = _reference_rows(reference, t, eng, keep=False)
    cache: dict = {}
    try:
        w = ref_rows.stored(0, r1)  # a dense reference: the rows straight from the file
        w = ref_rows.get(0, r1) if w is None else w.astype(np.float32)
        wh = _assemble(t, lambda p: cache.setdefault(p, _Rows(vs.model, vs.model.layers[p], eng, False, {})), 0, r1)
    except QuantscopeError:
        return None  # the sweep reports an undecodable layer itself
    b = smoothing_power(w, wh, np.asarray(t.col_scale, np.float64))
    if b is None:
        return None
    warn = ""
    if abs(b - 1) > _POWER_TOLERANCE:
        warn = (f"its weights carry the smoothing scales to the power {b:.2f}, not 1 (measured on "
                f"{t.name}: weights × s^{b:.2f} while the norm is divided by s once), so the checkpoint does not "
                f"compute the reference's function and its errors include that")
        if abs(b - 2) <= _POWER_TOLERANCE:
            warn += (". AutoAWQ up to 0.2.9 quantizing on a CPU writes such files: its scale search restores "
                     "the weights from tensors that alias them, so the scales are applied twice")
    return SmoothingCheck(vs.label, t.name, b, warn)


# -- decoding rows ---------------------------------------------------------------------------------

class _PartsCkpt:
    def __init__(self, source: str, parts: dict[str, np.ndarray]) -> None:
        self.source = source
        self._parts = parts

    def tensor(self, name, rows=None):
        return self._parts[name]


class _PartsModel:
    """Stand-in for a Model whose tensors are slices, so any engine decodes a row block."""

    def __init__(self, model: Model, parts: dict[str, np.ndarray]) -> None:
        self.ckpt = _PartsCkpt(model.ckpt.source, parts)
        self.config = model.config


def _granule(layer: Layer) -> int:
    return {"gptq": 32, "awq-gemm": 8}.get(layer.scheme, 1)


def _sliced(model: Model, layer: Layer, r0: int, r1: int):
    """(model, layer) views whose decode is flattened rows [r0, r1) of ``layer``; None if unsupported."""
    rows, k = int(math.prod(layer.shape[:-1])), layer.shape[-1]
    t = layer.tensors
    ck = model.ckpt
    parts = {}
    if layer.scheme == "dense" or layer.scheme in ("mlx-affine", "mlx-mxfp4", "mlx-mxfp8", "mlx-nvfp4"):
        for c, info in t.items():
            if c in ("weight", "scales", "biases"):
                parts[info.name] = ck.rows(info.name, r0, r1)  # (a transposed stack's too)
            else:
                parts[info.name] = ck.tensor(info.name)
    elif layer.scheme == "gptoss-mxfp4":
        for c, info in t.items():
            a = ck.tensor(info.name)
            if c == "blocks":
                parts[info.name] = a.reshape(rows, *a.shape[-2:])[r0:r1]
            elif c == "scales":
                parts[info.name] = a.reshape(rows, a.shape[-1])[r0:r1]
            else:
                parts[info.name] = a
    elif layer.scheme == "gptq":
        bits = layer.bits
        for c, info in t.items():
            a = ck.tensor(info.name)
            if c in ("qweight", "scales"):
                parts[info.name] = a[:, r0:r1]
            elif c == "qzeros":
                wb = a.dtype.itemsize * 8
                parts[info.name] = a[:, r0 * bits // wb: -(-r1 * bits // wb)]
            else:
                parts[info.name] = a
    elif layer.scheme == "awq-gemm":
        for c, info in t.items():
            a = ck.tensor(info.name)
            if c in ("qweight", "qzeros"):
                parts[info.name] = a[:, r0 // 8: r1 // 8]
            elif c == "scales":
                parts[info.name] = a[:, r0:r1]
            else:
                parts[info.name] = a
    else:
        return None
    return _PartsModel(model, parts), dataclasses.replace(layer, shape=(r1 - r0, k))


class _Rows:
    """Flattened rows ``[R, K]`` of one layer as float32: whole-layer decode (kept while the
    current group needs it) or row-block decodes for layers over :data:`BLOCK_ELEMENTS`."""

    def __init__(self, model: Model, layer: Layer, engine, keep: bool, counter: dict) -> None:
        self.model, self.layer, self.engine = model, layer, engine
        self.rows = int(math.prod(layer.shape[:-1]))
        self.cols = int(layer.shape[-1])
        self.big = layer.numel > BLOCK_ELEMENTS
        self.keep = keep
        self._full: np.ndarray | None = None
        self._counter = counter

    def _decode(self, model, layer) -> np.ndarray:
        self._counter["bytes"] = self._counter.get("bytes", 0) + layer.numel * 4
        if layer.scheme == "dense":  # a plain read: no engine needed; F64 kept (the metrics take it)
            w = np.asarray(model.ckpt.tensor(layer.tensors["weight"].name))
            # (a transposed stack's: a copy in rows; rows named, -1 is no size for an empty K)
            w = w.reshape(math.prod(w.shape[:-1]), w.shape[-1])
            return w.astype(np.float64 if w.dtype == np.float64 else np.float32)
        out = self.engine.dequantize(model, layer)
        return np.asarray(out, np.float32).reshape(math.prod(layer.shape[:-1]), layer.shape[-1])

    def full(self) -> np.ndarray:
        if self._full is not None:
            return self._full
        a = self._decode(self.model, self.layer)
        if self.keep:
            self._full = a
        return a

    def stored(self, r0: int, r1: int) -> np.ndarray | None:
        """Rows [r0, r1) of a dense layer as its file stores them (a view, its own dtype); None
        for a quantized one."""
        if self.layer.scheme != "dense" or "weight" not in self.layer.tensors:
            return None
        return self.model.ckpt.rows(self.layer.tensors["weight"].name, r0, r1)

    def get(self, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) (float32, or float64 for an F64 dense layer; may be a view)."""
        if not self.big or self._full is not None:
            return self.full()[r0:r1]
        g = _granule(self.layer)
        a0, a1 = r0 // g * g, min(self.rows, -(-r1 // g) * g)
        sl = _sliced(self.model, self.layer, a0, a1)
        if sl is None:  # no row slicing for this scheme: decode once and keep
            self.keep = True
            return self.full()[r0:r1]
        return self._decode(*sl)[r0 - a0:r1 - a0]


class _RowView:
    """Rows ``[row0, row0 + rows)`` of a layer's :class:`_Rows` (one expert of a stacked reference),
    read through it: the experts of a stack share one."""

    def __init__(self, base: _Rows, row0: int, rows: int) -> None:
        self.base, self.row0, self.rows = base, row0, rows
        self.cols, self.model, self.layer, self.big = base.cols, base.model, base.layer, base.big

    def get(self, r0: int, r1: int) -> np.ndarray:
        return self.base.get(self.row0 + r0, self.row0 + r1)

    def stored(self, r0: int, r1: int) -> np.ndarray | None:
        return self.base.stored(self.row0 + r0, self.row0 + r1)

    def full(self) -> np.ndarray:
        return self.get(0, self.rows)


def _reference_rows(reference: Model, t: Target, eng, keep: bool, shared: dict | None = None):
    """The reference's rows of target ``t``: its layer's, or an expert's rows of a stack (through
    one :class:`_Rows` of the stack, kept in ``shared`` by layer path when given)."""
    rl = reference.layers[t.ref_layer]
    if t.ref_row0 == 0 and t.rows == int(math.prod(rl.shape[:-1])):
        return _Rows(reference, rl, eng, keep=keep, counter={})
    base = None if shared is None else shared.get(rl.path)
    if base is None:
        base = _Rows(reference, rl, eng, keep=True, counter={})
        if shared is not None:
            shared[rl.path] = base
    return _RowView(base, t.ref_row0, t.rows)


def _rows_releaser(reference: Model, ref_rows: _Rows | _RowView):
    """``done_rows`` for :func:`.fused.measure`: drops the mapped pages of the reference rows it
    has measured (a dense layer read in place; None otherwise)."""
    release = getattr(reference.ckpt, "release", None)
    w = ref_rows.layer.tensors.get("weight")
    if release is None or ref_rows.layer.scheme != "dense" or w is None:
        return None
    row0 = ref_rows.row0 if isinstance(ref_rows, _RowView) else 0
    return lambda r0, r1: release([w.name], (row0 + r0, row0 + r1))


def _resolve_engine(engine):
    if isinstance(engine, str):
        return get_engine(engine)
    return engine


def engine_info(engine) -> dict:
    """``{"name", "device"}`` of an engine (a name or an instance), and for numpy ``compiled``:
    whether its compiled kernels run (numba installed) or the pure-numpy fallback."""
    eng = _resolve_engine(engine)
    name = _engine_name(eng)
    out = {"name": name, "device": str(getattr(eng, "device", ""))}
    if name == "numpy":
        out["compiled"] = bool(fast.AVAILABLE)
    return out


def _engine_name(engine) -> str:
    eng = _resolve_engine(engine)
    return getattr(eng, "name", type(eng).__name__)


def _identity(model: Model) -> str:
    """A digest of every file's (path, size, mtime) and of the configs the model was read with
    (a GPTQ checkpoint_format, bits or group size edited in config.json changes every figure,
    and the cached ones were given back), in each cache key; the list itself made the keys of a
    200-shard checkpoint 32 KB each (2 GB of keys for 50,000 layers)."""
    configs = getattr(model.ckpt, "configs", None) or {}
    return hashlib.sha256(json.dumps([[list(f.identity[:3]) for f in model.ckpt.files], configs], sort_keys=True,
                                     default=str).encode()).hexdigest()[:32]


def _release_pages(models) -> None:
    """Drop this process's mapped pages of the checkpoints' files (they stay in the OS page cache).

    Every tensor is read through mmap; without this, the resident set of a sweep would grow to
    the size of all files touched. The reads of finished layers are never needed again.
    """
    for m in models:
        for f in getattr(m.ckpt, "files", ()):
            f.release_pages()


def _check_cancel(cancel) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("comparison cancelled")


# -- the sweep -----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1 << 16)  # asked for every layer of a sweep, in its order and its loop
def _group_key(name: str):
    m = layer_index(name)
    if m is None:  # the embeddings before the decoder layers, the head after them (as the model runs)
        head = name.endswith(("lm_head", "embed_out")) or name == "output"
        return (-1 if "embed" in name and not head else 2 if head else 1, natural_key(name))
    return (0, natural_key(name[:name.index(f".{m}.") + len(str(m)) + 1]))


_PROJ_RANK = {p: i for i, p in enumerate(("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj",
                                          "gate_up_proj", "gate_and_up_proj", "down_proj"))}


def describe_smoothing(label: str) -> str:
    """A row's ``smoothing`` label (``norm:PATH``, ``match:PATH``, ``lstsq:PATH``, ``rows:PATH``
    joined by ``+``) in words, short enough for a one-line summary: ``"none"`` for none."""
    if not label or label == "none":
        return "none"
    # rows:CONSUMER marks a preceding layer (up_proj) whose own rows were rescaled by the estimate
    # made for its consumer (down_proj); match:NORM a variant brought to a quantized reference's
    # norms (the reference may be the smoothed side)
    words = {"norm": "exact, from {}", "match": "to the reference's {}", "lstsq": "fitted to {}'s rows",
             "rows": "rows rescaled by the estimate for {}",
             "mup": "the converter's folded {} divided out (config.json)",
             "mup-in": "{} multiplied in, as the reference's converter folded it (config.json)",
             "norm-head": "the converter's normalization of the head's {} undone (its own norms)",
             "norm-head-in": "the head's {} normalized, as the reference's converter did"}
    out = []
    for part in label.split("+"):
        kind, _, path = part.partition(":")
        out.append(words.get(kind, kind + " {}").format(path.rpartition(".")[2] or path))
    return "; ".join(out)


def smoothing_mark(label: str) -> str:
    """The mark a figure gets for how its smoothing was undone: ``*`` exactly (from the norms), ``~``
    where an estimate went in (a least-squares fit, or rows rescaled by one), ``""`` for none."""
    if not label or label == "none":
        return ""
    return "~" if "lstsq:" in label or "rows:" in label else "*"


def only_multipliers(label: str) -> bool:
    """Whether all a row's ``smoothing`` label undid is multipliers a converter folded in (mup)."""
    return bool(label) and label != "none" and all(p.startswith(("mup:", "mup-in:", "norm-head:", "norm-head-in:"))
                                                   for p in label.split("+"))


def smoothing_action(label: str) -> str:
    """What was done to a row whose ``smoothing`` label is not ``none``: the variant's smoothing
    undone (an unquantized reference), or the variant matched to a quantized reference's
    smoothing (which side is smoothed is not known then)."""
    if only_multipliers(label):
        parts = label.split("+")
        noun = "normalization" if all(p.startswith("norm-head") for p in parts) else "multiplier"
        # (folded on the reference's side: the variant brought to it, not undone)
        verb = "matched" if all(p.startswith(("mup-in:", "norm-head-in:")) for p in parts) else "undone"
        return f"{noun} {verb}"
    return "smoothing matched" if "match:" in label else "smoothing undone"


def _order_key(name: str):
    proj = proj_of(name)
    return (_group_key(name), _PROJ_RANK.get(proj, 99), natural_key(name))


def _assemble(t: Target, rows_of: Callable[[str], _Rows], r0: int, r1: int) -> np.ndarray:
    """The variant's rows matching reference rows [r0, r1) of target ``t`` (float32)."""
    if len(t.segments) == 1:
        s = t.segments[0]
        if s.ref_rows == (0, t.rows, 1) and s.var_rows[2] == 1:
            v0 = s.var_rows[0]
            return rows_of(s.var_layer).get(v0 + r0, v0 + r1)
    out = np.empty((r1 - r0, t.cols), np.float32)
    for s in t.segments:
        a, b, st = s.ref_rows
        # ref rows of this segment inside [r0, r1): indices i with a + i*st in [r0, r1)
        i0 = max(0, -(-(r0 - a) // st))
        i1 = min(len(range(a, b, st)), -(-(r1 - a) // st))
        if i1 <= i0:
            continue
        va, vb, vst = s.var_rows
        if s.var_transposed:  # (the columns of a block of rows: MLA's embed_q, per head)
            src = rows_of(s.var_layer).get(va, vb).T[i0:i1]
        else:
            lo, hi = va + i0 * vst, va + (i1 - 1) * vst + 1
            src = rows_of(s.var_layer).get(lo, hi)[::vst]
        out[a + i0 * st - r0: a + (i1 - 1) * st + 1 - r0: st] = src
    return out


def _row_fit(w: np.ndarray, wh: np.ndarray, skip: int = 0) -> np.ndarray:
    """Per row, s minimising ‖ŵ_r − w_r / s‖ (least squares in 1/s): s = (w·w) / (w·ŵ); the first
    ``skip`` rows are not fitted (1: a fused gate_up_proj's gate half, which nothing was folded
    into)."""
    w64, h64 = w.astype(np.float64), wh.astype(np.float64)
    num = np.einsum("ij,ij->i", w64, w64)
    den = np.einsum("ij,ij->i", w64, h64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where((den > 0) & (num > 0), num / den, 1.0)
    s[:skip] = 1.0
    return s


class _VariantState:
    def __init__(self, label: str, model: Model, alignment: Alignment) -> None:
        self.label, self.model, self.alignment = label, model, alignment
        self.row_scales: dict[str, np.ndarray] = {}   # consumer target -> s (its input columns)
        self.row_smoothing: dict[str, str] = {}


def _smoothing_for(vs: _VariantState, t: Target, row_scales: dict | None = None) -> tuple[np.ndarray | None, str]:
    """The per-input-channel smoothing to undo on target ``t`` (None: none) and how it was found:
    the norms' ratio, times the least-squares estimate from the preceding layer's rows
    (``row_scales``: those estimates by consumer target; the sweep's by default)."""
    row_scales = vs.row_scales if row_scales is None else row_scales
    col = t.col_scale
    label = t.smoothing
    if t.col_fit_from is not None and t.name in row_scales:
        s = row_scales[t.name]
        s = s[s.size - t.cols:]  # (the up half of a fused gate_up_proj: its last rows)
        col = s if col is None else col * s
        fit = f"lstsq:{t.col_fit_from}"
        label = fit if label == "none" else f"{label}+{fit}"
    if t.fold:  # (a multiplier folded into the rows: divided out by _unfold)
        label = t.fold if label == "none" else f"{label}+{t.fold}"
    return col, label


def _unfold(t: Target, wh: np.ndarray, r0: int, r1: int) -> np.ndarray:
    """Rows [r0, r1) of the variant with the multiplier folded into them divided out (Falcon-H1's
    muP multipliers in mlx-lm's conversion: :func:`~.compare_align._find_multipliers`)."""
    if t.fold_rows is None:
        return wh
    return wh / t.fold_rows[r0:r1, None].astype(np.float32)


#: Layers from this size are measured in one fused pass where they can be (:mod:`.fused`).
#: Below it, a layer is small enough to sort (:meth:`~.metrics.ErrorStats.add_small`). Layers of
#: 64k-1M elements (q/k/v/o of 0.5-1.5B models) took the general path until 2026-12: the one pass
#: measures them in half the time. So do layers over 2**27 (70B's MLP layers, 235M weights):
#: they kept the general path until 2026-12 for the values the pass collects, but those are a
#: few MB once narrowed (measured: 57 MB at most for such a layer), and the general path took
#: 4x as long (8.2 s against 2.2 s for one down_proj and three variants).
FUSED_MIN_ELEMENTS = SMALL_ELEMENTS + 1
FUSED_MAX_ELEMENTS = 1 << 40
#: A layer from this size is measured alone, its blocks spread over all cores (see ``sweep``):
#: 70B's MLP layers (235M), not 8B's (59M), whose sweep two at a time was 15% faster (and
#: under 0.7 GB).
WIDE_ELEMENTS = 1 << 27


def _target_bytes(reference: Model, states: list[_VariantState], name: str) -> int:
    """Stored bytes a sweep reads for target ``name``: its reference layer's (the share of a
    stack holding its rows) and every variant's segments'."""
    def share(layer: Layer, rows: int) -> int:
        total_rows = max(1, math.prod(layer.shape[:-1]))
        return layer.stored_bytes * min(rows, total_rows) // total_rows

    out, ref_done = 0, False
    for vs in states:
        t = vs.alignment.targets.get(name)
        if t is None:
            continue
        if not ref_done:
            out += share(reference.layers[t.ref_layer], t.rows)
            ref_done = True
        for seg in t.segments:  # (a transposed segment reads its block's rows: var_rows, not count)
            out += share(vs.model.layers[seg.var_layer], len(range(*seg.var_rows)) if seg.var_transposed else seg.count)
    return out


def _fused_candidates(t_name: str, ref_rows: _Rows, todo: list[_VariantState], engine, decoders: dict | None = None):
    """(reference rows, {label: (decoder, v0, col)}, {label: smoothing label}) for the variants
    the one-pass path (:mod:`.fused`) can measure; ({} when none). ``decoders`` keeps each
    variant layer's row decoder by (label, path) for the targets after (the experts of a stack
    share one: building it converts the whole stack's scales, a fifth of an MoE sweep's time
    when done per expert)."""
    lay = ref_rows.layer
    row_decoder = getattr(engine, "row_decoder", None)
    # (the rows measured: one expert's where the reference stacks them)
    if row_decoder is None or not FUSED_MIN_ELEMENTS <= ref_rows.rows * ref_rows.cols <= FUSED_MAX_ELEMENTS:
        return None, {}, {}
    R, K = ref_rows.rows, ref_rows.cols
    w = lay.tensors.get("weight")
    if lay.scheme == "dense" and w is not None and w.transposed:
        # a stack stored [E, K, N]: read block by block, an expert transposed at a time (as one
        # array, the whole stack's copy: 4 GB for gpt-oss-120b's gate_up_proj)
        ck, row0 = ref_rows.model.ckpt, ref_rows.row0 if isinstance(ref_rows, _RowView) else 0

        def transposed_rows(r0, r1, dst, name=w.name):
            ck.rows_into(name, row0 + r0, row0 + r1, dst)

        # (bf16 rows as stored: the measuring kernel widens them itself, as it does the mapping's)
        ref = fast.RowDecoder(transposed_rows, R, K, 1, dtype=_BF16 if w.dtype == "BF16" else None)
    elif lay.scheme == "dense":
        ref = ref_rows.stored(0, R)  # (an expert's rows, of a stack)
        if ref is None or ref.dtype not in (np.dtype(np.float32), _BF16):
            return None, {}, {}
    else:  # a quantized reference (verifying a conversion): decoded block by block too
        # (an expert of a quantized stack: the general path; the decoder reads whole stacks)
        ref = row_decoder(ref_rows.model, lay) if not isinstance(ref_rows, _RowView) else None
        if ref is None or (ref.rows, ref.cols) != (R, K):
            return None, {}, {}
    picked, labels = {}, {}
    for vs in todo:
        t = vs.alignment.targets[t_name]
        if len(t.segments) != 1 or t.row_fit_for is not None or t.cols != K:
            continue
        seg = t.segments[0]
        if seg.ref_rows != (0, R, 1) or seg.var_rows[2] != 1:
            continue
        key = (vs.label, seg.var_layer)
        dec = decoders.get(key) if decoders is not None else None
        if dec is None:
            dec = row_decoder(vs.model, vs.model.layers[seg.var_layer])
            if decoders is not None and dec is not None:
                decoders[key] = dec
        v0 = seg.var_rows[0]
        if dec is None or dec.cols != K or v0 + R > dec.rows or v0 % dec.granule \
                or ((v0 + R) % dec.granule and v0 + R != dec.rows):
            continue
        col, label = _smoothing_for(vs, t)
        if t.fold_rows is not None:  # one factor for every row: as one for every column
            f = t.fold_rows[0]
            if not np.all(t.fold_rows == f):
                continue  # (a factor per row: the general path)
            col = np.full(K, f) if col is None else col * f
        picked[vs.label] = (dec, v0, col)
        labels[vs.label] = label
    return ref, picked, labels


def _measure_target(t_name: str, ref_rows: _Rows, states: list[_VariantState], todo: list[_VariantState],
                    rows_cache: Callable[[_VariantState, str], _Rows], cancel, on_block,
                    engine=None, candidates=None) -> dict[str, dict]:
    """Metrics of every variant in ``todo`` on reference target ``t_name``: in one fused pass
    where the layout allows (:mod:`.fused`), else decoded whole or by row blocks.
    ``candidates``: :func:`_fused_candidates`'s answer, when the caller has it already."""
    out: dict[str, dict] = {}
    ref, picked, labels = candidates or _fused_candidates(t_name, ref_rows, todo, engine)
    # Progress counts the layer's rows once: from the fused pass when it takes every variant.
    fused_reports = bool(picked) and len(picked) == len(todo)
    if picked:
        res = fused.measure(ref, picked, cancel=cancel, on_rows=on_block if fused_reports else None)
        for lb, r in res.items():
            if r is not None:  # None: its percentiles need the general path
                r["smoothing"] = labels[lb]
                out[lb] = r
    rest = [vs for vs in todo if vs.label not in out]
    if rest:
        out.update(_measure_general(t_name, ref_rows, rest, rows_cache, cancel,
                                    (lambda k: None) if fused_reports else on_block))
    return out


def _measure_general(t_name: str, ref_rows: _Rows, todo: list[_VariantState],
                     rows_cache: Callable[[_VariantState, str], _Rows], cancel, on_block) -> dict[str, dict]:
    """Metrics of every variant in ``todo`` on reference target ``t_name`` (decoded layers)."""
    R = ref_rows.rows
    K = ref_rows.cols
    step = max(1, _ROW_BLOCK_ELEMENTS // max(K, 1) if ref_rows.layer.numel > BLOCK_ELEMENTS else R)
    blocks = [(r0, min(R, r0 + step)) for r0 in range(0, R, step)] or [(0, 0)]
    stats = {vs.label: (ErrorStats(), ErrorStats(raw_only=True)) for vs in todo}
    extra = {}

    def variant_block(vs: _VariantState, w: np.ndarray, r0: int, r1: int, fit_rows: bool):
        t = vs.alignment.targets[t_name]
        wh = _assemble(t, lambda p: rows_cache(vs, p), r0, r1)
        raw = wh
        col, label = _smoothing_for(vs, t)
        if col is not None:
            wh = wh / col[None, :].astype(np.float32)
        wh = _unfold(t, wh, r0, r1)
        if t.row_fit_for is not None and fit_rows:
            skip = min(r1 - r0, max(0, t.fit_row0 - r0))
            s = _row_fit(w, wh, skip)
            key = t.row_fit_for
            ok = float(np.median(np.abs(np.log(s[skip:])))) > _LSTSQ_THRESHOLD if s.size > skip else False
            if ok:
                prev = vs.row_scales.get(key)
                full = prev if prev is not None and prev.size == R else np.ones(R)
                full[r0:r1] = s
                vs.row_scales[key] = full
                wh = wh * s[:, None].astype(np.float32)
                extra.setdefault(vs.label, set()).add(f"rows:{key}")
        return wh, raw, label

    labels = {}
    two_pass_later = len(blocks) > 1
    for r0, r1 in blocks:
        _check_cancel(cancel)
        w = ref_rows.get(r0, r1)
        for i, vs in enumerate(todo):
            _check_cancel(cancel)
            if i:  # the block's rows reported a share per variant measured (a layer of up to 64M
                # weights is one block: three variants of it took seconds without a word)
                on_block((r1 - r0) * i // len(todo) - (r1 - r0) * (i - 1) // len(todo))
            wh, raw, label = variant_block(vs, w, r0, r1, True)
            labels[vs.label] = label
            st, st_raw = stats[vs.label]
            if not two_pass_later and w.size <= SMALL_ELEMENTS:
                st.add_small(w, wh)
            else:
                st.add(w, wh)
            if raw is not wh:
                st_raw.add(w, raw)
            if not two_pass_later and st.exact_percentiles is None:
                st.plan()
                st.gather(w, wh)
            del wh, raw
        n = len(todo)
        on_block((r1 - r0) - (r1 - r0) * (n - 1) // n if n else r1 - r0)
    if two_pass_later:  # exact percentiles: second look at the row blocks
        for st, _ in stats.values():
            st.plan()
        for r0, r1 in blocks:
            _check_cancel(cancel)
            w = ref_rows.get(r0, r1)
            for vs in todo:
                t = vs.alignment.targets[t_name]
                wh = _assemble(t, lambda p: rows_cache(vs, p), r0, r1)
                col, _ = _smoothing_for(vs, t)
                if col is not None:
                    wh = wh / col[None, :].astype(np.float32)
                wh = _unfold(t, wh, r0, r1)
                if t.row_fit_for is not None and f"rows:{t.row_fit_for}" in extra.get(vs.label, ()):
                    wh = wh * vs.row_scales[t.row_fit_for][r0:r1, None].astype(np.float32)
                stats[vs.label][0].gather(w, wh)
    out = {}
    for vs in todo:
        st, st_raw = stats[vs.label]
        res = st.result()
        res["rel_fro_raw"] = st_raw.rel_fro if st_raw.n else res["rel_fro"]
        label = labels.get(vs.label, "none")
        for e in sorted(extra.get(vs.label, ())):
            label = e if label == "none" else f"{label}+{e}"
        res["smoothing"] = label
        out[vs.label] = res
    return out


def _row(t: Target, vs: _VariantState, res: dict) -> LayerMetrics:
    vm = vs.model
    layers = [vm.layers[p] for p in t.var_layers]
    first = layers[0]
    ne = sum(l.numel for l in layers)
    # (each layer's own figure, weighted: compressed-tensors' weight_shape is no part of it)
    bpw = sum(l.bits_per_weight * l.numel for l in layers if l.numel) / ne if ne else None
    held = t.ref_layer if t.ref_layer != t.name else None  # (a stack holding the expert, a tied head's embeddings)
    if held and (_SWITCH_RE.match(held) or _BARE_STACK_RE.match(held)) and t.rows:
        expert = t.ref_row0 // t.rows  # the reference stacks the experts
    elif first.shape and len(first.shape) == 3 and len(t.segments) == 1 and t.rows == first.shape[-2]:
        expert = t.segments[0].var_rows[0] // t.rows  # the variant does: which of its stack this is
    else:
        expert = None
    return LayerMetrics(name=t.name, variant=vs.label, variant_layer=",".join(t.var_layers), scheme=first.scheme,
                        bits=first.bits, group_size=first.group_size,
                        rel_fro=res["rel_fro"], sqnr_db=res["sqnr_db"], cosine=res["cosine"], max_abs=res["max_abs"],
                        mse=res["mse"], p50=res["p50"], p95=res["p95"], p99=res["p99"], bits_per_weight=bpw,
                        rel_fro_raw=res["rel_fro_raw"], smoothing=res["smoothing"], layer_index=layer_index(t.name),
                        proj=proj_of(t.name), reference_layer=held, expert=expert, norm_ratio=res.get("norm_ratio"))


def _cache_key(ref_id, var_id, name: str, engine_name: str) -> str:
    return json.dumps([CACHE_VERSION, ref_id, var_id, name, engine_name])


def load_cache(folder) -> dict:
    """The persisted sweep cache in ``folder`` (empty when absent or unreadable)."""
    p = Path(folder) / CACHE_FILE
    try:
        data = json.loads(p.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _csv_to(path, write: Callable) -> None:
    """``write(fh)`` into ``path``: an open text stream (stdout) as it is, a file name atomically
    in UTF-8 (layer names may be any text)."""
    if hasattr(path, "write"):
        write(path)
        return
    from .outfile import atomic_output
    with atomic_output(path, "w", newline="", encoding="utf-8") as fh:
        write(fh)


def _csv_cells(cells: list) -> list:
    """:func:`printable` cells, a carriage return in a name escaped (``\\x0d``): with lines ending
    in \\n the csv writer no longer quotes a field that holds one, and readers split the row there."""
    from .outfile import printable
    return [c.replace("\r", "\\x0d") if isinstance(c, str) else c for c in printable(cells)]


def _listed(obj):
    """JSON for the cache's arrays (row scales are kept as arrays in memory)."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} in the comparison cache")


def save_cache(folder, cache: dict) -> None:
    """Write ``cache`` as JSON into ``folder`` (atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (CACHE_FILE + ".tmp")
    tmp.write_text(json.dumps(cache, default=_listed))
    tmp.replace(folder / CACHE_FILE)


#: Layers of a variant whose side tensors are read for :func:`~.schemes.data_warning` (one tool
#: wrote them all: the first few tell).
_DATA_CHECK_LAYERS = 3


def _config_warning(vs) -> str | None:
    """What ``dequant`` would warn of for the layers compared of ``vs``: a config the shapes
    contradict (:attr:`Layer.warning`), or one the stored zero points contradict
    (:func:`~.schemes.data_warning`); with how many layers, the first one named."""
    from .doctor import STORED_ZEROS_VARY
    from .schemes import data_warning
    model = vs.model
    paths = list(dict.fromkeys(p for t in vs.alignment.targets.values() for p in t.var_layers))  # reference order
    shaped = [p for p in paths if model.layers[p].warning]
    if shaped:
        n, first = len(shaped), min(shaped, key=_order_key)
        return (f"{n} layer{'s' if n > 1 else ''} read as the config says though the shapes disagree "
                f"(first {first}): {model.layers[first].warning}")
    checked = 0
    for p in paths:
        lay = model.layers[p]
        if not lay.quantized:  # (a config value no loader can use is said of any scheme's layers;
            continue           # the zero points are read for GPTQ and compressed-tensors ones)
        w = data_warning(model, lay)
        if w is not None:
            if "shapes decide" in w:  # a config value ignored: the figures are right, loaders are not
                return f"the figures are right, but loaders would not read this file ({p}): {w}"
            if STORED_ZEROS_VARY in w:
                # sym=true over zero points that vary: decoded with the stored zeros, as GPTQModel
                # does (right); runtimes that take the config's word are not
                return (f"the figures are right (decoded with the stored zero points, as GPTQModel does), but "
                        f"runtimes that trust the config misread this file ({p}): {w}")
            return f"the figures are of a misread file ({p}): {w}"
        checked += 1
        if checked >= _DATA_CHECK_LAYERS:
            break
    return None


def _selection(rx) -> str:
    """How a sweep's ``layers`` filter is named in messages: the command line's option, or what
    the object says (the window's search)."""
    return getattr(rx, "what", None) or f"--layers '{rx.pattern}'"


def _none_compared(result: SweepResult) -> CompareError:
    """The error of a sweep in which no variant could be compared: that variant's own reason, or
    every variant's."""
    errs = list(result.failed.values())
    if len(errs) == 1:
        return errs[0]
    return CompareError("no variant can be compared with the reference: " + "; ".join(map(str, errs)),
                        rule="compare.no-common-layers")


def _layers_pattern(reference: Model, pattern):
    """The ``layers`` filter of a sweep, compiled where it is a regular expression (else any
    object with ``search(name)``, ``pattern`` and ``what``); an error when it is not a regular
    expression or matches no layer of the reference at all."""
    if isinstance(pattern, str):
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise CompareError(f"--layers '{pattern}' is not a regular expression: {e}",
                               rule="compare.bad-pattern") from None
    else:
        rx = pattern
    names = list(reference.layers) + stack_expert_names(reference)  # (stacked: compared expert by expert)
    can = {canonical(n) for n in names}
    if "lm_head" not in can and "model.embed_tokens" in can:
        names.append("lm_head")  # a tied head: compared as the embeddings (see compare_align.align)
    if not any(rx.search(n) for n in names):
        some = sorted(reference.layers, key=_order_key)[:3]
        raise CompareError(f"no layer of the reference matches {_selection(rx)} (names look like: "
                           + ", ".join(some) + ")", file=reference.ckpt.source, rule="compare.no-layer-matches")
    return rx


def _nothing_selected(reference: Model, vm: Model, rx) -> CompareError:
    """Why no layer matching ``rx`` is compared, where none of them is even listed without
    partner: they are not weight matrices (norms, biases)."""
    hit = sorted((n for n in reference.layers if rx.search(n)), key=_order_key)
    shown = ", ".join(hit[:3]) + (f" and {len(hit) - 3} more" if len(hit) > 3 else "")
    return CompareError(f"none of the reference's layers matching {_selection(rx)} ({shown}) is one "
                        "that compare measures: only weight matrices (linear layers, embeddings, experts) are",
                        file=vm.ckpt.source, rule="compare.no-common-layers")


def _picked(rx, t: Target) -> bool:
    """Whether a ``layers`` filter takes target ``t``: by its name, or an expert of a stacked
    reference by the stack's (the name ``quantscope info`` shows)."""
    return bool(rx.search(t.name)) or (t.name != t.ref_layer and t.name == stack_expert_row(t.ref_layer, t.ref_row0
                                                                                            // max(1, t.rows))
                                       and bool(rx.search(t.ref_layer)))


def _only_layers(states: list, rx, result: SweepResult) -> None:
    """Keep the targets whose reference name matches ``rx`` (:func:`_picked`), and the layers their
    smoothing is estimated from (named in ``result.added``). Every variant in ``states`` has one."""
    chosen = {n for vs in states for n, t in vs.alignment.targets.items() if _picked(rx, t)}
    for vs in states:  # the producers of a chosen layer's row-scale estimate come along
        for t in vs.alignment.targets.values():
            if t.row_fit_for in chosen and t.name not in chosen:
                chosen.add(t.name)
                result.added.append(t.name)
    result.added = sorted(set(result.added), key=_order_key)
    for vs in states:
        vs.alignment.targets = {n: t for n, t in vs.alignment.targets.items() if n in chosen}


def sweep(reference: Model, variants: dict[str, Model], *, engine="auto", progress=None, cancel=None,
          cache: dict | None = None, cache_dir=None, jobs: int | None = None, layers=None) -> SweepResult:
    """Per-layer error of every variant against ``reference``.

    Parameters
    ----------
    reference
        The analyzed reference checkpoint (usually dense).
    variants
        Analyzed variants by label (the command line uses the path given).
    engine
        ``"auto"``, ``"numpy"``, ``"mlx"`` or an engine object with ``dequantize(model, layer)``.
    progress
        Called with the fraction done (0..1, weighted by elements compared) as a
        :class:`SweepProgress`: a float that also says how many layers are done of how many,
        and how many of the bytes they read.
    cancel
        Object with ``is_set()``; checked before every block, so a cancelled sweep stops within
        one block and raises :class:`~quantscope.backend.errors.Cancelled`.
    cache
        Dict of finished (layer, variant) metrics keyed by file identity (path, size, mtime) of
        both checkpoints, layer and engine; filled as layers finish, so a cancelled sweep resumed
        with the same dict skips them.
    cache_dir
        Optional folder where the cache is loaded from and saved to as JSON (``compare-cache.json``).
    jobs
        Layers measured at once by the one-pass path (default: one per core; the window uses
        one fewer, to keep a core for itself).
    layers
        A regular expression: only the reference layers whose name it matches (``re.search``)
        are compared, and only their unmatched entries listed; or an object with ``search(name)``,
        ``pattern`` and ``what`` (:class:`~.search.NameTerms`, the window's search). A layer
        whose smoothing is undone from a preceding layer's rows (o_proj from v_proj, down_proj
        from up_proj) brings that layer along, so its figures equal a whole sweep's;
        :attr:`SweepResult.added` names it.

    Returns
    -------
    SweepResult

    Raises
    ------
    CompareError
        No variant has a layer in common with the reference (names the variant's file). When
        only some have none, the others are compared and those are in ``result.failed``.
    Cancelled
        ``cancel`` was set.
    """
    eng = _resolve_engine(engine)
    eng_name = _engine_name(engine)
    if cache is None:
        cache = {}
    if cache_dir is not None:
        for k, v in load_cache(cache_dir).items():
            cache.setdefault(k, v)
    states = []
    result = SweepResult(engine=engine_info(eng))
    rx = _layers_pattern(reference, layers) if layers is not None else None
    for label, vm in variants.items():
        try:
            al = align(reference, vm, label=label)
        except (QuantscopeError, ValueError, TypeError, IndexError, KeyError) as exc:
            # one variant's odd file costs that variant, named, never the others' figures (an
            # IndexError here was exit 3 with no JSON for the good variants)
            _logger.debug("aligning %s failed", label, exc_info=True)
            err = exc if isinstance(exc, QuantscopeError) else CompareError(
                f"cannot be aligned with the reference: {type(exc).__name__}: {exc}", file=vm.ckpt.source)
            result.failed[label] = err
            continue
        unmatched = al.unmatched if rx is None else [u for u in al.unmatched if rx.search(u.layer) or any(
            rx.search(st) for st in expert_stacks(u.layer, reference))]  # (an expert: by its stack's name too)
        result.unmatched.extend(unmatched)  # (a failed variant's too: the JSON/CSV list them)
        if not any(rx is None or _picked(rx, t) for t in al.targets.values()):  # not compared; the others are
            result.failed[label] = (_nothing_matches(vm, unmatched, rx) if rx is None or unmatched
                                    else _nothing_selected(reference, vm, rx))
            continue
        states.append(_VariantState(label, vm, al))
    if not states:
        raise _none_compared(result)
    for vs in states:
        _check_cancel(cancel)
        chk = _check_smoothing(reference, vs, eng)
        if chk is not None:
            result.smoothing_checks[vs.label] = chk
    if rx is not None:
        _only_layers(states, rx, result)
    for vs in states:  # of the layers compared
        if (w := _config_warning(vs)) is not None:
            result.data_warnings[vs.label] = w
    ref_id = _identity(reference)
    var_ids = {vs.label: _identity(vs.model) for vs in states}
    names = sorted({n for vs in states for n in vs.alignment.targets}, key=_order_key)
    by_group: dict = {}  # the names of each decoder layer (scanning all names per layer was quadratic)
    for n in names:
        by_group.setdefault(repr(_group_key(n)), []).append(n)  # (the key holds lists: its repr is hashable)
    total = sum(max(vs.alignment.targets[n].rows * vs.alignment.targets[n].cols
                    for vs in states if n in vs.alignment.targets) for n in names)
    total += sum(t.rows * t.cols for vs in states if vs.label in result.smoothing_checks
                 and result.smoothing_checks[vs.label].warning
                 for t in vs.alignment.targets.values())  # the quantization-only pass
    total = total or 1
    done = 0
    # layers and bytes, as the progress says them: each target's stored bytes, the reference's
    # and every variant's (a share of a stack for one expert's rows)
    # (only for a caller that asks: 15,000 expert layers took 0.1 s to count)
    target_bytes = {n: _target_bytes(reference, states, n) for n in names} if progress is not None else {}
    layers_done, bytes_done, bytes_total = 0, 0, sum(target_bytes.values())
    counter: dict = {}
    group = None
    caches: dict[tuple[str, str], _Rows] = OrderedDict()
    ref_stacks: dict[str, _Rows] = {}  # a stacked reference layer, shared by its experts' rows (this group)
    decoders: dict[tuple[str, str], object] = {}  # variant layers' row decoders (this group: a stack's experts)
    ref_nonfinite: set[str] = set()  # targets whose reference holds NaN/inf
    uses: dict[tuple[str, str], int] = {}
    # targets of this group still to finish, per layer read (the reference's: label None): its
    # mapped pages are dropped once the last is done, so the resident set holds the layers in
    # flight, not a whole decoder layer (1.7 GB of bf16 reference in one layer of a 70B model)
    unread: dict[tuple[str | None, str], int] = {}
    rows_out: dict[str, dict[str, LayerMetrics]] = {}

    report_lock = threading.Lock()

    def report(n_el: int, layer: str | None = None) -> None:
        """``n_el`` more elements measured; ``layer``: that target is done (its bytes read). Also
        from the layer jobs' threads: one at a time, in order."""
        nonlocal done, layers_done, bytes_done
        if progress is None:
            return
        with report_lock:
            done += n_el
            if layer is not None:
                layers_done += 1
                bytes_done += target_bytes.get(layer, 0)
            progress(SweepProgress(min(1.0, done / total), layers_done, len(names), bytes_done, bytes_total))

    def rows_cache(vs: _VariantState, path: str) -> _Rows:
        key = (vs.label, path)
        r = caches.get(key)
        if r is None:
            layer = vs.model.layers[path]
            r = caches[key] = _Rows(vs.model, layer, eng, keep=uses.get(key, 0) > 1, counter=counter)
        return r

    pending: deque = deque()
    n_jobs = max(1, jobs if jobs is not None else workers())

    def finish(name: str, todo: list[_VariantState], res: dict[str, dict]) -> None:
        for vs in todo:
            t = vs.alignment.targets[name]
            row = _row(t, vs, res[vs.label])
            rows_out.setdefault(name, {})[vs.label] = row
            entry = {"metrics": row.fields()}
            if res[vs.label].get("ref_finite") is False:  # (known from ΣW²: nothing to read again)
                ref_nonfinite.add(name)
                entry["ref_nonfinite"] = True
            if t.row_fit_for:
                rs = vs.row_scales.get(t.row_fit_for)
                # (an array: as a list of floats a 70B up_proj's took 0.9 MB in a session's cache)
                entry["row_scale"] = None if rs is None else rs.copy()
            cache[_cache_key(ref_id, var_ids[vs.label], name, eng_name)] = entry

    def done_with(name: str) -> None:
        """Target ``name`` is measured (or was cached): counted done, and the pages of the layers
        it was the last of this group to read released."""
        report(0, name)
        read: dict[tuple[str | None, str], Model] = {}
        for vs in states:
            t = vs.alignment.targets.get(name)
            if t is not None:
                read[(None, t.ref_layer)] = reference
                read.update({(vs.label, p): vs.model for p in t.var_layers})
        for key, model in read.items():
            n = unread.get(key)
            if n is None:
                continue
            if n > 1:
                unread[key] = n - 1
                continue
            del unread[key]
            release = getattr(model.ckpt, "release", None)
            if release is not None and key[1] in model.layers:
                release([i.name for i in model.layers[key[1]].tensors.values()])

    def drain(limit: int) -> None:
        """Finish layer jobs, in the order they end, until at most ``limit`` are in flight (a
        short layer ending before a long one frees its core for the next at once)."""
        while len(pending) > limit:
            ended, _ = futures.wait([p[3] for p in pending], return_when=futures.FIRST_COMPLETED)
            job = next(p for p in pending if p[3] in ended)
            pending.remove(job)
            name, todo, ref_rows, fut, labels = job
            out = {}
            for lb, r in fut.result().items():
                if r is not None:  # None: its percentiles need the general path
                    r["smoothing"] = labels[lb]
                    out[lb] = r
            rest = [vs for vs in todo if vs.label not in out]
            if rest:
                out.update(dropping_undecodable(name, rest, lambda vs_, name=name, ref_rows=ref_rows: _measure_general(
                    name, ref_rows, vs_, rows_cache, cancel, lambda k: None)))
            finish(name, [vs for vs in todo if vs.label in out], out)
            done_with(name)

    def dropping_undecodable(name: str, todo: list[_VariantState], measure) -> dict[str, dict]:
        """``measure(todo)``; a variant whose layer its decoder refuses (LayerError naming its
        file) is listed without partner, with the reason, and the others are measured: one
        broken layer of one variant used to abort the whole comparison."""
        while todo:
            try:
                return measure(todo)
            except LayerError as exc:
                bad = next((vs for vs in todo if exc.file is not None and vs.model.ckpt.source == exc.file), None)
                if bad is None:
                    raise  # the reference's, or not one variant's: nothing to compare against
                with report_lock:
                    result.unmatched.append(Unmatched(bad.label, name, f"{UNDECODABLE}: {exc.message}"))
                todo = [vs for vs in todo if vs is not bad]
        return {}

    try:
        for name in names:
            g = _group_key(name)
            if g != group:  # a new decoder layer: drop kept decodes, count shared variant layers
                group = g
                caches.clear()
                decoders.clear()
                ref_stacks.clear()
                _release_pages([reference] + [vs.model for vs in states])
                uses.clear()  # (unread is not: jobs of the last group may still be running; its keys are theirs)
                for n2 in by_group[repr(g)]:
                    read = set()
                    for vs in states:
                        t2 = vs.alignment.targets.get(n2)
                        if t2 is not None:
                            read.add((None, t2.ref_layer))
                            for p in t2.var_layers:
                                uses[(vs.label, p)] = uses.get((vs.label, p), 0) + 1
                                read.add((vs.label, p))
                    for key in read:  # once per target, as done_with counts them
                        unread[key] = unread.get(key, 0) + 1
            present = [vs for vs in states if name in vs.alignment.targets]
            todo = []
            for vs in present:
                key = _cache_key(ref_id, var_ids[vs.label], name, eng_name)
                hit = cache.get(key)
                t = vs.alignment.targets[name]
                if hit is not None:
                    # under this run's name: the key holds the files, the figures the name the
                    # variant had then (a checkpoint opened beside another of its name is "x (2)")
                    rows_out.setdefault(name, {})[vs.label] = LayerMetrics(**{**hit["metrics"], "variant": vs.label})
                    if hit.get("ref_nonfinite"):
                        ref_nonfinite.add(name)
                    if hit.get("row_scale") is not None and t.row_fit_for:
                        vs.row_scales[t.row_fit_for] = np.array(hit["row_scale"], np.float64)  # (a copy)
                else:
                    todo.append(vs)
            t0 = present[0].alignment.targets[name]
            n_el = t0.rows * t0.cols
            if not todo:
                report(n_el)
                done_with(name)
                continue
            ref_rows = _reference_rows(reference, t0, eng, keep=True, shared=ref_stacks)
            ref, picked, labels = _fused_candidates(name, ref_rows, todo, eng, decoders)
            if picked and len(picked) == len(todo):
                # one job per layer on its own thread: while one layer's serial steps run,
                # another's blocks keep the other cores busy. The last layer spreads its blocks
                # over all cores: alone at the end, on one thread it would leave the others idle.
                # So does a layer of WIDE_ELEMENTS or more, alone: two at once held two layers'
                # variant pages and buffers (70B's MLP layers: over 1.5 GB together).
                wide = n_el >= WIDE_ELEMENTS
                if wide:
                    drain(0)
                fut = pool("layer").submit(fused.measure, ref, picked, cancel=cancel,
                                          on_rows=lambda k, c=t0.cols: report(k * c),
                                          parallel=n_jobs > 1 and (wide or name == names[-1]),
                                          # (a smaller layer's pages go at its end, in done_with:
                                          # a madvise per block cost an MoE sweep 5%)
                                          done_rows=_rows_releaser(reference, ref_rows) if wide else None)
                pending.append((name, todo, ref_rows, fut, labels))
                drain(0 if wide else n_jobs - 1)  # at most n_jobs running
            else:
                drain(0)
                def measure(vs_, name=name, ref_rows=ref_rows, cols=t0.cols, ref=ref, picked=picked, labels=labels):
                    mine = {x.label for x in vs_}
                    return _measure_target(name, ref_rows, states, vs_, rows_cache, cancel,
                                           lambda k: report(k * cols), engine=eng,
                                           candidates=(ref, {k: v for k, v in picked.items() if k in mine}, labels))

                res = dropping_undecodable(name, todo, measure)
                finish(name, [vs for vs in todo if vs.label in res], res)
                done_with(name)
            del ref_rows
            for vs in present:  # release variant decodes this target was the last user of
                for p in vs.alignment.targets[name].var_layers:
                    k = (vs.label, p)
                    uses[k] = uses.get(k, 1) - 1
                    if uses[k] <= 0:
                        caches.pop(k, None)
        drain(0)
        for vs in states:
            if (why := _unrelated(vs.label, rows_out)) is not None:
                # the "smoothing" found between two models' norms, and its power, mean nothing
                chk = result.smoothing_checks.pop(vs.label, None)
                if chk is not None and chk.warning:  # (its quantization-only pass, counted in the total, is not made)
                    report(sum(t.rows * t.cols for t in vs.alignment.targets.values()))
                old = result.data_warnings.get(vs.label)
                result.data_warnings[vs.label] = why if old is None else f"{why}\n{old}"
            elif (why := _scaled(vs.label, rows_out)) is not None:
                old = result.data_warnings.get(vs.label)
                result.data_warnings[vs.label] = why if old is None else f"{old}\n{why}"
        for vs in states:  # inconsistent smoothing: the quantization's own error besides
            chk = result.smoothing_checks.get(vs.label)
            if chk is not None and chk.warning:
                entries = {n: cache.get(_cache_key(ref_id, var_ids[vs.label], n, eng_name)) for n in names}
                _add_quant_only(reference, vs, chk, names, rows_out, {n: e for n, e in entries.items() if e},
                                eng, cancel, report)
    finally:
        fused.SPARE.clear()  # the buffers reused from layer to layer go back to the system
        if cache_dir is not None:
            save_cache(cache_dir, cache)
    for name in names:
        for vs in states:
            r = rows_out.get(name, {}).get(vs.label)
            if r is not None:
                result.rows.append(r)
    # a variant none of whose layers could be decoded (found only now: compressed-tensors, for
    # one, checks its shapes in the decode) was not compared either: said as such, not as a table
    # with no figures of it
    got = {r.variant for r in result.rows}
    for vs in states:
        if vs.label not in got:
            result.smoothing_checks.pop(vs.label, None)  # of a variant not compared: not to be reported
            result.data_warnings.pop(vs.label, None)
            result.failed[vs.label] = _nothing_matches(vs.model, [u for u in result.unmatched if u.variant == vs.label],
                                                       rx)
    if not got:
        raise _none_compared(result)
    result.reference_nonfinite = [n for n in names if n in ref_nonfinite]
    return result


def _add_quant_only(reference: Model, vs: _VariantState, chk: SmoothingCheck, names: list[str],
                    rows_out: dict[str, dict[str, LayerMetrics]], entries: dict[str, dict], eng, cancel,
                    report) -> None:
    """Set ``rel_fro_quant`` on the rows of ``vs``, whose smoothing is folded to the power
    ``chk.power`` instead of 1: each smoothed layer measured again with its smoothing undone to
    that power (the least-squares row scales re-estimated in that light), which leaves the error
    the quantization made; a layer without smoothing has its rel_fro. ``chk.quant_only`` gets
    their median, least and largest.

    A second pass, paid for such broken checkpoints only (rel_fro alone, float64 sums). Each
    row's figure (and its row scales) goes into its cache entry (``entries``) as it is found, so
    a resumed sweep measures only what is missing; NaN marks a layer that could not be decoded."""
    row_scales: dict[str, np.ndarray] = {}  # this pass's least-squares estimates, by consumer target
    stacks: dict[str, _Rows] = {}  # a stacked reference layer, read once for its experts (this group)
    group = None
    for name in names:
        row = rows_out.get(name, {}).get(vs.label)
        if row is None:
            continue
        if (g := _group_key(name)) != group:
            group = g
            stacks.clear()
        t = vs.alignment.targets[name]
        entry = entries.get(name)
        fit = t.row_fit_for is not None and t.row_fit_for in vs.row_scales  # as the sweep did
        if row.rel_fro_quant is not None and (not fit or (entry or {}).get("row_scale_quant") is not None):
            if fit:
                row_scales[t.row_fit_for] = np.array(entry["row_scale_quant"], np.float64)
            report(t.rows * t.cols)
            continue
        col, _ = _smoothing_for(vs, t, row_scales)
        if col is None and not fit:  # nothing folded here: the sweep's figure is the quantization's
            row.rel_fro_quant = row.rel_fro
            report(t.rows * t.cols)
        else:
            colp = None if col is None else (np.asarray(col, np.float64) ** chk.power).astype(np.float32)
            ref_rows = _reference_rows(reference, t, eng, keep=False, shared=stacks)
            var_rows: dict[str, _Rows] = {}
            step = max(1, _ROW_BLOCK_ELEMENTS // max(t.cols, 1)) if ref_rows.big else t.rows
            sdd = sww = 0.0
            s_all = np.ones(t.rows) if fit else None
            try:
                for r0 in range(0, t.rows, step):
                    _check_cancel(cancel)
                    r1 = min(t.rows, r0 + step)
                    w = ref_rows.get(r0, r1)
                    x = _assemble(t, lambda p, kept=var_rows: kept.setdefault(
                        p, _Rows(vs.model, vs.model.layers[p], eng, keep=True, counter={})), r0, r1)
                    if colp is not None:
                        x = x / colp[None, :]
                    x = _unfold(t, x, r0, r1)
                    if fit:
                        s_all[r0:r1] = s = _row_fit(w, x, min(r1 - r0, max(0, t.fit_row0 - r0)))
                        x = x * s[:, None].astype(np.float32)
                    w64 = w.astype(np.float64)
                    d = x.astype(np.float64) - w64
                    sdd += float(np.einsum("ij,ij->", d, d))
                    sww += float(np.einsum("ij,ij->", w64, w64))
                    report((r1 - r0) * t.cols)
                row.rel_fro_quant = math.sqrt(sdd / sww) if sww > 0 else (0.0 if sdd == 0 else math.inf)
            except LayerError:
                row.rel_fro_quant = math.nan  # the sweep's own row says what is wrong with the layer
                fit = False
            if fit:
                row_scales[t.row_fit_for] = s_all
        if entry is not None:
            entry["metrics"]["rel_fro_quant"] = row.rel_fro_quant
            if fit:
                entry["row_scale_quant"] = row_scales[t.row_fit_for].copy()
    got = [r.rel_fro_quant for n in names if (r := rows_out.get(n, {}).get(vs.label)) is not None
           and r.rel_fro_quant is not None and math.isfinite(r.rel_fro_quant)]
    if got:
        chk.quant_only = (float(np.median(got)), min(got), max(got))


# -- one layer in detail ---------------------------------------------------------------------------

@dataclass
class LayerDetail:
    """Everything the views show for one reference layer.

    Attributes
    ----------
    name
        The reference module path.
    value_edges, value_counts
        Shared bin edges and exact counts of weight values: key ``"reference"`` and each variant.
    error_edges, error_counts
        Shared bin edges and exact counts of the signed error ``Ŵ − W`` per variant (None and
        empty without a reference: :func:`layer_alone`).
    code_counts
        Per quantized variant, exact counts of each stored code level ``0 .. 2**bits - 1``.
    scales, zeros
        Per variant, the stored scales and zero points (MLX affine: biases; None where absent),
        float32 in their stored orientation.
    group_error
        Per variant, ``[rows, groups]`` relative error ``‖Ŵ_g − W_g‖ / ‖W_g‖`` of each group.
    metrics
        Per variant, the same row :func:`sweep` gives.
    value_view, error_view
        The range holding the bulk of the values / errors where a few outliers stretch the edges
        far beyond it (:func:`~.metrics.bulk_histograms`), else None.
    nonfinite
        Per key (``"reference"`` or a variant) with any, how many decoded weights are NaN or
        ±inf: they are in no bin.
    left_out
        Per variant without this layer in the views: why (the sweep's unmatched reason).
    """

    name: str
    value_edges: np.ndarray
    value_counts: dict[str, np.ndarray]
    error_edges: np.ndarray
    error_counts: dict[str, np.ndarray]
    code_counts: dict[str, np.ndarray]
    scales: dict[str, np.ndarray]
    zeros: dict[str, np.ndarray | None]
    group_error: dict[str, np.ndarray]
    metrics: dict[str, LayerMetrics]
    value_view: tuple[float, float] | None = None
    error_view: tuple[float, float] | None = None
    nonfinite: dict[str, int] = field(default_factory=dict)
    #: Variants left out of every view of this layer, with why (no partner, cannot be decoded).
    left_out: dict[str, str] = field(default_factory=dict)
    #: Variants whose group error map groups the columns by their act-order index (g_idx).
    grouped_by_index: set[str] = field(default_factory=set)
    #: Shared bin edges and exact counts of log10 |Ŵ − W| per variant, and its bulk's range: one
    #: axis for variants whose errors differ by orders of magnitude (on the signed error's shared
    #: edges, a 4-bit variant's error spread over a hundred bins left an 8-bit one in two).
    log_error_edges: np.ndarray | None = None
    log_error_counts: dict[str, np.ndarray] = field(default_factory=dict)
    log_error_view: tuple[float, float] | None = None
    #: Per variant with any, how many errors are exactly 0 (no place on a log axis).
    zero_errors: dict[str, int] = field(default_factory=dict)
    #: Variants whose every error is exactly 0 (the layer stored as the reference stores it): in
    #: neither error histogram.
    exact_copies: list[str] = field(default_factory=list)
    #: Variants quantized without groups (per-channel scales): their group error map's cells are
    #: blocks of this many columns, not groups.
    column_blocks: dict[str, int] = field(default_factory=dict)
    #: Variants whose codes are floats (FP4, FP8): their code counts are in the order of the
    #: codes' values (NaN codes left out), with the least and largest value.
    float_codes: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: How the layer's rows or columns fall into attention heads (from config.json), None for a
    #: layer that is no attention projection or does not fit whole heads.
    heads: HeadLayout | None = None
    #: Per variant, the relative error ``‖Ŵ_h − W_h‖F / ‖W_h‖F`` of each head, in ``heads``' order.
    head_error: dict[str, np.ndarray] = field(default_factory=dict)


def stored_codes(model: Model, layer: Layer) -> np.ndarray | None:
    """The stored integer codes of a quantized layer (uint8, logical ``[..., N, K]``), or None."""
    from .formats import awq, bnb, ct, gptq
    from .formats import mlx as mlxfmt
    ck = model.ckpt
    t = {c: ck.tensor(i.name) for c, i in layer.tensors.items()}
    s = layer.scheme
    if s == "gptq":
        return gptq.codes(t["qweight"], bits=layer.bits).reshape(layer.shape)
    if s == "awq-gemm":
        return awq.codes_gemm(t["qweight"])
    if s == "awq-gemv":
        return awq.codes_gemv(t["qweight"])
    if s.startswith("mlx-"):
        return mlxfmt.affine_codes(t["weight"], layer.bits, layer.shape[-1])
    if s == "ct-pack":
        return ct.codes_pack_quantized(t["weight_packed"], layer.shape, bits=layer.bits,
                                       packing=layer.settings.get("packing", "auto"))
    if s in ("bnb-nf4", "bnb-fp4"):
        return bnb.codes_4bit(t["weight"], layer.settings)
    if s in ("ct-nvfp4", "ct-mxfp4", "modelopt-nvfp4", "gptoss-mxfp4"):  # E2M1 pairs, low nibble first
        a = np.asarray(t[_PACKED_CODES[s]])
        return ct.codes_fp4(a.reshape(-1, a.shape[-2] * a.shape[-1]) if s == "gptoss-mxfp4" else a,
                            layer.path).reshape(layer.shape)
    return None


#: The packed tensor of each scheme whose every ``bits``-wide field (2, 4 or 8 bits, LSB first
#: in each byte; never across bytes) is one stored code, in whatever order.
_PACKED_CODES = {"gptq": "qweight", "awq-gemm": "qweight", "awq-gemv": "qweight", "ct-pack": "weight_packed",
                 "bnb-nf4": "weight", "bnb-fp4": "weight", "mlx-affine": "weight", "mlx-mxfp4": "weight",
                 "mlx-nvfp4": "weight", "mlx-mxfp8": "weight", "ct-nvfp4": "weight_packed", "ct-mxfp4": "weight_packed",
                 "modelopt-nvfp4": "weight", "gptoss-mxfp4": "blocks"}


def packed_level_counts(model: Model, layer: Layer, rows: np.ndarray | None = None) -> np.ndarray | None:
    """How often each code level is stored, counted straight from the packed words where each
    field of them is a code and ``rows`` (None: all) are the whole layer: one histogram of the
    bytes, folded into levels, instead of unpacking every code (AWQ's interleaved order cost 0.45 s
    of a 58M-weight layer). The order of the codes does not matter to their counts. None where
    that does not apply (3/5/6 bits, padding, a subset of rows, no numba)."""
    key = _PACKED_CODES.get(layer.scheme)
    bits = layer.bits
    if not fast.AVAILABLE or key is None or bits not in (2, 4, 8) or key not in layer.tensors or not layer.shape:
        return None
    n_rows = math.prod(layer.shape[:-1])
    if rows is not None and not (len(rows) == n_rows and np.array_equal(rows, np.arange(n_rows))):
        return None
    t = layer.tensors[key]
    if t.nbytes * 8 != layer.numel * bits:  # padding fields would count as codes
        return None
    by = np.ascontiguousarray(model.ckpt.tensor(t.name)).reshape(-1).view(np.uint8)
    hist = histo.level_counts(by, 256)
    per, mask = 8 // bits, (1 << bits) - 1
    fields = (np.arange(256)[:, None] >> (bits * np.arange(per))[None, :]) & mask  # [byte, field]
    return np.bincount(fields.ravel(), weights=np.repeat(hist, per).astype(np.float64),
                       minlength=1 << bits).astype(np.int64)


def _scales_zeros(model: Model, layer: Layer) -> tuple[np.ndarray | None, np.ndarray | None]:
    from .engines import read_parts
    from .formats import awq, ct, gptq
    t = read_parts(model, layer)  # (an MLX block-float layer's F8-typed scales as their bytes, as U8 ones)
    s = layer.scheme
    f32 = (lambda a: None if a is None else np.asarray(a).astype(np.float32))
    if s == "gptq":
        n = layer.shape[-2]
        z = gptq.unpack_zeros(t["qzeros"], layer.bits, n, int(layer.settings.get("version", 1)))
        return f32(t["scales"]), f32(z)
    if s == "awq-gemm":
        z = None if "qzeros" not in t else awq.unpack_gemm(t["qzeros"], t["scales"].shape[1])
        return f32(t["scales"]), f32(z)
    if s == "mlx-affine":
        return f32(t["scales"]), f32(t["biases"])
    if s == "ct-pack" and "weight_zero_point" in t:  # packed words: unpacked to code levels
        z = ct.zero_levels(t["weight_zero_point"], t["weight_packed"], t["weight_scale"], t["weight_shape"],
                           bits=layer.bits, packing=layer.settings.get("packing", "auto"),
                           name=layer.tensors["weight_zero_point"].name)
        return f32(t["weight_scale"]), f32(z)
    for c in ("scales", "weight_scale", "weight_scale_inv", "weight.absmax", "SCB"):
        if c in t:
            return f32(t[c]), f32(t.get("weight_zero_point"))
    return None, None


def _expert_of_stack_target(al: Alignment, name: str, reference: Model) -> Target | None:
    """Expert ``name`` (``{block}.experts.{e}.{proj}``, as a sweep names an expert of a stacked
    reference) of a variant that stacks the experts as the reference does: its rows of the stack
    target. None otherwise."""
    sw = switch_path(name)
    st = None if sw is None else al.targets.get(sw[0])
    if st is None or len(st.segments) != 1 or st.col_scale is not None:
        return None
    seg, e = st.segments[0], sw[1]
    a, b, step = seg.var_rows
    if seg.ref_rows != (0, st.rows, 1) or step != 1 or b - a != st.rows:
        return None
    shape = reference.layers[st.ref_layer].shape
    if not shape or len(shape) != 3 or e >= shape[0] or shape[0] * shape[1] != st.rows:
        return None
    n = int(shape[1])
    return Target(name, st.ref_layer, n, st.cols, [Segment((0, n, 1), seg.var_layer, (a + e * n, a + (e + 1) * n, 1))],
                  ref_row0=e * n)


def _stack_of_experts_target(al: Alignment, name: str, reference: Model) -> Target | None:
    """Stack ``name`` of the reference (``{block}.switch_mlp.{proj}`` [E, N, K]) as a whole, for a
    variant that stores its experts one by one (the sweep's rows are per expert): their targets
    joined, when every expert has one (no smoothing to undo per expert). None otherwise."""
    rl = reference.layers.get(name)
    if rl is None or stack_expert_row(name, 0) is None or not rl.shape or len(rl.shape) != 3:
        return None
    E, n, k = (int(x) for x in rl.shape)
    segs = []
    for e in range(E):
        t = al.targets.get(stack_expert_row(name, e))
        if t is None or t.col_scale is not None or t.col_fit_from or t.rows != n:
            return None
        # (each expert's segments moved to its rows: a gate_up_proj's gate and up parts too)
        segs += [dataclasses.replace(s, ref_rows=(s.ref_rows[0] + e * n, s.ref_rows[1] + e * n, s.ref_rows[2]))
                 for s in t.segments]
    return Target(name, name, E * n, k, segs)


#: Columns per cell of the group error map of a layer quantized without groups.
BLOCK_COLUMNS = 128


def _group_errors(w: np.ndarray, wh: np.ndarray, layer: Layer, model: Model, heads: HeadLayout | None = None,
                  r0: int = 0) -> tuple[np.ndarray, bool, int | None, tuple[np.ndarray, np.ndarray] | None]:
    """(``[..., rows, groups]`` relative error of each group, whether the columns were grouped by
    the file's act-order index, the width of the column blocks taken instead of groups for a
    layer without any, else None, and with ``heads``, the per-head sums ``(Σ (Ŵ − W)², Σ W²)``
    of these rows, which are the layer's from row ``r0``). Each group's sums take only its own
    columns: a NaN or inf weight makes its own group's cell non-finite, not its whole row."""
    K = w.shape[-1]
    gs = layer.group_size if layer.group_size and layer.group_size > 0 else None
    g_idx = None
    # act-order: each column's group from the file (GPTQ's g_idx, compressed-tensors' weight_g_idx;
    # -1, uninitialised, means none, as the library reads it)
    key = "g_idx" if layer.scheme == "gptq" else "weight_g_idx" if layer.scheme.startswith("ct-") else None
    if key is not None and key in layer.tensors:
        g_idx = np.asarray(model.ckpt.tensor(layer.tensors[key].name)).astype(np.int64).reshape(-1)
        if g_idx.shape != (K,) or (g_idx < 0).any():
            g_idx = None
    if g_idx is not None and K and not g_idx.any():  # one group of the whole row (GPTQ's group -1)
        g_idx = None
        gs = None
    by_index = g_idx is not None and bool((np.diff(g_idx) < 0).any())  # a real permutation
    block = None
    if g_idx is None:
        if gs is None or K % gs:
            # no groups (per-channel or per-tensor scales: FP8, int8, bnb): the map was one column
            # of whole rows; blocks of BLOCK_COLUMNS columns show where along the row it errs
            gs = BLOCK_COLUMNS if K > BLOCK_COLUMNS and K % BLOCK_COLUMNS == 0 else K
            block = gs if gs != K else None
        g_idx = np.arange(K) // gs
    ng = int(g_idx.max()) + 1 if K else 0
    if K and fast.AVAILABLE and w.dtype in (np.float32, np.float64) and wh.dtype in (np.float32, np.float64):
        # one compiled pass, no float64 copies of the layer (histo.group_sums)
        num, den = histo.group_sums(w.reshape(-1, K), wh.reshape(-1, K), g_idx, ng)
        num, den = num.reshape(w.shape[:-1] + (ng,)), den.reshape(w.shape[:-1] + (ng,))
    else:
        num, den = _group_sums_numpy(w, wh, g_idx, ng, by_index)
    hs = None if heads is None or w.ndim != 2 else _head_part(w, wh, num, den, g_idx, ng, heads, r0)
    # (no weight in the group: inf for any error, 0 for none, NaN stays NaN)
    return rel_error(num, den), by_index, block, hs


def _head_part(w, wh, num, den, g_idx, ng: int, heads: HeadLayout, r0: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-head sums of rows [r0, r0 + len(w)) of a 2-D layer, from its group sums where they
    hold them (heads of rows: each row's groups; heads of columns made of whole groups), else
    from one more pass over the rows (a group that spans two heads: o_proj's 64-wide heads in
    groups of 128, or act-order's scattered columns)."""
    n = heads.n
    if heads.axis == "rows":
        return head_sums(num.sum(axis=-1), den.sum(axis=-1), heads.index()[r0:r0 + w.shape[0]], n)
    col = heads.index()
    pair = np.unique(g_idx * n + col)
    if np.unique(pair // n).size == pair.size:  # every group within one head
        of_group = np.zeros(ng, np.int64)
        of_group[pair // n] = pair % n
        return head_sums(num.sum(axis=0), den.sum(axis=0), of_group, n)
    if fast.AVAILABLE and w.dtype in (np.float32, np.float64) and wh.dtype in (np.float32, np.float64):
        hn, hd = histo.group_sums(w, wh, col, n)
    else:
        hn, hd = _group_sums_numpy(w, wh, col, n, False)
    return hn.sum(axis=0), hd.sum(axis=0)


def _group_sums_numpy(w, wh, g_idx, ng: int, by_index: bool):
    d2 = np.square(wh.astype(np.float64) - w.astype(np.float64))
    w2 = np.square(w.astype(np.float64))
    num = np.zeros(d2.shape[:-1] + (ng,))
    den = np.zeros_like(num)
    if w.shape[-1]:
        order = np.argsort(g_idx, kind="stable") if by_index else None
        counts = np.bincount(g_idx, minlength=ng)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        used = counts > 0  # a group no column names stays 0
        for src, dst in ((d2, num), (w2, den)):
            dst[..., used] = np.add.reduceat(src if order is None else src[..., order], starts[used], axis=-1)
    return num, den


def layer_detail(reference: Model, variants: dict[str, Model], name: str, *, bins: int = 256, engine="auto",
                 cancel=None) -> LayerDetail:
    """Histograms, code usage, scales and group error of one reference layer for every variant.

    Parameters
    ----------
    reference, variants
        As for :func:`sweep`.
    name
        The reference module path.
    bins
        Number of histogram bins (shared by the reference and all variants).
    engine, cancel
        As for :func:`sweep`.

    Returns
    -------
    LayerDetail
        Variants that do not cover ``name`` are left out of every dict.
    """
    eng = _resolve_engine(engine)
    ref_layer = reference.layers.get(name)
    if ref_layer is None and name != "lm_head" and not EXPERT_RE.match(name):
        reference.layer(name)  # raises: no such layer (an expert or a tied head: from a variant's target)
    states = []
    left_out: dict[str, str] = {}
    for label, vm in variants.items():
        # a layer the variant keeps unquantized is shown too (the user may have picked it there)
        # (a stack selected whole is aligned whole, its smoothing undone once for all its experts,
        # as one target; an expert of it, as the sweep measures it)
        al = align(reference, vm, label=label, keep_unquantized=True, split_stacks=ref_layer is None)
        if name not in al.targets:
            # an expert of a stacked reference in a variant that stacks them too (its slice), or a
            # stack of the reference in a variant that stores its experts one by one (all of them)
            t = (_expert_of_stack_target(al, name, reference) if ref_layer is None
                 else _stack_of_experts_target(al, name, reference))
            if t is not None:
                al.targets[name] = t
        if name in al.targets:
            states.append(_VariantState(label, vm, al))
        else:
            left_out[label] = next((u.reason for u in al.unmatched if u.layer == name), "absent in the variant")
    _check_cancel(cancel)
    if ref_layer is None:
        if not states:
            raise CompareError("no variant covers this layer", file=reference.ckpt.source, tensor=name)
        t0 = states[0].alignment.targets[name]
        ref_rows = _reference_rows(reference, t0, eng, keep=True)
        if isinstance(ref_rows, _Rows) and t0.rows * t0.cols > BLOCK_ELEMENTS:
            # a tied lm_head: the embeddings' rows, read in blocks too (Llama-3.2-3B's: 394M weights)
            ref_rows = _Rows(reference, ref_rows.layer, eng, keep=False, counter={})
            return _layer_detail_in_blocks(reference, states, name, ref_rows, bins, eng, cancel, left_out)
    else:
        streamed = ref_layer.numel > BLOCK_ELEMENTS and ref_layer.is_matrix
        ref_rows = _Rows(reference, ref_layer, eng, keep=not streamed, counter={})
        if streamed:  # (a 70B model's 235M-weight layer: four float32 copies were 3.8 GB)
            return _layer_detail_in_blocks(reference, states, name, ref_rows, bins, eng, cancel, left_out)
    w = ref_rows.full()
    wh_of: dict[str, np.ndarray] = {}
    plain_of: dict = {}
    metrics: dict[str, LayerMetrics] = {}
    for vs in list(states):  # noqa: PERF101  (a copy: _decode_refused removes from states)
        _check_cancel(cancel)
        t = vs.alignment.targets[name]
        try:
            row, block_of, plain_of[vs.label] = _detail_metrics(reference, vs, name, ref_rows, eng, cancel, keep=True)
            wh_of[vs.label] = block_of(0, t.rows)
        except LayerError as exc:  # this variant's decoder refuses it: the others are still shown
            _decode_refused(exc, vs, states, left_out)
            continue
        metrics[vs.label] = row
    # values counted from their codes where a kernel allows (the same counts): a variant's per
    # group, a bf16 or fp16 reference's per bit pattern
    coded = {vs.label: gv for vs in states if (gv := _group_values(vs, plain_of[vs.label])) is not None}
    ref_values = _pattern_values(ref_rows)
    value_edges, value_counts, value_view = bulk_histograms(
        {"reference": w if ref_values is None else ref_values, **wh_of, **coded}, bins)
    # the errors in float64, element by element, never stored whole (Diff)
    errs, zero_errors = {}, {}
    for k, a in wh_of.items():
        errs[k], n_zero = diff_of(a, w)
        if n_zero:
            zero_errors[k] = n_zero
    # a variant that stores the layer as the reference does (left unquantized: lm_head, norms)
    # has one bin of every weight at 0: drawn, its spike set the count axis and its one-bin
    # step hid behind the others' curves; it is said instead
    copies = [k for k, e in errs.items() if e.size and zero_errors.get(k) == e.size]
    for k in copies:
        del errs[k], zero_errors[k]
    error_edges, error_counts, error_view = bulk_histograms(errs, bins)
    log_edges, log_counts, log_view = bulk_histograms({k: LogAbsDiff(*e) for k, e in errs.items()}, bins)
    del errs
    code_counts, scales, zeros, group_error = {}, {}, {}, {}
    grouped_by_index: set[str] = set()
    column_blocks: dict[str, int] = {}
    float_codes: dict[str, tuple[float, float]] = {}
    heads = _heads_of(reference, ref_layer)
    head_error = {}
    for vs in states:
        _check_cancel(cancel)
        t = vs.alignment.targets[name]
        vl = vs.model.layers[t.var_layers[0]]
        _stored(vs.label, vs.model, t.var_layers, code_counts, scales, zeros, t.segments, float_codes,
                coded.get(vs.label))
        group_error[vs.label], by_index, block, hs = _group_errors(w, wh_of[vs.label], vl, vs.model, heads)
        if hs is not None:
            head_error[vs.label] = rel_error(*hs)
        if by_index:
            grouped_by_index.add(vs.label)
        if block:  # (the map's cells are blocks of columns, not the layer's groups: said on its axis)
            column_blocks[vs.label] = block
    return LayerDetail(name, value_edges, value_counts, error_edges, error_counts, code_counts, scales, zeros,
                       group_error, metrics, value_view, error_view,
                       nonfinite_counts({"reference": w, **wh_of}, value_counts), left_out, grouped_by_index,
                       log_edges, log_counts, log_view, zero_errors, copies, column_blocks, float_codes,
                       heads, head_error)


def _heads_of(reference: Model, layer: Layer | None) -> HeadLayout | None:
    """The attention heads of a reference layer (from its config.json), or None."""
    if layer is None or not layer.is_matrix:
        return None
    return head_layout(reference.ckpt.configs.get("config.json"), layer.path, layer.shape)


@dataclass
class HeadRow:
    """One variant's per-head error of one reference attention layer (:func:`head_sweep`)."""

    name: str
    variant: str
    heads: list[str]            # the heads' names (q0, q1, …, h0, …)
    rel_fro: list[float]        # ‖Ŵ_h − W_h‖F / ‖W_h‖F per head, its smoothing undone as the sweep's
    layer_rel_fro: float        # the layer's own, as the sweep measures it
    axis: str                   # "rows" (q/k/v) or "columns" (o_proj)
    source: str                 # the config keys the split took
    group: int = 0              # query heads per key/value head (GQA's q_proj), else 0

    def to_json(self) -> dict:
        """As a layer row: an inf or NaN figure null, and named in ``nonfinite`` ("inf" / "nan")."""
        heads = dict(zip(self.heads, map(float, self.rel_fro)))
        out = {"name": self.name, "variant": self.variant, "axis": self.axis, "source": self.source,
               "group": self.group, "layer_rel_fro": _json_safe(float(self.layer_rel_fro)),
               "heads": {h: _json_safe(v) for h, v in heads.items()}}
        odd = _nonfinite({**heads, "layer_rel_fro": float(self.layer_rel_fro)})
        if odd:
            out["nonfinite"] = odd
        return out


#: The columns of :func:`heads_to_csv`: one line per (layer, variant, head).
HEAD_CSV_KEYS = ("name", "variant", "head", "index", "axis", "rel_fro", "ratio", "layer_rel_fro", "source")
#: How a per-head CSV begins (a layer CSV begins with ``name,`` too): what compare tells them by.
HEAD_CSV_START = ",".join(HEAD_CSV_KEYS[:3]).encode() + b","


def heads_to_csv(rows: list[HeadRow], path) -> None:
    """One line per head of each :class:`HeadRow`: its error, that over its layer's (``ratio``),
    the layer's; NaN and inf written as such (``nan``, ``inf``), never empty. ``path``: a file
    name (written atomically), or an open text stream (stdout)."""
    def write(fh) -> None:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(HEAD_CSV_KEYS)
        for r in rows:
            whole = float(r.layer_rel_fro)
            ratios = head_ratio(r.rel_fro, whole)  # (as the window's: NaN where the layer's is NaN, inf or 0)
            for i, (h, e) in enumerate(zip(r.heads, r.rel_fro)):
                w.writerow(_csv_cells([r.name, r.variant, h, i, r.axis, repr(float(e)), repr(float(ratios[i])),
                                       repr(whole), r.source]))
    _csv_to(path, write)


def head_sweep(reference: Model, variants: dict[str, Model], *, engine="auto", layers: str | None = None,
               cancel=None, progress=None) -> list[HeadRow]:
    """The per-head error of every attention layer of the reference (its heads from config.json:
    :func:`~.heads.head_layout`) that ``layers`` (a regular expression searched in the name, as
    :func:`sweep`'s) selects, for every variant covering it: each variant's rows as the window's
    views show them (smoothing and folded multipliers undone, as the sweep measures), summed per
    head in float64. ``progress(fraction)``; ``cancel`` as for :func:`sweep`."""
    eng = _resolve_engine(engine)
    rx = re.compile(layers) if layers is not None else None
    names = {n: h for n, lay in reference.layers.items()
             if (rx is None or rx.search(n)) and (h := _heads_of(reference, lay)) is not None}
    states = {label: _VariantState(label, vm, align(reference, vm, label=label)) for label, vm in variants.items()}
    out: list[HeadRow] = []
    for i, name in enumerate(sorted(names, key=_order_key)):
        _check_cancel(cancel)
        lay, heads = reference.layers[name], names[name]
        # (the reference's rows read once for all variants where the layer is held whole; a
        # quantized reference is decoded once, not once per variant and block)
        ref_rows = _Rows(reference, lay, eng, keep=lay.numel <= BLOCK_ELEMENTS, counter={})
        R, K = ref_rows.rows, ref_rows.cols
        step = max(1, _VIEW_BLOCK_ELEMENTS // max(1, K))
        for label, vs in states.items():
            t = vs.alignment.targets.get(name)
            if t is None:
                continue
            try:
                row, block_of, _ = _detail_metrics(reference, vs, name, ref_rows, eng, cancel, keep=False)
                vl = vs.model.layers[t.var_layers[0]]
                num = den = 0.0
                for r0 in range(0, R, step):
                    _check_cancel(cancel)
                    r1 = min(R, r0 + step)
                    _, _, _, hs = _group_errors(ref_rows.get(r0, r1), block_of(r0, r1), vl, vs.model, heads, r0)
                    num, den = num + hs[0], den + hs[1]
            except LayerError:
                continue  # (the sweep lists a layer that cannot be decoded)
            out.append(HeadRow(name, label, heads.labels(), [float(x) for x in rel_error(num, den)], row.rel_fro,
                               heads.axis, heads.source, heads.group))
        if progress is not None:
            progress((i + 1) / len(names))
    return out


def _decode_refused(exc: LayerError, vs: _VariantState, states: list, left_out: dict[str, str]) -> None:
    """A variant whose decoder refuses the layer is left out (said); the reference's refusal is raised."""
    if exc.file is not None and exc.file != vs.model.ckpt.source:
        raise exc  # the reference's
    left_out[vs.label] = f"cannot be decoded: {exc.message}"
    states.remove(vs)


def _detail_metrics(reference: Model, vs: _VariantState, name: str, ref_rows, eng, cancel, keep: bool):
    """(the sweep's row of target ``name`` for one variant, ``block(r0, r1)``: the variant's rows
    matching reference rows [r0, r1) as the views show them, float32, its smoothing undone,
    :func:`_plain_rows` where those are a run of one layer's own rows with nothing undone).
    ``keep``: whole layers decoded once and kept; else decoded by row blocks on each call."""
    t = vs.alignment.targets[name]
    counter: dict = {}

    def held(layer: Layer) -> bool:
        # (a layer not read in row blocks is decoded whole on every call: kept, whatever ``keep``)
        return keep or layer.numel <= BLOCK_ELEMENTS

    # v_proj/o_proj smoothing needs the preceding layer's fit: measure it first.
    if t.col_fit_from is not None:
        pt = vs.alignment.targets[t.col_fit_from]
        pref = _reference_rows(reference, pt, eng, keep=held(reference.layers[pt.ref_layer]))
        fit_rows: dict = {}
        _measure_target(pt.name, pref, [vs], [vs], lambda v, p: fit_rows.setdefault(
            p, _Rows(v.model, v.model.layers[p], eng, held(v.model.layers[p]), counter)), cancel, lambda k: None,
            engine=eng)
    cache_rows: dict = {}

    def rows_of(v, p):
        return cache_rows.setdefault(p, _Rows(v.model, v.model.layers[p], eng, held(v.model.layers[p]), counter))
    # (the one-pass path where the layout allows, as the sweep measures: the same figures)
    res = _measure_target(name, ref_rows, [vs], [vs], rows_of, cancel, lambda k: None, engine=eng)
    row = _row(t, vs, res[vs.label])
    col, _ = _smoothing_for(vs, t)
    col = None if col is None else col[None, :].astype(np.float32)
    rs = vs.row_scales[t.row_fit_for].astype(np.float32) if (t.row_fit_for is not None
                                                              and "rows:" in row.smoothing) else None

    def block(r0: int, r1: int) -> np.ndarray:
        wh = _assemble(t, lambda p: rows_of(vs, p), r0, r1)
        if col is not None:
            wh = wh / col
        wh = _unfold(t, wh, r0, r1)
        if rs is not None:
            wh = wh * rs[r0:r1, None]
        return wh
    # (values counted from the codes only where the views show the layer's rows as decoded)
    changed = col is not None or rs is not None or t.fold_rows is not None
    return row, block, None if changed else _plain_rows(t)


def _plain_rows(t: Target) -> tuple[str, int, int] | None:
    """(variant layer, first row, end row) where target ``t``'s rows are one run of one variant
    layer's own rows, else None (assembled from several, interleaved, reversed)."""
    if len(t.segments) != 1:
        return None
    s = t.segments[0]
    if s.ref_rows != (0, t.rows, 1) or s.var_rows[2] != 1:
        return None
    return s.var_layer, s.var_rows[0], s.var_rows[0] + t.rows


def _group_values(vs: _VariantState, plain: tuple[str, int, int] | None) -> GroupValues | None:
    """The variant's values as its layer's code counts per group (exact histograms from the
    packed codes, without the decoded layer: :mod:`.formats.codehist`), where the views show a
    run of that layer's own rows (``plain``, from :func:`_detail_metrics`) and its scheme has
    such a kernel; else None."""
    if plain is None:
        return None
    layer = vs.model.layers[plain[0]]
    return group_values(vs.model, layer, plain[1], plain[2])


def _pattern_values(ref_rows: _Rows | _RowView) -> PatternValues | None:
    """The reference rows' values as counts of their 16-bit patterns, where it stores them as bf16
    or fp16 (:class:`~.formats.codehist.PatternValues`: two bytes read per weight, no range
    pass); else None."""
    stored = ref_rows.stored(0, ref_rows.rows)
    return None if stored is None else pattern_values(stored)


def _layer_detail_in_blocks(reference: Model, states: list, name: str, ref_rows: _Rows, bins: int, eng, cancel,
                            left_out: dict[str, str]) -> LayerDetail:
    """:func:`layer_detail` of a layer too large to hold decoded (over :data:`BLOCK_ELEMENTS`):
    the same figures, read in row blocks twice, so that memory stays a few blocks whatever the
    layer's size. The first pass takes the ranges (of the values, of the errors and of their
    magnitudes), exact zeros and the group error map; the histograms' fine edges follow from the
    ranges, and the second pass counts on them (:func:`~.metrics.bulk_from_counts` then finds the
    bulk and merges the bins exactly as for a layer held whole)."""
    from .metrics import (
        FINE_BINS,
        Diff,
        _finite_range,
        bulk_from_counts,
        histogram_counts,
        uniform_edges,
    )
    R, K = ref_rows.rows, ref_rows.cols
    metrics: dict[str, LayerMetrics] = {}
    block_of: dict = {}
    plain_of: dict = {}
    for vs in list(states):
        _check_cancel(cancel)
        try:
            metrics[vs.label], block_of[vs.label], plain_of[vs.label] = _detail_metrics(
                reference, vs, name, ref_rows, eng, cancel, keep=False)
        except LayerError as exc:
            _decode_refused(exc, vs, states, left_out)
    step = max(1, _VIEW_BLOCK_ELEMENTS // max(1, K))
    spans = [(r0, min(R, r0 + step)) for r0 in range(0, R, step)]
    # a decoder that refuses the layer does so on its first block: that variant is left out (the
    # blocks decoded here are the first pass's first)
    first: dict[str, np.ndarray] = {}
    for vs in list(states):
        try:
            if spans:
                first[vs.label] = block_of[vs.label](*spans[0])
        except LayerError as exc:
            _decode_refused(exc, vs, states, left_out)
            metrics.pop(vs.label, None)
    labels = [vs.label for vs in states]

    release = _rows_releaser(reference, ref_rows)

    def blocks():
        for r0, r1 in spans:
            _check_cancel(cancel)
            w = ref_rows.get(r0, r1)
            whs = {lb: first.pop(lb) if lb in first else block_of[lb](r0, r1) for lb in labels}
            yield r0, r1, w, whs
            if release is not None:  # (its mapped pages: the reference's layer alone is 470 MB)
                release(r0, r1)

    # pass 1: ranges (as bulk_histograms takes them, compiled or numpy), zeros, the group error map
    inf = math.inf
    vrange = {k: [inf, -inf] for k in ["reference", *labels]}
    drange = {lb: [inf, -inf, 0] for lb in labels}  # min, max, exact zeros
    lrange = {lb: [inf, -inf] for lb in labels}  # of log10 |d| (nonzero)
    gmaps: dict[str, list] = {lb: [] for lb in labels}
    grouped_by_index: set[str] = set()
    column_blocks: dict[str, int] = {}
    vl_of = {vs.label: vs.model.layers[vs.alignment.targets[name].var_layers[0]] for vs in states}
    model_of = {vs.label: vs.model for vs in states}
    heads = _heads_of(reference, reference.layers.get(name))
    hsums: dict[str, list] = {}  # per variant, per head (Σ (Ŵ − W)², Σ W²), summed over the blocks

    def widen(r, lo, hi):
        r[0], r[1] = min(r[0], lo), max(r[1], hi)

    # the values of a variant whose kernel counts them from its codes: its range and counts at once
    coded = {vs.label: gv for vs in states if (gv := _group_values(vs, plain_of[vs.label])) is not None}
    if (ref_values := _pattern_values(ref_rows)) is not None:
        coded["reference"] = ref_values  # (the same: counts of 16-bit patterns)
    for k, gv in coded.items():
        widen(vrange[k], *gv.finite_range())
    for r0, _, w, whs in blocks():
        for k, a in (("reference", w), *whs.items()):
            if k not in coded:
                widen(vrange[k], *_finite_range(a.reshape(-1))[:2])
        for lb, wh in whs.items():
            d, zeros = diff_of(wh, w)
            widen(drange[lb], *_finite_range(d)[:2])
            drange[lb][2] += zeros
            widen(lrange[lb], *_finite_range(LogAbsDiff(*d))[:2])
            g, by_index, blk, hs = _group_errors(w, wh, vl_of[lb], model_of[lb], heads, r0)
            gmaps[lb].append(g)
            if hs is not None:
                acc = hsums.setdefault(lb, [0.0, 0.0])
                acc[0], acc[1] = acc[0] + hs[0], acc[1] + hs[1]
            if by_index:
                grouped_by_index.add(lb)
            if blk:
                column_blocks[lb] = blk
    n = R * K
    copies = [lb for lb in labels if n and drange[lb][2] == n]  # (see layer_detail)
    zero_errors = {lb: r[2] for lb, r in drange.items() if r[2] and lb not in copies}
    err_labels = [lb for lb in labels if lb not in copies]

    def edges_of(rngs):
        lo = min((r[0] for r in rngs), default=inf)
        hi = max((r[1] for r in rngs), default=-inf)
        return (None, (lo, hi)) if lo > hi else (uniform_edges(lo, hi, FINE_BINS), (lo, hi))
    ve, vspan = edges_of(list(vrange.values()))
    ee, espan = edges_of([drange[lb] for lb in err_labels])
    le, lspan = edges_of([lrange[lb] for lb in err_labels])
    # pass 2: exact counts on the fine edges
    vc = {k: np.zeros(FINE_BINS, np.int64) for k in vrange}
    ec = {lb: np.zeros(FINE_BINS, np.int64) for lb in err_labels}
    lc = {lb: np.zeros(FINE_BINS, np.int64) for lb in err_labels}
    if ve is not None:
        for k, gv in coded.items():
            vc[k] = gv.histogram(ve)
    for _, _, w, whs in blocks():
        if ve is not None:
            for k, a in (("reference", w), *whs.items()):
                if k not in coded:
                    vc[k] += histogram_counts(a, ve)
        for lb in err_labels:
            if ee is not None:
                ec[lb] += histogram_counts(Diff(whs[lb], w), ee)
            if le is not None:
                lc[lb] += histogram_counts(LogAbsDiff(whs[lb], w), le)

    def bulk(edges, counts, span):
        return (None, {}, None) if edges is None or not counts else bulk_from_counts(edges, counts, span, bins)
    value_edges, value_counts, value_view = bulk(ve, vc, vspan)
    error_edges, error_counts, error_view = bulk(ee, ec, espan)
    log_edges, log_counts, log_view = bulk(le, lc, lspan)
    code_counts, scales, zeros, float_codes = {}, {}, {}, {}
    group_error = {}
    for vs in states:
        t = vs.alignment.targets[name]
        _stored(vs.label, vs.model, t.var_layers, code_counts, scales, zeros, t.segments, float_codes,
                coded.get(vs.label))
        group_error[vs.label] = np.concatenate(gmaps[vs.label], axis=-2)
    return LayerDetail(name, value_edges, value_counts, error_edges, error_counts, code_counts, scales, zeros,
                       group_error, metrics, value_view, error_view,
                       nonfinite_counts(dict.fromkeys(["reference", *labels], n), value_counts),
                       left_out, grouped_by_index, log_edges, log_counts, log_view, zero_errors, copies,
                       column_blocks, float_codes, heads,
                       {lb: rel_error(*acc) for lb, acc in hsums.items() if lb in group_error})


def nonfinite_counts(values: dict[str, np.ndarray | int], counts: dict[str, np.ndarray]) -> dict[str, int]:
    """Per key with any, how many values are NaN or inf: every finite value lies within the
    histogram's edges, so what its counts miss is (no counts at all: no finite value anywhere).
    ``values``: the arrays, or their sizes (a layer read in blocks is never held)."""
    size = {k: a if isinstance(a, int) else a.size for k, a in values.items()}
    out = {k: n - int(counts[k].sum()) if k in counts else n for k, n in size.items()}
    return {k: n for k, n in out.items() if n}


_FP4_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
_FP8_VALUES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


def float_code_order(layer: Layer) -> tuple[np.ndarray, tuple[float, float]] | None:
    """(the raw codes of a float-coded layer in the order of their values, NaN codes left out;
    the least and largest value) for FP4 (MXFP4, NVFP4) and FP8 codes; None for integer codes."""
    if layer.scheme in ("mlx-mxfp4", "mlx-nvfp4", "ct-nvfp4", "ct-mxfp4", "modelopt-nvfp4", "gptoss-mxfp4"):
        vals = _FP4_VALUES
    elif layer.scheme == "mlx-mxfp8":
        vals = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    elif layer.scheme in ("ct-fp8", "fp8-block") and layer.tensors.get("weight") is not None \
            and layer.tensors["weight"].dtype in _FP8_VALUES:
        vals = np.arange(256, dtype=np.uint8).view(_FP8_VALUES[layer.tensors["weight"].dtype]).astype(np.float64)
    else:
        return None
    keep = np.flatnonzero(np.isfinite(vals))
    order = keep[np.lexsort((~np.signbit(vals[keep]), vals[keep]))]  # by value, -0 before +0
    return order, (float(vals[order[0]]), float(vals[order[-1]]))


def _level_counts(codes: np.ndarray, levels: int) -> np.ndarray:
    """How often each of ``levels`` code values occurs in ``codes`` (compiled for 8-bit codes)."""
    if fast.AVAILABLE and codes.dtype == np.uint8:
        return histo.level_counts(codes, levels)
    return np.bincount(codes.reshape(-1), minlength=levels)[:levels]


def _stored(label: str, model: Model, paths: list[str], code_counts: dict, scales: dict, zeros: dict,
            segments: list[Segment] | None = None, float_codes: dict | None = None,
            coded: GroupValues | None = None) -> None:
    """Add what ``model`` stores for the layers ``paths`` (one target's) under ``label``: the
    exact count of each code level, and the scales and zero points of the first. ``segments``
    (the target's): only the rows the target compares — one expert of a switch_mlp stack, q's
    rows of a fused qkv_proj — not the whole stored tensor. ``coded``: those rows' codes already
    counted per group (:func:`_group_values`), whose sum the level counts are where the packed
    bytes cannot be counted whole."""
    rows = {}
    for sg in segments or []:
        rows.setdefault(sg.var_layer, []).append(np.arange(*sg.var_rows))
    pick = {p: np.concatenate(r) for p, r in rows.items()}
    vl = model.layers[paths[0]]
    order = float_code_order(vl)
    if order is not None and vl.scheme in ("ct-fp8", "fp8-block"):
        # FP8 weights are their own codes: 256 of them (saturation at ±max, subnormals, dead codes)
        code_counts[label] = sum(_level_counts(
            np.ascontiguousarray(_take_rows(np.asarray(model.ckpt.tensor(model.layers[p].tensors["weight"].name)),
                                            pick.get(p), model.layers[p])).reshape(-1).view(np.uint8), 256)
            for p in paths)
    elif vl.quantized and vl.bits and vl.bits <= 8:
        packed = [packed_level_counts(model, model.layers[p], pick.get(p)) for p in paths]
        if all(c is not None for c in packed):  # (whole layers: a byte histogram, the fastest)
            code_counts[label] = sum(packed)
        elif coded is not None:  # (a run of rows, an expert's: 8-16 ms for 58.7M weights, no unpacking)
            code_counts[label] = coded.counts.sum(0, dtype=np.int64)
        else:
            codes = [_take_rows(stored_codes(model, model.layers[p]), pick.get(p), model.layers[p]) for p in paths]
            if all(c is not None for c in codes):
                code_counts[label] = sum(_level_counts(c, 2 ** vl.bits) for c in codes)
    if label in code_counts and order is not None and len(code_counts[label]) > order[0].max():
        # float codes in the order of their values (raw, +6 sat beside -0 and the extremes read
        # 0 and 15); the NaN codes left out
        code_counts[label] = code_counts[label][order[0]]
        if float_codes is not None:
            float_codes[label] = order[1]
    # (each part's: gate_proj and up_proj of a stack that the reference keeps fused)
    got = [(_scales_zeros(model, model.layers[p]), p) for p in paths]
    if all(sz[0] is not None for sz, _ in got):
        taken = [[None if a is None else _take_rows(a, pick.get(p), model.layers[p], per_group=True) for a in sz]
                 for sz, p in got]
        for out, i in ((scales, 0), (zeros, 1)):
            parts = [t[i] for t in taken]
            out[label] = parts[0] if len(parts) == 1 or parts[0] is None else \
                np.concatenate([np.asarray(a).ravel() for a in parts])


def _take_rows(a: np.ndarray | None, rows: np.ndarray | None, layer: Layer, per_group: bool = False):
    """The output rows ``rows`` (of the flattened ``[R, K]`` weight) of a layer's codes
    (``[..., N, K]``) or, with ``per_group``, of its scales or zero points: ``[G, N]`` for GPTQ
    and AWQ GEMM (a column per output row), ``[..., N, G]`` otherwise (AWQ GEMV's included).
    Unchanged when ``rows`` is None or covers every row, or when the array's layout is not one
    of these."""
    if a is None or rows is None:
        return a
    n_rows = int(np.prod(layer.shape[:-1])) if layer.shape else 0
    if rows.size == n_rows and np.array_equal(rows, np.arange(n_rows)):
        return a
    if per_group and layer.scheme in ("gptq", "awq-gemm"):
        return a[:, rows] if a.ndim == 2 and a.shape[1] == n_rows else a
    flat = a.reshape(-1, a.shape[-1]) if a.ndim >= 2 else a
    return flat[rows] if flat.ndim == 2 and flat.shape[0] == n_rows else a


def layer_alone(models: dict[str, Model], name: str, *, bins: int = 256, engine="auto", cancel=None) -> LayerDetail:
    """What the views can show of layer ``name`` without a reference: each model's decoded values
    on shared bin edges, its code usage, scales and zero points (no error, no metrics).

    Models without the layer, or whose layer is not a decodable matrix, are left out; a
    :class:`CompareError` when none is left."""
    eng = _resolve_engine(engine)
    values: dict[str, np.ndarray] = {}
    code_counts, scales, zeros = {}, {}, {}
    float_codes: dict[str, tuple[float, float]] = {}
    left_out: dict[str, str] = {}
    for label, m in models.items():
        _check_cancel(cancel)
        lay, seg = m.layers.get(name), None
        if lay is None:  # an expert of a stack this model holds: that expert's rows of it
            try:
                held = stacked_expert(name, m)
            except LayerError as exc:
                left_out[label] = exc.message
                continue
            if held is None:
                continue
            lay, e = held
            n = lay.shape[-2]
            seg = Segment((0, n, 1), lay.path, (e * n, (e + 1) * n, 1))
        if not lay.decodable:
            left_out[label] = f"cannot be decoded: {lay.problem or 'not decodable'}"
            continue
        if not lay.is_matrix:
            continue
        try:
            rows = _Rows(m, lay, eng, keep=False, counter={})
            values[label] = rows.full() if seg is None else rows.get(seg.var_rows[0], seg.var_rows[1])
            _stored(label, m, [lay.path], code_counts, scales, zeros, segments=None if seg is None else [seg],
                    float_codes=float_codes)
        except LayerError as exc:
            left_out[label] = f"cannot be decoded: {exc.message}"
    if not values:
        raise CompareError("no open checkpoint holds this layer as a decodable matrix"
                           + "".join(f"; {k}: {why}" for k, why in left_out.items()), tensor=name)
    edges, counts, view = bulk_histograms(values, bins)
    return LayerDetail(name, edges, counts, None, {}, code_counts, scales, zeros, {}, {}, view, None,
                       nonfinite_counts(values, counts), left_out, float_codes=float_codes)


__all__ += ["error_metrics", "stored_codes", "load_cache", "save_cache", "layer_alone", "nonfinite_counts"]
