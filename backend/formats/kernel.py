"""The shared dequantization kernel: ``round(s*q + b)`` over row blocks, on all cores.

Every integer format (MLX affine, GPTQ, AWQ, compressed-tensors int) reduces to codes times a
per-group scale plus a per-group offset. numpy has no fused kernel for that, so the work is cut
into row blocks small enough to stay in cache while several passes run over them, and the blocks
are spread over a thread pool (numpy releases the GIL in its loops). Rounding to bf16/fp16 is
done with integer bit operations: numpy's float32→float16 cast is ~10× slower than a pass.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np

_BF16 = np.dtype(ml_dtypes.bfloat16)
_F16 = np.dtype(np.float16)
#: Elements per block: 256 KB of float32, comfortably inside L2.
BLOCK_ELEMS = 1 << 16
_MIN_PARALLEL = 1 << 21
_pools: dict[str, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def lower_thread_priority(nice: int = 10) -> None:
    """Give the calling worker thread a lower CPU priority (Linux: per-thread nice value).

    On a 2-core machine three busy workers would otherwise take turns with the GUI thread and
    freeze the window for 100+ ms at a time (bench_gui); at nice 10 the GUI thread runs first.
    Elsewhere (macOS, Windows) this quietly does nothing.
    """
    try:
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except (AttributeError, OSError):
        pass


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the system says; a container
    or ``taskset`` often allows fewer than ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def workers() -> int:
    """Threads of each worker pool: one per usable core, at most 8."""
    return max(1, min(8, usable_cores()))


def pool(name: str = "decode") -> ThreadPoolExecutor:
    """The process's worker pool ``name`` (one thread per core, lower priority), made on first use.

    ``decode`` runs row blocks; ``layer`` runs a sweep's whole-layer jobs, which must not wait on
    threads of their own pool.
    """
    with _pools_lock:  # first use may come from several threads at once: one pool each name
        p = _pools.get(name)
        if p is None:
            p = _pools[name] = ThreadPoolExecutor(max_workers=workers(), thread_name_prefix=f"quantscope-{name}",
                                                  initializer=lower_thread_priority)
    return p


def for_row_blocks(n_rows: int, row_elems: int, fn, *, align: int = 1, min_rows: int = 1) -> None:
    """Call ``fn(r0, r1)`` over blocks of rows covering ``[0, n_rows)``, in parallel when large.

    ``align`` keeps block boundaries on multiples of it (e.g. 8 AWQ columns per word);
    ``min_rows`` makes blocks at least that tall (strided reads of a transposed layout want
    whole cache lines).
    """
    step = max(min_rows, BLOCK_ELEMS // max(1, row_elems))
    step = max(align, -(-step // align) * align)
    starts = list(range(0, n_rows, step))
    nw = workers()
    if nw == 1 or n_rows * row_elems < _MIN_PARALLEL or len(starts) < 2 * nw:
        for r0 in starts:
            fn(r0, min(n_rows, r0 + step))
        return
    # One contiguous range of blocks per worker keeps each thread's memory access sequential.
    per = -(-len(starts) // nw)

    def run(i):
        for r0 in starts[i * per:(i + 1) * per]:
            fn(r0, min(n_rows, r0 + step))

    for f in [pool().submit(run, i) for i in range(nw)]:
        f.result()


def map_pieces(fn, n: int, piece: int) -> list:
    """``[fn(i0, i1) for each piece of [0, n)]``, on the pool when there is more than one piece."""
    bounds = [(i, min(n, i + piece)) for i in range(0, n, piece)] or [(0, 0)]
    if len(bounds) == 1 or workers() == 1:
        return [fn(i0, i1) for i0, i1 in bounds]
    return list(pool().map(lambda b: fn(*b), bounds))


def round_inplace(x: np.ndarray, dtype) -> None:
    """Round float32 ``x`` in place to the nearest value of ``dtype`` (bf16, fp16 or float32).

    Round-half-to-even like numpy's and ml_dtypes' casts (and MLX's and torch's), checked
    against them in tests.
    """
    dt = np.dtype(dtype)
    if dt == np.float32 or dt == np.float64:
        return
    u = x.view(np.uint32)
    if dt == _BF16:
        t = np.right_shift(u, 16)
        t &= 1
        t += 0x7FFF
        u += t
        u &= np.uint32(0xFFFF0000)
        return
    if dt == _F16:
        # Normal fp16 range: keep 10 mantissa bits (round half to even at bit 13). Below 2**-14
        # fp16 is subnormal with a fixed step of 2**-24: adding and removing 0.5 (whose float32
        # ulp is 2**-24) rounds to that step with the FPU's round-half-even.
        small = np.abs(x) < np.float32(2.0 ** -14)
        t = np.right_shift(u, 13)
        t &= 1
        t += 0xFFF
        r = u + t
        r &= np.uint32(0xFFFFE000)
        if small.any():
            xs = x[small]
            r.view(np.float32)[small] = np.copysign((np.abs(xs) + np.float32(0.5)) - np.float32(0.5), xs)
        u[...] = r
        # Beyond fp16's range the cast gives inf; so must we.
        big = np.abs(x) > np.float32(65504.0)
        if big.any():
            x[big] = np.copysign(np.float32(np.inf), x[big])
        return
    x[...] = x.astype(dt).astype(np.float32)


def unpack_codes_into(packed: np.ndarray, bits: int, count: int, out: np.ndarray) -> None:
    """Unpack LSB-first codes of each row of ``packed`` into float32 ``out`` ``[rows, count]``."""
    from ..bitpack import _as_bytes, unpack_bits

    by = _as_bytes(packed)
    if bits == 8:
        np.copyto(out, by[:, :count])
        return
    if bits == 4:
        nb = -(-count // 2)
        c8 = np.empty((by.shape[0], 2 * nb), np.uint8)
        np.bitwise_and(by[:, :nb], 0x0F, out=c8[:, 0::2])
        np.right_shift(by[:, :nb], 4, out=c8[:, 1::2])
        np.copyto(out, c8[:, :count])
        return
    np.copyto(out, unpack_bits(by, bits, count))
