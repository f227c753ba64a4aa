"""Hooks: what the trainer does besides stepping, and where users add their own.

``Trainer.fit`` is the loop alone: ``before_train``, then one ``run_step`` and ``after_step``
per iteration, ``after_train`` on every way out. Everything periodic is a ``Hook`` (detectron2's
``HookBase``): the engine's own progress bar, log lines, evaluation, checkpoints and stop on
signal, and the user's (``Trainer(..., hooks=[...])`` or ``trainer.hooks`` in the config, each a
``_target_``), such as ``fcnseg.engine.ema.EMA``.

Order. The user's hooks run after the engine's progress and log hooks and before its evaluation,
checkpoint and stop hooks, at every event: what a user's ``after_step`` changes is in the
checkpoint written at that iteration (which is what makes resuming exact), and a user's
``after_eval`` sees the metrics before ``metrics.json`` and ``best.pt`` are written, so that it
can add to them (``EMA`` does). ``after_eval`` follows every complete evaluation of the live
weights (``Trainer.evaluate``).

State. A hook whose ``state_dict`` is not empty has it saved in every ``last.pt`` under its
``name`` and given back by ``load_state_dict`` when the run resumes.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

from fcnseg.data.loader import train_loader
from fcnseg.engine.preemption import shielded
from fcnseg.engine.run_dir import size_of
from fcnseg.engine.summary import run_summary
from fcnseg.models.norm import recalibrate_batch_norm
from fcnseg.utils.atomic import write_atomic
from fcnseg.utils.logging import progress

__all__ = [
    "BatchNormRecalibration",
    "Checkpointer",
    "Hook",
    "PeriodicEvaluation",
    "Progress",
    "StopOnSignal",
    "TrainLog",
]


class Hook:
    """Called by the trainer at fixed points of the run; ``self.trainer`` is the trainer.

    Every method does nothing by default: override those you need. Each process calls its
    hooks (rank 0 alone writes: ``self.trainer.dist.is_main``).
    """

    trainer: Any  # the fcnseg.engine.trainer.Trainer calling it (which imports this module)

    @property
    def name(self) -> str:
        """The key of this hook's state in checkpoints."""
        return type(self).__qualname__

    def before_train(self) -> None:
        """Before the first step of ``fit`` (after a resume: of the remaining steps)."""

    def after_step(self) -> None:
        """After each optimizer step; ``trainer.iteration`` counts it."""

    def after_eval(self, metrics: dict[str, Any]) -> None:
        """After each complete evaluation of the live weights, with its metrics (a hook may add
        to them before they are written)."""

    def after_train(self) -> None:
        """On every way out of ``fit``: ``trainer.outcome`` is ``finished``, ``interrupted`` or
        ``failed``."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue as if never stopped (tensors and plain values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Puts back what ``state_dict`` returned."""


class BatchNormRecalibration(Hook):
    """``trainer.bn_recalibration``: before the first step of a new run, that many training
    batches go forward to average the BatchNorm statistics (``fcnseg.models.norm``), from a
    loader of their own and with the random generators put back: the training that follows is
    the one a run without it sees."""

    def before_train(self) -> None:
        t, s = self.trainer, self.trainer.settings
        if t.iteration > 0:  # a resumed run has its statistics
            return
        loader = train_loader(
            t.train_set, batch_size=s.batch_size, num_workers=s.num_workers, seed=s.seed,
            rank=t.dist.rank, world_size=t.dist.world_size, ignore_index=t.ignore_index,
            batching=t.batching,
        )  # fmt: skip
        with t.runtime.untouched_rng(), iter(shielded(loader)) as batches:
            first = itertools.islice(batches, s.bn_recalibration)
            with t.runtime.autocast():
                layers, seen = recalibrate_batch_norm(
                    t.model, (t.runtime.inputs(images) for images, _ in first)
                )
        if not layers:
            t.log.warning(
                "trainer.bn_recalibration=%d: the model has no BatchNorm layer with running "
                "statistics to recalibrate (frozen ones keep theirs)", s.bn_recalibration,
            )  # fmt: skip
            return
        t.log.info(
            "trainer.bn_recalibration=%d: the running statistics of %d BatchNorm layers "
            "averaged over %d training batches of %d images",
            s.bn_recalibration, layers, seen, s.batch_size,
        )  # fmt: skip


class Progress(Hook):
    """The progress bar on rank 0, with the latest loss."""

    def before_train(self) -> None:
        t = self.trainer
        self.bar = progress(
            total=t.settings.max_iters, initial=t.iteration, desc="train", enabled=t.dist.is_main
        )

    def after_step(self) -> None:
        t = self.trainer
        self.bar.update()
        if t.iteration % t.settings.log_interval == 0 or t.iteration == t.settings.max_iters:
            self.bar.set_postfix(loss=f"{t.last_loss:.4f}")

    def after_train(self) -> None:
        if hasattr(self, "bar"):
            self.bar.close()


class TrainLog(Hook):
    """The start-up block, a log line and the training scalars every ``log_interval`` steps
    (with the seconds per step, evaluations left out), and the loggers closed at the end."""

    def before_train(self) -> None:
        """The start-up block (``engine/summary.py``) in the log and the loggers, which also
        record the resolved configuration."""
        t = self.trainer
        lines = run_summary(
            record=t.record, settings=t.settings, runtime=t.runtime,
            sizes={"train": size_of(t.train_set), "val": size_of(t.val_set)},
            optimizer=t.optimizer, scheduler=t.scheduler, start=t.iteration, run_dir=t.run_dir,
            model=t.model,
        )  # fmt: skip
        for line in lines:
            t.log.info(line)
        t.loggers.log_text("run/summary", "\n\n".join(lines), t.iteration)
        t.loggers.log_params(t.record.config)
        self.tic = time.perf_counter()

    def after_step(self) -> None:
        t = self.trainer
        if t.iteration % t.settings.log_interval == 0 or t.iteration == t.settings.max_iters:
            self.log_train((time.perf_counter() - self.tic) / t.settings.log_interval)
            self.tic = time.perf_counter()

    def log_train(self, seconds_per_step: float) -> None:
        """The latest loss and the learning rate: a log line and the loggers' scalars."""
        t = self.trainer
        lr, scaler = t.optimizer.param_groups[0]["lr"], t.step.scaler
        skipped = f", {t.skips.count} update(s) skipped" if t.skips.count else ""
        if skipped and scaler.is_enabled():
            skipped += f" (fp16 gradient scale {scaler.get_scale():g})"
        t.log.info(
            "iteration %d/%d: loss %.4f, lr %.3g, %.2f s/it%s",
            t.iteration, t.settings.max_iters, t.last_loss, lr, seconds_per_step, skipped,
        )  # fmt: skip
        scalars = {"train/loss": t.last_loss, "train/lr": lr}
        if t.skips.count:
            scalars["train/skipped_steps"] = t.skips.count
        if scaler.is_enabled():
            scalars["train/amp_scale"] = scaler.get_scale()
        t.loggers.log_scalars(scalars, t.iteration)

    def after_eval(self, metrics: dict[str, Any]) -> None:
        self.tic = time.perf_counter()  # the evaluation's time is not the steps'

    def after_train(self) -> None:
        t = self.trainer
        if t.outcome == "finished":  # kept with the run by loggers that keep files
            for path in (t.run_dir / "checkpoints" / "best.pt", t.run_dir / "metrics.json"):
                t.loggers.log_artifact(path)
        t.loggers.close(t.outcome)


class PeriodicEvaluation(Hook):
    """Evaluates every ``eval_interval`` steps and after the last one.

    An evaluation due but not done (cut short by a stop signal, or the run stopped at that
    step) is ``trainer.pending_eval``, saved in ``last.pt``: the resumed run does it first. A run
    resumed when already complete evaluates again, to report its metrics.
    """

    def before_train(self) -> None:
        t = self.trainer
        if t.pending_eval or t.iteration >= t.settings.max_iters:
            t.pending_eval = True
            t.evaluate()

    def after_step(self) -> None:
        t = self.trainer
        t.pending_eval = (
            t.iteration % t.settings.eval_interval == 0 or t.iteration == t.settings.max_iters
        )
        if t.pending_eval and not t.stopping:
            t.evaluate()

    def after_eval(self, metrics: dict[str, Any]) -> None:
        self.trainer.pending_eval = False


class Checkpointer(Hook):
    """``last.pt`` every ``checkpoint_interval`` steps; after each evaluation ``metrics.json``,
    ``best.pt`` when the live weights score the best mIoU so far, and ``last.pt``."""

    def after_step(self) -> None:
        t = self.trainer
        if (
            not t.stopping
            and t.iteration % t.settings.checkpoint_interval == 0
            and t.last_saved != t.iteration
        ):
            t.save("last.pt")

    def after_eval(self, metrics: dict[str, Any]) -> None:
        t = self.trainer
        if t.dist.is_main:
            write_atomic(t.run_dir / "metrics.json", json.dumps(metrics, indent=2))
        if metrics["miou"] > t.best_miou:
            t.best_miou = metrics["miou"]
            t.save("best.pt")
        t.save("last.pt")


class StopOnSignal(Hook):
    """Ends the run once every process agreed to stop (a stop signal: ``engine/preemption.py``):
    ``last.pt`` is written and ``TrainingInterrupted`` raised, naming the command that resumes."""

    def before_train(self) -> None:
        self.after_step()  # a pending evaluation may have been cut short already

    def after_step(self) -> None:
        if self.trainer.stopping:
            raise self.trainer.interrupted()
