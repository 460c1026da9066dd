"""The embedded demo workspace (``quantscope demo DIR``): a small Llama checkpoint and its quantizations.

A seeded, synthetic Llama-architecture decoder (4 layers, hidden 512, intermediate 1536, 8 heads of
64, vocab 2048, untied head) is written as a dense bf16 reference, and then quantized by numpy
implementations of the real algorithms into the real on-disk formats:

========================  ============================================================================
folder                    what it is
========================  ============================================================================
``reference``             dense bf16
``gptq-w4g128``           GPTQ 4-bit g128, sym, no act-order, GPTQ v1 layout (qzeros store z-1)
``gptq-w4g128-actorder``  GPTQ 4-bit g128, asym, desc_act (non-monotonic g_idx), v1 layout
``rtn-w4g128``            round-to-nearest 4-bit g128 asym min/max, in the GPTQ v2 layout (a baseline)
``awq-w4g128``            AWQ GEMM 4-bit g128 with activation-aware scales folded into the norms/v/up
``mlx-affine-q4g64``      ``mx.quantize`` 4-bit g64 of every Linear, the embeddings and lm_head
``mlx-mixed-3-6``         mlx-lm's ``mixed_3_6`` recipe (3-bit, 6-bit v/down of some layers + lm_head)
========================  ============================================================================

Layer inputs for GPTQ's Hessians and AWQ's scale search come from a numpy forward pass of the
reference over random tokens (causal attention without RoPE: positions do not matter for the
statistics these algorithms use). Every file is a pure function of the seed (byte-identical
rebuilds on one machine); the build is written beside ``dest`` and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

from .bitpack import pack_bits
from .dtypes import DTYPES
from .blas import single_threaded_blas
from .errors import Cancelled, CheckpointError
from .formats.awq import ORDER

DEMO_VERSION = "demo-v2"
MANIFEST = "demo.json"
#: Where the AWQ variant's true smoothing scales are kept (outside every model folder).
#: (in a folder of its own: beside the checkpoints, `info DIR` and `compare DIR/*` took it for one)
AWQ_SMOOTHING_FILE = "truth/awq-w4g128-smoothing.safetensors"

#: Model shape: the proportions of a real Llama, scaled down so the whole build takes seconds.
ARCH = {"hidden": 512, "intermediate": 1536, "heads": 8, "head_dim": 64, "kv_heads": 8,
        "layers": 4, "vocab": 2048, "eps": 1e-5}
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
#: The seven Linear modules of a decoder layer, by their path below ``model.layers.{i}``.
LINEARS = tuple(f"self_attn.{p}" for p in ATTN) + tuple(f"mlp.{p}" for p in MLP)

#: label -> folder name, in display order (labels are the folder names).
VARIANTS = ("gptq-w4g128", "gptq-w4g128-actorder", "rtn-w4g128", "awq-w4g128",
            "mlx-affine-q4g64", "mlx-mixed-3-6")

BF16 = np.dtype(ml_dtypes.bfloat16)
_ST_NAMES = {d.numpy: name for name, d in DTYPES.items() if not d.packed}

# Calibration set: 8 sequences x 128 tokens (1024 rows of layer inputs). Fewer rows than K lets
# GPTQ fit the calibration set itself (in-sample output error near 0), which would flatter it.
_CALIB_SEQS, _CALIB_LEN = 8, 128
# AWQ's scale search estimates its loss on a token subset and every 8th output row: the scale is
# per input channel, so a row subsample is an unbiased estimate of the loss at 1/8 of the cost.
_AWQ_TOKENS, _AWQ_ROW_STEP, _AWQ_GRID = 256, 8, 20
_SUB_BLOCK = 16


@dataclass
class DemoWorkspace:
    """A built demo workspace.

    Attributes
    ----------
    root : Path
        The workspace folder.
    reference : Path
        The dense bf16 model folder.
    variants : dict of str to Path
        Quantized model folders by label, in display order (the reference is not among them).
    """

    root: Path
    reference: Path
    variants: dict[str, Path]


# -- model and calibration data ------------------------------------------------------------------

def layer_name(i: int, linear: str) -> str:
    """Module path of ``linear`` (e.g. ``"self_attn.q_proj"``) in decoder layer ``i``."""
    return f"model.layers.{i}.{linear}"


def _heavy_tailed(rng: np.random.Generator, shape, std: float) -> np.ndarray:
    """Student-t (6 degrees of freedom) samples with standard deviation ``std``, float32.

    Trained LLM weights have kurtosis well above a Gaussian's. ``t = Z / sqrt(V/6)`` with
    ``V ~ chi2(6) = 2 (E1 + E2 + E3)`` (standard exponentials), all in float32: half the time of
    ``standard_t``, which would otherwise be a large part of the build.
    """
    z = rng.standard_normal(shape, dtype=np.float32)
    v = rng.standard_exponential(shape, dtype=np.float32)
    v += rng.standard_exponential(shape, dtype=np.float32)
    v += rng.standard_exponential(shape, dtype=np.float32)
    v *= np.float32(1 / 3)  # V/6
    np.maximum(v, np.float32(1e-30), out=v)  # an exact 0 has probability ~0; never divide by it
    z *= np.float32(std / np.sqrt(1.5))  # Var(t6) = 6/4
    z /= np.sqrt(v, out=v)
    return z


def _norm_weight(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.abs(1.0 + _heavy_tailed(rng, n, 0.12)).astype(np.float32) + 0.05


def outlier_channels(seed: int = 0) -> dict[str, np.ndarray]:
    """The input channels that carry large activations (and matching large weight columns).

    Returns
    -------
    dict
        ``"hidden"`` (residual stream: inputs of q/k/v/gate/up), ``"attn"`` (inputs of o_proj)
        and ``"mlp"`` (inputs of down_proj), each a sorted int array.
    """
    rng = np.random.default_rng([seed, 1])
    return {"hidden": np.sort(rng.choice(ARCH["hidden"], 4, replace=False)),
            "attn": np.sort(rng.choice(ARCH["hidden"], 4, replace=False)),
            "mlp": np.sort(rng.choice(ARCH["intermediate"], 8, replace=False))}


def synthetic_model(seed: int = 0) -> dict[str, np.ndarray]:
    """The reference weights: HF Llama names, bf16 arrays.

    Linear weights are Student-t (df 5) with std ~0.02 growing with depth, and have 5-20x
    columns at the input channels where the calibration activations have outliers; norms are
    around 1 with some spread.

    Parameters
    ----------
    seed
        Seed of every random draw.

    Returns
    -------
    dict of str to numpy.ndarray
        ``name -> bfloat16 array`` in checkpoint order.
    """
    rng = np.random.default_rng([seed, 0])
    out = outlier_channels(seed)
    d, f, v, n_layers = ARCH["hidden"], ARCH["intermediate"], ARCH["vocab"], ARCH["layers"]
    w: dict[str, np.ndarray] = {}
    emb = _heavy_tailed(rng, (v, d), 0.02)
    # Residual-stream channels differ in scale (log-normal), and a few carry "massive activations".
    emb *= rng.lognormal(0.0, 0.4, size=d).astype(np.float32)
    emb[:, out["hidden"]] *= 6.0
    w["model.embed_tokens.weight"] = emb
    type_std = {"q_proj": 1.0, "k_proj": 1.0, "v_proj": 0.7, "o_proj": 0.7,
                "gate_proj": 1.0, "up_proj": 1.0, "down_proj": 0.8}
    shapes = {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "o_proj": (d, d),
              "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
    in_outliers = {"o_proj": out["attn"], "down_proj": out["mlp"]}
    for i in range(n_layers):
        depth = 0.7 + 0.6 * i / max(1, n_layers - 1)  # later layers carry larger weights
        w[f"model.layers.{i}.input_layernorm.weight"] = _norm_weight(rng, d)
        for lin in LINEARS:
            if lin == "mlp.gate_proj":
                w[f"model.layers.{i}.post_attention_layernorm.weight"] = _norm_weight(rng, d)
            proj = lin.split(".")[1]
            a = _heavy_tailed(rng, shapes[proj], 0.02 * depth * type_std[proj])
            cols = in_outliers.get(proj, out["hidden"])
            a[:, cols] *= rng.uniform(5.0, 20.0, size=len(cols)).astype(np.float32)
            # Row scales of v/up set the channel scales of o_proj's/down_proj's input: log-normal
            # spread as in trained models (what AWQ exploits), plus a few large channels.
            if proj in ("v_proj", "up_proj"):
                a *= rng.lognormal(0.0, 0.5, size=(a.shape[0], 1)).astype(np.float32)
                a[out["attn" if proj == "v_proj" else "mlp"]] *= 4.0 if proj == "v_proj" else 5.0
            w[f"{layer_name(i, lin)}.weight"] = a
    w["model.norm.weight"] = _norm_weight(rng, d)
    w["lm_head.weight"] = _heavy_tailed(rng, (v, d), 0.02)
    return {k: a.astype(BF16) for k, a in w.items()}


def _rmsnorm(h: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + ARCH["eps"]) * weight


def _causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, seqs: int) -> np.ndarray:
    nh, hd = ARCH["heads"], ARCH["head_dim"]

    def heads(x):  # [seqs*T, nh*hd] -> [seqs, nh, T, hd], contiguous so matmul uses BLAS
        return np.ascontiguousarray(x.reshape(seqs, -1, nh, hd).transpose(0, 2, 1, 3))

    q, k, v = heads(q), heads(k), heads(v)
    t = q.shape[2]
    scores = q @ np.ascontiguousarray(k.transpose(0, 1, 3, 2))
    scores *= np.float32(1 / np.sqrt(hd))
    scores[..., np.triu(np.ones((t, t), bool), 1)] = -np.inf
    scores -= scores.max(-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(-1, keepdims=True)
    return (p @ v).transpose(0, 2, 1, 3).reshape(seqs * t, nh * hd)


def calibration_inputs(weights: dict[str, np.ndarray], seed: int = 0, *,
                       f32: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Inputs of every Linear in a forward pass of ``weights`` over random tokens.

    Parameters
    ----------
    weights
        The reference weights (:func:`synthetic_model`).
    seed
        Seed of the token draw.
    f32
        ``weights`` already converted to float32, if the caller has them.

    Returns
    -------
    dict of str to numpy.ndarray
        Module path -> float32 ``[tokens, in_features]`` (q/k/v share one array, gate/up another).
    """
    rng = np.random.default_rng([seed, 2])
    tokens = rng.integers(0, ARCH["vocab"], size=_CALIB_SEQS * _CALIB_LEN)
    if f32 is None:
        f32 = {k: a.astype(np.float32) for k, a in weights.items()}
    h = f32["model.embed_tokens.weight"][tokens]
    xs: dict[str, np.ndarray] = {}
    for i in range(ARCH["layers"]):
        p = f"model.layers.{i}"
        x = _rmsnorm(h, f32[f"{p}.input_layernorm.weight"])
        for proj in ("q_proj", "k_proj", "v_proj"):
            xs[f"{p}.self_attn.{proj}"] = x
        q, k, v = (x @ f32[f"{p}.self_attn.{n}.weight"].T for n in ("q_proj", "k_proj", "v_proj"))
        a = _causal_attention(q, k, v, _CALIB_SEQS)
        xs[f"{p}.self_attn.o_proj"] = a
        h = h + a @ f32[f"{p}.self_attn.o_proj.weight"].T
        x = _rmsnorm(h, f32[f"{p}.post_attention_layernorm.weight"])
        xs[f"{p}.mlp.gate_proj"] = xs[f"{p}.mlp.up_proj"] = x
        g, u = x @ f32[f"{p}.mlp.gate_proj.weight"].T, x @ f32[f"{p}.mlp.up_proj.weight"].T
        m = g / (1.0 + np.exp(-g)) * u  # SiLU(gate) * up
        xs[f"{p}.mlp.down_proj"] = m
        h = h + m @ f32[f"{p}.mlp.down_proj.weight"].T
    return xs


def hessian(x: np.ndarray) -> np.ndarray:
    """GPTQ's layer Hessian ``H = 2 XᵀX / n`` (float64) of inputs ``x [n, K]``."""
    return (2.0 / x.shape[0]) * (x.T @ x).astype(np.float64)


# -- quantizers ----------------------------------------------------------------------------------

def _round_f16(x: np.ndarray) -> np.ndarray:
    # Scales are stored in fp16; choosing codes with the stored scale keeps decode == what the
    # quantizer assumed (the reference tools run in fp16, so they do the same implicitly).
    return x.astype(np.float16).astype(np.float32)


def rtn_quantize(w: np.ndarray, *, bits: int = 4, group_size: int = 128, sym: bool = False):
    """Round-to-nearest group quantization with min/max scales (AutoAWQ's ``pseudo_quantize``).

    Parameters
    ----------
    w
        Weight ``[N, K]``, K a multiple of ``group_size``.
    bits, group_size
        Code width and group length along K.
    sym
        Symmetric: zero point ``2**(bits-1)`` and scale ``2*absmax / (2**bits - 1)``.

    Returns
    -------
    codes : numpy.ndarray
        ``uint8 [N, K]``.
    scales : numpy.ndarray
        ``float16 [K/G, N]``.
    zeros : numpy.ndarray
        ``int32 [K/G, N]`` true zero points (0 .. 2**bits - 1).
    """
    n, k = w.shape
    maxq = (1 << bits) - 1
    g = np.asarray(w, np.float32).reshape(n, k // group_size, group_size)
    if sym:
        scale = _round_f16(np.maximum(2 * np.abs(g).max(-1), 1e-5) / maxq)
        zero = np.full(scale.shape, (maxq + 1) // 2, np.float32)
    else:
        mn, mx_ = g.min(-1), g.max(-1)
        scale = _round_f16(np.maximum(mx_ - mn, 1e-5) / maxq)
        zero = np.clip(np.rint(-mn / scale), 0, maxq)
    q = np.clip(np.rint(g / scale[..., None]) + zero[..., None], 0, maxq)
    return (q.reshape(n, k).astype(np.uint8), np.ascontiguousarray(scale.T).astype(np.float16),
            np.ascontiguousarray(zero.T).astype(np.int32))


def dequantize(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int,
               g_idx: np.ndarray | None = None) -> np.ndarray:
    """``s*(q-z)`` as float32 ``[N, K]``: what ``formats.gptq.decode``/``formats.awq.decode_gemm`` give.

    The product of an fp16 scale and a small integer is exact in float32; a runtime computing in
    fp16 would round it once more.

    Parameters
    ----------
    codes
        ``uint8 [N, K]``.
    scales, zeros
        ``[groups, N]``.
    group_size
        Group length along K (used when ``g_idx`` is None).
    g_idx
        Group of each input column; None means ``k // group_size``.
    """
    n, k = codes.shape
    s, z = scales.astype(np.float32).T, zeros.astype(np.float32).T
    if g_idx is None:
        q = codes.reshape(n, k // group_size, group_size).astype(np.float32)
        out = ((q - z[..., None]) * s[..., None]).reshape(n, k)
    else:
        gi = np.asarray(g_idx)
        out = (codes.astype(np.float32) - z[:, gi]) * s[:, gi]
    return out


def _fake_quantize(w: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """RTN quantize-dequantize (asymmetric min/max) in float32, for searches that need speed."""
    n, k = w.shape
    maxq = (1 << bits) - 1
    g = w.reshape(n, k // group_size, group_size)
    mn, mx_ = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    scale = _round_f16(np.maximum(mx_ - mn, 1e-5) / maxq)
    zero = np.clip(np.rint(-mn / scale), 0, maxq)
    q = np.rint(g / scale)
    q += zero
    np.clip(q, 0, maxq, out=q)
    q -= zero
    q *= scale
    return q.reshape(n, k)


def _gptq_group_params(block: np.ndarray, maxq: int, sym: bool, min_zero: int):
    """GPTQ's ``Quantizer.find_params`` for one group: ``block`` is ``[G, N]``, one row per column."""
    xmin = np.minimum(block.min(0), 0.0)
    xmax = np.maximum(block.max(0), 0.0)
    if sym:
        xmax = np.maximum(-xmin, xmax)
        xmin = np.where(xmin < 0, -xmax, xmin)
    both = (xmin == 0) & (xmax == 0)
    xmin[both], xmax[both] = -1.0, 1.0
    scale = _round_f16(np.maximum((xmax - xmin) / maxq, 1e-5))
    if sym:
        zero = np.full_like(scale, (maxq + 1) // 2)
    else:
        zero = np.clip(np.rint(-xmin / scale), min_zero, maxq)
    return scale, zero


def gptq_quantize(w: np.ndarray, h: np.ndarray, *, bits: int = 4, group_size: int = 128,
                  sym: bool = True, act_order: bool = False, damp_percent: float = 0.01,
                  block_size: int = 128, min_zero: int = 0):
    """GPTQ (Frantar et al.) as in GPTQModel's ``fasterquant``, in numpy.

    Columns are quantized one at a time; each one's rounding error, scaled by the Cholesky factor
    of ``H⁻¹``, is pushed onto the columns not yet quantized (lazily, a block at a time). A group's
    scale/zero are computed when the group starts, from the weights as updated so far.

    Parameters
    ----------
    w
        Weight ``[N, K]`` (rows may be several Linears sharing an input: rows are independent).
    h
        Hessian ``[K, K]`` (:func:`hessian`).
    bits, group_size, sym
        As in ``quantize_config.json``.
    act_order
        ``desc_act``: process columns by decreasing ``diag(H)``; groups are runs of that order.
    damp_percent
        Dampening added to the diagonal, as a fraction of its mean.
    block_size
        Lazy-update block (GPTQ's 128).
    min_zero
        Lowest zero point allowed (1 for files written as GPTQ v1, which cannot store 0).

    Returns
    -------
    codes : numpy.ndarray
        ``uint8 [N, K]`` in the original column order.
    scales : numpy.ndarray
        ``float16 [K/G, N]``, one row per group (act-order: in processing order).
    zeros : numpy.ndarray
        ``int32 [K/G, N]`` true zero points.
    g_idx : numpy.ndarray
        ``int32 [K]`` group of each original column.
    """
    n, k = w.shape
    maxq = (1 << bits) - 1
    wt = np.array(w, np.float32).T.copy()  # [K, N]: one contiguous row per input column
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    wt[dead] = 0.0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    wt, h = wt[perm], h[np.ix_(perm, perm)]
    h[np.diag_indices(k)] += damp_percent * np.mean(np.diag(h))
    u = _upper_cholesky_of_inverse(h).astype(np.float32)
    inv_d = 1.0 / np.diag(u)
    codes = np.empty((k, n), np.uint8)
    q = np.empty(n, np.float32)
    scales, zeros = [], []
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2].copy()
        err = np.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        # Within GPTQ's block, updates are deferred once more per sub-block of 16 columns: the
        # same arithmetic, but the bulk of it becomes one matrix product instead of 16 outer ones.
        for j1 in range(0, i2 - i1, _SUB_BLOCK):
            j2 = min(j1 + _SUB_BLOCK, i2 - i1)
            for i in range(j1, j2):
                col = i1 + i
                if col % group_size == 0:
                    # GPTQ reads the group from W (updated by earlier blocks), as the reference does.
                    s, z = _gptq_group_params(wt[col:col + group_size], maxq, sym, min_zero)
                    inv_s = 1.0 / s
                    scales.append(s)
                    zeros.append(z)
                # Plain ufuncs with out=: this runs once per column, its overhead adds up.
                x, e = w1[i], err[i]
                np.multiply(x, inv_s, out=q)
                np.rint(q, out=q)
                q += z
                np.maximum(q, 0, out=q)
                np.minimum(q, maxq, out=q)
                codes[col] = q
                q -= z
                q *= s
                np.subtract(x, q, out=e)
                e *= inv_d[col]
                w1[i + 1:j2] -= u1[i, i + 1:j2, None] * e
            w1[j2:] -= u1[j1:j2, j2:].T @ err[j1:j2]
        wt[i2:] -= u[i1:i2, i2:].T @ err
    inv = np.argsort(perm)
    g_idx = (np.arange(k) // group_size)[inv].astype(np.int32)
    return (np.ascontiguousarray(codes[inv].T), np.stack(scales).astype(np.float16),
            np.stack(zeros).astype(np.int32), g_idx)


def _inverse_cholesky(a: np.ndarray) -> np.ndarray:
    """``L⁻¹`` for the lower Cholesky factor ``L`` of ``a``, by recursive halving.

    ``[[A, Bᵀ], [B, C]]``: ``L11 = chol(A)``, ``L21 = B L11⁻ᵀ``, ``L22 = chol(C - L21 L21ᵀ)`` and
    ``L⁻¹ = [[L11⁻¹, 0], [-L22⁻¹ L21 L11⁻¹, L22⁻¹]]``. numpy has no triangular solver; this keeps
    the work in matrix products, about 3x faster than ``cholesky`` + ``inv`` at K = 1536.
    """
    n = a.shape[0]
    if n <= 192:
        return np.linalg.inv(np.linalg.cholesky(a))
    h = n // 2
    l11_inv = _inverse_cholesky(a[:h, :h])
    l21 = a[h:, :h] @ l11_inv.T
    l22_inv = _inverse_cholesky(a[h:, h:] - l21 @ l21.T)
    out = np.zeros_like(a)
    out[:h, :h], out[h:, h:] = l11_inv, l22_inv
    out[h:, :h] = -(l22_inv @ l21) @ l11_inv
    return out


def _upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """Upper ``U`` with ``UᵀU = H⁻¹`` (GPTQ's ``cholesky(cholesky_inverse(cholesky(H)), upper)``).

    With ``J`` the reversal and ``JHJ = MMᵀ`` (lower M): ``H⁻¹ = (JM⁻¹J)ᵀ(JM⁻¹J)`` and ``JM⁻¹J``
    is upper triangular, so no full inverse is needed. float32 is 2x faster than float64 and the
    dampened Hessian is well enough conditioned for it.
    """
    m_inv = _inverse_cholesky(np.ascontiguousarray(h[::-1, ::-1], dtype=np.float32))
    return np.ascontiguousarray(m_inv[::-1, ::-1])


def awq_search_scale(weights: list[np.ndarray], x: np.ndarray, *, bits: int = 4,
                     group_size: int = 128, grid: int = _AWQ_GRID, duo_scaling: bool = True) -> np.ndarray:
    """AWQ's activation-aware scale search (AutoAWQ ``_search_best_scale``).

    For α on ``grid`` points in [0, 1): ``s = mean|x|^α`` (with ``duo_scaling``, AutoAWQ's
    default, divided by ``w_mean^(1-α)``, the mean group-normalised weight magnitude of each
    input channel), normalised by ``sqrt(max·min)``; the α with the smallest
    ``‖Q(W·diag(s))·(X/s)ᵀ − W·Xᵀ‖`` wins. Clipping search is not done.

    Parameters
    ----------
    weights
        The Linears that read ``x`` (``[N_i, K]`` each).
    x
        Their input ``[tokens, K]``.
    duo_scaling
        Include the weight term (without it, α = 0 is plain RTN).

    Returns
    -------
    numpy.ndarray
        float32 ``[K]`` scales (fp16-representable, as AutoAWQ's fp16 model holds them).
    """
    x_mean = np.abs(x).mean(0)
    w_all = np.concatenate(weights).astype(np.float32)
    # Salient channels with large weight columns too (our outlier columns) would be scaled up
    # further by x alone; the weight term is what keeps AWQ from that.
    groups = np.abs(w_all).reshape(w_all.shape[0], -1, group_size)
    w_mean = (groups / (groups.max(-1, keepdims=True) + 1e-6)).reshape(w_all.shape).mean(0)
    w = w_all[::_AWQ_ROW_STEP]
    xs_t = np.ascontiguousarray(x[:_AWQ_TOKENS].T)
    best, best_s = np.inf, np.ones_like(x_mean)
    for r in range(grid):
        a = r / grid
        s = x_mean ** a / (w_mean ** (1 - a) + 1e-4) if duo_scaling else x_mean ** a
        s = np.maximum(s, 1e-4)
        s = _round_f16(s / np.sqrt(s.max() * s.min()))
        # ‖Q(W·diag(s))·(X/s)ᵀ − W·Xᵀ‖ = ‖(Q(W·diag(s))/s − W)·Xᵀ‖: one product per α.
        dw = _fake_quantize(w * s, bits, group_size)
        dw /= s
        dw -= w
        loss = float(np.mean(np.square(dw @ xs_t)))
        if loss < best:
            best, best_s = loss, s
    return best_s


# -- packing --------------------------------------------------------------------------------------

def pack_gptq(codes: np.ndarray, zeros: np.ndarray, *, bits: int = 4, version: int = 1):
    """``(qweight int32 [K*b/32, N], qzeros int32 [groups, N*b/32])`` from codes ``[N, K]``.

    qweight packs along K, qzeros along N (LSB-first); version 1 stores ``z - 1``.
    """
    qweight = pack_bits(codes, bits).T.view(np.int32)
    stored = zeros - 1 if version == 1 else zeros
    if stored.min() < 0:
        raise ValueError("a GPTQ v1 file cannot store a zero point of 0")
    return np.ascontiguousarray(qweight), pack_bits(stored, bits).view(np.int32)


def pack_awq_gemm(codes_kn: np.ndarray) -> np.ndarray:
    """AWQ GEMM words ``int32 [rows, N/8]`` from 4-bit codes ``[rows, N]``.

    Nibble slot i of word c holds column ``8c + ORDER[i]``.
    """
    rows, n = codes_kn.shape
    slots = codes_kn.reshape(rows, n // 8, 8)[:, :, ORDER].reshape(rows, n)
    return pack_bits(slots, 4).view(np.int32)


def mlx_quantize(w_bf16: np.ndarray, *, bits: int, group_size: int = 64):
    """``mx.quantize`` of a bf16 weight: ``(weight uint32, scales bf16, biases bf16)`` as numpy."""
    import mlx.core as mx

    a = mx.array(np.ascontiguousarray(w_bf16).view(np.uint16)).view(mx.bfloat16)
    wq, s, b = mx.quantize(a, group_size=group_size, bits=bits, mode="affine")
    mx.eval(wq, s, b)
    # np.array() cannot take an mx bfloat16 array: go through its uint16 bits.
    return (np.array(wq), np.array(s.view(mx.uint16)).view(BF16), np.array(b.view(mx.uint16)).view(BF16))


def mixed_3_6_bits(path: str, n_layers: int = ARCH["layers"]) -> int:
    """Bits mlx-lm's ``mixed_3_6`` recipe gives module ``path`` (v/down of some layers, lm_head: 6)."""
    parts = path.split(".")
    index = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0
    more = index < n_layers // 8 or index >= 7 * n_layers // 8 or (index - n_layers // 8) % 3 == 2
    if more and ("v_proj" in path or "down_proj" in path):
        return 6
    return 6 if "lm_head" in path else 3


# -- files ----------------------------------------------------------------------------------------

def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write a safetensors file (header padded to 8 bytes; tensors in the given order)."""
    header: dict = {"__metadata__": metadata}
    arrays, off = [], 0
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        header[name] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [off, off + a.nbytes]}
        arrays.append(a)
        off += a.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(hb)) + hb)
        for a in arrays:
            fh.write(a.view(np.uint8).reshape(-1).data if sys.byteorder == "little"
                     else a.astype(a.dtype.newbyteorder("<")).tobytes())


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def llama_config(dtype: str) -> dict:
    """The transformers-style ``config.json`` of the demo model."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": ARCH["hidden"], "intermediate_size": ARCH["intermediate"],
            "num_attention_heads": ARCH["heads"], "num_key_value_heads": ARCH["kv_heads"],
            "head_dim": ARCH["head_dim"], "num_hidden_layers": ARCH["layers"],
            "vocab_size": ARCH["vocab"], "rms_norm_eps": ARCH["eps"], "hidden_act": "silu",
            "max_position_embeddings": 2048, "rope_theta": 10000.0, "attention_bias": False,
            "mlp_bias": False, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
            "initializer_range": 0.02, "torch_dtype": dtype, "dtype": dtype}


def _write_model(folder: Path, tensors: dict, *, fmt: str, config: dict, readme: str,
                 extra: dict[str, dict] | None = None) -> None:
    folder.mkdir()
    write_safetensors(folder / "model.safetensors", tensors, {"format": fmt})
    _write_json(folder / "config.json", config)
    for name, data in (extra or {}).items():
        _write_json(folder / name, data)
    (folder / "README.md").write_text(readme, encoding="utf-8")


def _readme(title: str, algorithm: str, details: str) -> str:
    return (f"# quantscope demo: {title}\n\n"
            f"Made by quantscope's demo builder with a numpy implementation of {algorithm}; "
            "not the reference tool's output.\n\n"
            "The model is a synthetic 4-layer Llama (hidden 512, intermediate 1536, vocab 2048) with "
            "random heavy-tailed weights: it generates nothing meaningful.\n\n" + details + "\n")


# -- variants -------------------------------------------------------------------------------------

#: Linears quantized together because they read the same input (GPTQ rows are independent, so
#: one call over the stacked rows equals separate calls; AWQ searches one scale for the group).
_SHARED_INPUT = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                 ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


class _Context:
    """What every variant builder needs: the reference weights, layer inputs and progress."""

    def __init__(self, seed: int, progress, cancel, total: float) -> None:
        self.seed, self._progress, self._cancel = seed, progress, cancel
        self._done, self._total = 0.0, total
        self.weights: dict[str, np.ndarray] = {}
        self.f32: dict[str, np.ndarray] = {}
        self.inputs: dict[str, np.ndarray] = {}
        self.hessians: dict[str, np.ndarray] = {}
        self.cache: dict[str, dict] = {}

    def check(self) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise Cancelled("demo build cancelled")

    def advance(self, amount: float) -> None:
        """Report ``amount`` more work done, then honour a cancel request (between layers)."""
        self._done += amount
        if self._progress is not None:
            self._progress(min(1.0, self._done / self._total))
        self.check()

    def hessian_of(self, module: str) -> np.ndarray:
        x = self.inputs[module]
        key = str(id(x))  # q/k/v (and gate/up) share one input array, hence one Hessian
        if key not in self.hessians:
            self.hessians[key] = hessian(x)
        return self.hessians[key]


def _dense(ctx: _Context, dtype) -> dict[str, np.ndarray]:
    """The tensors every quantizer leaves unquantized (embeddings, norms, lm_head), cast to dtype."""
    key = f"dense-{np.dtype(dtype).name}"
    if key not in ctx.cache:  # numpy's float16 cast is slow; the GPTQ variants share the result
        ctx.cache[key] = {k: a.astype(dtype) for k, a in ctx.weights.items()
                          if not any(k.endswith(f"{lin}.weight") for lin in LINEARS)}
    return ctx.cache[key]


def _in_order(ctx: _Context, quantized: dict[str, dict[str, np.ndarray]], dense: dict) -> dict:
    """Tensors in checkpoint order: each module's components where its dense weight was."""
    out = {}
    for name in ctx.weights:
        module = name[:-len(".weight")]
        if module in quantized:
            out.update({f"{module}.{c}": a for c, a in quantized[module].items()})
        else:
            out[name] = dense[name]
    return out


def _gptq_variant(ctx: _Context, *, sym: bool, act_order: bool, version: int, rtn: bool = False,
                  step: float = 1.0) -> dict[str, np.ndarray]:
    g = 128
    quantized: dict[str, dict[str, np.ndarray]] = {}
    for i in range(ARCH["layers"]):
        for group in _SHARED_INPUT:
            mods = [layer_name(i, m) for m in group]
            w = np.concatenate([ctx.f32[f"{m}.weight"] for m in mods])
            if rtn:
                codes, scales, zeros = rtn_quantize(w, bits=4, group_size=g, sym=sym)
                g_idx = (np.arange(w.shape[1]) // g).astype(np.int32)
            else:
                # v1 stores z-1, so a true zero point of 0 is stored as -1: per-field "+1" readers
                # decode it as 2**b, GPTQModel only through a word-level borrow (formats.md §3.3).
                # Zeros are clamped to ≥ 1 while quantizing, so every v1 reader agrees.
                codes, scales, zeros, g_idx = gptq_quantize(
                    w, ctx.hessian_of(mods[0]), bits=4, group_size=g, sym=sym, act_order=act_order,
                    min_zero=1 if version == 1 and not sym else 0)
            # Split the stacked rows back into the modules.
            cuts = np.cumsum([ctx.f32[f"{m}.weight"].shape[0] for m in mods])[:-1]
            for m, c, s, z in zip(mods, np.split(codes, cuts), np.split(scales, cuts, axis=1),
                                  np.split(zeros, cuts, axis=1)):
                qweight, qzeros = pack_gptq(c, z, bits=4, version=version)
                quantized[m] = {"qweight": qweight, "qzeros": qzeros,
                                "scales": np.ascontiguousarray(s), "g_idx": g_idx}
        ctx.advance(step)
    return _in_order(ctx, quantized, _dense(ctx, np.float16))


def _gptq_config(*, sym: bool, desc_act: bool, version: int, quantizer: str) -> dict:
    return {"bits": 4, "group_size": 128, "desc_act": desc_act, "sym": sym, "static_groups": False,
            "lm_head": False, "true_sequential": True, "damp_percent": 0.01,
            "checkpoint_format": "gptq" if version == 1 else "gptq_v2", "quant_method": "gptq",
            "pack_dtype": "int32", "meta": {"quantizer": [quantizer]}}


def _awq_variant(ctx: _Context, step: float = 1.0):
    """AWQ: search a scale per shared-input group, fold it like AutoAWQ, then quantize (GEMM)."""
    g = 128
    w = dict(ctx.f32)  # entries are replaced, never modified in place
    smoothing: dict[str, np.ndarray] = {}
    quantized: dict[str, dict[str, np.ndarray]] = {}
    for i in range(ARCH["layers"]):
        p = f"model.layers.{i}"
        # AutoAWQ searches every group of a layer on the unscaled weights and inputs first ...
        s = {grp: awq_search_scale([w[f"{p}.{m}.weight"] for m in grp], ctx.inputs[f"{p}.{grp[0]}"],
                                   group_size=g) for grp in _SHARED_INPUT}
        qkv, o, gate_up, down = (s[grp] for grp in _SHARED_INPUT)
        # ... then applies them in order: the preceding op is divided by s, the Linears' input
        # columns multiplied by s (folded norms are stored fp16, the Linears are quantized).
        folds = [(f"{p}.input_layernorm.weight", qkv, _SHARED_INPUT[0]),
                 (f"{p}.self_attn.v_proj.weight", o, _SHARED_INPUT[1]),
                 (f"{p}.post_attention_layernorm.weight", gate_up, _SHARED_INPUT[2]),
                 (f"{p}.mlp.up_proj.weight", down, _SHARED_INPUT[3])]
        for prev, sc, grp in folds:
            w[prev] = w[prev] / (sc if w[prev].ndim == 1 else sc[:, None])
            if w[prev].ndim == 1:
                w[prev] = _round_f16(w[prev])
            for m in grp:
                w[f"{p}.{m}.weight"] = w[f"{p}.{m}.weight"] * sc
                smoothing[f"{p}.{m}"] = sc
        for m in LINEARS:
            codes, scales, zeros = rtn_quantize(w[f"{p}.{m}.weight"], bits=4, group_size=g)
            quantized[f"{p}.{m}"] = {"qweight": pack_awq_gemm(np.ascontiguousarray(codes.T)),
                                     "qzeros": pack_awq_gemm(zeros), "scales": scales}
        ctx.advance(step)
    dense = {k: w[k].astype(np.float16) for k in _dense(ctx, np.float16)}  # with the folded norms
    return _in_order(ctx, quantized, dense), smoothing


def _mlx_variant(ctx: _Context, bits_of: Callable[[str], int], step: float = 1.0):
    """mlx-lm style: every Linear, the embeddings and lm_head through ``mx.quantize``."""
    quantized: dict[str, dict[str, np.ndarray]] = {}
    per_module: dict[str, int] = {}
    for name, a in ctx.weights.items():
        if a.ndim != 2:
            continue
        module = name[:-len(".weight")]
        per_module[module] = bits_of(module)
        wq, s, b = mlx_quantize(a, bits=per_module[module], group_size=64)
        quantized[module] = {"weight": wq, "scales": s, "biases": b}
        if module.endswith("down_proj"):
            ctx.advance(step)
    return _in_order(ctx, quantized, ctx.weights), per_module


def _mlx_config(global_bits: int, per_module: dict[str, int] | None) -> dict:
    q: dict = {"group_size": 64, "bits": global_bits, "mode": "affine"}
    for module, bits in (per_module or {}).items():
        # mlx-lm records a predicate's answer for every module it quantized.
        q[module] = {"group_size": 64, "bits": bits, "mode": "affine"}
    return {**llama_config("bfloat16"), "quantization": q, "quantization_config": dict(q)}


# -- the build ------------------------------------------------------------------------------------

# Relative cost of each stage (measured), so progress moves evenly.
_COST = {"model": 5.0, "calib": 3.0, "write": 0.3, "gptq": 4.5, "rtn": 0.3, "awq": 2.0, "mlx": 0.4}


def _total_cost() -> float:
    per_layer = 2 * _COST["gptq"] + _COST["rtn"] + _COST["awq"] + 2 * _COST["mlx"]
    return _COST["model"] + _COST["calib"] + ARCH["layers"] * per_layer + (1 + len(VARIANTS)) * _COST["write"]


def _build_into(root: Path, ctx: _Context) -> dict:
    """Write the whole workspace into ``root``; returns its manifest."""
    ctx.check()
    ctx.weights = synthetic_model(ctx.seed)
    ctx.f32 = {k: a.astype(np.float32) for k, a in ctx.weights.items()}
    ctx.advance(_COST["model"])
    ctx.inputs = calibration_inputs(ctx.weights, ctx.seed, f32=ctx.f32)
    ctx.advance(_COST["calib"])
    write = _COST["write"]

    _write_model(root / "reference", ctx.weights, fmt="pt", config=llama_config("bfloat16"),
                 readme=_readme("dense reference", "a seeded synthetic Llama",
                                "Dense bf16 weights: the reference every variant here is compared to."))
    ctx.advance(write)

    gptq_specs = [("gptq-w4g128", dict(sym=True, act_order=False, version=1), "GPTQ",
                   "GPTQ 4-bit, group 128, symmetric, no act-order, GPTQ v1 layout (qzeros hold z-1).\n\n"
                   "Its weight error (what compare plots) is larger than rtn-w4g128's, by design: GPTQ "
                   "minimises the layer's output error on calibration inputs and moves weight error into "
                   "directions they rarely excite, and it is symmetric here where that baseline is "
                   "asymmetric. On the layer outputs for the calibration inputs its error is lower than "
                   "round-to-nearest's on the same grid."),
                  ("gptq-w4g128-actorder", dict(sym=False, act_order=True, version=1), "GPTQ with act-order",
                   "GPTQ 4-bit, group 128, asymmetric, desc_act (non-monotonic g_idx), v1 layout; "
                   "zero points are clamped to ≥ 1 because v1 stores z-1 and cannot hold 0."),
                  ("rtn-w4g128", dict(sym=False, act_order=False, version=2, rtn=True),
                   "round-to-nearest (min/max) quantization",
                   "RTN 4-bit, group 128, asymmetric min/max, in the GPTQ v2 layout "
                   "(checkpoint_format gptq_v2: zeros stored as-is) - a baseline for GPTQ and AWQ.")]
    for folder, spec, algo, details in gptq_specs:
        rtn = spec.get("rtn", False)
        tensors = _gptq_variant(ctx, **spec, step=_COST["rtn" if rtn else "gptq"])
        qc = _gptq_config(sym=spec["sym"], desc_act=spec["act_order"], version=spec["version"],
                          quantizer="quantscope-demo-rtn" if rtn else "quantscope-demo")
        _write_model(root / folder, tensors, fmt="pt",
                     config={**llama_config("float16"), "quantization_config": qc},
                     readme=_readme(folder, algo, details), extra={"quantize_config.json": qc})
        ctx.advance(write)

    tensors, smoothing = _awq_variant(ctx, step=_COST["awq"])
    awq_qc = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
              "version": "gemm", "modules_to_not_convert": None}
    _write_model(root / "awq-w4g128", tensors, fmt="pt",
                 config={**llama_config("float16"), "quantization_config": awq_qc},
                 readme=_readme("awq-w4g128", "AWQ (activation-aware scale search, no clipping search)",
                                "AWQ GEMM 4-bit, group 128, zero_point. The per-channel scales s are folded "
                                "as AutoAWQ does: input_layernorm /= s (q/k/v), v_proj rows /= s (o_proj), "
                                "post_attention_layernorm /= s (gate/up), up_proj rows /= s (down_proj). "
                                f"The true s are in ../{AWQ_SMOOTHING_FILE}."),
                 extra={"quant_config.json": {"zero_point": True, "q_group_size": 128, "w_bit": 4,
                                              "version": "GEMM", "modules_to_not_convert": None}})
    (root / AWQ_SMOOTHING_FILE).parent.mkdir(exist_ok=True)
    write_safetensors(root / AWQ_SMOOTHING_FILE, {f"{k}.smooth": v for k, v in smoothing.items()},
                      {"format": "pt", "what": "AWQ input-channel scales s of awq-w4g128 per Linear"})
    ctx.advance(write)

    tensors, _ = _mlx_variant(ctx, lambda m: 4, step=_COST["mlx"])
    _write_model(root / "mlx-affine-q4g64", tensors, fmt="mlx", config=_mlx_config(4, None),
                 readme=_readme("mlx-affine-q4g64", "mlx-lm's convert -q (mx.quantize itself)",
                                "MLX affine 4-bit, group 64: every Linear, the embeddings and lm_head."))
    ctx.advance(write)
    tensors, per_module = _mlx_variant(ctx, mixed_3_6_bits, step=_COST["mlx"])
    _write_model(root / "mlx-mixed-3-6", tensors, fmt="mlx", config=_mlx_config(3, per_module),
                 readme=_readme("mlx-mixed-3-6", "mlx-lm's mixed_3_6 recipe (mx.quantize itself)",
                                "MLX affine group 64: 6 bits for lm_head and for v_proj/down_proj of "
                                "layers 2 and 3, 3 bits elsewhere (embeddings included)."))
    ctx.advance(write)

    files = {str(q.relative_to(root)).replace(os.sep, "/"): q.stat().st_size
             for q in sorted(root.rglob("*")) if q.is_file()}
    return {"version": DEMO_VERSION, "seed": ctx.seed, "reference": "reference",
            "variants": [[v, v] for v in VARIANTS], "awq_smoothing": AWQ_SMOOTHING_FILE, "files": files}


def _workspace(root: Path, manifest: dict) -> DemoWorkspace:
    return DemoWorkspace(root=root, reference=root / manifest["reference"],
                         variants={label: root / folder for label, folder in manifest["variants"]})


def build_demo(dest: Path, *, seed: int = 0, progress: Callable[[float], None] | None = None,
               cancel=None) -> DemoWorkspace:
    """Build the demo workspace into ``dest`` (``quantscope demo DIR``).

    The build is written into a temporary folder beside ``dest`` and renamed into place only when
    complete, so an interrupted or failed build leaves nothing at ``dest``.

    Parameters
    ----------
    dest
        A new or empty folder.
    seed
        Seed of the model, the calibration tokens and everything derived; the same seed gives
        byte-identical files.
    progress
        Called with the fraction done, 0..1.
    cancel
        Object with ``is_set()`` (e.g. ``threading.Event``), checked between layers.

    Returns
    -------
    DemoWorkspace

    Raises
    ------
    CheckpointError
        ``dest`` exists and is not an empty folder.
    Cancelled
        ``cancel`` was set.
    """
    dest = Path(dest).expanduser()
    if dest.is_dir() and not dest.is_symlink():
        # a build killed in this folder left its hidden build folder (named with its process id):
        # the folder counts as empty; a build still running there keeps it, and this one is refused
        from .convert import _pid_alive
        for e in dest.iterdir():
            pid = e.name[len(".building-"):].split("-", 1)[0] if e.name.startswith(".building-") else ""
            if pid.isdigit() and not _pid_alive(int(pid)) and e.is_dir() and not e.is_symlink():
                shutil.rmtree(e, ignore_errors=True)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        what = "is a folder that is not empty" if dest.is_dir() else "is a file"
        raise CheckpointError(f"{what}; the demo workspace needs a new or empty folder", file=dest,
                              rule="demo.dest-exists")
    # An existing empty folder is kept (its permissions, owner, a mount point) and filled: the
    # build is made in a hidden folder inside it and its entries moved out, the manifest (which
    # marks a complete workspace) last. A new one is built beside it and renamed into place.
    keep = dest.is_dir()
    where = dest if keep else dest.parent
    try:  # a refusal names the folder written into, not the hidden one
        where.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".building-{os.getpid()}-" if keep else f".{dest.name}.building-",
                                    dir=where))
    except OSError as exc:
        raise CheckpointError(f"cannot write into {where} ({exc.strerror or exc})", file=dest,
                              rule="demo.dest-exists") from None
    moved: list[Path] = []
    try:
        ctx = _Context(seed, progress, cancel, _total_cost())
        with single_threaded_blas():
            manifest = _build_into(tmp, ctx)
        _write_json(tmp / MANIFEST, manifest)
        if keep:
            for entry in sorted(tmp.iterdir(), key=lambda e: e.name == MANIFEST):
                os.rename(entry, dest / entry.name)
                moved.append(dest / entry.name)
            tmp.rmdir()
        else:
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
            try:
                os.rename(tmp, dest)
            except OSError as exc:  # another build got there first
                raise CheckpointError(f"could not move the finished build into place ({exc})", file=dest,
                                      rule="demo.dest-exists") from None
    except BaseException:
        for m in moved:  # (the folder left as it was found: empty)
            shutil.rmtree(m, ignore_errors=True) if m.is_dir() else m.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress is not None:
        progress(1.0)
    return _workspace(dest, manifest)


def load_demo_workspace(root: Path, any_version: bool = False) -> DemoWorkspace | None:
    """The workspace at ``root`` if it is a complete build of this version (``any_version``: of
    any version, as a folder ``quantscope demo DIR`` wrote before is opened), else None."""
    root = Path(root)
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("version") != DEMO_VERSION and not any_version:
            return None
        for rel, size in manifest["files"].items():
            if (root / rel).stat().st_size != size:
                return None
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None
    return _workspace(root, manifest)


def default_cache_dir() -> Path:
    """quantscope's per-user cache: ``$QUANTSCOPE_CACHE``, else the platform's cache folder."""
    env = os.environ.get("QUANTSCOPE_CACHE")
    if env:
        return Path(env).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "quantscope"
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "quantscope" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "quantscope"
    return Path.home() / ".cache" / "quantscope"


def demo_workspace(cache_dir: Path | None = None, *, progress: Callable[[float], None] | None = None,
                   cancel=None) -> DemoWorkspace:
    """The demo workspace in the per-user cache, built there on first use.

    Parameters
    ----------
    cache_dir
        Cache root (default :func:`default_cache_dir`); the workspace is ``cache_dir/demo-v2``.
    progress, cancel
        As for :func:`build_demo` (used only when it has to be built).

    Returns
    -------
    DemoWorkspace
    """
    dest = Path(cache_dir).expanduser() / DEMO_VERSION if cache_dir is not None else \
        default_cache_dir() / DEMO_VERSION
    ws = load_demo_workspace(dest)
    if ws is not None:
        return ws
    if dest.exists():
        if not (dest / MANIFEST).is_file() and dest.is_dir() and any(dest.iterdir()):
            raise CheckpointError("is not a quantscope demo workspace (no demo.json); move it away so the "
                                  "demo can be built there", file=dest, rule="demo.dest-exists")
        # An earlier build of ours, damaged or of another version: replace it.
        shutil.rmtree(dest) if dest.is_dir() else dest.unlink()
    try:
        return build_demo(dest, progress=progress, cancel=cancel)
    except CheckpointError:
        ws = load_demo_workspace(dest)  # a concurrent build finished first
        if ws is None:
            raise
        return ws
