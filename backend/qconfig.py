"""Quantization configs of every format, resolved to the effective settings of each layer.

Each resolution says where its values came from ("per-layer override `…`", "default 4 bit / 64",
"`language_model.` prefix stripped"), so the window's config panel can show the rule that
produced a layer's settings — the question people debugging a mixed-precision checkpoint ask.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

from .formats.mlx import MODE_DEFAULTS

_MLX_RESERVED = {"group_size", "bits", "mode", "quant_method", "quantize_activations"}
_STRIP_SUFFIXES = (".weight", ".scales", ".biases")


@dataclass
class Effective:
    """A layer's effective quantization settings and the rule that produced them.

    ``quantized`` is True/False when the config decides, None when it does not say (then the
    tensors decide). ``settings`` holds the format's other knobs (sym, desc_act, version, …).
    """

    quantized: bool | None = None
    bits: int | None = None
    group_size: int | None = None
    mode: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    source: str = "no quantization config"


@dataclass
class QuantConfig:
    """The quantization config found next to a checkpoint.

    Attributes
    ----------
    kind
        ``mlx``, ``mlx-native``, ``gptq``, ``awq``, ``compressed-tensors``, ``fp8``,
        ``bitsandbytes``, another ``quant_method`` string, or None.
    file
        Config file (and key) it was read from, e.g. ``config.json["quantization"]``.
    raw
        The quantization block as stored.
    globals
        The global settings (for display).
    overrides
        Per-layer overrides as ``(key, value)`` pairs, in file order.
    notes
        Things a person should know (keys missing and what was assumed, mirrors, …).
    bad_values
        ``(message, usable)`` per bits / group size value not written as an integer — usable ones
        (``"4"``, ``4.0``) were read as the number, the others (``0``, ``"x"``) ignored — and for
        a ``quantization_config`` that is not an object (ignored).
    odd_values
        Messages for settings read one way here that loaders read otherwise or fail on: a flag
        written as a string, a GPTQ ``checkpoint_format`` or AWQ ``version`` no loader knows.
    """

    kind: str | None = None
    file: str | None = None
    raw: dict = field(default_factory=dict)
    globals: dict = field(default_factory=dict)
    overrides: list[tuple[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bad_values: list = field(default_factory=list)
    odd_values: list[str] = field(default_factory=list)
    #: Settings config.json's quantization_config and quantize_config.json give differently:
    #: ``"bits 4 against 8"`` (config.json's first, the one used).
    conflicts: list[str] = field(default_factory=list)
    #: config.json describes a multimodal model (``text_config``/``vision_config``): its per-layer
    #: keys may carry the `language_model.` prefixes loaders map between; a text model's may not.
    multimodal: bool = False

    def effective(self, path: str) -> Effective:
        """Effective settings for the module at ``path`` (the path as stored in the checkpoint)."""
        fn = _RESOLVERS.get(self.kind)
        if fn is None:
            return Effective(source="no quantization config" if self.kind is None else
                             f"{self.file}: quant_method {self.kind!r} (settings read from the tensors)")
        return fn(self, path)


# -- parsing -----------------------------------------------------------------------------------

def parse_configs(configs: dict[str, dict]) -> QuantConfig:
    """Find and parse the quantization config among a checkpoint's JSON files."""
    out = _parse_configs(configs)
    cfg = configs.get("config.json") or {}
    out.multimodal = isinstance(cfg, dict) and any(isinstance(cfg.get(k), dict) for k in ("text_config", "vision_config"))
    return out


#: Keys only GPTQ's config has / only AWQ's: a quantization_config without quant_method is read
#: by them (it was taken for MLX's, whose block also has bits and group_size).
_GPTQ_KEYS = ("desc_act", "sym", "checkpoint_format", "damp_percent", "static_groups", "true_sequential",
              "pack_dtype", "act_group_aware")
#: checkpoint_format values of GPTQ loaders (GPTQModel's FORMAT, optimum, AutoGPTQ).
_GPTQ_FORMATS = ("gptq", "gptq_v2", "marlin", "bitblas", "qqq", "ipex")
#: AutoAWQ's versions (quantization_config "version", case-insensitive).
_AWQ_VERSIONS = ("gemm", "gemv", "gemv_fast", "marlin", "exllama", "ipex")
_AWQ_KEYS = ("zero_point", "version", "w_bit", "q_group_size", "modules_to_not_convert")


def _parse_configs(configs: dict[str, dict]) -> QuantConfig:
    out = _parse_found(configs)
    cfg = configs.get("config.json") or {}
    qc = cfg.get("quantization_config")
    if qc is not None and not isinstance(qc, dict):  # a list or a string: loaders index it and fail
        out.notes.append(f'config.json["quantization_config"] is a {type(qc).__name__}, not an object: ignored '
                         "(loaders fail on it)")
        out.bad_values.append((out.notes[-1], False))
    return out


def _parse_found(configs: dict[str, dict]) -> QuantConfig:
    cfg = configs.get("config.json") or {}
    qc = cfg.get("quantization_config")
    if qc is None and isinstance(cfg.get("text_config"), dict):
        qc = cfg["text_config"].get("quantization_config")  # VLM layout (formats.md §1.5)
    if isinstance(cfg.get("quantization"), dict):
        out = _parse_mlx(cfg["quantization"], 'config.json["quantization"]')
        if isinstance(qc, dict):
            out.notes.append('config.json also has "quantization_config"'
                             + (" (an identical mirror, as mlx-lm writes)" if qc == cfg["quantization"]
                                else " that DIFFERS from \"quantization\"; MLX loaders use \"quantization\""))
        return out
    qcj = configs.get("quantization_config.json")
    if isinstance(qcj, dict) and ("per_tensor" in qcj or "quant_method" not in qcj):
        return _parse_mlx_native(qcj)
    if isinstance(qc, dict):
        method = str(qc.get("quant_method", "")).lower()
        guessed = ""
        if not method:
            gk, ak = [k for k in _GPTQ_KEYS if k in qc], [k for k in _AWQ_KEYS if k in qc]
            if gk or ak:
                method = "gptq" if len(gk) >= len(ak) else "awq"
                guessed = (f'config.json["quantization_config"] has no quant_method; read as {method} from its keys '
                           f"({', '.join(gk or ak)})")
            elif "bits" in qc and "group_size" in qc:
                return _parse_mlx(qc, 'config.json["quantization_config"]')
        parsed = _parse_method(method, qc, 'config.json["quantization_config"]')
        if parsed is not None and guessed:
            parsed.notes.append(guessed)
        if parsed is not None:
            other = configs.get("quantize_config.json")
            if isinstance(other, dict):
                keys = ("bits", "group_size", "sym", "desc_act", "checkpoint_format")
                diff = [k for k in keys if k in other and k in qc and other[k] != qc[k]]
                if diff:
                    parsed.notes.append("quantize_config.json disagrees with config.json on "
                                        + ", ".join(diff) + "; config.json's block is used (as transformers does)")
                    parsed.conflicts = [f"{k} {qc[k]!r} against {other[k]!r}" for k in diff]
            return parsed
    hq = configs.get("hf_quant_config.json")  # NVIDIA ModelOpt's own export (older ones: only this)
    if isinstance(hq, dict) and isinstance(hq.get("quantization"), dict):
        return _parse_modelopt(hq["quantization"], 'hf_quant_config.json["quantization"]')
    for name in ("quantize_config.json", "quant_config.json"):
        q = configs.get(name)
        if isinstance(q, dict):
            method = str(q.get("quant_method", "")).lower()
            if not method:
                awq_keys = {"w_bit", "q_group_size", "zero_point", "version"}
                method = "awq" if (name == "quant_config.json" and awq_keys & q.keys()
                                   and "desc_act" not in q) else "gptq"
            parsed = _parse_method(method, q, name)
            if parsed is not None:
                return parsed
    return QuantConfig()


def _parse_method(method: str, qc: dict, where: str) -> QuantConfig | None:
    if method in ("gptq", "gptq_v2"):
        return _parse_gptq(qc, where)
    if method == "awq":
        return _parse_awq(qc, where)
    if method == "compressed-tensors":
        return _parse_ct(qc, where)
    if method == "fp8":
        return _parse_fp8(qc, where)
    if method == "bitsandbytes":
        return _parse_bnb(qc, where)
    if method == "modelopt":
        return _parse_modelopt(qc, where)
    if method:
        return QuantConfig(kind=method, file=where, raw=qc, globals=dict(qc))
    return None


def _parse_mlx(q: dict, where: str) -> QuantConfig:
    out = QuantConfig(kind="mlx", file=where, raw=q)
    mode = q.get("mode", "affine")
    out.globals = {"bits": _number(out, q, "bits"), "group_size": _number(out, q, "group_size"), "mode": mode}
    if "mode" not in q:
        out.notes.append('no "mode": affine assumed (files written before mlx-lm added modes)')
    for key in ("bits", "group_size"):
        if key not in q:
            out.notes.append(f'top-level "{key}" missing: MLX loaders index it directly and fail')
    out.overrides = []
    for k, v in q.items():
        if k in _MLX_RESERVED:
            continue
        if isinstance(v, dict):  # a layer's own settings: the same reading as the globals'
            v = dict(v)
            for key in ("bits", "group_size"):
                if key in v:
                    v[key] = _setting(out, key, v[key], f"[{k!r}]")
                    if v[key] is None:
                        del v[key]
        out.overrides.append((k, v))
    return out


def _parse_mlx_native(q: dict) -> QuantConfig:
    out = QuantConfig(kind="mlx-native", file="quantization_config.json", raw=q)
    out.globals = {"bits": q.get("bits", 4), "group_size": q.get("group_size", 64), "mode": q.get("mode", "affine")}
    per = q.get("per_tensor") or {}
    out.overrides = list(per.items()) if isinstance(per, dict) else []
    return out


def _first(d: dict, *keys, default=None):
    for k in keys:
        if k in d:
            return d[k]
    return default


def _number(out: QuantConfig, q: dict, *keys: str):
    """The first of ``keys`` in ``q`` as an int (see :func:`_setting`)."""
    return _setting(out, keys[0], _first(q, *keys))


def _setting(out: QuantConfig, name: str, v, where: str = ""):
    """A bits / group size value as an int: a number written as a string ("4") or as a whole
    float (4.0) is read as one, with a note (comparing "4" with 4 made a 4-bit file contradict its
    own 4-bit zeros; 64.0 reached the kernels as a float and crashed them). A value no loader could
    use (0 bits, "x", 4.5, a group of -2) is dropped with a note: the tensors' shapes decide."""
    if v is None:
        return None
    at = f"{out.file}: {where + ' ' if where else ''}{name}"
    got, how = v, None
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        got, how = int(v), "the string"
    elif isinstance(v, float) and v.is_integer():
        got, how = int(v), "written as"
    bits = name in ("bits", "w_bit", "wbits", "num_bits")
    if isinstance(got, bool) or not isinstance(got, int) or (bits and not 1 <= got <= 16) or (
            not bits and not -1 <= got <= 1 << 24):  # no layer has a row of 16M inputs
        out.notes.append(f"{at} is {v!r}, which no loader can use: ignored (the tensors' shapes decide)")
        out.bad_values.append((out.notes[-1], False))
        return None
    if how == "the string":
        out.notes.append(f'{at} is the string "{v}", read as {got} (loaders expect a number and may fail on it)')
        out.bad_values.append((out.notes[-1], True))
    elif how:
        out.notes.append(f"{at} is {v!r}, read as {got} (loaders expect an integer and may fail on it)")
        out.bad_values.append((out.notes[-1], True))
    return got


def _parse_gptq(q: dict, where: str) -> QuantConfig:
    out = QuantConfig(kind="gptq", file=where, raw=q)
    fmt = _first(q, "checkpoint_format", "format", "version")
    if str(q.get("quant_method", "")).lower() == "gptq_v2" and fmt is None:
        fmt = "gptq_v2"
    missing = [k for k in ("sym", "checkpoint_format", "quant_method") if k not in q]
    if missing:
        out.notes.append(f"GPTQ config lacks {', '.join(missing)}: loaders assume "
                         "sym=true and checkpoint_format=gptq (v1), as GPTQModel does (R4)")
    if q.get("is_marlin_format"):
        fmt = "marlin"
    for key in ("bits", "group_size"):
        if key in q and q[key] is None:  # (compressed-tensors' null group_size means "by channel"; GPTQ's none)
            out.notes.append(f"{where}: {key} is null, which no GPTQ loader can use: ignored (the tensors' shapes "
                             "decide)")
            out.bad_values.append((out.notes[-1], False))
    if fmt is not None and str(fmt).lower() not in _GPTQ_FORMATS:
        out.notes.append(f"{where}: checkpoint_format {fmt!r} is none GPTQ loaders know ({', '.join(_GPTQ_FORMATS)}): "
                         "read as 'gptq' (v1), which the zero points are checked against")
        out.odd_values.append(out.notes[-1])
        fmt = "gptq"
    out.globals = {
        "bits": _number(out, q, "bits", "w_bit", "wbits"),
        "group_size": _number(out, q, "group_size", "q_group_size"),
        "sym": _flag(out, q, "sym", where, default=True),
        "desc_act": bool(q.get("desc_act", False)),
        "static_groups": bool(q.get("static_groups", False)),
        "checkpoint_format": fmt or "gptq",
        "pack_dtype": q.get("pack_dtype", "int32"),
        "lm_head": bool(q.get("lm_head", False)),
    }
    dyn = q.get("dynamic")
    if isinstance(dyn, dict):
        out.overrides = list(dyn.items())
    return out


def _flag(out: QuantConfig, q: dict, key: str, where: str, default: bool) -> bool:
    """A boolean setting; the strings "true"/"false" read as such and said (truthy, "false" was
    read as true)."""
    v = q.get(key, default)
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        got = v.strip().lower() == "true"
        out.notes.append(f'{where}: {key} is the string "{v}", read as {got} (loaders expect true/false and may '
                         "read any string as true)")
        out.odd_values.append(out.notes[-1])
        return got
    return v


def _parse_awq(q: dict, where: str) -> QuantConfig:
    out = QuantConfig(kind="awq", file=where, raw=q)
    version = str(_first(q, "version", default="gemm")).lower()
    if version not in _AWQ_VERSIONS:
        out.notes.append(f"{where}: version {version!r} is none AutoAWQ knows ({', '.join(_AWQ_VERSIONS)}): "
                         "the tensors' shapes decide the layout")
        out.odd_values.append(out.notes[-1])
    out.globals = {"bits": _number(out, q, "bits", "w_bit"), "group_size": _number(out, q, "group_size", "q_group_size"),
                   "zero_point": _flag(out, q, "zero_point", where, default=True), "version": version,
                   "modules_to_not_convert": q.get("modules_to_not_convert")}
    if "w_bit" in q and "bits" not in q:
        out.notes.append(f"{where} uses AutoAWQ's own keys (w_bit/q_group_size); transformers reads "
                         "config.json quantization_config with bits/group_size (R7)")
    return out


def _parse_ct(q: dict, where: str) -> QuantConfig:
    out = QuantConfig(kind="compressed-tensors", file=where, raw=q)
    out.globals = {"format": q.get("format"), "version": q.get("version"),
                   "quantization_status": q.get("quantization_status"), "ignore": q.get("ignore") or []}
    groups = q.get("config_groups") or {}
    out.overrides = []
    for name, grp in (groups.items() if isinstance(groups, dict) else ()):
        w = grp.get("weights") if isinstance(grp, dict) else None
        if isinstance(w, dict) and any(k in w for k in ("num_bits", "group_size")):
            w = dict(w)  # the same reading of its numbers as the other formats' (see _setting)
            for key in ("num_bits", "group_size"):
                if w.get(key) is not None:
                    w[key] = _setting(out, key, w[key], f"config_groups[{name!r}].weights")
            grp = {**grp, "weights": w}
        out.overrides.append((name, grp))
    return out


def _parse_fp8(q: dict, where: str) -> QuantConfig:
    out = QuantConfig(kind="fp8", file=where, raw=q)
    out.globals = {"fmt": q.get("fmt", "e4m3"), "weight_block_size": q.get("weight_block_size"),
                   "activation_scheme": q.get("activation_scheme"), "scale_fmt": q.get("scale_fmt"),
                   "modules_to_not_convert": q.get("modules_to_not_convert")}
    return out


def _parse_modelopt(q: dict, where: str) -> QuantConfig:
    """NVIDIA ModelOpt's export (``quant_method: "modelopt"``, or ``hf_quant_config.json``):
    ``quant_algo`` (NVFP4, FP8, …), ``group_size`` and the ``exclude_modules`` left unquantized
    (wildcard patterns)."""
    out = QuantConfig(kind="modelopt", file=where, raw=q)
    algo = q.get("quant_algo")
    out.globals = {"quant_algo": str(algo).upper() if isinstance(algo, str) else None,
                   "group_size": _number(out, q, "group_size") if "group_size" in q else None,
                   # (hf_quant_config.json says exclude_modules; config.json, as ModelOpt writes it, ignore)
                   "exclude_modules": _names(q.get("exclude_modules")) + _names(q.get("ignore"))}
    return out


def _resolve_modelopt(cfg: QuantConfig, path: str) -> Effective:
    g = cfg.globals
    for pat in g["exclude_modules"]:
        if fnmatch.fnmatchcase(path, pat) or path == pat:  # (ModelOpt and vLLM match wildcards)
            return Effective(quantized=False, source=f"exclude_modules `{pat}` ({cfg.file})")
    algo = g["quant_algo"]
    bits = {"NVFP4": 4, "FP8": 8}.get(algo or "")
    group = g["group_size"] if algo == "NVFP4" else None
    return Effective(quantized=None, bits=bits, group_size=group, settings={"quant_algo": algo},
                     source=f"{cfg.file}: ModelOpt {algo or 'quant_algo missing'}"
                            + (f", group {group}" if group else ""))


def _parse_bnb(q: dict, where: str) -> QuantConfig:
    out = QuantConfig(kind="bitsandbytes", file=where, raw=q)
    out.globals = {"load_in_4bit": q.get("load_in_4bit"), "load_in_8bit": q.get("load_in_8bit"),
                   "bnb_4bit_quant_type": q.get("bnb_4bit_quant_type"),
                   "bnb_4bit_use_double_quant": q.get("bnb_4bit_use_double_quant"),
                   "bnb_4bit_compute_dtype": q.get("bnb_4bit_compute_dtype"),
                   "llm_int8_skip_modules": q.get("llm_int8_skip_modules")}
    return out


# -- resolution --------------------------------------------------------------------------------

def _prefix_variants(path: str, multimodal: bool = True):
    """The paths a per-layer key may use for ``path``, with the rule that maps them: the path
    itself, and for a multimodal model the `language_model.` prefixes its loaders map (mlx-lm
    looks a text model's keys up by the module path alone: another key is ignored)."""
    yield path, None
    if not multimodal:
        return
    if path.startswith("language_model."):
        yield path[len("language_model."):], "`language_model.` prefix stripped"
    if path.startswith("model.language_model."):
        yield "language_model.model." + path[len("model.language_model."):], \
            "`model.language_model.` read as `language_model.model.`"
    if not path.startswith("language_model."):
        yield "language_model." + path, "`language_model.` prefix added"


def _mlx_entry(cfg: QuantConfig, key: str, value, rule: str | None) -> Effective:
    how = f"per-layer override `{key}`" + (f" ({rule})" if rule else "")
    if value is False:
        return Effective(quantized=False, source=f"{how}: false (not quantized)")
    if value is True:
        g = cfg.globals
        return Effective(quantized=True, bits=g["bits"], group_size=g["group_size"], mode=g["mode"],
                         source=f"{how}: true (global settings)")
    if not isinstance(value, dict):
        return Effective(source=f"{how}: unreadable value {value!r}")
    mode = value.get("mode", "affine")
    dbits, dgroup = MODE_DEFAULTS.get(mode, (None, None))
    defaulted = [k for k in ("bits", "group_size") if k not in value]
    src = how
    if defaulted:
        # Missing keys fall back to the mode's defaults, not to the global values (formats.md §1.5).
        src += "; " + ", ".join(f"{k}: {mode} default" for k in defaulted)
    return Effective(quantized=True, bits=value.get("bits", dbits), group_size=value.get("group_size", dgroup),
                     mode=mode, source=src)


def _resolve_mlx(cfg: QuantConfig, path: str) -> Effective:
    entries = dict(cfg.overrides)
    for key, rule in _prefix_variants(path, cfg.multimodal):
        if key in entries:
            return _mlx_entry(cfg, key, entries[key], rule)
    g = cfg.globals
    return Effective(quantized=None, bits=g["bits"], group_size=g["group_size"], mode=g["mode"],
                     source=f"global {g['bits']} bit / {g['group_size']} {g['mode']} ({cfg.file}); "
                            "quantized if `.scales` is stored")


def _resolve_mlx_native(cfg: QuantConfig, path: str) -> Effective:
    entries = dict(cfg.overrides)
    # Matching order of seed mlx_native: exact tensor name, name without .weight/.scales/.biases,
    # then without and with a `language_model.` prefix; else the defaults.
    tried = [(path + ".weight", "exact tensor name"), (path, "name without .weight/.scales/.biases")]
    if path.startswith("language_model."):
        tried.append((path[len("language_model."):], "`language_model.` prefix stripped"))
    else:
        tried.append(("language_model." + path, "`language_model.` prefix added"))
    for key, rule in tried:
        if key in entries:
            v = entries[key]
            if v is False:
                return Effective(quantized=False, source=f"per_tensor `{key}` ({rule}): false")
            if isinstance(v, dict):
                return Effective(quantized=True, bits=v.get("bits", cfg.globals["bits"]),
                                 group_size=v.get("group_size", cfg.globals["group_size"]),
                                 mode=v.get("mode", cfg.globals["mode"]), source=f"per_tensor `{key}` ({rule})")
    g = cfg.globals
    src = "default 4 bit / 64" if (g["bits"], g["group_size"]) == (4, 64) and "bits" not in cfg.raw \
        else f"global {g['bits']} bit / {g['group_size']} (quantization_config.json)"
    return Effective(quantized=None, bits=g["bits"], group_size=g["group_size"], mode=g["mode"], source=src)


def gptq_pattern(pattern: str) -> tuple[bool, str]:
    """GPTQModel's ``dynamic`` key: (whether it marks modules not quantized, its regex)."""
    return pattern.startswith("-:"), pattern[2:] if pattern[:2] in ("-:", "+:") else pattern


def _bits_group(g: dict) -> str:
    """``"4 bit, group 128"`` of global settings; a value the config lacks or gives unusably
    (ignored, the shapes decide) as such, not "None bit"."""
    bits = f"{g['bits']} bit" if g.get("bits") is not None else "bits from the shapes"
    group = f"group {g['group_size']}" if g.get("group_size") is not None else "group from the shapes"
    return f"{bits}, {group}"


def _resolve_gptq(cfg: QuantConfig, path: str) -> Effective:
    g = cfg.globals
    fmt = str(g["checkpoint_format"]).lower()
    settings = {"sym": g["sym"], "desc_act": g["desc_act"], "static_groups": g["static_groups"],
                "checkpoint_format": fmt, "version": 2 if fmt == "gptq_v2" else 1, "pack_dtype": g["pack_dtype"]}
    eff = Effective(quantized=None, bits=g["bits"], group_size=g["group_size"], settings=settings,
                    source=f"{cfg.file}: {_bits_group(g)}, sym={g['sym']}, desc_act={g['desc_act']}, format {fmt}")
    for pattern, value in cfg.overrides:
        neg, rx = gptq_pattern(pattern)
        try:
            hit = re.match(rx, path) is not None  # (GPTQModel's dynamic_get: anchored at the start)
        except re.error:
            continue
        if not hit:
            continue
        if neg:
            return Effective(quantized=False, settings=settings, source=f"dynamic `{pattern}`: not quantized")
        if isinstance(value, dict):
            eff.bits = value.get("bits", eff.bits)
            eff.group_size = value.get("group_size", eff.group_size)
            for k in ("sym", "desc_act"):
                if k in value:
                    settings[k] = value[k]
            eff.source = f"dynamic override `{pattern}` ({cfg.file})"
        break
    return eff


def _names(v) -> list[str]:
    """A config's list of module names (modules_to_not_convert), its strings only: a malformed
    entry (a number) matches nothing instead of failing the lookup of every layer."""
    return [x for x in v if isinstance(x, str)] if isinstance(v, (list, tuple)) else []


def _resolve_awq(cfg: QuantConfig, path: str) -> Effective:
    g = cfg.globals
    for key in _names(g.get("modules_to_not_convert")):
        if key in path:  # AutoAWQ matches by substring
            return Effective(quantized=False, source=f"modules_to_not_convert contains `{key}`")
    return Effective(quantized=None, bits=g["bits"], group_size=g["group_size"],
                     settings={"zero_point": g["zero_point"], "version": g["version"]},
                     source=f"{cfg.file}: {_bits_group(g)}, version {g['version']}, zero_point={g['zero_point']}")


def _is_class_target(t: str) -> bool:
    return "." not in t and t[:1].isupper() and not t.startswith("re:")


#: Last segments of the modules transformers makes nn.Embedding (the rest with a 2-D weight:
#: nn.Linear), for compressed-tensors' class targets.
_EMBEDDING_NAMES = ("embed_tokens", "wte", "wpe", "word_embeddings", "embeddings", "embed_in", "tok_embeddings",
                    "shared", "embed_positions", "position_embeddings", "token_type_embeddings",
                    "embed_tokens_per_layer")


def ct_module_class(path: str) -> str:
    """The module class a compressed-tensors class target would have to name for ``path``."""
    return "Embedding" if path.rsplit(".", 1)[-1] in _EMBEDDING_NAMES else "Linear"


def _ct_matches(target: str, path: str) -> bool:
    if target.startswith("re:"):
        try:
            return re.match(target[3:], path) is not None
        except re.error:
            return False
    if "." not in target and target[:1].isupper():
        return True  # a module class name such as "Linear": the tensors decide
    return path == target or path.endswith("." + target)


def _resolve_ct(cfg: QuantConfig, path: str) -> Effective:
    for pat in cfg.globals.get("ignore") or []:
        if isinstance(pat, str) and not (pat[:1].isupper() and "." not in pat) and _ct_matches(pat, path):
            return Effective(quantized=False, source=f"ignore `{pat}` ({cfg.file})")
    # compressed-tensors' apply: each target string names one group (a later group's same
    # target replaces it), and of the targets a module matches the first wins (match_targets):
    # names before classes, targets sorted by (regex or not, the string itself), so exact names
    # before regexes and each kind in alphabetical order, not the config's; a class target
    # matches the module's own class, which the checkpoint does not store: a 2-D weight is a
    # Linear's, an embedding table an Embedding's (another class reaching it is kept last, and
    # the doctor says it: ct.targets)
    by_target: dict[str, tuple[str, dict]] = {}
    for gname, group in cfg.overrides:
        if isinstance(group, dict):
            for t in group.get("targets") or []:
                if isinstance(t, str):
                    by_target[t] = (gname, group)
    own = ct_module_class(path)

    def rank(t: str) -> int:  # (a subclass of Linear after Linear itself: compressed-tensors matches ancestry)
        if _is_class_target(t):
            return 2 if t == own else 3 if own == "Linear" and t.endswith("Linear") else 4
        return 0 if not t.startswith("re:") else 1
    ranked = sorted((rank(t), "re:" in t, t) for t in by_target if _ct_matches(t, path))
    for r, _, hit in ranked[:1]:
        gname, group = by_target[hit]
        w = group.get("weights") or {}
        fmt = group.get("format") or cfg.globals.get("format")
        acts = group.get("input_activations")
        settings = {"type": w.get("type"), "symmetric": w.get("symmetric"), "strategy": w.get("strategy"),
                    "block_structure": w.get("block_structure"), "actorder": w.get("actorder"),
                    "format": fmt, "version": cfg.globals.get("version"),
                    # activations quantized with calibrated scales stored beside the weights
                    # (NVFP4's "local": a stored global scale, per-group ones at run time)
                    "input_dynamic": acts.get("dynamic", True) if isinstance(acts, dict) else None}
        if r == 4:  # reached only through a module class it is not (loaders give it no scheme)
            settings["class_target"] = hit
        return Effective(quantized=None, bits=w.get("num_bits"), group_size=w.get("group_size"),
                         settings=settings,
                         source=f"config_groups.{gname} (target `{hit}`), format {fmt}, "
                                f"compressed-tensors {cfg.globals.get('version')}")
    return Effective(quantized=False, source="matches no config_groups target")


def _resolve_fp8(cfg: QuantConfig, path: str) -> Effective:
    g = cfg.globals
    for key in _names(g.get("modules_to_not_convert")):
        if key in path:
            return Effective(quantized=False, source=f"modules_to_not_convert contains `{key}`")
    bs = g.get("weight_block_size")
    return Effective(quantized=None, bits=8, settings={"weight_block_size": bs, "fmt": g.get("fmt"),
                                                       "activation_scheme": g.get("activation_scheme")},
                     source=f"{cfg.file}: fp8 {g.get('fmt')}, weight_block_size {bs}")


def _resolve_bnb(cfg: QuantConfig, path: str) -> Effective:
    g = cfg.globals
    for key in g.get("llm_int8_skip_modules") or []:
        if key in path:
            return Effective(quantized=False, source=f"llm_int8_skip_modules contains `{key}`")
    bits = 4 if g.get("load_in_4bit") else 8 if g.get("load_in_8bit") else None
    return Effective(quantized=None, bits=bits, settings=dict(g),
                     source=f"{cfg.file}: bitsandbytes {bits}-bit; per-layer state from the quant_state tensor")


_RESOLVERS = {"mlx": _resolve_mlx, "mlx-native": _resolve_mlx_native, "gptq": _resolve_gptq,
              "awq": _resolve_awq, "compressed-tensors": _resolve_ct, "fp8": _resolve_fp8,
              "bitsandbytes": _resolve_bnb, "modelopt": _resolve_modelopt}
