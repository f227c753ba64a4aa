"""The settings of a training run: the ``trainer:`` config group, checked once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from fcnseg.errors import UserError

NAN_POLICIES = ("stop", "skip")


@dataclass(frozen=True)
class TrainSettings:
    """How long, how big, where and how precisely a run trains (``configs/trainer/*.yaml``).

    Every field is required: the defaults live once, in ``configs/trainer/default.yaml`` and the
    dataset's recipe (``configs/recipe/<dataset>.yaml``: length, batch, evaluation and
    checkpoint intervals), never again here, so that what a run trains with is what its
    composed config says (``python scripts/train.py --cfg job``). The settings are checked as
    they are built: a wrong one is a ``UserError`` naming its ``trainer.*`` key.

    Attributes:
        max_iters: number of optimizer steps.
        eval_interval: evaluate (and save ``best.pt``) every this many steps and at the end.
        log_interval: log the loss every this many steps.
        checkpoint_interval: save ``last.pt`` every this many steps (and at each evaluation).
        batch_size: images per process per forward pass (micro-batch).
        accumulate: micro-batches whose gradients are summed before each optimizer step.
        eval_batch_size: images per process per evaluation batch (1 scores each image alone).
        num_workers: loader processes per training process.
        device: ``auto``, ``cpu`` or ``cuda``.
        seed: seeds the initial weights, dropout, data order and augmentation.
        resume: ``False``; ``True`` (``run_dir/checkpoints/last.pt``, which must exist);
            ``"auto"`` (that file when it exists, else a new run: for jobs that a scheduler
            requeues with the same command); or a checkpoint path.
        overwrite: start a new run in a run directory that holds another run's checkpoints
            (refused otherwise, unless ``resume`` continues that run).
        amp: ``none``, ``auto`` (the hardware's best), ``bf16`` or ``fp16`` (with a gradient
            scaler) autocast.
        sync_bn: SyncBatchNorm across processes (CUDA only; one process needs none).
        channels_last: NHWC memory layout for the model and its inputs.
        compile: ``torch.compile`` the training forward: false, true or a compile mode.
        cudnn_benchmark: let cuDNN autotune convolutions for the fixed training crop size.
        nan_policy: on a non-finite loss, ``stop`` (raise ``NonFiniteLossError``) or ``skip``
            the update (counted as ``skipped_steps``).
        num_vis: images shown in TensorBoard at each evaluation.
        bn_recalibration: before the first step of a new run, this many training batches go
            forward (no gradients) to replace every BatchNorm layer's running statistics by
            their average over them (``fcnseg.models.norm.recalibrate_batch_norm``); 0: none.
    """

    max_iters: int
    eval_interval: int
    log_interval: int
    checkpoint_interval: int
    batch_size: int
    accumulate: int
    eval_batch_size: int
    num_workers: int
    device: str
    seed: int
    resume: bool | str
    overwrite: bool
    amp: str
    sync_bn: bool
    channels_last: bool
    compile: bool | str
    cudnn_benchmark: bool
    nan_policy: str
    num_vis: int
    bn_recalibration: int

    def __post_init__(self) -> None:
        minimum = {
            "max_iters": 1, "eval_interval": 1, "log_interval": 1, "checkpoint_interval": 1,
            "batch_size": 1, "accumulate": 1, "eval_batch_size": 1, "num_workers": 0,
            "num_vis": 0, "seed": 0, "bn_recalibration": 0,
        }  # fmt: skip
        for key, least in minimum.items():
            value = getattr(self, key)
            if value is None:  # trainer/default.yaml leaves length, batch and intervals to recipes
                raise UserError(
                    f"trainer.{key} is not set: the dataset's recipe (configs/recipe/) sets it, "
                    f"or give trainer.{key}=N"
                )
            if not isinstance(value, int) or isinstance(value, bool):
                raise UserError(f"trainer.{key}={value!r} is not a whole number")
            if value < least:
                raise UserError(f"trainer.{key}={value} must be at least {least}")
        for key in ("overwrite", "sync_bn", "channels_last", "cudnn_benchmark"):
            if not isinstance(getattr(self, key), bool):
                raise UserError(f"trainer.{key}={getattr(self, key)!r} is not true or false")
        if self.nan_policy not in NAN_POLICIES:
            raise UserError(f"trainer.nan_policy={self.nan_policy!r} is not one of stop, skip")
        if isinstance(self.resume, Path):
            object.__setattr__(self, "resume", str(self.resume))

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]
