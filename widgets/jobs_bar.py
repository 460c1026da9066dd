"""JobsBar: the status-bar strip showing running jobs with progress and a cancel button."""

from __future__ import annotations

from PySide6.QtCore import QRectF, Qt
from PySide6.QtGui import QPainter
from PySide6.QtWidgets import QHBoxLayout, QLabel, QSizePolicy, QToolButton, QWidget


class _Bar(QWidget):
    """A minimal progress bar. QProgressBar.setValue() repaints synchronously, which flushed every
    pending paint of the window (plots included) from inside each progress update (bench_gui)."""

    def __init__(self) -> None:
        super().__init__()
        self.fraction = 0.0
        self.setFixedSize(160, 12)
        self.setSizePolicy(QSizePolicy.Policy.Fixed, QSizePolicy.Policy.Fixed)

    def set_fraction(self, f: float) -> None:
        if abs(f - self.fraction) >= 0.005 or f in (0.0, 1.0):
            self.fraction = f
            self.update()  # asynchronous, merged with the next paint

    def paintEvent(self, ev) -> None:  # noqa: N802 - Qt's name
        p = QPainter(self)
        pal = self.palette()
        p.setPen(pal.mid().color())
        p.setBrush(pal.base())
        p.drawRect(QRectF(0.5, 0.5, self.width() - 1, self.height() - 1))
        p.fillRect(QRectF(1, 1, (self.width() - 2) * self.fraction, self.height() - 2), pal.highlight())
        p.end()


class JobsBar(QWidget):
    """Connect to a JobService's signals; ``cancel_requested(job_id)`` goes back to it."""

    def __init__(self, service, parent=None) -> None:
        super().__init__(parent)
        self.service = service
        self.label = QLabel("")
        self.bar = _Bar()
        self.cancel = QToolButton()
        self.cancel.setText("Cancel")
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.label)
        lay.addWidget(self.bar)
        lay.addWidget(self.cancel)
        # The strip never changes the window's layout: a job's title cannot widen the window (the
        # label asks for no width of its own), and the bar and button keep their room while
        # hidden, at a fixed height. Each relayout of the status bar resized the central area,
        # and so repainted every plot, at the start and end of every job (bench_gui).
        self.label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        for w in (self.bar, self.cancel):
            sp = w.sizePolicy()
            sp.setRetainSizeWhenHidden(True)
            w.setSizePolicy(sp)
        self.setFixedHeight(max(self.cancel.sizeHint().height(), self.label.sizeHint().height()))
        self._titles: dict[int, str] = {}
        self._progress: dict[int, float] = {}
        self._details: dict[int, str] = {}  # what a job's progress counts ("3/7 layers, 1.5 MB of 4.2 GB")
        service.job_started.connect(self._started)
        service.job_progress.connect(self._progressed)
        service.job_done.connect(self._done)
        self.cancel.clicked.connect(self._cancel_latest)
        self._refresh()

    def _started(self, jid: int, title: str) -> None:
        self._titles[jid] = title
        self._progress[jid] = 0.0
        self._refresh()

    def _progressed(self, jid: int, f: float, text: str = "") -> None:
        self._progress[jid] = f
        self._details[jid] = text
        self._refresh()

    def _done(self, jid: int) -> None:
        self._titles.pop(jid, None)
        self._progress.pop(jid, None)
        self._details.pop(jid, None)
        self._refresh()

    def resizeEvent(self, ev) -> None:  # (Qt's name)
        super().resizeEvent(ev)
        self._refresh()  # (the title is elided to the label's width)

    def _shown(self) -> int:
        # the latest job that runs: a job waiting for another (a comparison for the kernels'
        # compilation on a first run) shows that one, with its progress
        running = [j for j in self._titles if not self.service.is_waiting(j)]
        return max(running or self._titles)

    def _cancel_latest(self) -> None:
        if self._titles:
            self.service.cancel(self._shown())

    def _refresh(self) -> None:
        busy = bool(self._titles)
        self.bar.setVisible(busy)
        self.cancel.setVisible(busy)
        if not busy:
            self.label.setText("Ready")
            return
        jid = self._shown()
        more = f" (+{len(self._titles) - 1} more)" if len(self._titles) > 1 else ""
        if self._details.get(jid):  # its first part kept whole, like the count (the title is elided
            # first); the bytes in the tooltip: "9216/18530 layers, 30.5 GB of 61.0 GB" left no title
            more = f" · {self._details[jid].split(', ')[0]}{more}"
        # the title elided to the room left, so that the count of the others stays readable
        fm = self.label.fontMetrics()
        room = max(0, self.label.contentsRect().width() - fm.horizontalAdvance(more))
        self.label.setText(fm.elidedText(self._titles[jid], Qt.TextElideMode.ElideRight, room) + more)
        self.label.setToolTip("\n".join(t + (" (waiting)" if self.service.is_waiting(j) else "")
                                         + (f" — {self._details[j]}" if self._details.get(j) else "")
                                         for j, t in sorted(self._titles.items(), key=lambda x: x[0] != jid)))
        self.bar.set_fraction(self._progress.get(jid, 0.0))
