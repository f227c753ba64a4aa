"""A failed run exits: every error path, with loader workers, ends the process promptly.

Loader workers leave SIGTERM to the training process, so a worker that nobody stops keeps the
interpreter's exit waiting for it forever. Every test runs the real script with 2 workers per
process and bounds the time to a non-zero exit.
"""

from __future__ import annotations

import subprocess
import sys

import fixtures as fx
import numpy as np
import pytest
from conftest import SCRIPTS
from test_distributed import free_port
from test_preemption import ENV

EXIT_WITHIN = 90  # seconds; a stuck process runs into it (a healthy exit takes a few)

TINY = [
    "trainer.log_interval=1",
    "trainer.batch_size=2",
    "trainer.num_workers=2",
    "trainer.device=cpu",
    "+backbone.fc_channels=32",
    "dataset.crop_size=24",
]
SYNTHETIC = [
    "dataset.builder.min_size=32",
    "dataset.builder.max_size=40",
    "dataset.builder.num_samples={train: 8, val: 2, test: 2}",
]


def train(tmp_path, *args: str, torchrun: bool = False) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node=2"]
        launcher += [f"--master_port={free_port()}"]
    return subprocess.run(
        [*launcher, str(SCRIPTS / "train.py"), *TINY, f"hydra.run.dir={tmp_path / 'run'}", *args],
        capture_output=True,
        text=True,
        timeout=EXIT_WITHIN,
        env={**ENV, "HYDRA_FULL_ERROR": "0"},
    )


def folder_dataset(tmp_path) -> list[str]:
    root = fx.write_folder(tmp_path / "data", splits={"train": 4, "val": 2}, num_classes=3)
    return [
        "dataset=folder",
        f"dataset.root={root}",
        "dataset.num_classes=3",
        "dataset.class_names=[a,b,c]",
    ]


def one_error_line(result: subprocess.CompletedProcess, *, torchrun: bool = False) -> str:
    errors = [line for line in result.stderr.splitlines() if "train.py: error:" in line]
    assert errors, result.stderr[-3000:]
    if not torchrun:  # torchrun itself reports a failed worker with a traceback of its own
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return errors[0]


def test_nan_loss_under_nan_policy_stop_exits(tmp_path):
    result = train(
        tmp_path, *SYNTHETIC, "optimizer.lr=1e8", "trainer.max_iters=50", "trainer.nan_policy=stop"
    )
    assert result.returncode == 2
    assert "the training loss is nan at iteration" in one_error_line(result)


def test_truncated_training_image_exits(tmp_path):
    args = folder_dataset(tmp_path)
    image = tmp_path / "data/train/images/train_001.jpg"
    image.write_bytes(image.read_bytes()[:200])
    result = train(tmp_path, *args, "trainer.max_iters=20", "trainer.eval_interval=100")
    assert result.returncode == 2
    assert f"{image}" in one_error_line(result)


def test_label_outside_the_classes_met_in_a_worker_exits(tmp_path):
    args = folder_dataset(tmp_path)
    mask = tmp_path / "data/train/masks/train_002.png"
    _, label = fx.sample_arrays("folder/train/train_002", values=range(3))
    label = label.copy()
    label[0, 0] = 7
    fx._save(label, mask)
    result = train(tmp_path, *args, "trainer.max_iters=20", "trainer.eval_interval=100")
    assert result.returncode == 2
    assert f"{mask}: label value 7 is neither a class in [0, 3)" in one_error_line(result)


def test_corrupted_image_met_by_the_evaluation_during_training_exits(tmp_path):
    args = folder_dataset(tmp_path)
    image = tmp_path / "data/val/images/val_001.jpg"
    image.write_bytes(b"not a jpeg")
    result = train(tmp_path, *args, "trainer.max_iters=2", "trainer.eval_interval=2")
    assert result.returncode == 2
    assert f"{image}" in one_error_line(result)


@pytest.mark.slow
def test_nan_loss_under_torchrun_ends_the_job(tmp_path):
    result = train(tmp_path, *SYNTHETIC, "optimizer.lr=1e8", "trainer.max_iters=50", torchrun=True)
    assert result.returncode != 0
    assert "the training loss is nan at iteration" in one_error_line(result, torchrun=True)


@pytest.mark.slow
def test_a_rank_failing_alone_under_torchrun_ends_the_job(tmp_path):
    """Only one process meets the bad label; the other must not wait for it forever."""
    args = folder_dataset(tmp_path)
    for k in range(4):  # every training label but one is fine; its process fails alone
        mask = tmp_path / f"data/train/masks/train_{k:03d}.png"
        _, label = fx.sample_arrays(f"folder/train/train_{k:03d}", values=range(3))
        if k == 1:
            label = np.where(label == 0, 9, label).astype(np.uint8)
        fx._save(label, mask)
    result = train(
        tmp_path, *args, "trainer.max_iters=20", "trainer.eval_interval=100", torchrun=True
    )
    assert result.returncode != 0
    assert "label value 9 is neither a class" in result.stderr
