"""bitsandbytes decoders against bitsandbytes 0.50.2's own dequantize (CPU backend).

tests/fixtures/golden/bnb_* were written by make/bnb_make.py from bnb.nn.Linear4bit /
Linear8bitLt state dicts; ``weight_f32`` is dequantize_4bit with a float32 quant_state (the
product before the module-dtype cast), ``weight`` the module-dtype (bf16) result.
"""

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from helpers import load_npz
from quantscope.backend.errors import LayerError
from quantscope.backend.formats import bnb
from quantscope.backend.formats.common import round_to
from quantscope.backend.safetensors_file import SafetensorsFile

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
LAYER = "model.layers.0.mlp.up_proj"
CASES4 = sorted(p.name for p in GOLDEN.iterdir() if p.name.startswith("bnb_") and "int8" not in p.name)


def load(case):
    d = GOLDEN / case
    f = SafetensorsFile(d / "model.safetensors")
    t = {n[len(LAYER) + 1:]: f.read(n) for n in f.names}
    infos = {n: f.info(n) for n in f.names}
    f.close()
    return t, infos, json.loads((d / "config.json").read_text())["quantization_config"], \
        load_npz(d / "expected.npz")


def qs_of(t):
    (key,) = [k for k in t if k.startswith("weight.quant_state.bitsandbytes__")]
    return bnb.parse_quant_state(t[key])


def test_cases_present():
    assert set(CASES4) >= {"bnb_nf4", "bnb_nf4_dq", "bnb_fp4", "bnb_fp4_dq",
                           "bnb_nf4_dq_bf16storage"}


@pytest.mark.parametrize("case", CASES4)
def test_4bit_matches_library(case):
    t, infos, cfg, exp = load(case)
    qs = qs_of(t)
    assert qs["quant_type"] == cfg["bnb_4bit_quant_type"]
    out = bnb.decode_4bit(t["weight"], t["weight.absmax"], t["weight.quant_map"], qs,
                          t.get("weight.nested_absmax"), t.get("weight.nested_quant_map"),
                          name=f"{LAYER}.weight")
    assert out.dtype == np.float32 and out.shape == tuple(qs["shape"]) and np.std(out) > 0
    np.testing.assert_array_equal(out, exp[f"{LAYER}.weight_f32"])
    np.testing.assert_array_equal(round_to(out.copy(), bnb.module_dtype(qs)), exp[f"{LAYER}.weight"])
    assert bnb.check_4bit_state(f"{LAYER}.weight", infos, qs) == []


def test_quant_storage_other_than_uint8():
    t, infos, cfg, exp = load("bnb_nf4_dq_bf16storage")
    assert t["weight"].dtype == np.dtype(ml_dtypes.bfloat16)     # bytes live in a bf16 tensor


def test_stored_code_books():
    t, *_ = load("bnb_nf4")
    np.testing.assert_array_equal(t["weight.quant_map"], bnb.NF4_VALUES)
    t, *_ = load("bnb_fp4")
    np.testing.assert_array_equal(t["weight.quant_map"], bnb.FP4_VALUES)


def test_high_nibble_first_and_odd_count():
    qs = {"shape": [3, 3], "blocksize": 64, "dtype": "float32", "quant_type": "nf4"}
    w = np.array([0x1F, 0x23, 0x45, 0x67, 0x80], np.uint8)   # 9 codes in 5 bytes
    np.testing.assert_array_equal(bnb.codes_4bit(w, qs).ravel(), [1, 15, 2, 3, 4, 5, 6, 7, 8])
    out = bnb.decode_4bit(w, np.array([2.0], np.float32), np.arange(16, dtype=np.float32), qs)
    np.testing.assert_array_equal(out.ravel(), 2 * np.array([1, 15, 2, 3, 4, 5, 6, 7, 8]))
    with pytest.raises(LayerError, match="needs 5"):
        bnb.codes_4bit(w[:4], qs)


def test_int8_matches_library_reciprocal():
    t, infos, cfg, exp = load("bnb_int8")
    out = bnb.decode_int8(t["weight"], t["SCB"])
    np.testing.assert_array_equal(out, exp[f"{LAYER}.weight"])
    # bitsandbytes multiplies by 1/127 (rounded to float32); a true division differs in places
    div = t["weight"].astype(np.float32) * t["SCB"][:, None] / np.float32(127)
    assert np.abs(div - out).max() <= 1e-6 * np.abs(out).max()
    with pytest.raises(LayerError, match="SCB has"):
        bnb.decode_int8(t["weight"], t["SCB"][:5])


def test_check_4bit_state_finds_problems():
    t, infos, cfg, exp = load("bnb_nf4_dq")
    qs = qs_of(t)
    w = f"{LAYER}.weight"
    partial = {k: v for k, v in infos.items() if not k.endswith("nested_quant_map")}
    probs = bnb.check_4bit_state(w, partial, qs)
    assert any("all or none" in p for p in probs)
    bad = dict(qs, blocksize=128)
    assert any("absmax has 256 entries" in p for p in bnb.check_4bit_state(w, infos, bad))
    two = dict(infos)
    two[f"{w}.quant_state.bitsandbytes__fp4"] = infos[f"{w}.quant_state.bitsandbytes__nf4"]
    assert any("exactly one" in p for p in bnb.check_4bit_state(w, two))


def test_decode_4bit_errors():
    t, infos, cfg, exp = load("bnb_nf4_dq")
    qs = qs_of(t)
    with pytest.raises(LayerError, match="nested_absmax and nested_quant_map"):
        bnb.decode_4bit(t["weight"], t["weight.absmax"], t["weight.quant_map"], qs,
                        t["weight.nested_absmax"], None)
    with pytest.raises(LayerError, match="nested_absmax / nested_quant_map are missing"):
        bnb.decode_4bit(t["weight"], t["weight.absmax"], t["weight.quant_map"], qs)
    with pytest.raises(LayerError, match="absmax has 100 entries"):
        bnb.decode_4bit(t["weight"], t["weight.absmax"][:100], t["weight.quant_map"], qs,
                        t["weight.nested_absmax"], t["weight.nested_quant_map"])
    with pytest.raises(LayerError, match="JSON"):
        bnb.parse_quant_state(np.frombuffer(b"\xff{", np.uint8))


@pytest.mark.parametrize("fmt", [0, 1, 2, 3, 7])
def test_int8_weight_format_is_read(tmp_path, fmt):
    """formats.md §7.2: weight_format 0 is row-major; 1/2/3 (col32/col_turing/col_ampere) are old
    GPU-tiled layouts: decoding them row-major gave wrong weights and no word."""
    import json

    from helpers import write_st
    from quantscope.backend.checkpoint import open_checkpoint
    from quantscope.backend.doctor import diagnose
    from quantscope.backend.engines import get_engine
    from quantscope.backend.schemes import analyze
    rng = np.random.default_rng(fmt)
    q = rng.integers(-127, 128, (32, 64)).astype(np.int8)
    scb = rng.uniform(0.5, 3, 32).astype(np.float32)
    name = "model.layers.0.mlp.down_proj"
    d = tmp_path / "m"
    d.mkdir()
    write_st(d / "model.safetensors", {f"{name}.weight": q, f"{name}.SCB": scb,
                                       f"{name}.weight_format": np.array(fmt, np.uint8)})
    (d / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "bitsandbytes",
                                                                       "load_in_8bit": True}}))
    m = analyze(open_checkpoint(d))
    lay = m.layers[name]
    errors = [f for f in diagnose(d) if f.severity == "error" and f.layer == name]
    if fmt == 0:
        assert lay.problem is None and not errors
        # (bit-exact against bitsandbytes in test_int8_matches_library_reciprocal)
        np.testing.assert_allclose(get_engine("numpy").dequantize(m, lay), q * (scb[:, None] / 127.0), rtol=1e-6)
    else:
        assert not lay.decodable and f"weight_format {fmt}" in lay.problem and errors
        assert ("col" in lay.problem) == (fmt != 7)
