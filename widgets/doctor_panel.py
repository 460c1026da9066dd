"""DoctorPanel: findings grouped by severity; double-click jumps to the layer."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QHeaderView,
    QLabel,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

SEVERITIES = ("error", "warning", "info")
_COLORS = {"error": "#D55E00", "warning": "#E69F00", "info": "#0072B2"}


class DoctorPanel(QWidget):
    """Receives finding dicts (rule, severity, message, file, tensor, layer)."""

    layer_activated = Signal(str)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.title = QLabel("Run the doctor (Tools ▸ Run doctor) to check the selected checkpoint.")
        self.title.setWordWrap(True)
        self.tree = QTreeWidget()
        self.tree.setHeaderLabels(["Finding", "Rule", "Where"])
        # The finding takes the width left by the rule id and the place (a 420 px first column put
        # them outside a 300 px dock), and wraps.
        head = self.tree.header()
        head.setStretchLastSection(False)
        head.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        head.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        head.setSectionResizeMode(2, QHeaderView.ResizeMode.Interactive)
        self.tree.setColumnWidth(2, 120)
        self.tree.setWordWrap(True)
        self.tree.setUniformRowHeights(False)
        self.tree.itemDoubleClicked.connect(self._activated)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(self.title)
        lay.addWidget(self.tree, 1)

    def set_findings(self, label: str, findings: list[dict]) -> None:
        self.tree.clear()
        counts = {s: 0 for s in SEVERITIES}
        groups = {}
        for s in SEVERITIES:
            groups[s] = QTreeWidgetItem(self.tree, [s])
            groups[s].setForeground(0, QColor(_COLORS[s]))
        for f in findings:
            sev = f.get("severity", "info")
            counts[sev] = counts.get(sev, 0) + f.get("count", 1)  # "… and N more" stands for N
            where = f.get("layer") or f.get("tensor") or f.get("file") or ""
            item = QTreeWidgetItem(groups.get(sev, groups["info"]), [f.get("message", ""), f.get("rule", ""), where])
            item.setToolTip(0, f.get("message", ""))
            item.setData(0, Qt.ItemDataRole.UserRole, f.get("layer") or f.get("tensor"))
        for s, item in groups.items():
            item.setText(0, f"{s} ({counts[s]})")
            item.setExpanded(s != "info")
            item.setHidden(counts[s] == 0)
        self.title.setText(f"<b>{label}</b>: {counts['error']} error(s), {counts['warning']} warning(s), "
                           f"{counts['info']} info" if findings else f"<b>{label}</b>: no problems found.")

    def not_run(self, label: str) -> None:
        """The checkpoint shown has not been checked (another one's findings must not stay up)."""
        self.tree.clear()
        self.title.setText(f"<b>{label}</b>: not checked yet. Tools ▸ Run doctor (Ctrl+D) checks it.")

    def _activated(self, item, _col) -> None:
        target = item.data(0, Qt.ItemDataRole.UserRole)
        if target:
            self.layer_activated.emit(target)
