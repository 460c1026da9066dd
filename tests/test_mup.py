"""Falcon-H1's muP multipliers: mlx-lm's conversion folds them into the weights, transformers
applies them at run time. compare divides them out (its figures are then the quantization's),
convert folds them as mlx-lm does (mlx-lm loads the output; left in transformers' layout, its
sanitize multiplied the packed integers). Real files: tests/fixtures/real/falconh1-bf16 and
mlx_lm.convert's 4-bit of it (made by make/mlxlm_falconh1_make.py)."""

import json
from pathlib import Path
from types import SimpleNamespace

import ml_dtypes
import numpy as np
import pytest
from quantscope.backend import mup
from quantscope.backend.checkpoint import open_checkpoint
from quantscope.backend.compare import sweep
from quantscope.backend.schemes import analyze

REAL = Path(__file__).parent / "fixtures" / "real"
HF, MLX = REAL / "falconh1-bf16", REAL / "mlxlm-falconh1-q4-g32"
BF16 = np.dtype(ml_dtypes.bfloat16)


def _st(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _mx_factor(mx, name: str, cfg: dict) -> np.ndarray | float:
    """What mlx-lm's sanitize multiplies module ``name`` by, computed with mlx as it computes it
    (a bf16 weight times a Python float; in_proj's rows times 1.25 · the bf16 ssm_multipliers)."""
    one = mx.array(1.0, dtype=mx.bfloat16)
    if name.endswith("in_proj"):
        d, gs, h = cfg["mamba_d_ssm"], cfg["mamba_n_groups"] * cfg["mamba_d_state"], cfg["mamba_n_heads"]
        mup_vec = mx.concatenate([mx.broadcast_to(mx.array(m), (n,)) for n, m in
                                  zip([d, d, gs, gs, h], cfg["ssm_multipliers"])])
        return np.array((cfg["ssm_in_multiplier"] * mup_vec.astype(mx.bfloat16)).astype(mx.float32))[:, None]
    c = {"embed_tokens": cfg["embedding_multiplier"], "lm_head": cfg["lm_head_multiplier"],
         "q_proj": cfg["attention_in_multiplier"], "k_proj": cfg["attention_in_multiplier"],
         "o_proj": cfg["attention_out_multiplier"], "out_proj": cfg["ssm_out_multiplier"],
         "gate_proj": cfg["mlp_multipliers"][0], "down_proj": cfg["mlp_multipliers"][1]}.get(name.rsplit(".", 1)[-1], 1.0)
    return float(np.array((one * c).astype(mx.float32)))


def test_compare_divides_out_the_multipliers_mlx_lm_folded(kernel_path):
    """Against transformers' weights, mlx-lm's 4-bit Falcon-H1 looked 4.65 off in embed_tokens,
    0.6-0.77 in the Mamba projections: the multipliers. Divided out, each layer's figure equals
    numpy's on mx.dequantize's values divided by mlx's own factor, and every layer is the 4-bit
    error it is (0.08); v_proj and up_proj, which mlx-lm does not fold, are measured as stored."""
    mx = pytest.importorskip("mlx.core")
    ref, var = analyze(open_checkpoint(HF)), analyze(open_checkpoint(MLX))
    res = sweep(ref, {"mlx": var}, engine="numpy")
    rows = {r.name: r for r in res.rows}
    assert len(rows) == 20 and "mlx" not in res.data_warnings  # (no "times a constant" left)
    for r in rows.values():
        assert 0.075 < r.rel_fro < 0.09, (r.name, r.rel_fro)
    assert rows["model.embed_tokens"].rel_fro_raw > 4  # as stored: × 5.66
    assert rows["model.layers.0.mamba.in_proj"].smoothing == "mup:ssm_in_multiplier*ssm_multipliers"
    assert rows["model.layers.1.self_attn.k_proj"].smoothing == "mup:attention_in_multiplier"
    assert rows["model.layers.0.feed_forward.down_proj"].smoothing == "mup:mlp_multipliers[1]"
    for name in ("model.layers.0.self_attn.v_proj", "model.layers.1.feed_forward.up_proj"):
        assert rows[name].smoothing == "none" and rows[name].rel_fro == rows[name].rel_fro_raw
    cfg = json.loads((MLX / "config.json").read_text())
    ws, vs = _st(HF), mx.load(str(MLX / "model.safetensors"))
    for name in ("model.embed_tokens", "model.layers.0.mamba.in_proj", "model.layers.1.self_attn.q_proj",
                 "model.layers.1.mamba.out_proj", "lm_head"):
        w = ws[name + ".weight"].view(BF16).astype(np.float64) if ws[name + ".weight"].dtype == np.uint16 \
            else ws[name + ".weight"].astype(np.float64)
        wh = np.array(mx.dequantize(vs[name + ".weight"], vs[name + ".scales"], vs[name + ".biases"], group_size=32,
                                    bits=4).astype(mx.float32)).astype(np.float64)
        f = _mx_factor(mx, name, cfg)
        want = np.linalg.norm(wh / f - w) / np.linalg.norm(w)
        assert rows[name].rel_fro == pytest.approx(want, rel=1e-6), name
        assert rows[name].rel_fro_raw == pytest.approx(np.linalg.norm(wh - w) / np.linalg.norm(w), rel=1e-9), name


def test_compare_multiplies_them_in_where_the_reference_holds_them_folded():
    # mlx-lm's conversion as the reference, transformers' weights as the variant
    ref, var = analyze(open_checkpoint(MLX)), analyze(open_checkpoint(HF))
    rows = {r.name: r for r in sweep(ref, {"hf": var}, engine="numpy").rows}
    assert len(rows) == 20
    for r in rows.values():
        assert 0.075 < r.rel_fro < 0.09, (r.name, r.rel_fro)
    assert rows["model.embed_tokens"].smoothing == "mup-in:embedding_multiplier"  # (multiplied in)


def test_the_factors_are_mlx_lms_rounded_to_the_weights_dtype():
    cfg = json.loads((HF / "config.json").read_text())
    model = SimpleNamespace(ckpt=SimpleNamespace(configs={"config.json": cfg}),
                            layers={"lm_head": None, "model.embed_tokens": None})
    f, what = mup.falcon_factors(model, "model.layers.3.mamba.out_proj", 4)
    assert what == "ssm_out_multiplier" and f[0] == 0.2353515625  # bf16 of 0.2357...
    assert mup.falcon_factors(model, "model.layers.3.mamba.out_proj", 4, "F32")[0][0] == np.float32(0.23570226)
    assert mup.falcon_factors(model, "model.layers.3.self_attn.v_proj", 4) is None  # not folded
    assert mup.falcon_factors(model, "model.layers.3.feed_forward.up_proj", 4) is None
    rows, _ = mup.falcon_factors(model, "model.layers.0.mamba.in_proj", 324)
    # z, x, B, C, dt rows: 128, 128, 32, 32, 4; 1.25 × bf16(1/(2√2)) = 0.44189453125 → bf16 0.44140625
    assert list(np.unique(rows)) == [0.3125, 0.44140625, 0.625]
    assert rows[0] == rows[270] == rows[321] == 0.44140625 and rows[200] == 0.3125 and rows[300] == 0.625
    assert mup.falcon_factors(model, "model.layers.0.mamba.in_proj", 323) is None  # rows do not add up
    # a tied head is the embeddings: folded by embedding_multiplier, as mlx-lm folds embed_tokens
    tied = SimpleNamespace(ckpt=model.ckpt, layers={"model.embed_tokens": None})
    assert mup.falcon_factors(tied, "lm_head", 4)[1] == "embedding_multiplier"
    # a missing key: mlx-lm's default (Falcon-H1-0.5B's), not transformers' 1
    bare = SimpleNamespace(ckpt=SimpleNamespace(configs={"config.json": {"model_type": "falcon_h1"}}), layers={})
    assert mup.falcon_factors(bare, "x.self_attn.o_proj", 2)[0][0] == 0.9375
    assert mup.falcon_factors(bare, "x.self_attn.q_proj", 2) is None  # attention_in defaults to 1


def test_convert_to_mlx_writes_what_mlx_lm_convert_writes(tmp_path):
    """Every tensor of quantscope's conversion equals mlx_lm.convert's, bit for bit: the
    multipliers folded in bf16 as mlx-lm folds them, conv1d as [C, k, 1]. (mlx-lm 0.32.2 loads
    it with logits equal to its own conversion's: checked by hand.)"""
    from quantscope.backend.convert import convert
    out = tmp_path / "q"
    rep = convert(HF, out, to="mlx", bits=4, group_size=32)
    assert rep.verified and max(lr.rel_fro for lr in rep.layers if lr.rel_fro is not None) < 0.09
    mine, theirs = _st(out), _st(MLX)
    assert set(mine) == set(theirs)
    for k, a in theirs.items():
        assert mine[k].dtype == a.dtype and mine[k].shape == a.shape and np.array_equal(mine[k], a), k
    conv = next(lr for lr in rep.layers if lr.path.endswith("0.mamba.conv1d"))
    assert "transposed" in conv.action


def test_convert_folds_the_multipliers_into_a_gptq_sources_scales(tmp_path):
    """A Falcon-H1 quantized by GPTQ (transformers' layout) to MLX: its codes repacked, the
    multiplier folded into each row's scales and biases, so the output decodes (mx.dequantize)
    to the multiplier times the GPTQ layer's own values (the format's formula, in float64)."""
    mx = pytest.importorskip("mlx.core")
    from quantscope.backend.convert import convert
    from ref_packers import autogptq_pack_rows
    from safetensors.numpy import save_file
    rng = np.random.default_rng(0)
    src = tmp_path / "gptq"
    src.mkdir()
    cfg = json.loads((HF / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
                                  "sym": False, "checkpoint_format": "gptq"}
    (src / "config.json").write_text(json.dumps(cfg))
    tensors = {k: v for k, v in _st(HF).items()}
    want = {}
    for name, (n, k) in {"model.layers.0.self_attn.o_proj": (128, 128), "model.layers.0.mamba.out_proj": (128, 128),
                         "model.layers.1.feed_forward.up_proj": (256, 128)}.items():
        del tensors[name + ".weight"]
        q = rng.integers(0, 16, size=(k, n))
        z = rng.integers(1, 16, size=(k // 32, n))
        s = (rng.random((k // 32, n)) * 0.02 + 0.001).astype(np.float16)
        g = np.arange(k) // 32
        tensors[name + ".qweight"] = autogptq_pack_rows(q, 4)
        tensors[name + ".qzeros"] = autogptq_pack_rows((z - 1).T.copy(), 4).T.copy()
        tensors[name + ".scales"] = s
        tensors[name + ".g_idx"] = g.astype(np.int32)
        want[name] = s[g].astype(np.float64).T * (q.T - z[g].T)  # [n, k]
    save_file(tensors, str(src / "model.safetensors"), {"format": "pt"})
    out = tmp_path / "mlx"
    rep = convert(src, out, to="mlx")
    got = mx.load(str(out / "model.safetensors"))
    by = {lr.path: lr for lr in rep.layers}
    for name, w in want.items():
        f = _mx_factor(mx, name, cfg)
        assert "repacked" in by[name].action and ("muP" in by[name].action) == (not name.endswith("up_proj"))
        wh = np.array(mx.dequantize(got[name + ".weight"], got[name + ".scales"], got[name + ".biases"],
                                    group_size=32, bits=4).astype(mx.float32)).astype(np.float64)
        np.testing.assert_allclose(wh, w * f, rtol=2e-6, atol=1e-9, err_msg=name)
    # and compared back with its source, each is its source's values again
    assert max(lr.rel_fro for lr in rep.layers if lr.rel_fro is not None) < 1e-5


def test_doctor_names_an_mlx_falcon_whose_conv1d_is_as_transformers_stores_it(tmp_path):
    """mlx-lm's own conversion: no finding. The same file with conv1d back in transformers'
    layout (what quantscope's convert wrote before): mlx-lm's load folds the multipliers into the
    packed weights and fails, an error naming the conv1d tensor."""
    from quantscope.backend.doctor import diagnose
    from safetensors.numpy import save_file
    # (and no other error: a conv1d's bias fits its first axis, in either layout; it was said not
    # to fit [192, 1] and [192, 4])
    for folder in (HF, MLX):
        assert not [f for f in diagnose(folder) if f.severity == "error"], folder
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((MLX / "config.json").read_text())
    t = _st(MLX)
    for k in [k for k in t if k.endswith("conv1d.weight")]:
        t[k] = np.ascontiguousarray(t[k].transpose(0, 2, 1))
    save_file(t, str(bad / "model.safetensors"), {"format": "mlx"})
    found = [f for f in diagnose(bad) if f.rule == "mlx.unfolded-multipliers"]
    assert len(found) == 1 and found[0].severity == "error"
    assert found[0].tensor == "model.layers.0.mamba.conv1d.weight" and "[192, 1, 4]" in found[0].message
    # a conv1d bias that fits no layout is still one
    t = _st(MLX)
    t["model.layers.1.mamba.conv1d.bias"] = t["model.layers.1.mamba.conv1d.bias"][:191]
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text((MLX / "config.json").read_text())
    save_file(t, str(odd / "model.safetensors"), {"format": "mlx"})
    found = [f for f in diagnose(odd) if f.rule == "layer.inconsistent"]
    assert len(found) == 1 and "bias [191] does not fit the layer's outputs [192]" in found[0].message


def test_an_mlx_falcon_written_without_its_multipliers_gets_them_folded_into_its_scales(tmp_path):
    """The file the doctor names (MLX-quantized, multipliers not folded, conv1d as transformers
    stores it) converted to MLX again: its codes kept, the multipliers folded into its scales and
    biases (float32), conv1d as mlx-lm's; compared with transformers' weights it is then the 4-bit
    error everywhere (it was 'copied exact', conv1d moved: mlx-lm loaded it without multipliers)."""
    from quantscope.backend.convert import convert
    from quantscope.backend.doctor import diagnose
    disguised = tmp_path / "hf"
    disguised.mkdir()
    for f in HF.iterdir():
        (disguised / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((HF / "config.json").read_text())
    (disguised / "config.json").write_text(json.dumps({**cfg, "model_type": "not_falcon"}))
    old = tmp_path / "old"
    convert(disguised, old, to="mlx", bits=4, group_size=32)  # (written as the converter used to)
    ocfg = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**ocfg, "model_type": "falcon_h1"}))
    assert [f.rule for f in diagnose(old) if f.severity == "error"] == ["mlx.unfolded-multipliers"]
    new = tmp_path / "new"
    rep = convert(old, new, to="mlx")
    acts = {lr.path: lr.action for lr in rep.layers}
    assert acts["model.layers.0.self_attn.o_proj"] == "copied, muP multiplier folded into its scales and biases"
    assert acts["model.layers.0.self_attn.v_proj"] == "copied exact"
    assert not [f for f in diagnose(new) if f.severity == "error"]
    o, n = _st(old), _st(new)
    assert np.array_equal(o["model.layers.0.self_attn.o_proj.weight"], n["model.layers.0.self_attn.o_proj.weight"])
    assert n["model.layers.0.self_attn.o_proj.scales"].dtype == np.float32
    assert next(lr for lr in rep.layers if lr.path.endswith("0.self_attn.o_proj")).widened  # (said, starred)
    # --scales source: in the source's dtype, rounded (as a repack's)
    kept = tmp_path / "kept"
    rep_k = convert(old, kept, to="mlx", scales="source")
    lr = next(lr for lr in rep_k.layers if lr.path.endswith("0.self_attn.o_proj"))
    assert lr.action.endswith("rounded to BF16") and not lr.widened and lr.scales_dtype == "BF16"
    assert _st(kept)["model.layers.0.self_attn.o_proj.scales"].dtype == BF16
    rows = {r.name: r for r in sweep(analyze(open_checkpoint(HF)), {"new": analyze(open_checkpoint(new))},
                                     engine="numpy").rows}
    for r in rows.values():
        assert 0.075 < r.rel_fro < 0.09, (r.name, r.rel_fro)


def test_a_dense_mlx_falcon_is_compared_and_its_conv1d_layout_is_said(tmp_path):
    """mlx-lm's Falcon-H1 dequantized to a dense file (multipliers folded, conv1d [C, k, 1])
    against transformers' weights: every linear layer the 4-bit error with the multipliers divided
    out, and the conv1d not compared because its axes are mlx-lm's, said as such (it was a
    "shape mismatch", which reads as another model)."""
    from quantscope.backend.convert import convert
    dense = tmp_path / "dense"
    convert(MLX, dense, to="dense")
    res = sweep(analyze(open_checkpoint(HF)), {"d": analyze(open_checkpoint(dense))}, engine="numpy")
    assert len(res.rows) == 20 and all(0.075 < r.rel_fro < 0.09 for r in res.rows)
    conv = [u for u in res.unmatched if u.layer.endswith("conv1d")]
    assert len(conv) == 2 and all("one depthwise conv1d in mlx-lm's layout and in transformers'" in u.reason
                                  and "[192, 4, 1]" in u.reason for u in conv)
