"""Multipliers a converter folds into the weights where the original model applies them at run
time: Falcon-H1's muP multipliers, which mlx-lm's conversion (its falcon_h1 ``sanitize``, mlx-lm
0.32) multiplies into embed_tokens, lm_head, q_proj, k_proj, o_proj, the Mamba mixer's in_proj
and out_proj, gate_proj and down_proj, and which transformers applies in ``forward``.

compare divides them out of the folded side (or multiplies them into the other), so that a
layer's error is the quantization's; convert folds them as mlx-lm does, so that mlx-lm loads the
output (its sanitize, seeing a file in transformers' layout, would multiply the packed integers).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

#: Per weight, the first of these whose name ends the module path, and its multiplier (a key, or a
#: key and an index). Not v_proj or up_proj, and not key_multiplier: mlx-lm's branch for it names
#: a tensor no checkpoint has (its runtime does not apply it either).
FALCON_FOLDS = (("embed_tokens", "embedding_multiplier"), ("lm_head", "lm_head_multiplier"),
                ("q_proj", "attention_in_multiplier"), ("k_proj", "attention_in_multiplier"),
                ("o_proj", "attention_out_multiplier"), ("out_proj", "ssm_out_multiplier"),
                ("gate_proj", ("mlp_multipliers", 0)), ("down_proj", ("mlp_multipliers", 1)))
#: What mlx-lm folds where config.json lacks a key (its ModelArgs' defaults: Falcon-H1-0.5B's
#: values; transformers' own defaults are 1).
FALCON_DEFAULTS = {"embedding_multiplier": 5.656854249492381, "lm_head_multiplier": 0.0390625,
                   "attention_in_multiplier": 1.0, "attention_out_multiplier": 0.9375,
                   "ssm_in_multiplier": 1.25, "ssm_out_multiplier": 0.23570226039551587,
                   "mlp_multipliers": [0.8838834764831844, 0.5859375],
                   "ssm_multipliers": [0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738],
                   "mamba_d_ssm": 1536, "mamba_n_groups": 1, "mamba_d_state": 128, "mamba_n_heads": 24}
_ROUND_TO = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32}


def falcon_folded(model) -> bool | None:
    """Whether a Falcon-H1 checkpoint holds its weights as mlx-lm's conversion writes them
    (multipliers folded), told as mlx-lm's sanitize tells it: its first Mamba conv1d stored
    ``[C, k, 1]`` rather than transformers' ``[C, 1, k]``. None where it has none."""
    conv = [lay.tensors["weight"].shape for p, lay in model.layers.items()
            if p.endswith("mamba.conv1d") and "weight" in lay.tensors]
    conv = [c for c in conv if c is not None and len(c) == 3]
    if not conv:
        return None
    return conv[0][-1] <= conv[0][1]


def falcon_config(model) -> dict:
    """The multipliers and Mamba sizes mlx-lm reads from ``model``'s config.json (its defaults for
    a missing key)."""
    cfg = dict(FALCON_DEFAULTS)
    cfg.update({k: v for k, v in (model.ckpt.configs.get("config.json") or {}).items() if v is not None})
    return cfg


def _value(cfg: dict, key) -> float | None:
    k, i = key if isinstance(key, tuple) else (key, None)
    v = cfg.get(k)
    try:
        return float(v if i is None else v[i])
    except (TypeError, ValueError, IndexError, KeyError):
        return None


def falcon_factors(model, path: str, rows: int, dtype: str = "BF16") -> tuple[np.ndarray, str] | None:
    """(the factor mlx-lm multiplies each of module ``path``'s ``rows`` rows by, what it is) for
    a Falcon-H1 ``model`` (the config read: the folded side's, or the source's), or None where
    it multiplies none (or by 1). Each factor is the config's value rounded to ``dtype`` (the
    weights' own: mlx multiplies a bf16 array by a Python float in bf16, so 1/(2√2) is
    0.353515625 there); in_proj's, the product of two such, rounded again."""
    cfg = falcon_config(model)
    if path.endswith("in_proj"):
        f, what = _falcon_in_proj(cfg, _ROUND_TO.get(dtype, ml_dtypes.bfloat16), rows), \
            "ssm_in_multiplier*ssm_multipliers"
    else:
        key = next((k for leaf, k in FALCON_FOLDS if path.endswith(leaf)), None)
        if key == "lm_head_multiplier" and not any(p.endswith("lm_head") for p in model.layers):
            key = "embedding_multiplier"  # tied: the head is the embeddings, folded as such
        v = None if key is None else _value(cfg, key)
        f = None if v is None else np.full(rows, float(_ROUND_TO.get(dtype, ml_dtypes.bfloat16)(v)))
        what = key if isinstance(key, str) else f"{key[0]}[{key[1]}]" if key else ""
    if f is None or not np.all(np.isfinite(f)) or np.any(f == 0) or np.all(f == 1):
        return None
    return f, what


def _falcon_in_proj(cfg: dict, rnd, n_rows: int) -> np.ndarray | None:
    """mlx-lm's factor for each row of Falcon-H1's mamba.in_proj: ssm_in_multiplier times the
    ssm_multipliers over its z, x, B, C and dt rows (d_ssm, d_ssm, groups·d_state twice, heads),
    each rounded to the dtype, then their product; None where the rows do not add up."""
    try:
        d, g, h = (int(cfg[k]) for k in ("mamba_d_ssm", "mamba_n_groups", "mamba_n_heads"))
        gs = g * int(cfg["mamba_d_state"])
        mults = [float(m) for m in cfg["ssm_multipliers"]]
    except (TypeError, ValueError, KeyError):
        return None
    sizes = [d, d, gs, gs, h]
    ssm_in = _value(cfg, "ssm_in_multiplier")
    if len(mults) != 5 or sum(sizes) != n_rows or ssm_in is None:
        return None
    return np.concatenate([np.full(n, float(rnd(np.float32(rnd(ssm_in)) * np.float32(rnd(m))))) for n, m in
                           zip(sizes, mults)])


def fold(a: np.ndarray, f: np.ndarray) -> np.ndarray:
    """``a`` (rows ``[..., N, K]`` of one layer, its own float dtype) with row ``i`` multiplied by
    ``f[i]`` as mlx-lm multiplies: the exact product in float32, rounded to ``a``'s dtype."""
    f32 = np.asarray(f, np.float32)
    out = np.asarray(a).astype(np.float32) * f32.reshape((-1, 1))
    return out.astype(np.asarray(a).dtype)
