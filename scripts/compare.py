"""Compare runs class by class: ``python scripts/compare.py RUN_A RUN_B ...``.

Each argument is a run directory (its ``metrics.json``) or a metrics JSON file, such as one
written by ``evaluate.py out=FILE``. ``--sweep FOLDER`` ranks every run of a sweep
(``train.py -m ...``) by mIoU, with the overrides that made each. Plain argparse rather than
Hydra: the arguments are paths, not configuration.
"""

import argparse

from fcnseg.utils.cli import user_errors
from fcnseg.utils.compare import (
    format_comparison,
    format_sweep,
    load_metrics,
    run_labels,
    run_overrides,
    sweep_runs,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", help="run directories or metrics JSON files")
    parser.add_argument("--sweep", help="rank every run under this folder by mIoU")
    args = parser.parse_args(argv)
    if bool(args.sweep) == bool(args.runs):
        parser.error("give run directories or --sweep FOLDER")
    with user_errors("compare.py"):
        if args.sweep:
            runs = sweep_runs(args.sweep)
            names = [str(run.relative_to(args.sweep)) for run in runs]
            table = [(n, run_overrides(r), load_metrics(r)) for n, r in zip(names, runs)]
            print(format_sweep(table))
            return
        metrics = [load_metrics(path) for path in args.runs]
        print(format_comparison(list(zip(run_labels(args.runs), metrics))))


if __name__ == "__main__":
    main()
