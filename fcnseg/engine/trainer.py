"""The training loop: iteration-based, DDP-aware, resumable, readable top to bottom.

An optimizer step consumes ``batch_size x accumulate`` images on each of the processes torchrun
started, and DDP averages the gradients over all of them: the effective batch is
``batch_size x processes x accumulate`` images. The learning rate is used as configured; scaling
it with the effective batch is the user's explicit choice (printed at the start of every run).

A run loses at most the step in progress:

- ``last.pt`` is written atomically every ``checkpoint_interval`` steps and before and after
  each evaluation, so an evaluation that fails costs no steps;
- SIGTERM, SIGINT or SIGUSR2 (preemption, Ctrl-C, a time limit) lets the current step finish,
  writes ``last.pt`` and raises ``TrainingInterrupted``, whose message is the command that
  resumes the run;
- resuming restores weights, optimizer, schedule, gradient scaler, data position and every
  process's random generators, so an interrupted run ends where an uninterrupted one does;
- a non-finite loss stops the run before the weights change (``nan_policy=stop``, keeping the
  last good checkpoint) or skips that step (``nan_policy=skip``), on every process at once.

A run directory belongs to one run (``fcnseg.engine.run_dir``), and nothing is written into it
before the run is accepted there.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from fcnseg.data.loader import eval_loader, train_loader
from fcnseg.engine.checkpointer import restart_warnings, restore, resume_path, write_checkpoint
from fcnseg.engine.evaluator import evaluate, spread
from fcnseg.engine.loggers import Evaluation, ExperimentLogger, LoggerGroup, TensorBoardLogger
from fcnseg.engine.loss import SegLoss
from fcnseg.engine.optim import build_optimizer
from fcnseg.engine.preemption import StopSignals, TrainingInterrupted, shielded
from fcnseg.engine.run_dir import (
    check_room,
    check_validation_split,
    checkpoint_size,
    claim_run_dir,
    size_of,
)
from fcnseg.engine.runtime import Runtime, seed_everything
from fcnseg.engine.settings import TrainSettings
from fcnseg.engine.skips import SkippedUpdates
from fcnseg.engine.step import NonFiniteLossError, TrainStep
from fcnseg.engine.summary import run_summary
from fcnseg.metrics import SegMetrics
from fcnseg.models.builder import describe
from fcnseg.models.description import KEY
from fcnseg.models.norm import recalibrate_batch_norm
from fcnseg.utils.checkpoint import set_rng_state
from fcnseg.utils.distributed import (
    all_reduce_sum,
    broadcast_buffers,
    on_main,
    shared_run_dir,
)
from fcnseg.utils.logging import progress, setup_logging

__all__ = ["NonFiniteLossError", "Trainer", "TrainingInterrupted", "TrainSettings"]


class Trainer:
    """Trains ``model`` on ``train_set`` and evaluates it on ``val_set`` every ``eval_interval``.

    Everything the run writes goes to ``run_dir``: ``checkpoints/last.pt`` and ``best.pt`` (by
    validation mIoU), ``metrics.json`` (the last evaluation), ``train.log`` and what the
    ``loggers`` write (``tensorboard/`` by default). Under torchrun every process trains on its
    share of each batch, all of them use rank 0's ``run_dir``, and only rank 0 writes.

    Args:
        settings: the run's ``trainer.*`` settings.
        model: maps (N, 3, H, W) to logits (N, C, H, W).
        train_set, val_set: datasets yielding (image, mask) tensors.
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``).
        scheduler: ``optimizer -> LRScheduler``, stepped every iteration.
        loss: the training loss (its ``ignore_index`` is the label value excluded from the
            metrics too).
        run_dir: output folder.
        config: the run's resolved configuration, stored in checkpoints.
        class_names: one name per class.
        normalize: the input normalisation, to show images in TensorBoard.
        batching: ``pad`` or ``bucket``: how training batches of different image sizes are
            formed (``fcnseg.data.loader.train_loader``).
        resume_command: the command that resumes this run, shown when it is interrupted.
        runtime: the device, group and precision, when the caller set them up (else from
            ``settings``).
        loggers: ``(run_dir=, resume_from=) -> ExperimentLogger`` factories
            (``fcnseg.engine.loggers``), called on rank 0; TensorBoard alone by default.
    """

    def __init__(
        self,
        settings: TrainSettings,
        *,
        model: nn.Module,
        train_set: Dataset,
        val_set: Dataset,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[[torch.optim.Optimizer], Any],
        loss: SegLoss,
        run_dir: str | Path,
        config: dict[str, Any],
        class_names: Sequence[str],
        normalize: str = "imagenet",
        batching: str = "pad",
        resume_command: str | None = None,
        runtime: Runtime | None = None,
        loggers: Sequence[Callable[..., ExperimentLogger]] | None = None,
    ) -> None:
        s = self.settings = settings
        self.train_set, self.val_set, self.config = train_set, val_set, config
        self.class_names, self.ignore_index = list(class_names), loss.ignore_index
        self.normalize, self.batching, self.resume_command = normalize, batching, resume_command
        # What checkpoints say the network is (``fcnseg.models.description``), read before the
        # runtime wraps the model.
        self.description = describe(
            model, class_names=class_names, palette=config.get("dataset", {}).get("palette"),
            ignore_index=loss.ignore_index, normalize=normalize,
        )  # fmt: skip

        self.runtime = runtime or Runtime.from_settings(s)
        self.device, self.dist = self.runtime.device, self.runtime.dist
        self.run_dir = shared_run_dir(run_dir)
        restarts = restart_warnings(self.run_dir, s.resume) if self.dist.is_main else []
        # Nothing is written into the run directory before it is accepted for this run.
        self._lock = on_main(
            lambda: claim_run_dir(self.run_dir, resume=s.resume, overwrite=s.overwrite)
        )
        self.log = setup_logging(self.run_dir / "train.log", main_process=self.dist.is_main)
        for note in restarts:  # torchrun --max-restarts: a restart, or a command that cannot resume
            self.log.warning(note)
        seed_everything(s.seed + self.dist.rank)  # each process draws its own dropout masks

        self.model = self.runtime.prepare(model, sync_bn=s.sync_bn)
        self.optimizer = build_optimizer(optimizer, self.model)
        self.scheduler = scheduler(self.optimizer)
        self._cudnn_benchmark = torch.backends.cudnn.benchmark  # the caller's, put back by fit
        # Unwrapped once: `self.model` is what we save and evaluate, the step trains the DDP.
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = DistributedDataParallel(self.model, device_ids) if self.dist.enabled else self.model
        self.step = TrainStep(
            ddp, self.optimizer, self.scheduler, loss, runtime=self.runtime,
            accumulate=s.accumulate, keep_buffers=s.nan_policy == "skip",
            cudnn_benchmark=s.cudnn_benchmark,
        )  # fmt: skip

        self.iteration = 0
        self.best_miou = -1.0
        self.skips = SkippedUpdates(s.nan_policy, self.log)  # nan_policy, fp16 overflows
        self.pending_eval = False  # an evaluation is due at this iteration (e.g. cut short)
        self.metrics: dict[str, Any] = {}
        self._last_saved: int | None = None  # iteration held by run_dir's last.pt
        self._signals: StopSignals | None = None
        self._stopping = False  # every process agreed to stop after this step
        resumed = self._resume(s.resume) if s.resume else False
        # Before the first step: what the first evaluation and save need.
        check_validation_split(self.val_set)
        on_main(lambda: check_room(self.run_dir / "checkpoints", checkpoint_size(self.optimizer)))
        # Rank 0 alone logs; a resumed run's loggers drop what was logged after its checkpoint.
        makers = ([TensorBoardLogger] if loggers is None else loggers) if self.dist.is_main else []
        start = self.iteration if resumed else None
        self.loggers = LoggerGroup(make(run_dir=self.run_dir, resume_from=start) for make in makers)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Trains to ``max_iters`` and returns the last evaluation's metrics.

        Every way out (the end, a stop signal, an error) stops the loader's workers, closes
        the loggers and releases the run directory.

        Raises:
            TrainingInterrupted: a stop signal arrived; ``last.pt`` holds the last complete step.
            NonFiniteLossError: the loss was not finite under ``nan_policy=stop``.
        """
        s = self.settings
        loader = shielded(
            train_loader(
                self.train_set, batch_size=s.batch_size * s.accumulate,
                num_workers=s.num_workers, seed=s.seed, rank=self.dist.rank,
                world_size=self.dist.world_size, ignore_index=self.ignore_index,
                start_iter=self.iteration, pin_memory=self.device.type == "cuda",
                batching=self.batching,
            )
        )  # fmt: skip
        self._announce()
        if self.iteration >= s.max_iters:  # already complete: report its metrics again
            self.pending_eval = True
        bar = progress(
            total=s.max_iters, initial=self.iteration, desc="train", enabled=self.dist.is_main
        )
        with self.runtime.untouched_rng():
            batches = iter(loader)
        outcome = "failed"  # until the loop ends or a stop signal is honoured
        try:
            with StopSignals(self.log, self.dist) as self._signals:
                if s.bn_recalibration and self.iteration == 0:  # a new run, not a resumed one
                    self._recalibrate_batch_norm()
                self.step.module.train()
                tic = time.perf_counter()
                while not self._stopping and (self.pending_eval or self.iteration < s.max_iters):
                    if self.pending_eval:
                        self._evaluate_and_save()
                        tic = time.perf_counter()
                        continue
                    loss = self.run_step(*next(batches))
                    bar.update()
                    if self.iteration % s.log_interval == 0 or self.iteration == s.max_iters:
                        self._log_train(loss, time.perf_counter() - tic)
                        bar.set_postfix(loss=f"{loss:.4f}")
                        tic = time.perf_counter()
                    self.pending_eval = (
                        self.iteration % s.eval_interval == 0 or self.iteration == s.max_iters
                    )
                    if not (self.pending_eval or self._stopping) and (
                        self.iteration % s.checkpoint_interval == 0
                    ):
                        self.save("last.pt")
                if self._stopping:
                    outcome = "interrupted"
                    raise self._interrupted()
            for path in (self.run_dir / "checkpoints" / "best.pt", self.run_dir / "metrics.json"):
                self.loggers.log_artifact(path)  # kept with the run by loggers that keep files
            outcome = "finished"
        finally:
            self._signals = None
            batches.close()
            bar.close()
            self.loggers.close(outcome)
            torch.backends.cudnn.benchmark = self._cudnn_benchmark
            self.close()
        return self.metrics

    def run_step(self, images: torch.Tensor, targets: torch.Tensor) -> float:
        """One optimizer step (``TrainStep``), then ``nan_policy``; returns the mean loss."""
        result = self.step(images, targets, stop_requested=self._stop_requested())
        self._stopping = self._stopping or result.stop
        if not result.finite:
            self.skips.non_finite(
                result.loss, step=self.iteration + 1, parameters=self.model.parameters(),
                checkpoint=self.run_dir / "checkpoints" / "last.pt", saved_at=self._last_saved,
            )  # fmt: skip
        elif result.overflow:  # fp16: the scaler skipped this update; counted and said
            self.skips.overflow(step=self.iteration + 1, scale=self.step.scaler.get_scale())
        self.iteration += 1
        return result.loss

    def validate(self) -> dict[str, Any] | None:
        """Scores the validation split (whole images, exact under DDP); rank 0 logs it.

        Returns the metrics, or ``None`` when a stop signal cut the evaluation short (every
        process agrees). Random generators are left as they were, so evaluating does not change
        the training that follows.
        """
        broadcast_buffers(self.model)
        loader = shielded(
            eval_loader(
                self.val_set, batch_size=self.settings.eval_batch_size,
                num_workers=self.settings.num_workers, rank=self.dist.rank,
                world_size=self.dist.world_size, ignore_index=self.ignore_index,
            )
        )  # fmt: skip
        scorer = SegMetrics(len(self.class_names), self.ignore_index, self.class_names)
        with self.runtime.untouched_rng(), self.runtime.cudnn_benchmark(False):
            metrics, samples = evaluate(
                self.model, self._until_stop(loader), scorer, device=self.device,
                autocast=self.runtime.autocast(), keep=spread(len(loader), self.settings.num_vis),
                memory_format=self.runtime.memory_format,
            )  # fmt: skip
        flag = torch.tensor([float(self._stop_requested())], device=self.device)
        self._stopping = all_reduce_sum(flag).item() > 0 or self._stopping
        if self._stopping:
            return None
        if self.dist.is_main:
            self.log.info(
                "iteration %d: mIoU %.4f, pixel acc %.4f, mean acc %.4f, fwIoU %.4f",
                self.iteration, metrics["miou"], metrics["pixel_acc"], metrics["mean_acc"],
                metrics["fwiou"],
            )  # fmt: skip
            colors = self.config.get("dataset", {}).get("palette") or getattr(
                self.val_set, "palette", None
            )  # the dataset's own colours, as evaluate.py draws them
            evaluation = Evaluation(metrics, samples, self.normalize, colors)
            self.loggers.log_evaluation(evaluation, self.iteration)
        return metrics

    def close(self) -> None:
        """Releases the run directory (done by ``fit`` on every way out)."""
        if self._lock is not None:
            self._lock.release()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs, but the random generators (see ``save``)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.step.scaler.state_dict(),
            "iteration": self.iteration,
            "best_miou": self.best_miou,
            "skipped_steps": self.skips.count,
            "pending_eval": self.pending_eval,
            "data": self._data_position(),
            "config": self.config,
            **({KEY: self.description.to_dict()} if self.description is not None else {}),
        }

    def save(self, name: str) -> Path:
        """Writes ``run_dir/checkpoints/<name>`` (``write_checkpoint``) and returns its path.

        Every process must call it: each one's random generator states go into the file.
        """
        path = write_checkpoint(self.state_dict(), self.run_dir / "checkpoints" / name)
        if name == "last.pt":
            self._last_saved = self.iteration
        return path

    def _resume(self, resume: bool | str) -> bool:
        last = self.run_dir / "checkpoints" / "last.pt"
        path = resume_path(last, resume)
        if path is None:
            self.log.info("trainer.resume=auto: no %s yet, starting a new run", last)
            return False
        ckpt = restore(
            path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
            scaler=self.step.scaler,
        )  # fmt: skip
        self.iteration = int(ckpt["iteration"])
        self.best_miou = float(ckpt.get("best_miou", -1.0))
        self.skips.count = int(ckpt.get("skipped_steps", 0))
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
            seed_everything(self.settings.seed + self.dist.rank + 1_000_003 * self.iteration)
        self.log.info("resumed from %s at iteration %d", path, self.iteration)
        return True

    def _data_position(self) -> dict[str, int]:
        """What the data stream's position depends on besides the iteration."""
        s = self.settings
        return {
            "seed": s.seed,
            "world_size": self.dist.world_size,
            "batch_size": s.batch_size,
            "accumulate": s.accumulate,
        }

    # ------------------------------------------------------------------ helpers
    def _recalibrate_batch_norm(self) -> None:
        """``trainer.bn_recalibration`` training batches forward to average the BatchNorm
        statistics (``fcnseg.models.norm``), from a loader of their own and with the random
        generators put back: the training that follows is the one a run without it sees."""
        s = self.settings
        loader = train_loader(
            self.train_set, batch_size=s.batch_size, num_workers=s.num_workers, seed=s.seed,
            rank=self.dist.rank, world_size=self.dist.world_size, ignore_index=self.ignore_index,
            batching=self.batching,
        )  # fmt: skip
        with self.runtime.untouched_rng(), iter(shielded(loader)) as batches:
            first = itertools.islice(batches, s.bn_recalibration)
            with self.runtime.autocast():
                layers, seen = recalibrate_batch_norm(
                    self.model, (self.runtime.inputs(images) for images, _ in first)
                )
        if not layers:
            self.log.warning(
                "trainer.bn_recalibration=%d: the model has no BatchNorm layer with running "
                "statistics to recalibrate (frozen ones keep theirs)", s.bn_recalibration,
            )  # fmt: skip
            return
        self.log.info(
            "trainer.bn_recalibration=%d: the running statistics of %d BatchNorm layers "
            "averaged over %d training batches of %d images",
            s.bn_recalibration, layers, seen, s.batch_size,
        )  # fmt: skip

    def _stop_requested(self) -> bool:
        return self._signals is not None and self._signals.received is not None

    def _until_stop(self, loader: Iterable) -> Iterator:
        """``loader``'s batches until a stop signal arrives; closing it stops the workers."""
        with iter(loader) as batches:
            yield from itertools.takewhile(lambda _: not self._stop_requested(), batches)

    def _evaluate_and_save(self) -> None:
        if self._last_saved != self.iteration:  # an evaluation that fails costs no steps
            self.save("last.pt")
        metrics = self.validate()
        if metrics is None:  # cut short by a stop signal: the resumed run evaluates again
            return
        self.pending_eval = False
        self.metrics = metrics = {**metrics, "skipped_steps": self.skips.count}
        if self.dist.is_main:
            (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if metrics["miou"] > self.best_miou:
            self.best_miou = metrics["miou"]
            self.save("best.pt")
        self.save("last.pt")

    def _interrupted(self) -> TrainingInterrupted:
        path = self.save("last.pt")
        stop = TrainingInterrupted.after(
            self._signals.received if self._signals is not None else None,
            iteration=self.iteration, max_iters=self.settings.max_iters, checkpoint=path,
            resume=self.resume_command or f"trainer.resume=true with run directory {self.run_dir}",
        )  # fmt: skip
        if self.dist.is_main:
            self.log.warning(str(stop))
        return stop

    def _announce(self) -> None:
        """The start-up block (``engine/summary.py``) in the log and the loggers, which also
        record the resolved configuration."""
        lines = run_summary(
            config=self.config, settings=self.settings, runtime=self.runtime,
            sizes={"train": size_of(self.train_set), "val": size_of(self.val_set)},
            optimizer=self.optimizer, scheduler=self.scheduler, start=self.iteration,
            run_dir=self.run_dir, model=self.model,
        )  # fmt: skip
        for line in lines:
            self.log.info(line)
        self.loggers.log_text("run/summary", "\n\n".join(lines), self.iteration)
        self.loggers.log_params(self.config)

    def _log_train(self, loss: float, seconds: float) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        skipped = f", {self.skips.count} update(s) skipped" if self.skips.count else ""
        if skipped and self.step.scaler.is_enabled():
            skipped += f" (fp16 gradient scale {self.step.scaler.get_scale():g})"
        self.log.info(
            "iteration %d/%d: loss %.4f, lr %.3g, %.2f s/it%s",
            self.iteration, self.settings.max_iters, loss, lr,
            seconds / self.settings.log_interval, skipped,
        )  # fmt: skip
        scalars = {"train/loss": loss, "train/lr": lr}
        if self.skips.count:
            scalars["train/skipped_steps"] = self.skips.count
        if self.step.scaler.is_enabled():
            scalars["train/amp_scale"] = self.step.scaler.get_scale()
        self.loggers.log_scalars(scalars, self.iteration)
