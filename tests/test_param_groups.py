"""param_groups.backbone_lr_mult: the backbone learns at a multiple of the head's rate, with
bias_lr_mult on top, and every schedule keeps the ratios."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate

from fcnseg.engine.optim import with_param_groups
from fcnseg.models import build_model


def _model():
    torch.manual_seed(0)
    return build_model(backbone="vgg_tiny", head="fcn8s", num_classes=3)


def _names(model, optimizer) -> list[set[str]]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [{by_id[id(p)] for p in g["params"]} for g in optimizer.param_groups]


@pytest.mark.parametrize("scheduler", ["poly", "constant"])
def test_backbone_and_bias_groups_keep_their_rates_under_the_schedule(scheduler):
    model = _model()
    lr, wd, mult, bias_mult = 0.01, 1e-4, 0.1, 2.0
    factory = instantiate(
        {"_target_": "torch.optim.SGD", "_partial_": True, "lr": lr, "momentum": 0.9,
         "weight_decay": wd}
    )  # fmt: skip
    optimizer = with_param_groups(
        factory, model, bias_lr_mult=bias_mult, bias_weight_decay=0.0, backbone_lr_mult=mult
    )([p for p in model.parameters() if p.requires_grad])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    head = {n for n in names if n.startswith("head.")}
    backbone = {n for n in names if n.startswith("backbone.")}
    biases = {n for n in names if n.endswith(".bias")}
    assert _names(model, optimizer) == [
        head - biases,
        head & biases,
        backbone - biases,
        backbone & biases,
    ]
    base = [lr, lr * bias_mult, lr * mult, lr * mult * bias_mult]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(base, rel=1e-12)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [wd, 0.0, wd, 0.0]

    cfg = compose_config([f"scheduler={scheduler}", "trainer.max_iters=10"])
    sched = instantiate(cfg.scheduler)(optimizer)
    for step in range(1, 8):
        optimizer.step()
        sched.step()
        # poly: lr x (1 - t / T) ** 0.9 for every group alike; constant: lr.
        factor = (1 - step / 10) ** 0.9 if scheduler == "poly" else 1.0
        got = [g["lr"] for g in optimizer.param_groups]
        assert got == pytest.approx([b * factor for b in base], rel=1e-9), step


def test_the_backbone_alone_gets_a_group_of_its_own():
    """backbone_lr_mult alone: two groups (head, backbone), biases with their weights; with
    every option at 1 the optimizer is the factory's own, in one group."""
    model = _model()
    factory = instantiate({"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3})
    optimizer = with_param_groups(factory, model, backbone_lr_mult=0.25)(model.parameters())
    names = {n for n, _ in model.named_parameters()}
    assert _names(model, optimizer) == [
        {n for n in names if n.startswith("head.")},
        {n for n in names if n.startswith("backbone.")},
    ]
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 0.25 * 1e-3]
    # One SGD step by hand: the backbone moves by a quarter of the head's step.
    sgd = with_param_groups(
        instantiate({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.5}),
        model,
        backbone_lr_mult=0.25,
    )(model.parameters())
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    for p in params.values():
        p.grad = torch.ones_like(p)
    sgd.step()
    for n, p in params.items():
        step = 0.25 * 0.5 if n.startswith("backbone.") else 0.5
        torch.testing.assert_close(p.detach(), before[n] - step, rtol=0, atol=1e-6)
    plain = with_param_groups(factory, model, backbone_lr_mult=1.0)(model.parameters())
    assert len(plain.param_groups) == 1


def test_the_default_config_keeps_one_group():
    cfg = compose_config()
    assert cfg.param_groups.backbone_lr_mult == 1.0
    model = _model()
    optimizer = with_param_groups(instantiate(cfg.optimizer), model, **cfg.param_groups)(
        model.parameters()
    )
    assert len(optimizer.param_groups) == 1
