"""One ``.safetensors`` file: header parsed once into an index, tensor bytes reached through mmap.

The header is parsed with ``struct`` + ``json`` (formats.md §8.1) rather than through the
``safetensors`` package, because a checkpoint inspector must (a) give a precise, actionable error
for each way a file can be broken and (b) read dtypes (fp8, fp4, fp6, e8m0) that the package's
numpy path rejects. No tensor data is read when a file is opened.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import stat
import struct
import threading
import time
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter
from pathlib import Path
from typing import Annotated

import msgspec
import numpy as np

from .bitpack import unpack_bits
from .dtypes import DTYPES, DType
from .errors import CheckpointError, HeaderError

#: Guards the lazy creation of each file's mapping.
_MAP_LOCK = threading.Lock()


def _length_hint(raw: bytes) -> str:
    """When a whole JSON object ends before the header's declared end and other bytes follow
    (tensor data read as header), say that the 8-byte length is too large, not only that the
    header does not parse."""
    text = raw.decode("utf-8", errors="replace")
    try:
        _, end = json.JSONDecoder().raw_decode(text)
    except (ValueError, RecursionError):
        return ""
    used = len(text[:end].encode("utf-8"))
    rest = raw[used:].lstrip(b" \t\r\n")  # padding spaces belong to the header
    if not rest:
        return ""
    used = len(raw) - len(rest)
    return (f"; its JSON object ends after {used} bytes but the 8-byte length field says {len(raw)}: the length "
            f"is {len(raw) - used} bytes too large (the writer's bug), so tensor data was read as header")


_Count = Annotated[int, msgspec.Meta(ge=0)]


class Entry(msgspec.Struct, gc=False):
    """One header entry as msgspec decodes it (types and signs checked in C while parsing; a
    tuple shape, not a list: the cyclic GC untracks tuples of ints on its first pass, and never
    a list, so a 100-shard index's 100,000 shapes were traversed by every full collection)."""

    dtype: str = ""
    shape: tuple[_Count, ...] = ()
    data_offsets: tuple[_Count, _Count] = (0, 0)


class _MetaOnly(msgspec.Struct, rename={"metadata": "__metadata__"}):
    metadata: dict[str, str] | None = None


# `__metadata__` decodes as an (empty) Entry with the typed decoder; a second, allocation-free
# pass that skips every other key reads it as a string map.
# (None: ``"__metadata__": null``, which mlx's save_safetensors writes without metadata and
# every reader accepts; a null tensor entry is refused by the checks that follow.)
_HEADER = msgspec.json.Decoder(dict[str, Entry | None])
_SURROGATE = re.compile("[\ud800-\udfff]")
_META = msgspec.json.Decoder(_MetaOnly)
_get_dtype = attrgetter("dtype")
_get_shape = attrgetter("shape")
_get_offsets = attrgetter("data_offsets")
_DTYPE_NAMES = frozenset(DTYPES)
_BITS = {k: v.bits for k, v in DTYPES.items()}

#: The reference parser's MAX_HEADER_SIZE (safetensors ``tensor.rs``).
MAX_HEADER_SIZE = 100_000_000


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives and what it is. Offsets are absolute positions in ``file``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int
    #: The stored tensor this one is a view of (None: stored under its own name). transformers'
    #: stacked expert parameters (``…experts.gate_up_proj``) are read as their module's weight
    #: (``…experts.gate_up_proj.weight``), of logical shape ``[E, N, K]``.
    source: str | None = None
    #: Whether the stored tensor is ``[E, K, N]`` (the view swaps its last two axes).
    transposed: bool = False

    @property
    def stored_name(self) -> str:
        """The name the file stores these bytes under."""
        return self.source or self.name

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape the file's header gives."""
        return self.shape[:-2] + self.shape[-1:] + self.shape[-2:-1] if self.transposed else self.shape

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype_info(self) -> DType:
        return DTYPES[self.dtype]


def _likely_cause(head: bytes) -> str:
    """Name what a file that is not safetensors most likely is, from its first bytes."""
    text = head.lstrip().lower()
    if text.startswith(b"version https://git-lfs"):
        return " — this is a Git LFS pointer file, not the weights: run `git lfs pull` or download the real file"
    if text.startswith((b"<!doctype", b"<html", b"<?xml", b"<head")):
        return " — this is an HTML/XML page saved under a .safetensors name (a failed download?)"
    if head[:2] == b"PK":
        return " — this is a zip archive (a PyTorch .bin/.pt checkpoint?), not safetensors"
    # a pickle's PROTO opcode and protocol (2-5), then an opcode (from protocol 4 a FRAME; none is
    # 0): not just a first byte of 0x80, which any header length of 128 + 256k bytes also has
    if head[:1] == b"\x80" and len(head) > 2 and 2 <= head[1] <= 5 and head[2] != 0 \
            and (head[1] < 4 or head[2] == 0x95) and head[8:9] != b"{":  # ("{": a safetensors header)
        return " — this is a Python pickle, not safetensors"
    if text.startswith((b"{", b"[")):
        return " — this is a JSON file (a config or an index?), not safetensors"
    if head[:4] == b"GGUF":
        return " — this is a GGUF file, not safetensors"
    if head and all(32 <= c < 127 or c in (9, 10, 13) for c in head):
        return " — this is a text file, not safetensors"
    return ""


class SafetensorsFile:
    """A parsed safetensors header plus lazy, read-only access to the tensor bytes.

    Parameters
    ----------
    path
        The ``.safetensors`` file.

    Raises
    ------
    CheckpointError
        If the file is missing or unreadable.
    HeaderError
        If the header is malformed or does not describe the file exactly.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._mm: mmap.mmap | None = None
        self._fd: int | None = None  # the mapped file, kept open for a cheap fstat per read
        try:
            # O_NONBLOCK: a FIFO named x.safetensors would block the open until a writer came
            # (it is refused below); regular files ignore the flag
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise CheckpointError("file not found", file=self.path, rule="container.missing") from None
        except IsADirectoryError:
            raise CheckpointError("is a folder, not a .safetensors file", file=self.path,
                                  rule="container.missing") from None
        except OSError as exc:
            raise CheckpointError(f"cannot open: {exc.strerror}", file=self.path,
                                  rule="container.missing") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise CheckpointError("is a folder, not a .safetensors file", file=self.path, rule="container.missing")
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointError("is not a regular file (a pipe, socket or device); quantscope reads "
                                      ".safetensors files", file=self.path, rule="container.missing")
            self.size = st.st_size
            self._stat = (st.st_size, st.st_mtime_ns, st.st_ino)
            self._checked_at = time.monotonic()  # (see _check_unchanged)
            self._changed: str | None = None
            head = os.pread(fd, 8, 0)
            if len(head) < 8:
                cause = _likely_cause(head)  # (a short text file was said to be "truncated")
                raise HeaderError(f"file is {self.size} bytes, shorter than the 8-byte header length"
                                  " field" + (cause or "; it is empty or truncated"), file=self.path,
                                  rule="container.too-short")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_SIZE or n > self.size - 8:
                what = "larger than the 100 MB limit" if n > MAX_HEADER_SIZE else \
                    f"more than the {self.size - 8} bytes the file holds after it ({self.size} bytes in all)"
                cause = _likely_cause(os.pread(fd, 64, 0))
                if not cause and n <= MAX_HEADER_SIZE:
                    cause = " — the file is truncated (incomplete download?)"
                raise HeaderError(f"header length {n} is {what}{cause}", file=self.path,
                                  rule="container.header-too-large")
            raw = os.pread(fd, n, 8)
        finally:
            os.close(fd)
        self.header_len = n
        self.data_offset = 8 + n
        self.metadata, self._entries = self._parse(raw)

    @property
    def identity(self) -> tuple:
        """(resolved path, size, mtime, inode): changes whenever the file is replaced or edited."""
        return (str(self.path.resolve()),) + self._stat

    # -- parsing -----------------------------------------------------------------------------

    def _err(self, message: str, tensor: str | None = None, rule: str = "container.header"):
        return HeaderError(message, file=self.path, tensor=tensor, rule=rule)

    def _parse(self, raw: bytes):
        if raw[:1] != b"{":
            raise self._err("header is not a JSON object (it must start with '{')" + _likely_cause(raw[:64]),
                            rule="container.header-json")
        try:
            obj = _HEADER.decode(raw)
            meta = _META.decode(raw).metadata if "__metadata__" in obj else None
            obj.pop("__metadata__", None)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError):
            # Not a well-typed header: the stdlib parser and the per-entry check say exactly why.
            self._explain_invalid_json(raw)
        data_size = self.size - self.data_offset
        if not self._fast_valid(obj, data_size):
            self._explain_invalid_json(raw)  # raises the precise error
        return meta, obj

    def _explain_invalid_json(self, raw: bytes) -> None:
        objects: list[list] = []  # each object's pairs as parsed; the header's own comes last

        def pairs(p):
            objects.append(p)
            return dict(p)

        try:
            obj = json.loads(raw, object_pairs_hook=pairs)
        except UnicodeDecodeError:
            raise self._err("header is not valid UTF-8" + _length_hint(raw), rule="container.header-json") from None
        except (json.JSONDecodeError, RecursionError) as exc:
            msg = getattr(exc, "msg", "too deeply nested")
            raise self._err(f"header is not valid JSON ({msg})" + _length_hint(raw),
                            rule="container.header-json") from None
        if not isinstance(obj, dict):
            raise self._err("header is JSON but not an object", rule="container.header-json")
        for name, _ in objects[-1]:
            # an escaped lone surrogate (\ud800) parses in Python but is no Unicode: the reference
            # parser refuses the header ("header failed validation" said nothing of it)
            if not name.isascii() and _SURROGATE.search(name):
                raise self._err("the tensor name holds an escaped lone surrogate (\\ud800-\\udfff), which is no "
                                "Unicode text: the reference parser rejects the header", name.encode(
                                    "utf-8", "backslashreplace").decode("ascii", "backslashreplace"),
                                rule="container.header-json")
        seen: set = set()
        for name, _ in objects[-1]:  # (the last entry of a name wins a parse: the first's bytes were
            if name in seen:          # then called an overlap or a gap, the cause unsaid)
                raise self._err("the name appears twice in the header (the safetensors reference parser "
                                "refuses the file)", name, rule="container.duplicate-key")
            seen.add(name)
        meta = obj.pop("__metadata__", None)
        if meta is not None:
            if not isinstance(meta, dict):
                raise self._err("__metadata__ must be an object of strings", rule="container.metadata")
            for k, v in meta.items():
                if not isinstance(v, str):
                    raise self._err(f"__metadata__ value of {k!r} is {type(v).__name__}, not a string "
                                    "(the safetensors reference parser rejects the file)",
                                    rule="container.metadata")
        self._explain_invalid(obj, self.size - self.data_offset)

    def _fast_valid(self, obj: dict, data_size: int) -> bool:
        """Vectorised check of every rule; False means "run the precise per-entry check".

        Headers of 20,000+ tensors are common (MoE models); a per-entry Python loop costs more
        than the JSON parse itself, so the well-formed case is checked with C-level iteration and
        numpy, and only a failing header pays for the loop that names the culprit.
        """
        n = len(obj)
        if n == 0:
            return data_size == 0
        try:
            vals = list(obj.values())
            dtypes = list(map(_get_dtype, vals))
            if not _DTYPE_NAMES.issuperset(dtypes):
                return False
            shapes = list(map(_get_shape, vals))  # (no negative sizes or offsets: msgspec checked them)
            offs = np.fromiter(chain.from_iterable(map(_get_offsets, vals)), dtype=np.int64,
                               count=2 * n).reshape(n, 2)
            numel = np.fromiter(map(math.prod, shapes), dtype=np.int64, count=n)
            bits = np.fromiter(map(_BITS.__getitem__, dtypes), dtype=np.int64, count=n)
        except (TypeError, KeyError, ValueError, OverflowError, AttributeError):
            return False
        begin, end = offs[:, 0], offs[:, 1]
        if (end < begin).any() or (end > data_size).any():
            return False
        if not np.array_equal(numel * bits, (end - begin) * 8):
            return False
        order = np.lexsort((end, begin))
        b, e = begin[order], end[order]
        return bool(b[0] == 0 and np.array_equal(b[1:], e[:-1]) and e[-1] == data_size)

    def _explain_invalid(self, obj: dict, data_size: int) -> None:
        entries = {}
        dtypes = DTYPES
        if not isinstance(obj, dict):
            raise self._err("header is JSON but not an object", rule="container.header-json")
        obj = {k: v for k, v in obj.items() if k != "__metadata__"}
        for name, e in obj.items():
            try:
                dtype = e["dtype"]
                shape = e["shape"]
                begin, end = e["data_offsets"]
            except (TypeError, KeyError, ValueError):
                raise self._err("entry must be an object with 'dtype', 'shape' and a two-element "
                                "'data_offsets'", name, rule="container.entry") from None
            dt = dtypes.get(dtype) if type(dtype) is str else None
            if dt is None:
                raise self._err(f"unknown dtype {dtype!r} (known: {', '.join(dtypes)})", name,
                                rule="container.dtype")
            if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
                raise self._err(f"shape {shape!r} is not a list of non-negative integers", name,
                                rule="container.entry")
            if type(begin) is not int or type(end) is not int or not 0 <= begin <= end:
                raise self._err(f"data_offsets {[begin, end]!r} are not two integers 0 <= begin <= end",
                                name, rule="container.offsets")
            bits = math.prod(shape) * dt.bits
            if bits != (end - begin) * 8:
                raise self._err(f"shape {shape} × {dtype} needs {bits // 8 if bits % 8 == 0 else bits / 8} bytes but data_offsets "
                                f"[{begin}, {end}] span {end - begin}", name, rule="container.size-mismatch")
            if end > data_size:
                raise self._err(f"data_offsets [{begin}, {end}] run past the end of the file "
                                f"({data_size} data bytes; truncated or incomplete download?)", name,
                                rule="container.out-of-file")
            entries[name] = (begin, end)
        pos = 0
        prev = None
        # The reference parser requires the tensors, in offset order, to cover the data buffer
        # exactly: no gaps, no overlaps, nothing after the last tensor.
        for name, (begin, end) in sorted(entries.items(), key=lambda kv: kv[1]):
            if begin < pos:
                raise self._err(f"byte range [{begin}, {end}] overlaps tensor {prev!r} (which ends at {pos})",
                                name, rule="container.overlap")
            if begin > pos:
                raise self._err(f"{begin - pos} bytes of unreferenced data before this tensor "
                                f"(gap at [{pos}, {begin}])", name, rule="container.gap")
            pos = end
            prev = name
        if pos != data_size:
            raise self._err(f"{data_size - pos} bytes after the last tensor are not covered by any "
                            "tensor (file not fully covered)", rule="container.trailing")
        raise self._err("header failed validation", rule="container.header")  # pragma: no cover

    # -- access ------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """Tensor names in header order."""
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def info(self, name: str) -> TensorInfo:
        """Dtype, shape and absolute byte range of one tensor (no data read)."""
        try:
            e = self._entries[name]
        except KeyError:
            raise CheckpointError("no such tensor in this file", file=self.path, tensor=name,
                                  rule="container.no-tensor") from None
        begin, end = e.data_offsets
        return TensorInfo(name, e.dtype, tuple(e.shape), self.path,
                          self.data_offset + begin, self.data_offset + end)

    def raw_entries(self) -> dict[str, Entry]:
        """The validated header entries: ``name -> Entry(dtype, shape, data_offsets)``."""
        return self._entries

    def _buffer(self) -> mmap.mmap:
        mm = self._mm
        if mm is None:
            with _MAP_LOCK:  # several worker threads may read a file first at the same time
                if self._mm is None:
                    with open(self.path, "rb") as fh:
                        # Read-only mapping: nothing quantscope does can write into an opened checkpoint.
                        self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                        self._fd = os.dup(fh.fileno())
                mm = self._mm
        return mm

    def _check_unchanged(self, name: str | None) -> None:
        """Refuse a file that changed on disk since it was opened (re-quantized into the same
        folder, re-downloaded, synced): its header no longer describes it, and bytes of a mapping
        past a shortened file's end kill the process with a bus error, which Python cannot catch
        (the window died selecting a layer). The mapped file is looked at on every read (an
        fstat); its path, for a file replaced or deleted, at most every 50 ms."""
        if self._changed is None:
            fd = self._fd
            try:
                if fd is not None:  # the mapped file itself, every read (~1 µs): cut short or rewritten
                    st = os.fstat(fd)
                    self._compare((st.st_size, st.st_mtime_ns, self._stat[2]))
                now_t = time.monotonic()
                if fd is None or now_t - self._checked_at >= 0.05:
                    # the path, at most every 50 ms (a stat each cost an MoE sweep 5-10%):
                    # replaced or deleted (the mapping keeps the old file: no crash, stale bytes)
                    self._checked_at = now_t
                    st = os.stat(self.path)
                    self._compare((st.st_size, st.st_mtime_ns, st.st_ino))
            except FileNotFoundError:
                self._changed = "can no longer be read: it was moved or deleted since it was opened — open it again"
            except OSError as exc:  # (a passing failure of a network file system: said, not kept)
                raise CheckpointError(f"cannot be checked ({exc.strerror or exc})", file=self.path, tensor=name,
                                      rule="container.changed") from None
        if self._changed is not None:  # (said on every read from then on)
            raise CheckpointError(self._changed, file=self.path, tensor=name, rule="container.changed")

    def _compare(self, now: tuple) -> None:
        if now != self._stat:
            what = (f"now {now[0]:,} bytes, {self._stat[0]:,} when opened" if now[0] != self._stat[0]
                    else "rewritten" if now[2] == self._stat[2] else "replaced by another file")
            self._changed = (f"changed on disk since it was opened ({what}): its header no longer describes it "
                             "— open it again")

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Return a tensor (or rows ``[start, stop)`` of its first axis) as a read-only numpy array.

        Only the requested bytes are touched; the array is a view of the mmap for byte-sized
        dtypes, and an unpacked copy for sub-byte dtypes (F4, F6).
        """
        self._check_unchanged(name)
        info = self.info(name)
        dt = info.dtype_info
        shape = info.shape
        start, n_el = info.start, info.numel
        if rows is not None:
            if not shape:
                raise CheckpointError("a scalar has no rows", file=self.path, tensor=name)
            r0, r1 = rows
            r0, r1 = max(0, r0), min(shape[0], r1)
            r1 = max(r0, r1)
            row_el = math.prod(shape[1:])
            row_bits = row_el * dt.bits
            if row_bits % 8:
                raise CheckpointError(f"rows of {dt.name} {list(shape)} do not start on byte boundaries",
                                      file=self.path, tensor=name)
            start += r0 * row_bits // 8
            n_el = (r1 - r0) * row_el
            shape = (r1 - r0,) + shape[1:]
        if n_el == 0:
            return np.empty(shape, dtype=dt.numpy)
        buf = self._buffer()
        if dt.packed:
            nbytes = -(-n_el * dt.bits // 8)
            raw = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=start)
            codes = unpack_bits(raw, dt.bits, n_el)
            return codes.view(dt.numpy).reshape(shape)
        arr = np.frombuffer(buf, dtype=dt.numpy, count=n_el, offset=start)
        return arr.reshape(shape)

    def raw_bytes(self, name: str) -> memoryview:
        """The stored bytes of one tensor, as a read-only view of the mapping (no copy)."""
        self._check_unchanged(name)
        info = self.info(name)
        return memoryview(self._buffer())[info.start:info.end]

    def release_pages(self) -> None:
        """Drop this process's mapped pages of the file (they stay in the OS page cache).

        A sweep reads every tensor through mmap once; without this the resident set would grow to
        the size of all files touched.
        """
        if self._mm is not None:
            self.release_range(0, len(self._mm))

    def release_range(self, start: int, end: int) -> None:
        """Drop this process's mapped pages lying wholly inside bytes ``[start, end)`` of the file
        (one tensor's, or some of its rows'); a page shared with a neighbour stays (the file's
        last page has none after it). Only the resident set changes: a later read maps the pages
        again from the page cache."""
        mm = self._mm
        if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        a = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        b = len(mm) if end >= len(mm) else end // mmap.PAGESIZE * mmap.PAGESIZE
        if b > a:
            try:
                mm.madvise(mmap.MADV_DONTNEED, a, b - a)
            except (OSError, ValueError):
                pass

    def release_tensor(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """:meth:`release_range` of tensor ``name``'s bytes (of rows ``[r0, r1)`` of it flattened to
        ``[rows, last axis]``)."""
        e = self._entries.get(name)
        if e is None or self._mm is None:
            return
        begin, end = (self.data_offset + o for o in e.data_offsets)
        if rows is not None and e.shape:
            row_bytes = (end - begin) // max(1, math.prod(e.shape[:-1]))
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
        self.release_range(begin, end)

    def close(self) -> None:
        """Drop the mapping (arrays still referencing it keep it alive until they are freed)."""
        mm, self._mm = self._mm, None
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # views are still alive; the mapping is released when they are

    def __repr__(self) -> str:
        return f"SafetensorsFile({str(self.path)!r}, {len(self)} tensors)"
