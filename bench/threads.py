"""Thread settings on a quiet and on a busy CPU: `ddpm gen` timed as a subprocess under each setting, alone and
beside a competing CPU load that this script starts itself, to choose the defaults (runtime.nets.ORT_THREADS and
ORT_SPINNING, the CLI's OMP_WAIT_POLICY).

    python -m ddpm.bench.threads                    # writes bench/threads.md and bench/threads.json
    python -m ddpm.bench.threads --repeat 3 --load 2 --torch-n 16

Every setting runs the same command (the default sampler and guidance, the shipped model; `--engine onnx` with
-n 64 and -n 1, `--engine torch` with --torch-n digits) in a fresh process, so that the thread pools start as they
would for a user. "Loaded": `--load` busy-loop processes at normal priority run beside it (started before, killed
after each loaded block). The settings take turns within each round, the order rotated from round to round, quiet
and loaded blocks alternate, and each figure is the median of `--repeat` rounds: on a machine shared with other
work no moment is truly quiet, and interleaving makes the drift hit every setting alike.

A setting is applied by a child process (`--child SETTINGS -- gen ...`) that sets it before the `ddpm` command
runs: onnxruntime's intra-op thread count and spinning through runtime.nets's defaults, PyTorch's thread count
through torch.set_num_threads, OMP_WAIT_POLICY in the environment before PyTorch loads its OpenMP runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

UNSET = "unset"   # OMP_WAIT_POLICY removed from the environment: libgomp's own default (spin a while, then sleep)

# name -> settings; None leaves a knob at ddpm's default. "before": the defaults before bench/threads.md
# (onnxruntime's own thread count and spinning pool, PyTorch's OpenMP with no wait policy).
ORT_SETTINGS = {
    "ddpm defaults (this version)": {},
    "before: ORT default threads, spinning": {"ort_threads": 0, "spin": True, "omp": UNSET},
    "ORT threads = CPUs, spinning": {"ort_threads": "cpus", "spin": True, "omp": UNSET},
    "ORT threads = CPUs, no spinning": {"ort_threads": "cpus", "spin": False, "omp": UNSET},
    "ORT threads = 1": {"ort_threads": 1, "spin": True, "omp": UNSET},
}
TORCH_SETTINGS = {
    "ddpm defaults (this version)": {},
    "before: torch threads default, OMP_WAIT_POLICY unset": {"omp": UNSET},
    "torch threads = CPUs, OMP_WAIT_POLICY=PASSIVE": {"torch_threads": "cpus", "omp": "PASSIVE"},
    "torch threads = 1, OMP_WAIT_POLICY unset": {"torch_threads": 1, "omp": UNSET},
    "torch threads = 1, OMP_WAIT_POLICY=PASSIVE": {"torch_threads": 1, "omp": "PASSIVE"},
}


def child(settings: dict, argv: list[str]) -> None:
    """Apply `settings` in this process, then run `ddpm argv` (its exit ends the process)."""
    from .. import cli   # sets the CLI's own OMP_WAIT_POLICY default; PyTorch is not loaded yet
    from ..runtime import nets

    cpus = nets.cpu_count()
    pick = lambda v: cpus if v == "cpus" else v   # noqa: E731
    if "omp" in settings:
        if settings["omp"] == UNSET:
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = settings["omp"]
    if "ort_threads" in settings:
        nets.ORT_THREADS = pick(settings["ort_threads"])
    if "spin" in settings:
        nets.ORT_SPINNING = settings["spin"]
    if "torch_threads" in settings:
        import torch

        torch.set_num_threads(pick(settings["torch_threads"]))
    cli.main(argv, prog_name="ddpm")


def busy_loops(n: int) -> list[subprocess.Popen]:
    """n processes that spin on a CPU at normal priority until killed."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


GEN_SECONDS = re.compile(r" in ([0-9.]+)s -> ")


def run_once(settings: dict, argv: list[str], timeout: float) -> tuple[float, float]:
    """(wall seconds of the whole command, the generation seconds it reports) for one fresh process."""
    cmd = [sys.executable, "-m", "ddpm.bench.threads", "--child", json.dumps(settings), "--", *argv]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"{' '.join(argv)} with {settings} failed ({r.returncode}): {r.stderr[-2000:]}")
    m = GEN_SECONDS.search(r.stdout)
    if not m:
        raise RuntimeError(f"no timing in the output of {' '.join(argv)}: {r.stdout[-500:]}")
    return wall, float(m.group(1))


def load_average() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def measure(repeat: int, load: int, torch_n: int, timeout: float, log=print) -> dict:
    """Every (workload, setting) `repeat` times quiet and loaded, interleaved; returns the raw times."""
    tmp = Path(tempfile.mkdtemp(prefix="ddpm-threads-"))
    workloads = {
        "gen -n 64 (onnx)": (["gen", "-q", "-n", "64", "--engine", "onnx", "--out", str(tmp / "a.png")], ORT_SETTINGS),
        "gen -n 1 (onnx)": (["gen", "-q", "-n", "1", "--engine", "onnx", "--out", str(tmp / "b.png")], ORT_SETTINGS),
        f"gen -n {torch_n} --engine torch": (["gen", "-q", "-n", str(torch_n), "--engine", "torch",
                                              "--out", str(tmp / "c.png")], TORCH_SETTINGS),
    }
    # one untimed run of each workload: the export cache and the file cache are warm for every timed run
    for argv, _ in workloads.values():
        run_once({}, argv, timeout)
    times = {state: {w: {s: [] for s in settings} for w, (_, settings) in workloads.items()}
             for state in ("quiet", "loaded")}
    loads = {"start": load_average()}
    for r in range(repeat):
        for state in (("quiet", "loaded") if r % 2 == 0 else ("loaded", "quiet")):
            procs = busy_loops(load) if state == "loaded" else []
            try:
                if procs:
                    time.sleep(1.0)   # the busy loops are running before the first timed command
                for w, (argv, settings) in workloads.items():
                    names = list(settings)
                    k = r % len(names)
                    for s in names[k:] + names[:k]:   # the order rotated round by round
                        wall, gen = run_once(settings[s], argv, timeout)
                        times[state][w][s].append({"wall": wall, "gen": gen})
                        log(f"round {r + 1}/{repeat} {state:6} {w:24} {s:55} wall {wall:6.2f}s gen {gen:6.1f}s "
                            f"(load {load_average()})")
            finally:
                stop(procs)
    loads["end"] = load_average()
    return {"times": times, "load_average": loads, "repeat": repeat, "busy_loops": load, "torch_n": torch_n,
            "defaults": describe_defaults()}


def describe_defaults() -> str:
    """ddpm's CPU thread defaults in this version, in words."""
    from ..runtime import nets

    threads = nets.ORT_THREADS if nets.ORT_THREADS is not None else f"CPUs in the affinity mask ({nets.cpu_count()})"
    return (f"onnxruntime intra-op threads = {threads}, spinning {'on' if nets.ORT_SPINNING else 'off'}; "
            f"PyTorch with its own thread count and OMP_WAIT_POLICY=PASSIVE (set by the CLI unless given)")


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def format_md(res: dict, command: str, written: str | None = None) -> str:
    from ..runtime.nets import cpu_count

    lines = [
        "# Thread settings on a quiet and on a busy CPU",
        "",
        f"Written by `{command}` ({written or time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{platform.processor() or platform.machine()}, {cpu_count()} CPUs in this process's affinity mask, "
        f"{os.cpu_count()} online; Python {platform.python_version()}).",
        "",
        "Each figure is the median of "
        f"{res['repeat']} runs of the command in a fresh process: **wall** is the whole command as a user waits for "
        "it (start-up, model and session loading included), **gen** the generation time the command reports. The "
        "settings took turns within each round (order rotated round by round) and quiet and loaded blocks "
        "alternated, so drift hits every setting alike. **Quiet is not idle**: the machine is shared with other "
        f"work (load average {res['load_average']['start']} at the start, {res['load_average']['end']} at the end, "
        f"a background training run at nice 19 among it). **Loaded**: {res['busy_loops']} busy-loop processes at "
        "normal priority started by the script beside the command. \"before\": the defaults before this "
        "measurement; \"ddpm defaults\": what `ddpm gen` does now with no option.",
        "",
        f"ddpm defaults measured: {res.get('defaults', '(not recorded)')}.",
        "",
    ]
    for state in ("quiet", "loaded"):
        lines += [f"## {state.capitalize()}", ""]
        for w, rows in res["times"][state].items():
            quiet = res["times"]["quiet"][w]
            lines += [f"`ddpm {w}`", "", "| setting | wall s | gen s | gen min-max s |"
                      + (" gen vs quiet |" if state == "loaded" else ""),
                      "|---|---:|---:|---:|" + ("---:|" if state == "loaded" else "")]
            for s, runs in rows.items():
                gens = [r["gen"] for r in runs]
                row = (f"| {s} | {_median(runs, 'wall'):.2f} | {_median(runs, 'gen'):.2f} | "
                       f"{min(gens):.1f}-{max(gens):.1f} |")
                if state == "loaded":
                    q = _median(quiet[s], "gen")
                    row += f" {_median(runs, 'gen') / q:.1f}x |" if q > 0 else " - |"
                lines.append(row)
            lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=3, help="rounds (each setting once per round and state)")
    p.add_argument("--load", type=int, default=2, help="busy-loop processes beside the loaded runs")
    p.add_argument("--torch-n", type=int, default=16, help="digits of the eager PyTorch run")
    p.add_argument("--timeout", type=float, default=600, help="seconds before one command counts as hung")
    p.add_argument("--out", default=str(Path(__file__).with_name("threads.md")), help="the Markdown tables")
    p.add_argument("--from-json", help="write the tables of an earlier run's JSON again (no measurement)")
    args, rest = p.parse_known_args(argv)
    if args.child is not None:
        return child(json.loads(args.child), [a for a in rest if a != "--"])
    if rest or args.repeat < 1 or args.load < 0 or args.torch_n < 1:
        p.error("--repeat and --torch-n >= 1, --load >= 0, no other arguments")
    command = "python -m ddpm.bench.threads" + "".join(
        f" --{k.replace('_', '-')} {getattr(args, k)}" for k in ("repeat", "load", "torch_n"))
    out = Path(args.out)
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        res.setdefault("defaults", describe_defaults())
        command = res.get("command", command)
        out.write_text(format_md(res, command, res.get("written")) + "\n")
        print(f"wrote {out}")
        return
    res = measure(args.repeat, args.load, args.torch_n, args.timeout, log=lambda m: print(m, flush=True))
    res["command"], res["written"] = command, time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    out.write_text(format_md(res, command) + "\n")
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
