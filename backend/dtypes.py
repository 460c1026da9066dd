"""The safetensors element types and their numpy equivalents.

ml_dtypes provides the float types numpy lacks (bf16, the fp8 family, e8m0, fp4, fp6), so no
decoder here twiddles exponent bits by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class DType:
    """One safetensors dtype string with its storage size and numpy element type."""

    name: str
    bits: int
    numpy: np.dtype

    @property
    def is_float(self) -> bool:
        return self.name.startswith(("F", "BF"))

    @property
    def packed(self) -> bool:
        """True for sub-byte element types stored as a little-endian bit stream."""
        return self.bits < 8


def _dt(name: str, bits: int, np_type) -> DType:
    return DType(name, bits, np.dtype(np_type))


#: Every dtype of the safetensors format (Rust ``Dtype`` enum), keyed by its header string.
DTYPES: dict[str, DType] = {d.name: d for d in [
    _dt("BOOL", 8, np.bool_),
    _dt("U8", 8, np.uint8), _dt("I8", 8, np.int8),
    _dt("U16", 16, np.uint16), _dt("I16", 16, np.int16),
    _dt("U32", 32, np.uint32), _dt("I32", 32, np.int32),
    _dt("U64", 64, np.uint64), _dt("I64", 64, np.int64),
    _dt("F16", 16, np.float16), _dt("BF16", 16, ml_dtypes.bfloat16),
    _dt("F32", 32, np.float32), _dt("F64", 64, np.float64),
    _dt("C64", 64, np.complex64),
    _dt("F8_E4M3", 8, ml_dtypes.float8_e4m3fn), _dt("F8_E5M2", 8, ml_dtypes.float8_e5m2),
    _dt("F8_E4M3FNUZ", 8, ml_dtypes.float8_e4m3fnuz),
    _dt("F8_E5M2FNUZ", 8, ml_dtypes.float8_e5m2fnuz),
    _dt("F8_E8M0", 8, ml_dtypes.float8_e8m0fnu),
    # Sub-byte floats are stored packed (two F4 per byte, four F6 per three bytes); reading
    # unpacks them to one ml_dtypes element per byte.
    _dt("F4", 4, ml_dtypes.float4_e2m1fn),
    _dt("F6_E2M3", 6, ml_dtypes.float6_e2m3fn), _dt("F6_E3M2", 6, ml_dtypes.float6_e3m2fn),
]}


#: The float dtypes unquantized weights are stored in (no fp8 or sub-byte float: those are codes).
DENSE_FLOATS = ("F16", "BF16", "F32", "F64")


def nbytes_for(dtype: DType, numel: int) -> int | None:
    """Bytes a tensor of ``numel`` elements occupies, or None if not a whole number of bytes."""
    bits = numel * dtype.bits
    if bits % 8:
        return None
    return bits // 8
