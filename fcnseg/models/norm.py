"""BatchNorm for fine-tuning with small batches: frozen layers, or statistics recalibrated.

A pretrained backbone's BatchNorm layers hold ImageNet's statistics. Fine-tuned in training
mode on batches of a few crops, they normalise with each batch's own statistics instead, noisy
and unlike those the weights were trained with; two remedies:

- ``freeze_batch_norm`` replaces them by ``torchvision.ops.FrozenBatchNorm2d``: a fixed affine
  map computed from the loaded statistics and affine parameters, in training as in evaluation
  (what detectron2 and torchvision's detection references do for their backbones).
  ``FrozenBatchNorm2d`` keeps ``weight``, ``bias``, ``running_mean`` and ``running_var`` as
  buffers under the same names, so checkpoints load either way (only BatchNorm's
  ``num_batches_tracked`` counter is gone); SyncBatchNorm conversion passes it by.
- ``recalibrate_batch_norm`` keeps them trainable but first replaces their running statistics
  by the average over some training batches (for weights whose statistics do not fit the
  data, e.g. BatchNorm folded into the convolutions), as SWA's ``update_bn`` does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fcnseg.errors import UserError

#: the BatchNorm layers ``freeze_batch_norm`` replaces (a SyncBatchNorm is a BatchNorm2d whose
#: statistics span processes: frozen, there is nothing left to synchronise).
FREEZABLE = (nn.BatchNorm2d, nn.SyncBatchNorm)


def freeze_batch_norm(module: nn.Module) -> int:
    """Replaces every BatchNorm2d inside ``module`` by a ``FrozenBatchNorm2d`` of its values.

    The frozen layer holds bit-identical copies of the layer's running mean and variance and
    its affine weight and bias (1 and 0 without ``affine``), and its ``eps``; it computes the
    layer's evaluation-mode output, in training mode too, and has no parameters: an optimizer
    built afterwards never changes it. ``module`` itself is modified in place (a bare
    BatchNorm cannot replace itself: pass its parent).

    Returns:
        The number of layers frozen.

    Raises:
        UserError: a layer keeps no running statistics to freeze.
    """
    from torchvision.ops import FrozenBatchNorm2d  # here: only frozen backbones need it

    count = 0
    for name, child in module.named_children():
        if isinstance(child, FREEZABLE):
            if not child.track_running_stats or child.running_mean is None:
                raise UserError(
                    f"cannot freeze BatchNorm layer {name}: it keeps no running statistics"
                )
            mean = child.running_mean
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen = frozen.to(device=mean.device, dtype=mean.dtype)
            with torch.no_grad():
                frozen.running_mean.copy_(mean)
                frozen.running_var.copy_(child.running_var)
                if child.affine:
                    frozen.weight.copy_(child.weight)
                    frozen.bias.copy_(child.bias)
            setattr(module, name, frozen)
            count += 1
        else:
            count += freeze_batch_norm(child)
    return count


def batch_norm_layers(module: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``module`` that keep running statistics (frozen ones do not
    count: they are not BatchNorm layers any more)."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def recalibrate_batch_norm(model: nn.Module, batches: Iterable[torch.Tensor]) -> tuple[int, int]:
    """Replaces the running statistics of ``model``'s BatchNorm layers by their average over
    ``batches``.

    Every layer's statistics are reset, then each batch of images goes forward in training
    mode without gradients, with the layers' ``momentum`` at ``None``: PyTorch's cumulative
    average, so that the running mean is the mean of the batches' means and the running
    variance the mean of their (unbiased) variances, each batch weighing the same. Afterwards
    every module's training mode and every layer's momentum are what they were; nothing but
    the BatchNorm buffers changes (run it under ``torch.random.fork_rng`` to keep dropout's
    draws out of the random stream too).

    Args:
        model: maps an image batch to anything; its BatchNorm layers are recalibrated.
        batches: image batches, on the model's device and in its memory layout.

    Returns:
        (layers recalibrated, batches seen). With no batch at all nothing changes.
    """
    layers = batch_norm_layers(model)
    if not layers:
        return 0, 0
    momenta = [layer.momentum for layer in layers]
    modes = [(m, m.training) for m in model.modules()]
    seen = 0
    try:
        model.train()
        with torch.no_grad():
            for images in batches:
                if seen == 0:  # reset only once a batch exists: no batch leaves them alone
                    for layer in layers:
                        layer.reset_running_stats()
                        layer.momentum = None
                model(images)
                seen += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        for m, training in modes:
            m.training = training
    return len(layers), seen
