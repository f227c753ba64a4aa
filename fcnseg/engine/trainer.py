"""The training loop: iteration-based, DDP-aware, resumable, readable top to bottom.

An optimizer step consumes ``batch_size x accumulate`` images on each of the processes torchrun
started, and DDP averages the gradients over all of them: the effective batch is
``batch_size x processes x accumulate`` images. The learning rate is used as configured; scaling
it with the effective batch is the user's explicit choice (printed at the start of every run).

A run loses at most the step in progress:

- ``last.pt`` is written atomically every ``checkpoint_interval`` steps and at each evaluation;
- SIGTERM or SIGINT (preemption, Ctrl-C) lets the current step finish, writes ``last.pt`` and
  raises ``TrainingInterrupted``, whose message is the command that resumes the run;
- resuming restores weights, optimizer, schedule, gradient scaler, data position and every
  process's random generators, so an interrupted run ends where an uninterrupted one does;
- a non-finite loss stops the run before the weights change (``nan_policy=stop``, keeping the
  last good checkpoint) or skips that step (``nan_policy=skip``), on every process at once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.tensorboard import SummaryWriter

from fcnseg.data.loader import eval_loader, train_loader
from fcnseg.engine.evaluator import evaluate
from fcnseg.engine.run_dir import check_room, claim_run_dir
from fcnseg.errors import UserError
from fcnseg.metrics import SegMetrics
from fcnseg.utils.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from fcnseg.utils.distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_sum,
    broadcast_buffers,
    broadcast_object,
    init_distributed,
    resolve_device,
    shared_run_dir,
)
from fcnseg.utils.logging import progress, setup_logging
from fcnseg.utils.visualize import log_evaluation

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NAN_POLICIES = ("stop", "skip")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# cuDNN autotunes every new input shape; past this many shapes (training on whole images of
# varying sizes rather than fixed crops) the tuning costs more than it saves and is turned off.
BENCHMARK_MAX_SHAPES = 8


class TrainingInterrupted(Exception):
    """A stop signal ended training after a complete step, which ``checkpoint`` holds.

    The message says how to resume.
    """

    def __init__(self, message: str, *, signum: int, iteration: int, checkpoint: Path) -> None:
        super().__init__(message)
        self.signum, self.iteration, self.checkpoint = signum, iteration, checkpoint

    @property
    def exit_code(self) -> int:
        """The shell's status for death by this signal: 143 for SIGTERM, 130 for SIGINT."""
        return 128 + self.signum


class NonFiniteLossError(UserError):
    """The loss (or the weights) stopped being finite, usually from too high a learning rate."""


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and PyTorch's global generators (initial weights, dropout)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_model(
    model: nn.Module, *, device: torch.device, channels_last: bool = False, sync_bn: bool = False
) -> nn.Module:
    """Puts ``model`` on ``device`` in the form it trains in.

    Args:
        model: the network.
        device: where it runs.
        channels_last: NHWC memory layout, which tensor-core convolutions (fp16/bf16 on recent
            GPUs) run without transposing.
        sync_bn: replace BatchNorm by SyncBatchNorm, whose statistics cover the batch of every
            process (PyTorch implements it on GPUs only); call it before DDP wraps the model.
    """
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def compile_model(model: nn.Module, mode: bool | str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile(model)`` for ``mode`` true or a compile mode's name, ``model`` for false.

    The compiled callable shares ``model``'s parameters: save and evaluate ``model`` itself.
    """
    if mode is False or mode is None:
        return model
    if mode is not True and mode not in COMPILE_MODES:
        raise UserError(
            f"trainer.compile={mode!r} is not one of false, true, {', '.join(COMPILE_MODES)}"
        )
    return torch.compile(model, mode=None if mode is True else mode)


class Trainer:
    """Trains ``model`` on ``train_set`` and evaluates it on ``val_set`` every ``eval_interval``.

    Everything the run writes goes to ``run_dir``: ``checkpoints/last.pt`` and ``best.pt`` (by
    validation mIoU), ``tensorboard/``, ``metrics.json`` (the last evaluation) and ``train.log``.
    Under torchrun every process trains on its share of each batch, all of them use rank 0's
    ``run_dir``, and only rank 0 writes.

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
        batch_size: images per process per forward pass (micro-batch).
        eval_batch_size: images per process per evaluation batch (1 scores each image alone).
        num_workers: loader processes per training process.
        device: ``auto``, ``cpu`` or ``cuda``.
        seed: seeds dropout, data order and augmentation.
        resume: ``False``; ``True`` (``run_dir/checkpoints/last.pt``, which must exist);
            ``"auto"`` (that file when it exists, else a new run: for jobs that a scheduler
            requeues with the same command); or a checkpoint path.
        amp: ``none``, ``bf16`` or ``fp16`` (with a gradient scaler) autocast.
        num_vis: images shown in TensorBoard at each evaluation.
        accumulate: micro-batches whose gradients are summed before each optimizer step.
        sync_bn: SyncBatchNorm across processes (CUDA only; one process needs none).
        channels_last: NHWC memory layout for the model and its inputs.
        compile: ``torch.compile`` the training forward: false, true or a compile mode.
        cudnn_benchmark: let cuDNN autotune convolutions for the fixed training crop size.
        nan_policy: on a non-finite loss, ``stop`` (raise ``NonFiniteLossError``) or ``skip``
            the update (counted as ``skipped_steps``).
        resume_command: the command that resumes this run, shown when it is interrupted.
        batching: ``pad`` or ``bucket``: how training batches of different image sizes are
            formed (``fcnseg.data.loader.train_loader``).
        overwrite: start a new run in a ``run_dir`` that holds another run's checkpoints
            (refused otherwise, unless ``resume`` continues that run).
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
        accumulate: int = 1,
        sync_bn: bool = False,
        channels_last: bool = False,
        compile: bool | str = False,
        cudnn_benchmark: bool = True,
        nan_policy: str = "stop",
        resume_command: str | None = None,
        batching: str = "pad",
        overwrite: bool = False,
    ) -> None:
        if amp not in AMP_DTYPES:
            raise UserError(f"trainer.amp={amp!r} is not one of {', '.join(AMP_DTYPES)}")
        if nan_policy not in NAN_POLICIES:
            raise UserError(f"trainer.nan_policy={nan_policy!r} is not one of stop, skip")
        if loss_reduction not in ("mean", "sum"):
            raise UserError(f"loss.reduction={loss_reduction!r} is not one of mean, sum")
        minimum = {
            "max_iters": (max_iters, 1),
            "eval_interval": (eval_interval, 1),
            "log_interval": (log_interval, 1),
            "checkpoint_interval": (checkpoint_interval, 1),
            "batch_size": (batch_size, 1),
            "eval_batch_size": (eval_batch_size, 1),
            "accumulate": (accumulate, 1),
            "num_workers": (num_workers, 0),
            "num_vis": (num_vis, 0),
            "seed": (seed, 0),
        }
        for key, (value, least) in minimum.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise UserError(f"trainer.{key}={value!r} is not a whole number")
            if value < least:
                raise UserError(f"trainer.{key}={value} must be at least {least}")
        self.config = config
        self.class_names = list(class_names)
        self.ignore_index = ignore_index
        self.normalize = normalize
        self.loss_reduction = loss_reduction
        self.max_iters, self.eval_interval = max_iters, eval_interval
        self.log_interval, self.checkpoint_interval = log_interval, checkpoint_interval
        self.batch_size, self.eval_batch_size, self.accumulate = (
            batch_size,
            eval_batch_size,
            accumulate,
        )
        self.num_workers, self.seed, self.num_vis = num_workers, seed, num_vis
        self.nan_policy, self.resume_command = nan_policy, resume_command
        self.batching = batching
        self.train_set, self.val_set = train_set, val_set

        # Process LOCAL_RANK of a machine drives its GPU LOCAL_RANK.
        self.device = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
        self.dist = init_distributed(self.device)
        self.run_dir = shared_run_dir(run_dir)
        # Nothing is written into the run directory before it is accepted for this run.
        self._lock = self._on_main(
            lambda: claim_run_dir(self.run_dir, resume=resume, overwrite=overwrite)
        )
        self.log = setup_logging(self.run_dir / "train.log", main_process=self.dist.is_main)
        seed_everything(seed + self.dist.rank)  # each process draws its own dropout masks

        if sync_bn and self.dist.enabled and self.device.type != "cuda":
            raise UserError(
                "trainer.sync_bn=true needs CUDA devices: PyTorch's SyncBatchNorm has no CPU "
                "version"
            )
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = prepare_model(
            model,
            device=self.device,
            channels_last=channels_last,
            sync_bn=sync_bn and self.dist.enabled,
        )
        try:
            self.optimizer = optimizer([p for p in self.model.parameters() if p.requires_grad])
        except ValueError as err:  # torch's own checks: "Invalid learning rate: -1.0"
            raise UserError(f"the optimizer refused its settings (optimizer.*): {err}") from err
        for group in self.optimizer.param_groups:  # SGD lets a NaN learning rate through
            if not 0 <= float(group["lr"]) < math.inf:
                raise UserError(
                    f"the optimizer refused its settings (optimizer.*): Invalid learning rate: "
                    f"{group['lr']}"
                )
        self.scheduler = scheduler(self.optimizer)
        self.amp_dtype = AMP_DTYPES[amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        weight = (
            torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        )
        self.class_weights = weight.to(self.device) if weight is not None else None
        if amp == "fp16" and loss_reduction == "sum":
            self.log.warning(
                "trainer.amp=fp16 with loss.reduction=sum: a loss summed over every pixel has "
                "gradients that can exceed fp16's range (65504); the paper's summed-loss recipe "
                "trains in fp32"
            )
        self.benchmark = cudnn_benchmark and self.device.type == "cuda"
        if self.benchmark:
            torch.backends.cudnn.benchmark = True
        self._shapes: set[tuple[int, ...]] = set()

        self.iteration = 0
        self.best_miou = -1.0
        self.skipped_steps = 0
        self.pending_eval = (
            False  # an evaluation is due at this iteration (e.g. cut short by a signal)
        )
        self.metrics: dict[str, Any] = {}
        self._last_saved: int | None = None  # iteration held by run_dir's last.pt
        self._signals: _StopSignals | None = None
        self._stopping = False  # every process agreed to stop after this step
        resumed = self._resume(resume) if resume else False
        self._preflight()
        # Unwrapped once: `self.model` is what we save and evaluate, `self.ddp` what we train.
        self.ddp = (
            DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            if self.dist.enabled
            else self.model
        )
        self.train_forward = compile_model(self.ddp, compile)
        self.writer = None
        if self.dist.is_main:
            # On resume, drop the events the interrupted run logged after its checkpoint.
            purge = self.iteration + 1 if resumed else None
            self.writer = SummaryWriter(self.run_dir / "tensorboard", purge_step=purge)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Trains to ``max_iters`` and returns the last evaluation's metrics.

        Raises:
            TrainingInterrupted: SIGTERM/SIGINT arrived; ``last.pt`` holds the last complete step.
            NonFiniteLossError: the loss was not finite under ``nan_policy=stop``.
        """
        loader = _shielded(
            train_loader(
                self.train_set,
                batch_size=self.batch_size * self.accumulate,
                num_workers=self.num_workers,
                seed=self.seed,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                ignore_index=self.ignore_index,
                start_iter=self.iteration,
                pin_memory=self.device.type == "cuda",
                batching=self.batching,
            )
        )
        self._announce()
        self._stopping = False
        if self.iteration >= self.max_iters:  # already complete: report its metrics again
            self.pending_eval = True
        bar = progress(
            total=self.max_iters, initial=self.iteration, desc="train", enabled=self.dist.is_main
        )
        with self._rng_untouched():
            batches = iter(loader)
        try:
            with _StopSignals(self.log, self.dist) as self._signals:
                self.ddp.train()
                tic = time.perf_counter()
                while not self._stopping and (self.pending_eval or self.iteration < self.max_iters):
                    if self.pending_eval:
                        self._evaluate_and_save()
                        tic = time.perf_counter()
                        continue
                    images, targets = next(batches)
                    loss = self.step(images, targets)
                    self.iteration += 1
                    bar.update()
                    if self.iteration % self.log_interval == 0 or self.iteration == self.max_iters:
                        self._log_train(loss, time.perf_counter() - tic)
                        bar.set_postfix(loss=f"{loss:.4f}")
                        tic = time.perf_counter()
                    self.pending_eval = (
                        self.iteration % self.eval_interval == 0 or self.iteration == self.max_iters
                    )
                    if (
                        not (self.pending_eval or self._stopping)
                        and self.iteration % self.checkpoint_interval == 0
                    ):
                        self.save("last.pt")
                if self._stopping:
                    raise self._interrupted()
        finally:  # every way out: return, interrupt, error
            self._signals = None
            _close(batches)
            bar.close()
            if self.writer is not None:
                self.writer.close()  # reopened by any later write
            self.close()
        return self.metrics

    def step(self, images: torch.Tensor, targets: torch.Tensor) -> float:
        """One optimizer step on this process's share of the global batch.

        The batch is cut into ``accumulate`` micro-batches whose gradients add up (DDP averages
        them over processes after the last one only); each micro-batch's loss is divided by
        ``accumulate``, so the gradient is the mean over micro-batches and processes, as Caffe's
        ``iter_size`` made it. Returns that mean loss, the same on every process.
        """
        self._note_shape(images)
        # A non-finite forward also corrupts BatchNorm's running statistics: skipping a step
        # must put them back.
        buffers = [b.clone() for b in self.model.buffers()] if self.nan_policy == "skip" else []
        self.optimizer.zero_grad(set_to_none=True)
        if len(images) < self.accumulate:
            raise ValueError(
                f"a batch of {len(images)} cannot make {self.accumulate} micro-batches"
            )
        chunks = list(
            zip(images.tensor_split(self.accumulate), targets.tensor_split(self.accumulate))
        )
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(chunks):
            with self._grad_sync(last=i == len(chunks) - 1):
                loss = self._loss(x, y) / len(chunks)
                self.scaler.scale(loss).backward()
            total += loss.detach()
        value = self._agree_on_step(total)
        if math.isfinite(value):
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self._on_non_finite(value, buffers)
        self.scheduler.step()
        return value

    def validate(self) -> dict[str, Any] | None:
        """Scores the validation split (whole images, exact under DDP); rank 0 logs it.

        Returns the metrics, or ``None`` when a stop signal cut the evaluation short (every
        process agrees). Random generators are left as they were, so evaluating does not change
        the training that follows.
        """
        broadcast_buffers(self.model)
        loader = _shielded(
            eval_loader(
                self.val_set,
                batch_size=self.eval_batch_size,
                num_workers=self.num_workers,
                rank=self.dist.rank,
                world_size=self.dist.world_size,
                ignore_index=self.ignore_index,
            )
        )
        scorer = SegMetrics(len(self.class_names), self.ignore_index, self.class_names)
        with self._rng_untouched(), _cudnn_benchmark(False):
            metrics, samples = evaluate(
                self.model,
                self._until_stop(loader),
                scorer,
                device=self.device,
                autocast=self.autocast(),
                keep=self.num_vis,
            )
        if self._agree_to_stop():
            return None
        if self.dist.is_main:
            self.log.info(
                "iteration %d: mIoU %.4f, pixel acc %.4f, mean acc %.4f, fwIoU %.4f",
                self.iteration, metrics["miou"], metrics["pixel_acc"], metrics["mean_acc"],
                metrics["fwiou"],
            )  # fmt: skip
            self._log_val(metrics, samples)
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs, but the random generators (see ``save``)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "best_miou": self.best_miou,
            "skipped_steps": self.skipped_steps,
            "pending_eval": self.pending_eval,
            "data": self._data_position(),
            "config": self.config,
        }

    def save(self, name: str) -> Path:
        """Writes ``run_dir/checkpoints/<name>`` from rank 0 and returns its path.

        Every process must call it: each one's random generator states go into the file. Weights
        that are not finite are never written (the previous file stays).
        """
        path = self.run_dir / "checkpoints" / name
        finite = [
            torch.isfinite(t).all()
            for t in self.model.state_dict().values()
            if t.is_floating_point()
        ]
        if finite and not bool(torch.stack(finite).all()):
            raise NonFiniteLossError(
                f"the weights are not finite at iteration {self.iteration}; {path} was left as "
                f"it was"
            )
        state = self.state_dict()
        state["rng"] = all_gather_object(rng_state())
        self._on_main(lambda: _save_or_explain(state, path))
        if name == "last.pt":
            self._last_saved = self.iteration
        return path

    def _resume(self, resume: bool | str) -> bool:
        last = self.run_dir / "checkpoints" / "last.pt"
        if resume == "auto":
            if not last.is_file():
                self.log.info("trainer.resume=auto: no %s yet, starting a new run", last)
                return False
            path = last
        elif resume is True:
            if not last.is_file():
                raise UserError(
                    f"trainer.resume=true continues from {last}, which does not exist; give the "
                    f"interrupted run's directory (hydra.run.dir=...) or a checkpoint "
                    f"(trainer.resume=PATH)"
                )
            path = last
        else:
            path = Path(resume)
        ckpt = load_checkpoint(path, map_location="cpu")
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise UserError(
                f"checkpoint {path} does not fit this run's model or optimizer "
                f"({_first_mismatch(err)})"
            ) from err
        if self.scaler.is_enabled() and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])
        self.best_miou = float(ckpt.get("best_miou", -1.0))
        self.skipped_steps = int(ckpt.get("skipped_steps", 0))
        self.pending_eval = bool(ckpt.get("pending_eval", False))
        self._last_saved = self.iteration if path.resolve() == last.resolve() else None
        saved_position, position = ckpt.get("data"), self._data_position()
        if saved_position is not None and saved_position != position:
            self.log.warning(
                "the checkpoint's data stream was %s and is now %s: the samples after iteration %d "
                "differ from those an uninterrupted run would have seen",
                saved_position, position, self.iteration,
            )  # fmt: skip
        states = ckpt.get("rng")
        if isinstance(states, list) and len(states) == self.dist.world_size:
            set_rng_state(states[self.dist.rank])
        else:  # another number of processes: fresh, but still seeded, streams
            seed_everything(self.seed + self.dist.rank + 1_000_003 * self.iteration)
        self.log.info("resumed from %s at iteration %d", path, self.iteration)
        return True

    def _data_position(self) -> dict[str, int]:
        """What the data stream's position depends on besides the iteration."""
        return {
            "seed": self.seed,
            "world_size": self.dist.world_size,
            "batch_size": self.batch_size,
            "accumulate": self.accumulate,
        }

    def close(self) -> None:
        """Releases the run directory's lock (done by ``fit`` on every way out)."""
        if self._lock is not None:
            self._lock.release()

    def _on_main(self, work: Callable[[], Any]) -> Any:
        """Runs ``work`` on rank 0; a ``UserError`` it raises is raised on every process.

        The other processes would otherwise wait for rank 0 in the next collective.
        """
        result, message = None, None
        if self.dist.is_main:
            try:
                result = work()
            except UserError as err:
                message = str(err)
        if self.dist.enabled:
            message = broadcast_object(message)
        if message is not None:
            raise UserError(message)
        return result

    def _preflight(self) -> None:
        """Checks, before the first step, what the first evaluation and save will need."""
        try:
            size = len(self.val_set)
        except TypeError:
            size = None
        if size == 0:
            raise UserError("the validation split is empty: the run could never be evaluated")
        if size:
            self.val_set[0]  # readable through the evaluation transform (raises a UserError)
        self._on_main(
            lambda: check_room(self.run_dir / "checkpoints", _checkpoint_bytes(self.optimizer))
        )

    # ------------------------------------------------------------------ helpers
    def autocast(self) -> torch.autocast:
        return torch.autocast(
            self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        )

    def _loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        targets = targets.to(self.device, non_blocking=True)
        with self.autocast():
            logits = self.train_forward(images)
        # The softmax in float32: in half precision the small probabilities underflow.
        return F.cross_entropy(
            logits.float(),
            targets,
            weight=self.class_weights,
            ignore_index=self.ignore_index,
            reduction=self.loss_reduction,
        )

    def _grad_sync(self, *, last: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces gradients after the last micro-batch only."""
        if self.dist.enabled and not last:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def _agree_on_step(self, loss: torch.Tensor) -> float:
        """One all-reduce per step: the mean loss over processes, and whether any must stop."""
        received = self._signals is not None and self._signals.received is not None
        status = torch.stack([loss.float(), torch.tensor(float(received), device=loss.device)])
        total_loss, stops = all_reduce_sum(status).tolist()
        if stops > 0:
            self._stopping = True
        return total_loss / self.dist.world_size

    def _agree_to_stop(self) -> bool:
        received = self._signals is not None and self._signals.received is not None
        flag = all_reduce_sum(torch.tensor([float(received)], device=self.device))
        self._stopping = self._stopping or bool(flag.item() > 0)
        return self._stopping

    def _on_non_finite(self, value: float, buffers: list[torch.Tensor]) -> None:
        """Applies ``nan_policy`` to a step whose loss is ``value`` (identical on every process).

        ``buffers`` are the model's buffers from before the step, restored when it is skipped.
        """
        step = self.iteration + 1
        if self.nan_policy == "stop":
            last = self.run_dir / "checkpoints" / "last.pt"
            if self._last_saved is not None:
                kept = f"the last good checkpoint, {last} (iteration {self._last_saved}), is kept"
            else:
                kept = "no checkpoint had been written yet"
            raise NonFiniteLossError(
                f"the training loss is {value} at iteration {step}; training stopped before "
                f"updating the weights and {kept} (lower the learning rate, or set "
                f"trainer.nan_policy=skip)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for buffer, saved in zip(self.model.buffers(), buffers):
                buffer.copy_(saved)
        self.skipped_steps += 1
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            raise NonFiniteLossError(
                f"the weights are not finite at iteration {step}: skipping steps cannot recover; "
                f"resume from an earlier checkpoint with a lower learning rate"
            )
        self.log.warning(
            "iteration %d: loss %s, update skipped (%d skipped so far)",
            step,
            value,
            self.skipped_steps,
        )

    def _note_shape(self, images: torch.Tensor) -> None:
        if not self.benchmark or tuple(images.shape) in self._shapes:
            return
        self._shapes.add(tuple(images.shape))
        if len(self._shapes) > BENCHMARK_MAX_SHAPES:
            self.benchmark = torch.backends.cudnn.benchmark = False
            self.log.info(
                "training inputs have more than %d shapes: cuDNN autotuning turned off",
                BENCHMARK_MAX_SHAPES,
            )

    def _until_stop(self, loader: Iterable) -> Iterator:
        """``loader``'s batches until a stop signal arrives; closing it stops the workers."""
        batches = iter(loader)
        try:
            for batch in batches:
                if self._signals is not None and self._signals.received is not None:
                    return
                yield batch
        finally:
            _close(batches)

    def _rng_untouched(self) -> contextlib.AbstractContextManager:
        """Restores the torch generators afterwards (a loader draws its base seed from them)."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    def _evaluate_and_save(self) -> None:
        if self._last_saved != self.iteration:  # an evaluation that fails costs no steps
            self.save("last.pt")
        metrics = self.validate()
        if metrics is None:  # cut short by a stop signal: the resumed run evaluates again
            return
        self.pending_eval = False
        self.metrics = metrics
        if self.dist.is_main:
            (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if metrics["miou"] > self.best_miou:
            self.best_miou = metrics["miou"]
            self.save("best.pt")
        self.save("last.pt")

    def _interrupted(self) -> TrainingInterrupted:
        path = self.save("last.pt")
        received = self._signals.received if self._signals is not None else None
        signum = received or signal.SIGTERM
        cause = signal.Signals(received).name if received else "a stop signal to another process"
        how = self.resume_command or f"trainer.resume=true with run directory {self.run_dir}"
        message = (
            f"training stopped by {cause} after iteration {self.iteration}/{self.max_iters}; "
            f"{path} holds it. Resume with:\n  {how}"
        )
        if self.dist.is_main:
            self.log.warning(message)
        return TrainingInterrupted(
            message, signum=int(signum), iteration=self.iteration, checkpoint=path
        )

    def _announce(self) -> None:
        group = self.optimizer.param_groups[0]
        lr = group.get("initial_lr", group["lr"])
        self.log.info(
            "training iterations %d-%d on %s; run directory %s",
            self.iteration + 1, self.max_iters, self.device, self.run_dir,
        )  # fmt: skip
        self.log.info(
            "effective batch: %d images per process x %d process(es) x %d accumulation "
            "step(s) = %d images per optimizer step; learning rate %g as configured (not scaled "
            "with the batch)",
            self.batch_size, self.dist.world_size, self.accumulate,
            self.batch_size * self.dist.world_size * self.accumulate, lr,
        )  # fmt: skip

    def _log_train(self, loss: float, seconds: float) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        self.log.info(
            "iteration %d/%d: loss %.4f, lr %.3g, %.2f s/it",
            self.iteration, self.max_iters, loss, lr, seconds / self.log_interval,
        )  # fmt: skip
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, self.iteration)
            self.writer.add_scalar("train/lr", lr, self.iteration)
            if self.skipped_steps:
                self.writer.add_scalar("train/skipped_steps", self.skipped_steps, self.iteration)

    def _log_val(self, metrics: dict[str, Any], samples) -> None:
        if self.writer is not None:
            log_evaluation(self.writer, metrics, samples, self.iteration, self.normalize)


class _StopSignals:
    """While active, SIGTERM and SIGINT ask the training loop to stop after the current step.

    torchrun forwards the signal it receives to every worker, which may have had it already from
    the terminal (Ctrl-C) or the scheduler: a repeat within ``repeat_window`` seconds is that same
    request. A later repeat has the signal's usual effect, so a second Ctrl-C still aborts at once
    (``last.pt`` stays readable: checkpoints are written atomically).
    """

    def __init__(
        self, log: logging.Logger, dist: DistInfo | None = None, repeat_window: float = 5.0
    ) -> None:
        self.log, self.repeat_window = log, repeat_window
        enabled = dist is not None and dist.enabled
        self.who = f"process {dist.rank} of {dist.world_size}" if enabled else "this process"
        self.received: int | None = None
        self._at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received is None:
            self.received, self._at = signum, time.monotonic()
            self.log.warning(
                "%s received by %s: finishing the current step, then saving last.pt",
                signal.Signals(signum).name, self.who,
            )  # fmt: skip
        elif time.monotonic() - self._at > self.repeat_window:
            self.__exit__()
            signal.raise_signal(signum)


class _IgnoreStopSignals:
    """DataLoader worker start-up: workers leave SIGTERM/SIGINT to the training process.

    A scheduler signals every process of a job; a loader worker killed by it would make the next
    batch fail instead of letting the step finish and the checkpoint be written.
    """

    def __init__(self, then: Callable[[int], None] | None = None) -> None:
        self.then = then

    def __call__(self, worker_id: int) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if self.then is not None:
            self.then(worker_id)


def _shielded(loader: DataLoader) -> DataLoader:
    if loader.num_workers > 0 and not isinstance(loader.worker_init_fn, _IgnoreStopSignals):
        loader.worker_init_fn = _IgnoreStopSignals(loader.worker_init_fn)
    return loader


def _checkpoint_bytes(optimizer: torch.optim.Optimizer) -> int:
    """An estimate of a checkpoint's size: the weights and the optimizer's per-weight buffers
    (momentum: one; Adam's moments: two), which exist only after the first step."""
    weights, slots = 0, 0
    for group in optimizer.param_groups:
        weights += sum(p.numel() * p.element_size() for p in group["params"])
        slots = max(slots, 2 if "betas" in group else int(bool(group.get("momentum", 0))))
    return weights * (1 + slots)


def _save_or_explain(state: dict[str, Any], path: Path) -> None:
    """``save_checkpoint`` whose failure says which file, why, and that the previous is intact."""
    try:
        save_checkpoint(state, path)
    except (OSError, RuntimeError) as err:
        kept = f"the previous {path.name} is intact" if path.is_file() else "nothing was written"
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
        needed = sum(t.numel() * t.element_size() for t in _tensors(state))
        if free < needed or getattr(err, "errno", None) == errno.ENOSPC:
            why = (
                f"no space left on device: needs ~{needed / 2**20:.0f} MB, "
                f"{free / 2**20:.0f} MB free"
            )
        else:
            why = getattr(err, "strerror", None) or " ".join(str(err).split())[:200]
        raise UserError(f"cannot write checkpoint {path} ({why}); {kept}") from err


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)


def _first_mismatch(err: BaseException) -> str:
    """The line of a ``load_state_dict`` error that names the first mismatched entry."""
    lines = [" ".join(line.split()) for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if not line.startswith("Error(s) in loading")]
    return (named or lines or [type(err).__name__])[0][:300]


def _close(batches: Iterator) -> None:
    close = getattr(batches, "close", None)
    if close is not None:
        close()


@contextlib.contextmanager
def _cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """Evaluation runs on whole images of many sizes, which autotuning would re-tune each."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous
