"""Metric accumulation, timed: ``SegMetrics.update`` where the predictions are, with the
bincounts and host reads it makes per batch, against a per-image count on the host."""

from __future__ import annotations

import statistics
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from fcnseg.bench.common import make_report, summarize, time_calls, use_threads
from fcnseg.metrics import SegMetrics
from fcnseg.utils.distributed import resolve_device


class CallCounter(TorchFunctionMode):
    """Counts torch calls by name, and the reads that make the host wait for the device."""

    HOST_READS = {"__int__", "__float__", "__bool__", "item", "tolist", "cpu", "numpy"}

    def __init__(self) -> None:
        super().__init__()
        self.bincounts = 0
        self.bincount_devices: set[str] = set()
        self.host_reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name == "bincount":
            self.bincounts += 1
            self.bincount_devices.add(str(args[0].device))
        elif name in self.HOST_READS:
            self.host_reads += 1
        return func(*args, **(kwargs or {}))


def per_image_host_update(
    confusion: np.ndarray,
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int,
) -> None:
    """The pattern SegMetrics avoids: every image copied to the host and counted there."""
    for p, t in zip(pred, target):
        p, t = p.cpu().numpy().ravel(), t.cpu().numpy().ravel()
        keep = t != ignore_index
        confusion += np.bincount(t[keep] * num_classes + p[keep], minlength=num_classes**2).reshape(
            num_classes, num_classes
        )


def time_metric_update(
    *,
    num_classes: int,
    ignore_index: int = 255,
    size: int,
    batch: int,
    device: str = "auto",
    warmup: int,
    iters: int,
    threads: int | None = None,
) -> dict[str, Any]:
    """``SegMetrics.update`` on ``batch`` random ``size`` label maps on ``device``, with the
    number of bincounts and host reads it makes per batch; and, for scale, a per-image count on
    the host. ``threads``: PyTorch's and OpenCV's CPU threads (``None``: their defaults)."""
    use_threads(threads)
    dev = resolve_device(device)
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, num_classes, (batch, size, size), generator=g).to(dev)
    target = torch.randint(0, num_classes, (batch, size, size), generator=g)
    target[..., : size // 16, :] = ignore_index
    target = target.to(dev)
    metrics = SegMetrics(num_classes, ignore_index)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    with CallCounter() as counter:
        metrics.update(pred, target)
    calls = {
        "SegMetrics.update (one bincount per batch)": partial(metrics.update, pred, target),
        "per-image host bincount (numpy)": partial(
            per_image_host_update, confusion, pred, target, num_classes, ignore_index
        ),
    }
    timed = time_calls(calls, device=dev, warmup=warmup, iters=iters)
    results = [
        summarize(
            n,
            timed[n],
            images_per_call=batch,
            mpixels_per_s=batch * size * size / statistics.median(timed[n].seconds) / 1e6,
        )
        for n in calls
    ]
    summary = {
        "bincount_calls_per_batch": counter.bincounts,
        "bincount_device": ",".join(sorted(counter.bincount_devices)),
        "host_reads_per_batch": counter.host_reads,
        "segmetrics_vs_per_image_host_speed": results[0]["images_per_s"]
        / results[1]["images_per_s"],
    }
    return make_report(
        "metrics",
        dev,
        results,
        summary,
        size=size,
        batch=batch,
        num_classes=num_classes,
        warmup=warmup,
    )
