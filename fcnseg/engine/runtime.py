"""Where and how the network runs: device, process group, precision, memory layout, compilation.

These choices are made once, by ``Runtime.setup``, and handed to whoever runs the network:
the training step, the evaluation, prediction and the benchmarks. Training, evaluation and
prediction therefore agree on what ``amp=bf16`` or ``channels_last=true`` means, and a new
switch is added here once.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fcnseg.errors import UserError
from fcnseg.utils.cpu import cpu_flags
from fcnseg.utils.distributed import DistInfo, all_gather_object, init_distributed, resolve_device
from fcnseg.utils.logging import get_logger
from fcnseg.utils.slurm import export_scheduler_env, task_threads

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and PyTorch's global generators (initial weights, dropout)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def choose_precision(amp: str, device: torch.device) -> tuple[str, str]:
    """The autocast precision to run, ``amp`` itself or for ``auto`` the hardware's best, and
    what the start-up block says of it.

    ``auto`` picks bf16 where the device computes it natively (GPUs from Ampere on; CPUs with
    AVX512-BF16 or AMX), fp16 with its gradient scaler on other GPUs, and fp32 (``none``)
    elsewhere; the choice and its reason are logged and returned (``picked by trainer.amp=auto:
    why``). An
    explicit choice that the hardware runs badly (fp16 on a CPU, bf16 where it is emulated) runs
    as asked, with one warning that says what ``auto`` would pick, returned too. An explicit
    choice the hardware runs well has nothing to say (``""``).
    """
    best, why, slow = hardware_precision(amp, device)
    if amp == "auto":
        get_logger().info("trainer.amp=auto picks %s: %s", best, why)
        return best, f"picked by trainer.amp=auto: {why}"
    if slow:
        note = f"runs slowly here ({why}): trainer.amp=auto would pick {best}"
        get_logger().warning("trainer.amp=%s %s", amp, note)
        return amp, note
    return amp, ""


def hardware_precision(amp: str, device: torch.device) -> tuple[str, str, bool]:
    """What ``auto`` picks on ``device``, why, and whether ``amp`` runs slowly there."""
    if amp not in (*AMP_DTYPES, "auto"):
        raise UserError(f"trainer.amp={amp!r} is not one of auto, {', '.join(AMP_DTYPES)}")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        best, why = (
            ("bf16", f"{name} has native bfloat16")
            if native
            else ("fp16", f"{name} has no native bfloat16")
        )
        slow = amp == "bf16" and not native
    else:
        native = cpu_has_bf16()
        best, why = (
            ("bf16", "this CPU has bf16 instructions")
            if native
            else ("none", "this CPU has no bf16 instructions (AVX512-BF16, AMX)")
        )
        slow = amp == "fp16" or (amp == "bf16" and not native)
    if slow and device.type == "cpu" and amp == "fp16":
        why = "CPUs compute float16 many times slower than float32"
    return best, why, slow


def match_grad_strides(model: nn.Module) -> None:
    """Makes each gradient of ``model`` arrive with its parameter's strides, as DDP wants them.

    Autograd keeps a gradient whose strides differ from its parameter's in dimensions of size 1
    only (the same elements at the same addresses), but DDP's reducer compares every stride with
    its bucket's, which are the parameter's, and warns "Grad strides do not match bucket view
    strides" on every process. Compiled backward passes in bf16 produce such gradients: a 1x1
    convolution's weight (C, K, 1, 1) of strides (K, 1, 1, 1) gets a gradient of strides
    (K, 1, K, K), the channels_last strides of that shape. Re-striding it costs nothing (no
    copy) and happens before DDP sees the gradient (a post-accumulate-grad hook runs inside
    autograd's accumulation, DDP's hook after it).
    """
    for param in model.parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(_restride_grad)


def _restride_grad(param: torch.Tensor) -> None:
    grad = param.grad
    if grad is None or grad.layout != torch.strided or grad.stride() == param.stride():
        return
    sizes, strides, wanted = grad.shape, grad.stride(), param.stride()
    if all(a == b for n, a, b in zip(sizes, strides, wanted) if n != 1):
        param.grad = grad.as_strided(sizes, wanted, grad.storage_offset())


# The x86 instructions that compute bfloat16 natively (Linux's /proc/cpuinfo names).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (/proc/cpuinfo; assumed where unreadable)."""
    flags = cpu_flags()
    return flags is None or any(flag in flags for flag in CPU_BF16_FLAGS)


@dataclass
class Runtime:
    """This process's device and group, and how the network runs on it.

    Attributes:
        device: this process's device (under torchrun, GPU ``LOCAL_RANK``).
        dist: this process's place in the process group.
        amp: ``none``, ``bf16`` or ``fp16`` autocast for the forward passes (``auto`` is
            resolved by ``setup``, ``choose_precision``).
        amp_note: why ``amp`` was picked (``auto``) or that it runs slowly here, for the
            start-up block; empty for an explicit choice the hardware runs well.
        channels_last: NHWC memory layout for the model and its inputs, which tensor-core
            convolutions (fp16/bf16 on recent GPUs) run without transposing.
        compile: ``torch.compile`` the training forward: false, true or a compile mode.
        threads: each process's intra-op CPU threads, in rank order (``setup`` fills it).
        threads_note: where their number comes from (``task_threads``).
    """

    device: torch.device
    dist: DistInfo = field(default_factory=DistInfo)
    amp: str = "none"
    channels_last: bool = False
    compile: bool | str = False
    amp_note: str = ""
    threads: tuple[int, ...] = ()
    threads_note: str = ""

    @classmethod
    def setup(
        cls,
        device: str = "auto",
        *,
        amp: str = "none",
        channels_last: bool = False,
        compile: bool | str = False,
        distributed: bool = True,
        num_workers: int = 0,
    ) -> Runtime:
        """Resolves ``device`` and joins the process group torchrun describes, or that a job
        scheduler's tasks form (``export_scheduler_env``), if any.

        A job scheduler's task runs as many CPU threads as its CPUs allow (``task_threads``).

        Args:
            device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (``resolve_device``): a process
                that sees one GPU takes it, one that sees several takes GPU ``LOCAL_RANK``.
            amp, channels_last, compile: see the class.
            distributed: join torchrun's group; false for a tool that measures one process.
            num_workers: the process's loader workers, whose CPUs its threads leave free.
        """
        if compile not in (False, True, None) and compile not in COMPILE_MODES:
            raise UserError(
                f"trainer.compile={compile!r} is not one of false, true, {', '.join(COMPILE_MODES)}"
            )
        if distributed:
            export_scheduler_env()  # SLURM's tasks (hydra/launcher=slurm) as torchrun's workers
        threads, threads_note = task_threads(num_workers=num_workers)
        if threads is not None:
            torch.set_num_threads(threads)
        dev = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
        chosen, note = choose_precision(amp, dev)
        dist = init_distributed(dev) if distributed else DistInfo()
        compile = False if compile is None else compile
        own = torch.get_num_threads()  # every process's, for rank 0's start-up block
        return cls(
            dev, dist, chosen, channels_last, compile, amp_note=note,
            threads=tuple(all_gather_object(own)) if dist.enabled else (own,),
            threads_note=threads_note,
        )  # fmt: skip

    @classmethod
    def from_settings(cls, settings) -> Runtime:
        """``setup`` with a run's ``TrainSettings`` (device, amp, channels_last, compile, and
        num_workers for the thread count)."""
        s = settings
        return cls.setup(
            s.device, amp=s.amp, channels_last=s.channels_last, compile=s.compile,
            num_workers=s.num_workers,
        )  # fmt: skip

    @property
    def threads_summary(self) -> str:
        """The processes' CPU threads and why, for the start-up block: ``1 per process
        (SLURM_CPUS_PER_TASK=2 less 1 loader worker(s))``."""
        threads = self.threads or (torch.get_num_threads(),)
        if len(threads) == 1:
            count = f"{threads[0]}"
        elif len(set(threads)) == 1:
            count = f"{threads[0]} per process"
        else:
            count = f"{', '.join(map(str, threads))} for processes 0 to {len(threads) - 1}"
        return f"{count} ({self.threads_note})" if self.threads_note else count

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return AMP_DTYPES[self.amp]

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> torch.autocast:
        """The forward's autocast context (disabled for ``amp=none``)."""
        dtype = self.amp_dtype
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """The gradient scaler fp16 needs (its small range underflows gradients); a disabled
        one, which passes everything through, otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")

    def prepare(self, model: nn.Module, *, sync_bn: bool = False) -> nn.Module:
        """Puts ``model`` on the device in the memory layout it runs in.

        Args:
            model: the network.
            sync_bn: replace BatchNorm by SyncBatchNorm, whose statistics cover the batch of
                every process (PyTorch implements it on GPUs only); a no-op for one process.
        """
        if sync_bn and self.dist.enabled:
            if self.device.type != "cuda":
                raise UserError(
                    "trainer.sync_bn=true needs CUDA devices: PyTorch's SyncBatchNorm has no "
                    "CPU version"
                )
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model.to(self.device, memory_format=self.memory_format)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """A batch of images on the device, in the model's memory layout."""
        return images.to(self.device, non_blocking=True, memory_format=self.memory_format)

    def compiled(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """``torch.compile(model)`` when compiling, else ``model``.

        The compiled callable shares ``model``'s parameters: save and evaluate ``model`` itself.
        """
        if self.compile is False:
            return model
        return torch.compile(model, mode=None if self.compile is True else self.compile)

    @contextlib.contextmanager
    def cudnn_benchmark(self, enabled: bool) -> Iterator[None]:
        """cuDNN autotuning on or off for a while: it pays for fixed training crops, not for
        evaluation on whole images of many sizes, which would each be tuned anew."""
        previous = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = enabled and self.device.type == "cuda"
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = previous

    def untouched_rng(self) -> contextlib.AbstractContextManager:
        """Restores the torch generators afterwards (a loader draws its base seed from them)."""
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)
