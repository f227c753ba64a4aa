"""Importing torchfcn weights: the imported model computes the original network's logits.

The original is re-implemented here from the published layer list of the reference nets
(voc-fcn32s/16s/8s/8s-atonce, as the PyTorch port writes them): its own layers, its own literal
crop offsets, nothing shared with fcnseg.
"""

import json

import pytest
import torch
from conftest import run_script
from torch import nn

import fcnseg
from fcnseg.errors import UserError
from fcnseg.models import torchfcn
from fcnseg.utils.checkpoint import save_checkpoint

# (name, input channels, output channels) of VGG16's convolutions; a pooling after each stage.
VGG16_STAGES = [
    [("conv1_1", 3, 64), ("conv1_2", 64, 64)],
    [("conv2_1", 64, 128), ("conv2_2", 128, 128)],
    [("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256)],
    [("conv4_1", 256, 512), ("conv4_2", 512, 512), ("conv4_3", 512, 512)],
    [("conv5_1", 512, 512), ("conv5_2", 512, 512), ("conv5_3", 512, 512)],
]
HEADS = ["fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce"]


class TorchFCN(nn.Module):
    """The reference VGG16 FCN (``width`` divides every VGG width, 1 for the real net)."""

    def __init__(self, head: str, n_class: int, width: int = 1) -> None:
        super().__init__()
        self.head = head

        def w(channels: int) -> int:
            return channels if channels == 3 else channels // width

        for stage in VGG16_STAGES:
            for name, cin, cout in stage:
                setattr(
                    self,
                    name,
                    nn.Conv2d(w(cin), w(cout), 3, padding=100 if name == "conv1_1" else 1),
                )
        self.fc6 = nn.Conv2d(w(512), w(4096), 7)
        self.fc7 = nn.Conv2d(w(4096), w(4096), 1)
        self.score_fr = nn.Conv2d(w(4096), n_class, 1)
        if head == "fcn32s":
            self.upscore = nn.ConvTranspose2d(n_class, n_class, 64, stride=32, bias=False)
        else:
            self.score_pool4 = nn.Conv2d(w(512), n_class, 1)
            self.upscore2 = nn.ConvTranspose2d(n_class, n_class, 4, stride=2, bias=False)
        if head == "fcn16s":
            self.upscore16 = nn.ConvTranspose2d(n_class, n_class, 32, stride=16, bias=False)
        if head.startswith("fcn8s"):
            self.score_pool3 = nn.Conv2d(w(256), n_class, 1)
            self.upscore_pool4 = nn.ConvTranspose2d(n_class, n_class, 4, stride=2, bias=False)
            self.upscore8 = nn.ConvTranspose2d(n_class, n_class, 16, stride=8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, pools = x, []
        for stage in VGG16_STAGES:
            for name, _, _ in stage:
                h = torch.relu(getattr(self, name)(h))
            h = nn.functional.max_pool2d(h, 2, stride=2, ceil_mode=True)
            pools.append(h)
        pool3, pool4 = pools[2], pools[3]
        h = torch.relu(self.fc7(torch.relu(self.fc6(h))))  # dropout: identity in eval
        h = self.score_fr(h)
        H, W = x.shape[-2:]
        if self.head == "fcn32s":
            return self.upscore(h)[:, :, 19 : 19 + H, 19 : 19 + W]
        upscore2 = self.upscore2(h)
        scale4, scale3 = (0.01, 0.0001) if self.head == "fcn8s_atonce" else (1.0, 1.0)
        h = self.score_pool4(pool4 * scale4)
        h = upscore2 + h[:, :, 5 : 5 + upscore2.size(2), 5 : 5 + upscore2.size(3)]
        if self.head == "fcn16s":
            return self.upscore16(h)[:, :, 27 : 27 + H, 27 : 27 + W]
        upscore_pool4 = self.upscore_pool4(h)
        h = self.score_pool3(pool3 * scale3)
        h = upscore_pool4 + h[:, :, 9 : 9 + upscore_pool4.size(2), 9 : 9 + upscore_pool4.size(3)]
        return self.upscore8(h)[:, :, 31 : 31 + H, 31 : 31 + W]


def _reference(head: str, n_class: int, width: int) -> TorchFCN:
    torch.manual_seed(hash(head) % 1000)
    net = TorchFCN(head, n_class, width).eval()
    with torch.no_grad():  # trained-looking weights: nothing zero, activations of order one
        for name, p in net.named_parameters():
            if name.startswith("upscore"):
                p.normal_(0.1, 0.05)
            elif name.endswith("weight"):
                p.normal_(0.0, (2.0 / p[0].numel()) ** 0.5)
            else:
                p.uniform_(-0.1, 0.1)
    return net


def _config(head: str, *, backbone: str = "vgg_tiny", num_classes: int = 5) -> dict:
    """What scripts/import_weights.py passes: the backbone, head and dataset nodes."""
    target = f"fcnseg.models.backbones.{backbone}"
    options = {"batch_norm": False} if backbone == "vgg_tiny" else {}
    return {
        "backbone": {"_target_": target, "pretrained": True, "weights": None, **options},
        "head": {"_target_": f"fcnseg.models.heads.{head}", "_partial_": True,
                 "learnable_upsample": False},
        "dataset": {"name": "voc", "num_classes": num_classes, "normalize": "imagenet",
                    "class_names": [f"class{i}" for i in range(num_classes)]},
    }  # fmt: skip


@pytest.mark.parametrize("head", HEADS)
def test_imported_model_computes_the_reference_logits(head, tmp_path):
    reference = _reference(head, 5, width=8)  # VGG16 at 1/8 width: vgg_tiny without BN
    path = tmp_path / f"{head}.pth"
    torch.save(reference.state_dict(), path)
    ckpt = torchfcn.import_checkpoint(path, config=_config(head))
    assert ckpt["config"]["dataset"]["normalize"] == "caffe"
    assert ckpt["config"]["backbone"]["pretrained"] is False
    save_checkpoint(ckpt, tmp_path / "imported.pt")
    model = fcnseg.load_model(tmp_path / "imported.pt")
    for h, w in ((37, 51), (64, 45), (1, 3)):
        x = torch.randn(1, 3, h, w) * 50  # Caffe's input range: 0-255, mean subtracted
        with torch.no_grad():
            expected, got = reference(x), model(x)
        assert got.shape == expected.shape == (1, 5, h, w)
        assert expected.abs().max() > 1e-3
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


@pytest.mark.slow
def test_full_vgg16_fcn8s_round_trip(tmp_path):
    """The published net itself: VGG16 FCN-8s, 21 classes, 134,489,759 parameters."""
    reference = _reference("fcn8s", 21, width=1)
    assert sum(p.numel() for p in reference.parameters()) == 134_489_759
    path = tmp_path / "fcn8s_from_caffe.pth"
    torch.save(reference.state_dict(), path)
    ckpt = torchfcn.import_checkpoint(
        path, config=_config("fcn8s", backbone="vgg16", num_classes=21)
    )
    model = fcnseg.models.build_model_from_config(ckpt["config"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    x = torch.randn(1, 3, 45, 33) * 50
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
    assert torchfcn.from_fcnseg(ckpt["model"]).keys() == reference.state_dict().keys()


def test_renaming_round_trips_and_reads_training_checkpoints(tmp_path):
    state = _reference("fcn16s", 3, width=8).state_dict()
    renamed = torchfcn.to_fcnseg(state, head="fcn16s")
    assert renamed["backbone.features.conv1_1.weight"] is state["conv1_1.weight"]
    assert renamed["backbone.fc.fc6.bias"] is state["fc6.bias"]
    assert renamed["head.upscore16.weight"] is state["upscore16.weight"]
    assert torchfcn.from_fcnseg(renamed) == state
    # The port's trainer writes {"model_state_dict": ..., "arch": "FCN16s", ...}.
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"model_state_dict": state, "arch": "FCN16s", "iteration": 44000}, path)
    loaded, arch = torchfcn.read_state_dict(path)
    assert arch == "fcn16s" and loaded.keys() == state.keys()
    with pytest.raises(UserError, match="holds a torchfcn fcn16s; use head=fcn16s"):
        torchfcn.import_checkpoint(path, config=_config("fcn8s", num_classes=3))


def test_wrong_weights_are_named(tmp_path):
    state = _reference("fcn32s", 5, width=8).state_dict()
    with pytest.raises(
        UserError, match=r"not a torchfcn fcn8s: the state dict lacks .*head=fcn32s"
    ):
        torchfcn.to_fcnseg(state, head="fcn8s")
    path = tmp_path / "fcn32s.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match="scores 5 classes but dataset.num_classes=21"):
        torchfcn.import_checkpoint(path, config=_config("fcn32s", num_classes=21))
    with pytest.raises(UserError, match="does not fit backbone=vgg16 head=fcn32s"):
        torchfcn.import_checkpoint(path, config=_config("fcn32s", backbone="vgg16"))
    with pytest.raises(UserError, match="does not exist"):
        torchfcn.read_state_dict(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="junk.pth is not a readable PyTorch checkpoint file"):
        torchfcn.read_state_dict(tmp_path / "junk.pth")
    with pytest.raises(UserError, match=f"input={tmp_path} is a directory, not a checkpoint"):
        torchfcn.read_state_dict(tmp_path)


@pytest.mark.slow
def test_import_script_writes_a_checkpoint_that_evaluate_accepts(tmp_path):
    reference = _reference("fcn8s", 5, width=8)
    weights, ckpt = tmp_path / "fcn8s.pth", tmp_path / "out" / "fcn8s.pt"
    torch.save(reference.state_dict(), weights)
    proc = run_script(
        "import_weights.py", "format=torchfcn", "head=fcn8s", f"input={weights}",
        f"output={ckpt}", "dataset=synthetic", "backbone=vgg_tiny", "backbone.batch_norm=false",
        "dataset.builder.num_samples={train: 2, val: 3, test: 3}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "input normalisation caffe" in proc.stdout
    model = fcnseg.load_model(ckpt)
    x = torch.randn(1, 3, 29, 40) * 50
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
    metrics = tmp_path / "metrics.json"
    proc = run_script(
        "evaluate.py", f"checkpoint={ckpt}", f"out={metrics}", "trainer.device=cpu",
        "trainer.num_workers=0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(metrics.read_text())["num_images"] == 3
