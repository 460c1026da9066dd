"""The checkpoint doctor: structure-only on a huge sparse checkpoint, sampled values on a ~2 GB model.

* ``structure_671g``: ``diagnose(values=False)`` on bench_open's sparse 671 GB single file
  (20,000 BF16 tensors, no disk used) against ``quantscope info``'s open + list of the same file,
  in the same run. Target (issue 5): within 2× of open + list.
* ``sampled_mlx_2g``: the default doctor (structure + format data + sampled values, 2 s value
  budget) on a ~2 GB MLX affine 4-bit/G64 Llama-shaped model (hidden 4096, intermediate 11008,
  16 layers, random codes), generated once and cached under benchmarks/.cache. Target: < 5 s.
  Also reports ``--full`` (every value) on the same model, for reference.
"""

from __future__ import annotations

import json
import struct
import sys
import time

import ml_dtypes
import numpy as np

from _common import CACHE, emit, timeit
from bench_open import build as build_open

HIDDEN, INTER, LAYERS, VOCAB, GROUP = 4096, 11008, 16, 32000, 64


def _mlx_specs():
    lin = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
           "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
           "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}
    specs = [("model.embed_tokens", VOCAB, HIDDEN)]
    for i in range(LAYERS):
        specs += [(f"model.layers.{i}.{p}", n, k) for p, (n, k) in lin.items()]
    specs.append(("lm_head", VOCAB, HIDDEN))
    return specs


def build_mlx_2g():
    """A ~2 GB MLX 4-bit model (random codes, plausible scales/biases), written once."""
    folder = CACHE / "doctor_mlx_q4_2g"
    path = folder / "model.safetensors"
    if path.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    header, order, off = {"__metadata__": {"format": "mlx"}}, [], 0

    def add(name, dtype, shape, nbytes):
        nonlocal off
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        order.append((name, dtype, shape))
        off += nbytes

    for p, n, k in _mlx_specs():
        add(f"{p}.weight", "U32", (n, k // 8), n * k // 2)
        add(f"{p}.scales", "BF16", (n, k // GROUP), n * k // GROUP * 2)
        add(f"{p}.biases", "BF16", (n, k // GROUP), n * k // GROUP * 2)
    for i in range(LAYERS):
        add(f"model.layers.{i}.input_layernorm.weight", "BF16", (HIDDEN,), HIDDEN * 2)
        add(f"model.layers.{i}.post_attention_layernorm.weight", "BF16", (HIDDEN,), HIDDEN * 2)
    add("model.norm.weight", "BF16", (HIDDEN,), HIDDEN * 2)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(hb)) + hb)
        for name, dtype, shape in order:
            if dtype == "U32":
                fh.write(rng.bytes(int(np.prod(shape)) * 4))
            elif name.endswith(".scales"):
                s = rng.uniform(0.002, 0.02, shape) * rng.choice([-1.0, 1.0], shape)
                fh.write(s.astype(ml_dtypes.bfloat16).tobytes())
            elif name.endswith(".biases"):
                fh.write(rng.normal(0, 0.05, shape).astype(ml_dtypes.bfloat16).tobytes())
            else:
                fh.write((1 + rng.normal(0, 0.1, shape)).astype(ml_dtypes.bfloat16).tobytes())
    tmp.rename(path)
    q = {"group_size": GROUP, "bits": 4, "mode": "affine"}
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_attention_heads": 32, "head_dim": 128, "vocab_size": VOCAB,
        "num_hidden_layers": LAYERS, "tie_word_embeddings": False, "quantization": q,
        "quantization_config": q}, indent=1))
    return folder


def main():
    from quantscope.backend.checkpoint import open_checkpoint
    from quantscope.backend.doctor import run_diagnosis

    single, _ = build_open()
    out = {"benchmark": "doctor", "python": sys.version.split()[0]}

    def open_list():
        c = open_checkpoint(single)
        names = c.names
        c.close()
        return names

    def structure():
        return run_diagnosis(single, values=False)

    t_info = timeit(open_list, repeat=5)
    t_doc = timeit(structure, repeat=5)
    r = structure()
    out["structure_671g"] = {
        "tensors": 20_000, "findings": r.summary, "layers": r.layers,
        "info_open_list_s": t_info["median_s"], "doctor_structure_s": t_doc["median_s"],
        "ratio_vs_info": t_doc["median_s"] / t_info["median_s"], "target_ratio": 2.0,
    }

    t0 = time.perf_counter()
    folder = build_mlx_2g()
    build_s = time.perf_counter() - t0
    size = (folder / "model.safetensors").stat().st_size
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        r = run_diagnosis(folder)
        runs.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    rf = run_diagnosis(folder, full=True)
    full_s = time.perf_counter() - t0
    out["sampled_mlx_2g"] = {
        "file_bytes": size, "layers": r.layers, "build_or_cache_s": build_s,
        "doctor_default_s": sorted(runs)[1], "doctor_default_runs_s": runs, "findings": r.summary,
        "rules": sorted({f.rule for f in r.findings}), "target_s": 5.0,
        "doctor_full_s": full_s, "full_findings": rf.summary,
    }
    emit(out)


if __name__ == "__main__":
    main()
