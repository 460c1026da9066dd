"""Match a variant's layers to a reference's, and find the equivalent transformations to undo.

A *target* is one reference layer (its module path is the row name everywhere); a variant covers
it with *segments*: rows of the reference's flattened weight ``[R, K]`` paired with rows of one
variant layer's flattened weight. That one shape covers every alignment case:

* same path, or the same path under a ``language_model.`` / ``model.language_model.`` prefix, or
  without the ``model.`` of a causal LM (a base model's save: ``layers.0.…``);
* fused ``qkv_proj`` / ``gate_up_proj`` on either side (row concatenation, or gpt-oss's
  interleaved gate/up rows: gate = even rows, up = odd rows);
* per-expert ``experts.{e}.proj`` against stacked ``switch_mlp.proj`` ``[E, N, K]``, and against
  transformers' stacked parameters ``experts.proj`` (Llama 4, gpt-oss, Qwen3-VL-MoE: read as
  ``[E, N, K]``); such a stack against mlx-lm's split stacks (``experts.gate_proj`` /
  ``up_proj``, ``switch_mlp.…``, Gemma 4's ``experts.switch_glu.…``), gate and up concatenated or
  interleaved in each expert; an unquantized reference's stack measured expert by expert, a
  target per expert named ``experts.{e}.proj``;
* tied embeddings: a reference without ``lm_head`` is compared through its ``embed_tokens``, and
  a variant without ``lm_head`` through its own.

Equivalent transformations (AWQ-style smoothing, stored weight ``W·diag(s)``) are found here
too: a norm whose weight differs from the reference's beyond dtype rounding gives ``s`` exactly
(``reference norm / variant norm``) for the Linears it feeds; the pair (preceding Linear,
consumer) such as ``v_proj → o_proj`` is marked so the sweep can estimate ``s`` from the
preceding layer's rows by least squares.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import weakref
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np

from . import mup
from .checkpoint import natural_key
from .dtypes import DTYPES
from .errors import QuantscopeError
from .schemes import Layer, Model

_logger = logging.getLogger(__name__)

_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj"),
          # (Hunyuan's original checkpoints: the up rows first; mlx-lm's sanitize splits it)
          "gate_and_up_proj": ("up_proj", "gate_proj")}
#: The fused layer each part is found in first (gate_up_proj's; :func:`fused_homes` gives every one).
_PART_OF = {p: f for f, parts in _FUSED.items() if f != "gate_and_up_proj" for p in parts}


def _router_alias(name: str) -> tuple[str, str] | None:
    """(where another layout keeps the MoE router ``name``, said as a reason): mlx-lm's Bailing
    keeps transformers' ``mlp.gate`` one module deeper, at ``mlp.gate.gate_proj``, and back."""
    if name.endswith(".mlp.gate"):
        return f"{name}.gate_proj", "the router, kept one module deeper (mlx-lm's Bailing: mlp.gate.gate_proj)"
    if name.endswith(".mlp.gate.gate_proj"):
        return name[:-len(".gate_proj")], "the router, kept one module shallower (transformers' Bailing: mlp.gate)"
    return None


def fused_homes(proj: str) -> list[str]:
    """The fused layers a part ``proj`` may be stored in (up_proj: gate_up_proj, gate_and_up_proj)."""
    return [f for f, parts in _FUSED.items() if proj in parts]
#: consumer -> the Linear before it whose output rows can carry the consumer's input scale.
PRECEDING = {"o_proj": "v_proj", "down_proj": "up_proj", "fc2": "fc1", "w2": "w3"}
_ATTN_IN = {"q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "wq", "wk", "wv", "Wqkv"}
_MLP_IN = {"gate_proj", "up_proj", "gate_up_proj", "gate_and_up_proj", "w1", "w3", "fc1", "c_fc"}
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.(\d+)\.")
#: A per-expert MoE layer path (transformers' layout; mlx-lm stacks them into switch_mlp).
EXPERT_RE = re.compile(r"^(?P<pre>.*)\.experts\.(?P<e>\d+)\.(?P<proj>[^.]+)$")
_SWITCH_RE = re.compile(r"^(?P<pre>.*)\.switch_mlp\.(?P<proj>[^.]+)$")
#: Where a decoder block ``{block}`` keeps a stack of experts: transformers' parameters, and
#: mlx-lm's gpt-oss / Llama 4 stacks, at ``{block}.experts``; mlx-lm's ``{block}.switch_mlp``
#: (Qwen3-MoE, Qwen3-VL-MoE, Qwen3.5-MoE) and ``{block}.experts.switch_glu`` (Gemma 4).
_STACK_HOMES = ("experts", "switch_mlp", "experts.switch_glu")
#: Mixtral-style experts (w1/w3/w2) stack into switch_mlp's gate/up/down (mlx-lm's sanitize), and back.
_SWITCH_OF_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_EXPERT_OF_SWITCH = {v: k for k, v in _SWITCH_OF_EXPERT.items()}
#: A stored norm equals the reference's up to this relative difference when nothing was folded
#: (bf16 → fp16 is exact; fp16/bf16 re-rounding moves a value by at most 2^-8).
NORM_TOLERANCE = 2.0 ** -6


def switch_path(expert_path: str) -> tuple[str, int] | None:
    """(the stacked module mlx-lm loads a per-expert module into, the expert's index):
    ``….experts.3.w1`` → (``….switch_mlp.gate_proj``, 3); None for a path that is not per-expert."""
    m = EXPERT_RE.match(expert_path)
    if m is None:
        return None
    return f"{m['pre']}.switch_mlp.{_SWITCH_OF_EXPERT.get(m['proj'], m['proj'])}", int(m["e"])


#: Modules of a decoder saved without its causal-LM wrapper (transformers' ``AutoModel``, a base
#: model's own save): ``layers.0.…``, ``embed_tokens``, ``norm``, where ``…ForCausalLM`` writes
#: ``model.layers.0.…``.
_HEADLESS = ("layers.", "embed_tokens", "norm")


def canonical(path: str) -> str:
    """Path without a multimodal wrapper prefix (``model.language_model.`` → ``model.``), and
    with the ``model.`` of a causal LM where a base model's save has none (``layers.0.…``)."""
    if path.startswith("model.language_model."):
        return "model." + path[len("model.language_model."):]
    if path.startswith("language_model.model."):
        return "model." + path[len("language_model.model."):]
    path = path.removeprefix("language_model.")
    if path.startswith(_HEADLESS[0]) or path in _HEADLESS[1:]:
        return "model." + path
    return path


def containers(path: str) -> list[str]:
    """Modules that hold layer ``path`` in the other layouts :func:`align` matches: the
    switch_mlp stack of an expert, the fused qkv_proj / gate_up_proj of a part."""
    out = []
    sw = switch_path(path)
    if sw is not None:
        out.append(sw[0])
    m = EXPERT_RE.match(path)
    if m is not None:  # (transformers' stack of the experts: experts.gate_up_proj of experts.3.gate_proj;
        # mlx-lm's Gemma 4 stack experts.switch_glu.gate_proj)
        out += [f"{m['pre']}.{home}.{p}" for home in ("experts", "experts.switch_glu")
                for p in dict.fromkeys((m["proj"], _PART_OF.get(m["proj"], m["proj"])))]
    parent, _, proj = path.rpartition(".")
    if proj in _PART_OF:
        out.append(f"{parent}.{_PART_OF[proj]}")
    return out


def stacked_expert(path: str, model: Model) -> tuple[Layer, int] | None:
    """(the switch_mlp stack of ``model`` holding expert ``path``, its index) when ``model``
    stores experts stacked and ``path`` names one of them by transformers' per-expert path; None
    when ``model`` has ``path`` itself or no such stack. A :class:`LayerError` when the stack
    has fewer experts."""
    from .errors import LayerError
    if path in model.layers:
        return None
    sw = switch_path(path)
    if sw is not None and sw[0] not in model.layers and (m := EXPERT_RE.match(path)) is not None \
            and f"{m['pre']}.experts.{m['proj']}" in model.layers \
            and _bare_stack(model.layers[f"{m['pre']}.experts.{m['proj']}"]):
        sw = (f"{m['pre']}.experts.{m['proj']}", sw[1])  # (a stack at experts.{proj}: transformers', mlx-lm's Llama 4)
    if sw is None or sw[0] not in model.layers:
        return None
    layer = model.layers[sw[0]]
    if not layer.shape or len(layer.shape) != 3 or sw[1] >= layer.shape[0]:
        raise LayerError(f"{sw[0]} holds no expert {sw[1]} (shape {list(layer.shape or ())})", tensor=path)
    return layer, sw[1]


def stack_expert_row(stack: str, e: int) -> str | None:
    """The row name :func:`align` gives expert ``e`` of a reference's stack
    ``{block}.switch_mlp.{proj}`` or transformers' ``{block}.experts.{proj}`` (against a variant
    storing the experts one by one): ``{block}.experts.{e}.{proj}``, in the reference's naming.
    None for a path that is no stack."""
    m = _SWITCH_RE.match(stack) or _BARE_STACK_RE.match(stack)
    return None if m is None else f"{m['pre']}.experts.{e}.{m['proj']}"


#: A stack of experts at ``{block}.experts.{proj}``: transformers' parameters read as a module
#: (see checkpoint.split_name), mlx-lm's Llama 4 / gpt-oss stacks, OpenAI's MXFP4 blocks; and
#: mlx-lm's Gemma 4 stacks, ``{block}.experts.switch_glu.{proj}``.
_BARE_STACK_RE = re.compile(r"^(?P<pre>.*)\.experts(?:\.switch_glu)?\.(?P<proj>gate_up_proj|down_proj|gate_proj|up_proj)$")


def _bare_stack(layer: Layer) -> bool:
    """Whether ``layer`` is a stack of experts ``{block}.experts.{proj}`` [E, N, K]: transformers'
    parameters, or mlx-lm's own stacks of Llama 4 and gpt-oss (bf16 or quantized), or OpenAI's
    MXFP4 blocks."""
    return layer.shape is not None and len(layer.shape) == 3 and _BARE_STACK_RE.match(layer.path) is not None


def expert_of_stack(path: str, reference: Model) -> str | None:
    """The name a sweep gives expert ``path`` (per-expert, in any checkpoint's naming) where
    ``reference`` stacks the experts (``{block}.experts.{e}.{proj}`` beside its
    ``{block}.switch_mlp.{proj}``, as :func:`align` names such rows); None when the reference
    holds ``path`` itself or stacks no such experts."""
    if path in reference.layers:
        return None
    sw = switch_path(canonical(path))
    if sw is None:
        return None
    stack = _canonical_names(reference).get(canonical(sw[0]))
    if stack is None:  # transformers' stack: experts.3.gate_proj is a part of experts.gate_up_proj's expert 3
        m = EXPERT_RE.match(canonical(path))
        names = _canonical_names(reference)
        stack = next((names[n] for p in dict.fromkeys((m["proj"], _PART_OF.get(m["proj"], m["proj"])))
                      if (n := f"{m['pre']}.experts.{p}") in names and _bare_stack(reference.layers[names[n]])), None)
        if stack is None:
            return None
    shape = reference.layers[stack].shape
    if not shape or len(shape) != 3 or sw[1] >= shape[0]:
        return None
    return stack_expert_row(stack, sw[1])


def expert_stacks(row: str, reference: Model) -> list[str]:
    """The stacks of ``reference`` that expert row ``row`` (``{block}.experts.{e}.{proj}``) may be
    an expert of (its switch_mlp, transformers' or mlx-lm's stack at experts.{proj}, Gemma 4's)."""
    m = EXPERT_RE.match(row)
    if m is None:
        return []
    sw = switch_path(row)
    names = [sw[0]] + [f"{m['pre']}.{home}.{m['proj']}" for home in ("experts", "experts.switch_glu")]
    return [n for n in names if n in reference.layers]


def stack_expert_names(reference: Model) -> list[str]:
    """The rows :func:`align` makes of the experts a reference stacks (``{block}.experts.{e}.{proj}``
    for each ``{block}.switch_mlp.{proj}`` or ``{block}.experts.{proj}`` ``[E, N, K]``)."""
    out = []
    for path, layer in reference.layers.items():
        if (_SWITCH_RE.match(path) or _bare_stack(layer)) and layer.shape and len(layer.shape) == 3:
            out += [stack_expert_row(path, e) for e in range(layer.shape[0])]
    return out


_BY_CANONICAL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _canonical_names(model: Model) -> dict[str, str]:
    """Each module of ``model`` by its :func:`canonical` name, made once per model (the window
    asks on every selection; a 40-layer, 128-expert MoE has 15k modules, ~8 ms to map)."""
    got = _BY_CANONICAL.get(model)
    if got is None or got[0] != len(model.layers):
        got = _BY_CANONICAL[model] = (len(model.layers), {canonical(n): n for n in model.layers})
    return got[1]


def _ties(model: Model) -> bool:
    """Whether a model without a stored ``lm_head`` has it tied to its embeddings: unless its
    config says ``tie_word_embeddings: false`` (not saying is taken as tied, as transformers'
    default and every MLX conversion of a tied model have it)."""
    return getattr(model.ckpt, "tied_embeddings", None) is not False


_PARAM_STACK_RE = re.compile(r"^(?P<pre>.*?)\.(?:" + "|".join(map(re.escape, _STACK_HOMES))
                             + r")\.(?P<proj>[a-z_]+_proj)$")


def _other_stack_homes(path: str) -> list[str]:
    """The same projection of a stack of experts where the other layouts keep it: transformers'
    ``{block}.experts.{proj}`` parameters, mlx-lm's ``{block}.switch_mlp.{proj}`` or
    ``{block}.experts.switch_glu.{proj}`` (:data:`_STACK_HOMES`)."""
    m = _PARAM_STACK_RE.match(path)
    if m is None:
        return []
    return [f"{m['pre']}.{h}.{m['proj']}" for h in _STACK_HOMES if f"{m['pre']}.{h}.{m['proj']}" != path]


def counterpart(path: str, model: Model, _homes: bool = True) -> tuple[str, str] | None:
    """The module of ``model`` that holds the weights of module ``path`` (named as in another
    checkpoint) and how, by name alone — ``(path, "")`` when it is there as such, else
    ``(other path, note)`` across the naming differences :func:`align` handles (a wrapper prefix,
    experts stacked in switch_mlp or stored one by one, q/k/v or gate/up fused); None when none is.
    For showing, not measuring (shapes are not checked)."""
    if path in model.layers:
        return path, ""

    def find(p: str) -> str | None:  # p, or the module named p under another wrapper prefix
        if p in model.layers:
            return p
        return _canonical_names(model).get(canonical(p))

    can = canonical(path)
    if hit := find(path):
        return hit, "the same module under another prefix"
    sw = switch_path(can)
    if sw is not None and (hit := find(sw[0])):
        shape = model.layers[hit].shape
        if shape and len(shape) == 3 and sw[1] >= shape[0]:
            return None  # the stack has fewer experts
        return hit, f"expert {sw[1]} of the stacked experts"
    if (m := EXPERT_RE.match(can)) is not None:  # (a stack at experts.{proj}, gate/up fused, split or not)
        for proj in dict.fromkeys((m["proj"], _PART_OF.get(m["proj"], m["proj"]), *_FUSED.get(m["proj"], ())[:1])):
            if (hit := find(f"{m['pre']}.experts.{proj}")) and _bare_stack(model.layers[hit]):
                if int(m["e"]) >= model.layers[hit].shape[0]:
                    return None
                return hit, f"expert {m['e']} of the stacked experts" + (
                    "" if proj == m["proj"] else f", its rows of the fused {proj}" if proj in _FUSED
                    else f", stored split; {proj} shown")
    m = _SWITCH_RE.match(can)
    if m is not None:
        for proj in dict.fromkeys((m["proj"], _EXPERT_OF_SWITCH.get(m["proj"], m["proj"]))):
            if hit := find(f"{m['pre']}.experts.0.{proj}"):
                return hit, "the experts are stored one by one; expert 0 shown"
    parent, _, proj = can.rpartition(".")
    for fused in fused_homes(proj):
        if hit := find(f"{parent}.{fused}"):
            return hit, f"its rows of the fused {fused}"
    if (alias := _router_alias(can)) is not None and (hit := find(alias[0])):
        return hit, alias[1]
    if proj in ("embed_q", "unembed_out") and (hit := find(f"{parent}.kv_b_proj")):
        return hit, ("mlx-lm's split of MLA's kv_b_proj: per head, embed_q its first rows transposed, unembed_out "
                     "the rest")
    if proj == "kv_b_proj" and (hit := find(f"{parent}.embed_q")) and find(f"{parent}.unembed_out"):
        return hit, "split by mlx-lm into embed_q and unembed_out (per head); embed_q shown"
    for fused, parts in _FUSED.items():
        if proj == fused and (hit := find(f"{parent}.{parts[0]}")):
            return hit, f"stored split; {parts[0]} shown"
    if proj == "lm_head" and _ties(model) and (hit := find(f"{parent + '.' if parent else ''}model.embed_tokens")):
        return hit, "no lm_head: tied to the embeddings"
    for alt in _other_stack_homes(can) if _homes else ():
        # (transformers' experts.gate_up_proj against mlx-lm's switch_mlp.gate_proj, and back)
        if (got := counterpart(alt, model, False)) is not None:
            return got[0], got[1] or "the same stack where mlx-lm keeps it"
    return None


def layer_index(path: str) -> int | None:
    """Decoder layer number of a module path (``…layers.{i}.…``), None outside the decoder."""
    m = _LAYER_RE.search(path)
    return int(m.group(1)) if m else None


def layer_template(path: str) -> tuple[str, int | None]:
    """(the path with its decoder layer number as ``*``, that number):
    ``model.layers.3.self_attn.q_proj`` → (``model.layers.*.self_attn.q_proj``, 3); a path outside
    the decoder is its own template, with None."""
    m = _LAYER_RE.search(path)
    if m is None:
        return path, None
    return path[:m.start(1)] + "*" + path[m.end(1):], int(m.group(1))


def proj_of(path: str) -> str:
    return path.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Segment:
    """Reference rows ``ref_rows`` (start, stop, step) of the flattened reference weight are
    compared with rows ``var_rows`` of the flattened weight of variant layer ``var_layer``;
    ``var_transposed``: with the columns of those rows (a block ``[b, a]`` of the variant, read as
    ``[a, b]``: MLA's embed_q, each head's slab of kv_b_proj transposed)."""

    ref_rows: tuple[int, int, int]
    var_layer: str
    var_rows: tuple[int, int, int]
    var_transposed: bool = False

    @property
    def count(self) -> int:
        return len(range(*self.ref_rows))


@dataclass
class Target:
    """One reference layer and how a variant covers it."""

    name: str                 # the reference module path reported as the row's name
    ref_layer: str            # the reference layer holding the weights (differs for tied heads)
    rows: int                 # flattened rows R
    cols: int                 # K
    segments: list[Segment]
    col_scale: np.ndarray | None = None     # undo Ŵ·diag(s): divide variant columns by this
    smoothing: str = "none"
    row_fit_for: str | None = None          # this is a preceding layer: fit s for that consumer
    fit_row0: int = 0                       # ... on its rows from here (a fused gate_up_proj's up half)
    col_fit_from: str | None = None         # consumer: its s comes from this target's row fit
    ref_row0: int = 0                       # its rows begin here in the reference layer (an expert of a stack)
    fold_rows: np.ndarray | None = None     # undo a multiplier folded into Ŵ's rows: divide them by this
    fold: str = ""                          # ... and which ("mup:attention_out_multiplier")

    @property
    def var_layers(self) -> list[str]:
        return list(dict.fromkeys(s.var_layer for s in self.segments))


@dataclass
class Unmatched:
    """A layer without a partner, and why."""

    variant: str
    layer: str
    reason: str


@dataclass
class Alignment:
    """How one variant covers the reference: targets by reference name, plus what did not match."""

    targets: dict[str, Target] = field(default_factory=dict)
    unmatched: list[Unmatched] = field(default_factory=list)
    folded_norms: dict[str, np.ndarray] = field(default_factory=dict)  # ref norm path -> s
    shows_folding: bool = False
    norms_plus_one: list[str] = field(default_factory=list)  # ref norms compared as 1 + w (_norm_offset)


def _flat_rows(shape) -> tuple[int, int]:
    if not shape:  # (a scalar: no rows; detection calls such a layer broken)
        return 0, 0
    return int(math.prod(shape[:-1])), int(shape[-1])


def _conv_layouts(a, b) -> bool:
    """Whether shapes ``a`` and ``b`` are one depthwise conv1d's weight as transformers stores it
    (``[C, 1, k]``) and as mlx-lm does (``[C, k, 1]``), either way round."""
    return (a is not None and b is not None and len(a) == len(b) == 3 and a[0] == b[0] and a[1:] == b[1:][::-1]
            and 1 in a[1:] and a[1] != a[2])


def _comparable(layer: Layer) -> bool:
    return layer.is_matrix


def stacked_interleave(fused, part, interleaved: bool) -> bool:
    """Whether ``fused`` (a stack ``[E, 2I, K]``) and ``part`` (``[E, I, K]``) are a stack of
    interleaved gate/up rows and one half of it, as gpt-oss stores them; then row ``2r + half`` of
    the flattened stack is row ``r`` of the flattened part (each expert's rows are even)."""
    return bool(interleaved and fused is not None and part is not None and len(fused) == len(part) >= 3
                and tuple(fused[:-2]) == tuple(part[:-2]) and fused[-1] == part[-1] and fused[-2] == 2 * part[-2])


def _mla_segments(shape, eq: Layer, uo: Layer) -> list[Segment] | None:
    """kv_b_proj ``[H·(n+v), L]`` as mlx-lm's split of it: per head h, its rows
    ``h(n+v) … h(n+v)+n`` are embed_q's slab ``[L, n]`` of head h transposed, the ``v`` rows after
    them unembed_out's rows of head h; None where the shapes do not say so."""
    if not shape or len(shape) != 2 or not eq.shape or not uo.shape or len(eq.shape) != 3 or len(uo.shape) != 3:
        return None
    h, lat, n = eq.shape
    v = uo.shape[1]
    if tuple(uo.shape) != (h, v, lat) or tuple(shape) != (h * (n + v), lat):
        return None
    k_part = [Segment((i * (n + v), i * (n + v) + n, 1), eq.path, (i * lat, (i + 1) * lat, 1), var_transposed=True)
              for i in range(h)]
    v_part = [Segment((i * (n + v) + n, (i + 1) * (n + v), 1), uo.path, (i * v, (i + 1) * v, 1)) for i in range(h)]
    # (the quantized part first: the row's scheme, bits and group are its)
    return v_part + k_part if uo.quantized and not eq.quantized else k_part + v_part


def _within(segs: list[Segment], a: int, b: int) -> list[Segment]:
    """The parts of ``segs`` that cover reference rows ``[a, b)``, those rows counted from ``a``."""
    out = []
    for s in segs:
        # (a transposed segment's rows are its block's columns: no range of them is a segment)
        assert not s.var_transposed, "a transposed segment is not cut by rows"
        s0, s1, st = s.ref_rows
        v0, _, vst = s.var_rows
        i0 = max(0, -(-(a - s0) // st))
        i1 = min(len(range(s0, s1, st)), -(-(b - s0) // st))
        if i1 > i0:
            out.append(dataclasses.replace(s, ref_rows=(s0 + i0 * st - a, s0 + (i1 - 1) * st + 1 - a, st),
                                           var_rows=(v0 + i0 * vst, v0 + (i1 - 1) * vst + 1, vst)))
    return out


def _expert_parts(pre: str, proj: str, e: int, var: dict[str, Layer]) -> list[Layer] | None:
    """Expert ``e``'s modules of projection ``proj`` in a variant storing the experts one by one:
    ``{pre}.experts.{e}.{proj}``, or for a fused ``gate_up_proj`` its ``gate_proj`` and ``up_proj``."""
    if (one := var.get(f"{pre}.experts.{e}.{proj}")) is not None:
        return [one]
    parts = [var.get(f"{pre}.experts.{e}.{p}") for p in _FUSED.get(proj, ())]
    return parts if parts and None not in parts else None


def _stacked_concat(fused, parts) -> list[list[tuple[tuple, tuple]]] | None:
    """Where ``fused`` is a stack of experts ``[E, N, K]`` whose rows are, in each expert, the
    concatenation of ``parts`` (stacks ``[E, n_i, K]``, Σ n_i = N), each part's pieces as
    ((fused rows), (part rows)) ranges of the flattened stacks, one per expert; None otherwise."""
    if fused is None or len(fused) != 3 or any(p is None or len(p) != 3 or p[0] != fused[0] or p[2] != fused[2]
                                               for p in parts) or sum(p[1] for p in parts) != fused[1]:
        return None
    e_n, n = fused[0], fused[1]
    out, off = [], 0
    for p in parts:
        m = p[1]
        out.append([((e * n + off, e * n + off + m, 1), (e * m, (e + 1) * m, 1)) for e in range(e_n)])
        off += m
    return out


def _stack_parent(parent: str, proj: str, rl: Layer, var: dict[str, Layer]) -> str:
    """The variant's module holding the projections of reference stack ``{parent}.{proj}``
    (``parent`` = ``{block}.experts``, or where mlx-lm puts stacks): ``parent`` itself unless the
    variant has none of them there and has them in another of those homes."""
    if not rl.shape or len(rl.shape) != 3:
        return parent
    # (the longest home first: …experts.switch_glu also ends in a home's name)
    pre = next((parent[:-len(h) - 1] for h in sorted(_STACK_HOMES, key=len, reverse=True)
                if parent.endswith(f".{h}")), None)
    if pre is None:
        return parent
    names = (proj, *_FUSED.get(proj, ()), *((_PART_OF[proj],) if proj in _PART_OF else ()))
    if any(f"{parent}.{n}" in var for n in names):
        return parent
    return next((f"{pre}.{h}" for h in _STACK_HOMES
                 if f"{pre}.{h}" != parent and any(f"{pre}.{h}.{n}" in var for n in names)), parent)


def _interleaved(reference: Model, variant: Model) -> bool:
    return any("gpt_oss" in t for m in (reference, variant) for t in m.ckpt.model_types())


def grouped_qkv(reference: Model, variant: Model | None = None) -> tuple[int, int, int] | None:
    """(query heads, key/value heads, head width) where a fused ``qkv_proj``'s rows go by
    key/value group — per key/value head its query heads, then its key head, then its value
    head — as Hunyuan's original checkpoints store it (``model_type`` "hunyuan"; mlx-lm's
    sanitize splits it so); None for the row concatenation q | k | v of every other model."""
    for m in (reference, variant):
        if m is None or "hunyuan" not in m.ckpt.model_types():
            continue
        cfg = m.ckpt.configs.get("config.json") or {}
        try:
            h, kv, hidden = (int(cfg[k]) for k in ("num_attention_heads", "num_key_value_heads", "hidden_size"))
        except (KeyError, TypeError, ValueError):
            continue  # (the other side's config may say)
        if h > 0 and kv > 0 and h % kv == 0 and hidden % h == 0:
            return h, kv, hidden // h
    return None


def _grouped_qkv_rows(h: int, kv: int, d: int) -> list[list[tuple[tuple[int, int, int], tuple[int, int, int]]]]:
    """For q, k and v: (rows of the grouped fused qkv_proj, rows of the part) per key/value group."""
    g = h // kv
    out: list[list] = [[], [], []]
    for j in range(kv):
        base = j * (g + 2) * d
        out[0].append(((base, base + g * d, 1), (j * g * d, (j + 1) * g * d, 1)))
        out[1].append(((base + g * d, base + (g + 1) * d, 1), (j * d, (j + 1) * d, 1)))
        out[2].append(((base + (g + 1) * d, base + (g + 2) * d, 1), (j * d, (j + 1) * d, 1)))
    return out


def _norm_vector(model: Model, layer: Layer) -> np.ndarray | None:
    t = layer.tensors.get("weight")
    if t is None or len(t.shape) != 1:
        return None
    return np.asarray(model.ckpt.tensor(t.name)).astype(np.float64)


def _smallest_step(layer: Layer) -> float:
    """The smallest positive value the norm's stored dtype holds (its subnormals' step)."""
    t = layer.tensors.get("weight")
    dt = DTYPES.get(t.dtype) if t is not None else None  # (its header's dtype: no tensor read)
    try:
        return float(ml_dtypes.finfo(dt.numpy).smallest_subnormal) if dt is not None else 0.0
    except (TypeError, ValueError):  # (not a float)
        return 0.0


def align(reference: Model, variant: Model, *, label: str = "", interleaved: bool | None = None,
          keep_unquantized: bool = False, split_stacks: bool = True) -> Alignment:
    """Match ``variant``'s layers to ``reference``'s (see the module docstring).

    Parameters
    ----------
    reference, variant
        Analyzed checkpoints.
    label
        The variant's label, used in :class:`Unmatched` entries.
    interleaved
        Whether fused ``gate_up_proj`` rows interleave gate and up (gpt-oss); None decides from
        ``model_type`` in either config.
    keep_unquantized
        Match the layers a quantized variant left unquantized too (one selected layer's view
        shows them); a sweep leaves them out as "skipped by the variant".
    split_stacks
        Measure an unquantized reference's stacks of experts expert by expert, a target per
        expert (``{block}.experts.{e}.{proj}``), as the sweep does; False: a stack against a stack
        is one target (one selected stack's view).

    Returns
    -------
    Alignment
    """
    if interleaved is None:
        interleaved = _interleaved(reference, variant)
    al = Alignment()
    ref = {canonical(p): l for p, l in reference.layers.items()}
    var = {canonical(p): l for p, l in variant.layers.items()}
    var_dense_model = not any(l.quantized for l in variant.layers.values())
    used_var: set[str] = set()

    def usable(vl: Layer, ref_name: str) -> str | None:
        """Why the variant layer cannot be used (None when it can)."""
        if not vl.decodable:
            return f"the variant's layer {vl.path} cannot be decoded: {vl.problem or vl.scheme}"
        if not vl.quantized and not var_dense_model and not keep_unquantized:
            return f"skipped by the variant: {vl.path} is stored unquantized ({vl.dtype})"
        return None

    def add_target(rname: str, rl: Layer, segs: list[Segment], ref_layer: str | None = None) -> None:
        r, k = _flat_rows(rl.shape)
        al.targets[rl.path] = Target(rl.path, rl.path, r, k, segs)

    # Tied heads: an lm_head on one side only stands for that side's embed_tokens, unless its
    # config says the head is not tied (then the head is missing: an untied reference head was
    # compared with the variant's embeddings, rel_fro 1.4, "implausible error")
    tied_ref_head = None
    if "lm_head" in var and "lm_head" not in ref and "model.embed_tokens" in ref and _ties(reference):
        tied_ref_head = ref["model.embed_tokens"]
    if "lm_head" in ref and "lm_head" not in var and "model.embed_tokens" in var and _ties(variant):
        var = dict(var)
        var["lm_head"] = var["model.embed_tokens"]

    for cname, rl in ref.items():
        if not _comparable(rl):
            continue
        if not rl.decodable:
            al.unmatched.append(Unmatched(label, rl.path, f"the reference layer cannot be decoded: {rl.problem}"))
            continue
        if not rl.numel:  # (its error was 0/0: the sweep failed with an internal error)
            al.unmatched.append(Unmatched(label, rl.path, "the reference layer is empty (shape "
                                          + "×".join(map(str, rl.shape)) + "): nothing to compare"))
            continue
        rr, rk = _flat_rows(rl.shape)
        proj = proj_of(cname)
        parent = cname[:-len(proj) - 1] if "." in cname else ""
        vparent = _stack_parent(parent, proj, rl, var)  # (where the variant keeps this stack's projections)
        segs: list[Segment] | None = None
        reason = None
        vl = var.get(cname if vparent == parent else f"{vparent}.{proj}")
        if vl is not None:
            why = usable(vl, cname)
            if why:
                reason = why
            elif vl.shape is None or _flat_rows(vl.shape) != (rr, rk):
                reason = f"shape mismatch: reference {list(rl.shape)} vs variant {list(vl.shape or ())}"
                if _conv_layouts(rl.shape, vl.shape):
                    # (Mamba's and linear attention's depthwise conv1d: mlx-lm moves its axes)
                    reason = (f"stored {list(vl.shape)} in the variant and {list(rl.shape)} in the reference: one "
                              "depthwise conv1d in mlx-lm's layout and in transformers'")
                if vl.warning and str(rk) in vl.warning:
                    # the config's bits/group size make the packed tensors another shape (its warning
                    # names the reading that fits): a misread config, not a different model
                    reason += f" as its config reads it — {vl.warning}"
            else:
                segs = [Segment((0, rr, 1), vl.path, (0, rr, 1))]
        elif (alias := _router_alias(cname)) is not None and (moved := alias[0]) in var:
            # (a router one module deeper or shallower: mlx-lm's Bailing keeps mlp.gate at mlp.gate.gate_proj)
            rv = var[moved]
            why = usable(rv, cname)
            if why:
                reason = why
            elif rv.shape is None or _flat_rows(rv.shape) != (rr, rk):
                reason = f"shape mismatch: reference {list(rl.shape)} vs variant {moved} {list(rv.shape or ())}"
            else:
                segs = [Segment((0, rr, 1), rv.path, (0, rr, 1))]
        elif (home := next((f for f in fused_homes(proj) if f"{vparent}.{f}" in var), None)) is not None:
            # Reference split, variant fused: this reference layer is a row range of the fused one.
            fused = var[f"{vparent}.{home}"]
            parts = _FUSED[home]
            sizes = [ref[f"{parent}.{p}"].shape[-2] if f"{parent}.{p}" in ref and ref[f"{parent}.{p}"].shape
                     else None for p in parts]
            why = usable(fused, cname)
            if why:
                reason = why
            elif stacked_interleave(fused.shape, rl.shape, interleaved and home == "gate_up_proj"):
                # stacks of experts (gpt-oss's [E, 2I, K]): gate and up interleave within each
                # expert, so over the flattened rows too
                segs = [Segment((0, rr, 1), fused.path, (parts.index(proj), 2 * rr, 2))]
            elif (cat := _stacked_concat(fused.shape, [ref[f"{parent}.{p}"].shape if f"{parent}.{p}" in ref
                                                       else None for p in parts])) is not None:
                # stacks of experts, gate and up concatenated in each expert (Llama 4, Qwen3-VL-MoE)
                i = parts.index(proj)
                segs = [Segment(p_rows, fused.path, f_rows) for f_rows, p_rows in cat[i]]
            elif None in sizes or fused.shape is None or fused.shape[-1] != rk or sum(sizes) != fused.shape[-2] \
                    or len(fused.shape) != 2:
                reason = (f"shape mismatch: fused {fused.path} {list(fused.shape or ())} is not the row "
                          f"concatenation of the reference's {', '.join(parts)}")
            else:
                i = parts.index(proj)
                if interleaved and home == "gate_up_proj":
                    segs = [Segment((0, rr, 1), fused.path, (i, 2 * rr, 2))]
                elif home == "qkv_proj" and (hq := grouped_qkv(reference, variant)) is not None \
                        and sum(sizes) == (hq[0] + 2 * hq[1]) * hq[2]:
                    # (Hunyuan's: its rows by key/value group)
                    segs = [Segment(p_rows, fused.path, f_rows) for f_rows, p_rows in _grouped_qkv_rows(*hq)[i]]
                else:
                    off = sum(sizes[:i])
                    segs = [Segment((0, rr, 1), fused.path, (off, off + rr, 1))]
        elif proj in _FUSED and all(f"{vparent}.{p}" in var for p in _FUSED[proj]):
            # Reference fused, variant split: the variant's parts concatenate (or interleave).
            pl = [var[f"{vparent}.{p}"] for p in _FUSED[proj]]
            bad = [w for w in (usable(p, cname) for p in pl) if w]
            sizes = [p.shape[-2] if p.shape else 0 for p in pl]
            if bad:
                reason = bad[0]
            elif all(stacked_interleave(rl.shape, p.shape, interleaved and proj == "gate_up_proj") for p in pl):
                # (stacks of experts, as above: gpt-oss's original against mlx-lm's split conversion)
                segs = [Segment((i, rr, 2), p.path, (0, rr // 2, 1)) for i, p in enumerate(pl)]
            elif (cat := _stacked_concat(rl.shape, [p.shape for p in pl])) is not None:
                # (stacks, gate and up concatenated in each expert: against mlx-lm's split conversion)
                segs = [Segment(f_rows, p.path, p_rows) for p, pieces in zip(pl, cat) for f_rows, p_rows in pieces]
            elif any(p.shape is None or len(p.shape) != 2 or p.shape[-1] != rk for p in pl) or sum(sizes) != rr:
                reason = f"shape mismatch: the variant's {', '.join(_FUSED[proj])} do not make up {list(rl.shape)}"
            elif proj == "qkv_proj" and (hq := grouped_qkv(reference, variant)) is not None \
                    and rr == (hq[0] + 2 * hq[1]) * hq[2]:
                # (Hunyuan's: the reference's rows by key/value group, against mlx-lm's split)
                segs = [Segment(f_rows, p.path, p_rows) for p, pieces in zip(pl, _grouped_qkv_rows(*hq))
                        for f_rows, p_rows in pieces]
            else:
                segs = []
                off = 0
                for i, (p, n) in enumerate(zip(pl, sizes)):
                    if interleaved and proj == "gate_up_proj":
                        segs.append(Segment((i, rr, 2), p.path, (0, n, 1)))
                    else:
                        segs.append(Segment((off, off + n, 1), p.path, (0, n, 1)))
                        off += n
        elif proj == "kv_b_proj" and f"{vparent}.embed_q" in var and f"{vparent}.unembed_out" in var:
            # MLA (DeepSeek-V3, Kimi K2, GLM-4.7-Flash): mlx-lm splits kv_b_proj [H·(nope+v), L] per
            # head into embed_q [H, L, nope] (its nope rows, transposed) and unembed_out [H, v, L]
            eq, uo = var[f"{vparent}.embed_q"], var[f"{vparent}.unembed_out"]
            # (one part may be kept dense: mlx-lm leaves embed_q so where nope is no multiple of the
            # group size; the layer is the variant's quantization all the same)
            why = [w for w in (usable(eq, cname), usable(uo, cname)) if w]
            if why and (len(why) == 2 or not why[0].startswith("skipped by the variant")):
                reason = why[0]
            elif (segs := _mla_segments(rl.shape, eq, uo)) is None:
                reason = (f"shape mismatch: the variant's embed_q {list(eq.shape or ())} and unembed_out "
                          f"{list(uo.shape or ())} do not make up {list(rl.shape)} (per head: embed_q's rows "
                          "transposed, then unembed_out's)")
        elif (m := EXPERT_RE.match(cname)) and (
                (sw := f"{m['pre']}.switch_mlp.{m['proj']}") in var
                or (sw := f"{m['pre']}.switch_mlp.{_SWITCH_OF_EXPERT.get(m['proj'], m['proj'])}") in var):
            st = var[sw]
            e = int(m["e"])
            why = usable(st, cname)
            if why:
                reason = why
            elif st.shape is None or len(st.shape) != 3 or tuple(st.shape[1:]) != (rr, rk) or e >= st.shape[0]:
                reason = f"shape mismatch: stacked {st.path} {list(st.shape or ())} has no expert {e} of shape {[rr, rk]}"
            else:
                segs = [Segment((0, rr, 1), st.path, (e * rr, (e + 1) * rr, 1))]
        elif _bare_stack(rl) and (m := _BARE_STACK_RE.match(cname)) and any(
                _expert_parts(m["pre"], m["proj"], e, var) for e in range(rl.shape[0])):
            # transformers' stack against a variant storing the experts one by one (llm-compressor's
            # and GPTQModel's Llama 4 / gpt-oss): each expert a row of its own, gate_up_proj's made
            # of the variant's gate_proj and up_proj (concatenated, or interleaved in gpt-oss)
            n_exp, n = rl.shape[0], rl.shape[1]
            for e in range(n_exp):
                name = stack_expert_row(rl.path, e)
                parts = _expert_parts(m["pre"], m["proj"], e, var)
                if parts is None:
                    have = [q for q in _FUSED.get(m["proj"], ()) if f"{m['pre']}.experts.{e}.{q}" in var]
                    why = "absent in the variant" + (f" (it has only {', '.join(have)})" if have else "")
                else:
                    why = next((w for w in (usable(p, cname) for p in parts) if w), None)
                if why is None and any(p.shape is None or tuple(p.shape) != (n // len(parts), rk) for p in parts):
                    why = (f"shape mismatch: reference expert {[n, rk]} of {rl.path} vs variant "
                           + " + ".join(str(list(p.shape or ())) for p in parts))
                if why is not None:
                    al.unmatched.append(Unmatched(label, name, why))
                    # (a part whose partner is missing is this row's, not a layer the reference lacks)
                    used_var.update(p.path for q in (m["proj"], *_FUSED.get(m["proj"], ()))
                                    if (p := var.get(f"{m['pre']}.experts.{e}.{q}")) is not None)
                    continue
                h = n // len(parts)
                segs = [Segment((i, n, 2) if interleaved and len(parts) > 1 else (i * h, (i + 1) * h, 1),
                                p.path, (0, h, 1)) for i, p in enumerate(parts)]
                al.targets[name] = Target(name, rl.path, n, rk, segs, ref_row0=e * n)
                used_var.update(p.path for p in parts)
            continue
        elif (m := _SWITCH_RE.match(cname)) and len(rl.shape) == 3:
            n_exp, n = rl.shape[0], rl.shape[1]
            parts = [var.get(f"{m['pre']}.experts.{e}.{m['proj']}") for e in range(n_exp)]
            if m["proj"] in _EXPERT_OF_SWITCH:  # Mixtral's w1/w3/w2, where those name more of them
                alt = [var.get(f"{m['pre']}.experts.{e}.{_EXPERT_OF_SWITCH[m['proj']]}") for e in range(n_exp)]
                if sum(p is not None for p in alt) > sum(p is not None for p in parts):
                    parts = alt
            if any(p is not None for p in parts):
                # expert by expert, as against a reference that stores them one by one: each a
                # row of its own, named experts.{e}.{proj} beside the reference's stack; one the
                # variant lacks (or cannot use) is listed without partner, the others compared
                for e, p in enumerate(parts):
                    name = stack_expert_row(rl.path, e)
                    why = "absent in the variant" if p is None else usable(p, cname)
                    if why is None and (p.shape is None or tuple(p.shape) != (n, rk)):
                        why = f"shape mismatch: reference expert {[n, rk]} of {rl.path} vs variant {list(p.shape or ())}"
                    if why is not None:
                        al.unmatched.append(Unmatched(label, name, why))
                        continue
                    al.targets[name] = Target(name, rl.path, n, rk, [Segment((0, n, 1), p.path, (0, n, 1))],
                                              ref_row0=e * n)
                    used_var.add(p.path)
                continue
        if segs is None:
            if reason is None:
                reason = "absent in the variant"
                if cname == "lm_head" and "model.embed_tokens" in var and not _ties(variant):
                    reason += " (its config says tie_word_embeddings: false, so its embeddings do not stand in)"
            al.unmatched.append(Unmatched(label, rl.path, reason))
            continue
        if (split_stacks and not rl.quantized and rl.shape is not None and len(rl.shape) == 3 and rl.shape[1]
                and (_SWITCH_RE.match(rl.path) or _BARE_STACK_RE.match(rl.path))):
            # a stack of experts against a stack (or its split parts): each expert a row of its
            # own, as against experts stored one by one (which experts the quantization hurt); a
            # quantized reference's (a conversion verified) stays whole: measured in one pass
            n = int(rl.shape[1])
            for e in range(int(rl.shape[0])):
                name = stack_expert_row(rl.path, e)
                al.targets[name] = Target(name, rl.path, n, rk, _within(segs, e * n, (e + 1) * n), ref_row0=e * n)
        else:
            add_target(cname, rl, segs)
        used_var.update(s.var_layer for s in segs)

    if tied_ref_head is not None:
        vl = var["lm_head"]
        rr, rk = _flat_rows(tied_ref_head.shape)
        why = usable(vl, "lm_head")
        if why:
            al.unmatched.append(Unmatched(label, "lm_head", why + " (reference head tied to embed_tokens)"))
        elif vl.shape is None or _flat_rows(vl.shape) != (rr, rk):
            al.unmatched.append(Unmatched(label, "lm_head", "shape mismatch with the reference's tied embed_tokens"))
        else:
            al.targets["lm_head"] = Target("lm_head", tied_ref_head.path, rr, rk,
                                           [Segment((0, rr, 1), vl.path, (0, rr, 1))])
            used_var.add(vl.path)

    for cname, vl in var.items():
        if vl.path in used_var or not vl.quantized:
            continue
        if cname in ref and _comparable(ref[cname]):
            continue  # already reported from the reference side
        broken = ref.get(cname)
        if broken is not None and broken.problem:  # (it is there, but nothing can read it: said so)
            al.unmatched.append(Unmatched(label, vl.path, f"the reference's layer cannot be decoded: {broken.problem}"))
            continue
        al.unmatched.append(Unmatched(label, vl.path, "quantized in the variant but absent in the reference"))

    _find_smoothing(reference, variant, al, ref, var, interleaved)
    _find_multipliers(reference, variant, al)
    _find_norm_head(reference, variant, al)
    return al


# -- equivalent transformations -------------------------------------------------------------------

def _find_multipliers(reference: Model, variant: Model, al: Alignment) -> None:
    """Multipliers a converter folded into one side's weights and not the other's (Falcon-H1's
    muP multipliers in mlx-lm's conversion, which transformers applies at run time: :mod:`.mup`):
    each target's fold, so that the variant is measured with it divided out (or, where the
    reference holds them folded, multiplied in)."""
    if "falcon_h1" not in reference.ckpt.model_types() or "falcon_h1" not in variant.ckpt.model_types():
        return
    fr, fv = mup.falcon_folded(reference), mup.falcon_folded(variant)
    if fr is None or fv is None or fr == fv:
        return
    folded, plain = (variant, reference) if fv else (reference, variant)
    for t in al.targets.values():
        lay = plain.layers.get(t.ref_layer if plain is reference else t.var_layers[0])
        w = None if lay is None else lay.tensors.get("weight")
        dtype = w.dtype if w is not None and not lay.quantized else "BF16"
        got = mup.falcon_factors(folded, t.name, t.rows, dtype)
        if got is None:
            continue
        rows, what = got
        t.fold_rows = rows if folded is variant else 1.0 / rows
        t.fold = f"mup:{what}" if folded is variant else f"mup-in:{what}"


#: Models whose mlx-lm sanitize normalizes lm_head when converting (transformers normalizes it
#: at run time): model_type → the axis of the norms (0: each input column, Bailing's ``norm_head``;
#: -1: each output row, Baichuan-M1's), and the config flag that asks for it (None: always).
_NORM_HEAD = {"bailing_moe": (0, "norm_head"), "bailing_moe_linear": (0, "norm_head"), "baichuan_m1": (-1, None)}
_HEAD_NORMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def head_norms(model: Model, layer: Layer, axis: int) -> np.ndarray | None:
    """The norms of ``lm_head``'s columns (``axis`` 0) or rows (-1), in float64, read (a dense
    head) or decoded (a quantized one) in blocks of rows (a 150k-word head is 1.2 GB in bf16), once
    per model (the window aligns on every selection); None where it is no decodable matrix."""
    if not layer.shape or len(layer.shape) != 2 or not layer.decodable:
        return None
    held = _HEAD_NORMS.setdefault(model, {})
    key = (layer.path, axis)
    if key not in held:
        held[key] = _head_norms(model, layer, axis)
    return held[key]


def _head_norms(model: Model, layer: Layer, axis: int) -> np.ndarray | None:
    rows, cols = (int(x) for x in layer.shape)
    step = max(1, (1 << 22) // max(1, cols))
    if layer.scheme != "dense":  # (decoded in blocks of whole quantization granules)
        step = -(-step // 128) * 128
    acc = np.zeros(cols if axis == 0 else rows)
    for r0 in range(0, rows, step):
        b = head_rows(model, layer, min(rows, r0 + step), r0)
        if b is None:
            return None
        if axis == 0:
            acc += np.einsum("ij,ij->j", b, b)
        else:
            acc[r0:r0 + b.shape[0]] = np.einsum("ij,ij->i", b, b)
    return np.sqrt(acc)


#: Rows of lm_head sampled to tell whether one side's head is the other's normalized.
_HEAD_SAMPLE_ROWS = 256
#: A median factor between the two heads' first rows this far from 1 (in log scale, ~5%): one
#: of them is scaled (a quantization moves each column's or row's factor by well under 1%).
_HEAD_SCALED = 0.05


def head_rows(model: Model, layer: Layer, n: int, r0: int = 0) -> np.ndarray | None:
    """Rows ``[r0, n)`` of ``layer``, decoded (any scheme quantscope decodes in row blocks),
    float64; None where that cannot be done."""
    from .compare import (  # (the decoders live there; compare imports this module)
        _sliced,
        get_engine,
    )
    try:
        if layer.scheme == "dense":
            return np.asarray(model.ckpt.rows(layer.tensors["weight"].name, r0, n), np.float32).astype(np.float64)
        sl = _sliced(model, layer, r0, n)
        if sl is None or not layer.decodable:
            return None
        a = np.asarray(get_engine("numpy").dequantize(*sl), np.float32)
        return a.reshape(-1, a.shape[-1])[:n - r0].astype(np.float64)
    except (QuantscopeError, OSError, ValueError, KeyError, TypeError):
        return None


def rows_normalized(model: Model, layer: Layer) -> bool | None:
    """Whether ``layer``'s first rows (decoded) have norm 1, as mlx-lm's Baichuan-M1 conversion
    leaves its head (a quantization moves a row's norm by well under 1%); None where they cannot
    be read."""
    rows = head_rows(model, layer, _HEAD_SAMPLE_ROWS)
    if rows is None or not rows.size:
        return None
    norms = np.linalg.norm(rows, axis=1)
    ok = np.isfinite(norms) & (norms > 0)
    if not ok.any():
        return None
    return bool(np.median(np.abs(np.log(norms[ok]))) < 0.02)


def _row_factors(plain: np.ndarray, scaled: np.ndarray, axis: int) -> np.ndarray | None:
    """Per column (``axis`` 0) or row (-1), the least-squares factor c of ``scaled ≈ c·plain``."""
    if plain.shape != scaled.shape:
        return None
    sub = "ij,ij->j" if axis == 0 else "ij,ij->i"
    with np.errstate(all="ignore"):
        return np.einsum(sub, scaled, plain) / np.einsum(sub, plain, plain)


def _find_norm_head(reference: Model, variant: Model, al: Alignment) -> None:
    """lm_head normalized by mlx-lm's conversion on one side and not the other (Bailing's
    ``norm_head`` columns, Baichuan-M1's rows; transformers normalizes at run time): the variant
    measured as the reference's form, the unnormalized side's own norms ``‖·‖ + 1e-7`` (float32, as
    mlx-lm's sanitize computes them) multiplied back into a normalized variant
    (``norm-head:``), or divided out of an unnormalized one against a normalized reference
    (``norm-head-in:``). Told from the first rows of both heads (decoded): their factors far from 1
    and near the norms' — a head quantized as stored is measured as it is. The whole head's norms
    are read only then (once per model: the window aligns on every selection)."""
    kinds = set(reference.ckpt.model_types()) | set(variant.ckpt.model_types())
    rule = next((r for k, r in _NORM_HEAD.items() if k in kinds), None)
    t = al.targets.get("lm_head")
    if rule is None or t is None or t.ref_layer not in reference.layers or len(t.segments) != 1:
        return
    axis, flag = rule
    if flag is not None and not any((m.ckpt.configs.get("config.json") or {}).get(flag) for m in (reference, variant)):
        return
    vl = variant.layers.get(t.var_layers[0])
    rl = reference.layers[t.ref_layer]
    if vl is None or not rl.shape or len(rl.shape) != 2:
        return
    n = min(_HEAD_SAMPLE_ROWS, int(rl.shape[0]))
    r, v = head_rows(reference, rl, n), head_rows(variant, vl, n)
    c = None if r is None or v is None else _row_factors(r, v, axis)
    if c is None:
        return
    ok = np.isfinite(c) & (c > 0)
    if ok.sum() < max(1, c.size // 2) or np.median(np.abs(np.log(c[ok]))) < _HEAD_SCALED:
        return  # (the same scale on both sides: nothing to undo)
    # the plain side: the one whose factor to the other is 1 / its norms (a dense head, read whole)
    # (a dense side first: its norms are a read, a quantized head's a decode of the whole head)
    for plain, layer, sign in sorted(((reference, rl, 1.0), (variant, vl, -1.0)), key=lambda x: x[1].quantized):
        norms = head_norms(plain, layer, axis)
        if norms is None:
            continue
        f = (1.0 / (norms.astype(np.float32) + np.float32(1e-7))).astype(np.float64)
        want = (f if axis == 0 else f[:n]) ** sign
        if np.median(np.abs(np.log(c[ok] / want[ok]))) < _HEAD_SCALED:
            # variant = reference · f (normalized variant): divide it by f; variant = reference / f
            # (unnormalized variant against a normalized reference): multiply it by f
            g = f if sign > 0 else 1.0 / f
            if axis == 0:
                t.col_scale = g if t.col_scale is None else t.col_scale * g
            else:
                t.fold_rows = g if t.fold_rows is None else t.fold_rows * g
            which = "columns" if axis == 0 else "rows"
            label = f"norm-head:{which}" if sign > 0 else f"norm-head-in:{which}"
            t.fold = label if not t.fold else f"{t.fold}+{label}"
            return


def _norm_rules(layer_prefix: str, ref: dict[str, Layer]) -> list[tuple[str, set[str], tuple[str, ...]]]:
    """(norm path, consumer projection names, sub-module prefixes) of one decoder layer."""
    def has(n):
        return f"{layer_prefix}.{n}" in ref
    rules = []
    for n in ("input_layernorm", "self_attn_layer_norm", "ln_1", "attention_norm"):
        if has(n):
            rules.append((f"{layer_prefix}.{n}", _ATTN_IN, ("self_attn.", "attn.", "attention.", "self_attention.")))
            break
    mlp_norm = next((n for n in ("pre_feedforward_layernorm", "post_attention_layernorm", "final_layer_norm",
                                 "ln_2", "ffn_norm") if has(n)), None)
    if mlp_norm:
        rules.append((f"{layer_prefix}.{mlp_norm}", _MLP_IN, ("mlp.", "block_sparse_moe.", "feed_forward.", "")))
    return rules


#: Models whose RMSNorm multiplies by 1 + w, in transformers and in mlx-lm alike (AutoAWQ folds its
#: scales in as (1 + w) / s − 1).
_ONE_PLUS_W = {"gemma", "gemma2", "gemma3", "gemma3_text", "recurrent_gemma"}


def _norm_offset(model: Model) -> float | None:
    """What to add to ``model``'s stored norm weights for the multiplier its runtime applies: 1
    for Gemma 1–3 (:data:`_ONE_PLUS_W`) and where Qwen3.5's or Qwen3-Next's norms are stored as
    transformers stores them (its RMSNorm multiplies by 1 + w), 0 where mlx-lm's conversion of
    those added the 1 to them (its runtime multiplies by them as stored); None for other models
    (their norms are the multipliers). A Qwen file's form is told as mlx-lm's sanitize tells it:
    Qwen3.5's linear attention's conv1d as transformers stores it (``[C, 1, k]``), Qwen3-Next's
    experts one by one."""
    kind = set(model.ckpt.model_types())
    if kind & _ONE_PLUS_W:
        return 1.0
    if kind & {"qwen3_5", "qwen3_5_moe", "qwen3_5_text", "qwen3_5_moe_text"}:
        conv = [lay.tensors["weight"].shape for p, lay in model.layers.items()
                if p.endswith("conv1d") and "weight" in lay.tensors]
        return None if not conv else 1.0 if any(shape[-1] != 1 for shape in conv) else 0.0
    if "qwen3_next" in kind:
        if any(".mlp.experts.0." in p for p in model.layers):
            return 1.0
        return 0.0 if any(".switch_mlp." in p for p in model.layers) else None
    return None


def _find_smoothing(reference: Model, variant: Model, al: Alignment, ref: dict[str, Layer],
                    var: dict[str, Layer], interleaved: bool = False) -> None:
    by_prefix: dict[str, list[Target]] = {}
    for t in al.targets.values():
        m = _LAYER_RE.search(t.name)
        if m:
            by_prefix.setdefault(t.name[:m.end() - 1], []).append(t)
    # An unquantized reference is the unsmoothed side: the variant's smoothing is undone ("norm").
    # A quantized one (an AWQ checkpoint as reference) may be the smoothed side itself: the
    # variant is then brought to the reference's norms ("match"), nothing "undone".
    kind = "match" if any(lay.quantized for lay in reference.layers.values()) else "norm"
    # the multipliers the norms apply (Gemma: 1 + w on both sides; Qwen3.5 / Qwen3-Next: 1 + w
    # where stored as transformers stores them, w in mlx-lm's conversion): s is their ratio
    off_r, off_v = _norm_offset(reference), _norm_offset(variant)
    shift = off_r is not None and off_v is not None and (off_r or off_v)
    for prefix in sorted(by_prefix, key=natural_key):
        cprefix = canonical(prefix)
        for norm, consumers, subs in _norm_rules(cprefix, ref):
            rn, vn = ref.get(norm), var.get(norm)
            if rn is None or vn is None:
                continue
            a, b = _norm_vector(reference, rn), _norm_vector(variant, vn)
            if a is None or b is None or a.shape != b.shape:
                continue
            if shift:
                a, b = a + off_r, b + off_v
                if off_r != off_v:
                    al.norms_plus_one.append(rn.path)
            # (plus the coarser storage's smallest step: a weight of 1e-7 is an fp16 subnormal,
            # stored 19% off, and was taken for smoothing of the whole norm)
            floor = max(_smallest_step(rn), _smallest_step(vn))
            if np.all(np.abs(a - b) <= NORM_TOLERANCE * np.abs(a) + floor):
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                s = np.where((b != 0) & (a != 0), a / b, 1.0)
            al.folded_norms[rn.path] = s
            al.shows_folding = True
            for t in by_prefix.get(prefix, []):
                rel = canonical(t.name)[len(cprefix) + 1:]
                if proj_of(rel) in consumers and any(rel.startswith(p) for p in subs) and t.cols == s.size:
                    t.col_scale = s
                    t.smoothing = f"{kind}:{rn.path}"
    if not al.shows_folding:
        return
    # Folding into a preceding Linear (v -> o, up -> down): estimated from rows in the sweep. A
    # fused gate_up_proj (Phi-3) takes it in its up half, its last rows, as AutoAWQ folds it
    # there; gpt-oss's interleaved rows are left alone.
    for t in al.targets.values():
        proj = proj_of(t.name)
        prev = PRECEDING.get(proj)
        if prev is None:
            continue
        pt = al.targets.get(t.name[:-len(proj)] + prev)
        row0 = 0
        if pt is None and proj == "down_proj" and not interleaved:
            pt = al.targets.get(t.name[:-len(proj)] + "gate_up_proj")
            row0 = t.cols
        if pt is None or pt.rows != row0 + t.cols or pt.row_fit_for is not None:
            continue
        pt.row_fit_for = t.name
        pt.fit_row0 = row0
        t.col_fit_from = pt.name
