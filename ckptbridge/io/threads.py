"""One call on a helper thread, waited for later: the pipe overlaps kernel work
(``copy_file_range``, ``fsync``) with checksumming, which releases the GIL too.

Daemon threads on purpose: an interrupted conversion exits at once instead of
waiting at interpreter shutdown for an ``fsync`` of a file it has just removed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class Job(threading.Thread):
    """Runs ``fn(*args)`` now, on its own daemon thread; :meth:`wait` returns its result or raises its error."""

    def __init__(self, fn: Callable[..., Any], *args: Any, name: str = "ckptbridge-job") -> None:
        super().__init__(name=name, daemon=True)
        self._fn, self._args = fn, args
        self._result: Any = None
        self._error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self._result = self._fn(*self._args)
        except BaseException as e:  # noqa: BLE001 - handed to wait()
            self._error = e

    def wait(self) -> Any:
        self.join()
        if self._error is not None:
            raise self._error
        return self._result
