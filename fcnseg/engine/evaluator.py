"""Whole-image evaluation, exact on any number of processes."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fcnseg.metrics import SegMetrics
from fcnseg.utils.distributed import all_reduce_sum, get_info
from fcnseg.utils.logging import progress


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    metrics: SegMetrics,
    *,
    device: torch.device,
    autocast: torch.autocast | None = None,
    keep: int = 0,
) -> tuple[dict, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Scores ``loader`` (this process's shard) and sums confusion matrices over processes.

    Returns the metrics and up to ``keep`` (image, target, prediction) triples from the first
    batches, for pictures.
    """
    was_training = model.training
    model.eval()
    metrics.reset()
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    info = get_info()
    for images, targets in progress(loader, desc="eval", enabled=info.is_main):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast or torch.autocast(device.type, enabled=False):
            logits = model(images)
        preds = logits.argmax(1)
        metrics.update(preds, targets)
        for i in range(min(images.shape[0], keep - len(kept))):
            kept.append((images[i].cpu(), targets[i].cpu(), preds[i].cpu()))
    n = metrics.num_classes
    confusion = metrics.confusion if metrics.confusion is not None else torch.zeros(n, n, dtype=torch.int64, device=device)
    totals = torch.cat([confusion.flatten(), torch.tensor([metrics.num_images], device=confusion.device)])
    totals = all_reduce_sum(totals.to(device))
    metrics.reset()
    metrics.add_confusion(totals[:-1].view(n, n).cpu(), int(totals[-1]))
    model.train(was_training)
    return metrics.compute(), kept
