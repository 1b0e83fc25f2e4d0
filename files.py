"""Writing files so that a kill, a full disk or a concurrent run never leaves a half-written one behind.

Every file the package writes goes through `atomic_write` (a temporary file beside the target, fsync, rename over
it); every export folder is built in a temporary folder and published with `publish_dir`. The temporaries are named

    .<target name>.<host>-<pid>.<random>.tmp      (a file, or an export folder being built)
    .<target name>.<host>-<pid>.<random>.old      (an export folder moved aside while its successor is renamed in)

where a target name longer than TEMP_NAME_MAX bytes is shortened to its start and a fixed-length hash of the whole
name (`temp_stem`), so that the temporary of every name the file system allows (NAME_MAX, 255 bytes) fits too

so that `clean_stale`, run by every later write into the same folder, removes exactly the ones whose writer is gone
(same host, process no longer alive) or, for another host, that are older than STALE_AFTER; a writer that is still
running is never disturbed. `check_writable` lets a command refuse an output location before any work.

What a folder output may replace (`claim_dir`, applied by every command that publishes a whole folder: an export
folder, a web page, the export cache): nothing in it that the command did not write is lost. A missing or empty
folder is written; a folder of this kind made from the same source (the same weights) is replaced with everything
the command did not write carried over into its successor (`carry_over`); one made from another source is replaced
only when it holds nothing but what the command writes; any other non-empty folder is refused. Each kind of folder
(`FolderKind`) names the file that marks it and the names its command writes.

What an output may replace (`output_path`, applied by every writer here): a file output replaces only a regular file,
a folder output only a folder. Anything else at the path (a device such as /dev/null, a pipe, a socket, a folder where
a file is wanted, a file where a folder is wanted, a dangling or looping symbolic link) is refused with OutputError
before anything is created. A symbolic link to a regular file (or, for a folder output, to a folder) is written
through: the link's target is replaced atomically (its temporary is made beside the target, on its file system) and
the link itself stays as it is.

Fault injection (a test hook, not for users; read once at import, nothing is done when it is unset or empty, and a
malformed value is ignored with one warning line on stderr): DDPM_FAULT=POINT:N[:SIGNAL]
sends SIGNAL (KILL, TERM, INT or HUP; default KILL) to this process at the N-th (1-based) atomic write of the process,
counting `atomic_write` files and `publish_dir` folders together, so that a test can end a command at a chosen
moment instead of at a moment chosen by a clock:

    write:N     inside the N-th write: its temporary is cut (a file to the first half of its bytes, a folder to the
                first half of its entries, by name) and the signal is sent before it is published
    publish:N   at the N-th publish: the temporary is complete and the signal is sent just before the rename that
                makes it visible (for a folder that replaces another, after the old one is moved aside)

SIGKILL leaves what such a kill leaves (the target as it was, a temporary for the next writer to clean); TERM and
INT run the command's handlers (the CLI's exit status 143 or 130, the training's message).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .errors import DdpmError, brief, limit_message

STALE_AFTER = 300.0          # seconds: a temporary of another host (or an untagged one) older than this is stale
HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
_TAGGED = re.compile(r"^\.(?P<name>.+)\.(?P<host>[0-9a-f]{6})-(?P<pid>\d+)\.[A-Za-z0-9_]+\.(?P<kind>tmp|old)$")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class OutputError(DdpmError):
    """An output location that cannot be written (read-only, a file where a folder is needed, a full disk).

    fault: the message without how to go on (`then`, " and run again" for a full disk or the file-size limit), for a
    caller that says itself how to go on (a training run: continue with --resume)."""

    def __init__(self, fault: str, then: str = ""):
        super().__init__(fault + then)
        self.fault = fault


class NoWorkingFolder(DdpmError):
    """The process's working folder was deleted (a shell left in a removed folder): a relative path, or an output's
    default name, means nothing there, and PyTorch cannot even be imported."""

    def __init__(self):
        super().__init__("the working folder no longer exists; cd to a folder that does")


def check_working_folder() -> None:
    """Return when the working folder exists; NoWorkingFolder otherwise (the CLI checks this as it starts)."""
    try:
        os.getcwd()
    except FileNotFoundError:
        raise NoWorkingFolder() from None


def hold_standard_descriptors() -> None:
    """Open os.devnull on each of the descriptors 0, 1 and 2 that is closed (a process started with `>&-` or
    `2>&-`), so that no file this process opens gets one of those numbers: a library that prints to standard output
    (C code writes to descriptor 1 whatever Python's sys.stdout is) would write into that file. The CLI calls this as
    it starts; what it prints to a closed standard output still fails (errors.checked_stdout). A closed standard
    error (Python's sys.stderr is then None, and every progress bar and error line would raise) becomes a stream
    on that os.devnull: what is written to it is dropped, as a shell's `2>/dev/null` drops it, and the command runs
    to its end."""
    import sys

    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)   # the lowest free number: `fd` itself when the lower ones are open
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False, errors="backslashreplace")


def absolute(path: str | os.PathLike) -> Path:
    """Path(path).absolute(): a relative `path` joined to the working folder, `..` and symbolic links kept as given
    (ddpm.load() binds its files this way); NoWorkingFolder for a relative path when the working folder was deleted."""
    try:
        return Path(path).absolute()
    except FileNotFoundError:   # os.getcwd()
        raise NoWorkingFolder() from None


def real_path(path: str | os.PathLike, links: bool = True) -> str:
    """os.path.realpath(path) (links=False: os.path.abspath, symbolic links kept); NoWorkingFolder for a relative
    path when the working folder was deleted."""
    try:
        return os.path.realpath(path) if links else os.path.abspath(path)
    except FileNotFoundError:   # os.getcwd(): realpath itself tolerates missing components
        raise NoWorkingFolder() from None


def _parse_fault(spec: str | None) -> tuple[str, int, int] | None:
    """DDPM_FAULT (see the module docstring) as (point, n, signal number); None when unset or empty, and None with
    one warning line on stderr when malformed: a stray value in a user's environment must not stop every command."""
    if not spec:
        return None
    m = re.fullmatch(r"(write|publish):([1-9][0-9]*)(?::(KILL|TERM|INT|HUP))?", spec.strip())
    if m is None:
        print(f"ddpm: warning: ignoring DDPM_FAULT={brief(spec, 60)} (a test hook that ends the process at an "
              f"atomic write; expected write:N or publish:N, optionally followed by :KILL, :TERM, :INT or :HUP)",
              file=sys.stderr)
        return None
    return m[1], int(m[2]), getattr(signal, f"SIG{m[3] or 'KILL'}")


_FAULT = _parse_fault(os.environ.get("DDPM_FAULT"))
_writes = [0]   # atomic writes (files and folders) begun in this process, counted only while _FAULT is set


def _fault_at(point: str, tmp: Path) -> None:
    """The DDPM_FAULT hook: called with point "write" once the content of a write is in `tmp`, and with "publish"
    just before its rename; sends the signal when this is the write and the point DDPM_FAULT names."""
    want, n, sig = _FAULT
    if point == "write":
        _writes[0] += 1
    if point != want or _writes[0] != n:
        return
    if point == "write":
        if tmp.is_dir():
            for entry in sorted(tmp.iterdir())[len(list(tmp.iterdir())) // 2:]:
                _remove(entry)
        else:
            os.truncate(tmp, tmp.stat().st_size // 2)
    os.kill(os.getpid(), sig)


def is_temporary(name: str) -> bool:
    """Whether a file or folder name is one of the tagged temporaries of a write (see the module docstring)."""
    return _TAGGED.match(name) is not None


# bytes of a target's name kept whole in its temporaries' names: the rest of such a name (the tag, the random part and
# the suffix) takes at most 29 bytes, so a longer name is shortened to fit NAME_MAX (255 bytes)
TEMP_NAME_MAX = 200
_SHORTENED = re.compile(r"~[0-9a-f]{32}$")   # how temp_stem ends a shortened name


def temp_stem(name: str) -> str:
    """The part of the temporaries' names that stands for the target `name`: the name itself up to TEMP_NAME_MAX
    bytes, else its first characters up to 160 bytes, "~" and 32 hex digits of the SHA-256 of the whole name (one
    target, one stem; the names of other targets do not collide)."""
    raw = os.fsencode(name)
    if len(raw) <= TEMP_NAME_MAX:
        return name
    start = name
    while len(os.fsencode(start)) > 160:
        start = start[:-1]
    return f"{start}~{hashlib.sha256(raw).hexdigest()[:32]}"


def _tag() -> str:
    return f"{HOST}-{os.getpid()}"


def _prefix(name: str) -> str:
    """The start of every temporary's name for the target `name`, up to its random part: `.<stem>.<host>-<pid>.`
    (the module docstring's forms, parsed back by _TAGGED)."""
    return f".{temp_stem(name)}.{_tag()}."


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (signal 0 checks without signalling; on Windows os.kill would terminate it, so
    there every writer counts as alive and only age makes a temporary stale)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # exists, owned by someone else
        return True
    return True


def _stale(entry: Path, host: str | None, pid: int | None) -> bool:
    try:
        age = time.time() - entry.lstat().st_mtime
    except OSError:
        return False
    if host == HOST and pid is not None and age < 86400:   # a day: after that a reused pid does not keep it
        return pid != os.getpid() and not _alive(pid)
    return age > STALE_AFTER


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def clean_stale(folder: str | os.PathLike, name: str | None = None, only: bool = True) -> list[Path]:
    """Remove the temporaries of killed writes in `folder` (see the module docstring); returns what was removed.

    name: those of this target (e.g. "ckpt.pt"), and the untagged `.NAME.xxxxxxxx[.tmp]` of older versions (by age
    alone); with only=False also every other tagged temporary in the folder (what a write into the folder does).
    None: every tagged temporary in the folder. An `.old` export folder whose writer died between its two renames is
    moved back when its target is missing, instead of being deleted.
    """
    folder = Path(folder)
    legacy = re.compile(rf"^\.{re.escape(name)}\.[a-z0-9_]{{8}}(\.tmp)?$") if name else None
    stem = temp_stem(name) if name else None
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        if not e.name.startswith("."):
            continue
        m = _TAGGED.match(e.name)
        path = Path(e.path)
        if m and (name is None or not only or m["name"] == stem):
            if not _stale(path, m["host"], int(m["pid"])):
                continue
            # the target of a shortened stem is known only when it is this name's
            target = folder / (name if m["name"] == stem else m["name"])
            if m["kind"] == "old" and not target.exists():
                if m["name"] != stem and _SHORTENED.search(m["name"]):
                    continue   # an aside of another, long name: left for a write of that name to move back
                try:
                    os.rename(path, target)
                    continue
                except OSError:
                    pass
            _remove(path)
            removed.append(path)
        elif legacy is not None and legacy.match(e.name) and _stale(path, None, None):
            _remove(path)
            removed.append(path)
    return removed


def has_aside(path: str | os.PathLike) -> bool:
    """Whether a folder that a killed publish_dir moved aside for the target `path` (`.NAME.<host>-<pid>.<random>.old`,
    see the module docstring) lies beside it: a reader puts it back (clean_stale), so the path counts as there."""
    path = Path(path)
    stem = temp_stem(path.name)
    try:
        names = os.listdir(path.parent)
    except OSError:
        return False
    return any((m := _TAGGED.match(name)) is not None and m["kind"] == "old" and m["name"] == stem for name in names)


def disk_full(e: BaseException, folder: Path) -> bool:
    """Was the failure of a write into `folder` a full disk? Libraries that write through C (torch.save's zip
    writer) lose errno and raise a RuntimeError, so a device with less than 1 MiB left counts too."""
    for err in (e, e.__cause__, e.__context__):
        if isinstance(err, OSError) and err.errno in _DISK_FULL:
            return True
    if isinstance(e, (KeyboardInterrupt, DdpmError)):
        return False
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def too_large(path: Path) -> OutputError:
    """A write of `path` that failed with EFBIG: the file-size limit (ulimit -f, RLIMIT_FSIZE) or the file system's
    largest file."""
    from .errors import _limit

    soft = _limit("FSIZE")
    limit = f" of {soft} bytes (ulimit -f {soft >> 10})" if soft is not None else ""
    return OutputError(f"{path} was not written: it would be larger than the file-size limit{limit} (an earlier "
                       f"{path.name}, if any, is kept); raise the limit (ulimit -f unlimited)", " and run again")


def no_space(path: Path) -> OutputError:
    return OutputError(f"no space left on the device of {path.parent}: {path.name} was not written (an earlier "
                       f"{path.name}, if any, is kept); free some space", " and run again")


def write_failure(path: Path, e: OSError) -> OutputError:
    """The OutputError (one line naming `path`) of a write into `path` that failed with `e`, for a writer that
    appends or writes in place rather than through atomic_write: a full disk (no_space), a file larger than the
    file-size limit (too_large), else "cannot write PATH: REASON". Other limits of the process (too many open
    files) are raised as they are, for errors.limit_message to name."""
    if disk_full(e, path.parent):
        return no_space(path)
    if e.errno == errno.EFBIG:
        return too_large(path)
    if limit_message(e) is not None:
        raise e
    return _output_error(path, e)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _output_error(path: Path, e: OSError) -> OutputError:
    return OutputError(f"cannot write {path}: {e.strerror or e}")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISREG, "a file"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def output_path(path: str | os.PathLike, folder: bool = False) -> Path:
    """The path a writer replaces for the output `path` (a file, or a folder when folder=True); see the module
    docstring.

    Returns `path` itself when it is missing or of the right kind; for a symbolic link to a regular file (a folder
    when folder=True), the link's target (os.path.realpath), so that the target is replaced and the link is kept.
    Raises OutputError (one line naming the path and what it is) for anything else that exists there: a device, a
    pipe, a socket, a folder for a file (or a file for a folder), a dangling or looping link. A path whose parent is
    not a folder is returned as it is: creating it fails, and says so."""
    p = Path(path)
    link = os.path.islink(p)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        if link:
            raise OutputError(f"cannot write {p}: it is a symbolic link to {os.readlink(p)}, which does not exist; "
                              f"remove the link or give another name") from None
        return p
    except NotADirectoryError:
        return p
    except OSError as e:   # a link loop, a folder that cannot be searched
        raise _output_error(p, e) from None
    ok = stat.S_ISDIR(st.st_mode) if folder else stat.S_ISREG(st.st_mode)
    if not ok:
        via = f" (a symbolic link to {os.readlink(p)})" if link else ""
        if folder:
            raise OutputError(f"cannot write into {p}{via}: it is {_kind(st.st_mode)}, not a folder")
        raise OutputError(f"cannot write {p}{via}: it is {_kind(st.st_mode)}, not a regular file; give a file name")
    if not link:
        return p
    real = real_path(p)
    try:
        same = os.path.samestat(os.stat(real), st)
    except OSError:
        same = False
    if not same:   # e.g. a link into /proc/PID/fd/ to a deleted file: its target has no name to replace
        raise OutputError(f"cannot write {p}: it is a symbolic link to {os.readlink(p)}, a file that has no name of "
                          f"its own to be replaced; remove the link or give another name")
    return Path(real)


def refused(path: str | os.PathLike) -> str | None:
    """"PATH cannot be used (REASON)" when the OS will not look at `path` (os.lstat fails for a reason other than
    nothing being there): a name longer than its file system allows (ENAMETOOLONG), a folder on the way that cannot
    be searched (EACCES), an I/O error. None when it can be looked at, whether or not something is there, and for a
    loop of symbolic links, which the callers name as such. pathlib's is_dir/exists raise those errors, os.path's
    hide them: a path the project looks at is asked here first, so that they come out as one line."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None
        return f"{path} cannot be used ({e.strerror or e})"
    except ValueError as e:   # an embedded NUL byte
        return f"{path} cannot be used ({e})"
    return None


def input_path(path: str | os.PathLike, error: type[DdpmError], hint: str = "", name: str | None = None) -> Path:
    """`path` as a file to read: a regular file, or a symbolic link to one, that this process can open. Anything
    else raises error(one line) that says what is there, e.g. "EXPORT/export.json is a folder, not a file; re-run
    `ddpm export`": a missing file ("does not exist"), a dangling or looping link, a folder, a pipe (FIFO), a device
    or a socket ("is a pipe, not a file"), a file that cannot be opened ("cannot be read (Permission denied)").

    Never blocks and never opens anything but a regular file: what is at the path is looked at (os.stat) before it
    is opened, and opened without waiting (O_NONBLOCK) and looked at again, so that a pipe put there in between
    cannot hold a reader up either. hint: what to do, appended to the message ("; re-run `ddpm export`"); name:
    how the message calls the file (default: the path)."""
    p = Path(path)
    said = name or str(p)

    def refuse(problem: str):
        raise error(f"{said} {problem}{hint}") from None

    try:
        st = os.stat(p)
    except FileNotFoundError:
        if os.path.islink(p):
            refuse(f"is a symbolic link to {os.readlink(p)}, which does not exist")
        refuse("does not exist")
    except NotADirectoryError:
        refuse("does not exist (a folder on its path is a file)")
    except OSError as e:   # a link loop, a folder that cannot be searched
        refuse(f"cannot be read ({e.strerror or e})")
    if stat.S_ISREG(st.st_mode):
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
        except OSError as e:
            if limit_message(e) is not None:   # too many open files: a limit of the process, named as such
                raise
            refuse(f"cannot be read ({e.strerror or e})")
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        if os.path.islink(p):
            refuse(f"is a symbolic link to {os.readlink(p)}, which is {_kind(st.st_mode)}, not a file")
        refuse(f"is {_kind(st.st_mode)}, not a file")
    return p


# The first bytes of files that a user may hand to a command expecting another kind (a picture or MNIST's .gz as a
# checkpoint): named in the refusal, instead of the reader's words about bytes it cannot parse
SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "a PNG picture"), (b"\xff\xd8\xff", "a JPEG picture"), (b"GIF8", "a GIF picture"),
              (b"\x1f\x8b", "a gzip file"), (b"%PDF", "a PDF document"), (b"\x93NUMPY", "a numpy .npy array"))


def file_kind(path: str | os.PathLike) -> str | None:
    """What the file at `path` is by its first bytes (SIGNATURES: "a PNG picture"; a zip archive whose first member
    is a .npy array: "a numpy .npz archive"), or None when it is none of those or cannot be read (the caller's reader
    then says what it finds)."""
    try:
        with open(path, "rb") as f:
            head = f.read(30 + 256)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04") and len(head) >= 30:   # a zip's first local header: its name at 30
        size = int.from_bytes(head[26:28], "little")
        if head[30:30 + size].endswith(b".npy"):
            return "a numpy .npz archive"
    return next((what for magic, what in SIGNATURES if head.startswith(magic)), None)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it over `path`: readers see the old file or
    the complete new one, never a part, whatever happens (kill -9, Ctrl-C, an exception, a full disk).

    The parent folder is created if missing; stale temporaries of `path` left by killed writers are removed first.
    `path` may be missing, a regular file or a symbolic link to one (its target is replaced, the link kept); anything
    else is refused before anything is created (output_path). The new file keeps the permission bits of the file it
    replaces (as `sed -i` and editors do: a private 600 file stays private), else gets 666 less the umask. Raises
    OutputError (one line) for such a path, a folder that is not writable, a full disk or a file larger than the
    file-size limit; the old file is then kept. (A read-only file is refused before any work by check_writable,
    which the commands call on their outputs; here it is replaced as `mv` replaces it, its mode kept.)
    """
    path = output_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(path.parent, path.name, only=False)
        mode = _mode_of(path)
        fd, tmp = tempfile.mkstemp(prefix=_prefix(path.name), suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _output_error(path, e) from None
    os.close(fd)
    try:
        write(tmp)
        if _FAULT is not None:
            _fault_at("write", Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)   # mkstemp creates 0600; after the fsync, which opens it for writing
        if _FAULT is not None:
            _fault_at("publish", Path(tmp))
        os.replace(tmp, path)
    except BaseException as e:
        try:   # told before the removal frees the space; whatever fails in the telling, the temporary goes
            full = disk_full(e, path.parent)
        finally:
            Path(tmp).unlink(missing_ok=True)
        if full:
            raise no_space(path) from None
        if isinstance(e, OSError) and e.errno in _NOT_WRITABLE:
            raise _output_error(path, e) from None
        if isinstance(e, OSError) and e.errno == errno.EFBIG:
            raise too_large(path) from None
        raise
    _fsync_dir(path.parent)


def _mode_of(path: Path) -> int:
    """The permission bits of the regular file at `path`, else 666 less the umask (a new file's)."""
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode) & 0o777
    except FileNotFoundError:
        pass
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_text(path: str | os.PathLike, text: str) -> None:
    """atomic_write of a text file (UTF-8)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def temp_dir(out: str | os.PathLike) -> Path:
    """A new empty folder beside `out` in which to build it (published with publish_dir); stale ones of `out` are
    removed first. `out` may be missing, a folder or a symbolic link to one (the folder is made beside the link's
    target); anything else raises OutputError (output_path)."""
    out = output_path(out, folder=True)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out.parent, out.name, only=False)
        tmp = Path(tempfile.mkdtemp(prefix=_prefix(out.name), suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise _output_error(out, e) from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)   # mkdtemp makes it 0700
    return tmp


@contextmanager
def building_dir(out: str | os.PathLike) -> Iterator[Path]:
    """The empty folder (temp_dir) in which a folder output `out` is built and from which the caller publishes it
    (publish_dir, publish_owned); removed when the block fails, and a failure from a full disk raised as
    OutputError (no_space) naming `out`. What `out` held stays as it was."""
    out = Path(out)
    tmp = temp_dir(out)
    try:
        yield tmp
    except BaseException as e:
        try:   # told before the removal frees the space; whatever fails in the telling, the folder goes
            full = disk_full(e, out.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise no_space(out) from None
        raise


def publish_dir(tmp: Path, out: str | os.PathLike, keep: Callable[[Path], bool] | None = None) -> bool:
    """Rename the complete folder `tmp` to `out`. An existing `out` is moved aside only now, the new one renamed in,
    then the old one deleted: at every moment `out` is the old folder, the new one, or (between two renames) absent
    with the old one recoverable by clean_stale. keep(out) True: an existing `out` is as good (another process
    published the same thing first), so it stays and tmp is discarded. Returns whether tmp was published.

    An `out` that is a symbolic link to a folder is kept: its target is the folder replaced (tmp must have been made
    by temp_dir(out), on the target's file system). Anything else but a folder at `out` raises OutputError."""
    out = output_path(out, folder=True)
    if _FAULT is not None:
        _fault_at("write", tmp)
    if not out.exists():
        try:
            if _FAULT is not None:
                _fault_at("publish", tmp)
            os.rename(tmp, out)
            _fsync_dir(out.parent)
            return True
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    if keep is not None and keep(out):
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    aside = out.parent / f"{_prefix(out.name)}{secrets.token_hex(4)}.old"
    os.rename(out, aside)
    try:
        if _FAULT is not None:
            _fault_at("publish", tmp)
        os.rename(tmp, out)
    except BaseException:
        os.rename(aside, out)
        raise
    _fsync_dir(out.parent)
    shutil.rmtree(aside, ignore_errors=True)
    return True


@dataclass(frozen=True)
class FolderKind:
    """A folder that one command writes whole and publishes (publish_owned): what `claim_dir` needs to tell its own
    files from a user's, and to say so in one line."""

    what: str            # what such a folder is, as a message says it: "an export folder"
    marker: str          # the file that makes a folder one of these: "export.json"
    other: str           # what a folder of another source holds, as a message says it: "files of other weights"
    option: str          # the option that names the folder: "--out"
    written: re.Pattern  # the names the command writes besides the marker, a folder's with a trailing "/"
    error: type = OutputError   # the DdpmError subclass its refusals raise

    def refuse(self, message: str) -> DdpmError:
        return self.error(message)

    def owns(self, name: str) -> bool:
        """Whether `name` (relative to the folder, "/"-separated; a folder's with a trailing "/") is one of the
        folder's own files: its marker, or a name its command writes (`written`). The temporaries of writes are
        not names (files.is_temporary)."""
        return name.rstrip("/") == self.marker or self.written.match(name) is not None


def not_written(folder: Path, kind: FolderKind) -> list[str]:
    """The names in `folder` that the command of `kind` does not write (a user's files and folders), sorted; the
    marker and the temporaries of writes (is_temporary) are the command's."""
    def own(e: os.DirEntry) -> bool:
        name = e.name + ("/" if e.is_dir(follow_symlinks=False) else "")
        return is_temporary(e.name) or kind.owns(name)

    return sorted(e.name for e in os.scandir(folder) if not own(e))


def claim_dir(out: str | os.PathLike, kind: FolderKind, same: Callable[[Path], bool | None]) -> bool:
    """Whether the folder output `out` may be replaced, by the rule of the module docstring; called before any work
    and again when publishing (publish_owned). Returns True when `out` holds a folder of `kind` from the same source,
    whose entries the new folder lacks are to be carried over (carry_over); False when there is nothing to keep.

    same(folder): True when the folder is of `kind` and made from the same source, False when it is of `kind` from
    another source, None when it is not of `kind` (no marker, or a marker that the command did not write). Raises
    kind.error (OutputError by default; one line naming the folder and what to do) for a non-empty folder that is
    not of `kind`, or one of another source that holds files the command did not write; OutputError for a path that
    is not a folder (output_path)."""
    out = output_path(out, folder=True)
    try:
        entries = [e.name for e in os.scandir(out) if not is_temporary(e.name)]
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        raise _output_error(out, e) from None
    if not entries:
        return False
    verdict = same(out)
    if verdict is None:
        why = f"its {kind.marker} was not written by ddpm" if os.path.lexists(out / kind.marker) else \
            f"no {kind.marker}"
        raise kind.refuse(f"{out} is a folder but not {kind.what} ({why}), and writing {kind.option} replaces what "
                          f"is there: give another {kind.option}, or remove it")
    if verdict:
        return True
    foreign = not_written(out, kind)
    if foreign:   # what the folder holds would be replaced: only the command's own files of another source may be
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise kind.refuse(f"{out} holds {kind.other} and files ddpm did not write ({shown}); choose another "
                          f"{kind.option} or empty it")
    return False


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:   # another file system, or links not allowed there
        shutil.copy2(src, dst)


def carry_over(old: Path, tmp: Path, kind: FolderKind, drop: Callable[[os.DirEntry], bool] | None = None) -> None:
    """Put into tmp everything of the folder `old` that tmp does not have yet (files as hard links where possible,
    else copies; folders as trees of those; symbolic links as links), except the marker (tmp's is written afresh,
    and writing through a hard link would change the old folder's in place), the temporaries of writes and the
    entries drop(entry) is true for (what the new folder no longer holds, by the writer's own rule): publishing tmp
    must not lose what the folder held. Raises kind.error on a special file (a pipe, a socket, a device), which
    cannot be carried over."""
    for e in os.scandir(old):
        src, dst = Path(e.path), tmp / e.name
        if e.name == kind.marker or is_temporary(e.name) or os.path.lexists(dst) or (drop is not None and drop(e)):
            continue
        if e.is_symlink():
            os.symlink(os.readlink(src), dst)
        elif e.is_dir():
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        elif e.is_file():
            _link_or_copy(src, dst)
        else:
            raise kind.refuse(f"{src} is not a file or folder, and writing {kind.option} replaces {old}: move it "
                              f"elsewhere")


def keep_modes(old: Path, tmp: Path) -> None:
    """Give each regular file in tmp (its subfolders included) the permission bits of the regular file it replaces,
    the one at the same place in the folder `old`, as atomic_write does for one file: a private 600 file stays
    private. Files without a counterpart keep theirs, and so do symbolic links and hard links (a file with more than
    one name is another's: the export cache links the shipped files, an export the models it keeps)."""
    for folder, _, names in os.walk(tmp):
        rel = Path(folder).relative_to(tmp)
        for name in names:
            try:
                st, new = os.lstat(old / rel / name), os.lstat(Path(folder) / name)
                if stat.S_ISREG(st.st_mode) and stat.S_ISREG(new.st_mode) and new.st_nlink == 1:
                    os.chmod(Path(folder) / name, stat.S_IMODE(st.st_mode) & 0o777)
            except (FileNotFoundError, NotADirectoryError):
                continue


def publish_owned(tmp: Path, out: str | os.PathLike, kind: FolderKind, same: Callable[[Path], bool | None],
                  keep: Callable[[Path], bool] | None = None,
                  drop: Callable[[os.DirEntry], bool] | None = None) -> bool:
    """publish_dir for a folder output of `kind`: `out` is claimed again (claim_dir: it may have changed while tmp
    was built), each file of tmp gets the permission bits of the file it replaces in `out` (keep_modes), what `out`
    holds that tmp lacks is carried over when it is of the same source (carry_over; except what drop names), then
    tmp is renamed in. keep, the return value and the errors: as publish_dir's and claim_dir's."""
    carry = claim_dir(out, kind, same)
    old = output_path(out, folder=True)
    if old.is_dir():
        keep_modes(old, tmp)
    if carry:
        carry_over(old, tmp, kind, drop)
    return publish_dir(tmp, out, keep)


@contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (created if missing) while one writer works in it, e.g. a training run.

    flock on the folder itself: no lock file is made, and the lock dies with its process (kill -9 included). Raises
    OutputError when another process holds it. Where folders cannot be locked (no fcntl, some network file
    systems), nothing is held."""
    folder = Path(folder)
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
    except OSError as e:
        raise _output_error(folder, e) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"{folder} is in use by another {what}; wait for it to end, or use another "
                              f"folder") from None
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


@contextmanager
def readable_name(path: str | os.PathLike) -> Iterator[str]:
    """A name of the file `path` for a library that passes file names to C++ or Rust as UTF-8 (safetensors,
    onnxruntime, the onnx checker), which cannot open a path the OS holds as other bytes (a folder named in
    Latin-1, say; Python keeps such bytes as surrogate escapes).

    Yields str(path) when it is valid UTF-8; else the file is opened here and its descriptor's name (/dev/fd/N) is
    yielded while it stays open. Raises OSError when such a file cannot be opened."""
    name = os.fspath(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        yield name
        return
    fd = os.open(name, os.O_RDONLY)
    try:
        alias = f"/dev/fd/{fd}"
        yield alias if os.path.exists(alias) else name
    finally:
        os.close(fd)


def check_writable(path: str | os.PathLike, folder: bool = False) -> None:
    """Raise OutputError unless `path` (a file, or a folder when folder=True) can be written: its folder, or the
    nearest existing one above it (missing folders are created when written), must be a folder we can create files
    in (probed with an anonymous temporary file, so read-only file systems and ACLs count), and what is at `path` must
    be what the writer may replace (output_path: not a device, a pipe, a dangling link, ...), and a file not read-only
    (no write bit: its owner protected it; refused rather than replaced). Nothing is left behind."""
    p = d = Path(path)
    try:
        target = output_path(p, folder)
        mode = os.stat(target).st_mode if not folder and os.path.lexists(target) else None
        if mode is not None and not mode & 0o222:   # a file its owner made read-only: nothing of the user's lost
            raise OutputError(f"cannot write {p}: it is read-only (mode {stat.S_IMODE(mode):o}); make it writable "
                              f"(chmod u+w) to replace it, or give another path")
        d = target if folder else target.parent
        while not d.exists() and d != d.parent:
            d = d.parent
        if not d.is_dir():
            raise OutputError(f"cannot write {p}: {d} is a file, not a folder")
        with tempfile.TemporaryFile(dir=d):
            pass
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(f"cannot write {p}: cannot create files in {d} ({e.strerror or e})") from None
