"""Convert a checkpoint to MLX (exact repack where the source fits MLX affine) or to dense.

``convert(src, dst, to="mlx")`` turns each layer into MLX's layout (formats.md §1, §9):

* **exact repacks** — GPTQ v1/v2 (2/3/4/8 bit, trivial or absent g_idx, G ∈ {32, 64, 128}), AWQ
  GEMM/GEMV 4-bit, compressed-tensors pack-quantized (group strategy, power-of-two bits or the
  dense ≥ 0.17 layout) and MLX layers already in the requested settings. The codes are moved
  bit for bit, zero points become ``biases = -s·z``. ``mx.dequantize`` of the output equals
  quantscope's decode of the source to the bit: the scale dtype of the source is kept when
  MLX's double rounding (``round(round(s·q) + b)`` in that dtype) reproduces every stored value
  of the layer, else that layer's scales and biases are written in float32 (the report says which);
* **requantized** — everything else that is quantized (act-order g_idx, group −1/16, FP8 block,
  bitsandbytes, other target settings): decoded to float, then ``mx.quantize``;
* **quantized** — dense matrices of a dense source, uniformly or by a recipe (mlx-lm's
  ``mixed_*`` predicates, or a JSON file of per-layer settings);
* **carried** — norms, biases, 1-D tensors and anything not recognised, byte for byte.

``to="dense"`` decodes every quantized layer and casts every float tensor to the chosen dtype.

Output is streamed: every tensor's dtype and shape are planned first (one cheap pass over
scales and zero points decides the scale dtype of each repack), so each shard's header is
written before its data and memory stays bounded by one layer. Everything is written into
``.DST.quantscope-partial-<pid>`` beside ``DST``, verified there against the source with
:func:`~quantscope.backend.compare.sweep`, and renamed into place only when complete.
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

from . import bitpack, mup
from .bitpack import unpack_bits
from .checkpoint import Checkpoint, open_checkpoint
from .compare_align import rows_normalized, switch_path
from .dtypes import DENSE_FLOATS, DTYPES
from .errors import Cancelled, LayerError, QuantscopeError
from .formats import awq, ct, fast, gptq
from .formats.kernel import for_row_blocks, round_inplace
from .formats.mlx import AFFINE_BITS, AFFINE_GROUPS, MODE_DEFAULTS
from .info import human_bytes
from .metrics import worst
from .outfile import file_in_the_way
from .schemes import AUX_COMPONENTS, QUANT_PARTS, Layer, Model, analyze, data_warning

__all__ = ["convert", "ConversionReport", "LayerResult", "ConversionError", "RECIPES", "MAX_SHARD_BYTES",
           "PARTIAL_TAG", "mixed_recipe_settings"]

_logger = logging.getLogger(__name__)

#: mlx-lm's ``save_model`` shard limit (``5 << 30`` bytes).
MAX_SHARD_BYTES = 5 << 30
#: Marker in the name of the temporary folder beside DST: ``.DST.quantscope-partial-<pid>``.
PARTIAL_TAG = "quantscope-partial"
#: mlx-lm's mixed recipes: name -> (low bits, high bits); group 64.
RECIPES = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_6": (3, 6), "mixed_4_6": (4, 6)}
#: mlx-lm's own per-model choices (each model class's ``quant_predicate``, mlx-lm 0.32), applied
#: where a layer gets the uniform settings: module paths ending so get 8 bits (group 64) — MoE
#: routers, whose choice of experts is discrete — or stay dense (False). ``=name``: that exact path.
_ROUTER8 = (("mlp.gate", 8),)
MODEL_RULES: dict[str, tuple[tuple[str, int | bool], ...]] = {
    "qwen3_moe": _ROUTER8, "qwen3_vl_moe": _ROUTER8, "kimi_linear": _ROUTER8, "mellum": _ROUTER8,
    "Klear": _ROUTER8,
    "qwen3_next": (("mlp.gate", 8), ("shared_expert_gate", 8)),
    "qwen3_5": (("mlp.gate", 8), ("shared_expert_gate", 8)),
    "qwen3_5_moe": (("mlp.gate", 8), ("shared_expert_gate", 8)),
    "gpt_oss": (("router", 8),), "jamba": (("router", 8),),
    "granitemoe": (("block_sparse_moe.router.layer", 8), ("self_attn.o_proj", 8), ("mlp.down_proj", 8),
                   ("=lm_head", 8)),
    "granitemoehybrid": (("router.layer", 8),),
    "lfm2_moe": (("feed_forward.gate", 8),),
    "bailing_moe": (("mlp.gate.gate_proj", 8),), "bailing_moe_linear": (("mlp.gate.gate_proj", 8),),
    "bailing_hybrid": (("mlp.gate.gate_proj", 8), ("attention.embed_q", False), ("attention.unembed_out", False)),
    "minimax": (("block_sparse_moe.gate", 8),), "minimax_m2": (("block_sparse_moe.gate", 8),),
    "gemma4": (("router.proj", 8),), "gemma4_text": (("router.proj", 8),),
    "laguna": (("mlp.gate.proj", 8),), "longcat_flash": (("classifier", 8),),
    "afmoe": (("router.gate", 8),), "step3p5": (("mlp.gate.gate", 8),),
}
#: mlx-lm model types whose MoE router is no Linear but a module holding its weight itself
#: (MoEGate: DeepSeek's, Kimi K2's, GLM-4.5's…): ``nn.quantize`` leaves it dense whatever the
#: settings or recipe, and a file holding its scales does not load ("parameters not in model").
_GATE_HOLDS_WEIGHT = {**{t: "mlp.gate" for t in ("deepseek", "deepseek_v2", "deepseek_v3", "deepseek_v32", "kimi_k2",
                                                  "joyai_llm_flash", "glm4_moe", "glm4_moe_lite", "exaone_moe",
                                                  "mimo_v2_flash", "dots1")},
                      "nemotron_h": "mixer.gate"}
#: mlx-lm model types whose sanitize moves the MoE router from transformers' ``mlp.gate`` to
#: ``mlp.gate.gate_proj`` by its weight (and bias) alone: a quantized router's scales and biases
#: would stay behind ("parameters not in model"), so one of that name is kept dense.
_ROUTER_MOVED = {"bailing_moe", "bailing_moe_linear", "bailing_hybrid"}
#: mlx-lm model types whose sanitize divides lm_head by its column norms on every load where
#: config.json has ``norm_head`` (the packed words of a quantized head, too: doctor's
#: mlx.norm-head-quantized), so lm_head is kept dense.
_NORM_HEAD_ON_LOAD = {"bailing_moe", "bailing_moe_linear"}
_DTYPE_ARG = {"bf16": np.dtype(ml_dtypes.bfloat16), "f16": np.dtype(np.float16), "f32": np.dtype(np.float32)}
_TORCH_NAME = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}
_FLOAT_ST = DENSE_FLOATS
#: Source files that are weights or quantization configs of the source: never copied.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf", ".h5", ".msgpack", ".npz")
_SKIP_FILES = {"config.json", "quantize_config.json", "quant_config.json", "quantization_config.json",
               "hf_quant_config.json"}  # (ModelOpt's: copied, a dense output read as NVFP4)
#: What a single-file source copies from its folder (the folder may be anything, e.g. Downloads).
_SINGLE_FILE_COPIES = re.compile(r"^(tokenizer.*|special_tokens_map\.json|generation_config\.json|"
                                 r"chat_template.*|.*\.jinja|vocab\.json|merges\.txt|added_tokens\.json)$")
_ST_OF_NUMPY = [(d.numpy, name) for name, d in DTYPES.items() if not d.packed]


class ConversionError(QuantscopeError):
    """A conversion cannot be done as asked (bad settings, destination, disk space, layer)."""

    default_rule = "convert"


class LayerConversionError(ConversionError):
    """A layer that cannot be converted: named as a layer ("layer 'model.layers.0.mlp.down_proj'"),
    not as a tensor of that name."""

    subject = "layer"


@dataclass
class LayerResult:
    """What happened to one module.

    Attributes
    ----------
    path
        Module path (as stored in both checkpoints).
    source_scheme
        The source layer's scheme (``gptq``, ``awq-gemm``, ``dense``…).
    action
        ``"repacked exact"``, ``"copied exact"``, ``"requantized 4/64 affine"``, ``"quantized 3/64 affine"``,
        ``"kept dense (reason)"``, ``"dequantized to bf16"``, ``"cast to bf16"`` or ``"carried"``.
    bits, group_size, mode
        Settings of the output layer (None when it is dense).
    scales_dtype
        safetensors dtype of the written scales (None when not quantized).
    widened
        True when the scales were written in float32 although the source's were narrower, because
        MLX's rounding in the source dtype would not reproduce the source values (see module doc).
    rel_fro, max_abs, sqnr_db
        Error of the output against the source from the verification sweep (None when not measured;
        for stacked experts the worst expert's).
    experts
        Source modules stacked into this one (per-expert MoE layers written as mlx-lm's
        ``switch_mlp`` ``[E, N, K]``), in expert order; empty otherwise.
    """

    path: str
    source_scheme: str
    action: str
    bits: int | None = None
    group_size: int | None = None
    mode: str | None = None
    scales_dtype: str | None = None
    widened: bool = False
    rel_fro: float | None = None
    max_abs: float | None = None
    sqnr_db: float | None = None
    experts: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """The action without its details: ``repacked``, ``requantized``, ``quantized``, ``kept dense``…"""
        a = self.action
        for k in ("repacked", "copied", "requantized", "quantized", "kept dense", "dequantized", "cast", "carried"):
            if a.startswith(k):
                return k
        return a


@dataclass
class ConversionReport:
    """The result of :func:`convert`.

    Attributes
    ----------
    src, dst, to
        As given (paths resolved).
    layers
        One :class:`LayerResult` per module of the source, in natural order.
    quantization
        The ``config.json["quantization"]`` block written (None for dense output).
    files
        Files written into ``dst`` (relative names).
    output_bytes, source_bytes
        Total size of the output folder / of the source's tensors.
    timings
        Seconds: ``plan``, ``write``, ``verify``, ``total``.
    notes
        Things a person should know (dropped tensors, layers left dense and why, …).
    verified
        Whether the verification sweep ran.
    suspect
        ``"path: why"`` per layer whose decode the source's own shapes put in doubt (its config's
        bits/group size give an input width the model does not have): converted as the config
        says, but likely wrong (the command line exits 1, as ``dequant`` does).
    """

    src: str
    dst: str
    to: str
    layers: list[LayerResult] = field(default_factory=list)
    quantization: dict | None = None
    files: list[str] = field(default_factory=list)
    output_bytes: int = 0
    source_bytes: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    verified: bool = False
    suspect: list[str] = field(default_factory=list)
    #: Converted layers whose output holds inf although the source's values are finite: beyond
    #: the output dtype's range (f16's 65504), not the source's doing (the verification's finding).
    overflowed: list[str] = field(default_factory=list)

    def by_kind(self) -> dict[str, int]:
        """Number of modules per action kind."""
        out: dict[str, int] = {}
        for r in self.layers:
            out[r.kind] = out.get(r.kind, 0) + 1
        return out

    @property
    def exact_repacks(self) -> list[LayerResult]:
        return [r for r in self.layers if r.kind in ("repacked", "copied") and r.action != "repacked, biases rounded"]

    @property
    def rounded_repacks(self) -> list[LayerResult]:
        """Repacks whose scales and biases were kept in the source's dtype at the cost of rounding
        the biases (``scales="source"``)."""
        return [r for r in self.layers if r.action == "repacked, biases rounded"]

    @property
    def widened(self) -> list[LayerResult]:
        return [r for r in self.layers if r.widened]

    @property
    def kept_dense(self) -> list[LayerResult]:
        return [r for r in self.layers if r.kind == "kept dense"]

    @property
    def max_rel_fro(self) -> float | None:
        """The largest error of a converted layer; NaN when any is NaN (max() skipped it and
        reported 0 for a source with NaN scales)."""
        v = [r.rel_fro for r in self.layers if r.rel_fro is not None]
        if any(math.isnan(x) for x in v):
            return math.nan
        return max(v) if v else None

    @property
    def nonfinite_layers(self) -> list[str]:
        """Layers whose error is not finite (NaN/inf values in the source or the output)."""
        return [r.path for r in self.layers if r.rel_fro is not None and not math.isfinite(r.rel_fro)]

    def to_dict(self) -> dict:
        import dataclasses
        return dataclasses.asdict(self)


# -- settings -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Q:
    bits: int
    group_size: int
    mode: str = "affine"

    def as_config(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def label(self) -> str:
        return f"{self.bits}/{self.group_size} {self.mode}"


def _bits_for_source(bits, default: int) -> int:
    """Affine bits for requantizing a quantized layer nobody gave settings for: its own width, or
    the next MLX has (FP8 → 8; a 4-bit act-order GPTQ → 4; 7 → 8). Four bits for an 8-bit source
    quadrupled its error, silently (rel_fro 0.026 → 0.097 on llm-compressor's FP8)."""
    if not isinstance(bits, int) or bits <= 0:
        return default
    return min((b for b in AFFINE_BITS if b >= bits), default=max(AFFINE_BITS))


def _make_q(bits, group_size, mode, where: str) -> _Q:
    if mode not in MODE_DEFAULTS:
        raise ConversionError(f"{where}: mode {mode!r} is not one of {', '.join(MODE_DEFAULTS)}")
    dbits, dgroup = MODE_DEFAULTS[mode]
    bits = dbits if bits is None else int(bits)
    group_size = dgroup if group_size is None else int(group_size)
    if mode == "affine":
        if bits not in AFFINE_BITS:
            raise ConversionError(f"{where}: affine bits must be one of {AFFINE_BITS}, not {bits}")
        if group_size not in AFFINE_GROUPS:
            raise ConversionError(f"{where}: affine group size must be one of {AFFINE_GROUPS}, not {group_size}")
    elif (bits, group_size) != (dbits, dgroup):
        raise ConversionError(f"{where}: {mode} is always {dbits} bit / group {dgroup} "
                              f"(got {bits} bit / group {group_size})")
    return _Q(bits, group_size, mode)


def mixed_recipe_settings(recipe: str, path: str, n_layers: int) -> _Q:
    """Settings mlx-lm's ``mixed_*`` recipe gives module ``path`` (group 64).

    ``use_more_bits = i < L//8 or i >= 7*L//8 or (i - L//8) % 3 == 2`` for decoder layer ``i``;
    v_proj/down_proj with ``use_more_bits`` and lm_head get the high bits, the rest the low bits.
    """
    low, high = RECIPES[recipe]
    parts = path.split(".")
    index = 0
    if "layers" in parts:
        i = parts.index("layers") + 1
        if i < len(parts) and parts[i].isdigit():
            index = int(parts[i])
    more = index < n_layers // 8 or index >= 7 * n_layers // 8 or (index - n_layers // 8) % 3 == 2
    if more and ("v_proj" in path or "down_proj" in path):
        return _Q(high, 64)
    if "lm_head" in path:
        return _Q(high, 64)
    return _Q(low, 64)


def _n_layers(model: Model) -> int:
    cfg = model.ckpt.configs.get("config.json") or {}
    for c in (cfg, cfg.get("text_config") or {}):
        v = c.get("num_hidden_layers") if isinstance(c, dict) else None
        if isinstance(v, int) and v > 0:
            return v
    idx = set()
    for p in model.layers:
        parts = p.split(".")
        if "layers" in parts:
            i = parts.index("layers") + 1
            if i < len(parts) and parts[i].isdigit():
                idx.add(int(parts[i]))
    return max(idx) + 1 if idx else 1


class _Targets:
    """Per-layer target settings: a ``_Q``, False (leave dense) or None (not specified)."""

    def __init__(self, *, bits, group_size, mode, recipe, model: Model) -> None:
        self.explicit = bits is not None or group_size is not None or mode != "affine"
        self.default = _make_q(bits, group_size, mode, "--bits/--group-size/--mode")
        self.recipe_name = None
        self.table: dict[str, Any] | None = None
        self.n_layers = _n_layers(model)
        self.model_type = model.ckpt.model_types()[0]
        self.rules = MODEL_RULES.get(self.model_type, ())
        # modules mlx-lm's loader for this model cannot take quantized, and why (before any recipe)
        self.dense_why: dict[str, str] = {}
        if self.model_type in _ROUTER_MOVED:
            for p in model.layers:
                if p.endswith(".mlp.gate") and model.layers[p].is_matrix:
                    self.dense_why[p] = (f"mlx-lm's {self.model_type} loader takes mlp.gate by its weight alone "
                                         "(moved to mlp.gate.gate_proj, or held by its gate module): a quantized "
                                         "router's scales would match no parameter")
        cfg = model.ckpt.configs.get("config.json") or {}
        if self.model_type in _NORM_HEAD_ON_LOAD and cfg.get("norm_head") and "lm_head" in model.layers:
            self.dense_why["lm_head"] = (f"norm_head: mlx-lm's {self.model_type} loader divides lm_head by its column "
                                         "norms on every load, which a quantized head does not survive")
        self.per_layer = False  # write a config entry for every quantized layer (mlx-lm does for recipes)
        self.source_scales = False  # --scales source: repacks keep the source's scale dtype, rounding
        if recipe is None:
            return
        self.per_layer = True
        if recipe in RECIPES:
            if bits is not None or group_size is not None or mode != "affine":
                raise ConversionError(f"recipe {recipe} fixes bits and group size; drop --bits/--group-size/--mode")
            self.recipe_name = recipe
            self.default = _Q(RECIPES[recipe][0], 64)
            return
        p = Path(recipe).expanduser()
        if not p.is_file():
            raise ConversionError(f"recipe {recipe!r} is neither one of {', '.join(RECIPES)} nor a JSON file")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConversionError(f"recipe file is not readable JSON ({exc})", file=p) from None
        if not isinstance(data, dict):
            raise ConversionError("recipe file must hold a JSON object: module path → "
                                  "{bits, group_size, mode} or false", file=p)
        self.table = {}
        for k, v in data.items():
            if v is False:
                self.table[k] = False
            elif isinstance(v, dict):
                odd = [x for x in v if x not in ("bits", "group_size", "mode")]
                if odd:  # a misspelt key (group_sise) left the layer at the default without a word
                    near = difflib.get_close_matches(str(odd[0]), ["bits", "group_size", "mode"], n=1)
                    raise ConversionError(f"entry {k!r} has key(s) {', '.join(map(repr, odd))} "
                                          + (f"(did you mean {near[0]!r}?) " if near else "")
                                          + "; an entry takes bits, group_size and mode", file=p)
                self.table[k] = _make_q(v.get("bits"), v.get("group_size"), v.get("mode", "affine"), f"{p}: {k}")
            else:
                raise ConversionError(f"entry {k!r} is {v!r}; expected {{bits, group_size, mode}} or false", file=p)
        unknown = [k for k in self.table if k not in model.layers]
        if unknown:  # a typo would quantize that layer by the defaults without a word
            near = difflib.get_close_matches(unknown[0], list(model.layers), n=1)
            raise ConversionError(f"{len(unknown)} recipe key(s) name no module of the source: "
                                  + ", ".join(repr(k) for k in unknown[:3]) + ("…" if len(unknown) > 3 else "")
                                  + (f" (did you mean {near[0]!r}?)" if near else ""), file=p)
        # settings for a module that is no weight matrix (a norm, a bias vector) were dropped
        # without a word: the recipe asked for something no converter does
        held = [k for k, v in self.table.items() if isinstance(v, _Q) and self.holds_weight(k)]
        if held:  # (turned dense without a word but the action column's)
            raise ConversionError(f"recipe entry {held[0]!r} asks for {self.table[held[0]].bits}-bit settings, but "
                                  f"mlx-lm's {self.model_type} router holds its weight itself (no Linear): it is "
                                  "never quantized — drop the entry (or give it false)", file=p)
        flat = [k for k, v in self.table.items() if isinstance(v, _Q) and not model.layers[k].is_matrix]
        if flat:
            lay = model.layers[flat[0]]
            raise ConversionError(f"recipe entry {flat[0]!r} asks for {self.table[flat[0]].bits}-bit settings, but it "
                                  f"is no weight matrix (shape {list(lay.shape or ())}): only matrices are quantized "
                                  "— drop the entry (or give it false)", file=p)
        # the layers it does not name follow the rule without a recipe (or --bits/--group-size/
        # --mode where given): repacked exactly where they can be, dense ones of a quantized
        # source kept dense; they were all requantized at 4/64 (an exact GPTQ source lost 9%)

    def holds_weight(self, path: str) -> bool:
        """``path`` is a module mlx-lm's model cannot quantize (:data:`_GATE_HOLDS_WEIGHT`)."""
        gate = _GATE_HOLDS_WEIGHT.get(self.model_type)
        return gate is not None and (path == gate or path.endswith("." + gate))

    def for_layer(self, path: str):
        if self.holds_weight(path) or path in self.dense_why:
            return False
        if self.recipe_name is not None:
            return mixed_recipe_settings(self.recipe_name, path, self.n_layers)
        if self.table is not None and path in self.table:
            return self.table[path]
        return self.uniform(path) if self.explicit else None

    def uniform(self, path: str):
        """What the uniform settings give ``path``: the defaults, or this model's rule (see
        :data:`MODEL_RULES`) where one applies."""
        rule = self.rule(path)
        return self.default if rule is None else rule

    def rule(self, path: str):
        if self.recipe_name is not None:  # mlx-lm: a recipe replaces the model's choices
            return None
        for pat, bits in self.rules:
            if (path == pat[1:]) if pat.startswith("=") else (path == pat or path.endswith("." + pat)):
                return False if bits is False else _Q(bits, 64)
        return None


# -- numpy / MLX helpers --------------------------------------------------------------------------

def _st_name(dt: np.dtype) -> str:
    for npdt, name in _ST_OF_NUMPY:
        if npdt == dt:
            return name
    raise ConversionError(f"no safetensors dtype for numpy {dt}")


def _np_dtype(st: str) -> np.dtype:
    return np.dtype(DTYPES[st].numpy)


def _mx_quantize(w: np.ndarray, dtype: np.dtype, q: _Q) -> list[np.ndarray]:
    """``mx.quantize`` of ``w`` cast to ``dtype``, run on the MLX thread; numpy results."""
    from .engines import from_mx, run_on_mlx_thread, to_mx

    def run():
        import mlx.core as mx
        a = to_mx(w.astype(dtype, copy=False))
        r = mx.quantize(a, group_size=q.group_size, bits=q.bits, mode=q.mode)
        mx.eval(*r)
        return [from_mx(x) for x in r]

    return run_on_mlx_thread(run)


def _mx_normalize_rows(w: np.ndarray) -> np.ndarray:
    """Each row of ``w`` over its norm, as mlx-lm's baichuan_m1 sanitize computes it (float32:
    ``w / (‖w‖ + 1e-7)``, back in ``w``'s dtype), run on the MLX thread."""
    from .engines import from_mx, run_on_mlx_thread, to_mx

    def run():
        import mlx.core as mx
        a = to_mx(w)
        f = a.astype(mx.float32)
        out = (f / (mx.linalg.norm(f, axis=-1, keepdims=True) + 1e-7)).astype(a.dtype)
        mx.eval(out)
        return from_mx(out)

    return run_on_mlx_thread(run)


#: mlx-lm model types whose sanitize normalizes an unquantized lm_head's rows when it converts
#: (their runtime uses the head as stored; transformers normalizes it at run time).
_NORMALIZED_HEAD_ROWS = {"baichuan_m1"}


def _quant_outputs(path: str, shape: tuple[int, ...], dtype: str, q: _Q) -> list[tuple[str, str, tuple]]:
    lead, k = tuple(shape[:-1]), shape[-1]
    outs = [(f"{path}.weight", "U32", lead + (k * q.bits // 32,))]
    if q.mode == "affine":
        outs += [(f"{path}.scales", dtype, lead + (k // q.group_size,)),
                 (f"{path}.biases", dtype, lead + (k // q.group_size,))]
    else:
        outs.append((f"{path}.scales", "U8", lead + (k // q.group_size,)))
    return outs


# -- exact repacks --------------------------------------------------------------------------------

def _awq_gemm_weight(qweight: np.ndarray) -> np.ndarray:
    """AWQ GEMM ``qweight [K, N/8]`` → MLX 4-bit ``weight uint32 [N, K/8]`` without unpacking to codes.

    Byte b of GEMM word c holds columns ``8c+ORDER[2b]`` (low nibble) and ``8c+ORDER[2b+1]``; two
    consecutive K rows A, B of one byte give the MLX bytes ``lo(A)|lo(B)<<4`` (for the low-nibble
    column) and ``hi(A)|hi(B)&0xF0`` (for the high one) at byte ``k/2`` of those columns' rows.
    """
    from .formats import fast
    compiled = fast.awq_to_mlx_weight(qweight, awq.ORDER)
    if compiled is not None:  # one pass, same bytes (tested against this numpy path)
        return compiled
    k, n8 = qweight.shape
    by = np.ascontiguousarray(qweight).view(np.uint8).reshape(k, n8, 4)
    out = np.empty((n8 * 8, k // 2), np.uint8)
    o3 = out.reshape(n8, 8, k // 2)
    order = awq.ORDER

    tile = 256  # square tiles: numpy's strided transposes are several times faster in cache

    def block(h0, h1):  # pairs of K rows [h0, h1)
        for c0 in range(0, n8, tile):
            c1 = min(n8, c0 + tile)
            a, b = by[2 * h0:2 * h1:2, c0:c1], by[2 * h0 + 1:2 * h1:2, c0:c1]
            ev = (a & 0x0F) | (b << 4)
            od = (a >> 4) | (b & 0xF0)
            for j in range(4):
                o3[c0:c1, order[2 * j], h0:h1] = ev[:, :, j].T
                o3[c0:c1, order[2 * j + 1], h0:h1] = od[:, :, j].T

    for_row_blocks(k // 2, n8 * 8, block, min_rows=tile)
    return out.view(np.uint32)


@dataclass
class _Repack:
    """Inputs of an exact repack: how to make the weight, and the float32 scales and zero points.

    ``part(r0, r1)`` gives the scales and zero points of output rows ``[r0, r1)`` (float32
    ``[r1-r0, K/G]``, the scales exactly representable in ``src_dtype``): planning usually
    decides a layer from its first rows, so the whole layer's are made only when written.
    """

    weight: Callable[[], np.ndarray]        # uint32 [N, K*b/32]
    part: Callable[[int, int], tuple[np.ndarray, np.ndarray]]
    n: int                                  # output rows
    src_dtype: np.dtype
    group_codes: Callable[[np.ndarray, np.ndarray], np.ndarray]   # (rows, groups) -> uint8 [P, G]
    #: the whole layer's (scales, biases = -scales*zero) in one pass, where a kernel does it
    scales_biases: Callable[[], tuple[np.ndarray, np.ndarray] | None] = lambda: None

    def whole(self) -> tuple[np.ndarray, np.ndarray]:
        return self.part(0, self.n)

    def biased(self) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``(scales, biases)`` ``[N, K/G]`` of the whole layer, biases ``-s*z``."""
        got = self.scales_biases()
        if got is not None:
            return got
        s, z = self.whole()
        b = s * z  # z may be a view of a cached array: not changed in place
        np.negative(b, out=b)
        return s, b


def _stored_part(sc: np.ndarray, z: np.ndarray):
    """``part`` of scales and zero points stored ``[G, N]``: a row slice, cast and transposed in
    one pass each."""
    return lambda r0, r1: (sc[:, r0:r1].T.astype(np.float32, order="C"),
                           z[:, r0:r1].T.astype(np.float32, order="C"))


def _seq_group_codes(packed_rows: Callable[[np.ndarray], np.ndarray], bits: int, g: int):
    """Codes of (row, group) pairs for layouts packed sequentially along K, ``packed_rows(ns)``
    giving the uint32 words of rows ``ns`` ``[P, K*b/32]``."""
    wpg = g * bits // 32

    def fn(ns, gs):
        words = packed_rows(ns)
        idx = gs[:, None] * wpg + np.arange(wpg)[None, :]
        return unpack_bits(np.take_along_axis(words, idx, axis=1), bits, g)

    return fn


#: compressed-tensors schemes MLX has the very format of: encoded again in it by default.
_SAME_MX = {"ct-mxfp4": _Q(4, 32, "mxfp4"), "ct-mxfp8": _Q(8, 32, "mxfp8")}


def _repack_plan(model: Model, layer: Layer, target) -> tuple[_Repack | None, str]:
    """An exact repack of ``layer`` into MLX affine, or (None, why not)."""
    s, ck = layer.scheme, model.ckpt
    t = layer.tensors
    bits, g = layer.bits, layer.group_size
    if s not in ("gptq", "awq-gemm", "awq-gemv", "ct-pack"):
        if s == "mlx-affine" and target is not None and target != _Q(bits, g):
            return None, f"settings {target.label()} requested"  # (an MLX affine source, other settings asked)
        return None, f"{s} is not representable as MLX affine"
    if not layer.shape or len(layer.shape) != 2:
        return None, "not a 2-D layer"
    n, k = layer.shape
    if g is None:  # (it read "group size None is not one of (32, 64, 128)")
        strategy = (layer.settings or {}).get("strategy")
        return None, f"{strategy or 'per-row'} scales, no groups: MLX affine's groups are {AFFINE_GROUPS}"
    if g not in AFFINE_GROUPS or k % g:
        return None, f"group size {g} is not one of {AFFINE_GROUPS}"
    if bits not in AFFINE_BITS:
        return None, f"{bits} bit is not an MLX affine width"
    if target is not None and target != _Q(bits, g):
        return None, f"settings {target.label()} requested"
    read = ck.tensor
    if s == "gptq":
        if int(layer.settings.get("word_bits", 32)) != 32 or bits not in gptq.GPTQ_BITS:
            return None, "GPTQ pack_dtype is not int32"
        gi = read(t["g_idx"].name) if "g_idx" in t else None
        if not gptq.is_trivial_g_idx(gi, k, g):
            return None, "act-order g_idx"
        qw = read(t["qweight"].name)
        sc = read(t["scales"].name)
        version = int(layer.settings.get("version", 1))
        # the checks a decode makes (groups of scales and zeros against K): a layer that fails
        # them is named, not broadcast into a ValueError
        gptq.check_layer(qw, read(t["qzeros"].name), sc, gi, bits, g, layer.path)
        z = gptq.unpack_zeros(read(t["qzeros"].name), bits, n, version, layer.path)
        return _Repack(lambda: np.ascontiguousarray(qw.T).view(np.uint32), _stored_part(sc, z), n,
                       sc.dtype, _seq_group_codes(lambda ns: np.ascontiguousarray(qw[:, ns].T).view(np.uint32),
                                                  bits, g)), ""
    if s == "awq-gemm":
        qw = read(t["qweight"].name)
        sc = read(t["scales"].name)
        qz = read(t["qzeros"].name) if "qzeros" in t else None
        awq.check_gemm(qw, qz, sc, g, layer.path)  # a decode's checks, from shapes

        def part(r0, r1):
            s_p = sc[:, r0:r1].T.astype(np.float32, order="C")
            if qz is None:
                return s_p, np.full(s_p.shape, 8, np.float32)
            w0, w1 = r0 // 8, -(-r1 // 8)  # the packed words holding these rows (8 per word)
            z_p = awq.unpack_gemm(qz[:, w0:w1], 8 * (w1 - w0))[:, r0 - 8 * w0:r1 - 8 * w0]
            return s_p, z_p.T.astype(np.float32, order="C")

        def gemm_codes(ns, gs):
            rows = gs[:, None] * g + np.arange(g)[None, :]                  # [P, G] K indices
            words = qw.view(np.uint32)[rows, (ns // 8)[:, None]]
            return ((words >> (4 * awq.REV[ns % 8]).astype(np.uint32)[:, None]) & 0xF).astype(np.uint8)

        return _Repack(lambda: _awq_gemm_weight(qw), part, n, sc.dtype, gemm_codes,
                       lambda: fast.awq_scales_biases(sc, qz, awq._SHIFTS)), ""
    if s == "awq-gemv":
        qw = read(t["qweight"].name)
        sc = read(t["scales"].name)
        ng = k // g
        qz = read(t["qzeros"].name) if "qzeros" in t else None
        awq.check_gemv(qw, qz, sc, g, layer.path)  # a decode's checks
        z = (np.full((n, ng), 8, np.float32) if qz is None else unpack_bits(qz, 4, ng).astype(np.float32))
        u = qw.view(np.uint32)
        return _Repack(lambda: np.ascontiguousarray(u), lambda r0, r1: (sc[r0:r1, :ng].astype(np.float32), z[r0:r1]),
                       n, sc.dtype, _seq_group_codes(lambda ns: u[ns], 4, g)), ""
    # compressed-tensors pack-quantized
    st = layer.settings
    if (st.get("strategy") or "group") != "group":
        return None, f"{st.get('strategy')} strategy"
    if "weight_g_idx" in t and not gptq.is_trivial_g_idx(read(t["weight_g_idx"].name), k, g):
        return None, "act-order g_idx"
    wp = read(t["weight_packed"].name)
    sc = read(t["weight_scale"].name)
    legacy = st.get("packing") == "legacy" and 32 % bits != 0
    if legacy and wp.ndim == 2 and wp.shape[-1] * (32 // bits) >= k:
        # before 0.17, floor(32/b) codes a word and the word's top bits unused: the codes
        # repacked into MLX's bit stream (the dense layout) are the same codes (they were
        # requantized: rel_fro 0.11 of a 3-bit layer that MLX holds exactly)
        wp = bitpack.pack_bits(ct._unpack_legacy(wp, bits, k), bits)
    if wp.shape[-1] * 32 != k * bits or sc.shape != (n, k // g) or _st_name(sc.dtype) not in _FLOAT_ST:
        return None, "packed layout does not match MLX's"
    zp = t.get("weight_zero_point")
    zs = np.zeros((n, k // g), np.int16) if zp is None else ct._zero_points(
        read(zp.name), n, k // g, bits, "legacy" if legacy else "dense", (), layer.path)
    z = (np.broadcast_to(zs, (n, k // g)).astype(np.float32) + np.float32(1 << (bits - 1)))
    u = wp.view(np.uint32)
    return _Repack(lambda: np.ascontiguousarray(u), lambda r0, r1: (sc[r0:r1].astype(np.float32), z[r0:r1]), n,
                   sc.dtype, _seq_group_codes(lambda ns: u[ns], bits, g)), ""


def _affine_values(s: np.ndarray, b: np.ndarray, codes: np.ndarray, dtype) -> np.ndarray:
    """``round(round(s*q) + b)`` in ``dtype`` as mx.dequantize computes it; s, b float32 [...]."""
    t = s[..., None] * codes
    round_inplace(t, dtype)
    t += b[..., None]
    round_inplace(t, dtype)
    return t


def _keeps_dtype(rp: _Repack, bits: int, g: int) -> bool:
    """True when MLX affine with scales/biases in the source's dtype reproduces every stored value.

    The exact value is ``s*q + (-s*z)`` in float32 (what quantscope's decoders compute). For
    each group, every code 0..2^b-1 is checked first; where some code would come out differently,
    the codes that group actually stores decide (a few groups are looked at to find a witness;
    only without one is the whole layer compared).
    """
    dt = np.dtype(rp.src_dtype)
    if dt == np.float32 or dt == np.float64:
        return True
    codes = np.arange(1 << bits, dtype=np.float32)
    n = rp.n
    ng = rp.part(0, min(n, 1))[0].shape[1]
    # Small row chunks, growing: nearly every narrow-dtype layer fails in its first groups, and
    # one stored code that comes out differently decides the layer.
    step = max(1, (1 << 12) // max(1, ng * codes.size))
    max_step = max(1, (1 << 16) // max(1, ng * codes.size))
    unresolved = False
    r1 = 0
    while r1 < n:
        r0, r1 = r1, min(n, r1 + step)
        step = min(max_step, 2 * step)
        # these rows only: most layers are decided in their first chunk
        s, z = rp.part(r0, r1)
        b_exact = -(s * z)
        got = _affine_values(s, b_exact.astype(dt).astype(np.float32), codes, dt)
        want = s[..., None] * codes + b_exact[..., None]
        bad = got != want
        # A kernel that rounds once (fma in float32, then the dtype: GPU paths) needs the exact
        # value to be representable in the dtype as well.
        single = want.copy()
        round_inplace(single, dt)
        bad |= single != want
        if not bad.any():
            continue
        rows, grps = np.nonzero(bad.any(-1))
        rows, grps = rows[:64], grps[:64]
        used = rp.group_codes(rows + r0, grps)                            # [P, G] stored codes
        if np.take_along_axis(bad[rows, grps], used.astype(np.intp), axis=1).any():
            return False
        unresolved = True
    if not unresolved:
        return True
    # No witness among the first failing groups: compare the whole layer.
    w = rp.weight()
    from .formats.mlx import decode_affine
    s, b_exact = rp.biased()
    got = decode_affine(w, s.astype(dt), b_exact.astype(dt), bits=bits, group_size=g)
    want = decode_affine(w, s, b_exact, bits=bits, group_size=g)
    return bool(np.array_equal(got, want))


# -- planning -------------------------------------------------------------------------------------

@dataclass
class _Item:
    """One module's part of the output: its tensors (planned) and how to make them."""

    result: LayerResult
    outputs: list[tuple[str, str, tuple]]       # (name, safetensors dtype, shape), in write order
    make: Callable[[], dict[str, np.ndarray]]
    config: Any = None                          # _Q, False or None: its entry in "quantization"
    raw: dict[str, str] = field(default_factory=dict)   # output name -> source tensor carried byte for byte
    #: the output modules its "quantization" entry names, where they are not its own path (a
    #: stacked gate_up_proj written as mlx-lm's gate_proj and up_proj)
    config_paths: list[str] | None = None


def _carry(model: Model, layer: Layer, comps, item_outputs, raw):
    for c in comps:
        info = layer.tensors[c]
        name = info.stored_name  # (a stacked expert parameter under its own name, as stored)
        item_outputs.append((name, info.dtype, info.stored_shape))
        raw[name] = name


def _model_float_dtype(model: Model) -> np.dtype:
    cfg = model.ckpt.configs.get("config.json") or {}
    name = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    return {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}.get(
        name, np.dtype(ml_dtypes.bfloat16))


def _plan_mlx(model: Model, targets: _Targets, engine, notes: list[str], cancel, progress) -> list[_Item]:
    items: list[_Item] = []
    source_quantized = any(lay.quantized for lay in model.layers.values())
    model_dtype = _model_float_dtype(model)
    layers = list(model.layers.values())
    # a Falcon-H1 as transformers stores it: written as mlx-lm's conversion writes it (mup)
    hf_falcon = "falcon_h1" in model.ckpt.model_types() and mup.falcon_folded(model) is False
    if model.ckpt.tied_embeddings is True:
        # mlx-lm's models build no lm_head where the head is the embedding, and refuse the
        # tensors of one ("parameters not in model: lm_head.biases, lm_head.scales"); its
        # converter drops it, as here (it was quantized and written, and mlx-lm failed to load)
        heads = [lay for lay in layers if lay.path == "lm_head" or lay.path.endswith(".lm_head")]
        if heads:
            layers = [lay for lay in layers if lay not in heads]
            notes.append(f"dropped {', '.join(lay.path for lay in heads)}: tie_word_embeddings is true, so mlx-lm "
                         "uses the embeddings as the output head and does not load a stored one")

    def plan_one(i_layer):
        i, layer = i_layer
        _check(cancel)
        if progress is not None and i % 16 == 0:
            progress(i / max(1, len(layers)))
        try:
            return _plan_layer_mlx(model, layer, targets, engine, notes, source_quantized, model_dtype, hf_falcon)
        except LayerError as exc:  # the file named, as a decode names it
            raise exc.naming(model.ckpt.source, layer.path) from None

    # Planning reads and checks every layer's scales and zeros (numpy, GIL released): two
    # layers at a time halve it on a 2-core machine. map keeps the layers' order.
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="quantscope-plan") as pool:
        items.extend(pool.map(plan_one, enumerate(layers)))
    return items


#: model types whose stacked expert parameters (``{block}.experts.gate_up_proj`` / ``down_proj``)
#: convert writes as mlx-lm's model loads them: how its sanitize splits gate_up_proj's rows into
#: gate_proj and up_proj (concatenated or interleaved), and the module that holds the three
#: projections in place of ``experts`` (each equal, tensor for tensor, to mlx_lm.convert's or
#: mlx-lm's own quantization of the same model, which loads it: tests/fixtures/real's README);
#: other models' are carried as stored.
_MLX_EXPERT_LAYOUT = {"llama4": ("concat", "experts"), "gpt_oss": ("interleave", "experts"),
                      "qwen3_vl_moe": ("concat", "switch_mlp"), "qwen3_5_moe": ("concat", "switch_mlp"),
                      "gemma4": ("concat", "experts.switch_glu"), "gemma4_text": ("concat", "experts.switch_glu")}


def _expert_layout(model: Model) -> tuple[str, str] | None:
    return _MLX_EXPERT_LAYOUT.get(model.ckpt.model_types()[0])


def _plan_expert_param(model: Model, layer: Layer, q: _Q | None, dt: str, res: LayerResult) -> _Item:
    """A stacked expert parameter (``[E, N, K]`` as read) quantized as mlx-lm lays it out (or,
    ``q`` None, kept dense in that layout, ``dt`` its dtype): its gate_up_proj split into gate_proj
    and up_proj (rows concatenated or interleaved per expert, in the module :data:`_MLX_EXPERT_LAYOUT` names), its bias
    split the same way; one expert at a time through ``mx.quantize`` (a gpt-oss-120b stack is 4 GB)."""
    path, w, bias = layer.path, layer.tensors["weight"], layer.tensors.get("bias")
    e_n, n, k = layer.shape
    dropped = [c for c in layer.tensors if c not in ("weight", "bias")]
    if dropped or (bias is not None and tuple(bias.shape) != (e_n, n)):
        raise LayerConversionError(f"cannot convert: stacked expert parameter with {', '.join(dropped) or 'a bias'} "
                                   "of a shape mlx-lm does not load", file=model.ckpt.source, tensor=path,
                                   rule="convert.undecodable")
    parent, _, proj = path.rpartition(".")
    split, home = _expert_layout(model)
    if parent == "experts" or parent.endswith(".experts"):  # (…experts → …switch_mlp, …experts.switch_glu)
        parent = parent[:-len("experts")] + home
    halves = (slice(0, n // 2), slice(n // 2, n)) if split == "concat" else (slice(0, None, 2), slice(1, None, 2))
    parts = [(f"{parent}.gate_proj", halves[0]), (f"{parent}.up_proj", halves[1])] \
        if proj == "gate_up_proj" and n % 2 == 0 else [(f"{parent}.{proj}", slice(None))]
    outputs, planned = [], []
    for p, sl in parts:
        rows = len(range(n)[sl])
        outs = _quant_outputs(p, (e_n, rows, k), dt, q) if q is not None else [(f"{p}.weight", dt, (e_n, rows, k))]
        if bias is not None:
            outs.append((f"{p}.bias", bias.dtype, (e_n, rows)))
        outputs += outs
        planned.append((p, sl, outs))
    split = " as gate_proj + up_proj" if len(parts) > 1 else ""
    if q is None:
        res.action += split
    else:
        res.action, res.bits, res.group_size, res.mode, res.scales_dtype = \
            f"quantized {q.label()}{split}", q.bits, q.group_size, q.mode, dt

    def make():
        a = model.ckpt.tensor(w.name)  # [E, N, K] (a view of [E, K, N] where stored so)
        b = None if bias is None else model.ckpt.tensor(bias.name)
        out = {name: np.empty(shape, np.uint32 if st == "U32" else np.uint8 if st == "U8" else
                              DTYPES[st].numpy) for p, _, outs in planned for name, st, shape in outs}
        for p, sl, outs in planned:
            names = [o[0] for o in outs if not o[0].endswith(".bias")]
            for e in range(e_n):
                if q is None:
                    out[f"{p}.weight"][e] = a[e, sl]
                    continue
                for name, got in zip(names, _mx_quantize(np.ascontiguousarray(a[e, sl]), a.dtype, q)):
                    out[name][e] = got
            if b is not None:
                out[f"{p}.bias"][...] = b[:, sl]
        return out

    return _Item(res, outputs, make, config=q if q is not None else False, config_paths=[p for p, _ in parts])


#: mlx-lm model types whose sanitize splits MLA's ``self_attn.kv_b_proj`` ``[H·(nope+v), L]`` per
#: head into ``embed_q`` ``[H, L, nope]`` (the nope rows, transposed) and ``unembed_out``
#: ``[H, v, L]``: quantized as a whole, it is dequantized and quantized again when mlx-lm loads
#: it (the embed_q half along other groups: two roundings).
_MLA_SPLIT = frozenset({"deepseek_v3", "deepseek_v32", "kimi_k2", "joyai_llm_flash", "glm4_moe_lite"})


def _mla_dims(model: Model, layer: Layer) -> tuple[int, int, int, int] | None:
    """(heads, nope, v, kv_lora) of an MLA kv_b_proj convert splits as mlx-lm does, else None."""
    if model.ckpt.model_types()[0] not in _MLA_SPLIT or not layer.path.endswith("self_attn.kv_b_proj"):
        return None
    cfg = model.ckpt.configs.get("config.json") or {}
    dims = [cfg.get(k) for k in ("num_attention_heads", "qk_nope_head_dim", "v_head_dim", "kv_lora_rank")]
    if not all(isinstance(d, int) and d > 0 for d in dims) or layer.shape is None:
        return None
    h, n, v, lat = dims
    return (h, n, v, lat) if tuple(layer.shape) == (h * (n + v), lat) else None


def _plan_mla(model: Model, layer: Layer, q: _Q, dt: str, res: LayerResult, read=None, how="quantized") -> _Item:
    """MLA's kv_b_proj as mlx-lm lays it out: per head, its nope rows transposed as ``embed_q``
    ``[H, L, nope]`` and its v rows as ``unembed_out`` ``[H, v, L]``, each quantized along its last
    axis where ``q``'s group size divides it, else kept dense (as mlx-lm's sanitize and
    quantization do). ``read``: the layer's values (a quantized source's decode; default its
    stored tensor); ``dt``: the scales' dtype, and a dense part's."""
    h, n, v, lat = _mla_dims(model, layer)
    parent = layer.path.rpartition(".")[0]
    parts = [(f"{parent}.embed_q", (h, lat, n)), (f"{parent}.unembed_out", (h, v, lat))]
    quantized = [path for path, shape in parts if not shape[-1] % q.group_size]
    planned = {path: _quant_outputs(path, shape, dt, q) if path in quantized else [(f"{path}.weight", dt, shape)]
               for path, shape in parts}
    outputs = [o for outs in planned.values() for o in outs]
    names = " + ".join(path.rpartition(".")[2] for path in quantized)
    dense = [path.rpartition(".")[2] for path, _ in parts if path not in quantized]
    res.action = f"{how} {q.label()} as {names}" if quantized else "kept dense"
    res.action += f" ({' and '.join(dense)} kept dense: inputs no multiple of {q.group_size})" if dense else ""
    if quantized:
        res.bits, res.group_size, res.mode, res.scales_dtype = q.bits, q.group_size, q.mode, dt
    if read is None:
        def read():
            return np.asarray(model.ckpt.tensor(layer.tensors["weight"].name))

    def make():
        a = read().reshape(h, n + v, lat)
        out = {}
        for (path, _), part in zip(parts, (a[:, :n].transpose(0, 2, 1), a[:, n:])):
            if path not in quantized:
                out[f"{path}.weight"] = np.ascontiguousarray(part).astype(DTYPES[dt].numpy)
                continue
            # (head by head: groups run along the last axis, so each head is quantized alone)
            got = [_mx_quantize(np.ascontiguousarray(part[i]), DTYPES[dt].numpy, q) for i in range(h)]
            out.update({name: np.stack([g[j] for g in got]) for j, (name, _, _) in enumerate(planned[path])})
        return out

    return _Item(res, outputs, make, config=q if quantized else False, config_paths=quantized or [p for p, _ in parts])


def _aux(layer: Layer, keep_all: bool) -> tuple[list[str], list[str]]:
    """Components carried next to a quantized/converted weight, and those dropped."""
    keep = [c for c in ("bias",) if c in layer.tensors]
    dropped = [layer.tensors[c].name for c in layer.tensors if c in AUX_COMPONENTS and c != "bias"]
    return keep, dropped


#: Components that only a quantized layer has: an unrecognised layer holding one is broken (the
#: analysis's own list, and the packed codes and bitsandbytes' state).
_QUANT_PARTS = frozenset(QUANT_PARTS) | {"qweight", "weight_packed", "biases", "SCB", "absmax", "quant_map"}


def _refuse_broken(model: Model, layer: Layer) -> None:
    """A layer that no scheme decodes but that holds quantization parts (packed codes whose
    scales are missing, scales beside no codes, an unknown MLX mode) or integer weights is
    broken, not unknown: carrying it through (int32 words or stray scales in a "dense" output,
    exit 0) hid that."""
    w = layer.tensors.get("weight")
    # (a float weight beside quantization parts too: a quantized layer saved unquantized or
    # relabelled F32; dequant refused it, convert copied weight and stale scales, exit 0)
    stale = layer.scheme == "dense" and layer.problem is not None and any(c in layer.tensors for c in _QUANT_PARTS)
    # (and packed codes of a format quantscope does not know: HQQ's W_q was carried into a
    # "dense" output, exit 0; I64 buffers such as position_ids are carried)
    packed = any(t.dtype in ("U8", "I8", "U16", "I16", "U32", "I32") and len(t.shape) >= 2
                 for t in layer.tensors.values())
    if stale or layer.scheme == "unknown" and (any(c in layer.tensors for c in _QUANT_PARTS) or packed
                                               or layer.settings.get("scalar_weight")
                                               or (w is not None and w.dtype not in _FLOAT_ST)):
        raise LayerConversionError(f"cannot convert: {layer.problem or 'packed codes that nothing decodes'}",
                              file=model.ckpt.source, tensor=layer.path, rule="convert.undecodable")


def _falcon_conv(model: Model, layer: Layer, res: LayerResult) -> _Item:
    """A Falcon-H1 Mamba conv1d as mlx-lm's conversion writes it: its weight ``[C, 1, k]`` as
    ``[C, k, 1]`` (mlx-lm's sanitize tells a file to fold by this layout: left as transformers
    stores it, its load multiplied the packed weights by the muP multipliers), its bias carried."""
    w = layer.tensors["weight"]
    c, one, k = w.stored_shape
    outputs = [(w.stored_name, w.dtype, (c, k, one))]
    raw: dict = {}
    _carry(model, layer, [n for n in layer.tensors if n != "weight"], outputs, raw)
    res.action = "carried, transposed to mlx-lm's [C, k, 1]"
    return _Item(res, outputs, lambda: {w.stored_name: np.ascontiguousarray(
        np.asarray(model.ckpt.tensor(w.name)).transpose(0, 2, 1))}, config=False, raw=raw)


def _plan_layer_mlx(model, layer: Layer, targets: _Targets, engine, notes, source_quantized, model_dtype,
                    hf_falcon: bool = False) -> _Item:
    path = layer.path
    _refuse_broken(model, layer)
    res = LayerResult(path, layer.scheme, "carried")
    outputs: list = []
    raw: dict = {}
    target = targets.for_layer(path)
    # Falcon-H1's muP multipliers, folded into the rows as mlx-lm's conversion folds them (mup)
    fold = None
    if hf_falcon and layer.shape and len(layer.shape) == 2 and not layer.problem:
        w0 = layer.tensors.get("weight")
        got = mup.falcon_factors(model, path, int(layer.shape[0]),
                                 w0.dtype if layer.scheme == "dense" and w0 is not None else _st_name(model_dtype))
        fold = None if got is None else got[0]
    if hf_falcon and path.endswith("mamba.conv1d") and layer.scheme == "dense" and "weight" in layer.tensors \
            and len(layer.tensors["weight"].stored_shape or ()) == 3 and layer.tensors["weight"].stored_shape[1] == 1:
        return _falcon_conv(model, layer, res)

    # Baichuan-M1's head: its rows normalized, as mlx-lm's conversion writes it (a quantized head is
    # taken as such by mlx-lm's load; a dense one it normalizes itself)
    # (a dense head always, as mlx-lm's sanitize does; a quantized one where its rows are not unit
    # norms already: mlx-lm's load would take it as normalized)
    norm_rows = targets.model_type in _NORMALIZED_HEAD_ROWS and path == "lm_head" and layer.is_matrix and (
        layer.scheme == "dense" or (layer.decodable and rows_normalized(model, layer) is False))

    def folded(a):
        a = a if fold is None else mup.fold(a, fold)
        return _mx_normalize_rows(a) if norm_rows and target is not False else a
    if layer.scheme == "unknown" or (layer.scheme == "dense" and (layer.problem or not layer.is_matrix
                                                                   or "weight" not in layer.tensors)):
        _carry(model, layer, list(layer.tensors), outputs, raw)
        return _Item(res, outputs, dict, raw=raw)
    if layer.scheme == "dense":
        w = layer.tensors["weight"]
        # (transformers' stacked expert parameter of a model whose mlx-lm layout convert writes)
        mlx_stack = w.source is not None and len(layer.shape) == 3 and _expert_layout(model) is not None
        others = [c for c in layer.tensors if c != "weight"]
        k = layer.shape[-1]
        reason = None
        if w.dtype not in _FLOAT_ST:
            reason = f"{w.dtype} weight"
        elif w.source is not None and not mlx_stack:
            # (mlx-lm's loaders split and transpose such parameters into their own stacks; written
            # quantized under the name read here, nothing would load them)
            reason = (f"transformers' stacked expert parameter {w.source.rsplit('.', 1)[-1]}"
                      + (" [E, K, N]" if w.transposed else "") + ", carried as stored: mlx-lm splits it when it loads")
        elif not layer.numel:
            reason = "empty: " + "×".join(map(str, layer.shape))
        elif len(layer.shape) > 3:
            reason = f"{len(layer.shape)}-D weight"
        elif target is None and source_quantized:
            reason = "not quantized in the source"
        elif target is None:
            target = targets.uniform(path)
        if reason is None and target is False:
            reason = ("mlx-lm's router for " + targets.model_type + " is no Linear: it holds its weight itself"
                      if targets.holds_weight(path) else targets.dense_why[path] if path in targets.dense_why
                      else f"mlx-lm keeps it dense for {targets.model_type}"
                      if targets.rule(path) is False else "recipe: false")
        q = target if isinstance(target, _Q) else targets.default
        if reason is None and k % q.group_size:
            reason = f"input dimension {k} is not a multiple of group size {q.group_size}"
        if reason is not None:
            res.action = f"kept dense ({reason})"
            if mlx_stack:
                # (in mlx-lm's layout all the same: its gpt_oss sanitize leaves a file holding any
                # experts.gate_proj.weight as it is, and refused the stored parameter beside it)
                return _plan_expert_param(model, layer, None, w.dtype, res)
            if fold is not None and w.dtype in _FLOAT_ST:  # (dense, its multiplier folded in all the same)
                res.action += ", muP multiplier folded in as mlx-lm does"
                outputs.append((w.stored_name, w.dtype, w.stored_shape))
                _carry(model, layer, others, outputs, raw)
                return _Item(res, outputs, lambda: {w.stored_name: folded(np.asarray(model.ckpt.tensor(w.name)))},
                             config=False, raw=raw)
            _carry(model, layer, list(layer.tensors), outputs, raw)
            return _Item(res, outputs, dict, config=False, raw=raw)
        dt = w.dtype if q.mode == "affine" else "U8"
        if mlx_stack:
            return _plan_expert_param(model, layer, q, dt, res)
        if not others and _mla_dims(model, layer) is not None and q.mode == "affine":
            return _plan_mla(model, layer, q, dt, res)
        outputs = _quant_outputs(path, layer.shape, dt, q)
        _carry(model, layer, others, outputs, raw)
        res.action, res.bits, res.group_size, res.mode, res.scales_dtype = \
            f"quantized {q.label()}", q.bits, q.group_size, q.mode, dt

        if norm_rows:
            res.action += ", rows normalized first as mlx-lm's baichuan_m1 does (its load then takes it as is)"

        def make_dense_q():
            a = folded(np.asarray(model.ckpt.tensor(w.name)))
            parts = _mx_quantize(a, a.dtype, q)
            return dict(zip([o[0] for o in outputs], parts))

        return _Item(res, outputs, make_dense_q, config=q, raw=raw)
    # quantized source layer
    if not layer.decodable:
        raise LayerConversionError(f"cannot convert: {layer.problem or 'not decodable'}", file=model.ckpt.source,
                              tensor=path, rule="convert.undecodable")
    keep, dropped = _aux(layer, False)
    if dropped:
        notes.append(f"{path}: dropped {', '.join(n.rsplit('.', 1)[1] for n in dropped)} (not part of MLX layers)")
    if target is False:
        res.action = ("kept dense (mlx-lm's router for " + targets.model_type + " is no Linear; dequantized)"
                      if targets.holds_weight(path) else f"kept dense ({targets.dense_why[path]}; dequantized)"
                      if path in targets.dense_why else "kept dense (recipe: false; dequantized)")
        dt = _st_name(model_dtype)
        outputs = [(f"{path}.weight", dt, layer.shape)]
        _carry(model, layer, keep, outputs, raw)
        return _Item(res, outputs, lambda: {f"{path}.weight": folded(engine.dequantize(model, layer).astype(model_dtype))},
                     config=False, raw=raw)
    # MLX already in the requested settings: copy.
    if layer.scheme.startswith("mlx-"):
        same = _Q(layer.bits, layer.group_size, layer.mode)
        if (target is None or target == same) and fold is not None and same.mode == "affine" \
                and {"weight", "scales", "biases"} <= set(layer.tensors):
            # an MLX Falcon-H1 written without its multipliers folded (what convert wrote before
            # 2026-12): f·(s·q + b) = (f·s)·q + f·b, in float32; its codes kept
            sb = {c: layer.tensors[c] for c in ("scales", "biases")}
            # (--scales source: in the source's dtype, rounded; else float32, widened and said)
            st = sb["scales"].dtype if targets.source_scales else "F32"
            res.action = "copied, muP multiplier folded into its scales and biases" + (
                f", rounded to {st}" if targets.source_scales else "")
            res.bits, res.group_size, res.mode, res.scales_dtype = same.bits, same.group_size, same.mode, st
            res.widened = not targets.source_scales
            outputs = [(t.stored_name, st, t.stored_shape) for t in sb.values()]
            _carry(model, layer, [c for c in layer.tensors if c not in sb], outputs, raw)

            def make_scaled():
                f = fold.astype(np.float32)[:, None]
                return {t.stored_name: (np.asarray(model.ckpt.tensor(t.name)).astype(np.float32) * f).astype(
                    _np_dtype(st), copy=False) for t in sb.values()}

            return _Item(res, outputs, make_scaled, config=same, raw=raw)
        if (target is None or target == same) and fold is not None:
            target = same  # (mxfp4 and the like: no exact fold; decoded, folded and requantized below)
        elif norm_rows and (target is None or target == same):
            target = same  # (its rows normalized: decoded, normalized and quantized again below)
        elif target is None or target == same:
            res.action, res.bits, res.group_size, res.mode = "copied exact", same.bits, same.group_size, same.mode
            res.scales_dtype = layer.tensors["scales"].dtype
            _carry(model, layer, list(layer.tensors), outputs, raw)
            return _Item(res, outputs, dict, config=same, raw=raw)
    if not keep and _mla_dims(model, layer) is not None:
        # MLA's kv_b_proj as mlx-lm lays it out (DeepSeek's FP8 release, Kimi K2's int4): written
        # whole, mlx-lm's sanitize decoded it and quantized it again at every load
        q = _requant_settings(layer, target, targets)
        if q.mode == "affine":
            return _plan_mla(model, layer, q, _st_name(model_dtype), res, how="requantized",
                             read=lambda: np.asarray(engine.dequantize(model, layer)).astype(model_dtype))
    rp, why = _repack_plan(model, layer, target)
    if rp is not None and norm_rows:  # (the rows normalized first: no exact repack)
        rp, why = None, "its rows normalized as mlx-lm's baichuan_m1 takes a quantized head"
    if rp is not None:
        bits, g = layer.bits, layer.group_size
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf scales: the verification says so
            keep_dt = fold is None and _keeps_dtype(rp, bits, g)  # (a multiplier folded in: float32)
        rounded = not keep_dt and targets.source_scales  # (--scales source: the runtime's dtype)
        sdt = rp.src_dtype if keep_dt or rounded else np.dtype(np.float32)
        st = _st_name(sdt)
        q = _Q(bits, g)
        outputs = _quant_outputs(path, layer.shape, st, q)
        _carry(model, layer, keep, outputs, raw)
        res.action = "repacked, biases rounded" if rounded else "repacked exact"
        if fold is not None:
            res.action += ", muP multiplier folded into its scales and biases"
        res.bits, res.group_size, res.mode, res.scales_dtype = bits, g, "affine", st
        res.widened = not keep_dt and not rounded

        def make_repack():
            r, _ = _repack_plan(model, layer, target)
            s, b = r.biased()
            if fold is not None:  # f·(s·q + b) = (f·s)·q + f·b, row by row
                f = fold.astype(np.float32)[:, None]
                s, b = s * f, b * f
            return {f"{path}.weight": r.weight(), f"{path}.scales": s.astype(sdt, copy=False),
                    f"{path}.biases": b.astype(sdt, copy=False)}

        return _Item(res, outputs, make_repack, config=q, raw=raw)
    same_mx = _SAME_MX.get(layer.scheme)
    q = _requant_settings(layer, target, targets, same_mx)
    if q.mode != "affine":
        why = None  # (that it is not representable as affine says nothing here)
    k = layer.shape[-1]
    if k % q.group_size:
        # Cannot quantize at this group size: keep the decoded weights.
        res.action = f"kept dense (input dimension {k} is not a multiple of group size {q.group_size}; dequantized)"
        dt = _st_name(model_dtype)
        outputs = [(f"{path}.weight", dt, layer.shape)]
        _carry(model, layer, keep, outputs, raw)
        return _Item(res, outputs, lambda: {f"{path}.weight": folded(engine.dequantize(model, layer).astype(model_dtype))},
                     config=False, raw=raw)
    st = _st_name(model_dtype) if q.mode == "affine" else "U8"
    outputs = _quant_outputs(path, layer.shape, st, q)
    _carry(model, layer, keep, outputs, raw)
    if same_mx is not None and q == same_mx:
        res.action = f"re-encoded {q.label()} (the same format as {layer.scheme}: its values kept)"
    else:
        res.action = f"requantized {q.label()} ({why})" if why else f"requantized {q.label()}"
    if fold is not None:
        res.action += ", muP multiplier folded in"
    if norm_rows and "normalized" not in res.action:
        res.action += ", rows normalized first as mlx-lm's baichuan_m1 takes a quantized head"
    res.bits, res.group_size, res.mode, res.scales_dtype = q.bits, q.group_size, q.mode, st

    def make_requant():
        wf = folded(np.asarray(engine.dequantize(model, layer)).astype(model_dtype))
        parts = _mx_quantize(wf, model_dtype, q)
        return dict(zip([o[0] for o in outputs], parts))

    return _Item(res, outputs, make_requant, config=q, raw=raw)


def _requant_settings(layer: Layer, target, targets: _Targets, same_mx: _Q | None = None) -> _Q:
    """The settings a quantized source layer is quantized again at: the target's, else the
    uniform ones; by default (no --bits, recipe or model rule) its own bit width, and an MX
    source ``same_mx`` stays MX (MLX's mxfp4/mxfp8 are the same format: its values come back
    exactly; made affine 4/64 it lost a tenth of its weight, rel_fro 0.09)."""
    q = target if isinstance(target, _Q) else targets.uniform(layer.path) or targets.default
    if target is None and not targets.explicit and targets.rule(layer.path) is None:
        q = same_mx or _Q(_bits_for_source(layer.bits, q.bits), q.group_size)
    return q


def _stack_experts(model: Model, items: list[_Item]) -> list[_Item]:
    """Per-expert MoE modules (``….experts.{e}.gate_proj``; Mixtral's ``w1/w3/w2``) as mlx-lm
    loads them: one ``….switch_mlp.{gate,up,down}_proj`` module per projection, each tensor the
    experts' stacked along a new first axis (``[E, N, K·bits/32]``, scales and biases
    ``[E, N, K/G]``), in the place of expert 0: what mlx-lm writes itself and every model class
    of it loads. Experts written one by one load only where the class's ``sanitize`` stacks
    their scales and biases too (mixtral, qwen2_moe, …); qwen3_moe's, for one, stacks only
    ``.weight``.
    The experts must be 0..E-1 and converted alike (one setting, the same tensors); a tensor whose
    float dtype differs between experts (scales widened to float32 for some, see the module doc;
    a carried bias in bf16 here and f16 there) is written in float32 (float64 if one is), which
    holds every source value exactly."""
    groups: dict[str, dict[int, int]] = {}
    for i, it in enumerate(items):
        sp = switch_path(it.result.path)
        if sp is not None:
            groups.setdefault(sp[0], {})[sp[1]] = i
    replace: dict[int, _Item] = {}
    for spath, by_e in groups.items():
        members = [items[by_e[e]] for e in sorted(by_e)]
        first = members[0].result

        def refuse(why: str, spath=spath, first=first):
            raise ConversionError(f"cannot stack the experts into {spath} (the layout mlx-lm loads): {why}",
                                  file=model.ckpt.source, tensor=first.path, rule="convert.moe-experts")

        n_exp = len(members)
        if sorted(by_e) != list(range(n_exp)):
            missing = sorted(set(range(max(by_e) + 1)) - set(by_e))
            refuse(f"expert(s) {', '.join(map(str, missing[:8]))}{' …' if len(missing) > 8 else ''} missing")
        if spath in model.layers:
            refuse("the source has that module too")
        configs = {m.config for m in members}
        if len(configs) > 1:
            refuse("the experts are converted with different settings ("
                   + ", ".join(sorted(c.label() if isinstance(c, _Q) else "dense" for c in configs)) + ")")
        suffixes = [name[len(first.path) + 1:] for name, _, _ in members[0].outputs]
        plan = []
        for j, suf in enumerate(suffixes):
            dts, shapes = set(), set()
            for m in members:
                outs = m.outputs
                if [n[len(m.result.path) + 1:] for n, _, _ in outs] != suffixes:
                    refuse(f"{m.result.path} has tensors {[n.rsplit('.', 1)[1] for n, _, _ in outs]}, "
                           f"expert 0 {suffixes}")
                dts.add(outs[j][1])
                shapes.add(tuple(outs[j][2]))
            if len(shapes) > 1:
                refuse(f"the experts' {suf} shapes differ ({', '.join(str(list(x)) for x in sorted(shapes))})")
            if len(dts) > 1 and not dts <= set(_FLOAT_ST):
                refuse(f"the experts' {suf} dtypes differ ({', '.join(sorted(dts))})")
            wide = "F64" if "F64" in dts else "F32"  # holds every value of the narrower floats exactly
            plan.append((suf, dts.pop() if len(dts) == 1 else wide, (n_exp, *shapes.pop())))
        actions: dict[str, int] = {}
        for m in members:
            actions[m.result.action] = actions.get(m.result.action, 0) + 1
        action = (next(iter(actions)) if len(actions) == 1
                  else "; ".join(f"{a} ×{c}" for a, c in sorted(actions.items(), key=lambda x: -x[1])))
        sdt = {suf: dt for suf, dt, _ in plan}.get("scales", first.scales_dtype)
        res = LayerResult(spath, first.source_scheme, f"{action}, {n_exp} experts stacked", first.bits,
                          first.group_size, first.mode, sdt,
                          any(m.result.widened for m in members) or sdt != first.scales_dtype,
                          experts=[m.result.path for m in members])

        def make(members=members, suffixes=suffixes, spath=spath, plan=plan):
            # each expert written into its slot of the stack as it is made: the stack and one
            # expert in memory, not every expert's arrays and then their stack (a DeepSeek-sized
            # projection is gigabytes); each cast on the way (numpy cannot stack bf16 with f16)
            out = {suf: np.empty(shape, _np_dtype(dt)) for suf, dt, shape in plan}
            for e, m in enumerate(members):
                got = m.make()
                for (name, _, _), suf in zip(m.outputs, suffixes):
                    out[suf][e] = model.ckpt.tensor(m.raw[name]) if name in m.raw else got[name]
                del got
            return {f"{spath}.{suf}": a for suf, a in out.items()}

        replace[by_e[0]] = _Item(res, [(f"{spath}.{suf}", dt, shape) for suf, dt, shape in plan], make,
                                 config=members[0].config)
    if not replace:
        return items
    gone = {i for by_e in groups.values() for i in by_e.values()}
    return [replace.get(i, it) for i, it in enumerate(items) if i in replace or i not in gone]


def _plan_dense(model: Model, dtype: np.dtype, engine, notes: list[str], cancel) -> list[_Item]:
    items = []
    st = _st_name(dtype)
    dname = [k for k, v in _DTYPE_ARG.items() if v == dtype][0]
    for layer in model.layers.values():
        _check(cancel)
        path = layer.path
        _refuse_broken(model, layer)
        res = LayerResult(path, layer.scheme, "carried")
        outputs, raw, casts = [], {}, {}
        if layer.quantized:
            if not layer.decodable:
                raise LayerConversionError(f"cannot convert: {layer.problem or 'not decodable'}", file=model.ckpt.source,
                                      tensor=path, rule="convert.undecodable")
            keep, dropped = _aux(layer, False)
            if dropped:
                notes.append(f"{path}: dropped {', '.join(n.rsplit('.', 1)[1] for n in dropped)}")
            res.action = f"dequantized to {dname}"
            outputs.append((f"{path}.weight", st, tuple(layer.shape)))
            comps = keep

            def make(layer=layer, path=path):
                return {f"{path}.weight": engine.dequantize(model, layer).astype(dtype)}
        else:
            comps = list(layer.tensors)

            def make():
                return {}
        for c in comps:
            info = layer.tensors[c]
            if info.dtype in _FLOAT_ST:
                # (a stacked expert parameter under its own name and in its stored layout:
                # transformers loads it so)
                outputs.append((info.stored_name, st, info.stored_shape))
                casts[info.stored_name] = info.stored_name
                if not layer.quantized and info.dtype != st:
                    res.action = f"cast to {dname}"
            else:
                outputs.append((info.stored_name, info.dtype, info.stored_shape))
                raw[info.stored_name] = info.stored_name

        def make_all(make=make, casts=casts):
            out = make()
            for name in casts:
                out[name] = np.asarray(model.ckpt.tensor(name)).astype(dtype)
            return out

        items.append(_Item(res, outputs, make_all, raw=raw))
    return items


# -- writing --------------------------------------------------------------------------------------

def _nbytes(dtype: str, shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * DTYPES[dtype].bits // 8


def _shard_plan(items: list[_Item], limit: int) -> list[list[tuple[str, str, tuple]]]:
    shards: list[list] = [[]]
    size = 0
    for it in items:
        for o in it.outputs:
            nb = _nbytes(o[1], o[2])
            if shards[-1] and size + nb > limit:
                shards.append([])
                size = 0
            shards[-1].append(o)
            size += nb
    return shards if shards[0] else []


class _ShardWriter:
    """Writes planned tensors in order: each shard's header first, then tensor bytes as they come."""

    def __init__(self, folder: Path, shards, metadata: dict[str, str]) -> None:
        self.folder = folder
        self.shards = shards
        self.metadata = metadata
        n = len(shards)
        self.names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                                           for i in range(n)]
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self._i = -1
        self._j = 0
        self._fh = None

    def _open_next(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._i += 1
        self._j = 0
        entries = self.shards[self._i]
        header: dict = {"__metadata__": self.metadata}
        off = 0
        for name, dt, shape in entries:
            nb = _nbytes(dt, shape)
            header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
            self.weight_map[name] = self.names[self._i]
        self.total += off
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        self._fh = open(self.folder / self.names[self._i], "wb")
        self._fh.write(struct.pack("<Q", len(hb)) + hb)

    def write(self, name: str, data) -> None:
        if self._fh is None or self._j >= len(self.shards[self._i]):
            self._open_next()
        exp_name, exp_dt, exp_shape = self.shards[self._i][self._j]
        if isinstance(data, np.ndarray):
            if name != exp_name or _st_name(data.dtype) != exp_dt or tuple(data.shape) != tuple(exp_shape):
                raise ConversionError(f"internal: produced {name} {_st_name(data.dtype)} {list(data.shape)}, "
                                      f"planned {exp_name} {exp_dt} {list(exp_shape)}", tensor=name)
            a = np.ascontiguousarray(data)
            if sys.byteorder != "little":
                a = a.astype(a.dtype.newbyteorder("<"))
            self._fh.write(a.reshape(-1).view(np.uint8).data)
        else:  # raw bytes of a carried tensor
            if name != exp_name or len(data) != _nbytes(exp_dt, exp_shape):
                raise ConversionError(f"internal: carried {name} does not match its plan", tensor=name)
            self._fh.write(data)
        self._j += 1

    def write_carried(self, name: str, src, src_name: str) -> None:
        """A carried tensor byte for byte from its source file (``src``, a SafetensorsFile). On
        Linux the kernel copies the range page cache to page cache (``os.copy_file_range``),
        without a trip through this process; elsewhere (or if that fails) the mapped bytes are
        written."""
        if self._fh is None or self._j >= len(self.shards[self._i]):
            self._open_next()
        exp_name, exp_dt, exp_shape = self.shards[self._i][self._j]
        info = src.info(src_name)
        start, length = info.start, info.end - info.start
        if name != exp_name or length != _nbytes(exp_dt, exp_shape):
            raise ConversionError(f"internal: carried {name} does not match its plan", tensor=name)
        done = 0
        if hasattr(os, "copy_file_range") and length >= (1 << 20):
            self._fh.flush()
            try:
                with open(src.path, "rb") as fin:
                    while done < length:
                        n = os.copy_file_range(fin.fileno(), self._fh.fileno(), length - done, start + done)
                        if n <= 0:
                            break
                        done += n
            except OSError:
                pass  # a file system without it: the rest is written below
        if done < length:
            self._fh.write(src.raw_bytes(src_name)[done:])
        self._j += 1

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def finish(self) -> list[str]:
        self.close()
        if self._i != len(self.shards) - 1 or (self.shards and self._j != len(self.shards[-1])):
            raise ConversionError("internal: not every planned tensor was written")
        if len(self.names) > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n",
                                                                       encoding="utf-8")
            return self.names + ["model.safetensors.index.json"]
        return list(self.names)


# -- files, destination, safety -------------------------------------------------------------------

def _check(cancel) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("conversion cancelled")


def _copy_list(ckpt: Checkpoint, src: Path) -> list[Path]:
    root = ckpt.root
    single = not (src.is_dir() or src.name.endswith(".json"))
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if p.name.endswith(_WEIGHT_SUFFIXES) or p.name.endswith(".index.json"):
            continue
        if len(rel.parts) == 1 and p.name in _SKIP_FILES:
            continue
        if single and (len(rel.parts) > 1 or not _SINGLE_FILE_COPIES.match(p.name)):
            continue
        out.append(p)
    return out


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _hidden_name(dst: Path, tag: str) -> Path:
    """``.DST.<tag>-<pid>`` beside ``dst``, with DST cut (and a digest of it added) where the
    whole would pass the file system's 255 bytes: a destination name of 230 characters failed
    with "File name too long" for the hidden folder, not for itself."""
    stem = dst.name
    if len(stem.encode()) > 120:
        stem = stem.encode()[:100].decode(errors="ignore") + "-" + hashlib.sha1(stem.encode()).hexdigest()[:8]
    return dst.parent / f".{stem}.{tag}-{os.getpid()}"


def _clean_stale(dst: Path) -> None:
    """Remove ``.NAME.quantscope-partial-<pid>`` folders beside ``dst`` left by killed
    conversions (of whatever destination: a conversion killed and not run again to the same
    name left its partial output, tens of GB on a real model, for good)."""
    for p in dst.parent.glob(f".*.{PARTIAL_TAG}-*"):
        tail = p.name.rsplit("-", 1)[-1]
        if tail.isdigit() and not _pid_alive(int(tail)):
            _logger.info("removing stale partial conversion %s", p)
            shutil.rmtree(p, ignore_errors=True)
    # an --overwrite of dst killed between its two renames (systems without an atomic exchange):
    # dst's previous output, moved aside, goes back if nothing took its place, else away (only
    # dst's: whose another aside folder is, its name cut short for the file system may not say)
    mine = _hidden_name(dst, "quantscope-old").name.rsplit("-", 1)[0]
    for p in dst.parent.glob(".*.quantscope-old-*"):
        prefix, _, tail = p.name.rpartition("-")
        if prefix != mine or not tail.isdigit() or _pid_alive(int(tail)) or p.is_symlink():
            continue
        if not dst.exists() and not dst.is_symlink():
            _logger.info("restoring %s, moved aside by a killed conversion", dst)
            os.rename(p, dst)
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _is_within(a: Path, b: Path) -> bool:
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


#: What a model folder holds (weights, configs, tokenizer, model card): --overwrite replaces a
#: folder of only these.
#: Written into every output folder: ``--overwrite`` replaces only a folder that holds it (an
#: earlier output), never a folder of other files, nor another model that happens to look alike.
CONVERT_MARKER = ".quantscope-convert.json"


def _check_destination(src_root: Path, src: Path, dst: Path, overwrite: bool) -> None:
    up = file_in_the_way(dst)  # a file where a folder of the path is wanted ("File exists", the cause unsaid)
    if up is not None:
        raise ConversionError(f"cannot create it: {up} is a file, not a folder", file=dst, rule="convert.destination")
    s, d = src_root.resolve(), dst.resolve()
    if d == s or _is_within(d, s):
        raise ConversionError("the destination is the source folder or inside it; choose a folder elsewhere",
                              file=dst, rule="convert.dst-in-src")
    if _is_within(s, d) or _is_within(src.resolve(), d):
        raise ConversionError("the source is inside the destination; it would be replaced", file=dst,
                              rule="convert.src-in-dst")
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise ConversionError("already exists; --overwrite replaces it if it is an earlier output of quantscope convert", file=dst,
                                  rule="convert.dst-exists")
        # --overwrite replaces an earlier output of quantscope convert (it holds CONVERT_MARKER)
        # or an empty folder, never anything else: a typo such as ~, a project folder or another
        # checkpoint would otherwise be deleted whole.
        if dst.is_symlink():
            raise ConversionError("is a link; --overwrite replaces only a folder itself: give the folder it points "
                                  "to", file=dst, rule="convert.dst-not-output")
        if not dst.is_dir():
            raise ConversionError("is not a folder; --overwrite replaces only an earlier output of "
                                  "quantscope convert", file=dst, rule="convert.dst-not-output")
        top = sorted(q.name for q in dst.iterdir())
        if not top:
            return
        # every file, in subfolders too (an output may hold copies like original/params.json)
        # (a link counts as a file, whatever it points to: a link to a folder was deleted unasked)
        entries = sorted(str(q.relative_to(dst)) for q in dst.rglob("*") if q.is_symlink() or not q.is_dir()) or top
        listed = _marker_files(dst)
        if listed is None:
            raise ConversionError(f"was not written by quantscope convert (it holds {', '.join(entries[:3])}"
                                  f"{', …' if len(entries) > 3 else ''} and no readable {CONVERT_MARKER}); "
                                  "--overwrite replaces only an earlier output: choose another destination or "
                                  "remove it yourself", file=dst, rule="convert.dst-not-output")
        extra = [e for e in entries if e != CONVERT_MARKER and e not in listed]
        if extra:  # added since (evaluation results, notes): they would be deleted with it
            raise ConversionError(f"is an earlier output, but it now also holds {', '.join(extra[:3])}"
                                  f"{', …' if len(extra) > 3 else ''}, which quantscope did not write; --overwrite "
                                  "would delete them: move them out first", file=dst, rule="convert.dst-not-output")


def _marker_files(folder: Path) -> set[str] | None:
    """The files (paths relative to ``folder``) an earlier output's marker lists, or None when
    ``folder`` holds no marker quantscope wrote (missing, a link or a folder, not its JSON)."""
    m = folder / CONVERT_MARKER
    if m.is_symlink() or not m.is_file() or m.stat().st_size > (1 << 20):
        return None
    try:
        data = json.loads(m.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("written_by") != "quantscope convert" \
            or not isinstance(data.get("files"), list):
        return None
    return {str(f) for f in data["files"]}


def _mlx_lm_names(cfg: dict) -> None:
    """Add the config keys mlx-lm (0.32) reads where a transformers-5 config has renamed them:
    ``rope_theta`` (and ``rope_scaling``) from ``rope_parameters``, ``num_experts`` from
    ``num_local_experts`` (Qwen MoE models saved by transformers 5). Nothing is removed, so
    transformers reads the file as before; mlx-lm's model classes failed on the missing
    arguments (found converting GPTQModel's Qwen3-MoE, saved by transformers 5.25)."""
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" not in cfg and isinstance(rope.get("rope_theta"), (int, float)):
            cfg["rope_theta"] = rope["rope_theta"]
        kind = rope.get("rope_type", rope.get("type"))
        if "rope_scaling" not in cfg and kind not in (None, "default"):
            cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if "num_experts" not in cfg and isinstance(cfg.get("num_local_experts"), int):
        cfg["num_experts"] = cfg["num_local_experts"]


def _write_config(model: Model, folder: Path, to: str, quantization: dict | None, dtype_arg: str) -> None:
    cfg = dict(model.ckpt.configs.get("config.json") or {})
    cfg.pop("quantization_config", None)
    cfg.pop("quantization", None)
    if isinstance(cfg.get("text_config"), dict) and "quantization_config" in cfg["text_config"]:
        cfg["text_config"] = {k: v for k, v in cfg["text_config"].items() if k != "quantization_config"}
    if to == "mlx":
        cfg["quantization"] = quantization
        cfg["quantization_config"] = json.loads(json.dumps(quantization))
        for c in (cfg, cfg.get("text_config")):
            if isinstance(c, dict):
                _mlx_lm_names(c)
    else:
        name = _TORCH_NAME[dtype_arg]
        if "torch_dtype" in cfg or "dtype" not in cfg:
            cfg["torch_dtype"] = name
        if "dtype" in cfg:
            cfg["dtype"] = name
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def _quantization_block(items: list[_Item], targets: _Targets) -> dict:
    qs = [it.config for it in items if isinstance(it.config, _Q)]
    if targets.explicit or not qs:
        glob = targets.default
    else:
        counts: dict[_Q, int] = {}
        for q in qs:
            counts[q] = counts.get(q, 0) + 1
        glob = max(counts, key=counts.get)
    block: dict = {"group_size": glob.group_size, "bits": glob.bits, "mode": glob.mode}
    for it in items:
        c = it.config
        for path in it.config_paths or [it.result.path]:
            if c is False:
                block[path] = False
            elif isinstance(c, _Q) and (targets.per_layer or c != glob):
                block[path] = c.as_config()
    return block


# -- the conversion -------------------------------------------------------------------------------

def convert(src, dst, *, to: str = "mlx", bits: int | None = None, group_size: int | None = None,
            mode: str = "affine", recipe: str | None = None, dtype: str | None = None, overwrite: bool = False,
            engine="auto", verify: bool = True, progress: Callable[[float], None] | None = None,
            cancel=None, max_shard_bytes: int = MAX_SHARD_BYTES, scales: str = "exact") -> ConversionReport:
    """Convert the checkpoint ``src`` into a new folder ``dst``.

    Parameters
    ----------
    src
        A checkpoint quantscope can open (folder, ``.safetensors`` file, index, HF-cache repo id).
    dst
        The output folder; must not exist unless ``overwrite``; must not be inside ``src``.
    to
        ``"mlx"`` (MLX affine / block-float layers, mlx-lm's config) or ``"dense"``.
    bits, group_size, mode
        Settings for layers that are (re)quantized: bits default 4 (the mode's) for dense layers
        and a quantized layer's own width (the next MLX has: FP8 → 8) for one that cannot be
        repacked; group size the mode's default (affine 64). Given explicitly, quantized source
        layers in other settings are requantized to them instead of repacked.
    recipe
        ``mixed_2_6``, ``mixed_3_4``, ``mixed_3_6``, ``mixed_4_6`` (mlx-lm's predicates, group 64) or
        a JSON file mapping module path → ``{bits, group_size, mode}`` or ``false``.
    dtype
        ``"bf16"`` (None: the default), ``"f16"`` or ``"f32"``: the dtype of every float tensor
        with ``to="dense"``; refused with ``to="mlx"``.
    overwrite
        Replace an existing ``dst`` (atomically: the old folder is renamed away, the new one in,
        then the old one deleted).
    engine
        Decoder for requantized/dequantized layers and the verification (``auto``/``numpy``/``mlx``).
    verify
        Reopen the output and compare it with the source layer by layer (``compare.sweep``).
    progress
        Called with the fraction done, 0..1.
    cancel
        Object with ``is_set()``, checked between tensors; cancelling leaves nothing at ``dst``.
    max_shard_bytes
        Shard size limit (mlx-lm's ``5 << 30``).
    scales
        ``"exact"`` (default): a repacked layer's scales and biases stay in the source's dtype
        where MLX reproduces every stored value with them, else float32 (exact, but mlx-lm then
        computes that layer's output, and the activations after it, in float32). ``"source"``:
        always the source's dtype (fp16 for GPTQ/AWQ), as mlx-lm's own loaders do; the biases
        ``-s·z`` round, and the report gives each such layer's error (``repacked, biases rounded``).

    Returns
    -------
    ConversionReport

    Raises
    ------
    ConversionError
        Bad settings, a refused destination, too little disk space, or an undecodable layer.
    Cancelled
        ``cancel`` was set (the partial output has been removed).
    """
    t_start = time.perf_counter()
    if to not in ("mlx", "dense"):
        raise ConversionError(f"--to must be mlx or dense, not {to!r}")
    if scales not in ("exact", "source"):
        raise ConversionError(f"--scales must be exact or source, not {scales!r}")
    if to == "dense" and scales != "exact":  # (as --dtype with --to mlx: not accepted and ignored)
        raise ConversionError("--scales applies to --to mlx only (a dense output has no scales)")
    if to == "mlx" and dtype is not None:  # it was accepted and ignored
        raise ConversionError("--dtype applies to --to dense only (an MLX output keeps each tensor's dtype)")
    dtype = dtype or "bf16"
    if dtype not in _DTYPE_ARG:
        raise ConversionError(f"--dtype must be one of {', '.join(_DTYPE_ARG)}, not {dtype!r}")
    if to == "dense" and (recipe is not None or bits is not None or group_size is not None or mode != "affine"):
        raise ConversionError("--bits/--group-size/--mode/--recipe apply to --to mlx only")
    from .engines import get_engine
    eng = get_engine(engine) if isinstance(engine, str) else engine
    src_p = Path(src).expanduser()
    dst_p = Path(dst).expanduser()
    report_progress = progress or (lambda f: None)
    ckpt = open_checkpoint(src_p)
    try:
        model = analyze(ckpt)
        if dst_p.parent.is_dir():  # (an output a killed --overwrite moved aside is back before the checks)
            _clean_stale(dst_p)
        _check_destination(ckpt.root, src_p, dst_p, overwrite)
        if ckpt.holds(dst_p) or ckpt.holds(dst_p / CONVERT_MARKER):  # an HF cache repo's blobs, beside its snapshot
            raise ConversionError(f"is in the checkpoint {ckpt.source} that this reads; quantscope never writes "
                                  "into a checkpoint it opened: choose a folder elsewhere", file=dst_p,
                                  rule="convert.dst-in-src")
        if ckpt.index_missing:  # written without them, exit 0 (the doctor calls it an error)
            miss = ckpt.index_missing
            raise ConversionError(f"cannot convert: the index lists {len(miss)} tensor(s) that their shard does not "
                                  "hold: the checkpoint is incomplete (download it again)", file=ckpt.source,
                                  tensor=miss[0], rule="convert.incomplete")
        bad_cfg = [w for w in ckpt.warnings if w.startswith("config.json ignored")]
        if to == "mlx" and bad_cfg and "config.json" not in ckpt.configs:
            # (its output had a config of the quantization alone, no model_type: mlx-lm cannot load it)
            raise ConversionError(f"cannot convert to MLX: {bad_cfg[0]} — mlx-lm needs the model's config "
                                  "(model_type, sizes); fix the source's config.json", file=ckpt.root / "config.json",
                                  rule="convert.no-config")
        gptoss = [lay.path for lay in model.layers.values() if lay.scheme == "gptoss-mxfp4"]
        if gptoss:
            # (written as they were decoded, neither mlx-lm's gpt_oss, whose sanitize splits the
            # interleaved gate/up rows, nor transformers, whose experts are [E, K, N], loads them)
            raise ConversionError(f"cannot convert gpt-oss's MXFP4 experts ({len(gptoss)} stacks, e.g. {gptoss[0]}): "
                                  "quantscope reads and measures them but does not write gpt-oss's layouts; mlx-lm "
                                  "loads this checkpoint as it is (mlx_lm.convert for other settings)",
                                  file=ckpt.source, tensor=gptoss[0], rule="convert.unsupported")
        if not model.layers:  # (a header of no tensors: an output of a config alone, exit 0)
            raise ConversionError("cannot convert: the checkpoint stores no tensors", file=ckpt.source,
                                  rule="convert.incomplete")
        # (a Hugging Face cache repo id is no local path: its snapshot, not the current folder joined with it)
        local = src_p.exists()
        rep = ConversionReport(src=str(ckpt.root if src_p.is_dir() else src_p.resolve() if local else ckpt.root),
                               dst=str(dst_p.resolve()), to=to, source_bytes=ckpt.total_bytes)
        # one line per warning, with how many layers it concerns (a config file that cannot be
        # read concerns them all: it was said once for each)
        same: dict[str, list[str]] = {}
        for p, lay in model.layers.items():
            if (w := lay.warning or data_warning(model, lay)):
                same.setdefault(w, []).append(p)
        rep.suspect = [f"{ps[0]}: {w}" if len(ps) == 1 else f"{len(ps)} layers (first {ps[0]}): {w}"
                       for w, ps in same.items()]
        w_plan, w_write = (0.05, 0.65) if verify else (0.05, 0.95)
        if to == "mlx":
            targets = _Targets(bits=bits, group_size=group_size, mode=mode, recipe=recipe, model=model)
            targets.source_scales = scales == "source"
            items = _stack_experts(model, _plan_mlx(model, targets, eng, rep.notes, cancel,
                                                    lambda f: report_progress(w_plan * f)))
            rep.quantization = _quantization_block(items, targets)
        else:
            items = _plan_dense(model, _DTYPE_ARG[dtype], eng, rep.notes, cancel)
        rep.layers = [it.result for it in items]
        shards = _shard_plan(items, max_shard_bytes)
        copies = _copy_list(ckpt, src_p)
        estimate = sum(_nbytes(o[1], o[2]) for it in items for o in it.outputs) + sum(
            p.stat().st_size for p in copies) + 1_000_000
        dst_p.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(dst_p.parent).free
        if free < estimate * 1.02 + (16 << 20):
            raise ConversionError(f"not enough free disk space: the output needs about {human_bytes(estimate)}, "
                                  f"{human_bytes(free)} is free", file=dst_p.parent, rule="convert.disk-space")
        rep.timings["plan"] = time.perf_counter() - t_start
        report_progress(w_plan)
        _clean_stale(dst_p)
        tmp = _hidden_name(dst_p, PARTIAL_TAG)
        try:  # the hidden folder it is written in, beside dst: a refusal names dst's folder, not that one
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as exc:
            raise ConversionError(f"cannot write into {dst_p.parent} ({exc.strerror or exc})", file=dst_p,
                                  rule="convert.destination") from None
        try:
            t0 = time.perf_counter()
            meta = {"format": "mlx" if to == "mlx" else "pt"}
            writer = _ShardWriter(tmp, shards, meta)
            total = sum(_nbytes(o[1], o[2]) for it in items for o in it.outputs) or 1
            done = 0
            try:
                for it, produced in _produce_ahead(items, cancel):
                    for name, dt, shape in it.outputs:
                        if name in it.raw:
                            writer.write_carried(name, ckpt.file_of(it.raw[name]), it.raw[name])
                        else:
                            writer.write(name, produced.pop(name))
                        done += _nbytes(dt, shape)
                    del produced
                    report_progress(w_plan + (w_write - w_plan) * done / total)
                names = writer.finish()
            finally:
                writer.close()
            for p in copies:
                _check(cancel)
                target = tmp / p.relative_to(ckpt.root)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, target)
            _write_config(model, tmp, to, rep.quantization, dtype)
            rep.files = sorted(names + [str(p.relative_to(ckpt.root)) for p in copies] + ["config.json"])
            # every file written: --overwrite later replaces this folder only while it holds no other
            (tmp / CONVERT_MARKER).write_text(json.dumps(
                {"written_by": "quantscope convert", "source": str(src_p.resolve()) if local else f"{src} ({ckpt.root})",
                 "to": to,
                 "quantization": rep.quantization, "files": rep.files}, indent=1) + "\n", encoding="utf-8")
            rep.output_bytes = sum(q.stat().st_size for q in tmp.rglob("*") if q.is_file())
            rep.timings["write"] = time.perf_counter() - t0
            report_progress(w_write)
            if verify:
                t0 = time.perf_counter()
                _verify(model, tmp, rep, eng, cancel, lambda f: report_progress(w_write + (1 - w_write) * f))
                rep.timings["verify"] = time.perf_counter() - t0
            _check(cancel)
            # again at the end: the destination checked at the start may have been made since (by
            # a person, or another conversion to it), and the move would have replaced it unasked
            _check_destination(ckpt.root, src_p, dst_p, overwrite)
            _move_into_place(tmp, dst_p)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        ckpt.close()
    rep.timings["total"] = time.perf_counter() - t_start
    report_progress(1.0)
    return rep


def _produce_ahead(items: list[_Item], cancel):
    """Yield ``(item, tensors)`` in order, making the next item's tensors on a helper thread
    while the caller writes the current ones (numpy and file writes release the GIL); at most
    two layers are in memory."""
    from concurrent.futures import ThreadPoolExecutor

    if not items:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantscope-convert") as pool:
        _check(cancel)
        fut = pool.submit(items[0].make)
        try:
            for i, it in enumerate(items):
                produced = fut.result()
                fut = None
                _check(cancel)
                if i + 1 < len(items):
                    fut = pool.submit(items[i + 1].make)
                yield it, produced
        finally:
            if fut is not None:
                fut.cancel()


def _verify(model: Model, folder: Path, rep: ConversionReport, eng, cancel, progress) -> None:
    from .compare import only_multipliers, sweep
    if not any(lay.is_matrix for lay in model.layers.values()):  # nothing a sweep could compare
        rep.notes.append("no weight matrix in the source: nothing to verify")
        return
    out = open_checkpoint(folder)
    try:
        res = sweep(model, {"converted": analyze(out)}, engine=eng, progress=progress, cancel=cancel)
    finally:
        out.close()
    by = {r.name: r for r in res.rows}
    rows_of: dict[str, list[str]] = {}  # a stack's expert rows (the sweep measures experts one by one)
    for r in res.rows:
        if r.reference_layer is not None:
            rows_of.setdefault(r.reference_layer, []).append(r.name)

    def rows(lr):  # (a layer's rows: its own, its experts', a stack's rows per expert)
        return [n for p in lr.experts or [lr.path] for n in [p, *rows_of.get(p, ())]]

    for lr in rep.layers:
        got = [by[p] for p in rows(lr) if p in by]  # stacked experts: the worst one's
        if got:
            # as stored (nothing undone), but for the multipliers convert folded in itself (mup)
            lr.rel_fro = worst(m.rel_fro if only_multipliers(m.smoothing) else m.rel_fro_raw for m in got)
            lr.max_abs = worst(m.max_abs for m in got)
            lr.sqnr_db = worst((m.sqnr_db for m in got), min)
    src_bad = set(res.reference_nonfinite)  # (the source is the sweep's reference)
    # (an inf in the output itself: a rel_fro of inf against an all-zero source layer is no overflow)
    rep.overflowed = [lr.path for lr in rep.layers if lr.max_abs is not None and math.isinf(lr.max_abs)
                      and not src_bad.intersection(rows(lr))]
    converted = {p for lr in rep.layers if lr.kind not in ("kept dense", "carried", "cast") for p in rows(lr)}
    for u in res.unmatched:
        if u.layer in converted:
            rep.notes.append(f"not compared: {u.layer} ({u.reason})")
    rep.verified = True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system has no such call (then two renames, a moment with no ``dst``)."""
    if sys.platform != "linux":
        return False
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP, errno.ENOENT):  # (a file system
            # without it; dst gone meanwhile: the plain rename then)
            return False
        raise OSError(err, os.strerror(err), str(b))
    return True


def _move_into_place(tmp: Path, dst: Path) -> None:
    os.chmod(tmp, 0o755)
    if (dst.exists() and not dst.is_symlink()) and _exchange(tmp, dst):
        # --overwrite: the new output and the old swapped at once (two renames left a moment with
        # no dst: a kill then stranded the old output in a hidden folder and wrote no new one);
        # the old is now at tmp's name, which the stale clean-up also removes if this dies here
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if dst.exists() or dst.is_symlink():
        old = _hidden_name(dst, "quantscope-old")
        if old.exists():
            shutil.rmtree(old)
        os.rename(dst, old)
        try:
            os.rename(tmp, dst)
        except OSError:
            os.rename(old, dst)  # put the previous output back
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        os.rename(tmp, dst)


#: What to do about values beyond the output's range, by ``to``.
_OVERFLOW_ADVICE = {"dense": " (f16: ±65504) — choose --dtype bf16 or f32",
                    "mlx": " (the scales' dtype) — --scales exact keeps float32 where needed"}


def summary_lines(rep: ConversionReport, *, max_layers: int | None = None, table: bool = True) -> list[str]:
    """A human-readable summary and per-layer table of a report (the command line prints it;
    ``table=False``: the summary alone, as the window shows it)."""
    t = rep.timings
    lines = [f"converted {rep.src} -> {rep.dst} (--to {rep.to}) in {t.get('total', 0):.2f} s "
             f"(plan {t.get('plan', 0):.2f} s, write {t.get('write', 0):.2f} s"
             + (f", verify {t['verify']:.2f} s" if "verify" in t else "") + ")",
             f"output: {len(rep.files)} files, {human_bytes(rep.output_bytes)} (source tensors {human_bytes(rep.source_bytes)})",
             "layers: " + ", ".join(f"{k} ×{v}" for k, v in rep.by_kind().items())]
    ex = rep.exact_repacks
    if ex:
        lines.append(f"exact repacks: {len(ex)}; scales widened to float32: {len(rep.widened)} "
                     f"(kept in the source dtype: {len(ex) - len(rep.widened)})")
    if rep.rounded_repacks:
        rr = rep.rounded_repacks
        errs = [r.rel_fro for r in rr if r.rel_fro is not None]
        lines.append(f"repacked in the source's scale dtype, biases rounded (--scales source): {len(rr)}"
                     + (f", rel_fro up to {max(errs):.3g}" if errs else ""))
    if rep.verified:
        mx_ = rep.max_rel_fro
        lines.append("verification against the source: "
                     + ("no layer compared" if mx_ is None else f"max rel_fro {mx_:.3g}"))
        bad = [p for p in rep.nonfinite_layers if p not in rep.overflowed]
        if bad:
            lines.append(f"  not finite in {len(bad)} layer(s), e.g. {bad[0]}: NaN/inf values in the source "
                         "(`quantscope doctor` on it names the tensors)")
        if rep.overflowed:
            lines.append(f"  inf in {len(rep.overflowed)} layer(s), e.g. {rep.overflowed[0]}: finite values of the "
                         f"source beyond the output's range{_OVERFLOW_ADVICE[rep.to]}")
    for w in rep.suspect[:3]:  # the window's summary too
        lines.append(f"warning: {w}")
    if len(rep.suspect) > 3:
        lines.append(f"warning: … and {len(rep.suspect) - 3} more (`quantscope doctor` lists them)")
    if not table:
        return lines
    shown = [r for r in rep.layers if r.kind != "carried"]
    if shown:  # no header over no rows (a dense model converted to dense carries everything)
        lines.append(f"{'layer':<44} {'source':<10} {'action':<40} {'scales':<6} {'rel_fro':>9} {'max_abs':>9}")
    listed = shown[:max_layers] if max_layers else shown
    for r in listed:
        rf = "" if r.rel_fro is None else f"{r.rel_fro:.3g}"
        ma = "" if r.max_abs is None else f"{r.max_abs:.3g}"
        sd = (r.scales_dtype or "") + ("*" if r.widened else "")
        action = r.action if len(r.action) <= 40 else r.action[:39] + "…"  # cut, not run into "scales"
        lines.append(f"{r.path:<44} {r.source_scheme:<10} {action:<40} {sd:<6} {rf:>9} {ma:>9}")
    if max_layers and len(shown) > max_layers:
        lines.append(f"... {len(shown) - max_layers} more")
    cut = list(dict.fromkeys(r.action for r in listed if len(r.action) > 40))
    for a in cut[:5]:  # each action the table cut, once in full
        lines.append(f"action in full: {a}")
    if len(cut) > 5:
        lines.append(f"action in full: … and {len(cut) - 5} more")
    carried = sum(1 for r in rep.layers if r.kind == "carried")
    if carried:
        lines.append(f"carried unchanged: {carried} module(s) (norms, 1-D tensors, …)")
    if rep.widened:
        lines.append("* float32 scales/biases: MLX's rounding in the source dtype would not reproduce the source")
    for n in rep.notes:
        lines.append(f"note: {n}")
    return lines
