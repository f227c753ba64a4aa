"""The FCN paper's four metrics over a dataset-level confusion matrix.

With ``n_ij`` the pixels of ground-truth class ``i`` predicted as ``j`` and ``t_i = sum_j n_ij``:
pixel accuracy ``sum_i n_ii / sum_i t_i``; mean accuracy ``mean_i n_ii / t_i``; mean IoU
``mean_i n_ii / (t_i + sum_j n_ji - n_ii)``; frequency-weighted IoU
``sum_i t_i * IoU_i / sum_i t_i``. A class absent from both ground truth and prediction has no
IoU (``None``) and is left out of the means; mean accuracy averages over classes present in the
ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fcnseg.utils import tables


class SegMetrics:
    """Accumulates a confusion matrix (rows = ground truth) on the predictions' device.

    Args:
        num_classes: number of classes.
        ignore_index: label value that is not scored.
        class_names: names for the report; defaults to ``class_0`` ...
    """

    def __init__(
        self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None
    ) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = (
            list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
        )
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")
        self.confusion: torch.Tensor | None = None
        self.num_images = 0

    def reset(self) -> None:
        self.confusion = None
        self.num_images = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Adds a batch: ``pred`` labels (N, H, W) or logits (N, C, H, W); ``target`` (N, H, W)."""
        if pred.dim() == target.dim() + 1:
            pred = pred.argmax(1)
        if pred.shape != target.shape:
            raise ValueError(
                f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ"
            )
        n = self.num_classes
        target = target.to(pred.device)
        valid = target != self.ignore_index
        outside = valid & ((target < 0) | (target >= n))
        if outside.any():  # the batch's one host read
            bad = target[outside][0].item()
            raise ValueError(
                f"label value {bad} is neither a class in [0, {n}) "
                f"nor the ignore index {self.ignore_index}"
            )
        # Ignored pixels are counted in an extra bin that is dropped, rather than removed by
        # boolean indexing, whose data-dependent size costs a copy and a device sync.
        index = (target.long() * n).add_(pred.long()).masked_fill_(~valid, n * n)
        counts = torch.bincount(index.flatten(), minlength=n * n + 1)[: n * n].reshape(n, n)
        self.confusion = counts if self.confusion is None else self.confusion + counts
        self.num_images += target.shape[0]

    def add_confusion(self, confusion: torch.Tensor, num_images: int) -> None:
        """Adds a confusion matrix computed elsewhere (another process, a saved run)."""
        confusion = confusion.to(torch.int64)
        self.confusion = (
            confusion
            if self.confusion is None
            else self.confusion + confusion.to(self.confusion.device)
        )
        self.num_images += num_images

    def compute(self) -> dict[str, Any]:
        """The metrics as plain Python values (JSON-ready)."""
        n = self.num_classes
        conf = (
            self.confusion if self.confusion is not None else torch.zeros(n, n, dtype=torch.int64)
        )
        conf = conf.cpu().double()
        tp = conf.diag()
        gt = conf.sum(1)
        predicted = conf.sum(0)
        union = gt + predicted - tp
        total = gt.sum()
        present = union > 0
        iou = torch.where(present, tp / union.clamp(min=1), torch.nan)
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.nan)
        nan_to_none = lambda v: [None if x != x else float(x) for x in v.tolist()]  # noqa: E731
        return {
            "miou": float(iou[present].mean()) if present.any() else 0.0,
            "pixel_acc": float(tp.sum() / total) if total > 0 else 0.0,
            "mean_acc": float(acc[gt > 0].mean()) if (gt > 0).any() else 0.0,
            "fwiou": float((gt[present] * iou[present]).sum() / total) if total > 0 else 0.0,
            "iou": nan_to_none(iou),
            "acc": nan_to_none(acc),
            "class_names": self.class_names,
            "confusion_matrix": conf.long().tolist(),
            "num_images": self.num_images,
            "num_pixels": int(total),
        }


def format_table(metrics: dict[str, Any]) -> str:
    """A per-class IoU/accuracy table followed by the four summary metrics, in percent."""
    pct = lambda v: "     -" if v is None else f"{100 * v:6.2f}"  # noqa: E731
    rows: list[tables.Row] = [
        [name, pct(iou), pct(acc)]
        for name, iou, acc in zip(metrics["class_names"], metrics["iou"], metrics["acc"])
    ]
    rows.append(None)
    for key, label in (
        ("miou", "mIoU"),
        ("pixel_acc", "pixel acc"),
        ("mean_acc", "mean acc"),
        ("fwiou", "fwIoU"),
    ):
        rows.append([label, pct(metrics[key])])
    rows.append(["images", str(metrics["num_images"])])
    return tables.format_table(["class", "IoU", "Acc"], rows, align="<>>", min_widths=[12, 6, 6])
