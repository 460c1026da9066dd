"""FP8 checkpoints: DeepSeek-style block scales and E8M0-scaled MXFP8 — formats.md §6.

Per-tensor / per-channel FP8 (compressed-tensors ``float-quantized``, ``weight_scale``) is
decoded by :func:`quantscope.backend.formats.ct.decode_naive`.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .common import check

__all__ = ["decode_fp8_block", "decode_mxfp8", "E4M3_VALUES"]

_FP8 = {np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)}
_SCALE_FLOATS = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)}

#: Value of every E4M3 "fn" byte 0..255 (0x7F/0xFF are NaN; no infinities; max 448), built
#: from the bit fields of formats.md §2 — tests check it against ml_dtypes' conversion.
_b = np.arange(256)
_e, _m = (_b >> 3) & 0xF, _b & 7
E4M3_VALUES = np.where(_e == 0, _m / 8.0 * 2.0 ** -6, (1 + _m / 8.0) * 2.0 ** (_e - 7.0))
E4M3_VALUES = np.where(_b & 0x80, -E4M3_VALUES, E4M3_VALUES)
E4M3_VALUES[(_b & 0x7F) == 0x7F] = np.nan
E4M3_VALUES = E4M3_VALUES.astype(np.float32)
del _b, _e, _m


def _as_fp8(weight: np.ndarray, name: str | None) -> np.ndarray:
    w = np.asarray(weight)
    if w.dtype == np.uint8:                 # raw bytes (e.g. as mx.load returns them)
        w = w.view(ml_dtypes.float8_e4m3fn)
    check(w.dtype in _FP8, f"weight must be F8_E4M3 (or F8_E5M2), got {w.dtype}", name)
    check(w.ndim >= 2, f"weight must be at least 2-D, has shape {list(w.shape)}", name)
    return w


def decode_fp8_block(weight: np.ndarray, weight_scale_inv: np.ndarray,
                     block_size: tuple[int, int] = (128, 128), *,
                     name: str | None = None) -> np.ndarray:
    """Dequantize a DeepSeek-V3-style FP8 weight with per-tile scales (formats.md §6).

    ``W[n, k] = float32(fp8[n, k]) * float32(scale_inv[n // bn, k // bk])``. Despite its name
    ``weight_scale_inv`` is a multiplier. DeepSeek's ``weight_dequant`` kernel computes exactly
    this float32 product and then stores it in the default dtype (bf16); we return the float32
    product (one rounding, identical to the kernel's before its final cast) so callers can see
    the checkpoint's own precision — apply ``common.round_to(w, bfloat16)`` for the bf16 model.

    Parameters
    ----------
    weight
        F8_E4M3 ``[..., N, K]`` (U8 raw bytes are reinterpreted as E4M3).
    weight_scale_inv
        F32 (some models BF16/F16) ``[..., ceil(N/bn), ceil(K/bk)]``; edge tiles are partial.
    block_size
        ``quantization_config.weight_block_size`` ``[bn, bk]``. Take it from the config: it
        cannot be derived from the shapes when N or K is not a multiple of it (rule R12).
    name
        Tensor name for error messages.

    Returns
    -------
    numpy.ndarray
        float32 ``[..., N, K]``.

    Raises
    ------
    LayerError
        When the scale grid is not ``ceil(N/bn) x ceil(K/bk)`` or the dtypes are wrong.
    """
    w = _as_fp8(weight, name)
    s = np.asarray(weight_scale_inv)
    check(s.dtype in _SCALE_FLOATS, f"weight_scale_inv must be F32/BF16/F16, got {s.dtype}", name)
    check(isinstance(block_size, (list, tuple)) and len(block_size) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in block_size),
          f"weight_block_size {list(block_size) if isinstance(block_size, (list, tuple)) else block_size!r} is not "
          "two integers [rows, columns]", name)
    bn, bk = (int(v) for v in block_size)
    check(bn > 0 and bk > 0, f"block size {[bn, bk]} must be positive", name)
    *lead, N, K = w.shape
    grid = tuple(lead) + (-(-N // bn), -(-K // bk))
    check(s.shape == grid,
          f"weight_scale_inv has shape {list(s.shape)} but weight [{N}, {K}] with "
          f"weight_block_size [{bn}, {bk}] needs {list(grid)} (ceil(N/bn) x ceil(K/bk); edge "
          f"tiles are partial). Take the block size from quantization_config.weight_block_size: "
          f"deriving it from the shapes is wrong whenever N or K is not a multiple of it", name)
    out = w.astype(np.float32)
    s32 = s.astype(np.float32)
    if N % bn == 0 and K % bk == 0:
        # Broadcast over a tile view: no expanded scale array for the common aligned case.
        v = out.reshape(*lead, N // bn, bn, K // bk, bk)
        v *= s32[..., :, None, :, None]
        return out
    out *= np.repeat(np.repeat(s32, bn, axis=-2)[..., :N, :], bk, axis=-1)[..., :K]
    return out


def decode_mxfp8(weight: np.ndarray, scales: np.ndarray, *, group_size: int = 32,
                 name: str | None = None) -> np.ndarray:
    """Dequantize MXFP8: F8_E4M3 weight × ``2^(s-127)`` per ``group_size`` columns (E8M0 scales).

    Checkpoints such as MiniMax's store the scales as U8 exponent bytes; decoding them as
    linear numbers gives weights ~10^5× too large (rule R14, formats.md §6), so float scale
    dtypes are refused here. Exponent byte 255 is E8M0's NaN. The product of an E4M3 value and
    a power of two is exact in float32 unless it underflows, so no compute dtype is involved.

    Parameters
    ----------
    weight
        F8_E4M3 ``[..., N, K]``.
    scales
        U8 (or F8_E8M0) ``[..., N, ceil(K/group_size)]``.
    group_size
        Columns per scale (32 for MX formats).
    name
        Tensor name for error messages.

    Returns
    -------
    numpy.ndarray
        float32 ``[..., N, K]``.
    """
    w = _as_fp8(weight, name)
    s = np.asarray(scales)
    check(s.dtype in (np.dtype(np.uint8), np.dtype(ml_dtypes.float8_e8m0fnu)),
          f"MXFP8 scales must be U8 (E8M0 exponent bytes), got {s.dtype}; a float scale "
          f"tensor is a per-tile or per-channel multiplier (decode_fp8_block / decode_naive)",
          name)
    K = w.shape[-1]
    ng = -(-K // group_size)
    check(s.shape == w.shape[:-1] + (ng,),
          f"scales have shape {list(s.shape)} but weight {list(w.shape)} with "
          f"{group_size} columns per scale needs {list(w.shape[:-1]) + [ng]}", name)
    scale = s.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    out = w.astype(np.float32)
    if K % group_size == 0:
        v = out.reshape(*w.shape[:-1], ng, group_size)
        v *= scale[..., None]
        return out
    out *= np.repeat(scale, group_size, axis=-1)[..., :K]
    return out
