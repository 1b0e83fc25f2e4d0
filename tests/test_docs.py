"""The documentation: every relative link and picture resolves (anchors included), the README stays a front door
(at most 200 lines, the first command in the first 40), and its quickstart runs as written."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, ROOT / "CHANGELOG.md", ROOT / "assets" / "MODEL_CARD.md", *sorted((ROOT / "docs").glob("*.md")),
         *sorted((ROOT / "bench" / "results").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", md.read_text(encoding="utf-8")).splitlines():
        if m := re.match(r"#{1,6}\s+(.*)", line):
            s = _slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def _section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def _blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", section, re.M | re.S)


def test_pages_exist():
    assert (ROOT / "docs").is_dir() and len(PAGES) > 3


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_pictures_resolve(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):     # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines"
    first = lines.index("```bash") + 2    # the first command: the line after the first shell block opens (1-based)
    assert first <= 40, f"the first command is on line {first}"


def test_readme_says_the_int8_model_is_not_shipped():
    """The base install has no int8 model: README's line that makes it says so, and what making it needs."""
    [line] = [s for s in README.read_text(encoding="utf-8").splitlines() if re.match(r"ddpm export --int8 +#", s)]
    assert "not shipped" in line and "PyTorch" in line and "MNIST" in line, line


def test_int8_speed_is_quoted_from_the_newest_result():
    """docs/int8.md and docs/status.md give the int8 / fp32 ratio of `ddpm gen -n 64` that the newest result file
    measuring it holds (a table row `| int8 | ... | S (R of fp32) |`), and link that file."""
    row = re.compile(r"^\| int8 \|.*\(([\d.]+) of fp32\)", re.M)
    found = [(p.name, m.group(1)) for p in sorted((ROOT / "bench" / "results").glob("*.md"))
             if (m := row.search(p.read_text(encoding="utf-8")))]
    assert found, "no result file holds the int8 timing of `ddpm gen -n 64`"
    name, ratio = found[-1]
    for page in ("int8.md", "status.md"):
        text = (ROOT / "docs" / page).read_text(encoding="utf-8")
        assert f"(../bench/results/{name})" in text and f"ratio {ratio}" in text, (page, name, ratio)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_name_no_workspace_paths(page):
    """The suite's own data lookup stays in tests/conftest.py and .ci/run; the docs speak to users."""
    text = page.read_text(encoding="utf-8")
    assert "../shared" not in text and "shared/data" not in text


def test_readme_test_and_install_commands_are_what_ci_runs():
    """.ci/run installs as the README's Development block does and runs its test command."""
    ci = re.sub(r"(python -m )?pip install -q", "pip install", (ROOT / ".ci" / "run").read_text(encoding="utf-8"))
    block = _blocks(_section(README.read_text(encoding="utf-8"), "Development"), "bash")[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    for cmd in ('pip install -e ".[test]"', "python -m pytest -q", "python3 -m venv .venv", ". .venv/bin/activate"):
        assert any(cmd in c for c in commands), f"README Development lacks {cmd!r}"
        assert cmd in ci, f".ci/run does not run {cmd!r}"


# The quickstart's setup lines, and where they run: the venv is .ci/run's, `pip install .` (no extras) is
# tests/test_base_install.py's (a slow test: it needs a package index).
SETUP = {"python3 -m venv .venv && . .venv/bin/activate", "pip install ."}


def _ddpm() -> list[str]:
    """The `ddpm` command of this environment (the script pip installed beside the interpreter)."""
    exe = Path(sys.executable).with_name("ddpm")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ddpm.cli"]


def _ignored_by_git(paths: list[str]) -> set[str]:
    """The paths .gitignore covers (as tests/test_repo.py checks the commands' default outputs)."""
    r = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=ROOT, input="\n".join(paths) + "\n",
                       capture_output=True, text=True)
    assert r.returncode in (0, 1), r.stderr
    return set(r.stdout.split())


@pytest.mark.slow   # about 3 s on an idle 2-core machine, 12 s on a loaded one
def test_quickstart_runs_as_written(tmp_path):
    """Every command of the quickstart, in a fresh folder with the test cache (conftest.private_cache): the shell
    block's `ddpm` commands write what they name, and the Python block prints what its comments promise."""
    section = _section(README.read_text(encoding="utf-8"), "Quickstart")
    (shell,), (python,) = _blocks(section, "bash"), _blocks(section, "python")
    outputs = []
    for line in filter(None, (ln.split("#")[0].strip() for ln in shell.splitlines())):
        if line in SETUP:
            continue
        args = shlex.split(line)
        assert args[0] == "ddpm", f"quickstart line neither setup nor a ddpm command: {line!r}"
        r = subprocess.run(_ddpm() + args[1:], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, PYTHONWARNINGS="ignore"))
        assert r.returncode == 0, f"{line}: {r.stderr[-2000:]}"
        out = args[args.index("--out") + 1]
        assert (tmp_path / out).stat().st_size > 0 and r.stdout.strip().splitlines()[-1].endswith(out)
        outputs.append(out)
    assert outputs, "the quickstart runs no ddpm command"
    if shutil.which("git") and (ROOT / ".git").exists():   # run in a clone, they must not show up in `git status`
        assert set(outputs) <= _ignored_by_git(outputs), f"not in .gitignore: {outputs}"
    r = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["(16,", "28,", "28)", "uint8"]


def test_version_names_the_distribution():
    """`ddpm --version` (the README's advice for citing) reads the version of the distribution `ddpm-mnist`."""
    from importlib.metadata import version

    r = subprocess.run(_ddpm() + ["--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip().endswith(f"version {version('ddpm-mnist')}"), r.stderr[-2000:]
