"""A training run never destroys another run, and never loses its own steps to a late failure.

Each test runs scripts/train.py as a user would (2 loader workers) and checks the exit status,
the one-sentence error, and by checksum that nothing the user had was touched.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import fixtures as fx
import pytest
import torch
from conftest import SCRIPTS
from test_preemption import ENV
from test_resume import one_thread, tiny_trainer  # noqa: F401 - fixture

from fcnseg.engine.run_dir import LOCK_NAME
from fcnseg.errors import UserError
from fcnseg.utils.checkpoint import load_checkpoint

COMMON = [
    "trainer.log_interval=1",
    "trainer.batch_size=2",
    "trainer.num_workers=2",
    "trainer.device=cpu",
    "+backbone.fc_channels=32",
]
SYNTHETIC = [
    "dataset.crop_size=32",
    "dataset.builder.min_size=32",
    "dataset.builder.max_size=40",
    "dataset.builder.num_samples={train: 8, val: 2, test: 2}",
]


def command(run_dir: Path, *args: str) -> list[str]:
    data = [] if any(a.startswith("dataset=") for a in args) else SYNTHETIC
    return [
        sys.executable, str(SCRIPTS / "train.py"), *COMMON, *data, f"hydra.run.dir={run_dir}",
        *args,
    ]  # fmt: skip


def train(run_dir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(run_dir, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**ENV, "HYDRA_FULL_ERROR": "0"},
    )


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def checksums(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "tensorboard" not in p.parts
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = train(run_dir, "trainer.max_iters=4", "trainer.eval_interval=4")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture
def finished_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def test_a_new_run_refuses_a_directory_holding_a_run(finished_copy):
    before = checksums(finished_copy)
    assert {"checkpoints/last.pt", "checkpoints/best.pt", "metrics.json"} <= before.keys()
    assert ".hydra/config.yaml" in before and ".hydra/overrides.yaml" in before
    result = train(finished_copy, "trainer.max_iters=2", "trainer.eval_interval=2")
    line = error_line(result)
    assert f"{finished_copy} already holds a run" in line and "trainer.resume=true" in line
    assert checksums(finished_copy) == before  # .hydra/ and train.log included


def test_overwrite_starts_over_and_resume_continues(finished_copy):
    done = train(finished_copy, "trainer.max_iters=5", "trainer.resume=true")
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_checkpoint(finished_copy / "checkpoints/last.pt")["iteration"] == 5
    again = train(finished_copy, "trainer.max_iters=1", "trainer.eval_interval=1",
                  "trainer.overwrite=true")  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert load_checkpoint(finished_copy / "checkpoints/last.pt")["iteration"] == 1
    assert "trainer.overwrite=true" in (finished_copy / ".hydra/overrides.yaml").read_text()


def test_a_refused_resume_leaves_the_recorded_config_alone(finished_copy):
    before = checksums(finished_copy)
    result = train(finished_copy, "trainer.max_iters=6", "trainer.resume=true", "head=fcn32s")
    line = error_line(result)
    assert "does not fit this run's model" in line
    # The first mismatched entry is named, not the loader's header line.
    assert "Error(s) in loading" not in line and ("head." in line or "key" in line)
    assert checksums(finished_copy) == before


def test_a_second_run_in_a_locked_directory_is_refused_with_the_holders_identity(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        # Far more steps than the test lasts, however fast they run: SIGTERM ends it.
        command(run_dir, "trainer.max_iters=1000000", "trainer.eval_interval=1000000"),
        stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True,
    )  # fmt: skip
    try:
        seen = []
        for line in first.stderr:
            seen.append(line)
            if "iteration 1/1000000" in line:
                break
        assert first.poll() is None, "".join(seen)
        second = train(run_dir, "trainer.max_iters=2")
        line = error_line(second)
        assert f"{run_dir} is in use by another run (process {first.pid} on" in line
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM
    assert not (run_dir / LOCK_NAME).exists()  # released on the way out


def test_a_stale_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    lock = {"host": socket.gethostname(), "pid": int(dead), "started": "-", "command": "x"}
    (run_dir / LOCK_NAME).write_text(json.dumps(lock))
    result = train(run_dir, "trainer.max_iters=2", "trainer.eval_interval=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (run_dir / LOCK_NAME).exists()


@pytest.mark.parametrize(
    ("held_by", "env", "taken"),
    [
        # SLURM requeued the job (after a node died or the time ran out) onto another node.
        ({"slurm_job": "4242", "slurm_restart": 0}, {"SLURM_RESTART_COUNT": "1"}, True),
        ({"slurm_job": "4242", "slurm_restart": 1}, {"SLURM_RESTART_COUNT": "3"}, True),
        # The same run of the job on another node, or another job: cannot be checked, alive.
        ({"slurm_job": "4242", "slurm_restart": 1}, {"SLURM_RESTART_COUNT": "1"}, False),
        ({"slurm_job": "999", "slurm_restart": 0}, {"SLURM_RESTART_COUNT": "1"}, False),
        ({}, {"SLURM_RESTART_COUNT": "1"}, False),
    ],
)
def test_a_requeued_slurm_job_takes_over_its_earlier_runs_lock_on_another_node(
    tmp_path, monkeypatch, held_by, env, taken
):
    from fcnseg.engine.run_dir import claim_run_dir

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = {"host": "node-that-died", "pid": 1, "started": "-", "command": "x", **held_by}
    (run_dir / LOCK_NAME).write_text(json.dumps(holder))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if not taken:
        with pytest.raises(UserError, match=r"in use by another run \(process 1 on node-that-died"):
            claim_run_dir(run_dir, resume="auto")
        assert json.loads((run_dir / LOCK_NAME).read_text()) == holder  # left as it was
        return
    with claim_run_dir(run_dir, resume="auto"):
        mine = json.loads((run_dir / LOCK_NAME).read_text())
        assert mine["pid"] == os.getpid()
        assert (mine["slurm_job"], mine["slurm_restart"]) == (
            "4242",
            int(env["SLURM_RESTART_COUNT"]),
        )
    assert not (run_dir / LOCK_NAME).exists()


def test_a_failing_evaluation_keeps_the_steps_before_it(tmp_path):
    """The validation split's second image is unreadable: the first evaluation fails, and
    last.pt holds every step before it."""
    root = tmp_path / "data"
    fx.write_folder(root, splits={"train": 4, "val": 2}, num_classes=3)
    bad = root / "val/images/val_001.jpg"
    bad.write_bytes(b"not a jpeg")
    run_dir = tmp_path / "run"
    result = train(
        run_dir, "dataset=folder", f"dataset.root={root}", "dataset.num_classes=3",
        "dataset.class_names=[a,b,c]", "dataset.crop_size=24", "trainer.max_iters=3",
        "trainer.eval_interval=3",
    )  # fmt: skip
    assert str(bad) in error_line(result)
    assert load_checkpoint(run_dir / "checkpoints/last.pt")["iteration"] == 3


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["trainer.batch_size=abc"], "trainer.batch_size='abc' is not a whole number"),
        (["optimizer.lr=-1"], "the optimizer refused its settings (optimizer.*): Invalid learn"),
        (["+trainer.foo=1"], "trainer.foo is not a trainer setting"),
        (["dataset.builder.num_samples={train: 8, val: 0, test: 2}"], "validation split is empty"),
    ],
)
def test_bad_settings_are_one_sentence_before_any_step(tmp_path, args, expected):
    run_dir = tmp_path / "run"
    result = train(run_dir, "trainer.max_iters=2", *args)
    assert expected in error_line(result)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / ".hydra").exists()


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"eval_batch_size": 0}, "trainer.eval_batch_size=0 must be at least 1"),
        ({"batch_size": 2.5}, "trainer.batch_size=2.5 is not a whole number"),
        ({"num_workers": -1}, "trainer.num_workers=-1 must be at least 0"),
        ({"max_iters": True}, "trainer.max_iters=True is not a whole number"),
        ({"optimizer": functools.partial(torch.optim.SGD, lr=float("nan"))}, "Invalid learning"),
        (
            {"optimizer": functools.partial(torch.optim.AdamW, lr=1e-3, momentum=0.9)},
            "optimizer.momentum is not a setting of AdamW; remove it with '~optimizer.momentum'",
        ),
    ],
)
def test_bad_trainer_settings_are_refused_before_anything_is_written(tmp_path, options, expected):
    with pytest.raises(UserError, match=re.escape(expected)):
        tiny_trainer(tmp_path / "run", **options)
    assert not (tmp_path / "run" / "checkpoints").exists()


def _in_mount_namespace(setup: str, run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """Runs train.py in a private mount namespace after the shell commands ``setup``."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("user namespaces are not available here")
    script = f"{setup} && exec {shlex.join(command(run_dir, *args))}"
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        capture_output=True, text=True, timeout=120, env={**ENV, "HYDRA_FULL_ERROR": "0"},
    )  # fmt: skip


def test_a_read_only_run_directory_is_one_sentence(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    setup = f"mount --bind {run_dir} {run_dir} && mount -o remount,bind,ro {run_dir}"
    result = _in_mount_namespace(setup, run_dir, "trainer.max_iters=2")
    assert f"the run directory {run_dir} is not writable" in error_line(result)


def _checkpoint_size(finished_run: Path) -> int:
    return (finished_run / "checkpoints/last.pt").stat().st_size


def test_no_room_for_a_checkpoint_is_refused_before_the_first_step(tmp_path, finished_run):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    size_kb = _checkpoint_size(finished_run) // 1024 // 3  # a third of one checkpoint
    setup = f"mount -t tmpfs -o size={size_kb}k tmpfs {run_dir}"
    result = _in_mount_namespace(setup, run_dir, "trainer.max_iters=2")
    line = error_line(result)
    assert "no space left for checkpoints in" in line and "MB are free" in line


def test_a_full_disk_while_saving_names_the_file_and_keeps_the_previous_one(tmp_path, finished_run):
    """Room for one checkpoint, not for two: last.pt is written before the evaluation,
    best.pt after it fails."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    size_kb = _checkpoint_size(finished_run) * 3 // 2 // 1024
    setup = f"mount -t tmpfs -o size={size_kb}k tmpfs {run_dir}"
    result = _in_mount_namespace(setup, run_dir, "trainer.max_iters=2", "trainer.eval_interval=2")
    line = error_line(result)
    assert "cannot write checkpoint" in line and "no space left on device: needs ~" in line
    assert "enforce fail" not in line


def test_checkpoint_size_estimate_covers_the_optimizer_state(tmp_path, finished_run):
    """The estimate that the room check uses is at least the size of a real checkpoint."""
    from fcnseg.engine.run_dir import checkpoint_size

    ckpt = torch.load(finished_run / "checkpoints/last.pt", weights_only=True)
    model = torch.nn.ParameterList(
        [torch.nn.Parameter(t.float()) for t in ckpt["model"].values() if t.is_floating_point()]
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # the default recipe's
    estimate = checkpoint_size(optimizer)
    assert estimate >= 0.9 * _checkpoint_size(finished_run)
