"""The errors a user can act on, shared by every module (numpy-free, imports nothing of the package).

Every loader and writer raises a subclass of `DdpmError` whose message is one line that names the file and says
what to do (model.io.CheckpointError, runtime.bundle.ExportError, train.data.DataError, samples.SamplesError,
files.OutputError, ...); `ddpm.cli` prints any of them as "Error: <message>" with exit status 1. `Interrupted` is a
KeyboardInterrupt that carries what a user needs to know after Ctrl-C (exit status 130).
"""

from __future__ import annotations


class DdpmError(Exception):
    """Anything a user can fix: a bad argument, a missing or malformed file, a missing package. str(e) is the
    one-line message."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT), with a message for the user, e.g. "interrupted; last checkpoint at step 200 in runs/x".

    A KeyboardInterrupt, so that code which handles Ctrl-C still sees one."""
