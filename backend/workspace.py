"""A workspace: one reference checkpoint and any number of variants, opened together."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import open_checkpoint
from .schemes import Model, analyze


def label_for(path: str | os.PathLike, taken: set[str] | None = None) -> str:
    """A short, unique label for a checkpoint path (its folder or file name)."""
    p = Path(path)
    base = p.parent.name if p.suffix in (".safetensors", ".json") else p.name
    base = base or str(path)
    label, i = base, 2
    while taken and label in taken:
        label = f"{base} ({i})"
        i += 1
    return label


def identity(model: Model) -> frozenset[str]:
    """What a checkpoint is, whatever path opened it: the real paths of the files it reads (its
    folder and the model.safetensors in it, or a link to either, are the same checkpoint)."""
    return frozenset(os.path.realpath(f.path) for f in model.ckpt.files)


def open_model(path: str | os.PathLike) -> Model:
    """Open a checkpoint and detect its schemes (headers and small configs only)."""
    return analyze(open_checkpoint(path))


@dataclass
class Workspace:
    """Reference and variants by label, in display order."""

    reference: Model | None = None
    reference_label: str | None = None
    variants: dict[str, Model] = field(default_factory=dict)
    #: Checkpoints that could not be opened (``keep_going``): ``(path, message)``.
    failed: list[tuple[str, str]] = field(default_factory=list)

    def add_variant(self, model: Model, label: str | None = None) -> str:
        label = label or label_for(model.ckpt.source, set(self.variants) | {self.reference_label or ""})
        self.variants[label] = model
        return label

    def set_reference(self, model: Model, label: str | None = None) -> str:
        self.reference = model
        self.reference_label = label or label_for(model.ckpt.source, set(self.variants))
        return self.reference_label

    def remove(self, label: str) -> None:
        self.variants.pop(label, None)

    def models(self) -> dict[str, Model]:
        """Reference first (if any), then the variants."""
        out = {}
        if self.reference is not None:
            out[self.reference_label] = self.reference
        out.update(self.variants)
        return out


def load_workspace(paths: list[str], reference: str | None = None, progress=None, cancel=None,
                   keep_going: bool = False) -> Workspace:
    """Open the given checkpoints (and reference) into a workspace.

    ``keep_going``: a checkpoint that cannot be opened is listed in ``failed`` and the others
    are opened (one broken file among five should not leave the window empty); the first error
    is raised only when none opens."""
    from .errors import QuantscopeError
    ws = Workspace()
    todo = ([reference] if reference else []) + list(paths)
    first_error = None
    for i, p in enumerate(todo):
        if cancel is not None and cancel.is_set():
            from .errors import Cancelled
            raise Cancelled()
        try:
            m = open_model(p)
        except QuantscopeError as e:
            if not keep_going:
                raise
            first_error = first_error or e
            ws.failed.append((str(p), str(e)))
            continue
        if reference and i == 0:
            ws.set_reference(m)
        else:
            ws.add_variant(m)
        if progress:
            progress((i + 1) / len(todo))
    if first_error is not None and ws.reference is None and not ws.variants:
        if len(ws.failed) > 1:  # each named (only the first was)
            raise QuantscopeError(" · ".join(msg for _, msg in ws.failed), rule=first_error.rule)
        raise first_error
    return ws
