"""Sampling options: one value that says how to draw samples, shared by the CLI, the Python API and the pipeline.

    opts = Sampling(sampler="ddim", steps=50, guidance=1.0, seed=3)
    plan = model.plan(**opts.plan_args())            # the sampler's table (runtime.samplers.Plan)

Its defaults are the measured ones (README "Samplers", "Editing"); the editing commands start from EDITING. A new
sampling option that only chooses among what exists is one field here (with its comment), one entry in
arguments.ARGS and one click option in cli_options.py (sampling_options). One that changes the sampler's table or
step also touches runtime/samplers.py (a Plan field, which plan_key and the RePaint plan carry over),
runtime/runner.py and runtime/eager.py (the step), export/generator.py (the step in the graph), runtime/edits.py
when edits build their own plan, api.py's method keywords, and the commands that list solver options by name
(export --generator, bench): docs/development.md, "Adding a sampling option".
Numpy-free: `ddpm --help` imports this.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

# The recommended classifier-free guidance for the shipped model, applied only where the noise level
# sigma = sqrt((1-abar)/abar) is in (0.28, 5.42] (Kynkaanniemi et al. 2024's interval for EDM2). Measured with
# bench/sweep at N = 5000, two seeds (README "Samplers"): UniPC-8 with w = 0.45 in that interval gave FD / floor
# 1.95 (1.95-1.96) and 98.86% accuracy with 12 network images per digit, against 2.14 (2.11-2.17) and 98.87% with
# w = 0.3 on every step (16 images per digit).
GUIDANCE = 0.45
GUIDANCE_INTERVAL = (0.28, 5.42)
# ... and for class edits (SDEdit), where the input pulls towards its own class: at strength 0.6 the classifier
# agrees with the requested class for 92% of 100 test digits at w=0.3, 99% at w=1, 100% at w=3 (README "Editing").
EDIT_GUIDANCE = 1.0
# The fewest network calls that score as DDIM-50 did (bench/sweep, README "Samplers"): UniPC-2, 8 steps, trailing.
DEFAULT_SAMPLER = "unipc"
# The editing methods' sampler, as measured (README "Editing"): DDIM-50; RePaint needs its single-step rows, and
# ILVR and inpainting its stochastic ones (eta 1).
EDIT_SAMPLER = "ddim"
VARIANCES = ("small", "large")
# Bounds of the float options that enter float32 sums, so that none overflows float32 (about 3.4e38): the guidance
# scale w (the measured ones above are at most 3), the finite noise levels sigma of a guidance interval (its top may
# also be inf), and restore's sigma, the noise std of a picture in [-1, 1].
MAX_GUIDANCE = 100.0
MAX_LEVEL = 1e6
MAX_SIGMA = 100.0
# CPU threads (torch, onnxruntime): each thread holds its own buffers, so an unbounded count only grows memory.
MAX_THREADS = 1024
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Sampling:
    """How to draw samples: the plan (sampler .. guidance_rescale), the conditioning, the noise stream and where it
    runs. Checked where it is used (Model.plan, Model.engine, ddpm.arguments for the API's keywords)."""

    sampler: str = DEFAULT_SAMPLER         # ddpm | ddim | dpm++2m | unipc (runtime.samplers.SAMPLERS)
    steps: int | None = None               # network calls per sample; None: the sampler's default
    spacing: str | None = None             # linspace | trailing | logsnr; None: the sampler's default
    eta: float = 0.0                       # DDIM eta: 0 deterministic, 1 DDPM-like
    variance: str = "small"                # DDPM posterior variance: beta~_t (small) or beta_t (large)
    guidance: float = GUIDANCE             # classifier-free guidance scale w >= 0 (Ho & Salimans 2022, eq. 6)
    guidance_interval: tuple[float, float] | None = GUIDANCE_INTERVAL   # guidance where sigma in (lo, hi]; None: all
    guidance_rescale: float = 0.0          # phi in [0, 1]: guided eps rescaled to eps_c's std (Lin et al. 2024); 0 off
    seed: int = 0                          # the noise stream (runtime.noise): sample k of a seed is one digit
    batch: int = 64                        # samples per batch (the network runs network_batch(batch, guided))
    engine: object = "auto"                # an engine name (runtime.engines.ENGINES, or auto) or an engine object
    device: str = "auto"                   # auto | cpu | cuda | cuda:N
    fp16: bool = False                     # half-precision model (runtime engines)
    int8: bool = False                     # int8 convolutions (the onnx engine on a CPU; `ddpm export --int8`)
    cuda_graph: bool = True                # GPU: the whole loop as one CUDA graph
    threads: int | None = None             # CPU threads (torch and onnxruntime); None: the runtime's default

    def __post_init__(self) -> None:
        # a contradiction among the options is found here, before any file is looked up; an engine object runs the
        # precision it was made with, so a precision asked for beside it must be that one (engine_refusal)
        engine = self.engine if isinstance(self.engine, str) else None
        why = precision_refusal(engine, self.device, self.fp16, self.int8)
        option = "int8"
        if not why:
            why, option = generator_refusal(engine, self.device, self.fp16)
        if not why and engine is None:
            why, option = engine_refusal(self.engine, self.fp16, self.int8, self.device)
        if why:
            from .errors import OptionError

            raise OptionError(why, option)

    @classmethod
    def of(cls, values: dict, given=frozenset(), labelled: bool = True, cli: bool = False,
           record: dict | None = None, settings: bool = True, **changes) -> "Sampling":
        """The options among `values` (e.g. a function's locals(), or click's parameters), then `changes`; names
        that are not options are ignored. given: the names the user gave (not left at their defaults); labelled:
        whether the samples have labels (False: unconditional sampling; an edit without a label, which uses the
        unconditional model). Raises OptionError (option "uncond", check_conditioning) for a label (values["label"])
        given with uncond (values["uncond"]); OptionError (option "guidance") for a guidance scale w > 0 given for
        samples without labels: guidance steers a sample towards its label, so it would be silently ignored; OptionError
        (option "plan") for a ready plan (values["plan"], the API's) given with any option that makes a plan
        (PLAN_OPTIONS): they would contradict or repeat it, and one of them would be ignored; OptionError for a
        setting that would change nothing (check_settings_apply). record: a model's recorded plan (a distilled
        student's, recorded_plan), in place of the options not given before they are checked; settings False: the
        settings a record may change are not checked yet (a command that finds contradictions before it reads the
        model file checks them again with its record). cli: the message names the CLI's options."""
        check_conditioning(values.get("label"), values.get("uncond"), cli)
        names = {f.name for f in fields(cls)}
        both = [name for name in PLAN_OPTIONS if name in given]
        if values.get("plan") is not None and both:
            from .errors import OptionError

            raise OptionError(f"plan and {', '.join(both)} exclude each other: a plan is a ready sampler table that "
                              f"they would make (model.plan(sampler=..., steps=...)); give the plan or them", "plan")
        opts = replace(cls(**{k: v for k, v in values.items() if k in names}), **changes).with_recorded(record, given)
        check_guidance(opts.guidance, given, labelled, cli)
        if settings:
            check_settings_apply(opts, given, labelled, cli)
        if not isinstance(opts.engine, str):
            # what the user gave (fp16=False included) beside an engine object (__post_init__ sees only values)
            why, option = engine_refusal(opts.engine, opts.fp16, opts.int8, opts.device, given)
            if why:
                from .errors import OptionError

                raise OptionError(why, option)
        return opts

    def with_recorded(self, record: dict | None, given) -> "Sampling":
        """These options with a model's recorded plan in place of those not `given` (`recorded_plan`)."""
        values = {name: getattr(self, name) for name in RECORDED}
        return replace(self, **recorded_plan(record, values, given))

    def plan_args(self) -> dict:
        """Model.plan's keywords (PLAN_OPTIONS) that apply to this sampler: eta for DDIM, variance for DDPM only (a
        default of another sampler's, such as the editing commands' eta 1, is not passed on)."""
        return {name: getattr(self, name) for name in PLAN_OPTIONS
                if name not in _SETTING_OF or _SETTING_OF[name] == self.sampler}

    @property
    def precision(self) -> str:
        return "fp16" if self.fp16 else "int8" if self.int8 else "fp32"


def check_conditioning(label, uncond: bool | None, cli: bool = False) -> None:
    """Raise OptionError (option "uncond") for a label (not None) given with uncond: the unconditional model draws
    without one. cli: the message names the CLI's options."""
    if uncond and label is not None:
        from .errors import OptionError

        raise OptionError(f"{'--label and --uncond' if cli else 'label and uncond=True'} exclude each other",
                          "uncond")


def check_guidance(guidance: float, given, labelled: bool, cli: bool = False, classless: bool = False) -> None:
    """Raise OptionError (option "guidance") for a guidance scale w > 0 given (in `given`, the names the user gave)
    for samples without labels (labelled False): guidance steers a sample towards its label, so it would be
    silently ignored. classless: they have none because the model has no classes (num_classes 1; ddpm eval,
    pipeline.eval_uncond), which the message says. cli: the message names the CLI's options."""
    if labelled or not guidance or "guidance" not in given:
        return
    from .errors import OptionError

    g, u, lab = ("--guidance", "--uncond", "--label") if cli else ("guidance", "uncond=True", "label")
    if classless:
        raise OptionError(f"this model has no classes, so its samples are unconditional and guidance has no label "
                          f"to steer towards: leave out {g} (or give 0)", "guidance")
    raise OptionError(f"guidance steers samples towards their label, and {u} samples have none (an edit without "
                      f"{lab} uses the unconditional model): give {lab}, or leave out {g} (or give 0)", "guidance")


def check_settings_apply(opts: "Sampling", given, labelled: bool, cli: bool = False) -> None:
    """OptionError (naming the option) for a setting that would change nothing and be ignored without a word: one
    sampler's setting given (in `given`) to another (check_sampler_settings), and a guidance rescale for samples
    without guidance (labelled False, or w = 0). cli: the message names the CLI's options."""
    from .errors import OptionError

    check_sampler_settings(opts.sampler, opts.eta, opts.variance, given, cli)
    if opts.guidance_rescale > 0 and (not labelled or opts.guidance == 0):
        r, w = ("--guidance-rescale", "--guidance") if cli else ("guidance_rescale", "guidance")
        why = "these samples have no label" if not labelled else "the guidance scale is 0"
        raise OptionError(f"guidance rescale adjusts the guided output, and {why}, so it would change nothing: "
                          f"leave out {r}, or give {w} > 0 with a label", "guidance_rescale")


# The settings that belong to one sampler, and their values that change nothing (a default, such as the editing
# commands' eta 1, applies where it can).
_SETTING_OF = {"eta": "ddim", "variance": "ddpm"}
_UNUSED = {"eta": 0.0, "variance": "small"}


def check_sampler_settings(sampler: str, eta: float, variance: str, given, cli: bool = False) -> None:
    """OptionError (naming the option) for one sampler's setting given (in `given`) to another, where it would be
    ignored: eta != 0 without DDIM, variance large without DDPM. cli: the message names the CLI's options."""
    from .errors import OptionError

    for name, value in (("eta", eta), ("variance", variance)):
        owner = _SETTING_OF[name]
        if name in given and value != _UNUSED[name] and sampler != owner:
            what = "DDIM's noise level (0 deterministic, 1 DDPM-like)" if name == "eta" else \
                "the DDPM sampler's choice of posterior noise"
            flag = f"--{name}" if cli else name
            raise OptionError(f"{name} is {what}; {sampler} has none: leave out {flag}, or use the {owner} "
                              f"sampler", name)


def precision_refusal(engine: str | None, device: str, fp16: bool, int8: bool) -> str | None:
    """Why the network cannot run in the precision asked for on this engine (a name, or None for an engine object,
    whose own make_engine checked it) and device, or None when it can: fp16 and int8 exclude each other, and int8
    runs on the onnx and onnx-generator engines on a CPU only (model_int8.onnx, `ddpm export --int8`; its generator
    `ddpm export --int8 --generator`). The message is runtime.engines.make_engine's too."""
    if int8 and fp16:
        return "choose one precision: fp16 or int8"
    gpu = str(device).startswith("cuda")
    if int8 and ((engine is not None and engine not in ("onnx", "auto", "onnx-generator")) or gpu):
        name = "onnx" if engine in (None, "auto") else engine
        return (f"int8 runs on the onnx engine (or onnx-generator) on a CPU (model_int8.onnx), not on "
                f"{name}{' on a GPU' if gpu else ''}")
    return None


def generator_refusal(engine: str | None, device: str, fp16: bool) -> tuple[str | None, str]:
    """(why, option): why the onnx-generator engine (`engine`, a name) cannot run with these options, and the option
    that asks for it, or (None, "") when it can: generator.onnx wraps model.onnx or model_int8.onnx (fp32 or int8,
    never fp16) and runs on the CPU. runtime.engines.make_engine gives the same messages."""
    if engine != "onnx-generator":
        return None, ""
    if fp16:
        return "the onnx-generator engine is fp32 or int8 (generator.onnx wraps model.onnx, or model_int8.onnx)", "fp16"
    if str(device).startswith("cuda"):
        return "the onnx-generator engine runs on the CPU; on a GPU use runtime-torch or trt", "device"
    return None, ""


def _same_device(a: str, b: str) -> bool:
    """Whether two device names name one device ("cuda" is "cuda:0")."""
    full = lambda d: f"{d}:0" if d == "cuda" else d   # noqa: E731
    return full(str(a)) == full(str(b))


def engine_refusal(engine, fp16: bool, int8: bool, device: str = "auto",
                   given=frozenset()) -> tuple[str | None, str]:
    """(why, option): why an engine object (one Model.engine or runtime.engines.make_engine returned, or any object
    with a `name`) cannot run the precision that fp16 or int8 asks for, or on the device asked for (not auto), and
    the argument that asks, or (None, "") when it can: such an engine runs the precision it was made with (its
    `precision`, runtime.engine.Engine; fp32 when it says none) where it was made (its `device`), and a precision
    or device asked for beside it that is not that one would be silently ignored. given: the names the user gave;
    fp16=False or int8=False among them beside an fp16 or int8 engine contradicts it as fp16=True beside an fp32
    one does."""
    name = getattr(engine, "name", type(engine).__name__)
    where = getattr(engine, "device", None)
    if device != "auto" and isinstance(where, str) and not _same_device(device, where):
        return (f"the engine given (engine=) is a {name} engine on {where}, not {device}: leave out device=, or give "
                f"an engine made there (model.engine({name!r}, device={device!r})) or the engine's name "
                f"(engine={name!r}, device={device!r})"), "device"
    has = getattr(engine, "precision", "fp32") or "fp32"
    for option, value in (("fp16", fp16), ("int8", int8)):
        if option in given and not value and has == option:
            return (f"the engine given (engine=) is an {has} {name} engine and runs {has}: leave out "
                    f"{option}=False, or give an fp32 engine (model.engine({name!r})) or the engine's name "
                    f"(engine={name!r})"), option
    asked = "fp16" if fp16 else "int8" if int8 else None
    if asked is None or asked == has:
        return None, ""
    return (f"the engine given (engine=) is an {has} {name} engine and runs {has}, not {asked}: leave out "
            f"{asked}=True, or give an engine made with it (model.engine({name!r}, {asked}=True)) or the engine's "
            f"name (engine={name!r}, {asked}=True)"), asked


# The options that make a plan (Sampling.plan_args): a ready plan excludes them (Sampling.of)
PLAN_OPTIONS = ("sampler", "steps", "eta", "variance", "spacing", "guidance_interval", "guidance_rescale")
EDITING = Sampling(sampler=EDIT_SAMPLER, guidance_interval=None)   # the editing methods' defaults, as measured

# The options a model file's recorded plan (metadata entry "plan", written by `ddpm distill`) sets, and those of them
# that belong to its sampler (left at the given sampler's defaults when the user names another sampler).
RECORDED = ("sampler", "steps", "spacing", "eta", "guidance", "guidance_interval")
_OF_SAMPLER = ("steps", "spacing", "eta")


def recorded_plan_refusal(plan: dict | None, cfg) -> str | None:
    """Why a model's recorded plan (its entries each checked alone by runtime.bundle.PLAN) cannot be sampled with on
    the model of config `cfg` (model.config.ModelConfig), a phrase starting "its plan", or None when it can or there
    is none: more than T steps, a guidance interval that is not (lo, hi) with lo < hi, eta != 0 without DDIM, or
    what runtime.samplers.make_plan refuses (DDPM with fewer than T steps or with a spacing). A file's plan is not an
    option the user gave: its faults are the file's, told by its reader (model.io.check_plan, runtime.bundle), not
    as a usage error."""
    if not plan:
        return None
    from .errors import OptionError, brief
    from .runtime.samplers import make_plan
    from .runtime.schedule import Schedule

    if plan["steps"] > cfg.timesteps:
        return f"its plan has {plan['steps']} steps, more than the model's T = {cfg.timesteps}"
    interval = plan.get("guidance_interval")
    if interval is not None and not interval[0] < interval[1]:
        return f"its plan's guidance_interval {brief(interval)} is not (lo, hi) with lo < hi"
    try:
        check_sampler_settings(plan["sampler"], plan["eta"], "small", {"eta"})
        make_plan(Schedule.of(cfg), plan["sampler"], plan["steps"], plan["eta"], spacing=plan["spacing"],
                  guidance_interval=tuple(interval) if interval is not None else None)
    except (OptionError, ValueError) as e:
        return f"its plan cannot be sampled ({e})"
    return None


def recorded_plan(record: dict | None, values: dict, given) -> dict:
    """`values` (option name -> value, some of RECORDED) with the model's recorded plan in place of each option not
    in `given` (the names the user gave); when the user gives another sampler than the recorded one, the record's
    steps, spacing and eta do not apply. record None (a model that records no plan): `values` unchanged. A
    distilled student records DDIM with its steps, trailing spacing, eta 0 and guidance 0 (folded in)."""
    if not record:
        return dict(values)
    other_sampler = "sampler" in given and values.get("sampler", record.get("sampler")) != record.get("sampler")
    out = dict(values)
    for name in values:
        if name in RECORDED and name in record and name not in given and not (other_sampler and name in _OF_SAMPLER):
            v = record[name]
            out[name] = tuple(v) if isinstance(v, list) else v
    return out
