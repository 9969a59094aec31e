"""The threads that run proposals off the daemon's watch loop."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Callable
from typing import Any


class ProposalPool:
    """Runs proposals on daemon threads, at most ``max_workers`` at once.

    A stopping atm-watch must not wait for a model call in flight (a hanging server held a SIGTERM for
    87 s): ThreadPoolExecutor's workers are joined at interpreter exit, these threads are not.
    """

    def __init__(self, max_workers: int) -> None:
        self._slots = threading.BoundedSemaphore(max_workers)
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future[Any]:
        future: cf.Future[Any] = cf.Future()

        def run() -> None:
            with self._slots:
                if self._closed or not future.set_running_or_notify_cancel():
                    return
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to whoever reads the future
                    future.set_exception(exc)

        threading.Thread(target=run, name="atm-propose", daemon=True).start()
        return future

    def shutdown(self) -> None:
        self._closed = True
