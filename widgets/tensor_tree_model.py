"""TensorTreeModel: a lazy QAbstractItemModel over one checkpoint's modules.

Rows are modules (natural order, from the backend); a module's children are its stored tensors,
built only when the view asks. Structure comes from headers; errors and doctor flags arrive
later through ``dataChanged``. Filtering is a list of visible module ids computed by the
backend's :class:`~quantscope.backend.search.PathIndex`, never a recursive proxy.
"""

from __future__ import annotations

import math
import re

from PySide6.QtCore import QAbstractItemModel, QModelIndex, Qt
from PySide6.QtGui import QColor, QIcon, QPixmap

from quantscope.backend.checkpoint import natural_key
from quantscope.backend.dtypes import DTYPES
from quantscope.backend.info import human_bytes
from quantscope.backend.schemes import Layer, Model

from .palette import ERROR_KEY, SEVERITY_COLORS, error_color, text_color_on

BASE_COLUMNS = ["Name", "Scheme", "Bits", "Group", "Shape", "Bytes", "Bits/weight"]
_SEVERITY_ORDER = {"error": 3, "warning": 2, "info": 1}
_SEVERITY_COLOR = {k: QColor(v) for k, v in SEVERITY_COLORS.items() if k != "info"}
# Roles as plain ints: views ask data() for eight roles per painted cell and PySide passes ints;
# comparing them with the enum members goes through enum.__eq__, which was most of data()'s cost.
_DISPLAY = int(Qt.ItemDataRole.DisplayRole.value)
_TOOLTIP = int(Qt.ItemDataRole.ToolTipRole.value)
_BACKGROUND = int(Qt.ItemDataRole.BackgroundRole.value)
_ALIGN = int(Qt.ItemDataRole.TextAlignmentRole.value)
_FOREGROUND = int(Qt.ItemDataRole.ForegroundRole.value)
_PATH = int(Qt.ItemDataRole.UserRole.value) + 1
_SERVED = frozenset((_DISPLAY, _TOOLTIP, _BACKGROUND, _ALIGN, _FOREGROUND, _PATH))
_RIGHT = int((Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter).value)


def _shape(shape) -> str:
    return "×".join(str(d) for d in shape) if shape else ""



def column_names(labels: list[str]) -> dict[str, str]:
    """Each variant's column title: its name without the parts it shares with every other name
    of its family (the names that begin alike), its own separators kept. Elided in the middle,
    gptqmodel-gptq-w4g128 and gptqmodel-gptq-w3g128 were both "gptq…g128"; now "gptqmodel-w4g128"
    and "gptqmodel-w3g128" keep what tells them apart at both ends."""
    parts = {lb: re.split(r"([-_]+)", lb) for lb in labels}  # token, separator, token, ...

    def tokens(lb):
        return [t for t in parts[lb][::2] if t]
    out = {}
    for lb in labels:
        t = tokens(lb)
        family = [tokens(o) for o in labels if tokens(o)[:1] == t[:1]]
        common = set(t[1:]).intersection(*(set(f[1:]) for f in family)) if len(family) > 1 and len(t) > 1 else set()
        if not common:
            out[lb] = lb
            continue
        ps = parts[lb]
        kept = ps[0]
        for i in range(1, len(ps) - 1, 2):  # (separator, token) pairs after the first token
            if ps[i + 1] not in common:
                kept += ps[i] + ps[i + 1]
        out[lb] = kept
    # a title two variants would share: their whole names
    for lb, title in list(out.items()):
        if sum(1 for t in out.values() if t == title) > 1:
            out[lb] = lb
    return out

class TensorTreeModel(QAbstractItemModel):
    """Modules of one checkpoint with per-variant error and doctor columns."""

    #: Role returning the module path of an index (tensor rows return their module's path).
    PathRole = _PATH

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._model: Model | None = None
        self._layers: list[Layer] = []
        self._visible: list[int] = []
        self._children: dict[int, list] = {}
        self._variants: list[str] = []
        self._swatches: dict = {}  # variant -> QIcon of its plot colour (set_variants)
        self._errors: dict[str, dict[str, float]] = {}
        self._headers: dict[str, str] = {}
        #: The checkpoint the tree shows: its error column, beside Name, is headed "error" (its
        #: name is in the box above; elided to that column's width it read "g…8").
        self.own: str | None = None
        #: per variant and module: (mark after the figure, tooltip) of its error cell
        self._notes: dict[str, dict[str, tuple[str, str]]] = {}
        self._flags: dict[str, tuple[str, str]] = {}
        self.dark = False
        self._sort: tuple[int, object] = (-1, Qt.SortOrder.AscendingOrder)  # -1: the checkpoint's order
        # per variant, per module path: (text, background) of its error cell, made at its first
        # paint, not in every data() call of every repaint (a visible error column is asked for
        # both, for each row, at each paint, while workers hold the GIL)
        self._shown: dict[str, dict[str, tuple[str, object]]] = {}

    # -- content -------------------------------------------------------------------------------

    def set_checkpoint(self, model: Model | None) -> None:
        self.beginResetModel()
        self._model = model
        self._layers = list(model.layers.values()) if model else []
        self._visible = list(range(len(self._layers)))
        self._children.clear()
        self.endResetModel()

    def paths(self) -> list[str]:
        return [layer.path for layer in self._layers]

    def tensor_names(self) -> list[list[str]]:
        """Per module (as :meth:`paths`), the names of its stored tensors."""
        return [[t.name for t in layer.tensors.values()] for layer in self._layers]

    def set_visible(self, ids: list[int] | None) -> None:
        """Show only these module ids (None: all), in the current sort order."""
        self.beginResetModel()
        self._visible = self._sorted(list(range(len(self._layers))) if ids is None else list(ids))
        self.endResetModel()

    # -- sorting ---------------------------------------------------------------------------------

    def sort(self, column: int, order=Qt.SortOrder.AscendingOrder) -> None:
        """Rows by a column (a header click): errors, bits, sizes by value, the doctor column by
        severity; rows without a value (no error yet) last either way. Column -1: the
        checkpoint's own order."""
        self._sort = (column, order)
        self.beginResetModel()
        self._visible = self._sorted(self._visible)
        self.endResetModel()

    def sort_column(self) -> int:
        return self._sort[0]

    def _key(self, column: int, layer: Layer):
        nb = len(BASE_COLUMNS)
        if column == 0:
            return natural_key(layer.path)
        if column == 1:
            return layer.scheme
        if column == 2:
            return layer.bits
        if column == 3:
            return layer.group_size
        if column == 4:
            return layer.numel if layer.shape else None
        if column == 5:
            return layer.stored_bytes
        if column == 6:
            return layer.bits_per_weight
        if nb <= column < nb + len(self._variants):
            v = self._errors.get(self._variants[column - nb], {}).get(layer.path)
            return None if v is None or math.isnan(v) else v
        flag = self._flags.get(layer.path)
        return _SEVERITY_ORDER.get(flag[0]) if flag else None

    def _sorted(self, ids: list[int]) -> list[int]:
        column, order = self._sort
        if column < 0 or column >= self.columnCount():
            return sorted(ids)
        keyed = [(self._key(column, self._layers[i]), i) for i in ids]
        present = [(k, i) for k, i in keyed if k is not None]
        missing = [i for k, i in keyed if k is None]
        present.sort(key=lambda ki: ki[0], reverse=order == Qt.SortOrder.DescendingOrder)
        return [i for _, i in present] + missing

    @property
    def variants(self) -> list[str]:
        """The variants with an error column, in column order."""
        return list(self._variants)

    def set_variants(self, labels: list[str], colors: dict | None = None) -> None:
        """The variants with an error column; ``colors``: each one's plot colour, shown as a
        swatch in its header (a title elided to "gp…28" then still says which legend entry it is)."""
        self.beginResetModel()
        self._variants = list(labels)
        self._swatches = {}
        for lb, c in (colors or {}).items():
            if lb in labels and c is not None:
                pm = QPixmap(10, 10)
                pm.fill(QColor(c))
                self._swatches[lb] = QIcon(pm)
        self._errors = {k: v for k, v in self._errors.items() if k in labels}
        self._notes = {k: v for k, v in self._notes.items() if k in labels}
        self._shown = {k: v for k, v in self._shown.items() if k in labels}
        self._headers = column_names(self._variants)
        self.endResetModel()

    def set_errors(self, label: str, errors: dict[str, float]) -> None:
        """rel_fro per module path for one variant (updates the column in place; no marks)."""
        self._errors[label] = dict(errors)
        self._notes[label] = {}  # (another comparison's marks would sit beside these figures)
        self._shown[label] = {}
        if label in self._variants and self._visible:
            col = len(BASE_COLUMNS) + self._variants.index(label)
            self.dataChanged.emit(self.index(0, col), self.index(len(self._visible) - 1, col))

    def _cell(self, label: str, path: str) -> tuple[str, object, object] | None:
        """(text, background, text colour) of an error cell, made on its first paint and kept."""
        shown = self._shown.setdefault(label, {})
        cell = shown.get(path)
        if cell is None:
            v = self._errors.get(label, {}).get(path)
            if v is None:
                return None
            bg = error_color(v, self.dark)
            mark = self._notes.get(label, {}).get(path, ("", ""))[0]
            cell = shown[path] = (f"{v:.4f}{mark}", bg, None if bg is None else text_color_on(bg))
        return cell

    def set_all_errors(self, per: dict[str, dict[str, float]], notes: dict | None = None) -> None:
        """rel_fro per module path for several variants, with one ``dataChanged`` for all;
        ``notes``: per variant and path, (mark, tooltip) of the cell (see ``errors_and_notes``)."""
        for label, errors in per.items():
            self._errors[label] = dict(errors)
            self._notes[label] = dict((notes or {}).get(label, {}))
            self._shown[label] = {}
        cols = [len(BASE_COLUMNS) + self._variants.index(v) for v in per if v in self._variants]
        if self._sort[0] in cols:  # sorted by an error that just changed
            self.sort(*self._sort)
            return
        if cols and self._visible:
            self.dataChanged.emit(self.index(0, min(cols)), self.index(len(self._visible) - 1, max(cols)))

    def set_findings(self, flags: dict[str, tuple[str, str]]) -> None:
        """Worst (severity, message) per module path."""
        self._flags = dict(flags)
        if self._sort[0] == self.columnCount() - 1:  # sorted by the doctor column: by the new flags
            self.sort(*self._sort)
            return
        if self._visible:  # the flag column, and the names coloured by it
            last = len(self._visible) - 1
            self.dataChanged.emit(self.index(0, 0), self.index(last, 0))
            self.dataChanged.emit(self.index(0, self.columnCount() - 1), self.index(last, self.columnCount() - 1))

    def row_of(self, path: str) -> QModelIndex:
        for r, i in enumerate(self._visible):
            if self._layers[i].path == path:
                return self.index(r, 0)
        return QModelIndex()

    # -- Qt model API ----------------------------------------------------------------------------

    def columnCount(self, parent=QModelIndex()) -> int:
        return len(BASE_COLUMNS) + len(self._variants) + 1

    def rowCount(self, parent=QModelIndex()) -> int:
        if not parent.isValid():
            return len(self._visible)
        if parent.internalId() == 0 and parent.column() == 0:
            return len(self._tensors(parent.row()))
        return 0

    def hasChildren(self, parent=QModelIndex()) -> bool:
        if not parent.isValid():
            return bool(self._visible)
        return parent.internalId() == 0 and parent.column() == 0

    def index(self, row: int, column: int, parent=QModelIndex()) -> QModelIndex:
        if not self.hasIndex(row, column, parent):
            return QModelIndex()
        if not parent.isValid():
            return self.createIndex(row, column, 0)
        return self.createIndex(row, column, parent.row() + 1)

    def parent(self, index: QModelIndex) -> QModelIndex:  # noqa: A003 - Qt's name
        if not index.isValid() or index.internalId() == 0:
            return QModelIndex()
        return self.createIndex(index.internalId() - 1, 0, 0)

    def headerData(self, section: int, orientation, role=Qt.ItemDataRole.DisplayRole):
        if (orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DecorationRole
                and len(BASE_COLUMNS) <= section < len(BASE_COLUMNS) + len(self._variants)):
            return self._swatches.get(self._variants[section - len(BASE_COLUMNS)])
        if orientation != Qt.Orientation.Horizontal or role not in (Qt.ItemDataRole.DisplayRole,
                                                                    Qt.ItemDataRole.ToolTipRole):
            return None
        if section < len(BASE_COLUMNS):
            return BASE_COLUMNS[section]
        if section < len(BASE_COLUMNS) + len(self._variants):
            # the variant's name alone: elided in the middle it keeps both ends (gptq…w4g128), where
            # "Error · " first left "Erro…g128" for three variants alike
            name = self._variants[section - len(BASE_COLUMNS)]
            if role == Qt.ItemDataRole.ToolTipRole:
                return f"Error of {name}: ‖Ŵ−W‖/‖W‖ of each layer against the reference\n{ERROR_KEY}"
            return "error" if name == self.own else self._headers.get(name, name)
        return "Doctor"

    def flags(self, index: QModelIndex):
        if not index.isValid():
            return Qt.ItemFlag.NoItemFlags
        return Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable

    def _tensors(self, row: int):
        lid = self._visible[row]
        kids = self._children.get(lid)
        if kids is None:
            layer = self._layers[lid]
            kids = self._children[lid] = [(c, layer.tensors[c]) for c in sorted(layer.tensors)]
        return kids

    def data(self, index: QModelIndex, role=_DISPLAY):
        role = int(role)
        if role not in _SERVED or not index.isValid():
            return None
        col = index.column()
        if index.internalId() == 0:
            layer = self._layers[self._visible[index.row()]]
            if role == _PATH:
                return layer.path
            return self._module_data(layer, col, role)
        prow = index.internalId() - 1
        if prow >= len(self._visible) or index.row() >= len(self._tensors(prow)):
            return None
        comp, t = self._tensors(prow)[index.row()]
        if role == _PATH:
            return self._layers[self._visible[prow]].path
        if role == _DISPLAY:
            # its dtype under Scheme, that dtype's bits under Bits, shape and bytes under theirs;
            # the file and byte range in the tooltip (they stood under Bits/weight)
            bits = DTYPES[t.dtype].bits if t.dtype in DTYPES else None
            return {0: f".{comp}" if comp else t.name, 1: t.dtype, 2: "" if bits is None else str(bits),
                    4: _shape(t.shape), 5: human_bytes(t.nbytes)}.get(col)
        if role == _TOOLTIP:
            stored = "" if t.source is None else (
                f"\nstored as {t.source} {list(t.stored_shape)}"
                + (" ([E, K, N], read transposed)" if t.transposed else ""))
            return f"{t.name}\n{t.dtype} {list(t.shape)}{stored}\n{t.file}\nbytes [{t.start}, {t.end})"
        if role == _ALIGN and col >= 2:  # (numbers right-aligned, as the modules' are)
            return _RIGHT
        return None

    def _module_data(self, layer: Layer, col: int, role):
        nb = len(BASE_COLUMNS)
        if role == _DISPLAY:
            if col == 0:
                return layer.path
            if col == 1:
                return layer.scheme
            if col == 2:
                return "" if layer.bits is None else str(layer.bits)
            if col == 3:
                return "" if layer.group_size is None else str(layer.group_size)
            if col == 4:
                return _shape(layer.shape)
            if col == 5:
                return human_bytes(layer.stored_bytes)
            if col == 6:
                bpw = layer.bits_per_weight
                return "" if bpw is None else f"{bpw:.2f}"
            if col < nb + len(self._variants):
                cell = self._cell(self._variants[col - nb], layer.path)
                return "" if cell is None else cell[0]
            flag = self._flags.get(layer.path)
            return flag[0] if flag else ""
        if role == _BACKGROUND and nb <= col < nb + len(self._variants):
            cell = self._cell(self._variants[col - nb], layer.path)
            return None if cell is None else cell[1]
        if role == _TOOLTIP:
            if col == self.columnCount() - 1 and layer.path in self._flags:
                return self._flags[layer.path][1]
            if nb <= col < nb + len(self._variants):  # that variant's figure, not this checkpoint's rule
                label = self._variants[col - nb]
                v = self._errors.get(label, {}).get(layer.path)
                if v is not None:
                    note = self._notes.get(label, {}).get(layer.path)
                    return f"{label}\n" + (note[1] if note else f"{layer.path}\nrel. error {v:.4f}")
            tip = f"{layer.path}\n{layer.scheme}: {layer.source}"
            if layer.path in self._flags:
                tip += f"\ndoctor ({self._flags[layer.path][0]}): {self._flags[layer.path][1]}"
            if layer.problem:
                tip += f"\nproblem: {layer.problem}"
            if layer.warning:
                tip += f"\nwarning: {layer.warning}"
            return tip
        if role == _ALIGN and col >= 2:
            return _RIGHT
        if role == _FOREGROUND and nb <= col < nb + len(self._variants):
            cell = self._cell(self._variants[col - nb], layer.path)
            return None if cell is None else cell[2]
        if role == _FOREGROUND and (col in (0, self.columnCount() - 1) or (col == 1 and layer.problem)):
            # a layer that cannot be decoded (name and scheme), or one the doctor found an error or
            # warning in (name and flag: set_findings repaints those two columns)
            flag = self._flags.get(layer.path)
            sev = "error" if layer.problem and col in (0, 1) else flag[0] if flag else None
            return _SEVERITY_COLOR.get(sev)
        return None
