"""Parameter groups: biases, and the backbone, at their own learning rate and weight decay.

The FCN reference nets (as Caffe's VGG16 before them) train every bias at twice the learning
rate and without weight decay (``param { lr_mult: 2 decay_mult: 0 }``). ``with_param_groups``
wraps an optimizer factory (a Hydra ``_partial_``) so that the trainer, which calls it with the
trainable parameters, gets an optimizer with a weights group and a biases group. A pretrained
backbone may also learn at a fraction of the head's rate (``backbone_lr_mult``), a common
choice when fine-tuning ImageNet weights under a freshly initialised head.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from fcnseg.errors import UserError

OptimizerFactory = Callable[..., torch.optim.Optimizer]


#: the prefix of the backbone's parameters in a ``SegmentationModel``.
BACKBONE_PREFIX = "backbone."


def is_bias(name: str) -> bool:
    """Whether the parameter called ``name`` is a bias (of a convolution, Linear or norm)."""
    return name == "bias" or name.endswith(".bias")


def is_backbone(name: str) -> bool:
    """Whether the parameter called ``name`` belongs to the model's backbone."""
    return name.startswith(BACKBONE_PREFIX)


def with_param_groups(
    optimizer: OptimizerFactory,
    model: nn.Module,
    *,
    bias_lr_mult: float = 1.0,
    bias_weight_decay: float | None = None,
    backbone_lr_mult: float = 1.0,
) -> Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]:
    """``optimizer`` (``params -> Optimizer``) with biases, and the backbone's parameters, in
    groups of their own.

    Args:
        optimizer: builds the optimizer from parameters (or parameter groups) with its base
            learning rate and weight decay.
        model: the model the parameters come from, to tell them by name.
        bias_lr_mult: the biases' learning rate is ``bias_lr_mult`` times the base one (the
            FCN paper: 2).
        bias_weight_decay: the biases' weight decay; ``None`` keeps the optimizer's (the FCN
            paper: 0).
        backbone_lr_mult: the learning rate of the parameters whose name starts with
            ``backbone.`` is ``backbone_lr_mult`` times the base one (a pretrained backbone
            fine-tuned more gently than the new head); it multiplies ``bias_lr_mult`` for the
            backbone's biases.

    The groups, those that have parameters, split only along the options in use: the head's
    weights (at the base learning rate, first, so that the logged ``lr`` is the base one), the
    head's biases, the backbone's weights, the backbone's biases. Schedulers scale every
    group's initial learning rate by the same factor, so the ratios hold all along. With every
    option at its default the optimizer is built as it is, with one group. Parameters not
    found in ``model`` count as the head's weights.
    """
    if bias_lr_mult == 1.0 and bias_weight_decay is None and backbone_lr_mult == 1.0:
        return optimizer

    # Split only along the options in use: a run's optimizer state (checkpoints) keeps the
    # groups it was saved with.
    by_backbone = (False, True) if backbone_lr_mult != 1.0 else (None,)
    by_bias = (False, True) if bias_lr_mult != 1.0 or bias_weight_decay is not None else (None,)

    def build(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        names = {id(p): name for name, p in model.named_parameters()}
        params = list(params)
        kinds = []  # (in the backbone, a bias) of each group; None: either
        groups = []
        for backbone in by_backbone:
            for bias in by_bias:
                group = [
                    p
                    for p in params
                    if backbone in (None, is_backbone(names.get(id(p), "")))
                    and bias in (None, is_bias(names.get(id(p), "")))
                ]
                if group:
                    kinds.append((backbone, bias))
                    groups.append({"params": group})
        opt = optimizer(groups)
        # The optimizer filled in its defaults (base lr, weight decay); adjust the others'.
        for group, (backbone, bias) in zip(opt.param_groups, kinds):
            group["lr"] *= (backbone_lr_mult if backbone else 1.0) * (bias_lr_mult if bias else 1.0)
            if bias and bias_weight_decay is not None:
                group["weight_decay"] = bias_weight_decay
        return opt

    return build


def build_optimizer(optimizer: OptimizerFactory, model: nn.Module) -> torch.optim.Optimizer:
    """``optimizer`` over ``model``'s trainable parameters; invalid settings are one sentence."""
    try:
        built = optimizer([p for p in model.parameters() if p.requires_grad])
    except ValueError as err:  # torch's own checks: "Invalid learning rate: -1.0"
        raise UserError(f"the optimizer refused its settings (optimizer.*): {err}") from err
    except TypeError as err:  # a key of another optimizer's (SGD's momentum given to AdamW)
        unknown = re.search(
            r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", str(err)
        )
        if unknown is None:
            raise
        name, key = unknown.groups()
        raise UserError(
            f"optimizer.{key} is not a setting of {name}; remove it with '~optimizer.{key}'"
        ) from err
    for group in built.param_groups:  # SGD lets a NaN learning rate through
        if not 0 <= float(group["lr"]) < math.inf:
            raise UserError(
                f"the optimizer refused its settings (optimizer.*): Invalid learning rate: "
                f"{group['lr']}"
            )
    return built
