"""Where the package keeps what it fetches or makes for later use, by one rule (the XDG base directory spec).

    cache   $XDG_CACHE_HOME/ddpm, else ~/.cache/ddpm: MNIST (mnist/), exports of checkpoints (exports/), the
            onnxruntime-web tarball (npm/)
    config  $XDG_CONFIG_HOME/ddpm, else ~/.config/ddpm: a retrained classifier (`ddpm eval --train-classifier`)

As the spec says, an XDG variable that is unset, empty or not an absolute path is ignored (a relative one would put
the files under whatever folder a command happens to run in). The home folder is then $HOME; when HOME is unset, the
user's entry in the password database (as the shell and Python's Path.home do). A HOME that is set but empty or
relative is refused in one line when the folder is needed: whoever set it meant the files to go somewhere, and
neither the working folder nor the password database's home is where they asked (`HOME= cmd` keeps a program out of
the real home; `HOME=. cmd` puts its files in the working folder). Any path the OS can name works, UTF-8 or not: environment values are kept
as the OS gives them (Python's surrogate escapes) and never re-encoded here.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .errors import DdpmError, brief
from .files import refused

_XDG = {"cache": ("XDG_CACHE_HOME", ".cache"), "config": ("XDG_CONFIG_HOME", ".config")}


def home(instead: str = "$XDG_CACHE_HOME", state: str = "unset") -> Path:
    """The user's home folder: $HOME, or the password database's entry when HOME is unset. Raises DdpmError (one
    line naming `instead`, the variable that would make the home unneeded, and its `state`: "unset", "empty",
    "not an absolute path (x)") when HOME is set but empty or not an absolute path (module docstring), or when
    nothing gives an absolute path."""
    value = os.environ.get("HOME")
    if value is not None:
        if os.path.isabs(value):
            return Path(value)
        what = "empty" if not value else f"not an absolute path ({brief(value)})"
        raise DdpmError(f"$HOME is {what}, and ddpm's folders are under it while {instead} is {state}: set {instead} "
                        f"or $HOME to an absolute folder")
    try:
        import pwd

        value = pwd.getpwuid(os.getuid()).pw_dir
    except (ImportError, KeyError, AttributeError):
        value = ""
    if not os.path.isabs(value):
        try:   # Windows: USERPROFILE and friends
            value = str(Path.home())
        except RuntimeError:
            value = ""
    if not os.path.isabs(value):
        raise DdpmError(f"cannot tell where the home folder is ($HOME is unset, and the system names none; {instead} "
                        f"is {state}): set {instead} or $HOME to an absolute folder")
    return Path(value)


def user_dir(kind: str = "cache") -> Path:
    """The package's folder of this kind ("cache" or "config"; module docstring), not created here. Raises
    DdpmError when the home folder is needed and cannot be told (home()), or when the OS will not look at the folder
    (files.refused: a name longer than its file system allows, say)."""
    var, default = _XDG[kind]
    value = os.environ.get(var)
    if value is not None and os.path.isabs(value):
        base = Path(value)
    else:
        state = "unset" if value is None else "empty" if not value else f"not an absolute path ({brief(value)})"
        base = home(f"${var}", state) / default
    why = refused(base / "ddpm")
    if why is not None:
        raise DdpmError(f"the {kind} folder {why}; set ${var} to another folder")
    return base / "ddpm"


def cache_dir(*parts: str) -> Path:
    """user_dir("cache") joined with `parts`, e.g. cache_dir("mnist")."""
    return user_dir("cache").joinpath(*parts)


def in_the_way(folder: str | os.PathLike) -> str | None:
    """What keeps `folder` from being a folder that can be made or used, found on its path (the nearest part that
    exists): "X is a symbolic link to T, which does not exist", "X is a loop of symbolic links", "X is not a folder",
    "X cannot be searched (Permission denied)", "X cannot be used (File name too long)" (files.refused); None when
    that part is a folder (what is missing below it can be created). For one line that says the truth where creating
    the folder would fail with "File exists"."""
    for part in (Path(folder), *Path(folder).parents):
        why = refused(part)   # a name too long for its file system, a folder on the way that cannot be searched
        if why is not None:
            return why
        if not os.path.lexists(part):
            continue
        try:
            st = os.stat(part)
        except FileNotFoundError:
            return f"{part} is a symbolic link to {os.readlink(part)}, which does not exist"
        except OSError as e:
            if e.errno == errno.ELOOP:
                return f"{part} is a loop of symbolic links"
            return f"{part} cannot be searched ({e.strerror or e})"
        return None if stat.S_ISDIR(st.st_mode) else f"{part} is not a folder"
    return None
