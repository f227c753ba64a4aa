"""The training step, timed: ``fcnseg.engine.step.TrainStep`` on random crops."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import nn

from fcnseg.bench import common
from fcnseg.engine.loss import SegLoss
from fcnseg.engine.runtime import Runtime
from fcnseg.engine.step import TrainStep


def time_train_step(
    *,
    model: nn.Module,
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    scheduler: Callable[[torch.optim.Optimizer], Any],
    runtime: Runtime,
    num_classes: int,
    ignore_index: int = 255,
    size: int,
    batch: int,
    warmup: int,
    iters: int,
    reference: bool = False,
    accumulate: int = 1,
    keep_buffers: bool = False,
    cudnn_benchmark: bool = True,
    threads: int | None = None,
) -> dict[str, Any]:
    """Times one optimizer step: forward under autocast, loss, backward, optimizer, schedule.

    The step is training's own ``TrainStep``, so every runtime switch (``amp``,
    ``channels_last``, ``compile``) and ``accumulate`` apply exactly as in training. With
    ``reference``, the plain transcription of the reference VGG16 FCN-8s
    (``fcnseg.models.reference``), holding the same weights, is stepped the same way,
    interleaved with fcnseg's.

    Args:
        model: the network, on the CPU.
        optimizer: trainable parameters -> optimizer; scheduler: optimizer -> schedule.
        runtime: device, autocast, memory layout, compilation (one process).
        num_classes, ignore_index: of the random label maps.
        size, batch: crop side and crops per step.
        warmup, iters: untimed and timed steps.
        reference: also time the reference network.
        accumulate, keep_buffers, cudnn_benchmark: as ``TrainStep`` takes them.
        threads: PyTorch's and OpenCV's CPU threads (``None``: their defaults).
    """
    common.use_threads(threads)
    nets = common.with_reference(model, num_classes=num_classes, reference=reference)
    steps = {}
    for name, net in nets.items():
        net = runtime.prepare(net).train()
        opt = optimizer([p for p in net.parameters() if p.requires_grad])
        steps[name] = TrainStep(
            net, opt, scheduler(opt), SegLoss(ignore_index=ignore_index), runtime=runtime,
            accumulate=accumulate, keep_buffers=keep_buffers, cudnn_benchmark=cudnn_benchmark,
        )  # fmt: skip
    images, targets = common.random_batch(
        batch=batch, size=size, num_classes=num_classes, ignore_index=ignore_index
    )
    if runtime.device.type == "cuda":  # as the training loader delivers them
        images, targets = images.pin_memory(), targets.pin_memory()
    flops = {name: _step_flops(step, images, targets) for name, step in steps.items()}
    calls = {name: partial(step, images, targets) for name, step in steps.items()}
    results = common.time_variants(
        calls, runtime.device, warmup=warmup, iters=iters, images_per_call=batch, flops=flops
    )
    summary = common.speedup(results, "fcnseg_vs_reference_speed")
    trainer = common.runtime_settings(runtime, accumulate=accumulate)
    settings = dict(size=size, batch=batch, warmup=warmup, trainer=trainer)
    return common.make_report("train", runtime.device, results, summary, **settings)


def _step_flops(step: TrainStep, images: torch.Tensor, targets: torch.Tensor) -> int:
    """Forward + backward FLOPs of one step, on the eager module (compiled code hides them)."""
    runtime = step.runtime

    def forward_backward() -> None:
        with runtime.autocast():
            logits = step.module(runtime.inputs(images))
        step.loss(logits, targets.to(runtime.device)).backward()

    flops = common.count_flops(forward_backward)
    step.optimizer.zero_grad(set_to_none=True)
    return flops
