"""Where the benchmarks find the shared data: $MEDFLOWAD_DATA, else ../shared/data beside the repository's
working directory (as the tests do); environment variables inside it are expanded."""

import os
from pathlib import Path


def data_root() -> Path:
    return Path(os.path.expandvars(os.environ.get("MEDFLOWAD_DATA", "../shared/data")))
