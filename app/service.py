"""The one object that runs backend work off the GUI thread.

* A ``QThreadPool``; each job is a ``QRunnable`` kept strongly referenced until delivered.
* A *channel* per kind of request ("detail", "sweep", "doctor", …): a new request cancels the
  previous one on its channel (queued jobs are taken back with ``tryTake``; running ones see their
  cancel token) and any late result of the old one is dropped.
* Results, errors and progress (throttled to ~10/s) reach the GUI thread through signals of an
  object living there; callbacks therefore run on the GUI thread.
* A *gating* job (compiling the kernels on a first run) holds back the *gated* ones (those that
  decode or measure) until it ends, however it ends: they are listed as started but wait
  unscheduled, so the lighter jobs (opening files) still get the pool's threads meanwhile.
* ``shutdown()`` on ``aboutToQuit`` cancels everything and waits.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from PySide6.QtCore import QObject, QRunnable, QThreadPool, Signal, Slot

from quantscope.backend.errors import Cancelled, QuantscopeError
from quantscope.backend.formats.kernel import lower_thread_priority

_logger = logging.getLogger(__name__)


@dataclass
class Job:
    """A submitted piece of work. ``cancel`` is the token handed to the backend."""

    id: int
    channel: str
    title: str
    cancel: threading.Event = field(default_factory=threading.Event)
    progress: float = 0.0
    on_result: Callable[[Any], None] | None = None
    on_error: Callable[[str, str], None] | None = None
    #: called when the job is cancelled (Esc, Cancel all), not when a newer one on its channel
    #: replaces it
    on_cancel: Callable[[], None] | None = None
    runnable: Any = None


class _Bridge(QObject):
    """Lives in the GUI thread; worker threads emit, the GUI thread receives (queued)."""

    finished = Signal(int, object)
    failed = Signal(int, str, str, bool)
    progressed = Signal(int, float, str)


class _Runnable(QRunnable):
    def __init__(self, job: Job, fn, args, kwargs, bridge: _Bridge) -> None:
        super().__init__()
        self.setAutoDelete(False)  # the service owns it until the result is delivered
        self.job, self.fn, self.args, self.kwargs, self.bridge = job, fn, args, kwargs, bridge

    def run(self) -> None:
        lower_thread_priority()  # the GUI thread must win the CPU on a busy machine
        job = self.job
        last = [0.0]

        def progress(fraction: float) -> None:
            job.progress = float(fraction)
            now = time.monotonic()
            if now - last[0] >= 0.1 or fraction >= 1.0:
                last[0] = now
                # (a sweep's progress also says its layers and bytes: SweepProgress.text)
                text = fraction.text() if hasattr(fraction, "text") else ""
                self.bridge.progressed.emit(job.id, float(fraction), text)

        try:
            if job.cancel.is_set():
                raise Cancelled()
            kwargs = dict(self.kwargs)
            kwargs.setdefault("cancel", job.cancel)
            kwargs.setdefault("progress", progress)
            result = self.fn(*self.args, **kwargs)
        except Cancelled:
            self.bridge.failed.emit(job.id, "cancelled", "", True)
        except QuantscopeError as exc:  # bad input, said in words: its traceback is for the log only
            _logger.info("job %s: %s", job.title, exc, exc_info=True)
            self.bridge.failed.emit(job.id, str(exc), "", False)
        except Exception as exc:  # a bug must never take the window down
            _logger.exception("job %s failed", job.title)
            self.bridge.failed.emit(job.id, f"{type(exc).__name__}: {exc}", traceback.format_exc(), False)
        else:
            self.bridge.finished.emit(job.id, result)


class JobService(QObject):
    """Runs functions on a thread pool; see the module docstring.

    Functions receive ``cancel`` and ``progress`` keyword arguments unless the caller passes
    ``pass_tokens=False``.
    """

    job_started = Signal(int, str)
    job_progress = Signal(int, float, str)
    job_done = Signal(int)
    error = Signal(str, str, str)  # title, message, details
    idle = Signal()

    def __init__(self, parent: QObject | None = None, max_threads: int | None = None) -> None:
        super().__init__(parent)
        self._pool = QThreadPool(self)
        if max_threads:
            self._pool.setMaxThreadCount(max_threads)
        self._bridge = _Bridge(self)
        self._bridge.finished.connect(self._on_finished)
        self._bridge.failed.connect(self._on_failed)
        self._bridge.progressed.connect(self._on_progress)
        self._ids = itertools.count(1)
        self._jobs: dict[int, Job] = {}
        self._latest: dict[str, int] = {}
        self._closed = False
        self._gates: set[int] = set()  # gating jobs not ended
        self._parked: dict[int, Job] = {}  # gated jobs waiting for them, by id

    # -- API -------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether :meth:`shutdown` ran (no job is taken after it)."""
        return self._closed

    def submit(self, channel: str, title: str, fn: Callable, *args, on_result=None, on_error=None,
               on_cancel=None, pass_tokens: bool = True, gating: bool = False, gated: bool = False,
               **kwargs) -> Job:
        """Run ``fn(*args, **kwargs)`` off the GUI thread; a newer job on ``channel`` supersedes it.
        ``gated``: start only once no ``gating`` job is left (see the module docstring)."""
        if self._closed:
            raise RuntimeError("service is shut down")
        self.cancel_channel(channel)
        job = Job(next(self._ids), channel, title, on_result=on_result, on_error=on_error, on_cancel=on_cancel)
        if not pass_tokens:
            f = fn

            def fn(*a, cancel=None, progress=None, **kw):  # noqa: F811 - wraps the plain function
                return f(*a, **kw)
        job.runnable = _Runnable(job, fn, args, kwargs, self._bridge)
        self._jobs[job.id] = job
        self._latest[channel] = job.id
        if gating:
            self._gates.add(job.id)
        if gated and self._gates:
            self._parked[job.id] = job
        self.job_started.emit(job.id, title)  # (after: a listener may ask whether it waits)
        if job.id not in self._parked:
            self._pool.start(job.runnable)
        return job

    def cancel_channel(self, channel: str) -> None:
        old = self._latest.pop(channel, None)
        if old is not None and old in self._jobs:
            self.cancel(old)

    def cancel(self, job_id: int) -> None:
        job = self._jobs.get(job_id)
        if job is None:
            return
        job.cancel.set()
        # never started (waiting for a gate, or queued in the pool): finish it here
        if self._parked.pop(job.id, None) is not None or self._pool.tryTake(job.runnable):
            replaced = self._latest.get(job.channel) != job.id
            self._forget(job)
            if not replaced and job.on_cancel is not None:
                job.on_cancel()

    def cancel_all(self) -> None:
        for jid in list(self._jobs):
            self.cancel(jid)

    def running(self) -> list[Job]:
        return list(self._jobs.values())

    def is_waiting(self, job_id: int) -> bool:
        """Whether the job is gated and still waiting for its gate (not started)."""
        return job_id in self._parked

    def is_idle(self) -> bool:
        return not self._jobs

    def shutdown(self, timeout_ms: int = 10_000) -> None:
        """Cancel every job and wait for the pool (call on aboutToQuit)."""
        self._closed = True
        self.cancel_all()
        self._pool.waitForDone(timeout_ms)
        self._jobs.clear()

    # -- delivery (GUI thread) -----------------------------------------------------------------

    def _forget(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        if self._latest.get(job.channel) == job.id:
            del self._latest[job.channel]
        self._gates.discard(job.id)
        if not self._gates and self._parked and not self._closed:  # the last gate ended: they start
            parked, self._parked = self._parked, {}
            for p in parked.values():
                self._pool.start(p.runnable)
        self.job_done.emit(job.id)
        if not self._jobs:
            self.idle.emit()

    def _stale(self, job: Job) -> bool:
        return job.cancel.is_set() or self._latest.get(job.channel) != job.id

    @Slot(int, object)
    def _on_finished(self, job_id: int, result) -> None:
        job = self._jobs.get(job_id)
        if job is None:
            return
        stale = self._stale(job)
        replaced = self._latest.get(job.channel) != job.id
        self._forget(job)
        if not stale and job.on_result is not None:
            job.on_result(result)
        elif job.cancel.is_set() and not replaced and job.on_cancel is not None:
            # cancelled as it finished: its result is dropped (a cancel that follows a change of
            # checkpoints must not let it land), and said as cancelled: it went without a word
            job.on_cancel()

    @Slot(int, str, str, bool)
    def _on_failed(self, job_id: int, message: str, details: str, cancelled: bool) -> None:
        job = self._jobs.get(job_id)
        if job is None:
            return
        stale = self._stale(job)
        replaced = self._latest.get(job.channel) != job.id
        self._forget(job)
        if cancelled and not replaced and job.on_cancel is not None:
            job.on_cancel()
        if cancelled or stale:
            return
        if job.on_error is not None:
            job.on_error(message, details)
        else:
            self.error.emit(job.title, message, details)

    @Slot(int, float, str)
    def _on_progress(self, job_id: int, fraction: float, text: str) -> None:
        if job_id in self._jobs:
            self.job_progress.emit(job_id, fraction, text)
