"""Compiled (numba) kernels for the hottest decoders, used by the numpy engine when numba is
installed; the vectorised numpy code in the format modules is the fallback and the reference.

numpy needs 5-8 passes over each block to dequantize (unpack, scale, MLX's two roundings) where a
compiled loop needs one; bench_dequant measured the numpy path at 4-11x the time of copying the
output, these kernels at about the copy's own cost. Every kernel computes exactly what its numpy
twin computes (no fast-math, so no fused multiply-add): tests compare both with the formats'
reference values.
"""

from __future__ import annotations

import os

import numpy as np

try:  # numba is optional: without it (or with QUANTSCOPE_NO_NUMBA=1) the numpy path runs
    if os.environ.get("QUANTSCOPE_NO_NUMBA"):
        raise ImportError("disabled by QUANTSCOPE_NO_NUMBA")
    from numba import njit
    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised where numba is absent
    AVAILABLE = False

#: Rounding modes of the kernels: none (float32), to bfloat16, to float16.
F32, BF16, F16 = 0, 1, 2

if AVAILABLE:
    @njit(cache=True, inline="always")
    def _round_row(row, mode):
        # Same bit operations as kernel.round_inplace (round half to even).
        if mode == BF16:
            u = row.view(np.uint32)
            for i in range(u.size):
                x = np.uint64(u[i])
                u[i] = np.uint32((x + np.uint64(0x7FFF) + ((x >> np.uint64(16)) & np.uint64(1)))
                                 & np.uint64(0xFFFF0000))
        elif mode == F16:
            u = row.view(np.uint32)
            for i in range(u.size):
                v = row[i]
                a = abs(v)
                if a < np.float32(6.103515625e-05):  # 2**-14: fp16 subnormal step 2**-24
                    r = (a + np.float32(0.5)) - np.float32(0.5)
                    row[i] = r if v >= 0 else -r
                elif a > np.float32(65504.0):
                    row[i] = np.float32(np.inf) if v > 0 else np.float32(-np.inf)
                else:
                    x = np.uint64(u[i])
                    u[i] = np.uint32((x + np.uint64(0xFFF) + ((x >> np.uint64(13)) & np.uint64(1)))
                                     & np.uint64(0xFFFFE000))

    @njit(cache=True, inline="always")
    def _code(by, k, bits, mask):
        p = k * bits
        i = p >> 3
        sh = p & 7
        v = np.int64(by[i]) >> sh
        if sh + bits > 8:
            v |= np.int64(by[i + 1]) << (8 - sh)
            if sh + bits > 16:
                v |= np.int64(by[i + 2]) << (16 - sh)
        return v & mask

    @njit(nogil=True, cache=True)
    def _mlx_affine(by, s, b, bits, group, k, mode, out, r0, r1):
        mask = (1 << bits) - 1
        ng = k // group
        for r in range(r0, r1):
            row = out[r]
            brow = by[r]
            for g in range(ng):
                sg = s[r, g]
                base = g * group
                if bits == 4:  # two codes per byte, low nibble first
                    b0 = base >> 1
                    for i in range(group >> 1):
                        v = brow[b0 + i]
                        row[base + 2 * i] = np.float32(v & 15) * sg
                        row[base + 2 * i + 1] = np.float32(v >> 4) * sg
                elif bits == 8:
                    for i in range(group):
                        row[base + i] = np.float32(brow[base + i]) * sg
                else:
                    for i in range(group):
                        row[base + i] = np.float32(_code(brow, base + i, bits, mask)) * sg
                # Per group, while it is in L1: MLX rounds s*q to the scale dtype, then the sum.
                bg = b[r, g]
                seg = row[base:base + group]
                _round_row(seg, mode)
                for i in range(group):
                    seg[i] = seg[i] + bg
                _round_row(seg, mode)

    @njit(nogil=True, cache=True)
    def _gptq(qw, s_t, bias_t, g_idx, trivial_group, bits, out, r0, r1):
        # qw: uint32 [K*b/32, N] packed along K; out: float32 [N, K]. Sub-blocks of 16 output
        # rows read 64 contiguous bytes of each packed row.
        per = 32 // bits
        mask = np.uint32((1 << bits) - 1)
        for n0 in range(r0, r1, 16):
            n1 = min(r1, n0 + 16)
            # Column by column: each output row is written front to back; the 16 columns share
            # the packed rows' cache lines, which stay in L2 between them.
            for c in range(n0, n1):
                for r in range(qw.shape[0]):
                    k0 = r * per
                    gw = k0 // trivial_group if trivial_group > 0 else 0
                    w = qw[r, c]
                    # 2-D indexing: a row view per (word, column) costs more than the decode.
                    if trivial_group > 0:  # the word's codes share one group
                        sg = s_t[c, gw]
                        bg = bias_t[c, gw]
                        for i in range(per):
                            out[c, k0 + i] = np.float32(w & mask) * sg + bg
                            w = w >> np.uint32(bits)
                    else:                   # act-order: look the group up per input column
                        for i in range(per):
                            g = g_idx[k0 + i]
                            out[c, k0 + i] = np.float32(w & mask) * s_t[c, g] + bias_t[c, g]
                            w = w >> np.uint32(bits)

    @njit(nogil=True, cache=True)
    def _awq_gemm(qw, s_t, bias_t, group, shifts, out, c_lo, c_hi):
        # qw: uint32 [K, N/8]; word c holds output rows 8c..8c+7 (logical column j at shift
        # shifts[j]); out: float32 [N, K]. Word columns [c_lo, c_hi): copy them to a local
        # [C, K] buffer once, then write each output row sequentially.
        k = qw.shape[0]
        ng = k // group
        for c0 in range(c_lo, c_hi, 16):  # 16 words: one 64-byte line of each packed row
            c1 = min(c_hi, c0 + 16)
            local = np.empty((c1 - c0, k), np.uint32)
            for kk in range(k):
                for c in range(c0, c1):
                    local[c - c0, kk] = qw[kk, c]
            for c in range(c0, c1):
                words = local[c - c0]
                for j in range(8):
                    n = c * 8 + j
                    orow = out[n]
                    sh = shifts[j]
                    for g in range(ng):
                        sg = s_t[n, g]
                        bg = bias_t[n, g]
                        for kk in range(g * group, (g + 1) * group):
                            orow[kk] = np.float32((words[kk] >> sh) & np.uint32(0xF)) * sg + bg

    @njit(nogil=True, cache=True)
    def _block_float(by, sc, elem_table, scale_table, gscale, bits, group, k, out, r0, r1):
        ng = k // group
        for r in range(r0, r1):
            brow = by[r]
            orow = out[r]
            for g in range(ng):
                scale = scale_table[sc[r, g]]
                if gscale != np.float32(0.0):
                    scale = scale * gscale
                base = g * group
                if bits == 4:  # two E2M1 codes per byte, low nibble first
                    b0 = base >> 1
                    for i in range(group >> 1):
                        v = brow[b0 + i]
                        orow[base + 2 * i] = elem_table[v & 15] * scale
                        orow[base + 2 * i + 1] = elem_table[v >> 4] * scale
                else:
                    for i in range(group):
                        orow[base + i] = elem_table[brow[base + i]] * scale


def _mode(dtype) -> int:
    import ml_dtypes
    dt = np.dtype(dtype)
    if dt == np.float32:
        return F32
    if dt == np.dtype(ml_dtypes.bfloat16):
        return BF16
    if dt == np.float16:
        return F16
    return -1


def _rows(n_rows: int, row_elems: int, fn, align: int = 1) -> None:
    # Our own pool, not numba's threading layer: kernels release the GIL (nogil) and may be
    # called from several worker threads at once, which numba's default layer does not allow.
    from .kernel import for_row_blocks
    for_row_blocks(n_rows, row_elems, fn, align=align, min_rows=16)


def mlx_affine(by: np.ndarray, s32: np.ndarray, b32: np.ndarray, bits: int, group: int, k: int, sdtype,
               out: np.ndarray) -> bool:
    """MLX affine into ``out`` [rows, K]; False when this case has no kernel (use numpy)."""
    mode = _mode(sdtype)
    if not AVAILABLE or mode < 0 or bits > 8:
        return False
    by, s32, b32 = np.ascontiguousarray(by), np.ascontiguousarray(s32), np.ascontiguousarray(b32)
    _rows(out.shape[0], k, lambda r0, r1: _mlx_affine(by, s32, b32, bits, group, k, mode, out, r0, r1))
    return True


def gptq(qweight: np.ndarray, s_t: np.ndarray, bias_t: np.ndarray, g_idx: np.ndarray, bits: int,
         out: np.ndarray, trivial_group: int = 0) -> bool:
    """GPTQ (2/4/8-bit, any g_idx) into ``out`` [N, K]; False when there is no kernel."""
    if not AVAILABLE or bits not in (2, 4, 8) or qweight.dtype.itemsize != 4:
        return False
    qw = np.ascontiguousarray(qweight).view(np.uint32)
    k = out.shape[1]
    gi = np.ascontiguousarray(g_idx, np.int64)
    # Trivial g_idx with whole words per group: one group per packed word (no per-code lookup).
    per = 32 // bits
    tg = trivial_group if (trivial_group and trivial_group % per == 0) else 0
    _rows(out.shape[0], k, lambda r0, r1: _gptq(qw, s_t, bias_t, gi, tg, bits, out, r0, r1))
    return True


def awq_gemm(qweight: np.ndarray, s_t: np.ndarray, bias_t: np.ndarray, group: int, shifts: np.ndarray,
             out: np.ndarray) -> bool:
    """AWQ GEMM 4-bit into ``out`` [N, K]; False when there is no kernel."""
    if not AVAILABLE:
        return False
    qw = np.ascontiguousarray(qweight).view(np.uint32)
    sh = shifts.astype(np.uint32)
    _rows(out.shape[0], out.shape[1],
          lambda r0, r1: _awq_gemm(qw, s_t, bias_t, group, sh, out, r0 // 8, r1 // 8), align=8)
    return True


def block_float(by: np.ndarray, sc: np.ndarray, elem_table: np.ndarray, scale_table: np.ndarray,
                gscale: float | None, bits: int, group: int, k: int, out: np.ndarray) -> bool:
    """mxfp4 / mxfp8 / nvfp4 into ``out`` [rows, K]; False when there is no kernel."""
    if not AVAILABLE:
        return False
    by, sc = np.ascontiguousarray(by), np.ascontiguousarray(sc)
    g = np.float32(gscale or 0.0)
    _rows(out.shape[0], k,
          lambda r0, r1: _block_float(by, sc, elem_table, scale_table, g, bits, group, k, out, r0, r1))
    return True


# -- error statistics (compare) ----------------------------------------------------------------

if AVAILABLE:
    @njit(nogil=True, cache=True)
    def _stats(a, b, counts, want_counts):
        # Σd², ΣW², ΣW·d in float64 (two-level sums: per 4096 elements, then total) and max|d|;
        # bucket counts of |float32(b - a)| by its top 16 bits (metrics._keys).
        n = a.size
        sdd = 0.0
        sww = 0.0
        swd = 0.0
        mx = 0.0
        tmp = np.empty(4096, np.float32)
        tu = tmp.view(np.uint32)
        for j0 in range(0, n, 4096):
            j1 = min(n, j0 + 4096)
            p_dd = 0.0
            p_ww = 0.0
            p_wd = 0.0
            for j in range(j0, j1):
                x = np.float64(a[j])
                d = np.float64(b[j]) - x
                p_dd += d * d
                p_ww += x * x
                p_wd += x * d
                ad = abs(d)
                if ad > mx or ad != ad:
                    if mx == mx:
                        mx = ad
                tmp[j - j0] = abs(b[j] - a[j])
            sdd += p_dd
            sww += p_ww
            swd += p_wd
            if want_counts:
                for j in range(j1 - j0):
                    counts[tu[j] >> np.uint32(16)] += 1
        return sdd, sww, swd, mx

    @njit(nogil=True, cache=True)
    def _gather(a, b, lut):
        # Exact float64 |d| and bucket key of the elements whose bucket is wanted.
        n = a.size
        tmp = np.empty(1, np.float32)
        tu = tmp.view(np.uint32)
        m = 0
        for j in range(n):
            tmp[0] = abs(b[j] - a[j])
            if lut[tu[0] >> np.uint32(16)]:
                m += 1
        vals = np.empty(m, np.float64)
        keys = np.empty(m, np.int64)
        m = 0
        for j in range(n):
            tmp[0] = abs(b[j] - a[j])
            k = tu[0] >> np.uint32(16)
            if lut[k]:
                vals[m] = abs(np.float64(b[j]) - np.float64(a[j]))
                keys[m] = k
                m += 1
        return vals, keys


def error_stats(a: np.ndarray, b: np.ndarray, counts: np.ndarray | None):
    """(Σd², ΣW², ΣW·d, max|d|) of float32 1-D ``a`` (reference) and ``b``; bucket counts added
    into ``counts`` when given. None without numba."""
    if not AVAILABLE:
        return None
    c = counts if counts is not None else np.zeros(1 << 15, np.int64)
    return _stats(a, b, c, counts is not None)


def gather(a: np.ndarray, b: np.ndarray, lut: np.ndarray):
    """(exact |d| float64, bucket keys) of the wanted buckets; None without numba."""
    if not AVAILABLE:
        return None
    return _gather(a, b, lut)
