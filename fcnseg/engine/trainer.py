"""The training loop: iteration-based, DDP-aware, resumable, readable top to bottom."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset
from torch.utils.tensorboard import SummaryWriter

from fcnseg.data.loader import eval_loader, train_loader
from fcnseg.data.transforms import denormalize
from fcnseg.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from fcnseg.engine.evaluator import evaluate
from fcnseg.errors import UserError
from fcnseg.metrics import SegMetrics, format_table
from fcnseg.utils.distributed import init_distributed, resolve_device
from fcnseg.utils.logging import progress, setup_logging
from fcnseg.utils.visualize import prediction_grid

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Trainer:
    """Trains ``model`` on ``train_set`` and evaluates it on ``val_set`` every ``eval_interval``.

    Everything the run writes goes to ``run_dir``: ``checkpoints/last.pt`` and ``best.pt`` (by
    validation mIoU), ``tensorboard/``, ``metrics.json`` (the last evaluation) and ``train.log``.
    Under torchrun every process trains on its share of each batch stream; rank 0 writes.

    Args:
        model: maps (N, 3, H, W) to logits (N, C, H, W).
        train_set, val_set: datasets yielding (image, mask) tensors.
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``).
        scheduler: ``optimizer -> LRScheduler``, stepped every iteration.
        run_dir: output folder.
        config: the run's resolved configuration, stored in checkpoints.
        class_names: one name per class.
        ignore_index: label value excluded from loss and metrics.
        normalize: the input normalisation, to show images in TensorBoard.
        class_weights: per-class loss weights, or ``None``.
        loss_reduction: ``mean`` over valid pixels, or ``sum`` (the paper's unnormalised loss).
        max_iters: number of optimizer steps.
        eval_interval: evaluate (and save ``best.pt``) every this many steps and at the end.
        log_interval: log the loss every this many steps.
        checkpoint_interval: save ``last.pt`` every this many steps (and at each evaluation).
        batch_size: images per process per step.
        eval_batch_size: images per process per evaluation batch (1 scores each image alone).
        num_workers: loader processes per training process.
        device: ``auto``, ``cpu`` or ``cuda``.
        seed: seeds weights' dropout, data order and augmentation.
        resume: ``False``, ``True`` (``run_dir/checkpoints/last.pt``) or a checkpoint path.
        amp: ``none``, ``bf16`` or ``fp16`` (with a gradient scaler) autocast.
        num_vis: images shown in TensorBoard at each evaluation.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        train_set: Dataset,
        val_set: Dataset,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[[torch.optim.Optimizer], Any],
        run_dir: str | Path,
        config: dict[str, Any],
        class_names: Sequence[str],
        ignore_index: int = 255,
        normalize: str = "imagenet",
        class_weights: Sequence[float] | None = None,
        loss_reduction: str = "mean",
        max_iters: int = 1000,
        eval_interval: int = 500,
        log_interval: int = 20,
        checkpoint_interval: int = 500,
        batch_size: int = 8,
        eval_batch_size: int = 1,
        num_workers: int = 2,
        device: str = "auto",
        seed: int = 0,
        resume: bool | str = False,
        amp: str = "none",
        num_vis: int = 4,
    ) -> None:
        if amp not in AMP_DTYPES:
            raise UserError(f"trainer.amp={amp!r} is not one of {sorted(AMP_DTYPES)}")
        if loss_reduction not in ("mean", "sum"):
            raise UserError(f"loss.reduction={loss_reduction!r} is not one of mean, sum")
        for key, value in (("max_iters", max_iters), ("eval_interval", eval_interval), ("batch_size", batch_size)):
            if value < 1:
                raise UserError(f"trainer.{key}={value} must be at least 1")
        self.run_dir = Path(run_dir)
        self.config = config
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        self.normalize = normalize
        self.loss_reduction = loss_reduction
        self.max_iters, self.eval_interval = max_iters, eval_interval
        self.log_interval, self.checkpoint_interval = log_interval, checkpoint_interval
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.seed, self.num_vis = num_workers, seed, num_vis
        self.train_set, self.val_set = train_set, val_set

        self.device = resolve_device(device)
        self.dist = init_distributed(self.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = resolve_device(device, self.dist.local_rank)
        self.log = setup_logging(self.run_dir / "train.log", main_process=self.dist.is_main)
        _seed_everything(seed + self.dist.rank)

        self.model = model.to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = optimizer(params)
        self.scheduler = scheduler(self.optimizer)
        self.amp_dtype = AMP_DTYPES[amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.class_weights = weight.to(self.device) if weight is not None else None

        self.iteration = 0
        self.best_miou = -1.0
        if resume:
            self._resume(resume)
        # Unwrapped once: `self.model` is what we save and evaluate, `self.ddp` what we train.
        self.ddp = (
            DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.dist.enabled
            else self.model
        )
        self.writer = SummaryWriter(self.run_dir / "tensorboard") if self.dist.is_main else None

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Trains to ``max_iters`` and returns the last evaluation's metrics."""
        loader = train_loader(
            self.train_set,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            seed=self.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            ignore_index=self.ignore_index,
            start_iter=self.iteration,
            pin_memory=self.device.type == "cuda",
        )
        self.log.info(
            "training %s iterations from %d on %s, %d process(es) x %d images = %d per step; run dir %s",
            self.max_iters, self.iteration, self.device, self.dist.world_size, self.batch_size,
            self.dist.world_size * self.batch_size, self.run_dir,
        )  # fmt: skip
        metrics: dict[str, Any] = {}
        self.ddp.train()
        bar = progress(total=self.max_iters, initial=self.iteration, desc="train", enabled=self.dist.is_main)
        batches = iter(loader)
        tic = time.perf_counter()
        while self.iteration < self.max_iters:
            images, targets = next(batches)
            loss = self.step(images, targets)
            self.iteration += 1
            bar.update()
            if self.iteration % self.log_interval == 0 or self.iteration == self.max_iters:
                self._log_train(loss, time.perf_counter() - tic)
                bar.set_postfix(loss=f"{loss:.4f}")
                tic = time.perf_counter()
            if self.iteration % self.eval_interval == 0 or self.iteration == self.max_iters:
                metrics = self.validate()
                self.ddp.train()
            elif self.iteration % self.checkpoint_interval == 0:
                self.save("last.pt")
        bar.close()
        if self.writer is not None:
            self.writer.close()
        return metrics

    def step(self, images: torch.Tensor, targets: torch.Tensor) -> float:
        """One optimizer step: forward under autocast, loss, backward, step, schedule."""
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        with self.autocast():
            logits = self.ddp(images)
        loss = F.cross_entropy(
            logits.float(),
            targets,
            weight=self.class_weights,
            ignore_index=self.ignore_index,
            reduction=self.loss_reduction,
        )
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(
                f"the training loss is {value} at iteration {self.iteration + 1}; the last good "
                f"checkpoint is {self.run_dir / 'checkpoints' / 'last.pt'}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return value

    def validate(self) -> dict[str, Any]:
        """Evaluates on the validation split; rank 0 logs, writes metrics.json and checkpoints."""
        loader = eval_loader(
            self.val_set,
            batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            ignore_index=self.ignore_index,
        )
        scorer = SegMetrics(len(self.class_names), self.ignore_index, self.class_names)
        metrics, samples = evaluate(
            self.model, loader, scorer, device=self.device, autocast=self.autocast(), keep=self.num_vis
        )
        if self.dist.is_main:
            self.log.info(
                "iteration %d: mIoU %.4f, pixel acc %.4f, mean acc %.4f, fwIoU %.4f",
                self.iteration, metrics["miou"], metrics["pixel_acc"], metrics["mean_acc"], metrics["fwiou"],
            )  # fmt: skip
            self._log_val(metrics, samples)
            (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
            if metrics["miou"] > self.best_miou:
                self.best_miou = metrics["miou"]
                self.save("best.pt")
            self.save("last.pt")
        return metrics

    # ------------------------------------------------------------------ helpers
    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "best_miou": self.best_miou,
            "config": self.config,
            "rng": rng_state(),
        }

    def save(self, name: str) -> None:
        if self.dist.is_main:
            save_checkpoint(self.state_dict(), self.run_dir / "checkpoints" / name)

    def _resume(self, resume: bool | str) -> None:
        path = self.run_dir / "checkpoints" / "last.pt" if resume is True else Path(resume)
        ckpt = load_checkpoint(path, map_location="cpu")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])
        self.best_miou = float(ckpt["best_miou"])
        set_rng_state(ckpt["rng"])
        self.log.info("resumed from %s at iteration %d", path, self.iteration)

    def _log_train(self, loss: float, seconds: float) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        self.log.info("iteration %d/%d: loss %.4f, lr %.3g, %.2f s/it", self.iteration, self.max_iters, loss, lr,
                      seconds / self.log_interval)  # fmt: skip
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, self.iteration)
            self.writer.add_scalar("train/lr", lr, self.iteration)

    def _log_val(self, metrics: dict[str, Any], samples) -> None:
        if self.writer is None:
            return
        for key in ("miou", "pixel_acc", "mean_acc", "fwiou"):
            self.writer.add_scalar(f"val/{key}", metrics[key], self.iteration)
        self.writer.add_text("val/table", f"```\n{format_table(metrics)}\n```", self.iteration)
        if samples:
            # Samples differ in size: show each as its own row, padded to the widest.
            rows = [
                prediction_grid(denormalize(img[None], self.normalize), tgt[None], pred[None])
                for img, tgt, pred in samples
            ]
            width = max(r.shape[-1] for r in rows)
            rows = [F.pad(r, (0, width - r.shape[-1])) for r in rows]
            self.writer.add_image("val/predictions", torch.cat(rows, dim=-2), self.iteration)
        self.writer.flush()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
