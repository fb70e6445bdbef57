"""The trainer's signal handling, installed first thing in every trainer process (before torch is imported).

SIGUSR1 or SIGTERM asks for a checkpoint at the next step boundary and a clean exit (status 0); a second
request more than `debounce_s` later exits at once. A request that arrives while the process is still
starting (imports, model build, resume) is remembered and acted on at the first step boundary.

Under torchrun (LOCAL_RANK set) a watchdog thread also notices when the agent that started this worker is
gone (a hand-started torchrun killed by SIGUSR1, a crashed launcher): the worker then asks itself for a
checkpoint (SIGTERM) instead of training on as an orphan.
"""

from __future__ import annotations

import os
import signal
import threading
import time

REQUEST_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
WATCH_INTERVAL_S = 1.0


class SignalFlag:
    """First SIGTERM/SIGUSR1: checkpoint at the next step boundary and exit 0. Second: exit at once.

    A repeat within `debounce_s` of the first is the same request delivered twice (Slurm sends TERM both to
    the step and to its tasks; under proctrack/linuxproc a relayed signal also arrives from Slurm), not a
    second one. `install()` takes over a request that an earlier installed flag (the one `pretrain.train`
    installs at start-up) has already received.
    """

    def __init__(self, debounce_s: float = 2.0) -> None:
        self.received: int | None = None
        self.debounce_s = debounce_s
        self._first_at = 0.0

    def install(self) -> None:
        for sig in REQUEST_SIGNALS:
            owner = getattr(signal.getsignal(sig), "__self__", None)
            if isinstance(owner, SignalFlag) and owner is not self and self.received is None:
                self.received, self._first_at = owner.received, owner._first_at
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.received is None:
            self.received, self._first_at = signum, now
        elif now - self._first_at > self.debounce_s:
            os._exit(128 + signum)


def watch_parent(interval_s: float = WATCH_INTERVAL_S) -> threading.Thread:
    """Send this process SIGTERM (a checkpoint request) once its parent process has exited."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        print(
            f"pid {os.getpid()}: the torchrun agent (pid {parent}) is gone; checkpointing and stopping",
            flush=True,
        )
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="parent-watchdog", daemon=True)
    thread.start()
    return thread


def install_at_start() -> SignalFlag:
    """What `pretrain.train` does before anything else: the handler, and the watchdog under torchrun."""
    flag = SignalFlag()
    flag.install()
    if "LOCAL_RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
        watch_parent()
    return flag
