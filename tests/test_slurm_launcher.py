"""``hydra/launcher=slurm``: each run of a multirun as a SLURM job whose tasks are the training
processes; ``hydra/launcher=submitit_local`` runs the same path on this machine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import CONFIGS, SCRIPTS
from hydra import compose, initialize_config_dir
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf
from test_preemption import ENV

from fcnseg.utils.checkpoint import load_checkpoint
from fcnseg.utils.distributed import export_scheduler_env

TORCHRUN_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
)  # fmt: skip


def sbatch_script(tmp_path, monkeypatch, *overrides: str) -> str:
    """The batch script that ``hydra/launcher=slurm`` with ``overrides`` submits."""
    submitit = pytest.importorskip("submitit")
    # submitit writes SLURM jobs only where SLURM's srun is on the PATH; this one never runs.
    srun = tmp_path / "bin" / "srun"
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}{os.pathsep}{os.environ['PATH']}")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}", *overrides],
            return_hydra_config=True,
        )
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    del params["_target_"]
    # As hydra_submitit_launcher's SlurmLauncher.launch hands them to submitit.
    executor = submitit.AutoExecutor(
        folder=params.pop("submitit_folder"), cluster="slurm",
        slurm_max_num_timeout=params.pop("max_num_timeout"),
    )  # fmt: skip
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("COMMAND", "uid")


def test_a_slurm_job_has_one_task_per_gpu_a_time_limit_and_requeues(tmp_path, monkeypatch):
    script = sbatch_script(
        tmp_path, monkeypatch, "hydra.launcher.partition=gpu", "hydra.launcher.nodes=2",
        "hydra.launcher.gpus_per_node=4", "hydra.launcher.timeout_min=600",
    )  # fmt: skip
    for line in [
        "#SBATCH --partition=gpu",
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",  # one training process per GPU
        "#SBATCH --time=600",
        "#SBATCH --signal=USR2@120",  # submitit requeues the job 2 minutes before its limit
        "#SBATCH --requeue",  # and SLURM a preempted one
    ]:
        assert line in script.splitlines(), f"{line} not in:\n{script}"
    assert "srun" in script and "COMMAND" in script


def scheduler(monkeypatch, **env: str) -> None:
    for key in (*TORCHRUN_VARS, "SUBMITIT_EXECUTOR"):
        # setenv first, so that monkeypatch restores the key's true state (absent, usually)
        # and not what export_scheduler_env wrote into os.environ in between.
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_slurm_tasks_are_described_as_torchrun_workers(monkeypatch):
    # Task 5 of 8 on 2 machines: the second task of the second machine.
    scheduler(
        monkeypatch, SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_NTASKS="8",
        SLURM_JOB_NUM_NODES="2", SLURM_NODEID="1", SLURM_PROCID="5", SLURM_LOCALID="1",
        SLURM_JOB_NODELIST="gpu[07-08]",
    )  # fmt: skip
    assert export_scheduler_env()
    got = {key: os.environ[key] for key in TORCHRUN_VARS}
    port = int(got.pop("MASTER_PORT"))
    assert got == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "MASTER_ADDR": "gpu07",  # rank 0's machine
    }
    assert 20000 <= port < 60000
    # Every task of the job, and the job requeued (same id), meets at the same port.
    scheduler(
        monkeypatch, SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_NTASKS="8",
        SLURM_JOB_NUM_NODES="2", SLURM_NODEID="0", SLURM_PROCID="0", SLURM_LOCALID="0",
        SLURM_JOB_NODELIST="gpu[07-08]",
    )  # fmt: skip
    assert export_scheduler_env() and int(os.environ["MASTER_PORT"]) == port


def test_torchrun_and_single_task_jobs_are_left_alone(monkeypatch):
    scheduler(monkeypatch, SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="1", SLURM_NTASKS="1",
              SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0", SLURM_PROCID="0", SLURM_LOCALID="0",
              SLURM_JOB_NODELIST="gpu01")  # fmt: skip
    assert not export_scheduler_env() and "RANK" not in os.environ
    scheduler(monkeypatch, SUBMITIT_EXECUTOR="slurm", SLURM_NTASKS="8", RANK="3")
    assert not export_scheduler_env() and os.environ["RANK"] == "3"
    scheduler(monkeypatch)
    assert not export_scheduler_env()


@pytest.mark.slow
def test_a_multirun_through_submitit_runs_its_job_as_a_group_of_tasks(tmp_path):
    pytest.importorskip("submitit")
    sweep = tmp_path / "sweep"
    done = subprocess.run(
        [
            sys.executable, str(SCRIPTS / "train.py"), "-m", "hydra/launcher=submitit_local",
            "hydra.launcher.tasks_per_node=2", f"hydra.sweep.dir={sweep}",
            "trainer.max_iters=2", "trainer.eval_interval=2", "trainer.log_interval=1",
            "trainer.batch_size=2", "trainer.num_workers=0", "trainer.device=cpu",
            "trainer.resume=auto", "+backbone.fc_channels=32", "dataset.crop_size=32",
            "dataset.builder.min_size=32", "dataset.builder.max_size=40",
            "dataset.builder.num_samples={train: 8, val: 2, test: 2}", "trainer.seed=3",
        ],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    jobs = sorted(sweep.glob(".submitit/*/*_log.err"))
    assert done.returncode == 0, done.stderr[-3000:] + "".join(p.read_text()[-2000:] for p in jobs)
    run_dir = sweep / "0"  # hydra.sweep.dir/hydra.sweep.subdir, fixed at submission
    log = (run_dir / "train.log").read_text()
    # Both tasks of the job trained one run, as one process group.
    assert "runtime: cpu x 2 process(es)" in log, log
    assert "2 images per process x 2 process(es)" in log
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["iteration"] == 2 and len(ckpt["rng"]) == 2  # each task's generators
    assert ckpt["config"]["trainer"]["seed"] == 3  # the sweep's override reached the job
    assert (run_dir / "metrics.json").is_file() and not (run_dir / ".lock").exists()
