"""Export the EMA noise predictor to ONNX, verify it against PyTorch, write the metadata.

The chain (each step a function): to_onnx -> verify -> metadata -> publish. Everything is written into a temporary
folder beside the target and renamed into place only after verification passed (files.publish_dir: an existing
folder is moved aside only then), so a failed or killed export never leaves a folder that a runtime would trust.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DdpmError
from ..files import building_dir, check_writable, claim_dir, publish_owned, readable_name
from ..model.io import LoadedModel, copy_to, require_onnx
from ..runtime.bundle import (EXPORT_FORMAT, META_FILE, PARITY_TOLERANCE as TOLERANCE, Bundle, ExportError,
                              export_command, file_sha256)
from ..runtime.schedule import Schedule
from .cache import EXPORT_FOLDER, same_weights

INPUTS, OUTPUT = ("x", "t", "y"), "eps"
FILES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8.onnx"}
# verify() holds fp32 to TOLERANCE["fp32"] max abs error, fp16 to TOLERANCE["fp16"] max abs error relative to eps's
# scale (std of the fp32 reference output); runtime/bundle.py defines them, as a folder's records are checked there
# The least fp16 scale: fp16's smallest normal number 2^-14 (6.1e-5). Below it fp16 holds numbers on a fixed grid of
# 2^-24 (6.0e-8, the subnormals), so the error stops shrinking with eps: a network whose eps is near 0 (barely
# trained: the output layer starts at zero) measured max abs 1.4e-7..3.9e-7 at eps std 3e-8..3e-6. Against this
# floor the fp16 tolerance is at least 0.02 x 2^-14 = 1.2e-6, about 20 grid steps; a trained eps (std near 1) is
# measured against its std as before.
FP16_SCALE_FLOOR = 2.0**-14


class ExportFailed(DdpmError):
    """Export or its verification failed; the message carries the figures."""


def to_onnx(model: torch.nn.Module, path: Path, precision: str, opset: int = 17) -> None:
    """Trace eps_theta(x, t, y) to ONNX: x (B,C,H,W) float (C, H, W: model.cfg.image_shape, 1x28x28 for MNIST), t (B,)
    int64, y (B,) int64 as inputs, eps (B,C,H,W) as output, the batch dynamic; fp16 inputs and output for "fp16"."""
    dtype = torch.float16 if precision == "fp16" else torch.float32
    model = model.to(dtype).eval()
    args = (torch.zeros(2, *model.cfg.image_shape, dtype=dtype), torch.tensor([0, 1]),
            torch.tensor([0, model.cfg.null_label]))
    kw = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kw["dynamo"] = False   # the TorchScript exporter: present from torch 2.4 on, fast, no onnxscript needed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with open(path, "wb") as f:   # a file object: torch passes a name to C++ as UTF-8, which not every path is
            torch.onnx.export(model, args, f, input_names=list(INPUTS), output_names=[OUTPUT],
                              dynamic_axes={n: {0: "batch"} for n in (*INPUTS, OUTPUT)}, opset_version=opset,
                              do_constant_folding=True, **kw)


def ort_session(path: Path, threads: int | None = None):
    from ..runtime.nets import import_onnxruntime, ort_cpu_options

    ort = import_onnxruntime("verifying an export")

    with readable_name(path) as name:
        return ort.InferenceSession(name, ort_cpu_options(ort, threads), providers=["CPUExecutionProvider"],
                                    enable_fallback=0)   # no "EP Error" block printed and the same retried


def verify(path: Path, reference: torch.nn.Module, precision: str, T: int, batches=(1, 5), seed: int = 0) -> dict:
    """Compare onnxruntime with fp32 PyTorch on random inputs x (b, *reference.cfg.image_shape) for each batch b,
    t=0 and t=T-1 included; returns the figures. Raises ExportFailed beyond TOLERANCE or for non-finite outputs."""
    sess = ort_session(path)
    g = torch.Generator().manual_seed(seed)
    worst, scale = 0.0, 0.0
    for b in batches:
        x = torch.randn(b, *reference.cfg.image_shape, generator=g)
        t = torch.randint(0, T, (b,), generator=g)
        t[0] = 0
        t[-1] = T - 1
        y = torch.randint(0, reference.cfg.num_classes + 1, (b,), generator=g)
        with torch.no_grad():
            ref = reference(x, t, y).numpy()
        if not np.isfinite(ref).all():   # max() over NaN differences would read as "max abs error 0"
            raise ExportFailed(f"PyTorch's own output is not finite (NaN or inf) at batch {b}: the checkpoint's "
                               f"weights are broken (a diverged run?); export an earlier checkpoint")
        feed = {"x": x.numpy().astype(np.float16 if precision == "fp16" else np.float32), "t": t.numpy(), "y": y.numpy()}
        out = sess.run([OUTPUT], feed)[0].astype(np.float32)
        if out.shape != ref.shape:
            raise ExportFailed(f"{path.name}: output shape {out.shape} at batch {b}, expected {ref.shape}")
        if not np.isfinite(out).all():
            raise ExportFailed(f"{path.name} ({precision}) gives non-finite outputs (NaN or inf) at batch {b} where "
                               f"PyTorch's are finite" + (" (an fp16 overflow: use the fp32 model)"
                                                          if precision == "fp16" else ""))
        worst = max(worst, float(np.abs(out - ref).max()))
        scale = max(scale, float(ref.std()))
    err = worst / max(scale, FP16_SCALE_FLOOR) if precision == "fp16" else worst
    res = {"max_abs_error": worst, "eps_std": scale, "error": err, "tolerance": TOLERANCE[precision],
           "measure": "max abs error / max(eps std, 2^-14)" if precision == "fp16" else "max abs error",
           "batches": list(batches)}
    if not err <= TOLERANCE[precision]:
        raise ExportFailed(f"{path.name} ({precision}) disagrees with PyTorch: {res['measure']} {err:.3g} > "
                           f"{TOLERANCE[precision]:g} (max abs {worst:.3g}, eps std {scale:.3g})")
    return res


def metadata(loaded: LoadedModel, files: dict, opset: int) -> dict:
    import onnx

    cfg = loaded.cfg
    sched = Schedule.of(cfg)
    return {
        "format": EXPORT_FORMAT, "version": 1,
        "checkpoint_hash": loaded.hash, "checkpoint": Path(loaded.path).name, "step": loaded.info.get("step"),
        "model_config": cfg.to_dict(), "image_shape": list(cfg.image_shape),
        "num_classes": cfg.num_classes, "null_label": cfg.null_label,
        "schedule": cfg.schedule, "T": cfg.timesteps,
        "betas": sched.betas.tolist(), "alphas_cumprod": sched.alphas_cumprod.tolist(),
        "inputs": {"x": "float (B,C,H,W), fp16 in the fp16 model", "t": "int64 (B,)", "y": "int64 (B,)"},
        "outputs": {"eps": "same dtype and shape as x"},
        "opset": opset, "torch": torch.__version__, "onnx": onnx.__version__,
        "fp16_kept_in_fp32": ["timestep sinusoids (fp16 loses their phase at large t)",
                              f"GroupNorm mean/variance (fp16 sums over {cfg.image_size}x{cfg.image_size}xC "
                              f"overflow precision)"],
        "files": files,
        # the plan a distilled student was made for: part of the model (runtime.bundle.PLAN), none for another model
        **({"plan": loaded.info["plan"]} if loaded.info.get("plan") else {}),
    }


def _embed_metadata(path: Path, meta: dict) -> None:
    import onnx

    m = onnx.load(str(path))
    del m.metadata_props[:]
    for k, v in (("ddpm", json.dumps({k: v for k, v in meta.items() if k != "files"})),):
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(path))


def _holds(root: Path, weights_hash: str, precisions: list[str]) -> dict | None:
    """The metadata of a valid export of these weights in `root` with these precisions, else None."""
    try:
        meta = Bundle.load(root, expected_hash=weights_hash).meta
    except ExportError:
        return None
    return meta if all(p in meta["files"] for p in precisions) else None


def _damage(root: Path, meta: dict, opset: int) -> str | None:
    """What is wrong with the files an export at `opset` would keep of the loaded export folder `root` (export.json
    `meta`): its models when it was made at this opset, its generators at any; None when each passes the check every
    reader makes when it opens one (Bundle.onnx_path, Bundle.generator_path: the file is there, of the recorded size
    and sha256, with its record). Bundle.load checks export.json alone: a missing or damaged file is found here."""
    bundle = Bundle(root, meta)
    try:
        for precision in meta["files"] if meta.get("opset") == opset else []:
            bundle.onnx_path(precision)
        for g in bundle.generators:   # each record as itself, not only the first of its plan and precision
            bundle.checked_generator(g)
    except ExportError as e:
        return _fault(e)
    return None


def _fault(e: ExportError) -> str:
    """An export folder's refusal without its hint (the command to run), for a line that gives its own."""
    return re.split(r"[;:] re-(?:run|export) ", str(e))[0]


def _salvage(root: Path, loaded: LoadedModel, opset: int) -> tuple[dict, list]:
    """What of an export folder whose export.json is refused (Bundle.load) can be kept: (files {precision: entry},
    generators [entry]), each entry of that export.json that passes on its own every check a loaded folder's entry
    passes (Bundle.checked beside this checkpoint's own metadata: its record's schema and parity within its
    tolerance; Bundle._member: its file's size, sha256 and embedded record of these weights, config and schedule).
    Its models only at this opset, its fp32 generators at any (they hold their whole network, as in a folder whose
    export.json holds); model_int8.onnx and the generators were verified against model.onnx, so they are kept only
    with it (checked at the folder's opset), and an int8 generator only with its model_int8.onnx (_holding);
    model_fp16.onnx was verified against PyTorch and stands alone. A refused export.json is not trusted as a whole,
    but an entry that passes these checks on its own is the same evidence a trusted folder's entry gives: dropping
    it would lose an artifact that no fault touched."""
    from ..runtime.bundle import read_meta

    try:
        raw = read_meta(root / META_FILE)
    except ExportError:
        return {}, []
    if not isinstance(raw, dict) or not isinstance(raw.get("opset"), int) or not isinstance(raw.get("files"), dict):
        return {}, []
    # this checkpoint's own entries: what each kept file must agree with (at the folder's opset: its models check
    # its generators; only at this export's opset are the models themselves kept)
    own = metadata(loaded, {}, raw["opset"])
    files, generators = {}, []
    for precision in FILES:   # fp32 first: int8 is kept only with it
        entry = raw["files"].get(precision)
        if entry is None or precision == "int8" and "fp32" not in files:
            continue
        try:
            Bundle.checked(root, {**own, "files": {precision: entry}}, loaded.hash).onnx_path(precision)
        except ExportError:
            continue
        files[precision] = entry
    gens = raw.get("generators")
    for g in gens if "fp32" in files and isinstance(gens, list) else []:
        if isinstance(g, dict) and any(g.get("name") == k["name"] or all(g.get(f, "fp32") == k.get(f, "fp32") for f in
                                       ("plan_key", "form", "precision")) for k in generators):
            continue   # a second record of a kept one's file, or plan, form and precision
        try:   # an int8 generator holds model_int8.onnx too: kept only with it (Bundle.generator_path)
            Bundle.checked(root, {**own, "files": {p: files[p] for p in ("fp32", "int8") if p in files},
                                  "generators": [g]}, loaded.hash).generator_path(g["plan_key"], g["form"],
                                                                                  g.get("precision", "fp32"))
        except ExportError:
            # an int8 generator whose own file passes, beside a model_int8.onnx that does not: kept for now, and
            # after the export only if the int8 model made again is byte for byte the one it holds (_holding:
            # calibration is deterministic, so a repair that remakes it usually makes that file)
            if not (isinstance(g, dict) and g.get("precision") == "int8" and _passes_alone(root, own, files, g,
                                                                                           loaded.hash)):
                continue
        generators.append(g)
    if raw["opset"] != opset:   # its models are made again: only the generators, self-contained, stay
        return {}, _holding(generators, {})
    return files, generators


def _passes_alone(root: Path, own: dict, files: dict, gen: dict, weights_hash: str) -> bool:
    """Whether the int8 generator record `gen` and its file pass every check but the one against the folder's
    model_int8.onnx (its int8_sha256): a record of export.json's schema beside the kept fp32 model, a file of its
    size, sha256 and embedded record (Bundle._member)."""
    try:
        bundle = Bundle.checked(root, {**own, "files": {"fp32": files["fp32"]}, "generators": [gen]}, weights_hash)
        bundle._member(gen, "ddpm export", "generator")
    except ExportError:
        return False
    return True


def _holding(generators: list, files: dict) -> list:
    """The generator records that stay with the models `files` of a new export.json: an int8 generator holds the
    model_int8.onnx it was verified with (int8_sha256), so it goes when that model is not kept (dropped at another
    opset, or made again by a new calibration); the fp32 ones hold their whole network and stay."""
    int8 = (files.get("int8") or {}).get("sha256")
    return [g for g in generators if g.get("precision", "fp32") != "int8" or g.get("int8_sha256") == int8]


def _artifacts(root: Path) -> set[str]:
    """The names of what ddpm export writes (cache.EXPORT_FOLDER) that the folder holds, export.json aside."""
    try:
        return {e.name for e in root.iterdir() if EXPORT_FOLDER.written.match(e.name)}
    except OSError:
        return set()


def _listed(meta) -> set[str]:
    """The names of the ONNX files an export.json (parsed, checked or not) lists: its models and generators."""
    if not isinstance(meta, dict):
        return set()
    files, gens = meta.get("files"), meta.get("generators")
    entries = [*(files.values() if isinstance(files, dict) else []), *(gens if isinstance(gens, list) else [])]
    return {e["name"] for e in entries if isinstance(e, dict) and isinstance(e.get("name"), str)
            and EXPORT_FOLDER.written.match(e["name"])}


def _unlisted_model(meta: dict):
    """publish_owned's drop for an export folder: an ONNX file of the old folder that the new export.json does not
    list (a model dropped at another opset, a damaged file not made again) is not carried over, so that an export
    folder holds only the ONNX files it lists, as a replaced folder does. The rest (TensorRT engines, the user's
    files) is carried over."""
    listed = _listed(meta)
    return lambda e: (e.name.endswith(".onnx") and e.name not in listed and bool(EXPORT_FOLDER.written.match(e.name))
                      and not e.is_dir(follow_symlinks=False))


def _say_lost(root: Path, before: set[str], why: str, loaded: LoadedModel, log) -> None:
    """One line when the folder no longer holds artifacts it held before this export (names in `before`): which, why,
    and the command that adds them back (runtime.bundle.export_command)."""
    lost = sorted(before - _artifacts(root))
    if not lost:
        return
    int8 = FILES["int8"] in lost or any(n.startswith("generator-") and n.endswith("-int8.onnx") for n in lost)
    flags = [f for f, made in (("--fp16", FILES["fp16"] in lost), ("--int8", int8),
                                 ("--generator", any(n.startswith("generator-") for n in lost)),
                                 ("--trt", any(n.endswith((".plan", ".plan.json", ".cache")) for n in lost))) if made]
    gens = " (with the --sampler and --steps of each generator)" if "--generator" in flags else ""
    command = export_command(loaded.hash, root, ckpt=loaded.path, flags="".join(" " + f for f in flags))
    log(f"{root} no longer holds {', '.join(lost)} ({why}); add {'it' if len(lost) == 1 else 'them'} back with "
        f"`{command}`{gens}")


@dataclass
class ExportResult:
    out: Path
    meta: dict


def export(loaded: LoadedModel, out: str | Path, fp16: bool = False, opset: int = 17, log=print,
           replace: bool = True, int8=None) -> ExportResult:
    """checkpoint -> ONNX fp32 (+ fp16, + int8) -> verified -> metadata -> renamed into `out` (_publish).

    int8: the MNIST digits to calibrate an int8 model on, (images (N,H,W) uint8, labels (N,) int64, a name for
    export.json), or None for no int8 model (export/int8.py; an int8 model the folder holds at this opset is kept).

    An `out` that holds an export of the same weights only gains: the precisions it has at this opset are kept as
    they are (verified when they were made), the missing ones exported, and its other artifacts (generators,
    TensorRT engines, which check the ONNX file they were built from) carried over; at another opset every
    precision it had is exported again, int8 only when asked for (its calibration data), and an ONNX file the new
    export.json does not list is not carried over (_publish); everything else it holds (files and folders that ddpm
    export did not write included) is carried over too. A file it would keep that fails the check a reader makes
    (_damage: missing, another size or sha256) makes the folder repaired as one whose export.json is refused: what
    passes every check is kept (_salvage), the rest made again (int8 only when asked for). An `out` of other
    weights (or whose export.json does not load) is replaced, and only if it holds nothing but what ddpm export
    writes (files.claim_dir, cache.EXPORT_FOLDER). A line names what the folder no longer holds (_say_lost).
    replace=False: if `out` already holds these precisions (another process exported them first), it is left as it
    is. Raises ExportFailed (verification), files.OutputError (`out` not writable, a file it writes again read-only
    (files.check_writable, before any work), a folder that is not an export, or one of other weights that holds
    files ddpm did not write: it would replace them), TorchMissing (no onnx package)."""
    onnx = require_onnx("exporting to ONNX")
    out = Path(out)
    same = same_weights(loaded.hash)
    claim_dir(out, EXPORT_FOLDER, same)   # before any work: a folder it may not replace is refused
    old = _holds(out, loaded.hash, [])
    # what the folder held: its artifacts, and the files a valid export.json lists (one missing was held too: the
    # folder said so, and a reader looked for it)
    before = _artifacts(out) | _listed(old)
    wanted = ["fp32"] + (["fp16"] if fp16 else []) + (["int8"] if int8 is not None else [])
    kept, salvaged, why = {}, [], "this export did not make them again"
    refused, had = None, []
    if old is not None:
        refused = _damage(out, old, opset)
        if refused is not None:   # export.json holds, a file it names does not: repaired as a refused export.json
            log(f"repairing {out} ({refused}): what passes every check is kept, the rest made again")
            # what it held is made again, as at another opset: int8 only with its calibration data (--int8)
            had, old = [p for p in old["files"] if p != "int8"], None
    elif (out / META_FILE).is_file():
        try:
            Bundle.load(out, expected_hash=loaded.hash)
        except ExportError as e:
            refused = f"its export.json was refused: {_fault(e)}"
            _say_other_weights(out, loaded, log)
            if same(out):   # a damaged export.json of these weights (a hand-edited record): said, as a damaged file
                log(f"repairing {out} ({refused}): what passes every check is kept, the rest made again")
    plan = loaded.info.get("plan") or None
    if old is not None:
        if old.get("opset") == opset and old.get("plan") == plan:
            kept = dict(old["files"])
        elif old.get("plan") != plan:   # each model records the plan (its "ddpm" metadata): all made again
            why = ("exported from a model file of these weights with another plan; int8 is made again only with "
                   f"--int8")
        else:
            why = f"made at opset {old.get('opset')}; at opset {opset} int8 is made again only with --int8"
        # an int8 model needs its calibration data to be made again: at another opset it is dropped without it
        wanted = [p for p in FILES if p in wanted or p in old["files"] and (p != "int8" or p in kept)]
        if all(p in kept for p in wanted) or not replace and all(p in old["files"] for p in wanted):
            for precision in wanted:
                log(f"{FILES[precision]}: kept (made and verified before)")
            return ExportResult(out, old)
    elif refused is not None:
        # the entries that pass every check on their own are kept (_salvage), the rest made again or reported below
        why = refused
        kept, salvaged = _salvage(out, loaded, opset)
        wanted = [p for p in FILES if p in wanted or p in kept or p in had]
    # before any work: a file this export writes again that its owner made read-only is refused, not replaced
    for name in [META_FILE] + [FILES[p] for p in wanted if p not in kept]:
        check_writable(out / name)
    with building_dir(out) as tmp:
        files = {}
        if old is None:   # the refused folder is replaced, not carried over: the kept files go in with the rest
            for name in [kept[p]["name"] for p in kept] + [g["name"] for g in salvaged]:
                try:
                    os.link(out / name, tmp / name)
                except OSError:   # another file system, or links not allowed there
                    shutil.copy2(out / name, tmp / name)
        reference = copy_to(loaded.model, "cpu", torch.float32)   # whatever device or dtype the caller's model has
        for precision in wanted:
            if precision in kept:
                log(f"{FILES[precision]}: kept (made and verified before)")
                continue
            path = tmp / FILES[precision]
            if precision == "int8":
                files["int8"] = _int8(loaded, tmp / FILES["fp32"] if "fp32" in files else out / kept["fp32"]["name"],
                                      path, int8, log)
                continue
            to_onnx(copy_to(loaded.model, "cpu", torch.float32), path, precision, opset)
            with readable_name(path) as name:
                onnx.checker.check_model(name)
            parity = verify(path, reference, precision, loaded.cfg.timesteps)
            log(f"{FILES[precision]}: {parity['measure']} {parity['error']:.3g} (tolerance {parity['tolerance']:g})")
            files[precision] = {"name": FILES[precision], "parity": parity}
        meta = metadata(loaded, {p: files.get(p) or kept[p] for p in wanted}, opset)
        for precision, f in files.items():
            _embed_metadata(tmp / f["name"], meta)
            f["sha256"] = file_sha256(tmp / f["name"])
            f["bytes"] = (tmp / f["name"]).stat().st_size
        gens = old.get("generators", []) if old is not None else salvaged   # carried over with the folder (_publish)
        if gens := _holding(gens, meta["files"]):
            meta["generators"] = gens
        for g in salvaged:   # an int8 generator of an int8 model not made again as it was: not published
            if g not in gens:
                (tmp / g["name"]).unlink(missing_ok=True)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        keep = None if replace else lambda p: _holds(p, loaded.hash, list(files))
        if not publish_owned(tmp, out, EXPORT_FOLDER, same, keep, drop=_unlisted_model(meta)):
            return ExportResult(out, _holds(out, loaded.hash, list(files)))
        _say_lost(out, before, why, loaded, log)
        return ExportResult(out, meta)


def _say_other_weights(out: Path, loaded: LoadedModel, log) -> None:
    """Logs one line, before any work, when `out` holds a valid export of other weights than `loaded`'s: the
    export replaces it (a plain `ddpm export --out DIR` exports the shipped model), and the user's weights in it
    would otherwise go without a word."""
    try:
        meta = Bundle.load(out).meta
    except ExportError:
        return
    name = meta.get("checkpoint")
    log(f"{out} holds an export of other weights ({f'{name}, ' if isinstance(name, str) else ''}checkpoint_hash "
        f"{str(meta.get('checkpoint_hash'))[:12]}): replacing it with an export of {Path(loaded.path).name} "
        f"(checkpoint_hash {loaded.hash[:12]})")


def _int8(loaded: LoadedModel, fp32: Path, path: Path, data, log) -> dict:
    """model_int8.onnx from the verified fp32 model at `fp32` (export/int8.py), calibrated at the rows of the plan
    gen samples the model with by default (the default plan, or the plan its file records: a student's,
    options.recorded_plan); its export.json record. Raises ExportFailed."""
    from ..options import Sampling
    from ..runtime.samplers import make_plan
    from .int8 import Int8Failed, make_int8

    images, labels, name = data
    sched = Schedule.of(loaded.cfg)
    plan = make_plan(sched, **Sampling().with_recorded(loaded.info.get("plan"), ()).plan_args())
    try:
        rec = make_int8(fp32, path, images, labels, sched.alphas_cumprod, plan.timesteps[plan.calls_net],
                        loaded.cfg.null_label, name, log=log)
    except Int8Failed as e:
        raise ExportFailed(str(e)) from None
    return {"name": path.name, **rec}
