"""GPTQ (AutoGPTQ / GPTQModel / optimum): qweight, qzeros, scales, g_idx — formats.md §3.

``W[n,k] = s[g,n] * (q[k,n] - z[g,n])`` with ``g = g_idx[k]``; v1 ("gptq") files store ``z-1``.
The product is exact in float32 (an fp16/bf16 scale times a small integer), and that exact value
is what GPTQModel's own dequantization gives when run in float32 (verified bit-for-bit on the
real fixtures in tests/fixtures/real). A runtime computing in fp16 rounds it once more; that
cast belongs to the runtime, not to the format, so it is not applied here.
"""

from __future__ import annotations

import numpy as np

from ..bitpack import unpack_bits
from . import fast
from .common import check
from .kernel import for_row_blocks, unpack_codes_into

GPTQ_BITS = (2, 3, 4, 8)
#: The per-word constant GPTQModel adds to convert v1 zero points to v2 (formats.md §3.3).
_V1_WORD_ADD = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}


def word_bits(arr: np.ndarray) -> int:
    return arr.dtype.itemsize * 8


def gptq_dims(qweight_shape, scales_shape, bits: int, word: int = 32, name=None) -> tuple[int, int]:
    """(N, K) of a GPTQ layer from its packed shapes."""
    check(len(qweight_shape) == 2, f"qweight has rank {len(qweight_shape)}, expected 2", name)
    kp, n = qweight_shape
    check((kp * word) % bits == 0, f"qweight rows {kp} are not a whole number of {bits}-bit codes", name)
    k = kp * word // bits
    check(len(scales_shape) == 2 and scales_shape[1] == n,
          f"scales {list(scales_shape)} do not have N={n} columns like qweight {list(qweight_shape)}", name)
    return n, k


def unpack_zeros(qzeros: np.ndarray, bits: int, n: int, version: int, name=None) -> np.ndarray:
    """Zero points ``[groups, N]`` as integers, with v1's stored ``z-1`` undone (may yield 2**b)."""
    check(qzeros.ndim == 2, f"qzeros has rank {qzeros.ndim}, expected 2", name)
    need = -(-n * bits // word_bits(qzeros))
    check(qzeros.shape[1] >= need,
          f"qzeros {list(qzeros.shape)} has {qzeros.shape[1]} columns, N={n} at {bits} bits needs {need}", name)
    if version == 1 and bits in _V1_WORD_ADD and qzeros.dtype.itemsize == 4:
        # GPTQModel writes v1 by subtracting 0x11111111 (4-bit) from each packed v2 word and reads
        # it back by adding it again, so a true zero of 0 (stored as 0xF) borrows from, and is
        # restored through, its neighbour field. Doing the same word-level addition decodes
        # GPTQModel's files exactly (tests/fixtures/real: the act-order fixture has such a field);
        # per-field "+1" readers (exllama-era kernels) get 2**b there instead — rule R1.
        words = qzeros.view(np.uint32) + np.uint32(_V1_WORD_ADD[bits])
        return unpack_bits(words, bits, n).astype(np.int32)
    z = unpack_bits(qzeros, bits, n).astype(np.int32)
    if version == 1:
        z += 1  # per-field for 3-bit (fields straddle words) and other word sizes
    return z


def unpack_qweight(qweight: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Codes ``uint8 [N, K]`` (logical orientation) from ``qweight [K*b/32, N]`` packed along K."""
    return unpack_bits(np.ascontiguousarray(qweight.T), bits, k)


def mislabelled_format(zeros: np.ndarray, bits: int, version: int) -> str | None:
    """The checkpoint_format a symmetric layer's stored zero points ``zeros`` (unpacked fields)
    belong to when it is not the configured ``version``'s: every one is the other version's
    constant (v1 stores 2^(b-1) − 1, v2 2^(b-1)), so the file decodes one scale step off as
    labelled. None when they are not all that constant."""
    other = (1 << (bits - 1)) - (1 if version == 2 else 0)
    if zeros.size and (zeros == other).all():
        return "gptq" if version == 2 else "gptq_v2"
    return None


def is_trivial_g_idx(g_idx: np.ndarray | None, k: int, group_size: int) -> bool:
    """True when g_idx is absent or equals ``k // G`` (no act-order permutation)."""
    if g_idx is None:
        return True
    return g_idx.shape == (k,) and np.array_equal(g_idx, np.arange(k) // group_size)


def check_layer(qweight, qzeros, scales, g_idx, bits, group_size, name=None) -> tuple[int, int, int, int]:
    """(N, K, G, groups) after the checks a decode makes, from shapes (and g_idx's K values):
    no scales are read or converted, so doctor and convert run it on every layer of any size."""
    check(bits in GPTQ_BITS, f"GPTQ bits {bits} not supported (2, 3, 4, 8)", name)
    n, k = gptq_dims(qweight.shape, scales.shape, bits, word_bits(qweight), name)
    g = k if group_size in (-1, 0, None) else group_size
    ng = -(-k // g)
    check(scales.shape[0] == ng, f"scales have {scales.shape[0]} groups, K={k} with group size {group_size} needs {ng}", name)
    check(qzeros.ndim == 2, f"qzeros has rank {qzeros.ndim}, expected 2", name)
    need = -(-n * bits // word_bits(qzeros))
    check(qzeros.shape[1] >= need,
          f"qzeros {list(qzeros.shape)} has {qzeros.shape[1]} columns, N={n} at {bits} bits needs {need}", name)
    check(qzeros.shape[0] == ng, f"qzeros have {qzeros.shape[0]} groups, expected {ng}", name)
    if g_idx is not None:
        check(g_idx.shape == (k,), f"g_idx has shape {list(g_idx.shape)}, expected [{k}]", name)
        check(int(g_idx.min(initial=0)) >= 0 and int(g_idx.max(initial=0)) < ng,
              f"g_idx values outside 0..{ng - 1}", name)
    return n, k, g, ng


def _prep(qweight, qzeros, scales, g_idx, bits, group_size, version, name):
    n, k, g, ng = check_layer(qweight, qzeros, scales, g_idx, bits, group_size, name)
    z = unpack_zeros(qzeros, bits, n, version, name)
    trivial = is_trivial_g_idx(g_idx, k, g) and k % g == 0
    gi = None if trivial else (g_idx if g_idx is not None else np.arange(k) // g)
    s32 = np.ascontiguousarray(scales, np.float32)
    # s*q and s*z are exact in float32 for fp16/bf16 scales (<= 11 significant bits, |z| <= 256),
    # so s*q + (-(s*z)) is the exact s*(q-z); float32 scales can differ from it by one ulp.
    z32 = z.astype(np.float32)
    return n, k, g, ng, trivial, gi, s32, z32


def rows(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray | None, *, bits: int,
         group_size: int, version: int = 1, name: str | None = None) -> fast.RowDecoder | None:
    """The compiled row decoder of a GPTQ layer, or None (no kernel for it)."""
    n, k, g, _, trivial, gi, s32, z32 = _prep(qweight, qzeros, scales, g_idx, bits, group_size, version, name)
    fn = fast.gptq_rows(qweight, s32, z32, gi, bits, k, trivial_group=g if trivial else 0)
    # (rows in granules of 32, fastest in whole tiles of 64: fast.GPTQ_TILE)
    return None if fn is None else fast.RowDecoder(fn, n, k, fast.TILE, fast.GPTQ_TILE)


def group_values(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray | None, *, bits: int,
                 group_size: int, version: int = 1, name: str | None = None, n0: int = 0, n1: int | None = None):
    """The decoded values of outputs ``[n0, n1)`` as code counts per group
    (:class:`.codehist.GroupValues`, for exact histograms), or None (no kernel for it)."""
    from . import codehist
    n, k, g, _, _, gi, s32, z32 = _prep(qweight, qzeros, scales, g_idx, bits, group_size, version, name)
    gi = np.arange(k) // g if gi is None else gi
    return codehist.gptq(qweight, s32, z32, gi, bits, n0, n if n1 is None else n1)


def decode(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray | None, *,
           bits: int, group_size: int, version: int = 1, name: str | None = None,
           out: np.ndarray | None = None) -> np.ndarray:
    """Dequantize a GPTQ layer to float32 ``[N, K]``.

    Parameters
    ----------
    qweight
        ``int32 [K*b/32, N]`` (GPTQModel's ``pack_dtype`` may use 8/16/64-bit words).
    qzeros
        ``int32 [ceil(K/G), N*b/32]``.
    scales
        ``[ceil(K/G), N]`` fp16/bf16/fp32.
    g_idx
        ``int32 [K]`` or None; act-order when not ``k // G``.
    bits, group_size
        ``group_size`` -1 means one group over all of K.
    version
        1 for ``checkpoint_format: gptq`` (zeros stored minus one), 2 for ``gptq_v2``.
    """
    n, k, g, ng, trivial, gi, s32, z32 = _prep(qweight, qzeros, scales, g_idx, bits, group_size, version, name)
    if out is None:
        out = np.empty((n, k), np.float32)
    if fast.gptq(qweight, s32, z32, gi, bits, out, trivial_group=g if trivial else 0):
        return out
    s_t = np.ascontiguousarray(s32.T)  # [N, ng]
    bias_t = -(s_t * z32.T)
    def block(r0, r1):
        blk = out[r0:r1]
        # qweight is [K*b/32, N]: the codes of output row n are column n, one LSB-first stream.
        unpack_codes_into(np.ascontiguousarray(qweight[:, r0:r1].T), bits, k, blk)
        if trivial:
            b3 = blk.reshape(r1 - r0, ng, g)
            np.multiply(b3, s_t[r0:r1, :, None], out=b3)
            b3 += bias_t[r0:r1, :, None]
        else:
            blk *= s_t[r0:r1][:, gi]
            blk += bias_t[r0:r1][:, gi]

    for_row_blocks(n, k, block, min_rows=16)
    return out


def codes(qweight: np.ndarray, *, bits: int, name=None) -> np.ndarray:
    """Stored codes ``uint8 [N, K]``."""
    k = qweight.shape[0] * word_bits(qweight) // bits
    return unpack_qweight(qweight, bits, k)


def to_mlx_affine(qweight, qzeros, scales, g_idx, *, bits, group_size, version=1, name=None):
    """Exact MLX-affine equivalent ``(weight u32 [N, K*b/32], scales f32, biases f32)`` or None.

    Representable when g_idx is trivial, words are 32-bit and G ∈ {32, 64, 128} (formats.md §9):
    ``qweight.T`` is bit-identical to an MLX weight. Scales/biases are float32 so that
    ``s*q + (-s*z)`` is exact and equals :func:`decode`.
    """
    n, k = gptq_dims(qweight.shape, scales.shape, bits, word_bits(qweight), name)
    if word_bits(qweight) != 32 or group_size not in (32, 64, 128) or k % group_size:
        return None
    if not is_trivial_g_idx(g_idx, k, group_size):
        return None
    check_layer(qweight, qzeros, scales, g_idx, bits, group_size, name)  # decode()'s checks (the mlx engine's way)
    z = unpack_zeros(qzeros, bits, n, version, name)
    s_t = np.ascontiguousarray(scales.astype(np.float32).T)
    b_t = -(s_t * z.T.astype(np.float32))
    w = np.ascontiguousarray(qweight.T).view(np.uint32)
    return w, s_t, b_t
