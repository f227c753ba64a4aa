#!/usr/bin/env python3
"""Checks docker/compose.yaml without a Docker engine: ``python docker/check_compose.py [FILE]``.

``docker compose config`` needs the compose plugin, which a CI machine may lack; this reads the
file as compose does (YAML with merge keys, ``${VAR:-default}`` interpolation from the
environment) and checks two things:

- the file is well-formed compose: known top-level and service keys (a typo such as
  ``shm-size`` is caught), every named volume a service mounts is declared under ``volumes:`` and
  every declared one is used, ports and volume specs parse, build contexts and Dockerfiles exist;
- the services fcnseg promises are there and agree with each other: ``train`` reserves all GPUs,
  shares the host IPC namespace (or has a large shm_size), mounts /data read-only and /outputs;
  ``tensorboard`` reads the very same outputs folder and publishes port 6006; ``evaluate`` sees
  the same data and outputs; every service runs the launcher the Dockerfile installs.

Prints one sentence per problem, naming the file and the key, and exits 1 when there is any.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

TOP_LEVEL_KEYS = {
    "version", "name", "include", "services", "networks", "volumes", "configs", "secrets",
    "models",
}  # fmt: skip
# The service keys of the Compose Specification (docs.docker.com/reference/compose-file/services).
SERVICE_KEYS = {
    "annotations", "attach", "blkio_config", "build", "cap_add", "cap_drop", "cgroup",
    "cgroup_parent", "command", "configs", "container_name", "cpu_count", "cpu_percent",
    "cpu_period", "cpu_quota", "cpu_rt_period", "cpu_rt_runtime", "cpu_shares", "cpus", "cpuset",
    "credential_spec", "depends_on", "deploy", "develop", "device_cgroup_rules", "devices", "dns",
    "dns_opt", "dns_search", "domainname", "driver_opts", "entrypoint", "env_file", "environment",
    "expose", "extends", "external_links", "extra_hosts", "gpus", "group_add", "healthcheck",
    "hostname", "image", "init", "ipc", "isolation", "label_file", "labels", "links", "logging",
    "mac_address", "mem_limit", "mem_reservation", "mem_swappiness", "memswap_limit", "models",
    "network_mode", "networks", "oom_kill_disable", "oom_score_adj", "pid", "pids_limit",
    "platform", "ports", "post_start", "pre_stop", "privileged", "profiles", "provider",
    "pull_policy", "read_only", "restart", "runtime", "scale", "secrets", "security_opt",
    "shm_size", "stdin_open", "stop_grace_period", "stop_signal", "storage_opt", "sysctls",
    "tmpfs", "tty", "ulimits", "use_api_socket", "user", "userns_mode", "uts", "volumes",
    "volumes_from", "working_dir",
}  # fmt: skip
VOLUME_MODES = {"ro", "rw", "z", "Z", "cached", "delegated", "consistent", "nocopy"}
RESTART_POLICIES = {"no", "always", "on-failure", "unless-stopped"}
LAUNCHER = "/opt/fcnseg/docker/launch.py"
REQUIRED_SERVICES = ("train", "evaluate", "tensorboard")
MIN_SHM_BYTES = 1 << 30  # DataLoader workers of a segmentation batch need well over Docker's 64 MB
_VARIABLE = re.compile(
    r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|([A-Za-z_]\w*))"
)
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([bkmg]?)b?$", re.IGNORECASE)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Substitutes variables as compose does: ``$VAR``, ``${VAR:-default}``, ``${VAR?e}``..."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        escaped, name, op, arg, bare = match.groups()
        if escaped:
            return "$"
        current = env.get(name or bare)
        if op is None:
            return current or ""
        # With a colon, empty counts as unset; without one, only unset does.
        missing = not current if op.startswith(":") else current is None
        if op.endswith("-"):
            return interpolate(arg, env) if missing else current
        if op.endswith("?"):
            if missing:
                raise ValueError(f"required variable {name} is not set: {arg}")
            return current
        return "" if missing else interpolate(arg, env)  # ":+" / "+": a replacement when set

    return _VARIABLE.sub(substitute, value)


def parse_size(text: Any) -> int | None:
    """Bytes in a compose size (``8gb``, ``512m``, an integer), or None when it does not parse."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text).strip())
    if not match:
        return None
    return int(float(match.group(1)) * 1024 ** "bkmg".index((match.group(2) or "b").lower()))


def parse_volume(spec: Any) -> tuple[str, str, str] | None:
    """(source, target, mode) of a short-syntax or long-syntax mount; None when malformed."""
    if isinstance(spec, dict):
        if "target" not in spec:
            return None
        mode = "ro" if spec.get("read_only") else "rw"
        return str(spec.get("source", "")), str(spec["target"]), mode
    parts = str(spec).split(":")
    if len(parts) == 1:
        return "", parts[0], "rw"  # an anonymous volume
    if len(parts) == 2:
        return parts[0], parts[1], "rw"
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    return None


def is_named_volume(source: str) -> bool:
    """Compose treats a source that is not a path (., /, ~) as the name of a volume."""
    return bool(source) and not source.startswith((".", "/", "~"))


def parse_port(spec: Any) -> tuple[str, int | None, int] | None:
    """(host address, host port, container port) of a short-syntax port; None when malformed."""
    if isinstance(spec, dict):
        published = spec.get("published")
        return (
            str(spec.get("host_ip", "")),
            int(published) if published else None,
            int(spec["target"]),
        )
    text = str(spec).split("/")[0]
    host = r"(\d{1,3}(?:\.\d{1,3}){3}|\[[0-9a-fA-F:]+\])"  # IPv4 or [IPv6]
    match = re.fullmatch(rf"(?:{host}:)?(?:(\d+):)?(\d+)", text)
    if not match:
        return None
    host_ip, host_port, container_port = match.groups()
    ports = [int(p) for p in (host_port, container_port) if p]
    if any(not 0 < p < 65536 for p in ports):
        return None
    return host_ip or "", int(host_port) if host_port else None, int(container_port)


def check(path: Path, env: Mapping[str, str] | None = None) -> list[str]:
    """Every problem found in the compose file at ``path``, one sentence each (empty: none)."""
    env = os.environ if env is None else env
    problems: list[str] = []

    def problem(where: str, message: str) -> None:
        problems.append(f"{path}: {where}: {message}")

    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        return [f"{path}: cannot be read as YAML: {err}".splitlines()[0]]
    if not isinstance(raw, dict):
        return [f"{path}: the top level must be a mapping, not {type(raw).__name__}"]
    try:
        doc = interpolate(raw, env)
    except ValueError as err:
        return [f"{path}: {err}"]

    for key in doc:
        if key not in TOP_LEVEL_KEYS and not str(key).startswith("x-"):
            problem(key, "unknown top-level key")
    services = doc.get("services")
    if not isinstance(services, dict) or not services:
        return [*problems, f"{path}: services: no services defined"]
    declared_volumes = doc.get("volumes") or {}
    if not isinstance(declared_volumes, dict):
        problem("volumes", "must be a mapping of volume names")
        declared_volumes = {}
    used_volumes: set[str] = set()
    mounts: dict[str, dict[str, tuple[str, str]]] = {}  # service -> target -> (source, mode)
    base = path.parent

    for name, service in services.items():
        where = f"services.{name}"
        if not isinstance(service, dict):
            problem(where, "must be a mapping")
            continue
        for key in service:
            if key not in SERVICE_KEYS and not str(key).startswith("x-"):
                problem(f"{where}.{key}", "unknown service key")
        if "image" not in service and "build" not in service:
            problem(where, "needs an image or a build section")
        build = service.get("build")
        if build is not None:
            context = build if isinstance(build, str) else build.get("context", ".")
            context_dir = (base / context).resolve()
            dockerfile = (
                "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            )
            if not context_dir.is_dir():
                problem(f"{where}.build.context", f"{context_dir} is not a folder")
            elif not (context_dir / dockerfile).is_file():
                problem(f"{where}.build.dockerfile", f"{context_dir / dockerfile} does not exist")

        mounts[name] = {}
        for spec in service.get("volumes") or []:
            parsed = parse_volume(spec)
            if parsed is None:
                problem(f"{where}.volumes", f"{spec!r} is not SOURCE:TARGET[:MODE]")
                continue
            source, target, mode = parsed
            if not target.startswith("/"):
                problem(f"{where}.volumes", f"{spec!r}: the container path must be absolute")
            if not set(mode.split(",")) <= VOLUME_MODES:
                problem(f"{where}.volumes", f"{spec!r}: unknown mode {mode!r}")
            if target in mounts[name]:
                problem(f"{where}.volumes", f"{target} is mounted twice")
            if is_named_volume(source):
                used_volumes.add(source)
                if source not in declared_volumes:
                    problem(
                        f"{where}.volumes",
                        f"named volume {source!r} is not declared under volumes:",
                    )
            mounts[name][target] = (source, mode)

        ports = service.get("ports") or []
        for spec in ports:
            if parse_port(spec) is None:
                problem(f"{where}.ports", f"{spec!r} is not [HOST_IP:][HOST_PORT:]CONTAINER_PORT")
        if ports and service.get("network_mode") == "host":
            problem(f"{where}.ports", "is ignored with network_mode: host")
        if "shm_size" in service and parse_size(service["shm_size"]) is None:
            problem(f"{where}.shm_size", f"{service['shm_size']!r} is not a size")
        restart = service.get("restart")
        if restart is not None and str(restart).split(":")[0] not in RESTART_POLICIES:
            problem(f"{where}.restart", f"{restart!r} is not one of {sorted(RESTART_POLICIES)}")
        environment = service.get("environment")
        if environment is not None and not isinstance(environment, dict | list):
            problem(f"{where}.environment", "must be a list of NAME[=VALUE] or a mapping")
        healthcheck = service.get("healthcheck")
        if isinstance(healthcheck, dict) and "test" in healthcheck:
            test = healthcheck["test"]
            if isinstance(test, list) and (not test or test[0] not in ("CMD", "CMD-SHELL", "NONE")):
                problem(
                    f"{where}.healthcheck.test", "a list must start with CMD, CMD-SHELL or NONE"
                )
        for device in _gpu_requests(service):
            if not isinstance(device, dict) or not device.get("capabilities"):
                problem(f"{where}.deploy.resources.reservations.devices", "each needs capabilities")

    for name in declared_volumes:
        if name not in used_volumes:
            problem(f"volumes.{name}", "is declared but no service mounts it")

    _check_fcnseg(services, mounts, problem)
    return problems


def _gpu_requests(service: dict) -> list:
    deploy = service.get("deploy") or {}
    return ((deploy.get("resources") or {}).get("reservations") or {}).get("devices") or []


def _reserves_all_gpus(device: Any) -> bool:
    if not isinstance(device, dict):
        return False
    return device.get("count") == "all" and "gpu" in (device.get("capabilities") or [])


def _check_fcnseg(services: dict, mounts: dict, problem: Callable[[str, str], None]) -> None:
    """What fcnseg's own services promise: the GPUs, the mounts, the launcher, the port."""
    for name in REQUIRED_SERVICES:
        if name not in services:
            problem("services", f"the {name!r} service is missing")
    for name, service in services.items():
        if not isinstance(service, dict):
            continue
        entrypoint = service.get("entrypoint")
        if not (
            isinstance(entrypoint, list) and len(entrypoint) >= 3 and entrypoint[1] == LAUNCHER
        ):
            problem(
                f"services.{name}.entrypoint",
                f"must run the launcher: [python3, {LAUNCHER}, COMMAND]",
            )
        elif entrypoint[2] != name:
            problem(
                f"services.{name}.entrypoint",
                f"runs the launcher's {entrypoint[2]!r}, not {name!r}",
            )

    train = services.get("train")
    if isinstance(train, dict):
        gpus = _gpu_requests(train)
        if not any(_reserves_all_gpus(device) for device in gpus):
            problem(
                "services.train.deploy",
                "must reserve all GPUs (devices: count: all, capabilities: [gpu])",
            )
        shm = parse_size(train.get("shm_size", 0)) or 0
        if train.get("ipc") != "host" and shm < MIN_SHM_BYTES:
            problem(
                "services.train",
                "needs ipc: host or shm_size of at least 1gb for DataLoader workers",
            )
    for name in ("train", "evaluate"):
        if name not in mounts:
            continue
        data = mounts[name].get("/data")
        if data is None or data[1] != "ro":
            problem(f"services.{name}.volumes", "must mount the datasets read-only at /data")
        if "/outputs" not in mounts[name]:
            problem(f"services.{name}.volumes", "must mount the runs folder at /outputs")
    train_outputs = mounts.get("train", {}).get("/outputs")
    for name in ("evaluate", "tensorboard"):
        outputs = mounts.get(name, {}).get("/outputs")
        if train_outputs and outputs and outputs[0] != train_outputs[0]:
            problem(
                f"services.{name}.volumes",
                f"mounts {outputs[0]!r} at /outputs, but train writes its runs to "
                f"{train_outputs[0]!r}",
            )
    if "tensorboard" in mounts and "/outputs" not in mounts["tensorboard"]:
        problem("services.tensorboard.volumes", "must mount the runs folder at /outputs")
    board = services.get("tensorboard")
    if isinstance(board, dict):
        container_ports = [p[2] for p in map(parse_port, board.get("ports") or []) if p]
        if 6006 not in container_ports:
            problem("services.tensorboard.ports", "must publish TensorBoard's port 6006")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else Path(__file__).with_name("compose.yaml"))
    problems = check(path)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        return 1
    services = yaml.safe_load(path.read_text())["services"]
    print(f"{path}: OK ({len(services)} services: {', '.join(services)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
