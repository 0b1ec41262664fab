"""The package's one way to write a file: atomically, with the user's normal permissions.

Every file gblr writes (checkpoints, reports, logs, pictures, downloads) goes through
:func:`write_atomic`. The bytes go to a temporary file beside the target, which is renamed over
the target only once complete, so a reader (or a resumed run) never sees a half-written file
and an interrupted write leaves any previous version in place.

The temporary file is created with a fresh random name opened in ``"xb"`` mode rather than by
``tempfile`` (whose files are owner-only, 0600): the finished file then gets the permissions
the umask gives any new file (0644 under the usual umask 022), so checkpoints, reports and a
shared dataset cache stay readable as the user expects.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(handle)`` on a new binary file beside ``path``, then rename it to ``path``.

    The parent folder is created when missing. If ``write`` raises (any exception, including
    KeyboardInterrupt) or the rename fails, the temporary file is removed and ``path`` is left
    as it was. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Beside the target (same filesystem, so the rename is atomic), hidden, and unique per call.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    handle = open(temporary, "xb")  # "x": never reuse (or truncate) an existing file
    try:
        with handle:
            write(handle)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """:func:`write_atomic` for text, encoded as UTF-8."""
    return write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def check_writable_folder(path: str | os.PathLike, name: str = "folder") -> Path:
    """Create the folder ``path`` (and its parents) and check that files can be written into it.

    A run calls this before its work, so that an output folder it cannot use fails in a second
    with a clear message rather than after an epoch of training. The check writes an empty probe
    file through :func:`write_atomic` (exactly as the run will write) and removes it. Raises an
    OSError whose one-line message starts with ``name`` (e.g. ``"out (--out)"``) and says what
    is wrong: the path is a file, lies below a file, or cannot be created or written. Returns
    ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    probe = path / f".gblr-write-check-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        # A file where a folder is wanted (the path itself or one of its parents): say which.
        for candidate in (path, *path.parents):
            if candidate.exists() and not candidate.is_dir():
                where = "is a file" if candidate == path else f"lies below {candidate}, which is a file"
                raise NotADirectoryError(f"{name}: {path} {where}, not a folder")
        path.mkdir(parents=True, exist_ok=True)
        write_atomic(probe, lambda handle: None)
        probe.unlink()
    except NotADirectoryError as error:
        if error.errno is None:  # ours, above
            raise
        raise OSError(f"{name}: cannot write into {path} ({error.strerror})") from error
    except OSError as error:  # no permission, a read-only file system, a name too long, ...
        raise OSError(f"{name}: cannot write into {path} ({error.strerror or error})") from error
    return path
