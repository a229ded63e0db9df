"""Peak memory of one training step, measured the same way for every method.

On a GPU: ``torch.cuda.max_memory_allocated`` over the step (everything resident).
On the CPU: torch's profiler records every allocation and free of the step; the
peak of their running sum is the step's transient memory (activations, gradients,
optimizer temporaries), and the resident part (parameters, buffers, gradients and
optimizer state that outlive the step) is added from the tensors themselves. Both
count tensor bytes only (no allocator caching, no Python objects), so methods are
compared on what they ask of the allocator.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

import torch


def resident_bytes(model: torch.nn.Module, optimizer=None) -> int:
    """Bytes of the model's parameters, buffers and gradients, and of the optimizer state."""
    seen: set[int] = set()
    total = 0

    def add(t):
        nonlocal total
        if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()

    for p in model.parameters():
        add(p)
        if p.grad is not None:
            add(p.grad)
    for b in model.buffers():
        add(b)
    if optimizer is not None:
        for state in optimizer.state.values():
            for v in state.values():
                add(v)
    return total


def step_peak_bytes(step: Callable[[], object], device: str = "cpu") -> tuple[int, object]:
    """``(peak bytes allocated during step() above what was live before it, its result)``."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base), out
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return int(peak), out


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The profiler's C++ side prints start/stop lines on file descriptor 2: silence it."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (e.g. captured): nothing to do
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)
