"""Exact resume: a run interrupted and resumed ends with the uninterrupted run's state."""

from __future__ import annotations

import functools
import os
import signal

import pytest
import torch
from conftest import train_settings
from torch.utils.data import Dataset

from fcnseg.data import SyntheticShapes, build_transforms
from fcnseg.engine.loss import SegLoss
from fcnseg.engine.record import RunRecord
from fcnseg.engine.runtime import seed_everything
from fcnseg.engine.trainer import Trainer, TrainingInterrupted
from fcnseg.errors import UserError
from fcnseg.models import build_model
from fcnseg.models.backbones import vgg_tiny
from fcnseg.models.heads import fcn8s
from fcnseg.utils.checkpoint import load_checkpoint, save_checkpoint

NUM_CLASSES = 5


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: a second intra-op thread only spins and waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(**backbone_options):
    """vgg_tiny FCN-8s with fc6/fc7 of 64 channels, its weights drawn from seed 0."""
    seed_everything(0)
    backbone = vgg_tiny(**{"fc_channels": 64, **backbone_options})
    return build_model(backbone=backbone, head=fcn8s, num_classes=NUM_CLASSES)


def tiny_trainer(
    run_dir,
    *,
    train_set=None,
    val_set=None,
    backbone_options=None,
    optimizer=None,
    hooks=(),
    **options,
) -> Trainer:
    """A CPU trainer of ``tiny_model`` on 32-px synthetic crops (options override)."""
    model = tiny_model(**(backbone_options or {}))
    train_tf = build_transforms(train=True, crop_size=32, scale_range=(0.75, 1.25), hflip=True)
    settings = dict(
        max_iters=6,
        eval_interval=4,
        log_interval=1,
        checkpoint_interval=100,
        batch_size=2,
        num_workers=0,
        device="cpu",
        num_vis=0,
    )
    settings.update(options)
    train_set = train_set or SyntheticShapes(
        split="train", num_samples=8, min_size=32, max_size=44, transform=train_tf
    )
    val_set = val_set or SyntheticShapes(
        split="val",
        num_samples=2,
        min_size=32,
        max_size=40,
        transform=build_transforms(train=False),
    )
    return Trainer(
        train_settings(**settings),
        model=model,
        train_set=train_set,
        val_set=val_set,
        optimizer=optimizer or functools.partial(torch.optim.AdamW, lr=1e-3),
        scheduler=functools.partial(
            torch.optim.lr_scheduler.PolynomialLR, total_iters=settings["max_iters"]
        ),
        loss=SegLoss(),
        run_dir=run_dir,
        record=RunRecord(class_names=[f"c{i}" for i in range(NUM_CLASSES)], config={"test": True}),
        hooks=hooks,
    )


class SignalAt(Dataset):
    """``dataset``, sending ``signum`` to this process when fetch number ``at`` happens."""

    def __init__(self, dataset: Dataset, at: int, signum: int = signal.SIGTERM) -> None:
        self.dataset, self.at, self.signum, self.fetches = dataset, at, signum, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        self.fetches += 1
        if self.fetches == self.at:
            os.kill(os.getpid(), self.signum)
        return self.dataset[key]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_state(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        elif isinstance(a[key], list | tuple):
            assert len(a[key]) == len(b[key]), key
            for x, y in zip(a[key], b[key]):
                assert_same_state({"v": x}, {"v": y})
        else:
            assert a[key] == b[key], key


def _default_val():
    return SyntheticShapes(
        split="val",
        num_samples=2,
        min_size=32,
        max_size=40,
        transform=build_transforms(train=False),
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        # SIGTERM while step 3's batch loads (4 images a step): step 3 ends, then the stop.
        {"options": {"accumulate": 2}, "train_signal_at": 9, "stopped_at": 3},
        # SIGINT during the evaluation at step 4: the resumed run evaluates again first.
        {"options": {"amp": "bf16"}, "val_signal_at": 1, "stopped_at": 4},
    ],
    ids=["sigterm-mid-training-accumulate2", "sigint-mid-evaluation-bf16"],
)
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, case):
    options = case["options"]
    straight = tiny_trainer(tmp_path / "straight", **options)
    straight_metrics = straight.fit()
    expected = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")

    run_dir = tmp_path / "interrupted"
    first = tiny_trainer(run_dir, **options)
    if "train_signal_at" in case:
        first.train_set = SignalAt(first.train_set, case["train_signal_at"])
    else:
        first.val_set = SignalAt(_default_val(), case["val_signal_at"], signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as stop:
        first.fit()
    assert stop.value.iteration == case["stopped_at"]
    assert stop.value.exit_code == 128 + (
        signal.SIGTERM if "train_signal_at" in case else signal.SIGINT
    )
    assert "trainer.resume=true" in str(stop.value)
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert saved["iteration"] == case["stopped_at"]
    assert saved["pending_eval"] == ("val_signal_at" in case)
    # The handlers are gone with fit(): signals have their usual effect again.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    resumed = tiny_trainer(run_dir, resume=True, **options)
    assert resumed.iteration == case["stopped_at"]
    resumed_metrics = resumed.fit()
    got = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert got["iteration"] == expected["iteration"] == 6
    for key in ("model", "optimizer", "scheduler", "scaler", "rng"):
        assert_same_state({key: got[key]}, {key: expected[key]})
    assert got["best_miou"] == expected["best_miou"]
    assert resumed_metrics == straight_metrics


def test_the_fp16_gradient_scaler_state_is_checkpointed(tmp_path):
    trainer = tiny_trainer(tmp_path, amp="fp16")
    images, targets = torch.randn(2, 3, 32, 32), torch.randint(0, NUM_CLASSES, (2, 32, 32))
    scaler = trainer.step.scaler
    scaler.load_state_dict({**scaler.state_dict(), "scale": 1024.0, "_growth_tracker": 5})
    trainer.run_step(images, targets)  # a finite step at scale 1024 grows the tracker to 6
    expected = scaler.state_dict()
    assert expected["_growth_tracker"] == 6
    trainer.save("last.pt")
    assert tiny_trainer(tmp_path, amp="fp16", resume=True).step.scaler.state_dict() == expected


def test_resume_true_needs_the_runs_last_checkpoint(tmp_path):
    with pytest.raises(
        UserError, match=r"trainer.resume=true continues from .*last.pt, which does not exist"
    ):
        tiny_trainer(tmp_path, resume=True)


def test_resume_auto_starts_fresh_then_continues(tmp_path):
    fresh = tiny_trainer(tmp_path, resume="auto")
    assert fresh.iteration == 0
    fresh.iteration = 3
    fresh.save("last.pt")
    again = tiny_trainer(tmp_path, resume="auto")
    assert again.iteration == 3
    assert_same_state(again.model.state_dict(), fresh.model.state_dict())


def test_resume_from_a_path_into_another_directory(tmp_path):
    source = tiny_trainer(tmp_path / "a")
    source.iteration = 2
    path = source.save("last.pt")
    target = tiny_trainer(tmp_path / "b", resume=str(path))
    assert target.iteration == 2 and target.run_dir == (tmp_path / "b").absolute()


def test_a_checkpoint_of_another_model_is_a_user_error(tmp_path):
    path = tmp_path / "other.pt"
    save_checkpoint(
        {"model": {"conv.weight": torch.zeros(1)}, "optimizer": {}, "scheduler": {}}, path
    )
    with pytest.raises(UserError, match=f"checkpoint {path} does not fit this run's model"):
        tiny_trainer(tmp_path / "run", resume=str(path))


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("nan_policy", "ignore", "trainer.nan_policy='ignore' is not one of stop, skip"),
        ("amp", "fp8", "trainer.amp='fp8' is not one of auto, none, bf16, fp16"),
        ("accumulate", 0, "trainer.accumulate=0 must be at least 1"),
        ("compile", "fastest", "trainer.compile='fastest' is not one of false, true"),
    ],
)
def test_bad_trainer_settings_are_named(tmp_path, option, value, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        tiny_trainer(tmp_path, **{option: value})
