"""Checks every command makes before any work: can it write its outputs, does the
requested size fit in memory, does the device exist. Each raises a one-line
``ValueError`` naming the flag, so :func:`cli.run` prints it and exits 2 before a
minute of computing is lost.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"  # pragma: no cover


def _probe_dir(d: Path, flag: str, path: Path) -> None:
    """Create and remove a file in the nearest existing ancestor of ``d``."""
    probe = d
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{flag} {path}: {probe} is not a folder")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write in {probe} ({e.strerror or e})") from None


def check_writable_file(path, flag: str = "--out") -> Path | None:
    """``path`` can be written (atomically) as a file; ``None`` and ``-`` (stdout) pass."""
    if path is None or str(path) == "-":
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    _probe_dir(p.parent if str(p.parent) else Path("."), flag, p)
    return p


def check_writable_dir(path, flag: str = "--out") -> Path | None:
    """``path`` is (or can be created as) a folder we can write in; ``None`` passes."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {path} is a file; give a folder")
    _probe_dir(p, flag, p)
    return p


def available_memory(device: str = "cpu") -> int:
    """Bytes free on ``device``: MemAvailable of /proc/meminfo on the CPU (free physical
    pages where there is none), ``torch.cuda.mem_get_info`` on a GPU."""
    if str(device).startswith("cuda"):
        import torch
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_memory(nbytes: float, what: str, device: str = "cpu", hint: str = "",
                 fraction: float = 0.8) -> None:
    """Refuse work whose estimated peak ``nbytes`` exceeds ``fraction`` of the free memory."""
    free = available_memory(device)
    if nbytes > fraction * free:
        tail = f"; {hint}" if hint else ""
        raise ValueError(f"{what} needs about {format_bytes(nbytes)}, more than the "
                         f"{format_bytes(free)} free on {device}{tail}")


def check_device(device: str | None, here: bool = True) -> str:
    """A device string torch understands and this machine has (``cpu``, ``cuda``, ``cuda:1``).
    ``here=False``: only the name (the work runs on other machines, e.g. a Ray cluster)."""
    import torch

    device = (device or "cpu").strip()
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device}: not a device torch knows; use cpu or cuda[:N]") from None
    if not here:
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"--device {device}: use cpu or cuda")
        return device
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {device}: MPS is not available on this machine")
    elif dev.type != "cpu":
        raise ValueError(f"--device {device}: use cpu or cuda")
    return device


def check_threads(n: int | None, flag: str = "--threads") -> int | None:
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{flag} must be a positive integer, got {n!r}")
    cpus = os.cpu_count() or 1
    if n > 4 * cpus:
        raise ValueError(f"{flag} {n} is more than 4x the {cpus} CPUs of this machine")
    return n
