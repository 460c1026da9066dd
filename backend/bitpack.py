"""LSB-first bit streams: the packing shared by MLX, GPTQ, AWQ GEMV, compressed-tensors ≥ 0.17
and the safetensors sub-byte dtypes.

Element ``k`` of a row occupies stream bits ``[k*b, k*b + b)``, where stream bit ``p`` is bit
``p % 8`` of byte ``p // 8`` (for little-endian words this is the same as bit ``p % 32`` of word
``p // 32``; formats.md §1.2). Eight elements of ``b`` bits always fill exactly ``b`` bytes, so
every width 1..8 is handled by one vectorised rule over groups of ``b`` bytes.
"""

from __future__ import annotations

import numpy as np


def _as_bytes(packed: np.ndarray) -> np.ndarray:
    """View the last axis of a little-endian integer array as bytes (no copy when contiguous)."""
    a = np.ascontiguousarray(packed)
    if a.dtype.itemsize == 1:
        return a.view(np.uint8)
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    return a.view(np.uint8).reshape(*a.shape[:-1], a.shape[-1] * a.dtype.itemsize)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Unpack ``count`` codes of ``bits`` bits from the last axis of ``packed``.

    Parameters
    ----------
    packed
        Integer array (uint8/int32/uint32/…); its last axis is the packed stream of one row.
    bits
        Code width, 1 to 8.
    count
        Codes per row to return; the stream must hold at least ``count * bits`` bits.

    Returns
    -------
    numpy.ndarray
        ``uint8`` codes with shape ``packed.shape[:-1] + (count,)``.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bit width {bits} is not in 1..8")
    by = _as_bytes(packed)
    lead = by.shape[:-1]
    nbytes = by.shape[-1]
    if nbytes * 8 < count * bits:
        raise ValueError(f"{nbytes} bytes per row cannot hold {count} codes of {bits} bits")
    if bits == 8:
        return by[..., :count]
    if bits == 4:
        out = np.empty(lead + (nbytes * 2,), dtype=np.uint8)
        np.bitwise_and(by, 0x0F, out=out[..., 0::2])
        np.right_shift(by, 4, out=out[..., 1::2])
        return out[..., :count]
    if bits in (1, 2):
        per = 8 // bits
        mask = (1 << bits) - 1
        out = np.empty(lead + (nbytes, per), dtype=np.uint8)
        for i in range(per):
            np.bitwise_and(np.right_shift(by, i * bits), mask, out=out[..., i])
        return out.reshape(lead + (nbytes * per,))[..., :count]
    # 3, 5, 6, 7 bits: each run of `bits` bytes holds 8 codes; assemble the run into a uint64.
    nruns = -(-nbytes // bits)
    if nruns * bits != nbytes:
        by = np.concatenate([by, np.zeros(lead + (nruns * bits - nbytes,), np.uint8)], axis=-1)
    runs = by.reshape(lead + (nruns, bits))
    acc = np.zeros(lead + (nruns,), dtype=np.uint64)
    for j in range(bits):
        acc |= runs[..., j].astype(np.uint64) << np.uint64(8 * j)
    mask = np.uint64((1 << bits) - 1)
    out = np.empty(lead + (nruns, 8), dtype=np.uint8)
    for i in range(8):
        out[..., i] = (acc >> np.uint64(i * bits)) & mask
    return out.reshape(lead + (nruns * 8,))[..., :count]


def pack_bits(codes: np.ndarray, bits: int, word_dtype=np.uint32) -> np.ndarray:
    """Pack unsigned ``codes`` (last axis) into an LSB-first stream of ``word_dtype`` words.

    The row is zero-padded to a whole number of words. Inverse of :func:`unpack_bits`.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bit width {bits} is not in 1..8")
    c = np.asarray(codes)
    if c.size and (c.min() < 0 or c.max() >= (1 << bits)):
        raise ValueError(f"codes outside 0..{(1 << bits) - 1}")
    c = c.astype(np.uint64)
    lead = c.shape[:-1]
    n = c.shape[-1]
    wbytes = np.dtype(word_dtype).itemsize
    # Pad to a multiple of 8 codes (one run of `bits` bytes) and to whole words.
    nruns = -(-n // 8)
    nbytes = -(-(nruns * bits) // wbytes) * wbytes
    nruns = max(nruns, -(-nbytes // bits))
    if nruns * 8 != n:
        c = np.concatenate([c, np.zeros(lead + (nruns * 8 - n,), np.uint64)], axis=-1)
    runs = c.reshape(lead + (nruns, 8))
    acc = np.zeros(lead + (nruns,), dtype=np.uint64)
    for i in range(8):
        acc |= runs[..., i] << np.uint64(i * bits)
    by = np.empty(lead + (nruns, bits), dtype=np.uint8)
    for j in range(bits):
        by[..., j] = (acc >> np.uint64(8 * j)) & np.uint64(0xFF)
    by = by.reshape(lead + (nruns * bits,))[..., :nbytes]
    return np.ascontiguousarray(by).view(np.dtype(word_dtype).newbyteorder("<")).astype(word_dtype)
