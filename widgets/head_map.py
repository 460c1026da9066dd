"""HeadMap: every attention layer's heads at once — a layers × heads map of one projection and
one variant (from :func:`~quantscope.backend.compare.head_sweep`). Clicking a cell selects its
layer."""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QRectF, Qt, Signal
from PySide6.QtGui import QPen
from PySide6.QtWidgets import (
    QComboBox,
    QGraphicsRectItem,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)
from quantscope.backend.compare_align import layer_template as template_of

from .palette import BAD_RGBA
from .plots import ElidedLabel, Hint, controls_row, plain_axes, shrinkable


def head_ratio(errors, layer_error: float) -> np.ndarray:
    """Each head's error over its layer's; NaN where that is undefined (the layer's error 0, NaN
    or inf: a NaN head makes its layer's NaN, and its other heads have no ratio)."""
    e = np.asarray(errors, np.float64)
    whole = float(layer_error)
    if not (math.isfinite(whole) and whole > 0):
        return np.full(e.shape, np.nan)
    return e / whole


def short_names(templates: list[str]) -> dict[str, str]:
    """Each template by its shortest tail of dotted parts no other template ends with
    (``self_attn.q_proj`` → ``q_proj``; a vision tower's beside a language model's keeps more)."""
    parts = {t: t.split(".") for t in templates}
    out = {}
    for t, p in parts.items():
        for k in range(1, len(p) + 1):
            tail = p[-k:]
            if not any(o != t and q[-k:] == tail for o, q in parts.items()):
                out[t] = ".".join(tail)
                break
        else:
            out[t] = t
    return out


def _order(template: str):
    """Projections in the order a block computes them (q k v, fused, o), towers by their path."""
    leaf = template.rsplit(".", 1)[-1]
    rank = {"q_proj": 0, "q_a_proj": 0, "q_b_proj": 1, "k_proj": 2, "v_proj": 3, "kv_b_proj": 4, "qkv_proj": 5,
            "qkv": 5, "o_proj": 6, "proj": 6}.get(leaf, 7)
    return template.rsplit(".", 1)[0], rank, leaf


class HeadMap(QWidget):
    """Rows: the layers holding the chosen projection, by number; columns: their heads. A cell:
    the head's relative error, or that over its layer's (the same choice as the plot above)."""

    layer_selected = Signal(str)
    measure_requested = Signal()

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.button = QPushButton("Measure every layer")
        self.button.setToolTip("The error of every attention layer's heads, for every variant (Tools ▸ Compare "
                               "heads of every layer, Ctrl+Shift+H)")
        self.button.clicked.connect(self.measure_requested)
        self.proj = shrinkable(QComboBox(), 16)
        self.proj.setToolTip("The projection whose layers the map shows")
        self.variant = shrinkable(QComboBox(), 24)
        self.hover = ElidedLabel(" ")
        self.worst = ElidedLabel(lines=2)
        self.glw = pg.GraphicsLayoutWidget()
        self.plot = self.glw.addPlot()
        self.plot.setLabel("bottom", "head")
        self.plot.setLabel("left", "layer")
        self.plot.invertY(True)
        self.plot.setMouseEnabled(False, False)
        self.plot.hideButtons()
        self.image = pg.ImageItem(axisOrder="row-major")
        self.plot.addItem(self.image)
        self.bad = pg.ImageItem(axisOrder="row-major")  # NaN / inf heads, in the one colour the map never uses
        self.plot.addItem(self.bad)
        self.cbar = pg.ColorBarItem(colorMap=pg.colormap.get("viridis"), label="relative error of the head",
                                    interactive=False)
        self.cbar.setImageItem(self.image, insert_in=self.plot)
        plain_axes(self.plot)
        plain_axes(self.cbar)
        self.cbar.getAxis("right").setWidth(56)
        self.mark = QGraphicsRectItem()  # the layer shown above, outlined
        pen = QPen(Qt.GlobalColor.white)
        pen.setCosmetic(True)
        pen.setWidth(2)
        self.mark.setPen(pen)
        self.mark.setZValue(20)
        self.mark.setVisible(False)
        self.plot.addItem(self.mark)
        bar = QHBoxLayout()
        bar.addWidget(controls_row(self.button, (QLabel("projection"), self.proj), (QLabel("variant"), self.variant)),
                      1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(bar)
        lay.addWidget(self.glw, 1)
        lay.addWidget(self.hover)
        lay.addWidget(self.worst)
        self.hint = Hint(self.glw, "Measure every layer: each attention layer's heads side by side, one projection "
                                   "and one variant at a time", right=110)
        self._rows: dict[tuple[str, str], dict[int | None, object]] = {}  # (variant, template) -> index -> row
        self._ratio = False
        self._current: str | None = None
        self._grid = np.zeros((0, 0))
        self._cells: dict[tuple[int, int], tuple[str, str]] = {}  # (row, column) -> (layer, head)
        self._picked = False  # the user chose the variant here (it stays until the tree shows another)
        self._followed = ""  # the checkpoint the tree shows: the variant shown once measured
        self._frame = None
        self.proj.currentIndexChanged.connect(lambda _: self._draw())
        self.variant.currentIndexChanged.connect(lambda _: self._draw())
        self.variant.activated.connect(lambda _: setattr(self, "_picked", True))
        self.glw.scene().sigMouseMoved.connect(self._on_move)
        self.glw.scene().sigMouseClicked.connect(self._on_click)
        self.set_rows(None)

    # -- data ------------------------------------------------------------------------------------

    def set_rows(self, rows, empty_note: str = "") -> None:
        """``rows``: the :class:`~quantscope.backend.compare.HeadRow` of a head sweep ([] when it
        found no attention layer to split), None before one ran; ``empty_note``: why there is none."""
        self._rows = {}
        for r in rows or ():
            t, i = template_of(r.name)
            self._rows.setdefault((r.variant, t), {})[i] = r
        variants = list(dict.fromkeys(v for v, _ in self._rows))
        templates = sorted({t for _, t in self._rows}, key=_order)
        short = short_names(templates)
        keep_t, keep_v = self.proj.currentData(), self.variant.currentText()
        for box in (self.proj, self.variant):
            box.blockSignals(True)
            box.clear()
        for t in templates:
            self.proj.addItem(short[t], t)
            self.proj.setItemData(self.proj.count() - 1, t, Qt.ItemDataRole.ToolTipRole)
        self.variant.addItems(variants)
        # the projection of the layer shown, else the one shown before
        want_t = template_of(self._current)[0] if self._current is not None else None
        for t in (want_t, keep_t):
            if t in templates:
                self.proj.setCurrentIndex(templates.index(t))
                break
        # the tree's checkpoint, unless the user chose another here; else the one shown before
        for v in ((keep_v, self._followed) if self._picked else (self._followed, keep_v)):
            if v in variants:
                self.variant.setCurrentText(v)
                break
        for box in (self.proj, self.variant):
            box.blockSignals(False)
        self.button.setText("Measure every layer" if rows is None else "Measure again")
        if rows is None:
            self.hint.set(empty_note or self.hint.default)
        elif not self._rows:
            self.hint.empty(empty_note or "No attention layer of the reference is split into heads (its config.json "
                                          "names no head counts, or no variant covers one)")
        else:
            self.hint.set("")
        self._frame = None
        self._draw()

    def has_rows(self) -> bool:
        return bool(self._rows)

    def set_ratio(self, on: bool) -> None:
        """Each head over its layer's error (as the plot above), or the head's own."""
        self._ratio = bool(on)
        self._draw()

    def follow(self, label: str) -> None:
        """The tree shows checkpoint ``label``: the map shows it (where it was measured)."""
        self._picked = False
        self._followed = label
        if self.variant.findText(label) >= 0:
            self.variant.setCurrentText(label)

    def mark_layer(self, name: str | None) -> None:
        """The layer shown above: its projection chosen, its row outlined."""
        self._current = name
        if name is not None:
            t, _ = template_of(name)
            k = self.proj.findData(t)
            if k >= 0 and k != self.proj.currentIndex():
                self.proj.setCurrentIndex(k)  # (draws, and places the outline)
                return
        self._place_mark()

    # -- drawing ---------------------------------------------------------------------------------

    def _shown(self) -> dict:
        return self._rows.get((self.variant.currentText(), self.proj.currentData()), {})

    def _draw(self) -> None:
        rows = self._shown()
        self._cells = {}
        if not rows:
            self.image.clear()
            self.bad.clear()
            self._grid = np.zeros((0, 0))
            self.cbar.setVisible(False)
            self.mark.setVisible(False)
            self.worst.setText("")
            self.hover.setText(" ")
            self.plot.getAxis("bottom").setTicks([[]])
            self.plot.getAxis("left").setTicks([[]])
            self.plot.setTitle(None)
            self._frame = None  # (ticks and title gone: drawn again for the next pair shown)
            return
        self.cbar.setVisible(True)
        order = sorted(rows, key=lambda i: -1 if i is None else i)
        n = max(len(rows[i].heads) for i in order)
        grid = np.full((len(order), n), np.nan)
        bad = np.zeros(grid.shape, bool)
        for a, i in enumerate(order):
            r = rows[i]
            e = np.asarray(r.rel_fro, np.float64)
            v = head_ratio(e, r.layer_rel_fro) if self._ratio else e
            grid[a, :v.size] = v
            bad[a, :e.size] = ~np.isfinite(e)  # (a ratio undefined for a NaN layer: blank, not red)
            for j, h in enumerate(r.heads):
                self._cells[(a, j)] = (r.name, h)
        self._grid = grid
        rect = QRectF(-0.5, -0.5, n, len(order))
        self.hover.setText(" ")  # (of the pair shown before)
        self.image.setImage(np.where(bad, np.nan, grid), autoLevels=False)
        self.image.setRect(rect)
        if bad.any():
            rgba = np.zeros(grid.shape + (4,), np.uint8)
            rgba[bad] = BAD_RGBA
            self.bad.setImage(rgba, autoLevels=False, levels=(0, 255))
            self.bad.setRect(rect)
        else:
            self.bad.clear()
        finite = grid[np.isfinite(grid) & ~bad]
        if finite.size:
            lo, hi = float(finite.min()), float(finite.max())
            # no full contrast for a spread nobody would care about (heads within a few percent)
            least = 0.1 * abs(lo + hi) / 2
            if hi - lo < least:
                mid = (lo + hi) / 2
                lo, hi = mid - least / 2, mid + least / 2
            self.cbar.setLevels((lo, hi if hi > lo else lo + 1e-12))
        self.cbar.getAxis("left").setLabel("head's error ÷ the layer's" if self._ratio else "relative error of the head")
        widest = max(order, key=lambda i: len(rows[i].heads))
        names = rows[widest].heads
        frame = (tuple(order), tuple(names), self.variant.currentText(), self.proj.currentData())
        if frame != self._frame:
            self._frame = frame
            step = max(1, math.ceil(n / 24))
            step = 1 << (step - 1).bit_length()
            self.plot.getAxis("bottom").setTicks([[(float(j), h) for j, h in enumerate(names) if j % step == 0]])
            every = max(1, math.ceil(len(order) / 16))
            self.plot.getAxis("left").setTicks([[(float(a), "–" if i is None else str(i))
                                                 for a, i in enumerate(order) if a % every == 0]])
            r0 = rows[widest]
            self.plot.setLabel("bottom", "head (" + ("output rows" if r0.axis == "rows" else "input columns") + ")")
            self.plot.setTitle(f"{self.variant.currentText()} · {self.proj.currentData()}", size="9pt")
            self.plot.setRange(xRange=(-0.5, n - 0.5), yRange=(-0.5, len(order) - 0.5), padding=0)
        self.worst.setText(self._worst_text(order, rows))
        self._place_mark()

    def _place_mark(self) -> None:
        rows = self._shown()
        order = sorted(rows, key=lambda i: -1 if i is None else i)
        hit = [a for a, i in enumerate(order) if rows[i].name == self._current]
        if not hit or not self._grid.size:
            self.mark.setVisible(False)
            return
        self.mark.setRect(QRectF(-0.5, hit[0] - 0.5, self._grid.shape[1], 1.0))
        self.mark.setVisible(True)

    def _worst_text(self, order: list, rows: dict) -> str:
        """The heads furthest above their own layer's error, and those NaN or inf."""
        ranked, odd = [], []
        for i in order:
            r = rows[i]
            whole = float(r.layer_rel_fro)
            for h, e in zip(r.heads, r.rel_fro):
                where = f"{'' if i is None else f'layer {i} '}{h}"
                if not math.isfinite(e):
                    odd.append(where)
                elif whole and math.isfinite(whole):
                    ranked.append((e / whole, e, where))
        ranked.sort(key=lambda x: -x[0])
        parts = [f"{w} {e:.3g} ({q:.2f}×)" for q, e, w in ranked[:4]]
        text = ("Heads furthest above their layer's error · " + " · ".join(parts)) if parts else ""
        if odd:
            text += (" · " if text else "") + f"NaN/inf in {', '.join(odd[:4])}{' …' if len(odd) > 4 else ''}"
        return text

    # -- pointer ---------------------------------------------------------------------------------

    def _cell_at(self, pos) -> tuple[int, int] | None:
        if not self._grid.size or not self.plot.vb.sceneBoundingRect().contains(pos):
            return None
        p = self.plot.vb.mapSceneToView(pos)
        a, j = math.floor(p.y() + 0.5), math.floor(p.x() + 0.5)
        return (a, j) if (a, j) in self._cells else None

    def _on_move(self, pos) -> None:
        cell = self._cell_at(pos)
        if cell is None:
            self.hover.setText(" ")
            return
        name, head = self._cells[cell]
        r = next(r for r in self._shown().values() if r.name == name)
        e = r.rel_fro[r.heads.index(head)]
        whole = float(r.layer_rel_fro)
        times = f" ({e / whole:.2f}× the layer's {whole:.4g})" if whole and math.isfinite(whole) and math.isfinite(e) else ""
        self.hover.setText(f"{name} {head}: {e:.4g}{times}")

    def _on_click(self, ev) -> None:
        if ev.button() != Qt.MouseButton.LeftButton or ev.double():
            return
        cell = self._cell_at(ev.scenePos())
        if cell is not None:
            self.layer_selected.emit(self._cells[cell][0])

    def figure_parts(self) -> list:
        return [self.glw, self.worst.text()] if self._grid.size else []

