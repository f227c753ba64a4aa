"""EMA weights: an exponential moving average of the weights, evaluated beside them.

``trainer.ema.decay=0.999`` (or ``Trainer(..., hooks=[EMA(0.999)])``) keeps, after every
optimizer step, ``ema = decay * ema + (1 - decay) * weights`` for every parameter and buffer
(torchvision's and timm's practice: BatchNorm statistics are averaged too), with
``torch.optim.swa_utils.AveragedModel``. Each evaluation scores the averaged weights after the
live ones (``val_ema/*`` in the loggers, ``ema`` in ``metrics.json``), and ``best.pt`` holds
whichever scored the best mIoU so far (``best.pt``'s ``weights`` says which: ``ema`` or
``live``). The average is saved in every ``last.pt``, so a resumed run continues it exactly.
"""

from __future__ import annotations

from typing import Any

from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fcnseg.engine.hooks import Hook
from fcnseg.errors import UserError

__all__ = ["EMA"]


class EMA(Hook):
    """Keeps and evaluates an exponential moving average of the model's weights.

    Args:
        decay: the weight of the average at each step, in (0, 1); an average over about
            ``1 / (1 - decay)`` steps (0.999: the last thousand or so).
    """

    def __init__(self, decay: float) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
            raise UserError(f"trainer.ema.decay={decay!r} must be a number between 0 and 1")
        self.decay = float(decay)
        self.averaged: AveragedModel | None = None

    def before_train(self) -> None:
        self._build()

    def after_step(self) -> None:
        self._build().update_parameters(self.trainer.model)

    def after_eval(self, metrics: dict[str, Any]) -> None:
        t = self.trainer
        ema = t.validate(model=self._build().module, name="val_ema")
        if ema is None:  # a stop signal cut it short: the resumed run evaluates both again
            return
        metrics["ema"] = ema
        if ema["miou"] > max(t.best_miou, metrics["miou"]):
            t.best_miou = ema["miou"]
            t.save("best.pt", weights=self.averaged.module.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "averaged": self._build().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._build().load_state_dict(state["averaged"])

    def _build(self) -> AveragedModel:
        """The average, made from the trainer's model (on its device and in its layout) the
        first time it is needed; its first update copies the weights."""
        if self.averaged is None:
            self.averaged = AveragedModel(
                self.trainer.model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True
            )
            self.averaged.eval()
            for p in self.averaged.parameters():
                p.requires_grad_(False)
        return self.averaged

    def __repr__(self) -> str:
        return f"EMA(decay={self.decay})"
