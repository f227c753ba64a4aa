"""Inference, timed: the forward pass and argmax of a batch, as whole-image evaluation runs."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from fcnseg.bench.common import (
    count_flops,
    make_report,
    random_batch,
    runtime_settings,
    speedup,
    time_variants,
    use_threads,
    with_reference,
)
from fcnseg.engine.runtime import Runtime


def time_inference(
    *,
    model: nn.Module,
    runtime: Runtime,
    num_classes: int,
    size: int,
    batch: int,
    warmup: int,
    iters: int,
    reference: bool = False,
    threads: int | None = None,
) -> dict[str, Any]:
    """Times forward + argmax of ``batch`` random ``size`` images, in eval mode, as ``runtime``
    runs the network (device, autocast, memory layout, compilation).

    With ``reference``, the plain reference VGG16 FCN-8s holding the same weights is timed
    too, interleaved. ``threads``: PyTorch's and OpenCV's CPU threads (``None``: defaults).
    """
    use_threads(threads)
    models = with_reference(model, num_classes=num_classes, reference=reference)
    models = {name: runtime.prepare(m).eval() for name, m in models.items()}
    nets = {name: runtime.compiled(m) for name, m in models.items()}
    images, _ = random_batch(batch=batch, size=size, num_classes=num_classes, ignore_index=255)
    images = runtime.inputs(images)

    def predict(net) -> torch.Tensor:
        with torch.inference_mode(), runtime.autocast():
            return net(images).argmax(1)

    # FLOPs on the eager modules: compiled code hides them from the counter.
    flops = {name: count_flops(partial(predict, models[name])) for name in models}
    calls = {name: partial(predict, net) for name, net in nets.items()}
    results = time_variants(
        calls, runtime.device, warmup=warmup, iters=iters, images_per_call=batch, flops=flops
    )
    summary = speedup(results, "fcnseg_vs_reference_speed")
    settings = dict(size=size, batch=batch, warmup=warmup, trainer=runtime_settings(runtime))
    return make_report("infer", runtime.device, results, summary, **settings)
