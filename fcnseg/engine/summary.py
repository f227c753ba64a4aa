"""The block a training run starts its log with: what it trains, on what, how, and where."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fcnseg.engine.record import RunRecord
from fcnseg.engine.runtime import Runtime
from fcnseg.engine.settings import TrainSettings
from fcnseg.models.backbones.weights import RANDOM_INIT


def run_summary(
    *,
    record: RunRecord,
    settings: TrainSettings,
    runtime: Runtime,
    sizes: Mapping[str, int | None],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    start: int,
    run_dir: Path,
    model: nn.Module | None = None,
) -> list[str]:
    """One line each: data, model, recipe, precision and devices, the run.

    Args:
        record: the run's facts (dataset, backbone, head, where the weights come from).
        settings, runtime: the run's settings and where it runs.
        sizes: images per split, e.g. ``{"train": 367, "val": 101}``.
        optimizer, scheduler: as built.
        start: the first iteration this process runs (after a resume, the next one).
        run_dir: where the run writes.
        model: the model as built; its backbone's ``weights_source`` (the file read and its
            sha256) says where the initial weights came from, else the record does.
    """
    s, group, dist = settings, optimizer.param_groups[0], runtime.dist
    splits = ", ".join(f"{split} {n if n is not None else '?'}" for split, n in sizes.items())
    source = getattr(getattr(model, "backbone", None), "weights_source", None)
    weights = source if isinstance(source, str) and source != RANDOM_INIT else record.weights
    effective = s.batch_size * dist.world_size * s.accumulate
    lr = group.get("initial_lr", group["lr"])
    return [
        f"data: {record.dataset} at {record.data_root or '(built in)'}; {splits} images; "
        f"crop {record.crop_size}",
        f"model: backbone {record.backbone} ({weights}), head {record.head}",
        f"recipe: {type(optimizer).__name__} lr {lr:g} (not scaled with the batch), "
        f"{type(scheduler).__name__}, iterations {start + 1}-{s.max_iters}; {s.batch_size} "
        f"images per process x {dist.world_size} process(es) x {s.accumulate} accumulation "
        f"step(s) = {effective} per step",
        f"runtime: {runtime.device} x {dist.world_size} process(es), amp {runtime.amp}"
        f"{f' ({runtime.amp_note})' if runtime.amp_note else ''}, "
        f"channels_last {runtime.channels_last}, compile {runtime.compile}",
        f"run directory: {run_dir}",
        f"cpu threads: {runtime.threads_summary}",
    ]
