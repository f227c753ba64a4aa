"""``hydra/launcher=slurm``'s launcher: hydra-submitit-launcher's, which says what it submitted.

Beside the plugin's ``SlurmLauncher``, ``SlurmLauncher`` here

- makes a CPU job of ``gpus_per_node=0``: no ``--gpus-per-node``, and ``tasks_per_node``
  processes per node, one unless said (sbatch refuses the ``--ntasks-per-node=0`` that one task
  per GPU would mean);
- prints the jobs it submitted: their ids, partition and resources, each run's folder and SLURM
  logs, and the ``squeue``/``sacct`` commands that follow them;
- turns sbatch's refusal into one sentence with sbatch's reason (exit status 2), and Ctrl-C while
  it waits into one line saying that the jobs go on;
- says once, not at every poll, that ``sacct`` does not answer (a cluster without job
  accounting), where submitit would warn three times a poll.

Hydra makes launchers only of classes in its plugin namespace (``hydra_plugins``), which it finds
by listing that package's folders, and an editable install of fcnseg has none there. So
``configs/hydra/launcher/slurm.yaml`` names the plugin's class and adds the callback
``SaysWhatItSubmits``, which puts the subclass in its place in Hydra's registry of plugins
before the multirun makes its launcher. This module lives beside the configs because it imports
Hydra, which the library (``fcnseg/``) never does.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shlex
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra.experimental.callback import Callback
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import DictConfig, OmegaConf, open_dict

from fcnseg.errors import UserError
from fcnseg.utils.cli import user_errors

#: the plugin's class, which hydra/launcher=slurm names.
PLUGIN = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
SACCT_WARNING = "Bypassing sacct error"


def slurm_parameters(params: Mapping[str, Any]) -> dict[str, Any]:
    """The launcher's parameters with a CPU job made valid: ``gpus_per_node`` 0 (or null)
    asks for no GPU and ``tasks_per_node`` processes per node (0 or null: one)."""
    params = dict(params)
    if not params.get("gpus_per_node"):
        params["gpus_per_node"] = None
        params["tasks_per_node"] = params.get("tasks_per_node") or 1
    return params


def make_executor(params: Mapping[str, Any]) -> Any:
    """The submitit executor for ``params``, as the plugin's ``SlurmLauncher.launch`` makes it."""
    import submitit

    params = slurm_parameters(params)
    executor = submitit.AutoExecutor(
        folder=params.pop("submitit_folder"), cluster="slurm",
        slurm_max_num_timeout=params.pop("max_num_timeout"),
    )  # fmt: skip
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor


class SaysWhatItSubmits(Callback):
    """``hydra.callbacks`` entry of ``hydra/launcher=slurm``: the multirun's launcher is
    ``SlurmLauncher`` below, not the plugin's own."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        Plugins.instance().class_name_to_class[PLUGIN] = SlurmLauncher


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    """Submits each run of a multirun as one SLURM job, says so, and waits for the jobs."""

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        jobs = self.submit(job_overrides, initial_job_idx)
        array = jobs[0].job_id.split("_")[0]
        try:
            with sacct_said_once(array):
                return [job.results()[0] for job in jobs]
        except KeyboardInterrupt:
            print(
                f"stopped waiting; the jobs go on (squeue -j {array}; scancel {array} cancels "
                "them)",
                file=sys.stderr, flush=True,
            )  # fmt: skip
            raise SystemExit(130) from None

    def submit(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list:
        """Submits one job per element of ``job_overrides`` (one job array) and prints them."""
        assert self.config is not None and self.hydra_context is not None
        params = slurm_parameters(self.params)
        executor = make_executor(self.params)
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        numbers = range(initial_job_idx, initial_job_idx + len(job_overrides))
        job_params = [
            (list(overrides), "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state())
            for num, overrides in zip(numbers, job_overrides)
        ]
        where = params.get("partition")
        with user_errors(Path(sys.argv[0]).name), sbatch_refusals(where):
            jobs = executor.map_array(self, *zip(*job_params))
        runs = [self._run_dir(overrides, num) for num, overrides in zip(numbers, job_overrides)]
        print(describe(jobs, runs, job_overrides, params), flush=True)
        return jobs

    def _run_dir(self, overrides: Sequence[str], num: int) -> Path:
        """Where job ``num`` will run: its config's ``hydra.sweep.dir/hydra.sweep.subdir``."""
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config.hydra.job):
            config.hydra.job.num = num
        return Path(str(config.hydra.sweep.dir)).absolute() / str(config.hydra.sweep.subdir)


def describe(
    jobs: Sequence[Any],
    runs: Sequence[Path],
    job_overrides: Sequence[Sequence[str]],
    params: Mapping[str, Any],
) -> str:
    """What was submitted: the job array, its resources, each job's run and logs, and how to
    follow them."""
    array = jobs[0].job_id.split("_")[0]
    partition = params.get("partition")
    gpus = params.get("gpus_per_node")
    lines = [
        f"submitted {len(jobs)} SLURM job(s) as job array {array} to "
        + (f"partition {partition}" if partition else "the cluster's default partition")
        + f": {params.get('nodes', 1)} node(s) x {params['tasks_per_node']} task(s) each, "
        + (f"{gpus} GPU(s) per node, " if gpus else "no GPU, ")
        + f"{params.get('cpus_per_task') or 'the default'} CPU(s) per task, time limit "
        f"{params.get('timeout_min')} min"
    ]
    for job, run, overrides in zip(jobs, runs, job_overrides):
        what = " ".join(filter_overrides(overrides))
        lines.append(f"  job {job.job_id}: runs in {run}, SLURM logs in {job.paths.folder}")
        if what:
            lines.append(f"    {what}")
    lines += [
        f"follow them: squeue -j {array} -o '%.16i %.9T %.10M %R' (a pending job's last column "
        f"says why it waits); sacct -j {array} (needs the cluster's job accounting)",
        f"waiting for them to end; Ctrl-C stops waiting, not the jobs (scancel {array} cancels "
        "them)",
    ]
    return "\n".join(lines)


@contextlib.contextmanager
def sbatch_refusals(partition: str | None) -> Iterator[None]:
    """sbatch's refusal as one ``UserError`` with its reason; submitit's own print of it is
    kept back (anything else it prints is passed on)."""
    from submitit.core.utils import FailedJobError

    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            yield
        sys.stderr.write(printed.getvalue())
    except FailedJobError as err:
        reason = "; ".join(
            line.strip().removeprefix("sbatch: error: ")
            for line in str(err).splitlines()
            if line.strip()
        )
        asked = f"partition {partition}" if partition else "the default partition"
        raise UserError(
            f"sbatch refused the job ({asked}): {reason or 'no reason given'}"
        ) from None
    except FileNotFoundError as err:
        if Path(str(err.filename or "")).name != "sbatch":
            raise
        raise UserError(
            "sbatch is not on PATH: hydra/launcher=slurm submits from a machine of a SLURM "
            "cluster (hydra/launcher=submitit_local runs the same jobs on this one)"
        ) from None


@contextlib.contextmanager
def sacct_said_once(array: str) -> Iterator[None]:
    """submitit's "Bypassing sacct error" once, with what it means, instead of at every poll."""
    logger = logging.getLogger("submitit")
    said = False

    def once(record: logging.LogRecord) -> bool:
        nonlocal said
        if SACCT_WARNING not in record.getMessage():
            return True
        if not said:
            said = True
            print(
                "sacct does not answer (a cluster without job accounting?): submitit cannot "
                "read the jobs' states and waits for their results; squeue -j "
                f"{shlex.quote(array)} shows them. submitit's warning, said once: "
                f"{record.getMessage()}",
                file=sys.stderr, flush=True,
            )  # fmt: skip
        return False

    logger.addFilter(once)
    try:
        yield
    finally:
        logger.removeFilter(once)
