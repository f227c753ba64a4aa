"""Updates the trainer does not take: ``nan_policy`` for non-finite losses, and the fp16
gradient scaler's skipped updates, counted and said."""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable
from pathlib import Path

import torch

from fcnseg.engine.step import NonFiniteLossError, StepResult

# A run whose updates are skipped this often (over this many steps) is said not to be learning.
SKIPPED_WINDOW, SKIPPED_SHARE, SKIPPED_MIN_STEPS = 20, 0.5, 4


class SkippedUpdates:
    """Applies ``nan_policy`` and counts every update not taken, for the log, the loggers and
    ``metrics.json``.

    Args:
        policy: ``stop`` (a non-finite loss ends the run before the weights change) or
            ``skip`` (the step is dropped and training goes on).
        log: where the warnings go.
        count: updates skipped before (a resumed run's).
    """

    def __init__(self, policy: str, log: logging.Logger, count: int = 0) -> None:
        self.policy, self.log, self.count = policy, log, count
        self.recent: collections.deque[bool] = collections.deque(maxlen=SKIPPED_WINDOW)

    def note(
        self,
        result: StepResult,
        *,
        step: int,
        scale: float | None,
        parameters: Iterable[torch.Tensor],
        checkpoint: Path,
        saved_at: int | None,
    ) -> None:
        """Step ``step`` gave ``result`` (``TrainStep``); ``scale`` is the fp16 gradient scale
        after it (``None`` without a scaler). Counts and says a skipped update, applies
        ``nan_policy`` (``non_finite``), and warns once per window when most recent updates were
        skipped: a run in that state (fp16 gradients overflowing at every step, a loss that keeps
        turning NaN) barely learns, however few warnings each skip gave."""
        self.recent.append(not result.finite or result.overflow)
        steps, skipped = len(self.recent), sum(self.recent)
        if steps >= SKIPPED_MIN_STEPS and skipped >= SKIPPED_SHARE * steps:
            if scale is not None:
                advice = (
                    f"the fp16 gradient scale is down to {scale:g}; lower optimizer.lr, or train "
                    f"with trainer.amp=bf16 (wider range) or none"
                )
            else:
                advice = "lower optimizer.lr"
            self.log.warning(
                "%d of the last %d updates were skipped: the model is barely training (%s)",
                skipped, steps, advice,
            )  # fmt: skip
            self.recent.clear()  # said again only after as many steps more
        if not result.finite:
            self.non_finite(
                result.loss, step=step, parameters=parameters, checkpoint=checkpoint,
                saved_at=saved_at,
            )  # fmt: skip
        elif result.overflow:  # fp16: the scaler skipped this update
            self.overflow(step=step, scale=scale)

    def non_finite(
        self,
        value: float,
        *,
        step: int,
        parameters: Iterable[torch.Tensor],
        checkpoint: Path,
        saved_at: int | None,
    ) -> None:
        """Step ``step``'s loss was ``value`` (the same on every process) and no weight changed.

        Raises:
            NonFiniteLossError: under ``nan_policy=stop``, naming the checkpoint kept (written
                at iteration ``saved_at``, if any); under ``skip``, when the weights themselves
                are no longer finite, which skipping cannot mend.
        """
        if self.policy == "stop":
            if saved_at is not None:
                kept = f"the last good checkpoint, {checkpoint} (iteration {saved_at}), is kept"
            else:
                kept = "no checkpoint had been written yet"
            raise NonFiniteLossError(
                f"the training loss is {value} at iteration {step}; training stopped before "
                f"updating the weights and {kept} (lower the learning rate, or set "
                f"trainer.nan_policy=skip)"
            )
        self.count += 1
        if not all(bool(torch.isfinite(p).all()) for p in parameters):
            raise NonFiniteLossError(
                f"the weights are not finite at iteration {step}: skipping steps cannot recover; "
                f"resume from an earlier checkpoint with a lower learning rate"
            )
        self.log.warning(
            "iteration %d: loss %s, update skipped (%d skipped so far)", step, value, self.count
        )

    def overflow(self, *, step: int, scale: float) -> None:
        """fp16: the gradient scaler skipped step ``step``'s update and lowered its scale to
        ``scale``. Said at the 1st, 2nd, 4th, 8th, ... skip: rate-limited, never silent."""
        self.count += 1
        if self.count & (self.count - 1) == 0:
            self.log.warning(
                "iteration %d: the fp16 gradient scaler skipped the update (the gradients "
                "overflowed) and lowered its scale to %g; %d update(s) skipped so far",
                step, scale, self.count,
            )  # fmt: skip
