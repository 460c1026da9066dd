"""DoctorPanel: findings grouped by severity, each in full; a click on its place jumps to the layer."""

from __future__ import annotations

from html import escape

from PySide6.QtCore import QUrl, Signal
from PySide6.QtWidgets import QLabel, QTextBrowser, QVBoxLayout, QWidget

from .palette import SEVERITY_COLORS

SEVERITIES = ("error", "warning", "info")
_COLORS = SEVERITY_COLORS
_SCHEME = "layer"


class DoctorPanel(QWidget):
    """Receives finding dicts (rule, severity, message, file, tensor, layer).

    The findings are text that wraps to the dock's width, not rows of a table: in a 300 px dock
    a table's message column showed "32 …" and its place column lost the tensor's suffix
    (".scales"). Each finding reads: its place (a link to the layer) and rule id, then the
    message in full; the text can be selected and copied.
    """

    layer_activated = Signal(str)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.title = QLabel("Run the doctor (Tools ▸ Run doctor) to check the selected checkpoint.")
        self.title.setWordWrap(True)
        # what "Compare all layers" found about this checkpoint as a whole (the doctor reads one
        # checkpoint and cannot see it: doubled AWQ smoothing needs the reference)
        self.compare_note = QLabel()
        self.compare_note.setWordWrap(True)
        self.compare_note.setStyleSheet("color: #b35900")
        self.compare_note.setHidden(True)
        self.text = QTextBrowser()
        self.text.setOpenLinks(False)
        self.text.anchorClicked.connect(self._activated)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(self.title)
        lay.addWidget(self.compare_note)
        lay.addWidget(self.text, 1)
        self._groups: dict[str, list[dict]] = {}
        self._title: tuple | None = None  # (label, counts said or None, linked) of the findings shown

    def groups(self) -> dict[str, list[dict]]:
        """The findings shown, by severity (empty severities left out)."""
        return {s: list(fs) for s, fs in self._groups.items() if fs}

    def set_findings(self, label: str, findings: list[dict], linked: bool = True) -> None:
        """``linked=False``: a checkpoint that is not open (one that failed to): its layers are
        named, not links (a click said the layer "cannot be decoded" of a tree without it)."""
        counts = {s: 0 for s in SEVERITIES}
        self._groups = {s: [] for s in SEVERITIES}
        for f in findings:
            sev = f.get("severity", "info")
            sev = sev if sev in counts else "info"
            counts[sev] += f.get("count", 1)  # "… and N more" stands for N
            self._groups[sev].append(f)
        parts = []
        for sev in SEVERITIES:
            if not self._groups[sev]:
                continue  # no empty headings
            parts.append(f'<h4 style="color:{_COLORS[sev]}; margin-bottom:2px">{sev} ({counts[sev]})</h4>')
            for f in self._groups[sev]:
                parts.append(self._finding(f, linked))
        self.text.setHtml("".join(parts))
        # the counts there are (a narrow dock wrapped "0 info" onto a line of its own); with none,
        # "in its files": what the comparison found about it is said below, not contradicted
        said = ", ".join(f"{counts[s]} {s}{'s' if counts[s] != 1 and s != 'info' else ''}"
                         for s in SEVERITIES if counts[s])
        self._title = (label, said if findings else None, linked)
        self._retitle()

    def _retitle(self) -> None:
        """The title line: the findings' counts, or none found; with none found and a comparison's
        note below, "in its files alone" (it read "no problems found" right above the warning
        that the file computes another function)."""
        if self._title is None:
            return
        label, said, linked = self._title
        none = ("no problems found in its files alone: the comparison with the reference did (below)."
                if not self.compare_note.isHidden() else "no problems found in its files.")
        self.title.setText(f"<b>{escape(label)}</b>: " + (said or none) + ("" if linked else " (not open in the window)"))

    @staticmethod
    def _finding(f: dict, linked: bool = True) -> str:
        layer, tensor, file = f.get("layer"), f.get("tensor"), f.get("file")
        where = tensor or layer or file or ""
        target = (layer or tensor) if linked else None
        place = (f'<a href="{_SCHEME}:{escape(target, quote=True)}">{escape(where)}</a>' if target
                 else escape(where))
        if file and where != file:
            place += f' <span style="color:gray">in {escape(file.rsplit("/", 1)[-1])}</span>'
        rule = escape(f.get("rule", ""))
        return (f'<p style="margin-top:4px; margin-bottom:4px">{place} <span style="color:gray">[{rule}]</span>'
                f'<br>{escape(f.get("message", ""))}</p>')

    def set_compare_note(self, text: str) -> None:
        """What the comparison found about the shown checkpoint (empty: nothing)."""
        self.compare_note.setText(f"⚠ Compare all layers: {text}" if text else "")
        self.compare_note.setHidden(not text)
        self._retitle()

    def not_run(self, label: str) -> None:
        """The checkpoint shown has not been checked (another one's findings must not stay up)."""
        self._groups = {}
        self._title = None
        self.text.clear()
        self.title.setText(f"<b>{escape(label)}</b>: not checked yet. Tools ▸ Run doctor (Ctrl+D) checks it.")

    def _activated(self, url: QUrl) -> None:
        if url.scheme() == _SCHEME:
            self.layer_activated.emit(url.toString()[len(_SCHEME) + 1:])
