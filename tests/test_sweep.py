"""Sweeps: ``train.py -m`` runs every combination in its own directory, ``compare.py --sweep``
ranks them."""

from __future__ import annotations

import json

from conftest import TINY_RUN, run_script


def test_a_multirun_trains_each_combination_and_compare_ranks_them(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_script(
        "train.py", "-m", *TINY_RUN, "trainer.seed=0,1,2", "optimizer.lr=1e-3,1e-4",
        "+backbone.fc_channels=32", "dataset.crop_size=32", f"hydra.sweep.dir={sweep}",
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
    assert [r.name for r in runs] == [str(i) for i in range(6)]
    combos = set()
    for run in runs:
        overrides = (run / ".hydra" / "overrides.yaml").read_text()
        seed = next(o for o in ("seed=0", "seed=1", "seed=2") if o in overrides)
        lr = next(o for o in ("lr=0.001", "lr=1e-3", "lr=0.0001", "lr=1e-4") if o in overrides)
        combos.add((seed, lr))
        assert (run / "checkpoints" / "last.pt").is_file()
    assert len(combos) == 6

    ranked = run_script("compare.py", "--sweep", str(sweep))
    assert ranked.returncode == 0, ranked.stderr
    rows = ranked.stdout.strip().splitlines()[2:]
    assert len(rows) == 6
    # Best mIoU first: the rows are the runs' own metrics.json, in descending order.
    miou = {r.name: json.loads((r / "metrics.json").read_text())["miou"] for r in runs}
    order = sorted(miou, key=miou.get, reverse=True)
    assert [row.split()[0] for row in rows] == order
    for row in rows:
        assert f"{100 * miou[row.split()[0]]:.2f}" == row.split()[1]
        assert "trainer.seed=" in row and "optimizer.lr=" in row
