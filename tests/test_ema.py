"""EMA weights: the average torch.optim.swa_utils keeps, evaluated, saved and resumed exactly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_RUN, run_script
from test_resume import SignalAt, assert_same_state, one_thread, tiny_trainer  # noqa: F401

from fcnseg.engine.ema import EMA
from fcnseg.engine.hooks import Hook
from fcnseg.engine.trainer import TrainingInterrupted
from fcnseg.errors import UserError
from fcnseg.utils.checkpoint import load_checkpoint


class Snapshots(Hook):
    """The live weights after every step (a hook placed before ``EMA``)."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def after_step(self) -> None:
        state = self.trainer.model.state_dict()
        self.weights.append({k: v.detach().clone() for k, v in state.items()})


def test_the_average_is_the_exponential_moving_average_of_the_steps(tmp_path):
    decay = 0.7
    snapshots, ema = Snapshots(), EMA(decay)
    tiny_trainer(tmp_path, hooks=[snapshots, ema], max_iters=5, eval_interval=5).fit()
    # By hand: the first step's weights, then e = decay * e + (1 - decay) * w after each step;
    # floating-point buffers (BatchNorm statistics) are averaged the same way. Counters (a
    # BatchNorm's num_batches_tracked) are not meaningful averages and are left out.
    expected = {k: v for k, v in snapshots.weights[0].items() if v.is_floating_point()}
    for weights in snapshots.weights[1:]:
        for key in expected:
            expected[key] = decay * expected[key] + (1 - decay) * weights[key]
    got = ema.averaged.module.state_dict()
    assert {k for k, v in got.items() if v.is_floating_point()} == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    assert not torch.equal(
        got["head.score_fr.weight"], snapshots.weights[-1]["head.score_fr.weight"]
    )


@pytest.mark.parametrize("ema_better", [True, False])
def test_best_pt_holds_whichever_weights_scored_better(tmp_path, monkeypatch, ema_better):
    ema = EMA(0.5)
    trainer = tiny_trainer(tmp_path, hooks=[ema], max_iters=2, eval_interval=2)
    validate = trainer.validate

    def scored(model=None, name="val"):  # the real evaluation, with mIoU set per model
        metrics = validate(model, name)
        better = (name == "val_ema") == ema_better
        return {**metrics, "miou": 0.9 if better else 0.5}

    monkeypatch.setattr(trainer, "validate", scored)
    metrics = trainer.fit()
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["miou"] == metrics["miou"] == (0.5 if ema_better else 0.9)
    assert written["ema"]["miou"] == (0.9 if ema_better else 0.5)
    assert best["best_miou"] == 0.9
    assert best["weights"] == ("ema" if ema_better else "live")
    source = ema.averaged.module if ema_better else trainer.model
    assert_same_state(best["model"], source.state_dict())


@pytest.mark.slow
def test_the_average_resumes_exactly(tmp_path):
    straight = EMA(0.8)
    tiny_trainer(tmp_path / "straight", hooks=[straight]).fit()
    expected = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")

    run_dir = tmp_path / "interrupted"
    first = tiny_trainer(run_dir, hooks=[EMA(0.8)])
    first.train_set = SignalAt(first.train_set, 5)  # SIGTERM while step 3's batch loads
    with pytest.raises(TrainingInterrupted):
        first.fit()
    resumed = EMA(0.8)
    tiny_trainer(run_dir, hooks=[resumed], resume=True).fit()
    got = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert_same_state(got["hooks"], expected["hooks"])  # bit-identical average and count
    assert_same_state(resumed.averaged.state_dict(), straight.averaged.state_dict())
    assert_same_state(got["model"], expected["model"])


@pytest.mark.parametrize("decay", [0, 1, 1.5, "high", True])
def test_a_decay_outside_0_1_is_one_sentence(decay):
    with pytest.raises(UserError, match=r"trainer.ema.decay=.* must be a number between 0 and 1"):
        EMA(decay)


def test_trainer_ema_decay_from_the_command_line(tmp_path):
    proc = run_script("train.py", *TINY_RUN, "trainer.ema.decay=0.9", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 <= metrics["ema"]["miou"] <= 1
    assert "val_ema mIoU" in (tmp_path / "train.log").read_text()
    bad = run_script("train.py", *TINY_RUN, "trainer.ema.decay=2", f"hydra.run.dir={tmp_path}/b")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "train.py: error: trainer.ema.decay=2 must be a number between 0 and 1"
    )
