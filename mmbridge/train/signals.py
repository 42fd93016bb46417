"""SIGTERM / SIGINT during training: finish the step, checkpoint, stop (a second signal stops at once)."""

from __future__ import annotations

import contextlib
import signal
import threading


def ignore_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which stops them cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class StopSignals:
    """While active, SIGTERM/SIGINT only record themselves in `received`; the loop then checkpoints and
    stops. A second signal raises KeyboardInterrupt (the last checkpoint stays valid)."""

    def __init__(self):
        self.received: int | None = None

    @contextlib.contextmanager
    def active(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            if self.received is not None:
                raise KeyboardInterrupt
            self.received = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
