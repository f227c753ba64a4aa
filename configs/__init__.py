"""The Hydra configs, installed as the package ``fcnseg_cli.configs``.

Hydra reads an installed program's configs from ``pkg://fcnseg_cli.configs`` and requires this
file to do so; the YAML files beside it are the package's data.
"""
