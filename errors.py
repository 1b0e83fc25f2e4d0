"""The errors a user can act on, shared by every module (numpy-free, imports nothing of the package).

Every loader and writer raises a subclass of `DdpmError` whose message is one line that names the file and says
what to do (model.io.CheckpointError, runtime.bundle.ExportError, train.data.DataError, samples.SamplesError,
files.OutputError, ...); `ddpm.cli` prints any of them as "Error: <message>" with exit status 1. `Interrupted` is a
KeyboardInterrupt that carries what a user needs to know after Ctrl-C (exit status 130); `Terminated`, one of them,
is SIGTERM's (exit status 143) and SIGHUP's (129). Code that catches a KeyboardInterrupt to say more re-raises
`interrupted(e, ...)`, which keeps the signal's kind: supervisors (systemd, Kubernetes, `timeout`) read the exit
status. The signals become these exceptions in signals.py.
"""

from __future__ import annotations

import contextlib
import errno
import numbers
import os
import signal
import sys
from contextvars import ContextVar

try:   # imported now: once a limit is reached (too many open files, no memory) an import may fail itself
    import resource
except ImportError:   # not on Windows
    resource = None


class DdpmError(Exception):
    """Anything a user can fix: a bad argument, a missing or malformed file, a missing package. str(e) is the
    one-line message, every character that is not printable in it escaped (`printable`)."""

    def __str__(self) -> str:
        return printable(super().__str__())


def printable(text: str) -> str:
    """`text` with each character that is not printable written as Python's repr writes it: control characters
    (NUL as \\x00, a newline as \\n, ESC as \\x1b), the lone surrogates that stand for the undecodable bytes of a
    file name (\\udcff), line separators. A message that names such a path stays one line that shows the name
    instead of acting on the terminal. Idempotent: what it writes is printable."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shown(path) -> str:
    """A path (str, bytes or os.PathLike) as a line of output names it: its text with the bytes that are not UTF-8
    as their surrogates and every character that is not printable escaped (printable): one line that shows it."""
    return printable(os.fsdecode(path))


def brief(value, limit: int = 60) -> str:
    """A short text for a value read from a file, to put in a message: repr(value) when that is at most about
    `limit` characters, else a summary that says how much it left out, e.g. "(60000, 28, 28, 1, ... 255 items)",
    "'abc...' (10000 characters)", "an integer of 5000 digits". A file's contents never make a message long."""
    if isinstance(value, (str, bytes)):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value)} {'characters' if isinstance(value, str) else 'bytes'})"
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):   # numpy integers too
        value = int(value)
        if value.bit_length() > 4 * limit:   # str() of a long integer is slow (and refused past 4300 digits)
            return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
        text = str(value)
        return text if len(text) <= limit else f"an integer of {len(text.lstrip('-'))} digits"
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return repr(float(value))
    if isinstance(value, (list, tuple, dict)) or type(value).__name__ == "Size":   # torch.Size: a tuple
        items = list(value.items()) if isinstance(value, dict) else value
        ends = "{}" if isinstance(value, dict) else "[]" if isinstance(value, list) else "()"
        parts, used = [], 2
        for item in items:
            text = f"{brief(item[0], limit)}: {brief(item[1], limit)}" if isinstance(value, dict) else \
                brief(item, limit)
            if parts and used + len(text) > limit:
                unit = "entries" if isinstance(value, dict) else "items"
                return f"{ends[0]}{', '.join(parts)}, ... {len(items)} {unit}{ends[1]}"
            parts.append(text)
            used += len(text) + 2
        return ends[0] + ", ".join(parts) + ("," if ends == "()" and len(parts) == 1 else "") + ends[1]
    if hasattr(value, "shape") and hasattr(value, "dtype"):   # an array or tensor; a numpy scalar by its value
        if tuple(value.shape) == () and hasattr(value, "item"):
            return brief(value.item(), limit)
        return f"an array of shape {brief(tuple(value.shape), limit)}"
    return clip(repr(value), limit)


def clip(text: str, limit: int = 200) -> str:
    """`text` (e.g. a library's error message, which may quote a file) as one line of at most `limit` characters:
    its whitespace collapsed, cut with "..." when longer."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
class OptionError(DdpmError, ValueError):
    """A value that does not fit, raised where that is found, naming the argument it concerns: `option` is the
    argument's name in the Python API ("steps", "guidance_interval", "image"); the CLI reports it against its option
    (--steps, --guidance-interval, --image). Also a ValueError, for callers that catch those."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT), with a message for the user, e.g. "interrupted; last checkpoint at step 200 in runs/x".

    A KeyboardInterrupt, so that code which handles Ctrl-C still sees one."""

    detail: str | None = None   # what `interrupted` added to the message (None: the bare signal)


# Texts of the errors that C++ libraries raise for an allocation that failed (onnxruntime: std::bad_alloc in a
# RuntimeException; PyTorch: "DefaultCPUAllocator: can't allocate memory"), and of EMFILE and EFBIG lost in a
# RuntimeError by a library that writes through C.
_MEMORY_TEXTS = ("bad_alloc", "can't allocate memory", "cannot allocate memory", "failed to allocate memory")
# ... of a failure that means memory only when the process has a memory limit (oneDNN, PyTorch's CPU kernels, says
# this when it cannot allocate a kernel's workspace under ulimit -v)
_LIMITED_MEMORY_TEXTS = ("could not create a primitive",)
# ... and of an import whose shared library cannot be mapped into the address space left (an ImportError with one
# of these texts or of _MEMORY_TEXTS: onnxruntime's is "Exception caught: std::bad_alloc")
_MAP_TEXTS = ("failed to map segment", "cannot allocate memory")
_FILES_TEXT = "too many open files"
_FSIZE_TEXT = "file too large"

# The options of the running command that ask for less memory at once (e.g. "-n or --batch" for `ddpm gen`,
# "--batch" for `ddpm train`), named by an out-of-memory message: set by the CLI for the command it runs (cli.py),
# None (no option named) in the Python API.
LESS_AT_ONCE: ContextVar[str | None] = ContextVar("LESS_AT_ONCE", default=None)


def _limit(name: str) -> int | None:
    """The soft limit RLIMIT_<name> in its own unit (bytes, files), or None when unlimited or not known."""
    try:
        soft = resource.getrlimit(getattr(resource, f"RLIMIT_{name}"))[0]
    except (AttributeError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


def cut_at_file_size_limit(folder) -> OSError | None:
    """OSError EFBIG (which limit_message names) for the first file under `folder` cut at the file-size limit (ulimit
    -f: its size is the limit exactly), or None when there is no such limit or file: for a native library that
    writes a file without reporting the failed write (onnx's C++ shape inference), so that what fails later on the
    cut file (a parse error) is reported as the limit it is."""
    soft = _limit("FSIZE")
    if soft is None:
        return None
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):
                if os.stat(path).st_size == soft:
                    return OSError(errno.EFBIG, os.strerror(errno.EFBIG), path)
    return None


def _memory_limits() -> list[tuple[int, str, str]]:
    """(soft limit in bytes, ulimit flag, what it limits) of each memory limit the process has."""
    found = []
    for name, flag, unit in (("AS", "v", "address space"), ("DATA", "d", "data segment")):
        soft = _limit(name)
        if soft is not None:
            found.append((soft, flag, unit))
    return found


def memory_limited() -> bool:
    """Whether the process has a memory limit (ulimit -v or -d)."""
    return bool(_memory_limits())


def limit_message(e: BaseException, again: bool = True) -> str | None:
    """One line for an exception that a resource limit of the process caused, naming the limit and how to raise it,
    or None when `e` is something else. Looked for in `e` and the exceptions it was raised from:

    - out of memory: MemoryError, OSError ENOMEM, a C++ std::bad_alloc or failed allocation (RuntimeError text), a
      shared library that an import cannot map (ImportError "failed to map segment"), oneDNN's "could not create a
      primitive" while a memory limit is set; names the address-space limit (ulimit -v, KiB) or the data-segment
      limit (ulimit -d) when one is set, and the options of the running command that ask for less at once
      (LESS_AT_ONCE);
    - too many open files: OSError EMFILE (the per-process limit, ulimit -n) or ENFILE (the system's table);
    - a file larger than the file-size limit: OSError EFBIG (ulimit -f, in blocks of 1024 bytes; the CLI ignores
      SIGXFSZ, signals.file_size_limit_as_error, so that such a write fails with EFBIG instead of killing the
      process).

    again: end with "and run again"; False when the caller says itself how to go on (a training run: continue
    with --resume, signals.stop_message).
    """
    then = " and run again" if again else ""
    less = LESS_AT_ONCE.get()
    less = f" (a smaller {less})" if less else ""
    limits = _memory_limits()
    seen, err = set(), e
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        no = getattr(err, "errno", None) if isinstance(err, OSError) else None
        native = isinstance(err, RuntimeError) or type(err).__module__.startswith("onnxruntime")
        text = str(err).lower() if native else ""
        unmapped = isinstance(err, ImportError) and any(t in str(err).lower() for t in _MAP_TEXTS + _MEMORY_TEXTS)
        if isinstance(err, MemoryError) or no == errno.ENOMEM or unmapped or any(t in text for t in _MEMORY_TEXTS) \
                or (limits and any(t in text for t in _LIMITED_MEMORY_TEXTS)):
            if limits:
                soft, flag, unit = limits[0]
                return (f"out of memory: the process may use at most {soft >> 20} MiB of {unit} (ulimit -{flag} "
                        f"{soft >> 10}); raise the limit (ulimit -{flag} unlimited) or ask for less at once{less}")
            return f"out of memory; ask for less at once{less}, or free memory{then}"
        if no == errno.EMFILE or (no is None and _FILES_TEXT in text):
            soft = _limit("NOFILE")
            now = f" ({soft}, ulimit -n {soft})" if soft is not None else " (ulimit -n)"
            return f"too many open files: the process reached its limit of open files{now}; raise it (e.g. " \
                   f"ulimit -n 4096){then}"
        if no == errno.ENFILE:
            return f"too many open files in the system (its file table is full); close some programs{then}"
        if no == errno.EFBIG or (no is None and _FSIZE_TEXT in text):
            soft = _limit("FSIZE")
            now = f" of {soft} bytes (ulimit -f {soft >> 10})" if soft is not None else ""
            name = f" {err.filename}" if isinstance(err, OSError) and err.filename else ""
            return f"a file{name} would be larger than the file-size limit{now}; raise it (ulimit -f unlimited){then}"
        err = err.__cause__ or err.__context__
    return None


class StdoutFailed(DdpmError):
    """A write to standard output failed (a full disk, an I/O error: `ddpm gen > /dev/full`), raised by the
    CheckedStdout the CLI writes through (not a closed pipe: EPIPE stays a BrokenPipeError, which click ends with
    exit status 1 and no line). A DdpmError, not an OSError, so that a writer of files (files.atomic_write,
    building_dir) re-raises it as it is instead of taking it for its own output's full disk. `error` is the
    OSError of the failed write; the message is the CLI's line, "cannot write to standard output: <reason>"."""

    def __init__(self, error: OSError, stream=None):
        super().__init__(f"cannot write to standard output: {error.strerror or error}")
        self.error = error
        self.stream = stream   # the stream whose write failed: stdout_failure points its descriptor at os.devnull


class CheckedStdout:
    """A stream (standard output, or its binary `buffer`) whose failed write or flush raises StdoutFailed; every
    other attribute is the wrapped stream's. A closed pipe (EPIPE) is raised as it is. The error is raised outside
    the handler of the OSError, so that it carries no OSError as its context for files.disk_full to read."""

    def __init__(self, stream):
        self._stream = stream

    def _checked(self, method: str, *args):
        try:
            return getattr(self._stream, method)(*args)
        except OSError as e:
            if e.errno == errno.EPIPE:
                raise
            failed = StdoutFailed(e, self._stream)
        raise failed

    def write(self, data):
        return self._checked("write", data)

    def writelines(self, lines):
        return self._checked("writelines", lines)

    def flush(self):
        return self._checked("flush")

    @property
    def buffer(self):
        return CheckedStdout(self._stream.buffer)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class _Closed:
    """The standard output of a process started with it closed (`>&-`), where Python's sys.stdout is None: every
    write fails as a write to a closed descriptor does (EBADF)."""

    def _fail(self, *args):
        raise OSError(errno.EBADF, "it is closed")

    write = writelines = _fail

    def flush(self):   # nothing is ever pending
        pass

    def isatty(self):
        return False

    def fileno(self):
        raise ValueError("standard output is closed")


@contextlib.contextmanager
def checked_stdout():
    """sys.stdout is a CheckedStdout of itself while the block runs (the CLI's commands, from the parsing of their
    options on), then the stream it was again. Where there is none (the process started with it closed, `>&-`), the
    first write raises StdoutFailed, as `ls >&-` says "write error", instead of click dropping every line unsaid."""
    before = sys.stdout
    sys.stdout = before if isinstance(before, CheckedStdout) else CheckedStdout(_Closed() if before is None else before)
    try:
        yield
    finally:
        sys.stdout = before


def stdout_failure(e: StdoutFailed) -> str:
    """The CLI's line for `e`. What the failed stream still holds is then dropped (its descriptor pointed at
    os.devnull), so that Python's flush at exit does not fail again with a traceback of its own."""
    with contextlib.suppress(AttributeError, ValueError, OSError):
        fd = e.stream.fileno()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, fd)
        os.close(null)
    return str(e)


# The word of each signal that stops a command: its line ("terminated; last checkpoint ..."), with exit status 128 + the
# signal's number (signals.py; SIGHUP, a closed terminal or ssh session, where the system has it)
SIGNAL_WORDS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated",
                **({signal.SIGHUP: "hangup"} if hasattr(signal, "SIGHUP") else {})}


class Terminated(Interrupted):
    """SIGTERM (what `kill`, `timeout` and supervisors send) or SIGHUP (the terminal or ssh session closed; an ignored
    SIGHUP, as under `nohup`, stays ignored): signals.signals_as_interrupt turns them into this exception in the main
    thread, unwound like Ctrl-C, so that temporaries are removed and nothing half-written is published. Exit status
    128 + signum: 143 and the word "terminated" for SIGTERM, 129 and "hangup" for SIGHUP."""

    def __init__(self, message: str = "", signum: int = 15):
        super().__init__(message)
        self.signum = signum

    @property
    def word(self) -> str:
        """The signal's word (SIGNAL_WORDS): "terminated" (SIGTERM) or "hangup" (SIGHUP)."""
        return SIGNAL_WORDS[self.signum]


class LimitReached(DdpmError):
    """A resource limit of the process (memory, open files, file size) stopped the work; the message names it.
    where: the API call it stopped ("ddpm.load()"), which the message starts with; `limit` is the message without
    it (the CLI's line)."""

    def __init__(self, message: str, where: str | None = None):
        super().__init__(f"{where}: {message}" if where else message)
        self.limit = message


# The address space the lightest `ddpm` command (--version) needs to start: the interpreter, click and numpy, whose
# OpenBLAS gives each of its threads a buffer and a stack when it loads (one thread per CPU, at most 64, unless
# OPENBLAS_NUM_THREADS/OMP_NUM_THREADS say fewer). Measured with `(ulimit -v N; python -m ddpm.cli --version)` on
# Linux x86-64, Python 3.11, numpy 2 (scipy-openblas 0.3.31): it starts from N = 112000 KiB with one OpenBLAS thread
# and 155000 with two, so about 68 MiB + 42 MiB per thread; 12 MiB of margin on the base. Below this OpenBLAS prints
# its own line and exits, or an import fails halfway with a traceback.
START_BASE = 80 << 20
START_PER_BLAS_THREAD = 42 << 20


def _blas_threads() -> int:
    """The threads OpenBLAS starts when numpy loads: OPENBLAS_NUM_THREADS, GOTO_NUM_THREADS or OMP_NUM_THREADS,
    else one per CPU this process may use, at most 64 (its MAX_THREADS)."""
    for name in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS"):
        try:
            n = int(os.environ.get(name, ""))
        except ValueError:
            continue
        if n >= 1:
            return min(n, 64)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 64))


def start_refusal() -> str | None:
    """The line for an address-space limit (ulimit -v) below what any `ddpm` command needs to start (START_BASE +
    START_PER_BLAS_THREAD per OpenBLAS thread), or None: read as the CLI starts, before numpy is imported."""
    soft = _limit("AS")
    need = START_BASE + START_PER_BLAS_THREAD * _blas_threads()
    if soft is None or soft >= need:
        return None
    return (f"out of memory: the process may use at most {soft >> 20} MiB of address space (ulimit -v "
            f"{soft >> 10}), and ddpm needs about {need >> 20} MiB to start; raise the limit (ulimit -v "
            f"{need >> 10} or more, or unlimited)")


# Importing PyTorch maps its shared libraries (torch/lib: 447 MiB for the 2.13 CPU build) and more: measured, the
# address space grows by 487 MiB (VmSize before and after `import torch`, numpy loaded). Under a limit just short of
# that, libtorch's static initialisers or glibc abort the process in native code (C++'s uncaught std::bad_alloc,
# "cannot allocate memory for thread-local data: ABORT"), which no Python handler sees: so the limit is compared
# before the import. The estimate: the libraries' sizes on disk plus IMPORT_MARGIN.
IMPORT_MARGIN = 64 << 20


def _in_use() -> int | None:
    """The process's address space in use now (VmSize, bytes), or None where /proc does not say (not Linux)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmSize:"):
                    return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        return None
    return None


def _libraries_size(module: str) -> int | None:
    """The bytes of the shared libraries that importing the installed package `module` maps (its folder's and its
    lib/ folder's .so files), or None when it is not installed as a folder."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    folder = os.path.dirname(spec.origin)
    total = 0
    for sub in (folder, os.path.join(folder, "lib")):
        try:
            names = os.listdir(sub)
        except OSError:
            continue
        for name in names:
            if ".so" in name or name.endswith(".dylib"):
                try:
                    total += os.path.getsize(os.path.join(sub, name))
                except OSError:
                    pass
    return total


def import_refusal(module: str, what: str) -> str | None:
    """The line for an address-space limit (ulimit -v) too low to import the installed package `module` (what:
    its name for people, "PyTorch"): the address space in use plus its libraries' size (_libraries_size) plus
    IMPORT_MARGIN above the limit; None when it fits, when there is no limit, when `module` is imported already, or
    where the sizes cannot be read. A refusal before the import, because a native library that fails to
    initialise under the limit aborts the process instead of raising."""
    import sys

    soft = _limit("AS")
    if soft is None or module in sys.modules:
        return None
    used, libs = _in_use(), _libraries_size(module)
    if used is None or not libs:
        return None
    need = used + libs + IMPORT_MARGIN
    if soft >= need:
        return None
    return (f"out of memory: the process may use at most {soft >> 20} MiB of address space (ulimit -v "
            f"{soft >> 10}), {used >> 20} MiB are in use, and importing {what} maps about {(libs + IMPORT_MARGIN) >> 20} "
            f"MiB more; raise the limit (ulimit -v {need >> 10} or more, or unlimited)")


def raise_if_limit(e: BaseException, where: str | None = None) -> None:
    """Raise LimitReached(limit_message(e), where) when a resource limit caused `e` (e.g. an ImportError of a package
    that is installed but whose library cannot be loaded under `ulimit -v`); return otherwise, so that the caller
    reports or re-raises `e`. where: the API call it stopped ("ddpm.load()"), which the message starts with. A
    stopping signal received meanwhile is raised first (signals.raise_if_signalled): `e` may be what a native
    library made of its exception."""
    from .signals import raise_if_signalled

    raise_if_signalled()
    message = limit_message(e)
    if message is not None:
        raise LimitReached(message, where) from None


def interrupted(e: KeyboardInterrupt, detail: str) -> Interrupted:
    """The exception to raise from `except KeyboardInterrupt as e` with `detail` (what the user needs to know, e.g.
    the last checkpoint): Terminated("terminated; detail") when e came from SIGTERM ("hangup; detail" from SIGHUP),
    else Interrupted("interrupted; detail")."""
    made = Terminated(f"{e.word}; {detail}", e.signum) if isinstance(e, Terminated) else \
        Interrupted(f"interrupted; {detail}")
    made.detail = detail   # said once: an enclosing handler (signals.stop_message) passes it on as it is
    return made
