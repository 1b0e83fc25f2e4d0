"""model_int8.onnx: model.onnx with int8 convolutions, for onnxruntime on a CPU (docs/int8.md has the figures).

onnxruntime's static quantization (onnxruntime.quantization.quantize_static) in QDQ form, as its notes advise for
x86 CPUs without VNNI: Conv nodes only (quantizing every op measured 42% eps error, Conv only 5%), weights int8 per
output channel, activations uint8 with min-max ranges, reduce_range (7-bit weights, so that the int16 sums of
CPUs without VNNI do not saturate). The steps:

    1. states the sampler visits: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (Ho et al. 2020, eq. 4) for real
       training digits x0, eps ~ N(0, I), at the t of every row of the default plan (options.DEFAULT_SAMPLER), each
       with its digit's label and with the null label (guided rows run both)
    2. calibration: the activation ranges of every Conv's input and output over CALIBRATION_DIGITS digits' states;
       the first and the last Conv (the image's: 1 channel in, 1 out) stay fp32 (IMAGE_CONVS_FP32)
    3. sensitivity: on the states of HELD_OUT_DIGITS other digits, the eps error of the model with every Conv
       quantized; when it is above MAX_EPS_ERROR, the eps error with one Conv alone quantized, for every Conv, and
       the Convs kept in fp32 in that order, most sensitive first, until the whole model's eps error is at most
       MAX_EPS_ERROR
    4. verification: the eps error on the states of HELD_OUT_DIGITS more digits, unseen so far, at most
       MAX_EPS_ERROR + TOLERANCE_MARGIN

The eps error is the relative L2 distance to the fp32 model over a set of states: ||eps_int8 - eps_fp32|| /
||eps_fp32||, every state's every pixel in one sum.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DdpmError, cut_at_file_size_limit
from ..runtime.bundle import INT8_MAX_EPS_ERROR, INT8_TOLERANCE_MARGIN

# The digits of each set (each digit at every row's t, with its label and with the null label: 2 S states each;
# S = 8 for the default plan). 64 calibration digits (1024 states) gave ranges whose eps error differed from
# 256 digits' by less than 0.1% (docs/int8.md).
CALIBRATION_DIGITS = 64
HELD_OUT_DIGITS = 32
# The sensitivity pass keeps Convs in fp32 until the eps error is at most this. The shipped model quantized so that
# its eps error was 2.5% scored within fp32's spread at N = 5000 (accuracy 99.30% vs 99.32%, FD / floor 1.46 vs
# 1.57), and at 3% it still keeps most of the speed (docs/int8.md).
MAX_EPS_ERROR = 0.03
# verify(): the eps error on unseen states may exceed the held-out one by this. The shipped model's errors on the
# held-out and the unseen states (32 digits each) were 2.09% and 2.08%, the tiny test model's 2.97% and 2.94%
# (docs/int8.md), so an error 1 point above the bound is not sampling noise but a model that does not generalise.
# A reader refuses a record whose tolerance exceeds the bound by more (runtime.bundle: one value for both).
TOLERANCE_MARGIN = INT8_TOLERANCE_MARGIN
# The Convs that read the image and write eps stay fp32: the sensitivity pass measured them as the shipped model's
# two most sensitive (eps error 1.47% and 1.13% with either alone int8; the next 0.66%), and with them fp32 (and the
# last row fp32, runtime.engines.INT8_FP32_SIGMA) the default sampler's digits differ from fp32's by 0.87 grey
# levels on average instead of 1.59, the border haze 75.8% instead of 80% (fp32 71.2%; docs/int8.md). Having one
# input or output channel, they cost little time.
IMAGE_CONVS_FP32 = True
BATCH = 16   # states per onnxruntime call (its CPU convolutions are fastest at about 16 images, runtime.nets)


class Int8Failed(DdpmError):
    """Quantization failed, or the int8 model is too far from the fp32 one; the message carries the figures."""


@dataclass
class States:
    """Network inputs: x (N,C,H,W) float32, t (N,) int64, y (N,) int64."""

    x: np.ndarray
    t: np.ndarray
    y: np.ndarray

    def batches(self, size: int = BATCH):
        for lo in range(0, len(self.t), size):
            yield {"x": self.x[lo:lo + size], "t": self.t[lo:lo + size], "y": self.y[lo:lo + size]}


def noised_states(images_u8: np.ndarray, labels: np.ndarray, abar: np.ndarray, timesteps, null_label: int,
                  seed: int) -> States:
    """Every digit x0 (images_u8 (N,H,W) uint8, labels (N,)) noised to every t of `timesteps`:
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, eps ~ N(0, I) from `seed` (DDPM eq. 4), x0 in [-1, 1]; each state
    twice, with its label and with `null_label`. abar: the schedule's (T,) alphas_cumprod. 2 N len(timesteps)
    states, float32."""
    rng = np.random.default_rng(seed)
    x0 = (images_u8.astype(np.float32) / 127.5 - 1.0)[:, None]
    xs, ts, ys = [], [], []
    for t in timesteps:
        a = np.float32(abar[int(t)])
        x = np.sqrt(a) * x0 + np.sqrt(1 - a) * rng.standard_normal(x0.shape, dtype=np.float32)
        for y in (labels, np.full_like(labels, null_label)):
            xs.append(x)
            ts.append(np.full(len(x), int(t), dtype=np.int64))
            ys.append(np.asarray(y, dtype=np.int64))
    return States(np.concatenate(xs).astype(np.float32), np.concatenate(ts), np.concatenate(ys))


def eps_of(session, states: States) -> np.ndarray:
    """The model's eps (N,C,H,W) float32 for every state, in batches of BATCH."""
    return np.concatenate([session.run(["eps"], b)[0] for b in states.batches()]).astype(np.float32)


def eps_error(eps: np.ndarray, reference: np.ndarray) -> float:
    """||eps - reference|| / ||reference|| (L2 over every state and pixel)."""
    return float(np.linalg.norm((eps - reference).ravel()) / max(np.linalg.norm(reference.ravel()), 1e-12))


def conv_nodes(path: Path) -> list[str]:
    """The names of the Conv nodes of an ONNX model, in graph order."""
    import onnx

    return [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]


@contextmanager
def _quiet():
    """onnxruntime.quantization logs advice (pre-processing) at WARNING on the root logger: not ours to print."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


class Quantizer:
    """quantize_static of one fp32 model with this module's settings, its activation ranges calibrated once.
    Everything it writes goes to `workdir`: quantize_static writes a shape-inferred copy beside its input
    (NAME-inferred.onnx), so the input is linked (or copied) into workdir first, and a kept model.onnx in the user's
    export folder never gets a stray file beside it."""

    def __init__(self, fp32: Path, calibration: States, workdir: Path):
        from onnxruntime import quantization as q

        workdir = Path(workdir)
        inside = workdir / Path(fp32).name
        try:
            os.link(fp32, inside)
        except OSError:   # another file system, or links not allowed there
            shutil.copy2(fp32, inside)
        self.q, self.fp32, self.calibration, self.workdir = q, inside, calibration, workdir
        # where quantize_static can keep the ranges in a file it reuses them; elsewhere every call calibrates again
        self.cache = workdir / "ranges.json" \
            if "calibration_cache_path" in inspect.signature(q.quantize_static).parameters else None

    def _reader(self):
        q = self.q
        batches = list(self.calibration.batches())

        class Reader(q.CalibrationDataReader):
            def __init__(self):
                self.it = iter(batches)

            def get_next(self):
                return next(self.it, None)

            def __len__(self):
                return len(batches)

        return Reader()

    def quantize(self, out: Path, exclude: list[str]) -> Path:
        """Write the model with every Conv but `exclude` quantized to `out`."""
        q = self.q
        kw = {"calibration_cache_path": str(self.cache)} if self.cache is not None else {}
        with _quiet():
            q.quantize_static(str(self.fp32), str(out), self._reader(), quant_format=q.QuantFormat.QDQ,
                              op_types_to_quantize=["Conv"], per_channel=True, reduce_range=True,
                              activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                              nodes_to_exclude=list(exclude), calibrate_method=q.CalibrationMethod.MinMax, **kw)
        return out


def _session(path: Path, threads: int | None = None):
    from .onnx_export import ort_session

    return ort_session(path, threads)


def sensitivity(quantizer: Quantizer, convs: list[str], held_out: States, reference: np.ndarray,
                max_error: float, log=print) -> dict:
    """Step 3 of the module docstring, the image's Convs kept fp32 first (IMAGE_CONVS_FP32): {"per_conv": {name:
    eps error with it alone int8}, "kept_fp32": [names], "eps_error": the final model's, "path": its file}.
    Int8Failed when no Conv can be int8 within max_error."""
    work = quantizer.workdir
    fixed = [convs[0], convs[-1]] if IMAGE_CONVS_FP32 and len(convs) > 2 else []
    path = quantizer.quantize(work / "all.onnx", fixed)
    err = eps_error(eps_of(_session(path), held_out), reference)
    log(f"int8: {len(convs) - len(fixed)} of {len(convs)} Convs int8, eps error {err:.2%}"
        + (f" (kept fp32: {', '.join(fixed)}, the image's)" if fixed else ""))
    if err <= max_error:   # nothing more to keep in fp32: the per-Conv pass would not change the model
        return {"per_conv": {}, "kept_fp32": fixed, "eps_error": err, "path": path}
    per_conv = {}
    for c in convs:
        if c not in fixed:
            one = quantizer.quantize(work / "one.onnx", [o for o in convs if o != c])
            per_conv[c] = eps_error(eps_of(_session(one), held_out), reference)
    order = sorted(per_conv, key=lambda c: -per_conv[c])
    kept: list[str] = [*fixed, order[0]]
    while True:
        path = quantizer.quantize(work / f"kept{len(kept)}.onnx", kept)
        err = eps_error(eps_of(_session(path), held_out), reference)
        log(f"int8: {len(convs) - len(kept)} of {len(convs)} Convs int8, eps error {err:.2%}"
            f" (kept fp32: {kept[-1]}, {per_conv[kept[-1]]:.2%} alone)")
        if err <= max_error:
            break
        if len(kept) == len(convs) - 1:
            raise Int8Failed(f"no Conv can be int8 within an eps error of {max_error:.1%}: with only the least "
                             f"sensitive one int8 the error is {err:.2%}")
        kept.append(order[len(kept) - len(fixed)])
    return {"per_conv": per_conv, "kept_fp32": kept, "eps_error": err, "path": path}


def verify(path: Path, fp32: Path, states: States, tolerance: float) -> dict:
    """Step 4: the eps error of the int8 model at `path` against the fp32 one on `states`; Int8Failed beyond
    `tolerance` or for non-finite outputs."""
    ref = eps_of(_session(fp32), states)
    out = eps_of(_session(path), states)
    if not np.isfinite(out).all():
        raise Int8Failed(f"{path.name} gives non-finite outputs (NaN or inf) where model.onnx's are finite")
    err = eps_error(out, ref)
    res = {"measure": "relative L2 eps error vs model.onnx (||eps_int8 - eps_fp32|| / ||eps_fp32||)",
           "error": err, "tolerance": tolerance, "states": int(len(states.t))}
    if not err <= tolerance:
        raise Int8Failed(f"{path.name} disagrees with model.onnx: eps error {err:.2%} > {tolerance:.1%} on unseen "
                         f"states")
    return res


def make_int8(fp32: Path, out: Path, images_u8: np.ndarray, labels: np.ndarray, abar: np.ndarray, timesteps,
              null_label: int, data_name: str = "", max_error: float | None = None, seed: int = 0,
              digits: tuple[int, int] = (CALIBRATION_DIGITS, HELD_OUT_DIGITS), log=print) -> dict:
    """Quantize the fp32 model at `fp32` into `out` (steps 1-4 of the module docstring) from the digits images_u8
    (N,H,W) uint8 with labels (N,) (needs sum(digits) + digits[1] of them: calibration, held-out, verification, drawn
    without repeats by `seed`), the schedule's abar (T,) and the plan `timesteps`. Returns export.json's record:
    parity (verify) and quantization (the recipe, the per-Conv sensitivity, the Convs kept fp32). Raises Int8Failed;
    DdpmError when there are too few digits. max_error None: MAX_EPS_ERROR."""
    max_error = MAX_EPS_ERROR if max_error is None else max_error
    if not 0 < max_error <= INT8_MAX_EPS_ERROR:   # what a reader of the record accepts (runtime.bundle)
        raise ValueError(f"max_error must be in (0, {INT8_MAX_EPS_ERROR:g}], got {max_error!r}")
    n_cal, n_held = digits
    need = n_cal + 2 * n_held
    if len(images_u8) < need:
        raise DdpmError(f"int8 calibration needs {need} digits, the data has {len(images_u8)}")
    pick = np.random.default_rng(seed).permutation(len(images_u8))[:need]
    sets = [pick[:n_cal], pick[n_cal:n_cal + n_held], pick[n_cal + n_held:]]
    states = [noised_states(images_u8[s], labels[s], abar, timesteps, null_label, seed + 1 + k)
              for k, s in enumerate(sets)]
    work = Path(tempfile.mkdtemp(prefix=".int8-", dir=out.parent))
    try:
        quantizer = Quantizer(fp32, states[0], work)
        convs = conv_nodes(fp32)
        reference = eps_of(_session(fp32), states[1])
        found = sensitivity(quantizer, convs, states[1], reference, max_error, log)
        shutil.move(str(found["path"]), str(out))
    except Exception as e:   # a file that onnx's C++ writer cut at the file-size limit without a word fails later
        cut = cut_at_file_size_limit(work)
        if cut is not None:
            raise cut from e
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    parity = verify(out, fp32, states[2], max_error + TOLERANCE_MARGIN)
    log(f"{out.name}: eps error {parity['error']:.2%} on unseen states (tolerance {parity['tolerance']:.0%})")
    recipe = {
        "method": "onnxruntime quantize_static, QDQ; Conv only; weights int8 per channel, activations uint8 "
                  "(min-max), reduce_range",
        "states": "x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps of training digits at each row's t, with the digit's "
                  "label and with the null label",
        "data": data_name, "timesteps": [int(t) for t in timesteps], "seed": seed,
        "calibration_digits": n_cal, "held_out_digits": n_held,
        "max_eps_error": max_error, "eps_error_held_out": found["eps_error"],
        "convs": len(convs), "kept_fp32": found["kept_fp32"],
        "sensitivity": {c: round(e, 6) for c, e in found["per_conv"].items()},
    }
    return {"parity": parity, "quantization": recipe}
