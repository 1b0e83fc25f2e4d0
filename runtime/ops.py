"""The few in-place array operations the runtime's loop is made of, for numpy (CPU, no PyTorch) and for PyTorch.

The runner writes its step once against this vocabulary (runtime.runner.Runner.step), so the numpy runner that
drives onnxruntime on a CPU and the torch runner that drives PyTorch, TensorRT or onnxruntime on a GPU run the same
arithmetic. Every operation writes into an existing buffer and allocates nothing the size of an image: numpy's
`y += s * x` would make a temporary, so `axpy_` goes through a scratch buffer the runner allocates once.

Scalars: a per-row coefficient is whatever `scalars()` returns for a table (Python floats for numpy, 0-d device
tensors for torch, so that a captured CUDA graph reads them from device memory); a per-run value (the guidance
weight) lives in a 0-d buffer from `scalar_buffer()` and is set with `set_scalar()` before the loop.
"""

from __future__ import annotations

import numpy as np

DTYPES = ("float32", "float16", "int64")


class NumpyOps:
    """numpy arrays on the host."""

    name = "numpy"
    device = "cpu"

    def empty(self, shape, dtype: str = "float32"):
        return np.empty(shape, dtype=dtype)

    def full(self, shape, value, dtype: str = "float32"):
        return np.full(shape, value, dtype=dtype)

    def table(self, values, dtype: str = "float32"):
        """A host table on the device (here: a contiguous copy)."""
        return np.ascontiguousarray(np.asarray(values, dtype=dtype))

    def scalars(self, values) -> list:
        return [float(v) for v in np.asarray(values, dtype=np.float32)]

    def scalar_buffer(self):
        return np.zeros((), dtype=np.float32)

    def set_scalar(self, buf, value: float) -> None:
        buf[...] = value

    def set_scratch(self, scratch) -> None:
        self.scratch = scratch

    # -- in place
    def copy_(self, dst, src) -> None:
        np.copyto(dst, src, casting="same_kind")

    def fill_(self, dst, value) -> None:
        dst.fill(value)

    def scale_(self, x, s) -> None:
        np.multiply(x, s, out=x)

    def add_(self, y, x) -> None:
        np.add(y, x, out=y)

    def sub_(self, y, x) -> None:
        np.subtract(y, x, out=y)

    def axpy_(self, y, s, x) -> None:
        """y += s * x, for image-shaped float32 y and x."""
        tmp = self.scratch[: x.shape[0]]
        np.multiply(x, s, out=tmp)
        np.add(y, tmp, out=y)

    def axmy_(self, y, s, x) -> None:
        """y -= s * x, for image-shaped float32 y and x."""
        tmp = self.scratch[: x.shape[0]]
        np.multiply(x, s, out=tmp)
        np.subtract(y, tmp, out=y)

    def mul_into(self, out, x, s) -> None:
        np.multiply(x, s, out=out)

    def clamp_(self, x, lo: float, hi: float) -> None:
        np.clip(x, lo, hi, out=x)

    def div_(self, y, x) -> None:
        np.divide(y, x, out=y)

    def std_rows_(self, out, x) -> None:
        """out (B,) <- the standard deviation (1/N, no Bessel correction) of each x[b] (B,C,H,W, C-contiguous) over
        its N = C*H*W values, through the scratch buffer (no image-sized temporary)."""
        B, N = x.shape[0], x[0].size
        x, tmp = x.reshape(B, N), self.scratch[:B].reshape(B, N)
        np.add.reduce(x, axis=1, out=out)
        np.divide(out, N, out=out)                                          # the mean
        np.copyto(tmp, out[:, None])   # broadcast by a copy: a broadcasting ufunc would use its iteration buffer
        np.subtract(x, tmp, out=tmp)
        np.multiply(tmp, tmp, out=tmp)
        np.add.reduce(tmp, axis=1, out=out)
        np.divide(out, N, out=out)
        np.sqrt(out, out=out)

    def mul_rows_(self, x, s) -> None:
        """x[b] *= s[b] for x (B,C,H,W, C-contiguous) and s (B,), through the scratch buffer."""
        B = x.shape[0]
        x, tmp = x.reshape(B, -1), self.scratch[:B].reshape(B, -1)
        np.copyto(tmp, s[:, None])
        np.multiply(x, tmp, out=x)

    def sum_pool_(self, out, x, f: int) -> None:
        """out (B,C,H/f,W/f) <- the sum of every f x f block of x (B,C,H,W, C-contiguous)."""
        np.add.reduce(_blocks(x, f), axis=(3, 5), out=out)   # a reduction with out= allocates no image buffer
        # (np.mean would: it buffers for its dtype argument)

    def upsample_(self, out, lo, f: int) -> None:
        """out (B,C,H,W, C-contiguous) <- lo (B,C,H/f,W/f) repeated over f x f blocks (nearest upsampling)."""
        np.copyto(_blocks(out, f), lo[:, :, :, None, :, None])   # a broadcast copy, unbuffered (an in-place
        # broadcast add would go through the ufunc's 32 kB iteration buffer on every call)

    # -- host <-> device
    def load(self, dst, host: np.ndarray) -> None:
        np.copyto(dst, host, casting="same_kind")

    def to_host(self, x) -> np.ndarray:
        return np.array(x, dtype=np.float32, copy=True)

    def data_ptr(self, x) -> int:
        return x.ctypes.data


def _blocks(x, f: int):
    """The view (B,C,H/f,f,W/f,f) of a C-contiguous (B,C,H,W) array: block (i, j) is [:, :, i, :, j, :]."""
    if not x.flags.c_contiguous:
        raise ValueError("block views need a C-contiguous array")
    B, C, H, W = x.shape
    return x.reshape(B, C, H // f, f, W // f, f)


class TorchOps:
    """PyTorch tensors on a device (CPU or CUDA)."""

    name = "torch"

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self._dtypes = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64}

    def empty(self, shape, dtype: str = "float32"):
        return self.torch.empty(shape, dtype=self._dtypes[dtype], device=self.device)

    def full(self, shape, value, dtype: str = "float32"):
        return self.torch.full(shape, value, dtype=self._dtypes[dtype], device=self.device)

    def table(self, values, dtype: str = "float32"):
        return self.torch.as_tensor(np.ascontiguousarray(values), dtype=self._dtypes[dtype]).to(self.device)

    def scalars(self, values) -> list:
        t = self.table(values)
        return [t[i] for i in range(len(t))]   # 0-d views made once: the loop creates no tensor objects for them

    def scalar_buffer(self):
        return self.torch.zeros((), dtype=self.torch.float32, device=self.device)

    def set_scalar(self, buf, value: float) -> None:
        buf.fill_(value)

    def set_scratch(self, scratch) -> None:
        self.scratch = scratch

    # -- in place
    def copy_(self, dst, src) -> None:
        dst.copy_(src)

    def fill_(self, dst, value) -> None:
        dst.fill_(value)

    def scale_(self, x, s) -> None:
        x.mul_(s)

    def add_(self, y, x) -> None:
        y.add_(x)

    def sub_(self, y, x) -> None:
        y.sub_(x)

    def axpy_(self, y, s, x) -> None:
        y.addcmul_(x, s)

    def axmy_(self, y, s, x) -> None:
        y.addcmul_(x, s, value=-1.0)

    def mul_into(self, out, x, s) -> None:
        self.torch.mul(x, s, out=out)

    def clamp_(self, x, lo: float, hi: float) -> None:
        x.clamp_(lo, hi)

    def div_(self, y, x) -> None:
        y.div_(x)

    def std_rows_(self, out, x) -> None:
        B = x.shape[0]
        x, tmp = x.reshape(B, -1), self.scratch[:B].view(B, -1)
        self.torch.mean(x, dim=1, out=out)
        self.torch.sub(x, out[:, None], out=tmp)
        tmp.mul_(tmp)
        self.torch.mean(tmp, dim=1, out=out)
        out.sqrt_()

    def mul_rows_(self, x, s) -> None:
        x.mul_(s.view(x.shape[0], *[1] * (x.dim() - 1)))

    def sum_pool_(self, out, x, f: int) -> None:
        B, C, h, w = out.shape
        self.torch.sum(x.view(B, C, h, f, w, f), dim=(3, 5), out=out)

    def upsample_(self, out, lo, f: int) -> None:
        B, C, h, w = lo.shape
        out.view(B, C, h, f, w, f).copy_(lo[:, :, :, None, :, None])

    # -- host <-> device
    def load(self, dst, host: np.ndarray) -> None:
        dst.copy_(self.torch.from_numpy(np.ascontiguousarray(host)), non_blocking=True)

    def to_host(self, x) -> np.ndarray:
        return x.detach().to("cpu", dtype=self.torch.float32, copy=True).numpy()

    def data_ptr(self, x) -> int:
        return x.data_ptr()
