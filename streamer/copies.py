"""Host <-> device copies of one engine step: one copy in, one copy out per batch.

On CPU the numpy buffer is wrapped without a copy. On CUDA the host side lives in page-locked
(pinned) buffers that are reused and grown geometrically, so both copies are true asynchronous
DMA transfers (``non_blocking=True`` from pageable memory silently degrades to a synchronous
staged copy); the step waits once, on the copy out. State tensors never leave the device.

Usage::

    staging = HostStaging(device)
    x = staging.to_device(np_buffer)      # float64 [n] -> device tensor
    out = staging.to_host(y)              # device tensor -> numpy array (owned by the caller)
"""

from __future__ import annotations

import numpy as np
import torch


class HostStaging:
    """Reusable pinned host buffers for one device (project code, CUDA semantics per the
    PyTorch docs on pinned memory and non-blocking copies)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self._in: torch.Tensor | None = None
        self._out: torch.Tensor | None = None

    def to_device(self, buf: np.ndarray) -> torch.Tensor:
        """``buf`` (float64, 1-D) on the device. The pinned buffer is reused by the next call,
        which is safe because :meth:`to_host` of this step waits for the stream first."""
        if not self.pinned:
            return torch.from_numpy(buf)
        self._in = _fit(self._in, buf.size, torch.float64)
        staging = self._in[: buf.size]
        staging.numpy()[:] = buf
        return staging.to(self.device, non_blocking=True)

    def to_host(self, y: torch.Tensor) -> np.ndarray:
        """A host copy of ``y`` the caller owns (synchronizes the device on CUDA)."""
        if not self.pinned:
            return y.cpu().numpy()
        self._out = _fit(self._out, y.numel(), y.dtype)
        out = self._out[: y.numel()].view(y.shape)
        out.copy_(y, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return out.numpy().copy()


def _fit(buf: torch.Tensor | None, n: int, dtype: torch.dtype) -> torch.Tensor:
    if buf is not None and buf.numel() >= n and buf.dtype == dtype:
        return buf
    size = max(n, 2 * (buf.numel() if buf is not None else 0), 4096)
    return torch.empty(size, dtype=dtype, pin_memory=True)
