"""The CLI end to end with a tiny model: gen, inpaint, bench --quick, and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import invoke, invoke_to_full_stdout, slow_except, tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    tiny_checkpoint(root)
    return root


@pytest.mark.slow
def test_gen_png_and_npz(ckpt, tmp_path):
    r = invoke("gen", "--ckpt", ckpt, "-n", 12, "--steps", 3, "--out", tmp_path / "g.png", "-q")
    assert r.exit_code == 0, r.output
    assert ", onnx)" in r.output                     # --engine auto on a CPU: the onnx runtime
    assert Image.open(tmp_path / "g.png").size[0] > 28 * 10
    r = invoke("gen", "--ckpt", ckpt, "-n", 5, "--steps", 3, "--label", 4, "--out", tmp_path / "g.npz", "-q")
    z = np.load(tmp_path / "g.npz")
    assert z["images"].shape == (5, 28, 28) and z["images"].dtype == np.uint8 and z["labels"].tolist() == [4] * 5
    r = invoke("gen", "--ckpt", ckpt, "-n", 3, "--steps", 3, "--uncond", "--out", tmp_path / "u.npz", "-q")
    assert np.load(tmp_path / "u.npz")["labels"].tolist() == [-1] * 3
    r = invoke("gen", "--ckpt", ckpt, "-n", 2, "--sampler", "ddpm", "--out", tmp_path / "d.npz", "-q")   # T=100
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("args, message", [
    (["-n", "0"], "-n"),
    (["--steps", "0"], "--steps"),
    (["--steps", "101"], "--steps"),                 # the tiny model's T is 100
    (["--sampler", "ddpm", "--steps", "10"], "DDPM sampler runs all"),
    (["--label", "10"], "--label"),
    (["--guidance", "-1"], "--guidance"),
    (["--guidance", "1e300"], "--guidance"),         # beyond float32: options.MAX_GUIDANCE
    (["--threads", "1000000"], "--threads"),          # options.MAX_THREADS
    (["--eta", "2"], "--eta"),
    (["--engine", "tvm"], "--engine"),
    (["--out", "x.jpg"], "--out"),
    (["--label", "3", "--uncond"], "exclude each other"),
    (["--sampler", "heun"], "--sampler"),
    (["--spacing", "leading"], "--spacing"),
    (["--sampler", "ddpm", "--spacing", "trailing"], "no spacing"),
    (["--guidance-interval", "2,1"], "--guidance-interval"),
    (["--guidance-interval", "-1,2"], "--guidance-interval"),
    (["--guidance-interval", "lots"], "--guidance-interval"),
    (["--guidance-interval", "0,1e300"], "--guidance-interval"),   # options.MAX_LEVEL (inf stays allowed)
])
def test_gen_bad_input(ckpt, args, message):
    r = invoke("gen", "--ckpt", ckpt, *args)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


@pytest.mark.slow
def test_gen_solvers_spacing_and_guidance_interval(ckpt, tmp_path):
    """The multistep solvers (the default is UniPC), each spacing and a guidance interval run from the command line."""
    r = invoke("gen", "--ckpt", ckpt, "-n", 3, "--out", tmp_path / "d.npz", "-q")
    assert r.exit_code == 0 and "(unipc8-trailing-gi0.28-5.42, guidance 0.45" in r.output, r.output
    r = invoke("gen", "--ckpt", ckpt, "-n", 3, "--guidance-interval", "all", "--out", tmp_path / "d.npz", "-q")
    assert r.exit_code == 0 and "(unipc8-trailing, guidance 0.45" in r.output, r.output
    for extra in (["--sampler", "dpm++2m", "--steps", "4", "--spacing", "logsnr"],
                  ["--sampler", "unipc", "--steps", "5", "--guidance-interval", "0.5,5"],
                  ["--sampler", "ddim", "--steps", "4", "--spacing", "trailing", "--guidance-interval", "0,inf"]):
        r = invoke("gen", "--ckpt", ckpt, "-n", 3, *extra, "--out", tmp_path / "s.npz", "-q")
        assert r.exit_code == 0, r.output
    assert "unipc5-trailing-gi0.5-5" in invoke("gen", "--ckpt", ckpt, "-n", 2, "--steps", 5, "--guidance-interval",
                                               "0.5,5", "--out", tmp_path / "s.npz", "-q").output


def test_gen_bad_checkpoints(tmp_path):
    # an input path that does not exist is a usage error naming its option (exit 2, docs/reliability.md), as --image's
    r = invoke("gen", "--ckpt", tmp_path / "missing", "-n", 1)
    assert r.exit_code == 2 and "does not exist" in r.output and "--ckpt" in r.output, r.output
    r = invoke("eval", "--classifier", tmp_path / "missing.safetensors", "-n", 2)
    assert r.exit_code == 2 and "does not exist" in r.output and "--classifier" in r.output, r.output
    r = invoke("gen", "--ckpt", tmp_path, "-n", 1)
    assert r.exit_code == 1 and "holds neither" in r.output
    (tmp_path / "foreign.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    r = invoke("gen", "--ckpt", tmp_path / "foreign.safetensors", "-n", 1)
    assert r.exit_code == 1 and "Error:" in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("command", ["gen", "eval", "inpaint"])
def test_a_missing_export_folder_is_a_usage_error_unless_one_was_left_aside(tmp_path, command):
    """--export that does not exist is a usage error naming the option (exit 2), as --ckpt's, for every command that
    takes it; a folder that a killed `ddpm export` moved aside (.D.<host>-<pid>.<random>.old, files.publish_dir) is
    accepted, and the reader puts it back (runtime.bundle)."""
    import subprocess

    from ddpm import files

    more = {"gen": [], "eval": [], "inpaint": ["--image", tmp_path / "d.png"]}[command]
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "d.png")
    r = invoke(command, "--export", tmp_path / "D", "-n", 2, *more)
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert "Invalid value for '--export'" in r.output and "does not exist" in r.output, r.output
    p = subprocess.Popen(["true"])
    p.wait()   # a writer that is gone
    (tmp_path / f".D.{files.HOST}-{p.pid}.deadbeef.old").mkdir()
    r = invoke(command, "--export", tmp_path / "D", "-n", 2, *more)
    assert r.exit_code == 1 and "not an export folder" in r.output, r.output   # put back, and it holds nothing
    assert (tmp_path / "D").is_dir()


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_an_input_link_that_leads_nowhere_says_so(tmp_path, kind):
    """--ckpt (as every input option) that is a loop of symbolic links or a link to nothing: a usage error that
    says so, not "does not exist"."""
    import os

    link = tmp_path / "m"
    os.symlink(link if kind == "loop" else tmp_path / "gone", link)
    for option in ("--ckpt", "--export"):
        r = invoke("gen", option, link, "-n", 1, "--out", tmp_path / "x.png")
        assert r.exit_code == 2 and r.output.count("\n") == 1 and option in r.output, r.output
        want = "is a loop of symbolic links" if kind == "loop" else f"is a symbolic link to '{tmp_path / 'gone'}'"
        assert want in r.output and "m' does not exist" not in r.output, r.output


def test_inpaint(ckpt, tmp_path):
    digit = np.zeros((28, 28), np.uint8)
    digit[4:24, 12:16] = 255
    Image.fromarray(digit).save(tmp_path / "one.png")
    r = invoke("inpaint", "--ckpt", ckpt, "--image", tmp_path / "one.png", "--mask", "bottom", "-n", 3, "--steps", 4,
               "--resample", 2, "--out", tmp_path / "in.png")
    assert r.exit_code == 0, r.output
    grid = np.asarray(Image.open(tmp_path / "in.png"))
    assert grid.shape[1] == 2 * (4 * 30 + 2)                    # input + 3 completions, scaled x2
    r = invoke("inpaint", "--ckpt", ckpt, "--image", tmp_path / "one.png", "--sampler", "unipc", "--steps", 4)
    assert r.exit_code == 2 and "single-step" in r.output                  # multistep plans: not for inpainting
    r = invoke("inpaint", "--ckpt", ckpt, "--image", tmp_path / "one.png", "--mask", "diagonal")
    assert r.exit_code == 2 and "--mask" in r.output
    (tmp_path / "bad.png").write_bytes(b"not a png")
    r = invoke("inpaint", "--ckpt", ckpt, "--image", tmp_path / "bad.png")
    assert r.exit_code == 2 and "not a picture file" in r.output and "--image" in r.output


def test_bench_quick_refuses_the_options_it_sets(ckpt, tmp_path):
    """--quick with an explicit --batch/--steps/--repeat was accepted and the explicit value silently ignored."""
    for extra in (["--batch", "100000000"], ["--steps", "9"], ["--repeat", "5", "--batch", "4"]):
        r = invoke("bench", "--quick", "--ckpt", ckpt, *extra, "--out", tmp_path / "b")
        assert r.exit_code == 2 and "--quick sets" in r.output and extra[0] in r.output, r.output
    assert not (tmp_path / "b" / "bench.json").exists()


@pytest.mark.parametrize("option, value, message", [
    ("--engines", "onnx,onnx", "onnx is given twice"), ("--engines", "onnx, torch ,onnx", "onnx is given twice"),
    ("--engines", "onnx,,torch", "an empty item in 'onnx,,torch'"), ("--engines", "", "none given"),
    ("--engines", "torch,tvm", "unknown engine 'tvm'"),
    ("--batch", "1,1", "1 is given twice"), ("--batch", "1,01", "1 is given twice"),
    ("--batch", "1,,2", "an empty item in '1,,2'"), ("--batch", "1,", "an empty item"),
    ("--batch", "0,2", "0 is not positive"), ("--batch", "1.5", "'1.5' is not an integer"),
])
def test_bench_lists_are_of_distinct_items(ckpt, tmp_path, option, value, message):
    """--engines and --batch name each engine and batch size once: a repeat (which would be timed and listed twice)
    and an empty item are one line naming the option, exit 2, before anything runs."""
    r = invoke("bench", "--ckpt", ckpt, option, value, "--out", tmp_path / "b")
    line = r.output.strip()
    assert r.exit_code == 2 and "\n" not in line and f"'{option}'" in line and message in line, r.output
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_bench_quick(ckpt, tmp_path):
    r = invoke("bench", "--quick", "--ckpt", ckpt, "--out", tmp_path / "b", env={"XDG_CACHE_HOME": str(tmp_path / "c")})
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "b" / "bench.json").read_text())
    engines = {c["engine"] for c in res["results"]}
    assert {"torch", "runtime-torch", "onnx", "onnx-generator"} <= engines and res["steps"] == 3
    assert res["sampler"] == "unipc3-trailing-gi0.28-5.42"
    assert res["baseline"] == "ddim3-eta0" and "torch ddim3-eta0" in engines    # eager DDIM timed beside the rest
    for c in res["results"]:
        assert len(c["times_s"]) == 2 and c["median_s"] > 0 and c["speedup_vs_baseline"] > 0
        if c["plan"] == res["sampler"]:
            assert c["speedup_vs_eager"] > 0
        else:
            assert c["speedup_vs_eager"] is None
    assert "trt" in res["skipped"] or "trt" in engines      # never silently dropped
    assert r.output.count("skipped trt") == ("trt" in res["skipped"])   # and said once, not twice
    assert "| engine |" in (tmp_path / "b" / "bench.md").read_text()
    # fp16 runtime engines beside the fp32 eager reference, in one process
    r = invoke("bench", "--quick", "--fp16", "--ckpt", ckpt, "--out", tmp_path / "b16",
               env={"XDG_CACHE_HOME": str(tmp_path / "c")})
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "b16" / "bench.json").read_text())
    assert res["fp16"] and {"torch", "runtime-torch", "onnx"} <= {c["engine"] for c in res["results"]}
    assert "fp32" in res["skipped"]["onnx-generator"]          # the generator wraps the fp32 model: skipped, said why
    r = invoke("bench", "--ckpt", ckpt, "--batch", "0,2")
    assert r.exit_code == 2 and "--batch" in r.output
    r = invoke("bench", "--ckpt", ckpt, "--engines", "torch,tvm")
    assert r.exit_code == 2 and "tvm" in r.output


@pytest.fixture(scope="module")
def short_ckpt(tmp_path_factory):
    """A model with T = 20, fewer than the default 50 DDIM steps."""
    import dataclasses

    from helpers import TINY

    root = tmp_path_factory.mktemp("short")
    tiny_checkpoint(root, cfg=dataclasses.replace(TINY, timesteps=20))
    return root


@pytest.mark.slow
def test_a_model_with_few_timesteps_caps_the_default_steps_at_its_T(short_ckpt, fake_mnist, tmp_path):
    """On a model with T = 20: the default sampler's 8 steps fit; with --sampler ddim, gen, eval and bench take
    min(50, T) steps; --steps above T gets one clear message."""
    env = {"XDG_CACHE_HOME": str(tmp_path / "c")}
    r = invoke("gen", "--ckpt", short_ckpt, "-n", 2, "--engine", "torch", "--out", tmp_path / "g.npz", "-q")
    assert r.exit_code == 0, r.output
    assert "(unipc8-trailing-gi0.28-5.42," in r.output                      # the default sampler: 8 steps fit T = 20
    r = invoke("gen", "--ckpt", short_ckpt, "-n", 2, "--engine", "torch", "--out", tmp_path / "g.npz", "-q",
               "--sampler", "ddim")
    assert r.exit_code == 0, r.output
    assert "(ddim20-eta0-gi0.28-5.42," in r.output
    r = invoke("eval", "--ckpt", short_ckpt, "-n", 4, "--engine", "torch", "--data", fake_mnist, "-q",
               "--json", tmp_path / "q.json", "--sampler", "ddim")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "q.json").read_text())[0]["name"].startswith("ddim20-eta0")
    assert r.stdout.strip().splitlines()[-1].endswith(f"to {tmp_path / 'q.json'}")   # the last line says what it wrote
    r = invoke("bench", "--ckpt", short_ckpt, "--engines", "torch", "--batch", 1, "--repeat", 1,
               "--out", tmp_path / "b", "--sampler", "ddim", "--no-baseline", env=env)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b" / "bench.json").read_text())["steps"] == 20
    for cmd in (["gen"], ["eval", "--data", fake_mnist], ["bench"]):
        r = invoke(*cmd, "--ckpt", short_ckpt, "--steps", 21)
        assert r.exit_code == 2 and "must be in 1..20 (the model's T)" in r.output and "Traceback" not in r.output


def test_a_path_with_control_characters_is_shown_escaped(tmp_path):
    """A message naming a path with a newline, an escape sequence or a NUL printed them raw (two lines, or a
    terminal that changed colour): every error line escapes what is not printable, as repr does (errors.printable),
    in the CLI and in DdpmError's text."""
    import ddpm

    bad = tmp_path / "a\nb\x1b[31mc.safetensors"
    for code in (2, 1):   # a usage error (no such file), then a file that is not a model
        result = invoke("gen", "--ckpt", bad, "-n", 1, "--out", tmp_path / "x.png")
        assert result.exit_code == code and result.output.count("\n") == 1, result.output
        assert "\x1b" not in result.output and "a\\nb\\x1b[31mc" in result.output, result.output
        bad.write_bytes(b"not weights")
    with pytest.raises(ddpm.DdpmError) as e:
        ddpm.load(tmp_path / "a\x00b")
    assert "\x00" not in str(e.value) and "a\\x00b" in str(e.value), str(e.value)


@pytest.mark.parametrize("sig, code, word", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted"),
                                             ("SIGHUP", 129, "hangup")])
@pytest.mark.parametrize("heavy", ["numpy", "torch"])
def test_a_signal_while_the_cli_imports_prints_its_line(tmp_path, heavy, sig, code, word):
    """SIGTERM while `ddpm train` imports its modules (most of a second, numpy first) killed the process by the
    default action, without the "terminated" line the README promises, and Ctrl-C gave a KeyboardInterrupt
    traceback and death by SIGINT: the CLI handles both before those imports, as during the command. The signal is
    sent by an import hook when the first `heavy` module is imported, so the test does not race."""
    import os
    import signal
    import subprocess
    import sys

    code_ = (f"import os, signal, sys\n"
             f"class Hook:\n"
             f"    def find_spec(self, name, path=None, target=None):\n"
             f"        if name == {heavy!r}:\n"
             f"            sys.meta_path.remove(self)\n"
             f"            os.kill(os.getpid(), signal.{sig})\n"
             f"sys.meta_path.insert(0, Hook())\n"
             f"sys.argv = ['ddpm', 'train', '--steps', '1', '--out', {str(tmp_path / 'run')!r}]\n"
             f"from ddpm.cli import main\n"
             f"main()\n")
    # SIGINT and SIGHUP at their defaults in the child (Python's KeyboardInterrupt; the default action): a test run
    # in the background of a non-interactive shell inherits SIGINT ignored, and one under nohup SIGHUP ignored
    def child():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)

    r = subprocess.run([sys.executable, "-c", code_], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=child)
    # numpy: before the command began ("terminated"); torch: inside it, which says what it left ("terminated; ...")
    assert r.returncode == code and r.stderr.strip().startswith(word), (r.returncode, r.stderr[-500:])
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr[-500:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_after_its_line_exits_without_another(sig, code):
    """Once a command printed a signal's line ("interrupted"), a second signal (Ctrl-C pressed twice) while the
    process ends exits with the same status and no second line or traceback."""
    import signal
    import subprocess
    import sys

    code_ = (f"import os, signal\n"
             f"from ddpm import signals\n"
             f"signals.exit_on_signals()\n"
             f"signals.said()\n"
             f"os.kill(os.getpid(), signal.{sig})\n"
             f"print('not reached')\n")
    r = subprocess.run([sys.executable, "-c", code_], capture_output=True, text=True, timeout=60,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert (r.returncode, r.stdout, r.stderr) == (code, "", ""), (r.returncode, r.stdout, r.stderr)


def test_an_unconditional_set_is_not_named_by_a_guidance_it_did_not_use(ckpt, fake_mnist, tmp_path):
    """eval --uncond draws without a label, so without guidance: its row's name says uncond, not the default w."""
    r = invoke("eval", "--ckpt", ckpt, "-n", 2, "--steps", 2, "--engine", "torch", "--data", fake_mnist, "-q",
               "--uncond", "--json", tmp_path / "u.json")
    assert r.exit_code == 0, r.output
    name = json.loads((tmp_path / "u.json").read_text())[0]["name"]
    assert name.endswith(" uncond") and "w=" not in name, name


FULL = pytest.mark.skipif(not __import__("os").path.exists("/dev/full"), reason="needs /dev/full (Linux)")


@FULL
@pytest.mark.parametrize("closed", [False, True], ids=["full", "closed"])
@pytest.mark.parametrize("command", slow_except(["--version", "gen", "eval"], "--version"))   # a process each
def test_a_standard_output_that_cannot_be_written_is_one_line(tiny_export, fake_mnist, tmp_path, command, closed):
    """Standard output on a full disk (`> /dev/full`) or closed (`>&-`, where Python's sys.stdout is None and click
    would drop every line): one line on stderr naming standard output and exit status 1, no traceback (Python's
    flush at exit included), for --version (printed while the options are parsed), gen and eval; eval writes its
    --json before it prints its table, so the scores computed are kept."""
    import os
    import subprocess
    import sys

    if command == "eval":
        r = invoke("gen", "--export", tiny_export, "-n", 4, "--steps", 2, "-q", "--out", tmp_path / "s.npz")
        assert r.exit_code == 0, r.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = {"--version": ["--version"],
            "gen": ["gen", "--export", tiny_export, "-n", 2, "--steps", 2, "-q", "--out", tmp_path / "g.npz"],
            "eval": ["eval", "--samples", tmp_path / "s.npz", "--data", fake_mnist, "-q", "--json",
                     tmp_path / "e.json"]}[command]
    command_line = [sys.executable, "-m", "ddpm", *map(str, args)]
    with open("/dev/full", "w") as full:
        r = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", *command_line] if closed else command_line,
                           stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    assert r.returncode == 1, (args, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()   # eval's data notice ("note: ... unknown MD5") may come first
    assert "Traceback" not in r.stderr and sum(line.startswith("Error") for line in lines) == 1, r.stderr[-2000:]
    reason = "it is closed" if closed else "No space left on device"
    assert lines[-1] == f"Error: cannot write to standard output: {reason}", (args, r.stderr[-2000:])
    if command == "gen":
        assert (tmp_path / "g.npz").is_file()
    if command == "eval":
        assert len(json.loads((tmp_path / "e.json").read_text())) == 1


@FULL
def test_gen_and_eval_to_a_standard_output_that_cannot_be_written_say_so_in_one_line(tiny_export, fake_mnist,
                                                                                     tmp_path, capsys):
    """The commands of test_a_standard_output_that_cannot_be_written_is_one_line in this process: every write goes
    through the CLI's errors.CheckedStdout, whose errors.StdoutFailed is the one line; the outputs are kept."""
    r = invoke("gen", "--export", tiny_export, "-n", 4, "--steps", 2, "-q", "--out", tmp_path / "s.npz")
    assert r.exit_code == 0, r.output
    for args in (["--version"], ["gen", "--export", tiny_export, "-n", 2, "--steps", 2, "-q", "--out", tmp_path / "g.npz"],
                 ["eval", "--samples", tmp_path / "s.npz", "--data", fake_mnist, "-q", "--json", tmp_path / "e.json"]):
        code, err = invoke_to_full_stdout(capsys, *args)
        lines = err.strip().splitlines()
        assert code == 1 and "Traceback" not in err and sum(line.startswith("Error") for line in lines) == 1, err
        assert lines[-1] == "Error: cannot write to standard output: No space left on device", (args, err)
    assert (tmp_path / "g.npz").is_file() and len(json.loads((tmp_path / "e.json").read_text())) == 1


def test_closed_standard_descriptors_are_held_so_no_file_takes_their_number(tmp_path):
    """A process started with standard output closed (`>&-`): files.hold_standard_descriptors (called as the CLI
    starts) puts os.devnull on descriptor 1, so the next file opened does not get number 1, where C code that
    prints (to descriptor 1, whatever sys.stdout is) would write into it."""
    import subprocess
    import sys

    script = ("import os, sys; from ddpm.files import hold_standard_descriptors; hold_standard_descriptors(); "
              f"fd = os.open({str(tmp_path / 'f')!r}, os.O_CREAT | os.O_WRONLY); os.write(1, b'printed'); "
              "sys.stderr.write(str(fd))")
    r = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-c", script], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and int(r.stderr) > 2, r.stderr[-2000:]
    assert (tmp_path / "f").read_bytes() == b""


@pytest.mark.slow
def test_a_closed_standard_error_drops_what_is_written_there_and_the_command_runs(tiny_export, tmp_path):
    """Started with standard error closed (`2>&-`), Python's sys.stderr is None: the first progress bar raised, and
    the error line with it, so gen exited 1 with no output and no word. The CLI gives it a stream on os.devnull:
    the command runs to its end, its result line on standard output."""
    import subprocess
    import sys

    out = tmp_path / "g.png"
    command = [sys.executable, "-m", "ddpm", "gen", "--export", str(tiny_export), "-n", 2, "--steps", 2, "--out",
               str(out)]
    r = subprocess.run(["sh", "-c", 'exec "$@" 2>&-', "sh", *map(str, command)], stdout=subprocess.PIPE, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.count("\n") == 1 and f"-> {out}" in r.stdout and out.is_file(), r


def test_gen_refuses_an_npz_that_cannot_fit_the_free_space(tiny_export, tmp_path, monkeypatch):
    """gen -n N --out x.npz streams N digits into a temporary: one that cannot fit the free space of its folder
    (the least the .npz can take: its members compressed as much as DEFLATE compresses anything) is refused up
    front in one line naming -n, before anything is made (it filled the disk, then failed)."""
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 100, 100))
    r = invoke("gen", "--export", tiny_export, "-n", 1000, "--steps", 2, "-q", "--out", tmp_path / "x.npz")
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("Error: -n 1000 digits make an .npz of at least "), r.output
    assert "free in" in r.output and "lower -n" in r.output, r.output
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 0, 10**6))   # room: written
    r = invoke("gen", "--export", tiny_export, "-n", 4, "--steps", 2, "-q", "--out", tmp_path / "x.npz")
    assert r.exit_code == 0 and (tmp_path / "x.npz").is_file(), r.output


def test_a_file_that_is_no_checkpoint_gets_no_advice_to_run_its_code(tmp_path):
    """--ckpt on a file that is not a checkpoint (a JSON file; a pickle that needs a foreign function): one line that
    says what it is not, without PyTorch's advice to load it with weights_only=False (which runs the file's code)."""
    import torch

    (tmp_path / "options.json").write_text('{"steps": 1}')
    torch.save({"x": np.zeros(2)}, tmp_path / "obj.pt")   # a numpy array: code of numpy's to run
    for name, reason in (("options.json", "Unsupported operand"), ("obj.pt", "Unsupported global")):
        r = invoke("gen", "--ckpt", tmp_path / name, "-n", 1, "--out", tmp_path / "x.png")
        assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
        assert "not a PyTorch file of tensors alone" in r.output and reason in r.output, r.output
        assert "weights_only" not in r.output and "False" not in r.output, r.output


def _version_with(sender: str):
    """`ddpm --version` run as the program (main() with sys.argv, as the console script runs it) after the Python
    lines `sender`, which arrange for a signal to come while the interpreter shuts down; SIGINT's default action
    in the child, as an interactive shell gives it."""
    import os
    import signal
    import subprocess
    import sys

    code = (f"import atexit, builtins, os, signal, sys\n{sender}"
            f"sys.argv = ['ddpm', '--version']\n"
            f"from ddpm.cli import main\n"
            f"main()\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=os.environ, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize("sig, code, word", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_a_signal_while_the_program_shuts_down_prints_its_line(sig, code, word):
    """`ddpm` run as the program keeps its signal handling while Python code still runs as it shuts down after the
    command (threads joined, atexit callbacks: here an atexit hook sends it): the signal prints its one line and
    exits with its status, as during the command (Ctrl-C gave "Exception ignored" and a traceback)."""
    r = _version_with(f"atexit.register(lambda: os.kill(os.getpid(), signal.{sig}))\n")
    assert (r.returncode, r.stderr.strip()) == (code, word), (r.returncode, r.stderr[-2000:])
    assert "version" in r.stdout


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_in_the_interpreters_teardown_leaves_the_commands_status(sig):
    """After the atexit callbacks Python runs no signal handler and puts the default action back while it tears the
    modules down (a fraction of a second after the last line): a signal there killed the finished command (status
    -15 or -2, no line). The command is done then: its status stands. Here the signal comes from an object that
    the teardown destroys."""
    r = _version_with(f"class Late:\n"
                      f"    def __del__(self, kill=os.kill, pid=os.getpid(), sig=signal.{sig}):\n"
                      f"        kill(pid, sig)\n"
                      f"builtins.late = Late()\n")
    assert (r.returncode, r.stderr) == (0, ""), (r.returncode, r.stderr[-2000:])
    assert "version" in r.stdout


def test_the_help_gives_the_samplers_own_defaults():
    """--steps and --spacing defaults in the help come from runtime.samplers (a new default is one edit there)."""
    from ddpm.runtime.samplers import DEFAULT_SOLVER_STEPS, DEFAULT_SPACING, DEFAULT_STEPS

    steps = f"[default: {DEFAULT_STEPS} for ddim, {DEFAULT_SOLVER_STEPS} for dpm++2m and unipc"
    spacing = f"[default: {DEFAULT_SPACING['ddim']} for ddim, {DEFAULT_SPACING['unipc']} for dpm++2m and unipc]"
    for command in ("gen", "bench", "inpaint"):
        shown = " ".join(invoke(command, "--help").output.split())
        assert steps in shown and spacing in shown, (command, shown)


@pytest.mark.parametrize("command", ["inpaint", "edit"])
def test_quiet_silences_the_unconditional_notice(ckpt, tmp_path, command):
    """-q leaves only the result line: the editing commands' "no --label" notice is silenced as upscale's is."""
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255
    Image.fromarray(digit).save(tmp_path / "d.png")
    args = (command, "--ckpt", ckpt, "--image", tmp_path / "d.png", "-n", 1, "--steps", 2, "--out", tmp_path / "o.png")
    loud, quiet = invoke(*args), invoke(*args, "-q")
    assert loud.exit_code == 0 and "no --label: using the unconditional model" in loud.output, loud.output
    assert quiet.exit_code == 0 and quiet.output.count("\n") == 1 and "-> " in quiet.output, quiet.output


@pytest.mark.parametrize("options", [
    dict(sampler="ddim", steps=12, spacing="trailing", guidance_interval=(0.5, 3.0), guidance_rescale=0.7),
    dict(guidance_interval=None), dict(spacing="logsnr"), dict(sampler="ddim", steps=5, eta=1.0),
    dict(sampler="ddpm", variance="large"), dict()])
def test_the_web_pages_command_makes_its_plan(ckpt, tmp_path, options):
    """The page of `export --web` shows the `ddpm gen` command that gives its digits: it named --sampler and --steps
    only, so a page of another spacing or guidance interval showed a command of other digits (up to 255 grey levels
    apart). The options it shows, given to gen, make the page's plan."""
    import ddpm
    from ddpm.cli_options import plan_flags
    from ddpm.options import Sampling

    model = ddpm.load(ckpt)
    opts = Sampling(**options)
    plan = model.plan(**opts.plan_args())
    shown = plan_flags(opts, plan.steps)
    r = invoke("gen", "--ckpt", ckpt, "-n", 1, *shown.split(), "--out", tmp_path / "g.npz")
    assert r.exit_code == 0 and f"({plan.name}, " in r.output, (shown, plan.name, r.output)


@pytest.mark.parametrize("steps, frames", [(8, 8), (100, 60)])
def test_a_trajectory_gif_has_the_frames_the_docs_say(tmp_path, steps, frames):
    """docs/sampling.md: `x.gif` animates every step of a plan of up to 60 steps, and 60 evenly spread steps of a
    longer one (it said every step, and a 100-step plan gave 60 frames)."""
    from PIL import Image

    r = invoke("gen", "-n", 1, "--sampler", "ddim", "--steps", steps, "--trajectory", tmp_path / "t.gif", "--out",
               tmp_path / "g.npz", "-q")
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "t.gif").n_frames == frames
    assert "animates every step of a plan of up to 60 steps, and 60" in " ".join(
        (Path(__file__).parents[1] / "docs" / "sampling.md").read_text().split())


def test_usage_errors_name_paths_with_undecodable_bytes_as_they_are(tmp_path, monkeypatch):
    """click's path errors put U+FFFD in place of a file name's bytes that are not UTF-8, so the name shown was
    not the name given ("Path 'a\\nb\ufffd' does not exist"): every path option's error shows them escaped as the
    package's own messages do (\\udcff), for inputs and outputs."""
    import os

    monkeypatch.chdir(tmp_path)
    os.mkdir(os.fsencode(tmp_path) + b"/d\xfe")
    for args, shown in ((["gen", "--ckpt", "a\nb\udcff"], r"Path 'a\nb\udcff' does not exist"),
                        (["gen", "--out", "d\udcfe", "-n", 1], r"File 'd\udcfe' is a directory"),
                        (["eval", "--samples", "s\udcfd.npz"], r"'s\udcfd.npz' does not exist")):
        r = invoke(*args)
        assert r.exit_code == 2 and shown in r.output and "\ufffd" not in r.output, r.output


def test_result_lines_show_odd_output_names_on_one_line(ckpt, tmp_path, monkeypatch):
    """gen's last line printed the output path raw: a newline in it split the line in two, and bytes that are not
    UTF-8 went to the terminal as they are. Result lines show paths as error lines do (errors.shown)."""
    monkeypatch.chdir(tmp_path)
    for name, shown in (("g\nh.png", r"-> g\nh.png"), ("g\udcff.png", r"-> g\udcff.png")):
        r = invoke("gen", "--ckpt", ckpt, "--engine", "torch", "-n", 1, "--steps", 2, "-q", "--out", name)
        assert r.exit_code == 0 and r.output.count("\n") == 1 and r.output.rstrip().endswith(shown), r.output


def test_minus_zero_is_zero_in_plans_and_lines(ckpt, tmp_path):
    """-0 made a second plan of the same table: "ddim6-eta-0" beside "ddim6-eta0" (a second generator built and
    recorded for identical digits), and result lines said "guidance -0". -0 is read as 0 by the CLI and the API."""
    import ddpm

    model = ddpm.load(ckpt)
    zero = model.plan(sampler="ddim", steps=6, eta=0.0).name
    assert model.plan(sampler="ddim", steps=6, eta=-0.0).name == zero
    assert model.plan(sampler="ddim", steps=6, eta=np.float32(-0.0), guidance_interval=(-0.0, 3.0)).name == \
        model.plan(sampler="ddim", steps=6, guidance_interval=(0.0, 3.0)).name
    r = invoke("gen", "--ckpt", ckpt, "--engine", "torch", "-n", 1, "--sampler", "ddim", "--steps", 6, "--eta", "-0",
               "-w", "-0", "--guidance-interval", "-0,3", "-q", "--out", tmp_path / "m.npz")
    assert r.exit_code == 0 and "-0" not in r.output and f"{zero.split('-gi')[0]}-gi0-3" in r.output, r.output


@pytest.mark.parametrize("sig, stop", [("SIGTERM", "Terminated"), ("SIGINT", "KeyboardInterrupt")])
def test_a_signal_that_a_native_import_turns_into_an_import_error_still_stops(monkeypatch, sig, stop):
    """A signal while onnxruntime's extension initialises: pybind11 turns the handler's exception into ImportError
    "initialization failed" (numpy's C API into "import numpy failed", no chain), and `bench` took it for
    onnxruntime missing: it skipped the engine, wrote an empty result and exited 0. The signal stops the command."""
    import os
    import signal
    import sys

    from ddpm import errors, signals
    from ddpm.runtime.nets import import_onnxruntime

    class NativeInit:
        def find_spec(self, name, path=None, target=None):
            if name == "onnxruntime":
                try:
                    os.kill(os.getpid(), getattr(signal, sig))
                    signal.sigtimedwait([], 1) if hasattr(signal, "sigtimedwait") else None
                except BaseException:
                    raise ImportError("import numpy failed") from None

    monkeypatch.delitem(sys.modules, "onnxruntime", raising=False)
    monkeypatch.setattr(sys, "meta_path", [NativeInit(), *sys.meta_path])
    # SIGINT at its default (a test run in the background of a non-interactive shell inherits it ignored)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    exit_now = signals.exit_on_signals()
    try:
        with pytest.raises(getattr(errors, stop, KeyboardInterrupt)) as e, signals.signals_as_interrupt():
            import_onnxruntime("the onnx engine")
    finally:
        signals.restore_signals(exit_now)
        signal.signal(signal.SIGINT, before)
    assert not isinstance(e.value, errors.DdpmError)
