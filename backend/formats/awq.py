"""AWQ (AutoAWQ / GPTQModel AWQ): GEMM and GEMV layouts — formats.md §4.

``W[n,k] = s[k//G, n] * (q[k,n] - z[k//G, n])``, no +1 on zeros, no g_idx. The product is exact
in float32 and equals AutoAWQ's own dequantization run in float32 (verified on the real fixture);
a runtime's fp16 cast is not applied (see gptq.py).
"""

from __future__ import annotations

import numpy as np

from ..bitpack import unpack_bits
from . import fast
from .common import check
from .kernel import for_row_blocks
from .mlx import codes_as_float

#: Nibble slot i of a GEMM word holds column 8c + ORDER[i]; logical column j sits in slot REV[j].
ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])
REV = np.argsort(ORDER)
_SHIFTS = (4 * REV).astype(np.uint32)


def gemm_dims(qweight_shape, scales_shape, name=None) -> tuple[int, int, int]:
    """(N, K, G) of an AWQ GEMM layer: qweight ``[K, N/8]``, scales ``[K/G, N]``."""
    check(len(qweight_shape) == 2 and len(scales_shape) == 2, "AWQ tensors must be 2-D", name)
    k, n8 = qweight_shape
    n = n8 * 8
    check(scales_shape[1] == n, f"scales {list(scales_shape)} should have N={n} columns (qweight {list(qweight_shape)} × 8)", name)
    check(scales_shape[0] > 0 and k % scales_shape[0] == 0,
          f"K={k} rows of qweight are not a whole number of scale groups ({scales_shape[0]})", name)
    return n, k, k // scales_shape[0]


def unpack_gemm(packed: np.ndarray, n: int) -> np.ndarray:
    """Codes ``uint8 [rows, N]`` in logical column order from GEMM-interleaved words."""
    slots = unpack_bits(packed, 4, n).reshape(packed.shape[0], n // 8, 8)
    return np.ascontiguousarray(slots[:, :, REV]).reshape(packed.shape[0], n)


def check_gemm(qweight, qzeros, scales, group_size, name=None) -> tuple[int, int, int, int]:
    """(N, K, G, groups) of an AWQ GEMM layer after the checks a decode makes, from shapes alone
    (nothing is read: doctor and convert run it on every layer of any size)."""
    n, k, g = gemm_dims(qweight.shape, scales.shape, name)
    if group_size not in (None, -1):
        check(g == group_size, f"scales imply group size {g}, config says {group_size}", name)
    ng = k // g
    if qzeros is not None:
        check(qzeros.shape == (ng, n // 8), f"qzeros {list(qzeros.shape)} should be [{ng}, {n // 8}]", name)
    return n, k, g, ng


def _gemm_prep(qweight, qzeros, scales, group_size, name):
    n, k, g, ng = check_gemm(qweight, qzeros, scales, group_size, name)
    return n, k, g, ng, np.ascontiguousarray(scales, np.float32)


def gemm_rows(qweight, qzeros, scales, *, group_size: int | None = None, name=None) -> fast.RowDecoder | None:
    """The compiled row decoder of an AWQ GEMM layer (row ranges in multiples of 8), or None."""
    n, k, g, _, s32 = _gemm_prep(qweight, qzeros, scales, group_size, name)
    fn = fast.awq_gemm_rows(qweight, s32, qzeros, g, _SHIFTS, k)
    # any multiple of 8 rows is decoded right; blocks of 64 rows fill the kernel's tile of 8
    # packed word columns (whole 8x8 word transposes) and read half as many partial cache lines
    # of the [K, N/8] words: a 3-variant sweep of an 8B model's down_proj (32-row blocks) took
    # 1.5-1.7x as long as with 64-row blocks
    return None if fn is None else fast.RowDecoder(fn, n, k, 8, 64)


def gemm_group_values(qweight, qzeros, scales, *, group_size: int | None = None, name=None, n0: int = 0,
                      n1: int | None = None):
    """The decoded values of outputs ``[n0, n1)`` as code counts per group
    (:class:`.codehist.GroupValues`, for exact histograms), or None (no kernel for it)."""
    from . import codehist
    n, _, g, ng, s32 = _gemm_prep(qweight, qzeros, scales, group_size, name)
    z = np.full((ng, n), 8, np.float32) if qzeros is None else unpack_gemm(qzeros, n).astype(np.float32)
    return codehist.awq_gemm(qweight, s32, z, g, _SHIFTS, n0, n if n1 is None else n1)


def decode_gemm(qweight, qzeros, scales, *, group_size: int | None = None, name=None,
                out: np.ndarray | None = None) -> np.ndarray:
    """Dequantize AWQ GEMM (4-bit) to float32 ``[N, K]``. ``qzeros`` None means symmetric (z = 8)."""
    n, k, g, ng, s32 = _gemm_prep(qweight, qzeros, scales, group_size, name)
    if out is None:
        out = np.empty((n, k), np.float32)
    u = qweight.view(np.uint32)
    if fast.awq_gemm(qweight, s32, qzeros, g, _SHIFTS, out):  # reads the packed zeros itself
        return out
    z = np.full((ng, n), 8, np.float32) if qzeros is None else unpack_gemm(qzeros, n).astype(np.float32)
    s_t = np.ascontiguousarray(s32.T)  # [N, ng]
    bias_t = -(s_t * z.T)

    def block(r0, r1):
        # Output rows 8c..8c+7 come from word column c of qweight [K, N/8]: transpose the packed
        # words (8x less data than the output), then shift out each logical column's nibble.
        c0, c1 = r0 // 8, r1 // 8
        words = np.ascontiguousarray(u[:, c0:c1].T)  # [C, K]
        codes = np.right_shift(words[:, None, :], _SHIFTS[None, :, None])
        codes &= 0xF
        blk = out[r0:r1]
        np.copyto(blk, codes.reshape(r1 - r0, k))
        b3 = blk.reshape(r1 - r0, ng, g)
        np.multiply(b3, s_t[r0:r1, :, None], out=b3)
        b3 += bias_t[r0:r1, :, None]

    for_row_blocks(n, k, block, align=8, min_rows=16)
    return out


def gemv_dims(qweight_shape, scales_shape, group_size: int, name=None) -> tuple[int, int, int]:
    check(len(qweight_shape) == 2 and len(scales_shape) == 2, "AWQ tensors must be 2-D", name)
    n, k8 = qweight_shape
    k = k8 * 8
    check(scales_shape[0] == n, f"GEMV scales {list(scales_shape)} should have N={n} rows", name)
    check(group_size > 0 and k % group_size == 0, f"K={k} is not a multiple of group size {group_size}", name)
    ng = k // group_size
    check(scales_shape[1] >= ng, f"GEMV scales have {scales_shape[1]} columns, K/G needs {ng}", name)
    return n, k, ng


def decode_gemv(qweight, qzeros, scales, *, group_size: int, name=None) -> np.ndarray:
    """Dequantize AWQ GEMV (qweight ``[N, K/8]`` sequential along K; padded zeros/scales)."""
    n, k, ng = check_gemv(qweight, qzeros, scales, group_size, name)
    s = scales[:, :ng].astype(np.float32)
    z = np.full((n, ng), 8, np.float32) if qzeros is None else unpack_bits(qzeros, 4, ng).astype(np.float32)
    q = codes_as_float(qweight, 4, k).reshape(n, ng, group_size)
    return (q * s[:, :, None] + (-(s * z))[:, :, None]).reshape(n, k)


def codes_gemm(qweight) -> np.ndarray:
    """Stored codes ``uint8 [N, K]`` of a GEMM weight."""
    return unpack_gemm(qweight, qweight.shape[1] * 8).T.copy()


def codes_gemv(qweight) -> np.ndarray:
    return unpack_bits(qweight, 4, qweight.shape[1] * 8)


def gemm_to_mlx_affine(qweight, qzeros, scales, *, name=None):
    """Exact MLX-affine equivalent (weight u32 [N, K/8], scales f32 [N, K/G], biases f32) or None."""
    from ..bitpack import pack_bits
    n, k, g, _ = check_gemm(qweight, qzeros, scales, None, name)  # decode_gemm's checks (qzeros shape)
    if g not in (32, 64, 128):
        return None
    q = unpack_gemm(qweight, n)  # [K, N]
    w = pack_bits(np.ascontiguousarray(q.T), 4)
    s = np.ascontiguousarray(scales.astype(np.float32).T)
    z = np.full((k // g, n), 8, np.float32) if qzeros is None else unpack_gemm(qzeros, n).astype(np.float32)
    return w, s, -(s * z.T)


def check_gemv(qweight, qzeros, scales, group_size, name=None) -> tuple[int, int, int]:
    """(N, K, groups) of an AWQ GEMV layer after the checks a decode makes, from shapes alone."""
    n, k, ng = gemv_dims(qweight.shape, scales.shape, group_size, name)
    if qzeros is not None:
        check(qzeros.shape[0] == n and qzeros.shape[1] * 8 >= ng, f"GEMV qzeros {list(qzeros.shape)} do not fit "
              f"[N={n}, ≥{ng}/8]", name)
    return n, k, ng


def gemv_to_mlx_affine(qweight, qzeros, scales, *, group_size: int, name=None):
    n, k, ng = check_gemv(qweight, qzeros, scales, group_size, name)
    if group_size not in (32, 64, 128):
        return None
    s = np.ascontiguousarray(scales[:, :ng].astype(np.float32))
    z = np.full((n, ng), 8, np.float32) if qzeros is None else unpack_bits(qzeros, 4, ng).astype(np.float32)
    return np.ascontiguousarray(qweight).view(np.uint32), s, -(s * z)
