"""The demo workspace: layout of every variant, packers against the library decoders, the
algorithms' promises (GPTQ beats RTN on the layer output, AWQ's folded norms undo its scales),
determinism, cancellation and the cache."""

import json
import shutil
import threading

import numpy as np
import pytest

from quantscope.backend.blas import single_threaded_blas
from quantscope.backend import demo
from quantscope.backend.checkpoint import open_checkpoint
from quantscope.backend.errors import Cancelled, CheckpointError
from quantscope.backend.formats import awq, gptq, mlx as mlx_fmt

L0 = "model.layers.0"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return demo.build_demo(tmp_path_factory.mktemp("demo") / "ws", seed=0)


@pytest.fixture(scope="module")
def ref(ws):
    """Reference weights (bf16, as stored) and the calibration inputs the build used."""
    with open_checkpoint(ws.reference) as c:
        weights = {n: np.array(c.tensor(n)) for n in c.names}
    # The build runs BLAS on one thread; float sums depend on the split, so recompute likewise.
    with single_threaded_blas():
        return weights, demo.calibration_inputs(weights, 0)


def _read(folder, names=None) -> dict:
    with open_checkpoint(folder) as c:
        return {n: np.array(c.tensor(n)) for n in (names or c.names)}


def _rel_out(w_hat, w, x):
    return np.linalg.norm((w_hat - w) @ x.T) / np.linalg.norm(w @ x.T)


# -- layout ---------------------------------------------------------------------------------------

def test_workspace_lists_folders_in_display_order(ws):
    assert ws.reference == ws.root / "reference"
    assert list(ws.variants) == ["gptq-w4g128", "gptq-w4g128-actorder", "rtn-w4g128", "awq-w4g128",
                                 "mlx-affine-q4g64", "mlx-mixed-3-6"]
    assert demo.load_demo_workspace(ws.root) == ws
    for folder in [ws.reference, *ws.variants.values()]:
        readme = (folder / "README.md").read_text()
        assert "made by quantscope's demo builder with a numpy implementation of" in readme.lower()
        assert "not the reference tool's output" in readme
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is False
        assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"],
                cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == \
            (512, 1536, 4, 2048, 8, 8, 64)


def _layout(ckpt, name):
    info = ckpt.info(name)
    return info.dtype, list(info.shape)


def test_reference_layout_and_statistics(ws):
    with open_checkpoint(ws.reference) as c:
        assert c.files[0].metadata == {"format": "pt"}
        assert len(c.names) == 2 + 4 * 9 + 1
        assert _layout(c, "model.embed_tokens.weight") == ("BF16", [2048, 512])
        assert _layout(c, "lm_head.weight") == ("BF16", [2048, 512])
        assert _layout(c, f"{L0}.self_attn.q_proj.weight") == ("BF16", [512, 512])
        assert _layout(c, f"{L0}.mlp.down_proj.weight") == ("BF16", [512, 1536])
        assert _layout(c, "model.norm.weight") == ("BF16", [512])
        w = c.tensor(f"{L0}.mlp.up_proj.weight").astype(np.float32)
        norm = c.tensor(f"{L0}.input_layernorm.weight").astype(np.float32)
        hidden = demo.outlier_channels(0)["hidden"]
        stds = [np.delete(c.tensor(f"model.layers.{i}.self_attn.k_proj.weight").astype(np.float32), hidden,
                          axis=1).std() for i in range(4)]
    cols = np.abs(w).mean(0)
    assert (cols[hidden] > 4 * np.median(cols)).all()  # outlier input channels
    normal = np.delete(w, hidden, axis=1).ravel() / 0.02
    kurt = np.mean((normal - normal.mean()) ** 4) / normal.var() ** 2
    assert kurt > 4  # heavy tails (Gaussian: 3)
    assert 0.7 < np.median(norm) < 1.3 and norm.std() > 0.05
    assert stds == sorted(stds)  # deeper layers are larger


def test_gptq_layouts(ws):
    for label in ("gptq-w4g128", "gptq-w4g128-actorder", "rtn-w4g128"):
        with open_checkpoint(ws.variants[label]) as c:
            assert c.files[0].metadata == {"format": "pt"}
            q = f"{L0}.self_attn.q_proj"
            assert _layout(c, f"{q}.qweight") == ("I32", [64, 512])
            assert _layout(c, f"{q}.qzeros") == ("I32", [4, 64])
            assert _layout(c, f"{q}.scales") == ("F16", [4, 512])
            assert _layout(c, f"{q}.g_idx") == ("I32", [512])
            d = f"{L0}.mlp.down_proj"
            assert _layout(c, f"{d}.qweight") == ("I32", [192, 512])
            assert _layout(c, f"{d}.scales") == ("F16", [12, 512])
            assert _layout(c, "model.embed_tokens.weight") == ("F16", [2048, 512])
            assert _layout(c, "lm_head.weight") == ("F16", [2048, 512])
            assert _layout(c, f"{L0}.input_layernorm.weight") == ("F16", [512])
            qc = c.configs["quantize_config.json"]
            assert c.configs["config.json"]["quantization_config"] == qc
    sym = json.loads((ws.variants["gptq-w4g128"] / "quantize_config.json").read_text())
    assert {k: sym[k] for k in ("bits", "group_size", "desc_act", "sym", "static_groups", "checkpoint_format",
                                "quant_method", "pack_dtype", "true_sequential", "damp_percent")} == \
        {"bits": 4, "group_size": 128, "desc_act": False, "sym": True, "static_groups": False,
         "checkpoint_format": "gptq", "quant_method": "gptq", "pack_dtype": "int32",
         "true_sequential": True, "damp_percent": 0.01}
    assert sym["meta"] == {"quantizer": ["quantscope-demo"]}
    act = json.loads((ws.variants["gptq-w4g128-actorder"] / "quantize_config.json").read_text())
    assert (act["desc_act"], act["sym"], act["checkpoint_format"]) == (True, False, "gptq")
    rtn = json.loads((ws.variants["rtn-w4g128"] / "quantize_config.json").read_text())
    assert (rtn["desc_act"], rtn["sym"], rtn["checkpoint_format"]) == (False, False, "gptq_v2")


def test_awq_layout(ws):
    with open_checkpoint(ws.variants["awq-w4g128"]) as c:
        q = f"{L0}.self_attn.q_proj"
        assert _layout(c, f"{q}.qweight") == ("I32", [512, 64])
        assert _layout(c, f"{q}.qzeros") == ("I32", [4, 64])
        assert _layout(c, f"{q}.scales") == ("F16", [4, 512])
        assert f"{q}.g_idx" not in c
        assert _layout(c, f"{L0}.mlp.down_proj.qweight") == ("I32", [1536, 64])
        assert _layout(c, f"{L0}.mlp.gate_proj.qweight") == ("I32", [512, 192])
        assert _layout(c, "model.norm.weight") == ("F16", [512])
        assert c.configs["config.json"]["quantization_config"] == {
            "quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": None}
        assert c.configs["quant_config.json"] == {"zero_point": True, "q_group_size": 128, "w_bit": 4,
                                                  "version": "GEMM", "modules_to_not_convert": None}


def test_mlx_layouts(ws):
    with open_checkpoint(ws.variants["mlx-affine-q4g64"]) as c:
        assert c.files[0].metadata == {"format": "mlx"}
        q = f"{L0}.self_attn.q_proj"
        assert _layout(c, f"{q}.weight") == ("U32", [512, 64])
        assert _layout(c, f"{q}.scales") == ("BF16", [512, 8])
        assert _layout(c, f"{q}.biases") == ("BF16", [512, 8])
        assert _layout(c, "model.embed_tokens.weight") == ("U32", [2048, 64])
        assert _layout(c, "lm_head.scales") == ("BF16", [2048, 8])
        assert _layout(c, "model.norm.weight") == ("BF16", [512])
        cfg = c.configs["config.json"]
        assert cfg["quantization"] == cfg["quantization_config"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    with open_checkpoint(ws.variants["mlx-mixed-3-6"]) as c:
        cfg = c.configs["config.json"]
        qz = cfg["quantization"]
        assert qz == cfg["quantization_config"]
        assert (qz["group_size"], qz["bits"], qz["mode"]) == (64, 3, "affine")
        six = sorted(k for k, v in qz.items() if isinstance(v, dict) and v["bits"] == 6)
        # L = 4: i < 0, i >= 3 or (i - 0) % 3 == 2  ->  layers 2 and 3.
        assert six == ["lm_head", "model.layers.2.mlp.down_proj", "model.layers.2.self_attn.v_proj",
                       "model.layers.3.mlp.down_proj", "model.layers.3.self_attn.v_proj"]
        assert qz["model.layers.0.self_attn.v_proj"] == {"group_size": 64, "bits": 3, "mode": "affine"}
        assert _layout(c, "model.layers.2.self_attn.v_proj.weight") == ("U32", [512, 96])
        assert _layout(c, "model.layers.1.self_attn.v_proj.weight") == ("U32", [512, 48])
        assert _layout(c, "model.embed_tokens.weight") == ("U32", [2048, 48])
        assert _layout(c, "lm_head.weight") == ("U32", [2048, 96])


# -- packers against the library decoders ---------------------------------------------------------

def test_gptq_v1_round_trip_and_file_contents(ws, ref):
    weights, xs = ref
    m = f"{L0}.self_attn.o_proj"
    w = weights[f"{m}.weight"].astype(np.float32)
    with single_threaded_blas():
        codes, scales, zeros, g_idx = demo.gptq_quantize(w, demo.hessian(xs[m]), sym=True)
    assert (zeros == 8).all() and np.array_equal(g_idx, np.arange(512) // 128)
    qweight, qzeros = demo.pack_gptq(codes, zeros, version=1)
    assert (qzeros.view(np.uint32) == 0x77777777).all()
    # The library decodes to the exact product (an fp16 runtime would round it once more).
    expected = scales.astype(np.float32)[g_idx].T * (codes.astype(np.float32) - 8)
    got = gptq.decode(qweight, qzeros, scales, g_idx, bits=4, group_size=128, version=1)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(gptq.codes(qweight, bits=4), codes)
    stored = _read(ws.variants["gptq-w4g128"], [f"{m}.qweight", f"{m}.qzeros", f"{m}.scales", f"{m}.g_idx"])
    np.testing.assert_array_equal(stored[f"{m}.qweight"], qweight)
    np.testing.assert_array_equal(stored[f"{m}.qzeros"], qzeros)
    np.testing.assert_array_equal(stored[f"{m}.scales"], scales)


def test_gptq_asymmetric_v1_zeros_and_v2_round_trip():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    w[:8] = np.abs(w[:8]) + 0.1  # all-positive groups: min/max RTN gives them a zero point of 0
    x = rng.standard_normal((300, 256)).astype(np.float32)
    codes, scales, zeros, g_idx = demo.gptq_quantize(w, demo.hessian(x), sym=False, min_zero=1)
    assert zeros.min() >= 1  # storable as v1 (z - 1 >= 0)
    for version in (1, 2):
        qweight, qzeros = demo.pack_gptq(codes, zeros, version=version)
        got = gptq.decode(qweight, qzeros, scales, g_idx, bits=4, group_size=128, version=version)
        np.testing.assert_array_equal(got, demo.dequantize(codes, scales, zeros, 128))
    c, s, z = demo.rtn_quantize(w)
    assert z.min() == 0
    with pytest.raises(ValueError):
        demo.pack_gptq(c, z, version=1)


def test_act_order_g_idx(ws, ref):
    weights, _ = ref
    m = f"{L0}.mlp.down_proj"
    t = _read(ws.variants["gptq-w4g128-actorder"], [f"{m}.qweight", f"{m}.qzeros", f"{m}.scales", f"{m}.g_idx"])
    g_idx = t[f"{m}.g_idx"]
    assert (np.diff(g_idx) < 0).any()  # non-monotonic
    assert np.array_equal(np.bincount(g_idx), np.full(12, 128))
    w = weights[f"{m}.weight"].astype(np.float32)
    args = (t[f"{m}.qweight"], t[f"{m}.qzeros"], t[f"{m}.scales"])
    with_g = gptq.decode(*args, g_idx, bits=4, group_size=128, version=1)
    without = gptq.decode(*args, None, bits=4, group_size=128, version=1)
    assert np.linalg.norm(with_g - w) < 0.5 * np.linalg.norm(without - w)


def test_awq_gemm_round_trip():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((96, 256)).astype(np.float32)
    codes, scales, zeros = demo.rtn_quantize(w, group_size=128)
    qweight, qzeros = demo.pack_awq_gemm(np.ascontiguousarray(codes.T)), demo.pack_awq_gemm(zeros)
    assert qweight.shape == (256, 12) and qweight.dtype == np.int32
    # Nibble slot i of word c holds column 8c + ORDER[i].
    slot1 = (qweight[0, 0].view(np.uint32) >> 4) & 0xF
    assert slot1 == codes[awq.ORDER[1], 0]
    got = awq.decode_gemm(qweight, qzeros, scales, group_size=128)
    np.testing.assert_array_equal(got, demo.dequantize(codes, scales, zeros, 128))
    np.testing.assert_array_equal(awq.codes_gemm(qweight), codes)


def test_mlx_bytes_equal_mx_quantize(ws, ref):
    mx = pytest.importorskip("mlx.core")
    weights, _ = ref
    for label, path, bits in [("mlx-affine-q4g64", f"{L0}.self_attn.q_proj", 4),
                              ("mlx-affine-q4g64", "model.embed_tokens", 4),
                              ("mlx-mixed-3-6", "model.layers.3.mlp.down_proj", 6),
                              ("mlx-mixed-3-6", "model.layers.1.mlp.gate_proj", 3)]:
        t = _read(ws.variants[label], [f"{path}.weight", f"{path}.scales", f"{path}.biases"])
        src = mx.array(weights[f"{path}.weight"].view(np.uint16)).view(mx.bfloat16)
        wq, s, b = mx.quantize(src, group_size=64, bits=bits)
        assert t[f"{path}.weight"].tobytes() == np.array(wq).tobytes()
        assert t[f"{path}.scales"].view(np.uint16).tobytes() == np.array(s.view(mx.uint16)).tobytes()
        assert t[f"{path}.biases"].view(np.uint16).tobytes() == np.array(b.view(mx.uint16)).tobytes()
        ours = mlx_fmt.decode_affine(t[f"{path}.weight"], t[f"{path}.scales"], t[f"{path}.biases"],
                                     bits=bits, group_size=64)
        theirs = np.array(mx.dequantize(wq, s, b, group_size=64, bits=bits).astype(mx.float32))
        np.testing.assert_array_equal(ours, theirs)


# -- what the algorithms promise ------------------------------------------------------------------

def _gptq_weight(tensors, m, version):
    return gptq.decode(tensors[f"{m}.qweight"], tensors[f"{m}.qzeros"], tensors[f"{m}.scales"],
                       tensors[f"{m}.g_idx"], bits=4, group_size=128, version=version)


@pytest.mark.parametrize("label,sym", [("gptq-w4g128", True), ("gptq-w4g128-actorder", False)])
def test_gptq_beats_rtn_on_every_layer_output(ws, ref, label, sym):
    weights, xs = ref
    t = _read(ws.variants[label])
    for i in range(4):
        for lin in demo.LINEARS:
            m = demo.layer_name(i, lin)
            # The first 256 of the 1024 calibration tokens keep this test fast.
            w, x = weights[f"{m}.weight"].astype(np.float32), xs[m][:256]
            # RTN on the same grid: same bits, group and zero-point scheme.
            rtn = demo.dequantize(*demo.rtn_quantize(w, bits=4, group_size=128, sym=sym), 128)
            assert _rel_out(_gptq_weight(t, m, 1), w, x) < _rel_out(rtn, w, x), m


def test_rtn_variant_is_rtn(ws, ref):
    weights, _ = ref
    m = "model.layers.2.mlp.up_proj"
    t = _read(ws.variants["rtn-w4g128"])
    w = weights[f"{m}.weight"].astype(np.float32)
    np.testing.assert_array_equal(_gptq_weight(t, m, 2), demo.dequantize(*demo.rtn_quantize(w), 128))


def test_awq_folded_norms_recover_the_scales(ws, ref):
    weights, xs = ref
    t = _read(ws.variants["awq-w4g128"])
    with open_checkpoint(ws.root / demo.AWQ_SMOOTHING_FILE) as c:
        smooth = {n: np.array(c.tensor(n)) for n in c.names}
    for i in range(4):
        p = f"model.layers.{i}"
        for norm, lin in (("input_layernorm", "self_attn.q_proj"), ("post_attention_layernorm", "mlp.up_proj")):
            ref_norm = weights[f"{p}.{norm}.weight"].astype(np.float32)
            s_est = ref_norm / t[f"{p}.{norm}.weight"].astype(np.float32)
            s = smooth[f"{p}.{lin}.smooth"]
            np.testing.assert_allclose(s_est, s, rtol=2e-3)  # fp16 rounding of ref/s
            assert s.std() > 0  # a real smoothing, not all ones
            m = f"{p}.{lin}"
            w = weights[f"{m}.weight"].astype(np.float32)
            wq = awq.decode_gemm(t[f"{m}.qweight"], t[f"{m}.qzeros"], t[f"{m}.scales"])
            if lin == "mlp.up_proj":  # up's rows were divided by down_proj's scales
                wq = wq * smooth[f"{p}.mlp.down_proj.smooth"][:, None]
            undone = wq / s_est
            assert np.linalg.norm(undone - w) < 0.5 * np.linalg.norm(wq - w), m
            # The file holds exactly the quantization of W·diag(s) (after the row fold, for up).
            scaled = w * s
            if lin == "mlp.up_proj":
                scaled = scaled / smooth[f"{p}.mlp.down_proj.smooth"][:, None]
            np.testing.assert_array_equal(
                awq.decode_gemm(t[f"{m}.qweight"], t[f"{m}.qzeros"], t[f"{m}.scales"]),
                demo.dequantize(*demo.rtn_quantize(scaled), 128))
        # v -> o: v_proj rows carry 1/s_o, o_proj columns s_o.
        s_o = smooth[f"{p}.self_attn.o_proj.smooth"]
        m = f"{p}.self_attn.o_proj"
        w, x = weights[f"{m}.weight"].astype(np.float32), xs[m]
        wq = awq.decode_gemm(t[f"{m}.qweight"], t[f"{m}.qzeros"], t[f"{m}.scales"]) / s_o
        assert _rel_out(wq, w, x) < 0.2


# -- build mechanics ------------------------------------------------------------------------------

@pytest.mark.slow  # a second full build
def test_same_seed_gives_identical_bytes(ws, tmp_path):
    again = demo.build_demo(tmp_path / "again", seed=0)
    files = sorted(p.relative_to(ws.root) for p in ws.root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again.root) for p in again.root.rglob("*") if p.is_file())
    for rel in files:
        assert (ws.root / rel).read_bytes() == (again.root / rel).read_bytes(), rel


def test_other_seed_differs():
    a, b = demo._heavy_tailed(np.random.default_rng([0, 0]), 100, 1.0), demo._heavy_tailed(np.random.default_rng([1, 0]), 100, 1.0)
    assert not np.array_equal(a, b)
    assert any(not np.array_equal(demo.outlier_channels(0)[k], demo.outlier_channels(1)[k]) for k in ("hidden", "mlp"))


def test_cancel_midway_leaves_nothing(tmp_path):
    stop = threading.Event()
    seen = []

    def progress(f):
        seen.append(f)
        if f > 0.1:
            stop.set()

    dest = tmp_path / "ws"
    with pytest.raises(Cancelled):
        demo.build_demo(dest, progress=progress, cancel=stop)
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left either
    assert seen == sorted(seen) and 0.1 < seen[-1] < 0.5


def test_an_existing_empty_folder_is_kept_and_filled(tmp_path):
    """`quantscope demo DIR` on an empty folder replaced it (a new inode, mode 0755 for 0700, and
    'Device or resource busy' on a mount point); it is filled in place now, and a cancelled build
    leaves it empty."""
    import os
    import threading
    dest = tmp_path / "mine"
    dest.mkdir(mode=0o700)
    before = os.stat(dest)
    stop = threading.Event()
    with pytest.raises(Cancelled):
        demo.build_demo(dest, progress=lambda f: stop.set() if f > 0.2 else None, cancel=stop)
    assert list(dest.iterdir()) == [] and os.stat(dest).st_ino == before.st_ino
    got = demo.build_demo(dest)
    after = os.stat(dest)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert got.root == dest and demo.load_demo_workspace(dest) is not None
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]  # no hidden build folder left
    # a build killed in such a folder left its hidden build folder: the next one is not refused
    again = tmp_path / "again"
    (again / f".building-{2 ** 22 + 1}-x1y2" / "reference").mkdir(parents=True)  # (no such process)
    with pytest.raises(Cancelled):
        demo.build_demo(again, progress=lambda f: stop.set() if f > 0.01 else None, cancel=stop)
    assert list(again.iterdir()) == []
    # a build still running there (this process) keeps its folder, and another is refused
    (again / f".building-{os.getpid()}-x1y2").mkdir()
    with pytest.raises(CheckpointError, match="not empty"):
        demo.build_demo(again)
    assert [p.name for p in again.iterdir()] == [f".building-{os.getpid()}-x1y2"]


def test_existing_destination_is_refused(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        demo.build_demo(tmp_path / "full")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(CheckpointError):
        demo.build_demo(tmp_path / "file")
    assert (tmp_path / "full" / "x.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full"]


def test_demo_workspace_reuses_a_complete_cache(ws, tmp_path, monkeypatch):
    def no_build(*a, **k):
        raise AssertionError("should not rebuild")

    cache = tmp_path / "cache"
    shutil.copytree(ws.root, cache / demo.DEMO_VERSION)
    monkeypatch.setattr(demo, "build_demo", no_build)
    got = demo.demo_workspace(cache)
    assert got.root == cache / demo.DEMO_VERSION and list(got.variants) == list(ws.variants)
    monkeypatch.setenv("QUANTSCOPE_CACHE", str(cache))
    assert demo.default_cache_dir() == cache and demo.demo_workspace() == got

    # A damaged copy (a truncated file) is rebuilt.
    built = []
    monkeypatch.setattr(demo, "build_demo", lambda dest, **k: built.append(dest) or "rebuilt")
    victim = cache / demo.DEMO_VERSION / "awq-w4g128" / "model.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])
    assert demo.demo_workspace(cache) == "rebuilt" and built == [cache / demo.DEMO_VERSION]
    assert not (cache / demo.DEMO_VERSION).exists()


def test_demo_workspace_will_not_delete_a_foreign_folder(tmp_path, monkeypatch):
    (tmp_path / demo.DEMO_VERSION).mkdir()
    (tmp_path / demo.DEMO_VERSION / "notes.txt").write_text("mine")
    monkeypatch.setattr(demo, "build_demo", lambda *a, **k: pytest.fail("should not build"))
    with pytest.raises(CheckpointError, match="not a quantscope demo workspace"):
        demo.demo_workspace(tmp_path)


def test_xdg_cache_home_is_honoured(tmp_path, monkeypatch):
    monkeypatch.delenv("QUANTSCOPE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert demo.default_cache_dir() == tmp_path / "quantscope"
