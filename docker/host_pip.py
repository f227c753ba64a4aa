#!/usr/bin/env python3
"""The host's pip settings, handed to an image build: where pip finds packages and whom it trusts.

    python3 docker/host_pip.py OUT_DIR

Reads the host's effective pip configuration (``pip config list``: /etc/pip.conf,
/etc/xdg/pip/pip.conf, ~/.config/pip/pip.conf and the PIP_* variables, the variables winning),
writes it as one file, OUT_DIR/pip.conf, and prints the podman build flags, one per line, that
show a build what the host's pip sees: that file at /etc/pip.conf, and every local file or
folder it names (find-links folders, file:// indexes, constraint files, the CA bundle) read-only
at the same path. A build behind a proxy that re-signs TLS then trusts the index as the host
does, and a machine with a local package mirror installs from it. Prints nothing when the host's
pip has no settings of its own.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

# Settings that are the host's business only, not the build's.
SKIP = {"user", "target", "prefix", "root", "cache-dir", "log", "src"}


def effective_settings() -> dict[str, str]:
    """The host's pip settings, the PIP_* variables overriding the files."""
    try:
        listed = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    files: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in listed.splitlines():
        name, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip().strip("'\"")
        section, _, key = name.rpartition(".")
        key = key.strip()
        if key in SKIP:
            continue
        if section == ":env:":
            env[key] = value
        elif section in ("global", "install", "download"):
            files[key] = value
    return {**files, **env}


def local_paths(value: str) -> list[Path]:
    """The existing local paths a setting names (plain paths and file:// URLs), as named."""
    found = []
    for token in value.split():
        path = Path(unquote(urlparse(token).path)) if token.startswith("file:") else Path(token)
        if not path.is_absolute() or not path.exists():
            continue
        # A file:// simple index links to its files as ../../files/...: mount the folder above.
        if path.name == "simple" and token.startswith("file:"):
            path = path.parent
        found.append(path)
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    settings = effective_settings()
    if not settings:
        return 0
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    conf = out / "pip.conf"
    lines = ["# The host's pip settings, for an image build (docker/host_pip.py)", "[global]"]
    lines += [f"{key} = {value}" for key, value in sorted(settings.items())]
    conf.write_text("\n".join(lines) + "\n")
    mounts = {path for value in settings.values() for path in local_paths(value)}
    print(f"--volume={conf.resolve()}:/etc/pip.conf:ro")
    for path in sorted(mounts):
        # The real file behind a link (/etc/ssl/certs/... often is one), at the path pip reads.
        print(f"--volume={path.resolve()}:{path}:ro")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
