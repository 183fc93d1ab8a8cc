"""Host staging: the CPU path wraps without copying; on CUDA pinned buffers are reused and the
round trip is exact (skipped without a GPU: scripts/check_cuda.sh runs it on one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamer.copies import HostStaging


def test_cpu_wraps_the_buffer_without_a_copy() -> None:
    staging = HostStaging(torch.device("cpu"))
    buf = np.arange(10, dtype=np.float64)
    dev = staging.to_device(buf)
    assert dev.data_ptr() == buf.ctypes.data
    assert np.array_equal(staging.to_host(dev * 2), buf * 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_round_trip_is_exact_and_reuses_pinned_buffers() -> None:
    staging = HostStaging(torch.device("cuda"))
    rng = np.random.default_rng(0)
    first = None
    for n in (5, 3000, 17, 3000):
        buf = rng.normal(size=n)
        dev = staging.to_device(buf)
        assert dev.is_cuda
        out = staging.to_host(dev.float())
        assert np.array_equal(out, buf.astype(np.float32))
        assert staging._in is not None and staging._in.is_pinned()
        first = first or staging._in.data_ptr()
    assert staging._in is not None and staging._in.data_ptr() == first  # 4096 fits all
