"""GUI responsiveness: the real window, offscreen, with a 5 ms heartbeat timer, while it opens the
demo workspace and runs "Compare all layers" on it and on a larger generated model.

Prints the longest and the 99th-percentile gap between heartbeats (target: longest < 50 ms):
a long gap means the GUI thread was blocked.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from _common import CACHE, emit

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

#: Seconds of event processing kept in a phase after its signal (the repaints it caused).
SETTLE_S = 0.4


def build_larger(folder):
    """A reference (bf16) and an MLX 4-bit variant of 8 layers × hidden 1024 (~0.2 GB)."""
    import json

    import ml_dtypes
    import mlx.core as mx

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "tests"))
    from helpers import write_st

    ref, var = folder / "reference", folder / "mlx-q4"
    if (var / "model.safetensors").exists():
        return ref, var
    rng = np.random.default_rng(0)
    h, inter, layers = 1024, 2816, 8
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": h, "intermediate_size": inter,
           "num_hidden_layers": layers, "num_attention_heads": 16, "head_dim": 64, "vocab_size": 4096}
    rt, vt = {}, {}
    for i in range(layers):
        for name, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (h, h)), ("self_attn.v_proj", (h, h)),
                            ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (inter, h)), ("mlp.up_proj", (inter, h)),
                            ("mlp.down_proj", (h, inter))):
            w = (rng.standard_t(5, size=shape) * 0.02).astype(ml_dtypes.bfloat16)
            p = f"model.layers.{i}.{name}"
            rt[p + ".weight"] = w
            q, s, b = mx.quantize(mx.array(w.view(np.uint16)).view(mx.bfloat16), group_size=64, bits=4)
            vt[p + ".weight"] = np.array(q)
            vt[p + ".scales"] = np.array(s.view(mx.uint16)).view(ml_dtypes.bfloat16)
            vt[p + ".biases"] = np.array(b.view(mx.uint16)).view(ml_dtypes.bfloat16)
    for d, t, c in ((ref, rt, cfg), (var, vt, {**cfg, "quantization": {"group_size": 64, "bits": 4}})):
        d.mkdir(parents=True, exist_ok=True)
        write_st(d / "model.safetensors", t, {"format": "pt"})
        (d / "config.json").write_text(json.dumps(c))
    return ref, var


def main():
    from PySide6.QtCore import QElapsedTimer, QSettings, QTimer

    from quantscope.app.main_window import MainWindow
    from quantscope.backend.demo import build_demo

    from quantscope.app.window_main import _app
    app = _app()  # the application exactly as `quantscope` sets it up (palette, antialiasing)
    demo_dir = CACHE / "gui_demo"
    if not demo_dir.exists():
        build_demo(demo_dir)
    from quantscope.backend.demo import DemoWorkspace  # noqa: F401  (layout documented there)
    demo_variants = [str(p) for p in sorted(demo_dir.iterdir()) if p.is_dir() and p.name != "reference"]
    larger_ref, larger_var = build_larger(CACHE / "gui_larger")
    settings = QSettings(str(CACHE / "gui_settings.ini"), QSettings.Format.IniFormat)
    win = MainWindow(settings)
    win.quiet_errors = True
    win.resize(1280, 800)
    win.show()
    # Let start-up finish before measuring (the first paint of the freshly shown window, and on a
    # first run the kernels' compilation): the heartbeat is about opening and comparing, not about
    # starting the application. The first comparison loads the compiled kernels it uses (0.3 s;
    # they were loaded ahead, during start-up, until 2026-12-07: see app/jobs.job_warm_up).
    t_settle = time.perf_counter()
    while time.perf_counter() - t_settle < 0.5 or (not win.service.is_idle() and time.perf_counter() - t_settle < 60):
        app.processEvents()
        time.sleep(0.005)
    out_startup_s = time.perf_counter() - t_settle
    gaps: list[float] = []
    clock = QElapsedTimer()
    clock.start()
    last = [clock.nsecsElapsed()]

    def beat():
        now = clock.nsecsElapsed()
        gaps.append((now - last[0]) / 1e6)
        last[0] = now

    timer = QTimer()
    timer.setInterval(5)
    timer.timeout.connect(beat)
    timer.start()
    out = {"benchmark": "gui", "startup_settle_s": round(out_startup_s, 2), "phases": {}}

    def wait(signal, start):
        done = []
        signal.connect(lambda *a: done.append(1))
        gaps.clear()
        last[0] = clock.nsecsElapsed()
        t0 = time.perf_counter()
        start()
        while not done:
            app.processEvents()
            time.sleep(0.001)
        elapsed = time.perf_counter() - t0
        # The repaints that follow the signal belong to this phase, not to the next one.
        t1 = time.perf_counter()
        while time.perf_counter() - t1 < SETTLE_S:
            app.processEvents()
            time.sleep(0.001)
        return elapsed, list(gaps)

    for label, variants, ref in (("demo", demo_variants, str(demo_dir / "reference")),
                                 ("larger", [str(larger_var)], str(larger_ref))):
        t_open, g_open = wait(win.workspace_loaded, lambda: win.open_workspace(variants, ref))
        t_cmp, g_cmp = wait(win.sweep_done, win.compare_all)
        g = np.array(g_open + g_cmp)
        out["phases"][label] = {"open_s": t_open, "compare_s": t_cmp, "heartbeats": int(g.size),
                                "longest_gap_ms": float(g.max()), "p99_gap_ms": float(np.percentile(g, 99))}
    out["target_longest_gap_ms"] = 50
    timer.stop()
    win.close()
    emit(out)


if __name__ == "__main__":
    main()
