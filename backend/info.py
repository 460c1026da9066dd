"""What ``quantscope info`` reports: files, dtypes, tensors and modules of a checkpoint."""

from __future__ import annotations

from collections import defaultdict

from .checkpoint import Checkpoint
from .schemes import analyze


def _decide_act_order(model) -> None:
    """Fill each GPTQ layer's ``act_order`` setting (left None by the analysis, which reads no
    data) from its g_idx: a permutation other than ``k // G`` is act-order. g_idx is K int32 per
    layer, the only data ``info`` reads; one that cannot be read leaves it None."""
    from .errors import QuantscopeError
    from .formats.gptq import is_trivial_g_idx
    for layer in model.layers.values():
        if layer.scheme != "gptq" or layer.settings.get("act_order") is not None or layer.problem:
            continue
        g_idx = layer.tensors.get("g_idx")
        try:
            gi = None if g_idx is None else model.ckpt.tensor(g_idx.name)
        except (QuantscopeError, OSError, ValueError):
            continue
        k = layer.shape[-1]
        g = k if layer.group_size in (-1, 0, None) else layer.group_size
        layer.settings["act_order"] = not is_trivial_g_idx(gi, k, g)


def checkpoint_summary(ckpt: Checkpoint) -> dict:
    """Plain-data description of a checkpoint (everything ``info --json`` prints).

    Returns
    -------
    dict
        ``path``, ``files`` (name, size, tensors, metadata), ``tensor_count``, ``total_bytes``,
        ``dtypes`` (bytes and element count per dtype), ``tensors`` (name, dtype, shape, bytes,
        file, byte range), ``modules`` (path → component names), ``notes``, ``warnings``,
        ``configs`` (file names found), ``unsupported`` (pickles not opened), ``layers`` (one
        object per module: ``name``, ``scheme``, ``bits``, ``group_size``, ``shape`` (logical),
        ``dtype``, ``bits_per_weight``, ``source``, ``problem``…), ``quantization`` (the parsed
        config: kind, file, globals, overrides, notes).
    """
    model = analyze(ckpt)
    cfg = model.config
    _decide_act_order(model)
    per_dtype: dict[str, dict[str, int]] = defaultdict(lambda: {"bytes": 0, "params": 0, "tensors": 0})
    tensors = []
    for name in ckpt.names:
        t = ckpt.info(name)
        d = per_dtype[t.dtype]
        d["bytes"] += t.nbytes
        d["params"] += t.numel
        d["tensors"] += 1
        tensors.append({"name": name, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.nbytes,
                        "file": t.file.name, "byte_range": [t.start, t.end]})
    files = [{"name": f.path.name, "path": str(f.path), "size": f.size, "tensors": len(f),
              "header_bytes": f.header_len, "metadata": f.metadata} for f in ckpt.files]
    return {
        "path": ckpt.source,
        "root": str(ckpt.root),
        "files": files,
        "tensor_count": len(tensors),
        "total_bytes": sum(t["bytes"] for t in tensors),
        "dtypes": dict(sorted(per_dtype.items())),
        "tensors": tensors,
        "modules": {m.path: sorted(m.tensors) for m in ckpt.modules().values()},
        "configs": sorted(ckpt.configs),
        "index": str(ckpt.index_path) if ckpt.index_path else None,
        "notes": list(ckpt.notes),
        "warnings": list(ckpt.warnings),
        "unsupported": [str(p) for p in ckpt.unsupported],
        "quantization": {"kind": cfg.kind, "file": cfg.file, "globals": cfg.globals,
                         "overrides": [[k, v] for k, v in cfg.overrides], "notes": cfg.notes},
        "schemes": model.schemes,
        "layers": [layer.summary() for layer in model.layers.values()],
        "logical_params": sum(layer.numel for layer in model.layers.values()),
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.2f}{unit}"
        n /= 1000
    return str(n)
