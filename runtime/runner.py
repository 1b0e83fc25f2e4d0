"""The lightweight runtime: the whole reverse loop on buffers allocated once, optionally one CUDA graph.

A `Runner` owns every buffer one (net, batch size, plan, guided?) combination needs: the image x, the network's
input/output (x_in, t_in, y_in, eps; the guidance halves are the two halves of x_in/eps), the workspace x0, the
per-step tables (timesteps, coefficients a..e, sigma) and the noise table z, all on the device. `run()` copies the
starting noise, noise table and labels in, then runs the loop, which only reads tables and writes buffers in place:
no allocation, no `.item()`, no host copy. On a GPU the loop is captured once as a CUDA graph after a warm-up and
replayed for every later run. Outputs: `run()` returns a CPU copy of x; the device buffers are overwritten by the
next run.

The arithmetic is `samplers.sample`'s, step for step (see its docstring): x0 = a x - b eps (clipped),
x = c x0 + d eps + e x + sigma z.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

from .samplers import Plan


@contextmanager
def torch_threads(n: int | None):
    """Temporarily run torch's CPU ops on n threads (None: leave as is)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class Runner:
    def __init__(self, net, batch: int, plan: Plan, guided: bool, null_label: int, image_shape=(1, 28, 28),
                 cuda_graph: bool = True):
        dev, f32 = net.device, torch.float32
        self.net, self.batch, self.plan, self.guided = net, batch, plan, guided
        self.steps = S = plan.steps
        n = 2 * batch if guided else batch            # the network's batch: [cond | uncond] halves when guided
        shape = (batch, *image_shape)
        # -- state and network I/O
        self.x = torch.empty(shape, device=dev, dtype=f32)
        self.x0 = torch.empty(shape, device=dev, dtype=f32)
        # the network reads x directly when it can (fp32, one half); else its own input buffer
        self.aliased = net.dtype == f32 and not guided
        self.x_in = self.x if self.aliased else torch.empty((n, *image_shape), device=dev, dtype=net.dtype)
        self.eps = torch.empty((n, *image_shape), device=dev, dtype=net.dtype)
        self.eps32 = self.eps if net.dtype == f32 else torch.empty((n, *image_shape), device=dev, dtype=f32)
        self.t_in = torch.empty(n, device=dev, dtype=torch.int64)
        self.y_in = torch.full((n,), null_label, device=dev, dtype=torch.int64)
        self.w_neg = torch.zeros((), device=dev, dtype=f32)  # -w, the guidance weight: a buffer, so no recapture
        # -- per-step tables, on the device once
        self.t_table = torch.as_tensor(plan.timesteps, dtype=torch.int64).to(dev)[:, None].expand(S, n).contiguous()
        coef = lambda v: torch.as_tensor(v, dtype=f32).to(dev)
        self.a, self.b, self.c = coef(plan.a), coef(plan.b), coef(plan.c)
        self.d, self.e, self.sigma = coef(plan.d), coef(plan.e), coef(plan.sigma)
        self.z = torch.empty((batch, S, *image_shape), device=dev, dtype=f32) if plan.stochastic else None
        # views made once, so that the loop does not even create tensor objects for them
        self.z_views = [self.z[:, i] for i in range(S)] if self.z is not None else None
        self.coef_views = [(self.a[i], self.b[i], self.c[i], self.d[i], self.e[i], self.sigma[i]) for i in range(S)]
        self.net.bind(self.x_in, self.t_in, self.y_in, self.eps)
        self.use_graph = cuda_graph and dev.type == "cuda" and net.graph_capturable
        self.graph = None
        # On a CPU, when the network is not torch (onnxruntime has its own thread pool), the runner's small in-place
        # updates run on one torch thread: two thread pools spinning on the same cores slow both (measured: README).
        self.update_threads = 1 if dev.type == "cpu" and not net.computes_with_torch else None

    # ------------------------------------------------------------------------------------------------- the loop
    def _step(self, i: int) -> None:
        B = self.batch
        a, b, c, d, e, sigma = self.coef_views[i]
        # 1. network input: x (twice when guided), the step's timesteps from the table
        if not self.aliased:
            self.x_in[:B].copy_(self.x)
            if self.guided:
                self.x_in[B:].copy_(self.x)
        self.t_in.copy_(self.t_table[i])
        self.net()
        eps = self.eps32
        if eps is not self.eps:
            eps.copy_(self.eps)
        if self.guided:
            # 2. classifier-free guidance: eps = eps_c + w (eps_c - eps_u), written into the uncond half
            cond, uncond = eps[:B], eps[B:]
            uncond.sub_(cond).mul_(self.w_neg).add_(cond)      # (eps_u - eps_c)(-w) + eps_c
            eps = uncond
        # 3. x0 = a x - b eps, clipped to the data range
        torch.mul(self.x, a, out=self.x0)
        self.x0.addcmul_(eps, b, value=-1.0)
        if self.plan.clip:
            self.x0.clamp_(-1.0, 1.0)
        # 4. x = c x0 + d eps + e x + sigma z
        self.x.mul_(e)
        self.x.addcmul_(self.x0, c)
        self.x.addcmul_(eps, d)
        if self.z_views is not None:
            self.x.addcmul_(self.z_views[i], sigma)

    def _loop(self, callback: Callable[[int], None] | None = None) -> None:
        for i in range(self.steps):
            self._step(i)
            if callback is not None:
                callback(i)

    def _capture(self) -> None:
        """Warm up on a side stream (lazy inits, cuDNN/TensorRT autotuning), then capture the whole loop."""
        side = torch.cuda.Stream(self.x.device)
        side.wait_stream(torch.cuda.current_stream(self.x.device))
        with torch.cuda.stream(side):
            self._loop()
        torch.cuda.current_stream(self.x.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._loop()

    # ---------------------------------------------------------------------------------------------------- run
    @torch.no_grad()
    def load(self, x_T: torch.Tensor, z: torch.Tensor | None, labels: torch.Tensor | None, guidance: float) -> None:
        """Copy a run's inputs into the buffers (before the loop; host -> device on a GPU)."""
        self.x.copy_(x_T, non_blocking=True)
        if self.z is not None:
            self.z.copy_(z, non_blocking=True)
        if labels is not None:
            self.y_in[: self.batch].copy_(labels, non_blocking=True)
        self.w_neg.fill_(-guidance)

    @torch.no_grad()
    def run(self, x_T, z, labels, guidance: float = 0.0, callback=None) -> torch.Tensor:
        self.load(x_T, z, labels, guidance)
        if self.use_graph:
            if self.graph is None:
                self._capture()
                self.load(x_T, z, labels, guidance)   # the warm-up consumed the buffers
            self.graph.replay()
            if callback is not None:
                for i in range(self.steps):
                    callback(i)
        else:
            with torch_threads(self.update_threads):
                self._loop(callback)
        return self.x.cpu()


class RuntimeEngine:
    """An engine (see runtime.generate) that keeps one Runner per (batch, plan, guided) and reuses it."""

    def __init__(self, net, null_label: int, image_shape=(1, 28, 28), cuda_graph: bool = True):
        self.net, self.null_label, self.image_shape, self.cuda_graph = net, null_label, image_shape, cuda_graph
        self.name = net.name
        self.runners: dict = {}

    def runner(self, batch: int, plan: Plan, guided: bool) -> Runner:
        key = (batch, plan.name, plan.steps, plan.clip, guided)
        if key not in self.runners:
            self.runners[key] = Runner(self.net, batch, plan, guided, self.null_label, self.image_shape,
                                       self.cuda_graph)
        return self.runners[key]

    def run(self, x_T, z, labels, plan, guidance, callback=None):
        guided = labels is not None and guidance != 0   # w = 0: the conditional model alone, one batch
        r = self.runner(x_T.shape[0], plan, guided)
        if labels is None:
            r.y_in.fill_(self.null_label)
        return r.run(x_T, z, labels, guidance, callback)
