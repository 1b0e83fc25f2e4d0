"""Every argument of every public API function, given a bad value, raises DdpmError (ddpm.arguments): never a
TypeError, a ValueError or a silently accepted bool, float or NaN."""

import inspect
import math
import re

import numpy as np
import pytest
from PIL import Image

import ddpm
from ddpm import DdpmError, Model
from ddpm.arguments import checked
from helpers import tiny_checkpoint

NAN, INF = float("nan"), math.inf
DIGIT = np.zeros((28, 28), np.uint8)
DIGIT[6:22, 12:16] = 255
CLOSED = Image.fromarray(DIGIT)   # a closed PIL image: numpy cannot read it (ValueError), nor a ragged list
CLOSED.close()
PATHS = [3, True, b"x", ["a"], "", "RAISING_PATH"]


class Raising:
    """A user's object whose conversions to an array or an index raise (its own error, not a TypeError)."""

    def __array__(self, *args, **kwargs):
        raise RuntimeError("no array of this")

    def __index__(self):
        raise RuntimeError("no index of this")

    def __repr__(self):
        return "Raising()"


RAISING = Raising()


class RaisingPath:
    """A path object whose __fspath__ raises."""

    def __fspath__(self):
        raise RuntimeError("no path of this")

    def __repr__(self):
        return "RaisingPath()"

# Bad values of every argument, by name. Bools and floats for integers, NaN, inf and bools for numbers, other types
# and unknown words for strings; what each function means by the name decides which are bad (see `bad`).
BAD = {
    "n": [1.5, True, -1, "2", np.float64(2), 2**64, RAISING],
    "label": [True, 1.5, "3", -1, 10, [1.5, 2.0], [[1, 2]], np.array([True, False]), [1, 2, 3], [[1, 2], [3]],
              RAISING, [RAISING, 1]],
    "uncond": ["yes", 1, None],
    "guidance": [-0.1, NAN, INF, True, "1", None, 100.5, 1e300],
    "seed": [-1, 1.5, True, 2**64, "0", None],
    "start": [-1, 1.5, True, None, 2**64],
    "batch": [0, 1.5, True, "8", None],
    "progress": ["no", 0, None],
    "sampler": [3, "euler", None],
    "steps": [0, 1.5, True, "4", 10**6, NAN],
    "eta": [NAN, -0.1, 1.5, True, "0", None],
    "variance": [3, "medium", None],
    "spacing": [3, "log"],
    "guidance_interval": [3, (1.0,), ("a", "b"), (NAN, 1.0), (2.0, 1.0), (-1.0, 1.0), (True, 2.0), (0.0, 1e300)],
    "guidance_rescale": [NAN, INF, -0.1, 1.5, True, "0.7", None],
    "top": [-1, 1.5, True, 10**6],
    "plan": ["ddim", 3],
    "engine": [3, "tvm", None],
    "name": [3, "tvm", None],
    "device": [3, "gpu", "cuda:x", None],
    "fp16": ["yes", 1, None],
    "int8": ["yes", 1, None],
    "cuda_graph": ["yes", 1, None],
    "threads": [0, 1.5, True, "2", 1025, 10**6],
    "max_batch": [0, 1.5, True],
    "dist": [3, "rank0"],
    "log": [3, "print"],
    "form": [3, "folded", None],
    "image": [3, None, b"x", "", np.zeros(5, np.uint8), np.zeros((0, 28, 28), np.uint8), [[1, 2], [3]], CLOSED,
              RAISING],
    "mask": [3, None, "middle", np.zeros(5, np.uint8), [[1, 2], [3]], CLOSED, RAISING],
    "strength": [NAN, -0.1, 1.5, True, "0.5", None],
    "factor": [3, True, 2.0, "2", None],
    "method": [3, "bicubic", None],
    "sigma": [0, -0.1, NAN, True, "0.3", None, 100.5, 1e308],
    "jump": [0, 1.5, True],
    "resample": [0, 1.5, True, 2**64],
    "size": [3, (0, 28), (1.5, 28), (28,), "28x28"],
    "path": PATHS,
    "export": PATHS,
    "data": PATHS,
    "download": ["yes", 1, None],
    "images": [3, "x", np.zeros((4, 28, 28), np.float32), np.zeros((4, 14, 14), np.uint8), RAISING],
    "labels": [3, np.zeros(4, np.float64), np.full(4, 10), np.zeros(3, np.int64), RAISING],
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("args")
    tiny_checkpoint(root)
    return ddpm.load(root)


def _public(model):
    """(name, function, the arguments of a good call) of every public function and method of the API."""
    plan = model.plan("ddim", 2)
    cheap = dict(steps=2, engine="torch", device="cpu")
    edit = dict(n=1, batch=1, **cheap)
    return [
        ("ddpm.load", ddpm.load, {"path": model.path}),
        ("ddpm.evaluate", ddpm.evaluate, {"images": np.zeros((4, 28, 28), np.uint8), "labels": np.arange(4)}),
        ("bundle", model.bundle, {}),
        ("generator_bundle", model.generator_bundle, {"plan": plan}),
        ("engine", model.engine, {"name": "torch", "device": "cpu"}),
        ("plan", model.plan, {}),
        ("labels", model.labels, {"n": 2}),
        ("generate", model.generate, dict(n=1, batch=1, **cheap)),
        ("inpaint", model.inpaint, dict(image=DIGIT, resample=1, **edit)),
        ("edit", model.edit, dict(image=DIGIT, **edit)),
        ("upscale", model.upscale, dict(image=DIGIT[::2, ::2], **edit)),
        ("restore", model.restore, dict(image=DIGIT, sigma=0.3, **edit)),
        ("picture", model.picture, {"image": DIGIT}),
        ("inpaint_input", model.inpaint_input, {"image": DIGIT, "mask": "top"}),
    ]


def _cases():
    """Every (function, argument, bad value); every public argument must have bad values in BAD."""
    names = [n for n, f in inspect.getmembers(Model, inspect.isfunction) if not n.startswith("_")]
    assert sorted(names) == sorted(["bundle", "generator_bundle", "engine", "close", "plan", "labels", "generate",
                                    "inpaint", "edit", "upscale", "restore", "picture", "inpaint_input"]), \
        f"a new public method needs bad values here: {names}"
    cases = []
    for fn_name, fn in [(n, getattr(Model, n)) for n in names] + [("ddpm.load", ddpm.load),
                                                                  ("ddpm.evaluate", ddpm.evaluate)]:
        for arg in inspect.signature(fn).parameters:
            if arg == "self":
                continue
            assert arg in BAD, f"{fn_name}({arg}=...) has no bad values in BAD"
            for v in bad(fn_name, arg):
                shown = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(v))   # the same id in every process (pytest -n)
                cases.append(pytest.param(fn_name, arg, v, id=f"{fn_name}-{arg}={shown}"[:80]))
    return cases


def bad(fn_name: str, arg: str) -> list:
    """The values of BAD that are bad for this function's argument (None means "the default" for some)."""
    values = [RaisingPath() if isinstance(v, str) and v == "RAISING_PATH" else v for v in BAD[arg]]
    optional = {("inpaint", "n"), ("edit", "n"), ("upscale", "n"), ("restore", "n"), ("inpaint_input", "n")}
    if (fn_name, arg) in optional:
        values = [v for v in values if v is not None]
    if fn_name == "ddpm.evaluate" and arg == "name":
        values = [3, None, b"x"]   # evaluate's name is any string (the row's name)
    return values


@pytest.mark.parametrize("fn_name, arg, value", _cases())
def test_every_bad_argument_is_a_ddpm_error(model, fn_name, arg, value, fake_mnist):
    fn = {n: f for n, f, _ in _public(model)}[fn_name]
    good = {n: kw for n, _, kw in _public(model)}[fn_name]
    if fn_name == "ddpm.evaluate":
        good = dict(good, data=fake_mnist, download=False)
    with pytest.raises(DdpmError) as e:
        fn(**dict(good, **{arg: value}))
    msg = str(e.value)
    assert "\n" not in msg and re.search(rf"\b{arg}\b", msg), msg   # one line that names the argument


@pytest.mark.slow
def test_the_good_calls_pass(model):
    """The calls the cases start from are good: each bad value alone makes them fail."""
    for name, fn, kw in _public(model):
        if name not in ("ddpm.evaluate", "generator_bundle"):   # classifier and onnx package: tested elsewhere
            fn(**kw)


@pytest.mark.parametrize("call", [
    lambda m: m.generate(2, stepz=3),                 # unknown argument
    lambda m: m.restore(DIGIT),                       # missing argument
    lambda m: m.generate(2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20),   # too many
])
def test_a_call_that_does_not_fit_the_signature_is_a_ddpm_error(model, call):
    with pytest.raises(DdpmError):
        call(model)


def test_every_public_callable_refuses_an_unknown_or_extra_argument_with_ddpm_error(model):
    """Every method of Model a user calls, the context manager's included, and every function of ddpm goes through
    the arguments checker: an unknown keyword (and, where it takes no more, an extra positional) is a DdpmError,
    never a TypeError."""
    methods = [n for n, _ in inspect.getmembers(Model, inspect.isfunction)
               if not n.startswith("_") or n in ("__enter__", "__exit__")]
    functions = [getattr(ddpm, n) for n in ddpm.__all__ if inspect.isfunction(getattr(ddpm, n))]
    assert "close" in methods and "__enter__" in methods and ddpm.load in functions
    for fn in [getattr(model, n) for n in methods] + functions:
        assert hasattr(fn, "specs"), f"{fn.__qualname__} is not checked (arguments.checked)"
        with pytest.raises(DdpmError, match=r"\(\): (got an unexpected keyword argument 'force'|missing)"):
            fn(force=True)
    for fn, args in ((model.close, (1,)), (model.__enter__, (1,)), (model.__exit__, (1, 2, 3, 4))):
        with pytest.raises(DdpmError, match="too many positional arguments"):
            fn(*args)
    with model as m:   # what the with statement passes still fits
        assert m is model


class _Int(int):
    def __lt__(self, other):
        raise RuntimeError("no comparison of this")

    __gt__ = __le__ = __ge__ = __lt__


class _Float(float):
    def __lt__(self, other):
        raise RuntimeError("no comparison of this")

    __gt__ = __le__ = __ge__ = __lt__


class _Str(str):
    def __eq__(self, other):
        raise RuntimeError("no comparison of this")

    __hash__ = str.__hash__


def test_subclasses_of_int_float_and_str_are_the_values_they_hold(model):
    """An int, float or str subclass whose comparisons raise (the user's override) is checked and used as the plain
    value it holds (arguments.exact): no override runs in the checks or the library, so no foreign exception."""
    a = model.generate(_Int(2), seed=_Int(3), steps=_Int(2), guidance=_Float(0.5), sampler=_Str("ddim"),
                       engine="torch", device="cpu")
    b = model.generate(2, seed=3, steps=2, guidance=0.5, sampler="ddim", engine="torch", device="cpu")
    assert np.array_equal(a, b)
    assert list(model.labels(_Int(3))) == list(model.labels(3))
    with pytest.raises(DdpmError, match=r"n must be an integer in 0\.\.4294967296, got -1"):
        model.generate(_Int(-1))


@pytest.mark.slow
def test_numpy_scalars_are_as_good_as_python_ones(model):
    a = model.generate(np.int64(2), seed=np.uint64(3), batch=np.int32(2), guidance=np.float32(0.5), steps=np.int16(2),
                       engine="torch", device="cpu")
    b = model.generate(2, seed=3, batch=2, guidance=0.5, steps=2, engine="torch", device="cpu")
    assert np.array_equal(a, b)


@pytest.mark.parametrize("fn_name", ["generate", "inpaint", "edit", "upscale", "restore"])
def test_the_last_sample_index_is_checked_as_start(model, fn_name):
    """Samples start..start+n-1 must be indices of the seeded stream (below 2^64): the message names start and n,
    the arguments given, not the seed."""
    fn = {n: f for n, f, _ in _public(model)}[fn_name]
    good = {n: kw for n, _, kw in _public(model)}[fn_name]
    with pytest.raises(DdpmError, match=r"^start must be .* got start=18446744073709551615 with n=2$"):
        fn(**dict(good, n=2, start=2**64 - 1))
    assert fn(**dict(good, n=1, start=2**64 - 1)).shape[0] == 1


def test_a_repaint_plan_is_bounded_before_it_is_listed(model):
    """RePaint's rows are counted before they are listed: a large resample count is one line naming it."""
    from ddpm.runtime.edits import repaint_plan

    with pytest.raises(ValueError, match="resample 1000000 with jump 1 on 2 steps makes a plan of 2000000 rows"):
        repaint_plan(model.plan("ddim", 2, eta=1.0), 1, 10**6)


@pytest.mark.parametrize("value", [[[1, 2], [3]], CLOSED], ids=["ragged", "closed PIL image"])
def test_a_picture_numpy_cannot_read_is_an_image_error(value):
    """runtime.images.picture (the CLI's and the runtime's reader, below the API's argument check) names the
    argument in one line where numpy raises ValueError."""
    from ddpm.runtime.images import ImageError, picture

    with pytest.raises(ImageError, match=r"^mask must be a picture file") as e:
        picture(value, "mask")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("option, value", [("sampler", "ddpm"), ("sampler", "ddim"), ("steps", 3), ("eta", 1.0),
                                           ("variance", "large"), ("spacing", "linspace"),
                                           ("guidance_interval", None), ("guidance_rescale", 0.5)])
def test_a_plan_excludes_the_options_that_make_one(model, option, value):
    """generate(plan=P, sampler=...) ran P and ignored the sampler silently: a ready plan with any option that makes
    a plan (one that contradicts it, or repeats it: ddim with a ddim plan) is one DdpmError naming both."""
    from ddpm.errors import OptionError

    plan = model.plan("ddim", 2)
    with pytest.raises(OptionError, match=f"^plan and {option} exclude each other") as e:
        model.generate(1, plan=plan, engine="torch", device="cpu", **{option: value})
    assert e.value.option == "plan" and "\n" not in str(e.value)
    ran = model.generate(2, plan=plan, guidance=1.0, seed=3, engine="torch", device="cpu")   # the rest is allowed
    assert np.array_equal(ran, model.generate(2, sampler="ddim", steps=2, guidance=1.0, seed=3, engine="torch",
                                              device="cpu"))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.uint32])
def test_a_numpy_integer_of_any_width_is_used_as_a_python_int(model, dtype):
    """A small-width numpy integer passes the check and reaches the function as a Python int: n * 784 or -batch of
    an np.uint8 would overflow its dtype (OverflowError, not a DdpmError) or wrap around."""
    seen = {}

    @checked
    def probe(n: int = 1, batch: int = 1, seed: int = 0, steps=None, size=None):
        seen.update(n=n, batch=batch, seed=seed, steps=steps, size=size)

    probe(dtype(3), batch=dtype(2), seed=dtype(5), steps=dtype(4), size=(dtype(28), dtype(28)))
    assert seen == dict(n=3, batch=2, seed=5, steps=4, size=(28, 28))
    assert all(type(v) is int for k, v in seen.items() if k != "size") and all(type(v) is int for v in seen["size"])
    ran = model.generate(dtype(3), batch=dtype(2), steps=dtype(2), seed=dtype(1), engine="torch", device="cpu")
    assert np.array_equal(ran, model.generate(3, batch=2, steps=2, seed=1, engine="torch", device="cpu"))


@pytest.fixture(scope="module")
def other_schedules(tmp_path_factory):
    """Models of the tiny network on other schedules: another T, another beta recipe, v prediction."""
    import dataclasses

    from helpers import TINY

    out = {}
    for name, change in [("T", dict(timesteps=50)), ("recipe", dict(schedule="cosine")),
                         ("prediction", dict(prediction="v"))]:
        root = tmp_path_factory.mktemp(f"plan-{name}")
        tiny_checkpoint(root, cfg=dataclasses.replace(TINY, **change))
        out[name] = ddpm.load(root)
    return out


@pytest.mark.parametrize("other", ["T", "recipe", "prediction"])
@pytest.mark.parametrize("method", ["generate", "engine", "generator_bundle"])
def test_a_plan_of_another_schedule_is_refused(model, other_schedules, other, method):
    """A plan carries its timesteps and abar: one made by a model with another schedule (T, beta recipe or
    prediction) is refused in one line by every method that takes a plan, either way round, before any work."""
    them = other_schedules[other]
    for runs, made_by in [(model, them), (them, model)]:
        plan = made_by.plan("ddim", 2)
        call = {"generate": lambda: runs.generate(1, plan=plan, engine="torch", device="cpu"),
                "engine": lambda: runs.engine("onnx-generator", plan=plan),
                "generator_bundle": lambda: runs.generator_bundle(plan)}[method]
        with pytest.raises(DdpmError, match=r"plan: a plan made .*: make it with this model's plan\(\)$") as e:
            call()
        assert "\n" not in str(e.value)
    assert model.generate(1, plan=model.plan("ddim", 2), engine="torch", device="cpu").shape == (1, 28, 28)


CHEAP = dict(n=1, batch=1, engine="torch", device="cpu")


def test_the_plans_edits_make_pass_the_plan_check(model):
    """RePaint's re-noising rows start from a lower noise level than their t's: the check looks at the rows that
    call the network, so the plans the edits make themselves (all through Model.engine(plan=...)) are never refused."""
    assert model.inpaint(DIGIT, "top", steps=4, jump=2, resample=2, **CHEAP).shape == (1, 28, 28)
    assert model.restore(DIGIT, sigma=0.3, **CHEAP).shape == (1, 28, 28)
    assert model.upscale(DIGIT[::2, ::2], steps=3, **CHEAP).shape == (1, 28, 28)


@pytest.mark.slow   # T network calls and the re-noised rows: the DDIM RePaint plan above is the inner loop's case
def test_the_ddpm_samplers_repaint_plan_passes_the_plan_check(model):
    assert model.inpaint(DIGIT, "top", sampler="ddpm", jump=10, resample=2, **CHEAP).shape == (1, 28, 28)


def test_the_choices_come_from_the_modules_that_define_them(monkeypatch):
    """The API's argument specs read their choices where they live (a new engine, upscale factor or half is one
    edit there): engines (runtime.engines), mask halves (runtime.images), factors and methods (runtime.edits),
    variances (options)."""
    from ddpm import options
    from ddpm.arguments import ARGS
    from ddpm.runtime import edits, engines, images
    from ddpm.schema import Invalid

    monkeypatch.setattr(engines, "ENGINES", (*engines.ENGINES, "tvm"))
    monkeypatch.setattr(images, "HALVES", (*images.HALVES, "centre"))
    monkeypatch.setattr(edits, "FACTORS", (*edits.FACTORS, 8))
    assert ARGS["engine"].what == ("an engine name (auto, torch, runtime-torch, onnx, trt, onnx-generator, tvm) or an "
                                   "engine object (model.engine(...): name, device, supports, run)")
    assert ARGS["mask"].what.startswith("one of top, bottom, left, right, centre, a picture file")
    ARGS["factor"].check(8, {}, "factor")
    with pytest.raises(Invalid, match=r"^factor must be 2 or 4 or 8, got 3$"):
        ARGS["factor"].check(3, {}, "factor")
    assert ARGS["variance"].choices is options.VARIANCES
    for method in edits.UPSCALERS:
        ARGS["method"].check(method, {}, "method")


@pytest.fixture(scope="module")
def shipped():
    with ddpm.load() as m:
        yield m


@pytest.mark.parametrize("engine", ["torch", "runtime-torch", "onnx", "onnx-generator"])
def test_an_engine_taken_from_a_model_checks_what_it_runs(model, shipped, engine):
    """Model.engine() hands out an engine whose run() is public too: every input is checked in one place
    (runtime.engine.Engine.run) before any work, a bad one is an EngineInput (a DdpmError, and a ValueError as
    run() always said), never a numpy broadcast error or onnxruntime's out-of-bounds Gather; arrays of another
    float or integer dtype are taken as float32 and int64, giving the same digits."""
    from ddpm.runtime.engine import EngineInput

    m = model if engine in ("torch", "runtime-torch") else shipped
    plan = m.plan("ddim", 2)
    eng = m.engine(engine, plan=plan) if engine == "onnx-generator" else m.engine(engine)
    C, H, W = m.image_shape
    x = np.random.default_rng(0).standard_normal((2, C, H, W)).astype(np.float32)
    labels = np.array([1, 2])
    good = eng.run(x, None, labels, plan, 0.5)
    assert np.array_equal(eng.run(x.astype(np.float64), None, labels.astype(np.uint8), plan, np.float32(0.5)), good)
    bad = [
        ((x[:, 0], None, labels, plan, 0.5), "x_T must be an array of any float type of shape (B, C, H, W)"),
        ((x[:, :, 1:], None, labels, plan, 0.5), f"x_T has shape (2, {C}, {H - 1}, {W}), this engine's images"),
        ((x.tolist(), None, labels, plan, 0.5), "x_T must be an array"),
        ((x * NAN, None, labels, plan, 0.5), "x_T holds"),
        ((x, None, np.array([1, 2, 3]), plan, 0.5), "labels has shape (3,), but B = 2 (from x_T)"),
        ((x, None, np.array([1.0, 2.0]), plan, 0.5), "labels must be any int type"),
        ((x, None, np.array([-1, 2]), plan, 0.5), "labels must hold values >= 0"),
        ((x, None, np.array([1, 10**6]), plan, 0.5), "labels holds 1000000, beyond this model's"),
        ((x, None, labels, "ddim", 0.5), "plan must be a sampler plan"),
        ((x, None, labels, plan, -1.0), "guidance must be a finite number >= 0"),
        ((x, None, labels, plan, NAN), "guidance must be a finite number >= 0"),
        ((x, None, labels, plan, 0.5, 5), "callback must be a function"),
        ((x, x[:, None], labels, plan, 0.5), "draws 0 noise slots besides x_T, so z must be None, got (2, 1, "),
    ]
    for args, message in bad:
        with pytest.raises(EngineInput, match=re.escape(message)) as e:
            eng.run(*args)
        assert isinstance(e.value, DdpmError) and isinstance(e.value, ValueError)
        assert str(e.value).startswith("engine.run(): "), e.value
    ddpm_plan = m.plan("ddim", 2, eta=1.0)   # a plan with noise: z is (B, Q, C, H, W), Q its slots
    if engine != "onnx-generator":
        z = np.zeros((2, ddpm_plan.num_slots, C, H, W), np.float32)
        for z_bad in (None, z[:, 1:]):
            with pytest.raises(EngineInput, match=re.escape(f"noise slots besides x_T, so z must be an array of "
                                                            f"shape (B, {ddpm_plan.num_slots}, C, H, W)")):
                eng.run(x, z_bad, labels, ddpm_plan, 0.5)
        eng.run(x, z, labels, ddpm_plan, 0.5)
    with pytest.raises(EngineInput, match="states must be true or false, got 1"):
        eng.run(x, None, labels, plan, 0.5, states=1)
    assert np.array_equal(eng.run(x, None, labels, plan, 0.5), good)   # nothing a refusal left behind changes it


def test_an_engine_object_must_run_the_model_it_is_given_to(model, shipped, tmp_path):
    """engine= takes an engine object, and the digits must be that model's: another model's engine (its weights
    known from Model.engine or from its ONNX file's own record) is an OptionError naming engine, whichever engine;
    an object without what the pipeline reads of an engine (supports, device) is the argument's DdpmError; an
    engine on another device than device= asks, or one that returns something else than Engine.run promises, one
    line each. An engine of the same weights made by hand (docs/int8.md) draws this model's digits."""
    from ddpm.errors import OptionError
    from ddpm.runtime.engine import EngineOutput, Supports
    from ddpm.runtime.nets import OnnxNet
    from ddpm.runtime.runner import RuntimeEngine

    for mine, theirs, name in ((model, shipped, "torch"), (model, shipped, "runtime-torch"), (shipped, model, "onnx"),
                               (shipped, model, "torch")):
        with pytest.raises(OptionError, match=f"runs other weights \\(sha256 {theirs.hash[:12]}\\) than this model's") as e:
            mine.generate(2, steps=2, engine=theirs.engine(name))
        assert e.value.option == "engine"
    b = shipped.bundle()
    by_hand = RuntimeEngine(OnnxNet(b.onnx_path("fp32")), b.null_label, b.image_shape)
    assert by_hand.weights == shipped.hash
    assert np.array_equal(shipped.generate(3, seed=4, steps=3, engine=by_hand), shipped.generate(3, seed=4, steps=3))
    with pytest.raises(OptionError, match="runs other weights"):
        model.generate(2, steps=2, engine=by_hand)

    class Bare:   # what a user may think an engine is
        name = "onnx"

        def run(self, *args, **kwargs):
            return None

    with pytest.raises(DdpmError, match="engine must be an engine name .* or an engine object"):
        model.generate(2, steps=2, engine=Bare())
    Bare.device, Bare.supports = "cpu", 5
    with pytest.raises(OptionError, match="says what it can do with a int, not a runtime.engine.Supports"):
        model.generate(2, steps=2, engine=Bare())
    Bare.supports = Supports(edits=False, states=False)
    with pytest.raises(EngineOutput, match=r"the onnx engine returned a NoneType for a batch of 2, not x_0 "
                                           r"\(2, 1, 28, 28\) float32 or the images \(2, 28, 28\) uint8"):
        model.generate(2, steps=2, engine=Bare())
    with pytest.raises(OptionError, match=r"is a torch engine on cpu, not cuda:1: leave out device=") as e:
        model.generate(2, steps=2, engine=model.engine("torch"), device="cuda:1")
    assert e.value.option == "device"
    assert model.generate(2, steps=2, engine=model.engine("torch"), device="cpu").shape == (2, 28, 28)


def test_the_apis_refusals_name_no_command_line_options(model, shipped):
    """The API's user writes Python: a refusal found in the shared core (the sampler table, the engines) names what
    to use in words both readers know, never a command-line option (--sampler, --engine)."""
    from ddpm.errors import OptionError

    calls = [lambda: model.generate(2, sampler="ddpm", steps=6),
             lambda: shipped.inpaint(DIGIT, "bottom", n=1, engine="onnx-generator"),
             lambda: shipped.generate(2, sampler="ddim", steps=3,
                                      engine=shipped.engine("onnx-generator", plan=shipped.plan()))]
    for call in calls:
        with pytest.raises(OptionError) as e:
            call()
        assert "--" not in str(e.value), e.value


@pytest.mark.parametrize("name", ["x\ny", "", "x" * 201, "bell\a"])
def test_a_plan_whose_name_cannot_name_its_files_is_refused(shipped, tmp_path, monkeypatch, name):
    """A plan's name names the generator file and the export.json record made for it: a plan renamed to a name they
    cannot hold (a newline, nothing, too long) was taken, its generator built, and the record refused when the folder
    was read, which then called the whole cache folder damaged. The plan argument is refused before any work."""
    import dataclasses

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    plan = dataclasses.replace(shipped.plan(steps=4), name=name)
    with pytest.raises(DdpmError, match=r"plan must be a sampler plan \(Model.plan\) named in one printable line"):
        shipped.generate(2, plan=plan, engine="onnx-generator")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("generator-*"))


def test_labels_checks_start_as_generate_does(ckpt):
    """Model.labels took samples past the seeded stream (start + n - 1 > 2^64 - 1) that generate refuses."""
    import ddpm
    from ddpm.errors import OptionError

    model = ddpm.load(ckpt)
    assert model.labels(2, start=2**64 - 2).shape == (2,)
    for call in (lambda: model.labels(4, start=2**64 - 2), lambda: model.generate(4, start=2**64 - 2, steps=2)):
        with pytest.raises(OptionError, match=r"start must be in 0\.\.2\^64-1 - \(n - 1\)"):
            call()
