"""AWQ GEMM → MLX conversion time against copying the same bytes.

A ~2 GB AWQ GEMM 4-bit g128 checkpoint in the real layout (Llama-shaped: hidden 4096,
intermediate 11008, 20 decoder layers; random codes, zero points and fp16 scales; a bf16
embedding and norms), one shard per decoder layer, built once under ``benchmarks/.cache``.

Measured in this process with the page cache warm: ``shutil.copyfile`` of the source's
safetensors files, then ``convert(..., to="mlx", verify=False)``, then the same with the
verification sweep; the destination is removed after every run. Target (issue 7): conversion
without verification ≤ 3× the copy.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from _common import CACHE, emit, peak_rss_bytes

H, F, LAYERS, VOCAB, G = 4096, 11008, 20, 8192, 128
LINEARS = (("self_attn.q_proj", (H, H)), ("self_attn.k_proj", (H, H)), ("self_attn.v_proj", (H, H)),
           ("self_attn.o_proj", (H, H)), ("mlp.gate_proj", (F, H)), ("mlp.up_proj", (F, H)),
           ("mlp.down_proj", (H, F)))


def build(folder: Path) -> Path:
    """Write the AWQ checkpoint (once); returns its folder."""
    import ml_dtypes

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from helpers import write_st

    src = folder / "awq"
    if (folder / "done").exists():
        return src
    shutil.rmtree(folder, ignore_errors=True)
    src.mkdir(parents=True)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(0)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
           "intermediate_size": F, "num_hidden_layers": LAYERS, "num_attention_heads": 32, "head_dim": 128,
           "vocab_size": VOCAB, "torch_dtype": "float16",
           "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": G, "zero_point": True,
                                   "version": "gemm", "modules_to_not_convert": None}}
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    (src / "tokenizer.json").write_text("{}")
    wmap = {}

    def words(shape):
        return rng.integers(0, 2**32, size=shape, dtype=np.uint32).view(np.int32)

    for i in range(LAYERS + 1):
        t = {}
        if i == LAYERS:
            t["model.embed_tokens.weight"] = (rng.standard_normal((VOCAB, H), np.float32) * 0.02).astype(bf16)
            t["model.norm.weight"] = np.ones(H, bf16)
        else:
            for m, (n, k) in LINEARS:
                key = f"model.layers.{i}.{m}"
                t[f"{key}.qweight"] = words((k, n // 8))
                t[f"{key}.qzeros"] = words((k // G, n // 8))
                t[f"{key}.scales"] = (rng.random((k // G, n), np.float32) * 0.01 + 1e-3).astype(np.float16)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                t[f"model.layers.{i}.{norm}.weight"] = np.ones(H, bf16)
        shard = f"model-{i:05d}.safetensors"
        write_st(src / shard, t, {"format": "pt"})
        wmap.update(dict.fromkeys(t, shard))
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    (folder / "done").write_text("ok")
    return src


def _warm(folder: Path) -> None:
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def main() -> None:
    from quantscope.backend.convert import convert

    folder = CACHE / "convert_awq_2GB"
    t0 = time.perf_counter()
    src = build(folder)
    build_s = time.perf_counter() - t0
    files = sorted(src.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    _warm(src)
    dst = folder / "out"
    shutil.rmtree(dst, ignore_errors=True)
    # Five interleaved pairs, best of each: on a shared VM the file-system side of both (page-cache
    # allocation, the previous run's deletes) varies 2-3x from run to run, far more than the work.
    repeat = int(os.environ.get("QUANTSCOPE_BENCH_REPEAT", "5"))

    def settle() -> None:
        # Start every timed run from the same state: the previous run's 2 GB of dirty pages
        # flushed, so neither measurement pays for the other's writeback (os.sync is untimed).
        if hasattr(os, "sync"):
            os.sync()

    def copy_once() -> float:
        dst.mkdir()
        settle()
        t = time.perf_counter()
        for f in files:
            shutil.copyfile(f, dst / f.name)
        el = time.perf_counter() - t
        shutil.rmtree(dst)
        return el

    def convert_once(verify: bool):
        settle()
        t = time.perf_counter()
        rep = convert(src, dst, to="mlx", verify=verify)
        el = time.perf_counter() - t
        shutil.rmtree(dst)
        return el, rep

    copy_s, conv_s, conv_v_s = [], [], []
    rep = rep_v = None
    for _ in range(repeat):
        copy_s.append(copy_once())
        el, rep = convert_once(False)
        conv_s.append(el)
    if os.environ.get("QUANTSCOPE_BENCH_VERIFY", "1") != "0":
        el, rep_v = convert_once(True)
        conv_v_s.append(el)
    copy_min, conv_min = min(copy_s), min(conv_s)
    emit({"benchmark": "convert", "source": "AWQ GEMM 4-bit g128, random codes", "cpus": os.cpu_count(),
          "source_bytes": size, "build_s": round(build_s, 1),
          "copy_s": [round(x, 3) for x in copy_s], "convert_s": [round(x, 3) for x in conv_s],
          "convert_with_verify_s": round(conv_v_s[0], 3) if conv_v_s else None,
          "ratio": round(conv_min / copy_min, 2), "ratio_with_verify": round(conv_v_s[0] / copy_min, 2) if conv_v_s else None,
          "timings_last": {k: round(v, 3) for k, v in rep.timings.items()},
          "timings_with_verify": {k: round(v, 3) for k, v in rep_v.timings.items()} if rep_v else None,
          "layers": rep.by_kind(), "widened_to_f32": len(rep.widened),
          "max_rel_fro_verified": rep_v.max_rel_fro if rep_v else None, "output_bytes": rep.output_bytes,
          "peak_rss_mb": round(peak_rss_bytes() / 2**20), "target_ratio_max": 3.0})


if __name__ == "__main__":
    main()
