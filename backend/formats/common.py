"""Helpers shared by the format decoders."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from ..errors import LayerError

def round_to(x: np.ndarray, dtype) -> np.ndarray:
    """Round float32 ``x`` to ``dtype`` (float16 / bfloat16 / float32) and back, in place if possible.

    The reference libraries compute in the checkpoint's scale dtype: MLX's CPU dequantize rounds
    ``s*q`` and then ``+ b`` to the scale dtype (verified against mx.dequantize), torch kernels for
    GPTQ/AWQ and compressed-tensors compute ``s*(q-z)`` in fp16/bf16. numpy's float conversions
    round to nearest even, as both do.
    """
    dt = np.dtype(dtype)
    if dt == np.float32:
        return x
    if dt == np.float16 or dt == np.dtype(ml_dtypes.bfloat16):
        r = x.astype(dt).astype(np.float32)
        if x.flags.writeable and x.dtype == np.float32:
            x[...] = r
            return x
        return r
    if dt == np.float64:
        return x
    raise ValueError(f"cannot round to {dt}")


def check(cond: bool, message: str, name: str | None = None) -> None:
    """Raise a LayerError naming the layer when a shape/dtype expectation does not hold."""
    if not cond:
        raise LayerError(message, tensor=name)
