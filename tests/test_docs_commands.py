"""Every training command in README.md and docs/*.md composes, and every one presented as a
multi-GPU, cluster or Docker job trains real data on a real backbone.

The commands are read from the Markdown as a user would copy them (code blocks and inline code,
line continuations joined, comments dropped); each one's overrides are composed with Hydra's
compose API (nothing is trained).
"""

from __future__ import annotations

import re
import shlex

import pytest
from conftest import CONFIGS, ROOT
from hydra import compose, initialize_config_dir

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LAUNCHERS = ("torchrun", "srun", "sbatch", "docker compose", "docker run")
# After one of these, the rest of a command is train.py's overrides.
ENTRY = re.compile(r"scripts/train\.py|docker compose [^\n]*? run --rm train\b")
SYNTHETIC = ("synthetic",)
TINY_BACKBONES = ("vgg_tiny", "vgg_tiny_encoder")


def fragments(text: str) -> list[str]:
    """Code blocks and inline code spans, continuation lines joined; of a ``console`` block,
    the lines typed at the prompt (``$ ``), not the output."""
    blocks = []
    for language, body in re.findall(r"```([^\n]*)\n(.*?)```", text, flags=re.S):
        if language.strip() == "console":
            body = "\n".join(line[2:] for line in body.splitlines() if line.startswith("$ "))
        blocks.append(body)
    rest = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = re.findall(r"`([^`\n]+)`", rest)
    return [piece.replace("\\\n", " ") for piece in (*blocks, *spans)]


def commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for fragment in fragments(doc.read_text()):
            for line in fragment.splitlines():
                line = re.sub(r"\s#\s.*$", "", line).strip()
                if ENTRY.search(line) and not line.startswith("#"):
                    found.append((doc.name, line))
    return found


COMMANDS = commands()


def overrides(line: str) -> list[str]:
    tail = line[ENTRY.search(line).end() :]
    try:
        words = shlex.split(tail)
    except ValueError:  # an unbalanced quote in a prose fragment: take it word by word
        words = tail.split()
    keep = []
    for word in words:
        if word in ("...", "-m", "--multirun") or word.startswith(("[", "|", ">", "&")):
            continue
        if "=" not in word:
            break  # the command ended (a pipe, another command, prose)
        key, _, value = word.partition("=")
        if "," in value and not value.startswith(("[", "{")):
            value = value.split(",")[0]  # a sweep: its first combination
        keep.append(f"{key}={value}")
    return keep


def test_the_docs_hold_training_commands():
    assert len(COMMANDS) > 20
    assert any(any(tool in line for tool in LAUNCHERS) for _, line in COMMANDS)


@pytest.mark.parametrize(("doc", "line"), COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_every_training_command_composes(doc, line):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=overrides(line), return_hydra_config=True)
    if any(tool in line for tool in LAUNCHERS):
        choices = cfg.hydra.runtime.choices
        assert cfg.dataset.name not in SYNTHETIC, (
            f"{doc}: a {line.split()[0]} job on synthetic data"
        )
        assert choices["backbone"] not in TINY_BACKBONES, f"{doc}: a launched job on vgg_tiny"
