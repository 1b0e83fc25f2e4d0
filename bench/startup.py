"""Wall time and peak memory of whole `ddpm` commands, per install (the README's "How long things take").

    python -m ddpm.bench.startup --venv base=/tmp/vbase --venv full=.venv --repeat 3 --out bench/startup.md

Every command runs as a fresh process of the venv's own `ddpm` (so start-up, imports and the first load of the
model count, as they do for a user), with the venvs interleaved within each repeat so that a change in the
machine's load hits them alike. Peak memory is the child's maximum resident set size (getrusage RUSAGE_CHILDREN,
taken from os.wait4 for each child alone). The cache (XDG_CACHE_HOME) is a fresh folder per venv, warmed by one
untimed `ddpm gen -n 1` first, so the timed runs see what a user sees from the second command on.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {   # name -> arguments of `ddpm`
    "gen -n 1": ["gen", "-n", "1", "-q"],
    "gen -n 64": ["gen", "-n", "64", "-q"],
}


def run(ddpm: Path, args: list[str], env: dict, out: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one `ddpm ARGS --out OUT` process. Raises RuntimeError if it fails."""
    t0 = time.perf_counter()
    p = subprocess.Popen([str(ddpm), *args, "--out", str(out)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    output = p.stdout.read().decode() if p.stdout else ""
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{ddpm} {shlex.join(args)} failed ({p.returncode}): {output[-500:]}")
    return wall, usage.ru_maxrss / 1024.0   # Linux: kB


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", action="append", required=True, metavar="NAME=PATH",
                    help="an install to measure: a name and its venv folder (repeatable)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--command", action="append", default=None, metavar="ARGS",
                    help="extra `ddpm` arguments to time (repeatable; --out is added), e.g. 'gen -n 64 --sampler ddim'")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here too")
    a = ap.parse_args(argv)
    venvs = {}
    for spec in a.venv:
        name, _, path = spec.partition("=")
        ddpm = Path(path) / "bin" / "ddpm"
        if not ddpm.is_file():
            sys.exit(f"{ddpm} not found: --venv NAME=PATH needs a venv with ddpm installed")
        venvs[name] = ddpm
    commands = dict(COMMANDS)
    for c in a.command or []:
        commands[c] = shlex.split(c) + ["-q"]
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        envs = {}
        for name, ddpm in venvs.items():
            env = dict(os.environ, XDG_CACHE_HOME=str(Path(tmp) / f"cache-{name}"))
            run(ddpm, COMMANDS["gen -n 1"], env, Path(tmp) / "warm.png")   # first use: the cache is filled
            envs[name] = env
        for r in range(a.repeat):
            for cname, args in commands.items():
                for name, ddpm in venvs.items():
                    res = run(ddpm, args, envs[name], Path(tmp) / "out.png")
                    results.setdefault((cname, name), []).append(res)
                    print(f"[{r + 1}/{a.repeat}] {name:>6} ddpm {cname}: {res[0]:.2f} s, {res[1]:.0f} MB", flush=True)
    load = os.getloadavg()[0]
    lines = [f"Median of {a.repeat} runs (min-max), each a fresh process with a warm cache; load average at the end "
             f"{load:.1f} on {os.cpu_count()} CPUs. Measured with `python -m ddpm.bench.startup "
             + " ".join(f"--venv {s}" for s in a.venv) + f" --repeat {a.repeat}`.", "",
             "| command | install | wall s | peak RSS MB |", "|---|---|---|---|"]
    for (cname, name), rs in results.items():
        walls, rss = [w for w, _ in rs], [m for _, m in rs]
        lines.append(f"| `ddpm {cname}` | {name} | {statistics.median(walls):.2f} ({min(walls):.2f}-{max(walls):.2f}) "
                     f"| {statistics.median(rss):.0f} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        from ..files import write_text
        write_text(a.out, text + "\n")


if __name__ == "__main__":
    main()
