"""compressed-tensors (llm-compressor / vLLM) weight decoders — formats.md §5.

Covers ``pack-quantized`` (INT 1–8 bit in int32 words, both packing generations),
``int-quantized`` / ``float-quantized`` / ``naive-quantized`` (unpacked I8 or F8_E4M3),
``mxfp8-quantized`` (F8_E4M3 + E8M0 scale bytes), ``nvfp4-pack-quantized`` and
``mxfp4-pack-quantized``.

Numerics: quantscope returns the exact value of the format's formula in float32, like every
integer decoder here (see gptq.py): ``q - zp`` is an integer of at most 9 bits and its product
with a bf16/fp16 scale is exact in float32 (fp8 × bf16 likewise). compressed-tensors' own
``dequantize`` computes the same product in the scale dtype, i.e. ``round_to(result, scale
dtype)`` equals the library's output bit for bit — verified against compressed-tensors 0.19.0
(and 0.16.0 for the legacy packing and ``g_idx``) by the golden files in
``tests/fixtures/golden``, and the unrounded value equals llm-compressor's decode run in float32
on the real fixtures in ``tests/fixtures/real``.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from .. import bitpack
from ..errors import LayerError
from .common import check

__all__ = [
    "E2M1_VALUES", "detect_packing", "codes_pack_quantized", "decode_pack_quantized",
    "decode_naive", "decode_nvfp4", "decode_mxfp4", "decode_mxfp8", "e8m0_to_float32",
    "pack_quantized", "pack_zero_points",
]

#: OCP FP4 E2M1 value of each 4-bit code (bit 3 = sign); formats.md §2.
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                        -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)

_BF16 = np.dtype(ml_dtypes.bfloat16)
_FP8_TYPES = {np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2)}
_FLOATS = {np.dtype(np.float32), np.dtype(np.float16), _BF16, np.dtype(np.float64)}


# ----------------------------------------------------------------------------------- helpers

def _shape_of(weight_shape) -> tuple[int, ...]:
    """``weight_shape`` as stored (I64/I32 tensor ``[2]``) or given (tuple) as a tuple of ints."""
    return tuple(int(v) for v in np.asarray(weight_shape).reshape(-1))


def _scale_dtype(scale: np.ndarray, name: str | None) -> np.dtype:
    dt = np.asarray(scale).dtype
    check(dt in _FLOATS, f"weight_scale must be F32/F16/BF16, got {dt}", name)
    return dt


def _legacy_cols(count: int, bits: int) -> int:
    return -(-count // (32 // bits))


def _dense_cols(count: int, bits: int) -> int:
    return -(-count * bits // 32)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for p in str(version).split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def detect_packing(packed_cols: int, in_features: int, bits: int, *, version: str | None = None,
                   name: str | None = None) -> str:
    """Tell which ``pack-quantized`` generation wrote a ``weight_packed`` tensor.

    compressed-tensors 0.17.0 (PR #715) switched 3/5/6/7-bit packing from ``floor(32/b)`` values
    per int32 word (top bits unused, rows padded to whole words) to a dense LSB-first bit stream
    (formats.md §5.2, rule R9). The two give different column counts for any realistic K, so
    the stored width decides; ``version`` (``quantization_config.version``) only settles the
    tiny layers where both counts coincide.

    Parameters
    ----------
    packed_cols
        ``weight_packed.shape[-1]``.
    in_features
        K, the last entry of ``weight_shape``.
    bits
        ``num_bits`` of the weight scheme.
    version
        compressed-tensors version that wrote the checkpoint, if known.
    name
        Tensor name for error messages.

    Returns
    -------
    str
        ``"dense"`` (≥ 0.17, and every 1/2/4/8-bit file, where both generations agree) or
        ``"legacy"`` (< 0.17).

    Raises
    ------
    LayerError
        When the width fits neither generation.
    """
    check(1 <= bits <= 8, f"num_bits {bits} is not in 1..8", name)
    dense = _dense_cols(in_features, bits)
    legacy = _legacy_cols(in_features, bits)
    if 32 % bits == 0:
        check(packed_cols == dense,
              f"weight_packed has {packed_cols} columns but K={in_features} at {bits} bits "
              f"needs {dense}", name)
        return "dense"
    if packed_cols == dense and packed_cols == legacy:
        if version is not None and _version_tuple(version) < (0, 17):
            return "legacy"
        return "dense"
    if packed_cols == dense:
        return "dense"
    if packed_cols == legacy:
        return "legacy"
    raise LayerError(
        f"weight_packed has {packed_cols} columns but K={in_features} at {bits} bits needs "
        f"{dense} (compressed-tensors ≥ 0.17) or {legacy} (< 0.17)", tensor=name)


def _resolve_packing(packing: str, cols: int, count: int, bits: int, name, what="weight_packed"):
    if packing == "auto":
        return detect_packing(cols, count, bits, name=name)
    check(packing in ("dense", "legacy"), f"packing must be auto, dense or legacy, not {packing!r}",
          name)
    want = _dense_cols(count, bits) if packing == "dense" else _legacy_cols(count, bits)
    if 32 % bits == 0:
        want = _dense_cols(count, bits)
    check(cols == want,
          f"{what} has {cols} words per row but {count} values at {bits} bits in the "
          f"{packing} layout need {want}", name)
    return packing


def _unpack_legacy(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """< 0.17 layout: word j holds values ``j*pf .. j*pf+pf-1`` at bits ``b*i`` (pf = 32 // b)."""
    pf = 32 // bits
    w = np.ascontiguousarray(words).view(np.uint32)
    shifts = (np.arange(pf, dtype=np.uint32) * np.uint32(bits))
    codes = (w[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return codes.astype(np.uint8).reshape(*w.shape[:-1], w.shape[-1] * pf)[..., :count]


def _unpack_rows(packed: np.ndarray, bits: int, count: int, layout: str) -> np.ndarray:
    if layout == "legacy" and 32 % bits:
        return _unpack_legacy(packed, bits, count)
    return bitpack.unpack_bits(np.ascontiguousarray(packed).view(np.uint32), bits, count)


def _expand_cols(a: np.ndarray, K: int, group_size: int) -> np.ndarray:
    """Repeat each group column ``group_size`` times and cut to K (partial last group allowed)."""
    return np.repeat(a, group_size, axis=-1)[..., :K]


# ------------------------------------------------------------------------------ pack-quantized

def codes_pack_quantized(weight_packed: np.ndarray, weight_shape, *, bits: int,
                         packing: str = "auto", name: str | None = None) -> np.ndarray:
    """Unpack ``weight_packed`` to the stored unsigned codes (signed code + 2^(b-1)).

    Parameters
    ----------
    weight_packed
        I32 ``[..., N, cols]`` as stored.
    weight_shape
        The stored ``weight_shape`` tensor (or a tuple) ``[..., N, K]``.
    bits
        ``num_bits``.
    packing
        ``"auto"`` (decide from the width, see :func:`detect_packing`), ``"dense"`` or
        ``"legacy"``.
    name
        Tensor name for error messages.

    Returns
    -------
    numpy.ndarray
        ``uint8`` codes ``[..., N, K]`` in ``0 .. 2^b - 1``; the code for a real zero is ``2^(b-1)``.
    """
    shape = _shape_of(weight_shape)
    check(len(shape) >= 2, f"weight_shape {list(shape)} must have at least 2 entries", name)
    wp = np.asarray(weight_packed)
    check(wp.dtype in (np.dtype(np.int32), np.dtype(np.uint32)),
          f"weight_packed must be I32, got {wp.dtype}", name)
    check(wp.ndim == len(shape) and wp.shape[:-1] == shape[:-1],
          f"weight_packed has shape {list(wp.shape)} but weight_shape {list(shape)} needs "
          f"{list(shape[:-1]) + ['cols']}", name)
    layout = _resolve_packing(packing, wp.shape[-1], shape[-1], bits, name)
    return _unpack_rows(wp, bits, shape[-1], layout)


def _zero_points(zp: np.ndarray, N: int, ng: int, bits: int, layout: str, lead: tuple,
                 name) -> np.ndarray:
    """Signed zero points ``[..., N, ng]`` from either storage generation (formats.md §5.2).

    ≥ 0.9.4 packs them along dim 0 (output channels) with the weight's packing generation and
    the +2^(b-1) offset; older files stored signed integers unpacked as ``[N, K/G]``.
    """
    zp = np.asarray(zp)
    if zp.dtype.kind not in "iu":
        raise LayerError(f"weight_zero_point must be an integer tensor, got {zp.dtype}", tensor=name)
    if zp.size == 1 and N * ng != 1:
        return zp.reshape(1, 1).astype(np.int16)       # tensor strategy: never packed
    rows = _dense_cols(N, bits) if layout == "dense" or 32 % bits == 0 else _legacy_cols(N, bits)
    unpacked = lead + (N, ng)
    # Only a 1-row layer makes both shapes equal; then the packed int32 form is the newer one.
    if zp.shape == unpacked and not (rows == N and zp.dtype == np.int32):
        return zp.astype(np.int16)
    check(zp.shape == lead + (rows, ng),
          f"weight_zero_point has shape {list(zp.shape)}; expected packed along N "
          f"{list(lead) + [rows, ng]} (compressed-tensors >= 0.9.4, {layout} packing) or "
          f"unpacked {list(unpacked)} (older)", name)
    t = np.swapaxes(zp, -1, -2)                        # pack axis last
    codes = _unpack_rows(np.ascontiguousarray(t), bits, N, layout)
    return np.swapaxes(codes, -1, -2).astype(np.int16) - (1 << (bits - 1))


def zero_levels(weight_zero_point: np.ndarray, weight_packed: np.ndarray, weight_scale: np.ndarray,
                weight_shape, *, bits: int, packing: str = "auto", name: str | None = None) -> np.ndarray:
    """A ``pack-quantized`` layer's zero points as unsigned code levels ``[..., N, groups]``
    (signed zero point + 2^(b-1)): the scale GPTQ's and AWQ's zero points use, so that one
    histogram compares them. Either storage generation (see :func:`_zero_points`)."""
    shape = _shape_of(weight_shape)
    *lead, N, K = shape
    layout = _resolve_packing(packing, np.asarray(weight_packed).shape[-1], K, bits, name)
    s = np.asarray(weight_scale)
    ng = s.shape[-1] if s.ndim >= 2 else 1
    return _zero_points(weight_zero_point, N, ng, bits, layout, tuple(lead), name) + (1 << (bits - 1))


def decode_pack_quantized(weight_packed: np.ndarray, weight_scale: np.ndarray, weight_shape, *,
                          bits: int, group_size: int | None = None, strategy: str = "group",
                          weight_zero_point: np.ndarray | None = None,
                          g_idx: np.ndarray | None = None, packing: str = "auto",
                          name: str | None = None) -> np.ndarray:
    """Dequantize a compressed-tensors ``pack-quantized`` weight (formats.md §5.2).

    ``W[n, k] = (q[n, k] - 2^(b-1) - zp[n, g(k)]) * s[n, g(k)]`` (exact in float32) with
    ``g(k) = g_idx[k]`` when act-order ``g_idx`` is given, else ``k // group_size``.

    Parameters
    ----------
    weight_packed
        I32 ``[..., N, cols]``: dense bit stream (≥ 0.17) or ``floor(32/b)`` values per word (< 0.17).
    weight_scale
        F32/F16/BF16; group ``[..., N, ceil(K/G)]``, channel ``[..., N, 1]``, tensor ``[1]``.
    weight_shape
        Stored ``weight_shape`` (``[..., N, K]``).
    bits
        ``num_bits`` (1..8).
    group_size
        ``group_size`` for the group strategy.
    strategy
        ``"group"``, ``"channel"`` or ``"tensor"``.
    weight_zero_point
        Asymmetric schemes only: packed along N (≥ 0.9.4) or unpacked ``[N, K/G]`` (older).
    g_idx
        ``weight_g_idx`` ``[K]`` (``actorder: group``). compressed-tensors < 0.19 sorted columns by
        ``g_idx`` and dequantized contiguous runs; that equals the per-column lookup used here
        whenever every group index occurs. Like the library, a ``g_idx`` containing ``-1``
        (uninitialised) is ignored. compressed-tensors 0.19 dropped act-order support.
    packing
        ``"auto"`` | ``"dense"`` | ``"legacy"``; see :func:`detect_packing`.
    name
        Tensor name for error messages.

    Returns
    -------
    numpy.ndarray
        float32 ``[..., N, K]``: the exact product (the library rounds it to the scale dtype).

    Raises
    ------
    LayerError
        When shapes or dtypes do not fit together.
    """
    shape = _shape_of(weight_shape)
    codes = codes_pack_quantized(weight_packed, shape, bits=bits, packing=packing, name=name)
    layout = _resolve_packing(packing, np.asarray(weight_packed).shape[-1], shape[-1], bits, name)
    q = codes.astype(np.float32)
    q -= np.float32(1 << (bits - 1))
    return _apply_scale_zp(q, weight_scale, weight_zero_point, g_idx, shape, strategy,
                           group_size, bits, layout, name)


def pack_group_values(weight_packed: np.ndarray, weight_scale: np.ndarray, weight_shape, *, bits: int,
                      group_size: int | None = None, strategy: str = "group",
                      weight_zero_point: np.ndarray | None = None, g_idx: np.ndarray | None = None,
                      packing: str = "auto", name: str | None = None, r0: int = 0, r1: int | None = None):
    """The decoded values (:func:`decode_pack_quantized`'s) of flattened rows ``[r0, r1)`` as code
    counts per group (:class:`.codehist.GroupValues`, for exact histograms), or None where there
    is no kernel for it (act-order, 3/5/6/7 bits, groups that are not whole words)."""
    from . import codehist
    shape = _shape_of(weight_shape)
    if len(shape) < 2 or bits not in (2, 4):
        return None
    *lead, N, K = shape
    rows = int(np.prod(lead, dtype=np.int64)) * N
    wp = np.asarray(weight_packed)
    layout = _resolve_packing(packing, wp.shape[-1], K, bits, name)
    if g_idx is not None and not (np.asarray(g_idx) < 0).any():
        return None  # (act-order: a group's codes are not a run of words)
    s_full, ng, G = _scale_grid(weight_scale, strategy, group_size, None, tuple(lead), N, K, name)
    if K % G:
        return None  # (a last group of fewer codes)
    s32 = np.broadcast_to(s_full.reshape(-1, ng), (rows, ng))
    off = np.full((rows, ng), np.float32(1 << (bits - 1)))
    if weight_zero_point is not None:
        zp = _zero_points(weight_zero_point, N, ng, bits, layout, tuple(lead), name)
        off = off + np.broadcast_to(zp.reshape(-1, 1) if zp.size == 1 else zp.reshape(rows, ng), (rows, ng))
    return codehist.ct_pack(wp.reshape(rows, -1), bits, G, np.ascontiguousarray(s32), np.ascontiguousarray(off,
                            np.float32), r0, rows if r1 is None else r1)


def _scale_grid(weight_scale, strategy, group_size, g_idx, lead: tuple, N: int, K: int, name):
    """(the scales as float32 — ``[1, 1]`` for a tensor, ``[..., N, 1]`` per channel,
    ``[..., N, groups]`` per group —, the number of groups, the group size) of a weight of shape
    ``lead + (N, K)``, after the checks that they fit."""
    s = np.asarray(weight_scale)
    _scale_dtype(s, name)  # refuses non-float scales
    s32 = s.astype(np.float32)
    if strategy == "tensor":
        check(s.size == 1, f"tensor-strategy weight_scale must hold one value, has shape "
              f"{list(s.shape)}", name)
        return s32.reshape(1, 1), 1, K
    if strategy == "channel":
        check(s.shape in (lead + (N, 1), lead + (N,)),
              f"channel-strategy weight_scale has shape {list(s.shape)}, expected "
              f"{list(lead) + [N, 1]}", name)
        return s32.reshape(lead + (N, 1)), 1, K
    if strategy in ("group", "tensor_group"):
        check(group_size is not None and group_size > 0,
              "group strategy needs a positive group_size", name)
        G = int(group_size)
        ng = -(-K // G)
        if g_idx is not None:
            ng = s.shape[-1] if s.ndim else 1
        check(s.shape == lead + (N, ng) or (g_idx is not None and s.shape[:-1] == lead + (N,)),
              f"weight_scale has shape {list(s.shape)} but N={N}, K={K}, group_size={G} "
              f"need {list(lead) + [N, -(-K // G)]}", name)
        return s32, ng, G
    raise LayerError(f"strategy {strategy!r} is not one of tensor/channel/group", tensor=name)


def _apply_scale_zp(q, weight_scale, weight_zero_point, g_idx, shape, strategy, group_size,
                    bits, layout, name):
    """``(q - zp) * s`` with the scale broadcast by strategy (q is float32, signed)."""
    *lead, N, K = shape
    lead = tuple(lead)
    s_full, ng, G = _scale_grid(weight_scale, strategy, group_size, g_idx, lead, N, K, name)
    zp = None
    if weight_zero_point is not None:
        zp = _zero_points(weight_zero_point, N, ng, bits, layout, lead, name).astype(np.float32)
        if strategy in ("tensor", "channel") and zp.size == 1:
            zp = zp.reshape(1, 1)

    gi = None
    if g_idx is not None:
        gi = np.asarray(g_idx).reshape(-1)
        check(gi.shape == (K,), f"weight_g_idx has {gi.size} entries but K={K}", name)
        if (gi < 0).any():
            gi = None                     # the library treats -1 as "no act-order"
        else:
            check(int(gi.max()) < ng, f"weight_g_idx refers to group {int(gi.max())} but "
                  f"weight_scale has {ng} groups", name)

    if strategy in ("group", "tensor_group"):
        if gi is not None:
            s_full = np.take(s_full, gi, axis=-1)
            if zp is not None:
                zp = np.take(zp, gi, axis=-1)
        elif ng > 1 or K != G:
            s_full = _expand_cols(s_full, K, G)
            if zp is not None:
                zp = _expand_cols(zp, K, G)
    if zp is not None:
        q -= zp
    q *= s_full
    return q


# --------------------------------------------------------------------------- naive / int / fp8

def decode_naive(weight: np.ndarray, weight_scale: np.ndarray,
                 weight_zero_point: np.ndarray | None = None, g_idx: np.ndarray | None = None, *,
                 strategy: str = "channel", group_size: int | None = None,
                 block_structure=None, name: str | None = None) -> np.ndarray:
    """Dequantize an unpacked ``int-quantized`` / ``float-quantized`` / ``naive-quantized`` weight.

    ``W = (float(q) - zp) * s`` (float32) with the scale broadcast by strategy
    (formats.md §5.3). For block strategy the stored weight is ``[N, K]`` (unpadded) while the
    scale grid is ``[ceil(N/bn), ceil(K/bk)]``: edge tiles are partial (compressed-tensors
    PR #547 pads internally, then truncates).

    Parameters
    ----------
    weight
        I8 (int scheme) or F8_E4M3 / F8_E5M2 (float scheme) ``[N, K]``.
    weight_scale
        F32/F16/BF16: tensor ``[1]``; channel ``[N, 1]``; group ``[N, ceil(K/G)]``;
        block ``[ceil(N/bn), ceil(K/bk)]``.
    weight_zero_point
        Asymmetric int schemes: unpacked, same shape as ``weight_scale``.
    g_idx
        Optional act-order ``[K]`` for the group strategy.
    strategy
        ``"tensor"``, ``"channel"``, ``"group"`` or ``"block"``.
    group_size
        For ``"group"``.
    block_structure
        ``[bn, bk]`` for ``"block"``.
    name
        Tensor name for error messages.

    Returns
    -------
    numpy.ndarray
        float32 ``[N, K]``.
    """
    w = np.asarray(weight)
    check(w.ndim >= 2, f"weight must be at least 2-D, has shape {list(w.shape)}", name)
    check(w.dtype == np.int8 or w.dtype in _FP8_TYPES,
          f"weight must be I8 or F8_E4M3/F8_E5M2, got {w.dtype}", name)
    q = w.astype(np.float32)
    if strategy != "block":
        return _apply_scale_zp(q, weight_scale, weight_zero_point, g_idx, w.shape, strategy,
                               group_size, 8, "dense", name)
    check(block_structure is not None and len(block_structure) == 2,
          "block strategy needs block_structure [rows, cols]", name)
    bn, bk = (int(v) for v in block_structure)
    *lead, N, K = w.shape
    s = np.asarray(weight_scale)
    _scale_dtype(s, name)  # refuses non-float scales
    grid = (-(-N // bn), -(-K // bk))
    check(s.shape == tuple(lead) + grid,
          f"block weight_scale has shape {list(s.shape)} but [N, K] = [{N}, {K}] with "
          f"block_structure [{bn}, {bk}] needs {list(lead) + list(grid)}", name)
    full = _tile(s.astype(np.float32), bn, bk, N, K)
    if weight_zero_point is not None:
        zp = np.asarray(weight_zero_point)
        check(zp.shape == s.shape, f"weight_zero_point has shape {list(zp.shape)}, expected "
              f"{list(s.shape)} like weight_scale", name)
        q -= _tile(zp.astype(np.float32), bn, bk, N, K)
    q *= full
    return q


def _tile(grid: np.ndarray, bn: int, bk: int, N: int, K: int) -> np.ndarray:
    """Expand a per-tile grid to ``[..., N, K]`` (edge tiles partial)."""
    return np.repeat(np.repeat(grid, bn, axis=-2)[..., :N, :], bk, axis=-1)[..., :K]


# ----------------------------------------------------------------------------- fp4 / mx formats

def e8m0_to_float32(scale: np.ndarray) -> np.ndarray:
    """E8M0 exponent bytes (U8 or F8_E8M0) as float32 ``2^(s-127)``; 255 decodes to NaN."""
    s = np.asarray(scale)
    if s.dtype == np.uint8:
        s = s.view(ml_dtypes.float8_e8m0fnu)
    return s.astype(np.float32)


def codes_fp4(packed: np.ndarray, name: str | None = None) -> np.ndarray:
    """The E2M1 codes ``uint8 [..., N, K]`` of NVFP4/MXFP4 bytes ``[..., N, K/2]`` (compressed-tensors'
    and ModelOpt's packing: low nibble = even element)."""
    p = np.asarray(packed)
    check(p.dtype == np.uint8, f"weight_packed must be U8 for fp4 formats, got {p.dtype}", name)
    # Low nibble = even element (formats.md §5.4): the same byte layout as MLX nvfp4/mxfp4.
    return bitpack.unpack_bits(p, 4, p.shape[-1] * 2)


def decode_nvfp4(weight_packed: np.ndarray, weight_scale: np.ndarray,
                 weight_global_scale: np.ndarray, *, group_size: int = 16,
                 name: str | None = None) -> np.ndarray:
    """Dequantize ``nvfp4-pack-quantized`` (formats.md §5.4).

    compressed-tensors 0.19 computes ``bf16(E2M1[q] * f32(f32(E4M3(s)) / weight_global_scale))``:
    the E4M3 scale is first divided by the float32 global scale (a **divisor**, unlike
    ModelOpt's ``weight_scale_2``; rule R11), the product is taken in float32 and the result is
    cast to bfloat16 (``unpack_fp4_from_uint8``'s default dtype). This function returns the
    float32 product before that cast (rounded to bfloat16 it is the library's value, bit for bit;
    within 2^-9 relative of it unrounded), as the FP8 decoders return theirs.

    Parameters
    ----------
    weight_packed
        U8 ``[N, K/2]``, low nibble = even element.
    weight_scale
        F8_E4M3 ``[N, K/16]``.
    weight_global_scale
        F32 ``[1]``.
    group_size
        16 for NVFP4.
    name
        Tensor name for error messages.

    Returns
    -------
    numpy.ndarray
        float32 ``[N, K]``.
    """
    codes, s, gs = _nvfp4_parts(weight_packed, "weight_packed", weight_scale, weight_global_scale,
                                "weight_global_scale", group_size, name)
    return _nvfp4_values(codes, s.astype(np.float32) / gs, group_size)


def _nvfp4_parts(packed, packed_name: str, weight_scale, second, second_name: str, group_size: int, name):
    """(codes, E4M3 block scales, the second-level scale as a float32 scalar) of an NVFP4 layer,
    their shapes and dtypes checked."""
    codes = codes_fp4(packed, name)
    s = np.asarray(weight_scale)
    K = codes.shape[-1]
    ng = -(-K // group_size)
    check(s.shape == codes.shape[:-1] + (ng,),
          f"weight_scale has shape {list(s.shape)} but {packed_name} {list(np.shape(packed))}"
          f" (K={K}) with group size {group_size} needs {list(codes.shape[:-1]) + [ng]}", name)
    check(s.dtype == np.dtype(ml_dtypes.float8_e4m3fn), f"nvfp4 weight_scale must be F8_E4M3, got {s.dtype}", name)
    g = np.asarray(second).astype(np.float32)
    check(g.size == 1, f"{second_name} must hold one value, has shape {list(g.shape)}", name)
    return codes, s, g.reshape(())


def _nvfp4_values(codes: np.ndarray, block: np.ndarray, group_size: int) -> np.ndarray:
    """E2M1 values of ``codes`` times their group's float32 scale ``block``."""
    out = E2M1_VALUES[codes]
    out *= _expand_cols(block, codes.shape[-1], group_size)
    return out


def decode_modelopt_nvfp4(weight: np.ndarray, weight_scale: np.ndarray, weight_scale_2: np.ndarray, *,
                          group_size: int = 16, name: str | None = None) -> np.ndarray:
    """Dequantize NVIDIA ModelOpt's NVFP4 export (formats.md §1.6 and R11): ``weight`` U8
    ``[N, K/2]`` (two E2M1 codes a byte, low nibble = even element, as compressed-tensors'),
    ``weight_scale`` F8_E4M3 ``[N, K/16]`` and ``weight_scale_2`` F32, one value.

    ModelOpt's ``NVFP4QTensor.dequantize`` takes ``E2M1[q] * f32(f32(E4M3(s)) * weight_scale_2)``
    in float32 and casts it to the model's dtype: the second-level scale is a **multiplier**
    (``amax / (6·448)``), the reciprocal of compressed-tensors' ``weight_global_scale`` (rule
    R11). Returned as that float32 product, before the cast.
    """
    codes, s, s2 = _nvfp4_parts(weight, "weight", weight_scale, weight_scale_2, "weight_scale_2", group_size, name)
    return _nvfp4_values(codes, s.astype(np.float32) * s2, group_size)


def decode_mxfp4(weight_packed: np.ndarray, weight_scale: np.ndarray, *, group_size: int = 32,
                 name: str | None = None) -> np.ndarray:
    """Dequantize ``mxfp4-pack-quantized`` (formats.md §5.4): ``E2M1[q] * 2^(s-127)`` in bf16.

    compressed-tensors decodes the U8 exponent to a bf16 power of two and multiplies in bf16
    (exact: an E2M1 value times a power of two). As in the library (``2.0 ** 128`` in bf16),
    exponent byte 255 gives ±inf rather than E8M0's NaN.

    Parameters
    ----------
    weight_packed
        U8 ``[N, K/2]``.
    weight_scale
        U8 ``[N, K/32]`` (E8M0 exponent bytes; never linear floats — rule R14).
    group_size
        32 for MXFP4.
    name
        Tensor name for error messages.

    Returns
    -------
    numpy.ndarray
        float32 ``[N, K]``.
    """
    codes = codes_fp4(weight_packed, name)
    s = np.asarray(weight_scale)
    K = codes.shape[-1]
    ng = -(-K // group_size)
    check(s.dtype in (np.dtype(np.uint8), np.dtype(ml_dtypes.float8_e8m0fnu)),
          f"mxfp4 weight_scale must be U8 E8M0 exponent bytes, got {s.dtype} (decoding linear "
          f"scales as exponents, or exponents as linear scales, is off by orders of magnitude)",
          name)
    check(s.shape == codes.shape[:-1] + (ng,),
          f"weight_scale has shape {list(s.shape)} but K={K} with group size {group_size} needs "
          f"{list(codes.shape[:-1]) + [ng]}", name)
    e = s.view(np.uint8).astype(np.int32) - 127
    with np.errstate(over="ignore"):
        scale = np.ldexp(np.float32(1), e).astype(np.float32)  # 2^128 -> inf, like the library
    out = E2M1_VALUES[codes]
    out *= _expand_cols(scale, K, group_size)
    return out


def decode_mxfp8(weight: np.ndarray, weight_scale: np.ndarray, *, group_size: int = 32,
                 name: str | None = None) -> np.ndarray:
    """Dequantize compressed-tensors ``mxfp8-quantized``: F8_E4M3 × ``2^(s-127)`` per 32 columns.

    The library multiplies in bf16, which is exact here (E4M3 value times a power of two), so
    the value equals :func:`quantscope.backend.formats.fp8.decode_mxfp8`'s float32 product
    rounded to bf16.
    """
    from .fp8 import decode_mxfp8 as _fp8_mx
    return _fp8_mx(weight, weight_scale, group_size=group_size, name=name)


# ------------------------------------------------------------------------------------ packers

def pack_quantized(codes_signed: np.ndarray, bits: int, packing: str = "dense") -> np.ndarray:
    """Pack signed codes ``[..., N, K]`` along K as compressed-tensors does (for tests/conversion).

    Parameters
    ----------
    codes_signed
        Integers in ``[-2^(b-1), 2^(b-1) - 1]``.
    bits
        1..8.
    packing
        ``"dense"`` (≥ 0.17 bit stream) or ``"legacy"`` (< 0.17, ``floor(32/b)`` per word).

    Returns
    -------
    numpy.ndarray
        int32 ``[..., N, cols]``.
    """
    c = np.asarray(codes_signed).astype(np.int32) + (1 << (bits - 1))
    if c.size and (c.min() < 0 or c.max() >= (1 << bits)):
        raise ValueError(f"signed codes outside the {bits}-bit range")
    K = c.shape[-1]
    if packing == "dense" or 32 % bits == 0:
        words = bitpack.pack_bits(c.astype(np.uint8), bits, np.uint32)
        return np.ascontiguousarray(words[..., :_dense_cols(K, bits)]).view(np.int32)
    if packing != "legacy":
        raise ValueError(f"packing must be dense or legacy, not {packing!r}")
    pf = 32 // bits
    cols = _legacy_cols(K, bits)
    pad = np.zeros(c.shape[:-1] + (cols * pf,), np.uint32)
    pad[..., :K] = c
    runs = pad.reshape(c.shape[:-1] + (cols, pf))
    shifts = np.arange(pf, dtype=np.uint32) * np.uint32(bits)
    words = np.bitwise_or.reduce(runs << shifts, axis=-1).astype(np.uint32)
    return words.view(np.int32)


def pack_zero_points(zp_signed: np.ndarray, bits: int, packing: str = "dense") -> np.ndarray:
    """Pack signed zero points ``[..., N, ng]`` along N (dim 0), as compressed-tensors ≥ 0.9.4."""
    t = np.swapaxes(np.asarray(zp_signed), -1, -2)
    return np.ascontiguousarray(np.swapaxes(pack_quantized(t, bits, packing), -1, -2))



def to_mlx_affine(weight_packed: np.ndarray, weight_scale: np.ndarray, weight_shape, *, bits: int,
                  group_size: int | None, strategy: str = "group", weight_zero_point=None, g_idx=None,
                  packing: str = "auto", name: str | None = None):
    """Exact MLX-affine equivalent ``(weight u32, scales f32, biases f32)`` of a pack-quantized
    layer, or None when it has no such form (formats.md §9).

    Representable when the codes form a dense LSB-first stream (bits 1/2/4/8, or the ≥ 0.17
    layout), groups are contiguous with G ∈ {32, 64, 128} and there is no act-order ``g_idx``:
    then ``weight_packed`` viewed as uint32 *is* the MLX weight, and
    ``biases = -(2^(b-1) + zp) * s`` is exact in float32.
    """
    shape = _shape_of(weight_shape)
    *lead, n, k = shape
    if strategy != "group" or group_size not in (32, 64, 128) or k % group_size:
        return None
    if g_idx is not None and np.any(np.asarray(g_idx) >= 0):
        if not np.array_equal(g_idx, np.arange(k) // group_size):
            return None
    wp = np.asarray(weight_packed)
    layout = _resolve_packing(packing, wp.shape[-1], k, bits, name)
    if layout != "dense" or wp.shape[-1] * 32 != k * bits:
        return None
    ng = k // group_size
    check(np.asarray(weight_scale).size == math.prod(lead) * n * ng,
          f"weight_scale {list(np.shape(weight_scale))} does not hold {n}×{ng} group scales", name)
    s = np.asarray(weight_scale).astype(np.float32).reshape(tuple(lead) + (n, ng))
    zp = np.zeros((1, 1), np.int16) if weight_zero_point is None else \
        _zero_points(weight_zero_point, n, ng, bits, layout, tuple(lead), name)
    biases = -((zp.astype(np.float32) + np.float32(1 << (bits - 1))) * s)
    return np.ascontiguousarray(wp).view(np.uint32), np.ascontiguousarray(s), np.ascontiguousarray(biases)
