"""Folder outputs (an export folder, the page of `ddpm export --web`, the export cache) follow one rule
(files.claim_dir): nothing in them that ddpm did not write is lost, and a folder that is not theirs is refused in one
line before any work; no folder output may contain an input of its command (cli_options.refuse_same_path)."""

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import click
import pytest

from ddpm.cli_options import refuse_same_path
from ddpm.export import web
from ddpm.export.cache import EXPORT_FOLDER, shipped_dir
from ddpm.export.web import WebExportError, write_page
from ddpm.files import FolderKind, OutputError, claim_dir, publish_owned, temp_dir
from ddpm.runtime.bundle import Bundle
from helpers import invoke, tiny_checkpoint

KIND = FolderKind("a test folder", "mark.json", "a test folder of another source", "--out",
                  re.compile(r"^(a\.bin|sub/)$"))


def _users_things(folder: Path) -> list[str]:
    (folder / "notes.txt").write_text("mine")
    (folder / "mydir").mkdir()
    (folder / "mydir" / "f").write_text("x")
    (folder / ".keep").write_text("")
    (folder / "pointer").symlink_to("notes.txt")
    return [".keep", "mydir", "notes.txt", "pointer"]


def _kept(folder: Path) -> bool:
    return ((folder / "notes.txt").read_text() == "mine" and (folder / "mydir" / "f").read_text() == "x"
            and (folder / ".keep").is_file() and os.readlink(folder / "pointer") == "notes.txt")


# ------------------------------------------------------------------------------------------------ the rule itself
def test_claim_dir_keeps_or_refuses_what_the_command_did_not_write(tmp_path):
    def same(source):
        return lambda folder: None if not (folder / "mark.json").is_file() else \
            (folder / "mark.json").read_text() == source

    out = tmp_path / "out"
    assert claim_dir(out, KIND, same("A")) is False                   # missing
    out.mkdir()
    (out / f".out.{'0' * 6}-1.abcd.tmp").mkdir()                        # a temporary of a write is not content
    assert claim_dir(out, KIND, same("A")) is False                   # empty
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match=re.escape(f"{out} is a folder but not a test folder (no mark.json), and "
                                                    f"writing --out replaces what is there: give another --out")):
        claim_dir(out, KIND, same("A"))
    (out / "mark.json").mkdir()
    with pytest.raises(OutputError, match="its mark.json was not written by ddpm"):
        claim_dir(out, KIND, same("A"))
    (out / "mark.json").rmdir()
    (out / "mark.json").write_text("A")
    (out / "a.bin").write_text("old")
    (out / "sub").mkdir()
    assert claim_dir(out, KIND, same("A")) is True                    # same source: its other files carried over
    with pytest.raises(OutputError, match=re.escape(f"{out} holds a test folder of another source and files ddpm "
                                                    f"did not write (thesis.tex); choose another --out or empty it")):
        claim_dir(out, KIND, same("B"))
    (out / "thesis.tex").unlink()
    assert claim_dir(out, KIND, same("B")) is False                   # only the command's own files: replaced

    (out / "thesis.tex").write_text("years of work")
    new = temp_dir(out)
    (new / "mark.json").write_text("A")
    (new / "a.bin").write_text("new")
    assert publish_owned(new, out, KIND, same("A"))
    assert sorted(p.name for p in out.iterdir()) == ["a.bin", "mark.json", "sub", "thesis.tex"]
    assert (out / "a.bin").read_text() == "new" and (out / "thesis.tex").read_text() == "years of work"


def test_the_export_cache_never_replaces_a_users_files(tmp_path):
    """The cache folder of the shipped weights is seeded by one rename (export.cache._seed): what a user put there is
    carried over, or the folder refused, as for `ddpm export --out`."""
    from ddpm.export.cache import _seed

    source = Bundle.load(shipped_dir())
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="is a folder but not an export folder"):
        _seed(source, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    (folder / "notes.txt").unlink()
    _seed(source, folder)
    names = _users_things(folder)
    _seed(source, folder)                                             # an export of the same weights: kept
    assert _kept(folder) and set(names) < {p.name for p in folder.iterdir()}
    assert EXPORT_FOLDER.marker in {p.name for p in folder.iterdir()}
