"""Output files written whole or not at all.

A report or array is written into a hidden temporary file beside its destination and renamed
over it only once complete: a full disk, an interrupt or an error leaves the previous file (if
any) untouched and no truncated one behind ("262144 requested and 61408 written" used to leave
a 245 KB .npy where the old file was, and a SIGTERM a two-line CSV). Destinations that are not
regular files (/dev/stdout, a FIFO, /dev/null) are written directly: they cannot be replaced.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from .errors import QuantscopeError

#: Marker in the temporary file's name: ``.NAME.quantscope-tmp-<pid>``.
TMP_TAG = "quantscope-tmp"


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "w", **open_kw):
    """``with atomic_output(p, "w") as fh:`` — ``fh`` writes a temporary file that replaces ``p``
    when the block ends without an exception (and is removed when it raises). OSError becomes a
    :class:`QuantscopeError` that names ``p``."""
    p = Path(path)
    try:
        direct = p.exists() and not stat.S_ISREG(os.stat(p).st_mode)  # /dev/stdout (a link to a pipe), a FIFO
    except OSError:
        direct = False
    if not direct and p.is_symlink():  # a link to a file: written through, as open(p, "w") would, link kept
        p = Path(os.path.realpath(p))
    if direct:
        try:
            with open(p, mode, **open_kw) as fh:
                yield fh
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise QuantscopeError(f"cannot write {p}: {exc.strerror or exc}") from None
        return
    tmp = p.parent / f".{p.name}.{TMP_TAG}-{os.getpid()}"
    try:
        with open(tmp, mode, **open_kw) as fh:
            yield fh
            fh.flush()
        if p.exists():  # keep the old file's permissions, as an in-place rewrite would
            with contextlib.suppress(OSError):
                os.chmod(tmp, stat.S_IMODE(os.stat(p).st_mode))
        os.replace(tmp, p)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and not isinstance(exc, BrokenPipeError):
            raise QuantscopeError(f"cannot write {p}: {exc.strerror or exc}"
                                  + (" (nothing written; a previous file is kept)" if p.exists() else
                                     " (nothing written)")) from None
        raise


class _Stream:
    """A file object seen only through ``write``: numpy then writes an array in chunks instead
    of ``tofile``, which needs a seekable file (a pipe, /dev/stdout, a FIFO failed with
    "obtaining file position failed")."""

    def __init__(self, fh) -> None:
        self._fh = fh

    def write(self, b) -> int:
        return self._fh.write(b)


def write_npy(fh, a) -> None:
    """``a`` as .npy into the open binary file ``fh``: ``np.save`` for a regular file, chunks
    through :class:`_Stream` for a pipe or a device."""
    import numpy as np
    try:
        regular = stat.S_ISREG(os.fstat(fh.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):  # no file descriptor (a wrapped stream)
        regular = False
    if regular:
        np.save(fh, a)
    else:
        np.lib.format.write_array(_Stream(fh), a, allow_pickle=False)


def save_npy(path: str | os.PathLike, a) -> None:
    """``a`` as .npy at ``path`` exactly (np.save(path) would add ".npy"), whole or not at all."""
    with atomic_output(path, "wb") as fh:
        write_npy(fh, a)


def printable(obj):
    """``obj`` (str, or dicts/lists/tuples of them) with every string encodable as UTF-8: a path
    that is not valid UTF-8 (Python reads its odd bytes as lone surrogates) keeps them as ``\\xNN``.
    Written as they were, a CSV failed with UnicodeEncodeError after the whole sweep, and a JSON
    held ``"\\udcff"``, which strict parsers refuse."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
            return obj
        except UnicodeEncodeError:
            try:
                return obj.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            except UnicodeEncodeError:  # a surrogate no byte was read as
                return obj.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(obj, dict):
        return {printable(k): printable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [printable(v) for v in obj]
        return out if isinstance(obj, list) else tuple(out)
    return obj


#: Control characters (C0, DEL, C1) as ``\\xNN``: see :func:`terminal_text`.
_CONTROL = {i: f"\\x{i:02x}" for i in (*range(0x20), 0x7F, *range(0x80, 0xA0))}


def terminal_text(text: str) -> str:
    """``text`` for a terminal: :func:`printable`, and every control character (newline, escape,
    tab included) as ``\\xNN``. A tensor name from a file holding ``\\n\\x1b[31m`` broke the
    line it was printed on and turned the terminal red; an error message must stay one line."""
    return printable(text).translate(_CONTROL)


def terminal_lines(text: str) -> str:
    """Each line of ``text`` as :func:`terminal_text` (the line breaks kept)."""
    return "\n".join(terminal_text(ln) for ln in text.split("\n"))


def file_in_the_way(path) -> Path | None:
    """The nearest existing part of ``path``'s folder when it is a file, not a folder (a file
    where a folder of an output path is wanted: the cause of "does not exist" or "File exists"),
    else None."""
    up = Path(path).parent
    while not up.exists() and up.parent != up:
        up = up.parent
    return up if up.exists() and not up.is_dir() else None
