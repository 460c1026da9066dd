"""HistogramView: histograms of several variants overlaid on shared bin edges."""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QCheckBox, QDoubleSpinBox, QLabel, QPushButton, QVBoxLayout, QWidget

from .plots import LINE_GLYPH, ElidedLabel, Hint, Legend, controls_row, plot_widget, show_values


#: Where an empty bin is drawn on the log10(count) axis: just under a count of 1.
LOG_FLOOR = -0.25


class HistogramView(QWidget):
    """Step histograms (one colour per variant) with log-y and x-range controls."""

    def __init__(self, xlabel: str, ylabel: str = "count", empty_hint: str = "", discrete: bool = False,
                 alt: tuple[str, str] | None = None, parent=None) -> None:
        """``discrete``: one bin per level (zero points): empty bins are drawn on a floor.
        ``alt``: (a checkbox's text, its x label) for a second set of histograms the caller may
        give (:meth:`set_histograms`' ``alt``), shown instead while the box is ticked."""
        super().__init__(parent)
        self.discrete = discrete
        self.xlabel = xlabel
        self.plot = plot_widget(counts=True)
        self.hint = Hint(self.plot, empty_hint)
        self.plot.setLabel("bottom", xlabel)
        self.plot.showGrid(x=True, y=True, alpha=0.2)
        self.legend = Legend()
        self.log_y = QCheckBox("log y")
        self.log_y.setChecked(True)
        self.plot.setLabel("left", f"log10({ylabel})")  # as _redraw says it (log y starts ticked)
        self.lo = QDoubleSpinBox(decimals=6, minimum=-1e9, maximum=1e9)
        self.hi = QDoubleSpinBox(decimals=6, minimum=-1e9, maximum=1e9)
        for box in (self.lo, self.hi):
            box.setFixedWidth(96)  # its own size hint fits ±1e9 with 6 decimals: 160 px
        self.apply = QPushButton("Apply")
        self.apply.setToolTip("Show only this x range")
        self.reset = QPushButton("All")
        self.reset.setToolTip("Show the full range: every value, outliers included")
        self.bulk = QPushButton("Bulk")
        self.bulk.setToolTip("Show the range that holds all but the few most extreme values")
        for b in (self.apply, self.reset, self.bulk):  # the style's 80 px minimum is wider than "Apply"
            b.setMinimumWidth(b.fontMetrics().horizontalAdvance(b.text()) + 20)
        self.note = ElidedLabel()  # the layer's name, or why the view is empty: never widens the window
        self.alt_box = QCheckBox(alt[0]) if alt else None
        self.alt_xlabel = alt[1] if alt else ""
        bar = controls_row(self.log_y, *([self.alt_box] if alt else []),
                           (QLabel("x:"), self.lo, QLabel("–"), self.hi), (self.apply, self.reset, self.bulk))
        # what the default range leaves out, and values in no bin (NaN/inf): one line, always
        # there (shown and hidden, it would change the plot's height at every selection)
        self.footer = ElidedLabel(lines=2)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(bar)
        # the note on a line of its own: beside the range controls it had 40 px at 1280 px wide
        # ("…proj", "per-…")
        lay.addWidget(self.note)
        lay.addWidget(self.legend)
        self.legend.toggled.connect(lambda *_: self._apply_hidden())
        lay.addWidget(self.plot, 1)
        lay.addWidget(self.footer)
        self.log_y.toggled.connect(lambda _: (self._redraw(), self._y_range()))
        if self.alt_box is not None:
            self.alt_box.toggled.connect(lambda _: self._show_set())
        self._sets: dict = {"main": (None, {}, None, ""), "alt": None}  # (edges, counts, view, footer note)
        self._said = ""  # the footer's part both sets share (NaN/inf, series left out)
        self.apply.clicked.connect(lambda: self.plot.setXRange(self.lo.value(), self.hi.value(), padding=0))
        self.reset.clicked.connect(self._full_range)
        self.bulk.clicked.connect(self._bulk_range)
        self._edges = None
        self._view: tuple[float, float] | None = None
        self._counts: dict[str, np.ndarray] = {}
        self._colors: dict = {}
        self._items: dict[str, pg.PlotDataItem] = {}
        self._marks: dict[str, pg.ScatterPlotItem] = {}
        self._enable_range(False)
        show_values(self.plot, False)

    def figure_parts(self) -> list:
        """The widgets an exported figure shows (not the controls): the note above the plot too,
        less the layer's name (the figure's title has it): an export left out "smoothing undone, as
        measured", which its figures are."""
        note = self.note.text()
        head, sep, rest = note.partition(" · ")
        if " " not in head:  # (a layer's name, which the title has: what follows it)
            note = rest
        return [*([note] if note else []), self.legend, self.plot, self.footer.text()]

    def _enable_range(self, on: bool) -> None:
        for w in (self.lo, self.hi, self.apply, self.reset):
            w.setEnabled(on)
        for box in (self.lo, self.hi):  # no stale range of the layer before (a 1-D layer has none)
            box.setSpecialValueText("" if on else " ")
            if not on:
                box.blockSignals(True)
                box.setValue(box.minimum())
                box.blockSignals(False)
        self.bulk.setEnabled(on and self._view is not None)

    def set_histograms(self, edges: np.ndarray | None, counts: dict[str, np.ndarray], colors: dict,
                       note: str = "", view: tuple[float, float] | None = None,
                       nonfinite: dict[str, int] | None = None, absent: str = "", alt: tuple | None = None) -> None:
        """``view``: the range shown first, where the bulk of the values is (a few outliers
        stretch ``edges`` far beyond it); ``nonfinite``: per key, values that are NaN or ±inf,
        in no bin; ``absent``: which series are left out and why. All are said in the line under
        the plot (the toolbar's note has no room in a 1280 px window). ``alt``: ``(edges, counts,
        view, footer note)`` of the set the view's ``alt`` box shows."""
        self._colors = dict(colors)
        self._sets = {"main": (edges, dict(counts), view, ""), "alt": alt}
        self.note.setText(note)
        # values in no bin first (NaN or inf: a broken checkpoint), so that they survive the
        # elision of a narrow window; the tooltip has the whole line
        nan = ("NaN/inf, in no bin: " + ", ".join(f"{k} {n:,}" for k, n in nonfinite.items())) if nonfinite else ""
        self._said = ". ".join(p for p in (nan, absent) if p)
        if self.alt_box is not None:
            self.alt_box.setEnabled(alt is not None and alt[0] is not None)
        self._show_set(note)

    def _show_set(self, note: str | None = None) -> None:
        """Show the main set of histograms, or the alternate one while its box is ticked."""
        use_alt = self.alt_box is not None and self.alt_box.isChecked() and self._sets["alt"] is not None \
            and self._sets["alt"][0] is not None
        edges, counts, view, extra = self._sets["alt" if use_alt else "main"]
        self._edges, self._counts = edges, dict(counts)
        self._view = view if edges is not None else None
        self.plot.setLabel("bottom", self.alt_xlabel if use_alt else self.xlabel)
        self.footer.setText(". ".join(p for p in (self._said, extra, self._footer()) if p))
        note = self.note.text() if note is None else note
        empty = edges is None or not counts
        # an empty view says why (the caller's note: "not a weight matrix", "no scales"), or
        # what to do to fill it
        if empty:
            self.hint.empty(note)
        else:
            self.hint.set("")
        self._enable_range(not empty)
        show_values(self.plot, not empty)
        self._redraw()
        if self._view is not None:
            self._bulk_range()
        else:
            self._full_range()

    def _outside(self) -> np.ndarray | None:
        """Bins wholly outside the bulk view (None without one)."""
        if self._view is None or self._edges is None:
            return None
        e = np.asarray(self._edges)
        lo, hi = self._view
        return (e[1:] <= lo) | (e[:-1] >= hi)

    def _footer(self) -> str:
        """What lies beyond the bulk, per series that has any (how many, how far), and the full
        range. Said the same whichever range is shown (it goes into exported figures too)."""
        parts = []
        outside = self._outside()
        if outside is not None:
            e = np.asarray(self._edges)
            centres = (e[:-1] + e[1:]) / 2
            lo, hi = self._view
            beyond = []
            for k, c in self._counts.items():
                c = np.asarray(c)
                n = int(c[outside].sum())
                if n:
                    far = centres[outside & (c > 0)]
                    reach = far[np.argmax(np.abs(far - (lo + hi) / 2))]
                    beyond.append((n, abs(reach - (lo + hi) / 2), f"{k} {n:,} (to {reach:.4g})"))
            # the series that reaches farthest first (whose value sets the full range), then by count
            beyond.sort(key=lambda b: -b[0])
            if beyond:
                far_one = max(beyond, key=lambda b: b[1])
                beyond.remove(far_one)
                beyond.insert(0, far_one)
            shown = [t for _, _, t in beyond[:4]] + ([f"{len(beyond) - 4} more"] if len(beyond) > 4 else [])
            if shown:
                parts.append(f"Beyond the bulk {lo:.4g} … {hi:.4g}: {', '.join(shown)}; full range "
                             f"{float(e[0]):.4g} … {float(e[-1]):.4g} (All)")
        return ". ".join(parts)

    def clear(self) -> None:
        self.set_histograms(None, {}, {})

    def _show_range(self, lo: float, hi: float) -> None:
        self.lo.setValue(lo)
        self.hi.setValue(hi)
        self.plot.setXRange(lo, hi, padding=0.02)
        self._y_range()

    def _apply_hidden(self, refit: bool = True) -> None:
        """Show only the series the legend does not hide (``refit``: the count axis fitted to them)."""
        for label, item in self._items.items():
            shown = label not in self.legend.hidden
            item.setVisible(shown)
            if label in self._marks:
                self._marks[label].setVisible(shown)
        if refit:
            self._y_range()

    def _y_range(self) -> None:
        top = max((float(np.max(c)) for k, c in self._counts.items() if np.size(c) and k not in self.legend.hidden),
                  default=0.0)
        if self.discrete and self.log_y.isChecked() and top > 0:
            # from the empty bins' floor: autoranged, the axis began at the smallest count, so a
            # level used by 4 groups sat on it and read as unused
            self.plot.setYRange(LOG_FLOOR, math.log10(top), padding=0.05)
        else:
            self.plot.enableAutoRange(axis="y")

    def _full_range(self) -> None:
        if self._edges is not None and len(self._edges) > 1:
            self._show_range(float(self._edges[0]), float(self._edges[-1]))
        else:
            self.plot.enableAutoRange(axis="y")

    def _bulk_range(self) -> None:
        if self._view is not None:
            self._show_range(*self._view)

    def _redraw(self) -> None:
        labels = list(self._counts) if self._edges is not None else []
        if labels != list(self._items):
            # Creating pyqtgraph items is the costly part of an update: only a new set of
            # variants rebuilds them; otherwise the existing curves get new data in place.
            self.plot.clear()
            self._items = {}
            self._marks = {}
            for label in labels:
                item = pg.PlotDataItem(stepMode="center", connect="finite")
                if label == "reference":
                    item.setZValue(1)  # drawn over the variants, not buried under six of them
                self.plot.addItem(item)
                self._items[label] = item
                # a dot on each non-empty bin beyond the bulk: with "All", a single outlier was a
                # one-pixel step at count 1 beside the empty-bin floor
                mark = pg.ScatterPlotItem(size=7, pen=None)
                mark.setZValue(2)
                self.plot.addItem(mark)
                self._marks[label] = mark
        self.legend.set_entries([(label, self._colors.get(label), LINE_GLYPH) for label in labels])
        log = self.log_y.isChecked()
        self.plot.setLabel("left", "log10(count)" if log else "count")  # an empty view says it the same
        if self._edges is None:
            return
        for label, c in self._counts.items():
            y = np.asarray(c, dtype=np.float64)
            if log and self.discrete:
                # Empty bins on a floor just under log10(1) = 0: with gaps, a variant whose values
                # sit in one level (every zero point 8) was drawn as a lone floating dash.
                y = np.where(y > 0, np.log10(np.maximum(y, 1)), LOG_FLOOR)
            elif log:
                # empty bins are gaps (a sparse tail is no comb to a floor), but those beside a
                # bin of 10 or more drop to the floor: a tall bin between empty ones (every exact
                # zero of a layer, the tallest bin) was a short dash floating high above the curve
                filled = y > 0
                tall = y >= 10
                beside = np.zeros_like(filled)
                beside[1:] |= tall[:-1]
                beside[:-1] |= tall[1:]
                y = np.where(filled, np.log10(np.where(filled, y, 1.0)), np.where(beside, LOG_FLOOR, np.nan))
            color = self._colors.get(label)
            # The reference in its own colour, thinner; solid (a dashed curve cost 40% of the
            # plot's paint time).
            pen = pg.mkPen(color, width=1.5 if label == "reference" else 2)
            self._items[label].setData(self._edges, y, pen=pen)
            outside = self._outside()
            mark = self._marks.get(label)
            if mark is not None:
                e = np.asarray(self._edges)
                sel = np.flatnonzero(outside & (np.asarray(c) > 0)) if outside is not None else np.zeros(0, int)
                mark.setData((e[sel] + e[sel + 1]) / 2, y[sel], brush=pg.mkBrush(color))
        self._apply_hidden(refit=False)  # (the legend's hidden series stay hidden)
