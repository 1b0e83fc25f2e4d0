"""`ddpm export --web DIR`: a static page that generates digits in the browser with generator.onnx.

DIR holds everything a static file server needs, and nothing runs on the server:

    index.html, app.mjs   the page (from export/page/): pick a class, a guidance scale and a seed, press Generate;
                          it draws the digits and the time they took
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
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from ..files import publish_dir, temp_dir
from ..runtime.bundle import Bundle

ORT_WEB = {
    "package": "onnxruntime-web",
    "version": "1.30.0",
    "integrity": "sha512-q0y+JrrtukXSzsBWEMccVfqX25LRmosXHF+CaRJmg8pZClzcV7svNc4rKY3jL02Vb7QmRMDs1SigqR4CXAfKYQ==",
}
ORT_FILES = ("dist/ort.wasm.min.mjs", "dist/ort-wasm-simd-threaded.mjs", "dist/ort-wasm-simd-threaded.wasm",
             "package.json")
PAGE_FILES = ("index.html", "app.mjs", "noise.mjs")
PAGE_SRC = Path(__file__).with_name("page")
MARKER = "model.json"   # a folder with it is a page this command wrote, and may be replaced


class WebExportError(Exception):
    """The page cannot be written; the message says why and what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddpm" / "npm"


def integrity(path: Path) -> str:
    """npm's integrity string of a file: 'sha512-' + base64(sha512)."""
    h = hashlib.sha512()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha512-" + base64.b64encode(h.digest()).decode()


def _checked(path: Path) -> Path:
    got = integrity(path)
    if got != ORT_WEB["integrity"]:
        raise WebExportError(f"{path} is not {ORT_WEB['package']} {ORT_WEB['version']}: its integrity is "
                             f"{got[:30]}..., expected {ORT_WEB['integrity'][:30]}...")
    return path


def ort_web_tarball(given: str | Path | None = None, log=print) -> Path:
    """The pinned onnxruntime-web tarball, integrity-checked: `given`, else the cached one, else fetched with
    `npm pack` into the cache. WebExportError when none can be had."""
    if given is not None:
        return _checked(Path(given))
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
    cached.parent.mkdir(parents=True, exist_ok=True)
    log(f"fetching {spec} with npm (once, into {cached.parent})")
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        try:
            subprocess.run([npm, "pack", spec, "--pack-destination", tmp, "--silent"], check=True,
                           capture_output=True, text=True, timeout=900)
        except subprocess.CalledProcessError as e:
            raise WebExportError(f"`npm pack {spec}` failed: {(e.stderr or e.stdout).strip()[-500:]}") from None
        except subprocess.TimeoutExpired:
            raise WebExportError(f"`npm pack {spec}` did not finish in 15 minutes") from None
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
               ort_tarball: str | Path | None = None, log=print) -> Path:
    """Write the page for the export folder's generator into `out` (module docstring).

    guidance: the page's default w; gen_options: the `ddpm gen` options of the generator's plan (shown with the
    equivalent command). The folder is built beside `out` and renamed into place; an existing `out` is replaced only
    when it is empty or a page this function wrote (it has model.json). Raises WebExportError, ExportError.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise WebExportError(f"{out} exists and is not a page written by `ddpm export --web`; choose another folder")
    gen_path = bundle.generator_path()
    tarball = ort_web_tarball(ort_tarball, log)
    tmp = temp_dir(out)   # tagged: a killed write's folder is removed by the next one (files.clean_stale)
    try:
        for name in PAGE_FILES:
            shutil.copyfile(PAGE_SRC / name, tmp / name)
        shutil.copyfile(gen_path, tmp / "generator.onnx")
        _extract(tarball, tmp / "ort")
        gen, meta = bundle.generator, bundle.meta
        model = {"plan": gen["plan"], "steps": gen["steps"], "form": gen["form"], "guidance": guidance,
                 "gen_options": gen_options, "image_shape": meta["image_shape"], "num_classes": meta["num_classes"],
                 "null_label": meta["null_label"], "checkpoint_hash": meta["checkpoint_hash"],
                 "generator_sha256": gen["sha256"], "onnxruntime_web": ORT_WEB}
        (tmp / MARKER).write_text(json.dumps(model, indent=1) + "\n")
        publish_dir(tmp, out)   # the old page is moved aside only now that the new one is complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
