"""The checkpoint doctor: every problem of a checkpoint as a list of findings, never an exception.

A finding has a stable rule id (``container.overlap``, ``gptq.v1-zero-wrap`` …), a severity
(``error``: loaders fail or decode garbage; ``warning``: some loaders fail, or the data looks
wrong; ``info``: worth knowing), the file / tensor / layer it concerns, the formats.md rule
number it implements (R1–R26) and a message saying what is wrong, why it breaks loaders and what
to do. :data:`RULES` lists every rule; ``docs/doctor.md`` documents them.

Unlike :func:`~quantscope.backend.checkpoint.open_checkpoint`, which stops at the first broken
shard, the doctor parses every shard on its own, turns each reader error into a finding (and
re-scans a broken header to list *all* of its problems), then analyses the shards that did
parse. Work is done in three phases:

1. structure — headers, index ↔ shards, configs, scheme detection: reads no tensor data;
2. format checks that read small tensors exhaustively (GPTQ qzeros and g_idx, NVFP4 global
   scales, bitsandbytes quant states);
3. value checks (NaN/Inf, zero/denormal/outlier scales, constant tensors, code usage) on a
   sample of rows per tensor within a time budget, or on every row with ``full=True``.

``values=False`` skips phases 2 and 3 (no tensor data is read at all).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import re
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from . import mup
from .bitpack import unpack_bits
from .checkpoint import (
    CONFIG_FILES,
    INDEX_SUFFIX,
    PICKLE_SUFFIXES,
    Checkpoint,
    _resolve_hf_repo,
    _within,
    link_root,
    missing_reason,
    natural_key,
    split_name,
)
from .compare_align import _FUSED, _SWITCH_RE, EXPERT_RE, rows_normalized
from .dtypes import DTYPES
from .errors import Cancelled, QuantscopeError
from .formats.gptq import mislabelled_format
from .formats.mlx import E4M3, E8M0, MODE_DEFAULTS, affine_fits
from .safetensors_file import SafetensorsFile
from .schemes import FP_SCALE_DTYPES, QUANT_PARTS, Layer, gptq_groups, misread_pair

_logger = logging.getLogger(__name__)

SEVERITIES = ("error", "warning", "info")
#: Parts of a path that name a tower with widths of its own (not judged against the model's).
_TOWER_PARTS = ("vision", "visual", "audio", "mm_projector")
#: Boolean settings of the quantization configs (GPTQ, AWQ, compressed-tensors' per-group args).
_BOOL_KEYS = ("sym", "desc_act", "true_sequential", "static_groups", "zero_point", "symmetric", "lm_head",
              "act_order", "is_marlin_format")
#: The first MLX release that quantizes each affine bit width (formats.md §1.6; 2, 4 and 8 bit
#: have always been there) and each mode: (version, what).
MLX_BITS_SINCE = {3: ((0, 21, 0), "3 bit"), 6: ((0, 21, 0), "6 bit"), 5: ((0, 26, 0), "5 bit"),
                  1: ((0, 32, 4), "1 bit")}
MLX_MODE_SINCE = {"mxfp4": ((0, 29, 0), "mxfp4"), "mxfp8": ((0, 29, 4), "mxfp8"), "nvfp4": ((0, 29, 4), "nvfp4")}


# ---------------------------------------------------------------------------------- the rules

@dataclass(frozen=True)
class Rule:
    """A doctor rule: its id, default severity, formats.md reference and one-line why."""

    id: str
    severity: str
    ref: str | None
    why: str


def _rules(*rows) -> dict[str, Rule]:
    return {r[0]: Rule(*r) for r in rows}


#: Median |scale| outside this range: the scales are not read as they were written.
_SCALE_SANE = (1e-9, 1e4)
#: The compressed-tensors formats (quantization_config "format", or a config group's) that write
#: each scheme's tensors: its decompressor is chosen by that name.
_CT_FORMATS = {"ct-pack": {"pack-quantized"}, "ct-int": {"int-quantized", "naive-quantized"},
               "ct-fp8": {"float-quantized", "naive-quantized"}, "ct-nvfp4": {"nvfp4-pack-quantized"},
               "ct-mxfp4": {"mxfp4-pack-quantized"}, "ct-mxfp8": {"mxfp8-quantized"}}
#: Schemes whose quantizers write scales >= 0 (a group's range over its levels, an absmax): MLX
#: affine is not one of them (it negates a group's scale to make its zero exact).
_POSITIVE_SCALES = frozenset({"gptq", "awq-gemm", "awq-gemv", "ct-pack", "ct-int", "ct-fp8", "fp8-block",
                              "bnb-nf4", "bnb-fp4", "bnb-int8"})
#: Model types whose mlx-lm class (0.32) stacks per-expert weight, scales and biases alike when it
#: loads (its ``sanitize``), so experts MLX-quantized one by one load; mlx-lm's aliases included.
STACKS_QUANTIZED_EXPERTS = frozenset({
    "afmoe", "bailing_hybrid", "bailing_moe", "bailing_moe_linear", "deepseek", "deepseek_v2", "deepseek_v3",
    "deepseek_v32", "dots1", "exaone_moe", "glm4_moe", "glm4_moe_lite", "hunyuan", "jamba", "kimi_vl",
    "longcat_flash", "mimo_v2_flash", "mistral4", "mixtral", "olmoe", "phimoe", "qwen2_moe", "kimi_k2",
    "joyai_llm_flash"})

#: Every rule the doctor can report. docs/doctor.md lists the same table with sources.
RULES: dict[str, Rule] = _rules(
    # container (ids shared with the header reader)
    ("container.missing", "error", "R23", "the path, or a file it names, does not exist"),
    ("container.unsupported", "error", None, "pickle checkpoints are never unpickled"),
    ("container.too-short", "error", "R21", "file shorter than the 8-byte header length: empty or truncated"),
    ("container.header-too-large", "error", "R21", "header length beyond the file or 100 MB: Git-LFS pointer, HTML page, truncation"),
    ("container.header-json", "error", "R21", "header is not a UTF-8 JSON object"),
    ("container.metadata", "error", "R22", "__metadata__ is not a flat string→string map"),
    ("container.entry", "error", None, "a header entry lacks dtype/shape/data_offsets or has a bad shape"),
    ("container.duplicate-key", "error", None, "the same tensor name appears twice in one header"),
    ("container.dtype", "error", None, "unknown dtype string"),
    ("container.offsets", "error", None, "data_offsets are not two integers 0 ≤ begin ≤ end"),
    ("container.size-mismatch", "error", None, "shape × dtype size differs from the byte range"),
    ("container.out-of-file", "error", "R21", "byte range runs past the end of the file (truncated download)"),
    ("container.overlap", "error", None, "two tensors share bytes"),
    ("container.gap", "error", None, "bytes between tensors belong to no tensor"),
    ("container.empty", "error", None, "no tensor stored"),
    ("container.trailing", "error", "R21", "bytes after the last tensor / file not fully covered"),
    ("container.no-metadata", "info", "R22", "no __metadata__: some loaders warn or require format"),
    ("container.metadata-format", "error", "R22", "__metadata__.format not pt/tf/flax/mlx: transformers refuses the file"),
    ("container.header-padding", "info", None, "header padded beyond the 8-byte alignment"),
    ("container.offset-order", "info", None, "header order differs from the data order"),
    ("container.odd-name", "warning", None, ("a tensor name no module path can be: empty, a leading or trailing dot, or "
                                             "an empty part (..): loaders match it to no parameter")),
    ("container.pickle-beside", "info", None, "pickle checkpoint files next to the safetensors"),
    # index ↔ shards
    ("index.json", "error", "R23", "the index file is not valid JSON of the expected shape"),
    ("index.no-weight-map", "error", "R23", "the index has no (or an empty) weight_map"),
    ("index.entry", "error", "R23", "a weight_map value is not a file name"),
    ("index.unsafe-path", "error", "R23", "a weight_map entry points outside the model folder"),
    ("index.missing-shard", "error", "R23", "a shard named by the index is missing"),
    ("index.linked-shard", "info", None, "a shard is a link to a file outside the model folder (followed)"),
    ("index.tensor-missing", "error", "R23", "a tensor listed in the index is absent from its shard"),
    ("index.tensor-unlisted", "warning", "R23", "a tensor stored in a shard is not in the index"),
    ("index.duplicate-tensor", "error", "R23", "the same tensor is stored in two files"),
    ("index.stray-file", "warning", "R23", "a .safetensors file not in the index sits beside the shards"),
    ("index.total-size", "warning", "R23", "metadata.total_size differs from the tensors' bytes"),
    ("index.several", "warning", "R23", "several index files in one folder"),
    ("config.unreadable", "error", None, "a JSON config could not be parsed (loaders fail on it)"),
    ("config.bad-value", "error", None, "a quantization setting no loader can use (0 bits, \"x\", a list for the block)"),
    ("config.method-mismatch", "warning", None, "quant_method names a format the tensors do not have"),
    ("config.unsupported-method", "warning", None, ("quant_method names a format quantscope does not decode, and no "
                                                    "layer has a layout it knows: the quantized layers are left out")),
    ("config.number-type", "warning", None, "a bits / group size setting written as a string or a float (\"4\", 4.0)"),
    ("config.bool-type", "warning", None, "a boolean setting written as a string (\"false\" reads as true)"),
    ("config.disagree", "warning", None, "quantize_config.json and config.json's quantization_config disagree"),
    # MLX quantization triples
    ("mlx.biases-without-scales", "error", "R18", "`.biases` stored without `.scales`"),
    ("mlx.scales-not-quantized", "error", "R18", "`.scales` on a layer the config (or its float weight) marks unquantized"),
    ("mlx.missing-biases", "error", "R17", "affine layer without `.biases`"),
    ("mlx.fp-with-biases", "error", "R17", "mxfp4/mxfp8/nvfp4 layer with `.biases`"),
    ("mlx.weight-dtype", "error", "R18", "packed `.weight` next to `.scales` is not uint32"),
    ("mlx.rank", "error", "R18", "quantized weight of rank below 2"),
    ("mlx.scales-shape", "error", "R18", "`.scales`/`.biases` rank or leading dims differ from `.weight`"),
    ("mlx.bits-group", "error", "R18", "32·W/b ≠ G·S for the effective bits/group, or K is not a model dimension"),
    ("mlx.override-unmatched", "error", "R17", "a per-layer override names no module of the checkpoint"),
    ("mlx.min-version", "info", "R16", ("the MLX release the checkpoint's bit widths or modes need (3/6 bit 0.21, "
                                        "5 bit 0.26, mxfp4 0.29, mxfp8/nvfp4 0.29.4, 1 bit 0.32.4: the first known "
                                        "to decode it)")),
    ("layer.fused-and-split", "warning", None, ("a projection stored both fused (qkv_proj, gate_up_proj) and split: "
                                                "one set matches no parameter of the model")),
    ("mlx.per-expert", "warning", "R17", ("MoE experts quantized one by one for a model whose mlx-lm class stacks "
                                          "only their .weight into switch_mlp: their scales/biases match no parameter")),
    ("mlx.norm-head-quantized", "error", None, ("a Bailing (Ling) model with norm_head whose lm_head is "
                                                "MLX-quantized: mlx-lm divides lm_head by its column norms on every "
                                                "load, the packed words as numbers, and the head becomes zeros")),
    ("mlx.head-not-normalized", "error", None, ("a Baichuan-M1 whose MLX-quantized lm_head's rows are not of "
                                                "norm 1: mlx-lm takes a quantized head as normalized (it normalizes "
                                                "only a dense one), so its logits are scaled wrong")),
    ("mlx.unfolded-multipliers", "error", None, ("an MLX-quantized Falcon-H1 whose Mamba conv1d is stored as "
                                                 "transformers stores it: mlx-lm's load takes it for a transformers "
                                                 "file and multiplies the packed weights by the muP multipliers")),
    # GPTQ / AWQ
    ("gptq.v1-zero-wrap", "error", "R1", "v1 qzeros field 2^b−1: a true zero of 0 wrapped by the −1"),
    ("gptq.sym-zeros", "error", "R3", "sym=true but the zero points are not the constant 2^(b−1)"),
    ("gptq.config-keys", "warning", "R4", "GPTQ config lacks sym / checkpoint_format / quant_method"),
    ("gptq.dynamic", "error", None, ("a `dynamic` override that is not a regular expression, or that marks a layer "
                                     "not quantized that is stored quantized")),
    ("config.missing", "warning", "R4", "quantized tensors but no quantization config: loaders and quantscope guess"),
    ("gptq.act-order", "info", "R5", "non-monotonic g_idx (desc_act): MLX/AWQ-style converters cannot keep it"),
    ("gptq.act-order-no-g-idx", "warning", "R5", "desc_act true but layers store no g_idx: loaders assume k // group"),
    ("gptq.g-idx-invalid", "error", "R5", "g_idx values out of range or groups of the wrong size"),
    ("gptq.marlin", "error", "R6", "Marlin-serialized GPTQ is tile-permuted, not plain GPTQ"),
    ("awq.version", "error", "R7", "AWQ version disagrees with the stored layout, is not GEMM, or names a layout quantscope does not know"),
    ("awq.legacy-config", "warning", "R7", "AWQ settings only in AutoAWQ's quant_config.json"),
    # compressed-tensors / NVFP4 / FP8 / MX / bnb
    ("moe.experts", "error", None, ("an MoE block's experts: one missing, lacking a projection, of another shape, "
                                    "or not as many as the config says")),
    ("ct.format", "error", None, ("the config's format (or quantization_status) names another compressor than "
                                  "the tensors were written by")),
    ("ct.targets", "error", None, "a config group reaches a layer only through a module class it is not"),
    ("ct.packing", "error", "R9", "weight_packed width fits neither packing generation, or contradicts `version`"),
    ("ct.zero-point", "error", "R10", "weight_zero_point layout (packed vs unpacked) contradicts `version`"),
    ("ct.sym-zero-point", "error", "R10", "symmetric: true but weight_zero_point stored (symmetric schemes write none)"),
    ("nvfp4.global-scale", "error", "R11", "NVFP4 global scale looks inverted (divisor vs multiplier)"),
    ("fp8.block-size", "error", "R12", "FP8 block scales do not tile the weight with weight_block_size"),
    ("fp8.scale-name", "warning", "R12", "FP8 block scales stored under another name than `weight_scale_inv`"),
    ("fp8.converted", "error", "R13", "quant_method fp8 but no FP8 weights (converted checkpoint)"),
    ("mx.e8m0-scale", "error", "R14", "MX scales are not E8M0 exponent bytes"),
    ("config.static-activations", "warning", None, ("the config quantizes activations with stored scales "
                                                    "(static) but a layer stores no input scale")),
    ("config.tied-lm-head", "error", "R24", "lm_head present with tie_word_embeddings: true (or absent while false)"),
    ("bnb.quant-state", "error", "R25", "bitsandbytes 4-bit quant state incomplete or inconsistent"),
    ("layer.inconsistent", "error", None, "a layer's tensors do not fit together (see message)"),
    ("layer.unsupported", "warning", None, ("a module stores packed (integer or 8-bit) tensors in a layout quantscope "
                                            "does not decode: its figures are left out")),
    ("layer.undecodable", "error", None, ("the layer's decoder refuses its tensors (see message): loaders fail or "
                                          "decode it wrongly")),
    # values
    ("values.non-finite", "error", None, "NaN or Inf in weights, scales or biases"),
    ("values.zero-scale", "warning", None, "scales equal to zero: whole groups decode to 0"),
    ("values.zero-layer", "error", None, "every checked scale of a layer is zero: it decodes to all zeros"),
    ("values.denormal-scale", "warning", None, "subnormal scales: precision loss, flushed to 0 by some kernels"),
    ("values.constant", "warning", None, "a weight or scale tensor is all zero or constant"),
    ("values.empty", "warning", None, "a weight matrix with a dimension of 0"),
    ("values.few-levels", "warning", None, "a layer's codes use only a few of the 2^b levels"),
    ("values.saturated", "warning", None, "most codes sit at the ends of the range"),
    ("values.negative-scale", "error", None, ("negative scales in a scheme whose quantizers write none (GPTQ, AWQ, "
                                              "compressed-tensors, FP8, bitsandbytes)")),
    ("values.scale-outlier", "warning", None, "median |scale| ≥100× off the median of the same projection"),
    ("values.scale-magnitude", "error", None, ("median |scale| outside 1e-9…1e4: scales stored in another dtype "
                                               "(F16 labelled BF16) or unit; every weight decodes wrong")),
    ("doctor.budget", "info", None, "value checks stopped at the time budget (use --full)"),
)

#: Rules that mean "this file could not be read at all".
_OPEN_RULES = {r for r in RULES if r.startswith("container.") and RULES[r].severity == "error"} | {
    "index.json", "index.no-weight-map"}
_MAX_PER_RULE = 20  # per (rule, file): beyond this, one summary finding


@dataclass
class Finding:
    """One problem the doctor found.

    Attributes
    ----------
    rule
        Stable kebab-case id (a key of :data:`RULES`).
    severity
        ``error``, ``warning`` or ``info``.
    message
        What is wrong, why it breaks loaders, what to do.
    file, tensor, layer
        What it concerns (file path, full tensor name, module path), where known.
    ref
        The formats.md §10 rule number (``R1`` …), where one applies.
    count
        How many findings this entry stands for: 1, or for the "… and N more" entry that ends a
        rule's list in one file, N (the summary counts them all).
    """

    rule: str
    severity: str
    message: str
    file: str | None = None
    tensor: str | None = None
    layer: str | None = None
    ref: str | None = None
    count: int = 1
    #: Further tensors the finding concerns, beside ``tensor`` (a truncated file's: every one past
    #: its end, said in one finding; the window flags each one's layer).
    also: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        where = " › ".join(x for x in (self.file and Path(self.file).name, self.tensor or self.layer) if x)
        ref = f" ({self.ref})" if self.ref else ""
        return f"[{self.rule}]{ref} {where + ': ' if where else ''}{self.message}"


#: Tensor data up to this size is checked value by value even without --full (0.75 s for a 394 MB
#: model in the page cache; at 128 MB, two NaN in such a model went unseen by the sample).
FULL_CHECK_BYTES = 512 << 20


@dataclass
class Report:
    """Everything :func:`run_diagnosis` found, plus whether anything could be opened."""

    path: str
    findings: list[Finding] = field(default_factory=list)
    opened: bool = False
    files: int = 0
    layers: int = 0
    values: str = "none"  # which values were checked: "all", "sampled" (rows per tensor), "none"
    rows_per_tensor: int | None = None

    @property
    def summary(self) -> dict[str, int]:
        out = dict.fromkeys(SEVERITIES, 0)
        for f in self.findings:
            out[f.severity] += f.count
        return out

    def to_dict(self) -> dict:
        return {"path": self.path, "findings": [f.to_dict() for f in self.findings], "summary": self.summary,
                "values_checked": self.values}


def _groups_contradict(layer) -> bool:
    """Whether a GPTQ layer's scales hold another number of groups than its group size gives
    (the config's group size is wrong: the layer's problem says so, and every g_idx check
    would only repeat it)."""
    sc = layer.tensors.get("scales")
    if sc is None or not sc.shape or not layer.shape or layer.group_size is None:
        return False
    return sc.shape[0] != gptq_groups(layer.shape[-1], layer.group_size)


class _Collector:
    """Accumulates findings, capping each (rule, file) at _MAX_PER_RULE individual entries."""

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self._counts: dict[tuple, int] = {}
        self._overflow: dict[tuple, Finding] = {}
        self._error_layers: set[str] = set()  # capped findings too
        #: the name a file stores a tensor under (a stacked expert parameter is read as its
        #: projection's ``.weight``; a finding names what the user can find in the file)
        self.stored_name = None

    def add(self, rule: str, message: str, *, file=None, tensor=None, layer=None, severity=None, also=()) -> None:
        r = RULES[rule]
        if self.stored_name is not None:
            tensor = None if tensor is None else self.stored_name(tensor)
            also = [self.stored_name(t) for t in also]
        key = (rule, str(file) if file else None)
        n = self._counts.get(key, 0) + 1
        self._counts[key] = n
        f = Finding(rule, severity or r.severity, message, str(file) if file is not None else None,
                    tensor, layer, r.ref, also=list(also))
        if layer is not None and f.severity == "error":
            self._error_layers.add(layer)
        if n <= _MAX_PER_RULE:
            self.findings.append(f)
        else:
            self._overflow[key] = f

    def has_error(self, layer: str) -> bool:
        """Whether ``layer`` has an error finding (a set lookup: asked once per layer)."""
        return layer in self._error_layers

    def has(self, rule: str | None = None, *, layer: str | None = None, severity: str | None = None) -> bool:
        return any((rule is None or f.rule == rule) and (layer is None or f.layer == layer)
                   and (severity is None or f.severity == severity) for f in self.findings)

    def finish(self) -> list[Finding]:
        for key, last in self._overflow.items():
            extra = self._counts[key] - _MAX_PER_RULE
            self.findings.append(Finding(last.rule, last.severity,
                                         f"… and {extra} more finding(s) of this rule in this file "
                                         f"(only the first {_MAX_PER_RULE} are listed)", last.file,
                                         None, None, last.ref, count=extra))
        order = {s: i for i, s in enumerate(SEVERITIES)}
        return sorted(self.findings, key=lambda f: order[f.severity])  # stable within a severity


# ---------------------------------------------------------------------------------- public API

#: What the ``gptq.sym-zeros`` message says where the zero points merely vary (sym=true over an
#: asymmetric file): quantscope decodes with the stored zeros, as GPTQModel does, so its figures
#: are right and only runtimes that take the config's word misread it (dequant and compare say so).
STORED_ZEROS_VARY = "runtimes that ignore qzeros"
#: The doctor's errors of a layer's tensors against its own config: what ``dequant``, ``compare``
#: and ``convert`` warn of (exit 1), since a loader that follows the config reads such a layer
#: otherwise than its tensors say.
CONFIG_RULES = ("gptq.sym-zeros", "ct.packing", "ct.zero-point", "ct.sym-zero-point")


def layer_config_error(model, layer) -> str | None:
    """The first of the doctor's :data:`CONFIG_RULES` errors of one layer (its small side tensors
    read: qzeros, zero points), or None. Cheap: no weights are read."""
    if layer.problem or layer.scheme not in ("gptq", "ct-pack"):
        return None
    d = _Doctor(model.ckpt.source, full=False, values=False, progress=None, cancel=None, budget_s=0.0,
                rows_per_tensor=0)
    d.ckpt, d.model = model.ckpt, model
    try:
        if layer.scheme == "gptq" and layer.bits and layer.shape:
            d._check_gptq_zeros(layer)
        elif layer.scheme == "ct-pack":
            d._check_ct_pack(layer, _layer_file(layer))
    except (QuantscopeError, ValueError, IndexError, TypeError):
        return None
    return next((f.message for f in d.col.findings if f.rule in CONFIG_RULES and f.severity == "error"), None)


def diagnose(path: str | os.PathLike, *, full: bool = False, values: bool = True,
             progress: Callable[[float], None] | None = None, cancel=None,
             budget_s: float = 2.0, rows_per_tensor: int = 64) -> list[Finding]:
    """Find what is wrong with a checkpoint.

    Parameters
    ----------
    path
        A ``.safetensors`` file, a model folder, an index ``.json`` or a repo id in the local
        Hugging Face cache.
    full
        Check every value of every tensor (no time budget, no sampling).
    values
        False: structure only — headers, index, configs, shapes; no tensor data is read.
    progress
        Called with the fraction done (0..1).
    cancel
        An object with ``is_set()`` (e.g. ``threading.Event``), checked between tensors.
    budget_s, rows_per_tensor
        Limits of the sampled value checks (ignored with ``full``).

    Returns
    -------
    list of Finding
        Errors first, then warnings, then info. Never raises on a broken checkpoint; when
        nothing can be opened at all, the list holds a single error.

    Raises
    ------
    Cancelled
        When ``cancel`` was set.
    """
    return run_diagnosis(path, full=full, values=values, progress=progress, cancel=cancel,
                         budget_s=budget_s, rows_per_tensor=rows_per_tensor).findings


def run_diagnosis(path: str | os.PathLike, *, full: bool = False, values: bool = True,
                  progress: Callable[[float], None] | None = None, cancel=None,
                  budget_s: float = 2.0, rows_per_tensor: int = 64) -> Report:
    """Like :func:`diagnose`, returning a :class:`Report` (findings, whether anything opened)."""
    gc_was_enabled = gc.isenabled()
    gc.disable()  # see Checkpoint.__init__: big headers, no cycles
    try:
        return _Doctor(path, full=full, values=values, progress=progress, cancel=cancel,
                       budget_s=budget_s, rows_per_tensor=rows_per_tensor).run()
    finally:
        if gc_was_enabled:
            gc.enable()


# ---------------------------------------------------------------------------------- helpers

def _metadata_findings(col: _Collector, sf: SafetensorsFile) -> None:
    meta = sf.metadata
    if meta is None:
        col.add("container.no-metadata", "no __metadata__ in the header; transformers defaults to 'pt' with a "
                "warning, but some versions and the TF/Flax loaders require it (mlx #743, accelerate #1151). "
                "Re-save with metadata {'format': 'pt'} (or 'mlx') if a loader complains", file=sf.path)
    elif meta.get("format") not in ("pt", "tf", "flax", "mlx"):
        col.add("container.metadata-format", f"__metadata__['format'] is {meta.get('format')!r}; transformers "
                "only accepts pt, tf, flax or mlx and refuses this file ('does not contain the valid "
                "metadata'). Set it to 'pt' (PyTorch) or 'mlx'", file=sf.path)


def _layout_findings(col: _Collector, sf: SafetensorsFile) -> None:
    entries = sf.raw_entries()
    n = sf.header_len
    if n >= 16:
        try:
            with open(sf.path, "rb") as fh:
                fh.seek(8 + n - 64 if n > 64 else 8)
                tail = fh.read(min(64, n))
        except OSError:
            tail = b""
        pad = len(tail) - len(tail.rstrip(b" "))
        if pad >= 8:
            col.add("container.header-padding", f"the header ends in {pad}{'+' if pad == 64 else ''} padding "
                    "spaces, more than the ≤7 the writer uses for 8-byte alignment; harmless for readers, "
                    "but unusual (a header reserved for in-place edits?)", file=sf.path)
    if len(entries) > 1:
        begins = np.fromiter((e.data_offsets[0] for e in entries.values()), dtype=np.int64, count=len(entries))
        if (np.diff(begins) < 0).any():
            col.add("container.offset-order", "tensors are listed in a different order than their data "
                    "(as mx.save_safetensors writes); readers do not care, but sequential streaming "
                    "readers seek back and forth", file=sf.path)


def _parse_keeping_duplicates(raw: bytes) -> tuple[dict, list[str]]:
    """(the header as JSON, the names given more than once in any of its objects, sorted)."""
    dupes: set[str] = set()

    def hook(pairs):
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            dupes.update(k for k in set(keys) if keys.count(k) > 1)
        return dict(pairs)

    return json.loads(raw, object_pairs_hook=hook), sorted(dupes)


def _duplicate_keys(col: _Collector, sf: SafetensorsFile) -> None:
    """A name given twice in a header that parses (both entries alike: the parser keeps one).
    Each entry has one "data_offsets": more of them than entries means duplicates, and only
    then is the header parsed again, keeping every pair, to name them."""
    with open(sf.path, "rb") as fh:
        fh.seek(8)
        raw = fh.read(sf.header_len)
    if raw.count(b'"data_offsets"') <= len(sf):
        return
    try:
        dupes = _parse_keeping_duplicates(raw)[1]
    except ValueError:
        return
    for k in dupes:
        col.add("container.duplicate-key", f"tensor name {k!r} appears more than once in the header (the entries "
                "agree, so this reader kept one); the safetensors reference format disallows duplicate keys and "
                "other readers may refuse the file — re-save it", file=sf.path, tensor=k)


def _scan_broken(col: _Collector, path: Path, exc: QuantscopeError) -> None:
    """A header the reader rejected: list every problem of it, not only the first."""
    rule = exc.rule if exc.rule in RULES else "container.header-json"
    first_only = rule in ("container.missing", "container.too-short", "container.header-too-large",
                          "container.header-json", "container.unsupported")
    findings_before = len(col.findings)
    if not first_only:
        try:
            _rescan(col, path)
        except Exception:  # the rescan is best effort; the reader's own error is reported below
            _logger.debug("rescan of %s failed", path, exc_info=True)
    if len(col.findings) == findings_before:
        col.add(rule, exc.message + _hint(rule), file=path, tensor=exc.tensor)


def _hint(rule: str) -> str:
    return {
        "container.too-short": " — re-download the file",
        "container.header-too-large": "; loaders fail with HeaderTooLarge / 'incomplete metadata' — "
                                      "re-download it (git lfs pull for LFS pointers)",
        "container.header-json": "; every safetensors reader rejects it — re-download or re-save the file",
        "container.missing": "",
    }.get(rule, "; safetensors readers refuse the whole file — re-download or re-save it")


def _rescan(col: _Collector, path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        raw = fh.read(n)
    obj, pairs_seen = _parse_keeping_duplicates(raw)
    for k in pairs_seen:
        col.add("container.duplicate-key", f"tensor name {k!r} appears more than once in the header; the "
                "reference parser rejects duplicate keys", file=path, tensor=k)
    meta = obj.pop("__metadata__", None)
    if meta is not None:
        if not isinstance(meta, dict):
            col.add("container.metadata", "__metadata__ must be an object of strings; the reference parser "
                    "rejects the file — re-save it with string metadata", file=path)
        else:
            for k, v in meta.items():
                if not isinstance(v, str):
                    col.add("container.metadata", f"__metadata__ value of {k!r} is {type(v).__name__}, not a "
                            "string; the safetensors reference parser rejects the file (safetensors #549) — "
                            "re-save it with string values", file=path)
    data_size = size - 8 - n
    ranges, past = [], []
    # Coverage (gaps, trailing bytes) is only meaningful when every entry has a usable range.
    coverage = not pairs_seen
    for name, e in obj.items():
        try:
            dtype, shape = e["dtype"], e["shape"]
            begin, end = e["data_offsets"]
        except (TypeError, KeyError, ValueError):
            col.add("container.entry", "entry must be an object with 'dtype', 'shape' and a two-element "
                    "'data_offsets'", file=path, tensor=name)
            coverage = False
            continue
        dt = DTYPES.get(dtype) if isinstance(dtype, str) else None
        if dt is None:
            col.add("container.dtype", f"unknown dtype {dtype!r} (known: {', '.join(DTYPES)}); no reader can "
                    "interpret this tensor", file=path, tensor=name)
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            col.add("container.entry", f"shape {shape!r} is not a list of non-negative integers", file=path,
                    tensor=name)
            shape = None
        if type(begin) is not int or type(end) is not int or not 0 <= begin <= end:
            col.add("container.offsets", f"data_offsets {[begin, end]!r} are not two integers 0 <= begin <= end",
                    file=path, tensor=name)
            coverage = False
            continue
        if dt is not None and shape is not None and math.prod(shape) * dt.bits != (end - begin) * 8:
            bits = math.prod(shape) * dt.bits  # (exact bytes: ":g" printed 2.3593e+06)
            col.add("container.size-mismatch", f"shape {shape} × {dtype} needs {bits // 8 if bits % 8 == 0 else bits / 8} "
                    f"bytes but data_offsets [{begin}, {end}] span {end - begin}; readers refuse the file",
                    file=path, tensor=name)
        if end > data_size:
            past.append((begin, end, name))
        ranges.append((begin, end, name))
    if past:  # one finding for the file: a truncated shard gave one for each tensor past its end (38)
        begin, end, name = min(past)
        more = (f"{len(past)} tensors run past the end of the data ({data_size} bytes; the header describes "
                f"{max(e for _, e, _ in past)}), the first at data_offsets [{begin}, {end}]" if len(past) > 1 else
                f"data_offsets [{begin}, {end}] run past the end of the data ({data_size} bytes)")
        col.add("container.out-of-file", f"{more}: the file is truncated (incomplete download?) — re-download it",
                file=path, tensor=name, also=[x for _, _, x in sorted(past)[1:]])
    ranges.sort()
    pos, prev = 0, None
    for begin, end, name in ranges:
        if begin < pos:
            col.add("container.overlap", f"byte range [{begin}, {end}] overlaps tensor {prev!r} (which ends at "
                    f"{pos}); the reference parser rejects the file and the tensors would alias",
                    file=path, tensor=name)
        elif begin > pos and coverage:
            col.add("container.gap", f"{begin - pos} bytes of unreferenced data before this tensor (gap at "
                    f"[{pos}, {begin}]); the reference parser rejects the file", file=path, tensor=name)
        if end >= pos:
            pos, prev = end, name
    if pos < data_size and coverage:
        col.add("container.trailing", f"{data_size - pos} bytes after the last tensor are not covered by any "
                "tensor ('file not fully covered'); the reference parser rejects the file", file=path)


def _is_set(cancel) -> bool:
    if cancel is None:
        return False
    fn = getattr(cancel, "is_set", None)
    return bool(fn() if fn is not None else cancel())


_DIGIT_SEG = re.compile(r"\.\d+(?=\.|$)")


def _proj_type(path: str) -> str:
    """``model.layers.3.self_attn.q_proj`` → ``model.layers.*.self_attn.q_proj``."""
    return _DIGIT_SEG.sub(".*", path)


def _f32(a: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # F64 beyond float32's range becomes inf, which the checks report
        return np.asarray(a).astype(np.float32)


_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}
_NORMAL_MIN = {"BF16": float(ml_dtypes.finfo(ml_dtypes.bfloat16).tiny), "F32": float(np.finfo(np.float32).tiny),
               "F64": float(np.finfo(np.float64).tiny)}
# fp16 subnormal scales occur legitimately (MLX floors an all-zero group's scale at 1e-7), so
# they are not flagged.


# ---------------------------------------------------------------------------------- the doctor

class _Doctor:
    def __init__(self, path, *, full, values, progress, cancel, budget_s, rows_per_tensor) -> None:
        self.source = str(path)
        self.full, self.values = full, values
        self.progress, self.cancel = progress, cancel
        self.budget_s, self.rows = budget_s, rows_per_tensor
        self.col = _Collector()
        self.report = Report(self.source)
        self.files: list[SafetensorsFile] = []
        self.failed: list[Path] = []     # shards that exist but could not be parsed
        self.missing: list[str] = []     # shards named by the index that are not there
        self.index: dict | None = None
        self.index_path: Path | None = None
        self.root: Path | None = None
        self.ckpt: Checkpoint | None = None
        self.model = None

    def _tick(self, frac: float) -> None:
        if _is_set(self.cancel):
            raise Cancelled("doctor cancelled")
        if self.progress is not None:
            self.progress(min(1.0, max(0.0, frac)))

    # -- phase 1: files ------------------------------------------------------------------------

    def run(self) -> Report:
        self._tick(0.0)
        shard_paths = self._locate()
        if shard_paths is not None:
            n = max(1, len(shard_paths))
            for i, p in enumerate(shard_paths):
                self._open_shard(p)
                if i % 16 == 0:
                    self._tick(0.2 * (i + 1) / n)
        self.report.files = len(self.files)
        if self.files:
            self.report.opened = True
            self._index_checks()
            self._build_checkpoint()
            if self.ckpt is not None and self.model is None:
                self._check_config(self.qconfig, self.ckpt)
            elif self.ckpt is not None:
                self._tick(0.25)
                self._layer_checks()
                self._tick(0.3)
                if self.values:
                    # A model this small is read whole in about a second: no sample could miss
                    # a NaN in it (one NaN in a 10 MB model went unreported by the sample).
                    if not self.full and sum(f.size for f in self.files) <= FULL_CHECK_BYTES:
                        self.full = True
                    self.report.values = "all" if self.full else "sampled"
                    self.report.rows_per_tensor = None if self.full else self.rows
                    self._format_data_checks()
                    self._value_checks()
        for f in self.files:
            f.close()  # findings hold no arrays; release the mappings now rather than at GC
        self._tick(1.0)
        self.report.findings = self.col.finish()
        if self.model is not None:  # findings on a layer's tensor name the layer too
            owner = {t.name: lay.path for lay in self.model.layers.values() for t in lay.tensors.values()}
            for f in self.report.findings:
                if f.layer is None and f.tensor is not None:
                    f.layer = owner.get(f.tensor)
        return self.report

    def _locate(self) -> list[Path] | None:
        """The shard files to parse (None: nothing to open; a finding says why)."""
        p = Path(self.source).expanduser()
        if not p.exists():
            resolved = _resolve_hf_repo(self.source)
            if resolved is None:
                self.col.add("container.missing", missing_reason(p), file=self.source)
                return None
            p, _ = resolved
        if p.is_dir():
            self.root = p
            return self._locate_folder(p)
        self.root = p.parent
        if p.name.endswith(".index.json"):
            return self._read_index(p)
        if p.suffix in PICKLE_SUFFIXES:
            self.col.add("container.unsupported", "pickle checkpoints are never unpickled (they can run arbitrary "
                         "code); convert it to safetensors first", file=p)
            return None
        return [p]

    def _locate_folder(self, folder: Path) -> list[Path] | None:
        indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
        st_files = sorted(folder.glob("*.safetensors"), key=lambda q: natural_key(q.name))
        pickles = sorted(q.name for q in folder.iterdir() if q.suffix in PICKLE_SUFFIXES and q.is_file())
        if indexes:
            if len(indexes) > 1:
                self.col.add("index.several", "several index files here (" + ", ".join(q.name for q in indexes)
                             + f"); {indexes[0].name} is used — delete the stale one", file=folder)
            out = self._read_index(indexes[0])
        elif st_files:
            out = st_files
        else:
            if pickles:
                self.col.add("container.unsupported", f"only pickle checkpoints here ({', '.join(pickles)}); they "
                             "are never unpickled — convert to safetensors first", file=folder)
            else:
                self.col.add("container.missing", "no .safetensors files in this folder", file=folder)
            return None
        if pickles and out:
            self.col.add("container.pickle-beside", f"pickle files not opened (never unpickled): {', '.join(pickles)}",
                         file=folder)
        return out

    def _read_index(self, index_path: Path) -> list[Path] | None:
        self.index_path = index_path
        self.root = index_path.parent
        try:
            data = json.loads(index_path.read_bytes())
        except FileNotFoundError:
            self.col.add("container.missing", "index file not found", file=index_path)
            return None
        except (ValueError, OSError, RecursionError) as exc:
            self.col.add("index.json", f"index is not valid JSON ({exc}); loaders (and quantscope's other "
                         "commands) cannot find the shards — re-download it; the .safetensors files beside it "
                         "are checked here instead", file=index_path)
            return self._fallback_shards(index_path.parent)
        if isinstance(data, dict) and data.get("metadata") is not None and not isinstance(data["metadata"], dict):
            self.col.add("index.json", f"index 'metadata' is {type(data['metadata']).__name__}, not an object: "
                         "loaders (and quantscope's other commands) refuse the index — make it an object or null",
                         file=index_path)
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict) or not wm:
            self.col.add("index.no-weight-map", "index has no non-empty 'weight_map' object (tensor name → shard "
                         "file); loaders cannot find the tensors — re-download or regenerate it", file=index_path)
            return self._fallback_shards(index_path.parent)
        self.index = {"weight_map": wm, "metadata": data.get("metadata")}
        folder = index_path.parent
        root = link_root(folder).resolve()  # (an HF cache snapshot's blobs are its own)
        first_tensor: dict = {}
        for tensor, shard in wm.items():
            key = shard if isinstance(shard, str) else repr(shard)
            first_tensor.setdefault(key, (tensor, shard))
        out = []
        self._listed: dict[str, Path] = {}
        for key, (tensor, shard) in first_tensor.items():
            if not isinstance(shard, str) or not shard:
                self.col.add("index.entry", f"weight_map value is {shard!r}, not a file name", file=index_path,
                             tensor=tensor)
                continue
            rel = Path(shard)
            target = folder / rel
            # (a shard that is a link to a file elsewhere is followed, as loaders do: the user's
            # own folder of links; a name in the index that leaves the folder is not)
            if rel.is_absolute() or ".." in rel.parts:
                self.col.add("index.unsafe-path", f"shard path {shard!r} points outside the model folder; it is "
                             "refused, never followed — fix the index", file=index_path, tensor=tensor)
                continue
            if target.is_file() and target.is_symlink() and not _within(target.resolve(), root):
                # followed, as loaders do; said, since a copy of the folder (cp -r, an upload of
                # its links) may not carry the file, and it is not where the folder is
                self.col.add("index.linked-shard", f"shard {shard!r} is a link to {target.resolve()}, outside the "
                             "model folder: read from there; a copy of this folder may take the link, not the file",
                             file=index_path, tensor=tensor)
            if not target.is_file() and target.exists():  # a folder, a pipe, a device (a link to one)
                self.col.add("index.missing-shard", f"index names shard {shard!r}, which is not a regular file (a "
                             "folder, a pipe or a device); it is never opened — put the shard file there",
                             file=index_path, tensor=tensor)
                self.missing.append(shard)
                continue
            if not target.is_file():
                self.missing.append(shard)
                n = sum(1 for s in wm.values() if s == shard)
                self.col.add("index.missing-shard", f"index names shard {shard!r} ({n} tensor(s), e.g. {tensor!r}), "
                             "which is missing; some loaders skip it silently and the model loads with missing "
                             "weights — download the missing shard", file=index_path, tensor=tensor)
                continue
            self._listed[shard] = target
            out.append(target)
        # (the names listed, refused ones too: a refused shard is not also "not in the index"); only
        # files that loaders which glob (mlx-lm: model*.safetensors) take for shards: Mistral's
        # consolidated.safetensors beside the shards is no stray
        listed = {t.name for t in out} | set(self.missing) | {Path(s).name for _, s in first_tensor.values()
                                                               if isinstance(s, str)}
        for q in sorted(folder.glob("model*.safetensors")):
            if q.name not in listed:
                self.col.add("index.stray-file", f"{q.name} is not in the index but sits beside the shards; loaders "
                             "that glob model*.safetensors (mlx-lm) merge it with the shards, which duplicates or "
                             "overrides tensors — delete it or move it away", file=q)
        return out

    def _fallback_shards(self, folder: Path) -> list[Path]:
        return sorted(folder.glob("*.safetensors"), key=lambda q: natural_key(q.name))

    def _open_shard(self, p: Path) -> None:
        try:
            sf = SafetensorsFile(p)
        except QuantscopeError as exc:
            self.failed.append(p)
            _scan_broken(self.col, p, exc)
            return
        except OSError as exc:
            self.failed.append(p)
            self.col.add("container.missing", f"cannot read: {exc.strerror or exc}", file=p)
            return
        self.files.append(sf)
        _metadata_findings(self.col, sf)
        _layout_findings(self.col, sf)
        _duplicate_keys(self.col, sf)

    # -- phase 1: index ↔ shards ---------------------------------------------------------------

    def _index_checks(self) -> None:
        where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            names = f.raw_entries()
            if not where.keys().isdisjoint(names):
                for n in names:
                    if n in where:
                        self.col.add("index.duplicate-tensor", f"stored in both {where[n].path.name} and "
                                     f"{f.path.name}; loaders disagree on which copy wins (and a stale copy may "
                                     "be the one used) — remove one", file=f.path, tensor=n)
            where.update(dict.fromkeys(names, f))
        self._where = where
        if self.index is None:
            return
        wm = self.index["weight_map"]
        listed = getattr(self, "_listed", {})
        by_shard = {s: next((f for f in self.files if f.path == p), None) for s, p in listed.items()}
        actual = {}
        for s, f in by_shard.items():
            if f is not None:
                actual.update(dict.fromkeys(f.raw_entries(), s))
        if actual != wm:
            for t, s in wm.items():
                f = by_shard.get(s) if isinstance(s, str) else None
                if f is None or t in f:
                    continue  # shard missing/broken (already reported) or tensor present
                other = where.get(t)
                elsewhere = f"; it is stored in {other.path.name} instead (stale index?)" if other else ""
                self.col.add("index.tensor-missing", f"the index puts this tensor in {s}, which does not hold it"
                             f"{elsewhere}; loaders fail with a missing parameter — regenerate the index",
                             file=f.path, tensor=t)
            for t, f in where.items():
                if t not in wm:
                    self.col.add("index.tensor-unlisted", f"stored in {f.path.name} but not in the index; loaders "
                                 "that follow the index ignore it or report an unexpected key — regenerate the "
                                 "index (stale after re-quantization?)", file=f.path, tensor=t)
        meta = self.index.get("metadata")
        total = meta.get("total_size") if isinstance(meta, dict) else None
        if total is not None and not self.failed and not self.missing:
            actual_total = sum(e.data_offsets[1] - e.data_offsets[0] for f in self.files
                               for e in f.raw_entries().values())
            try:
                ok = int(total) == actual_total
            except (TypeError, ValueError):
                ok = False
            if not ok:
                self.col.add("index.total-size", f"metadata.total_size is {total!r} but the shards' tensors hold "
                             f"{actual_total} bytes; a stale index (re-quantized or edited shards?) — "
                             "regenerate it", file=self.index_path)

    def _build_checkpoint(self) -> None:
        """A Checkpoint over the shards that parsed (broken ones left out) for scheme analysis."""
        try:
            ck = Checkpoint.from_files(self.source, self.root, self.files)
            ck.index_path = self.index_path
            if self.index_path is None and len(self.files) == 1 and Path(self.source).is_file():
                ck.path = Path(self.source)
                said = ck._note_shard_of(ck.path)  # one shard of an index beside it, opened alone
                if said:
                    self.col.add("layer.inconsistent", said, file=self.source, severity="warning")
        except Exception as exc:  # never crash on odd files; report structure findings only
            _logger.debug("could not assemble a checkpoint", exc_info=True)
            self.col.add("layer.inconsistent", f"layers not analysed: {exc}", file=self.source)
            return
        for w in ck.warnings:
            if "byte-order mark" in w:
                self.col.add("config.unreadable", f"{w} — save it without one", file=self.root / w.split(" ")[0])
            elif " ignored: " in w:
                name = w.split(" ignored: ")[0]
                fix = ("make it readable" if "cannot be read" in w else "put the JSON file there" if " it is " in w
                       else "fix the JSON")
                self.col.add("config.unreadable", f"{w}; its quantization settings are not used by quantscope, and "
                             f"loaders will fail on it — {fix}", file=self.root / name)
        self.ckpt = ck
        self.col.stored_name = ck.stored_name
        from .qconfig import parse_configs
        from .schemes import analyze
        self.qconfig = parse_configs(ck.configs)
        if not self.values and self.qconfig.kind is None and self._all_dense():
            # Structure only, and nothing quantized: scheme detection has nothing to find, and on a
            # 20,000-tensor checkpoint it costs several times the header parse.
            self.model = None
            return
        self.model = analyze(ck)
        self.report.layers = len(self.model.layers)

    def _all_dense(self) -> bool:
        for f in self.files:
            entries = f.raw_entries()
            if not _FLOAT_DTYPES.issuperset({e.dtype for e in entries.values()}):
                return False
            if not all(n.endswith((".weight", ".bias")) for n in entries):
                return False
        return True

    def _in_missing_shards(self) -> dict[str, dict[str, list[str]]]:
        """module → missing shard → the module's components the index puts there (made once)."""
        if getattr(self, "_lost", None) is not None:
            return self._lost
        self._lost: dict[str, dict[str, list[str]]] = {}
        if not self.missing or not self.index:
            return self._lost
        gone = set(self.missing)
        for t, shard in self.index["weight_map"].items():
            if shard in gone and isinstance(t, str):
                module, comp = split_name(t)
                self._lost.setdefault(module, {}).setdefault(shard, []).append(comp)
        return self._lost

    @property
    def complete(self) -> bool:
        """True when every shard parsed (absence-based rules are only trusted then), and the file
        checked is not one shard of an index opened alone."""
        return not self.failed and not self.missing and getattr(self.ckpt, "shard_of", None) is None

    # -- phase 1: layers and configs -----------------------------------------------------------

    def _layer_checks(self) -> None:
        model, cfg, col = self.model, self.model.config, self.col
        ck = self.ckpt
        for path, layer in model.layers.items():
            before = len(col.findings)
            comps = layer.tensors
            file = _layer_file(layer)
            self._check_mlx_triple(layer, cfg, file)
            self._check_formats(layer, cfg, file)
            self._check_extra_parts(layer)
            if layer.problem == "no weight tensor recognised" and len(col.findings) == before:
                # (packed codes are bytes or words of two dimensions or more: I64 position_ids, a BOOL
                # attention mask, a float buffer such as attention sinks are no format)
                packed = sorted((t for t in comps.values() if len(t.shape) >= 2 and (
                    t.dtype in ("U8", "I8", "U16", "I16", "U32", "I32") or t.dtype.startswith("F8_"))),
                    key=lambda t: t.name)
                if packed:
                    what = ", ".join(f"{t.name} {t.dtype} {list(t.shape)}" for t in packed[:3])
                    more = f" and {len(packed) - 3} more" if len(packed) > 3 else ""
                    method = f" (quant_method {cfg.kind!r})" if cfg.kind else ""
                    col.add("layer.unsupported", f"{what}{more}: packed data in a layout quantscope does not decode"
                            f"{method}; this module's error is not measured", file=file, layer=path,
                            tensor=packed[0].name)
                continue
            if layer.problem and len(col.findings) == before:
                # A module no scheme recognises may be a format quantscope does not know: a warning.
                # ...but a packed qweight (GPTQ/AWQ) without what decodes it is a broken layer
                unknown = layer.scheme == "unknown" and not any(c in comps for c in ("qweight", "weight_packed")) \
                    and not (comps.keys() & QUANT_PARTS) and not layer.settings.get("scalar_weight")
                if layer.settings.get("split_across_shards"):  # (the file is one shard: said as such)
                    col.add("layer.inconsistent", layer.problem, file=file, layer=path, severity="warning")
                    continue
                lost = self._in_missing_shards().get(path)
                if lost:  # the cause is the missing shard (an error of its own): said as such
                    where = "; ".join(f"its {', '.join(sorted(c))} in {sh}" for sh, c in sorted(lost.items()))
                    col.add("layer.inconsistent", f"{layer.problem} — {where}, which is missing", file=file,
                            layer=path, severity="warning")
                    continue
                col.add("layer.inconsistent", f"{layer.problem}; loaders fail on this layer or decode it wrongly",
                        file=file, layer=path, severity="warning" if unknown else None)
        self._check_overrides(cfg)
        self._check_per_expert()
        self._check_falcon_layout()
        self._check_norm_head()
        self._check_head_rows()
        self._check_expert_set()
        self._check_fused_and_split()
        self._check_mlx_version()
        self._check_names()
        self._check_config(cfg, ck)

    def _check_extra_parts(self, layer) -> None:
        """A bias that does not fit the layer's outputs, a float weight beside packed codes: the
        decode is right, but loaders fail on the layer (a size mismatch) or take the other one."""
        comps, path = layer.tensors, layer.path
        b = comps.get("bias")
        # (a convolution's outputs are its weight's first axis, whatever its layout: [C, 1, k] as
        # transformers stores a depthwise conv1d, [C, k, 1] as mlx-lm does)
        conv = "conv" in path.rpartition(".")[2] and layer.shape and len(layer.shape) == 3
        outs = tuple(layer.shape[:1]) if conv else tuple(layer.shape[:-1]) if layer.shape else ()
        if b is not None and layer.shape and len(layer.shape) >= 2 and tuple(b.shape) != outs:
            self.col.add("layer.inconsistent", f"bias {list(b.shape)} does not fit the layer's outputs "
                         f"{list(outs)}: loaders fail on it (size mismatch) — a stale or damaged file",
                         file=b.file, tensor=b.name, layer=path)
        packed = next((c for c in ("qweight", "weight_packed") if c in comps), None)
        w = comps.get("weight")
        if packed and w is not None and w.dtype in ("F32", "F16", "BF16"):
            self.col.add("layer.inconsistent", f"both a float `.weight` {list(w.shape)} and packed `.{packed}`: "
                         "quantscope reads the packed codes; a loader may take either — one of them is stale",
                         file=w.file, tensor=f"{path}.weight", layer=path)

    def _check_mlx_triple(self, layer, cfg, file) -> None:
        comps, path, col = layer.tensors, layer.path, self.col
        if "qweight" in comps or "weight_packed" in comps:
            return
        has_s, has_b, w = "scales" in comps, "biases" in comps, comps.get("weight")
        if has_b and not has_s:
            col.add("mlx.biases-without-scales", "`.biases` without `.scales`: MLX loaders report missing "
                    f"{path}.scales (or unexpected biases) — the scales were lost in conversion; re-convert",
                    file=comps["biases"].file, tensor=f"{path}.biases", layer=path)
            return
        if not has_s or w is None:
            return
        eff = cfg.effective(path)
        tname = f"{path}.scales"
        if eff.quantized is False:
            col.add("mlx.scales-not-quantized", f"the config marks this layer not quantized ({eff.source}) but "
                    "`.scales` are stored: MLX builds a plain Linear and fails with 'parameters not in model: "
                    f"{path}.scales' — drop the override or the stale tensors", file=file, tensor=tname, layer=path)
            return
        if w.dtype in _FLOAT_DTYPES:
            col.add("mlx.scales-not-quantized", f"float ({w.dtype}) weight next to `.scales`: an unquantized layer "
                    "with stale quantization tensors; MLX's legacy rule quantizes every module with `.scales` and "
                    f"then fails on the shapes (mlx-examples #367) — remove {path}.scales/.biases", file=file,
                    tensor=tname, layer=path)
            return
        if w.dtype != "U32":
            col.add("mlx.weight-dtype", f"packed weight is {w.dtype}; MLX quantized weights are uint32 words — "
                    "a GPTQ/AWQ int32 tensor renamed without repacking? Re-convert the layer", file=file,
                    tensor=f"{path}.weight", layer=path)
            return
        if len(w.shape) < 2:
            col.add("mlx.rank", f"packed weight has shape {list(w.shape)}; quantized weights need rank ≥ 2 "
                    "(mx.quantize refuses rank 1) — the tensor was flattened; re-convert", file=file,
                    tensor=f"{path}.weight", layer=path)
            return
        s = comps["scales"]
        bad = [c for c in ("scales", "biases") if c in comps and (len(comps[c].shape) != len(w.shape)
                                                                 or comps[c].shape[:-1] != w.shape[:-1])]
        if has_b and comps["biases"].shape != s.shape and "biases" not in bad:
            bad.append("biases")
        if bad:
            col.add("mlx.scales-shape", "; ".join(f"{c} {list(comps[c].shape)}" for c in bad)
                    + f" do not match the packed weight {list(w.shape)} (same rank and leading dims, biases "
                    "like scales): mx.dequantize fails with 'Shape of scales and biases does not match' — "
                    "re-convert", file=file, tensor=f"{path}.{bad[0]}", layer=path)
            return
        mode = layer.mode or eff.mode or "affine"
        if mode == "affine" and not has_b and s.dtype != "U8":
            col.add("mlx.missing-biases", "affine layer (per the config) without `.biases`: MLX fails with "
                    f"'Missing parameters: {path}.biases'. If the layer is mxfp4/nvfp4/mxfp8, its per-layer "
                    "config entry (with \"mode\") is missing (R17) — add it; otherwise re-convert", file=file,
                    tensor=tname, layer=path)
            return
        if mode != "affine" and has_b:
            col.add("mlx.fp-with-biases", f"{mode} layer with `.biases`; only affine layers have biases, MLX "
                    "rejects them as parameters not in model — the layer is affine and its per-layer mode is "
                    "wrong, or the biases are stale", file=file, tensor=f"{path}.biases", layer=path)
            return
        if mode != "affine" and layer.warning:  # (the config's mode/bits/group against block-float tensors)
            col.add("mlx.bits-group", layer.warning, file=file, tensor=tname, layer=path)
            return
        if mode != "affine" and s.dtype not in FP_SCALE_DTYPES.get(mode, ("U8",)):
            col.add("mx.e8m0-scale", f"{mode} scales are {s.dtype}; they must be U8 exponent (E8M0) / E4M3 bytes. "
                    "Decoded-to-linear scales read as exponents give weights off by ~10^5 (omlx #2159) — store "
                    "the raw scale bytes", file=file, tensor=tname, layer=path)
            return
        bits, group = (layer.bits, layer.group_size) if mode == "affine" else MODE_DEFAULTS.get(mode, (None, None))
        if not bits or not group:
            return
        wp, S = w.shape[-1], s.shape[-1]
        k_bits = wp * 32 / bits
        if k_bits != group * S:
            fits = affine_fits(wp, S) if mode == "affine" else []
            hint = f"; the shapes fit {', '.join(f'{b} bit/G{g}' for b, g in fits)}" if fits else ""
            col.add("mlx.bits-group", f"packed weight {list(w.shape)} at {bits} bit holds K={k_bits:g} inputs but "
                    f"scales {list(s.shape)} × group {group} cover {group * S} (32·W/b ≠ G·S) with the effective "
                    f"settings ({layer.source}){hint}; MLX fails with a shape error — fix the per-layer "
                    "bits/group_size in config.json", file=file, tensor=tname, layer=path)
            return
        other = misread_pair(path, wp, S, bits, group, self.model.dims, _TOWER_PARTS) if mode == "affine" else None
        if other is not None:
            b, g, k2, why = other
            col.add("mlx.bits-group", f"with the effective {bits} bit / group {group} ({layer.source}) the layer has "
                    f"K={int(k_bits)} inputs, {why}; {b} bit / group {g} gives K={k2}. The shapes fit both, so "
                    "loaders decode silent garbage (b·G swapped) — fix bits/group_size in config.json", file=file,
                    tensor=tname, layer=path)

    def _check_value_types(self, cfg, ck) -> None:
        """Settings whose JSON type loaders read another way than meant: a boolean written as a
        string ("false" is true to Python, and to every loader that tests it), an AWQ version whose
        layout quantscope does not know, an MLX per-layer entry that is neither settings nor a
        boolean (mlx-lm fails on it)."""
        col = self.col
        main = ck.configs.get("config.json") or {}
        sources = [("config.json", main), ('config.json["quantization_config"]', main.get("quantization_config"))]
        sources += [(n, ck.configs.get(n)) for n in ("quantize_config.json", "quant_config.json")]
        for where, d in sources:
            if not isinstance(d, dict):
                continue
            keys = _BOOL_KEYS if where != "config.json" else ("tie_word_embeddings",)
            for k in keys:
                v = d.get(k)
                if isinstance(v, str):
                    col.add("config.bool-type", f"{where}: {k} is the string {v!r}: Python and the loaders that test "
                            f"it read any non-empty string as true — write {k}: "
                            f"{'false' if v.strip().lower() in ('false', 'no', '0', 'off') else 'true'}",
                            file=self.root / where.split("[")[0])
        if cfg.kind == "awq":
            version = cfg.globals.get("version")
            if isinstance(version, str) and version.lower() not in ("gemm", "gemv", "gemv_fast"):
                col.add("awq.version", f"version {version!r} is not a layout quantscope knows (gemm, gemv, gemv_fast): "
                        "the tensors were read as their shapes say (GEMM), which is right only where the tool "
                        "saved them in GEMM layout — compare a layer with the tool's own decode",
                        file=self.root / _cfg_file(cfg), severity="warning")
        if cfg.kind == "mlx":
            for key, value in cfg.overrides:
                if not isinstance(value, (dict, bool)):
                    col.add("config.bad-value", f"per-layer entry {key!r} is {value!r}: mlx-lm takes a "
                            "{bits, group_size, mode} object or false there and fails on anything else",
                            file=self.root / "config.json", layer=key)

    def _check_names(self) -> None:
        """Tensor names that no module path can be (``.``, ``a..b``, ``x.``): a loader maps names
        to parameters by their dotted path, so such a tensor is "unexpected" and the parameter it
        was meant for is left untrained, loudly or not."""
        odd = [n for n in self.ckpt.names if not n or n.startswith(".") or n.endswith(".") or ".." in n]
        if odd:
            t = self.ckpt.info(odd[0])
            more = f" and {len(odd) - 1} more" if len(odd) > 1 else ""
            self.col.add("container.odd-name", f"tensor name {odd[0]!r}{more} is no module path (an empty part, or a "
                         "leading or trailing dot): loaders match it to no parameter, and the one it was meant for "
                         "is missing — rename it", file=getattr(t, "file", None), tensor=odd[0])

    def _check_fused_and_split(self) -> None:
        """``X.qkv_proj`` beside ``X.q_proj`` (or gate_up_proj beside gate_proj/up_proj): a model
        has one or the other, so a strict loader refuses the extra parameters and a lenient one
        uses whichever it looks for, silently."""
        layers = self.model.layers
        for path in layers:
            parent, _, proj = path.rpartition(".")
            if proj in _FUSED:
                split = [f"{parent}.{p}" for p in _FUSED[proj] if f"{parent}.{p}" in layers]
                if split:
                    self.col.add("layer.fused-and-split", f"{path} is stored, and so {'is' if len(split) == 1 else 'are'} {', '.join(split)}: a model "
                                 "has either the fused projection or its parts, so one set matches no parameter "
                                 "(strict loaders refuse the file; others use one set silently) — keep one",
                                 file=_layer_file(layers[path]), layer=path)

    def _check_expert_set(self) -> None:
        """Every MoE block's experts: numbered 0..E−1 with none missing, the same projections and
        shapes each, and as many as the config's expert count (a stacked switch_mlp: its first
        dimension). A missing or misshapen expert was "no problems found", and loaders fail on
        the block (a missing key, a size mismatch)."""
        if not self.complete:
            return
        cfg = self.model.ckpt.configs.get("config.json") or {}
        sub = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
        want = next((c.get(k) for c in (cfg, sub) for k in ("num_experts", "num_local_experts", "n_routed_experts")
                     if isinstance(c.get(k), int) and c.get(k) > 0), None)
        blocks: dict[str, dict[int, dict[str, tuple]]] = {}
        first: dict[str, Layer] = {}  # a layer of each block: its file is named
        for p, lay in self.model.layers.items():
            m = EXPERT_RE.match(p)
            if m:
                blocks.setdefault(m["pre"], {}).setdefault(int(m["e"]), {})[m["proj"]] = tuple(lay.shape or ())
                first.setdefault(m["pre"], lay)
        for pre, experts in blocks.items():
            n = max(experts) + 1
            missing = [e for e in range(n) if e not in experts]
            projs = set().union(*(set(v) for v in experts.values()))
            lacking = [(e, sorted(projs - set(v))) for e, v in sorted(experts.items()) if projs - set(v)]
            shapes = {pr: {} for pr in projs}
            for e, v in experts.items():
                for pr, sh in v.items():
                    shapes[pr].setdefault(sh, []).append(e)
            odd = [(pr, min(d.items(), key=lambda kv: len(kv[1]))) for pr, d in shapes.items() if len(d) > 1]
            where = {"file": _layer_file(first[pre]), "layer": f"{pre}.experts"}
            if missing:
                self.col.add("moe.experts", f"{pre}: experts {missing[:8]} of 0..{n - 1} are not stored: loaders "
                             "fail on the missing keys", **where)
            if lacking:
                e, gone = lacking[0]
                self.col.add("moe.experts", f"{pre}: expert {e} lacks {', '.join(gone)}, which the other experts "
                             f"have ({len(lacking)} expert(s) so): loaders fail on the missing keys", **where)
            for pr, (sh, es) in odd:
                self.col.add("moe.experts", f"{pre}: {pr} of expert(s) {es[:8]} has shape {list(sh)}, unlike the "
                             "others: loaders fail with a size mismatch", **where)
            if want is not None and not missing and n != want:
                self.col.add("moe.experts", f"{pre}: {n} experts stored, but the config says {want}: loaders "
                             "build that many and fail on the difference", **where)
        if want is None:
            return
        for p, lay in self.model.layers.items():
            m = _SWITCH_RE.match(p)
            if m and lay.shape and len(lay.shape) == 3 and lay.shape[0] != want:
                self.col.add("moe.experts", f"{p} stacks {lay.shape[0]} experts, but the config says {want}: "
                             "loaders build that many and fail on the difference", file=_layer_file(lay), layer=p)


    def _check_per_expert(self) -> None:
        """MLX-quantized experts stored one by one (experts.{e}.*.scales). When mlx-lm loads a
        model, its class's ``sanitize`` stacks per-expert tensors into switch_mlp: for some model
        types the weight, scales and biases (:data:`STACKS_QUANTIZED_EXPERTS`), for the others
        (qwen3_moe, qwen3_next, minimax, …) only the .weight, which leaves the scales and biases
        over ("parameters not in model")."""
        per = [p for p, lay in self.model.layers.items() if lay.scheme.startswith("mlx-") and EXPERT_RE.match(p)]
        mt = self.model.ckpt.model_types()[0]
        if per and mt not in STACKS_QUANTIZED_EXPERTS:
            self.col.add("mlx.per-expert", f"{len(per)} MoE expert layers are MLX-quantized one by one (e.g. "
                         f"{per[0]}); mlx-lm loads experts stacked as switch_mlp.{{gate,up,down}}_proj, and for "
                         f"model type {mt or '(none)'!r} it stacks only their .weight, so their .scales/.biases "
                         "match no parameter and loading fails — convert the source with `quantscope convert "
                         "--to mlx` or mlx_lm.convert (both stack the experts)",
                         file=_layer_file(self.model.layers[per[0]]), layer=per[0])

    def _check_norm_head(self) -> None:
        """Bailing's ``norm_head``: mlx-lm's bailing_moe / bailing_moe_linear sanitize (0.32.2)
        divides ``lm_head.weight`` by its column norms whenever it loads the model, whatever the
        file holds — for a dense head, the normalization transformers applies at run time; for a
        quantized one, its uint32 words divided as numbers and cast back: all zeros (checked: every
        logit 0). mlx_lm.convert itself writes such files (it quantizes lm_head)."""
        cfg = self.model.ckpt.configs.get("config.json") or {}
        if not ({"bailing_moe", "bailing_moe_linear"} & set(self.model.ckpt.model_types())) or not cfg.get("norm_head"):
            return
        head = self.model.layers.get("lm_head")
        if head is None or not head.scheme.startswith("mlx-"):
            return
        self.col.add("mlx.norm-head-quantized", "lm_head is MLX-quantized and config.json has norm_head true: mlx-lm's "
                     "bailing sanitize divides lm_head.weight by its column norms on every load, here the packed "
                     "uint32 words as numbers, so the head loads as zeros and every logit is 0 — keep lm_head "
                     "unquantized (`quantscope convert --to mlx` does so for these models), or store it normalized "
                     "and set norm_head false", file=_layer_file(head), tensor="lm_head.weight", layer="lm_head")

    def _check_head_rows(self) -> None:
        """Baichuan-M1: mlx-lm's conversion normalizes the head's rows before quantizing, and its
        load normalizes a dense head but takes a quantized one as it is. A quantized head whose
        rows are not of norm 1 (quantscope's convert wrote one before 2026-12; any repack of a
        transformers file) gives logits scaled row by row."""
        if "baichuan_m1" not in self.model.ckpt.model_types():
            return
        head = self.model.layers.get("lm_head")
        if head is None or not head.scheme.startswith("mlx-") or rows_normalized(self.model, head) is not False:
            return
        self.col.add("mlx.head-not-normalized", "lm_head is MLX-quantized, and its rows are not of norm 1: mlx-lm's "
                     "baichuan_m1 normalizes a dense head at load but takes a quantized one as normalized already "
                     "(its conversion divides each row by its norm before quantizing), so every logit is off by its "
                     "row's norm — convert the source again with `quantscope convert --to mlx` or mlx_lm.convert "
                     "(both normalize the rows)", file=_layer_file(head), tensor="lm_head.weight", layer="lm_head")

    def _check_falcon_layout(self) -> None:
        """A Falcon-H1 quantized for MLX must be written as mlx-lm's conversion writes it: the muP
        multipliers folded into the weights and conv1d ``[C, k, 1]``. mlx-lm's sanitize tells a file
        to fold by its first conv1d alone: one stored ``[C, 1, k]`` (transformers') beside packed
        weights is folded again at load, the multipliers applied to the uint32 words (mlx fails,
        "[dequantize] The matrix should be given as a uint32"). quantscope's convert wrote such
        files before 2026-12."""
        if "falcon_h1" not in self.model.ckpt.model_types() or mup.falcon_folded(self.model) is not False:
            return
        packed = [p for p, lay in self.model.layers.items() if lay.scheme.startswith("mlx-")]
        if not packed:
            return
        conv = next(lay for p, lay in self.model.layers.items() if p.endswith("mamba.conv1d") and "weight" in lay.tensors
                    and lay.tensors["weight"].shape is not None and len(lay.tensors["weight"].shape) == 3)
        self.col.add("mlx.unfolded-multipliers", f"{len(packed)} layers are MLX-quantized (e.g. {packed[0]}), but "
                     f"{conv.path}.weight is stored {list(conv.tensors['weight'].shape)}, as transformers stores it: "
                     "mlx-lm's falcon_h1 sanitize then takes the file for a transformers one and multiplies the packed "
                     "weights by the config's muP multipliers, and loading fails — convert the transformers source "
                     "again with `quantscope convert --to mlx` or mlx_lm.convert (both fold the multipliers and write "
                     "conv1d as [C, k, 1])", file=_layer_file(conv), tensor=f"{conv.path}.weight", layer=packed[0])

    def _check_mlx_version(self) -> None:
        """R16: the first MLX release that decodes every bit width and mode stored (older ones
        fail with "[quantize] The requested number of bits N is not supported")."""
        need: dict[tuple, list[str]] = {}
        for path, lay in self.model.layers.items():
            if lay.scheme == "mlx-affine" and lay.bits in MLX_BITS_SINCE:
                need.setdefault(MLX_BITS_SINCE[lay.bits], []).append(path)
            elif lay.scheme.startswith("mlx-") and lay.mode in MLX_MODE_SINCE:
                need.setdefault(MLX_MODE_SINCE[lay.mode], []).append(path)
        if not need:
            return
        kinds = sorted(need.items(), reverse=True)
        (version, _), paths = kinds[0]
        why = ", ".join(f"{w} ({len(ps)} layer{'s' * (len(ps) > 1)}) since {'.'.join(map(str, v))}"
                        for (v, w), ps in kinds)
        self.col.add("mlx.min-version", f"needs mlx {'.'.join(map(str, version))} or newer: {why}. Older runtimes "
                     "(LM Studio's mlx-engine, pinned mlx-lm installs) fail with \"[quantize] The requested number "
                     "of bits … is not supported\"", file=_layer_file(self.model.layers[paths[0]]), layer=paths[0])

    def _check_overrides(self, cfg) -> None:
        if cfg.kind != "mlx" or not self.complete:
            return
        from .qconfig import _prefix_variants
        known = set()
        for path in self.model.layers:
            known.update(k for k, _ in _prefix_variants(path, cfg.multimodal))
        for key, value in cfg.overrides:
            # (a `false` entry matching nothing is harmless: mlx-lm's configs of Dec 2024 - Aug 2025
            # wrote one for every leaf module, act_fn and rotary_emb included, and the loader
            # quantizes only modules whose `.scales` are stored)
            if key in known or value is False:
                continue
            sev = None
            close = [p for p in self.model.layers if p.endswith(key.split(".")[-1])][:1]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.col.add("mlx.override-unmatched", f"per-layer override {key!r} matches no module of the "
                         f"checkpoint{hint}; the loader ignores it and applies the global settings, so a layer "
                         "stored with other bits/mode fails with 'Expected shape … but received …' — key it by "
                         "the module path as stored (after sanitize)", file=self.root / "config.json",
                         layer=key, severity=sev)

    def _check_config(self, cfg, ck) -> None:
        """Config-level rules; use only names and configs (also run when layers are not analysed)."""
        col = self.col
        model = self.model
        known = {"mlx", "mlx-native", "gptq", "awq", "compressed-tensors", "fp8", "bitsandbytes", "modelopt",
                 "mxfp4"}  # (mxfp4: gpt-oss's)
        if cfg.kind and cfg.kind not in known and model is not None:
            found = sorted({lay.scheme for lay in model.layers.values() if lay.quantized})
            if found:
                col.add("config.method-mismatch", f"quant_method {cfg.kind!r} is not a format quantscope reads, but "
                        f"the tensors have the {', '.join(found)} layout and were decoded as that — loaders that "
                        f"follow the config treat them as {cfg.kind}; fix quant_method",
                        file=self.root / _cfg_file(cfg))
            elif any(lay.problem == "no weight tensor recognised" for lay in model.layers.values()):
                col.add("config.unsupported-method", f"quant_method {cfg.kind!r} is a format quantscope does not "
                        "decode: its quantized modules are listed but not decoded or measured",
                        file=self.root / _cfg_file(cfg))
        # (a model folder with no config.json at all got a clean bill: its settings are guesses too)
        bare = "config.json" not in ck.configs and Path(self.source).is_dir()
        if cfg.kind is None and model is not None and ("config.json" in ck.configs or bare):
            found = sorted({lay.scheme for lay in model.layers.values() if lay.quantized})
            if found:
                where = "there is no config.json" if bare else "config.json has no quantization config"
                col.add("config.missing", f"the tensors have the {', '.join(found)} layout but {where}: loaders "
                        "build plain layers and fail on (or misread) the packed tensors, and the settings "
                        "quantscope uses (bits, group, sym, v1/v2) are guesses from the shapes — add the config "
                        "the quantizer wrote", file=self.root / "config.json" if not bare else self.root)
        if self.complete and not ck.names:
            col.add("container.empty", (f"the config describes a {cfg.kind} model but " if cfg.kind else "")
                    + "the checkpoint stores no tensor: loaders find no weights — the download or conversion is "
                    "incomplete", file=self.root / _cfg_file(cfg) if cfg.kind else self.source)
        # (odd values: read here one way, loaders another, as unusable ones)
        for message, usable in [*cfg.bad_values, *((m, False) for m in cfg.odd_values)]:
            if usable:
                col.add("config.number-type", f"{message} — write it as an integer", file=self.root / _cfg_file(cfg, message))
            else:
                col.add("config.bad-value", f"{message} — loaders fail on it or misread the file; write what "
                        "the tensors were quantized with", file=self.root / _cfg_file(cfg, message))
        self._check_value_types(cfg, ck)
        if cfg.conflicts:
            col.add("config.disagree", f"quantize_config.json disagrees with config.json's quantization_config: "
                    f"{', '.join(cfg.conflicts)}. transformers, GPTQModel and vLLM read config.json (quantscope "
                    "too); AutoGPTQ-era loaders read quantize_config.json and misread the layers — make them agree",
                    file=self.root / "quantize_config.json")
        if cfg.kind == "gptq" and cfg.globals.get("bits") is None and "bits" not in " ".join(m for m, _ in cfg.bad_values):
            col.add("gptq.config-keys", f"{cfg.file} gives no bits: transformers' GPTQConfig requires them and "
                    "the model fails to load (quantscope reads the bits from the tensors' shapes) — add \"bits\"",
                    file=self.root / _cfg_file(cfg), severity="error")
        if cfg.kind == "gptq":
            missing = [k for k in ("sym", "checkpoint_format", "quant_method") if k not in cfg.raw]
            if missing:
                col.add("gptq.config-keys", f"{cfg.file} lacks {', '.join(missing)}: loaders guess sym=true and "
                        "checkpoint_format=gptq (v1) (GPTQModel warns); a v2 or asymmetric file then decodes "
                        "wrongly — add the keys", file=self.root / _cfg_file(cfg))
        if cfg.kind == "gptq":
            self._check_gptq_dynamic(cfg)
        if cfg.kind == "awq" and not isinstance((ck.configs.get("config.json") or {}).get("quantization_config"), dict):
            col.add("awq.legacy-config", f"AWQ settings are only in {cfg.file} (AutoAWQ's deprecated keys "
                    "w_bit/q_group_size); transformers and vLLM read config.json's quantization_config with "
                    "quant_method/bits/group_size/version — add it", file=self.root / _cfg_file(cfg))
        if cfg.kind == "awq":
            v = str(cfg.globals.get("version", "gemm")).lower()
            if v not in ("gemm", "gemv", "gemv_fast"):
                pass
            elif v != "gemm":
                col.add("awq.version", f"AWQ version {v!r}: vLLM and most runtimes only load GEMM checkpoints "
                        "(AutoAWQ #217) and mlx-lm's converter assumes GEMM — re-export as GEMM",
                        file=self.root / _cfg_file(cfg), severity="warning")
        if cfg.kind == "fp8":
            has_fp8 = any(e.dtype.startswith("F8_") for f in self.files for e in f.raw_entries().values())
            if not has_fp8 and self.complete:
                col.add("fp8.converted", "quantization_config says quant_method 'fp8' but no tensor is FP8: the "
                        "checkpoint was converted to bf16 (fp8_cast_bf16.py) without removing the block; loaders "
                        "take the FP8 path and fail ('Unknown quantization type, got fp8') — delete "
                        "quantization_config from config.json", file=self.root / "config.json")
        tie = ck.tied_embeddings
        heads = [n for n in ck.names if n.startswith("lm_head.") or ".lm_head." in n]
        embeds = any("embed_tokens." in n for n in ck.names) if tie is False and not heads else False
        if tie is True and heads:
            h = split_name(heads[0])[0]
            col.add("config.tied-lm-head", "tie_word_embeddings is true but lm_head tensors are stored: MLX "
                    "fails with 'Received 1 parameters not in model: lm_head.weight' and other loaders silently "
                    "drop them — set tie_word_embeddings to false or delete lm_head",
                    file=ck.info(heads[0]).file, tensor=f"{h}.weight" if f"{h}.weight" in ck else heads[0], layer=h)
        elif tie is False and not heads and embeds and self.complete:
            col.add("config.tied-lm-head", "tie_word_embeddings is false but no lm_head is stored: loaders fail "
                    "with a missing lm_head.weight (KeyError) — set tie_word_embeddings to true if the head "
                    "is the embedding, or restore lm_head", file=self.root / "config.json", layer="lm_head")

    def _check_formats(self, layer, cfg, file) -> None:
        col, path, comps, sch = self.col, layer.path, layer.tensors, layer.scheme
        if sch in _CT_FORMATS and cfg.kind == "compressed-tensors" and len(layer.shape or ()) == 2:
            target = cfg.effective(path).settings.get("class_target")
            if target is not None:
                # compressed-tensors matches a class target by the module's class name
                from .qconfig import ct_module_class
                own = ct_module_class(path)
                col.add("ct.targets", f"the only config group that reaches this layer targets the module class "
                        f"`{target}`, but the layer is a{'n' if own[0] in 'AEIOU' else ''} {own}: compressed-tensors "
                        "gives it no scheme, loaders drop its compressed tensors as unexpected and keep untrained "
                        f"weights (quantscope decodes it as the tensors say) — target `{own}` or the layer's name",
                        file=file, layer=path)
        if sch in _CT_FORMATS and cfg.kind == "compressed-tensors":
            fmt = layer.settings.get("format")
            status = cfg.globals.get("quantization_status")
            sc = comps.get("weight_scale")
            # an MX format whose scales are not exponent bytes reads as another scheme: the scales
            # are the fault (mx.e8m0-scale), not the format
            mx_floats = str(fmt).startswith("mx") and sc is not None and sc.dtype not in ("U8", "F8_E8M0")
            if fmt is not None and str(fmt) not in _CT_FORMATS[sch] and not mx_floats:
                # compressed-tensors picks its decompressor by this name: another one fails on
                # these tensors or unpacks them wrongly
                col.add("ct.format", f"the config's format is {fmt!r} but the tensors are {sch} (stored as "
                        f"{', '.join(sorted(_CT_FORMATS[sch]))}): compressed-tensors picks its decompressor by the "
                        "format and fails on them or unpacks them wrongly — set the format the tensors were written "
                        "in", file=file, layer=path)
            elif status is not None and str(status) != "compressed":
                col.add("ct.format", f"quantization_status is {status!r} but the tensors are compressed ({sch}): "
                        "loaders take a frozen checkpoint for fake-quantized dense weights — set it to "
                        "'compressed'", file=file, layer=path)
        self._check_input_scale(layer, file)
        if sch == "gptq-marlin":
            col.add("gptq.marlin", "Marlin-serialized GPTQ (tile-permuted `.B`/`.s`, or checkpoint_format "
                    "'marlin'): plain GPTQ decoders produce silent garbage — convert it back to plain GPTQ with "
                    "the tool that wrote it", file=file, layer=path)
        elif sch == "awq-gemv-fast":
            col.add("awq.version", "AWQ GEMV_FAST layout (int16, interleaved): only llm-awq style kernels read it; "
                    "GEMM loaders fail or mis-read — re-export as GEMM", file=file, layer=path)
        elif sch in ("awq-gemm", "awq-gemv") and "qweight" in comps and "scales" in comps:
            qw, sc = comps["qweight"].shape, comps["scales"].shape
            if len(qw) == 2 and len(sc) == 2:
                (r, c2), (ng, n) = qw, sc
                gemm_fit = c2 * 8 == n and ng and r % ng == 0
                gemv_fit = r == ng
                if sch == "awq-gemm" and not gemm_fit and gemv_fit:
                    col.add("awq.version", f"qweight {list(qw)} has the GEMV layout [N, K/8] but the config's version "
                            "is gemm; GEMM loaders transpose it wrongly — set version to gemv (and expect few "
                            "runtimes to load it) or re-export", file=file, tensor=f"{path}.qweight", layer=path)
                elif sch == "awq-gemv" and gemm_fit and not gemv_fit:
                    col.add("awq.version", f"qweight {list(qw)} has the GEMM layout [K, N/8] but the config's version "
                            "is gemv — set version to gemm", file=file, tensor=f"{path}.qweight", layer=path)
        elif sch == "ct-pack":
            self._check_ct_pack(layer, file)
        elif sch == "fp8-block":
            self._check_fp8_block(layer, file)
            if layer.warning:  # (the config leaves it unquantized: schemes' warning)
                col.add("layer.inconsistent", layer.warning, file=file, layer=path)
        elif sch in ("ct-mxfp8", "ct-mxfp4"):
            s = comps.get("weight_scale")
            if s is not None and s.dtype not in ("U8", "F8_E8M0"):
                col.add("mx.e8m0-scale", f"MX scales are {s.dtype}: MX formats store E8M0 exponent bytes (U8); a "
                        "float scale here was decoded to linear values — store the raw exponent bytes",
                        file=file, tensor=f"{path}.weight_scale", layer=path)
        elif sch in ("bnb-nf4", "bnb-fp4"):
            from .formats.bnb import check_4bit_state
            full = {f"{path}.{c}": t for c, t in comps.items()}
            probs = check_4bit_state(f"{path}.weight", full, layer.settings or None)
            if layer.problem and not probs:
                probs = [layer.problem]
            for p in probs:
                col.add("bnb.quant-state", f"{p}; bitsandbytes/transformers fail to rebuild the QuantState — "
                        "re-save the model with bitsandbytes ≥ 0.41.3", file=file, layer=path,
                        tensor=f"{path}.weight")
            if not probs:
                self._check_bnb_labels(layer, cfg, file)
        # a layer whose problem is one of these rules is fully reported by them
        if layer.problem and "(R9)" in layer.problem and not col.has("ct.packing", layer=path):
            col.add("ct.packing", f"{layer.problem}; unpacking with the wrong generation gives silent garbage",
                    file=file, tensor=f"{path}.weight_packed", layer=path)
        if sch == "fp8-block" and layer.problem and "weight_block_size" in layer.problem \
                and not col.has("fp8.block-size", layer=path):
            col.add("fp8.block-size", "quantization_config has no weight_block_size: the block size cannot be "
                    "derived from shapes when N or K is not a multiple of it — add weight_block_size",
                    file=file, layer=path)

    def _check_input_scale(self, layer, file) -> None:
        """Static activation quantization in the config, and no calibrated input scale stored."""
        st, comps = layer.settings or {}, layer.tensors
        if not layer.quantized:
            return
        if st.get("activation_scheme") == "static":
            said, want = "activation_scheme is 'static'", "input_scale"
        elif st.get("input_dynamic") is False or st.get("input_dynamic") == "local":
            said = f"input_activations has dynamic: {json.dumps(st['input_dynamic'])}"
            want = "input_global_scale" if layer.scheme == "ct-nvfp4" else "input_scale"
        else:
            return
        if want not in comps:
            self.col.add("config.static-activations", f"{said} (activations quantized with a calibrated scale stored "
                         f"beside the weights) but the layer stores no `{want}`: runtimes that quantize activations "
                         "(vLLM) find none to load — store the calibrated scales, or declare the activations "
                         "dynamic", file=file, tensor=f"{layer.path}.{want}", layer=layer.path)

    def _check_bnb_labels(self, layer, cfg, file) -> None:
        """The 4-bit type as named by the quant_state tensor, its JSON and the config, against the
        code book stored in quant_map. bitsandbytes rebuilds the state from its JSON, and its
        kernels pick their table by that quant_type (quant_map is not read on GPU); quantscope
        decodes with quant_map: where those two disagree the decodes differ (an error); the other
        names only misdescribe the file (a warning)."""
        from .formats.bnb import FP4_VALUES, NF4_VALUES
        path, comps = layer.path, layer.tensors
        state = (layer.settings or {}).get("quant_type")
        book = None
        with contextlib.suppress(QuantscopeError, ValueError, TypeError):
            qm = np.asarray(self.ckpt.tensor(f"{path}.weight.quant_map"), np.float32).reshape(-1)
            for label, table in (("nf4", NF4_VALUES), ("fp4", FP4_VALUES)):
                if qm.size == table.size and np.allclose(qm, np.asarray(table, np.float32), rtol=1e-3, atol=1e-6):
                    book = label
        state = None if state is None else str(state).lower()
        if state and book and state != book:
            self.col.add("bnb.quant-state", f"the quant_state's quant_type is {state!r} but quant_map holds the "
                         f"{book.upper()} code book: bitsandbytes' kernels pick their table by quant_type (they do "
                         f"not read quant_map), quantscope decodes with quant_map — the two decodes differ; "
                         "re-save the model", file=file, layer=path, tensor=f"{path}.weight")
            return
        stored = state or book
        names = {"the quant_state tensor's name": next((k.rsplit("__", 1)[1] for k in comps
                                                        if k.startswith("weight.quant_state.bitsandbytes__")), None)}
        if cfg.kind == "bitsandbytes":
            names["the config's bnb_4bit_quant_type"] = cfg.globals.get("bnb_4bit_quant_type")
        off = [f"{k} says {str(v).lower()!r}" for k, v in names.items() if v is not None and str(v).lower() != stored]
        if stored and off:
            self.col.add("bnb.quant-state", f"the layer is stored {stored.upper()} (its quant_state and code book) "
                         f"but {' and '.join(off)}: loaders follow the stored state, tools that go by the "
                         "names (requantizing, model cards) do not — make them agree", file=file, layer=path,
                         tensor=f"{path}.weight", severity="warning")

    def _check_ct_pack(self, layer, file) -> None:
        from .formats.ct import _dense_cols, _legacy_cols, _version_tuple
        col, path, comps = self.col, layer.path, layer.tensors
        bits, shape, st = layer.bits, layer.shape, layer.settings
        if not bits or not shape or "weight_packed" not in comps:
            return
        version = st.get("version")
        vt = _version_tuple(version) if version else None
        K, N = shape[-1], shape[-2] if len(shape) >= 2 else 1
        cols = comps["weight_packed"].shape[-1]
        dense, legacy = _dense_cols(K, bits), _legacy_cols(K, bits)
        if 32 % bits and dense != legacy and vt is not None and not layer.problem:
            if cols == legacy and vt >= (0, 17):
                col.add("ct.packing", f"weight_packed has the pre-0.17 width ({cols} words: {32 // bits} values per "
                        f"int32) but the config says compressed-tensors {version}, which packs densely ({dense}); "
                        "loaders trusting the version unpack garbage — fix `version`", file=file,
                        tensor=f"{path}.weight_packed", layer=path)
            elif cols == dense and vt < (0, 17):
                col.add("ct.packing", f"weight_packed has the dense ≥0.17 width ({cols} words) but the config says "
                        f"compressed-tensors {version} (legacy packing needs {legacy}); loaders trusting the "
                        "version unpack garbage — fix `version`", file=file, tensor=f"{path}.weight_packed",
                        layer=path)
        zp = comps.get("weight_zero_point")
        if zp is not None and st.get("symmetric") is True:
            col.add("ct.sym-zero-point", "the config says symmetric: true but weight_zero_point is stored (symmetric "
                    "schemes write none): compressed-tensors and vLLM go by the flag and drop the zero points or "
                    "fail on them, while quantscope decodes with them — set symmetric: false if they are real",
                    file=file, tensor=f"{path}.weight_zero_point", layer=path)
        strategy = st.get("strategy")
        if zp is not None and strategy == "group" and layer.group_size and len(zp.shape) == 2:
            ng = -(-K // layer.group_size)
            packed_rows = {_dense_cols(N, bits), _legacy_cols(N, bits)}
            is_unpacked = tuple(zp.shape) == (N, ng) and N not in packed_rows
            is_packed = zp.shape[1] == ng and zp.shape[0] in packed_rows and zp.shape[0] != N
            if not is_unpacked and not is_packed:
                col.add("ct.zero-point", f"weight_zero_point {list(zp.shape)} is neither packed along N "
                        f"[{'/'.join(map(str, sorted(packed_rows)))}, {ng}] (≥0.9.4) nor unpacked [{N}, {ng}]; "
                        "loaders fail — re-export", file=file, tensor=f"{path}.weight_zero_point", layer=path)
            elif vt is not None and is_unpacked and vt >= (0, 9, 4):
                col.add("ct.zero-point", f"weight_zero_point is unpacked {list(zp.shape)} but the config says "
                        f"compressed-tensors {version}, which packs zero points along N (PR #296); loaders fail "
                        "with a shape error — fix `version` or repack", file=file,
                        tensor=f"{path}.weight_zero_point", layer=path)
            elif vt is not None and is_packed and vt < (0, 9, 4):
                col.add("ct.zero-point", f"weight_zero_point is packed {list(zp.shape)} but the config says "
                        f"compressed-tensors {version} (< 0.9.4 stores them unpacked [{N}, {ng}]) — fix `version`",
                        file=file, tensor=f"{path}.weight_zero_point", layer=path)

    def _check_fp8_block(self, layer, file) -> None:
        comps, path = layer.tensors, layer.path
        bs = layer.settings.get("weight_block_size")
        sname = layer.settings.get("scale_tensor", "weight_scale_inv")
        w, s = comps.get("weight"), comps.get(sname)
        if not bs or w is None or s is None:
            return
        if sname != "weight_scale_inv":
            self.col.add("fp8.scale-name", f"block scales stored as `{sname}` {list(s.shape)}: transformers and vLLM "
                         "load an FP8 layer with weight_block_size from `weight_scale_inv` and find no scale (read "
                         "here as the block scales they are) — a renamed tensor: rename it `weight_scale_inv`",
                         file=file, tensor=f"{path}.{sname}", layer=path)
        try:
            bn, bk = (int(v) for v in bs)
        except (TypeError, ValueError):
            self.col.add("fp8.block-size", f"weight_block_size {bs!r} is not two integers", file=file, layer=path)
            return
        if bn <= 0 or bk <= 0:  # (a ZeroDivisionError of the doctor itself)
            self.col.add("fp8.block-size", f"weight_block_size {bs!r} is not two positive integers", file=file,
                         layer=path)
            return
        *lead, N, K = w.shape
        grid = tuple(lead) + (-(-N // bn), -(-K // bk))
        if tuple(s.shape) != grid:
            floor = tuple(lead) + (N // bn, K // bk)
            why = (" — edge tiles are missing (the scale grid was floored, not ceiled)" if tuple(s.shape) == floor
                   else "")
            self.col.add("fp8.block-size", f"{sname} {list(s.shape)} does not tile weight [{N}, {K}] with "
                         f"weight_block_size [{bn}, {bk}]: expected {list(grid)} (ceil; edge tiles are partial)"
                         f"{why}. Loaders mis-scale rows or reject the layer — fix weight_block_size or the "
                         "scales", file=file, tensor=f"{path}.{sname}", layer=path)

    # -- phase 2: small tensors read in full ---------------------------------------------------

    def _read(self, name: str, rows=None) -> np.ndarray:
        return self.ckpt.tensor(name, rows)

    def _format_data_checks(self) -> None:
        self._act_order: list[tuple] = []
        self._format_data_loop()
        cfg = self.model.config
        if cfg.kind == "gptq" and cfg.globals.get("desc_act"):
            bare = [p for p, lay in self.model.layers.items() if lay.scheme == "gptq" and "g_idx" not in lay.tensors]
            if bare:  # one finding for the checkpoint, as for act-order itself
                lay = self.model.layers[bare[0]]
                self.col.add("gptq.act-order-no-g-idx", f"desc_act is true but {len(bare)} GPTQ layer(s) store no "
                             f"g_idx (e.g. {bare[0]}): loaders then assume k // group_size, which is right only if "
                             "the columns were never reordered — restore g_idx, or set desc_act false if they were not",
                             file=_layer_file(lay), layer=bare[0])
        if self._act_order:
            # One finding for the checkpoint: act-order is a property of the export, not a layer.
            file, tname, path = self._act_order[0]
            n = len(self._act_order)
            self.col.add("gptq.act-order", f"non-monotonic g_idx (desc_act / act-order) in {n} layer(s), e.g. "
                         f"{path}: fine for GPTQ kernels, but contiguous-group formats (MLX affine, AWQ) cannot "
                         "represent it — mlx-lm refuses any g_idx, and conversion must dequantize and "
                         "re-quantize (lossy)", file=file, tensor=tname, layer=path)

    def _format_data_loop(self) -> None:
        from .engines import check_layer
        for path, layer in self.model.layers.items():
            if _is_set(self.cancel):
                raise Cancelled("doctor cancelled")
            try:
                if layer.scheme == "gptq" and layer.shape and layer.bits:
                    self._check_gptq_zeros(layer)
                    if not _groups_contradict(layer):  # (a config group size the scales contradict:
                        self._check_g_idx(layer, "g_idx")  # said once, as the layer's problem)
                elif layer.scheme == "ct-pack" and layer.shape and "weight_g_idx" in layer.tensors:
                    self._check_g_idx(layer, "weight_g_idx")
                self._check_nvfp4(layer)
            except (QuantscopeError, ValueError, IndexError, TypeError) as exc:
                _logger.debug("format data check of %s failed: %s", path, exc)
            if layer.decodable and layer.quantized and not self.col.has_error(path):
                # After the specific checks (they name a problem better): what a decode would
                # refuse. Zero points with the wrong number of groups passed every check, then
                # dequant and compare failed on them. Small models are decoded whole.
                file = _layer_file(layer)
                try:
                    check_layer(self.model, layer, decode=self.full)
                except QuantscopeError as exc:
                    self.col.add("layer.undecodable", exc.message, file=file, layer=path)
                except (ValueError, IndexError, TypeError) as exc:  # a decoder's unforeseen failure
                    self.col.add("layer.undecodable", f"decoding fails: {type(exc).__name__}: {exc}", file=file,
                                 layer=path)

    def _check_gptq_dynamic(self, cfg) -> None:
        """GPTQModel's per-module ``dynamic`` overrides (``+:regex`` / ``-:regex``): one that does
        not compile fails GPTQModel's load (quantscope skipped it without a word), and a ``-:`` one
        (not quantized) matching a layer stored quantized makes loaders build a plain layer that
        its packed tensors do not fit (the doctor found nothing)."""
        from .qconfig import gptq_pattern
        where = self.root / _cfg_file(cfg)
        for pattern, _ in cfg.overrides:
            try:
                re.compile(gptq_pattern(pattern)[1])
            except re.error as exc:
                self.col.add("gptq.dynamic", f"dynamic override {pattern!r} is not a regular expression ({exc}): "
                             "GPTQModel fails to load the model; quantscope ignores it — fix the pattern", file=where)
        if self.model is None:
            return
        for path, layer in self.model.layers.items():
            if layer.scheme != "gptq" or not layer.quantized:
                continue
            eff = cfg.effective(path)
            if eff.quantized is False:
                self.col.add("gptq.dynamic", f"the config marks this layer not quantized "
                             f"({eff.source}) but it is stored quantized: loaders build a plain "
                             "layer and fail on (or ignore) its qweight — drop the override or the layer's "
                             "quantized tensors", file=where, layer=path)

    def _check_gptq_zeros(self, layer) -> None:
        comps, path = layer.tensors, layer.path
        if "qzeros" not in comps:
            return
        b, n = layer.bits, layer.shape[0]
        qz = self._read(f"{path}.qzeros")
        z = unpack_bits(np.ascontiguousarray(qz), b, n)
        version = int(layer.settings.get("version", 1))
        file = comps["qzeros"].file
        if version == 1:
            wrapped = z == (1 << b) - 1
            if wrapped.any():
                g, col_ = np.argwhere(wrapped)[0]
                self.col.add("gptq.v1-zero-wrap", f"{int(wrapped.sum())} of {z.size} stored zero points are {(1 << b) - 1} "
                             f"(first: group {g}, column {col_}) in a v1 (checkpoint_format 'gptq') file: v1 stores "
                             f"z−1, so these are true zeros of 0, wrapped when stored as −1. Readers that add 1 per field "
                             f"(AutoGPTQ/exllama-era kernels) read {1 << b}, outside the code range, and those "
                             "groups decode silently wrong (AutoGPTQ #325/#640). quantscope reads them as GPTQModel "
                             "does, adding 1 to every field of the packed word at once, which carries into the next "
                             "field: exact for files GPTQModel wrote (its export subtracts the same way, borrowing), "
                             "but where a writer stored each field on its own the next column's zero decodes one "
                             "step off instead. Re-export as gptq_v2 (zeros stored as-is) before using other "
                             "runtimes", file=file, tensor=f"{path}.qzeros", layer=path)
                return
        if layer.settings.get("sym") is True:
            want = (1 << (b - 1)) - (1 if version == 1 else 0)
            if not (z == want).all():
                bad = int((z != want).sum())
                fmt = mislabelled_format(z, b, version)
                if fmt is not None:  # the whole file is the other version, labelled wrongly
                    label = "gptq_v2" if version == 2 else "gptq"
                    other = int(z.flat[0])
                    self.col.add("gptq.sym-zeros", f"every stored zero point is {other}, the symmetric constant of "
                                 f"checkpoint_format {fmt!r} (v{3 - version}), not of {label!r} as the config says: "
                                 f"every weight decodes one scale step off — set checkpoint_format to {fmt!r}",
                                 file=file, tensor=f"{path}.qzeros", layer=path)
                    return
                self.col.add("gptq.sym-zeros", f"config says sym=true but {bad} of {z.size} stored zero points differ "
                             f"from the constant {want} (v{version}); {STORED_ZEROS_VARY} for symmetric "
                             "models decode those groups wrongly (vLLM #45656) — set sym=false or re-quantize",
                             file=file, tensor=f"{path}.qzeros", layer=path)

    def _check_g_idx(self, layer, comp: str) -> None:
        comps, path = layer.tensors, layer.path
        if comp not in comps or not comps[comp].dtype.startswith(("I", "U")):
            return  # (not integers: the layer's own finding says so; their values mean nothing)
        K = layer.shape[-1]
        G = layer.group_size if layer.group_size and layer.group_size > 0 else K
        ng = -(-K // G)
        gi = np.asarray(self._read(f"{path}.{comp}")).astype(np.int64).reshape(-1)
        file, tname = comps[comp].file, f"{path}.{comp}"
        if gi.size != K or (gi.size and (gi.min() < 0 or gi.max() >= ng)):
            lo, hi = (int(gi.min()), int(gi.max())) if gi.size else (0, 0)
            self.col.add("gptq.g-idx-invalid", f"{comp} has {gi.size} values in [{lo}, {hi}]; K={K} with group size "
                         f"{G} needs {K} values in [0, {ng - 1}]: decoders index scales out of range — re-export",
                         file=file, tensor=tname, layer=path)
            return
        counts = np.bincount(gi, minlength=ng)
        want = np.full(ng, G)
        want[-1] = K - G * (ng - 1)
        if not np.array_equal(counts, want):
            bad = int(np.flatnonzero(counts != want)[0])
            self.col.add("gptq.g-idx-invalid", f"{comp} puts {int(counts[bad])} columns in group {bad}, expected "
                         f"{int(want[bad])} (group size {G}); act-order kernels (exllama) that sort by g_idx "
                         "mis-assign scales — re-export", file=file, tensor=tname, layer=path)
            return
        if (np.diff(gi) < 0).any():
            self._act_order.append((file, tname, path))

    def _check_nvfp4(self, layer) -> None:
        comps, path = layer.tensors, layer.path
        gs_name = "weight_global_scale" if "weight_global_scale" in comps else (
            "weight_scale_2" if "weight_scale_2" in comps else None)
        s = comps.get("weight_scale")
        if gs_name is None or s is None or s.dtype not in ("F8_E4M3", "U8"):
            return
        gs = float(_f32(self._read(f"{path}.{gs_name}")).reshape(-1)[0])
        rows = s.shape[0] if s.shape else 1
        take = rows if self.full else min(rows, self.rows)
        sc = np.asarray(self._read(f"{path}.weight_scale", (0, take)))
        sb = sc.view(np.uint8) if sc.dtype != np.uint8 else sc
        vals = E4M3[sb.reshape(-1)]
        vals = np.abs(vals[np.isfinite(vals) & (vals != 0)])
        if not vals.size or not math.isfinite(gs) or gs == 0:
            return
        med = float(np.median(vals))
        eff = med / gs if gs_name == "weight_global_scale" else med * gs
        if not 1e-7 <= eff <= 10.0:
            conv = ("compressed-tensors stores weight_global_scale as a divisor (448·6/amax)"
                    if gs_name == "weight_global_scale" else
                    "ModelOpt stores weight_scale_2 as a multiplier (amax/2688)")
            self.col.add("nvfp4.global-scale", f"effective block scale ≈ {eff:.3g} (median E4M3 scale {med:.3g} with "
                         f"{gs_name} {gs:.3g}); block scales of LLM weights are ≈ amax/6, about 1e-4…1e-1. "
                         f"{conv}: this one looks like the reciprocal convention (modular #6600, vLLM #42549) — "
                         "invert it", file=comps[gs_name].file, tensor=f"{path}.{gs_name}", layer=path)

    # -- phase 3: sampled values ---------------------------------------------------------------

    def _row_ranges(self, n_rows: int, row_bytes: int) -> list[tuple[int, int]]:
        if n_rows <= 0:
            return []
        if self.full:
            step = max(1, (64 << 20) // max(1, row_bytes))
            return [(r, min(n_rows, r + step)) for r in range(0, n_rows, step)]
        if n_rows <= self.rows:
            return [(0, n_rows)]
        # at most ~1 MB per block, so stacked-expert tensors ([E, N, K]) are sampled, not read
        blocks, per = 4, max(1, min(self.rows // 4, (1 << 20) // max(1, row_bytes)))
        starts = np.linspace(0, n_rows - per, blocks).astype(int)
        return [(int(s), int(s) + per) for s in dict.fromkeys(starts.tolist())]

    def _sample(self, t) -> Iterable[np.ndarray]:
        """Chunks of a tensor: all rows with ``full``, else a few evenly spaced row blocks."""
        dt = DTYPES[t.dtype]
        if not t.shape or t.numel <= 1024 or (len(t.shape) == 1 and not self.full and t.numel <= 1 << 20):
            yield np.asarray(self._read(t.name))
            return
        row_el = math.prod(t.shape[1:])
        if (row_el * dt.bits) % 8:
            yield np.asarray(self._read(t.name))
            return
        for r0, r1 in self._row_ranges(t.shape[0], row_el * dt.bits // 8):
            yield np.asarray(self._read(t.name, (r0, r1)))

    def _value_checks(self) -> None:
        layers = list(self.model.layers.values())
        t0 = time.perf_counter()
        medians: dict[tuple, list[tuple[str, float]]] = {}
        done = 0
        for i, layer in enumerate(layers):
            if not self.full and time.perf_counter() - t0 > self.budget_s:
                self.col.add("doctor.budget", f"value checks stopped after {self.budget_s:g} s: {done} of "
                             f"{len(layers)} layers sampled ({self.rows} rows per tensor); run with --full to "
                             "check every value", file=self.source)
                break
            self._tick(0.3 + 0.7 * i / max(1, len(layers)))
            try:
                med = self._check_layer_values(layer)
            except (QuantscopeError, ValueError, IndexError, TypeError) as exc:
                _logger.debug("value check of %s failed: %s", layer.path, exc)
                med = None
            done += 1
            if med is not None:
                medians.setdefault((layer.scheme, _proj_type(layer.path)), []).append((layer.path, med))
        self._scale_outliers(medians)

    def _scale_outliers(self, medians) -> None:
        for (scheme, proj), items in medians.items():
            vals = np.array([m for _, m in items if m > 0 and math.isfinite(m)])
            if len(vals) < 3:
                continue
            ref = float(np.median(vals))
            for path, m in items:
                if m > 0 and math.isfinite(m) and (m > 100 * ref or m < ref / 100):
                    layer = self.model.layers[path]
                    comp = _scale_component(layer)
                    t = layer.tensors.get(comp)
                    self.col.add("values.scale-outlier", f"median |scale| {m:.3g} is {m / ref:.3g}× the median "
                                 f"{ref:.3g} of the {len(vals)} {proj} layers: a scale stored in the wrong unit or "
                                 "dtype, or a corrupted layer — compare this layer with its peers",
                                 file=t.file if t else None, tensor=t.name if t else f"{path}.{comp}", layer=path)

    def _check_layer_values(self, layer) -> float | None:
        """Check one layer's sampled values; return its median |scale| (for the peer comparison)."""
        comps, sch = layer.tensors, layer.scheme
        if layer.shape and len(layer.shape) >= 2 and not layer.numel:
            t = comps.get("weight") or next(iter(comps.values()))
            self.col.add("values.empty", f"the weight matrix is empty ({'×'.join(map(str, layer.shape))}): nothing "
                         "to load into the module, and nothing to compare", file=t.file, tensor=t.name,
                         layer=layer.path)
            return None
        if sch == "dense":
            w = comps.get("weight")
            if w is not None and w.dtype in _FLOAT_DTYPES:
                self._check_floats(layer, "weight", constant=len(w.shape) >= 2)
            return None
        med = None
        comp = _scale_component(layer)
        if comp:
            med = self._check_scales(layer, comp)
        if "biases" in comps:
            self._check_floats(layer, "biases", constant=False)
        if sch in ("fp8-block", "ct-fp8") and "weight" in comps:
            self._check_floats(layer, "weight", constant=False)
        if layer.bits and layer.bits >= 2 and layer.shape and sch in ("mlx-affine", "gptq", "awq-gemm", "ct-pack"):
            self._check_codes(layer)
        return med

    def _check_floats(self, layer, comp, *, constant: bool) -> None:
        t = layer.tensors[comp]
        bad = 0
        lo = hi = None
        n = 0
        for a in self._sample(t):
            f = _f32(a)
            fin = np.isfinite(f)
            bad += int(f.size - np.count_nonzero(fin))
            if f.size:
                n += f.size
                mn, mx = float(np.min(f, initial=np.inf, where=fin)), float(np.max(f, initial=-np.inf, where=fin))
                lo = mn if lo is None else min(lo, mn)
                hi = mx if hi is None else max(hi, mx)
        if bad:
            self.col.add("values.non-finite", f"{bad} NaN/Inf value(s) in the checked {n} values of {comp}: every "
                         "output using them becomes NaN (NaN logits) — re-convert from a clean source",
                         file=t.file, tensor=t.name, layer=layer.path)
        elif constant and n >= 16 and lo is not None and lo == hi:
            what = "all zero" if lo == 0 else f"constant ({lo:g})"
            self.col.add("values.constant", f"{comp} is {what} in every checked value: the weights were lost "
                         "(zeroed or never written) — re-convert", file=t.file, tensor=t.name, layer=layer.path)

    def _check_scales(self, layer, comp) -> float | None:
        t = layer.tensors[comp]
        chunks = []
        # AWQ GEMV pads its scales with zero columns to a multiple of 8 (WQLinear_GEMV.from_linear):
        # only the first K/G hold groups' scales (every valid GEMV file had "1536 of 6144 are 0")
        groups = (-(-layer.shape[-1] // layer.group_size) if layer.scheme == "awq-gemv" and comp == "scales"
                  and layer.shape and layer.group_size and layer.group_size > 0 else None)
        for a in self._sample(t):
            a = np.asarray(a)
            if groups is not None and a.ndim == 2:
                a = a[:, :groups]
            if a.dtype == np.uint8:
                table = E4M3 if layer.scheme in ("mlx-nvfp4", "ct-nvfp4", "modelopt-nvfp4") else E8M0
                if comp == "weight.absmax":
                    return None  # nested (double-quantized) absmax codes, not scales
                chunks.append(table[a.reshape(-1)])
            else:
                chunks.append(_f32(a).reshape(-1))
        if not chunks:
            return None
        f = np.concatenate(chunks)
        if not f.size:
            return None
        fin = np.isfinite(f)
        common = dict(file=t.file, tensor=t.name, layer=layer.path)
        if not fin.all():
            self.col.add("values.non-finite", f"{int(f.size - fin.sum())} NaN/Inf scale(s) among {f.size} checked: "
                         "the groups using them decode to NaN (NaN logits) — re-quantize the layer", **common)
            f = f[fin]
            if not f.size:
                return None
        a = np.abs(f)
        neg = int(np.count_nonzero(f < 0))
        if neg and layer.scheme in _POSITIVE_SCALES:
            # (MLX affine's may be negative: it flips a group's scale so that its zero is exact)
            self.col.add("values.negative-scale", f"{neg} of {f.size} checked scales are negative: "
                         f"{layer.scheme} quantizers write a group's range over its levels, never below 0 — the "
                         "scales were damaged (a sign flipped, bytes of another tensor); every weight of those "
                         "groups decodes mirrored", **common)
        zeros = int(np.count_nonzero(a == 0))
        # (MLX affine: the group's bias still holds its value, so a constant group decodes exactly;
        # nvfp4: the E4M3 scale encodes amax/6, which is 0 for a group of zeros)
        zero_ok = layer.scheme in ("mlx-affine", "mlx-nvfp4", "ct-nvfp4", "modelopt-nvfp4")
        if zeros == f.size and not zero_ok:
            # (a warning left the exit status 0 while compare measured the layer as all zero)
            self.col.add("values.zero-layer", f"all {f.size} checked scales are 0: the layer decodes to all zeros "
                         "whatever its codes (the scales were lost or overwritten) — re-quantize the layer", **common)
        elif zeros and not zero_ok:
            self.col.add("values.zero-scale", f"{zeros} of {f.size} checked scales are 0: those whole groups decode "
                         "to 0 whatever the codes (quantizers clamp scales away from 0) — re-quantize the layer",
                         **common)
        tiny = _NORMAL_MIN.get(t.dtype)
        if tiny is not None:
            den = int(np.count_nonzero((a > 0) & (a < tiny)))
            if den:
                self.col.add("values.denormal-scale", f"{den} of {f.size} checked scales are subnormal in {t.dtype} "
                             f"(< {tiny:.3g}); kernels that flush denormals to zero zero the groups — re-quantize",
                             **common)
        all_zero = zeros == f.size and not zero_ok  # (said above as an error: not again as constant)
        if f.size >= 16 and np.all(f == f[0]) and not all_zero and comp != "weight.absmax" and layer.scheme not in (
                "mlx-mxfp4", "mlx-mxfp8", "ct-mxfp4", "ct-mxfp8", "gptoss-mxfp4"):
            self.col.add("values.constant", f"all {f.size} checked scales equal {f[0]:g}: the quantizer's scales "
                         "were lost or overwritten — re-quantize the layer", **common)
        nz = a[a > 0]
        med = float(np.median(nz)) if nz.size else None
        if med is not None and med > 1.0 and 64 <= med <= 190 and layer.scheme in ("fp8-block", "ct-fp8") \
                and bool(np.all(f == np.round(f))):
            # whole numbers about 127 are E8M0 exponents (2^(s-127)) written as floats: an MX layer
            # (mxfp8: FP8 values in groups of 32) whose raw scale bytes were converted (R14)
            self.col.add("mx.e8m0-scale", f"the scales are whole numbers about {med:g}: E8M0 exponent bytes "
                         f"(2^(s-127)) stored as {t.dtype} — an MX layer's scales must stay the raw U8 exponent "
                         "bytes; read as linear scales every weight is off by a factor of ~2^120", **common)
        elif med is not None and layer.scheme in ("fp8-block", "ct-fp8") and med > 1.0:
            # an FP8 value (up to 448) times its scale is the weight: a median scale over 1 makes
            # weights of hundreds, the reciprocal stored (scale for scale_inv: weights ~5e5 with
            # "no problems found")
            self.col.add("values.scale-magnitude", f"median scale {med:.3g} makes weights of up to {448 * med:.3g} "
                         f"(FP8 values reach 448): the reciprocal was stored ({t.name.rsplit('.', 1)[-1]} holds 1/s?) "
                         "— loaders decode every weight off by the square of the scale", **common)
        elif med is not None and not _SCALE_SANE[0] <= med <= _SCALE_SANE[1]:
            # whatever the scheme, a weight's scale is about its group's range over the levels
            # (1e-4…1e-1 for LLM weights; E4M3 block scales up to 448): far outside, the bytes are
            # read in another dtype than written (F16 as BF16 gives ~1e-19) or another unit
            self.col.add("values.scale-magnitude", f"median |scale| {med:.3g} is implausible for weights (they lie "
                         f"about 1e-4…1e-1, and every decoded weight scales with them): the scales were written in "
                         f"another dtype than the header's {t.dtype} (F16 labelled BF16?) or another unit — compare "
                         "with the tool's own decode", **common)
        return med

    def _check_codes(self, layer) -> None:
        from .formats import awq as awqfmt
        from .formats import ct as ctfmt
        comps, path, sch, b = layer.tensors, layer.path, layer.scheme, layer.bits
        K = layer.shape[-1]
        seen = np.zeros(1 << b, dtype=np.int64)
        if sch == "mlx-affine":
            t = comps["weight"]
            for a in self._sample(t):
                seen += np.bincount(unpack_bits(np.asarray(a), b, K).reshape(-1), minlength=1 << b)[: 1 << b]
        elif sch == "gptq":
            t = comps["qweight"]
            for a in self._sample(t):  # rows of qweight hold 32/b consecutive K for every N
                codes = unpack_bits(np.ascontiguousarray(np.asarray(a).T), b, a.shape[0] * (32 // b)) \
                    if 32 % b == 0 else None
                if codes is None:
                    return
                seen += np.bincount(codes.reshape(-1), minlength=1 << b)[: 1 << b]
        elif sch == "awq-gemm":
            t = comps["qweight"]
            n = layer.shape[0]
            for a in self._sample(t):
                seen += np.bincount(awqfmt.unpack_gemm(np.asarray(a).view(np.uint32), n).reshape(-1),
                                    minlength=16)[:16]
        elif sch == "ct-pack":
            t = comps["weight_packed"]
            for a in self._sample(t):
                a = np.asarray(a)
                codes = ctfmt.codes_pack_quantized(a, a.shape[:-1] + (K,), bits=b,
                                                   packing=layer.settings.get("packing", "auto"), name=path)
                seen += np.bincount(codes.reshape(-1), minlength=1 << b)[: 1 << b]
        else:
            return
        total = int(seen.sum())
        if total < 256:
            return
        used = int(np.count_nonzero(seen))
        common = dict(file=t.file, tensor=t.name, layer=path)
        if b >= 3 and used <= (1 << b) // 4:
            self.col.add("values.few-levels", f"the checked codes use only {used} of the {1 << b} levels: the "
                         "layer carries almost no information (scales far too large, or codes overwritten) — "
                         "re-quantize it", **common)
            return
        ends = int(seen[0] + seen[-1])
        if b >= 3 and ends > 0.5 * total:
            self.col.add("values.saturated", f"{100 * ends / total:.0f}% of the checked codes sit at 0 or "
                         f"{(1 << b) - 1}: the quantizer clipped most weights (scales far too small) — re-quantize",
                         **common)


def _scale_component(layer) -> str | None:
    comps = layer.tensors
    for c in ("scales", "weight_scale", "weight_scale_inv", "SCB", "weight.absmax"):
        if c in comps:
            return c
    return None


def _layer_file(layer):
    """The file of a layer's first tensor (None for a layer of none): where its findings point."""
    return next(iter(layer.tensors.values())).file if layer.tensors else None


def _cfg_file(cfg, message: str = "") -> str:
    """The config file a finding concerns: the one its message begins with (a list for
    config.json's quantization_config was filed under the quantize_config.json read instead),
    else the one the quantization settings came from."""
    head = re.split(r'[\[:\s]', message, maxsplit=1)[0]
    if head in CONFIG_FILES:
        return head
    return (cfg.file or "config.json").split("[")[0]


# ---------------------------------------------------------------------------------- text report

def format_report(report: Report) -> str:
    """The findings as readable text, grouped by severity."""
    lines = [f"quantscope doctor: {report.path}"]
    titles = {"error": "Errors", "warning": "Warnings", "info": "Info"}
    for sev in SEVERITIES:
        group = [f for f in report.findings if f.severity == sev]
        if not group:
            continue
        lines.append("")
        lines.append(f"{titles[sev]} ({sum(f.count for f in group)}):")
        for f in group:
            ref = f" ({f.ref})" if f.ref else ""
            where = f.tensor or f.layer
            loc = " › ".join(x for x in (Path(f.file).name if f.file else None, where) if x)
            lines.append(f"  [{f.rule}]{ref} {loc}")
            lines.append(f"      {f.message}")
    s = report.summary
    lines.append("")
    checked = {"all": "every value checked",
               "sampled": f"values sampled, {report.rows_per_tensor} rows per tensor: --full checks every value",
               }.get(report.values, "values not checked")
    if not report.findings:
        lines.append(f"no problems found ({report.files} file(s), {report.layers} layer(s); {checked})")
    else:
        lines.append(f"{s['error']} error(s), {s['warning']} warning(s), {s['info']} info "
                     f"({report.files} file(s), {report.layers} layer(s); {checked})")
    return "\n".join(lines)
