"""TensorTree: the dock with the checkpoint chooser, instant search and the module tree."""

from __future__ import annotations

import heapq

from PySide6.QtCore import QEvent, QModelIndex, Qt, QTimer, Signal
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (QApplication, QComboBox, QHBoxLayout, QLabel, QLineEdit, QMenu, QSpinBox, QStyle,
                               QStyledItemDelegate, QTreeView, QVBoxLayout, QWidget)

from quantscope.backend.search import PathIndex, query_kind

from .plots import elide_path, path_lead, path_leads, shrinkable
from .tensor_tree_model import BASE_COLUMNS, TensorTreeModel


class _PathDelegate(QStyledItemDelegate):
    """The Name column's cells, cut by :func:`elide_path` (module rows only: a tensor row's
    ".qweight" is short), every path of a kind by as many leading parts (:func:`path_leads`)."""

    def __init__(self, view) -> None:
        super().__init__(view)
        self._leads: dict = {}  # font -> path_leads of the model's paths
        view.model().modelReset.connect(self._leads.clear)

    def _lead(self, model, path: str, fm, room: int) -> int:
        key = fm.height(), fm.averageCharWidth()
        if key not in self._leads:
            self._leads[key] = path_leads(model.paths(), fm)
        return path_lead(self._leads[key], path, room)

    def initStyleOption(self, option, index) -> None:
        super().initStyleOption(option, index)
        if not index.parent().isValid():
            w = option.widget
            style = w.style() if w is not None else QApplication.style()
            # the room the style gives the text: its sub-rectangle, less a margin each side
            room = style.subElementRect(QStyle.SubElement.SE_ItemViewItemText, option, w).width()
            # (and 2 px: glyph advances are fractional, the metrics' sums rounded)
            room -= 2 * (style.pixelMetric(QStyle.PixelMetric.PM_FocusFrameHMargin, None, w) + 1) + 2
            fm = option.fontMetrics
            option.text = elide_path(option.text, fm, room, self._lead(index.model(), option.text, fm, room))


class TensorTree(QWidget):
    """Emits intent only: it never reads files."""

    layer_selected = Signal(str)            # module path
    checkpoint_changed = Signal(str)        # label of the checkpoint shown
    export_tensor_requested = Signal(str)   # stored tensor name
    dequant_export_requested = Signal(str)  # module path
    expert_picked = Signal(str)             # an expert's path, chosen in the expert box

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.model = TensorTreeModel(self)
        self.combo = shrinkable(QComboBox(), 20)
        self.combo.setToolTip("Which checkpoint's modules the tree lists")
        self.search = QLineEdit()
        self.search.setPlaceholderText("Search modules or tensors (e.g. layers.1.mlp.down_proj, or a regex: down_proj$)…")
        self.search.setClearButtonEnabled(True)
        self.count = QLabel()
        self.view = QTreeView()
        self.view.setModel(self.model)
        self.view.setUniformRowHeights(True)
        self.view.setTextElideMode(Qt.TextElideMode.ElideRight)
        self._paths = _PathDelegate(self.view)  # names keep their end and layer number (elide_path)
        self.view.setItemDelegateForColumn(0, self._paths)
        self.view.setAlternatingRowColors(True)
        self.view.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.view.header().setStretchLastSection(False)
        # Sort by a header click (the largest error first, say); unsorted (the checkpoint's order)
        # until then: an indicator on no column, or Qt would sort by name at once
        self.view.header().setSortIndicator(-1, Qt.SortOrder.AscendingOrder)
        self.view.setSortingEnabled(True)
        self.view.header().setSortIndicatorClearable(True)
        self.view.header().setTextElideMode(Qt.TextElideMode.ElideMiddle)
        top = QHBoxLayout()
        top.addWidget(self.combo, 1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addLayout(top)
        lay.addWidget(self.search)
        lay.addWidget(self.view, 1)
        # which expert of a stacked MoE layer the views show (a stack's row has no row per expert:
        # the views showed expert 0, or the worst, with no way to pick another)
        self.expert = QSpinBox()
        self.expert.setToolTip("Which expert of the stacked experts the views show")
        self.expert_of = QLabel()
        self._expert_pattern: tuple[str, str] | None = None  # (block prefix, projection)
        self._expert_whole: str | None = None  # the stack, where "all" (below 0) shows it whole
        bottom = QHBoxLayout()
        bottom.addWidget(self.count, 1)
        self._expert_label = QLabel("expert")
        for w in (self._expert_label, self.expert, self.expert_of):
            bottom.addWidget(w)
            sp = w.sizePolicy()
            sp.setRetainSizeWhenHidden(True)  # (showing them moves nothing)
            w.setSizePolicy(sp)
            w.hide()
        lay.addLayout(bottom)
        self.expert.setKeyboardTracking(False)  # (a number typed is taken on Enter; the arrows at once)
        self.expert.valueChanged.connect(lambda _: self._expert_chosen())
        self._index = PathIndex([])
        self._name_need = self.NAME_WIDTH
        self._debounce = QTimer(self, singleShot=True, interval=30)
        self._debounce.timeout.connect(self._apply_search)
        self.search.textChanged.connect(lambda _: self._debounce.start())
        self.combo.currentTextChanged.connect(self._on_combo)
        self.view.selectionModel().currentChanged.connect(self._on_current)
        self._quiet = False  # select(quiet=True) in progress: no layer_selected
        self._quiet_path: str | None = None  # the current row, set quietly: a click on it must still select it
        self.view.clicked.connect(self._on_click)
        self.view.customContextMenuRequested.connect(self._menu)
        self.search.installEventFilter(self)
        # the viewport's width changes without the widget's when the vertical scroll bar comes
        # (a comparison's figures, more rows): the shown error's last digit went under it
        self.view.viewport().installEventFilter(self)
        self._auto_name = -1  # the Name width last set here (a width the user dragged differs)
        self._models = {}
        # A sort or a search rebuilds the rows: the selected module stays selected (and is not
        # announced again: the window would decode it again)
        self._keep: str | None = None
        self._hidden: str | None = None  # the current row a search hides
        self.model.modelAboutToBeReset.connect(self._remember_current)
        self.model.modelReset.connect(self._restore_current)

    def eventFilter(self, obj, event) -> bool:
        if obj is self.view.viewport():
            if event.type() == QEvent.Type.Resize and event.oldSize().width() != event.size().width():
                self._fit_name()
            return False
        # Esc in the search box clears it (or, when empty, goes back to the tree); the window's
        # Esc shortcut ("Cancel all jobs") used to take it and cancel a running comparison.
        if obj is self.search and event.type() in (QEvent.Type.ShortcutOverride, QEvent.Type.KeyPress) \
                and event.key() == Qt.Key.Key_Escape:
            if event.type() == QEvent.Type.ShortcutOverride:
                event.accept()  # the key goes to the search box, not to a shortcut
                return False
            if self.search.text():
                self.search.clear()
            else:
                self.view.setFocus()
            return True
        return super().eventFilter(obj, event)

    def set_checkpoints(self, models: dict, current: str | None = None) -> None:
        """``models``: label → backend Model (reference first)."""
        self._models = dict(models)
        self.combo.blockSignals(True)
        self.combo.clear()
        self.combo.addItems(list(models))
        if current in models:
            self.combo.setCurrentText(current)
        self.combo.blockSignals(False)
        self._on_combo(self.combo.currentText())

    def _on_combo(self, label: str) -> None:
        self.model.set_checkpoint(self._models.get(label))
        # the longest name's width, once per checkpoint (a resize asks again; a MoE has 70k names)
        fm = self.view.fontMetrics()
        longest = heapq.nlargest(8, self.model.paths(), key=len)  # by characters, then measured
        self._name_need = max((fm.horizontalAdvance(p) for p in longest), default=0) + 32  # + the branch arrow
        self._index = PathIndex(self.model.paths(), self.model.tensor_names())
        self._apply_search()
        # Widths from the font, not resizeColumnToContents: that walks every row (25 ms on a
        # small model, seconds on a 70k-module MoE) on the GUI thread.
        fm = self.view.fontMetrics()
        schemes = {lay.scheme for lay in getattr(self._models.get(label), "layers", {}).values()} or {"mlx-affine"}
        widths = {0: self._name_width(), 1: max(fm.horizontalAdvance(x) for x in schemes) + 16,
                  4: fm.horizontalAdvance("14336×4096__"),
                  5: fm.horizontalAdvance("100.0 MB__")}
        # An error column is as wide as its numbers, not its header (a long variant name put the
        # right-aligned numbers past the dock's edge: colour without figures); the header is
        # elided in the middle, whole in its tooltip.
        n, nb = self.model.columnCount(), len(BASE_COLUMNS)
        variants = self.model.variants
        own = nb + variants.index(label) if label in variants else None
        if self.model.own != label:
            self.model.own = label
            self.model.headerDataChanged.emit(Qt.Orientation.Horizontal, 0, n - 1)
        for c in range(n):
            text = str(self.model.headerData(c, Qt.Orientation.Horizontal) or "")
            want = max(widths.get(c, 0), fm.horizontalAdvance(text) + 24)
            if c == own:  # beside Name: exactly as wide as its figures, which must show in a narrow dock
                want = self._own_width()
            elif nb <= c < n - 1:  # another variant's: its header cut, never its figures ("0.09…")
                want = max(self._own_width(), min(want, fm.horizontalAdvance("gptq…w4g128__")))
            self.view.setColumnWidth(c, want)
            if c == 0:
                self._auto_name = want
        self._order_columns()
        self.checkpoint_changed.emit(label)

    def show_experts(self, prefix: str | None, proj: str = "", current: int = 0, total: int = 0,
                     whole: str | None = None) -> None:
        """Offer the experts ``0..total-1`` of ``{prefix}.experts.{e}.{proj}``, ``current`` shown
        (-1: "all", the stack ``whole`` itself, offered where it is given); ``prefix`` None (or
        fewer than two experts): hide the box."""
        on = prefix is not None and total > 1
        for w in (self._expert_label, self.expert, self.expert_of):
            w.setVisible(on)
        self._expert_pattern = (prefix, proj) if on else None
        self._expert_whole = whole if on else None
        if on:
            self.expert.blockSignals(True)
            self.expert.setSpecialValueText("all" if whole is not None else "")
            self.expert.setRange(-1 if whole is not None else 0, total - 1)
            self.expert.setValue(current)
            self.expert.blockSignals(False)
            self.expert_of.setText(f"of {total}")

    def _expert_chosen(self) -> None:
        if self._expert_pattern is not None:
            prefix, proj = self._expert_pattern
            e = self.expert.value()
            self.expert_picked.emit(self._expert_whole if e < 0 and self._expert_whole
                                    else f"{prefix}.experts.{e}.{proj}")

    #: The Name column's width: up to this, as the dock allows.
    NAME_WIDTH = 200

    def _own_width(self) -> int:
        """The shown checkpoint's error column: as wide as its figures."""
        return self.view.fontMetrics().horizontalAdvance("0.0000") + 16

    def _name_width(self) -> int:
        """Name's width: the longest name's, within 200 px or half a wide dock; less in a narrow
        dock so the shown checkpoint's error (the column after it) keeps room for its figures (in
        a 235 px dock it showed 30 px of colour)."""
        vw = self.view.viewport().width()
        avail = vw - self._own_width()
        return max(110, min(self._name_need, max(self.NAME_WIDTH, vw // 2), avail))

    def _fit_name(self) -> None:
        """On a new viewport width: the Name width set here follows it both ways (it stayed
        narrow after the window had been made small and large again); a width the user dragged is
        only narrowed, when it would push the shown error's figures out of the dock."""
        want = self._name_width()
        cur = self.view.columnWidth(0)
        if cur > want or (cur == self._auto_name and want != cur):
            self.view.setColumnWidth(0, want)
            self._auto_name = want

    def _order_columns(self) -> None:
        """Shown in the order a reader wants them: the name, the shown checkpoint's own error
        (what the tool is for: at 1024 px a narrow dock showed no error column without
        scrolling), scheme, bits, the other variants' errors and the doctor's flag, then group,
        shape, bytes and bits per weight. Only the view's order changes."""
        h = self.view.header()
        n = self.model.columnCount()
        nb = len(BASE_COLUMNS)
        errors = list(range(nb, n - 1))
        shown = self.combo.currentText()
        variants = self.model.variants
        own = []
        if shown in variants:
            own = [nb + variants.index(shown)]
            errors.remove(own[0])
        # (no error column at all, nothing compared: the doctor's flag after the layer's own
        # columns, not between its bits and its group)
        order = ([0, *own, 1, 2, *errors, n - 1, *range(3, nb)] if own or errors
                 else [0, 1, 2, *range(3, nb), n - 1])
        for pos, logical in enumerate(order):
            if h.visualIndex(logical) != pos:
                h.moveSection(h.visualIndex(logical), pos)

    def _apply_search(self) -> None:
        ids = self._index.search(self.search.text())
        self.model.set_visible(ids)
        total = len(self._index.paths)
        shown = total if ids is None else len(ids)
        query = self.search.text()
        if shown == 0 and "expert" in query and any(".switch_mlp." in p for p in self._index.paths):
            # the experts of this checkpoint are stacked: no module is called experts.N
            hint = " (experts stacked: try switch_mlp)"
        else:  # (said: "down_proj$" found nothing, silently, as a substring)
            hint = {"regex": " (a regular expression)", "bad regex": " (not a valid regular expression)"}.get(
                query_kind(query), "")
        self.count.setText(f"{shown} of {total} modules{hint}")

    def current_label(self) -> str:
        return self.combo.currentText()

    def current_path(self) -> str | None:
        """The module of the current row, if any."""
        cur = self.view.currentIndex()
        return cur.data(TensorTreeModel.PathRole) if cur.isValid() else None

    def select(self, path: str, quiet: bool = False, keep_search: bool = False) -> bool:
        """Select a module by path (clearing the search if it hides it, unless ``keep_search``);
        ``quiet``: highlight it without announcing it (the caller shows a layer of its own, which
        this module holds)."""
        idx = self.model.row_of(path)
        if not idx.isValid() and self.search.text() and not keep_search:
            self.search.clear()
            self._apply_search()
            idx = self.model.row_of(path)
        if not idx.isValid():
            return False
        self._quiet = quiet
        try:
            self.view.setCurrentIndex(idx)
        finally:
            self._quiet = False
        self._quiet_path = path if quiet else None
        self.view.scrollTo(idx)
        return True

    def unselect(self) -> None:
        """No current row (quietly): the layer shown is none of the tree's modules, and a click on
        the row that was current must still select it."""
        self._quiet = True
        try:
            self.view.setCurrentIndex(QModelIndex())
        finally:
            self._quiet = False
        self._quiet_path = self._hidden = None

    def click_selects(self, path: str) -> None:
        """A click on ``path``'s row, if current, selects it again (its decoding was cancelled or
        failed: the row stays current, so the click changed nothing and said nothing)."""
        if self.current_path() == path:
            self._quiet_path = path

    def _on_current(self, cur: QModelIndex, _prev) -> None:
        path = cur.data(TensorTreeModel.PathRole) if cur.isValid() else None
        self._hidden = None
        if path and not self._quiet:
            self._quiet_path = None
            self.layer_selected.emit(path)

    def _on_click(self, index: QModelIndex) -> None:
        # the row made current quietly (it holds the layer shown, an expert of its stack): a click
        # changes no current row, so currentChanged stays silent; the click selects the row itself
        path = index.data(TensorTreeModel.PathRole) if index.isValid() else None
        if path and path == self._quiet_path:
            self._quiet_path = None
            self.layer_selected.emit(path)

    def _remember_current(self) -> None:
        cur = self.view.currentIndex()
        # (a row a search hid stays the one to restore, until another is selected: cleared, the
        # search showed the layer shown without a current row)
        self._keep = cur.data(TensorTreeModel.PathRole) if cur.isValid() else self._hidden

    def _restore_current(self) -> None:
        path, self._keep = self._keep, None
        self._hidden = None
        if not path:
            return
        idx = self.model.row_of(path)
        if not idx.isValid():
            self._hidden = path
        else:
            sm = self.view.selectionModel()
            sm.blockSignals(True)
            self.view.setCurrentIndex(idx)
            sm.blockSignals(False)
            self.view.viewport().update()
            self.view.scrollTo(idx)

    def _menu(self, pos) -> None:
        idx = self.view.indexAt(pos)
        if not idx.isValid():
            return
        path = idx.data(TensorTreeModel.PathRole)
        is_tensor = idx.internalId() != 0
        name = f"{path}{self.model.index(idx.row(), 0, idx.parent()).data()}" if is_tensor else path
        menu = QMenu(self)
        menu.addAction("Copy name", lambda: QGuiApplication.clipboard().setText(name))
        if is_tensor:
            menu.addAction("Export tensor as .npy…", lambda: self.export_tensor_requested.emit(name))
        menu.addAction("Dequantize and export as .npy…", lambda: self.dequant_export_requested.emit(path))
        menu.exec(self.view.viewport().mapToGlobal(pos))
