"""Compare: alignment, undoing smoothing, metrics, detail views, sweep cancel/resume, CLI (issue 4)."""

from __future__ import annotations

import csv
import json
import math
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from helpers import write_st
from quantscope.backend.bitpack import pack_bits
from quantscope.backend.checkpoint import open_checkpoint
from quantscope.backend.compare import (
    LAYER_KEYS,
    CompareError,
    align,
    layer_detail,
    stored_codes,
    sweep,
)
from quantscope.backend.compare_align import counterpart
from quantscope.backend.engines import NumpyEngine
from quantscope.backend.errors import Cancelled
from quantscope.backend.metrics import (
    ErrorStats,
    error_metrics,
    histogram_counts,
    uniform_edges,
)
from quantscope.backend.schemes import analyze

BF16 = np.dtype(ml_dtypes.bfloat16)
H, F = 128, 192  # hidden, intermediate


def _model(folder: Path, tensors: dict, config: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    write_st(folder / "model.safetensors", tensors, {"format": "pt"})
    cfg = {"model_type": "llama", "hidden_size": H, "intermediate_size": F, "torch_dtype": "bfloat16"}
    cfg.update(config or {})
    (folder / "config.json").write_text(json.dumps(cfg))
    return analyze(open_checkpoint(folder))


def _ref_weights(seed=0, layers=2, tied=False):
    rng = np.random.default_rng(seed)
    w = {"model.embed_tokens.weight": rng.standard_normal((256, H)) * 0.02}
    for i in range(layers):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(H)
        w[f"{p}.post_attention_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(H)
        for m, shape in (("self_attn.q_proj", (H, H)), ("self_attn.k_proj", (64, H)), ("self_attn.v_proj", (H, H)),
                         ("self_attn.o_proj", (H, H)), ("mlp.gate_proj", (F, H)), ("mlp.up_proj", (F, H)),
                         ("mlp.down_proj", (H, F))):
            w[f"{p}.{m}.weight"] = rng.standard_normal(shape) * 0.02
    w["model.norm.weight"] = np.ones(H)
    if not tied:
        w["lm_head.weight"] = rng.standard_normal((256, H)) * 0.02
    return {k: v.astype(BF16) for k, v in w.items()}


def _f32(a):
    return np.asarray(a).astype(np.float32)


def _noisy(ref: dict, seed=1, scale=0.002):
    """A dense float32 'variant': reference + known noise on every matrix."""
    rng = np.random.default_rng(seed)
    return {k: (_f32(v) + rng.standard_normal(v.shape).astype(np.float32) * scale) if v.ndim == 2 else _f32(v)
            for k, v in ref.items()}


def _direct(w, wh):
    w, wh = np.asarray(w, np.float64), np.asarray(wh, np.float64)
    d = wh - w
    return np.linalg.norm(d) / np.linalg.norm(w)


@pytest.fixture(scope="module")
def ref_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    rw = _ref_weights()
    ref = _model(root / "ref", rw)
    vw = _noisy(rw)
    var = _model(root / "var", vw)
    return root, rw, ref, vw, var


# -- metrics ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [7, 70001, 300_000])
def test_metrics_of_float64_arrays_are_float64s(n):
    """An F64 checkpoint's weights were rounded to float32 first: a float32 copy of them measured
    exactly 0, and float64 arrays 7.6e-9 where the error was 1e-9."""
    rng = np.random.default_rng(n)
    w = rng.standard_normal(n) * 0.05
    for wh in (w.astype(np.float32), w + rng.standard_normal(n) * 5e-11):  # (float32 vs float64 mixed, too)
        m = error_metrics(w, wh)
        d = wh.astype(np.float64) - w
        rel = np.linalg.norm(d) / np.linalg.norm(w)
        assert m["rel_fro"] == pytest.approx(rel, rel=1e-9) and 0 < m["rel_fro"] < 1e-7
        assert m["max_abs"] == np.abs(d).max()
        for p in (50, 95, 99):
            assert m[f"p{p}"] == pytest.approx(np.percentile(np.abs(d), p), rel=1e-9)


def test_an_f64_reference_is_compared_in_float64(ref_pair, tmp_path):
    _root, rw, _ref, _vw, _var = ref_pair
    rng = np.random.default_rng(3)
    w64 = {k: _f32(v).astype(np.float64) + (rng.standard_normal(v.shape) * 1e-9 if v.ndim == 2 else 0)
           for k, v in rw.items()}
    ref64 = _model(tmp_path / "f64", w64)
    copy32 = _model(tmp_path / "f32", {k: v.astype(np.float32) for k, v in w64.items()})
    res = sweep(ref64, {"c": copy32}, engine="numpy")
    name = "model.layers.0.mlp.down_proj"
    row = next(r for r in res.rows if r.name == name)
    w, wh = w64[name + ".weight"], w64[name + ".weight"].astype(np.float32).astype(np.float64)
    assert row.rel_fro == pytest.approx(np.linalg.norm(wh - w) / np.linalg.norm(w), rel=1e-9) and row.rel_fro > 0
    assert row.max_abs == np.abs(wh - w).max()


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 70001])
def test_metrics_match_direct_numpy(n):
    rng = np.random.default_rng(n)
    w = (rng.standard_normal(n) * 0.05).astype(np.float32)
    wh = (w + rng.standard_normal(n).astype(np.float32) * 0.01).astype(np.float32)
    m = error_metrics(w, wh)
    w64, h64 = w.astype(np.float64), wh.astype(np.float64)
    d = h64 - w64
    rel = np.linalg.norm(d) / np.linalg.norm(w64)
    expect = {"rel_fro": rel, "sqnr_db": -20 * np.log10(rel),
              "cosine": w64 @ h64 / (np.linalg.norm(w64) * np.linalg.norm(h64)),
              "max_abs": np.abs(d).max(), "mse": np.mean(d * d)}
    for p in (50, 95, 99):
        expect[f"p{p}"] = np.percentile(np.abs(d), p)
    for k, v in expect.items():
        assert m[k] == pytest.approx(v, rel=1e-9, abs=0), k


@pytest.mark.parametrize("n", [1000, 100_000])
def test_infs_shared_by_both_sides_without_numba(n, monkeypatch):
    """+inf at the same places in reference and variant: inf - inf is NaN, not an exact zero. The
    numpy fallback counted them as zeros (a == b) and never gathered them: its percentiles
    indexed an empty array (IndexError, exit 3 from compare). Both paths now agree."""
    from quantscope.backend.formats import fast
    rng = np.random.default_rng(n)
    w = rng.standard_normal(n).astype(np.float32)
    wh = (w + rng.standard_normal(n).astype(np.float32) * np.float32(0.01)).astype(np.float32)
    at = rng.choice(n, n // 50, replace=False)
    w[at] = wh[at] = np.inf
    compiled = error_metrics(w, wh)
    monkeypatch.setattr(fast, "AVAILABLE", False)
    fallback = error_metrics(w, wh)
    for m in (compiled, fallback):
        assert all(np.isnan(m[k]) for k in ("rel_fro", "p50", "p95", "p99", "max_abs")), m
    assert compiled.keys() == fallback.keys()


def test_metrics_blocks_equal_one_pass_and_ties():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((300, 40)).astype(np.float32)
    wh = w.copy()
    wh[::3] += np.float32(0.5)  # many exact ties in |d|
    whole = error_metrics(w, wh)
    st = ErrorStats()
    for i in range(0, 300, 70):
        st.add(w[i:i + 70], wh[i:i + 70])
    st.plan()
    for i in reversed(range(0, 300, 70)):
        st.gather(w[i:i + 70], wh[i:i + 70])
    assert st.result() == pytest.approx(whole, rel=1e-12)
    assert whole["p50"] == np.percentile(np.abs(wh.astype(np.float64) - w), 50)
    assert error_metrics(w, w)["rel_fro"] == 0 and error_metrics(w, w)["sqnr_db"] == np.inf
    # an inf in the variant (a bf16 outlier of 70000 cast to fp16): its cosine is undefined, as
    # numpy's is (it was clamped to a perfect -1.0)
    wi = w.copy()
    wi[5, 5] = np.inf
    with np.errstate(invalid="ignore"):
        direct = float(np.dot(w.ravel().astype(np.float64), wi.ravel()) /
                       (np.linalg.norm(w.astype(np.float64)) * np.linalg.norm(wi.astype(np.float64))))
    assert np.isnan(direct) and np.isnan(error_metrics(w, wi)["cosine"])


@pytest.mark.parametrize("case", ["noise", "ties", "zeros", "nan", "inf", "one"])
def test_small_layer_path_equals_the_bucket_path_and_numpy(case):
    # ErrorStats.add_small (layers up to SMALL_ELEMENTS: selection on all |d|) against the
    # histogram path (add/plan/gather) and np.percentile
    rng = np.random.default_rng(11)
    n = 1 if case == "one" else 8192
    w = (rng.standard_normal(n) * 0.02).astype(np.float32)
    wh = (w + rng.standard_normal(n).astype(np.float32) * 0.002).astype(np.float32)
    if case == "ties":
        wh = w + np.float32(0.25) * (rng.integers(0, 3, n) - 1).astype(np.float32)
    if case == "zeros":
        wh[: n * 9 // 10] = w[: n * 9 // 10]
    if case == "nan":
        wh[5] = np.nan
    if case == "inf":
        wh[7] = np.inf
    small = ErrorStats()
    small.add_small(w, wh)
    want = error_metrics(w, wh)
    got = small.result()
    assert got.keys() == want.keys()
    for k in want:
        assert (math.isnan(got[k]) and math.isnan(want[k])) or got[k] == pytest.approx(want[k], rel=1e-12), k
    d = np.abs(wh.astype(np.float64) - w)
    with np.errstate(invalid="ignore"):
        for p in (50, 95, 99):
            assert np.array_equal(got[f"p{p}"], np.percentile(d, p), equal_nan=True), p


@pytest.mark.parametrize("zero_fraction", [1.0, 0.995, 0.5, 0.0])
def test_percentiles_with_exact_zeros(zero_fraction, kernel_path):
    # An exact conversion compares equal arrays: every |d| is 0. The zeros are counted, not
    # gathered (gathering all of them made verifying a 2 GB conversion take minutes).
    rng = np.random.default_rng(7)
    n = 50_000
    w = rng.standard_normal(n).astype(np.float32)
    wh = w.copy()
    k = int(round(n * (1 - zero_fraction)))
    idx = rng.choice(n, k, replace=False)
    wh[idx] += (rng.standard_normal(k) * 1e-3).astype(np.float32)
    sub = idx[: k // 10]  # subnormal differences: bucket 0, like the zeros, but not zeros
    w[sub] = 0.0
    wh[sub] = np.float32(1e-39) * (1 + np.arange(sub.size, dtype=np.float32) % 3)
    m = error_metrics(w, wh)
    d = np.abs(wh.astype(np.float64) - w.astype(np.float64))
    for p in (50, 95, 99):
        assert m[f"p{p}"] == np.percentile(d, p), p
    st = ErrorStats()
    st.add(w, wh)
    st.plan()
    assert st.nzero == np.count_nonzero(d == 0) >= n - k - 5
    assert st._plan[2] <= k  # pass two never holds the zeros


def test_histogram_counts_equal_np_histogram():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000).astype(np.float32)
    edges = uniform_edges(x.min(), x.max(), 97)
    c = histogram_counts(x, edges)
    assert np.array_equal(c, np.histogram(x, edges)[0])
    assert c.sum() == x.size


def _awkward(n, dtype, seed):
    """Values on and beside the edges, NaN, ±inf, and more than one piece of the pool's work."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 0.02).astype(dtype)
    x[::1001] = np.nan
    x[5::2003] = np.inf
    x[7::3001] = -np.inf
    x[11::97] = 0
    return x


@pytest.mark.parametrize("offset", [0.0, 1000.0, -3e5])
def test_counts_equal_numpy_on_and_beside_every_edge_far_from_zero(kernel_path, offset):
    """The compiled count reads the edges only where its arithmetic position is within a few
    ulps of one: values on every edge and one ulp either side, in a range narrow beside its
    magnitude (1e-3 wide at 1000: the edges' own rounding is a thousandth of a bin), are still
    binned as np.histogram bins them."""
    rng = np.random.default_rng(4)
    edges = uniform_edges(offset, offset + 1e-3, 16384)
    x = np.concatenate([edges, np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf),
                        offset + rng.random(200_000) * 1e-3])
    assert np.array_equal(histogram_counts(x, edges), np.histogram(x, edges)[0])
    assert np.array_equal(histogram_counts(x.astype(np.float32), edges), np.histogram(x.astype(np.float32), edges)[0])


@pytest.mark.parametrize("lo, hi", [(-0.07, 0.11), (1000.0, 1000.0625), (-3e5, -2.5e5), (0.0, 2.0 ** -20)])
def test_float32_counts_equal_numpy_on_and_beside_every_edge(kernel_path, lo, hi):
    """Float32 values between float32 bounds are binned in float32 arithmetic, whose position
    may be off by a few parts in 1e7: every value on an edge, and the float32 values one and
    two ulps either side of each, still land where np.histogram puts them. (With the margin cut
    from 4e-7 to 4e-8, the range -0.07 to 0.11 fails.)"""
    lo, hi = float(np.float32(lo)), float(np.float32(hi))
    edges = uniform_edges(lo, hi, 16384)
    e32 = edges.astype(np.float32)
    x = [e32]
    for k in (1, 2):
        up, down = e32.copy(), e32.copy()
        for _ in range(k):
            up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
        x += [up, down]
    rng = np.random.default_rng(5)
    x.append((lo + rng.random(300_000) * (hi - lo)).astype(np.float32))
    x.append(np.array([np.nan, np.inf, -np.inf, lo, hi], np.float32))
    x = np.concatenate(x)
    assert np.array_equal(histogram_counts(x, edges), np.histogram(x[np.isfinite(x)], edges)[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_views_histograms_equal_numpy_on_awkward_values(kernel_path, dtype, monkeypatch):
    """Values, errors (a - b in float64, never stored) and log10 |error| counted by the compiled
    kernels on all cores, or by numpy: both equal np.histogram on the same edges, bin for bin."""
    from quantscope.backend.formats import histo
    from quantscope.backend.metrics import Diff, LogAbsDiff, _finite_range, diff_of
    monkeypatch.setattr(histo, "PIECE", 1 << 16)  # several pieces over the pool
    n = 300_001
    a, b = _awkward(n, dtype, 1), _awkward(n, np.float32, 2)
    b[13::17] = a[13::17]  # exact zeros of the difference
    fa = a[np.isfinite(a)].astype(np.float64)
    edges = uniform_edges(fa.min(), fa.max(), 1000)
    edges = np.concatenate([edges[:1], edges[1:-1], edges[-1:]])
    x = a.copy()
    x[1:200:2] = edges[1:101]  # values exactly on edges
    assert np.array_equal(histogram_counts(x, edges), np.histogram(x, edges)[0])
    with np.errstate(invalid="ignore"):
        d = a.astype(np.float64) - b.astype(np.float64)
    fd = d[np.isfinite(d)]
    diff, zeros = diff_of(a, b)
    assert zeros == int(np.count_nonzero(fd == 0)) > 0
    assert _finite_range(diff)[:2] == (fd.min(), fd.max())
    assert tuple(histo.finite_range(a)[:2]) == (fa.min(), fa.max())  # (float32: through integer keys)
    assert histo.finite_range(a, b)[2:] == (np.abs(fd[fd != 0]).min(), zeros)
    de = uniform_edges(fd.min(), fd.max(), 513)
    assert np.array_equal(histogram_counts(diff, de), np.histogram(fd, de)[0])
    logs = np.log10(np.abs(fd[fd != 0]))
    assert _finite_range(LogAbsDiff(*diff))[:2] == (logs.min(), logs.max())
    le = uniform_edges(logs.min(), logs.max(), 700)
    assert np.array_equal(histogram_counts(LogAbsDiff(*diff), le), np.histogram(logs, le)[0])
    assert np.array_equal(histogram_counts(Diff(a, b), de), np.histogram(fd, de)[0])


def test_group_sums_and_level_counts_equal_numpy():
    from quantscope.backend.formats import fast, histo
    if not fast.AVAILABLE:
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(3)
    w = rng.standard_normal((37, 256)).astype(np.float32)
    wh = w + rng.standard_normal(w.shape).astype(np.float32) * np.float32(0.01)
    w[4, 70] = np.nan  # its own group's cell only
    g = rng.permutation(np.arange(256) // 64)  # act-order: groups scattered over the columns
    num, den = histo.group_sums(w, wh, g, 4)
    d2, w2 = (wh.astype(np.float64) - w) ** 2, w.astype(np.float64) ** 2
    for j in range(4):
        np.testing.assert_allclose(num[:, j], d2[:, g == j].sum(1), rtol=1e-12)
        np.testing.assert_allclose(den[:, j], w2[:, g == j].sum(1), rtol=1e-12)
    assert np.isnan(num[4, g[70]]) and np.isfinite(num[4]).sum() == 3
    # groups in runs of columns (every layout but act-order's): summed run by run, four lanes;
    # runs of unequal lengths whose tails are not whole fours, one group in two runs
    for g in (np.arange(256) // 64, np.repeat([0, 1, 2, 0], [70, 101, 77, 8])):
        num, den = histo.group_sums(w, wh, g, 4)
        for j in range(4):
            np.testing.assert_allclose(num[:, j], d2[:, g == j].sum(1), rtol=1e-12)
            np.testing.assert_allclose(den[:, j], w2[:, g == j].sum(1), rtol=1e-12)
        assert np.isnan(num[4, g[70]]) and np.isfinite(num[4]).sum() == 3  # (a group of no column: 0)
    codes = rng.integers(0, 16, size=1_000_003).astype(np.uint8)
    codes[:5000] = 15  # a saturated run
    assert np.array_equal(histo.level_counts(codes, 16), np.bincount(codes, minlength=16))


# -- alignment ----------------------------------------------------------------------------------

def test_same_names_and_prefix(ref_pair, tmp_path):
    _root, rw, ref, vw, var = ref_pair
    al = align(ref, var)
    assert "model.layers.1.mlp.down_proj" in al.targets and not al.unmatched
    pref = _model(tmp_path / "vlm", {("model.language_model." + k[6:] if k.startswith("model.") else
                                      "language_model." + k): v for k, v in vw.items()})
    res = sweep(ref, {"v": pref}, engine="numpy")
    name = "model.layers.0.self_attn.q_proj"
    row = next(r for r in res.rows if r.name == name)
    assert row.variant_layer == "model.language_model.layers.0.self_attn.q_proj"
    assert row.rel_fro == pytest.approx(_direct(_f32(rw[name + ".weight"]), vw[name + ".weight"]), rel=1e-9)
    assert row.layer_index == 0 and row.proj == "q_proj"
    # the config panel finds it by name alone
    assert counterpart(name, pref) == ("model.language_model.layers.0.self_attn.q_proj",
                                       "the same module under another prefix")
    assert counterpart(name, ref) == (name, "") and counterpart("model.layers.9.mlp.up_proj", ref) is None
    # the name map is made once per model (the window asks on every selection), again if it grows
    from quantscope.backend.compare_align import _canonical_names
    first = _canonical_names(pref)
    assert _canonical_names(pref) is first
    pref.layers["model.language_model.layers.0.extra_proj"] = pref.layers[row.variant_layer]
    assert counterpart("model.layers.0.extra_proj", pref)[0] == "model.language_model.layers.0.extra_proj"
    # a base model's save (transformers' AutoModel): no "model." at all, no lm_head ("no layer can
    # be compared" before); either way round
    bare = _model(tmp_path / "bare", {k[6:]: v for k, v in vw.items() if k.startswith("model.")})
    assert "layers.0.self_attn.q_proj" in bare.layers
    res = sweep(ref, {"v": bare}, engine="numpy")
    row = next(r for r in res.rows if r.name == name)
    assert row.variant_layer == "layers.0.self_attn.q_proj" and row.rel_fro == pytest.approx(
        _direct(_f32(rw[name + ".weight"]), vw[name + ".weight"]), rel=1e-9)
    assert {r.name for r in res.rows} >= {n for n, lay in ref.layers.items() if n.startswith("model.layers.") and lay.is_matrix}
    back = sweep(bare, {"v": var}, engine="numpy")
    assert next(r for r in back.rows if r.name == "layers.0.self_attn.q_proj").variant_layer == name


@pytest.mark.parametrize("interleaved", [False, True])
def test_fused_variant_against_split_reference(ref_pair, tmp_path, interleaved):
    _root, rw, ref, vw, _var = ref_pair
    t = dict(vw)
    for i in range(2):
        p = f"model.layers.{i}"
        t[f"{p}.self_attn.qkv_proj.weight"] = np.concatenate([t.pop(f"{p}.self_attn.{m}.weight")
                                                              for m in ("q_proj", "k_proj", "v_proj")])
        g, u = t.pop(f"{p}.mlp.gate_proj.weight"), t.pop(f"{p}.mlp.up_proj.weight")
        if interleaved:
            gu = np.empty((2 * F, H), np.float32)
            gu[0::2], gu[1::2] = g, u
        else:
            gu = np.concatenate([g, u])
        t[f"{p}.mlp.gate_up_proj.weight"] = gu
    fused = _model(tmp_path / "fused", t, {"model_type": "gpt_oss" if interleaved else "llama"})
    res = sweep(ref, {"f": fused}, engine="numpy")
    assert not res.unmatched
    for m in ("self_attn.k_proj", "mlp.gate_proj", "mlp.up_proj"):
        name = f"model.layers.1.{m}"
        row = next(r for r in res.rows if r.name == name)
        assert row.rel_fro == pytest.approx(_direct(_f32(rw[name + ".weight"]), vw[name + ".weight"]), rel=1e-9)
    # and the other way round: the fused model as the reference, the split one as the variant
    res2 = sweep(fused, {"s": ref}, engine="numpy")
    assert counterpart("model.layers.1.self_attn.k_proj", fused) == ("model.layers.1.self_attn.qkv_proj",
                                                                      "its rows of the fused qkv_proj")
    assert counterpart("model.layers.0.mlp.gate_up_proj", ref)[0] == "model.layers.0.mlp.gate_proj"
    assert {r.name for r in res2.rows} >= {"model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"}
    row = next(r for r in res2.rows if r.name == "model.layers.0.mlp.gate_up_proj")
    assert row.variant_layer == "model.layers.0.mlp.gate_proj,model.layers.0.mlp.up_proj"
    gu = t["model.layers.0.mlp.gate_up_proj.weight"]
    g, u = _f32(rw["model.layers.0.mlp.gate_proj.weight"]), _f32(rw["model.layers.0.mlp.up_proj.weight"])
    expect = np.empty_like(gu)
    if interleaved:
        expect[0::2], expect[1::2] = g, u
    else:
        expect = np.concatenate([g, u])
    assert row.rel_fro == pytest.approx(_direct(gu, expect), rel=1e-9)


def _experts_and_switch(tmp_path, seed: int, block: str, E: int, shapes: dict, switch_of: dict, offset):
    """A reference with per-expert layers ``{block}.experts.{e}.{p}`` (bf16, shapes by p) and a
    variant stacking them as ``{block}.switch_mlp.{switch_of[p]}`` [E, N, K], plus ``offset``."""
    rng = np.random.default_rng(seed)
    per = {f"{block}.experts.{e}.{p}.weight": (rng.standard_normal(shp) * 0.02).astype(BF16)
           for e in range(E) for p, shp in shapes.items()}
    stacked = {f"{block}.switch_mlp.{switch_of[p]}.weight":
               np.stack([_f32(per[f"{block}.experts.{e}.{p}.weight"]) for e in range(E)]) + offset for p in shapes}
    return per, _model(tmp_path / "per", per), _model(tmp_path / "stk", stacked)


def test_experts_against_switch_mlp(tmp_path):
    E = 4
    shapes = {"gate_proj": (F, H), "up_proj": (F, H), "down_proj": (H, F)}
    per, ref, var = _experts_and_switch(tmp_path, 5, "model.layers.0.mlp", E, shapes, {p: p for p in shapes},
                                        np.float32(0.001) * np.arange(E, dtype=np.float32)[:, None, None])
    res = sweep(ref, {"s": var}, engine="numpy")
    assert len(res.rows) == 3 * E and not res.unmatched
    r2 = next(r for r in res.rows if r.name == "model.layers.0.mlp.experts.2.up_proj")
    assert r2.variant_layer == "model.layers.0.mlp.switch_mlp.up_proj"
    # which of the variant's stack it is: said (it was null, the stack's name alone)
    assert [r.expert for r in res.rows if r.proj == "down_proj"] == list(range(E)) and r2.expert == 2
    # a stack against a stack of the same name: one row for all its experts, of no one expert
    same = sweep(var, {"v": var}, engine="numpy")
    assert same.rows and all(r.expert is None for r in same.rows if "switch_mlp" in r.name)
    w = _f32(per["model.layers.0.mlp.experts.2.up_proj.weight"])
    assert r2.rel_fro == pytest.approx(_direct(w, w + np.float32(0.002)), rel=1e-6)
    # the other way round (a stacked reference, mlx-lm's bf16 for one): expert by expert too,
    # each row its expert's own figures (they were one row per stack, over all its experts)
    back = sweep(var, {"p": ref}, engine="numpy")
    assert [r.name for r in back.rows] == [f"model.layers.0.mlp.experts.{e}.{p}" for p in
                                           ("gate_proj", "up_proj", "down_proj") for e in range(E)]
    assert not back.unmatched
    for r in back.rows:
        e, p = int(r.name.split(".")[5]), r.name.rsplit(".", 1)[1]
        assert r.variant_layer == f"model.layers.0.mlp.experts.{e}.{p}"
        w = _f32(per[f"model.layers.0.mlp.experts.{e}.{p}.weight"])
        assert r.rel_fro == pytest.approx(_direct(w + np.float32(0.001 * e), w), rel=1e-6)
    d = layer_detail(var, {"p": ref, "s": var}, "model.layers.0.mlp.experts.2.up_proj", engine="numpy")
    assert d.metrics["p"].rel_fro == pytest.approx(
        next(r.rel_fro for r in back.rows if r.name.endswith("experts.2.up_proj")), rel=1e-12)
    assert d.metrics["s"].rel_fro == 0.0 and not d.left_out  # stacked as the reference: its expert's slice
    # the value histogram of the stacked variant's slice is the reference expert's, count for count
    np.testing.assert_array_equal(d.value_counts["s"], d.value_counts["reference"])
    assert d.value_counts["s"].sum() == F * H
    # --layers finds the experts of a stacked reference by the names the rows get, and by the
    # stack's own name (what `quantscope info` shows)
    part = sweep(var, {"p": ref}, engine="numpy", layers=r"experts\.1\.down_proj$")
    assert [r.name for r in part.rows] == ["model.layers.0.mlp.experts.1.down_proj"]
    part = sweep(var, {"p": ref}, engine="numpy", layers=r"switch_mlp\.down_proj")
    assert [r.name for r in part.rows] == [f"model.layers.0.mlp.experts.{e}.down_proj" for e in range(E)]
    # the reference's stack selected as a whole: the per-expert variant's experts, all of them
    whole = layer_detail(var, {"p": ref}, "model.layers.0.mlp.switch_mlp.up_proj", engine="numpy")
    stack = np.stack([_f32(per[f"model.layers.0.mlp.experts.{e}.up_proj.weight"]) for e in range(E)])
    assert whole.metrics["p"].rel_fro == pytest.approx(
        _direct(stack + np.float32(0.001) * np.arange(E, dtype=np.float32)[:, None, None], stack), rel=1e-6)
    # a variant lacking one expert: the others compared, that one listed without partner
    lacking = _model(tmp_path / "short", {k: v for k, v in per.items() if ".experts.2.up_proj." not in k})
    res3 = sweep(var, {"p": lacking}, engine="numpy")
    assert len(res3.rows) == 3 * E - 1
    assert [(u.layer, u.reason) for u in res3.unmatched] == [("model.layers.0.mlp.experts.2.up_proj",
                                                             "absent in the variant")]
    assert counterpart("model.layers.0.mlp.experts.3.down_proj", var) == (
        "model.layers.0.mlp.switch_mlp.down_proj", "expert 3 of the stacked experts")
    assert counterpart("model.layers.0.mlp.experts.4.down_proj", var) is None  # a stack of 4 has no expert 4
    assert counterpart("model.layers.0.mlp.switch_mlp.up_proj", ref)[0] == "model.layers.0.mlp.experts.0.up_proj"


def test_mixtral_experts_against_switch_mlp(tmp_path):
    # transformers' Mixtral names experts w1/w3/w2; mlx-lm stacks them as switch_mlp gate/up/down:
    # every expert row was "absent in the variant"
    E = 3
    per, ref, var = _experts_and_switch(tmp_path, 6, "model.layers.0.block_sparse_moe", E,
                                        {"w1": (F, H), "w3": (F, H), "w2": (H, F)},
                                        {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}, np.float32(0.001))
    res = sweep(ref, {"s": var}, engine="numpy")
    assert len(res.rows) == 3 * E and not res.unmatched
    r = next(r for r in res.rows if r.name == "model.layers.0.block_sparse_moe.experts.1.w3")
    assert r.variant_layer == "model.layers.0.block_sparse_moe.switch_mlp.up_proj"
    w = _f32(per["model.layers.0.block_sparse_moe.experts.1.w3.weight"])
    assert r.rel_fro == pytest.approx(_direct(w, w + np.float32(0.001)), rel=1e-6)
    back = sweep(var, {"p": ref}, engine="numpy")  # and the other way round: named as the stack names them
    assert len(back.rows) == 3 * E and not back.unmatched
    r = next(r for r in back.rows if r.name == "model.layers.0.block_sparse_moe.experts.1.up_proj")
    assert r.variant_layer == "model.layers.0.block_sparse_moe.experts.1.w3"
    w = _f32(per["model.layers.0.block_sparse_moe.experts.1.w3.weight"])
    assert r.rel_fro == pytest.approx(_direct(w + np.float32(0.001), w), rel=1e-6)
    assert counterpart("model.layers.0.block_sparse_moe.experts.1.w3", var)[0] == \
        "model.layers.0.block_sparse_moe.switch_mlp.up_proj"
    assert counterpart("model.layers.0.block_sparse_moe.switch_mlp.down_proj", ref)[0] == \
        "model.layers.0.block_sparse_moe.experts.0.w2"


def test_tied_embeddings_both_ways(ref_pair, tmp_path):
    _root, rw, ref, vw, var = ref_pair
    tied_rw = {k: v for k, v in rw.items() if k != "lm_head.weight"}
    tied = _model(tmp_path / "tied", tied_rw, {"tie_word_embeddings": True})
    res = sweep(tied, {"v": var}, engine="numpy")
    head = next(r for r in res.rows if r.name == "lm_head")
    assert head.variant_layer == "lm_head"
    assert head.rel_fro == pytest.approx(_direct(_f32(rw["model.embed_tokens.weight"]), vw["lm_head.weight"]),
                                         rel=1e-9)
    tied_var = _model(tmp_path / "tiedv", {k: v for k, v in vw.items() if k != "lm_head.weight"})
    res = sweep(ref, {"v": tied_var}, engine="numpy")
    head = next(r for r in res.rows if r.name == "lm_head")
    assert head.variant_layer == "model.embed_tokens"
    assert counterpart("lm_head", tied_var) == ("model.embed_tokens", "no lm_head: tied to the embeddings")


def test_an_untied_head_is_missing_not_the_embeddings(ref_pair, tmp_path):
    """A checkpoint without lm_head whose config says tie_word_embeddings: false has lost its
    head: the other side's head is not compared with its embeddings (rel_fro 1.4, "implausible
    error"), it is listed as absent, with the reason."""
    _root, rw, ref, vw, var = ref_pair
    no_head = {k: v for k, v in vw.items() if k != "lm_head.weight"}
    untied_var = _model(tmp_path / "untied", no_head, {"tie_word_embeddings": False})
    res = sweep(ref, {"v": untied_var}, engine="numpy")
    assert "lm_head" not in {r.name for r in res.rows}
    (u,) = [u for u in res.unmatched if u.layer == "lm_head"]
    assert u.reason.startswith("absent in the variant") and "tie_word_embeddings: false" in u.reason
    assert counterpart("lm_head", untied_var) is None
    # the reference's side: an untied reference without a head has nothing to compare a variant's with
    untied_ref = _model(tmp_path / "untied_ref", {k: v for k, v in rw.items() if k != "lm_head.weight"},
                        {"tie_word_embeddings": False})
    res = sweep(untied_ref, {"v": var}, engine="numpy")
    assert "lm_head" not in {r.name for r in res.rows}  # (it compared the variant's head with embed_tokens)


def test_another_model_of_the_same_shapes_is_said_to_be_one(ref_pair, tmp_path):
    """Llama-3-8B against Mistral-7B: every layer's shape matches. Its norms differ, so it was
    taken for smoothed (a "power 0.72" warning) and each layer listed as broken scales."""
    _root, _rw, ref, vw, var = ref_pair
    other = _model(tmp_path / "other", _ref_weights(seed=123))
    res = sweep(ref, {"o": other}, engine="numpy")
    assert "a quantization of a different model?" in res.data_warnings["o"]
    assert "o" not in res.smoothing_checks  # (the norms' ratio between two models is no smoothing)
    assert "different model" in res.warnings()["o"][1]
    # a decode of next to nothing, or of far too much, is a broken file, not another model
    for k, f in (("tiny", 1e-9), ("huge", 50.0)):
        scaled = _model(tmp_path / k, {n: (_f32(v) * f if v.ndim == 2 else v) for n, v in vw.items()})
        res = sweep(ref, {k: scaled}, engine="numpy")
        assert res.implausible() and "different model" not in res.data_warnings.get(k, "")
        assert "the reference's times a constant" in res.data_warnings[k]  # (what it is, said)
    res = sweep(ref, {"v": var}, engine="numpy")  # and the model itself is not another
    assert not res.data_warnings and not res.implausible()
    # most layers decoding to zeros (their cosine NaN): a broken file, each layer listed as such
    zeroed = dict(vw)
    names2d = [n for n, v in vw.items() if v.ndim == 2]
    for n in names2d[:len(names2d) * 2 // 3]:
        zeroed[n] = np.zeros_like(_f32(vw[n]))
    res = sweep(ref, {"z": _model(tmp_path / "z", zeroed)}, engine="numpy")
    assert "z" not in res.data_warnings and len(res.implausible()) >= len(names2d) // 2
    # another model whose norms look smoothed: its quantization-only pass is not made, and the
    # progress still ends at 1 (it stopped at 0.5)
    seen = []
    res = sweep(ref, {"o": other}, engine="numpy", progress=seen.append)
    assert float(seen[-1]) == pytest.approx(1.0) and seen[-1].layers_done == seen[-1].layers_total


def test_layers_scaled_by_a_constant_are_said_to_be(ref_pair, tmp_path):
    # mlx-lm's Falcon-H1 sanitize folds the config's muP multipliers into embed_tokens, lm_head,
    # q/k/o, gate/down: compared with the transformers weights, errors of 4.7 (× 5.66) or 0.5
    # (× 0.5) that no quantization made. Said, with what is left once the constant is divided out
    _root, _rw, ref, vw, var = ref_pair
    q = "model.layers.1.self_attn.q_proj.weight"
    folded = dict(vw)
    folded["model.embed_tokens.weight"] = _f32(vw["model.embed_tokens.weight"]) * 5.66
    folded[q] = _f32(vw[q]) * 0.5
    res = sweep(ref, {"f": _model(tmp_path / "f", folded)}, engine="numpy")
    why = res.data_warnings["f"]
    import re
    m = re.match(r"2 layer\(s\) are the reference's times a constant \(first: model\.embed_tokens × ([0-9.]+): "
                 r"rel_fro ([0-9.]+), ([0-9.]+) once divided by it\)", why)
    assert m, why
    plain = {r.name: r for r in sweep(ref, {"v": var}, engine="numpy").rows}["model.embed_tokens"]
    c, rel, left = map(float, m.groups())
    assert c == pytest.approx(5.66, rel=0.01) and rel == pytest.approx(4.66, rel=0.02)
    assert left == pytest.approx(plain.rel_fro, rel=0.05)  # (the noise's own error, about)
    # scaled down: rel_fro and cosine leave two roots for ‖Ŵ‖/‖W‖ (× 0.5 was said to be × 1.5)
    half = dict(vw)
    half[q] = _f32(vw[q]) * 0.5
    why = sweep(ref, {"h": _model(tmp_path / "h", half)}, engine="numpy").data_warnings["h"]
    c = float(re.match(r"1 layer\(s\) are the reference's times a constant \(first: \S+ × ([0-9.]+)", why).group(1))
    assert c == pytest.approx(0.5, rel=0.02), why
    assert "times a constant" in res.warnings()["f"][1]


def test_gemmas_norms_multiply_by_one_plus_w(tmp_path):
    # Gemma's RMSNorm multiplies by 1 + w: AutoAWQ folds s in as (1 + w) / s − 1, and s is the
    # ratio of the multipliers, not of the stored weights (w / w' gave every consumer an error)
    rw = _ref_weights(seed=4)
    for k in [k for k in rw if k.endswith("layernorm.weight")]:
        rw[k] = (_f32(rw[k]) - 1).astype(BF16)  # (Gemma's weights sit around 0)
    cfg = {"model_type": "gemma2"}
    ref = _model(tmp_path / "ref", rw, cfg)
    s = np.exp(np.random.default_rng(5).normal(0, 0.3, H)).astype(np.float32)
    vw = _noisy(rw)
    for i in range(2):
        p = f"model.layers.{i}"
        for norm, cons in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                           ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))):
            vw[f"{p}.{norm}.weight"] = ((1 + _f32(rw[f"{p}.{norm}.weight"])) / s - 1).astype(np.float32)
            for c in cons:
                vw[f"{p}.{c}.weight"] = vw[f"{p}.{c}.weight"] * s[None, :]
    rows = {r.name: r for r in sweep(ref, {"awq": _model(tmp_path / "awq", vw, cfg)}, engine="numpy").rows}
    plain = {r.name: r for r in sweep(ref, {"v": _model(tmp_path / "v", _noisy(rw), cfg)}, engine="numpy").rows}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"):
        assert rows[name].smoothing.startswith("norm:")
        assert rows[name].rel_fro == pytest.approx(plain[name].rel_fro, rel=1e-3)  # (the noise alone)
        assert rows[name].rel_fro_raw > 2 * rows[name].rel_fro
    # a Llama's norms are the multipliers themselves: one + 1 off is a fold of s = w / (1 + w)
    lw = _noisy(_ref_weights(seed=4))
    for k in [k for k in lw if k.endswith("layernorm.weight")]:
        lw[k] = lw[k] + 1
    res = sweep(_model(tmp_path / "lref", _ref_weights(seed=4)), {"p": _model(tmp_path / "p", lw)}, engine="numpy")
    assert any(r.smoothing != "none" for r in res.rows)  # (not taken for the same norm: it is not)


def _mlx_quant(w_bf16, bits=4, group=64):
    import mlx.core as mx
    a = mx.array(np.ascontiguousarray(w_bf16).view(np.uint16)).view(mx.bfloat16)
    wq, s, b = mx.quantize(a, group_size=group, bits=bits)
    mx.eval(wq, s, b)
    return np.array(wq), np.array(s.view(mx.uint16)).view(BF16), np.array(b.view(mx.uint16)).view(BF16)


@pytest.fixture(scope="module")
def mlx_variant(ref_pair):
    root, rw, _ref, _vw, _var = ref_pair
    t = {}
    for k, v in rw.items():
        if v.ndim == 2 and "embed" not in k:  # embeddings stay dense: "skipped by the variant"
            wq, s, b = _mlx_quant(v)
            m = k[:-len(".weight")]
            t[f"{m}.weight"], t[f"{m}.scales"], t[f"{m}.biases"] = wq, s, b
        else:
            t[k] = v
    # a quantized layer the reference does not have, and one whose shape differs
    wq, s, b = _mlx_quant(np.ones((64, H), BF16))
    t["model.layers.0.mlp.extra_proj.weight"], t["model.layers.0.mlp.extra_proj.scales"], \
        t["model.layers.0.mlp.extra_proj.biases"] = wq, s, b
    wq, s, b = _mlx_quant(np.ones((F + 64, H), BF16))
    t["model.layers.1.mlp.gate_proj.weight"], t["model.layers.1.mlp.gate_proj.scales"], \
        t["model.layers.1.mlp.gate_proj.biases"] = wq, s, b
    return _model(root / "mlx", t, {"quantization": {"group_size": 64, "bits": 4}})


def test_unmatched_reasons(ref_pair, mlx_variant):
    _root, rw, ref, _vw, _var = ref_pair
    res = sweep(ref, {"m": mlx_variant}, engine="numpy")
    why = {u.layer: u.reason for u in res.unmatched}
    assert "skipped by the variant" in why["model.embed_tokens"]
    assert "absent in the reference" in why["model.layers.0.mlp.extra_proj"]
    assert "shape mismatch" in why["model.layers.1.mlp.gate_proj"]
    assert not any(r.name == "model.layers.1.mlp.gate_proj" for r in res.rows)
    q = next(r for r in res.rows if r.name == "model.layers.0.self_attn.q_proj")
    assert (q.scheme, q.bits, q.group_size) == ("mlx-affine", 4, 64)
    assert 0.02 < q.rel_fro < 0.2 and q.smoothing == "none" and q.rel_fro_raw == q.rel_fro
    w = _f32(rw["model.layers.0.self_attn.q_proj.weight"])
    wh = NumpyEngine().dequantize(mlx_variant, mlx_variant.layers["model.layers.0.self_attn.q_proj"])
    assert q.rel_fro == pytest.approx(_direct(w, wh), rel=1e-9)
    assert q.bits_per_weight == pytest.approx(4 + 2 * 16 / 64)


def test_different_model_is_a_clear_error(ref_pair, tmp_path):
    _root, _rw, ref, _vw, _var = ref_pair
    other = _model(tmp_path / "other", {"transformer.h.0.attn.c_attn.weight": np.ones((8, 8), np.float32)})
    with pytest.raises(CompareError, match="other"):
        sweep(ref, {"o": other}, engine="numpy")


# -- undoing smoothing ------------------------------------------------------------------------------

def test_an_fp16_copy_with_a_subnormal_norm_weight_is_not_smoothed(tmp_path):
    """1e-7 is an fp16 subnormal, stored 19% off: that is the dtype's step, not smoothing (the
    whole norm was taken as folded and q/k/v "undone" to 100 times their error)."""
    rw = _ref_weights(seed=9)
    rw["model.layers.0.input_layernorm.weight"][5] = 1e-7
    ref = _model(tmp_path / "ref", rw)
    f16 = _model(tmp_path / "f16", {k: np.asarray(_f32(v), np.float16) for k, v in rw.items()})
    al = align(ref, f16)
    assert not al.shows_folding and all(t.smoothing == "none" for t in al.targets.values())
    res = sweep(ref, {"f16": f16}, engine="numpy")
    q = next(r for r in res.rows if r.name == "model.layers.0.self_attn.q_proj")
    assert q.rel_fro == q.rel_fro_raw < 1e-3
    # a real fold on the same norm is still found
    smoothed = dict(rw)
    smoothed["model.layers.0.input_layernorm.weight"] = rw["model.layers.0.input_layernorm.weight"] / 1.5
    assert align(ref, _model(tmp_path / "s", smoothed)).shows_folding


def test_undo_smoothing_norm_and_preceding_linear(ref_pair, tmp_path):
    _root, rw, ref, _vw, _var = ref_pair
    rng = np.random.default_rng(9)
    t = {k: _f32(v) for k, v in rw.items()}
    noise = {k: rng.standard_normal(v.shape).astype(np.float32) * 0.002 for k, v in t.items() if v.ndim == 2}
    p = "model.layers.0"
    s_in = np.exp(rng.uniform(-1, 1, H)).astype(np.float32)    # folded into input_layernorm
    s_o = np.exp(rng.uniform(-0.7, 0.7, H)).astype(np.float32)  # folded into v_proj rows
    out = {k: (v + noise[k]) if k in noise else v for k, v in t.items()}
    out[f"{p}.input_layernorm.weight"] = (t[f"{p}.input_layernorm.weight"] / s_in).astype(np.float16)
    for m in ("q_proj", "k_proj"):
        out[f"{p}.self_attn.{m}.weight"] = (t[f"{p}.self_attn.{m}.weight"] + noise[f"{p}.self_attn.{m}.weight"]) * s_in
    out[f"{p}.self_attn.v_proj.weight"] = ((t[f"{p}.self_attn.v_proj.weight"] / s_o[:, None])
                                           + noise[f"{p}.self_attn.v_proj.weight"]) * s_in
    out[f"{p}.self_attn.o_proj.weight"] = (t[f"{p}.self_attn.o_proj.weight"] + noise[f"{p}.self_attn.o_proj.weight"]) * s_o
    sm = _model(tmp_path / "smooth", out)
    res = {r.name: r for r in sweep(ref, {"s": sm}, engine="numpy").rows}
    for m in ("q_proj", "k_proj"):
        r = res[f"{p}.self_attn.{m}"]
        true = _direct(t[f"{p}.self_attn.{m}.weight"], t[f"{p}.self_attn.{m}.weight"] + noise[f"{p}.self_attn.{m}.weight"])
        assert r.smoothing == f"norm:{p}.input_layernorm"
        assert r.rel_fro == pytest.approx(true, rel=2e-3)  # s recovered from an fp16 norm
        assert r.rel_fro_raw > 3 * r.rel_fro
    o = res[f"{p}.self_attn.o_proj"]
    true_o = _direct(t[f"{p}.self_attn.o_proj.weight"], t[f"{p}.self_attn.o_proj.weight"] + noise[f"{p}.self_attn.o_proj.weight"])
    assert o.smoothing == f"lstsq:{p}.self_attn.v_proj"
    assert o.rel_fro == pytest.approx(true_o, rel=0.05) and o.rel_fro_raw > 3 * o.rel_fro
    assert "rows:" in res[f"{p}.self_attn.v_proj"].smoothing
    # layer 1 was not touched: nothing undone there
    assert res["model.layers.1.self_attn.o_proj"].smoothing == "none"


def test_undo_smoothing_folded_into_a_fused_gate_up_projs_up_half(ref_pair, tmp_path):
    """Phi-3 stores gate_up_proj fused; AutoAWQ folds down_proj's scales into its last rows (the
    up half). Both sides fused: down_proj was left "none" at several times its error."""
    _root, rw, _ref, _vw, _var = ref_pair
    rng = np.random.default_rng(11)
    t = {k: _f32(v) for k, v in rw.items()}
    for i in range(2):
        m = f"model.layers.{i}.mlp."
        t[m + "gate_up_proj.weight"] = np.concatenate([t.pop(m + "gate_proj.weight"), t.pop(m + "up_proj.weight")])
    noise = {k: rng.standard_normal(v.shape).astype(np.float32) * 0.002 for k, v in t.items() if v.ndim == 2}
    out = {k: (v + noise[k]) if k in noise else v for k, v in t.items()}
    p = "model.layers.0"
    s_n = np.exp(rng.uniform(-0.7, 0.7, H)).astype(np.float32)  # into post_attention_layernorm
    s_d = np.exp(rng.uniform(-0.7, 0.7, F)).astype(np.float32)  # into gate_up_proj's up rows
    gu = t[f"{p}.mlp.gate_up_proj.weight"].copy()
    gu[F:] /= s_d[:, None]
    out[f"{p}.post_attention_layernorm.weight"] = t[f"{p}.post_attention_layernorm.weight"] / s_n
    out[f"{p}.mlp.gate_up_proj.weight"] = (gu + noise[f"{p}.mlp.gate_up_proj.weight"]) * s_n
    out[f"{p}.mlp.down_proj.weight"] = (t[f"{p}.mlp.down_proj.weight"] + noise[f"{p}.mlp.down_proj.weight"]) * s_d
    fused_ref = _model(tmp_path / "ref", t, {"model_type": "phi3"})
    sm = _model(tmp_path / "smooth", out, {"model_type": "phi3"})
    res = {r.name: r for r in sweep(fused_ref, {"s": sm}, engine="numpy").rows}

    def true(name):
        return _direct(t[name + ".weight"], t[name + ".weight"] + noise[name + ".weight"])

    down, gate_up = res[f"{p}.mlp.down_proj"], res[f"{p}.mlp.gate_up_proj"]
    assert down.smoothing == f"lstsq:{p}.mlp.gate_up_proj"
    assert down.rel_fro == pytest.approx(true(f"{p}.mlp.down_proj"), rel=0.05) and down.rel_fro_raw > 3 * down.rel_fro
    assert gate_up.smoothing == f"norm:{p}.post_attention_layernorm+rows:{p}.mlp.down_proj"
    # (its up rows were quantized divided by s_d: undone, their error is the noise times s_d)
    w_gu = t[f"{p}.mlp.gate_up_proj.weight"]
    d_gu = noise[f"{p}.mlp.gate_up_proj.weight"].astype(np.float64)
    d_gu[F:] *= s_d[:, None]
    assert gate_up.rel_fro == pytest.approx(np.linalg.norm(d_gu) / np.linalg.norm(w_gu.astype(np.float64)), rel=0.05)
    assert res["model.layers.1.mlp.down_proj"].smoothing == "none"  # nothing folded in layer 1
    # split on the reference's side (Llama), fused in the variant: the up_proj target takes the fit
    split = _model(tmp_path / "split", {k: v for k, v in rw.items()})
    res = {r.name: r for r in sweep(split, {"s": sm}, engine="numpy").rows}
    assert res[f"{p}.mlp.down_proj"].smoothing.startswith("lstsq:") and res[f"{p}.mlp.down_proj"].rel_fro == \
        pytest.approx(true(f"{p}.mlp.down_proj"), rel=0.05)


# -- detail views -----------------------------------------------------------------------------------

def _gptq_variant(folder, rw, bits=4, group=64):
    t = {}
    for k, v in rw.items():
        if v.ndim != 2 or "embed" in k or "lm_head" in k:
            t[k] = v
            continue
        w = _f32(v)
        n, kk = w.shape
        g = w.reshape(n, kk // group, group)
        mn, mx = g.min(-1), g.max(-1)
        scale = ((mx - mn) / (2 ** bits - 1)).astype(np.float16).astype(np.float32)
        zero = np.clip(np.rint(-mn / scale), 1, 2 ** bits - 1)
        q = np.clip(np.rint(g / scale[..., None]) + zero[..., None], 0, 2 ** bits - 1).astype(np.uint8).reshape(n, kk)
        m = k[:-len(".weight")]
        t[f"{m}.qweight"] = pack_bits(q, bits).T.copy().view(np.int32)
        t[f"{m}.qzeros"] = pack_bits((zero.T - 1).astype(np.uint8), bits).view(np.int32)
        t[f"{m}.scales"] = scale.T.astype(np.float16).copy()
        t[f"{m}.g_idx"] = (np.arange(kk) // group).astype(np.int32)
    return _model(folder, t, {"quantization_config": {"quant_method": "gptq", "bits": bits, "group_size": group,
                                                      "desc_act": False, "sym": False, "checkpoint_format": "gptq"}})


def test_layer_detail(ref_pair, mlx_variant, tmp_path):
    _root, rw, ref, _vw, var = ref_pair
    gq = _gptq_variant(tmp_path / "gptq", rw)
    name = "model.layers.0.mlp.down_proj"
    d = layer_detail(ref, {"m": mlx_variant, "g": gq, "dense": var}, name, bins=64, engine="numpy")
    n = H * F
    assert set(d.value_counts) == {"reference", "m", "g", "dense"}
    for c in d.value_counts.values():
        assert c.shape == (len(d.value_edges) - 1,) and c.sum() == n
    for c in d.error_counts.values():
        assert c.shape == (len(d.error_edges) - 1,) and c.sum() == n
    # 64 bins, or fewer where that many made a comb of values on the bf16 grid (bins of
    # thousands beside bins of 0-2): here half as many
    assert len(d.value_edges) == 33 and len(d.error_edges) == 65
    w = _f32(rw[name + ".weight"])
    wh = NumpyEngine().dequantize(gq, gq.layers[name])
    assert np.array_equal(d.error_counts["g"], np.histogram(wh.astype(np.float64) - w, d.error_edges)[0])
    for label, model in (("m", mlx_variant), ("g", gq)):
        codes = stored_codes(model, model.layers[name])
        assert np.array_equal(d.code_counts[label], np.bincount(codes.reshape(-1), minlength=16))
    assert "dense" not in d.code_counts
    assert d.group_error["m"].shape == (H, F // 64) and d.group_error["g"].shape == (H, F // 64)
    assert d.grouped_by_index == set()  # GPTQ's g_idx in column order: runs of group_size
    ge = d.group_error["g"]
    blk = (slice(3, 4), slice(64, 128))
    assert ge[3, 1] == pytest.approx(_direct(w[blk], wh[blk]), rel=1e-9)
    assert d.scales["g"].shape == (F // 64, H) and d.zeros["g"].shape == (F // 64, H)
    assert d.metrics["g"].rel_fro == pytest.approx(_direct(w, wh), rel=1e-9)
    # log10 |error| on shared edges: every nonzero error counted once, the exact zeros apart
    err = np.abs(wh.astype(np.float64) - w)
    assert np.array_equal(d.log_error_counts["g"], np.histogram(np.log10(err[err > 0]), d.log_error_edges)[0])
    assert d.zero_errors.get("g", 0) == int(np.count_nonzero(err == 0)) > 0  # 4-bit codes hit some weights
    assert d.log_error_counts["dense"].sum() + d.zero_errors.get("dense", 0) == n
    assert set(d.log_error_counts) == {"m", "g", "dense"}



def test_layer_detail_says_exact_copies_instead_of_drawing_them(ref_pair, tmp_path):
    # a variant that stores the layer as the reference does (lm_head left unquantized): every
    # error 0 — one spike that set the count axis; it is named and left out of both error views
    _, rw, ref, _, _ = ref_pair
    gq = _gptq_variant(tmp_path / "gptq", rw)
    name = "model.layers.0.mlp.down_proj"
    d = layer_detail(ref, {"g": gq, "copy": ref}, name, bins=64, engine="numpy")
    assert d.exact_copies == ["copy"]
    assert set(d.error_counts) == {"g"} and set(d.log_error_counts) == {"g"} and "copy" not in d.zero_errors
    assert d.error_counts["g"].sum() == H * F and "copy" in d.value_counts and d.metrics["copy"].rel_fro == 0
    alone = layer_detail(ref, {"copy": ref}, name, bins=64, engine="numpy")
    assert alone.exact_copies == ["copy"] and alone.error_edges is None and not alone.error_counts


# -- sweep: progress, cancel, resume ------------------------------------------------------------------

class CountingEngine:
    name = "numpy"

    def __init__(self, cancel_after=None, event=None):
        self.inner = NumpyEngine()
        self.calls = []
        self.cancel_after, self.event = cancel_after, event

    def dequantize(self, model, layer):
        self.calls.append(layer.path)
        if self.cancel_after is not None and len(self.calls) >= self.cancel_after:
            self.event.set()
        return self.inner.dequantize(model, layer)


def test_cancel_and_resume(ref_pair, mlx_variant, tmp_path):
    _root, rw, ref, _vw, _var = ref_pair
    gq = _gptq_variant(tmp_path / "gptq", rw)
    variants = {"m": mlx_variant, "g": gq}
    full = sweep(ref, variants, engine=CountingEngine())
    n_targets = len(full.rows)
    ev = threading.Event()
    eng = CountingEngine(cancel_after=5, event=ev)
    cache: dict = {}
    seen = []
    with pytest.raises(Cancelled):
        sweep(ref, variants, engine=eng, cancel=ev, cache=cache, progress=seen.append)
    assert len(eng.calls) <= 6  # stopped within one layer of the request
    assert 0 < len(cache) < n_targets
    assert seen == sorted(seen)
    finished = len(cache)
    eng2 = CountingEngine()
    res = sweep(ref, variants, engine=eng2, cache=cache, cache_dir=tmp_path / "c", progress=seen.append)
    assert len(eng2.calls) == n_targets - finished  # finished layers are not decoded again
    assert [(r.name, r.variant, r.rel_fro) for r in res.rows] == [(r.name, r.variant, r.rel_fro) for r in full.rows]
    assert seen[-1] == pytest.approx(1.0)
    # persisted: a new sweep from the cache folder decodes nothing
    eng3 = CountingEngine()
    again = sweep(ref, variants, engine=eng3, cache_dir=tmp_path / "c")
    assert eng3.calls == [] and len(again.rows) == n_targets


def test_cache_is_not_reused_once_the_config_changes(ref_pair, tmp_path):
    """The configs are part of the key: checkpoint_format gptq -> gptq_v2 changes every zero
    point, and the figures cached from the first reading were given back for the second."""
    _root, rw, ref, _vw, _var = ref_pair
    gq = _gptq_variant(tmp_path / "gptq", rw)
    cache: dict = {}
    first = {r.name: r.rel_fro for r in sweep(ref, {"g": gq}, engine="numpy", cache=cache).rows}
    cfg_path = tmp_path / "gptq" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["checkpoint_format"] = "gptq_v2"
    cfg_path.write_text(json.dumps(cfg))
    edited = analyze(open_checkpoint(tmp_path / "gptq"))
    again = {r.name: r.rel_fro for r in sweep(ref, {"g": edited}, engine="numpy", cache=cache).rows}
    fresh = {r.name: r.rel_fro for r in sweep(ref, {"g": edited}, engine="numpy").rows}
    assert again == fresh and all(again[n] != first[n] for n in first)
    # the same files and configs opened again: the cache serves it
    reopened = analyze(open_checkpoint(tmp_path / "gptq"))
    eng = CountingEngine()
    sweep(ref, {"g": reopened}, engine=eng, cache=cache)
    assert eng.calls == []


def test_progress_counts_layers_and_bytes(ref_pair, mlx_variant, tmp_path):
    _root, rw, ref, _vw, _var = ref_pair
    gq = _gptq_variant(tmp_path / "gptq", rw)
    variants = {"m": mlx_variant, "g": gq}
    seen = []
    res = sweep(ref, variants, engine="numpy", progress=seen.append)
    names = sorted({r.name for r in res.rows})
    # the bytes each target reads, from the files' own tensor sizes: the reference's weight and
    # every variant's weight components (codes, scales, zeros), not their biases
    want = sum(ref.layers[n].stored_bytes for n in names)
    for row in res.rows:
        m = variants[row.variant]
        want += sum(m.ckpt.tensor(t.name).nbytes for c, t in m.layers[row.variant_layer].tensors.items()
                    if c != "bias")
    last = seen[-1]
    assert (last.layers_done, last.layers_total) == (len(names), len(names)) and float(last) == pytest.approx(1.0)
    assert last.bytes_done == last.bytes_total == want
    layers = [p.layers_done for p in seen]
    assert layers == sorted(layers) and layers[0] <= 1 and {p.layers_total for p in seen} == {len(names)}
    assert [float(p) for p in seen] == sorted(float(p) for p in seen)
    # a cached run says its layers done too
    cache: dict = {}
    sweep(ref, variants, engine="numpy", cache=cache)
    again = []
    sweep(ref, variants, engine="numpy", cache=cache, progress=again.append)
    assert (again[-1].layers_done, again[-1].bytes_done) == (len(names), want)


def test_sweep_progress_pickles_copies_and_prints_as_a_number():
    import copy
    import pickle

    from quantscope.backend.compare import SweepProgress
    p = SweepProgress(0.5, 3, 7, 1_500_000, 4_200_000_000)
    for q in (pickle.loads(pickle.dumps(p)), copy.copy(p), copy.deepcopy(p)):
        assert q == 0.5 and (q.layers_done, q.layers_total, q.bytes_done, q.bytes_total) == (3, 7, 1_500_000,
                                                                                            4_200_000_000)
    assert str(p) == "0.5" and f"{p:.0%}" == "50%"


def test_progress_bar_says_layers_and_bytes():
    import io

    from quantscope.app.progress_bar import ProgressBar
    from quantscope.backend.compare import SweepProgress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    bar = ProgressBar("comparing", out)
    bar(SweepProgress(0.5, 3, 7, 1_500_000, 4_200_000_000))
    assert out.getvalue().endswith("]  50%  3/7 layers, 1.5 MB of 4.2 GB")
    bar(0.75)  # a plain fraction: the bar alone, the longer line's end cleared
    line = out.getvalue().split("\r")[-1]
    assert line.startswith("comparing [") and "75%" in line and "layers" not in line
    bar.close()
    assert out.getvalue().endswith("\r")
    # the last count is drawn however soon after the one before (throttled, "13/14" stood last)
    out = Tty()
    bar = ProgressBar("comparing", out)
    bar(SweepProgress(0.999, 13, 14, 1, 2))
    bar(SweepProgress(0.9999, 14, 14, 2, 2))
    assert "14/14 layers" in out.getvalue().split("\r")[-1]
    # a narrow terminal: the bytes left out, then the layers (a wrapped line adds a line per redraw)
    import shutil
    for cols, want in ((70, "]  50%  3/7 layers"), (50, "]  50%")):
        out = Tty()
        bar = ProgressBar("comparing", out)
        orig = shutil.get_terminal_size
        shutil.get_terminal_size = lambda fallback=None, c=cols: __import__("os").terminal_size((c, 24))
        try:
            bar(SweepProgress(0.5, 3, 7, 1_500_000, 4_200_000_000))
        finally:
            shutil.get_terminal_size = orig
        assert out.getvalue().rstrip().endswith(want) and len(out.getvalue()) <= cols


def test_each_variant_layer_decoded_once(ref_pair, tmp_path):
    _root, rw, ref, _vw, _var = ref_pair
    gq = _gptq_variant(tmp_path / "gptq", rw)
    eng = CountingEngine()
    res = sweep(ref, {"g": gq}, engine=eng)
    assert sorted(eng.calls) == sorted(r.variant_layer for r in res.rows)


def test_row_blocks_give_the_same_metrics(ref_pair, mlx_variant, tmp_path, monkeypatch):
    import quantscope.backend.compare as cmp
    _root, rw, ref, _vw, _var = ref_pair
    gq = _gptq_variant(tmp_path / "gptq", rw)
    whole = sweep(ref, {"m": mlx_variant, "g": gq}, engine="numpy")
    monkeypatch.setattr(cmp, "BLOCK_ELEMENTS", 1000)
    monkeypatch.setattr(cmp, "_ROW_BLOCK_ELEMENTS", 64 * 128)
    blocked = sweep(ref, {"m": mlx_variant, "g": gq}, engine="numpy")
    for a, b in zip(whole.rows, blocked.rows):
        assert (a.name, a.variant) == (b.name, b.variant)
        assert b.rel_fro == pytest.approx(a.rel_fro, rel=1e-12) and b.p99 == a.p99 and b.p50 == a.p50


# -- command line ---------------------------------------------------------------------------------------

def test_cli_json_csv_and_error(ref_pair, mlx_variant, tmp_path, capsys):
    from quantscope.app.cli import main
    root, _rw, _ref, _vw, _var = ref_pair
    js, cs = tmp_path / "o.json", tmp_path / "o.csv"
    rc = main(["compare", "--reference", str(root / "ref"), str(root / "mlx"), "--json", str(js), "--csv", str(cs),
               "--engine", "numpy"])
    out = capsys.readouterr()
    assert rc == 0 and "rel_fro" in out.out and "model.layers.0.self_attn.q_proj" in out.out
    assert "comparing" not in out.err  # no progress bar when stderr is not a terminal
    data = json.loads(js.read_text())
    assert data["layers"] and all(set(LAYER_KEYS) <= set(r) for r in data["layers"])
    assert data["layers"][0]["variant"] == str(root / "mlx")
    assert any(u["reason"] for u in data["unmatched"])
    # what decoded the layers is said (the figures are the same on any engine; the time is not)
    from quantscope.backend.formats import fast
    assert data["engine"] == {"name": "numpy", "device": "cpu (numpy)", "compiled": fast.AVAILABLE}
    rows = list(csv.DictReader(cs.read_text().splitlines()))
    assert set(LAYER_KEYS) <= set(rows[0]) and len(rows) == len(data["layers"]) + len(data["unmatched"])
    other = tmp_path / "other"
    _model(other, {"transformer.h.0.attn.c_attn.weight": np.ones((8, 8), np.float32)})
    rc = main(["compare", "--reference", str(root / "ref"), str(other)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and str(other) in err[0] and "different model" in err[0]
    # beside a variant that compares, the other is still compared, and the failure said (exit 2)
    rc = main(["compare", "--reference", str(root / "ref"), str(root / "mlx"), str(other), "--json", str(js),
               "--engine", "numpy"])
    out = capsys.readouterr()
    assert rc == 2 and "model.layers.0.self_attn.q_proj" in out.out and "other" not in out.out.splitlines()[0]
    err = out.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"quantscope: error: {other}: no layer can be compared")
    data = json.loads(js.read_text())
    assert {r["variant"] for r in data["layers"]} == {str(root / "mlx")}
    assert [f["variant"] for f in data["failed"]] == [str(other)] and "different model" in data["failed"][0]["reason"]
    assert any(u["variant"] == str(other) for u in data["unmatched"])  # its layers without partner, with why
    # the CSV too has a line for it (it had none), and the table leaves its unmatched to the error
    rc = main(["compare", "--reference", str(root / "ref"), str(root / "mlx"), str(other), "--csv", str(cs),
               "--engine", "numpy"])
    out = capsys.readouterr()
    assert rc == 2 and any(r["variant"] == str(other) and r["reason"] for r in csv.DictReader(cs.read_text().splitlines()))
    assert f"{other.name}:" not in out.out


def test_table_cells_keep_their_width_for_large_errors():
    from quantscope.app.compare_cli import _fmt
    assert [_fmt(v, "8.5f") for v in (0.1234567, 672.21883, 12345.6, 1.5e20, -3.25)] == \
        [" 0.12346", "672.2188", "12345.60", " 1.5e+20", "-3.25000"]
    assert all(len(_fmt(v, "8.2f")) == 8 for v in (-3.0e9, 1e12, 0.5, float("inf"), float("nan")))


def test_table_names_keep_variants_with_the_same_folder_name_apart():
    from quantscope.app.compare_cli import short_names
    assert short_names(["/x/a/model", "/y/b/model", "mlx", "./q4/"]) == {
        "/x/a/model": "a/model", "/y/b/model": "b/model", "mlx": "mlx", "./q4/": "q4"}
    # a file is named with its folder: "model.safetensors" alone names no model
    assert short_names(["/m/gptq-4bit/model.safetensors", "/m/awq/model.safetensors.index.json"]) == {
        "/m/gptq-4bit/model.safetensors": "gptq-4bit/model.safetensors",
        "/m/awq/model.safetensors.index.json": "awq/model.safetensors.index.json"}


def test_table_names_a_variant_given_from_inside_its_folder_by_the_folder(tmp_path, monkeypatch):
    from quantscope.app.compare_cli import short_names
    (tmp_path / "gptq-4bit").mkdir()
    monkeypatch.chdir(tmp_path / "gptq-4bit")
    assert short_names([".", "../other"]) == {".": "gptq-4bit", "../other": "other"}  # it was "."
    assert short_names(["model.safetensors"]) == {"model.safetensors": "gptq-4bit/model.safetensors"}


def test_nan_in_a_variant_is_reported_not_hidden(ref_pair, mlx_variant, tmp_path, capsys):
    # one NaN scale: that layer's error is NaN (sqnr NaN too, as numpy's -20·log10 gives, not
    # -inf or inf), the others stay exact, and the table says where and what to run
    from quantscope.app.cli import main
    from safetensors.numpy import load_file
    root, _rw, ref, _vw, _var = ref_pair
    t = load_file(str(root / "mlx" / "model.safetensors"))
    s = t["model.layers.1.self_attn.v_proj.scales"].view(BF16).copy()
    s[3, 0] = np.nan
    t["model.layers.1.self_attn.v_proj.scales"] = s
    t = {k: (v.view(BF16) if k.endswith((".scales", ".biases")) else v) for k, v in t.items()}
    bad = _model(tmp_path / "nan", t, {"quantization": {"group_size": 64, "bits": 4}})
    rows = {r.name: r for r in sweep(ref, {"m": bad}, engine="numpy").rows}
    good = {r.name: r for r in sweep(ref, {"m": mlx_variant}, engine="numpy").rows}
    r = rows["model.layers.1.self_attn.v_proj"]
    assert math.isnan(r.rel_fro) and math.isnan(r.sqnr_db)
    assert math.isnan(r.p50) and math.isnan(r.p99)  # as np.percentile gives them over a NaN
    assert rows["model.layers.1.self_attn.q_proj"].rel_fro == good["model.layers.1.self_attn.q_proj"].rel_fro
    # JSON has no NaN: null, and the row says which it was (an exact copy's sqnr is null too: "inf")
    js = {d["name"]: d for d in sweep(ref, {"m": bad}, engine="numpy").to_json()["layers"]}
    v = js["model.layers.1.self_attn.v_proj"]
    assert v["rel_fro"] is None and v["nonfinite"]["rel_fro"] == "nan" and v["nonfinite"]["sqnr_db"] == "nan"
    assert "nonfinite" not in js["model.layers.1.self_attn.q_proj"]
    same = sweep(ref, {"r": ref}, engine="numpy").to_json()["layers"][0]
    assert same["sqnr_db"] is None and same["nonfinite"] == {"sqnr_db": "inf"} and same["rel_fro"] == 0
    rc = main(["compare", "--reference", str(root / "ref"), str(tmp_path / "nan"), "--engine", "numpy"])
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("model.layers.1.self_attn.v_proj"))
    assert rc == 1 and line.split()[1:] == ["nan", "nan"]  # a variant that looks broken
    assert "non-finite error (1)" in out and "  nan: model.layers.1.self_attn.v_proj" in out


def test_nan_in_the_reference_is_blamed_on_the_reference(ref_pair, mlx_variant, tmp_path, capsys):
    # the table's note used to list the variant beside a NaN of the reference: doctor was then
    # run on the wrong checkpoint
    from quantscope.app.cli import main
    root, rw, ref, vw, _ = ref_pair
    t = dict(rw)
    w = t["model.layers.0.self_attn.o_proj.weight"].copy()
    w[5, 7] = np.nan
    t["model.layers.0.self_attn.o_proj.weight"] = w
    nanref = _model(tmp_path / "nanref", t)
    res = sweep(nanref, {"m": mlx_variant}, engine="numpy")
    rows = {r.name: r for r in res.rows}
    assert math.isnan(rows["model.layers.0.self_attn.o_proj"].rel_fro)
    assert res.reference_nonfinite == ["model.layers.0.self_attn.o_proj"]
    assert res.to_json()["reference_nonfinite"] == ["model.layers.0.self_attn.o_proj"]
    # a NaN of the variant's own stays the variant's
    t = dict(vw)
    v = t["model.layers.1.mlp.up_proj.weight"].copy()
    v[3, 3] = np.nan
    t["model.layers.1.mlp.up_proj.weight"] = v
    own = sweep(ref, {"n": _model(tmp_path / "nanvar", t)}, engine="numpy")
    assert [r.name for r in own.rows if math.isnan(r.rel_fro)] == ["model.layers.1.mlp.up_proj"]
    assert own.reference_nonfinite == []
    # known from the sweep's sums, also for rows taken from a resumed sweep's cache
    cache: dict = {}
    sweep(nanref, {"m": mlx_variant}, engine="numpy", cache=cache)
    assert sweep(nanref, {"m": mlx_variant}, engine="numpy", cache=cache).reference_nonfinite == \
        ["model.layers.0.self_attn.o_proj"]
    rc = main(["compare", "--reference", str(tmp_path / "nanref"), str(root / "var"), "--engine", "numpy"])
    out = capsys.readouterr().out
    assert rc == 1 and "NaN/inf in the reference's own weights (1 layer(s)" in out  # (figures that are none: 1)
    assert "  reference: model.layers.0.self_attn.o_proj" in out and "non-finite error" not in out


def test_a_variant_with_layers_that_cannot_be_decoded_is_warned_of(ref_pair, mlx_variant, tmp_path):
    # the window showed no sign of them (only the CLI's "not compared" list named them)
    root, _, ref, _, _ = ref_pair
    import shutil
    shutil.copytree(root / "mlx", tmp_path / "wrongbits")
    cfg = json.loads((tmp_path / "wrongbits" / "config.json").read_text())
    for m in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj"):  # 4-bit tensors: not 3-bit
        cfg["quantization"][m] = {"group_size": 64, "bits": 3}
    (tmp_path / "wrongbits" / "config.json").write_text(json.dumps(cfg))
    bad = analyze(open_checkpoint(tmp_path / "wrongbits"))
    res = sweep(ref, {"m": mlx_variant, "w": bad}, engine="numpy")
    n = sum(1 for u in res.unmatched if u.variant == "w" and "cannot be decoded" in u.reason)
    assert n == 2
    short, full = res.warnings()["w"]
    assert short.startswith(f"{n} layer(s) cannot be decoded, not compared (first: ") and "3-bit" in full
    assert "m" not in res.warnings()


# -- the demo workspace and real fixtures ------------------------------------------------------------

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    demo_mod = pytest.importorskip("quantscope.backend.demo")
    return demo_mod.build_demo(tmp_path_factory.mktemp("demo") / "ws")


@pytest.mark.slow
def test_demo_end_to_end(demo):
    ref = analyze(open_checkpoint(demo.reference))
    labels = ["gptq-w4g128", "gptq-w4g128-actorder", "awq-w4g128", "mlx-affine-q4g64", "mlx-mixed-3-6"]
    variants = {lb: analyze(open_checkpoint(demo.variants[lb])) for lb in labels}
    res = sweep(ref, variants, engine="numpy")
    by = res.by_variant()
    q = "model.layers.2.self_attn.q_proj"
    vals = {lb: next(r for r in by[lb] if r.name == q).rel_fro for lb in labels}
    assert all(np.isfinite(v) and 0 < v < 0.6 for v in vals.values())
    assert len(set(round(v, 6) for v in vals.values())) == len(vals)
    # AWQ: undone error clearly below raw where smoothing was folded, and close to quantizing W·s directly
    from quantscope.backend.demo import AWQ_SMOOTHING_FILE, dequantize, rtn_quantize
    s_true = open_checkpoint(Path(demo.root) / AWQ_SMOOTHING_FILE)
    awq = {r.name: r for r in by["awq-w4g128"]}
    undone = [r for r in awq.values() if r.smoothing.startswith("norm:")]
    assert undone and all(r.rel_fro < 0.8 * r.rel_fro_raw for r in undone)
    r = undone[0]
    s = np.asarray(s_true.tensor(f"{r.name}.smooth")).astype(np.float32)
    w = ref.ckpt.tensor(f"{r.name}.weight").astype(np.float32)
    c, sc, z = rtn_quantize(w * s, bits=4, group_size=128)
    expect = _direct(w, dequantize(c, sc, z, 128) / s)
    assert r.rel_fro == pytest.approx(expect, rel=0.02)
    # the demo folds its smoothing the way AWQ means to (weights × s, norm ÷ s): power 1, no warning
    chk = res.smoothing_checks["awq-w4g128"]
    assert abs(chk.power - 1) < 0.05 and not chk.warning and not res.warnings()
    assert set(res.smoothing_checks) == {"awq-w4g128"}  # nothing else shows folded norms


def test_row_scales_are_cached_as_arrays_and_resume_to_the_same_figures(demo, tmp_path):
    """The row scales of smoothing fitted to a preceding layer's rows (AWQ's o_proj, down_proj)
    are kept as float64 arrays in the cache (as lists of floats a 70B up_proj's took 0.9 MB in a
    session), written to JSON as lists, and a sweep resumed from the file gives the same figures."""
    # (that a sweep's fitting never writes into a cached array, np.array's copy on a hit, is not
    # observable from outside: no test claims it)
    from quantscope.backend.compare import load_cache
    ref = analyze(open_checkpoint(demo.reference))
    awq = {"awq": analyze(open_checkpoint(demo.variants["awq-w4g128"]))}
    cache: dict = {}
    first = sweep(ref, awq, engine="numpy", cache=cache, cache_dir=tmp_path)
    scaled = [e["row_scale"] for e in cache.values() if e.get("row_scale") is not None]
    assert scaled and all(isinstance(a, np.ndarray) and a.dtype == np.float64 for a in scaled)
    on_disk = load_cache(tmp_path)
    assert all(isinstance(e["row_scale"], list) for e in on_disk.values() if e.get("row_scale") is not None)
    again = sweep(ref, {"awq": analyze(open_checkpoint(demo.variants["awq-w4g128"]))}, engine="numpy",
                  cache=on_disk)
    fitted = [r for r in first.rows if "rows:" in r.smoothing]
    assert fitted  # (o_proj and down_proj, from v_proj's and up_proj's rows)
    a = {r.name: (r.rel_fro, r.rel_fro_raw, r.p99, r.smoothing) for r in first.rows}
    b = {r.name: (r.rel_fro, r.rel_fro_raw, r.p99, r.smoothing) for r in again.rows}
    assert a == b


@pytest.mark.parametrize("layer", ["model.layers.1.self_attn.o_proj", "model.layers.0.mlp.down_proj",
                                   "model.layers.2.self_attn.q_proj"])
def test_a_layer_too_large_to_hold_gets_the_same_views_read_in_row_blocks(demo, monkeypatch, layer, kernel_path):
    """Over BLOCK_ELEMENTS a layer's views are read in row blocks, twice (ranges, then counts on
    the edges they give), never held whole: every figure equals the whole-layer path's, with the
    AWQ smoothing undone from the norms (q_proj), from v_proj's rows (o_proj) and from up_proj's
    (down_proj), GPTQ act-order's group map and MLX's mixed bits; with the compiled kernels and
    without (numpy). Here a block is 2,048 weights."""
    import dataclasses

    from quantscope.backend import compare as cmp
    ref = analyze(open_checkpoint(demo.reference))
    variants = {lb: analyze(open_checkpoint(p)) for lb, p in demo.variants.items()}
    whole = layer_detail(ref, variants, layer, bins=64, engine="numpy")
    calls = []
    real = cmp._layer_detail_in_blocks
    monkeypatch.setattr(cmp, "_layer_detail_in_blocks", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(cmp, "BLOCK_ELEMENTS", 1024)
    monkeypatch.setattr(cmp, "_VIEW_BLOCK_ELEMENTS", 2048)  # (the metrics' blocks as for the whole path)
    blocks = layer_detail(ref, variants, layer, bins=64, engine="numpy")
    assert calls  # (the block path ran)
    assert set(blocks.metrics) == set(whole.metrics) and len(whole.metrics) >= 5
    for f in dataclasses.fields(whole):
        a, b = getattr(whole, f.name), getattr(blocks, f.name)
        if f.name == "metrics":
            for lb, m in a.items():
                for key in ("rel_fro", "rel_fro_raw", "sqnr_db", "cosine", "mse"):
                    assert getattr(b[lb], key) == pytest.approx(getattr(m, key), rel=1e-9), (lb, key)
                for key in ("p50", "p95", "p99", "max_abs", "smoothing", "bits", "scheme"):
                    assert getattr(b[lb], key) == getattr(m, key), (lb, key)
        elif f.name in ("group_error", "head_error"):
            # (heads: the attention layers', from the demo's config)
            assert set(a) == set(b) and (f.name == "group_error" or bool(a) == ("attn" in layer)), f.name
            for lb in a:
                np.testing.assert_allclose(b[lb], a[lb], rtol=1e-12, err_msg=lb)
        elif isinstance(a, dict):
            assert set(a) == set(b), f.name
            for k in a:
                if a[k] is None or isinstance(a[k], (int, float, str, tuple)):
                    assert a[k] == b[k], (f.name, k)
                else:
                    assert np.array_equal(a[k], b[k]), (f.name, k)
        elif isinstance(a, np.ndarray):
            assert np.array_equal(a, b), f.name
        else:
            assert a == b, f.name
    assert blocks.log_error_counts and blocks.error_counts and blocks.zero_errors is not None


def test_a_tied_head_too_large_to_hold_is_read_in_row_blocks_too(ref_pair, mlx_variant, tmp_path, monkeypatch):
    """A reference that ties its head to the embeddings: the selected lm_head is the embeddings'
    rows, read in blocks like any large layer, with the whole path's figures."""
    import dataclasses

    from quantscope.backend import compare as cmp
    _, rw, _, _, var = ref_pair
    tied = _model(tmp_path / "tied", {k: v for k, v in rw.items() if k != "lm_head.weight"},
                  {"tie_word_embeddings": True})
    variants = {"v": var, "m": mlx_variant}
    whole = layer_detail(tied, variants, "lm_head", bins=64, engine="numpy")
    calls = []
    real = cmp._layer_detail_in_blocks
    monkeypatch.setattr(cmp, "_layer_detail_in_blocks", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(cmp, "BLOCK_ELEMENTS", 1024)
    monkeypatch.setattr(cmp, "_VIEW_BLOCK_ELEMENTS", 2048)
    blocks = layer_detail(tied, variants, "lm_head", bins=64, engine="numpy")
    assert calls and set(whole.metrics) == {"v", "m"} == set(blocks.metrics)
    for f in dataclasses.fields(whole):
        a, b = getattr(whole, f.name), getattr(blocks, f.name)
        if f.name == "metrics":
            for lb, m in a.items():
                assert b[lb].rel_fro == pytest.approx(m.rel_fro, rel=1e-9) and b[lb].p99 == m.p99, lb
        elif f.name == "group_error":
            for lb in a:
                np.testing.assert_allclose(b[lb], a[lb], rtol=1e-12, err_msg=lb)
        elif isinstance(a, dict):
            assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a), f.name
        elif isinstance(a, np.ndarray):
            assert np.array_equal(a, b), f.name
        else:
            assert a == b, f.name


def test_a_variant_whose_decoder_refuses_a_selected_layer_is_left_out_with_no_figures(demo, monkeypatch):
    """Whole or read in blocks, a variant whose decode of the layer fails is left out, said, and
    has no metrics row in the views (it kept one when the failure came after its metrics)."""
    from quantscope.backend import compare as cmp
    from quantscope.backend.engines import NumpyEngine
    from quantscope.backend.errors import LayerError as LErr
    ref = analyze(open_checkpoint(demo.reference))
    variants = {lb: analyze(open_checkpoint(p)) for lb, p in demo.variants.items()}
    bad = variants["gptq-w4g128"]
    real = NumpyEngine.dequantize

    def refuse(self, model, layer, out=None):
        if model.ckpt.source == bad.ckpt.source:  # (a row block's decode is of a stand-in model)
            raise LErr("simulated refusal", file=model.ckpt.source, tensor=layer.path)
        return real(self, model, layer, out)
    monkeypatch.setattr(NumpyEngine, "dequantize", refuse)
    name = "model.layers.0.mlp.down_proj"
    for blocks in (False, True):
        if blocks:
            monkeypatch.setattr(cmp, "BLOCK_ELEMENTS", 1024)
            monkeypatch.setattr(cmp, "_VIEW_BLOCK_ELEMENTS", 2048)
        d = layer_detail(ref, variants, name, bins=64, engine="numpy")
        assert "simulated refusal" in d.left_out["gptq-w4g128"], blocks
        assert "gptq-w4g128" not in d.metrics and "gptq-w4g128" not in d.value_counts, blocks
        assert set(d.metrics) == set(variants) - {"gptq-w4g128"}, blocks


def test_layers_filter_measures_the_chosen_layers_as_a_whole_sweep_does(demo):
    """``layers``: only the matching reference layers, with the figures of a whole sweep; AWQ's
    down_proj (smoothing undone from up_proj's rows) brings up_proj along, named in ``added``."""
    from quantscope.backend.compare import CompareError
    ref = analyze(open_checkpoint(demo.reference))
    labels = ["awq-w4g128", "gptq-w4g128"]
    variants = {lb: analyze(open_checkpoint(demo.variants[lb])) for lb in labels}
    whole = {(r.name, r.variant): r for r in sweep(ref, variants, engine="numpy").rows}
    variants = {lb: analyze(open_checkpoint(demo.variants[lb])) for lb in labels}  # fresh alignments
    part = sweep(ref, variants, engine="numpy", layers=r"layers\.1\.mlp\.down_proj$")
    names = {r.name for r in part.rows}
    assert names == {"model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"}
    assert part.added == ["model.layers.1.mlp.up_proj"]
    down = {r.variant: r for r in part.rows if r.name.endswith("down_proj")}
    assert down["awq-w4g128"].smoothing.startswith("lstsq")  # undone as in the whole sweep, not skipped
    for r in part.rows:  # (float64 sums in another order where a layer's blocks are spread over the cores)
        w = whole[(r.name, r.variant)]
        assert (r.smoothing, r.p50, r.p99, r.max_abs) == (w.smoothing, w.p50, w.p99, w.max_abs)
        assert r.rel_fro == pytest.approx(w.rel_fro, rel=1e-12) and r.rel_fro_raw == pytest.approx(w.rel_fro_raw, rel=1e-12)
    # q_proj's smoothing is undone from the norms: nothing comes along
    variants = {lb: analyze(open_checkpoint(demo.variants[lb])) for lb in labels}
    part = sweep(ref, variants, engine="numpy", layers="q_proj")
    assert {r.name for r in part.rows} == {n for n, _ in whole if n.endswith("q_proj")} and not part.added
    for bad, rule in (("(", "compare.bad-pattern"), ("no_such_layer", "compare.no-layer-matches")):
        with pytest.raises(CompareError) as e:
            sweep(ref, variants, engine="numpy", layers=bad)
        assert e.value.rule == rule and "--layers" in str(e.value)


def test_smoothing_power_measures_how_the_weights_scale_with_the_norm_smoothing():
    from quantscope.backend.compare import smoothing_power
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 512)).astype(np.float32) * 0.02
    s = np.exp(rng.normal(0, 0.25, 512))
    noise = rng.standard_normal(w.shape).astype(np.float32) * 0.003  # ~15% relative, like 4-bit
    for b in (1.0, 2.0, 0.0):
        wh = (w * s ** b + noise * s ** b).astype(np.float32)
        assert smoothing_power(w, wh, s) == pytest.approx(b, abs=0.03)
    assert smoothing_power(w, w * 1.5, np.full(512, 1.3)) is None  # s constant: nothing to measure


def test_real_mlx_fixture(real_fixtures):
    ref_p, var_p = real_fixtures / "base-bf16", real_fixtures / "mlx-affine-q4-g64"
    if not (ref_p.is_dir() and var_p.is_dir()):
        pytest.skip("real fixtures absent")
    ref, var = analyze(open_checkpoint(ref_p)), analyze(open_checkpoint(var_p))
    res = sweep(ref, {"mlx": var}, engine="numpy")
    assert res.rows and all(np.isfinite(r.rel_fro) and 0 < r.rel_fro < 0.5 for r in res.rows)
    awq_p = real_fixtures / "gptqmodel-awq"
    if awq_p.is_dir():  # GPTQModel's AWQ: the issue quotes rel_fro 0.199 naive / 0.126 undone for q_proj
        res = sweep(ref, {"awq": analyze(open_checkpoint(awq_p))}, engine="numpy")
        q = next(r for r in res.rows if r.proj == "q_proj")
        assert q.rel_fro < q.rel_fro_raw


def test_table_marks_undone_smoothing_aligns_inf_and_cosine_stays_in_range(ref_pair, tmp_path, capsys):
    from quantscope.app.cli import main
    from quantscope.backend.demo import build_demo
    root = ref_pair[0]
    assert main(["compare", "--reference", str(root / "ref"), str(root / "ref"), "--json", str(tmp_path / "s.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(ln for ln in lines if ln.startswith("model.layers.0.mlp.down_proj"))
    assert row.endswith("0.00000      inf")  # inf as wide as the numbers, not drifting left
    layers = json.loads((tmp_path / "s.json").read_text())["layers"]
    assert all(r["cosine"] == 1.0 for r in layers)  # not 1.0000000000000002 or 0.9999999999999999
    ws = build_demo(tmp_path / "demo")
    assert main(["compare", "--reference", str(ws.reference), str(ws.variants["awq-w4g128"])]) == 0
    out = capsys.readouterr().out
    q = next(ln for ln in out.splitlines() if ln.startswith("model.layers.0.self_attn.q_proj"))
    assert "*" in q and "measured after undoing AWQ-style smoothing" in out and "norm: exact" in out
    # the demo folds up→down too: down_proj's s is a least-squares estimate, marked ~, not *
    d = next(ln for ln in out.splitlines() if ln.startswith("model.layers.0.mlp.down_proj"))
    assert "~" in d and "*" not in d and "* exactly, ~ estimated" in out
    # up_proj's own rows were rescaled by that estimate: ~ too, not exact
    u = next(ln for ln in out.splitlines() if ln.startswith("model.layers.0.mlp.up_proj"))
    assert "~" in u and "*" not in u
    # an AWQ checkpoint as the reference: it may be the smoothed side itself, so the unquantized
    # model compared to it is brought to its norms ("match"), not said to have its smoothing undone
    assert main(["compare", "--reference", str(ws.variants["awq-w4g128"]), str(ws.reference),
                 "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "measured after matching AWQ-style smoothing" in out and "match: the variant brought" in out
    assert "undoing" not in out
    rows = json.loads((tmp_path / "m.json").read_text())["layers"]
    q = next(r for r in rows if r["name"] == "model.layers.0.self_attn.q_proj")
    assert q["smoothing"].startswith("match:") and q["rel_fro"] < 0.8 * q["rel_fro_raw"]
    from quantscope.backend.compare import describe_smoothing, smoothing_action
    assert smoothing_action(q["smoothing"]) == "smoothing matched"
    assert describe_smoothing(q["smoothing"]) == "to the reference's input_layernorm"



def test_histograms_of_values_on_a_grid_are_not_drawn_as_a_comb():
    """Values on a grid (bf16) in bins about as wide as its step: neighbouring bins swung between
    thousands and none. The bins widen (at most 4x) until the bulk is smooth; counts stay exact
    on the edges returned. Smooth data keeps its bins, and a sparse tail does not count."""
    from quantscope.backend.metrics import _combed, bulk_histograms
    rng = np.random.default_rng(0)
    grid = np.round(rng.standard_normal(400_000) * 40) / 400  # steps of 1/400, 256 bins over ±0.5
    e, c, _ = bulk_histograms({"a": grid}, bins=256)
    assert not _combed(c["a"]) and len(e) - 1 < 256
    assert np.array_equal(c["a"], np.histogram(grid, e)[0])
    smooth = rng.standard_normal(400_000)
    e2, c2, _ = bulk_histograms({"a": smooth}, bins=256)
    assert len(e2) - 1 >= 128 and not _combed(c2["a"])
    assert not _combed(np.r_[np.full(50, 1000), [30, 0, 30, 0, 30, 0, 30, 0, 30, 0, 30, 0, 30]])  # tail only


def test_bulk_histograms_are_exact_on_their_edges_and_find_the_bulk_beside_outliers():
    from quantscope.backend.metrics import bulk_histograms
    rng = np.random.default_rng(3)
    a = rng.standard_normal(200_000) * 0.05
    b = rng.standard_normal(150_000) * 0.04
    b[:3] = [4.3, 2.0, -2.5]  # a few outliers stretch min/max edges 15x beyond the bulk
    b[3] = np.nan
    edges, counts, view = bulk_histograms({"a": a, "b": b}, bins=256)
    for k, x in (("a", a), ("b", b)):  # exact: np.histogram on the same edges
        assert np.array_equal(counts[k], np.histogram(x[np.isfinite(x)], bins=edges)[0])
    assert edges[0] == -2.5 and edges[-1] >= 4.3
    lo, hi = view
    assert -0.35 < lo < -0.15 and 0.15 < hi < 0.35  # the bulk of both, not the outliers
    inside = (edges[:-1] >= lo) & (edges[1:] <= hi)
    assert inside.sum() >= 128  # the bulk keeps a useful number of bins
    assert counts["b"][~inside].sum() <= 3 + 2  # outliers (and at most a value or two of the tails)
    # no outliers: the usual bins over min..max, and nothing to zoom to
    edges2, counts2, view2 = bulk_histograms({"a": a}, bins=256)
    assert len(edges2) == 257 and view2 is None and counts2["a"].sum() == a.size
    assert bulk_histograms({"a": np.array([np.nan])}) == (None, {}, None)
    assert bulk_histograms({"a": np.zeros(1000)})[2] is None  # constant: no bulk to zoom to
    # far outliers (100x): still exact, at most MAX_BINS drawn, a bulk of tens of bins
    b[:3] = [12.3, 7.0, -9.5]
    edges3, counts3, (lo3, hi3) = bulk_histograms({"b": b}, bins=256)
    assert len(edges3) - 1 <= 4096 and np.array_equal(counts3["b"], np.histogram(b[np.isfinite(b)], bins=edges3)[0])
    assert ((edges3[:-1] >= lo3) & (edges3[1:] <= hi3)).sum() >= 48


def test_cache_keys_stay_short_however_many_shards(tmp_path):
    # each key held the (path, size, mtime) list of every file of both checkpoints: 32 KB a key
    # for 200 shards, 2 GB of keys for a 50,000-layer comparison
    rng = np.random.default_rng(2)
    folder = tmp_path / "sharded"
    folder.mkdir()
    wmap = {}
    for i in range(40):
        name = f"model-{i:05d}-of-00040.safetensors"
        key = f"model.layers.{i}.mlp.down_proj.weight"
        write_st(folder / name, {key: (rng.standard_normal((8, 64)) * 0.02).astype(BF16)}, {"format": "pt"})
        wmap[key] = name
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    m = analyze(open_checkpoint(folder))
    cache: dict = {}
    res = sweep(m, {"same": m}, engine="numpy", cache=cache)
    assert len(res.rows) == 40 and all(r.rel_fro == 0 for r in res.rows)
    assert len(cache) == 40 and max(len(k) for k in cache) < 200


def test_a_targets_own_rows_of_stored_codes_scales_and_zeros():
    # compare._take_rows: GPTQ/AWQ GEMM scales are [G, N] (a column per output row), the others
    # [..., N, G] (AWQ GEMV's too: it took GEMV's [N, G] for [G, N])
    from types import SimpleNamespace

    from quantscope.backend.compare import _take_rows
    rows = np.arange(8, 16)
    for scheme, shape, layout in (("gptq", (24, 64), "GN"), ("awq-gemm", (24, 64), "GN"), ("awq-gemv", (24, 64), "NG"),
                                  ("mlx-affine", (3, 8, 64), "NG"), ("ct-pack", (24, 64), "NG")):
        lay = SimpleNamespace(scheme=scheme, shape=shape)
        n = int(np.prod(shape[:-1]))
        a = np.arange(n * 4).reshape((4, n) if layout == "GN" else (*shape[:-1], 4))
        got = _take_rows(a, rows, lay, per_group=True)
        want = a[:, rows] if layout == "GN" else a.reshape(-1, 4)[rows]
        assert np.array_equal(got, want), scheme
        codes = np.arange(n * 64).reshape(*shape)
        assert np.array_equal(_take_rows(codes, rows, lay), codes.reshape(-1, 64)[rows]), scheme
        assert _take_rows(a, np.arange(n), lay, per_group=True) is a  # every row: unchanged


def test_group_error_follows_compressed_tensors_act_order(tmp_path):
    """The Group error map of a compressed-tensors act-order file groups columns by its
    weight_g_idx (it took contiguous blocks of 128, GPTQ's g_idx alone was read): a reference
    that differs from the file only on the columns of group 0 shows the error in group 0 alone."""
    golden = Path(__file__).parent / "fixtures" / "golden" / "ct016_w4a16_actorder"
    var = analyze(open_checkpoint(golden))
    name = "model.layers.0.mlp.up_proj"
    exp = np.load(golden / "expected.npz")[name + ".weight"].astype(np.float32)  # the library's decode
    gi = np.asarray(var.ckpt.tensor(var.layers[name].tensors["weight_g_idx"].name)).astype(np.int64)
    assert not np.array_equal(gi, np.arange(gi.size) // 128)
    w = exp.copy()
    rng = np.random.default_rng(0)
    w[:, gi == 0] += rng.standard_normal((w.shape[0], int((gi == 0).sum()))).astype(np.float32) * 0.5 * np.abs(
        exp[:, gi == 0]).mean()
    ref = _model(tmp_path / "ref", {name + ".weight": w})
    d = layer_detail(ref, {"ct": var}, name, engine="numpy")
    ge = d.group_error["ct"]
    assert ge.shape == (w.shape[0], 3)
    # outside group 0 only the library output dtype rounding of the expected decode (~1e-3)
    assert ge[:, 0].min() > 0.1 and ge[:, 1:].max() < 0.01
    assert d.grouped_by_index == {"ct"}  # the view says so on its axis
    # a NaN weight spoils its own group's cell only (a one-hot product spread it over the row)
    w[5, np.flatnonzero(gi == 1)[3]] = np.nan
    ge = layer_detail(_model(tmp_path / "ref_nan", {name + ".weight": w}), {"ct": var}, name,
                      engine="numpy").group_error["ct"]
    assert np.isnan(ge[5, 1]) and np.isfinite(np.delete(ge.ravel(), 5 * 3 + 1)).all()


def test_smoothing_labels_in_words():
    from quantscope.backend.compare import describe_smoothing
    assert describe_smoothing("none") == "none"
    assert describe_smoothing("norm:model.layers.1.post_attention_layernorm") == "exact, from post_attention_layernorm"
    assert describe_smoothing("lstsq:model.layers.1.mlp.up_proj") == "fitted to up_proj's rows"
    # rows:CONSUMER is on the preceding layer: its own rows rescaled by the consumer's estimate
    assert describe_smoothing("norm:m.input_layernorm+rows:m.mlp.down_proj") == \
        "exact, from input_layernorm; rows rescaled by the estimate for down_proj"


def test_layers_pattern_knows_a_tied_head(tmp_path):
    """A reference without lm_head (tied to embed_tokens) is still compared on an "lm_head" row:
    --layers lm_head said no layer of the reference matched."""
    from quantscope.backend.compare import _layers_pattern
    rng = np.random.default_rng(0)
    ref = _model(tmp_path / "tied", {"model.embed_tokens.weight": rng.standard_normal((64, 32)).astype(np.float32),
                                     "model.layers.0.mlp.up_proj.weight": rng.standard_normal((64, 32)).astype(np.float32)})
    assert _layers_pattern(ref, "lm_head").pattern == "lm_head"
    with pytest.raises(CompareError, match="no layer of the reference matches --layers 'down_proj'"):
        _layers_pattern(ref, "down_proj")


def test_experts_of_a_stacked_reference_take_the_one_pass_by_their_own_size(tmp_path, monkeypatch):
    """The one pass is chosen by the rows measured (an expert's), not the whole stack's size: a
    stack over the limit left every expert to the general path."""
    from quantscope.backend import compare as cmp
    from quantscope.backend import fused
    from quantscope.backend.formats import fast
    if not fast.AVAILABLE:
        pytest.skip("compiled kernels absent")
    E = 4
    shapes = {"up_proj": (F, H)}
    per, _, var = _experts_and_switch(tmp_path, 7, "model.layers.0.mlp", E, shapes, {p: p for p in shapes},
                                      np.float32(0.001))
    q = {}  # the experts one by one, MLX 4-bit (the one pass measures quantized variants)
    for k, w in per.items():
        m = k[:-len(".weight")]
        q[f"{m}.weight"], q[f"{m}.scales"], q[f"{m}.biases"] = _mlx_quant(w)
    ref = _model(tmp_path / "q", q, {"quantization": {"group_size": 64, "bits": 4}})
    calls = []
    real = fused.measure
    monkeypatch.setattr(fused, "measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(cmp, "FUSED_MIN_ELEMENTS", 1 << 10)
    monkeypatch.setattr(cmp, "FUSED_MAX_ELEMENTS", F * H * 2)  # an expert fits, the stack (4x) does not
    res = sweep(var, {"p": ref}, engine="numpy")
    assert len(res.rows) == E and len(calls) == E
    # each row says which of the reference's layers holds it, and where: the row's own name
    # (experts.{e}.up_proj, the variant's naming) is no layer of the stacked reference
    for r in res.to_json()["layers"]:
        e = int(r["name"].split(".experts.")[1].split(".")[0])
        assert (r["reference_layer"], r["expert"]) == ("model.layers.0.mlp.switch_mlp.up_proj", e)
    monkeypatch.setattr(cmp, "FUSED_MIN_ELEMENTS", 1 << 40)  # the general path gives the same figures
    slow = {r.name: r for r in sweep(var, {"p": ref}, engine="numpy").rows}
    for r in res.rows:
        g = slow[r.name]
        assert (r.p50, r.p99, r.max_abs) == (g.p50, g.p99, g.max_abs)
        assert r.rel_fro == pytest.approx(g.rel_fro, rel=1e-9)


def test_the_experts_of_a_quantized_stack_share_one_row_decoder(tmp_path, monkeypatch):
    # each expert built the stack's decoder anew, converting all its scales: a fifth of an MoE
    # sweep's time (Qwen3-30B-shaped experts)
    import mlx.core as mx
    from quantscope.backend import compare as cmp
    from quantscope.backend.engines import NumpyEngine
    from quantscope.backend.formats import fast
    if not fast.AVAILABLE:
        pytest.skip("compiled kernels absent")
    E = 4
    rng = np.random.default_rng(23)
    per, stk = {}, {}
    for i in range(2):  # two decoder layers: decoders are kept within one, not across
        block = f"model.layers.{i}.mlp"
        ws = [(rng.standard_normal((F, H)) * 0.02).astype(BF16) for _ in range(E)]
        per.update({f"{block}.experts.{e}.up_proj.weight": w for e, w in enumerate(ws)})
        q = [_mlx_quant(w) for w in ws]
        for j, c in enumerate(("weight", "scales", "biases")):
            stk[f"{block}.switch_mlp.up_proj.{c}"] = np.stack([x[j] for x in q])
    ref = _model(tmp_path / "per", per)
    var = _model(tmp_path / "stk", stk, {"quantization": {"group_size": 64, "bits": 4}})
    built = []
    real = NumpyEngine.row_decoder
    monkeypatch.setattr(NumpyEngine, "row_decoder", lambda self, m, lay: built.append(lay.path) or real(self, m, lay))
    monkeypatch.setattr(cmp, "FUSED_MIN_ELEMENTS", 1 << 10)
    res = sweep(ref, {"s": var}, engine="numpy")
    assert len(res.rows) == 2 * E and not res.unmatched
    assert built == [f"model.layers.{i}.mlp.switch_mlp.up_proj" for i in range(2)]
    for r in res.rows:  # each expert against its own slice of the stack
        i, e = int(r.name.split(".")[2]), int(r.name.split(".")[5])
        w = _f32(per[r.name + ".weight"])
        q, sc, b = (stk[f"model.layers.{i}.mlp.switch_mlp.up_proj.{c}"][e] for c in ("weight", "scales", "biases"))
        wh = mx.dequantize(mx.array(q), mx.array(sc.view(np.uint16)).view(mx.bfloat16),
                           mx.array(b.view(np.uint16)).view(mx.bfloat16), group_size=64, bits=4)
        assert r.rel_fro == pytest.approx(_direct(w, np.array(wh.astype(mx.float32))), rel=1e-9)


def test_small_stats_refuses_arrays_of_different_sizes():
    from quantscope.backend.formats import fast
    if not fast.AVAILABLE:
        pytest.skip("numba absent")
    with pytest.raises(ValueError, match="shapes differ"):
        ErrorStats().add_small(np.ones(4, np.float32), np.ones(3, np.float32))


def test_a_small_array_gets_about_sqrt_n_bins_on_exact_counts():
    # a router's 512 weights in 256 bins were a comb of counts 0-10
    from quantscope.backend.metrics import MIN_BINS, bulk_histograms
    rng = np.random.default_rng(5)
    for n, bins in ((40, MIN_BINS), (512, 32), (5000, 128), (200_000, 256)):
        a = rng.standard_normal(n)
        edges, counts, _ = bulk_histograms({"a": a, "b": a[: n // 2] * 2})
        assert len(edges) - 1 == bins, n
        for k, x in (("a", a), ("b", a[: n // 2] * 2)):
            assert np.array_equal(counts[k], np.histogram(x, bins=edges)[0])


def test_a_cache_hit_is_named_as_the_variant_is_in_this_run(real_fixtures):
    # the cache is keyed by the files; its figures held the name of the run that measured them: a
    # checkpoint opened again as "q4 (2)" (another one now "q4") had its rows under "q4", twice
    from quantscope.backend.checkpoint import open_checkpoint
    from quantscope.backend.compare import sweep
    from quantscope.backend.schemes import analyze
    here = Path(__file__).parent / "fixtures" / "real"
    ref = analyze(open_checkpoint(real_fixtures / "base-bf16"))
    gptq = analyze(open_checkpoint(here / "gptqmodel-gptq-w4g128"))
    awq = analyze(open_checkpoint(here / "autoawq-gemm-w4g128"))
    cache: dict = {}
    first = sweep(ref, {"q4": gptq}, engine="numpy", cache=cache, layers="layers.0.self_attn")
    again = sweep(ref, {"q4": awq, "q4 (2)": gptq}, engine="numpy", cache=cache, layers="layers.0.self_attn")
    assert not again.failed
    got = {(r.variant, r.name): r.rel_fro for r in again.rows}
    assert {r.name: r.rel_fro for r in first.rows} == {n: v for (lb, n), v in got.items() if lb == "q4 (2)"}
    assert len(got) == 2 * len(first.rows)


@pytest.mark.parametrize("folder", ["tests/fixtures/real/gptqmodel-gptq-w4g128", "tests/fixtures/real/autoawq-gemm-w4g128",
                                    "tests/fixtures/real/llmcompressor-w4a16-asym", "tests/fixtures/real/mlxlm-qwen3moe-q4-g64",
                                    "tests/fixtures/golden/bnb_nf4", "tests/fixtures/golden/ct_w4a16_g128",
                                    "tests/fixtures/real/gptqmodel-gptq-w3g128"])
def test_code_counts_from_the_packed_words_equal_the_unpacked_codes(folder):
    """Counting each level straight from the packed bytes (order does not matter to counts) gives
    exactly what counting the unpacked codes gives; where it does not apply (3 bits: fields across
    bytes) it says so (None) and the codes are counted."""
    from pathlib import Path

    from quantscope.backend.compare import packed_level_counts
    from quantscope.backend.formats import fast
    if not fast.AVAILABLE:
        pytest.skip("numba is not installed")
    m = analyze(open_checkpoint(Path(__file__).parent.parent / folder))
    seen = 0
    for layer in m.layers.values():
        if not layer.quantized or not layer.decodable:
            continue
        codes = stored_codes(m, layer)
        got = packed_level_counts(m, layer)
        if layer.bits == 3:
            assert got is None
            continue
        if codes is None:
            continue
        assert got is not None, layer.path
        assert np.array_equal(got, np.bincount(codes.reshape(-1), minlength=2 ** layer.bits)), layer.path
        seen += 1
        n = layer.shape[-2] if len(layer.shape) == 2 else None
        if n:  # a subset of the rows (one of a fused layer's parts): not from the packed words
            assert packed_level_counts(m, layer, np.arange(n // 2)) is None
    assert seen or "w3g128" in folder


def test_a_layer_without_groups_gets_its_error_map_in_column_blocks(real_fixtures):
    """llm-compressor's FP8 (one scale per output channel): the map was a single column, "group
    0", whole rows; now blocks of 128 columns, each cell its block's relative error."""
    from pathlib import Path

    from quantscope.backend.compare import BLOCK_COLUMNS
    ref = analyze(open_checkpoint(real_fixtures / "base-bf16"))
    fp8 = analyze(open_checkpoint(Path(__file__).parent / "fixtures" / "real" / "llmcompressor-fp8"))
    name = "model.layers.0.mlp.gate_proj"  # [1536, 384]
    d = layer_detail(ref, {"fp8": fp8}, name, engine="numpy")
    assert d.column_blocks == {"fp8": BLOCK_COLUMNS} and d.group_error["fp8"].shape == (1536, 384 // BLOCK_COLUMNS)
    w = _f32(ref.ckpt.tensor(f"{name}.weight"))
    wh = NumpyEngine().dequantize(fp8, fp8.layers[name])
    blk = (slice(7, 8), slice(128, 256))
    assert d.group_error["fp8"][7, 1] == pytest.approx(_direct(w[blk], wh[blk]), rel=1e-9)


def test_fp8_weights_are_counted_as_codes_in_the_order_of_their_values(real_fixtures):
    """FP8 views said "no integer codes": an FP8 weight is its own code, 254 finite values. Their
    counts, ordered by value, show saturation at ±448 and the codes no weight uses."""
    from pathlib import Path

    import ml_dtypes
    ref = analyze(open_checkpoint(real_fixtures / "base-bf16"))
    fp8 = analyze(open_checkpoint(Path(__file__).parent / "fixtures" / "real" / "llmcompressor-fp8"))
    name = "model.layers.1.mlp.down_proj"
    d = layer_detail(ref, {"fp8": fp8}, name, engine="numpy")
    c = d.code_counts["fp8"]
    assert len(c) == 254 and c.sum() == 384 * 1536 and d.float_codes["fp8"] == (-448.0, 448.0)
    vals = np.asarray(fp8.ckpt.tensor(f"{name}.weight")).view(ml_dtypes.float8_e4m3fn).astype(np.float64).ravel()
    grid = np.unique(np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64))
    grid = grid[np.isfinite(grid)]  # 253 distinct values: +0 and -0 are two codes of one value
    per_value = np.array([np.count_nonzero(vals == g) for g in grid])
    zero = int(np.flatnonzero(grid == 0)[0])
    merged = np.r_[c[:zero], c[zero] + c[zero + 1], c[zero + 2:]]  # -0 and +0 side by side
    assert np.array_equal(merged, per_value)


def test_fp4_codes_are_ordered_by_value():
    from quantscope.backend.compare import float_code_order
    from quantscope.backend.schemes import Layer
    order, (lo, hi) = float_code_order(Layer("x", "mlx-mxfp4", {}))
    assert order.tolist() == [15, 14, 13, 12, 11, 10, 9, 8, 0, 1, 2, 3, 4, 5, 6, 7]  # -0 (code 8) before +0
    assert (lo, hi) == (-6.0, 6.0)
    assert float_code_order(Layer("x", "gptq", {})) is None



def test_the_view_kernels_refuse_arrays_of_different_sizes():
    from quantscope.backend.formats import fast, histo
    if not fast.AVAILABLE:
        pytest.skip("numba is not installed")
    a, b = np.zeros(10, np.float32), np.zeros(9, np.float32)
    for call in (lambda: histo.counts(a, np.linspace(0, 1, 5), b), lambda: histo.finite_range(a, b),
                 lambda: histo.log_abs_counts(a, b, np.linspace(0, 1, 5)),
                 lambda: histo.group_sums(a.reshape(2, 5), a.reshape(2, 5), np.array([0, 0, 1, 1, 2]), 2)):
        with pytest.raises(ValueError):
            call()



def test_a_gptq_layer_of_one_group_per_row_gets_column_blocks_on_its_map():
    """GPTQ's group -1 stores a g_idx of zeros: the map was one column of whole rows (and was
    labelled as 128-column blocks it did not have); now it has the blocks its label names."""
    from types import SimpleNamespace

    from quantscope.backend.compare import _group_errors
    from quantscope.backend.schemes import Layer
    model = SimpleNamespace(ckpt=SimpleNamespace(tensor=lambda name: np.zeros(512, np.int32)))
    layer = Layer("x", "gptq", {"g_idx": SimpleNamespace(name="x.g_idx", dtype="I32")}, shape=(4, 512), bits=4,
                  group_size=-1)
    w = np.random.default_rng(0).random((4, 512)).astype(np.float32)
    wh = w + np.float32(0.01)
    m, by_index, block, _ = _group_errors(w, wh, layer, model)
    assert m.shape == (4, 4) and block == 128 and not by_index
    assert m[1, 2] == pytest.approx(_direct(w[1, 256:384], wh[1, 256:384]), rel=1e-9)


def test_layer_alone_shows_an_expert_of_a_stack_by_its_rows():
    """Without a reference, an expert of a stacked checkpoint was not shown (only the whole stack,
    by its own name); one stored one by one was. Its values and codes are its rows of the stack."""
    from pathlib import Path

    from quantscope.backend.compare import layer_alone
    real = Path(__file__).parent / "fixtures" / "real"
    mlx = analyze(open_checkpoint(real / "mlxlm-qwen3moe-q4-g64"))
    name = "model.layers.1.mlp.experts.2.down_proj"
    d = layer_alone({"mlx": mlx}, name, engine="numpy")
    stack = NumpyEngine().dequantize(mlx, mlx.layers["model.layers.1.mlp.switch_mlp.down_proj"])
    expected, _ = np.histogram(stack[2].astype(np.float64), bins=d.value_edges)
    np.testing.assert_array_equal(d.value_counts["mlx"], expected)
    assert int(d.code_counts["mlx"].sum()) == stack[2].size and d.scales["mlx"].size == stack[2].size // 64
    with pytest.raises(CompareError, match="no open checkpoint holds"):
        layer_alone({"mlx": mlx}, "model.layers.1.mlp.experts.9.down_proj", engine="numpy")
