"""The command-line programs, installed as ``fcnseg_cli.scripts`` (``fcnseg-train`` ...).

Each module is a thin Hydra entry point, run from the checkout as ``python scripts/NAME.py``;
pyproject.toml's ``[project.scripts]`` names the same ``main`` functions. What they share about
Hydra lives here (a module beside them would be a command of its own), imported as
``fcnseg_cli.scripts`` both ways: a checkout's editable install maps that name to this folder.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra._internal.utils as hydra_utils
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from fcnseg.errors import UserError
from fcnseg.utils.cli import user_errors

#: the configs of every script (``config_path="../configs"``), in a checkout and once installed.
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def reports_config_errors(main: Callable[..., Any]) -> Callable[..., Any]:
    """Turns what Hydra refuses on the command line into one sentence and exit status 2.

    Goes above ``@hydra.main``. Hydra composes the config before ``main`` runs, and its own
    report of a mistyped key is several lines that advise appending the key with ``+``; here it
    is ``train.py: error: trainer.max_iter: no such key; did you mean trainer.max_iters?``, the
    way ``user_errors`` reports the errors ``main`` finds itself. A missing group option lists
    the options; an override that does not parse is named. Hydra reports everything else as
    before.
    """
    script = Path(inspect.unwrap(main).__code__.co_filename)

    @functools.wraps(main)
    def run(*args: Any, **kwargs: Any) -> Any:
        hydra_report = hydra_utils.run_and_report

        def report(task: Callable[[], Any]) -> Any:
            def refusing() -> Any:
                try:
                    return task()
                except (ConfigCompositionException, OverrideParseException) as err:
                    # Each script's config is its namesake: train.py composes train.yaml.
                    message = config_error(err, groups=config_groups(script.stem))
                with user_errors(script.name):
                    raise UserError(message)

            return hydra_report(refusing)

        # Hydra composes the config, and reports what it refuses, inside run_and_report, which
        # has no hook: it is replaced while Hydra runs (a private function, stable across the
        # hydra-core 1.3 releases that pyproject.toml admits; tests/test_cli_errors.py).
        hydra_utils.run_and_report = report
        try:
            return main(*args, **kwargs)
        finally:
            hydra_utils.run_and_report = hydra_report

    return run


def config_error(err: Exception, *, groups: Sequence[str] = ()) -> str:
    """One sentence for a config composition error of Hydra's.

    ``groups`` are the config groups a top-level override may choose from, besides the keys.
    """
    if isinstance(err, MissingConfigException):
        return _missing_option(err)
    if isinstance(err, OverrideParseException):
        lines = [line for line in err.message.splitlines() if line.strip()]
        reason = [line for line in lines if not line.startswith(("Error parsing", "See https:"))]
        return f"cannot read the override '{err.override}': {_one_line(' '.join(reason))}"
    text = str(err)
    cause = err.__cause__
    overridden = re.match(r"Could not override '(.+?)'\.", text)
    if overridden and isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        return _no_such_key(
            overridden[1],
            missing=str(getattr(cause, "full_key", None) or overridden[1]),
            keys=list(getattr(cause, "parent_node", None) or []),
            groups=groups,
        )
    if overridden and cause is not None:  # e.g. a value of the wrong type for a typed key
        return f"{overridden[1]}: {_one_line(str(cause))}"
    appended = re.search(r"An item is already at '(.+?)'", text)
    if appended:
        return f"{appended[1]} is already set: override it without the +"
    message = _one_line(text.split("Config search path:")[0])
    return f"{message} ({_one_line(str(cause))})" if cause is not None else message


def _no_such_key(written: str, *, missing: str, keys: Sequence[Any], groups: Sequence[str]) -> str:
    """``written`` (``trainer.max_iter``) names no key: its part ``missing`` is none of
    ``keys``, those at its level; at the top, ``groups`` may be meant too."""
    if not written.startswith(missing):
        missing = written
    level, _, name = missing.rpartition(".")
    rest = written[len(missing) :]
    keys = [k for k in keys if isinstance(k, str)]
    if not level:
        keys += [group for group in groups if group not in keys]
    close = difflib.get_close_matches(name, keys, n=1)
    if close:
        prefix = f"{level}." if level else ""
        return f"{written}: no such key; did you mean {prefix}{close[0]}{rest}?"
    shown = ", ".join(k for k in keys if not k.startswith("_"))
    return f"{written}: no such key; the keys {f'of {level} ' if level else ''}are {shown}"


def _missing_option(err: MissingConfigException) -> str:
    """``backbone=vgg17``: the group has no such option; its options are listed."""
    group, _, name = (err.missing_cfg_file or "").rpartition("/")
    options = list(err.options or [])
    if not options and group and (CONFIGS / group).is_dir():  # e.g. one of a list of options
        options = sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
    if not group or not options:
        return _one_line(str(err).split("Config search path:")[0])
    return f"{group}={name}: no such option; the options are {', '.join(options)}"


def config_groups(config_name: str) -> list[str]:
    """The groups that the config ``config_name`` chooses an option of, from its defaults list
    (``experiment``, whose options set top-level keys, is not a key itself)."""
    try:
        config = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{config_name}.yaml"))
    except (OSError, ValueError):  # no config of that name: the keys alone are suggested
        return []
    defaults = (config.get("defaults") or []) if isinstance(config, dict) else []
    names = [next(iter(entry)) for entry in defaults if isinstance(entry, dict) and entry]
    return [name for name in names if "/" not in name and " " not in name]


def _one_line(text: str) -> str:
    """Hydra's and OmegaConf's message on one line, without OmegaConf's key/type details."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    kept = [line for line in lines if not re.match(r"(full_key|object_type|reference_type)", line)]
    return " ".join(kept)
