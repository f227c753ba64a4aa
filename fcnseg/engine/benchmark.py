"""Measuring fcnseg: training and inference speed, the data pipeline, metric accumulation.

Every measurement follows one protocol. Untimed warm-up calls come first (allocator growth,
oneDNN/cuDNN algorithm choice, ``torch.compile``); then each timed call is bracketed by a device
synchronisation, so that its time is what the call costs and not how long its kernels took to
be queued. When several variants are compared (fcnseg against the reference network, one-pass
scoring against crops), their calls are interleaved one by one, so that the load of a shared
machine falls on all of them alike.

Results are plain dicts, ready for JSON:

- ``images_per_s``: images per call / median seconds per call;
- ``ms_per_iter``: ``median``, ``p10``, ``p90``, ``min``, ``max`` over the timed calls;
- ``peak_memory_mb`` with ``memory``: ``cuda_max_allocated`` (the CUDA caching allocator's peak
  during the timed calls) or ``peak_rss`` (the process's peak resident set during the timed
  calls; ``peak_rss_since_start`` where the kernel cannot reset it);
- ``flops_per_iter`` and ``tflops``: FLOPs counted once by ``FlopCounterMode`` (forward and
  backward for training), divided by the median time: the achieved, not the peak, rate.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from fcnseg.data.base import SegmentationDataset
from fcnseg.data.loader import train_loader
from fcnseg.data.transforms import build_transforms
from fcnseg.errors import UserError
from fcnseg.metrics import SegMetrics

MODES = ("train", "infer", "data", "metrics", "convert", "slide")
VOC_SIZE = (500, 375)  # width, height of the typical PASCAL VOC image


# ---------------------------------------------------------------------------- the protocol
def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The hardware and software a measurement ran on."""
    device = torch.device(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = found.group(1).strip() if found else cpu
    env: dict[str, Any] = {
        "cpu": cpu,
        "cpu_cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Other processes' demand for the CPU while this ran (1-minute load average).
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    for name in ("torchvision", "albumentations", "cv2", "numpy", "PIL"):
        with contextlib.suppress(ImportError):
            env[name] = __import__(name).__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return env


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op on the CPU, which runs synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of a stretch of calls: CUDA's max allocated, or the process's peak RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "peak_rss"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # Linux: writing 5 to clear_refs resets the peak resident set (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.kind = "peak_rss_since_start"

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        with contextlib.suppress(OSError, AttributeError):
            found = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
            return int(found.group(1)) * 1024
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, else kB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


@dataclass
class Timed:
    """Seconds per timed call and the peak memory over those calls."""

    seconds: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    memory: str = "peak_rss"


def time_calls(
    calls: Mapping[str, Callable[[], Any]], *, device: torch.device, warmup: int, iters: int
) -> dict[str, Timed]:
    """Times every callable ``iters`` times after ``warmup`` untimed calls, interleaved.

    Interleaving call by call (a, b, a, b, ...) exposes every variant to the same background
    load, which matters on a shared machine more than any number of repetitions.
    """
    if iters < 1 or warmup < 0:
        raise UserError(
            f"bench.iters={iters} must be at least 1 and bench.warmup={warmup} at least 0"
        )
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    synchronize(device)
    memory = PeakMemory(device)
    timed = {name: Timed(memory=memory.kind) for name in calls}
    for _ in range(iters):
        for name, fn in calls.items():
            memory.reset()
            start = time.perf_counter()
            fn()
            synchronize(device)
            timed[name].seconds.append(time.perf_counter() - start)
            timed[name].peak_bytes = max(timed[name].peak_bytes, memory.peak_bytes())
            timed[name].memory = memory.kind
    return timed


def summarize(
    name: str, timed: Timed, *, images_per_call: float, flops: int | None = None, **extra: Any
) -> dict[str, Any]:
    """One result row: throughput from the median time, spread, memory, achieved TFLOP/s."""
    ms = np.asarray(timed.seconds) * 1e3
    median = float(statistics.median(ms))
    row = {
        "name": name,
        "iters": len(ms),
        "images_per_s": images_per_call / (median / 1e3),
        "ms_per_iter": {
            "median": median,
            "p10": float(np.percentile(ms, 10)),
            "p90": float(np.percentile(ms, 90)),
            "min": float(ms.min()),
            "max": float(ms.max()),
        },
        "peak_memory_mb": timed.peak_bytes / 2**20,
        "memory": timed.memory,
        "flops_per_iter": flops,
        "tflops": flops / (median / 1e3) / 1e12 if flops else None,
    }
    row.update(extra)
    return row


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matrix products and convolutions ``fn`` runs (a multiply-add counts 2)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def format_table(report: Mapping[str, Any]) -> str:
    """The report's result rows as a Markdown table."""
    lines = [
        "| variant | images/s | ms/iter median (p10-p90) | peak memory (MB) | TFLOP/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        ms = row["ms_per_iter"]
        tflops = f"{row['tflops']:.3g}" if row.get("tflops") else "-"
        lines.append(
            f"| {row['name']} | {row['images_per_s']:.2f} | {ms['median']:.1f} "
            f"({ms['p10']:.1f}-{ms['p90']:.1f}) | {row['peak_memory_mb']:.0f} | {tflops} |"
        )
    for key, value in report.get("summary", {}).items():
        lines.append(f"\n{key}: {value:.3f}" if isinstance(value, float) else f"\n{key}: {value}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- networks
def random_batch(
    *, batch: int, size: int, num_classes: int, ignore_index: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised-looking images and label maps with a border of ignored pixels, as crops have."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    targets = torch.randint(0, num_classes, (batch, size, size), generator=g)
    targets[..., : size // 16, :] = ignore_index
    return images, targets


def bench_train(
    *,
    model: nn.Module,
    optimizer: Callable[..., torch.optim.Optimizer],
    scheduler: Callable[[torch.optim.Optimizer], Any],
    trainer_options: Mapping[str, Any],
    num_classes: int,
    ignore_index: int = 255,
    size: int,
    batch: int,
    warmup: int,
    iters: int,
    reference: bool = False,
) -> dict[str, Any]:
    """Times ``Trainer.step`` (forward under autocast, loss, backward, optimizer, schedule).

    The step is the trainer's own, so every ``trainer.*`` switch (``amp``, ``channels_last``,
    ``compile``, ``accumulate``) applies exactly as in training. With ``reference``, the plain
    transcription of the reference VGG16 FCN-8s (``fcnseg.models.reference``), holding the same
    weights, goes through an identical trainer, interleaved with fcnseg's.
    """
    from fcnseg.engine.trainer import Trainer
    from fcnseg.models.reference import reference_fcn8s_like

    models = {"fcnseg": model}
    if reference:
        models["reference"] = reference_fcn8s_like(model, num_classes)
    options = {k: v for k, v in trainer_options.items() if k not in ("resume", "max_iters")}
    images, targets = random_batch(
        batch=batch, size=size, num_classes=num_classes, ignore_index=ignore_index
    )
    with tempfile.TemporaryDirectory(prefix="fcnseg-bench-") as tmp:
        trainers = {
            name: Trainer(
                model=net,
                train_set=None,  # step() is fed directly; no loader is ever built
                val_set=None,
                optimizer=optimizer,
                scheduler=scheduler,
                run_dir=Path(tmp) / name,
                config={},
                class_names=[f"class_{i}" for i in range(num_classes)],
                ignore_index=ignore_index,
                max_iters=10**9,
                **options,
            )
            for name, net in models.items()
        }
        device = next(iter(trainers.values())).device
        if device.type == "cuda":  # as the training loader delivers them
            images, targets = images.pin_memory(), targets.pin_memory()
        for t in trainers.values():
            t.ddp.train()
        flops = {name: _train_flops(t, images, targets) for name, t in trainers.items()}
        calls = {name: partial(t.step, images, targets) for name, t in trainers.items()}
        timed = time_calls(calls, device=device, warmup=warmup, iters=iters)
        for t in trainers.values():
            if t.writer is not None:
                t.writer.close()
    results = [
        summarize(name, timed[name], images_per_call=batch, flops=flops[name]) for name in models
    ]
    summary = {}
    if reference:
        summary["fcnseg_vs_reference_speed"] = (
            results[0]["images_per_s"] / results[1]["images_per_s"]
        )
    return _report(
        "train",
        device,
        results,
        summary,
        size=size,
        batch=batch,
        warmup=warmup,
        trainer=_switches(trainer_options),
    )


def _train_flops(trainer, images: torch.Tensor, targets: torch.Tensor) -> int:
    """Forward + backward FLOPs of one step, on the eager module (compiled code hides them)."""

    def forward_backward() -> None:
        x = images.to(trainer.device, memory_format=trainer.memory_format)
        with trainer.autocast():
            logits = trainer.model(x)
        F.cross_entropy(
            logits.float(), targets.to(trainer.device), ignore_index=trainer.ignore_index
        ).backward()

    flops = count_flops(forward_backward)
    trainer.optimizer.zero_grad(set_to_none=True)
    return flops


def prepared_for_inference(
    model: nn.Module, *, device: torch.device, channels_last: bool, compile: bool | str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` in eval mode on ``device``, prepared with the trainer's own functions."""
    from fcnseg.engine.trainer import compile_model, prepare_model

    model = prepare_model(model, device=device, channels_last=channels_last).eval()
    return compile_model(model, compile)


def autocast_for(device: torch.device, amp: str) -> torch.autocast:
    from fcnseg.engine.trainer import AMP_DTYPES

    if amp not in AMP_DTYPES:
        raise UserError(f"trainer.amp={amp!r} is not one of {', '.join(AMP_DTYPES)}")
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp], enabled=AMP_DTYPES[amp] is not None)


def bench_infer(
    *,
    model: nn.Module,
    trainer_options: Mapping[str, Any],
    num_classes: int,
    size: int,
    batch: int,
    warmup: int,
    iters: int,
    reference: bool = False,
) -> dict[str, Any]:
    """Times the forward pass and argmax of a batch (what whole-image evaluation runs)."""
    from fcnseg.models.reference import reference_fcn8s_like
    from fcnseg.utils.distributed import resolve_device

    device = resolve_device(str(trainer_options.get("device", "auto")))
    channels_last = bool(trainer_options.get("channels_last", False))
    compile_mode = trainer_options.get("compile", False)
    amp = str(trainer_options.get("amp", "none"))
    models = {"fcnseg": model}
    if reference:
        models["reference"] = reference_fcn8s_like(model, num_classes)
    nets = {
        name: prepared_for_inference(
            m, device=device, channels_last=channels_last, compile=compile_mode
        )
        for name, m in models.items()
    }
    images, _ = random_batch(batch=batch, size=size, num_classes=num_classes, ignore_index=255)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device, memory_format=fmt)

    def predict(net) -> torch.Tensor:
        with torch.inference_mode(), autocast_for(device, amp):
            return net(images).argmax(1)

    flops = {name: count_flops(partial(predict, models[name])) for name in models}
    timed = time_calls(
        {n: partial(predict, net) for n, net in nets.items()},
        device=device,
        warmup=warmup,
        iters=iters,
    )
    results = [summarize(n, timed[n], images_per_call=batch, flops=flops[n]) for n in models]
    summary = {}
    if reference:
        summary["fcnseg_vs_reference_speed"] = (
            results[0]["images_per_s"] / results[1]["images_per_s"]
        )
    return _report(
        "infer",
        device,
        results,
        summary,
        size=size,
        batch=batch,
        warmup=warmup,
        trainer=_switches(trainer_options),
    )


def bench_slide(
    *,
    model: nn.Module,
    inference,
    trainer_options: Mapping[str, Any],
    size: int | Sequence[int],
    warmup: int,
    iters: int,
) -> dict[str, Any]:
    """Sliding-window inference of one image, windows batched (``eval.batch_size``) vs one by one.

    ``inference`` is an ``fcnseg.engine.inference.Inference`` in ``slide`` mode.
    """
    from fcnseg.engine.inference import Inference
    from fcnseg.engine.inference import _starts as window_starts
    from fcnseg.utils.distributed import resolve_device

    if inference.mode != "slide":
        raise UserError("bench.mode=slide needs eval.mode=slide (and eval.crop_size, eval.stride)")
    device = resolve_device(str(trainer_options.get("device", "auto")))
    amp = str(trainer_options.get("amp", "none"))
    net = prepared_for_inference(
        model,
        device=device,
        channels_last=bool(trainer_options.get("channels_last", False)),
        compile=trainer_options.get("compile", False),
    )
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    image = torch.randn(1, 3, h, w, device=device)
    ch, cw = min(inference.crop_size[0], h), min(inference.crop_size[1], w)
    windows = len(window_starts(h, ch, inference.stride[0])) * len(
        window_starts(w, cw, inference.stride[1])
    )
    options = dict(
        mode="slide",
        crop_size=inference.crop_size,
        stride=inference.stride,
        scales=inference.scales,
        flip=inference.flip,
    )
    variants = {f"windows batched by {inference.batch_size}": inference}
    if inference.batch_size != 1:
        variants["windows one by one"] = Inference(**options, batch_size=1)

    def run(inf) -> torch.Tensor:
        return inf.predict(net, image, autocast=autocast_for(device, amp))

    timed = time_calls(
        {n: partial(run, inf) for n, inf in variants.items()},
        device=device,
        warmup=warmup,
        iters=iters,
    )
    views = len(inference.views)
    results = [
        summarize(
            n,
            timed[n],
            images_per_call=1,
            windows_per_s=windows * views / statistics.median(timed[n].seconds),
        )
        for n in variants
    ]
    summary: dict[str, Any] = {"windows_per_image": windows * views}
    if len(results) == 2:
        summary["batched_vs_one_by_one_speed"] = (
            results[0]["images_per_s"] / results[1]["images_per_s"]
        )
    return _report(
        "slide",
        device,
        results,
        summary,
        size=[h, w],
        crop_size=list(inference.crop_size),
        stride=list(inference.stride),
        warmup=warmup,
        trainer=_switches(trainer_options),
    )


# ---------------------------------------------------------------------------- conversion
def bench_convert(
    *,
    classifier: str | Callable[[], nn.Module] = "vgg16",
    size: int = 384,
    crop: int = 224,
    stride: int = 32,
    device: str = "auto",
    warmup: int,
    iters: int,
) -> dict[str, Any]:
    """Dense scoring of a ``size`` image by the converted classifier in one pass, against the
    original classifier run on every ``crop`` window at ``stride`` (384 -> 6x6 = 36 windows for
    VGG16), the windows batched or one at a time. Random weights: the cost is the same.

    ``classifier`` names a ``torchvision.models`` builder, or is a callable returning a model;
    ``fcnseg.models.convert.fully_convolutional`` converts it.
    """
    import torchvision

    from fcnseg.models.convert import fully_convolutional
    from fcnseg.utils.distributed import resolve_device

    dev = resolve_device(device)
    build = classifier if callable(classifier) else getattr(torchvision.models, classifier, None)
    if build is None or not callable(build):
        raise UserError(f"bench.classifier={classifier!r} is not a torchvision.models classifier")
    if size < crop:
        raise UserError(f"bench.size={size} must be at least bench.crop={crop}")
    torch.manual_seed(0)
    make = build if callable(classifier) else partial(build, weights=None)
    original = make().eval()
    # A copy, so that a conversion that reuses or changes modules leaves the original alone.
    dense = fully_convolutional(copy.deepcopy(original)).eval()
    original, dense = original.to(dev), dense.to(dev)
    image = torch.randn(1, 3, size, size, device=dev)
    starts = range(0, size - crop + 1, stride)
    windows = [(y, x) for y in starts for x in starts]

    def one_pass() -> torch.Tensor:
        with torch.inference_mode():
            return dense(image)

    def crops_batched() -> torch.Tensor:
        with torch.inference_mode():
            return original(torch.cat([image[..., y : y + crop, x : x + crop] for y, x in windows]))

    def crops_one_by_one() -> list[torch.Tensor]:
        with torch.inference_mode():
            return [original(image[..., y : y + crop, x : x + crop]) for y, x in windows]

    score_map = list(one_pass().shape[-2:])
    calls = {
        "dense one pass": one_pass,
        f"{len(windows)} crops batched": crops_batched,
        f"{len(windows)} crops one by one": crops_one_by_one,
    }
    flops = {name: count_flops(fn) for name, fn in calls.items()}
    timed = time_calls(calls, device=dev, warmup=warmup, iters=iters)
    results = [summarize(n, timed[n], images_per_call=1, flops=flops[n]) for n in calls]
    speed = [r["images_per_s"] for r in results]
    summary = {
        "windows": len(windows),
        "score_map": score_map,
        "one_pass_vs_crops_batched_speed": speed[0] / speed[1],
        "one_pass_vs_crops_one_by_one_speed": speed[0] / speed[2],
    }
    name = classifier if isinstance(classifier, str) else type(original).__name__
    return _report(
        "convert",
        dev,
        results,
        summary,
        classifier=name,
        conversion="fcnseg.models.convert.fully_convolutional",
        size=size,
        crop=crop,
        stride=stride,
        warmup=warmup,
    )


# ---------------------------------------------------------------------------- metrics
class _CallCounter(TorchFunctionMode):
    """Counts torch calls by name, and the reads that make the host wait for the device."""

    HOST_READS = {"__int__", "__float__", "__bool__", "item", "tolist", "cpu", "numpy"}

    def __init__(self) -> None:
        super().__init__()
        self.bincounts = 0
        self.bincount_devices: set[str] = set()
        self.host_reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name == "bincount":
            self.bincounts += 1
            self.bincount_devices.add(str(args[0].device))
        elif name in self.HOST_READS:
            self.host_reads += 1
        return func(*args, **(kwargs or {}))


def _per_image_host_update(
    confusion: np.ndarray,
    pred: torch.Tensor,
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int,
) -> None:
    """The pattern SegMetrics avoids: every image copied to the host and counted there."""
    for p, t in zip(pred, target):
        p, t = p.cpu().numpy().ravel(), t.cpu().numpy().ravel()
        keep = t != ignore_index
        confusion += np.bincount(t[keep] * num_classes + p[keep], minlength=num_classes**2).reshape(
            num_classes, num_classes
        )


def bench_metrics(
    *,
    num_classes: int,
    ignore_index: int = 255,
    size: int,
    batch: int,
    device: str = "auto",
    warmup: int,
    iters: int,
) -> dict[str, Any]:
    """``SegMetrics.update`` on a batch of label maps where they were predicted, with the number
    of bincounts and host reads it makes per batch; and, for scale, a per-image host count."""
    from fcnseg.utils.distributed import resolve_device

    dev = resolve_device(device)
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, num_classes, (batch, size, size), generator=g).to(dev)
    target = torch.randint(0, num_classes, (batch, size, size), generator=g)
    target[..., : size // 16, :] = ignore_index
    target = target.to(dev)
    metrics = SegMetrics(num_classes, ignore_index)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    with _CallCounter() as counter:
        metrics.update(pred, target)
    calls = {
        "SegMetrics.update (one bincount per batch)": partial(metrics.update, pred, target),
        "per-image host bincount (numpy)": partial(
            _per_image_host_update, confusion, pred, target, num_classes, ignore_index
        ),
    }
    timed = time_calls(calls, device=dev, warmup=warmup, iters=iters)
    results = [
        summarize(
            n,
            timed[n],
            images_per_call=batch,
            mpixels_per_s=batch * size * size / statistics.median(timed[n].seconds) / 1e6,
        )
        for n in calls
    ]
    summary = {
        "bincount_calls_per_batch": counter.bincounts,
        "bincount_device": ",".join(sorted(counter.bincount_devices)),
        "host_reads_per_batch": counter.host_reads,
        "segmetrics_vs_per_image_host_speed": results[0]["images_per_s"]
        / results[1]["images_per_s"],
    }
    return _report(
        "metrics",
        dev,
        results,
        summary,
        size=size,
        batch=batch,
        num_classes=num_classes,
        warmup=warmup,
    )


# ---------------------------------------------------------------------------- data
def write_voc_layout(
    root: str | Path,
    *,
    num_images: int = 16,
    size: tuple[int, int] = VOC_SIZE,
    num_classes: int = 21,
    seed: int = 0,
    quality: int = 90,
) -> Path:
    """Writes a small dataset in the PASCAL VOC 2012 layout and formats; returns ``root``.

    ``root/VOC2012/JPEGImages/<id>.jpg`` (RGB JPEG), ``SegmentationClass/<id>.png`` (palette PNG
    of class indices, 255 on a 5-pixel band along object borders as in VOC) and
    ``ImageSets/Segmentation/{train,val}.txt``. The pictures are smooth gradients with a few
    textured objects, so that JPEG decoding costs what it costs on photographs, not on noise.
    """
    import cv2
    from PIL import Image

    from fcnseg.utils.visualize import palette

    base = Path(root) / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    flat_palette = np.asarray(palette(256), dtype=np.uint8).reshape(-1).tolist()
    ids = [f"2007_{i:06d}" for i in range(num_images)]
    for name in ids:
        image = np.empty((h, w, 3), np.float32)
        for c in range(3):
            a, b, d = rng.uniform(-0.3, 0.3, size=3)
            image[..., c] = 128 + 100 * np.sin(a * xx / 20 + b * yy / 20 + d * 10)
        mask = np.zeros((h, w), np.uint8)
        for _ in range(rng.integers(1, 4)):
            cls = int(rng.integers(1, num_classes))
            cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
            ry, rx = rng.uniform(0.1, 0.3) * h, rng.uniform(0.1, 0.3) * w
            region = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            image[region] = rng.uniform(0, 255, 3) + 30 * np.sin(
                xx[region, None] / rng.uniform(2, 6)
            )
            mask[region] = cls
        edges = cv2.morphologyEx(mask, cv2.MORPH_GRADIENT, np.ones((5, 5), np.uint8)) > 0
        mask[edges] = 255
        image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(base / "JPEGImages" / f"{name}.jpg", quality=quality)
        label = Image.fromarray(mask, mode="P")
        label.putpalette(flat_palette)
        label.save(base / "SegmentationClass" / f"{name}.png")
    half = max(1, num_images // 2)
    (base / "ImageSets/Segmentation/train.txt").write_text("\n".join(ids[:half]) + "\n")
    (base / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids[half:] or ids[:1]) + "\n")
    return Path(root)


class VOCLayout(SegmentationDataset):
    """Reads the VOC 2012 layout that ``write_voc_layout`` writes (and VOC itself has).

    JPEGs are decoded by OpenCV (the fastest decoder measured here), palette PNGs by Pillow,
    which returns their class indices rather than colours.
    """

    def __init__(self, *, root: str | Path, split: str = "train", **kwargs) -> None:
        kwargs.setdefault("num_classes", 21)
        super().__init__(**kwargs)
        base = Path(root) / "VOC2012"
        if not base.is_dir():
            base = Path(root) / "VOCdevkit" / "VOC2012"
        listing = base / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not listing.is_file():
            raise UserError(f"dataset.root={root}: {listing} does not exist")
        self.base = base
        self.ids = listing.read_text().split()

    def __len__(self) -> int:
        return len(self.ids)

    def describe(self, index: int) -> str:
        return str(self.base / "JPEGImages" / f"{self.ids[index]}.jpg")

    def load(self, index: int):
        import cv2
        from PIL import Image

        name = self.ids[index]
        bgr = cv2.imread(str(self.base / "JPEGImages" / f"{name}.jpg"), cv2.IMREAD_COLOR)
        if bgr is None:
            raise UserError(f"{self.describe(index)} cannot be read as an image")
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        mask = np.asarray(Image.open(self.base / "SegmentationClass" / f"{name}.png"))
        return image, mask


def decoder_speeds(files: Sequence[Path], *, repeat: int = 3) -> dict[str, float]:
    """Milliseconds per JPEG (median) for Pillow, OpenCV and torchvision.io, to RGB uint8."""
    import cv2
    from PIL import Image

    decoders: dict[str, Callable[[Path], Any]] = {
        "pil": lambda p: np.asarray(Image.open(p).convert("RGB")),
        "opencv": lambda p: cv2.cvtColor(cv2.imread(str(p), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB),
    }
    with contextlib.suppress(ImportError):
        from torchvision.io import decode_jpeg, read_file

        decoders["torchvision.io"] = lambda p: (
            decode_jpeg(read_file(str(p))).permute(1, 2, 0).numpy()
        )
    times: dict[str, list[float]] = {name: [] for name in decoders}
    for _ in range(repeat):
        for path in files:
            for name, decode in decoders.items():  # interleaved, as in time_calls
                start = time.perf_counter()
                decode(path)
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def bench_data(
    *,
    dataset: SegmentationDataset,
    batch: int,
    num_workers: int,
    warmup: int,
    iters: int,
    ignore_index: int = 255,
    jpeg_files: Sequence[Path] = (),
) -> dict[str, Any]:
    """The training data pipeline alone: decode, label check, augmentation and tensors.

    In this process, one image at a time, each stage is timed separately: images/s is then the
    rate of one CPU core (one loader worker). With ``num_workers > 0`` the DataLoader with that
    many workers (and collation) is timed too, per batch of ``batch`` images.
    """
    transform = dataset.transform
    if transform is None:
        raise UserError("bench.mode=data needs a dataset with a training transform")
    stages: dict[str, list[float]] = {"decode": [], "check": [], "augment": [], "total": []}
    memory = PeakMemory(torch.device("cpu"))
    count = warmup + iters * batch
    memory.reset()
    for k in range(count):
        i = k % len(dataset)
        t0 = time.perf_counter()
        image, mask = dataset.load(i)
        t1 = time.perf_counter()
        dataset.check(i, image, mask)
        t2 = time.perf_counter()
        transform.reseed(k)
        transform(image, mask)
        t3 = time.perf_counter()
        if k >= warmup:
            for name, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                stages[name].append(seconds)
    timed = Timed(seconds=stages["total"], peak_bytes=memory.peak_bytes(), memory=memory.kind)
    per_core = sum(stages["total"])
    results = [
        summarize(
            "one worker (in process), per image",
            timed,
            images_per_call=1,
            throughput_images_per_s=len(stages["total"]) / per_core,
        )
    ]
    summary: dict[str, Any] = {
        "images_per_s_per_core": len(stages["total"]) / per_core,
        "median_ms_per_image": {k: 1e3 * statistics.median(v) for k, v in stages.items()},
    }
    if num_workers > 0:
        loader = train_loader(
            dataset, batch_size=batch, num_workers=num_workers, ignore_index=ignore_index
        )
        batches = iter(loader)
        loaded = time_calls(
            {"loader": lambda: next(batches)},
            device=torch.device("cpu"),
            warmup=max(1, warmup),
            iters=iters,
        )
        row = summarize(
            f"DataLoader, {num_workers} workers, per batch", loaded["loader"], images_per_call=batch
        )
        row["images_per_s_per_worker"] = row["images_per_s"] / num_workers
        results.append(row)
        del batches, loader
    if jpeg_files:
        summary["jpeg_decode_ms"] = decoder_speeds(jpeg_files)
    image, _ = dataset.load(0)
    return _report(
        "data",
        torch.device("cpu"),
        results,
        summary,
        batch=batch,
        num_workers=num_workers,
        warmup=warmup,
        dataset=type(dataset).__name__,
        images=len(dataset),
        first_image_size=[int(image.shape[1]), int(image.shape[0])],
    )


def voc_train_pipeline(
    *,
    root: str | Path | None,
    make_dataset: Callable[..., SegmentationDataset] | None,
    crop_size: int,
    normalize: str,
    ignore_index: int,
    scale_range: Sequence[float],
    hflip: bool,
    color_jitter: float,
    split: str,
    workdir: Path,
) -> tuple[SegmentationDataset, list[Path]]:
    """The dataset the data benchmark reads, with its training transform, and its JPEG files.

    With a ``root``, the configured dataset there; without, a VOC-layout folder of 500x375
    JPEG/PNG pairs written to ``workdir`` and read by ``VOCLayout``.
    """
    transform = build_transforms(
        train=True,
        normalize=normalize,
        ignore_index=ignore_index,
        crop_size=crop_size,
        scale_range=scale_range,
        hflip=hflip,
        color_jitter=color_jitter,
    )
    if root is None:
        root = write_voc_layout(workdir / "voc")
        dataset = VOCLayout(
            root=root, split="train", ignore_index=ignore_index, transform=transform
        )
    else:
        if make_dataset is None:
            raise UserError("dataset.root is set but the dataset config has no builder")
        dataset = make_dataset(split=split, transform=transform)
    jpegs = sorted(Path(root).rglob("*.jpg"))[:8]
    return dataset, jpegs


# ---------------------------------------------------------------------------- dispatch
def run_benchmark(
    *,
    options: Mapping[str, Any],
    build_model: Callable[[], nn.Module],
    optimizer: Callable[..., torch.optim.Optimizer],
    scheduler: Callable[[torch.optim.Optimizer], Any],
    trainer_options: Mapping[str, Any],
    dataset_options: Mapping[str, Any],
    make_dataset: Callable[..., SegmentationDataset] | None = None,
    inference: Any = None,
) -> dict[str, Any]:
    """Runs the measurement ``options["mode"]`` names and returns its report.

    Args:
        options: the ``bench`` settings: ``mode``, ``size``, ``batch``, ``warmup``, ``iters``,
            ``reference``, ``classifier``, ``crop``, ``stride``, ``threads`` (PyTorch's and
            OpenCV's threads in this process).
        build_model: makes the segmentation model (only the modes that need one call it).
        optimizer, scheduler: as the trainer takes them (``train`` mode).
        trainer_options: the ``trainer`` settings (device, amp, channels_last, compile, ...).
        dataset_options: the dataset's metadata (num_classes, ignore_index, root, normalize,
            scale_range, hflip, color_jitter, train_split).
        make_dataset: ``(split=, transform=) -> dataset`` reading ``dataset_options["root"]``.
        inference: an ``fcnseg.engine.inference.Inference`` (``slide`` mode).
    """
    mode = options["mode"]
    if options.get("threads"):
        import cv2

        torch.set_num_threads(int(options["threads"]))
        cv2.setNumThreads(int(options["threads"]))  # OpenCV resizes in parallel too
    ds = dataset_options
    timing = dict(warmup=int(options["warmup"]), iters=int(options["iters"]))
    shape = dict(size=int(options["size"]), batch=int(options["batch"]))
    device = str(trainer_options.get("device", "auto"))
    if mode == "train":
        return bench_train(
            model=build_model(),
            optimizer=optimizer,
            scheduler=scheduler,
            trainer_options=trainer_options,
            num_classes=ds["num_classes"],
            ignore_index=ds["ignore_index"],
            reference=bool(options.get("reference", False)),
            **shape,
            **timing,
        )
    if mode == "infer":
        return bench_infer(
            model=build_model(),
            trainer_options=trainer_options,
            num_classes=ds["num_classes"],
            reference=bool(options.get("reference", False)),
            **shape,
            **timing,
        )
    if mode == "slide":
        return bench_slide(
            model=build_model(),
            inference=inference,
            trainer_options=trainer_options,
            size=shape["size"],
            **timing,
        )
    if mode == "metrics":
        return bench_metrics(
            num_classes=ds["num_classes"], ignore_index=ds["ignore_index"], device=device,
            **shape, **timing,
        )  # fmt: skip
    if mode == "convert":
        return bench_convert(
            classifier=options.get("classifier", "vgg16"),
            size=shape["size"],
            crop=int(options.get("crop", 224)),
            stride=int(options.get("stride", 32)),
            device=device,
            **timing,
        )
    if mode == "data":
        with tempfile.TemporaryDirectory(prefix="fcnseg-bench-") as tmp:
            dataset, jpegs = voc_train_pipeline(
                root=ds.get("root"),
                make_dataset=make_dataset,
                crop_size=shape["size"],
                normalize=ds.get("normalize", "imagenet"),
                ignore_index=ds["ignore_index"],
                scale_range=ds.get("scale_range", (0.5, 2.0)),
                hflip=bool(ds.get("hflip", True)),
                color_jitter=float(ds.get("color_jitter", 0.0)),
                split=ds.get("train_split", "train"),
                workdir=Path(tmp),
            )
            return bench_data(
                dataset=dataset,
                batch=shape["batch"],
                num_workers=int(trainer_options.get("num_workers", 0)),
                ignore_index=ds["ignore_index"],
                jpeg_files=jpegs,
                **timing,
            )
    raise UserError(f"bench.mode={mode!r} is not one of {', '.join(MODES)}")


# ---------------------------------------------------------------------------- reports
def _switches(trainer_options: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("device", "amp", "channels_last", "compile", "accumulate")
    return {k: trainer_options[k] for k in keys if k in trainer_options}


def _report(
    mode: str,
    device: torch.device,
    results: list[dict[str, Any]],
    summary: dict[str, Any],
    **settings: Any,
) -> dict[str, Any]:
    return {
        "mode": mode,
        "settings": settings,
        "environment": environment(device),
        "results": results,
        "summary": summary,
    }


def write_report(report: Mapping[str, Any], path: str | Path | None) -> str:
    """Writes the JSON report to ``path`` (if given) and returns the text printed for humans."""
    import json

    text = json.dumps(report, indent=2, default=str)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    env = report["environment"]
    where = (
        env.get("gpu") or f"{env['cpu']} ({env['cpu_cores']} cores, {env['torch_threads']} threads)"
    )
    buffer = io.StringIO()
    print(f"{report['mode']} on {where}, torch {env['torch']}", file=buffer)
    print(f"settings: {json.dumps(report['settings'], default=str)}", file=buffer)
    print(format_table(report), file=buffer)
    return buffer.getvalue()
