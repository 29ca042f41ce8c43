"""The processes of a ``cppo study``: the ``cppo fit`` / ``cppo evaluate`` children of its runs,
how a signal stops them (:class:`Children`, :func:`stop_on_signals`), and the lock that keeps a
second study off the same folder (:func:`study_lock`)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from cppo_lightning.errors import ConfigError


class Children:
    """The ``cppo fit`` and ``cppo evaluate`` processes of the study's runs, and its stop.

    The runs' threads start their commands through :meth:`run`; a signal handler (main thread)
    calls :meth:`stop`, after which no command starts and the running ones get the signal. The
    lock makes the two exclusive, so a command starting as the stop arrives is either not started
    or signalled. It is re-entrant: a second signal may arrive while the handler holds it.
    """

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.signal: signal.Signals | None = None  # the first stop's signal
        self._lock = threading.RLock()
        self._running: set[subprocess.Popen[bytes]] = set()

    def run(self, command: list[str], log: Path, env: dict[str, str] | None) -> int | None:
        """Run ``command`` with its stdout and stderr appended to ``log`` (after a line with the
        command); its exit status (negative: the signal that ended it), or None when the study
        is stopping and it was not started."""
        with open(log, "a", encoding="utf-8") as handle:
            with self._lock:
                if self.stopping.is_set():
                    return None
                handle.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shlex.join(command)}\n")
                handle.flush()
                child = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
                self._running.add(child)
            try:
                return child.wait()
            finally:
                with self._lock:
                    self._running.discard(child)

    def stop(self, signum: int, forward: bool) -> None:
        """Start no command from now on and, when ``forward``, send ``signum`` to the running
        ones (``cppo fit`` saves a checkpoint and exits, ``cppo evaluate`` stops after its unit
        in progress)."""
        with self._lock:
            if self.signal is None:
                self.signal = signal.Signals(signum)
            self.stopping.set()
            if forward:
                for child in self._running:
                    with contextlib.suppress(ProcessLookupError):
                        child.send_signal(signum)


def ctrl_c_reached_the_runs() -> bool:
    """Whether a SIGINT of the study is taken for a terminal's Ctrl-C, which the terminal sends to
    the runs as well (they are in the study's process group): the study is in the foreground
    process group of its controlling terminal. A second SIGINT from the study would make a
    ``cppo fit`` abort without saving."""
    try:
        tty = os.open("/dev/tty", os.O_RDONLY)
    except OSError:  # no controlling terminal
        return False
    try:
        return os.tcgetpgrp(tty) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(tty)


@contextlib.contextmanager
def stop_on_signals(children: Children) -> Any:
    """For the study's duration, SIGTERM and SIGINT stop ``children`` (:meth:`Children.stop`):
    SIGTERM is forwarded to the runs; SIGINT too unless it is a terminal's Ctrl-C
    (:func:`ctrl_c_reached_the_runs`). The previous handlers are restored after. Nothing is
    installed outside the main thread (Python allows handlers only there), and a signal ignored
    when the study started (SIGINT in a script's background job) stays ignored, for the runs
    too."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        children.stop(signum, forward=signum != signal.SIGINT or not ctrl_c_reached_the_runs())

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for caught in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(caught) is not signal.SIG_IGN:
                previous[caught] = signal.signal(caught, on_signal)
    try:
        yield
    finally:
        for caught, handler in previous.items():
            # None: the previous handler was not set from Python; the default stands in for it.
            signal.signal(caught, signal.SIG_DFL if handler is None else handler)


LOCK_FILE = "study.lock"


@contextlib.contextmanager
def study_lock(output: Path) -> Any:
    """Holds ``output/study.lock`` for the command: a second ``cppo study`` on the same folder
    (which would train the same runs into the same folders at once) is refused. The lock is the
    operating system's (``flock``), so it is gone when its process ends, however it ends."""
    output.mkdir(parents=True, exist_ok=True)
    with open(output / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ConfigError(
                f"--output {output}: another cppo study is running on this folder ({holder}); "
                "wait for it to end, or give another --output."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
