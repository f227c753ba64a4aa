"""nan_policy=skip: a non-finite step leaves the model and the optimizer exactly as they were,
and keeps a copy of only what a training forward changes (BatchNorm's running statistics)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_resume import NUM_CLASSES, one_thread, tiny_model, tiny_trainer  # noqa: F401 - fixture

from fcnseg.engine.step import running_statistics


def changed_by_a_training_forward(model: torch.nn.Module) -> set[str]:
    """The independent computation: the buffers that a forward in training mode changes."""
    before = {n: b.clone() for n, b in model.named_buffers()}
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    changed = {n for n, b in model.named_buffers() if not torch.equal(b, before[n])}
    model.load_state_dict({**model.state_dict(), **before})
    return changed


@pytest.mark.parametrize("batch_norm", [False, True])
def test_the_step_keeps_what_a_training_forward_changes(batch_norm):
    model = tiny_model(batch_norm=batch_norm)
    model.train()
    names = {id(b): n for n, b in model.named_buffers()}
    kept = {names[id(b)] for b in running_statistics(model)}
    assert kept == changed_by_a_training_forward(model)
    assert bool(kept) == batch_norm
    if batch_norm:  # every BatchNorm layer's mean, variance and count
        layers = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert len(kept) == 3 * len(layers) > 0
    model.eval()  # an evaluation forward changes nothing
    assert running_statistics(model) == []


@pytest.mark.parametrize("batch_norm", [False, True])
def test_a_nan_step_leaves_model_and_optimizer_bit_identical(tmp_path, batch_norm):
    trainer = tiny_trainer(tmp_path, nan_policy="skip", backbone_options={"batch_norm": batch_norm})
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 32, 32, generator=g)
    targets = torch.randint(0, NUM_CLASSES, (2, 32, 32), generator=g)
    trainer.run_step(images, targets)  # AdamW now has moments, BatchNorm statistics moved
    model = copy.deepcopy(trainer.model.state_dict())
    optimizer = copy.deepcopy(trainer.optimizer.state_dict())

    bad = images.clone()
    bad[0, :, :4, :4] = float("nan")
    assert trainer.run_step(bad, targets) != trainer.run_step(bad, targets)  # nan, twice
    assert trainer.skips.count == 2

    after = trainer.model.state_dict()
    assert after.keys() == model.keys()
    for name, value in model.items():
        assert torch.equal(after[name], value), name  # bit-identical, no NaN crept in
    state = trainer.optimizer.state_dict()
    assert state["state"].keys() == optimizer["state"].keys()
    for key, saved in optimizer["state"].items():
        for name, value in saved.items():
            assert torch.equal(torch.as_tensor(state["state"][key][name]), torch.as_tensor(value))
    # Only the schedule moves on (stepped every iteration, taken or not).
    for group, saved in zip(state["param_groups"], optimizer["param_groups"]):
        assert {k: v for k, v in group.items() if k != "lr"} == {
            k: v for k, v in saved.items() if k != "lr"
        }
    assert all(p.grad is None for p in trainer.model.parameters())
    # Not vacuous: the same NaN batch through the model in training mode spoils its statistics.
    if batch_norm:
        trainer.model.train()
        with torch.no_grad():
            trainer.model(bad)
        assert not all(torch.isfinite(b.float()).all() for b in trainer.model.buffers())


def test_a_skipped_first_step_does_not_warn_about_the_schedule(tmp_path):
    """The schedule steps on a skipped update as on any other; PyTorch's "lr_scheduler.step()
    before optimizer.step()" warning would only alarm the user."""
    trainer = tiny_trainer(tmp_path, nan_policy="skip")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 32, 32, generator=g)
    images[0, :, :4, :4] = float("nan")
    targets = torch.randint(0, NUM_CLASSES, (2, 32, 32), generator=g)
    lr = trainer.optimizer.param_groups[0]["lr"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.run_step(images, targets)
    assert trainer.skips.count == 1
    assert trainer.optimizer.param_groups[0]["lr"] != lr  # the schedule did step
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
