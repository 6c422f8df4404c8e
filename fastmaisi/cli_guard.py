"""What every command that writes does on a refusal or a foreseeable fault: one line on stderr, exit code 2, and no
folder that it created left behind empty (a traceback is for bugs, not for a full disk or a missing package); on
Ctrl-C one line and exit code 130 (temporary files are removed by the atomic writers, complete files kept)."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

# exceptions that mean "bad input or a machine fault", reported in one line; anything else is a bug (traceback)
FAULTS = (ValueError, OSError, ImportError, MemoryError)


class CreatedFolders:
    """Remembers which of `folders` (and their parents) do not exist yet; `remove_empty` removes those the command
    created and left empty, deepest first."""

    def __init__(self, *folders: str | os.PathLike | None):
        self.new: list[Path] = []
        for folder in folders:
            if folder is None:
                continue
            p = Path(folder).absolute()
            while not p.exists() and p != p.parent:
                self.new.append(p)
                p = p.parent

    def remove_empty(self) -> None:
        for p in sorted(set(self.new), key=lambda q: len(q.parts), reverse=True):
            try:
                p.rmdir()  # only if empty
            except OSError:
                pass


def fault_line(exc: BaseException) -> str:
    """The one line that reports `exc`."""
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return (f"out of memory ({' '.join(str(exc).split())[:200] or 'MemoryError'}); see --dry-run for the plan, "
                "or use a smaller size or a memory budget")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC and "no space" not in str(exc).lower():
        return f"no space left on device ({exc.filename or exc})"
    return " ".join(str(exc).split()) or type(exc).__name__


def is_fault(exc: BaseException) -> bool:
    """A foreseeable fault (one line, exit 2) rather than a bug: see FAULTS; torch's out-of-memory errors too."""
    return isinstance(exc, FAULTS) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def report(prog: str, exc: BaseException, created: CreatedFolders | None = None) -> int:
    """Print `prog: <one line>` to stderr, remove the empty folders the command created, return exit code 2."""
    print(f"{prog}: {fault_line(exc)}", file=sys.stderr)
    if created is not None:
        created.remove_empty()
    return 2


INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def interrupted(prog: str, created: CreatedFolders | None = None, kept: str = "complete files were kept") -> int:
    """Report a Ctrl-C in one line, remove the empty folders the command created, return exit code 130."""
    print(f"{prog}: interrupted; {kept}, temporary files removed", file=sys.stderr)
    if created is not None:
        created.remove_empty()
    return INTERRUPTED
