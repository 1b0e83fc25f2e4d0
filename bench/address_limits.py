"""Every `ddpm` command under an address-space limit (`ulimit -v N`): success, or exactly one line
"Error: out of memory ... (ulimit -v N) ...", never a traceback, a library's own message or a wrong cause.

    python -m ddpm.bench.address_limits --data DIR [--lo 100000 --hi 1000000 --step 10000] [--out table.md]

Each command runs in a fresh process whose soft and hard RLIMIT_AS are N KiB, in a scratch folder, with the
shipped default model: --version, gen -n 4, gen -n 64, inpaint of a picture, eval --samples (of 200 digits made
first without a limit). A row per N: "ok" (exit 0), "line" (exit 1 and the one line naming the limit, nothing else
on standard error), or what went wrong (the first line that should not be there). --data: MNIST's folder, for eval.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

COMMANDS = {
    "--version": ["--version"],
    "gen -n 4": ["gen", "-n", "4", "-q", "--out", "c.png"],
    "gen -n 64": ["gen", "-n", "64", "-q", "--out", "d.png"],
    "inpaint": ["inpaint", "--image", "{digit}", "--mask", "bottom", "-n", "4", "-q", "--out", "i.png"],
    "eval --samples": ["eval", "--samples", "{samples}", "--data", "{data}", "-q"],
}


def run(args: list[str], kib: int | None, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m ddpm.cli ARGS` with RLIMIT_AS at `kib` KiB (None: unlimited), in cwd."""
    limit = None if kib is None else kib << 10
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "ddpm.cli", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout, preexec_fn=None if limit is None else
                          lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))


def verdict(r: subprocess.CompletedProcess, kib: int) -> str:
    """ok | line | what was wrong (the first offending line, clipped)."""
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    if r.returncode == 0 and not any("Traceback" in ln or "Error" in ln for ln in err):
        return "ok"
    if r.returncode == 1 and len(err) == 1 and err[0].startswith("Error: out of memory") and \
            f"ulimit -v {kib})" in err[0]:
        return "line"
    bad = next((ln for ln in err if not ln.startswith("Error: out of memory")), err[0] if err else "(nothing)")
    return f"rc={r.returncode}: {bad[:90]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="MNIST's folder (eval --samples)")
    ap.add_argument("--lo", type=int, default=100_000)
    ap.add_argument("--hi", type=int, default=1_000_000)
    ap.add_argument("--step", type=int, default=10_000)
    ap.add_argument("--commands", default=",".join(COMMANDS), help="comma-separated names of COMMANDS")
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    a = ap.parse_args()
    names = a.commands.split(",")
    unknown = [n for n in names if n not in COMMANDS]
    if unknown:
        ap.error(f"--commands: unknown {unknown[0]!r}; choose from {', '.join(COMMANDS)}")
    with tempfile.TemporaryDirectory(prefix="ddpm-limits-") as tmp:
        tmp = Path(tmp)
        prep = run(["gen", "-n", "200", "-q", "--out", "s.npz"], None, tmp)
        prep = prep if prep.returncode else run(["gen", "-n", "1", "--label", "3", "-q", "--out", "digit.png"], None, tmp)
        if prep.returncode:
            sys.exit(f"preparing the inputs failed: {prep.stderr}")
        fill = dict(digit=str(tmp / "digit.png"), samples=str(tmp / "s.npz"), data=a.data)
        rows = [f"| ulimit -v | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|"]
        print(rows[0], rows[1], sep="\n", flush=True)
        bad = 0
        for kib in range(a.lo, a.hi + 1, a.step):
            cells = []
            for name in names:
                work = tmp / "w"
                work.mkdir(exist_ok=True)
                r = run([x.format(**fill) for x in COMMANDS[name]], kib, work)
                cells.append(verdict(r, kib))
                bad += cells[-1] not in ("ok", "line")
                for p in work.iterdir():
                    p.unlink()
            rows.append(f"| {kib} | {' | '.join(cells)} |")
            print(rows[-1], flush=True)
    if a.out:
        Path(a.out).write_text("\n".join(rows) + "\n")
    print(f"{bad} bad cells")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
