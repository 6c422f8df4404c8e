"""Atomic writing: files written under hidden temporary names in their final folder, renamed into place together."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class _Staging:
    """Files (or folders) written under hidden temporary names beside their final names; `commit` renames them all."""

    def __init__(self, overwrite: bool):
        self.overwrite = overwrite
        self.items: list[tuple[Path, Path]] = []

    def path(self, final: Path) -> Path:
        final = Path(final)
        if not self.overwrite and (final.exists() or final.is_symlink()):
            raise ValueError(f"{final} already exists; pass overwrite=True (--overwrite) to replace it")
        tmp = final.with_name(f".{final.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        self.items.append((tmp, final))
        return tmp

    def commit(self) -> None:
        try:
            for tmp, final in self.items:
                if final.exists() and (final.is_dir() or tmp.is_dir()):  # os.replace cannot replace a folder
                    old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
                    os.replace(final, old)
                    os.replace(tmp, final)
                    _remove(old)
                else:
                    os.replace(tmp, final)
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        for tmp, _ in self.items:
            _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def _staged(what: str, overwrite: bool) -> Iterator[_Staging]:
    """Stage writes; on any error remove every temporary file and re-raise (an OSError with a message naming `what`)."""
    staging = _Staging(overwrite)
    try:
        yield staging
    except BaseException as exc:
        staging.discard()
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc)
            if exc.errno == errno.ENOSPC:
                reason = "no space left on device (ENOSPC)"
            raise OSError(exc.errno, f"could not write {what}: {reason}; temporary files were removed and no "
                                     "file was left under a final name") from exc
        raise
    staging.commit()


def _write_file(path: Path, write: Callable[[Any], None]) -> None:
    """Write bytes through `write(fileobj)` and flush them to disk."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
