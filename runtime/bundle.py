"""An export folder, as a runtime sees it: the ONNX files, their metadata, the schedule; nothing else needed.

    export.json        metadata (also stored in each ONNX file's metadata_props): checkpoint hash, model config,
                       image shape, classes and the reserved label, schedule name, T, betas, alphas_cumprod, files
    model.onnx         fp32 eps_theta(x, t, y)
    model_fp16.onnx    fp16 weights/activations (timestep embedding and GroupNorm statistics in fp32), if exported
    model_int8.onnx    int8 convolutions (export/int8.py), if exported; export.json records how it was calibrated
    generator-*.onnx   the whole reverse loop of one deterministic plan in one model (export/generator.py), one per
                       plan, side by side; export.json's "generators" records each: its plan and its verification
    *.plan, *.plan.json  TensorRT engines and what they were built for (TensorRT version, GPU, batch range)
"""

from __future__ import annotations

import functools
import hashlib
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..errors import DdpmError, brief, clip
from ..files import input_path, refused
from ..options import MAX_GUIDANCE, MAX_LEVEL
from ..arguments import Level
from ..schema import Any, Const, Int, Invalid, List, Map, Num, Obj, Opt, Schema, Str, json_loads
from .samplers import SAMPLERS, SPACINGS
from .schedule import MAX_T, RECIPES, Schedule

EXPORT_FORMAT = "ddpm-export"
EXPORT_VERSION = 1   # export.json's "version": what this runtime reads (export/onnx_export.py writes it)
META_FILE = "export.json"
PRECISIONS = ("fp32", "fp16", "int8")
_SHA256 = Str(pattern=r"[0-9a-f]{64}", what="a sha256 (64 hex digits)")
class CheckedPath(type(Path())):
    """The path of an export folder's ONNX file that Bundle checked, with `data`, the bytes it checked (size, sha256,
    graph): the readers (runtime.nets.ort_session, export.trt.build_engine) load those bytes rather than open the
    path again, so that a file replaced after the check (another `ddpm export --out` of that folder, a hostile
    swap) never runs under the check of the one before. A path made from it (parent, with_suffix) holds no data."""

    data: bytes | None = None


def checked_path(path: Path, data: bytes) -> CheckedPath:
    """`path` as a CheckedPath holding `data`."""
    checked = CheckedPath(path)
    checked.data = data
    return checked


# a plain file name inside the folder: no separator, not hidden (so never "..")
_ONNX_NAME = Str(pattern=r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}\.onnx", what="an .onnx file name in the folder")
# export.json: 4.9 MB at the largest T a model config allows (runtime.schedule.MAX_T: two tables of T numbers, as
# `ddpm export` writes them), the shipped one (T = 1000) 50 kB; the rest is headroom for generator records
MAX_META_BYTES = 8 << 20
# JSON objects and arrays in export.json, bounded before it is parsed (each costs ~60 bytes of memory for 2 of text):
# an export writes a few per file and per generator, far below this
MAX_META_CONTAINERS = 100_000
MAX_ONNX_BYTES = 4 << 30    # an ONNX file: the largest model a config allows (model.config.MAX_PARAMS) is ~1 GiB
# bounds of export.json's other integers, far beyond any export's: ONNX opsets (24 in 2025), a verification's batch
# sizes, a training step (PyTorch's int64; model/io.py bounds a checkpoint's step by it too)
MAX_OPSET = 1000
MAX_BATCH = 1 << 32
MAX_STEP = (1 << 63) - 1
_PLAN_KEY = Str(pattern=r"[0-9a-f]{40}", what="a plan key (runtime.runner.plan_key: 40 hex digits)")
# a plan's or a file's name, a measure: what messages quote
_NAME = Str(pattern=r"[^\n]{1,200}", what="a string (one line of 1..200 characters)")
# The verification tolerances `ddpm export` holds its files to, and a folder's records are checked against: an eps
# model's (export/onnx_export.py verify: fp32 max abs error, fp16 max abs error relative to eps's scale; int8's is
# derived from its recipe, _check_int8) and a generator's (export/generator.py verify: max |generator - runtime| in
# grey levels of the uint8 images). A record with a looser tolerance vouches for nothing.
PARITY_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
GREY_TOLERANCE = 1
# files.*.parity (export/onnx_export.py verify): the measured error of an ONNX file against PyTorch. Optional in the
# schema, required by Bundle._check_consistent with the generators' (one rule, one message for every file)
PARITY = Obj({"measure": _NAME, "error": Num(min=0), "tolerance": Num(min=0, min_open=True)},
             {"max_abs_error": Num(min=0), "eps_std": Num(min=0), "batches": List(Int(min=1, max=MAX_BATCH))},
             what="a parity record (an object)")
# generator.parity (export/generator.py verify): the generator's largest difference from the runtime, per check
GENERATOR_PARITY = Obj({"tolerance_grey": Int(min=0, max=255), "max_abs_grey": Int(min=0, max=255),
                        "checks": List(Obj({"what": _NAME, "max_abs_grey": Int(min=0, max=255)}), min_len=1)},
                       {"reference": Str()}, what="a parity record (an object)")
# a generator's networks: model.onnx on every row, or model_int8.onnx with model.onnx on the int8 engine's fp32
# rows (export/generator.py networks); a record without "precision" is fp32
GENERATOR_PRECISIONS = ("fp32", "int8")
# an entry of export.json's "generators" (export/generator.py add_generator): what the runtime, the CLI and the web
# page read
GENERATOR = Obj({"name": _ONNX_NAME, "sha256": _SHA256, "bytes": Int(min=1, max=MAX_ONNX_BYTES),
                 "plan": _NAME, "plan_key": _PLAN_KEY, "steps": Int(min=1, max=MAX_T),
                 "form": Str(choices=("loop", "unrolled"))},
                {"parity": GENERATOR_PARITY, "opset": Int(min=1, max=MAX_OPSET),
                 "precision": Str(choices=GENERATOR_PRECISIONS), "fp32_timesteps": List(Int(min=0, max=MAX_T - 1)),
                 "int8_sha256": _SHA256},
                what="a generator record (an object)")
# files.int8 (export/int8.py make_int8): how model_int8.onnx was made, derived from the calibration that made it. Its
# eps error bound (max_eps_error: 3% by default) may be at most INT8_MAX_EPS_ERROR: quantizing every op measured 42%,
# Conv only 5%, so a bound above 10% admits a model that no longer computes the fp32 one; its verification's
# tolerance (parity) is that bound plus INT8_TOLERANCE_MARGIN, the error on unseen states that is still sampling
# noise (docs/int8.md). Checked when the folder is read (Bundle._check_int8), its Convs against the file's graph when
# the file is (Bundle._check_source, int8_convs).
INT8_MAX_EPS_ERROR = 0.1
INT8_TOLERANCE_MARGIN = 0.01
_ANY_LINE = Str(pattern=r"[^\n]{0,200}", what="a string (one line of at most 200 characters)")
QUANTIZATION = Obj({"method": _NAME, "states": _NAME, "data": _ANY_LINE,
                    "timesteps": List(Int(min=0, max=MAX_T - 1), min_len=1), "seed": Int(min=0, max=MAX_STEP),
                    "calibration_digits": Int(min=1, max=MAX_BATCH), "held_out_digits": Int(min=1, max=MAX_BATCH),
                    "max_eps_error": Num(min=0, max=INT8_MAX_EPS_ERROR, min_open=True),
                    "eps_error_held_out": Num(min=0, max=INT8_MAX_EPS_ERROR),
                    "convs": Int(min=1, max=MAX_BATCH), "kept_fp32": List(_NAME),
                    "sensitivity": Map(Num(min=0), keys=_NAME, what="an object of Conv name -> eps error")},
                   what="an int8 model's recipe (an object)")
# The plan a distilled student was made for (train/distill.py recorded_plan; options.recorded_plan applies it): part of
# the model wherever its weights go, in its model files' metadata (model/io.py), the distillation's ckpt.pt, an export
# folder's export.json and model.onnx's record (a model without one records none), and a diffusers folder's ddpm.json
PLAN = Obj({"sampler": Str(choices=SAMPLERS), "steps": Int(min=1, max=MAX_T), "spacing": Str(choices=SPACINGS),
            "eta": Num(min=0, max=1), "guidance": Num(min=0, max=MAX_GUIDANCE),
            "guidance_interval": Opt(List(Num(min=0, max=MAX_LEVEL), length=2))},
           # how it was distilled (train/distill.py): the guidance folded in, over which noise levels, from which
           # teacher and its steps; `ddpm distill` of a student reads the guidance folded in already
           {"distilled": Obj({"guidance": Num(min=0, max=MAX_GUIDANCE),
                              "guidance_interval": List(Level(), length=2), "teacher": _SHA256,
                              "teacher_steps": Int(min=1, max=MAX_T)}, what="a distillation record (an object)",
                             strict=True)},
           what="a sampling plan (an object)", strict=True)
# export.json: what a runtime reads from it (schema.py); T fixes the length of the schedule tables
META = Schema("ddpm export metadata (export.json)", {
    "format": Const(EXPORT_FORMAT),
    "version": Const(EXPORT_VERSION),
    "checkpoint_hash": _SHA256,
    "model_config": Map(Any(), what="a model config (an object)"),
    "image_shape": List(Int(min=1), length=3),
    "num_classes": Int(min=1),
    "null_label": Int(min=0),
    "schedule": Str(choices=RECIPES),
    "T": Int(min=2, max=MAX_T, dim="T"),
    "betas": List(Num(min=0, max=1, min_open=True), length="T"),
    "alphas_cumprod": List(Num(min=0, max=1, min_open=True), length="T"),
    "files": Map(Obj({"name": _ONNX_NAME, "sha256": _SHA256, "bytes": Int(min=1, max=MAX_ONNX_BYTES)},
                     {"parity": PARITY}),
                 keys=Str(choices=PRECISIONS), min_len=1, what="an object of precision -> ONNX file"),
}, optional={"generators": List(GENERATOR), "step": Opt(Int(min=0, max=MAX_STEP)), "checkpoint": _NAME,
             "opset": Int(min=1, max=MAX_OPSET), "plan": PLAN},
    hint="the folder is damaged or from another version; re-run `ddpm export`")


class ExportError(DdpmError):
    """An export folder that is missing, corrupted, stale or does not match the checkpoint asked for."""


def file_sha256(path: Path) -> str:
    """The sha256 (hex) of a file's bytes, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class _Proto:
    """A minimal reader of protobuf's wire format, enough to walk an ONNX file's messages without the onnx package
    (whose import alone costs seconds) and without copying the weights: `fields(lo, hi)` yields (field number, wire
    type, value) with value an int (varints, fixed widths) or the (lo, hi) span of a length-delimited field."""

    def __init__(self, buf: bytes):
        self.buf = buf

    def _varint(self, i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            if i >= len(self.buf) or shift > 63:
                raise ValueError("truncated or malformed varint")
            b = self.buf[i]
            value |= (b & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if b < 0x80:
                return value, i

    def fields(self, lo: int, hi: int):
        i = lo
        while i < hi:
            key, i = self._varint(i)
            field, wire = key >> 3, key & 7
            if wire == 0:
                value, i = self._varint(i)
            elif wire == 1:
                value, i = int.from_bytes(self.buf[i:i + 8], "little"), i + 8
            elif wire == 5:
                value, i = int.from_bytes(self.buf[i:i + 4], "little"), i + 4
            elif wire == 2:
                n, i = self._varint(i)
                value, i = (i, i + n), i + n
            else:
                raise ValueError(f"unsupported wire type {wire}")
            if i > hi:
                raise ValueError("a field runs past its message")
            yield field, wire, value


# onnx.proto: the fields that lead to TensorProtos (message -> {field number: kind of the field's message})
_ONNX_WALK = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}
_EXTERNAL = 1   # TensorProto.DataLocation.EXTERNAL


def external_data(buf: bytes) -> list[tuple[str, str]]:
    """(tensor name, location) of every tensor of an ONNX model (the file's bytes) whose data is stored outside the
    file, in the graph, subgraphs, functions and training graphs. ValueError when the bytes are not protobuf."""
    if b"location" not in buf:   # every external tensor names its file under the key "location": none here
        return []
    p, found = _Proto(buf), []

    def walk(kind: str, lo: int, hi: int, depth: int) -> None:
        if depth > 64:
            raise ValueError("messages nested too deep")
        if kind == "tensor":
            name, location, external = "", None, False
            for field, wire, value in p.fields(lo, hi):
                if field == 8 and wire == 2:
                    name = bytes(buf[value[0]:value[1]]).decode("utf-8", "replace")
                elif field == 13 and wire == 2:    # external_data: StringStringEntryProto {key = 1, value = 2}
                    entry = {f: bytes(buf[v[0]:v[1]]).decode("utf-8", "replace")
                             for f, w, v in p.fields(*value) if w == 2}
                    external = True
                    if entry.get(1) == "location":
                        location = entry.get(2, "")
                elif field == 14 and wire == 0 and value == _EXTERNAL:
                    external = True
            if external:
                found.append((name, location or ""))
            return
        sub = _ONNX_WALK[kind]
        for field, wire, value in p.fields(lo, hi):
            if wire == 2 and field in sub:
                walk(sub[field], *value, depth + 1)

    walk("model", 0, len(buf), 0)
    return found


def metadata_props(buf: bytes) -> dict[str, str]:
    """An ONNX model's metadata_props (ModelProto field 14: key -> value) from the file's bytes, read without the
    onnx package. ValueError when the bytes are not protobuf."""
    p, props = _Proto(buf), {}
    for field, wire, value in p.fields(0, len(buf)):
        if field == 14 and wire == 2:   # StringStringEntryProto {key = 1, value = 2}
            entry = {f: bytes(buf[v[0]:v[1]]).decode("utf-8", "replace") for f, w, v in p.fields(*value) if w == 2}
            props[entry.get(1, "")] = entry.get(2, "")
    return props


# ONNX TensorProto.DataType codes of the model's input x, per precision
_FLOAT, _FLOAT16 = 1, 10
# the nodes onnxruntime's quantize_static writes (QDQ format, export/int8.py), and the other int8 forms
_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul"}


def _graph_entries(buf: bytes):
    """(reader, text, entries) of an ONNX model's bytes: `entries` yields (field number, span) of each
    length-delimited entry of its GraphProto (node = 1, input = 11, output = 12, ...); text(span) is a string field's
    value. ValueError when the bytes are not protobuf."""
    p = _Proto(buf)

    def text(span) -> str:
        return bytes(buf[span[0]:span[1]]).decode("utf-8", "replace")

    def entries():
        for field, wire, value in p.fields(0, len(buf)):
            if field == 7 and wire == 2:   # ModelProto.graph
                yield from ((f, v) for f, w, v in p.fields(*value) if w == 2)
    return p, text, entries()


def graph_signature(buf: bytes) -> tuple[dict[str, int], list[str], set[str]]:
    """An ONNX model's graph, read from the file's bytes without the onnx package: its inputs (name -> element type,
    a TensorProto.DataType code, 0 when not a tensor), its output names, and the op types of its top-level nodes.
    ValueError when the bytes are not protobuf."""
    p, text, entries = _graph_entries(buf)
    inputs, outputs, ops = {}, [], set()
    for gfield, gvalue in entries:
        if gfield == 1:   # NodeProto: op_type = 4
            ops.update(text(v) for f, w, v in p.fields(*gvalue) if f == 4 and w == 2)
        elif gfield in (11, 12):   # ValueInfoProto: name = 1, type = 2 (TypeProto.tensor_type = 1: elem_type = 1)
            name, elem = "", 0
            for f, w, v in p.fields(*gvalue):
                if f == 1 and w == 2:
                    name = text(v)
                elif f == 2 and w == 2:
                    for tf, tw, tv in p.fields(*v):
                        if tf == 1 and tw == 2:
                            elem = next((ev for ef, ew, ev in p.fields(*tv) if ef == 1 and ew == 0), 0)
            if gfield == 11:
                inputs[name] = elem
            else:
                outputs.append(name)
    return inputs, outputs, ops


def int8_convs(buf: bytes) -> tuple[list[str], list[str]]:
    """(the names of an ONNX model's Conv nodes in graph order, those of them that run in fp32), read from the file's
    bytes without the onnx package. In the QDQ form quantize_static writes (export/int8.py) an int8 Conv takes its
    weight from a DequantizeLinear node; a Conv left fp32 (nodes_to_exclude) takes the float initializer itself.
    ValueError when the bytes are not protobuf."""
    p, text, entries = _graph_entries(buf)
    dequantized, convs = set(), []
    for gfield, gvalue in entries:
        if gfield != 1:   # GraphProto.node
            continue
        inputs, outputs, name, op = [], [], "", ""
        for f, w, v in p.fields(*gvalue):   # NodeProto: input = 1, output = 2, name = 3, op_type = 4
            if w != 2:
                continue
            if f == 1:
                inputs.append(text(v))
            elif f == 2:
                outputs.append(text(v))
            elif f == 3:
                name = text(v)
            elif f == 4:
                op = text(v)
        if op == "DequantizeLinear":
            dequantized.update(outputs)
        elif op == "Conv":
            convs.append((name, inputs[1] if len(inputs) > 1 else ""))
    return [name for name, _ in convs], [name for name, weight in convs if weight not in dequantized]


def model_precision(inputs: dict[str, int], ops: set[str]) -> str | None:
    """The precision of an eps model from its graph (graph_signature): fp16 takes x in float16, int8 holds
    quantization nodes (export/int8.py writes QDQ), fp32 neither; None for another input type."""
    if inputs.get("x") == _FLOAT16:
        return "fp16"
    if inputs.get("x") == _FLOAT:
        return "int8" if ops & _QUANT_OPS else "fp32"
    return None


# what each kind of ONNX file of an export folder takes and gives, and the metadata key its record is under
KINDS = {"model": ({"x", "t", "y"}, ["eps"], "ddpm"),
         "generator": ({"x_T", "labels", "guidance"}, ["images"], "ddpm_generator")}
# export.json entries the runtime reads that model.onnx's record ("ddpm") holds too: compared exactly
_SAME = ("image_shape", "num_classes", "null_label", "schedule", "T")
_TABLES = ("betas", "alphas_cumprod")
TABLE_TOLERANCE = 1e-9   # betas and alphas_cumprod: float64 tables, written by json (exact round trip)


def _tables_differ(a, b) -> bool:
    import numpy as np

    try:
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        return True
    return a.shape != b.shape or not bool(np.all(np.abs(a - b) <= TABLE_TOLERANCE))


def check_external_data(path: Path, redo: str = "ddpm export", buf: bytes | None = None) -> None:
    """ExportError when the ONNX file `path` stores any tensor outside itself (external data): `ddpm export` writes
    self-contained ONNX files, so the sha256 export.json records
    covers every weight, and a file whose weights lie elsewhere was not written by it. buf: the file's bytes, when the
    caller has read them."""
    try:
        tensors = external_data(path.read_bytes() if buf is None else buf)
    except ValueError as e:
        raise ExportError(f"{path} is not a readable ONNX file ({clip(e)}); re-run `{redo}`") from None
    if tensors:
        name, location = tensors[0]
        raise ExportError(f"{path}: the data of tensor {brief(name)} is stored outside the file (at "
                          f"{brief(location)}), which `ddpm export` never does: its sha256 would not cover it; "
                          f"re-run `{redo}`")


def plan_names(generators: list[dict], plan_key: str | None = None, plan: str | None = None) -> str:
    """The plans of generator records, for a message: their names, with the first 8 hex digits of their key where
    two plans (or one and the plan asked for, `plan`) share a name but not a key."""
    names = [g["plan"] for g in generators] + ([plan] if plan is not None else [])
    keys = [g["plan_key"] for g in generators] + ([plan_key] if plan is not None else [])
    clash = {n for n in names if len({k for m, k in zip(names, keys) if m == n}) > 1}
    return ", ".join(dict.fromkeys(f"{n} (key {k[:8]})" if n in clash else n
                                   for n, k in zip(names[:len(generators)], keys)))


def plan_text(plan) -> str:
    """A recorded plan (PLAN, or None) for a message: "ddim-4 trailing eta 0 guidance 0", or "none"."""
    if not isinstance(plan, dict):
        return "none" if plan is None else brief(plan, 64)
    return clip(f"{plan.get('sampler')}-{plan.get('steps')} {plan.get('spacing')} eta {plan.get('eta')} guidance "
                f"{plan.get('guidance')}" + ("" if plan.get("guidance_interval") is None else
                                             f" in {plan.get('guidance_interval')}"), 120)


def plan_refusal(root, exported, model, whose: str = "the model file") -> str | None:
    """Why the export folder `root`, whose export.json records the plan `exported` (None: none), cannot stand for a
    model whose file records the plan `model` (None: none), or None when they are the same: the recorded plan is
    part of the model (a distilled student's, options.recorded_plan), so an export of the same weights with another
    plan would sample other digits by default."""
    if exported == model:
        return None
    return (f"{root} records the plan {plan_text(exported)}, but {whose} records {plan_text(model)}: the folder was "
            f"exported from another model file of these weights; re-run `ddpm export` for it")


def read_meta(meta_path: Path):
    """export.json parsed, not yet checked (any JSON value), read within the bounds an export's metadata never
    exceeds (MAX_META_BYTES, MAX_META_CONTAINERS). ExportError (one line) for a file that is not one, too large or
    unreadable JSON."""
    input_path(meta_path, ExportError, "; re-run `ddpm export`")   # a file, not a folder, a pipe, a dead link
    try:
        size = meta_path.stat().st_size
        if size > MAX_META_BYTES:
            raise ExportError(f"{meta_path} holds {size >> 20} MiB, more than an export's metadata ever does "
                              f"({MAX_META_BYTES >> 20} MiB); re-run `ddpm export`")
        text = meta_path.read_bytes()
        containers = text.count(b"{") + text.count(b"[")
        if containers > MAX_META_CONTAINERS:
            raise ExportError(f"{meta_path} holds {containers} JSON objects and arrays, more than an export's "
                              f"metadata ever does ({MAX_META_CONTAINERS}); re-run `ddpm export`")
        return json_loads(text)
    except (OSError, ValueError, RecursionError) as e:
        raise ExportError(f"{meta_path} is unreadable ({clip(e)}); re-run `ddpm export`") from None


def shipped_export_dir() -> Path:
    """The verified ONNX export shipped with the default model, assets/default_export (export.cache.shipped_dir)."""
    return Path(__file__).resolve().parent.parent / "assets" / "default_export"


@functools.lru_cache(maxsize=1)
def shipped_hash() -> str | None:
    """The checkpoint_hash of the shipped weights, as the shipped export folder's export.json records it (None when
    it cannot be read): the weights `ddpm export` exports without --ckpt."""
    try:
        meta = read_meta(shipped_export_dir() / META_FILE)
    except ExportError:
        return None
    return meta.get("checkpoint_hash") if isinstance(meta, dict) else None


def same_folder(a, b) -> bool:
    """Whether two paths name one folder (their real paths agree)."""
    try:
        return os.path.realpath(a) == os.path.realpath(b)
    except (OSError, ValueError):
        return False


def export_command(weights_hash: str, root=None, precision: str = "fp32", ckpt=None, flags: str = "") -> str:
    """The command that writes the model of `precision` (and `flags`, e.g. " --generator") of the weights
    `weights_hash` into the export folder `root`: `ddpm export [--ckpt PATH] [--out ROOT] [--fp16|--int8]FLAGS`, the
    one builder of every hint that names an export (Bundle.export_command, export.cache's messages).
    --ckpt: left out for the shipped weights (the command's default model), else the path `ckpt` when the caller
    knows it, else the word CKPT (Bundle.ckpt_word says what it stands for). --out: left out for the cache folder of
    these weights (the command's default, export.cache.cache_folder) and for root None or the shipped folder, which
    is never written (the command then writes the cache folder)."""
    from ..locations import cache_dir

    parts = ["ddpm export"]
    if weights_hash != shipped_hash():
        parts.append(f"--ckpt {'CKPT' if ckpt is None else shlex.quote(str(ckpt))}")
    if root is not None and not same_folder(root, shipped_export_dir()):
        try:
            default = same_folder(root, cache_dir("exports", weights_hash[:16]))
        except DdpmError:   # no usable cache folder ($HOME unset): the folder is not the default one
            default = False
        if not default:
            parts.append(f"--out {shlex.quote(str(root))}")
    if precision != "fp32":
        parts.append(f"--{precision}")
    return " ".join(parts) + flags


@dataclass
class Bundle:
    """An export folder, loaded: its root and its export.json (meta), checked (Bundle.load). ckpt: the path of the
    checkpoint it was exported from when whoever loaded it knows it (export.cache gives the Model's), for the commands
    its messages give (export_command); None: they name it CKPT."""

    root: Path
    meta: dict
    ckpt: Path | None = None

    @classmethod
    def load(cls, root, expected_hash: str | None = None) -> "Bundle":
        root = Path(root)
        meta_path = root / META_FILE
        why = refused(meta_path)   # a name too long, a folder that cannot be searched: not "no export.json"
        if why is not None:
            raise ExportError(f"{why}; give the folder `ddpm export` wrote")
        if not os.path.exists(root):
            # an export killed between its two renames left the old folder aside (.NAME.<writer>.old): once its
            # writer is gone, put it back (files.clean_stale) rather than report no export
            from ..files import clean_stale

            clean_stale(root.parent, root.name)
        if not os.path.lexists(meta_path):
            if os.path.isfile(root):   # e.g. the folder's export.json given for the folder
                raise ExportError(f"{root} is a file, not an export folder: give the folder that holds "
                                  f"{META_FILE}")
            raise ExportError(f"{root} is not an export folder (no {META_FILE}); create one with `ddpm export`")
        return cls.checked(root, read_meta(meta_path), expected_hash)

    @classmethod
    def checked(cls, root, meta, expected_hash: str | None = None) -> "Bundle":
        """The export folder `root` with the metadata `meta` (parsed JSON, e.g. read_meta's), checked as `load`
        checks export.json: against META, its entries against each other, its checkpoint_hash against
        expected_hash. ExportError (one line naming the entry) otherwise."""
        root = Path(root)
        meta_path = root / META_FILE
        META.check(meta, meta_path, ExportError)
        cls._check_consistent(meta_path, meta)
        if expected_hash is not None and meta["checkpoint_hash"] != expected_hash:
            raise ExportError(f"{root} was exported from checkpoint {meta['checkpoint_hash'][:12]}, not from the "
                              f"checkpoint asked for ({expected_hash[:12]}); re-run `ddpm export` for it")
        return cls(root, meta)

    @staticmethod
    def _check_consistent(meta_path: Path, meta: dict) -> None:
        """The entries that must agree with each other: the model config with T, classes and the image shape."""
        from ..model.config import ModelConfig

        try:
            cfg = ModelConfig.from_dict(meta["model_config"]).validate()
        except (TypeError, ValueError) as e:
            raise ExportError(f"{meta_path}: invalid model_config ({clip(e)}); re-run `ddpm export`") from None
        want = {"T": cfg.timesteps, "num_classes": cfg.num_classes, "null_label": cfg.null_label,
                "schedule": cfg.schedule, "image_shape": [cfg.in_channels, cfg.image_size, cfg.image_size]}
        for k, v in want.items():
            if meta[k] != v:
                raise ExportError(f"{meta_path}: {k} is {brief(meta[k])} but its model_config says {brief(v)}; "
                                  f"re-run `ddpm export`")
        # the schedule tables the runtime samples with (betas) and picks int8's fp32 rows by (alphas_cumprod): those
        # of the config's schedule. Checked, not recomputed: an edited table is a damaged folder, said so, never used
        from .schedule import make_betas

        betas = make_betas(cfg.schedule, cfg.timesteps, cfg.beta_range, cfg.betas)
        import numpy as np

        for k, v in (("betas", betas), ("alphas_cumprod", np.cumprod(1.0 - betas))):
            if _tables_differ(meta[k], v):
                raise ExportError(f"{meta_path}: {k} is not the {cfg.schedule} schedule's of T = {cfg.timesteps} "
                                  f"that its model_config says (beyond {TABLE_TOLERANCE:g}); re-run `ddpm export`")
        from ..options import recorded_plan_refusal

        # a student's plan (PLAN): one that fits the model, as model.io.check_plan asks
        why = recorded_plan_refusal(meta.get("plan"), cfg)
        if why:
            raise ExportError(f"{meta_path}: {why}; re-run `ddpm export`")
        # one rule for every ONNX file the folder names (the eps models and the generators): `ddpm export` verifies
        # each against its reference before it records it, so an entry without its parity record, or whose record
        # is over its tolerance, names a file that was not verified or failed: refused
        entries = [(f"files.{p}", f, ("error", "tolerance")) for p, f in meta["files"].items()]
        entries += [(f"generators[{i}]", g, ("max_abs_grey", "tolerance_grey"))
                    for i, g in enumerate(meta.get("generators", []))]
        seen = {}
        for i, g in enumerate(meta.get("generators", [])):
            # one record per file and per plan, form and precision: a second one is one no reader would reach
            for what, key in (("file", g["name"]), ("plan, form and precision",
                                                    (g["plan_key"], g["form"], g.get("precision", "fp32")))):
                if (what, key) in seen:
                    raise ExportError(f"{meta_path}: generators[{i}] has the {what} of generators[{seen[what, key]}]; "
                                      f"re-run `ddpm export`")
                seen[what, key] = i
            missing = [k for k in ("fp32_timesteps", "int8_sha256") if k not in g]
            if g.get("precision") == "int8" and missing:
                raise ExportError(f"{meta_path}: generators[{i}], an int8 generator, records no {missing[0]}; "
                                  f"re-run `ddpm export`")
        for where, entry, (error, tolerance) in entries:
            if "parity" not in entry:
                raise ExportError(f"{meta_path}: {where} records no parity (the verification `ddpm export` records "
                                  f"for every file it writes): that file was not verified; re-run `ddpm export`")
            error, tolerance, key = entry["parity"][error], entry["parity"][tolerance], tolerance
            bound = GREY_TOLERANCE if key == "tolerance_grey" else PARITY_TOLERANCE.get(where[len("files."):])
            if bound is not None and tolerance > bound:
                raise ExportError(f"{meta_path}: {where}.parity.{key} is {tolerance:g}, above the {bound:g} that "
                                  f"`ddpm export` verifies with: that file's verification vouches for nothing; "
                                  f"re-run `ddpm export`")
            if error > tolerance:
                raise ExportError(f"{meta_path}: {where}.parity records an error of {error:g}, over its tolerance "
                                  f"{tolerance:g}: that file failed its verification; re-run `ddpm export`")
        if "int8" in meta["files"]:
            Bundle._check_int8(meta_path, meta["files"]["int8"], meta["T"])

    @staticmethod
    def _check_int8(meta_path: Path, entry: dict, T: int) -> None:
        """files.int8's recipe and verification, as make_int8 derives them: `quantization` present and within
        QUANTIZATION, its timesteps below T and distinct, its held-out error within its bound, fewer Convs kept fp32
        than the model has, each once; the parity tolerance at most the bound plus INT8_TOLERANCE_MARGIN (the error
        within it was checked with every file's). ExportError naming the entry otherwise."""
        where = f"{meta_path}: files.int8"
        redo = "re-run `ddpm export --int8`"
        if "quantization" not in entry:
            raise ExportError(f"{where} records no quantization (the recipe `ddpm export --int8` records with the "
                              f"file it makes); {redo}")
        try:
            QUANTIZATION.check(entry["quantization"], {}, "quantization")
        except Invalid as e:
            raise ExportError(f"{where}.{e}; {redo}") from None
        q = entry["quantization"]
        late = [t for t in q["timesteps"] if t >= T]
        if late:
            raise ExportError(f"{where}.quantization.timesteps holds {late[0]}, beyond the model's t = 0..{T - 1}; "
                              f"{redo}")
        for name in ("timesteps", "kept_fp32"):
            if len(set(q[name])) != len(q[name]):
                raise ExportError(f"{where}.quantization.{name} names an entry twice; {redo}")
        if q["eps_error_held_out"] > q["max_eps_error"]:
            raise ExportError(f"{where}.quantization records a held-out eps error of {q['eps_error_held_out']:g}, "
                              f"over its bound {q['max_eps_error']:g}; {redo}")
        if len(q["kept_fp32"]) >= q["convs"]:
            raise ExportError(f"{where}.quantization keeps {len(q['kept_fp32'])} of its {q['convs']} Convs fp32: "
                              f"an int8 model has at least one int8 Conv; {redo}")
        bound = q["max_eps_error"] + INT8_TOLERANCE_MARGIN
        if entry["parity"]["tolerance"] > bound + 1e-12:
            raise ExportError(f"{where}.parity.tolerance is {entry['parity']['tolerance']:g}, above its bound "
                              f"{bound:g} (quantization.max_eps_error + {INT8_TOLERANCE_MARGIN:g}); {redo}")

    @staticmethod
    def _check_int8_graph(path: Path, buf: bytes, entry: dict, where: str, redo: str) -> None:
        """ExportError unless files.int8's recipe says what model_int8.onnx's graph holds (int8_convs): its number
        of Convs and the ones kept fp32, by name. The rest of the recipe (errors, timesteps) is bounded when the
        folder is read (_check_int8); this is what can be derived from the file."""
        q = entry.get("quantization") or {}
        try:
            convs, fp32 = int8_convs(buf)
        except ValueError as e:
            raise ExportError(f"{path} is not a readable ONNX file ({clip(e)}); re-run `{redo}`") from None
        if q.get("convs") != len(convs):
            raise ExportError(f"{where}.quantization records {brief(q.get('convs'))} Convs, but {path.name} has "
                              f"{len(convs)}: the record is not of this file; re-run `{redo}`")
        kept = q.get("kept_fp32")
        if not isinstance(kept, list) or sorted(map(str, kept)) != sorted(fp32):
            raise ExportError(f"{where}.quantization.kept_fp32 is {brief(kept, 80)}, but {path.name} keeps "
                              f"{brief(fp32, 80)} fp32: the record is not of this file; re-run `{redo}`")

    @property
    def config(self):
        """The exported model's config (model.config.ModelConfig), checked when the folder was loaded."""
        from ..model.config import ModelConfig

        return ModelConfig.from_dict(self.meta["model_config"])

    @property
    def schedule(self) -> Schedule:
        """The schedule of the exported model's config (its tables checked against export.json's when loaded)."""
        return Schedule.of(self.config)

    @property
    def plan(self) -> dict | None:
        """The sampling plan the exported model records (export.json "plan", PLAN: a distilled student's), None when
        it records none."""
        return self.meta.get("plan")

    @property
    def null_label(self) -> int:
        return int(self.meta["null_label"])

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["image_shape"])

    def onnx_path(self, precision: str = "fp32") -> Path:
        """The ONNX file of a precision, checked against the sha256 recorded at export time."""
        why = self.missing(precision)
        if why is not None:
            raise ExportError(why)
        return self._member(self.meta["files"][precision], self.export_command(precision), "model", precision)

    def missing(self, precision: str) -> str | None:
        """Why the folder has no model of `precision` (one line, with the command that adds it: `hint`), or None
        when export.json lists one (its file is checked by onnx_path)."""
        files = self.meta["files"]
        if precision in files:
            return None
        return (f"{self.root} has no {precision} model (exported: {', '.join(files)}); add it with "
                f"{self.hint(precision)}")

    def export_command(self, precision: str = "fp32", ckpt=None, flags: str = "") -> str:
        """The command that writes this folder's model of `precision` (and `flags`, e.g. " --generator") again, into
        this folder: export.cache.export_command (the one builder of every export hint) with the checkpoint path
        `ckpt`, else the one the folder's loader knows (self.ckpt), else the word CKPT (`ckpt_word`)."""
        return export_command(self.meta["checkpoint_hash"], self.root, precision, ckpt or self.ckpt, flags)

    def hint(self, precision: str = "fp32", ckpt=None, flags: str = "") -> str:
        """export_command quoted for a message, followed by what CKPT stands for (`ckpt_word`) when it holds the
        word."""
        command = self.export_command(precision, ckpt, flags)
        return f"`{command}`" + (f", {self.ckpt_word()}" if " CKPT" in command else "")

    def ckpt_word(self) -> str:
        """What CKPT of `export_command` stands for, as a hint's clause: the checkpoint this folder was exported
        from, named by its file name and hash as export.json records them."""
        name = self.meta.get("checkpoint")
        return (f"CKPT the checkpoint this folder was exported from ({f'{name}, ' if isinstance(name, str) else ''}"
                f"checkpoint_hash {str(self.meta.get('checkpoint_hash'))[:12]})")

    @property
    def generators(self) -> list[dict]:
        """export.json's records of the folder's generators (name, plan, plan_key, form, parity), one per plan."""
        return list(self.meta.get("generators", []))

    def generator(self, plan_key: str | None = None, form: str | None = None,
                  precision: str = "fp32") -> dict | None:
        """The record of the generator for this plan_key (runtime.runner.plan_key; None: the only or first one),
        form (None: any, "loop" first) and precision (fp32 or int8: GENERATOR_PRECISIONS), or None when the folder
        has none."""
        found = [g for g in self.generators if plan_key in (None, g["plan_key"]) and form in (None, g["form"])
                 and g.get("precision", "fp32") == precision]
        found.sort(key=lambda g: g["form"] != "loop")
        return found[0] if found else None

    def generator_path(self, plan_key: str | None = None, form: str | None = None,
                       precision: str = "fp32") -> Path:
        """The generator file of a plan and precision (see `generator`), checked against its recorded sha256. An int8
        one also against model_int8.onnx's record (int8_sha256): it holds that model. ExportError when the folder
        has none for that plan, or it is damaged or of another int8 model."""
        gen = self.generator(plan_key, form, precision)
        if gen is None:
            have = plan_names([g for g in self.generators if g.get("precision", "fp32") == precision], plan_key)
            what = "generator" if precision == "fp32" else f"{precision} generator"
            command = self.export_command(precision, flags=" --generator")
            raise ExportError(f"{self.root} has no {what}" + (f" for the plan asked for (it has {have})" if have
                              else "") + f"; create one with `{command}` with that sampler and --steps"
                              + (f", {self.ckpt_word()}" if " CKPT" in command else ""))
        return self.checked_generator(gen)

    def checked_generator(self, gen: dict) -> Path:
        """The file of the generator record `gen` (one of `generators`), checked as generator_path checks the record
        it finds: every record of the folder can be checked as itself (`ddpm export` does so before it keeps them),
        not only the first of its plan and precision; an int8 one with model_int8.onnx and its record (onnx_path),
        so that both engines refuse a folder whose int8 record is false. ExportError when it is damaged or of another
        int8 model."""
        precision = gen.get("precision", "fp32")
        command = self.export_command(precision, flags=" --generator")
        if precision == "int8" and gen.get("int8_sha256") != self.meta["files"].get("int8", {}).get("sha256"):
            what = "another int8 model than the folder's model_int8.onnx" if "int8" in self.meta["files"] \
                else "an int8 model the folder no longer has"
            raise ExportError(f"{self.root / gen['name']} holds {what}; re-run `{command}`")
        if precision == "int8":   # the int8 model it holds is checked as the onnx engine checks it (its recipe too)
            self.onnx_path("int8")
        return self._member(gen, command, "generator")

    def _member(self, entry: dict, redo: str, kind: str, precision: str | None = None) -> Path:
        """The ONNX file of an export.json entry (name, sha256, bytes), checked: a regular file that resolves inside
        the folder (no link out of it), of the recorded size and sha256, that stores no tensor outside itself
        (check_external_data), and whose graph and record agree with export.json (_check_source): kind "model" (of
        this precision) or "generator". ExportError otherwise; `redo`: the command that writes it again."""
        path = self.root / entry["name"]
        root = self.root.resolve()
        if not os.path.lexists(path):
            raise ExportError(f"{path} is missing; re-run `{redo}`")
        input_path(path, ExportError, f"; re-run `{redo}`")   # a file, not a folder, a pipe, a dead link
        real = path.resolve()
        if real.parent != root:
            raise ExportError(f"{path} leads outside its export folder (to {real}); an export folder holds its own "
                              f"files: re-run `{redo}`")
        try:
            if real.stat().st_size != entry["bytes"]:   # before reading it: the recorded size is bounded (META)
                raise ExportError(f"{path} is corrupted or truncated (its size differs from export.json); "
                                  f"re-run `{redo}`")
            buf = real.read_bytes()   # one read for the hash and both walks
        except OSError as e:
            raise ExportError(f"{path} is unreadable ({clip(e)}); re-run `{redo}`") from None
        if hashlib.sha256(buf).hexdigest() != entry["sha256"]:
            raise ExportError(f"{path} is corrupted or truncated (its sha256 differs from export.json); "
                              f"re-run `{redo}`")
        check_external_data(real, redo, buf)
        self._check_source(path, buf, entry, redo, kind, precision)
        return checked_path(path, buf)

    def _check_source(self, path: Path, buf: bytes, entry: dict, redo: str, kind: str,
                      precision: str | None) -> None:
        """ExportError (one line naming the entry) unless the ONNX file is what its export.json entry says: a file of
        its kind (an eps model x, t, y -> eps of the entry's precision, read from the graph, or a generator x_T,
        labels, guidance -> images) that carries its kind's record (export/onnx_export.py "ddpm",
        export/generator.py "ddpm_generator") agreeing with export.json on everything the runtime takes from it:
        the weights (checkpoint_hash), the model config, image shape, classes, the reserved label, the schedule and
        its tables (a model's record), the plan, its steps and form (a generator's). The file is sha256-checked,
        export.json's other entries are not: a file's own record is what its weights were made for."""
        bad = f"{path} is not a readable ONNX file"
        try:
            props = metadata_props(buf)
            inputs, outputs, ops = graph_signature(buf)
        except ValueError as e:
            raise ExportError(f"{bad} ({clip(e)}); re-run `{redo}`") from None
        # the entry, named with its folder's export.json: a line in a log says which folder
        entry_name = f"files.{precision}" if kind == "model" else \
            f"generators[{next(i for i, g in enumerate(self.meta['generators']) if g is entry)}]"
        where = f"{self.root / META_FILE}'s {entry_name}"
        takes, gives, key = KINDS[kind]
        if set(inputs) != takes or outputs != gives:
            other = next((k for k, (i, o, _) in KINDS.items() if set(inputs) == i and outputs == o), None)
            sig = ", ".join(map(repr, list(inputs)[:8])) + " -> " + ", ".join(map(repr, outputs[:8]))
            order = {"model": "x, t, y -> eps", "generator": "x_T, labels, guidance -> images"}[kind]
            raise ExportError(f"{where} names {path.name}, which " + (f"is a {other}" if other else
                              f"takes {clip(sig)}") + f", not a {kind} ({order}): re-export the folder "
                              f"(re-run `{redo}`)")
        if kind == "model" and model_precision(inputs, ops) != precision:
            found = model_precision(inputs, ops)
            raise ExportError(f"{where} names {path.name}, which is " + (f"an {found} model" if found
                              else "a model of no precision ddpm writes") + f", not an {precision} one; "
                              f"re-run `{redo}`")
        if key not in props:
            raise ExportError(f"{path} lacks its {key!r} metadata (what it was exported from), which `ddpm export` "
                              f"always writes; re-run `{redo}`")
        try:
            recorded = json_loads(props[key])
        except (ValueError, RecursionError):
            recorded = None
        if not isinstance(recorded, dict):
            raise ExportError(f"{path}: its metadata entry {key!r} is not a JSON object; re-run `{redo}`")
        meta = self.meta
        want = {"checkpoint_hash": meta["checkpoint_hash"]}
        if kind == "generator":
            want.update({k: entry[k] for k in ("plan_key", "plan", "steps", "form")})
            # the networks it calls (GENERATOR_PRECISIONS): a record or a file without the field is fp32
            recorded.setdefault("precision", "fp32")
            want.update(precision=entry.get("precision", "fp32"))
            if "fp32_timesteps" in recorded or "fp32_timesteps" in entry:   # int8: the rows it runs at fp32
                want.update(fp32_timesteps=entry.get("fp32_timesteps"))
            want.update(null_label=meta["null_label"], image_shape=meta["image_shape"])
        else:
            want.update({k: meta[k] for k in _SAME})
            # the plan the model was made for (a student's; none: absent from both): the file's record is the model's
            if recorded.get("plan") != meta.get("plan"):
                raise ExportError(f"{path} records the plan {plan_text(recorded.get('plan'))}, not export.json's "
                                  f"{plan_text(meta.get('plan'))}: export.json or the file is of another export; "
                                  f"re-run `{redo}`")
        for field, value in want.items():
            if field not in recorded:
                raise ExportError(f"{path}: its {key!r} metadata lacks {field}; re-run `{redo}`")
            if recorded[field] != value:
                raise ExportError(f"{path} records {field} {brief(recorded[field], 64)}, not export.json's "
                                  f"{brief(value, 64)}: export.json or the file is of another export; re-run `{redo}`")
        if kind == "generator":
            return
        if precision == "int8":
            self._check_int8_graph(path, buf, entry, where, redo)
        from ..model.config import ModelConfig

        try:
            theirs = ModelConfig.from_dict(recorded.get("model_config")).validate()
        except (TypeError, ValueError, AttributeError) as e:
            raise ExportError(f"{path}: its {key!r} metadata holds an invalid model_config ({clip(e)}); "
                              f"re-run `{redo}`") from None
        ours = self.config
        for field in ModelConfig.__dataclass_fields__:
            if getattr(theirs, field) != getattr(ours, field):
                raise ExportError(f"{path} records model_config.{field} {brief(getattr(theirs, field), 64)}, not "
                                  f"export.json's {brief(getattr(ours, field), 64)}: export.json or the file is of "
                                  f"another export; re-run `{redo}`")
        for field in _TABLES:
            if field not in recorded or _tables_differ(recorded[field], meta[field]):
                raise ExportError(f"{path} records another {field} than export.json's (beyond "
                                  f"{TABLE_TOLERANCE:g}): export.json or the file is of another export; "
                                  f"re-run `{redo}`")
