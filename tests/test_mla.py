"""MLA attention (DeepSeek-V3, Kimi K2, GLM-4.7-Flash): transformers keeps ``self_attn.kv_b_proj``
``[H·(nope+v), kv_lora]`` (per head its nope rows, then its v rows); mlx-lm's sanitize splits it
per head into ``embed_q`` ``[H, kv_lora, nope]`` (the nope rows, transposed) and ``unembed_out``
``[H, v, kv_lora]`` before quantizing. compare measures the reference's kv_b_proj against the two;
convert writes them as mlx-lm does.

The pair in tests/fixtures/real (deepseekv3-bf16, mlxlm-deepseekv3-q4-g32) was written by mlx-lm
0.32.2 itself (``mlx_lm.convert``: see the fixtures' README), with kv_lora 128, nope 64 and v 32,
no two equal; every expected figure is numpy's on ``mx.dequantize`` of mlx-lm's tensors.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from quantscope.app.cli import main
from quantscope.backend.checkpoint import open_checkpoint
from quantscope.backend.compare import layer_detail, sweep
from quantscope.backend.compare_align import counterpart
from quantscope.backend.schemes import analyze

REAL = Path(__file__).parent / "fixtures" / "real"
SRC, MLX = REAL / "deepseekv3-bf16", REAL / "mlxlm-deepseekv3-q4-g32"
H, N, V, L = 4, 64, 32, 128


def _f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32), np.float64)


def _split_dequantized(layer: int) -> np.ndarray:
    """mlx-lm's embed_q and unembed_out of ``layer``, dequantized, as the kv_b_proj they were."""
    q = mx.load(str(MLX / "model.safetensors"))
    p = f"model.layers.{layer}.self_attn"

    def deq(m):
        return _f64(mx.dequantize(q[f"{p}.{m}.weight"], q[f"{p}.{m}.scales"], q[f"{p}.{m}.biases"],
                                  group_size=32, bits=4))

    eq, uo = deq("embed_q"), deq("unembed_out")
    assert eq.shape == (H, L, N) and uo.shape == (H, V, L)
    return np.concatenate([eq.transpose(0, 2, 1), uo], axis=1).reshape(H * (N + V), L)


def test_kv_b_proj_against_mlx_lms_embed_q_and_unembed_out():
    res = sweep(analyze(open_checkpoint(SRC)), {"mlx": analyze(open_checkpoint(MLX))}, engine="numpy")
    rows = {r.name: r for r in res.rows}
    ref = mx.load(str(SRC / "model.safetensors"))
    for layer in (0, 1):
        name = f"model.layers.{layer}.self_attn.kv_b_proj"
        w, wh = _f64(ref[f"{name}.weight"]), _split_dequantized(layer)
        d = wh - w
        r = rows[name]
        assert r.rel_fro == pytest.approx(np.linalg.norm(d) / np.linalg.norm(w), rel=1e-9)
        assert r.max_abs == np.abs(d).max() and r.mse == pytest.approx((d ** 2).mean(), rel=1e-9)
        for pct in (50, 95, 99):
            assert getattr(r, f"p{pct}") == pytest.approx(np.percentile(np.abs(d), pct), rel=1e-9)
        assert r.variant_layer.split(",") == [f"model.layers.{layer}.self_attn.embed_q",
                                              f"model.layers.{layer}.self_attn.unembed_out"]
        assert (r.bits, r.group_size) == (4, 32)
    # nothing else left without a partner but the MoE router mlx-lm keeps dense (no Linear)
    assert [(u.layer, u.reason.split(":")[0]) for u in res.unmatched] == [
        ("model.layers.1.mlp.gate", "skipped by the variant")]


def test_shapes_that_do_not_make_up_kv_b_proj_are_no_split_of_it():
    # a kv_b_proj whose rows or inputs are not those of the split (kv_lora and nope taken for each
    # other, v for nope): no segments, so the layer is listed with why, not compared with wrong elements
    from quantscope.backend.compare_align import _mla_segments
    var = analyze(open_checkpoint(MLX))
    eq, uo = (var.layers[f"model.layers.0.self_attn.{m}"] for m in ("embed_q", "unembed_out"))
    assert _mla_segments((H * (N + V), L), eq, uo) is not None
    assert _mla_segments((H * (N + V), N), eq, uo) is None  # (kv_lora and nope swapped)
    assert _mla_segments((H * (N + N), L), eq, uo) is None  # (v taken for nope)


def test_the_window_finds_kv_b_proj_from_either_side_and_counts_both_parts():
    ref, var = analyze(open_checkpoint(SRC)), analyze(open_checkpoint(MLX))
    name = "model.layers.1.self_attn.kv_b_proj"
    assert counterpart("model.layers.1.self_attn.embed_q", ref)[0] == name
    assert counterpart("model.layers.1.self_attn.unembed_out", ref)[0] == name
    assert counterpart(name, var)[0] == "model.layers.1.self_attn.embed_q"
    d = layer_detail(ref, {"mlx": var}, name)
    assert d.code_counts["mlx"].sum() == H * (N + V) * L  # (embed_q's codes and unembed_out's)
    assert d.value_counts["mlx"].sum() == H * (N + V) * L
    w = _f64(mx.load(str(SRC / "model.safetensors"))[f"{name}.weight"])
    assert d.metrics["mlx"].rel_fro == pytest.approx(np.linalg.norm(_split_dequantized(1) - w) / np.linalg.norm(w),
                                                     rel=1e-9)


def test_convert_writes_what_mlx_lm_writes(tmp_path, capsys):
    # kv_b_proj as embed_q and unembed_out (quantized whole, mlx-lm dequantized and quantized it
    # again when it loaded: two roundings), the MoE router (a MoEGate holding its weight, no
    # Linear) kept dense: quantized, mlx-lm refused the file ("parameters not in model")
    out = tmp_path / "out"
    assert main(["convert", str(SRC), str(out), "--to", "mlx", "--bits", "4", "--group-size", "32"]) == 0
    text = capsys.readouterr().out
    assert "quantized 4/32 affine as embed_q + unembed_out" in text
    assert "kept dense (mlx-lm's router for deepseek_v3 is no Linear" in text
    ours, want = mx.load(str(out / "model.safetensors")), mx.load(str(MLX / "model.safetensors"))
    assert set(ours) == set(want)
    for k, v in want.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape and mx.array_equal(ours[k], v).item(), k
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["model.layers.1.mlp.gate"] is False and (q["bits"], q["group_size"]) == (4, 32)
    # a recipe asking to quantize the router is refused, said why, nothing written
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"model.layers.1.mlp.gate": {"bits": 8, "group_size": 64}}))
    out2 = tmp_path / "out2"
    assert main(["convert", str(SRC), str(out2), "--to", "mlx", "--recipe", str(recipe)]) == 2
    assert "router holds its weight itself (no Linear): it is never quantized" in capsys.readouterr().err
    assert not out2.exists()


def test_a_part_the_group_size_does_not_divide_is_kept_dense(tmp_path):
    # groups of 128 along nope (64) cannot be: mlx_lm.convert then keeps embed_q bf16 and quantizes
    # unembed_out alone (checked against its output by hand: every tensor equal); convert wrote
    # kv_b_proj quantized whole, and mlx-lm's sanitize failed on it at load ("last dimension …
    # divisible by the group size"). compare measures the layer all the same (it was "skipped")
    out = tmp_path / "g128"
    assert main(["convert", str(SRC), str(out), "--to", "mlx", "--bits", "4", "--group-size", "128"]) == 0
    got, src = mx.load(str(out / "model.safetensors")), mx.load(str(SRC / "model.safetensors"))
    p = "model.layers.0.self_attn"
    kv = src[f"{p}.kv_b_proj.weight"].reshape(H, N + V, L)
    assert f"{p}.embed_q.scales" not in got and f"{p}.kv_b_proj.weight" not in got
    assert mx.array_equal(got[f"{p}.embed_q.weight"], kv[:, :N].swapaxes(1, 2)).item()
    want = mx.quantize(kv[:, N:], group_size=128, bits=4)
    for part, w in zip(("weight", "scales", "biases"), want):
        assert mx.array_equal(got[f"{p}.unembed_out.{part}"], w).item(), part
    res = sweep(analyze(open_checkpoint(SRC)), {"g128": analyze(open_checkpoint(out))}, engine="numpy")
    r = {r.name: r for r in res.rows}[f"{p}.kv_b_proj"]
    wh = np.concatenate([_f64(kv[:, :N]), _f64(mx.dequantize(*want, group_size=128, bits=4))], axis=1)
    w = _f64(kv)
    assert r.rel_fro == pytest.approx(np.linalg.norm(wh - w) / np.linalg.norm(w), rel=1e-9)
    assert (r.scheme, r.bits, r.group_size) == ("mlx-affine", 4, 128)  # (the quantized part's)


def test_a_quantized_source_is_split_too(tmp_path):
    # DeepSeek ships FP8 with 128×128 block scales: its kv_b_proj was written quantized whole, and
    # mlx-lm's sanitize decoded and quantized it again at every load
    import ml_dtypes
    from helpers import write_st
    from quantscope.backend.engines import NumpyEngine
    src = tmp_path / "fp8"
    src.mkdir()
    tensors = {k: np.array(v.astype(mx.float32)).astype(ml_dtypes.bfloat16)
               for k, v in mx.load(str(SRC / "model.safetensors")).items()}
    for k in [k for k in tensors if k.endswith("kv_b_proj.weight")]:
        f = tensors[k].astype(np.float32)
        sc = np.array([[np.abs(f[i:i + 128, j:j + 128]).max() / 448.0 for j in range(0, f.shape[1], 128)]
                       for i in range(0, f.shape[0], 128)], np.float32)
        tensors[k] = (f / np.kron(sc, np.ones((128, 128), np.float32))[:f.shape[0], :f.shape[1]]).astype(
            ml_dtypes.float8_e4m3fn)
        tensors[k.replace(".weight", ".weight_scale_inv")] = sc
    write_st(src / "model.safetensors", tensors, {"format": "pt"})
    cfg = json.loads((SRC / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--to", "mlx", "--bits", "4", "--group-size", "32"]) == 0
    got = mx.load(str(out / "model.safetensors"))
    p = "model.layers.1.self_attn"
    assert f"{p}.kv_b_proj.weight" not in got and got[f"{p}.embed_q.weight"].shape == (H, L, N * 4 // 32)
    m = analyze(open_checkpoint(src))
    dec = np.asarray(NumpyEngine().dequantize(m, m.layers[f"{p}.kv_b_proj"])).reshape(H, N + V, L)
    eq = mx.array(np.ascontiguousarray(dec[:, :N].transpose(0, 2, 1))).astype(mx.bfloat16)
    for part, w in zip(("weight", "scales", "biases"), mx.quantize(eq, group_size=32, bits=4)):
        assert mx.array_equal(got[f"{p}.embed_q.{part}"], w).item(), part
