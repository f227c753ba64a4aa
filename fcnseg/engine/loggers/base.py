"""The loggers' interface: ``ExperimentLogger``, ``LoggerGroup`` over several, and
``Evaluation``, which alone names an evaluation's tags (``val/miou``, ``val/iou/<class>``,
``val/table``, ``val/predictions``, ...) for every backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fcnseg.metrics import format_table

#: The summary metrics an evaluation logs as scalars, in this order.
SUMMARY = ("miou", "pixel_acc", "mean_acc", "fwiou")


@dataclass(frozen=True)
class Evaluation:
    """One evaluation as the loggers receive it, and the tags it is logged under.

    Attributes:
        metrics: ``SegMetrics.compute()`` output.
        samples: (normalised image, target, prediction) triples to picture; may be empty.
        normalize: the images' normalisation name, to show them as they were loaded.
        colors: the class colours; the VOC map when ``None``.
        prefix: the tags' prefix: ``val`` in training, the split's name in ``evaluate.py``.
    """

    metrics: Mapping[str, Any]
    samples: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = ()
    normalize: str = "imagenet"
    colors: Any = None
    prefix: str = "val"

    def tag(self, name: str) -> str:
        """``prefix/name``: e.g. ``val/predictions``, ``val/confusion_matrix``."""
        return f"{self.prefix}/{name}"

    def scalars(self) -> dict[str, float]:
        """``prefix/miou``, ``pixel_acc``, ``mean_acc``, ``fwiou`` and ``prefix/iou/<class>``
        for the classes scored (a class without an IoU has no value)."""
        m = self.metrics
        out = {self.tag(key): float(m[key]) for key in SUMMARY}
        for name, iou in zip(m["class_names"], m["iou"]):
            if iou is not None:
                out[self.tag(f"iou/{name}")] = float(iou)
        return out

    def texts(self) -> dict[str, str]:
        """``prefix/table``: the metrics table (``fcnseg.metrics.format_table``) as Markdown
        code, so that its columns stay aligned where it is shown."""
        return {self.tag("table"): f"```\n{format_table(dict(self.metrics))}\n```"}


class ExperimentLogger:
    """What a training run tells an experiment log.

    Every method does nothing here but ``log_evaluation``, which logs the evaluation's scalars
    and texts: a backend overrides what it can show. Steps are training iterations.
    """

    def log_params(self, config: Mapping[str, Any]) -> None:
        """Records the run's resolved configuration."""

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        """Records scalars such as ``{"train/loss": 0.7, "train/lr": 0.01}`` at ``step``."""

    def log_text(self, tag: str, text: str, step: int) -> None:
        """Records a text (Markdown) under ``tag`` at ``step``."""

    def log_evaluation(self, evaluation: Evaluation, step: int) -> None:
        """Records an evaluation: its scalars and table, and its pictures where shown."""
        self.log_scalars(evaluation.scalars(), step)
        for tag, text in evaluation.texts().items():
            self.log_text(tag, text, step)

    def log_artifact(self, path: Path) -> None:
        """Stores a copy of the run directory's file ``path`` (e.g. ``best.pt``) with the run."""

    def close(self, status: str = "finished") -> None:
        """Ends the log; ``status`` is ``finished``, ``interrupted`` or ``failed``."""


class LoggerGroup(ExperimentLogger):
    """Hands every record to each of ``loggers`` in turn; empty, it logs nothing."""

    def __init__(self, loggers: Iterable[ExperimentLogger] = ()) -> None:
        self.loggers = list(loggers)

    def log_params(self, config: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_params(config)

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log_scalars(values, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        for logger in self.loggers:
            logger.log_text(tag, text, step)

    def log_evaluation(self, evaluation: Evaluation, step: int) -> None:
        for logger in self.loggers:
            logger.log_evaluation(evaluation, step)

    def log_artifact(self, path: Path) -> None:
        for logger in self.loggers:
            logger.log_artifact(path)

    def close(self, status: str = "finished") -> None:
        # Every logger is closed even when one fails to; the first error is raised after.
        with contextlib.ExitStack() as stack:
            for logger in reversed(self.loggers):
                stack.callback(logger.close, status)
