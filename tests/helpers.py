"""Small builders for test checkpoints (imported by tests; not a test module)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from quantscope.backend.dtypes import DTYPES

_BYTE_DTYPES = [(np.dtype(d.numpy), name) for name, d in DTYPES.items() if not d.packed]


def st_dtype(a: np.ndarray) -> str:
    # ml_dtypes' fp8 types share a dtype.str ('|V1'), so compare the dtype objects themselves.
    return next(name for dt, name in _BYTE_DTYPES if dt == a.dtype)


def write_raw(path: Path, header: dict | bytes, data: bytes = b"", *, length: int | None = None) -> Path:
    """Write a safetensors-like file with full control over header bytes and length field."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(hb) if length is None else length
    Path(path).write_bytes(struct.pack("<Q", n) + hb + data)
    return Path(path)


def write_st(path: Path, tensors: dict[str, np.ndarray], metadata: dict | None = None,
             *, pad: bool = True, scalars: bool = False) -> Path:
    """Write a valid safetensors file (our own writer, used only to build fixtures). A 0-d array
    is written as shape [1] (np.ascontiguousarray's way), or as [] with ``scalars``."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    off = 0
    chunks = []
    for name, a in tensors.items():
        shape = list(np.shape(a)) if scalars else None
        a = np.ascontiguousarray(a)
        b = a.tobytes()
        header[name] = {"dtype": st_dtype(a), "shape": list(a.shape) if shape is None else shape,
                        "data_offsets": [off, off + len(b)]}
        chunks.append(b)
        off += len(b)
    hb = json.dumps(header).encode()
    if pad:
        hb += b" " * (-len(hb) % 8)
    return write_raw(path, hb, b"".join(chunks))


def load_npz(path) -> dict[str, np.ndarray]:
    """All arrays of an .npz, with the file closed (ResourceWarning is an error in the suite)."""
    with np.load(path) as z:
        return dict(z)


def read_all(path: Path) -> tuple[dict, dict | None]:
    """Every tensor of a safetensors file (copies: the file may be rewritten) and its metadata."""
    from quantscope.backend.safetensors_file import SafetensorsFile
    sf = SafetensorsFile(path)
    out = {n: np.array(sf.read(n)) for n in sf.names}
    meta = sf.metadata
    sf.close()
    return out, meta


def writable_copy(src: Path, dst: Path) -> Path:
    """A copy of a checkpoint folder to break (the fixtures' files may be read-only)."""
    import shutil
    shutil.copytree(src, dst)
    for f in Path(dst).iterdir():
        f.chmod(0o644)
    return Path(dst)
