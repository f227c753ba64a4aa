"""BatchNorm for fine-tuning: frozen layers keep the loaded values bit for bit through training,
checkpoints and DDP; recalibration averages the statistics of the batches it is given."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from test_resume import one_thread, tiny_trainer  # noqa: F401 - fixture
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.ops import FrozenBatchNorm2d

import fcnseg
from fcnseg.models import build_model
from fcnseg.models.norm import freeze_batch_norm, recalibrate_batch_norm
from fcnseg.utils.checkpoint import save_checkpoint

BN_STATE = ("weight", "bias", "running_mean", "running_var")


def _randomise_batch_norm(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.5)


@pytest.fixture
def weights_file(tmp_path):
    """A torchvision MobileNetV2 file with BatchNorm values that a fresh layer never has."""
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(weights=None)
    _randomise_batch_norm(net)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


def test_frozen_layers_compute_what_evaluation_mode_computes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=1e-3), nn.ReLU())
    net.append(nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2, affine=False)))
    _randomise_batch_norm(net)
    with torch.no_grad():
        net[3][1].running_mean.normal_()
    x = torch.randn(2, 3, 9, 7)
    with torch.no_grad():
        want = net.eval()(x)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        assert freeze_batch_norm(net) == 2
        assert isinstance(net[1], FrozenBatchNorm2d) and isinstance(net[3][1], FrozenBatchNorm2d)
        assert net[1].eps == 1e-3
        got = net.train()(x)  # training mode changes nothing any more
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for name in BN_STATE[2:]:
        assert torch.equal(net[1].state_dict()[name], before[f"1.{name}"])
    assert torch.equal(net[1].weight, before["1.weight"])
    assert torch.equal(net[3][1].weight, torch.ones(2))  # affine=False: the identity map
    assert torch.equal(net[3][1].bias, torch.zeros(2))
    assert [n for n, _ in net.named_parameters()] == [
        "0.weight",
        "0.bias",
        "3.0.weight",
        "3.0.bias",
    ]


def test_frozen_backbone_keeps_the_files_values_through_training(weights_file):
    """A few SGD steps on a batch: every frozen buffer is still the file's tensor, bit for bit,
    while the convolutions moved; without frozen_bn the statistics move as well."""
    path, state = weights_file
    layers = [k.removesuffix("running_var") for k in state if k.endswith("running_var")]
    bn_keys = [layer + name for layer in layers for name in BN_STATE]
    runs = {}
    for frozen in (True, False):
        torch.manual_seed(0)
        model = build_model(
            backbone="mobilenet_v2", head="fcn8s", num_classes=3,
            backbone_options={"weights": path, "frozen_bn": frozen},
        )  # fmt: skip
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x, y = torch.randn(2, 3, 40, 36), torch.randint(0, 3, (2, 40, 36))
        model.train()
        for _ in range(3):  # the score layers start at zero: the backbone moves from step 2
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        runs[frozen] = model.backbone.state_dict()
    frozen, plain = runs[True], runs[False]
    assert len(layers) == 52  # MobileNetV2's BatchNorm layers, all frozen
    for key in bn_keys:
        assert torch.equal(frozen[key], state[key]), key
    assert sum(not torch.equal(plain[k], state[k]) for k in bn_keys if "running" in k) == 104
    conv = "features.1.conv.1.weight"
    assert not torch.equal(frozen[conv], state[conv]) and not torch.equal(plain[conv], state[conv])
    assert not any(k.endswith("num_batches_tracked") for k in frozen)


def test_a_frozen_checkpoint_reloads_through_load_model(tmp_path):
    model = build_model(
        backbone="mobilenet_v2", head="fcn32s", num_classes=2, backbone_options={"frozen_bn": True}
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # the head too: its score layer starts at zero
            p.normal_(0, 0.05)
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    config = {
        "backbone": {"_target_": "fcnseg.models.backbones.mobilenet_v2", "pretrained": True,
                     "weights": None, "fc": True, "frozen_bn": True},
        "head": {"_target_": "fcnseg.models.heads.fcn32s", "_partial_": True},
        "dataset": {"num_classes": 2, "class_names": ["a", "b"]},
    }  # fmt: skip
    save_checkpoint({"model": model.state_dict(), "config": config}, tmp_path / "best.pt")
    loaded = fcnseg.load_model(tmp_path / "best.pt")
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in loaded.modules()) == 52
    x = torch.randn(1, 3, 45, 33)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_sync_batch_norm_and_ddp_pass_frozen_layers_by(tmp_path):
    """SyncBatchNorm conversion leaves frozen layers alone; a DDP step (one gloo process)
    trains around them and keeps them."""
    model = build_model(
        backbone="mobilenet_v2", head="fcn8s", num_classes=2, backbone_options={"frozen_bn": True}
    )
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in converted.modules()) == 52
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        for _ in range(2):
            optimizer.zero_grad()
            ddp(torch.randn(2, 3, 33, 33)).sum().backward()
            optimizer.step()
    finally:
        dist.destroy_process_group()
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key


# ---------------------------------------------------------------- recalibration
def _batch_norm_train(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Training-mode BatchNorm written out: the batch's own mean and biased variance."""
    mean = x.mean((0, 2, 3), keepdim=True)
    var = x.var((0, 2, 3), unbiased=False, keepdim=True)
    scale = bn.weight[None, :, None, None] / (var + bn.eps).sqrt()
    return (x - mean) * scale + bn.bias[None, :, None, None]


def test_recalibration_averages_the_batches_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3),
        nn.BatchNorm2d(5, momentum=0.3), nn.Dropout(0.5),
    )  # fmt: skip
    _randomise_batch_norm(net)  # statistics that the recalibration must discard
    net.eval()
    batches = [torch.randn(2, 3, 9, 8) + i for i in range(3)]
    conv1, bn1, conv2, bn2 = net[0], net[1], net[3], net[4]
    means, variances = [[], []], [[], []]
    with torch.no_grad():
        for x in batches:
            a = F.conv2d(x, conv1.weight, conv1.bias)
            b = F.conv2d(_batch_norm_train(a, bn1).relu(), conv2.weight, conv2.bias)
            for i, inp in enumerate((a, b)):
                means[i].append(inp.mean((0, 2, 3)))
                variances[i].append(inp.var((0, 2, 3), unbiased=True))
    assert recalibrate_batch_norm(net, iter(batches)) == (2, 3)
    for i, bn in enumerate((bn1, bn2)):
        torch.testing.assert_close(bn.running_mean, torch.stack(means[i]).mean(0))
        torch.testing.assert_close(bn.running_var, torch.stack(variances[i]).mean(0))
    assert (bn1.momentum, bn2.momentum) == (0.1, 0.3)
    assert not any(m.training for m in net.modules())  # the caller's modes are back
    # No batch: nothing changes.
    kept = {k: v.clone() for k, v in net.state_dict().items()}
    assert recalibrate_batch_norm(net, iter([])) == (2, 0)
    for key, value in net.state_dict().items():
        assert torch.equal(value, kept[key]), key
    # Frozen layers are not BatchNorm layers any more: nothing to recalibrate.
    freeze_batch_norm(net)
    assert recalibrate_batch_norm(net, iter(batches)) == (0, 0)


def test_the_trainer_recalibrates_without_changing_the_training(tmp_path):
    """trainer.bn_recalibration=2: the statistics start from two batches of their own, and the
    weights trained are bit for bit those of a run without it (training-mode BatchNorm uses
    batch statistics; the data stream and random generators are left as they were)."""
    runs = {}
    for n in (0, 2):
        trainer = tiny_trainer(tmp_path / str(n), max_iters=2, eval_interval=2, bn_recalibration=n)
        trainer.fit()
        runs[n] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    layers = sum(isinstance(m, nn.BatchNorm2d) for m in trainer.model.modules())
    said = [line.split(" INFO ", 1)[-1] for line in (tmp_path / "2" / "train.log").open()]
    assert [line for line in said if "bn_recalibration" in line] == [
        f"trainer.bn_recalibration=2: the running statistics of {layers} BatchNorm layers "
        "averaged over 2 training batches of 2 images\n"
    ]
    assert "bn_recalibration" not in (tmp_path / "0" / "train.log").read_text()
    weights = [k for k, _ in trainer.model.named_parameters()]
    for key in weights:
        assert torch.equal(runs[0][key], runs[2][key]), key
    stats = [k for k in runs[0] if k.endswith("running_mean")]
    assert stats and all(not torch.equal(runs[0][k], runs[2][k]) for k in stats)
    assert all(runs[2][k.replace("running_mean", "num_batches_tracked")] == 4 for k in stats)


@pytest.mark.parametrize("name", ["alexnet", "resnet18", "mobilenet_v2"])
def test_an_option_a_backbone_lacks_is_one_sentence(name):
    """``+backbone.frozen_bn=true`` on a backbone whose builder has no such option (a partial
    binding it cannot even be inspected) names the option and the backbone."""
    import functools

    from fcnseg.errors import UserError
    from fcnseg.models import backbones, build_model

    backbone = functools.partial(getattr(backbones, name), no_such_option=True)
    with pytest.raises(
        UserError, match=f"backbone.no_such_option is not an option of backbone {name}"
    ):
        build_model(backbone=backbone, head="fcn8s", num_classes=3)
