"""CodeUsageView: how often each quantization level is used, per variant (exact counts)."""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QCheckBox, QHBoxLayout, QLabel, QVBoxLayout, QWidget

from .plots import BAR_GLYPH, Hint, Legend, plot_widget, show_values


class CodeUsageView(QWidget):
    """Bars per level and variant; dead levels (count 0) and saturation are listed.

    Variants with different numbers of levels (a mixed 3/6-bit MLX layer beside 4-bit ones) get
    one plot each per number of levels, stacked, each on its own integer axis: on one shared
    axis a 3-bit bar stood across several 4-bit ones, and a 6-bit variant's 64 bars were slivers
    between them."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.plot = self._new_plot()
        self.hint = Hint(self.plot, "Select a quantized layer in the Tensors tree: how often each code level is "
                                    "used in every variant (dead levels, saturation at the extremes)")
        self._more: list = []  # plots of the other level counts, created when first needed
        self.legend = Legend()
        self.log_y = QCheckBox("log y")
        self.summary = QLabel()
        self.summary.setWordWrap(True)
        bar = QHBoxLayout()
        bar.addWidget(self.log_y)
        bar.addStretch(1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addLayout(bar)
        lay.addWidget(self.legend)
        self._plots_box = QVBoxLayout()
        self._plots_box.setSpacing(0)
        self._plots_box.addWidget(self.plot, 1)
        lay.addLayout(self._plots_box, 1)
        lay.addWidget(self.summary)
        self.log_y.toggled.connect(lambda _: self._redraw())
        self.legend.toggled.connect(lambda *_: self._redraw())
        self._counts: dict[str, np.ndarray] = {}
        self._colors: dict = {}
        self._absent: list[str] = []
        self._float: dict = {}
        show_values(self.plot, False)

    @staticmethod
    def _new_plot():
        plot = plot_widget(int_x=True)
        plot.setLabel("bottom", "code level")
        plot.setLabel("left", "share of weights (%)")
        plot.showGrid(y=True, alpha=0.2)
        return plot

    def plots(self) -> list:
        """The plots shown: one per number of levels among the variants."""
        return [self.plot] + [p for p in self._more if not p.isHidden()]

    def figure_parts(self) -> list:
        """The widgets an exported figure shows (not the controls)."""
        return [self.legend, *self.plots(), self.summary]

    def set_counts(self, counts: dict[str, np.ndarray], colors: dict, empty_note: str = "",
                   absent: list[str] | None = None, float_codes: dict | None = None) -> None:
        """``empty_note``: what the view says over the plot when ``counts`` is empty; ``absent``:
        variants with this layer but no stored codes, named under the plot; ``float_codes``:
        variants whose codes are floats (FP4, FP8), counted in the order of their values, with the
        least and largest value."""
        self._counts, self._colors, self._absent = dict(counts), dict(colors), list(absent or [])
        self._float = dict(float_codes or {})
        show_values(self.plot, bool(counts))
        if counts:
            self.hint.set("")
        else:
            self.hint.empty(empty_note)
        self._redraw()

    def _redraw(self) -> None:
        self.legend.set_entries([(label, self._colors.get(label), BAR_GLYPH) for label in self._counts])
        groups: dict[int, list[str]] = {}  # number of levels: its variants shown, fewest levels first
        for label, c in self._counts.items():
            groups.setdefault(len(c), []).append(label)
        # (a number of levels whose variants are all hidden in the legend: no plot, it stood empty)
        groups = {k: v for k, v in sorted(groups.items()) if any(lb not in self.legend.hidden for lb in v)} or {0: []}
        while len(self._more) < len(groups) - 1:
            p = self._new_plot()
            self._more.append(p)
            self._plots_box.addWidget(p, 1)
        for p in self._more[len(groups) - 1:]:
            p.clear()
            p.hide()
        several = len(groups) > 1
        log = self.log_y.isChecked()
        lines = []
        for plot, (levels, labels) in zip([self.plot, *self._more], groups.items()):
            plot.show()
            plot.clear()
            floats = bool(labels) and all(lb in self._float for lb in labels)
            plot.setLabel("bottom", "code, in the order of its value" if floats else "code level")
            plot.setLabel("left", "share (%, log)" if log else "share of weights (%)")
            bits = int(np.log2(levels)) if levels > 1 and not levels & (levels - 1) else None
            # (the legend's colours name the variants: a title listing them widened the plot past
            # the view's edge, its last levels cut off)
            plot.setTitle(f"{levels} levels" + (f" ({bits}-bit)" if bits else "") if several else None, size="9pt")
            shares = {lb: 100.0 * np.asarray(self._counts[lb], np.float64) /
                      max(1.0, float(np.sum(self._counts[lb]))) for lb in labels}
            # on the log scale the bars stand on the decade under the smallest share used (they
            # stood on 1e-6 %, three quarters of the plot below any share there is), ticks in
            # percent at each decade
            used = [v[v > 0] for v in shares.values()]
            low = min((float(u.min()) for u in used if u.size), default=1.0)
            base = math.floor(math.log10(low)) - 0.25 if log else 0.0
            top = max((float(u.max()) for u in used if u.size), default=100.0)
            decades = range(math.ceil(base), math.ceil(math.log10(top)) + 1) if log else ()
            plot.getAxis("left").setTicks([[(v, f"{10.0 ** v:g}") for v in decades]] if log else None)
            width = 0.8 / max(1, len(labels))
            for i, label in enumerate(labels):
                share = shares[label]
                y = np.where(share > 0, np.log10(np.where(share > 0, share, 1.0)), base) if log else share
                x = np.arange(len(share)) - 0.4 + width * (i + 0.5)
                if label not in self.legend.hidden:  # (its place kept: the others' bars do not move)
                    plot.addItem(pg.BarGraphItem(x=x, y0=np.full(len(share), base), height=y - base, width=width,
                                                 brush=self._colors.get(label), pen=None))
            if log and labels:
                plot.setYRange(base, math.log10(top), padding=0.05)
            else:
                plot.enableAutoRange(axis="y")
            show_values(plot, bool(labels))
        for label, c in self._counts.items():
            c = np.asarray(c, dtype=np.float64)
            share = 100.0 * c / max(1.0, c.sum())
            dead = [int(k) for k in np.flatnonzero(c == 0)]
            edge = share[0] + share[-1] if len(share) else 0
            if label in self._float:  # (positions in value order name no code: only how many)
                lo, hi = self._float[label]
                lines.append(f"<b>{label}</b>: {len(c)} float codes in the order of their values ({lo:g} … {hi:g}), "
                             f"{len(dead) or 'none'} unused; the largest magnitudes ({lo:g} and {hi:g}) hold "
                             f"{edge:.2f}%")
            else:
                unused = (f"{len(dead)} unused" if len(dead) > 12 else f"unused {dead}") if dead else "none unused"
                lines.append(f"<b>{label}</b>: {len(c)} levels, {unused}, extremes (0 and {len(c) - 1}) hold "
                             f"{edge:.1f}%")
        if self._absent:
            lines.append("No stored codes (dense, or not decodable): " + ", ".join(self._absent))
        self.summary.setText("<br>".join(lines) if lines else "No stored codes for this layer (dense or not decodable).")
