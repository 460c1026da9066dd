"""Colours: one per variant, used consistently in every view (Okabe–Ito, colour-blind safe)."""

from __future__ import annotations

from PySide6.QtGui import QColor, QPalette

#: Okabe & Ito (2008): distinguishable under the common colour-vision deficiencies; their yellow
#: (#F0E442) all but vanishes on a white plot, so Tol's wine (#882255) takes its place.
#: A ninth variant and later (the demo's six and three conversions) take Tol's muted scheme, each
#: with another shape than the Okabe–Ito hue nearest it (it took the first's colour and marker).
VARIANT_COLORS = ["#E69F00", "#0072B2", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#882255", "#000000",
                  "#332288", "#44AA99", "#999933", "#DDCC77", "#CC6677", "#117733", "#88CCEE", "#AA4499"]
#: Marker shapes, one per variant beside its colour: two similar hues (orange and vermilion, blue
#: and sky blue) are still told apart as 7 px dots.
VARIANT_SYMBOLS = ["o", "s", "t", "d", "t1", "p", "h", "star", "d", "o", "s", "t", "p", "h", "star", "s"]
REFERENCE_COLOR = "#7f7f7f"
#: Heatmap cells whose error is NaN/inf: a red no viridis colour comes near (group-error map and
#: the layers heatmap alike).
BAD_HEX = "#e41a1c"
BAD_RGBA = (228, 26, 28, 255)


def variant_color(index: int) -> QColor:
    return QColor(VARIANT_COLORS[index % len(VARIANT_COLORS)])


def variant_symbol(index: int) -> str:
    return VARIANT_SYMBOLS[index % len(VARIANT_SYMBOLS)]


def colors_for(labels: list[str], slots: dict[str, int] | None = None) -> dict[str, QColor]:
    """A colour per label. With ``slots`` (kept by the caller for a session: label -> place in
    :data:`VARIANT_COLORS`), a label keeps the place it had, so removing a variant recolours no
    other (each after it took the colour and marker of the one before); a new label takes the
    first place no open label holds, one never used if there is one."""
    if slots is None:
        return {label: variant_color(i) for i, label in enumerate(labels)}
    place: dict[str, int] = {}
    for label in labels:  # the places labels had, where no earlier label has it now
        if label in slots and slots[label] not in place.values():
            place[label] = slots[label]
    for label in labels:
        if label not in place:
            free = [i for i in range(len(VARIANT_COLORS)) if i not in place.values()]
            fresh = [i for i in free if i not in slots.values()]
            slots[label] = place[label] = (fresh or free or [len(place) % len(VARIANT_COLORS)])[0]
    return {label: variant_color(place[label]) for label in labels}


def symbol_for(color) -> str:
    """The marker shape that goes with a variant's colour (its place in the palette)."""
    name = QColor(color).name().upper() if color is not None else ""
    up = [c.upper() for c in VARIANT_COLORS]
    return VARIANT_SYMBOLS[up.index(name)] if name in up else VARIANT_SYMBOLS[0]


def is_dark(palette: QPalette) -> bool:
    return palette.color(QPalette.ColorRole.Window).lightness() < 128


#: Paul Tol's sequential YlOrBr (colour-blind safe, light to dark): error cells, small to large.
ERROR_RAMP = ["#FFFFE5", "#FFF7BC", "#FEE391", "#FEC44F", "#FB9A29", "#EC7014", "#CC4C02", "#993404", "#662506"]
#: The ramp spans relative errors 0.01 (40 dB) to 1 (0 dB) on a log scale: 8-bit and FP8 layers
#: sit at the light end, 4-bit in the middle, 3-bit and broken layers at the dark end (the old
#: green-red ramp ended at 0.3, so 0.15, 0.38 and 0.60 all came out the same red).
ERROR_RANGE = (1e-2, 1.0)


def error_color(rel_fro: float | None, dark: bool = False) -> QColor | None:
    """Background for an error cell on :data:`ERROR_RAMP` (log scale over :data:`ERROR_RANGE`);
    the same in a dark theme, where :func:`text_color_on` keeps the figures readable."""
    if rel_fro is None or not rel_fro == rel_fro:
        return None
    import math
    lo, hi = (math.log10(x) for x in ERROR_RANGE)
    t = (math.log10(max(rel_fro, 1e-12)) - lo) / (hi - lo)
    t = min(1.0, max(0.0, t)) * (len(ERROR_RAMP) - 1)
    i = min(int(t), len(ERROR_RAMP) - 2)
    a, b = QColor(ERROR_RAMP[i]), QColor(ERROR_RAMP[i + 1])
    f = t - i
    return QColor.fromRgbF(a.redF() + f * (b.redF() - a.redF()), a.greenF() + f * (b.greenF() - a.greenF()),
                           a.blueF() + f * (b.blueF() - a.blueF()))


def _luminance(c: QColor) -> float:
    def lin(v: float) -> float:
        return v / 12.92 if v <= 0.04045 else ((v + 0.055) / 1.055) ** 2.4
    return 0.2126 * lin(c.redF()) + 0.7152 * lin(c.greenF()) + 0.0722 * lin(c.blueF())


def contrast(a: QColor, b: QColor) -> float:
    """WCAG contrast ratio of two colours (1 to 21)."""
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def text_color_on(background: QColor) -> QColor:
    """Black or white, whichever contrasts more with ``background`` (by relative luminance: HSL
    lightness put white figures on the orange of every 4-bit layer, at 2-4:1)."""
    black, white = QColor("#000000"), QColor("#FFFFFF")
    return black if contrast(background, black) >= contrast(background, white) else white


ERROR_KEY = ("cell colour: relative error on a log scale, light yellow ≤ 0.01 (40 dB) → orange ≈ 0.1 → dark "
             "brown ≥ 1 (0 dB)")


#: Doctor finding severities (Okabe-Ito vermillion, a dark orange, blue): the doctor panel's
#: headings and the tree's names of flagged layers.
SEVERITY_COLORS = {"error": "#D55E00", "warning": "#B35900", "info": "#0072B2"}
