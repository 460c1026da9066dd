"""One-pass error metrics of a layer: decode row blocks into a small buffer and measure them
while they are still in the CPU cache.

The general sweep (:mod:`.compare`) decodes a whole variant layer into memory, reads it back
to accumulate the metrics, then reads it again for the exact percentiles. Here each block of
rows is decoded by the compiled row decoder (:class:`~.formats.fast.RowDecoder`) into a
per-thread buffer of ~1 MB and measured at once by one compiled kernel
(:func:`~.formats.fast.pair_stats`), on all cores; the decoded layer never reaches main memory.

Exact percentiles without a second pass. The |error| percentiles are order statistics, unknown
until every element has been seen, and a full histogram costs more than the decode (~1.4 ns per
element of scattered increments). Instead the kernel counts the elements below a few intervals
of |error| and collects the exact float64 values of those inside; the wanted order statistics
are then read from the collected values by rank. The intervals narrow in steps:

0. *sample blocks* (a sixteenth of the layer, at least 3 and at most 16 blocks), spread evenly,
   are decoded first and kept; the kernel adds their float32 |error| into an exact histogram
   of 256 bins per octave (the full histogram is paid on this sixteenth only). Each percentile's
   interval is the bins around the sample's estimate, with a margin of ``Z`` standard errors
   of the whole layer's share below it, from how that share varies between the sample blocks
   (errors in a quantization group share its scale, so they are far from independent) and
   from how many blocks are still unseen;
1. where what the first intervals would collect fits ``COLLECT_BYTES`` (most layers: up to
   tens of millions of weights), all the other blocks and the kept sample blocks are measured
   with them at once and the ranks read from everything collected. Larger layers go in steps:
   a spread-out quarter of the other blocks is measured; the values it collects fix each
   percentile of the part measured so far exactly, so narrower intervals, nested in the first
   ones, follow (where the sample blocks differ much, the other blocks are first remade of
   runs of rows from across the layer: see ``MIX_SHARE``);
2. the remaining blocks and the kept sample blocks are measured with the narrowest intervals,
   and the earlier collections are cut down to them.

Where the sample blocks differ too much for any estimate to be narrow (``EXACT_SHARE``), two
passes replace the steps: the whole layer's exact histogram first, then only the bins that hold
the wanted ranks are collected.

If an interval misses its rank in the end (a layer whose blocks differ more than the samples
showed) or a buffer overflows, :func:`measure` returns None for that variant and the caller
takes the general path: the figures are exact either way; the shortcut only changes the time.
"""

from __future__ import annotations

import bisect
import math
import threading

import ml_dtypes
import numpy as np

from .errors import Cancelled
from .formats import fast
from .formats.kernel import pool, workers
from .metrics import (
    PERCENTILES,
    ErrorStats,
    _lerp,
    cosine_cancels,
    order_statistics,
    percentile_ranks,
)

#: Elements per block: the decoded block (float32) stays within L2/L3 of the core decoding it.
BLOCK_ELEMENTS = 1 << 18
#: Where the sample blocks differ much (their first intervals hold over MIX_SHARE of them), the
#: other blocks are remade of runs of rows of at least RUN_ELEMENTS (whole granules) from across
#: the layer (block j of the rest holds its runs j, j + m, j + 2m, ...), so that each sees every
#: part of it: rows of one attention head, or one range of channels, share a scale, and blocks
#: of consecutive rows then differ so much (the share of a trained model's q_proj below its
#: median varied between such blocks 450 times the binomial variance; between blocks of runs
#: from across the layer, 5 times) that the intervals had to hold most of the layer (78% of a
#: test layer of heads of different scale; 24% with runs). Each run costs a decoder and a
#: kernel call, 8-13% of a layer's time where blocks are alike, hence only where they are not.
MIX_SHARE = 0.15
RUN_ELEMENTS = 1 << 16
#: Where the sample blocks differ so much that their first intervals hold over EXACT_SHARE of
#: them, narrowing is given up for two passes that need no estimate: the first decodes every
#: block and adds its float32 |error| into the exact histogram (as the sample blocks' are),
#: which then says in which bin each wanted rank lies; the second decodes every block again and
#: collects only those bins' values. Narrowing would keep wide intervals to the end and collect
#: most of the layer, or miss (attention layers whose heads differ in scale: 9 ns per element,
#: or the general path's 5.5-6); the two passes take 3.8-4.1 there, and the same wherever the
#: values lie. Measured on layers of heads of different scale, one core: narrowing faster at a
#: share of 0.35 (4.9 against 5.7 ns), even at 0.41, slower from 0.49 (6.1 against 5.7).
EXACT_SHARE = 0.4
#: A smaller layer is cut into blocks of at least MIN_BLOCK_ELEMENTS so that it has MIN_BLOCKS:
#: with only a few, most of it is sampled (histogram and a second look) and nothing narrows.
MIN_BLOCKS = 24
MIN_BLOCK_ELEMENTS = 1 << 15
#: Share of a layer's blocks sampled first (at least 3, at most MAX_SAMPLE_BLOCKS; they stay
#: decoded until the end). A sixteenth, not an eighth since 2026-12: each sample block costs a
#: histogram and a second look (2.5x a plain block), and the first intervals it gives are only
#: used on a quarter of the rest, which is narrowed after: measured 4-7% faster on 11-59M-weight
#: layers, the same figures, no more fallbacks.
SAMPLE_SHARE = 1 / 16
MAX_SAMPLE_BLOCKS = 16
#: Most bytes of sample blocks kept decoded until their second look (all variants): above it
#: (wide layers: 16 of GPTQ's 32-row blocks of a 28672-wide layer are 59 MB a variant) they are
#: decoded again then, a sixteenth of such a layer's decoding, rather than held. A layer measured
#: in two exact passes keeps all its blocks decoded within the same bound.
KEEP_BYTES = 64 << 20
#: Most elements measured before the first narrowing (see :func:`_steps`).
STEP_ELEMENTS = 1 << 25
#: Narrowing is kept only where the first intervals would collect more than this many bytes of
#: float64 values per variant (their sample share, with the buffers' margin, of the blocks not
#: sampled), to bound what is held (a 70B layer's MLX variant: 5% of 235M weights, 94 MB).
#: Below it the other blocks are measured in one step with the first intervals and the ranks
#: read from all they collected. Each narrowing costs a few kernel calls and their Python
#: (0.6 ms of a 1.6M-weight expert's 3.3) and splits the blocks into steps, for fewer hits in
#: the later ones: a saving that was always smaller. Measured one layer on one core,
#: alternately (2026-12-07), one step was faster on every layer tried that narrowed:
#: Qwen3-30B-shaped MLX experts (1.6M weights) 2.09 -> 1.56 ns per element; 8B k_proj
#: 1.54-1.77 -> 1.34-1.44, q_proj 1.24-1.40 -> 1.14-1.25, down_proj (59M weights) 1.10-1.35 ->
#: 1.03-1.22, GPTQ, AWQ and MLX alike.
COLLECT_BYTES = 48 << 20
#: A variant's buffer for the values its intervals collect holds MARGIN times the share they are
#: expected to hold (plus 64K values): what :data:`COLLECT_BYTES` is weighed against too.
MARGIN = 1.5
#: Interval half-width in standard errors of the estimated rank.
Z = 5.0
#: Least design effect assumed: quantization errors in a group share its scale (measured 2-4
#: on round-to-nearest 4-bit layers), so a block holds fewer independent errors than elements.
DEFF = 4.0
_BF16 = np.dtype(ml_dtypes.bfloat16)
_QS = [p / 100.0 for p in PERCENTILES]


def _merge(ivs: list[list]) -> tuple[np.ndarray, np.ndarray]:
    ivs = sorted(ivs, key=lambda iv: float(iv[0]))
    merged = [list(ivs[0])]
    for lo, hi in ivs[1:]:
        if lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return (np.array([iv[0] for iv in merged], np.float32), np.array([iv[1] for iv in merged], np.float32))


def hist_intervals(hists: np.ndarray, n_blocks: int) -> tuple[np.ndarray, np.ndarray, float]:
    """First float32 intervals ``(lo, hi)`` of |error| around each percentile of a layer of
    ``n_blocks`` blocks, from the exact histograms (``fast.HIST_BINS`` bins of float32 |d|) of
    the sample blocks, one row each; and the share of the sample inside them.

    Each percentile's sample estimate gets a margin of ``Z`` standard errors of the whole
    layer's share below it: measured from how that share varies between the sample blocks
    (never below ``DEFF`` times the binomial variance), for the blocks not sampled (a finite
    population: none left, no margin). The bounds are rounded out to whole bins. Compiled
    (``fast._hist_intervals``): in numpy, its small-array calls took 0.5 ms a layer, more than
    measuring a small layer's sample."""
    bins, got, m = fast.hist_interval_bins(hists, _QS, n_blocks, Z, DEFF)
    share = got / max(1, m)
    lo, hi = fast.hist_edges(bins[:, 0])[0], fast.hist_edges(bins[:, 1])[1]
    lo, hi = _merge([[a, b] for a, b in zip(lo, hi)])
    return lo, hi, min(1.0, share)


#: Bytes of buffers kept for reuse between measurements (:class:`_Spare`).
SPARE_BYTES = 256 << 20


class _Spare:
    """Large buffers handed back at the end of a measurement and reused by the next.

    A fresh array costs the kernel a page fault for each 4 KiB first written, zeroing included:
    the sample blocks kept decoded, the collected values and the scratch blocks of one layer
    are tens of MB, and faulting them in took a quarter of a sweep's time. Up to
    ``SPARE_BYTES`` stay mapped from one layer to the next instead; a sweep hands them back
    (:meth:`clear`) when it ends."""

    def __init__(self) -> None:
        self._free: list[np.ndarray] = []  # ascending size, with their sizes in _sizes
        self._sizes: list[int] = []
        self._bytes = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 buffer of at least ``nbytes`` (contents undefined): the smallest that fits."""
        with self._lock:
            i = bisect.bisect_left(self._sizes, nbytes)
            if i < len(self._free):
                self._bytes -= self._sizes.pop(i)
                return self._free.pop(i)
        return np.empty(max(nbytes, 1), np.uint8)

    def give(self, bufs) -> None:
        with self._lock:
            for b in bufs:
                i = bisect.bisect_left(self._sizes, b.size)
                self._sizes.insert(i, b.size)
                self._free.insert(i, b)
                self._bytes += b.size
            while self._bytes > SPARE_BYTES:  # the largest goes first
                self._bytes -= self._sizes.pop()
                self._free.pop()

    def clear(self) -> None:
        with self._lock:
            self._free, self._sizes, self._bytes = [], [], 0


SPARE = _Spare()


class _Held:
    """The buffers one measurement took from :data:`SPARE`, typed views of them."""

    def __init__(self) -> None:
        self.bufs: list[np.ndarray] = []
        self._lock = threading.Lock()

    def array(self, shape, dtype) -> np.ndarray:
        dt = np.dtype(dtype)
        n = int(np.prod(shape)) * dt.itemsize
        b = SPARE.take(n)
        with self._lock:
            self.bufs.append(b)
        return b[:n].view(dt).reshape(shape)

    def release(self) -> None:
        with self._lock:
            bufs, self.bufs = self.bufs, []
        SPARE.give(bufs)


class _Acc:
    """Accumulators of one variant on one worker (see ``fast._pair_stats``)."""

    def __init__(self, m: int, cap: int, held: _Held | None = None) -> None:
        self.acc = np.zeros(5)
        self.cnt = np.zeros(4 + m, np.int64)
        self.buf = held.array(cap, np.float64) if held is not None and cap else np.empty(cap)

    def collected(self) -> np.ndarray | None:
        k = int(self.cnt[1])
        return None if k > self.buf.size else self.buf[:k]


class _Found:
    """What is known of one variant's |error| order statistics over the elements measured with
    the intervals ``lo``/``hi``: elements with exact zero error, how many fall below each
    interval, and the exact values inside (float32 rounding decides "inside", as in the kernel)."""

    def __init__(self, lo: np.ndarray, hi: np.ndarray, held: _Held | None = None) -> None:
        self.lo, self.hi = lo, hi
        self.held = held
        self.n = 0
        self.nzero = 0
        self.below = np.zeros(lo.size, np.int64)
        self.parts: list[np.ndarray] = []
        self.ok = True
        self._offs: list[int] | None = None

    def add(self, acc: _Acc) -> int:
        """Take one worker's counts and collected values; returns where its values begin among
        :meth:`values` (until :meth:`restrict`)."""
        self._offs = None
        self.nzero += int(acc.cnt[0])
        self.below += acc.cnt[4:4 + self.lo.size]
        at = sum(p.size for p in self.parts)
        c = acc.collected()
        if c is None:
            self.ok = False
        elif c.size:
            self.parts.append(c)
        return at

    def values(self) -> np.ndarray:
        if len(self.parts) != 1:
            total = sum(p.size for p in self.parts)
            out = self.held.array(total, np.float64) if self.held is not None else np.empty(total)
            if self.parts:
                np.concatenate(self.parts, out=out)
            self.parts = [out]
        return self.parts[0]

    def _spans(self, vals: np.ndarray) -> list[tuple[int, int, int]]:
        # per interval: (rank of its first element, how many, offset among the sorted values);
        # the counts are kept until add() or restrict() changes the values or the intervals (a
        # narrowing asks twice)
        if self._offs is None:
            self._offs = [int(c) for c in fast.count_lt32(vals, self.lo)] + [vals.size]
        offs = self._offs
        return [(int(self.below[q]) + (self.nzero if self.lo[q] <= 0 else 0), offs[q + 1] - offs[q], offs[q])
                for q in range(self.lo.size)]

    def at_ranks(self, ranks: list[int]) -> dict[int, float | None]:
        """Exact |error| of the given ranks among these elements (None: not inside an interval)."""
        vals = self.values()
        spans = self._spans(vals)
        where = {}
        for r in ranks:
            if r < self.nzero:
                where[r] = -1
                continue
            where[r] = None
            for base, cnt, off in spans:
                if base <= r < base + cnt:
                    where[r] = off + r - base
        kth = sorted({p for p in where.values() if p is not None and p >= 0})
        got = dict(zip(kth, order_statistics(vals, kth))) if kth else {}
        return {r: (None if p is None else 0.0 if p < 0 else float(got[p])) for r, p in where.items()}

    def narrowed(self, block_below: list[np.ndarray], block_sizes: list[int], n_blocks: int,
                 block_spans: list[tuple[int, int]] | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """Intervals nested in the current ones, holding each percentile of the whole layer (of
        ``n_blocks`` blocks) with a margin of ``Z`` standard errors of its rank estimated from the
        elements known here (a finite population: only the blocks not measured add error).

        The standard error comes from how the share below each percentile's estimate varies
        between the blocks measured: errors within a quantization group share its scale, and
        rows of different heads or channels differ, so they are far from independent and the
        binomial error alone (its floor here) would be several times too small. Per block,
        ``block_below`` holds its counts below each interval and ``block_spans`` where its
        collected values lie among :meth:`values`: the share below the estimate itself is the
        count below its interval plus its values inside under the estimate. (Without
        ``block_spans``, the share below the interval's lower bound stands in: where that
        interval was wide, as the first one is when the sample blocks differ much, it says
        nothing of the variance at the estimate: every block had none below 0, the margin came
        out at the binomial floor, and the narrowed interval missed.)"""
        if not self.ok or self.n < 2:
            return None
        n = self.n
        vals = self.values()
        spans = self._spans(vals)
        sizes = np.asarray(block_sizes, np.float64)
        fr = np.asarray(block_below, np.float64) / sizes[:, None]  # [blocks, intervals]
        nb = len(sizes)
        done = max(nb, round(n / float(sizes.mean())))  # blocks measured so far, in all steps
        ranks = [int(q * (n - 1)) for q in _QS]
        est = self.at_ranks(ranks) if block_spans is not None and nb > 1 else {}
        want, bounds = [], []
        for q, r in zip(_QS, ranks):
            home = next((j for j, (base, cnt, _) in enumerate(spans) if base <= r < base + cnt), None)
            if home is None:
                # the estimate is outside every interval: the intervals either side of it stay
                # whole (its own is one of them), the other percentiles' narrow (giving up on all
                # left every interval wide to the end)
                below = [j for j, (base, cnt, _) in enumerate(spans) if base + cnt <= r]
                above = [j for j, (base, _, _) in enumerate(spans) if base > r]
                for j in ([below[-1]] if below else []) + ([above[0]] if above else []):
                    bounds.append((j, None, None, True, True))
                continue
            # variance of the share per block: measured, but never below DEFF times the
            # binomial one (a few blocks estimate a variance poorly)
            var_b = DEFF * q * (1 - q) / float(sizes.mean())
            if nb > 1:
                share = fr[:, home]
                if est.get(r) is not None:
                    # per block: below the interval, plus its values inside the interval that are
                    # under the estimate (those in lower intervals are below it already)
                    v, lo = est[r], self.lo[home]
                    share = share + np.array([
                        (np.count_nonzero(seg < v) - np.count_nonzero(seg.astype(np.float32) < lo)) / k
                        for seg, k in ((vals[a:b], k) for (a, b), k in zip(block_spans, block_sizes))])
                var_b = max(var_b, float(np.var(share, ddof=1)))
            left = max(0, n_blocks - done)
            se = left / n_blocks * math.sqrt(var_b * (1 / done + (1 / left if left else 0.0)))
            delta = Z * se + 2.0 / n
            a = int(math.floor(max(0.0, q - delta) * (n - 1)))
            b = int(math.ceil(min(1.0, q + delta) * (n - 1)))
            bounds.append((home, a, b, q - delta <= 0, q + delta >= 1))
            want += [a, b]
        if not want:
            return None
        val = self.at_ranks(want)
        ivs = []
        for home, a, b, open_lo, open_hi in bounds:
            # nest in the interval that holds the estimate; keep its bound where ours is outside
            h_lo, h_hi = self.lo[home], self.hi[home]
            lo = h_lo if (open_lo or val[a] is None) else min(h_hi, max(h_lo, np.float32(val[a])))
            hi = h_hi if (open_hi or val[b] is None) else max(h_lo, min(h_hi, np.float32(val[b])))
            ivs.append([lo, hi])
        return _merge(ivs)

    def restrict(self, lo: np.ndarray, hi: np.ndarray) -> None:
        """Keep only what lies in ``lo``/``hi`` (nested in the current intervals)."""
        home = np.searchsorted(self.lo, lo, "right") - 1  # the old interval holding each new one
        vals = self.values()
        kept, moved = fast.restrict(vals, self.lo[home], lo, hi,
                                    self.held.array(vals.size, np.float64) if self.held is not None else None)
        below = self.below[home] + moved
        below += np.where((self.lo[home] <= 0) & (lo > 0), self.nzero, 0)
        self.lo, self.hi, self.below = lo, hi, below
        self.parts = [kept]
        self._offs = None


def _exact_intervals(tot: np.ndarray, nzero: int, n: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Intervals ``(lo, hi)`` of float32 |error| holding each wanted rank of a layer of ``n``
    elements, ``nzero`` of them exact zeros, from its whole exact histogram ``tot`` (int64
    [HIST_BINS]): per percentile, the bins of its two order statistics (so at most three
    intervals, as the kernel takes); and the share of the layer inside them (an upper bound:
    the first bin's zeros are never collected)."""
    cum = np.cumsum(tot)
    ivs = []
    inside = np.zeros(tot.size, bool)
    for _, a, b, _ in percentile_ranks(n):
        if b < nzero:
            continue  # both exact zeros: no value to collect
        ba, bb = (int(np.searchsorted(cum, max(r, nzero), "right")) for r in (a, b))
        lo, hi = fast.hist_edges(np.array([ba, bb]))
        ivs.append([lo[0], hi[1]])
        inside[ba:bb + 1] = True
    if not ivs:  # every wanted rank an exact zero: one empty interval
        return np.array([np.inf], np.float32), np.array([-np.inf], np.float32), 0.0
    lo, hi = _merge(ivs)
    return lo, hi, float(tot[inside].sum()) / max(1, n)


def _steps(rest: list[int], block_elements: int = 1) -> list[list[int]]:
    """Blocks measured in turn: a spread-out quarter, then the rest, with the intervals narrowed
    in between; all at once when there are too few blocks to measure both before and after a
    narrowing (fewer than 12). Where a quarter is over :data:`STEP_ELEMENTS`, the steps start
    at that many elements and grow fourfold, narrowing after each: what a step collects (its
    share inside the intervals, ~5% before the first narrowing) stays tens of MB in a layer of
    a billion weights. (Used where the first intervals' collection would exceed
    :data:`COLLECT_BYTES`; below it :func:`measure` takes all the blocks in one step.)"""
    if len(rest) < 12:
        return [rest]
    first = max(4, len(rest) // 4)
    sizes = [first]
    if first * block_elements > STEP_ELEMENTS:
        sizes = [max(4, STEP_ELEMENTS // block_elements)]
        while sum(sizes) + 4 * sizes[-1] < len(rest) - sizes[-1]:  # the last step holds the rest
            sizes.append(4 * sizes[-1])
    steps, left = [], list(rest)
    for size in sizes:
        pick = {int(round(i)) for i in np.linspace(0, len(left) - 1, size)}
        steps.append([left[i] for i in sorted(pick)])
        left = [b for j, b in enumerate(left) if j not in pick]
    return steps + [left]


def measure(ref: np.ndarray | fast.RowDecoder, variants: dict[str, tuple[fast.RowDecoder, int, np.ndarray | None]], *,
            cancel=None, on_rows=None, parallel: bool = True, done_rows=None) -> dict[str, dict | None]:
    """Metrics of each variant against the reference rows ``ref``: float32 or bfloat16 ``[R, K]``,
    or a row decoder (a quantized reference, as when verifying a conversion), decoded block by
    block alongside the variants.

    ``variants`` maps a label to ``(decoder, v0, col)``: reference row ``r`` is the decoder's row
    ``v0 + r``; ``col`` (float32 ``[K]`` or None) divides the variant first (undone smoothing).
    Returns per label the :meth:`ErrorStats.result` dict plus ``rel_fro_raw``, or None where
    the exact percentiles need the general path. ``on_rows(k)`` reports progress (any thread);
    ``cancel.is_set()`` is checked before every block. ``parallel=False`` keeps all the work on
    the calling thread (a sweep then measures several layers at once instead). ``done_rows(r0,
    r1)`` is called (any thread) once reference rows ``[r0, r1)`` are measured, in the last
    pass that reads them or (the two exact passes) in each: a sweep drops their mapped pages,
    so a layer of 1.7 GB is not all resident at its end.
    """
    held = _Held()
    try:
        return _measure(ref, variants, cancel, on_rows, parallel, held, done_rows)
    finally:
        held.release()


def _measure(ref, variants, cancel, on_rows, parallel: bool, held: _Held, done_rows) -> dict[str, dict | None]:
    nwork = workers() if parallel else 1
    if isinstance(ref, fast.RowDecoder):
        R, K = ref.rows, ref.cols

        def ref_block(r0, r1, buf):
            ref.fn(r0, r1, buf[:r1 - r0])
            return buf[:r1 - r0]
    else:
        R, K = ref.shape

        def ref_block(r0, r1, buf):
            return ref[r0:r1]
    n = R * K
    labels = list(variants)
    # the decoders read block by block: the variants' and a quantized reference's
    decs = [d for d, _, _ in variants.values()] + ([ref] if isinstance(ref, fast.RowDecoder) else [])
    gran = math.lcm(*(d.granule for d in decs))
    per = min(BLOCK_ELEMENTS, max(MIN_BLOCK_ELEMENTS, n // MIN_BLOCKS))
    # rows per block: a whole number of granules (GPTQ decodes 32 rows at a time), the nearer of
    # the two around ``per`` (rounding up halved a 896-row layer's blocks: no narrowing step)
    want = max(1, per // K)

    def nearest(unit: int) -> int:
        return max(unit, min((want // unit * unit, -(-want // unit) * unit), key=lambda r: (abs(r - want), r)))

    step = nearest(gran)
    # whole tiles of the decoders that prefer larger ones (AWQ: 64 rows), where the layer still
    # has MIN_BLOCKS of them (a wide layer's blocks then outgrow BLOCK_ELEMENTS: measured faster)
    tile = math.lcm(gran, *(d.tile or d.granule for d in decs))
    if tile > gran and R // nearest(tile) >= MIN_BLOCKS:
        gran, step = tile, nearest(tile)  # (runs of rows below: whole tiles too)
    # each block: its runs of rows (r0, r1) and where each lies in the block's buffer; one run
    # of consecutive rows, until the sample shows the blocks differ (see MIX_SHARE)
    blocks = [[(r0, min(R, r0 + step), 0)] for r0 in range(0, R, step)]
    nbk = len(blocks)
    run_rows = -(-RUN_ELEMENTS // K)
    run = max(gran, -(-run_rows // gran) * gran)  # rows of a run (see MIX_SHARE): whole granules
    ns = min(nbk, MAX_SAMPLE_BLOCKS, max(3, math.ceil(nbk * SAMPLE_SHARE)))
    sample_ids = sorted({int(round(i)) for i in np.linspace(0, nbk - 1, ns)})
    sample_set = set(sample_ids)
    rest = [i for i in range(nbk) if i not in sample_set]
    steps = _steps(rest, step * K)
    cols = {lb: (np.empty(0, np.float32) if c is None else np.ascontiguousarray(c, np.float32))
            for lb, (_, _, c) in variants.items()}
    first = labels[0]
    lock = threading.Lock()
    empty = np.empty(0, np.float32)
    kept: dict[tuple[str, int], np.ndarray] = {}

    def check_cancel():
        if cancel is not None and cancel.is_set():
            raise Cancelled("comparison cancelled")

    def progress(rows: int) -> None:
        if on_rows is not None and rows:
            with lock:
                on_rows(rows)

    def spread(ids: list[int], task) -> list:
        nw = min(nwork, len(ids))
        if nw <= 1:
            return [task(ids)] if ids else []
        per = -(-len(ids) // nw)
        futs = [pool().submit(task, ids[i * per:(i + 1) * per]) for i in range(nw)]
        return [f.result() for f in futs]

    def rows_of(ids) -> int:
        return sum(r1 - r0 for i in ids for r0, r1, _ in blocks[i])

    # -- 0: sample blocks, kept, with their float64 sums and the histogram of |d| ----------------
    def ref_buffer():
        return held.array((step, K), ref.dtype or np.float32) if isinstance(ref, fast.RowDecoder) else None

    keep_samples = len(sample_ids) * step * K * 4 * len(labels) <= KEEP_BYTES
    # exact mode's first pass keeps the other blocks decoded too where the whole layer fits
    # KEEP_BYTES: its second pass then measures them without decoding them again (attention
    # layers whose heads differ in scale, 2048x2048, three variants, one core: 2.41 -> 2.16 ns
    # per element; the heads model's sweep 0.99-1.07 -> 0.96-0.98 s)
    keep_all = nbk * step * K * 4 * len(labels) <= KEEP_BYTES
    hists = {lb: np.zeros((len(sample_ids), fast.HIST_BINS), np.int32) for lb in labels}
    row_of = {i: j for j, i in enumerate(sample_ids)}

    def decode_with_hist(ids, keep_them, hist_of, release=False, after_block=None):
        # the blocks ids of every variant decoded, their float64 sums, zeros and |d| histogram
        # (into hist_of(lb, i)) taken; kept decoded for a second look where keep_them (one buffer
        # per variant: a take per block cost more than a small layer's block), else decoded into
        # a scratch block. release: the reference rows' pages dropped as they are measured
        # (done_rows); after_block(i): called once block i is measured
        accs = {lb: _Acc(0, 0) for lb in labels}
        wbuf = ref_buffer()
        keep = {lb: held.array((len(ids), step, K), np.float32) for lb in labels} if keep_them else None
        scratch = held.array((step, K), np.float32) if keep is None else None
        for j, i in enumerate(ids):
            check_cancel()
            for r0, r1, off in blocks[i]:
                w = ref_block(r0, r1, wbuf)
                for lb in labels:
                    dec, v0, _ = variants[lb]
                    dst = scratch[:r1 - r0] if keep is None else keep[lb][j, off:off + r1 - r0]
                    dec.fn(v0 + r0, v0 + r1, dst)
                    a = accs[lb]
                    fast.pair_stats(w, dst, cols[lb], empty, empty, 3 if lb == first else 1, a.acc, a.cnt, a.buf,
                                    hist_of(lb, i))
                if release and done_rows is not None:  # (read again by the second pass: a page fault
                    done_rows(r0, r1)  # each then, where holding a wide layer's pages held its size)
            if keep is not None:
                for lb in labels:
                    kept[(lb, i)] = keep[lb][j]
            if after_block is not None:
                after_block(i)
        return accs

    def sample_task(ids):
        # a wide layer's sample blocks (GPTQ's 32-row blocks of a 28672-wide layer are 3.7 MB
        # each) are decoded again at the end instead of kept
        accs = decode_with_hist(ids, keep_samples, lambda lb, i: hists[lb][row_of[i]])
        progress(rows_of(ids))
        return accs

    parts0 = spread(sample_ids, sample_task)

    def each(fn) -> dict:
        # per-variant serial work (numba and numpy release the GIL) spread over the pool
        if len(labels) == 1 or nwork == 1:
            return {lb: fn(lb) for lb in labels}
        futs = {lb: pool().submit(fn, lb) for lb in labels}
        return {lb: f.result() for lb, f in futs.items()}

    first_iv = each(lambda lb: hist_intervals(hists[lb], nbk))
    share = max(f for _, _, f in first_iv.values())  # inside the first intervals, the most of any variant
    exact = share > EXACT_SHARE  # (see EXACT_SHARE)
    found = {lb: _Found(lo, hi, held) for lb, (lo, hi, _) in first_iv.items()}
    if share * MARGIN * len(rest) * step * K * 8 <= COLLECT_BYTES:
        steps = [rest]  # (see COLLECT_BYTES)
    if not exact and run < step and len(rest) > 1 and share > MIX_SHARE:
        # the sample blocks differ: the other blocks remade of runs from across the layer
        runs = [(a, min(r1, a + run)) for i in rest for r0, r1, _ in blocks[i] for a in range(r0, r1, run)]
        for j, i in enumerate(rest):
            mine = runs[j::len(rest)]
            offs = np.cumsum([0] + [b - a for a, b in mine])
            blocks[i] = [(a, b, int(o)) for (a, b), o in zip(mine, offs)]

    # -- 1 and 2: the other blocks measured in full; at the end, the sample blocks' intervals --
    def hist_task(ids):
        # exact mode's first pass over the blocks not sampled: sums, zeros and the histogram; a
        # layer small enough keeps its decoded blocks for the second pass (not decoded again)
        hist = {lb: np.zeros(fast.HIST_BINS, np.int32) for lb in labels}
        # (the second pass reports the other half of each block's rows)
        accs = decode_with_hist(ids, keep_all, lambda lb, i: hist[lb], release=True,
                                after_block=lambda i: progress(rows_of([i]) // 2))
        return accs, hist

    def measure_task(ids, plan, record=False, sums=True):
        n_el = rows_of(ids) * K
        accs = {}
        per_block = {lb: [] for lb in labels}
        for lb in labels:
            lo, hi, frac = plan[lb]
            cap = int(frac * n_el * MARGIN) + 65536
            accs[lb] = _Acc(lo.size, cap, held)
        scratch = held.array((step, K), np.float32)
        wbuf = ref_buffer()
        for i in ids:
            check_cancel()
            sample = i in sample_set
            if record and not sample:
                before = {lb: (accs[lb].cnt[4:].copy(), int(accs[lb].cnt[1])) for lb in labels}
            for r0, r1, off in blocks[i]:
                w = ref_block(r0, r1, wbuf)
                for lb in labels:
                    lo, hi, _ = plan[lb]
                    a = accs[lb]
                    if (lb, i) in kept:  # sums already taken: only the intervals
                        fast.pair_stats(w, kept[(lb, i)][off:off + r1 - r0], cols[lb], lo, hi, 0, a.acc, a.cnt, a.buf)
                        continue
                    dec, v0, _ = variants[lb]
                    dst = scratch[:r1 - r0]
                    dec.fn(v0 + r0, v0 + r1, dst)
                    # a sample block not kept is decoded again, its sums taken already
                    fast.pair_stats(w, dst, cols[lb], lo, hi, 0 if sample or not sums else 3 if lb == first else 1,
                                    a.acc, a.cnt, a.buf)
                if done_rows is not None:  # (a sample block's second look comes last)
                    done_rows(r0, r1)
            rows = rows_of([i])
            if record and not sample:  # its counts below the intervals, its size, where its values went
                for lb in labels:
                    c0, n0 = before[lb]
                    a = accs[lb]
                    per_block[lb].append((a.cnt[4:] - c0, rows * K, (n0, int(a.cnt[1]))))
            if not sample:
                progress(rows if sums else rows - rows // 2)
        return accs, per_block

    sums = {lb: np.zeros(5) for lb in labels}
    zeros = {lb: 0 for lb in labels}

    def take_sums(lb, a: _Acc) -> None:
        sums[lb][:4] += a.acc[:4]
        m = a.acc[4]
        if m > sums[lb][4] or m != m:
            sums[lb][4] = m

    for accs in parts0:
        for lb in labels:
            take_sums(lb, accs[lb])
            zeros[lb] += int(accs[lb].cnt[0])
    if exact:
        tot = {lb: hists[lb].sum(axis=0, dtype=np.int64) for lb in labels}
        for accs, hist in spread(rest, hist_task):
            for lb in labels:
                take_sums(lb, accs[lb])
                zeros[lb] += int(accs[lb].cnt[0])
                tot[lb] += hist[lb]
        plan = each(lambda lb: _exact_intervals(tot[lb], zeros[lb], n))
        found = {lb: _Found(lo, hi, held) for lb, (lo, hi, _) in plan.items()}
        for accs, _ in spread(list(range(nbk)), lambda b: measure_task(b, plan, sums=False)):
            for lb in labels:
                found[lb].add(accs[lb])
        steps = []  # (the two passes replace them)
    # steps of spread-out blocks, each measured with intervals narrowed from all before it;
    # the last also takes the kept sample blocks (their sums are in already)
    plan = first_iv
    for si, ids in enumerate(steps):
        last = si == len(steps) - 1
        parts = spread(ids + (sample_ids if last else []), lambda b, p=plan, r=not last: measure_task(b, p, r))
        blk: dict[str, list] = {lb: [] for lb in labels}  # per block: counts, size, its values' span
        for lb in labels:
            for accs, per in parts:
                take_sums(lb, accs[lb])
                zeros[lb] += int(accs[lb].cnt[0])
                at = found[lb].add(accs[lb])
                blk[lb] += [(c, k, (at + s0, at + s1)) for c, k, (s0, s1) in per[lb]]
            found[lb].n += rows_of(ids) * K
        if last:
            break

        def narrow(lb, plan=plan, blk=blk):
            f = found[lb]
            b = blk[lb]
            nar = f.narrowed([c for c, _, _ in b], [k for _, k, _ in b], nbk, [s for _, _, s in b])
            if nar is None:
                return plan[lb]
            f.restrict(*nar)
            # share of the elements so far inside the new intervals sizes the next buffers
            return (*nar, f.values().size / f.n)

        plan = each(narrow)
    for lb in labels:
        f = found[lb]
        if not exact:  # the last step counted the sample blocks' zeros again (step 0 had them)
            zeros[lb] -= sum(int(accs[lb].cnt[0]) for accs in parts0)
        f.n = n
        f.nzero = zeros[lb]
    sww = float(sums[first][1])
    ranks = sorted({r for _, a, b, _ in percentile_ranks(n) for r in (a, b)})

    def order_stats(lb):
        f = found[lb]
        if not f.ok or not math.isfinite(sums[lb][0]):
            return None  # overflowed, or NaN/inf errors: numpy's semantics via the general path
        val = f.at_ranks(ranks)
        return None if any(v is None for v in val.values()) else val

    out: dict[str, dict | None] = {}
    for lb, val in each(order_stats).items():
        acc = sums[lb]
        if val is None or cosine_cancels(sww, float(acc[2]), float(acc[0])):
            out[lb] = None  # (its cosine: the general path takes ΣŴ² and ΣW·Ŵ directly)
            continue
        st = ErrorStats()
        st.n, st.sdd, st.sww, st.swd, st.max_abs, st.nzero = n, float(acc[0]), sww, float(acc[2]), float(acc[4]), f.nzero
        st.exact_percentiles = {p: _lerp(val[a], val[b], t) for p, a, b, t in percentile_ranks(n)}
        res = st.result()
        if cols[lb].size:
            res["rel_fro_raw"] = math.sqrt(acc[3] / sww) if sww > 0 else (0.0 if acc[3] == 0 else math.inf)
        else:
            res["rel_fro_raw"] = res["rel_fro"]
        out[lb] = res
    return out

