"""Sliding-window inference, timed: the windows of one image batched, against one by one."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from fcnseg.bench.common import (
    make_report,
    runtime_settings,
    speedup,
    time_variants,
    use_threads,
)
from fcnseg.engine.inference import Inference
from fcnseg.engine.inference import _starts as window_starts
from fcnseg.engine.runtime import Runtime
from fcnseg.errors import UserError


def time_sliding_window(
    *,
    model: nn.Module,
    inference: Inference,
    runtime: Runtime,
    size: int | Sequence[int],
    warmup: int,
    iters: int,
    threads: int | None = None,
) -> dict[str, Any]:
    """Times ``inference`` (``slide`` mode) on one random ``size`` image, its windows batched
    by ``inference.batch_size``, against the same inference one window at a time.

    ``runtime`` runs the network (device, autocast, memory layout, compilation); ``threads``:
    PyTorch's and OpenCV's CPU threads (``None``: their defaults).
    """
    if inference.mode != "slide":
        raise UserError("bench=slide needs eval.mode=slide (and eval.crop_size, eval.stride)")
    use_threads(threads)
    net = runtime.compiled(runtime.prepare(model).eval())
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    image = torch.randn(1, 3, h, w, device=runtime.device)
    ch, cw = min(inference.crop_size[0], h), min(inference.crop_size[1], w)
    windows = len(window_starts(h, ch, inference.stride[0])) * len(
        window_starts(w, cw, inference.stride[1])
    )
    options = dict(
        mode="slide",
        crop_size=inference.crop_size,
        stride=inference.stride,
        scales=inference.scales,
        flip=inference.flip,
    )
    variants = {f"windows batched by {inference.batch_size}": inference}
    if inference.batch_size != 1:
        variants["windows one by one"] = Inference(**options, batch_size=1)

    def run(inf: Inference) -> torch.Tensor:
        return inf.predict(net, image, autocast=runtime.autocast())

    views = len(inference.views)
    results = time_variants(
        {n: partial(run, inf) for n, inf in variants.items()},
        runtime.device,
        warmup=warmup,
        iters=iters,
        images_per_call=1,
        rates={"windows_per_s": windows * views},
    )
    summary: dict[str, Any] = {
        "windows_per_image": windows * views,
        **speedup(results, "batched_vs_one_by_one_speed"),
    }
    return make_report(
        "slide",
        runtime.device,
        results,
        summary,
        size=[h, w],
        crop_size=list(inference.crop_size),
        stride=list(inference.stride),
        warmup=warmup,
        trainer=runtime_settings(runtime),
    )
