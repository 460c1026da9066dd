"""JobService: results on the GUI thread, latest request wins, cancellation, errors, shutdown."""

import threading
import time

import numpy as np
import pytest

from quantscope.app.service import JobService
from quantscope.backend.errors import Cancelled, QuantscopeError


@pytest.fixture
def service(qtbot):
    s = JobService()
    yield s
    s.shutdown()
    assert s.is_idle()


def test_result_delivered_on_gui_thread(service, qtbot):
    got = []
    main = threading.get_ident()
    service.submit("a", "t", lambda x, cancel, progress: (threading.get_ident(), x * 2),
                   21, on_result=lambda r: got.append((threading.get_ident(), r)))
    qtbot.waitUntil(lambda: bool(got), timeout=5000)
    (gui_tid, (worker_tid, value)), = got
    assert value == 42 and gui_tid == main and worker_tid != main


def test_new_request_on_a_channel_drops_the_stale_result(service, qtbot):
    got = []
    gate = threading.Event()

    def slow(tag, cancel, progress):
        gate.wait(5)
        return tag

    service.submit("detail", "old", slow, "old", on_result=got.append)
    service.submit("detail", "new", slow, "new", on_result=got.append)
    gate.set()
    qtbot.waitUntil(service.is_idle, timeout=5000)
    assert got == ["new"]


def test_cancel_reaches_the_backend_token(service, qtbot):
    started = threading.Event()
    seen = []

    def work(cancel, progress):
        started.set()
        while not cancel.is_set():
            time.sleep(0.005)
        seen.append("cancelled")
        raise Cancelled()

    errors = []
    job = service.submit("sweep", "sweep", work, on_error=lambda m, d: errors.append(m))
    assert started.wait(5)
    service.cancel(job.id)
    qtbot.waitUntil(service.is_idle, timeout=5000)
    assert seen == ["cancelled"] and errors == []  # a cancelled job is not an error


def test_errors_are_messages_not_crashes(service, qtbot):
    msgs = []
    with qtbot.waitSignal(service.error, timeout=5000) as sig:
        service.submit("x", "broken", lambda cancel, progress: 1 / 0)
    assert sig.args[0] == "broken" and "ZeroDivisionError" in sig.args[1] and "Traceback" in sig.args[2]
    service.submit("y", "bad input", lambda cancel, progress: (_ for _ in ()).throw(QuantscopeError("bad file", file="f")),
                   on_error=lambda m, d: msgs.append((m, d)))
    qtbot.waitUntil(lambda: bool(msgs), timeout=5000)
    # bad input is said in words: no traceback under "Show Details…" (a review found one there)
    assert msgs == [("f: bad file", "")]


def test_progress_is_throttled_and_reported(service, qtbot):
    seen = []
    service.job_progress.connect(lambda jid, f, text: seen.append(f))

    def work(cancel, progress):
        for i in range(1, 2001):
            progress(i / 2000)
        return True

    service.submit("p", "p", work, on_result=lambda r: None)
    qtbot.waitUntil(service.is_idle, timeout=5000)
    assert seen and seen[-1] == 1.0 and len(seen) < 50


def test_zero_histogram_one_bin_per_level_and_bounded_on_garbage():
    from quantscope.app.jobs import zero_histogram
    edges, counts = zero_histogram({"a": np.array([8.0, 8, 8]), "b": np.array([-2.0, 3, 3])})
    assert np.array_equal(edges, np.arange(-2.5, 9.0, 1.0))
    assert counts["a"][10] == 3 and counts["b"][0] == 1 and counts["b"][5] == 2
    # raw packed words read as zero points (what a damaged or misread file gives): shared bins
    # (16 for two values, at most 128), not 4e9
    edges, counts = zero_histogram({"a": np.array([-2.0e9, 2.0e9, np.nan])})
    assert edges.size == 17 and counts["a"].sum() == 2
    assert zero_histogram({"a": np.array([np.nan])}) == (None, {})
    # with the bit width's top level: every level 0..15 on the axis, unused ones too (the axis ran
    # over the levels used only, so "a level no group uses" never showed)
    edges, counts = zero_histogram({"a": np.array([3.0, 7, 7, 12])}, top=15)
    assert edges[0] == -0.5 and edges[-1] == 15.5 and counts["a"].sum() == 4 and counts["a"][0] == 0
    edges, _ = zero_histogram({"a": np.array([3.0, 17])}, top=15)  # (a value past the top: the data's range)
    assert edges[0] == 2.5 and edges[-1] == 17.5


def test_a_cancelled_job_says_so_unless_a_newer_one_replaced_it(service, qtbot):
    # cancelling the comparison (Esc) dropped it without a word
    said = []

    def slow(tag, cancel, progress):
        while not cancel.is_set():
            time.sleep(0.01)
        raise Cancelled()

    service.submit("sweep", "old", slow, "old", on_cancel=lambda: said.append("old"))
    service.submit("sweep", "new", slow, "new", on_cancel=lambda: said.append("new"))  # replaces "old"
    time.sleep(0.05)
    service.cancel_all()
    qtbot.waitUntil(service.is_idle, timeout=5000)
    assert said == ["new"]


def _blocker():
    release = threading.Event()

    def work(cancel, progress):
        while not release.wait(0.01):
            if cancel.is_set():
                raise Cancelled()
        return "warm"
    return release, work


def _failing_after(release):
    def work(cancel, progress):
        release.wait(5)
        raise QuantscopeError("no compiler")
    return work


@pytest.mark.parametrize("ending", ["result", "error", "cancel"])
def test_gated_jobs_wait_for_the_gating_job_however_it_ends(service, qtbot, ending):
    """The kernels' warm-up at start holds back the jobs that decode; opening files goes on."""
    release, work = _blocker()
    if ending == "error":
        work = _failing_after(release)
    ran = []
    gate = service.submit("warm-up", "warm-up", work, gating=True, on_error=lambda m, d: None)
    service.submit("sweep", "sweep", lambda cancel, progress: ran.append("sweep") or 1, gated=True)
    service.submit("open", "open", lambda cancel, progress: ran.append("open") or 1)
    # (the open job's end reaches the GUI thread after its function returned: wait for both)
    qtbot.waitUntil(lambda: ran == ["open"] and len(service.running()) == 2, timeout=5000)
    qtbot.wait(100)
    assert ran == ["open"]  # the gated job has not started
    assert len(service.running()) == 2  # but it is listed (the jobs bar shows it)
    if ending == "cancel":
        service.cancel(gate.id)
    release.set()
    qtbot.waitUntil(service.is_idle, timeout=5000)
    assert ran == ["open", "sweep"]
    # with no gating job left, a gated job starts at once
    service.submit("sweep", "sweep", lambda cancel, progress: ran.append("again") or 1, gated=True)
    qtbot.waitUntil(lambda: ran[-1:] == ["again"], timeout=5000)


def test_a_waiting_gated_job_can_be_cancelled_or_replaced(service, qtbot):
    release, work = _blocker()
    service.submit("warm-up", "warm-up", work, gating=True)
    ran, cancelled, results = [], [], []
    a = service.submit("detail", "a", lambda cancel, progress: ran.append("a") or "a", gated=True,
                       on_cancel=lambda: cancelled.append("a"))
    service.submit("sweep", "b", lambda cancel, progress: ran.append("b") or "b", gated=True,
                   on_cancel=lambda: cancelled.append("b"))
    service.submit("sweep", "c", lambda cancel, progress: ran.append("c") or "c", gated=True,
                   on_result=results.append, on_cancel=lambda: cancelled.append("c"))  # replaces b
    service.cancel(a.id)
    assert cancelled == ["a"]  # at once, it never started; b was replaced, not cancelled
    assert len(service.running()) == 2  # the gate and c
    release.set()
    qtbot.waitUntil(service.is_idle, timeout=5000)
    assert ran == ["c"] and results == ["c"] and cancelled == ["a"]


def test_shutdown_drops_the_waiting_gated_jobs(qtbot):
    s = JobService()
    release, work = _blocker()
    s.submit("warm-up", "warm-up", work, gating=True)
    ran = []
    s.submit("sweep", "sweep", lambda cancel, progress: ran.append(1), gated=True)
    s.shutdown()
    release.set()
    assert s.is_idle() and ran == []


def test_jobs_bar_shows_the_job_that_runs_not_the_one_waiting_for_it(service, qtbot):
    from quantscope.widgets.jobs_bar import JobsBar
    bar = JobsBar(service)
    qtbot.addWidget(bar)
    bar.setFixedWidth(440)
    bar.show()
    release, work = _blocker()
    service.submit("warm-up", "Compiling kernels", work, gating=True)
    sweep = service.submit("sweep", "Comparing all layers matching a very long pattern indeed", lambda cancel, progress: 1,
                           gated=True)
    assert service.is_waiting(sweep.id)
    assert bar.label.text() == "Compiling kernels (+1 more)"
    assert bar.label.toolTip().splitlines() == ["Compiling kernels",
                                                "Comparing all layers matching a very long pattern indeed (waiting)"]
    release.set()
    qtbot.waitUntil(service.is_idle, timeout=5000)
    assert bar.label.text() == "Ready"
    # a title longer than the room is cut with "…", the count of the others kept whole
    release, work = _blocker()
    service.submit("a", "Comparing all layers matching a very long pattern indeed, longer than the strip", work)
    service.submit("b", "Exporting model.layers.0.mlp.down_proj.weight to a file with a long name", work)
    text = bar.label.text()
    assert text.endswith("… (+1 more)") and text.startswith("Exporting model")
    assert bar.label.fontMetrics().horizontalAdvance(text) <= bar.label.contentsRect().width()
    release.set()
    qtbot.waitUntil(service.is_idle, timeout=5000)


def test_a_job_cancelled_as_it_finishes_is_said_cancelled_and_its_result_dropped(service, qtbot):
    """Cancelled at 93%: the comparison ran to its end, its result was dropped and nothing said."""
    started, go = threading.Event(), threading.Event()

    def work(cancel, progress):
        started.set()
        go.wait(5)
        return "done"  # (past its last check of the token)

    got, cancelled = [], []
    job = service.submit("sweep", "sweep", work, on_result=got.append, on_cancel=lambda: cancelled.append(1))
    assert started.wait(5)
    service.cancel(job.id)
    go.set()
    qtbot.waitUntil(service.is_idle, timeout=5000)
    assert got == [] and cancelled == [1]
    # replaced by a newer job on its channel: neither (the newer one speaks for it)
    started.clear()
    go.clear()
    old = service.submit("sweep", "old", work, on_result=got.append, on_cancel=lambda: cancelled.append(2))
    assert started.wait(5)
    service.cancel(old.id)
    service.submit("sweep", "new", lambda cancel, progress: "new", on_result=got.append)
    go.set()
    qtbot.waitUntil(service.is_idle, timeout=5000)
    assert got == ["new"] and cancelled == [1]
