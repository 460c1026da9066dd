"""Comparing a Mixture-of-Experts model, at two shapes.

A Qwen3-MoE-shaped bf16 reference in transformers' layout (each expert's gate/up/down_proj one
module, plus a router and q/k/v/o per decoder layer) and its MLX 4-bit conversion by
``quantscope convert`` (experts stacked in switch_mlp, as mlx-lm loads them), built once under
``benchmarks/.cache``:

* ``toy-40x128``: 40 decoder layers of 128 experts of [64, 128] / [128, 64]: 15,360 expert and
  320 other layers, 246 MB — tens of thousands of tiny layers;
* ``qwen3-30b-experts-2x32``: 2 decoder layers of 32 experts shaped like Qwen3-30B-A3B's
  (hidden 2048, expert intermediate 768: [768, 2048] / [2048, 768], 1.6M weights each), 0.6 GB —
  real expert sizes, where each layer's fixed work (sampling, selection) weighs on its decode.
 In a fresh process: the files are read once (page cache warm), then the
comparison (``sweep``, every expert against its slice of the stack) is timed against
dequantizing the same MLX layers alone, in interleaved pairs (``QUANTSCOPE_BENCH_REPEAT``,
default 3), best of each; and peak RSS. Per-layer overhead, not decoding, dominates here: the
figure to watch is the sweep's time per compared layer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import CACHE, emit, peak_rss_bytes, sweep_against_dequant

#: label: (decoder layers, experts, hidden, expert intermediate)
SIZES = {"toy-40x128": (40, 128, 128, 64), "qwen3-30b-experts-2x32": (2, 32, 2048, 768)}


def build(folder: Path, layers: int, experts: int, hidden: int, moe_inter: int) -> tuple[Path, Path]:
    import ml_dtypes

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from helpers import write_st
    from quantscope.backend.convert import convert

    ref, mlx = folder / "reference", folder / "mlx-q4"
    if (folder / "done").exists():
        return ref, mlx
    ref.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    wm = {}
    for i in range(layers):
        t = {}
        for e in range(experts):
            for p, shp in (("gate_proj", (moe_inter, hidden)), ("up_proj", (moe_inter, hidden)),
                           ("down_proj", (hidden, moe_inter))):
                t[f"model.layers.{i}.mlp.experts.{e}.{p}.weight"] = (
                    rng.standard_normal(shp, dtype=np.float32) * 0.02).astype(bf16)
        t[f"model.layers.{i}.mlp.gate.weight"] = (rng.standard_normal((experts, hidden), dtype=np.float32)
                                                  * 0.02).astype(bf16)
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[f"model.layers.{i}.self_attn.{p}.weight"] = (rng.standard_normal((hidden, hidden), dtype=np.float32)
                                                            * 0.02).astype(bf16)
        shard = f"model-{i:05d}.safetensors"
        write_st(ref / shard, t, {"format": "pt"})
        wm.update(dict.fromkeys(t, shard))
    (ref / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (ref / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "hidden_size": hidden,
                                                 "num_hidden_layers": layers, "num_experts": experts,
                                                 "moe_intermediate_size": moe_inter, "torch_dtype": "bfloat16"}))
    convert(ref, mlx, to="mlx", bits=4, overwrite=True, verify=False)
    (folder / "done").write_text("ok")
    return ref, mlx


def measure(folder: Path) -> dict:
    from bench_sweep import _warm
    from quantscope.backend.checkpoint import open_checkpoint
    from quantscope.backend.compare import sweep
    from quantscope.backend.engines import get_engine
    from quantscope.backend.formats import fast
    from quantscope.backend.schemes import analyze

    _warm(folder)
    ref = analyze(open_checkpoint(folder / "reference"))
    var = analyze(open_checkpoint(folder / "mlx-q4"))
    eng = get_engine("numpy")
    fast.warm_up()
    # warm-up on the smallest quantized layer (a whole 32-expert stack would set the peak RSS)
    eng.dequantize(var, min((lay for lay in var.layers.values() if lay.quantized), key=lambda lay: lay.numel))
    rss0 = peak_rss_bytes()

    def sweep_once():
        t0 = time.perf_counter()
        res = sweep(ref, {"mlx": var}, engine="numpy")
        return time.perf_counter() - t0, res

    def dequant_once():
        t0 = time.perf_counter()
        for lay in var.layers.values():
            if lay.quantized:
                eng.dequantize(var, lay)
        return time.perf_counter() - t0

    res, rss, sweeps, deqs = sweep_against_dequant(sweep_once, dequant_once)
    n = len(res.rows)
    return {"compared_layers": n, "expert_layers": sum(".experts." in r.name for r in res.rows),
            "unmatched": len(res.unmatched), "sweep_s": round(min(sweeps), 3),
            "dequant_alone_s": round(min(deqs), 3), "ratio": round(min(sweeps) / min(deqs), 2),
            "sweep_ms_per_layer": round(min(sweeps) / n * 1e3, 3),
            "sweep_runs_s": [round(x, 3) for x in sweeps], "dequant_runs_s": [round(x, 3) for x in deqs],
            "peak_rss_after_open_mb": round(rss0 / 2**20), "peak_rss_sweep_mb": round(rss / 2**20)}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--measure":
        emit(measure(Path(sys.argv[2])))
        return
    out = {"benchmark": "moe", "cpus": os.cpu_count(), "sizes": {}}
    for label, dims in SIZES.items():
        folder = CACHE / ("moe_40x128" if label == "toy-40x128" else f"moe_{label}")
        t0 = time.perf_counter()
        build(folder, *dims)
        build_s = time.perf_counter() - t0
        r = subprocess.run([sys.executable, __file__, "--measure", str(folder)], capture_output=True, text=True,
                           check=True)
        out["sizes"][label] = {"build_s": round(build_s, 1), **json.loads(r.stdout)}
    emit(out)


if __name__ == "__main__":
    main()
