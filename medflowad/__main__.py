"""``python -m medflowad``: the command line, also as ``torchrun ... -m medflowad train ...``."""

from medflowad.cli.app import main

main()
