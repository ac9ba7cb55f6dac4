"""Wall-clock timing shared by the benchmarks: the device is synchronised around every measured call, so a
GPU's queued work is counted where it is launched."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: bool = True) -> list[float]:
    """The wall-clock seconds of ``repeats`` calls of ``fn`` (after one unmeasured call if ``warmup``)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: bool = True) -> float:
    return statistics.median(seconds(fn, device, repeats, warmup))
