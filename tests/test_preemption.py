"""Stopping well: SIGTERM/SIGINT save a resumable checkpoint, a NaN never overwrites a good one."""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import SCRIPTS
from test_resume import NUM_CLASSES, one_thread, tiny_trainer  # noqa: F401 - fixture
from torch.utils.data import Dataset

from fcnseg.engine.preemption import StopSignals
from fcnseg.engine.trainer import NonFiniteLossError
from fcnseg.utils.checkpoint import load_checkpoint

# A few seconds of training on 32-px crops; the caller adds max_iters and the run directory.
SCRIPT_RUN = [
    "trainer.eval_interval=1000",
    "trainer.checkpoint_interval=1000",
    "trainer.log_interval=1",
    "trainer.batch_size=2",
    "trainer.num_workers=2",  # the real worker count: every way out must stop them
    "trainer.device=cpu",
    "+backbone.fc_channels=64",
    "dataset.crop_size=32",
    "dataset.builder.min_size=32",
    "dataset.builder.max_size=44",
    "dataset.builder.num_samples={train: 8, val: 2, test: 2}",
]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


class NaNAt(Dataset):
    """``dataset`` whose fetch number ``at`` returns an image of NaNs."""

    def __init__(self, dataset: Dataset, at: int) -> None:
        self.dataset, self.at, self.fetches = dataset, at, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        self.fetches += 1
        image, mask = self.dataset[key]
        return (torch.full_like(image, float("nan")) if self.fetches == self.at else image), mask


def test_nan_policy_stop_names_the_iteration_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = tiny_trainer(tmp_path, checkpoint_interval=2, eval_interval=100, nan_policy="stop")
    trainer.train_set = NaNAt(trainer.train_set, at=7)  # 2 images a step: step 4's first image
    last = tmp_path / "checkpoints" / "last.pt"
    with pytest.raises(NonFiniteLossError) as err:
        trainer.fit()
    message = str(err.value)
    assert "the training loss is nan at iteration 4" in message
    assert f"the last good checkpoint, {last.absolute()} (iteration 2), is kept" in message
    assert load_checkpoint(last)["iteration"] == 2
    # The NaN step never reached the weights.
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.iteration == 3


def test_nan_policy_skip_skips_the_update_and_counts_it(tmp_path, caplog):
    trainer = tiny_trainer(tmp_path, eval_interval=100, nan_policy="skip")
    trainer.train_set = NaNAt(trainer.train_set, at=7)
    with caplog.at_level(logging.WARNING, logger="fcnseg"):
        trainer.log.propagate = True
        try:
            trainer.fit()
        finally:
            trainer.log.propagate = False
    assert "iteration 4: loss nan, update skipped (1 skipped so far)" in caplog.text
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["iteration"] == 6 and ckpt["skipped_steps"] == 1
    # AdamW counts the updates it made: 6 iterations, one skipped.
    assert {float(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {5.0}
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


def test_non_finite_weights_are_never_saved(tmp_path):
    trainer = tiny_trainer(tmp_path)
    trainer.iteration = 1
    path = trainer.save("last.pt")
    before = path.read_bytes()
    with torch.no_grad():
        next(trainer.model.parameters())[0] = float("inf")
    trainer.iteration = 2
    with pytest.raises(NonFiniteLossError, match="not finite at iteration 2"):
        trainer.save("last.pt")
    assert path.read_bytes() == before


@pytest.fixture
def terminal_sigint():
    """Python's Ctrl-C handler, as in a terminal: a suite started in the background by a
    non-interactive shell inherits SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_repeated_signal_is_one_request_and_a_late_one_aborts(terminal_sigint):
    log = logging.getLogger("test_preemption")
    with StopSignals(log, repeat_window=60) as signals:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # torchrun forwarding the terminal's Ctrl-C
        assert signals.received == signal.SIGINT
    with pytest.raises(KeyboardInterrupt), StopSignals(log, repeat_window=0) as signals:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C, later: Python's default
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


class SignalsItsOwnProcess(Dataset):
    """Sends SIGTERM to the process that loads sample 0: a loader worker, here."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if key[0] == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.dataset[key]


@pytest.mark.slow
def test_loader_workers_leave_stop_signals_to_the_training_process(tmp_path):
    # A scheduler signals every process of a job: a worker that died of it would break the
    # next batch. Here only workers are signalled, so the run must simply complete.
    trainer = tiny_trainer(tmp_path, num_workers=1, max_iters=4, eval_interval=100)
    trainer.train_set = SignalsItsOwnProcess(trainer.train_set)
    trainer.fit()
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["iteration"] == 4


def run_until_logged(args: list[str], pattern: str, *, signum: int, cwd) -> tuple[int, str, float]:
    """Starts ``args``, sends ``signum`` once ``pattern`` is logged; returns (status, log, s)."""
    proc = subprocess.Popen(
        args, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(pattern, line):
            break
    else:
        proc.wait()
        raise AssertionError(f"{pattern!r} never logged:\n{''.join(lines)}")
    sent = time.monotonic()
    proc.send_signal(signum)
    rest, _ = proc.communicate(timeout=60)
    return proc.returncode, "".join(lines) + rest, time.monotonic() - sent


def resume_command(log: str) -> list[str]:
    """The command the stopped run printed after ``Resume with:``, with this interpreter."""
    match = re.search(r"Resume with:\n\s+(.+)\n", log)
    assert match, log
    argv = shlex.split(match.group(1))
    assert argv[0] in ("python", "torchrun")
    return argv


@pytest.mark.slow
def test_sigterm_mid_run_writes_a_checkpoint_and_the_printed_command_resumes(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        str(SCRIPTS / "train.py"),
        *SCRIPT_RUN,
        "trainer.max_iters=500",
        f"hydra.run.dir={run_dir}",
    ]
    status, log, seconds = run_until_logged(
        args, r"iteration 2/500", signum=signal.SIGTERM, cwd=tmp_path
    )
    assert status == 128 + signal.SIGTERM, log
    assert seconds < 60
    assert "SIGTERM received by this process: finishing the current step" in log
    stopped = int(re.search(r"training stopped by SIGTERM after iteration (\d+)/500", log).group(1))
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["iteration"] == stopped >= 2

    argv = resume_command(log)
    assert argv[1:3] == [str(SCRIPTS / "train.py"), SCRIPT_RUN[0]]
    assert argv[-2:] == [f"hydra.run.dir={run_dir}", "trainer.resume=true"]
    # Run it (with this interpreter), two more iterations.
    done = subprocess.run(
        [sys.executable, *argv[1:], f"trainer.max_iters={stopped + 2}"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (
        f"resumed from {run_dir / 'checkpoints' / 'last.pt'} at iteration {stopped}" in done.stderr
    )
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["iteration"] == stopped + 2


class SignalAt(Dataset):
    """Sends ``signum`` to its own (the training) process on fetch number ``at``."""

    def __init__(self, dataset: Dataset, *, at: int, signum: int) -> None:
        self.dataset, self.at, self.signum, self.fetches = dataset, at, signum, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        self.fetches += 1
        if self.fetches == self.at:
            os.kill(os.getpid(), self.signum)
        return self.dataset[key]


@pytest.mark.skipif(not hasattr(signal, "SIGUSR2"), reason="no SIGUSR2 on this system")
def test_a_time_limit_signal_saves_the_step_then_reaches_the_requeue_handler(tmp_path):
    """SLURM's time-limit warning (SIGUSR2) stops training after a saved step like SIGTERM,
    then reaches the handler installed before training (submitit's, which requeues the job)
    with last.pt already written."""
    calls = []

    def requeue(signum, frame):  # what submitit installs for SIGUSR2 before the task runs
        calls.append((signum, load_checkpoint(tmp_path / "checkpoints" / "last.pt")["iteration"]))
        raise SystemExit(-1)  # submitit's way out after requeueing

    previous = signal.signal(signal.SIGUSR2, requeue)
    try:
        trainer = tiny_trainer(tmp_path, max_iters=50, eval_interval=100)
        trainer.train_set = SignalAt(trainer.train_set, at=5, signum=signal.SIGUSR2)
        with pytest.raises(SystemExit):
            trainer.fit()
        assert signal.getsignal(signal.SIGUSR2) is requeue  # restored
    finally:
        signal.signal(signal.SIGUSR2, previous)
    # Fetch 5 is in the 3rd batch of 2 (the loader may read one batch ahead): the step then in
    # progress was finished and saved, long before the 50th.
    assert calls == [(signal.SIGUSR2, trainer.iteration)]
    assert 2 <= trainer.iteration <= 3


@pytest.mark.skipif(not hasattr(signal, "SIGUSR2"), reason="no SIGUSR2 on this system")
def test_a_time_limit_signal_without_a_handler_stops_like_sigterm(tmp_path):
    from fcnseg.engine.trainer import TrainingInterrupted

    trainer = tiny_trainer(tmp_path, max_iters=50, eval_interval=100)
    trainer.train_set = SignalAt(trainer.train_set, at=5, signum=signal.SIGUSR2)
    with pytest.raises(TrainingInterrupted, match="stopped by SIGUSR2 after iteration") as stop:
        trainer.fit()
    assert stop.value.exit_code == 128 + signal.SIGUSR2
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["iteration"] == trainer.iteration
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
