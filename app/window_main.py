"""Start the window: ``quantscope [PATH ...] [--reference REF] [--select LAYER] [--compare]
[--heads] [--tab VIEW] [--screenshot FILE]``. With ``--screenshot`` the script runs, waits for every job, saves a PNG of
the whole window and exits (non-zero with a message if anything failed)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from quantscope.backend.errors import QuantscopeError


def _quiet_offscreen_notes() -> None:
    """Drop the offscreen platform's note that it "does not support propagateSizeHints()": a
    screenshot run printed it on stderr one to four times, success or not, and scripts that take
    stderr for errors tripped on it. Every other Qt message goes on as before."""
    from PySide6.QtCore import qInstallMessageHandler
    previous = None

    def handler(kind, context, message):
        if "propagateSizeHints" in message:
            return
        if previous is not None:
            previous(kind, context, message)
        else:
            sys.stderr.write(message + "\n")

    previous = qInstallMessageHandler(handler)


def app_icon():
    """The window's icon, ``resources/quantscope.svg`` (a QIcon; empty where the file is missing)."""
    from PySide6.QtGui import QIcon
    path = Path(__file__).resolve().parent.parent / "resources" / "quantscope.svg"
    return QIcon(str(path)) if path.is_file() else QIcon()


def _app():
    from PySide6.QtWidgets import QApplication
    app = QApplication.instance()
    if app is None:
        app = QApplication([sys.argv[0]])
        app.setApplicationName("quantscope")
        app.setOrganizationName("quantscope")
        app.setWindowIcon(app_icon())
    import pyqtgraph as pg
    from PySide6.QtGui import QPalette
    pal = app.palette()
    pg.setConfigOptions(background=pal.color(QPalette.ColorRole.Base), foreground=pal.color(QPalette.ColorRole.Text),
                        antialias=True)
    return app


class Script:
    """Runs the command-line steps in order, each after the previous one's job finished."""

    def __init__(self, win, args, app) -> None:
        self.win, self.args, self.app = win, args, app
        self.errors: list[str] = []
        self.steps = []
        if args.select:
            self.steps.append(self._select)
        if args.compare:
            self.steps.append(self._compare)
        if getattr(args, "heads", False):
            self.steps.append(self.win.compare_heads)
        win.failed.connect(self._failed)
        self._loaded = False
        self._finishing = False

    def start(self) -> None:
        self.win.workspace_loaded.connect(self._on_loaded)
        self.win.open_workspace(self.args.paths, self.args.reference)

    def _on_loaded(self) -> None:
        self._loaded = True
        self._next_when_idle()

    def _failed(self, message: str) -> None:
        self.errors.append(message)
        # A workspace none of whose checkpoints opened never reports "loaded": finish once the
        # jobs are done and it still has not. One that failed among others is already set (they
        # are open) and reports "loaded" in a later turn: the steps go on from there, and the
        # exit status is 2 all the same.
        if not self._loaded and self.args.screenshot and not self.win.workspace.models():
            from PySide6.QtCore import QTimer
            QTimer.singleShot(0, self._finish_unless_loaded)

    def _finish_unless_loaded(self) -> None:
        svc = self.win.service
        if self._loaded or self._finishing:
            return
        if not svc.is_idle() or self.win.turns_pending():
            from PySide6.QtCore import QTimer
            QTimer.singleShot(20, self._finish_unless_loaded)
            return
        self._finish()

    def _next_when_idle(self) -> None:
        from PySide6.QtCore import QTimer
        svc = self.win.service
        if not svc.is_idle():
            svc.idle.connect(self._on_idle)
            return
        QTimer.singleShot(0, self._advance)

    def _on_idle(self) -> None:
        self.win.service.idle.disconnect(self._on_idle)
        from PySide6.QtCore import QTimer
        QTimer.singleShot(0, self._advance)

    def _advance(self) -> None:
        if self.win.turns_pending():  # a result is still being shown, step by step
            from PySide6.QtCore import QTimer
            QTimer.singleShot(10, self._advance)
            return
        if self.steps:
            step = self.steps.pop(0)
            step()
            return self._next_when_idle()
        if getattr(self.args, "tab", None):
            self.win.tabs.setCurrentWidget(self.win.page_named(self.args.tab))
        if self.args.screenshot:
            self._finish()

    def _select(self) -> None:
        from quantscope.backend.compare_align import stacked_expert
        from quantscope.backend.errors import QuantscopeError
        layer = self.args.select
        models = self.win.workspace.models()

        def holds(m) -> bool:  # the layer, or an expert of a stack it holds (…experts.2.gate_up_proj)
            if layer in m.layers:
                return True
            try:
                return stacked_expert(layer, m) is not None
            except QuantscopeError:  # (the stack has fewer experts)
                return False

        if not any(holds(m) for m in models.values()):
            self.errors.append(f"--select: no layer {layer!r} in the opened checkpoints")
            return
        self.win.select_layer_everywhere(layer)

    def _compare(self) -> None:
        self.win.compare_all()

    def _finish(self) -> None:
        from PySide6.QtCore import QTimer
        if self._finishing:
            return
        self._finishing = True
        if self.args.select and self._loaded and not getattr(self.args, "tab", None):
            self.win.tabs.setCurrentWidget(self.win.heads if getattr(self.args, "heads", False) else
                                           self.win.layers if self.args.compare else self.win.hist)
        self.app.processEvents()
        QTimer.singleShot(50, self._save)

    def _save(self) -> None:
        code = 0
        if self.errors:  # bad input: exit 2, as every command gives it
            print("quantscope: error: " + "; ".join(self.errors), file=sys.stderr)
            code = 2
        from quantscope.backend.checkpoint import refuse_writing_into
        try:  # never into a checkpoint it opened (as -o, --json and --csv)
            refuse_writing_into(self.args.screenshot, list(self.win.workspace.models().values()))
        except QuantscopeError as exc:
            print(f"quantscope: error: {exc}", file=sys.stderr)
            self.app.exit(2)
            return
        ok = self.win.grab().save(self.args.screenshot)
        if not ok:
            print(f"quantscope: error: could not write {self.args.screenshot}", file=sys.stderr)
            code = 2
        elif code == 0:
            print(f"screenshot saved to {self.args.screenshot}")
        self.app.exit(code)


def run_window(args) -> int:
    """Open the window (the demo workspace when no path is given)."""
    headless = (sys.platform.startswith("linux") and not os.environ.get("DISPLAY")
                and not os.environ.get("WAYLAND_DISPLAY"))
    if args.screenshot and headless and not os.environ.get("QT_QPA_PLATFORM"):  # (unset or empty: Qt's default)
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        _quiet_offscreen_notes()
    elif headless and not os.environ.get("QT_QPA_PLATFORM"):
        # Qt would print its plugin help and abort the process (SIGABRT)
        raise QuantscopeError("no display to open the window on (DISPLAY is not set): run it on a desktop, "
                              "or save a picture with --screenshot FILE; the command-line tools (info, "
                              "compare, doctor, …) need none")
    from PySide6.QtCore import QSettings

    from .main_window import MainWindow

    app = _app()
    settings = QSettings()
    # A screenshot must not depend on (or change) the user's saved window layout.
    win = MainWindow(settings, restore=not args.screenshot)
    win.quiet_errors = bool(args.screenshot)
    app.aboutToQuit.connect(win.service.shutdown)
    if not settings.value("window/geometry"):
        win.resize(1280, 800)
    if args.screenshot:
        win.resize(1600, 1000)
    win.show()
    script = Script(win, args, app)
    script.start()
    code = app.exec()
    if args.screenshot:
        win.service.shutdown()
    else:
        win.close()
    return code
