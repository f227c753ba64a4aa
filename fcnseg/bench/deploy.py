"""Real-time CPU inference, timed by runtime: eager PyTorch in fp32 (NCHW, and NHWC: channels_last,
what oneDNN's convolutions prefer) and under bf16 autocast, and
the same network exported at the measured size (``fcnseg.deploy``, ``input_size``: the portable
file a deployment ships) run by onnxruntime in fp32 and statically quantized to INT8; one
image per call (a video frame), at each thread count asked."""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fcnseg.bench.common import count_flops, make_report, summarize, time_calls, use_threads
from fcnseg.errors import UserError
from fcnseg.utils.cpu import cpu_flags

CHANNELS_LAST = torch.channels_last

VARIANTS = (
    "eager_fp32",
    "eager_fp32_channels_last",
    "eager_bf16",
    "onnxruntime_fp32",
    "onnxruntime_int8",
)


def time_deployment(
    *,
    model: nn.Module,
    height: int = 375,
    width: int = 500,
    batch: int = 1,
    warmup: int = 2,
    iters: int = 10,
    variants: Sequence[str] = VARIANTS,
    threads: int | Sequence[int] | None = (1, 2),
    calibration_images: int = 8,
) -> dict[str, Any]:
    """Times forward + argmax of ``batch`` random ``height`` x ``width`` images on the CPU, per
    runtime and thread count, interleaved call by call.

    Every variant's labels are compared with eager fp32's on the timed batch
    (``label_agreement``): a faster path that changes the labels is not the same model. The
    zero-initialised weights of a fresh model (the FCN score layers) are made random first.
    The INT8 file is calibrated on ``calibration_images`` random images: its speed is that of
    a trained model's, its agreement with random weights says little (``fcnseg-export
    quantize=int8`` reports a trained model's on held-out images).

    Args:
        model: the network (random weights time the same as trained ones).
        height, width: the image size (500x375: a typical PASCAL VOC image).
        batch: images per call (1: real time, frame by frame).
        warmup, iters: untimed calls first, then timed calls.
        variants: a subset of ``VARIANTS``.
        threads: PyTorch's, OpenCV's and onnxruntime's intra-op threads, one measurement per
            count (``None``: their defaults).
        calibration_images: random images that calibrate the INT8 file.
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"bench.variants: {', '.join(unknown)} not among {', '.join(VARIANTS)}")
    counts = [threads] if threads is None or isinstance(threads, int) else list(threads)
    device = torch.device("cpu")
    model = model.cpu().eval()
    with torch.no_grad():
        # The FCN score layers start at zero (the paper's init): all-zero logits would make
        # every runtime's labels "agree". Random values cost the same time.
        generator = torch.Generator().manual_seed(0)
        for param in model.parameters():
            if param.dim() > 1 and not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    images = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(0))
    results, summary = [], {}
    with contextlib.ExitStack() as stack:
        files = {}
        if any(v.startswith("onnxruntime") for v in variants):
            from fcnseg.deploy.export import export_onnx

            folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            files["onnxruntime_fp32"] = export_onnx(
                model, folder / "fp32.onnx", input_size=(height, width)
            )
            if "onnxruntime_int8" in variants:
                from fcnseg.deploy.quantize import quantize_onnx

                g = torch.Generator().manual_seed(1)
                calibration = [
                    torch.randn(3, height, width, generator=g) for _ in range(calibration_images)
                ]
                files["onnxruntime_int8"] = quantize_onnx(
                    files["onnxruntime_fp32"], folder / "int8.onnx", calibration
                )
        for count in counts:
            rows, speed = _measure(
                model, images, variants, files, threads=count, warmup=warmup, iters=iters
            )
            results += rows
            tag = f"_{count}t" if count else ""
            for name, value in speed.items():
                if name != "eager_fp32" and "eager_fp32" in speed:
                    summary[f"{name}{tag}_vs_eager_fp32_speed"] = value / speed["eager_fp32"]
            summary.update(
                {
                    f"{r['variant']}{tag}_label_agreement": r["label_agreement"]
                    for r in rows
                    if r["variant"] != "eager_fp32"
                }
            )
    return make_report(
        "deploy",
        device,
        results,
        summary,
        height=height,
        width=width,
        batch=batch,
        warmup=warmup,
        iters=iters,
        threads=counts,
        cpu_flags=_cpu_flags(),
    )


def _measure(
    model: nn.Module,
    images: torch.Tensor,
    variants: Sequence[str],
    files: dict[str, Path],
    *,
    threads: int | None,
    warmup: int,
    iters: int,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """The result rows (named ``VARIANT@Nt``) and images per second of every variant at
    ``threads`` threads."""
    from fcnseg.deploy.session import OnnxModel

    use_threads(threads)
    nets: dict[str, Any] = {v: model for v in variants if v.startswith("eager")}
    if "eager_fp32_channels_last" in nets:
        nets["eager_fp32_channels_last"] = copy.deepcopy(model).to(memory_format=CHANNELS_LAST)
    for name in variants:
        if name in files:
            nets[name] = OnnxModel(files[name], providers=["CPUExecutionProvider"], threads=threads)

    def predict(name: str) -> torch.Tensor:
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "eager_bf16")
        layout = CHANNELS_LAST if name == "eager_fp32_channels_last" else torch.contiguous_format
        with torch.inference_mode(), autocast:
            return nets[name](images.to(memory_format=layout)).argmax(1)

    reference = predict("eager_fp32") if "eager_fp32" in nets else None
    agreement = {
        name: float((predict(name) == reference).float().mean()) if reference is not None else None
        for name in nets
    }
    eager = [n for n in nets if n.startswith("eager")]
    flops = count_flops(partial(predict, eager[0])) if eager else None
    timed = time_calls(
        {name: partial(predict, name) for name in nets},
        device=torch.device("cpu"),
        warmup=warmup,
        iters=iters,
    )
    tag = f"@{threads}t" if threads else ""
    rows = [
        summarize(
            f"{name}{tag}",
            timed[name],
            images_per_call=images.shape[0],
            flops=flops,
            label_agreement=agreement[name],
            variant=name,
            threads=threads,
        )
        for name in nets
    ]
    return rows, {r["variant"]: r["images_per_s"] for r in rows}


def _cpu_flags() -> list[str]:
    """The CPU's vector and matrix extensions that decide these speeds (AVX-512, VNNI, BF16,
    AMX), from ``/proc/cpuinfo`` (none where it cannot be read)."""
    flags = cpu_flags() or frozenset()
    keep = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni")
    return [f for f in keep if f in flags]
