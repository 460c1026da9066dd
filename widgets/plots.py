"""Plot widgets made the way every view here needs them."""

from __future__ import annotations

import pyqtgraph as pg

#: Fixed axis sizes (px). pyqtgraph sizes an axis to its widest tick label by default; new data
#: then changes the axis width, which relays out the plot, resizes its view box, and makes the
#: view box update its transform while painting, which dirties the scene again: every new result
#: was painted two or three times (bench_gui). Wide enough for labels like "0.0125" or "1e+06".
LEFT_AXIS_WIDTH = 64
BOTTOM_AXIS_HEIGHT = 40


def plot_widget() -> pg.PlotWidget:
    """A PlotWidget whose axes keep their size whatever the data."""
    w = pg.PlotWidget()
    w.getAxis("left").setWidth(LEFT_AXIS_WIDTH)
    w.getAxis("bottom").setHeight(BOTTOM_AXIS_HEIGHT)
    return w
