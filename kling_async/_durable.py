"""Names in a folder that survive a power cut: :func:`sync_directory`, :func:`make_directory`.

An fsync of a file makes its bytes durable, not its name: POSIX keeps a file created, linked or
renamed into a folder only once the folder itself is fsynced.  Without that, a power cut just
after a download's rename (or a journal's creation) can lose the whole file, though its result
was already reported (or its submits already sent).
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

__all__ = ["make_directory", "sync_directory"]

#: What a file system (or platform) says when it cannot fsync a folder at all: nothing more can
#: be done there, so these are ignored.  Anything else (EIO: the disk failed) is raised.
REFUSALS = frozenset(
    code
    for code in (
        errno.EINVAL,  # no sync for this kind of file (FUSE and network file systems, /proc)
        getattr(errno, "ENOTSUP", None),
        getattr(errno, "EOPNOTSUPP", None),
        errno.EBADF,  # a folder opened read-only cannot be synced (some systems)
        errno.EACCES,  # a folder that cannot be opened to be synced
        errno.EPERM,
    )
    if code is not None
)


def sync_directory(folder: str | os.PathLike[str]) -> None:
    """Fsync ``folder``, so that the names created or renamed in it survive a power cut.

    Blocking (run it in a worker thread).  File systems that refuse to sync a folder (see
    :data:`REFUSALS`) are tolerated; Windows has no such fsync (NTFS keeps its names itself).
    """
    if sys.platform == "win32":  # pragma: no cover - a folder cannot be opened there
        return
    try:
        fd = os.open(Path(folder), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        if exc.errno in REFUSALS:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in REFUSALS:
            raise
    finally:
        os.close(fd)


def make_directory(folder: Path) -> None:
    """Create ``folder`` and its missing parents, each one made to survive a power cut.

    Blocking.  A folder already there costs one ``stat``.
    """
    if folder.is_dir():
        return
    missing = [folder]
    missing.extend(p for p in folder.parents if not p.is_dir())  # (the deepest ones come first)
    folder.mkdir(parents=True, exist_ok=True)
    for made in reversed(missing):
        sync_directory(made.parent)
