"""Error metrics of a decoded weight against a reference, streamed over blocks.

Everything is accumulated in float64 from float32 inputs (float64 ones, an F64 checkpoint's, are
taken as they are) so the figures agree with a direct float64 numpy computation to ~1e-12 relative; the |error| percentiles are exact order statistics
(numpy's default "linear" interpolation) found without sorting or holding the whole error:

1. pass one counts ``|Ŵ−W|`` per bucket of the top 16 bits of its float32 rounding (rounding is
   monotone, so buckets are ordered like the exact float64 values);
2. pass two gathers the exact float64 values of only the buckets that hold the wanted ranks.

Pass two needs the same blocks again; for a layer held in memory that is a second look at the
same arrays, for a layer decoded in row blocks it is a second decode.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np

from .formats import fast
from .formats.codehist import COUNTED
from .formats.kernel import map_pieces

#: Elements per inner chunk: float64 temporaries stay in the CPU cache.
CHUNK = 1 << 16
HIST_CHUNK = 1 << 21
PERCENTILES = (50.0, 95.0, 99.0)
_NKEYS = 1 << 15  # |d| as float32 has a clear sign bit: bits >> 16 < 2**15


def _keys(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype == b.dtype == np.float32:  # (their float64 difference is exact: rounded once either way)
        d32 = np.subtract(b, a, dtype=np.float32)
    else:  # float64 weights: the float64 difference, then rounded (casting first rounds twice)
        d32 = np.subtract(b, a, dtype=np.float64).astype(np.float32)
    np.abs(d32, out=d32)
    return d32.view(np.uint32) >> 16


def _flat(w: np.ndarray, wh: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Both arrays 1-D and contiguous, in float32, or in float64 where either is float64 (an F64
    checkpoint: rounded to float32, a float32 copy of it measured exactly 0); whether float32
    (the compiled passes take float32 only; float64 takes numpy's)."""
    wide = np.asarray(w).dtype == np.float64 or np.asarray(wh).dtype == np.float64
    dt = np.float64 if wide else np.float32
    return (np.ascontiguousarray(w, dtype=dt).reshape(-1), np.ascontiguousarray(wh, dtype=dt).reshape(-1),
            not wide)


#: Layers up to this many elements are measured by :meth:`ErrorStats.add_small`.
SMALL_ELEMENTS = 1 << 16


class ErrorStats:
    """Streaming accumulator of the error of ``Ŵ`` (variant) against ``W`` (reference).

    Call :meth:`add` for every block, then (for percentiles) :meth:`gather` for every block again
    in any order, then :meth:`result`. ``raw_only`` accumulators keep just ‖d‖² and ‖W‖².
    """

    def __init__(self, *, raw_only: bool = False) -> None:
        self.raw_only = raw_only
        self.n = 0
        self.sww = 0.0  # Σ W²
        self.sdd = 0.0  # Σ d², d = Ŵ − W
        self.swd = 0.0  # Σ W·d
        # Σ Ŵ² and Σ W·Ŵ taken directly (add, add_small); None where only the error sums are
        # known (fused.measure), which then leaves a layer whose cosine they cannot give to this
        # path (see cosine_cancels)
        self.svv: float | None = None
        self.swv: float | None = None
        self.max_abs = 0.0
        self.nzero = 0  # elements with d == 0 exactly: the lowest ranks, never gathered
        # bucket counts of |d| (2^15 int64: 256 KB), made by the first add(); add_small needs none
        self.counts: np.ndarray | None = None
        self._plan = None
        self._found: dict[int, list[np.ndarray]] = {}
        #: Set by a caller that found the percentiles another way (:mod:`.fused`).
        self.exact_percentiles: dict[float, float] | None = None

    # -- pass one ---------------------------------------------------------------------------
    def add(self, w: np.ndarray, wh: np.ndarray) -> None:
        """Accumulate one block (arrays of the same shape: float32, or float64 where either is).

        Large blocks are cut into pieces summed on the decode thread pool (numpy releases the
        GIL in these loops); float64 partial sums keep the ~1e-12 agreement.
        """
        a1, b1, f32 = _flat(w, wh)
        n = a1.size
        self.n += n
        raw = self.raw_only

        def piece(i0: int, i1: int):
            counts = None if raw else np.zeros(_NKEYS, np.int64)
            compiled = fast.error_stats(a1[i0:i1], b1[i0:i1], counts) if f32 else None
            if compiled is not None:  # one pass, same sums (float64) and buckets
                sdd, sww, swd, mx, nz, svv, swv = compiled
                return sdd, sww, swd, mx, nz, counts, svv, swv
            with np.errstate(invalid="ignore", over="ignore"):  # (inf - inf: NaN, as numpy's own figures)
                return numpy_piece(i0, i1)

        def numpy_piece(i0: int, i1: int):
            sdd = sww = swd = svv = swv = 0.0
            mx = 0.0
            nz = 0
            counts = None
            for i in range(i0, i1, CHUNK):
                a, b = a1[i:min(i1, i + CHUNK)], b1[i:min(i1, i + CHUNK)]
                d = np.subtract(b, a, dtype=np.float64)  # exact for float32 inputs (numpy's for float64)
                a64 = a.astype(np.float64)
                sdd += float(np.vdot(d, d))
                sww += float(np.vdot(a64, a64))
                if raw:
                    continue
                swd += float(np.vdot(a64, d))
                b64 = b.astype(np.float64)
                svv += float(np.vdot(b64, b64))
                swv += float(np.vdot(a64, b64))
                # exact zeros as the compiled pass counts them: d == 0 (inf - inf is NaN, not a
                # zero: counted as one, an inf shared by both sides was never gathered)
                nz += int(np.count_nonzero(d == 0.0))
                np.abs(d, out=d)
                m = float(d.max())
                if m > mx or m != m:
                    mx = m
            if not raw:
                keys = _keys(a1[i0:i1], b1[i0:i1])
                counts = np.bincount(keys, minlength=_NKEYS)
            return sdd, sww, swd, mx, nz, counts, svv, swv

        for sdd, sww, swd, mx, nz, counts, svv, swv in map_pieces(piece, n, HIST_CHUNK):
            self.sdd += sdd
            self.sww += sww
            self.swd += swd
            if not raw:
                self.svv = (self.svv or 0.0) + svv
                self.swv = (self.swv or 0.0) + swv
            if mx > self.max_abs or mx != mx:
                self.max_abs = mx
            if counts is not None:
                if self.counts is None:
                    self.counts = np.zeros(_NKEYS, np.int64)
                self.counts += counts
                self.nzero += nz

    def add_small(self, w: np.ndarray, wh: np.ndarray) -> None:
        """:meth:`add`, :meth:`plan` and :meth:`gather` at once for a whole small layer (at most
        :data:`SMALL_ELEMENTS`): the exact percentiles straight from all its float64 |error|
        values (:func:`order_statistics`). The bucket histogram costs a scan of 2^15 counts per layer, more than
        such a layer's own work; a 128-expert MoE has tens of thousands of them."""
        if self.n or self.raw_only:
            raise RuntimeError("add_small takes a whole layer, on a fresh full accumulator")
        a32, b32, f32 = _flat(w, wh)
        got = fast.small_stats(a32, b32) if f32 else None
        if got is not None:
            self.sdd, self.sww, self.swd, self.svv, self.swv, d = got
        else:
            a = a32.astype(np.float64)
            v = b32.astype(np.float64)
            d = v - a  # exact for two float32 values (a float64 fits their difference)
            self.sdd = float(np.vdot(d, d))
            self.sww = float(np.vdot(a, a))
            self.swd = float(np.vdot(a, d))
            self.svv = float(np.vdot(v, v))
            self.swv = float(np.vdot(a, v))
            np.abs(d, out=d)
        self.n = d.size
        self.max_abs = float(d.max()) if d.size else 0.0
        if not d.size:
            self.exact_percentiles = {p: math.nan for p in PERCENTILES}
            return
        ranks = self._ranks()
        got = order_statistics(d, [r for _, lo, hi, _ in ranks for r in (lo, hi)])
        self.exact_percentiles = {p: _lerp(float(got[2 * i]), float(got[2 * i + 1]), t)
                                  for i, (p, _, _, t) in enumerate(ranks)}

    # -- pass two ---------------------------------------------------------------------------
    def _ranks(self) -> tuple[tuple[float, int, int, float], ...]:
        return percentile_ranks(self.n)

    def plan(self) -> None:
        """After pass one: decide which buckets pass two must gather."""
        if self.counts is None:  # nothing added (an empty layer)
            self.counts = np.zeros(_NKEYS, np.int64)
        cum = np.cumsum(self.counts)
        need = set()
        for _, lo, hi, _ in self._ranks():
            for r in (lo, hi):
                if r >= self.nzero:  # ranks below nzero are exact zeros
                    need.add(int(np.searchsorted(cum, r, side="right")))
        lut = np.zeros(_NKEYS, bool)
        lut[list(need)] = True
        # Elements pass two can find, in all (zeros, all in bucket 0, are not gathered).
        bound = int(self.counts[list(need)].sum()) - (self.nzero if 0 in need else 0)
        self._plan = (lut, cum, bound)
        self._found = {k: [] for k in need}

    @property
    def needs_gather(self) -> bool:
        return not self.raw_only and self.n > 0

    def gather(self, w: np.ndarray, wh: np.ndarray) -> None:
        """Pass two over one block: keep the exact |error| of elements in the wanted buckets."""
        if self._plan is None:
            self.plan()
        lut, _, bound = self._plan
        a1, b1, f32 = _flat(w, wh)

        def piece(i0: int, i1: int):
            compiled = fast.gather(a1[i0:i1], b1[i0:i1], lut, bound) if f32 else None
            if compiled is not None:
                return compiled if compiled[0].size else None
            with np.errstate(invalid="ignore", over="ignore"):  # (inf - inf: NaN)
                k = _keys(a1[i0:i1], b1[i0:i1])
                # (the nonzero errors as pass one counts them: b - a != 0, an inf on both sides
                # included: its NaN error is not a zero)
                idx = np.flatnonzero(lut[k] & (np.subtract(b1[i0:i1], a1[i0:i1], dtype=np.float64) != 0.0))
                if not idx.size:
                    return None
                idx += i0
                vals = np.abs(b1[idx].astype(np.float64) - a1[idx].astype(np.float64))
            return vals, k[idx - i0]

        for found in map_pieces(piece, a1.size, HIST_CHUNK):
            if found is None:
                continue
            vals, kk = found
            for key, parts in self._found.items():  # at most six wanted buckets
                sel = vals[kk == key]
                if sel.size:
                    parts.append(sel)

    def percentiles(self) -> dict[float, float]:
        if self.exact_percentiles is not None:
            return dict(self.exact_percentiles)
        if self.n == 0:
            return {p: math.nan for p in PERCENTILES}
        if self._plan is None:
            raise RuntimeError("percentiles need gather() over every block first")
        cum = self._plan[1]
        sorted_found = {k: np.sort(np.concatenate(v)) if v else np.empty(0) for k, v in self._found.items()}

        def order_stat(r: int) -> float:
            if r < self.nzero:
                return 0.0
            key = int(np.searchsorted(cum, r, side="right"))
            # bucket 0 starts with the exact zeros, which were not gathered
            before = int(cum[key - 1]) if key else self.nzero
            return float(sorted_found[key][r - before])

        out = {}
        for p, lo, hi, t in self._ranks():
            a, b = order_stat(lo), order_stat(hi)
            out[p] = _lerp(a, b, t)
        return out

    # -- results ----------------------------------------------------------------------------
    @property
    def rel_fro(self) -> float:
        if self.sww == 0.0:
            return 0.0 if self.sdd == 0.0 else math.inf
        return math.sqrt(self.sdd / self.sww)

    def result(self) -> dict[str, float]:
        """``rel_fro, sqnr_db, cosine, max_abs, mse, p50, p95, p99`` as floats, and ``ref_finite``."""
        rel = self.rel_fro
        sqnr = sqnr_db(rel)
        if self.svv is not None:  # taken directly
            whwh, wwh = self.svv, self.swv
        else:
            whwh = self.sww + 2.0 * self.swd + self.sdd  # Σ Ŵ² = Σ (W + d)²
            wwh = self.sww + self.swd                    # Σ W·Ŵ
        denom = math.sqrt(self.sww) * math.sqrt(max(whwh, 0.0))
        # the rounding of the sums can put identical arrays a hair past 1 (1.0000000000000002)
        # (a NaN, as from an inf in the variant, stays NaN: clamped, it came out a perfect -1.0)
        cosine = wwh / denom if denom > 0 else math.nan
        if not math.isnan(cosine):
            cosine = min(1.0, max(-1.0, cosine))
        if self.sdd == 0.0 and self.sww > 0:  # identical: exactly 1, not 0.9999999999999999
            cosine = 1.0
        if math.isnan(self.sdd):  # a NaN error: its percentiles are NaN too, as numpy gives them
            pct = dict.fromkeys(PERCENTILES, math.nan)
        else:
            pct = self.percentiles()
        # ref_finite: whether the reference's own values are finite (ΣW² is): a NaN error is then
        # the variant's, else the reference's
        # norm_ratio: ‖Ŵ‖/‖W‖ (rel_fro and cosine leave two values of it where rel_fro < 1)
        norm_ratio = math.sqrt(max(whwh, 0.0) / self.sww) if self.sww > 0 else math.nan
        return {"rel_fro": rel, "sqnr_db": sqnr, "cosine": cosine, "max_abs": self.max_abs,
                "mse": self.sdd / self.n if self.n else math.nan,
                "p50": pct[50.0], "p95": pct[95.0], "p99": pct[99.0], "ref_finite": math.isfinite(self.sww),
                "norm_ratio": norm_ratio}


#: Where Σ Ŵ² or Σ W·Ŵ, made of the error sums, is below this share of the terms it is made of,
#: their rounding (~1e-16 of those terms each) reaches the 1e-9 the metrics promise: the sums
#: are taken directly instead (a variant whose Ŵ is small against W, or unrelated to it).
CANCEL_SHARE = 1e-3


def cosine_cancels(sww: float, swd: float, sdd: float) -> bool:
    """Whether the cosine derived from ``(ΣW², ΣW·d, Σd²)`` alone is not exact enough (see
    :data:`CANCEL_SHARE`); False for non-finite sums (NaN and inf come out as numpy's)."""
    if not all(math.isfinite(x) for x in (sww, swd, sdd)) or sww <= 0.0:
        return False
    return (sww + 2.0 * swd + sdd < CANCEL_SHARE * (sww + sdd)
            or abs(sww + swd) < CANCEL_SHARE * (sww + abs(swd)))


def worse(new: float, old: float | None) -> bool:
    """Whether error ``new`` replaces ``old`` (None: none yet) as the worst of several — the
    largest, and NaN above everything (a NaN error must never hide behind a finite one)."""
    return old is None or math.isnan(new) or (not math.isnan(old) and new > old)


def worst(xs, pick=max) -> float:
    """The worst of floats ``xs`` by ``pick`` (max for an error, min for an SQNR), NaN if any is:
    max/min would keep or drop a NaN by its position."""
    xs = [float(x) for x in xs]
    return math.nan if any(math.isnan(x) for x in xs) else pick(xs)


def sqnr_db(rel_fro: float) -> float:
    """−20·log10(rel_fro) as numpy gives it: inf for no error, −inf for an infinite one, NaN for NaN."""
    if rel_fro == 0.0:
        return math.inf
    if math.isfinite(rel_fro):
        return -20.0 * math.log10(rel_fro)
    return -math.inf if rel_fro > 0 else math.nan


@functools.lru_cache(maxsize=4096)  # a MoE sweep asks for the same few sizes tens of thousands of times
def percentile_ranks(n: int) -> tuple[tuple[float, int, int, float], ...]:
    """Per percentile of :data:`PERCENTILES` over ``n`` values: ``(p, lower rank, upper rank,
    weight of the upper)``, numpy's "linear" interpolation between two order statistics."""
    out = []
    for p in PERCENTILES:
        pos = p / 100.0 * (n - 1)
        lo = int(math.floor(pos))
        out.append((p, lo, min(lo + 1, n - 1), pos - lo))
    return tuple(out)


def order_statistics(vals: np.ndarray, pos) -> np.ndarray:
    """The ``pos``-th smallest (exact) of non-negative float64 ``vals``: by bucket selection
    (:func:`~.formats.fast.kth_values`), else (no numba, NaN/inf) a whole sort, numpy's
    vectorised one (3x faster than np.partition at six ranks), NaN last as in np.percentile."""
    got = fast.kth_values(vals, pos)
    return np.sort(vals)[np.asarray(pos, np.int64)] if got is None else got


def _lerp(a: float, b: float, t: float) -> float:
    # numpy's _lerp (used by np.percentile's "linear" method), for bit-for-bit agreement.
    d = b - a
    return b - d * (1.0 - t) if t >= 0.5 else a + d * t


def error_metrics(w: np.ndarray, wh: np.ndarray) -> dict[str, float]:
    """All metrics of ``wh`` against ``w`` for arrays in memory (both passes)."""
    st = ErrorStats()
    st.add(w, wh)
    st.plan()
    st.gather(w, wh)
    return st.result()


# -- histograms --------------------------------------------------------------------------------

def uniform_edges(lo: float, hi: float, bins: int) -> np.ndarray:
    """``bins + 1`` evenly spaced float64 edges covering [lo, hi] (widened if lo == hi)."""
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi <= lo:
        # numpy's ±0.5 (np.histogram), or a millionth of the value where 0.5 is below its
        # resolution: every weight 3e38 gave edges 3e38 to 3e38, and the view's histogram failed
        pad = max(0.5, abs(lo) * 1e-6)
        lo, hi = lo - pad, hi + pad
    return np.linspace(lo, hi, bins + 1)


class Diff(NamedTuple):
    """``a - b`` element by element in float64, for :func:`bulk_histograms` and
    :func:`histogram_counts`: never stored whole (a float64 copy of a 58M-weight layer is 470 MB)."""

    a: np.ndarray
    b: np.ndarray
    #: ``histo.finite_range(a, b)`` when already taken (:func:`diff_of`: one pass over both arrays)
    rng: tuple | None = None

    @property
    def size(self) -> int:
        return int(np.asarray(self.a).size)

    def values(self) -> np.ndarray:
        with np.errstate(invalid="ignore"):  # inf - inf: NaN, in no bin
            return np.asarray(self.a, np.float64) - np.asarray(self.b, np.float64)


class LogAbsDiff(Diff):
    """``log10 |a - b|`` of the nonzero finite differences (float64), as :class:`Diff`."""

    def values(self) -> np.ndarray:
        d = np.abs(super().values())
        with np.errstate(invalid="ignore"):
            return np.log10(d[(d > 0) & np.isfinite(d)])


def _compiled(x) -> bool:
    """Whether the compiled kernels take ``x`` (float arrays, :class:`Diff` of them)."""
    if not fast.AVAILABLE:
        return False
    arrs = (x.a, x.b) if isinstance(x, Diff) else (x,)
    return all(np.asarray(a).dtype in (np.float32, np.float64) for a in arrs)


def _finite_range(x) -> tuple[float, float, int]:
    """(min, max, number of finite values) of an array, a :class:`Diff`, a :class:`LogAbsDiff`
    or values held as counts (:data:`~.formats.codehist.COUNTED`) (min > max: none)."""
    if isinstance(x, COUNTED):
        lo, hi = x.finite_range()
        return lo, hi, int(lo <= hi)
    if _compiled(x):
        from .formats import histo
        if isinstance(x, LogAbsDiff):
            d_lo, d_hi, least, _ = x.rng or histo.finite_range(x.a, x.b)
            hi = max(abs(d_lo), abs(d_hi)) if d_lo <= d_hi else 0.0
            if not (least < math.inf and hi > 0):
                return math.inf, -math.inf, 0
            # log10 is monotone: the extremes of the logs are the logs of the extremes (numpy's)
            lo_hi = np.log10(np.array([least, hi]))
            return float(lo_hi[0]), float(lo_hi[1]), 1
        lo, hi, _, _ = (x.rng or histo.finite_range(x.a, x.b)) if isinstance(x, Diff) else histo.finite_range(x)
        return lo, hi, int(lo <= hi)
    a = x.values() if isinstance(x, Diff) else np.asarray(x).reshape(-1)
    f = a[np.isfinite(a)]
    return (float(f.min()), float(f.max()), int(f.size)) if f.size else (math.inf, -math.inf, 0)


def diff_of(a: np.ndarray, b: np.ndarray) -> tuple[Diff, int]:
    """(``Diff(a, b)`` with its range taken, how many of ``a - b`` are exactly 0), in one pass
    over both arrays where compiled."""
    x = Diff(a, b)
    if _compiled(x):
        from .formats import histo
        rng = histo.finite_range(a, b)
        return Diff(a, b, rng), rng[3]
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    with np.errstate(invalid="ignore"):
        return x, sum(int(np.count_nonzero(np.subtract(a[i:i + HIST_CHUNK], b[i:i + HIST_CHUNK], dtype=np.float64)
                                           == 0)) for i in range(0, a.size, HIST_CHUNK))


def histogram_counts(x, edges: np.ndarray) -> np.ndarray:
    """Exact counts of ``x`` (an array, a :class:`Diff`, a :class:`LogAbsDiff` or values held as
    counts, :data:`~.formats.codehist.COUNTED`) in uniform bins
    ``edges`` (last bin closed, like np.histogram).

    Bin indices are computed arithmetically and corrected at the edges so the result equals
    ``np.histogram(x, edges)`` exactly; values outside the edges (and NaN) are not counted. One
    compiled pass on all cores (:mod:`.formats.histo`); numpy chunk by chunk without numba.
    """
    if isinstance(x, COUNTED):
        return x.histogram(edges)
    if _compiled(x):
        from .formats import histo
        if isinstance(x, LogAbsDiff):
            return histo.log_abs_counts(x.a, x.b, edges)
        return histo.counts(x.a, edges, x.b) if isinstance(x, Diff) else histo.counts(x, edges)
    if isinstance(x, Diff):
        x = x.values()
    bins = len(edges) - 1
    lo, hi = float(edges[0]), float(edges[-1])
    scale = bins / (hi - lo)
    counts = np.zeros(bins, np.int64)
    flat = np.asarray(x).reshape(-1)
    step = 1 << 20
    for i in range(0, flat.size, step):
        c = flat[i:i + step].astype(np.float64)
        c = c[(c >= lo) & (c <= hi)]
        idx = ((c - lo) * scale).astype(np.int64)
        np.clip(idx, 0, bins - 1, out=idx)
        # Arithmetic can land one bin off next to an edge: compare with the edges themselves.
        idx -= c < edges[idx]
        idx += (c >= edges[np.minimum(idx + 1, bins)]) & (idx < bins - 1)
        counts += np.bincount(idx, minlength=bins)
    return counts


#: Fine bins a histogram is first counted in (:func:`bulk_histograms`), merged afterwards.
FINE_BINS = 16384
#: Most bins a merged histogram keeps (a plot of more costs paint time for nothing).
MAX_BINS = 4096
#: Fewest bins of a histogram of a small array (about sqrt(n) above that).
MIN_BINS = 16
#: Share of each array's values, at each end, that may lie outside the bulk (a view's default).
BULK_TAIL = 1e-5


#: A histogram is a comb (:func:`_combed`) where more than this share of its well-filled bins
#: dip under half their neighbours' mean: counting noise does that to 1-2% of bins of 20.
COMB_SHARE = 0.1


def _combed(c: np.ndarray) -> bool:
    """Whether histogram ``c`` swings from bin to bin where it is well filled: over
    :data:`COMB_SHARE` of its bins whose neighbours both hold 20 or more dip below half their mean
    (at least 8 such bins)."""
    c = np.asarray(c, np.float64)
    if c.size < 3 or c.sum() <= 0:
        return False
    # where the bulk of it is (5% to 95% of its mass): a sparse tail of a few distinct values,
    # the small errors on a log axis, is combed at any width
    cum = np.cumsum(c) / c.sum()
    i0, i1 = int(np.searchsorted(cum, 0.05)), int(np.searchsorted(cum, 0.95)) + 1
    c = c[i0:i1 + 1]
    if c.size < 3:
        return False
    left, mid, right = c[:-2], c[1:-1], c[2:]
    full = (left >= 20) & (right >= 20)
    n = int(full.sum())
    if n < 8:
        return False
    dips = int((full & (mid < 0.25 * (left + right))).sum())
    return dips > COMB_SHARE * n


def bulk_histograms(arrays: dict, bins: int = 256, fine: int = FINE_BINS, tail: float = BULK_TAIL):
    """Exact histograms of several arrays (or :class:`Diff` / :class:`LogAbsDiff` of two, or
    values held as counts, :data:`~.formats.codehist.COUNTED`) on shared uniform edges, fine
    enough where the values are: ``(edges, {key: counts}, view)``.

    A few outliers (a weight of 12 among weights within ±0.7; a damaged scale) set the range of
    min/max edges, and with a fixed number of bins everything else fell into a handful of them.
    Here the values are counted in ``fine`` bins over the whole range and each array's bulk is
    found: the bins left once at most ``tail`` of its values (at least ``min(8, n // 1000)``) are
    set aside at each end. The fine bins are then merged by a power of two so that the union of
    the bulks gets at least ``bins / 2`` bins where :data:`MAX_BINS` in all allow it (``bins`` in
    all when there are no outliers; fewer for an array of under ``bins**2`` values: about its
    square root, at least :data:`MIN_BINS`). ``view`` is the bulk's ``(lo, hi)`` on those edges,
    a tenth wider each side, or None when it spans at least half of the range (nothing to gain).
    Counts stay exact on the edges returned; NaN and ±inf are not counted. ``(None, {}, None)``
    when no array has a finite value.
    """
    arrays = {k: a if isinstance(a, (Diff, *COUNTED)) else np.asarray(a).reshape(-1) for k, a in arrays.items()
              if a is not None and a.size}
    lo, hi = math.inf, -math.inf
    for a in arrays.values():
        a_lo, a_hi, n = _finite_range(a)
        if n:
            lo, hi = min(lo, a_lo), max(hi, a_hi)
    if lo > hi:
        return None, {}, None
    edges = uniform_edges(lo, hi, fine)
    counts = {k: histogram_counts(a, edges) for k, a in arrays.items()}
    return bulk_from_counts(edges, counts, (lo, hi), bins, tail)


def bulk_from_counts(edges: np.ndarray, counts: dict[str, np.ndarray], span: tuple[float, float], bins: int = 256,
                     tail: float = BULK_TAIL):
    """:func:`bulk_histograms` from its fine counts: ``counts`` per key on the uniform ``edges``
    (``uniform_edges(*span, fine)``, ``span`` the values' finite range), taken however the values
    were read (a layer too large to hold is counted block by block)."""
    fine = edges.size - 1
    lo, hi = span
    b0, b1 = fine, -1
    for c in counts.values():
        cum = np.cumsum(c)
        n = int(cum[-1])
        if not n:
            continue
        cut = max(math.floor(tail * n), min(8, n // 1000))  # a few of a small array's values too
        b0 = min(b0, int(np.searchsorted(cum, cut, "right")))
        b1 = max(b1, int(np.searchsorted(cum, n - cut, "left")))
    # the bulk with a margin of a tenth of its width each side: a normal tail's last few values
    # lie just beyond the bins that hold all but them, and are no outliers
    if b1 >= b0:
        pad = max(1, (b1 - b0 + 1) // 10)
        b0, b1 = max(0, b0 - pad), min(fine - 1, b1 + pad)
    # a small array (a router's 512 weights, an expert's 128 scales) in 256 bins was a comb of
    # counts 0-10: about sqrt(n) bins (a power of two, at least MIN_BINS) for the largest array
    n_max = max(int(c.sum()) for c in counts.values())
    bins = min(bins, max(MIN_BINS, 1 << max(0, math.ceil(math.log2(max(1.0, math.sqrt(n_max)))))))
    top = 1  # the merge (a power of two, dividing ``fine``) that gives ``bins`` bins in all
    while top * 2 * bins <= fine and fine % (top * 2) == 0:
        top *= 2
    width = b1 - b0 + 1
    k = top
    if 0 < width < fine // 2:
        while k > max(1, fine // MAX_BINS) and width // k < bins // 2:
            k //= 2
    out = {key: c.reshape(-1, k).sum(1) for key, c in counts.items()}
    # values on a grid (bf16 weights, errors of a bf16 reference) in bins about as wide as its
    # step: neighbouring bins swing between thousands and a few, a comb of structure that is not
    # there (a researcher reads it as such); wider bins until no array's bulk is such a comb
    for _ in range(2):  # (at most 4x wider: beyond that the grid is the data's own shape)
        if fine % (k * 2) or fine // (k * 2) < MIN_BINS or not any(_combed(c) for c in out.values()):
            break
        k *= 2
        out = {key: c.reshape(-1, k).sum(1) for key, c in counts.items()}
    coarse = edges[::k]
    view = None
    if 0 < width < fine // 2 and hi > lo:
        view = (float(coarse[b0 // k]), float(coarse[min(len(coarse) - 1, b1 // k + 1)]))
        e = coarse
        beyond = (e[1:] <= view[0]) | (e[:-1] >= view[1])
        if not any(c[beyond].any() for c in out.values()):
            view = None  # nothing lies beyond it (constant values): the whole range it is
    return coarse, out, view
