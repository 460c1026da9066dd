"""MLX layouts decoded by numpy must equal mx.dequantize bit for bit."""

import mlx.core as mx
import numpy as np
import pytest
from mx_util import to_np
from quantscope.backend.errors import LayerError
from quantscope.backend.formats.mlx import decode_affine, decode_fp

pytestmark = pytest.mark.usefixtures("kernel_path")

RNG = np.random.default_rng(7)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_affine_equals_mx_dequantize(dtype, bits, group):
    w = mx.array(RNG.standard_t(5, size=(24, 384)).astype(np.float32) * 0.02).astype(dtype)
    wq, s, b = mx.quantize(w, group_size=group, bits=bits)
    ref = to_np(mx.dequantize(wq, s, b, group_size=group, bits=bits).astype(mx.float32))
    got = decode_affine(to_np(wq), to_np(s), to_np(b), bits=bits, group_size=group)
    assert got.dtype == np.float32 and got.shape == (24, 384)
    np.testing.assert_array_equal(got, ref)


def test_affine_stacked_experts_rank3():
    w = mx.array(RNG.normal(size=(4, 32, 256)).astype(np.float32)).astype(mx.bfloat16)
    wq, s, b = mx.quantize(w, group_size=64, bits=3)
    assert wq.shape == (4, 32, 24)
    ref = to_np(mx.dequantize(wq, s, b, group_size=64, bits=3).astype(mx.float32))
    np.testing.assert_array_equal(decode_affine(to_np(wq), to_np(s), to_np(b), bits=3, group_size=64), ref)


@pytest.mark.parametrize("mode", ["mxfp4", "mxfp8", "nvfp4"])
def test_block_float_modes_equal_mx_dequantize(mode):
    w = mx.array(RNG.standard_t(4, size=(16, 512)).astype(np.float32))
    wq, s = mx.quantize(w, mode=mode)[:2]
    ref = to_np(mx.dequantize(wq, s, mode=mode, dtype=mx.float32))
    np.testing.assert_array_equal(decode_fp(to_np(wq), to_np(s), mode=mode), ref)


def test_nvfp4_global_scale_equals_mx_dequantize():
    w = mx.array(RNG.standard_t(4, size=(16, 512)).astype(np.float32) * 0.05)
    gs = mx.array(np.float32(41.25))
    wq, s = mx.quantize(w, mode="nvfp4", global_scale=gs)[:2]
    ref = to_np(mx.dequantize(wq, s, mode="nvfp4", global_scale=gs, dtype=mx.float32))
    np.testing.assert_array_equal(decode_fp(to_np(wq), to_np(s), mode="nvfp4", global_scale=41.25), ref)


def test_worked_examples_from_formats_md():
    # formats.md §2: mxfp4 row [0.5,1,1.5,2,3,4,6,-6, 0...] -> word0 0xF7654321, scale byte 127.
    w = np.zeros((1, 4), np.uint32)
    w[0, 0] = 0xF7654321
    got = decode_fp(w, np.full((1, 1), 127, np.uint8), mode="mxfp4")
    np.testing.assert_array_equal(got[0, :8], [0.5, 1, 1.5, 2, 3, 4, 6, -6])
    # mxfp8 row [1,-2,0.5,448, 0...] -> word0 0x7E30C038, scale 127.
    w8 = np.zeros((1, 8), np.uint32)
    w8[0, 0] = 0x7E30C038
    np.testing.assert_array_equal(decode_fp(w8, np.full((1, 1), 127, np.uint8), mode="mxfp8")[0, :4],
                                  [1, -2, 0.5, 448])
    # §1.2: a 3-bit row with codes 7,6,5,4,3,2,1,0,7,6,... is stored as 0x77053977, 0x39770539, 0x05397705.
    words = np.array([[0x77053977, 0x39770539, 0x05397705]], np.uint32)
    codes = decode_affine(words, np.ones((1, 1), np.float32), np.zeros((1, 1), np.float32), bits=3, group_size=32)
    np.testing.assert_array_equal(codes[0], [7 - (i % 8) for i in range(32)])


def test_shape_mismatch_is_a_clear_error():
    wq, s, b = mx.quantize(mx.array(RNG.normal(size=(8, 256)).astype(np.float32)), group_size=64, bits=4)
    with pytest.raises(LayerError, match="32·W/b ≠ G·S") as ei:
        decode_affine(to_np(wq), to_np(s), to_np(b), bits=8, group_size=64, name="model.layers.0.mlp.up_proj")
    assert "model.layers.0.mlp.up_proj" in str(ei.value)
    with pytest.raises(LayerError, match="biases"):
        decode_affine(to_np(wq), to_np(s), None, bits=4, group_size=64)
    with pytest.raises(LayerError, match="uint8"):
        decode_fp(to_np(wq), to_np(s), mode="mxfp4")


@pytest.mark.parametrize("mode,f8", [("mxfp4", "float8_e8m0fnu"), ("mxfp8", "float8_e8m0fnu"),
                                     ("nvfp4", "float8_e4m3fn")])
@pytest.mark.parametrize("engine", ["numpy", "mlx"])
def test_block_float_scales_typed_f8_read_as_mx_load_does(tmp_path, mode, f8, engine):
    """Scales stored as F8_E8M0 / F8_E4M3 rather than U8: ``mx.load`` gives them as uint8 (since
    0.32.0 / 0.30.3) and mlx-lm loads the layer. They were refused (a false R14 'not E8M0')."""
    import json

    import ml_dtypes
    from helpers import write_st
    from quantscope.backend.checkpoint import open_checkpoint
    from quantscope.backend.doctor import diagnose
    from quantscope.backend.engines import get_engine
    from quantscope.backend.schemes import analyze
    w = mx.array(RNG.normal(size=(32, 256)).astype(np.float32))
    wq, s = mx.quantize(w, mode=mode)[:2]
    name = "model.layers.0.mlp.up_proj"
    d = tmp_path / "m"
    d.mkdir()
    write_st(d / "model.safetensors", {f"{name}.weight": to_np(wq),
                                       f"{name}.scales": to_np(s).view(getattr(ml_dtypes, f8))})
    (d / "config.json").write_text(json.dumps({"quantization": {"group_size": 32 if mode != "nvfp4" else 16,
                                                                "bits": 4 if mode != "mxfp8" else 8, "mode": mode}}))
    loaded = mx.load(str(d / "model.safetensors"))
    assert loaded[f"{name}.scales"].dtype == mx.uint8
    expect = to_np(mx.dequantize(loaded[f"{name}.weight"], loaded[f"{name}.scales"], mode=mode, dtype=mx.float32))
    m = analyze(open_checkpoint(d))
    lay = m.layers[name]
    assert (lay.scheme, lay.problem) == (f"mlx-{mode}", None)
    np.testing.assert_array_equal(get_engine(engine).dequantize(m, lay), expect)
    assert not [f for f in diagnose(d) if f.severity == "error"]


@pytest.mark.parametrize("mode,bits,group", [("mxfp4", 4, 32), ("mxfp8", 8, 32), ("nvfp4", 4, 16)])
@pytest.mark.parametrize("engine", ["numpy", "mlx"])
def test_block_float_extreme_scale_bytes_and_zero_global_scale(tmp_path, mode, bits, group, engine):
    """Every scale byte, 0 and 255 included, and a stored nvfp4 global scale of 0, on both engines
    against mx.dequantize: the numpy engine gave NaN for E8M0 byte 255 (MLX: ±inf), and took a
    global scale of 0 for none (MLX: a layer of zeros)."""
    import json

    from helpers import write_st
    from quantscope.backend.checkpoint import open_checkpoint
    from quantscope.backend.engines import get_engine
    from quantscope.backend.schemes import analyze
    rng = np.random.default_rng(bits + group)
    n, k = 16, 512
    q = rng.integers(0, 2**32, (n, k * bits // 32), dtype=np.uint64).astype(np.uint32)
    s = np.arange(n * k // group, dtype=np.int64).reshape(n, k // group).astype(np.uint8)  # every byte
    name = "model.layers.0.mlp.up_proj"
    for gs in ([None, 0.0, 3.5] if mode == "nvfp4" else [None]):
        d = tmp_path / f"m{gs}"
        d.mkdir()
        parts = {f"{name}.weight": q, f"{name}.scales": s}
        if gs is not None:
            parts[f"{name}.global_scale"] = np.array([gs], np.float32)
        write_st(d / "model.safetensors", parts)
        (d / "config.json").write_text(json.dumps({"quantization": {"group_size": group, "bits": bits, "mode": mode}}))
        kw = {} if gs is None else {"global_scale": mx.array(np.float32(gs))}
        expect = to_np(mx.dequantize(mx.array(q), mx.array(s), group_size=group, bits=bits, mode=mode,
                                     dtype=mx.float32, **kw))
        m = analyze(open_checkpoint(d))
        out = get_engine(engine).dequantize(m, m.layers[name])
        np.testing.assert_array_equal(out, expect)  # (NaN where NaN, ±inf where ±inf)
        if gs == 0.0:
            assert not np.any(out[np.isfinite(out)])
