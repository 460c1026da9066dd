"""Exception types of the backend.

Every error the backend raises on bad input is a :class:`QuantscopeError` whose message names the
file (and the tensor or layer) and says what is wrong, so the command line can print it as one
line and the window can show it without a traceback. ``rule`` is a stable identifier of the kind
of problem; the checkpoint doctor reuses it for its findings.
"""

from __future__ import annotations

from pathlib import Path


class QuantscopeError(Exception):
    """Base class of all errors quantscope reports to a person.

    Parameters
    ----------
    message
        What is wrong and, where possible, what to do about it.
    file
        The file concerned, if any.
    tensor
        The tensor (or layer) concerned, if any.
    rule
        Stable identifier of the problem (e.g. ``"container.header-too-large"``).
    """

    default_rule = "error"
    #: What ``tensor`` names, in the message: a layer's errors name the layer (its path), not a
    #: tensor of that name.
    subject = "tensor"

    def __init__(self, message: str, *, file: str | Path | None = None,
                 tensor: str | None = None, rule: str | None = None) -> None:
        self.message = message
        self.file = str(file) if file is not None else None
        self.tensor = tensor
        self.rule = rule or self.default_rule
        super().__init__(self.__str__())

    def __str__(self) -> str:
        parts = []
        if self.file:
            parts.append(self.file)
        if self.tensor:
            parts.append(f"{self.subject} {self.tensor!r}")
        parts.append(self.message)
        return ": ".join(parts)


class CheckpointError(QuantscopeError):
    """A checkpoint (file, folder, index) cannot be opened as it is."""

    default_rule = "container"


class HeaderError(CheckpointError):
    """A safetensors header is malformed or inconsistent with the file."""

    default_rule = "container.header"


class ShardIndexError(CheckpointError):
    """A ``model.safetensors.index.json`` is malformed or names shards that are not there."""

    default_rule = "index"


class UnsafePathError(ShardIndexError):
    """An index entry would resolve outside the model folder; it is refused, never followed."""

    default_rule = "index.unsafe-path"


class UnsupportedFormatError(CheckpointError):
    """The file is not safetensors (e.g. a pickle), and quantscope will not execute it."""

    default_rule = "container.unsupported"


class LayerError(QuantscopeError):
    """A quantized layer's parts do not fit together (shapes, dtypes, config). ``tensor`` holds
    the layer's path (every decoder is given it as ``name``)."""

    default_rule = "layer"
    subject = "layer"

    def naming(self, file, tensor: str | None = None, rule: str | None = None) -> LayerError:
        """This error with its file (and tensor, rule) filled in where the decoder, which sees
        arrays only, left them out; itself when it names a file already and no rule is given."""
        if self.file is not None and rule is None:
            return self
        return LayerError(self.message, file=self.file or file, tensor=self.tensor or tensor,
                          rule=rule or self.rule)


class Cancelled(QuantscopeError):
    """Raised inside long work when its cancel token was set."""

    default_rule = "cancelled"

    def __init__(self, message: str = "cancelled", **kwargs) -> None:
        super().__init__(message, **kwargs)
