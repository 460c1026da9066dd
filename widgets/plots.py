"""Plot widgets made the way every view here needs them."""

from __future__ import annotations

from html import escape

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QEvent, QObject, QPoint, QRect, QRectF, QSize, Qt, Signal
from PySide6.QtGui import QColor, QFontMetrics, QFontMetricsF, QPainter, QPalette
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QLayout, QWidget

#: Fixed axis sizes (px). pyqtgraph sizes an axis to its widest tick label by default; new data
#: then changes the axis width, which relays out the plot, resizes its view box, and makes the
#: view box update its transform while painting, which dirties the scene again: every new result
#: was painted two or three times (bench_gui). Wide enough for labels like "0.0125" or "1e+06".
LEFT_AXIS_WIDTH = 64
BOTTOM_AXIS_HEIGHT = 40


class IntAxis(pg.AxisItem):
    """An axis of whole numbers (decoder layers, groups, code levels): ticks only at integers,
    never closer than 1, whatever the zoom."""

    def tickValues(self, minVal, maxVal, size):
        out = []
        for spacing, values in super().tickValues(minVal, maxVal, size):
            if spacing < 1:
                continue
            out.append((spacing, [v for v in values if float(v).is_integer()]))
        if not out:  # zoomed in to a few units: every integer in view
            lo, hi = int(np.ceil(minVal)), int(np.floor(maxVal))
            out = [(1.0, list(range(lo, hi + 1)))] if 0 <= hi - lo <= 50 else []
        return out


class CountAxis(pg.AxisItem):
    """A log10(count) axis: no labels below 0 (a count under 1 means nothing: the empty bins'
    floor sits there, and its ticks read -0.1, -0.2 as if counts)."""

    def tickStrings(self, values, scale, spacing):
        return ["" if v < -1e-9 else s for v, s in zip(values, super().tickStrings(values, scale, spacing))]


def plain_axes(item) -> None:
    """No automatic SI prefix on a plot's axes: pyqtgraph would show a relative error of 0.29 as
    290 with "(x0.001)" in the axis label, which reads wrong beside the 0.29 in the table."""
    for name in ("left", "bottom", "right", "top"):
        ax = item.getAxis(name)
        if ax is not None:
            ax.enableAutoSIPrefix(False)


def show_values(plot, on: bool) -> None:
    """Tick numbers on a plot's left and bottom axes, or none (an empty view drew 0..1 scales
    around nothing); only a change is applied (each relays out the plot)."""
    for name in ("left", "bottom"):
        ax = plot.getAxis(name)
        if ax.style.get("showValues", True) != on:
            ax.setStyle(showValues=on)


def plot_widget(int_x: bool = False, counts: bool = False) -> pg.PlotWidget:
    """A PlotWidget whose axes keep their size whatever the data, without SI prefixes;
    ``int_x``: the x axis counts whole things (ticks at integers only); ``counts``: the y axis is
    log10(count) or count (:class:`CountAxis`)."""
    axes = {**({"bottom": IntAxis("bottom")} if int_x else {}), **({"left": CountAxis("left")} if counts else {})}
    w = pg.PlotWidget(axisItems=axes or None)
    w.getAxis("left").setWidth(LEFT_AXIS_WIDTH)
    w.getAxis("bottom").setHeight(BOTTOM_AXIS_HEIGHT)
    plain_axes(w.getPlotItem())
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


def elide_path(text: str, fm: QFontMetrics, width: int, lead: int = 0) -> str:
    """``text`` (a dotted module path) cut to ``width`` pixels, keeping what tells rows apart: the
    end, and the last number in it (the layer index; with two, as in an MoE expert's path, the
    layer's and the expert's). Whole leading parts go first ("…layers.1.
    mlp.down_proj", "…1.post_attention_layernorm"); when even that is too long, the rest after
    the number is cut in the middle. A plain left cut made every post_attention_layernorm row
    read the same. ``lead``: at least that many leading parts go, where they come before the
    first number (a column of names cut alike: :func:`path_leads`)."""
    parts = text.split(".")
    nums = [i for i, p in enumerate(parts) if p.isdigit()]
    lead = min(lead, nums[0]) if nums else 0
    if lead:
        cand = "…" + ".".join(parts[lead:])
        if fm.horizontalAdvance(cand) <= width:
            return cand
    elif fm.horizontalAdvance(text) <= width:
        return text
    if len(nums) >= 2:  # a layer number and an expert's: both kept ("…33.…19.gate_proj")
        first, last = nums[0], nums[-1]
        for k in range(max(1, lead), first + 1):
            cand = "…" + ".".join(parts[k:])
            if fm.horizontalAdvance(cand) <= width:
                return cand
        for k in range(first + 1, last + 1):
            cand = f"…{parts[first]}.…" + ".".join(parts[k:])
            if fm.horizontalAdvance(cand) <= width:
                return cand
    num = nums[-1] if nums else None
    for k in range(max(1, lead), len(parts) if num is None else num + 1):
        cand = "…" + ".".join(parts[k:])
        if fm.horizontalAdvance(cand) <= width:
            return cand
    if num is not None and num + 1 < len(parts):
        # whole parts after the number first, the end kept ("…0.…shared_expert.down_proj"): cut
        # in the middle, Llama 4's experts and its shared expert read "…rts.down_proj", "…ert.down_proj"
        for k in range(num + 2, len(parts)):
            cand = f"…{parts[num]}.…" + ".".join(parts[k:])
            if fm.horizontalAdvance(cand) <= width:
                return cand
        head = f"…{parts[num]}."
        room = width - fm.horizontalAdvance(head)
        if room >= fm.horizontalAdvance("m…m"):
            return head + fm.elidedText(".".join(parts[num + 1:]), Qt.TextElideMode.ElideMiddle, room)
    return fm.elidedText(text, Qt.TextElideMode.ElideLeft, width)


def path_leads(paths, fm: QFontMetrics) -> dict[str, list[int]]:
    """Per leading part of module paths (what comes before the first number: ``model.layers.``),
    the widest of its paths with 0, 1, … of its leading parts cut ("…" in front): each row of a
    column may then cut as many as the widest row of its kind needs, and a column of layer
    numbers stays aligned (cut one by one, "…layers.1.mlp.gate_proj" stood over
    "…1.mlp.down_proj")."""
    out: dict[str, list[int]] = {}
    for path in paths:
        parts = path.split(".")
        first = next((i for i, p in enumerate(parts) if p.isdigit()), 0)
        if not first:
            continue
        head = ".".join(parts[:first]) + "."
        ws = [fm.horizontalAdvance(path)] + [fm.horizontalAdvance("…" + ".".join(parts[k:])) for k in range(1, first + 1)]
        have = out.get(head)
        out[head] = ws if have is None else [max(a, b) for a, b in zip(have, ws)]
    return out


def path_lead(leads: dict[str, list[int]], path: str, width: int) -> int:
    """How many leading parts every path of ``path``'s kind cuts at ``width`` (see :func:`path_leads`)."""
    parts = path.split(".")
    first = next((i for i, p in enumerate(parts) if p.isdigit()), 0)
    ws = leads.get(".".join(parts[:first]) + ".") if first else None
    if not ws:
        return 0
    return next((k for k, w in enumerate(ws) if w <= width), len(ws) - 1)


class ElidedLabel(QLabel):
    """One line of text that never widens its layout: cut with "…" to the width it is given,
    the whole text in its tooltip (a plain QLabel's minimum width is its text's, so a long layer
    name in a toolbar widened the window)."""

    def __init__(self, text: str = "", parent=None, lines: int = 1) -> None:
        super().__init__(text, parent)
        self.setMinimumWidth(40)
        self.setToolTip(text)
        #: lines it may wrap onto before the rest is cut (a plot's footer: what lies beyond the
        #: bulk, exact zeros, variants left out, cut at 1600 px on one line)
        self.lines = lines
        if lines > 1:
            self.setFixedHeight(lines * self.fontMetrics().lineSpacing() + 2)

    def setText(self, text: str) -> None:
        super().setText(text)
        self.setToolTip(text)

    def minimumSizeHint(self):
        h = super().minimumSizeHint()
        h.setWidth(40)
        return h

    def paintEvent(self, event) -> None:
        p = QPainter(self)
        p.setPen(self.palette().color(QPalette.ColorRole.WindowText))
        text, fm = self.text(), self.fontMetrics()
        # a module path keeps its end and layer number ("…1.mlp.experts.2.up_proj"): cut at the
        # right, every layer read "model.layer…"
        dotted = " " not in text and "." in text
        if self.lines == 1:
            shown = elide_path(text, fm, self.width()) if dotted else fm.elidedText(
                text, Qt.TextElideMode.ElideRight, self.width())
            p.drawText(self.rect(), int(self.alignment()), shown)
            return
        # wrapped at spaces onto up to ``lines`` lines from the top, the last cut with "…"
        out, rest = [], text
        while len(out) < self.lines - 1 and not dotted and fm.horizontalAdvance(rest) > self.width():
            cut = len(rest)
            while cut > 0 and fm.horizontalAdvance(rest[:cut]) > self.width():
                cut = rest.rfind(" ", 0, cut)
            if cut <= 0:
                break
            out.append(rest[:cut])
            rest = rest[cut:].lstrip()
        out.append(elide_path(rest, fm, self.width()) if dotted else
                   fm.elidedText(rest, Qt.TextElideMode.ElideRight, self.width()))
        line = fm.lineSpacing()
        for i, t in enumerate(out):
            p.drawText(0, i * line, self.width(), line, int(self.alignment()), t)


def shrinkable(combo: QComboBox, chars: int = 12) -> QComboBox:
    """A combo box sized for ``chars`` characters, not its longest item (a long metric name or
    checkpoint path otherwise sets the window's minimum width); the list still shows all."""
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(chars)
    combo.currentTextChanged.connect(combo.setToolTip)  # the whole choice, when it is cut
    return combo


def controls_row(*parts) -> QWidget:
    """A views' row of controls that wraps onto more lines where the view is narrow (in one
    line, its controls set the window's minimum width: 1024 px with both side panels). A tuple
    among ``parts`` stays together on one line (a label and its box)."""
    row = QWidget()
    flow = FlowLayout(row, hspace=10, vspace=2)
    flow.setContentsMargins(0, 0, 0, 0)
    for part in parts:
        if isinstance(part, tuple):
            unit = QWidget()
            box = QHBoxLayout(unit)
            box.setContentsMargins(0, 0, 0, 0)
            box.setSpacing(4)
            for w in part:
                box.addWidget(w)
            part = unit
        flow.addWidget(part)
    return row


#: Each marker shape of :data:`.palette.VARIANT_SYMBOLS` as a text glyph, for :class:`Legend`.
SYMBOL_GLYPHS = {"o": "●", "s": "■", "t": "▼", "d": "◆", "t1": "▲", "p": "⬟", "h": "⬢", "star": "★"}
#: The glyph of a curve (histograms) and of a bar (code usage).
LINE_GLYPH = "━━"
BAR_GLYPH = "■"
#: Longer names are cut in the middle in a legend (the whole name in its tooltip): one entry is
#: never broken, so its width is the legend's least.
LEGEND_NAME_CHARS = 36


def _middle(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n // 2 - 1] + "…" + text[-(n - n // 2):]


class FlowLayout(QLayout):
    """Widgets left to right, onto a new line where the next does not fit (Qt has no such
    layout); its height follows from the width it is given."""

    def __init__(self, parent=None, hspace: int = 14, vspace: int = 2) -> None:
        super().__init__(parent)
        self._items: list = []
        self._hspace, self._vspace = hspace, vspace

    def addItem(self, item) -> None:
        self._items.append(item)

    def count(self) -> int:
        return len(self._items)

    def itemAt(self, i: int):
        return self._items[i] if 0 <= i < len(self._items) else None

    def takeAt(self, i: int):
        return self._items.pop(i) if 0 <= i < len(self._items) else None

    def expandingDirections(self):
        return Qt.Orientation(0)

    def hasHeightForWidth(self) -> bool:
        return True

    def heightForWidth(self, width: int) -> int:
        return self._place(QRect(0, 0, width, 0), move=False)

    def setGeometry(self, rect) -> None:
        super().setGeometry(rect)
        self._place(rect, move=True)

    def sizeHint(self):
        return self.minimumSize()

    def minimumSize(self):
        size = QSize()
        for item in self._items:
            size = size.expandedTo(item.minimumSize())
        m = self.contentsMargins()
        return size + QSize(m.left() + m.right(), m.top() + m.bottom())

    def _place(self, rect, move: bool) -> int:
        m = self.contentsMargins()
        r = rect.adjusted(m.left(), m.top(), -m.right(), -m.bottom())
        x, y, line = r.x(), r.y(), 0
        for item in self._items:
            hint = item.sizeHint()
            # (never wider than the row: an eliding label is cut to it, where it had widened the
            # window to its whole text)
            hint.setWidth(max(min(hint.width(), r.width()), item.minimumSize().width()))
            if x > r.x() and x + hint.width() > r.right() + 1:
                x, y, line = r.x(), y + line + self._vspace, 0
            if move:
                item.setGeometry(QRect(QPoint(x, y), hint))
            x += hint.width() + self._hspace
            line = max(line, hint.height())
        return y + line - rect.y() + m.bottom()


class _Entry(QLabel):
    """A legend entry: a click shows or hides its series."""

    clicked = Signal()

    def mousePressEvent(self, ev) -> None:
        if ev.button() == Qt.MouseButton.LeftButton:
            self.clicked.emit()
            ev.accept()
            return
        super().mousePressEvent(ev)


class Legend(QWidget):
    """Which colour and mark is which variant: entries in a row above a plot, onto more lines
    when the plot is narrow. pyqtgraph's legend sits inside the plot and covered its data in the
    narrow views (the stacked Layers view, the Scales & zeros pair, a 1024 px window).

    Entries are ``(name, colour, glyph)``; :meth:`set_entries` rebuilds only when they change (a
    new set may change the legend's height, which relays out the plot below it)."""

    #: (name, shown): an entry was clicked; the view shows or hides that series (with nine
    #: variants overlaid, one could not be told from the others)
    toggled = Signal(str, bool)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.hidden: set[str] = set()
        self._flow = FlowLayout(self)
        self._flow.setContentsMargins(LEFT_AXIS_WIDTH, 0, 4, 0)  # aligned with the plot's view box
        self._entries: list[tuple[str, str, str]] = []
        self._chars = LEGEND_NAME_CHARS  # how much of each name is shown (less where it is narrow)
        self.setHidden(True)

    #: Most lines a legend takes before its names are shortened (at 835 px, eight variants took a
    #: line each, 160 px, and left the plot 170)
    MAX_LINES = 3

    def resizeEvent(self, ev) -> None:
        super().resizeEvent(ev)
        self._fit(ev.size().width())

    def _fit(self, width: int) -> None:
        """Shorten the names (down to 10 characters, elided in the middle) while the entries take
        more than MAX_LINES lines at ``width``; lengthen them again where there is room."""
        if not self._entries or width <= 0:
            return
        fm = self.fontMetrics()
        m = self._flow.contentsMargins()
        room = width - m.left() - m.right()

        def lines(chars: int) -> int:  # the flow's lines, measured without touching the labels
            n, x = 1, 0
            for name, _, glyph in self._entries:
                w = fm.horizontalAdvance(f"{glyph} {_middle(name, chars)}") + 4
                if x and x + w > room:
                    n, x = n + 1, 0
                x += w + self._flow._hspace
            return n
        chars = next((c for c in (LEGEND_NAME_CHARS, 28, 22, 16, 12) if lines(c) <= self.MAX_LINES), 10)
        if chars != self._chars:
            self._chars = chars
            for i, (name, color, glyph) in enumerate(self._entries):
                item = self._flow.itemAt(i)
                if item is not None and item.widget() is not None:
                    item.widget().setText(self._text(name, color, glyph))
            self._flow.invalidate()

    def _text(self, name: str, color: str, glyph: str) -> str:
        if name in self.hidden:  # greyed and struck through: click again to show it
            return f'<span style="color:#9a9a9a">{glyph}&nbsp;<s>{escape(_middle(name, self._chars))}</s></span>'
        return f'<span style="color:{color}">{glyph}</span>&nbsp;{escape(_middle(name, self._chars))}'

    def _toggle(self, name: str) -> None:
        shown = name in self.hidden
        (self.hidden.discard if shown else self.hidden.add)(name)
        for i, (n, color, glyph) in enumerate(self._entries):
            if n == name:
                self._flow.itemAt(i).widget().setText(self._text(n, color, glyph))
        self.toggled.emit(name, shown)

    def entries(self) -> list[tuple[str, str, str]]:
        """``(name, colour as #rrggbb, glyph)`` shown, in order."""
        return list(self._entries)

    def set_entries(self, entries) -> None:
        norm = [(str(name), QColor(color).name() if color is not None else "#7f7f7f", glyph)
                for name, color, glyph in entries]
        if norm == self._entries:
            return
        self._entries = norm
        while self._flow.count():
            w = self._flow.takeAt(0).widget()
            if w is not None:
                w.deleteLater()
        self._chars = LEGEND_NAME_CHARS
        self.hidden &= {name for name, _, _ in norm}  # (a series gone is not hidden when it returns)
        for name, color, glyph in norm:
            label = _Entry(self._text(name, color, glyph))
            label.setTextFormat(Qt.TextFormat.RichText)
            label.setToolTip(f"{name}\n(click: hide or show it)")
            label.setCursor(Qt.CursorShape.PointingHandCursor)
            label.clicked.connect(lambda n=name: self._toggle(n))
            self._flow.addWidget(label)
        self.setHidden(not norm)
        if self.width() > 0:
            self._fit(self.width())

    def clear(self) -> None:
        self.set_entries([])


#: Scale of an exported PNG over the widget's size on screen (a figure for a paper or a slide).
EXPORT_SCALE = 2
_TITLE_PT = 11


def render_figure(parts: list, title: str, path: str, kind: str) -> None:
    """Write the visible ``parts`` (legend, plot, notes...), stacked as on screen under a line
    of ``title``, to ``path`` as PNG (at :data:`EXPORT_SCALE`) or SVG (vector: pyqtgraph's
    items are painted as paths and text). A part may be a string: a note drawn in full, wrapped
    (on screen it is one elided line). Raises OSError where the file cannot be written.

    The whole widgets are drawn, legends and notes included: pyqtgraph's own exporters see only
    a plot's scene (no legend, no title since the legend left it), and its SVG exporter fails
    with this PySide6 ("not enough values to unpack")."""
    from PySide6.QtGui import QFont, QImage
    widgets = [p for p in parts if isinstance(p, QWidget) and p.isVisible() and p.width() > 0 and p.height() > 0]
    if not widgets:
        raise OSError(f"{path}: nothing to export in this view")
    width = max(p.width() for p in widgets)
    # the window's colours and font, not the first part's (a warning label's orange titled the
    # Layers figure)
    from PySide6.QtWidgets import QApplication
    pal = QApplication.palette()
    base_font = QApplication.font()
    font = QFont(base_font)
    font.setPointSize(_TITLE_PT)
    font.setBold(True)
    flags = int(Qt.TextFlag.TextWordWrap)

    def text_h(text: str, f: QFont) -> int:
        return int(QFontMetricsF(f).boundingRect(QRectF(0, 0, width - 16, 1e6), flags, text).height()) + 6

    items: list[tuple[object, int]] = [(title, text_h(title, font) + 2)] if title else []
    for p in parts:
        if isinstance(p, str) and p:
            items.append((p, text_h(p, base_font)))
        elif p in widgets:
            items.append((p, p.height()))
    height = sum(h for _, h in items)

    def paint(painter: QPainter) -> None:
        painter.fillRect(QRect(0, 0, width, height), pal.color(QPalette.ColorRole.Window))
        painter.setPen(pal.color(QPalette.ColorRole.WindowText))
        y = 0
        for item, h in items:
            if isinstance(item, str):
                painter.setFont(font if item is title else base_font)
                painter.drawText(QRectF(8, y + 3, width - 16, h - 3), flags, item)
            else:
                QWidget.render(item, painter, QPoint(0, y))  # a QGraphicsView overrides render()
            y += h

    if kind == "svg":
        from PySide6.QtSvg import QSvgGenerator
        gen = QSvgGenerator()
        gen.setFileName(path)
        gen.setSize(QSize(width, height))
        gen.setViewBox(QRect(0, 0, width, height))
        gen.setTitle(title)
        painter = QPainter()
        if not painter.begin(gen):
            raise OSError(f"{path}: cannot be written")
        paint(painter)
        painter.end()
        return
    img = QImage(width * EXPORT_SCALE, height * EXPORT_SCALE, QImage.Format.Format_ARGB32)
    img.setDevicePixelRatio(EXPORT_SCALE)
    painter = QPainter(img)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    paint(painter)
    painter.end()
    if not img.save(path, "PNG"):
        raise OSError(f"{path}: cannot be written")
