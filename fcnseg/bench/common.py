"""What every measurement shares: the environment, synchronisation, peak memory, the timing
protocol (``time_calls``, ``summarize``), FLOP counting, and the report as a table and JSON.

The protocol itself is described in ``fcnseg.bench``.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fcnseg.engine.runtime import CPU_BF16_FLAGS, Runtime, hardware_precision
from fcnseg.errors import UserError
from fcnseg.utils import tables
from fcnseg.utils.cpu import cpu_flags, cpu_model_name


# ---------------------------------------------------------------------------- the machine
def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The hardware and software a measurement ran on."""
    device = torch.device(device)
    env: dict[str, Any] = {
        "cpu": cpu_model_name() or platform.processor() or platform.machine(),
        "cpu_cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Other processes' demand for the CPU while this ran (1-minute load average).
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    for name in ("torchvision", "albumentations", "cv2", "numpy", "PIL"):
        with contextlib.suppress(ImportError):
            env[name] = __import__(name).__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    env.update(precision_support(device))
    return env


# Half-precision instructions of x86 CPUs, as /proc/cpuinfo names them.
CPU_FP16_FLAGS = ("avx512_fp16", "amx_fp16")


def precision_support(device: torch.device) -> dict[str, Any]:
    """What the device computes natively in bf16 and fp16, and what ``trainer.amp=auto`` picks.

    GPU: its compute capability and ``torch.cuda.is_bf16_supported(including_emulation=False)``
    (Ampere, 8.0, and later); fp16 runs on tensor cores from Volta (7.0) on. CPU: its bf16/fp16
    instruction flags and whether PyTorch's oneDNN reports native bf16/fp16 kernels.
    """
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        support = {
            "compute_capability": f"{major}.{minor}",
            "bf16_native": torch.cuda.is_bf16_supported(including_emulation=False),
            "fp16_tensor_cores": major >= 7,
        }
    else:
        flags = cpu_flags()
        support = {
            "cpu_half_flags": None
            if flags is None
            else [f for f in (*CPU_BF16_FLAGS, *CPU_FP16_FLAGS) if f in flags],
            "torch_cpu_bf16": _onednn("bf16"),
            "torch_cpu_fp16": _onednn("fp16"),
        }
    return {**support, "amp_auto": hardware_precision("auto", device)[0]}


def _onednn(dtype: str) -> bool | None:
    """Whether PyTorch's oneDNN has native ``dtype`` kernels on this CPU (None: cannot tell)."""
    with contextlib.suppress(AttributeError, RuntimeError):
        return bool(getattr(torch.ops.mkldnn, f"_is_mkldnn_{dtype}_supported")())
    return None


def hardware_line(env: Mapping[str, Any]) -> str:
    """One line naming the device a report was measured on and its half-precision support."""
    if env.get("gpu"):
        half = (
            f"bf16 {'native' if env.get('bf16_native') else 'not native'}, fp16 "
            f"{'on tensor cores' if env.get('fp16_tensor_cores') else 'without tensor cores'}"
        )
        where = f"{env['gpu']} (compute capability {env.get('compute_capability', '?')})"
    else:
        flags = env.get("cpu_half_flags")
        listed = "unknown" if flags is None else ", ".join(flags) or "none"
        half = (
            f"half-precision flags: {listed}; oneDNN native bf16 {_yes(env.get('torch_cpu_bf16'))}"
            f", fp16 {_yes(env.get('torch_cpu_fp16'))}"
        )
        where = f"{env.get('cpu', '?')} ({env.get('cpu_cores', '?')} cores)"
    auto = f"; trainer.amp=auto: {env['amp_auto']}" if env.get("amp_auto") else ""
    return f"measured on {where}; {half}{auto}"


def _yes(value: bool | None) -> str:
    return "unknown" if value is None else ("yes" if value else "no")


def use_threads(threads: int | None) -> None:
    """PyTorch's and OpenCV's thread count in this process (``None``: their defaults)."""
    if threads:
        import cv2

        torch.set_num_threads(int(threads))
        cv2.setNumThreads(int(threads))  # OpenCV resizes in parallel too


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op on the CPU, which runs synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of a stretch of calls: CUDA's max allocated, or the process's peak RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "peak_rss"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # Linux: writing 5 to clear_refs resets the peak resident set (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.kind = "peak_rss_since_start"

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        with contextlib.suppress(OSError, AttributeError):
            found = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
            return int(found.group(1)) * 1024
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, else kB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# ---------------------------------------------------------------------------- the protocol
@dataclass
class Timed:
    """Seconds per timed call and the peak memory over those calls."""

    seconds: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    memory: str = "peak_rss"


def time_calls(
    calls: Mapping[str, Callable[[], Any]], *, device: torch.device, warmup: int, iters: int
) -> dict[str, Timed]:
    """Times every callable ``iters`` times after ``warmup`` untimed calls, interleaved.

    Interleaving call by call (a, b, a, b, ...) exposes every variant to the same background
    load, which matters on a shared machine more than any number of repetitions.
    """
    if iters < 1 or warmup < 0:
        raise UserError(
            f"bench.iters={iters} must be at least 1 and bench.warmup={warmup} at least 0"
        )
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    synchronize(device)
    memory = PeakMemory(device)
    timed = {name: Timed(memory=memory.kind) for name in calls}
    for _ in range(iters):
        for name, fn in calls.items():
            memory.reset()
            start = time.perf_counter()
            fn()
            synchronize(device)
            timed[name].seconds.append(time.perf_counter() - start)
            timed[name].peak_bytes = max(timed[name].peak_bytes, memory.peak_bytes())
            timed[name].memory = memory.kind
    return timed


def summarize(
    name: str, timed: Timed, *, images_per_call: float, flops: int | None = None, **extra: Any
) -> dict[str, Any]:
    """One result row: throughput from the median time, spread, memory, achieved TFLOP/s."""
    ms = np.asarray(timed.seconds) * 1e3
    median = float(statistics.median(ms))
    row = {
        "name": name,
        "iters": len(ms),
        "images_per_s": images_per_call / (median / 1e3),
        "ms_per_iter": {
            "median": median,
            "p10": float(np.percentile(ms, 10)),
            "p90": float(np.percentile(ms, 90)),
            "min": float(ms.min()),
            "max": float(ms.max()),
        },
        "peak_memory_mb": timed.peak_bytes / 2**20,
        "memory": timed.memory,
        "flops_per_iter": flops,
        "tflops": flops / (median / 1e3) / 1e12 if flops else None,
    }
    row.update(extra)
    return row


def time_variants(
    calls: Mapping[str, Callable[[], Any]],
    device: torch.device,
    *,
    warmup: int,
    iters: int,
    images_per_call: float,
    flops: Mapping[str, int] | None = None,
    rates: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """The result rows of ``calls`` timed interleaved (``time_calls``), in their order.

    ``flops``: each call's FLOPs, by name; ``rates``: counts per call (``{"windows_per_s":
    windows}``) each reported per second of the median call.
    """
    timed = time_calls(calls, device=device, warmup=warmup, iters=iters)
    return [
        summarize(
            name,
            timed[name],
            images_per_call=images_per_call,
            flops=flops[name] if flops else None,
            **{k: n / statistics.median(timed[name].seconds) for k, n in (rates or {}).items()},
        )
        for name in calls
    ]


def speedup(results: Sequence[Mapping[str, Any]], key: str) -> dict[str, float]:
    """``{key: first row's images per second / second row's}`` where there are two rows."""
    if len(results) != 2:
        return {}
    return {key: results[0]["images_per_s"] / results[1]["images_per_s"]}


def with_reference(model: nn.Module, *, num_classes: int, reference: bool) -> dict[str, nn.Module]:
    """``{"fcnseg": model}``, and with ``reference`` the plain reference VGG16 FCN-8s holding
    the same weights (``fcnseg.models.reference``), to be measured beside it."""
    from fcnseg.models.reference import reference_fcn8s_like

    nets = {"fcnseg": model}
    if reference:
        nets["reference"] = reference_fcn8s_like(model, num_classes)
    return nets


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matrix products and convolutions ``fn`` runs (a multiply-add counts 2)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def random_batch(
    *, batch: int, size: int, num_classes: int, ignore_index: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised-looking images and label maps with a border of ignored pixels, as crops have."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    targets = torch.randint(0, num_classes, (batch, size, size), generator=g)
    targets[..., : size // 16, :] = ignore_index
    return images, targets


# ---------------------------------------------------------------------------- the call
def complete(
    measure: Callable[..., dict[str, Any]], pieces: Mapping[str, Callable[[], Any]]
) -> Callable[[], dict[str, Any]]:
    """``measure`` with every keyword it still lacks built by the piece of that name.

    A configuration names the measurement and its settings (a partial function); the objects
    it needs at run time (a model, an optimizer factory, a ``Runtime``) are made by ``pieces``,
    and only those its signature asks for, so that timing the metrics never builds a network.
    """
    func = measure.func if isinstance(measure, partial) else measure
    given = measure.keywords if isinstance(measure, partial) else {}
    wanted = {
        name: param
        for name, param in inspect.signature(func).parameters.items()
        if name not in given and param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD)
    }
    missing = [n for n, p in wanted.items() if n not in pieces and p.default is p.empty]
    if missing:
        raise UserError(
            f"{func.__module__}.{func.__qualname__} needs {', '.join(missing)}: "
            "set it in the bench config"
        )
    return partial(measure, **{name: pieces[name]() for name in wanted if name in pieces})


# ---------------------------------------------------------------------------- reports
def runtime_settings(runtime: Runtime, **extra: Any) -> dict[str, Any]:
    """The runtime switches a network measurement ran under, for its report's settings."""
    return {
        "device": str(runtime.device),
        "amp": runtime.amp,
        "channels_last": runtime.channels_last,
        "compile": runtime.compile,
        **extra,
    }


def make_report(
    mode: str,
    device: torch.device,
    results: list[dict[str, Any]],
    summary: dict[str, Any],
    **settings: Any,
) -> dict[str, Any]:
    """The report of one measurement, with the environment it ran in."""
    return {
        "mode": mode,
        "settings": settings,
        "environment": environment(device),
        "results": results,
        "summary": summary,
    }


def format_table(report: Mapping[str, Any]) -> str:
    """The report's result rows as a Markdown table, under the line naming its hardware."""
    rows = []
    for row in report["results"]:
        ms = row["ms_per_iter"]
        tflops = f"{row['tflops']:.3g}" if row.get("tflops") else "-"
        rows.append(
            [
                row["name"],
                f"{row['images_per_s']:.2f}",
                f"{ms['median']:.1f} ({ms['p10']:.1f}-{ms['p90']:.1f})",
                f"{row['peak_memory_mb']:.0f}",
                tflops,
            ]
        )
    header = ["variant", "images/s", "ms/iter median (p10-p90)", "peak memory (MB)", "TFLOP/s"]
    lines = [
        *([hardware_line(report["environment"]), ""] if "environment" in report else []),
        tables.format_table(header, rows, align="<>>>>", markdown=True),
    ]
    for key, value in report.get("summary", {}).items():
        lines.append(f"\n{key}: {value:.3f}" if isinstance(value, float) else f"\n{key}: {value}")
    return "\n".join(lines)


def write_report(report: Mapping[str, Any], path: str | Path | None) -> str:
    """Writes the JSON report to ``path`` (if given) and returns the text printed for humans."""
    text = json.dumps(report, indent=2, default=str)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    env = report["environment"]
    where = (
        env.get("gpu") or f"{env['cpu']} ({env['cpu_cores']} cores, {env['torch_threads']} threads)"
    )
    buffer = io.StringIO()
    print(f"{report['mode']} on {where}, torch {env['torch']}", file=buffer)
    print(f"settings: {json.dumps(report['settings'], default=str)}", file=buffer)
    print(format_table(report), file=buffer)
    return buffer.getvalue()
