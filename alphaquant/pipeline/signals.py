"""SIGINT and SIGTERM stop a run cleanly: the current layer is abandoned, the resume state kept.

A cluster scheduler sends SIGTERM before it kills a job; Lightning's own SIGTERM handler only
notes it (and its predict loop never looks), so without this a run went on until the SIGKILL.
Inside `stop_on_signals()` the first SIGINT/SIGTERM raises `RunInterrupted` in the main thread,
wherever it is; the atomic output directory removes the partial checkpoint as the exception
passes, the finished layers stay in the resume state, and the CLI prints one line saying how to
resume and exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM), as a shell does.

    with stop_on_signals():
        session.run()
"""
from __future__ import annotations

import contextlib
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(BaseException):
    """Raised by the handler; a BaseException so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int):
        self.signum = signum
        self.signame = signal.Signals(signum).name
        super().__init__(f"interrupted by {self.signame}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def stop_on_signals():
    """Turn the first SIGINT/SIGTERM into RunInterrupted; later ones are ignored while the run unwinds
    (a second Ctrl+C must not break the cleanup half way). Outside the main thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum, _frame):
        if fired:
            return
        fired.append(signum)
        raise RunInterrupted(signum)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
