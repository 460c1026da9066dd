"""First-run compilation in child processes (quantscope.backend.precompile)."""

import logging
import threading

import pytest
from quantscope.backend import precompile
from quantscope.backend.errors import Cancelled
from quantscope.backend.formats import fast

pytestmark = pytest.mark.skipif(not fast.AVAILABLE, reason="needs numba")


def test_plan_shares_the_parts_out_costliest_first():
    assert precompile.plan(1) == [["measure", "gptq-awq", "codes", "views", "mlx"]]
    assert precompile.plan(2) == [["measure", "views"], ["gptq-awq", "codes", "mlx"]]
    assert precompile.plan(16) == [["measure"], ["gptq-awq"], ["codes"], ["views"], ["mlx"]]
    assert sorted(p for g in precompile.plan(3) for p in g) == sorted(fast.WARM_PARTS)
    assert set(precompile.PART_COST) == set(fast.WARM_PARTS)


def test_kernels_cached_once_warm_up_ran():
    fast.warm_up()  # compiles or loads: the cache is current afterwards
    assert precompile.kernels_cached()
    assert not precompile.precompile()  # nothing to do


def test_children_fill_the_cache_the_caller_then_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    assert precompile.precompile(force=True, parts=["views"], processes=2)
    # the layer views' kernels, compiled by the child, are in the cache it was pointed at
    names = {p.name.split("-")[0] for p in tmp_path.rglob("*.nbi")}
    assert {"histo._count", "histo._levels", "histo._group_sums"} <= names, names


def test_a_failing_child_is_reported_not_raised(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="quantscope.backend.precompile"):
        assert not precompile.precompile(force=True, parts=["no-such-part"])
    assert "['no-such-part']" in caplog.text and "KeyError" in caplog.text


def test_cancel_stops_the_children(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    ev = threading.Event()
    ev.set()
    with pytest.raises(Cancelled):
        precompile.precompile(cancel=ev, force=True)


class _Tty:
    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_compare_says_it_compiles_on_a_first_run_then_erases_it(monkeypatch):
    from quantscope.app import progress_bar
    calls = []
    monkeypatch.setattr(precompile, "kernels_cached", lambda: False)
    monkeypatch.setattr(precompile, "precompile", lambda *a, **k: calls.append(1) or True)
    monkeypatch.setattr(precompile, "usable_cores", lambda: 2)
    tty = _Tty()
    progress_bar.kernels_ready(tty)
    assert calls == [1]
    assert tty.text.startswith("compiling the kernels (first run only)...") and tty.text.endswith("\r")
    monkeypatch.setattr(precompile, "usable_cores", lambda: 1)  # one core: nothing gained, nothing run
    progress_bar.kernels_ready(tty)
    monkeypatch.setattr(precompile, "usable_cores", lambda: 4)
    monkeypatch.setattr(precompile, "kernels_cached", lambda: True)  # the usual case: nothing run
    progress_bar.kernels_ready(tty)
    assert calls == [1]
