"""``pip install .`` as a user does it: the wheel, a fresh virtual environment, the commands.

The wheel is built from a copy of the checkout (the build leaves nothing in the tree) and
installed without its dependencies into a new virtual environment that sees this environment's
packages (torch and the rest) through a ``.pth`` file, so nothing is downloaded. The new
environment's own packages come first, and an editable install's hook here is a ``.pth`` file
that such a line does not run: the commands import the wheel's fcnseg and configs (checked).
They run from a folder outside the checkout.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONFIGS, ROOT, SCRIPTS, TINY_RUN, compose_config
from omegaconf import OmegaConf

pytestmark = pytest.mark.slow

#: what a build never reads: version control, environments, runs, data, earlier builds.
NOT_SOURCE = {"outputs", "runs", "multirun", "data", "build", "dist"}


def run(args: list[str], *, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    # The user's shell: no PYTHONPATH into the checkout, runs in the working folder.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FCNSEG_OUTPUT_DIR")}
    proc = subprocess.run(
        args, cwd=cwd, env={**env, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, f"{args[:4]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("building the wheel offline needs setuptools in this environment")
    src = tmp_path_factory.mktemp("source")
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") or entry.name in NOT_SOURCE or entry.suffix == ".egg-info":
            continue
        if entry.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(entry, src / entry.name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(entry, src / entry.name)
    dist = tmp_path_factory.mktemp("dist")
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--quiet", "--wheel-dir", str(dist), str(src)],
        cwd=src,
    )  # fmt: skip
    (built,) = dist.glob("fcnseg-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed; its ``bin`` folder."""
    env = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(env)], cwd=env)
    python = env / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(run([str(python), "-c", purelib], cwd=env).stdout.strip())
    ours = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    (site / "_fcnseg_test_base.pth").write_text("\n".join(ours) + "\n")
    run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "--quiet", str(wheel)],
        cwd=env,
    )  # fmt: skip
    return env / "bin"


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A working folder outside the checkout."""
    assert not tmp_path.resolve().is_relative_to(ROOT)
    return tmp_path


def test_the_wheel_holds_the_library_the_commands_and_every_config_but_no_tests(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    library = {f"{p.relative_to(ROOT).as_posix()}" for p in (ROOT / "fcnseg").rglob("*.py")}
    assert library <= names, f"missing from the wheel: {sorted(library - names)}"
    assert "fcnseg/data/splits/seg11valid.txt" in names
    configs = {
        f"fcnseg_cli/configs/{p.relative_to(CONFIGS).as_posix()}"
        for p in [CONFIGS / "__init__.py", *CONFIGS.rglob("*.yaml")]
    }
    assert configs <= names, f"configs missing from the wheel: {sorted(configs - names)}"
    scripts = {f"fcnseg_cli/scripts/{p.name}" for p in SCRIPTS.glob("*.py")}
    assert scripts <= names, f"scripts missing from the wheel: {sorted(scripts - names)}"
    stray = sorted(n for n in names if n.split("/")[0] in ("tests", "docs", "docker", "scripts"))
    assert not stray and not any("conftest" in n for n in names), stray
    # One command per script, named after it, calling its main: scripts/inspect_data.py is
    # fcnseg-inspect-data.
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(zipfile.ZipFile(wheel).read(entry_points).decode())
    expected = {
        "fcnseg-" + p.stem.replace("_", "-"): f"fcnseg_cli.scripts.{p.stem}:main"
        for p in SCRIPTS.glob("*.py")
        if p.stem != "__init__"
    }
    assert dict(parser["console_scripts"]) == expected


def test_installed_train_prints_the_checkouts_config(venv, elsewhere):
    proc = run([str(venv / "fcnseg-train"), "--cfg", "job", *TINY_RUN], cwd=elsewhere)
    expected = compose_config(TINY_RUN)  # the checkout's configs, composed in this process
    assert yaml.safe_load(proc.stdout) == OmegaConf.to_container(expected)
    assert not list(elsewhere.iterdir())  # --cfg job writes no run directory


def test_installed_train_runs_in_the_working_folder(venv, elsewhere):
    # The wheel's fcnseg, not the checkout's (found without importing torch).
    where = run(
        [str(venv / "python"), "-c",
         "import importlib.util as u; print(u.find_spec('fcnseg').origin); "
         "print(u.find_spec('fcnseg_cli.configs').origin)"],
        cwd=elsewhere,
    )  # fmt: skip
    for origin in where.stdout.split():
        assert Path(origin).resolve().is_relative_to(venv.parent.resolve()), origin
    proc = run([str(venv / "fcnseg-train"), *TINY_RUN], cwd=elsewhere)
    run_dir = Path(proc.stdout.rsplit("run directory: ", 1)[1].strip())
    assert run_dir.resolve().is_relative_to((elsewhere / "outputs").resolve()), run_dir
    for rel in ("checkpoints/last.pt", "metrics.json", "train.log"):
        assert (run_dir / rel).is_file(), rel
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["iteration"] == 2
    assert 0.0 <= json.loads((run_dir / "metrics.json").read_text())["miou"] <= 1.0
    # Hydra composed the configs the wheel installed.
    hydra = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.config_sources
    main = [(s.schema, s.path) for s in hydra if s.provider == "main"]
    assert main == [("pkg", "fcnseg_cli.configs")]
    assert not list(venv.parent.rglob("outputs"))  # nothing written inside the environment
