"""Dequantization speed per scheme and engine, relative to copying the same float32 output.

A 4096 × 14336 layer (the shape of a Llama-3-8B MLP projection) in MLX affine 4-bit g64, GPTQ
4-bit g128 (v1, trivial g_idx), AWQ GEMM 4-bit g128 and MLX mxfp4, written once into a cached
checkpoint. Each decode time is divided by the time of ``np.copyto`` of a float32 array of the
output's size, measured in the same run: the numpy engine's ratio is the median over pairs of
runs timed back to back (decode, copy), so a shared machine's load drifting between the two
measurements does not enter it. Target (issue 3): numpy engine ≤ 2× that copy.
"""

from __future__ import annotations

import json
import sys

import numpy as np

from _common import CACHE, emit, paired_ratio, timeit

N, K = 4096, 14336


def build(folder):
    import ml_dtypes
    import mlx.core as mx

    from quantscope.backend.bitpack import pack_bits

    if (folder / "model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w = (rng.standard_t(5, size=(N, K)) * 0.02).astype(np.float32)
    t = {}

    def np_bf16(a):
        return np.array(a.view(mx.uint16)).view(ml_dtypes.bfloat16)

    wq, s, b = mx.quantize(mx.array(w).astype(mx.bfloat16), group_size=64, bits=4)
    t["mlx_affine.weight"], t["mlx_affine.scales"], t["mlx_affine.biases"] = np.array(wq), np_bf16(s), np_bf16(b)
    wq, s = mx.quantize(mx.array(w), mode="mxfp4")[:2]
    t["mlx_mxfp4.weight"], t["mlx_mxfp4.scales"] = np.array(wq), np.array(s)
    q = rng.integers(0, 16, size=(K, N), dtype=np.uint8)
    z = rng.integers(1, 16, size=(K // 128, N), dtype=np.uint8)
    sc = (rng.random((K // 128, N)) * 0.01).astype(np.float16)
    t["gptq.qweight"] = pack_bits(q.T.copy(), 4).T.copy().view(np.int32)
    t["gptq.qzeros"] = pack_bits(z - 1, 4).view(np.int32)
    t["gptq.scales"] = sc
    t["gptq.g_idx"] = (np.arange(K) // 128).astype(np.int32)
    from quantscope.backend.formats.awq import ORDER
    perm = (np.arange(N).reshape(-1, 8)[:, ORDER]).reshape(-1)  # slot order per word
    t["awq.qweight"] = pack_bits(q[:, perm], 4).view(np.int32)
    t["awq.qzeros"] = pack_bits(z[:, perm], 4).view(np.int32)
    t["awq.scales"] = sc
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "tests"))
    from helpers import write_st
    write_st(folder / "model.safetensors", t, {"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"hidden_size": K, "intermediate_size": N}))
    return folder


def main():
    from quantscope.backend.checkpoint import open_checkpoint
    from quantscope.backend.engines import MlxEngine, NumpyEngine
    from quantscope.backend.schemes import analyze

    folder = build(CACHE / "dequant_4096x14336")
    model = analyze(open_checkpoint(folder))
    overrides = {"gptq": ("gptq", 4, 128), "awq": ("awq-gemm", 4, 128)}
    src = np.random.default_rng(1).random((N, K), dtype=np.float32)
    dst = np.empty_like(src)
    copy = timeit(lambda: np.copyto(dst, src), repeat=7)["median_s"]
    ne, me = NumpyEngine(), MlxEngine()
    out = {"benchmark": "dequant", "shape": [N, K], "copy_float32_s": copy, "mlx_device": me.device, "layers": {}}
    buf = np.empty((N, K), np.float32)
    for name in ("mlx_affine", "gptq", "awq", "mlx_mxfp4"):
        layer = model.layers[name]
        if name in overrides:  # no config in this synthetic file: state the scheme explicitly
            layer.scheme, layer.bits, layer.group_size = overrides[name]
            layer.shape = (N, K)
            layer.settings.setdefault("version", 1)
        ref = ne.dequantize(model, layer)
        assert np.array_equal(ref, me.dequantize(model, layer)), name
        pr = paired_ratio(lambda: ne.dequantize(model, layer, out=buf), lambda: np.copyto(dst, src))
        t_np = pr["median_s"]
        t_np_alloc = timeit(lambda: ne.dequantize(model, layer), repeat=3)["median_s"]
        t_mx = timeit(lambda: me.dequantize(model, layer), repeat=3)["median_s"]
        out["layers"][name] = {"scheme": layer.scheme, "numpy_s": t_np, "numpy_over_copy": pr["ratio"],
                               "numpy_fresh_output_over_copy": t_np_alloc / copy,
                               "mlx_s": t_mx, "mlx_over_copy": t_mx / copy, "mlx_route": me.last_path}
    me.close()
    out["target_numpy_over_copy"] = 2.0
    emit(out)


if __name__ == "__main__":
    main()
