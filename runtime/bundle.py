"""An export folder, as a runtime sees it: the ONNX files, their metadata, the schedule; nothing else needed.

    export.json        metadata (also stored in each ONNX file's metadata_props): checkpoint hash, model config,
                       image shape, classes and the reserved label, schedule name, T, betas, alphas_cumprod, files
    model.onnx         fp32 eps_theta(x, t, y)
    model_fp16.onnx    fp16 weights/activations (timestep embedding and GroupNorm statistics in fp32), if exported
    generator.onnx     the whole reverse loop of one deterministic plan in one model (export/generator.py), if
                       exported; export.json's "generator" names its plan and records its verification
    *.plan, *.plan.json  TensorRT engines and what they were built for (TensorRT version, GPU, batch range)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DdpmError
from ..schema import Any, Const, Int, List, Map, Num, Obj, Schema, Str
from .schedule import MAX_T, Schedule

EXPORT_FORMAT = "ddpm-export"
META_FILE = "export.json"
PRECISIONS = ("fp32", "fp16")
_SHA256 = Str(pattern=r"[0-9a-f]{64}", what="a sha256 (64 hex digits)")
# a plain file name inside the folder: no separator, not hidden (so never "..")
_ONNX_NAME = Str(pattern=r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.onnx", what="an .onnx file name in the folder")
MAX_META_BYTES = 32 << 20   # export.json: about 5 MB at the largest T a model config allows (model.config.MAX_T)
MAX_ONNX_BYTES = 4 << 30    # an ONNX file: the largest model a config allows (model.config.MAX_PARAMS) is ~1 GiB
# export.json's "generator" (export/generator.py add_generator): what the runtime, the CLI and the web page read
GENERATOR = Obj({"name": _ONNX_NAME, "sha256": _SHA256, "bytes": Int(min=1, max=MAX_ONNX_BYTES),
                 "plan": Str(), "plan_key": Str(), "steps": Int(min=1), "form": Str(choices=("loop", "unrolled"))},
                what="a generator record (an object)")
# export.json: what a runtime reads from it (schema.py); T fixes the length of the schedule tables
META = Schema("ddpm export metadata (export.json)", {
    "format": Const(EXPORT_FORMAT),
    "checkpoint_hash": _SHA256,
    "model_config": Map(Any(), what="a model config (an object)"),
    "image_shape": List(Int(min=1), length=3),
    "num_classes": Int(min=1),
    "null_label": Int(min=0),
    "schedule": Str(choices=("linear", "cosine")),
    "T": Int(min=2, max=MAX_T, dim="T"),
    "betas": List(Num(min=0, max=1, min_open=True), length="T"),
    "alphas_cumprod": List(Num(min=0, max=1, min_open=True), length="T"),
    "files": Map(Obj({"name": _ONNX_NAME, "sha256": _SHA256, "bytes": Int(min=1, max=MAX_ONNX_BYTES)}),
                 keys=Str(choices=PRECISIONS), min_len=1, what="an object of precision -> ONNX file"),
}, optional={"generator": GENERATOR}, hint="the folder is damaged or from another version; re-run `ddpm export`")


class ExportError(DdpmError):
    """An export folder that is missing, corrupted, stale or does not match the checkpoint asked for."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensors(graph):
    """Every TensorProto of an onnx GraphProto: initializers, sparse initializers, node attributes, subgraphs."""
    yield from graph.initializer
    for sp in graph.sparse_initializer:
        yield sp.values
        yield sp.indices
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _tensors(a.g)
            for g in a.graphs:
                yield from _tensors(g)


def check_external_data(path: Path, root: Path | None = None, redo: str = "ddpm export") -> None:
    """ExportError unless every tensor that the ONNX file `path` stores outside itself (external data) is a relative
    location naming a regular file inside `root` (default: the file's folder), links resolved. Needs the onnx
    package; without it nothing is checked here (onnxruntime refuses such files itself when it loads them)."""
    try:
        import onnx
    except ImportError:
        return
    root = (root or path.parent).resolve()
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:   # onnx raises protobuf's and its own types for files that are not ONNX
        raise ExportError(f"{path} is not a readable ONNX file ({type(e).__name__}); re-run `{redo}`") from None
    for t in _tensors(model.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        target = (path.parent / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(root) or not target.is_file():
            raise ExportError(f"{path}: the data of tensor {t.name!r} is stored at {location!r}, which is not a file "
                              f"inside the export folder; re-run `{redo}`")


@dataclass
class Bundle:
    root: Path
    meta: dict

    @classmethod
    def load(cls, root, expected_hash: str | None = None) -> "Bundle":
        root = Path(root)
        meta_path = root / META_FILE
        if not root.exists():
            # an export killed between its two renames left the old folder aside (.NAME.<writer>.old): once its
            # writer is gone, put it back (files.clean_stale) rather than report no export
            from ..files import clean_stale

            clean_stale(root.parent, root.name)
        if not meta_path.is_file():
            raise ExportError(f"{root} is not an export folder (no {META_FILE}); create one with `ddpm export`")
        try:
            size = meta_path.stat().st_size
            if size > MAX_META_BYTES:
                raise ExportError(f"{meta_path} holds {size >> 20} MiB, more than an export's metadata ever does "
                                  f"({MAX_META_BYTES >> 20} MiB); re-run `ddpm export`")
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError, RecursionError) as e:
            raise ExportError(f"{meta_path} is unreadable ({e}); re-run `ddpm export`") from None
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
            raise ExportError(f"{meta_path}: invalid model_config ({e}); re-run `ddpm export`") from None
        want = {"T": cfg.timesteps, "num_classes": cfg.num_classes, "null_label": cfg.null_label,
                "schedule": cfg.schedule, "image_shape": [cfg.in_channels, cfg.image_size, cfg.image_size]}
        for k, v in want.items():
            if meta[k] != v:
                raise ExportError(f"{meta_path}: {k} is {meta[k]!r} but its model_config says {v!r}; "
                                  f"re-run `ddpm export`")

    @property
    def schedule(self) -> Schedule:
        return Schedule.from_betas(self.meta["schedule"], self.meta["betas"])

    @property
    def null_label(self) -> int:
        return int(self.meta["null_label"])

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["image_shape"])

    def onnx_path(self, precision: str = "fp32") -> Path:
        """The ONNX file of a precision, checked against the sha256 recorded at export time."""
        files = self.meta["files"]
        if precision not in files:
            raise ExportError(f"{self.root} has no {precision} model (exported: {', '.join(files)}); "
                              f"re-run `ddpm export{' --fp16' if precision == 'fp16' else ''}`")
        return self._member(files[precision], "ddpm export" + (" --fp16" if precision == "fp16" else ""))

    @property
    def generator(self) -> dict | None:
        """export.json's record of generator.onnx (plan, plan_key, form, parity), or None when there is none."""
        return self.meta.get("generator")

    def generator_path(self, plan_key: str | None = None) -> Path:
        """generator.onnx, checked against its recorded sha256 and, given a plan_key (runtime.runner.plan_key), against
        the plan it was exported for. ExportError otherwise."""
        gen = self.generator
        if gen is None:
            raise ExportError(f"{self.root} has no generator; create one with `ddpm export --generator`")
        if plan_key is not None and gen["plan_key"] != plan_key:
            raise ExportError(f"{self.root}/{gen['name']} runs {gen['plan']}, not the plan asked for; re-run "
                              f"`ddpm export --generator` with that sampler and --steps")
        return self._member(gen, "ddpm export --generator")

    def _member(self, entry: dict, redo: str) -> Path:
        """The ONNX file of an export.json entry (name, sha256, bytes), checked: a regular file that resolves inside
        the folder (no link out of it), of the recorded sha256, whose external data (if any) lies inside
        the folder too. ExportError otherwise; `redo`: the command that writes it again."""
        path = self.root / entry["name"]
        root = self.root.resolve()
        if not path.is_file():
            raise ExportError(f"{path} is missing; re-run `{redo}`")
        real = path.resolve()
        if real.parent != root:
            raise ExportError(f"{path} leads outside its export folder (to {real}); an export folder holds its own "
                              f"files: re-run `{redo}`")
        if file_sha256(real) != entry["sha256"]:
            raise ExportError(f"{path} is corrupted or truncated (its sha256 differs from export.json); "
                              f"re-run `{redo}`")
        check_external_data(real, root, redo)
        return path
