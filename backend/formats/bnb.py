"""bitsandbytes serialized weights: 4-bit nf4/fp4 (``Linear4bit``) and LLM.int8 — formats.md §7."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from ..errors import LayerError
from .common import check

__all__ = ["parse_quant_state", "codes_4bit", "decode_4bit", "decode_int8", "check_4bit_state",
           "NF4_VALUES", "FP4_VALUES", "INT8_RECIPROCAL"]

#: bitsandbytes' NF4 code book (``get_4bit_type("nf4")``); files carry it as ``weight.quant_map``.
NF4_VALUES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)

#: bitsandbytes' "fp4" code book: not OCP E2M1 order (formats.md §7.1) — raw table / 12.
FP4_VALUES = (np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3],
                       dtype=np.float32) / np.float32(12)).astype(np.float32)

#: bitsandbytes multiplies by this reciprocal of 127 rather than dividing
#: (``int8_vectorwise_dequant``); it differs from ``/127`` in the last bit for some values.
INT8_RECIPROCAL = 7.874015718698502e-3

_TORCH_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16),
                 "float32": np.dtype(np.float32), "half": np.dtype(np.float16),
                 "float": np.dtype(np.float32)}


def parse_quant_state(u8_array: np.ndarray) -> dict:
    """Decode a ``weight.quant_state.bitsandbytes__{nf4,fp4}`` tensor (UTF-8 JSON bytes).

    Parameters
    ----------
    u8_array
        The U8 tensor as stored.

    Returns
    -------
    dict
        The JSON object: ``quant_type``, ``blocksize``, ``dtype`` (e.g. ``"bfloat16"``),
        ``shape`` and, when nested, ``nested_blocksize``, ``nested_dtype``, ``nested_offset``.
    """
    raw = np.ascontiguousarray(u8_array).view(np.uint8).tobytes()
    try:
        state = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LayerError(f"quant_state is not UTF-8 JSON ({exc})") from None
    if not isinstance(state, dict):
        raise LayerError("quant_state JSON is not an object")
    return state


def module_dtype(quant_state: dict) -> np.dtype:
    """numpy dtype of the quant_state's ``dtype`` field (``"bfloat16"`` / ``"torch.float16"`` …)."""
    key = str(quant_state.get("dtype", "float32")).removeprefix("torch.")
    if key not in _TORCH_DTYPES:
        raise LayerError(f"quant_state dtype {quant_state.get('dtype')!r} is not bf16/fp16/fp32")
    return _TORCH_DTYPES[key]


def _weight_bytes(weight: np.ndarray) -> np.ndarray:
    # FSDP-QLoRA stores the packed bytes in a wider ``quant_storage`` dtype (e.g. bf16 [M, 1]);
    # the bytes are what count (formats.md §7.1), so reinterpret whatever the dtype is.
    return np.ascontiguousarray(weight).view(np.uint8).reshape(-1)


def codes_4bit(weight_u8: np.ndarray, quant_state: dict, *, name: str | None = None) -> np.ndarray:
    """The 4-bit codes of a ``Linear4bit`` weight, shaped like the original ``[N, K]``.

    Byte ``i`` holds element ``2i`` in the **high** nibble and ``2i+1`` in the low nibble of the
    row-major flattened weight (opposite of MLX / compressed-tensors).

    Parameters
    ----------
    weight_u8
        The stored ``weight`` (U8 ``[(N*K+1)//2, 1]``, or another ``quant_storage`` dtype).
    quant_state
        Parsed quant state (:func:`parse_quant_state`); its ``shape`` is used.
    name
        Tensor name for error messages.

    Returns
    -------
    numpy.ndarray
        ``uint8`` codes 0..15 with shape ``quant_state["shape"]``.
    """
    shape = tuple(int(v) for v in quant_state.get("shape", ()))
    check(len(shape) >= 1, "quant_state has no shape", name)
    numel = math.prod(shape)
    by = _weight_bytes(weight_u8)
    need = (numel + 1) // 2
    check(by.size == need,
          f"weight holds {by.size} bytes but quant_state shape {list(shape)} ({numel} values, "
          f"two per byte) needs {need}", name)
    out = np.empty(need * 2, np.uint8)
    np.right_shift(by, 4, out=out[0::2])
    np.bitwise_and(by, 0x0F, out=out[1::2])
    return out[:numel].reshape(shape)


def _absmax(absmax, quant_state, nested_absmax, nested_quant_map, nblocks, name):
    a = np.asarray(absmax).reshape(-1)
    check(a.size == nblocks,
          f"absmax has {a.size} entries but {nblocks} blocks of {quant_state.get('blocksize')} "
          f"are needed (ceil(numel / blocksize))", name)
    nested = nested_absmax is not None or nested_quant_map is not None
    if not nested:
        check(a.dtype != np.uint8, "absmax is U8 (double-quantized) but nested_absmax / "
              "nested_quant_map are missing", name)
        return a.astype(np.float32)
    check(nested_absmax is not None and nested_quant_map is not None,
          "double quantization needs both nested_absmax and nested_quant_map", name)
    check(a.dtype == np.uint8, f"nested absmax codes must be U8, got {a.dtype}", name)
    nbs = int(quant_state.get("nested_blocksize", 256))
    nab = np.asarray(nested_absmax).reshape(-1).astype(np.float32)
    nqm = np.asarray(nested_quant_map).reshape(-1).astype(np.float32)
    check(nqm.size == 256, f"nested_quant_map has {nqm.size} entries, expected 256", name)
    check(nab.size == -(-a.size // nbs),
          f"nested_absmax has {nab.size} entries but {a.size} absmax codes in blocks of {nbs} "
          f"need {-(-a.size // nbs)}", name)
    # bnb: dequantize_blockwise (float32 product) then ``absmax += offset`` with the offset as a
    # float32 tensor (QuantState.from_dict), so both steps round in float32.
    out = nqm[a] * np.repeat(nab, nbs)[: a.size]
    out += np.float32(quant_state.get("nested_offset", 0.0))
    return out


def decode_4bit(weight_u8: np.ndarray, absmax: np.ndarray, quant_map: np.ndarray,
                quant_state: dict, nested_absmax: np.ndarray | None = None,
                nested_quant_map: np.ndarray | None = None, *,
                name: str | None = None) -> np.ndarray:
    """Dequantize a bitsandbytes ``Linear4bit`` (nf4 / fp4) weight (formats.md §7.1).

    ``W_flat[i] = quant_map[code_i] * absmax_f[i // blocksize]`` in float32, where ``absmax_f``
    is ``nested_quant_map[absmax] * nested_absmax[j // nested_blocksize] + nested_offset`` for
    double-quantized states. bitsandbytes' ``dequantize_4bit`` computes this float32 product
    and casts it to the module dtype (``quant_state["dtype"]``). We return the float32 product:
    apply ``common.round_to(w, module_dtype(quant_state))`` for the module's values.

    Parameters
    ----------
    weight_u8
        Stored ``weight`` (U8, or the ``quant_storage`` dtype, reinterpreted as bytes).
    absmax
        ``weight.absmax``: F32 ``[nblocks]``, or U8 codes when double-quantized.
    quant_map
        ``weight.quant_map`` F32 ``[16]`` — always used instead of a built-in table.
    quant_state
        Parsed ``weight.quant_state.bitsandbytes__*`` (:func:`parse_quant_state`).
    nested_absmax, nested_quant_map
        ``weight.nested_absmax`` / ``weight.nested_quant_map`` for double quantization.
    name
        Tensor name for error messages.

    Returns
    -------
    numpy.ndarray
        float32 with shape ``quant_state["shape"]`` (``[N, K]``).
    """
    codes = codes_4bit(weight_u8, quant_state, name=name)
    qm = np.asarray(quant_map).reshape(-1).astype(np.float32)
    check(qm.size == 16, f"quant_map has {qm.size} entries, expected 16", name)
    bs = int(quant_state.get("blocksize", 64))
    check(bs > 0, f"blocksize {bs} must be positive", name)
    numel = codes.size
    nblocks = -(-numel // bs)
    amax = _absmax(absmax, quant_state, nested_absmax, nested_quant_map, nblocks, name)
    flat = qm[codes.reshape(-1)]
    full = nblocks * bs
    if full == numel:
        flat.reshape(nblocks, bs)[...] *= amax[:, None]
    else:
        flat *= np.repeat(amax, bs)[:numel]
    return flat.reshape(codes.shape)


def decode_int8(weight_i8: np.ndarray, SCB: np.ndarray, *, name: str | None = None) -> np.ndarray:
    """Dequantize a ``Linear8bitLt`` weight: ``(q * SCB[n]) * 7.874015718698502e-3`` in float32.

    This is bitsandbytes' ``int8_vectorwise_dequant`` (also what transformers' dequantize uses):
    it multiplies by a float32 reciprocal of 127 rather than dividing, which can differ from
    ``q * SCB / 127`` in the last bit; we follow the library.

    Parameters
    ----------
    weight_i8
        I8 ``[N, K]`` ("row" format; ``weight_format`` 0).
    SCB
        F32 ``[N]`` per-row absmax.
    name
        Tensor name for error messages.

    Returns
    -------
    numpy.ndarray
        float32 ``[N, K]``.
    """
    w = np.asarray(weight_i8)
    check(w.dtype == np.int8 and w.ndim == 2,
          f"weight must be I8 [N, K], got {w.dtype} {list(w.shape)}", name)
    scb = np.asarray(SCB).astype(np.float32).reshape(-1)
    check(scb.size == w.shape[0], f"SCB has {scb.size} entries but weight has {w.shape[0]} rows",
          name)
    out = w.astype(np.float32)
    out *= scb[:, None]
    out *= np.float32(INT8_RECIPROCAL)
    return out


def check_4bit_state(prefix: str, tensors: Mapping[str, object],
                     quant_state: dict | None = None) -> list[str]:
    """List what is wrong with one ``Linear4bit`` weight's serialized pieces (rule R25).

    Works from headers: ``tensors`` maps full tensor names to anything with ``.shape`` and
    ``.dtype`` (``TensorInfo`` — dtype a safetensors string — or numpy arrays).

    Parameters
    ----------
    prefix
        The weight's name, e.g. ``"model.layers.0.mlp.up_proj.weight"``.
    tensors
        The checkpoint's tensors (only names starting with ``prefix + "."`` are looked at).
    quant_state
        The parsed quant state, if already read (enables the size checks).

    Returns
    -------
    list[str]
        One sentence per problem; empty when everything fits.
    """
    problems: list[str] = []
    sub = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    qs_keys = sorted(k for k in sub if k.startswith("quant_state.bitsandbytes__"))
    if len(qs_keys) != 1:
        problems.append(f"{prefix}: expected exactly one quant_state.bitsandbytes__* tensor, "
                        f"found {len(qs_keys)}" + (f" ({', '.join(qs_keys)})" if qs_keys else ""))
    for key in ("absmax", "quant_map"):
        if key not in sub:
            problems.append(f"{prefix}.{key} is missing")
    nested = [k for k in ("nested_absmax", "nested_quant_map") if k in sub]
    if len(nested) == 1:
        missing = ({"nested_absmax", "nested_quant_map"} - set(nested)).pop()
        problems.append(f"{prefix}: {nested[0]} is present but {missing} is missing "
                        "(double-quantization keys must be all or none)")

    def _dt(v) -> str:
        d = getattr(v, "dtype", None)
        return str(d) if isinstance(d, str) else {np.dtype(np.uint8): "U8"}.get(np.dtype(d), "?")

    if "absmax" in sub:
        is_u8 = _dt(sub["absmax"]) == "U8"
        if nested and not is_u8:
            problems.append(f"{prefix}.absmax should be U8 codes when nested keys are present")
        if not nested and is_u8:
            problems.append(f"{prefix}.absmax is U8 (double-quantized) but nested_absmax / "
                            "nested_quant_map are missing")
    if "quant_map" in sub and math.prod(sub["quant_map"].shape) != 16:
        problems.append(f"{prefix}.quant_map has {math.prod(sub['quant_map'].shape)} entries, "
                        "expected 16")
    if quant_state is not None:
        shape = quant_state.get("shape")
        bs = quant_state.get("blocksize")
        if not shape or not bs:
            problems.append(f"{prefix}: quant_state lacks shape or blocksize")
        else:
            numel = math.prod(int(v) for v in shape)
            nblocks = -(-numel // int(bs))
            if "absmax" in sub and math.prod(sub["absmax"].shape) != nblocks:
                problems.append(f"{prefix}.absmax has {math.prod(sub['absmax'].shape)} entries "
                                f"but ceil({numel}/{bs}) = {nblocks}")
            w = tensors.get(prefix)
            if w is not None:
                item = (np.dtype(w.dtype).itemsize if not isinstance(w.dtype, str)
                        else _ST_BYTES.get(w.dtype, 1))
                nbytes = math.prod(w.shape) * item
                if nbytes != (numel + 1) // 2:
                    problems.append(f"{prefix} holds {nbytes} bytes but shape {list(shape)} "
                                    f"needs {(numel + 1) // 2}")
            has_nested_fields = "nested_blocksize" in quant_state or "nested_offset" in quant_state
            if bool(nested) != has_nested_fields:
                problems.append(f"{prefix}: quant_state {'has' if has_nested_fields else 'lacks'}"
                                f" nested fields but nested tensors are "
                                f"{'absent' if has_nested_fields else 'present'}")
            if nested and "nested_absmax" in sub and "absmax" in sub:
                nbs = int(quant_state.get("nested_blocksize", 256))
                want = -(-math.prod(sub["absmax"].shape) // nbs)
                got = math.prod(sub["nested_absmax"].shape)
                if got != want:
                    problems.append(f"{prefix}.nested_absmax has {got} entries, expected {want}")
    return problems


_ST_BYTES = {"U8": 1, "I8": 1, "BF16": 2, "F16": 2, "F32": 4, "U16": 2, "I16": 2, "I32": 4,
             "U32": 4, "F64": 8, "I64": 8, "U64": 8}
