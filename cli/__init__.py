"""The ``medflowad`` command line (installed as the package ``medflowad.cli``)."""
