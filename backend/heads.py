"""Attention heads of a layer: which output rows (q/k/v projections) or input columns (the
output projection) belong to each head, read from the model's config.json.

A researcher asks not only how much a quantization hurt ``q_proj`` but which heads: a head whose
rows share one outlier-stretched scale can lose far more than its neighbours. The layer's weights
say nothing of heads; the config does (``num_attention_heads``, ``num_key_value_heads``,
``head_dim`` and the MLA widths). A layer is split only where its size is a whole number of heads
of a width the config names, so a layer the rules do not fit (another attention's fused layout,
a linear attention) gets no heads rather than wrong ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

#: Output rows per head: the query, key and value projections (MLA's ``q_b_proj`` and
#: ``kv_b_proj`` included: their rows are per head, each head's key and value rows together).
_ROWS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "q_b_proj": "q", "kv_b_proj": "kv"}
#: Input columns per head: the output projection (a vision tower's ``out_proj``).
_COLUMNS = {"o_proj": "o", "out_proj": "o"}
#: Fused projections stored as the rows of q, then k, then v (Phi-3's ``qkv_proj``).
_FUSED = {"qkv_proj"}
#: Attention modules whose heads these rules do not describe: linear attention (Qwen3-Next's
#: gated delta net, MiniMax), whose projections are fused in their own orders.
_OTHER = re.compile(r"linear_att|lightning_att")
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)


@dataclass(frozen=True)
class HeadLayout:
    """How a layer's rows or columns fall into heads.

    Attributes
    ----------
    axis
        ``"rows"`` (output rows: q/k/v) or ``"columns"`` (input columns: the output projection).
    sections
        ``(prefix, heads, width)`` in storage order: ``(("q", 32, 128),)`` for a ``q_proj``,
        ``(("q", 32, 128), ("k", 8, 128), ("v", 8, 128))`` for a fused ``qkv_proj``.
    source
        Where the counts come from, as a person reads it (the config keys and their values).
    """

    axis: str
    sections: tuple[tuple[str, int, int], ...]
    source: str

    @property
    def n(self) -> int:
        return sum(h for _, h, _ in self.sections)

    def labels(self) -> list[str]:
        """One name per head: ``q0``, ``q1``, …, ``k0``, …"""
        return [f"{p}{i}" for p, h, _ in self.sections for i in range(h)]

    def index(self) -> np.ndarray:
        """The head of each row (or column) of the layer, int64."""
        widths = [w for _, h, w in self.sections for _ in range(h)]
        return np.repeat(np.arange(len(widths), dtype=np.int64), widths)

    @property
    def size(self) -> int:
        """The rows (or columns) the heads cover: the layer's whole dimension."""
        return sum(h * w for _, h, w in self.sections)


def _int(c: dict, *keys) -> int | None:
    for k in keys:
        v = c.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _config_for(cfg: dict, path: str) -> dict | None:
    """The part of config.json that describes the model ``path`` belongs to: a vision or audio
    tower's own ``vision_config`` / ``audio_config``, else the text model's (``text_config`` of
    a multimodal wrapper, or the whole config)."""
    low = path.lower()
    for marks, key in ((("vision", "visual", "image"), "vision_config"), (("audio",), "audio_config")):
        if any(m in low for m in marks):
            sub = cfg.get(key)
            return sub if isinstance(sub, dict) else None
    text = cfg.get("text_config")
    return text if isinstance(text, dict) else cfg


def head_layout(cfg: dict | None, path: str, shape) -> HeadLayout | None:
    """The heads of layer ``path`` (a module path) of logical ``shape`` ``[out, in]``, from
    config.json ``cfg``; None where the layer is no attention projection these rules know, or its
    size is no whole number of heads of a width the config names."""
    if not isinstance(cfg, dict) or shape is None or len(shape) != 2:
        return None
    parent, _, leaf = path.rpartition(".")
    if not _ATTENTION.search(parent) or _OTHER.search(parent):
        return None
    c = _config_for(cfg, path)
    if c is None:
        return None
    h = _int(c, "num_attention_heads", "num_heads", "n_head", "n_heads")
    if h is None:
        return None
    kvs = [v for k, v in c.items() if re.fullmatch(r"num_(\w+_)?key_value_heads|num_kv_heads|n_head_kv|"
                                                   r"multi_query_group_num", k)
           and isinstance(v, int) and not isinstance(v, bool) and v > 0]
    kv = _int(c, "num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num") or h
    hidden = _int(c, "hidden_size", "d_model", "n_embd")
    hd = _int(c, "head_dim") or (hidden // h if hidden and hidden % h == 0 else None)
    nope, rope, vd = (_int(c, k) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    widths = {w for w in (hd, _int(c, "global_head_dim"), hidden // h if hidden and hidden % h == 0 else None,
                          nope + rope if nope and rope else None, vd, nope + vd if nope and vd else None) if w}
    said = {"num_attention_heads": h, "num_key_value_heads": kv, "head_dim": hd}
    src = "config.json: " + ", ".join(f"{k} {v}" for k, v in said.items() if v is not None)
    out, inp = int(shape[0]), int(shape[1])
    if leaf in _FUSED:
        if hd and out == (h + 2 * kv) * hd:
            return HeadLayout("rows", (("q", h, hd), ("k", kv, hd), ("v", kv, hd)), src)
        return None
    if leaf in _ROWS:
        axis, n, prefix = "rows", out, _ROWS[leaf]
        counts = [kv, *kvs, h] if prefix in ("k", "v") else [h]
    elif leaf in _COLUMNS:
        axis, n, prefix, counts = "columns", inp, "h", [h]
    else:
        return None
    for count in counts:
        if n % count == 0 and n // count in widths:
            return HeadLayout(axis, ((prefix, count, n // count),), src)
    return None


def head_sums(num: np.ndarray, den: np.ndarray, index: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per head ``(Σ (Ŵ − W)², Σ W²)`` in float64 from sums over the rows (or columns) of a
    layer: ``num`` / ``den`` hold one sum per row (column), ``index`` its head."""
    return (np.bincount(index, weights=num, minlength=n)[:n], np.bincount(index, weights=den, minlength=n)[:n])


def rel_error(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """sqrt(num / den) per head: a head of no weight is inf for any error, 0 for none."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, np.sqrt(num / den), np.where(num > 0, np.inf, num))
