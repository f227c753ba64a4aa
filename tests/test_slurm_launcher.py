"""``hydra/launcher=slurm``: each run of a multirun as a SLURM job whose tasks are the training
processes; ``hydra/launcher=submitit_local`` runs the same path on this machine. No SLURM cluster
here: the batch script is read as submitit writes it, and sbatch, srun and sacct are stand-ins."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import CONFIGS, SCRIPTS
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_preemption import ENV, SCRIPT_RUN

from fcnseg.engine.runtime import Runtime
from fcnseg.utils.checkpoint import load_checkpoint
from fcnseg.utils.distributed import launch_command
from fcnseg.utils.slurm import export_scheduler_env, task_threads

TORCHRUN_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
)  # fmt: skip


def fake_command(folder, name: str, script: str) -> None:
    """An executable ``folder/name`` that runs the shell ``script``: SLURM's commands, here."""
    path = folder / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(0o755)


def sbatch_script(tmp_path, monkeypatch, *overrides: str, launcher: str = "slurm") -> str:
    """The batch script that ``hydra/launcher=LAUNCHER`` with ``overrides`` submits."""
    pytest.importorskip("submitit")
    from fcnseg_cli.configs.slurm_launcher import make_executor

    # submitit writes SLURM jobs only where SLURM's srun is on the PATH; this one never runs.
    fake_command(tmp_path / "bin", "srun", "exit 1")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[f"hydra/launcher={launcher}", f"hydra.sweep.dir={tmp_path}", *overrides],
            return_hydra_config=True,
        )
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    del params["_target_"]
    # As the launcher hands them to submitit.
    return make_executor(params)._executor._make_submission_file_text("COMMAND", "uid")


def sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


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


@pytest.mark.parametrize(
    ("launcher", "overrides", "tasks"),
    [
        ("slurm", ["hydra.launcher.gpus_per_node=0", "hydra.launcher.tasks_per_node=2"], 2),
        ("slurm", ["hydra.launcher.gpus_per_node=0"], 1),  # not --ntasks-per-node=0
        ("slurm_cpu", ["hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1"], 2),
        ("slurm_cpu", [], 1),
    ],
)
def test_a_cpu_job_has_its_tasks_and_asks_for_no_gpu(
    tmp_path, monkeypatch, launcher, overrides, tasks
):
    lines = sbatch_lines(sbatch_script(tmp_path, monkeypatch, *overrides, launcher=launcher))
    assert f"#SBATCH --ntasks-per-node={tasks}" in lines, lines
    assert not [line for line in lines if "gpu" in line or "gres" in line], lines
    cpus = "1" if "hydra.launcher.cpus_per_task=1" in overrides else "8"
    assert f"#SBATCH --cpus-per-task={cpus}" in lines and "#SBATCH --nodes=1" in lines


def submitting(tmp_path, *overrides: str, sbatch: str, sacct: str = "exit 1"):
    """``train.py -m hydra/launcher=slurm OVERRIDES`` started with stand-ins for SLURM's
    commands (shell scripts); the caller reads and ends it."""
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "srun", "exit 1")
    fake_command(bin_dir, "sbatch", sbatch)
    fake_command(bin_dir, "sacct", f"echo call >> {tmp_path / 'sacct_calls'}\n{sacct}")
    env = {**ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.Popen(
        [sys.executable, str(SCRIPTS / "train.py"), "-m", "hydra/launcher=slurm", *overrides],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_default_sigint,
    )  # fmt: skip


def _default_sigint() -> None:
    # A suite started in the background by a non-interactive shell ignores SIGINT, and so would
    # the command it starts; a terminal's Ctrl-C reaches a command with the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_submitting_says_which_jobs_where_and_how_to_follow_them(tmp_path):
    pytest.importorskip("submitit")
    sweep = tmp_path / "sweep"
    proc = submitting(
        tmp_path, "hydra.launcher.partition=gpu", "hydra.launcher.nodes=2",
        "hydra.launcher.gpus_per_node=4", f"hydra.sweep.dir={sweep}", "trainer.seed=0,1",
        sbatch='echo "Submitted batch job 4242"',
        # A cluster without job accounting: sacct fails at every poll.
        sacct='echo "sacct: error: Slurm accounting storage is disabled" >&2; exit 1',
    )  # fmt: skip
    try:
        said = []
        for line in proc.stdout:
            said.append(line.rstrip("\n"))
            if line.startswith("waiting for them"):
                break
        deadline = time.monotonic() + 60
        calls = tmp_path / "sacct_calls"
        while not (calls.is_file() and len(calls.read_text().split()) >= 3):
            assert time.monotonic() < deadline and proc.poll() is None, said
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: stop waiting
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    said += rest.splitlines()
    assert said[:6] == [
        "submitted 2 SLURM job(s) as job array 4242 to partition gpu: 2 node(s) x 4 task(s) "
        "each, 4 GPU(s) per node, 8 CPU(s) per task, time limit 1440 min",
        f"  job 4242_0: runs in {sweep / '0'}, SLURM logs in {sweep / '.submitit' / '4242_0'}",
        "    trainer.seed=0",
        f"  job 4242_1: runs in {sweep / '1'}, SLURM logs in {sweep / '.submitit' / '4242_1'}",
        "    trainer.seed=1",
        "follow them: squeue -j 4242 -o '%.16i %.9T %.10M %R' (a pending job's last column says "
        "why it waits); sacct -j 4242 (needs the cluster's job accounting)",
    ], said
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        "stopped waiting; the jobs go on (squeue -j 4242; scancel 4242 cancels them)"
    )
    # submitit's warning about sacct once, with what it means, not at each of the polls.
    assert len(calls.read_text().split()) >= 3
    assert err.count("Bypassing sacct error") == 1
    assert "sacct does not answer (a cluster without job accounting?)" in err
    # The batch script went to sbatch as a job array of the two runs.
    script = (sweep / ".submitit" / "4242" / "4242_submission.sh").read_text()
    assert {"#SBATCH --array=0-1%2", "#SBATCH --partition=gpu"} <= set(sbatch_lines(script))


def test_an_sbatch_refusal_is_one_sentence_with_sbatchs_reason(tmp_path):
    pytest.importorskip("submitit")
    proc = submitting(
        tmp_path, "hydra.launcher.partition=nope", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        sbatch="echo 'sbatch: error: invalid partition specified: nope' >&2\n"
        "echo 'sbatch: error: Batch job submission failed: Invalid partition name specified' >&2"
        "\nexit 1",
    )  # fmt: skip
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert err.strip() == (
        "train.py: error: sbatch refused the job (partition nope): invalid partition specified: "
        "nope; Batch job submission failed: Invalid partition name specified"
    ), err
    assert "submitted" not in out


LESS = " less {} loader worker(s)"
HERE = " cores shared by {} task(s) on this machine"


@pytest.mark.parametrize(
    ("env", "workers", "cores", "expected"),
    [
        ({"SLURM_CPUS_PER_TASK": "8"}, 3, None, (5, "SLURM_CPUS_PER_TASK=8" + LESS.format(3))),
        ({"SLURM_CPUS_PER_TASK": "2"}, 4, None, (1, "SLURM_CPUS_PER_TASK=2" + LESS.format(4))),
        (
            {"SLURM_CPUS_PER_TASK": "1", "SUBMITIT_EXECUTOR": "slurm"},
            0,
            None,
            (1, "SLURM_CPUS_PER_TASK=1"),
        ),
        # submitit_local: the machine's cores shared by the job's tasks
        ({"SUBMITIT_EXECUTOR": "local", "LOCAL_WORLD_SIZE": "2"}, 0, 8, (4, "8" + HERE.format(2))),
        # srun --ntasks-per-node=4 --gpus-per-task=1, no --cpus-per-task
        (
            {"SLURM_PROCID": "5", "SLURM_NTASKS_PER_NODE": "4"},
            1,
            16,
            (3, "16" + HERE.format(4) + LESS.format(1)),
        ),
        # the user's (or torchrun's) choice wins
        (
            {"OMP_NUM_THREADS": "1", "SLURM_CPUS_PER_TASK": "8"},
            0,
            None,
            (None, "OMP_NUM_THREADS=1"),
        ),
        ({}, 2, 8, (None, "torch's default")),  # no scheduler
    ],
)
def test_a_tasks_threads_fit_the_cpus_it_was_given(env, workers, cores, expected):
    assert task_threads(num_workers=workers, env=env, cores=cores) == expected


@pytest.fixture
def threads_kept():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_setup_runs_the_tasks_threads_and_the_start_up_block_says_why(monkeypatch, threads_kept):
    scheduler(monkeypatch, SLURM_CPUS_PER_TASK="3")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    runtime = Runtime.setup("cpu", distributed=False, num_workers=2)
    assert torch.get_num_threads() == 1
    assert runtime.threads_summary == "1 (SLURM_CPUS_PER_TASK=3 less 2 loader worker(s))"
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # left as it is, and said
    assert Runtime.setup("cpu", distributed=False).threads_summary == "2 (OMP_NUM_THREADS=2)"
    assert torch.get_num_threads() == 2
    several = Runtime(torch.device("cpu"), threads=(4, 4), threads_note="SLURM_CPUS_PER_TASK=4")
    assert several.threads_summary == "4 per process (SLURM_CPUS_PER_TASK=4)"
    assert Runtime(torch.device("cpu"), threads=(4, 2)).threads_summary == (
        "4, 2 for processes 0 to 1"
    )


def test_launch_command_names_the_program_not_submitits_script(monkeypatch):
    submit = "/venv/lib/python3.11/site-packages/submitit/core/_submit.py"
    monkeypatch.setattr(sys, "argv", [submit, "/sweep/.submitit/4242_0"])
    scheduler(monkeypatch, SUBMITIT_EXECUTOR="slurm")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert launch_command(["-m", "a=1"], program="/src/scripts/train.py") == (
        "python /src/scripts/train.py -m a=1"
    )
    assert launch_command(["a=1"], program="fcnseg-train") == "fcnseg-train a=1"
    # Started by the user, sys.argv[0] names the program as typed.
    scheduler(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["scripts/train.py"])
    assert launch_command(["a=1"], program="/src/scripts/train.py") == "python scripts/train.py a=1"


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


def resume_line(log: str) -> list[str]:
    """The command a stopped run printed after ``Resume with:``."""
    match = re.search(r"Resume with:\n\s+(.+)\n", log)
    assert match, log
    return shlex.split(match.group(1))


@pytest.mark.slow
def test_a_multirun_through_submitit_runs_as_a_group_of_tasks_and_resumes_as_printed(tmp_path):
    pytest.importorskip("submitit")
    sweep = tmp_path / "sweep"
    launcher = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2"]
    run = [
        f"hydra.sweep.dir={sweep}", "trainer.max_iters=1000000", "trainer.eval_interval=1000",
        "trainer.log_interval=1", "trainer.batch_size=2", "trainer.num_workers=0",
        "trainer.device=cpu", "trainer.resume=auto", "+backbone.fc_channels=32",
        "dataset.crop_size=32", "dataset.builder.min_size=32", "dataset.builder.max_size=40",
        "dataset.builder.num_samples={train:8,val:2,test:2}", "trainer.seed=3",  # as Hydra says
    ]  # fmt: skip
    # Each task is given 3 CPUs, as SLURM says it (torch's own count would be the machine's).
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}
    env["SLURM_CPUS_PER_TASK"] = "3"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "train.py"), *launcher, *run], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    run_dir = sweep / "0"  # hydra.sweep.dir/hydra.sweep.subdir, fixed at submission
    log_file = run_dir / "train.log"
    try:
        deadline = time.monotonic() + 300
        while not (log_file.is_file() and "iteration 2/1000000" in log_file.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.2)
        # Stop the job as a preemption would: submitit's local controller (named by the job's
        # folder) passes SIGTERM on to both tasks.
        (controller,) = [p.name for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]
        os.kill(int(controller), signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        proc.kill()
    log = log_file.read_text()
    # Both tasks of the job trained one run, as one process group, on the CPUs given.
    assert "runtime: cpu x 2 process(es)" in log, log
    assert "2 images per process x 2 process(es)" in log
    assert "cpu threads: 3 per process (SLURM_CPUS_PER_TASK=3)" in log
    stopped = int(re.search(r"stopped by SIGTERM after iteration (\d+)/", log).group(1))
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["iteration"] == stopped >= 2

    # The resume line is the user's multirun, this job alone, in its folder of the sweep.
    argv = resume_line(log)
    assert argv[:5] == ["python", str(SCRIPTS / "train.py"), *launcher]
    assert argv[5:] == [
        *[a for a in run if not a.startswith(("hydra.sweep.dir=", "trainer.resume="))],
        f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=0", "trainer.resume=true",
    ]  # fmt: skip
    # Run as printed (this interpreter; two more iterations).
    more = [f"trainer.max_iters={stopped + 2}" if a.startswith("trainer.max_iters=") else a
            for a in argv[1:]]  # fmt: skip
    done = subprocess.run(
        [sys.executable, *more], cwd=tmp_path, env=ENV, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    jobs = sorted(sweep.glob(".submitit/*/*_log.err"))
    assert done.returncode == 0, done.stderr[-3000:] + "".join(p.read_text()[-2000:] for p in jobs)
    log = log_file.read_text()
    assert f"resumed from {run_dir / 'checkpoints' / 'last.pt'} at iteration {stopped}" in log
    assert "cpu threads: 1 per process (OMP_NUM_THREADS=1)" in log  # the user's setting wins
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["iteration"] == stopped + 2 and len(ckpt["rng"]) == 2  # each task's generators
    assert ckpt["config"]["trainer"]["seed"] == 3  # the sweep's override reached the job
    assert (run_dir / "metrics.json").is_file() and not (run_dir / ".lock").exists()


@pytest.mark.slow
def test_torchrun_in_a_batch_script_stops_quietly_on_sigterm(tmp_path):
    # python -m fcnseg.utils.distributed is torchrun; SLURM's --signal=TERM reaches every
    # process of the job step: torchrun and its workers.
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fcnseg.utils.distributed", "--standalone", "--nproc_per_node=2",
         str(SCRIPTS / "train.py"), *SCRIPT_RUN, "trainer.max_iters=1000000",
         f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "iteration 2/1000000" in line:
                break
        os.killpg(proc.pid, signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    out = "".join(lines) + rest
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "Traceback" not in out and "SignalException" not in out, out
    stopped = int(re.search(r"stopped by SIGTERM after iteration (\d+)/", out).group(1))
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["iteration"] == stopped >= 2
    assert resume_line(out)[:2] == ["torchrun", "--nproc_per_node=2"]
    assert out.rstrip().splitlines()[-1].endswith(f"hydra.run.dir={run_dir} trainer.resume=true")
