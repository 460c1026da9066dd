"""One-pass layer metrics (backend/fused.py): decode row blocks into a cache-sized buffer, measure
them at once, exact percentiles from collected intervals. Every figure is checked against a
direct float64 numpy computation on the whole decoded layer."""

from __future__ import annotations

import itertools
import threading

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest

from mx_util import to_np
from quantscope.backend import compare, fused
from quantscope.backend.errors import Cancelled
from quantscope.backend.formats import awq, fast, gptq
from quantscope.backend.formats import mlx as mlxfmt
from ref_packers import autoawq_pack_gemm, autogptq_pack_rows

pytestmark = pytest.mark.skipif(not fast.AVAILABLE, reason="the one-pass path needs the compiled kernels")

BF16 = np.dtype(ml_dtypes.bfloat16)
RNG = np.random.default_rng(7)
N, K = 512, 2048  # 1M elements: 16 blocks of 64K (small_blocks), so every step of the interval logic runs


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(fused, "BLOCK_ELEMENTS", 1 << 16)
    # narrowing wherever there are blocks enough, as in a layer too large to collect in one step
    # (test_one_step_where_the_collection_fits_the_budget: the other way)
    monkeypatch.setattr(fused, "COLLECT_BYTES", 0)


def _ref(n=N, k=K, seed=0, rows_scale=None):
    w = np.random.default_rng(seed).standard_normal((n, k)) * 0.02
    if rows_scale is not None:
        w *= rows_scale[:, None]
    return w.astype(BF16)


def _direct(w, wh):
    """What the issue asks the figures to agree with: float64 numpy on the whole layer."""
    w64, h64 = np.asarray(w, np.float64), np.asarray(wh, np.float64)
    d = h64 - w64
    a = np.abs(d)
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    rel = np.linalg.norm(d) / np.linalg.norm(w64)
    return {"rel_fro": rel, "max_abs": a.max(), "mse": np.mean(d * d), "p50": p50, "p95": p95, "p99": p99,
            "cosine": float(np.sum(w64 * h64) / (np.linalg.norm(w64) * np.linalg.norm(h64)))}


def _check(got, w, wh):
    exp = _direct(w, wh)
    for key in ("p50", "p95", "p99", "max_abs"):
        assert got[key] == exp[key], key  # order statistics: exactly numpy's
    for key in ("rel_fro", "mse", "cosine"):
        assert got[key] == pytest.approx(exp[key], rel=1e-9), key


def _mlx(w, bits=4, group=64, mode="affine"):
    a = mx.array(w.view(np.uint16)).view(mx.bfloat16)
    if mode == "affine":
        wq, s, b = mx.quantize(a, group_size=group, bits=bits)
        wq, s, b = to_np(wq), to_np(s.view(mx.uint16)).view(BF16), to_np(b.view(mx.uint16)).view(BF16)
        return (mlxfmt.affine_rows(wq, s, b, bits=bits, group_size=group),
                mlxfmt.decode_affine(wq, s, b, bits=bits, group_size=group))
    wq, s = mx.quantize(a, group_size=32, bits=4, mode=mode)[:2]
    wq, s = to_np(wq), to_np(s)
    return mlxfmt.fp_rows(wq, s, mode=mode), mlxfmt.decode_fp(wq, s, mode=mode)


def _gptq(w, group=128, actorder=False):
    wf = np.asarray(w, np.float32).T  # [K, N], GPTQ's orientation
    k, n = wf.shape
    g_idx = np.arange(k) // group
    if actorder:
        g_idx = np.empty(k, np.int64)
        g_idx[RNG.permutation(k)] = np.arange(k) // group
    ng = k // group
    s = np.empty((ng, n), np.float32)
    z = np.empty((ng, n), np.int64)
    for g in range(ng):  # min/max round-to-nearest per group
        rows = wf[g_idx == g]
        lo, hi = rows.min(0), rows.max(0)
        s[g] = np.maximum(hi - lo, 1e-5) / 15
        z[g] = np.clip(np.rint(-lo / s[g]), 0, 15)
    s = s.astype(np.float16)
    q = np.clip(np.rint(wf / s[g_idx].astype(np.float32)) + z[g_idx], 0, 15).astype(np.int64)
    qweight = autogptq_pack_rows(q, 4)
    qzeros = autogptq_pack_rows((z - 1).T.copy(), 4).T.copy()
    gi = g_idx.astype(np.int32)
    return (gptq.rows(qweight, qzeros, s, gi, bits=4, group_size=group),
            gptq.decode(qweight, qzeros, s, gi, bits=4, group_size=group))


def _awq(w, group=128):
    wf = np.asarray(w, np.float32).T
    k, n = wf.shape
    g = wf.reshape(k // group, group, n)
    lo, hi = g.min(1), g.max(1)
    s = (np.maximum(hi - lo, 1e-5) / 15).astype(np.float16)
    z = np.clip(np.rint(-lo / s.astype(np.float32)), 0, 15).astype(np.int64)
    q = np.clip(np.rint(g / s.astype(np.float32)[:, None]) + z[:, None], 0, 15).astype(np.int64).reshape(k, n)
    qweight, qzeros = autoawq_pack_gemm(q), autoawq_pack_gemm(z)
    return (awq.gemm_rows(qweight, qzeros, s, group_size=group),
            awq.decode_gemm(qweight, qzeros, s, group_size=group))


@pytest.mark.parametrize("kind", ["mlx4", "mlx3", "mxfp4", "gptq", "gptq-actorder", "awq"])
def test_one_pass_metrics_equal_numpy(kind, monkeypatch):
    narrowed = []
    real = fused._Found.restrict
    monkeypatch.setattr(fused._Found, "restrict", lambda self, lo, hi: narrowed.append(lo) or real(self, lo, hi))
    w = _ref()
    dec, full = {"mlx4": lambda: _mlx(w), "mlx3": lambda: _mlx(w, bits=3), "mxfp4": lambda: _mlx(w, mode="mxfp4"),
                 "gptq": lambda: _gptq(w), "gptq-actorder": lambda: _gptq(w, actorder=True),
                 "awq": lambda: _awq(w)}[kind]()
    assert dec is not None
    res = fused.measure(w, {"v": (dec, 0, None)})["v"]
    assert res is not None  # homogeneous random weights: the intervals hold
    _check(res, w, full)
    assert res["rel_fro_raw"] == res["rel_fro"]
    assert narrowed  # the second intervals were used


@pytest.mark.parametrize("budget", ["fits", "exceeded"])
def test_one_step_where_the_collection_fits_the_budget(budget, monkeypatch):
    """Where the first intervals would collect under COLLECT_BYTES, every block not sampled is
    measured with them in one step (no narrowing) and the ranks read from all they collected;
    above it the blocks come in steps with narrower intervals between them. Exact either way."""
    narrowed, adds = [], []
    real_restrict, real_add = fused._Found.restrict, fused._Found.add
    monkeypatch.setattr(fused._Found, "restrict",
                        lambda self, lo, hi: narrowed.append(lo) or real_restrict(self, lo, hi))
    monkeypatch.setattr(fused._Found, "add", lambda self, acc: adds.append(int(acc.cnt[1])) or real_add(self, acc))
    w = _ref()
    dec, full = _gptq(w)
    # 16 blocks of 64K, 3 sampled: the 13 others' first collection is some hundreds of KB
    monkeypatch.setattr(fused, "COLLECT_BYTES", 64 << 20 if budget == "fits" else 1 << 10)
    res = fused.measure(w, {"v": (dec, 0, None)}, parallel=False)["v"]
    _check(res, w, full)
    if budget == "fits":
        assert not narrowed and len(adds) == 1  # one step, one collection
        assert adds[0] > 0.01 * w.size  # the first intervals' share of all the blocks
    else:
        assert narrowed and len(adds) == 2


@pytest.mark.parametrize("block", [1 << 14, 1 << 18, 1 << 22])
def test_block_sizes_from_many_to_one(monkeypatch, block):
    # many blocks (sample, narrowing, the rest), a few (no narrowing), one (all sample)
    monkeypatch.setattr(fused, "BLOCK_ELEMENTS", block)
    w = _ref(seed=2)
    dec, full = _gptq(w)
    res = fused.measure(w, {"v": (dec, 0, None)})["v"]
    assert res is not None
    _check(res, w, full)


@pytest.mark.parametrize("rows", [96, 768])
def test_mid_size_layers_are_cut_into_enough_blocks(monkeypatch, rows):
    """A layer of 0.1-1M elements (q/k/v of a small model) is cut into blocks of at least 32k
    elements, up to MIN_BLOCKS of them, not a few of 256k (all sampled, nothing narrowed)."""
    monkeypatch.setattr(fused, "BLOCK_ELEMENTS", 1 << 18)  # the default, not the tests' small blocks
    w = _ref(n=rows, k=1024, seed=5)
    dec, full = _mlx(w)
    calls = []
    res = fused.measure(w, {"v": (dec._replace(fn=lambda r0, r1, out: calls.append(r1 - r0) or dec.fn(r0, r1, out)),
                                  0, None)}, parallel=False)["v"]
    assert res is not None
    _check(res, w, full)
    per = max(fused.MIN_BLOCK_ELEMENTS, rows * 1024 // fused.MIN_BLOCKS) // 1024
    assert len(calls) == -(-rows // per) and max(calls) == per  # each block decoded once
    assert len(calls) == (3 if rows == 96 else fused.MIN_BLOCKS)


def test_mid_size_blocks_round_to_the_nearer_whole_granules(monkeypatch):
    """GPTQ decodes 32 rows at a time: a 896x896 layer (Qwen2.5-0.5B's q_proj) wants 36-row blocks;
    rounded up to 64 it had 14 blocks and no narrowing step, rounded to the nearer 32 it has 28."""
    monkeypatch.setattr(fused, "BLOCK_ELEMENTS", 1 << 18)
    w = _ref(n=896, k=896, seed=6)
    dec, full = _gptq(w)
    assert dec.granule == 32
    calls, narrowed = [], []
    real = fused._Found.restrict
    monkeypatch.setattr(fused._Found, "restrict", lambda self, lo, hi: narrowed.append(lo) or real(self, lo, hi))
    res = fused.measure(w, {"v": (dec._replace(fn=lambda r0, r1, out: calls.append(r1 - r0) or dec.fn(r0, r1, out)),
                                  0, None)}, parallel=False)["v"]
    assert res is not None
    _check(res, w, full)
    assert set(calls) == {32} and len(calls) == 28
    assert narrowed  # enough blocks left after the sample for a narrowing step


@pytest.mark.parametrize("rows, want", [(2048, {64}), (896, {32})])
def test_awq_beside_gptq_gets_whole_64_row_tiles_where_enough_blocks_remain(monkeypatch, rows, want):
    """AWQ decodes any multiple of 8 rows, but fastest in 64-row tiles (whole 8x8 word blocks):
    a wide layer (8B down_proj-like, ~18 rows wanted) measured with GPTQ (32-row granule) gets
    64-row blocks; a layer that would then have fewer than MIN_BLOCKS blocks keeps 32."""
    monkeypatch.setattr(fused, "BLOCK_ELEMENTS", 1 << 18)
    w = _ref(n=rows, k=14336 if rows == 2048 else 896, seed=9)
    (dg, fg), (da, fa) = _gptq(w), _awq(w)
    assert da.granule == 8 and da.tile == 64 and dg.granule == 32
    calls = []
    spy = da._replace(fn=lambda r0, r1, out: calls.append((r0, r1)) or da.fn(r0, r1, out))
    res = fused.measure(w, {"gptq": (dg, 0, None), "awq": (spy, 0, None)}, parallel=False)
    _check(res["gptq"], w, fg)
    _check(res["awq"], w, fa)
    assert {r1 - r0 for r0, r1 in calls if r1 != rows} == want


def test_several_variants_share_one_pass_and_one_thread_gives_the_same():
    w = _ref(seed=3)
    decs, fulls = {}, {}
    for lb, make in (("mlx", lambda: _mlx(w)), ("gptq", lambda: _gptq(w)), ("awq", lambda: _awq(w))):
        decs[lb], fulls[lb] = make()
    par = fused.measure(w, {lb: (d, 0, None) for lb, d in decs.items()})
    one = fused.measure(w, {lb: (d, 0, None) for lb, d in decs.items()}, parallel=False)
    for lb in decs:
        _check(par[lb], w, fulls[lb])
        assert par[lb]["p99"] == one[lb]["p99"] and par[lb]["rel_fro"] == pytest.approx(one[lb]["rel_fro"], rel=1e-12)


def test_exact_copy_has_zero_error_and_is_not_collected():
    # an exact conversion's verify: every error is exactly zero (rank bookkeeping of zeros)
    w = _ref(seed=4)
    wf = w.astype(np.float32)
    dec = fast.RowDecoder(lambda r0, r1, dst: np.copyto(dst, wf[r0:r1]), N, K, 1)
    res = fused.measure(w, {"same": (dec, 0, None)})["same"]
    assert res["rel_fro"] == 0.0 and res["max_abs"] == 0.0 and res["p50"] == res["p99"] == 0.0


def test_mostly_zero_errors_and_ties():
    # 97% exact, the rest on a coarse grid: the percentiles fall among zeros and heavy ties
    w = _ref(seed=5)
    wf = w.astype(np.float32)
    wh = wf.copy()
    hit = RNG.random(wf.shape) < 0.03
    wh[hit] += np.float32(2.0 ** -10) * RNG.integers(1, 4, size=int(hit.sum())).astype(np.float32)
    dec = fast.RowDecoder(lambda r0, r1, dst: np.copyto(dst, wh[r0:r1]), N, K, 1)
    res = fused.measure(w, {"v": (dec, 0, None)})["v"]
    assert res is not None
    _check(res, w, wh)


@pytest.mark.parametrize("share", [0.3, 0.49, 0.6])
def test_many_zero_errors_around_the_median(share):
    # exact zeros just under, or just over, half of the layer: the median is the smallest
    # nonzero error or zero; with intervals that start above 0 the zeros are counted below them
    w = _ref(seed=7)
    wf = w.astype(np.float32)
    wh = wf + (RNG.standard_normal(wf.shape) * 1e-3).astype(np.float32)
    same = RNG.random(wf.shape) < share
    wh[same] = wf[same]
    dec = fast.RowDecoder(lambda r0, r1, dst: np.copyto(dst, wh[r0:r1]), N, K, 1)
    res = fused.measure(w, {"v": (dec, 0, None)})["v"]
    assert res is not None
    _check(res, w, wh)
    assert (res["p50"] == 0.0) == (share > 0.5)


def test_pair_stats_counts_zeros_below_an_interval_above_0():
    # with intervals above 0 the zeros are counted apart and also below every interval
    rng = np.random.default_rng(3)
    wf = (rng.standard_normal((8, 512)) * 0.02).astype(np.float32)
    v = wf + (rng.standard_normal(wf.shape) * 1e-3).astype(np.float32)
    v[:, ::3] = wf[:, ::3]
    t = np.abs(v - wf)
    lo, hi = np.array([1e-4, 1e-3], np.float32), np.array([2e-4, 2e-3], np.float32)
    acc, cnt, buf = np.zeros(5), np.zeros(6, np.int64), np.empty(v.size)
    fast.pair_stats(wf, v, np.empty(0, np.float32), lo, hi, 1, acc, cnt, buf)
    assert cnt[0] == (t == 0).sum()
    assert cnt[4:].tolist() == [int((t < lo[0]).sum()), int((t < lo[1]).sum())]
    assert cnt[4] > (t == 0).sum() > 0


def test_float32_reference_and_undone_smoothing():
    w = _ref(seed=6).astype(np.float32)
    col = (0.5 + RNG.random(K)).astype(np.float32)
    dec, full = _mlx((w * col).astype(BF16))  # the variant holds W·diag(s), as AWQ stores it
    res = fused.measure(w, {"v": (dec, 0, col)})["v"]
    _check(res, w, full / col)
    assert res["rel_fro_raw"] == pytest.approx(_direct(w, full)["rel_fro"], rel=1e-9)


def test_rows_that_differ_widely_stay_exact():
    # rows whose scale jumps 100x in the middle of the layer: the samples can mislead the
    # intervals; the answer is then exact anyway, or None (the caller takes the general path)
    scale = np.where(np.arange(N) % 97 < 3, 100.0, 1.0)
    w = _ref(seed=8, rows_scale=scale)
    dec, full = _mlx(w)
    res = fused.measure(w, {"v": (dec, 0, None)})["v"]
    if res is not None:
        _check(res, w, full)


def test_intervals_that_miss_return_none(monkeypatch):
    w = _ref(seed=9)
    dec, full = _gptq(w)
    monkeypatch.setattr(fused, "Z", 0.0)  # no margin at all: the first intervals cannot hold
    monkeypatch.setattr(fused, "DEFF", 0.0)
    res = fused.measure(w, {"v": (dec, 0, None)})["v"]
    assert res is None or res["p50"] == _direct(w, full)["p50"]


@pytest.mark.parametrize("budget", [-1, 64 << 20])  # steps with narrowing / one step
def test_a_collection_past_its_buffer_returns_none(budget, monkeypatch):
    """The buffers are sized from the sample's share inside the first intervals; where the
    other blocks put far more inside (here: one interval holding every error from about the
    median up, said to hold none), the collection overflows and the variant goes to the general
    path (None), in one step as with narrowing, never a wrong figure."""
    monkeypatch.setattr(fused, "COLLECT_BYTES", budget)
    real = fused.hist_intervals

    def wide(h, nb):
        lo, _, _ = real(h, nb)
        return np.array([lo[0]], np.float32), np.array([np.inf], np.float32), 0.0
    monkeypatch.setattr(fused, "hist_intervals", wide)
    overflowed = []
    real_collected = fused._Acc.collected

    def collected(self):
        c = real_collected(self)
        overflowed.append(c is None)
        return c
    monkeypatch.setattr(fused._Acc, "collected", collected)
    w = _ref(seed=9)
    dec, _ = _gptq(w)
    assert fused.measure(w, {"v": (dec, 0, None)}, parallel=False)["v"] is None
    assert any(overflowed)  # (the overflow itself, seen by the measurement)


def test_nan_errors_go_to_the_general_path():
    w = _ref(seed=10)
    wh = w.astype(np.float32)
    wh[7, 3] = np.nan
    dec = fast.RowDecoder(lambda r0, r1, dst: np.copyto(dst, wh[r0:r1]), N, K, 1)
    assert fused.measure(w, {"v": (dec, 0, None)})["v"] is None


@pytest.mark.parametrize("case", ["scaled 1e-4", "scaled 1e-8", "unrelated, small"])
def test_a_variant_small_against_the_reference_gets_its_cosine_exactly(case):
    """Σ Ŵ² and Σ W·Ŵ made of the error sums cancel where Ŵ is small against W (a mis-scaled layer,
    whose cosine is what shows it): the one pass leaves such a variant to the general path, which
    takes them directly. The cosine came out NaN for W·1e-8 and 5e-4 off for a small unrelated
    Ŵ; an ordinary variant beside it keeps the one pass."""
    from quantscope.backend.metrics import error_metrics
    w = _ref(seed=12)
    w32 = w.astype(np.float32)
    rng = np.random.default_rng(12)
    wh = {"scaled 1e-4": w32 * np.float32(1e-4), "scaled 1e-8": w32 * np.float32(1e-8),
          "unrelated, small": rng.standard_normal(w.shape).astype(np.float32) * np.float32(2e-8)}[case]
    ok = (w32 + rng.standard_normal(w.shape).astype(np.float32) * np.float32(1e-3)).astype(np.float32)
    decs = {lb: fast.RowDecoder(lambda r0, r1, dst, a=a: np.copyto(dst, a[r0:r1]), N, K, 1)
            for lb, a in (("bad", wh), ("ok", ok))}
    got = fused.measure(w, {lb: (d, 0, None) for lb, d in decs.items()})
    assert got["bad"] is None
    _check(got["ok"], w, ok)
    _check(error_metrics(w32, wh), w, wh)  # (the general path)
    _check(error_metrics(w32[:100], wh[:100]), w[:100], wh[:100])  # (a small layer's path)


def test_cancel_stops_within_a_block():
    w = _ref(seed=11)
    dec, _ = _mlx(w)
    ev = threading.Event()
    ev.set()
    with pytest.raises(Cancelled):
        fused.measure(w, {"v": (dec, 0, None)}, cancel=ev)


def test_kth_values_exact():
    for vals in (RNG.random(100_000), np.round(RNG.random(50_000) * 50) / 1000,
                 np.concatenate([np.zeros(500), RNG.random(300) * 1e-30, RNG.random(300) * 1e3])):
        pos = [len(vals) - 1, 0, 7, len(vals) // 2, len(vals) // 2]
        np.testing.assert_array_equal(fast.kth_values(vals, pos), np.sort(vals)[pos])
    # more wanted buckets than one pass takes (four), a tie bucket among them, and a range of
    # hundreds of octaves (more buckets than the interleaved tables take)
    ties = np.concatenate([RNG.random(20_000), np.full(30_000, 0.25)])
    for vals in (ties, 10.0 ** RNG.uniform(-30, 30, 40_000)):
        pos = sorted(RNG.choice(len(vals), 11, replace=False).tolist() + [len(vals) // 2])
        np.testing.assert_array_equal(fast.kth_values(vals, pos), np.sort(vals)[pos])
    # hundreds of wanted buckets (the table pass, one sort of all gathered values), and all zeros
    vals = np.concatenate([RNG.standard_t(3, 60_000) ** 2, np.zeros(1000), np.full(5000, 0.5)])
    pos = RNG.choice(len(vals), 400, replace=False)
    np.testing.assert_array_equal(fast.kth_values(vals, pos), np.sort(vals)[pos])
    np.testing.assert_array_equal(fast.kth_values(np.zeros(10), [9, 0, 3]), np.zeros(3))
    assert fast.kth_values(np.array([1.0, np.inf]), [0]) is None
    assert fast.kth_values(np.array([1.0, np.nan]), [0]) is None


def _near_limits(lims, n, seed):
    """float64 values around float32 limits: exactly on them, a hair below (rounding up onto
    them in float32) and above, plus a spread."""
    rng = np.random.default_rng(seed)
    l64 = lims.astype(np.float64)
    edge = np.concatenate([l64, l64 * (1 - 2.0**-26), l64 * (1 + 2.0**-26), l64 * (1 - 2.0**-22)])
    return rng.permutation(np.concatenate([edge, rng.random(n) * 2 * float(lims.max())]))


@pytest.mark.parametrize("nlims", [1, 2, 3, 5])
def test_count_lt32_equals_numpy(nlims):
    lims = np.sort(np.random.default_rng(nlims).random(nlims).astype(np.float32)) + np.float32(0.1)
    vals = _near_limits(lims, 5000, nlims)
    want = [(vals.astype(np.float32) < lim).sum() for lim in lims]
    assert fast.count_lt32(vals, lims).tolist() == want


@pytest.mark.parametrize("m", [1, 2, 3])
def test_restrict_keeps_and_counts_like_numpy(m):
    home_lo = np.array([0.1, 0.5, 0.8][:m], np.float32)
    home_hi = np.array([0.3, 0.7, 0.9][:m], np.float32)
    new_lo = np.array([0.15, 0.55, 0.8][:m], np.float32)
    new_hi = np.array([0.25, 0.55, 0.85][:m], np.float32)  # a point interval too
    vals = _near_limits(np.concatenate([home_lo, home_hi, new_lo, new_hi]), 4000, m)
    v32 = vals.astype(np.float32)
    vals = vals[((v32[:, None] >= home_lo) & (v32[:, None] <= home_hi)).any(1)]  # what was collected
    v32 = vals.astype(np.float32)
    kept, below = fast.restrict(vals, home_lo, new_lo, new_hi)
    inside = ((v32[:, None] >= new_lo) & (v32[:, None] <= new_hi)).any(1)
    assert np.array_equal(kept, vals[inside])  # in order, float64 values unchanged
    assert below.tolist() == [((v32 >= h) & (v32 < n)).sum() for h, n in zip(home_lo, new_lo)]
    with pytest.raises(ValueError):
        fast.restrict(vals, np.zeros(4, np.float32), np.zeros(4, np.float32), np.ones(4, np.float32))


@pytest.mark.parametrize("k", [2 * fast.PIECE + 452, 300])
@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("with_col", [False, True])
def test_pair_stats_equals_numpy_on_rows_in_pieces(k, bf16, with_col):
    # every count, sum and collected value of one block against numpy, on rows taken in pieces
    # of PIECE with a ragged tail (not a whole word of 8 flags), with a first interval from 0
    # (zeros counted apart, never collected), a point interval and one up to inf
    rng = np.random.default_rng(k)
    w = (rng.standard_normal((24, k)) * 0.02).astype(BF16 if bf16 else np.float32)
    wf = w.astype(np.float32)
    col = (0.5 + rng.random(k)).astype(np.float32) if with_col else np.empty(0, np.float32)
    v = wf + (rng.standard_normal(wf.shape) * 1e-3).astype(np.float32)
    v[:, ::7] = wf[:, ::7]  # exact zeros everywhere
    if with_col:
        v *= col
    t = np.abs((v / col if with_col else v) - wf)
    point = np.float32(np.sort(t[t > 0])[t.size // 2])
    v[3, -1] = (wf[3, -1] + point) * (col[-1] if with_col else 1)  # a hit in the last flag word of a row
    x = v / col if with_col else v
    t = np.abs(x - wf)
    d64 = np.abs(x.astype(np.float64) - wf.astype(np.float64))
    lo = np.array([0.0, point, np.float32(2.5e-3)], np.float32)
    hi = np.array([np.float32(2e-4), point, np.inf], np.float32)
    acc, cnt, buf = np.zeros(5), np.zeros(7, np.int64), np.empty(v.size)
    fast.pair_stats(w, v, col, lo, hi, 3, acc, cnt, buf)
    nz = int((t == 0).sum())
    assert cnt[0] == nz
    assert cnt[4:].tolist() == [0, int((t < lo[1]).sum()), int((t < lo[2]).sum())]
    inside = ((t >= lo[:, None, None]) & (t <= hi[:, None, None])).any(0) & (t > 0)
    assert cnt[1] == inside.sum() and inside[3, -1]
    np.testing.assert_array_equal(np.sort(buf[:cnt[1]]), np.sort(d64[inside]))
    a, d = wf.astype(np.float64), x.astype(np.float64) - wf.astype(np.float64)
    assert acc[:3] == pytest.approx([(d * d).sum(), (a * a).sum(), (a * d).sum()], rel=1e-12)
    if with_col:
        raw = v.astype(np.float64) - a
        assert acc[3] == pytest.approx((raw * raw).sum(), rel=1e-12)
    assert acc[4] == d64.max()
    assert np.uint32(cnt[2]).view(np.float32) == t.max()


@pytest.mark.parametrize("flags", [0, 1, 3])
def test_pair_stats_histogram_counts_float32_error_bits(flags):
    # the sample blocks' histogram: bin (bits >> HIST_SHIFT) - HIST_BASE of float32 |d|, clipped,
    # its bins found by the vector pass (with each flag's sums) and by the scalar tail
    w = _ref(n=64, seed=13)[:, :2043]
    wf = w.astype(np.float32)
    x = wf + (RNG.standard_normal(wf.shape) * 1e-3).astype(np.float32)
    x[0, :5] = wf[0, :5]  # exact zeros: the first bin
    x[1, 0] = np.float32(1e30)  # above 2**24: the last bin
    hist = np.zeros(fast.HIST_BINS, np.int32)
    acc, cnt, empty = np.zeros(5), np.zeros(4, np.int64), np.empty(0, np.float32)
    fast.pair_stats(w, x, empty, empty, empty, flags, acc, cnt, np.empty(0), hist)
    bits = np.abs(x - wf).view(np.int32).ravel()
    want = np.bincount(np.clip((bits >> fast.HIST_SHIFT) - fast.HIST_BASE, 0, fast.HIST_BINS - 1),
                       minlength=fast.HIST_BINS)
    np.testing.assert_array_equal(hist, want)
    assert hist[0] >= 5 and hist[-1] == 1
    assert cnt[0] == np.count_nonzero(bits == 0)
    a, d = wf.astype(np.float64), x.astype(np.float64) - wf.astype(np.float64)
    want = [(d * d).sum(), (a * a).sum() if flags & 2 else 0.0, (a * d).sum()] if flags & 1 else [0.0] * 3
    assert acc[:3] == pytest.approx(want, rel=1e-12) and acc[4] == np.abs(d).max()
    lo, hi = fast.hist_edges(np.array([0, 1, fast.HIST_BINS - 1]))
    assert lo[0] == 0 and hi[-1] == np.inf
    assert np.nextafter(hi[0], np.float32(1)) == lo[1]  # bins meet: no |d| falls between them


def test_hist_intervals_hold_the_ranks_and_shrink_to_bins_when_all_is_sampled():
    rng = np.random.default_rng(14)
    blocks = [np.abs(rng.standard_normal(50_000) * s).astype(np.float32) for s in (1e-3, 1.1e-3, 0.9e-3, 1e-3)]

    def hist(b):
        return np.bincount(np.clip((b.view(np.int32) >> fast.HIST_SHIFT) - fast.HIST_BASE, 0, fast.HIST_BINS - 1),
                           minlength=fast.HIST_BINS)

    allv = np.sort(np.concatenate(blocks))
    hists = np.stack([hist(b) for b in blocks])
    # every block sampled: no margin beyond the bins holding each rank
    lo, hi, share = fused.hist_intervals(hists, len(blocks))
    for p in (50, 95, 99):
        v = allv[int(p / 100 * (allv.size - 1))]
        assert any(a <= v <= b for a, b in zip(lo, hi)), p
    assert share < 0.02  # three bins of 256 per octave
    # 4 of 40 blocks sampled: wider, still around the estimates
    lo2, hi2, share2 = fused.hist_intervals(hists, 40)
    assert share2 > share
    for p in (50, 95, 99):
        v = allv[int(p / 100 * (allv.size - 1))]
        assert any(a <= v <= b for a, b in zip(lo2, hi2)), p


def test_spare_buffers_are_reused_between_measurements(monkeypatch):
    spare = fused._Spare()
    monkeypatch.setattr(fused, "SPARE", spare)
    w = _ref(seed=15)
    dec, full = _gptq(w)
    _check(fused.measure(w, {"v": (dec, 0, None)})["v"], w, full)
    kept = {id(b) for b in spare._free}
    assert kept  # handed back at the end
    took = []
    real = spare.take
    monkeypatch.setattr(spare, "take", lambda n: took.append(r := real(n)) or r)
    _check(fused.measure(w, {"v": (dec, 0, None)})["v"], w, full)  # the same figures from reused memory
    assert sum(id(b) in kept for b in took) >= len(kept) // 2
    monkeypatch.setattr(fused, "SPARE_BYTES", 1 << 20)
    spare.give([np.empty(3 << 20, np.uint8)])
    assert sum(b.size for b in spare._free) <= 1 << 20  # never more than the limit stays


# -- through the sweep ------------------------------------------------------------------------

def _big_model(folder, tensors, cfg=None):
    import json

    from helpers import write_st
    from quantscope.backend.checkpoint import open_checkpoint
    from quantscope.backend.schemes import analyze
    folder.mkdir(parents=True)
    write_st(folder / "model.safetensors", tensors, {"format": "mlx" if cfg and "quantization" in cfg else "pt"})
    c = {"model_type": "llama", "hidden_size": K, "intermediate_size": N, "torch_dtype": "bfloat16"}
    c.update(cfg or {})
    (folder / "config.json").write_text(json.dumps(c))
    return analyze(open_checkpoint(folder))


def test_sweep_one_pass_equals_general_path(tmp_path, monkeypatch):
    # split q/k/v in the reference, a fused qkv_proj in the MLX variant: k and v start at a
    # row offset inside the variant's layer
    rng = np.random.default_rng(12)
    ref_t, var_t = {}, {}
    parts = []
    for m, rows in (("q_proj", 512), ("k_proj", 256), ("v_proj", 256)):
        w = (rng.standard_normal((rows, K)) * 0.02).astype(BF16)
        ref_t[f"model.layers.0.self_attn.{m}.weight"] = w
        parts.append(w)
    w = (rng.standard_normal((N, K)) * 0.02).astype(BF16)
    ref_t["model.layers.0.mlp.up_proj.weight"] = w
    a = mx.array(np.concatenate(parts).view(np.uint16)).view(mx.bfloat16)
    wq, s, b = mx.quantize(a, group_size=64, bits=4)
    var_t["model.layers.0.self_attn.qkv_proj.weight"] = to_np(wq)
    var_t["model.layers.0.self_attn.qkv_proj.scales"] = to_np(s.view(mx.uint16)).view(BF16)
    var_t["model.layers.0.self_attn.qkv_proj.biases"] = to_np(b.view(mx.uint16)).view(BF16)
    wq, s, b = mx.quantize(mx.array(w.view(np.uint16)).view(mx.bfloat16), group_size=64, bits=4)
    var_t["model.layers.0.mlp.up_proj.weight"] = to_np(wq)
    var_t["model.layers.0.mlp.up_proj.scales"] = to_np(s.view(mx.uint16)).view(BF16)
    var_t["model.layers.0.mlp.up_proj.biases"] = to_np(b.view(mx.uint16)).view(BF16)
    ref = _big_model(tmp_path / "ref", ref_t)
    var = _big_model(tmp_path / "var", var_t, {"quantization": {"group_size": 64, "bits": 4}})

    calls = []
    real = fused.measure
    monkeypatch.setattr(fused, "measure", lambda *a, **k: calls.append(k["parallel"]) or real(*a, **k))
    monkeypatch.setattr(compare, "FUSED_MIN_ELEMENTS", 1 << 19)
    seen = []
    fast_rows = {r.name: r for r in compare.sweep(ref, {"m": var}, engine="numpy", progress=seen.append,
                                                  jobs=2).rows}
    # q, k, v (inside qkv_proj) and up_proj all took the one-pass path; the last layer spreads
    # its blocks over the cores (nothing else is left to run beside it)
    assert calls == [False, False, False, True]
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0)  # from the jobs' threads, in order
    monkeypatch.setattr(compare, "FUSED_MIN_ELEMENTS", 1 << 40)
    slow_rows = {r.name: r for r in compare.sweep(ref, {"m": var}, engine="numpy").rows}
    assert len(calls) == 4
    assert fast_rows.keys() == slow_rows.keys() and len(fast_rows) == 4
    for name, r in fast_rows.items():
        g = slow_rows[name]
        for key in ("p50", "p95", "p99", "max_abs"):
            assert getattr(r, key) == getattr(g, key), (name, key)
        for key in ("rel_fro", "mse", "cosine", "sqnr_db"):
            assert getattr(r, key) == pytest.approx(getattr(g, key), rel=1e-9), (name, key)
        assert r.variant_layer == g.variant_layer and r.smoothing == g.smoothing


def test_quantized_reference_decoded_alongside():
    # verifying a conversion: the reference itself is quantized (here GPTQ), decoded block by block
    w = _ref(seed=13)
    gdec, gfull = _gptq(w)
    mdec, mfull = _mlx(gfull.astype(BF16))  # a requantization of the GPTQ weights
    res = fused.measure(gdec, {"mlx": (mdec, 0, None), "same": (gdec, 0, None)})
    _check(res["mlx"], gfull, mfull)
    assert res["same"]["rel_fro"] == 0.0 and res["same"]["p99"] == 0.0 and res["same"]["max_abs"] == 0.0


@pytest.mark.parametrize("case", ["autoawq-gemm-w4g128", "gptqmodel-gptq-w4g128-actorder", "mlx"])
def test_real_checkpoints_one_pass_equals_general_path(real_fixtures, monkeypatch, case):
    # the tools' own files against the trained base: real error distributions, AutoAWQ's norm-
    # folded smoothing (undone by column scales inside the pass) and lstsq-fitted down/o_proj
    from pathlib import Path

    from quantscope.backend.workspace import open_model
    ref = open_model(real_fixtures / "base-bf16")
    var = open_model(real_fixtures / "mlx-affine-q4-g64" if case == "mlx"
                     else Path(__file__).parent / "fixtures" / "real" / case)
    monkeypatch.setattr(fused, "BLOCK_ELEMENTS", 1 << 12)  # many blocks even in these small layers
    monkeypatch.setattr(compare, "FUSED_MIN_ELEMENTS", 1 << 14)
    calls = []
    real = fused.measure
    monkeypatch.setattr(fused, "measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    one = {(r.name, r.variant): r for r in compare.sweep(ref, {"v": var}, engine="numpy").rows}
    assert len(calls) > 5
    monkeypatch.setattr(compare, "FUSED_MIN_ELEMENTS", 1 << 40)
    gen = {(r.name, r.variant): r for r in compare.sweep(ref, {"v": var}, engine="numpy").rows}
    assert one.keys() == gen.keys()
    for key, r in one.items():
        g = gen[key]
        assert (r.p50, r.p95, r.p99, r.max_abs) == (g.p50, g.p95, g.p99, g.max_abs), key
        assert r.rel_fro == pytest.approx(g.rel_fro, rel=1e-9) and r.cosine == pytest.approx(g.cosine, rel=1e-9)
        assert r.rel_fro_raw == pytest.approx(g.rel_fro_raw, rel=1e-9) and r.smoothing == g.smoothing, key


def test_narrowing_keeps_only_the_missed_percentile_whole():
    """A percentile whose estimate so far lies outside every interval keeps its interval whole;
    the others still narrow (giving up on all left the whole layer's intervals wide)."""
    rng = np.random.default_rng(3)
    d = np.sort(rng.uniform(0.0, 1.0, 100_000))
    n = d.size
    # intervals around p50 and p95 hold their ranks; the p99 one stops short of rank 0.99 (n - 1)
    ivs = [(0.45, 0.55), (0.93, 0.97), (0.975, 0.985)]
    lo = np.array([a for a, _ in ivs], np.float32)
    hi = np.array([b for _, b in ivs], np.float32)
    f32 = d.astype(np.float32)
    found = fused._Found(lo, hi)
    found.n = n
    found.below = np.array([int(np.count_nonzero(f32 < a)) for a in lo], np.int64)
    found.parts = [np.concatenate([d[(f32 >= a) & (f32 <= b)] for a, b in zip(lo, hi)])]
    sizes = [n // 10] * 10
    per_block = [found.below * 0 + found.below // 10 for _ in sizes]
    got = found.narrowed(per_block, sizes, 40)
    assert got is not None
    new_lo, new_hi = got
    assert new_lo.size == 3
    # p50 and p95 narrowed, nested in their intervals, still holding their ranks
    for q, (a, b) in zip((0.5, 0.95), ivs[:2]):
        j = int(np.searchsorted(new_lo, np.float32(a), "left"))
        assert a <= new_lo[j] and new_hi[j] <= b and (new_hi[j] - new_lo[j]) < (b - a)
        assert new_lo[j] <= d[int(q * (n - 1))] <= new_hi[j]
    assert (new_lo[2], new_hi[2]) == (lo[2], hi[2])  # p99's missed: kept whole


@pytest.mark.parametrize("kind", ["mlx4", "gptq"])
def test_sample_blocks_decoded_again_when_too_many_bytes_to_keep(kind, monkeypatch):
    # wide layers: the sample blocks are not held until their second look but decoded again,
    # their sums taken once; the figures are numpy's all the same, and every row is handed to
    # done_rows once, after its last look
    monkeypatch.setattr(fused, "KEEP_BYTES", 0)
    w = _ref(seed=21)
    dec, full = _mlx(w) if kind == "mlx4" else _gptq(w)
    calls = []
    real = dec.fn
    dec = dec._replace(fn=lambda r0, r1, dst: calls.append((r0, r1)) or real(r0, r1, dst))
    done = []
    res = fused.measure(w, {"v": (dec, 0, None)}, done_rows=lambda r0, r1: done.append((r0, r1)))["v"]
    _check(res, w, full)
    assert res["rel_fro_raw"] == res["rel_fro"]
    blocks = sorted(set(calls))
    assert len(calls) > len(blocks)  # the sample blocks twice
    assert sorted(done) == blocks and blocks[0][0] == 0 and blocks[-1][1] == N
    assert all(a[1] == b[0] for a, b in itertools.pairwise(blocks))


def test_wide_layers_measured_alone_and_their_pages_released(tmp_path, monkeypatch):
    from quantscope.backend.checkpoint import Checkpoint
    rng = np.random.default_rng(14)
    ref_t, var_t = {}, {}
    for i in range(2):
        w = (rng.standard_normal((N, K)) * 0.02).astype(BF16)
        ref_t[f"model.layers.{i}.mlp.up_proj.weight"] = w
        wq, s, b = mx.quantize(mx.array(w.view(np.uint16)).view(mx.bfloat16), group_size=64, bits=4)
        var_t[f"model.layers.{i}.mlp.up_proj.weight"] = to_np(wq)
        var_t[f"model.layers.{i}.mlp.up_proj.scales"] = to_np(s.view(mx.uint16)).view(BF16)
        var_t[f"model.layers.{i}.mlp.up_proj.biases"] = to_np(b.view(mx.uint16)).view(BF16)
    ref = _big_model(tmp_path / "ref", ref_t)
    var = _big_model(tmp_path / "var", var_t, {"quantization": {"group_size": 64, "bits": 4}})
    calls, released = [], []
    real = fused.measure
    monkeypatch.setattr(fused, "measure", lambda *a, **k: calls.append(k["parallel"]) or real(*a, **k))
    real_release = Checkpoint.release
    monkeypatch.setattr(Checkpoint, "release", lambda self, names, rows=None: released.append(
        (self.root.name, tuple(names), rows)) or real_release(self, names, rows))
    monkeypatch.setattr(compare, "FUSED_MIN_ELEMENTS", 1 << 19)
    got = {r.name: r for r in compare.sweep(ref, {"m": var}, engine="numpy", jobs=2).rows}
    assert calls == [False, True]  # the last layer spreads its blocks; the first runs beside nothing
    monkeypatch.setattr(compare, "WIDE_ELEMENTS", 1 << 20)
    calls.clear()
    released.clear()
    wide = {r.name: r for r in compare.sweep(ref, {"m": var}, engine="numpy", jobs=2).rows}
    assert calls == [True, True]  # each alone, over all cores
    for name, r in got.items():  # (float64 sums in another order: within 1e-12)
        for key in ("p50", "p95", "p99", "max_abs"):
            assert getattr(wide[name], key) == getattr(r, key), (name, key)
        for key in ("rel_fro", "mse", "cosine"):
            assert getattr(wide[name], key) == pytest.approx(getattr(r, key), rel=1e-12), (name, key)
    for i in range(2):
        name = f"model.layers.{i}.mlp.up_proj"
        # the reference's rows as they are measured, then each whole layer once it is done
        rows = [x[2] for x in released if x[:2] == ("ref", (f"{name}.weight",)) and x[2] is not None]
        assert min(rows)[0] == 0 and max(r1 for _, r1 in rows) == N
        assert ("ref", (f"{name}.weight",), None) in released
        assert any(x[0] == "var" and set(x[1]) == {f"{name}.{c}" for c in ("weight", "scales", "biases")}
                   and x[2] is None for x in released)


@pytest.mark.parametrize("n, per_block", [(11, 1), (100, 1), (100, 1 << 18), (880, 917504), (4000, 1 << 18)])
def test_steps_cover_every_block_once_and_start_small_in_huge_layers(n, per_block):
    steps = fused._steps(list(range(n)), per_block)
    flat = [b for s in steps for b in s]
    assert sorted(flat) == list(range(n))  # each block in exactly one step
    if n < 12:
        assert len(steps) == 1
    elif n // 4 * per_block <= fused.STEP_ELEMENTS:
        assert [len(s) for s in steps] == [n // 4, n - n // 4]
    else:  # a first step of STEP_ELEMENTS, then growing fourfold, narrowing after each
        sizes = [len(s) for s in steps]
        assert sizes[0] * per_block <= fused.STEP_ELEMENTS and len(sizes) >= 3
        assert all(b == 4 * a for a, b in itertools.pairwise(sizes[:-1]))
    for s in steps[:-1]:  # spread over the layer, not its first blocks
        assert s[-1] - s[0] > n // 2


@pytest.mark.parametrize("flags", [0, 1, 3])
def test_pair_stats_vector_pass_with_nan_overflow_and_every_flag(flags):
    # the explicit 16-lane pass (fast._make_vpass) and its scalar tail: a NaN counts nowhere and
    # makes the sums NaN, a buffer too small still counts every hit, each flag adds only its sums,
    # and every hit's exact value is collected
    rng = np.random.default_rng(flags)
    k = 3 * fast.PIECE + 37
    w = (rng.standard_normal((3, k)) * 0.02).astype(np.float32)
    v = w + (rng.standard_normal(w.shape) * 1e-3).astype(np.float32)
    v[1, 5] = np.nan
    t = np.abs(v - w)
    lo = np.array([np.float32(np.nanquantile(t, 0.5))], np.float32)
    hi = np.array([np.float32(np.nanquantile(t, 0.6))], np.float32)
    inside = (t >= lo[0]) & (t <= hi[0])
    cap = int(inside.sum()) // 2
    acc, cnt, buf = np.zeros(5), np.zeros(5, np.int64), np.empty(cap)
    fast.pair_stats(w, v, np.empty(0, np.float32), lo, hi, flags, acc, cnt, buf)
    assert cnt[1] == inside.sum() and cnt[4] == int((t < lo[0]).sum())  # counted past the buffer's end
    # (what the buffer then holds is undefined: the caller takes the general path)
    if flags & 1:
        ww = (w.astype(np.float64) ** 2).sum() if flags & 2 else 0.0  # (the NaN is the variant's)
        assert np.isnan(acc[0]) and np.isnan(acc[2]) and acc[1] == pytest.approx(ww, rel=1e-12)
    else:
        assert not acc[:3].any()
    fin = np.isfinite(t)
    v[~fin] = w[~fin]
    acc, cnt, buf = np.zeros(5), np.zeros(5, np.int64), np.empty(v.size)
    fast.pair_stats(w, v, np.empty(0, np.float32), lo, hi, flags, acc, cnt, buf)
    a, d = w.astype(np.float64), v.astype(np.float64) - w.astype(np.float64)
    want = [(d * d).sum(), (a * a).sum() if flags & 2 else 0.0, (a * d).sum()] if flags & 1 else [0.0, 0.0, 0.0]
    assert acc[:3] == pytest.approx(want, rel=1e-12)
    assert acc[4] == np.abs(d).max() and cnt[0] == int((d == 0).sum())
    t = np.abs(v - w)
    inside = (t >= lo[0]) & (t <= hi[0])
    assert cnt[1] == inside.sum()
    np.testing.assert_array_equal(np.sort(buf[:cnt[1]]), np.sort(np.abs(d)[inside]))


def test_pair_stats_max_is_exact_among_ties_of_its_float32_bits_across_calls():
    # The exact float64 max |d| is looked for in each piece whose float32 max reaches the running
    # one: here four elements, in several pieces and calls, share the float32 max's bits while
    # their float64 |d| differ (the float64 difference keeps bits the float32 one rounds away),
    # and the largest of them sits in the last call's last piece.
    rng = np.random.default_rng(3)
    k = 4 * fast.VPIECE + 5
    w = (rng.standard_normal((3, k)) * 0.02).astype(np.float32)
    v = (w + (rng.standard_normal(w.shape) * 1e-3).astype(np.float32)).astype(np.float32)
    # v = 0.5 against w one float32 ulp apart near 0.01: their float64 |d| differ, their
    # float32 |d| all round to 0.49; the largest (the least w) in the last row's last piece
    spots = [(0, 10), (0, fast.VPIECE + 3), (1, 2 * fast.VPIECE + 7), (2, k - 2)]
    u = np.spacing(np.float32(0.01))
    for i, (r, c) in enumerate(spots):
        w[r, c] = np.float32(0.01) + u * np.float32(3 - i)
        v[r, c] = np.float32(0.5)
    d64 = np.abs(v.astype(np.float64) - w.astype(np.float64))
    t32 = np.abs(v - w)
    assert len({float(d64[r, c]) for r, c in spots}) > 1 and len({float(t32[r, c]) for r, c in spots}) == 1
    empty = np.empty(0, np.float32)
    acc, cnt = np.zeros(5), np.zeros(4, np.int64)
    for r in range(3):  # one call per row: the running float32 max carried in cnt[2]
        fast.pair_stats(w[r:r + 1], v[r:r + 1], empty, empty, empty, 1, acc, cnt, np.empty(0))
    assert acc[4] == d64.max()


@pytest.mark.parametrize("ref_dtype", [np.float32, BF16])
@pytest.mark.parametrize("n_iv", [1, 2, 3])
def test_pair_stats_counts_and_hits_at_the_bounds_themselves(ref_dtype, n_iv):
    # The vector pass compares the bits of |d| with those of the bounds (integer arithmetic): an
    # element exactly on a bound, an exact zero, inf and NaN, a bfloat16 reference, and the unused
    # intervals (bounds inf / -inf) must count as the definition says: below lo[q] is |d| < lo[q],
    # a hit is lo[q] <= |d| <= hi[q] for some q, zeros are never hits, NaN is nowhere.
    rng = np.random.default_rng(n_iv)
    k = 2 * fast.VPIECE + 21  # whole pieces and the scalar tail
    w = (rng.standard_normal((2, k)) * 0.02).astype(ref_dtype)
    wf = w.astype(np.float32)
    d = np.round(rng.standard_normal(w.shape) * 64) / 2**16  # many ties: quantization-like steps
    v = (wf + d).astype(np.float32)
    v[0, :50] = wf[0, :50]  # exact zeros
    v[1, 7], v[1, 9] = np.nan, np.inf
    t = np.abs(v - wf)
    fin = t[np.isfinite(t)]
    qs = np.quantile(fin, [0.3, 0.5, 0.8, 0.9, 0.95, 0.99])
    lo = np.array([qs[2 * q] for q in range(n_iv)], np.float32)
    hi = np.array([qs[2 * q + 1] for q in range(n_iv)], np.float32)
    assert all(np.isin(np.concatenate([lo, hi]), t))  # the bounds are values that occur
    for flags in (0, 1, 3):
        acc, cnt, buf = np.zeros(5), np.zeros(4 + n_iv, np.int64), np.empty(v.size)
        fast.pair_stats(w, v, np.empty(0, np.float32), lo, hi, flags, acc, cnt, buf)
        with np.errstate(invalid="ignore"):
            inside = np.zeros(t.shape, bool)
            for q in range(n_iv):
                inside |= (t >= lo[q]) & (t <= hi[q])
            assert cnt[0] == int((t == 0).sum()) >= 50
            assert cnt[4:].tolist() == [int((t < lo[q]).sum()) for q in range(n_iv)]
        assert cnt[1] == inside.sum()
        exact = np.abs(v.astype(np.float64) - wf.astype(np.float64))
        np.testing.assert_array_equal(np.sort(buf[:cnt[1]]), np.sort(exact[inside]))
        assert np.isnan(acc[4])  # the NaN, like numpy's max


@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("ref_dtype", [np.float32, BF16])
def test_vector_pass_counts_the_same_both_ways(masks, ref_dtype):
    # fast._make_vpass counts through mask registers on AMD Zen 4 and by integer arithmetic
    # elsewhere: whichever this machine compiles into pair_stats, both are checked here, on a
    # whole call (the most elements one call counts: 16-bit fields) with exact zeros, ties on
    # the bounds, inf, NaN and an unused interval.
    import numba

    vpass = fast._make_vpass(True, True, masks)

    @numba.njit
    def call(w, x, nv, lims, acc, cnt, buf, st):
        vpass(w, x, nv, lims, acc, cnt, buf, st)

    rng = np.random.default_rng(11)
    n = fast.VPIECE
    w = (rng.standard_normal(n) * 0.02).astype(ref_dtype)
    wf = w.astype(np.float32)
    v = (wf + np.round(rng.standard_normal(n) * 64) / 2**16).astype(np.float32)
    v[:40] = wf[:40]
    v[100], v[200] = np.nan, np.inf
    t = np.abs(v - wf)
    qs = np.quantile(t[np.isfinite(t)], [0.3, 0.5, 0.8, 0.9])
    lims = np.array([qs[0], qs[2], np.inf, qs[1], qs[3], -np.inf], np.float32)
    assert np.isin(lims[[0, 1, 3, 4]], t).all()  # the bounds are values that occur
    acc, cnt, buf = np.zeros(5), np.zeros(6, np.int64), np.empty(n)
    st = np.array([0, n, 0], np.int64)
    wr = w.view(np.uint16) if ref_dtype == BF16 else w
    call(wr, v, n // fast.LANES, lims, acc, cnt, buf, st)
    with np.errstate(invalid="ignore"):
        assert cnt[0] == int((t == 0).sum()) >= 40
        assert cnt[1:4].tolist() == [int((t < lim).sum()) for lim in lims[:3]]
        inside = ((t >= lims[0]) & (t <= lims[3])) | ((t >= lims[1]) & (t <= lims[4]))
    assert cnt[5] == t.view(np.int32).max()  # the largest bits: NaN's
    exact = np.abs(v.astype(np.float64) - wf.astype(np.float64))
    assert st[0] == inside.sum() > 0
    np.testing.assert_array_equal(np.sort(buf[:st[0]]), np.sort(exact[inside]))
    assert np.isnan(acc[0]) and acc[1] == pytest.approx((wf.astype(np.float64) ** 2).sum(), rel=1e-12)


def _rows_of_different_scale(kind, seed, n=N, head=32):
    rng = np.random.default_rng(seed)
    scale = (np.repeat(np.exp(rng.normal(0, 0.6, n // head)), head) if kind == "heads"
             else np.linspace(0.3, 3, n))
    return _ref(n=n, seed=seed, rows_scale=scale)


@pytest.mark.parametrize("kind", ["heads", "trend"])
@pytest.mark.parametrize("seed", [3, 4, 5])
@pytest.mark.parametrize("run", [1 << 16, 1 << 13])  # blocks of 32 rows: kept whole, or remade of runs of 4
def test_rows_of_different_scale_narrow_without_missing_the_percentiles(kind, seed, run, monkeypatch):
    # Rows of different scale (attention heads, a drift along the rows) make blocks differ. The
    # narrowing took its margin from each block's share below its interval's lower bound; after a
    # wide first interval (from 0) that share was nil in every block, the margin fell to the
    # binomial floor and the narrowed intervals missed: such layers fell back to the general path
    # (two to three times the time). Now the share below the estimate itself is measured.
    narrowed = []
    real = fused._Found.restrict
    monkeypatch.setattr(fused._Found, "restrict", lambda self, lo, hi: narrowed.append(lo) or real(self, lo, hi))
    monkeypatch.setattr(fused, "RUN_ELEMENTS", run)
    monkeypatch.setattr(fused, "EXACT_SHARE", 1.0)  # (the narrowing itself: such layers now go elsewhere)
    w = _rows_of_different_scale(kind, seed)
    dec, full = _mlx(w)
    res = fused.measure(w, {"v": (dec, 0, None)}, parallel=False)["v"]
    assert narrowed and res is not None
    _check(res, w, full)


@pytest.mark.parametrize("kind", ["heads", "trend"])
def test_blocks_whose_sample_differs_are_remade_of_runs_from_across_the_layer(kind, monkeypatch):
    # Blocks of consecutive rows of such a layer differ so much that the narrowed intervals held
    # most of it; remade of runs from across the layer, they are alike and hold far less
    inside, calls = {}, {}
    real = fused._Found.restrict

    def restrict(self, lo, hi):
        real(self, lo, hi)
        inside[run] = self.values().size / self.n

    monkeypatch.setattr(fused._Found, "restrict", restrict)
    monkeypatch.setattr(fused, "EXACT_SHARE", 1.0)  # (the remaking itself: such layers now go elsewhere)
    n = 2048  # 64 blocks of 32 rows; heads of 128 rows
    w = _rows_of_different_scale(kind, 3, n=n, head=128)
    dec, full = _mlx(w)
    for run in (1 << 16, 1 << 13):
        monkeypatch.setattr(fused, "RUN_ELEMENTS", run)
        calls[run] = []
        counted = dec._replace(fn=lambda r0, r1, out, c=calls[run]: c.append((r0, r1)) or dec.fn(r0, r1, out))
        res = fused.measure(w, {"v": (counted, 0, None)}, parallel=False)["v"]
        _check(res, w, full)
        rows = sorted(r for a, b in calls[run] for r in range(a, b))
        assert rows == list(range(n))  # every row decoded once (the sample blocks are kept)
    assert {b - a for a, b in calls[1 << 16]} == {32}  # a decode per block
    assert sum(b - a == 4 for a, b in calls[1 << 13]) > len(calls[1 << 16])  # after the sample: runs of 4
    assert inside[1 << 13] < 0.5 * inside[1 << 16], inside


def _counting(dec, calls):
    return dec._replace(fn=lambda r0, r1, out: calls.append((r0, r1)) or dec.fn(r0, r1, out))


@pytest.mark.parametrize("seed, keep", [(3, True), (4, True), (3, False)])
def test_a_layer_whose_sample_blocks_differ_too_much_is_measured_in_two_exact_passes(seed, keep, monkeypatch):
    # Narrowed intervals would stay wide to the end and collect most of it (9 ns per element on
    # such attention layers); the general path took 6. Instead: a first pass adds every block's
    # |error| into the exact histogram, which says in which bin each wanted rank lies; a second
    # collects only those bins. No estimate, no narrowing, no miss. A layer within KEEP_BYTES
    # keeps its blocks decoded from the first pass to the second; a larger one decodes them again.
    if not keep:
        monkeypatch.setattr(fused, "KEEP_BYTES", 0)
    w = _rows_of_different_scale("heads", seed, n=2048, head=128)
    dec, full = _mlx(w)
    narrowed, calls, kept = [], [], []
    monkeypatch.setattr(fused._Found, "narrowed", lambda *a, **k: narrowed.append(1))
    real_add = fused._Found.add

    def add(self, acc):
        kept.append(int(acc.cnt[1]))
        return real_add(self, acc)

    monkeypatch.setattr(fused._Found, "add", add)
    reported, done = [], []
    res = fused.measure(w, {"v": (_counting(dec, calls), 0, None)}, parallel=False, on_rows=reported.append,
                        done_rows=lambda r0, r1: done.append((r0, r1)))["v"]
    _check(res, w, full)
    assert not narrowed
    assert sum(reported) == 2048  # half of each block's rows per pass: the bar moves through both
    assert sorted({r for a, b in done for r in range(a, b)}) == list(range(2048))  # every row's pages dropped
    rows = [r for a, b in calls for r in range(a, b)]
    assert sorted(set(rows)) == list(range(2048))
    assert len(rows) == (2048 if keep else 2 * 2048)  # each block decoded once, or once a pass
    assert 0 < sum(kept) < 0.03 * w.size  # the second pass collects the wanted bins only


def test_exact_passes_with_most_errors_zero(monkeypatch):
    # three quarters of the variant equal to the reference: p50 is an exact zero, never collected
    w = _rows_of_different_scale("heads", 5, n=2048, head=128)
    full = _mlx(w)[1]
    wf = np.asarray(w, np.float32)
    same = np.random.default_rng(1).random(wf.shape) < 0.75
    wh = np.where(same, wf, full).astype(np.float32)
    d2 = fast.RowDecoder(lambda r0, r1, dst: np.copyto(dst, wh[r0:r1]), wh.shape[0], wh.shape[1], 1)
    monkeypatch.setattr(fused, "EXACT_SHARE", 0.0)  # (whatever the sample says)
    res = fused.measure(w, {"v": (d2, 0, None)}, parallel=False)["v"]
    _check(res, w, wh)
    assert res["p50"] == 0.0 < res["p95"]


def test_exact_intervals_hold_the_ranks():
    # one bin per order statistic (two at most per percentile), merged; zeros below every bin
    tot = np.zeros(fast.HIST_BINS, np.int64)
    tot[0], tot[5000], tot[5001], tot[6000] = 10, 80, 5, 5
    lo, hi, share = fused._exact_intervals(tot, nzero=10, n=100)
    # p50 (ranks 49, 50) in bin 5000; p95 (94, 95) from bin 5001 to 6000; p99 (98, 99) in 6000
    l, h = fast.hist_edges(np.array([5000, 5001, 6000]))
    assert lo.tolist() == [l[0], l[1]] and hi.tolist() == [h[0], h[2]]
    assert share == pytest.approx(0.9)
    lo, hi, share = fused._exact_intervals(tot, nzero=100, n=100)  # all zeros: nothing to collect
    assert share == 0.0 and lo[0] > hi[0]
