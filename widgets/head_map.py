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
    QCheckBox,
    QComboBox,
    QGraphicsRectItem,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)
from quantscope.backend.compare_align import layer_template as template_of
from quantscope.backend.heads import head_ratio

from .palette import BAD_RGBA
from .plots import ElidedLabel, Hint, controls_row, plain_axes, shrinkable


class NamedAxis(pg.AxisItem):
    """Ticks at whole positions named by ``names`` (heads ``q0``, ``k1``; layers ``0``, ``12``),
    never between two, as many as fit (``px`` pixels per label): 1, 2, 4, 8… apart, so the
    names shown stay round (q0, q8, q16, not q0, q7, q14)."""

    def __init__(self, orientation: str, px: int = 34, **k) -> None:
        super().__init__(orientation, **k)
        self.names: list[str] = []
        self.px = px

    def set_names(self, names: list[str]) -> None:
        if names != self.names:
            self.names = names
            self.picture = None  # (drawn again: the range alone may not have changed)
            self.update()

    def tickValues(self, minVal, maxVal, size):
        n = len(self.names)
        if not n:
            return []
        minVal, maxVal = min(minVal, maxVal), max(minVal, maxVal)  # (an inverted axis gives them the other way)
        lo, hi = max(0, math.ceil(minVal)), min(n - 1, math.floor(maxVal))
        if hi < lo:
            return []
        # (size: the axis' length in px, for the whole range asked)
        room = max(1, int(size * (hi - lo + 1) / max(1e-9, maxVal - minVal) // self.px))
        need = max(1, math.ceil((hi - lo + 1) / room))
        step = 1 << (need - 1).bit_length()
        return [(float(step), [float(i) for i in range(lo, hi + 1) if i % step == 0])]

    def tickStrings(self, values, scale, spacing):
        return [self.names[int(v)] if 0 <= int(v) < len(self.names) else "" for v in values]


def _tower(template: str) -> str:
    """The part of a template before its layer number (``model.language_model.layers``)."""
    return template.split(".*.", 1)[0] if ".*." in template else ""


def _tail(parts: dict[str, list[str]]) -> dict[str, str]:
    """Each key by its shortest tail of dotted parts no other key's ends with."""
    out = {}
    for t, p in parts.items():
        for k in range(1, len(p) + 1):
            if not any(o != t and q[-k:] == p[-k:] for o, q in parts.items()):
                out[t] = ".".join(p[-k:])
                break
        else:
            out[t] = ".".join(p) or t
    return out


def short_names(templates: list[str]) -> dict[str, str]:
    """Each template named as briefly as it stays apart from the others: its projection's
    shortest unique tail within its tower (``q_proj``, or ``self_attn.q_proj`` beside a
    cross-attention's ``encoder_attn.q_proj``), after its tower's where the model has more than
    one (``language_model · q_proj``, ``visual · qkv``)."""
    towers = {t: _tower(t) for t in templates}
    out = {}
    for tw in set(towers.values()):
        mine = [t for t in templates if towers[t] == tw]
        out.update(_tail({t: (t.split(".*.", 1)[1] if ".*." in t else t).split(".") for t in mine}))
    if len(set(towers.values())) > 1:
        # (a tower's name without its trailing layers / blocks: model.visual.blocks → visual)
        heads = tower_names(list(set(towers.values())))
        out = {t: f"{heads[towers[t]]} · {out[t]}" for t in templates}
    if len(set(out.values())) < len(out):  # (two towers named alike: their whole paths)
        seen = list(out.values())
        out = {t: (t if seen.count(v) > 1 else v) for t, v in out.items()}
    return out


def tower_names(towers: list[str]) -> dict[str, str]:
    """Each tower (a template's part before its layer number) by its shortest distinct name: its
    path without the trailing ``layers`` / ``blocks``, cut to the tail no other tower's ends with
    (``model.language_model.layers`` → ``language_model``; ``model.layers`` → ``model``)."""
    out = _tail({tw: tw.split(".")[:-1] or [tw or "model"] for tw in towers})
    return {tw: (v or "model") for tw, v in out.items()}


def _order(template: str):
    """Projections in the order a block computes them (q k v, fused, o), towers by their path."""
    leaf = template.rsplit(".", 1)[-1]
    rank = {"q_proj": 0, "q_a_proj": 0, "q_b_proj": 1, "k_proj": 2, "v_proj": 3, "kv_b_proj": 4, "qkv_proj": 5,
            "qkv": 5, "o_proj": 6, "out_proj": 6, "proj": 6}.get(leaf, 7)
    return _tower(template), template.rsplit(".", 1)[0], rank, leaf


class HeadMap(QWidget):
    """Rows: the decoder layers holding the chosen projection; columns: their heads. A cell: the
    head's relative error, or that over its layer's (the same choice as the plot above)."""

    layer_selected = Signal(str)
    measure_requested = Signal()

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.button = QPushButton("Measure every layer")
        self.button.setToolTip("The error of every attention layer's heads, for every variant (Tools ▸ Compare "
                               "heads of every layer, Ctrl+Shift+H)")
        self.button.clicked.connect(self.measure_requested)
        self.proj = shrinkable(QComboBox(), 22)
        self.variant = shrinkable(QComboBox(), 22)
        # the shown variant's own colour scale, or one for every variant of the projection
        self.scale = QCheckBox("shared scale")
        self.scale.setToolTip("Colours on the range of every variant's heads of this projection (a colour reads "
                              "the same whichever variant is shown); unchecked, of the shown variant's only")
        self.hover = ElidedLabel(" ")
        self.worst = ElidedLabel(lines=2)
        self.glw = pg.GraphicsLayoutWidget()
        self.xaxis, self.yaxis = NamedAxis("bottom", 34), NamedAxis("left", 15)
        self.plot = self.glw.addPlot(axisItems={"bottom": self.xaxis, "left": self.yaxis})
        self.xaxis.setStyle(hideOverlappingLabels=12)  # (q0, centred on the first cell, overhangs the map's edge)
        self.plot.setLabel("bottom", "head")
        self.plot.setLabel("left", "decoder layer")
        self.plot.invertY(True)
        self.plot.setMouseEnabled(False, False)
        self.plot.hideButtons()
        self.image = pg.ImageItem(axisOrder="row-major")
        self.plot.addItem(self.image)
        self.bad = pg.ImageItem(axisOrder="row-major")  # NaN / inf heads, in the one colour the map never uses
        self.plot.addItem(self.bad)
        self.cbar = pg.ColorBarItem(colorMap=pg.colormap.get("viridis"), label="head rel. error", interactive=False)
        self.cbar.setImageItem(self.image, insert_in=self.plot)
        plain_axes(self.plot)
        plain_axes(self.cbar)
        self.cbar.getAxis("right").setWidth(50)
        # the layer shown above, outlined: white over black, seen on the brightest cells too
        self.marks = []
        for colour, width, z in ((Qt.GlobalColor.black, 3, 20), (Qt.GlobalColor.white, 1, 21)):
            mark = QGraphicsRectItem()
            pen = QPen(colour)
            pen.setCosmetic(True)
            pen.setWidth(width)
            mark.setPen(pen)
            mark.setZValue(z)
            mark.setVisible(False)
            self.plot.addItem(mark)
            self.marks.append(mark)
        self._lines: list = []  # the key/value groups among the query heads dotted, q | k | v dashed
        bar = QHBoxLayout()
        bar.addWidget(controls_row(self.button, (QLabel("projection"), self.proj), (QLabel("variant"), self.variant),
                                   self.scale), 1)
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
        self._order: list = []  # the layer numbers of the map's rows, top to bottom
        self._cells: dict[tuple[int, int], tuple[str, str]] = {}  # (row, column) -> (layer, head)
        self._picked = False  # the user chose the variant here (it stays until the tree shows another)
        self._followed = ""  # the checkpoint the tree shows: the variant shown once measured
        self.proj.currentIndexChanged.connect(lambda _: self._draw())
        self.variant.currentIndexChanged.connect(lambda _: self._draw())
        self.scale.toggled.connect(lambda _: self._draw())
        self.variant.activated.connect(lambda _: setattr(self, "_picked", True))
        self.glw.scene().sigMouseMoved.connect(self._on_move)
        self.glw.scene().sigMouseClicked.connect(self._on_click)
        self.set_rows(None)

    # -- data ------------------------------------------------------------------------------------

    def set_rows(self, rows, empty_note: str = "") -> None:
        """``rows``: the :class:`~quantscope.backend.compare.HeadRow` of a head sweep ([] when it
        found no attention layer to split), None before one ran; ``empty_note``: why there is none."""
        self._rows = {}
        self._all = list(rows or ())  # (in the sweep's order: the model's layers, then the variants)
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
        self._draw()

    def has_rows(self) -> bool:
        return bool(self._rows)

    def rows(self) -> list:
        """The head rows shown (of every variant and projection), in the sweep's order."""
        return list(self._all)

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

    def _values(self, r) -> np.ndarray:
        return head_ratio(r.rel_fro, r.layer_rel_fro) if self._ratio else np.asarray(r.rel_fro, np.float64)

    def _draw(self) -> None:
        rows = self._shown()
        self._cells = {}
        self.hover.setText(" ")  # (of the pair shown before)
        for line in self._lines:
            self.plot.removeItem(line)
        self._lines = []
        if not rows:
            self.image.clear()
            self.bad.clear()
            self._grid = np.zeros((0, 0))
            self._order = []
            self.cbar.setVisible(False)
            for mark in self.marks:
                mark.setVisible(False)
            self.worst.setText("")
            self.xaxis.set_names([])
            self.yaxis.set_names([])
            self.plot.setLabel("bottom", "head")
            return
        self.cbar.setVisible(True)
        order = sorted(rows, key=lambda i: -1 if i is None else i)
        n = max(len(rows[i].heads) for i in order)
        grid = np.full((len(order), n), np.nan)
        bad = np.zeros(grid.shape, bool)
        for a, i in enumerate(order):
            r = rows[i]
            e = np.asarray(r.rel_fro, np.float64)
            v = self._values(r)
            grid[a, :v.size] = v
            bad[a, :e.size] = ~np.isfinite(e)  # (a ratio undefined for a NaN layer: blank, not red)
            for j, h in enumerate(r.heads):
                self._cells[(a, j)] = (r.name, h)
        self._grid, self._order = grid, order
        rect = QRectF(-0.5, -0.5, n, len(order))
        self.image.setImage(np.where(bad, np.nan, grid), autoLevels=False)
        self.image.setRect(rect)
        if bad.any():
            rgba = np.zeros(grid.shape + (4,), np.uint8)
            rgba[bad] = BAD_RGBA
            self.bad.setImage(rgba, autoLevels=False, levels=(0, 255))
            self.bad.setRect(rect)
        else:
            self.bad.clear()
        if self.scale.isChecked():  # every variant's heads of this projection
            t = self.proj.currentData()
            every = [self._values(r) for (v, tt), by in self._rows.items() if tt == t for r in by.values()]
            values = np.concatenate(every) if every else grid.ravel()
        else:
            values = grid[~bad]
        finite = values[np.isfinite(values)]
        if finite.size:
            lo, hi = float(finite.min()), float(finite.max())
            # no full contrast for a spread nobody would care about (heads within a few percent)
            least = 0.1 * abs(lo + hi) / 2
            if hi - lo < least:
                mid = (lo + hi) / 2
                lo, hi = mid - least / 2, mid + least / 2
            self.cbar.setLevels((lo, hi if hi > lo else lo + 1e-12))
        self.cbar.getAxis("left").setLabel("head ÷ layer error" if self._ratio else "head rel. error")
        widest = rows[max(order, key=lambda i: len(rows[i].heads))]
        self.xaxis.set_names(list(widest.heads))
        self.yaxis.set_names(["–" if i is None else str(i) for i in order])
        towers = {_tower(t) for _, t in self._rows}
        tower = _tower(self.proj.currentData() or "")
        self.plot.setLabel("left", f"layer ({tower_names(sorted(towers))[tower]})" if len(towers) > 1 else
                           "decoder layer")
        self.plot.setLabel("bottom", "head (" + ("output rows" if widest.axis == "rows" else "input columns") + ")")
        self.plot.setRange(xRange=(-0.5, n - 0.5), yRange=(-0.5, len(order) - 0.5), padding=0)
        # the query heads sharing one key/value head (a fused qkv_proj's: among its q heads)
        group = getattr(widest, "group", 0)
        qn = sum(h.startswith("q") for h in widest.heads) if any(h.startswith("k") for h in widest.heads) else n
        kinds = [h.rstrip("0123456789") for h in widest.heads]
        at = [(b - 0.5, Qt.PenStyle.DotLine) for b in range(group, qn, group)] if group and group < qn else []
        at += [(j - 0.5, Qt.PenStyle.DashLine) for j in range(1, len(kinds)) if kinds[j] != kinds[j - 1]]  # q | k | v
        for x, style in at:
            line = pg.InfiniteLine(pos=x, angle=90, pen=pg.mkPen((255, 255, 255, 170), width=1, style=style))
            self.plot.addItem(line)
            self._lines.append(line)
        self.worst.setText(self._worst_text(order, rows))
        self._place_mark()

    def _place_mark(self) -> None:
        """The outline on the layer shown: its row, or its decoder layer's where another of its
        projections is shown (its tower's)."""
        hit = None
        if self._current is not None and self._grid.size:
            t, idx = template_of(self._current)
            shown = self.proj.currentData() or ""
            if t == shown or (idx is not None and _tower(t) == _tower(shown)):
                hit = next((a for a, i in enumerate(self._order) if i == idx), None)
        for mark in self.marks:
            if hit is not None:
                mark.setRect(QRectF(-0.5, hit - 0.5, self._grid.shape[1], 1.0))
            mark.setVisible(hit is not None)

    def _worst_text(self, order: list, rows: dict) -> str:
        """The heads furthest above their own layer's error, and those NaN or inf."""
        ranked, odd = [], []
        for i in order:
            r = rows[i]
            q = head_ratio(r.rel_fro, r.layer_rel_fro)
            for h, e, x in zip(r.heads, r.rel_fro, q):
                where = f"{'' if i is None else f'layer {i} '}{h}"
                if not math.isfinite(e):
                    odd.append(where)
                elif math.isfinite(x):
                    ranked.append((float(x), e, where))
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
        r = self._shown()[self._order[cell[0]]]
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
        """What an exported figure shows: which projection and variant (no title on screen: its
        width cut the colour bar off a narrow window), the map and its worst heads."""
        if not self._grid.size:
            return []
        scale = "shared by every variant" if self.scale.isChecked() else f"{self.variant.currentText()}'s own"
        said = f"Every layer's heads: {self.variant.currentText()} · {self.proj.currentData()} (colour scale {scale})"
        return [said, self.glw, self.worst.text()]
