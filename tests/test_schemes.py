"""Scheme detection on generated checkpoints of each layout, and engine parity (numpy vs MLX)."""

import json

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest

from helpers import write_st
from mx_util import to_np
from ref_packers import autoawq_pack_gemm, autogptq_pack_rows
from quantscope.app.cli import main
from quantscope.backend.checkpoint import open_checkpoint
from quantscope.backend.engines import MlxEngine, NumpyEngine
from quantscope.backend.errors import LayerError
from quantscope.backend.schemes import analyze

RNG = np.random.default_rng(11)
LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
         "num_attention_heads": 4, "head_dim": 64, "vocab_size": 512}


def write_model(folder, tensors, config=None, extra_files=None, metadata=None):
    folder.mkdir(parents=True, exist_ok=True)
    write_st(folder / "model.safetensors", tensors, metadata or {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config or LLAMA))
    for name, data in (extra_files or {}).items():
        (folder / name).write_text(json.dumps(data))
    return folder


def mlx_triplet(path, w, bits, group, dtype=mx.bfloat16):
    wq, s, b = mx.quantize(mx.array(w).astype(dtype), group_size=group, bits=bits)
    return {f"{path}.weight": to_np(wq), f"{path}.scales": to_np(s), f"{path}.biases": to_np(b)}


@pytest.fixture(scope="module")
def mlx_mixed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlx")
    t = {}
    t.update(mlx_triplet("model.layers.0.self_attn.q_proj", RNG.normal(size=(256, 256)).astype(np.float32), 4, 64))
    t.update(mlx_triplet("model.layers.0.mlp.down_proj", RNG.normal(size=(256, 512)).astype(np.float32), 6, 64))
    t.update(mlx_triplet("model.layers.0.mlp.up_proj", RNG.normal(size=(512, 256)).astype(np.float32), 3, 32))
    wq, s = mx.quantize(mx.array(RNG.normal(size=(512, 256)).astype(np.float32)), mode="mxfp4")[:2]
    t["model.layers.0.mlp.gate_proj.weight"], t["model.layers.0.mlp.gate_proj.scales"] = to_np(wq), to_np(s)
    experts = RNG.normal(size=(4, 64, 256)).astype(np.float32)
    t.update(mlx_triplet("model.layers.0.mlp.switch_mlp.up_proj", experts, 4, 64))
    t["model.layers.0.input_layernorm.weight"] = np.ones(256, ml_dtypes.bfloat16)
    q = {"group_size": 64, "bits": 4, "mode": "affine",
         "model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 6, "mode": "affine"},
         "model.layers.0.mlp.up_proj": {"group_size": 32, "bits": 3},
         "model.layers.0.mlp.gate_proj": {"mode": "mxfp4"}}
    return write_model(folder, t, {**LLAMA, "quantization": q, "quantization_config": q}, metadata={"format": "mlx"})


def test_mlx_mixed_detection_and_rules(mlx_mixed):
    m = analyze(open_checkpoint(mlx_mixed))
    L = m.layers
    assert (L["model.layers.0.self_attn.q_proj"].scheme, L["model.layers.0.self_attn.q_proj"].bits) == ("mlx-affine", 4)
    down = L["model.layers.0.mlp.down_proj"]
    assert (down.bits, down.group_size, down.shape) == (6, 64, (256, 512))
    assert down.source == "per-layer override `model.layers.0.mlp.down_proj`"
    up = L["model.layers.0.mlp.up_proj"]
    assert (up.bits, up.group_size, up.shape) == (3, 32, (512, 256))
    gate = L["model.layers.0.mlp.gate_proj"]
    assert (gate.scheme, gate.bits, gate.group_size, gate.shape) == ("mlx-mxfp4", 4, 32, (512, 256))
    sw = L["model.layers.0.mlp.switch_mlp.up_proj"]
    assert sw.shape == (4, 64, 256) and sw.scheme == "mlx-affine"
    assert L["model.layers.0.input_layernorm"].scheme == "dense"
    # bits per weight includes scales and biases: 4 + 2*16/64 = 4.5
    assert L["model.layers.0.self_attn.q_proj"].bits_per_weight == pytest.approx(4.5)
    assert down.bits_per_weight == pytest.approx(6.5)


def test_engines_agree_to_zero_ulp_on_mlx_layers(mlx_mixed):
    m = analyze(open_checkpoint(mlx_mixed))
    ne, me = NumpyEngine(), MlxEngine()
    try:
        for layer in m.layers.values():
            if layer.quantized:
                a, b = ne.dequantize(m, layer), me.dequantize(m, layer)
                assert a.dtype == b.dtype == np.float32 and a.shape == layer.shape
                np.testing.assert_array_equal(a, b)
                assert me.last_path == "mx.dequantize"
    finally:
        me.close()


def test_mlx_shapes_that_do_not_fit_config_are_reported(tmp_path):
    t = mlx_triplet("model.layers.0.mlp.up_proj", RNG.normal(size=(512, 256)).astype(np.float32), 4, 64)
    q = {"group_size": 64, "bits": 8}  # wrong: the file holds 4-bit/64 (indistinguishable by shape from 8/32)
    m = analyze(open_checkpoint(write_model(tmp_path, t, {**LLAMA, "quantization": q})))
    layer = m.layers["model.layers.0.mlp.up_proj"]
    assert not layer.decodable and "R18" in layer.problem and "4 bit / group 64" in layer.problem
    with pytest.raises(LayerError, match="model.layers.0.mlp.up_proj"):
        NumpyEngine().dequantize(m, layer)


def test_a_swapped_bits_group_pair_is_warned_of_on_the_embeddings_and_head_too(tmp_path):
    """8 bit / 32 read over a 4 bit / 64 file: the shapes fit both. Linear layers were warned of
    (R18); the embeddings and the head decoded garbage of half the hidden size without a word."""
    h = LLAMA["hidden_size"]
    t = {}
    for name, rows in (("model.embed_tokens", 96), ("lm_head", 96), ("model.layers.0.self_attn.q_proj", h)):
        t.update(mlx_triplet(name, RNG.normal(size=(rows, h)).astype(np.float32), 4, 64))
    m = analyze(open_checkpoint(write_model(tmp_path, t, {**LLAMA, "quantization": {"group_size": 32, "bits": 8}})))
    for name in ("model.embed_tokens", "lm_head", "model.layers.0.self_attn.q_proj"):
        layer = m.layers[name]
        assert layer.shape == (96 if "." not in name or "embed" in name else h, h // 2)
        assert "R18" in (layer.warning or "") and f"give K={h // 2} inputs, but this layer takes the hidden size; " \
            f"4 bit / group 64 give K={h}" in layer.warning


def test_a_pair_that_gives_another_dimension_is_warned_of_where_the_layer_takes_the_hidden_size(tmp_path):
    """An up_proj stored at 4 bit / 64 (by mx.quantize), read as 2 bit / 128: K = twice the
    hidden size, the intermediate size here, a dimension of the model, so it passed; an up_proj
    takes the hidden size, which 4 bit / 64 give. down_proj (its input is the intermediate size)
    and a vision tower's layers are not judged so."""
    h, f = 128, 256
    t = {}
    for name, (n, k) in (("model.layers.0.mlp.up_proj", (f, h)), ("model.layers.0.mlp.down_proj", (h, f)),
                         ("vision_tower.layers.0.mlp.up_proj", (f, h))):
        t.update(mlx_triplet(name, RNG.normal(size=(n, k)).astype(np.float32) * 0.05, 4, 64))
    cfg = {"model_type": "llama", "hidden_size": h, "intermediate_size": f,
           "quantization": {"group_size": 64, "bits": 4, "model.layers.0.mlp.up_proj": {"group_size": 128, "bits": 2},
                            "vision_tower.layers.0.mlp.up_proj": {"group_size": 128, "bits": 2}}}
    m = analyze(open_checkpoint(write_model(tmp_path, t, cfg)))
    up = m.layers["model.layers.0.mlp.up_proj"]
    assert up.shape == (f, 2 * h) and "takes the hidden size; 4 bit / group 64 give K=128" in up.warning
    assert m.layers["model.layers.0.mlp.down_proj"].warning is None
    assert m.layers["vision_tower.layers.0.mlp.up_proj"].warning is None  # (K=256: a model dimension)


def test_mlx_without_config_infers_from_model_dims(tmp_path):
    t = mlx_triplet("model.layers.0.mlp.up_proj", RNG.normal(size=(128, 384)).astype(np.float32), 8, 32)
    m = analyze(open_checkpoint(write_model(tmp_path, t, {"hidden_size": 384})))
    layer = m.layers["model.layers.0.mlp.up_proj"]
    # 2/128, 4/64 and 8/32 all fit the shapes; only 8-bit gives K=384, the model's dimension.
    assert (layer.bits, layer.group_size) == (8, 32) and "K=384" in layer.source
    np.testing.assert_array_equal(NumpyEngine().dequantize(m, layer).shape, (128, 384))


def test_mlx_without_config_the_vocabulary_is_no_input_width(tmp_path):
    # a small model of vocab 1536 (a fuzzed conversion with its "quantization" dropped): the
    # vocabulary counted as an input width made 2/128 (K=1536) as likely as 8/32 (K=384), and the
    # layer failed with "unsupported operand type(s) for %: 'int' and 'NoneType'"
    t = mlx_triplet("model.layers.0.mlp.up_proj", RNG.normal(size=(128, 384)).astype(np.float32), 8, 32)
    cfg = {"hidden_size": 384, "vocab_size": 1536}
    layer = analyze(open_checkpoint(write_model(tmp_path / "a", t, cfg))).layers["model.layers.0.mlp.up_proj"]
    assert (layer.bits, layer.group_size, layer.problem) == (8, 32, None)
    # where the shapes stay ambiguous (two widths of the model fit), the layer says so and what to add
    cfg = {"hidden_size": 384, "intermediate_size": 1536}
    layer = analyze(open_checkpoint(write_model(tmp_path / "b", t, cfg))).layers["model.layers.0.mlp.up_proj"]
    assert layer.problem.startswith("bits/group not in config and ambiguous from the shapes: 2 bit / group 128 "
                                    "(K=1536), 8 bit / group 32 (K=384)") and '"bits", "group_size"' in layer.problem


def gptq_tensors(path, n, k, bits, group, *, v1=True, actorder=False):
    q = RNG.integers(0, 2 ** bits, size=(k, n))
    ng = k // group
    z = RNG.integers(1, 2 ** bits, size=(ng, n))
    s = (RNG.random((ng, n)) * 0.01 + 0.001).astype(np.float16)
    g_idx = np.arange(k) // group
    if actorder:
        g_idx = g_idx[RNG.permutation(k)]
    return {f"{path}.qweight": autogptq_pack_rows(q, bits),
            f"{path}.qzeros": autogptq_pack_rows((z - (1 if v1 else 0)).T.copy(), bits).T.copy(),
            f"{path}.scales": s, f"{path}.g_idx": g_idx.astype(np.int32)}


def test_gptq_detection_and_engines(tmp_path):
    t = {}
    t.update(gptq_tensors("model.layers.0.self_attn.q_proj", 256, 256, 4, 64))
    t.update(gptq_tensors("model.layers.0.mlp.up_proj", 512, 256, 3, 64))
    t.update(gptq_tensors("model.layers.0.mlp.down_proj", 256, 512, 8, 128, actorder=True))
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": False, "desc_act": False,
          "checkpoint_format": "gptq",
          "dynamic": {r"+:.*up_proj": {"bits": 3}, r"+:.*down_proj": {"bits": 8, "group_size": 128}}}
    m = analyze(open_checkpoint(write_model(tmp_path, t, {**LLAMA, "quantization_config": qc})))
    q = m.layers["model.layers.0.self_attn.q_proj"]
    assert (q.scheme, q.bits, q.group_size, q.shape) == ("gptq", 4, 64, (256, 256))
    assert q.bits_per_weight == pytest.approx((256 * 256 / 2 + 4 * 256 / 2 + 4 * 256 * 2 + 256 * 4) * 8 / 256 ** 2)
    up = m.layers["model.layers.0.mlp.up_proj"]
    assert (up.bits, up.shape) == (3, (512, 256)) and "dynamic override" in up.source
    down = m.layers["model.layers.0.mlp.down_proj"]
    assert (down.bits, down.group_size, down.shape) == (8, 128, (256, 512))
    ne, me = NumpyEngine(), MlxEngine()
    try:
        for layer in (q, up, down):
            np.testing.assert_array_equal(ne.dequantize(m, layer), me.dequantize(m, layer))
            assert me.last_path == ("numpy fallback" if layer is down else "repacked to MLX affine + mx.dequantize")
    finally:
        me.close()


def test_awq_detection_and_engines(tmp_path):
    n, k, g = 256, 512, 128
    q = RNG.integers(0, 16, size=(k, n))
    z = RNG.integers(0, 16, size=(k // g, n))
    s = (RNG.random((k // g, n)) * 0.01).astype(np.float16)
    t = {"model.layers.0.mlp.down_proj.qweight": autoawq_pack_gemm(q),
         "model.layers.0.mlp.down_proj.qzeros": autoawq_pack_gemm(z),
         "model.layers.0.mlp.down_proj.scales": s}
    qc = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    m = analyze(open_checkpoint(write_model(tmp_path, t, {**LLAMA, "quantization_config": qc})))
    layer = m.layers["model.layers.0.mlp.down_proj"]
    assert (layer.scheme, layer.bits, layer.group_size, layer.shape) == ("awq-gemm", 4, 128, (256, 512))
    me = MlxEngine()
    try:
        np.testing.assert_array_equal(NumpyEngine().dequantize(m, layer), me.dequantize(m, layer))
    finally:
        me.close()


def test_gptq_and_awq_told_apart_by_shape_without_config(tmp_path):
    t = gptq_tensors("a.q_proj", 256, 256, 4, 128)
    t.update({"b.q_proj.qweight": autoawq_pack_gemm(RNG.integers(0, 16, size=(256, 256))),
              "b.q_proj.qzeros": autoawq_pack_gemm(RNG.integers(0, 16, size=(2, 256))),
              "b.q_proj.scales": np.ones((2, 256), np.float16)})
    m = analyze(open_checkpoint(write_model(tmp_path, t, {"hidden_size": 256})))
    assert m.layers["a.q_proj"].scheme == "gptq" and m.layers["a.q_proj"].bits == 4
    assert m.layers["b.q_proj"].scheme == "awq-gemm"


def test_marlin_and_unknown_are_reported_not_crashed(tmp_path):
    t = {"m.q_proj.B": np.zeros((16, 512), np.int32), "m.q_proj.s": np.zeros((2, 256), np.float16),
         "m.weird.foo": np.zeros(3, np.int16), "m.weird.weight": np.zeros((2, 2), np.int16)}
    m = analyze(open_checkpoint(write_model(tmp_path, t, {})))
    assert m.layers["m.q_proj"].scheme == "gptq-marlin" and "not decodable" in m.layers["m.q_proj"].problem
    assert m.layers["m.weird"].scheme == "unknown"


def test_dequant_cli_writes_logical_orientation(mlx_mixed, tmp_path, capsys):
    out = tmp_path / "w.npy"
    assert main(["dequant", str(mlx_mixed), "model.layers.0.mlp.down_proj", "-o", str(out), "--engine", "numpy"]) == 0
    w = np.load(out)
    assert w.shape == (256, 512) and w.dtype == np.float32
    assert main(["info", str(mlx_mixed), "--json"]) == 0
    data = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    layers = {x["name"]: x for x in data["layers"]}
    assert layers["model.layers.0.mlp.down_proj"]["scheme"] == "mlx-affine"
    assert layers["model.layers.0.mlp.down_proj"]["bits"] == 6 and layers["model.layers.0.mlp.down_proj"]["shape"] == [256, 512]
    assert layers["model.layers.0.mlp.gate_proj"]["scheme"] == "mlx-mxfp4"


def test_model_dimensions_include_widths_named_by_other_architectures():
    # a K missing from these made the MLX bits/group check call a healthy Llama 4 or Mamba layer wrong
    from quantscope.backend.schemes import _model_dims
    cfg = {"hidden_size": 1024, "text_config": {"intermediate_size_mlp": 8192, "num_heads": 32, "head_dim": 64,
                                                "mamba_num_heads": 48, "mamba_head_dim": 64, "mamba_d_ssm": 3072}}
    assert {1024, 8192, 2048, 3072} <= _model_dims(cfg)


def test_a_stored_nvfp4_global_scale_is_applied_by_every_route(tmp_path):
    # a `.global_scale` beside an nvfp4 layer was listed by info and ignored by the decode: the
    # figures differed from mx.dequantize's by its factor, with no word
    from quantscope.backend.formats import fast
    w = mx.array(RNG.normal(size=(64, 128)).astype(np.float32))
    gs = mx.array([41.25], mx.float32)
    wq, s = mx.quantize(w, mode="nvfp4", global_scale=gs)[:2]
    ref = to_np(mx.dequantize(wq, s, mode="nvfp4", global_scale=gs, dtype=mx.float32))
    p = "model.layers.0.mlp.up_proj"
    t = {f"{p}.weight": to_np(wq), f"{p}.scales": to_np(s), f"{p}.global_scale": np.array([41.25], np.float32)}
    m = analyze(open_checkpoint(write_model(tmp_path, t, {**LLAMA, "hidden_size": 128,
                                                          "quantization": {"mode": "nvfp4", "group_size": 16,
                                                                           "bits": 4}},
                                            metadata={"format": "mlx"})))
    layer = m.layers[p]
    assert layer.scheme == "mlx-nvfp4" and layer.problem is None
    np.testing.assert_array_equal(NumpyEngine().dequantize(m, layer), ref)
    np.testing.assert_array_equal(MlxEngine().dequantize(m, layer), ref)
    if fast.AVAILABLE:
        dec = NumpyEngine().row_decoder(m, layer)
        out = np.empty(ref.shape, np.float32)
        dec.fn(0, dec.rows, out)
        np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("q", [{"bits": 4, "group_size": 32}, {"bits": 4, "group_size": 32, "mode": "affine"},
                               {"bits": 4, "group_size": 64, "mode": "mxfp4"}])
def test_mxfp4_tensors_a_config_reads_otherwise_are_decoded_and_said(tmp_path, q, capsys):
    # read as the tensors are (mxfp4), as before; but mlx-lm builds what the config says (affine:
    # "Missing parameters: biases"; mxfp4 at group 64: "mxfp4 requires group size 32"): it was
    # "no problems found" and exit 0
    from quantscope.backend.doctor import diagnose
    w = mx.array(RNG.normal(size=(64, 128)).astype(np.float32))
    wq, s = mx.quantize(w, mode="mxfp4")[:2]
    p = "model.layers.0.mlp.up_proj"
    folder = write_model(tmp_path / "m", {f"{p}.weight": to_np(wq), f"{p}.scales": to_np(s)},
                         {**LLAMA, "hidden_size": 128, "quantization": q}, metadata={"format": "mlx"})
    layer = analyze(open_checkpoint(folder)).layers[p]
    assert layer.scheme == "mlx-mxfp4" and layer.problem is None and "mlx" in layer.warning
    ref = to_np(mx.dequantize(wq, s, mode="mxfp4", dtype=mx.float32))
    assert main(["dequant", str(folder), p, "-o", str(tmp_path / "x.npy")]) == 1
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), ref)
    assert any(f.rule == "mlx.bits-group" and f.layer == p for f in diagnose(folder))
