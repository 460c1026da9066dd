"""LayerErrorPlot: per-layer error across depth, one series per variant, split by projection;
and a layers × projections heatmap. Clicking a point or a cell selects that layer."""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QLabel,
    QSplitter,
    QVBoxLayout,
    QWidget,
)
from quantscope.backend.metrics import worse

from .palette import BAD_RGBA, symbol_for
from .plots import (
    SYMBOL_GLYPHS,
    Hint,
    Legend,
    controls_row,
    plain_axes,
    plot_widget,
    show_values,
    shrinkable,
)

#: key: (the chooser's short name, the axis label and the item's tooltip)
METRICS = {"rel_fro": ("rel. error", "relative error ||Ŵ−W|| / ||W||"), "sqnr_db": ("SQNR (dB)", "SQNR (dB)"),
           "rel_fro_raw": ("rel. error, raw", "rel. error without undoing smoothing")}
#: Offered only when a compared variant folds its smoothing inconsistently (the sweep's
#: ``rel_fro_quant``); the other variants' points are their rel_fro, which is their quantization's.
QUANT_ONLY = ("rel_fro_quant", ("quantization alone", "rel. error of the quantization alone"))


_PROJ_ORDER = ["q", "k", "v", "qkv", "o", "router", "gate", "up", "gate_up", "gate_and_up", "down"]


def _proj_order(proj: str):
    """Projections in the order a block computes them (q k v o, router, gate up down), others after."""
    p = "router" if proj == "gate" else proj.replace("_proj", "")
    return (_PROJ_ORDER.index(p), "") if p in _PROJ_ORDER else (len(_PROJ_ORDER), p)


def _proj_labels(projs: list[str]) -> tuple[list[str], str]:
    """Column labels short enough for a narrow heatmap (about 3 characters: longer names ran
    into each other, "dowgate"), and the key to the ones shortened."""
    # a bare "gate" (mlp.gate, block_sparse_moe.gate) is an MoE router, not gate_proj
    names = ["router" if p == "gate" else p.replace("_proj", "") for p in projs]
    if len(names) <= 3 or all(len(n) <= 2 for n in names):
        return names, ""
    short, key = [], []
    for n in names:
        s = n if len(n) <= 2 else ("gu" if n in ("gate_up", "gate_and_up") else n[0])
        if s in short or s in names:  # a clash: keep the name
            s = n
        short.append(s)
        if s != n:
            key.append(f"{s} = {n}")
    return short, ", ".join(key)


class LayerErrorPlot(QWidget):
    """Receives sweep rows (objects with name, variant, layer_index, proj and metrics)."""

    layer_selected = Signal(str)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.metric_box = shrinkable(QComboBox(), 8)
        self._quant_variants: set[str] = set()
        for k, names in METRICS.items():
            self._add_metric(k, names)
        self.proj = shrinkable(QComboBox(), 8)
        self.hm_variant = shrinkable(QComboBox(), 8)
        self.hm_scale = QCheckBox("shared scale")
        self.hm_scale.setToolTip("Heatmap colours on the range of every variant (a colour reads the same whichever "
                                 "is shown); unchecked, on the shown variant's own range (which layers it hurts)")
        self.proj.setToolTip("Which projections the plot shows (all, or one with its points joined by depth)")
        self.info = QLabel(self._EMPTY)
        # Wrapped: a long summary must not widen the window (an unwrapped label's minimum width is
        # its text's). Its height follows the text at the label's width (_fit_info), at least
        # three lines, so that the plots' height changes only when a summary needs more.
        self.info.setWordWrap(True)
        self._fit_info()
        # What the sweep found wrong with a variant as a whole (smoothing applied twice): shown
        # only then, above the plots, in full.
        self.warn = QLabel()
        self.warn.setWordWrap(True)
        self.warn.setTextFormat(Qt.TextFormat.PlainText)
        self.warn.setStyleSheet("color: #b35900")
        self.warn.setContentsMargins(6, 0, 6, 0)
        self.warn.setHidden(True)
        self.plot = plot_widget(int_x=True)
        self.plot.setLabel("bottom", "decoder layer")
        self.plot.showGrid(x=True, y=True, alpha=0.25)
        self.legend = Legend()
        self.hint = Hint(self.plot, "Tools ▸ Compare all layers (Ctrl+Shift+C) measures every layer of every "
                                    "variant against the reference and plots the error here by depth")
        self.hm = plot_widget()
        self.hm.setLabel("left", "decoder layer")
        self.hm.invertY(True)
        self.hm_image = pg.ImageItem(axisOrder="row-major")
        self.hm.addItem(self.hm_image)
        # cells whose error is NaN/inf, on top in the colour the group-error map gives them (the
        # colour map alone leaves NaN blank, like a projection the layer does not have)
        self.hm_bad = pg.ImageItem(axisOrder="row-major")
        self.hm.addItem(self.hm_bad)
        self.hm_bar = pg.ColorBarItem(colorMap=pg.colormap.get("viridis"), interactive=False)
        self.hm_bar.setImageItem(self.hm_image, insert_in=self.hm.getPlotItem())
        plain_axes(self.hm_bar)
        self.hm_bar.getAxis("right").setWidth(56)  # room for "0.0925" (the numbers were cut to "0.")
        # (the projection box's first item, "all projections", says what it is)
        bar = controls_row(self.metric_box, self.proj, (QLabel("heatmap:"), self.hm_variant), self.hm_scale)
        split = self.split = QSplitter()
        split.addWidget(self.plot)
        split.addWidget(self.hm)
        split.setSizes([560, 440])
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(bar)
        lay.addWidget(self.warn)
        lay.addWidget(self.legend)
        self.legend.toggled.connect(self._legend_toggled)
        lay.addWidget(split, 1)
        lay.addWidget(self.info)
        self.metric_box.currentIndexChanged.connect(lambda _: self._redraw())
        self.proj.currentIndexChanged.connect(lambda _: self._redraw())
        self.hm_variant.currentIndexChanged.connect(lambda _: self.redraw_heatmap())
        self.hm_variant.activated.connect(lambda _: setattr(self, "_hm_picked", True))
        self._followed: str | None = None  # the checkpoint the tree shows (follow)
        self._hm_picked = False  # a variant chosen in the box: kept until the tree shows another
        self.hm_scale.toggled.connect(lambda _: self.redraw_heatmap())
        self.hm.scene().sigMouseClicked.connect(self._hm_clicked)
        # what a point or a cell is, under the pointer (a click selects it: the only way to
        # find out which of seven AWQ points at one depth was the 0.60 one)
        self.plot.scene().sigMouseMoved.connect(self._plot_hover)
        self.hm.scene().sigMouseMoved.connect(self._hm_hover)
        # a ring around the selected layer's points (one per variant)
        self.ring = pg.ScatterPlotItem(size=15, brush=None, pen=pg.mkPen(self.palette().text().color(), width=1.5))
        self.ring.setZValue(10)
        self.plot.addItem(self.ring)
        self._marked: str | None = None
        self._pts: dict[str, tuple[np.ndarray, np.ndarray, list]] = {}
        self._rows = []
        self._n_rows = 0
        self._empty_note = ""  # what an empty view says instead of _EMPTY (set_rows)
        self._ref_bad: set[str] = set()
        self._colors = {}
        self._hm_names: dict[tuple[int, int], str] = {}
        self._hm_grid = np.zeros((0, 0))  # the heatmap's values, for its hover
        self.series: dict[str, pg.PlotDataItem] = {}
        self._ylabel = None
        self._hm_frame = None
        self._hm_reversed = False  # the colour map runs backwards (SQNR: higher is better)

    #: Below this width the plot and the heatmap are stacked, each getting the whole width (side by
    #: side at 1280 px the legend ran off the plot and the heatmap lost columns and colour bar).
    STACK_BELOW = 900

    _EMPTY = "Run “Compare all layers” to fill this view."

    def resizeEvent(self, ev) -> None:
        want = Qt.Orientation.Vertical if ev.size().width() < self.STACK_BELOW else Qt.Orientation.Horizontal
        if self.split.orientation() != want:
            self.split.setOrientation(want)
            self.split.setSizes([600, 400])
        super().resizeEvent(ev)
        self._fit_info(ev.size().width() - 4)

    def _fit_info(self, width: int | None = None) -> None:
        """The summary's height: its wrapped text's at ``width`` (the label's own when None), at
        least three lines (a fixed three cut a four-line summary at both ends)."""
        line = self.info.fontMetrics().lineSpacing()
        w = width if width is not None else self.info.width()
        h = max(3 * line, self.info.heightForWidth(max(w, 100))) + 4
        if h != self.info.height():
            self.info.setFixedHeight(h)

    def _set_info(self, text: str) -> None:
        if text != self.info.text():
            self.info.setText(text)
            self._fit_info()

    def set_rows(self, rows, colors: dict, heatmap: bool = True, empty_note: str = "") -> None:
        """Show these sweep rows; ``heatmap=False`` leaves the heatmap to :meth:`redraw_heatmap`
        (a separate step, so that each repaints on its own); ``empty_note``: what an empty view
        says instead of how to fill it (a workspace without a reference cannot be compared)."""
        self._rows = [r for r in rows if r.layer_index is not None]
        self._colors = dict(colors)
        self._empty_note = empty_note
        show_values(self.plot, bool(self._rows))
        if not rows:
            self.hint.empty(empty_note)
        else:
            self.hint.set("" if self._rows else
                          "None of the compared layers is in a numbered decoder layer: nothing to plot by depth")
        # in the order a block computes them, an MoE router (a bare "gate") named so; the item's
        # data is the projection's name in the rows
        projs = sorted({r.proj for r in self._rows}, key=_proj_order)
        variants = list(dict.fromkeys(r.variant for r in self._rows))
        for combo, items, first in ((self.proj, projs, "all projections"), (self.hm_variant, variants, None)):
            shown = ["gate (router)" if combo is self.proj and x == "gate" else x for x in items]
            want = ([first] if first else []) + shown
            if [combo.itemText(i) for i in range(combo.count())] == want:
                continue  # same choices: no relayout, no repaint
            cur = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            if first:
                combo.addItem(first)
            for text, value in zip(shown, items):
                combo.addItem(text, value)
            if cur and combo.findText(cur) >= 0:
                combo.setCurrentText(cur)
            if combo is self.hm_variant and not self._hm_picked and combo.findText(self._followed or "") >= 0:
                combo.setCurrentText(self._followed)  # (the tree's checkpoint, as the group error map)
            combo.blockSignals(False)
        # variants whose smoothing is inconsistent: a row without the figure (not decodable) has none
        self._quant_variants = {r.variant for r in self._rows if getattr(r, QUANT_ONLY[0], None) is not None}
        at = self.metric_box.findData(QUANT_ONLY[0])
        if self._quant_variants and at < 0:
            self._add_metric(*QUANT_ONLY)
        elif not self._quant_variants and at >= 0:
            self.metric_box.blockSignals(True)
            was = self.metric_box.currentIndex() == at
            self.metric_box.removeItem(at)
            if was:  # back to the first metric (Qt picks the neighbour)
                self.metric_box.setCurrentIndex(0)
            self.metric_box.blockSignals(False)
        self._n_rows = len(rows)
        self._redraw(heatmap)

    def set_reference_nonfinite(self, names) -> None:
        """The layers whose reference weights hold NaN/inf (the sweep's ``reference_nonfinite``):
        the summary blames the reference for those, not a variant."""
        self._ref_bad = set(names)
        self._summary()

    def _summary(self) -> None:
        """The line under the plots, for the rows shown (the projection chosen)."""
        if not self._n_rows:  # (a reason it cannot be filled is over the plot: not twice)
            self._set_info("" if self._empty_note else self._EMPTY)
            return
        proj = self.proj.currentData() if self.proj.currentIndex() > 0 else None
        shown = [r for r in self._rows if proj is None or r.proj == proj]
        # a non-finite error (not an exact copy's SQNR of +inf, nor the quantization-only figure
        # a variant without inconsistent smoothing does not have)
        bad = [r for r in shown if not math.isfinite(r.rel_fro)]
        other = self._n_rows - len(self._rows)
        variants = {r.variant for r in shown}
        moe = any(".experts." in r.name for r in shown)
        ref_bad = sorted({r.name for r in bad if r.name in self._ref_bad})
        var_bad = [r for r in bad if r.name not in self._ref_bad]
        self._set_info(
            f"{len(shown) - len(bad)} (layer, variant) points from {len(variants)} variant(s)"
            + (f" ({proj})" if proj else "")
            + (f"; {other} outside decoder layers (embeddings, head) not plotted" if other and not proj else "")
            + (f"; {len(ref_bad)} layer(s) with NaN/inf in the reference's own weights (e.g. {ref_bad[0]}), not "
               "plotted, red in the heatmap" if ref_bad else "")
            + (f"; {len(var_bad)} with a non-finite error, not plotted, red in the heatmap (NaN/inf weights, e.g. "
               f"{var_bad[0].variant}: {var_bad[0].name}; Tools ▸ Run doctor)" if var_bad else "")
            + ("; a heatmap cell holds its layer's worst expert" if moe else "")
            + ". Click a point or a heatmap cell to select the layer.")

    def follow(self, label: str) -> None:
        """The tree shows checkpoint ``label``: the heatmap shows it (where it was compared), as
        the group error map does; a variant chosen in the box before is let go (the heatmap stayed
        on the first variant whatever the tree showed)."""
        self._followed, self._hm_picked = label, False
        if self.hm_variant.findText(label) >= 0 and self.hm_variant.currentText() != label:
            self.hm_variant.setCurrentText(label)

    def figure_parts(self) -> list:
        """What an exported figure shows: the warning, legend, plot and heatmap (stacked), and
        what the controls chose; not the controls, the splitter handle or the instructions."""
        proj = self.proj.currentText() if self.proj.currentIndex() > 0 else "all projections"
        scale = "shared by all variants" if self.hm_scale.isChecked() else f"{self.hm_variant.currentText()}'s own"
        # as on screen: side by side in a wide view (stacked at their on-screen sizes, a 1920 px
        # export was half empty with the heatmap 1300 px tall), stacked in a narrow one
        plots = [self.split] if self.split.orientation() == Qt.Orientation.Horizontal else [self.plot, self.hm]
        if not self._rows:  # nothing compared yet: no scale of nobody's ("heatmap colour scale 's own")
            return [self.warn, self.legend, *plots, self._empty_note or self._EMPTY]
        return [self.warn, self.legend, *plots, f"{self._metric_label()}, {proj}; heatmap colour scale {scale}"]

    def set_warnings(self, warnings: dict[str, tuple[str, str]]) -> None:
        """Per variant, ``(short, full)``: what makes its figures more than quantization error;
        the short line shown, the full text in the tooltip."""
        text = "\n".join(f"⚠ {v}: {short}" for v, (short, _) in warnings.items())
        if text != self.warn.text():
            self.warn.setText(text)
            self.warn.setToolTip("\n\n".join(f"{v}: {full}" for v, (_, full) in warnings.items()))
        self.warn.setHidden(not text)

    def _add_metric(self, key: str, names: tuple[str, str]) -> None:
        self.metric_box.addItem(names[0], key)
        self.metric_box.setItemData(self.metric_box.count() - 1, names[1], Qt.ItemDataRole.ToolTipRole)

    def _metric_label(self) -> str:
        """The shown metric in full (the axis label; the chooser has short names)."""
        i = self.metric_box.currentIndex()
        return str(self.metric_box.itemData(i, Qt.ItemDataRole.ToolTipRole) or "") if i >= 0 else ""

    def _value(self, r) -> float:
        key = self.metric_box.currentData()
        v = getattr(r, key)
        if v is None and key == QUANT_ONLY[0]:
            # smoothing folded consistently (or none): rel_fro is the quantization's
            v = math.nan if r.variant in self._quant_variants else r.rel_fro
        return float(v)

    def prepare_steps(self, variants: list[str], colors: dict) -> list:
        """Steps (to run one per event-loop turn) creating the empty series of these variants
        ahead of the first sweep result: clear, then one series per variant. Creating pyqtgraph
        items is the costly part of a redraw (tens of ms on the GUI thread)."""
        variants = list(variants)

        def clear() -> None:
            self._colors = dict(colors)
            if list(self.series) != variants:
                self._clear_series()
            self._show_legend(variants)

        return [clear, *(lambda v=v: self._add_series(v) for v in variants)]

    def _clear_series(self) -> None:
        self.plot.clear()
        self.series = {}
        self.plot.addItem(self.ring)

    def _legend_toggled(self, variant: str, shown: bool) -> None:
        if variant in self.series:
            self.series[variant].setVisible(shown)
        self.mark_layer(self._marked)

    def mark_layer(self, name: str | None) -> None:
        """Ring the points of layer ``name`` (the one selected), every shown variant's."""
        self._marked = name
        xs, ys = [], []
        # (a stack shown whole: its experts' points, each a row of its own)
        whole = {r.name for r in self._rows if getattr(r, "reference_layer", None) == name} if name else set()
        for v, (x, y, names) in self._pts.items():
            if v in self.legend.hidden:
                continue
            for i, n in enumerate(names):
                if (n == name or n in whole) and math.isfinite(y[i]):
                    xs.append(x[i])
                    ys.append(y[i])
        self.ring.setData(xs, ys)

    def _near_point(self, pos) -> tuple[str, str, float] | None:
        """(variant, layer, value) of the point within 8 px of scene position ``pos``, if any."""
        vb = self.plot.getPlotItem().vb
        if not self._pts or not vb.sceneBoundingRect().contains(pos):
            return None
        px = vb.viewPixelSize()
        v = vb.mapSceneToView(pos)
        best = None
        for variant, (x, y, names) in self._pts.items():
            if not len(x) or variant in self.legend.hidden:
                continue
            d = np.hypot((x - v.x()) / px[0], (y - v.y()) / px[1])
            d[~np.isfinite(d)] = np.inf
            i = int(np.argmin(d))
            if d[i] <= 8 and (best is None or d[i] < best[0]):
                best = (float(d[i]), variant, names[i], float(y[i]))
        return None if best is None else best[1:]

    def _plot_hover(self, pos) -> None:
        hit = self._near_point(pos)
        tip = "" if hit is None else f"{hit[1]}\n{hit[0]}: {self._metric_label()} {hit[2]:.5g}\n(click: select it)"
        if tip != self.plot.toolTip():
            self.plot.setToolTip(tip)

    def _hm_hover(self, pos) -> None:
        p = self.hm.getPlotItem().vb.mapSceneToView(pos)
        i, j = math.floor(p.y()), math.floor(p.x())
        name = self._hm_names.get((i, j))
        # (the cell's own value: a scan of every row for it, on each move of the pointer, was
        # 15,000 rows for a large MoE)
        tip = (f"{name}\n{self.hm_variant.currentText()}: {self._metric_label()} {self._hm_grid[i, j]:.5g}\n"
               "(click: select it)" if name else "")
        if tip != self.hm.toolTip():
            self.hm.setToolTip(tip)

    def _show_legend(self, variants: list[str]) -> None:
        # the marker of each variant is the one _add_series gives it: its colour's
        self.legend.set_entries([(v, self._colors.get(v), SYMBOL_GLYPHS.get(symbol_for(self._colors.get(v)), "●"))
                                 for v in variants])

    def _add_series(self, variant: str) -> None:
        if variant in self.series:
            return
        color = self._colors.get(variant)
        item = pg.PlotDataItem([], [], symbol=symbol_for(color), symbolSize=7, symbolBrush=color,
                               symbolPen=None)
        item.sigPointsClicked.connect(self._points_clicked)
        self.plot.addItem(item)
        self.series[variant] = item

    def _ensure_series(self, variants: list[str]) -> None:
        if list(self.series) == variants:
            return
        self._clear_series()
        for variant in variants:
            self._add_series(variant)
        self._show_legend(variants)

    def _redraw(self, heatmap: bool = True) -> None:
        proj = self.proj.currentData() if self.proj.currentIndex() > 0 else None
        label = self._metric_label()
        if label != self._ylabel:  # a label set again relays out the whole plot item
            self._ylabel = label
            self.plot.setLabel("left", label)
            # the heatmap's colours say the same metric (its bar had no label; SQNR's brighter is
            # better, the errors' worse)
            short = self.metric_box.currentText()
            self.hm_bar.getAxis("right").setLabel(short + (", higher is better" if "SQNR" in short else ""))
        by_var: dict[str, list] = {v: [] for v in self.series}
        for r in self._rows:
            if proj is None or r.proj == proj:
                by_var.setdefault(r.variant, []).append(r)
        # before any result, the series made ahead (prepare_steps) stay; after, only those with
        # points (a variant that could not be compared is not in the legend)
        by_var = {v: rows for v, rows in by_var.items() if rows or (v in self.series and not self._rows)}
        # Existing items are updated in place (setData); only a new set of variants rebuilds them.
        self._ensure_series(list(by_var))
        n = max(1, len(by_var))
        self.plot.disableAutoRange()  # one range update for all series, below
        # small horizontal offset per variant so overlapping points stay visible, all of them
        # within ±0.2 of their layer (8 variants at 0.08 apart put the outer ones 0.28 away)
        step = min(0.08, 0.4 / max(1, n - 1))
        self._pts = {}
        for i, (variant, rows) in enumerate(by_var.items()):
            rows.sort(key=lambda r: (r.layer_index, r.proj))
            x = np.array([r.layer_index for r in rows], float) + (i - (n - 1) / 2) * step
            y = np.array([self._value(r) for r in rows])
            self._pts[variant] = (x, y, [r.name for r in rows])
            color = self._colors.get(variant)
            # one projection: a line along depth, unless a layer has several (MoE experts), where
            # joining them in name order would zigzag meaninglessly
            along = proj and len({r.layer_index for r in rows}) == len(rows)
            self.series[variant].setData(x, y, pen=pg.mkPen(color, width=1.5) if along else None,
                                         symbolBrush=color, data=[r.name for r in rows])
            self.series[variant].setVisible(variant not in self.legend.hidden)
        # The range set now, from the new data: left to auto-range, it is found while painting,
        # which then changes the axes and repaints the whole plot a second time.
        self.mark_layer(self._marked)
        self.plot.getViewBox().autoRange(padding=0.05, items=list(self.series.values()))
        ys = [y[np.isfinite(y)] for _, y, _ in self._pts.values()]
        ys = np.concatenate(ys) if ys else np.empty(0)
        if ys.size and ys.min() == ys.max():
            # one value (a single layer, or all alike): pyqtgraph centred a span of 1 on it (-0.49 to
            # 0.51 for a rel_fro of 0.01, the point on the zero line); from 0 to twice it instead
            v = float(ys[0])
            self.plot.setYRange(*((0.0, 2 * v) if v > 0 else (2 * v, 0.0) if v < 0 else (-1.0, 1.0)), padding=0.05)
        # pyqtgraph defers range, matrix and axis updates to the start of a paint, where they
        # dirty the scene again: a cascade of repaints. Done here, the next paint is the only one.
        self.plot.scene().prepareForPaint()
        self._summary()
        if heatmap:
            self.redraw_heatmap()

    def _points_clicked(self, item, points, *_) -> None:
        if points:
            self.layer_selected.emit(points[0].data())

    def redraw_heatmap(self) -> None:
        variant = self.hm_variant.currentText()
        rows = [r for r in self._rows if r.variant == variant]
        if not rows:
            self.hm_image.clear()
            self.hm_bad.clear()
            # (the cells gone, their names too: hovering the blank heatmap named the last
            # comparison's layers, and a click selected one)
            self._hm_names, self._hm_grid = {}, np.zeros((0, 0))
            if self._hm_frame != "empty":  # no numbered axes around nothing (they read -0.5..0.5)
                self._hm_frame = "empty"
                for side in ("bottom", "left"):
                    self.hm.getAxis(side).setTicks([[]])
                self.hm.setTitle("")
                self.hm.setLabel("bottom", "projection")  # not the last workspace's key to them
                self.hm_bar.setVisible(False)  # nor its colour scale
            return
        self.hm_bar.setVisible(True)
        layers = sorted({r.layer_index for r in rows})
        projs = sorted({r.proj for r in rows}, key=_proj_order)
        grid = np.full((len(layers), len(projs)), np.nan)
        self._hm_names = {}
        li = {x: i for i, x in enumerate(layers)}
        pj = {x: j for j, x in enumerate(projs)}
        bad = np.zeros(grid.shape, bool)  # a cell holding a non-finite error (not an absent projection)
        better_high = self.metric_box.currentData() == "sqnr_db"
        sign = -1.0 if better_high else 1.0  # the worst SQNR is the lowest (a cell showed the best expert's)
        for r in rows:  # several rows to a cell (MoE experts): the worst one, NaN first
            i, j = li[r.layer_index], pj[r.proj]
            v = self._value(r)
            if worse(sign * v, sign * grid[i, j] if (i, j) in self._hm_names else None):
                grid[i, j] = v
                self._hm_names[(i, j)] = r.name
            bad[i, j] |= not math.isfinite(r.rel_fro)  # (an exact copy's SQNR is +inf: not that)
        self.hm_image.setImage(grid, autoLevels=False)
        self._hm_grid = grid
        if bad.any():
            rgba = np.zeros(grid.shape + (4,), np.uint8)
            rgba[bad] = BAD_RGBA
            self.hm_bad.setImage(rgba, autoLevels=False, levels=(0, 255))
        else:
            self.hm_bad.clear()
        # bright is worse whatever the metric: SQNR (higher is better) runs the colours backwards
        if better_high != self._hm_reversed:
            self._hm_reversed = better_high
            cmap = pg.colormap.get("viridis")  # pyqtgraph's one shared map: never changed in place
            if better_high:
                pos, color = cmap.getStops()
                cmap = pg.ColorMap(1.0 - pos[::-1], color[::-1])
            self.hm_bar.setColorMap(cmap)
        shared = self.hm_scale.isChecked()
        # a projection far below the others (an MoE router kept at 8 bits: 0.008 beside 0.09)
        # left every other cell one colour: the colours span the rest, it sits at the scale's end
        apart = self._apart(grid, projs, better_high)
        keep = [j for j, p in enumerate(projs) if p not in apart]
        values = (np.array([self._value(r) for r in self._rows if r.proj not in apart]) if shared
                  else grid[:, keep])
        finite = values[np.isfinite(values)]
        if finite.size:
            lo, hi = float(finite.min()), float(finite.max())
            # no full contrast for a difference nobody would care about (0.09107 against 0.09110
            # was darkest against brightest): the colours span at least 1 dB of SQNR, or a tenth
            # of the error's size
            least = 1.0 if better_high else 0.1 * abs(lo + hi) / 2
            if hi - lo < least:
                mid = (lo + hi) / 2
                lo, hi = mid - least / 2, mid + least / 2
            self.hm_bar.setLevels((lo, hi if hi > lo else lo + 1e-12))
        # Ticks, title and range only when they change: each relays out the plot item, and
        # pyqtgraph's deferred updates then run now, not at the start of the paint (where they
        # would dirty the scene again and repaint it twice).
        metric = self._metric_label()
        frame = (tuple(projs), tuple(layers), variant, metric, tuple(apart))
        if frame != self._hm_frame:
            self._hm_frame = frame
            short, legend = _proj_labels(projs)
            self.hm.getAxis("bottom").setTicks([[(j + 0.5, t) for j, t in enumerate(short)]])
            self.hm.setLabel("bottom", legend or "projection")  # the key to short labels, else what they are
            every = max(1, math.ceil(len(layers) / 16))  # labels ~14 px tall: no more than fit
            self.hm.getAxis("left").setTicks([[(i + 0.5, str(layer)) for i, layer in enumerate(layers)
                                               if i % every == 0]])
            short_of = dict(zip(projs, short))
            self.hm.setTitle(variant + (f" ({', '.join(short_of[p] for p in apart)}: below the colour scale)"
                                        if apart else ""))
            self.hm.autoRange()
        self.hm.scene().prepareForPaint()

    @staticmethod
    def _apart(grid: np.ndarray, projs: list, better_high: bool) -> list:
        """Projections whose errors lie far below the others' (a median 4x lower, 12 dB higher),
        where at least two others remain: left out of the colour range."""
        if len(projs) < 3:
            return []
        with np.errstate(all="ignore"):
            cols = np.where(np.isfinite(grid), grid, np.nan)
            if not better_high:
                cols = np.log10(np.where(cols > 0, cols, np.nan)) * 20  # in dB, as SQNR
            med = np.array([np.nanmedian(c) if np.isfinite(c).any() else np.nan for c in cols.T])
        if not np.isfinite(med).any():
            return []
        centre = float(np.nanmedian(med))
        low = (med - centre > 12) if better_high else (centre - med > 12)
        out = [p for p, lo_ in zip(projs, low) if lo_]
        return out if len(projs) - len(out) >= 2 else []

    def _hm_clicked(self, ev) -> None:
        p = self.hm.getPlotItem().vb.mapSceneToView(ev.scenePos())
        i, j = int(math.floor(p.y())), int(math.floor(p.x()))
        name = self._hm_names.get((i, j))
        if name:
            self.layer_selected.emit(name)
