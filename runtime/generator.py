"""The onnx-generator engine: generator.onnx (export/generator.py), the whole reverse loop in one onnxruntime call.

It takes the same inputs as every engine (x_T from the seeded stream, labels, guidance) and returns the uint8
images the generator computes, so the same seed gives the same digits as the `onnx` engine (within 1 grey level,
checked at export). The plan is fixed at export: a run with another plan is refused. Nothing here needs PyTorch.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np

from .bundle import Bundle, ExportError
from .engine import CountedEngine, EngineInput, StepCallback, Supports
from .nets import EngineUnavailable, import_onnxruntime, ort_cpu_options, ort_session, recorded_weights
from .runner import plan_key
from .samplers import Plan


class GeneratorEngine(CountedEngine):
    """generator.onnx on onnxruntime's CPU provider; `run` returns (B,H,W) uint8 images ((B,H,W,C) for colour).
    It runs its one plan (Supports.plan_key), without edits or states: one call does every row. close() drops the
    session (when the runs in flight end)."""

    name = "onnx-generator"
    device = "cpu"
    dtype = "float32"

    def __init__(self, path, info: dict, null_label: int, threads: int | None = None):
        """path: a generator.onnx; info: its record (at least plan, plan_key; export.json "generator")."""
        ort = import_onnxruntime("the onnx-generator engine")
        self.path, self.info, self.null_label = path, info, int(null_label)
        so = ort_cpu_options(ort, threads)   # the CPU thread defaults of runtime.nets (bench/threads.md)
        self.sess = ort_session(ort, path, so, ["CPUExecutionProvider"])
        self.weights = recorded_weights(self.sess, "ddpm_generator")
        self.supports = Supports(edits=False, states=False, plan_key=info["plan_key"])
        # int8: model_int8.onnx on most rows, model.onnx on the int8 engine's fp32 rows (export/generator.py)
        self.precision = info.get("precision", "fp32")
        # the command that exports a generator for another plan into its folder (from_bundle: with the checkpoint
        # its loader knows, runtime.bundle.Bundle.hint)
        self.redo = (f"`ddpm export --ckpt CKPT --out {shlex.quote(str(Path(path).parent))} --generator`, CKPT the "
                     f"checkpoint that folder was exported from")
        self._init_uses()

    @classmethod
    def from_bundle(cls, bundle: Bundle, threads: int | None = None, plan: Plan | None = None,
                    int8: bool = False) -> "GeneratorEngine":
        """The export folder's generator of `plan` (None: its only or first one; sha256-checked), its int8 one with
        int8 (`ddpm export --int8 --generator`); EngineUnavailable when it has none."""
        key, precision = None if plan is None else plan_key(plan), "int8" if int8 else "fp32"
        try:
            path = bundle.generator_path(key, precision=precision)
        except ExportError as e:
            raise EngineUnavailable(str(e)) from None
        engine = cls(path, bundle.generator(key, precision=precision), bundle.null_label, threads)
        engine.image_shape = bundle.image_shape
        engine.redo = bundle.hint(precision, flags=" --generator")
        return engine

    def check_plan(self, plan: Plan) -> None:
        """EngineInput (a ValueError) unless `plan` is the plan the generator was exported for."""
        if plan_key(plan) != self.info["plan_key"]:
            raise EngineInput(f"{self.path} runs {self.info['plan']}, not {plan.name}; re-export it for that plan "
                             f"(its --sampler and --steps) with {self.redo}; or use --engine onnx")

    def _run(self, x_T: np.ndarray, z: np.ndarray | None, labels: np.ndarray | None, plan: Plan, guidance: float,
             callback: StepCallback | None = None, edit=None, y=None, mask=None, states: bool = False) -> np.ndarray:
        """x_T (B,C,H,W) float32, labels (B,) int64 or None (unconditional: the null label, w = 0 as every engine
        does) -> images (B,H,W) uint8 (colour: (B,H,W,C)); callback(i, t, None, None) for every row after the one call. z must be None
        (the generator's plans add no noise); EngineInput otherwise, and for an edit or states (Supports)."""
        self.check_open()
        self.check_plan(plan)
        if edit is not None or states:
            raise EngineInput(f"the {self.name} engine runs the whole loop in one call: it cannot "
                             f"{'project onto a known image' if edit is not None else 'show every step'}")
        if z is not None:
            raise EngineInput("the generator runs deterministic plans: it takes no noise besides x_T")
        if labels is None:
            labels, guidance = np.full(x_T.shape[0], self.null_label, dtype=np.int64), 0.0
        with self.in_use():
            images = self.sess.run(["images"], {"x_T": np.ascontiguousarray(x_T, dtype=np.float32),
                                                "labels": np.ascontiguousarray(labels, dtype=np.int64),
                                                "guidance": np.asarray(guidance, dtype=np.float32)})[0]
        if callback is not None:   # one call did every row
            for i in range(plan.steps):
                callback(i, int(plan.timesteps[i]), None, None)
        return images

    def versions(self) -> dict[str, str]:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__, "provider": "CPUExecutionProvider", "form": self.info["form"],
                **({} if self.precision == "fp32" else {"precision": self.precision})}

    def _free(self) -> None:
        """Drop the onnxruntime session (freed with its last reference); close() calls it once no run is in
        flight."""
        self.sess = None
