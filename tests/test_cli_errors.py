"""What Hydra refuses on a command line is one sentence and exit status 2, in every script.

A mistyped key names the key meant, a missing group option lists the options, an override that
does not parse is named; Hydra's own report (several lines, advising to append the key with +)
never reaches the user.
"""

from __future__ import annotations

import pytest
from conftest import CONFIGS, SCRIPTS, compose_config, run_script
from fcnseg_cli.scripts import config_error, config_groups
from hydra.errors import HydraException
from omegaconf import DictConfig

#: every script that composes a Hydra config.
HYDRA_SCRIPTS = sorted(p.name for p in SCRIPTS.glob("*.py") if "@hydra.main(" in p.read_text())


def refusal(script: str, *args: str, cwd) -> str:
    """The one line ``script`` prints for ``args``, after checking it is all that happened."""
    proc = run_script(script, *args, cwd=cwd)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"{script}: error: ")
    assert not list(cwd.iterdir())  # no run directory, no outputs folder
    return lines[0].removeprefix(f"{script}: error: ")


def options(group: str) -> str:
    return ", ".join(sorted(p.stem for p in (CONFIGS / group).glob("*.yaml")))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["trainer.max_iter=5"], "trainer.max_iter: no such key; did you mean trainer.max_iters?"),
        (["dataset.crop_sise=48"],
         "dataset.crop_sise: no such key; did you mean dataset.crop_size?"),
        (["backbone=vgg17"],
         f"backbone=vgg17: no such option; the options are {options('backbone')}"),
    ],
)  # fmt: skip
def test_train_names_the_key_meant_or_the_options(tmp_path, args, expected):
    assert refusal("train.py", *args, cwd=tmp_path) == expected


@pytest.mark.parametrize("script", HYDRA_SCRIPTS)
def test_every_script_names_the_key_meant(tmp_path, script):
    # A key of the script's own config, one level down where there is one, mistyped with a
    # letter too many.
    cfg = compose_config(config_name=script.removesuffix(".py"))
    keys = [
        f"{name}.{key}" if key else name
        for name, node in cfg.items()
        for key in (node if isinstance(node, DictConfig) else [""])
        if not key.startswith("_")
    ]
    meant = max(keys, key=lambda key: key.count("."))
    assert refusal(script, f"{meant}x=1", cwd=tmp_path) == (
        f"{meant}x: no such key; did you mean {meant}?"
    )


def compose_error(*overrides: str) -> HydraException:
    with pytest.raises(HydraException) as err:
        compose_config(list(overrides))
    return err.value


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["backbon=vgg16"], "backbon: no such key; did you mean backbone?"),
        # experiment's options set top-level keys: the group itself is not a key of the config.
        (["experimnt=camvid_cpu"], "experimnt: no such key; did you mean experiment?"),
        (["trainer.foo.bar=1"], "trainer.foo.bar: no such key; the keys of trainer are max_iters"),
        (["dataset.builder.num_sample=3"],
         "dataset.builder.num_sample: no such key; did you mean dataset.builder.num_samples?"),
        (["logger=[tensorboard,cvs]"],
         f"logger=cvs: no such option; the options are {options('logger')}"),
        (["+trainer.max_iters=5"], "trainer.max_iters is already set: override it without the +"),
        (["trainer.max_iters=[1,"], "cannot read the override 'trainer.max_iters=[1,': no viable"),
        (["trainer.max_iters"], "cannot read the override 'trainer.max_iters': missing EQUAL"),
        (["hydra.run.dirr=out"], "hydra.run.dirr: no such key; did you mean hydra.run.dir?"),
    ],
)  # fmt: skip
def test_each_refusal_is_one_sentence(overrides, expected):
    message = config_error(compose_error(*overrides), groups=config_groups("train"))
    assert message.startswith(expected)
    assert "\n" not in message and "To append" not in message and "full_key" not in message
