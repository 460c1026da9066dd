"""MainWindow: composes the docks and views, wires intents to jobs. No backend work here."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import logging
import math
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PySide6.QtCore import QByteArray, QEvent, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QDockWidget,
    QFileDialog,
    QInputDialog,
    QMainWindow,
    QMessageBox,
    QProxyStyle,
    QSplitter,
    QStyle,
    QTabBar,
    QTabWidget,
)
from quantscope import __version__
from quantscope.backend.checkpoint import refuse_writing_into
from quantscope.backend.compare import (
    describe_smoothing,
    smoothing_action,
    smoothing_mark,
)
from quantscope.backend.compare_align import (
    EXPERT_RE,
    canonical,
    containers,
    counterpart,
    expert_of_stack,
    expert_stacks,
    layer_template,
    stack_expert_row,
    stacked_expert,
)
from quantscope.backend.dtypes import DENSE_FLOATS
from quantscope.backend.errors import QuantscopeError
from quantscope.backend.heads import no_heads_why
from quantscope.backend.metrics import worse
from quantscope.backend.search import NameTerms
from quantscope.backend.workspace import Workspace, identity
from quantscope.widgets.code_usage_view import CodeUsageView
from quantscope.widgets.doctor_panel import DoctorPanel
from quantscope.widgets.group_error_heatmap import GroupErrorHeatmap
from quantscope.widgets.head_error_plot import HeadErrorPlot
from quantscope.widgets.histogram_view import HistogramView
from quantscope.widgets.jobs_bar import JobsBar
from quantscope.widgets.layer_error_plot import LayerErrorPlot
from quantscope.widgets.palette import REFERENCE_COLOR, colors_for, is_dark
from quantscope.widgets.plots import render_figure
from quantscope.widgets.quant_config_panel import QuantConfigPanel
from quantscope.widgets.tensor_tree import TensorTree

from . import jobs
from .service import JobService

_logger = logging.getLogger(__name__)
#: The status bar's note while a first run compiles the kernels.
_FIRST_RUN = "First run: compiling the numerical kernels, once (10-20 s); decoding and comparing start after"
MAX_RECENT = 10
#: Layers whose views are kept for going back to them (select_layer)
RECENT_DETAILS = 4


#: The most values of a vector (a norm, a bias) read on the GUI thread to show it.
VECTOR_MAX = 1 << 20


def _vector_of(layer):
    """The stored vector the Values view shows for ``layer`` (a norm's weights; a module's one
    float vector of another name, gpt-oss's attention ``sinks``): 1-D, dense, not too long; None
    where there is none. A quantized layer whose shape is unknown (bits that fit none) has none:
    its packed codes were drawn as "a vector of 3072 values"."""
    if layer.scheme == "dense" and layer.shape is not None and len(layer.shape) == 1 and 0 < layer.shape[0] <= VECTOR_MAX:
        return layer.tensors.get("weight")
    if layer.scheme == "unknown" and len(layer.tensors) == 1:
        (t,) = layer.tensors.values()
        if t.dtype in DENSE_FLOATS and len(t.shape) == 1 and 0 < t.shape[0] <= VECTOR_MAX:
            return t
    return None


def _is_vector(layer) -> bool:
    return _vector_of(layer) is not None


def _worst_per_layer(findings: list[dict]) -> dict[str, tuple[str, str]]:
    """The most severe (severity, message) per layer or tensor, for the tree's Doctor column."""
    worst: dict[str, tuple[str, str]] = {}
    rank = {"error": 3, "warning": 2, "info": 1}
    from quantscope.backend.checkpoint import split_name
    for f in findings:
        # (and the further tensors one finding stands for, a truncated file's past its end: by
        # their modules, which are the tree's rows)
        first = f.get("layer") or f.get("tensor")
        keys = [first, *(split_name(t)[0] for t in f.get("also") or ())]
        if not f.get("layer") and first:  # a tensor's finding: its module's row too
            keys.append(split_name(first)[0])
        for key in keys:
            if key and rank.get(f["severity"], 0) > rank.get(worst.get(key, ("", ""))[0], 0):
                worst[key] = (f["severity"], f["message"])
    return worst


def errors_and_notes(rows, quant_only: dict | None = None):
    """Per variant and module path: the rel_fro the tree shows beside it, and its cell's (mark,
    tooltip), from the same row. A compared layer is shown under its reference name, the
    variant's module, and the modules other checkpoints hold it in (a switch_mlp stack, a fused
    qkv_proj: another checkpoint's tree may show those); a module holding several compared layers
    shows the worst of them, NaN first. The mark says how the smoothing was undone (``*``
    exactly, ``~`` with an estimate, as the command line's table); the tooltip, that row's raw
    error, how the smoothing was undone and the quantization alone."""
    per: dict[str, dict[str, float]] = {}
    notes: dict[str, dict[str, tuple[str, str]]] = {}
    for r in rows:
        lines = [f"{r.name} in {r.variant_layer}" if r.variant_layer != r.name else r.name,
                 f"rel. error {r.rel_fro:.4f} ({r.sqnr_db:.1f} dB), max |error| {r.max_abs:.3g}"]
        if r.smoothing != "none":
            lines.append(f"{smoothing_action(r.smoothing)} ({describe_smoothing(r.smoothing)}); "
                         f"as stored: {r.rel_fro_raw:.4f}")
        q = (quant_only or {}).get((r.name, r.variant))
        if q is not None:
            lines.append(f"the quantization alone (smoothing folded inconsistently): {q:.4f}")
        note = (smoothing_mark(r.smoothing), "\n".join(lines))
        got, said = per.setdefault(r.variant, {}), notes.setdefault(r.variant, {})
        # (a layer compared with several of the variant's, comma-joined: gate_proj and up_proj of
        # a stack that a reference keeps fused as gate_up_proj, each shows it)
        for key in dict.fromkeys([*r.variant_layer.split(","), *containers(r.name)]):
            if worse(r.rel_fro, got.get(key)):
                got[key], said[key] = r.rel_fro, note
        if r.name not in got:
            got[r.name], said[r.name] = r.rel_fro, note
    return per, notes


def errors_by_module(rows) -> dict[str, dict[str, float]]:
    """Per variant, the rel_fro the tree shows beside each module path (see
    :func:`errors_and_notes`)."""
    return errors_and_notes(rows)[0]


_NEEDS_BOTH = "Open a reference and at least one variant first."


#: The widest a dock grows with the window, unless the user widens it (the views get the rest).
DOCK_MAX = 560


class _TabStyle(QProxyStyle):
    """The application's style, with less room beside each tab's name while ``compact``."""

    COMPACT_SPACE = 10  # px beside a tab's name (Fusion: 24)

    def __init__(self) -> None:
        super().__init__()  # (no base: the application's style, whichever it is)
        self.compact = False

    def saved(self) -> int:
        """How much narrower each tab is while compact."""
        space = super().pixelMetric(QStyle.PixelMetric.PM_TabBarTabHSpace)
        return max(0, space - self.COMPACT_SPACE)

    def pixelMetric(self, metric, option=None, widget=None) -> int:
        space = super().pixelMetric(metric, option, widget)
        if self.compact and metric == QStyle.PixelMetric.PM_TabBarTabHSpace:
            return min(space, self.COMPACT_SPACE)
        return space


class _TabBar(QTabBar):
    """A tab bar whose least width is its tabs' with the compact spacing, whichever spacing they
    have now: with the wider one's, a window could not go from 1400 to 835 px in one step (the
    short names and the compact spacing are chosen once the tabs have shrunk; seven tabs at full
    spacing held the window 11 px wider)."""

    def minimumSizeHint(self):
        s = super().minimumSizeHint()
        st = self.style()
        if isinstance(st, _TabStyle) and not st.compact:
            s.setWidth(max(0, s.width() - st.saved() * self.count()))
        return s


class _Tabs(QTabWidget):
    def __init__(self) -> None:
        super().__init__()
        self.setTabBar(_TabBar())


class MainWindow(QMainWindow):
    """The quantscope window. ``settings`` is injected (tests pass an isolated QSettings)."""

    workspace_loaded = Signal()
    detail_shown = Signal(str)
    sweep_done = Signal()
    doctor_done = Signal()
    convert_done = Signal(object)
    failed = Signal(str)

    def __init__(self, settings, service: JobService | None = None, engine: str = "auto",
                 restore: bool = True) -> None:
        super().__init__()
        self.settings = settings
        self.service = service or JobService(self)
        self.engine = engine
        self.workspace = Workspace()
        self.colors: dict = {}
        self.current_layer: str | None = None
        self._convert_note: tuple[str | None, str] | None = None  # (layer shown, summary) of a conversion
        self._unopened: list[str] = []  # the checkpoints of the last open that failed: for the doctor
        # and why, said where a comparison's results would be until the next open (the error box
        # goes, and a screenshot run shows none)
        self._open_errors: list[tuple[str, str]] = []
        self._adds_since_open: list[dict] = []  # (see open_workspace)
        self._job_ids = itertools.count(1)  # channels of their own: adds, conversions, exports
        self._quant_only: dict[tuple[str, str], float] = {}  # the last comparison's rel_fro_quant by (layer, variant)
        self._resize_timer = QTimer(self, singleShot=True, interval=120)
        self._resize_timer.timeout.connect(self._rescale_docks)
        self._dock_widths: dict = {}  # dock -> its width before the window's resize began...
        self._dock_dragged: set = set()  # docks the user widened past DOCK_MAX
        self._dock_win_w: int | None = None  # ...and the window's width then
        self._rescaling = False
        self.sweep_result = None
        self._said_stands = False  # the status bar says which reference layer a selected module stands for
        # the status bar's tooltip (the whole message) goes with its message, cleared or timed out
        self.statusBar().messageChanged.connect(lambda m: m or self.statusBar().setToolTip(""))
        self._sweep_cache: dict = {}
        self._compared: tuple = (None, None)  # (the reference, the layers asked) of the last comparison
        self._heads_measured: tuple = (None, {})  # (the reference, its variants) the heads map was measured of
        self._color_slots: dict[str, int] = {}  # variant label -> its place in the palette, for the session
        self._expert_totals: dict = {}  # (block, projection) -> experts the open checkpoints hold (set_workspace clears it)
        self._expert_auto = False  # the expert shown is the one the window chose for a stack
        self._doctor_found: dict[str, list[dict]] = {}  # checkpoint label -> its doctor findings
        # The what-if box holds, for the layer shown, each of these that belongs to it: a what-if
        # result, the variants' errors (from its detail), a conversion's summary (_result_text).
        self._whatif_line: tuple[str, str] | None = None  # (layer, result line)
        self._detail_errors: tuple[str, object, str | None] | None = None  # (layer, LayerDetail, why no error)
        self._detail_job: int | None = None
        #: The last few layers' views (key: layer, reference, variants, engine): going back to a
        #: layer just looked at shows it at once (a 58M-weight layer takes seconds to measure)
        self._recent_details: OrderedDict = OrderedDict()
        self._shown_layer: str | None = None  # the layer the views show
        self.setWindowTitle("quantscope")
        self.setAcceptDrops(True)
        self._build_views()
        self._build_menus()
        # A fixed width at the right: stretched over the whole bar it covered the status messages
        # (an open that failed, "Converted to …"), which are shown on the left.
        self.jobs_bar = JobsBar(self.service)
        self.jobs_bar.setFixedWidth(440)
        self.statusBar().addPermanentWidget(self.jobs_bar)
        self.service.error.connect(self._show_error)
        self.service.job_done.connect(self._job_ended)
        # Everything built so far (Qt wrappers, pyqtgraph, numpy, our modules) lives as long as
        # the window: keep it out of the cyclic GC's scans, which otherwise stall the GUI thread
        # for 40-50 ms per full collection (measured with gc.callbacks under bench_gui).
        gc.freeze()
        # Every Python callback Qt makes on the GUI thread (each model data() call, each slot)
        # must take the GIL back from busy workers, and CPython hands it over only every
        # switch interval (5 ms by default): a paint of the tree made hundreds of such waits
        # (90+ ms, bench_gui). 0.5 ms bounds each wait; workers spend their time in numpy and
        # compiled kernels that release the GIL anyway.
        if sys.getswitchinterval() > 0.0005:
            sys.setswitchinterval(0.0005)
        # On a first run (numba's cache empty), compile the kernels in other processes (12 s on 2
        # cores; 18 s in this one, the GIL held most of it: the event loop stalled up to 400 ms at
        # a time); the jobs that use them wait for it. Otherwise nothing to do: they are loaded by
        # the jobs that use them (see jobs.job_warm_up).
        from quantscope.backend.precompile import kernels_cached
        if not kernels_cached():
            def compiled() -> None:  # the note goes once it is no longer true
                bar = self.statusBar()
                if bar.toolTip() == _FIRST_RUN:
                    bar.clearMessage()
                    bar.setToolTip("")

            def failed(message: str, details: str) -> None:
                _logger.warning("compiling the kernels failed: %s", message)
                compiled()
            self.service.submit("warm-up", "Compiling kernels", jobs.job_warm_up, gating=True,
                                on_result=lambda _: compiled(), on_error=failed, on_cancel=compiled)
            # (once shown: the status bar's room is known then)
            QTimer.singleShot(0, lambda: self._status(_FIRST_RUN))
        geo = settings.value("window/geometry") if restore else None
        state = settings.value("window/state") if restore else None
        if isinstance(geo, QByteArray):
            self.restoreGeometry(geo)
        if isinstance(state, QByteArray):
            self.restoreState(state)
        else:
            # Dock sizes only apply once the window has a size: set them after the first show, as
            # shares of its width (520 and 420 px left the views 340 px of a 1280 px window)
            QTimer.singleShot(0, lambda: self.resizeDocks(
                [self.tree_dock, self.config_dock],
                [max(240, min(DOCK_MAX, round(self.width() * f))) for f in (0.3, 0.25)], Qt.Orientation.Horizontal))

    def resizeEvent(self, ev) -> None:
        super().resizeEvent(ev)
        # Qt gives all of a window's new width to the central tabs (and, shrinking, takes it from
        # the docks once the tabs reach their minimum): the docks stayed 240 px wide in a window
        # made 1920 px wide. They keep their share instead: the widths they had when the resize
        # began, rescaled once it stops (a drag sends many small steps).
        if self.isVisible() and ev.oldSize().width() > 0:
            self._resize_timer.start()

    def eventFilter(self, obj, ev) -> bool:
        # A dock resized while the window keeps its width: the user dragged its separator (or the
        # first layout): its width is the one to keep. Resized by a window resize (the window's
        # width has changed already when the docks hear of it): not recorded.
        if ev.type() == QEvent.Type.Resize and obj in (self.tree_dock, self.config_dock) and not self._rescaling \
                and (self._dock_win_w is None or self.width() == self._dock_win_w):
            self._dock_widths[obj] = obj.width()
            self._dock_win_w = self.width()
            if self.isVisible() and obj.width() > DOCK_MAX:  # widened by hand: kept as wide
                self._dock_dragged.add(obj)
        if ev.type() == QEvent.Type.Resize and obj is self.tabs:
            self._fit_tab_names()
        return super().eventFilter(obj, ev)

    def _fit_tab_names(self) -> None:
        """The tabs' full names where all fit the tab bar's width, else their short ones, else the
        short ones with less room beside each (six short names at 835 px were elided to "Va…")."""
        bar = self.tabs.tabBar()
        fm = bar.fontMetrics()
        style = self._tab_style
        # each tab's room besides its text, from its size hint (its unsqueezed size; a squeezed
        # tab's rect gave too little, and the choice depended on the widths before), as it is
        # without the compact spacing
        extra = style.saved() if style.compact else 0
        pads = [bar.tabSizeHint(i).width() - fm.horizontalAdvance(self.tabs.tabText(i).replace("&&", "&")) + extra
                for i in range(self.tabs.count())]
        room = self.tabs.width() - 4

        def need(k: int) -> int:
            return sum(fm.horizontalAdvance(names[k].replace("&&", "&")) + p for names, p in zip(self._tab_names, pads))

        use = 0 if need(0) <= room else 1
        compact = use == 1 and need(1) > room
        for i, names in enumerate(self._tab_names):
            if self.tabs.tabText(i) != names[use]:
                self.tabs.setTabText(i, names[use])
        if compact != style.compact:
            style.compact = compact
            QApplication.sendEvent(bar, QEvent(QEvent.Type.StyleChange))  # the bar lays its tabs out anew

    def _rescale_docks(self) -> None:
        old, new = self._dock_win_w, self.width()
        docks = [d for d in (self.tree_dock, self.config_dock) if d.isVisible() and not d.isFloating()]
        if not old or abs(new - old) < 8 or not docks:
            return
        # (a dock the user never widened stops at DOCK_MAX: at 2560 px each took 736, its panel
        # mostly empty, and the plots 1076)
        widths = [max(240, round(self._dock_widths.get(d, d.width()) * new / old)) for d in docks]
        widths = [w if d in self._dock_dragged else min(w, DOCK_MAX) for d, w in zip(docks, widths)]
        self._rescaling = True
        self.resizeDocks(docks, widths, Qt.Orientation.Horizontal)

        def settled() -> None:
            self._rescaling = False
            # the widths the docks took, and the window width they are for; where a resize began
            # before this ran (the window already narrower, the docks already squeezed by it),
            # the widths asked for: it must still rescale them from these (recording the window's
            # width now found old == new and left the docks 576 px wide in a 1024-px window)
            moved = self.width() != new
            for d, w in zip(docks, widths):
                self._dock_widths[d] = w if moved else d.width()
            self._dock_win_w = new
        QTimer.singleShot(0, settled)

    # -- composition -----------------------------------------------------------------------------

    def _dock(self, title: str, widget, area) -> QDockWidget:
        d = QDockWidget(title, self)
        d.setObjectName(title.replace(" ", "_"))
        d.setWidget(widget)
        self.addDockWidget(area, d)
        return d

    def _build_views(self) -> None:
        self.tree = TensorTree()
        self.tree.setMinimumWidth(240)
        self.config = QuantConfigPanel()
        self.config.setMinimumWidth(240)
        self.doctor = DoctorPanel()
        pick = "Select a weight matrix in the Tensors tree: "
        self.hist = HistogramView("weight value", empty_hint=pick + "its values in the reference and in every "
                                  "variant, on shared bin edges (exact counts)")
        self.err_hist = HistogramView("error Ŵ − W", empty_hint=pick + "the error of every variant against the "
                                      "reference, on shared bin edges", alt=("log |error|", "log10 |Ŵ − W|"))
        self.err_hist.alt_box.setToolTip("log10 of |Ŵ − W| on shared edges: variants whose errors differ by orders "
                                         "of magnitude each resolved (exact zeros are counted below the plot)")
        self.codes = CodeUsageView()
        self.scales = HistogramView("scale value", empty_hint="Select a quantized layer in the Tensors tree: "
                                    "the distribution of its per-group scales in every variant")
        self.zeros = HistogramView("zero point (code level)", empty_hint="… and of its integer zero points",
                                   discrete=True)
        scales_tab = QSplitter(Qt.Orientation.Vertical)
        scales_tab.addWidget(self.scales)
        scales_tab.addWidget(self.zeros)
        self.heatmap = GroupErrorHeatmap()
        self.heads = HeadErrorPlot()
        self.layers = LayerErrorPlot()
        self.tabs = _Tabs()
        self._tab_names = []  # (full, short) per tab
        for w, name, short in ((self.hist, "Values", "Values"), (self.err_hist, "Error", "Error"),
                               (self.codes, "Code usage", "Codes"), (scales_tab, "Scales && zeros", "Scales"),
                               (self.heatmap, "Group error", "Groups"), (self.heads, "Heads", "Heads"),
                               (self.layers, "Layers", "Layers")):
            self.tabs.setTabToolTip(self.tabs.addTab(w, name), name.replace("&&", "&"))
            self._tab_names.append((name, short))
        # every tab in sight: their short names where the full ones do not fit, then elided (at
        # 1024 px Layers, the comparison's own view, was behind the tab bar's scroll arrows)
        self.tabs.setElideMode(Qt.TextElideMode.ElideRight)
        self.tabs.setUsesScrollButtons(False)
        self._tab_style = _TabStyle()
        # (a widget does not own its style: parented to the bar, it lives as long as the bar)
        self._tab_style.setParent(self.tabs.tabBar())
        self.tabs.tabBar().setStyle(self._tab_style)
        self.tabs.installEventFilter(self)
        self.setCentralWidget(self.tabs)
        self._page = {self.hist: self.hist, self.err_hist: self.err_hist, self.codes: self.codes,
                      self.scales: scales_tab, self.zeros: scales_tab, self.heatmap: self.heatmap,
                      self.heads: self.heads}
        self._pending: dict = {}  # tab page -> {view: update}, applied when the page is shown
        self._turn_gen: dict[str, int] = {}
        self._turns_left: dict[str, int] = {}
        self.tabs.currentChanged.connect(self._apply_pending)
        self.tree_dock = self._dock("Tensors", self.tree, Qt.DockWidgetArea.LeftDockWidgetArea)
        self.config_dock = self._dock("Quantization config", self.config, Qt.DockWidgetArea.RightDockWidgetArea)
        for d in (self.tree_dock, self.config_dock):
            d.installEventFilter(self)
        self.doctor_dock = self._dock("Doctor", self.doctor, Qt.DockWidgetArea.RightDockWidgetArea)
        self.tabifyDockWidget(self.config_dock, self.doctor_dock)
        self.config_dock.raise_()
        self.tree.layer_selected.connect(self.select_layer)
        self.tree.expert_picked.connect(self.select_layer_everywhere)  # (the tree's row follows, where it has one)
        self.tree.checkpoint_changed.connect(self._checkpoint_changed)
        self.tree.export_tensor_requested.connect(self.export_tensor)
        self.tree.dequant_export_requested.connect(self.export_dequant)
        self.layers.layer_selected.connect(self.select_layer_everywhere)
        self.heads.map.layer_selected.connect(self.select_layer_everywhere)
        self.heads.map.measure_requested.connect(self.compare_heads)
        self.doctor.layer_activated.connect(self.select_layer_everywhere)
        self.config.whatif_requested.connect(self.run_whatif)

    def _action(self, menu, text, slot, shortcut=None) -> QAction:
        a = QAction(text, self)
        if shortcut is not None:
            a.setShortcut(QKeySequence(shortcut))
        a.triggered.connect(slot)
        menu.addAction(a)
        return a

    def _build_menus(self) -> None:
        mb = self.menuBar()
        f = mb.addMenu("&File")
        self._action(f, "Add variant…", self.add_variant_dialog, QKeySequence.StandardKey.Open)
        self._action(f, "Add variant folder…", lambda: self.add_variant_dialog(folder=True))
        self._action(f, "Set reference…", self.set_reference_dialog, "Ctrl+R")
        self._action(f, "Open from Hugging Face cache…", self.open_hf_cache_dialog)
        self.recent_menu = f.addMenu("Open recent")
        self._refresh_recent()
        self._action(f, "Open demo workspace", lambda: self.open_workspace([], None))
        self._action(f, "Remove shown checkpoint from the workspace", self.remove_shown, "Ctrl+W")
        f.addSeparator()
        ex = f.addMenu("Export")
        self._action(ex, "Metrics as CSV…", lambda: self.export_metrics("csv"))
        self._action(ex, "Metrics as JSON…", lambda: self.export_metrics("json"))
        self._action(ex, "Heads as CSV…", self.export_heads)
        self._action(ex, "Current plot as PNG…", lambda: self.export_plot("png"), "Ctrl+E")
        self._action(ex, "Current plot as SVG…", lambda: self.export_plot("svg"))
        self._action(ex, "Selected layer, dequantized (.npy)…", lambda: self.export_dequant(self.current_layer))
        f.addSeparator()
        self._action(f, "Quit", self.close, QKeySequence.StandardKey.Quit)
        e = mb.addMenu("&Edit")
        self._action(e, "Find layer", self._focus_search, QKeySequence.StandardKey.Find)
        t = mb.addMenu("&Tools")
        self.compare_action = self._action(t, "Compare all layers", self.compare_all, "Ctrl+Shift+C")
        self._action(t, "Compare layers matching the search", self.compare_matching, "Ctrl+Shift+M")
        self._action(t, "Compare heads of every layer", self.compare_heads, "Ctrl+Shift+H")
        self._action(t, "Run doctor on shown checkpoint", lambda: self.run_doctor(), "Ctrl+D")
        self._action(t, "Doctor on a checkpoint folder…", self.doctor_dialog)
        self._action(t, "Convert…", self.convert_dialog, "Ctrl+Shift+K")
        self._action(t, "Cancel all jobs", self.service.cancel_all, "Esc")
        v = mb.addMenu("&View")
        for d in (self.tree_dock, self.config_dock, self.doctor_dock):
            v.addAction(d.toggleViewAction())
        h = mb.addMenu("&Help")
        self._action(h, "About quantscope", lambda: QMessageBox.about(
            self, "quantscope", "quantscope — see what quantization did to a model.\n"
            "GPTQ, AWQ, MLX, compressed-tensors, FP8 and bitsandbytes checkpoints in safetensors."))

    # -- workspace -------------------------------------------------------------------------------

    def open_workspace(self, paths: list[str], reference: str | None) -> None:
        """Open checkpoints (none: the demo workspace) on a worker thread."""
        title = "Opening demo workspace" if not paths and not reference else "Opening checkpoints"
        n = len(paths) + bool(reference)

        # adds asked for after this open (a file dropped while it loads): the ones that land in the
        # old workspace first are made again in this one (one of the two was lost, at random)
        self._adds_since_open = []

        def opened(ws: Workspace) -> None:
            self._open_errors = list(ws.failed)
            # (Open recent listed only what Add variant / Set reference opened)
            self._remember_opened(paths + ([reference] if reference else []), ws.failed)
            landed = [a for a in self._adds_since_open if a["merged"]]
            self._adds_since_open = []
            self._color_slots.clear()  # a new workspace: a fresh palette (colours kept across adds and removes)
            self.set_workspace(ws)
            self._report_failed(ws.failed, n, reference)
            for a in landed:
                self.add_paths(a["paths"], a["as_reference"])

        self.service.submit("workspace", title, jobs.job_load, list(paths), reference,
                            on_result=opened, on_error=self._open_failed([*([reference] if reference else []), *paths],
                                                                         reference))

    def _needs_note(self) -> str:
        """What a comparison needs that the workspace lacks ("" when it can run), after what
        could not be opened and why."""
        ws = self.workspace
        needs = ("" if ws.reference is not None and ws.variants else
                 "A comparison needs a reference: File ▸ Set reference… opens the original (unquantized) model."
                 if ws.reference is None else
                 "A comparison needs a variant beside the reference: File ▸ Add variant… opens a quantized one.")
        if not needs or not self._open_errors:
            return needs
        return f"Could not be opened: {self._failed_text()}. {needs}"

    def _failed_text(self) -> str:
        """What could not be opened, and why (each message names its file, or is given it)."""
        return " · ".join(msg if msg.startswith(p) else f"{p}: {msg}" for p, msg in self._open_errors)

    def _open_failed(self, paths: list[str], reference: str | None = None):
        """The error handler of a load where none of ``paths`` opened (in the order they were
        tried: the error names the first): they are what the doctor checks next (Tools ▸ Run
        doctor with nothing open), the one named first."""
        def failed(message: str, details: str) -> None:
            self._unopened = [str(p) for p in paths]
            self._open_errors = [(self._unopened[0] if self._unopened else "", message)]
            if not self.workspace.models():  # nothing open at all: the empty views say it
                self.layers.set_rows([], {}, empty_note=self._needs_note())
                # (they said "Select a weight matrix in the Tensors tree", of a tree left empty)
                self._clear_views(f"Nothing is open. Could not be opened: {self._failed_text()}. File ▸ Add "
                                  "variant… or Set reference… opens another; Tools ▸ Run doctor (Ctrl+D) lists what "
                                  "is wrong with this one.")
                self.config.set_whatif_target(None, why_not="nothing is open")
            named = [str(p) for p in [*paths, reference] if p is not None and message.startswith(str(p))]
            if named:  # our own error, naming the file: its details say what to do, not the traceback
                details = (f"{message}\n\nTools ▸ Run doctor (Ctrl+D) lists every problem of {named[0]} "
                           "(`quantscope doctor PATH` on the command line).")
            if reference is not None and message.startswith(str(reference)):
                message = "The reference could not be opened: " + message
            self._job_failed(message, details)
        return failed

    def _report_failed(self, failed: list[tuple[str, str]], asked: int, reference: str | None = None) -> None:
        """Say which checkpoints could not be opened (the others are): each with its reason; the
        reference first, since without it nothing can be compared."""
        if not failed:
            return
        self._unopened = [p for p, _ in failed]
        rest = asked - len(failed)
        head = (f"{len(failed)} of {asked} checkpoints could not be opened; "
                + ("none is open. " if rest <= 0 else "the other is open. " if rest == 1 else "the others are open. ")
                if asked > 1 else "")
        if reference is not None and any(p == str(reference) for p, _ in failed):
            head = ("The reference could not be opened, so no error can be measured (File ▸ Set reference… "
                    "opens another). " + head)
        self._show_error("Open checkpoints", head + " · ".join(msg for _, msg in failed),
                         "\n\n".join(f"{path}:\n{msg}" for path, msg in failed)
                         + "\n\nTools ▸ " + ("Run doctor (Ctrl+D)" if not self.workspace.models() else
                                              "Doctor on a checkpoint folder…")
                         + " lists every problem of a checkpoint (`quantscope doctor PATH` on the command line).")

    def add_paths(self, paths: list[str], as_reference: bool = False) -> None:
        asked = {"paths": list(paths), "as_reference": as_reference, "merged": False}
        self._adds_since_open.append(asked)

        def merge(new: Workspace) -> None:
            # into the workspace open now (one opened meanwhile replaced the one open when asked:
            # the add took the old one back)
            ws = self.workspace
            asked["merged"] = True
            if "workspace" not in self._busy_channels():  # no open to make it again in: done with
                self._forget_add(asked)
            # by the files it reads, not the path given: a folder's model.safetensors, or a link,
            # opened it a second time as "name (2)"
            open_ = {identity(m): lb for lb, m in ws.models().items()}
            again, added = [], []
            for label, m in new.variants.items():
                known = open_.get(identity(m))
                if as_reference and known is not None and known in ws.variants:
                    # an open variant made the reference: moved, not opened again beside itself
                    ws.set_reference(ws.variants.pop(known), known)
                elif as_reference and known is not None:
                    again.append(f"{m.ckpt.source} is the reference already")
                elif as_reference:
                    ws.set_reference(m)
                elif known is not None:  # it opened as "name (2)", twice the same
                    again.append(f"{m.ckpt.source} is open already (as {known})")
                else:
                    added.append(ws.add_variant(m))
            self._remember_opened(paths, new.failed)
            if not added and (not as_reference or (again and len(again) == len(new.variants))):
                # nothing new: the workspace, its comparison and the views stay as they are (they
                # were rebuilt and the comparison run again, from its cache); the tree shows the
                # checkpoint asked for
                if again:
                    first = next(iter(new.variants.values()))
                    self.tree.combo.setCurrentText(open_[identity(first)])
                    self._status("; ".join(again))
                self._report_failed(new.failed, len(paths))
                return
            # the tree shows what was just added (a conversion's output), not the first variant
            self.set_workspace(ws, show=added[0] if added else None)
            if again:  # (after: a new workspace clears the status bar)
                self._status("; ".join(again))
            self._report_failed(new.failed, len(paths))

        # a channel of its own: a second add (two files dropped in turn) cancelled the first
        failed = self._open_failed(paths)

        def not_opened(message: str, details: str) -> None:
            self._forget_add(asked)
            failed(message, details)

        self.service.submit(f"add:{next(self._job_ids)}", "Opening checkpoint", jobs.job_load, list(paths), None,
                            on_result=merge, on_error=not_opened)

    def _forget_add(self, asked: dict) -> None:
        self._adds_since_open = [a for a in self._adds_since_open if a is not asked]

    def remove_shown(self) -> None:
        """Take the checkpoint the tree shows out of the workspace (a wrong or broken variant, a
        conversion's output, the reference): the others stay, and their comparison, from its
        cache. There was no way to drop one but opening another workspace."""
        ws, label = self.workspace, self.tree.current_label()
        if label and label == ws.reference_label:
            ws.reference, ws.reference_label = None, None
        elif label in ws.variants:
            ws.remove(label)
        else:
            return
        self.set_workspace(ws)
        self._status(f"{label} removed from the workspace (its files are untouched)")

    def set_workspace(self, ws: Workspace, show: str | None = None) -> None:
        """Show ``ws``; the tree shows the checkpoint ``show``, else the one it showed (when still
        open), else the first variant."""
        kept = self.tree.current_label()
        self._expert_totals.clear()  # (counted of the checkpoints open before)
        # a variant added to (or converted into) the workspace whose layers were compared (or were
        # being compared): compared again at once, the others' figures from the cache (only the
        # new one is measured); the comparison was dropped, and its cache with it, so a second run
        # measured everything again
        again = (ws is self.workspace and ws.reference is not None and ws.reference is self._compared[0]
                 and bool(ws.variants))
        only = self._compared[1]
        # the cache stays for the session, whatever the reference (its keys hold both files'
        # identities and configs, so what it has is still true): a reference closed and opened
        # again was measured again from the start, minutes on a large model
        if ws.reference is not self._compared[0]:
            self._compared = (None, None)
        self.workspace = ws
        self._doctor_found = {}
        self._recent_details.clear()  # (they hold the checkpoints before)
        self.service.cancel_channel("detail")  # a layer of the checkpoints before: it must not land here
        self.service.cancel_channel("sweep")  # a comparison of the old set of checkpoints: its result would land here
        self.service.cancel_channel("heads")  # (as the comparison: of the checkpoints before)
        self.sweep_result = None
        self._quant_only = {}
        self._detail_errors = self._whatif_line = None  # of the checkpoints before (the reference may differ)
        self.colors = colors_for(list(ws.variants), self._color_slots)  # (a label keeps its colour)
        if ws.reference_label:
            self.colors["reference"] = REFERENCE_COLOR
            self.colors[ws.reference_label] = REFERENCE_COLOR
        self.tree.model.dark = is_dark(self.palette())
        if self.statusBar().currentMessage().startswith(_NEEDS_BOTH[:24]):  # said of the last workspace
            self.statusBar().clearMessage()
        if ws.reference is not None and any(lay.quantized for lay in ws.reference.layers.values()):
            schemes = sorted({lay.scheme for lay in ws.reference.layers.values() if lay.quantized})
            self._status(f"The reference is quantized ({', '.join(schemes)}): errors are measured against its "
                         "decode, and the what-if requantizes that")
        elif self.statusBar().currentMessage().startswith("The reference is quantized"):  # of the one before
            self.statusBar().clearMessage()
        if ws.reference is not None:  # a reference of another model: said now, not after a Compare
            rl = ws.reference.layers

            def unlike(m, misread: bool) -> bool:  # no quantized layer of the reference's shape
                off = [lay for n, lay in m.layers.items() if n in rl and lay.shape != rl[n].shape]
                return bool(off) and not any(n in rl and lay.shape == rl[n].shape and lay.quantized
                                             for n, lay in m.layers.items()) \
                    and all(bool(lay.problem or lay.warning) == misread for lay in off)
            odd = [lb for lb, m in ws.variants.items() if unlike(m, False)]
            # shapes read from a config its tensors contradict (bits 3 for 4-bit codes): the config,
            # not the reference, is what is wrong ("another model?" was said of them)
            misread = [lb for lb, m in ws.variants.items() if unlike(m, True)]
            if odd:
                self._status(f"Is the reference another model? No quantized layer of {', '.join(odd)} has the "
                             "shape of the reference's of that name (Compare lists each layer and why)")
            elif misread:
                self._status(f"{', '.join(misread)}: the layers cannot be read as the config says (their shapes "
                             "then differ from the reference's) — Tools ▸ Run doctor (Ctrl+D) says why")
        # an error column per variant, when there is a reference to measure them against (without
        # one they stayed empty whatever the user did)
        errs = list(ws.variants) if ws.reference is not None else []
        self.tree.model.set_variants(errs, self.colors)
        self.tree.model.set_all_errors({v: {} for v in errs})  # the last comparison's, gone with it
        models = ws.models()
        first = show if show in models else kept if kept in models else next(iter(ws.variants), ws.reference_label)
        self.tree.set_checkpoints(models, current=first)
        self.setWindowTitle("quantscope — " + ", ".join(ws.models()))
        self._drop_turns("sweep")  # an older workspace's sweep result, still being shown
        # The layers plot (emptied, then one series per variant, built ahead of the first sweep
        # result) in later turns of the event loop: each turn and its repaint stay short.
        variants, colors = list(ws.variants), dict(self.colors)
        # said where the comparison's results would be: what it needs, when it cannot run
        needs = self._needs_note()
        # (no series, and no legend over the empty plot, where no comparison can run)
        self._in_turns("workspace", [lambda: self.layers.set_rows([], colors, empty_note=needs),
                                     lambda: self._keep_heads(ws, needs),
                                     lambda: self.layers.set_warnings({}),
                                     *self.layers.prepare_steps([] if needs else variants, colors),
                                     self._reselect, self.workspace_loaded.emit]
                       + ([lambda: self._compare(only)] if again else []))

    def _keep_heads(self, ws: Workspace, needs: str) -> None:
        """The heads map of a workspace whose reference stayed (a variant added or removed): the
        variants still open as they were keep their figures; another reference's, none."""
        ref, measured = self._heads_measured
        kept = [r for r in self.heads.map.rows() if ws.reference is not None and ws.reference is ref
                and r.variant in ws.variants and ws.variants[r.variant] is measured.get(r.variant)]
        if kept:
            self.heads.map.set_rows(kept)
        else:
            self._heads_measured = (None, {})
            self.heads.map.set_rows(None, empty_note=needs)

    def _reselect(self) -> None:
        """After the workspace changed (a variant added, a conversion opened): the layer shown
        again with every checkpoint now open, or the views emptied when it is gone."""
        path = self.current_layer
        if path is None:
            return
        if path in self._all_paths():
            self.tree.blockSignals(True)  # the tree may keep it selected (no signal) or not: once here
            self.tree.select(path)
            self.tree.blockSignals(False)
            self.select_layer(path)
        else:
            self.current_layer = None
            self.layers.mark_layer(None)  # (a layer of that name in a later comparison is not the one shown)
            self.heads.map.mark_layer(None)
            self.tree.show_experts(None)  # (it stayed up, picking experts of a workspace gone)
            self.config.clear_layer()
            self._clear_views("Select a layer in the tree")

    def _in_turns(self, channel: str, steps: list) -> None:
        """Run ``steps`` one per turn of the event loop, from the next one on: the window repaints
        what the caller and then each step changed before the next runs, so no single GUI-thread
        step (work plus repaint) is long. A later call on the same channel drops the steps not
        yet run."""
        gen = self._turn_gen.get(channel, 0) + 1
        self._turn_gen[channel] = gen
        self._turns_left[channel] = len(steps)

        def run(i: int) -> None:
            if self._turn_gen.get(channel) != gen or self.service.closed:
                return  # (superseded, or the window is closing: a step's job would find no service)
            self._turns_left[channel] = len(steps) - i - 1
            steps[i]()
            if i + 1 < len(steps):
                # 1 ms, not 0: a zero-delay single shot is a posted call, run back to back with
                # the repaint it should follow; a timer lets pending repaints and other timers
                # run first. The window as context: no step runs once it is gone.
                QTimer.singleShot(1, self, lambda: run(i + 1))

        if steps:
            QTimer.singleShot(1, self, lambda: run(0))

    def _drop_turns(self, channel: str) -> None:
        self._turn_gen[channel] = self._turn_gen.get(channel, 0) + 1
        self._turns_left[channel] = 0

    def turns_pending(self) -> bool:
        """Whether a result is still being shown in turns (see :meth:`_in_turns`)."""
        return any(self._turns_left.values())

    def _compare_note(self, label: str) -> str:
        """The last comparison's warning about checkpoint ``label`` as a whole, or ""."""
        res = self.sweep_result
        return res.warnings().get(label, ("", ""))[1] if res is not None else ""

    def _checkpoint_changed(self, label: str) -> None:
        if self.current_layer is not None:  # the layer shown, in this checkpoint's tree (or what holds it)
            self._highlight(self.current_layer, keep_search=True)  # (what the user searched for stays)
        self.config.set_checkpoint(label, self.workspace.models().get(label))
        self.doctor.set_compare_note(self._compare_note(label))
        self.heatmap.follow(label)  # the group errors of the checkpoint the tree shows
        self.layers.follow(label)  # and its layers' heatmap
        self.heads.map.follow(label)  # and every layer's heads
        # The doctor's findings belong to one checkpoint: show that one's, or none.
        found = self._doctor_found.get(label)
        if found is None:
            self.doctor.not_run(label)
            self.tree.model.set_findings({})
        else:
            self.doctor.set_findings(label, found)
            self.tree.model.set_findings(_worst_per_layer(found))

    # -- selection and views ----------------------------------------------------------------------

    def select_layer_everywhere(self, path: str) -> None:
        """Select a layer from any view (layers plot, doctor): tree, config panel and views."""
        # a tensor name (e.g. from the doctor): its module; not an expert's row of a stack, which
        # no checkpoint holds as a module (…experts.2.gate_up_proj of a stack compared with a stack)
        if path not in self._all_paths() and not EXPERT_RE.match(path):
            from quantscope.backend.checkpoint import split_name
            path = split_name(path)[0]
        if self.tree.current_path() == path and (self.current_layer != path or self._unshown(path)):
            # (the row an expert's highlight made current, or a layer whose decoding was cancelled:
            # selecting it again changes no row, so the tree says nothing; "all" in the expert box)
            self.select_layer(path)
            return
        if self.tree.select(path):
            return
        self._highlight(path)
        self.select_layer(path)

    def _highlight(self, path: str, keep_search: bool = False) -> None:
        """Make the tree's current row the layer shown, quietly: itself, or the module of the shown
        checkpoint that holds it under another name (a switch_mlp stack, a fused qkv_proj), or
        none (switching checkpoints left no row current, or a stack's for an expert).
        ``keep_search``: a row the search hides stays hidden (none is current)."""
        if self.tree.current_path() == path or self.tree.select(path, quiet=True, keep_search=keep_search):
            return
        shown = self.workspace.models().get(self.tree.current_label())
        hit = counterpart(path, shown) if shown is not None else None
        if hit is None or not self.tree.select(hit[0], quiet=True, keep_search=keep_search):
            self.tree.unselect()  # no row of the tree is the layer shown

    def _all_paths(self) -> set[str]:
        out = set()
        for m in self.workspace.models().values():
            out.update(m.layers)
        return out

    def select_layer(self, path: str) -> None:
        ws = self.workspace
        stands = self._reference_layer_for(path)
        if stands is None and ws.reference is None:  # no reference: a stack shows its expert 0, the box picks others
            first = stack_expert_row(path, 0)
            if first is not None and any((lay := m.layers.get(path)) is not None and lay.shape and len(lay.shape) == 3
                                         for m in ws.models().values()):
                stands = first, f"{path} stacks its experts: showing expert 0 (the expert box under the tree picks another)"
        # (an expert the window chose for a stack, not one the user picked: the worst, once compared)
        self._expert_auto = stands is not None and bool(EXPERT_RE.match(stands[0]))
        if stands is not None:  # a variant's own module (stacked experts, fused q/k/v): its error
            path, message = stands
            self._status(message)
            self._said_stands = True
        elif self._said_stands:  # that message was about the selection before
            self.statusBar().clearMessage()
            self._said_stands = False
        self.current_layer = path
        self._offer_experts(path)
        self.layers.mark_layer(path)
        self.heads.map.mark_layer(path)
        self.config.set_layer(path, self.workspace.models())
        self._whatif_target(path)
        self._refresh_result()  # what belongs to this layer (a conversion's summary), nothing of another's
        if ws.reference is not None and (path in ws.reference.layers or path == "lm_head"
                                         or expert_of_stack(path, ws.reference) is not None):
            # (lm_head: a tied reference compares it with its embeddings)
            if path in ws.reference.layers and not ws.reference.layers[path].is_matrix:
                if _is_vector(ws.reference.layers[path]):
                    self._show_vectors(path)
                else:
                    self._clear_views(f"{path} is not a weight matrix")
                return
            ref, models = ws.reference, dict(ws.variants)
        else:  # no reference for it: what the checkpoints hold (values, codes, scales), no error
            ref, models = None, ws.models()
            held = [m.layers[path] for m in models.values() if path in m.layers]
            for m in models.values():  # an expert of a stack a checkpoint holds: that stack
                try:
                    stack = None if path in m.layers else stacked_expert(path, m)
                except QuantscopeError:
                    stack = None
                if stack is not None:
                    held.append(stack[0])
            if not any(lay.is_matrix and lay.decodable for lay in held):
                if held and any(_is_vector(lay) for lay in held):
                    self._show_vectors(path)
                else:
                    self._clear_views(f"{path} cannot be decoded (the Quantization config panel says why)")
                return
        key = (path, id(ref), tuple((k, id(m)) for k, m in models.items()), self.engine)
        hit = self._recent_details.get(key)  # (an entry holds its checkpoints: their ids are not reused)
        if hit is not None:
            self.service.cancel_channel("detail")  # a layer asked for before: it must not land after
            self._recent_details.move_to_end(key)
            self._show_detail(hit[2])
            return

        held = (ref, tuple(models.values()))

        def shown(r, key=key, held=held):
            ws = self.workspace
            if (held[0] is not None and held[0] is not ws.reference) or any(
                    m not in ws.models().values() for m in held[1]):
                return  # of checkpoints no longer open (a workspace opened meanwhile): not shown, not kept
            # kept without the full-size arrays the views do not use (group error maps, scales
            # and zero points: a stacked MoE layer's map alone is hundreds of MB)
            lean = {**r, "detail": dataclasses.replace(r["detail"], group_error={}, scales={}, zeros={})}
            self._recent_details[key] = (*held, lean)
            while len(self._recent_details) > RECENT_DETAILS:
                self._recent_details.popitem(last=False)
            self._show_detail(r)
        job = self.service.submit("detail", f"Decoding {path}", jobs.job_detail, ref, models, path,
                                  engine=self.engine, on_result=shown, on_error=self._job_failed, gated=True)
        self._detail_job = job.id

    def _offer_experts(self, path: str) -> None:
        """The tree's expert box for an expert of a MoE layer (stacked in some checkpoint, or
        stored one by one): how many experts the open checkpoints hold, this one chosen. A stack's
        row has no row per expert: the views showed expert 0, or the worst, with no way to pick."""
        m = EXPERT_RE.match(path)
        ws = self.workspace
        ref = None if ws is None else ws.reference
        # a stack of the reference's that a comparison measures expert by expert: shown whole,
        # the box offering its experts and "all" (the stack itself)
        whole = next((s for s in ([path] if m is None else expert_stacks(path, ref) if ref is not None else [])
                      if ref is not None and s in ref.layers and stack_expert_row(s, 0) is not None
                      and (lay := ref.layers[s]).shape and len(lay.shape) == 3 and not lay.quantized), None)
        if m is None and whole is not None:
            m = EXPERT_RE.match(stack_expert_row(whole, 0))
            current = -1
        elif m is None or ws is None:
            self.tree.show_experts(None)
            return
        else:
            current = int(m["e"])
        pre, proj = m["pre"], m["proj"]
        want = (canonical(pre), proj)
        total = self._expert_totals.get(want)
        if total is None:  # (once per layer and workspace: a 70k-module MoE's names read on every click)
            total = self._expert_totals[want] = self._count_experts(pre, proj, want)
        self.tree.show_experts(pre, proj, current, total, whole=whole)

    def _count_experts(self, pre: str, proj: str, want: tuple) -> int:
        total = 0
        for model in self.workspace.models().values():
            stack = counterpart(f"{pre}.switch_mlp.{proj}", model)
            lay = None if stack is None else model.layers.get(stack[0])
            if lay is not None and lay.shape and len(lay.shape) == 3:
                total = max(total, lay.shape[0])
            for name in model.layers:
                if ".experts." in name and (e := EXPERT_RE.match(name)) and (canonical(e["pre"]), e["proj"]) == want:
                    total = max(total, int(e["e"]) + 1)
        return total

    def _whatif_target(self, path: str) -> None:
        """Tell the what-if which reference layer it would requantize: its in_features, or why it
        cannot (a norm); without a reference every choice stays (a click says what is missing)."""
        ref = self.workspace.reference
        lay = None if ref is None else ref.layers.get(path)
        if lay is None and ref is not None:  # an expert of the reference's stack: the stack's columns
            try:
                held = stacked_expert(path, ref)
            except QuantscopeError:
                held = None
            lay = None if held is None else held[0]
        if lay is None:
            self.config.set_whatif_target(None)
        elif not lay.is_matrix:
            self.config.set_whatif_target(None, f"{path} is not a weight matrix: only matrices can be requantized")
        else:
            self.config.set_whatif_target(int(lay.shape[-1]) if lay.shape else None)

    def _reference_layer_for(self, path: str) -> tuple[str, str] | None:
        """(the reference layer a variant's module named otherwise stands for, a status message
        saying so): the expert with the largest error of a switch_mlp stack once compared (else
        expert 0), q_proj of a fused qkv_proj, the same module under another prefix; None when
        the reference has ``path`` itself (or nothing like it)."""
        ref = self.workspace.reference
        if ref is None or path in ref.layers or path == "lm_head":
            return None
        expert = expert_of_stack(path, ref)
        if expert is not None:  # the reference stacks the experts: compared one by one all the same
            return expert, f"{path}: expert {expert.rsplit('.', 2)[1]} of the reference's stacked experts"
        found = counterpart(path, ref)
        if found is None:
            return None
        res, shown = self.sweep_result, self.tree.current_label()
        rows = [r for r in res.rows if r.variant == shown and r.variant_layer == path and r.name in ref.layers] \
            if res is not None else []  # the shown checkpoint's own rows (another variant's differ)
        if len({r.name for r in rows}) > 1:
            top = None
            for r in rows:
                if top is None or worse(r.rel_fro, top.rel_fro):
                    top = r
            return top.name, f"{path} holds {len(rows)} layers of the reference: showing the worst, {top.name}"
        if found[1].startswith("its rows of the fused"):  # (gate_proj of a stack the reference keeps as gate_up_proj)
            return found[0], f"{path} is part of the reference's fused {found[0]}: showing that"
        if EXPERT_RE.match(found[0]):  # (an expert of a reference storing them one by one)
            return found[0], (f"{path} stacks the reference's experts: showing {found[0]} "
                              "(once compared: the worst expert)")
        return found[0], f"{path}: showing the reference's {found[0]}"

    def _job_ended(self, job_id: int) -> None:
        # A layer's decode that ended without showing it (cancelled with Esc, or failed): the views
        # still show the layer before, so they say so (checked once the result, if any, is shown).
        if job_id == self._detail_job:
            QTimer.singleShot(0, self, self._check_shown)

    def _check_shown(self) -> None:
        path = self.current_layer
        if path is not None and self._unshown(path):
            self._clear_views(f"{path}: not shown, its decoding was cancelled or failed — select it again")
            self.tree.click_selects(path)

    def _unshown(self, path: str) -> bool:
        """``path`` is the layer selected, but its views are not shown nor being made (its
        decoding was cancelled or failed)."""
        return self.current_layer == path and self._shown_layer != path and "detail" not in self._busy_channels()

    def _busy_channels(self) -> set[str]:
        return {j.channel for j in self.service.running()}

    def _update_view(self, view, fn) -> None:
        """Update ``view`` now if its tab is showing, else when the tab is shown (only the latest
        update is kept): a layer's result then costs the GUI thread one view, not six."""
        page = self._page[view]
        if self.tabs.currentWidget() is page:
            self._pending.get(page, {}).pop(view, None)
            fn()
        else:
            self._pending.setdefault(page, {})[view] = fn

    def _apply_pending(self, index: int) -> None:
        for fn in self._pending.pop(self.tabs.widget(index), {}).values():
            fn()

    def _show_vectors(self, path: str) -> None:
        """A vector (a norm's weights, a bias): the values of each checkpoint's, on shared bins
        in the Values view, the other views saying they are for matrices. Norms are what AWQ-style
        smoothing divides: showing nothing ("not a weight matrix", twice) hid that."""
        why = f"{path} is a vector, not a weight matrix: its values are in the Values view"
        self._clear_views(why)
        self.service.cancel_channel("detail")  # (another layer's views must not land over these)
        ws = self.workspace
        vecs = {}
        shown = path  # (a vector of another name than weight: its tensor's, gpt-oss's …self_attn.sinks)
        for label, m in ([("reference", ws.reference)] if ws.reference is not None else []) + list(ws.variants.items()):
            lay = m.layers.get(path)
            t = None if lay is None else _vector_of(lay)
            if t is None:
                continue
            if not t.name.endswith(".weight") and shown == path:
                shown = t.name
            try:
                vecs[label] = np.asarray(m.ckpt.tensor(t.name), np.float64).ravel()
            except (QuantscopeError, ValueError, TypeError):
                continue  # (the doctor names what is wrong with it)
        if not vecs:
            return
        ref = vecs.get("reference")
        same = [k for k, v in vecs.items() if k != "reference" and ref is not None and np.array_equal(v, ref)]
        drawn = {k: v for k, v in vecs.items() if k not in same}
        edges, counts, view = jobs.shared_histogram(drawn, 64)
        colors = {**self.colors, "reference": REFERENCE_COLOR}
        nonfinite = {k: int(v.size - np.count_nonzero(np.isfinite(v))) for k, v in drawn.items()}
        absent = f"Not drawn, the same values as the reference's: {', '.join(same)}" if same else ""
        self._update_view(self.hist, lambda: self.hist.set_histograms(
            edges, counts, colors, note=f"{shown} · a vector of {max(v.size for v in vecs.values())} values",
            view=view, nonfinite={k: n for k, n in nonfinite.items() if n}, absent=absent))
        # (what is shown: the end of a layer's decoding cancelled above must not clear it, saying
        # "its decoding was cancelled")
        self._shown_layer = path

    def _clear_views(self, why: str) -> None:
        self._shown_layer = None
        for v in (self.hist, self.err_hist, self.scales, self.zeros):
            self._update_view(v, lambda v=v: v.set_histograms(None, {}, {}, note=why))
        self._update_view(self.codes, lambda: self.codes.set_counts({}, {}, empty_note=why))
        self._update_view(self.heatmap, lambda: self.heatmap.set_maps({}, empty_note=why))
        self._update_view(self.heads, lambda: self.heads.set_heads({}, {}, empty_note=why))

    def _no_partner_why(self, name: str, left_out: dict | None = None) -> str:
        """Why no open variant is measured on reference layer ``name``: theirs could not be
        decoded (``left_out``: the detail job's reasons by variant), none has it, or theirs have
        another shape (a reference of another model: said as such, not as a missing layer)."""
        ws = self.workspace
        if left_out:
            return " · ".join(f"{v}: not shown, {why}" for v, why in left_out.items())
        ref = ws.reference.layers[name]
        # a variant's layer of that name that cannot be decoded: its own reason (it was "no open
        # variant has this layer", or another shape "( in x)" blamed on the reference)
        broken = {lb: m.layers[name] for lb, m in ws.variants.items()
                  if name in m.layers and (m.layers[name].problem or not m.layers[name].decodable)}
        if broken:
            lb, lay = next(iter(broken.items()))
            more = f" (and {len(broken) - 1} more variant(s))" if len(broken) > 1 else ""
            return (f"{lb}'s layer cannot be decoded{more}: {lay.problem or f'scheme {lay.scheme!r}'} — Tools ▸ Run "
                    "doctor lists what is wrong with it")
        other = {lb: m.layers[name].shape for lb, m in ws.variants.items()
                 if name in m.layers and m.layers[name].shape != ref.shape}
        if not other:
            return "no open variant has this layer to measure against the reference"
        lb, shape = next(iter(other.items()))
        dims = "×".join(map(str, shape or ()))
        return (f"the variants' layer of that name has another shape ({dims} in {lb}, "
                f"{'×'.join(map(str, ref.shape or ()))} in the reference): is the reference another model?")

    def _show_detail(self, r: dict) -> None:
        d = r["detail"]
        ref_label = "reference"
        colors = dict(self.colors)
        colors[ref_label] = REFERENCE_COLOR
        upd = self._update_view
        # a variant without this layer (cannot be decoded, no partner) is said, not just missing
        absent = f"Not shown: {', '.join(d.left_out)} (the what-if box says why)" if d.left_out else ""
        # a variant whose AWQ-style smoothing is undone is shown (and measured) undone: said
        # (or the multiplier a converter folded into the weights: Falcon-H1's in mlx-lm's conversion)
        undone: dict[str, list] = {}
        for v, m in d.metrics.items():
            if m.smoothing != "none":
                undone.setdefault(smoothing_action(m.smoothing), []).append(v)
        tag = "".join(f" · {what}, as measured: {', '.join(vs)}" for what, vs in undone.items())
        upd(self.hist, lambda: self.hist.set_histograms(d.value_edges, d.value_counts, colors,
                                                        note=r["name"] + tag, view=d.value_view,
                                                        nonfinite=d.nonfinite, absent=absent))
        # no reference layer: nothing to measure the error against
        alone = d.error_edges is None and not d.exact_copies
        ws = self.workspace
        no_ref = f"{r['name']}: " + (
            "no reference to measure the error against (File ▸ Set reference… opens the original model)"
            if ws.reference is None else
            "no variant is open to measure against the reference (File ▸ Add variant… opens a quantized "
            "checkpoint)" if not ws.variants else
            self._no_partner_why(r["name"], d.left_out)
            if r["name"] in ws.reference.layers else
            "the reference has no layer of that name to measure the error against "
            "(a variant's own name: select the reference's layer it stands for)")
        zeros = ("exact zeros, not on a log axis: " + ", ".join(f"{k} {n:,}" for k, n in d.zero_errors.items())
                 if d.zero_errors else "")
        copies = ", ".join(d.exact_copies)
        err_note = (no_ref if alone else
                    f"{r['name']}: every variant stores this layer exactly as the reference does — every error is 0, "
                    "nothing to draw" if d.error_edges is None else r["name"] + tag)
        err_absent = ". ".join(p for p in (absent, f"Not drawn, every error 0 (stored as the reference stores it): "
                                                   f"{copies}" if copies and d.error_edges is not None else "") if p)
        upd(self.err_hist, lambda: self.err_hist.set_histograms(d.error_edges, d.error_counts, colors,
                                                                note=err_note,
                                                                view=d.error_view, nonfinite=d.nonfinite,
                                                                absent=err_absent, alt=(d.log_error_edges, d.log_error_counts,
                                                                                    d.log_error_view, zeros)))
        no_codes = [v for v in (d.value_counts if alone else d.metrics) if v not in d.code_counts]
        upd(self.codes, lambda: self.codes.set_counts(d.code_counts, colors, empty_note="No variant stores "
                                                       "codes for this layer (dense)",
                                                       absent=no_codes, float_codes=d.float_codes))
        upd(self.scales, lambda: self.scales.set_histograms(
            r["scale_edges"], r["scale_counts"], colors,
            note=("per-group scales" + (f" (|scale| of {', '.join(r['scale_abs'])}: MLX's are signed, the step "
                                        "is their size)" if r.get("scale_abs") else "")
                  if r["scale_counts"] else "No variant stores per-group scales for this layer"),
            view=r.get("scale_view"), nonfinite=r.get("scale_nonfinite")))
        no_zeros = [v for v in (d.value_counts if alone else d.metrics)
                    if v != "reference" and v not in r["zero_counts"]]
        upd(self.zeros, lambda: self.zeros.set_histograms(
            r["zero_edges"], r["zero_counts"], colors,
            # (the floor under log10(1) = 0 read as a count: said what it is)
            note=("integer zero points (a level no group uses: the line under 0)" if r["zero_counts"]
                  else "No variant stores integer zero points for this layer"),
            absent=(f"No integer zero points: {', '.join(no_zeros)} (symmetric or float formats store none; MLX's "
                    "biases are offsets in weight units)" if no_zeros and r["zero_counts"] else "")))
        # the group errors of the variant the tree shows, where it has a map (it started on the
        # first variant whatever the tree showed, an fp16 copy's rounding noise in full colour)
        shown = self.tree.current_label()
        upd(self.heatmap, lambda: self.heatmap.set_maps(r["maps"], empty_note=no_ref if alone else
                                                        "No variant quantizes this layer in groups",
                                                        by_index=r.get("by_index", ()), blocks=r.get("blocks", {}),
                                                        prefer=shown, layer=r["name"], heads=d.heads))
        ref_cfg = ws.reference.ckpt.configs.get("config.json") if ws.reference is not None else None
        no_heads = (no_ref if alone else f"{r['name']}: {no_heads_why(r['name'], ref_cfg)}" if d.heads is None else
                    f"{r['name']}: no variant is measured on this layer")
        upd(self.heads, lambda: self.heads.set_heads(d.head_error, colors, d.heads,
                                                     {k: m.rel_fro for k, m in d.metrics.items()},
                                                     layer=r["name"], empty_note=no_heads))
        self._shown_layer = d.name
        self._detail_errors = (d.name, d, no_ref if alone else None)
        self._refresh_result()
        self.detail_shown.emit(r["name"])

    def _result_text(self) -> str:
        """The what-if box for the layer shown: its what-if result, each variant's error (with what
        the last comparison found the quantization alone did, where the smoothing is inconsistent)
        and a conversion's summary, each only when it belongs to this layer."""
        name = self.current_layer
        parts = []
        if self._whatif_line is not None and self._whatif_line[0] == name:
            parts.append(self._whatif_line[1])
        if self._detail_errors is not None and self._detail_errors[0] == name:
            _, d, no_ref = self._detail_errors
            quant = self._quant_only

            def kept(v, m):  # a layer a quantized variant left unquantized, said as such (the tree, the
                # Layers plot and `compare` leave it out: "skipped by the variant"); a dense variant's
                # (converted to dense, a fine-tune) is no "copy": 0.32 was called one
                vm = self.workspace.variants.get(v)
                lay = None if vm is None else vm.layers.get(d.name)
                if lay is None or lay.quantized or not any(x.quantized for x in vm.layers.values()):
                    return ""
                return " — left unquantized by the variant" + (": an exact copy" if m.rel_fro == 0 else "")

            lines = [f"{v}: " + (f"rel_fro {m.rel_fro:.4f} ({m.sqnr_db:.1f} dB)" if math.isfinite(m.rel_fro) else
                                 "no figure (NaN or inf values in its decode or the reference, or a reference of zeros)")
                     + kept(v, m) + (
                f", raw {m.rel_fro_raw:.4f}, {smoothing_action(m.smoothing)} ({describe_smoothing(m.smoothing)})"
                if m.smoothing != "none" else "") + (
                f"; the quantization alone: {quant[(d.name, v)]:.4f}" if (d.name, v) in quant else "")
                for v, m in d.metrics.items()]
            lines += [f"{v}: not shown, {why}" for v, why in d.left_out.items()]
            # one line per variant (a ";"-joined line for six variants ran through a 3-line box)
            parts.append(no_ref or "Current error of each variant:\n" + "\n".join(lines))
        if self._convert_note is not None and self._convert_note[0] == name:
            parts.append("Last conversion: " + self._convert_note[1])
        return "\n\n".join(parts)

    def _refresh_result(self) -> None:
        self.config.set_whatif_result(self._result_text())

    # -- tools -----------------------------------------------------------------------------------

    def compare_all(self) -> None:
        self._compare(None)

    def compare_matching(self) -> None:
        """Tools ▸ Compare layers matching the search: only the reference layers whose names hold
        every term typed in the Tensors search (one decoder layer of a 70B model in seconds, where
        all of them take minutes); a later comparison of all reuses what this one measured."""
        query = self.tree.search.text().strip()
        if not query:
            self._show_error("Compare layers matching the search",
                             "Type in the Tensors search first (e.g. layers.3. or down_proj): the layers whose "
                             "names hold every term are compared.", "")
            self._focus_search()
            return
        self._compare(NameTerms(query))

    def _compare(self, only) -> None:
        ws = self.workspace
        title = "Compare all layers" if only is None else "Compare layers matching the search"
        if ws.reference is None or not ws.variants:
            self._show_error(title, _NEEDS_BOTH + (f" {self._needs_note()}" if self._open_errors else ""), "")
            return

        self._compared = (ws.reference, only)  # asked: a variant added meanwhile is compared with it

        def shown(result) -> None:
            self._show_sweep(result)
            if self.statusBar().currentMessage().startswith("Comparison cancelled"):  # (the run before's)
                self.statusBar().clearMessage()
                self.statusBar().setToolTip("")
            if only is not None:
                added = set(result.added)
                n = len({r.name for r in result.rows} - added)
                more = (f", and {len(added)} more whose rows AWQ-style smoothing is undone from: "
                        + ", ".join(sorted(added)) if added else "")
                self._status(f"Compared {n} layer{'s' if n != 1 else ''} matching the search “{only.pattern}”"
                             f"{more}. Compare all layers (Ctrl+Shift+C) measures the rest")

        self.service.submit("sweep", "Comparing all layers" if only is None else f"Comparing layers matching "
                            f"“{only.pattern}”", jobs.job_sweep, ws.reference, dict(ws.variants),
                            engine=self.engine, cache=self._sweep_cache, layers=only, on_result=shown, gated=True,
                            on_error=self._sweep_failed, on_cancel=lambda: self._status(
                                "Comparison cancelled: Tools ▸ Compare all layers (Ctrl+Shift+C) runs it again; "
                                "the layers measured so far are kept and not measured twice"))

    def compare_heads(self) -> None:
        """Tools ▸ Compare heads of every layer: each attention layer's error head by head, for
        every variant (the Heads tab's map)."""
        ws = self.workspace
        title = "Compare heads of every layer"
        if ws.reference is None or not ws.variants:
            self._show_error(title, _NEEDS_BOTH + (f" {self._needs_note()}" if self._open_errors else ""), "")
            return

        measured = (ws.reference, dict(ws.variants))

        def shown(rows) -> None:
            self._heads_measured = measured  # (what a later workspace keeps of the map)
            self.heads.map.set_rows(rows)
            self.tabs.setCurrentWidget(self.heads)
            n = len({r.name for r in rows})
            # (the layers of each tower: a vision tower's blocks are not the language model's layers)
            blocks = len({(t.split(".*.")[0], i) for t, i in (layer_template(r.name) for r in rows)})
            self._status(f"Measured the heads of {n} attention projection{'s' * (n != 1)} in {blocks} layer"
                         f"{'s' * (blocks != 1)}: the Heads tab's map; click a cell to select its layer" if rows else
                         "No attention layer was split into heads: the reference's config.json names no head counts "
                         "(num_attention_heads, head_dim), or no variant covers one")

        self.service.submit("heads", "Measuring every layer's heads", jobs.job_heads, ws.reference, dict(ws.variants),
                            engine=self.engine, on_result=shown, gated=True, on_error=self._job_failed,
                            on_cancel=lambda: self._status("Measuring heads cancelled: Tools ▸ Compare heads of "
                                                           "every layer (Ctrl+Shift+H) runs it again"))

    def _sweep_failed(self, message: str, details: str) -> None:
        """A comparison that compared nothing (no variant has a layer that can be): said where its
        results would be, not only in the error box and the status bar (the view still said "Tools ▸
        Compare all layers measures…"). A comparison shown already stays: a search that matches
        nothing emptied the view while the tree kept its errors and Export wrote them."""
        if self.sweep_result is None:
            self.layers.set_rows([], dict(self.colors), empty_note=f"Nothing compared: {message}")
            self.tabs.setCurrentWidget(self.layers)
        self._job_failed(message, details)

    def _show_sweep(self, result) -> None:
        self.sweep_result = result
        self._quant_only = {(q.name, q.variant): q.rel_fro_quant for q in result.rows
                            if q.rel_fro_quant is not None and math.isfinite(q.rel_fro_quant)}
        self._refresh_result()  # the layer shown: what the comparison found the quantization alone did
        per, notes = errors_and_notes(result.rows, self._quant_only)
        colors = dict(self.colors)
        # In turns, each repainted before the next: the tab, the per-layer plot, its heatmap,
        # the tree's error columns.
        self._in_turns("sweep", [lambda: self.tabs.setCurrentWidget(self.layers),
                                 lambda: (self.layers.set_reference_nonfinite(result.reference_nonfinite),
                                          self.layers.set_rows(result.rows, colors, heatmap=False)),
                                 lambda: self.layers.set_warnings(_with_implausible(result)),
                                 lambda: self.doctor.set_compare_note(self._compare_note(self.tree.current_label())),
                                 self.layers.redraw_heatmap,
                                 lambda: self.tree.model.set_all_errors(per, notes),
                                 self._to_worst_expert,
                                 self.sweep_done.emit])

    def _to_worst_expert(self) -> None:
        """A stack selected before the comparison showed expert 0 ("once compared: the worst
        expert"): now compared, its worst expert, as the tree's cell says (the views stayed on
        expert 0). An expert picked in the expert box stays."""
        stack = self.tree.current_path()
        if stack is None or stack == self.current_layer or not self._expert_auto:
            return
        stands = self._reference_layer_for(stack)
        if stands is not None and stands[0] != self.current_layer and EXPERT_RE.match(stands[0]):
            self.select_layer(stack)

    def run_doctor(self, path: str | None = None) -> None:
        """The doctor on the checkpoint the tree shows; on ``path`` when given, or when none is
        open, on the one that could not be opened (when it is most needed)."""
        label = self.tree.current_label()
        m = self.workspace.models().get(label)
        if path is None and m is None:
            if not self._unopened:
                return
            path = self._unopened[0]  # the one the error named
        if path is not None:
            label, source, m = Path(path).name, path, None
            for lb, mm in self.workspace.models().items():  # a folder chosen that is open after all:
                if Path(mm.ckpt.source).resolve() == Path(path).resolve():  # shown in the tree, linked
                    label, source, m = lb, mm.ckpt.source, mm
                    self.tree.combo.setCurrentText(lb)
        else:
            source = m.ckpt.source
        self.doctor_dock.raise_()

        def show(findings):
            if m is None:  # a checkpoint not in the tree: its findings stand until another is shown
                self.doctor.set_findings(label, findings, linked=False)
            else:
                self._doctor_found[label] = findings
                if self.tree.current_label() == label:  # the user may have switched meanwhile
                    self.doctor.set_findings(label, findings)
                    self.tree.model.set_findings(_worst_per_layer(findings))
            self.doctor_done.emit()

        self.service.submit("doctor", f"Doctor: {label}", jobs.job_doctor, source, on_result=show,
                            on_error=self._job_failed, gated=True)

    def doctor_dialog(self) -> None:
        """Tools ▸ Doctor on a checkpoint folder…: any checkpoint, open or not (one that fails to open)."""
        start = self._unopened[0] if self._unopened else ""
        path = QFileDialog.getExistingDirectory(self, "Doctor on a checkpoint folder", start)
        if path:
            self.run_doctor(path)

    def run_whatif(self, bits: int, group: int, mode: str) -> None:
        ws = self.workspace
        if self.current_layer is None or ws.reference is None or (
                self.current_layer not in ws.reference.layers and expert_of_stack(self.current_layer, ws.reference) is None):
            why = ("Select a layer first." if self.current_layer is None else
                   "The what-if requantizes the reference's layer: open a reference (File ▸ Set reference…)."
                   if ws.reference is None else "The reference has no layer of that name to requantize.")
            self.config.set_whatif_result(why + ("\n\n" + self._result_text() if self._result_text() else ""))
            return

        def show(r):
            if r["name"] != self.current_layer:  # another layer is selected by now: its figures stand
                return
            line = (f"What-if {r['mode']} {r['bits']} bit / {r['group_size']}: rel_fro {r['rel_fro']:.4f} "
                    f"({r['sqnr_db']:.1f} dB)")
            self._whatif_line = (r["name"], line)
            self._refresh_result()

        name = self.current_layer

        def failed(message: str, details: str) -> None:
            # said in the what-if box, beside the figures it would have joined (the status bar
            # alone kept it after another layer's what-if had succeeded)
            _logger.info("what-if: %s", message)
            if name == self.current_layer:
                self._whatif_line = (name, f"What-if {mode} {bits} bit / {group} failed: {message}")
                self._refresh_result()

        self.service.submit("whatif", "Requantizing (what-if)", jobs.job_whatif, self.workspace.reference,
                            name, bits, group, mode, on_result=show, on_error=failed, gated=True)

    def convert_dialog(self) -> None:
        from quantscope.widgets.convert_dialog import ConvertDialog
        sources = {label: m.ckpt.source for label, m in self.workspace.models().items()}
        if not sources:
            return
        dense = {label for label, m in self.workspace.models().items()
                 if not any(lay.quantized for lay in m.layers.values())}
        dlg = ConvertDialog(sources, self.tree.current_label(), self, dense=dense)
        if dlg.exec() == ConvertDialog.DialogCode.Accepted:
            self.run_convert(dlg.options())

    def run_convert(self, options: dict) -> None:
        """Convert on a worker thread; the result opens as a new variant with its error."""
        opts = dict(options)
        src, dst = opts.pop("src"), opts.pop("dst")
        if not self._may_write(dst):  # (inside another open checkpoint's folder: written there)
            return

        def done(report) -> None:
            from quantscope.backend.convert import summary_lines
            text = "\n".join(summary_lines(report, table=False))
            self._status(f"Converted to {dst}")
            # under the errors of the layer shown (until another is selected), the result beside them
            self._convert_note = (self.current_layer, text)
            self._refresh_result()
            self.add_paths([dst])
            self.convert_done.emit(report)

        # a channel of its own: a second conversion cancelled the first, without a word
        self.service.submit(f"convert:{next(self._job_ids)}", f"Converting to {Path(dst).name}", jobs.job_convert,
                            src, dst, opts, engine=self.engine, on_result=done, on_error=self._job_failed, gated=True)

    # -- export ----------------------------------------------------------------------------------

    def export_metrics(self, kind: str) -> None:
        if self.sweep_result is None:
            self._show_error("Export", "Run “Compare all layers” first.", "")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export metrics", f"quantscope-metrics.{kind}")
        if not path or not self._may_write(path):
            return
        from quantscope.backend.outfile import atomic_output, printable
        # variants named by path, as `quantscope compare` writes them (design.md), not by the
        # window's short labels
        result = self.sweep_result.relabelled(self._variant_paths())
        try:
            if kind == "csv":
                result.to_csv(path)
            else:
                # what it was measured against, as `quantscope compare --json` writes it
                ref, measured = self.workspace.reference, {r.variant for r in result.rows}
                data = {"quantscope_version": __version__, "reference": None if ref is None else str(ref.ckpt.source),
                        "variants": [v for v in (str(m.ckpt.source) for m in self.workspace.variants.values())
                                     if v in measured],
                        **result.to_json()}
                heads = self._heads_by_path()
                if heads:  # (measured: as `compare --heads` adds them)
                    data["heads"] = [h.to_json() for h in heads]
                with atomic_output(path) as fh:
                    json.dump(printable(data), fh, indent=1)
        except QuantscopeError as e:  # names the file; nothing half-written is left
            self._show_error("Export", str(e), "")
            return
        self._status(f"Saved {path}")

    def _variant_paths(self) -> dict[str, str]:
        """Each variant's label → its path, as `quantscope compare` names variants (design.md)."""
        return {lb: str(m.ckpt.source) for lb, m in self.workspace.variants.items()}

    def _heads_by_path(self) -> list:
        """The heads map's rows, each variant named by its path (as `compare` names it)."""
        paths = self._variant_paths()
        return [dataclasses.replace(r, variant=paths.get(r.variant, r.variant)) for r in self.heads.map.rows()]

    def export_heads(self, path: str | None = None) -> None:
        """File ▸ Export ▸ Heads as CSV: the heads map's figures, a line per (layer, variant,
        head), as `quantscope compare --heads-csv` writes them."""
        rows = self._heads_by_path()
        if not rows:
            self._show_error("Export", "Run “Compare heads of every layer” (Tools, Ctrl+Shift+H) first.", "")
            return
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, "Export heads", "quantscope-heads.csv")
        if not path or not self._may_write(path):
            return
        from quantscope.backend.compare import heads_to_csv
        try:
            heads_to_csv(rows, path)
        except (QuantscopeError, OSError) as e:
            self._show_error("Export", str(e), "")
            return
        self._status(f"Saved {path}")

    def _may_write(self, path: str) -> bool:
        """False (and says why) when ``path`` lies in a checkpoint the window has open."""
        try:
            refuse_writing_into(path, self.workspace.models().values())
        except QuantscopeError as e:
            self._show_error("Export", str(e), "")
            return False
        return True

    def page_named(self, short: str):
        """The tab page whose short name (``Values``, ``Heads``, …) is ``short``, any case."""
        for i, (_, name) in enumerate(self._tab_names):
            if name.lower() == short.lower():
                return self.tabs.widget(i)
        raise KeyError(short)

    def export_plot(self, kind: str, path: str | None = None) -> None:
        """The current tab's figure (legend, plots and notes, under a title naming the view and
        the layer) as PNG or SVG."""
        page = self.tabs.currentWidget()
        views = [self.scales, self.zeros] if page is self._page[self.scales] else [page]
        parts = [p for v in views for p in (v.figure_parts() if hasattr(v, "figure_parts") else [v])]
        name = self.tabs.tabToolTip(self.tabs.currentIndex())  # (its full name, whatever the tab shows)
        if page is self.heatmap:
            name = f"Group error of {self.heatmap.variant.currentText()}"
        elif page is self.layers:
            name = "Error by layer"
        elif page is self.heads:
            name = "Error by head"
        ref = self.workspace.reference_label
        title = f"{name} — {self.current_layer}" if page is not self.layers and self.current_layer else name
        if ref:
            title += f" (against {ref})"
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, "Export plot", f"quantscope-plot.{kind}")
            if not path:
                return
        if not self._may_write(path):
            return
        try:
            render_figure(parts, title, path, kind)
        except OSError as e:
            self._show_error("Export", str(e), "")
            return
        self._status(f"Saved {path}")

    def _ask_npy(self, default: str) -> str | None:
        path, _ = QFileDialog.getSaveFileName(self, "Save as .npy", default, "NumPy arrays (*.npy)")
        return path or None

    def export_dequant(self, path: str | None) -> None:
        label = self.tree.current_label()
        m = self.workspace.models().get(label)
        if not path or m is None:
            return
        expert = None
        if path not in m.layers:  # the layer shown is the reference's name: this checkpoint's module
            try:
                stacked = stacked_expert(path, m) or stacked_expert(canonical(path), m)
            except QuantscopeError as exc:
                self._show_error("Export", f"{label}: {exc}", "")
                return
            hit = (stacked[0].path, "") if stacked is not None else counterpart(path, m)
            if hit is None:
                self._show_error("Export", f"{label} has no layer {path}", "")
                return
            if stacked is not None:
                expert = stacked[1]  # that expert's slice of the stack, as the views show it
                self._status(f"Exporting expert {expert} of {hit[0]}")
            else:
                self._status(f"Exporting the whole of {hit[0]} ({hit[1]})")
            path = hit[0]
        out = self._ask_npy(f"{path}.npy" if expert is None else f"{path}.{expert}.npy")
        if out and self._may_write(out):
            self.service.submit(f"export:{next(self._job_ids)}", f"Exporting {path}", jobs.job_export_dequant, m,
                                path, out, expert=expert, engine=self.engine, gated=True,
                                on_result=lambda _: self._status(f"Saved {out}"), on_error=self._job_failed)

    def export_tensor(self, tensor: str) -> None:
        m = self.workspace.models().get(self.tree.current_label())
        out = self._ask_npy(f"{tensor}.npy") if m else None
        if out and self._may_write(out):
            self.service.submit(f"export:{next(self._job_ids)}", f"Exporting {tensor}", jobs.job_export_tensor, m,
                                tensor, out, on_result=lambda _: self._status(f"Saved {out}"),
                                on_error=self._job_failed)

    # -- files -----------------------------------------------------------------------------------

    def add_variant_dialog(self, folder: bool = False) -> None:
        if folder:
            p = QFileDialog.getExistingDirectory(self, "Add variant folder")
            paths = [p] if p else []
        else:
            paths, _ = QFileDialog.getOpenFileNames(self, "Add variant", "", "safetensors (*.safetensors *.json)")
        if paths:
            self.add_paths(paths)

    def set_reference_dialog(self) -> None:
        p = QFileDialog.getExistingDirectory(self, "Reference checkpoint folder")
        if p:
            self.add_paths([p], as_reference=True)

    def open_hf_cache_dialog(self) -> None:
        from quantscope.backend.checkpoint import list_hf_cache_models
        models = list_hf_cache_models()
        if not models:
            QMessageBox.information(self, "Hugging Face cache", "No models with safetensors files in the local cache.")
            return
        item, ok = QInputDialog.getItem(self, "Open from Hugging Face cache", "Model:",
                                        [m["repo_id"] for m in models], 0, False)
        if ok and item:
            self.add_paths([item])

    def _remember_opened(self, paths: list[str], failed: list[tuple[str, str]]) -> None:
        """Each of ``paths`` that opened (not among a load's ``failed``) into Open recent."""
        bad = {f for f, _ in failed}
        for p in paths:
            if p not in bad:
                self._remember(p)

    def _remember(self, path: str) -> None:
        recent = [p for p in (self.settings.value("recent", []) or []) if p != path]
        self.settings.setValue("recent", ([path] + recent)[:MAX_RECENT])
        self._refresh_recent()

    def _refresh_recent(self) -> None:
        self.recent_menu.clear()
        recent = self.settings.value("recent", []) or []
        if isinstance(recent, str):
            recent = [recent]
        for p in recent:
            self.recent_menu.addAction(p, lambda p=p: self.add_paths([p]))
        self.recent_menu.setEnabled(bool(recent))

    def dragEnterEvent(self, ev) -> None:  # noqa: N802 - Qt's name
        if ev.mimeData().hasUrls():
            ev.acceptProposedAction()

    def dropEvent(self, ev) -> None:  # noqa: N802 - Qt's name
        paths = [u.toLocalFile() for u in ev.mimeData().urls() if u.isLocalFile()]
        if paths:
            self.add_paths(paths)

    def _focus_search(self) -> None:
        self.tree_dock.raise_()
        self.tree.search.setFocus()
        self.tree.search.selectAll()

    # -- errors and shutdown ---------------------------------------------------------------------

    def _status(self, message: str) -> None:
        """A message for 15 s on the status bar's left, cut with "…" to the room beside the jobs
        strip (it was cut mid-word), whole in the bar's tooltip."""
        bar = self.statusBar()
        # up to where the jobs strip begins (its left edge, once laid out), less the bar's margins
        left = self.jobs_bar.x() if self.jobs_bar.x() > 0 else bar.width() - self.jobs_bar.width() - 24
        room = left - 16
        bar.showMessage(bar.fontMetrics().elidedText(message, Qt.TextElideMode.ElideRight, max(80, room)), 15000)
        bar.setToolTip(message)

    def _job_failed(self, message: str, details: str) -> None:
        self._show_error("quantscope", message, details)

    def _show_error(self, title: str, message: str, details: str) -> None:
        self.failed.emit(message)
        self._status(message)
        if QApplication.platformName() in ("offscreen", "minimal") or getattr(self, "quiet_errors", False):
            _logger.info("%s: %s", title, message)  # the screenshot run prints its errors once, at the end
            return
        box = QMessageBox(QMessageBox.Icon.Warning, title, message, parent=self)
        if details:
            box.setDetailedText(details)
        box.open()

    def closeEvent(self, ev) -> None:  # noqa: N802 - Qt's name
        if not getattr(self, "quiet_errors", False):  # screenshot/test runs leave the layout alone
            self.settings.setValue("window/geometry", self.saveGeometry())
            self.settings.setValue("window/state", self.saveState())
        self.service.shutdown()
        super().closeEvent(ev)


def _with_implausible(result) -> dict[str, tuple[str, str]]:
    """The sweep's warnings per variant, with its layers of implausible error (rel_fro >= 0.99:
    the decode holds next to nothing of the reference; `compare` exits 1 on them): broken or
    mislabelled scales, whose figures (rel. error 5e6, 1.0 for zeroed scales) were plotted and
    coloured without a word."""
    out = dict(result.warnings())
    odd: dict[str, list] = {}
    for r in result.implausible():
        odd.setdefault(r.variant, []).append(r)
    for v, rows in odd.items():
        worst = max(rows, key=lambda r: r.rel_fro)
        short = (f"implausible error in {len(rows)} layer(s), up to {worst.rel_fro:.4g} ({worst.name}): broken or "
                 "mislabelled scales? Tools ▸ Run doctor checks them")
        full = (f"{len(rows)} layer(s) whose decode holds next to nothing of the reference (rel_fro >= 0.99; all "
                "zeros give 1): " + ", ".join(f"{r.name} ({r.rel_fro:.4g})" for r in rows[:8])
                + (" …" if len(rows) > 8 else "") + ". No quantization does that at any bit width: the layer's "
                "scales are broken or mislabelled, and its figures are of a misread file.")
        out[v] = (f"{out[v][0]}; {short}", f"{out[v][1]}\n{full}") if v in out else (short, full)
    return out
