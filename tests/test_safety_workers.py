"""A failure while loader workers run ends the script promptly, with its one sentence: the
workers are shut down on the way out, not left to a garbage collection."""

from __future__ import annotations

import fixtures as fx
import pytest
from conftest import run_script
from test_evaluate import make_checkpoint

TIMEOUT = 120  # seconds; a run that left its workers hanging would never end


@pytest.fixture(scope="module")
def broken_camvid(tmp_path_factory):
    """CamVid whose second val photo is not an image, and a checkpoint trained on it."""
    base = tmp_path_factory.mktemp("broken")
    root = fx.write_camvid(base / "CamVid", splits={"train": 1, "val": 4})
    make_checkpoint(base / "model.pt", "dataset=camvid", f"dataset.root={root}", data=())
    bad = sorted((root / "val").iterdir())[1]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return base, root, bad


def test_evaluate_with_workers_exits_2_on_a_corrupt_image(broken_camvid):
    base, _, bad = broken_camvid
    run = run_script(
        "evaluate.py", f"checkpoint={base / 'model.pt'}", "trainer.device=cpu",
        "trainer.num_workers=2", cwd=base, timeout=TIMEOUT,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    (line,) = [x for x in run.stderr.splitlines() if x.startswith("evaluate.py: error:")]
    assert line.startswith(f"evaluate.py: error: image {bad} cannot be decoded (")
    assert "BytesIO" not in line and "Traceback" not in run.stderr


def test_inspect_data_with_workers_reports_and_exits_1(broken_camvid):
    base, root, bad = broken_camvid
    run = run_script(
        "inspect_data.py", "dataset=camvid", f"dataset.root={root}", "num_workers=2", cwd=base,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr[-3000:]
    assert f"unreadable: image {bad} cannot be decoded" in run.stdout
    assert "1 problem(s) found" in run.stdout
