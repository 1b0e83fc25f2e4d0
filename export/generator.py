"""generator.onnx: the whole reverse loop of a deterministic plan around the noise predictor, in one ONNX model.

    images = generator(x_T, labels, guidance)
      x_T       (B,C,H,W) float32  the starting noise (slot 0 of runtime.noise's stream: sample k of seed s)
      labels    (B,) int64         the class of every sample; the null label (export.json `null_label`) for none
      guidance  () float32         classifier-free guidance w >= 0 (0: the conditional model alone)
      images    (B,H,W) uint8      x_0 quantised as runtime.images.to_uint8: clip(rint((x + 1) 127.5), 0, 255);
                (B,H,W,C) for C = 3 (channels last, runtime.images' colour pictures)

Any ONNX runtime, in any language or in a browser, then generates with one call. Row i of the plan
(runtime.samplers' module docstring) is the runner's step (runtime.runner.Runner.step) in the same float32
operations and order, so the generator reproduces the runtime up to the noise predictor's own rounding:

    1. the network's batch: x, and on guided rows (cfg[i] and w != 0) x again with the null label (Tile and Slice
       by a batch size of B or 2B computed in the graph, so there is no branch)
    2. eps = eps_c + w (eps_c - eps_u)   (Ho & Salimans 2022, eq. 6), computed as (eps_u - eps_c)(-w) + eps_c;
       on an unguided row eps_u is eps_c itself and this is eps_c exactly
       and with plan.guidance_rescale phi > 0, eps *= 1 + phi (std(eps_c) / std(eps) - 1) per sample (Lin et al.
       2024; the means as MatMuls with a (C*H*W, 1) column of 1/(C*H*W), so that no ONNX opset matters)
    3. x0_hat = x0_x[i] x - x0_out[i] out (the network's eps or v), clipped to [-1, 1] when plan.clip
    4. x = w_x[i] x + w_x0[i] x0_hat + w_x0_prev[i] x0_hat' + w_x0_prev2[i] x0_hat''
       (x0_hat', x0_hat'': the previous two rows' predictions, the history of multistep solvers)

Two forms of the same rows (README "generator" has their measured speed):
    loop      one ONNX `Loop` over the rows: the per-row columns are (S,) tables gathered by the iteration number,
              the x0_hat history is loop-carried state, the network's nodes appear once.
    unrolled  S copies of the network's nodes (its weights stored once, shared), each row's coefficients constants.

Two precisions (networks), side by side in an export folder (export.json "generators", each with its "precision"):
    fp32      model.onnx on every row
    int8      model_int8.onnx (export/int8.py), and model.onnx on the rows the int8 engine runs in fp32
              (runtime.engines.int8_fp32_rows: sigma <= INT8_FP32_SIGMA, and the last row): the int8 engine's
              digits, verified against it as the fp32 generator is against the onnx engine. In the loop form each
              network's rows are one Loop (the int8 rows, then the fp32 ones).

Only deterministic plans (no fresh noise after x_T) whose every row calls the network can be written this way.
Nothing here imports PyTorch: a generator is built from an export folder's model.onnx (and model_int8.onnx) alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import OptionError
from ..model.io import atomic_write, require_onnx
from ..runtime.bundle import GREY_TOLERANCE as TOLERANCE_GREY, META_FILE, Bundle, file_sha256
from ..runtime.images import check_channels, require_grey, to_uint8
from ..runtime.noise import make_noise
from ..runtime.runner import plan_key
from ..runtime.samplers import Plan

GENERATOR_FILE = "generator.onnx"
FORMS = ("loop", "unrolled")
DEFAULT_FORM = "loop"
# verify(): max |generator - runtime| in grey levels of the uint8 images is at most TOLERANCE_GREY (runtime/bundle.py)
NET = "eps_theta/"   # the noise predictor's names inside the generator


class GeneratorUnsupported(OptionError):
    """A plan that the generator cannot express (stochastic, or with rows that do not call the network): a fault of
    the sampler chosen, or of DDIM's eta (option "eta")."""

    def __init__(self, message: str, option: str = "sampler"):
        super().__init__(message, option)


class GeneratorFailed(Exception):
    """The generator disagrees with the runtime; the message carries the figures."""


def check_image_shape(image_shape: tuple[int, int, int], page: bool = False) -> None:
    """Return for a model whose images (C, H, W) a generator can write as pictures (C = 1 or 3), and with page, that
    the web page can draw (C = 1: its canvas draws grey levels); else a DdpmError: runtime.images.PictureChannels,
    or GreyOnly for the page of a colour model."""
    check_channels(image_shape, "its generator.onnx (--generator, --web, the onnx-generator engine)")
    if page:
        require_grey(image_shape, "the web page (--web)")


def check_plan(plan: Plan) -> Plan:
    """The plan itself when a generator can run it; GeneratorUnsupported with the reason otherwise, naming the
    option that chose it: "eta" for DDIM with eta > 0, "sampler" for DDPM (its rows always add noise)."""
    if plan.stochastic:
        rows = int((plan.z_slot >= 0).sum())
        option = "eta" if plan.name.startswith("ddim") else "sampler"   # runtime.samplers.make_plan's names
        raise GeneratorUnsupported(f"the generator runs deterministic plans only: {plan.name} adds fresh noise at "
                                   f"{rows} of its {plan.steps} rows (use DDIM with eta 0, or another deterministic "
                                   f"sampler)", option)
    if not plan.calls_net.all():
        raise GeneratorUnsupported(f"the generator runs plans whose every row calls the network; {plan.name} has "
                                   f"{int((~plan.calls_net).sum())} rows that do not")
    return plan


def check_form(form: str, precision: str = "fp32") -> None:
    """Return when a generator of `precision` can be written in `form`; OptionError (option "form") otherwise: the
    int8 generator is a Loop per network only. Unrolled, onnxruntime optimizes the copies of model_int8.onnx's
    nodes in one graph with the rest, and its quantized convolutions there round otherwise than in model_int8.onnx
    alone: on the tiny test model the digits differed from the int8 engine's by 32 grey levels in 67 pixels (the
    loop form: 0)."""
    if precision == "int8" and form != "loop":
        raise OptionError(f"the int8 generator is written in the loop form only: {form}, its digits differ from "
                          f"the int8 engine's by more than {TOLERANCE_GREY} grey level", "form")


class _Nodes:
    """Nodes and initializers of one graph, named uniquely through a counter shared by the graph and its subgraphs
    (ONNX names are one namespace across scopes)."""

    def __init__(self, counter: list[int], prefix: str):
        self.nodes, self.inits, self.counter, self.prefix = [], [], counter, prefix

    def _name(self, hint: str) -> str:
        self.counter[0] += 1
        return f"{self.prefix}{hint}_{self.counter[0]}"

    def op(self, op_type: str, inputs, **attrs) -> str:
        from onnx import helper

        name = self._name(op_type)
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attrs))
        return name

    def const(self, hint: str, value, dtype) -> str:
        from onnx import numpy_helper

        name = self._name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name


def _inline_net(g: _Nodes, net_graph, x_in: str, t_in: str, y_in: str) -> str:
    """Append a copy of the noise predictor's nodes reading x_in, t_in, y_in; returns the name of its eps. The
    weights are not copied: every copy reads the same initializers (named NET + the original name)."""
    import onnx.compose

    prefix = g._name("net") + "/"
    body = onnx.compose.add_prefix_graph(net_graph, prefix, rename_inputs=False, rename_initializers=False,
                                         rename_value_infos=False, name_map={"x": x_in, "t": t_in, "y": y_in})
    g.nodes.extend(body.node)
    return body.output[0].name


def _std_rows(g: _Nodes, ctx: dict, e: str) -> str:
    """(B, 1): the standard deviation (1/N) of each sample of e (B,C,H,W) over its N = C*H*W values."""
    flat = g.op("Reshape", [e, ctx["flat"]])                                                  # (B, N)
    d = g.op("Sub", [flat, g.op("MatMul", [flat, ctx["mean_col"]])])
    return g.op("Sqrt", [g.op("MatMul", [g.op("Mul", [d, d]), ctx["mean_col"]])])


def _row(g: _Nodes, ctx: dict, net_graph, plan: Plan, x: str, hist: list[str], coef: dict, t: str,
         guided_row: str | None, terms: tuple[bool, bool]) -> tuple[str, list[str]]:
    """One plan row as nodes (module docstring, stages 1-4); returns the new x and the new x0_hat history."""
    import onnx

    axes0 = ctx["axes0"]
    # 1. network batch: n = B (1 + guided_row) images, x repeated, labels then null labels, the row's timestep
    if guided_row is None:   # a row outside the guidance interval: the conditional model alone
        x_in, y_in, n = x, ctx["labels"], ctx["B"]
    else:
        reps = g.op("Unsqueeze", [g.op("Add", [g.op("Cast", [guided_row], to=onnx.TensorProto.INT64), ctx["one"]]),
                                  axes0])                                                    # (1,): 1 or 2
        n = g.op("Mul", [ctx["B"], reps])
        x_in = g.op("Tile", [x, g.op("Concat", [reps, ctx["ones3"]], axis=0)])
        y_in = g.op("Slice", [ctx["y2"], ctx["zero1"], n, axes0])
    t_in = g.op("Expand", [t, n])
    eps = _inline_net(g, net_graph, x_in, t_in, y_in)
    # 2. guidance: eps = (eps_u - eps_c)(-w) + eps_c, as the runner computes it; eps_u = eps_c on unguided rows
    if guided_row is not None:
        eps_c = g.op("Slice", [eps, ctx["zero1"], ctx["B"], axes0])
        eps_u = g.op("Slice", [eps, g.op("Sub", [n, ctx["B"]]), n, axes0])
        eps = g.op("Add", [g.op("Mul", [g.op("Sub", [eps_u, eps_c]), ctx["neg_w"]]), eps_c])
        if plan.guidance_rescale:
            f = g.op("Sub", [g.op("Div", [_std_rows(g, ctx, eps_c), _std_rows(g, ctx, eps)]), ctx["plus1"]])
            f = g.op("Add", [g.op("Mul", [f, ctx["phi"]]), ctx["plus1"]])              # (B, 1)
            eps = g.op("Mul", [eps, g.op("Reshape", [f, ctx["rows4"]])])
    # 3. x0_hat = x0_x x - x0_out out (DDIM eq. 12's "predicted x0" for eps; v: Salimans & Ho 2022), clipped to the data range
    x0 = g.op("Sub", [g.op("Mul", [x, coef["x0_x"]]), g.op("Mul", [eps, coef["x0_out"]])])
    if plan.clip:
        x0 = g.op("Clip", [x0, ctx["minus1"], ctx["plus1"]])
    # 4. x = w_x x + w_x0 x0_hat (+ the remembered predictions of multistep solvers)
    nx = g.op("Add", [g.op("Mul", [x, coef["w_x"]]), g.op("Mul", [x0, coef["w_x0"]])])
    for use, h, c in zip(terms, hist, ("w_x0_prev", "w_x0_prev2")):
        if use:
            nx = g.op("Add", [nx, g.op("Mul", [h, coef[c]])])
    return nx, [x0, *hist][: len(hist)]


def build(net_model, plan: Plan, null_label: int, image_shape: tuple[int, int, int], form: str = DEFAULT_FORM,
          meta=None, row_nets=None):
    """The generator of `plan` around `net_model` (model.onnx as an onnx.ModelProto: x, t, y -> eps, float32 in and
    out) for images of the model's image_shape (C, H, W) (Bundle.image_shape).

    net_model may be a sequence of such networks, with row_nets (S,) int the index of the network each row of the
    plan calls (None: the first for every row). The int8 generator is [model_int8.onnx, model.onnx] with the rows of
    runtime.engines.int8_fp32_rows on the second, as the int8 engine runs them. In the loop form each run of
    consecutive rows on one network is its own Loop (the x0_hat history passed from one to the next); unrolled,
    each row's copy is of its network.

    Returns an onnx.ModelProto with inputs x_T (B,C,H,W) float32, labels (B,) int64, guidance () float32 and output
    images (B,H,W) uint8, or (B,H,W,C) for C = 3 (module docstring). Raises GeneratorUnsupported for plans it cannot
    express, PictureChannels for a model whose images are not grey or RGB pictures (check_image_shape), ValueError
    for an unknown form, a network that is not eps(x, t, y), or row_nets that do not index the networks row by row.
    """
    import onnx
    from onnx import TensorProto, helper

    check_image_shape(image_shape)
    check_plan(plan)
    if form not in FORMS:
        raise ValueError(f"unknown generator form {form!r} ({' or '.join(FORMS)})")
    nets = list(net_model) if isinstance(net_model, (list, tuple)) else [net_model]
    row_nets = np.zeros(plan.steps, dtype=np.int64) if row_nets is None else np.asarray(row_nets, dtype=np.int64)
    if row_nets.shape != (plan.steps,) or not ((row_nets >= 0) & (row_nets < len(nets))).all():
        raise ValueError(f"row_nets must give each of the plan's {plan.steps} rows one of the {len(nets)} networks")
    # the networks' weights, named NET + name (NET<k>/ for the k-th network after the first: the int8 and the fp32
    # model share names), stored once per network and read by every copy of its nodes: in the loop body's own
    # initializers (onnxruntime only lays out a subgraph's convolutions for its CPU kernels (NCHWc) when their
    # weights are the subgraph's constants, not outer-scope values: 1.7x slower otherwise), else at the top level
    net_graphs, net_weights = [], []
    for k, net in enumerate(nets):
        g0 = net.graph
        if [i.name for i in g0.input] != ["x", "t", "y"] or [o.name for o in g0.output] != ["eps"]:
            raise ValueError("the noise predictor must have inputs x, t, y and output eps (a `ddpm export` "
                             "model.onnx)")
        if g0.input[0].type.tensor_type.elem_type != TensorProto.FLOAT:
            raise ValueError("the generator is built around float32 models (model.onnx, model_int8.onnx)")
        prefix = NET if k == 0 else f"{NET[:-1]}{k}/"
        net_graph = onnx.compose.add_prefix_graph(g0, prefix, rename_nodes=False, rename_edges=False,
                                                  rename_inputs=False, rename_outputs=False,
                                                  rename_value_infos=False)
        net_weights.append(list(net_graph.initializer))
        del net_graph.initializer[:]
        del net_graph.value_info[:]
        net_graphs.append(net_graph)

    C, H, W = image_shape
    S = plan.steps
    counter = [0]
    top = _Nodes(counter, "")
    f32 = np.float32
    ctx = {"axes0": top.const("axes0", [0], np.int64), "zero1": top.const("zero1", [0], np.int64),
           "one": top.const("one", 1, np.int64), "ones3": top.const("ones3", [1, 1, 1], np.int64),
           "minus1": top.const("minus1", -1.0, f32), "plus1": top.const("plus1", 1.0, f32), "labels": "labels"}
    if plan.guidance_rescale:   # the guidance rescale's constants (_std_rows, _row's stage 2)
        ctx.update(phi=top.const("phi", plan.guidance_rescale, f32), flat=top.const("flat", [0, -1], np.int64),
                   rows4=top.const("rows4", [0, 1, 1, 1], np.int64),
                   mean_col=top.const("mean_col", np.full((C * H * W, 1), 1.0 / (C * H * W)), f32))
    # loop invariants: B (1,), y2 = [labels | null labels] (2B,), -w, and "w != 0"
    ctx["B"] = top.op("Shape", ["x_T"], start=0, end=1)
    nulls = top.op("Expand", [top.const("null_label", null_label, np.int64), ctx["B"]])
    ctx["y2"] = top.op("Concat", ["labels", nulls], axis=0)
    ctx["neg_w"] = top.op("Neg", ["guidance"])
    guide = top.op("Not", [top.op("Equal", ["guidance", top.const("zero", 0.0, f32)])])
    terms = (bool(plan.w_x0_prev.any()), bool(plan.w_x0_prev2.any()))
    H_ = plan.history   # 0, 1 or 2 remembered predictions
    cols = ("x0_x", "x0_out", "w_x", "w_x0", "w_x0_prev", "w_x0_prev2")
    weights = []   # the top level's initializers: the networks' in the unrolled form
    if form == "loop":
        # one Loop per run of consecutive rows on one network (one Loop for one network), each over its rows' slice
        # of the plan's columns; the x and x0_hat history of one Loop are the next one's initial values
        x, hist = "x_T", [top.op("ConstantOfShape", [top.op("Shape", ["x_T"])]) for _ in range(H_)]
        starts = [0] + [i for i in range(1, S) if row_nets[i] != row_nets[i - 1]]
        for k, (lo, hi) in enumerate(zip(starts, starts[1:] + [S])):
            tag = "" if k == 0 else str(k + 1)   # names of the first Loop as with one network
            rows = slice(lo, hi)
            body = _Nodes(counter, f"row{tag}/")
            it = f"row{tag}/i"
            coef = {c: body.op("Gather", [top.const(f"plan{tag}_{c}", getattr(plan, c)[rows], f32), it])
                    for c in cols}
            t = body.op("Gather", [top.const(f"plan{tag}_timesteps", plan.timesteps[rows], np.int64), it])
            cfg = body.op("Gather", [top.const(f"plan{tag}_cfg", plan.cfg[rows], np.bool_), it])
            guided_row = body.op("And", [guide, cfg])
            hist_in = [f"row{tag}/x0_prev{j + 1}" for j in range(H_)]
            x_out, hist_out = _row(body, ctx, net_graphs[row_nets[lo]], plan, f"row{tag}/x", hist_in, coef, t,
                                   guided_row, terms)
            cond_out = body.op("Identity", [f"row{tag}/cond"])
            tv = lambda name, elem, shape=None: helper.make_tensor_value_info(name, elem, shape)
            body_graph = helper.make_graph(
                body.nodes, f"row{tag}",
                [tv(it, TensorProto.INT64, []), tv(f"row{tag}/cond", TensorProto.BOOL, []),
                 tv(f"row{tag}/x", TensorProto.FLOAT)] + [tv(h, TensorProto.FLOAT) for h in hist_in],
                [tv(cond_out, TensorProto.BOOL, []), tv(x_out, TensorProto.FLOAT)]
                + [tv(h, TensorProto.FLOAT) for h in hist_out],
                initializer=net_weights[row_nets[lo]] + body.inits)
            outs = [f"loop{tag}_x"] + [f"loop{tag}_x0_prev{j + 1}" for j in range(H_)]
            top.nodes.append(helper.make_node("Loop", [top.const(f"rows{tag}", hi - lo, np.int64), "", x, *hist],
                                              outs, name=f"reverse_loop{tag}", body=body_graph))
            x, hist = outs[0], outs[1:]
    else:
        weights = [w for k, ws in enumerate(net_weights) if k in set(row_nets.tolist()) for w in ws]
        x = "x_T"
        hist = [top.op("ConstantOfShape", [top.op("Shape", ["x_T"])]) for _ in range(H_)]
        for i in range(S):
            row_terms = (bool(plan.w_x0_prev[i]), bool(plan.w_x0_prev2[i]))
            used = cols[:4] + tuple(c for c, u in zip(cols[4:], row_terms) if u)
            coef = {c: top.const(f"r{i}_{c}", getattr(plan, c)[i], f32) for c in used}
            t = top.const(f"r{i}_t", plan.timesteps[i], np.int64)
            x, hist = _row(top, ctx, net_graphs[row_nets[i]], plan, x, hist, coef, t,
                           guide if plan.cfg[i] else None, row_terms)
    # x_0 -> uint8 exactly as runtime.images.to_uint8: clip(rint((x + 1) 127.5), 0, 255), then one channel's axis
    # dropped (grey: (B, H, W)) or the channels moved last (colour: (B, H, W, C))
    q = top.op("Round", [top.op("Mul", [top.op("Add", [x, top.const("one_f", 1.0, f32)]),
                                        top.const("scale", 127.5, f32)])])
    q = top.op("Clip", [q, top.const("lo", 0.0, f32), top.const("hi", 255.0, f32)])
    q = top.op("Cast", [q], to=TensorProto.UINT8)
    if C == 1:
        top.nodes.append(helper.make_node("Squeeze", [q, top.const("axes1", [1], np.int64)], ["images"],
                                          name="images"))
    else:
        top.nodes.append(helper.make_node("Transpose", [q], ["images"], name="images", perm=[0, 2, 3, 1]))
    graph = helper.make_graph(
        top.nodes, "ddpm_generator",
        [helper.make_tensor_value_info("x_T", TensorProto.FLOAT, ["batch", C, H, W]),
         helper.make_tensor_value_info("labels", TensorProto.INT64, ["batch"]),
         helper.make_tensor_value_info("guidance", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", H, W] + ([] if C == 1 else [C]))],
        initializer=weights + top.inits)
    # every network's operator sets (quantize_static's model may add a domain), each at the highest version named
    opsets = {}
    for net in nets:
        for o in net.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              producer_name="ddpm", ir_version=max(net.ir_version for net in nets))
    info = {"plan": plan.name, "plan_key": plan_key(plan), "steps": S, "form": form, "null_label": int(null_label),
            "image_shape": [C, H, W], **(meta or {})}
    model.metadata_props.add(key="ddpm_generator", value=json.dumps(info))
    onnx.checker.check_model(model)
    return model


# The runs that verify a generator against the runtime: (what, batch, labels or None for unconditional, guidance
# or None for the export's default guidance)
CHECKS = (("classes 0-9, guided", 10, "turn", None), ("classes in turn, w=0", 3, "turn", 0.0),
          ("unconditional", 2, None, 0.0))


def verify(gen_path: Path, bundle: Bundle, plan: Plan, guidance: float, seed: int = 0,
           precision: str = "fp32") -> dict:
    """Run the generator and the runtime (runtime.runner through the onnx engine of the same precision: model.onnx,
    or for int8 model_int8.onnx with its fp32 rows, runtime.engines.make_engine) on the same x_T from the seeded
    stream: conditional with guidance w, conditional with w=0, unconditional. Returns the figures; GeneratorFailed
    when any pixel differs by more than TOLERANCE_GREY grey levels."""
    from ..runtime.engines import make_engine
    from ..runtime.generator import GeneratorEngine

    gen = GeneratorEngine(gen_path, {"plan": plan.name, "plan_key": plan_key(plan)}, bundle.null_label)
    engine = make_engine("onnx", device="cpu", bundle=bundle, int8=precision == "int8")
    checks, start = [], 0
    for what, batch, labels, w in CHECKS:
        w = guidance if w is None else w
        x_T, _ = make_noise(seed, start, batch, 0, bundle.image_shape)
        y = None if labels is None else np.arange(batch, dtype=np.int64) % int(bundle.meta["num_classes"])
        ref = to_uint8(engine.run(x_T, None, y, plan, w))
        got = gen.run(x_T, None, y, plan, w)
        diff = np.abs(got.astype(np.int16) - ref.astype(np.int16))
        checks.append({"what": what, "batch": batch, "guidance": w, "seed": seed, "samples": [start, start + batch],
                       "max_abs_grey": int(diff.max()), "pixels_differing": int((diff > 0).sum()),
                       "pixels": int(diff.size), "image_std_grey": float(ref.std())})
        start += batch
    reference = "model.onnx" if precision == "fp32" else "model_int8.onnx, model.onnx on its fp32 rows"
    res = {"reference": f"runtime/runner.py on the onnx engine ({reference}), same x_T from runtime/noise.py",
           "tolerance_grey": TOLERANCE_GREY, "checks": checks,
           "max_abs_grey": max(c["max_abs_grey"] for c in checks)}
    if res["max_abs_grey"] > TOLERANCE_GREY:
        bad = "; ".join(f"{c['what']}: {c['max_abs_grey']} grey levels in {c['pixels_differing']} pixels"
                        for c in checks if c["max_abs_grey"] > TOLERANCE_GREY)
        raise GeneratorFailed(f"{GENERATOR_FILE} disagrees with the runtime by more than {TOLERANCE_GREY} grey "
                              f"level: {bad}")
    return res


def generator_file(plan: Plan, form: str = DEFAULT_FORM, precision: str = "fp32") -> str:
    """The file name of a plan's generator in an export folder: generator-<plan name>-<plan_key[:8]>-<form>.onnx,
    ...-<form>-int8.onnx for the int8 one (the plan name with characters other than letters, digits, '.', '_' and
    '-' as '_')."""
    import re

    return (f"generator-{re.sub(r'[^A-Za-z0-9_.-]', '_', plan.name)}-{plan_key(plan)[:8]}-{form}"
            + ("" if precision == "fp32" else f"-{precision}") + ".onnx")


def networks(bundle: Bundle, plan: Plan, precision: str = "fp32") -> tuple[list[Path], np.ndarray]:
    """The networks a generator of `precision` calls and the index of each row's, build's (nets, row_nets): fp32
    model.onnx on every row; int8 model_int8.onnx, and model.onnx on the rows the int8 engine runs in fp32
    (runtime.engines.int8_fp32_rows). ExportError when the folder lacks a file (Bundle.onnx_path)."""
    from ..runtime.engines import int8_fp32_rows

    if precision == "fp32":
        return [bundle.onnx_path("fp32")], np.zeros(plan.steps, dtype=np.int64)
    if precision != "int8":
        raise ValueError(f"a generator is fp32 or int8, not {precision!r}")
    rows = int8_fp32_rows(plan, bundle.meta["alphas_cumprod"])
    return [bundle.onnx_path("int8"), bundle.onnx_path("fp32")], rows.astype(np.int64)


def add_generator(root, plan: Plan, guidance: float, form: str = DEFAULT_FORM, log=print,
                  precision: str = "fp32") -> dict:
    """Build the generator of `plan` in the export folder `root` (generator_file), verify it against the runtime
    of its precision, and record it in export.json's "generators" (file, sha256, plan, form, precision, the
    verification's figures), beside the generators of other plans and precisions; one of the same plan, form and
    precision is replaced. int8 (the folder's model_int8.onnx, `ddpm export --int8`): the int8 engine's rows in
    one model (networks), its record naming the rows at fp32 (fp32_timesteps) and model_int8.onnx's sha256; loop
    form only (check_form: OptionError).

    Nothing changes in the folder unless verification passes: the model is written to a temporary file, verified,
    then renamed into place, and export.json is replaced atomically. Raises GeneratorUnsupported (plan),
    PictureChannels (a model whose images are not grey or RGB pictures), GeneratorFailed (verification),
    runtime.bundle.ExportError (folder), model.io.TorchMissing (no onnx package).
    """
    check_form(form, precision)
    onnx = require_onnx("building generator.onnx")
    root = Path(root)
    bundle = Bundle.load(root)
    check_image_shape(bundle.image_shape)
    check_plan(plan)
    paths, row_nets = networks(bundle, plan, precision)
    nets = [onnx.load(str(p)) for p in paths]
    net = nets[-1]   # model.onnx: its opset is the generator's
    fp32_rows = {} if precision == "fp32" else {"fp32_timesteps": [int(t) for t in plan.timesteps[row_nets == 1]]}
    # the file records its fp32 rows too: export.json's record is checked against it (runtime.bundle)
    model = build(nets, plan, bundle.null_label, bundle.image_shape, form, row_nets=row_nets,
                  meta={"checkpoint_hash": bundle.meta["checkpoint_hash"], "precision": precision, **fp32_rows})
    name, info = generator_file(plan, form, precision), {}
    extra = {} if precision == "fp32" else {**fp32_rows, "int8_sha256": bundle.meta["files"]["int8"]["sha256"]}

    def write(tmp: str) -> None:   # saved and verified as a temporary (files.atomic_write), renamed in if it passes
        tmp = Path(tmp)
        onnx.save(model, str(tmp))
        parity = verify(tmp, bundle, plan, guidance, precision=precision)
        log(f"{name} ({plan.name}, {form}, {precision}): at most {parity['max_abs_grey']} grey level(s) from the "
            f"runtime (tolerance {TOLERANCE_GREY})")
        info.update({"name": name, "sha256": file_sha256(tmp), "bytes": tmp.stat().st_size,
                     "plan": plan.name, "plan_key": plan_key(plan), "steps": plan.steps, "form": form,
                     "precision": precision, **extra, "opset": int(net.opset_import[0].version),
                     "inputs": {"x_T": "float32 (B,C,H,W)", "labels": "int64 (B,); the null label for unconditional",
                                "guidance": "float32 scalar w >= 0"},
                     "outputs": {"images": "uint8 (B,H,W)" if bundle.image_shape[0] == 1 else "uint8 (B,H,W,C)"},
                     "parity": parity})

    atomic_write(root / name, write)
    meta = Bundle.load(root).meta     # as it is now: the records of generators added meanwhile are kept
    others = [g for g in meta.get("generators", [])
              if (g["plan_key"], g["form"], g.get("precision", "fp32")) != (info["plan_key"], form, precision)]
    meta = dict(meta, generators=[*others, info])
    atomic_write(root / META_FILE, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1) + "\n"))
    return info
