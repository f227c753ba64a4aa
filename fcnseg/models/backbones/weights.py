"""ImageNet weights: torchvision's weights API online, a local state dict offline."""

from __future__ import annotations

from pathlib import Path

import torch

from fcnseg.errors import UserError


def torchvision_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """Downloads (or reads from the torch hub cache) torchvision's default ImageNet weights."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(arch).DEFAULT
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise UserError(
            f"could not download the ImageNet weights of {arch} from {weights.url} ({err}); "
            f"either connect to the internet, pass backbone.weights=PATH to a local copy of that "
            f"file (torchvision format), or train from scratch with backbone.pretrained=false"
        ) from err


def load_local_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a torchvision-format state dict saved with ``torch.save``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"backbone.weights={path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(
            f"backbone.weights={path} is not a readable PyTorch state dict ({err})"
        ) from err
    return state.get("state_dict", state) if isinstance(state, dict) else state
