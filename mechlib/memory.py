"""Peak memory of a computation, as the allocator or the kernel counts it (never sampled).

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` — the caching
  allocator's own high-water mark of tensor memory.
* CPU (Linux): the kernel's resident-set high-water mark ``VmHWM``, reset by writing ``5`` to
  ``/proc/self/clear_refs`` — exact for the whole process, so it also counts what other code
  allocates meanwhile; elsewhere the CPU figure is absent.

Sweeps record ``peak_memory`` in their result's metadata: the peak *extra* memory (MiB) above what
was in use when the sweep started, and how it was measured.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator, Optional

import torch

_STATUS = "/proc/self/status"


def _kib(field: str) -> Optional[int]:
    try:
        with open(_STATUS) as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextmanager
def peak_memory(device=None) -> Iterator[dict]:
    """Measure the peak extra memory of the block; yields a dict filled in on exit with
    ``{"device", "peak_extra_mib", "method"}``.

    Example:
        >>> with peak_memory() as mem:                                   # doctest: +SKIP
        ...     result = mechlib.activation_patching(...)
        >>> mem["peak_extra_mib"]
    """
    dev = torch.device(device) if device is not None else None
    out: dict = {}
    cuda = dev is not None and dev.type == "cuda" and torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        base = _kib("VmRSS") if _reset_hwm() else None
    try:
        yield out
    finally:
        if cuda:
            torch.cuda.synchronize(dev)
            out.update(device=str(dev), method="torch.cuda.max_memory_allocated",
                       peak_extra_mib=round((torch.cuda.max_memory_allocated(dev) - base) / 2**20, 1))
        elif base is not None and (hwm := _kib("VmHWM")) is not None:
            out.update(device="cpu", method="VmHWM (kernel RSS high-water mark)",
                       peak_extra_mib=round(max(hwm - base, 0) / 1024, 1))
        else:
            out.update(device=str(dev or "cpu"), method="unavailable", peak_extra_mib=None)
