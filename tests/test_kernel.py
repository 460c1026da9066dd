"""The shared kernel's rounding must equal numpy's / ml_dtypes' casts exactly."""

import ml_dtypes
import numpy as np
import pytest

from quantscope.backend.formats.kernel import for_row_blocks, round_inplace

RNG = np.random.default_rng(5)


def sample():
    wide = RNG.normal(size=100_000).astype(np.float32) * np.float32(10.0) ** RNG.integers(-9, 5, size=100_000)
    tiny = (RNG.random(50_000) * 2 ** -13).astype(np.float32) * RNG.choice([-1, 1], 50_000)
    edges = np.float32([0, -0.0, 65504, 65519, 65520, -70000, 2 ** -24, 2 ** -25, 3 * 2 ** -26, 1.5 * 2 ** -24,
                        1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -8, 1 + 3 * 2 ** -8])
    return np.concatenate([wide, tiny, edges]).astype(np.float32)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_round_inplace_equals_cast(dtype):
    x = sample()
    with np.errstate(over="ignore"):
        ref = x.astype(dtype).astype(np.float32)
    y = x.copy()
    round_inplace(y, dtype)
    np.testing.assert_array_equal(y, ref)


def test_row_blocks_cover_everything_once():
    seen = np.zeros(1000, int)

    def fn(r0, r1):
        seen[r0:r1] += 1

    for_row_blocks(1000, 1 << 14, fn, align=8, min_rows=16)
    assert (seen == 1).all()


def test_workers_follow_the_cores_this_process_may_use(monkeypatch):
    """One count of cores for the pools and the first run's compilation: the process's CPU
    affinity (a container or taskset), not the machine's cores; at most 8 threads."""
    import os

    from quantscope.backend import precompile
    from quantscope.backend.formats import kernel
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert kernel.usable_cores() == 1 and kernel.workers() == 1
    assert precompile.usable_cores is kernel.usable_cores
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert kernel.usable_cores() == 32 and kernel.workers() == 8

    def no_affinity(pid):
        raise OSError("not here")
    monkeypatch.setattr(os, "sched_getaffinity", no_affinity, raising=False)
    assert kernel.usable_cores() == 64
