"""CodeUsageView: how often each quantization level is used, per variant (exact counts)."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import QCheckBox, QHBoxLayout, QLabel, QVBoxLayout, QWidget

from .plots import BAR_GLYPH, Hint, Legend, plot_widget, show_values


class CodeUsageView(QWidget):
    """Bars per level and variant; dead levels (count 0) and saturation are listed."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.plot = plot_widget()
        self.plot.setLabel("bottom", "code level")
        self.plot.setLabel("left", "share of weights (%)")
        self.plot.showGrid(y=True, alpha=0.2)
        self.hint = Hint(self.plot, "Select a quantized layer in the Tensors tree: how often each code level is "
                                    "used in every variant (dead levels, saturation at the extremes)")
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
        lay.addWidget(self.plot, 1)
        lay.addWidget(self.summary)
        self.log_y.toggled.connect(lambda _: self._redraw())
        self.legend.toggled.connect(lambda *_: self._redraw())
        self._counts: dict[str, np.ndarray] = {}
        self._colors: dict = {}
        self._absent: list[str] = []
        self._float: dict = {}
        show_values(self.plot, False)

    def figure_parts(self) -> list:
        """The widgets an exported figure shows (not the controls)."""
        return [self.legend, self.plot, self.summary]

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
        self.plot.clear()
        self.legend.set_entries([(label, self._colors.get(label), BAR_GLYPH) for label in self._counts])
        n = max(1, len(self._counts))
        sizes = {len(c) for c in self._counts.values()}
        # Variants with different bit widths (3- and 4-bit) on one integer axis would put a 3-bit
        # top level under a 4-bit middle one: then each level is placed at its position in its
        # own range, 0 (lowest) to 1 (highest).
        norm = len(sizes) > 1
        lines = []
        for i, (label, c) in enumerate(self._counts.items()):
            c = np.asarray(c, dtype=np.float64)
            share = 100.0 * c / max(1.0, c.sum())
            y = np.log10(np.maximum(share, 1e-6)) + 6 if self.log_y.isChecked() else share
            step = 1.0 / max(1, len(c) - 1) if norm else 1.0
            width = 0.8 * step / n
            x = np.arange(len(c)) * step - 0.4 * step + width * (i + 0.5)
            if label not in self.legend.hidden:  # (its place kept: the others' bars do not move)
                self.plot.addItem(pg.BarGraphItem(x=x, height=y, width=width, brush=self._colors.get(label), pen=None))
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
        floats = all(lb in self._float for lb in self._counts) and self._counts
        self.plot.setLabel("bottom", "code, in the order of its value" if floats else
                           "level ÷ top level (mixed bits or float codes)" if norm else "code level")
        self.plot.setLabel("left", "log10(share %) + 6" if self.log_y.isChecked() else "share of weights (%)")
        self.summary.setText("<br>".join(lines) if lines else "No stored codes for this layer (dense or not decodable).")
