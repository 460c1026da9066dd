"""GroupErrorHeatmap: relative error per quantization group (rows × groups) with a colour bar."""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QRectF, Qt
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QLabel,
    QVBoxLayout,
    QWidget,
)

from .palette import BAD_HEX, BAD_RGBA
from .plots import ElidedLabel, Hint, IntAxis, controls_row, plain_axes, shrinkable


class GroupErrorHeatmap(QWidget):
    """One variant at a time; the map arrives already reduced to screen resolution."""

    _XLABEL = "group of in_features columns"

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.variant = shrinkable(QComboBox(), 24)  # long variant names differ at their ends
        # the shown variant's own colour scale (its structure in full), or one for every variant
        # (a colour reads the same whichever is shown)
        self.scale = QCheckBox("shared scale")
        self.scale.setToolTip("Colours from 0 to the 99.5th percentile of every variant's group errors; unchecked, "
                              "of the shown variant's only")
        self.hover = ElidedLabel(" ")
        # non-finite cells of the shown variant, where the colours stop: cut to the row's width
        # (its whole line had widened the window from 835 to 981 px), in full in its tooltip
        self.note = ElidedLabel("")
        self.note.setStyleSheet(f"color: {BAD_HEX}")
        self.glw = pg.GraphicsLayoutWidget()
        self.plot = self.glw.addPlot(axisItems={"bottom": IntAxis("bottom"), "left": IntAxis("left")})
        self.plot.setLabel("bottom", self._XLABEL)
        self.plot.setLabel("left", "output row")
        self.plot.invertY(True)
        self.image = pg.ImageItem(axisOrder="row-major")
        self.plot.addItem(self.image)
        # NaN / inf cells (a NaN or inf weight or scale in the group) on top, in one colour the
        # map never uses; the colour map alone would leave NaN blank and clip inf to its top
        self.bad = pg.ImageItem(axisOrder="row-major")
        self.plot.addItem(self.bad)
        self.cbar = pg.ColorBarItem(colorMap=pg.colormap.get("viridis"), label="relative error per group",
                                    interactive=False)
        self.cbar.setImageItem(self.image, insert_in=self.plot)
        plain_axes(self.plot)
        plain_axes(self.cbar)
        self.cbar.getAxis("right").setWidth(56)  # room for "0.0925"
        # the value under the pointer at the right, cut to the room left (a flowing row would
        # change its height as the text changes)
        bar = QHBoxLayout()
        bar.addWidget(controls_row((QLabel("variant"), self.variant), self.scale, self.note), 1)
        bar.addWidget(self.hover)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addLayout(bar)
        lay.addWidget(self.glw, 1)
        self._maps: dict[str, tuple[np.ndarray, int]] = {}
        self._heads = None  # the layer's HeadLayout: its boundaries drawn over the map
        self._head_lines: list = []
        self._by_index: set[str] = set()
        self._blocks: dict[str, int] = {}
        self.hint = Hint(self.glw, "Select a quantized layer in the Tensors tree: the relative error of each "
                                   "quantization group (rows × groups), one variant at a time", right=110)
        self.variant.currentTextChanged.connect(self._show)
        #: the user chose the variant shown: it stays from layer to layer, until the tree shows another
        self._picked = False
        self.variant.activated.connect(lambda _: setattr(self, "_picked", True))
        self.scale.toggled.connect(lambda _: self._show(self.variant.currentText()))
        self.glw.scene().sigMouseMoved.connect(self._on_move)

    def figure_parts(self) -> list:
        """What an exported figure shows: the heatmap and which colour scale it uses."""
        return [self.glw, "colour scale shared by all variants" if self.scale.isChecked()
                else f"colour scale: {self.variant.currentText()}'s own"]

    def set_maps(self, maps: dict[str, tuple[np.ndarray, int]], empty_note: str = "", by_index=(),
                 blocks: dict | None = None, prefer: str | None = None, layer: str = "", heads=None) -> None:
        """``maps``: variant → (map [rows', groups], rows per displayed row); ``empty_note``: what
        the view says when there is none; ``by_index``: the variants whose columns are grouped by
        their act-order index (g_idx), not in runs of group_size; ``prefer``: the variant to show
        where it has a map (the tree's) and the user has not chosen another, else the one shown
        stays. ``layer``: the layer (or expert) the maps are of, over the plot (the other views
        name theirs; this one did not). ``heads``: the layer's attention heads
        (:class:`~quantscope.backend.heads.HeadLayout`), their boundaries drawn over the map."""
        self._maps = dict(maps)
        self._heads = heads
        heads_said = f" · dotted: its {heads.n} heads" if heads is not None and heads.n > 1 else ""
        self.plot.setTitle(layer + heads_said if maps and layer else None, size="9pt")
        self._by_index = set(by_index)
        self._blocks = dict(blocks or {})  # variant -> columns per cell, where it has no groups
        if maps:
            self.hint.set("")
        else:
            self.hint.empty(empty_note)
        cur = self.variant.currentText()
        self.variant.blockSignals(True)
        self.variant.clear()
        self.variant.addItems(list(maps))
        self.variant.blockSignals(False)
        if prefer in maps and not self._picked:
            self.variant.setCurrentText(prefer)
        elif cur in maps:
            self.variant.setCurrentText(cur)
        self._show(self.variant.currentText())

    def follow(self, label: str) -> None:
        """The tree shows checkpoint ``label``: its map is shown (where it has one), a variant the
        user chose here before is let go."""
        self._picked = False
        if label in self._maps:
            self.variant.setCurrentText(label)

    def _show(self, label: str) -> None:
        m = self._maps.get(label)
        # (short: the axis is as wide as the view, and the longer label was cut at both ends)
        self.plot.setLabel("bottom", f"{self._blocks[label]} in_features columns a cell (no groups)"
                           if label in self._blocks else
                           self._XLABEL + (" (act-order: by g_idx)" if label in self._by_index else ""))
        self.plot.getAxis("bottom").setToolTip(
            "The layer has no quantization groups (per-channel scales, or none): each cell is a block of "
            f"{self._blocks[label]} columns" if label in self._blocks else "")
        self._draw_heads(label)
        if m is None:
            self.image.clear()
            self.bad.clear()
            self.note.setText("")
            self.cbar.setVisible(False)  # no colour scale beside nothing
            return
        self.cbar.setVisible(True)
        data, per = m
        hi = self._top(None if self.scale.isChecked() else label)
        self.image.setImage(data, autoLevels=False)
        # in the layer's own units: a displayed row covers ``per`` output rows; group g spans
        # [g - 0.5, g + 0.5), so each integer tick names the column above it (from 0, a 12-group
        # layer's ticks ran 0-12 along the cells' edges)
        rect = QRectF(-0.5, 0, data.shape[1], data.shape[0] * per)
        self.image.setRect(rect)
        bad = ~np.isfinite(data)
        nbad = int(bad.sum())
        said = []
        if nbad:
            rgba = np.zeros(data.shape + (4,), np.uint8)
            rgba[bad] = BAD_RGBA
            self.bad.setImage(rgba, autoLevels=False, levels=(0, 255))
            self.bad.setRect(rect)
            said.append(f"{nbad} cell{'s' if nbad > 1 else ''} NaN or inf (red)")
        else:
            self.bad.clear()
        top = float(np.max(data[~bad])) if nbad < data.size else hi
        if top > hi:  # the bar stopped at the 99.5th percentile without a word: cells reach beyond it
            said.append(f"colours stop at {hi:.3g} (99.5th percentile{' of every variant' if self.scale.isChecked() else ''}); "
                        f"the brightest cells reach {top:.3g}")
        self.note.setText("; ".join(said))
        # red only for the NaN/inf cells it names (drawn in that red); the colour scale's top in
        # the text's own colour
        self.note.setStyleSheet(f"color: {BAD_HEX}" if nbad else "")
        self.cbar.setLevels((0.0, max(hi, 1e-12)))
        self.plot.autoRange()

    def _draw_heads(self, label: str) -> None:
        """Dotted lines between the attention heads: across the rows of q/k/v (in the layer's rows,
        as the map's axis), along the groups of o_proj's columns (where its columns are grouped in
        runs: not by an act-order index)."""
        for item in self._head_lines:
            self.plot.removeItem(item)
        self._head_lines = []
        h, m = self._heads, self._maps.get(label)
        if h is None or m is None or h.n < 2:
            return
        ends = np.cumsum([w for _, n, w in h.sections for _ in range(n)])[:-1]
        if h.axis == "rows":
            at = [(float(e), 0) for e in ends]
        elif label in self._by_index or h.size == 0:
            return
        else:
            per_col = m[0].shape[1] / h.size  # (cells per column: 1 / group size, or 1 / block width)
            at = [(e * per_col - 0.5, 90) for e in ends]
        pen = pg.mkPen((255, 255, 255, 150), width=1, style=Qt.PenStyle.DotLine)
        for pos, angle in at:
            line = pg.InfiniteLine(pos=pos, angle=angle, pen=pen)
            self.plot.addItem(line)
            self._head_lines.append(line)

    def _top(self, label: str | None) -> float:
        """The colour scale's top: the 99.5th percentile of one variant's finite group errors, or
        the largest of those of every variant (None)."""
        tops = []
        for lb, (data, _) in self._maps.items():
            if label is None or lb == label:
                finite = data[np.isfinite(data)]
                if finite.size:
                    tops.append(float(np.percentile(finite, 99.5)))
        return max(tops) if tops else 1.0

    def _on_move(self, pos) -> None:
        m = self._maps.get(self.variant.currentText())
        if m is None or not self.plot.sceneBoundingRect().contains(pos):
            return
        p = self.plot.vb.mapSceneToView(pos)
        data, per = m
        r, g = int(p.y() // per), math.floor(p.x() + 0.5)
        if 0 <= r < data.shape[0] and 0 <= g < data.shape[1]:
            rows = f"rows {r * per}–{(r + 1) * per - 1}" if per > 1 else f"row {r}"
            b = self._blocks.get(self.variant.currentText())
            where = f"columns {g * b}–{(g + 1) * b - 1}" if b else f"group {g}"
            self.hover.setText(f"{rows}, {where}: {data[r, g]:.4g}" + (" (max over rows)" if per > 1 else ""))
