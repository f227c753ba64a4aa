"""One optimizer step, apart from the loop that repeats it.

``TrainStep`` is what the trainer calls once per iteration, what the benchmark times and what
the tests drive alone: forward under autocast, loss, backward (through the gradient scaler that
fp16 needs), gradient accumulation and synchronisation, the agreement of every process on the
loss, then the optimizer and the learning-rate schedule.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parallel import DistributedDataParallel

from fcnseg.engine.loss import SegLoss
from fcnseg.engine.runtime import Runtime, match_grad_strides
from fcnseg.errors import UserError
from fcnseg.utils.distributed import all_reduce_sum
from fcnseg.utils.logging import get_logger

# cuDNN autotunes every new input shape; past this many shapes (training on whole images of
# varying sizes rather than fixed crops) the tuning costs more than it saves and is turned off.
BENCHMARK_MAX_SHAPES = 8
# PyTorch's warning when a schedule steps before its optimizer has (a skipped first update).
SCHEDULER_BEFORE_OPTIMIZER = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer"


def running_statistics(module: nn.Module) -> list[torch.Tensor]:
    """The buffers a training forward pass of ``module`` changes: the running mean, variance
    and batch count of its normalisation layers (BatchNorm, SyncBatchNorm, InstanceNorm with
    ``track_running_stats``) in training mode. Other buffers, and the parameters, change only
    in the optimizer step, which a non-finite step does not take."""
    return [
        buffer
        for layer in module.modules()
        if isinstance(layer, _NormBase) and layer.track_running_stats and layer.training
        for buffer in layer.buffers(recurse=False)
    ]


class NonFiniteLossError(UserError):
    """The loss (or the weights) stopped being finite, usually from too high a learning rate."""


@dataclass(frozen=True)
class StepResult:
    """What a step did, the same on every process.

    Attributes:
        loss: the batch's loss, averaged over micro-batches and processes.
        finite: whether it was finite; if not, no weight changed (the step was not taken).
        stop: whether some process was asked to stop (a stop signal) before this step ended.
        overflow: fp16 only: the loss was finite but its scaled gradients overflowed, so the
            gradient scaler skipped the update and lowered its scale.
    """

    loss: float
    finite: bool
    stop: bool
    overflow: bool = False


class TrainStep:
    """One optimizer step on this process's share of the global batch.

    The batch is cut into ``accumulate`` micro-batches whose gradients add up (DDP averages
    them over processes after the last one only); each micro-batch's loss is divided by
    ``accumulate``, so the gradient is the mean over micro-batches and processes, as Caffe's
    ``iter_size`` made it. One all-reduce per step carries the loss and every process's stop
    request, so all processes see the same loss and stop after the same step.

    A non-finite loss updates nothing: the optimizer step is not taken, the gradients are
    dropped and, with ``keep_buffers``, the only state a training forward pass changes, the
    normalisation layers' running statistics (``running_statistics``), is put back.

    Args:
        module: the network as trained (wrapped in DistributedDataParallel under torchrun).
        optimizer: steps the trainable parameters.
        scheduler: stepped after every step, taken or not.
        loss: logits, labels -> scalar loss.
        runtime: device, autocast, memory layout, compilation.
        accumulate: micro-batches per step.
        keep_buffers: restore the running statistics after a non-finite step (a copy of
            them per step: 2 x channels + 1 numbers per BatchNorm layer, none without BN).
        cudnn_benchmark: let cuDNN autotune the convolutions for the training input shapes.
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        loss: SegLoss,
        *,
        runtime: Runtime,
        accumulate: int = 1,
        keep_buffers: bool = False,
        cudnn_benchmark: bool = True,
    ) -> None:
        self.module, self.optimizer, self.scheduler = module, optimizer, scheduler
        self.loss = loss.to(runtime.device)
        self.runtime, self.accumulate, self.keep_buffers = runtime, accumulate, keep_buffers
        if isinstance(module, DistributedDataParallel):
            match_grad_strides(module.module)  # DDP's buckets take the parameters' strides
        self.forward = runtime.compiled(module)  # compile(DDP): DDP's graph breaks per bucket
        self.scaler = runtime.grad_scaler()
        if runtime.amp == "fp16" and loss.reduction == "sum":
            get_logger().warning(
                "trainer.amp=fp16 with loss.reduction=sum: a loss summed over every pixel has "
                "gradients that can exceed fp16's range (65504); the paper's summed-loss recipe "
                "trains in fp32"
            )
        # Switched on for the step's forward and backward only: the caller's setting holds
        # everywhere else (evaluation, other code in the same process).
        self.benchmark = cudnn_benchmark and runtime.device.type == "cuda"
        self._shapes: set[tuple[int, ...]] = set()

    def __call__(
        self, images: torch.Tensor, targets: torch.Tensor, *, stop_requested: bool = False
    ) -> StepResult:
        if len(images) < self.accumulate:
            raise ValueError(
                f"a batch of {len(images)} cannot make {self.accumulate} micro-batches"
            )
        self._note_shape(images)
        kept = running_statistics(self.module) if self.keep_buffers else []
        saved = [b.clone() for b in kept]
        self.optimizer.zero_grad(set_to_none=True)
        chunks = list(
            zip(images.tensor_split(self.accumulate), targets.tensor_split(self.accumulate))
        )
        total = torch.zeros((), device=self.runtime.device)
        for i, (x, y) in enumerate(chunks):
            with (
                self._grad_sync(last=i == len(chunks) - 1),
                self.runtime.cudnn_benchmark(self.benchmark),
            ):
                with self.runtime.autocast():
                    logits = self.forward(self.runtime.inputs(x))
                loss = self.loss(logits, y.to(self.runtime.device, non_blocking=True))
                loss = loss / len(chunks)
                self.scaler.scale(loss).backward()
            total += loss.detach()
        status = torch.stack(
            [total.float(), torch.tensor(float(stop_requested), device=total.device)]
        )
        loss_sum, stops = all_reduce_sum(status).tolist()
        value = loss_sum / self.runtime.dist.world_size
        finite, overflow = math.isfinite(value), False
        if finite:
            scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
            self.scaler.step(self.optimizer)
            self.scaler.update()
            # The scaler lowers its scale exactly when it skipped the update (inf/NaN gradients).
            overflow = scale is not None and self.scaler.get_scale() < scale
        else:
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for buffer, before in zip(kept, saved):
                    buffer.copy_(before)
        with warnings.catch_warnings():
            # A skipped update is a step of the schedule all the same (it counts iterations);
            # PyTorch's warning that the optimizer has not stepped yet would only alarm.
            warnings.filterwarnings("ignore", message=SCHEDULER_BEFORE_OPTIMIZER)
            self.scheduler.step()
        return StepResult(loss=value, finite=finite, stop=stops > 0, overflow=overflow)

    def _grad_sync(self, *, last: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces gradients after the last micro-batch only."""
        if self.runtime.dist.enabled and not last:
            return self.module.no_sync()
        return contextlib.nullcontext()

    def _note_shape(self, images: torch.Tensor) -> None:
        if not self.benchmark or tuple(images.shape) in self._shapes:
            return
        self._shapes.add(tuple(images.shape))
        if len(self._shapes) > BENCHMARK_MAX_SHAPES:
            self.benchmark = False
            get_logger().info(
                "training inputs have more than %d shapes: cuDNN autotuning turned off",
                BENCHMARK_MAX_SHAPES,
            )
