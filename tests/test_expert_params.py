"""transformers' stacked expert parameters (``…experts.gate_up_proj`` / ``…experts.down_proj``,
no ``.weight``): ``[E, K, N]`` in gpt-oss, Llama 4 and Qwen3-VL-MoE (multiplied as ``x @ W``),
``[E, N, K]`` in Gemma 4 and Qwen3.5-MoE. Read as their projection's weight ``[E, N, K]``; compared
with mlx-lm's conversions, which split gate/up (concatenated, or interleaved in gpt-oss) and
transpose; carried as stored by convert.

The Llama 4 pair in tests/fixtures/real was written by mlx-lm 0.32.2 itself (``mlx_lm.convert``,
see the fixtures' README); the other layouts are made here with ``mx.quantize`` of weights laid
out as mlx-lm's sanitize lays them (each model's ``sanitize`` in mlx_lm/models, read for this), and
every expected error is computed with numpy from ``mx.dequantize`` of the stored tensors.
"""

import json
from pathlib import Path

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest
from helpers import write_st
from quantscope.app.cli import main
from quantscope.backend.checkpoint import open_checkpoint, split_name
from quantscope.backend.compare import layer_detail, sweep
from quantscope.backend.compare_align import containers, counterpart
from quantscope.backend.doctor import diagnose
from quantscope.backend.engines import MlxEngine, NumpyEngine
from quantscope.backend.schemes import analyze

pytestmark = pytest.mark.usefixtures("kernel_path")  # (the compiled transposing reads, and numpy's)

REAL = Path(__file__).parent / "fixtures" / "real"
L4, L4_MLX = REAL / "llama4-bf16", REAL / "mlxlm-llama4-q4-g32"
L4_EXP = "language_model.model.layers.{l}.feed_forward.experts"
BF16 = ml_dtypes.bfloat16
E, I, H = 4, 96, 128


def _f64(a) -> np.ndarray:
    return np.array(mx.array(a).astype(mx.float32), np.float64) if isinstance(a, mx.array) else a.astype(np.float64)


def _rel(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_split_name_takes_a_parameter_for_its_projections_weight():
    assert split_name("m.layers.0.mlp.experts.gate_up_proj") == ("m.layers.0.mlp.experts.gate_up_proj", "weight")
    assert split_name("m.layers.0.mlp.experts.gate_up_proj_bias") == ("m.layers.0.mlp.experts.gate_up_proj", "bias")
    assert split_name("m.layers.0.mlp.experts.0.down_proj.weight") == ("m.layers.0.mlp.experts.0.down_proj", "weight")
    assert split_name("m.layers.0.mlp.gate_up_proj") == ("m.layers.0.mlp", "gate_up_proj")  # (not an experts' one)


# -- the real Llama 4 pair -----------------------------------------------------------------------------

def test_llama4_experts_read_as_weights_of_their_transpose():
    ck = open_checkpoint(L4)
    model = analyze(ck)
    raw = mx.load(str(L4 / "model.safetensors"))
    for proj, shape in (("gate_up_proj", (E, 2 * I, H)), ("down_proj", (E, H, I))):
        path = f"{L4_EXP.format(l=1)}.{proj}"
        layer = model.layers[path]
        assert (layer.scheme, tuple(layer.shape)) == ("dense", shape)
        w = layer.tensors["weight"]
        assert (w.name, w.source, w.transposed) == (f"{path}.weight", path, True)
        assert w.stored_shape == (shape[0], shape[2], shape[1]) == tuple(raw[path].shape)
        want = np.array(raw[path].astype(mx.float32)).transpose(0, 2, 1)
        for eng in (NumpyEngine(), MlxEngine()):
            got = eng.dequantize(model, layer)
            assert got.flags.c_contiguous
            np.testing.assert_array_equal(got, want)
        # flattened rows across experts, as a sweep's row blocks read them
        n = shape[1]
        np.testing.assert_array_equal(ck.rows(w.name, n - 5, 2 * n + 3).astype(np.float32),
                                      want.reshape(-1, shape[2])[n - 5:2 * n + 3])
        np.testing.assert_array_equal(ck.tensor(w.name, (1, 3)).astype(np.float32), want[1:3])
        # as float32 straight into a block (a sweep's reference rows), across an expert's end
        dst = np.full((2 * n + 8, shape[2]), np.nan, np.float32)
        ck.rows_into(w.name, n - 5, 3 * n + 3, dst)
        np.testing.assert_array_equal(dst, want.reshape(-1, shape[2])[n - 5:3 * n + 3])
        ck.release([w.name])  # (nothing to assert but that it is accepted, and reads still work)
        np.testing.assert_array_equal(ck.rows(w.name, 0, 7).astype(np.float32), want.reshape(-1, shape[2])[:7])


def _expert_rows(rows: dict, stack: str, wh: np.ndarray, w: np.ndarray, layer: str | None = None) -> None:
    """Each expert's row of ``stack`` (named ``{block}.experts.{e}.{proj}``) against numpy's
    figures of ``wh`` against ``w`` ``[E, N, K]`` for that expert."""
    pre, proj = stack.rsplit(".", 1)
    for e in range(w.shape[0]):
        r = rows[f"{pre}.{e}.{proj}"]
        assert r.rel_fro == pytest.approx(_rel(wh[e], w[e]), rel=1e-9), (stack, e)
        assert r.max_abs == pytest.approx(np.abs(wh[e] - w[e]).max(), rel=1e-6), (stack, e)
        assert r.expert == e and r.reference_layer == (layer or stack)


def test_llama4_against_mlx_lms_own_conversion():
    # mlx-lm split each gate_up_proj [E, K, 2I] into gate_proj and up_proj [E, I, K] (quantized);
    # the sweep puts them back in rows and measures every element, expert by expert
    res = sweep(analyze(open_checkpoint(L4)), {"mlx": analyze(open_checkpoint(L4_MLX))}, engine="numpy")
    assert not res.unmatched
    rows = {r.name: r for r in res.rows}
    ref, q = mx.load(str(L4 / "model.safetensors")), mx.load(str(L4_MLX / "model.safetensors"))

    def deq(n):
        return _f64(mx.dequantize(q[f"{n}.weight"], q[f"{n}.scales"], q[f"{n}.biases"], group_size=32, bits=4))

    for l in (0, 1):
        ex = L4_EXP.format(l=l)
        w = _f64(ref[f"{ex}.gate_up_proj"]).transpose(0, 2, 1)
        wh = np.concatenate([deq(f"{ex}.gate_proj"), deq(f"{ex}.up_proj")], axis=1)
        _expert_rows(rows, f"{ex}.gate_up_proj", wh, w)
        assert set(rows[f"{ex}.2.gate_up_proj"].variant_layer.split(",")) == {f"{ex}.gate_proj", f"{ex}.up_proj"}
        d = _f64(ref[f"{ex}.down_proj"]).transpose(0, 2, 1)
        _expert_rows(rows, f"{ex}.down_proj", deq(f"{ex}.down_proj"), d)
    assert len(rows) == 2 * 2 * E + 2 * 8 + 2  # (experts; q, k, v, o, router, the shared expert; embeddings, head)


@pytest.mark.parametrize("name, home", [("qwen3vlmoe", "mlp.switch_mlp"), ("gemma4", "experts.switch_glu"),
                                        ("qwen35moe", "mlp.switch_mlp")])
def test_against_mlx_lms_conversion_where_it_moves_the_stacks(name, home):
    # mlx_lm.convert's output renames the text model (language_model.model.…) and moves the
    # experts (Qwen3-VL-MoE: [E, K, 2I] into mlp.switch_mlp; Gemma 4: [E, 2I, K] into
    # experts.switch_glu; Qwen3.5-MoE: [E, 2I, K] into mlp.switch_mlp): every expert of both
    # stacks measured against mx.dequantize of theirs
    src, theirs = REAL / f"{name}-bf16", REAL / f"mlxlm-{name}-q4-g32"
    res = sweep(analyze(open_checkpoint(src)), {"mlx": analyze(open_checkpoint(theirs))}, engine="numpy")
    rows = {r.name: r for r in res.rows}
    ref, q = mx.load(str(src / "model.safetensors")), mx.load(str(theirs / "model.safetensors"))
    moves = "mlp." if name.startswith("qwen") else ""
    for l in (0, 1):
        ex = f"model.language_model.layers.{l}.{moves}experts"
        mine = f"language_model.model.layers.{l}.{home}"

        def deq(p, mine=mine):
            return _f64(mx.dequantize(q[f"{mine}.{p}.weight"], q[f"{mine}.{p}.scales"], q[f"{mine}.{p}.biases"],
                                      group_size=32, bits=4))

        gu, dn = _f64(ref[f"{ex}.gate_up_proj"]), _f64(ref[f"{ex}.down_proj"])
        if name == "qwen3vlmoe":  # ([E, K, N] as stored)
            gu, dn = gu.transpose(0, 2, 1), dn.transpose(0, 2, 1)
        _expert_rows(rows, f"{ex}.gate_up_proj", np.concatenate([deq("gate_proj"), deq("up_proj")], axis=1), gu)
        _expert_rows(rows, f"{ex}.down_proj", deq("down_proj"), dn)
    # (Gemma 4's per-layer projection, 16 inputs, and Qwen3.5's conv1d are kept dense by mlx-lm:
    # listed, not compared)
    assert all("per_layer_projection" in u.layer or "conv1d" in u.layer for u in res.unmatched), res.unmatched
    # nothing taken for smoothing: mlx-lm stores Qwen3.5's norms as 1 + w (the same norm); taken
    # for AWQ's folded scales, they made the layers after them "implausible" (rel_fro 0.7–1.03)
    assert {r.smoothing for r in res.rows} == {"none"} and max(r.rel_fro for r in res.rows) < 0.09


def test_gemma4s_and_qwen35s_widths_are_dimensions_of_the_model(capsys):
    # Gemma 4's embed_tokens_per_layer takes num_hidden_layers × hidden_size_per_layer_input
    # inputs (32 here), Qwen3.5's linear_attn.out_proj its value heads (2 × 32): R18 warned that
    # 4 bit / 32 were "not a dimension of this model" on every such MLX checkpoint
    assert main(["info", str(REAL / "mlxlm-gemma4-q4-g32")]) == 0
    out = capsys.readouterr().out
    assert "language_model.model.embed_tokens_per_layer      mlx-affine    4b     g32        1024×32" in out
    assert "R18" not in out and "warning" not in out
    assert main(["info", str(REAL / "mlxlm-qwen35moe-q4-g32")]) == 0
    out = capsys.readouterr().out
    assert "linear_attn.out_proj" in out and "R18" not in out and "warning" not in out


def test_norms_stored_as_one_plus_w_are_no_smoothing():
    # either side may be mlx-lm's (1 + w)
    from quantscope.backend.compare_align import align
    ref, mine = analyze(open_checkpoint(REAL / "qwen35moe-bf16")), analyze(open_checkpoint(REAL / "mlxlm-qwen35moe-q4-g32"))
    for a, b in ((ref, mine), (mine, ref)):
        al = align(a, b)
        assert not al.folded_norms and len(al.norms_plus_one) == 4  # (two layers' input and post-attention norms)


def test_llama4_layer_detail_counts_both_halves():
    ex = L4_EXP.format(l=0)
    d = layer_detail(analyze(open_checkpoint(L4)), {"mlx": analyze(open_checkpoint(L4_MLX))}, f"{ex}.gate_up_proj")
    assert d.code_counts["mlx"].sum() == E * 2 * I * H  # gate's codes and up's
    q = mx.load(str(L4_MLX / "model.safetensors"))
    ref = np.array(mx.load(str(L4 / "model.safetensors"))[f"{ex}.gate_up_proj"].astype(mx.float32))
    assert d.value_counts["reference"].sum() == ref.size
    want = [np.array(q[f"{ex}.{p}.scales"].astype(mx.float32)).reshape(-1) for p in ("gate_proj", "up_proj")]
    assert sorted(np.asarray(d.scales["mlx"]).reshape(-1)) == sorted(np.concatenate(want))


def test_llama4_cli_info_and_doctor(capsys):
    assert main(["info", str(L4)]) == 0
    out = capsys.readouterr().out
    assert "as gate_up_proj [E, K, N], read transposed" in out
    assert f"{L4_EXP.format(l=0)}.gate_up_proj" in out and "4×192×128" in out
    findings = diagnose(L4)
    assert not [f for f in findings if f.severity in ("error", "warning")], [str(f) for f in findings]


def test_counterparts_across_the_layouts():
    l4 = analyze(open_checkpoint(L4))
    mlx = analyze(open_checkpoint(L4_MLX))
    ex = L4_EXP.format(l=0)
    assert counterpart(f"{ex}.gate_up_proj", mlx)[0] == f"{ex}.gate_proj"
    assert counterpart(f"{ex}.up_proj", l4)[0] == f"{ex}.gate_up_proj"
    # an expert's row of the reference's stack: that expert of the variant's split stacks
    assert counterpart(f"{ex}.2.gate_up_proj", mlx) == (f"{ex}.gate_proj",
                                                       "expert 2 of the stacked experts, stored split; gate_proj shown")
    assert counterpart(f"{ex}.2.up_proj", l4) == (f"{ex}.gate_up_proj",
                                                 "expert 2 of the stacked experts, its rows of the fused gate_up_proj")


def test_the_trees_error_shows_beside_both_parts():
    from quantscope.app.main_window import errors_and_notes
    res = sweep(analyze(open_checkpoint(L4)), {"mlx": analyze(open_checkpoint(L4_MLX))}, engine="numpy")
    per, _ = errors_and_notes(res.rows)
    ex = L4_EXP.format(l=1)
    worst = max(r.rel_fro for r in res.rows if r.reference_layer == f"{ex}.gate_up_proj")
    # (beside the variant's parts, and the reference's stack in its own tree: the worst expert)
    assert per["mlx"][f"{ex}.gate_proj"] == per["mlx"][f"{ex}.up_proj"] == per["mlx"][f"{ex}.gate_up_proj"] == worst


# -- the other layouts, made here ----------------------------------------------------------------------

def _weights(seed=0):
    rng = np.random.default_rng(seed)
    # [E, N, K] as the model computes, gate rows then up rows in each expert
    gate, up = (rng.standard_t(5, (E, I, H)) * 0.02 for _ in range(2))
    down = rng.standard_t(5, (E, H, I)) * 0.02
    return {k: np.asarray(v.astype(np.float32).astype(BF16)) for k, v in
            {"gate": gate, "up": up, "down": down}.items()}


def _write(folder: Path, tensors: dict, cfg: dict) -> Path:
    folder.mkdir(parents=True)
    write_st(folder / "model.safetensors", tensors, {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _q(w: np.ndarray, prefix: str, out: dict, **kw) -> np.ndarray:
    """mx.quantize of ``w`` [E, N, K] as mlx-lm stores it under ``prefix``; its mx.dequantize."""
    a = mx.array(w.astype(np.float32)).astype(mx.bfloat16)
    parts = mx.quantize(a, **kw)
    names = ("weight", "scales", "biases")[:len(parts)]
    for n, p in zip(names, parts):
        out[f"{prefix}.{n}"] = np.array(p) if p.dtype != mx.bfloat16 else np.array(p.astype(mx.float32)).astype(BF16)
    return _f64(mx.dequantize(*parts, **kw))


@pytest.mark.parametrize("model_type", ["qwen3_vl_moe", "gemma4"])
def test_concatenated_stacks_where_mlx_lm_moves_them(tmp_path, model_type):
    # Qwen3-VL-MoE: [E, K, 2I] -> switch_mlp.{gate,up}_proj (split on the last axis, swapped);
    # Gemma 4: [E, 2I, K] -> experts.switch_glu.{gate,up}_proj (split on axis -2, as stored)
    w = _weights()
    gu = np.concatenate([w["gate"], w["up"]], axis=1)  # [E, 2I, K]
    block = "model.language_model.layers.0.mlp" if model_type == "qwen3_vl_moe" else "model.language_model.layers.0"
    if model_type == "qwen3_vl_moe":
        stored = {f"{block}.experts.gate_up_proj": np.ascontiguousarray(gu.transpose(0, 2, 1)),
                  f"{block}.experts.down_proj": np.ascontiguousarray(w["down"].transpose(0, 2, 1))}
        home, vblock = "switch_mlp", "language_model.model.layers.0.mlp"
    else:
        stored = {f"{block}.experts.gate_up_proj": gu, f"{block}.experts.down_proj": w["down"]}
        home, vblock = "experts.switch_glu", "language_model.model.layers.0"
    cfg = {"model_type": model_type, "text_config": {"hidden_size": H, "model_type": model_type + "_text"}}
    ref = _write(tmp_path / "ref", stored, cfg)
    var, expect = {}, {}
    for p in ("gate", "up", "down"):
        expect[p] = _q(w[p], f"{vblock}.{home}.{p}_proj", var, group_size=32, bits=4)
    var_dir = _write(tmp_path / "mlx", var, {**cfg, "quantization": {"group_size": 32, "bits": 4}})
    rm = analyze(open_checkpoint(ref))
    t = rm.layers[f"{block}.experts.gate_up_proj"].tensors["weight"]
    assert t.transposed == (model_type == "qwen3_vl_moe") and tuple(rm.layers[t.source].shape) == (E, 2 * I, H)
    res = sweep(rm, {"mlx": analyze(open_checkpoint(var_dir))}, engine="numpy")
    assert not res.unmatched
    rows = {r.name: r for r in res.rows}
    want = np.concatenate([expect["gate"], expect["up"]], axis=1)
    _expert_rows(rows, f"{block}.experts.gate_up_proj", want, gu.astype(np.float64))
    _expert_rows(rows, f"{block}.experts.down_proj", expect["down"], w["down"].astype(np.float64))
    assert counterpart(f"{vblock}.{home}.up_proj", rm)[0] == f"{block}.experts.gate_up_proj"


@pytest.fixture(scope="module")
def gptoss_bf16(tmp_path_factory):
    """A bf16 gpt-oss (transformers' GptOssExperts: gate_up_proj [E, K, 2I], gate and up
    interleaved along the last axis; biases), its MXFP4 original layout (OpenAI's) and mlx-lm's
    split conversion, both from mx.quantize(mode="mxfp4") of the same weights."""
    root = tmp_path_factory.mktemp("gptoss_bf16")
    w = _weights(1)
    rng = np.random.default_rng(2)
    gu = np.empty((E, 2 * I, H), BF16)
    gu[:, 0::2], gu[:, 1::2] = w["gate"], w["up"]
    ex = "model.layers.0.mlp.experts"
    bias = {"gate_up_proj": rng.normal(0, 0.01, (E, 2 * I)).astype(BF16), "down_proj": rng.normal(0, 0.01, (E, H)).astype(BF16)}
    q = {"model.layers.0.self_attn.q_proj.weight": rng.normal(0, 0.02, (H, H)).astype(BF16)}
    cfg = {"model_type": "gpt_oss", "hidden_size": H, "intermediate_size": I, "num_local_experts": E}
    ref = _write(root / "bf16", {**q, f"{ex}.gate_up_proj": np.ascontiguousarray(gu.transpose(0, 2, 1)),
                                 f"{ex}.gate_up_proj_bias": bias["gate_up_proj"],
                                 f"{ex}.down_proj": np.ascontiguousarray(w["down"].transpose(0, 2, 1)),
                                 f"{ex}.down_proj_bias": bias["down_proj"]}, cfg)
    oai, split, expect = dict(q), dict(q), {}
    for proj, m in (("gate_up_proj", gu), ("down_proj", w["down"])):
        a = mx.array(m.astype(np.float32)).astype(mx.bfloat16)
        wq, sc = mx.quantize(a, group_size=32, bits=4, mode="mxfp4")
        expect[proj] = _f64(mx.dequantize(wq, sc, group_size=32, bits=4, mode="mxfp4"))
        words, scales = np.array(wq), np.array(sc).view(np.uint8)
        oai[f"{ex}.{proj}_blocks"] = words.view(np.uint8).reshape(E, m.shape[1], -1, 16)
        oai[f"{ex}.{proj}_scales"], oai[f"{ex}.{proj}_bias"] = scales, bias[proj]
        if proj == "gate_up_proj":  # mlx-lm's gpt_oss sanitize: gate = even rows, up = odd rows
            for name, sl in (("gate_proj", slice(0, None, 2)), ("up_proj", slice(1, None, 2))):
                split[f"{ex}.{name}.weight"] = np.ascontiguousarray(words[:, sl])
                split[f"{ex}.{name}.scales"] = np.ascontiguousarray(scales[:, sl])
        else:
            split[f"{ex}.down_proj.weight"], split[f"{ex}.down_proj.scales"] = words, scales
    orig = _write(root / "mxfp4", oai, {**cfg, "quantization_config": {"quant_method": "mxfp4"}})
    mlx = _write(root / "mlx", split, {**cfg, "quantization": {"group_size": 32, "bits": 4, "mode": "mxfp4"}})
    return ref, orig, mlx, {"gate_up_proj": gu.astype(np.float64), "down_proj": w["down"].astype(np.float64)}, expect


def test_bf16_gptoss_is_the_reference_for_openais_mxfp4_and_mlx_lms(gptoss_bf16):
    ref, orig, mlx, dense, expect = gptoss_bf16
    rm = analyze(open_checkpoint(ref))
    ex = "model.layers.0.mlp.experts"
    layer = rm.layers[f"{ex}.gate_up_proj"]
    assert tuple(layer.shape) == (E, 2 * I, H) and set(layer.tensors) == {"weight", "bias"}
    np.testing.assert_array_equal(NumpyEngine().dequantize(rm, layer), dense["gate_up_proj"].astype(np.float32))
    res = sweep(rm, {"oai": analyze(open_checkpoint(orig)), "mlx": analyze(open_checkpoint(mlx))}, engine="numpy")
    for v in ("oai", "mlx"):
        rows = {r.name: r for r in res.rows if r.variant == v}
        for proj in ("gate_up_proj", "down_proj"):
            _expert_rows(rows, f"{ex}.{proj}", expect[proj], dense[proj])
    assert {u.layer for u in res.unmatched} == {"model.layers.0.self_attn.q_proj"}  # (unquantized in both)


def test_orientation_without_the_pair(tmp_path):
    # one projection alone: the hidden size decides; where it cannot, the model type
    rng = np.random.default_rng(3)
    a = rng.normal(0, 0.02, (E, H, 2 * I)).astype(BF16)  # [E, K=hidden, N]
    for cfg, transposed in (({"model_type": "llama4", "text_config": {"hidden_size": H}}, True),
                            ({"model_type": "x", "hidden_size": 2 * I}, False),  # (hidden 192: the last axis is K)
                            ({"model_type": "gemma4"}, False),
                            ({"model_type": "llama4"}, True)):
        d = _write(tmp_path / f"m{len(list(tmp_path.iterdir()))}", {"m.layers.0.mlp.experts.gate_up_proj": a}, cfg)
        t = open_checkpoint(d).modules()["m.layers.0.mlp.experts.gate_up_proj"].tensors["weight"]
        assert t.transposed is transposed, cfg


# -- convert -------------------------------------------------------------------------------------------

def _hf_name(name: str) -> str:
    """mlx-lm's name of a multimodal model's tensor as the source names it (convert keeps the
    source's names; mlx-lm's sanitize renames them when it loads)."""
    return name.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head", "lm_head")


@pytest.mark.parametrize("src, theirs, renamed", [
    (L4, L4_MLX, False), (REAL / "gptoss-bf16", REAL / "mlxlm-gptoss-q4-g32", False),
    (REAL / "qwen3vlmoe-bf16", REAL / "mlxlm-qwen3vlmoe-q4-g32", True),
    (REAL / "gemma4-bf16", REAL / "mlxlm-gemma4-q4-g32", True),
    (REAL / "qwen35moe-bf16", REAL / "mlxlm-qwen35moe-q4-g32", True)])
def test_convert_to_mlx_writes_what_mlx_lm_writes(tmp_path, src, theirs, renamed):
    # Llama 4 (gate and up concatenated) by mlx_lm.convert, gpt-oss (interleaved, with biases) by
    # mlx-lm's quantize_model; Qwen3-VL-MoE (into mlp.switch_mlp), Gemma 4 (stored rows first, into
    # experts.switch_glu) and Qwen3.5-MoE (rows first, into mlp.switch_mlp) by mlx_lm.convert: every
    # tensor of theirs, bit for bit, and nothing more
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--to", "mlx", "--bits", "4", "--group-size", "32"]) == 0
    ours, want = mx.load(str(out / "model.safetensors")), {}
    for f in theirs.glob("*.safetensors"):
        want.update({_hf_name(k) if renamed else k: v for k, v in mx.load(str(f)).items()})
    assert set(ours) == set(want)
    if "qwen35" in src.name:
        # (mlx-lm's qwen3_5 sanitize moved the conv1d's axes and added 1 to the norms of the
        # transformers file it read; convert keeps them as stored, and mlx-lm's loader, seeing the
        # conv1d as transformers stores it, does the same to convert's output)
        for k in [k for k in want if k.endswith(("conv1d.weight", "norm.weight")) and "linear_attn.norm" not in k]:
            fixed = ours.pop(k)
            fixed = fixed.swapaxes(1, 2) if k.endswith("conv1d.weight") else fixed + 1.0
            assert mx.array_equal(fixed, want.pop(k)).item(), k
    for k, v in want.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape and mx.array_equal(ours[k], v).item(), k
    cfg = json.loads((out / "config.json").read_text())["quantization"]
    assert (cfg["bits"], cfg["group_size"]) == (4, 32)


def test_convert_carries_the_parameters_it_cannot_lay_out_as_mlx_lm(tmp_path, capsys):
    # --to dense keeps every model's as stored; --to mlx, a model whose mlx-lm layout was not
    # checked here: carried as stored, and said so
    from safetensors import safe_open
    w = _weights()
    ex = "model.language_model.layers.0.mlp.experts"
    gu = np.ascontiguousarray(np.concatenate([w["gate"], w["up"]], axis=1).transpose(0, 2, 1))
    src = _write(tmp_path / "src", {f"{ex}.gate_up_proj": gu,
                                    f"{ex}.down_proj": np.ascontiguousarray(w["down"].transpose(0, 2, 1))},
                 {"model_type": "some_new_moe", "text_config": {"hidden_size": H}})
    for to in ("dense", "mlx"):
        out = tmp_path / to
        assert main(["convert", str(src), str(out), "--to", to]) == 0
        text = capsys.readouterr().out
        with safe_open(str(out / "model.safetensors"), "np") as b:
            assert sorted(b.keys()) == [f"{ex}.down_proj", f"{ex}.gate_up_proj"]
            assert b.get_slice(f"{ex}.gate_up_proj").get_shape() == list(gu.shape)
        if to == "mlx":
            assert "transformers' stacked expert parameter gate_up_proj [E, K, N], carried as stored" in text
        back = analyze(open_checkpoint(out))
        np.testing.assert_array_equal(NumpyEngine().dequantize(back, back.layers[f"{ex}.gate_up_proj"]),
                                      gu.transpose(0, 2, 1).astype(np.float32))


def test_the_tree_says_how_the_parameter_is_stored(qtbot):
    from PySide6.QtCore import Qt
    from quantscope.widgets.tensor_tree_model import TensorTreeModel
    m = TensorTreeModel()
    m.set_checkpoint(analyze(open_checkpoint(L4)))
    names = [m.index(r, 0).data() for r in range(m.rowCount())]
    parent = m.index(names.index(f"{L4_EXP.format(l=0)}.gate_up_proj"), 0)
    assert m.index(0, 0, parent).data() == ".weight" and m.index(0, 4, parent).data().replace(" ", "") in ("4×192×128",)
    tip = m.index(0, 0, parent).data(Qt.ItemDataRole.ToolTipRole)
    assert f"stored as {L4_EXP.format(l=0)}.gate_up_proj [4, 128, 192] ([E, K, N], read transposed)" in tip


def test_a_transposed_reference_read_in_blocks(tmp_path):
    # 3 experts of 200 rows × 512: the sweep reads each expert's rows of the reference in blocks
    # (of 64 rows, the last one short), transposed; every figure equals numpy's on that expert
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((3, 200, 512)) * 0.02).astype(np.float32).astype(BF16)  # [E, N, K]
    ex = "model.layers.0.mlp.experts"
    cfg = {"model_type": "llama4", "text_config": {"hidden_size": 200}}  # (down_proj: N is the hidden size)
    ref = _write(tmp_path / "ref", {f"{ex}.down_proj": np.ascontiguousarray(w.transpose(0, 2, 1))}, cfg)
    var = {}
    got = _q(w, f"{ex}.down_proj", var, group_size=64, bits=3)
    vdir = _write(tmp_path / "mlx", var, {**cfg, "quantization": {"group_size": 64, "bits": 3}})
    rm = analyze(open_checkpoint(ref))
    assert rm.layers[f"{ex}.down_proj"].tensors["weight"].transposed
    rows = sweep(rm, {"mlx": analyze(open_checkpoint(vdir))}, engine="numpy").rows
    assert [r.expert for r in rows] == [0, 1, 2]
    for e, row in enumerate(rows):
        d = got[e] - w[e].astype(np.float64)
        assert row.rel_fro == pytest.approx(np.linalg.norm(d) / np.linalg.norm(w[e].astype(np.float64)), rel=1e-9)
        assert row.max_abs == np.abs(d).max()
        for p in (50, 95, 99):
            assert getattr(row, f"p{p}") == pytest.approx(np.percentile(np.abs(d), p), rel=1e-9), p


@pytest.mark.parametrize("src", [L4, REAL / "gptoss-bf16"])
def test_a_stack_against_experts_stored_one_by_one(tmp_path, src):
    # llm-compressor and GPTQModel unpack these stacks into one module per expert: each expert
    # is a row of its own, gate_up_proj's made of the variant's gate_proj and up_proj
    ck = open_checkpoint(src)
    ref = analyze(ck)
    stacks = [p for p, lay in ref.layers.items() if lay.tensors.get("weight") is not None
              and lay.tensors["weight"].source is not None]
    assert len(stacks) == 4
    var, want = {}, {}
    for path in stacks:
        w = np.asarray(NumpyEngine().dequantize(ref, ref.layers[path]), np.float64)  # [E, N, K]
        pre, proj = path.rsplit(".", 1)
        for e in range(w.shape[0]):
            if proj == "gate_up_proj":
                gate, up = (w[e, 0::2], w[e, 1::2]) if "gptoss" in src.name else np.split(w[e], 2)
                got = np.concatenate([_q(gate, f"{pre}.{e}.gate_proj", var, group_size=32, bits=4),
                                      _q(up, f"{pre}.{e}.up_proj", var, group_size=32, bits=4)])
                if "gptoss" in src.name:  # (back in the stack's interleaved order)
                    got = np.stack([got[:len(gate)], got[len(gate):]], 1).reshape(w[e].shape)
            else:
                got = _q(w[e], f"{pre}.{e}.{proj}", var, group_size=32, bits=4)
            want[f"{pre}.{e}.{proj}"] = _rel(got, w[e])
    vdir = _write(tmp_path / "per_expert", var, {**json.loads((src / "config.json").read_text()),
                                                 "quantization": {"group_size": 32, "bits": 4}})
    vm = analyze(open_checkpoint(vdir))
    res = sweep(ref, {"v": vm}, engine="numpy")
    rows = {r.name: r for r in res.rows}
    assert not [u for u in res.unmatched if ".experts." in u.layer]
    assert set(want) <= set(rows)
    for name, rel in want.items():
        assert rows[name].rel_fro == pytest.approx(rel, rel=1e-9), name
    # the window's one layer: a whole stack joined from its experts, an expert alone
    stack = next(p for p in stacks if p.endswith("gate_up_proj"))
    d = layer_detail(ref, {"v": vm}, stack)
    assert d.metrics["v"].rel_fro == pytest.approx(
        np.sqrt(sum(rows[f"{stack.rsplit('.', 1)[0]}.{e}.gate_up_proj"].mse for e in range(E))
                / sum(rows[f"{stack.rsplit('.', 1)[0]}.{e}.gate_up_proj"].mse / rows[f"{stack.rsplit('.', 1)[0]}.{e}.gate_up_proj"].rel_fro ** 2
                      for e in range(E))), rel=1e-9)
    one = f"{stack.rsplit('.', 1)[0]}.2.gate_up_proj"
    assert layer_detail(ref, {"v": vm}, one).metrics["v"].rel_fro == pytest.approx(want[one], rel=1e-9)


def test_mlx_lms_split_bf16_as_reference_for_transformers_stack(tmp_path):
    # the reverse: an mlx-lm bf16 (switch_mlp.gate_proj / up_proj) as the reference, the stack as
    # the variant (Qwen3-VL-MoE's layout, and Gemma 4's experts.switch_glu)
    w = _weights(4)
    gu = np.concatenate([w["gate"], w["up"]], axis=1)
    for model_type, home, stored in (("qwen3_vl_moe", "switch_mlp", lambda a: np.ascontiguousarray(a.transpose(0, 2, 1))),
                                     ("gemma4", "experts.switch_glu", lambda a: a)):
        cfg = {"model_type": model_type, "text_config": {"hidden_size": H}}
        ref = _write(tmp_path / f"{model_type}_mlx", {f"model.layers.0.mlp.{home}.{p}_proj.weight": w[p]
                                                      for p in ("gate", "up", "down")}, cfg)
        var = _write(tmp_path / f"{model_type}_hf", {"model.layers.0.mlp.experts.gate_up_proj": stored(gu),
                                                     "model.layers.0.mlp.experts.down_proj": stored(w["down"])}, cfg)
        res = sweep(analyze(open_checkpoint(ref)), {"hf": analyze(open_checkpoint(var))}, engine="numpy")
        assert not res.unmatched and len(res.rows) == 3 * E, model_type
        assert all(r.rel_fro == 0 for r in res.rows)


def test_odd_files(tmp_path, capsys):
    rng = np.random.default_rng(6)
    ex = "model.layers.0.mlp.experts"
    gu = rng.normal(0, 0.02, (4, 64, 96)).astype(BF16)
    # a parameter stored beside a tensor of its view's name: that one is the weight, the parameter
    # stays its parent's, and both are carried
    both = _write(tmp_path / "both", {f"{ex}.gate_up_proj": gu, f"{ex}.gate_up_proj.weight": gu[:, :, :64].copy()},
                  {"model_type": "llama4"})
    mods = open_checkpoint(both).modules()
    assert mods[f"{ex}.gate_up_proj"].tensors["weight"].name == f"{ex}.gate_up_proj.weight"
    assert mods[ex].tensors["gate_up_proj"].name == f"{ex}.gate_up_proj"
    assert main(["convert", str(both), str(tmp_path / "both_out"), "--to", "dense"]) == 0
    assert set(mx.load(str(tmp_path / "both_out" / "model.safetensors"))) == {f"{ex}.gate_up_proj",
                                                                             f"{ex}.gate_up_proj.weight"}
    # no rows: nothing read, nothing divided by zero
    empty = _write(tmp_path / "empty", {f"{ex}.gate_up_proj": np.zeros((4, 64, 0), BF16)}, {"model_type": "llama4"})
    ck = open_checkpoint(empty)
    assert ck.rows(f"{ex}.gate_up_proj.weight", 0, 5).shape == (0, 64)
    d = layer_detail(analyze(ck), {"same": analyze(open_checkpoint(empty))}, f"{ex}.gate_up_proj")
    assert d is not None and all(c.sum() == 0 for c in d.value_counts.values())
    # the doctor names what the file stores
    bad = gu.copy()
    bad[1, 2, 3] = np.nan
    nan = _write(tmp_path / "nan", {f"{ex}.gate_up_proj": bad, f"{ex}.down_proj_bias": np.zeros(3, BF16),
                                    f"{ex}.down_proj": rng.normal(0, 0.02, (4, 48, 64)).astype(BF16)},
                 {"model_type": "llama4", "text_config": ["not", "an", "object"]})
    found = {(f.rule, f.tensor) for f in diagnose(nan, full=True)}
    assert ("values.non-finite", f"{ex}.gate_up_proj") in found
    assert ("layer.inconsistent", f"{ex}.down_proj_bias") in found
    assert main(["info", str(nan)]) == 0  # (a text_config that is no object: exit 3 before)
    capsys.readouterr()


def test_convert_keeps_a_stack_dense_in_mlx_lms_layout(tmp_path):
    # gpt-oss's down_proj (96 inputs) cannot take groups of 64: kept dense, but as mlx-lm's
    # experts.down_proj.weight [E, N, K] with its bias: mlx-lm's gpt_oss sanitize leaves a file
    # holding experts.gate_proj.weight as it is, and refused the stored parameter beside it
    src = REAL / "gptoss-bf16"
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--to", "mlx", "--group-size", "64"]) == 0
    got, raw = mx.load(str(out / "model.safetensors")), mx.load(str(src / "model.safetensors"))
    ex = "model.layers.1.mlp.experts"
    assert f"{ex}.down_proj" not in got and f"{ex}.down_proj_bias" not in got
    assert mx.array_equal(got[f"{ex}.down_proj.weight"], raw[f"{ex}.down_proj"].swapaxes(1, 2)).item()
    assert mx.array_equal(got[f"{ex}.down_proj.bias"], raw[f"{ex}.down_proj_bias"]).item()
    assert got[f"{ex}.gate_proj.weight"].dtype == mx.uint32 and got[f"{ex}.gate_proj.bias"].shape == (E, I)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q[f"{ex}.down_proj"] is False and q["group_size"] == 64


def test_experts_with_a_missing_or_odd_partner(tmp_path):
    # expert 1 lacks its up_proj, expert 3's gate_proj has the wrong shape: the others compared,
    # those two said once (their present parts are theirs, not layers the reference lacks); the
    # window's one layer shows the reference's rows of a missing expert
    from quantscope.backend.compare import layer_alone
    ref = analyze(open_checkpoint(REAL / "gptoss-bf16"))
    ex = "model.layers.0.mlp.experts"
    w = np.asarray(NumpyEngine().dequantize(ref, ref.layers[f"{ex}.gate_up_proj"]))
    var = {}
    for e in range(E):
        if e != 3:
            _q(w[e, 0::2], f"{ex}.{e}.gate_proj", var, group_size=32, bits=4)
        else:
            _q(w[e, 0::2, :64], f"{ex}.{e}.gate_proj", var, group_size=32, bits=4)
        if e != 1:
            _q(w[e, 1::2], f"{ex}.{e}.up_proj", var, group_size=32, bits=4)
    vdir = _write(tmp_path / "v", var, {"model_type": "gpt_oss", "hidden_size": H,
                                        "quantization": {"group_size": 32, "bits": 4}})
    res = sweep(ref, {"v": analyze(open_checkpoint(vdir))}, engine="numpy")
    rows = {r.name: r for r in res.rows}
    assert sorted(rows) == [f"{ex}.0.gate_up_proj", f"{ex}.2.gate_up_proj"]
    assert [r.expert for r in res.rows] == [0, 2]
    why = {u.layer: u.reason for u in res.unmatched}
    assert why[f"{ex}.1.gate_up_proj"] == "absent in the variant (it has only gate_proj)"
    assert why[f"{ex}.3.gate_up_proj"].startswith("shape mismatch")
    assert not [u for u in res.unmatched if u.layer.endswith((".gate_proj", ".up_proj"))]
    d = layer_alone({"ref": ref}, f"{ex}.1.gate_up_proj")
    assert d.value_counts["ref"].sum() == 2 * I * H


def test_mlx_lms_own_stacks_as_reference_for_experts_one_by_one(tmp_path):
    # mlx-lm's bf16 Llama 4 keeps experts.{gate,up,down}_proj [E, N, K] (split, .weight): against
    # experts stored one by one, expert by expert too
    ref = analyze(open_checkpoint(L4))
    ex = L4_EXP.format(l=0)
    w = np.asarray(NumpyEngine().dequantize(ref, ref.layers[f"{ex}.gate_up_proj"]))
    stacks = {"gate_proj": w[:, :I], "up_proj": w[:, I:]}
    mref = _write(tmp_path / "mlx_bf16", {f"{ex}.{p}.weight": a.astype(BF16) for p, a in stacks.items()},
                  {"model_type": "llama4"})
    var, want = {}, {}
    for p, a in stacks.items():
        for e in range(E):
            want[f"{ex}.{e}.{p}"] = _rel(_q(a[e], f"{ex}.{e}.{p}", var, group_size=32, bits=4), a[e].astype(np.float64))
    vdir = _write(tmp_path / "v", var, {"model_type": "llama4", "quantization": {"group_size": 32, "bits": 4}})
    res = sweep(analyze(open_checkpoint(mref)), {"v": analyze(open_checkpoint(vdir))}, engine="numpy")
    assert not res.unmatched
    assert {r.name: r.rel_fro for r in res.rows} == pytest.approx(want, rel=1e-9)
    assert sorted({r.expert for r in res.rows}) == list(range(E))


def test_attention_sinks_are_no_undecodable_layer():
    # gpt-oss's self_attn.sinks [heads] (a float parameter of no layer): every decoder layer was
    # "cannot be decoded: no weight tensor recognised"
    m = analyze(open_checkpoint(REAL / "gptoss-bf16"))
    sinks = m.layers["model.layers.0.self_attn"]
    assert set(sinks.tensors) == {"sinks"} and sinks.problem is None
    assert not [p for p, lay in m.layers.items() if lay.problem]


@pytest.fixture(scope="module")
def l4_smoothed(tmp_path_factory):
    """mlx-lm's Llama 4 with AWQ-style smoothing folded into each post-attention norm: the
    experts' and the shared expert's gate/up inputs multiplied by s, the norm divided by it."""
    out = tmp_path_factory.mktemp("l4_smoothed")
    ref, var = mx.load(str(L4 / "model.safetensors")), dict(mx.load(str(L4_MLX / "model.safetensors")))
    rng = np.random.default_rng(0)
    for l in (0, 1):
        s = rng.uniform(0.5, 2.0, H).astype(np.float32)
        ex, sh = L4_EXP.format(l=l), f"language_model.model.layers.{l}.feed_forward.shared_expert"
        w = np.array(ref[f"{ex}.gate_up_proj"].astype(mx.float32)).transpose(0, 2, 1) * s
        parts = {f"{ex}.gate_proj": w[:, :I], f"{ex}.up_proj": w[:, I:]}
        parts.update({f"{sh}.{p}": np.array(ref[f"{sh}.{p}.weight"].astype(mx.float32)) * s for p in ("gate_proj", "up_proj")})
        for name, a in parts.items():
            for c, q in zip(("weight", "scales", "biases"),
                            mx.quantize(mx.array(a).astype(mx.bfloat16), group_size=32, bits=4)):
                var[f"{name}.{c}"] = q
        nk = f"language_model.model.layers.{l}.post_attention_layernorm.weight"
        var[nk] = mx.array(np.array(ref[nk].astype(mx.float32)) / s).astype(ref[nk].dtype)
    mx.save_safetensors(str(out / "model.safetensors"), var, metadata={"format": "mlx"})
    (out / "config.json").write_text((L4_MLX / "config.json").read_text())
    return out


def test_a_smoothed_stack_expert_by_expert_and_whole(l4_smoothed):
    # the sweep undoes the norm's smoothing expert by expert; the window's whole stack (one
    # target, smoothing undone once) gives the figure of all its experts' rows together
    ref, vm = analyze(open_checkpoint(L4)), analyze(open_checkpoint(l4_smoothed))
    res = sweep(ref, {"v": vm}, engine="numpy")
    ex = L4_EXP.format(l=1)
    rows = [r for r in res.rows if r.reference_layer == f"{ex}.gate_up_proj"]
    assert len(rows) == E and all(r.smoothing.startswith("norm:") and r.rel_fro < r.rel_fro_raw / 3 for r in rows)
    d = layer_detail(ref, {"v": vm}, f"{ex}.gate_up_proj")
    assert "v" in d.metrics and d.metrics["v"].smoothing.startswith("norm:")
    whole = np.sqrt(sum(r.mse for r in rows) / sum(r.mse / r.rel_fro ** 2 for r in rows))
    assert d.metrics["v"].rel_fro == pytest.approx(whole, rel=1e-9)
    assert "v" in layer_detail(ref, {"v": vm}, f"{ex}.down_proj").metrics


def test_layers_by_a_stacks_name_and_the_trees_stacks():
    from quantscope.app.main_window import errors_and_notes
    ref, vm = analyze(open_checkpoint(L4)), analyze(open_checkpoint(L4_MLX))
    ex = L4_EXP.format(l=0)
    res = sweep(ref, {"mlx": vm}, engine="numpy", layers=r"layers\.0\.feed_forward\.experts\.gate_up_proj$")
    assert sorted(r.name for r in res.rows) == [f"{ex}.{e}.gate_up_proj" for e in range(E)]
    # (Gemma 4's stack at experts.switch_glu: its worst expert beside it in the tree)
    assert "language_model.model.layers.0.experts.switch_glu.gate_proj" in containers(
        "language_model.model.layers.0.experts.2.gate_proj")
    per, _ = errors_and_notes(res.rows)
    assert per["mlx"][f"{ex}.gate_up_proj"] == max(r.rel_fro for r in res.rows)


def test_a_quantized_stack_as_reference_stays_one_row():
    # (a conversion verified against its quantized source: each stack in one pass)
    vm = analyze(open_checkpoint(L4_MLX))
    res = sweep(vm, {"same": vm}, engine="numpy", layers=r"layers\.0\.feed_forward\.experts\.")
    assert sorted(r.name for r in res.rows) == [f"{L4_EXP.format(l=0)}.{p}" for p in ("down_proj", "gate_proj", "up_proj")]
