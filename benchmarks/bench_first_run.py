"""A first run: compiling the kernels with numba's cache empty, and what the window does meanwhile.

Each measurement runs in a fresh process pointed (``NUMBA_CACHE_DIR``) at an empty cache:

* ``in_process_s``: ``fast.warm_up()`` compiling everything in one process (what a first run
  did before the kernels were compiled in child processes);
* ``children_s``: ``precompile()`` compiling the same kernels in child processes, one per usable
  core, then ``warm_up()`` loading them (``load_s``);
* ``window``: the real window (offscreen) opening the demo workspace and comparing all its
  layers, as the README's first command does, with a 5 ms heartbeat timer on its event loop:
  seconds until the comparison is shown and the longest gap between heartbeats, with an empty
  cache (``cold``) and again with the cache it filled (``warm``);
* ``compiled_after_precompile``: the kernels the window still compiled itself (new files in the
  cache) when opening the demo, comparing it and showing a layer's views after ``precompile()``
  filled the cache: every one it needs should be among those compiled beforehand (0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import CACHE, emit

_WARM = """
import json, time
from quantscope.backend.formats import fast
t = time.perf_counter(); fast.warm_up(); print(json.dumps({"in_process_s": time.perf_counter() - t}))
"""

_CHILDREN = """
import json, time
from quantscope.backend import precompile
from quantscope.backend.formats import fast
t = time.perf_counter(); ok = precompile.precompile(force=True); t1 = time.perf_counter()
fast.warm_up(); t2 = time.perf_counter()
print(json.dumps({"children_s": t1 - t, "load_s": t2 - t1, "ok": ok, "processes": len(precompile.plan(precompile.usable_cores()))}))
"""

_WINDOW = """
import json, os, sys, time
import numpy as np
from PySide6.QtCore import QElapsedTimer, QSettings, QTimer
from quantscope.app.window_main import _app
from quantscope.app.main_window import MainWindow
from quantscope.backend.demo import build_demo
demo, ini = sys.argv[1], sys.argv[2]
from pathlib import Path
demo = Path(demo)
if not (demo / "reference").exists():
    build_demo(demo)
app = _app()
variants = [str(p) for p in sorted(demo.iterdir()) if p.is_dir() and p.name != "reference"]
gaps = []
clock = QElapsedTimer(); clock.start(); last = [clock.nsecsElapsed()]
def beat():
    now = clock.nsecsElapsed(); gaps.append((now - last[0]) / 1e6); last[0] = now
timer = QTimer(); timer.setInterval(5); timer.timeout.connect(beat); timer.start()
t0 = time.perf_counter()
win = MainWindow(QSettings(ini, QSettings.Format.IniFormat)); win.quiet_errors = True
win.resize(1280, 800); win.show()
last[0] = clock.nsecsElapsed()
done = []
win.sweep_done.connect(lambda *a: done.append(time.perf_counter() - t0))
win.workspace_loaded.connect(lambda *a: win.compare_all())
win.open_workspace(variants, str(demo / "reference"))
while (not done or not win.service.is_idle()) and time.perf_counter() - t0 < 120:
    app.processEvents(); time.sleep(0.002)
g = np.array(gaps)
print(json.dumps({"compared_s": done[0] if done else None, "longest_gap_ms": float(g.max()),
                  "gaps_over_100ms": int((g > 100).sum())}))
win.service.shutdown()
"""


def _run(code: str, cache_dir: str, *args: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, QT_QPA_PLATFORM="offscreen")
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    res: dict = {"benchmark": "first_run"}
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b, \
            tempfile.TemporaryDirectory() as c:
        res.update(_run(_WARM, a))
        res.update(_run(_CHILDREN, b))
        demo = str(CACHE / "gui_demo")
        ini = os.path.join(c, "settings.ini")
        res["window"] = {"cold": _run(_WINDOW, os.path.join(c, "numba"), demo, ini),
                         "warm": _run(_WINDOW, os.path.join(c, "numba"), demo, ini)}
        before = set(Path(b).rglob("*.nbc"))
        env = dict(os.environ, NUMBA_CACHE_DIR=b, QT_QPA_PLATFORM="offscreen", HOME=c)
        for layer in ("model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"):
            subprocess.run([sys.executable, "-m", "quantscope", "--select", layer, "--compare", "--screenshot",
                            os.path.join(c, "shot.png")], env=env, capture_output=True, check=True)
        res["compiled_after_precompile"] = sorted(p.name for p in set(Path(b).rglob("*.nbc")) - before)
    res["children_over_in_process"] = round(res["children_s"] / res["in_process_s"], 3)
    emit(res)


if __name__ == "__main__":
    main()
