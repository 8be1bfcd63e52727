"""Log lines while something slow runs (Ray start-up, the workers' set-up, a long step), so that no job leaves
its console silent for longer than about :data:`HEARTBEAT_S` seconds."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

HEARTBEAT_S = 20.0


@contextlib.contextmanager
def heartbeat(describe: Callable[[float], str | None], every_s: float = HEARTBEAT_S) -> Iterator[None]:
    """While the body runs, log ``describe(elapsed_s)`` every ``every_s`` seconds (None skips that beat)."""
    start, stop = time.monotonic(), threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            line = describe(time.monotonic() - start)
            if line:
                log.info("%s", line)

    thread = threading.Thread(target=beat, name="cadiff-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
