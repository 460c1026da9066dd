"""Reference packers written from the original tools' pack() loops, independent of quantscope's
bit-stream code: AutoGPTQ's ``QuantLinear.pack`` (incl. its 3-bit split values) and AutoAWQ's
GEMM ``order_map`` interleave (formats.md §3.2, §4.1)."""

import numpy as np


def autogptq_pack_rows(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's packing along axis 0 (rows of ``intweight`` [K, N]) into uint32 words."""
    k, n = intweight.shape
    iw = intweight.astype(np.uint64)
    out = np.zeros((k * bits // 32, n), np.uint64)
    i = row = 0
    while row < out.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                out[row] |= iw[j] << np.uint64(bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3-bit: 10 values, a split value, 10 values shifted by 1, a split value, 10 shifted by 2
            for j in range(i, i + 10):
                out[row] |= iw[j] << np.uint64(3 * (j - i))
            i += 10
            out[row] |= iw[i] << np.uint64(30)
            row += 1
            out[row] |= (iw[i] >> np.uint64(2)) & np.uint64(1)
            i += 1
            for j in range(i, i + 10):
                out[row] |= iw[j] << np.uint64(3 * (j - i) + 1)
            i += 10
            out[row] |= iw[i] << np.uint64(31)
            row += 1
            out[row] |= (iw[i] >> np.uint64(1)) & np.uint64(3)
            i += 1
            for j in range(i, i + 10):
                out[row] |= iw[j] << np.uint64(3 * (j - i) + 2)
            i += 10
            row += 1
    return (out & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)



def autoawq_pack_gemm(intweight: np.ndarray) -> np.ndarray:
    """AutoAWQ's GEMM packing of ``intweight`` [K, N]: 8 columns per word, order_map interleave."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    k, n = intweight.shape
    out = np.zeros((k, n // 8), np.uint64)
    for col in range(n // 8):
        for i in range(8):
            out[:, col] |= intweight[:, col * 8 + order_map[i]].astype(np.uint64) << np.uint64(i * 4)
    return out.astype(np.uint32).view(np.int32)
