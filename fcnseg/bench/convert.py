"""Dense scoring, timed: a classifier made fully convolutional, one pass over an image, against
the original classifier on every window that the score map's cells stand for."""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from fcnseg.bench.common import (
    count_flops,
    make_report,
    summarize,
    time_calls,
    use_threads,
)
from fcnseg.errors import UserError
from fcnseg.models.convert import fully_convolutional
from fcnseg.utils.distributed import resolve_device


def time_dense_scoring(
    *,
    classifier: str | Callable[[], nn.Module] = "vgg16",
    size: int = 384,
    crop: int = 224,
    stride: int = 32,
    device: str = "auto",
    warmup: int,
    iters: int,
    threads: int | None = None,
) -> dict[str, Any]:
    """Dense scoring of a ``size`` image by the converted classifier in one pass, against the
    original classifier run on every ``crop`` window at ``stride`` (384 -> 6x6 = 36 windows for
    VGG16), the windows batched or one at a time. Random weights: the cost is the same.

    ``classifier`` names a ``torchvision.models`` builder, or is a callable returning a model;
    ``fcnseg.models.convert.fully_convolutional`` converts it. ``threads``: PyTorch's and
    OpenCV's CPU threads (``None``: their defaults).
    """
    import torchvision

    use_threads(threads)
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
    return make_report(
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
