"""Signals as the exceptions of errors.py, so that a command unwinds instead of dying with a write half-done.

`signals_as_interrupt` turns SIGTERM (what `kill`, `timeout` and supervisors send) and SIGHUP (a closed terminal)
into errors.Terminated, a KeyboardInterrupt like Ctrl-C's, while a command runs; `exit_on_signals` prints the same
"terminated" (exit 143), "hangup" (129) or "interrupted" (Ctrl-C, exit 130) and exits at once while the CLI starts
and ends; `file_size_limit_as_error` turns a write past the file-size limit (ulimit -f) into an OSError EFBIG that
errors.limit_message names, instead of SIGXFSZ killing the process. ddpm.cli enters both around every command;
both leave the handlers alone outside the main thread (Python runs signal handlers there only).
`stop_message` lets a long job say where it stopped (train: the last checkpoint) whatever stopped it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Callable

from .errors import SIGNAL_WORDS, DdpmError, LimitReached, Terminated, interrupted, limit_message


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


# What each signal's line says and its exit status (128 + the signal's number), during a command and before it
_WORDS = SIGNAL_WORDS
# The signals that end a command as errors.Terminated (whose default action exit_on_signals replaces): all but SIGINT
_ENDING = tuple(signum for signum in SIGNAL_WORDS if signum != signal.SIGINT)
_said = False   # a signal's line was printed (signals.said): a later signal exits without a second one
_received: list[int] = []   # the stopping signals received while a command runs (signals_as_interrupt)


def raise_if_signalled() -> None:
    """Raise the exception of a stopping signal received while the command runs (errors.Terminated, or
    KeyboardInterrupt for Ctrl-C), if one was: a native library may have turned the exception its handler raised
    into another (an extension's initialisation: pybind11's ImportError "initialization failed", numpy's C API
    "import numpy failed"), which must not pass for the failure it names (a package "not installed")."""
    if _received:
        signum = _received[-1]
        raise KeyboardInterrupt("interrupted") if signum == signal.SIGINT else Terminated(_WORDS[signum], signum)


def _exit_now(signum, frame):
    """The handler while the CLI starts and ends (exit_on_signals): the signal's line, then exit at once."""
    if not _said:
        os.write(2, f"\n{_WORDS[signum]}\n".encode())
    os._exit(128 + signum)


def said() -> None:
    """Record that the line of a signal ("interrupted", "terminated") has been printed: from here on a signal that
    exit_on_signals handles exits with its status without printing another (a second Ctrl-C while the first one's
    message is printed or the process ends)."""
    global _said
    _said = True


@contextlib.contextmanager
def signals_as_interrupt():
    """While the block runs, SIGTERM and SIGHUP raise errors.Terminated and Ctrl-C (SIGINT) KeyboardInterrupt in the
    main thread, so that a command unwinds (temporaries removed, nothing half-written published) instead of the
    process being killed on the spot; the previous handlers are restored after. SIGINT and SIGHUP are changed only
    where exit_on_signals handles them or they have their default handling (an ignored one, e.g. SIGINT in a
    background job or SIGHUP under `nohup`, stays ignored; a handler of an embedding program is kept). Outside the
    main thread: unchanged."""
    if not _main_thread():
        yield
        return

    def on_term(signum, frame):
        _received.append(signum)
        raise Terminated(_WORDS[signum], signum)

    def on_int(signum, frame):
        _received.append(signum)
        raise KeyboardInterrupt

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, *_ENDING)}
    try:
        for signum in _ENDING:
            if signum == signal.SIGTERM or previous[signum] in (_exit_now, signal.SIG_DFL):
                signal.signal(signum, on_term)
        if previous[signal.SIGINT] is _exit_now:
            signal.signal(signal.SIGINT, on_int)
        _received.clear()
        yield
    finally:   # the handlers of before first: a signal that comes while they are restored exits at once
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def exit_on_signals() -> dict:
    """Until a command runs, and after it: SIGTERM prints the "terminated" line and exits with status 143, SIGHUP
    "hangup" and 129, Ctrl-C (SIGINT) "interrupted" and 130, at once, as during a command (signals_as_interrupt,
    which takes over then).
    ddpm.cli calls this before it imports the modules of its commands (numpy and the rest: most of a second), where
    SIGTERM's default action killed the process without the line and Ctrl-C gave a KeyboardInterrupt traceback.
    Nothing has been written yet then, so there is nothing to unwind. Only in the main thread, and for a signal
    with its default handling (SIGTERM's and SIGHUP's default action, SIGINT's KeyboardInterrupt): an ignored signal
    (SIGHUP under `nohup`) and a handler of the embedding program are kept. Returns {signal: previous handler} of
    those it changed, to restore (restore_signals)."""
    if not _main_thread():
        return {}
    defaults = {**dict.fromkeys(_ENDING, signal.SIG_DFL), signal.SIGINT: signal.default_int_handler}
    return {signum: signal.signal(signum, _exit_now) for signum, default in defaults.items()
            if signal.getsignal(signum) is default}


def end_of_program(handled: dict) -> None:
    """Where `ddpm` run as the program ends (its status set, the interpreter about to shut down): what Python would
    still run of its own is run now, under exit_on_signals's handlers (the signals of `handled`, what
    exit_on_signals returned): the other threads that are not daemons are joined and the atexit callbacks run (a
    signal meanwhile prints its line and exits with its status, as during the command), standard output and error
    flushed; then those signals are ignored. The interpreter's teardown that follows (garbage collection, modules
    torn down: a fraction of a second) runs no Python handler, and Python puts a signal's default action back
    there, which killed the process without its line; the command is done by then and its status stands. Where
    the atexit module cannot run its callbacks now (no `_run_exitfuncs`), nothing changes."""
    import atexit
    import sys

    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if not handled or run_exitfuncs is None or not _main_thread():
        return
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):   # a failed flush is Python's to report, as it would have been
            if stream is not None:
                stream.flush()
    for signum in handled:
        signal.signal(signum, signal.SIG_IGN)


def restore_signals(previous: dict) -> None:
    """Put back the handlers that exit_on_signals replaced (`previous`, what it returned)."""
    global _said
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    _said = False


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
