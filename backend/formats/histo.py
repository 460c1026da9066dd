"""Compiled kernels for a selected layer's views: exact histograms on uniform edges, the range of
the finite values, and each quantization group's error sums — of arrays, or of the difference of
two arrays taken element by element in float64 and never stored.

In numpy each of these took several passes and temporaries per element (a float64 copy, masks,
indices, ``bincount``): about 15 ns per element for a histogram, and the error arrays themselves
were float64 copies of the layer (470 MB for each variant of a 58M-weight layer). Selecting such
a layer with two variants took 16-20 s, most of it here. Each kernel is one pass over its input;
large inputs are cut into pieces spread over the worker pool. Results equal numpy's exactly
(histograms: ``np.histogram`` on the same edges; group sums in the same order of additions as a
sequential loop, to 1e-12 of ``np.add.reduceat``'s), and the numpy code in :mod:`..metrics`
stays the fallback without numba.
"""

from __future__ import annotations

import numpy as np

from .fast import AVAILABLE
from .kernel import map_pieces

#: Elements per piece handed to one worker.
PIECE = 1 << 22

if AVAILABLE:
    from numba import njit

    from .fast import _bits, _bits64, _from_bits, _prefetch

    # Finite ranges through integer keys: a float's bits, its magnitude bits flipped where the sign
    # is set, order as the float does (-0 just below +0), and integer minima and maxima vectorise,
    # where float ones do not unless NaN is ruled out (which the finite test itself needs). NaN's
    # bits make the keys past the largest and least finite ones: the sentinels.
    _K32_MAX, _K32_MIN = np.int32(0x7FFFFFFF), np.int32(-0x80000000)
    _K64_MAX, _K64_MIN = np.int64(0x7FFFFFFFFFFFFFFF), np.int64(-0x8000000000000000)

    # The count in loops per run of values: the bin indices of the run (vectorised: a value
    # outside the edges, or NaN, goes to a spare bin past the last; one whose arithmetic position
    # lies within a few ulps of an edge gets -1 - its index), then the increments, then the few
    # next to an edge, corrected against the edges themselves as np.histogram does. One loop
    # doing both took 1.8 (values) and 2.3 (differences) ns per element on one core; two 1.2.
    # The index loops take slices: indexed from an offset, numba's wraparound checks on a[c0 + t]
    # kept LLVM from vectorising them (2.0 ns against 0.47).
    @njit(nogil=True, cache=True, inline="always")
    def _bin_code(v, lo, hi, scale, near, top):
        # v's bin index, -1 - it next to an edge, or the spare bin top + 1 outside (or NaN)
        inside = (v >= lo) & (v <= hi)  # (NaN is neither)
        f = (v - lo) * scale if inside else 0.0
        j = min(np.int32(f), top)
        r = f - j
        edge = (r < near) | (r > 1.0 - near)
        code = np.int32(-1) - j if edge else j
        return code if inside else top + np.int32(1)

    @njit(nogil=True, cache=True)
    def _bin_index(a, lo, hi, scale, near, top, idx):
        for t in range(a.size):
            idx[t] = _bin_code(np.float64(a[t]), lo, hi, scale, near, top)

    @njit(nogil=True, cache=True)
    def _bin_index_diff(a, b, lo, hi, scale, near, top, idx):
        for t in range(a.size):
            idx[t] = _bin_code(np.float64(a[t]) - np.float64(b[t]), lo, hi, scale, near, top)

    @njit(nogil=True, cache=True)
    def _bin_index32(a, lo, hi, scale, rel, base, top, idx):
        # _bin_index of float32 values in float32 arithmetic (16 lanes, not 8: 0.48 -> 0.23 ns per
        # element), where lo and hi are float32 values. The position f = (v - lo) * scale takes
        # three roundings of 2**-24: it lies within 1.8e-7 f of the exact one, and ``rel`` (4e-7)
        # f + ``base`` (the edges' own rounding) of an edge sends v to the correction. (Written
        # out, not through _bin_code given a margin term: that made both loops slower, this one
        # 0.20 -> 0.50 ns per element and _bin_index 0.47 -> 0.56.)
        one = np.float32(1.0)
        for t in range(a.size):
            v = a[t]
            inside = (v >= lo) & (v <= hi)  # (NaN is neither)
            f = (v - lo) * scale if inside else np.float32(0.0)
            j = min(np.int32(f), top)
            r = f - np.float32(j)
            near = f * rel + base
            edge = (r < near) | (r > one - near)
            code = np.int32(-1) - j if edge else j
            idx[t] = code if inside else top + np.int32(1)

    @njit(nogil=True, cache=True, inline="always")
    def _edge_bin(a, b, diff, i, j, edges):
        # the bin of value i (of a, or of a - b in float64) whose arithmetic position j lies next
        # to an edge: np.histogram's one step against the edges themselves
        v = np.float64(a[i]) - np.float64(b[i]) if diff else np.float64(a[i])
        if v < edges[j]:
            return j - 1
        if j < edges.size - 2 and v >= edges[j + 1]:
            return j + 1
        return j

    @njit(nogil=True, cache=True, inline="always")
    def _flush(local, counts):
        # a narrow table of counts added to the wide one, and emptied
        for q in range(local.size):
            counts[q] += local[q]
            local[q] = 0

    @njit(nogil=True, cache=True, inline="always")
    def _bin_plan(edges, as32):
        # what the index loops take of uniform edges: (nb, lo, hi, scale, near, top) and, where
        # float32 values (as32) lie between float32 bounds, its float32 form (f32, lo32, hi32,
        # scale32, rel32, base32: see _bin_index32)
        nb = edges.size - 1
        lo, hi = edges[0], edges[nb]
        scale = nb / (hi - lo)
        # how far (in bins) the arithmetic position can be from the edges' own: a few ulps of
        # the largest magnitude in bins, and of the position itself
        near = max(abs(lo), abs(hi)) * scale * 2e-15 + 1e-9
        top = np.int32(nb - 1)
        lo32, hi32, scale32 = np.float32(lo), np.float32(hi), np.float32(scale)
        f32 = (as32 and np.float64(lo32) == lo and np.float64(hi32) == hi and np.isfinite(scale32)
               and nb < (1 << 22))
        return (nb, lo, hi, scale, near, top), (f32, lo32, hi32, scale32, np.float32(4e-7), np.float32(near + 1e-6))

    @njit(nogil=True, cache=True, inline="always")
    def _bin_values(v, plan, plan32, idx):
        # idx: the bin codes of values v (see _bin_code), in float32 where plan32 allows
        _, lo, hi, scale, near, top = plan
        f32, lo32, hi32, scale32, rel32, base32 = plan32
        if f32:
            _bin_index32(v, lo32, hi32, scale32, rel32, base32, top, idx)
        else:
            _bin_index(v, lo, hi, scale, near, top, idx)

    @njit(nogil=True, cache=True)
    def _count(a, b, diff, as32, edges, counts):
        # counts (nb + 1 entries, the last for the values outside the edges: not kept exact) of a
        # (diff: of a - b in float64) in the uniform bins edges; as32: a is float32
        plan, plan32 = _bin_plan(edges, as32 and not diff)
        nb, lo, hi, scale, near, top = plan
        run = 2048
        idx = np.empty(run, np.int32)
        # The increments go to 16-bit counts (a quarter of the int64 ones' cache lines), added to
        # ``counts`` before any can overflow
        local = np.zeros(nb + 1, np.uint16)
        held = 0
        n = a.size
        # While a run's increments go on, the next run's values are prefetched, a cache line
        # every 16 increments (two for float64): the index loop streams them from memory, and
        # in short bursts between the increments the hardware prefetcher did not keep ahead of
        # it (one core, 16M float32 values: 1.20 -> 0.98 ns per element)
        wide_a, wide_b = a.itemsize > 4, b.itemsize > 4
        a2 = a.reshape(1, n)
        b2 = b.reshape(1, n)
        for c0 in range(0, n, run):
            m = min(run, n - c0)
            if diff:
                _bin_index_diff(a[c0:c0 + m], b[c0:c0 + m], lo, hi, scale, near, top, idx)
            else:
                _bin_values(a[c0:c0 + m], plan, plan32, idx)
            # (next to an edge: np.histogram's correction, against the edges, in the same loop:
            # a rare branch; a loop of its own over the run read it all again, 7% of the count)
            if m == run and c0 + 2 * run <= n:
                for q in range(0, run, 16):
                    k = c0 + run + q
                    _prefetch(a2, 0, k)
                    if wide_a:
                        _prefetch(a2, 0, k + 8)
                    if diff:
                        _prefetch(b2, 0, k)
                        if wide_b:
                            _prefetch(b2, 0, k + 8)
                    for t in range(q, q + 16):
                        j = idx[t]
                        if j >= 0:
                            local[np.uint32(j)] += 1
                        else:
                            counts[_edge_bin(a, b, diff, c0 + t, -1 - j, edges)] += 1
            else:
                for t in range(m):
                    j = idx[t]
                    if j >= 0:
                        local[np.uint32(j)] += 1
                    else:
                        counts[_edge_bin(a, b, diff, c0 + t, -1 - j, edges)] += 1
            held += m
            if held > 65535 - run:
                _flush(local, counts)
                held = 0
        _flush(local, counts)

    @njit(nogil=True, cache=True)
    def _range(x, out):
        # out: [min, max] of the finite values (inf, -inf when none)
        lo, hi = np.inf, -np.inf
        for i in range(x.size):
            v = np.float64(x[i])
            if v - v == 0.0:  # finite
                lo = min(lo, v)
                hi = max(hi, v)
        out[0], out[1] = lo, hi

    @njit(nogil=True, cache=True)
    def _range32(x, out):
        # _range of float32 x, through integer keys (2 threads: 0.59 -> 0.12 ns per element)
        m = np.int32(0x7FFFFFFF)
        e = np.int32(0x7F800000)
        kmin, kmax = _K32_MAX, _K32_MIN
        for i in range(x.size):
            v = _bits(x[i])
            k = v ^ ((v >> np.int32(31)) & m)
            fin = (v & e) != e
            kmin = min(kmin, k if fin else _K32_MAX)
            kmax = max(kmax, k if fin else _K32_MIN)
        out[0] = np.inf if kmin == _K32_MAX else np.float64(_from_bits(kmin ^ ((kmin >> np.int32(31)) & m)))
        out[1] = -np.inf if kmax == _K32_MIN else np.float64(_from_bits(kmax ^ ((kmax >> np.int32(31)) & m)))

    @njit(nogil=True, cache=True)
    def _range_diff_keys(a, b, out):
        # The finite range of the float64 differences a - b, the least nonzero |d| and the exact
        # zeros, through integer keys: out (int64) = the least and largest finite keys, the bits
        # of the least nonzero finite |d|, the count of zeros (sentinels where none);
        # _diff_range turns them back into floats (turned back here, after the loop, the loop
        # was no longer vectorised: 5x slower). 2 threads: 0.70 -> 0.23 ns per element.
        m = np.int64(0x7FFFFFFFFFFFFFFF)
        e = np.int64(0x7FF0000000000000)
        kmin, kmax, least = _K64_MAX, _K64_MIN, _K64_MAX
        zeros = 0
        for i in range(a.size):
            v = _bits64(np.float64(a[i]) - np.float64(b[i]))
            k = v ^ ((v >> np.int64(63)) & m)
            fin = (v & e) != e
            kmin = min(kmin, k if fin else _K64_MAX)
            kmax = max(kmax, k if fin else _K64_MIN)
            mag = v & m  # |d|'s bits: 0 for a zero of either sign, finite
            z = mag == 0
            zeros += np.int64(z)
            # (two selects: one on `fin and not z` made a branch, and the loop 3x slower)
            cand = mag if fin else _K64_MAX
            least = min(least, _K64_MAX if z else cand)
        out[0] = kmin
        out[1] = kmax
        out[2] = least
        out[3] = zeros

    @njit(nogil=True, cache=True)
    def _absdiff(a, b, out):
        # |a - b| in float64 into out (a piece of a log histogram's input)
        for i in range(a.size):
            out[i] = abs(np.float64(a[i]) - np.float64(b[i]))

    @njit(nogil=True, cache=True)
    def _levels(codes, counts):
        # four interleaved tables: runs of one level (a saturated group) do not wait on each
        # other's increments
        n = codes.size
        m = n - n % 4
        for i in range(0, m, 4):
            counts[0, codes[i]] += 1
            counts[1, codes[i + 1]] += 1
            counts[2, codes[i + 2]] += 1
            counts[3, codes[i + 3]] += 1
        for i in range(m, n):
            counts[0, codes[i]] += 1

    @njit(nogil=True, cache=True)
    def _group_sums(w, wh, gidx, num, den):
        # per row r and group g: num += (wh - w)^2, den += w^2 over the columns c with gidx[c] == g
        for r in range(w.shape[0]):
            for c in range(w.shape[1]):
                x = np.float64(w[r, c])
                d = np.float64(wh[r, c]) - x
                g = gidx[c]
                num[r, g] += d * d
                den[r, g] += x * x

    @njit(nogil=True, cache=True)
    def _group_sums_runs(w, wh, starts, gid, num, den):
        # as _group_sums where the columns come in runs of one group (starts[k]..starts[k + 1]
        # in group gid[k]): each run summed in registers, four lanes of each sum, then added to
        # its cell once. _group_sums added every element into its cell in memory, each add
        # waiting on the one before (the same cell): 1.6 ns per element.
        for r in range(w.shape[0]):
            wr = w[r]
            hr = wh[r]
            for k in range(gid.size):
                s0, s1 = starts[k], starts[k + 1]
                a0 = a1 = a2 = a3 = 0.0
                b0 = b1 = b2 = b3 = 0.0
                c = s0
                while c + 4 <= s1:
                    x0, x1, x2, x3 = (np.float64(wr[c]), np.float64(wr[c + 1]), np.float64(wr[c + 2]),
                                      np.float64(wr[c + 3]))
                    d0, d1 = np.float64(hr[c]) - x0, np.float64(hr[c + 1]) - x1
                    d2, d3 = np.float64(hr[c + 2]) - x2, np.float64(hr[c + 3]) - x3
                    a0 += d0 * d0
                    a1 += d1 * d1
                    a2 += d2 * d2
                    a3 += d3 * d3
                    b0 += x0 * x0
                    b1 += x1 * x1
                    b2 += x2 * x2
                    b3 += x3 * x3
                    c += 4
                while c < s1:
                    x0 = np.float64(wr[c])
                    d0 = np.float64(hr[c]) - x0
                    a0 += d0 * d0
                    b0 += x0 * x0
                    c += 1
                g = gid[k]
                num[r, g] += (a0 + a1) + (a2 + a3)
                den[r, g] += (b0 + b1) + (b2 + b3)


def _flat(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x).reshape(-1)


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both flat, of one size (the kernels index b by a's positions, unchecked)."""
    a, b = _flat(a), _flat(b)
    if a.size != b.size:
        raise ValueError(f"sizes differ: {a.size} and {b.size}")
    return a, b


def _diff_range(keys: np.ndarray) -> tuple[float, float, float, int]:
    """_range_diff_keys' keys as (min, max, least nonzero |d|, exact zeros)."""
    kmin, kmax, least, zeros = (int(k) for k in keys)
    mx, mn = int(_K64_MAX), int(_K64_MIN)

    def value(k: int) -> float:  # a key's float64: its magnitude bits flipped back where negative
        k = np.int64(k)
        return float(np.array([k ^ ((k >> np.int64(63)) & _K64_MAX)], np.int64).view(np.float64)[0])
    return (np.inf if kmin == mx else value(kmin), -np.inf if kmax == mn else value(kmax),
            np.inf if least == mx else value(least), zeros)


def finite_range(a: np.ndarray, b: np.ndarray | None = None) -> tuple[float, float, float, int]:
    """``(min, max, least nonzero |v|, exact zeros)`` of the finite values ``v`` of ``a`` (or of
    ``a - b`` in float64); the last two only for a difference (inf, 0 otherwise). Needs numba."""
    a, b = (_flat(a), None) if b is None else _pair(a, b)
    if b is None:
        values = _range32 if a.dtype == np.float32 else _range

        def one(i0, i1):
            out = np.empty(2)
            values(a[i0:i1], out)
            return out[0], out[1], np.inf, 0
    else:
        def one(i0, i1):
            out = np.empty(4, np.int64)
            _range_diff_keys(a[i0:i1], b[i0:i1], out)
            return _diff_range(out)
    parts = map_pieces(one, a.size, PIECE)
    return (min(p[0] for p in parts), max(p[1] for p in parts), min(p[2] for p in parts), sum(p[3] for p in parts))


def counts(a: np.ndarray, edges: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Exact counts of ``a`` (or of ``a - b`` in float64) in the uniform bins ``edges``, as
    ``np.histogram(values, edges)`` gives them; NaN, inf and values beyond the edges in none.
    Needs numba."""
    a, b = (_flat(a), None) if b is None else _pair(a, b)
    edges = np.ascontiguousarray(edges, np.float64)

    def one(i0, i1):
        c = np.zeros(edges.size, np.int64)  # (the last: outside the edges)
        _count(a[i0:i1], a[i0:i1] if b is None else b[i0:i1], b is not None, a.dtype == np.float32, edges, c)
        return c
    return sum(map_pieces(one, a.size, PIECE))[:-1]


def log_abs_counts(a: np.ndarray, b: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Exact counts of ``log10 |a - b|`` (float64, nonzero finite differences) in ``edges``, as
    ``np.histogram(np.log10(d[d > 0]), edges)`` gives them: the logarithm is numpy's, taken piece
    by piece. Needs numba."""
    a, b = _pair(a, b)
    edges = np.ascontiguousarray(edges, np.float64)

    def one(i0, i1):
        c = np.zeros(edges.size, np.int64)  # (the last: outside the edges)
        buf = np.empty(min(i1 - i0, 1 << 18))
        for j0 in range(i0, i1, buf.size):
            j1 = min(i1, j0 + buf.size)
            d = buf[:j1 - j0]
            _absdiff(a[j0:j1], b[j0:j1], d)
            # in place, no mask: log10 of 0 is -inf and of inf inf, NaN stays NaN, and the
            # count takes none of them (the mask and its compress cost more than the logarithm)
            with np.errstate(divide="ignore", invalid="ignore"):
                np.log10(d, out=d)
            _count(d, d, False, False, edges, c)
        return c
    return sum(map_pieces(one, a.size, PIECE))[:-1]


def group_sums(w: np.ndarray, wh: np.ndarray, gidx: np.ndarray, ng: int) -> tuple[np.ndarray, np.ndarray]:
    """``(Σ (wh - w)², Σ w²)`` in float64 per row and group ``[rows, ng]`` of 2-D float ``w`` and
    ``wh``, column ``c`` in group ``gidx[c]``. Needs numba."""
    w, wh = np.ascontiguousarray(w), np.ascontiguousarray(wh)
    gidx = np.ascontiguousarray(gidx, np.int64)
    if w.shape != wh.shape or w.ndim != 2 or gidx.shape != (w.shape[1],) or (gidx.size and not 0 <= gidx.min()
                                                                               <= gidx.max() < ng):
        raise ValueError(f"shapes {w.shape}, {wh.shape} and group index {gidx.shape} (of {ng} groups) do not fit")
    num = np.zeros((w.shape[0], ng))
    den = np.zeros_like(num)
    rows = max(1, PIECE // max(1, w.shape[1]))
    # runs of columns in one group (every grouped layout but act-order's scattered g_idx): summed
    # run by run; runs of a few columns (act-order) element by element into the cells
    starts = np.flatnonzero(np.diff(gidx)) + 1 if gidx.size else np.zeros(0, np.int64)
    if gidx.size and starts.size + 1 <= gidx.size // 8:
        starts = np.concatenate([[0], starts, [gidx.size]]).astype(np.int64)
        gid = gidx[starts[:-1]]

        def one(r0, r1):
            _group_sums_runs(w[r0:r1], wh[r0:r1], starts, gid, num[r0:r1], den[r0:r1])
    else:
        def one(r0, r1):
            _group_sums(w[r0:r1], wh[r0:r1], gidx, num[r0:r1], den[r0:r1])
    map_pieces(one, w.shape[0], rows)
    return num, den


def level_counts(codes: np.ndarray, levels: int) -> np.ndarray:
    """``np.bincount(codes, minlength=levels)[:levels]`` of unsigned 8-bit codes (every code below
    256), in one compiled pass on all cores (numpy's widens each code to 64 bits first). Needs
    numba."""
    c = _flat(codes)

    def one(i0, i1):
        t = np.zeros((4, 256), np.int64)
        _levels(c[i0:i1], t)
        return t.sum(0)
    return sum(map_pieces(one, c.size, PIECE))[:levels]
