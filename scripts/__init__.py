"""The command-line programs, installed as ``fcnseg_cli.scripts`` (``fcnseg-train`` ...).

Each module is a thin Hydra entry point, run from the checkout as ``python scripts/NAME.py``;
pyproject.toml's ``[project.scripts]`` names the same ``main`` functions.
"""
