"""Image editing as tables: a sampler `Plan` plus a per-row `Projection` onto a known image (numpy only).

An edit runs an ordinary plan (runtime.samplers). After some of its rows the state is projected onto the known
image y (the measurement), noised to the level the row reaches with fresh noise from the sample's own stream
(runtime.noise):

    v <- v + P(a_i y + s_i z_i - v),   a_i = sqrt(abar'_i), s_i = sqrt(1 - abar'_i)      (a_i y + s_i z_i ~ q(x' | y),
                                                                                         DDPM eq. 4)

where abar'_i is the level after row i (`Plan.abar_next`), v is x after the row (space "x") or the row's x0_hat
before the row's update (space "x0"; there a_i = 1, s_i = 0), and P is one of two linear operators:

    mask     P(u) = m * u, m = 1 on the known pixels        RePaint (Lugmayr et al. 2022, Algorithm 1: x_{t-1} =
                                                             m x^known_{t-1} + (1 - m) x^unknown_{t-1})
    lowpass  P(u) = up_f(down_f(u)): f x f average pooling, on x: ILVR (Choi et al. 2021, eq. 3 and Algorithm 1,
             then nearest upsampling (up_f down_f: the      phi_N = up(down)); on x0_hat: DDNM (Wang et al. 2023,
             orthogonal projection onto blockwise-constant   Section 3.2, Algorithm 1: x0 <- A^+ y + (I - A^+ A) x0)
             images)                                         with A = down_f, A^+ = up_f (A A^+ = I): A x0_hat = y

The mask projection is computed as (1 - m) v + m (a y + s z), so that known pixels are exactly y after the last
row (a = 1, s = 0 there). The low-pass projection makes the last row's block means exactly y's; clipping to the
pixel range would then move some, so upscaled pictures are finally fitted back to them on the host (`fit_blocks`).
The projection's noise slots are numbered after the plan's own: sample k's digits depend only on (seed, k, plan,
projection), whatever the batch, engine or process count.

Starting points: SDEdit (Meng et al. 2022) and restoration start from x_start = a0 x_input + s0 x_T (x_T: slot 0 of
the sample's stream), computed on the host before the loop, and run a plan truncated to start at that level
(`top` in runtime.samplers).

RePaint's resampling (its time schedule with jump length j and count r, Lugmayr et al. 2022, Section 4.2) is a
plan of its own whose forward jumps are rows that only rescale and add noise (calls_net False): `repaint_plan`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..errors import OptionError
from .images import HALVES, enlarge, from_uint8, to_model  # noqa: F401  (HALVES, to_model: for their callers here)
from .samplers import Plan
from .schedule import Schedule

OPERATORS = ("mask", "lowpass")
SPACES = ("x", "x0")
FACTORS = (2, 4)
UPSCALERS = ("ilvr", "ddnm")   # upscale_job: the low-pass projection of x (ILVR) or of x0_hat (DDNM)


@dataclass(frozen=True)
class Projection:
    """A per-row projection onto the known image (module docstring). Row columns have the plan's length S."""

    name: str
    operator: str          # "mask" or "lowpass"
    factor: int            # lowpass: the down-sampling factor f (1 for the mask)
    space: str             # "x": x after the row (RePaint, ILVR); "x0": x0_hat before the row's update (DDNM)
    on: np.ndarray         # (S,) bool: project at row i
    a: np.ndarray          # (S,) float64: weight of y, sqrt(abar'_i)
    s: np.ndarray          # (S,) float64: std of the fresh noise, sqrt(1 - abar'_i)
    z_slot: np.ndarray     # (S,) int64: the noise slot row i draws (numbered after the plan's slots; -1: none)

    @property
    def num_slots(self) -> int:
        """Noise slots the projection draws per sample, after the plan's own."""
        return int((self.z_slot >= 0).sum())

    @property
    def key(self) -> str:
        """A digest of everything a runner bakes into its buffers and tables."""
        h = hashlib.sha1(f"{self.name}|{self.operator}|{self.factor}|{self.space}".encode())
        for v in (self.on, self.a, self.s, self.z_slot):
            h.update(np.ascontiguousarray(v).tobytes())
        return h.hexdigest()

    def validate(self, plan: Plan, image_shape: tuple[int, int, int]) -> "Projection":
        """ValueError unless this projection fits the plan and the image shape."""
        S = plan.steps
        for name in ("on", "a", "s", "z_slot"):
            if getattr(self, name).shape != (S,):
                raise ValueError(f"projection column {name} has shape {getattr(self, name).shape}, "
                                 f"the plan has {S} rows")
        if self.operator not in OPERATORS or self.space not in SPACES:
            raise ValueError(f"unknown projection {self.operator!r} on {self.space!r}")
        if self.operator == "lowpass" and (self.factor < 2 or image_shape[1] % self.factor or
                                           image_shape[2] % self.factor):
            raise ValueError(f"a low-pass factor {self.factor} does not divide the image size {image_shape[1:]}")
        if (self.on & ~plan.calls_net).any():
            raise ValueError("a projection runs only on rows that call the network")
        slots = self.z_slot[self.z_slot >= 0]
        if not np.array_equal(np.sort(slots), np.arange(plan.num_slots, plan.num_slots + len(slots))):
            raise ValueError("the projection's noise slots must follow the plan's own, each used once")
        return self

    def bind(self, ops, batch: int, image_shape, z) -> "BoundProjection":
        """This projection on one runner's buffers: ops (runtime.ops), its batch size and image shape, and its noise
        table z (Q,B,C,H,W), slot-major (None when nothing draws noise)."""
        return BoundProjection(self, ops, batch, tuple(image_shape), z)


class BoundProjection:
    """One runner's projection: the known image y (and mask) in buffers allocated once, the per-row coefficients
    as the ops' scalars. `load` copies a batch's y (and mask) in before the loop; `__call__(i, v)` projects v in
    place at row i, allocating nothing (CUDA-graph capturable: the branches depend on the row only)."""

    def __init__(self, proj: Projection, ops, batch: int, image_shape, z):
        self.proj, self.ops = proj, ops
        C, H, W = image_shape
        shape = (batch, C, H, W)
        self.y = ops.empty(shape)
        self.target = ops.empty(shape)                    # a y + s z, then (low-pass) the upsampled correction
        self.a, self.s = ops.scalars(proj.a), ops.scalars(proj.s)
        self.z_rows = [z[int(q)] if q >= 0 else None for q in proj.z_slot]   # views made once
        if proj.operator == "mask":
            self.mask, self.keep = ops.empty(shape), ops.empty(shape)   # m and 1 - m
        else:
            f = proj.factor
            self.lo, self.lo_v = ops.empty((batch, C, H // f, W // f)), ops.empty((batch, C, H // f, W // f))
            self.inv_area = ops.scalars([1.0 / (f * f)])[0]   # a scalar made once (torch: a 0-d tensor)

    def load(self, y: np.ndarray | None, mask: np.ndarray | None) -> None:
        """y (B,C,H,W) float32 in [-1, 1]; mask (B,C,H,W) float32 in {0, 1} (1: known), for the mask operator.
        EngineInput (a ValueError) for a missing or wrong-shaped one."""
        from .engine import EngineInput

        want = tuple(self.y.shape)
        if y is None or tuple(y.shape) != want:
            raise EngineInput(f"the projection needs the known image y of shape {want}, got "
                             f"{None if y is None else tuple(y.shape)}")
        self.ops.load(self.y, np.asarray(y, dtype=np.float32))
        if self.proj.operator == "mask":
            if mask is None or tuple(mask.shape) != want:
                raise EngineInput(f"the mask projection needs a mask of shape {want}, got "
                                 f"{None if mask is None else tuple(mask.shape)}")
            m = np.asarray(mask, dtype=np.float32)
            self.ops.load(self.mask, m)
            self.ops.load(self.keep, 1.0 - m)

    def __call__(self, i: int, v) -> None:
        ops, t = self.ops, self.target
        # 1. the known image at the row's level: a y + s z             (q(x' | y), DDPM eq. 4)
        ops.mul_into(t, self.y, self.a[i])
        if self.z_rows[i] is not None:
            ops.axpy_(t, self.s[i], self.z_rows[i])
        if self.proj.operator == "mask":
            # 2. v <- (1 - m) v + m t: RePaint's combination of known and generated pixels (exact for m in {0,1})
            ops.scale_(v, self.keep)
            ops.scale_(t, self.mask)
            ops.add_(v, t)
        else:
            # 2. v <- v + up(down(t) - down(v)), down = block sum / f^2   (ILVR eq. 3; DDNM's A^+(y - A x0), t = y)
            f = self.proj.factor
            ops.sum_pool_(self.lo, t, f)
            ops.sum_pool_(self.lo_v, v, f)
            ops.sub_(self.lo, self.lo_v)
            ops.scale_(self.lo, self.inv_area)
            ops.upsample_(t, self.lo, f)
            ops.add_(v, t)


def noised_projection(plan: Plan, operator: str, factor: int = 1) -> Projection:
    """Project x after every network row onto y noised to the level the row reached (a = sqrt(abar'),
    s = sqrt(1 - abar')): RePaint with operator "mask", ILVR with "lowpass" and factor f. The last row reaches
    abar' = 1, so there x takes y's values exactly (mask) or y's low-pass exactly (lowpass)."""
    on = plan.calls_net.copy()
    a = np.where(on, np.sqrt(plan.abar_next), 0.0)
    s = np.where(on, np.sqrt(np.clip(1.0 - plan.abar_next, 0.0, None)), 0.0)
    noisy = on & (s > 0)
    z_slot = np.where(noisy, plan.num_slots + np.cumsum(noisy) - 1, -1).astype(np.int64)
    name = "repaint" if operator == "mask" else f"ilvr{factor}"
    return Projection(name, operator, factor if operator == "lowpass" else 1, "x", on, a, s, z_slot)


def x0_projection(plan: Plan, factor: int) -> Projection:
    """DDNM (Wang et al. 2023, Algorithm 1, noise-free y): x0_hat <- x0_hat + A^+(y - A x0_hat) at every network row,
    with A = f x f average pooling and A^+ = nearest upsampling; the row then moves x towards the projected x0_hat."""
    S = plan.steps
    on = plan.calls_net.copy()
    return Projection(f"ddnm{factor}", "lowpass", factor, "x0", on, on.astype(np.float64), np.zeros(S),
                      np.full(S, -1, dtype=np.int64))


# The most rows a RePaint plan may have: the paper's largest (j = 10, r = 10 on 250 steps) has 2,410
MAX_PLAN_ROWS = 1_000_000


def repaint_plan(plan: Plan, jump: int = 1, resample: int = 1) -> Plan:
    """RePaint's time schedule over the rows of `plan` (Lugmayr et al. 2022, Section 4.2 and Algorithm 1).

    The states of the plan are n = 0..S (state n: the input of row n; state S: x_0). Every j-th state counted from
    the end, n = S-1-j*k with n >= j, is a jump point: each time the reverse process reaches it, while it has jumps
    left (r - 1 in all), x jumps back j states with one forward-noising row,

        x_{n-j} = sqrt(abar_{n-j} / abar_n) x_n + sqrt(1 - abar_{n-j} / abar_n) z     (q(x_{n-j} | x_n), DDPM eq. 4
                                                                                      applied j times)

    and rows n-j..n-1 run again with fresh noise. x_0 is never a jump point: no resampling after the last row
    (Algorithm 1, "if u < U and t > 1"). j = 1, r = U is Algorithm 1; the paper's images use j = 10, r = 10 on a
    250-step schedule. r = 1 returns the plan unchanged. Rows are copied with their noise slots renumbered, so
    every pass draws fresh noise. ValueError for j, r < 1 or plans whose rows do not all call the network or that
    remember earlier predictions (multistep solvers) when r > 1.
    """
    for name, option, v in (("jump (the RePaint jump length)", "jump", jump),
                            ("resample (the RePaint resample count)", "resample", resample)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise OptionError(f"{name} must be an integer >= 1, got {v!r}", option)
    if resample == 1:
        return plan
    if plan.history or not plan.calls_net.all():
        raise OptionError(f"RePaint's resampling runs single-step plans (ddpm, ddim) without forward rows, not "
                          f"{plan.name}; or resample 1", "sampler")
    S = plan.steps
    if jump >= S:
        raise OptionError(f"jump (the RePaint jump length) must be below the plan's {S} steps, got {jump}", "jump")
    abar = np.append(plan.abar[0], plan.abar_next)               # abar of state n = 0..S
    left = {S - 1 - j: resample - 1 for j in range(0, S - jump, jump)}
    R = S + len(left) * (resample - 1) * (jump + 1)              # every jump: one forward row, jump rows again
    if R > MAX_PLAN_ROWS:   # counted before the rows are listed: a large resample would run for ever
        raise OptionError(f"resample {resample} with jump {jump} on {S} steps makes a plan of {R} rows, more than "
                          f"{MAX_PLAN_ROWS}; ask for fewer", "resample")
    rows: list[tuple[int, int]] = []    # (row of the plan, -1) or (-1, state jumped from)
    n = 0
    while n < S:
        rows.append((n, -1))
        n += 1
        if left.get(n, 0) > 0:
            left[n] -= 1
            rows.append((-1, n))
            n -= jump
    R = len(rows)
    cols = {c: np.zeros(R) for c in ("abar", "w_x", "w_x0", "sigma", "abar_next")}
    t, cfg, calls = np.zeros(R, dtype=np.int64), np.zeros(R, dtype=bool), np.zeros(R, dtype=bool)
    for k, (i, frm) in enumerate(rows):
        if i >= 0:
            for c in cols:
                cols[c][k] = getattr(plan, c)[i]
            t[k], cfg[k], calls[k] = plan.timesteps[i], plan.cfg[i], True
        else:
            to = frm - jump
            ratio = abar[to] / abar[frm]
            cols["w_x"][k], cols["sigma"][k], cols["abar_next"][k] = np.sqrt(ratio), np.sqrt(1.0 - ratio), abar[to]
            cols["abar"][k] = abar[frm]                          # the level jumped from (no network call)
            t[k] = plan.timesteps[to]                            # the level reached (informative: no network call)
    return Plan.make(f"repaint-j{jump}-r{resample}-{plan.name}", t, prediction=plan.prediction, clip=plan.clip,
                     cfg=cfg, calls_net=calls, guidance_rescale=plan.guidance_rescale, **cols)


# ----------------------------------------------------------------------------------------------- starting points
def sdedit_start(sched: Schedule, strength: float) -> tuple[int, float, float]:
    """SDEdit's start (Meng et al. 2022, Section 3, with DDPM's VP SDE): (t0, a0, s0) with t0 = round(strength (T-1))
    and x_t0 = a0 x_input + s0 x_T = sqrt(abar_t0) x_input + sqrt(1 - abar_t0) x_T ~ q(x_t0 | x_input).

    strength in (0, 1]; at 1 the start is x_T itself (a0 = 0, s0 = 1), as in `gen`: the input is ignored (the
    formula would keep sqrt(abar_{T-1}) of it, 0.006 for the linear schedule). Strength 0 runs nothing at all (the
    caller returns the input). ValueError outside (0, 1].
    """
    if not 0.0 < strength <= 1.0:   # also refuses NaN
        raise OptionError(f"strength must be in (0, 1] here (0 returns the input unchanged), got {strength}",
                          "strength")
    T = sched.T
    if strength == 1.0:
        return T - 1, 0.0, 1.0
    t0 = int(np.floor(strength * (T - 1) + 0.5))
    ab = float(sched.alphas_cumprod[t0])
    return t0, float(np.sqrt(ab)), float(np.sqrt(1.0 - ab))


def noise_start(sched: Schedule, sigma: float) -> tuple[int, float, float]:
    """Where a reverse process starts for an input y = x + sigma n, n ~ N(0, I) (sigma in the model's [-1, 1] units).

    The first t whose noise-to-signal ratio sqrt((1 - abar_t)/abar_t) reaches sigma, and
    x_t = sqrt(abar_t) y + sqrt(1 - abar_t (1 + sigma^2)) x_T, whose law given x is exactly q(x_t | x) =
    N(sqrt(abar_t) x, (1 - abar_t) I): the scaled input brings abar_t sigma^2 of the variance, x_T the rest
    (0 when the ratio equals sigma). Returns (t, a0, s0). OptionError (sigma) for sigma <= 0 or above the largest
    ratio.
    """
    ab = sched.alphas_cumprod
    ratio = np.sqrt((1.0 - ab) / ab)
    if not 0.0 < sigma <= ratio[-1]:
        raise OptionError(f"sigma (the noise std) must be in (0, {ratio[-1]:.3g}] (the model's noisiest level), "
                          f"got {sigma}", "sigma")
    t = int(np.argmax(ratio >= sigma))
    return t, float(np.sqrt(ab[t])), float(np.sqrt(max(0.0, 1.0 - ab[t] * (1.0 + sigma * sigma))))


# --------------------------------------------------------------------------------------------------- the inputs
@dataclass
class EditJob:
    """What an edit adds to runtime.generate.generate for its n samples (arrays (n,C,H,W) or (1,C,H,W) for all).

    projection with y (float32 in [-1, 1]; full size, the low-pass operator averages it) and, for the mask
    operator, mask (float32, 1 = known); x_input with (a0, s0): the start a0 x_input + s0 x_T instead of x_T;
    blocks ((n or 1, H/f, W/f) uint8, or (n or 1, H/f, W/f, C) for colour: upscaling's input): the results are
    fitted to its f x f block means (`finish`); reads ((n or 1, H, W) uint8): the input as a user gave it, from
    which the classifier reads the label of an edit given none (pipeline.Job.of), None where such an edit runs the
    unconditional model (inpainting, SDEdit, restoration).
    """

    projection: Projection | None = None
    y: np.ndarray | None = None
    mask: np.ndarray | None = None
    x_input: np.ndarray | None = None
    a0: float = 0.0
    s0: float = 1.0
    blocks: np.ndarray | None = None
    reads: np.ndarray | None = None

    @property
    def num_slots(self) -> int:
        return 0 if self.projection is None else self.projection.num_slots

    @staticmethod
    def _rows(a: np.ndarray | None, lo: int, hi: int) -> np.ndarray | None:
        if a is None:
            return None
        return np.repeat(a, hi - lo, axis=0) if len(a) == 1 else np.array(a[lo:hi])   # writable copies

    def part(self, lo: int, hi: int) -> "EditJob":
        """The same edit for samples lo..hi-1 of these (a process's share under torchrun)."""
        cut = lambda a: a if a is None or len(a) == 1 else a[lo:hi]
        return EditJob(self.projection, cut(self.y), cut(self.mask), cut(self.x_input), self.a0, self.s0,
                       cut(self.blocks), cut(self.reads))

    def finish(self, images: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """The results (hi - lo, H, W) or (hi - lo, H, W, C) uint8 of samples lo..hi-1 as they are saved: with
        `blocks`, the nearest pictures whose block means are its pixels (fit_blocks), rounded; else unchanged."""
        if self.blocks is None:
            return images
        small = np.broadcast_to(self._rows(self.blocks, lo, hi), (hi - lo, *self.blocks.shape[1:]))
        return np.rint(fit_blocks(images, small, images.shape[2] // self.blocks.shape[2])).astype(np.uint8)

    def batch(self, lo: int, hi: int):
        """(y, mask, x_input) of samples lo..hi-1 (run-relative)."""
        return self._rows(self.y, lo, hi), self._rows(self.mask, lo, hi), self._rows(self.x_input, lo, hi)

    def start(self, x_T: np.ndarray, x_input: np.ndarray | None) -> np.ndarray:
        """The starting state: x_T, or a0 x_input + s0 x_T (float32, the same on every engine: computed here)."""
        if x_input is None:
            return x_T
        return (np.float32(self.a0) * x_input + np.float32(self.s0) * x_T).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- the jobs
# Each editing method as (plan, EditJob) for runtime.generate, from its pictures ((m, H, W) uint8, or (m, H, W, C)
# for colour: runtime.images' convention; m = 1 or one per result) and `plan_for(top)`: the sampler's plan for this
# model, truncated to start at t = top (None: T - 1).
def inpaint_job(plan_for, images: np.ndarray, keep: np.ndarray, jump: int = 1, resample: int = 3):
    """RePaint: keep (m or 1, H, W) bool, True on the kept pixels (in every channel). After every reverse row the
    kept pixels are replaced by the input noised to the row's level (noised_projection), exactly the input's after
    the last one; the rows are the plan's, resampled with jump length j and count r (repaint_plan). Stochastic
    rows (eta 1) let the new part harmonise with the kept one; eta 0 gives deterministic rows. Without a label: the
    unconditional model (reads None; the classifier's read of a partial digit is often wrong, and conditioning on it
    measured worse: bench/results/2026-12-06-editing-label.md)."""
    plan = repaint_plan(plan_for(None), jump, resample)
    y = from_uint8(images)
    return plan, EditJob(noised_projection(plan, "mask"), y=y,
                         mask=np.repeat(keep.astype(np.float32)[:, None], y.shape[1], axis=1))


def sdedit_job(plan_for, sched: Schedule, images: np.ndarray, strength: float):
    """SDEdit from x_t0 = sqrt(abar_t0) x + sqrt(1 - abar_t0) x_T, t0 = round(strength (T-1)) (sdedit_start), then
    the plan's rows from t0 down (DDIM's grid points below t0: about strength x steps rows); strength 0: plan
    None, the input itself."""
    job = EditJob(x_input=from_uint8(images))
    if strength == 0:
        return None, job
    t0, job.a0, job.s0 = sdedit_start(sched, float(strength))
    return plan_for(t0), job


def upscale_job(plan_for, small: np.ndarray, factor: int, method: str = "ilvr"):
    """Upscaling the small pictures (m, H/f, W/f): "ilvr", x <- x + up(down(y_t) - down(x)) after every row with
    y_t the input noised to the row's level (noised_projection); "ddnm", x0_hat <- x0_hat + up(y - down(x0_hat))
    (x0_projection). The last row makes down(x) = y in the model's range; the results are then fitted to the block
    means within [0, 255], channel by channel (EditJob.finish, fit_blocks: clipping would move bright and dark
    blocks). The label read without one: from the small picture enlarged by pixel repetition (images.enlarge)."""
    plan = plan_for(None)
    proj = noised_projection(plan, "lowpass", factor) if method == "ilvr" else x0_projection(plan, factor)
    small = np.asarray(small, dtype=np.uint8)
    return plan, EditJob(proj, y=upsample(from_uint8(small), factor), blocks=small, reads=enlarge(small, factor))


def restore_job(plan_for, sched: Schedule, images: np.ndarray, sigma: float):
    """Denoising y = x + sigma n from x_t = sqrt(abar_t) y (+ x_T for the variance still missing), which has exactly
    the law of q(x_t | x), at the first t whose noise-to-signal ratio reaches sigma (noise_start). Without a label:
    the unconditional model (reads None; the classifier's read of a noisy picture is often wrong, and conditioning
    on it measured worse: bench/results/2026-12-06-editing-label.md)."""
    t, a0, s0 = noise_start(sched, float(sigma))
    return plan_for(t), EditJob(x_input=from_uint8(images), a0=a0, s0=s0)


# ------------------------------------------------------------------------------------------------- image helpers
def downsample(images: np.ndarray, f: int) -> np.ndarray:
    """(N,H,W) -> (N,H/f,W/f) float64: the mean of every f x f block (the operator A of `lowpass`)."""
    N, H, W = images.shape
    return np.asarray(images, dtype=np.float64).reshape(N, H // f, f, W // f, f).mean(axis=(2, 4))


def upsample(images: np.ndarray, f: int) -> np.ndarray:
    """(N,h,w) -> (N,h*f,w*f): every pixel repeated over an f x f block (nearest; A^+ of `lowpass`)."""
    return np.repeat(np.repeat(np.asarray(images), f, axis=-2), f, axis=-1)


def fit_blocks(images: np.ndarray, small: np.ndarray, f: int, lo: float = 0.0, hi: float = 255.0,
               iterations: int = 60) -> np.ndarray:
    """The nearest images (least squares) to `images` (N,H,W) whose f x f block means are `small` (N,H/f,W/f) and
    whose pixels stay in [lo, hi]: per block z = clip(x + c, lo, hi), with c found by bisection so that
    mean(z) = y (the KKT conditions of that projection: one shift per block, then the box). Float64 (N,H,W).
    Colour pictures (N,H,W,C) with small (N,H/f,W/f,C): every channel's blocks on their own.

    The last row of ILVR/DDNM already makes the block means exact in the model's range; the clipping to the pixel
    range afterwards breaks them where a bright or dark block's pixels overshoot. This puts them back. Every block
    mean in [lo, hi] is reachable (a constant block is); the bisection starts from shifts that put the whole block
    at lo and at hi and halves that interval 60 times (to 1e-15 of it)."""
    x = np.asarray(images, dtype=np.float64)
    N, H, W = x.shape[:3]
    xb = x.reshape(N, H // f, f, W // f, f, *x.shape[3:])
    y = np.clip(np.asarray(small, dtype=np.float64), lo, hi)[:, :, None, :, None]
    a = lo - xb.max(axis=(2, 4), keepdims=True)       # a shift that puts every pixel at lo: mean lo <= y
    b = hi - xb.min(axis=(2, 4), keepdims=True)       # one that puts every pixel at hi: mean hi >= y
    for _ in range(iterations):
        c = (a + b) / 2
        low = np.clip(xb + c, lo, hi).mean(axis=(2, 4), keepdims=True) < y
        a, b = np.where(low, c, a), np.where(low, b, c)
    return np.clip(xb + (a + b) / 2, lo, hi).reshape(x.shape)


def half_mask(name: str, size: int) -> np.ndarray:
    """(size, size) bool, True on the known pixels: `name` is the half to regenerate (top, bottom, left, right:
    HALVES). Raises OptionError (option "mask") for another name."""
    keep = np.ones((size, size), dtype=bool)
    h = size // 2
    where = {"top": np.s_[:h, :], "bottom": np.s_[h:, :], "left": np.s_[:, :h], "right": np.s_[:, h:]}
    if name not in where:
        raise OptionError(f"mask must be one of {', '.join(HALVES)} or a picture file, got {name!r}", "mask")
    keep[where[name]] = False
    return keep
