"""Plot widgets made the way every view here needs them."""

from __future__ import annotations

import pyqtgraph as pg
from PySide6.QtCore import QEvent, QObject, Qt
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import QLabel, QWidget

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


class Hint(QObject):
    """A message centred over an empty view, in the palette's placeholder colour; it lets the
    mouse through and follows the view's size. ``default`` says what fills the view ("Select a
    layer…"); :meth:`empty` shows a reason instead, or the default; ``set("")`` hides it."""

    def __init__(self, view: QWidget, default: str = "", right: int = 16) -> None:
        super().__init__(view)
        self.default = default
        self.right = right  # px kept clear on the right (a colour bar)
        self.label = QLabel(view)
        self.label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.label.setWordWrap(True)
        self.label.setAttribute(Qt.WidgetAttribute.WA_TransparentForMouseEvents)
        pal = self.label.palette()
        pal.setColor(QPalette.ColorRole.WindowText, pal.color(QPalette.ColorRole.PlaceholderText))
        self.label.setPalette(pal)
        view.installEventFilter(self)
        self.set(default)

    def text(self) -> str:
        """The message shown, or "" while hidden."""
        return self.label.text() if not self.label.isHidden() else ""

    def empty(self, why: str = "") -> None:
        """The view has nothing to show: say ``why``, or what fills it."""
        self.set(why or self.default)

    def set(self, text: str) -> None:
        self.label.setText(text)
        self.label.setHidden(not text)
        self._place()

    def eventFilter(self, obj, event) -> bool:
        if event.type() == QEvent.Type.Resize:
            self._place()
        return False

    def _place(self) -> None:
        r = self.parent().rect()
        self.label.setGeometry(r.adjusted(LEFT_AXIS_WIDTH, 0, -self.right, -BOTTOM_AXIS_HEIGHT))
        self.label.raise_()
