"""Comparison sweep cost against dequantization alone, and its memory, at five model sizes.

Llama-shaped bf16 references (no embeddings):

* ``0.5GB`` and ``2GB``: hidden 2048, intermediate 5632, 5 and 20 decoder layers;
* ``small-0.2GB``: shaped like Qwen2.5-0.5B (8 decoder layers, hidden 896, k/v 128 rows), whose
  layers are mostly small;
* ``8b-layer-0.4GB``: one decoder layer of Llama-3-8B (hidden 4096, intermediate 14336, k/v 1024
  rows), layers of up to 59M weights;
* ``wide-1.7GB``: one decoder layer of a 70B model (hidden 8192, intermediate 28672, k/v 1024
  rows), layers of 235M weights: memory must stay flat in a layer's size too;
* ``heads-0.5GB``: the 0.5 GB model with rows of different scale, as trained layers have: each
  attention head's 128 rows scaled by one lognormal factor (sigma 0.5), each MLP row by its own
  (sigma 0.25). The others' rows are alike, which suits the one pass's sampling best; here blocks
  of rows differ, its intervals must be wider and it collects more.

Three variants of each in their real layouts — GPTQ 4-bit g128 (v1), AWQ GEMM 4-bit g128, MLX
affine 4-bit g64 — quantized by fast round-to-nearest (not the slow algorithms), one shard per
decoder layer, built once under ``benchmarks/.cache``.

Each size is measured in a fresh subprocess: the files are read once (page cache warm), then
``sweep`` over all three variants is timed and the peak RSS taken, then the same variant layers
are dequantized alone with the same engine (wall time, and the process's CPU time over all
threads: ``cpu_ratio``, steadier where other work shares the machine, since a thread waiting
for a core costs wall time but no CPU time); that pair is repeated (``QUANTSCOPE_BENCH_REPEAT``,
default 3) and the best of each side is reported, with every run and each pair's ratio. Targets (issue 4): sweep ≤ 1.3× dequantization,
peak RSS < 1.5 GB and flat in model size.

``floor_s`` (measured in the same rounds) is what no exact sweep with these kernels can go
below: every variant layer decoded block by block into a cache-sized buffer and only its
float64 sums taken (no exact maximum, no percentiles, no sampling, no alignment), layers spread
over the cores. ``floor_ratio`` over dequantization alone says how much of the target is left
to the percentiles and everything else.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _common import CACHE, emit, peak_rss_bytes

H, F = 2048, 5632
#: label: (decoder layers, hidden, intermediate, k/v rows). The third is shaped like Qwen2.5-0.5B
#: (hidden 896, k/v 128 rows): most of its layers are under 1M elements, where a sweep's cost per
#: layer weighs most.
#: The fourth and fifth are one decoder layer of an 8B model (MLP layers of 59M weights) and of a
#: 70B model (235M; its reference alone is 1.7 GB).
SIZES = {"0.5GB": (5, H, F, H), "2GB": (20, H, F, H), "small-0.2GB": (8, 896, 4864, 128),
         "8b-layer-0.4GB": (1, 4096, 14336, 1024), "wide-1.7GB": (1, 8192, 28672, 1024),
         "heads-0.5GB": (5, H, F, H)}
#: Sizes whose rows differ in scale (see the module's docstring).
HETERO = {"heads-0.5GB"}


def linears(h: int, f: int, kv: int):
    return (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv, h)), ("self_attn.v_proj", (kv, h)),
            ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (f, h)), ("mlp.up_proj", (f, h)),
            ("mlp.down_proj", (h, f)))


def _rtn(w: np.ndarray, group: int):
    """Asymmetric min/max RTN 4-bit: codes uint8 [N, K], scales fp16 [K/G, N], zeros int [K/G, N]."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    mn, mx = g.min(-1), g.max(-1)
    scale = np.maximum(mx - mn, 1e-5) / 15
    scale = scale.astype(np.float16).astype(np.float32)
    zero = np.clip(np.rint(-mn / scale), 1, 15)
    q = np.rint(g / scale[..., None])
    q += zero[..., None]
    np.clip(q, 0, 15, out=q)
    return q.astype(np.uint8).reshape(n, k), scale.T.astype(np.float16), zero.T.astype(np.uint8)


def build(folder: Path, n_layers: int, h: int = H, f: int = F, kv: int = H, hetero: bool = False) -> dict[str, Path]:
    import ml_dtypes
    import mlx.core as mx

    from quantscope.backend.bitpack import pack_bits
    from quantscope.backend.formats.awq import ORDER
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from helpers import write_st

    names = ("reference", "gptq", "awq", "mlx")
    paths = {n: folder / n for n in names}
    # heads of 128 (the window's Heads view, bench_detail): a cache written before they were
    # named gets them added
    heads = {"num_attention_heads": h // 128, "num_key_value_heads": max(1, kv // 128), "head_dim": 128}
    if (folder / "done").exists():
        for p in paths.values():
            c = json.loads((p / "config.json").read_text())
            if "num_attention_heads" not in c:
                (p / "config.json").write_text(json.dumps({**c, **heads}))
        return paths
    bf16 = np.dtype(ml_dtypes.bfloat16)
    cfg = {"model_type": "llama", "hidden_size": h, "intermediate_size": f, "num_hidden_layers": n_layers,
           "torch_dtype": "bfloat16", **heads}
    qcfg = {"gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": False,
                     "checkpoint_format": "gptq"},
            "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm", "zero_point": True}}
    for n, p in paths.items():
        p.mkdir(parents=True, exist_ok=True)
        c = dict(cfg)
        if n in qcfg:
            c["quantization_config"] = qcfg[n]
        if n == "mlx":
            c["quantization"] = {"group_size": 64, "bits": 4}
        (p / "config.json").write_text(json.dumps(c))
    rng = np.random.default_rng(0)
    maps: dict[str, dict] = {n: {} for n in names}
    for i in range(n_layers):
        t = {n: {} for n in names}
        for m, shape in linears(h, f, kv):
            key = f"model.layers.{i}.{m}"
            w = rng.standard_normal(shape, dtype=np.float32) * 0.02
            if hetero:  # a scale per head of 128 rows (attention), per row (MLP)
                attn = m.startswith("self_attn")
                per = rng.lognormal(0.0, 0.5 if attn else 0.25, -(-shape[0] // 128) if attn else shape[0])
                w *= (np.repeat(per, 128)[:shape[0]] if attn else per)[:, None].astype(np.float32)
            w = w.astype(bf16)
            t["reference"][f"{key}.weight"] = w
            wf = w.astype(np.float32)
            q, s, z = _rtn(wf, 128)
            t["gptq"][f"{key}.qweight"] = np.ascontiguousarray(pack_bits(q, 4).T).view(np.int32)
            t["gptq"][f"{key}.qzeros"] = pack_bits(z - 1, 4).view(np.int32)
            t["gptq"][f"{key}.scales"] = s
            t["gptq"][f"{key}.g_idx"] = (np.arange(shape[1]) // 128).astype(np.int32)
            qt = np.ascontiguousarray(q.T)
            t["awq"][f"{key}.qweight"] = pack_bits(qt.reshape(shape[1], -1, 8)[:, :, ORDER].reshape(qt.shape),
                                                   4).view(np.int32)
            t["awq"][f"{key}.qzeros"] = pack_bits(z.reshape(z.shape[0], -1, 8)[:, :, ORDER].reshape(z.shape),
                                                  4).view(np.int32)
            t["awq"][f"{key}.scales"] = s
            a = mx.array(w.view(np.uint16)).view(mx.bfloat16)
            wq, ms, mb = mx.quantize(a, group_size=64, bits=4)
            mx.eval(wq, ms, mb)
            t["mlx"][f"{key}.weight"] = np.array(wq)
            t["mlx"][f"{key}.scales"] = np.array(ms.view(mx.uint16)).view(bf16)
            t["mlx"][f"{key}.biases"] = np.array(mb.view(mx.uint16)).view(bf16)
        for n in names:
            shard = f"model-{i:05d}.safetensors"
            write_st(paths[n] / shard, t[n], {"format": "pt" if n != "mlx" else "mlx"})
            maps[n].update(dict.fromkeys(t[n], shard))
    for n in names:
        (paths[n] / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": maps[n]}))
    (folder / "done").write_text("ok")
    return paths


def _warm(folder: Path) -> None:
    for f in sorted(folder.rglob("*.safetensors")):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def measure(folder: Path, engine: str) -> dict:
    """In this (fresh) process: sweep time and peak RSS, then dequantization alone."""
    from quantscope.backend.checkpoint import open_checkpoint
    from quantscope.backend.compare import sweep
    from quantscope.backend.engines import get_engine
    from quantscope.backend.schemes import analyze

    _warm(folder)
    ref = analyze(open_checkpoint(folder / "reference"))
    variants = {n: analyze(open_checkpoint(folder / n)) for n in ("gptq", "awq", "mlx")}
    # Warm-up outside the timings: the first call of each compiled kernel loads it from numba's
    # cache (tenths of a second each), a one-time cost of the process, not of either measurement.
    eng = get_engine(engine)
    for m in variants.values():
        first = min(m.layers.values(), key=lambda lay: lay.numel)
        eng.dequantize(m, first)
    from quantscope.backend.formats import fast
    from quantscope.backend.metrics import error_metrics
    error_metrics(np.ones(1000, np.float32), np.ones(1000, np.float32))
    fast.warm_up()  # also the sweep's one-pass kernels
    rss0 = peak_rss_bytes()

    cpu = {"sweep": [], "dequant": []}  # the process's CPU time (all threads) of each run

    def sweep_once():
        t0, c0 = time.perf_counter(), time.process_time()
        res = sweep(ref, variants, engine=engine)
        cpu["sweep"].append(time.process_time() - c0)
        return time.perf_counter() - t0, res

    def dequant_once(rows):
        t0, c0 = time.perf_counter(), time.process_time()
        for r in rows:
            m = variants[r.variant]
            eng.dequantize(m, m.layers[r.variant_layer])
        cpu["dequant"].append(time.process_time() - c0)
        return time.perf_counter() - t0

    def floor_once(rows):
        # The least an exact sweep with these kernels can cost: each variant layer decoded block
        # by block into a cache-sized buffer and only its float64 sums taken (no maximum check,
        # no percentiles, no sampling), the layers spread over the cores as the sweep does.
        from concurrent.futures import ThreadPoolExecutor

        from quantscope.backend.fused import BLOCK_ELEMENTS
        if not hasattr(eng, "row_decoder"):  # (the MLX engine decodes whole layers: no floor)
            return math.nan
        by_layer: dict = {}
        for r in rows:
            by_layer.setdefault(r.name, []).append(r)
        empty = np.empty(0, np.float32)

        def one(name):
            w = np.asarray(ref.ckpt.tensor(ref.layers[name].tensors["weight"].name))
            w = w.reshape(-1, w.shape[-1])
            step = max(32, BLOCK_ELEMENTS // w.shape[1] // 32 * 32)
            buf = np.empty((step, w.shape[1]), np.float32)
            acc, cnt = np.zeros(5), np.zeros(4, np.int64)
            for r in by_layer[name]:
                m = variants[r.variant]
                dec = eng.row_decoder(m, m.layers[r.variant_layer])
                for r0 in range(0, dec.rows, step):
                    r1 = min(dec.rows, r0 + step)
                    dec.fn(r0, r1, buf[:r1 - r0])
                    fast.pair_stats(w[r0:r1], buf[:r1 - r0], empty, empty, empty, 1, acc, cnt, np.empty(0))

        t0 = time.perf_counter()
        with ThreadPoolExecutor(os.cpu_count() or 1) as ex:
            list(ex.map(one, by_layer))
        return time.perf_counter() - t0

    # Interleaved triples, best of each: on a shared machine either side alone swings by a third
    # from run to run, and a single pair's ratio follows whichever was disturbed.
    t_sweep, res = sweep_once()
    rss_sweep = peak_rss_bytes()  # before any dequantization alone
    sweeps, deqs, floors = [t_sweep], [dequant_once(res.rows)], [floor_once(res.rows)]
    for _ in range(int(os.environ.get("QUANTSCOPE_BENCH_REPEAT", "3")) - 1):
        sweeps.append(sweep_once()[0])
        deqs.append(dequant_once(res.rows))
        floors.append(floor_once(res.rows))
    t_sweep, t_deq, t_floor = min(sweeps), min(deqs), min(floors)
    return {"layers": len(res.rows) // 3, "elements": int(sum(ref.layers[r.name].numel for r in res.rows) // 3),
            "sweep_s": round(t_sweep, 3), "dequant_alone_s": round(t_deq, 3), "ratio": round(t_sweep / t_deq, 3),
            "sweep_runs_s": [round(x, 3) for x in sweeps], "dequant_runs_s": [round(x, 3) for x in deqs],
            "pair_ratios": [round(a / b, 3) for a, b in zip(sweeps, deqs)],
            "cpu_ratio": round(min(cpu["sweep"]) / min(cpu["dequant"]), 3),
            "cpu_pair_ratios": [round(a / b, 3) for a, b in zip(cpu["sweep"], cpu["dequant"])],
            "floor_s": _num(t_floor), "floor_ratio": _num(t_floor / t_deq),
            "floor_pair_ratios": [_num(a / b) for a, b in zip(floors, deqs)],
            "peak_rss_after_open_mb": round(rss0 / 2**20), "peak_rss_sweep_mb": round(rss_sweep / 2**20),
            "rel_fro_mean": {n: round(float(np.mean([r.rel_fro for r in res.rows if r.variant == n])), 5)
                             for n in variants}}


def _num(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 3)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--measure":
        emit(measure(Path(sys.argv[2]), sys.argv[3]))
        return
    engine = os.environ.get("QUANTSCOPE_BENCH_ENGINE", "numpy")
    out = {"benchmark": "sweep", "engine": engine, "cpus": os.cpu_count(), "sizes": {}}
    for label, dims in SIZES.items():
        folder = CACHE / f"sweep_{label}"
        t0 = time.perf_counter()
        build(folder, *dims, hetero=label in HETERO)
        build_s = time.perf_counter() - t0
        r = subprocess.run([sys.executable, __file__, "--measure", str(folder), engine], capture_output=True,
                           text=True, check=True)
        res = json.loads(r.stdout)
        res["build_s"] = round(build_s, 1)
        res["reference_gb"] = round(sum(f.stat().st_size for f in (folder / "reference").glob("*.safetensors")) / 1e9, 2)
        out["sizes"][label] = res
    out["targets"] = {"ratio_max": 1.3, "peak_rss_mb_max": 1536}
    emit(out)


if __name__ == "__main__":
    main()
