"""Comparing experts stored as transformers' ``[E, K, N]`` parameters (a bf16 gpt-oss).

One decoder layer of gpt-oss-20b's expert shapes (hidden 2880, expert intermediate 2880) with 8 of
its 32 experts, built once under ``benchmarks/.cache``:

* ``transposed``: the bf16 reference as transformers' GptOssExperts holds it,
  ``experts.gate_up_proj`` [8, 2880, 5760] and ``experts.down_proj`` [8, 2880, 2880] (380 MB);
* ``row_major``: the same values stored ``[E, N, K]`` under the same names (the layout Gemma 4's
  parameters have: read in place, no transposition);
* the variant: OpenAI's MXFP4 layout of the same weights (``…_blocks`` / ``…_scales``, made with
  ``mx.quantize(mode="mxfp4")``).

In a fresh process per reference (page cache warm): the comparison (``sweep``, a row per expert) against
dequantizing the variant alone, in interleaved pairs (``QUANTSCOPE_BENCH_REPEAT``, default 3),
best of each, and peak RSS. The figure to watch is ``transposed`` over ``row_major``: what reading
the reference transposed costs.
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

E, HIDDEN, INTER = 8, 2880, 2880
EX = "model.layers.0.mlp.experts"


def build(folder: Path) -> None:
    import ml_dtypes
    import mlx.core as mx

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from helpers import write_st

    if (folder / "done").exists():
        return
    rng = np.random.default_rng(0)
    stored = {"transposed": {}, "row_major": {}, "mxfp4": {}}
    for proj, shape in (("gate_up_proj", (E, 2 * INTER, HIDDEN)), ("down_proj", (E, HIDDEN, INTER))):
        w = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)  # [E, N, K]
        stored["row_major"][f"{EX}.{proj}"] = w
        stored["transposed"][f"{EX}.{proj}"] = np.ascontiguousarray(w.transpose(0, 2, 1))
        wq, sc = mx.quantize(mx.array(w.view(np.uint16)).view(mx.bfloat16), group_size=32, bits=4, mode="mxfp4")
        stored["mxfp4"][f"{EX}.{proj}_blocks"] = np.array(wq).view(np.uint8).reshape(*shape[:2], -1, 16)
        stored["mxfp4"][f"{EX}.{proj}_scales"] = np.array(sc).view(np.uint8)
    cfg = {"hidden_size": HIDDEN, "intermediate_size": INTER, "num_local_experts": E}
    types = {"transposed": {"model_type": "gpt_oss"}, "row_major": {"model_type": "gemma4"},
             "mxfp4": {"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4"}}}
    for name, t in stored.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        write_st(folder / name / "model.safetensors", t, {"format": "pt"})
        (folder / name / "config.json").write_text(json.dumps({**cfg, **types[name]}))
    (folder / "done").write_text("ok")


def measure(folder: Path, which: str) -> dict:
    from bench_sweep import _warm
    from quantscope.backend.checkpoint import open_checkpoint
    from quantscope.backend.compare import sweep
    from quantscope.backend.engines import get_engine
    from quantscope.backend.formats import fast
    from quantscope.backend.schemes import analyze

    _warm(folder / which)
    _warm(folder / "mxfp4")
    ref = analyze(open_checkpoint(folder / which))
    var = analyze(open_checkpoint(folder / "mxfp4"))
    assert ref.layers[f"{EX}.down_proj"].tensors["weight"].transposed == (which == "transposed")
    eng = get_engine("numpy")
    fast.warm_up()
    rss0 = peak_rss_bytes()

    def sweep_once():
        t0 = time.perf_counter()
        res = sweep(ref, {"mxfp4": var}, engine="numpy")
        return time.perf_counter() - t0, res

    def dequant_once():
        t0 = time.perf_counter()
        for lay in var.layers.values():
            eng.dequantize(var, lay)
        return time.perf_counter() - t0

    res, rss, sweeps, deqs = sweep_against_dequant(sweep_once, dequant_once)
    worst: dict[str, float] = {}
    for r in res.rows:  # (a row per expert: the worst of each stack)
        p = r.name.rsplit(".", 1)[1]
        worst[p] = max(worst.get(p, 0.0), r.rel_fro)
    return {"rows": len(res.rows), "rel_fro_worst_expert": worst,
            "sweep_s": round(min(sweeps), 3), "dequant_alone_s": round(min(deqs), 3),
            "ratio": round(min(sweeps) / min(deqs), 2),
            "sweep_runs_s": [round(x, 3) for x in sweeps], "dequant_runs_s": [round(x, 3) for x in deqs],
            "peak_rss_after_open_mb": round(rss0 / 2**20), "peak_rss_sweep_mb": round(rss / 2**20)}


def main() -> None:
    if len(sys.argv) > 3 and sys.argv[1] == "--measure":
        emit(measure(Path(sys.argv[2]), sys.argv[3]))
        return
    folder = CACHE / "transposed_gptoss20b_8x"
    t0 = time.perf_counter()
    build(folder)
    out = {"benchmark": "transposed", "cpus": os.cpu_count(), "experts": E, "hidden": HIDDEN,
           "intermediate": INTER, "build_s": round(time.perf_counter() - t0, 1)}
    for which in ("transposed", "row_major", "transposed", "row_major"):  # (alternated: a noisy machine)
        r = subprocess.run([sys.executable, __file__, "--measure", str(folder), which], capture_output=True,
                           text=True, check=True)
        got = json.loads(r.stdout)
        prev = out.get(which)
        if prev is None or got["sweep_s"] < prev["sweep_s"]:
            out[which] = got
    assert out["transposed"]["rel_fro_worst_expert"] == out["row_major"]["rel_fro_worst_expert"]
    out["transposed_over_row_major"] = round(out["transposed"]["sweep_s"] / out["row_major"]["sweep_s"], 2)
    emit(out)


if __name__ == "__main__":
    main()
