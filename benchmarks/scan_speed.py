"""Seconds per stage of scoring given scans in-process with a model, and the process's peak memory.

    MEDFLOWAD_DATA=/path/to/data python benchmarks/scan_speed.py \
        $MEDFLOWAD_DATA/medical/nifti_samples/kirby21_113_visit2/113-02-FLAIR_processed_reg.nii.gz [--model demo]

Runs :func:`medflowad.bench.speed.scan_stages` (read, prepare, models, maps back to the scan's grid, gzipped
NIfTI writes of three maps; median over a second round, the first fills the preparation cache) in a fresh
process, so the peak resident memory is that of scoring alone. The uncached preparation (brain extraction,
and registration for standard-space models) is reported on its own, as ``prepare_uncached_seconds``.
"""

import argparse
import json
import tempfile
from pathlib import Path

from medflowad.bench.speed import machine, scan_stages
from medflowad.devices import resolve_device
from medflowad.mri.model import load_mri_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scans", type=Path, nargs="+")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    model = load_mri_model(args.model, str(device))
    with tempfile.TemporaryDirectory() as out:
        result = scan_stages(model, args.scans, device, Path(out))
    print(json.dumps({"machine": machine(device), **result}, indent=2))


if __name__ == "__main__":
    main()
