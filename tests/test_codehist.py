"""Value histograms counted from the codes (backend/formats/codehist.py) equal np.histogram of
values produced independently of quantscope's decoders: mx.dequantize for MLX affine, the
formats' formula on independently packed GPTQ/AWQ words, and the real tools' own decodes of the
fixtures they wrote (GPTQModel, AutoAWQ, mlx-lm)."""

from pathlib import Path

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mx_util import to_np
from quantscope.backend import compare
from quantscope.backend.bitpack import pack_bits
from quantscope.backend.checkpoint import open_checkpoint
from quantscope.backend.engines import NumpyEngine, group_values, read_parts, to_mx
from quantscope.backend.formats import awq, ct, fast, gptq
from quantscope.backend.formats import mlx as mlxfmt
from quantscope.backend.formats.codehist import pattern_values
from quantscope.backend.metrics import uniform_edges
from quantscope.backend.schemes import analyze
from ref_packers import autoawq_pack_gemm, autogptq_pack_rows

pytestmark = pytest.mark.skipif(not fast.AVAILABLE, reason="the code counts need numba")

RNG = np.random.default_rng(11)
REAL = Path(__file__).parent / "fixtures" / "real"


def assert_counts_equal(gv, values, bins=16384):
    """gv's finite range and counts on uniform edges over it (and over a wider span, where the
    values' positions are not on the edges' grid) are those of the values themselves."""
    values = np.asarray(values, np.float32).reshape(-1)
    finite = values[np.isfinite(values)]
    assert gv.size == values.size
    lo, hi = gv.finite_range()
    assert (lo, hi) == (float(finite.min()), float(finite.max()))
    for edges in (uniform_edges(lo, hi, bins), uniform_edges(lo - 0.37 * (hi - lo), hi + 0.11, 97)):
        np.testing.assert_array_equal(gv.histogram(edges), np.histogram(finite, edges)[0])


def mlx_layer(n, k, bits, group, dtype):
    w = mx.array(RNG.standard_normal((n, k)).astype(np.float32) * 0.05).astype(dtype)
    wq, s, b = mx.quantize(w, group_size=group, bits=bits)
    want = to_np(mx.dequantize(wq, s, b, group_size=group, bits=bits).astype(mx.float32))
    return to_np(wq), to_np(s), to_np(b), want


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("bits,group", [(4, 64), (4, 32), (2, 128), (4, 128)])
def test_mlx_affine_counts_equal_mx_dequantize(dtype, bits, group):
    wq, s, b, want = mlx_layer(48, 512, bits, group, dtype)
    gv = mlxfmt.affine_group_values(wq, s, b, bits=bits, group_size=group)
    assert gv is not None and gv.counts.shape == (48 * 512 // group, 2 ** bits)
    assert_counts_equal(gv, want)
    # a run of rows (an expert of a stack, a slice of a fused layer)
    part = mlxfmt.affine_group_values(wq, s, b, bits=bits, group_size=group, r0=5, r1=31)
    assert_counts_equal(part, want[5:31])


def test_mlx_affine_without_a_kernel_is_none():
    wq, s, b, _ = mlx_layer(8, 256, 8, 64, mx.bfloat16)  # 8-bit: as many levels as a group has codes
    assert mlxfmt.affine_group_values(wq, s, b, bits=8, group_size=64) is None
    wq, s, b, _ = mlx_layer(8, 256, 3, 64, mx.bfloat16)  # 3-bit: codes straddle words
    assert mlxfmt.affine_group_values(wq, s, b, bits=3, group_size=64) is None


def make_gptq(n, k, bits, group, *, actorder=False, version=1):
    q = RNG.integers(0, 2 ** bits, size=(k, n))
    ng = -(-k // group)
    z = RNG.integers(1, 2 ** bits, size=(ng, n))
    s = (RNG.random((ng, n)) * 0.02 + 0.001).astype(np.float16)
    g_idx = np.arange(k) // group
    if actorder:
        g_idx = np.empty(k, np.int64)
        g_idx[RNG.permutation(k)] = np.arange(k) // group
    qweight = autogptq_pack_rows(q, bits)
    qzeros = autogptq_pack_rows((z - 1 if version == 1 else z).T.copy(), bits).T.copy()
    # the format's formula (formats.md §3), in float64: the exact product
    want = (s[g_idx].astype(np.float64).T * (q.T - z[g_idx].T)).astype(np.float32)
    return qweight, qzeros, s, g_idx.astype(np.int32), want


@pytest.mark.parametrize("bits,group,actorder,version", [(4, 128, False, 1), (4, 64, True, 2), (2, 64, False, 2),
                                                         (4, 32, True, 1)])
def test_gptq_counts_equal_the_formula(bits, group, actorder, version):
    n = 96  # (the run of outputs below is not a multiple of the kernel's four at a time)
    qweight, qzeros, s, g_idx, want = make_gptq(n, 512, bits, group, actorder=actorder, version=version)
    gv = gptq.group_values(qweight, qzeros, s, g_idx, bits=bits, group_size=group, version=version)
    assert_counts_equal(gv, want)
    part = gptq.group_values(qweight, qzeros, s, g_idx, bits=bits, group_size=group, version=version, n0=3, n1=58)
    assert_counts_equal(part, want[3:58])


def test_gptq_one_group_and_bf16_scales():
    qweight, qzeros, s, _, _ = make_gptq(16, 128, 4, 128)
    s = s.astype(np.float32).astype(ml_dtypes.bfloat16)
    want = gptq.decode(qweight, qzeros, s, None, bits=4, group_size=-1)
    assert_counts_equal(gptq.group_values(qweight, qzeros, s, None, bits=4, group_size=-1), want)
    # a group of over 255 codes (8-bit counts): the decoded array's histogram instead
    qweight, qzeros, s, _, _ = make_gptq(16, 512, 4, 512)
    assert gptq.group_values(qweight, qzeros, s, None, bits=4, group_size=-1) is None


@pytest.mark.parametrize("n,k,group", [(64, 256, 128), (88, 1024, 64), (200, 384, 32)])
@pytest.mark.parametrize("sym", [False, True])
def test_awq_gemm_counts_equal_the_formula(n, k, group, sym):
    q = RNG.integers(0, 16, size=(k, n))
    z = np.full((k // group, n), 8) if sym else RNG.integers(0, 16, size=(k // group, n))
    s = (RNG.random((k // group, n)) * 0.02 + 0.001).astype(np.float16)
    gi = np.arange(k) // group
    want = (s[gi].astype(np.float64) * (q - z[gi])).T.astype(np.float32)  # formats.md §4
    qzeros = None if sym else autoawq_pack_gemm(z)
    gv = awq.gemm_group_values(autoawq_pack_gemm(q), qzeros, s)
    assert_counts_equal(gv, want)
    part = awq.gemm_group_values(autoawq_pack_gemm(q), qzeros, s, n0=8, n1=n - 16)
    assert_counts_equal(part, want[8:n - 16])


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_a_16_bit_reference_counts_its_bit_patterns(dtype):
    a = (RNG.standard_normal((96, 700)) * 0.05).astype(dtype)
    a[0, :3] = [np.inf, -np.inf, np.nan]
    a[1, :2] = [-0.0, 0.0]
    pv = pattern_values(a)
    assert_counts_equal(pv, a.astype(np.float32))
    assert pattern_values(a.astype(np.float32)) is None  # (float32: counted as an array)


@pytest.mark.parametrize("strategy,zero_points,dtype", [("group", False, np.float16), ("group", True, np.float32),
                                                        ("channel", True, np.float16), ("tensor", False, np.float32)])
def test_compressed_tensors_counts_equal_the_formula(strategy, zero_points, dtype):
    # (float32 scales: (q - z) * s rounds once, q * s - z * s would differ in the last bit)
    n, k, bits, group = 40, 192 if strategy in ("channel", "tensor") else 512, 4, 64  # (at most 255 per group)
    q = RNG.integers(0, 16, size=(n, k))
    ng = k // group if strategy == "group" else 1
    s = (RNG.random((n, ng) if strategy != "tensor" else (1,)) * 0.02 + 0.001).astype(dtype)
    zp = RNG.integers(-3, 4, size=(n, ng)) if zero_points else None
    sc = np.broadcast_to(s.reshape(-1, 1) if strategy == "tensor" else s, (n, ng)).astype(np.float64)
    zz = 0 if zp is None else zp
    gi = np.arange(k) // (k // ng)
    want = ((q - 8 - (zz if np.isscalar(zz) else zz[:, gi])) * sc[:, gi]).astype(np.float32)  # formats.md §5.2
    packed = pack_bits(q, 4).view(np.int32)
    stored_zp = None if zp is None else zp.astype(np.int8)  # (the older, unpacked form)
    gv = ct.pack_group_values(packed, s, (n, k), bits=bits, group_size=group, strategy=strategy,
                              weight_zero_point=stored_zp)
    assert_counts_equal(gv, want)
    assert_counts_equal(ct.pack_group_values(packed, s, (n, k), bits=bits, group_size=group, strategy=strategy,
                                             weight_zero_point=stored_zp, r0=7, r1=33), want[7:33])
    # a channel of 256 codes or more: 8-bit counts cannot hold it
    wide = pack_bits(RNG.integers(0, 16, size=(n, 256)), 4).view(np.int32)
    assert ct.pack_group_values(wide, s if strategy != "group" else s[:, :1], (n, 256), bits=bits,
                                strategy="channel" if strategy == "group" else strategy) is None
    # act-order: its groups are not runs of words
    assert ct.pack_group_values(packed, s, (n, k), bits=bits, group_size=group, strategy=strategy,
                                weight_zero_point=stored_zp, g_idx=np.arange(k)[::-1] // group) is None


def test_damaged_scales_count_only_the_finite_values():
    # an inf scale (0 * inf is NaN, the other codes inf), a NaN scale, a scale so large that the
    # upper codes overflow while the lower stay finite, and a group using only its middle codes
    wq, s, b, _ = mlx_layer(8, 256, 4, 64, mx.float32)
    s, b = s.copy(), b.copy()
    s[0, 0], s[1, 1], s[2, 2] = np.inf, np.nan, 3e37
    b[2, 2] = 0.0
    codes = mlxfmt.affine_codes(wq, 4, 256)
    codes[2, 128:192] = np.arange(64) % 16
    codes[3, 64:128] = RNG.integers(6, 9, size=64)
    wq = pack_bits(codes, 4)
    want = mlxfmt.decode_affine(wq, s, b, bits=4, group_size=64)
    # the overflowing group's largest finite value is one of its lower codes'
    assert np.isfinite(want[2, 128:192]).any() and not np.isfinite(want[2, 128:192]).all()
    gv = mlxfmt.affine_group_values(wq, s, b, bits=4, group_size=64)
    assert_counts_equal(gv, want)
    assert gv.finite_range()[1] == float(np.nanmax(np.where(np.isfinite(want), want, np.nan)))


@pytest.mark.parametrize("case", ["gptqmodel-gptq-w4g128", "gptqmodel-gptq-w4g128-actorder", "autoawq-gemm-w4g128",
                                  "llmcompressor-w4a16", "llmcompressor-w4a16-asym"])
def test_real_checkpoints_count_what_the_tools_decode(case):
    folder = REAL / case
    model = analyze(open_checkpoint(folder))
    with np.load(folder / "decoded.npz") as z:
        decoded = dict(z)
    assert decoded
    for name, want in decoded.items():
        gv = group_values(model, model.layers[name])
        assert gv is not None, name
        assert_counts_equal(gv, want, bins=4096)


def test_real_mlx_checkpoint_counts_what_mx_dequantize_gives(real_fixtures):
    model = analyze(open_checkpoint(real_fixtures / "mlx-affine-q4-g64"))
    layers = [layer for layer in model.layers.values() if layer.scheme == "mlx-affine"]
    assert layers
    for layer in layers:
        p = read_parts(model, layer)
        want = to_np(mx.dequantize(to_mx(p["weight"]), to_mx(p["scales"]), to_mx(p["biases"]),
                                   group_size=layer.group_size, bits=layer.bits).astype(mx.float32))
        assert_counts_equal(group_values(model, layer), want, bins=4096)


def test_a_stacked_mlx_expert_counts_its_own_rows():
    folder = REAL / "mlxlm-qwen3moe-q4-g64"
    model = analyze(open_checkpoint(folder))
    stacks = [layer for layer in model.layers.values() if layer.scheme == "mlx-affine" and len(layer.shape) == 3]
    assert stacks
    layer = stacks[0]
    n = layer.shape[1]
    whole = NumpyEngine().dequantize(model, layer)
    assert_counts_equal(group_values(model, layer, 1 * n, 2 * n), whole[1], bins=1024)


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    from quantscope.backend.demo import build_demo
    ws = build_demo(tmp_path_factory.mktemp("demo") / "ws", seed=0)
    return (analyze(open_checkpoint(ws.reference)),
            {label: analyze(open_checkpoint(p)) for label, p in ws.variants.items()})


def detail_both_ways(monkeypatch, ref, variants, name, blocks=False):
    """layer_detail with the values counted from the codes (and the reference's from its bit
    patterns), and with those paths off; the schemes (and "reference") that took them.
    ``blocks``: the path of layers too large to hold (here, blocks of 2,048 weights)."""
    coded = []

    def spy(model, layer, r0=0, r1=None):
        gv = group_values(model, layer, r0, r1)
        if gv is not None:
            coded.append(layer.scheme)
        return gv

    def spy_ref(stored):
        pv = pattern_values(stored)
        if pv is not None:
            coded.append("reference")
        return pv
    if blocks:
        monkeypatch.setattr(compare, "BLOCK_ELEMENTS", 1024)
        monkeypatch.setattr(compare, "_VIEW_BLOCK_ELEMENTS", 2048)
    monkeypatch.setattr(compare, "group_values", spy)
    monkeypatch.setattr(compare, "pattern_values", spy_ref)
    d = compare.layer_detail(ref, variants, name, engine="numpy")
    monkeypatch.setattr(compare, "group_values", lambda *a, **k: None)
    monkeypatch.setattr(compare, "pattern_values", lambda *a, **k: None)
    plain = compare.layer_detail(ref, variants, name, engine="numpy")
    monkeypatch.undo()
    np.testing.assert_array_equal(d.value_edges, plain.value_edges)
    assert d.value_counts.keys() == plain.value_counts.keys()
    for k, c in plain.value_counts.items():
        np.testing.assert_array_equal(d.value_counts[k], c, err_msg=k)
    assert d.value_view == plain.value_view
    assert d.code_counts.keys() == plain.code_counts.keys()
    for k, c in plain.code_counts.items():
        np.testing.assert_array_equal(d.code_counts[k], c, err_msg=k)
    return coded


@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("name", ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"])
def test_layer_detail_counts_from_the_codes_what_the_decoded_layers_give(demo_models, monkeypatch, name, blocks):
    ref, variants = demo_models
    coded = detail_both_ways(monkeypatch, ref, variants, name, blocks)
    # (AWQ's smoothing is undone: its decoded rows)
    assert {"gptq", "mlx-affine", "reference"} <= set(coded)


def test_layer_detail_of_an_expert_counts_its_rows_of_the_stack(monkeypatch):
    ref = analyze(open_checkpoint(REAL / "qwen3moe-bf16"))
    variants = {"mlx": analyze(open_checkpoint(REAL / "mlxlm-qwen3moe-q4-g64")),
                "gptq": analyze(open_checkpoint(REAL / "gptqmodel-qwen3moe-w4g64"))}
    name = next(n for n in ref.layers if ".experts.1." in n and n.endswith("down_proj"))
    coded = detail_both_ways(monkeypatch, ref, variants, name)
    assert sorted(coded) == ["gptq", "mlx-affine", "reference"]


_AWKWARD = [0.0, -0.0, 1e-3, -2.5e-3, 7.0, -3e4, 6e4, 1e-38, 3e38, float("inf"), float("nan")]


def test_a_layer_of_one_huge_value_gets_a_histogram():
    # hypothesis found it: scale 0 and a bias of 3e38, every weight 3e38. The range was widened
    # by numpy's ±0.5, below the resolution of such a value: edges 3e38 to 3e38, a ValueError
    from quantscope.backend.metrics import uniform_edges
    wq = np.zeros((1, 4), np.uint32)
    sx, bx = mx.array([[0.0]]).astype(mx.bfloat16), mx.array([[3e38]]).astype(mx.bfloat16)
    want = to_np(mx.dequantize(mx.array(wq), sx, bx, group_size=32, bits=4).astype(mx.float32))
    gv = mlxfmt.affine_group_values(wq, to_np(sx), to_np(bx), bits=4, group_size=32)
    lo, hi = gv.finite_range()
    edges = uniform_edges(lo, hi, 257)
    assert lo == hi == want.max() and (np.diff(edges) > 0).all()
    np.testing.assert_array_equal(gv.histogram(edges), np.histogram(want, edges)[0])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_mlx_affine_layer_counts_what_mx_dequantize_gives(data):
    # awkward scales and biases (zero, negative, tiny, huge, inf, NaN) in every dtype MLX takes
    bits, group = data.draw(st.sampled_from([(4, 32), (4, 64), (4, 128), (2, 32), (2, 64)]))
    dtype = data.draw(st.sampled_from([mx.bfloat16, mx.float16, mx.float32]))
    rows, ng = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 3))
    seed = data.draw(st.integers(0, 2 ** 31))
    rng = np.random.default_rng(seed)
    per = 32 // bits
    wq = rng.integers(0, 2 ** 32, size=(rows, ng * group // per), dtype=np.uint32)
    pick = st.one_of(st.sampled_from(_AWKWARD), st.floats(-1.0, 1.0, width=32))
    s = np.array(data.draw(st.lists(pick, min_size=rows * ng, max_size=rows * ng)), np.float32).reshape(rows, ng)
    b = np.array(data.draw(st.lists(pick, min_size=rows * ng, max_size=rows * ng)), np.float32).reshape(rows, ng)
    sx, bx = mx.array(s).astype(dtype), mx.array(b).astype(dtype)
    want = to_np(mx.dequantize(mx.array(wq), sx, bx, group_size=group, bits=bits).astype(mx.float32))
    gv = mlxfmt.affine_group_values(wq, to_np(sx), to_np(bx), bits=bits, group_size=group)
    finite = want[np.isfinite(want)]
    lo, hi = gv.finite_range()
    if not finite.size:
        assert lo > hi
        return
    assert (lo, hi) == (float(finite.min()), float(finite.max()))
    edges = uniform_edges(lo, hi, 257)
    np.testing.assert_array_equal(gv.histogram(edges), np.histogram(finite, edges)[0])
