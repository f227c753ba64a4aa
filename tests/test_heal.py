"""A job that heals: when a worker dies, ``torchrun --max-restarts`` restarts the group and the
run continues from ``last.pt`` to the weights it would have had without the failure.

Run as a script (the entry point that torchrun starts in these tests), this file is
``scripts/train.py`` with faults: the workers that ``HEAL_FAULTS`` names SIGKILL themselves at
the iteration and in the start of the group it says. The library has no test-only path: a fault
wraps one of the trainer's methods, in the one process that dies.
"""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import SCRIPTS
from test_distributed import free_port
from test_preemption import ENV

from fcnseg.utils.checkpoint import load_checkpoint
from fcnseg.utils.distributed import attempt_store

FAULTS = "HEAL_FAULTS"  # START:RANK:ITERATION:WHEN,... (see inject_faults)
MAX_ITERS = 6
RUN = [
    f"trainer.max_iters={MAX_ITERS}",
    "trainer.checkpoint_interval=2",  # last.pt at 2 and 4; at 6 around the final evaluation
    "trainer.eval_interval=1000",
    "trainer.log_interval=1",
    "trainer.batch_size=2",
    "trainer.num_workers=2",  # the real worker count: the dying process's workers die too
    "trainer.device=cpu",
    "trainer.resume=auto",
    "+backbone.fc_channels=32",
    "dataset.crop_size=32",
    "dataset.builder.min_size=32",
    "dataset.builder.max_size=40",
    "dataset.builder.num_samples={train: 8, val: 2, test: 2}",
]


def inject_faults(spec: str) -> None:
    """Makes this worker SIGKILL itself where ``spec`` says.

    ``spec`` is a comma-separated list of ``START:RANK:ITERATION:WHEN``: in the group's start
    number START (0 the first, then torchrun's restarts), process RANK dies right after writing
    ``last.pt`` of ITERATION (``WHEN=after_save``) or right after step ITERATION
    (``after_step``).
    """
    from fcnseg.engine.trainer import Trainer

    here = f"{os.environ['TORCHELASTIC_RESTART_COUNT']}:{os.environ['RANK']}:"
    mine = [fault[len(here) :] for fault in spec.split(",") if fault.startswith(here)]
    if not mine:
        return
    iteration, when = mine[0].split(":")
    at = int(iteration)
    save, run_step = Trainer.save, Trainer.run_step

    def save_then_die(self: Trainer, name: str) -> Path:
        path = save(self, name)
        if name == "last.pt" and self.iteration == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    def step_then_die(self: Trainer, images: torch.Tensor, targets: torch.Tensor) -> float:
        loss = run_step(self, images, targets)
        if self.iteration == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return loss

    if when == "after_save":
        Trainer.save = save_then_die
    else:
        Trainer.run_step = step_then_die


def torchrun(run_dir: Path, *, faults: str = "") -> subprocess.Popen:
    """Starts the documented long-job command with 2 processes in ``run_dir``.

    torchrun's own output goes to ``run_dir``.out (beside it), read back by ``train_log``.
    """
    script = str(SCRIPTS / "train.py") if not faults else __file__
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args += ["--max-restarts=2", script, *RUN, f"hydra.run.dir={run_dir}"]
    with open(run_dir.with_suffix(".out"), "w") as out:  # the child keeps its own copy
        return subprocess.Popen(
            args, cwd=run_dir.parent, env={**ENV, FAULTS: faults}, stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip


def train_log(job: subprocess.Popen, run_dir: Path) -> str:
    """``run_dir``'s log once ``job`` has succeeded."""
    job.wait(timeout=300)
    assert job.returncode == 0, run_dir.with_suffix(".out").read_text()[-5000:]
    return (run_dir / "train.log").read_text()


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["iteration"] == MAX_ITERS
    return ckpt["model"]


@pytest.mark.slow
def test_a_job_whose_workers_die_twice_heals_to_the_weights_of_an_uninterrupted_run(tmp_path):
    # The uninterrupted run alongside: it runs while the other waits for its dead workers.
    reference = torchrun(tmp_path / "uninterrupted")
    run_dir = tmp_path / "healed"
    last = run_dir / "checkpoints" / "last.pt"
    # Start 0: rank 0 dies after step 1, before the first checkpoint (its run-directory lock is
    # left behind, and the next start takes it over). Start 1: rank 1 dies right after last.pt
    # of iteration 4 is written. Start 2 finishes.
    healed = torchrun(run_dir, faults="0:0:1:after_step,1:1:4:after_save")
    try:
        assert "restarted" not in train_log(reference, tmp_path / "uninterrupted")
        log = train_log(healed, run_dir)
    finally:
        for job in (reference, healed):
            if job.poll() is None:  # a failed assertion: end torchrun and its workers
                job.terminate()
                job.wait(60)
    want = final_weights(tmp_path / "uninterrupted")
    events = [
        f"trainer.resume=auto: no {last} yet, starting a new run",
        "torchrun restarted the workers after a failure (restart 1 of at most 2 on this machine)",
        f"trainer.resume=auto: no {last} yet, starting a new run",  # from scratch again
        "torchrun restarted the workers after a failure (restart 2 of at most 2 on this machine)",
        f"resumed from {last} at iteration 4",
    ]
    position = 0
    for event in events:  # in this order
        found = log.find(event, position)
        assert found >= 0, f"{event!r} not logged after position {position}:\n{log}"
        position = found + len(event)
    assert "resumed from" not in log[: log.index(events[-1])]
    assert log.count("iteration 5/6") == 1  # step 5 never completed before the second failure

    got = final_weights(run_dir)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        diff = (got[name].double() - tensor.double()).abs().max().item()
        assert diff <= 1e-6, f"{name}: max abs difference {diff}"


def test_a_restarted_group_ignores_the_keys_of_the_group_that_died():
    # What torchrun's store holds after a failed start: the old token, an acknowledgement for
    # rank 1 and the old group's keys (gloo's addresses). The restarted rank 1 comes first and
    # reads the old token; it must wait for the new rank 0, and both must leave the old keys.
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    old = uuid.uuid4().hex
    server.set("fcnseg/attempt/token", old)
    server.set("fcnseg/attempt/ack/1", uuid.uuid4().hex)
    server.set(f"fcnseg/attempt/{old}/group/rank_1", "the dead process's address")

    stores: dict[int, dist.Store] = {}

    def join(rank: int) -> None:
        client = dist.TCPStore("127.0.0.1", port, is_master=False)
        stores[rank] = attempt_store(client, rank=rank, world_size=2, poll=0.01)

    late = threading.Thread(target=join, args=(1,))
    late.start()
    while not server.check([f"fcnseg/attempt/{old}/hello/1"]):  # rank 1 answered the old token
        assert late.is_alive(), "rank 1 left before rank 0 came"
        late.join(0.01)
    join(0)
    late.join(10)
    assert not late.is_alive() and sorted(stores) == [0, 1]
    stores[0].set("rank_0", "new")
    assert stores[1].get("rank_0") == b"new"  # one namespace for both
    assert not stores[1].check(["rank_1"])  # and the dead group's keys are not in it
    assert server.get("fcnseg/attempt/token").decode() != old


if __name__ == "__main__":
    inject_faults(os.environ.get(FAULTS, ""))
    runpy.run_path(str(SCRIPTS / "train.py"), run_name="__main__")
