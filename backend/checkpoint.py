"""A checkpoint: one file, a model folder, a sharded index, or a model in the local HF cache.

Opening reads only headers (and small JSON configs). Tensors are grouped into modules (the dotted
path without the component suffix) so scheme detection sees ``…q_proj`` with its
``weight/scales/biases`` or ``qweight/qzeros/scales/g_idx`` parts together.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import msgspec

from .dtypes import DTYPES
from .errors import CheckpointError, ShardIndexError, UnsafePathError, UnsupportedFormatError
from .safetensors_file import SafetensorsFile, TensorInfo

_logger = logging.getLogger(__name__)

INDEX_SUFFIX = ".safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
#: JSON files that describe quantization, in the order they are looked for.
CONFIG_FILES = ("config.json", "quantize_config.json", "quant_config.json", "quantization_config.json",
                "hf_quant_config.json")
_MAX_CONFIG_BYTES = 16 * 1024 * 1024

# Component suffixes that span more than one dotted segment (bitsandbytes quant state).
_MULTI_SEGMENT = re.compile(r"^(?P<module>.+?)\.(?P<component>weight\.(?:absmax|quant_map|nested_absmax|"
                            r"nested_quant_map|quant_state\..+))$")

# gpt-oss's MXFP4 experts: one stacked projection's tensors named ``…experts.{proj}_blocks`` /
# ``_scales`` (formats.md §2), the projection being the module (its ``_bias`` joins it as its
# ``bias``: :data:`_PARAM_EXPERTS`).
_PACKED_EXPERTS = re.compile(r"^(?P<module>.+\.experts\.[a-z_]+_proj)_(?P<component>blocks|scales)$")
# transformers' stacked expert parameters: ``…experts.gate_up_proj`` / ``…experts.down_proj`` are
# the parameters themselves (no ``.weight``), ``[E, K, N]`` where the model multiplies ``x @ W``
# (gpt-oss, Llama 4, Qwen3-VL-MoE) or ``[E, N, K]`` (Gemma 4, Qwen3.5-MoE), with gpt-oss's
# ``…experts.gate_up_proj_bias`` ``[E, N]`` beside them. Each is its projection's weight, read
# through a view ``{projection}.weight`` of ``[E, N, K]`` like every other weight
# (:meth:`Checkpoint.modules`), and its bias, read under its own name.
_PARAM_EXPERTS = re.compile(r"^(?P<module>.+\.experts\.(?:gate_up_proj|down_proj|gate_proj|up_proj))(?P<bias>_bias)?$")
#: model types whose stacked expert parameters are ``[E, N, K]`` (their mlx-lm sanitize splits
#: gate/up along axis -2 without swapping): where the shapes cannot tell
_EXPERTS_ROW_MAJOR = ("gemma4", "qwen3_5_moe")


def split_name(name: str) -> tuple[str, str]:
    """Split a tensor name into (module path, component suffix).

    >>> split_name("model.layers.0.self_attn.q_proj.qweight")
    ('model.layers.0.self_attn.q_proj', 'qweight')
    >>> split_name("model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4")
    ('model.layers.0.mlp.up_proj', 'weight.quant_state.bitsandbytes__nf4')
    >>> split_name("model.layers.0.mlp.experts.gate_up_proj_blocks")
    ('model.layers.0.mlp.experts.gate_up_proj', 'blocks')
    >>> split_name("model.layers.0.mlp.experts.down_proj_bias")
    ('model.layers.0.mlp.experts.down_proj', 'bias')
    """
    if ".weight." in name:
        m = _MULTI_SEGMENT.match(name)
        if m:
            return m["module"], m["component"]
    if name.endswith(("_blocks", "_scales")):  # (a cheap test first: an index lists 100,000 names)
        m = _PACKED_EXPERTS.match(name)
        if m:  # gpt-oss: experts.gate_up_proj_blocks -> (experts.gate_up_proj, blocks)
            return m["module"], m["component"]
    if name.endswith(("_proj", "_proj_bias")) and "experts." in name:
        m = _PARAM_EXPERTS.match(name)
        if m:  # experts.gate_up_proj -> (experts.gate_up_proj, weight); …_bias -> (…, bias)
            return m["module"], "bias" if m["bias"] else "weight"
    module, dot, component = name.rpartition(".")
    if not dot:
        return name, ""
    return module, component


class _Index(msgspec.Struct):
    weight_map: dict[str, str] | None = None
    metadata: dict[str, Any] | None = None


# Index files decode with typed values so a 100,000-entry weight_map is checked in C.
_INDEX = msgspec.json.Decoder(_Index)
_DIGITS = re.compile(r"(\d+)")


def natural_key(text: str):
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in _DIGITS.split(text) if p]


@dataclass
class Module:
    """A module path and its stored tensors, keyed by component suffix."""

    path: str
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


class _OneFile(Mapping):
    """name → file for a single-file checkpoint, without building a dict."""

    def __init__(self, f: SafetensorsFile) -> None:
        self._f = f
        self._names = f.raw_entries()

    def __getitem__(self, name: str) -> SafetensorsFile:
        if name not in self._names:
            raise KeyError(name)
        return self._f

    def __contains__(self, name) -> bool:
        return name in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class _IndexMap(Mapping):
    """name → file through a consistent index's weight_map (already a dict) and shard names."""

    def __init__(self, weight_map: dict[str, str], shards: dict[str, SafetensorsFile]) -> None:
        self._wm = weight_map
        self._shards = shards

    def __getitem__(self, name: str) -> SafetensorsFile:
        return self._shards[self._wm[name]]

    def __contains__(self, name) -> bool:
        return name in self._wm

    def __iter__(self):
        return iter(self._wm)

    def __len__(self) -> int:
        return len(self._wm)


def _within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


class Checkpoint:
    """A set of safetensors files opened as one model.

    Parameters
    ----------
    path
        A ``.safetensors`` file, a model folder, a ``*.safetensors.index.json``, or a repo id
        (``org/name``) already in the local Hugging Face cache.

    Attributes
    ----------
    root : Path
        The model folder (configs are looked for here).
    files : list of SafetensorsFile
        The shards, in index order (or name order).
    configs : dict
        Parsed JSON configs by file name (``config.json``, ``quantize_config.json``, …).
    notes : list of str
        Things a person should know about how the checkpoint was opened.
    unsupported : list of Path
        Pickle checkpoints found next to it; never unpickled.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        # Parsing a large header allocates hundreds of thousands of small containers; the cyclic
        # GC would rescan them over and over (measured: 2x the whole open time on 100 shards).
        # Nothing here creates reference cycles, so pause it while opening.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            self._open(path)
        finally:
            if gc_was_enabled:
                gc.enable()

    @classmethod
    def from_files(cls, source: str | os.PathLike, root: str | os.PathLike,
                   files: list[SafetensorsFile]) -> "Checkpoint":
        """A checkpoint over shards already parsed (no index), e.g. the healthy subset of a
        broken checkpoint that the doctor still analyses layer by layer."""
        ck = cls.__new__(cls)
        ck.source, ck.path, ck.root = str(source), Path(source), Path(root)
        ck.notes, ck.warnings, ck.unsupported = [], [], []
        ck.index, ck.index_path, ck._containment, ck.shard_of = None, None, None, None
        ck.files = list(files)
        ck._build_tensor_map()
        ck.configs = ck._read_configs()
        return ck

    def _open(self, path: str | os.PathLike) -> None:
        self.source = str(path)
        self.notes: list[str] = []
        self.warnings: list[str] = []
        #: Tensors the index lists that their shard does not hold (an incomplete download).
        self.index_missing: list[str] = []
        self.unsupported: list[Path] = []
        self.index: dict | None = None
        self.index_path: Path | None = None
        #: (index, weight map) of the index beside a file opened alone that lists it as a shard
        self.shard_of: tuple[Path, dict[str, str]] | None = None
        p = Path(path).expanduser()
        self._containment: Path | None = None
        if not p.exists():
            resolved = _resolve_hf_repo(str(path))
            if resolved is None:
                raise CheckpointError(missing_reason(p), file=path, rule="container.missing")
            p, self._containment = resolved
            self.notes.append(f"found in the Hugging Face cache: {p}")
        self.path = p
        if p.is_dir():
            self.root = p
            files = self._open_folder(p)
        elif p.name.endswith(INDEX_SUFFIX) or p.name.endswith(".index.json"):
            self.root = p.parent
            files = self._open_index(p)
        elif p.suffix in PICKLE_SUFFIXES:
            raise UnsupportedFormatError("pickle checkpoints are not supported and are never unpickled "
                                         "(they can run arbitrary code); convert it to safetensors first",
                                         file=p, rule="container.unsupported")
        else:
            self.root = p.parent
            files = [SafetensorsFile(p)]
            self._note_shard_of(p)
        self.files: list[SafetensorsFile] = files
        self._build_tensor_map()
        self.configs = self._read_configs()

    # -- opening -----------------------------------------------------------------------------

    def _open_folder(self, folder: Path) -> list[SafetensorsFile]:
        indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
        st_files = sorted(folder.glob("*.safetensors"), key=lambda q: natural_key(q.name))
        self.unsupported = sorted(q for q in folder.iterdir() if q.suffix in PICKLE_SUFFIXES and q.is_file())
        if self.unsupported:
            self.notes.append("not opened (pickle, never unpickled): "
                              + ", ".join(q.name for q in self.unsupported))
        if indexes:
            if len(indexes) > 1:
                self.warnings.append(f"several index files; using {indexes[0].name}")
            return self._open_index(indexes[0])
        if not st_files:
            if self.unsupported:
                raise UnsupportedFormatError("only pickle checkpoints here (" + ", ".join(
                    q.name for q in self.unsupported) + "); they are never unpickled — convert to "
                    "safetensors first", file=folder, rule="container.unsupported")
            raise CheckpointError("no .safetensors files in this folder", file=folder, rule="container.missing")
        if len(st_files) > 1:
            self.notes.append(f"no index file: opened all {len(st_files)} .safetensors files in the folder")
        return [SafetensorsFile(f) for f in st_files]

    def _note_shard_of(self, file: Path) -> str | None:
        """A file opened alone that an index beside it lists among other shards: ``shard_of``
        is ``(index path, {tensor: shard})`` and a warning says so (each layer split across
        shards looked broken: "qzeros stored without the weights they decode"); returns it."""
        for index_path in sorted(file.parent.glob("*" + INDEX_SUFFIX)):
            try:
                wm = json.loads(index_path.read_bytes()).get("weight_map")
            except (OSError, ValueError, AttributeError, RecursionError):
                continue
            if not isinstance(wm, dict):
                continue
            shards = {v for v in wm.values() if isinstance(v, str)}
            if file.name in shards and len(shards) > 1:
                self.shard_of = (index_path, {k: v for k, v in wm.items() if isinstance(v, str)})
                said = (f"this file is one of the {len(shards)} shards that {index_path.name} lists: a layer split "
                        f"across shards is incomplete here — open the folder {file.parent} for the whole model")
                self.warnings.append(said)
                return said
        return None

    def _open_index(self, index_path: Path) -> list[SafetensorsFile]:
        self.index_path = index_path
        try:
            with open(index_path, "rb") as fh:
                data = _INDEX.decode(fh.read())
        except FileNotFoundError:
            raise CheckpointError("index file not found", file=index_path, rule="container.missing") from None
        except msgspec.ValidationError as exc:
            raise ShardIndexError(f"index does not have the expected shape ({exc})", file=index_path,
                                  rule="index.json") from None
        except msgspec.DecodeError as exc:
            raise ShardIndexError(f"index is not valid JSON ({exc})", file=index_path,
                                  rule="index.json") from None
        if data.weight_map is None:
            raise ShardIndexError("index has no 'weight_map' object (tensor name → shard file)",
                                  file=index_path, rule="index.no-weight-map")
        self.index = {"weight_map": data.weight_map, "metadata": data.metadata}
        folder = index_path.parent
        root = (self._containment or link_root(folder)).resolve()
        shards: dict[str, Path] = {}
        linked_out: list[str] = []
        wm = data.weight_map

        def first_tensor(shard):  # (named in an error only: a loop over 100,000 names cost 12 ms)
            return next(t for t, s in wm.items() if s == shard)

        for shard in dict.fromkeys(wm.values()):  # each shard once, in order
            if not isinstance(shard, str) or not shard:
                raise ShardIndexError(f"weight_map entry is {shard!r}, not a file name", file=index_path,
                                      tensor=first_tensor(shard), rule="index.entry")
            rel = Path(shard)
            if rel.is_absolute() or ".." in rel.parts:
                raise UnsafePathError(f"shard path {shard!r} points outside the model folder; refused",
                                      file=index_path, tensor=first_tensor(shard))
            target = folder / rel
            if not _within(target.resolve(), root):
                # a folder of links to shards stored elsewhere (made with `ln -s` to assemble or
                # rename a model; transformers and mlx-lm follow them): the user's own links, read
                # as the files they name; only names in the index that leave the folder are refused
                linked_out.append(shard)
            if not target.is_file():
                if target.exists():  # a folder, a pipe, a device (a link to one): never opened
                    raise ShardIndexError(f"index names shard {shard!r}, which is not a regular file", file=index_path,
                                          tensor=first_tensor(shard), rule="index.missing-shard")
                raise ShardIndexError(f"index names shard {shard!r}, which is missing", file=index_path,
                                      tensor=first_tensor(shard), rule="index.missing-shard")
            shards[shard] = target
        if not shards:
            raise ShardIndexError("weight_map is empty", file=index_path, rule="index.no-weight-map")
        if linked_out:
            where = sorted({str(shards[n].resolve().parent) for n in linked_out})
            self.notes.append(f"{len(linked_out)} of {len(shards)} shard(s) are links to files outside the folder, "
                              f"read where they point: {', '.join(where[:3])}{' …' if len(where) > 3 else ''}")
        files = []
        try:
            for shard, t in shards.items():
                files.append(SafetensorsFile(t))
        except CheckpointError as exc:  # which index entry sent it there, said too
            for f in files:
                f.close()
            n = sum(1 for v in wm.values() if v == shard)
            more = f" and {n - 1} more" if n > 1 else ""
            exc.message = f"{exc.message} (named as a shard by {index_path.name}, for {first_tensor(shard)!r}{more})"
            exc.args = (str(exc),)
            raise
        self._shard_names = dict(zip(shards, files))
        listed = {str(t.name) for t in shards.values()}
        stray = sorted(q.name for q in folder.glob("*.safetensors") if q.name not in listed)
        # a file that globbing loaders take for a shard is a warning; another (Mistral's
        # consolidated.safetensors) only a note
        for said, names in ((self.warnings, [n for n in stray if n.startswith("model")]),
                            (self.notes, [n for n in stray if not n.startswith("model")])):
            if names:
                said.append("not in the index, not opened: " + ", ".join(names))
        return files

    def _build_tensor_map(self) -> None:
        # No per-tensor Python loop and no 100,000-entry dict rebuilt in the common cases: a
        # single file maps every name to itself, and a consistent index is its own map.
        if len(self.files) == 1 and self.index is None:
            self._where = _OneFile(self.files[0])
        elif self.index is not None and self._index_consistent():
            self._where = _IndexMap(self.index["weight_map"], self._shard_names)
        else:
            self._where = self._merge_files()
        self._modules: dict[str, Module] | None = None
        self._views: dict[str, TensorInfo] = {}

    def _index_consistent(self) -> bool:
        """True when every shard holds exactly the tensors the index assigns to it."""
        wm = self.index["weight_map"]
        if sum(len(f) for f in self.files) != len(wm):
            return False
        # Each shard's names all map back to that shard; with equal totals and unique names per
        # file this is a bijection (C-level map/set, no Python loop per tensor).
        return all(set(map(wm.get, f.raw_entries())) == {shard} for shard, f in self._shard_names.items())

    def _merge_files(self) -> dict[str, SafetensorsFile]:
        where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            names = f.raw_entries()
            if not where.keys().isdisjoint(names):
                dupes = [n for n in names if n in where]
                self.warnings.append(f"{len(dupes)} tensor(s) stored in more than one file, e.g. "
                                     f"{dupes[0]!r} in {where[dupes[0]].path.name} and {f.path.name}; "
                                     "the first is used")
                names = {n: None for n in names if n not in where}
            where.update(dict.fromkeys(names, f))
        if self.index is not None:
            wm = self.index["weight_map"]
            by_name = self._shard_names
            listed_wrong = [t for t, s in wm.items() if t not in by_name[s]]
            # absent from every shard (an incomplete download), or held by another shard than the
            # index says (a wrong index: read from where it is; a conversion writes a right one)
            missing = [t for t in listed_wrong if t not in where]
            elsewhere = [t for t in listed_wrong if t in where]
            self.index_missing = missing
            if missing:
                self.warnings.append(f"{len(missing)} tensor(s) listed in the index are absent from "
                                     f"their shard, e.g. {missing[0]!r}")
            if elsewhere:
                t = elsewhere[0]
                self.warnings.append(f"{len(elsewhere)} tensor(s) listed in the index under another shard than "
                                     f"the one holding them, e.g. {t!r} under {wm[t]} but in {where[t].path.name}: "
                                     "the index is wrong (loaders that follow it fail); read from where they are")
            extra = [t for t in where if t not in wm]
            if extra:
                self.warnings.append(f"{len(extra)} tensor(s) in the shards are not in the index, "
                                     f"e.g. {extra[0]!r}")
            # Where the index names a shard that does hold the tensor, the index wins.
            for t, s in wm.items():
                f = by_name[s]
                if t in f:
                    where[t] = f
        return where

    @property
    def tied_embeddings(self) -> bool | None:
        """config.json's ``tie_word_embeddings`` (a VLM's under ``text_config``): whether the
        output head is the embedding table; None where the config does not say."""
        conf = self.configs.get("config.json") or {}
        tie = conf.get("tie_word_embeddings")
        if tie is None and isinstance(conf.get("text_config"), dict):
            tie = conf["text_config"].get("tie_word_embeddings")
        return tie

    def _read_configs(self) -> dict[str, dict]:
        configs: dict[str, dict] = {}
        for name in CONFIG_FILES:
            q = self.root / name
            if not q.is_file():
                if q.is_dir() or (q.exists() and not q.is_file()):  # (a folder, a FIFO: loaders fail on it)
                    kind = "a folder" if q.is_dir() else "not a regular file"
                    self.warnings.append(f"{name} ignored: it is {kind}")
                continue
            try:
                if q.stat().st_size > _MAX_CONFIG_BYTES:
                    raise ValueError("larger than 16 MB")
                raw = q.read_bytes()
                data = json.loads(raw)
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
                if raw.startswith(b"\xef\xbb\xbf"):  # json.loads of bytes skips it; a loader reading text does not
                    self.warnings.append(f"{name} starts with a UTF-8 byte-order mark: transformers' loader fails "
                                         "on it (Unexpected UTF-8 BOM); read here as if it had none")
            except RecursionError:  # a pathologically nested file: json recurses per level
                self.warnings.append(f"{name} ignored: nested too deeply to read")
                continue
            except PermissionError as exc:
                self.warnings.append(f"{name} ignored: cannot be read ({exc.strerror or exc})")
                continue
            except (ValueError, OSError) as exc:
                self.warnings.append(f"{name} ignored: {exc}")
                continue
            configs[name] = data
        return configs

    # -- queries -----------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        """All tensor names."""
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def _view(self, name: str) -> TensorInfo | None:
        """The view named ``name`` of a stored tensor (see :class:`TensorInfo`'s ``source``);
        None for a stored name."""
        if name in self._where:
            return None
        if self._modules is None:
            self.modules()
        return self._views.get(name)

    def stored_name(self, name: str) -> str:
        """The name the file stores tensor ``name`` under (a view's source; else ``name``)."""
        v = self._view(name) if isinstance(name, str) else None
        return name if v is None else v.source

    def file_of(self, name: str) -> SafetensorsFile:
        """The shard holding ``name`` (a CheckpointError naming it if there is none)."""
        if (v := self._view(name)) is not None:
            name = v.source
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError("no such tensor in this checkpoint", file=self.source, tensor=name,
                                  rule="container.no-tensor") from None

    def info(self, name: str) -> TensorInfo:
        if (v := self._view(name)) is not None:
            return v
        return self.file_of(name).info(name)

    def tensor(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Read one tensor (or rows ``[start, stop)`` of its first axis) through mmap; read-only
        array. A transposed view (:class:`TensorInfo`) is the stored array with its last two axes
        swapped: not contiguous (:meth:`rows` reads its flattened rows contiguous)."""
        if (v := self._view(name)) is not None:
            a = self.file_of(v.source).read(v.source, rows)
            return np.swapaxes(a, -1, -2) if v.transposed else a
        return self.file_of(name).read(name, rows)

    def rows(self, name: str, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` of tensor ``name`` flattened to ``[rows, last axis]``, in its stored
        dtype: a view of the mapping, or for a transposed view a contiguous copy of those rows
        (:meth:`rows_into`)."""
        v = self._view(name)
        if v is None or not v.transposed:
            a = self.tensor(name)  # (sizes named: -1 is no size where a dimension is 0)
            return a.reshape(math.prod(a.shape[:-1]), a.shape[-1])[r0:r1] if a.ndim else a.reshape(1, 1)[r0:r1]
        r0, r1 = max(0, r0), min(math.prod(v.shape[:-1]), r1)
        out = np.empty((max(0, r1 - r0), v.shape[-1]), DTYPES[v.dtype].numpy)
        self.rows_into(name, r0, r1, out)
        return out

    def rows_into(self, name: str, r0: int, r1: int, dst: np.ndarray) -> None:
        """:meth:`rows` into ``dst`` ``[r1 - r0, K]`` (float32, or the stored dtype); for a
        transposed view, straight from the mapping, expert by expert, by a compiled kernel that
        gathers the rows from the stored columns (numpy's transposing copy without it), dropping
        an expert's mapped pages once its last row is read (a sweep's workers each read their own
        blocks)."""
        from .formats.fast import columns_as_rows
        v = self._view(name)
        if v is None or not v.transposed:
            dst[...] = self.rows(name, r0, r1)
            return
        n = v.shape[-2]
        if n == 0 or r1 <= r0:
            return
        f = self.file_of(v.source)
        stride = (v.end - v.start) // v.shape[0]
        for e in range(r0 // n, -(-r1 // n)):
            a, b = max(r0, e * n), min(r1, (e + 1) * n)
            src = f.read(v.source, (e, e + 1))[0]  # [K, N]
            if not columns_as_rows(src, a - e * n, dst[a - r0:b - r0]):
                dst[a - r0:b - r0] = src[:, a - e * n:b - e * n].T
            if b == (e + 1) * n:
                f.release_range(v.start + e * stride, v.start + (e + 1) * stride)

    def release(self, names, rows: tuple[int, int] | None = None) -> None:
        """Drop this process's mapped pages of tensors ``names`` (of rows ``[r0, r1)`` of each,
        flattened to ``[rows, last axis]``, when given): what a sweep has finished reading (they
        stay in the page cache)."""
        for name in names:
            if name in self._where:
                self._where[name].release_tensor(name, rows)
            elif (v := self._view(name)) is not None and (not v.transposed or rows is None):
                # (a transposed view's rows are no byte range: those pages go expert by expert)
                self._where[v.source].release_tensor(v.source, rows)

    def modules(self) -> dict[str, Module]:
        """Modules in natural order, each with its stored tensors by component."""
        if self._modules is None:
            mods: dict[str, Module] = {}
            params = []  # (module, component) of transformers' stacked expert parameters
            for name, f in self._where.items():
                mpath, comp = split_name(name)
                m = mods.get(mpath)
                if m is None:
                    m = mods[mpath] = Module(mpath)
                info = m.tensors[comp] = f.info(name)
                if comp == "weight" and name != f"{mpath}.weight":  # (a bias is read under its own name)
                    params.append((m, comp, info))
            views: dict[str, TensorInfo] = {}  # (published whole, before the modules: see _view)
            # (every orientation decided from the stored shapes before any becomes a view)
            turn = [len(info.shape) == 3 and self._experts_transposed(m.path, mods) for m, _, info in params]
            for (m, comp, info), t in zip(params, turn):
                view = f"{m.path}.{comp}"
                if view in self._where:
                    # (a tensor of that name is stored too: it is the module's weight, and the bare
                    # parameter stays its parent's component, as before these were read)
                    m.tensors[comp] = self._where[view].info(view)
                    parent, _, proj = m.path.rpartition(".")
                    mods.setdefault(parent, Module(parent)).tensors[proj] = info
                    continue
                shape = info.shape[:-2] + info.shape[-1:] + info.shape[-2:-1] if t else info.shape
                m.tensors[comp] = views[view] = TensorInfo(view, info.dtype, shape, info.file, info.start,
                                                           info.end, source=info.name, transposed=t)
            self._views = views
            self._modules = {k: mods[k] for k in sorted(mods, key=natural_key)}
        return self._modules

    def _experts_transposed(self, path: str, mods: dict[str, Module]) -> bool:
        """Whether the stacked expert parameter of projection ``path`` (``…experts.down_proj``) is
        stored ``[E, K, N]``. gate/up ``[E, a, b]`` and down ``[E, c, d]`` are ``[E, K, N]`` when
        b = 2c and a = d (gate/up's N is twice down's K), ``[E, N, K]`` when a = 2d and b = c: never
        both. Without the pair, the hidden size decides (gate/up's K, down's N), then the model type
        (transformers' experts multiply ``x @ W``, but for Gemma 4's and Qwen3.5-MoE's)."""
        parent, _, proj = path.rpartition(".")

        def shape(p):
            m = mods.get(f"{parent}.{p}")
            t = None if m is None else m.tensors.get("weight")
            return t.shape if t is not None and len(t.shape) == 3 else None

        gu, dn = shape("gate_up_proj"), shape("down_proj")
        if gu is not None and dn is not None:
            if gu[2] == 2 * dn[1] and gu[1] == dn[2]:
                return True
            if gu[1] == 2 * dn[2] and gu[2] == dn[1]:
                return False
        cfg = self.configs.get("config.json") or {}
        text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
        hidden = text.get("hidden_size", cfg.get("hidden_size"))
        s = shape(proj)
        if isinstance(hidden, int) and s is not None and (s[1] == hidden) != (s[2] == hidden):
            return (s[2] == hidden) == (proj == "down_proj")
        return not any(k in kind for kind in self.model_types() for k in _EXPERTS_ROW_MAJOR)

    def model_types(self) -> tuple[str, str]:
        """config.json's ``model_type`` and its ``text_config``'s (a multimodal wrapper's text
        model: ``qwen3_vl_moe`` and ``qwen3_vl_moe_text``), "" where absent."""
        cfg = self.configs.get("config.json") or {}
        text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
        return str(cfg.get("model_type") or ""), str(text.get("model_type") or "")

    @property
    def total_bytes(self) -> int:
        return sum(e.data_offsets[1] - e.data_offsets[0] for f in self.files
                   for e in f.raw_entries().values())

    def holds(self, out: str | os.PathLike) -> bool:
        """Whether writing ``out`` would write into this checkpoint: a path inside the folder it
        was opened as (a model folder, an index's folder), a path directly in the folder of a
        single ``.safetensors`` file opened beside its config, or one of the files it reads (a lone
        ``.safetensors`` file and the configs beside it) — through symbolic links too
        (a link named out.npy to a shard; an HF cache snapshot, whose files link to its blobs)."""
        o = Path(os.path.realpath(Path(out).expanduser()))  # every link on the way, the last too
        roots = [self._containment] if self._containment is not None else []
        if self.path.is_dir() or self.index_path is not None:
            roots.append(self.root)
        for r in roots:
            r = Path(os.path.realpath(r))
            if o == r or r in o.parents:
                return True
        # a single file opened in a model folder (its config beside it) stands for that folder's
        # own entries (a stray ~/config.json must not lock all of ~); a lone file (in ~/Downloads,
        # say) only for itself and the configs it reads
        if any((self.root / n).is_file() for n in CONFIG_FILES) and o.parent == Path(os.path.realpath(self.root)):
            return True
        read = [Path(os.path.realpath(q)) for q in [f.path for f in self.files] + [self.root / n for n in CONFIG_FILES]
                if q.exists()]
        # a file it reads, or a folder holding one (a shard linked from elsewhere: replacing the
        # folder it lies in, `convert --overwrite`, destroyed the checkpoint being read)
        return any(o == q or o in q.parents for q in read)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.source!r}, {len(self.files)} file(s), {len(self)} tensors)"


def hf_cache_dir() -> str:
    """The Hugging Face hub cache folder, honouring HF_HUB_CACHE / HF_HOME set at run time."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return env
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def missing_reason(p: Path) -> str:
    """Why a path that does not exist cannot be opened, in words: a symbolic link loop and a
    broken link were both "no such file or folder"."""
    try:
        os.stat(p)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop (a link that leads back to itself)"
    if os.path.islink(p):
        try:
            return f"a broken symbolic link (to {os.readlink(p)}, which does not exist)"
        except OSError:
            pass
    return "no such file or folder (and no model with that repo id in the local Hugging Face cache)"


def link_root(folder: Path) -> Path:
    """The folder a model's shard links may resolve into: the model folder itself, or, for a
    snapshot of the Hugging Face cache (``…/models--org--name/snapshots/REV``, by its path as
    given), the repo's folder, whose ``blobs/`` its files link to (its shards are then not said
    to be links out of the folder)."""
    folder = Path(os.path.abspath(folder))
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.resolve()
    return folder.resolve()


def _resolve_hf_repo(repo_id: str) -> tuple[Path, Path] | None:
    """Find ``org/name`` in the local Hugging Face cache (offline); return (snapshot, repo dir)."""
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".")):
        return None
    try:
        from huggingface_hub import scan_cache_dir
        info = scan_cache_dir(hf_cache_dir())
    except Exception as exc:  # no cache folder, unreadable cache: just "not found"
        _logger.debug("HF cache scan failed: %s", exc)
        return None
    for repo in info.repos:
        if repo.repo_id == repo_id and repo.repo_type == "model" and repo.revisions:
            rev = max(repo.revisions, key=lambda r: r.last_modified)
            return Path(rev.snapshot_path), Path(repo.repo_path).resolve()
    return None


def list_hf_cache_models() -> list[dict]:
    """Models in the local Hugging Face cache that hold safetensors files (offline)."""
    try:
        from huggingface_hub import scan_cache_dir
        info = scan_cache_dir(hf_cache_dir())
    except Exception:
        return []
    out = []
    for repo in info.repos:
        if repo.repo_type != "model" or not repo.revisions:
            continue
        rev = max(repo.revisions, key=lambda r: r.last_modified)
        if any(f.file_name.endswith(".safetensors") for f in rev.files):
            out.append({"repo_id": repo.repo_id, "path": str(rev.snapshot_path), "size": repo.size_on_disk})
    return sorted(out, key=lambda d: d["repo_id"].lower())


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint; see :class:`Checkpoint`."""
    return Checkpoint(path)


def refuse_writing_into(out: str | os.PathLike, checkpoints) -> None:
    """Raise when ``out`` lies in one of the open ``checkpoints`` (Checkpoint or Model): quantscope
    never writes into a checkpoint it opened (``dequant -o wsrc/model.safetensors`` replaced the
    weights it had just read with an .npy). ``"-"`` (stdout) and None pass."""
    if out is None or str(out) == "-":
        return
    for c in checkpoints:
        ck = getattr(c, "ckpt", c)
        if ck is not None and ck.holds(out):
            raise CheckpointError(f"is in the checkpoint {ck.source} that this reads; quantscope never writes "
                                  "into a checkpoint it opened: choose a path elsewhere", file=out,
                                  rule="output.into-checkpoint")
