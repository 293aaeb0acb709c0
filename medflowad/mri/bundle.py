"""Export an MRI model folder as a MONAI bundle that MONAI's bundle runner executes.

Layout of the bundle::

    configs/metadata.json    MONAI bundle metadata (versions, task, input/output description)
    configs/inference.json   the inference workflow: read scans -> both Glows -> maps, tables, report
    configs/logging.conf     plain console logging for the runner
    models/                  the medflowad model folder (safetensors weights, YAML configs, calibration)
    docs/README.md           how to run it

Run it with::

    python -m monai.bundle run --config_file BUNDLE/configs/inference.json \\
        --bundle_root BUNDLE --input_dir SCANS --output_dir OUT

The workflow calls the same functions as ``medflowad score`` (``model`` loads both Glows with their
weights and calibration), so the maps are the same as ``score`` writes. medflowad must be installed where
the bundle runs; MONAI's runner also needs ``fire``. Configs are JSON and weights safetensors: loading the
bundle unpickles nothing, but like any MONAI bundle its config runs Python expressions, so run bundles only
from people you trust.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import monai
import numpy as np
import torch

from medflowad import __version__
from medflowad.mri.model import MRI_CONFIG, SCORING_FILES, load_mri_model, resolve_model_dir
from medflowad.storage import write_json, write_text

_LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def inference_config(fpr: float) -> dict:
    """The bundle's inference.json: ``run`` scores ``input_dir`` into ``output_dir`` like ``medflowad score``."""
    return {
        "imports": ["$import torch", "$from medflowad.mri.model import load_mri_model",
                    "$from medflowad.mri.score import score_scans"],
        "bundle_root": ".",
        "model_dir": "$@bundle_root + '/models'",
        "input_dir": "$@bundle_root + '/input'",
        "output_dir": "$@bundle_root + '/output'",
        "device": "$'cuda' if torch.cuda.is_available() else 'cpu'",
        "fpr": fpr,
        "batch_size": 64,
        "report": True,
        "model": "$load_mri_model(@model_dir, @device)",
        "scores": "$score_scans([@input_dir], @model_dir, @output_dir, device=@device, "
                  "batch_size=@batch_size, fpr=@fpr, model=@model, report=@report)",
        "run": ["$print('scored', len(@scores.rows), 'scans into', @output_dir)"],
    }


def metadata(model_dir: Path, config: dict) -> dict:
    """MONAI bundle metadata. The workflow's input is a whole scan on its own grid (any size and value range:
    medflowad prepares it) and its output maps lie on that grid, so neither has a fixed shape ("*")."""
    size = config["model"]["image_size"]
    scanner = "CT" if config["modality"] == "ct" else "MR"
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by medflowad {__version__} from {model_dir.name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"medflowad": __version__, "fire": ">=0.5"},
        "optional_packages_version": {},
        "name": f"medflowad {config['modality']} anomaly detection",
        "task": f"Unsupervised anomaly detection in {config['modality'].upper()} brain {scanner} scans: scan "
                "scores, p-values and voxel anomaly maps from the likelihood ratio of two Glow models",
        "description": "Axial slices, prepared to {s}x{s} pixels with values in [-0.5, 0.5), are scored by the "
                       "log-likelihood ratio llr = log p_general(x) - log p_in(x) (higher: less like the healthy "
                       "scans; an in-distribution Glow trained on healthy scans against a general-distribution Glow "
                       "trained on a pool of many kinds of scans); per-pixel contributions give the anomaly map, "
                       "written as NIfTI on each scan's own grid.".format(s=size[0]),
        "authors": "medflowad developers",
        "copyright": "MIT licence (code); see the model folder's own notes for the training data",
        "data_type": "nifti, dicom, nrrd, mha",
        "intended_use": "Research only; not for clinical use.",
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": scanner, "num_channels": 1,
                "spatial_shape": ["*", "*", "*"], "dtype": "float32", "value_range": [], "is_patch_data": False,
                "channel_def": {"0": "a whole scan on its own grid (NIfTI, NRRD, MHA or a DICOM series), as the "
                                     "scanner wrote it"},
            }},
            "outputs": {"pred": {
                "type": "image", "format": "log-likelihood ratio map", "num_channels": 1,
                "spatial_shape": ["*", "*", "*"], "dtype": "float32", "value_range": [], "is_patch_data": False,
                "channel_def": {"0": "per-voxel llr contribution (nats), on the input scan's grid"},
            }},
        },
    }


def export_monai_bundle(model: str | Path, out: Path, overwrite: bool = False) -> Path:
    """Write the bundle for ``model`` (a folder or bundled name) to ``out``; returns ``out``.

    The bundle is assembled in a temporary folder beside ``out`` and renamed into place, so ``out`` is
    either complete or absent.
    """
    model_dir = resolve_model_dir(model)
    loaded = load_mri_model(model_dir, device="cpu")  # validates the folder before anything is written
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (choose another --out or pass --overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    config = loaded.config.to_dict()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name in SCORING_FILES:
            target = staging / "models" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(model_dir / name, target)
        write_json(staging / "configs" / "metadata.json", metadata(model_dir, config))
        write_json(staging / "configs" / "inference.json", inference_config(config["fpr"]))
        write_text(staging / "configs" / "logging.conf", _LOGGING_CONF)
        write_text(staging / "docs" / "README.md", _readme(config))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _readme(config: dict) -> str:
    return f"""# medflowad {config['modality']} anomaly-detection bundle

Exported by medflowad {__version__}. Needs `pip install medflowad fire` (MONAI comes with medflowad).

    python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\
        --input_dir /path/to/scans --output_dir /path/to/output

Inputs: NIfTI, NRRD, MHA files or DICOM series folders ({config['modality']}). Outputs, as from
`medflowad score --report`: `<scan>_anomaly.nii.gz` (llr map), `<scan>_last_scale.nii.gz`,
`<scan>_anomaly_mask.nii.gz` on each scan's own grid; `scores.csv`, `slices.csv`, `scores.json`,
`report.html`. Override `fpr` (default {config['fpr']}), `device` or `batch_size` the same way
(`--fpr 0.01`). `models/` is a medflowad model folder: `medflowad score --model models` uses it directly.
The model folder's `{MRI_CONFIG}` holds the preprocessing it was trained with.

Research use only; not a medical device.
"""
