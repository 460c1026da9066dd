"""QuantConfigPanel: detected scheme and config, per-layer overrides, the selected layer's
effective settings with the rule that produced them, the raw JSON, and a what-if requantizer."""

from __future__ import annotations

import html
import json

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QFontDatabase, QTextDocument, QTextOption
from PySide6.QtWidgets import (
    QComboBox,
    QFrame,
    QGridLayout,
    QGroupBox,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)
from quantscope.backend.compare_align import counterpart
from quantscope.backend.formats.mlx import MODE_DEFAULTS
from quantscope.backend.schemes import Model

from .plots import Hint


def _short(v) -> str:
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)


def _setting(v) -> str:
    """An override's value in few words: ``3 bit / 64, affine`` for ``{"bits": 3, "group_size": 64,
    "mode": "affine"}``; its other keys as ``key=value``; not quantized for ``false``."""
    if v is False:
        return "not quantized"
    if not isinstance(v, dict):
        return _short(v)
    d = dict(v)
    bits, group = d.pop("bits", None), d.pop("group_size", None)
    head = " / ".join(x for x in (f"{bits} bit" if bits is not None else "", str(group) if group is not None else "")
                      if x)
    rest = [f"{d.pop('mode')}" if isinstance(d.get("mode"), str) else ""] + [f"{k}={_short(x)}" for k, x in
                                                                            sorted(d.items())]
    return ", ".join(x for x in [head, *rest] if x) or "{}"


_AFFINE_BITS = ["2", "3", "4", "5", "6", "8"]
_AFFINE_GROUPS = ["32", "64", "128"]


def table_text(table: QTableWidget, rows: list[int] | None = None) -> str:
    """Rows of a table as tab-separated text under its header (all rows when ``rows`` is None)."""
    cols = range(table.columnCount())
    head = [table.horizontalHeaderItem(c).text() if table.horizontalHeaderItem(c) else "" for c in cols]
    lines = ["\t".join(head)]
    for r in range(table.rowCount()) if rows is None else rows:
        lines.append("\t".join(table.item(r, c).text() if table.item(r, c) else "" for c in cols))
    return "\n".join(lines)


def copyable(table: QTableWidget) -> None:
    """Ctrl+C copies the selected rows whole, with the header, as tab-separated text (Qt copies
    one cell), ready for a spreadsheet or a note."""
    from PySide6.QtGui import QGuiApplication, QKeySequence, QShortcut

    def copy() -> None:
        rows = sorted({i.row() for i in table.selectedIndexes()}) or list(range(table.rowCount()))
        QGuiApplication.clipboard().setText(table_text(table, rows))

    QShortcut(QKeySequence.StandardKey.Copy, table, copy, context=Qt.ShortcutContext.WidgetWithChildrenShortcut)


class QuantConfigPanel(QWidget):
    """Shows data handed to it; emits ``whatif_requested(bits, group_size, mode)``."""

    whatif_requested = Signal(int, int, str)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.summary = QLabel()
        self.summary.setWordWrap(True)
        self.layer_title = QLabel("<i>Select a layer</i>")
        self.layer_title.setWordWrap(True)
        self.layer_table = QTableWidget(0, 6)
        self.layer_table.setHorizontalHeaderLabels(["Checkpoint", "Scheme", "Bits", "Group", "Shape", "Rule"])
        self.layer_table.horizontalHeader().setSectionResizeMode(5, QHeaderView.ResizeMode.Stretch)
        self.layer_table.verticalHeader().setVisible(False)
        self.layer_table.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.layer_table.setWordWrap(False)
        self._shown = ""  # the checkpoint the tree shows
        # The rule behind the selected row's settings, in full: a sentence does not fit a column
        # of a narrow dock.
        self.rule = QLabel()
        self.rule.setWordWrap(True)
        self.layer_table.currentCellChanged.connect(lambda row, *_: self._show_rule(row))
        self.layer_table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.globals = QLabel()
        self.globals.setWordWrap(True)
        self.overrides = QTableWidget(0, 2)
        self.overrides.setHorizontalHeaderLabels(["Override", "Value"])  # (the long name was cut in a narrow dock)
        self.overrides.horizontalHeaderItem(0).setToolTip("Per-layer override: a module path, or a pattern of "
                                                          "them (GPTQ dynamic, compressed-tensors targets)")
        self.overrides.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.overrides.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.overrides.verticalHeader().setVisible(False)
        self.overrides.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.overrides_hint = Hint(self.overrides.viewport())
        self.raw = QPlainTextEdit(readOnly=True)
        self.raw.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))  # (JSON in a proportional font)
        self.raw_search = QLineEdit(placeholderText="Find in the raw JSON (Enter: next)…")
        self.raw_search.returnPressed.connect(self._find_next)
        # what-if
        self.bits = QComboBox()
        self.bits.addItems(_AFFINE_BITS)
        self.bits.setCurrentText("4")
        self.group = QComboBox()
        self.group.addItems(_AFFINE_GROUPS)
        self.group.setCurrentText("64")
        # the what-if's target layer (set_whatif_target) and the group the user chose, kept across
        # layers that it does not divide
        self._cols: int | None = None
        self._why_not = ""
        self._want_group: str | None = None
        self.group.activated.connect(lambda i: setattr(self, "_want_group", self.group.itemText(i)))
        # until the user picks bits, group or mode, the what-if offers the settings of the layer
        # shown (a GPTQ g128 layer: 4 bit / 128, not 64), so that Requantize compares like for like
        self._picked = False
        for box in (self.bits, self.group):
            box.activated.connect(lambda _: setattr(self, "_picked", True))
        self._affine_choice = ("4", "64")  # restored when the mode returns to affine
        self.mode = QComboBox()
        self.mode.addItems(["affine", "mxfp4", "nvfp4", "mxfp8"])
        self.mode.currentTextChanged.connect(self._mode_changed)
        self.mode.activated.connect(lambda _: setattr(self, "_picked", True))
        self.run = QPushButton("Requantize")
        self.run.setToolTip("Quantize the reference's layer with mx.quantize and measure its error")
        self.run.clicked.connect(lambda: self.whatif_requested.emit(int(self.bits.currentText()),
                                                                    int(self.group.currentText()),
                                                                    self.mode.currentText()))
        self.whatif_result = ResultText()

        layer_box = QWidget()
        lv = QVBoxLayout(layer_box)
        lv.setContentsMargins(0, 0, 0, 0)
        lv.addWidget(self.layer_title)
        lv.addWidget(self.layer_table, 1)
        lv.addWidget(self.rule)
        # the controls in two rows, the result under them at the group's whole width (beside the
        # controls it was 40 px wide in a 1024 px window, three lines tall at 1280)
        wi = QGroupBox("What if")
        wi.setToolTip("Requantize the selected layer from the reference with MLX and measure its error")
        wg = QGridLayout(wi)
        wg.addWidget(QLabel("bits"), 0, 0)
        wg.addWidget(self.bits, 0, 1)
        wg.addWidget(QLabel("group"), 0, 2)
        wg.addWidget(self.group, 0, 3)
        wg.addWidget(QLabel("mode"), 1, 0)
        wg.addWidget(self.mode, 1, 1)
        wg.addWidget(self.run, 1, 2, 1, 2)
        wg.addWidget(self.whatif_result, 2, 0, 1, 4)
        wg.setColumnStretch(1, 1)
        wg.setColumnStretch(3, 1)
        lv.addWidget(wi, 1)  # extra height shared with the table (the result box stayed 6 lines at 1920 px)
        cfg_box = QWidget()
        cv = QVBoxLayout(cfg_box)
        cv.setContentsMargins(0, 0, 0, 0)
        cv.addWidget(self.globals)
        cv.addWidget(self.overrides, 1)
        raw_box = QWidget()
        rv = QVBoxLayout(raw_box)
        rv.setContentsMargins(0, 0, 0, 0)
        rv.addWidget(self.raw_search)
        rv.addWidget(self.raw, 1)
        self.tabs = QTabWidget()
        # short names: in a 1024 px window the third tab hid behind scroll arrows
        self.tabs.addTab(layer_box, "Layer")
        self.tabs.setTabToolTip(0, "The selected layer in every checkpoint: scheme, settings and the rule behind them")
        self.tabs.addTab(cfg_box, "Config")
        self.tabs.setTabToolTip(1, "The shown checkpoint's quantization config, parsed")
        self.tabs.addTab(raw_box, "JSON")
        self.tabs.setTabToolTip(2, "The shown checkpoint's config files as stored")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(self.summary)
        lay.addWidget(self.tabs, 1)
        for table in (self.layer_table, self.overrides):
            copyable(table)

    def set_checkpoint(self, label: str, model: Model | None) -> None:
        """The config of the checkpoint shown in the tree."""
        self._shown = label
        self._select_shown()
        if model is None:
            self.summary.setText("")
            return
        cfg = model.config
        schemes = ", ".join(f"{k} ×{v}" for k, v in model.schemes.items())
        self.summary.setText(f"<b>{label}</b>: {model.main_scheme} · config: {cfg.file or 'none'}<br>"
                             f"<small>{schemes}</small>")
        g = ", ".join(f"{k}={_short(v)}" for k, v in cfg.globals.items() if v is not None)
        notes = "".join(f"<br>• {n}" for n in cfg.notes)
        self.globals.setText(f"<b>{cfg.kind or 'no quantization config'}</b> {g}{notes}")
        self.overrides.setRowCount(len(cfg.overrides))
        for r, (k, v) in enumerate(cfg.overrides):
            for c, text in ((0, str(k)), (1, _setting(v))):
                item = QTableWidgetItem(text)
                item.setToolTip(f"{k}: {_short(v)}")  # (the whole, as stored)
                self.overrides.setItem(r, c, item)
        # the value as wide as it needs, the path the rest (elided in the middle): the value was
        # cut to '{"bits": 3, "group_size":…' while the paths took the width
        self.overrides.resizeColumnToContents(1)
        # an empty table filling the dock said nothing: that there are none is said over it
        self.overrides_hint.set("" if cfg.overrides else
                                "No per-layer overrides: every layer takes the settings above"
                                if cfg.kind else "No quantization config, so no per-layer overrides")
        self.raw.setPlainText(json.dumps({name: data for name, data in model.ckpt.configs.items()}, indent=2))

    def clear_layer(self) -> None:
        """No layer shown (it is gone with the workspace that held it: its rows of checkpoints no
        longer open, and their errors, stayed)."""
        self.layer_title.setText("")
        self.layer_table.setRowCount(0)
        self.rule.setText("")
        self.set_whatif_result("")

    def set_layer(self, path: str, models: dict[str, Model]) -> None:
        """Effective settings of ``path`` in every open checkpoint, with the rule behind them."""
        self.layer_title.setText(f"<b>{path}</b>")
        rows = []
        for label, m in models.items():
            found = counterpart(path, m)  # by name across prefixes, stacked experts, fused q/k/v
            rows.append((label, None, None) if found is None else (label, m.layers[found[0]], found))
        self.layer_table.setRowCount(len(rows))
        for r, (label, layer, found) in enumerate(rows):
            if layer is None:
                vals = [label, "absent", "", "", "", "no module with this path"]
            else:
                where = f"{found[0]} ({found[1]}): " if found[1] else ""
                rule = where + layer.source + (f" — problem: {layer.problem}" if layer.problem else "")
                shape = "×".join(map(str, layer.shape or ()))
                if found[1].startswith("expert ") and layer.shape and len(layer.shape) == 3:
                    shape = f"{layer.shape[1]}×{layer.shape[2]}"  # the expert's own (the rule says which)
                vals = [label, layer.scheme, "" if layer.bits is None else str(layer.bits),
                        "" if layer.group_size is None else str(layer.group_size), shape, rule]
            for c, v in enumerate(vals):
                item = QTableWidgetItem(v)
                item.setToolTip(v)
                self.layer_table.setItem(r, c, item)
        self.layer_table.resizeColumnsToContents()
        # Capped so that the Rule column (why these settings) keeps a share of a wide dock; long
        # checkpoint names are elided in the middle, whole in their tooltip. A shape is never cut
        # (14336×4096 read "143…096").
        for c, cap in enumerate((150, 80, 40, 50, 120)):
            if self.layer_table.columnWidth(c) > cap:
                self.layer_table.setColumnWidth(c, cap)
        self._fit_rule_column()
        self.whatif_result.setText("")
        self._select_shown()

    #: Least width the Rule column is shown at: narrower, it read "globa…tored" (the line under
    #: the table says the selected row's rule in full)
    RULE_MIN_WIDTH = 140

    def resizeEvent(self, ev) -> None:
        super().resizeEvent(ev)
        self._fit_rule_column()

    def _fit_rule_column(self) -> None:
        t = self.layer_table
        # a narrow dock: the checkpoint names give way (elided in the middle) so that scheme, bits
        # and group stay in view (at 835 px only Checkpoint and Scheme were, the rest behind a
        # scrollbar)
        room = t.viewport().width() - sum(t.columnWidth(c) for c in (1, 2, 3))
        want = min(150, t.sizeHintForColumn(0) + 8)
        w0 = max(90, min(want, room))
        if w0 != t.columnWidth(0):
            t.setColumnWidth(0, w0)
        used = sum(t.columnWidth(c) for c in range(5))
        hide = t.viewport().width() - used < self.RULE_MIN_WIDTH
        if hide != t.isColumnHidden(5):
            t.setColumnHidden(5, hide)

    def _select_shown(self) -> None:
        """Highlight, and state the rule of, the checkpoint the tree shows (the panel's header
        names it); else the first variant with the layer (row 0 is usually the reference)."""
        t = self.layer_table
        labels = [t.item(r, 0).text() if t.item(r, 0) else "" for r in range(t.rowCount())]
        if not labels:
            return
        row = labels.index(self._shown) if self._shown in labels else next(
            (r for r in range(1, len(labels)) if t.item(r, 1) and t.item(r, 1).text() != "absent"), 0)
        t.setCurrentCell(row, 0)
        self._show_rule(row)
        bits, group = (t.item(row, c).text() if t.item(row, c) else "" for c in (2, 3))
        scheme = t.item(row, 1).text() if t.item(row, 1) else ""
        fp = next((m for m in ("nvfp4", "mxfp4", "mxfp8") if scheme.endswith(m)), None)
        if not self._picked and fp is not None and self.mode.findText(fp) >= 0:
            # a block-float layer (MLX's, compressed-tensors', ModelOpt's): what if in its own mode
            self.mode.setCurrentText(fp)
        elif not self._picked and self.mode.currentText() == "affine" and bits in _AFFINE_BITS:
            self.bits.setCurrentText(bits)
            if group in _AFFINE_GROUPS:
                self._want_group = group
                self.group.setCurrentText(group)
            self._fit_choices()

    def _show_rule(self, row: int) -> None:
        name, rule = self.layer_table.item(row, 0), self.layer_table.item(row, 5)
        self.rule.setText(f"<b>{html.escape(name.text())}</b>: {html.escape(rule.text())}" if name and rule else "")

    def _mode_changed(self, mode: str) -> None:
        """mxfp4/nvfp4/mxfp8 fix their bits and block size: shown as the only choice, disabled;
        back on affine, its choices and the last affine setting return."""
        fixed = None if mode == "affine" else MODE_DEFAULTS.get(mode)
        if fixed is None:
            bits, group = self._affine_choice
            self._fill(self.bits, _AFFINE_BITS, bits)
            self._fill(self.group, _AFFINE_GROUPS, group)
        else:
            if self.bits.isEnabled():  # leaving affine: remember its setting
                self._affine_choice = (self.bits.currentText(), self.group.currentText())
            self._fill(self.bits, [str(fixed[0])], str(fixed[0]))
            self._fill(self.group, [str(fixed[1])], str(fixed[1]))
        self.bits.setEnabled(fixed is None)
        self.group.setEnabled(fixed is None)
        self._fit_choices()

    def set_whatif_target(self, cols: int | None, why_not: str = "") -> None:
        """The layer a what-if would requantize: ``cols`` its in_features (None: unknown, every
        choice offered); ``why_not`` (e.g. a norm: not a matrix) disables Requantize, with the
        reason in its tooltip. Group sizes and block-float modes whose block does not divide
        ``cols`` are greyed out (MLX refused them with a message about the matrix's shape)."""
        self._cols = cols
        self._why_not = why_not
        self._fit_choices()

    def _fit_choices(self) -> None:
        cols, why = self._cols, self._why_not

        def fits(block: int) -> bool:
            return cols is None or cols % block == 0

        modes = self.mode.model()
        for i in range(self.mode.count()):
            m = self.mode.itemText(i)
            modes.item(i).setEnabled(m == "affine" or fits(MODE_DEFAULTS[m][1]))
        groups = self.group.model()
        ok = []
        for i in range(self.group.count()):
            good = fits(int(self.group.itemText(i)))
            groups.item(i).setEnabled(good)
            if good:
                ok.append(i)
        # the group the user chose (kept across layers), else the largest that divides below it,
        # else the smallest
        want = self._want_group or self.group.currentText()
        at = self.group.findText(want)
        if ok and (at in ok or self.group.currentIndex() not in ok):
            below = [i for i in ok if int(self.group.itemText(i)) <= int(want or 0)]
            self.group.blockSignals(True)
            self.group.setCurrentIndex(at if at in ok else below[-1] if below else ok[0])
            self.group.blockSignals(False)
        mode = self.mode.currentText()
        if not why and mode != "affine" and not fits(MODE_DEFAULTS[mode][1]):
            why = f"in_features {cols} is not a multiple of {mode}'s block of {MODE_DEFAULTS[mode][1]}"
        elif not why and not ok:
            why = f"in_features {cols} is not a multiple of any group size offered ({', '.join(_AFFINE_GROUPS)})"
        self.run.setEnabled(not why)
        self.run.setToolTip(why or "Quantize the reference's layer with mx.quantize and measure its error")

    @staticmethod
    def _fill(box: QComboBox, items: list[str], current: str) -> None:
        box.blockSignals(True)
        box.clear()
        box.addItems(items)
        box.setCurrentText(current)
        box.blockSignals(False)

    def set_whatif_result(self, text: str) -> None:
        self.whatif_result.setText(text)
        self.whatif_result.setToolTip(text)

    def _find_next(self) -> None:
        if not self.raw.find(self.raw_search.text()):
            cur = self.raw.textCursor()
            cur.movePosition(cur.MoveOperation.Start)
            self.raw.setTextCursor(cur)
            self.raw.find(self.raw_search.text(), QTextDocument.FindFlag(0))


class ResultText(QPlainTextEdit):
    """Read-only text that wraps at word boundaries, and inside a word too long for the width
    ("lstsq:model.layers.1.mlp.up_proj" has no space: in a label it widened the box past the
    panel, and the break chances put in for it were copied with the text); selectable and
    copied as shown; scrolls when taller than its room. ``text``/``setText`` as a QLabel's."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setReadOnly(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setWordWrapMode(QTextOption.WrapMode.WrapAtWordBoundaryOrAnywhere)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.viewport().setAutoFillBackground(False)  # the panel's background, as a label's
        self.document().setDocumentMargin(2)
        self.setMinimumHeight(6 * self.fontMetrics().lineSpacing())

    def text(self) -> str:
        return self.toPlainText()

    def setText(self, text: str) -> None:
        if text != self.toPlainText():
            self.setPlainText(text)
