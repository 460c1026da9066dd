"""Compiled (numba) kernels for the hottest decoders, used by the numpy engine when numba is
installed; the vectorised numpy code in the format modules is the fallback and the reference.

numpy needs 5-8 passes over each block to dequantize (unpack, scale, MLX's two roundings) where a
compiled loop needs one; bench_dequant measured the numpy path at 4-11x the time of copying the
output, these kernels at about the copy's own cost. Every decoder computes exactly what its numpy
twin computes (no fast-math, so no fused multiply-add): tests compare both with the formats'
reference values. Only the float64 error sums (``_row_sums``, and the explicit vector pass of
``_pair_stats``, :func:`_make_vpass`) may reorder and fuse their additions.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, NamedTuple

import numpy as np


def _numba_cache_somewhere() -> None:
    """numba's on-disk cache (``cache=True``) goes beside this file or under ~/.cache; with
    neither writable (a read-only install run by a user without a home) every kernel's
    decoration raised "cannot cache function: no locator available", at import, so every
    command failed. Then the cache goes to a per-user folder in the temporary directory."""
    if "NUMBA_CACHE_DIR" in os.environ or os.access(os.path.dirname(os.path.abspath(__file__)), os.W_OK):
        return
    base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "numba")
    try:
        os.makedirs(base, exist_ok=True)
        if os.access(base, os.W_OK):
            return
    except OSError:
        pass
    import tempfile
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    os.environ["NUMBA_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"quantscope-numba-{uid}")


try:  # numba is optional: without it (or with QUANTSCOPE_NO_NUMBA=1) the numpy path runs
    if os.environ.get("QUANTSCOPE_NO_NUMBA"):
        raise ImportError("disabled by QUANTSCOPE_NO_NUMBA")
    _numba_cache_somewhere()
    from llvmlite import ir
    from numba import njit, types
    from numba.core import config as _numba_config
    from numba.extending import intrinsic
    # numba leaves LLVM's SLP vectorizer off by default. The decoders unpack each packed word
    # with a constant-length inner loop, which only SLP turns into 8-lane vector code: 4-5x
    # faster per element here. It changes no arithmetic (no fast-math), so the results stay
    # bit-identical to the numpy path (tested). An explicit NUMBA_SLP_VECTORIZE still wins.
    if "NUMBA_SLP_VECTORIZE" not in os.environ:
        _numba_config.SLP_VECTORIZE = 1
    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised where numba is absent
    AVAILABLE = False

#: Rows a GPTQ row decoder takes at a time (its granule: whole packed zero-point words at any bit
#: width); it decodes fastest in whole GPTQ_TILE tiles.
TILE = 32
#: Output rows per tile of the GPTQ kernel: 64 uint32 = four cache lines of each packed row, read
#: ahead (PREFETCH_ROWS). With the prefetch, 64 measured faster than 32 where rows are long: one
#: core, a 14336-wide layer 0.64 -> 0.48 ns per element, 2048-wide 0.46 -> 0.44 (AMD EPYC).
GPTQ_TILE = 64
#: AWQ tiles count packed words; 8 words = 64 output rows.
AWQ_TILE = 8
#: Packed rows per AWQ panel: 1024 rows of a 14336-wide layer span 2 MB (measured: 256-2048
#: within noise of each other, whole columns clearly slower).
AWQ_PANEL = 1024
#: Words of padding after each row of the GPTQ/AWQ kernels' gather buffers (a packed row's words
#: stored one per buffer row): rows a power-of-two 1-4 KB long put all the stores of a gathered
#: row in one or two L1 sets (and 4K-aliased the loads). Padded, one core (AMD EPYC): AWQ -> MLX
#: repack of a 4096x11008 layer 10.1-11.3 -> 5.6-6.6 ms; AWQ row decoder, 2048x2048, 0.245 ->
#: 0.215 ns per element; GPTQ's, 4096x14336 (2 KB rows), 0.52-0.54 -> 0.45-0.46. Pads of 4-32
#: words measured alike.
GATHER_PAD = 16
#: Output floats per tile chunk: large enough that each output row is written in long runs
#: (whole rows for a 14336-wide layer); smaller chunks measured slower.
CHUNK = 1 << 20

#: Rounding modes of the kernels: none (float32), to bfloat16, to float16.
F32, BF16, F16 = 0, 1, 2
#: Packed rows read ahead by the transposed layouts' gathers (:func:`_gather_cols`): a tile
#: reads two cache lines of each packed row, the rows a page or more apart, where the hardware
#: prefetchers stop; 8 ahead measured best (4-32 within a fifth of it).
PREFETCH_ROWS = 8

if AVAILABLE:
    from numba.core import cgutils

    @intrinsic
    def _prefetch(typingctx, arr, i, j):
        # a hint to load the cache line of arr[i, j] (2-D, in bounds): llvm.prefetch, for read,
        # kept in all cache levels; it changes no result
        if not (isinstance(arr, types.Array) and arr.ndim == 2):
            return None

        def codegen(context, builder, signature, args):
            aty = signature.args[0]
            a = context.make_array(aty)(context, builder, args[0])
            p = cgutils.get_item_pointer(context, builder, aty, a, [args[1], args[2]], wraparound=False,
                                         boundscheck=False)
            i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                                "llvm.prefetch.p0")
            builder.call(fn, [builder.bitcast(p, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
            return context.get_dummy_value()
        return types.void(arr, i, j), codegen

if AVAILABLE:
    @njit(cache=True, inline="always")
    def _rbf16(x):
        # float32 bits rounded to bfloat16's (half to even), as uint32 arithmetic (it wraps
        # exactly like the uint64 form masked to 32 bits) so LLVM can keep 8 lanes per AVX2 register
        return (x + np.uint32(0x7FFF) + ((x >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)

    @njit(cache=True, inline="always")
    def _round_bf16(seg):
        u = seg.view(np.uint32)
        for i in range(u.size):
            u[i] = _rbf16(u[i])

    @njit(cache=True, inline="always")
    def _bf16_then_add(seg, bg):
        # MLX's bf16 affine on s*q already in seg: round it to bfloat16, add the bias, round the
        # sum; one loop (the three of _round_row, add, _round_row took 1.7x its time)
        u = seg.view(np.uint32)
        for i in range(u.size):
            u[i] = _rbf16(np.uint32(_bits(_from_bits(np.int32(_rbf16(u[i]))) + bg)))

    @njit(cache=True, inline="always")
    def _round_row(row, mode):
        # Same bit operations as kernel.round_inplace (round half to even).
        if mode == BF16:
            _round_bf16(row)
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

    @njit(cache=True, inline="always")
    def _words_to(wr, w0, nw, bits, sg, bg, add, seg):
        # nw LSB-first words wr[w0:w0+nw] of bits-bit codes into seg, each q*sg (+ bg when
        # add). Constant inner trip counts and indices LLVM can prove non-negative (so numba adds
        # no wraparound select) let it turn each word into one vector shift, mask, convert,
        # multiply (and add) over 8 lanes.
        if bits == 4:
            for q in range(nw):
                w = wr[w0 + q]
                if add:
                    for j in range(8):
                        seg[8 * q + j] = np.float32(np.int32((w >> np.uint32(4 * j)) & np.uint32(15))) * sg + bg
                else:
                    for j in range(8):
                        seg[8 * q + j] = np.float32(np.int32((w >> np.uint32(4 * j)) & np.uint32(15))) * sg
        elif bits == 2:
            for q in range(nw):
                w = wr[w0 + q]
                if add:
                    for j in range(16):
                        seg[16 * q + j] = np.float32(np.int32((w >> np.uint32(2 * j)) & np.uint32(3))) * sg + bg
                else:
                    for j in range(16):
                        seg[16 * q + j] = np.float32(np.int32((w >> np.uint32(2 * j)) & np.uint32(3))) * sg
        else:  # 8
            for q in range(nw):
                w = wr[w0 + q]
                if add:
                    for j in range(4):
                        seg[4 * q + j] = np.float32(np.int32((w >> np.uint32(8 * j)) & np.uint32(255))) * sg + bg
                else:
                    for j in range(4):
                        seg[4 * q + j] = np.float32(np.int32((w >> np.uint32(8 * j)) & np.uint32(255))) * sg

    @njit(nogil=True, cache=True)
    def _mlx_affine_words(wd, s, b, bits, group, mode, out, r0, r1, o0):
        # bits 2/4/8: wd uint32 [rows, K*bits/32]; a group is a whole number of words.
        per = 32 // bits
        wpg = group // per
        ng = out.shape[1] // group
        if mode == BF16:  # (a loop nest of its own: sharing the one below, it took 1.6x the time)
            for r in range(r0, r1):
                wr = wd[r]
                orow = out[r - o0]
                for g in range(ng):
                    seg = orow[g * group:(g + 1) * group]
                    _words_to(wr, g * wpg, wpg, bits, s[r, g], np.float32(0.0), False, seg)
                    _bf16_then_add(seg, b[r, g])
            return
        for r in range(r0, r1):
            wr = wd[r]
            orow = out[r - o0]
            for g in range(ng):
                seg = orow[g * group:(g + 1) * group]
                if mode == F32:  # s*q + b with two float32 roundings (no FMA), as MLX does
                    _words_to(wr, g * wpg, wpg, bits, s[r, g], b[r, g], True, seg)
                    continue
                _words_to(wr, g * wpg, wpg, bits, s[r, g], np.float32(0.0), False, seg)
                # MLX rounds s*q to the scale dtype, then the sum; per group, while in L1.
                bg = b[r, g]
                _round_row(seg, mode)
                for i in range(group):
                    seg[i] = seg[i] + bg
                _round_row(seg, mode)

    @njit(nogil=True, cache=True)
    def _mlx_affine(by, s, b, bits, group, k, mode, out, r0, r1, o0):
        # Widths whose groups are not whole uint32 words of codes (1, 3, 5, 6 bit; 2/4/8 take
        # _mlx_affine_words): each code read from the bytes it straddles.
        mask = (1 << bits) - 1
        ng = k // group
        for r in range(r0, r1):
            row = out[r - o0]
            brow = by[r]
            for g in range(ng):
                sg = s[r, g]
                base = g * group
                for i in range(group):
                    row[base + i] = np.float32(_code(brow, base + i, bits, mask)) * sg
                # Per group, while it is in L1: MLX rounds s*q to the scale dtype, then the sum.
                bg = b[r, g]
                seg = row[base:base + group]
                if mode == BF16:
                    _bf16_then_add(seg, bg)
                    continue
                _round_row(seg, mode)
                for i in range(group):
                    seg[i] = seg[i] + bg
                _round_row(seg, mode)

    @njit(nogil=True, cache=True)
    def _gptq(qw, s_t, bias_t, g_idx, bits, out, r0, r1, o0):
        # Act-order (or groups that are not whole words; trivial g_idx takes _gptq_tiled): the
        # group looked up per input column. qw: uint32 [K*b/32, N] packed along K; out: float32
        # [N, K]. Sub-blocks of 16 output rows read 64 contiguous bytes of each packed row.
        per = 32 // bits
        mask = np.uint32((1 << bits) - 1)
        for n0 in range(r0, r1, 16):
            n1 = min(r1, n0 + 16)
            # Column by column: each output row is written front to back; the 16 columns share
            # the packed rows' cache lines, which stay in L2 between them.
            for c in range(n0, n1):
                for r in range(qw.shape[0]):
                    k0 = r * per
                    w = qw[r, c]
                    # 2-D indexing: a row view per (word, column) costs more than the decode.
                    for i in range(per):
                        g = g_idx[k0 + i]
                        out[c - o0, k0 + i] = np.float32(w & mask) * s_t[c, g] + bias_t[c, g]
                        w = w >> np.uint32(bits)

    @njit(cache=True, inline="always")
    def _gather_cols(qw, r0, nr, c0, c1, local):
        # local[c - c0, r] = qw[r0 + r, c] for r < nr, c in [c0, c1): the transposed layouts'
        # words of a tile of columns, read as contiguous runs of each packed row. The packed rows
        # lie a page or more apart (GPTQ: N words each), where no hardware prefetcher follows:
        # each read waited on memory, the gather cost more than decoding (a 14336x4096 layer's
        # GPTQ row blocks, one core: 0.76 -> 0.59 ns per element; 2048x2048: 0.73 -> 0.47).
        last = qw.shape[0] - 1
        for r in range(nr):
            ra = min(r0 + r + PREFETCH_ROWS, last)
            for c in range(c0, c1, 16):
                _prefetch(qw, ra, c)
            qr = qw[r0 + r]
            for c in range(c0, c1):
                local[c - c0, r] = qr[c]

    @njit(nogil=True, cache=True)
    def _gptq_tiled(qw, s, z, group, bits, out, c_lo, c_hi, tile, gpc, o0):
        # Trivial g_idx, whole words per group. qw: uint32 [K*b/32, N]; column c, read down, is
        # output row c's LSB-first code stream. Per (tile of columns, chunk of gpc groups): copy
        # those words into a small [tile, words] buffer (contiguous reads of each packed row),
        # then decode each column's chunk front to back (long sequential writes per row).
        per = 32 // bits
        wpg = group // per
        ng = qw.shape[0] // wpg
        local = np.empty((tile, wpg * gpc + GATHER_PAD), np.uint32)  # (see GATHER_PAD)
        for c0 in range(c_lo, c_hi, tile):
            c1 = min(c_hi, c0 + tile)
            for gb in range(0, ng, gpc):
                ge = min(ng, gb + gpc)
                _gather_cols(qw, gb * wpg, (ge - gb) * wpg, c0, c1, local)
                for c in range(c0, c1):
                    wl = local[c - c0]
                    orow = out[c - o0]
                    for g in range(gb, ge):
                        sg = s[g, c]  # scales and zeros in their stored [groups, N] orientation
                        _words_to(wl, (g - gb) * wpg, wpg, bits, sg, -(sg * z[g, c]), True,
                                  orow[g * group:(g + 1) * group])

    @njit(cache=True, inline="always")
    def _gather8(qw, r0, nr, c0, c1, local):
        # _gather_cols for the AWQ panels: whole 8x8 blocks (constant trip counts, which LLVM
        # turns into register transposes) where the tile is 8 word columns wide.
        if c1 - c0 == 8 and nr % 8 == 0:
            for rb in range(0, nr, 8):
                for i in range(8):
                    qr = qw[r0 + rb + i]
                    for c in range(8):
                        local[c, rb + i] = qr[c0 + c]
        else:
            _gather_cols(qw, r0, nr, c0, c1, local)

    @njit(nogil=True, cache=True)
    def _awq_tiled(qw, s, qz, zconst, group, shifts, out, c_lo, c_hi, gpp, o0):
        # qw: uint32 [K, N/8]; word column c holds output rows 8c..8c+7 (row 8c+j at shift
        # shifts[j]). Panels of gpp groups of packed rows (a few hundred KB: their pages stay in
        # the TLB and their lines in cache), and within a panel tiles of 8 word columns: an
        # [8, words] buffer, then one vectorised pass per output row and group. Walking each
        # tile down the whole of K instead re-missed the TLB on every packed row (bench_dequant,
        # paired: 2.0-2.1x the copy that way, 1.3-1.6x this way).
        k = qw.shape[0]
        ng = k // group
        local = np.empty((AWQ_TILE, group * gpp + GATHER_PAD), np.uint32)  # (see GATHER_PAD)
        for gb in range(0, ng, gpp):
            ge = min(ng, gb + gpp)
            for c0 in range(c_lo, c_hi, AWQ_TILE):
                c1 = min(c_hi, c0 + AWQ_TILE)
                _gather8(qw, gb * group, (ge - gb) * group, c0, c1, local)
                for c in range(c0, c1):
                    words = local[c - c0]
                    for g in range(gb, ge):
                        # one group of words (L1) feeds the word's 8 output rows in turn
                        wg = words[(g - gb) * group:(g - gb + 1) * group]
                        for j in range(8):
                            n = c * 8 + j
                            sh = shifts[j]
                            sg = s[g, n]
                            # zero point straight from the packed qzeros word (same nibble
                            # order as qweight), or the symmetric constant
                            zq = zconst if zconst >= 0 else np.int32((qz[g, c] >> sh) & np.uint32(15))
                            bg = -(sg * np.float32(zq))
                            seg = out[n - o0, g * group:(g + 1) * group]
                            for kk in range(group):
                                seg[kk] = np.float32(np.int32((wg[kk] >> sh) & np.uint32(15))) * sg + bg

    @njit(nogil=True, cache=True)
    def _block_float(by, sc, elem_table, scale_table, gscale, bits, group, k, out, r0, r1, o0):
        ng = k // group
        for r in range(r0, r1):
            brow = by[r]
            orow = out[r - o0]
            for g in range(ng):
                scale = scale_table[sc[r, g]] * gscale  # (1 without a global scale: exact)
                base = g * group
                for i in range(group):  # 8-bit element codes (mxfp8): table lookup
                    orow[base + i] = elem_table[brow[base + i]] * scale


if AVAILABLE:
    @njit(nogil=True, cache=True)
    def _fp4_words(wd, sc, scale_table, gscale, group, out, r0, r1, o0):
        # 4-bit block floats (mxfp4, nvfp4) read as uint32 words, 8 codes each. E2M1 without a
        # table, in float32 lanes so that 8 codes vectorise: magnitude code m gives
        # m/2 + relu(m-4)/2 + relu(m-6) (0, .5, 1, 1.5, 2, 3, 4, 6); bit 3 multiplies by -1 (0 becomes -0 like the
        # table's). Every step is exact, so the product with the scale equals the table's.
        wpg = group // 8
        ng = out.shape[1] // group
        for r in range(r0, r1):
            wr = wd[r]
            orow = out[r - o0]
            for g in range(ng):
                scale = scale_table[sc[r, g]] * gscale  # (1 without a global scale: exact)
                seg = orow[g * group:(g + 1) * group]
                for q in range(wpg):
                    w = wr[g * wpg + q]
                    for j in range(8):
                        m = np.float32(np.int32((w >> np.uint32(4 * j)) & np.uint32(7)))
                        neg = np.float32(np.int32((w >> np.uint32(4 * j + 3)) & np.uint32(1)))
                        # branch-free (random codes would mispredict): relu(z) = (z + |z|)/2
                        r4 = m - np.float32(4.0)
                        r6 = m - np.float32(6.0)
                        v = (np.float32(0.5) * m + np.float32(0.25) * (r4 + abs(r4))
                             + np.float32(0.5) * (r6 + abs(r6)))
                        seg[8 * q + j] = (v * (np.float32(1.0) - np.float32(2.0) * neg)) * scale


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


def _chunk(rows: int, group: int) -> int:
    """Groups per chunk: a tile's chunk covers at most CHUNK output floats."""
    return max(1, CHUNK // max(1, rows * group))


def _rows(n_rows: int, row_elems: int, fn, align: int = 1, min_rows: int = 16) -> None:
    # Our own pool, not numba's threading layer: kernels release the GIL (nogil) and may be
    # called from several worker threads at once, which numba's default layer does not allow.
    from .kernel import for_row_blocks
    for_row_blocks(n_rows, row_elems, fn, align=align, min_rows=min_rows)


class RowDecoder(NamedTuple):
    """A prepared compiled decode of one layer: ``fn(r0, r1, dst)`` writes flattened rows
    ``[r0, r1)`` into ``dst`` (float32 ``[r1-r0, cols]``); ``r0`` and ``r1`` must be multiples of
    ``granule`` (or ``r1 == rows``). ``tile`` (0: the granule) is the multiple of rows the
    kernel decodes fastest, for callers that choose their own blocks (:mod:`..fused`)."""

    fn: Callable
    rows: int
    cols: int
    granule: int
    tile: int = 0
    #: the dtype ``dst`` is given in (None: float32); a reference's rows read as stored (bf16)
    dtype: object = None


def _whole(n_rows: int, k: int, fn, out: np.ndarray, **kw) -> bool:
    """Run a row decoder over all of ``out`` on the decode pool; False when ``fn`` is None."""
    if fn is None:
        return False
    _rows(n_rows, k, lambda r0, r1: fn(r0, r1, out[r0:r1]), **kw)
    return True


def mlx_affine_rows(by: np.ndarray, s32: np.ndarray, b32: np.ndarray, bits: int, group: int, k: int, sdtype):
    """A row decoder ``fn(r0, r1, dst)`` of MLX affine (rows ``[r0, r1)`` into ``dst``
    ``[r1-r0, K]``), or None when this case has no kernel (use numpy)."""
    mode = _mode(sdtype)
    if not AVAILABLE or mode < 0 or bits > 8:
        return None
    by, s32, b32 = np.ascontiguousarray(by), np.ascontiguousarray(s32), np.ascontiguousarray(b32)
    if bits in (2, 4, 8) and by.shape[-1] % 4 == 0 and group % (32 // bits) == 0 and sys.byteorder == "little":
        wd = by.view(np.uint32)
        return lambda r0, r1, dst: _mlx_affine_words(wd, s32, b32, bits, group, mode, dst, r0, r1, r0)
    return lambda r0, r1, dst: _mlx_affine(by, s32, b32, bits, group, k, mode, dst, r0, r1, r0)


def mlx_affine(by: np.ndarray, s32: np.ndarray, b32: np.ndarray, bits: int, group: int, k: int, sdtype,
               out: np.ndarray) -> bool:
    """MLX affine into ``out`` [rows, K]; False when this case has no kernel (use numpy)."""
    return _whole(out.shape[0], k, mlx_affine_rows(by, s32, b32, bits, group, k, sdtype), out)


def gptq_rows(qweight: np.ndarray, s: np.ndarray, z: np.ndarray, g_idx: np.ndarray | None, bits: int, k: int,
              trivial_group: int = 0):
    """A row decoder ``fn(r0, r1, dst)`` of GPTQ (2/4/8-bit, any g_idx), or None.

    ``s`` and ``z`` are float32 ``[groups, N]`` (stored orientation, zeros already unpacked);
    each value is ``s*q + (-(s*z))``, the exact product ``s*(q-z)``. ``trivial_group`` is the
    group size when ``g_idx`` is trivial (``g_idx`` may then be None), else 0.
    """
    if not AVAILABLE or bits not in (2, 4, 8) or qweight.dtype.itemsize != 4:
        return None
    qw = np.ascontiguousarray(qweight).view(np.uint32)
    per = 32 // bits
    # Trivial g_idx with whole words per group: one group per packed word (no per-code lookup).
    tg = trivial_group if (trivial_group and trivial_group % per == 0) else 0
    if tg and k % tg == 0 and qw.shape[0] * per == k:
        gpc = min(_chunk(GPTQ_TILE, tg), k // tg)  # the tile buffer no larger than the layer needs
        return lambda r0, r1, dst: _gptq_tiled(qw, s, z, tg, bits, dst, r0, r1, GPTQ_TILE, gpc, r0)
    s_t = np.ascontiguousarray(s.T)
    bias_t = -(s_t * z.T)
    gi = np.arange(k) // trivial_group if g_idx is None else np.ascontiguousarray(g_idx, np.int64)
    return lambda r0, r1, dst: _gptq(qw, s_t, bias_t, gi, bits, dst, r0, r1, r0)


def gptq(qweight: np.ndarray, s: np.ndarray, z: np.ndarray, g_idx: np.ndarray | None, bits: int,
         out: np.ndarray, trivial_group: int = 0) -> bool:
    """GPTQ into ``out`` [N, K] (see :func:`gptq_rows`); False when there is no kernel."""
    k = out.shape[1]
    return _whole(out.shape[0], k, gptq_rows(qweight, s, z, g_idx, bits, k, trivial_group), out,
                  min_rows=GPTQ_TILE)


def awq_gemm_rows(qweight: np.ndarray, s: np.ndarray, qzeros: np.ndarray | None, group: int, shifts: np.ndarray,
                  k: int):
    """A row decoder ``fn(r0, r1, dst)`` of AWQ GEMM 4-bit (``r0``, ``r1`` multiples of 8), or None.

    ``s`` float32 ``[groups, N]`` in logical column order, ``qzeros`` the packed ``[groups, N/8]``
    words (None: symmetric, z = 8).
    """
    if (not AVAILABLE or (qzeros is not None and qzeros.dtype.itemsize != 4)
            or k % group):  # gemm_dims makes K a whole number of groups
        return None
    qw = np.ascontiguousarray(qweight).view(np.uint32)
    sh = shifts.astype(np.uint32)
    qz = np.zeros((1, 1), np.uint32) if qzeros is None else np.ascontiguousarray(qzeros).view(np.uint32)
    zc = 8 if qzeros is None else -1
    gpp = max(1, min(AWQ_PANEL // group, k // group))  # groups per panel
    return lambda r0, r1, dst: _awq_tiled(qw, s, qz, zc, group, sh, dst, r0 // 8, r1 // 8, gpp, r0)


def awq_gemm(qweight: np.ndarray, s: np.ndarray, qzeros: np.ndarray | None, group: int, shifts: np.ndarray,
             out: np.ndarray) -> bool:
    """AWQ GEMM 4-bit into ``out`` [N, K] (see :func:`awq_gemm_rows`); False when there is no kernel."""
    fn = awq_gemm_rows(qweight, s, qzeros, group, shifts, out.shape[1])
    return _whole(out.shape[0], out.shape[1], fn, out, align=8, min_rows=8 * AWQ_TILE)


def block_float_rows(by: np.ndarray, sc: np.ndarray, elem_table: np.ndarray, scale_table: np.ndarray,
                     gscale: float | None, bits: int, group: int, k: int):
    """A row decoder ``fn(r0, r1, dst)`` of mxfp4 / mxfp8 / nvfp4, or None."""
    if not AVAILABLE:
        return None
    by, sc = np.ascontiguousarray(by), np.ascontiguousarray(sc)
    # (a stored global scale of 0 zeroes the layer, as in mx.dequantize; it was taken for none)
    g = np.float32(1.0 if gscale is None else gscale)
    if bits == 4:
        if by.shape[-1] % 4 or group % 8 or sys.byteorder != "little":
            return None  # numpy path
        wd = by.view(np.uint32)
        return lambda r0, r1, dst: _fp4_words(wd, sc, scale_table, g, group, dst, r0, r1, r0)
    return lambda r0, r1, dst: _block_float(by, sc, elem_table, scale_table, g, bits, group, k, dst, r0, r1, r0)


def block_float(by: np.ndarray, sc: np.ndarray, elem_table: np.ndarray, scale_table: np.ndarray,
                gscale: float | None, bits: int, group: int, k: int, out: np.ndarray) -> bool:
    """mxfp4 / mxfp8 / nvfp4 into ``out`` [rows, K]; False when there is no kernel."""
    return _whole(out.shape[0], k, block_float_rows(by, sc, elem_table, scale_table, gscale, bits, group, k), out)


# -- error statistics (compare) ----------------------------------------------------------------

#: Histogram of float32 |d| by its top bits (:func:`pair_stats`): bin ``(bits >> HIST_SHIFT) -
#: HIST_BASE``, so 256 bins per octave (8 mantissa bits, 0.4% of the value) from 2**-40 up;
#: what lies below goes to the first bin (zeros too), what lies above 2**24 (inf, NaN) to the last.
HIST_SHIFT = 15
HIST_BASE = (127 - 40) << (23 - HIST_SHIFT)
HIST_BINS = 64 << (23 - HIST_SHIFT)
#: ``(low * BYTE_INDEX) >> 56`` is b for ``low == 1 << 8b`` (b = 0..7): the index of the lowest
#: set byte of a word of 0/1 bytes.
BYTE_INDEX = np.uint64(0x0001020304050607)
#: Elements of a row that ``_pair_stats`` takes at a time (its buffers then stay in L1).
PIECE = 1024
#: Elements its vector pass takes at a time (no buffers: only the per-call work and the rescan
#: of a piece that reaches the largest |error| so far weigh).
VPIECE = 2048
#: The vector pass stores its hits without a branch (each 16 elements' compress-store taken
#: whether they hold one or not) once more than 1 in DENSE_HITS of the previous piece's elements
#: were hits: the branch mispredicts on most groups long before hits are common. Measured on
#: bench_sweep's 5632×2048 layers, one core, ns per element with the branch against without:
#: 0.536 / 0.563 at 0.5% hits, 0.585 / 0.562 at 0.8%, 0.650 / 0.557 at 1.4% (1 in 64 before).
DENSE_HITS = 192


def hist_edges(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (lowest, highest) |d| of the histogram bins ``b``: 0 for the first bin's lowest,
    inf for the last bin's highest."""
    b = np.asarray(b, np.int64)
    lo = (((b + HIST_BASE) << HIST_SHIFT).astype(np.uint32)).view(np.float32).copy()
    hi = ((((b + HIST_BASE + 1) << HIST_SHIFT) - 1).astype(np.uint32)).view(np.float32).copy()
    lo[b <= 0] = 0.0
    hi[b >= HIST_BINS - 1] = np.inf
    return lo, hi


if AVAILABLE:
    def _bitcast(src, dst, to):
        # a scalar's bit pattern read as another type of its width: numba has no scalar view, and
        # a store and load through a view array splits the loop that uses it
        @intrinsic
        def cast(typingctx, x):
            def codegen(context, builder, signature, args):
                return builder.bitcast(args[0], to)
            return dst(src), codegen
        return cast

    # float32 <-> int32 (for |d| >= 0 the bits order like the value; NaN's above every number's), float64 -> int64
    _bits = _bitcast(types.float32, types.int32, ir.IntType(32))
    _from_bits = _bitcast(types.int32, types.float32, ir.FloatType())
    _bits64 = _bitcast(types.float64, types.int64, ir.IntType(64))
    _from_bits64 = _bitcast(types.int64, types.float64, ir.DoubleType())

    @njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
    def _row_sums(w, x, want_ww):
        # Σd², ΣW² (when want_ww), ΣW·d of reference w and variant x in float64. "reassoc" lets
        # LLVM keep vector partial sums: the order of the float64 additions changes, ~1e-12
        # relative, far inside the 1e-9 the metrics promise; "contract" fuses each product into
        # its sum (one rounding instead of two; 8% off the one-pass kernel, same process A/B).
        # No NaN/inf assumptions: those must still come out as numpy's.
        sdd = 0.0
        sww = 0.0
        swd = 0.0
        if want_ww:
            for j in range(w.size):
                a = np.float64(w[j])
                d = np.float64(x[j]) - a
                sdd += d * d
                sww += a * a
                swd += a * d
        else:
            for j in range(w.size):
                a = np.float64(w[j])
                d = np.float64(x[j]) - a
                sdd += d * d
                swd += a * d
        return sdd, sww, swd

    @njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
    def _all_sums(w, x):
        # _row_sums' three and ΣŴ², ΣW·Ŵ, in one loop: those two taken directly, since derived
        # from the error sums (ΣW² + 2ΣW·d + Σd²) they cancel where Ŵ is small against W (a
        # mis-scaled layer), and the cosine came out wrong or NaN. (No NaN/inf assumptions.)
        sdd = 0.0
        sww = 0.0
        swd = 0.0
        svv = 0.0
        swv = 0.0
        for j in range(w.size):
            a = np.float64(w[j])
            v = np.float64(x[j])
            d = v - a
            sdd += d * d
            sww += a * a
            swd += a * d
            svv += v * v
            swv += a * v
        return sdd, sww, swd, svv, swv

    @njit(nogil=True, cache=True)
    def _stats(a, b, counts, want_counts):
        # Σd², ΣW², ΣW·d, ΣŴ², ΣW·Ŵ (per 4096-element block, then summed) and max|d|; with
        # want_counts, bucket counts of |float32(b - a)| by its top 16 bits (metrics._keys).
        n = a.size
        sdd = 0.0
        sww = 0.0
        swd = 0.0
        svv = 0.0
        swv = 0.0
        m32 = np.float32(-1.0)
        m64 = 0.0
        nz = 0
        tmp = np.empty(4096, np.float32)
        tu = tmp.view(np.uint32)
        for j0 in range(0, n, 4096):
            j1 = min(n, j0 + 4096)
            p_dd, p_ww, p_wd, p_vv, p_wv = _all_sums(a[j0:j1], b[j0:j1])
            sdd += p_dd
            sww += p_ww
            swd += p_wd
            svv += p_vv
            swv += p_wv
            if not want_counts:
                continue
            for i in range(j1 - j0):
                tmp[i] = abs(b[j0 + i] - a[j0 + i])
            for i in range(j1 - j0):
                v = tmp[i]
                counts[tu[i] >> np.uint32(16)] += 1
                nz += v == np.float32(0.0)  # b == a exactly (float32 b - a is 0 only then)
                # float32 |d| is the exact |d| rounded (monotone): the exact maximum is among
                # the elements reaching the running float32 maximum, so only those (rare after
                # the first few) are evaluated in float64.
                if v >= m32:
                    m32 = v
                    e = abs(np.float64(b[j0 + i]) - np.float64(a[j0 + i]))
                    if e > m64:
                        m64 = e
        # A NaN difference makes Σd² NaN (the other terms are >= 0 and cannot cancel to NaN);
        # report NaN like numpy's max does.
        mx = np.nan if sdd != sdd else m64
        return sdd, sww, swd, mx, nz, svv, swv

    @njit(nogil=True, cache=True)
    def _gather(a, b, lut, bound):
        # One pass: exact float64 |d| and bucket key of the nonzero elements whose bucket is
        # wanted (exact zeros are counted in pass one and never gathered: an exact conversion
        # would otherwise gather and sort every element); ``bound`` sizes the output.
        n = a.size
        m = min(n, bound)
        vals = np.empty(m, np.float64)
        keys = np.empty(m, np.int32)
        k = 0
        for j in range(n):
            u = np.uint32(_bits(abs(b[j] - a[j])))
            key = u >> np.uint32(16)
            if lut[key] and k < m and u != 0:
                vals[k] = abs(np.float64(b[j]) - np.float64(a[j]))
                keys[k] = key
                k += 1
        return vals[:k], keys[:k]


#: Lanes of the explicit vector pass (:func:`_make_vpass`): one AVX-512 register of float32.
LANES = 16


def _make_vpass(sums: bool, ww: bool, masks: bool, bins: bool = False):
    """The core of ``_pair_stats`` as explicit 16-lane vector code (LLVM IR through a numba
    intrinsic): ``_vpass(w, x, nv, lims, acc, cnt, buf, st)`` takes the first ``nv * 16``
    elements of ``w`` (reference: float32, or bfloat16 bits as uint16, widened in registers) and
    float32 ``x`` (variant), and for d = x − w in float32:

    * ``cnt[0]`` += exact zeros, ``cnt[1..3]`` += how many |d| < lims[0..2], ``cnt[5]`` =
      max(cnt[5], largest bits of |d| as int32);
    * the exact float64 |x − w| of each hit (|d| in some [lims[q], lims[3 + q]]) is stored at
      ``buf[st[0]]`` on (compressed 8 lanes at a time) and ``st[0]`` counts it; past ``st[1]``
      (the buffer's size) hits are counted, not stored; ``st[2]`` nonzero: many hits are
      expected (a store for every 16 elements, not a branch on whether they hold one);
    * with ``sums``: ``acc[0]`` += Σd², ``acc[2]`` += ΣW·d of the exact float64 differences, and
      with ``ww`` ``acc[1]`` += ΣW², in 8-lane float64 fused multiply-adds.

    With ``bins`` there are no intervals (``lims`` and ``st`` unused, nothing collected) and
    ``buf`` is int32: each element's histogram bin of its float32 |d| goes to ``buf[i]`` (as in
    ``_add_hist``: the sample blocks' and the exact passes' histograms), the increments left to
    the caller.

    ``nv`` is at most 4095 (VPIECE / 16 in ``_pair_stats``). ``masks`` picks how the zeros, the
    counts and the hits are found: by compares into mask registers, their 16 bits counted 64 at
    a time in a general register (AMD Zen 4: 0.46 → 0.37 ns per element of the pass with its
    sums), or by integer arithmetic on the bits in the vector registers (measured better on an
    Intel Xeon, where every compare into a mask register takes the one port that also does the
    float64 half's shuffles and conversions).

    LLVM's loop vectoriser made of the same loop, written in numba, code that took twice the
    time: the float32 and float64 parts vectorised at different widths, the counts went through
    memory, and the hits were gathered one by one afterwards. Here every operation is one
    512-bit instruction where the CPU has them (elsewhere LLVM splits them into the widths it
    has, or into scalar code: the same results).
    """
    f32, f64, i32, i16, i64, i8, i1 = (ir.FloatType(), ir.DoubleType(), ir.IntType(32), ir.IntType(16),
                                       ir.IntType(64), ir.IntType(8), ir.IntType(1))
    vf, vi, vd = ir.VectorType(f32, LANES), ir.VectorType(i32, LANES), ir.VectorType(f64, 8)
    m8 = ir.VectorType(i1, 8)

    def decl(mod, name, ret, args):
        return cgutils.get_or_insert_function(mod, ir.FunctionType(ret, args), name)

    @intrinsic
    def _vpass(typingctx, w, x, nv, lims, acc, cnt, buf, st):
        # the code below reads and writes raw memory as these types: any other is refused at
        # compile time (a float64 reference read as float32 gave wrong figures without a word)
        want = ((w, (types.float32, types.uint16)), (x, (types.float32,)), (lims, (types.float32,)),
                (acc, (types.float64,)), (buf, (types.int32,) if bins else (types.float64,)), (cnt, (types.int64,)),
                (st, (types.int64,)))
        if not all(isinstance(a, types.Array) and a.ndim == 1 and a.dtype in ok for a, ok in want):
            return None
        sig = types.void(w, x, nv, lims, acc, cnt, buf, st)

        def codegen(context, builder, signature, args):
            ptr = [context.make_array(t)(context, builder, a).data if isinstance(t, types.Array) else a
                   for t, a in zip(signature.args, args)]
            pw, px, n, pl, pa, pc, pb, pst = ptr
            mod = builder.module
            fma = decl(mod, "llvm.fma.v8f64", vd, [vd, vd, vd])
            fabs = decl(mod, "llvm.fabs.v16f32", vf, [vf])
            fabs8 = decl(mod, "llvm.fabs.v8f64", vd, [vd])
            smax = decl(mod, "llvm.smax.v16i32", vi, [vi, vi])
            smin = decl(mod, "llvm.smin.v16i32", vi, [vi, vi])
            pop8 = decl(mod, "llvm.ctpop.i8", i8, [i8])
            cstore = decl(mod, "llvm.masked.compressstore.v8f64", ir.VoidType(), [vd, f64.as_pointer(), m8])
            # LLVM 19 on has a compress into a register
            compress = (decl(mod, "llvm.experimental.vector.compress.v8f64", vd, [vd, m8, vd])
                        if _LLVM >= (19,) else None)
            undef = ir.Constant(vf, ir.Undefined)
            splat0 = ir.Constant(vi, [0] * LANES)
            bf16 = signature.args[0].dtype == types.uint16  # the reference as bfloat16 bits

            def ref_at(off):
                # 16 reference values from element ``off``, as float32 (bf16: its bits << 16)
                if not bf16:
                    return builder.load(builder.bitcast(builder.gep(pw, [off]), vf.as_pointer()), align=4)
                h = builder.load(builder.bitcast(builder.gep(pw, [off]), ir.VectorType(i16, LANES).as_pointer()),
                                 align=2)
                wide = builder.shl(builder.zext(h, vi), ir.Constant(vi, [16] * LANES))
                return builder.bitcast(wide, vf)

            def bcast(k):
                one = builder.insert_element(undef, builder.load(builder.gep(pl, [ir.Constant(i64, k)])),
                                             ir.Constant(i32, 0))
                return builder.shuffle_vector(one, undef, splat0)

            # the bounds as the bits of non-negative float32, which order like them: an
            # unused interval's upper bound (-inf) as 0, below every lower bound (>= 1)
            los = [builder.bitcast(bcast(k), vi) for k in range(3)]
            his = [builder.call(smax, [builder.bitcast(bcast(3 + k), vi), splat0]) for k in range(3)]
            zero_d = ir.Constant(vd, [0.0] * 8)
            sacc = [cgutils.alloca_once_value(builder, zero_d) for _ in range(6)]  # dd, wd, ww × 2 halves
            rmax = cgutils.alloca_once_value(builder, splat0)
            # without masks, per-lane counters (on Intel, a count through a mask register, a move
            # to a general register, an insert and a popcount took the port the compares need):
            # the exact zeros, then below each interval; summed over the lanes at the end
            counts = [cgutils.alloca_once_value(builder, splat0) for _ in range(4)]
            # with masks, the same four counts in the 16-bit fields of one integer (nv * 16 <
            # 2**16), the zeros', then at or above each interval's lower bound
            fields = cgutils.alloca_once_value(builder, ir.Constant(i64, 0))
            one_i = ir.Constant(vi, [1] * LANES)
            sign = ir.Constant(vi, [31] * LANES)
            vsum = decl(mod, "llvm.vector.reduce.add.v16i32", i32, [vi])
            nb = cgutils.alloca_once_value(builder, builder.load(pst))
            cap = builder.load(builder.gep(pst, [ir.Constant(i64, 1)]))
            # many hits (wide intervals): the store taken always (a branch on each group's hits
            # mispredicted most of the time); few: only where a group has one
            dense = builder.icmp_signed("!=", builder.load(builder.gep(pst, [ir.Constant(i64, 2)])),
                                        ir.Constant(i64, 0))
            no_hits = ir.Constant(m8, [0] * 8)
            halves = [ir.Constant(ir.VectorType(i32, 8), list(range(8 * h, 8 * h + 8))) for h in range(2)]

            def exact_store(vals, dst, at, c, mh):
                # the c hit lanes of mh from buf[at] on, or none when they do not all fit
                fits = builder.icmp_signed("<=", builder.add(at, c), cap)
                builder.call(cstore, [vals, dst, builder.select(fits, mh, no_hits)])

            def count(lanes, k):
                builder.store(builder.add(builder.load(counts[k]), lanes), counts[k])

            with cgutils.for_range(builder, n) as loop:
                i = loop.index
                off = builder.mul(i, ir.Constant(i64, LANES))
                wv = ref_at(off)
                xv = builder.load(builder.bitcast(builder.gep(px, [off]), vf.as_pointer()), align=4)
                a = builder.call(fabs, [builder.fsub(xv, wv)])
                u = builder.bitcast(a, vi)
                builder.store(builder.call(smax, [builder.load(rmax), u]), rmax)
                # u and the bounds compare as integers (the bits of non-negative floats; NaN's
                # exceed every bound: never below, never inside)
                if bins:
                    # the histogram's bins (see _add_hist), the zeros, and no intervals
                    tb = builder.sub(builder.lshr(u, ir.Constant(vi, [HIST_SHIFT] * LANES)),
                                     ir.Constant(vi, [HIST_BASE] * LANES))
                    top = ir.Constant(vi, [HIST_BINS - 1] * LANES)
                    tb = builder.call(smin, [builder.call(smax, [tb, splat0]), top])
                    builder.store(tb, builder.bitcast(builder.gep(pb, [off]), vi.as_pointer()), align=4)
                    count(builder.lshr(builder.sub(u, one_i), sign), 0)  # 1 where |d| is zero
                    hit = None
                elif masks:
                    # compares into mask registers, the four masks side by side in one integer
                    # and the set bits of each 16 counted at once (a popcount per mask: LLVM
                    # gathered them into a vector register through four inserts, slower)
                    ms = [builder.icmp_signed("==", u, splat0)]
                    hit = None
                    for q in range(3):
                        ge = builder.icmp_signed(">=", u, los[q])
                        ms.append(ge)
                        h = builder.and_(ge, builder.icmp_signed("<=", u, his[q]))
                        hit = h if hit is None else builder.or_(hit, h)
                    f = None
                    for k, mk in enumerate(ms):
                        b = builder.zext(builder.bitcast(mk, i16), i64)
                        b = builder.shl(b, ir.Constant(i64, 16 * k)) if k else b
                        f = b if f is None else builder.or_(f, b)
                    m1, m2 = ir.Constant(i64, 0x5555555555555555), ir.Constant(i64, 0x3333333333333333)
                    f = builder.sub(f, builder.and_(builder.lshr(f, ir.Constant(i64, 1)), m1))
                    f = builder.add(builder.and_(f, m2), builder.and_(builder.lshr(f, ir.Constant(i64, 2)), m2))
                    for sh, m in ((4, 0x0F0F0F0F0F0F0F0F), (8, 0x00FF00FF00FF00FF)):
                        f = builder.and_(builder.add(f, builder.lshr(f, ir.Constant(i64, sh))), ir.Constant(i64, m))
                    builder.store(builder.add(builder.load(fields), f), fields)
                else:
                    # integer arithmetic, not compares: on Intel's AVX-512 every compare goes into
                    # a mask register on the one port that also shuffles and converts (the float64
                    # half below), and a count from a mask takes one more there. u, the bounds and
                    # their differences lie in [0, 2**31): no overflow, and the sign bit of u - b
                    # says u < b
                    count(builder.lshr(builder.sub(u, one_i), sign), 0)  # 1 where |d| is zero
                    miss = None
                    for q in range(3):
                        t = builder.sub(u, los[q])
                        count(builder.lshr(t, sign), 1 + q)
                        # outside [lo, hi]: u - lo < 0 or hi - u < 0, the sign of their or
                        out = builder.or_(t, builder.sub(his[q], u))
                        miss = out if miss is None else builder.and_(miss, out)
                    hit = builder.icmp_signed(">=", miss, splat0)

                def exact_half(h):
                    # the reference's half h in float64, and the exact differences: shuffled out
                    # of the registers (loading them again, LLVM made of the second half a
                    # gather of single lanes)
                    wd = builder.fpext(builder.shuffle_vector(wv, undef, halves[h]), vd)
                    return wd, builder.fsub(builder.fpext(builder.shuffle_vector(xv, undef, halves[h]), vd), wd)

                ds = []
                for h in range(2 if sums else 0):
                    wd, d = exact_half(h)
                    ds.append(d)
                    terms = [(d, d), (wd, d)] + ([(wd, wd)] if ww else [])
                    for k, (p, q_) in enumerate(terms):
                        slot = sacc[2 * k + h]
                        builder.store(builder.call(fma, [p, q_, builder.load(slot)]), slot)
                if hit is not None:
                    # the hits, compressed into buf while they fit (a mask of none past it); behind a
                    # branch: a compress-store costs several cycles even with no lane set
                    any_hit = builder.icmp_unsigned("!=", builder.bitcast(hit, i16), ir.Constant(i16, 0))
                    with cgutils.if_unlikely(builder, builder.or_(any_hit, dense)):
                        for h in range(2):
                            # the half's 8 mask bits as an integer shift (a shuffle of the i1 vector went
                            # through memory: a 16-bit store read back as 128 bits, a stall on every group)
                            hb = builder.bitcast(hit, i16)
                            if h:
                                hb = builder.lshr(hb, ir.Constant(i16, 8))
                            mh = builder.bitcast(builder.trunc(hb, i8), m8)
                            c = builder.zext(builder.call(pop8, [builder.bitcast(mh, i8)]), i64)
                            at = builder.load(nb)
                            # (without sums, the differences are found here only)
                            vals = builder.call(fabs8, [ds[h] if sums else exact_half(h)[1]])
                            dst = builder.gep(pb, [at])
                            if compress is None:
                                exact_store(vals, dst, at, c, mh)
                            else:
                                # compressed in a register and stored whole (the memory form of the
                                # compress-store is microcoded on Intel: several times slower); the
                                # lanes past the hits are overwritten by the next ones. Near the
                                # buffer's end, the exact masked store.
                                whole = builder.icmp_signed("<=", builder.add(at, ir.Constant(i64, 8)), cap)
                                with builder.if_else(whole, likely=True) as (fast_, exact):
                                    with fast_:
                                        packed = builder.call(compress, [vals, mh, ir.Constant(vd, ir.Undefined)])
                                        builder.store(packed, builder.bitcast(dst, vd.as_pointer()), align=8)
                                    with exact:
                                        exact_store(vals, dst, at, c, mh)
                            builder.store(builder.add(at, c), nb)

            def hsum(v):
                t = builder.extract_element(v, ir.Constant(i32, 0))
                for j in range(1, 8):
                    t = builder.fadd(t, builder.extract_element(v, ir.Constant(i32, j)))
                return t

            if sums:
                for k, dst in ((0, 0), (1, 2), (2, 1)) if ww else ((0, 0), (1, 2)):
                    tot = builder.fadd(hsum(builder.load(sacc[2 * k])), hsum(builder.load(sacc[2 * k + 1])))
                    p = builder.gep(pa, [ir.Constant(i64, dst)])
                    builder.store(builder.fadd(builder.load(p), tot), p)
            for k in range(4):
                p = builder.gep(pc, [ir.Constant(i64, k)])
                if masks and not bins:
                    c = builder.and_(builder.lshr(builder.load(fields), ir.Constant(i64, 16 * k)),
                                     ir.Constant(i64, 0xFFFF))
                    if k:  # at or above the bound: below it, the rest
                        c = builder.sub(builder.mul(n, ir.Constant(i64, LANES)), c)
                else:
                    c = builder.zext(builder.call(vsum, [builder.load(counts[k])]), i64)
                builder.store(builder.add(builder.load(p), c), p)
            builder.store(builder.load(nb), pst)
            rv = builder.load(rmax)
            r = builder.sext(builder.extract_element(rv, ir.Constant(i32, 0)), i64)
            for j in range(1, LANES):
                e = builder.sext(builder.extract_element(rv, ir.Constant(i32, j)), i64)
                r = builder.select(builder.icmp_signed(">", e, r), e, r)
            p = builder.gep(pc, [ir.Constant(i64, 5)])
            old = builder.load(p)
            builder.store(builder.select(builder.icmp_signed(">", r, old), r, old), p)
            return context.get_dummy_value()

        return sig, codegen

    return _vpass


if AVAILABLE:
    from llvmlite import binding as _llvm_binding
    from numba.core import cgutils

    _LLVM = tuple(_llvm_binding.llvm_version_info)
    #: the vector pass's counts through mask registers: on AMD Zen 4 and later, where they were
    #: measured faster (see _make_vpass)
    MASK_COUNTS = (_llvm_binding.get_host_cpu_name().startswith("znver")
                   and "avx512f" in _llvm_binding.get_host_cpu_features().flatten())

    _vpass_none = _make_vpass(False, False, MASK_COUNTS)
    _vpass_sums = _make_vpass(True, False, MASK_COUNTS)
    _vpass_all = _make_vpass(True, True, MASK_COUNTS)
    # (with bins, no intervals: only the zeros are counted, in the vector registers either way)
    _vbins_none = _make_vpass(False, False, False, bins=True)
    _vbins_sums = _make_vpass(True, False, False, bins=True)
    _vbins_all = _make_vpass(True, True, False, bins=True)

    @njit(cache=True, inline="always")
    def _wval(rp, j, bf16):
        # reference element j of a piece as float32 (bf16: from its bits)
        if bf16:
            return _from_bits(np.int32(np.uint32(rp[j]) << np.uint32(16)))
        return np.float32(rp[j])

    @njit(cache=True, inline="always")
    def _exact_max(w, x, n, bf16, acc):
        # acc[4]: the exact float64 maximum |x - w| of the first n elements, NaN kept (called
        # where the piece's float32 maximum reaches the running one: float32 rounding is
        # monotone). Through integer keys (|d|'s bits order as |d| does, NaN's above inf), which
        # vectorise: picking the elements of the float32 maximum's bits first, one by one with a
        # branch, took 4.2 ns per element, 9 us of each 2048-element piece it ran on (the first
        # of each task's blocks, and each that ties the running maximum).
        k = np.int64(0)
        for j in range(n):
            k = max(k, _bits64(abs(np.float64(x[j]) - np.float64(_wval(w, j, bf16)))))
        e = _from_bits64(k)
        if e > acc[4] or np.isnan(e):
            acc[4] = e

    @njit(cache=True, inline="always")
    def _add_below(cnt, m, c0, c1, c2, nz, zero_lo):
        # each of the m intervals' count below it (the zeros taken out of a first one from 0)
        if m > 0:
            cnt[4] += c0 - (nz if zero_lo else 0)
        if m > 1:
            cnt[5] += c1
        if m > 2:
            cnt[6] += c2

    @njit(cache=True, inline="always")
    def _add_hist(hist, w, x, n, bf16, ti):
        # the float32 |x - w| of the first n elements into the bins of their top bits: the bins
        # first (int32 ti), in a loop that vectorises; then only the increments one by one
        top = np.int32(hist.size - 1)
        for j in range(n):
            hb = (_bits(abs(x[j] - _wval(w, j, bf16))) >> HIST_SHIFT) - HIST_BASE
            ti[j] = min(max(hb, np.int32(0)), top)
        _add_counts(hist, ti, n)

    @njit(cache=True, inline="always")
    def _add_counts(hist, ti, n):
        for j in range(n):
            hist[np.uint32(ti[j])] += 1


if AVAILABLE:
    @njit(nogil=True, cache=True)
    def _pair_stats(ref, bf16, v, col, lo, hi, flags, acc, cnt, buf, hist):
        # One block of rows of the reference ``ref`` ([rows, K]: bf16 bits as uint16 when bf16,
        # else float32) against the decoded variant rows ``v`` (float32 [rows, K]), while ``v`` is
        # still in the CPU cache. ``col`` (float32 [K], or empty): divide the variant by it first,
        # keeping Σ(v-W)² of the undivided variant in acc[3]. flags: 1 = the float64 sums,
        # 2 = Σ W² too. acc: Σd², ΣW², ΣW·d, Σd_raw², max|d| (float64). cnt: number of exact zeros,
        # number collected (beyond buf.size: overflowed, what buf holds then is undefined), float32
        # bits of the running max |d|, then per interval q how many |d| < lo[q]. The exact float64 |d| of the nonzero
        # elements whose float32 |d| lies in a [lo[q], hi[q]] (disjoint, ascending, float32) go to
        # buf: float32 rounding is monotone, so every element not collected is ranked strictly
        # below or above all collected ones, and the percentiles' order statistics are found
        # exactly among them. ``hist`` (int32 [HIST_BINS], or empty): add the block's float32 |d|
        # into bins of its top bits (see HIST_SHIFT); int32 keeps the bins in use in L1.
        #
        # Each row is taken in pieces of PIECE elements, so that every pass over a piece (the
        # reference widened to float32, the float64 sums, one pass for |d|'s maximum, zeros,
        # counts and hit flags, the hits' collection) finds it in L1.
        rows, k = v.shape
        nbins = hist.size
        m = lo.size
        w = np.empty(PIECE, np.float32)
        wu = w.view(np.uint32)
        xs = np.empty(PIECE, np.float32)
        ti = np.empty(PIECE, np.int32)  # histogram bins
        f = np.zeros(PIECE + 8, np.uint8)  # hit flags, 8 to a word
        fu = f.view(np.uint64)
        words = np.empty(PIECE // 8 + 1, np.int64)
        has_col = col.size > 0
        cap = buf.size
        nb = cnt[1]
        mb = np.uint32(cnt[2])
        # At most three intervals, in scalars so that the loop vectorises; unused ones are empty
        # ([inf, -inf]). Exact zeros are never collected: the lowest bound is at least the
        # smallest positive float32, and a first interval from 0 has the zeros taken back out
        # of its count below.
        inf = np.float32(np.inf)
        tiny = _from_bits(np.int32(1))
        lq = np.full(3, inf, np.float32)
        hq = np.full(3, -inf, np.float32)
        for q in range(m):
            lq[q] = max(lo[q], tiny)
            hq[q] = hi[q]
        zero_lo = m > 0 and lo[0] <= 0
        l0, l1, l2 = lq[0], lq[1], lq[2]
        h0, h1, h2 = hq[0], hq[1], hq[2]
        # the vector pass (_make_vpass) takes what it can: no divisor (undone smoothing keeps the
        # loops below); a histogram (the sample blocks', the exact passes': no intervals) has its
        # bins found by the same pass (one pass over the piece: a quarter of such a call's time)
        # and its increments in a loop after it
        vec = not has_col and v.strides[1] == 4 and ref.strides[1] == ref.itemsize  # (rows in runs)
        hti = np.empty(VPIECE if vec and nbins else 0, np.int32)
        lims = np.empty(6, np.float32)
        for q in range(3):  # (element by element: a slice assignment compiles numba's shape-checked
            lims[q] = lq[q]  # copy, with its error message, 2.4 s of a first run's compilation)
            lims[3 + q] = hq[q]
        vc = np.zeros(6, np.int64)
        vst = np.array([0, cap, 0], np.int64)  # hits so far, the buffer's size, many hits expected
        step = VPIECE if vec else PIECE
        for r in range(rows):
            rr = ref[r]
            vr = v[r]
            for o in range(0, k, step):
                n = min(step, k - o)
                rp = rr[o:o + n]
                vp = vr[o:o + n]
                if vec:
                    nv = n // LANES
                    n16 = nv * LANES
                    vc[:] = 0
                    vst[0] = nb
                    if nbins and m == 0:  # the histogram's bins from the same pass
                        if not flags & 1:
                            _vbins_none(rp, vp, nv, lims, acc, vc, hti, vst)
                        elif flags & 2:
                            _vbins_all(rp, vp, nv, lims, acc, vc, hti, vst)
                        else:
                            _vbins_sums(rp, vp, nv, lims, acc, vc, hti, vst)
                    elif not flags & 1:
                        _vpass_none(rp, vp, nv, lims, acc, vc, buf, vst)
                    elif flags & 2:
                        _vpass_all(rp, vp, nv, lims, acc, vc, buf, vst)
                    else:
                        _vpass_sums(rp, vp, nv, lims, acc, vc, buf, vst)
                    vst[2] = (vst[0] - nb) * DENSE_HITS > n  # the next piece stores without a branch
                    nb = vst[0]
                    cnt[0] += vc[0]
                    vrm = np.int32(vc[5])
                    if np.uint32(vrm) >= mb:
                        mb = np.uint32(vrm)
                        _exact_max(rp, vp, n16, bf16, acc)
                    _add_below(cnt, m, vc[1], vc[2], vc[3], vc[0], zero_lo)
                    if nbins and m == 0:
                        _add_counts(hist, hti, n16)
                    elif nbins:
                        _add_hist(hist, rp, vp, n16, bf16, hti)
                    if n16 == n:
                        continue
                    rp, vp, n = rp[n16:], vp[n16:], n - n16  # the last few: the loops below
                if bf16:
                    for j in range(n):
                        wu[j] = np.uint32(rp[j]) << np.uint32(16)
                else:
                    for j in range(n):
                        w[j] = rp[j]
                if has_col:
                    cp = col[o:o + n]
                    if flags & 1:
                        p_dd, p_ww, p_wd = _row_sums(w[:n], vp, False)
                        acc[3] += p_dd
                    for j in range(n):
                        xs[j] = vp[j] / cp[j]
                    x = xs[:n]
                else:
                    x = vp
                if nbins:
                    _add_hist(hist, w, x, n, False, ti)
                # one pass (int32 lanes: numba would widen a plain count to 64 bits): the largest
                # bits, exact zeros, and per interval the count below it and the hits inside
                rm = np.int32(0)
                nz = np.int32(0)
                c0 = np.int32(0)
                c1 = np.int32(0)
                c2 = np.int32(0)
                nh = np.int32(0)
                if m == 0:
                    for j in range(n):
                        u = _bits(abs(x[j] - w[j]))
                        rm = max(rm, u)
                        nz = np.int32(nz + np.int32(u == 0))
                else:
                    for j in range(n):
                        d = abs(x[j] - w[j])
                        u = _bits(d)
                        rm = max(rm, u)
                        nz = np.int32(nz + np.int32(u == 0))
                        b0 = np.int32(d < l0)
                        b1 = np.int32(d < l1)
                        b2 = np.int32(d < l2)
                        c0 = np.int32(c0 + b0)
                        c1 = np.int32(c1 + b1)
                        c2 = np.int32(c2 + b2)
                        hit = ((np.int32(d <= h0) & ~b0) | (np.int32(d <= h1) & ~b1)
                               | (np.int32(d <= h2) & ~b2))
                        f[j] = np.uint8(hit)
                        nh = np.int32(nh + hit)
                cnt[0] += nz
                if flags & 1:  # after the pass above: measured ~3% faster than before it
                    p_dd, p_ww, p_wd = _row_sums(w[:n], x, flags & 2)
                    acc[0] += p_dd
                    acc[1] += p_ww
                    acc[2] += p_wd
                if np.uint32(rm) >= mb:  # the exact maximum is among the elements reaching the float32 one
                    mb = np.uint32(rm)
                    _exact_max(w, x, n, False, acc)
                _add_below(cnt, m, c0, c1, c2, nz, zero_lo)
                if m == 0 or nh == 0:
                    continue
                nw = (n + 7) // 8
                for j in range(n, 8 * nw):
                    f[j] = 0
                if nb + nh > cap:  # overflow: count on, store what fits (the caller gives up anyway)
                    for j in range(n):
                        if f[j]:
                            if nb < cap:
                                buf[nb] = abs(np.float64(x[j]) - np.float64(w[j]))
                            nb += 1
                    continue
                # the words of 8 hit flags (bytes 0/1) that hold one, listed without a branch
                # (a branch per word mispredicted on most words with a hit); then each one's set
                # bytes in turn, lowest first (the lowest set byte's index from a multiply)
                nsw = 0
                for q in range(nw):
                    words[nsw] = q
                    nsw += fu[q] != 0
                for i in range(nsw):
                    q = words[i]
                    hw = fu[q]
                    while hw:
                        low = hw & (~hw + np.uint64(1))
                        j = 8 * q + np.int64((low * BYTE_INDEX) >> np.uint64(56))
                        buf[nb] = abs(np.float64(x[j]) - np.float64(w[j]))
                        nb += 1
                        hw ^= low
        cnt[1] = nb
        cnt[2] = np.int64(mb)


if AVAILABLE:
    @njit(nogil=True, cache=True)
    def _count_keys(bits, sh, kmin, nk):
        # how many nonzero values have each key (bits >> sh) - kmin. Four interleaved tables
        # when they are small: one bucket often holds half the values (ties), and increments
        # of one counter wait on each other (store to load), 1.6 -> 1.0 ns per value here
        counts = np.zeros(nk, np.int64)
        n = bits.size
        if nk > (1 << 16):
            for i in range(n):
                if bits[i] != 0:
                    counts[np.int64((bits[i] >> sh) - kmin)] += 1
            return counts
        c4 = np.zeros((4, nk + 1), np.int32)
        for i in range(n):
            u = bits[i]
            c4[i & 3, np.int64((u >> sh) - kmin) if u != 0 else nk] += 1
        for j in range(nk):
            counts[j] = np.int64(c4[0, j]) + c4[1, j] + c4[2, j] + c4[3, j]
        return counts

    @njit(nogil=True, cache=True)
    def _key_minmax4(sbits, sh, keys, bmin, bmax):
        # the least and greatest bits (int64: non-negative floats order like their bits) of the
        # values of each of up to four keys, in registers without a branch (a per-bucket
        # min/max in memory waited on itself: 8 ns per value, 1.2 now)
        big = np.int64(0x7FFFFFFFFFFFFFFF)
        none = np.int64(-1)
        w = np.full(4, none, np.int64)
        for q in range(keys.size):
            w[q] = keys[q]
        w0, w1, w2, w3 = w[0], w[1], w[2], w[3]
        m0 = big
        m1 = big
        m2 = big
        m3 = big
        x0 = none
        x1 = none
        x2 = none
        x3 = none
        for j in range(sbits.size):
            b = sbits[j]
            k = b >> sh
            m0 = min(m0, b if k == w0 else big)
            x0 = max(x0, b if k == w0 else none)
            m1 = min(m1, b if k == w1 else big)
            x1 = max(x1, b if k == w1 else none)
            m2 = min(m2, b if k == w2 else big)
            x2 = max(x2, b if k == w2 else none)
            m3 = min(m3, b if k == w3 else big)
            x3 = max(x3, b if k == w3 else none)
        ms = (m0, m1, m2, m3)
        xs = (x0, x1, x2, x3)
        for q in range(keys.size):
            bmin[q] = ms[q]
            bmax[q] = xs[q]

    @njit(nogil=True, cache=True)
    def _slot_minmax(bits, vals, slot, sh, kmin, bmin, bmax):
        # per wanted bucket (slot[key] >= 0), the least and greatest of its values
        for j in range(vals.size):
            u = bits[j]
            if u != 0:
                q = slot[np.int64((u >> sh) - kmin)]
                if q >= 0:
                    bmin[q] = min(bmin[q], vals[j])
                    bmax[q] = max(bmax[q], vals[j])

    @njit(nogil=True, cache=True)
    def _kth(vals, pos, out):
        # out[i] = the pos[i]-th smallest of vals (float64 >= 0, pos ascending), or where
        # where[i] >= 0, sel's where[i]-th once sel is sorted: returns (ok, sel, where); not ok
        # (nothing written) for NaN/inf or a range too wide. Zeros rank first; the rest are
        # bucketed by their top float64 bits (monotone for non-negative floats, 4096 buckets per
        # octave) and only the buckets holding a wanted position are gathered (one pass) into
        # sel, bucket after bucket in ascending order: sorting sel whole (numpy, by the caller)
        # sorts each bucket's slice in place, as the buckets' ranges are disjoint and ascending.
        # (np.sort and np.unique inside cost 4.5 s of a first run's compilation.)
        n = vals.size
        m = pos.size
        where = np.full(m, -1, np.int64)
        none = np.empty(0, np.float64)
        bits = vals.view(np.uint64)
        sh = np.uint64(40)
        kmin = np.uint64(0xFFFFFFFFFFFFFFFF)
        kmax = np.uint64(0)
        nz = 0
        for i in range(n):
            u = bits[i]
            nz += u == 0
            if u != 0:
                kmin = min(kmin, u >> sh)
            kmax = max(kmax, u >> sh)
        if kmax >= np.uint64(0x7FF0000000000000) >> sh:
            return False, none, where  # inf or NaN (or a negative value)
        if nz == n:
            for i in range(m):
                out[i] = 0.0
            return True, none, where
        nk = np.int64(kmax - kmin) + 1
        # coarser buckets for few values: the table (zeroed, then scanned) stays about as long as
        # the values (an 8,192-weight expert spread over ten octaves had 40k buckets)
        while nk > max(1024, n // 2) and sh < np.uint64(60):
            sh += np.uint64(1)
            kmin >>= np.uint64(1)
            kmax >>= np.uint64(1)
            nk = np.int64(kmax - kmin) + 1
        if nk > (1 << 24):
            return False, none, where
        counts = _count_keys(bits, sh, kmin, nk)
        wq = np.full(m, -1, np.int64)  # index in ub of each wanted position's bucket (-1: a zero)
        start = np.zeros(m, np.int64)
        ub = np.empty(m, np.int64)  # the wanted buckets, ascending (pos is)
        nu = 0
        c = nz
        b = 0
        for i in range(m):
            if pos[i] < nz:
                continue
            while c + counts[b] <= pos[i]:
                c += counts[b]
                b += 1
            if nu == 0 or ub[nu - 1] != b:
                ub[nu] = b
                nu += 1
            wq[i] = nu - 1
            start[i] = c
        ub = ub[:nu]
        # a bucket of equal values (ties: bf16-rounded decodes) needs no gathering or sorting
        slot = np.full(nk, -1, np.int32)  # bucket -> its index in ub (-1: not wanted)
        for q in range(nu):
            slot[ub[q]] = q
        if nu <= 8:  # the percentiles' few buckets: in registers, a pass per four
            sbits = vals.view(np.int64)
            lo_bits = np.empty(nu, np.int64)
            hi_bits = np.empty(nu, np.int64)
            for g in range(0, nu, 4):
                e = min(nu, g + 4)
                _key_minmax4(sbits, np.int64(sh), ub[g:e] + np.int64(kmin), lo_bits[g:e], hi_bits[g:e])
            bmin = lo_bits.view(np.float64)
            bmax = hi_bits.view(np.float64)
        else:  # many: one pass through a table (a pass per four cost 1.8 s for 4,000 positions)
            bmin = np.full(nu, np.inf)
            bmax = np.zeros(nu)
            _slot_minmax(bits, vals, slot, sh, kmin, bmin, bmax)
        # one pass gathers every other wanted bucket into its own slice of sel
        off = np.zeros(nu + 1, np.int64)
        for q in range(nu):
            off[q + 1] = off[q] + (counts[ub[q]] if bmin[q] != bmax[q] else 0)
        sel = np.empty(off[nu], np.float64)
        fill = off[:nu].copy()
        if off[nu]:
            for j in range(n):
                u = bits[j]
                if u != 0:
                    q = slot[np.int64((u >> sh) - kmin)]
                    if q >= 0 and bmin[q] != bmax[q]:
                        sel[fill[q]] = vals[j]
                        fill[q] += 1
        for i in range(m):
            q = wq[i]
            if q < 0:
                out[i] = 0.0
            elif bmin[q] == bmax[q]:
                out[i] = bmin[q]
            else:
                where[i] = off[q] + pos[i] - start[i]
        return True, sel, where


if AVAILABLE:
    @njit(nogil=True, cache=True)
    def _lims3(lims, fill):
        # up to three float32 limits as scalars, ``fill`` for the unused ones, so that the loops
        # below vectorise
        return (lims[0] if lims.size > 0 else fill, lims[1] if lims.size > 1 else fill,
                lims[2] if lims.size > 2 else fill)

    @njit(nogil=True, cache=True)
    def _count_lt32(vals, lims, out):
        # out[q] = how many of vals (float64) round to a float32 below lims[q] (float32, at most 3)
        l0, l1, l2 = _lims3(lims, np.float32(np.inf))  # unused: counted, never read
        c0 = 0
        c1 = 0
        c2 = 0
        for i in range(vals.size):
            v = np.float32(vals[i])
            c0 += v < l0
            c1 += v < l1
            c2 += v < l2
        cs = (c0, c1, c2)
        for q in range(lims.size):
            out[q] = cs[q]

    @njit(nogil=True, cache=True)
    def _restrict(vals, home_lo, new_lo, new_hi, below_add, out):
        # Keep the values whose float32 lies in a new interval (into out; returns how many) and
        # count, per new interval j, those in [home_lo[j], new_lo[j]) (now below it). At most
        # three intervals; unused ones are empty ([inf, -inf]) and count nothing.
        inf = np.float32(np.inf)
        h0, h1, h2 = _lims3(home_lo, inf)
        a0, a1, a2 = _lims3(new_lo, inf)
        b0, b1, b2 = _lims3(new_hi, -inf)
        m0 = 0
        m1 = 0
        m2 = 0
        k = 0
        for i in range(vals.size):
            x = vals[i]
            v = np.float32(x)
            m0 += (v >= h0) & (v < a0)
            m1 += (v >= h1) & (v < a1)
            m2 += (v >= h2) & (v < a2)
            out[k] = x  # written always, kept by advancing: no branch per value
            k += ((v >= a0) & (v <= b0)) | ((v >= a1) & (v <= b1)) | ((v >= a2) & (v <= b2))
        ms = (m0, m1, m2)
        for j in range(new_lo.size):
            below_add[j] = ms[j]
        return k


if AVAILABLE:
    @njit(nogil=True, cache=True)
    def _upper(c, x):
        # np.searchsorted(c, x, side="right") of a non-decreasing c (written out: numpy's, its
        # cumsum and mean cost a first run 1.2 s of compilation here)
        a, b = 0, c.size
        while a < b:
            mid = (a + b) // 2
            if c[mid] <= x:
                a = mid + 1
            else:
                b = mid
        return a

    @njit(nogil=True, cache=True)
    def _hist_intervals(hists, qs, n_blocks, z, deff, bins):
        # fused.hist_intervals' arithmetic (see there): bins[k] = (lowest, highest) bin of
        # percentile qs[k]'s interval; returns the sample's count inside their union, zeros
        # (bin 0's) left out, and its size.
        nsb, nb = hists.shape
        h = np.zeros(nb, np.int64)
        sizes = np.zeros(nsb)
        for i in range(nsb):
            t = 0
            for j in range(nb):
                h[j] += hists[i, j]
                t += hists[i, j]
            sizes[i] = t
        c = np.empty(nb, np.int64)
        t = 0
        for j in range(nb):
            t += h[j]
            c[j] = t
        m = c[-1]
        mean_size = 0.0
        for i in range(nsb):
            mean_size += sizes[i]
        mean_size /= nsb
        f = nsb / n_blocks
        rest = n_blocks - nsb
        nq = qs.size
        qb = np.empty(nq, np.int64)
        for k in range(nq):
            qb[k] = _upper(c, qs[k] * (m - 1))
        # per block, its count below each percentile's bin and through it, in one pass
        edge = np.zeros((nsb, nq, 2))
        for i in range(nsb):
            t = 0
            k = 0
            for j in range(nb):
                while k < nq and qb[k] == j:
                    edge[i, k, 0] = t
                    edge[i, k, 1] = t + hists[i, j]
                    k += 1
                if k == nq:
                    break
                t += hists[i, j]
        for k in range(nq):
            q = qs[k]
            var_b = deff * q * (1 - q) / mean_size
            if nsb > 1:
                for e in range(2):
                    mu = 0.0
                    for i in range(nsb):
                        mu += edge[i, k, e] / sizes[i]
                    mu /= nsb
                    ss = 0.0
                    for i in range(nsb):
                        x = edge[i, k, e] / sizes[i] - mu
                        ss += x * x
                    var_b = max(var_b, ss / (nsb - 1))
            se = (1 - f) * np.sqrt(var_b * (1 / nsb + (1 / rest if rest else 0.0)))
            delta = z * se + 2.0 / m
            bl = 0 if q - delta <= 0 else _upper(c, np.floor((q - delta) * (m - 1)))
            bh = nb - 1 if q + delta >= 1 else _upper(c, np.ceil((q + delta) * (m - 1)))
            bins[k, 0] = bl
            bins[k, 1] = min(bh, nb - 1)
        inside = np.zeros(nb, np.bool_)
        for k in range(nq):
            inside[bins[k, 0]:bins[k, 1] + 1] = True
        got = 0
        for j in range(1, nb):
            if inside[j]:
                got += h[j]
        return got, m


def hist_interval_bins(hists: np.ndarray, qs, n_blocks: int, z: float, deff: float):
    """(bins int64 [len(qs), 2], count inside, sample size) for ``fused.hist_intervals``. Needs
    numba, like the one-pass sweep that uses it."""
    bins = np.empty((len(qs), 2), np.int64)
    got, m = _hist_intervals(np.ascontiguousarray(hists, np.int32), np.asarray(qs, np.float64), int(n_blocks),
                             float(z), float(deff), bins)
    return bins, int(got), int(m)


def count_lt32(vals: np.ndarray, lims: np.ndarray) -> np.ndarray:
    """Per float32 limit, how many float64 ``vals`` round (to float32) below it. Needs numba,
    like the one-pass sweep that uses it (:mod:`..fused`)."""
    lims = np.asarray(lims, np.float32)
    out = np.zeros(lims.size, np.int64)
    for q in range(0, lims.size, 3):  # the kernel takes three at a time
        _count_lt32(vals, lims[q:q + 3], out[q:q + 3])
    return out


def restrict(vals: np.ndarray, home_lo: np.ndarray, new_lo: np.ndarray, new_hi: np.ndarray,
             out: np.ndarray | None = None):
    """(kept values, per new interval the count now below it): see ``_restrict``; written into
    ``out`` (float64, at least ``vals.size``) when given. Needs numba."""
    if new_lo.size > 3:
        raise ValueError("restrict takes at most three intervals")
    if out is None:
        out = np.empty(vals.size)
    below = np.zeros(new_lo.size, np.int64)
    k = _restrict(vals, home_lo.astype(np.float32), new_lo.astype(np.float32), new_hi.astype(np.float32),
                  below, out)
    return out[:k], below


def kth_values(vals: np.ndarray, pos) -> np.ndarray | None:
    """The ``pos``-th smallest values (exact) of non-negative float64 ``vals``, or None where
    the compiled path does not apply (no numba, NaN/inf, or a range of thousands of octaves)."""
    if not AVAILABLE or vals.size == 0:
        return None
    p = np.asarray(pos, np.int64)
    order = np.argsort(p, kind="stable")
    out = np.empty(p.size)
    ok, sel, where = _kth(np.ascontiguousarray(vals, np.float64), p[order], out)
    if not ok:
        return None
    if sel.size:
        sel.sort()  # (see _kth: each bucket's slice sorted)
        at = where >= 0
        out[at] = sel[where[at]]
    res = np.empty(p.size)
    res[order] = out
    return res


_NO_HIST = np.zeros(0, np.int32)


def pair_stats(ref: np.ndarray, v: np.ndarray, col: np.ndarray, lo: np.ndarray, hi: np.ndarray, flags: int,
               acc: np.ndarray, cnt: np.ndarray, buf: np.ndarray, hist: np.ndarray | None = None) -> None:
    """Accumulate one block's error statistics into ``acc``/``cnt``/``buf`` (and the histogram
    ``hist`` of float32 |d|, int32 [HIST_BINS], when given; see ``_pair_stats``); ``ref`` is
    float32 or bfloat16 ``[rows, K]``."""
    import ml_dtypes
    bf16 = ref.dtype == np.dtype(ml_dtypes.bfloat16)
    if col.size == 0 and ref.flags.c_contiguous and v.flags.c_contiguous:
        # no per-column divisor: the rows are one run of elements, taken in whole pieces (short
        # rows, e.g. K = 896, cost a piece's setup each)
        ref, v = ref.reshape(1, -1), v.reshape(1, -1)
    _pair_stats(ref.view(np.uint16) if bf16 else ref, bf16, v, col, lo, hi, flags, acc, cnt, buf,
                _NO_HIST if hist is None else hist)


def error_stats(a: np.ndarray, b: np.ndarray, counts: np.ndarray | None):
    """(Σd², ΣW², ΣW·d, max|d|, number of exact zeros of d, ΣŴ², ΣW·Ŵ) of float32 1-D ``a``
    (reference) and ``b``; bucket counts added into ``counts`` (int64 [2**15]) when given (the
    zero count only then). None without numba."""
    if not AVAILABLE:
        return None
    c = counts if counts is not None else np.zeros(1, np.int64)
    return _stats(a, b, c, counts is not None)


if AVAILABLE:
    @njit(nogil=True, cache=True)
    def _small_stats(a, b, out):
        # (Σd², ΣW², ΣW·d, ΣŴ², ΣW·Ŵ) in float64 and out[i] = |b[i] - a[i]| exactly (float64), NaN kept
        sdd, sww, swd, svv, swv = _all_sums(a, b)
        for i in range(a.size):
            out[i] = abs(np.float64(b[i]) - np.float64(a[i]))
        return sdd, sww, swd, svv, swv


def small_stats(a: np.ndarray, b: np.ndarray):
    """``(Σd², ΣW², ΣW·d, ΣŴ², ΣW·Ŵ, |d| float64)`` of float32 1-D ``a`` (reference) and ``b`` in
    one compiled call (numpy took six, more than a small layer's own work); None without numba."""
    if not AVAILABLE:
        return None
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} and {b.shape}")
    out = np.empty(a.size)
    return (*_small_stats(a, b, out), out)


def gather(a: np.ndarray, b: np.ndarray, lut: np.ndarray, bound: int):
    """(exact |d| float64, bucket keys) of the nonzero elements of the wanted buckets (at most
    ``bound``); None without numba."""
    if not AVAILABLE:
        return None
    return _gather(a, b, lut, bound)


def _ro(x):  # checkpoint tensors are read-only mmap views: a distinct compiled signature
    x.flags.writeable = False
    return x


def _warm_mlx() -> None:
    import ml_dtypes

    from . import mlx
    rng = np.random.default_rng(0)
    n, k = 16, 256
    w = _ro(rng.integers(0, 2**32, size=(n, k // 8), dtype=np.uint32))
    s = _ro(np.full((n, k // 64), 0.01, ml_dtypes.bfloat16))
    mlx.decode_affine(w, s, s, bits=4, group_size=64)
    mlx.decode_fp(w, _ro(np.full((n, k // 32), 127, np.uint8)), mode="mxfp4")
    w3 = _ro(rng.integers(0, 2**32, size=(n, k * 3 // 32), dtype=np.uint32))  # 3/5/6-bit: byte path
    mlx.decode_affine(w3, s, s, bits=3, group_size=64)
    mlx.decode_fp(_ro(rng.integers(0, 2**32, size=(n, k // 4), dtype=np.uint32)),
                  _ro(np.full((n, k // 32), 127, np.uint8)), mode="mxfp8")
    # the one-pass sweep's row decoder of MLX layers
    wq = _ro(rng.integers(0, 2**32, size=(64, k // 8), dtype=np.uint32))
    sq = _ro(np.full((64, k // 64), 0.01, ml_dtypes.bfloat16))
    mlx.affine_rows(wq, sq, sq, bits=4, group_size=64).fn(0, 64, np.empty((64, k), np.float32))


def _warm_gptq_awq() -> None:
    from .. import metrics
    from . import awq, gptq
    rng = np.random.default_rng(0)
    n, k = 16, 256
    qw = _ro(rng.integers(0, 2**31, size=(k // 8, n), dtype=np.int32))
    qz = _ro(np.zeros((k // 128, n // 8), np.int32))
    sc = _ro(np.full((k // 128, n), 0.01, np.float16))
    gptq.decode(qw, qz, sc, None, bits=4, group_size=128)
    gptq.decode(qw, qz, sc, _ro(rng.permutation(np.arange(k) // 128).astype(np.int32)), bits=4, group_size=128)
    awq.decode_gemm(_ro(rng.integers(0, 2**31, size=(k, n // 8), dtype=np.int32)), qz, sc, group_size=128)
    a = rng.standard_normal(4096).astype(np.float32)
    metrics.error_metrics(a, a + np.float32(0.01))
    metrics.ErrorStats().add_small(a, a + np.float32(0.01))  # small layers (MoE experts)


def _warm_measure() -> None:
    # the sweep's one-pass path: block decode, pair statistics, interval selection (a float32
    # reference and a plain row decoder: the MLX one is _warm_mlx's, not compiled twice)
    import ml_dtypes

    from .. import fused
    rng = np.random.default_rng(0)
    k = 256
    ref = _ro((rng.standard_normal((64, k)) * 0.02).astype(ml_dtypes.bfloat16))
    v = ref.astype(np.float32) + np.float32(1e-3) * rng.standard_normal((64, k)).astype(np.float32)

    def rows(r0, r1, out):
        out[:] = v[r0:r1]

    fused.measure(ref, {"w": (RowDecoder(rows, 64, k, 1), 0, None)}, parallel=False)
    # a stack of experts stored [E, K, N] (transformers' parameters): its rows read transposed,
    # as stored and as float32, from the read-only mapping
    stored = _ro(np.ascontiguousarray(ref.T))
    columns_as_rows(stored, 0, np.empty((8, 64), ml_dtypes.bfloat16))
    columns_as_rows(stored, 0, np.empty((8, 64), np.float32))
    columns_as_rows(_ro(np.ascontiguousarray(v.T)), 0, np.empty((8, 64), np.float32))
    # the narrowing steps of larger layers (not reached by a layer this small)
    vals = np.abs(rng.standard_normal(256))
    lo, hi = np.array([0.5, 1.0], np.float32), np.array([0.6, 1.2], np.float32)
    count_lt32(vals, lo)
    restrict(vals, lo, lo, hi, np.empty(vals.size))


def _warm_views() -> None:
    # the layer views' kernels (a selected layer's histograms, group error map and code counts):
    # loaded here, not during the first selection, where their loading held the GIL for seconds
    from . import histo
    rng = np.random.default_rng(0)
    a = rng.standard_normal(4096).astype(np.float32)
    b = a + np.float32(0.01)
    edges = np.linspace(-1.0, 1.0, 65)
    histo.finite_range(a)
    histo.finite_range(a.astype(np.float64))  # (the scales and zero points)
    histo.finite_range(a, b)
    histo.counts(a, edges)
    histo.counts(a, edges, b)
    histo.log_abs_counts(a, b, np.linspace(-5.0, 0.0, 9))
    histo.group_sums(a.reshape(64, 64), b.reshape(64, 64), np.arange(64) // 32, 2)  # groups in runs
    histo.group_sums(a.reshape(64, 64), b.reshape(64, 64), np.arange(64) % 2, 2)  # act-order's
    codes = np.zeros(64, np.uint8)
    histo.level_counts(codes, 16)
    histo.level_counts(_ro(codes), 256)  # (packed bytes of a checkpoint: read-only)


def _warm_codes() -> None:
    # value histograms counted from the codes (read-only packed words, as a checkpoint's)
    import ml_dtypes

    from . import awq, gptq, mlx
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2 ** 32, size=(16, 128), dtype=np.uint32)
    bf16 = (rng.random((16, 2)) * 0.01).astype(ml_dtypes.bfloat16)
    f16 = (rng.random((1, 128)) * 0.01).astype(np.float16)
    zeros = _ro(np.full((1, 16), 0x88888888, np.uint32).view(np.int32))
    mlx_words = _ro(np.ascontiguousarray(words[:, :16]))
    found = [mlx.affine_group_values(mlx_words, bf16, bf16, bits=4, group_size=64),
             mlx.affine_group_values(mlx_words, bf16.astype(np.float32), bf16, bits=4, group_size=64),
             gptq.group_values(_ro(words.view(np.int32)), zeros, f16, None, bits=4, group_size=128),
             awq.gemm_group_values(_ro(words.reshape(128, 16).view(np.int32)), zeros[:, :16], f16, group_size=128)]
    from . import ct
    found.append(ct.pack_group_values(_ro(words.view(np.int32)), f16.reshape(16, 8), (16, 1024), bits=4,
                                      group_size=128))
    from .codehist import pattern_values
    found.append(pattern_values(_ro(bf16)))  # (a bf16 reference, per bit pattern)
    for gv in found:
        gv.histogram(np.linspace(*gv.finite_range(), 65))


#: warm_up's parts, by name (precompile runs them in separate processes).
WARM_PARTS = {"mlx": _warm_mlx, "gptq-awq": _warm_gptq_awq, "measure": _warm_measure, "views": _warm_views,
              "codes": _warm_codes}


def warm_up(parts=None) -> None:
    """Load the compiled kernels the common decodes and the metrics use (numba's on-disk cache,
    compiling on a first run), on tiny arrays through the real decoders so the signatures match;
    ``parts``: names of :data:`WARM_PARTS` (all by default).

    The first call of each kernel compiles it on a first run (18 s for all of them, most with the
    GIL held); :mod:`..precompile` runs these parts in child processes to fill the cache instead,
    and the benchmarks call this before timing anything.
    """
    if not AVAILABLE:
        return
    for name in WARM_PARTS if parts is None else parts:
        WARM_PARTS[name]()


# -- conversion (AWQ GEMM -> MLX 4-bit) --------------------------------------------------------

if AVAILABLE:
    @njit(cache=True, inline="always")
    def _swap_bits(a, b, sh, mask):
        # exchange the bits of a selected by mask << sh with the bits of b selected by mask
        t = ((a >> sh) ^ b) & mask
        return a ^ (t << sh), b ^ t

    @njit(nogil=True, cache=True)
    def _awq_to_mlx(qw, order, out, c_lo, c_hi, panel):
        # qw: uint32 [K, N/8] (AWQ GEMM); out: uint32 [N, K/8] (MLX 4-bit rows, LSB first).
        # Nibble slot p of word column c belongs to output row 8c+order[p]; MLX word q of a row
        # holds its codes 8q..8q+7 at bits 0, 4, ..., 28. So the 8 AWQ words of rows 8q..8q+7
        # of one column, read as an 8x8 matrix of nibbles (word i, slot p), transposed, are the
        # 8 MLX words q of that column's 8 output rows: three rounds of masked swaps (16-, 8-,
        # 4-bit blocks), vectorised across q. Panels of packed rows as in _awq_tiled; a
        # [8 columns, 8, panel/8] buffer puts each (column, i) run of q in a line of its own.
        k = qw.shape[0]
        loc = np.empty((AWQ_TILE, 8, panel // 8 + GATHER_PAD), np.uint32)  # (see GATHER_PAD)
        m16, m8, m4 = np.uint32(0x0000FFFF), np.uint32(0x00FF00FF), np.uint32(0x0F0F0F0F)
        s16, s8, s4 = np.uint32(16), np.uint32(8), np.uint32(4)
        for p0 in range(0, k, panel):
            nr = min(panel, k - p0)
            nq = nr // 8
            b = p0 // 8
            for c0 in range(c_lo, c_hi, AWQ_TILE):
                nc = min(c_hi, c0 + AWQ_TILE) - c0
                blk = qw[p0:p0 + nr, c0:c0 + nc]
                if nc == AWQ_TILE:  # constant trip count
                    for q in range(nq):
                        for i in range(8):
                            qr = blk[8 * q + i]
                            for c in range(AWQ_TILE):
                                loc[c, i, q] = qr[c]
                else:
                    for q in range(nq):
                        for i in range(8):
                            qr = blk[8 * q + i]
                            for c in range(nc):
                                loc[c, i, q] = qr[c]
                for c in range(nc):
                    lc = loc[c]
                    l0, l1, l2, l3, l4, l5, l6, l7 = lc[0], lc[1], lc[2], lc[3], lc[4], lc[5], lc[6], lc[7]
                    rb = (c0 + c) * 8
                    # row views sliced to the panel: indices from 0 (no wraparound checks), so
                    # LLVM vectorises the loop below
                    o0, o1 = out[rb + order[0], b:b + nq], out[rb + order[1], b:b + nq]
                    o2, o3 = out[rb + order[2], b:b + nq], out[rb + order[3], b:b + nq]
                    o4, o5 = out[rb + order[4], b:b + nq], out[rb + order[5], b:b + nq]
                    o6, o7 = out[rb + order[6], b:b + nq], out[rb + order[7], b:b + nq]
                    for q in range(nq):
                        w0, w1, w2, w3 = l0[q], l1[q], l2[q], l3[q]
                        w4, w5, w6, w7 = l4[q], l5[q], l6[q], l7[q]
                        w0, w4 = _swap_bits(w0, w4, s16, m16)
                        w1, w5 = _swap_bits(w1, w5, s16, m16)
                        w2, w6 = _swap_bits(w2, w6, s16, m16)
                        w3, w7 = _swap_bits(w3, w7, s16, m16)
                        w0, w2 = _swap_bits(w0, w2, s8, m8)
                        w1, w3 = _swap_bits(w1, w3, s8, m8)
                        w4, w6 = _swap_bits(w4, w6, s8, m8)
                        w5, w7 = _swap_bits(w5, w7, s8, m8)
                        w0, w1 = _swap_bits(w0, w1, s4, m4)
                        w2, w3 = _swap_bits(w2, w3, s4, m4)
                        w4, w5 = _swap_bits(w4, w5, s4, m4)
                        w6, w7 = _swap_bits(w6, w7, s4, m4)
                        o0[q], o1[q], o2[q], o3[q] = w0, w1, w2, w3
                        o4[q], o5[q], o6[q], o7[q] = w4, w5, w6, w7


if AVAILABLE:
    @njit(nogil=True, cache=True)
    def _awq_scales_biases(sc, qz, shifts, s_out, b_out, c_lo, c_hi):
        # sc: scales [G, N] (cast to float32 by the caller: exact for fp16/bf16);
        # qz: uint32 [G, N/8] (AWQ GEMM zero words; empty: symmetric, z = 8). Output rows
        # [8*c_lo, 8*c_hi) of s_out = scales and b_out = -(s*z), float32 [N, G]: MLX's layout.
        ng = sc.shape[0]
        has_z = qz.shape[0] > 0
        for c in range(c_lo, c_hi):
            for g in range(ng):
                w = qz[g, c] if has_z else np.uint32(0)
                for i in range(8):
                    n = 8 * c + i
                    s = sc[g, n]
                    z = np.float32((w >> shifts[i]) & np.uint32(15)) if has_z else np.float32(8.0)
                    s_out[n, g] = s
                    b_out[n, g] = -(s * z)


def awq_scales_biases(scales: np.ndarray, qzeros: np.ndarray | None, shifts: np.ndarray):
    """AWQ GEMM ``scales [G, N]`` and packed ``qzeros [G, N/8]`` (None: symmetric, zero 8) as
    MLX's float32 ``scales`` and ``biases = -scales*zero``, both ``[N, G]``, in one pass; None
    without numba or for shapes that do not fit (the kernel does not check its indices)."""
    if not AVAILABLE or scales.ndim != 2 or scales.shape[1] % 8:
        return None
    ng, n = scales.shape
    if qzeros is not None and tuple(qzeros.shape) != (ng, n // 8):
        return None
    s32 = np.ascontiguousarray(scales, np.float32)
    qz = (np.zeros((0, n // 8), np.uint32) if qzeros is None else np.ascontiguousarray(qzeros).view(np.uint32))
    s_out = np.empty((n, ng), np.float32)
    b_out = np.empty((n, ng), np.float32)
    sh = np.ascontiguousarray(shifts, np.uint32)
    _rows(n, 8 * ng, lambda r0, r1: _awq_scales_biases(s32, qz, sh, s_out, b_out, r0 // 8, r1 // 8),
          align=8, min_rows=256)
    return s_out, b_out


if AVAILABLE:
    @njit(nogil=True, cache=True)
    def _columns(src, n0, widen, dst):
        # dst[r, k] = src[k, n0 + r] in 32×32 tiles, both sides' cache lines kept in L1 (numpy's
        # copy of a transposed view walks one side a whole row apart: 2-13 ns per element):
        # rows of an expert stored [K, N]; with ``widen``, src holds bf16 bits and dst float32
        kk = src.shape[0]
        nr = dst.shape[0]
        for rb in range(0, nr, 32):
            re_ = min(rb + 32, nr)
            for kb in range(0, kk, 32):
                ke = min(kb + 32, kk)
                for r in range(rb, re_):
                    for k in range(kb, ke):
                        if widen:
                            dst[r, k] = _from_bits(np.int32(np.uint32(src[k, n0 + r]) << np.uint32(16)))
                        else:
                            dst[r, k] = src[k, n0 + r]


def columns_as_rows(src: np.ndarray, n0: int, dst: np.ndarray) -> bool:
    """Write columns ``[n0, n0 + len(dst))`` of ``src`` ``[K, N]`` into ``dst`` ``[rows, K]`` as its
    rows: float32 from bf16, or src's own dtype (2, 4 or 8 bytes); False where there is no kernel
    for it (the kernel runs in the calling thread: a sweep's worker calls it)."""
    if not AVAILABLE or src.ndim != 2 or dst.ndim != 2 or not dst.flags.c_contiguous \
            or dst.shape[1] != src.shape[0] or not 0 <= n0 <= n0 + dst.shape[0] <= src.shape[1]:
        return False  # (the kernel does not check its indices)
    if dst.dtype == src.dtype and src.dtype.itemsize in (2, 4, 8):
        u = f"u{src.dtype.itemsize}"  # (the bits as they are: bf16 included, which numba does not know)
        _columns(src.view(u), n0, False, dst.view(u))
    elif dst.dtype == np.float32 and src.dtype.name == "bfloat16":
        _columns(src.view(np.uint16), n0, True, dst)
    else:
        return False
    return True


def awq_to_mlx_weight(qweight: np.ndarray, order: np.ndarray) -> np.ndarray | None:
    """AWQ GEMM ``qweight [K, N/8]`` → MLX 4-bit ``uint32 [N, K/8]`` (nibble slot p of word column
    c is output row ``8c + order[p]``); None without numba or for a K not a multiple of 8."""
    if not AVAILABLE or qweight.shape[0] % 8 or sys.byteorder != "little":
        return None
    qw = np.ascontiguousarray(qweight).view(np.uint32)
    k, n8 = qw.shape
    out = np.empty((n8 * 8, k // 8), np.uint32)
    od = np.ascontiguousarray(order, np.int64)
    _rows(n8 * 8, k, lambda r0, r1: _awq_to_mlx(qw, od, out, r0 // 8, r1 // 8, AWQ_PANEL),
          align=8, min_rows=8 * AWQ_TILE)
    return out
