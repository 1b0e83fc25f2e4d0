"""The export cache: where the onnx, trt and onnx-generator engines find the export folder of a model's weights.

    shipped_dir()              assets/default_export: the shipped model's model.onnx and the generator of the
                               default plan (installed with the package, never written to)
    cache_folder(hash)         $XDG_CACHE_HOME/ddpm/exports/<weights hash> (locations.cache_dir): one export folder
                               per weights, made on first use, that only gains artifacts (an fp16 model, generators
                               of more plans, TensorRT engines side by side)

One process at a time changes a cache folder (a lock file beside it, held while exporting or adding a generator);
the others wait, then find what it made: several processes that need the same generator build it once. Reading
needs no lock (every file and export.json are replaced atomically).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from ..errors import DdpmError
from ..files import FolderKind
from ..runtime.bundle import (EXPORT_FORMAT, META_FILE, Bundle, ExportError, export_command, plan_names,
                              plan_refusal, read_meta, same_folder, shipped_export_dir)

# An export folder as a folder output (files.claim_dir), for every writer of one (onnx_export.export, _seed): besides
# export.json, ddpm export writes the models, the generators (export/generator.py), TensorRT engines and their records
# (runtime/trt.py) and the timing cache (export/trt.py); anything else in it is a user's.
EXPORT_FOLDER = FolderKind("an export folder", META_FILE, "files of other weights", "--out", re.compile(
    r"^(model(_fp16|_int8)?\.onnx|generator-.+\.onnx|.+\.plan(\.json)?|timing\.cache)$"))


def same_weights(weights_hash: str | None) -> Callable[[Path], bool | None]:
    """files.claim_dir's `same` for an export folder: None without export.json, True for a valid export of these
    weights (of any weights for None) and for a damaged one whose export.json, refused, still names these weights
    (the export repairs it: the user's files in it are carried over, as from a valid one), False for another (other
    weights, or an export.json that does not load and names no weights)."""
    def same(root: Path) -> bool | None:
        if not (root / META_FILE).is_file():
            return None
        try:
            Bundle.load(root, expected_hash=weights_hash)
        except ExportError:
            try:
                raw = read_meta(root / META_FILE)
            except ExportError:
                return False
            return (weights_hash is not None and isinstance(raw, dict) and raw.get("format") == EXPORT_FORMAT
                    and raw.get("checkpoint_hash") == weights_hash)
        return True

    return same


def shipped_dir() -> Path:
    """The verified ONNX export shipped with the default model (with the default plan's generator)."""
    return shipped_export_dir()


def cache_folder(weights_hash: str) -> Path:
    """The cache export folder of these weights (locations.cache_dir)."""
    from ..locations import cache_dir

    return cache_dir("exports", weights_hash[:16])


def _lock_file(folder: Path) -> Path:
    """Where the lock of export folder `folder` lives (the folder itself is replaced by renames, so not in it): for
    the cache's folders `.<name>.lock` beside them; for any other folder (a user's `--out`) a file of the cache's
    `locks/` folder named by the hash of the folder's real path, so that nothing is left in the user's folders, or
    beside the folder when the cache cannot be used."""
    from ..locations import cache_dir

    try:
        exports = cache_dir("exports")
        if os.path.realpath(folder.parent) != os.path.realpath(exports):
            locks = cache_dir("locks")
            locks.mkdir(parents=True, exist_ok=True)
            return locks / f"{hashlib.sha256(os.fsencode(os.path.realpath(folder))).hexdigest()[:32]}.lock"
    except (OSError, DdpmError):
        pass
    folder.parent.mkdir(parents=True, exist_ok=True)
    return folder.parent / f".{folder.name}.lock"


@contextmanager
def locked(folder: Path, waiting=None, beside: str | None = None):
    """Wait for, then hold, the lock of an export folder (the cache's or `ddpm export --out`'s): flock on its lock
    file (_lock_file). waiting(): called once when another process holds it, before waiting. Released when the block
    ends or the process dies. Where files cannot be locked: nothing. OutputError when the lock file cannot be made:
    beside, the hint of a folder that is not the cache's."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    from ..files import OutputError

    try:
        fd = os.open(_lock_file(folder), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        from ..locations import in_the_way

        why = in_the_way(folder.parent) or e.strerror   # "File exists" for a link to nothing on the way says little
        if beside is not None:
            raise OutputError(f"cannot write in {folder.parent} ({why}); {beside}") from None
        raise OutputError(f"cannot use the cache folder {folder.parent} ({why}); set $XDG_CACHE_HOME to a "
                          f"writable folder, pass an export folder (--export), or use --engine torch") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting()
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:   # file systems without locks
            pass
        yield
    finally:
        os.close(fd)


def _has(root: Path, weights_hash: str | None, fp16: bool, int8: bool = False, plan=None) -> Bundle | None:
    """The export folder at root when it is one of these weights recording this plan (the model's, Model.recorded:
    None for none), with an fp16 / int8 model when asked, else None."""
    if not (root / META_FILE).is_file():
        return None
    try:
        b = Bundle.load(root, expected_hash=weights_hash)
    except ExportError:
        return None
    files = b.meta["files"]
    return b if (not fp16 or "fp16" in files) and (not int8 or "int8" in files) and b.plan == plan else None


def _own_plan(model, b: Bundle) -> None:
    """ExportError (one line) when the export folder `b` the model was loaded with records another plan than the
    model file (Model.recorded; a folder loaded alone is its own record)."""
    if model.path is not None:
        why = plan_refusal(b.root, b.plan, model.recorded, f"the model file {model.path}")
        if why is not None:
            raise ExportError(why)


def export_bundle(model, fp16: bool = False, int8: bool = False) -> Bundle:
    """The export folder the onnx and trt engines of `model` (api.Model) read, with a model of the precision asked
    for (fp16, int8; else fp32). An export folder the model was loaded with (model.export_given: `ddpm.load(export=)`,
    `--export`) is read as it is, whatever folder it is, the shipped one included: a precision it lacks is an error
    naming it. Otherwise the shipped folder for the shipped weights when it holds that precision (fp32), else the
    cache folder of the weights, exported there on first use (needs PyTorch) with what the call needs: fp32, and
    fp16 when `fp16` asks for it (added to the folder by the first call that does). An int8 model is never made on
    first use (its calibration reads MNIST): `ddpm export --int8` makes it. Raises DdpmError."""
    expected = model.hash   # an export folder that changed since load() read it is refused
    own = model.export_dir
    asked = "fp16" if fp16 else "int8" if int8 else None
    if own is not None and (getattr(model, "export_given", False) or not same_folder(own, shipped_dir())):
        try:
            b = Bundle.load(own, expected_hash=expected)      # the user's folder: as it is
        except ExportError as e:   # the command that repairs it writes these weights into it, not into the cache
            raise ExportError(re.sub(r"re-run `ddpm export(?: --(fp16|int8))?`( for it)?$", lambda m: "re-run `"
                                     + export_command(expected, own, m.group(1) or "fp32", model.path) + "`",
                                     str(e))) from None
        b.ckpt = model.path
        _own_plan(model, b)
        why = None if asked is None else b.missing(asked)
        if why is not None and same_folder(own, shipped_dir()):
            why = (f"{own} has no {asked} model: the shipped export folder holds "
                   f"{', '.join(b.meta['files'])} only and is never written; leave out --export (ddpm.load's "
                   f"export=) to use the {asked} model of these weights in the cache folder, which "
                   f"`{export_command(expected, None, asked)}` makes")
        if why is not None:
            raise ExportError(why)
        return b
    shipped = _has(shipped_dir(), expected, fp16, int8, model.recorded) if own is not None else None
    if shipped is not None:
        shipped.ckpt = model.path
        return shipped
    folder = cache_folder(model.hash)
    ready = _has(folder, expected, fp16, int8, model.recorded)
    if ready is not None:
        ready.ckpt = model.path
        return ready
    if int8 or model.path is None:   # an int8 model is made by `ddpm export --int8` only; a model without weights
        raise ExportError(f"no {asked} model of these weights in {folder}: make it with "   # cannot be exported
                          f"`{export_command(expected, folder, asked, model.path)}`"
                          + (" (calibrated on MNIST)" if int8 else ""))
    with locked(folder):
        ready = _has(folder, expected, fp16, plan=model.recorded)   # another process may have made it meanwhile
        if ready is None:
            _export(model, folder, fp16)
    b = Bundle.load(folder, expected_hash=expected)
    b.ckpt = model.path
    return b


def _export(model, folder: Path, fp16: bool) -> None:
    from ..model.io import TorchMissing, require_torch

    try:
        require_torch("exporting this checkpoint to ONNX (once, for the onnx engine)")
    except TorchMissing as e:
        raise DdpmError(f"{e}; or pass an export folder made elsewhere with `ddpm export`") from None
    from ..files import OutputError
    from ..model.io import LoadedModel
    from .onnx_export import ExportFailed, export

    loaded = LoadedModel(model.torch_model, model.cfg, model.hash, model.path, model.info)
    try:
        # only what this call needs: an fp16 model nobody asked for must not fail (or slow) an fp32 call; what the
        # folder holds already (fp32, generators) is kept
        export(loaded, folder, fp16=fp16, log=lambda *_: None)
    except ExportFailed as e:
        raise DdpmError(f"export failed: {e}") from None
    except OutputError as e:   # the cache is not writable
        raise DdpmError(f"{e}; the first use of a checkpoint exports it to ONNX there: set $XDG_CACHE_HOME to a "
                        f"writable folder, pass an export folder (--export), or use --engine torch") from None


def engine_bundle(model, name: str, fp16: bool = False, plan=None, dist=None, log=None,
                  int8: bool = False) -> Bundle | None:
    """The export folder engine `name` of `model` reads (None for the torch engines): export_bundle, or for
    onnx-generator generator_bundle(plan). dist: under torchrun, the process group (rank, world, barrier()): rank 0
    makes what is missing while the others wait. log(line): where a build says what it does (None: nowhere)."""
    from ..runtime.engines import NEEDS_EXPORT

    if name not in NEEDS_EXPORT:
        return None
    prepare = (lambda: model.generator_bundle(plan, log=log, int8=int8)) if name == "onnx-generator" else \
        (lambda: model.bundle(fp16, int8))
    if dist is not None and dist.world > 1:
        if dist.rank == 0:
            prepare()
        dist.barrier()
    return prepare()


def generator_bundle(model, plan, form: str = "loop", log=None, int8: bool = False) -> Bundle:
    """An export folder with a generator for `plan` (export/generator.py): the model's own export folder, or the
    shipped one, when it has one; else the cache folder of the weights, where it is built and verified on first use
    (needs the onnx package), beside the generators of other plans, and found by every later call and process.
    int8: the int8 generator, from a folder with model_int8.onnx (export_bundle(int8=True): never made on first
    use, as its calibration reads MNIST).
    Raises DdpmError for a model whose images are not grey or RGB (generator.check_image_shape, before any export),
    a plan the generator cannot run, or the user's export folder without one for this plan."""
    from ..export.generator import GeneratorFailed, GeneratorUnsupported, add_generator, check_image_shape, check_plan
    from ..model.io import require_onnx
    from ..runtime.runner import plan_key

    check_image_shape(model.image_shape)
    try:
        check_plan(plan)
    except GeneratorUnsupported as e:   # a usage error naming the option that chose the plan
        raise GeneratorUnsupported(f"the onnx-generator engine: {e}", e.option) from None
    key, precision = plan_key(plan), "int8" if int8 else "fp32"
    source = export_bundle(model, int8=int8)
    if source.generator(key, precision=precision) is not None:
        return source
    shipped = same_folder(source.root, shipped_dir())
    # a folder given (--export) is read as it is (export_bundle); the shipped one otherwise, and the cache folder,
    # gain the generator in the cache folder
    if not same_folder(source.root, cache_folder(model.hash)) and (getattr(model, "export_given", False)
                                                                     or not shipped):
        gens = [g for g in source.generators if g.get("precision", "fp32") == precision]
        have = plan_names(gens, key, plan.name)
        asked = plan.name + (f" (key {key[:8]})" if any(g["plan"] == plan.name for g in gens) else "")
        what = "generator" if precision == "fp32" else f"{precision} generator"
        lacks = f"{source.root} has {f'{what}s for {have}' if have else f'no {what}'}, not one for {asked}"
        if shipped:
            raise DdpmError(f"{lacks}: the shipped export folder is never written; leave out --export (ddpm.load's "
                            f"export=) to build it in the cache folder of these weights")
        command = source.export_command(precision, model.path, " --generator")
        raise DdpmError(f"{lacks}: run `{command}` with that sampler and --steps"
                        + (f", {source.ckpt_word()}" if " CKPT" in command else ""))
    folder = cache_folder(model.hash)
    expected = model.hash
    with locked(folder):
        ready = _has(folder, expected, False, int8, model.recorded)
        if ready is not None and ready.generator(key, form, precision) is not None:
            ready.ckpt = model.path
            return ready
        require_onnx(f"building the generator for {plan.name}")
        if ready is None:            # the shipped weights: the cache folder starts as a copy of the shipped one
            _seed(source, folder)
        (log or (lambda *_: None))(f"building generator.onnx for {plan.name} in {folder} (once)")
        try:
            add_generator(folder, plan, model_guidance(model), form, log=log or (lambda *_: None),
                          precision=precision)
        except GeneratorFailed as e:
            raise DdpmError(f"the generator for {plan.name}: {e}") from None
        except (OSError, ExportError) as e:
            raise DdpmError(f"cannot add a generator to {folder}: {e}; set $XDG_CACHE_HOME to a writable folder, or "
                            f"make it with `ddpm export --generator` and pass that folder (--export)") from None
    b = Bundle.load(folder, expected_hash=expected)
    b.ckpt = model.path
    return b


def model_guidance(model) -> float:
    """The guidance scale gen samples `model` (api.Model) with by default: the default one, or the one its file
    records (a distilled student's, guidance folded in: options.recorded_plan). What a generator is verified with
    and a web page starts from."""
    from ..options import Sampling

    return Sampling().with_recorded(model.recorded, ()).guidance


def _seed(source: Bundle, folder: Path) -> None:
    """Make `folder` an export folder with the files of `source` (hard links where possible), published by one
    rename (files.publish_owned: what a user put into `folder` is kept, or the folder refused)."""
    from ..files import building_dir, claim_dir, publish_owned

    same = same_weights(source.meta["checkpoint_hash"])
    claim_dir(folder, EXPORT_FOLDER, same)
    with building_dir(folder) as tmp:
        for f in source.root.iterdir():
            if f.is_file() and not f.name.startswith("."):
                try:
                    os.link(f, tmp / f.name)
                except OSError:   # another file system, or links not allowed there
                    shutil.copyfile(f, tmp / f.name)
        publish_owned(tmp, folder, EXPORT_FOLDER, same)
