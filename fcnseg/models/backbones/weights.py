"""The one loader of pretrained backbone weights: none, a local file, or torchvision's ImageNet.

Every backbone builder ends with ``load_pretrained``, which resolves where the weights come
from (as timm's ``build_model_with_cfg`` does for its models) and hands a torchvision-format
state dict to the backbone's own ``load_torchvision``, which maps it onto its layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from fcnseg.errors import UserError
from fcnseg.utils.checkpoint import error_summary, load_weights_only

Backbone = TypeVar("Backbone", bound=nn.Module)


def load_pretrained(
    model: Backbone,
    *,
    name: str,
    arch: str | None,
    pretrained: bool,
    weights: str | Path | None,
) -> Backbone:
    """Loads ``model``'s weights from the source asked for and returns it.

    Args:
        model: a freshly built backbone with a ``load_torchvision(state_dict)`` method.
        name: the backbone's name, for messages (``vgg16_bn``).
        arch: the torchvision model whose ImageNet weights fit it (``vgg16_bn``), or ``None``
            where there are none (``vgg_tiny``).
        pretrained: torchvision's ImageNet weights (downloaded once into the torch hub cache).
        weights: a local torchvision-format state dict; it takes precedence over ``pretrained``.

    Raises:
        UserError: the source is unavailable or its weights do not fit the backbone.
    """
    if weights is not None:
        source = f"backbone.weights={weights}"
        state = local_state_dict(weights)
    elif pretrained:
        if arch is None:
            raise UserError(f"{name} has no pretrained weights; use backbone.pretrained=false")
        source = f"torchvision's ImageNet {arch} weights"
        state = torchvision_state_dict(arch)
    else:
        return model
    try:
        model.load_torchvision(state)
    except (KeyError, RuntimeError, UserError) as err:
        detail = str(err) if isinstance(err, UserError) else error_summary(err)
        what = "is not" if weights is not None else "are not"
        raise UserError(
            f"{source} {what} a torchvision {arch or name} state dict that fits backbone {name} "
            f"({detail})"
        ) from err
    return model


def torchvision_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's default ImageNet weights of ``arch``, from the torch hub cache or the web."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(arch).DEFAULT
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a bad hash a RuntimeError
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise UserError(
            f"could not download torchvision's ImageNet {arch} weights ({error_summary(err)}); "
            f"put {weights.url} at {cached}, or pass backbone.weights=PATH to a copy of it, or "
            f"train from scratch with backbone.pretrained=false"
        ) from err


def local_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A torchvision-format state dict saved with ``torch.save`` (or a ``{"state_dict": ...}``)."""
    state = load_weights_only(path, what=f"backbone.weights={path}")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"backbone.weights={path} holds no state dict of tensors")
    return state
