"""The errors a user can act on, shared by every module (numpy-free, imports nothing of the package).

Every loader and writer raises a subclass of `DdpmError` whose message is one line that names the file and says
what to do (model.io.CheckpointError, runtime.bundle.ExportError, train.data.DataError, samples.SamplesError,
files.OutputError, ...); `ddpm.cli` prints any of them as "Error: <message>" with exit status 1. `Interrupted` is a
KeyboardInterrupt that carries what a user needs to know after Ctrl-C (exit status 130); `Terminated`, one of them,
is SIGTERM's (exit status 143). Code that catches a KeyboardInterrupt to say more re-raises `interrupted(e, ...)`,
which keeps the signal's kind: supervisors (systemd, Kubernetes, `timeout`) read the exit status.
"""

from __future__ import annotations


class DdpmError(Exception):
    """Anything a user can fix: a bad argument, a missing or malformed file, a missing package. str(e) is the
    one-line message."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT), with a message for the user, e.g. "interrupted; last checkpoint at step 200 in runs/x".

    A KeyboardInterrupt, so that code which handles Ctrl-C still sees one."""


class Terminated(Interrupted):
    """SIGTERM (what `kill`, `timeout` and supervisors send; ddpm.cli turns it into this exception in the main
    thread): unwound like Ctrl-C, so that temporaries are removed and nothing half-written is published; exit
    status 143 (128 + 15) and the word "terminated"."""


def interrupted(e: KeyboardInterrupt, detail: str) -> Interrupted:
    """The exception to raise from `except KeyboardInterrupt as e` with `detail` (what the user needs to know, e.g.
    the last checkpoint): Terminated("terminated; detail") when e came from SIGTERM, else
    Interrupted("interrupted; detail")."""
    if isinstance(e, Terminated):
        return Terminated(f"terminated; {detail}")
    return Interrupted(f"interrupted; {detail}")
