"""Parameter groups: biases at their own learning rate and weight decay.

The FCN reference nets (as Caffe's VGG16 before them) train every bias at twice the learning
rate and without weight decay (``param { lr_mult: 2 decay_mult: 0 }``). ``with_param_groups``
wraps an optimizer factory (a Hydra ``_partial_``) so that the trainer, which calls it with the
trainable parameters, gets an optimizer with a weights group and a biases group.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from fcnseg.errors import UserError

OptimizerFactory = Callable[..., torch.optim.Optimizer]


def is_bias(name: str) -> bool:
    """Whether the parameter called ``name`` is a bias (of a convolution, Linear or norm)."""
    return name == "bias" or name.endswith(".bias")


def with_param_groups(
    optimizer: OptimizerFactory,
    model: nn.Module,
    *,
    bias_lr_mult: float = 1.0,
    bias_weight_decay: float | None = None,
) -> Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]:
    """``optimizer`` (``params -> Optimizer``) with biases in a group of their own.

    Args:
        optimizer: builds the optimizer from parameters (or parameter groups) with its base
            learning rate and weight decay.
        model: the model the parameters come from, to tell biases by name.
        bias_lr_mult: the biases' learning rate is ``bias_lr_mult`` times the base one (the
            FCN paper: 2). Schedulers scale both groups alike.
        bias_weight_decay: the biases' weight decay; ``None`` keeps the optimizer's (the FCN
            paper: 0).

    With ``bias_lr_mult=1`` and no ``bias_weight_decay`` the optimizer is built as it is, with
    one group. Parameters not found in ``model`` count as weights.
    """
    if bias_lr_mult == 1.0 and bias_weight_decay is None:
        return optimizer

    def build(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        names = {id(p): name for name, p in model.named_parameters()}
        params = list(params)
        biases = [p for p in params if is_bias(names.get(id(p), ""))]
        bias_ids = {id(p) for p in biases}
        weights = [p for p in params if id(p) not in bias_ids]
        groups = [{"params": group} for group in (weights, biases) if group]
        opt = optimizer(groups)
        if biases:
            # The optimizer filled in its defaults (base lr, weight decay); adjust the biases'.
            group = opt.param_groups[-1]
            group["lr"] = group["lr"] * bias_lr_mult
            if bias_weight_decay is not None:
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
