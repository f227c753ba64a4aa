"""torch.distributed as launched by torchrun: one process per device, env:// rendezvous.

torchrun (``python -m torch.distributed.run``) starts the processes and describes the group in
the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ...); this module
joins that group (NCCL on GPUs, gloo on CPU) and offers the few collectives the engine needs.
Everything is a no-op in a single process, so the same code runs with and without a launcher.

A group that torchrun restarts (``--max-restarts``) forms again in keys of its own: see
``attempt_store``. Processes that a job scheduler starts as its own tasks (``hydra/launcher=slurm``,
through submitit) describe themselves in torchrun's variables first: see ``fcnseg.utils.slurm``.

Run as a program, ``python -m fcnseg.utils.distributed`` is torchrun that ends quietly on a stop
signal (``torchrun``).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fcnseg.errors import UserError
from fcnseg.utils.cli import is_installed_command

# What torchrun sets for every worker; a process started by hand without them is alone.
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Where in the launcher's store the processes agree on their attempt (attempt_store).
_ATTEMPT_KEYS = "fcnseg/attempt"


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks this process's GPU when there is one, else the CPU.

    Under torchrun, process ``local_rank`` of a machine takes GPU ``local_rank`` of those it
    sees. A launcher that gives each process a single GPU of its own (``srun
    --gpus-per-task=1``, a per-process ``CUDA_VISIBLE_DEVICES``, Kubernetes device plugins) shows
    every process one device: each takes that one. ``cuda:N`` names a GPU explicitly. Two
    processes on one GPU are refused (NCCL cannot put two ranks on one device).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(
                f"trainer.device={device} but no CUDA device is visible; use trainer.device=cpu"
            )
        count = torch.cuda.device_count()
        if device != "cuda":
            index = device.partition(":")[2]
            if not index.isdigit() or int(index) >= count:
                raise UserError(
                    f"trainer.device={device} names no GPU of this machine's {count} "
                    f"(cuda:0 to cuda:{count - 1})"
                )
            return torch.device("cuda", int(index))
        if count == 1:  # the launcher gave this process its own GPU
            return torch.device("cuda", 0)
        if local_rank >= count:
            raise UserError(
                f"process LOCAL_RANK={local_rank} has no GPU of its own: this machine shows "
                f"{count}; launch at most --nproc_per_node={count}"
            )
        return torch.device("cuda", local_rank)
    if device != "cpu":
        raise UserError(f"trainer.device={device!r} is not one of auto, cpu, cuda, cuda:N")
    return torch.device("cpu")


def init_distributed(device: torch.device) -> DistInfo:
    """Joins the process group torchrun describes in the environment (no-op when alone).

    The backend is NCCL for CUDA devices and gloo otherwise. The group's keys live in a part of
    the launcher's store that no earlier attempt of the job used (``attempt_store``), so a group
    that torchrun restarts after a failure forms like the first one. A group that the caller
    already initialised is reused as it is.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not _active():
        return DistInfo()
    if not dist.is_initialized():
        missing = [key for key in _TORCHRUN_ENV if key not in os.environ]
        if missing:
            raise UserError(
                f"WORLD_SIZE={world} is set but {', '.join(missing)} is not: launch the "
                f"processes with torchrun (python -m torch.distributed.run)"
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL and the CUDA generator follow it
        store, rank, world = next(dist.rendezvous("env://", timeout=dist.default_pg_timeout))
        store = attempt_store(store, rank=rank, world_size=world)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
    return get_info()


def attempt_store(
    store: dist.Store,
    *,
    rank: int,
    world_size: int,
    timeout: timedelta = dist.default_pg_timeout,
    poll: float = 0.02,
) -> dist.Store:
    """``store`` narrowed to keys that no earlier attempt of this job wrote, on every process.

    torchrun serves one store for the whole job, at the same ``MASTER_ADDR:MASTER_PORT``, and
    when it restarts the workers (``--max-restarts``) the keys of the group that died are still
    there: each process's gloo address, NCCL's unique id. A restarted process that reads its
    peer's old address before the peer has replaced it connects to a dead process's port, and
    the group fails to form (gloo: ``connectFullMesh ... Connection refused``, or a wait until
    the group's timeout); it happens or not by the order in which the processes start.
    ``TORCHELASTIC_RESTART_COUNT`` cannot name the attempt: each machine's agent counts only the
    failures it saw.

    So rank 0 draws a new token and publishes it; every other process answers with the token it
    read and a random nonce of its own, and takes the token once rank 0 acknowledges that nonce.
    A stale token (an earlier attempt's, read before rank 0 replaced it) is never acknowledged,
    and the process reads the token again. Every process then returns the store under the same
    new prefix.

    Args:
        store: the job's store (``torch.distributed.rendezvous("env://")``).
        rank, world_size: this process's place in the group.
        timeout: how long to wait for the other processes.
        poll: seconds between a waiting process's looks at the store.

    Raises:
        TimeoutError: a process did not answer within ``timeout``.
    """
    token_key = f"{_ATTEMPT_KEYS}/token"
    if rank == 0:
        token = uuid.uuid4().hex
        store.set(token_key, token)
        hellos = [f"{_ATTEMPT_KEYS}/{token}/hello/{r}" for r in range(1, world_size)]
        if hellos:
            try:
                store.wait(hellos, timeout)
            except dist.DistStoreError as err:
                raise TimeoutError(
                    f"rank 0 waited {timeout} for the other {world_size - 1} process(es) to "
                    f"join the group: {err}"
                ) from err
            nonces = store.multi_get(hellos)
            store.multi_set([f"{_ATTEMPT_KEYS}/ack/{r}" for r in range(1, world_size)], nonces)
    else:
        nonce, sent, ack = uuid.uuid4().hex, None, f"{_ATTEMPT_KEYS}/ack/{rank}"
        deadline = time.monotonic() + timeout.total_seconds()
        while True:
            token = store.get(token_key).decode()  # waits for the first attempt's rank 0
            if token != sent:  # a new token, or the first: answer it
                store.set(f"{_ATTEMPT_KEYS}/{token}/hello/{rank}", nonce)
                sent = token
            if store.check([ack]) and store.get(ack).decode() == nonce:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"process {rank} waited {timeout} for rank 0 to admit it to the group"
                )
            time.sleep(poll)
    return dist.PrefixStore(f"{_ATTEMPT_KEYS}/{token}/group/", store)


def restart_count() -> int:
    """How many times torchrun has restarted this machine's workers (0: their first start)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def max_restarts() -> int:
    """torchrun's ``--max-restarts`` (0 without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))


def get_info() -> DistInfo:
    """The current group's rank and size (rank 0 of 1 when there is none)."""
    if _active():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)
    return DistInfo()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place; identity when not distributed."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process."""
    if not _active():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copies rank ``src``'s buffers (BatchNorm running statistics) to every process.

    Without SyncBatchNorm each process updates the statistics with its own batches; DDP
    re-broadcasts them only at the next training forward, so an evaluation in between would see
    slightly different statistics on each process, and not those of the checkpoint.
    """
    if _active():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=src)


def on_main(work: Callable[[], Any]) -> Any:
    """Runs ``work`` on rank 0 only; a ``UserError`` it raises is raised on every process.

    For checks and writes that one process makes for all: the others would otherwise wait for
    rank 0 in the next collective while it fails alone. Returns rank 0's result (``None``
    elsewhere).
    """
    result, message = None, None
    if get_info().is_main:
        try:
            result = work()
        except UserError as err:
            message = str(err)
    message = broadcast_object(message)
    if message is not None:
        raise UserError(message)
    return result


@contextlib.contextmanager
def local_main_first() -> Iterator[None]:
    """Each machine's first process runs the block before its other processes do.

    For work whose result lands on the machine's disk (a download of pretrained weights, a
    cache of class frequencies): one process per machine does it, the others then find it
    done instead of all doing it at once. A no-op without a process group.
    """
    info = get_info()
    first = info.local_rank == 0
    if info.enabled and not first:
        dist.barrier()
    try:
        yield
    finally:
        if info.enabled and first:
            dist.barrier()


def cleanup() -> None:
    """Leaves the process group (PyTorch warns at exit when a group is left open)."""
    if _active():
        dist.destroy_process_group()


def shared_run_dir(path: str | Path) -> Path:
    """Rank 0's run directory, on every process.

    Each process started by torchrun composes its own configuration, and a run directory named
    after the launch time can differ by a second between processes. Rank 0's wins; this process's
    own folder, when different and still empty, was made for nothing and is removed (with its
    parent, a date folder, when that is left empty too).
    """
    own = Path(path).absolute()
    shared = Path(broadcast_object(str(own)))
    if shared != own:
        for folder in (own, own.parent):
            with contextlib.suppress(OSError):  # not empty, or already gone: leave it
                folder.rmdir()
    return shared


def launch_command(
    args: Sequence[str], *, script: str | None = None, program: str | None = None
) -> str:
    """The command that starts ``script`` with ``args`` the way this process was started.

    ``python SCRIPT ...`` for a single process, ``torchrun --nproc_per_node=N SCRIPT ...`` under
    torchrun on one machine; across machines the rendezvous options cannot be recovered from a
    worker and are left for the user to repeat.

    Args:
        args: the program's arguments.
        script: the program; by default ``sys.argv[0]``, as the user typed it.
        program: the program where submitit started this process (``hydra/launcher=slurm``,
            ``submitit_local``: ``SUBMITIT_EXECUTOR`` is set), whose ``sys.argv[0]`` is then
            submitit's own script: the caller's ``__file__``, or its installed command.
    """
    if script is None:
        script = program if program and "SUBMITIT_EXECUTOR" in os.environ else sys.argv[0]
    tail = shlex.join([script, *args])
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        if is_installed_command(script):  # on PATH: run by its name, whichever Python it uses
            return shlex.join([Path(script).name, *args])
        return f"python {tail}"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if world == local:
        return f"torchrun --nproc_per_node={local} {tail}"
    return (
        f"torchrun --nnodes={world // local} --nproc_per_node={local} "
        f"<the same rendezvous options on every machine> {tail}"
    )


def torchrun(argv: Sequence[str] | None = None) -> int:
    """torchrun (same options), ending with status 128 + signal, without a traceback, when a stop
    signal ends it; returns the exit status.

    torchrun passes SIGTERM (and SIGINT, SIGHUP, SIGQUIT) on to its workers and waits for them
    (``--shutdown-timeout``, 30 s by default): each finishes its step, writes ``last.pt`` and
    prints how to resume. Then torchrun raises ``SignalException``, whose traceback ends the
    job's log and whose status 1 reads as a failure (sacct: ``FAILED 1:0``). Here the stop ends
    as the workers do, with 143 for SIGTERM. SIGUSR2, SLURM's usual warning before a time limit,
    has no handler in torchrun and kills it at once: send SIGTERM (``#SBATCH --signal=TERM@120``).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main

    try:
        main(list(sys.argv[1:] if argv is None else argv))
    except SignalException as stop:  # the workers were sent the signal and waited for
        return 128 + int(stop.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(torchrun())
