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

import math
import re
from dataclasses import dataclass

import numpy as np

#: Output rows per head: the query, key and value projections (MLA's ``q_b_proj`` and
#: ``kv_b_proj`` included: their rows are per head, each head's key and value rows together).
_ROWS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "q_b_proj": "q", "kv_b_proj": "kv"}
#: Input columns per head: the output projection (a vision tower's ``out_proj``; Qwen-VL's
#: ``attn.proj``).
_COLUMNS = {"o_proj", "out_proj"}
#: Fused projections stored as the rows of q, then k, then v (Phi-3's ``qkv_proj``, Qwen-VL's
#: vision ``attn.qkv``).
_FUSED = {"qkv_proj"}
#: Attention modules whose heads these rules do not describe: linear attention (Qwen3-Next's
#: gated delta net, MiniMax), whose projections are fused in their own orders.
_OTHER = re.compile(r"linear_att|lightning_att")
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_LAYER = re.compile(r"layers\.(\d+)\.")


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
    #: Query heads per key/value head (grouped-query attention's q_proj, and the q heads of a
    #: fused qkv_proj), else 0.
    group: int = 0

    @property
    def n(self) -> int:
        return sum(h for _, h, _ in self.sections)

    def labels(self) -> list[str]:
        """One name per head: ``q0``, ``q1``, …, ``k0``, … (numbered across sections of one kind:
        Hunyuan's q0 q1 k0 v0 q2 q3 k1 v1)."""
        seen: dict[str, int] = {}
        out = []
        for p, h, _ in self.sections:
            i = seen.get(p, 0)
            out += [f"{p}{i + j}" for j in range(h)]
            seen[p] = i + h
        return out

    def index(self) -> np.ndarray:
        """The head of each row (or column) of the layer, int64."""
        widths = [w for _, h, w in self.sections for _ in range(h)]
        return np.repeat(np.arange(len(widths), dtype=np.int64), widths)

    @property
    def size(self) -> int:
        """The rows (or columns) the heads cover: the layer's whole dimension."""
        return sum(h * w for _, h, w in self.sections)


def _int(c: dict, *keys) -> tuple[int, str] | tuple[None, None]:
    """The first of ``keys`` ``c`` gives a positive integer for, and that key."""
    for k in keys:
        v = c.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v, k
    return None, None


_SIDE = re.compile(r"(?:^|\.)(encoder|decoder)\.")


def _head_count(c: dict, path: str) -> tuple[int, str] | tuple[None, None]:
    """The query heads of the part of the model ``path`` is in: ``num_attention_heads`` (or the
    other names of it), else an encoder-decoder's own count for its side (Whisper's, BART's
    ``encoder_attention_heads`` / ``decoder_attention_heads``; a decoder's cross-attention takes
    the decoder's)."""
    h, key = _int(c, "num_attention_heads", "num_heads", "n_head", "n_heads")
    if h is None:
        m = _SIDE.search(path)
        if m is not None:
            h, key = _int(c, f"{m.group(1)}_attention_heads")
    return h, key


def _config_for(cfg: dict, path: str) -> tuple[dict | None, str]:
    """The part of config.json that describes the model ``path`` belongs to, and where it is: a
    vision or audio tower's own ``vision_config`` / ``audio_config``, else the text model's
    (``text_config`` of a multimodal wrapper, or the whole config)."""
    low = path.lower()
    for marks, key in ((("vision", "visual", "image"), "vision_config"), (("audio",), "audio_config")):
        if any(m in low for m in marks):
            sub = cfg.get(key)
            return (sub, key) if isinstance(sub, dict) else (None, key)
    text = cfg.get("text_config")
    return (text, "text_config") if isinstance(text, dict) else (cfg, "")


def head_layout(cfg: dict | None, path: str, shape) -> HeadLayout | None:
    """The heads of layer ``path`` (a module path) of logical ``shape`` ``[out, in]``, from
    config.json ``cfg``; None where the layer is no attention projection these rules know, or its
    size is no whole number of heads of a width the config names.

    The counts and widths tried, in order: a layer's own kind first where ``layer_types`` names
    it (Gemma's full-attention layers: ``num_global_key_value_heads`` of ``global_head_dim``;
    sliding ones: ``num_key_value_heads`` of ``head_dim``), then ``hidden_size`` /
    ``num_attention_heads``, MLA's widths (``qk_nope_head_dim + qk_rope_head_dim`` for queries,
    ``qk_nope_head_dim + v_head_dim`` for kv_b_proj, ``v_head_dim`` for o_proj) and a gated
    query's two head widths (Qwen3.5 / Qwen3-Next: each head's query rows, then its gate's)."""
    if not isinstance(cfg, dict) or shape is None or len(shape) != 2:
        return None
    parent, _, leaf = path.rpartition(".")
    if leaf == "linear" and parent.rpartition(".")[2] in {*_ROWS, *_COLUMNS, *_FUSED}:
        parent, _, leaf = parent.rpartition(".")  # (Gemma's vision tower wraps its projections)
    # (Nemotron-H keeps its attention layers' q/k/v/o under ``mixer``, as its Mamba layers' in/out)
    if (not _ATTENTION.search(parent) and not (parent.endswith("mixer") and leaf in {*_ROWS, "o_proj"})) \
            or _OTHER.search(parent):
        return None
    at_attn = _ATTENTION.search(parent.rpartition(".")[2]) is not None  # (Qwen-VL's ``attn.qkv`` / ``attn.proj``)
    c, where = _config_for(cfg, path)
    if c is None:
        return None
    h, h_key = _head_count(c, path)
    if h is None:
        return None
    hidden, hidden_key = _int(c, "hidden_size", "d_model", "n_embd")
    hd, hd_key = _int(c, "head_dim")
    ghd, _ = _int(c, "global_head_dim")
    kv, kv_key = _int(c, "num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num")
    gkv, _ = _int(c, "num_global_key_value_heads")
    nope, _ = _int(c, "qk_nope_head_dim")
    rope, _ = _int(c, "qk_rope_head_dim")
    vd, _ = _int(c, "v_head_dim")
    # the layer's kind, where layer_types names it: its own head width and key/value count first
    m = _LAYER.search(path)
    kinds = c.get("layer_types")
    full = None
    if m and isinstance(kinds, list) and int(m.group(1)) < len(kinds):
        full = "full" in str(kinds[int(m.group(1))]) or "global" in str(kinds[int(m.group(1))])
    dims = [(hd, hd_key or "")] if hd else []
    if ghd:
        dims.insert(0 if full else len(dims), (ghd, "global_head_dim"))
    if hidden and hidden % h == 0:
        dims.append((hidden // h, f"{hidden_key} {hidden} / {h_key}"))
    # (Qwen2-VL's vision_config: its hidden_size is the language model's, the tower's width embed_dim)
    emb, _ = _int(c, "embed_dim")
    if emb and emb != hidden and emb % h == 0:
        dims.append((emb // h, f"embed_dim {emb} / {h_key}"))
    kvs = [(kv, kv_key)] if kv else []
    if gkv:
        kvs.insert(0 if full else len(kvs), (gkv, "num_global_key_value_heads"))
    heads_q = [(h, h_key)]
    out, inp = int(shape[0]), int(shape[1])
    pre = f"config.json{' ' + where if where else ''}: "

    def said(count, ck, width, wk):
        return f"{pre}{ck} {count} × {wk} {width}" if wk and " / " not in wk else \
            f"{pre}{ck} {count} × {width} ({wk})" if wk else f"{pre}{ck} {count} × {width}"

    if leaf in _FUSED and cfg.get("model_type") == "hunyuan" and kvs and h % kvs[0][0] == 0:
        # Hunyuan's original checkpoints: the rows by key/value group (its query heads, its key
        # head, its value head), as mlx-lm's sanitize splits them
        k, kk = kvs[0]
        g = h // k
        for (w, wk) in dims:
            if out == (h + 2 * k) * w:
                sections = tuple(s for _ in range(k) for s in (("q", g, w), ("k", 1, w), ("v", 1, w)))
                return HeadLayout("rows", sections, said(h, h_key, w, wk) + f", {kk} {k}, rows by key/value group")
        return None
    if leaf in _FUSED or (leaf == "qkv" and at_attn):
        for (w, wk) in dims:
            for (k, kk) in kvs or [(h, h_key)]:
                if out == (h + 2 * k) * w:
                    group = h // k if kvs and k < h and h % k == 0 else 0  # (among the q heads)
                    return HeadLayout("rows", (("q", h, w), ("k", k, w), ("v", k, w)),
                                      said(h, h_key, w, wk) + (f", {kk} {k}" if kvs else ""), group)
        return None
    if leaf in _ROWS:
        axis, n, prefix = "rows", out, _ROWS[leaf]
        if prefix == "q":
            cands = [(h, h_key, w, wk) for w, wk in dims]
            if nope and rope:
                cands.append((h, h_key, nope + rope, f"(qk_nope_head_dim {nope} + qk_rope_head_dim {rope})"))
            cands += [(h, h_key, 2 * w, f"2 × {wk} {w} (query and gate rows)") for w, wk in dims if wk == "head_dim"]
        elif prefix == "kv":
            cands = [(h, h_key, nope + vd, f"(qk_nope_head_dim {nope} + v_head_dim {vd})")] if nope and vd else []
        else:
            cands = [(k, kk, w, wk) for k, kk in [*kvs, *heads_q] for w, wk in dims]
    elif leaf in _COLUMNS or (leaf == "proj" and at_attn):
        axis, n, prefix = "columns", inp, "h"
        # (MLA's heads are v_head_dim wide at the output projection: named so where hidden / heads is too)
        cands = ([(h, h_key, vd, "v_head_dim")] if vd and nope else []) + [(h, h_key, w, wk) for w, wk in dims] \
            + ([(h, h_key, vd, "v_head_dim")] if vd else [])
    else:
        return None
    for count, ck, width, wk in cands:
        if n == count * width:
            src = (f"{pre}{ck} {count} × {wk}" if wk.startswith(("(", "2 ×")) else said(count, ck, width, wk))
            k = kvs[0][0] if kvs else 0
            group = h // k if prefix == "q" and count == h and k and k < h and h % k == 0 else 0
            return HeadLayout(axis, ((prefix, count, width),), src + (f"; {kvs[0][1]} {k}" if group else ""), group)
    return None


def head_sums(num: np.ndarray, den: np.ndarray, index: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per head ``(Σ (Ŵ − W)², Σ W²)`` in float64 from sums over the rows (or columns) of a
    layer: ``num`` / ``den`` hold one sum per row (column), ``index`` its head."""
    return (np.bincount(index, weights=num, minlength=n)[:n], np.bincount(index, weights=den, minlength=n)[:n])


def rel_error(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """sqrt(num / den) per head: a head of no weight is inf for any error, 0 for none."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, np.sqrt(num / den), np.where(num > 0, np.inf, num))


def head_ratio(errors, layer_error: float) -> np.ndarray:
    """Each head's error over its layer's, float64; NaN where that is undefined (the layer's
    error 0, NaN or inf: a NaN head makes its layer's NaN, and the other heads then have no ratio)."""
    e = np.asarray(errors, np.float64)
    whole = float(layer_error)
    if not (math.isfinite(whole) and whole > 0):
        return np.full(e.shape, np.nan)
    return e / whole


def no_heads_why(path: str, cfg: dict | None = None) -> str:
    """Why layer ``path`` is not split into heads, in a few words (:func:`head_layout` gave None
    for it; ``cfg``: the reference's config.json, where it was read)."""
    parent = path.rpartition(".")[0]
    if _OTHER.search(parent):
        return "a linear attention's projection (its heads fused in an order of its own): not split"
    leaf = path.rpartition(".")[2]
    if ("mamba" in parent or "mixer" in parent or "ssm" in parent) and leaf not in {*_ROWS, "o_proj"}:
        return "a state-space (Mamba) mixer's projection: no attention heads"
    if not _ATTENTION.search(parent) and not parent.endswith("mixer"):
        return "not an attention projection: no heads"
    if leaf not in {*_ROWS, *_COLUMNS, *_FUSED, "qkv", "proj", "linear"}:
        return (f"an attention module's {leaf}: heads are read for q/k/v/o projections (q_proj, k_proj, v_proj, "
                "o_proj, qkv_proj, MLA's q_b_proj and kv_b_proj), not this layout")
    if isinstance(cfg, dict):
        c, where = _config_for(cfg, path)
        if c is None or _head_count(c, path)[0] is None:
            part = f"its {where}" if where else "it"
            return (f"the reference's config.json gives no head count for this part of the model ({part} has no "
                    "num_attention_heads): not split")
    return ("an attention layer whose size is no whole number of heads of a width the reference's config.json "
            "names (num_attention_heads, num_key_value_heads, head_dim): not split")
