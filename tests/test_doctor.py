"""The checkpoint doctor: one broken fixture per rule, and clean checkpoints of every scheme.

Each broken fixture corrupts a small clean checkpoint the way the real failure looks (truncated
shard, Git-LFS pointer, deleted shard, wrapped GPTQ v1 zero, dropped `.biases`, …) and asserts
that exactly that rule fires on that tensor/layer, with no other error.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from helpers import read_all, writable_copy, write_raw, write_st
from quantscope.backend import doctor
from quantscope.backend.bitpack import pack_bits
from quantscope.backend.doctor import RULES, Finding, diagnose, run_diagnosis
from quantscope.backend.errors import Cancelled
from quantscope.backend.safetensors_file import SafetensorsFile

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
DOCS = Path(__file__).parents[1] / "docs" / "doctor.md"
BF16 = ml_dtypes.bfloat16
HIDDEN, INTER, VOCAB, NLAYERS = 128, 256, 96, 3


# ---------------------------------------------------------------------------------- builders

def _cfg(**extra) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "intermediate_size": INTER, "num_attention_heads": 2, "head_dim": 64, "vocab_size": VOCAB,
            "num_hidden_layers": NLAYERS, "tie_word_embeddings": False, "torch_dtype": "bfloat16", **extra}


def _write_cfg(folder: Path, cfg: dict, name="config.json") -> None:
    (folder / name).write_text(json.dumps(cfg, indent=1))


def _rng(seed=0):
    return np.random.default_rng(seed)


def _mlx_layer(rng, n, k, bits=4, group=64):
    codes = rng.integers(0, 1 << bits, size=(n, k), dtype=np.uint8)
    w = pack_bits(codes, bits)
    s = (rng.uniform(0.005, 0.02, size=(n, k // group)) * rng.choice([-1, 1], size=(n, k // group))).astype(BF16)
    b = rng.normal(0, 0.05, size=(n, k // group)).astype(BF16)
    return w, s, b


def _mlx_tensors(seed=0, bits=4, group=64):
    rng = _rng(seed)
    t = {}

    def q(path, n, k, b=bits, g=group):
        t[f"{path}.weight"], t[f"{path}.scales"], t[f"{path}.biases"] = _mlx_layer(rng, n, k, b, g)

    q("model.embed_tokens", VOCAB, HIDDEN)
    for i in range(NLAYERS):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = (1 + rng.normal(0, 0.1, HIDDEN)).astype(BF16)
        q(f"{p}.self_attn.q_proj", HIDDEN, HIDDEN)
        q(f"{p}.mlp.up_proj", INTER, HIDDEN)
        q(f"{p}.mlp.down_proj", HIDDEN, INTER)
    t["model.norm.weight"] = (1 + rng.normal(0, 0.1, HIDDEN)).astype(BF16)
    q("lm_head", VOCAB, HIDDEN)
    return t


def make_mlx(folder: Path, tensors=None, quant=None, cfg_extra=None, metadata=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = _mlx_tensors() if tensors is None else tensors
    meta = {"format": "mlx"} if metadata is None else (metadata or None)  # False: no __metadata__
    write_st(folder / "model.safetensors", tensors, meta)
    q = {"group_size": 64, "bits": 4, "mode": "affine"} if quant is None else quant
    _write_cfg(folder, _cfg(quantization=q, quantization_config=q, **(cfg_extra or {})))
    return folder


def _gptq_tensors(seed=0, sym=True, version=1, bits=4, group=64, g_idx=None):
    rng = _rng(seed)
    t = {}
    ng = HIDDEN // group
    for i in range(NLAYERS):
        for proj, (n, k) in {"self_attn.q_proj": (HIDDEN, HIDDEN), "mlp.up_proj": (INTER, HIDDEN)}.items():
            p = f"model.layers.{i}.{proj}"
            codes = rng.integers(0, 1 << bits, size=(n, k), dtype=np.uint8)
            t[f"{p}.qweight"] = pack_bits(codes, bits).T.copy().view(np.int32)  # [K*b/32, N]
            if sym:
                z = np.full((ng, n), 1 << (bits - 1))
            else:
                z = rng.integers(1, (1 << bits) - 1, size=(ng, n))
            stored = z - 1 if version == 1 else z
            t[f"{p}.qzeros"] = pack_bits(stored.astype(np.uint8), bits).view(np.int32)
            t[f"{p}.scales"] = rng.uniform(0.005, 0.02, size=(ng, n)).astype(np.float16)
            t[f"{p}.g_idx"] = (np.arange(k) // group if g_idx is None else g_idx).astype(np.int32)
    t["model.norm.weight"] = np.ones(HIDDEN, np.float16)
    return t


def make_gptq(folder: Path, tensors=None, qcfg=None, **kw) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = _gptq_tensors(**kw) if tensors is None else tensors
    write_st(folder / "model.safetensors", tensors, {"format": "pt"})
    sym = kw.get("sym", True)
    version = kw.get("version", 1)
    q = {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": sym, "desc_act": False,
         "checkpoint_format": "gptq" if version == 1 else "gptq_v2"} if qcfg is None else qcfg
    _write_cfg(folder, _cfg(quantization_config=q))
    return folder


def make_awq(folder: Path, gemv_layout=False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = _rng(1)
    n, k, g = HIDDEN, HIDDEN, 64
    p = "model.layers.0.self_attn.q_proj"
    if gemv_layout:
        t = {f"{p}.qweight": pack_bits(rng.integers(0, 16, (n, k), dtype=np.uint8), 4).view(np.int32),
             f"{p}.qzeros": pack_bits(rng.integers(0, 16, (n, 16), dtype=np.uint8), 4).view(np.int32),
             f"{p}.scales": rng.uniform(0.005, 0.02, (n, 16)).astype(np.float16)}
    else:
        t = {f"{p}.qweight": pack_bits(rng.integers(0, 16, (k, n), dtype=np.uint8), 4).view(np.int32),
             f"{p}.qzeros": pack_bits(rng.integers(0, 16, (k // g, n), dtype=np.uint8), 4).view(np.int32),
             f"{p}.scales": rng.uniform(0.005, 0.02, (k // g, n)).astype(np.float16)}
    write_st(folder / "model.safetensors", t, {"format": "pt"})
    _write_cfg(folder, _cfg(quantization_config={"quant_method": "awq", "bits": 4, "group_size": g,
                                                 "zero_point": True, "version": "gemm"}))
    return folder


def make_dense_sharded(folder: Path, n_shards=2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = _rng(2)
    wm = {}
    total = 0
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        t = {f"model.layers.{s}.mlp.up_proj.weight": rng.normal(0, 0.02, (INTER, HIDDEN)).astype(BF16),
             f"model.layers.{s}.mlp.down_proj.weight": rng.normal(0, 0.02, (HIDDEN, INTER)).astype(BF16)}
        write_st(folder / name, t, {"format": "pt"})
        wm.update(dict.fromkeys(t, name))
        total += sum(a.nbytes for a in t.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": wm}))
    _write_cfg(folder, _cfg())
    return folder


def copy_golden(name: str, dest: Path) -> Path:
    shutil.copytree(GOLDEN / name, dest)
    (dest / "expected.npz").unlink(missing_ok=True)
    return dest


def rewrite(folder: Path, fn, file="model.safetensors") -> Path:
    t, meta = read_all(folder / file)
    fn(t)
    write_st(folder / file, t, meta)
    return folder


def edit_cfg(folder: Path, fn, name="config.json") -> Path:
    cfg = json.loads((folder / name).read_text())
    fn(cfg)
    _write_cfg(folder, cfg, name)
    return folder


# ---------------------------------------------------------------------------------- corruptions
# Each returns (checkpoint path, expected rule, expected tensor or layer or None, match field).

Q0 = "model.layers.0.self_attn.q_proj"
UP0 = "model.layers.0.mlp.up_proj"


def c_missing(tmp):
    return tmp / "nope", "container.missing", None


def c_too_short(tmp):
    make_mlx(tmp / "m")
    (tmp / "m" / "model.safetensors").write_bytes(b"\x01\x02")
    return tmp / "m", "container.too-short", None


def c_lfs_pointer(tmp):
    make_mlx(tmp / "m")
    (tmp / "m" / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "a" * 64 + "\nsize 123456\n")
    return tmp / "m", "container.header-too-large", None


def c_html_page(tmp):
    make_mlx(tmp / "m")
    (tmp / "m" / "model.safetensors").write_text("<!DOCTYPE html><html><body>Rate limited</body></html>" * 4)
    return tmp / "m", "container.header-too-large", None


def c_header_not_object(tmp):
    write_raw(tmp / "x.safetensors", b"[1, 2, 3]")
    return tmp / "x.safetensors", "container.header-json", None


def c_unknown_dtype(tmp):
    write_raw(tmp / "x.safetensors", {"__metadata__": {"format": "pt"},
                                      "a": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    return tmp / "x.safetensors", "container.dtype", "a"


def c_size_mismatch(tmp):
    write_raw(tmp / "x.safetensors", {"__metadata__": {"format": "pt"},
                                      "a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8)
    return tmp / "x.safetensors", "container.size-mismatch", "a"


def c_truncated(tmp):
    make_dense_sharded(tmp / "m")
    p = tmp / "m" / "model-00002-of-00002.safetensors"
    p.write_bytes(p.read_bytes()[:-1000])
    return tmp / "m", "container.out-of-file", "model.layers.1.mlp.down_proj.weight"


def c_overlap(tmp):
    write_raw(tmp / "x.safetensors", {"__metadata__": {"format": "pt"},
                                      "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)
    return tmp / "x.safetensors", "container.overlap", "b"


def c_gap(tmp):
    write_raw(tmp / "x.safetensors", {"__metadata__": {"format": "pt"},
                                      "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}, b"\0" * 20)
    return tmp / "x.safetensors", "container.gap", "b"


def c_trailing(tmp):
    write_raw(tmp / "x.safetensors", {"__metadata__": {"format": "pt"},
                                      "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 16)
    return tmp / "x.safetensors", "container.trailing", None


def c_metadata_nonstring(tmp):
    write_raw(tmp / "x.safetensors", {"__metadata__": {"format": "pt", "step": 5},
                                      "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    return tmp / "x.safetensors", "container.metadata", None


def c_duplicate_key(tmp):
    hb = (b'{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
          b'"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}')
    write_raw(tmp / "x.safetensors", hb, b"\0" * 16)
    return tmp / "x.safetensors", "container.duplicate-key", "a"


def c_metadata_format(tmp):
    make_mlx(tmp / "m", metadata={"format": "numpy"})
    return tmp / "m", "container.metadata-format", None


def c_pickle(tmp):
    (tmp / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    return tmp / "pytorch_model.bin", "container.unsupported", None


def c_index_no_weight_map(tmp):
    make_dense_sharded(tmp / "m")
    (tmp / "m" / "model.safetensors.index.json").write_text('{"metadata": {}}')
    return tmp / "m", "index.no-weight-map", None


def c_index_bad_json(tmp):
    make_dense_sharded(tmp / "m")
    (tmp / "m" / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    return tmp / "m", "index.json", None


def c_missing_shard(tmp):
    make_dense_sharded(tmp / "m")
    (tmp / "m" / "model-00002-of-00002.safetensors").unlink()
    return tmp / "m", "index.missing-shard", None


def c_unsafe_path(tmp):
    make_dense_sharded(tmp / "m")
    idx = tmp / "m" / "model.safetensors.index.json"
    d = json.loads(idx.read_text())
    d["weight_map"]["model.layers.1.mlp.up_proj.weight"] = "../../etc/passwd"
    idx.write_text(json.dumps(d))
    return tmp / "m", "index.unsafe-path", "model.layers.1.mlp.up_proj.weight"


def c_tensor_missing(tmp):
    make_dense_sharded(tmp / "m")
    idx = tmp / "m" / "model.safetensors.index.json"
    d = json.loads(idx.read_text())
    d["weight_map"]["model.layers.0.self_attn.q_proj.weight"] = "model-00001-of-00002.safetensors"
    idx.write_text(json.dumps(d))
    return tmp / "m", "index.tensor-missing", "model.layers.0.self_attn.q_proj.weight"


def c_tensor_unlisted(tmp):
    make_dense_sharded(tmp / "m")
    idx = tmp / "m" / "model.safetensors.index.json"
    d = json.loads(idx.read_text())
    del d["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    d["metadata"] = {}
    idx.write_text(json.dumps(d))
    return tmp / "m", "index.tensor-unlisted", "model.layers.1.mlp.down_proj.weight"


def c_duplicate_tensor(tmp):
    make_dense_sharded(tmp / "m")
    f2 = tmp / "m" / "model-00002-of-00002.safetensors"
    t, meta = read_all(f2)
    t["model.layers.0.mlp.up_proj.weight"] = np.zeros((INTER, HIDDEN), BF16) + BF16(0.01)
    write_st(f2, t, meta)
    d = json.loads((tmp / "m" / "model.safetensors.index.json").read_text())
    d["metadata"] = {}
    (tmp / "m" / "model.safetensors.index.json").write_text(json.dumps(d))
    return tmp / "m", "index.duplicate-tensor", "model.layers.0.mlp.up_proj.weight"


def c_stray_file(tmp):
    make_dense_sharded(tmp / "m")
    write_st(tmp / "m" / "model.safetensors", {"model.norm.weight": np.ones(HIDDEN, BF16)}, {"format": "pt"})
    return tmp / "m", "index.stray-file", None


def c_total_size(tmp):
    make_dense_sharded(tmp / "m")
    idx = tmp / "m" / "model.safetensors.index.json"
    d = json.loads(idx.read_text())
    d["metadata"]["total_size"] += 4096
    idx.write_text(json.dumps(d))
    return tmp / "m", "index.total-size", None


def c_config_unreadable(tmp):
    make_mlx(tmp / "m")
    (tmp / "m" / "config.json").write_text('{"quantization": {"bits": 4,')
    return tmp / "m", "config.unreadable", None


def c_config_bom(tmp):
    # json.loads of the bytes skips a UTF-8 BOM; transformers reads text and fails on it
    make_mlx(tmp / "m")
    c = tmp / "m" / "config.json"
    c.write_bytes(b"\xef\xbb\xbf" + c.read_bytes())
    return tmp / "m", "config.unreadable", None


# MLX triples

def c_biases_without_scales(tmp):
    t = _mlx_tensors()
    del t[f"{Q0}.scales"]
    return make_mlx(tmp / "m", t), "mlx.biases-without-scales", f"{Q0}.biases"


def c_scales_not_quantized(tmp):
    q = {"group_size": 64, "bits": 4, "mode": "affine", Q0: False}
    return make_mlx(tmp / "m", quant=q), "mlx.scales-not-quantized", f"{Q0}.scales"


def c_missing_biases(tmp):
    t = _mlx_tensors()
    del t[f"{Q0}.biases"]
    return make_mlx(tmp / "m", t), "mlx.missing-biases", f"{Q0}.scales"


def c_fp_with_biases(tmp):
    t = _mlx_tensors()
    rng = _rng(5)
    t[f"{Q0}.weight"] = pack_bits(rng.integers(0, 16, (HIDDEN, HIDDEN), dtype=np.uint8), 4)
    t[f"{Q0}.scales"] = rng.integers(118, 124, (HIDDEN, HIDDEN // 32)).astype(np.uint8)
    t[f"{Q0}.biases"] = np.zeros((HIDDEN, HIDDEN // 32), BF16)
    q = {"group_size": 64, "bits": 4, "mode": "affine", Q0: {"group_size": 32, "bits": 4, "mode": "mxfp4"}}
    return make_mlx(tmp / "m", t, quant=q), "mlx.fp-with-biases", f"{Q0}.biases"


def c_weight_dtype(tmp):
    t = _mlx_tensors()
    t[f"{Q0}.weight"] = t[f"{Q0}.weight"].view(np.int32)
    return make_mlx(tmp / "m", t), "mlx.weight-dtype", f"{Q0}.weight"


def c_rank(tmp):
    t = _mlx_tensors()
    t[f"{Q0}.weight"] = t[f"{Q0}.weight"].reshape(-1)
    return make_mlx(tmp / "m", t), "mlx.rank", f"{Q0}.weight"


def c_scales_shape(tmp):
    t = _mlx_tensors()
    t[f"{Q0}.scales"] = t[f"{Q0}.scales"][:-1]
    t[f"{Q0}.biases"] = t[f"{Q0}.biases"][:-1]
    return make_mlx(tmp / "m", t), "mlx.scales-shape", f"{Q0}.scales"


def c_bits_group_mismatch(tmp):
    q = {"group_size": 64, "bits": 4, "mode": "affine", Q0: {"group_size": 128, "bits": 4}}
    return make_mlx(tmp / "m", quant=q), "mlx.bits-group", f"{Q0}.scales"


def c_bits_group_swapped(tmp):
    # 8 bit / group 32 fits the 4 bit / group 64 shapes, but gives K = 64, not a model dimension.
    q = {"group_size": 64, "bits": 4, "mode": "affine", Q0: {"group_size": 32, "bits": 8}}
    return make_mlx(tmp / "m", quant=q), "mlx.bits-group", f"{Q0}.scales"


def c_bits_group_reads_another_dimension(tmp):
    # up_proj stored at 4 bit / group 64 read as 2 bit / group 128: K = 256, the intermediate
    # size, a dimension of the model (it passed); an up_proj takes the hidden size (128)
    q = {"group_size": 64, "bits": 4, "mode": "affine", "model.layers.0.mlp.up_proj": {"group_size": 128, "bits": 2}}
    return make_mlx(tmp / "m", quant=q), "mlx.bits-group", "model.layers.0.mlp.up_proj.scales"


def c_override_unmatched(tmp):
    q = {"group_size": 64, "bits": 4, "mode": "affine",
         "model.layers.0.mlp.down_prj": {"group_size": 64, "bits": 4}}
    return make_mlx(tmp / "m", quant=q), "mlx.override-unmatched", "model.layers.0.mlp.down_prj"


def c_config_bad_value(tmp):
    q = {"group_size": 64, "bits": 0, "mode": "affine"}  # crashed every command (modulo by zero)
    return make_mlx(tmp / "m", quant=q), "config.bad-value", None


def c_config_number_type(tmp):
    q = {"group_size": 64.0, "bits": 4, "mode": "affine"}  # reached the kernels as a float
    return make_mlx(tmp / "m", quant=q), "config.number-type", None


def c_per_expert(tmp):
    # experts quantized one by one (what a converter that does not stack writes): mlx-lm's
    # sanitize stacks only their .weight into switch_mlp, the scales/biases are left over
    t = _mlx_tensors()
    for k in [k for k in t if k.startswith("model.layers.1.mlp.up_proj.")]:
        for e in range(2):
            t[k.replace("mlp.up_proj", f"mlp.experts.{e}.up_proj")] = t[k]
        del t[k]
    return make_mlx(tmp / "m", t), "mlx.per-expert", "model.layers.1.mlp.experts.0.up_proj"


def c_fused_and_split(tmp):
    # layer 0 holds its q/k/v twice: fused and split
    t = _mlx_tensors()
    for c in ("weight", "scales", "biases"):
        t[f"model.layers.0.self_attn.qkv_proj.{c}"] = t[f"model.layers.0.self_attn.q_proj.{c}"]
    return make_mlx(tmp / "m", t), "layer.fused-and-split", "model.layers.0.self_attn.qkv_proj"


def c_e8m0_scale(tmp):
    t = _mlx_tensors()
    rng = _rng(6)
    t[f"{Q0}.weight"] = pack_bits(rng.integers(0, 16, (HIDDEN, HIDDEN), dtype=np.uint8), 4)
    exps = rng.integers(118, 124, (HIDDEN, HIDDEN // 32))
    t[f"{Q0}.scales"] = (2.0 ** (exps - 127)).astype(BF16)  # decoded to linear, stored as floats
    del t[f"{Q0}.biases"]
    q = {"group_size": 64, "bits": 4, "mode": "affine", Q0: {"group_size": 32, "bits": 4, "mode": "mxfp4"}}
    return make_mlx(tmp / "m", t, quant=q), "mx.e8m0-scale", f"{Q0}.scales"


def c_e8m0_exponents_as_floats(tmp):
    # llm-compressor's mxfp8 layer with its exponent bytes converted to F32 numbers (120.0, ...):
    # it was said to hold reciprocals ("weight_scale holds 1/s?")
    copy_golden("ct_mxfp8", tmp / "m")

    def to_f32(t):
        for k in [k for k in t if k.endswith("weight_scale") and t[k].dtype == np.uint8]:
            t[k] = t[k].astype(np.float32)
    return rewrite(tmp / "m", to_f32), "mx.e8m0-scale", None


def c_tied_lm_head(tmp):
    return make_mlx(tmp / "m", cfg_extra={"tie_word_embeddings": True}), "config.tied-lm-head", "lm_head.weight"


def c_untied_no_head(tmp):
    t = _mlx_tensors()
    for c in ("weight", "scales", "biases"):
        del t[f"lm_head.{c}"]
    return make_mlx(tmp / "m", t), "config.tied-lm-head", "lm_head"


# GPTQ / AWQ

def c_v1_zero_wrap(tmp):
    t = _gptq_tensors(sym=False)
    z = t[f"{Q0}.qzeros"].view(np.uint32).copy()
    z[1, 3] = (z[1, 3] & ~np.uint32(0xF0)) | np.uint32(0xF0)  # group 1, column 25 -> stored 15
    t[f"{Q0}.qzeros"] = z.view(np.int32)
    return make_gptq(tmp / "m", t, sym=False), "gptq.v1-zero-wrap", f"{Q0}.qzeros"


def c_sym_zeros(tmp):
    t = _gptq_tensors(sym=True)
    z = t[f"{Q0}.qzeros"].view(np.uint32).copy()
    z[0, 0] = np.uint32(0x77777776)
    t[f"{Q0}.qzeros"] = z.view(np.int32)
    return make_gptq(tmp / "m", t), "gptq.sym-zeros", f"{Q0}.qzeros"


def c_v1_labelled_v2(tmp):
    # a symmetric v1 file (every zero word 0x77777777) whose config says gptq_v2: the advice was
    # "set sym=false"; the fix is the label
    t = _gptq_tensors(sym=True, version=1)
    q = {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": True, "desc_act": False,
         "checkpoint_format": "gptq_v2"}
    path = make_gptq(tmp / "m", t, qcfg=q)
    msg = next(f.message for f in diagnose(path) if f.rule == "gptq.sym-zeros")
    assert "set checkpoint_format to 'gptq'" in msg and "sym=false" not in msg
    return path, "gptq.sym-zeros", f"{Q0}.qzeros"


def c_gptq_config_keys(tmp):
    return make_gptq(tmp / "m", qcfg={"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False}), \
        "gptq.config-keys", None


def _gptq_dynamic(tmp, dynamic):
    q = {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": True, "desc_act": False,
         "checkpoint_format": "gptq", "dynamic": dynamic}
    return make_gptq(tmp / "m", qcfg=q)


def c_gptq_dynamic_not_quantized(tmp):
    # "-:" marks the layer unquantized, but it is stored quantized: the doctor found nothing
    return _gptq_dynamic(tmp, {r"-:.*q_proj": {}}), "gptq.dynamic", Q0


def c_gptq_dynamic_bad_regex(tmp):
    # a pattern that does not compile: GPTQModel fails to load, quantscope skipped it silently
    return _gptq_dynamic(tmp, {r"+:.*(down_proj": {"bits": 8}}), "gptq.dynamic", None


def c_g_idx_out_of_range(tmp):
    t = _gptq_tensors()
    g = t[f"{Q0}.g_idx"].copy()
    g[5] = 7
    t[f"{Q0}.g_idx"] = g
    return make_gptq(tmp / "m", t), "gptq.g-idx-invalid", f"{Q0}.g_idx"


def c_g_idx_group_sizes(tmp):
    t = _gptq_tensors()
    g = t[f"{Q0}.g_idx"].copy()
    g[:70] = 0  # group 0 gets 70 columns, group 1 only 58
    t[f"{Q0}.g_idx"] = g
    return make_gptq(tmp / "m", t), "gptq.g-idx-invalid", f"{Q0}.g_idx"


def c_act_order(tmp):
    perm = _rng(9).permutation(HIDDEN)
    g = np.empty(HIDDEN, np.int64)
    g[perm] = np.arange(HIDDEN) // 64
    return make_gptq(tmp / "m", _gptq_tensors(g_idx=g)), "gptq.act-order", None


def c_act_order_no_g_idx(tmp):
    t = {k: v for k, v in _gptq_tensors().items() if not k.endswith(".g_idx")}
    q = {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": True, "desc_act": True, "checkpoint_format": "gptq"}
    return make_gptq(tmp / "m", t, q), "gptq.act-order-no-g-idx", None


def c_empty_bare(tmp):
    (tmp / "m").mkdir()
    write_raw(tmp / "m" / "model.safetensors", {})
    return tmp / "m", "container.empty", None


def c_empty(tmp):
    (tmp / "m").mkdir()
    write_raw(tmp / "m" / "model.safetensors", {})
    _write_cfg(tmp / "m", _cfg(quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 64}))
    return tmp / "m", "container.empty", None


def c_method_mismatch(tmp):
    q = {"quant_method": "hqq", "bits": 4, "group_size": 64}  # GPTQ tensors under another name
    return make_gptq(tmp / "m", qcfg=q), "config.method-mismatch", None


def _hqq_like(tmp):
    # HQQ's layout (W_q codes, scale and zero per group), which quantscope does not decode, beside
    # bf16 attention: its modules passed without a word
    rng = _rng(13)
    up = "model.layers.0.mlp.up_proj"
    t = {"model.layers.0.self_attn.q_proj.weight": rng.normal(0, 0.02, (HIDDEN, HIDDEN)).astype(BF16),
         "model.layers.0.input_layernorm.weight": np.ones(HIDDEN, BF16),
         f"{up}.W_q": rng.integers(0, 256, (INTER // 2, HIDDEN), dtype=np.uint8),
         f"{up}.scale": rng.uniform(0.01, 0.02, (INTER * HIDDEN // 64, 1)).astype(np.float16),
         f"{up}.zero": rng.uniform(7, 8, (INTER * HIDDEN // 64, 1)).astype(np.float16)}
    folder = tmp / "m"
    folder.mkdir(parents=True, exist_ok=True)
    write_st(folder / "model.safetensors", t, {"format": "pt"})
    _write_cfg(folder, _cfg(quantization_config={"quant_method": "hqq", "nbits": 4, "group_size": 64}))
    return folder


def c_unsupported_layout(tmp):
    return _hqq_like(tmp), "layer.unsupported", "model.layers.0.mlp.up_proj"


def c_unsupported_method(tmp):
    return _hqq_like(tmp), "config.unsupported-method", None


def c_odd_name(tmp):
    # a tensor renamed "." (a bad merge script): it meets no parameter, and model.norm is missing
    t = _mlx_tensors()
    t["."] = t.pop("model.norm.weight")
    return make_mlx(tmp / "m", t), "container.odd-name", "."


def c_marlin(tmp):
    q = {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": True, "checkpoint_format": "marlin"}
    return make_gptq(tmp / "m", qcfg=q), "gptq.marlin", Q0


def c_awq_version(tmp):
    return make_awq(tmp / "m", gemv_layout=True), "awq.version", f"{Q0}.qweight"


def c_bool_string(tmp):
    # desc_act "false": a non-empty string, true to Python and to the loaders that test it
    q = {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": True, "desc_act": "false",
         "checkpoint_format": "gptq"}
    return make_gptq(tmp / "m", qcfg=q), "config.bool-type", None


def c_awq_unknown_version(tmp):
    # a version whose layout quantscope does not know (AutoAWQ's marlin packs its tiles otherwise)
    return edit_cfg(make_awq(tmp / "m"), lambda c: c["quantization_config"].update(version="marlin")), \
        "awq.version", None


def c_mlx_override_value(tmp):
    q = {"group_size": 64, "bits": 4, "mode": "affine", "model.layers.0.mlp.down_proj": "x"}
    return make_mlx(tmp / "m", quant=q), "config.bad-value", "model.layers.0.mlp.down_proj"


def c_config_folder(tmp):
    m = make_mlx(tmp / "m")
    (m / "quantize_config.json").mkdir()
    return m, "config.unreadable", None


def c_qweight_missing(tmp):
    # its qzeros, scales and g_idx left without the packed weights: "no problems found" before
    t = _gptq_tensors()
    del t[f"{Q0}.qweight"]
    return make_gptq(tmp / "m", t), "layer.inconsistent", Q0


def c_g_idx_float(tmp):
    # int32 group indices labelled F32 read as denormals: every column in group 0, the figures
    # twice the error with exit 0 (a fuzzed copy of the demo's act-order GPTQ)
    t = _gptq_tensors()
    t[f"{Q0}.g_idx"] = t[f"{Q0}.g_idx"].astype(np.int32).view(np.float32)
    return make_gptq(tmp / "m", t), "layer.inconsistent", Q0


def c_negative_scales(tmp):
    # GPTQ scales are a group's range over its levels: negated, every weight decodes mirrored
    # (a fuzzed copy: rel_fro 2.0, "no problems found")
    t = _gptq_tensors()
    t[f"{Q0}.scales"] = -t[f"{Q0}.scales"]
    return make_gptq(tmp / "m", t), "values.negative-scale", f"{Q0}.scales"


def c_bias_misfit(tmp):
    # a bias of 7 on a layer of HIDDEN outputs: "no problems found", convert carried it over
    t = _gptq_tensors()
    t[f"{Q0}.bias"] = np.zeros(7, np.float16)
    return make_gptq(tmp / "m", t), "layer.inconsistent", f"{Q0}.bias"


def c_weight_beside_qweight(tmp):
    t = _gptq_tensors()
    t[f"{Q0}.weight"] = np.zeros((HIDDEN, HIDDEN), np.float16)
    return make_gptq(tmp / "m", t), "layer.inconsistent", f"{Q0}.weight"


def c_awq_qzeros_missing(tmp):
    # zero_point: true but no qzeros: decoded symmetric, every figure was wrong without a word
    # (a fuzzed copy of the demo's AWQ: rel_fro 1.59 against 0.13, "no problems found")
    from safetensors.numpy import load_file
    make_awq(tmp / "m")
    t = load_file(tmp / "m" / "model.safetensors")
    del t[f"{Q0}.qzeros"]
    write_st(tmp / "m" / "model.safetensors", t, {"format": "pt"})
    return tmp / "m", "layer.inconsistent", Q0


def c_awq_legacy_config(tmp):
    make_awq(tmp / "m")
    edit_cfg(tmp / "m", lambda c: c.pop("quantization_config"))
    _write_cfg(tmp / "m", {"zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM"},
               "quant_config.json")
    return tmp / "m", "awq.legacy-config", None


# compressed-tensors, NVFP4, FP8, bnb

UP = "model.layers.0.mlp.up_proj"
DOWN = "model.layers.0.mlp.down_proj"


def c_ct_packing(tmp):
    copy_golden("ct016_w3a16_asym_legacy", tmp / "m")
    edit_cfg(tmp / "m", lambda c: c["quantization_config"].update(version="0.19.0"))
    return tmp / "m", "ct.packing", f"{UP}.weight_packed"


def c_ct_zero_point(tmp):
    copy_golden("ct_w4a16_asym", tmp / "m")

    def unpack_zp(t):
        zp = t[f"{UP}.weight_zero_point"]
        t[f"{UP}.weight_zero_point"] = np.zeros((64, zp.shape[1]), np.int8)  # pre-0.9.4 unpacked form
    return rewrite(tmp / "m", unpack_zp), "ct.zero-point", f"{UP}.weight_zero_point"


def c_ct_zero_point_missing(tmp):
    # asymmetric, without its zero points: decoded as symmetric it was off by 0.4, silently
    copy_golden("ct_w4a16_asym", tmp / "m")
    return rewrite(tmp / "m", lambda t: t.pop(f"{UP}.weight_zero_point")), "layer.inconsistent", UP


def c_nvfp4_global_scale(tmp):
    copy_golden("ct_nvfp4", tmp / "m")

    def invert(t):
        t[f"{UP}.weight_global_scale"] = (1.0 / t[f"{UP}.weight_global_scale"]).astype(np.float32)
    return rewrite(tmp / "m", invert), "nvfp4.global-scale", f"{UP}.weight_global_scale"


def c_fp8_block_size(tmp):
    copy_golden("fp8_block_partial", tmp / "m")

    def floor_grid(t):
        t[f"{DOWN}.weight_scale_inv"] = np.ascontiguousarray(t[f"{DOWN}.weight_scale_inv"][:1, :2])
    return rewrite(tmp / "m", floor_grid), "fp8.block-size", f"{DOWN}.weight_scale_inv"


def c_fp8_converted(tmp):
    copy_golden("fp8_block_aligned_bf16scale", tmp / "m")

    def to_bf16(t):
        w = t.pop(f"{DOWN}.weight").astype(np.float32)
        s = t.pop(f"{DOWN}.weight_scale_inv").astype(np.float32)
        t[f"{DOWN}.weight"] = (w * np.repeat(np.repeat(s, 128, 0), 128, 1)[:w.shape[0], :w.shape[1]]).astype(BF16)
    return rewrite(tmp / "m", to_bf16), "fp8.converted", None


def c_bnb_quant_state(tmp):
    copy_golden("bnb_nf4", tmp / "m")
    return rewrite(tmp / "m", lambda t: t.pop(f"{UP}.weight.quant_map")), "bnb.quant-state", f"{UP}.weight"


def c_bnb_nested_half(tmp):
    copy_golden("bnb_nf4_dq", tmp / "m")
    return rewrite(tmp / "m", lambda t: t.pop(f"{UP}.weight.nested_quant_map")), "bnb.quant-state", f"{UP}.weight"


# values

def c_nan_scale(tmp):
    t = _mlx_tensors()
    s = t[f"{Q0}.scales"].copy()
    s[3, 1] = np.nan
    t[f"{Q0}.scales"] = s
    return make_mlx(tmp / "m", t), "values.non-finite", f"{Q0}.scales"


def c_inf_dense(tmp):
    make_dense_sharded(tmp / "m")

    def inf(t):
        w = t["model.layers.0.mlp.up_proj.weight"].copy()
        w[0, 0] = np.inf
        t["model.layers.0.mlp.up_proj.weight"] = w
    return rewrite(tmp / "m", inf, "model-00001-of-00002.safetensors"), "values.non-finite", \
        "model.layers.0.mlp.up_proj.weight"


def c_nan_bias(tmp):
    t = _mlx_tensors()
    b = t[f"{Q0}.biases"].copy()
    b[0, 0] = np.nan
    t[f"{Q0}.biases"] = b
    return make_mlx(tmp / "m", t), "values.non-finite", f"{Q0}.biases"


def c_zero_scale(tmp):
    t = _gptq_tensors()
    s = t[f"{Q0}.scales"].copy()
    s[0, :5] = 0
    t[f"{Q0}.scales"] = s
    return make_gptq(tmp / "m", t), "values.zero-scale", f"{Q0}.scales"


def c_zero_layer(tmp):
    # every scale zero: the layer decodes to zeros (compare measured rel_fro 1.0, doctor said exit 0)
    t = _gptq_tensors()
    t[f"{Q0}.scales"] = np.zeros_like(t[f"{Q0}.scales"])
    return make_gptq(tmp / "m", t), "values.zero-layer", f"{Q0}.scales"


def c_scale_dtype(tmp):
    # F16 scales written under a BF16 label: every layer's scales read ~1e-19 (no outlier among peers)
    t = _gptq_tensors()
    for k in list(t):
        if k.endswith(".scales"):
            t[k] = t[k].view(np.uint16).view(BF16)
    return make_gptq(tmp / "m", t), "values.scale-magnitude", f"{Q0}.scales"


def c_denormal_scale(tmp):
    t = _mlx_tensors()
    s = t[f"{Q0}.scales"].copy()
    s[2, 0] = BF16(1e-39)
    t[f"{Q0}.scales"] = s
    return make_mlx(tmp / "m", t), "values.denormal-scale", f"{Q0}.scales"


def c_constant_dense(tmp):
    make_dense_sharded(tmp / "m")

    def zero(t):
        t["model.layers.1.mlp.down_proj.weight"] = np.zeros((HIDDEN, INTER), BF16)
    return rewrite(tmp / "m", zero, "model-00002-of-00002.safetensors"), "values.constant", \
        "model.layers.1.mlp.down_proj.weight"


def c_constant_scales(tmp):
    t = _gptq_tensors()
    t[f"{Q0}.scales"] = np.full_like(t[f"{Q0}.scales"], 0.01)
    return make_gptq(tmp / "m", t), "values.constant", f"{Q0}.scales"


def c_few_levels(tmp):
    t = _mlx_tensors()
    codes = _rng(3).integers(7, 9, (HIDDEN, HIDDEN), dtype=np.uint8)
    t[f"{Q0}.weight"] = pack_bits(codes, 4)
    return make_mlx(tmp / "m", t), "values.few-levels", f"{Q0}.weight"


def c_saturated(tmp):
    t = _mlx_tensors()
    rng = _rng(4)
    codes = np.where(rng.random((HIDDEN, HIDDEN)) < 0.7, rng.choice([0, 15], (HIDDEN, HIDDEN)),
                     rng.integers(1, 15, (HIDDEN, HIDDEN))).astype(np.uint8)
    t[f"{Q0}.weight"] = pack_bits(codes, 4)
    return make_mlx(tmp / "m", t), "values.saturated", f"{Q0}.weight"


def c_scale_outlier(tmp):
    t = _mlx_tensors()
    t[f"{Q0}.scales"] = (t[f"{Q0}.scales"].astype(np.float32) * 1000).astype(BF16)
    return make_mlx(tmp / "m", t), "values.scale-outlier", f"{Q0}.scales"


# info

def c_padding(tmp):
    hb = json.dumps({"__metadata__": {"format": "pt"},
                     "a.bias": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode() + b" " * 40
    write_raw(tmp / "x.safetensors", hb, np.array([0.5, 1.5], np.float32).tobytes())
    return tmp / "x.safetensors", "container.header-padding", None


def c_offset_order(tmp):
    write_raw(tmp / "x.safetensors", {"__metadata__": {"format": "pt"},
                                      "a.bias": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
                                      "b.bias": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
              np.arange(4, dtype=np.float32).tobytes())
    return tmp / "x.safetensors", "container.offset-order", None


def c_no_metadata(tmp):
    return make_mlx(tmp / "m", metadata=False), "container.no-metadata", None


def c_bad_entry(tmp):
    write_raw(tmp / "x.safetensors", {"__metadata__": {"format": "pt"},
                                      "a": {"dtype": "F32", "data_offsets": [0, 8]}}, b"\0" * 8)
    return tmp / "x.safetensors", "container.entry", "a"


def c_bad_offsets(tmp):
    write_raw(tmp / "x.safetensors", {"__metadata__": {"format": "pt"},
                                      "a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8)
    return tmp / "x.safetensors", "container.offsets", "a"


def c_index_entry(tmp):
    make_dense_sharded(tmp / "m")
    idx = tmp / "m" / "model.safetensors.index.json"
    d = json.loads(idx.read_text())
    d["weight_map"]["model.layers.1.mlp.up_proj.weight"] = 5
    d["metadata"] = {}
    idx.write_text(json.dumps(d))
    return tmp / "m", "index.entry", "model.layers.1.mlp.up_proj.weight"


def c_several_indexes(tmp):
    make_dense_sharded(tmp / "m")
    shutil.copy(tmp / "m" / "model.safetensors.index.json", tmp / "m" / "old.safetensors.index.json")
    return tmp / "m", "index.several", None


def c_pickle_beside(tmp):
    make_mlx(tmp / "m")
    (tmp / "m" / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    return tmp / "m", "container.pickle-beside", None


CASES = [c_missing, c_too_short, c_lfs_pointer, c_html_page, c_header_not_object, c_unknown_dtype,
         c_size_mismatch, c_truncated, c_overlap, c_gap, c_trailing, c_metadata_nonstring, c_duplicate_key,
         c_metadata_format, c_pickle, c_index_no_weight_map, c_index_bad_json, c_missing_shard, c_unsafe_path,
         c_tensor_missing, c_tensor_unlisted, c_duplicate_tensor, c_stray_file, c_total_size, c_config_unreadable, c_config_bom,
         c_biases_without_scales, c_scales_not_quantized, c_missing_biases, c_fp_with_biases, c_weight_dtype,
         c_rank, c_scales_shape, c_bits_group_mismatch, c_bits_group_swapped, c_bits_group_reads_another_dimension, c_override_unmatched, c_per_expert, c_config_bad_value, c_config_number_type, c_act_order_no_g_idx, c_empty, c_empty_bare, c_method_mismatch, c_odd_name, c_unsupported_layout, c_unsupported_method, c_fused_and_split,
         c_e8m0_scale, c_e8m0_exponents_as_floats, c_tied_lm_head, c_untied_no_head, c_v1_zero_wrap, c_sym_zeros, c_v1_labelled_v2, c_gptq_config_keys, c_gptq_dynamic_not_quantized,
         c_gptq_dynamic_bad_regex,
         c_g_idx_out_of_range, c_g_idx_group_sizes, c_act_order, c_marlin, c_awq_version, c_awq_legacy_config, c_bool_string, c_awq_unknown_version, c_mlx_override_value, c_config_folder, c_qweight_missing,
         c_awq_qzeros_missing, c_g_idx_float, c_bias_misfit, c_weight_beside_qweight, c_negative_scales,
         c_ct_packing, c_ct_zero_point, c_ct_zero_point_missing, c_nvfp4_global_scale, c_fp8_block_size, c_fp8_converted,
         c_bnb_quant_state, c_bnb_nested_half, c_nan_scale, c_inf_dense, c_nan_bias, c_zero_scale, c_zero_layer, c_scale_dtype,
         c_denormal_scale, c_constant_dense, c_constant_scales, c_few_levels, c_saturated, c_scale_outlier,
         c_padding, c_offset_order, c_no_metadata, c_bad_entry, c_bad_offsets, c_index_entry, c_several_indexes,
         c_pickle_beside]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__[2:])
def test_rule_fires(case, tmp_path):
    path, rule, where = case(tmp_path)
    findings = diagnose(path)
    hits = [f for f in findings if f.rule == rule]
    assert hits, f"{rule} did not fire; got {[str(f) for f in findings]}"
    if where is not None:
        assert any(where in (f.tensor, f.layer) for f in hits), [str(f) for f in hits]
    sev = RULES[rule].severity
    assert all(f.severity in (sev, "warning") for f in hits)
    others = [str(f) for f in findings if f.rule != rule and f.severity == "error"]
    assert not others, others
    if sev != "error":
        assert not [f for f in findings if f.severity == "error"]
    if case is c_zero_layer:  # one problem, said once (it was also "all scales equal 0", a warning)
        assert [f.rule for f in findings if f.tensor == where] == [rule]



def test_false_overrides_of_modules_without_parameters_are_no_finding(tmp_path):
    # mlx-lm's mixed recipes (Dec 2024 - Aug 2025) wrote `false` for every leaf module, act_fn and
    # rotary_emb included: a `false` that matches no stored module is harmless (the loader
    # quantizes only modules whose .scales are stored); it was a warning predicting load failures
    q = {"group_size": 64, "bits": 4, "mode": "affine", "model.layers.0.mlp.act_fn": False,
         "model.layers.0.self_attn.rotary_emb": False, "model.norm": False}
    findings = diagnose(make_mlx(tmp_path / "m", quant=q))
    assert not [f for f in findings if f.rule == "mlx.override-unmatched"], [str(f) for f in findings]
    q["model.layers.0.mlp.down_prj"] = {"group_size": 64, "bits": 4}  # (a dict that matches nothing still is)
    findings = diagnose(make_mlx(tmp_path / "m2", quant=q))
    assert [f.layer for f in findings if f.rule == "mlx.override-unmatched"] == ["model.layers.0.mlp.down_prj"]


def test_the_mlx_release_a_checkpoint_needs_is_said(tmp_path):
    # R16: 3/6 bit need mlx 0.21, 5 bit 0.26, mxfp4 0.29; 2/4/8 bit any (no finding)
    assert not [f for f in diagnose(make_mlx(tmp_path / "m4")) if f.rule == "mlx.min-version"]
    q = {"group_size": 64, "bits": 4, "mode": "affine", Q0: {"group_size": 64, "bits": 3}}
    t = _mlx_tensors()
    t[f"{Q0}.weight"], t[f"{Q0}.scales"], t[f"{Q0}.biases"] = _mlx_layer(_rng(3), HIDDEN, HIDDEN, 3, 64)
    got = [f for f in diagnose(make_mlx(tmp_path / "m3", t, quant=q)) if f.rule == "mlx.min-version"]
    assert len(got) == 1 and got[0].severity == "info" and got[0].layer == Q0
    assert got[0].message.startswith("needs mlx 0.21.0 or newer: 3 bit (1 layer) since 0.21.0")
    t[f"{UP0}.weight"], t[f"{UP0}.scales"], t[f"{UP0}.biases"] = _mlx_layer(_rng(5), INTER, HIDDEN, 5, 64)
    q[UP0] = {"group_size": 64, "bits": 5}
    got = [f for f in diagnose(make_mlx(tmp_path / "m5", t, quant=q)) if f.rule == "mlx.min-version"]
    assert got[0].message.startswith("needs mlx 0.26.0 or newer: 5 bit (1 layer) since 0.26.0, 3 bit (1 layer)")
    assert got[0].layer == UP0


def test_per_expert_is_fine_where_mlx_lm_stacks_scales_too(tmp_path):
    # mixtral's and qwen2_moe's sanitize stack weight, scales and biases: such a file loads
    path, rule, _ = c_per_expert(tmp_path)
    for mt in ("mixtral", "qwen2_moe"):
        _write_cfg(path, {**json.loads((path / "config.json").read_text()), "model_type": mt})
        assert not [f for f in diagnose(path) if f.rule == rule]
    _write_cfg(path, {**json.loads((path / "config.json").read_text()), "model_type": "qwen3_moe"})
    hit = [f for f in diagnose(path) if f.rule == rule]
    assert hit and "'qwen3_moe'" in hit[0].message and "quantscope convert" in hit[0].message

# ---------------------------------------------------------------------------------- clean

CLEAN_GOLDEN = sorted(p.name for p in GOLDEN.iterdir() if (p / "model.safetensors").is_file())


def _no_problems(path, **kw):
    findings = diagnose(path, **kw)
    bad = [str(f) for f in findings if f.severity in ("error", "warning")]
    assert not bad, bad
    return findings


@pytest.mark.parametrize("name", CLEAN_GOLDEN)
def test_golden_clean(name):
    _no_problems(GOLDEN / name, full=True)


@pytest.mark.parametrize("name", ["base-bf16", "mlx-affine-q4-g64"])
def test_real_clean(name, real_fixtures):
    _no_problems(real_fixtures / name, full=True)


@pytest.mark.parametrize("builder", ["mlx", "gptq-sym-v1", "gptq-asym-v1", "gptq-asym-v2", "awq", "sharded"])
def test_built_clean(builder, tmp_path):
    p = tmp_path / "m"
    {"mlx": lambda: make_mlx(p), "gptq-sym-v1": lambda: make_gptq(p),
     "gptq-asym-v1": lambda: make_gptq(p, sym=False), "gptq-asym-v2": lambda: make_gptq(p, sym=False, version=2),
     "awq": lambda: make_awq(p), "sharded": lambda: make_dense_sharded(p)}[builder]()
    assert _no_problems(p) == []


@pytest.mark.slow
def test_demo_workspace_clean(tmp_path_factory):
    demo = pytest.importorskip("quantscope.backend.demo")
    ws = demo.build_demo(tmp_path_factory.mktemp("demo") / "ws")
    for path in [ws.reference, *ws.variants.values()]:
        findings = _no_problems(path)
        assert {f.rule for f in findings} <= {"gptq.act-order", "container.offset-order", "mlx.min-version"}, path


# ---------------------------------------------------------------------------------- behaviour

def test_every_shard_reported(tmp_path):
    """Two broken shards and a missing one: all reported, the good shard still analysed."""
    make_dense_sharded(tmp_path / "m", n_shards=4)
    (tmp_path / "m" / "model-00001-of-00004.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    p3 = tmp_path / "m" / "model-00003-of-00004.safetensors"
    p3.write_bytes(p3.read_bytes()[:-10])
    (tmp_path / "m" / "model-00004-of-00004.safetensors").unlink()
    findings = diagnose(tmp_path / "m")
    rules = [(f.rule, Path(f.file).name) for f in findings if f.severity == "error"]
    assert ("container.header-too-large", "model-00001-of-00004.safetensors") in rules
    assert ("container.out-of-file", "model-00003-of-00004.safetensors") in rules
    assert ("index.missing-shard", "model.safetensors.index.json") in rules
    assert len(rules) == 3, rules



def test_a_layer_whose_parts_are_in_a_missing_shard_blames_the_shard(tmp_path):
    """GPTQ scales in a shard that is gone: the layers said "qweight without scales; loaders fail"
    as errors of their own, beside the missing shard. The missing shard is the error; each layer
    says its scales were there."""
    import json as _json

    from safetensors.numpy import load_file, save_file
    src = Path(__file__).parent / "fixtures" / "real" / "gptqmodel-gptq-w4g128"
    m = tmp_path / "m"
    m.mkdir()
    t = load_file(str(src / "model.safetensors"))
    one = {k: v for k, v in t.items() if not k.endswith(".scales")}
    save_file(one, str(m / "model-00001-of-00002.safetensors"), {"format": "pt"})
    wm = {k: "model-00001-of-00002.safetensors" if k in one else "model-00002-of-00002.safetensors" for k in t}
    (m / "model.safetensors.index.json").write_text(_json.dumps({"metadata": {}, "weight_map": wm}))
    for f in ("config.json", "quantize_config.json"):
        (m / f).write_bytes((src / f).read_bytes())
    findings = diagnose(m)
    errors = [f for f in findings if f.severity == "error"]
    assert [f.rule for f in errors] == ["index.missing-shard"], [(f.rule, f.message) for f in errors]
    lay = [f for f in findings if f.rule == "layer.inconsistent" and f.layer == "model.layers.0.mlp.down_proj"]
    assert lay and lay[0].severity == "warning"
    assert "its scales in model-00002-of-00002.safetensors, which is missing" in lay[0].message


def test_all_problems_of_one_header(tmp_path):
    write_raw(tmp_path / "x.safetensors", {"a": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]},
                                           "b": {"dtype": "F32", "shape": [3], "data_offsets": [8, 16]},
                                           "c": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}},
              b"\0" * 24)
    rules = {(f.rule, f.tensor) for f in diagnose(tmp_path / "x.safetensors")}
    assert {("container.dtype", "a"), ("container.size-mismatch", "b"), ("container.overlap", "c"),
            ("container.trailing", None)} <= rules


def test_lfs_message_is_actionable(tmp_path):
    path, _, _ = c_lfs_pointer(tmp_path)
    (f,) = [f for f in diagnose(path) if f.severity == "error"]
    assert "Git LFS" in f.message and "git lfs pull" in f.message and f.ref == "R21"


def test_finding_dict_and_refs(tmp_path):
    path, _, _ = c_v1_zero_wrap(tmp_path)
    (f,) = [f for f in diagnose(path) if f.rule == "gptq.v1-zero-wrap"]
    d = f.to_dict()
    assert d["ref"] == "R1" and d["severity"] == "error" and d["layer"] == Q0 and d["tensor"] == f"{Q0}.qzeros"
    assert d["file"].endswith("model.safetensors") and "wrapped" in d["message"]
    assert isinstance(f, Finding) and set(d) == {"rule", "severity", "message", "file", "tensor", "layer", "ref",
                                                 "count", "also"} and d["count"] == 1 and d["also"] == []


def test_structure_only_reads_no_data(tmp_path, monkeypatch):
    path, _, _ = c_v1_zero_wrap(tmp_path)

    def boom(*a, **k):
        raise AssertionError("tensor data read")
    monkeypatch.setattr(SafetensorsFile, "read", boom)
    monkeypatch.setattr(SafetensorsFile, "_buffer", boom)
    findings = diagnose(path, values=False)
    assert not [f for f in findings if f.severity == "error"]  # the wrap needs data: not seen


def test_sampling_limits_rows(tmp_path, monkeypatch):
    make_mlx(tmp_path / "m")
    seen = []
    orig = SafetensorsFile.read

    def spy(self, name, rows=None):
        seen.append((name, rows))
        return orig(self, name, rows)
    monkeypatch.setattr(SafetensorsFile, "read", spy)
    monkeypatch.setattr(doctor, "FULL_CHECK_BYTES", 0)  # sampled, however small the model
    diagnose(tmp_path / "m", rows_per_tensor=8)
    up = [r for n, r in seen if n == "model.layers.0.mlp.up_proj.weight"]
    assert up and all(r is not None and r[1] - r[0] <= 2 for r in up)
    seen.clear()
    diagnose(tmp_path / "m", full=True)
    # the value check reads every row once, by ranges (the decode check reads the tensor whole)
    up = [r for n, r in seen if n == "model.layers.0.mlp.up_proj.weight" and r is not None]
    assert sum(r[1] - r[0] for r in up) == INTER


def test_budget_exhausted_is_reported(tmp_path, monkeypatch):
    make_mlx(tmp_path / "m")
    monkeypatch.setattr(doctor, "FULL_CHECK_BYTES", 0)
    findings = diagnose(tmp_path / "m", budget_s=0.0)
    assert [f.rule for f in findings] == ["doctor.budget"]


def test_progress_and_cancel(tmp_path):
    make_mlx(tmp_path / "m")
    seen = []
    diagnose(tmp_path / "m", progress=seen.append)
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)
    ev = threading.Event()
    ev.set()
    with pytest.raises(Cancelled):
        diagnose(tmp_path / "m", cancel=ev)


def test_never_raises_on_garbage(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(bytes(range(256)) * 3)
    (tmp_path / "m" / "config.json").write_text("[]")
    report = run_diagnosis(tmp_path / "m")
    assert not report.opened and report.summary["error"] == 1


def test_overflow_is_summarised(tmp_path):
    header = {f"t{i}": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]} for i in range(30)}
    write_raw(tmp_path / "x.safetensors", header, b"\0" * 8)
    f = [f for f in diagnose(tmp_path / "x.safetensors") if f.rule == "container.overlap"]
    assert len(f) == doctor._MAX_PER_RULE + 1 and "more finding" in f[-1].message
    # the summary and the text report count every finding, the ones not listed too
    extra = int(f[-1].message.split("and ")[1].split(" more")[0])
    assert extra > 0 and f[-1].count == extra and all(x.count == 1 for x in f[:-1])
    report = run_diagnosis(tmp_path / "x.safetensors")
    n = report.summary["error"]
    assert n == sum(x.count for x in report.findings if x.severity == "error") >= doctor._MAX_PER_RULE + extra
    text = doctor.format_report(report)
    assert f"Errors ({n}):" in text and f"{n} error(s)" in text


# ---------------------------------------------------------------------------------- CLI + docs

def _cli(capsys, *argv):
    from quantscope.app.cli import main
    rc = main(["doctor", *map(str, argv)])
    return rc, capsys.readouterr().out


def test_cli_exit_codes_and_json(tmp_path, capsys):
    clean = make_mlx(tmp_path / "clean")
    rc, out = _cli(capsys, clean)
    assert rc == 0 and "no problems found" in out
    broken, _, _ = c_v1_zero_wrap(tmp_path / "b")
    rc, out = _cli(capsys, broken)
    assert rc == 1 and "Errors (1)" in out and "[gptq.v1-zero-wrap] (R1)" in out
    rc, out = _cli(capsys, broken, "--json", "--full")
    d = json.loads(out)
    assert rc == 1 and set(d) == {"quantscope_version", "path", "findings", "summary", "values_checked"}
    assert d["summary"] == {"error": 1, "warning": 0, "info": 0}
    assert d["findings"][0]["rule"] == "gptq.v1-zero-wrap"
    rc, out = _cli(capsys, tmp_path / "does-not-exist", "--json")
    assert rc == 2 and json.loads(out)["findings"][0]["rule"] == "container.missing"


def test_cli_warning_only_exits_0(tmp_path, capsys):
    path, _, _ = c_total_size(tmp_path / "a")
    rc, out = _cli(capsys, path)
    assert rc == 0 and "Warnings (1)" in out and "[index.total-size] (R23)" in out


def test_docs_list_every_rule():
    text = DOCS.read_text()
    for rule_id, rule in RULES.items():
        assert f"`{rule_id}`" in text, rule_id
        if rule.ref:
            row = next(line for line in text.splitlines() if line.startswith(f"| `{rule_id}` |"))
            assert rule.ref in row and rule.severity in row, rule_id


def test_a_name_given_twice_in_a_header_that_parses_is_found(tmp_path):
    """Two identical entries for one name: the file opens (the parser keeps one) and doctor used
    to find nothing, though the reference format disallows it."""
    import struct

    from helpers import write_st
    p = tmp_path / "m.safetensors"
    write_st(p, {"a.weight": np.ones((2, 2), np.float32), "b.weight": np.zeros((2, 2), np.float32)}, {"format": "pt"})
    b = p.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    head = b[8:8 + n].decode().rstrip()
    entry = head[head.index('"a.weight"'):]
    entry = entry[:entry.index("}") + 1]
    head = head[:-1] + "," + entry + "}"
    head += " " * (-len(head) % 8)
    p.write_bytes(struct.pack("<Q", len(head)) + head.encode() + b[8 + n:])
    findings = diagnose(p)
    assert [(f.rule, f.tensor) for f in findings if f.rule == "container.duplicate-key"] == [
        ("container.duplicate-key", "a.weight")]


def test_nvfp4_zero_scales_of_empty_groups_are_not_flagged(tmp_path):
    # AWQ's smoothing leaves whole groups of zeros in the real fixture; mx.quantize's nvfp4 gives
    # them scale 0 (amax/6), which decodes exactly: doctor warned "re-quantize the layer"
    from quantscope.backend.checkpoint import open_checkpoint
    from quantscope.backend.convert import convert
    real = Path(__file__).parent / "fixtures" / "real" / "autoawq-gemm-w4g128"
    convert(real, tmp_path / "nv", to="mlx", mode="nvfp4", verify=False)
    sc = open_checkpoint(tmp_path / "nv").tensor("model.layers.1.mlp.down_proj.scales")
    assert (sc == 0).any()  # the case is there
    assert not [f for f in diagnose(tmp_path / "nv") if f.severity in ("error", "warning")]


def test_a_config_group_size_the_tensors_contradict_is_said_once_per_layer(tmp_path):
    # group_size 64 in the config of a g128 file: 14 layer errors and 14 g_idx errors, none of
    # which said that the tensors fit 128
    src = Path(__file__).parent / "fixtures" / "real" / "gptqmodel-gptq-w4g128"
    dst = tmp_path / "wrong-group"
    shutil.copytree(src, dst)
    for name in ("config.json", "quantize_config.json"):
        cfg = json.loads((dst / name).read_text())
        (cfg.get("quantization_config") or cfg)["group_size"] = 64
        (dst / name).write_text(json.dumps(cfg))
    found = diagnose(dst)
    rules = [f.rule for f in found if f.severity == "error"]
    assert rules == ["layer.inconsistent"] * 14
    msg = next(f.message for f in found if f.rule == "layer.inconsistent")
    assert "they fit group size 128: the config's group_size is wrong?" in msg


def test_a_bad_g_idx_is_found_beside_another_problem_of_its_layer(tmp_path):
    # the g_idx check was skipped for any layer problem, not only a contradicted group size
    from safetensors.numpy import load_file, save_file
    src = Path(__file__).parent / "fixtures" / "real" / "gptqmodel-gptq-w4g128-actorder"
    dst = tmp_path / "two-faults"
    shutil.copytree(src, dst)
    t = load_file(dst / "model.safetensors")
    del t["model.layers.0.self_attn.q_proj.qzeros"]
    t["model.layers.0.self_attn.q_proj.g_idx"][:] = 9999
    save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    rules = {f.rule for f in diagnose(dst) if f.layer == "model.layers.0.self_attn.q_proj"}
    assert {"layer.inconsistent", "gptq.g-idx-invalid"} <= rules


def test_fp8_layer_whose_scale_was_lost_is_an_error_not_plain_fp8(tmp_path):
    # read without its per-channel scale, llm-compressor's FP8 q_proj came out ~1500x too large
    # while doctor, info, dequant and convert all reported success
    from quantscope.backend.checkpoint import open_checkpoint
    from quantscope.backend.engines import get_engine
    from quantscope.backend.errors import LayerError
    from quantscope.backend.safetensors_file import SafetensorsFile
    from quantscope.backend.schemes import analyze
    src = Path(__file__).parent / "fixtures" / "real" / "llmcompressor-fp8"
    dst = tmp_path / "fp8-noscale"
    shutil.copytree(src, dst)
    f = SafetensorsFile(dst / "model.safetensors")
    t = {n: np.array(f.read(n)) for n in f.names if n != "model.layers.0.self_attn.q_proj.weight_scale"}
    f.close()
    write_st(dst / "model.safetensors", t, {"format": "pt"})
    name = "model.layers.0.self_attn.q_proj"
    found = [x for x in diagnose(dst) if x.severity == "error"]
    assert [x.layer for x in found] == [name]
    assert "weight_scale missing" in found[0].message
    m = analyze(open_checkpoint(dst))
    assert m.layers[name].scheme == "ct-fp8" and m.layers[name].problem
    with pytest.raises(LayerError, match="weight_scale missing") as ei:
        get_engine("numpy").dequantize(m, m.layers[name])
    assert f"fp8-noscale: layer '{name}': " in str(ei.value)  # a layer, not a tensor of that name
    other = m.layers["model.layers.0.self_attn.k_proj"]  # its neighbours decode as before
    assert other.scheme == "ct-fp8" and other.problem is None


@pytest.mark.parametrize("case", ["disagree", "null-group"])
def test_gptq_configs_that_disagree_or_hold_null_are_found(tmp_path, case):
    # info noted both; the doctor said "no problems found"
    src = Path(__file__).parent / "fixtures" / "real" / "gptqmodel-gptq-w4g128"
    dst = tmp_path / case
    shutil.copytree(src, dst)
    if case == "disagree":
        q = json.loads((dst / "quantize_config.json").read_text())
        q["bits"], q["group_size"] = 8, 32
        (dst / "quantize_config.json").write_text(json.dumps(q))
        f = next(f for f in diagnose(dst) if f.rule == "config.disagree")
        assert f.severity == "warning" and "bits 4 against 8, group_size 128 against 32" in f.message
        assert f.file.endswith("quantize_config.json")
    else:
        for name in ("config.json", "quantize_config.json"):
            cfg = json.loads((dst / name).read_text())
            cfg.get("quantization_config", cfg)["group_size"] = None
            (dst / name).write_text(json.dumps(cfg))
        f = next(f for f in diagnose(dst) if f.rule == "config.bad-value")
        assert f.severity == "error" and "group_size is null" in f.message
    assert not any(f.rule == "config.disagree" for f in diagnose(src))


def test_a_quantized_folder_without_any_config_is_told_its_settings_are_guesses(tmp_path):
    # a GPTQ file alone in a folder (no config.json at all) got "no problems found", while one whose
    # config.json lacked the quantization config got config.missing
    src = Path(__file__).parent / "fixtures" / "real" / "gptqmodel-gptq-w4g128" / "model.safetensors"
    (tmp_path / "m").mkdir()
    shutil.copyfile(src, tmp_path / "m" / "model.safetensors")
    hits = [f for f in diagnose(tmp_path / "m") if f.rule == "config.missing"]
    assert len(hits) == 1 and "there is no config.json" in hits[0].message
    assert not [f for f in diagnose(src) if f.rule == "config.missing"]  # a file given alone: nothing to expect


def test_a_finding_on_a_layers_tensor_names_the_layer(tmp_path):
    # the index's findings name a tensor; where it is one of a layer's, the JSON's ``layer`` says
    # which (it was null: a script grouping findings by layer lost them)
    path, rule, tensor = c_tensor_unlisted(tmp_path)
    (f,) = [f for f in diagnose(path) if f.rule == rule]
    assert f.tensor == tensor and f.layer == "model.layers.1.mlp.down_proj"
    assert f.to_dict()["layer"] == "model.layers.1.mlp.down_proj"


@pytest.mark.parametrize("targets,hit", [(["Conv2d"], True), (["Linear"], False), (["re:.*_proj"], False),
                                         (["Conv2d", "re:.*mlp.*"], True), (["Embedding", "Linear"], False)])
def test_a_config_group_reaching_linears_only_through_another_class_is_an_error(tmp_path, targets, hit):
    # compressed-tensors matches a class target by the module's class: `Conv2d` gives the
    # (Linear) layers no scheme, loaders drop their packed weights; "no problems found" before
    src = Path(__file__).parent / "fixtures" / "real" / "llmcompressor-w4a16"
    dst = writable_copy(src, tmp_path / "m")
    cfg = json.loads((dst / "config.json").read_text())
    (g,) = cfg["quantization_config"]["config_groups"].values()
    g["targets"] = targets
    (dst / "config.json").write_text(json.dumps(cfg))
    found = [f for f in diagnose(dst) if f.rule == "ct.targets"]
    attn = [f for f in found if "self_attn" in (f.layer or "")]
    assert bool(attn) == hit and all(f.severity == "error" and "`Conv2d`" in f.message for f in found)
    if targets == ["Conv2d", "re:.*mlp.*"]:  # the MLP layers are reached by the regex
        assert found and not [f for f in found if ".mlp." in (f.layer or "")]


def test_a_gptq_config_without_bits_is_an_error(tmp_path):
    # transformers' GPTQConfig requires bits: the model fails to load ("no problems found" before)
    path = make_gptq(tmp_path / "m", qcfg={"quant_method": "gptq", "group_size": 64, "sym": True,
                                           "desc_act": False, "checkpoint_format": "gptq"})
    hits = [f for f in diagnose(path) if f.rule == "gptq.config-keys" and f.severity == "error"]
    assert len(hits) == 1 and "bits" in hits[0].message


@pytest.mark.parametrize("key,value", [("format", "int-quantized"), ("format", "dense"),
                                       ("quantization_status", "frozen")])
def test_a_compressed_tensors_format_the_tensors_contradict_is_an_error(tmp_path, key, value):
    # compressed-tensors picks its decompressor by the format: "no problems found" before
    src = Path(__file__).parent / "fixtures" / "real" / "llmcompressor-w4a16"
    dst = writable_copy(src, tmp_path / "m")
    cfg = json.loads((dst / "config.json").read_text())
    q = cfg["quantization_config"]
    q[key] = value
    for g in q.get("config_groups", {}).values():
        if key == "format" and "format" in g:
            g["format"] = value
    (dst / "config.json").write_text(json.dumps(cfg))
    hits = [f for f in diagnose(dst) if f.rule == "ct.format"]
    assert hits and value in hits[0].message and hits[0].severity == "error"




def test_a_consolidated_file_beside_the_shards_is_no_stray(tmp_path):
    # Mistral ships consolidated.safetensors (its own format) beside the HF shards: loaders follow
    # the index and mlx-lm globs model*.safetensors, so nothing merges it; the doctor told users
    # to delete it. A model*.safetensors there is still a stray (c_stray_file).
    make_dense_sharded(tmp_path / "m")
    write_st(tmp_path / "m" / "consolidated.safetensors", {"norm.weight": np.ones(HIDDEN, BF16)}, {"format": "pt"})
    assert not [f for f in diagnose(tmp_path / "m") if f.severity != "info"]

@pytest.mark.parametrize("fixture", ["real/llmcompressor-fp8", "golden/fp8_block_partial"])
def test_static_activations_without_their_stored_scales_are_warned_of(tmp_path, fixture):
    # llm-compressor's FP8_DYNAMIC (real) and a DeepSeek-style block FP8 file declared static:
    # a static scheme stores each layer's calibrated input_scale; none is here ("no problems" before)
    dst = writable_copy(Path(__file__).parent / "fixtures" / fixture, tmp_path / "m")
    cfg = json.loads((dst / "config.json").read_text())
    assert not [f for f in diagnose(dst) if f.rule == "config.static-activations"]  # as written: dynamic
    q = cfg["quantization_config"]
    if "config_groups" in q:
        q["config_groups"]["group_0"]["input_activations"]["dynamic"] = False
    else:
        q["activation_scheme"] = "static"
    (dst / "config.json").write_text(json.dumps(cfg))
    hits = [f for f in diagnose(dst) if f.rule == "config.static-activations"]
    quantized = {f.layer for f in diagnose(dst) if f.layer}
    assert hits and all(f.severity == "warning" and f.tensor == f"{f.layer}.input_scale" for f in hits)
    assert "input_scale" in hits[0].message and ("static" in hits[0].message or "dynamic: false" in hits[0].message)
    assert len({f.layer for f in hits}) == len(hits) and {f.layer for f in hits} <= quantized


@pytest.mark.parametrize("where", ["state", "config"])
def test_bnb_4bit_type_labels_that_disagree_with_the_code_book(tmp_path, where):
    # an NF4 layer whose quant_state JSON says fp4: bitsandbytes' kernels take the FP4 table by
    # that name, quantscope decodes with the stored NF4 quant_map (an error: the decodes differ);
    # only the config saying fp4: loaders follow the stored state (a warning). Both were clean.
    dst = writable_copy(GOLDEN / "bnb_nf4", tmp_path / "m")
    if where == "config":
        cfg = json.loads((dst / "config.json").read_text())
        cfg["quantization_config"]["bnb_4bit_quant_type"] = "fp4"
        (dst / "config.json").write_text(json.dumps(cfg))
    else:
        raw = bytearray((dst / "model.safetensors").read_bytes())
        at = raw.index(b'"quant_type": "nf4"')  # the JSON inside the U8 quant_state tensor
        raw[at:at + 19] = b'"quant_type": "fp4"'
        (dst / "model.safetensors").write_bytes(bytes(raw))
    hits = [f for f in diagnose(dst) if f.rule == "bnb.quant-state"]
    assert len(hits) == 1 and hits[0].layer == "model.layers.0.mlp.up_proj", hits
    if where == "state":
        assert hits[0].severity == "error" and "'fp4'" in hits[0].message and "NF4 code book" in hits[0].message
    else:
        assert hits[0].severity == "warning" and "stored NF4" in hits[0].message
        assert "bnb_4bit_quant_type says 'fp4'" in hits[0].message

@pytest.mark.parametrize("damage", ["missing", "count", "stack"])
def test_an_moe_block_with_an_expert_missing_or_miscounted_is_an_error(tmp_path, damage):
    # GPTQModel's Qwen3-MoE with expert 1 deleted, or its config saying 8 experts; mlx-lm's with
    # the config saying 8 beside a stack of 4: "no problems found", loaders fail on them
    real = Path(__file__).parent / "fixtures" / "real"
    src = real / ("mlxlm-qwen3moe-q4-g64" if damage == "stack" else "gptqmodel-qwen3moe-w4g64")
    dst = writable_copy(src, tmp_path / "m")
    if damage == "missing":
        for f in dst.glob("*.safetensors"):
            t = {n: a for n, a in read_all(f)[0].items() if ".experts.1." not in n}
            write_st(f, t, {"format": "pt"})
        idx = dst / "model.safetensors.index.json"
        if idx.exists():
            d = json.loads(idx.read_text())
            d["weight_map"] = {k: v for k, v in d["weight_map"].items() if ".experts.1." not in k}
            idx.write_text(json.dumps(d))
    else:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["num_experts"] = 8
        (dst / "config.json").write_text(json.dumps(cfg))
    hits = [f for f in diagnose(dst) if f.rule == "moe.experts"]
    assert hits and all(f.severity == "error" for f in hits)
    assert ("experts [1] of 0..3" if damage == "missing" else "the config says 8") in hits[0].message


def _golden_with_scales(tmp_path, name: str, suffix: str, change) -> tuple[Path, Path, str]:
    """A writable copy of golden ``name`` whose tensor ending in ``suffix`` is ``change(it)``:
    (the golden folder, the copy, the tensor's name)."""
    src = GOLDEN / name
    dst = writable_copy(src, tmp_path / "m")
    f = dst / "model.safetensors"
    t = read_all(f)[0]
    k = next(n for n in t if n.endswith(suffix))
    t[k] = change(t[k])
    write_st(f, t, {"format": "pt"})
    return src, dst, k


def test_reciprocal_fp8_block_scales_are_an_error(tmp_path):
    # 1/s stored as weight_scale_inv: weights of ~4e5, "no problems found" (the median scale, ~1e3,
    # was inside the bounds that catch F16 read as BF16)
    src, dst, _ = _golden_with_scales(tmp_path, "fp8_block_partial", "weight_scale_inv",
                                      lambda s: (1.0 / s.astype(np.float32)).astype(s.dtype))
    hits = [x for x in diagnose(dst) if x.rule == "values.scale-magnitude"]
    assert hits and "reciprocal" in hits[0].message
    assert not [x for x in diagnose(src) if x.rule == "values.scale-magnitude"]


def test_negative_scales_of_a_compressed_tensors_int8_layer_are_an_error(tmp_path):
    # (its scheme, ct-int, was missing from the schemes whose scales are never negative)
    _, dst, k = _golden_with_scales(tmp_path, "ct_int8_w8a8_channel", ".weight_scale", lambda s: -s)
    hits = [x for x in diagnose(dst) if x.rule == "values.negative-scale"]
    assert hits and hits[0].tensor == k and "ct-int" in hits[0].message


def test_awq_gemv_scales_padding_is_not_taken_for_zero_scales(tmp_path):
    """AutoAWQ's WQLinear_GEMV pads scales (and zeros) with zero columns to a multiple of 8: only
    the first K/G are groups' scales. Every valid GEMV file had "1536 of 6144 checked scales are 0"."""
    rng = np.random.default_rng(5)
    n, k, g = HIDDEN, 5 * 64, 64  # 5 groups, padded to 8 columns
    p = "model.layers.0.self_attn.q_proj"
    scales = np.zeros((n, 8), np.float16)
    scales[:, :5] = rng.uniform(0.005, 0.02, (n, 5))
    zeros = np.zeros((n, 8), np.uint8)
    zeros[:, :5] = rng.integers(0, 16, (n, 5))
    t = {f"{p}.qweight": pack_bits(rng.integers(0, 16, (n, k), dtype=np.uint8), 4).view(np.int32),
         f"{p}.qzeros": pack_bits(zeros, 4).view(np.int32), f"{p}.scales": scales}
    folder = tmp_path / "gemv"
    folder.mkdir()
    write_st(folder / "model.safetensors", t, {"format": "pt"})
    _write_cfg(folder, _cfg(quantization_config={"quant_method": "awq", "bits": 4, "group_size": g,
                                                 "zero_point": True, "version": "gemv"}))
    rules = {f.rule for f in diagnose(folder)}
    assert "values.zero-scale" not in rules and "values.zero-layer" not in rules and "awq.version" in rules
    scales[3, 1] = 0  # a real zero among the groups' scales is still found
    write_st(folder / "model.safetensors", {**t, f"{p}.scales": scales}, {"format": "pt"})
    assert "values.zero-scale" in {f.rule for f in diagnose(folder)}


def test_a_truncated_shard_is_one_finding_not_one_per_tensor(tmp_path):
    make_dense_sharded(tmp_path / "m")
    p = tmp_path / "m" / "model-00002-of-00002.safetensors"
    raw = p.read_bytes()
    p.write_bytes(raw[:len(raw) // 3])  # both of its tensors past the end (38 findings for a real shard)
    found = [f for f in diagnose(tmp_path / "m") if f.rule == "container.out-of-file"]
    assert len(found) == 1 and found[0].tensor == "model.layers.1.mlp.up_proj.weight"
    assert found[0].also == ["model.layers.1.mlp.down_proj.weight"]  # (the window flags its layer too)
    assert found[0].message.startswith("2 tensors run past the end of the data") and "re-download" in found[0].message


def test_integer_and_boolean_buffers_are_no_unknown_format(tmp_path):
    # position_ids (I64, CLIP/BERT towers) and GPT-J's BOOL attention masks sit in modules with no
    # weight: they were warned of as packed data of an unknown format
    t = _mlx_tensors()
    t["vision_tower.vision_model.embeddings.position_ids"] = np.arange(577, dtype=np.int64)[None]
    t["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 8, 8), bool))
    findings = diagnose(make_mlx(tmp_path / "m", t))
    assert not [f for f in findings if f.rule == "layer.unsupported"], [str(f) for f in findings]
