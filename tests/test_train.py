"""End to end: scripts/train.py on the synthetic dataset, and what it leaves behind."""

import json

import pytest
import torch
from conftest import TINY_RUN, run_script
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import fcnseg
from fcnseg.data import SyntheticShapes, build_transforms
from fcnseg.errors import UserError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    proc = run_script("train.py", *TINY_RUN, f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run directory: {out}" in proc.stdout
    assert "mIoU" in proc.stdout
    return out


def test_run_directory_layout(run_dir):
    for rel in ("checkpoints/last.pt", "checkpoints/best.pt", "metrics.json", "train.log"):
        assert (run_dir / rel).is_file(), rel
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_best_checkpoint_holds_the_model_not_the_optimizer(run_dir):
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert set(best) == {
        "model",
        "model_description",
        "config",
        "iteration",
        "best_miou",
        "weights",
    }
    assert best["weights"] == "live"
    for key, value in best["model"].items():  # the same weights (2 iterations, one evaluation)
        torch.testing.assert_close(value, last["model"][key], rtol=0, atol=0)
    assert best["best_miou"] == json.loads((run_dir / "metrics.json").read_text())["miou"]
    proc = run_script(
        "train.py", *TINY_RUN, f"trainer.resume={run_dir / 'checkpoints' / 'best.pt'}",
        f"hydra.run.dir={run_dir.parent / 'from_best'}",
    )  # fmt: skip
    assert proc.returncode == 2 and "holds the weights only" in proc.stderr


def test_the_log_starts_with_what_the_run_does(run_dir):
    log = (run_dir / "train.log").read_text().splitlines()
    block = [line.split(" INFO ", 1)[1] for line in log[:5]]
    assert block[0] == "data: synthetic at (built in); train 8, val 3 images; crop 64"
    assert block[1] == "model: backbone vgg_tiny (from scratch), head fcn8s"
    assert block[2].startswith("recipe: AdamW lr 0.01 (not scaled with the batch), PolynomialLR, ")
    assert "iterations 1-2; 2 images per process x 1 process(es)" in block[2]
    assert block[3] == "runtime: cpu x 1 process(es), amp none, channels_last False, compile False"
    assert block[4] == f"run directory: {run_dir}"
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    assert "run/summary/text_summary" in acc.Tags()["tensors"]


def test_checkpoint_is_plain_data(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["iteration"] == 2
    assert {"model", "optimizer", "scheduler", "scaler", "config", "rng"} <= ckpt.keys()
    assert ckpt["config"]["dataset"]["num_classes"] == 5
    assert ckpt["config"]["backbone"]["_target_"] == "fcnseg.models.backbones.vgg_tiny"


def test_load_model_reproduces_the_trained_weights(run_dir):
    model = fcnseg.load_model(run_dir / "checkpoints" / "last.pt")
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert not model.training
    x = torch.randn(1, 3, 37, 51)
    assert model(x).shape == (1, 5, 37, 51)


def test_metrics_json_schema(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    for key in ("miou", "pixel_acc", "mean_acc", "fwiou"):
        assert 0.0 <= m[key] <= 1.0
    assert len(m["iou"]) == len(m["class_names"]) == 5
    conf = torch.tensor(m["confusion_matrix"])
    assert conf.shape == (5, 5) and int(conf.sum()) == m["num_pixels"]
    assert m["num_images"] == 3
    # num_pixels is every scored pixel of the validation split at full resolution.
    val = SyntheticShapes(split="val", num_samples=3)
    assert m["num_pixels"] == sum(int((val.load(i)[1] != 255).sum()) for i in range(3))


def test_tensorboard_has_scalars_and_images(run_dir):
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/lr", "val/miou", "val/pixel_acc"):
        assert tag in tags["scalars"], tag
    assert any("predictions" in t for t in tags["images"])


def test_training_reduces_the_loss(tmp_path):
    proc = run_script(
        "train.py", *TINY_RUN, "trainer.max_iters=12", "trainer.eval_interval=12",
        "trainer.log_interval=1", "trainer.batch_size=4", f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [
        float(line.split("loss ")[1].split(",")[0])
        for line in (tmp_path / "train.log").read_text().splitlines()
        if "loss " in line
    ]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_wrong_override_is_one_clear_error(tmp_path):
    proc = run_script("train.py", "trainer.max_itres=5", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "max_itres" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_group_option_is_named(tmp_path):
    proc = run_script("train.py", "head=fcn7s", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0 and "fcn7s" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_trainer_value_is_named(tmp_path):
    proc = run_script("train.py", *TINY_RUN, "trainer.amp=fp8", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert "trainer.amp='fp8'" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_factory_argument_is_one_line_naming_it(tmp_path):
    proc = run_script("train.py", *TINY_RUN, "+backbone.widht=3", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "widht" in lines[0] and "backbone" in lines[0]


def test_missing_resume_checkpoint_is_named(tmp_path):
    proc = run_script(
        "train.py", *TINY_RUN, "trainer.resume=/nonexistent/last.pt", f"hydra.run.dir={tmp_path}"
    )
    assert proc.returncode == 2
    assert "/nonexistent/last.pt" in proc.stderr and "Traceback" not in proc.stderr


def test_label_out_of_range_is_named_before_any_forward_pass():
    class Broken(SyntheticShapes):
        def load(self, index):
            image, mask = super().load(index)
            mask[0, 0] = 9
            return image, mask

    ds = Broken(split="train", num_samples=2, transform=build_transforms(train=False))
    with pytest.raises(UserError, match="synthetic train sample 1: label value 9"):
        ds[1]


def test_unreadable_checkpoint_is_named(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="model.pt is not a readable"):
        fcnseg.load_model(bad)
