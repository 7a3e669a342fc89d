"""Whether every quantized attention output was finite, recorded on the device.

Adding an output is one kernel launch (its float32 sum) and never waits for the GPU; inf and
NaN propagate through sums, so the total is non-finite iff some output was (a finite overflow
of the total only costs a needless stock recompute). Only `finite()` reads the device: the
patch calls it once per sampling run (the SAMPLER_SAMPLE wrapper), or once per model
evaluation where no sampling run is around it.
"""
from __future__ import annotations

import torch

# Per-call sums kept before folding them into one (two launches per fold).
_FOLD = 256


class FiniteCheck:
    def __init__(self):
        self._sums: list[torch.Tensor] = []
        self.outputs = 0  # outputs added (host-side count)

    def add(self, out: torch.Tensor) -> None:
        self._sums.append(out.sum(dtype=torch.float32))
        self.outputs += 1
        if len(self._sums) >= _FOLD:
            self._sums = [torch.stack(self._sums).sum()]

    def finite(self) -> bool:
        """True when no output was added or all were finite. Waits for the GPU (one read)."""
        if not self._sums:
            return True
        total = self._sums[0] if len(self._sums) == 1 else torch.stack(self._sums).sum()
        self._sums = [total]
        return bool(torch.isfinite(total))
