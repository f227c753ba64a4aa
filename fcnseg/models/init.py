"""Staged initialisation: start a finer FCN from a trained coarser one.

The paper trains FCN-32s from ImageNet weights, then FCN-16s from the trained FCN-32s, then
FCN-8s from FCN-16s. Each stage copies every layer the two nets share (the backbone,
``score_fr``, and from 16s to 8s also ``upscore2`` and ``score_pool4``); the layers it adds
keep their fresh initialisation: zero score layers and bilinear upsampling, so the new net
starts from the coarser net's scores, only upsampled in more steps (Caffe's
``surgery.transplant`` then ``surgery.interp`` in the reference solve.py scripts).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fcnseg.errors import UserError


@dataclass
class InitReport:
    """What ``copy_shared`` did, by tensor name of the model's state dict."""

    source: str
    copied: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)  # in the model only
    mismatched: list[str] = field(default_factory=list)  # in both, of different shapes: fresh
    unused: list[str] = field(default_factory=list)  # in the source only

    def summary(self) -> str:
        """A few lines naming the layers (modules) copied and those left fresh."""
        # A top-level module copied whole (the backbone, usually) is named, not listed.
        partial = {name.split(".", 1)[0] for name in self.fresh + self.mismatched}
        whole = dict.fromkeys(
            n.split(".", 1)[0] for n in self.copied if n.split(".", 1)[0] not in partial
        )
        listed = [n for n in self.copied if n.split(".", 1)[0] not in whole]
        parts = [
            f"{top} (all {len(_layer_names(n for n in self.copied if n.startswith(top + '.')))} "
            f"layers)"
            for top in whole
        ]
        lines = [
            f"initialised from {self.source}: {len(self.copied)} tensors copied: "
            f"{', '.join(parts + ([_layers(listed)] if listed else []))}"
        ]
        if self.fresh or self.mismatched:
            lines.append(f"fresh (not in the source): {_layers(self.fresh) or 'none'}")
        if self.mismatched:
            lines.append(f"fresh (shape differs from the source's): {_layers(self.mismatched)}")
        if self.unused:
            lines.append(f"unused from the source: {_layers(self.unused)}")
        return "\n".join(lines)


def copy_shared(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "state dict"
) -> InitReport:
    """Copies into ``model`` every tensor of ``state_dict`` with the same name and shape.

    Parameters and buffers (BatchNorm statistics) alike; the rest of ``model`` is untouched.

    Raises:
        UserError: the two share no tensor at all (almost surely the wrong file).
    """
    report = InitReport(source=source)
    own = model.state_dict()
    with torch.no_grad():
        for name, tensor in own.items():
            theirs = state_dict.get(name)
            if theirs is None:
                report.fresh.append(name)
            elif theirs.shape != tensor.shape:
                report.mismatched.append(name)
            else:
                tensor.copy_(theirs)
                report.copied.append(name)
    report.unused = [name for name in state_dict if name not in own]
    if not report.copied:
        raise UserError(
            f"{source} shares no layer with this model (its first tensors: "
            f"{', '.join(list(state_dict)[:3]) or 'none'}); is it a checkpoint of the same "
            f"backbone?"
        )
    return report


def init_from_checkpoint(
    model: nn.Module, path: str | Path, *, map_location: str | torch.device = "cpu"
) -> InitReport:
    """``copy_shared`` from the weights of an fcnseg checkpoint (``model.init_from=PATH``)."""
    from fcnseg.utils.checkpoint import load_checkpoint

    path = Path(path)
    if not path.exists():  # a directory or a damaged file: load_checkpoint says which
        raise UserError(
            f"model.init_from={path} does not exist; train the previous stage first, or give "
            f"the path of its checkpoint"
        )
    ckpt = load_checkpoint(path, map_location=map_location)
    return copy_shared(model, ckpt["model"], source=str(path))


def _layer_names(names: Iterable[str]) -> list[str]:
    """Tensor names grouped by layer: ``head.score_fr.weight``, ``.bias`` -> ``head.score_fr``."""
    return list(dict.fromkeys(name.rsplit(".", 1)[0] for name in names))


def _layers(names: Iterable[str]) -> str:
    return ", ".join(_layer_names(names))
