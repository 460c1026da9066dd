"""Recognise how each module of a checkpoint is quantized.

Detection follows formats.md §10's order — tensor suffixes, dtypes and shapes first, then the
config — and produces one :class:`Layer` per module with its scheme, logical shape, effective
settings, the rule they came from, and (if something does not fit) the problem, never an
exception: anything not recognised is ``unknown`` with its raw tensors.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .checkpoint import CONFIG_FILES, Checkpoint, Module, split_name
from .dtypes import DENSE_FLOATS, DTYPES
from .errors import LayerError, QuantscopeError
from .formats.mlx import MODE_DEFAULTS, affine_fits, affine_shape
from .qconfig import Effective, QuantConfig, parse_configs
from .safetensors_file import TensorInfo

_logger = logging.getLogger(__name__)

SCHEMES = ("dense", "mlx-affine", "mlx-mxfp4", "mlx-mxfp8", "mlx-nvfp4", "gptoss-mxfp4", "gptq", "awq-gemm", "awq-gemv",
           "ct-pack", "ct-nvfp4", "ct-fp8", "fp8-block", "modelopt-nvfp4", "bnb-nf4", "bnb-fp4", "bnb-int8")
#: Components that are not part of the quantized weight (a Linear's own bias, activation scales).
#: Components that only decode a layer's packed weights: stored without them, the weights are lost.
QUANT_PARTS = {"qzeros", "scales", "g_idx", "scaled_zeros", "biases", "weight_scale", "weight_scale_inv",
               "weight_zero_point", "weight_global_scale", "weight_shape", "weight_g_idx", "weight_scale_2"}
AUX_COMPONENTS = {"bias", "input_scale", "input_zero_point", "input_global_scale", "output_scale", "k_scale",
                  "v_scale"}


@dataclass
class Layer:
    """One module: how it is stored, how it decodes, and where its settings came from.

    Attributes
    ----------
    path
        Module path as stored (``model.layers.0.self_attn.q_proj``).
    scheme
        One of :data:`SCHEMES`, ``unknown`` or a named undecodable variant (``gptq-marlin``).
    tensors
        Stored tensors by component suffix.
    shape
        Logical weight shape ``[..., out_features, in_features]`` (None when unknown).
    bits, group_size, mode
        Effective quantization settings (None where they do not apply).
    dtype
        The dtype the format computes in (scale dtype) or the dense weight dtype.
    settings
        Other effective settings (sym, desc_act, version, act_order, packing, block size…).
    source
        The rule that produced the settings, in words.
    problem
        Why the layer cannot be decoded as it is (None when it can).
    warning
        What looks wrong but does not stop the decode (a config whose bits/group give an
        input width that is not a dimension of the model); None when nothing does.
    """

    path: str
    scheme: str
    tensors: dict[str, TensorInfo]
    shape: tuple[int, ...] | None = None
    bits: int | None = None
    group_size: int | None = None
    mode: str | None = None
    dtype: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    problem: str | None = None
    warning: str | None = None

    @property
    def quantized(self) -> bool:
        return self.scheme not in ("dense", "unknown")

    @property
    def decodable(self) -> bool:
        return self.problem is None and self.scheme != "unknown" and self.shape is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape else 0

    @property
    def stored_bytes(self) -> int:
        """Bytes of everything stored for the weight (codes, scales, zeros, g_idx…), not the bias."""
        return sum(t.nbytes for c, t in self.tensors.items() if c not in AUX_COMPONENTS)

    @property
    def bits_per_weight(self) -> float | None:
        """Bits stored per weight: codes, scales, zeros, g_idx (not compressed-tensors' 16-byte
        ``weight_shape``, which is no part of the quantization: 4.125868 for 4.125 on a 1024² layer)."""
        n = self.numel
        meta = self.tensors.get("weight_shape")
        return (self.stored_bytes - (meta.nbytes if meta is not None else 0)) * 8 / n if n else None

    @property
    def is_matrix(self) -> bool:
        return self.shape is not None and len(self.shape) >= 2

    def summary(self) -> dict:
        """Plain data for JSON output."""
        return {"name": self.path, "scheme": self.scheme, "bits": self.bits, "group_size": self.group_size,
                "mode": self.mode, "shape": list(self.shape) if self.shape else None, "dtype": self.dtype,
                "bits_per_weight": self.bits_per_weight, "stored_bytes": self.stored_bytes,
                "settings": self.settings, "source": self.source, "problem": self.problem, "warning": self.warning,
                "tensors": sorted(self.tensors),
                # (the names the files store: a stacked expert parameter's own, which is read
                # as the weight [E, N, K], swapped from its stored [E, K, N] where "transposed")
                "tensor_names": {c: t.stored_name for c, t in sorted(self.tensors.items())},
                **({"transposed": sorted(c for c, t in self.tensors.items() if t.transposed)}
                   if any(t.transposed for t in self.tensors.values()) else {})}


class Model:
    """A checkpoint's layers with their schemes and its parsed quantization config."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.config: QuantConfig = parse_configs(ckpt.configs)
        self.dims = _model_dims(ckpt.configs.get("config.json") or {})
        self.layers: dict[str, Layer] = {}
        for path, module in ckpt.modules().items():
            try:
                layer = detect(module, self.config, self.dims, ckpt)
            except QuantscopeError as exc:
                layer = Layer(path, "unknown", module.tensors, problem=str(exc))
            except (KeyError, ValueError, TypeError, IndexError) as exc:  # never crash on odd files
                _logger.debug("detection failed for %s", path, exc_info=True)
                layer = Layer(path, "unknown", module.tensors, problem=f"could not recognise: {exc}")
            self.layers[path] = layer
        if ckpt.shard_of is not None:
            self._split_across_shards()

    def _split_across_shards(self) -> None:
        """A file opened alone that is one shard of an index: a layer whose other tensors the
        index puts in other shards is said to continue there (not "stored without the weights
        they decode", as if the file were broken)."""
        index, wm = self.ckpt.shard_of
        mine = self.ckpt.path.name
        others: dict[str, dict[str, list[str]]] = {}  # module -> other shard -> its components there
        for t, shard in wm.items():
            if shard != mine:
                module, comp = split_name(t)
                others.setdefault(module, {}).setdefault(shard, []).append(comp)
        for path, layer in self.layers.items():
            elsewhere = others.get(path)
            if (layer.problem is not None or layer.scheme == "unknown") and elsewhere:
                where = "; ".join(f"{', '.join(sorted(c))} in {sh}" for sh, c in sorted(elsewhere.items()))
                layer.problem = (f"split across shards: its {where} (this file is one shard of {index.name}) — open "
                                 f"the folder {index.parent} for the whole layer")
                layer.settings = {**layer.settings, "split_across_shards": True}

    def layer(self, path: str) -> Layer:
        try:
            return self.layers[path]
        except KeyError:
            pass
        # a tensor's name (module path + component), or a stack's name where the experts are
        # stored one by one: say which layer(s) were meant
        head, _, tail = path.rpartition(".")
        if head in self.layers and tail in self.layers[head].tensors:
            hint = f"{path} is a tensor of the layer {head}: give that"
        else:
            # (mlx-lm's mapping of experts to stacks, Mixtral's w1/w3/w2 included)
            from .compare_align import (
                _FUSED,
                _LAYER_RE,
                fused_homes,
                grouped_qkv,
                switch_path,
            )
            experts = [p for p in self.layers if (sw := switch_path(p)) is not None and sw[0] == path]
            home = next((f for f in fused_homes(tail) if f"{head}.{f}" in self.layers), None)
            fused = f"{head}.{home}" if home is not None else None
            if experts:
                hint = f"this checkpoint stores that stack's experts one by one: {experts[0]} … ({len(experts)} of them)"
            elif fused in self.layers:
                # (the hint named the path as given: "give the module path … e.g." that same path)
                parts = ", ".join(f"then {p}" if i else p for i, p in enumerate(_FUSED[home]))
                if home == "qkv_proj" and grouped_qkv(self) is not None:  # (Hunyuan's)
                    parts = "per key/value group its query heads, its key head, its value head"
                hint = (f"this checkpoint stores it fused in {fused}, whose rows hold {parts}: dequantize that"
                        "; compare splits it")
            elif tail in QUANT_PARTS or tail in AUX_COMPONENTS or tail in ("weight", "qweight", "weight_packed"):
                hint = "give the module path without the component suffix, e.g. model.layers.0.self_attn.q_proj"
            elif (m := _LAYER_RE.search(path)) is not None and any(
                    _LAYER_RE.sub(lambda _: m.group(0), p, count=1) == path for p in self.layers):
                # a decoder layer past the last one: the ones there are
                nums = sorted({int(x.group(1)) for p in self.layers if (x := _LAYER_RE.search(p))})
                hint = f"its decoder layers are {nums[0]}–{nums[-1]}"
            else:
                import difflib
                near = difflib.get_close_matches(path, list(self.layers), n=3, cutoff=0.8)
                hint = (f"did you mean {' or '.join(near)}?" if near else
                        f"its {len(self.layers)} layers run from {next(iter(self.layers))} to "
                        f"{next(reversed(self.layers))}; `quantscope info` lists them")
        raise LayerError(f"no such layer in this checkpoint ({hint})", file=self.ckpt.source, tensor=path,
                         rule="layer.missing") from None

    @property
    def schemes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for layer in self.layers.values():
            out[layer.scheme] = out.get(layer.scheme, 0) + 1
        return out

    @property
    def main_scheme(self) -> str:
        """The most common quantized scheme (or ``dense``)."""
        q = {k: v for k, v in self.schemes.items() if k not in ("dense", "unknown")}
        return max(q, key=q.get) if q else "dense"


def gptq_groups(k: int, g: int) -> int:
    """Rows of a GPTQ layer's scales for K input columns at group size ``g`` (-1 or 0: one group)."""
    return 1 if g in (-1, 0) else -(-k // g)


def data_warning(model: Model, layer: Layer) -> str | None:
    """What a layer's small side tensors say against its config, read cheaply before a decode
    (``dequant``, ``compare`` and ``convert`` warn and exit 1 on it, as for :attr:`Layer.warning`):
    the doctor's errors of that kind (:data:`~.doctor.CONFIG_RULES`) — a symmetric GPTQ layer whose
    zero points are not the constant (every one of them the other checkpoint_format's: each
    weight one scale step off), compressed-tensors zero points or packing that contradict its
    ``version`` or ``symmetric``."""
    # a config file that cannot be read (not JSON, a list, unreadable): ignored here, the settings
    # taken from the tensors; dequant/compare/convert said nothing and exited 0 (a conversion wrote
    # a config.json of its quantization keys alone)
    unread = [w for w in model.ckpt.warnings if w.split(" ", 1)[0] in CONFIG_FILES]
    if unread:
        return f"{unread[0]}: loaders fail on this checkpoint; here its tensors' shapes decide the settings"
    # a setting no loader can use (0 bits, "four", a group size of -7: the doctor's config.bad-value),
    # ignored here for what the shapes say; dequant/compare/convert said nothing and exited 0
    bad = [msg for msg, usable in model.config.bad_values if not usable] + model.config.odd_values
    if bad and layer.quantized:
        return f"{bad[0]}: loaders that follow the config fail on it or misread the layer"
    from .doctor import layer_config_error
    return layer_config_error(model, layer)


def _awq_bits(bits) -> str:
    return (f"the config says {bits} bit, but AWQ's GEMM/GEMV layouts pack 4-bit codes, 8 to an int32 (AutoAWQ "
            "supports only w_bit 4): loaders that follow the config misread the layer — set bits to 4")


def analyze(ckpt: Checkpoint) -> Model:
    """Detect the scheme of every module (cached on the checkpoint)."""
    m = getattr(ckpt, "_model", None)
    if m is None:
        m = Model(ckpt)
        ckpt._model = m
    return m


class Dims(set):
    """The input dimensions a layer of a model can have (a set), and ``hidden``: its hidden
    sizes (the top level's and text_config's), the input of every layer that reads the residual
    stream (:func:`hidden_input`)."""

    hidden: frozenset = frozenset()


#: Layers whose input is the model's hidden size: the embeddings and the head (their rows are
#: tokens), attention's q/k/v (fused or not) and the MLP's gate/up (fused or not, dense, per
#: expert, stacked or shared) in a decoder layer. A vision or audio tower's layers have hidden
#: sizes of their own.
_HIDDEN_INPUT = re.compile(r"(?:^|\.)(?:embed_tokens|lm_head|layers\.\d+\.(?:(?:self_attn|attention|attn)\."
                           r"(?:q_proj|k_proj|v_proj|qkv_proj)|(?:mlp|feed_forward|block_sparse_moe)\."
                           r"(?:(?:experts\.\d+|switch_mlp|shared_experts?)\.)?(?:gate_proj|up_proj|gate_up_proj)))$")
_TOWERS = ("vision", "visual", "audio", "mm_projector", "encoder")


def hidden_input(path: str, dims: set[int]) -> frozenset:
    """The sizes ``path``'s input must have where it reads the residual stream (q/k/v, gate/up
    of a decoder layer) and the model's hidden size is known; empty otherwise."""
    hidden = getattr(dims, "hidden", frozenset())
    if not hidden or not _HIDDEN_INPUT.search(path) or any(t in path for t in _TOWERS):
        return frozenset()
    return hidden


def misread_pair(path: str, wp: int, n_scales: int, bits: int, group: int, dims: set[int],
                 skip: tuple[str, ...] = ()) -> tuple[int, int, int, str] | None:
    """Another (bits, group) that MLX affine shapes (``wp`` packed words, ``n_scales`` scales a
    row) fit and that gives the input width the layer should have, where ``bits``/``group`` do
    not: (bits, group, K, why ``bits``/``group`` look wrong), else None. 4 bit / 64 and 8 bit / 32
    (and others) fit the same shapes, so a config naming the wrong pair decodes silent garbage of
    the wrong width. A layer that reads the residual stream (:func:`hidden_input`) must take the
    hidden size (an up_proj read as 2 bit / 128 instead of 4 bit / 64 took K = the intermediate
    size, a dimension of the model, and passed); any other one a dimension of the model (not
    judged for paths holding one of ``skip``: a vision tower's widths are its own)."""
    hidden = hidden_input(path, dims)
    if hidden:
        pool, why = hidden, "but this layer takes the hidden size"
    elif dims and not any(t in path for t in skip):
        pool, why = dims, "not a dimension of this model"
    else:
        return None
    if wp * 32 // bits in pool:
        return None
    alt = [(b, g) for b, g in affine_fits(wp, n_scales) if (b, g) != (bits, group) and wp * 32 // b in pool]
    return (alt[0][0], alt[0][1], wp * 32 // alt[0][0], why) if alt else None


def _model_dims(cfg: dict) -> Dims:
    """Input dimensions a layer of this model can have (from config.json), for shape inference.
    Not the vocabulary: no layer takes it as input (the embedding's and the head's rows are
    tokens, their inputs the hidden size), and as a candidate it made a small model's shapes
    ambiguous (vocab 2048: 2 bit / 128 as likely as 8 bit / 32 for a 512-wide layer)."""
    dims = Dims()
    # (a text_config that is no object, a list or a string, is left out: it crashed, exit 3)
    configs = [c for c in (cfg, cfg.get("text_config")) if isinstance(c, dict)]
    dims.hidden = frozenset(v for c in configs for v in (c.get("hidden_size"), c.get("d_model"), c.get("n_embd"))
                            if isinstance(v, int) and not isinstance(v, bool) and v > 0)
    for c in configs:
        for k in ("hidden_size", "intermediate_size", "moe_intermediate_size", "d_model",
                  "ffn_dim", "shared_expert_intermediate_size", "intermediate_size_mlp", "mamba_d_ssm", "d_inner",
                  "d_ssm", "embedding_size", "word_embed_proj_dim", "n_embd"):
            v = c.get(k)
            if isinstance(v, int) and v > 0:
                dims.add(v)
        # (Gemma 3n/4: full-attention layers' heads of global_head_dim; the per-layer inputs,
        # hidden_size_per_layer_input wide, embedded for all layers at once. Qwen3-Next/3.5: the
        # linear attention's value heads, its out_proj's inputs)
        for heads, size in (("num_attention_heads", "head_dim"), ("num_heads", "head_dim"),
                            ("mamba_num_heads", "mamba_head_dim"), ("num_attention_heads", "global_head_dim"),
                            ("num_hidden_layers", "hidden_size_per_layer_input"),
                            ("linear_num_value_heads", "linear_value_head_dim"),
                            ("linear_num_key_heads", "linear_key_head_dim")):
            h, d = c.get(heads), c.get(size)
            if isinstance(h, int) and isinstance(d, int):
                dims.add(h * d)
        v = c.get("hidden_size_per_layer_input")
        if isinstance(v, int) and v > 0:
            dims.add(v)
    return dims


def _model_dtype(ckpt: Checkpoint) -> str:
    """The model's compute dtype from config.json (``torch_dtype``/``dtype``), default bf16."""
    cfg = ckpt.configs.get("config.json") or {}
    name = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    return {"float16": "F16", "float32": "F32"}.get(name, "BF16")


def _float_name(t: TensorInfo) -> bool:
    return t.dtype in DENSE_FLOATS


# -- detection ---------------------------------------------------------------------------------

def detect(module: Module, cfg: QuantConfig, dims: set[int], ckpt: Checkpoint) -> Layer:
    """Decide a module's scheme and settings (see module docstring)."""
    comps = module.tensors
    eff = cfg.effective(module.path)
    c = set(comps)
    scalar = [k for k in ("weight", "qweight", "weight_packed", "blocks") if k in comps and not comps[k].shape]
    if scalar:  # (every decoder and the alignment indexed its last dimension: IndexError, exit 3)
        return Layer(module.path, "unknown", comps, source=eff.source, settings={"scalar_weight": True},
                     problem=f"its {scalar[0]} is a scalar (0-d): no layer stores its weights so, and loaders "
                             "fail on it")
    if {"B", "s"} <= c or (cfg.kind == "gptq" and cfg.globals.get("checkpoint_format") == "marlin"
                           and "qweight" in c):
        return Layer(module.path, "gptq-marlin", comps, bits=eff.bits, group_size=eff.group_size,
                     source=eff.source, problem="Marlin-serialized GPTQ (tile-permuted `.B`/`.s`) is not "
                     "decodable as plain GPTQ (R6); convert it back to GPTQ first")
    if "qweight" in c:
        return _detect_gptq_awq(module, cfg, eff)
    if "weight_packed" in c:
        return _detect_ct_packed(module, cfg, eff, ckpt)
    if {"blocks", "scales"} <= c:
        return _detect_gptoss_mxfp4(module, eff)
    if "weight" not in c:
        orphans = sorted(c & QUANT_PARTS)
        if orphans:  # what decodes packed weights, without them (a tensor lost in a merge or a rename)
            return Layer(module.path, "unknown", comps, source=eff.source,
                         problem=f"{', '.join(orphans)} stored without the weights they decode (no qweight, "
                                 "weight_packed or weight): the layer's packed weights are missing")
        # float vectors that are no layer's weights (gpt-oss's attention sinks, an SSM's A_log
        # and D, a logit scale) are nothing to decode: no problem ("cannot be decoded" was said of
        # every gpt-oss decoder layer)
        plain = all(_float_name(t) and len(t.shape) <= 1 for t in comps.values())  # (weight_v of a weight norm: 2-D)
        return Layer(module.path, "unknown", comps, source=eff.source,
                     problem=None if not c - AUX_COMPONENTS or plain else "no weight tensor recognised")
    w = comps["weight"]
    if any(k.startswith("weight.quant_state.") for k in c) or "weight.absmax" in c:
        return _detect_bnb4(module, eff, ckpt)
    if "SCB" in c and w.dtype == "I8":
        return _detect_bnb8(module, eff, ckpt)
    if w.dtype in ("F8_E4M3", "F8_E5M2"):
        return _detect_fp8(module, cfg, eff, _model_dtype(ckpt))
    if w.dtype == "U8" and "weight_scale_2" in c and "weight_scale" in c:
        return _detect_modelopt_nvfp4(module, eff)
    if w.dtype == "I8" and "weight_scale" in c:
        return _detect_ct_naive(module, cfg, eff)
    if w.dtype == "U32" and "scales" in c:
        return _detect_mlx(module, cfg, eff, dims)
    if _float_name(w):
        layer = Layer(module.path, "dense", comps, shape=w.shape, bits=DTYPES[w.dtype].bits, dtype=w.dtype,
                      source=eff.source if eff.quantized is False else "not quantized")
        if "scales" in c:
            layer.problem = "float weight next to `.scales`: a quantized layer saved unquantized, or a stale file"
        return layer
    return Layer(module.path, "unknown", comps, source=eff.source,
                 problem=f"weight dtype {w.dtype} with components {sorted(c)} matches no known scheme")


def _detect_gptoss_mxfp4(module: Module, eff: Effective) -> Layer:
    """gpt-oss's MXFP4 experts (``quant_method: "mxfp4"``, formats.md §2): ``blocks`` U8
    ``[E, N, K/32, 16]`` (32 FP4 codes per block, the low nibble the even element) and ``scales``
    U8 ``[E, N, K/32]`` (E8M0 exponents), a stack of experts ``[E, N, K]``: MLX's mxfp4 bytes
    in another shape. gate_up_proj's rows interleave gate (even) and up (odd)."""
    comps = module.tensors
    b, s = comps["blocks"], comps["scales"]
    layer = Layer(module.path, "gptoss-mxfp4", comps, bits=4, group_size=32, mode="mxfp4", dtype="F32",
                  source=eff.source or "gpt-oss mxfp4 blocks")
    if b.dtype != "U8" or s.dtype not in ("U8", "F8_E8M0"):
        layer.problem = (f"blocks {b.dtype} / scales {s.dtype}: gpt-oss's mxfp4 stores U8 blocks of packed FP4 codes "
                         "and U8 (E8M0) exponents")
    elif len(b.shape) < 3 or b.shape[-1] != 16 or tuple(s.shape) != tuple(b.shape[:-1]):
        layer.problem = (f"blocks {list(b.shape)} and scales {list(s.shape)} do not fit gpt-oss's layout "
                         "(blocks [..., N, K/32, 16], scales [..., N, K/32])")
    else:
        layer.shape = (*b.shape[:-2], b.shape[-2] * 32)
    return layer


def _detect_mlx(module: Module, cfg: QuantConfig, eff: Effective, dims: set[int]) -> Layer:
    comps = module.tensors
    w, s = comps["weight"], comps["scales"]
    has_biases = "biases" in comps
    mode = eff.mode
    said = mode
    if mode is None or (mode == "affine" and not has_biases and s.dtype in ("U8", "F8_E8M0", "F8_E4M3")):
        mode = "affine" if has_biases else _guess_fp_mode(w.shape, s.shape)
    if mode not in MODE_DEFAULTS:  # (a TypeError of the shape arithmetic said it before)
        return Layer(module.path, "unknown", comps, mode=str(mode), source=eff.source,
                     problem=f"unknown MLX mode {mode!r} ({eff.source}); mlx knows {', '.join(MODE_DEFAULTS)}")
    scheme = "mlx-affine" if mode == "affine" else f"mlx-{mode}"
    layer = Layer(module.path, scheme, comps, mode=mode, dtype=s.dtype if mode == "affine" else "F32",
                  source=eff.source)
    if mode == "affine":
        bits, group = eff.bits, eff.group_size
        if bits is None or group is None:
            bits, group, how = _infer_affine(w.shape, s.shape, dims)
            layer.source = how
        layer.bits, layer.group_size = bits, group
        if bits is None or group is None:
            layer.problem = (f"{how}: config.json gives no \"quantization\" {{\"bits\", \"group_size\"}} — "
                             "add them (mlx-lm writes both)")
            return layer
        if not has_biases:
            layer.problem = "affine layer without `.biases` (an mxfp4/nvfp4 layer missing its per-layer mode?)"
            return layer
        if eff.quantized is False:
            layer.problem = "config marks this layer not quantized but `.scales` are stored (R18)"
        try:
            layer.shape = affine_shape(w.shape, s.shape, bits, group)
        except LayerError as exc:
            alt = _infer_affine(w.shape, s.shape, dims)
            hint = f"; the shapes fit {alt[0]} bit / group {alt[1]}" if alt[0] else ""
            layer.problem = f"{exc.message}{hint} (R18)"
            return layer
        # a warning, not a refusal: the model's dimensions come from config keys, and an
        # architecture with a width under another key (Llama 4's intermediate_size_mlp, a Mamba
        # mixer) would otherwise have a healthy layer refused
        other = misread_pair(module.path, w.shape[-1], s.shape[-1], bits, group, dims)
        if other is not None:
            b, g, k2, why = other
            layer.warning = (f"{bits} bit / group {group} ({layer.source}) give K={layer.shape[-1]} inputs, {why}; "
                             f"{b} bit / group {g} give K={k2}. The shapes fit both: if the config's bits/group_size "
                             "are wrong, this decode is garbage (R18)")
        return layer
    layer.bits, layer.group_size = MODE_DEFAULTS.get(mode, (None, None))
    if said in (None, "affine") and eff.source and "inferred" not in eff.source and (
            eff.bits is not None or eff.group_size is not None):
        # the config gives bits/group for affine (its mode said, or left to the default) but the
        # tensors are block-float: read as they are; mlx-lm builds an affine layer and fails on
        # the missing biases (and "mxfp4 requires group size 32")
        layer.warning = (f"the config reads as affine {eff.bits} bit / group {eff.group_size} ({eff.source}), but "
                         f"the tensors are {mode} (U8 scales, no biases): mlx-lm fails to load the layer — set "
                         f"\"mode\": \"{mode}\" for it")
    elif said == mode and (eff.bits not in (None, layer.bits) or eff.group_size not in (None, layer.group_size)):
        # (mlx fixes both for the block-float modes: "mxfp4 requires group size 32")
        layer.warning = (f"the config gives {mode} {eff.bits} bit / group {eff.group_size} ({eff.source}), but {mode} "
                         f"is {layer.bits} bit / group {layer.group_size} (as the tensors are): mlx refuses the "
                         "config's values — drop them or set these")
    if has_biases:
        layer.problem = f"{mode} layer with `.biases` (only affine has biases)"
    if s.dtype not in FP_SCALE_DTYPES.get(mode, ("U8",)):
        layer.problem = f"{mode} scales are {s.dtype}, expected U8 exponent/E4M3 bytes"
    try:
        layer.shape = affine_shape(w.shape, s.shape, layer.bits, layer.group_size)
    except LayerError as exc:
        layer.problem = exc.message
    return layer


#: The scale dtypes an MLX block-float layer may carry: raw bytes, or the F8 type they are
#: (``mx.load`` gives both as uint8: F8_E4M3 since mlx 0.30.3, F8_E8M0 since 0.32.0).
FP_SCALE_DTYPES = {"mxfp4": ("U8", "F8_E8M0"), "mxfp8": ("U8", "F8_E8M0"), "nvfp4": ("U8", "F8_E4M3")}


def _guess_fp_mode(wshape, sshape) -> str:
    wp, sc = wshape[-1], sshape[-1]
    if wp * 8 == sc * 32:
        return "mxfp4"
    if wp * 4 == sc * 32:
        return "mxfp8"
    if wp * 8 == sc * 16:
        return "nvfp4"
    return "affine"


def _infer_affine(wshape, sshape, dims: set[int]):
    """(bits, group, rule) from shapes and the model's dimensions; (None, None, why) if ambiguous."""
    wp, s = wshape[-1], sshape[-1]
    fits = affine_fits(wp, s)
    with_dim = [(b, g) for b, g in fits if wp * 32 // b in dims]
    if len(with_dim) == 1:
        b, g = with_dim[0]
        return b, g, f"inferred from shapes and the model's dimension K={wp * 32 // b}: {b} bit / {g}"
    if (4, 64) in (with_dim or fits):
        return 4, 64, "no bits/group in config: default 4 bit / 64 fits the shapes" + (
            f" (also possible: {[f for f in (with_dim or fits) if f != (4, 64)]})" if len(with_dim or fits) > 1 else "")
    if len(fits) == 1:
        return fits[0][0], fits[0][1], f"inferred from shapes: {fits[0][0]} bit / {fits[0][1]}"
    cand = with_dim or fits
    return None, None, ("bits/group not in config and ambiguous from the shapes: "
                        + (", ".join(f"{b} bit / group {g} (K={wp * 32 // b})" for b, g in cand) if cand
                           else "no bits/group fits them"))


_INT_WORDS = ("I32", "U32", "I16", "U16", "I8", "U8", "I64", "U64")


def _detect_gptq_awq(module: Module, cfg: QuantConfig, eff: Effective) -> Layer:
    comps = module.tensors
    qw = comps["qweight"]
    sc = comps.get("scales")
    path = module.path
    # int16 words: AWQ's GEMV_FAST, unless the config says GPTQ (GPTQModel's pack_dtype int16)
    if (qw.dtype == "I16" and cfg.kind != "gptq") or "scaled_zeros" in comps:
        return Layer(path, "awq-gemv-fast", comps, bits=4, source=eff.source,
                     problem="AWQ GEMV_FAST (int16, interleaved) is not decodable yet (R7)")
    if sc is None or len(qw.shape) != 2 or len(sc.shape) != 2:
        return Layer(path, "unknown", comps, source=eff.source, problem="qweight without 2-D scales")
    # packed codes are integer words and scales floats: F32 codes were read as integers and I32
    # scales decoded every weight to 0, both silently
    bad = ([f"qweight is {qw.dtype}, not integer words"] if qw.dtype not in _INT_WORDS else []) + (
        [f"scales are {sc.dtype}, not floating point"] if sc.dtype not in ("F16", "BF16", "F32") else [])
    if bad:
        return Layer(path, "unknown", comps, source=eff.source,
                     problem=" and ".join(bad) + ": no GPTQ/AWQ layout stores these; the file was damaged in a "
                             "conversion")
    (r, c2), (ng, n) = qw.shape, sc.shape
    word = DTYPES[qw.dtype].bits
    gptq_fit = c2 == n
    gemm_fit = c2 * 8 == n and r % ng == 0
    gemv_fit = r == ng
    version = str(eff.settings.get("version", "")).lower()
    if cfg.kind == "awq":
        scheme = "awq-gemv" if version == "gemv" else "awq-gemm"
    elif cfg.kind == "gptq":
        scheme = "gptq"
    else:
        scheme = "gptq" if gptq_fit else "awq-gemm" if gemm_fit else "awq-gemv" if gemv_fit else "unknown"
    layer = Layer(path, scheme, comps, dtype=sc.dtype, source=eff.source, settings=dict(eff.settings))
    if scheme == "gptq":
        bits = eff.bits
        k = None
        if "g_idx" in comps:
            k = comps["g_idx"].shape[0]
        if bits is None:
            z = comps.get("qzeros")
            if k:
                bits = r * word // k
            elif z is not None and n:
                bits = z.shape[1] * word // n
            layer.source = (layer.source + "; " if cfg.kind else "") + f"bits inferred from shapes: {bits}"
        layer.bits = bits
        z = comps.get("qzeros")
        zword = DTYPES[z.dtype].bits if z is not None and z.dtype in DTYPES else word
        if bits and gptq_fit and z is not None and len(z.shape) == 2 and n and (z.shape[1] * zword) % n == 0:
            zb = z.shape[1] * zword // n  # the width the stored zero points are packed at (their own words)
            if zb != bits and zb in (2, 3, 4, 8):
                layer.problem = (f"{bits} bit ({layer.source}) but qzeros {list(z.shape)} hold {zb}-bit zero points "
                                 f"for N={n}: the config's bits are wrong?")
                return layer
        if not gptq_fit:
            layer.problem = (f"qweight {list(qw.shape)} does not fit GPTQ's [K·b/32, N] with scales {list(sc.shape)}"
                             + ("; it has AWQ GEMM's layout — mislabelled quant_method?" if gemm_fit else ""))
            return layer
        if not bits or (r * word) % bits:
            layer.problem = f"cannot determine bits for qweight {list(qw.shape)}"
            return layer
        k = r * word // bits
        g = eff.group_size
        if g is None:
            g = -1 if ng == 1 else k // ng
        layer.group_size = g
        layer.shape = (n, k)
        gi_trivial = None
        settings = layer.settings
        settings.setdefault("version", 1)
        if "qzeros" not in comps:
            layer.problem = "GPTQ layer without qzeros"
        exp_ng = gptq_groups(k, g)
        if ng != exp_ng:
            fits = k // ng if ng > 1 and k % ng == 0 else None
            layer.problem = (f"scales have {ng} groups; K={k} with group size {g} needs {exp_ng}"
                             + (f" — they fit group size {fits}: the config's group_size is wrong?"
                                if fits and fits & (fits - 1) == 0 and fits >= 16 else ""))
        if "g_idx" in comps and comps["g_idx"].shape != (k,):
            layer.problem = f"g_idx has shape {list(comps['g_idx'].shape)}, expected [{k}]"
        elif "g_idx" in comps and comps["g_idx"].dtype not in _INT_WORDS:
            # int32 bits labelled F32 read as denormals: every column in group 0, the figures
            # twice the error without a word
            layer.problem = (f"g_idx is {comps['g_idx'].dtype}, not integer group indices (GPTQ stores int32): "
                             "the file was damaged in a conversion")
        settings["act_order"] = gi_trivial  # decided lazily by reading g_idx (see engines)
        settings["word_bits"] = word
        return layer
    if scheme == "awq-gemm":
        layer.bits = 4
        if not gemm_fit:
            layer.problem = (f"qweight {list(qw.shape)} does not fit AWQ GEMM's [K, N/8] with scales {list(sc.shape)}"
                             + (" — it has GPTQ's layout (quant_method mislabelled?)" if gptq_fit else "")
                             + (" — it has the GEMV layout; config version says gemm (R7)" if gemv_fit else ""))
            return layer
        layer.shape = (n, r)
        layer.group_size = r // ng
        if eff.group_size not in (None, layer.group_size):
            layer.problem = f"scales imply group size {layer.group_size} but the config says {eff.group_size}"
        if eff.bits not in (None, 4):
            layer.problem = _awq_bits(eff.bits)
        _awq_zeros_missing(layer, cfg, eff)
        return layer
    if scheme == "awq-gemv":
        layer.bits = 4
        if eff.bits not in (None, 4):
            layer.problem = _awq_bits(eff.bits)
            return layer
        g = eff.group_size
        if not gemv_fit or g is None:
            layer.problem = f"qweight {list(qw.shape)} / scales {list(sc.shape)} do not fit AWQ GEMV (group {g})"
            return layer
        layer.shape = (r, c2 * 8)
        layer.group_size = g
        _awq_zeros_missing(layer, cfg, eff)
        return layer
    layer.problem = f"qweight {list(qw.shape)} with scales {list(sc.shape)} fits neither GPTQ nor AWQ layouts"
    return layer


def _awq_zeros_missing(layer: Layer, cfg: QuantConfig, eff: Effective) -> None:
    """An AWQ layer whose config asks for zero points (``zero_point``: true, AutoAWQ's default)
    but stores no qzeros: decoded symmetric, its figures were several times the real error
    without a word (rel_fro 1.59 against 0.13), and AutoAWQ fails to load it."""
    if "qzeros" in layer.tensors or cfg.kind != "awq" or layer.problem:
        return
    zp = eff.settings.get("zero_point", True)
    if zp is not False:
        layer.problem = (f"no qzeros stored, but the config says zero_point={zp} ({eff.source}): the zero "
                         "points are missing (AutoAWQ fails to load the layer; decoded without them, every "
                         "weight is off by its group's zero) — re-export, or set zero_point=false if the model "
                         "was quantized symmetric")


def _infer_ct_pack(layer: Layer, wp, scale, shape) -> None:
    """Bits, group and strategy of a pack-quantized layer stored without any config, from its
    shapes: the bit widths whose packing (:func:`.formats.ct.detect_packing`, either generation)
    gives the stored width of K, the scales one column per group (one: per channel); symmetric
    where no zero points are stored. Only where one bit width fits (a config-less file said
    "config gives no num_bits" of a config that was not there)."""
    from .formats.ct import detect_packing
    k, cols = shape[-1], wp.shape[-1]

    def fits_width(b: int) -> bool:
        try:
            detect_packing(cols, k, b)
        except LayerError:
            return False
        return True

    fits = [b for b in range(2, 9) if fits_width(b)]
    if len(fits) != 1 or wp.dtype != "I32" or len(scale.shape) != 2:
        return
    ng = scale.shape[-1]
    if ng == 1:
        strategy, group = "channel", None
    elif k % ng == 0:
        strategy, group = "group", k // ng
    else:
        return
    layer.bits, layer.group_size = fits[0], group
    layer.settings.update(strategy=strategy, symmetric="weight_zero_point" not in layer.tensors, type="int",
                          format="pack-quantized")
    layer.source = (f"no config: inferred from shapes: {fits[0]} bit, "
                    + (f"group {group}" if group else "per channel"))


def _detect_ct_packed(module: Module, cfg: QuantConfig, eff: Effective, ckpt: Checkpoint) -> Layer:
    comps = module.tensors
    wp = comps["weight_packed"]
    path = module.path
    settings = dict(eff.settings)
    shape = None
    if "weight_shape" in comps:
        try:
            shape = tuple(int(x) for x in ckpt.tensor(f"{path}.weight_shape").reshape(-1))
        except QuantscopeError:
            shape = None
    scale = comps.get("weight_scale")
    if shape is not None and (len(shape) < 2 or min(shape) <= 0):
        # (read as a shape, [-384, 384] made a "shape mismatch" row and exit 0; the layer cannot be
        # decoded, and loaders fail on it)
        scheme = "ct-pack" if wp.dtype != "U8" else "ct-nvfp4" if "weight_global_scale" in comps else "ct-mxfp4"
        return Layer(path, scheme, comps, bits=eff.bits, group_size=eff.group_size, settings=settings,
                     source=eff.source, problem=f"weight_shape {list(shape)} is no shape of a weight matrix (its "
                                                "sizes must be positive): the layer cannot be unpacked")
    int_pack = settings.get("format") == "pack-quantized" or settings.get("type") == "int"
    if wp.dtype == "U8" and int_pack and scale is not None and scale.dtype in ("F32", "F16", "BF16") \
            and "weight_global_scale" not in comps:
        # bytes where pack-quantized writes int32 words (its float scales are no MX exponents):
        # said as such, not taken for MXFP4 with the wrong kind of scales
        layer = Layer(path, "ct-pack", comps, bits=eff.bits, group_size=eff.group_size, dtype=scale.dtype,
                      settings=settings, source=eff.source, shape=shape)
        layer.problem = (f"weight_packed is stored as U8 {list(wp.shape)} but the config says pack-quantized "
                         f"({eff.bits}-bit int), which packs into int32 words: compressed-tensors' unpacker fails on "
                         "bytes, and quantscope does not guess their order — re-export with int32 packing")
        return layer
    if wp.dtype == "U8":
        if "weight_global_scale" in comps:
            scheme, bits, group = "ct-nvfp4", 4, 16
        else:
            scheme, bits, group = "ct-mxfp4", 4, 32
        layer = Layer(path, scheme, comps, bits=bits, group_size=group, dtype="F32", settings=settings,
                      source=eff.source, shape=shape or (wp.shape[0], wp.shape[1] * 2))
        return layer
    layer = Layer(path, "ct-pack", comps, bits=eff.bits, group_size=eff.group_size,
                  dtype=scale.dtype if scale else None, settings=settings, source=eff.source, shape=shape)
    if layer.bits is None and cfg.kind != "compressed-tensors" and shape and scale is not None:
        _infer_ct_pack(layer, wp, scale, shape)  # no config at all: read off the shapes, as for GPTQ/AWQ
    if layer.bits is None:
        layer.problem = ("compressed-tensors config gives no num_bits for this layer" if cfg.kind == "compressed-tensors"
                         else "no quantization config, and the shapes do not say the bits: add the model's config.json")
    elif shape is None:
        layer.problem = "weight_shape missing: logical shape unknown"
    elif scale is None:
        layer.problem = "weight_scale missing"
    elif settings.get("symmetric") is False and "weight_zero_point" not in comps:
        # asymmetric quantization always stores its zero points: decoded as symmetric, every
        # group would be off by its zero point
        layer.problem = ("the config says symmetric: false but no weight_zero_point is stored; decoding it as "
                         "symmetric would give wrong values (a tensor lost in a merge or a rename?)")
    elif str(settings.get("actorder") or "").lower() in ("group", "dynamic") and "weight_g_idx" not in comps:
        # activation order "group" saves each column's group; without it, the columns were read in
        # plain order (the scales of other groups: wrong values, no word)
        layer.problem = (f"the config says actorder: {settings.get('actorder')!r} but no weight_g_idx is stored: which "
                         "group each input column belongs to is lost (a tensor dropped in a merge or a rename?)")
    else:
        from .formats.ct import detect_packing
        try:
            settings["packing"] = detect_packing(wp.shape[-1], shape[-1], layer.bits,
                                                 version=settings.get("version"), name=path)
        except LayerError as exc:
            layer.problem = f"{exc.message} (R9)"
        if settings.get("strategy") in ("channel", "tensor"):
            layer.group_size = None
    return layer


def _detect_ct_naive(module: Module, cfg: QuantConfig, eff: Effective) -> Layer:
    w = module.tensors["weight"]
    s = module.tensors["weight_scale"]
    layer = Layer(module.path, "ct-int", module.tensors, shape=w.shape, bits=eff.bits or 8,
                  group_size=eff.group_size, dtype=s.dtype, settings=_naive_settings(eff, s),
                  source=eff.source)
    if str(eff.settings.get("type") or "").lower() == "float":
        # (FP8 bytes labelled I8 decoded as integers: rel_fro 0.76, exit 0 and no word)
        layer.problem = (f"the config says float ({eff.source}) but the weight is stored as I8 integers: FP8 bytes "
                         "labelled I8? Loaders that follow the config misread it — re-export with the F8_E4M3 dtype")
    return layer


def _naive_settings(eff: Effective, scale: TensorInfo) -> dict:
    """Strategy of an unpacked int/float weight: from the config, else from the scale's shape."""
    st = dict(eff.settings)
    if not st.get("strategy"):
        n = math.prod(scale.shape)
        st["strategy"] = "tensor" if n == 1 else "channel" if scale.shape[-1:] == (1,) else "group"
    return st


def _detect_modelopt_nvfp4(module: Module, eff: Effective) -> Layer:
    """NVIDIA ModelOpt's NVFP4 (``weight`` U8 of E2M1 pairs, ``weight_scale`` F8_E4M3 per 16
    columns, ``weight_scale_2`` F32, a multiplier)."""
    comps = module.tensors
    w, s, s2 = comps["weight"], comps["weight_scale"], comps["weight_scale_2"]
    shape = (*w.shape[:-1], w.shape[-1] * 2) if w.shape else None
    layer = Layer(module.path, "modelopt-nvfp4", comps, shape=shape, bits=4, group_size=16, dtype="BF16",
                  settings={"quant_algo": "NVFP4"}, source=eff.source)
    if shape is None or not w.shape[-1]:
        layer.problem = f"weight {list(w.shape)} holds no rows of packed FP4 codes"
    elif s.dtype not in ("F8_E4M3", "U8"):
        layer.problem = f"weight_scale is {s.dtype}; NVFP4 block scales are F8_E4M3"
    elif tuple(s.shape) != (*shape[:-1], -(-shape[-1] // 16)):
        layer.problem = (f"weight_scale {list(s.shape)} does not give one scale per 16 of the {shape[-1]} columns "
                         f"of weight {list(w.shape)} (two codes a byte): expected {[*shape[:-1], -(-shape[-1] // 16)]}")
    elif math.prod(s2.shape) != 1 or s2.dtype not in ("F32", "F16", "BF16"):
        layer.problem = f"weight_scale_2 is {s2.dtype} {list(s2.shape)}; ModelOpt stores one float32 multiplier"
    return layer


def _detect_fp8(module: Module, cfg: QuantConfig, eff: Effective, model_dtype: str = "BF16") -> Layer:
    comps = module.tensors
    w = comps["weight"]
    # each format's loader looks for its own name of the scale: a renamed one is found by none
    # (read by the other format's rules, it was blamed for a missing block size or group size)
    if cfg.kind == "compressed-tensors" and "weight_scale_inv" in comps and "weight_scale" not in comps:
        return Layer(module.path, "ct-fp8", comps, shape=w.shape, bits=8, dtype=w.dtype, source=eff.source,
                     problem=f"the scale is stored as `weight_scale_inv` {list(comps['weight_scale_inv'].shape)}, "
                             "DeepSeek's FP8 name, but the config is compressed-tensors, which loads `weight_scale`: a "
                             "renamed tensor (or a config from another checkpoint) — rename it, or use the config it "
                             "was written with")
    # quant_method fp8 names its scale by layout (vLLM, transformers): `weight_scale_inv` for
    # blocks (DeepSeek's name), `weight_scale` per tensor or channel (AutoFP8). R12: both read.
    named = cfg.kind == "fp8" and "weight_scale" in comps and comps["weight_scale"].dtype in ("F32", "F16", "BF16")
    if "weight_scale_inv" in comps or named:  # (a U8 weight_scale: MXFP8's exponents, below)
        sname = "weight_scale_inv" if "weight_scale_inv" in comps else "weight_scale"
        bs = eff.settings.get("weight_block_size") or cfg.globals.get("weight_block_size")
        s = comps[sname]
        settings = {"weight_block_size": bs, "scale_dtype": s.dtype, "scale_tensor": sname}
        if not bs:
            # transformers' FP8 without a block size scales per tensor or per output channel
            # (formats.md §6: weight_block_size null, e.g. Ministral/Devstral FP8); the scale's
            # shape says which, and either reads the same whatever the block size would be
            *lead, n_rows, _ = w.shape
            if math.prod(s.shape) == math.prod(lead) and tuple(s.shape[:len(lead)]) == tuple(lead):
                settings["strategy"] = "tensor"
            elif tuple(s.shape) in ((*lead, n_rows), (*lead, n_rows, 1)):
                settings["strategy"] = "channel"
        if eff.settings.get("activation_scheme") is not None:
            settings["activation_scheme"] = eff.settings["activation_scheme"]
        layer = Layer(module.path, "fp8-block", comps, shape=w.shape, bits=8, dtype=model_dtype,
                      settings=settings, source=eff.source)
        if eff.quantized is False:
            # decoded with its scale, as stored; a loader that follows the config builds a plain
            # Linear and loads the FP8 values unscaled
            layer.warning = (f"the config leaves this layer unquantized ({eff.source}) but it is stored FP8 with "
                             f"{sname}: loaders that follow the config load the FP8 values without their "
                             "scale — drop it from modules_to_not_convert, or store it dense")
        if not bs and "strategy" not in settings:
            layer.problem = (f"weight_block_size missing from the config and {sname} {list(s.shape)} is "
                             "neither one scale per tensor nor one per output channel; the block size cannot be "
                             "read (R12)")
        return layer
    s = comps.get("weight_scale")
    # (a config that says otherwise than the stored dtypes: read as the tensors say, figures of a
    # misread file with exit 0 and "no problems found")
    ctype = str(eff.settings.get("type") or "").lower() if cfg.kind == "compressed-tensors" else ""
    if s is not None and s.dtype == "U8":
        layer = Layer(module.path, "ct-mxfp8", comps, shape=w.shape, bits=8, group_size=32, dtype="BF16",
                      settings={"scale": "E8M0"}, source=eff.source)
        strategy = str(eff.settings.get("strategy") or "").lower() if cfg.kind == "compressed-tensors" else ""
        if strategy in ("channel", "tensor", "block"):
            layer.problem = (f"U8 scales (MX exponents, a group of 32 each) but the config says {strategy} strategy "
                             f"({eff.source}), whose scales are floats of another shape: a damaged or mixed-up "
                             "weight_scale")
        return layer
    if s is not None:
        st = _naive_settings(eff, s)
        layer = Layer(module.path, "ct-fp8", comps, shape=w.shape, bits=8,
                      group_size=eff.group_size if st.get("strategy") == "group" else None,
                      dtype=s.dtype, settings=st, source=eff.source)
        if ctype == "int":
            layer.problem = (f"the config says int ({eff.source}) but the weight is stored as {w.dtype}: loaders that "
                             "follow the config read FP8 bytes as integers")
        return layer
    if eff.quantized is not False and eff.bits == 8 and (
            cfg.kind == "fp8" or (cfg.kind == "compressed-tensors" and eff.settings.get("type") == "float")):
        # the config quantizes it to FP8: its scale was lost, not never there (read as plain fp8,
        # a per-channel scale of ~1/1500 went missing unseen)
        block = cfg.kind == "fp8" and bool(eff.settings.get("weight_block_size")
                                           or cfg.globals.get("weight_block_size"))
        return Layer(module.path, "fp8-block" if block else "ct-fp8", comps, shape=w.shape, bits=8, dtype=w.dtype,
                     source=eff.source,
                     problem=f"{'weight_scale_inv' if block else 'weight_scale'} missing: the config quantizes this "
                             "layer to FP8, and its values read without their scale would be off by that factor "
                             "(a tensor lost in a merge or a rename?)")
    return Layer(module.path, "dense", comps, shape=w.shape, bits=8, dtype=w.dtype,
                 source="fp8 weight without a scale: read as plain fp8 values")


#: bitsandbytes' int8 weight_format codes (formats.md §7.2): only row-major is written now.
_BNB8_FORMATS = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}


def _detect_bnb8(module: Module, eff: Effective, ckpt: Checkpoint) -> Layer:
    comps = module.tensors
    layer = Layer(module.path, "bnb-int8", comps, shape=comps["weight"].shape, bits=8, dtype="F32",
                  source=eff.source, settings={"weight_format": "row"})
    f = comps.get("weight_format")
    if f is None:
        return layer  # (older files store none: row-major)
    try:
        code = np.asarray(ckpt.tensor(f.name)).reshape(-1)
    except (QuantscopeError, OSError, ValueError) as exc:  # (a damaged scalar: the reader's own words)
        layer.problem = f"weight_format cannot be read: {exc}"
        return layer
    fmt = _BNB8_FORMATS.get(int(code[0])) if code.size == 1 and code.dtype.kind in "iu" else None
    if fmt is None:
        shown = int(code[0]) if code.size == 1 and code.dtype.kind in "iu" else code.tolist()
        layer.problem = f"weight_format {shown} is not one of bitsandbytes' int8 layouts (0: row)"
    elif fmt != "row":
        layer.settings["weight_format"] = fmt
        layer.problem = (f"weight_format {int(code[0])} ({fmt}): a GPU-tiled int8 layout of old bitsandbytes, which "
                         "current bitsandbytes refuses to load — re-save the model with a current bitsandbytes "
                         "(row-major, weight_format 0)")
    return layer


def _detect_bnb4(module: Module, eff: Effective, ckpt: Checkpoint) -> Layer:
    comps = module.tensors
    states = [k for k in comps if k.startswith("weight.quant_state.bitsandbytes__")]
    qtype = states[0].rsplit("__", 1)[1] if len(states) == 1 else None
    scheme = {"nf4": "bnb-nf4", "fp4": "bnb-fp4"}.get(qtype or "", "bnb-nf4")
    layer = Layer(module.path, scheme, comps, bits=4, source="quant_state tensor", settings={})
    if len(states) != 1:
        layer.problem = f"expected exactly one weight.quant_state.bitsandbytes__* tensor, found {len(states)} (R25)"
        return layer
    import json
    try:
        raw = ckpt.tensor(f"{module.path}.{states[0]}")
        state = json.loads(bytes(raw.astype("uint8").reshape(-1)).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, QuantscopeError) as exc:
        layer.problem = f"quant_state is not readable JSON: {exc}"
        return layer
    layer.settings = state
    layer.group_size = state.get("blocksize")
    shape = state.get("shape")
    layer.shape = tuple(shape) if isinstance(shape, list) else None
    layer.dtype = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(str(state.get("dtype")), "F32")
    return layer
