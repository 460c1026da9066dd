"""The real window, offscreen: demo workspace, selection, views, compare, doctor, errors, jobs."""

import math
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QSettings, Qt
from quantscope.app.main_window import MainWindow

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    from quantscope.backend.demo import build_demo
    return build_demo(tmp_path_factory.mktemp("demo") / "ws")


@pytest.fixture
def win(qtbot, tmp_path, demo):
    settings = QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat)
    w = MainWindow(settings)
    w.quiet_errors = True
    qtbot.addWidget(w)
    w.resize(1280, 800)
    w.show()
    with qtbot.waitSignal(w.workspace_loaded, timeout=30_000):
        w.open_workspace([str(p) for p in demo.variants.values()], str(demo.reference))
    yield w
    w.service.shutdown()
    assert w.service.is_idle()  # no job left running


def test_tree_lists_every_layer_and_search_finds_one(win, qtbot, demo):
    model = win.tree.model
    first_variant = next(iter(win.workspace.variants.values()))
    assert model.rowCount() == len(first_variant.layers)
    qtbot.keyClicks(win.tree.search, "layers.1.mlp.down_proj")
    qtbot.waitUntil(lambda: model.rowCount() == 1, timeout=2000)
    assert model.index(0, 0).data() == "model.layers.1.mlp.down_proj"


def test_selecting_a_layer_fills_config_and_every_view(win, qtbot):
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        assert win.tree.select("model.layers.1.mlp.down_proj")
    t = win.config.layer_table
    rows = {t.item(r, 0).text(): [t.item(r, c).text() for c in range(6)] for r in range(t.rowCount())}
    gptq = rows["gptq-w4g128"]
    assert gptq[1:4] == ["gptq", "4", "128"] and "quantize_config.json" in gptq[5] or "config.json" in gptq[5]
    mixed = rows["mlx-mixed-3-6"]
    assert mixed[1] == "mlx-affine" and mixed[2] in ("3", "6") and "override" in mixed[5]
    variants = list(win.workspace.variants)
    # the showing tab is filled at once; the others when they are shown
    assert win.tabs.currentWidget() is win.hist and set(variants) <= set(win.hist._counts)
    assert not win.err_hist._counts
    for i in range(win.tabs.count()):
        win.tabs.setCurrentIndex(i)
    assert set(variants) <= set(win.hist._counts) and "reference" in win.hist._counts
    assert set(variants) <= set(win.err_hist._counts)
    # AWQ's smoothing is undone in its values and errors, as it is measured: said above both
    for view in (win.hist, win.err_hist):
        assert view.note.text() == "model.layers.1.mlp.down_proj · smoothing undone, as measured: awq-w4g128"
    assert set(variants) <= set(win.codes._counts)
    assert len(win.heatmap._maps) == len(variants)
    assert set(win.scales._counts) == set(variants)
    # MLX's signed scales as |scale| (the step), said above the plot; every edge at or above 0
    assert "|scale| of mlx-affine-q4g64, mlx-mixed-3-6" in win.scales.note.text()
    mlx_counts = win.scales._counts["mlx-affine-q4g64"]
    assert win.scales._edges[np.flatnonzero(mlx_counts)[0]] >= 0
    assert {"gptq-w4g128", "awq-w4g128"} <= set(win.zeros._counts)
    level8 = int(np.flatnonzero((win.zeros._edges[:-1] < 8) & (win.zeros._edges[1:] > 8))[0])  # one bin per level
    assert win.zeros._counts["gptq-w4g128"][level8] == win.zeros._counts["gptq-w4g128"].sum()  # sym: all 8
    for label in variants:
        assert win.hist._counts[label].sum() == 512 * 1536



def test_going_back_to_a_layer_just_seen_shows_it_without_decoding_again(win, qtbot, monkeypatch):
    from quantscope.app import jobs as jobs_mod
    calls = []
    real = jobs_mod.job_detail
    monkeypatch.setattr(jobs_mod, "job_detail", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    for name in ("model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"):
        with qtbot.waitSignal(win.detail_shown, timeout=30_000):
            assert win.tree.select(name)
    first = dict(win.hist._counts)
    with qtbot.waitSignal(win.detail_shown, timeout=1000):
        assert win.tree.select("model.layers.1.mlp.down_proj")
    assert calls == ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    assert win.hist.note.text().startswith("model.layers.1.mlp.down_proj") and set(win.hist._counts) == set(first)
    # another set of checkpoints: measured anew, without the one removed
    gone = "gptq-w4g128"
    win.tree.combo.setCurrentText(gone)
    win.remove_shown()
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        assert win.tree.select("model.layers.0.self_attn.q_proj")
    assert calls[-1] == "model.layers.0.self_attn.q_proj" and gone not in win.hist._counts


def test_compare_only_the_layers_matching_the_search(win, qtbot):
    """Tools ▸ Compare layers matching the search: the layers whose names hold every term typed;
    a later Compare all reuses them. With nothing typed it says what to do."""
    errors = []
    win.failed.connect(errors.append)
    win.compare_matching()
    assert errors and "Type in the Tensors search first" in errors[-1] and win.sweep_result is None
    win.tree.search.setText("layers.1. mlp")
    with qtbot.waitSignal(win.sweep_done, timeout=120_000):
        win.compare_matching()
    names = {r.name for r in win.sweep_result.rows}
    assert names == {f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")}
    assert {r.variant for r in win.sweep_result.rows} == set(win.workspace.variants)
    assert "Compared 3 layers matching the search “layers.1. mlp”. Compare all" in win.statusBar().toolTip()
    before = len(win._sweep_cache)
    assert before == 3 * len(win.workspace.variants)  # measured once, kept for a comparison of all
    # a down_proj alone: AWQ's smoothing is undone from up_proj's rows, measured too and named
    # (the count had added it to the layers matching: "Compared the 2 layer(s)", 1 in the tree)
    win.tree.search.setText("layers.2. down")
    with qtbot.waitSignal(win.sweep_done, timeout=120_000):
        win.compare_matching()
    assert ("Compared 1 layer matching the search “layers.2. down”, and 1 more whose rows AWQ-style smoothing "
            "is undone from: model.layers.2.mlp.up_proj." in win.statusBar().toolTip())
    win.tree.search.clear()
    with qtbot.waitSignal(win.sweep_done, timeout=120_000):
        win.compare_all()
    assert len({r.name for r in win.sweep_result.rows}) > 3
    # then a search that matches nothing (a typo): said, and the comparison shown stays (the view
    # was emptied while the tree kept its errors and Export wrote them)
    shown = {v: len(item.getData()[0]) for v, item in win.layers.series.items()}
    win.tree.search.setText("layers.1.mlp.dwn_proj")
    win.compare_matching()
    qtbot.waitUntil(lambda: any("dwn_proj" in e for e in errors), timeout=30_000)
    qtbot.waitUntil(lambda: win.service.is_idle(), timeout=30_000)
    assert {v: len(item.getData()[0]) for v, item in win.layers.series.items()} == shown
    assert "Nothing compared" not in win.layers.hint.text() and len({r.name for r in win.sweep_result.rows}) > 3


def test_compare_all_layers_and_click_selects(win, qtbot):
    with qtbot.waitSignal(win.sweep_done, timeout=120_000):
        win.compare_all()
    plot = win.layers
    assert set(plot.series) == set(win.workspace.variants)
    plot.proj.setCurrentText("down_proj")
    for label, item in plot.series.items():
        x, y = item.getData()
        assert len(x) == 4 and np.isfinite(y).all()   # one point per decoder layer
    item = plot.series["awq-w4g128"]
    pts = item.scatter.points()
    with qtbot.waitSignal(win.tree.layer_selected, timeout=5000) as sig:
        item.sigPointsClicked.emit(item, [pts[2]], None)
    assert sig.args == ["model.layers.2.mlp.down_proj"]
    row = win.tree.model.row_of("model.layers.0.self_attn.q_proj").row()
    assert float(win.tree.model.index(row, 7).data()) > 0  # error column filled


def test_empty_views_say_what_fills_them_and_why_they_are_empty(win, qtbot):
    # before any selection: each view says what to do; the range controls wait for data
    assert "Select a weight matrix" in win.hist.hint.text() and not win.hist.apply.isEnabled()
    assert "Select a quantized layer" in win.codes.hint.text() and "Select" in win.heatmap.hint.text()
    assert "Compare all layers" in win.layers.hint.text() and "Compare all layers" in win.layers.info.text()
    win.tabs.setCurrentWidget(win.hist)
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        assert win.tree.select("model.layers.0.mlp.up_proj")
    assert win.hist.hint.text() == "" and win.hist.apply.isEnabled()
    win.tree.select("model.norm")  # a vector: its values, and every other view says it is one
    why = "model.norm is a vector, not a weight matrix: its values are in the Values view"
    qtbot.waitUntil(lambda: win.hist.note.text().startswith("model.norm · a vector of 512 values"), timeout=5000)
    assert set(win.hist._counts) == {"reference"}  # (every variant stores the reference's norm)
    assert "the same values as the reference's: gptq-w4g128" in win.hist.footer.text()
    for i in range(win.tabs.count()):
        win.tabs.setCurrentIndex(i)
    for v in (win.err_hist, win.scales, win.zeros, win.codes, win.heatmap):
        assert v.hint.text() == why, v
    # AWQ divides the norms before q/k/v by its smoothing scales: its norm is drawn beside the reference's
    win.tabs.setCurrentWidget(win.hist)
    win.tree.select("model.layers.1.post_attention_layernorm")
    qtbot.waitUntil(lambda: win.hist.note.text().startswith("model.layers.1.post_attention_layernorm"), timeout=5000)
    assert set(win.hist._counts) == {"reference", "awq-w4g128"}
    assert sum(win.hist._counts["awq-w4g128"]) == 512
    with qtbot.waitSignal(win.sweep_done, timeout=120_000):
        win.compare_all()
    qtbot.waitUntil(lambda: not win.turns_pending(), timeout=10_000)
    assert win.layers.hint.text() == "" and "points from" in win.layers.info.text()


def test_results_and_jobs_never_resize_the_window(win, qtbot):
    # A long summary line or a job starting and ending must not relayout the window: that
    # widened it past 1280 px and repainted every plot at each job (bench_gui).
    qtbot.waitUntil(win.service.is_idle, timeout=30_000)
    size, bar_height = win.size(), win.statusBar().height()
    seen = []
    win.service.job_started.connect(lambda *a: seen.append(win.statusBar().height()))
    with qtbot.waitSignal(win.sweep_done, timeout=120_000):
        win.compare_all()
    qtbot.waitUntil(win.service.is_idle, timeout=30_000)
    qtbot.wait(50)
    assert "variant" in win.layers.info.text()  # the long summary is shown
    assert win.size() == size and win.minimumSizeHint().width() <= 1280
    assert seen and set(seen) == {bar_height} and win.statusBar().height() == bar_height


def test_cancelling_a_sweep_stops_it(win, qtbot):
    win.compare_all()
    job = next(j for j in win.service.running() if j.channel == "sweep")
    win.service.cancel(job.id)
    qtbot.waitUntil(win.service.is_idle, timeout=30_000)
    assert win.sweep_result is None
    # run again to the end: the cancelled one's message goes (it stayed up beside the results)
    win.statusBar().showMessage("Comparison cancelled: Tools ▸ Compare all layers runs it again", 15000)
    with qtbot.waitSignal(win.sweep_done, timeout=60_000):
        win.compare_all()
    qtbot.waitUntil(lambda: not win.statusBar().currentMessage().startswith("Comparison cancelled"), timeout=5000)


def test_esc_in_the_search_box_clears_it_and_cancels_no_job(win, qtbot):
    """Esc is the window's "Cancel all jobs"; typed in the search box it used to cancel a running
    comparison. There it clears the search, and the comparison finishes."""
    win.activateWindow()
    win.tree.search.setFocus()
    qtbot.keyClicks(win.tree.search, "down")
    with qtbot.waitSignal(win.sweep_done, timeout=120_000):
        win.compare_all()
        qtbot.keyClick(win.tree.search, Qt.Key.Key_Escape)
        assert win.tree.search.text() == ""
    assert win.sweep_result is not None


def test_doctor_panel_lists_findings_of_a_broken_checkpoint(win, qtbot, tmp_path, demo):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(demo.variants["mlx-affine-q4g64"], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) - 100])  # truncated download
    with qtbot.waitSignal(win.workspace_loaded, timeout=30_000):
        win.open_workspace([str(p) for p in demo.variants.values()], str(demo.reference))
    # the doctor does not need the file to open: it reports what is wrong
    with qtbot.waitSignal(win.doctor_done, timeout=30_000):
        win.service.submit("doctor", "doctor", __import__("quantscope.app.jobs", fromlist=["x"]).job_doctor,
                           str(broken), on_result=lambda f: (win.doctor.set_findings("broken", f),
                                                             win.doctor_done.emit()))
    assert "error" in win.doctor.title.text() and len(win.doctor.groups()["error"]) >= 1


def test_corrupt_file_gives_a_message_and_the_window_stays_usable(win, qtbot, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    with qtbot.waitSignal(win.failed, timeout=10_000) as sig:
        win.add_paths([str(bad)])
    assert "Git LFS pointer" in sig.args[0]
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        win.tree.select("model.layers.0.self_attn.q_proj")


def test_one_broken_checkpoint_does_not_keep_the_others_from_opening(win, qtbot, tmp_path, demo):
    """Opening a reference and two variants, one of them truncated, opens the other two and names
    the broken file; before, the whole workspace stayed empty."""
    import shutil
    src = demo.variants["gptq-w4g128"]
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    f = next(broken.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:3_000_000])
    with qtbot.waitSignal(win.failed, timeout=30_000) as sig:
        win.open_workspace([str(demo.variants["awq-w4g128"]), str(broken)], str(demo.reference))
    assert sig.args[0].startswith("1 of 3 checkpoints could not be opened") and "broken" in sig.args[0]
    qtbot.waitUntil(lambda: list(win.workspace.variants) == ["awq-w4g128"], timeout=10_000)
    assert win.workspace.reference is not None and win.workspace.failed[0][0] == str(broken)
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        assert win.tree.select("model.layers.0.self_attn.q_proj")
    # a broken reference is named as the reference: without it nothing can be compared
    with qtbot.waitSignal(win.failed, timeout=30_000) as sig:
        win.open_workspace([str(demo.variants["awq-w4g128"])], str(broken))
    assert sig.args[0].startswith("The reference could not be opened, so no error can be measured")
    # and it stays said where the comparison's results would be (the error box goes; a
    # screenshot run shows none): the Layers view blamed nothing but a missing reference
    qtbot.waitUntil(lambda: "Could not be opened: " in win.layers.hint.text(), timeout=10_000)
    assert str(broken) in win.layers.hint.text() and "A comparison needs a reference" in win.layers.hint.text()


def test_the_only_checkpoint_failing_to_open_gives_details_not_a_traceback(win, qtbot, tmp_path, monkeypatch):
    # "Show Details…" held a service/jobs/workspace traceback where the doctor hint was needed most
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)
    shown = []
    monkeypatch.setattr(win, "_show_error", lambda title, message, details: shown.append((message, details)))
    win.open_workspace([str(bad)], None)
    qtbot.waitUntil(lambda: bool(shown), timeout=30_000)
    message, details = shown[0]
    assert message.startswith(str(bad)) and "Traceback" not in details and "File \"" not in details
    assert details.startswith(message) and f"Run doctor (Ctrl+D) lists every problem of {bad}" in details
    # several, none opening: each is named (only the first was)
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"{" * 64)
    shown.clear()
    win.open_workspace([str(bad), str(other)], None)
    qtbot.waitUntil(lambda: bool(shown), timeout=30_000)
    assert str(bad) in shown[0][0] and str(other) in shown[0][0]


def test_whatif_requantizes_from_the_reference(win, qtbot):
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        win.tree.select("model.layers.0.mlp.up_proj")
    win.config.bits.setCurrentText("8")
    win.config.group.setCurrentText("32")
    qtbot.mouseClick(win.config.run, __import__("PySide6.QtCore", fromlist=["Qt"]).Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: "What-if affine 8 bit / 32" in win.config.whatif_result.text(), timeout=30_000)
    rel = float(win.config.whatif_result.text().split("rel_fro ")[1].split()[0])
    assert 0 < rel < 0.02  # 8-bit is far better than any 4-bit variant


def test_exports(win, qtbot, tmp_path):
    """Every tab exports its figure, legend and title included, as PNG (twice the screen size)
    and SVG (pyqtgraph's SVG exporter failed with this PySide6; the Scales & zeros tab wrote
    nothing; the legend, now outside the plot, was missing from the file)."""
    from PySide6.QtGui import QImage
    with qtbot.waitSignal(win.sweep_done, timeout=120_000):
        win.compare_all()
    win.compare_heads()  # (and every layer's heads: their map goes with the Heads figure)
    qtbot.waitUntil(win.heads.map.has_rows, timeout=60_000)
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        assert win.tree.select("model.layers.1.self_attn.o_proj")  # (an attention layer: the Heads tab too)
    for i in range(win.tabs.count()):
        win.tabs.setCurrentIndex(i)
        qtbot.wait(50)
        for kind in ("png", "svg"):
            out = tmp_path / f"tab{i}.{kind}"
            win.export_plot(kind, str(out))
            assert out.stat().st_size > 1000, out
        img = QImage(str(tmp_path / f"tab{i}.png"))
        page = win.tabs.currentWidget()
        assert 2 * (page.width() - 8) <= img.width() <= 2 * page.width()
        svg = (tmp_path / f"tab{i}.svg").read_text()
        assert "model.layers.1.self_attn.o_proj" in svg or win.tabs.currentWidget() is win.layers
        if page is win.heads:
            assert "Error by head" in svg and "Worst head" in svg and "Heads furthest above their layer" in svg
        if page is not win.heatmap:  # every view with a legend has it in the file
            assert "awq-w4g128" in svg
        if page in (win.hist, win.err_hist):  # and what the note above the plot says of its figures
            assert "smoothing undone, as measured" in svg
    with qtbot.waitSignal(win.failed, timeout=5000) as sig:
        win.export_plot("png", str(tmp_path / "no-such-dir" / "x.png"))
    assert "no-such-dir" in sig.args[0]
    # File ▸ Export ▸ Metrics names each variant by its path, as `quantscope compare --csv` does
    from PySide6.QtWidgets import QFileDialog
    for kind in ("csv", "json"):
        out = tmp_path / f"m.{kind}"
        orig = QFileDialog.getSaveFileName
        QFileDialog.getSaveFileName = staticmethod(lambda *a, o=out, **k: (str(o), ""))
        try:
            win.export_metrics(kind)
        finally:
            QFileDialog.getSaveFileName = orig
    import csv
    import json
    with (tmp_path / "m.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    paths = {str(m.ckpt.source) for m in win.workspace.variants.values()}
    assert "rel_fro" in rows[0] and {r["variant"] for r in rows} <= paths
    assert {r["variant"] for r in json.loads((tmp_path / "m.json").read_text())["layers"]} == \
        {r["variant"] for r in rows if r["rel_fro"]}
    assert len(rows) >= len(win.sweep_result.rows)
    data = json.loads((tmp_path / "m.json").read_text())  # what it was measured against, as the CLI says
    assert data["reference"] == str(win.workspace.reference.ckpt.source) and set(data["variants"]) <= paths
    # the heads measured (Compare heads of every layer): in the JSON as `compare --heads` writes them,
    # and as CSV (File ▸ Export ▸ Heads as CSV), variants by path, in the model's order
    assert {h["variant"] for h in data["heads"]} == paths and len(data["heads"]) == 16 * len(paths)
    win.export_heads(str(tmp_path / "h.csv"))
    with (tmp_path / "h.csv").open() as fh:
        heads = list(csv.DictReader(fh))
    assert len(heads) == 8 * len(data["heads"]) and {r["variant"] for r in heads} == paths
    assert heads[0]["name"] == "model.layers.0.self_attn.q_proj" and heads[-1]["name"].startswith("model.layers.3.")
    first = next(h for h in data["heads"] if h["name"] == heads[0]["name"] and h["variant"] == heads[0]["variant"])
    assert float(heads[0]["rel_fro"]) == first["heads"]["q0"]


def test_convert_from_the_window_opens_the_result_with_its_error(win, qtbot, tmp_path, demo):
    dst = tmp_path / "awq-mlx"
    n_before = len(win.workspace.variants)
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        assert win.tree.select("model.layers.0.mlp.up_proj")
    with qtbot.waitSignal(win.convert_done, timeout=120_000) as sig:
        from quantscope.widgets.convert_dialog import ConvertDialog
        dlg = ConvertDialog({"awq": str(demo.variants["awq-w4g128"])}, "awq")
        dlg.dst.setText(str(dst))
        win.run_convert(dlg.options())
    report = sig.args[0]
    assert report.verified and report.max_rel_fro == 0.0  # exact repack: zero error
    assert "exact repacks: 28" in win.config.whatif_result.text()
    assert "layer " not in win.config.whatif_result.text()  # the summary, without the per-layer table's header
    qtbot.waitUntil(lambda: len(win.workspace.variants) == n_before + 1, timeout=30_000)
    assert (dst / "config.json").exists()
    assert win.tree.current_label() == "awq-mlx"  # the tree shows the result (it jumped to the first variant)
    # the result opens beside the others: the shown layer's errors now include it, and the
    # conversion's summary stays under them (the refresh wiped it)
    qtbot.waitUntil(lambda: "awq-mlx: rel_fro" in win.config.whatif_result.text(),
                    timeout=30_000)
    assert "Last conversion: converted" in win.config.whatif_result.text()
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):  # another layer: the summary has been read
        assert win.tree.select("model.layers.1.mlp.up_proj")
    assert "Last conversion" not in win.config.whatif_result.text()



def test_concurrent_jobs_of_one_kind_all_land(win, qtbot, tmp_path, demo, real_fixtures):
    """A third review's findings: a second conversion cancelled the first without a word; a
    conversion could write into an open checkpoint's folder; a layer's .npy export never said it
    was saved; a variant added while another workspace was opening was lost, or brought the old
    workspace back, at random."""
    shown = []
    win._show_error = lambda title, message, details: shown.append(message)
    # two conversions at once: both written, both opened
    done = []
    win.convert_done.connect(done.append)
    for lb in ("gptq-w4g128", "awq-w4g128"):
        win.run_convert({"src": str(demo.variants[lb]), "dst": str(tmp_path / f"{lb}-mlx"), "to": "mlx"})
    qtbot.waitUntil(lambda: len(done) == 2, timeout=120_000)
    qtbot.waitUntil(lambda: {"gptq-w4g128-mlx", "awq-w4g128-mlx"} <= set(win.workspace.variants), timeout=30_000)
    # into an open checkpoint's folder: refused, nothing written
    inside = Path(demo.reference) / "sub"
    win.run_convert({"src": str(demo.variants["rtn-w4g128"]), "dst": str(inside), "to": "mlx"})
    assert shown and "never writes into" in shown[-1] and not inside.exists()
    # a layer's .npy: said when saved
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        assert win.tree.select("model.layers.0.mlp.up_proj")
    out = tmp_path / "up.npy"
    win._ask_npy = lambda default: str(out)
    win.export_dequant(win.current_layer)
    qtbot.waitUntil(lambda: win.statusBar().currentMessage() == f"Saved {out}", timeout=30_000)
    assert np.load(out).shape == (1536, 512)
    # a workspace being opened, and a variant added meanwhile: both land, whichever loads first
    gptq = str(Path(__file__).parent / "fixtures" / "real" / "gptqmodel-gptq-w4g128")
    ref, mlx = str(real_fixtures / "base-bf16"), str(real_fixtures / "mlx-affine-q4-g64")
    for _ in range(3):
        win.open_workspace([mlx], ref)
        win.add_paths([gptq])
        qtbot.waitUntil(lambda: set(win.workspace.models()) == {"base-bf16", "mlx-affine-q4-g64",
                                                              "gptqmodel-gptq-w4g128"}, timeout=60_000)
        qtbot.waitUntil(win.service.is_idle, timeout=60_000)
        assert set(win.workspace.models()) == {"base-bf16", "mlx-affine-q4-g64", "gptqmodel-gptq-w4g128"}
    assert {ref, mlx, gptq} <= set(win.settings.value("recent"))  # what a workspace opened is in Open recent

def test_screenshot_mode_exits_nonzero_with_a_message_when_nothing_opens(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "quantscope", str(tmp_path / "missing"), "--screenshot",
                        str(tmp_path / "s.png")], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "QT_QPA_PLATFORM": "offscreen"})
    assert r.returncode == 2  # bad input, as for every command
    assert "quantscope: error:" in r.stderr and "missing" in r.stderr
    assert (tmp_path / "s.png").exists()  # the window (with its error) is still saved


def test_a_screenshot_run_that_succeeds_prints_nothing_on_stderr(tmp_path, demo):
    # the offscreen platform's "does not support propagateSizeHints()" came one to four times
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "quantscope", str(demo.variants["gptq-w4g128"]), "--reference",
                        str(demo.reference), "--screenshot", str(tmp_path / "s.png")], capture_output=True, text=True,
                       timeout=180, env={**__import__("os").environ, "QT_QPA_PLATFORM": "offscreen"}, check=False)
    assert r.returncode == 0 and (tmp_path / "s.png").stat().st_size > 10_000
    assert r.stderr == "", r.stderr


def test_screenshot_is_never_written_into_an_opened_checkpoint(tmp_path, demo):
    # -o, --json and --csv refused it; --screenshot wrote its PNG into the checkpoint folder
    import shutil
    import subprocess
    import sys
    ck = tmp_path / "ck"
    shutil.copytree(demo.variants["gptq-w4g128"], ck)
    before = sorted(p.name for p in ck.iterdir())
    r = subprocess.run([sys.executable, "-m", "quantscope", str(ck), "--screenshot", str(ck / "s.png")],
                       capture_output=True, text=True, timeout=180,
                       env={**__import__("os").environ, "QT_QPA_PLATFORM": "offscreen"}, check=False)
    assert r.returncode == 2 and "never writes into a checkpoint it opened" in r.stderr
    assert sorted(p.name for p in ck.iterdir()) == before


def test_screenshot_script_goes_on_when_one_checkpoint_of_several_fails(qtbot, tmp_path, demo, monkeypatch):
    """One path that cannot be opened stopped the script: the others opened, but --select and
    --compare were skipped and an empty window was saved. Now they run; the exit status is 2."""
    import argparse

    from PySide6.QtWidgets import QApplication
    from quantscope.app.window_main import Script
    win = MainWindow(QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    win.quiet_errors = True
    qtbot.addWidget(win)
    win.resize(1280, 800)
    win.show()
    app = QApplication.instance()
    # the kernels' warm-up done first: the service idle when the open fails (a script that only
    # waited for an idle service then finished before the others had loaded)
    qtbot.waitUntil(win.service.is_idle, timeout=180_000)
    codes = []
    monkeypatch.setattr(app, "exit", lambda code=0: codes.append(code))
    layer = "model.layers.1.mlp.down_proj"
    args = argparse.Namespace(paths=[str(tmp_path / "missing"), str(demo.variants["gptq-w4g128"])],
                              reference=str(demo.reference), select=layer, compare=True,
                              screenshot=str(tmp_path / "s.png"))
    sc = Script(win, args, app)
    sc.start()
    qtbot.waitUntil(lambda: bool(codes), timeout=180_000)  # (a fresh clone compiles the kernels first)
    assert codes == [2] and (tmp_path / "s.png").exists()
    assert win.sweep_result is not None and win.sweep_result.rows  # compared
    from quantscope.widgets.tensor_tree import TensorTreeModel
    assert win.tree.view.currentIndex().data(TensorTreeModel.PathRole) == layer  # selected
    win.service.shutdown()


def test_the_tab_option_shows_that_view_in_the_screenshot(qtbot, tmp_path, demo, monkeypatch):
    """--tab heads with --select: the Heads view is the one shown (and saved), filled with the
    layer's heads; every short name --tab takes names a tab."""
    import argparse

    from PySide6.QtWidgets import QApplication
    from quantscope.app.cli import TABS, build_window_parser
    from quantscope.app.window_main import Script
    win = MainWindow(QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    win.quiet_errors = True
    qtbot.addWidget(win)
    win.resize(1280, 800)
    win.show()
    assert [win.page_named(t) for t in TABS] == [win.tabs.widget(i) for i in range(win.tabs.count()) if
                                                 win.tabs.widget(i) is not None][:len(TABS)]
    assert build_window_parser().parse_args(["--tab", "heads"]).tab == "heads"
    qtbot.waitUntil(win.service.is_idle, timeout=180_000)  # (as the test above: the warm-up done first)
    app = QApplication.instance()
    codes = []
    monkeypatch.setattr(app, "exit", lambda code=0: codes.append(code))
    args = argparse.Namespace(paths=[str(demo.variants["gptq-w4g128"])], reference=str(demo.reference),
                              select="model.layers.0.self_attn.k_proj", compare=False, tab="heads",
                              screenshot=str(tmp_path / "s.png"))
    sc = Script(win, args, app)  # (kept: its slots die with it)
    sc.start()
    qtbot.waitUntil(lambda: bool(codes), timeout=180_000)
    assert codes == [0] and (tmp_path / "s.png").exists()
    assert win.tabs.currentWidget() is win.heads and win.heads.axis.names == [f"k{i}" for i in range(8)]
    win.service.shutdown()


def test_no_widget_attribute_hides_a_qt_virtual(qtbot):
    # an attribute named like a QWidget method (``metric`` was one) replaces Qt's virtual:
    # Qt then calls the attribute while painting and gets an error instead of the device metric
    from PySide6.QtGui import QPaintDevice
    from PySide6.QtWidgets import QWidget
    from quantscope.widgets.histogram_view import HistogramView
    from quantscope.widgets.layer_error_plot import LayerErrorPlot
    from quantscope.widgets.tensor_tree import TensorTree
    for w in (LayerErrorPlot(), HistogramView("value"), TensorTree()):
        qtbot.addWidget(w)
        w.resize(300, 200)
        clash = [a for a in vars(w) if type(getattr(QWidget, a, None)).__name__ == "method_descriptor"]
        assert not clash, (type(w).__name__, clash)
        assert w.metric(QPaintDevice.PaintDeviceMetric.PdmWidth) == 300


def test_updates_in_turns_run_in_order_and_a_newer_call_drops_the_rest(win, qtbot):
    # Results are shown in steps, one per turn of the event loop (each repainted before the
    # next); a newer result on the same channel replaces what an older one had left to do.
    ran = []

    def a2():
        ran.append("a2")
        win._in_turns("t", [lambda: ran.append("b1"), lambda: ran.append("b2")])

    win._in_turns("t", [lambda: ran.append("a1"), a2, lambda: ran.append("a3")])
    assert ran == [] and win.turns_pending()  # from the next turn on
    qtbot.waitUntil(lambda: "b2" in ran, timeout=2000)
    qtbot.wait(20)
    assert ran == ["a1", "a2", "b1", "b2"] and not win.turns_pending()
    # a new workspace drops what an older sweep result had left to show
    def s1():
        ran.append("s1")
        win._drop_turns("sweep")  # as set_workspace does

    win._in_turns("sweep", [s1, lambda: ran.append("s2")])
    qtbot.waitUntil(lambda: "s1" in ran, timeout=2000)
    qtbot.wait(30)
    assert ran[-1] == "s1" and not win.turns_pending()


def test_layers_view_names_layers_whose_error_is_not_finite(qtbot):
    from types import SimpleNamespace

    from quantscope.widgets.layer_error_plot import LayerErrorPlot
    plot = LayerErrorPlot()
    qtbot.addWidget(plot)
    rows = [SimpleNamespace(name=f"model.layers.{i}.mlp.down_proj", variant="v", layer_index=i, proj="down_proj",
                            rel_fro=r, sqnr_db=-20 * np.log10(r), rel_fro_raw=r) for i, r in enumerate([0.1, np.nan, 0.2])]
    plot.set_rows(rows, {"v": "#f00"})
    assert "1 with a non-finite error" in plot.info.text() and "v: model.layers.1.mlp.down_proj" in plot.info.text()
    x, y = plot.series["v"].getData()
    assert list(x) == [0, 1, 2] and np.isnan(y[1]) and plot.hint.text() == ""
    assert plot.info.text().startswith("2 (layer, variant) points")  # the NaN one is not plotted
    # the heatmap paints that cell red (blank was the look of a projection the layer lacks)
    bad = plot.hm_bad.image
    assert bad is not None and bad.shape[:2] == (3, 1) and bad[1, 0, 0] == 228 and bad[[0, 2], 0, 3].max() == 0
    # where the reference's own weights hold the NaN, the summary blames the reference
    plot.set_reference_nonfinite(["model.layers.1.mlp.down_proj"])
    assert "NaN/inf in the reference's own weights (e.g. model.layers.1.mlp.down_proj)" in plot.info.text()
    assert "v: model.layers.1" not in plot.info.text()


def test_one_point_is_plotted_from_zero_not_centred_on_a_span_of_one(qtbot):
    # a single-layer comparison: pyqtgraph centred a span of 1 on the value (-0.49 to 0.51 for a
    # rel_fro of 0.01), which put the point on the zero line
    from types import SimpleNamespace

    from quantscope.widgets.layer_error_plot import LayerErrorPlot
    plot = LayerErrorPlot()
    qtbot.addWidget(plot)
    plot.set_rows([SimpleNamespace(name="model.layers.0.mlp.down_proj", variant="v", layer_index=0, proj="down_proj",
                                   rel_fro=0.01, sqnr_db=40.0, rel_fro_raw=0.01)], {"v": "#f00"})
    lo, hi = plot.plot.getViewBox().viewRange()[1]
    assert -0.002 < lo <= 0.0 and 0.02 <= hi < 0.022
    # the heatmap's colour bar names the metric (it had no label; SQNR's scale runs the other way)
    assert plot.hm_bar.getAxis("right").labelText == "rel. error"
    plot.metric_box.setCurrentIndex(plot.metric_box.findData("sqnr_db"))
    assert plot.hm_bar.getAxis("right").labelText == "SQNR (dB), higher is better"


def test_an_exact_layer_is_not_flagged_non_finite_under_sqnr(qtbot):
    # rel_fro 0 (a layer a mixed-precision variant left unquantized) has an SQNR of +inf: it was
    # painted red and counted "with a non-finite error … Run doctor" under the SQNR metric
    from types import SimpleNamespace

    from quantscope.widgets.layer_error_plot import LayerErrorPlot
    plot = LayerErrorPlot()
    qtbot.addWidget(plot)
    rows = [SimpleNamespace(name=f"model.layers.{i}.mlp.down_proj", variant="v", layer_index=i, proj="down_proj",
                            rel_fro=r, sqnr_db=math.inf if r == 0 else -20 * np.log10(r), rel_fro_raw=r)
            for i, r in enumerate([0.1, 0.0, np.nan])]
    plot.set_rows(rows, {"v": "#f00"})
    for metric in ("rel_fro", "sqnr_db"):
        plot.metric_box.setCurrentIndex(plot.metric_box.findData(metric))
        assert "1 with a non-finite error" in plot.info.text() and "v: model.layers.2.mlp.down_proj" in plot.info.text()
        red = plot.hm_bad.image[:, 0, 3] > 0
        assert list(red) == [False, False, True], metric


def test_layers_view_summary_counts_the_projection_shown_and_fits_its_text(qtbot):
    from types import SimpleNamespace

    from quantscope.widgets.layer_error_plot import LayerErrorPlot
    plot = LayerErrorPlot()
    qtbot.addWidget(plot)
    plot.resize(520, 600)
    plot.show()
    rows = [SimpleNamespace(name=f"model.layers.{i}.{p}", variant=v, layer_index=i, proj=p.rpartition(".")[2],
                            rel_fro=0.1, sqnr_db=20.0, rel_fro_raw=0.1)
            for i in range(4) for p in ("self_attn.q_proj", "mlp.down_proj") for v in ("a", "b")]
    rows[0].rel_fro = math.nan
    plot.set_rows(rows, {"a": "#f00", "b": "#00f"})
    assert plot.info.text().startswith("15 (layer, variant) points from 2 variant(s);")
    plot.proj.setCurrentIndex(plot.proj.findData("down_proj"))
    assert plot.info.text().startswith("8 (layer, variant) points from 2 variant(s) (down_proj).")
    plot.proj.setCurrentIndex(0)
    # the label is as tall as its wrapped text (a fixed three lines cut a four-line summary)
    assert plot.info.height() >= plot.info.heightForWidth(plot.info.width())
    # emptied (another workspace): no colour bar or axis key left from the last one
    assert plot.hm_bar.isVisible()
    plot.set_rows([], {})
    assert not plot.hm_bar.isVisible() and plot.hm.getAxis("bottom").labelText == "projection"
    assert "Compare all layers" in plot.info.text()


def test_layers_view_offers_the_quantization_own_error_only_when_a_variant_has_it(qtbot):
    # a doubly smoothed variant has rel_fro_quant; the others' own error is their rel_fro
    from types import SimpleNamespace

    from quantscope.widgets.layer_error_plot import QUANT_ONLY, LayerErrorPlot
    plot = LayerErrorPlot()
    qtbot.addWidget(plot)

    def rows(quant):
        return [SimpleNamespace(name=f"model.layers.{i}.mlp.down_proj", variant=v, layer_index=i, proj="down_proj",
                                rel_fro=r, sqnr_db=-20 * np.log10(r), rel_fro_raw=r, rel_fro_quant=q)
                for v, r, q in (("bad", 0.6, quant), ("ok", 0.15, None)) for i in range(2)]
    plot.set_rows(rows(None), {"bad": "#f00", "ok": "#00f"})
    assert plot.metric_box.findData(QUANT_ONLY[0]) < 0
    plot.set_rows(rows(0.11), {"bad": "#f00", "ok": "#00f"})
    plot.metric_box.setCurrentIndex(plot.metric_box.findData(QUANT_ONLY[0]))
    assert list(plot.series["bad"].getData()[1]) == [0.11, 0.11] and list(plot.series["ok"].getData()[1]) == [0.15, 0.15]
    assert plot.plot.getAxis("left").labelText == QUANT_ONLY[1][1]
    # a row of the inconsistent variant without the figure (its layer not decodable) has no point,
    # not its smoothing-laden rel_fro
    r2 = rows(0.11)
    r2[1].rel_fro_quant = None
    plot.set_rows(r2, {"bad": "#f00", "ok": "#00f"})
    assert np.isnan(plot.series["bad"].getData()[1]).sum() == 1
    plot.set_rows(rows(None), {"bad": "#f00", "ok": "#00f"})  # a new comparison without: the choice goes
    assert plot.metric_box.findData(QUANT_ONLY[0]) < 0 and plot.metric_box.currentData() == "rel_fro"


def test_doctor_panel_counts_the_findings_a_summary_entry_stands_for(qtbot):
    from quantscope.widgets.doctor_panel import DoctorPanel
    panel = DoctorPanel()
    qtbot.addWidget(panel)
    panel.set_findings("x", [{"rule": "container.overlap", "severity": "error", "message": "a", "count": 1},
                             {"rule": "container.overlap", "severity": "error", "message": "… and 9 more", "count": 9},
                             {"rule": "gptq.act-order", "severity": "info", "message": "b"}])
    assert "10 errors, 1 info" in panel.title.text() and "warning" not in panel.title.text()


def test_doctor_findings_read_in_full_in_a_narrow_dock_and_link_to_their_layer(qtbot):
    """In a 300 px dock the findings table showed "32 …" and cut the tensor's suffix: each
    finding is now wrapped text with its whole place, and the place selects the layer."""
    from PySide6.QtCore import QUrl
    from quantscope.widgets.doctor_panel import DoctorPanel
    panel = DoctorPanel()
    qtbot.addWidget(panel)
    panel.resize(300, 500)
    panel.show()
    msg = "32 of 3072 scales are NaN: " + "whole groups decode to NaN and every figure of this layer is NaN " * 3
    panel.set_findings("gptq", [{"rule": "values.non-finite", "severity": "error", "message": msg,
                                 "file": "/m/model.safetensors", "tensor": "model.layers.0.self_attn.q_proj.scales",
                                 "layer": "model.layers.0.self_attn.q_proj"}])
    text = panel.text.toPlainText()
    assert msg.strip() in text.replace("\n", " ") and "model.layers.0.self_attn.q_proj.scales" in text
    assert "warning" not in text and "info" not in text  # no empty headings
    assert panel.text.document().size().width() <= panel.text.viewport().width() + 1  # wrapped, no side scroll
    with qtbot.waitSignal(panel.layer_activated) as sig:
        panel.text.anchorClicked.emit(QUrl("layer:model.layers.0.self_attn.q_proj"))
    assert sig.args == ["model.layers.0.self_attn.q_proj"]


def test_window_fits_1024_wide_whatever_is_selected(win, qtbot):
    # A layer name in a toolbar, a long metric name or checkpoint path in a combo box once set
    # the window's minimum width (1256 px, 1577 px after selecting a layernorm).
    win.tabs.setCurrentWidget(win.hist)
    for name in ("model.layers.2.self_attn.q_proj", "model.layers.0.post_attention_layernorm"):
        win.tree.select(name)
        qtbot.waitUntil(lambda name=name: win.hist.note.text().startswith(name), timeout=30_000)
        assert win.minimumSizeHint().width() <= 1024, name
    assert win.hist.note.text().startswith("model.layers.0.post_attention_layernorm · a vector")


def test_doctor_findings_stay_with_their_checkpoint(win, qtbot):
    win.tree.combo.setCurrentText("gptq-w4g128-actorder")
    with qtbot.waitSignal(win.doctor_done, timeout=60_000):
        win.run_doctor()
    flags = dict(win.tree.model._flags)
    assert flags and "gptq-w4g128-actorder" in win.doctor.title.text()
    win.tree.combo.setCurrentText("mlx-affine-q4g64")  # not checked: none of the other's findings
    assert win.tree.model._flags == {} and win.doctor.groups() == {}
    assert "not checked yet" in win.doctor.title.text()
    win.tree.combo.setCurrentText("gptq-w4g128-actorder")  # back: its findings again
    assert win.tree.model._flags == flags and "gptq-w4g128-actorder" in win.doctor.title.text()


def test_status_messages_are_not_covered_by_the_jobs_strip(win, qtbot):
    win._show_error("x", "cannot open /nowhere/model.safetensors", "")
    bar = win.statusBar()
    assert bar.currentMessage() == "cannot open /nowhere/model.safetensors"
    jobs = next(w for w in bar.children() if type(w).__name__ == "JobsBar")
    assert jobs.width() <= bar.width() // 2  # the message has the rest of the bar
    # a long one is cut with "…" before the strip begins (it ran into "Ready", cut mid-word)
    long = "/tmp/x/contra_bits: no layer can be compared with the reference — " + "the variant's layer cannot " * 20
    win._show_error("x", long, "")
    shown = bar.currentMessage()
    assert shown.endswith("…") and bar.fontMetrics().horizontalAdvance(shown) < jobs.x() - 8
    assert bar.toolTip() == long



def test_whatif_offers_the_shown_layers_settings_until_the_user_picks(win, qtbot):
    """It offered 4 bit / 64 for a GPTQ g128 layer (so Requantize compared unlike settings)."""
    win.tree.combo.setCurrentText("mlx-mixed-3-6")
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        win.tree.select("model.layers.2.mlp.down_proj")  # 6 bit there
    assert (win.config.bits.currentText(), win.config.group.currentText()) == ("6", "64")
    win.tree.combo.setCurrentText("gptq-w4g128")
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        win.tree.select("model.layers.0.mlp.up_proj")
    assert (win.config.bits.currentText(), win.config.group.currentText()) == ("4", "128")
    i = win.config.bits.findText("3")
    win.config.bits.setCurrentIndex(i)
    win.config.bits.activated.emit(i)  # the user's pick: kept from then on
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        win.tree.select("model.layers.1.mlp.up_proj")
    assert win.config.bits.currentText() == "3"


def test_whatif_block_float_modes_show_their_own_bits_and_block(win, qtbot):
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        win.tree.select("model.layers.0.mlp.up_proj")
    win.config.bits.setCurrentText("3")
    group = win.config.group.currentText()  # (the shown layer's: gptq-w4g128's 128)
    win.config.mode.setCurrentText("nvfp4")
    assert not win.config.bits.isEnabled() and win.config.bits.currentText() == "4"
    assert win.config.group.currentText() == "16"
    qtbot.mouseClick(win.config.run, __import__("PySide6.QtCore", fromlist=["Qt"]).Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: "What-if nvfp4 4 bit / 16" in win.config.whatif_result.text(), timeout=30_000)
    win.config.mode.setCurrentText("mxfp8")
    win.config.mode.setCurrentText("affine")  # its choices and last setting return (3 bit / 128)
    assert win.config.bits.isEnabled() and win.config.group.isEnabled()
    assert win.config.bits.currentText() == "3" and win.config.group.currentText() == group == "128"
    assert [win.config.group.itemText(i) for i in range(win.config.group.count())] == ["32", "64", "128"]


def test_plots_read_in_the_data_units_and_layers_are_whole_numbers(qtbot):
    from quantscope.widgets.layer_error_plot import (
        LayerErrorPlot,
        _proj_labels,
        _proj_order,
    )
    plot = LayerErrorPlot()
    qtbot.addWidget(plot)
    left = plot.plot.getAxis("left")
    assert not left.autoSIPrefix  # 0.29 is shown as 0.29, not 290 "(x0.001)"
    ticks = plot.plot.getAxis("bottom").tickValues(-0.3, 3.3, 400)
    assert ticks and all(float(v).is_integer() for _, vals in ticks for v in vals)
    projs = sorted(["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"], key=_proj_order)
    assert projs == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert _proj_labels(projs) == (["q", "k", "v", "o", "g", "up", "d"], "g = gate, d = down")



def test_moe_heatmap_cells_hold_the_worst_expert_and_the_router_is_named(qtbot):
    # 40 layers x (router + 3 expert projections x 4 experts): a cell showed its last expert, the
    # router was labelled like gate_proj, and 40 row labels ran into each other
    from types import SimpleNamespace

    from quantscope.widgets.layer_error_plot import LayerErrorPlot
    plot = LayerErrorPlot()
    qtbot.addWidget(plot)
    rows = [SimpleNamespace(name=f"model.layers.{i}.mlp.gate", variant="v", layer_index=i, proj="gate",
                            rel_fro=0.01, sqnr_db=40.0, rel_fro_raw=0.01) for i in range(40)]
    for i in range(40):
        for p in ("gate_proj", "up_proj", "down_proj"):
            for e, r in enumerate((0.09, 0.13 if (i, p) == (3, "up_proj") else 0.1, 0.08, 0.095)):
                rows.append(SimpleNamespace(name=f"model.layers.{i}.mlp.experts.{e}.{p}", variant="v", layer_index=i,
                                            proj=p, rel_fro=r, sqnr_db=-20 * np.log10(r), rel_fro_raw=r))
    plot.set_rows(rows, {"v": "#f00"})
    grid = plot.hm_image.image
    assert grid.shape == (40, 4) and grid[3, 2] == 0.13 and grid[5, 2] == 0.1 and grid[0, 0] == 0.01
    assert plot._hm_names[(3, 2)] == "model.layers.3.mlp.experts.1.up_proj"  # a click selects the worst
    assert "r = router" in plot.hm.getAxis("bottom").labelText
    assert "worst expert" in plot.info.text()
    left = plot.hm.getAxis("left")._tickLevels[0]
    assert 8 <= len(left) <= 16 and left[0][1] == "0"
    # the router's 0.01 set the colours' bottom and every expert cell (0.1-0.13) came out one
    # yellow: the colours span the experts', the router sits below the scale, said in the title
    def title():
        return plot.hm.getPlotItem().titleLabel.text

    assert plot.hm_bar.levels() == (0.1, 0.13) and title() == "v (r: below the colour scale)"
    plot.metric_box.setCurrentIndex(plot.metric_box.findData("sqnr_db"))  # the same in dB
    assert plot.hm_bar.levels() == pytest.approx((-20 * np.log10(0.13), 20.0)) and "below" in title()
    # in dB too a cell holds its worst expert: the lowest SQNR (it showed the best one's, 21.9 dB)
    assert plot.hm_image.image[3, 2] == pytest.approx(-20 * np.log10(0.13)) and plot._hm_names[(3, 2)].endswith(
        "experts.1.up_proj")
    plot.metric_box.setCurrentIndex(plot.metric_box.findData("rel_fro"))
    like = [SimpleNamespace(**{**vars(r), "rel_fro": 0.095, "rel_fro_raw": 0.095, "sqnr_db": -20 * np.log10(0.095)})
            for r in rows[:40]]
    plot.set_rows(like + rows[40:], {"v": "#f00"})  # a router like the rest: in the range
    assert plot.hm_bar.levels() == (0.095, 0.13) and title() == "v"

def test_code_usage_of_different_bit_widths_gets_a_plot_per_level_count(qtbot):
    from quantscope.widgets.code_usage_view import CodeUsageView
    view = CodeUsageView()
    qtbot.addWidget(view)
    view.show()
    counts = {"w4a": np.arange(1, 17), "w3": np.r_[0, np.ones(7)], "w4b": np.ones(16)}
    view.set_counts(counts, {"w3": "#f00", "w4a": "#00f", "w4b": "#0f0"}, absent=["fp8"])

    def bars(plot):
        return [i for i in plot.getPlotItem().items if type(i).__name__ == "BarGraphItem"]

    plots = view.plots()
    assert len(plots) == 2 and len(view.figure_parts()) == 4  # legend, two plots, summary
    # fewest levels first, each on its own integer axis: a 3-bit bar never stands among 4-bit ones
    assert plots[0].getPlotItem().titleLabel.text == "8 levels (3-bit)"
    assert plots[1].getPlotItem().titleLabel.text == "16 levels (4-bit)"
    (b3,) = bars(plots[0])
    np.testing.assert_allclose(b3.opts["x"], np.arange(8))  # one variant: centred on its levels
    np.testing.assert_allclose(b3.opts["height"], 100 * counts["w3"] / 7)
    xa, xb = (np.asarray(b.opts["x"]) for b in bars(plots[1]))
    np.testing.assert_allclose(xb - xa, 0.4)  # side by side within each level
    assert np.all(np.abs(xa - np.arange(16)) < 0.5) and "fp8" in view.summary.text()
    assert "unused [0]" in view.summary.text()
    view.log_y.setChecked(True)  # the log scale's ticks in percent, each decade
    p4 = view.plots()[1]
    ticks = p4.getAxis("left")._tickLevels
    assert ticks and (0, "1") in ticks[0] and (-1, "0.1") in ticks[0]  # w4a's smallest share, 1/136: 0.7 %
    assert p4.getAxis("left").labelText == "share (%, log)"
    # the bars stand on the decade under the smallest share used (they stood on 1e-6 %)
    b4 = bars(p4)[0]
    assert float(np.min(b4.opts["y0"])) == pytest.approx(-1.25) and p4.getViewBox().viewRange()[1][0] > -1.5
    # a number of levels whose variants are all hidden in the legend: its plot goes
    view.legend.hidden.add("w3")
    view._redraw()
    assert len(view.plots()) == 1
    view.legend.hidden.discard("w3")
    view._redraw()
    view.log_y.setChecked(False)
    assert view.plot.getAxis("left")._tickLevels is None
    view.set_counts({"w4": np.ones(16)}, {"w4": "#00f"})  # one level count again: one plot, untitled
    assert view.plots() == [view.plot] and not view.plot.getPlotItem().titleLabel.isVisible()
    assert view.plot.getAxis("bottom").labelText == "code level" and len(bars(view.plot)) == 1


def test_tree_shows_name_then_the_shown_checkpoints_error_then_scheme_and_bits(win, qtbot):
    h, model = win.tree.view.header(), win.tree.model
    for label, title in (("awq-w4g128", "error"), ("gptq-w4g128", "error")):
        win.tree.combo.setCurrentText(label)
        first = [model.headerData(h.logicalIndex(i), Qt.Orientation.Horizontal) for i in range(4)]
        assert first == ["Name", title, "Scheme", "Bits"]
    win.tree.combo.setCurrentIndex(0)  # the reference: no error of its own
    first = [model.headerData(h.logicalIndex(i), Qt.Orientation.Horizontal) for i in range(3)]
    assert first == ["Name", "Scheme", "Bits"]


def test_config_panel_highlights_the_checkpoint_the_tree_shows(win, qtbot):
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        win.tree.select("model.layers.0.mlp.up_proj")
    for label in ("mlx-mixed-3-6", "awq-w4g128"):
        win.tree.combo.setCurrentText(label)
        t = win.config.layer_table
        assert t.item(t.currentRow(), 0).text() == label and win.config.rule.text().startswith(f"<b>{label}</b>")


def test_layers_view_stacks_its_plots_when_narrow(qtbot):
    from quantscope.widgets.layer_error_plot import LayerErrorPlot
    plot = LayerErrorPlot()
    qtbot.addWidget(plot)
    plot.resize(600, 700)
    plot.show()
    qtbot.waitUntil(lambda: plot.split.orientation() == Qt.Orientation.Vertical, timeout=2000)
    plot.resize(1200, 700)
    qtbot.waitUntil(lambda: plot.split.orientation() == Qt.Orientation.Horizontal, timeout=2000)


def test_legends_sit_outside_the_plots_with_each_variants_colour_and_mark(win, qtbot):
    """pyqtgraph's legend covered the data of narrow plots: the legend is a row above each plot,
    onto more lines when narrow, never an item in the plot's scene."""
    import pyqtgraph as pg
    from quantscope.widgets.palette import VARIANT_SYMBOLS
    from quantscope.widgets.plots import SYMBOL_GLYPHS
    with qtbot.waitSignal(win.sweep_done, timeout=120_000):
        win.compare_all()
    plot = win.layers
    entries = plot.legend.entries()
    assert [e[0] for e in entries] == list(plot.series)
    for i, (name, color, glyph) in enumerate(entries):
        item = plot.series[name]
        assert item.opts["symbol"] == VARIANT_SYMBOLS[i] and glyph == SYMBOL_GLYPHS[VARIANT_SYMBOLS[i]]
        assert pg.mkBrush(item.opts["symbolBrush"]).color().name() == color
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        assert win.tree.select("model.layers.1.mlp.down_proj")
    win.tabs.setCurrentWidget(win.hist)
    qtbot.waitUntil(lambda: bool(win.hist._counts), timeout=30_000)
    assert [e[0] for e in win.hist.legend.entries()] == list(win.hist._counts)
    for view in (plot.plot, win.hist.plot):
        assert not any(isinstance(it, pg.LegendItem) for it in view.scene().items())
    # narrow: the entries wrap onto more lines, and the legend grows to hold them
    legend = plot.legend
    wide, narrow = legend.heightForWidth(2000), legend.heightForWidth(300)
    assert narrow > wide > 0


def test_histograms_open_on_the_bulk_and_say_what_lies_outside(qtbot):
    """A few outliers (a weight of 12 among weights within ±0.7) set the histogram's edges: the
    view opens on the bulk, says how many values lie beyond it and how many are NaN/inf, and
    "All" shows everything."""
    from quantscope.backend.metrics import bulk_histograms
    from quantscope.widgets.histogram_view import HistogramView
    rng = np.random.default_rng(0)
    a = rng.standard_normal(100_000) * 0.1
    a[:2] = [12.0, -3.0]
    edges, counts, view = bulk_histograms({"awq": a, "reference": rng.standard_normal(100_000) * 0.1})
    h = HistogramView("weight value")
    qtbot.addWidget(h)
    h.resize(700, 400)
    h.show()
    h.set_histograms(edges, counts, {"awq": "#D55E00", "reference": "#7f7f7f"}, view=view, nonfinite={"awq": 7})
    (x0, x1), _ = h.plot.getViewBox().viewRange()
    assert -1.0 < x0 < -0.3 and 0.3 < x1 < 1.0  # the bulk, not -3..12
    assert h.lo.value() == pytest.approx(view[0], abs=1e-6) and h.bulk.isEnabled()
    text = h.footer.toolTip()
    # values in no bin first: at a normal width the elided line still says them
    assert text.startswith("NaN/inf, in no bin: awq 7. Beyond the bulk ") and "(to 12)" in text, text
    text = text.split(". ", 1)[1]
    assert text.split(": ", 1)[1].startswith("awq ")  # whose value sets the full range: listed first
    assert "reference" not in text.split(";")[0] or "reference 1 " in text  # only series with values beyond
    xs, _ = h._marks["awq"].getData()  # the outliers get dots, visible with "All"
    assert any(abs(x - 12.0) < 0.05 for x in xs) and any(abs(x + 3.0) < 0.05 for x in xs)
    h.reset.click()
    (x0, x1), _ = h.plot.getViewBox().viewRange()
    assert x0 < -3.0 and x1 > 12.0



def test_layers_plot_says_what_a_point_is_and_rings_the_selected_layer(qtbot):
    """Hovering a point or a heatmap cell showed nothing (a click, which changes the selection,
    was the only way to know which of a variant's seven points at one depth was which); the
    selected layer was not marked. Eight variants stay within ±0.2 of their layer."""
    from types import SimpleNamespace

    from PySide6.QtCore import QPointF
    from quantscope.widgets.layer_error_plot import LayerErrorPlot
    plot = LayerErrorPlot()
    qtbot.addWidget(plot)
    plot.resize(1200, 600)
    plot.show()
    qtbot.waitExposed(plot)
    variants = [f"v{k}" for k in range(8)]
    rows = [SimpleNamespace(name=f"model.layers.{i}.mlp.{p}", variant=v, layer_index=i, proj=p,
                            rel_fro=0.05 * (k + 1) + (0.3 if p == "down_proj" else 0), sqnr_db=0.0, rel_fro_raw=0.1)
            for k, v in enumerate(variants) for i in range(3) for p in ("up_proj", "down_proj")]
    plot.set_rows(rows, {v: "#E69F00" for v in variants})
    xs = np.concatenate([x for x, _, _ in plot._pts.values()])
    assert np.abs(xs - np.rint(xs)).max() <= 0.2 + 1e-9
    x, y, names = plot._pts["v3"]
    i = names.index("model.layers.1.mlp.down_proj")
    vb = plot.plot.getPlotItem().vb
    plot._plot_hover(vb.mapViewToScene(QPointF(x[i], y[i])))
    tip = plot.plot.toolTip()
    assert tip.startswith("model.layers.1.mlp.down_proj\nv3: ") and f"{y[i]:.5g}" in tip
    plot._plot_hover(vb.mapViewToScene(QPointF(x[i] + 0.5, y[i] + 10)))  # far from every point
    assert plot.plot.toolTip() == ""
    plot.mark_layer("model.layers.1.mlp.down_proj")
    rx, ry = plot.ring.getData()
    assert len(rx) == 8 and set(np.round(ry, 6)) == {round(0.05 * (k + 1) + 0.3, 6) for k in range(8)}
    hv = plot.hm.getPlotItem().vb
    plot.hm_variant.setCurrentText("v2")
    cell = next(k for k, n in plot._hm_names.items() if n == "model.layers.2.mlp.up_proj")
    plot._hm_hover(hv.mapViewToScene(QPointF(cell[1] + 0.5, cell[0] + 0.5)))
    assert plot.hm.toolTip().startswith("model.layers.2.mlp.up_proj\nv2: ")


def test_layers_heatmap_colours_on_its_own_or_a_shared_scale(qtbot):
    """Each variant's heatmap stretched its colours over its own range, so a noise-level spread
    (0.0910-0.0912) looked dramatic and two variants could not be compared by colour."""
    from types import SimpleNamespace

    from quantscope.widgets.layer_error_plot import LayerErrorPlot
    plot = LayerErrorPlot()
    qtbot.addWidget(plot)
    rows = [SimpleNamespace(name=f"model.layers.{i}.self_attn.{p}", variant=v, layer_index=i, proj=p, rel_fro=e + i * d,
                            sqnr_db=0.0, rel_fro_raw=e)
            for v, e, d in (("q4", 0.0910, 0.0001), ("q3", 0.30, 0.02)) for i in range(3) for p in ("q_proj", "k_proj")]
    plot.set_rows(rows, {"q4": "#E69F00", "q3": "#0072B2"})
    plot.hm_variant.setCurrentText("q4")
    assert not plot.hm_scale.isChecked()  # its own range: which of its layers it hurts
    # ... but 0.0910 against 0.0912 is no contrast of darkest against brightest: the colours
    # span at least a tenth of the error's size around its middle
    assert plot.hm_bar.levels() == pytest.approx((0.0911 - 0.004555, 0.0911 + 0.004555))
    plot.hm_variant.setCurrentText("q3")  # a spread wider than that: its own range exactly
    assert plot.hm_bar.levels() == pytest.approx((0.30, 0.34))
    plot.hm_variant.setCurrentText("q4")
    plot.hm_scale.setChecked(True)
    assert plot.hm_bar.levels() == pytest.approx((0.0910, 0.34))
    # bright is worse in every metric: SQNR, where higher is better, runs the colours backwards
    import pyqtgraph as pg
    worst = plot.hm_bar.colorMap().map(1.0, mode="qcolor").lightness()
    plot.metric_box.setCurrentIndex(plot.metric_box.findData("sqnr_db"))
    assert plot.hm_bar.colorMap().map(0.0, mode="qcolor").lightness() == worst
    assert pg.colormap.get("viridis").map(1.0, mode="qcolor").lightness() == worst  # the shared map untouched


def test_an_empty_histogram_keeps_no_range_or_axis_of_the_layer_before(qtbot):
    # a 1-D layer after a matrix: the disabled range boxes kept -1.265…1.094, and log y said
    # "count" on an empty Error view while the Values view said "log10(count)"
    from quantscope.widgets.histogram_view import HistogramView
    h = HistogramView("weight value")
    qtbot.addWidget(h)
    assert h.plot.getAxis("left").labelText == "log10(count)"  # before any layer too
    h.set_histograms(np.linspace(-1.25, 1.0, 9), {"a": np.arange(8)}, {"a": "#000000"})
    assert h.lo.text().startswith("-1.25")
    h.set_histograms(None, {}, {}, note="x is not a weight matrix")
    assert h.lo.text().strip() == "" and h.hi.text().strip() == "" and not h.lo.isEnabled()
    assert h.plot.getAxis("left").labelText == "log10(count)"
    h.set_histograms(np.linspace(0.0, 2.0, 9), {"a": np.arange(8)}, {"a": "#000000"})
    assert h.lo.text().startswith("0.0") and h.lo.isEnabled()


def test_a_discrete_log_histogram_starts_at_the_empty_bins_floor(qtbot):
    # every level used at least 4 times: the axis began at log10(4), so that level looked unused
    from quantscope.widgets.histogram_view import LOG_FLOOR, HistogramView
    h = HistogramView("zero point", discrete=True)
    qtbot.addWidget(h)
    h.set_histograms(np.arange(-0.5, 16), {"a": np.r_[4, np.full(15, 300)]}, {"a": "#000000"})
    y0, y1 = h.plot.getViewBox().viewRange()[1]
    assert y0 < LOG_FLOOR < math.log10(4) and y1 >= math.log10(300)
    assert not h.plot.getViewBox().autoRangeEnabled()[1]
    h.log_y.setChecked(False)  # linear again: autoranged over the counts
    assert h.plot.getViewBox().autoRangeEnabled()[1]


def test_a_log_histograms_lone_tall_bin_drops_to_the_floor(qtbot):
    """Every exact zero of a layer in one bin between empty ones: the tallest bin was drawn as a
    short dash floating high above the curve; a sparse tail stays gaps, no comb to a floor."""
    from quantscope.widgets.histogram_view import LOG_FLOOR, HistogramView
    h = HistogramView("error")
    qtbot.addWidget(h)
    counts = np.array([0, 0, 5, 9, 0, 100_000, 0, 17, 0, 0, 0, 1, 0, 0, 0], np.int64)
    h.set_histograms(np.linspace(-1.0, 1.0, counts.size + 1), {"a": counts}, {"a": "#000000"})
    y = h._items["a"].getData()[1]
    assert y[5] == pytest.approx(5.0) and y[4] == y[6] == LOG_FLOOR  # the spike stands on the floor
    assert y[11] == 0.0 and np.isnan(y[10]) and np.isnan(y[12])  # a sparse tail's count: a dash, no comb
    assert np.isnan(y[0]) and np.isnan(y[9]) and np.isnan(y[14])  # (runs of empty bins: gaps)
    # no tick labels below log10(1) = 0: the floor's ticks read -0.1, -0.2 as if counts
    assert h.plot.getAxis("left").tickStrings([-0.2, 0.0, 1.0], 1, 0.2)[0] == ""


def test_group_error_map_shows_the_trees_checkpoint(win, qtbot):
    # it started on the first variant whatever the tree showed, and did not follow the tree
    win.tabs.setCurrentWidget(win.heatmap)  # (a hidden view is brought up to date when shown)
    win.tree.combo.setCurrentText("awq-w4g128")
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        assert win.tree.select("model.layers.1.mlp.down_proj")
    assert win.heatmap.variant.currentText() == "awq-w4g128"
    win.tree.combo.setCurrentText("mlx-affine-q4g64")
    assert win.heatmap.variant.currentText() == "mlx-affine-q4g64"
    # a variant chosen in the view stays from layer to layer
    i = win.heatmap.variant.findText("rtn-w4g128")
    win.heatmap.variant.setCurrentIndex(i)
    win.heatmap.variant.activated.emit(i)
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        assert win.tree.select("model.layers.2.mlp.down_proj")
    assert win.heatmap.variant.currentText() == "rtn-w4g128"


def test_heads_tab_shows_each_heads_error_of_every_variant(win, qtbot, demo):
    """The Heads tab: o_proj's input columns in the demo config's 8 heads of 64, one series per
    variant with the detail's figures (held to numpy on the decoded layers in tests/test_heads.py),
    each variant's worst head named; an MLP layer has no heads and says so."""
    import numpy as np
    import pyqtgraph as pg
    from quantscope.backend.compare import layer_detail
    from quantscope.backend.heads import head_layout
    win.tabs.setCurrentWidget(win.heads)
    name = "model.layers.1.self_attn.o_proj"
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        assert win.tree.select(name)
    view = win.heads
    assert view.axis.names == [f"h{i}" for i in range(8)]
    assert "8 heads of 64 input columns" in view.note.text() and "num_attention_heads 8" in view.note.text()
    d = layer_detail(win.workspace.reference, win.workspace.variants, name)
    assert set(view._series) == set(win.workspace.variants) == set(d.head_error)
    for label, (item, line) in view._series.items():
        x, y = item.getData()
        np.testing.assert_array_equal(y, d.head_error[label])
        assert np.array_equal(np.round(x), np.arange(8))  # (offset a little per variant)
        assert line.value() == pytest.approx(d.metrics[label].rel_fro)  # the layer's own error, dotted
    worst = max(d.head_error["gptq-w4g128"])
    i = int(np.argmax(d.head_error["gptq-w4g128"]))
    ratio = worst / d.metrics["gptq-w4g128"].rel_fro
    assert f"gptq-w4g128 h{i} {worst:.3g} ({ratio:.2f}×)" in view.worst.text()
    assert not view.hint.text()
    # each head over its layer's error: the gptq series' worst point is that ratio, the dotted lines at 1
    view.ratio.setChecked(True)
    item, line = view._series["gptq-w4g128"]
    assert item.getData()[1][i] == pytest.approx(ratio) and line.value() == 1.0
    assert view.plot.getAxis("left").labelText == "head's error ÷ the layer's"
    view.ratio.setChecked(False)
    # the pointer over head 3, then off the plot: named, then cleared
    vb = view.plot.getViewBox()
    view._on_move(vb.mapViewToScene(pg.Point(3.0, 0.5 * worst)))
    assert view.hover.text().startswith("h3: ") and "gptq-w4g128 " in view.hover.text()
    view._on_move(vb.mapViewToScene(pg.Point(-5.0, -1.0)))
    assert view.hover.text().strip() == ""
    # hidden from the legend: its series and its line both
    view.legend._toggle("gptq-w4g128")
    assert not view._series["gptq-w4g128"][0].isVisible() and not view._series["gptq-w4g128"][1].isVisible()
    view.legend._toggle("gptq-w4g128")
    # the Group error map draws the heads' boundaries: o_proj's 8 heads of 64 columns in GPTQ's
    # groups of 128 (every other boundary inside a cell), MLX's groups of 64 (between cells)
    win.tabs.setCurrentWidget(win.heatmap)
    win.heatmap.variant.setCurrentText("gptq-w4g128")
    assert [ln.value() for ln in win.heatmap._head_lines] == [0.5 * k - 0.5 for k in range(1, 8)]
    assert all(ln.angle == 90 for ln in win.heatmap._head_lines)
    assert win.heatmap.plot.titleLabel.text.endswith("model.layers.1.self_attn.o_proj · dotted: its 8 heads")
    win.heatmap.variant.setCurrentText("mlx-affine-q4g64")
    assert [ln.value() for ln in win.heatmap._head_lines] == [k - 0.5 for k in range(1, 8)]
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        assert win.tree.select("model.layers.1.self_attn.q_proj")  # rows: across the map at 64, 128, …
    assert [ln.value() for ln in win.heatmap._head_lines] == [64.0 * k for k in range(1, 8)]
    assert all(ln.angle == 0 for ln in win.heatmap._head_lines)
    win.tabs.setCurrentWidget(win.heads)
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        assert win.tree.select("model.layers.1.mlp.down_proj")
    assert not view._series and "not an attention projection: no heads" in view.hint.text()
    assert view.worst.text() == "" and view.plot.getAxis("bottom").labelText == "head"  # (not "head (input columns)")
    win.tabs.setCurrentWidget(win.heatmap)
    assert win.heatmap._head_lines == []  # (no heads: none drawn over the MLP's map)
    win.tabs.setCurrentWidget(win.heads)
    # q_proj: 8 heads with a key/value head each (no groups drawn); a NaN head named, crossed at the top
    view.set_heads({"x": np.array([0.1, np.nan, 0.3, 0.2])}, {"x": "#E69F00"},
                   head_layout({"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 2},
                               "m.layers.0.self_attn.q_proj", (8, 8)), {"x": 0.2}, layer="m")
    assert "(2 query heads per key/value head)" in view.note.text()
    assert view.worst.text() == "Worst head (× the layer's error) · x NaN/inf in q1; q2 0.3 (1.50×)"
    crosses = [b for b in view._bounds if isinstance(b, pg.ScatterPlotItem)]
    assert len(crosses) == 1 and crosses[0].getData()[1][0] == pytest.approx(1.04 * 0.3)
    view.legend._toggle("x")  # (hidden from the legend: its crosses with it)
    assert not crosses[0].isVisible() and not view._series["x"][0].isVisible()
    view.legend._toggle("x")
    assert [b.value() for b in view._bounds if isinstance(b, pg.InfiniteLine)] == [1.5]  # the k/v group boundary
    # ÷ the layer's error where the layer's is NaN (its NaN head): no ratio drawn, one cross still
    view.set_heads({"x": np.array([0.1, np.nan, 0.3, 0.2])}, {"x": "#E69F00"},
                   head_layout({"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 2},
                               "m.layers.0.self_attn.q_proj", (8, 8)), {"x": float("nan")}, layer="m")
    view.ratio.setChecked(True)
    assert np.isnan(view._series["x"][0].getData()[1]).all()
    assert [b.getData()[0].size for b in view._bounds if isinstance(b, pg.ScatterPlotItem)] == [1]
    view.ratio.setChecked(False)
    # Phi-3's fused qkv_proj: q | k | v dashed, the query groups dotted among the q heads only
    fused = head_layout({"num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 2},
                        "m.layers.0.self_attn.qkv_proj", (20, 8))
    view.set_heads({"x": np.linspace(0.1, 0.2, 10)}, {"x": "#E69F00"}, fused, {"x": 0.15}, layer="m")
    lines = [(b.value(), b.pen.style()) for b in view._bounds if isinstance(b, pg.InfiniteLine)]
    assert sorted(lines) == [(2.5, Qt.PenStyle.DotLine), (5.5, Qt.PenStyle.DashLine), (7.5, Qt.PenStyle.DashLine)]
    assert "(3 query heads per key/value head)" in view.note.text()


def test_every_layers_heads_in_one_map_and_a_cell_selects_its_layer(win, qtbot, demo):
    """Tools ▸ Compare heads of every layer: the Heads tab's map holds head_sweep's figures (held
    to numpy in tests/test_heads.py) for the projection and variant chosen, layer by layer; the
    ratio box divides each row by its layer's error; the layer shown is outlined and its
    projection chosen; a click on a cell selects that cell's layer; a new workspace empties it."""
    import numpy as np
    import pyqtgraph as pg
    from quantscope.backend.compare import head_sweep
    view = win.heads.map
    assert not view.has_rows() and "Measure every layer" in view.hint.text()
    with qtbot.waitSignal(win.failed, timeout=5000) as sig:  # (nothing measured: nothing to export, said)
        win.export_heads("/nonexistent/h.csv")
    assert "Compare heads of every layer" in sig.args[0]
    win.tree.combo.setCurrentText("awq-w4g128")  # (the tree's checkpoint, before any measurement)
    with qtbot.waitSignal(win.service.idle, timeout=120_000):
        win.compare_heads()
    qtbot.waitUntil(view.has_rows, timeout=60_000)
    assert view.variant.currentText() == "awq-w4g128"
    assert win.tabs.currentWidget() is win.heads and view.button.text() == "Measure again" and not view.hint.text()
    ws = win.workspace
    rows = head_sweep(ws.reference, ws.variants)
    by = {(r.variant, r.name): r for r in rows}
    assert [view.proj.itemText(i) for i in range(view.proj.count())] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert [view.variant.itemText(i) for i in range(view.variant.count())] == list(ws.variants)
    view.proj.setCurrentText("o_proj")
    view.variant.setCurrentText("awq-w4g128")
    grid = view._grid
    assert grid.shape == (4, 8)
    for i in range(4):
        r = by[("awq-w4g128", f"model.layers.{i}.self_attn.o_proj")]
        np.testing.assert_array_equal(grid[i], r.rel_fro)
    assert view.figure_parts()[0].startswith("Every layer's heads: awq-w4g128 · model.layers.*.self_attn.o_proj ")
    assert view.yaxis.names == ["0", "1", "2", "3"] and view.xaxis.names == [f"h{i}" for i in range(8)]
    assert view.plot.getAxis("left").labelText == "decoder layer"
    assert view.plot.getAxis("bottom").labelText == "head (input columns)"
    # the heads furthest above their layer's error, named with their layer
    ratios = [(e / r.layer_rel_fro, i, h) for i in range(4)
              for r in [by[("awq-w4g128", f"model.layers.{i}.self_attn.o_proj")]] for h, e in zip(r.heads, r.rel_fro)]
    q, i, h = max(ratios)
    assert view.worst.text().startswith(f"Heads furthest above their layer's error · layer {i} {h} ")
    assert f"({q:.2f}×)" in view.worst.text()
    win.heads.ratio.setChecked(True)
    r2 = by[("awq-w4g128", "model.layers.2.self_attn.o_proj")]
    np.testing.assert_allclose(view._grid[2], np.asarray(r2.rel_fro) / r2.layer_rel_fro, rtol=1e-12)
    assert view.cbar.getAxis("left").labelText == "head ÷ layer error"
    win.heads.ratio.setChecked(False)
    # the tree's checkpoint is the map's variant; a selected q_proj brings its projection, outlined
    win.tree.combo.setCurrentText("mlx-affine-q4g64")
    assert view.variant.currentText() == "mlx-affine-q4g64"
    win.tree.combo.setCurrentText("gptq-w4g128")
    assert view.variant.currentText() == "gptq-w4g128"
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        assert win.tree.select("model.layers.1.self_attn.q_proj")
    assert view.proj.currentText() == "q_proj" and all(m.isVisible() for m in view.marks)
    assert view.marks[0].rect().top() == pytest.approx(0.5) and view.marks[0].rect().width() == 8
    view.proj.setCurrentText("o_proj")  # (another projection of its decoder layer: that layer outlined still)
    assert view.marks[1].isVisible() and view.marks[1].rect().top() == pytest.approx(0.5)
    view.proj.setCurrentText("q_proj")
    # the pointer over layer 3's head q5: named with its figure; a click selects layer 3
    vb = view.plot.vb
    at = vb.mapViewToScene(pg.Point(5.0, 3.0))
    view._on_move(at)
    r3 = by[("gptq-w4g128", "model.layers.3.self_attn.q_proj")]
    assert view.hover.text().startswith(f"model.layers.3.self_attn.q_proj q5: {r3.rel_fro[5]:.4g} (")

    class _Click:
        def __init__(self, button=Qt.MouseButton.LeftButton):
            self._b = button

        def scenePos(self):
            return at

        def button(self):
            return self._b

        def double(self):
            return False
    view._on_click(_Click(Qt.MouseButton.RightButton))  # (a right click selects nothing)
    assert win.current_layer == "model.layers.1.self_attn.q_proj"
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        view._on_click(_Click())
    assert win.current_layer == "model.layers.3.self_attn.q_proj"
    assert view.marks[1].rect().top() == pytest.approx(2.5)
    view._on_move(vb.mapViewToScene(pg.Point(-3.0, -3.0)))
    assert view.hover.text().strip() == ""
    # a variant removed: the others' heads stay as measured (the same reference), its own go
    shown = win.tree.current_label()
    with qtbot.waitSignal(win.workspace_loaded, timeout=30_000):
        win.remove_shown()
    qtbot.waitUntil(lambda: shown not in {r.variant for r in view.rows()}, timeout=10_000)
    assert {r.variant for r in view.rows()} == set(win.workspace.variants) and view.has_rows()
    # another reference: nothing of the map measured against the one before
    with qtbot.waitSignal(win.workspace_loaded, timeout=30_000):
        win.open_workspace([str(p) for p in list(demo.variants.values())[:1]], str(demo.variants["awq-w4g128"]))
    qtbot.waitUntil(lambda: not view.has_rows(), timeout=10_000)
    assert view.button.text() == "Measure every layer" and view._grid.size == 0


def test_head_map_pads_shorter_rows_and_marks_nan_heads(qtbot):
    """Layers of different head counts (Gemma's sliding and full layers) in one map: the shorter
    rows' missing cells are empty, not red; a NaN head is red and named; templates keep towers apart."""
    import numpy as np
    from quantscope.backend.compare import HeadRow
    from quantscope.widgets.head_map import HeadMap, short_names, template_of
    assert template_of("model.layers.12.self_attn.k_proj") == ("model.layers.*.self_attn.k_proj", 12)
    assert template_of("visual.blocks.3.attn.qkv") == ("visual.blocks.*.attn.qkv", 3)
    assert template_of("lm_head") == ("lm_head", None)
    # one tower: the projection alone; several: each tower's name before it
    assert short_names(["m.layers.*.self_attn.q_proj", "m.layers.*.self_attn.o_proj"]) == {
        "m.layers.*.self_attn.q_proj": "q_proj", "m.layers.*.self_attn.o_proj": "o_proj"}
    assert short_names(["model.language_model.layers.*.self_attn.q_proj", "model.visual.blocks.*.attn.qkv",
                        "model.language_model.layers.*.self_attn.o_proj", "model.visual.blocks.*.attn.proj"]) == {
        "model.language_model.layers.*.self_attn.q_proj": "language_model · q_proj",
        "model.language_model.layers.*.self_attn.o_proj": "language_model · o_proj",
        "model.visual.blocks.*.attn.qkv": "visual · qkv", "model.visual.blocks.*.attn.proj": "visual · proj"}
    assert short_names(["model.decoder.layers.*.self_attn.q_proj", "model.decoder.layers.*.encoder_attn.q_proj",
                        "model.encoder.layers.*.self_attn.q_proj"]) == {
        "model.decoder.layers.*.self_attn.q_proj": "decoder · self_attn.q_proj",
        "model.decoder.layers.*.encoder_attn.q_proj": "decoder · encoder_attn.q_proj",
        "model.encoder.layers.*.self_attn.q_proj": "encoder · q_proj"}
    # towers named alike (model.layers, model.h): their whole paths, never one name for two
    assert short_names(["model.layers.*.self_attn.q_proj", "model.h.*.self_attn.q_proj"]) == {
        "model.layers.*.self_attn.q_proj": "model.layers.*.self_attn.q_proj",
        "model.h.*.self_attn.q_proj": "model.h.*.self_attn.q_proj"}
    m = HeadMap()
    qtbot.addWidget(m)
    m.resize(600, 400)
    m.show()
    rows = [HeadRow("m.layers.0.self_attn.k_proj", "x", ["k0", "k1"], [0.1, 0.2], 0.15, "rows", "c"),
            HeadRow("m.layers.1.self_attn.k_proj", "x", ["k0"], [float("nan")], float("nan"), "rows", "c"),
            HeadRow("m.layers.2.self_attn.k_proj", "x", ["k0", "k1"], [0.3, 0.1], 0.2, "rows", "c")]
    m.set_rows(rows)
    g = m._grid
    assert g.shape == (3, 2) and g[0].tolist() == [0.1, 0.2] and np.isnan(g[1]).all()
    bad = m.bad.image
    assert bad[1, 0, 3] == 255 and bad[1, 1, 3] == 0 and bad[0, 0, 3] == 0  # (only the NaN head red)
    assert (1, 1) not in m._cells and m._cells[(1, 0)] == ("m.layers.1.self_attn.k_proj", "k0")
    assert m.worst.text() == ("Heads furthest above their layer's error · layer 2 k0 0.3 (1.50×) · layer 0 k1 0.2 "
                              "(1.33×) · layer 0 k0 0.1 (0.67×) · layer 2 k1 0.1 (0.50×) · NaN/inf in layer 1 k0")
    # ÷ the layer's error: a NaN layer leaves its heads' ratios undefined (blank), its NaN head alone red
    m.set_ratio(True)
    assert m._grid[0].tolist() == pytest.approx([0.1 / 0.15, 0.2 / 0.15]) and np.isnan(m._grid[1]).all()
    assert m.bad.image[1, 0, 3] == 255 and m.bad.image[1, 1, 3] == 0
    m.set_ratio(False)
    # the variant the tree shows (told before any measurement) is the one shown once measured
    two = rows + [HeadRow("m.layers.0.self_attn.k_proj", "y", ["k0", "k1"], [0.5, 0.6], 0.55, "rows", "c"),
                  HeadRow("m.layers.0.self_attn.o_proj", "x", ["h0", "h1"], [0.1, 0.1], 0.1, "columns", "c")]
    m.set_rows(None)
    m.follow("y")
    m.set_rows(two)
    assert m.variant.currentText() == "y" and m._grid.tolist() == [[0.5, 0.6]]
    # a pair with nothing (y has no o_proj), then back: its ticks and title drawn again
    m.variant.setCurrentText("x")
    m.proj.setCurrentText("o_proj")
    assert m.yaxis.names == ["0"] and m.xaxis.names == ["h0", "h1"]
    m.variant.setCurrentText("y")
    assert m._grid.size == 0 and m.yaxis.names == [] and m.figure_parts() == []
    m.variant.setCurrentText("x")
    assert m.yaxis.names == ["0"] and m.xaxis.names == ["h0", "h1"]
    assert m.figure_parts()[0] == "Every layer's heads: x · m.layers.*.self_attn.o_proj (colour scale x's own)"
    # 36 layers in a short map: labels as many as fit, round numbers (0, 4, 8…), none overlapping
    many = [HeadRow(f"m.layers.{i}.self_attn.q_proj", "x", ["q0", "q1"], [0.1, 0.2], 0.15, "rows", "c")
            for i in range(36)]
    m.set_rows(many)
    m.resize(600, 300)
    qtbot.wait(50)
    size = m.yaxis.geometry().height()
    vals = m.yaxis.tickValues(*m.yaxis.range, size)[0][1]  # (as the axis asks: inverted, 35.5 to -0.5)
    assert m.yaxis.range[0] > m.yaxis.range[1]
    assert len(vals) * 15 <= size and vals[:3] == [0.0, vals[1], 2 * vals[1]] and vals[1] in (2.0, 4.0, 8.0)
    # GQA: the query heads sharing a key/value head, dotted apart (a fused qkv's among its q heads)
    m.set_rows([HeadRow("m.layers.0.self_attn.q_proj", "x", [f"q{i}" for i in range(6)], [0.1] * 6, 0.1, "rows", "c", 3)])
    assert [ln.value() for ln in m._lines] == [2.5]
    m.set_rows([HeadRow("m.layers.0.self_attn.qkv_proj", "x", [*(f"q{i}" for i in range(4)), "k0", "k1", "v0", "v1"],
                        [0.1] * 8, 0.1, "rows", "c", 2)])
    assert [(ln.value(), ln.pen.style()) for ln in m._lines] == [
        (1.5, Qt.PenStyle.DotLine), (3.5, Qt.PenStyle.DashLine), (5.5, Qt.PenStyle.DashLine)]
    m.set_rows([])  # measured, nothing split: said
    assert "No attention layer" in m.hint.text() and m._grid.size == 0


def test_a_multiplier_divided_out_is_said_as_such(qtbot, tmp_path):
    """mlx-lm's Falcon-H1 against transformers' weights: in_proj's rows divided by the muP
    multipliers mlx-lm folded into them, said over the views ("multiplier undone", not "smoothing
    undone"), the tree's tooltip saying which; the Mamba projection has no heads."""
    real = Path(__file__).parent / "fixtures" / "real"
    w = _window_on(qtbot, tmp_path, [real / "mlxlm-falconh1-q4-g32"], real / "falconh1-bf16")
    try:
        with qtbot.waitSignal(w.detail_shown, timeout=30_000):
            assert w.tree.select("model.layers.0.mamba.in_proj")
        assert w.hist.note.text() == "model.layers.0.mamba.in_proj · multiplier undone, as measured: " \
                                     "mlxlm-falconh1-q4-g32"
        m = w._detail_errors[1].metrics["mlxlm-falconh1-q4-g32"]
        assert 0.07 < m.rel_fro < 0.09 and m.rel_fro_raw > 0.5
        assert "multiplier undone" in w._result_text() and "ssm_in_multiplier" in w._result_text()
        w.tabs.setCurrentWidget(w.heads)  # (a hidden view is brought up to date when shown)
        assert "a state-space (Mamba) mixer's projection: no attention heads" in w.heads.hint.text()
    finally:
        w.service.shutdown()


def test_layers_heatmap_shows_the_trees_checkpoint(win, qtbot):
    # it showed the first variant whatever the tree showed (the group error map follows the tree)
    win.tree.combo.setCurrentText("awq-w4g128")
    with qtbot.waitSignal(win.sweep_done, timeout=120_000):
        win.compare_all()
    qtbot.waitUntil(lambda: not win.turns_pending(), timeout=10_000)
    assert win.layers.hm_variant.currentText() == "awq-w4g128"
    win.tree.combo.setCurrentText("mlx-affine-q4g64")
    assert win.layers.hm_variant.currentText() == "mlx-affine-q4g64"
    i = win.layers.hm_variant.findText("rtn-w4g128")  # chosen in the box: kept over a new comparison
    win.layers.hm_variant.setCurrentIndex(i)
    win.layers.hm_variant.activated.emit(i)
    with qtbot.waitSignal(win.sweep_done, timeout=120_000):
        win.compare_all()
    qtbot.waitUntil(lambda: not win.turns_pending(), timeout=10_000)
    assert win.layers.hm_variant.currentText() == "rtn-w4g128"
    win.tree.combo.setCurrentText("gptq-w4g128")  # until the tree shows another
    assert win.layers.hm_variant.currentText() == "gptq-w4g128"


def test_group_error_map_marks_nonfinite_cells_and_names_act_order(qtbot):
    """A NaN group was drawn blank (it looked like padding) and an inf one in the top colour;
    the x-axis said "act-order: by g_idx" for every variant."""
    from quantscope.app.jobs import reduce_rows
    from quantscope.widgets.group_error_heatmap import GroupErrorHeatmap
    hm = GroupErrorHeatmap()
    qtbot.addWidget(hm)
    m = np.full((6, 4), 0.1)
    m[2, 1], m[4, 3] = np.nan, np.inf
    hm.set_maps({"gptq-act": (m, 1), "mlx": (np.full((6, 4), 0.2), 1)}, by_index={"gptq-act"})
    hm.variant.setCurrentText("gptq-act")
    assert hm.note.text() == "2 cells NaN or inf (red)"
    assert hm.bad.image is not None and hm.bad.image[2, 1, 3] == 255 and hm.bad.image[0, 0, 3] == 0
    assert "by g_idx" in hm.plot.getAxis("bottom").labelText
    hm.variant.setCurrentText("mlx")
    assert hm.note.text() == "" and "g_idx" not in hm.plot.getAxis("bottom").labelText
    # a few cells far above the rest: the bar stops at the 99.5th percentile, and says so
    hot = np.full((40, 10), 0.1)
    hot[3, 4] = 1.16
    hm.set_maps({"w3": (hot, 1)})
    assert hm.note.text() == "colours stop at 0.1 (99.5th percentile); the brightest cells reach 1.16"
    # a narrow view cuts that line rather than widening the window (835 -> 981 px: a review)
    assert hm.minimumSizeHint().width() < hm.note.fontMetrics().horizontalAdvance(hm.note.text())
    # shrunk to the screen, a block of rows holding a NaN cell stays NaN (nanmax dropped it)
    big = np.full((10, 2), 0.1)
    big[7, 0] = np.nan
    red, per = reduce_rows(big, max_rows=3)
    assert per == 4 and red.shape == (3, 2) and np.isnan(red[1, 0]) and (red[:, 1] == 0.1).all()


def test_config_table_rows_copy_whole_with_their_header(win, qtbot):
    from PySide6.QtGui import QGuiApplication
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        assert win.tree.select("model.layers.1.mlp.down_proj")
    t = win.config.layer_table
    t.setFocus()
    t.selectRow(1)
    qtbot.keySequence(t, __import__("PySide6.QtGui", fromlist=["QKeySequence"]).QKeySequence.StandardKey.Copy)
    lines = QGuiApplication.clipboard().text().splitlines()
    assert lines[0].split("\t")[:3] == ["Checkpoint", "Scheme", "Bits"]
    assert len(lines) == 2 and lines[1].split("\t")[0] == t.item(1, 0).text() and lines[1].count("\t") == 5


def test_side_panels_keep_their_share_when_the_window_grows(win, qtbot):
    """Made 1920 px wide, the window gave all the new width to the plots: the tree stayed narrow."""
    win.resize(1024, 700)
    qtbot.wait(300)
    share = win.tree_dock.width() / win.width()
    for w in range(1044, 1921, 20):  # a drag: many small steps
        win.resize(w, 1000)
        qtbot.wait(5)
    qtbot.waitUntil(lambda: win.tree_dock.width() > 1.5 * share * 1024, timeout=3000)
    assert abs(win.tree_dock.width() / win.width() - share) < 0.05
    wide = win.tree_dock.width()
    for w in range(1900, 1023, -25):  # and back by steps: the same share, no width lost for good
        win.resize(w, 700)
        qtbot.wait(5)
    win.resize(1024, 700)
    qtbot.waitUntil(lambda: win.tree_dock.width() < wide * 0.7, timeout=3000)
    qtbot.wait(300)
    assert abs(win.tree_dock.width() / win.width() - share) < 0.05
    assert win.minimumSizeHint().width() <= 1024



def test_side_panels_stop_growing_at_their_most_unless_widened_by_hand(win, qtbot):
    """At 2560 px each side panel took 736 px, mostly empty, and the plots 1076."""
    from quantscope.app.main_window import DOCK_MAX
    win.resize(1400, 800)
    qtbot.wait(300)
    win.resize(2560, 1000)
    qtbot.waitUntil(lambda: win.width() == 2560, timeout=3000)
    qtbot.wait(400)
    assert win.tree_dock.width() <= DOCK_MAX + 4 and win.config_dock.width() <= DOCK_MAX + 4
    assert win.tabs.width() > 2560 - 2 * (DOCK_MAX + 20)
    # widened by hand: kept as wide when the window changes
    win.resizeDocks([win.tree_dock], [800], Qt.Orientation.Horizontal)
    qtbot.waitUntil(lambda: win.tree_dock.width() >= 790, timeout=3000)
    qtbot.wait(50)
    win.resize(2500, 1000)
    qtbot.wait(400)
    assert win.tree_dock.width() > DOCK_MAX + 100


def test_side_panels_rescale_when_a_resize_comes_before_the_last_rescale_settled(win, qtbot):
    """A rescale records the width it was for once its dock resizes have landed (a turn of the
    event loop later). It recorded the window's width at that moment instead: a resize in
    between (the window made narrow again) then found old == new and left the docks 1920-px wide
    in a 1024-px window (a window test failed so, now and then, on a slower machine)."""
    win.resize(1024, 700)
    qtbot.wait(300)
    share = win.tree_dock.width() / win.width()
    win.resize(1920, 700)
    win._resize_timer.stop()
    win._rescale_docks()  # as the timer would; its settling is still to come
    win.resize(1024, 700)  # before it came
    qtbot.wait(400)
    assert abs(win.tree_dock.width() / win.width() - share) < 0.05


def test_the_window_fits_half_a_full_hd_screen_and_the_controls_wrap(win, qtbot):
    """Its least width was 1024 px (the views' rows of controls in one line between the side
    panels): more than half a 1920 px screen. The rows now wrap onto a second line instead."""
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        assert win.tree.select("model.layers.1.mlp.down_proj")
    assert win.minimumSizeHint().width() <= 900
    hist = win.hist

    def line_of(w):
        return w.mapTo(hist, w.rect().topLeft()).y()

    win.resize(1600, 900)
    qtbot.waitUntil(lambda: line_of(hist.apply) == line_of(hist.log_y), timeout=3000)  # one line when wide
    win.resize(900, 700)
    qtbot.waitUntil(lambda: win.width() <= 900 and line_of(hist.apply) > line_of(hist.log_y), timeout=3000)
    # the range boxes stay beside their label, the buttons together; nothing is cut off
    assert line_of(hist.lo) == line_of(hist.hi) and line_of(hist.reset) == line_of(hist.apply)
    for w in (hist.log_y, hist.lo, hist.hi, hist.apply, hist.reset, hist.bulk):
        right = w.mapTo(hist, w.rect().topRight()).x()
        assert 0 <= right <= hist.width() and w.isVisible()


def test_the_error_view_shows_log_abs_error_on_shared_edges_when_asked(win, qtbot):
    """On the signed error's shared edges, a variant whose error is a tenth of another's sat in
    a few bins; log10 |Ŵ − W| resolves each. The box switches between the two; exact zeros,
    which have no place on a log axis, are counted under the plot."""
    win.tabs.setCurrentWidget(win.err_hist)
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        assert win.tree.select("model.layers.1.mlp.down_proj")
    view = win.err_hist
    signed = {k: np.asarray(c).copy() for k, c in view._counts.items()}
    n = {k: int(c.sum()) for k, c in signed.items()}
    assert view.alt_box.isEnabled() and not view.alt_box.isChecked()
    view.alt_box.setChecked(True)
    assert view.plot.getAxis("bottom").labelText == "log10 |Ŵ − W|"
    assert set(view._counts) == set(signed)
    zeros = {}
    if "exact zeros" in view.footer.text():
        for part in view.footer.text().split("exact zeros, not on a log axis: ")[1].split(". ")[0].split(", "):
            k, v = part.rsplit(" ", 1)
            zeros[k] = int(v.replace(",", ""))
    for k, c in view._counts.items():  # every error once: on the log axis, or an exact zero
        assert int(np.asarray(c).sum()) + zeros.get(k, 0) == n[k], k
    lo, hi = float(view._edges[0]), float(view._edges[-1])
    assert -12 < lo < hi < 1  # log10 of errors of weights of about 0.02
    view.alt_box.setChecked(False)
    assert view.plot.getAxis("bottom").labelText == "error Ŵ − W"
    assert all(np.array_equal(view._counts[k], c) for k, c in signed.items())

def test_the_error_view_names_exact_copies_instead_of_drawing_their_spike(qtbot, tmp_path, real_fixtures):
    """lm_head, left unquantized by GPTQModel and AutoAWQ: their every error is 0, one spike that
    set the count axis (and hid behind each other); they are named under the plot instead. Where
    every variant is such a copy, the view says so."""
    from pathlib import Path
    real = Path(__file__).parent / "fixtures" / "real"
    w = _window_on(qtbot, tmp_path, [real / "autoawq-gemm-w4g128"], real_fixtures / "base-bf16")
    try:
        w.tabs.setCurrentWidget(w.err_hist)
        view = w.err_hist
        with qtbot.waitSignal(w.detail_shown, timeout=30_000):
            assert w.tree.select("lm_head")
        assert not view._counts and "every variant stores this layer exactly" in view.hint.text()
        with qtbot.waitSignal(w.detail_shown, timeout=60_000):
            w.add_paths([str(real_fixtures / "mlx-affine-q4-g64")])
        qtbot.waitUntil(lambda: set(view._counts) == {"mlx-affine-q4-g64"}, timeout=30_000)
        assert "every error 0" in view.footer.text() and "autoawq-gemm-w4g128" in view.footer.text()
    finally:
        w.service.shutdown()


def test_qt_hands_python_empty_values_without_losing_a_reference_to_none(qtbot):
    """PySide6 6.12.0 dropped a reference to None each time Qt returned an empty value to Python;
    on Python < 3.12 a long session ended in "Fatal Python error: none_dealloc". pyproject pins
    below it; this fails if an installed PySide6 does it again."""
    import sys

    from PySide6.QtCore import QModelIndex
    from PySide6.QtWidgets import QComboBox
    combo = QComboBox()
    qtbot.addWidget(combo)
    combo.addItem("no data")
    before = sys.getrefcount(None)
    for _ in range(500):
        combo.currentData()
        QModelIndex().data()
    assert sys.getrefcount(None) >= before - 10  # immortal on 3.12+: any drain shows on 3.11


def test_a_narrow_tree_keeps_room_for_the_figures_of_the_shown_error(win, qtbot):
    """At 1024 px the dock is ~235 px: Name (200 px) left 30 px of colour and no figures."""
    with qtbot.waitSignal(win.sweep_done, timeout=120_000):
        win.compare_all()
    win.tree.combo.setCurrentText("gptq-w4g128")
    win.resize(1024, 700)
    win.resizeDocks([win.tree_dock], [235], Qt.Orientation.Horizontal)
    qtbot.waitUntil(lambda: win.tree_dock.width() <= 260, timeout=3000)
    qtbot.wait(50)
    view = win.tree.view
    col = win.tree.view.header().logicalIndex(1)  # the shown checkpoint's error, after Name
    fm = view.fontMetrics()
    shown = view.viewport().width() - view.columnWidth(0)
    assert shown >= fm.horizontalAdvance("0.0000") + 4, (view.viewport().width(), view.columnWidth(0))
    assert view.columnWidth(col) <= shown  # the right-aligned figures inside the dock, not past it
    # the column's title says what it holds, the box above whose it is ("g…8" elided, "gptq" as
    # short as its family allowed); its tooltip has the whole name. The other variants' columns
    # keep what tells them apart
    assert win.tree.model.headerData(col, Qt.Orientation.Horizontal) == "error"
    from quantscope.widgets.tensor_tree_model import BASE_COLUMNS
    other = win.tree.model.variants.index("gptq-w4g128-actorder") + len(BASE_COLUMNS)
    assert win.tree.model.headerData(other, Qt.Orientation.Horizontal) != "error"
    assert "gptq-w4g128" in win.tree.model.headerData(col, Qt.Orientation.Horizontal, Qt.ItemDataRole.ToolTipRole)


def test_doctor_panel_says_what_the_comparison_found_about_the_checkpoint(win, qtbot):
    """Doubled AWQ smoothing needs the reference to be seen: the doctor (one checkpoint) said
    "no problems found" while the Layers view warned. The doctor panel now repeats the warning."""
    from quantscope.backend.compare import SmoothingCheck, SweepResult
    res = SweepResult()
    res.smoothing_checks["awq-w4g128"] = SmoothingCheck("awq-w4g128", "model.layers.0.self_attn.q_proj", 2.0,
                                                        "its weights carry the smoothing scales to the power 2.00")
    win.sweep_result = res
    win.tree.combo.setCurrentText("awq-w4g128")
    assert not win.doctor.compare_note.isHidden() and "power 2.00" in win.doctor.compare_note.text()
    # its files alone have nothing wrong: said so, not "no problems found" above the warning
    win.doctor.set_findings("awq-w4g128", [])
    assert "no problems found in its files alone: the comparison with the reference did" in win.doctor.title.text()
    win.tree.combo.setCurrentText("gptq-w4g128")
    assert win.doctor.compare_note.isHidden()
    win.doctor.set_findings("gptq-w4g128", [])
    assert win.doctor.title.text().endswith("no problems found in its files.")


def test_adding_a_variant_shows_it_in_the_views_and_compares_it_with_the_others(win, qtbot, demo):
    # The views of the shown layer, the config table and the tree's error columns were left as
    # they were before the variant came in (and the Layers view kept an empty heatmap); then the
    # comparison was dropped: now it is made again at once, the new variant in it.
    labels = list(win.workspace.variants)
    keep, new = labels[:-1], labels[-1]
    with qtbot.waitSignal(win.workspace_loaded, timeout=30_000):
        win.open_workspace([str(demo.variants[v]) for v in keep], str(demo.reference))
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        assert win.tree.select("model.layers.1.mlp.down_proj")
    with qtbot.waitSignal(win.sweep_done, timeout=120_000):
        win.compare_all()
    assert win.tree.model._errors[keep[0]]
    shown = []
    win.detail_shown.connect(shown.append)
    with qtbot.waitSignals([win.detail_shown, win.sweep_done], timeout=120_000):
        win.add_paths([str(demo.variants[new])])
    qtbot.waitUntil(lambda: not win.turns_pending(), timeout=10_000)
    win.tabs.setCurrentWidget(win.hist)  # the Layers tab shows the comparison
    assert shown[0] == "model.layers.1.mlp.down_proj" and new in win.hist._counts
    assert new in win.config.whatif_result.text()
    t = win.config.layer_table
    assert new in {t.item(r, 0).text() for r in range(t.rowCount())}
    assert {r.variant for r in win.sweep_result.rows} == set(labels)
    assert win.tree.model._errors[new] and {r.variant for r in win.layers._rows} == set(labels)


def test_a_reference_alone_says_no_variant_is_open(win, qtbot, demo):
    # the error views said "the reference has no layer of that name" of a layer it has
    with qtbot.waitSignal(win.workspace_loaded, timeout=30_000):
        win.open_workspace([], str(demo.reference))
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        assert win.tree.select("model.layers.0.mlp.up_proj")
    for i in range(win.tabs.count()):
        win.tabs.setCurrentIndex(i)
    for text in (win.err_hist.hint.text(), win.heatmap.hint.text(), win.config.whatif_result.text()):
        assert "no variant is open" in text and "no layer of that name" not in text


def test_without_a_reference_the_views_show_what_the_checkpoint_holds(win, qtbot, demo):
    # one quantized checkpoint, no reference: values, code usage, scales and zeros need none
    with qtbot.waitSignal(win.workspace_loaded, timeout=30_000):
        win.open_workspace([str(demo.variants["gptq-w4g128"])], None)
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        assert win.tree.select("model.layers.0.mlp.up_proj")
    for i in range(win.tabs.count()):
        win.tabs.setCurrentIndex(i)
    assert win.hist._counts["gptq-w4g128"].sum() == 1536 * 512 and win.hist.hint.text() == ""
    assert win.codes._counts["gptq-w4g128"].sum() == 1536 * 512
    assert "gptq-w4g128" in win.scales._counts and "gptq-w4g128" in win.zeros._counts
    for text in (win.err_hist.hint.text(), win.heatmap.hint.text(), win.config.whatif_result.text()):
        assert "no reference to measure the error against" in text
    # a layer no open checkpoint has any more (the workspace changed under it): views emptied
    win.current_layer = "model.layers.9.mlp.up_proj"
    win._reselect()
    win.tabs.setCurrentWidget(win.hist)
    assert win.current_layer is None and "Select a layer" in win.hist.note.text() + win.hist.hint.text()


def _gptq_with_config_bits(demo, tmp_path, bits: int):
    """A copy of the demo's 4-bit GPTQ variant, named bits{bits}, whose configs say ``bits``."""
    import json
    import shutil
    bad = tmp_path / f"bits{bits}"
    shutil.copytree(demo.variants["gptq-w4g128"], bad)
    for f in bad.glob("*config.json"):
        d = json.loads(f.read_text())
        q = d.get("quantization_config", d)
        if "bits" in q:
            q["bits"] = bits
            f.write_text(json.dumps(d))
    return bad


def test_a_config_its_tensors_contradict_is_not_taken_for_another_model(win, qtbot, tmp_path, demo):
    # bits 3 in the config of 4-bit codes: the layers' shapes, read that way, differ from the
    # reference's, and the status bar asked "Is the reference another model?"
    bad = _gptq_with_config_bits(demo, tmp_path, 3)
    with qtbot.waitSignal(win.workspace_loaded, timeout=30_000):
        win.open_workspace([str(bad)], str(demo.reference))
    said = win.statusBar().currentMessage()
    assert "another model" not in said and said.startswith("bits3: the layers cannot be read as the config says")


def test_a_variant_that_cannot_be_compared_is_named_and_the_others_compared(win, qtbot, tmp_path, demo):
    bad = _gptq_with_config_bits(demo, tmp_path, 8)
    with qtbot.waitSignal(win.workspace_loaded, timeout=30_000):
        win.open_workspace([str(demo.variants["awq-w4g128"]), str(bad)], str(demo.reference))
    with qtbot.waitSignal(win.sweep_done, timeout=120_000):
        win.compare_all()
    qtbot.waitUntil(lambda: not win.turns_pending(), timeout=10_000)
    assert {r.variant for r in win.sweep_result.rows} == {"awq-w4g128"}
    assert "bits8: not compared: no layer can be compared" in win.layers.warn.text()
    assert "zero points" in win.layers.warn.toolTip() and str(bad) in win.layers.warn.toolTip()
    # selecting a layer says why that variant is not in the views (it was just missing)
    win.tabs.setCurrentWidget(win.hist)
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        assert win.tree.select("model.layers.0.mlp.up_proj")
    assert "Not shown: bits8" in win.hist.footer.text() and "bits8" not in win.hist._counts
    assert "bits8: not shown, the variant's layer model.layers.0.mlp.up_proj cannot be decoded" in \
        win.config.whatif_result.text()
    # the only variant: the box said "no open variant has this layer", which it has
    with qtbot.waitSignal(win.workspace_loaded, timeout=30_000):
        win.open_workspace([str(bad)], str(demo.reference))
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        assert win.tree.select("model.layers.0.mlp.up_proj")
    text = win.config.whatif_result.text()
    assert "bits8: not shown, the variant's layer model.layers.0.mlp.up_proj cannot be decoded" in text
    assert "no open variant has this layer" not in text
    # nothing to compare at all: said where the results would be (it still said "Tools ▸ Compare
    # all layers measures…"), and that view shown
    with qtbot.waitSignal(win.failed, timeout=120_000):
        win.compare_all()
    assert win.layers.hint.text().startswith("Nothing compared: ") and "bits are wrong" in win.layers.hint.text()
    assert win.tabs.currentWidget() is win.layers


def test_the_doctor_runs_on_a_checkpoint_that_could_not_be_opened(win, qtbot, tmp_path, demo):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(demo.variants["gptq-w4g128"], broken)
    f = next(broken.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:3_000_000])
    from quantscope.backend.workspace import Workspace
    win.set_workspace(Workspace())  # as a window started on that checkpoint alone: nothing open
    with qtbot.waitSignal(win.failed, timeout=30_000):
        win.open_workspace([str(broken)], None)
    assert not win.workspace.models()
    with qtbot.waitSignal(win.doctor_done, timeout=60_000):
        win.run_doctor()
    assert "broken" in win.doctor.title.text() and "error" in win.doctor.title.text()
    assert str(f.name) in win.doctor.text.toPlainText()


def test_names_cut_to_fit_keep_their_layer_number_and_end(qtbot):
    # cut at the left, every post_attention_layernorm row read "….post_attention_layernorm"
    from PySide6.QtGui import QFont, QFontMetrics
    from quantscope.widgets.tensor_tree import elide_path
    fm = QFontMetrics(QFont())
    name = "model.layers.17.post_attention_layernorm"
    assert elide_path(name, fm, fm.horizontalAdvance(name)) == name
    cut = elide_path(name, fm, fm.horizontalAdvance("…17.post_attention_layernorm"))
    assert cut == "…17.post_attention_layernorm"
    cut = elide_path(name, fm, fm.horizontalAdvance("…layers.17.post_attention_layernorm") + 2)
    assert cut == "…layers.17.post_attention_layernorm"
    w = fm.horizontalAdvance("…17.post_attentio")
    cut = elide_path(name, fm, w)
    assert cut.startswith("…17.") and cut.endswith("norm") and fm.horizontalAdvance(cut) <= w
    moe = "model.layers.3.mlp.experts.117.down_proj"  # the last number: the expert
    cut = elide_path(moe, fm, fm.horizontalAdvance("…117.down_proj") + 1)
    assert cut == "…117.down_proj"
    # with room, the layer number stays too (sorted by error, "…experts.19.gate_proj" hid layer 33)
    for shown in ("…3.mlp.experts.117.down_proj", "…3.…experts.117.down_proj", "…3.…117.down_proj"):
        assert elide_path(moe, fm, fm.horizontalAdvance(shown) + 1) == shown
    # after the layer number, whole parts go before a cut in the middle: Llama 4's experts and its
    # shared expert read "…0.feed_forward.…rts.down_proj" and "…ert.down_proj"
    for name, shown in (("language_model.model.layers.0.feed_forward.experts.down_proj", "…0.…experts.down_proj"),
                        ("language_model.model.layers.0.feed_forward.shared_expert.down_proj",
                         "…0.…shared_expert.down_proj")):
        assert elide_path(name, fm, fm.horizontalAdvance(shown) + 1) == shown
        assert elide_path(name, fm, fm.horizontalAdvance(shown) - 1) != shown


def test_a_column_of_names_cuts_alike(qtbot):
    # cut one by one, "…layers.1.mlp.gate_proj" stood over "…1.mlp.down_proj": the layer numbers
    # of a column were not aligned
    from PySide6.QtGui import QFont, QFontMetrics
    from quantscope.widgets.plots import elide_path, path_lead, path_leads
    fm = QFontMetrics(QFont())
    paths = ["lm_head", "model.norm"] + [f"model.layers.{i}.{m}" for i in range(12)
                                         for m in ("mlp.up_proj", "mlp.down_proj", "self_attn.q_proj")]
    leads = path_leads(paths, fm)
    assert list(leads) == ["model.layers."]
    widest = max(paths[2:], key=fm.horizontalAdvance)
    room = fm.horizontalAdvance(widest) - 1  # the widest no longer fits whole
    assert path_lead(leads, "model.layers.0.mlp.up_proj", room) == 1
    shown = [elide_path(p, fm, room, path_lead(leads, p, room)) for p in paths[2:]]
    assert all(s.startswith("…layers.") for s in shown), shown
    room = fm.horizontalAdvance("…" + widest.split(".", 2)[2]) + 1
    shown = [elide_path(p, fm, room, path_lead(leads, p, room)) for p in paths[2:]]
    assert shown[:3] == ["…0.mlp.up_proj", "…0.mlp.down_proj", "…0.self_attn.q_proj"]
    assert path_lead(leads, "lm_head", 10) == 0 and elide_path("lm_head", fm, 1000, 0) == "lm_head"
    # with room for all, nothing is cut
    assert path_lead(leads, widest, 10_000) == 0


def test_tree_colours_the_names_of_layers_the_doctor_flagged(win, qtbot):
    from PySide6.QtCore import Qt
    m = win.tree.model
    path = m.index(3, 0).data()
    m.set_findings({path: ("error", "32 scales are NaN")})
    fg = m.index(3, 0).data(Qt.ItemDataRole.ForegroundRole)
    assert fg is not None and fg.name().lower() == "#d55e00"
    assert "doctor (error): 32 scales are NaN" in m.index(3, 0).data(Qt.ItemDataRole.ToolTipRole)
    assert m.index(4, 0).data(Qt.ItemDataRole.ForegroundRole) is None
    m.set_findings({})
    assert m.index(3, 0).data(Qt.ItemDataRole.ForegroundRole) is None


def test_the_whatif_box_holds_only_what_belongs_to_the_layer_shown(win, qtbot):
    # a what-if result stood beside the previous layer's errors when a decode was cancelled, and a
    # decode landing after the what-if wiped it
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        assert win.tree.select("model.layers.0.self_attn.k_proj")
    with qtbot.waitSignal(win.service.job_done, timeout=60_000):
        win.run_whatif(4, 64, "affine")
    qtbot.waitUntil(lambda: "What-if affine 4 bit / 64" in win.config.whatif_result.text(), timeout=10_000)
    assert "Current error of each variant" in win.config.whatif_result.text()
    win.tree.select("model.layers.1.mlp.down_proj")
    win.service.cancel_channel("detail")  # Esc before the decode lands
    qtbot.waitUntil(lambda: "decoding was cancelled" in win.hist.hint.text() + win.hist.note.text(), timeout=10_000)
    assert "model.layers.1.mlp.down_proj: not shown" in win.hist.hint.text() + win.hist.note.text()
    assert "What-if" not in win.config.whatif_result.text()  # k_proj's, not shown under down_proj
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):  # back to k_proj: its what-if is still its own
        assert win.tree.select("model.layers.0.self_attn.k_proj")
    assert "What-if affine 4 bit / 64" in win.config.whatif_result.text()


def _window_on(qtbot, tmp_path, variants: list, reference) -> MainWindow:
    """A shown 1280×800 window with its own settings, the checkpoints opened."""
    w = MainWindow(QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    w.quiet_errors = True
    qtbot.addWidget(w)
    w.resize(1280, 800)
    w.show()
    with qtbot.waitSignal(w.workspace_loaded, timeout=30_000):
        w.open_workspace([str(v) for v in variants], None if reference is None else str(reference))
    return w


def test_a_comparison_adds_the_quantization_alone_to_the_layer_shown(qtbot, tmp_path, real_fixtures):
    from pathlib import Path
    real = Path(__file__).parent / "fixtures" / "real"
    w = _window_on(qtbot, tmp_path, [real / "autoawq-gemm-w4g128"], real_fixtures / "base-bf16")
    try:
        with qtbot.waitSignal(w.detail_shown, timeout=30_000):
            assert w.tree.select("model.layers.1.mlp.down_proj")
        assert "quantization alone" not in w.config.whatif_result.text()
        with qtbot.waitSignal(w.sweep_done, timeout=120_000):
            w.compare_all()
        text = w.config.whatif_result.text()
        assert "the quantization alone: 0.12" in text  # without selecting the layer again
    finally:
        w.service.shutdown()


def test_config_panel_finds_a_layer_under_another_name(qtbot):
    # per-expert reference, mlx-lm's stacked switch_mlp variant: the panel showed "absent"
    from pathlib import Path

    from quantscope.backend.checkpoint import open_checkpoint
    from quantscope.backend.schemes import analyze
    from quantscope.widgets.quant_config_panel import QuantConfigPanel
    real = Path(__file__).parent / "fixtures" / "real"
    models = {"bf16": analyze(open_checkpoint(real / "qwen3moe-bf16")),
              "mlx": analyze(open_checkpoint(real / "mlxlm-qwen3moe-q4-g64"))}
    panel = QuantConfigPanel()
    qtbot.addWidget(panel)
    panel.set_layer("model.layers.1.mlp.experts.2.down_proj", models)
    t = panel.layer_table
    rows = {t.item(r, 0).text(): [t.item(r, c).text() for c in range(6)] for r in range(t.rowCount())}
    assert rows["mlx"][1:5] == ["mlx-affine", "4", "64", "128×64"]
    assert rows["mlx"][5].startswith("model.layers.1.mlp.switch_mlp.down_proj (expert 2 of the stacked experts): ")
    assert rows["bf16"][1] == "dense" and not rows["bf16"][5].startswith("model.")
    panel.set_layer("model.layers.1.mlp.switch_mlp.up_proj", models)
    assert "expert 0 shown" in t.item(0, 5).text()


def test_tree_error_of_a_stacked_module_is_its_worst_expert():
    from types import SimpleNamespace

    from quantscope.app.main_window import errors_by_module
    sw = "model.layers.0.mlp.switch_mlp.up_proj"
    figs = {"sqnr_db": 20.0, "max_abs": 0.1, "smoothing": "none", "rel_fro_raw": 0.1}
    rows = [SimpleNamespace(variant="v", name=f"model.layers.0.mlp.experts.{e}.up_proj", variant_layer=sw, rel_fro=r,
                            **figs) for e, r in enumerate((0.09, 0.12, 0.1))]
    per = errors_by_module(rows)["v"]
    assert per[sw] == 0.12 and per["model.layers.0.mlp.experts.2.up_proj"] == 0.1
    rows[1].rel_fro = float("nan")
    assert math.isnan(errors_by_module(rows)["v"][sw])
    # a per-expert variant, shown beside a stacked checkpoint's tree: its worst expert there too
    per_expert = [SimpleNamespace(variant="g", name=f"model.layers.0.mlp.experts.{e}.up_proj",
                                  variant_layer=f"model.layers.0.mlp.experts.{e}.up_proj", rel_fro=r, **figs)
                  for e, r in enumerate((0.11, 0.13))]
    assert errors_by_module(per_expert)["g"][sw] == 0.13
    # the cell's tooltip is the row whose figure it shows (the worst expert's)
    from quantscope.app.main_window import errors_and_notes
    per, notes = errors_and_notes(per_expert)
    assert notes["g"][sw][1].startswith("model.layers.0.mlp.experts.1.up_proj") and "0.1300" in notes["g"][sw][1]


def test_an_expert_against_a_stacked_reference(qtbot, tmp_path):
    """The reference stacks the experts (mlx-lm's), the variant stores them one by one: selecting
    an expert shows that expert against its rows of the reference's stack (it showed the whole
    stack, or nothing), and a comparison gives each expert its own point."""
    from pathlib import Path
    real = Path(__file__).parent / "fixtures" / "real"
    w = _window_on(qtbot, tmp_path, [real / "qwen3moe-bf16", real / "mlxlm-qwen3moe-q4-g64"],
                   real / "mlxlm-qwen3moe-q4-g64")
    try:
        expert = "model.layers.1.mlp.experts.2.down_proj"
        with qtbot.waitSignal(w.detail_shown, timeout=60_000):
            w.select_layer(expert)
        assert w.current_layer == expert
        assert "expert 2 of the reference's stacked experts" in w.statusBar().currentMessage()
        d = w._detail_errors[1]
        # the per-expert variant, and the stacked one (as the reference stacks them): its slice
        assert sorted(d.metrics) == ["mlxlm-qwen3moe-q4-g64 (2)", "qwen3moe-bf16"] and not d.left_out
        assert d.metrics["mlxlm-qwen3moe-q4-g64 (2)"].rel_fro == 0.0  # the reference itself
        w.run_whatif(8, 64, "affine")  # requantizes that expert's slice of the reference's stack
        qtbot.waitUntil(lambda: "What-if affine 8 bit / 64" in w.config.whatif_result.text(), timeout=30_000)
        from quantscope.backend.compare import sweep
        res = sweep(w.workspace.reference, {"bf16": w.workspace.models()["qwen3moe-bf16"]}, engine="numpy",
                    layers=r"layers\.1\.mlp\.experts\.2\.down_proj$")
        assert [r.name for r in res.rows] == [expert]
        assert d.metrics["qwen3moe-bf16"].rel_fro == pytest.approx(res.rows[0].rel_fro, rel=1e-9)
        with qtbot.waitSignal(w.sweep_done, timeout=120_000):
            w.compare_all()
        names = {r.name for r in w.sweep_result.rows if r.variant == "qwen3moe-bf16"}
        assert {f"model.layers.1.mlp.experts.{e}.down_proj" for e in range(4)} <= names
    finally:
        w.service.shutdown()


def test_the_expert_box_picks_an_expert_of_a_stack(qtbot, tmp_path):
    """A stack's row has no row per expert: the views showed expert 0 (or the worst) with no way
    to pick another. The tree's expert box offers every expert of the layer shown."""
    from pathlib import Path
    real = Path(__file__).parent / "fixtures" / "real"
    w = _window_on(qtbot, tmp_path, [real / "mlxlm-qwen3moe-q4-g64", real / "gptqmodel-qwen3moe-w4g64"],
                   real / "qwen3moe-bf16")
    try:
        w.tree.combo.setCurrentText("mlxlm-qwen3moe-q4-g64")
        assert w.tree.expert.isHidden()
        with qtbot.waitSignal(w.detail_shown, timeout=60_000):
            assert w.tree.select("model.layers.1.mlp.switch_mlp.down_proj")  # the stack: an expert shown
        assert w.current_layer.startswith("model.layers.1.mlp.experts.") and not w.tree.expert.isHidden()
        n = w.workspace.models()["mlxlm-qwen3moe-q4-g64"].layers["model.layers.1.mlp.switch_mlp.down_proj"].shape[0]
        assert w.tree.expert.maximum() == n - 1 and w.tree.expert_of.text() == f"of {n}"
        with qtbot.waitSignal(w.detail_shown, timeout=60_000):
            w.tree.expert.setValue(2)  # (the arrows, or a number and Enter)
        assert w.current_layer == "model.layers.1.mlp.experts.2.down_proj"
        assert w.hist.note.text().startswith("model.layers.1.mlp.experts.2.down_proj")
        assert set(w._detail_errors[1].metrics) == {"mlxlm-qwen3moe-q4-g64", "gptqmodel-qwen3moe-w4g64"}
        with qtbot.waitSignal(w.detail_shown, timeout=60_000):
            assert w.tree.select("model.layers.1.self_attn.q_proj")  # not an expert: no box
        assert w.tree.expert.isHidden()
        # in a checkpoint storing the experts one by one, the tree's row follows the box (it stayed
        # on the expert before, so its cell, the arrow keys and exports started from that one)
        w.tree.combo.setCurrentText("gptqmodel-qwen3moe-w4g64")
        with qtbot.waitSignal(w.detail_shown, timeout=60_000):
            assert w.tree.select("model.layers.0.mlp.experts.2.up_proj")
        with qtbot.waitSignal(w.detail_shown, timeout=60_000):
            w.tree.expert.setValue(0)
        assert w.tree.current_path() == "model.layers.0.mlp.experts.0.up_proj" == w.current_layer
        # another workspace: the box goes, and the config panel's rows of the checkpoints before
        from quantscope.backend.demo import build_demo
        demo = build_demo(tmp_path / "demo")
        with qtbot.waitSignal(w.workspace_loaded, timeout=60_000):
            w.open_workspace([str(p) for p in demo.variants.values()], str(demo.reference))
        qtbot.waitUntil(lambda: not w.turns_pending(), timeout=10_000)
        assert w.tree.expert.isHidden() and w.config.layer_table.rowCount() == 0
    finally:
        w.service.shutdown()


def test_a_stack_shown_before_a_comparison_moves_to_its_worst_expert_after(qtbot, tmp_path):
    """It said "(once compared: the worst expert)", then stayed on expert 0 while the tree's cell
    showed the worst expert's error."""
    from pathlib import Path
    real = Path(__file__).parent / "fixtures" / "real"
    w = _window_on(qtbot, tmp_path, [real / "mlxlm-qwen3moe-q4-g64", real / "gptqmodel-qwen3moe-w4g64"],
                   real / "qwen3moe-bf16")
    try:
        w.tree.combo.setCurrentText("mlxlm-qwen3moe-q4-g64")
        stack = "model.layers.1.mlp.switch_mlp.down_proj"
        with qtbot.waitSignal(w.detail_shown, timeout=60_000):
            assert w.tree.select(stack)
        assert w.current_layer == "model.layers.1.mlp.experts.0.down_proj"
        with qtbot.waitSignals([w.sweep_done, w.detail_shown], timeout=120_000):
            w.compare_all()
        rows = [r for r in w.sweep_result.rows if r.variant == "mlxlm-qwen3moe-q4-g64" and r.variant_layer == stack]
        worst = max(rows, key=lambda r: r.rel_fro).name
        assert worst != "model.layers.1.mlp.experts.0.down_proj"  # (else this test shows nothing)
        assert w.current_layer == worst and w.tree.current_path() == stack
        # an expert picked in the box stays over the next comparison
        with qtbot.waitSignal(w.detail_shown, timeout=60_000):
            w.tree.expert.setValue(1 if ".experts.1." not in worst else 2)
        picked = w.current_layer
        with qtbot.waitSignal(w.sweep_done, timeout=120_000):
            w.compare_all()
        qtbot.waitUntil(lambda: not w.turns_pending(), timeout=10_000)
        assert w.current_layer == picked
    finally:
        w.service.shutdown()


def test_without_a_reference_the_expert_box_shows_an_expert_of_a_stack(qtbot, tmp_path):
    """No reference: a stack pooled its experts in the views and no box appeared; the other MoE
    checkpoint (experts one by one) was left out without a word."""
    from pathlib import Path
    real = Path(__file__).parent / "fixtures" / "real"
    w = _window_on(qtbot, tmp_path, [real / "mlxlm-qwen3moe-q4-g64", real / "gptqmodel-qwen3moe-w4g64"], None)
    try:
        w.tree.combo.setCurrentText("mlxlm-qwen3moe-q4-g64")
        w.tabs.setCurrentWidget(w.hist)
        with qtbot.waitSignal(w.detail_shown, timeout=60_000):
            assert w.tree.select("model.layers.1.mlp.switch_mlp.down_proj")
        assert w.current_layer == "model.layers.1.mlp.experts.0.down_proj" and not w.tree.expert.isHidden()
        with qtbot.waitSignal(w.detail_shown, timeout=60_000):
            w.tree.expert.setValue(2)
        assert w.current_layer == "model.layers.1.mlp.experts.2.down_proj"
        counts = w.hist._counts
        assert set(counts) == {"mlxlm-qwen3moe-q4-g64", "gptqmodel-qwen3moe-w4g64"}
        assert int(counts["mlxlm-qwen3moe-q4-g64"].sum()) == 128 * 64  # one expert's rows, not the stack's
    finally:
        w.service.shutdown()


def test_switching_checkpoints_keeps_the_layer_shown_highlighted(qtbot, tmp_path):
    # an expert shown, the tree switched from the stacked MLX checkpoint to GPTQ's experts:
    # no row was current, though that expert's row is in the list
    from pathlib import Path
    real = Path(__file__).parent / "fixtures" / "real"
    w = _window_on(qtbot, tmp_path, [real / "mlxlm-qwen3moe-q4-g64", real / "gptqmodel-qwen3moe-w4g64"],
                   real / "qwen3moe-bf16")
    try:
        expert = "model.layers.1.mlp.experts.2.down_proj"
        w.tree.set_checkpoints(w.workspace.models(), "mlxlm-qwen3moe-q4-g64")
        with qtbot.waitSignal(w.detail_shown, timeout=60_000):
            w.select_layer_everywhere(expert)
        assert w.tree.current_path() == "model.layers.1.mlp.switch_mlp.down_proj"  # the stack holding it
        shown = w._detail_job
        w.tree.combo.setCurrentText("gptqmodel-qwen3moe-w4g64")
        assert w.tree.current_path() == expert and w.current_layer == expert
        assert w._detail_job == shown  # highlighted quietly: nothing decoded again
        w.tree.combo.setCurrentText("qwen3moe-bf16")
        assert w.tree.current_path() == expert
        # a search that hides that row stays as typed (the switch cleared it to show the row)
        w.tree.search.setText("self_attn")
        w.tree.combo.setCurrentText("mlxlm-qwen3moe-q4-g64")
        assert w.tree.search.text() == "self_attn" and w.tree.current_path() is None
    finally:
        w.service.shutdown()


def test_scales_say_nonfinite_and_zeros_say_who_stores_none(qtbot, tmp_path, real_fixtures):
    # the Scales footer said nothing of NaN scales (the doctor found them); the zero points left
    # MLX out of the plot without a word
    import shutil
    from pathlib import Path

    from safetensors.numpy import load_file, save_file
    real = Path(__file__).parent / "fixtures" / "real"
    bad = tmp_path / "gptq-nan"
    shutil.copytree(real / "gptqmodel-gptq-w4g128", bad)
    t = load_file(bad / "model.safetensors")
    t["model.layers.1.mlp.down_proj.scales"][0, :3] = np.nan
    save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
    w = _window_on(qtbot, tmp_path, [bad, real_fixtures / "mlx-affine-q4-g64"], real_fixtures / "base-bf16")
    try:
        with qtbot.waitSignal(w.detail_shown, timeout=60_000):
            w.select_layer_everywhere("model.layers.1.mlp.down_proj")
        for i in range(w.tabs.count()):  # hidden tabs update when shown
            w.tabs.setCurrentIndex(i)
        assert "gptq-nan 3" in w.scales.footer.text() and "NaN" in w.scales.footer.text()
        assert "No integer zero points: mlx-affine-q4-g64" in w.zeros.footer.text()
        assert "gptq-nan" in w.zeros._counts
    finally:
        w.service.shutdown()


def test_selecting_a_stacked_module_shows_an_expert_of_the_reference(qtbot, tmp_path):
    # the tree shows the variant's switch_mlp.down_proj; the reference has experts one by one:
    # "no layer of that name to measure the error against" before
    from pathlib import Path
    from types import SimpleNamespace
    real = Path(__file__).parent / "fixtures" / "real"
    w = _window_on(qtbot, tmp_path, [real / "mlxlm-qwen3moe-q4-g64"], real / "qwen3moe-bf16")
    sw = "model.layers.1.mlp.switch_mlp.down_proj"
    with qtbot.waitSignal(w.detail_shown, timeout=30_000):
        w.select_layer(sw)
    assert w.current_layer == "model.layers.1.mlp.experts.0.down_proj"
    assert "stacks the reference's experts" in w.statusBar().currentMessage()
    assert "mlxlm-qwen3moe-q4-g64" in w.hist._counts and "reference" in w.hist._counts
    # once compared, the expert with the largest error
    shown = w.tree.current_label()
    w.sweep_result = SimpleNamespace(rows=[SimpleNamespace(name=f"model.layers.1.mlp.experts.{e}.down_proj",
                                                           variant=v, variant_layer=sw, rel_fro=r)
                                           for v, rs in ((shown, (0.09, 0.08, 0.095, 0.091)),
                                                         ("another", (0.5, 0.1, 0.1, 0.1)))
                                           for e, r in enumerate(rs)])  # another variant's rows: not counted
    with qtbot.waitSignal(w.detail_shown, timeout=30_000):
        w.select_layer(sw)
    assert w.current_layer == "model.layers.1.mlp.experts.2.down_proj"
    assert "holds 4 layers" in w.statusBar().currentMessage()
    # a point of the Layers plot (or a heatmap cell) names an expert: the tree highlights the stack
    # holding it, and that expert is shown (the tree stayed on the row before)
    with qtbot.waitSignal(w.detail_shown, timeout=30_000):
        w.select_layer_everywhere("model.layers.0.mlp.experts.3.up_proj")
    assert w.tree.view.currentIndex().data() == "model.layers.0.mlp.switch_mlp.up_proj"
    assert w.current_layer == "model.layers.0.mlp.experts.3.up_proj"
    assert "stacks" not in w.statusBar().currentMessage()  # the message about the selection before, gone
    # a click on that highlighted row selects it (no current-row change: nothing happened)
    with qtbot.waitSignal(w.detail_shown, timeout=30_000):
        w.tree.view.clicked.emit(w.tree.view.currentIndex())
    assert w.current_layer == "model.layers.0.mlp.experts.0.up_proj"
    with qtbot.waitSignal(w.detail_shown, timeout=30_000):
        w.select_layer_everywhere("model.layers.0.mlp.experts.3.up_proj")
    assert "stacks" not in w.statusBar().toolTip()  # and its tooltip
    w.tree.search.setText("experts.3")  # no module of the stacked checkpoint is called so: say why
    w.tree._apply_search()
    assert w.tree.count.text().startswith("0 of 27 modules") and "switch_mlp" in w.tree.count.text()
    w.tree.search.clear()
    w.tree._apply_search()
    # File > Export > selected layer: that expert's slice of the stack (it failed: "no such layer")
    out = tmp_path / "e3.npy"
    w._ask_npy = lambda default: str(out)
    with qtbot.waitSignal(w.service.job_done, timeout=30_000):
        w.export_dequant(w.current_layer)
    import mlx.core as mx
    t = mx.load(str(real / "mlxlm-qwen3moe-q4-g64" / "model.safetensors"))
    sw = "model.layers.0.mlp.switch_mlp.up_proj"
    want = mx.dequantize(t[f"{sw}.weight"][3], t[f"{sw}.scales"][3], t[f"{sw}.biases"][3], group_size=64, bits=4)
    assert np.array_equal(np.load(out), np.array(want.astype(mx.float32)))
    w.service.shutdown()


# -- a window user's review (2026-12-06) --------------------------------------------------------

def test_group_error_ticks_name_the_column_above_them(qtbot):
    # cell g spanned [g, g+1): a 2-group layer was labelled 0, 1, 2 along the cells' edges
    from quantscope.widgets.group_error_heatmap import GroupErrorHeatmap
    hm = GroupErrorHeatmap()
    qtbot.addWidget(hm)
    hm.resize(600, 400)
    hm.show()
    hm.set_maps({"v": (np.array([[0.1, 0.2], [0.3, 0.4]]), 1)})
    rect = hm.image.mapRectToParent(hm.image.boundingRect())
    assert (rect.left(), rect.right()) == (-0.5, 1.5)  # group 0 centred on 0, group 1 on 1
    # the hover names the group under the pointer: x = 0.9 lies in group 1's cell
    hm._on_move(hm.plot.vb.mapViewToScene(__import__("PySide6.QtCore", fromlist=["QPointF"]).QPointF(0.9, 0.5)))
    assert "group 1: 0.2" in hm.hover.text()


def test_doctor_findings_of_a_checkpoint_not_open_are_not_links(qtbot):
    # a click on one said the layer "cannot be decoded" of a tree that does not hold it
    from quantscope.widgets.doctor_panel import DoctorPanel
    panel = DoctorPanel()
    qtbot.addWidget(panel)
    f = [{"rule": "container.out-of-file", "severity": "error", "message": "past the end",
          "tensor": "model.layers.1.mlp.down_proj.qweight", "layer": "model.layers.1.mlp.down_proj"}]
    panel.set_findings("broken", f, linked=False)
    assert "href" not in panel.text.toHtml() and "not open in the window" in panel.title.text()
    assert "model.layers.1.mlp.down_proj.qweight" in panel.text.toPlainText()
    panel.set_findings("open", f)
    assert 'href="layer:model.layers.1.mlp.down_proj"' in panel.text.toHtml()


def test_tree_name_column_follows_the_window_and_the_shown_error_keeps_its_digits(qtbot, tmp_path, demo):
    w = MainWindow(QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    w.quiet_errors = True
    qtbot.addWidget(w)
    w.resize(900, 600)  # opens at its least width, 1024
    w.show()
    tree = w.tree

    def fits():  # the shown checkpoint's error (second from the left) ends inside the viewport
        col = tree.view.header().logicalIndex(1)
        return tree.view.header().sectionViewportPosition(col) + tree.view.columnWidth(col) \
            <= tree.view.viewport().width()

    try:
        with qtbot.waitSignal(w.workspace_loaded, timeout=30_000):
            w.open_workspace([str(p) for p in demo.variants.values()], str(demo.reference))
        with qtbot.waitSignal(w.sweep_done, timeout=120_000):
            w.compare_all()
        # the background jobs done first: in a fresh clone the warm-up compiles the kernels
        # (numba's cache is empty), holding the GIL for seconds at a time, beside the layout the
        # waits below are about
        qtbot.waitUntil(w.service.is_idle, timeout=300_000)
        qtbot.wait(100)
        assert fits()  # the vertical scroll bar had covered its last digit ("0.305")
        narrow, dock = tree.view.columnWidth(0), w.tree_dock.width()
        w.resize(1920, 1080)
        # it stayed narrow: now as wide as the dock allows again, once the dock has its share of
        # the new width (the taller window drops the vertical scroll bar first: 8 px more, and the
        # wait passed there, before the dock grew, so "wide" was 200 px on a loaded machine)
        qtbot.waitUntil(lambda: w.tree_dock.width() > 1.5 * dock
                        and tree.view.columnWidth(0) == tree._name_width() > narrow, timeout=5000)
        assert fits()
        wide = tree.view.columnWidth(0)
        w.resize(1024, 600)
        # narrow again, as the viewport allows now ("<= narrow" was 8 px off where the vertical
        # scroll bar, there at the start, was not at the end)
        qtbot.waitUntil(lambda: tree.view.columnWidth(0) == tree._name_width() < wide, timeout=5000)
        assert fits()
    finally:
        w.service.shutdown()


def test_without_a_reference_the_views_say_a_comparison_needs_one(qtbot, tmp_path, demo):
    w = _window_on(qtbot, tmp_path, [demo.variants["gptq-w4g128"]], "")
    try:
        qtbot.waitUntil(lambda: "needs a reference" in w.layers.hint.text(), timeout=10_000)
        assert w.layers.info.text() == ""  # said once, over the plot
        assert w.tree.model.variants == []  # no error column that nothing could fill
    finally:
        w.service.shutdown()


def test_whatif_offers_what_fits_the_layer_and_says_in_its_box_why_not(qtbot, tmp_path):
    from pathlib import Path
    real = Path(__file__).parent / "fixtures" / "real"
    w = _window_on(qtbot, tmp_path, [real / "mlxlm-qwen3moe-q4-g64"], real / "qwen3moe-bf16")
    cfg = w.config
    try:
        expert = "model.layers.1.mlp.experts.2.down_proj"  # [128, 64]: only group 32 and 64 divide 64
        cfg.group.setCurrentText("128")
        cfg.group.activated.emit(cfg.group.currentIndex())  # as a user's choice
        with qtbot.waitSignal(w.detail_shown, timeout=60_000):
            w.select_layer(expert)
        enabled = {cfg.group.itemText(i): cfg.group.model().item(i).isEnabled() for i in range(cfg.group.count())}
        assert enabled == {"32": True, "64": True, "128": False} and cfg.group.currentText() == "64"
        assert cfg.run.isEnabled()
        w.run_whatif(4, 128, "affine")  # (as a stale click would ask): said in the box, in our words
        qtbot.waitUntil(lambda: "failed" in cfg.whatif_result.text(), timeout=30_000)
        assert "in_features 64 is not a multiple of the group size 128" in cfg.whatif_result.text()
        w.select_layer("model.layers.0.input_layernorm")
        assert not cfg.run.isEnabled() and "not a weight matrix" in cfg.run.toolTip()
        w.select_layer("model.layers.0.self_attn.q_proj")  # [.., 128]: every group again
        assert cfg.run.isEnabled() and all(cfg.group.model().item(i).isEnabled() for i in range(cfg.group.count()))
        assert cfg.group.currentText() == "128"  # the user's choice back where it divides
        cfg.mode.setCurrentText("nvfp4")
        w.select_layer(expert)  # 64 = 4 blocks of 16: fine; a width no block divides says which
        assert cfg.run.isEnabled()
        cfg.set_whatif_target(40)
        assert not cfg.run.isEnabled() and "nvfp4's block of 16" in cfg.run.toolTip()
    finally:
        w.service.shutdown()


def test_a_layer_a_variant_keeps_unquantized_is_shown_with_the_others(qtbot, tmp_path):
    # GPTQModel keeps the MoE router in bf16: selected in its tree, it was left out of every view
    from pathlib import Path
    real = Path(__file__).parent / "fixtures" / "real"
    w = _window_on(qtbot, tmp_path, [real / "gptqmodel-qwen3moe-w4g64", real / "mlxlm-qwen3moe-q4-g64"],
                   real / "qwen3moe-bf16")
    try:
        with qtbot.waitSignal(w.detail_shown, timeout=60_000):
            w.select_layer("model.layers.0.mlp.gate")
        d = w._detail_errors[1]
        assert not d.left_out
        assert d.metrics["gptqmodel-qwen3moe-w4g64"].rel_fro == 0.0  # the reference's weights, kept as they were
        assert 0 < d.metrics["mlxlm-qwen3moe-q4-g64"].rel_fro < 0.02  # mlx-lm's 8-bit router
        assert "gptqmodel-qwen3moe-w4g64" in w.hist._counts
    finally:
        w.service.shutdown()


def test_a_variant_added_after_a_comparison_is_compared_and_only_it_is_measured(win, qtbot, tmp_path, demo):
    # adding a variant dropped the comparison and its cache: the next one measured every variant again
    import shutil
    with qtbot.waitSignal(win.sweep_done, timeout=120_000):
        win.compare_all()
    before = len(win._sweep_cache)
    n_layers = sum(r.variant == "rtn-w4g128" for r in win.sweep_result.rows)
    extra = shutil.copytree(demo.variants["rtn-w4g128"], tmp_path / "rtn-copy")
    with qtbot.waitSignal(win.sweep_done, timeout=120_000):
        win.add_paths([str(extra)])
    assert {r.variant for r in win.sweep_result.rows} >= {"rtn-copy", "rtn-w4g128", "gptq-w4g128"}
    assert len(win._sweep_cache) == before + n_layers  # the new variant's layers, and nothing else
    copy = {r.name: r.rel_fro for r in win.sweep_result.rows if r.variant == "rtn-copy"}
    orig = {r.name: r.rel_fro for r in win.sweep_result.rows if r.variant == "rtn-w4g128"}
    assert copy == pytest.approx(orig, rel=1e-12)  # the same files: the same figures (summed in other blocks)


def test_each_error_column_header_shows_its_variants_plot_colour(win):
    # the titles are elided ("gp…28"): the swatch says which legend entry a column is
    from PySide6.QtGui import QColor
    from quantscope.widgets.tensor_tree_model import BASE_COLUMNS
    model = win.tree.model
    for i, label in enumerate(model.variants):
        icon = model.headerData(len(BASE_COLUMNS) + i, Qt.Orientation.Horizontal, Qt.ItemDataRole.DecorationRole)
        assert icon is not None, label
        assert icon.pixmap(10, 10).toImage().pixelColor(5, 5) == QColor(win.colors[label]), label
    assert model.headerData(0, Qt.Orientation.Horizontal, Qt.ItemDataRole.DecorationRole) is None


def _demo_compared(win, qtbot, demo) -> list[str]:
    """The whole demo open again and compared; its variants' labels."""
    labels = list(win.workspace.variants)
    with qtbot.waitSignal(win.workspace_loaded, timeout=30_000):
        win.open_workspace([str(demo.variants[v]) for v in labels], str(demo.reference))
    with qtbot.waitSignal(win.sweep_done, timeout=120_000):
        win.compare_all()
    return labels


def test_adding_a_checkpoint_that_is_open_already_changes_nothing_but_the_shown_one(win, qtbot, demo):
    # It rebuilt the workspace's views and ran the comparison again (from its cache) for nothing
    labels = _demo_compared(win, qtbot, demo)
    result, errors = win.sweep_result, dict(win.tree.model._errors)
    assert win.tree.current_label() != labels[-1]
    swept = []
    win.sweep_done.connect(lambda *a: swept.append(a))
    win.add_paths([str(demo.variants[labels[-1]])])
    qtbot.waitUntil(lambda: "is open already" in win.statusBar().currentMessage(), timeout=30_000)
    qtbot.wait(300)
    assert not swept and win.sweep_result is result and win.tree.model._errors == errors
    assert list(win.workspace.variants) == labels
    assert win.tree.current_label() == labels[-1]  # the one asked for is shown
    assert "is open already" in win.statusBar().currentMessage()


def test_a_checkpoint_opened_by_another_path_or_made_the_reference_is_not_opened_twice(win, qtbot, demo):
    # its model.safetensors added beside its folder gave "x (2)", a second column and plot series;
    # an open variant set as the reference was opened again beside itself ("x (2)", rel_fro 0)
    labels = list(win.workspace.variants)
    with qtbot.waitSignal(win.workspace_loaded, timeout=30_000):
        win.open_workspace([str(demo.variants[v]) for v in labels], str(demo.reference))
    mlx = next(v for v in labels if v.startswith("mlx"))
    win.add_paths([str(demo.variants[mlx] / "model.safetensors")])
    qtbot.waitUntil(lambda: "is open already" in win.statusBar().currentMessage(), timeout=30_000)
    assert list(win.workspace.variants) == labels
    awq = next(v for v in labels if v.startswith("awq"))
    with qtbot.waitSignal(win.workspace_loaded, timeout=30_000):
        win.add_paths([str(demo.variants[awq])], as_reference=True)
    assert win.workspace.reference_label == awq and awq not in win.workspace.variants
    assert sorted(win.workspace.variants) == sorted(v for v in labels if v != awq)
    assert win.statusBar().currentMessage().startswith("The reference is quantized (awq")
    with qtbot.waitSignal(win.workspace_loaded, timeout=30_000):  # a dense one again: that is not said still
        win.add_paths([str(demo.reference)], as_reference=True)
    assert not win.statusBar().currentMessage().startswith("The reference is quantized")


def test_the_shown_checkpoint_can_be_removed_from_the_workspace(win, qtbot, demo):
    labels = _demo_compared(win, qtbot, demo)
    colors = {lb: win.colors[lb].name() for lb in labels}
    symbols = {lb: win.layers.series[lb].opts["symbol"] for lb in labels}
    gone = labels[1]
    win.tree.combo.setCurrentText(gone)
    with qtbot.waitSignal(win.sweep_done, timeout=120_000):  # the others compared again, from the cache
        win.remove_shown()
    assert gone not in win.workspace.variants and gone not in win.tree.model._errors
    assert {r.variant for r in win.sweep_result.rows} == set(labels) - {gone}
    assert "removed from the workspace" in win.statusBar().currentMessage()
    assert demo.variants[gone].exists()
    # the others keep their colours and markers (each after it took the one before's)
    kept = [lb for lb in labels if lb != gone]
    assert {lb: win.colors[lb].name() for lb in kept} == {lb: colors[lb] for lb in kept}
    assert {lb: win.layers.series[lb].opts["symbol"] for lb in kept} == {lb: symbols[lb] for lb in kept}
    cached = len(win._sweep_cache)
    win.tree.combo.setCurrentText(win.workspace.reference_label)
    win.remove_shown()
    assert win.workspace.reference is None and list(win.workspace.variants) == kept
    # the reference opened again: its comparisons come from the cache, nothing measured again
    with qtbot.waitSignal(win.workspace_loaded, timeout=30_000):
        win.add_paths([str(demo.reference)], as_reference=True)
    with qtbot.waitSignal(win.sweep_done, timeout=120_000):
        win.compare_all()
    assert len(win._sweep_cache) == cached and {r.variant for r in win.sweep_result.rows} == set(kept)
    # a variant added anew takes a colour no open one has
    with qtbot.waitSignal(win.workspace_loaded, timeout=30_000):
        win.add_paths([str(demo.variants[gone])])
    assert len({win.colors[lb].name() for lb in win.workspace.variants}) == len(win.workspace.variants)
    # a new workspace starts a fresh palette (one opened after six variants took the seventh colour)
    from quantscope.widgets.palette import VARIANT_COLORS
    with qtbot.waitSignal(win.workspace_loaded, timeout=30_000):
        win.open_workspace([str(demo.variants["awq-w4g128"])], str(demo.reference))
    assert win.colors["awq-w4g128"].name().upper() == VARIANT_COLORS[0].upper()


def test_a_reference_of_another_model_is_said_as_such(win, qtbot, demo, real_fixtures):
    # the views said "no open variant has this layer" of a layer every variant has (another shape),
    # and nothing was said when the reference was switched
    labels = list(win.workspace.variants)[:2]
    with qtbot.waitSignal(win.workspace_loaded, timeout=30_000):
        win.open_workspace([str(demo.variants[v]) for v in labels], str(demo.reference))
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        assert win.tree.select("model.layers.1.mlp.down_proj")
    with qtbot.waitSignal(win.workspace_loaded, timeout=30_000):
        win.add_paths([str(real_fixtures / "base-bf16")], as_reference=True)
    assert win.statusBar().currentMessage().startswith("Is the reference another model?")
    assert "another shape" in win._no_partner_why("model.layers.1.mlp.down_proj")


def test_the_convert_dialog_keeps_a_typed_destination_and_offers_only_settings_that_apply(qtbot, demo):
    # a typed destination was replaced when "Convert to" or the source changed; mxfp4 kept bits and
    # group open (3 / 128 failed after Convert); a recipe went with explicit bits (failed, in CLI
    # flag names) and was offered for a GPTQ source (requantized it at 2 bits)
    from quantscope.widgets.convert_dialog import KEEP, ConvertDialog
    srcs = {"ref": str(demo.reference), "gptq": str(demo.variants["gptq-w4g128"])}
    dlg = ConvertDialog(srcs, "gptq", dense={"ref"})
    qtbot.addWidget(dlg)
    assert dlg.dst.text().endswith("gptq-w4g128-mlx")
    dlg.to.setCurrentText("dense")
    assert dlg.dst.text().endswith("gptq-w4g128-dense")  # a suggestion follows the choices
    dlg.dst.setText("/tmp/my-name")
    dlg.to.setCurrentText("mlx")
    dlg.source.setCurrentText("ref")
    assert dlg.dst.text() == "/tmp/my-name"  # a typed one stays
    dlg.mode.setCurrentText("mxfp4")
    assert not dlg.bits.isEnabled() and not dlg.group.isEnabled() and dlg.bits.currentText() == KEEP
    dlg.mode.setCurrentText("affine")
    dlg.bits.setCurrentText("3")
    dlg.recipe.setCurrentText("mixed_3_6")
    assert not dlg.bits.isEnabled() and dlg.options()["bits"] is None and dlg.options()["recipe"] == "mixed_3_6"
    dlg.source.setCurrentText("gptq")
    assert not dlg.recipe.isEnabled() and dlg.options()["recipe"] is None and dlg.bits.isEnabled()
    # --scales source from the dialog (MLX output only)
    assert dlg.options()["scales"] == "exact"
    dlg.source_scales.setChecked(True)
    assert dlg.options()["scales"] == "source"
    dlg.to.setCurrentText("dense")
    assert not dlg.source_scales.isEnabled() and dlg.options()["scales"] == "exact"
    # a relative destination is made absolute (written under the window's working folder, and
    # reported as typed); a repo id's suggestion goes in the home folder, not in that one
    from pathlib import Path
    dlg.dst.setText("out/x")
    assert dlg.options()["dst"] == str(Path.cwd() / "out" / "x")
    hub = ConvertDialog({"repo": "org/tiny-gptq"}, "repo")
    qtbot.addWidget(hub)
    assert hub.dst.text() == str(Path.home() / "tiny-gptq-mlx")


def test_whatif_affine_reproduces_the_mlx_variant_made_the_same_way(demo):
    # it quantized float32 weights (float32 scales and output): 0.1331 against the MLX variant's 0.1335
    from quantscope.app import jobs
    from quantscope.backend.compare import sweep
    from quantscope.backend.workspace import open_model
    ref = open_model(demo.reference)
    mlx = open_model(demo.variants["mlx-affine-q4g64"])
    name = "model.layers.1.mlp.down_proj"
    got = jobs.job_whatif(ref, name, 4, 64, "affine")
    row = next(r for r in sweep(ref, {"m": mlx}, engine="numpy", layers=name.replace(".", r"\.")).rows if r.name == name)
    assert got["rel_fro"] == pytest.approx(row.rel_fro, rel=1e-9)


def test_a_layer_a_variant_keeps_unquantized_is_said_to_be_a_copy(win, qtbot):
    # the box gave "rel_fro 0.0000 (156.9 dB)" for embed_tokens, which the tree, the Layers plot
    # and `compare` leave out as "skipped by the variant": now it says what that figure is
    with qtbot.waitSignal(win.detail_shown, timeout=30_000):
        assert win.tree.select("model.embed_tokens")
    qtbot.waitUntil(lambda: "Current error" in win.config.whatif_result.text(), timeout=30_000)
    text = win.config.whatif_result.text()
    assert "gptq-w4g128: rel_fro 0.0000 (156.9 dB) — left unquantized by the variant\n" in text  # (fp16 of bf16: no exact copy)


def test_a_dense_variants_error_is_not_called_a_copy(qtbot, tmp_path, demo):
    # GPTQ converted to dense (or a fine-tune): "stored unquantized: a copy, not a quantization"
    # stood beside its error of 0.32
    from quantscope.app.cli import main
    dense = tmp_path / "gptq-dense"
    assert main(["convert", str(demo.variants["gptq-w4g128"]), str(dense), "--to", "dense"]) == 0
    w = _window_on(qtbot, tmp_path, [dense], demo.reference)
    try:
        with qtbot.waitSignal(w.detail_shown, timeout=30_000):
            assert w.tree.select("model.layers.1.self_attn.q_proj")
        qtbot.waitUntil(lambda: "Current error" in w.config.whatif_result.text(), timeout=30_000)
        text = w.config.whatif_result.text()
        assert "gptq-dense: rel_fro 0.32" in text and "unquantized" not in text and "copy" not in text
    finally:
        w.service.shutdown()


def test_an_empty_window_says_what_could_not_be_opened(qtbot, tmp_path):
    # nothing open and the only checkpoint broken: the Layers view blamed a missing reference
    # (the error box goes; a screenshot run shows none)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)
    win = MainWindow(QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(win)
    win.quiet_errors = True
    try:
        with qtbot.waitSignal(win.failed, timeout=30_000):
            win.open_workspace([str(bad)], None)
        assert "Could not be opened: " in win.layers.hint.text() and str(bad) in win.layers.hint.text()
        # the other views say so too (they pointed to the empty tree), and there is nothing to requantize
        for view in (win.hist, win.err_hist, win.codes, win.heatmap):
            win.tabs.setCurrentWidget(view)
            qtbot.waitUntil(lambda v=view: v.hint.text().startswith("Nothing is open.") and str(bad) in v.hint.text(),
                            timeout=5000)
        assert not win.config.run.isEnabled() and "nothing is open" in win.config.run.toolTip()
        shown = []
        win.failed.connect(shown.append)
        win.compare_all()
        assert shown and str(bad) in shown[0]  # Compare says why there is nothing to compare
    finally:
        win.service.shutdown()


def test_implausible_errors_are_said_above_the_plot(win, qtbot, tmp_path, demo):
    # one layer's scales 1e6 times too large: its rel. error (4e5) was plotted and coloured without
    # a word in the window (`compare` lists it and exits 1)
    import shutil

    from safetensors.numpy import load_file, save_file
    bad = tmp_path / "huge"
    shutil.copytree(demo.variants["gptq-w4g128"], bad)
    f = next(bad.glob("*.safetensors"))
    t = load_file(str(f))
    name = "model.layers.0.self_attn.q_proj.scales"
    t[name] = (t[name].astype(np.float32) * 1000).astype(t[name].dtype)
    save_file(t, str(f), {"format": "pt"})
    with qtbot.waitSignal(win.workspace_loaded, timeout=30_000):
        win.open_workspace([str(bad)], str(demo.reference))
    with qtbot.waitSignal(win.sweep_done, timeout=120_000):
        win.compare_all()
    qtbot.waitUntil(lambda: not win.turns_pending(), timeout=10_000)
    text = win.layers.warn.text()
    assert "implausible error in 1 layer(s)" in text and not win.layers.warn.isHidden()
    # (its decode is the reference's × ~1000: said as well)
    assert text.startswith("⚠ huge: 1 layer(s) are the reference's times a constant (first: model.layers.0.self_attn.q_proj")
    assert "model.layers.0.self_attn.q_proj" in win.layers.warn.toolTip()


def test_error_cells_mark_undone_smoothing_and_say_their_own_variants_figures(win, qtbot, demo):
    """AWQ's cells read a bare 0.60 beside the command line's 0.60*, and every error cell's
    tooltip gave the rule of the checkpoint the tree shows, in every variant's column."""
    _demo_compared(win, qtbot, demo)
    model = win.tree.model
    win.tree.combo.setCurrentText("gptq-w4g128")
    from quantscope.widgets.tensor_tree_model import BASE_COLUMNS
    col = len(BASE_COLUMNS) + model._variants.index("awq-w4g128")
    row = model.row_of("model.layers.0.self_attn.q_proj").row()
    r = next(x for x in win.sweep_result.rows if x.variant == "awq-w4g128" and x.name == "model.layers.0.self_attn.q_proj")
    assert model.index(row, col).data() == f"{r.rel_fro:.4f}*"
    tip = model.index(row, col).data(Qt.ItemDataRole.ToolTipRole)
    assert tip.startswith("awq-w4g128\n") and "smoothing undone (exact, from input_layernorm)" in tip
    assert f"as stored: {r.rel_fro_raw:.4f}" in tip
    down = model.row_of("model.layers.0.mlp.down_proj").row()
    assert model.index(down, col).data().endswith("~")  # estimated from up_proj's rows
    gcol = len(BASE_COLUMNS) + model._variants.index("gptq-w4g128")
    assert not model.index(row, gcol).data().endswith(("*", "~"))
    assert model.index(row, gcol).data(Qt.ItemDataRole.ToolTipRole).startswith("gptq-w4g128\n")


def test_a_legend_shortens_its_names_rather_than_take_more_than_three_lines(qtbot):
    from quantscope.widgets.plots import Legend
    lg = Legend()
    qtbot.addWidget(lg)
    names = [f"gptqmodel-gptq-w{b}g128-variant-{i}" for i, b in enumerate((2, 3, 4, 5, 6, 8, 3, 4))]
    lg.resize(330, 200)
    lg.show()
    lg.set_entries([(n, "#E69F00", "●") for n in names])
    shown = [lg._flow.itemAt(i).widget().text() for i in range(len(names))]
    assert lg._chars < 36 and all("…" in t for t in shown)
    assert lg._flow.heightForWidth(330) <= 3 * (lg.fontMetrics().lineSpacing() + 8)
    assert [lg._flow.itemAt(i).widget().toolTip().split("\n")[0] for i in range(len(names))] == names  # whole
    lg.resize(2000, 200)  # room again: whole names
    lg._fit(2000)
    assert lg._chars == 36 and lg._flow.itemAt(0).widget().text().endswith(names[0])


def test_config_table_keeps_scheme_bits_and_shape_in_view(qtbot, tmp_path, real_fixtures):
    """At 835 px only Checkpoint and Scheme were in view; at 1600 px a shape read "143…096" and
    the Rule column "globa…tored" (the line under the table says the selected row's rule)."""
    from pathlib import Path

    from PySide6.QtWidgets import QApplication
    real = Path(__file__).parent / "fixtures" / "real"
    w = _window_on(qtbot, tmp_path, [real / "gptqmodel-gptq-w4g128", real / "autoawq-gemm-w4g128"],
                   real_fixtures / "base-bf16")
    try:
        w.resize(835, 700)
        with qtbot.waitSignal(w.detail_shown, timeout=30_000):
            assert w.tree.select("model.layers.0.mlp.gate_proj")
        QApplication.processEvents()
        t = w.config.layer_table
        assert sum(t.columnWidth(c) for c in range(3)) <= t.viewport().width()  # checkpoint, scheme, bits
        assert t.isColumnHidden(5)  # no room for the rule: said under the table
        assert t.columnWidth(4) >= t.fontMetrics().horizontalAdvance("1536×384")
        w.resize(1600, 1000)
        w.resizeDocks([w.config_dock], [760], Qt.Orientation.Horizontal)
        qtbot.waitUntil(lambda: w.config_dock.width() >= 700, timeout=3000)
        QApplication.processEvents()
        assert not t.isColumnHidden(5)
    finally:
        w.service.shutdown()


def test_the_window_has_its_icon(qtbot):
    from quantscope.app.window_main import app_icon
    icon = app_icon()
    assert not icon.isNull() and not icon.pixmap(64, 64).isNull()



def test_a_legend_entry_click_hides_and_shows_its_series(qtbot):
    """Nine overlaid step curves could not be told apart: a click on a legend entry hides that
    series (the entry greyed and struck through), another shows it again; the count axis fits
    the series shown."""
    from PySide6.QtCore import QPoint
    from quantscope.widgets.histogram_view import HistogramView
    h = HistogramView("weight value")
    qtbot.addWidget(h)
    h.resize(900, 500)
    h.show()
    edges = np.linspace(-1, 1, 65)
    h.set_histograms(edges, {"reference": np.full(64, 10), "big": np.full(64, 100_000)},
                     {"reference": "#000000", "big": "#E69F00"})
    h.log_y.setChecked(False)
    entry = next(h.legend._flow.itemAt(i).widget() for i in range(2) if "big" in h.legend._flow.itemAt(i).widget().toolTip())
    qtbot.mouseClick(entry, Qt.MouseButton.LeftButton, pos=QPoint(5, 5))
    assert h.legend.hidden == {"big"} and not h._items["big"].isVisible() and h._items["reference"].isVisible()
    assert "<s>" in entry.text()
    qtbot.waitUntil(lambda: h.plot.getViewBox().viewRange()[1][1] < 1000, timeout=2000)  # fitted to the shown
    qtbot.mouseClick(entry, Qt.MouseButton.LeftButton, pos=QPoint(5, 5))
    assert not h.legend.hidden and h._items["big"].isVisible()


def test_the_config_tab_says_there_are_no_overrides(qtbot, real_fixtures):
    """An empty override table filled the dock and said nothing."""
    from pathlib import Path

    from quantscope.backend.checkpoint import open_checkpoint
    from quantscope.backend.schemes import analyze
    from quantscope.widgets.quant_config_panel import QuantConfigPanel
    p = QuantConfigPanel()
    qtbot.addWidget(p)
    p.set_checkpoint("g", analyze(open_checkpoint(Path(__file__).parent / "fixtures" / "real" / "gptqmodel-gptq-w4g128")))
    assert p.overrides.rowCount() == 0 and p.overrides_hint.text().startswith("No per-layer overrides")
    p.set_checkpoint("b", analyze(open_checkpoint(real_fixtures / "base-bf16")))
    assert p.overrides_hint.text() == "No quantization config, so no per-layer overrides"
    p.set_checkpoint("m", analyze(open_checkpoint(Path(__file__).parent / "fixtures" / "real" / "mlxlm-qwen3moe-q4-g64")))
    assert p.overrides.rowCount() > 0 and p.overrides_hint.text() == ""  # mlx-lm's routers at 8 bits
    # the value in few words, as wide as it needs (it was cut to '{"bits": 8, "group_size":…'),
    # the whole in the tooltip
    item = p.overrides.item(0, 1)
    assert item.text() == "8 bit / 64" and '"group_size": 64' in item.toolTip()
    assert p.overrides.columnWidth(1) >= p.overrides.fontMetrics().horizontalAdvance(item.text())


def test_without_a_comparison_the_doctor_column_comes_last_and_no_legend_is_shown(qtbot, tmp_path):
    """Opened without a reference: the Doctor column sat between Bits and Group, and the Layers
    view listed the variants in a legend over a plot that could not be filled."""
    from pathlib import Path
    real = Path(__file__).parent / "fixtures" / "real"
    w = MainWindow(QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    w.quiet_errors = True
    qtbot.addWidget(w)
    w.show()
    with qtbot.waitSignal(w.workspace_loaded, timeout=30_000):
        w.open_workspace([str(real / "gptqmodel-gptq-w4g128"), str(real / "llmcompressor-fp8")], None)
    try:
        h, model = w.tree.view.header(), w.tree.model
        titles = [model.headerData(h.logicalIndex(i), Qt.Orientation.Horizontal) for i in range(model.columnCount())]
        assert titles[:4] == ["Name", "Scheme", "Bits", "Group"] and titles[-1] == "Doctor"
        assert not w.layers.legend.entries()  # no comparison can run: no legend over the empty plot
    finally:
        w.service.shutdown()


def test_first_run_compiles_first_says_so_and_the_comparison_waits_for_it(qtbot, tmp_path, demo, monkeypatch):
    """numba's cache empty: the kernels compile in a gating job (here a stand-in that waits for a
    signal); the status bar says why, the comparison waits listed, then runs; the note goes."""
    import threading

    from quantscope.app import jobs, main_window
    from quantscope.backend import precompile
    release = threading.Event()
    monkeypatch.setattr(precompile, "kernels_cached", lambda: False)
    monkeypatch.setattr(jobs, "job_warm_up", lambda progress=None, cancel=None: release.wait(10))
    w = MainWindow(QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    w.quiet_errors = True
    qtbot.addWidget(w)
    w.resize(1280, 800)
    w.show()
    qtbot.waitUntil(lambda: w.statusBar().toolTip() == main_window._FIRST_RUN, timeout=5000)
    with qtbot.waitSignal(w.workspace_loaded, timeout=30_000):  # opening is not held back
        w.open_workspace([str(p) for p in demo.variants.values()], str(demo.reference))
    done = []
    w.sweep_done.connect(lambda: done.append(1))
    w.compare_all()
    waiting = [j for j in w.service.running() if w.service.is_waiting(j.id)]
    assert [j.channel for j in waiting] == ["sweep"]
    assert w.jobs_bar.label.text().startswith("Compiling kernels")
    qtbot.wait(200)
    assert not done
    release.set()
    qtbot.waitUntil(lambda: bool(done), timeout=30_000)
    assert not w.statusBar().currentMessage().startswith("First run")  # (not its 15 s out)
    assert w.statusBar().toolTip() != main_window._FIRST_RUN


def test_what_if_text_wraps_long_words_and_copies_as_shown(win, qtbot):
    dock_w = win.config.width()
    text = ("awq-w4g128: rel_fro 0.1379, smoothing undone (lstsq:model.layers.1.mlp.up_proj."
            "weight_with_a_very_long_name_that_has_no_space_in_it_at_all)")
    win.config.set_whatif_result(text)
    box = win.config.whatif_result
    qtbot.waitUntil(lambda: box.document().size().width() <= box.viewport().width() + 1, timeout=2000)
    assert box.text() == text and "\u200b" not in box.toPlainText()  # copied as shown
    box.selectAll()
    box.copy()
    from PySide6.QtWidgets import QApplication
    assert QApplication.clipboard().text() == text
    assert win.config.width() == dock_w  # the long word wrapped: the panel kept its width


def test_jobs_strip_says_a_comparisons_layers_and_bytes(win, qtbot):
    shown = []
    win.service.job_progress.connect(lambda jid, f, text: shown.append((text, win.jobs_bar.label.text())))
    with qtbot.waitSignal(win.sweep_done, timeout=120_000):
        win.compare_all()
    texts = [t for t, _ in shown if t]
    assert texts and all(" layers, " in t and " of " in t for t in texts)
    done, total = texts[-1].split(" layers")[0].split("/")
    assert done == total and int(total) == len({r.name for r in win.sweep_result.rows})
    # beside the job's title, its layers (the bytes in the tooltip: the whole text left no title)
    assert any(label.endswith(" · " + t.split(", ")[0]) for t, label in shown if t)


def test_every_tab_is_in_sight_at_narrow_widths(win, qtbot):
    bar = win.tabs.tabBar()
    for width, layers_tab in ((1400, "Layers"), (1024, "Layers"), (835, None)):
        win.resize(width, 700)
        qtbot.waitUntil(lambda w=width: win.width() == w, timeout=2000)
        qtbot.wait(50)
        # (it was behind the tab bar's scroll arrows at 1024 px)
        assert all(bar.tabRect(i).right() <= bar.width() for i in range(bar.count()))
        if layers_tab:
            assert win.tabs.tabText(win.tabs.indexOf(win.layers)) == layers_tab
        assert win.tabs.tabToolTip(win.tabs.indexOf(win.codes)) == "Code usage"
    win.resize(1400, 800)
    qtbot.waitUntil(lambda: win.tabs.tabText(win.tabs.indexOf(win.codes)) == "Code usage", timeout=2000)
    # straight from a narrow window to one where only the short names fit: chosen from the tabs'
    # own sizes, not a squeezed one's (the full names were chosen, every tab elided)
    for width in (835, 980, 835, 1000):
        win.resize(width, 800)
        qtbot.waitUntil(lambda w=width: win.width() == w, timeout=2000)
        qtbot.wait(30)
        elided = [i for i in range(bar.count()) if bar.tabRect(i).width() < bar.tabSizeHint(i).width() - 1]
        assert not elided or win.tabs.tabText(win.tabs.indexOf(win.codes)) == "Codes", (width, elided)
    # at half a 1920 px screen the short names fit whole, with less room beside each (they were
    # elided to "Va…", "Co…")
    win.resize(835, 800)
    qtbot.waitUntil(lambda: win.width() == 835, timeout=2000)
    qtbot.wait(50)
    assert [win.tabs.tabText(i) for i in range(bar.count())] == ["Values", "Error", "Codes", "Scales", "Groups",
                                                                   "Heads", "Layers"]
    fm = bar.fontMetrics()
    assert all(bar.tabRect(i).width() >= fm.horizontalAdvance(win.tabs.tabText(i)) for i in range(bar.count()))
    assert win._tab_style.compact
    win.resize(1400, 800)
    qtbot.waitUntil(lambda: win.tabs.tabText(win.tabs.indexOf(win.codes)) == "Code usage", timeout=2000)
    assert not win._tab_style.compact


def test_a_finding_of_several_tensors_flags_each_ones_module():
    from quantscope.app.main_window import _worst_per_layer
    f = [{"rule": "container.out-of-file", "severity": "error", "message": "3 tensors run past the end",
          "tensor": "model.layers.1.mlp.down_proj.weight", "layer": None,
          "also": ["model.norm.weight", "lm_head.weight"]}]
    flags = _worst_per_layer(f)
    assert {"model.layers.1.mlp.down_proj", "model.norm", "lm_head"} <= set(flags)
    assert flags["lm_head"][0] == "error"


def test_a_quantized_layer_of_unknown_shape_is_not_drawn_as_a_vector(qtbot, tmp_path):
    """MLX bits/group that fit none of its shapes leave the layer's shape unknown: its packed
    codes were drawn as "a vector of 3072 values"."""
    import mlx.core as mx
    from helpers import write_st
    from mx_util import to_np
    wq, sc, bi = mx.quantize(mx.array(np.ones((64, 96), np.float32)), group_size=32, bits=4)
    folder = tmp_path / "m"
    folder.mkdir()
    write_st(folder / "model.safetensors", {"model.layers.0.mlp.up_proj.weight": to_np(wq),
                                            "model.layers.0.mlp.up_proj.scales": to_np(sc)[:, :2],
                                            "model.layers.0.mlp.up_proj.biases": to_np(bi)[:, :2]}, {"format": "mlx"})
    (folder / "config.json").write_text('{"hidden_size": 96, "quantization": {"bits": 4, "group_size": 32}}')
    w = _window_on(qtbot, tmp_path, [folder], None)
    try:
        lay = w.workspace.models()[next(iter(w.workspace.models()))].layers["model.layers.0.mlp.up_proj"]
        assert lay.shape is None or not lay.decodable
        w.tabs.setCurrentWidget(w.hist)
        w.select_layer("model.layers.0.mlp.up_proj")
        qtbot.waitUntil(lambda: "cannot be decoded" in w.hist.note.text() or "cannot be decoded" in
                        w.hist.hint.text(), timeout=5000)
        assert not w.hist._counts
    finally:
        w.service.shutdown()


def test_experts_of_transformers_stacks_in_the_window(qtbot, tmp_path):
    """Llama 4's experts as transformers stores them ([E, K, N] stacks) against mlx-lm's split
    conversion: a comparison gives each expert a point; a point clicked shows that expert, the
    stack selected in the tree shows the whole stack, its cell the worst expert."""
    from pathlib import Path
    real = Path(__file__).parent / "fixtures" / "real"
    w = _window_on(qtbot, tmp_path, [real / "mlxlm-llama4-q4-g32"], real / "llama4-bf16")
    try:
        with qtbot.waitSignal(w.sweep_done, timeout=120_000):
            w.compare_all()
        stack = "language_model.model.layers.1.feed_forward.experts.gate_up_proj"
        rows = {r.name: r for r in w.sweep_result.rows if r.reference_layer == stack}
        assert len(rows) == 4
        expert = "language_model.model.layers.1.feed_forward.experts.2.gate_up_proj"
        with qtbot.waitSignal(w.detail_shown, timeout=60_000):
            w.select_layer_everywhere(expert)  # (what a click on its point sends)
        assert w.current_layer == expert
        d = w._detail_errors[1]
        assert d.metrics["mlxlm-llama4-q4-g32"].rel_fro == pytest.approx(rows[expert].rel_fro, rel=1e-9)
        w.tree.combo.setCurrentText("llama4-bf16")
        with qtbot.waitSignal(w.detail_shown, timeout=60_000):
            assert w.tree.select("language_model.model.layers.1.self_attn.q_proj")
        with qtbot.waitSignal(w.detail_shown, timeout=60_000):
            assert w.tree.select(stack)  # (the row the expert's highlight made current: another first)
        assert w.current_layer == stack
        assert len(w.layers.ring.getData()[0]) == 4  # (its experts' points ringed: none were)
        whole = w._detail_errors[1].metrics["mlxlm-llama4-q4-g32"].rel_fro
        assert min(r.rel_fro for r in rows.values()) < whole < max(r.rel_fro for r in rows.values())
        assert w.tree.model._errors["mlxlm-llama4-q4-g32"][stack] == max(r.rel_fro for r in rows.values())
        # the expert box under the tree: "all" for the stack, an expert picked, "all" again
        assert not w.tree.expert.isHidden() and w.tree.expert.value() == -1 and w.tree.expert.text() == "all"
        with qtbot.waitSignal(w.detail_shown, timeout=60_000):
            w.tree.expert.setValue(3)
        assert w.current_layer == stack.replace("experts.", "experts.3.")
        assert w._detail_errors[1].metrics["mlxlm-llama4-q4-g32"].rel_fro == pytest.approx(
            rows[w.current_layer].rel_fro, rel=1e-9)
        assert w.tree.expert.minimum() == -1  # ("all" still offered beside an expert)
        w.tree.expert.setValue(-1)  # (the stack's views are kept: shown again at once)
        qtbot.waitUntil(lambda: w.current_layer == stack and w._shown_layer == stack, timeout=60_000)
    finally:
        w.service.shutdown()


def test_select_takes_an_expert_of_a_stack(tmp_path):
    # --select …experts.2.gate_up_proj (a row of a stack compared expert by expert, no module of
    # any checkpoint) was refused; an expert the stack does not have still is
    import os
    import subprocess
    import sys
    from pathlib import Path
    real = Path(__file__).parent / "fixtures" / "real"
    ex = "language_model.model.layers.1.feed_forward.experts"
    for e, rc in ((2, 0), (7, 2)):
        r = subprocess.run([sys.executable, "-m", "quantscope", str(real / "mlxlm-llama4-q4-g32"), "--reference",
                            str(real / "llama4-bf16"), "--select", f"{ex}.{e}.gate_up_proj", "--screenshot",
                            str(tmp_path / f"{e}.png")], capture_output=True, text=True, timeout=180,
                           env={**os.environ, "QT_QPA_PLATFORM": "offscreen", "HOME": str(tmp_path)}, check=False)
        assert r.returncode == rc, r.stderr
        assert (tmp_path / f"{e}.png").exists() if rc == 0 else "--select: no layer" in r.stderr


def test_a_layer_whose_decoding_was_cancelled_is_selected_again_by_a_click(win, qtbot):
    # Esc while a layer decodes: the views say "select it again", but its row stayed current, so a
    # click on it (or on its point in the Layers plot) changed nothing and did nothing
    from PySide6.QtCore import Qt
    from PySide6.QtTest import QTest
    path = "model.layers.3.mlp.down_proj"
    assert win.tree.select(path)
    win.service.cancel_all()
    qtbot.waitUntil(lambda: "select it again" in win.hist.note.text(), timeout=30_000)
    assert win.tree.current_path() == path and win._shown_layer != path
    rect = win.tree.view.visualRect(win.tree.model.row_of(path))
    with qtbot.waitSignal(win.detail_shown, timeout=60_000):
        QTest.mouseClick(win.tree.view.viewport(), Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier,
                         rect.center())
    assert win._shown_layer == path
    # the same from another view (a plot point, a doctor link): select_layer_everywhere
    win.service.cancel_all()
    win._shown_layer = None  # (as a cancelled decoding leaves it)
    with qtbot.waitSignal(win.detail_shown, timeout=60_000):
        win.select_layer_everywhere(path)
    assert win._shown_layer == path


def test_a_search_that_hid_the_shown_layer_gives_back_its_row(win, qtbot):
    # the selected row hidden by a search, then the search cleared: no row was current, while the
    # views, the config panel and the Layers plot still showed that layer
    from PySide6.QtCore import Qt
    path = "model.layers.2.mlp.up_proj"
    with qtbot.waitSignal(win.detail_shown, timeout=60_000):
        assert win.tree.select(path)
    qtbot.keyClicks(win.tree.search, "layers.0.")
    qtbot.waitUntil(lambda: win.tree.model.rowCount() < 10, timeout=2000)
    assert win.tree.current_path() is None
    with qtbot.assertNotEmitted(win.tree.layer_selected, wait=200):  # (not decoded again)
        qtbot.keyClick(win.tree.search, Qt.Key.Key_Escape)
        qtbot.waitUntil(lambda: win.tree.current_path() == path, timeout=2000)
    # a row picked while the search hid the shown one is the one kept
    qtbot.keyClicks(win.tree.search, "layers.0.")
    qtbot.waitUntil(lambda: win.tree.model.rowCount() < 10, timeout=2000)
    with qtbot.waitSignal(win.detail_shown, timeout=60_000):
        assert win.tree.select("model.layers.0.mlp.up_proj")
    qtbot.keyClick(win.tree.search, Qt.Key.Key_Escape)
    qtbot.waitUntil(lambda: not win.tree.search.text(), timeout=2000)
    qtbot.wait(100)
    assert win.tree.current_path() == "model.layers.0.mlp.up_proj"


def test_an_emptied_layers_heatmap_names_no_layer(qtbot):
    # its rows gone (the reference removed, another workspace): hovering the blank heatmap named
    # the last comparison's layer, and a click selected it
    from types import SimpleNamespace

    from PySide6.QtCore import QPointF
    from quantscope.widgets.layer_error_plot import LayerErrorPlot
    plot = LayerErrorPlot()
    qtbot.addWidget(plot)
    rows = [SimpleNamespace(name=f"model.layers.{i}.self_attn.q_proj", variant="q4", layer_index=i, proj="q_proj",
                            rel_fro=0.09, sqnr_db=20.9, rel_fro_raw=0.09) for i in range(3)]
    plot.set_rows(rows, {"q4": "#E69F00"})
    assert plot._hm_names
    plot.set_rows([], {})
    assert not plot._hm_names and plot._hm_grid.size == 0
    picked = []
    plot.layer_selected.connect(picked.append)
    plot._hm_hover(plot.hm.getPlotItem().vb.mapViewToScene(QPointF(0.5, 1.5)))
    assert plot.hm.toolTip() == "" and not picked


def test_gpt_oss_attention_sinks_are_drawn_as_a_vector(qtbot, tmp_path):
    # a module whose one tensor is a float vector of another name than weight (gpt-oss's
    # self_attn.sinks): "is not a weight matrix", nothing drawn, where a norm's values are
    from pathlib import Path
    real = Path(__file__).parent / "fixtures" / "real"
    w = _window_on(qtbot, tmp_path, [real / "mlxlm-gptoss-q4-g32"], real / "gptoss-bf16")
    try:
        w.tabs.setCurrentWidget(w.hist)
        assert w.tree.select("model.layers.0.self_attn")
        qtbot.waitUntil(lambda: "a vector of" in w.hist.note.text(), timeout=5000)
        assert w.hist.note.text().startswith("model.layers.0.self_attn.sinks · a vector of 2 values")
        assert sum(int(c.sum()) for c in w.hist._counts.values()) == 2  # (the reference's two; mlx-lm's the same: not drawn)
    finally:
        w.service.shutdown()


def test_a_norm_selected_while_a_layer_decodes_stays_drawn(win, qtbot):
    # showing the norm cancels the layer's decoding; that decoding's end took the norm for a
    # cancelled layer and replaced its values with "not shown, … select it again"
    win.tabs.setCurrentWidget(win.hist)
    assert win.tree.select("model.layers.3.mlp.down_proj")  # (its decoding starts)
    assert "detail" in win._busy_channels()
    assert win.tree.select("model.layers.0.input_layernorm")
    qtbot.wait(1500)
    assert "a vector of" in win.hist.note.text() and win._shown_layer == "model.layers.0.input_layernorm"
