"""CPU inference, timed by runtime: eager PyTorch in fp32 and under bf16 autocast, and the same
network exported to ONNX (``fcnseg.deploy``) run by onnxruntime in fp32."""

from __future__ import annotations

import contextlib
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fcnseg.bench.common import count_flops, make_report, summarize, time_calls, use_threads
from fcnseg.errors import UserError

VARIANTS = ("eager_fp32", "eager_bf16", "onnxruntime_fp32")


def time_deployment(
    *,
    model: nn.Module,
    height: int = 375,
    width: int = 500,
    batch: int = 1,
    warmup: int = 2,
    iters: int = 10,
    variants: tuple[str, ...] | list[str] = VARIANTS,
    threads: int | None = None,
) -> dict[str, Any]:
    """Times forward + argmax of ``batch`` random ``height`` x ``width`` images on the CPU, per
    runtime, interleaved call by call.

    Every variant's labels are compared with eager fp32's on the timed batch
    (``label_agreement``): a faster path that changes the labels is not the same model. The
    zero-initialised weights of a fresh model (the FCN score layers) are made random first.

    Args:
        model: the network (random weights time the same as trained ones).
        height, width: the image size (500x375: a typical PASCAL VOC image).
        batch: images per call.
        warmup, iters: untimed calls first, then timed calls.
        variants: a subset of ``eager_fp32``, ``eager_bf16``, ``onnxruntime_fp32``.
        threads: PyTorch's, OpenCV's and onnxruntime's intra-op threads (``None``: defaults).
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"bench.variants: {', '.join(unknown)} not among {', '.join(VARIANTS)}")
    use_threads(threads)
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
    nets: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        if "eager_fp32" in variants:
            nets["eager_fp32"] = model
        if "eager_bf16" in variants:
            nets["eager_bf16"] = model
        if "onnxruntime_fp32" in variants:
            from fcnseg.deploy.onnx import OnnxModel, export_onnx

            folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            path = export_onnx(model, folder / "model.onnx")
            nets["onnxruntime_fp32"] = OnnxModel(
                path, providers=["CPUExecutionProvider"], threads=threads
            )

        def predict(name: str) -> torch.Tensor:
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "eager_bf16")
            with torch.inference_mode(), autocast:
                return nets[name](images).argmax(1)

        reference = predict("eager_fp32") if "eager_fp32" in nets else None
        agreement = {
            name: float((predict(name) == reference).float().mean())
            if reference is not None
            else None
            for name in nets
        }
        flops = (
            count_flops(partial(predict, next(n for n in nets if n.startswith("eager"))))
            if any(n.startswith("eager") for n in nets)
            else None
        )
        timed = time_calls(
            {name: partial(predict, name) for name in nets},
            device=device,
            warmup=warmup,
            iters=iters,
        )
    results = [
        summarize(
            name, timed[name], images_per_call=batch, flops=flops, label_agreement=agreement[name]
        )
        for name in nets
    ]
    speed = {r["name"]: r["images_per_s"] for r in results}
    summary = {
        f"{name}_vs_eager_fp32_speed": speed[name] / speed["eager_fp32"]
        for name in speed
        if name != "eager_fp32" and "eager_fp32" in speed
    }
    summary.update(
        {f"{name}_label_agreement": agreement[name] for name in nets if name != "eager_fp32"}
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
        threads=threads,
        cpu_flags=_cpu_flags(),
    )


def _cpu_flags() -> list[str]:
    """The CPU's vector and matrix extensions that decide these speeds (AVX-512, VNNI, BF16,
    AMX), from ``/proc/cpuinfo``."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                keep = (
                    "avx2",
                    "avx512f",
                    "avx512_vnni",
                    "avx512_bf16",
                    "amx_bf16",
                    "amx_int8",
                    "avx_vnni",
                )
                return [f for f in keep if f in flags]
    return []
