"""Advisory file locks (POSIX flock) that let processes writing into one folder take turns or refuse."""

from __future__ import annotations

import contextlib
import os

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None


def file_lock(path: str | os.PathLike, exclusive: bool, blocking: bool):
    """The open lock file `path` holding a shared or exclusive flock (released on close), or None when another
    process holds a conflicting one and `blocking` is False."""
    f = open(path, "a+")
    if fcntl is None:
        return f
    try:
        fcntl.flock(f, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        f.close()
        return None
    return f


def relock(f, exclusive: bool, blocking: bool) -> bool:
    """Change a held lock to exclusive or shared; False when that is not obtainable without blocking."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(f, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def locked(path: str | os.PathLike):
    """Hold an exclusive lock on `path` (waiting for it) for the duration of the block."""
    f = file_lock(path, exclusive=True, blocking=True)
    try:
        yield
    finally:
        f.close()
