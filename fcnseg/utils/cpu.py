"""What this machine's CPU is and which instructions it has, read once from Linux's /proc/cpuinfo.

The precision that ``trainer.amp=auto`` picks (bf16 instructions) and what the benchmarks print
with their figures (the model name, the vector and matrix extensions that decide the speeds)
come from here. Where the file cannot be read (macOS, Windows, a sandbox) each answer is
``None``, and the caller decides what an unknown CPU means.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

#: Linux's description of the CPUs: one block of ``key : value`` lines per logical CPU.
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class CpuInfo:
    """The first CPU's entry of /proc/cpuinfo.

    Attributes:
        model_name: e.g. ``AMD EPYC 7B13`` (``None``: not given, as on most ARM kernels, or
            unreadable).
        flags: the instruction-set extensions as the kernel names them (``avx2``,
            ``avx512_bf16``, ``amx_bf16``; ARM's ``Features`` line); empty where the file has
            no such line, ``None`` where it cannot be read.
    """

    model_name: str | None
    flags: frozenset[str] | None


def parse_cpuinfo(text: str) -> CpuInfo:
    """The model name and feature flags of the first CPU described by /proc/cpuinfo's ``text``."""
    model_name, flags = None, None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if not sep:
            continue
        if key == "model name" and model_name is None:
            model_name = value.strip() or None
        elif key in ("flags", "Features") and flags is None:
            flags = frozenset(value.split())
        if model_name is not None and flags is not None:
            break
    return CpuInfo(model_name=model_name, flags=frozenset() if flags is None else flags)


def read_cpu_info(path: str | Path | None = None) -> CpuInfo:
    """``parse_cpuinfo`` of the file ``path`` (default ``CPUINFO``); both fields ``None`` where
    it cannot be read."""
    try:
        text = Path(CPUINFO if path is None else path).read_text(errors="replace")
    except OSError:
        return CpuInfo(model_name=None, flags=None)
    return parse_cpuinfo(text)


@functools.cache
def cpu_info() -> CpuInfo:
    """This machine's ``read_cpu_info()``, read once per process (the CPU does not change)."""
    return read_cpu_info()


def cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags (``None`` where /proc/cpuinfo cannot be read)."""
    return cpu_info().flags


def cpu_model_name() -> str | None:
    """This CPU's model name (``None`` where /proc/cpuinfo does not give it)."""
    return cpu_info().model_name
