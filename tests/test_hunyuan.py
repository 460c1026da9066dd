"""Hunyuan's original checkpoints fuse the attention inputs into one ``qkv_proj`` whose rows go by
key/value group (its query heads, its key head, its value head) and the MLP inputs into
``gate_and_up_proj`` (up first); mlx-lm's conversion splits both. compare measures each fused
reference layer against the split parts, row for row; the Heads view splits the fused layer by
group. Real files: tests/fixtures/real/hunyuan-bf16 and mlx_lm.convert's 4-bit of it (made by
make/mlxlm_hunyuan_make.py)."""

import json
from pathlib import Path

import numpy as np
import pytest
from quantscope.backend.checkpoint import open_checkpoint
from quantscope.backend.compare import layer_detail, sweep
from quantscope.backend.heads import head_layout
from quantscope.backend.schemes import analyze

REAL = Path(__file__).parent / "fixtures" / "real"
HF, MLX = REAL / "hunyuan-bf16", REAL / "mlxlm-hunyuan-q4-g32"
CFG = json.loads((HF / "config.json").read_text())
H, KV, D = CFG["num_attention_heads"], CFG["num_key_value_heads"], CFG["hidden_size"] // CFG["num_attention_heads"]
G = H // KV


def _st(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _split(qkv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q, k and v of a grouped qkv_proj, as mlx-lm's hunyuan sanitize splits it (written out here)."""
    by = qkv.reshape(KV, G + 2, D, -1)
    return (by[:, :G].reshape(H * D, -1), by[:, G].reshape(KV * D, -1), by[:, G + 1].reshape(KV * D, -1))


def _dequant(mx, st: dict, name: str) -> np.ndarray:
    w, s, b = (mx.array(st[f"{name}.{k}"]) for k in ("weight", "scales", "biases"))
    return np.array(mx.dequantize(w, s, b, group_size=32, bits=4).astype(mx.float32), np.float64)


def test_the_fixture_is_mlx_lms_split_of_the_grouped_layers():
    """mx.quantize of the reference's rows, split by the documented layout, gives the variant's
    stored tensors bit for bit: the layout (not our reading of it) is what mlx-lm split."""
    mx = pytest.importorskip("mlx.core")
    import ml_dtypes
    ref, var = _st(HF), _st(MLX)
    for i in range(CFG["num_hidden_layers"]):
        a = f"model.layers.{i}.self_attn."
        parts = dict(zip(("q_proj", "k_proj", "v_proj"), _split(ref[a + "qkv_proj.weight"])))
        m = f"model.layers.{i}.mlp."
        up, gate = np.split(ref[m + "gate_and_up_proj.weight"], 2)
        parts.update({"up_proj": up, "gate_proj": gate})
        for proj, rows in parts.items():
            name = (a if proj.endswith(("q_proj", "k_proj", "v_proj")) else m) + proj
            w, s, b = mx.quantize(mx.array(rows.astype(ml_dtypes.bfloat16)), group_size=32, bits=4)
            assert np.array_equal(np.array(w), var[name + ".weight"]), name
            assert np.array_equal(np.array(s.view(mx.uint16)), var[name + ".scales"].view(np.uint16)), name
            assert np.array_equal(np.array(b.view(mx.uint16)), var[name + ".biases"].view(np.uint16)), name


def test_compare_measures_the_fused_layers_against_mlx_lms_split():
    """Every reference layer compared, none left out; qkv_proj's and gate_and_up_proj's figures
    equal numpy's on mx.dequantize of the parts, put back in the reference's row order. Before,
    qkv_proj was read as q | k | v (rel_fro 1.15, "implausible") and gate_and_up_proj unmatched."""
    mx = pytest.importorskip("mlx.core")
    ref, var = analyze(open_checkpoint(HF)), analyze(open_checkpoint(MLX))
    res = sweep(ref, {"mlx": var})
    assert res.unmatched == [] and not res.implausible()
    rows = {r.name: r for r in res.rows}
    st, w = _st(MLX), _st(HF)
    for i in range(CFG["num_hidden_layers"]):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        q, k, v = (_dequant(mx, st, a + p) for p in ("q_proj", "k_proj", "v_proj"))
        fused = np.concatenate([q.reshape(KV, G, D, -1), k.reshape(KV, 1, D, -1), v.reshape(KV, 1, D, -1)],
                               axis=1).reshape(-1, q.shape[1])
        up_gate = np.concatenate([_dequant(mx, st, m + "up_proj"), _dequant(mx, st, m + "gate_proj")])
        for name, got in ((a + "qkv_proj", fused), (m + "gate_and_up_proj", up_gate)):
            ref_w = w[name + ".weight"].astype(np.float64)
            want = np.linalg.norm(got - ref_w) / np.linalg.norm(ref_w)
            assert rows[name].rel_fro == pytest.approx(want, rel=1e-9), name
            assert 0.05 < want < 0.12  # (4 bits in groups of 32: the quantization's, not a misalignment's)


def test_heads_of_the_grouped_qkv_follow_its_rows():
    """Hunyuan's qkv_proj split per key/value group: q0–q3 k0 v0 q4–q7 k1 v1, each head's error
    equal to numpy's on those rows; a Phi-3 qkv_proj of the same size stays q | k | v."""
    mx = pytest.importorskip("mlx.core")
    name = "model.layers.1.self_attn.qkv_proj"
    lay = head_layout(CFG, name, ((H + 2 * KV) * D, CFG["hidden_size"]))
    assert G == 4 and KV == 2  # (a G unlike KV: a swap of the two shows)
    assert lay.labels() == ["q0", "q1", "q2", "q3", "k0", "v0", "q4", "q5", "q6", "q7", "k1", "v1"]
    assert lay.source.endswith("num_key_value_heads 2, rows by key/value group")
    phi = head_layout({**CFG, "model_type": "phi3"}, name, ((H + 2 * KV) * D, CFG["hidden_size"]))
    assert phi.labels() == [*(f"q{i}" for i in range(8)), "k0", "k1", "v0", "v1"]
    ref, var = analyze(open_checkpoint(HF)), analyze(open_checkpoint(MLX))
    d = layer_detail(ref, {"mlx": var}, name)
    assert d.heads.labels() == lay.labels()
    st, w = _st(MLX), _st(HF)
    a = "model.layers.1.self_attn."
    q, k, v = (_dequant(mx, st, a + p) for p in ("q_proj", "k_proj", "v_proj"))
    got = np.concatenate([q.reshape(KV, G, D, -1), k.reshape(KV, 1, D, -1), v.reshape(KV, 1, D, -1)],
                         axis=1).reshape(-1, q.shape[1])
    ref_w = w[name + ".weight"].astype(np.float64)
    want = [np.linalg.norm(got[j * D:(j + 1) * D] - ref_w[j * D:(j + 1) * D]) / np.linalg.norm(ref_w[j * D:(j + 1) * D])
            for j in range(H + 2 * KV)]
    np.testing.assert_allclose(d.head_error["mlx"], want, rtol=1e-9)


def test_the_split_side_as_reference_finds_its_rows_in_the_fused_one():
    """mlx-lm's split file as the reference, the original fused one as the variant (a dense copy):
    q/k/v and up/gate each found in their fused layer's rows: the bf16 rows against the 4-bit
    reference's decode, about 0.08, as the other way round."""
    ref, var = analyze(open_checkpoint(MLX)), analyze(open_checkpoint(HF))
    res = sweep(ref, {"hf": var})
    assert res.unmatched == [] and not res.implausible()
    rows = {r.name: r for r in res.rows}
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.gate_proj"):
        assert 0.05 < rows[f"model.layers.1.{proj}"].rel_fro < 0.12, proj
    assert rows["model.layers.1.self_attn.k_proj"].variant_layer == "model.layers.1.self_attn.qkv_proj"
    assert rows["model.layers.1.mlp.up_proj"].variant_layer == "model.layers.1.mlp.gate_and_up_proj"
    # the hint of a checkpoint asked for a part it stores fused says how its rows go
    with pytest.raises(Exception, match="per key/value group its query heads, its key head, its value head"):
        var.layer("model.layers.0.self_attn.q_proj")
    with pytest.raises(Exception, match="gate_and_up_proj, whose rows hold up_proj, then gate_proj"):
        var.layer("model.layers.0.mlp.gate_proj")


def test_head_sweep_of_the_grouped_qkv_is_the_views():
    """compare --heads (head_sweep) splits Hunyuan's qkv_proj as the Heads view does, figure for
    figure, with no key/value groups dotted (the groups are its sections)."""
    from quantscope.backend.compare import head_sweep
    ref, var = analyze(open_checkpoint(HF)), analyze(open_checkpoint(MLX))
    rows = {r.name: r for r in head_sweep(ref, {"mlx": var})}
    name = "model.layers.0.self_attn.qkv_proj"
    d = layer_detail(ref, {"mlx": var}, name)
    assert rows[name].heads == d.heads.labels() and rows[name].group == 0
    np.testing.assert_allclose(rows[name].rel_fro, d.head_error["mlx"], rtol=1e-12)
