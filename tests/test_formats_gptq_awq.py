"""GPTQ and AWQ decoding against independent packers and the formula of formats.md §3/§4.

The packers below follow AutoGPTQ's ``pack()`` loop (including its 3-bit split values) and
AutoAWQ's GEMM interleave word by word, independently of quantscope's bit-stream code.
"""

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest

from mx_util import to_np
from quantscope.backend.errors import LayerError
from quantscope.backend.formats import awq, gptq
from ref_packers import autoawq_pack_gemm, autogptq_pack_rows

pytestmark = pytest.mark.usefixtures("kernel_path")

RNG = np.random.default_rng(3)


def make_gptq(n, k, bits, group, *, sym, actorder=False, version=1):
    q = RNG.integers(0, 2 ** bits, size=(k, n))
    ng = -(-k // group)
    z = np.full((ng, n), 2 ** (bits - 1)) if sym else RNG.integers(1, 2 ** bits, size=(ng, n))
    s = (RNG.random((ng, n)) * 0.02 + 0.001).astype(np.float16)
    g_idx = np.arange(k) // group
    if actorder:
        perm = RNG.permutation(k)
        g_idx = np.empty(k, np.int64)
        g_idx[perm] = np.arange(k) // group
    stored_z = z - 1 if version == 1 else z
    qweight = autogptq_pack_rows(q, bits)
    qzeros = autogptq_pack_rows(stored_z.T.copy(), bits).T.copy()  # zeros pack along N
    expected = (s[g_idx].astype(np.float64).T * (q.T - z[g_idx].T)).astype(np.float32)
    return qweight, qzeros, s, g_idx.astype(np.int32), expected


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("version", [1, 2])
def test_gptq_decode_matches_formula(bits, version):
    qweight, qzeros, s, g_idx, expected = make_gptq(64, 256, bits, 64, sym=False, version=version)
    got = gptq.decode(qweight, qzeros, s, g_idx, bits=bits, group_size=64, version=version)
    np.testing.assert_array_equal(got, expected)


def test_gptq_act_order_and_group_minus_one():
    qweight, qzeros, s, g_idx, expected = make_gptq(32, 256, 4, 32, sym=False, actorder=True)
    np.testing.assert_array_equal(gptq.decode(qweight, qzeros, s, g_idx, bits=4, group_size=32), expected)
    assert not gptq.is_trivial_g_idx(g_idx, 256, 32)
    qweight, qzeros, s, g_idx, expected = make_gptq(32, 256, 4, 256, sym=True)
    np.testing.assert_array_equal(gptq.decode(qweight, qzeros, s, None, bits=4, group_size=-1), expected)


def test_gptq_v1_symmetric_zero_words():
    qweight, qzeros, s, g_idx, expected = make_gptq(32, 128, 4, 64, sym=True)
    assert (qzeros.view(np.uint32) == 0x77777777).all()  # formats.md §3.3
    np.testing.assert_array_equal(gptq.decode(qweight, qzeros, s, g_idx, bits=4, group_size=64), expected)


def test_gptq_v1_zero_wrap_round_trips_like_gptqmodel():
    # GPTQModel exports v1 by subtracting 0x11111111 from each packed v2 zero word (a true zero of
    # 0 borrows from its neighbour) and loads by adding it back. Decoding must invert exactly that.
    n, k = 16, 128
    q = RNG.integers(0, 16, size=(k, n))
    z = RNG.integers(0, 16, size=(1, n))
    z[0, [0, 5, 6]] = 0                                      # true zeros of 0, one pair adjacent
    v2 = autogptq_pack_rows(z.T.copy(), 4).T.copy().view(np.uint32)
    stored = (v2.astype(np.int64) - 0x11111111) % 2 ** 32
    qzeros = stored.astype(np.uint32).view(np.int32)
    assert (qzeros.view(np.uint32) & 0xF).any()
    s = np.full((1, n), 0.5, np.float16)
    got = gptq.decode(autogptq_pack_rows(q, 4), qzeros, s, None, bits=4, group_size=128, version=1)
    np.testing.assert_array_equal(got, (0.5 * (q - z)).T.astype(np.float32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_repack_is_exact_through_mx_dequantize(bits):
    qweight, qzeros, s, g_idx, expected = make_gptq(64, 256, bits, 64, sym=False)
    w, sc, bi = gptq.to_mlx_affine(qweight, qzeros, s, g_idx, bits=bits, group_size=64)
    out = to_np(mx.dequantize(mx.array(w), mx.array(sc), mx.array(bi), group_size=64, bits=bits))
    np.testing.assert_array_equal(out, expected)
    _, _, _, gi, _ = make_gptq(64, 256, bits, 64, sym=False, actorder=True)
    assert gptq.to_mlx_affine(qweight, qzeros, s, gi, bits=bits, group_size=64) is None


def test_gptq_bad_shapes():
    qweight, qzeros, s, g_idx, _ = make_gptq(32, 128, 4, 64, sym=True)
    with pytest.raises(LayerError, match="groups"):
        gptq.decode(qweight, qzeros, s[:1], g_idx, bits=4, group_size=64, name="x.q_proj")
    with pytest.raises(LayerError, match="g_idx"):
        gptq.decode(qweight, qzeros, s, g_idx[:10], bits=4, group_size=64)


def make_awq(n, k, group):
    q = RNG.integers(0, 16, size=(k, n))
    z = RNG.integers(0, 16, size=(k // group, n))
    s = (RNG.random((k // group, n)) * 0.02 + 0.001).astype(np.float16)
    gi = np.arange(k) // group
    expected = (s[gi].astype(np.float64) * (q - z[gi])).T.astype(np.float32)
    return autoawq_pack_gemm(q), autoawq_pack_gemm(z), s, q, z, expected


def test_awq_gemm_matches_formula():
    qweight, qzeros, s, q, z, expected = make_awq(64, 256, 128)
    np.testing.assert_array_equal(awq.decode_gemm(qweight, qzeros, s), expected)
    np.testing.assert_array_equal(awq.codes_gemm(qweight), q.T)


@pytest.mark.parametrize("n,k,group", [(88, 2432, 128), (200, 1088, 64)])
def test_awq_gemm_large_layers_and_row_blocks(n, k, group):
    # K spans several of the compiled kernel's panels plus a partial one, N a partial tile of
    # word columns; every value against the formula, also through the row decoder's blocks.
    qweight, qzeros, s, q, _, expected = make_awq(n, k, group)
    np.testing.assert_array_equal(awq.decode_gemm(qweight, qzeros, s), expected)
    sym = awq.decode_gemm(qweight, None, s)
    gi = np.arange(k) // group
    np.testing.assert_array_equal(sym, (s[gi].astype(np.float64) * (q - 8)).T.astype(np.float32))
    dec = awq.gemm_rows(qweight, qzeros, s)
    if dec is not None:  # compiled path only
        for r0, r1 in ((0, 8), (8, 72), (72, n)):
            dst = np.full((r1 - r0, k), np.nan, np.float32)
            dec.fn(r0, r1, dst)
            np.testing.assert_array_equal(dst, expected[r0:r1])


def test_awq_gemm_repack_is_exact_through_mx_dequantize():
    qweight, qzeros, s, q, z, expected = make_awq(64, 256, 64)
    w, sc, bi = awq.gemm_to_mlx_affine(qweight, qzeros, s)
    out = to_np(mx.dequantize(mx.array(w), mx.array(sc), mx.array(bi), group_size=64, bits=4))
    np.testing.assert_array_equal(out, expected)


def test_awq_gemv():
    n, k, g = 16, 256, 64
    q = RNG.integers(0, 16, size=(n, k))
    z = RNG.integers(0, 16, size=(n, k // g))
    s = (RNG.random((n, k // g)) * 0.02).astype(np.float16)
    # GEMV: qweight sequential along K (8 per word), zeros sequential, scales/zeros padded.
    qweight = np.zeros((n, k // 8), np.uint64)
    for i in range(8):
        qweight |= q[:, i::8].astype(np.uint64) << np.uint64(4 * i)
    zpad = np.zeros((n, 8), np.int64)
    zpad[:, :k // g] = z
    qzeros = np.zeros((n, 1), np.uint64)
    for i in range(8):
        qzeros[:, 0] |= zpad[:, i].astype(np.uint64) << np.uint64(4 * i)
    spad = np.zeros((n, 8), np.float16)
    spad[:, :k // g] = s
    expected = (np.repeat(s, g, 1).astype(np.float64) * (q - np.repeat(z, g, 1))).astype(np.float32)
    got = awq.decode_gemv(qweight.astype(np.uint32).view(np.int32), qzeros.astype(np.uint32).view(np.int32), spad,
                          group_size=g)
    np.testing.assert_array_equal(got, expected)


def test_bf16_scales_give_the_exact_product():
    qweight, qzeros, s, q, z, _ = make_awq(16, 128, 128)
    sb = s.astype(ml_dtypes.bfloat16)
    exact = (sb.astype(np.float64)[np.arange(128) // 128] * (q - z[np.arange(128) // 128])).T
    got = awq.decode_gemm(qweight, qzeros, sb)
    np.testing.assert_array_equal(got, exact.astype(np.float32))


def test_gptq_packed_in_int16_words_is_gptq_not_awq_gemv_fast(tmp_path):
    # GPTQModel's pack_dtype int16: qweight [K·b/16, N] and qzeros [G, N·b/16] in 16-bit words.
    # int16 qweight used to be taken for AWQ GEMV_FAST ("not decodable yet") whatever the config.
    import json

    from helpers import write_st
    from quantscope.backend.engines import NumpyEngine
    from quantscope.backend.workspace import open_model
    n, k = 64, 256
    qweight, qzeros, s, g_idx, expected = make_gptq(n, k, 4, 128, sym=False)
    # the same bits in 16-bit words: each 32-bit word of 8 codes along K is two words of 4
    q16 = qweight.view(np.uint16).reshape(k // 8, n, 2).transpose(0, 2, 1).reshape(k // 4, n).view(np.int16)
    z16 = qzeros.view(np.int16)  # zeros pack along N: the halves follow in place
    key = "model.layers.0.self_attn.q_proj"
    write_st(tmp_path / "model.safetensors", {f"{key}.qweight": q16, f"{key}.qzeros": z16, f"{key}.scales": s,
                                              f"{key}.g_idx": g_idx}, {"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 128, "sym": False, "desc_act": False,
        "checkpoint_format": "gptq", "pack_dtype": "int16"}}))
    m = open_model(tmp_path)
    lay = m.layers[key]
    assert lay.scheme == "gptq" and lay.problem is None and lay.shape == (n, k)
    np.testing.assert_array_equal(NumpyEngine().dequantize(m, lay), expected)


@pytest.mark.parametrize("what", ["int_scales", "float_qweight"])
def test_packed_layers_of_impossible_dtypes_are_refused(tmp_path, what):
    # I32 scales decoded every weight to 0 and F32 qweight words were read as integers, silently
    import json

    from helpers import write_st
    from quantscope.backend.checkpoint import open_checkpoint
    from quantscope.backend.doctor import diagnose
    from quantscope.backend.schemes import analyze
    qweight, qzeros, s, g_idx, _ = make_gptq(64, 256, 4, 64, sym=False)
    if what == "int_scales":
        s = np.ones_like(s, np.int16)
    else:
        qweight = qweight.view(np.float32)
    p = "model.layers.0.mlp.up_proj"
    write_st(tmp_path / "model.safetensors", {f"{p}.qweight": qweight, f"{p}.qzeros": qzeros, f"{p}.scales": s,
                                              f"{p}.g_idx": g_idx})
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "gptq", "bits": 4, "group_size": 64, "sym": False, "checkpoint_format": "gptq"}}))
    layer = analyze(open_checkpoint(tmp_path)).layers[p]
    assert not layer.decodable and ("not floating point" in layer.problem or "not integer words" in layer.problem)
    assert [f.rule for f in diagnose(tmp_path) if f.severity == "error"] == ["layer.inconsistent"]
