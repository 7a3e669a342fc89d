"""What every backend's per-call path shares: torch's current device and stream, read cheaply,
and a plan's kernel launches with their parameter bytes memoised per call.

A plan is built once per call signature (shapes, strides, dtypes, device, options); what
still changes from call to call is the stream and the data pointers (inputs, the workspace,
O, lse). The parameter bytes of every launch are a function of exactly those, so a plan keeps
them per (stream, pointers) tuple: a repeated call, as a diffusion model makes at every step
and layer, launches from bytes built once. The bytes are immutable, so concurrent calls can
share them (the driver copies a launch's parameters before cuLaunchKernel returns).
"""
from __future__ import annotations

import ctypes

import torch

from .. import abi

# torch's current stream and device as plain C calls: torch.cuda.current_stream() builds a
# Stream object and current_device() goes through lazy-init checks, each ~1 us per call.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)
current_stream = _raw_stream or (lambda index: torch.cuda.current_stream(index).cuda_stream)
current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device

MAX_MEMO = 64  # per plan: more (stream, pointers) tuples than a model's layers of one shape


class Launches:
    """A plan's kernel launches, in order, and their parameter bytes per call.

    `fill(stream, *pointers)` returns one bytes object per launch; `enqueue(key)` with key =
    (stream, *pointers) launches them on `stream`, building them only for a key not seen."""

    __slots__ = ("kernels", "bound", "fill", "_memo")

    def __init__(self, launches, fill):
        """`launches`: (loader.Loaded, grid, dynamic shared memory) per launch."""
        self.kernels = tuple(kernel for kernel, _, _ in launches)
        self.bound = tuple(kernel.bind(grid, smem) for kernel, grid, smem in launches)
        self.fill = fill
        self._memo: dict[tuple, tuple] = {}

    def params(self, key: tuple) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
        """(kernel_params per launch, the parameter bytes they point at) for `key`."""
        entry = self._memo.get(key)
        if entry is None:
            blobs = tuple(self.fill(*key))
            entry = (tuple(abi.param_pointer(b) for b in blobs), blobs)
            if len(self._memo) >= MAX_MEMO:
                self._memo.clear()
            self._memo[key] = entry
        return entry

    def enqueue(self, key: tuple) -> None:
        entry = self._memo.get(key) or self.params(key)  # held until the launches return
        stream = ctypes.c_void_p(key[0])
        for bound, kernel, params in zip(self.bound, self.kernels, entry[0]):
            rc = bound(stream, params, None)
            if rc:
                kernel.check(rc)


class CallPlan:
    """Base of a backend's plan for one call signature: `plan(q, k, v)` runs a call on torch's
    current stream of the plan's device (made current for the call when it is not)."""

    index: int  # CUDA device index

    def __call__(self, q, k, v):
        if current_device() != self.index:
            with torch.cuda.device(self.index):
                return self.run(q, k, v)
        return self.run(q, k, v)

    def run(self, q, k, v):
        raise NotImplementedError

    def launch_fast(self, q, k, v_ptr: int):
        """The memoised path: allocate the workspace, O and lse, enqueue the plan's launches on
        torch's current stream; returns (workspace, O, lse or None)."""
        self.dk.drv.ensure_context(self.index)
        ws = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        out = torch.empty(self.out_shape, dtype=self.dtype, device=self.device)
        lse = torch.empty(self.lse_shape, dtype=torch.float32, device=self.device) if self.return_lse else None
        self.launches.enqueue((current_stream(self.index), ws.data_ptr(), q.data_ptr(), k.data_ptr(), v_ptr,
                               out.data_ptr(), 0 if lse is None else lse.data_ptr()))
        return ws, out, lse
