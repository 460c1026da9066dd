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
                   on_error=lambda m, d: msgs.append(m))
    qtbot.waitUntil(lambda: bool(msgs), timeout=5000)
    assert msgs == ["f: bad file"]


def test_progress_is_throttled_and_reported(service, qtbot):
    seen = []
    service.job_progress.connect(lambda jid, f: seen.append(f))

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
