"""HeadErrorPlot: the relative error of each attention head of the selected layer, one series per
variant, side by side; below it, every layer's heads at once (:class:`~.head_map.HeadMap`)."""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QCheckBox, QHBoxLayout, QSplitter, QVBoxLayout, QWidget
from quantscope.backend.heads import head_ratio

from .head_map import HeadMap, NamedAxis
from .palette import BAD_HEX, symbol_for
from .plots import SYMBOL_GLYPHS, ElidedLabel, Hint, Legend, plot_widget, show_values


class HeadErrorPlot(QWidget):
    """Per-head relative error ``‖Ŵ_h − W_h‖F / ‖W_h‖F``: a head whose rows share an
    outlier-stretched scale stands out. The layer's own error is a dotted line of each variant's
    colour, so a head above it reads as such."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.axis = NamedAxis("bottom", 34)
        self.plot = plot_widget()
        self.plot.getPlotItem().setAxisItems({"bottom": self.axis})
        self.axis.setHeight(40)
        self.axis.enableAutoSIPrefix(False)
        self.plot.showGrid(x=False, y=True, alpha=0.2)
        self.plot.setLabel("left", "relative error of the head")
        self.plot.setLabel("bottom", "head")
        # each head over its layer's error: variants of errors ten times apart on one scale (the
        # better ones lay flat along the bottom)
        self.ratio = QCheckBox("÷ the layer's error")
        self.ratio.setToolTip("Each head's error over its layer's whole error, per variant: 1 is the layer's; "
                              "above 1, a head the quantization hurt more than the rest")
        self.ratio.toggled.connect(lambda _: self._draw())
        self.map = HeadMap()  # every layer's heads (a head sweep), under the one layer's
        self.ratio.toggled.connect(self.map.set_ratio)
        self.hint = Hint(self.plot, "Select an attention projection (q/k/v/o) in the Tensors tree: the error of each "
                                    "head, with the head counts of the reference's config.json")
        self.note = ElidedLabel()  # the layer, its heads and where their counts come from
        self.worst = ElidedLabel(lines=3)  # each variant's worst head
        # the heads under the pointer, on a line of its own (beside the note, it squeezed it)
        self.hover = ElidedLabel(" ")
        self.legend = Legend()
        self.legend.toggled.connect(lambda *_: self._apply_hidden())
        top = QHBoxLayout()
        top.addWidget(self.note, 1)
        top.addWidget(self.ratio)
        one = QWidget()
        lay = QVBoxLayout(one)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(top)
        lay.addWidget(self.legend)
        lay.addWidget(self.plot, 1)
        lay.addWidget(self.hover)
        lay.addWidget(self.worst)
        self.split = QSplitter(Qt.Orientation.Vertical)
        self.split.addWidget(one)
        self.split.addWidget(self.map)
        self.split.setStretchFactor(0, 3)
        self.split.setStretchFactor(1, 2)
        self.split.setChildrenCollapsible(False)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(2, 2, 2, 2)
        outer.addWidget(self.split)
        self._series: dict[str, tuple[pg.PlotDataItem, pg.InfiniteLine | None]] = {}
        self._bounds: list[pg.InfiniteLine] = []
        self._errors: dict[str, np.ndarray] = {}
        self._names: list[str] = []
        self._colors: dict = {}
        self._crosses: dict = {}
        self._layer_error: dict = {}
        self._heads = None
        self.plot.scene().sigMouseMoved.connect(self._on_move)
        show_values(self.plot, False)

    def figure_parts(self) -> list:
        one = [*([self.note.text()] if self.note.text() else []), self.legend, self.plot, self.worst.text()]
        # (no layer shown: the map alone, not the empty plot's "Select an attention projection…")
        return [*(one if self._errors else []), *self.map.figure_parts()]

    def set_heads(self, errors: dict[str, np.ndarray], colors: dict, heads=None, layer_error: dict | None = None,
                  layer: str = "", empty_note: str = "") -> None:
        """``errors``: variant → relative error of each head (in ``heads``' order); ``heads``: the
        :class:`~quantscope.backend.heads.HeadLayout`; ``layer_error``: variant → the layer's
        whole relative error (its dotted line); ``empty_note``: why there is nothing to show."""
        self._errors = {k: np.asarray(v, np.float64) for k, v in errors.items()} if heads is not None else {}
        self._colors, self._layer_error, self._heads = dict(colors), dict(layer_error or {}), heads
        if not self._errors:
            self._clear()
            self.note.setText("")
            self.worst.setText("")
            self.legend.clear()
            self.axis.set_names([])
            self.plot.setLabel("bottom", "head")  # (not the last layer's rows or columns)
            self.hint.empty(empty_note)
            show_values(self.plot, False)
            return
        self.hint.set("")
        show_values(self.plot, True)
        self._names = heads.labels()
        self.axis.set_names(list(self._names))
        what = "output rows" if heads.axis == "rows" else "input columns"
        count: dict[str, int] = {}  # (by kind: Hunyuan's sections repeat q, k, v per key/value group)
        for p, h, _ in heads.sections:
            count[p] = count.get(p, 0) + h
        parts = [f"{h} {p} head{'s' * (h != 1)}" if len(count) > 1 else f"{h} head{'s' * (h != 1)}"
                 for p, h in count.items()]
        widths = sorted({w for _, _, w in heads.sections})
        grouped = f" ({heads.group} query heads per key/value head)" if heads.group else ""
        self.note.setText(f"{layer} · {' + '.join(parts)} of {'/'.join(map(str, widths))} {what}{grouped} · "
                          f"{heads.source}")
        self.plot.setLabel("bottom", f"head ({what})")
        self.legend.set_entries([(k, colors.get(k), SYMBOL_GLYPHS.get(symbol_for(colors.get(k)), "●"))
                                 for k in self._errors])
        self.worst.setText(self._worst_text(self._layer_error))
        self._draw()

    def _draw(self) -> None:
        """The series of the heads set: each head's error, or its ratio to the layer's."""
        self._clear()
        heads = self._heads
        if heads is None or not self._errors:
            return
        rel = self.ratio.isChecked()
        self.plot.setLabel("left", "head's error ÷ the layer's" if rel else "relative error of the head")
        n, m = heads.n, len(self._errors)
        step = min(0.12, 0.5 / max(1, m - 1))
        ys = {}
        for label, e in self._errors.items():
            whole = self._layer_error.get(label)
            ys[label] = head_ratio(e, np.nan if whole is None else whole) if rel else e
        finite = [float(y[np.isfinite(y)].max()) for y in ys.values() if np.isfinite(y).any()]
        top = max(finite, default=1.0)
        if rel:
            top = max(top, 1.0)
        for i, (label, y) in enumerate(ys.items()):
            color = self._colors.get(label)
            whole = self._layer_error.get(label)
            x = np.arange(n, dtype=float) + (i - (m - 1) / 2) * step
            item = pg.PlotDataItem(x, y, pen=pg.mkPen(color, width=1.2), symbol=symbol_for(color), symbolSize=7,
                                   symbolBrush=color, symbolPen=None)
            self.plot.addItem(item)
            line = None
            level = 1.0 if rel else whole
            if level is not None and math.isfinite(level):
                line = pg.InfiniteLine(pos=level, angle=0, pen=pg.mkPen(color, width=1, style=Qt.PenStyle.DotLine))
                self.plot.addItem(line)
            self._series[label] = (item, line)
            # (a NaN or inf head: a cross at the top, in the map's red; a ratio its NaN layer leaves
            # undefined is not drawn)
            bad = np.flatnonzero(~np.isfinite(self._errors[label]))
            if bad.size:
                cross = pg.ScatterPlotItem(x[bad], np.full(bad.size, 1.04 * top), symbol="x", size=10,
                                           brush=BAD_HEX, pen=pg.mkPen(BAD_HEX))
                self.plot.addItem(cross)
                self._bounds.append(cross)
                self._crosses[label] = cross
        start = 0
        for _, h, _ in heads.sections[:-1]:  # q | k | v of a fused layer
            start += h
            self._bound(start - 0.5, Qt.PenStyle.DashLine)
        # the query heads sharing one key/value head (a fused qkv_proj: among its q heads only)
        first, count, _ = heads.sections[0]
        qn = count if first == "q" and len(heads.sections) > 1 else n
        if heads.group and heads.group < qn:
            for b in range(heads.group, qn, heads.group):
                self._bound(b - 0.5, Qt.PenStyle.DotLine)
        self._apply_hidden()
        self.plot.setXRange(-0.5, n - 0.5, padding=0.02)
        # from 0 (an error has no negative side), a little room above the worst head
        self.plot.setYRange(0.0, 1.08 * top if top > 0 else 1.0, padding=0)

    def _bound(self, x: float, style) -> None:
        b = pg.InfiniteLine(pos=x, angle=90, pen=pg.mkPen("#9a9a9a", width=1, style=style))
        self.plot.addItem(b)
        self._bounds.append(b)

    def _worst_text(self, layer_error: dict) -> str:
        said = []
        for label, e in self._errors.items():
            if e.size < 2:  # (one head: the layer's own figure)
                continue
            part = label
            bad = np.flatnonzero(~np.isfinite(e))
            if bad.size:
                names = ", ".join(self._names[i] for i in bad[:4]) + (" …" if bad.size > 4 else "")
                part += f" NaN/inf in {names}"
            fin = np.flatnonzero(np.isfinite(e))
            if fin.size:
                i = int(fin[np.argmax(e[fin])])
                whole = layer_error.get(label)
                times = f" ({e[i] / whole:.2f}×)" if whole and math.isfinite(whole) else ""
                part += f"{';' if bad.size else ''} {self._names[i]} {e[i]:.3g}{times}"
            said.append(part)
        return "Worst head (× the layer's error) · " + " · ".join(said) if said else ""

    def _apply_hidden(self) -> None:
        for label, (item, line) in self._series.items():
            shown = label not in self.legend.hidden
            item.setVisible(shown)
            if line is not None:
                line.setVisible(shown)
            if label in self._crosses:  # (its NaN/inf heads' crosses with it)
                self._crosses[label].setVisible(shown)

    def _clear(self) -> None:
        for item, line in self._series.values():
            self.plot.removeItem(item)
            if line is not None:
                self.plot.removeItem(line)
        for b in self._bounds:
            self.plot.removeItem(b)
        self._series, self._bounds, self._crosses = {}, [], {}
        self.hover.setText(" ")

    def _on_move(self, pos) -> None:
        inside = bool(self._errors) and self.plot.getViewBox().sceneBoundingRect().contains(pos)
        i = round(self.plot.getViewBox().mapSceneToView(pos).x()) if inside else -1
        if not 0 <= i < len(self._names):
            self.hover.setText(" ")  # (off the heads: nothing stale)
            return

        def one(k, e):
            whole = self._layer_error.get(k)
            return f"{k} {e[i]:.4g}" + (f" ({e[i] / whole:.2f}×)" if whole and math.isfinite(whole) else "")
        self.hover.setText(f"{self._names[i]}: " + ", ".join(one(k, e) for k, e in self._errors.items()
                                                               if k not in self.legend.hidden))
