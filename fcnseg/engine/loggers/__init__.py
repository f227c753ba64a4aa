"""Experiment logs: where a run's scalars, text, pictures and outputs go, and under which tags.

The trainer talks to one ``ExperimentLogger``, a ``LoggerGroup`` over the backends the run
chose (``logger=[tensorboard,csv,mlflow]``), one module each: ``TensorBoardLogger``
(``RUN/tensorboard/``), ``CSVLogger`` (``RUN/metrics.csv``) and ``MLflowLogger`` (an MLflow
tracking store). Each backend is built by ``factory(run_dir=..., resume_from=...)`` on the main
process only, so a resumed run can drop what the interrupted one logged after its checkpoint
(TensorBoard's ``purge_step``, the CSV's later rows) and nothing is logged twice by several
processes.

An evaluation's tags (``val/miou``, ``val/iou/<class>``, ``val/table``, ``val/predictions``,
...) are named by ``Evaluation`` alone (``base``), so that a training run's evaluations and
``evaluate.py eval.tensorboard=DIR`` (``add_evaluation``) write the same ones.
"""

from fcnseg.engine.loggers.base import Evaluation, ExperimentLogger, LoggerGroup
from fcnseg.engine.loggers.csv import CSVLogger
from fcnseg.engine.loggers.mlflow import MLflowLogger
from fcnseg.engine.loggers.tensorboard import TensorBoardLogger, add_evaluation

__all__ = [
    "CSVLogger",
    "Evaluation",
    "ExperimentLogger",
    "LoggerGroup",
    "MLflowLogger",
    "TensorBoardLogger",
    "add_evaluation",
]
