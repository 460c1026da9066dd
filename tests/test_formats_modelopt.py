"""NVIDIA ModelOpt's NVFP4 export (``quant_method: "modelopt"`` / ``hf_quant_config.json``).

The expected values are computed here from the format's definition, independently of
quantscope's decoders: the OCP E2M1 table written out, E4M3 through ml_dtypes, and ModelOpt's
``NVFP4QTensor.dequantize`` order of operations (``E2M1[q] * f32(f32(E4M3(s)) * weight_scale_2)``;
formats.md §1.6, R11). The packing is ModelOpt's ``quantize``: ``(q[..., 1::2] << 4) | q[..., 0::2]``.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from helpers import write_st
from quantscope.backend.checkpoint import open_checkpoint
from quantscope.backend.doctor import diagnose
from quantscope.backend.engines import get_engine
from quantscope.backend.schemes import analyze

pytestmark = pytest.mark.usefixtures("kernel_path")

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
DOWN = "model.layers.0.mlp.down_proj"
HEAD = "lm_head"


def _layer(rng, n, k, amax=0.05):
    """(packed U8 [n, k/2], E4M3 scales [n, k/16], weight_scale_2, expected float32 [n, k])."""
    q = rng.integers(0, 16, (n, k)).astype(np.uint8)
    packed = ((q[:, 1::2] << 4) | q[:, 0::2]).astype(np.uint8)
    ws2 = np.float32(amax / (6 * 448))
    scale = rng.uniform(1, 448, (n, k // 16)).astype(ml_dtypes.float8_e4m3fn)
    block = scale.astype(np.float32) * ws2  # float32 product, as ModelOpt's
    expect = np.array(E2M1, np.float32)[q] * np.repeat(block, 16, axis=1)
    return packed, scale, ws2, expect


def _checkpoint(folder, tensors, *, hf_only=False, exclude=("lm_head",), algo="NVFP4"):
    folder.mkdir()
    write_st(folder / "model.safetensors", tensors, {"format": "pt"})
    q = {"quant_algo": algo, "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": list(exclude)}
    cfg = {"model_type": "llama", "tie_word_embeddings": False}
    if not hf_only:
        cfg["quantization_config"] = {"quant_method": "modelopt", **q}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt", "version": "0.33"},
                                                             "quantization": q}))
    return folder


@pytest.mark.parametrize("hf_only", [False, True])
@pytest.mark.parametrize("engine", ["numpy", "mlx"])
def test_nvfp4_decodes_as_modelopt_does(tmp_path, hf_only, engine):
    rng = np.random.default_rng(7)
    packed, scale, ws2, expect = _layer(rng, 48, 256)
    head = rng.standard_normal((32, 256)).astype(ml_dtypes.bfloat16)
    d = _checkpoint(tmp_path / "m", {f"{DOWN}.weight": packed, f"{DOWN}.weight_scale": scale,
                                     f"{DOWN}.weight_scale_2": np.array(ws2, np.float32),
                                     f"{DOWN}.input_scale": np.array(0.02, np.float32),
                                     f"{HEAD}.weight": head}, hf_only=hf_only)
    m = analyze(open_checkpoint(d))
    lay = m.layers[DOWN]
    assert (lay.scheme, lay.bits, lay.group_size, tuple(lay.shape), lay.problem) == \
        ("modelopt-nvfp4", 4, 16, (48, 256), None)
    assert m.config.kind == "modelopt" and "NVFP4" in lay.source
    out = get_engine(engine).dequantize(m, lay)
    np.testing.assert_array_equal(out, expect)
    assert m.config.effective(HEAD).quantized is False and m.layers[HEAD].scheme == "dense"
    assert not [f for f in diagnose(d) if f.severity in ("error", "warning")]


def test_a_reciprocal_second_level_scale_is_found(tmp_path):
    # R11: weight_scale_2 stored as compressed-tensors' divisor (6·448/amax) instead of ModelOpt's
    # multiplier: weights off by ~1e9, decoded "fine"
    rng = np.random.default_rng(8)
    packed, scale, ws2, _ = _layer(rng, 32, 128)
    d = _checkpoint(tmp_path / "m", {f"{DOWN}.weight": packed, f"{DOWN}.weight_scale": scale,
                                     f"{DOWN}.weight_scale_2": np.array(1 / ws2, np.float32)})
    hits = [f for f in diagnose(d) if f.rule == "nvfp4.global-scale"]
    assert hits and "multiplier" in hits[0].message and hits[0].tensor == f"{DOWN}.weight_scale_2"


@pytest.mark.parametrize("break_it,says", [
    ("scale_shape", "one scale per 16"), ("scale_dtype", "F8_E4M3"), ("s2_shape", "one float32 multiplier")])
def test_damaged_layers_are_refused_with_the_reason(tmp_path, break_it, says):
    rng = np.random.default_rng(9)
    packed, scale, ws2, _ = _layer(rng, 32, 128)
    s2 = np.array(ws2, np.float32)
    if break_it == "scale_shape":
        scale = scale[:, :4]
    elif break_it == "scale_dtype":
        scale = scale.astype(np.float32)
    else:
        s2 = np.full(3, ws2, np.float32)
    d = _checkpoint(tmp_path / "m", {f"{DOWN}.weight": packed, f"{DOWN}.weight_scale": scale,
                                     f"{DOWN}.weight_scale_2": s2})
    lay = analyze(open_checkpoint(d)).layers[DOWN]
    assert lay.scheme == "modelopt-nvfp4" and not lay.decodable and says in lay.problem
    assert any(f.severity == "error" and f.layer == DOWN for f in diagnose(d))


def test_compared_against_its_reference(tmp_path):
    """A ModelOpt variant in a comparison: its error is that of its decoded values."""
    from quantscope.backend.compare import sweep
    rng = np.random.default_rng(10)
    packed, scale, ws2, expect = _layer(rng, 64, 256)
    ref = (expect + rng.standard_normal(expect.shape).astype(np.float32) * np.float32(1e-3)).astype(ml_dtypes.bfloat16)
    (tmp_path / "ref").mkdir()
    write_st(tmp_path / "ref" / "model.safetensors", {f"{DOWN}.weight": ref}, {"format": "pt"})
    (tmp_path / "ref" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    var = _checkpoint(tmp_path / "var", {f"{DOWN}.weight": packed, f"{DOWN}.weight_scale": scale,
                                         f"{DOWN}.weight_scale_2": np.array(ws2, np.float32)})
    res = sweep(analyze(open_checkpoint(tmp_path / "ref")), {"modelopt": analyze(open_checkpoint(var))},
                engine="numpy")
    (row,) = res.rows
    w = ref.astype(np.float64)
    assert row.rel_fro == pytest.approx(np.linalg.norm(expect - w) / np.linalg.norm(w), rel=1e-9)
    # the Code usage view: each of the 16 FP4 codes counted, in the order of their values (-0
    # beside +0), straight from the packed bytes (the view was empty for this scheme)
    from quantscope.backend.compare import layer_detail
    det = layer_detail(analyze(open_checkpoint(tmp_path / "ref")), {"modelopt": analyze(open_checkpoint(var))}, DOWN,
                       engine="numpy")
    codes = np.stack([packed & 15, packed >> 4], -1).reshape(-1)
    by_value = sorted(range(16), key=lambda c: (E2M1[c], not np.signbit(E2M1[c])))
    np.testing.assert_array_equal(det.code_counts["modelopt"], np.bincount(codes, minlength=16)[by_value])
    assert det.float_codes["modelopt"] == (-6.0, 6.0)


def test_what_if_starts_in_the_layers_own_block_float_mode(tmp_path, qtbot):
    """The config panel's What if offered affine 4 bit / 64 for an NVFP4 layer."""
    from quantscope.widgets.quant_config_panel import QuantConfigPanel
    rng = np.random.default_rng(11)
    packed, scale, ws2, _ = _layer(rng, 32, 128)
    m = analyze(open_checkpoint(_checkpoint(tmp_path / "m", {
        f"{DOWN}.weight": packed, f"{DOWN}.weight_scale": scale, f"{DOWN}.weight_scale_2": np.array(ws2, np.float32)})))
    panel = QuantConfigPanel()
    qtbot.addWidget(panel)
    panel.set_checkpoint("mo", m)
    panel.set_layer(DOWN, {"mo": m})
    assert panel.mode.currentText() == "nvfp4"
    assert (panel.bits.currentText(), panel.group.currentText()) == ("4", "16")


def test_scales_stored_as_bytes_and_a_dense_conversion(tmp_path):
    """E4M3 scales stored as U8 bytes are read as E4M3 (detected, then refused by the decoder);
    converted to dense, ModelOpt's hf_quant_config.json is not copied (the dense output read as
    NVFP4 again, by quantscope and by vLLM's fallback to that file)."""
    from quantscope.backend.convert import convert
    rng = np.random.default_rng(12)
    packed, scale, ws2, expect = _layer(rng, 32, 128)
    d = _checkpoint(tmp_path / "m", {f"{DOWN}.weight": packed, f"{DOWN}.weight_scale": scale.view(np.uint8),
                                     f"{DOWN}.weight_scale_2": np.array(ws2, np.float32)})
    m = analyze(open_checkpoint(d))
    np.testing.assert_array_equal(get_engine("numpy").dequantize(m, m.layers[DOWN]), expect)
    convert(d, tmp_path / "dense", to="dense", dtype="f32")
    assert not (tmp_path / "dense" / "hf_quant_config.json").exists()
    out = analyze(open_checkpoint(tmp_path / "dense"))
    assert out.config.kind is None and out.layers[DOWN].scheme == "dense"
    np.testing.assert_array_equal(get_engine("numpy").dequantize(out, out.layers[DOWN]), expect)
