"""ConvertDialog: choose a source checkpoint, a destination and the conversion's settings."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSignalBlocker
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDialog, QDialogButtonBox, QFileDialog, QFormLayout,
                               QHBoxLayout, QLineEdit, QPushButton, QWidget)

RECIPES = ["uniform", "mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"]
KEEP = "exact where possible"


class ConvertDialog(QDialog):
    """Collects options only; the window runs the conversion on a worker thread."""

    def __init__(self, sources: dict[str, str], current: str | None = None, parent=None,
                 dense: set[str] | None = None) -> None:
        """``sources``: label → path; ``dense``: the labels of dense checkpoints (a recipe
        quantizes a dense model; given for another, it requantized a GPTQ checkpoint at 2 bits)."""
        super().__init__(parent)
        self.setWindowTitle("Convert checkpoint")
        self.sources = dict(sources)
        self.dense = set(sources) if dense is None else set(dense)
        self._suggested = ""  # the destination last filled in here: replaced on a change, a typed one is not
        self.source = QComboBox()
        self.source.addItems(list(sources))
        if current in sources:
            self.source.setCurrentText(current)
        self.dst = QLineEdit()
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        dst_row = QWidget()
        h = QHBoxLayout(dst_row)
        h.setContentsMargins(0, 0, 0, 0)
        h.addWidget(self.dst, 1)
        h.addWidget(browse)
        self.to = QComboBox()
        self.to.addItems(["mlx", "dense"])
        # "keep" converts exactly where the source is representable as MLX and requantizes the
        # rest at their own bit width (8 for FP8); a number requantizes every layer whose settings
        # differ from it.
        self.bits = QComboBox()
        self.bits.addItems([KEEP, "2", "3", "4", "5", "6", "8"])
        self.group = QComboBox()
        self.group.addItems([KEEP, "32", "64", "128"])
        self.mode = QComboBox()
        self.mode.addItems(["affine", "mxfp4", "nvfp4", "mxfp8"])
        self.recipe = QComboBox()
        self.recipe.addItems(RECIPES)
        self.dtype = QComboBox()
        self.dtype.addItems(["bf16", "f16", "f32"])
        # exact repacks write float32 scales where fp16 cannot hold a layer's biases exactly, and
        # mlx-lm then computes that layer in float32: this keeps fp16, rounding (--scales source)
        self.source_scales = QCheckBox("keep the source's scale dtype, rounding biases (--scales source)")
        self.source_scales.setToolTip("Repacked GPTQ/AWQ layers keep fp16 scales and biases, as mlx-lm's own loaders "
                                      "do; the report gives each layer's error (unchecked: exact, float32 where "
                                      "needed)")
        self.overwrite = QCheckBox("replace an earlier output (--overwrite)")
        form = QFormLayout(self)
        form.addRow("Source", self.source)
        form.addRow("Destination folder", dst_row)
        form.addRow("Convert to", self.to)
        form.addRow("Bits", self.bits)
        form.addRow("Group size", self.group)
        form.addRow("Mode", self.mode)
        form.addRow("Recipe (dense → MLX)", self.recipe)
        form.addRow("Dense dtype", self.dtype)
        form.addRow("", self.source_scales)
        form.addRow("", self.overwrite)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Convert")
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)
        self.to.currentTextChanged.connect(self._sync)
        self.source.currentTextChanged.connect(self._sync)
        self.mode.currentTextChanged.connect(self._sync)
        self.recipe.currentTextChanged.connect(self._sync)
        self._sync()

    def _browse(self) -> None:
        p = QFileDialog.getExistingDirectory(self, "Parent folder of the destination")
        if p:
            self.dst.setText(str(Path(p) / Path(self.dst.text() or "converted").name))

    def _suggest(self, label: str) -> None:
        src = self.sources.get(label)
        if src and self.dst.text().strip() in ("", self._suggested):  # (a destination typed in stays)
            p = Path(src).expanduser()
            if p.exists():
                p = p.absolute()
                base = p.parent if p.suffix else p
                parent = base.parent
            else:  # a repo id of the Hugging Face cache: in the home folder, not the process's working one
                base, parent = Path(p.name), Path.home()
            self._suggested = str(parent / f"{base.name}-{self.to.currentText()}")
            self.dst.setText(self._suggested)

    def _sync(self, *_) -> None:
        """Only the settings that apply are open: none of MLX's for --to dense; a recipe for a
        dense source only, and it fixes bits, group size and mode; an MX or NV mode fixes bits and
        group size (those failed only after Convert, in the command line's words)."""
        mlx = self.to.currentText() == "mlx"
        label = self.source.currentText()
        # the choices it changes itself do not call it again (each change came back here)
        with QSignalBlocker(self.recipe), QSignalBlocker(self.mode):
            if label not in self.dense and self.recipe.currentText() != "uniform":
                self.recipe.setCurrentText("uniform")
            recipe = mlx and self.recipe.currentText() != "uniform"
            if recipe:
                self.mode.setCurrentText("affine")
        fixed = self.mode.currentText() != "affine"
        if recipe or fixed:
            self.bits.setCurrentText(KEEP)
            self.group.setCurrentText(KEEP)
        self.recipe.setEnabled(mlx and label in self.dense)
        self.mode.setEnabled(mlx and not recipe)
        self.bits.setEnabled(mlx and not recipe and not fixed)
        self.group.setEnabled(mlx and not recipe and not fixed)
        self.dtype.setEnabled(not mlx)
        self.source_scales.setEnabled(mlx)
        self._suggest(label)

    def options(self) -> dict:
        """Keyword arguments for ``quantscope.backend.convert.convert`` (plus src/dst)."""
        g, b = self.group.currentText(), self.bits.currentText()
        recipe = self.recipe.currentText()
        dst = self.dst.text().strip()
        # (a relative path was written under the window's working folder, wherever that was, and
        # reported as typed)
        dst = str(Path(dst).expanduser().absolute()) if dst else dst
        return {"src": self.sources[self.source.currentText()], "dst": dst,
                "to": self.to.currentText(), "bits": None if b == KEEP else int(b),
                "group_size": None if g == KEEP else int(g), "mode": self.mode.currentText(),
                "recipe": None if recipe == "uniform" else recipe,
                "dtype": self.dtype.currentText() if self.to.currentText() == "dense" else None,
                "scales": "source" if self.to.currentText() == "mlx" and self.source_scales.isChecked() else "exact",
                "overwrite": self.overwrite.isChecked()}
