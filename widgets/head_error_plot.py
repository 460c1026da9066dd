"""HeadErrorPlot: the relative error of each attention head of the selected layer, one series per
variant, side by side."""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QHBoxLayout, QVBoxLayout, QWidget

from .palette import symbol_for
from .plots import SYMBOL_GLYPHS, ElidedLabel, Hint, Legend, plot_widget, show_values

#: Most heads named one by one on the axis; beyond, every few.
_NAMED = 48


class _HeadAxis(pg.AxisItem):
    """Ticks at whole heads, named (``q0``, ``k1``, ``h7``), never between two."""

    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.names: list[str] = []

    def tickValues(self, minVal, maxVal, size):
        n = len(self.names)
        if not n:
            return []
        lo, hi = max(0, math.ceil(minVal)), min(n - 1, math.floor(maxVal))
        if hi < lo:
            return []
        room = max(1, int(size // 34))  # px per label
        step = max(1, math.ceil((hi - lo + 1) / room))
        return [(float(step), [float(i) for i in range(lo, hi + 1) if i % step == 0])]

    def tickStrings(self, values, scale, spacing):
        return [self.names[int(v)] if 0 <= int(v) < len(self.names) else "" for v in values]


class HeadErrorPlot(QWidget):
    """Per-head relative error ``‖Ŵ_h − W_h‖F / ‖W_h‖F``: a head whose rows share an
    outlier-stretched scale stands out. The layer's own error is a dotted line of each variant's
    colour, so a head above it reads as such."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.axis = _HeadAxis("bottom")
        self.plot = plot_widget()
        self.plot.getPlotItem().setAxisItems({"bottom": self.axis})
        self.axis.setHeight(40)
        self.axis.enableAutoSIPrefix(False)
        self.plot.showGrid(x=False, y=True, alpha=0.2)
        self.plot.setLabel("left", "relative error of the head")
        self.plot.setLabel("bottom", "head")
        self.hint = Hint(self.plot, "Select an attention projection (q/k/v/o) in the Tensors tree: the error of each "
                                    "head, with the head counts of the reference's config.json")
        self.note = ElidedLabel()  # the layer, its heads and where their counts come from
        self.worst = ElidedLabel(lines=2)  # each variant's worst head
        self.hover = ElidedLabel(" ")
        self.legend = Legend()
        self.legend.toggled.connect(lambda *_: self._apply_hidden())
        top = QHBoxLayout()
        top.addWidget(self.note, 1)
        top.addWidget(self.hover)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addLayout(top)
        lay.addWidget(self.legend)
        lay.addWidget(self.plot, 1)
        lay.addWidget(self.worst)
        self._series: dict[str, tuple[pg.PlotDataItem, pg.InfiniteLine | None]] = {}
        self._bounds: list[pg.InfiniteLine] = []
        self._errors: dict[str, np.ndarray] = {}
        self._names: list[str] = []
        self.plot.scene().sigMouseMoved.connect(self._on_move)
        show_values(self.plot, False)

    def figure_parts(self) -> list:
        return [*([self.note.text()] if self.note.text() else []), self.legend, self.plot, self.worst.text()]

    def set_heads(self, errors: dict[str, np.ndarray], colors: dict, heads=None, layer_error: dict | None = None,
                  layer: str = "", empty_note: str = "") -> None:
        """``errors``: variant → relative error of each head (in ``heads``' order); ``heads``: the
        :class:`~quantscope.backend.heads.HeadLayout`; ``layer_error``: variant → the layer's
        whole relative error (its dotted line); ``empty_note``: why there is nothing to show."""
        self._clear()
        self._errors = {k: np.asarray(v, np.float64) for k, v in errors.items()} if heads is not None else {}
        if not self._errors:
            self.note.setText("")
            self.worst.setText("")
            self.legend.clear()
            self.axis.names = []
            self.hint.empty(empty_note)
            show_values(self.plot, False)
            return
        self.hint.set("")
        show_values(self.plot, True)
        self._names = self.axis.names = heads.labels()
        what = "output rows" if heads.axis == "rows" else "input columns"
        parts = [f"{h} {p} heads" if p in "qkv" and len(heads.sections) > 1 else f"{h} heads"
                 for p, h, _ in heads.sections]
        widths = {w for _, _, w in heads.sections}
        self.note.setText(f"{layer} · {' + '.join(parts)} of {'/'.join(map(str, sorted(widths)))} {what} "
                          f"({heads.source})")
        self.plot.setLabel("bottom", f"head ({what})")
        n, m = heads.n, len(self._errors)
        step = min(0.12, 0.5 / max(1, m - 1))
        for i, (label, e) in enumerate(self._errors.items()):
            color = colors.get(label)
            x = np.arange(n, dtype=float) + (i - (m - 1) / 2) * step
            item = pg.PlotDataItem(x, e, pen=pg.mkPen(color, width=1.2), symbol=symbol_for(color), symbolSize=7,
                                   symbolBrush=color, symbolPen=None)
            self.plot.addItem(item)
            line = None
            whole = (layer_error or {}).get(label)
            if whole is not None and math.isfinite(whole):
                line = pg.InfiniteLine(pos=whole, angle=0, pen=pg.mkPen(color, width=1, style=Qt.PenStyle.DotLine))
                self.plot.addItem(line)
            self._series[label] = (item, line)
        start = 0
        for _, h, _ in heads.sections[:-1]:  # q | k | v of a fused layer
            start += h
            b = pg.InfiniteLine(pos=start - 0.5, angle=90, pen=pg.mkPen("#9a9a9a", width=1, style=Qt.PenStyle.DashLine))
            self.plot.addItem(b)
            self._bounds.append(b)
        self.legend.set_entries([(k, colors.get(k), SYMBOL_GLYPHS.get(symbol_for(colors.get(k)), "●"))
                                 for k in self._errors])
        self._apply_hidden()
        self.worst.setText(self._worst_text(layer_error or {}))
        finite = np.concatenate([e[np.isfinite(e)] for e in self._errors.values()])
        top = float(finite.max()) if finite.size else 1.0
        self.plot.setXRange(-0.5, n - 0.5, padding=0.02)
        # from 0 (an error has no negative side), a little room above the worst head
        self.plot.setYRange(0.0, 1.08 * top if top > 0 else 1.0, padding=0)

    def _worst_text(self, layer_error: dict) -> str:
        said = []
        for label, e in self._errors.items():
            bad = int(np.count_nonzero(~np.isfinite(e)))
            if bad:
                said.append(f"{label}: {bad} head{'s' if bad > 1 else ''} NaN or inf")
                continue
            if not e.size:
                continue
            i = int(np.argmax(e))
            whole = layer_error.get(label)
            times = f", {e[i] / whole:.2f}× the layer's {whole:.4g}" if whole and math.isfinite(whole) else ""
            said.append(f"{label}: worst {self._names[i]} {e[i]:.4g}{times}")
        return "Worst head · " + " · ".join(said) if said else ""

    def _apply_hidden(self) -> None:
        for label, (item, line) in self._series.items():
            shown = label not in self.legend.hidden
            item.setVisible(shown)
            if line is not None:
                line.setVisible(shown)

    def _clear(self) -> None:
        for item, line in self._series.values():
            self.plot.removeItem(item)
            if line is not None:
                self.plot.removeItem(line)
        for b in self._bounds:
            self.plot.removeItem(b)
        self._series, self._bounds = {}, []
        self.hover.setText(" ")

    def _on_move(self, pos) -> None:
        if not self._errors or not self.plot.sceneBoundingRect().contains(pos):
            return
        i = round(self.plot.getViewBox().mapSceneToView(pos).x())
        if 0 <= i < len(self._names):
            self.hover.setText(f"{self._names[i]}: " + ", ".join(f"{k} {e[i]:.4g}" for k, e in self._errors.items()
                                                                 if k not in self.legend.hidden))
