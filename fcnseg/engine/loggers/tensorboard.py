"""TensorBoard: a training run's ``RUN/tensorboard/`` and ``evaluate.py eval.tensorboard=DIR``.

Both write an evaluation through ``write_evaluation``, so a checkpoint evaluated later shows
under the same tags as the evaluations of the run that trained it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from fcnseg.engine.loggers.base import Evaluation, ExperimentLogger
from fcnseg.utils.visualize import confusion_figure, iou_figure, sample_rows


class TensorBoardLogger(ExperimentLogger):
    """``run_dir/tensorboard/``: scalars, text, and per evaluation what ``write_evaluation``
    writes.

    Args:
        run_dir: the run's folder.
        resume_from: the iteration a resumed run continues from: the events the interrupted
            run wrote after it are dropped (``purge_step``). A new run in a folder that holds
            events (a start that failed before its first checkpoint and was restarted, or
            ``trainer.overwrite=true``) drops them all, as the CSV starts over: the files stay,
            TensorBoard no longer shows them.
    """

    def __init__(self, run_dir: str | Path, *, resume_from: int | None = None) -> None:
        folder = Path(run_dir) / "tensorboard"
        if resume_from is not None:
            purge = resume_from + 1
        else:
            purge = 0 if any(folder.glob("events.out.tfevents.*")) else None
        self.writer = SummaryWriter(folder, purge_step=purge)

    def log_scalars(self, values: Mapping[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def log_evaluation(self, evaluation: Evaluation, step: int) -> None:
        write_evaluation(self.writer, evaluation, step)

    def close(self, status: str = "finished") -> None:
        self.writer.close()  # reopened by any later write


def write_evaluation(writer: SummaryWriter, evaluation: Evaluation, step: int) -> None:
    """Writes one evaluation at ``step``: ``evaluation.scalars()`` and ``texts()`` (the metrics
    and the table), ``prefix/predictions`` (input | ground truth | prediction rows, when it has
    samples), ``prefix/confusion_matrix`` and ``prefix/per_class_iou`` (figures)."""
    e, metrics = evaluation, dict(evaluation.metrics)
    for tag, value in e.scalars().items():
        writer.add_scalar(tag, value, step)
    for tag, text in e.texts().items():
        writer.add_text(tag, text, step)
    if e.samples:
        rows = sample_rows(e.samples, e.normalize, colors=e.colors)
        writer.add_image(e.tag("predictions"), rows, step)
    confusion = confusion_figure(metrics["confusion_matrix"], metrics["class_names"])
    writer.add_figure(e.tag("confusion_matrix"), confusion, step)
    writer.add_figure(e.tag("per_class_iou"), iou_figure(metrics), step)
    writer.flush()


def add_evaluation(folder: str | Path, evaluation: Evaluation, step: int) -> None:
    """Adds one evaluation (``write_evaluation``) to the events in ``folder``, replacing none
    of those there: ``evaluate.py eval.tensorboard=DIR``, also into a training run's own
    ``tensorboard/``."""
    with SummaryWriter(str(folder)) as writer:
        write_evaluation(writer, evaluation, step)
