"""Exact histograms of tens of millions of values against the dequantization that produced them
(issue 4: "Histograms of tens of millions of values must not cost more than the dequantization
that produced them").

Uses ``bench_sweep``'s one decoder layer of Llama-3-8B (built there once under
``benchmarks/.cache``): ``mlp.down_proj``, 58.7M weights, in its GPTQ, AWQ and MLX variants. For
each variant, in interleaved rounds (``QUANTSCOPE_BENCH_REPEAT``, default 5; best of each):

* ``dequant_s``: ``engine.dequantize`` of the layer (float32 out, on all cores);
* ``values_s``: what a selected layer's value view takes for the variant
  (``metrics.bulk_histograms`` of ``engines.group_values``): the codes counted per group from the
  packed words, the finite range and exact counts in 16,384 fine bins from those counts and
  each group's values (equal to ``np.histogram`` of the decoded layer on those edges: checked
  here on each round's first), the bulk and its merged bins;
* ``values_array_s``: the same histograms taken of the decoded output instead (the path of
  layouts without a code-counting kernel, and of layers whose smoothing is undone);
* ``errors_s``: the same for the error against the bf16 reference, ``x - w`` taken in float64
  element by element (``diff_of``: range and exact zeros in one pass, then the counts);
* ``log_errors_s``: the same for ``log10 |x - w|`` of the nonzero errors (numpy's logarithm);

and ``values_ratio`` etc. are each over ``dequant_s`` of the same round. ``reference``: the
same for the bf16 reference's values (counted per bit pattern from the stored tensor, against
its decode to float32 and the histogram of that). ``numpy_s``: one
``np.histogram`` of the same values in 256 bins over their range, for scale.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
from _common import CACHE, emit

LAYER = "model.layers.0.mlp.down_proj"


def measure(folder: Path) -> dict:
    from quantscope.backend.checkpoint import open_checkpoint
    from quantscope.backend.engines import get_engine, group_values, read_parts
    from quantscope.backend.formats import fast
    from quantscope.backend.formats.codehist import pattern_values
    from quantscope.backend.metrics import LogAbsDiff, bulk_histograms, diff_of
    from quantscope.backend.schemes import analyze

    eng = get_engine("numpy")
    fast.warm_up()
    ref = analyze(open_checkpoint(folder / "reference"))
    rl = ref.layers[LAYER]
    w = np.asarray(eng.dequantize(ref, rl), np.float32)
    out = {"layer": LAYER, "values": int(w.size), "variants": {}}
    # the bf16 reference: its bit patterns counted, against its decode to float32
    stored = read_parts(ref, rl)["weight"]
    rounds = {"dequant_s": [], "values_s": [], "values_array_s": []}
    for i in range(int(os.environ.get("QUANTSCOPE_BENCH_REPEAT", "5"))):
        t0 = time.perf_counter()
        eng.dequantize(ref, rl)
        t1 = time.perf_counter()
        coded = bulk_histograms({"reference": pattern_values(stored)})
        t2 = time.perf_counter()
        arrayed = bulk_histograms({"reference": w})
        t3 = time.perf_counter()
        for k, v in zip(rounds, (t1 - t0, t2 - t1, t3 - t2)):
            rounds[k].append(v)
        if i == 0:
            assert np.array_equal(coded[0], arrayed[0]) and np.array_equal(coded[1]["reference"],
                                                                           arrayed[1]["reference"])
    out["reference"] = _summary(rounds, ("values", "values_array"))
    for name in ("gptq", "awq", "mlx"):
        m = analyze(open_checkpoint(folder / name))
        layer = m.layers[LAYER]
        x = np.asarray(eng.dequantize(m, layer))
        rounds = {"dequant_s": [], "values_s": [], "values_array_s": [], "errors_s": [], "log_errors_s": []}
        for i in range(int(os.environ.get("QUANTSCOPE_BENCH_REPEAT", "5"))):
            t0 = time.perf_counter()
            eng.dequantize(m, layer)
            t1 = time.perf_counter()
            coded = bulk_histograms({name: group_values(m, layer)})
            t2 = time.perf_counter()
            arrayed = bulk_histograms({name: x})
            t3 = time.perf_counter()
            d, _ = diff_of(x, w)
            bulk_histograms({name: d})
            t4 = time.perf_counter()
            bulk_histograms({name: LogAbsDiff(*d)})
            t5 = time.perf_counter()
            for k, v in zip(rounds, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                rounds[k].append(v)
            if i == 0:  # (the same edges and counts either way)
                assert np.array_equal(coded[0], arrayed[0]) and np.array_equal(coded[1][name], arrayed[1][name])
        res = _summary(rounds, ("values", "values_array", "errors", "log_errors"))
        t0 = time.perf_counter()
        np.histogram(x, 256)
        res["numpy_s"] = round(time.perf_counter() - t0, 3)
        out["variants"][name] = res
    return out


def _summary(rounds: dict, kinds) -> dict:
    """The best of each timing, and each kind's ratio to the best dequantization (and per round)."""
    best = {k: min(v) for k, v in rounds.items()}
    res = {k: round(v, 4) for k, v in best.items()}
    for k in kinds:
        res[f"{k}_ratio"] = round(best[f"{k}_s"] / best["dequant_s"], 2)
        res[f"{k}_pair_ratios"] = [round(a / b, 2) for a, b in zip(rounds[f"{k}_s"], rounds["dequant_s"])]
    return res


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--measure":
        emit(measure(Path(sys.argv[2])))
        return
    import json
    import subprocess

    import bench_sweep
    folder = CACHE / "sweep_8b-layer-0.4GB"
    bench_sweep.build(folder, *bench_sweep.SIZES["8b-layer-0.4GB"])
    r = subprocess.run([sys.executable, __file__, "--measure", str(folder)], capture_output=True, text=True,
                       check=True)
    out = {"benchmark": "histogram", "cpus": os.cpu_count(), **json.loads(r.stdout), "target_ratio_max": 1.0}
    emit(out)


if __name__ == "__main__":
    main()
