"""`ddpm export` as a chain of steps: checkpoint -> ONNX (verified) -> generator (verified) -> TensorRT -> web page.

Each step is its module's function (onnx_export.export, generator.add_generator, trt.ensure_engine, web.write_page);
this one runs them in order into one export folder, which only gains artifacts (onnx_export.export). Every failure
is a DdpmError whose message says that nothing was written.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DdpmError
from ..runtime.bundle import Bundle, ExportError


def check_trt() -> None:
    """DdpmError, before any work, when TensorRT cannot run here (not installed, no GPU)."""
    from .trt import TensorRTUnavailable, gpu_name, import_trt

    try:
        import_trt(), gpu_name()
    except TensorRTUnavailable as e:
        raise DdpmError(str(e)) from None


def claim_outputs(model, out: str | Path | None = None, web: str | Path | None = None) -> None:
    """Refuse, before any work, an export folder `out` (default: the cache folder of `model`'s weights) or a page
    folder `web` that the export of `model` (api.Model) may not replace (files.claim_dir: a non-empty folder that
    is not one of these, or one of other weights holding files ddpm did not write), or whose export.json (which
    every export writes again) or a page file its owner made read-only (files.check_writable: refused, not
    replaced). Raises DdpmError (one line)."""
    from ..files import check_writable, claim_dir
    from ..runtime.bundle import META_FILE
    from .cache import EXPORT_FOLDER, cache_folder, same_weights
    from .web import claim_page

    folder = out or cache_folder(model.hash)
    claim_dir(folder, EXPORT_FOLDER, same_weights(model.hash))
    check_writable(Path(folder) / META_FILE)
    if web is not None:
        claim_page(web, model.hash)


def export_folder(model, out: str | Path | None = None, fp16: bool = False, opset: int = 17, plan=None,
                  form: str = "loop", trt_batches: tuple[int, int] | None = None, log=print, int8=None,
                  guidance: float | None = None) -> Bundle:
    """Export `model` (api.Model with a checkpoint) into `out` (default: its weights' cache folder, where gen and
    bench look): model.onnx (+ model_fp16.onnx, + model_int8.onnx calibrated on int8 = (images, labels, name):
    onnx_export.export), then, with a plan, its generator (export/generator.py, verified
    with the guidance scale `guidance`, None: the model's, cache.model_guidance), and with int8 its int8 generator beside it, then with trt_batches (lo, hi) a
    TensorRT engine per precision. log(line): progress. Raises DdpmError (OptionError for a plan the generator
    cannot run, PictureChannels for a generator of a model whose images are not grey or RGB pictures: both checked
    before any work)."""
    from ..model.io import LoadedModel
    from .cache import cache_folder, locked, model_guidance
    from .generator import check_form, check_image_shape, check_plan

    if plan is not None:
        check_image_shape(model.image_shape)
        check_plan(plan)
        check_form(form, "fp32" if int8 is None else "int8")
    loaded = LoadedModel(model.torch_model, model.cfg, model.hash, model.path, model.info)
    folder = Path(out or cache_folder(model.hash))
    # one writer at a time (cache.locked, as gen's first-use builds): another export publishing the folder would
    # sweep away the temporaries this one writes inside it
    with locked(folder, waiting=lambda: log(f"waiting for another export into {folder} to end"),
                beside=None if out is None else "choose another --out"):
        return _export_folder(loaded, folder, fp16, opset, plan, form, trt_batches, log, int8,
                              model_guidance(model) if guidance is None else guidance)


def _export_folder(loaded, folder: Path, fp16: bool, opset: int, plan, form: str, trt_batches, log, int8,
                   guidance: float) -> Bundle:
    """export_folder's work, in the export folder `folder` it holds the lock of."""
    from .generator import GeneratorFailed, add_generator
    from .onnx_export import ExportFailed, export

    try:
        res = export(loaded, folder, fp16=fp16, opset=opset, log=log, int8=int8)
    except ExportFailed as e:
        raise DdpmError(f"export failed, nothing written: {e}") from None
    precisions = [] if plan is None else ["fp32", "int8"] if int8 is not None else ["fp32"]
    for precision in precisions:
        what = "generator.onnx" if precision == "fp32" else f"the {precision} generator.onnx"
        if _has_generator(res.out, plan, form, precision):
            log(f"{what} for {plan.name} ({form}): kept (made and verified before)")
            continue
        log(f"building {what} for {plan.name} in {res.out}")
        try:
            add_generator(res.out, plan, guidance, form, log=log, precision=precision)
        except GeneratorFailed as e:
            raise DdpmError(f"generator export failed, nothing written: {e}") from None
    bundle = Bundle.load(res.out)
    if trt_batches is not None:
        from .trt import ensure_engine

        for precision in [p for p in res.meta["files"] if p != "int8"]:   # int8 is onnxruntime's, on a CPU
            log(f"TensorRT {precision}: {ensure_engine(bundle, precision, *trt_batches, log=log)}")
    return bundle


def _has_generator(root: Path, plan, form: str, precision: str = "fp32") -> bool:
    """Whether the export folder `root` holds an intact generator of `plan`, `form` and `precision` (recorded in
    export.json with its verification, matching its sha256, and for int8 holding the folder's model_int8.onnx): then
    it is kept, as the export keeps an intact model.onnx."""
    from ..runtime.runner import plan_key

    try:
        Bundle.load(root).generator_path(plan_key(plan), form, precision)
    except ExportError:
        return False
    return True


def write_web_page(bundle: Bundle, folder, plan, options: str, ort_web=None, log=print,
                   guidance: float | None = None) -> Path:
    """The static page around the generator of `plan` in the export folder `bundle` (export/web.py), starting at the
    guidance scale `guidance` (None: the default one, or the plan the folder's model records: a student's); DdpmError
    (export.web.WebExportError, runtime.bundle.ExportError) when it fails, runtime.images.GreyOnly (before any
    work) for a colour model: the page draws grey levels."""
    from ..options import Sampling
    from ..runtime.runner import plan_key
    from .generator import check_image_shape
    from .web import write_page

    check_image_shape(bundle.image_shape, page=True)
    if guidance is None:
        guidance = Sampling().with_recorded(bundle.plan, ()).guidance
    return write_page(bundle, folder, guidance, options, ort_web, log=log, plan_key=plan_key(plan))
