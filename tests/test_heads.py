"""Per-head error of attention layers: the heads read from config.json, and each head's relative
error equal to a direct numpy computation on decodes made without quantscope's decoders."""

from pathlib import Path

import numpy as np
import pytest
from quantscope.backend.checkpoint import open_checkpoint
from quantscope.backend.compare import layer_detail
from quantscope.backend.heads import head_layout
from quantscope.backend.schemes import analyze

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "real"  # base-bf16, mlx-lm's
FIXTURES = Path(__file__).parent / "fixtures" / "real"  # GPTQModel's, with its own decodes
LLAMA = {"num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 64, "hidden_size": 384}


def _layout(cfg, path, shape):
    h = head_layout(cfg, path, shape)
    return None if h is None else (h.axis, h.sections)


def test_heads_of_a_llama_come_from_its_config():
    at = "model.layers.3.self_attn."
    assert _layout(LLAMA, at + "q_proj", (384, 384)) == ("rows", (("q", 6, 64),))
    assert _layout(LLAMA, at + "k_proj", (128, 384)) == ("rows", (("k", 2, 64),))  # the key/value heads
    assert _layout(LLAMA, at + "v_proj", (128, 384)) == ("rows", (("v", 2, 64),))
    assert _layout(LLAMA, at + "o_proj", (384, 384)) == ("columns", (("h", 6, 64),))
    fused = head_layout(LLAMA, at + "qkv_proj", (640, 384))  # Phi-3: q, then k, then v rows
    assert fused.sections == (("q", 6, 64), ("k", 2, 64), ("v", 2, 64))
    assert fused.labels()[5:8] == ["q5", "k0", "k1"] and fused.n == 10
    assert fused.group == 3  # (6 query heads on 2 key/value heads, as the split q_proj's)
    assert head_layout(LLAMA, at + "q_proj", (384, 384)).group == 3
    assert np.array_equal(fused.index(), np.repeat(np.arange(10), 64))
    # head_dim left out: hidden_size / heads
    no_hd = {k: v for k, v in LLAMA.items() if k != "head_dim"}
    assert _layout(no_hd, at + "q_proj", (384, 384)) == ("rows", (("q", 6, 64),))


def test_a_layer_heads_do_not_fit_gets_none_rather_than_wrong_heads():
    at = "model.layers.0.self_attn."
    assert head_layout(LLAMA, "model.layers.0.mlp.up_proj", (1536, 384)) is None  # no attention
    assert head_layout(LLAMA, at + "q_proj", (300, 384)) is None  # no whole number of 64-wide heads
    assert head_layout(LLAMA, at + "qkv_proj", (768, 384)) is None  # not q + 2 kv heads
    assert head_layout(LLAMA, at + "q_proj", (2, 384, 384)) is None  # a stack
    assert head_layout({}, at + "q_proj", (384, 384)) is None  # no config
    assert head_layout(None, at + "q_proj", (384, 384)) is None
    # Qwen3-Next's linear attention: its out_proj's inputs are value heads of another width
    qn = {"num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256, "hidden_size": 2048}
    assert head_layout(qn, "model.layers.0.linear_attn.out_proj", (2048, 4096)) is None
    assert head_layout(qn, "model.layers.3.self_attn.o_proj", (2048, 4096)).sections == (("h", 16, 256),)


def test_heads_of_multimodal_mla_and_gemma_layers():
    # a multimodal wrapper: the text model's heads from text_config, a vision tower's from vision_config
    vl = {"text_config": dict(LLAMA), "vision_config": {"num_heads": 16, "hidden_size": 1152}}
    assert _layout(vl, "model.language_model.layers.0.self_attn.q_proj", (384, 384)) == ("rows", (("q", 6, 64),))
    assert _layout(vl, "model.visual.blocks.0.attn.out_proj", (1152, 1152)) == ("columns", (("h", 16, 72),))
    assert head_layout({"text_config": LLAMA}, "model.vision_tower.layers.0.self_attn.q_proj", (384, 384)) is None
    # DeepSeek's MLA: q_b_proj rows of nope + rope per head, kv_b_proj of nope + v, o_proj of v
    ds = {"num_attention_heads": 4, "num_key_value_heads": 4, "hidden_size": 256, "qk_nope_head_dim": 32,
          "qk_rope_head_dim": 16, "v_head_dim": 24, "kv_lora_rank": 64, "q_lora_rank": 96}
    at = "model.layers.0.self_attn."
    assert _layout(ds, at + "q_b_proj", (4 * 48, 96)) == ("rows", (("q", 4, 48),))
    assert _layout(ds, at + "kv_b_proj", (4 * 56, 64)) == ("rows", (("kv", 4, 56),))
    assert _layout(ds, at + "o_proj", (256, 4 * 24)) == ("columns", (("h", 4, 24),))
    # Gemma 3n/4: full-attention layers' heads are global_head_dim wide
    g = {"num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256, "global_head_dim": 512,
         "hidden_size": 2048}
    assert _layout(g, at + "q_proj", (8 * 512, 2048)) == ("rows", (("q", 8, 512),))
    assert _layout(g, at + "k_proj", (2 * 256, 2048)) == ("rows", (("k", 2, 256),))


def _direct(w, wh, axis, n):
    """Each head's ‖Ŵ − W‖F / ‖W‖F in float64 with plain numpy."""
    w, wh = w.astype(np.float64), wh.astype(np.float64)
    parts = np.split(w, n, axis=axis), np.split(wh, n, axis=axis)
    return np.array([np.linalg.norm(b - a) / np.linalg.norm(a) for a, b in zip(*parts)])


def _base(name):
    """The base model's weights of ``name``, float32, read with safetensors (not quantscope)."""
    import ml_dtypes
    from safetensors.numpy import load_file
    raw = load_file(str(REAL / "base-bf16" / "model.safetensors"))[name + ".weight"]
    return raw.view(ml_dtypes.bfloat16).astype(np.float32) if raw.dtype == np.uint16 else raw.astype(np.float32)


@pytest.fixture(scope="module")
def real_models():
    if not REAL.is_dir():
        pytest.skip("../shared/fixtures/real is not beside the checkout")
    ref = analyze(open_checkpoint(REAL / "base-bf16"))
    variants = {"gptq": analyze(open_checkpoint(FIXTURES / "gptqmodel-gptq-w4g128")),
                "actorder": analyze(open_checkpoint(FIXTURES / "gptqmodel-gptq-w4g128-actorder")),
                "mlx": analyze(open_checkpoint(REAL / "mlx-affine-q4-g64"))}
    return ref, variants


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"])
def test_head_errors_of_gptq_rows_equal_numpy_on_gptqmodel_own_decode(real_models, name, kernel_path):
    """Heads of rows: GPTQModel's own dequantization (decoded.npz) against the base's bf16
    weights (base-reference.npz), split into the config's heads, with numpy."""
    ref, variants = real_models
    d = layer_detail(ref, {k: variants[k] for k in ("gptq", "actorder")}, name)
    base = np.load(FIXTURES / "base-reference.npz")[name]
    n = 6 if name.endswith("q_proj") else 2
    assert d.heads.n == n and d.heads.axis == "rows"
    for label, folder in (("gptq", "gptqmodel-gptq-w4g128"), ("actorder", "gptqmodel-gptq-w4g128-actorder")):
        tool = np.load(FIXTURES / folder / "decoded.npz")[name]
        want = _direct(base, tool, 0, n)
        np.testing.assert_allclose(d.head_error[label], want, rtol=1e-6)
        # the heads differ: a real split, not the layer's figure n times
        assert np.ptp(want) > 1e-3
        # and together they make the layer's error
        assert np.sqrt(np.mean(d.head_error[label] ** 2)) == pytest.approx(d.metrics[label].rel_fro, rel=2e-2)


def test_head_errors_of_o_proj_columns_equal_numpy_on_mx_dequantize(real_models, kernel_path):
    """Heads of columns (o_proj's inputs): MLX's groups of 64 are each within a 64-wide head;
    mx.dequantize's values against the base's weights read with safetensors."""
    mx = pytest.importorskip("mlx.core")
    ref, variants = real_models
    name = "model.layers.1.self_attn.o_proj"
    d = layer_detail(ref, {"mlx": variants["mlx"]}, name)
    m = mx.load(str(REAL / "mlx-affine-q4-g64" / "model.safetensors"))
    wh = np.array(mx.dequantize(m[name + ".weight"], m[name + ".scales"], m[name + ".biases"], group_size=64,
                                bits=4).astype(mx.float32))
    base = _base(name)
    assert d.heads.axis == "columns" and d.heads.n == 6
    np.testing.assert_allclose(d.head_error["mlx"], _direct(base, wh, 1, 6), rtol=1e-9)


def test_head_errors_where_groups_span_heads_take_one_more_pass(real_models, kernel_path):
    """GPTQ's groups of 128 columns span two 64-wide heads of o_proj, and act-order's scatter
    over all of them: each head's columns are summed by themselves (the decode held to numpy)."""
    from quantscope.backend.engines import NumpyEngine
    ref, variants = real_models
    name = "model.layers.1.self_attn.o_proj"
    d = layer_detail(ref, {k: variants[k] for k in ("gptq", "actorder")}, name)
    w = _base(name)
    for label in ("gptq", "actorder"):
        wh = NumpyEngine().dequantize(variants[label], variants[label].layers[name])
        np.testing.assert_allclose(d.head_error[label], _direct(w, wh, 1, 6), rtol=1e-9)
        assert np.ptp(d.head_error[label]) > 1e-2


def test_a_layer_without_heads_has_none(real_models):
    ref, variants = real_models
    d = layer_detail(ref, {"gptq": variants["gptq"]}, "model.layers.0.mlp.up_proj")
    assert d.heads is None and d.head_error == {}


def test_gated_queries_layer_kinds_and_vision_towers():
    # Qwen3.5 / Qwen3-Next full attention: each head's query rows, then its gate's (2 × head_dim)
    qn = {"hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256}
    h = head_layout(qn, "model.layers.3.self_attn.q_proj", (8192, 2048))
    assert h.sections == (("q", 16, 512),) and "query and gate rows" in h.source and h.group == 8
    # Gemma's full-attention layers (layer_types): their own key/value count and width first
    g = {"hidden_size": 2048, "num_attention_heads": 8, "num_key_value_heads": 4, "num_global_key_value_heads": 2,
         "head_dim": 256, "global_head_dim": 512, "layer_types": ["sliding_attention"] * 3 + ["full_attention"]}
    assert _layout(g, "model.layers.3.self_attn.k_proj", (1024, 2048)) == ("rows", (("k", 2, 512),))
    assert _layout(g, "model.layers.0.self_attn.k_proj", (1024, 2048)) == ("rows", (("k", 4, 256),))
    assert "num_global_key_value_heads 2 × global_head_dim 512" in \
        head_layout(g, "model.layers.3.self_attn.k_proj", (1024, 2048)).source
    # Qwen-VL's vision blocks (attn.qkv fused q, k, v; attn.proj), Gemma's wrapped projections
    vl = {"text_config": LLAMA, "vision_config": {"hidden_size": 1152, "num_heads": 16}}
    assert _layout(vl, "model.visual.blocks.0.attn.qkv", (3456, 1152)) == \
        ("rows", (("q", 16, 72), ("k", 16, 72), ("v", 16, 72)))
    assert _layout(vl, "model.visual.blocks.0.attn.proj", (1152, 1152)) == ("columns", (("h", 16, 72),))
    assert head_layout(vl, "model.visual.blocks.0.mlp.proj", (1152, 1152)) is None
    gv = {"text_config": LLAMA, "vision_config": {"num_attention_heads": 16, "head_dim": 72}}
    assert _layout(gv, "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear", (1152, 1152)) == \
        ("rows", (("q", 16, 72),))
    # the source names the keys the split used: DeepSeek's heads are nope + rope wide, not hidden / heads
    ds = {"num_attention_heads": 4, "num_key_value_heads": 4, "hidden_size": 128, "qk_nope_head_dim": 64,
          "qk_rope_head_dim": 32, "v_head_dim": 32}
    assert head_layout(ds, "model.layers.0.self_attn.q_b_proj", (384, 96)).source == \
        "config.json: num_attention_heads 4 × (qk_nope_head_dim 64 + qk_rope_head_dim 32)"
    assert head_layout(LLAMA, "model.layers.0.self_attn.q_proj", (384, 384)).group == 3  # 3 q heads per k/v head


def test_a_layer_not_split_says_why():
    from quantscope.backend.heads import no_heads_why
    assert "linear attention" in no_heads_why("model.layers.0.linear_attn.out_proj")
    assert "Mamba" in no_heads_why("model.layers.0.mamba.in_proj")
    assert no_heads_why("model.layers.0.mlp.up_proj") == "not an attention projection: no heads"
    assert "no whole number of heads" in no_heads_why("model.layers.0.self_attn.q_proj")
    assert "not this layout" in no_heads_why("transformer.encoder.layers.0.self_attention.query_key_value")


def test_compare_heads_writes_each_attention_layers_heads(tmp_path, real_models):
    """`compare --heads-csv` (implying --heads): the JSON's `heads` holds every attention layer's
    per-head errors, the same as the window's (layer_detail), AWQ's smoothing undone as the sweep
    undoes it; the CSV the same figures a line per head; each variant's worst heads (against
    their layer) are listed under the table."""
    import json
    import subprocess
    import sys
    ref = real_models[0]
    out = tmp_path / "c.json"
    awq = FIXTURES / "autoawq-gemm-w4g128"
    r = subprocess.run([sys.executable, "-m", "quantscope", "compare", "--reference", str(REAL / "base-bf16"),
                        str(FIXTURES / "gptqmodel-gptq-w4g128"), str(awq), "--heads-csv", str(tmp_path / "h.csv"),
                        "--json", str(out)],
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode in (0, 1), r.stderr
    data = json.loads(out.read_text())
    rows = {(h["name"], h["variant"]): h for h in data["heads"]}
    attn = [n for n in ref.layers if "self_attn." in n]
    assert {n for n, _ in rows} == set(attn) and len(rows) == 2 * len(attn)
    from quantscope.backend.workspace import open_model
    d = layer_detail(ref, {"awq": open_model(awq)}, "model.layers.1.self_attn.o_proj")
    got = rows[("model.layers.1.self_attn.o_proj", str(awq))]
    assert list(got["heads"]) == [f"h{i}" for i in range(6)] and got["axis"] == "columns"
    assert got["group"] == 0 and rows[("model.layers.1.self_attn.q_proj", str(awq))]["group"] == 3  # (6 on 2 kv heads)
    np.testing.assert_allclose(list(got["heads"].values()), d.head_error["awq"], rtol=1e-12)
    assert got["layer_rel_fro"] == pytest.approx(d.metrics["awq"].rel_fro, rel=1e-12)
    assert "worst heads (error of the head, × its layer's; 8 attention layers measured head by head):" in r.stdout
    assert "    model.layers.1.self_attn.o_proj h4  0.1973  (1.31×)" in r.stdout
    import csv
    with (tmp_path / "h.csv").open(encoding="utf-8") as fh:
        lines = list(csv.DictReader(fh))
    assert len(lines) == sum(len(h["heads"]) for h in data["heads"])
    for ln in lines:
        js = rows[(ln["name"], ln["variant"])]
        assert float(ln["rel_fro"]) == js["heads"][ln["head"]] and ln["axis"] == js["axis"]
        assert float(ln["layer_rel_fro"]) == js["layer_rel_fro"] and ln["source"] == js["source"]
        assert float(ln["ratio"]) == pytest.approx(js["heads"][ln["head"]] / js["layer_rel_fro"], rel=1e-15)
        assert list(js["heads"])[int(ln["index"])] == ln["head"]


def test_review_cases_nemotron_mixers_mla_out_and_missing_counts():
    from quantscope.backend.heads import no_heads_why
    # Nemotron-H's attention layers keep q/k/v/o under ``mixer`` (its Mamba layers in_proj/out_proj)
    nh = {"num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "hidden_size": 4096}
    assert _layout(nh, "backbone.layers.5.mixer.q_proj", (4096, 4096)) == ("rows", (("q", 32, 128),))
    assert head_layout(nh, "backbone.layers.0.mixer.in_proj", (8192, 4096)) is None
    assert "Mamba" in no_heads_why("backbone.layers.0.mixer.in_proj")
    # MLA's o_proj: v_head_dim named where hidden / heads is as wide
    v2 = {"num_attention_heads": 16, "hidden_size": 2048, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
          "v_head_dim": 128}
    assert head_layout(v2, "model.layers.0.self_attn.o_proj", (2048, 2048)).source == \
        "config.json: num_attention_heads 16 × v_head_dim 128"
    # no counts in the config's part for this layer: said so
    why = no_heads_why("model.layers.0.self_attn.q_proj", {"encoder_attention_heads": 8})
    assert "gives no head count" in why


def test_qwen2_vl_vision_blocks_take_the_towers_own_width():
    """Qwen2-VL's vision_config gives hidden_size 3584 (the language model's, where its merger
    leads) and the tower's own width as embed_dim 1280: the fused attn.qkv and attn.proj split in
    16 heads of 80."""
    cfg = {"model_type": "qwen2_vl", "hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4,
           "vision_config": {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "num_heads": 16}}
    qkv = head_layout(cfg, "visual.blocks.3.attn.qkv", (3840, 1280))
    assert qkv.sections == (("q", 16, 80), ("k", 16, 80), ("v", 16, 80))
    assert qkv.source == "config.json vision_config: num_heads 16 × 80 (embed_dim 1280 / num_heads)"
    assert _layout(cfg, "visual.blocks.3.attn.proj", (1280, 1280)) == ("columns", (("h", 16, 80),))
    assert _layout(cfg, "model.layers.0.self_attn.q_proj", (3584, 3584)) == ("rows", (("q", 28, 128),))


def test_an_encoder_decoder_takes_each_sides_own_head_count():
    """Whisper (and BART) name their counts per side: the encoder's self-attention takes
    encoder_attention_heads, the decoder's self- and cross-attention decoder_attention_heads."""
    wh = {"model_type": "whisper", "d_model": 384, "encoder_attention_heads": 6, "decoder_attention_heads": 4}
    enc = head_layout(wh, "model.encoder.layers.1.self_attn.q_proj", (384, 384))
    assert (enc.axis, enc.sections) == ("rows", (("q", 6, 64),))
    assert enc.source == "config.json: encoder_attention_heads 6 × 64 (d_model 384 / encoder_attention_heads)"
    assert _layout(wh, "model.encoder.layers.1.self_attn.out_proj", (384, 384)) == ("columns", (("h", 6, 64),))
    assert _layout(wh, "model.decoder.layers.0.self_attn.k_proj", (384, 384)) == ("rows", (("k", 4, 96),))
    assert _layout(wh, "model.decoder.layers.0.encoder_attn.v_proj", (384, 384)) == ("rows", (("v", 4, 96),))


def test_the_worst_heads_table_names_nan_heads_and_says_when_none_were_split():
    from quantscope.app.compare_cli import worst_heads
    from quantscope.backend.compare import HeadRow
    rows = [HeadRow("m.layers.0.self_attn.q_proj", "v", ["q0", "q1", "q2"], [0.1, float("nan"), 0.3], 0.2, "rows", "s")]
    text = worst_heads(rows, ["v"])
    assert "    m.layers.0.self_attn.q_proj q2  0.3  (1.50×)" in text
    assert "    NaN/inf in 1 head(s): m.layers.0.self_attn.q_proj q1" in text
    assert worst_heads([], ["v"]).startswith("--heads: no attention layer was split into heads")


def test_heads_csv_writes_nan_and_inf_as_such(tmp_path):
    import io

    from quantscope.backend.compare import HeadRow, heads_to_csv
    rows = [HeadRow("m.layers.0.self_attn.q_proj", "v", ["q0", "q1"], [0.1, float("nan")], 0.2, "rows", "s"),
            HeadRow("m.layers.1.self_attn.q_proj", "v", ["q0"], [float("inf")], 0.0, "rows", "s"),
            HeadRow("m.layers.2.self_attn.q_proj", "v", ["q0", "q1"], [0.3, float("inf")], float("inf"), "rows", "s")]
    buf = io.StringIO()
    heads_to_csv(rows, buf)
    assert buf.getvalue().splitlines() == [
        "name,variant,head,index,axis,rel_fro,ratio,layer_rel_fro,source",
        "m.layers.0.self_attn.q_proj,v,q0,0,rows,0.1,0.5,0.2,s",
        "m.layers.0.self_attn.q_proj,v,q1,1,rows,nan,nan,0.2,s",
        "m.layers.1.self_attn.q_proj,v,q0,0,rows,inf,nan,0.0,s",
        # (an inf layer leaves its finite heads no ratio, as the window shows them: not 0)
        "m.layers.2.self_attn.q_proj,v,q0,0,rows,0.3,nan,inf,s",
        "m.layers.2.self_attn.q_proj,v,q1,1,rows,inf,nan,inf,s"]
    heads_to_csv(rows, tmp_path / "h.csv")
    assert (tmp_path / "h.csv").read_text(encoding="utf-8") == buf.getvalue()


def test_head_rows_json_names_nan_and_inf():
    from quantscope.backend.compare import HeadRow
    row = HeadRow("m.q_proj", "v", ["q0", "q1", "q2"], [0.1, float("nan"), float("inf")], 0.2, "rows", "s")
    js = row.to_json()
    assert js["heads"] == {"q0": 0.1, "q1": None, "q2": None} and js["nonfinite"] == {"q1": "nan", "q2": "inf"}
    assert "nonfinite" not in HeadRow("m", "v", ["q0"], [0.1], 0.1, "rows", "s").to_json()
