"""The lightweight runtime: the whole reverse loop on buffers allocated once (on a GPU, optionally one CUDA graph).

A `Runner` owns every buffer one (net, batch size, plan, guided?) combination needs: the image x, the network's
input/output (x_in, t_in, y_in, eps; the guidance halves are the two halves of x_in/eps), the x0_hat workspace (one
buffer per prediction the plan's multistep rows remember), the per-row tables (timesteps, coefficients) and the
noise table z (slot-major, so that every row's noise is one contiguous block). It also owns its *bound calls* of the network: `net.bind(...)` returns a call bound to this
runner's buffers (its own onnxruntime IO bindings, its own TensorRT execution context, its own tensors for torch),
so runners of one engine never feed the network from each other's buffers, whatever order they run in.

`run()` copies the starting noise, noise table and labels in, then runs the loop, which only reads tables and
writes buffers in place: no allocation, no host synchronisation. An edit (runtime.edits.Projection) adds its
known image, mask and working buffers, bound to the runner once, and projects x (or x0_hat) at its rows; its noise
slots follow the plan's in the same table. On a GPU the loop is captured once as a CUDA
graph after a warm-up and replayed for every later run. `run()` returns a host copy of x (numpy, float32) that the
next run cannot overwrite. `close()` frees all of it: the CUDA graph, the bound calls, the buffers.

The arithmetic is the plan's (runtime.samplers, its module docstring), written once in `Runner.step` against the
array operations of runtime.ops, so the numpy runner (onnxruntime on a CPU, no PyTorch needed) and the torch
runner (PyTorch, TensorRT, onnxruntime on a GPU) run the same step.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from collections import OrderedDict
import numpy as np

from .engine import Engine, EngineClosed, EngineInput, StepCallback, Supports
from .generate import network_batch
from .samplers import Plan

_CAPTURE_LOCK = threading.Lock()   # CUDA-graph captures, one at a time per process (Runner._capture)


def plan_key(plan: Plan) -> str:
    """A digest of everything in a plan that a runner bakes into its tables."""
    h = hashlib.sha1(f"{plan.name}|{plan.clip}".encode())
    if plan.guidance_rescale:   # only when on: the keys of plans without it (exported generators) stay as they were
        h.update(f"|gr{plan.guidance_rescale!r}".encode())
    for name in ("timesteps", "x0_x", "x0_out", "w_x", "w_x0", "w_x0_prev", "w_x0_prev2", "sigma", "z_slot", "cfg",
                 "calls_net"):
        h.update(np.ascontiguousarray(getattr(plan, name)).tobytes())
    return h.hexdigest()


class Runner:
    """One (net, batch, plan, guided, edit) combination with all its buffers and its own bound network calls.

    image_shape: the model's (C, H, W), the net's input; edit: None, or a runtime.edits.Projection for the plan (its y
    and mask come with each run)."""

    def __init__(self, net, batch: int, plan: Plan, guided: bool, null_label: int,
                 image_shape: tuple[int, int, int], cuda_graph: bool = True, edit=None):
        ops = self.ops = net.make_ops()
        if edit is not None:
            edit.validate(plan, image_shape)
        self.net, self.batch, self.plan, self.guided, self.edit = net, batch, plan, guided, edit
        self.null_label = null_label
        self.steps = S = plan.steps
        self.closed = False
        B, n = batch, network_batch(batch, guided)   # guided: [cond | uncond] halves
        shape = (B, *image_shape)
        # -- state, workspace and network I/O
        self.x = ops.empty(shape)
        self.x0 = [ops.empty(shape) for _ in range(1 + plan.history)]   # ring: this row's x0_hat and the remembered
        ops.set_scratch(ops.empty(shape))
        self.aliased = net.dtype == "float32" and not guided  # the network reads x itself: fp32, one half
        self.x_in = self.x if self.aliased else ops.empty((n, *image_shape), net.dtype)
        self.eps = ops.empty((n, *image_shape), net.dtype)
        self.eps32 = self.eps if net.dtype == "float32" else ops.empty((n, *image_shape))
        self.t_in = ops.empty((n,), "int64")
        self.y_in = ops.full((n,), null_label, "int64")
        self.w_neg = ops.scalar_buffer()                       # -w, the guidance weight: a buffer, so no recapture
        # the guidance rescale's per-sample factors 1 + phi (std(eps_c) / std(eps) - 1) (runtime.samplers)
        self.rescale = guided and plan.guidance_rescale > 0
        self.std_c, self.std_g = (ops.empty((B,)), ops.empty((B,))) if self.rescale else (None, None)
        # -- per-row tables, on the device once; views and scalars made once, so the loop makes no objects
        self.t_table = ops.table(np.repeat(plan.timesteps[:, None], n, axis=1), "int64")
        self.t_rows = [self.t_table[i] for i in range(S)]
        cols = ("x0_x", "x0_out", "w_x", "w_x0", "w_x0_prev", "w_x0_prev2", "sigma")
        self.coef = dict(zip(cols, (ops.scalars(getattr(plan, c)) for c in cols)))
        Q = self.num_slots = plan.num_slots + (edit.num_slots if edit is not None else 0)   # the edit's come after
        self.z = ops.empty((Q, B, *image_shape)) if Q else None   # slot-major: every slot a contiguous block
        self.z_rows = [self.z[int(s)] if s >= 0 else None for s in plan.z_slot] if Q else [None] * S
        # the x0_hat ring position of every row: network rows take turns
        k = np.cumsum(plan.calls_net) - 1
        R = len(self.x0)
        self.ring = [(int(k[i]) % R, int(k[i] - 1) % R, int(k[i] - 2) % R) for i in range(S)]
        # -- the network calls bound to THIS runner's buffers (no other runner can feed them): the whole batch, and
        # the conditional half alone for guided runs with rows outside the guidance interval. last_t: the t of the
        # last network row, whose x0_hat is the output (an int8 net runs it in fp32, runtime.nets)
        net_rows = np.flatnonzero(plan.calls_net)
        last_t = int(plan.timesteps[net_rows[-1]]) if len(net_rows) else -1
        self.call = net.bind(self.x_in, self.t_in, self.y_in, self.eps, last_t)
        self.call_cond = (net.bind(self.x_in[:B], self.t_in[:B], self.y_in[:B], self.eps[:B], last_t)
                          if guided and not plan.cfg[plan.calls_net].all() else None)
        # -- the edit's projection, bound to this runner's buffers; which rows project x, which x0_hat
        self.proj = edit.bind(ops, B, image_shape, self.z) if edit is not None else None
        self.proj_x0 = [edit is not None and bool(edit.on[i]) and edit.space == "x0" for i in range(S)]
        self.proj_x = [edit is not None and bool(edit.on[i]) and edit.space == "x" for i in range(S)]
        self.use_graph = cuda_graph and net.graph_capturable and getattr(ops.device, "type", "cpu") == "cuda"
        self.graph = None

    # ------------------------------------------------------------------------------------------------- the loop
    def step(self, i: int) -> None:
        """Row i of the plan, in place (runtime.samplers' module docstring has the equations)."""
        ops, B, c, p = self.ops, self.batch, self.coef, self.plan
        x = self.x
        if p.calls_net[i]:
            x0, x0_prev, x0_prev2 = (self.x0[j] for j in self.ring[i])
            both = self.guided and p.cfg[i]
            # 1. network input: x (into both halves when guided), the row's timesteps
            if not self.aliased:
                ops.copy_(self.x_in[:B], x)
                if both:
                    ops.copy_(self.x_in[B:], x)
            ops.copy_(self.t_in, self.t_rows[i])
            (self.call if both or not self.guided else self.call_cond)()
            eps = self.eps32
            if eps is not self.eps:
                n = network_batch(B, both)
                ops.copy_(eps[:n], self.eps[:n])
            if both:
                # 2. classifier-free guidance: eps = eps_c + w (eps_c - eps_u), written into the uncond half
                cond, eps = eps[:B], eps[B:]
                ops.sub_(eps, cond)
                ops.scale_(eps, self.w_neg)                 # (eps_u - eps_c)(-w)
                ops.add_(eps, cond)
                if self.rescale:
                    # 2b. the guidance rescale: eps *= 1 + phi (std(eps_c) / std(eps) - 1), per sample
                    f = self.std_c
                    ops.std_rows_(f, cond)
                    ops.std_rows_(self.std_g, eps)
                    ops.div_(f, self.std_g)
                    ops.add_(f, -1.0)
                    ops.scale_(f, p.guidance_rescale)
                    ops.add_(f, 1.0)
                    ops.mul_rows_(eps, f)
            else:
                eps = eps[:B]
            # 3. x0_hat = x0_x x - x0_out out (out: the network's eps or v), clipped to the data range
            ops.mul_into(x0, x, c["x0_x"][i])
            ops.axmy_(x0, c["x0_out"][i], eps)
            if p.clip:
                ops.clamp_(x0, -1.0, 1.0)
            if self.proj_x0[i]:
                self.proj(i, x0)                            # DDNM: x0_hat <- x0_hat + A^+(y - A x0_hat)
            # 4. x = w_x x + w_x0 x0_hat + w_x0_prev x0_hat' + w_x0_prev2 x0_hat''
            ops.scale_(x, c["w_x"][i])
            ops.axpy_(x, c["w_x0"][i], x0)
            if p.w_x0_prev[i]:
                ops.axpy_(x, c["w_x0_prev"][i], x0_prev)
            if p.w_x0_prev2[i]:
                ops.axpy_(x, c["w_x0_prev2"][i], x0_prev2)
        else:
            ops.scale_(x, c["w_x"][i])
        # 5. + sigma z
        if self.z_rows[i] is not None:
            ops.axpy_(x, c["sigma"][i], self.z_rows[i])
        # 6. the edit's projection onto the known image at this row's level (runtime.edits)
        if self.proj_x[i]:
            self.proj(i, x)

    def x0_of(self, i: int):
        """The buffer that holds row i's x0_hat after the row (valid until the next network row)."""
        return self.x0[self.ring[i][0]]

    def loop(self, callback: StepCallback | None = None) -> None:
        """Every row in place; callback(i, t, None, None) after each (progress only)."""
        t = self.plan.timesteps
        for i in range(self.steps):
            self.step(i)
            if callback is not None:
                callback(i, int(t[i]), None, None)

    def _capture(self) -> None:
        """Warm up on a side stream (lazy inits, cuDNN/TensorRT autotuning), then capture the whole loop.

        One capture at a time in the process, and in "thread_local" mode: other threads keep running their runners
        (their allocations and synchronisations are not part of this capture), where the default "global" mode
        would make their CUDA calls fail while this thread captures."""
        import torch

        dev = self.x.device
        with _CAPTURE_LOCK:
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                self.loop()
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.loop()
        self.graph = graph

    # ---------------------------------------------------------------------------------------------------- run
    def load(self, x_T: np.ndarray, z: np.ndarray | None, labels: np.ndarray | None, guidance: float,
             y: np.ndarray | None = None, mask: np.ndarray | None = None) -> None:
        """Copy a run's inputs into the buffers (before the loop; host -> device on a GPU).

        x_T (B,C,H,W) float32, z (B,num_slots,C,H,W) float32 or None (num_slots: the plan's, then the edit's),
        labels (B,) int64 or None (the null label), guidance w >= 0; with an edit, its known image y (B,C,H,W)
        float32 and, for a mask projection, the mask (B,C,H,W) (1: known). EngineInput (a ValueError) for wrong shapes.
        """
        ops, B = self.ops, self.batch
        if x_T.shape != tuple(self.x.shape):
            raise EngineInput(f"x_T has shape {x_T.shape}, this runner takes {tuple(self.x.shape)}")
        ops.load(self.x, x_T)
        if self.z is not None:
            want = (B, self.num_slots, *self.x.shape[1:])
            if z is None or z.shape != want:
                raise EngineInput(f"the plan needs noise z of shape {want}, got {None if z is None else z.shape}")
            ops.load(self.z, np.swapaxes(z, 0, 1))
        if labels is None:
            ops.fill_(self.y_in[:B], self.null_label)
        else:
            ops.load(self.y_in[:B], np.asarray(labels, dtype=np.int64))
        ops.set_scalar(self.w_neg, -float(guidance))
        if self.proj is not None:
            self.proj.load(y, mask)

    def run(self, x_T, z, labels, guidance: float = 0.0, callback: StepCallback | None = None, y=None, mask=None,
            states: bool = False) -> np.ndarray:
        """One batch: x_0 (B,C,H,W) float32 on the host, a copy the next run cannot overwrite.

        callback(i, t, x, x0_hat) after row i (runtime.engine.StepCallback): with states, host copies of x and of
        the row's x0_hat (None on rows without a network call), the loop then running step by step, never as a
        graph; without, None and None (after the whole replay when the loop runs as a CUDA graph). y, mask: the
        edit's (see load). EngineClosed after close()."""
        if self.closed:
            raise EngineClosed(f"this {self.net.name} runner is closed")
        with self.net.stream_context():
            self.load(x_T, z, labels, guidance, y, mask)
            if states and callback is not None:
                to_host, calls, t = self.ops.to_host, self.plan.calls_net, self.plan.timesteps
                for i in range(self.steps):
                    self.step(i)
                    callback(i, int(t[i]), to_host(self.x), to_host(self.x0_of(i)) if calls[i] else None)
                return to_host(self.x)
            if self.use_graph and self.graph is None:
                try:
                    self._capture()
                except Exception as e:   # a net that cannot be captured after all: say so once, run step by step
                    warnings.warn(f"CUDA-graph capture of the {self.net.name} loop failed ({type(e).__name__}: {e}); "
                                  f"running it step by step", RuntimeWarning, stacklevel=2)
                    self.use_graph = False
                self.load(x_T, z, labels, guidance, y, mask)   # the warm-up consumed the buffers
            if self.use_graph:
                self.graph.replay()
                if callback is not None:
                    for i in range(self.steps):
                        callback(i, int(self.plan.timesteps[i]), None, None)
            else:
                self.loop(callback)
            return self.ops.to_host(self.x)

    def close(self) -> None:
        """Free the CUDA graph, the bound network calls (their IO bindings or TensorRT execution contexts) and every
        buffer; closing again does nothing, running afterwards raises EngineClosed."""
        if self.closed:
            return
        self.closed = True
        if self.graph is not None:
            self.graph.reset()
        for call in (self.call, self.call_cond):
            if call is not None:
                call.close()
        self.graph = self.call = self.call_cond = self.proj = None
        self.x = self.x_in = self.eps = self.eps32 = self.t_in = self.y_in = self.w_neg = self.z = None
        self.std_c = self.std_g = None
        self.x0, self.t_rows, self.z_rows, self.coef, self.t_table = [], [], [], {}, None
        self.ops = None


class RuntimeEngine(Engine):
    """The runtime-torch, onnx and trt engines (runtime.engine.Engine): a net (runtime.nets, runtime.trt) and the
    runners of its latest (batch, plan, guided, edit) combinations.

    Every runner owns its buffers and its bound network calls, so any sequence of calls gives the same digits as
    each call alone. A runner serves one call at a time: `run` checks an idle one out of the pool (or builds one when
    every runner of that combination is busy, e.g. with two threads running the same batch and plan) and puts it
    back afterwards, so calls from any number of threads give the digits of serial calls. At most `max_runners` idle
    runners are kept: the least recently used is closed when one more comes back, so a long-lived engine that sees
    many batch sizes, or a burst of concurrent calls, does not grow without bound. `close()` closes every runner
    (a busy one when its run ends) and then the net. image_shape: the model's (C, H, W) (ModelConfig.image_shape,
    Bundle.image_shape).
    """

    def __init__(self, net, null_label: int, image_shape: tuple[int, int, int], cuda_graph: bool = True,
                 max_runners: int = 8):
        self.net, self.null_label, self.image_shape, self.cuda_graph = net, null_label, tuple(image_shape), cuda_graph
        self.name, self.device, self.dtype = net.name, str(net.device), net.dtype
        self.precision = getattr(net, "precision", None) or ("fp16" if net.dtype == "float16" else "fp32")
        self.weights = getattr(net, "weights", None)
        self.supports = Supports(edits=True, states=True, max_batch=net.max_batch)
        self.max_runners = max_runners
        self.runners: OrderedDict = OrderedDict()   # key -> idle runners of that key, most recently used last
        self.busy = 0                               # runners checked out by runs in flight
        self.closed = False
        self._lock = threading.Lock()              # guards `runners`, `busy`, `closed`; runs happen outside it

    @staticmethod
    def _key(batch: int, plan: Plan, guided: bool, edit=None) -> tuple:
        return (batch, plan_key(plan), guided, None if edit is None else edit.key)

    def _checkout(self, batch: int, plan: Plan, guided: bool, edit=None) -> tuple[tuple, Runner]:
        """An idle runner of this combination, built if there is none, counted as busy until _give_back."""
        key = self._key(batch, plan, guided, edit)
        with self._lock:
            self.check_open()
            idle = self.runners.get(key)
            runner = idle.pop() if idle else None
            if idle is not None and not idle:
                del self.runners[key]
            self.busy += 1
        if runner is None:
            try:
                runner = Runner(self.net, batch, plan, guided, self.null_label, self.image_shape, self.cuda_graph,
                                edit)
            except BaseException:
                self._give_back(key, None)
                raise
        return key, runner

    def _give_back(self, key, runner: Runner | None) -> None:
        """Return a runner to the pool (None: a build that failed); close what leaves it: the least recently used
        runners beyond max_runners, and everything once the engine is closed and no run is left in flight."""
        leaving = []
        with self._lock:
            self.busy -= 1
            if runner is not None and not self.closed:
                self.runners.setdefault(key, []).append(runner)
                self.runners.move_to_end(key)
                while sum(map(len, self.runners.values())) > self.max_runners:
                    oldest = next(iter(self.runners))
                    leaving.append(self.runners[oldest].pop(0))
                    if not self.runners[oldest]:
                        del self.runners[oldest]
            elif runner is not None:
                leaving.append(runner)
            last = self.closed and self.busy == 0
        for r in leaving:
            r.close()
        if last:
            self.net.close()

    def runner(self, batch: int, plan: Plan, guided: bool, edit=None) -> Runner:
        """An idle runner of this combination, built if there is none; it stays in the pool, so the next `run` of
        this combination uses it (unless another thread has it then). For inspection and benchmarks."""
        key, runner = self._checkout(batch, plan, guided, edit)
        self._give_back(key, runner)
        return runner

    def _run(self, x_T, z, labels, plan, guidance, callback: StepCallback | None = None, edit=None, y=None, mask=None,
             states: bool = False) -> np.ndarray:
        """x_T (B,C,H,W) float32, z (B,Q,C,H,W) or None, labels (B,) int64 or None -> x_0 (B,C,H,W) float32
        (runtime.engine.Engine.run).

        edit: a runtime.edits.Projection with its y and mask (Runner.load); callback, states: see Runner.run. Safe to
        call from several threads at once: each call has a runner of its own for its duration."""
        guided = labels is not None and guidance != 0   # w = 0: the conditional model alone, one batch
        key, runner = self._checkout(x_T.shape[0], plan, guided, edit)
        try:
            return runner.run(x_T, z, labels, guidance, callback, y, mask, states)
        finally:
            self._give_back(key, runner)   # reusable whatever happened: every run loads all its inputs first

    def versions(self) -> dict[str, str]:
        return self.net.versions()

    def close(self) -> None:
        """Close every idle runner now, a busy one when its run ends, then the net (runtime.engine.Engine.close)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            idle = [r for rs in self.runners.values() for r in rs]
            self.runners.clear()
            last = self.busy == 0
        for r in idle:
            r.close()
        if last:
            self.net.close()
