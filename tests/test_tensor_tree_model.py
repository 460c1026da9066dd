"""TensorTreeModel passes qtmodeltester; search runs in the backend and answers fast."""

import time

import numpy as np
import pytest
from helpers import write_st
from PySide6.QtCore import Qt
from quantscope.backend.checkpoint import open_checkpoint
from quantscope.backend.schemes import analyze
from quantscope.backend.search import PathIndex
from quantscope.widgets.tensor_tree import TensorTree
from quantscope.widgets.tensor_tree_model import TensorTreeModel


@pytest.fixture
def model_ckpt(tmp_path):
    t = {}
    for i in range(12):
        for p in ("self_attn.q_proj", "mlp.down_proj"):
            t[f"model.layers.{i}.{p}.weight"] = np.zeros((8, 16), np.float16)
        t[f"model.layers.{i}.input_layernorm.weight"] = np.ones(16, np.float16)
    write_st(tmp_path / "model.safetensors", t)
    return analyze(open_checkpoint(tmp_path))


def test_qtmodeltester(qtmodeltester, model_ckpt):
    m = TensorTreeModel()
    m.set_checkpoint(model_ckpt)
    m.set_variants(["a", "b"])
    m.set_errors("a", {"model.layers.3.mlp.down_proj": 0.1})
    qtmodeltester.check(m, force_py=True)
    m.set_visible([0, 5, 7])
    qtmodeltester.check(m, force_py=True)


def test_natural_order_children_and_columns(model_ckpt):
    m = TensorTreeModel()
    m.set_checkpoint(model_ckpt)
    m.set_variants(["gptq"])
    names = [m.index(r, 0).data() for r in range(m.rowCount())]
    assert names.index("model.layers.2.mlp.down_proj") < names.index("model.layers.10.mlp.down_proj")
    row = names.index("model.layers.2.mlp.down_proj")
    parent = m.index(row, 0)
    assert m.rowCount(parent) == 1
    child = m.index(0, 0, parent)
    assert child.data() == ".weight" and m.index(0, 1, parent).data() == "F16"
    # its dtype's bits under Bits; the file and byte range in the tooltip, not under Bits/weight
    assert m.index(0, 2, parent).data() == "16" and m.index(0, 6, parent).data() is None
    assert "model.safetensors" in m.index(0, 0, parent).data(Qt.ItemDataRole.ToolTipRole)
    assert m.index(0, 4, parent).data(Qt.ItemDataRole.TextAlignmentRole) == m.index(row, 4).data(
        Qt.ItemDataRole.TextAlignmentRole)  # (numbers aligned as the module's)
    assert m.headerData(7, pg_orientation()) == "gptq"
    m.set_errors("gptq", {"model.layers.2.mlp.down_proj": 0.0312})
    assert m.index(row, 7).data() == "0.0312"
    assert m.index(row, 7).data(pg_role()) is not None  # coloured background
    align = m.index(row, 2).data(Qt.ItemDataRole.TextAlignmentRole)  # numbers right-aligned
    assert align is not None and int(align) & int(Qt.AlignmentFlag.AlignRight.value)
    assert m.index(row, 0).data(Qt.ItemDataRole.TextAlignmentRole) is None
    assert m.index(row, 0).data(Qt.ItemDataRole.DecorationRole) is None
    assert m.index(row, 0).data(m.PathRole) == m.index(row, 0).data(0) == "model.layers.2.mlp.down_proj"


def pg_orientation():
    from PySide6.QtCore import Qt
    return Qt.Orientation.Horizontal


def pg_role():
    from PySide6.QtCore import Qt
    return Qt.ItemDataRole.BackgroundRole


def test_search_finds_multi_segment_paths_quickly():
    paths = [f"model.layers.{layer}.mlp.experts.{e}.{p}" for layer in range(48) for e in range(512)
             for p in ("gate_proj", "up_proj", "down_proj")][:70_000]
    idx = PathIndex(paths)
    t0 = time.perf_counter()
    hits = idx.search("experts.127.down_proj")
    t = time.perf_counter() - t0
    assert hits and all(paths[i].endswith("experts.127.down_proj") for i in hits)
    assert idx.search("DOWN_PROJ layers.3.") == [i for i, p in enumerate(paths) if "down_proj" in p and "layers.3." in p]
    assert idx.search("   ") is None
    assert t < 0.5  # ~10 ms here; the budget is loose for shared CI machines


def test_tree_widget_search_and_select(qtbot, model_ckpt):
    w = TensorTree()
    qtbot.addWidget(w)
    w.set_checkpoints({"ckpt": model_ckpt})
    qtbot.keyClicks(w.search, "layers.1.mlp.down_proj")
    qtbot.waitUntil(lambda: w.model.rowCount() == 1, timeout=2000)
    assert w.model.index(0, 0).data() == "model.layers.1.mlp.down_proj"
    with qtbot.waitSignal(w.layer_selected) as sig:
        assert w.select("model.layers.7.self_attn.q_proj")  # clears a search that hides it
    assert sig.args == ["model.layers.7.self_attn.q_proj"]


def test_search_finds_a_module_by_its_stored_tensor_names():
    # a tensor name pasted from an error message, or a component, finds its module
    paths = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "model.norm"]
    also = [[f"{p}.qweight", f"{p}.scales"] for p in paths[:2]] + [["model.norm.weight"]]
    idx = PathIndex(paths, also)
    assert idx.search("model.layers.1.mlp.down_proj.qweight") == [1]
    assert idx.search("qweight") == [0, 1]
    assert idx.search("norm.weight") == [2]
    assert PathIndex(paths).search("qweight") == []


def test_a_search_that_reads_as_a_regular_expression_is_one(qtbot, model_ckpt):
    """`down_proj$`, `layers.[01].mlp`, `mlp|attn` found nothing and said nothing: a query holding
    a character no path holds is a regular expression now (as `compare --layers` takes), in the
    tree and in "Compare layers matching the search"; a plain one stays terms."""
    from quantscope.backend.search import NameTerms
    paths = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj",
             "model.layers.10.mlp.down_proj"]
    also = [[f"{p}.qweight"] for p in paths]
    idx = PathIndex(paths, also)
    assert idx.search("down_proj$") == [0, 3]  # (the path's own line: not …down_proj.qweight's end)
    assert idx.search("layers.[01].mlp") == [0, 1]
    assert idx.search(r"layers\.1\.(mlp|self_attn)") == [1, 2]
    assert idx.search("DOWN_PROJ$") == [0, 3]  # case-insensitive, as the terms
    assert idx.search("layers.1.mlp") == [1] and idx.search("up_proj layers.1") == [1]  # terms
    assert idx.search("a[") == []  # not a valid pattern: matches nothing
    assert [n for n in paths if NameTerms("mlp|attn").search(n)] == paths
    assert "regular expression" in NameTerms("down_proj$").what and "regular" not in NameTerms("mlp").what
    # terms still combine: a plain one and a regex (the whole query was one regex, its space literal)
    assert idx.search("layers.1. proj$") == [1, 2] and idx.search("mlp down_proj$") == [0, 3]
    # compiled as typed: lower-cased, \D (a non-digit) read \d, and \Z did not compile
    assert idx.search(r"layers\.\D") == [] and idx.search(r"layers\.1\d") == [3]
    assert idx.search(r"proj\Z") == [0, 1, 2, 3]
    assert [n for n in paths if NameTerms("layers.1. proj$").search(n)] == paths[1:3]
    w = TensorTree()
    qtbot.addWidget(w)
    w.set_checkpoints({"ckpt": model_ckpt})
    qtbot.keyClicks(w.search, "layers.1.mlp.down_proj$")
    qtbot.waitUntil(lambda: w.model.rowCount() == 1, timeout=2000)
    assert w.count.text().endswith("(a regular expression)")
    w.search.setText("down_proj[")
    qtbot.waitUntil(lambda: "not a valid regular expression" in w.count.text(), timeout=2000)


def test_error_colours_tell_real_errors_apart_and_keep_figures_readable():
    """The green-red ramp ended at 0.3 and was not colour-blind safe: 0.15, 0.38 and 0.60 came out
    the same red. A light-to-dark ramp over 0.01..1 (log) separates them; text stays readable."""
    from quantscope.widgets.palette import error_color, text_color_on
    errs = [0.01, 0.03, 0.09, 0.15, 0.38, 0.60, 1.0]
    light = [error_color(e).lightness() for e in errs]
    from itertools import pairwise
    assert all(a > b for a, b in pairwise(light))  # monotone: darker is worse
    assert min(a - b for a, b in pairwise(light[2:])) >= 10  # 0.09 / 0.15 / 0.38 / 0.60 / 1.0 apart
    from quantscope.widgets.palette import contrast
    for e in errs + [0.12, 0.2, 0.25]:
        bg = error_color(e)
        assert contrast(bg, text_color_on(bg)) >= 4.5, e  # WCAG AA for the figure
    assert error_color(None) is None and error_color(float("nan")) is None


def test_tree_sorts_by_a_column_keeps_the_selection_and_puts_missing_values_last(qtbot, model_ckpt):
    """Finding the worst layer meant reading every row: a header click sorts by that column."""
    w = TensorTree()
    qtbot.addWidget(w)
    w.set_checkpoints({"ckpt": model_ckpt})
    m = w.model
    natural = [m.index(r, 0).data() for r in range(m.rowCount())]
    paths = m.paths()
    from PySide6.QtCore import Qt
    from quantscope.widgets.tensor_tree_model import BASE_COLUMNS
    m.set_variants(["v"])
    col = len(BASE_COLUMNS)
    errs = {p: (i % 7) / 10 for i, p in enumerate(paths) if "mlp" in p}  # only some rows have an error
    m.set_all_errors({"v": errs})
    assert w.select("model.layers.1.mlp.down_proj")
    with qtbot.assertNotEmitted(w.layer_selected):
        w.view.sortByColumn(col, Qt.SortOrder.DescendingOrder)
    shown = [m.index(r, 0).data(TensorTreeModel.PathRole) for r in range(m.rowCount())]
    vals = [errs[p] for p in shown if p in errs]
    assert vals == sorted(vals, reverse=True) and all(p not in errs for p in shown[len(vals):])
    assert w.view.currentIndex().data(TensorTreeModel.PathRole) == "model.layers.1.mlp.down_proj"
    qtbot.keyClicks(w.search, "layers.1.")  # a search keeps the sort
    qtbot.waitUntil(lambda: m.rowCount() < len(paths), timeout=2000)
    sub = [errs[p] for r in range(m.rowCount()) if (p := m.index(r, 0).data(TensorTreeModel.PathRole)) in errs]
    assert sub == sorted(sub, reverse=True)
    w.search.clear()
    qtbot.waitUntil(lambda: m.rowCount() == len(paths), timeout=2000)
    # sorted by the doctor column, new findings re-sort it
    doc = m.columnCount() - 1
    w.view.sortByColumn(doc, Qt.SortOrder.DescendingOrder)
    m.set_findings({paths[5]: ("warning", "w"), paths[9]: ("error", "e")})
    assert [m.index(r, 0).data(TensorTreeModel.PathRole) for r in range(2)] == [paths[9], paths[5]]
    w.view.sortByColumn(-1, Qt.SortOrder.AscendingOrder)  # back to the checkpoint's order
    qtbot.waitUntil(lambda: m.rowCount() == len(paths), timeout=2000)
    assert [m.index(r, 0).data() for r in range(m.rowCount())] == natural


def test_error_columns_are_titled_by_what_tells_each_variant_apart():
    from quantscope.widgets.tensor_tree_model import column_names
    names = column_names(["mlx-affine-q4-g64", "gptqmodel-gptq-w4g128", "gptqmodel-gptq-w3g128",
                          "gptqmodel-gptq-w4g128-actorder", "autoawq-gemm-w4g128", "a (2)"])
    assert names == {"mlx-affine-q4-g64": "mlx-affine-q4-g64", "gptqmodel-gptq-w4g128": "gptqmodel-w4g128",
                     "gptqmodel-gptq-w3g128": "gptqmodel-w3g128",
                     "gptqmodel-gptq-w4g128-actorder": "gptqmodel-w4g128-actorder",
                     "autoawq-gemm-w4g128": "autoawq-gemm-w4g128", "a (2)": "a (2)"}
    assert len(set(column_names(["x-1", "x-1-b", "x-2"]).values())) == 3


def test_sixteen_variants_are_each_drawn_their_own_way():
    # the demo's six variants and three conversions: the ninth took the first's colour and
    # marker (8 of each, both wrapping); a session's slots give each its own up to 16
    from quantscope.widgets.palette import colors_for, symbol_for
    slots: dict[str, int] = {}
    labels = []
    for i in range(16):
        labels.append(f"v{i}")
        colors = colors_for(labels, slots)
    drawn = {(c.name(), symbol_for(c)) for c in colors.values()}
    assert len(drawn) == 16 and len({c.name() for c in colors.values()}) == 16
    # a label removed frees its place, taken again only once no place was never used
    del labels[3]
    labels.append("late")
    assert colors_for(labels, slots)["late"].name() == colors["v3"].name()
