"""compressed-tensors decoders against the library's own output (tests/fixtures/golden).

The golden folders were written by compressed-tensors 0.19.0 (current layouts) and 0.16.0
(legacy < 0.17 packing, act-order g_idx) — see tests/fixtures/golden/README.md. Decodes must
match the library bit for bit: both compute ``(q - zp) * s`` rounded once to the scale dtype.
"""

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from quantscope.backend.errors import LayerError
from quantscope.backend.formats import ct
from quantscope.backend.formats.common import round_to
from quantscope.backend.safetensors_file import SafetensorsFile

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
LAYER = "model.layers.0.mlp.up_proj"
CASES = sorted(p.name for p in GOLDEN.iterdir() if p.name.startswith("ct"))


def load(case):
    d = GOLDEN / case
    f = SafetensorsFile(d / "model.safetensors")
    t = {n[len(LAYER) + 1:]: f.read(n) for n in f.names}
    f.close()
    cfg = json.loads((d / "config.json").read_text())["quantization_config"]
    with np.load(d / "expected.npz") as z:
        exp = z[f"{LAYER}.weight"]
        lib = str(z["library_dtype"]).replace("torch.", "")
    return t, cfg, Expected(exp, lib)


class Expected(np.ndarray):
    """The library's output, with the dtype the library cast the exact product to."""

    def __new__(cls, a, lib):
        obj = np.asarray(a).view(cls)
        obj.lib = lib
        return obj

    def __array_finalize__(self, obj):
        self.lib = getattr(obj, "lib", "float32")


def as_library(out, exp):
    """quantscope's exact float32 product cast like the library casts it."""
    cast = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}.get(exp.lib)
    return round_to(out.copy(), cast) if cast else out


def decode_case(t, cfg):
    g = cfg["config_groups"]["group_0"]
    w, fmt = g["weights"], g["format"]
    if fmt == "pack-quantized":
        return ct.decode_pack_quantized(
            t["weight_packed"], t["weight_scale"], t["weight_shape"], bits=w["num_bits"],
            group_size=w["group_size"], strategy=w["strategy"],
            weight_zero_point=t.get("weight_zero_point"), g_idx=t.get("weight_g_idx"),
            name=LAYER)
    if fmt == "nvfp4-pack-quantized":
        return ct.decode_nvfp4(t["weight_packed"], t["weight_scale"], t["weight_global_scale"])
    if fmt == "mxfp4-pack-quantized":
        return ct.decode_mxfp4(t["weight_packed"], t["weight_scale"])
    if fmt == "mxfp8-quantized":
        return ct.decode_mxfp8(t["weight"], t["weight_scale"])
    return ct.decode_naive(t["weight"], t["weight_scale"], t.get("weight_zero_point"),
                           strategy=w["strategy"], group_size=w["group_size"],
                           block_structure=w["block_structure"])


def test_golden_cases_present():
    assert {"ct_w4a16_g128", "ct_w4a16_asym", "ct_w3a16_asym_fp16", "ct_w8a16_channel",
            "ct_nvfp4", "ct_mxfp4", "ct_fp8_channel", "ct_fp8_block_partial",
            "ct016_w3a16_asym_legacy", "ct016_w4a16_actorder"} <= set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_matches_library_exactly(case):
    t, cfg, exp = load(case)
    out = decode_case(t, cfg)
    assert out.dtype == np.float32 and out.shape == exp.shape
    assert np.std(exp) > 0                      # golden is not trivially zero
    np.testing.assert_array_equal(as_library(out, exp), np.asarray(exp))


@pytest.mark.parametrize("case,layout", [
    ("ct_w3a16_asym_fp16", "dense"), ("ct016_w3a16_asym_legacy", "legacy"),
    ("ct016_w5a16_legacy", "legacy"), ("ct_w4a16_g128", "dense")])
def test_detect_packing_on_library_files(case, layout):
    t, cfg, exp = load(case)
    bits = cfg["config_groups"]["group_0"]["weights"]["num_bits"]
    K = int(t["weight_shape"][-1])
    assert ct.detect_packing(t["weight_packed"].shape[1], K, bits) == layout
    # version in the config agrees with the generation we detect
    assert (cfg["version"] < "0.17") == (layout == "legacy" and bits not in (1, 2, 4, 8))
    # forcing the other generation is refused with a message naming both widths
    if bits == 3:
        other = "dense" if layout == "legacy" else "legacy"
        with pytest.raises(LayerError, match="layout need"):
            ct.codes_pack_quantized(t["weight_packed"], t["weight_shape"], bits=3, packing=other)


def test_legacy_layout_by_hand():
    # formats.md §5.2: < 0.17 puts floor(32/b) values in each int32, value i at bits b*i, top
    # bits unused, each row padded with zeros to a whole number of words.
    codes = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 7, 6, 5, 4]], np.uint8)   # 12 values, 3 bits
    w0 = sum(int(c) << (3 * i) for i, c in enumerate(codes[0, :10]))
    w1 = sum(int(c) << (3 * i) for i, c in enumerate(codes[0, 10:]))
    packed = np.array([[w0, w1]], np.uint32).view(np.int32)
    # K=12 is the rare width where both generations need 2 words: the writer's version decides
    assert ct.detect_packing(2, 12, 3, version="0.16.0") == "legacy"
    assert ct.detect_packing(2, 12, 3, version="0.19.0") == "dense"
    assert ct.detect_packing(2, 12, 3) == "dense"
    got = ct.codes_pack_quantized(packed, [1, 12], bits=3, packing="legacy")
    np.testing.assert_array_equal(got, codes)
    np.testing.assert_array_equal(ct.pack_quantized(codes.astype(np.int16) - 4, 3, "legacy"),
                                  packed)
    # a realistic K: widths differ, auto-detection needs no version
    assert ct.detect_packing(39, 384, 3) == "legacy" and ct.detect_packing(36, 384, 3) == "dense"


def test_dense_layout_crosses_words():
    # ≥ 0.17: value k at stream bits [3k, 3k+3); value 10 straddles words 0 and 1.
    codes = np.zeros((1, 32), np.uint8)
    codes[0, 10] = 0b111
    packed = ct.pack_quantized(codes.astype(np.int16) - 4, 3, "dense")
    assert packed.shape == (1, 3)
    words = packed.view(np.uint32)[0]
    assert words.tolist() == [0b11 << 30, 1, 0]             # bits 30, 31 of word 0 + bit 0 of 1
    np.testing.assert_array_equal(ct.codes_pack_quantized(packed, (1, 32), bits=3), codes)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("packing", ["dense", "legacy"])
def test_pack_roundtrip_all_widths(bits, packing):
    rng = np.random.default_rng(bits)
    signed = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=(5, 77))
    packed = ct.pack_quantized(signed, bits, packing)
    assert packed.dtype == np.int32
    codes = ct.codes_pack_quantized(packed, (5, 77), bits=bits, packing=packing)
    np.testing.assert_array_equal(codes.astype(np.int64) - (1 << (bits - 1)), signed)


def test_unpacked_zero_points_equal_packed():
    # compressed-tensors < 0.9.4 stored signed zero points unpacked [N, K/G]; the same layer
    # must decode identically from either form.
    t, cfg, exp = load("ct_w4a16_asym")
    zp_packed = t["weight_zero_point"]
    N, ng = t["weight_scale"].shape
    assert zp_packed.shape == (N * 4 // 32, ng)
    zp_signed = (ct.codes_pack_quantized(np.ascontiguousarray(zp_packed.T), (ng, N), bits=4)
                 .T.astype(np.int8) - 8)
    assert len(np.unique(zp_signed)) > 1
    np.testing.assert_array_equal(ct.pack_zero_points(zp_signed, 4), zp_packed)
    out = ct.decode_pack_quantized(t["weight_packed"], t["weight_scale"], t["weight_shape"],
                                   bits=4, group_size=128, weight_zero_point=zp_signed)
    np.testing.assert_array_equal(as_library(out, exp), np.asarray(exp))


def test_g_idx_act_order_matters_and_minus_one_is_ignored():
    t, cfg, exp = load("ct016_w4a16_actorder")
    gi = t["weight_g_idx"]
    assert not np.array_equal(gi, np.arange(gi.size) // 128)      # really permuted
    kw = dict(bits=4, group_size=128, weight_zero_point=t["weight_zero_point"])
    with_g = ct.decode_pack_quantized(t["weight_packed"], t["weight_scale"],
                                      t["weight_shape"], g_idx=gi, **kw)
    np.testing.assert_array_equal(as_library(with_g, exp), np.asarray(exp))
    without = ct.decode_pack_quantized(t["weight_packed"], t["weight_scale"],
                                       t["weight_shape"], **kw)
    assert not np.array_equal(as_library(without, exp), np.asarray(exp))
    # the library treats an uninitialised g_idx (-1) as "no act-order"
    minus = ct.decode_pack_quantized(t["weight_packed"], t["weight_scale"], t["weight_shape"],
                                     g_idx=np.full_like(gi, -1), **kw)
    np.testing.assert_array_equal(minus, without)


def test_codes_for_histograms():
    t, cfg, exp = load("ct_w4a16_g128")
    codes = ct.codes_pack_quantized(t["weight_packed"], t["weight_shape"], bits=4)
    assert codes.dtype == np.uint8 and codes.shape == (64, 384)
    hist = np.bincount(codes.ravel(), minlength=16)
    assert hist.sum() == 64 * 384 and hist[8] > 0 and hist[0] + hist[15] > 0
    # code 8 is a real zero (signed 0)
    np.testing.assert_array_equal(exp[codes == 8], 0)


def test_e2m1_table_matches_ml_dtypes():
    ref = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    np.testing.assert_array_equal(ct.E2M1_VALUES, ref)
    assert np.array_equal(np.signbit(ct.E2M1_VALUES), np.signbit(ref))


def test_nvfp4_global_scale_is_a_divisor():
    packed = np.array([[0x21, 0x00]], np.uint8)       # codes 1, 2, 0, 0 (low nibble first)
    scale = np.array([[2.0]], ml_dtypes.float8_e4m3fn)
    out = ct.decode_nvfp4(packed, scale, np.array([4.0], np.float32), group_size=4)
    np.testing.assert_array_equal(out, [[0.25, 0.5, 0.0, 0.0]])


def test_mxfp4_exponent_scales():
    packed = np.array([[0x77] * 16], np.uint8)         # every value 6.0
    out = ct.decode_mxfp4(packed, np.array([[125]], np.uint8))
    np.testing.assert_array_equal(out, np.full((1, 32), 1.5, np.float32))
    assert np.isinf(ct.decode_mxfp4(packed, np.array([[255]], np.uint8))).all()
    with pytest.raises(LayerError, match="E8M0"):
        ct.decode_mxfp4(packed, np.array([[0.25]], np.float32))


def test_naive_block_partial_tiles_and_zero_points():
    q = np.arange(-6, 6, dtype=np.int8).reshape(3, 4)
    s = np.array([[1.0, 2.0], [4.0, 8.0]], ml_dtypes.bfloat16)
    zp = np.array([[0, 1], [2, 3]], np.int8)
    out = ct.decode_naive(q, s, zp, strategy="block", block_structure=[2, 3])
    want = np.empty((3, 4), np.float32)
    for n in range(3):
        for k in range(4):
            want[n, k] = (q[n, k] - zp[n // 2, k // 3]) * float(s[n // 2, k // 3])
    np.testing.assert_array_equal(out, want)


def test_returns_the_exact_product_not_the_libraries_cast():
    # bf16 scale: torch rounds (q - zp) * s to bf16; quantscope keeps the exact float32 product.
    s = np.array([[1.0078125]], ml_dtypes.bfloat16)    # 1 + 2^-7
    q = np.array([[127]], np.int8)
    out = ct.decode_naive(q, s, strategy="channel")
    assert out[0, 0] == np.float32(127 * 1.0078125)
    assert round_to(out.copy(), ml_dtypes.bfloat16)[0, 0] != out[0, 0]


def test_wrong_shapes_raise_helpful_errors():
    t, cfg, exp = load("ct_w3a16_asym_fp16")
    bad = np.zeros((40, 48), np.int32)
    with pytest.raises(LayerError) as ei:
        ct.decode_pack_quantized(bad, t["weight_scale"], t["weight_shape"], bits=3,
                                 group_size=128, name=LAYER)
    msg = str(ei.value)
    assert "48 columns" in msg and "36" in msg and "39" in msg and LAYER in msg
    with pytest.raises(LayerError, match="weight_scale has shape"):
        ct.decode_pack_quantized(t["weight_packed"], t["weight_scale"][:, :2],
                                 t["weight_shape"], bits=3, group_size=128)
    with pytest.raises(LayerError, match="weight_zero_point has shape"):
        ct.decode_pack_quantized(t["weight_packed"], t["weight_scale"], t["weight_shape"],
                                 bits=3, group_size=128,
                                 weight_zero_point=t["weight_zero_point"][:3])
    with pytest.raises(LayerError, match="weight_g_idx has"):
        ct.decode_pack_quantized(t["weight_packed"], t["weight_scale"], t["weight_shape"],
                                 bits=3, group_size=128, g_idx=np.zeros(10, np.int32))
    with pytest.raises(LayerError, match="block_structure"):
        ct.decode_naive(np.zeros((200, 320), np.int8), np.ones((1, 3), np.float32),
                        strategy="block", block_structure=[128, 128])
    with pytest.raises(LayerError, match="I32"):
        ct.codes_pack_quantized(np.zeros((40, 36), np.float32), (40, 384), bits=3)


@pytest.mark.parametrize("fixture", ["llmcompressor-w4a16", "llmcompressor-w4a16-asym"])
def test_a_pack_quantized_file_without_any_config_is_read_off_its_shapes(tmp_path, fixture):
    """The safetensors file alone (no config.json): every layer was "compressed-tensors config
    gives no num_bits", of a config that was not there; the shapes say 4 bit / group 128."""
    import shutil
    from pathlib import Path

    from quantscope.backend.checkpoint import open_checkpoint
    from quantscope.backend.engines import NumpyEngine
    from quantscope.backend.schemes import analyze
    src = Path(__file__).parent / "fixtures" / "real" / fixture
    shutil.copy(src / "model.safetensors", tmp_path / "model.safetensors")
    m = analyze(open_checkpoint(tmp_path))
    decoded = np.load(src / "decoded.npz")
    for name in decoded.files:
        lay = m.layers[name]
        assert (lay.scheme, lay.bits, lay.group_size) == ("ct-pack", 4, 128) and lay.decodable, lay.problem
        assert "no config: inferred from shapes: 4 bit, group 128" in lay.source
        np.testing.assert_array_equal(NumpyEngine().dequantize(m, lay), decoded[name])  # llm-compressor's own


@pytest.mark.parametrize("case, packing", [("ct_w3a16_asym_fp16", "dense"), ("ct016_w3a16_asym_legacy", "legacy")])
def test_a_3_bit_file_without_any_config_is_read_off_its_shapes_in_either_packing(tmp_path, case, packing):
    """3 bits pack densely since compressed-tensors 0.17 and 10 to a word before: the shapes'
    reading takes both, as the decode does (only the word-per-10 width was taken)."""
    import shutil

    from quantscope.backend.checkpoint import open_checkpoint
    from quantscope.backend.engines import NumpyEngine
    from quantscope.backend.schemes import analyze
    src = GOLDEN / case
    shutil.copy(src / "model.safetensors", tmp_path / "model.safetensors")
    m = analyze(open_checkpoint(tmp_path))
    lay = m.layers["model.layers.0.mlp.up_proj"]
    assert (lay.bits, lay.group_size, lay.settings["packing"]) == (3, 128, packing) and lay.decodable
    exp = np.load(src / "expected.npz")
    lib = {"torch.float16": np.float16, "torch.bfloat16": ml_dtypes.bfloat16}[str(exp["library_dtype"])]
    got = NumpyEngine().dequantize(m, lay).astype(lib).astype(np.float32)  # (the library's dtype, as its decode)
    np.testing.assert_array_equal(got, exp["model.layers.0.mlp.up_proj.weight"].astype(np.float32))
