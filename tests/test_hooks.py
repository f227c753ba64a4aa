"""Hooks: called at the right points, from Python and from the config, and resumed exactly."""

from __future__ import annotations

import json
import re
import textwrap

import pytest
import torch
from conftest import ROOT, TINY_RUN, run_script
from test_resume import SignalAt, assert_same_state, one_thread, tiny_trainer  # noqa: F401

from fcnseg.engine.hooks import Hook
from fcnseg.engine.loggers import ExperimentLogger, LoggerGroup
from fcnseg.engine.trainer import TrainingInterrupted
from fcnseg.utils.checkpoint import load_checkpoint


class Recorder(Hook):
    """Notes every call with the iteration it saw."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def before_train(self) -> None:
        self.calls.append(("before_train", self.trainer.iteration))

    def after_step(self) -> None:
        self.calls.append(("after_step", self.trainer.iteration))

    def after_eval(self, metrics) -> None:
        self.calls.append(("after_eval", self.trainer.iteration, metrics["miou"]))

    def after_train(self) -> None:
        self.calls.append(("after_train", self.trainer.iteration, self.trainer.outcome))


class LossTally(Hook):
    """A hook with state: the running sum of every step's loss and the losses' squares."""

    def __init__(self) -> None:
        self.tally = torch.zeros(2, dtype=torch.float64)

    def after_step(self) -> None:
        loss = self.trainer.last_loss
        self.tally += torch.tensor([loss, loss * loss], dtype=torch.float64)

    def state_dict(self):
        return {"tally": self.tally.clone()}

    def load_state_dict(self, state) -> None:
        self.tally = state["tally"].clone()


def test_hooks_are_called_at_each_step_and_evaluation(tmp_path):
    recorder = Recorder()
    trainer = tiny_trainer(tmp_path, hooks=[recorder], max_iters=6, eval_interval=4)
    metrics = trainer.fit()
    # Independently of the engine: steps 1-6, evaluations at every 4th step and at the end.
    evaluated = [i for i in range(1, 7) if i % 4 == 0 or i == 6]
    expected = [("before_train", 0)]
    for i in range(1, 7):
        expected.append(("after_step", i))
        if i in evaluated:
            expected.append(("after_eval", i))
    expected.append(("after_train", 6, "finished"))
    assert [call[:3] if call[0] == "after_train" else call[:2] for call in recorder.calls] == [
        e if e[0] == "after_train" else e[:2] for e in expected
    ]
    assert recorder.calls[-2][2] == metrics["miou"]  # the last evaluation's metrics
    # The engine's evaluation saw the step the user's hook saw: metrics.json is that evaluation.
    assert json.loads((tmp_path / "metrics.json").read_text())["miou"] == metrics["miou"]


def test_a_failed_run_still_calls_after_train(tmp_path):
    recorder = Recorder()
    trainer = tiny_trainer(tmp_path, hooks=[recorder])

    def fail(*batch):
        raise RuntimeError("out of memory")

    trainer.run_step = fail
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.fit()
    assert recorder.calls[-1] == ("after_train", 0, "failed")


@pytest.mark.slow
def test_a_hook_resumes_exactly(tmp_path):
    straight_tally = LossTally()
    tiny_trainer(tmp_path / "straight", hooks=[straight_tally]).fit()
    expected = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")

    run_dir = tmp_path / "interrupted"
    first = tiny_trainer(run_dir, hooks=[LossTally()])
    first.train_set = SignalAt(first.train_set, 5)  # SIGTERM while step 3's batch loads
    with pytest.raises(TrainingInterrupted):
        first.fit()
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert saved["iteration"] == 3
    assert saved["hooks"]["LossTally"]["tally"][0] > 0

    resumed_tally = LossTally()
    resumed = tiny_trainer(run_dir, hooks=[resumed_tally], resume=True)
    assert torch.equal(resumed_tally.tally, saved["hooks"]["LossTally"]["tally"])
    resumed.fit()
    got = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert torch.equal(resumed_tally.tally, straight_tally.tally)  # bit-identical sums
    for key in ("model", "optimizer", "hooks"):
        assert_same_state({key: got[key]}, {key: expected[key]})


def test_a_hook_missing_from_the_checkpoint_starts_afresh_and_says_so(tmp_path):
    trainer = tiny_trainer(tmp_path)
    trainer.iteration = 2
    trainer.save("last.pt")
    tally = LossTally()
    tiny_trainer(tmp_path, hooks=[tally], resume=True)
    assert torch.equal(tally.tally, torch.zeros(2, dtype=torch.float64))
    assert (
        "holds no state of hook LossTally: it starts afresh at iteration 2"
        in (tmp_path / "train.log").read_text()
    )


def test_an_object_that_is_not_a_hook_is_refused(tmp_path):
    with pytest.raises(TypeError, match="is not a fcnseg.engine.hooks.Hook"):
        tiny_trainer(tmp_path, hooks=[object()])


def test_two_hooks_with_one_name_are_refused(tmp_path):
    with pytest.raises(TypeError, match="two hooks are named LossTally"):
        tiny_trainer(tmp_path, hooks=[LossTally(), LossTally()])


HOOK_MODULE = '''
import json
from fcnseg.engine.hooks import Hook
from fcnseg.engine.loggers import ExperimentLogger, LoggerGroup


class Steps(Hook):
    """Writes the iterations it was called at to ``path`` when training ends."""

    def __init__(self, path):
        self.path, self.seen = path, []

    def after_step(self):
        self.seen.append(self.trainer.iteration)

    def after_eval(self, metrics):
        self.seen.append(("eval", self.trainer.iteration))

    def after_train(self):
        with open(self.path, "w") as f:
            json.dump({"seen": self.seen, "outcome": self.trainer.outcome}, f)

    def state_dict(self):
        return {"seen": json.dumps(self.seen)}

    def load_state_dict(self, state):
        self.seen = json.loads(state["seen"])
'''


def test_a_hook_from_the_config_is_called_and_resumed(tmp_path):
    (tmp_path / "my_hooks.py").write_text(textwrap.dedent(HOOK_MODULE))
    out = tmp_path / "seen.json"
    hook = f"trainer.hooks=[{{_target_: my_hooks.Steps, path: '{out}'}}]"
    env = {"PYTHONPATH": str(tmp_path)}
    run = tmp_path / "run"
    first = run_script("train.py", *TINY_RUN, hook, f"hydra.run.dir={run}", env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    # TINY_RUN: 2 steps, evaluated at the end.
    assert json.loads(out.read_text()) == {"seen": [1, 2, ["eval", 2]], "outcome": "finished"}
    again = run_script(
        "train.py", *TINY_RUN, hook, f"hydra.run.dir={run}", "trainer.resume=true",
        "trainer.max_iters=3", "trainer.eval_interval=3", env=env,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    # The saved state came back: the resumed run continues the list.
    assert json.loads(out.read_text())["seen"] == [1, 2, ["eval", 2], 3, ["eval", 3]]


def test_a_config_hook_that_is_not_a_hook_is_one_sentence(tmp_path):
    proc = run_script(
        "train.py", *TINY_RUN, "trainer.hooks=[{_target_: collections.OrderedDict}]",
        f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "train.py: error: trainer.hooks[0]: collections.OrderedDict made a OrderedDict, "
        "not a fcnseg.engine.hooks.Hook"
    )
    assert not (tmp_path / "checkpoints").exists()


def test_the_documented_hook_logs_what_it_says(tmp_path):
    """docs/runs.md's example hook, run as written."""
    text = (ROOT / "docs" / "runs.md").read_text()
    source = re.search(r"```python\n# mypkg/hooks.py\n(.*?)```", text, flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(source, "mypkg/hooks.py", "exec"), namespace)
    trainer = tiny_trainer(tmp_path, hooks=[namespace["WeightNorm"](every=3)], max_iters=6)
    logged = []

    class Recording(ExperimentLogger):
        def log_scalars(self, values, step):
            if "train/weight_norm" in values:
                logged.append((step, values["train/weight_norm"]))

    trainer.loggers = LoggerGroup([Recording()])
    trainer.fit()
    # Independently: the norm of the final weights, all of them as one vector.
    everything = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    assert [step for step, _ in logged] == [3, 6]
    assert logged[-1][1] == pytest.approx(float(everything.norm()), rel=1e-5)
