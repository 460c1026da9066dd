"""Colours: one per variant, used consistently in every view (Okabe–Ito, colour-blind safe)."""

from __future__ import annotations

from PySide6.QtGui import QColor, QPalette

#: Okabe & Ito (2008): distinguishable under the common colour-vision deficiencies; their yellow
#: (#F0E442) all but vanishes on a white plot, so Tol's wine (#882255) takes its place.
VARIANT_COLORS = ["#E69F00", "#0072B2", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#882255", "#000000"]
#: Marker shapes, one per variant beside its colour: two similar hues (orange and vermilion, blue
#: and sky blue) are still told apart as 7 px dots.
VARIANT_SYMBOLS = ["o", "s", "t", "d", "t1", "p", "h", "star"]
REFERENCE_COLOR = "#7f7f7f"


def variant_color(index: int) -> QColor:
    return QColor(VARIANT_COLORS[index % len(VARIANT_COLORS)])


def variant_symbol(index: int) -> str:
    return VARIANT_SYMBOLS[index % len(VARIANT_SYMBOLS)]


def colors_for(labels: list[str]) -> dict[str, QColor]:
    return {label: variant_color(i) for i, label in enumerate(labels)}


def is_dark(palette: QPalette) -> bool:
    return palette.color(QPalette.ColorRole.Window).lightness() < 128


def error_color(rel_fro: float | None, dark: bool = False) -> QColor | None:
    """Background for an error cell: green (small) → yellow → red (large), on a log scale."""
    if rel_fro is None or not rel_fro == rel_fro:
        return None
    import math
    # 1e-3 (60 dB) → 0, 3e-1 (~10 dB) → 1
    t = (math.log10(max(rel_fro, 1e-6)) + 3.0) / 2.5
    t = min(1.0, max(0.0, t))
    c = QColor.fromHsvF((1 - t) * 0.33, 0.55 if not dark else 0.7, 0.95 if not dark else 0.45)
    return c
