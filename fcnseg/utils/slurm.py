"""Training processes that a job scheduler starts as its own tasks: SLURM's, through submitit
(``hydra/launcher=slurm``), or submitit's local executor (``submitit_local``).

Such a task learns its place in the job from the scheduler's variables, not torchrun's, and is
given CPUs of its own; ``export_scheduler_env`` describes it in torchrun's variables, so that
``fcnseg.utils.distributed`` joins the group as under torchrun, and ``task_threads`` sizes its
threads to its CPUs.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping


def export_scheduler_env() -> bool:
    """Describes a job scheduler's tasks in torchrun's variables; returns whether it did.

    ``hydra/launcher=slurm`` (and ``submitit_local``) runs each training process as one task of
    a job, through submitit: SLURM (or submitit's local executor) tells each task its rank, its
    rank on its machine and the job's machines, torchrun's variables are not set. This sets
    ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` from them, ``MASTER_ADDR`` to
    the job's first machine (rank 0's, in SLURM's block distribution) and ``MASTER_PORT`` to a
    port drawn from the job id (20000-59999, as submitit's own helper does; the same after a
    requeue, which keeps the job id), unless they are set already. Nothing happens under
    torchrun or outside a job of several tasks. ``CUDA_VISIBLE_DEVICES`` is left alone:
    ``fcnseg.utils.distributed.resolve_device`` finds each task's GPU either way.
    """
    if "SUBMITIT_EXECUTOR" not in os.environ or "RANK" in os.environ:
        return False
    import submitit  # installed wherever submitit runs a job (fcnseg[slurm])

    job = submitit.JobEnvironment()
    if job.num_tasks <= 1:
        return False
    os.environ.update(
        RANK=str(job.global_rank),
        WORLD_SIZE=str(job.num_tasks),
        LOCAL_RANK=str(job.local_rank),
        LOCAL_WORLD_SIZE=str(job.num_tasks // job.num_nodes),
    )
    os.environ.setdefault("MASTER_ADDR", job.hostnames[0])
    os.environ.setdefault("MASTER_PORT", str(random.Random(job.job_id).randint(20000, 59999)))
    return True


def task_threads(
    *, num_workers: int = 0, env: Mapping[str, str] | None = None, cores: int | None = None
) -> tuple[int | None, str]:
    """The intra-op threads that fit this process's share of the CPUs, and where that comes from.

    A job scheduler's task is given CPUs of its own (``--cpus-per-task``: ``SLURM_CPUS_PER_TASK``)
    but torch starts as many threads as the machine has cores, so the tasks of one machine
    oversubscribe it. Under SLURM or submitit (``hydra/launcher=slurm``, ``submitit_local``, the
    ``srun`` form) this is the task's CPUs, or without ``SLURM_CPUS_PER_TASK`` the cores this
    process may run on shared by the machine's tasks, less one per loader worker (each loads with
    one thread), at least 1: torchrun's reason for ``OMP_NUM_THREADS=1``, without wasting the CPUs
    a task was given. ``None`` leaves torch's count: ``OMP_NUM_THREADS`` set (the user's choice,
    or torchrun's for several workers), or no scheduler.

    Args:
        num_workers: the process's loader workers (``trainer.num_workers``).
        env: the environment (default ``os.environ``).
        cores: the cores this process may run on (default: its CPU affinity).

    Returns:
        (threads or ``None``, the reason for the start-up block, e.g. ``SLURM_CPUS_PER_TASK=8
        less 4 loader worker(s)``).
    """
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS"):
        return None, f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"
    if env.get("SLURM_CPUS_PER_TASK"):
        cpus = int(env["SLURM_CPUS_PER_TASK"])
        reason = f"SLURM_CPUS_PER_TASK={cpus}"
    elif "SUBMITIT_EXECUTOR" in env or "SLURM_PROCID" in env:
        cores = cores or _affinity()
        tasks = int(env.get("LOCAL_WORLD_SIZE") or env.get("SLURM_NTASKS_PER_NODE") or 1)
        cpus = max(1, cores // tasks)
        reason = f"{cores} cores shared by {tasks} task(s) on this machine"
    else:
        return None, "torch's default"
    if num_workers:
        reason += f" less {num_workers} loader worker(s)"
    return max(1, cpus - num_workers), reason


def _affinity() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
