"""quantscope's backend: reading, schemes, decoding, compare, doctor, conversions (no Qt)."""

from .blas import limit_blas_threads as _limit_blas_threads

_limit_blas_threads()
