"""Evaluation at full resolution, exact on any number of processes.

Each process scores its contiguous shard of the split (``InferenceSampler``: no sample twice,
none dropped) and the confusion matrices are summed, so the metrics of N processes are those of
one, bit for bit, whatever N and the split's size.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, SequentialSampler

from fcnseg.data.loader import InferenceSampler, eval_loader
from fcnseg.deploy.session import OnnxModel
from fcnseg.engine.inference import Inference
from fcnseg.engine.runtime import Runtime
from fcnseg.metrics import SegMetrics
from fcnseg.utils.distributed import all_reduce_sum, get_info
from fcnseg.utils.logging import get_logger, progress

PredictionSink = Callable[[int, torch.Tensor], None]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    metrics: SegMetrics,
    *,
    device: torch.device,
    autocast: torch.autocast | None = None,
    keep: int | Collection[int] = 0,
    inference: Inference | None = None,
    on_prediction: PredictionSink | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[dict, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Scores ``loader`` (this process's shard) and sums confusion matrices over processes.

    Args:
        model: maps (N, 3, H, W) to logits (N, C, H, W).
        loader: (images, targets) batches; a batch of several images of different sizes is
            padded, which changes the network's view near the padding, so batches of one
            image are the exact full-resolution protocol.
        metrics: reset, filled and left holding the all-reduced confusion matrix.
        device: where the model runs.
        autocast: the forward's autocast context (the logits' average stays float32).
        keep: return (image, target, prediction) triples for pictures: the first ``keep``
            images, or those at the given positions of this process's loader (``spread``).
        inference: whole image, sliding windows, TTA; a plain whole-image pass by default.
        on_prediction: called with (dataset index, labels (H, W)) for every image, to save
            predictions; indices follow the loader's sampler when it is sequential.
        memory_format: the images' layout on the device, the model's (``channels_last``).

    Returns:
        The metrics (``SegMetrics.compute()``, identical on every process) and the kept
        triples (on the CPU).
    """
    inference = inference or Inference()
    was_training = model.training
    model.eval()
    metrics.reset()
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    sampler = getattr(loader, "sampler", None)
    ordered = isinstance(sampler, InferenceSampler | SequentialSampler)
    indices = iter(sampler) if ordered else itertools.count()
    info = get_info()
    position = 0  # images seen by this process
    wanted = set(range(keep)) if isinstance(keep, int) else set(keep)
    batches = iter(loader)
    try:
        for images, targets in progress(batches, desc="eval", enabled=info.is_main):
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            targets = targets.to(device, non_blocking=True)
            preds = inference.predict(model, images, autocast=autocast)
            metrics.update(preds, targets)
            for i in range(images.shape[0]):
                index = next(indices)
                if on_prediction is not None:
                    on_prediction(index, preds[i])
            for i in range(images.shape[0]):
                if position in wanted:
                    kept.append((images[i].cpu(), targets[i].cpu(), preds[i].cpu()))
                position += 1
    finally:  # every way out stops the loader's workers (a generator's close() included)
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    n = metrics.num_classes
    confusion = metrics.confusion
    if confusion is None:
        confusion = torch.zeros(n, n, dtype=torch.int64, device=device)
    count = torch.tensor([metrics.num_images], device=confusion.device)
    totals = all_reduce_sum(torch.cat([confusion.flatten(), count]).to(device))
    metrics.reset()
    metrics.add_confusion(totals[:-1].view(n, n).cpu(), int(totals[-1]))
    model.train(was_training)
    return metrics.compute(), kept


def spread(total: int, count: int) -> list[int]:
    """``count`` positions spread evenly over ``range(total)``: the images a picture shows, from
    all of a split rather than its first consecutive frames."""
    count = min(count, total)
    return [k * total // count for k in range(count)] if count > 0 else []


def evaluation_dataset(
    trained: Mapping[str, Any], given: Mapping[str, Any], *, chosen: bool
) -> dict[str, Any]:
    """The dataset config to evaluate a checkpoint on.

    Args:
        trained: the checkpoint's resolved ``config["dataset"]``.
        given: the ``dataset`` node of the command line's config.
        chosen: whether ``given`` is a whole dataset config (``dataset=NAME``); it must have
            the checkpoint's number of classes. Otherwise ``given`` holds values to change in
            the checkpoint's dataset (``dataset.root=DIR``; ``None`` keeps the trained value),
            also in its builder where the builder had the trained value, since the
            checkpoint stores the builder's ``${dataset.root}`` interpolations resolved.
    """
    from fcnseg.errors import UserError

    if chosen:
        ds = copy.deepcopy(dict(given))
        if ds.get("num_classes") != trained["num_classes"]:
            raise UserError(
                f"dataset={ds.get('name')} has {ds.get('num_classes')} classes but the checkpoint "
                f"was trained on {trained['num_classes']} ({trained.get('name')})"
            )
        return ds
    ds = copy.deepcopy(dict(trained))
    builder = ds.get("builder", {})
    for key, value in given.items():
        if value is not None:
            if key in builder and builder[key] == trained.get(key):
                builder[key] = value
            ds[key] = value
    return ds


def run_evaluation(
    model: nn.Module,
    dataset: Dataset,
    *,
    class_names: Sequence[str],
    ignore_index: int = 255,
    normalize: str = "imagenet",
    inference: Inference | None = None,
    device: str = "auto",
    amp: str = "none",
    channels_last: bool = False,
    num_workers: int = 2,
    on_prediction: PredictionSink | None = None,
    tensorboard_dir: str | Path | None = None,
    tensorboard_prefix: str = "val",
    step: int = 0,
    num_vis: int = 4,
    grid: str | Path | None = None,
    colors: Any = None,
) -> dict[str, Any]:
    """Evaluates ``model`` on all of ``dataset``, one image at a time at full resolution.

    Under torchrun every process takes its shard and the metrics are exact; predictions are
    written by the process that made them; rank 0 writes TensorBoard.

    Args:
        model: the network (moved to ``device``).
        dataset: yields (normalised image, label map) at full resolution.
        class_names: one per class; their number is the number of classes scored.
        ignore_index: label value that is not scored.
        normalize: the images' normalisation, to show them in TensorBoard.
        inference: whole image, sliding windows, TTA.
        device: ``auto``, ``cpu`` or ``cuda``.
        amp: ``none``, ``bf16`` or ``fp16`` autocast for the forward passes.
        channels_last: run a PyTorch network on NHWC tensors (on a CPU the fastest layout for
            oneDNN's convolutions); an exported model keeps its own.
        num_workers: loader processes.
        on_prediction: ``(index, labels)`` callback, e.g.
            ``fcnseg.data.predictions.PredictionWriter``.
        tensorboard_dir: add scalars, table, image grid and figures to the events here, under
            the tags of a training run's evaluations (``fcnseg.engine.loggers``).
        tensorboard_prefix: their tag prefix.
        step: their global step (the checkpoint's iteration).
        num_vis: images in the TensorBoard grid and in ``grid``.
        grid: save the input | ground truth | prediction rows of the first ``num_vis`` images
            to this PNG file.
        colors: class colours for pictures (the VOC map by default).

    Returns:
        ``SegMetrics.compute()`` of the whole dataset.
    """
    is_torch = not isinstance(model, OnnxModel)
    runtime = Runtime.setup(device, amp=amp, channels_last=channels_last and is_torch)
    dev, dist = runtime.device, runtime.dist
    model = runtime.prepare(model) if is_torch else model.to(dev)
    loader = eval_loader(
        dataset,
        batch_size=1,
        num_workers=num_workers,
        rank=dist.rank,
        world_size=dist.world_size,
        ignore_index=ignore_index,
        pin_memory=dev.type == "cuda",
    )
    autocast = runtime.autocast()
    get_logger().info(
        "evaluating %d images on %s x %d process(es) with %s",
        len(dataset),
        dev,
        dist.world_size,
        inference or Inference(),
    )
    scorer = SegMetrics(len(class_names), ignore_index, class_names)
    write_tb = tensorboard_dir is not None and dist.is_main
    write_grid = grid is not None and dist.is_main
    metrics, samples = evaluate(
        model,
        loader,
        scorer,
        device=dev,
        autocast=autocast,
        keep=num_vis if write_tb or write_grid else 0,
        inference=inference,
        on_prediction=on_prediction,
        memory_format=runtime.memory_format,
    )
    if write_grid and samples:
        from PIL import Image

        from fcnseg.utils.visualize import sample_rows

        Path(grid).parent.mkdir(parents=True, exist_ok=True)
        rows = sample_rows(samples, normalize, colors=colors)
        Image.fromarray(rows.permute(1, 2, 0).numpy()).save(grid)
        get_logger().info("prediction grid written to %s", grid)
    if write_tb:
        from fcnseg.engine.loggers import Evaluation, add_evaluation

        evaluation = Evaluation(metrics, samples, normalize, colors, prefix=tensorboard_prefix)
        add_evaluation(tensorboard_dir, evaluation, step)
    return metrics
