"""Two engines behind one interface turn a layer into float32 weights.

* :class:`NumpyEngine` — vectorised numpy decoders of ``formats/`` (also the cross-check).
* :class:`MlxEngine` — ``mx.dequantize`` for MLX layouts, and for GPTQ/AWQ layers that are
  exactly representable as MLX affine (repacked first); everything else falls back to numpy.
  MLX arrays are created and evaluated on one dedicated thread and leave it as numpy (MLX issue
  #3529: arrays crossing threads can fail).

Every non-MLX decoder returns the exact value of its format's formula in float32 (the product of
a stored code and an fp16/bf16/fp8 scale is exact in float32); the cast a runtime applies to its
compute dtype is left out. MLX affine is the exception: mx.dequantize itself rounds in the scale
dtype, and that is what it defines. Both engines return the same float32 values (0 ULP, tested): the MLX path repacks with float32
scales/biases so ``s*q + (-s*z)`` is exact, like the numpy path.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np

from .errors import LayerError
from .formats import awq, bnb, ct, fast, fp8, gptq
from .formats import mlx as mlxfmt
from .formats.kernel import lower_thread_priority
from .schemes import Layer, Model

ENGINES = ("auto", "numpy", "mlx")
MLX_FP_SCHEMES = ("mlx-mxfp4", "mlx-mxfp8", "mlx-nvfp4")


def read_parts(model: Model, layer: Layer) -> dict[str, np.ndarray]:
    """Every stored component of a layer as numpy arrays (mmap views). An MLX block-float
    layer's scales typed F8_E8M0 / F8_E4M3 come as their raw bytes, as ``mx.load`` gives them."""
    p = {c: model.ckpt.tensor(t.name) for c, t in layer.tensors.items()}
    if layer.scheme == "gptoss-mxfp4":  # (MLX's mxfp4 bytes in another shape: its decoders read them)
        p["weight"], p["scales"] = gptoss_as_mlx(p)
    if layer.scheme in MLX_FP_SCHEMES and p.get("scales") is not None and p["scales"].dtype.itemsize == 1:
        p["scales"] = p["scales"].view(np.uint8)
    return p


def _require_decodable(model: Model, layer: Layer) -> None:
    if not layer.decodable:
        why = layer.problem or f"scheme {layer.scheme!r} is not decodable"
        raise LayerError(why, file=model.ckpt.source, tensor=layer.path, rule="layer.undecodable")


def _gptq_version(layer: Layer) -> int:
    return int(layer.settings.get("version", 1))


def check_layer(model: Model, layer: Layer, *, decode: bool = False) -> None:
    """Raise the LayerError a decode of ``layer`` would raise (its tensors do not fit together:
    zero points or scales with the wrong number of groups, ...), naming the file.

    GPTQ and AWQ layers are checked from their shapes (and g_idx; cheap whatever the size);
    other schemes only by decoding them, when ``decode`` is set (doctor does that for models it
    reads whole)."""
    _require_decodable(model, layer)
    s = layer.scheme
    if s not in ("gptq", "awq-gemm", "awq-gemv") and not (decode and layer.quantized):
        return
    p = read_parts(model, layer)
    try:
        if s == "gptq":
            gptq.check_layer(p["qweight"], p["qzeros"], p["scales"], p.get("g_idx"), layer.bits, layer.group_size,
                             layer.path)
        elif s == "awq-gemm":
            awq.check_gemm(p["qweight"], p.get("qzeros"), p["scales"], layer.group_size, layer.path)
        elif s == "awq-gemv":
            awq.check_gemv(p["qweight"], p.get("qzeros"), p["scales"], layer.group_size, layer.path)
        elif decode and layer.quantized:
            NUMPY_DECODERS[s](layer, p)
    except LayerError as exc:
        raise exc.naming(model.ckpt.source, layer.path, rule="layer.undecodable") from None


# -- numpy -------------------------------------------------------------------------------------

def _np_dense(layer, p, out=None):
    w = np.asarray(p["weight"])
    if out is None:  # (C order: a transposed stack of experts is read as a view)
        return w.astype(np.float32, order="C")
    out[...] = w
    return out


def _np_mlx_affine(layer, p, out=None):
    return mlxfmt.decode_affine(p["weight"], p["scales"], p["biases"], bits=layer.bits,
                                group_size=layer.group_size, name=layer.path, out=out)


#: What a decoder raises on a file's odd parts or settings (a part missing, a block size of
#: "128"): said as the layer's error, naming the file, not as an internal one.
_DECODE_ERRORS = (KeyError, ValueError, TypeError, IndexError, ZeroDivisionError)


def _global_scale(layer, p) -> float | None:
    """An MLX nvfp4 layer's stored per-tensor ``global_scale`` (mx.dequantize's argument: weights
    × global/2688), or None. It was ignored: the decode differed from mx.dequantize's by its factor."""
    g = p.get("global_scale")
    if g is None or layer.mode != "nvfp4":
        return None
    g = np.asarray(g, np.float32).reshape(-1)
    if g.size != 1:
        raise LayerError(f"global_scale holds {g.size} values; nvfp4's is one per tensor", tensor=layer.path)
    return float(g[0])


def _np_mlx_fp(layer, p, out=None):
    return mlxfmt.decode_fp(p["weight"], p["scales"], mode=layer.mode, global_scale=_global_scale(layer, p),
                            name=layer.path, out=out)


def gptoss_as_mlx(p: dict) -> tuple[np.ndarray, np.ndarray]:
    """gpt-oss's mxfp4 ``blocks`` ``[..., N, K/32, 16]`` and ``scales`` as MLX's mxfp4 weight
    words ``[..., N, K/8]`` and scale bytes (the same bytes: mlx-lm's gpt_oss sanitize views them
    so). Unaligned bytes (a U8 tensor may start anywhere in the file) are copied first."""
    b = p["blocks"]
    b = b.reshape(*b.shape[:-2], b.shape[-2] * b.shape[-1])
    if b.ctypes.data % 4 or not b.flags.c_contiguous:
        b = np.ascontiguousarray(b).copy()
    return b.view(np.uint32), p["scales"].view(np.uint8)


def _np_gptq(layer, p, out=None):
    return gptq.decode(p["qweight"], p["qzeros"], p["scales"], p.get("g_idx"), bits=layer.bits,
                       group_size=layer.group_size, version=_gptq_version(layer), name=layer.path, out=out)


def _np_awq_gemm(layer, p, out=None):
    return awq.decode_gemm(p["qweight"], p.get("qzeros"), p["scales"], group_size=layer.group_size,
                           name=layer.path, out=out)


def _np_awq_gemv(layer, p):
    return awq.decode_gemv(p["qweight"], p.get("qzeros"), p["scales"], group_size=layer.group_size, name=layer.path)


def _np_ct_pack(layer, p):
    st = layer.settings
    return ct.decode_pack_quantized(p["weight_packed"], p["weight_scale"], layer.shape, bits=layer.bits,
                                    group_size=layer.group_size, strategy=st.get("strategy") or "group",
                                    weight_zero_point=p.get("weight_zero_point"), g_idx=p.get("weight_g_idx"),
                                    packing=st.get("packing", "auto"), name=layer.path)


def _np_ct_naive(layer, p):
    st = layer.settings
    return ct.decode_naive(p["weight"], p["weight_scale"], p.get("weight_zero_point"), p.get("weight_g_idx"),
                           strategy=st.get("strategy") or "channel", group_size=layer.group_size,
                           block_structure=st.get("block_structure"), name=layer.path)


def _np_ct_nvfp4(layer, p):
    return ct.decode_nvfp4(p["weight_packed"], p["weight_scale"], p["weight_global_scale"], name=layer.path)


def _np_modelopt_nvfp4(layer, p):
    s = p["weight_scale"]  # (raw bytes, U8, are the E4M3 scales too: read as such, as the doctor does)
    s = s.view(ml_dtypes.float8_e4m3fn) if s.dtype == np.uint8 else s
    return ct.decode_modelopt_nvfp4(p["weight"], s, p["weight_scale_2"], name=layer.path)


def _np_ct_mxfp4(layer, p):
    return ct.decode_mxfp4(p["weight_packed"], p["weight_scale"], name=layer.path)


def _np_ct_mxfp8(layer, p):
    return ct.decode_mxfp8(p["weight"], p["weight_scale"], name=layer.path)


def _np_fp8_block(layer, p):
    w, s = p["weight"], p[layer.settings.get("scale_tensor", "weight_scale_inv")]
    bs = layer.settings["weight_block_size"]
    strategy = layer.settings.get("strategy")  # no block size: one scale per tensor or per row
    if strategy is not None:
        *lead, n, k = w.shape
        s = np.asarray(s).reshape(*lead, 1 if strategy == "tensor" else n, 1)
        bs = [n, k] if strategy == "tensor" else [1, k]
    return fp8.decode_fp8_block(w, s, bs, name=layer.path)


def _np_bnb4(layer, p):
    return bnb.decode_4bit(p["weight"], p["weight.absmax"], p["weight.quant_map"], layer.settings,
                           p.get("weight.nested_absmax"), p.get("weight.nested_quant_map"), name=layer.path)


def _np_bnb8(layer, p):
    return bnb.decode_int8(p["weight"], p["SCB"], name=layer.path)


NUMPY_DECODERS = {
    "ct-pack": _np_ct_pack, "ct-int": _np_ct_naive, "ct-fp8": _np_ct_naive, "ct-nvfp4": _np_ct_nvfp4,
    "ct-mxfp4": _np_ct_mxfp4, "ct-mxfp8": _np_ct_mxfp8, "fp8-block": _np_fp8_block,
    "modelopt-nvfp4": _np_modelopt_nvfp4,
    "bnb-nf4": _np_bnb4, "bnb-fp4": _np_bnb4, "bnb-int8": _np_bnb8,
    "dense": _np_dense,
    "mlx-affine": _np_mlx_affine,
    "mlx-mxfp4": _np_mlx_fp, "mlx-mxfp8": _np_mlx_fp, "mlx-nvfp4": _np_mlx_fp,
    "gptoss-mxfp4": _np_mlx_fp,
    "gptq": _np_gptq,
    "awq-gemm": _np_awq_gemm,
    "awq-gemv": _np_awq_gemv,
}

_ROW_DECODERS = {
    "mlx-affine": lambda layer, p: mlxfmt.affine_rows(p["weight"], p["scales"], p["biases"], bits=layer.bits,
                                                       group_size=layer.group_size, name=layer.path),
    "mlx-mxfp4": lambda layer, p: mlxfmt.fp_rows(p["weight"], p["scales"], mode=layer.mode, name=layer.path),
    "mlx-mxfp8": lambda layer, p: mlxfmt.fp_rows(p["weight"], p["scales"], mode=layer.mode, name=layer.path),
    "mlx-nvfp4": lambda layer, p: mlxfmt.fp_rows(p["weight"], p["scales"], mode=layer.mode,
                                                 global_scale=_global_scale(layer, p), name=layer.path),
    "gptoss-mxfp4": lambda layer, p: mlxfmt.fp_rows(p["weight"], p["scales"], mode=layer.mode, name=layer.path),
    "gptq": lambda layer, p: gptq.rows(p["qweight"], p["qzeros"], p["scales"], p.get("g_idx"), bits=layer.bits,
                                       group_size=layer.group_size, version=_gptq_version(layer), name=layer.path),
    "awq-gemm": lambda layer, p: awq.gemm_rows(p["qweight"], p.get("qzeros"), p["scales"],
                                               group_size=layer.group_size, name=layer.path),
}

_GROUP_VALUES = {
    "mlx-affine": lambda layer, p, r0, r1: mlxfmt.affine_group_values(
        p["weight"], p["scales"], p["biases"], bits=layer.bits, group_size=layer.group_size, name=layer.path, r0=r0,
        r1=r1),
    "gptq": lambda layer, p, r0, r1: gptq.group_values(
        p["qweight"], p["qzeros"], p["scales"], p.get("g_idx"), bits=layer.bits, group_size=layer.group_size,
        version=_gptq_version(layer), name=layer.path, n0=r0, n1=r1),
    "awq-gemm": lambda layer, p, r0, r1: awq.gemm_group_values(
        p["qweight"], p.get("qzeros"), p["scales"], group_size=layer.group_size, name=layer.path, n0=r0, n1=r1),
    "ct-pack": lambda layer, p, r0, r1: ct.pack_group_values(
        p["weight_packed"], p["weight_scale"], layer.shape, bits=layer.bits, group_size=layer.group_size,
        strategy=layer.settings.get("strategy") or "group", weight_zero_point=p.get("weight_zero_point"),
        g_idx=p.get("weight_g_idx"), packing=layer.settings.get("packing", "auto"), name=layer.path, r0=r0, r1=r1),
}


def group_values(model: Model, layer: Layer, r0: int = 0, r1: int | None = None):
    """The decoded values of flattened rows ``[r0, r1)`` of ``layer`` as code counts per group
    (:class:`~.formats.codehist.GroupValues`: exact histograms without decoding), or None where
    its scheme or layout has no such kernel. Either engine decodes to these very values."""
    fn = _GROUP_VALUES.get(layer.scheme)
    if fn is None or not fast.AVAILABLE or not layer.decodable:
        return None
    try:
        return fn(layer, read_parts(model, layer), r0, r1)
    except (LayerError, *_DECODE_ERRORS):
        return None  # the decode reports it, with the file named


_OUT_CAPABLE = {_np_dense, _np_mlx_affine, _np_mlx_fp, _np_gptq, _np_awq_gemm}


class NumpyEngine:
    """Decode with the numpy implementations of every format."""

    name = "numpy"
    device = "cpu (numpy)"

    def dequantize(self, model: Model, layer: Layer, out: np.ndarray | None = None) -> np.ndarray:
        """float32 weights of ``layer`` in ``[..., out, in]`` orientation.

        ``out`` (float32, the logical shape) is written into where the decoder supports it,
        which saves the page faults of a fresh allocation on repeated decodes (sweeps).
        """
        _require_decodable(model, layer)
        fn = NUMPY_DECODERS.get(layer.scheme)
        if fn is None:
            raise LayerError(f"no decoder for scheme {layer.scheme!r}", file=model.ckpt.source, tensor=layer.path)
        try:
            parts = read_parts(model, layer)
            if out is not None and fn in _OUT_CAPABLE:
                return fn(layer, parts, out=out)
            return fn(layer, parts)
        except LayerError as exc:
            raise exc.naming(model.ckpt.source, layer.path) from None
        except _DECODE_ERRORS as exc:  # ("internal error: KeyError" before; --debug shows where)
            why = f"its {exc.args[0]!r} is not stored" if isinstance(exc, KeyError) else str(exc)
            raise LayerError(f"cannot be decoded: {why}", file=model.ckpt.source, tensor=layer.path,
                             rule="layer.undecodable") from exc

    def row_decoder(self, model: Model, layer: Layer) -> fast.RowDecoder | None:
        """A prepared compiled decode of ``layer`` by row ranges (see :class:`fast.RowDecoder`),
        or None where the layer's scheme or layout has no such kernel. A sweep decodes row
        blocks into a small buffer and measures them while they are still in the CPU cache."""
        fn = _ROW_DECODERS.get(layer.scheme)
        if fn is None or not fast.AVAILABLE or not layer.decodable:
            return None
        try:
            return fn(layer, read_parts(model, layer))
        except (LayerError, *_DECODE_ERRORS):
            return None  # the whole-layer decode reports it, with the file named

    def close(self) -> None:
        pass


# -- mlx ---------------------------------------------------------------------------------------

def to_mx(a: np.ndarray):
    """numpy → MLX array, bf16 included (through a uint16 view: mx.array cannot take ml_dtypes).
    Call only on the MLX thread (:func:`run_on_mlx_thread`)."""
    import mlx.core as mx
    a = np.ascontiguousarray(a)
    if a.dtype == np.dtype(ml_dtypes.bfloat16):
        return mx.array(a.view(np.uint16)).view(mx.bfloat16)
    return mx.array(a)


def from_mx(x) -> np.ndarray:
    """MLX array → numpy with the same dtype (bf16 through a uint16 view); evaluates it."""
    import mlx.core as mx
    if x.dtype == mx.bfloat16:
        return np.array(x.view(mx.uint16)).view(ml_dtypes.bfloat16)
    return np.array(x)


class MlxEngine:
    """Decode with ``mx.dequantize`` on one dedicated MLX thread; numpy for what MLX cannot express."""

    name = "mlx"

    def __init__(self) -> None:
        import mlx.core as mx  # fail early and clearly if MLX is missing
        self._mx = mx
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantscope-mlx",
                                        initializer=lower_thread_priority)
        self._numpy = NumpyEngine()
        self.last_path = ""  # which route the last decode took (for reports and tests)
        self._lock = threading.Lock()

    @property
    def device(self) -> str:
        return f"mlx {self._mx.default_device()}"

    def dequantize(self, model: Model, layer: Layer) -> np.ndarray:
        _require_decodable(model, layer)
        try:
            return self._pool.submit(self._run, model, layer).result()
        except LayerError as exc:  # the file named, as the numpy engine names it
            raise exc.naming(model.ckpt.source, layer.path) from None

    def _run(self, model: Model, layer: Layer) -> np.ndarray:
        mx = self._mx
        p = read_parts(model, layer)
        s = layer.scheme
        if s == "mlx-affine":
            self.last_path = "mx.dequantize"
            y = mx.dequantize(to_mx(p["weight"]), to_mx(p["scales"]), to_mx(p["biases"]),
                              group_size=layer.group_size, bits=layer.bits)
            return from_mx(y.astype(mx.float32))
        if s in ("mlx-mxfp4", "mlx-mxfp8", "mlx-nvfp4", "gptoss-mxfp4"):  # (gpt-oss's: the bytes mlx-lm's
            # gpt_oss sanitize hands to mx.dequantize, as read_parts gives them)
            self.last_path = "mx.dequantize"
            gs = _global_scale(layer, p)
            y = mx.dequantize(to_mx(p["weight"]), to_mx(p["scales"]), mode=layer.mode, dtype=mx.float32,
                              **({} if gs is None else {"global_scale": mx.array([gs], mx.float32)}))
            return from_mx(y.astype(mx.float32))
        rep = None
        if s == "gptq":
            rep = gptq.to_mlx_affine(p["qweight"], p["qzeros"], p["scales"], p.get("g_idx"), bits=layer.bits,
                                     group_size=layer.group_size, version=_gptq_version(layer), name=layer.path)
        elif s == "awq-gemm":
            rep = awq.gemm_to_mlx_affine(p["qweight"], p.get("qzeros"), p["scales"], name=layer.path)
        elif s == "awq-gemv":
            rep = awq.gemv_to_mlx_affine(p["qweight"], p.get("qzeros"), p["scales"], group_size=layer.group_size,
                                         name=layer.path)
        elif s == "ct-pack":
            st = layer.settings
            rep = ct.to_mlx_affine(p["weight_packed"], p["weight_scale"], layer.shape, bits=layer.bits,
                                   group_size=layer.group_size, strategy=st.get("strategy") or "group",
                                   weight_zero_point=p.get("weight_zero_point"), g_idx=p.get("weight_g_idx"),
                                   packing=st.get("packing", "auto"), name=layer.path)
        if rep is not None:
            self.last_path = "repacked to MLX affine + mx.dequantize"
            w, sc, bi = rep
            y = mx.dequantize(to_mx(w), to_mx(sc), to_mx(bi), group_size=layer.group_size,
                              bits=layer.bits)
            return from_mx(y.astype(mx.float32))
        self.last_path = "numpy fallback"
        return self._numpy.dequantize(model, layer)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


_default_engines: dict[str, object] = {}
_engines_lock = threading.Lock()


def mlx_has_gpu() -> bool:
    try:
        import mlx.core as mx
        return mx.default_device() == mx.gpu
    except Exception:
        return False


def get_engine(name: str = "auto"):
    """A shared engine by name. ``auto`` is MLX on a GPU, numpy on a CPU (see bench_dequant)."""
    if name not in ENGINES:
        raise LayerError(f"unknown engine {name!r} (choose from {', '.join(ENGINES)})")
    if name == "auto":
        name = "mlx" if mlx_has_gpu() else "numpy"
    with _engines_lock:
        eng = _default_engines.get(name)
        if eng is None:
            eng = _default_engines[name] = MlxEngine() if name == "mlx" else NumpyEngine()
        return eng


def run_on_mlx_thread(fn, *args):
    """Run ``fn(*args)`` on the MLX engine's thread (MLX arrays must not cross threads); its
    result must be plain numpy/Python data."""
    eng = get_engine("mlx")
    return eng._pool.submit(fn, *args).result()


def dequantize(model: Model, path: str, engine: str = "auto") -> np.ndarray:
    """float32 weights of the layer at ``path`` (module path without component suffix)."""
    return get_engine(engine).dequantize(model, model.layer(path))
