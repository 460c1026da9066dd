"""Bailing-MoE (Ling) with ``norm_head``: mlx-lm's conversion divides lm_head's columns by their
norms (transformers normalizes the head at run time) and moves the router from mlp.gate to
mlp.gate.gate_proj. compare multiplies the norms back in and pairs the routers; doctor names the
file mlx-lm's own load breaks (it normalizes a quantized head again, its packed words as
numbers); convert keeps lm_head and the router dense so mlx-lm loads its output. Real files:
tests/fixtures/real/bailing-bf16 and mlx_lm.convert's 4-bit of it (make/mlxlm_bailing_make.py)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from quantscope.backend.checkpoint import open_checkpoint
from quantscope.backend.compare import sweep
from quantscope.backend.schemes import analyze

REAL = Path(__file__).parent / "fixtures" / "real"
HF, MLX = REAL / "bailing-bf16", REAL / "mlxlm-bailing-q4-g32"


def _mx_st(folder: Path) -> dict:
    mx = pytest.importorskip("mlx.core")
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def _col_norms(mx, w):
    """As mlx-lm's sanitize computes them: float32 column norms, plus 1e-7."""
    return mx.linalg.norm(w.astype(mx.float32), axis=0, keepdims=True) + 1e-7


def test_the_fixture_is_mlx_lms_normalized_head_and_moved_router():
    """mx.quantize of the reference's lm_head over its column norms, and of its mlp.gate at 8 bits
    in groups of 64, gives the variant's stored tensors bit for bit."""
    mx = pytest.importorskip("mlx.core")
    ref, var = _mx_st(HF), _mx_st(MLX)
    w = ref["lm_head.weight"]
    normed = (w / _col_norms(mx, w)).astype(w.dtype)
    for got, name in ((mx.quantize(normed, group_size=32, bits=4), "lm_head"),
                      (mx.quantize(ref["model.layers.1.mlp.gate.weight"], group_size=64, bits=8),
                       "model.layers.1.mlp.gate.gate_proj")):
        for a, part in zip(got, ("weight", "scales", "biases")):
            assert np.array_equal(np.array(a.view(mx.uint32) if part == "weight" else a.view(mx.uint16)),
                                  np.array(var[f"{name}.{part}"].view(mx.uint32 if part == "weight" else mx.uint16)))


def test_compare_multiplies_the_norms_back_in_and_pairs_the_routers():
    """lm_head measured with the reference's own column norms multiplied back into the variant:
    its figure numpy's on mx.dequantize, the raw one (0.47) kept as rel_fro_raw; the router, one
    module deeper in the variant, paired; nothing left unmatched; no "times a constant" warning."""
    mx = pytest.importorskip("mlx.core")
    ref, var = analyze(open_checkpoint(HF)), analyze(open_checkpoint(MLX))
    res = sweep(ref, {"mlx": var})
    assert res.unmatched == [] and not res.implausible() and "mlx" not in res.warnings()
    rows = {r.name: r for r in res.rows}
    st, w = _mx_st(MLX), _mx_st(HF)["lm_head.weight"]
    deq = mx.dequantize(st["lm_head.weight"], st["lm_head.scales"], st["lm_head.biases"], group_size=32, bits=4)
    got = np.array(deq.astype(mx.float32), np.float64) * np.array(_col_norms(mx, w), np.float64)
    ref_w = np.array(w.astype(mx.float32), np.float64)
    want = np.linalg.norm(got - ref_w) / np.linalg.norm(ref_w)
    head = rows["lm_head"]
    assert head.rel_fro == pytest.approx(want, rel=1e-6) and 0.05 < want < 0.12
    assert head.smoothing == "norm-head:columns" and head.rel_fro_raw > 0.4
    gate = rows["model.layers.1.mlp.gate"]
    assert gate.variant_layer == "model.layers.1.mlp.gate.gate_proj" and gate.bits == 8 and gate.rel_fro < 0.02


def test_a_head_left_as_it_is_is_not_taken_for_normalized(tmp_path):
    """An MLX file whose lm_head is quantized as the reference stores it (no normalization) is
    measured as it is, though the reference asks for norm_head: the first rows' factors say so."""
    src = tmp_path / "src"
    shutil.copytree(HF, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "norm_head": False}))
    from quantscope.backend.convert import convert
    convert(str(src), str(tmp_path / "out"), to="mlx", bits=4, group_size=32)
    out = analyze(open_checkpoint(tmp_path / "out"))
    assert out.layers["lm_head"].quantized
    res = sweep(analyze(open_checkpoint(HF)), {"plain": out})
    head = {r.name: r for r in res.rows}["lm_head"]
    assert head.smoothing == "none" and 0.05 < head.rel_fro < 0.12


def test_doctor_names_the_head_mlx_lm_breaks_and_convert_keeps_it_dense(tmp_path):
    """mlx_lm.convert's own file: an error (its load turns the packed head to zeros). quantscope's
    conversion keeps lm_head and the router dense, saying why, and doctor finds nothing."""
    from quantscope.backend.convert import convert
    from quantscope.backend.doctor import diagnose
    found = [f for f in diagnose(str(MLX)) if f.rule == "mlx.norm-head-quantized"]
    assert len(found) == 1 and found[0].severity == "error" and "zeros" in found[0].message
    report = convert(str(HF), str(tmp_path / "out"), to="mlx", bits=4, group_size=32)
    acts = {r.path: r.action for r in report.layers}
    assert acts["lm_head"].startswith("kept dense (norm_head: mlx-lm's bailing_moe loader divides lm_head")
    assert acts["model.layers.1.mlp.gate"].startswith("kept dense (mlx-lm's bailing_moe loader takes mlp.gate by its")
    assert not [f for f in diagnose(str(tmp_path / "out")) if f.severity == "error"]


BC_HF, BC_MLX = REAL / "baichuanm1-bf16", REAL / "mlxlm-baichuanm1-q4-g32"


def test_baichuan_m1s_head_rows_normalized_by_mlx_lm_are_measured_and_written_alike(tmp_path):
    """Baichuan-M1: mlx-lm's conversion divides each row of lm_head by its norm before
    quantizing. compare multiplies the reference's row norms back in (norm-head:rows, numpy's
    figure on mx.dequantize); convert normalizes the rows as mlx-lm does, every tensor then equal
    to mlx_lm.convert's (before, its head was written unnormalized, and mlx-lm, which takes a
    quantized head as normalized, computed other logits)."""
    mx = pytest.importorskip("mlx.core")
    from quantscope.backend.convert import convert
    res = sweep(analyze(open_checkpoint(BC_HF)), {"mlx": analyze(open_checkpoint(BC_MLX))})
    assert res.unmatched == [] and "mlx" not in res.warnings()
    head = {r.name: r for r in res.rows}["lm_head"]
    st, w = _mx_st(BC_MLX), _mx_st(BC_HF)["lm_head.weight"]
    deq = mx.dequantize(st["lm_head.weight"], st["lm_head.scales"], st["lm_head.biases"], group_size=32, bits=4)
    norms = mx.linalg.norm(w.astype(mx.float32), axis=-1, keepdims=True) + 1e-7
    got = np.array(deq.astype(mx.float32), np.float64) * np.array(norms, np.float64)
    ref_w = np.array(w.astype(mx.float32), np.float64)
    assert head.rel_fro == pytest.approx(np.linalg.norm(got - ref_w) / np.linalg.norm(ref_w), rel=1e-6)
    assert head.smoothing == "norm-head:rows" and head.rel_fro_raw > 0.5 and head.rel_fro < 0.12
    convert(str(BC_HF), str(tmp_path / "out"), to="mlx", bits=4, group_size=32)
    ours, theirs = _mx_st(tmp_path / "out"), _mx_st(BC_MLX)
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        a, b = ours[k], v
        assert a.dtype == b.dtype and a.shape == b.shape, k
        view = mx.uint32 if b.dtype == mx.uint32 else mx.uint16
        assert np.array_equal(np.array(a.view(view)), np.array(b.view(view))), k


@pytest.mark.parametrize("plain, normed, which", [(HF, MLX, "columns"), (BC_HF, BC_MLX, "rows")])
def test_the_normalized_side_as_reference_normalizes_the_variant(plain, normed, which):
    """mlx-lm's file as the reference, the transformers one as the variant: the variant's head
    divided by its own norms (norm-head-in:, "normalization matched"), about 0.08 as the other
    way round, not 0.32 / 0.78 and a "times a constant" warning."""
    from quantscope.backend.compare import smoothing_action
    res = sweep(analyze(open_checkpoint(normed)), {"hf": analyze(open_checkpoint(plain))})
    head = {r.name: r for r in res.rows}["lm_head"]
    assert head.smoothing == f"norm-head-in:{which}" and 0.05 < head.rel_fro < 0.12
    assert "hf" not in res.warnings() and not res.implausible()
    assert smoothing_action(head.smoothing) == "normalization matched"
    assert smoothing_action(f"norm-head:{which}") == "normalization undone"
    assert smoothing_action("mup-in:x+norm-head-in:rows") == "multiplier matched"


def test_a_head_in_a_block_float_mode_is_told_normalized_too(tmp_path):
    """convert --mode mxfp4 of Baichuan-M1 normalizes the head's rows; compare tells so from the
    decoded first rows whatever the format (it had read 3.31, "implausible")."""
    from quantscope.backend.convert import convert
    convert(str(BC_HF), str(tmp_path / "fp4"), to="mlx", mode="mxfp4")
    res = sweep(analyze(open_checkpoint(BC_HF)), {"fp4": analyze(open_checkpoint(tmp_path / "fp4"))})
    head = {r.name: r for r in res.rows}["lm_head"]
    assert head.smoothing == "norm-head:rows" and 0.05 < head.rel_fro < 0.2 and not res.implausible()


def test_an_unnormalized_quantized_head_is_named_and_mended(tmp_path):
    """An MLX Baichuan-M1 whose quantized head's rows are not of norm 1 (what convert wrote before):
    doctor's mlx.head-not-normalized; convert decodes, normalizes and quantizes it again (no
    exact copy), after which doctor finds nothing and compare reads about 0.09, as it measures."""
    mx = pytest.importorskip("mlx.core")
    from quantscope.backend.convert import convert
    from quantscope.backend.doctor import diagnose
    bad = tmp_path / "bad"
    shutil.copytree(BC_MLX, bad)
    st = _mx_st(BC_MLX)
    w, s, b = mx.quantize(_mx_st(BC_HF)["lm_head.weight"], group_size=32, bits=4)
    st.update({"lm_head.weight": w, "lm_head.scales": s, "lm_head.biases": b})
    mx.save_safetensors(str(bad / "model.safetensors"), st, metadata={"format": "mlx"})
    assert [f.rule for f in diagnose(str(bad)) if f.severity == "error"] == ["mlx.head-not-normalized"]
    report = convert(str(bad), str(tmp_path / "out"), to="mlx")
    acts = {r.path: r.action for r in report.layers}
    assert acts["lm_head"].startswith("requantized") and "rows normalized" in acts["lm_head"]
    assert acts["model.layers.0.mlp.up_proj"] == "copied exact"
    assert not [f for f in diagnose(str(tmp_path / "out")) if f.severity == "error"]
    head = {r.name: r for r in sweep(analyze(open_checkpoint(BC_HF)),
                                     {"o": analyze(open_checkpoint(tmp_path / "out"))}).rows}["lm_head"]
    assert head.smoothing == "norm-head:rows" and 0.05 < head.rel_fro < 0.12


def test_the_router_pairs_from_mlx_lms_side_too():
    """mlx-lm's file as the reference: its mlp.gate.gate_proj paired with transformers' mlp.gate."""
    res = sweep(analyze(open_checkpoint(MLX)), {"hf": analyze(open_checkpoint(HF))})
    gate = {r.name: r for r in res.rows}["model.layers.1.mlp.gate.gate_proj"]
    assert gate.variant_layer == "model.layers.1.mlp.gate" and gate.rel_fro < 0.02 and res.unmatched == []
