"""Signals as the exceptions of errors.py, so that a command unwinds instead of dying with a write half-done.

`sigterm_as_interrupt` turns SIGTERM (what `kill`, `timeout` and supervisors send) into errors.Terminated, a
KeyboardInterrupt like Ctrl-C's, and `exit_on_sigterm` prints the same "terminated" and exits 143 while the CLI
starts; `file_size_limit_as_error` turns a write past the file-size limit (ulimit -f) into
an OSError EFBIG that errors.limit_message names, instead of SIGXFSZ killing the process. ddpm.cli enters both around
every command; both leave the handlers alone outside the main thread (Python runs signal handlers there only).
`stop_message` lets a long job say where it stopped (train: the last checkpoint) whatever stopped it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Callable

from .errors import DdpmError, LimitReached, Terminated, interrupted, limit_message


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While the block runs, SIGTERM raises errors.Terminated in the main thread instead of killing the process on
    the spot (which leaves the temporary of a write in progress behind); the previous handler is restored after.
    Outside the main thread: unchanged."""
    if not _main_thread():
        yield
        return

    def on_term(signum, frame):
        raise Terminated("terminated")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def exit_on_sigterm():
    """Until a command runs: SIGTERM prints the "terminated" line and exits with status 143 at once, as during a
    command (sigterm_as_interrupt, which takes over then). ddpm.cli calls this before it imports the modules of its
    commands (numpy and the rest: most of a second), where the default action killed the process without the line.
    Nothing has been written yet then, so there is nothing to unwind. Only in the main thread and where SIGTERM has
    its default action (a handler of the embedding program is kept). Returns the previous handler, to restore, or
    None when nothing was installed."""
    if not _main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def on_term(signum, frame):
        os.write(2, b"\nterminated\n")
        os._exit(128 + signal.SIGTERM)

    return signal.signal(signal.SIGTERM, on_term)


@contextlib.contextmanager
def file_size_limit_as_error():
    """While the block runs, SIGXFSZ (sent when a write passes the file-size limit, ulimit -f) is ignored, so that
    the write fails with OSError EFBIG and is reported (and its temporary removed) instead of the process being
    killed with a core dump; the previous handler is restored after. Outside the main thread, or where there is no
    such signal (Windows): unchanged."""
    if not hasattr(signal, "SIGXFSZ") or not _main_thread():
        yield
        return
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGXFSZ, previous)


@contextlib.contextmanager
def stop_message(detail: Callable[[], str], error: type[DdpmError]):
    """While the block runs, what stops it says where things stand, `detail()` (e.g. "last checkpoint at step 200 in
    runs/x, continue with --resume"): a KeyboardInterrupt is raised again as errors.interrupted(e, detail())
    (Terminated for SIGTERM, Interrupted for Ctrl-C), an exception that a resource limit caused as
    error("<the limit, errors.limit_message>; <detail>"), with the options of the running command that ask for less
    memory (errors.LESS_AT_ONCE); errors.LimitReached (a limit found by a check, e.g. an import) too. Any other
    DdpmError, an `interrupted` exception (one that says where things stand already: an inner stop_message's) and
    anything else pass unchanged."""
    try:
        yield
    except DdpmError as e:
        message = limit_message(e, again=False) if isinstance(e, LimitReached) else None
        if message is None:
            raise
        raise error(f"{message}; {detail()}") from None
    except KeyboardInterrupt as e:   # every file is whole (atomic writes): the detail says what is on disk
        if getattr(e, "detail", None) is not None:
            raise
        raise interrupted(e, detail()) from None
    except Exception as e:
        message = limit_message(e, again=False)
        if message is None:
            raise
        raise error(f"{message}; {detail()}") from None
