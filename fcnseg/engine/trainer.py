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

``fit`` is the loop alone; the progress bar, log lines, evaluations, checkpoints and the stop on
signal are hooks (``fcnseg.engine.hooks``), and so is whatever users add (``hooks=``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from fcnseg.data.loader import eval_loader, train_loader
from fcnseg.engine.checkpointer import restart_warnings, resume_trainer, write_checkpoint
from fcnseg.engine.evaluator import evaluate, spread
from fcnseg.engine.hooks import (
    BatchNormRecalibration,
    Checkpointer,
    Hook,
    PeriodicEvaluation,
    Progress,
    StopOnSignal,
    TrainLog,
)
from fcnseg.engine.loggers import Evaluation, ExperimentLogger, LoggerGroup, TensorBoardLogger
from fcnseg.engine.loss import SegLoss
from fcnseg.engine.optim import build_optimizer
from fcnseg.engine.preemption import StopSignals, TrainingInterrupted, shielded
from fcnseg.engine.record import RunRecord
from fcnseg.engine.run_dir import (
    check_room,
    check_validation_split,
    checkpoint_size,
    claim_run_dir,
)
from fcnseg.engine.runtime import Runtime, seed_everything
from fcnseg.engine.settings import TrainSettings
from fcnseg.engine.skips import SkippedUpdates
from fcnseg.engine.step import NonFiniteLossError, TrainStep
from fcnseg.metrics import SegMetrics
from fcnseg.models.description import KEY, describe
from fcnseg.utils.distributed import (
    all_reduce_sum,
    broadcast_buffers,
    on_main,
    shared_run_dir,
)
from fcnseg.utils.logging import setup_logging

__all__ = [
    "Hook",
    "NonFiniteLossError",
    "RunRecord",
    "Trainer",
    "TrainingInterrupted",
    "TrainSettings",
]


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
        record: the run's facts: classes, palette, normalisation, names, the resolved
            configuration stored in checkpoints (``RunRecord``).
        batching: ``pad`` or ``bucket``: how training batches of different image sizes are
            formed (``fcnseg.data.loader.train_loader``).
        runtime: the device, group and precision, when the caller set them up (else from
            ``settings``).
        loggers: ``(run_dir=, resume_from=) -> ExperimentLogger`` factories
            (``fcnseg.engine.loggers``), called on rank 0; TensorBoard alone by default.
        hooks: the user's ``Hook``s, called in this order between the engine's own
            (``fcnseg.engine.hooks``).
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
        record: RunRecord,
        batching: str = "pad",
        runtime: Runtime | None = None,
        loggers: Sequence[Callable[..., ExperimentLogger]] | None = None,
        hooks: Sequence[Hook] = (),
    ) -> None:
        s = self.settings = settings
        self.train_set, self.val_set, self.record = train_set, val_set, record
        self.class_names, self.ignore_index = list(record.class_names), loss.ignore_index
        self.batching = batching
        # What checkpoints say the network is (``fcnseg.models.description``), read before the
        # runtime wraps the model.
        self.description = describe(
            model, class_names=self.class_names, palette=record.palette,
            ignore_index=loss.ignore_index, normalize=record.normalize,
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
        # The user's hooks see the step and decide before the engine evaluates and saves.
        recalibration = [BatchNormRecalibration()] if s.bn_recalibration else []
        self.hooks: list[Hook] = [
            *recalibration, Progress(), TrainLog(), *hooks, PeriodicEvaluation(), Checkpointer(),
            StopOnSignal(),
        ]  # fmt: skip
        for hook in self.hooks:
            if not isinstance(hook, Hook):
                raise TypeError(f"{hook!r} is not a fcnseg.engine.hooks.Hook")
            hook.trainer = self
        names = [hook.name for hook in self.hooks]
        if len(set(names)) < len(names):  # their states would share a key in last.pt
            twice = next(name for name in names if names.count(name) > 1)
            raise TypeError(f"two hooks are named {twice}: override `name` in one of them")

        self.iteration = 0
        self.best_miou = -1.0
        self.skips = SkippedUpdates(s.nan_policy, self.log)  # nan_policy, fp16 overflows
        self.pending_eval = False  # an evaluation is due at this iteration (e.g. cut short)
        self.metrics: dict[str, Any] = {}
        self.last_loss = float("nan")  # the latest step's mean loss, for the hooks
        self.last_saved: int | None = None  # iteration held by run_dir's last.pt
        self.outcome = "failed"  # until fit ends or a stop signal is honoured
        self._signals: StopSignals | None = None
        self.stopping = False  # every process agreed to stop after this step
        resumed = resume_trainer(self, s.resume) if s.resume else False
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

        Every way out (the end, a stop signal, an error) calls the hooks' ``after_train``,
        stops the loader's workers and releases the run directory.

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
        with self.runtime.untouched_rng():
            batches = iter(loader)
        self.outcome = "failed"
        try:
            with StopSignals(self.log, self.dist) as self._signals:
                self.step.module.train()
                self._call("before_train")
                while self.iteration < s.max_iters:
                    self.last_loss = self.run_step(*next(batches))
                    self._call("after_step")
            self.outcome = "finished"
        except TrainingInterrupted:
            self.outcome = "interrupted"
            raise
        finally:
            self._signals = None
            batches.close()
            try:
                self._call("after_train")
            finally:
                torch.backends.cudnn.benchmark = self._cudnn_benchmark
                self.close()
        return self.metrics

    def run_step(self, images: torch.Tensor, targets: torch.Tensor) -> float:
        """One optimizer step (``TrainStep``), then ``nan_policy``; returns the mean loss."""
        result = self.step(images, targets, stop_requested=self._stop_requested())
        self.stopping = self.stopping or result.stop
        scaler = self.step.scaler
        self.skips.note(
            result, step=self.iteration + 1, parameters=self.model.parameters(),
            scale=scaler.get_scale() if scaler.is_enabled() else None,
            checkpoint=self.run_dir / "checkpoints" / "last.pt", saved_at=self.last_saved,
        )  # fmt: skip
        self.iteration += 1
        return result.loss

    def evaluate(self) -> dict[str, Any] | None:
        """Scores the live weights (``validate``), then calls every hook's ``after_eval``.

        ``last.pt`` is written first, so an evaluation that fails costs no steps. Returns the
        metrics, or ``None`` when a stop signal cut the evaluation short.
        """
        if self.last_saved != self.iteration:
            self.save("last.pt")
        metrics = self.validate()
        if metrics is None:  # cut short by a stop signal: the resumed run evaluates again
            return None
        self.metrics = {**metrics, "skipped_steps": self.skips.count}
        self._call("after_eval", self.metrics)
        return self.metrics

    def validate(self, model: nn.Module | None = None, name: str = "val") -> dict[str, Any] | None:
        """Scores ``model`` (the live weights by default) on the validation split (whole
        images, exact under DDP); rank 0 logs it under ``name`` (``val/miou`` ...).

        Returns the metrics, or ``None`` when a stop signal cut the evaluation short (every
        process agrees). Random generators are left as they were, so evaluating does not change
        the training that follows.
        """
        model = self.model if model is None else model
        broadcast_buffers(model)
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
                model, self._until_stop(loader), scorer, device=self.device,
                autocast=self.runtime.autocast(), keep=spread(len(loader), self.settings.num_vis),
                memory_format=self.runtime.memory_format,
            )  # fmt: skip
        flag = torch.tensor([float(self._stop_requested())], device=self.device)
        self.stopping = all_reduce_sum(flag).item() > 0 or self.stopping
        if self.stopping:
            return None
        if self.dist.is_main:
            self.log.info(
                "iteration %d: %smIoU %.4f, pixel acc %.4f, mean acc %.4f, fwIoU %.4f",
                self.iteration, "" if name == "val" else f"{name} ", metrics["miou"],
                metrics["pixel_acc"], metrics["mean_acc"], metrics["fwiou"],
            )  # fmt: skip
            colors = self.record.palette or getattr(self.val_set, "palette", None)
            evaluation = Evaluation(metrics, samples, self.record.normalize, colors, prefix=name)
            self.loggers.log_evaluation(evaluation, self.iteration)
        return metrics

    def close(self) -> None:
        """Releases the run directory (done by ``fit`` on every way out)."""
        if self._lock is not None:
            self._lock.release()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs, but the random generators (see ``save``)."""
        hooks = {hook.name: state for hook in self.hooks if (state := hook.state_dict())}
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.step.scaler.state_dict(),
            "iteration": self.iteration,
            "best_miou": self.best_miou,
            "skipped_steps": self.skips.count,
            "pending_eval": self.pending_eval,
            "data": self.data_position(),
            "config": dict(self.record.config),
            **({"hooks": hooks} if hooks else {}),
            **({KEY: self.description.to_dict()} if self.description is not None else {}),
        }

    def save(self, name: str, *, weights: dict[str, torch.Tensor] | None = None) -> Path:
        """Writes ``run_dir/checkpoints/<name>`` (``write_checkpoint``) and returns its path.

        ``weights`` replace the live model's (``best.pt`` of EMA weights), which the file then
        names in ``weights``. Every process must call it: each one's random generator states go
        into the file.
        """
        state = self.state_dict()
        state["weights"] = "live" if weights is None else "ema"
        if weights is not None:
            state["model"] = weights
        path = write_checkpoint(state, self.run_dir / "checkpoints" / name)
        if name == "last.pt":
            self.last_saved = self.iteration
        return path

    def data_position(self) -> dict[str, int]:
        """What the data stream's position depends on besides the iteration."""
        s = self.settings
        return {
            "seed": s.seed,
            "world_size": self.dist.world_size,
            "batch_size": s.batch_size,
            "accumulate": s.accumulate,
        }

    # ------------------------------------------------------------------ helpers
    def _stop_requested(self) -> bool:
        return self._signals is not None and self._signals.received is not None

    def _until_stop(self, loader: Iterable) -> Iterator:
        """``loader``'s batches until a stop signal arrives; closing it stops the workers."""
        with iter(loader) as batches:
            yield from itertools.takewhile(lambda _: not self._stop_requested(), batches)

    def _call(self, event: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, event)(*args)

    def interrupted(self) -> TrainingInterrupted:
        """Saves ``last.pt`` and says how to resume (``StopOnSignal``)."""
        path = self.save("last.pt")
        stop = TrainingInterrupted.after(
            self._signals.received if self._signals is not None else None,
            iteration=self.iteration, max_iters=self.settings.max_iters, checkpoint=path,
            resume=self.record.resume_command
            or f"trainer.resume=true with run directory {self.run_dir}",
        )  # fmt: skip
        if self.dist.is_main:
            self.log.warning(str(stop))
        return stop
