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
from .schedule import Schedule

EXPORT_FORMAT = "ddpm-export"
META_FILE = "export.json"
PRECISIONS = ("fp32", "fp16")
_SHA256 = Str(pattern=r"[0-9a-f]{64}", what="a sha256 (64 hex digits)")
# export.json: what a runtime reads from it (schema.py); T fixes the length of the schedule tables
META = Schema("ddpm export metadata (export.json)", {
    "format": Const(EXPORT_FORMAT),
    "checkpoint_hash": _SHA256,
    "model_config": Map(Any(), what="a model config (an object)"),
    "image_shape": List(Int(min=1), length=3),
    "num_classes": Int(min=1),
    "null_label": Int(min=0),
    "schedule": Str(choices=("linear", "cosine")),
    "T": Int(min=2, dim="T"),
    "betas": List(Num(min=0, max=1, min_open=True), length="T"),
    "alphas_cumprod": List(Num(min=0, max=1, min_open=True), length="T"),
    "files": Map(Obj({"name": Str(pattern=r"[A-Za-z0-9_.-]+\.onnx", what="an .onnx file name"),
                      "sha256": _SHA256, "bytes": Int(min=1)}),
                 keys=Str(choices=PRECISIONS), min_len=1, what="an object of precision -> ONNX file"),
}, hint="the folder is damaged or from another version; re-run `ddpm export`")


class ExportError(DdpmError):
    """An export folder that is missing, corrupted, stale or does not match the checkpoint asked for."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
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
    def config(self):
        """The exported model's config (model.config.ModelConfig), checked when the folder was loaded."""
        from ..model.config import ModelConfig

        return ModelConfig.from_dict(self.meta["model_config"])

    @property
    def schedule(self) -> Schedule:
        return Schedule.from_betas(self.meta["schedule"], self.meta["betas"], self.config.prediction)

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
        path = self.root / files[precision]["name"]
        if not path.is_file():
            raise ExportError(f"{path} is missing; re-run `ddpm export`")
        if file_sha256(path) != files[precision]["sha256"]:
            raise ExportError(f"{path} is corrupted or truncated (its sha256 differs from export.json); "
                              f"re-run `ddpm export`")
        return path

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
        path = self.root / gen["name"]
        if not path.is_file():
            raise ExportError(f"{path} is missing; re-run `ddpm export --generator`")
        if file_sha256(path) != gen["sha256"]:
            raise ExportError(f"{path} is corrupted or truncated (its sha256 differs from export.json); "
                              f"re-run `ddpm export --generator`")
        return path
