"""Every golden checkpoint (written by compressed-tensors / bitsandbytes / DeepSeek's FP8 code)
is recognised from its files and config and decoded through the engines to the library's values."""

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from quantscope.backend.formats.common import round_to
from quantscope.backend.checkpoint import open_checkpoint
from quantscope.backend.engines import MlxEngine, NumpyEngine
from quantscope.backend.schemes import analyze

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "expected.npz").exists())
EXPECTED_SCHEME = {"bnb_fp4": "bnb-fp4", "bnb_int8": "bnb-int8", "ct_fp8": "ct-fp8", "ct_int8": "ct-int",
                   "ct_mxfp4": "ct-mxfp4", "ct_mxfp8": "ct-mxfp8", "ct_nvfp4": "ct-nvfp4", "fp8_block": "fp8-block",
                   "fp8_mxfp8": "ct-mxfp8", "bnb_nf4": "bnb-nf4", "ct": "ct-pack"}


def expected_scheme(case):
    for prefix in sorted(EXPECTED_SCHEME, key=len, reverse=True):
        if case.startswith(prefix) or case.startswith(prefix.replace("ct", "ct016")):
            return EXPECTED_SCHEME[prefix]


@pytest.mark.parametrize("case", CASES)
def test_golden_case_through_the_pipeline(case):
    with np.load(GOLDEN / case / "expected.npz") as z:
        exp = dict(z)
    model = analyze(open_checkpoint(GOLDEN / case))
    quantized = [layer for layer in model.layers.values() if layer.quantized]
    assert quantized, model.schemes
    ne = NumpyEngine()
    for layer in quantized:
        assert layer.scheme == expected_scheme(case), (case, layer.scheme)
        assert layer.decodable, layer.problem
        got = ne.dequantize(model, layer)
        key = f"{layer.path}.weight"
        # quantscope returns the exact float32 product; the library also casts it to the model's
        # dtype, so compare after the same cast (and the float32 product where the library saved it).
        lib_dtype = str(exp.get("library_dtype", "torch.float32")).replace("torch.", "")
        want = exp[key]
        assert got.shape == want.shape == layer.shape
        if key + "_f32" in exp:
            np.testing.assert_array_equal(got, exp[key + "_f32"])
        if key + "_bf16" in exp:
            np.testing.assert_array_equal(round_to(got.copy(), ml_dtypes.bfloat16), exp[key + "_bf16"])
        cast = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}.get(lib_dtype)
        np.testing.assert_array_equal(round_to(got.copy(), cast) if cast else got, want.astype(np.float32))


def test_mlx_engine_equals_numpy_on_every_golden_case():
    # compressed-tensors pack-quantized layers with contiguous groups are repacked to MLX affine;
    # the others fall back to numpy. Either way the values are identical.
    me = MlxEngine()
    routes = set()
    try:
        for case in CASES:
            model = analyze(open_checkpoint(GOLDEN / case))
            for layer in model.layers.values():
                if layer.quantized:
                    np.testing.assert_array_equal(me.dequantize(model, layer), NumpyEngine().dequantize(model, layer))
                    routes.add((layer.scheme, me.last_path))
    finally:
        me.close()
    assert ("ct-pack", "repacked to MLX affine + mx.dequantize") in routes
    assert ("ct-pack", "numpy fallback") in routes  # legacy 3/5-bit packing, act-order
