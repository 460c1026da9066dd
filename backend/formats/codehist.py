"""Exact histograms of a quantized layer's decoded values, counted from its codes.

Every value an integer-coded layer decodes to is its group's value of its code: MLX affine
``round(round(s*q) + b)`` (the roundings in the scale dtype), GPTQ and AWQ ``s*q + (-(s*z))`` in
float32, compressed-tensors ``(q - z) * s``. A group of 64 or 128 codes holds at most 16
distinct values (4-bit), so a histogram of the decoded layer is the histogram of each group's 16
values weighted by how often the group uses each code: the codes are counted per group straight
from the packed words (half a byte per weight read, where a histogram of the decoded layer reads
four and must first find its range), and each group's values are computed with the decoders'
own arithmetic (MLX's roundings through the same helpers of :mod:`.fast`), so the counts equal
``np.histogram`` of the decoded array exactly.

:class:`GroupValues` holds the per-group code counts ``[T, L]`` with each group's scale, bias
and rounding mode; its :meth:`~GroupValues.finite_range` and :meth:`~GroupValues.histogram` are
what :func:`~quantscope.backend.metrics.bulk_histograms` takes of an array. :func:`mlx_affine`,
:func:`gptq`, :func:`awq_gemm` and :func:`ct_pack` build it (through the format modules and
:func:`~quantscope.backend.engines.group_values`) where there is a kernel here: codes of 2 or 4
bits in groups of at least twice as many codes as levels and at most :data:`MOST` codes (8-bit
codes have about as many levels as a group has weights: counting them gains nothing); None
otherwise, and the caller takes the histograms of the decoded array instead.
:class:`PatternValues` does the same for a bf16 or fp16 tensor (a dense reference), per bit
pattern.

Measured (``benchmarks/bench_histogram.py``: a 58.7M-weight ``down_proj``): the value view's
histograms of a GPTQ or AWQ variant take 0.6-1.0x the layer's dequantization and of an MLX
variant (groups of 64, so twice the values per weight) about 1.0x, where those of the decoded
layer took 1.2-1.6x; the bf16 reference's 0.73x its decode. Counting the codes is the most of
it, one increment per weight.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from .fast import AVAILABLE, BF16, F32, _mode
from .kernel import map_pieces, workers

#: The most codes a group may hold: counts are 8-bit. Larger groups (GPTQ's one group over all
#: of K, a compressed-tensors channel) take the decoded array's histogram: 16-bit counts would
#: double the kernels' signatures, and the first run's compilation with them (4.5 -> 8.9 s).
MOST = 255

#: A group's values as compressed-tensors decodes them: ``(q - bias) * scale``, one float32
#: rounding (the bias the code of a real zero); the others are :mod:`.fast`'s modes (MLX's
#: roundings, and F32: ``q * scale + bias``, two).
OFFSET = 3

#: Groups per piece of the value passes; word columns (GPTQ, AWQ) or rows (MLX) per piece of the
#: counting passes: a piece's counts stay in L2.
GROUP_PIECE = 1 << 15
COL_PIECE = 1024
ROW_PIECE = 512
#: 16-bit values per piece of the pattern count.
PATTERN_PIECE = 1 << 23
#: Groups whose values are computed at once (then binned, vectorised).
CHUNK = 256

if AVAILABLE:
    from numba import njit

    from .fast import _bits, _from_bits, _rbf16, _round_row
    from .histo import _bin_plan, _bin_values, _flush

    # The increments of one group's codes wait on each other where a code repeats (its
    # counter's store, then its load): the counting kernels take four groups' codes in turn,
    # whose counters differ (MLX rows, GPTQ outputs: 0.64 -> 0.38 ns per code on one core).
    # Index arithmetic is unsigned: with signed, numba's wraparound checks halved their speed.

    @njit(nogil=True, cache=True, inline="always")
    def _count4(cf, a0, a1, a2, a3, x0, x1, x2, x3, per, bits, mask):
        # the codes of words x0..x3 (four groups') into their counts at cf[a0..a3 + code], one
        # field of each in turn
        for j in range(per):
            sh = np.uint32(bits * j)
            cf[a0 + np.uint64((x0 >> sh) & mask)] += 1
            cf[a1 + np.uint64((x1 >> sh) & mask)] += 1
            cf[a2 + np.uint64((x2 >> sh) & mask)] += 1
            cf[a3 + np.uint64((x3 >> sh) & mask)] += 1

    @njit(nogil=True, cache=True)
    def _count_rows(wd, bits, wpg, counts):
        # MLX affine: wd uint32 [rows, K*bits/32], LSB-first codes, a group = wpg whole words;
        # counts [rows * groups, L] (group t = r * groups + g). Four rows at a time.
        per = 32 // bits
        mask = np.uint32((1 << bits) - 1)
        ng = wd.shape[1] // wpg
        L = np.uint64(counts.shape[1])
        step = np.uint64(ng) * L  # (from a row's group to the next row's)
        cf = counts.reshape(-1)
        R = wd.shape[0]
        R4 = R - R % 4
        for r in range(0, R4, 4):
            w0, w1, w2, w3 = wd[r], wd[r + 1], wd[r + 2], wd[r + 3]
            for g in range(ng):
                a0 = np.uint64(r * ng + g) * L
                a1 = a0 + step
                a2 = a1 + step
                a3 = a2 + step
                for q in range(g * wpg, (g + 1) * wpg):
                    _count4(cf, a0, a1, a2, a3, w0[q], w1[q], w2[q], w3[q], per, bits, mask)
        for r in range(R4, R):
            wr = wd[r]
            for g in range(ng):
                a0 = np.uint64(r * ng + g) * L
                for q in range(g * wpg, (g + 1) * wpg):
                    x0 = wr[q]
                    for j in range(per):
                        cf[a0 + np.uint64((x0 >> np.uint32(bits * j)) & mask)] += 1

    @njit(nogil=True, cache=True)
    def _count_gptq(qw, bits, gi, c0, c1, o0, counts):
        # GPTQ: qw uint32 [K*bits/32, N] packed down K (code of input k, output n: word
        # [k // per, n], field k % per); input k is in group gi[k] (act-order or not); output
        # n's counts in counts[g, n - o0] ([groups, outputs, L]), for outputs [c0, c1). Where
        # each word's codes are in one group, four outputs' words at a time; else field by
        # field (each field's increments go to different outputs).
        per = 32 // bits
        mask = np.uint32((1 << bits) - 1)
        L = np.uint64(counts.shape[2])
        W = np.uint64(counts.shape[1])
        cf = counts.reshape(-1)[(c0 - o0) * counts.shape[2]:]
        trivial = True
        for r in range(qw.shape[0]):
            for j in range(1, per):
                trivial &= gi[r * per + j] == gi[r * per]
        for r in range(qw.shape[0]):
            qr = qw[r, c0:c1]
            if trivial:
                at0 = np.uint64(gi[r * per]) * W * L
                n4 = qr.size - qr.size % 4
                for n in range(0, n4, 4):
                    a0 = at0 + np.uint64(n) * L
                    _count4(cf, a0, a0 + L, a0 + np.uint64(2) * L, a0 + np.uint64(3) * L, qr[n], qr[n + 1],
                            qr[n + 2], qr[n + 3], per, bits, mask)
                for n in range(n4, qr.size):
                    w = qr[n]
                    at = at0 + np.uint64(n) * L
                    for j in range(per):
                        cf[at + np.uint64((w >> np.uint32(bits * j)) & mask)] += 1
            else:
                for j in range(per):
                    at0 = np.uint64(gi[r * per + j]) * W * L
                    sh = np.uint32(bits * j)
                    for n in range(qr.size):
                        cf[at0 + np.uint64(n) * L + np.uint64((qr[n] >> sh) & mask)] += 1

    @njit(nogil=True, cache=True)
    def _count_awq(qw, shifts, group, c0, c1, o0, counts):
        # AWQ GEMM 4-bit: qw uint32 [K, N/8], word column c holds outputs 8c..8c+7 (output 8c+j
        # at shift shifts[j]); input k in group k // group; output n's counts in
        # counts[g, n - o0] ([groups, outputs, 16]). Word columns [c0, c1).
        W = np.uint64(counts.shape[1])
        cf = counts.reshape(-1)[(8 * c0 - o0) * 16:]
        for k in range(qw.shape[0]):
            qr = qw[k, c0:c1]
            at0 = np.uint64(k // group) * W * np.uint64(16)
            for c in range(qr.size):
                w = qr[c]
                at = at0 + np.uint64(128 * c)
                for j in range(8):
                    cf[at + np.uint64(16 * j) + np.uint64((w >> shifts[j]) & np.uint32(15))] += 1

    @njit(nogil=True, cache=True)
    def _count_patterns(u, t0, t1):
        # how often each 16-bit pattern occurs in u, into two tables taken in turn (a run of one
        # pattern, common in bf16 weights, does not wait on its own increments)
        n = u.size - u.size % 2
        for i in range(0, n, 2):
            t0[u[i]] += 1
            t1[u[i + 1]] += 1
        if n < u.size:
            t0[u[n]] += 1

    # (the helpers below are called, not inlined at numba's level: inlined in each of their uses,
    # with every rounding mode's branch, they took _group_range 4 s to compile)

    @njit(nogil=True, cache=True)
    def _code_values(sc, bc, mode, codes, row):
        # row[i]: the value of code codes[i] in the group of scale sc[i] and bias bc[i], exactly as
        # the row decoders compute it (fast._words_to and the kernels around it: the float32
        # product and sum, no fused multiply-add; MLX's roundings in the scale dtype, with the
        # same helper). Across groups, so that it vectorises over their scales and biases
        # (group by group, each group's codes: 0.27 against 0.06 ns per value).
        if mode == F32:
            for i in range(row.size):
                row[i] = codes[i] * sc[i] + bc[i]
        elif mode == OFFSET:  # (bc: the code of a real zero, an integer: q - bc is exact)
            for i in range(row.size):
                row[i] = (codes[i] - bc[i]) * sc[i]
        elif mode == BF16:  # (fast._bf16_then_add's steps, one loop: three took twice its time)
            for i in range(row.size):
                p = _from_bits(np.int32(_rbf16(np.uint32(_bits(codes[i] * sc[i])))))
                row[i] = _from_bits(np.int32(_rbf16(np.uint32(_bits(p + bc[i])))))
        else:  # F16
            for i in range(row.size):
                row[i] = codes[i] * sc[i]
            _round_row(row, mode)
            for i in range(row.size):
                row[i] = row[i] + bc[i]
            _round_row(row, mode)

    @njit(nogil=True, cache=True)
    def _chunk_values(s, b, mode, t0, t1, L, qs, vals):
        # vals[q * CHUNK + t - t0]: the value of code q in group t, for t in [t0, t1)
        m = t1 - t0
        for q in range(L):
            qs[:m] = np.float32(q)
            _code_values(s[t0:t1], b[t0:t1], mode, qs[:m], vals[q * CHUNK:q * CHUNK + m])

    @njit(nogil=True, cache=True)
    def _used_range(ct, s, b, mode, one, v, out):
        # out[0], out[1] = min, max with the finite values of the codes group (ct, s, b) uses
        for q in range(ct.size):
            if ct[q]:
                one[0] = np.float32(q)
                _code_values(s, b, mode, one, v)
                x = np.float64(v[0])
                if x - x == 0.0:
                    out[0] = min(out[0], x)
                    out[1] = max(out[1], x)

    @njit(nogil=True, cache=True)
    def _group_range(counts, s, b, mode, out):
        # out = [least, largest] finite value of the codes the groups use (inf, -inf: none).
        # A group's values are monotone in the code (a product, a sum and roundings, each
        # monotone), so the values of its first and last codes bound them: computed across a
        # chunk of groups (vectorised), and only a group whose bounds reach beyond the extremes
        # found so far is looked at code by code (its used codes). Most groups use both end
        # codes, so few are. An infinite bound (a scale whose upper codes overflow) always
        # reaches beyond; a NaN one comes only from a NaN scale or bias, an infinite scale or an
        # infinite bias with an overflowing product, where no code's value is finite.
        T, L = counts.shape
        qa = np.zeros(CHUNK, np.float32)
        qz = np.full(CHUNK, np.float32(L - 1))
        va = np.empty(CHUNK, np.float32)
        vz = np.empty(CHUNK, np.float32)
        one = np.empty(1, np.float32)
        v = np.empty(1, np.float32)
        out[0], out[1] = np.inf, -np.inf
        for t0 in range(0, T, CHUNK):
            t1 = min(T, t0 + CHUNK)
            m = t1 - t0
            _code_values(s[t0:t1], b[t0:t1], mode, qa[:m], va[:m])
            _code_values(s[t0:t1], b[t0:t1], mode, qz[:m], vz[:m])
            for i in range(m):
                x0, x1 = np.float64(va[i]), np.float64(vz[i])
                lo, hi = min(x0, x1), max(x0, x1)
                if lo < out[0] or hi > out[1]:
                    t = t0 + i
                    _used_range(counts[t], s[t:t + 1], b[t:t + 1], mode, one, v, out)

    @njit(nogil=True, cache=True)
    def _group_count(counts, s, b, mode, edges, hist, local):
        # hist[j] += how many of the groups' values lie in bin j of the uniform edges (hist has
        # one more entry, for NaN, inf, values beyond the edges and those next to an edge),
        # binned as np.histogram bins them (histo._count's index loops: the arithmetic
        # position, and next to an edge one step against the edges themselves); each value
        # weighted by its code's count. Chunk by chunk of groups: their values, their bins
        # (vectorised), the adds, into ``local`` (uint32, half the cache lines of int64: the
        # table of 16k bins stays in L2) added to hist before it can overflow.
        T, L = counts.shape
        plan, plan32 = _bin_plan(edges, True)
        nb = plan[0]
        vals = np.empty(CHUNK * L, np.float32)
        idx = np.empty(CHUNK * L, np.int32)
        qs = np.empty(CHUNK, np.float32)
        held = 0
        for t0 in range(0, T, CHUNK):
            t1 = min(T, t0 + CHUNK)
            m = t1 - t0
            _chunk_values(s, b, mode, t0, t1, L, qs, vals)  # (code-major: vals[q * CHUNK + t])
            _bin_values(vals, plan, plan32, idx)
            for t in range(m):
                ct = counts[t0 + t]
                for q in range(L):
                    j = idx[q * CHUNK + t]
                    c = ct[q]
                    if j >= 0:
                        local[j] += np.uint32(c)
                    elif c:  # next to an edge: np.histogram's one step, against the edges
                        j = -1 - j
                        x = np.float64(vals[q * CHUNK + t])
                        if x < edges[j]:
                            j -= 1
                        elif j < nb - 1 and x >= edges[j + 1]:
                            j += 1
                        hist[j] += c
            held += m
            if held >= 32768:  # (a group adds at most MOST to a bin: far from 2**32 in 32768 groups)
                _flush(local, hist)
                held = 0
        _flush(local, hist)


class GroupValues:
    """A quantized layer's decoded values as code counts per group and each group's affine.

    ``counts`` ``[T, L]``: how often group ``t`` uses code ``q``; the value of code ``q`` in
    group ``t`` is the decoders' ``(q, scale[t], bias[t])`` in rounding ``mode``. ``size`` is the
    number of values (the layer's weights).
    """

    def __init__(self, counts: np.ndarray, scale: np.ndarray, bias: np.ndarray, mode: int, size: int) -> None:
        self.counts = counts.reshape(-1, counts.shape[-1])
        # (writable: a checkpoint's read-only float32 scales would be another compiled signature)
        self.scale = np.require(scale, np.float32, ["C", "W"]).reshape(-1)
        self.bias = np.require(bias, np.float32, ["C", "W"]).reshape(-1)
        if not (self.scale.size == self.bias.size == self.counts.shape[0]):
            raise ValueError(f"{self.counts.shape[0]} groups of counts, {self.scale.size} scales, "
                             f"{self.bias.size} biases")
        self.mode = mode
        self.size = size

    def _pieces(self, fn) -> list:
        return map_pieces(fn, self.counts.shape[0], GROUP_PIECE)

    def finite_range(self) -> tuple[float, float]:
        """(least, largest) finite value (inf, -inf when there is none)."""
        def one(t0, t1):
            out = np.empty(2)  # (set by the kernel)
            _group_range(self.counts[t0:t1], self.scale[t0:t1], self.bias[t0:t1], self.mode, out)
            return out
        parts = self._pieces(one)
        return min(float(p[0]) for p in parts), max(float(p[1]) for p in parts)

    def histogram(self, edges: np.ndarray) -> np.ndarray:
        """Exact counts in the uniform bins ``edges`` (``np.histogram`` of the decoded values)."""
        edges = np.ascontiguousarray(edges, np.float64)
        if not (edges.size >= 2 and math.isfinite(edges[0]) and math.isfinite(edges[-1]) and edges[-1] > edges[0]):
            raise ValueError("histogram edges must be finite and increasing")

        def one(t0, t1):
            h = np.zeros(edges.size, np.int64)  # (the last: beyond the edges)
            _group_count(self.counts[t0:t1], self.scale[t0:t1], self.bias[t0:t1], self.mode, edges, h,
                         np.zeros(edges.size, np.uint32))
            return h
        return sum(self._pieces(one))[:-1]


class PatternValues:
    """A 16-bit float tensor's values (bf16 or fp16: a dense reference layer) as how often each
    bit pattern occurs: one increment per weight read as stored (two bytes), no range pass, and
    its histogram that of its few thousand distinct values weighted by their counts — equal to
    ``np.histogram`` of the tensor as float32 (every bf16 and fp16 value is exact in float32)."""

    def __init__(self, stored: np.ndarray) -> None:
        u = np.ascontiguousarray(stored).reshape(-1).view(np.uint16)

        def one(a, b):
            t0, t1 = np.zeros(1 << 16, np.int64), np.zeros(1 << 16, np.int64)
            _count_patterns(u[a:b], t0, t1)
            return t0 + t1
        counts = sum(map_pieces(one, u.size, PATTERN_PIECE))
        with np.errstate(invalid="ignore"):  # (ml_dtypes warns casting bf16 NaN)
            values = np.arange(1 << 16, dtype=np.uint16).view(stored.dtype).astype(np.float64)
        keep = (counts > 0) & np.isfinite(values)
        self.values, self.weights = values[keep], counts[keep]
        self.size = int(u.size)

    def finite_range(self) -> tuple[float, float]:
        """(least, largest) finite value (inf, -inf when there is none)."""
        if not self.values.size:
            return math.inf, -math.inf
        return float(self.values.min()), float(self.values.max())

    def histogram(self, edges: np.ndarray) -> np.ndarray:
        """Exact counts in the uniform bins ``edges`` (``np.histogram`` of the values)."""
        # (np.histogram bins the weighted values as it would bin the values themselves; the
        # weights, integers below 2**53, are summed exactly in float64)
        h = np.histogram(self.values, np.asarray(edges, np.float64), weights=self.weights.astype(np.float64))[0]
        return np.rint(h).astype(np.int64)


#: The values held as counts (of codes per group, of bit patterns): what :mod:`..metrics` takes as
#: an array, through their ``finite_range`` and ``histogram``.
COUNTED = (GroupValues, PatternValues)


def pattern_values(stored: np.ndarray) -> PatternValues | None:
    """:class:`PatternValues` of a bf16 or fp16 array, or None for other dtypes (or without
    numba)."""
    import ml_dtypes
    if not AVAILABLE or stored.dtype not in (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)):
        return None
    return PatternValues(stored)


def _col_piece(n: int, unit: int) -> int:
    """Columns per piece of ``n`` word columns (``unit`` outputs each): one piece per worker, each
    reading the packed rows' stretch of its columns row after row (narrow pieces re-read each
    packed row from memory), of at least :data:`COL_PIECE` outputs."""
    k = max(1, min(workers(), n * unit // COL_PIECE))
    return -(-n // k)


def mlx_affine(weight: np.ndarray, s32: np.ndarray, b32: np.ndarray, sdtype, bits: int, group: int,
               r0: int = 0, r1: int | None = None) -> GroupValues | None:
    """:class:`GroupValues` of flattened rows ``[r0, r1)`` of an MLX affine layer (``weight``
    uint32 ``[rows, K*bits/32]``, ``s32``/``b32`` float32 ``[rows, K/group]``, stored as
    ``sdtype``, whose roundings the values take), or None where there is no kernel for it."""
    mode = _mode(sdtype)
    if mode < 0:
        return None
    r1 = weight.shape[0] if r1 is None else r1
    return _row_groups(weight, bits, group, r0, r1, s32[r0:r1], b32[r0:r1], mode)


def ct_pack(weight: np.ndarray, bits: int, group: int, scales: np.ndarray, offsets: np.ndarray,
            r0: int = 0, r1: int | None = None) -> GroupValues | None:
    """:class:`GroupValues` of rows ``[r0, r1)`` of a compressed-tensors ``pack-quantized`` layer
    (``weight`` int32 ``[rows, K*bits/32]``, LSB-first codes; ``scales`` float32 and ``offsets``
    — the code of a real zero: 2^(b-1) plus the zero point — ``[rows, K/group]``), or None where
    there is no kernel for it."""
    r1 = weight.shape[0] if r1 is None else r1
    return _row_groups(weight, bits, group, r0, r1, np.asarray(scales[r0:r1], np.float32),
                       np.asarray(offsets[r0:r1], np.float32), OFFSET)


def _row_groups(weight, bits, group, r0, r1, s32, b32, mode) -> GroupValues | None:
    """Rows of LSB-first codes in whole 32-bit words, a group a run of whole words (MLX affine,
    compressed-tensors): their codes counted per group."""
    per = 32 // bits if bits in (2, 4) else 0
    if (not AVAILABLE or not per or group % per or weight.dtype.itemsize != 4 or weight.shape[-1] * per % group
            or not 2 * (1 << bits) <= group <= MOST or sys.byteorder != "little"):
        return None
    wd = np.ascontiguousarray(weight[r0:r1]).view(np.uint32)
    ng = wd.shape[1] * per // group
    if s32.shape != (r1 - r0, ng) or b32.shape != s32.shape:
        return None
    counts = np.zeros(((r1 - r0) * ng, 1 << bits), np.uint8)
    wpg = group // per
    map_pieces(lambda a, b: _count_rows(wd[a:b], bits, wpg, counts[a * ng:b * ng]), r1 - r0, ROW_PIECE)
    return GroupValues(counts, s32, b32, mode, (r1 - r0) * ng * group)


def gptq(qweight: np.ndarray, s32: np.ndarray, z32: np.ndarray, g_idx: np.ndarray, bits: int,
         n0: int = 0, n1: int | None = None) -> GroupValues | None:
    """:class:`GroupValues` of outputs ``[n0, n1)`` of a GPTQ layer (``qweight`` ``[K*bits/32, N]``,
    ``s32``/``z32`` float32 ``[groups, N]``, the zero points unpacked, ``g_idx`` int ``[K]``:
    each input's group), or None where there is no kernel for it."""
    if (not AVAILABLE or bits not in (2, 4) or qweight.dtype.itemsize != 4
            or 2 * (1 << bits) * s32.shape[0] > qweight.shape[0] * (32 // bits)):  # (groups of 8+ codes)
        return None
    n1 = qweight.shape[1] if n1 is None else n1
    qw = np.ascontiguousarray(qweight).view(np.uint32)
    gi = np.ascontiguousarray(g_idx, np.int64)
    ng = s32.shape[0]
    if np.bincount(gi, minlength=ng).max(initial=0) > MOST:
        return None
    counts = np.zeros((ng, n1 - n0, 1 << bits), np.uint8)
    # (each piece its own outputs' counts)
    map_pieces(lambda a, b: _count_gptq(qw, bits, gi, n0 + a, n0 + b, n0, counts), n1 - n0, _col_piece(n1 - n0, 1))
    s = np.ascontiguousarray(s32[:, n0:n1])
    return GroupValues(counts, s, -(s * z32[:, n0:n1]), F32, gi.size * (n1 - n0))


def awq_gemm(qweight: np.ndarray, s32: np.ndarray, z32: np.ndarray, group: int, shifts: np.ndarray,
             n0: int = 0, n1: int | None = None) -> GroupValues | None:
    """:class:`GroupValues` of outputs ``[n0, n1)`` (multiples of 8) of an AWQ GEMM layer
    (``qweight`` ``[K, N/8]``, ``s32``/``z32`` float32 ``[groups, N]`` in logical column order),
    or None where there is no kernel for it."""
    n1 = qweight.shape[1] * 8 if n1 is None else n1
    if not AVAILABLE or qweight.dtype.itemsize != 4 or n0 % 8 or n1 % 8 or not 32 <= group <= MOST:
        return None
    qw = np.ascontiguousarray(qweight).view(np.uint32)
    ng = s32.shape[0]
    sh = np.ascontiguousarray(shifts, np.uint32)
    counts = np.zeros((ng, n1 - n0, 16), np.uint8)
    w = (n1 - n0) // 8
    map_pieces(lambda a, b: _count_awq(qw, sh, group, n0 // 8 + a, n0 // 8 + b, n0, counts), w, _col_piece(w, 8))
    s = np.ascontiguousarray(s32[:, n0:n1])
    return GroupValues(counts, s, -(s * z32[:, n0:n1]), F32, qw.shape[0] * (n1 - n0))
