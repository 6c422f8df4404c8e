"""Write-behind: the CPU work after a sample's GPU stages (quality check, compression, DICOM, preview, record) runs on
a worker thread while the GPU makes the next sample. Bounded: at most `max_pending` finished volumes wait, so host
memory stays flat (submit blocks while the queue is full); a failure in the worker is raised in the caller."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

_DONE = object()


class BackgroundWriter:
    """Runs `finish(item)` for each submitted item, in order, on one worker thread."""

    def __init__(self, finish: Callable[[Any], None], max_pending: int = 1):
        self._finish = finish
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._discard = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastmaisi-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _DONE:
                    return
                if self._error is None and not self._discard.is_set():
                    self._finish(item)
            except BaseException as exc:  # handed to the main thread by check()
                self._error = exc
            finally:
                self._queue.task_done()

    def check(self) -> None:
        """Raise the worker's error, if any (then nothing more is written)."""
        if self._error is not None:
            raise self._error

    def submit(self, item: Any) -> None:
        """Queue `item`; blocks while `max_pending` items wait."""
        while True:
            self.check()
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def wait_idle(self) -> None:
        """Block until every submitted item is finished."""
        self._queue.join()
        self.check()

    def close(self, discard: bool = False, raise_error: bool = True) -> None:
        """Finish the queued items (with `discard`: only the one in progress) and stop the worker; then raise the
        worker's error unless not `raise_error` (the caller is already raising another)."""
        if discard:
            self._discard.set()
        while self._thread.is_alive():
            try:
                self._queue.put(_DONE, timeout=0.2)
                break
            except queue.Full:
                continue
        self._thread.join()
        if raise_error:
            self.check()
