"""docker/launch.py: the commands it plans for each environment, and a real 2-process CPU run."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_RUN

from fcnseg.errors import UserError
from fcnseg.utils.checkpoint import load_checkpoint

LAUNCHER = ROOT / "docker" / "launch.py"
TRAIN = str(ROOT / "scripts" / "train.py")
EVALUATE = str(ROOT / "scripts" / "evaluate.py")
PREDICT = str(ROOT / "scripts" / "predict.py")
NOW = datetime.datetime(2030, 1, 2, 3, 4, 5)


def _load_launcher():
    spec = importlib.util.spec_from_file_location("fcnseg_launch", LAUNCHER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


launch = _load_launcher()


def plan(argv, env=None, *, gpus=0, cpus=8):
    """The launcher's plan on a fake machine: ``gpus`` GPUs, ``cpus`` cores, a fixed clock."""
    return launch.plan(argv, env or {}, gpus=lambda: gpus, cpus=lambda: cpus, now=lambda: NOW)


def no_gpu_query():
    raise AssertionError("the launcher asked for the GPU count although trainer.device was given")


@pytest.fixture
def torchrun():
    """What the launcher runs as torchrun here: the console script beside this interpreter."""
    path = Path(sys.executable).parent / "torchrun"
    assert path.is_file(), "torchrun must be installed beside the test interpreter"
    return str(path)


# --------------------------------------------------------------------------- single node
def test_train_without_gpu_falls_back_to_one_cpu_process_with_gloo(torchrun):
    got = plan(["train", "optimizer.lr=0.01"], gpus=0, cpus=8)
    assert got.argv == [
        torchrun, "--standalone", "--nproc_per_node=1", "--max-restarts=3", TRAIN,
        "optimizer.lr=0.01", "trainer.device=cpu", "hydra.run.dir=outputs/2030-01-02/03-04-05",
        "trainer.resume=auto",
    ]  # fmt: skip
    # All 8 cores to the single worker, instead of torchrun's one thread per worker.
    assert got.env == {"OMP_NUM_THREADS": "8"}
    assert any("gloo" in note for note in got.notes)


def test_train_uses_every_visible_gpu_by_default(torchrun):
    got = plan(["train"], gpus=4)
    assert got.argv == [
        torchrun, "--standalone", "--nproc_per_node=4", "--max-restarts=3", TRAIN,
        "hydra.run.dir=outputs/2030-01-02/03-04-05", "trainer.resume=auto",
    ]  # fmt: skip
    assert got.env == {}


def test_nproc_chooses_fewer_processes_than_gpus(torchrun):
    got = plan(["train"], {"NPROC": "2"}, gpus=4)
    assert got.argv[:3] == [torchrun, "--standalone", "--nproc_per_node=2"]


def test_nproc_on_cpu_splits_the_cores_between_processes():
    got = plan(["train"], {"NPROC": "3"}, gpus=0, cpus=8)
    assert "--nproc_per_node=3" in got.argv
    assert got.env == {"OMP_NUM_THREADS": "2"}  # 8 cores // 3 processes
    got = plan(["train"], {"NPROC": "3", "OMP_NUM_THREADS": "5"}, gpus=0, cpus=8)
    assert got.env == {}  # the user's own setting wins


def test_device_override_decides_without_counting_gpus():
    got = launch.plan(
        ["train", "trainer.device=cpu"], {"NPROC": "2"}, gpus=no_gpu_query, cpus=lambda: 2
    )
    assert "--nproc_per_node=2" in got.argv
    # The user's own trainer.device is kept and not repeated.
    assert [a for a in got.argv if a.startswith("trainer.device=")] == ["trainer.device=cpu"]


def test_hydra_overrides_pass_through_unchanged_as_single_arguments():
    overrides = ["dataset.builder.num_samples={train: 8, val: 3}", "+experiment=x y", "~loss"]
    got = plan(["train", *overrides], gpus=1)
    script_at = got.argv.index(TRAIN)
    assert got.argv[script_at + 1 : script_at + 4] == overrides
    # The printed line is the same argument vector once a shell splits it.
    assert shlex.split(got.shell()) == got.argv


def test_run_directory_comes_from_the_output_dir_and_run_name():
    got = plan(["train"], {"FCNSEG_OUTPUT_DIR": "/outputs", "RUN_NAME": "voc-fcn8s"}, gpus=1)
    assert "hydra.run.dir=/outputs/voc-fcn8s" in got.argv
    got = plan(["train", "hydra.run.dir=/elsewhere"], {"RUN_NAME": "ignored"}, gpus=1)
    assert [a for a in got.argv if a.startswith("hydra.run.dir=")] == ["hydra.run.dir=/elsewhere"]
    # A preset's own directory (under paths.outputs) is where its next stage looks for it.
    got = plan(["train", "experiment=voc_fcn16s"], {"FCNSEG_OUTPUT_DIR": "/outputs"}, gpus=1)
    assert not [a for a in got.argv if a.startswith("hydra.run.dir=")]


def test_train_restarts_failed_workers_and_resumes_from_last_checkpoint():
    got = plan(["train"], {"MAX_RESTARTS": "5"}, gpus=2)
    assert got.argv.count("--max-restarts=5") == 1
    assert got.argv.index("--max-restarts=5") < got.argv.index(TRAIN)  # torchrun's, not Hydra's
    assert got.argv[-1] == "trainer.resume=auto"
    assert "--max-restarts=0" in plan(["train"], {"MAX_RESTARTS": "0"}, gpus=2).argv
    # The user's own choice of resume is kept, and not repeated.
    got = plan(["train", "trainer.resume=false"], gpus=2)
    assert [a for a in got.argv if "trainer.resume=" in a] == ["trainer.resume=false"]
    # Evaluation is short and restarts nothing.
    got = plan(["evaluate", "checkpoint=c.pt"], gpus=2)
    assert not [a for a in got.argv if "restarts" in a or "resume" in a]


def test_empty_variables_count_as_unset():
    # compose passes a variable that is unset on the host as an empty string
    got = plan(["train"], {"NPROC": "", "NNODES": "", "RUN_NAME": ""}, gpus=2)
    assert "--nproc_per_node=2" in got.argv and "--standalone" in got.argv


# --------------------------------------------------------------------------- multi-node
def test_multi_node_uses_the_static_rendezvous_on_the_master(torchrun):
    env = {
        "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29400",
        "NPROC": "8", "RUN_NAME": "exp1", "FCNSEG_OUTPUT_DIR": "/outputs",
    }  # fmt: skip
    got = plan(["train", "dataset=voc"], env, gpus=8)
    assert got.argv == [
        torchrun, "--nnodes=2", "--node_rank=1", "--master_addr=10.1.2.3", "--master_port=29400",
        "--nproc_per_node=8", "--max-restarts=3", TRAIN, "dataset=voc",
        "hydra.run.dir=/outputs/exp1", "trainer.resume=auto",
    ]  # fmt: skip


def test_multi_node_master_port_defaults_to_29500():
    env = {"NNODES": "3", "NODE_RANK": "0", "MASTER_ADDR": "node0", "RUN_NAME": "r"}
    assert "--master_port=29500" in plan(["train"], env, gpus=1).argv


@pytest.mark.parametrize(
    ("env", "culprit"),
    [
        ({"NPROC": "0"}, "NPROC='0'"),
        ({"NPROC": "two"}, "NPROC='two'"),
        ({"NNODES": "0"}, "NNODES='0'"),
        ({"NNODES": "2", "MASTER_ADDR": "h", "RUN_NAME": "r"}, "NODE_RANK"),
        ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h", "RUN_NAME": "r"}, "NODE_RANK=2"),
        ({"NNODES": "2", "NODE_RANK": "0", "RUN_NAME": "r"}, "MASTER_ADDR"),
        ({"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "h"}, "RUN_NAME"),
        (
            {
                "NNODES": "2",
                "NODE_RANK": "0",
                "MASTER_ADDR": "h",
                "MASTER_PORT": "70000",
                "RUN_NAME": "r",
            },
            "MASTER_PORT=70000",
        ),
        ({"NPROC": "8"}, "NPROC=8 but only 4 GPU(s)"),
        ({"MAX_RESTARTS": "-1"}, "MAX_RESTARTS='-1'"),
    ],
)
def test_bad_environment_is_one_sentence_naming_the_variable(env, culprit):
    with pytest.raises(UserError) as err:
        plan(["train"], env, gpus=4)
    assert culprit in str(err.value)
    assert "\n" not in str(err.value)


def test_cuda_requested_without_a_gpu_is_refused():
    with pytest.raises(UserError, match="trainer.device=cuda"):
        plan(["train", "trainer.device=cuda"], gpus=0)


# --------------------------------------------------------------------------- other commands
def test_evaluate_runs_under_torchrun_like_train_without_a_run_dir(torchrun):
    got = plan(["evaluate", "checkpoint=/outputs/r/checkpoints/best.pt"], gpus=2)
    assert got.argv == [
        torchrun, "--standalone", "--nproc_per_node=2", EVALUATE,
        "checkpoint=/outputs/r/checkpoints/best.pt",
    ]  # fmt: skip


def test_evaluate_without_gpu_runs_on_cpu(torchrun):
    got = plan(["evaluate", "checkpoint=c.pt"], {"NPROC": "2"}, gpus=0, cpus=4)
    assert got.argv == [
        torchrun, "--standalone", "--nproc_per_node=2", EVALUATE, "checkpoint=c.pt",
        "trainer.device=cpu",
    ]  # fmt: skip
    assert got.env == {"OMP_NUM_THREADS": "2"}


def test_predict_is_one_plain_process():
    got = plan(["predict", "checkpoint=c.pt", "input=/data/img", "output=/outputs/pred"], gpus=4)
    assert got.argv == [
        sys.executable, PREDICT, "checkpoint=c.pt", "input=/data/img", "output=/outputs/pred",
    ]  # fmt: skip


def test_tensorboard_reads_the_runs_folder_and_lets_user_flags_win():
    got = plan(["tensorboard", "--reload_interval", "5"], {"FCNSEG_OUTPUT_DIR": "/outputs"})
    assert Path(got.argv[0]).name == "tensorboard"
    assert got.argv[1:] == [
        "--logdir=/outputs", "--host=localhost", "--port=6006", "--reload_interval", "5",
    ]  # fmt: skip
    env = {"TENSORBOARD_HOST": "0.0.0.0", "TENSORBOARD_PORT": "7007"}
    assert plan(["tensorboard"], env).argv[1:] == [
        "--logdir=outputs",
        "--host=0.0.0.0",
        "--port=7007",
    ]


def test_unknown_command_names_the_choices():
    with pytest.raises(UserError, match="unknown command 'trian'; expected one of train"):
        plan(["trian"])


# --------------------------------------------------------------------------- the CLI, as run
def _run(*args, env=None, timeout=120):
    full_env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in ("NPROC", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RUN_NAME", "DRY_RUN")
    }
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(LAUNCHER), *args],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_dry_run_prints_the_exact_multi_node_command(torchrun):
    env = {
        "DRY_RUN": "1", "NPROC": "2", "NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29555", "RUN_NAME": "exp", "FCNSEG_OUTPUT_DIR": "/outputs",
        "OMP_NUM_THREADS": "1",
    }  # fmt: skip
    result = _run("train", "trainer.device=cpu", "dataset.builder.num_samples={train: 8}", env=env)
    assert result.returncode == 0, result.stderr
    expected = shlex.join([
        torchrun, "--nnodes=2", "--node_rank=0", "--master_addr=127.0.0.1", "--master_port=29555",
        "--nproc_per_node=2", "--max-restarts=3", TRAIN, "trainer.device=cpu",
        "dataset.builder.num_samples={train: 8}", "hydra.run.dir=/outputs/exp",
        "trainer.resume=auto",
    ])  # fmt: skip
    assert result.stdout == expected + "\n"


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the fallback on a machine without GPU"
)
def test_dry_run_without_gpu_plans_cpu_gloo(torchrun):
    result = _run("--dry-run", "train", env={"RUN_NAME": "r", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    expected = shlex.join([
        torchrun, "--standalone", "--nproc_per_node=1", "--max-restarts=3", TRAIN,
        "trainer.device=cpu", "hydra.run.dir=outputs/r", "trainer.resume=auto",
    ])  # fmt: skip
    assert result.stdout == expected + "\n"
    assert "gloo" in result.stderr


def test_cli_error_is_one_line_and_exit_status_2():
    result = _run("--dry-run", "train", env={"NPROC": "-1"})
    assert result.returncode == 2
    assert result.stderr.strip() == "launch.py: error: NPROC='-1' is not an integer >= 1"
    assert result.stdout == ""


@pytest.mark.slow
def test_train_for_real_with_two_cpu_processes(tmp_path):
    run_dir = tmp_path / "run"
    env = {"NPROC": "2", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}
    result = _run("train", *TINY_RUN, f"hydra.run.dir={run_dir}", env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "--nproc_per_node=2" in result.stderr  # the launcher's own echo of the command

    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["iteration"] == 2
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["num_images"] == 3  # the val split, each image scored once across both ranks
    log = (run_dir / "train.log").read_text()
    assert re.search(r"\b2 process", log), log  # the trainer saw a world of two
    # Both ranks wrote into the one directory the launcher named: no second run folder.
    assert [p.name for p in tmp_path.iterdir()] == ["run"]

    # evaluate through the launcher, 2 processes again: the same scores as the trainer's.
    out = tmp_path / "val.json"
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    args = ("evaluate", f"checkpoint={ckpt_path}", f"out={out}", "trainer.num_workers=0")
    result = _run(*args, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    evaluated = json.loads(out.read_text())
    assert evaluated["confusion_matrix"] == metrics["confusion_matrix"]
    assert evaluated["num_images"] == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_serves_the_runs_folder(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "DRY_RUN"}
    env.update(FCNSEG_OUTPUT_DIR=str(tmp_path), TENSORBOARD_PORT=str(port))
    board = subprocess.Popen(
        [sys.executable, str(LAUNCHER), "tensorboard"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                # The request compose.yaml's healthcheck makes.
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert board.poll() is None, board.stderr.read()
                assert time.monotonic() < deadline, "TensorBoard did not answer within 60 s"
                time.sleep(0.5)
    finally:
        board.terminate()
        board.wait(timeout=30)
