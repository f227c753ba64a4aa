"""backbone.weights=PATH and backbone.pretrained: torchvision-format files and fcnseg
checkpoints load tensor for tensor, the first mismatch is named in one sentence, and the
backbone records where its weights came from (with the file's sha256)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from conftest import TINY_RUN, run_script
from test_resume import one_thread  # noqa: F401 - autouse fixture

import fcnseg
from fcnseg.errors import UserError
from fcnseg.models import backbones, build_model
from fcnseg.models.backbones.weights import RANDOM_INIT
from fcnseg.utils.checkpoint import save_checkpoint

COUNTER = "num_batches_tracked"


def random_state(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision ``arch`` state dict in which every tensor differs from a fresh model's
    (BatchNorm statistics and affine parameters drawn too, the counters set)."""
    torch.manual_seed(seed)
    state = getattr(torchvision.models, arch)(weights=None).state_dict()
    return {
        k: torch.full_like(v, 7) if k.endswith(COUNTER) else torch.randn_like(v)
        for k, v in state.items()
    }


def sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


@pytest.fixture(scope="module")
def mobilenet_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2.pth"
    state = random_state("mobilenet_v2")
    torch.save(state, path)
    return path, state


def _assert_loaded(ours: dict[str, torch.Tensor], file: dict[str, torch.Tensor], names) -> None:
    """Every tensor of the backbone is its file tensor (``names``: ours -> the file's), bit
    for bit; a Linear weight is compared as the 1x1 convolution's kernel it became."""
    assert set(names) == set(ours)
    for key, theirs in names.items():
        value = file[theirs]
        if value.dim() == 2:
            value = value[:, :, None, None]
        assert torch.equal(ours[key], value), key


def test_a_torchvision_file_loads_exactly_and_is_recorded(mobilenet_file):
    path, state = mobilenet_file
    backbone = backbones.mobilenet_v2(weights=path)
    ours = backbone.state_dict()
    _assert_loaded(ours, state, {k: k for k in state})  # torchvision's names, unchanged
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert backbone.weights_sha256 == digest
    assert backbone.weights_source == f"backbone.weights={path} (sha256 {digest[:12]})"
    # A wrapped state dict, and fc=False, which leaves the 1000-way classifier in the file.
    wrapped = path.with_name("wrapped.pth")
    torch.save({"state_dict": state, "epoch": 3}, wrapped)
    plain = backbones.mobilenet_v2(weights=wrapped, fc=False).state_dict()
    _assert_loaded(plain, state, {k: k for k in state if not k.startswith("classifier.")})
    assert backbones.mobilenet_v2().weights_source == RANDOM_INIT


@pytest.mark.parametrize("arch", ["resnet18", "resnet34"])
def test_resnet_files_load_exactly(arch, tmp_path):
    path = tmp_path / f"{arch}.pth"
    state = random_state(arch)
    torch.save(state, path)
    ours = getattr(backbones, arch)(weights=path).state_dict()
    # The stem's layers sit in ``stem`` here; every other name is torchvision's.
    names = {("stem." + k if k.startswith(("conv1.", "bn1.")) else k): k for k in state}
    _assert_loaded(ours, state, names)


def _message(build, path: Path) -> str:
    with pytest.raises(UserError) as err:
        build(weights=path)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_the_first_mismatch_is_named(mobilenet_file, tmp_path):
    path, state = mobilenet_file
    prefix = "backbone.weights={} is not a torchvision mobilenet_v2 state dict that fits "
    prefix += "backbone mobilenet_v2: "

    missing = dict(state)
    del missing["features.3.conv.1.1.running_var"]
    torch.save(missing, tmp_path / "missing.pth")
    assert _message(backbones.mobilenet_v2, tmp_path / "missing.pth") == (
        prefix.format(tmp_path / "missing.pth")
        + "missing key features.3.conv.1.1.running_var (the file has no such tensor)"
    )

    extra = {**state, "features.19.0.weight": torch.zeros(3)}
    torch.save(extra, tmp_path / "extra.pth")
    assert _message(backbones.mobilenet_v2, tmp_path / "extra.pth") == (
        prefix.format(tmp_path / "extra.pth")
        + "unexpected key features.19.0.weight (the backbone has no such tensor)"
    )

    # Two tensors of another shape: the first in the network's order is named, and the count.
    shapes = {**state, "features.0.0.weight": torch.zeros(16, 3, 3, 3)}
    shapes["features.5.conv.2.weight"] = torch.zeros(32, 96, 1, 1)
    torch.save(shapes, tmp_path / "shapes.pth")
    assert _message(backbones.mobilenet_v2, tmp_path / "shapes.pth") == (
        prefix.format(tmp_path / "shapes.pth")
        + "key features.0.0.weight has shape (16, 3, 3, 3) in the file but (32, 3, 3, 3) in the "
        "backbone (the first of 2 mismatches)"
    )

    # Another network's file: nothing fits; the backbone's first tensor is named, and how
    # many of the two networks' weights (counters aside) miss their place.
    other = random_state("resnet18")
    torch.save(other, tmp_path / "resnet18.pth")
    mismatches = sum(not k.endswith(COUNTER) for k in [*state, *other])
    assert _message(backbones.mobilenet_v2, tmp_path / "resnet18.pth") == (
        prefix.format(tmp_path / "resnet18.pth")
        + f"missing key features.0.0.weight (the file has no such tensor) (the first of "
        f"{mismatches} mismatches)"
    )
    # ResNet names the file's tensor, not its own stem's.
    del other["bn1.running_var"]
    torch.save(other, tmp_path / "resnet18_broken.pth")
    assert _message(backbones.resnet18, tmp_path / "resnet18_broken.pth").endswith(
        ": missing key bn1.running_var (the file has no such tensor)"
    )


def test_an_fcnseg_checkpoint_gives_its_backbone(tmp_path):
    """A training checkpoint's ``backbone.*`` tensors, by the backbone's own names; the
    head's tensors and the rest of the checkpoint are ignored."""
    torch.manual_seed(1)
    model = build_model(backbone="mobilenet_v2", head="fcn8s", num_classes=4)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
        for name, buffer in model.named_buffers():
            if name.endswith(COUNTER):
                buffer.fill_(5)
            else:
                buffer.uniform_(0.5, 2)
    path = tmp_path / "last.pt"
    save_checkpoint({"model": model.state_dict(), "iteration": 2, "config": {}}, path)
    backbone = backbones.mobilenet_v2(weights=path)
    want = {k.removeprefix("backbone."): v for k, v in model.state_dict().items()}
    ours = backbone.state_dict()
    assert {k for k in want if not k.startswith("head.")} == set(ours)
    for key, value in ours.items():
        assert torch.equal(value, want[key]), key
    assert backbone.weights_source == (
        f"backbone.weights={path} (the backbone of an fcnseg checkpoint, sha256 {sha12(path)})"
    )
    # Another backbone's checkpoint, and a checkpoint without a backbone.
    other = build_model(backbone="vgg_tiny", head="fcn32s", num_classes=4)
    save_checkpoint({"model": other.state_dict(), "config": {}}, tmp_path / "vgg.pt")
    message = _message(backbones.mobilenet_v2, tmp_path / "vgg.pt")
    assert message.startswith(
        f"backbone.weights={tmp_path / 'vgg.pt'} is an fcnseg checkpoint whose backbone does not "
        "fit backbone mobilenet_v2: missing key features.0.0.weight (the file has no such tensor)"
    )
    save_checkpoint({"model": {"head.score_fr.weight": torch.zeros(1)}}, tmp_path / "head.pt")
    assert _message(backbones.mobilenet_v2, tmp_path / "head.pt") == (
        f"backbone.weights={tmp_path / 'head.pt'} is a checkpoint whose model has no backbone.* "
        "tensors"
    )


def test_a_frozen_checkpoint_loads_into_a_plain_backbone_and_back(tmp_path):
    """Frozen BatchNorm has no ``num_batches_tracked``: either way round the file loads."""
    frozen = backbones.mobilenet_v2(weights=None, frozen_bn=True)
    model = build_model(backbone=frozen, head="fcn32s", num_classes=2)
    with torch.no_grad():
        for b in model.buffers():
            b.uniform_(0.5, 2)
    save_checkpoint({"model": model.state_dict()}, tmp_path / "frozen.pt")
    plain = backbones.mobilenet_v2(weights=tmp_path / "frozen.pt").state_dict()
    for key, value in frozen.state_dict().items():
        assert torch.equal(plain[key], value), key
    refrozen = backbones.mobilenet_v2(weights=tmp_path / "frozen.pt", frozen_bn=True)
    for key, value in refrozen.state_dict().items():
        assert torch.equal(frozen.state_dict()[key], value), key


def test_offline_pretrained_mobilenet_says_where_the_file_goes(monkeypatch, tmp_path):
    """No network: the message names torchvision's file and $TORCH_HOME/hub/checkpoints."""
    from torchvision.models import MobileNet_V2_Weights

    def offline(self, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(MobileNet_V2_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with torch.device("meta"), pytest.raises(UserError) as err:
        backbones.mobilenet_v2(pretrained=True)
    cached = tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    message = str(err.value)
    assert message.startswith("could not download torchvision's ImageNet mobilenet_v2 weights")
    assert f"put {MobileNet_V2_Weights.IMAGENET1K_V1.url} at {cached}," in message
    assert "\n" not in message


def test_pretrained_weights_record_the_cached_file(monkeypatch, tmp_path):
    """``pretrained=true`` reads torchvision's file from the hub cache; its name and sha256
    are recorded."""
    from torchvision.models import MobileNet_V2_Weights

    state = random_state("mobilenet_v2", seed=3)
    cached = tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(
        MobileNet_V2_Weights.IMAGENET1K_V1.__class__,
        "get_state_dict",
        lambda self, *args, **kwargs: torch.load(cached, weights_only=True),
    )
    backbone = backbones.mobilenet_v2(pretrained=True)
    _assert_loaded(backbone.state_dict(), state, {k: k for k in state})
    assert backbone.weights_source == (
        f"torchvision's ImageNet mobilenet_v2 weights (mobilenet_v2-b0353104.pth, sha256 "
        f"{sha12(cached)})"
    )


def test_load_model_rebuilds_without_reading_the_weights_file(tmp_path, mobilenet_file):
    """A checkpoint's config names the weights file of its start; rebuilding from the
    checkpoint needs only the checkpoint (the file may be gone)."""
    path, _ = mobilenet_file
    model = build_model(
        backbone="mobilenet_v2", head="fcn16s", num_classes=3, backbone_options={"weights": path}
    )
    config = {
        "backbone": {"_target_": "fcnseg.models.backbones.mobilenet_v2", "weights": "/gone.pth",
                     "pretrained": True, "fc": True, "frozen_bn": False},
        "head": {"_target_": "fcnseg.models.heads.fcn16s"},
        "dataset": {"num_classes": 3, "class_names": ["a", "b", "c"]},
    }  # fmt: skip
    save_checkpoint({"model": model.state_dict(), "config": config}, tmp_path / "m.pt")
    loaded = fcnseg.load_model(tmp_path / "m.pt")
    assert loaded.backbone.weights_source == RANDOM_INIT  # then the checkpoint's tensors
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_backbone_without_batch_norm_refuses_frozen_bn():
    with torch.device("meta"), pytest.raises(UserError) as err:
        backbones.vgg16(frozen_bn=True)
    assert str(err.value) == (
        "backbone.frozen_bn=true but backbone vgg16 has no BatchNorm layer to freeze"
    )


@pytest.mark.slow
def test_train_fine_tunes_from_a_weights_file_end_to_end(tmp_path):
    """scripts/train.py with backbone.weights, frozen BatchNorm and a gentler backbone: the
    start-up block names the file and its sha256, the two groups start at lr and lr / 10, the
    frozen statistics reach the checkpoint as the file holds them, and the checkpoint reloads
    (load_model) and serves as backbone.weights in turn."""
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(weights=None)
    with torch.no_grad():  # statistics that a fresh layer never has, and a finite forward
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    state = net.state_dict()
    path = tmp_path / "imagenet.pth"
    torch.save(state, path)
    run = tmp_path / "run"
    proc = run_script(
        "train.py", *TINY_RUN, "backbone=mobilenet_v2", f"backbone.weights={path}",
        "backbone.frozen_bn=true", "param_groups.backbone_lr_mult=0.1", f"hydra.run.dir={run}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [line.split(" INFO ", 1)[-1] for line in (run / "train.log").read_text().splitlines()]
    source = f"backbone.weights={path} (sha256 {sha12(path)})"
    assert log[1] == f"model: backbone mobilenet_v2 ({source}), head fcn8s"
    last = run / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    groups = ckpt["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([1e-4, 1e-5], rel=1e-12)
    for key, value in state.items():
        if key.rsplit(".", 1)[1] in ("running_mean", "running_var"):
            assert torch.equal(ckpt["model"][f"backbone.{key}"], value), key
    model = fcnseg.load_model(last)
    for key, value in ckpt["model"].items():
        assert torch.equal(model.state_dict()[key], value), key
    again = backbones.mobilenet_v2(weights=last, frozen_bn=True).state_dict()
    for key, value in again.items():
        assert torch.equal(value, ckpt["model"][f"backbone.{key}"]), key
