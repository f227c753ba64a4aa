"""Compare runs class by class: ``python scripts/compare.py RUN_A RUN_B ...``.

Each argument is a run directory (its ``metrics.json``) or a metrics JSON file, such as one
written by ``evaluate.py out=FILE``. Plain argparse rather than Hydra: the arguments are a list
of paths, not configuration.
"""

import argparse

from fcnseg.utils.cli import user_errors
from fcnseg.utils.compare import format_comparison, load_metrics, run_labels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories or metrics JSON files")
    args = parser.parse_args(argv)
    with user_errors("compare.py"):
        metrics = [load_metrics(path) for path in args.runs]
        print(format_comparison(list(zip(run_labels(args.runs), metrics))))


if __name__ == "__main__":
    main()
