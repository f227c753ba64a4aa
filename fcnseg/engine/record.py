"""What a training run is, in the facts the trainer reports and stores."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RunRecord:
    """The run's facts, given to the trainer once by whoever composed the run.

    The trainer reads these fields and nothing else of the configuration: ``config`` is stored
    in checkpoints and sent to the loggers as it is.

    Attributes:
        class_names: one name per class.
        palette: one RGB colour per class, to draw predictions (``None``: the dataset's own,
            else a generated one).
        normalize: the input normalisation (``imagenet`` ...), to show images in TensorBoard.
        dataset: the dataset's name, its root folder and training crop, for the start-up block.
        backbone, head: their builders' names.
        weights: where the backbone's initial weights come from, when the model does not say
            (``weights_source``).
        resume_command: the command that continues this run, shown when it is interrupted.
        config: the resolved configuration, a plain mapping.
    """

    class_names: Sequence[str]
    palette: Sequence[Sequence[int]] | None = None
    normalize: str = "imagenet"
    dataset: str = "?"
    data_root: str | None = None
    crop_size: Any = None
    backbone: str = "?"
    head: str = "?"
    weights: str = "from scratch"
    resume_command: str | None = None
    config: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, resume_command: str | None = None):
        """The record of a run composed as ``configs/train.yaml`` (a resolved, plain mapping)."""
        ds, backbone = config.get("dataset", {}), config.get("backbone", {})
        if backbone.get("weights"):
            weights = f"weights from {backbone['weights']}"
        elif backbone.get("pretrained"):
            weights = "ImageNet weights from torchvision"
        else:
            weights = "from scratch"
        return cls(
            class_names=list(ds["class_names"]), palette=ds.get("palette"),
            normalize=ds.get("normalize", "imagenet"), dataset=ds.get("name", "?"),
            data_root=ds.get("root"), crop_size=ds.get("crop_size"),
            backbone=_builder(backbone), head=_builder(config.get("head", {})), weights=weights,
            resume_command=resume_command, config=config,
        )  # fmt: skip


def _builder(node: Mapping[str, Any]) -> str:
    return str(node.get("_target_", "?")).rsplit(".", 1)[-1]
