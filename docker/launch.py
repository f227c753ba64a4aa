#!/usr/bin/env python3
"""One entry point for training, evaluation, prediction and TensorBoard, in Docker or not.

    python docker/launch.py [--dry-run] COMMAND [OVERRIDES...]

Commands:
  train        torchrun scripts/train.py, one process per visible GPU (CPU + gloo without one)
  evaluate     torchrun scripts/evaluate.py, same process layout as train
  predict      python scripts/predict.py (one process)
  tensorboard  tensorboard over the runs folder

OVERRIDES are Hydra overrides (``dataset=voc trainer.max_iters=1000``) or, for tensorboard, its
own flags; they are passed through unchanged.

Environment:
  NPROC              processes per node (default: the visible GPUs, or 1 without a GPU)
  NNODES             machines in the job (default 1)
  NODE_RANK          this machine's index, 0 .. NNODES-1 (required when NNODES > 1)
  MASTER_ADDR        address of node 0 (required when NNODES > 1)
  MASTER_PORT        node 0's rendezvous port (default 29500)
  FCNSEG_OUTPUT_DIR  where training runs go (default outputs; /outputs in the image)
  RUN_NAME           the run's folder under it (default: the start time, YYYY-MM-DD/HH-MM-SS);
                     the same RUN_NAME again continues that run from its last.pt
  MAX_RESTARTS       train: times torchrun restarts the workers after one fails (default 3);
                     each restart resumes from last.pt (trainer.resume=auto)
  TENSORBOARD_HOST   address TensorBoard listens on (default localhost; 0.0.0.0 in the image)
  TENSORBOARD_PORT   its port (default 6006)
  DRY_RUN=1          print the command instead of running it (same as --dry-run)

A single node uses torchrun's standalone rendezvous, on a free port, so that several jobs on
one machine never collide; several nodes use the static MASTER_ADDR:MASTER_PORT rendezvous.
"""

from __future__ import annotations

import datetime
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fcnseg.errors import UserError
from fcnseg.utils.cli import user_errors

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
COMMANDS = ("train", "evaluate", "predict", "tensorboard")
DISTRIBUTED = ("train", "evaluate")
DEFAULT_MASTER_PORT = 29500
DEFAULT_MAX_RESTARTS = 3
DEFAULT_TENSORBOARD_PORT = 6006


@dataclass(frozen=True)
class Launch:
    """What to run: the argument vector and the variables added to the environment."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def shell(self) -> str:
        """The command as one line a POSIX shell runs unchanged (variables first)."""
        assignments = [f"{key}={shlex.quote(value)}" for key, value in self.env.items()]
        return " ".join([*assignments, shlex.join(self.argv)])


def visible_gpus() -> int:
    """CUDA devices this process may use (honours CUDA_VISIBLE_DEVICES); 0 without a driver."""
    import torch

    return torch.cuda.device_count()


def usable_cpus() -> int:
    """CPU cores this process may run on (a container's cpuset, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def tool(name: str, module: str) -> list[str]:
    """The console script ``name`` installed beside this interpreter, else ``python -m module``.

    Looking beside ``sys.executable`` first keeps a virtualenv's torchrun from being shadowed by
    another one on PATH; ``python -m`` is the same program when no console script is found.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    on_path = shutil.which(name)
    if on_path:
        return [on_path]
    return [sys.executable, "-m", module]


def _env_int(env: Mapping[str, str], name: str, default: int | None, *, minimum: int) -> int | None:
    """Reads an integer variable; empty counts as unset (compose passes unset variables as '')."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise UserError(f"{name}={raw!r} is not an integer >= {minimum}")
    return value


def _override(overrides: Sequence[str], key: str) -> str | None:
    """The value the Hydra overrides give ``key`` (``key=v``, ``+key=v`` or ``++key=v``), if any."""
    found = None
    for item in overrides:
        name, sep, value = item.partition("=")
        if sep and name.lstrip("+") == key:
            found = value
    return found


def plan(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    gpus: Callable[[], int] = visible_gpus,
    cpus: Callable[[], int] = usable_cpus,
    now: Callable[[], datetime.datetime] = datetime.datetime.now,
) -> Launch:
    """Turns a launcher command line and environment into the command to execute.

    Args:
        argv: ``COMMAND [OVERRIDES...]`` (without ``--dry-run``).
        env: the environment the launcher runs in.
        gpus: counts the visible GPUs; only called when the command needs to know.
        cpus: counts the usable CPU cores (threads per process on CPU).
        now: the clock that names a new run directory.

    Raises:
        UserError: an unknown command or an environment variable out of range.
    """
    if not argv:
        raise UserError(f"no command given; expected one of {', '.join(COMMANDS)}")
    command, overrides = argv[0], list(argv[1:])
    if command not in COMMANDS:
        raise UserError(f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}")
    script = str(SCRIPTS / f"{command}.py")

    if command == "tensorboard":
        logdir = env.get("FCNSEG_OUTPUT_DIR") or "outputs"
        host = env.get("TENSORBOARD_HOST") or "localhost"
        port = _env_int(env, "TENSORBOARD_PORT", DEFAULT_TENSORBOARD_PORT, minimum=1)
        # The user's flags come last so that, argparse-style, they win over these defaults.
        args = [f"--logdir={logdir}", f"--host={host}", f"--port={port}", *overrides]
        return Launch(tool("tensorboard", "tensorboard.main") + args)
    if command == "predict":
        return Launch([sys.executable, script, *overrides])

    # train / evaluate: one torchrun worker per device.
    nnodes = _env_int(env, "NNODES", 1, minimum=1)
    nproc = _env_int(env, "NPROC", None, minimum=1)
    device = _override(overrides, "trainer.device") or "auto"
    notes: list[str] = []
    if device == "cpu":
        on_gpu = False
    else:
        count = gpus()
        if device == "cuda" and count == 0:
            raise UserError("trainer.device=cuda but no GPU is visible (docker run --gpus all?)")
        on_gpu = count > 0
        if on_gpu and nproc is not None and nproc > count:
            raise UserError(
                f"NPROC={nproc} but only {count} GPU(s) are visible; lower NPROC or expose more "
                "GPUs (CUDA_VISIBLE_DEVICES, docker run --gpus)"
            )
        if on_gpu and nproc is None:
            nproc = count
    if nproc is None:
        nproc = 1

    extra: list[str] = []
    launch_env: dict[str, str] = {}
    if not on_gpu:
        if device != "cpu":  # both scripts read trainer.device; say it rather than rely on auto
            extra.append("trainer.device=cpu")
        notes.append(f"no GPU in use: {nproc} process(es) per node on the CPU, gloo backend")
        # torchrun would pin every worker to one thread; share the cores out instead.
        if "OMP_NUM_THREADS" not in env:
            launch_env["OMP_NUM_THREADS"] = str(max(1, cpus() // nproc))

    torchrun = tool("torchrun", "torch.distributed.run")
    if nnodes == 1:
        rendezvous = ["--standalone"]
    else:
        node_rank = _env_int(env, "NODE_RANK", None, minimum=0)
        master_addr = env.get("MASTER_ADDR", "").strip()
        master_port = _env_int(env, "MASTER_PORT", DEFAULT_MASTER_PORT, minimum=1)
        if node_rank is None:
            raise UserError(
                f"NNODES={nnodes} needs NODE_RANK, this node's index: 0 on the MASTER_ADDR "
                f"node, 1 to {nnodes - 1} on the others"
            )
        if node_rank >= nnodes:
            raise UserError(f"NODE_RANK={node_rank} must be below NNODES={nnodes}")
        if not master_addr:
            raise UserError(f"NNODES={nnodes} needs MASTER_ADDR, the address of node 0")
        if master_port > 65535:
            raise UserError(f"MASTER_PORT={master_port} is not a TCP port (1-65535)")
        rendezvous = [
            f"--nnodes={nnodes}",
            f"--node_rank={node_rank}",
            f"--master_addr={master_addr}",
            f"--master_port={master_port}",
        ]

    # A preset names its own run directory under paths.outputs (FCNSEG_OUTPUT_DIR), where the
    # next stage of a staged recipe finds it; RUN_NAME still wins.
    preset = _override(overrides, "experiment") is not None and not env.get("RUN_NAME", "").strip()
    if command == "train" and _override(overrides, "hydra.run.dir") is None and not preset:
        run_name = env.get("RUN_NAME", "").strip()
        if nnodes > 1 and not run_name:
            raise UserError(
                f"NNODES={nnodes}: set RUN_NAME (the same on every node) or hydra.run.dir, "
                "so that all nodes share one run directory"
            )
        # Named here, once, rather than by each worker's own clock: every rank gets this path.
        run_name = run_name or now().strftime("%Y-%m-%d/%H-%M-%S")
        output_dir = env.get("FCNSEG_OUTPUT_DIR") or "outputs"
        extra.append(f"hydra.run.dir={output_dir}/{run_name}")

    restarts: list[str] = []
    if command == "train":
        # A long job heals itself: when a worker dies, torchrun starts the workers again and
        # they continue from last.pt (auto: a first start, with no last.pt, starts afresh).
        # The user's own trainer.resume wins.
        max_restarts = _env_int(env, "MAX_RESTARTS", DEFAULT_MAX_RESTARTS, minimum=0)
        restarts = [f"--max-restarts={max_restarts}"]
        if _override(overrides, "trainer.resume") is None:
            extra.append("trainer.resume=auto")

    argv_out = [
        *torchrun,
        *rendezvous,
        f"--nproc_per_node={nproc}",
        *restarts,
        script,
        *overrides,
        *extra,
    ]
    return Launch(argv_out, launch_env, notes)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Parses the launcher's own flags, then prints (dry run) or executes the planned command."""
    args = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ if env is None else env)
    if not args or args[0] in ("-h", "--help", "help"):
        print(__doc__.strip(), file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    dry_run = "--dry-run" in args or env.get("DRY_RUN", "").strip().lower() in ("1", "true", "yes")
    args = [a for a in args if a != "--dry-run"]
    with user_errors("launch.py"):
        launch = plan(args, env)
    for note in launch.notes:
        print(f"launch.py: {note}", file=sys.stderr, flush=True)
    if dry_run:
        print(launch.shell(), flush=True)
        return 0
    print(f"launch.py: {launch.shell()}", file=sys.stderr, flush=True)
    # exec, not a child process: torchrun then receives the container's SIGTERM directly.
    os.execve(launch.argv[0], launch.argv, {**env, **launch.env})


if __name__ == "__main__":
    sys.exit(main())
