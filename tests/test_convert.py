"""Conversion to MLX / dense (backend/convert.py, app/convert_cli.py).

Exactness is checked against MLX itself: the output is read with ``mx.load`` (not quantscope's
reader) and dequantized with ``mx.dequantize``, then compared bit for bit with quantscope's
numpy decode of the source.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from quantscope.backend.checkpoint import open_checkpoint
from quantscope.backend.convert import (PARTIAL_TAG, ConversionError, convert, mixed_recipe_settings)
from quantscope.backend.engines import NumpyEngine
from quantscope.backend.errors import Cancelled
from quantscope.backend.schemes import analyze

mx = pytest.importorskip("mlx.core")

REAL = Path(__file__).parent / "fixtures" / "real"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from quantscope.backend.demo import build_demo
    return build_demo(tmp_path_factory.mktemp("demo") / "ws")


@pytest.fixture(scope="module")
def out_root(tmp_path_factory):
    return tmp_path_factory.mktemp("conv")


def _mx_f32(a) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def _load_mlx(folder: Path) -> tuple[dict, dict]:
    tensors, meta = {}, {}
    for f in sorted(folder.glob("*.safetensors")):
        t, m = mx.load(str(f), return_metadata=True)
        tensors.update(t)
        meta = m
    return tensors, meta


def assert_exact(src: Path, dst: Path, rep) -> int:
    """Every repacked layer: mx.dequantize(mx.load(dst)) == quantscope decode of src, bit for bit."""
    tensors, meta = _load_mlx(dst)
    assert meta == {"format": "mlx"}
    model = analyze(open_checkpoint(src))
    eng = NumpyEngine()
    q = json.loads((dst / "config.json").read_text())["quantization"]
    n = 0
    for r in rep.layers:
        if r.kind not in ("repacked", "copied"):
            continue
        entry = q.get(r.path, q)
        assert (entry["bits"], entry["group_size"]) == (r.bits, r.group_size)
        w = mx.dequantize(tensors[f"{r.path}.weight"], tensors[f"{r.path}.scales"], tensors[f"{r.path}.biases"],
                          group_size=r.group_size, bits=r.bits)
        got = _mx_f32(w)
        want = eng.dequantize(model, model.layers[r.path])
        assert got.shape == want.shape
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), r.path
        n += 1
    return n


# -- exact repacks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("k,n", [(256, 72), (1024, 520), (2440, 136)])  # N not a multiple of the kernel's tile,
# K several panels and a part
def test_awq_weight_repack_compiled_equals_numpy(k, n, monkeypatch):
    from quantscope.backend import convert as conv
    from quantscope.backend.formats import awq, fast
    if not fast.AVAILABLE:
        pytest.skip("numba is not installed")
    qw = np.random.default_rng(k).integers(0, 2**32, size=(k, n // 8), dtype=np.uint32).view(np.int32)
    compiled = conv._awq_gemm_weight(qw)
    monkeypatch.setattr(fast, "AVAILABLE", False)
    reference = conv._awq_gemm_weight(qw)
    assert compiled.dtype == reference.dtype == np.uint32 and np.array_equal(compiled, reference)
    # and the codes are where MLX expects them: row n, code k at bits 4*(k%8) of word k//8
    codes = (qw.view(np.uint32)[:, :, None] >> (4 * awq.REV).astype(np.uint32)) & 0xF   # [K, N/8, 8]
    codes = codes.reshape(k, n)                                                     # logical column order
    words = compiled[:, :, None] >> (4 * np.arange(8, dtype=np.uint32))
    assert np.array_equal((words & 0xF).reshape(n, k), codes.T)


@pytest.mark.parametrize("zeros", [True, False])
@pytest.mark.parametrize("n,ng", [(72, 3), (4104, 2)])  # rows not a multiple of the pool's blocks
def test_awq_scales_biases_kernel(n, ng, zeros):
    """The one-pass AWQ scales/biases equal the formula on codes unpacked the slow way: scale
    ``s[g, n]`` and zero nibble ``REV[n % 8]`` of word ``qzeros[g, n // 8]`` (8 without qzeros)."""
    from quantscope.backend.formats import awq, fast
    if not fast.AVAILABLE:
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(n)
    sc = (rng.random((ng, n)) * 0.01 + 1e-4).astype(np.float16)
    qz = rng.integers(0, 2**32, size=(ng, n // 8), dtype=np.uint32).view(np.int32) if zeros else None
    s, b = fast.awq_scales_biases(sc, qz, awq._SHIFTS)
    cols = np.arange(n)
    z = (np.full((ng, n), 8, np.float32) if qz is None else
         ((qz.view(np.uint32)[:, cols // 8] >> (4 * awq.REV[cols % 8]).astype(np.uint32)) & 0xF).astype(np.float32))
    want_s = sc.astype(np.float32).T
    assert s.shape == b.shape == (n, ng)
    assert np.array_equal(s, want_s)
    assert np.array_equal(b.view(np.uint32), (-(want_s * z.T)).view(np.uint32))
    # zero words that do not fit the scales: no kernel (it does not check its indices)
    assert fast.awq_scales_biases(sc, np.zeros((ng + 1, n // 8), np.int32), awq._SHIFTS) is None


@pytest.mark.parametrize("variant", ["awq-w4g128", "gptq-w4g128", "rtn-w4g128"])
def test_demo_exact_repack(demo, out_root, variant):
    src = demo.variants[variant]
    dst = out_root / f"{variant}-mlx"
    rep = convert(src, dst, to="mlx", verify=variant == "awq-w4g128", engine="numpy")
    kinds = rep.by_kind()
    assert kinds.get("repacked") == 28 and "requantized" not in kinds
    assert assert_exact(src, dst, rep) == 28
    for r in rep.exact_repacks:
        assert r.action == "repacked exact"
        # fp16 scales: MLX's double rounding in fp16 cannot reproduce s*(q-z) -> widened
        assert r.scales_dtype in ("F16", "F32") and r.widened == (r.scales_dtype == "F32")
    if rep.verified:
        assert all(r.rel_fro == 0.0 for r in rep.exact_repacks)
    names = set(_load_mlx(dst)[0])
    assert "model.layers.0.self_attn.q_proj.scales" in names and "model.layers.3.mlp.down_proj.biases" in names
    assert not any(n.endswith((".qweight", ".qzeros", ".g_idx")) for n in names)
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization"] == cfg["quantization_config"]
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 128
    assert cfg["quantization"]["lm_head"] is False  # left dense by the source
    assert not (dst / "quantize_config.json").exists() and not (dst / "quant_config.json").exists()
    assert (dst / "README.md").read_bytes() == (src / "README.md").read_bytes()
    # carried tensors (the embedding is over the 1 MB at which copy_file_range takes over)
    # come through byte for byte
    s_ck, d_ck = open_checkpoint(src), open_checkpoint(dst)
    emb = "model.embed_tokens.weight"
    assert s_ck.file_of(emb).info(emb).end - s_ck.file_of(emb).info(emb).start >= 1 << 20
    assert bytes(d_ck.file_of(emb).raw_bytes(emb)) == bytes(s_ck.file_of(emb).raw_bytes(emb))
    # quantscope reads the output back with the same settings
    m2 = analyze(open_checkpoint(dst))
    assert m2.layers["model.layers.0.mlp.up_proj"].scheme == "mlx-affine"
    assert m2.layers["lm_head"].scheme == "dense"


def test_actorder_is_requantized_with_error(demo, out_root):
    dst = out_root / "actorder-mlx"
    rep = convert(demo.variants["gptq-w4g128-actorder"], dst, to="mlx", engine="numpy")
    q = [r for r in rep.layers if r.source_scheme == "gptq"]
    assert len(q) == 28
    for r in q:
        assert r.action.startswith("requantized 4/64 affine") and "act-order" in r.action
        assert r.rel_fro is not None and math.isfinite(r.rel_fro) and 0 < r.rel_fro < 0.5
    tensors, _ = _load_mlx(dst)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].shape == (512, 512 * 4 // 32)
    assert tensors["model.layers.0.self_attn.q_proj.scales"].shape == (512, 512 // 64)
    # the table cuts the action to its column: said once in full below it
    from quantscope.backend.convert import summary_lines
    lines = summary_lines(rep)
    assert any("requantized 4/64 affine (act-order g_id…" in line for line in lines)
    assert lines.count(f"action in full: {q[0].action}") == 1


def test_mlx_to_mlx_same_settings_is_a_copy(demo, out_root):
    src = demo.variants["mlx-mixed-3-6"]
    dst = out_root / "mixed-copy"
    rep = convert(src, dst, to="mlx", verify=False)
    assert rep.by_kind().get("copied") == 30
    assert assert_exact(src, dst, rep) == 30
    m = analyze(open_checkpoint(dst))
    assert m.layers["model.layers.2.self_attn.v_proj"].bits == 6


# -- dense -> MLX recipes ------------------------------------------------------------------------------

def test_dense_mixed_3_6_config_round_trips(demo, out_root):
    dst = out_root / "ref-mixed"
    rep = convert(demo.reference, dst, to="mlx", recipe="mixed_3_6", verify=False)
    q = json.loads((dst / "config.json").read_text())["quantization"]
    assert (q["bits"], q["group_size"], q["mode"]) == (3, 64, "affine")
    model = analyze(open_checkpoint(dst))
    quantized = [r for r in rep.layers if r.kind == "quantized"]
    assert len(quantized) == 30  # 28 linears, embed_tokens, lm_head
    for r in quantized:
        want = mixed_recipe_settings("mixed_3_6", r.path, 4)
        layer = model.layers[r.path]
        assert layer.scheme == "mlx-affine"
        assert (layer.bits, layer.group_size) == (want.bits, 64) == (r.bits, r.group_size)
        assert "per-layer override" in layer.source
    assert model.layers["lm_head"].bits == 6 and model.layers["model.layers.3.mlp.down_proj"].bits == 6
    assert model.layers["model.layers.1.mlp.down_proj"].bits == 3
    # the same values mx.quantize gives for the bf16 weight
    tensors, _ = _load_mlx(dst)
    ref = open_checkpoint(demo.reference)
    w = ref.tensor("model.layers.2.self_attn.v_proj.weight")
    wq, s, b = mx.quantize(mx.array(np.ascontiguousarray(w).view(np.uint16)).view(mx.bfloat16), group_size=64, bits=6)
    assert np.array_equal(np.array(wq), np.array(tensors["model.layers.2.self_attn.v_proj.weight"]))
    assert tensors["model.layers.2.self_attn.v_proj.scales"].dtype == mx.bfloat16
    assert tensors["model.norm.weight"].dtype == mx.bfloat16  # dense tensors keep their dtype


def test_json_recipe_false_and_overrides(demo, out_root, tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"model.layers.0.mlp.down_proj": False,
                                  "model.layers.1.self_attn.q_proj": {"bits": 8, "group_size": 32},
                                  "model.layers.1.self_attn.k_proj": {"mode": "mxfp4"}}))
    dst = out_root / "ref-json"
    rep = convert(demo.reference, dst, to="mlx", recipe=str(recipe), verify=False)
    q = json.loads((dst / "config.json").read_text())["quantization"]
    assert q["model.layers.0.mlp.down_proj"] is False
    assert q["model.layers.1.self_attn.q_proj"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    assert q["model.layers.1.self_attn.k_proj"]["mode"] == "mxfp4"
    m = analyze(open_checkpoint(dst))
    assert m.layers["model.layers.0.mlp.down_proj"].scheme == "dense"
    assert (m.layers["model.layers.1.self_attn.q_proj"].bits, m.layers["model.layers.1.self_attn.q_proj"].group_size) == (8, 32)
    assert m.layers["model.layers.1.self_attn.k_proj"].scheme == "mlx-mxfp4"
    assert m.layers["model.layers.2.mlp.up_proj"].bits == 4  # default for unlisted layers
    assert {r.path: r.kind for r in rep.layers}["model.layers.0.mlp.down_proj"] == "kept dense"
    # a misspelt key of an entry quantized that layer by the defaults without a word
    recipe.write_text(json.dumps({"model.layers.1.self_attn.q_proj": {"bits": 8, "group_sise": 32}}))
    with pytest.raises(ConversionError, match="'group_sise' .did you mean 'group_size'"):
        convert(demo.reference, out_root / "ref-typo", to="mlx", recipe=str(recipe), verify=False)
    assert not (out_root / "ref-typo").exists()
    # settings for a module that is no matrix (a norm) were dropped without a word, exit 0
    recipe.write_text(json.dumps({"model.norm": {"bits": 4, "group_size": 64}}))
    with pytest.raises(ConversionError, match="'model.norm' asks for 4-bit settings, but it is no weight matrix"):
        convert(demo.reference, out_root / "ref-norm", to="mlx", recipe=str(recipe), verify=False)
    assert not (out_root / "ref-norm").exists()



def test_a_json_recipe_on_a_quantized_source_changes_only_the_layers_it_names(demo, out_root, tmp_path):
    """The layers a recipe does not name follow the rule without one: GPTQ layers repacked
    exactly, the source's dense layers kept dense. They were all requantized at 4/64 and the
    embeddings quantized (an exact repack lost 9%, and nothing said the recipe did it)."""
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"model.layers.0.mlp.down_proj": {"bits": 8}, "lm_head": False}))
    src = demo.variants["gptq-w4g128"]
    dst = out_root / "gptq-recipe"
    rep = convert(src, dst, to="mlx", recipe=str(recipe), verify=False, engine="numpy")
    kinds = {r.path: r.action for r in rep.layers}
    assert kinds["model.layers.0.mlp.down_proj"].startswith("requantized 8/64")
    assert sum(a == "repacked exact" for a in kinds.values()) == 27
    assert not any(a.startswith("requantized") for p, a in kinds.items() if p != "model.layers.0.mlp.down_proj")
    m = analyze(open_checkpoint(dst))
    assert m.layers["model.embed_tokens"].scheme == "dense" and m.layers["lm_head"].scheme == "dense"
    assert assert_exact(src, dst, rep) == 27


def test_group_size_not_dividing_stays_dense(tmp_path):
    from helpers import write_st
    src = tmp_path / "src"
    src.mkdir()
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(0)
    write_st(src / "model.safetensors", {
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((64, 96)).astype(bf16),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((96, 128)).astype(bf16),
        "model.layers.0.mlp.experts.down.weight": rng.standard_normal((2, 32, 128)).astype(bf16),
        "model.norm.weight": np.ones(64, bf16)}, {"format": "pt"})
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    (src / "tokenizer.json").write_text("{}")
    rep = convert(src, tmp_path / "out", to="mlx", bits=4, group_size=128, engine="numpy")
    by = {r.path: r for r in rep.layers}
    assert by["model.layers.0.mlp.down_proj"].action.startswith("kept dense (input dimension 96")
    assert by["model.layers.0.mlp.up_proj"].kind == "quantized"
    assert by["model.layers.0.mlp.experts.down"].kind == "quantized"  # stacked [E, N, K]
    t, _ = _load_mlx(tmp_path / "out")
    assert t["model.layers.0.mlp.experts.down.weight"].shape == (2, 32, 16)
    assert t["model.layers.0.mlp.experts.down.scales"].shape == (2, 32, 1)
    q = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    assert q["model.layers.0.mlp.down_proj"] is False
    assert (tmp_path / "out" / "tokenizer.json").exists()


# -- dense output --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_quantized_to_dense_round_trip(demo, out_root, dtype):
    src = demo.variants["awq-w4g128"]
    dst = out_root / f"awq-dense-{dtype}"
    rep = convert(src, dst, to="dense", dtype=dtype, verify=dtype == "f32", engine="numpy")
    npdt = {"f32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16)}[dtype]
    model = analyze(open_checkpoint(src))
    out = open_checkpoint(dst)
    assert out.files[0].metadata == {"format": "pt"}
    eng = NumpyEngine()
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj"):
        got = out.tensor(f"{path}.weight")
        assert got.dtype == npdt
        want = eng.dequantize(model, model.layers[path]).astype(npdt)
        assert np.array_equal(got, want)
    assert out.tensor("model.norm.weight").dtype == npdt
    cfg = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in cfg and "quantization" not in cfg
    assert cfg["torch_dtype"] == {"f32": "float32", "bf16": "bfloat16"}[dtype]
    if rep.verified:
        assert all(r.rel_fro == 0.0 for r in rep.layers if r.rel_fro is not None)


# -- sharding, safety -------------------------------------------------------------------------------

def test_sharded_output(demo, tmp_path):
    dst = tmp_path / "sharded"
    convert(demo.variants["gptq-w4g128"], dst, to="mlx", verify=False, max_shard_bytes=4 << 20)
    shards = sorted(dst.glob("model-*.safetensors"))
    assert len(shards) >= 3 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    sizes = 0
    for f in shards:
        t = mx.load(str(f))
        sizes += sum(a.nbytes for a in t.values())
        assert all(index["weight_map"][k] == f.name for k in t)
    assert index["metadata"]["total_size"] == sizes
    assert not (dst / "model.safetensors").exists()
    assert analyze(open_checkpoint(dst)).layers["model.layers.1.mlp.gate_proj"].scheme == "mlx-affine"


def test_cancel_midway_leaves_nothing(demo, tmp_path):
    ev = threading.Event()

    def progress(f):
        if f > 0.3:
            ev.set()

    dst = tmp_path / "cancelled"
    with pytest.raises(Cancelled):
        convert(demo.variants["gptq-w4g128-actorder"], dst, to="mlx", progress=progress, cancel=ev)
    assert not dst.exists()
    assert not list(tmp_path.glob(f".*{PARTIAL_TAG}*"))


def test_existing_destination_and_overwrite(demo, tmp_path):
    dst = tmp_path / "out"
    convert(demo.variants["awq-w4g128"], dst, to="dense", verify=False)
    before = (dst / "model.safetensors").read_bytes()
    with pytest.raises(ConversionError, match="already exists"):
        convert(demo.variants["gptq-w4g128"], dst, to="mlx", verify=False)
    assert (dst / "model.safetensors").read_bytes() == before
    convert(demo.variants["gptq-w4g128"], dst, to="mlx", verify=False, overwrite=True)  # an earlier output
    assert (dst / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    marker = json.loads((dst / ".quantscope-convert.json").read_text())
    assert marker["written_by"] == "quantscope convert" and marker["to"] == "mlx"
    assert marker["source"] == str(Path(demo.variants["gptq-w4g128"]).resolve())


def test_overwrite_swaps_in_one_step_and_a_killed_swap_is_put_right(demo, tmp_path, monkeypatch):
    """--overwrite moved the old output aside and the new one in, two renames: a kill between them
    left no output and stranded the old one in a hidden folder for good. Where the system swaps
    two paths at once (Linux), one step; elsewhere the next conversion beside it puts a stranded
    output back (or removes it, where a new one took its place)."""
    from quantscope.backend import convert as cv
    dst = tmp_path / "out"
    convert(demo.variants["awq-w4g128"], dst, to="dense", verify=False)
    ino = dst.stat().st_ino
    swapped = []
    real = cv._exchange
    monkeypatch.setattr(cv, "_exchange", lambda a, b: swapped.append(real(a, b)) or swapped[-1])
    convert(demo.variants["gptq-w4g128"], dst, to="mlx", verify=False, overwrite=True)
    if sys.platform == "linux":
        assert swapped == [True] and dst.stat().st_ino != ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # a stranded previous output of a dead process (pid 2**22 + 1: none), with no output in place
    before = sorted(p.name for p in dst.iterdir())
    aside = tmp_path / f".out.quantscope-old-{2 ** 22 + 1}"
    dst.rename(aside)
    cv._clean_stale(dst)
    assert sorted(p.name for p in dst.iterdir()) == before and not aside.exists()
    # with one in place: the stranded one is removed
    shutil.copytree(dst, aside)
    cv._clean_stale(dst)
    assert not aside.exists() and sorted(p.name for p in dst.iterdir()) == before
    # put back before the destination is checked: a conversion without --overwrite is refused
    # at once, not after planning, writing and verifying the whole model
    dst.rename(aside)
    with pytest.raises(ConversionError, match="already exists") as ei:
        convert(demo.variants["awq-w4g128"], dst, to="dense", verify=False)
    assert ei.value.rule == "convert.dst-exists" and sorted(p.name for p in dst.iterdir()) == before
    with pytest.raises(ConversionError, match="--scales applies to --to mlx only"):
        convert(demo.variants["awq-w4g128"], tmp_path / "d2", to="dense", scales="source")


def test_refuses_an_mlx_output_without_the_models_config(demo, tmp_path):
    """An unreadable config.json was ignored with a warning, and the output's config held the
    quantization alone: no model_type, mlx-lm could not load it."""
    src = tmp_path / "src"
    shutil.copytree(demo.variants["gptq-w4g128"], src)
    (src / "config.json").write_text((src / "config.json").read_text() + "\n}")  # extra data: not JSON
    with pytest.raises(ConversionError, match="mlx-lm needs the model's config") as e:
        convert(src, tmp_path / "out", to="mlx")
    assert str(e.value.file) == str(src / "config.json") and not (tmp_path / "out").exists()


def test_refuses_destination_inside_source(demo, tmp_path):
    src = demo.variants["gptq-w4g128"]
    before = sorted((p.name, p.stat().st_size) for p in src.iterdir())
    with pytest.raises(ConversionError, match="inside"):
        convert(src, src / "sub", to="mlx")
    with pytest.raises(ConversionError):
        convert(src, src, to="mlx", overwrite=True)
    with pytest.raises(ConversionError, match="source is inside"):
        convert(src, src.parent, to="mlx", overwrite=True)
    assert sorted((p.name, p.stat().st_size) for p in src.iterdir()) == before


def test_stale_partial_is_cleaned(demo, tmp_path):
    dst = tmp_path / "out"
    stale = tmp_path / f".out.{PARTIAL_TAG}-999999999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x")
    other = tmp_path / f".elsewhere.{PARTIAL_TAG}-999999998"  # a killed conversion to another name
    other.mkdir()
    mine = tmp_path / f".x.{PARTIAL_TAG}-{os.getpid()}"  # a live conversion's: left alone
    mine.mkdir()
    convert(demo.variants["gptq-w4g128"], dst, to="mlx", verify=False)
    assert not stale.exists() and not other.exists() and mine.exists() and dst.exists()


def test_a_destination_name_near_the_length_limit_converts(demo, tmp_path):
    # the hidden folder it is written in (.NAME.quantscope-partial-PID) passed 255 bytes: "File
    # name too long" for a name the file system takes
    dst = tmp_path / ("m" * 240)
    convert(demo.variants["gptq-w4g128"], dst, to="mlx", verify=False)
    assert (dst / "model.safetensors").exists() and sorted(p.name for p in tmp_path.iterdir()) == [dst.name]
    convert(demo.variants["awq-w4g128"], dst, to="mlx", verify=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [dst.name]


def test_bad_settings(demo, tmp_path):
    with pytest.raises(ConversionError, match="group size"):
        convert(demo.reference, tmp_path / "a", to="mlx", group_size=48)
    with pytest.raises(ConversionError, match="mxfp4"):
        convert(demo.reference, tmp_path / "b", to="mlx", mode="mxfp4", bits=8)
    with pytest.raises(ConversionError, match="recipe"):
        convert(demo.reference, tmp_path / "c", to="mlx", recipe="mixed_9_9")
    # accepted and ignored before: --dtype with --to mlx, a recipe key that names no module
    with pytest.raises(ConversionError, match="--dtype applies to --to dense only"):
        convert(demo.reference, tmp_path / "d", to="mlx", dtype="f16")
    recipe = tmp_path.parent / f"{tmp_path.name}-recipe.json"
    recipe.write_text(json.dumps({"model.layers.0.mlp.down_proj": {"bits": 8},
                                  "model.layers.0.mlp.dwn_proj": {"bits": 2}}))
    with pytest.raises(ConversionError, match=r"1 recipe key\(s\) name no module.*'model.layers.0.mlp.dwn_proj'.*"
                                              r"did you mean"):
        convert(demo.reference, tmp_path / "e", to="mlx", recipe=str(recipe))
    assert not list(tmp_path.iterdir())


# -- real fixtures -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["autoawq-gemm-w4g128", "gptqmodel-gptq-w4g128", "gptqmodel-gptq-w3g128",
                                  "llmcompressor-w4a16", "llmcompressor-w4a16-asym"])
def test_real_fixture_exact(name, tmp_path):
    src = REAL / name
    if not src.is_dir():
        pytest.skip("real fixtures not present")
    rep = convert(src, tmp_path / "out", to="mlx", verify=False)
    assert rep.by_kind().get("repacked") == 14
    assert assert_exact(src, tmp_path / "out", rep) == 14
    # and against the tool's own decode (decoded.npz)
    dec = np.load(src / "decoded.npz")
    tensors, _ = _load_mlx(tmp_path / "out")
    r = {x.path: x for x in rep.layers}
    for key in dec.files:
        lr = r[key]
        got = _mx_f32(mx.dequantize(tensors[f"{key}.weight"], tensors[f"{key}.scales"], tensors[f"{key}.biases"],
                                    group_size=lr.group_size, bits=lr.bits))
        np.testing.assert_allclose(got, dec[key], rtol=0, atol=1e-6 * float(np.abs(dec[key]).max()))



@pytest.mark.parametrize("name, bits", [("ct016_w3a16_asym_legacy", 3), ("ct016_w5a16_legacy", 5)])
def test_pre_017_compressed_tensors_3_and_5_bit_repack_exactly(tmp_path, name, bits):
    # floor(32/b) codes a word (compressed-tensors < 0.17) were requantized (rel_fro 0.11 at 3
    # bits): the same codes in MLX's bit stream hold every value
    src = Path(__file__).parent / "fixtures" / "golden" / name
    rep = convert(src, tmp_path / "out", to="mlx")
    (row,) = [r for r in rep.layers if r.kind != "carried"]
    assert row.action == "repacked exact" and row.bits == bits and row.rel_fro == 0.0
    tensors, _ = _load_mlx(tmp_path / "out")
    key = "model.layers.0.mlp.up_proj"
    got = _mx_f32(mx.dequantize(tensors[f"{key}.weight"], tensors[f"{key}.scales"], tensors[f"{key}.biases"],
                                group_size=row.group_size, bits=bits))
    with np.load(src / "expected.npz") as z:  # compressed-tensors' own decode, in its compute dtype
        want, lib = z[f"{key}.weight"], str(z["library_dtype"]).replace("torch.", "")
    import ml_dtypes
    dt = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}[lib]
    np.testing.assert_array_equal(got.astype(dt).astype(np.float32), want)

def test_fp8_is_requantized_at_8_bits_unless_told(tmp_path):
    # without --bits an FP8 checkpoint became 4-bit affine: its error grew fourfold, said nowhere
    src = REAL / "llmcompressor-fp8"
    rep = convert(src, tmp_path / "keep", to="mlx", engine="numpy")
    q = [r for r in rep.layers if r.source_scheme == "ct-fp8"]
    assert q and all(r.action.startswith("requantized 8/64 affine") and r.bits == 8 for r in q)
    assert max(r.rel_fro for r in q) < 0.02
    rep4 = convert(src, tmp_path / "four", to="mlx", bits=4, engine="numpy")
    assert all(r.bits == 4 for r in rep4.layers if r.source_scheme == "ct-fp8")
    assert min(r.rel_fro for r in rep4.layers if r.source_scheme == "ct-fp8") > 0.05


def test_moe_conversion_equals_mlx_lm_convert(tmp_path):
    # the tiny Qwen3-MoE in transformers' per-expert layout and what `mlx_lm.convert -q` made of it
    # (make/mlxlm_moe_make.py): experts stacked into switch_mlp, the routers at 8 bits as
    # qwen3_moe's own quant_predicate says; every tensor must be the same to the bit
    src, theirs = REAL / "qwen3moe-bf16", REAL / "mlxlm-qwen3moe-q4-g64"
    rep = convert(src, tmp_path / "out", to="mlx", bits=4)
    ours, _ = _load_mlx(tmp_path / "out")
    want, _ = _load_mlx(theirs)
    assert sorted(ours) == sorted(want)
    for k, v in want.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        assert mx.array_equal(ours[k], v).item(), k
    q_ours = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    q_theirs = json.loads((theirs / "config.json").read_text())["quantization"]
    assert {k: (v if not isinstance(v, dict) else {**v, "mode": "affine"}) for k, v in q_theirs.items()} == q_ours
    by = {r.path: r for r in rep.layers}
    assert by["model.layers.1.mlp.gate"].action == "quantized 8/64 affine"
    assert by["model.layers.1.mlp.switch_mlp.down_proj"].action == "quantized 4/64 affine, 4 experts stacked"
    # a recipe replaces the model's own choices, as in mlx-lm
    rep = convert(src, tmp_path / "mixed", to="mlx", recipe="mixed_3_6", verify=False)
    assert {r.bits for r in rep.layers if r.path.endswith("mlp.gate")} == {3}



def test_gptqmodel_moe_repacks_exactly_into_mlx_lm_layout(tmp_path):
    # GPTQModel's per-expert GPTQ (config saved by transformers 5.25: num_local_experts and
    # rope_parameters, which mlx-lm 0.32's qwen3_moe cannot read) -> switch_mlp stacks whose every
    # expert slice is GPTQModel's own decode, and the config keys mlx-lm reads. (Checked once by
    # hand with mlx-lm 0.32.2: mlx_lm.load of the output gives logits within 0.008 of
    # GPTQModel's own bf16 forward.)
    src = REAL / "gptqmodel-qwen3moe-w4g64"
    rep = convert(src, tmp_path / "out", to="mlx")
    assert rep.by_kind() == {"repacked": 14, "kept dense": 4, "carried": 9}
    tensors, _ = _load_mlx(tmp_path / "out")
    dec = np.load(src / "decoded.npz")
    for layer in range(2):
        for p in ("gate_proj", "up_proj", "down_proj"):
            sw = f"model.layers.{layer}.mlp.switch_mlp.{p}"
            got = _mx_f32(mx.dequantize(tensors[f"{sw}.weight"], tensors[f"{sw}.scales"], tensors[f"{sw}.biases"],
                                        group_size=64, bits=4))
            for e in range(4):
                np.testing.assert_array_equal(got[e], dec[f"model.layers.{layer}.mlp.experts.{e}.{p}"])
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_experts"] == cfg["num_local_experts"] == 4
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] and "rope_scaling" not in cfg
    assert cfg["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine", "model.layers.0.mlp.gate": False,
                                   "model.layers.1.mlp.gate": False, "model.embed_tokens": False, "lm_head": False}

# -- command line --------------------------------------------------------------------------------------

def test_cli_convert(demo, tmp_path, capsys):
    from quantscope.app.cli import main
    src, dst = str(demo.variants["awq-w4g128"]), str(tmp_path / "cli-out")
    assert main(["convert", src, dst, "--to", "mlx"]) == 0
    out = capsys.readouterr().out
    assert "repacked exact" in out and "max rel_fro 0" in out and "scales widened to float32" in out
    assert main(["convert", src, dst, "--to", "mlx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0]
    assert main(["convert", src, dst, "--to", "dense", "--dtype", "f16", "--overwrite"]) == 0
    assert open_checkpoint(dst).tensor("model.layers.0.self_attn.q_proj.weight").dtype == np.float16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert os.path.isdir(dst)


def test_keeps_dtype_reads_rows_in_growing_chunks():
    # The dtype check asks the repack for row ranges only; it keeps fp16 where MLX's double
    # rounding reproduces every stored value (power-of-two scales), and widens as soon as one
    # stored code would come out differently (random scales, found in the first rows).
    from quantscope.backend import convert as conv
    n, g, ng = 1000, 64, 4
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(n, ng * g), dtype=np.uint8)
    z = rng.integers(0, 16, size=(n, ng)).astype(np.float32)
    asked = []

    def repack(s):
        def part(r0, r1):
            asked.append((r0, r1))
            return s[r0:r1], z[r0:r1]
        return conv._Repack(lambda: None, part, n, np.dtype(np.float16),
                            lambda rows, grps: codes[rows[:, None], grps[:, None] * g + np.arange(g)])

    exact = np.full((n, ng), 2.0 ** -7, np.float32)
    assert conv._keeps_dtype(repack(exact), 4, g)
    spans = [b - a for a, b in asked[1:]]
    assert asked[-1][1] == n and spans[0] < max(spans)  # every row, in chunks that grow
    asked.clear()
    noisy = (rng.random((n, ng)) * 0.01 + 0.001).astype(np.float16).astype(np.float32)
    assert not conv._keeps_dtype(repack(noisy), 4, g)
    assert max(b for _, b in asked) < n  # decided from the first rows


def test_overwrite_replaces_only_an_earlier_output(demo, tmp_path, capsys):
    """--overwrite replaced any folder of "model-like" files: a project folder of .md/.py/.json/.npz
    files, or another checkpoint, was deleted whole. Now only a folder quantscope convert wrote
    (it holds .quantscope-convert.json), or an empty one."""
    import shutil

    from quantscope.app.cli import main
    src = str(demo.variants["awq-w4g128"])
    work = tmp_path / "project"
    work.mkdir()
    for name in ("README.md", "train.py", "results.json", "notes.txt", "activations.npz"):
        (work / name).write_text("mine")
    assert main(["convert", src, str(work), "--to", "mlx", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "not written by quantscope convert" in err and "README.md" in err
    assert sorted(p.name for p in work.iterdir()) == ["README.md", "activations.npz", "notes.txt", "results.json",
                                                      "train.py"]
    other = tmp_path / "other-checkpoint"  # a real checkpoint that is not an earlier output
    shutil.copytree(demo.variants["gptq-w4g128"], other)
    before = sorted((p.name, p.stat().st_size) for p in other.iterdir())
    assert main(["convert", src, str(other), "--to", "mlx", "--overwrite"]) == 2
    assert sorted((p.name, p.stat().st_size) for p in other.iterdir()) == before
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["convert", src, str(out), "--to", "dense"]) == 0
    assert main(["convert", src, str(out), "--to", "mlx", "--overwrite"]) == 0  # an earlier output: replaced
    assert open_checkpoint(str(out)).tensor("model.layers.0.self_attn.q_proj.weight").dtype == np.uint32
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["convert", src, str(empty), "--to", "mlx", "--overwrite"]) == 0
    capsys.readouterr()
    # an earlier output with files added since (results, notes): they would go with it
    (out / "eval.json").write_text("mine")
    assert main(["convert", src, str(out), "--to", "mlx", "--overwrite"]) == 2
    assert "eval.json" in capsys.readouterr().err and (out / "eval.json").read_text() == "mine"
    # ...in a subfolder too
    (out / "eval.json").unlink()
    (out / "notes").mkdir()
    (out / "notes" / "run1.md").write_text("mine")
    assert main(["convert", src, str(out), "--to", "mlx", "--overwrite"]) == 2
    assert "notes/run1.md" in capsys.readouterr().err and (out / "notes" / "run1.md").read_text() == "mine"
    # a marker quantscope did not write (any text, a link, a folder) makes no folder replaceable
    for i, make in enumerate((lambda m: m.write_text("x"), lambda m: m.symlink_to(out / "config.json"),
                              lambda m: m.mkdir())):
        d = tmp_path / f"fake{i}"
        d.mkdir()
        (d / "thesis.tex").write_text("mine")
        make(d / ".quantscope-convert.json")
        assert main(["convert", src, str(d), "--to", "mlx", "--overwrite"]) == 2
        assert "no readable .quantscope-convert.json" in capsys.readouterr().err
        assert (d / "thesis.tex").read_text() == "mine"




def _moe_source(folder: Path, projs, n_exp=3, *, gptq=False, model_type="qwen3_moe", layer_path="mlp"):
    """A one-layer MoE checkpoint with per-expert modules ``model.layers.0.{layer_path}.experts.{e}.{p}``
    ([64, 128] each): float32 dense, or GPTQ 4-bit g64 v1 packed by AutoGPTQ's own loop (with the
    expected decode per module, from the formula). Also a dense attention projection."""
    from helpers import write_st
    from ref_packers import autogptq_pack_rows
    folder.mkdir()
    rng = np.random.default_rng(7)
    n, k, g = 64, 128, 64
    t, want = {}, {}
    for e in range(n_exp):
        for p in projs:
            path = f"model.layers.0.{layer_path}.experts.{e}.{p}"
            if not gptq:
                t[f"{path}.weight"] = want[path] = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
                continue
            q = rng.integers(0, 16, size=(k, n))
            z = rng.integers(1, 16, size=(k // g, n))
            sc = (rng.random((k // g, n)) * 0.02 + 0.001).astype(np.float16)
            t[f"{path}.qweight"] = autogptq_pack_rows(q, 4)
            t[f"{path}.qzeros"] = autogptq_pack_rows((z - 1).T.copy(), 4).T.copy()
            t[f"{path}.scales"] = sc
            t[f"{path}.g_idx"] = (np.arange(k) // g).astype(np.int32)
            gi = np.arange(k) // g
            want[path] = (sc[gi].astype(np.float64).T * (q.T - z[gi].T)).astype(np.float32)
    t["model.layers.0.self_attn.q_proj.weight"] = (rng.standard_normal((k, k)) * 0.02).astype(np.float32)
    write_st(folder / "model.safetensors", t, {"format": "pt"})
    cfg = {"model_type": model_type, "hidden_size": k, "num_hidden_layers": 1}
    if gptq:
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": g, "desc_act": False,
                                      "sym": False, "checkpoint_format": "gptq"}
    (folder / "config.json").write_text(json.dumps(cfg))
    return want


def _slices(tensors, spath, q):
    w = mx.dequantize(tensors[f"{spath}.weight"], tensors[f"{spath}.scales"], tensors[f"{spath}.biases"],
                      group_size=q["group_size"], bits=q["bits"])
    return _mx_f32(w)


def test_per_expert_moe_stacks_into_switch_mlp(tmp_path):
    # transformers' experts.{e}.* become mlx-lm's switch_mlp [E, N, K/8] (mlx-lm's sanitize stacks
    # only dense weights when it loads, so experts written one by one would not load)
    want = _moe_source(tmp_path / "moe", ("gate_proj", "up_proj", "down_proj"))
    rep = convert(tmp_path / "moe", tmp_path / "out", to="mlx", bits=4)
    tensors, _ = _load_mlx(tmp_path / "out")
    assert not [n for n in tensors if ".experts." in n]
    q = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    by = {r.path: r for r in rep.layers}
    for p in ("gate_proj", "up_proj", "down_proj"):
        spath = f"model.layers.0.mlp.switch_mlp.{p}"
        assert tensors[f"{spath}.weight"].shape == (3, 64, 16) and tensors[f"{spath}.scales"].shape == (3, 64, 2)
        lr = by[spath]
        assert lr.experts == [f"model.layers.0.mlp.experts.{e}.{p}" for e in range(3)]
        assert lr.action == "quantized 4/64 affine, 3 experts stacked" and lr.kind == "quantized"
        for e in range(3):  # each slice is mx.quantize of that expert, as mlx_lm.convert writes it
            ref = mx.quantize(mx.array(want[f"model.layers.0.mlp.experts.{e}.{p}"]), group_size=64, bits=4)
            for got, exp in zip((tensors[f"{spath}.{c}"][e] for c in ("weight", "scales", "biases")), ref):
                assert np.array_equal(np.array(got), np.array(exp))
        got = _slices(tensors, spath, q)
        worst = max(np.linalg.norm(got[e] - want[f"model.layers.0.mlp.experts.{e}.{p}"])
                    / np.linalg.norm(want[f"model.layers.0.mlp.experts.{e}.{p}"]) for e in range(3))
        assert lr.rel_fro == pytest.approx(worst, rel=1e-6)  # the verification's worst expert
    assert by["model.layers.0.self_attn.q_proj"].kind == "quantized"


def test_gptq_experts_repack_exactly_into_switch_mlp_mixtral_names(tmp_path):
    want = _moe_source(tmp_path / "moe", ("w1", "w2", "w3"), 4, gptq=True, model_type="mixtral",
                       layer_path="block_sparse_moe")
    rep = convert(tmp_path / "moe", tmp_path / "out", to="mlx")
    tensors, _ = _load_mlx(tmp_path / "out")
    q = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    for w, p in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
        spath = f"model.layers.0.block_sparse_moe.switch_mlp.{p}"
        got = _slices(tensors, spath, q)
        assert got.shape == (4, 64, 128)
        for e in range(4):  # bit for bit the formula's decode of each GPTQ expert
            assert np.array_equal(got[e], want[f"model.layers.0.block_sparse_moe.experts.{e}.{w}"])
        lr = next(r for r in rep.layers if r.path == spath)
        assert lr.kind == "repacked" and lr.rel_fro == 0.0 and len(lr.experts) == 4


def test_per_expert_moe_that_cannot_stack_is_refused(tmp_path):
    want = _moe_source(tmp_path / "moe", ("gate_proj",), 3)
    # a recipe that sets one expert apart: a stacked module has one setting
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"model.layers.0.mlp.experts.1.gate_proj": {"bits": 8, "group_size": 64}}))
    with pytest.raises(ConversionError, match="switch_mlp.gate_proj.*different settings.*4/64.*8/64"):
        convert(tmp_path / "moe", tmp_path / "out", to="mlx", recipe=str(recipe))
    assert not (tmp_path / "out").exists()
    # expert 1 missing
    from helpers import write_st
    src = tmp_path / "gap"
    src.mkdir()
    write_st(src / "model.safetensors", {f"model.layers.0.mlp.experts.{e}.gate_proj.weight":
                                         want[f"model.layers.0.mlp.experts.{e}.gate_proj"] for e in (0, 2)})
    (src / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    with pytest.raises(ConversionError, match=r"expert\(s\) 1 missing"):
        convert(src, tmp_path / "out2", to="mlx", bits=4)
    convert(src, tmp_path / "dense", to="dense", verify=False)  # decoding to dense keeps them one by one
    assert (tmp_path / "dense" / "model.safetensors").exists()

def test_a_config_the_shapes_contradict_is_converted_but_said(tmp_path, capsys):
    # 8 bit / group 32 on 4-bit / 64 data: --to dense wrote garbage of the wrong width, exit 0,
    # "max rel_fro 0" against its own misreading
    import shutil

    from quantscope.app.cli import main
    shared = Path(__file__).parents[1].parent / "shared" / "fixtures" / "real" / "mlx-affine-q4-g64"
    if not shared.is_dir():
        pytest.skip("../shared fixtures not present")
    src = tmp_path / "wm"
    shutil.copytree(shared, src)
    for f in src.iterdir():
        f.chmod(0o644)
    cfg = json.loads((src / "config.json").read_text())
    for k in ("quantization", "quantization_config"):
        if k in cfg:
            cfg[k].update(bits=8, group_size=32)
    (src / "config.json").write_text(json.dumps(cfg))
    assert main(["convert", str(src), str(tmp_path / "d"), "--to", "dense"]) == 1
    io = capsys.readouterr()
    assert "quantscope: warning: 2 layers (first model.layers.0.mlp" in io.err and "not a dimension of this model" in io.err
    assert "warning: " in io.out and (tmp_path / "d" / "config.json").exists()


def test_experts_stored_in_different_float_dtypes_stack_in_float32(tmp_path):
    # bf16 experts and one f16 expert: numpy cannot stack bfloat16 with float16 (internal error before)
    from helpers import write_st
    src = tmp_path / "mix"
    src.mkdir()
    rng = np.random.default_rng(3)
    t, want = {}, {}
    for e, dt in enumerate((ml_dtypes.bfloat16, np.float16, ml_dtypes.bfloat16)):
        a = (rng.standard_normal((64, 128)) * 0.02).astype(dt)
        t[f"model.layers.0.mlp.experts.{e}.up_proj.weight"] = a
        want[e] = a
    write_st(src / "model.safetensors", t, {"format": "pt"})
    (src / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    rep = convert(src, tmp_path / "out", to="mlx", bits=4)
    lr = next(r for r in rep.layers if r.experts)
    assert lr.scales_dtype == "F32" and lr.widened
    tensors, _ = _load_mlx(tmp_path / "out")
    sw = "model.layers.0.mlp.switch_mlp.up_proj"
    assert tensors[f"{sw}.scales"].dtype == mx.float32
    for e, a in want.items():  # each expert's scales: its own mx.quantize's, exactly (widened)
        ref = mx.quantize(mx.array(a.astype(np.float32)).astype(mx.bfloat16 if a.dtype != np.float16 else mx.float16),
                          group_size=64, bits=4)
        assert mx.array_equal(tensors[f"{sw}.weight"][e], ref[0]).item()
        assert mx.array_equal(tensors[f"{sw}.scales"][e], ref[1].astype(mx.float32)).item()


def test_a_destination_made_during_the_conversion_is_not_replaced(demo, tmp_path, monkeypatch):
    # The destination was checked at the start only: a folder made there while the conversion ran
    # (minutes on a real model), or a second conversion to the same place, was replaced unasked
    import quantscope.backend.convert as conv
    dst = tmp_path / "out"
    real = conv._write_config

    def meanwhile(*a, **k):
        dst.mkdir()
        (dst / "notes.txt").write_text("mine")
        return real(*a, **k)

    monkeypatch.setattr(conv, "_write_config", meanwhile)
    with pytest.raises(ConversionError, match="already exists"):
        convert(demo.variants["gptq-w4g128"], dst, to="mlx", verify=False)
    assert (dst / "notes.txt").read_text() == "mine" and sorted(p.name for p in dst.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial folder left
    with pytest.raises(ConversionError, match="did not write|not written"):  # nor with --overwrite
        convert(demo.variants["gptq-w4g128"], dst, to="mlx", verify=False, overwrite=True)
    assert (dst / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("name, mode", [("ct_mxfp4", "mxfp4"), ("ct_mxfp8", "mxfp8")])
def test_an_mx_source_stays_mx_by_default_and_exact(tmp_path, name, mode):
    # compressed-tensors' MXFP4/MXFP8 are MLX's mxfp4/mxfp8: by default they were made affine 4/64
    # (rel_fro 0.09, "not representable as MLX affine"), though the same format keeps every value
    src = Path(__file__).parent / "fixtures" / "golden" / name
    rep = convert(src, tmp_path / "out", to="mlx")
    (row,) = [r for r in rep.layers if r.kind != "carried"]
    assert row.mode == mode and row.group_size == 32 and row.action.startswith("re-encoded")
    assert row.rel_fro == 0.0 and row.max_abs == 0.0
    m = analyze(open_checkpoint(tmp_path / "out"))
    assert {lay.scheme for lay in m.layers.values() if lay.quantized} == {f"mlx-{mode}"}
    rep = convert(src, tmp_path / "affine", to="mlx", bits=4, group_size=64)  # asked for: affine
    (row,) = [r for r in rep.layers if r.kind != "carried"]
    assert row.mode == "affine" and "not representable as MLX affine" in row.action


def test_a_hugging_face_cache_repo_is_converted_out_of_the_cache_and_named_as_such(demo, tmp_path, monkeypatch):
    # Writing into the cache (its blobs/, beside its snapshots) was allowed, and the source was
    # recorded as the current folder joined with the repo id (a path that does not exist)
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-gptq"
    commit = "b" * 40
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(Path(demo.variants["gptq-w4g128"]).iterdir())):
        if f.is_file():
            (repo / "blobs" / f"blob{i}").write_bytes(f.read_bytes())
            os.symlink(f"../../blobs/blob{i}", snap / f.name)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    for inside in (repo / "blobs" / "conv", repo / "conv"):
        with pytest.raises(ConversionError, match="never writes into a checkpoint"):
            convert("acme/tiny-gptq", inside, to="mlx", verify=False)
        assert not inside.exists()
    rep = convert("acme/tiny-gptq", tmp_path / "out", to="mlx", verify=False)
    marker = json.loads((tmp_path / "out" / ".quantscope-convert.json").read_text())
    assert marker["source"].startswith("acme/tiny-gptq (") and str(snap) in marker["source"]
    assert not (tmp_path / "acme").exists() and "acme/tiny-gptq" not in rep.src.replace(str(snap), "")


def test_overwrite_never_replaces_the_folder_a_linked_source_shard_lies_in(demo, out_root, tmp_path):
    """A model folder whose shard is a link into an earlier conversion's output: converting it
    with --overwrite into that output replaced the folder, and the source with it."""
    import os
    first = out_root / "linked-first"
    convert(demo.variants["gptq-w4g128"], first, to="mlx", verify=False)
    src = tmp_path / "L"
    src.mkdir()
    os.symlink(first / "model.safetensors", src / "model.safetensors")
    names = json.loads(_tensor_names(first / "model.safetensors"))
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, "model.safetensors")}))
    (src / "config.json").write_bytes((first / "config.json").read_bytes())
    before = (first / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(ConversionError, match="never writes into a checkpoint it opened"):
        convert(src, first, to="mlx", bits=8, overwrite=True, verify=False)
    assert (first / "model.safetensors").stat().st_mtime_ns == before


def _tensor_names(path):
    import struct
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
    return json.dumps([k for k in header if k != "__metadata__"])


@pytest.mark.parametrize("tie_in", ["config", "text_config"])
def test_a_stored_lm_head_of_tied_embeddings_is_dropped_for_mlx(demo, tmp_path, tie_in):
    """tie_word_embeddings true and an lm_head stored anyway: mlx-lm's models build no head then
    and refused the quantized lm_head's scales and biases ("parameters not in model"); mlx_lm.convert
    drops it, and so does quantscope now, saying so."""
    import shutil
    src = tmp_path / "src"
    shutil.copytree(demo.reference, src)
    cfg = json.loads((src / "config.json").read_text())
    if tie_in == "config":
        cfg["tie_word_embeddings"] = True
    else:
        cfg.pop("tie_word_embeddings", None)
        cfg["text_config"] = {"tie_word_embeddings": True}
    (src / "config.json").write_text(json.dumps(cfg))
    assert "lm_head" in analyze(open_checkpoint(src)).layers
    rep = convert(src, tmp_path / "out", to="mlx")
    tensors, _ = _load_mlx(tmp_path / "out")
    assert not [n for n in tensors if n.startswith("lm_head")] and "model.embed_tokens.weight" in tensors
    assert any("dropped lm_head: tie_word_embeddings is true" in n for n in rep.notes)


def test_scales_in_the_source_dtype_round_the_biases_and_say_by_how_much(tmp_path):
    """--scales source: a GPTQ repack keeps fp16 scales and biases (the exact repack writes float32
    ones where fp16 cannot hold -s·z, and mlx-lm then computes those layers in float32); the
    rounding's error is the verification's, checked here against mx.dequantize of the output."""
    from quantscope.backend.engines import get_engine
    src = Path(__file__).parent / "fixtures" / "real" / "gptqmodel-gptq-w4g128"
    rep = convert(src, tmp_path / "out", to="mlx", scales="source")
    rounded = rep.rounded_repacks
    assert rounded and not rep.widened and all(r.scales_dtype == "F16" for r in rounded)
    tensors, _ = _load_mlx(tmp_path / "out")
    m = analyze(open_checkpoint(src))
    worst = 0.0
    for r in rounded:
        s, b = tensors[f"{r.path}.scales"], tensors[f"{r.path}.biases"]
        assert s.dtype == mx.float16 and b.dtype == mx.float16
        got = _mx_f32(mx.dequantize(tensors[f"{r.path}.weight"], s, b, group_size=r.group_size, bits=r.bits))
        want = get_engine("numpy").dequantize(m, m.layers[r.path]).astype(np.float64)
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert r.rel_fro == pytest.approx(rel, rel=1e-9, abs=1e-15)
        worst = max(worst, rel)
    assert 0 < worst < 2e-3
    with pytest.raises(ConversionError, match="--scales"):
        convert(src, tmp_path / "x", to="mlx", scales="fp16")
