"""MLX quantized layouts: affine (1-8 bits) and the block-float modes mxfp4, mxfp8, nvfp4.

Layouts and formulas: formats.md §1 and §2. The decoders here are checked bit-for-bit against
``mx.dequantize`` (tests/test_formats_mlx.py).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from ..bitpack import _as_bytes, unpack_bits
from . import fast
from .common import check
from .kernel import for_row_blocks, round_inplace, unpack_codes_into

#: Defaults per mode when a per-layer config entry omits a value (formats.md §1.5).
MODE_DEFAULTS = {"affine": (4, 64), "mxfp4": (4, 32), "nvfp4": (4, 16), "mxfp8": (8, 32)}
AFFINE_BITS = (1, 2, 3, 4, 5, 6, 8)
AFFINE_GROUPS = (32, 64, 128)

# Byte -> the codes it holds, as float32 (exact small integers): one gather per output element
# instead of shift/mask/convert passes.
_BYTE_LUTS = {b: unpack_bits(np.arange(256, dtype=np.uint8)[:, None], b, 8 // b).astype(np.float32)
              for b in (1, 2, 4)}

#: OCP E2M1 values of codes 0..15 (bit 3 = sign).
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
#: E4M3 "fn" values of bytes 0..255 (NaN for 0x7F/0xFF) and E8M0 values as MLX decodes them:
#: 2**(s-127), byte 0 the subnormal 2**-127, and byte 255 +inf (MLX builds the bf16 bits s << 7:
#: 2**128 overflows), where the OCP format says NaN — mx.dequantize is the reference here.
E4M3 = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
E8M0 = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
E8M0[255] = np.inf

#: Rows per block: keeps a block's codes and products in cache while it is scaled.
_BLOCK_ELEMS = 1 << 17


def codes_as_float(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Unpack LSB-first codes along the last axis straight to float32."""
    by = _as_bytes(packed)
    lut = _BYTE_LUTS.get(bits)
    if lut is not None:
        per = 8 // bits
        nb = -(-count // per)
        f = lut[by[..., :nb]]
        return f.reshape(by.shape[:-1] + (nb * per,))[..., :count]
    if bits == 8:
        return by[..., :count].astype(np.float32)
    return unpack_bits(by, bits, count).astype(np.float32)


def affine_fits(wp: int, s: int) -> list[tuple[int, int]]:
    """The MLX affine (bits, group) pairs that fit a packed weight of ``wp`` uint32 words and ``s``
    scales per row: 32·W = b·G·S (4/64 and 8/32 fit the same shapes)."""
    return [(b, g) for b in AFFINE_BITS for g in AFFINE_GROUPS if wp * 32 == b * g * s]


def affine_shape(weight_shape, scales_shape, bits: int, group_size: int, name=None) -> tuple[int, ...]:
    """Logical shape of an MLX affine weight, checking ``32*Wp/b == G*S`` (R18)."""
    check(len(weight_shape) >= 2, f"packed weight has rank {len(weight_shape)}; quantized weights need rank ≥ 2", name)
    check(tuple(scales_shape[:-1]) == tuple(weight_shape[:-1]),
          f"scales {list(scales_shape)} do not match the packed weight {list(weight_shape)} in their leading dims", name)
    wp, s = weight_shape[-1], scales_shape[-1]
    check((wp * 32) % bits == 0, f"packed width {wp} words is not a whole number of {bits}-bit codes", name)
    k = wp * 32 // bits
    check(k == group_size * s,
          f"packed weight {list(weight_shape)} holds K={k} inputs at {bits} bits, but scales {list(scales_shape)} "
          f"× group {group_size} cover {group_size * s} (bits/group do not fit: 32·W/b ≠ G·S)", name)
    return tuple(weight_shape[:-1]) + (k,)


def _affine_prep(weight, scales, biases, bits, group_size, name):
    check(weight.dtype == np.uint32, f"packed weight is {weight.dtype}, expected uint32", name)
    check(biases is not None and biases.shape == scales.shape,
          "affine layer needs .biases with the shape of .scales", name)
    shape = affine_shape(weight.shape, scales.shape, bits, group_size, name)
    n_rows = int(np.prod(shape[:-1]))
    ng = shape[-1] // group_size
    w2 = weight.reshape(n_rows, weight.shape[-1])
    s2 = scales.reshape(n_rows, ng).astype(np.float32)
    b2 = biases.reshape(n_rows, ng).astype(np.float32)
    return shape, w2, s2, b2


def affine_rows(weight: np.ndarray, scales: np.ndarray, biases: np.ndarray, *, bits: int, group_size: int,
                name: str | None = None) -> fast.RowDecoder | None:
    """The compiled row decoder of an MLX affine layer (flattened rows), or None (no kernel)."""
    shape, w2, s2, b2 = _affine_prep(weight, scales, biases, bits, group_size, name)
    fn = fast.mlx_affine_rows(_as_bytes(w2), s2, b2, bits, group_size, shape[-1], scales.dtype)
    return None if fn is None else fast.RowDecoder(fn, w2.shape[0], shape[-1], 1)


def affine_group_values(weight: np.ndarray, scales: np.ndarray, biases: np.ndarray, *, bits: int, group_size: int,
                        name: str | None = None, r0: int = 0, r1: int | None = None):
    """The decoded values of flattened rows ``[r0, r1)`` as code counts per group
    (:class:`.codehist.GroupValues`, for exact histograms), or None (no kernel for it)."""
    from . import codehist
    _, w2, s2, b2 = _affine_prep(weight, scales, biases, bits, group_size, name)
    return codehist.mlx_affine(w2, s2, b2, scales.dtype, bits, group_size, r0, r1)


def decode_affine(weight: np.ndarray, scales: np.ndarray, biases: np.ndarray, *, bits: int,
                  group_size: int, name: str | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Dequantize an MLX affine weight exactly as ``mx.dequantize`` does on the CPU.

    ``W = s*q + b`` per group, where MLX rounds ``s*q`` to the scale dtype and then the sum
    (verified: 0 differences against mx.dequantize for bf16/fp16/fp32 scales).

    Parameters
    ----------
    weight
        ``uint32 [..., N, K*bits/32]``.
    scales, biases
        ``[..., N, K/G]`` in the model dtype.
    bits, group_size
        The layer's effective settings.
    out
        Optional float32 ``[..., N, K]`` array to write into.

    Returns
    -------
    numpy.ndarray
        float32 ``[..., N, K]``.
    """
    shape, w2, s2, b2 = _affine_prep(weight, scales, biases, bits, group_size, name)
    sdt = scales.dtype
    n_rows, k = w2.shape[0], shape[-1]
    ng = k // group_size
    if out is None:
        out = np.empty(shape, np.float32)
    o2 = out.reshape(n_rows, k)
    if fast.mlx_affine(_as_bytes(w2), s2, b2, bits, group_size, k, sdt, o2):
        return out

    def block(r0, r1):
        blk = o2[r0:r1]
        unpack_codes_into(w2[r0:r1], bits, k, blk)
        b3 = blk.reshape(r1 - r0, ng, group_size)
        np.multiply(b3, s2[r0:r1, :, None], out=b3)
        round_inplace(blk, sdt)  # MLX rounds s*q to the scale dtype, then the sum
        b3 += b2[r0:r1, :, None]
        round_inplace(blk, sdt)

    for_row_blocks(n_rows, k, block)
    return out


def fp_shape(weight_shape, scales_shape, mode: str, name=None) -> tuple[int, ...]:
    bits, group = MODE_DEFAULTS[mode]
    return affine_shape(weight_shape, scales_shape, bits, group, name)


def _fp_prep(weight, scales, mode, global_scale, name):
    check(mode in ("mxfp4", "mxfp8", "nvfp4"), f"unknown block-float mode {mode!r}", name)
    check(weight.dtype == np.uint32, f"packed weight is {weight.dtype}, expected uint32", name)
    check(scales.dtype == np.uint8, f"{mode} scales are {scales.dtype}, expected uint8 (E8M0/E4M3 bytes)", name)
    bits, group = MODE_DEFAULTS[mode]
    shape = fp_shape(weight.shape, scales.shape, mode, name)
    table = E4M3 if mode == "nvfp4" else E8M0
    gs = None
    if mode == "nvfp4" and global_scale is not None:
        # MLX computes global/2688 once and folds it into the block scale before multiplying
        # the element (verified bit-exact against mx.dequantize; other orders differ by 1 ulp).
        gs = np.float32(global_scale) / np.float32(2688.0)
    n_rows = int(np.prod(shape[:-1]))
    w2 = _as_bytes(weight).reshape(n_rows, -1)
    s2 = scales.reshape(n_rows, shape[-1] // group)
    elem_table = E2M1 if bits == 4 else E4M3
    return bits, group, shape, table, elem_table, gs, w2, s2


def fp_rows(weight: np.ndarray, scales: np.ndarray, *, mode: str, global_scale: float | None = None,
            name: str | None = None) -> fast.RowDecoder | None:
    """The compiled row decoder of an mxfp4/mxfp8/nvfp4 layer (flattened rows), or None."""
    bits, group, shape, table, elem_table, gs, w2, s2 = _fp_prep(weight, scales, mode, global_scale, name)
    fn = fast.block_float_rows(w2, s2, elem_table, table, gs, bits, group, shape[-1])
    return None if fn is None else fast.RowDecoder(fn, w2.shape[0], shape[-1], 1)


def decode_fp(weight: np.ndarray, scales: np.ndarray, *, mode: str, global_scale: float | None = None,
              name: str | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Dequantize mxfp4 / mxfp8 / nvfp4 (formats.md §2) to float32.

    mx modes: ``elem(q) * 2**(s-127)``; nvfp4: ``E2M1[q] * E4M3(s)`` (× ``global_scale/2688``
    when a global scale is given). Products of these small formats are exact in float32, so the
    result equals ``mx.dequantize(..., dtype=float32)``.
    """
    bits, group, shape, table, elem_table, gs, w2, s2 = _fp_prep(weight, scales, mode, global_scale, name)
    k = shape[-1]
    ng = k // group
    n_rows = w2.shape[0]
    if out is None:
        out = np.empty(shape, np.float32)
    check(out.shape == tuple(shape) and out.dtype == np.float32, f"output buffer {out.shape} is not float32 {shape}", name)
    o2 = out.reshape(n_rows, k)
    if fast.block_float(w2, s2, elem_table, table, gs, bits, group, k, o2):
        return out

    def block(r0, r1):
        # Element and scale values through np.take on 16/256-entry tables: a fancy-index gather
        # is ~10x slower than take here.
        if bits == 4:
            codes = np.empty((r1 - r0, k), np.uint8)
            by = w2[r0:r1, :k // 2]
            np.bitwise_and(by, 0x0F, out=codes[:, 0::2])
            np.right_shift(by, 4, out=codes[:, 1::2])
        else:
            codes = w2[r0:r1, :k]
        blk = o2[r0:r1]
        np.take(elem_table, codes, out=blk)
        sc = np.take(table, s2[r0:r1])
        b3 = blk.reshape(r1 - r0, ng, group)
        with np.errstate(over="ignore", invalid="ignore"):  # (as MLX: ±inf past float32, 0·inf NaN)
            if gs is not None:
                sc *= gs
            b3 *= sc[:, :, None]

    for_row_blocks(n_rows, k, block)
    return out


def affine_codes(weight: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The stored codes ``uint8 [..., N, K]`` of an affine or block-float weight."""
    return unpack_bits(weight, bits, k)
