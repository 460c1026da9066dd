"""gpt-oss's MXFP4 experts (``…experts.{proj}_blocks`` / ``_scales`` / ``_bias``, formats.md §2):
read, decoded as ``mx.dequantize`` decodes the same bytes (mlx-lm's gpt_oss sanitize hands them
to it), measured against mlx-lm's split conversion, checked by the doctor, refused by convert."""

import json

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest
from helpers import write_st
from mx_util import to_np
from quantscope.app.cli import main
from quantscope.backend.checkpoint import open_checkpoint
from quantscope.backend.compare import stored_codes, sweep
from quantscope.backend.doctor import diagnose
from quantscope.backend.engines import MlxEngine, NumpyEngine
from quantscope.backend.schemes import analyze

pytestmark = pytest.mark.usefixtures("kernel_path")

E, I, H = 4, 64, 128
EX = "model.layers.0.mlp.experts"
BF16 = ml_dtypes.bfloat16


def _cfg(**extra):
    return {"model_type": "gpt_oss", "hidden_size": H, "intermediate_size": I, "num_local_experts": E,
            "num_hidden_layers": 1, **extra}


@pytest.fixture(scope="module")
def gptoss(tmp_path_factory):
    """The original layout, made from mx.quantize(mode="mxfp4") of bf16 weights: blocks are its
    uint32 words as bytes [E, N, K/32, 16], scales its E8M0 bytes; and the expected decodes
    (mx.dequantize of those words), the bf16 weights and the file's folder."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("gptoss")
    t, expect, dense = {}, {}, {}
    for proj, (n, k) in (("gate_up_proj", (2 * I, H)), ("down_proj", (H, I))):
        w = mx.array(rng.standard_t(5, (E, n, k)).astype(np.float32) * 0.02).astype(mx.bfloat16)
        wq, sc = mx.quantize(w, group_size=32, bits=4, mode="mxfp4")
        expect[proj] = to_np(mx.dequantize(wq, sc, group_size=32, bits=4, mode="mxfp4", dtype=mx.float32))
        dense[proj] = to_np(w.astype(mx.float32))
        t[f"{EX}.{proj}_blocks"] = to_np(wq).view(np.uint8).reshape(E, n, k // 32, 16)
        t[f"{EX}.{proj}_scales"] = to_np(sc).view(np.uint8)
        t[f"{EX}.{proj}_bias"] = rng.normal(0, 0.01, (E, n)).astype(BF16)
    t["model.layers.0.self_attn.q_proj.weight"] = rng.normal(0, 0.02, (H, H)).astype(BF16)
    t["model.layers.0.mlp.router.weight"] = rng.normal(0, 0.02, (E, H)).astype(BF16)
    folder = root / "original"
    folder.mkdir()
    write_st(folder / "model.safetensors", t, {"format": "pt"})
    (folder / "config.json").write_text(json.dumps(_cfg(quantization_config={"quant_method": "mxfp4"})))
    return folder, expect, dense


def test_the_nibble_order_is_the_formats_own():
    # formats.md §2's worked example: row [0.5, 1, 1.5, 2, 3, 4, 6, -6, 0…] is word 0xF7654321 —
    # low nibble the even element; gpt-oss's bytes are those of the words
    from quantscope.backend.engines import gptoss_as_mlx
    blocks = np.zeros((1, 1, 1, 16), np.uint8)
    blocks[0, 0, 0, :4] = [0x21, 0x43, 0x65, 0xF7]
    w, s = gptoss_as_mlx({"blocks": blocks, "scales": np.full((1, 1, 1), 127, np.uint8)})
    assert w.shape == (1, 1, 4) and w[0, 0, 0] == 0xF7654321
    from quantscope.backend.formats.mlx import decode_fp
    got = decode_fp(w.reshape(1, 4), s.reshape(1, 1), mode="mxfp4")
    np.testing.assert_array_equal(got[0, :8], [0.5, 1, 1.5, 2, 3, 4, 6, -6])


def test_read_and_decoded_as_mx_dequantize_decodes_the_same_bytes(gptoss):
    folder, expect, _ = gptoss
    m = analyze(open_checkpoint(folder))
    for proj, want in expect.items():
        layer = m.layers[f"{EX}.{proj}"]
        assert (layer.scheme, layer.bits, layer.group_size, layer.shape) == ("gptoss-mxfp4", 4, 32, want.shape)
        assert set(layer.tensors) == {"blocks", "scales", "bias"} and layer.problem is None
        assert layer.tensors["bias"].name == f"{EX}.{proj}_bias"
        np.testing.assert_array_equal(NumpyEngine().dequantize(m, layer), want)
        rows = NumpyEngine().row_decoder(m, layer)  # (the sweep's block decodes; none without numba)
        if rows is not None:
            out = np.empty((10, want.shape[-1]), np.float32)
            rows.fn(37, 47, out)
            np.testing.assert_array_equal(out, want.reshape(-1, want.shape[-1])[37:47])
        # the codes the views count: the FP4 codes of the bytes, low nibble first
        codes = stored_codes(m, layer)
        lut = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
        scale = np.exp2(np.asarray(m.ckpt.tensor(f"{EX}.{proj}_scales"), np.float32) - 127)
        np.testing.assert_array_equal(lut[codes] * np.repeat(scale, 32, axis=-1), want)
    eng = MlxEngine()
    try:
        np.testing.assert_array_equal(eng.dequantize(m, m.layers[f"{EX}.down_proj"]), expect["down_proj"])
        assert eng.last_path == "mx.dequantize"
    finally:
        eng.close()


def test_measured_against_mlx_lms_split_conversion_row_for_row(gptoss, tmp_path):
    """mlx-lm's gpt_oss sanitize splits the interleaved gate/up rows (gate even, up odd) into
    experts.gate_proj / up_proj; here requantized at 8 bit affine, so every figure is that of
    the rows it names: a gate row set against an up row would give rel_fro ~1.4, not ~0.13 (the
    MXFP4 reference's own error against the 8-bit copy of the bf16 weights)."""
    folder, _, dense = gptoss
    out = {}
    for proj, w in dense.items():
        halves = {"gate_proj": w[:, ::2], "up_proj": w[:, 1::2]} if proj == "gate_up_proj" else {proj: w}
        for name, part in halves.items():
            wq, s, b = mx.quantize(mx.array(part).astype(mx.bfloat16), group_size=64, bits=8)
            out.update({f"{EX}.{name}.weight": to_np(wq), f"{EX}.{name}.scales": to_np(s),
                        f"{EX}.{name}.biases": to_np(b)})
    var = tmp_path / "mlxlm"
    var.mkdir()
    write_st(var / "model.safetensors", out, {"format": "mlx"})
    (var / "config.json").write_text(json.dumps(_cfg(quantization={"group_size": 64, "bits": 8})))
    ref_m, var_m = analyze(open_checkpoint(folder)), analyze(open_checkpoint(var))
    for reference, variant in ((ref_m, var_m), (var_m, ref_m)):
        res = sweep(reference, {"v": variant}, engine="numpy")
        got = {r.name: r.rel_fro for r in res.rows}
        assert len(got) == (2 if reference is ref_m else 3), got
        for name, rf in got.items():
            proj = name.rsplit(".", 1)[1]
            dec_ref = NumpyEngine().dequantize(reference, reference.layers[name]).astype(np.float64)
            if reference is ref_m and proj == "gate_up_proj":
                dec_var = np.empty_like(dec_ref)
                dec_var[:, ::2] = NumpyEngine().dequantize(variant, variant.layers[f"{EX}.gate_proj"])
                dec_var[:, 1::2] = NumpyEngine().dequantize(variant, variant.layers[f"{EX}.up_proj"])
            elif reference is var_m and proj in ("gate_proj", "up_proj"):
                full = NumpyEngine().dequantize(variant, variant.layers[f"{EX}.gate_up_proj"])
                dec_var = full[:, ::2] if proj == "gate_proj" else full[:, 1::2]
            else:
                dec_var = NumpyEngine().dequantize(variant, variant.layers[name])
            direct = np.linalg.norm(dec_var - dec_ref) / np.linalg.norm(dec_ref)
            assert rf == pytest.approx(direct, rel=1e-9) and 0 < rf < 0.3, (name, rf)  # (mxfp4 against 8 bit)


def test_the_doctor_finds_nothing_and_convert_refuses_what_it_cannot_write(gptoss, tmp_path, capsys):
    folder, _, _ = gptoss
    findings = diagnose(folder)
    assert not [f for f in findings if f.severity in ("error", "warning")], [str(f) for f in findings]
    assert main(["convert", str(folder), str(tmp_path / "out"), "--to", "mlx"]) == 2
    err = capsys.readouterr().err
    assert "cannot convert gpt-oss's MXFP4 experts" in err and not (tmp_path / "out").exists()
    assert main(["info", str(folder)]) == 0
    text = capsys.readouterr().out
    assert f"{EX}.gate_up_proj" in text and "gptoss-mxfp4" in text and "4×128×128" in text
