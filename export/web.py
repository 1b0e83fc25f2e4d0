"""`ddpm export --web DIR`: a static page that generates digits in the browser with generator.onnx.

DIR holds everything a static file server needs, and nothing runs on the server:

    index.html, app.mjs   the page (from export/page/): pick a class, a guidance scale and a seed, press Generate;
                          it draws the digits and the time they took
    labels.mjs            the class choices and the labels they send, from model.json (the model's classes only)
    noise.mjs             runtime/noise.py's stream (Philox4x32-10 + Box-Muller) in JavaScript, bit for bit
    generator.onnx        the export folder's generator (export/generator.py), sha256-checked
    model.json            what the page needs to know: plan, image shape, classes, null label, default guidance
    ort/                  onnxruntime-web's WebAssembly build: ort.wasm.min.mjs, ort-wasm-simd-threaded.{mjs,wasm}

onnxruntime-web comes from its npm package, pinned below by version and by the sha512 integrity that the registry
publishes for it. `npm pack` fetches the tarball once (any npm, with its own registry settings); the tarball is
checked against the pinned integrity and kept in ~/.cache/ddpm/npm, and the three files above are taken from it.
A machine without npm can pass the same tarball with --ort-web (it is checked the same way).

Serve DIR with any static server that gives .mjs a JavaScript type and .wasm application/wasm (e.g.
`python -m http.server -b 127.0.0.1 -d DIR`). Without cross-origin isolation headers (COOP/COEP) the browser gives
WebAssembly one thread.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import DdpmError
from ..schema import json_loads
from ..files import FolderKind, building_dir, check_writable, claim_dir, input_path, publish_owned
from ..options import MAX_GUIDANCE
from ..runtime.bundle import Bundle

ORT_WEB = {
    "package": "onnxruntime-web",
    "version": "1.30.0",
    "integrity": "sha512-q0y+JrrtukXSzsBWEMccVfqX25LRmosXHF+CaRJmg8pZClzcV7svNc4rKY3jL02Vb7QmRMDs1SigqR4CXAfKYQ==",
}
ORT_FILES = ("dist/ort.wasm.min.mjs", "dist/ort-wasm-simd-threaded.mjs", "dist/ort-wasm-simd-threaded.wasm",
             "package.json")
PAGE_FILES = ("index.html", "app.mjs", "labels.mjs", "noise.mjs")
PAGE_SRC = Path(__file__).with_name("page")
MARKER = "model.json"   # a folder with the model.json of write_page (_page_of) is a page this command wrote
MARKER_KEYS = ("checkpoint_hash", "generator_sha256", "onnxruntime_web")
MARKER_MAX_BYTES = 1 << 20   # a page's model.json is under 1 KB: a larger one is not read, and not a page's
# every file write_page writes, its subfolder's included: each one made read-only by its owner is refused (claim_page)
PAGE_WRITES = (MARKER, *PAGE_FILES, "generator.onnx", *(f"ort/{Path(rel).name}" for rel in ORT_FILES))


# `ddpm export --web --int8`: onnxruntime-web runs the int8 generator (QuantizeLinear/DequantizeLinear around int8
# Convs) without error, but an int8 model's digits depend on the kernels that run it: a quantized activation one
# rounding step off moves later ones, and the differences grow over the rows. Measured in headless Chromium on the
# tiny test model (UniPC-4, 12 digits, seed 5, w = 1): the page's canvas differs from `ddpm gen --int8`'s by up to
# 164 grey levels, 1428 of 74,896 pixels by more than 2 (mean 0.25), where the fp32 page stays within 2. Native
# onnxruntime alone gives the same spread between its graph optimization levels (up to 129 grey levels), so this is
# no fault of the page: the page's promise, the digits of `ddpm gen` for the same seed, holds at fp32 only.
INT8_REFUSAL = ("--web writes the fp32 page only: onnxruntime-web runs the int8 generator, but int8 digits depend on "
                "the kernels, and the page's differed from `ddpm gen --int8`'s by up to 164 grey levels for the same "
                "seed; export --int8 without --web, and the page in its own `ddpm export --web`")


class WebExportError(DdpmError):
    """The page cannot be written; the message says why and what to do."""


# the page as a folder output (files.claim_dir): what write_page writes besides model.json; anything else is a user's
PAGE = FolderKind("a page written by `ddpm export --web`", MARKER, "a page of other weights", "--web",
                  re.compile(r"^(index\.html|app\.mjs|labels\.mjs|noise\.mjs|generator\.onnx|ort/)$"), WebExportError)


def _page_of(checkpoint_hash: str) -> Callable[[Path], bool | None]:
    """files.claim_dir's `same` for a page folder: None when its model.json is missing or not one write_page wrote
    (not a JSON object with MARKER_KEYS, larger than MARKER_MAX_BYTES, not a regular file), else whether its page is
    of the weights `checkpoint_hash`."""
    def same(folder: Path) -> bool | None:
        try:
            path = input_path(folder / MARKER, WebExportError)
            if path.stat().st_size > MARKER_MAX_BYTES:
                return None
            record = json_loads(path.read_text(encoding="utf-8"))
        except (WebExportError, OSError, ValueError):   # UnicodeDecodeError and JSONDecodeError are ValueErrors
            return None
        if not isinstance(record, dict) or not all(k in record for k in MARKER_KEYS):
            return None
        return record["checkpoint_hash"] == checkpoint_hash

    return same


def claim_page(out: str | Path, checkpoint_hash: str) -> None:
    """Refuse, before any work, a folder that a page of the weights `checkpoint_hash` may not replace
    (files.claim_dir, PAGE): a non-empty folder that is not a page, or a page of other weights holding files
    write_page does not write, or a file of the page made read-only by its owner (files.check_writable: refused,
    not replaced). Raises WebExportError, files.OutputError (a path that is not a folder, a read-only file)."""
    claim_dir(out, PAGE, _page_of(checkpoint_hash))
    for name in PAGE_WRITES:
        check_writable(Path(out) / name)


# The first `npm pack` try: long enough for the 30 MB tarball on a slow link, short enough to say at once that a
# registry does not answer (npm's own fetch timeout is 5 minutes, with retries).
NPM_FIRST_TRY_S = 120

def cache_dir() -> Path:
    """Where the fetched tarball is kept: $XDG_CACHE_HOME/ddpm/npm, else ~/.cache/ddpm/npm (locations.cache_dir)."""
    from ..locations import cache_dir as user_cache

    return user_cache("npm")


def integrity(path: Path) -> str:
    """npm's integrity string of a file: 'sha512-' + base64(sha512)."""
    h = hashlib.sha512()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha512-" + base64.b64encode(h.digest()).decode()


def _checked(path: Path, name: str | None = None) -> Path:
    """path when it holds the pinned tarball (ORT_WEB's integrity); WebExportError naming it (`name`, default the
    path) otherwise."""
    got = integrity(path)
    if got != ORT_WEB["integrity"]:
        raise WebExportError(f"{name or path} is not {ORT_WEB['package']} {ORT_WEB['version']}: its integrity is "
                             f"{got[:30]}..., expected {ORT_WEB['integrity'][:30]}...")
    return path


# npm's error codes (`npm error code X`) that a later try can cure; the others (no network, no such host, refused,
# no such package) fail the same way at once
TRANSIENT = {"ECONNRESET", "ETIMEDOUT", "ESOCKETTIMEDOUT", "EPIPE", "E429", "E500", "E502", "E503", "E504"}
_OFFLINE = {"ENOTFOUND": "the registry's host name cannot be resolved (offline, or no DNS)",
            "EAI_AGAIN": "the registry's host name cannot be resolved (offline, or no DNS)",
            "ECONNREFUSED": "the registry refused the connection",
            "ENETUNREACH": "the network is unreachable (offline)",
            "EHOSTUNREACH": "the registry's host is unreachable",
            "ETIMEDOUT": "the connection to the registry timed out",
            "ECONNRESET": "the connection to the registry was reset",
            "E404": "the registry has no such package",
            "EINTEGRITY": "the downloaded tarball does not match its integrity (a damaged npm cache?)"}


def _npm_lines(stderr: str) -> list[str]:
    """npm's error lines without their prefix ('npm error ' since npm 10, 'npm ERR! ' before)."""
    out = []
    for line in stderr.splitlines():
        for prefix in ("npm error", "npm ERR!"):
            if line.startswith(prefix):
                out.append(line[len(prefix):].strip())
    return out


def npm_error_code(stderr: str) -> str | None:
    """The code of npm's error report ('npm error code ENOTFOUND' -> 'ENOTFOUND'), or None."""
    for line in _npm_lines(stderr):
        if line.startswith("code "):
            return line.split()[1]
    return None


def npm_failure(stderr: str, returncode: int) -> str:
    """One line saying why `npm pack` failed, from its stderr: what its error code means (offline, the registry
    unreachable, no such package), with the URL npm tried, else npm's own first message line, else its exit status."""
    code = npm_error_code(stderr)
    lines = _npm_lines(stderr)
    url = next((w for ln in lines for w in ln.split() if w.startswith(("http://", "https://"))), None)
    where = f" ({url})" if url else ""
    if code in _OFFLINE:
        return f"{_OFFLINE[code]}{where} [{code}]"
    skip = ("code ", "errno ", "syscall ", "at ", "A complete log", "{", "}")
    said = next((ln for ln in lines if ln and not ln.startswith(skip)), None)
    if said is None:
        said = next((ln.strip() for ln in reversed(stderr.splitlines()) if ln.strip()), None)
    if said:
        return f"{said[:300]}" + (f" [{code}]" if code else "")
    return f"npm exited with status {returncode} and said nothing"


def ort_web_tarball(given: str | Path | None = None, log=print) -> Path:
    """The pinned onnxruntime-web tarball, integrity-checked: `given`, else the cached one, else fetched with
    `npm pack` into the cache. WebExportError when none can be had."""
    if given is not None:   # a file: not a folder, a pipe (which would hold the reader up), a dead link
        return _checked(input_path(given, WebExportError, name=f"--ort-web {given}"), f"--ort-web {given}")
    name = f"{ORT_WEB['package']}-{ORT_WEB['version']}.tgz"
    cached = cache_dir() / name
    if cached.is_file():
        try:
            return _checked(cached)
        except WebExportError:
            cached.unlink()   # a damaged cache entry: fetch again
    npm = shutil.which("npm")
    spec = f"{ORT_WEB['package']}@{ORT_WEB['version']}"
    if npm is None:
        raise WebExportError(f"the web page needs {spec}: install npm (it fetches the package), or pass the "
                             f"tarball of `npm pack {spec}` with --ort-web")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WebExportError(f"cannot create the cache folder {cached.parent} ({e.strerror or e}): set "
                             f"$XDG_CACHE_HOME to a writable folder, or pass the tarball with --ort-web") from None
    log(f"fetching {spec} with npm (once, into {cached.parent})")
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        # the first try gives up at the first network error, so that an offline machine is told at once (npm's own
        # retries take over a minute); only errors that a retry can cure are tried again with npm's retries
        # (a registry that accepts connections and never answers: the first try waits NPM_FIRST_TRY_S at most)
        for retries, limit in ((["--fetch-retries=0", "--fetch-timeout=30000"], NPM_FIRST_TRY_S),
                               (["--fetch-timeout=30000"], 3 * NPM_FIRST_TRY_S)):
            try:
                # npm's own cache, logs and update check go into the temporary folder (removed after), not
                # ~/.npm, and it runs there, so that no project .npmrc of the user's working folder applies; the
                # user's ~/.npmrc (a registry, a proxy) still does
                r = subprocess.run([npm, "pack", spec, "--pack-destination", tmp, "--loglevel=error",
                                    f"--cache={Path(tmp) / 'npm-cache'}", "--no-update-notifier", *retries],
                                   capture_output=True, text=True, timeout=limit, cwd=tmp)
            except subprocess.TimeoutExpired:
                raise WebExportError(f"`npm pack {spec}` got no answer in {limit} s (is the npm registry reachable? "
                                     f"`npm config get registry` names it); pass the tarball of `npm pack {spec}` "
                                     f"made on a machine that can fetch it with --ort-web") from None
            except OSError as e:
                raise WebExportError(f"cannot run {npm} ({e.strerror or e}): install npm, or pass the tarball "
                                     f"of `npm pack {spec}` with --ort-web") from None
            if r.returncode == 0 or npm_error_code(r.stderr) not in TRANSIENT:
                break
        if r.returncode != 0:
            raise WebExportError(f"`npm pack {spec}` failed: {npm_failure(r.stderr, r.returncode)}; pass the tarball "
                                 f"of `npm pack {spec}` made on a machine that can fetch it with --ort-web")
        got = Path(tmp) / name
        if not got.is_file():
            raise WebExportError(f"`npm pack {spec}` wrote no {name}")
        _checked(got)
        os.replace(got, cached)
    return cached


def _extract(tarball: Path, dest: Path) -> None:
    """The ORT_FILES of the package tarball into dest (flat), by name: nothing else is read from the archive."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball, "r:gz") as tar:
        for rel in ORT_FILES:
            try:
                member = tar.getmember(f"package/{rel}")
            except KeyError:
                raise WebExportError(f"{tarball.name} has no {rel}") from None
            if not member.isfile():
                raise WebExportError(f"{tarball.name}: {rel} is not a regular file")
            with tar.extractfile(member) as src, open(dest / Path(rel).name, "wb") as out:
                shutil.copyfileobj(src, out)


def write_page(bundle: Bundle, out: str | Path, guidance: float, gen_options: str = "",
               ort_tarball: str | Path | None = None, log=print, plan_key: str | None = None) -> Path:
    """Write the page for the export folder's generator into `out` (module docstring).

    guidance: the page's default w; gen_options: the `ddpm gen` options of the generator's plan and model (shown
    with the equivalent command; `--export DIR` for a model other than the shipped one). The folder is built beside `out` and renamed into place (files.publish_owned): an existing
    `out` is replaced only when it is empty or a page this function wrote; what a page of the same weights holds
    besides the page's own files is carried over, and a page of other weights that holds such files is refused
    (claim_page). plan_key: the generator's plan (runtime.runner.plan_key; None: the folder's first generator).
    Raises WebExportError, ExportError, files.OutputError (a path that is not a folder).
    """
    out = Path(out)
    claim_page(out, bundle.meta["checkpoint_hash"])
    gen_path = bundle.generator_path(plan_key)
    tarball = ort_web_tarball(ort_tarball, log)
    with building_dir(out) as tmp:   # tagged: a killed write's folder is removed by the next one (files.clean_stale)
        for name in PAGE_FILES:
            shutil.copyfile(PAGE_SRC / name, tmp / name)
        shutil.copyfile(gen_path, tmp / "generator.onnx")
        _extract(tarball, tmp / "ort")
        gen, meta = bundle.generator(plan_key), bundle.meta
        model = {"plan": gen["plan"], "steps": gen["steps"], "form": gen["form"], "guidance": guidance,
                 "max_guidance": MAX_GUIDANCE,   # gen's range of w, which the page's form holds to too
                 "gen_options": gen_options, "image_shape": meta["image_shape"], "num_classes": meta["num_classes"],
                 "null_label": meta["null_label"], "checkpoint_hash": meta["checkpoint_hash"],
                 "generator_sha256": gen["sha256"], "onnxruntime_web": ORT_WEB}
        (tmp / MARKER).write_text(json.dumps(model, indent=1) + "\n")
        # the old page is moved aside only now that the new one is complete
        publish_owned(tmp, out, PAGE, _page_of(meta["checkpoint_hash"]))
    return out
