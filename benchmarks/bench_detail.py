"""What selecting a layer in the window costs: everything its views show (values, errors and
log |error| on shared edges, code usage, scales and zero points, the per-group error map, the
metrics), against dequantizing the same variant layers alone.

Uses ``bench_sweep``'s one decoder layer of Llama-3-8B (reference bf16, GPTQ 4-bit g128, AWQ GEMM
4-bit g128, MLX affine 4-bit g64; built there once under ``benchmarks/.cache``): ``mlp.down_proj``
and ``mlp.up_proj`` (58.7M weights each) ``self_attn.q_proj`` and ``o_proj`` (16.8M each, with their 32 heads of 128 rows or
columns: the Heads view); and, in a process of
its own, ``mlp.down_proj`` of ``bench_sweep``'s decoder layer of a 70B model (235M weights, read
in row blocks). Each layer's detail (``app.jobs.job_detail``, as the window runs it on a worker thread) and its dequantization alone
are timed in interleaved pairs (``QUANTSCOPE_BENCH_REPEAT``, default 3), best of each; the peak RSS
of the process is reported after them. Before the compiled view kernels (2026-12-07) a 58M-weight
layer with two MLX variants took 16-20 s to show.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from _common import CACHE, emit, peak_rss_bytes

LAYERS = ("model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj",
          "model.layers.0.self_attn.o_proj")
#: A layer too large to hold decoded (235M weights, over compare.BLOCK_ELEMENTS): its views are
#: read in row blocks; measured in a process of its own, so that its peak RSS is its own.
WIDE_LAYERS = ("model.layers.0.mlp.down_proj",)


def measure(folder: Path, layers=LAYERS) -> dict:
    from quantscope.app.jobs import job_detail
    from quantscope.backend.checkpoint import open_checkpoint
    from quantscope.backend.engines import get_engine
    from quantscope.backend.formats import fast
    from quantscope.backend.schemes import analyze

    ref = analyze(open_checkpoint(folder / "reference"))
    variants = {n: analyze(open_checkpoint(folder / n)) for n in ("gptq", "awq", "mlx")}
    eng = get_engine("numpy")
    fast.warm_up()
    job_detail(ref, variants, "model.layers.0.self_attn.k_proj", engine="numpy")  # compiled kernels loaded
    out = {}
    for name in layers:
        details, deqs = [], []
        for _ in range(int(os.environ.get("QUANTSCOPE_BENCH_REPEAT", "3"))):
            t0 = time.perf_counter()
            job_detail(ref, variants, name, engine="numpy")
            details.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for m in variants.values():
                eng.dequantize(m, m.layers[name])
            deqs.append(time.perf_counter() - t0)
        out[name] = {"weights": int(ref.layers[name].numel), "detail_s": round(min(details), 3),
                     "dequant_alone_s": round(min(deqs), 3), "ratio": round(min(details) / min(deqs), 2),
                     "detail_runs_s": [round(x, 3) for x in details], "dequant_runs_s": [round(x, 3) for x in deqs]}
    return {"layers": out, "peak_rss_mb": round(peak_rss_bytes() / 2**20)}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--measure":
        emit(measure(Path(sys.argv[2]), sys.argv[3].split(",") if len(sys.argv) > 3 else LAYERS))
        return
    import json

    import bench_sweep
    out = {"benchmark": "detail", "variants": ["gptq", "awq", "mlx"], "cpus": os.cpu_count()}
    for size, layers in (("8b-layer-0.4GB", LAYERS), ("wide-1.7GB", WIDE_LAYERS)):
        folder = CACHE / f"sweep_{size}"
        bench_sweep.build(folder, *bench_sweep.SIZES[size])
        r = subprocess.run([sys.executable, __file__, "--measure", str(folder), ",".join(layers)],
                           capture_output=True, text=True, check=True)
        out[size] = json.loads(r.stdout)
    emit(out)


if __name__ == "__main__":
    main()
