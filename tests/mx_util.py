"""numpy <-> mlx conversions for tests (np.array() cannot take an mx bfloat16 array)."""

import ml_dtypes
import mlx.core as mx
import numpy as np


def to_np(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16)).view(ml_dtypes.bfloat16)
    return np.array(a)
