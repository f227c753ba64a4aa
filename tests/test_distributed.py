"""DDP on CPU (gloo, 2 processes): same gradients as one process, one run directory, one stop."""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SCRIPTS
from test_preemption import ENV, SCRIPT_RUN, resume_command
from test_resume import NUM_CLASSES, one_thread, tiny_model, tiny_trainer  # noqa: F401 - fixture

from fcnseg.engine.trainer import NonFiniteLossError
from fcnseg.errors import UserError
from fcnseg.utils.checkpoint import load_checkpoint
from fcnseg.utils.cli import user_errors
from fcnseg.utils.distributed import cleanup, launch_command, local_main_first

# Batch-independent layers (no BatchNorm, no dropout) so that a gradient over a batch split
# across processes can be compared with the gradient over the whole batch.
PLAIN = {"batch_norm": False, "dropout": 0.0}
LR = 0.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=g), torch.randint(
        0, NUM_CLASSES, (8, 32, 32), generator=g
    )


def _ddp_worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
    )  # fmt: skip
    torch.set_num_threads(1)
    tmp_path = Path(tmp)
    result: dict = {}
    try:
        # Each process proposes its own (empty) folder, as torchrun + Hydra may do.
        trainer = tiny_trainer(
            tmp_path / f"rank{rank}",
            backbone_options=PLAIN,
            optimizer=functools.partial(torch.optim.SGD, lr=LR),
            accumulate=2,
        )
        result["run_dir"] = str(trainer.run_dir)
        images, targets = global_batch()
        own = slice(4 * rank, 4 * rank + 4)  # 4 images, 2 micro-batches of 2
        result["loss"] = trainer.run_step(images[own], targets[own])
        result["grads"] = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
        result["params"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        # A NaN on rank 1 only: both processes must stop at the same step.
        bad = images[own].clone()
        if rank == 1:
            bad[0] = float("nan")
        try:
            trainer.run_step(bad, targets[own])
        except NonFiniteLossError as err:
            result["nan"] = str(err)
        try:
            tiny_trainer(tmp_path / "syncbn", sync_bn=True)
        except UserError as err:
            result["sync_bn"] = str(err)
    finally:
        torch.save(result, tmp_path / f"result{rank}.pt")
        cleanup()


@pytest.mark.slow
def test_ddp_gradients_match_one_process_on_the_whole_batch(tmp_path):
    # Forked, not spawned: no second import of torch; each child sets one thread before any work.
    torch.multiprocessing.start_processes(
        _ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    results = [torch.load(tmp_path / f"result{r}.pt", weights_only=False) for r in range(2)]

    # The independent computation: one model, the concatenated batch, plain autograd and SGD.
    model = tiny_model(**PLAIN)
    images, targets = global_batch()
    loss = F.cross_entropy(model(images), targets)  # every pixel is valid: a mean over all 8
    loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    for result in results:
        assert result["loss"] == pytest.approx(loss.item(), rel=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(result["grads"][name], reference[name], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(
                result["params"][name], p.detach() - LR * reference[name], rtol=1e-5, atol=1e-7
            )
    # Not vacuous: one process's half of the batch has another gradient.
    model.zero_grad()
    F.cross_entropy(model(images[:4]), targets[:4]).backward()
    half = {n: p.grad for n, p in model.named_parameters()}
    assert not all(torch.allclose(half[n], reference[n], rtol=1e-2, atol=1e-4) for n in half)

    # Both processes use rank 0's folder; rank 1's empty one is gone.
    assert results[0]["run_dir"] == results[1]["run_dir"] == str(tmp_path / "rank0")
    assert not (tmp_path / "rank1").exists()
    # The NaN of rank 1 stopped both at the same step.
    assert results[0]["nan"] == results[1]["nan"]
    assert "the training loss is nan at iteration 2" in results[0]["nan"]  # after one good step
    assert "SyncBatchNorm has no CPU version" in results[0]["sync_bn"]


def _worker_pids(agent: int) -> dict[int, int]:
    """{rank: pid} of the training processes a torchrun agent started."""
    pids = {}
    for task in Path(f"/proc/{agent}/task").iterdir():
        for pid in (task / "children").read_text().split():
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            ranks = [e for e in environ if e.startswith(b"RANK=")]
            if ranks:
                pids[int(ranks[0][5:])] = int(pid)
    return pids


@pytest.mark.slow
def test_torchrun_two_processes_one_run_dir_stop_together_and_resume(tmp_path):
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
    ]
    args = [*torchrun, str(SCRIPTS / "train.py"), *SCRIPT_RUN, "trainer.max_iters=500"]
    proc = subprocess.Popen(
        args, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "iteration 2/500" in line:
            break
    else:
        raise AssertionError("".join(lines))
    # The signal reaches rank 1 only: rank 0, which writes, learns of it through the step's
    # all-reduce, and both stop after the same step.
    os.kill(_worker_pids(proc.pid)[1], signal.SIGTERM)
    sent = time.monotonic()
    rest, _ = proc.communicate(timeout=120)
    log = "".join(lines) + rest
    assert time.monotonic() - sent < 60, log
    assert proc.returncode != 0
    assert "2 images per process x 2 process(es) x 1 accumulation step(s) = 4 per step" in log
    assert "SIGTERM received by process 1 of 2" in log
    # Only rank 0 reports, and it had no signal of its own.
    assert len(re.findall("training stopped by", log)) == 1
    found = re.search(r"stopped by a stop signal to another process after iteration (\d+)/500", log)
    stopped = int(found.group(1))

    run_dirs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(run_dirs) == 1, run_dirs  # one folder for both processes, whatever the clock said
    run_dir = run_dirs[0]
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".hydra",
        "checkpoints",
        "tensorboard",
        "train.log",
    ]
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["iteration"] == stopped and len(ckpt["rng"]) == 2  # every process's generators

    argv = resume_command(log)
    assert argv[:2] == ["torchrun", "--nproc_per_node=2"]
    assert argv[-2:] == [f"hydra.run.dir={run_dir}", "trainer.resume=true"]
    done = subprocess.run(
        [*torchrun, *argv[2:], f"trainer.max_iters={stopped + 2}"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        f"resumed from {run_dir / 'checkpoints' / 'last.pt'} at iteration {stopped}" in done.stderr
    )
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["iteration"] == stopped + 2
    assert [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()] == [run_dir]


def test_launch_command_repeats_the_launcher(monkeypatch):
    for key in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    args = ["dataset.builder.num_samples={train: 8}", "trainer.resume=true"]
    assert launch_command(args, script="scripts/train.py") == (
        "python scripts/train.py 'dataset.builder.num_samples={train: 8}' trainer.resume=true"
    )
    # An installed command is on PATH: it resumes by its name, not through some `python`.
    assert launch_command(["a=1"], script="/venv/bin/fcnseg-train") == "fcnseg-train a=1"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert launch_command(["a=1"], script="s.py") == "torchrun --nproc_per_node=4 s.py a=1"
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert launch_command(["a=1"], script="s.py").startswith(
        "torchrun --nnodes=4 --nproc_per_node=4 <"
    )


def test_a_script_outside_torchrun_with_world_size_set_is_told_how_to_launch(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(
        UserError, match="WORLD_SIZE=2 is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT"
    ):
        tiny_trainer(tmp_path)


def test_channels_last_trains_the_same_network(tmp_path):
    images, targets = global_batch()
    sgd = functools.partial(torch.optim.SGD, lr=LR)
    nchw = tiny_trainer(tmp_path / "nchw", backbone_options=PLAIN, optimizer=sgd)
    nhwc = tiny_trainer(
        tmp_path / "nhwc", backbone_options=PLAIN, optimizer=sgd, channels_last=True
    )
    convs = [p for p in nhwc.model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert nhwc.run_step(images[:2], targets[:2]) == pytest.approx(
        nchw.run_step(images[:2], targets[:2]), rel=1e-5
    )
    for p, q in zip(nchw.model.parameters(), nhwc.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6)


def _first_worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
    )  # fmt: skip
    torch.distributed.init_process_group("gloo")
    try:
        with local_main_first():
            done = Path(tmp) / "downloaded"
            # What rank 0 left on disk is there when rank 1 enters: one download per machine.
            (Path(tmp) / f"saw{rank}").write_text(str(done.exists()))
            if rank == 0:
                time.sleep(1.0)  # a slow download: rank 1 would enter meanwhile if not held
            done.touch()
    finally:
        cleanup()


def test_the_machines_first_process_downloads_before_the_others(tmp_path):
    torch.multiprocessing.start_processes(
        _first_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    assert (tmp_path / "saw0").read_text() == "False"
    assert (tmp_path / "saw1").read_text() == "True"


def test_an_installed_command_reports_errors_under_its_own_name(monkeypatch, capsys):
    for argv0, program in (("/venv/bin/fcnseg-train", "fcnseg-train"), ("scripts/x.py", "x.py")):
        monkeypatch.setattr(sys, "argv", [argv0])
        with pytest.raises(SystemExit) as exit_, user_errors("x.py"):
            raise UserError("dataset.root=/nowhere is missing")
        assert exit_.value.code == 2
        assert capsys.readouterr().err == f"{program}: error: dataset.root=/nowhere is missing\n"
