"""Protocol B (PROTOCOL.md): LGG FLAIR lesion detection with the fixed patient split, against baselines.

Everything lands in OUT and is reused when present:

Preparation: LGG's affine is nominal (no spacing or orientation in the release), and affine registration to
the MNI template fails on it: the brain lands turned by 90 degrees and squashed along the slice axis, which
the scaling check refuses (benchmarks/preparation_check.py), so the bench prepares
in native space with deepbet brain extraction by default (``space``/``brain``): the in-plane
standardisation PROTOCOL.md allows for LGG. The skull is then in no image, map or metric, and the
intensity baseline is measured on the same prepared brain voxels as the models. The brain-volume check is
off there, since nominal voxel sizes give no physical volume.

- ``pool/``: general pool from the 2D brain tumour MRI set (Training split, all classes), head CT, the
  NIfTI samples, the IXI T1 heads and (``pool_train_flair``) every slice of the FLAIR scans the
  in-distribution models train on, lesion or not; never anything from the test patients or the patients
  held apart for calibration;
- ``flair/``: general + in-distribution models on the lesion-free slices of the train patients
  (``flair_outlier/``: the same in-distribution model trained with the outlier loss);
- ``eval/``: slice- and voxel-level metrics of the test patients for every score, the FLAIR
  intensity baseline and the slice-position baseline, in ``results.md`` and ``metrics.json``;
  ``maps/``: the test patients' NIfTI maps;
  ``overlays/``: image, lesion contour and maps for a few test slices;
- ``tumor2d/``: the 2D set, notumor (Training) as in-distribution, slice AUROC of notumor (Testing)
  against each tumour class (Testing), Testing images with a pixel-identical Training twin dropped.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from medflowad.bench.overlays import lesion_overlays
from medflowad.bench.stages import Stages
from medflowad.data.scans import prepare_image_2d
from medflowad.data.slice_sets import load_slice_set_manifest
from medflowad.devices import resolve_device
from medflowad.mri.analysis import analyse_slices
from medflowad.mri.config import load_mri_config
from medflowad.mri.evaluate import SLICE_BASELINES, evaluate_scans, slice_table
from medflowad.mri.pool import build_pool
from medflowad.mri.score import score_scans
from medflowad.mri.selection import split_healthy_scans
from medflowad.mri.training import mri_run_config, train_mri_model
from medflowad.storage import load_model, write_json, write_text
from medflowad.training import train

LESION_MASKS = ("_flair", "_mask")
TUMOR_ZIP = "brain_tumor_mri_2d.zip"


@dataclass
class MriBenchSettings:
    data: str = "$MEDFLOWAD_DATA"
    config: str = "mri_cpu"
    split: str | None = None  # TSV patient<TAB>split; default: the fixed split shipped with medflowad
    general_steps: int = 600
    in_steps: int = 400
    tumor_steps: int = 300  # fine-tuning of the 2D notumor model
    channels_last: bool | None = None  # None: as the config says
    outlier: bool = True
    pool_train_flair: bool = True  # PROTOCOL B's optional pool part: the train patients' FLAIR slices
    tumor_2d: bool = True
    overlays: int = 4
    device: str = "auto"
    space: str | None = "native"  # None: as the config says
    brain: str | None = "deepbet"


def read_split(path: str | None, default: str = "lgg_flair_split.tsv") -> dict[str, list[str]]:
    """{"train": [...], "test": [...]} from a TSV of name<TAB>split (a header line and # comments are skipped);
    ``path`` None reads the fixed split ``default`` shipped with medflowad."""
    text = Path(path).read_text() if path else (resources.files("medflowad.presets_data") / default).read_text()
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    return {name: [row[0] for row in rows if len(row) > 1 and row[1].strip() == name] for name in ("train", "test")}


def run_mri_bench(settings: MriBenchSettings, out: Path, show_progress: bool = True,
                  echo: Callable[[str], None] = print) -> dict:
    started = time.perf_counter()
    out = Path(out)
    medical = Path(os.path.expandvars(settings.data)) / "medical"
    if not medical.is_dir():
        raise ValueError(f"{medical}: no such folder (set MEDFLOWAD_DATA or --data)")
    config = load_mri_config(settings.config)
    config.general_steps, config.in_steps, config.device = settings.general_steps, settings.in_steps, settings.device
    if settings.channels_last is not None:
        config.channels_last = settings.channels_last
    config.preprocessing = config.preprocessing.overridden(space=settings.space, brain=settings.brain)
    if config.preprocessing.space == "native":  # nominal voxel sizes: no physical brain volume to check
        config.preprocessing = dataclasses.replace(config.preprocessing, brain_volume_ml=None)
    split = read_split(settings.split)
    lgg = medical / "lgg_flair128"
    train_scans = [lgg / f"{p}_flair.nii.gz" for p in split["train"]]
    test_scans = [lgg / f"{p}_flair.nii.gz" for p in split["test"]]
    stages = Stages(echo)

    pool = out / "pool"
    # The calibration patients stay out of the pool, so that their healthy slices remain unseen by both models.
    pool_flair = (split_healthy_scans(train_scans, config, mask_replace=LESION_MASKS)[0]
                  if settings.pool_train_flair else [])
    stages.run("building the general pool", (pool / "manifest.json").exists(), lambda: build_pool(
        general_pool_sources(medical, pool_flair), pool, config.preprocessing))
    _check_pool_flair(pool, train_scans, pool_flair)
    stages.run("training the FLAIR models", (out / "flair" / "calibration.safetensors").exists(),
               lambda: train_mri_model(config, train_scans, out / "flair", pool=pool, mask_replace=LESION_MASKS,
                                       show_progress=show_progress, echo=echo))
    models = {"": out / "flair"}
    if settings.outlier:
        outlier_config = dataclasses.replace(config, outlier=dataclasses.replace(config.outlier, enabled=True))
        stages.run("training the FLAIR model with the outlier loss",
                   (out / "flair_outlier" / "calibration.safetensors").exists(), lambda: train_mri_model(
                       outlier_config, train_scans, out / "flair_outlier", pool=pool,
                       general_model=out / "flair" / "general", mask_replace=LESION_MASKS,
                       show_progress=show_progress, echo=echo))
        models["_outlier"] = out / "flair_outlier"

    evaluations = {}
    for suffix, model_dir in models.items():
        echo(f"evaluating {model_dir.name} on {len(test_scans)} test patients")
        evaluations[suffix] = evaluate_scans(model_dir, test_scans, LESION_MASKS, out / f"eval{suffix}",
                                             device=settings.device)
    # Maps and overlays come from the last model trained: the outlier-loss one when there is one.
    best = list(models.values())[-1]
    echo(f"writing the test patients' maps and overlays ({best.name})")
    shutil.rmtree(out / "maps", ignore_errors=True)  # the bench's own maps, remade whole: the model may be new
    score_scans(test_scans, best, out / "maps", device=settings.device)
    lesion_overlays(best, test_scans, out / "overlays", settings.overlays, settings.device, LESION_MASKS,
                    (("llr map", "llr"), ("llr map, finest scale (llr_c1)", "llr_c1"),
                     ("intensity baseline", "intensity"), ("robust z against the scan's brain", "intensity_scan_z"),
                     ("the scan z where the llr agrees: min of the two z", "scan_z_and_llr")))
    tumor = (_tumor_2d(medical, out, config, settings.tumor_steps, show_progress, settings.device, echo)
             if settings.tumor_2d else None)

    result = {"settings": vars(settings), "lesion": _merge(evaluations), "tumor_2d": tumor,
              "timings": {**stages.timings, "total_s": round(time.perf_counter() - started, 1)},
              "torch_threads": torch.get_num_threads()}
    write_json(out / "metrics.json", result)
    write_text(out / "results.md", mri_markdown(result))
    return result


def general_pool_sources(medical: Path, pool_flair: list[Path]) -> list[str | Path]:
    """What protocol B's general pool is built from: the 2D tumour set's Training split, head CT, the NIfTI
    samples, the IXI T1 heads (not their DLMUSE label maps) and ``pool_flair``, LGG FLAIR scans (every slice)."""
    ixi = sorted((medical / "ixi_t1_2mm").glob("*_T1.nii.gz"))
    return [f"{medical / TUMOR_ZIP}::Training", medical / "head_ct", medical / "nifti_samples", *ixi, *pool_flair]


def _check_pool_flair(pool: Path, train_scans: list[Path], expected: list[Path]) -> None:
    """Refuse to reuse a pool built with other train FLAIR scans than these settings ask for. Paths are
    compared resolved, so a data folder named relatively once and absolutely the next time still matches."""
    candidates = {p.resolve() for p in train_scans}
    sources = (Path(s["path"]).resolve() for s in load_slice_set_manifest(pool).get("sources", []))
    found = sorted(p for p in sources if p in candidates)
    if found != sorted(p.resolve() for p in expected):
        raise ValueError(f"{pool}: holds {len(found)} train FLAIR scans, these settings need {len(expected)} "
                         "(--pool-train-flair and the split decide them); use another --out or delete the pool "
                         "and the models trained on it")


def _merge(evaluations: dict[str, dict]) -> dict:
    """One table: baseline and scores of the plain model, plus the model-based scores with the outlier loss."""
    base = evaluations[""]
    merged = {k: base[k] for k in ("scans", "slices", "lesion_slices", "voxels", "lesion_voxels", "fpr")}
    merged["slice"], merged["voxel"] = dict(base["slice"]), dict(base["voxel"])
    for suffix, ev in evaluations.items():
        if suffix:
            merged["slice"].update({f"{k}{suffix}": v for k, v in ev["slice"].items() if k not in SLICE_BASELINES})
            merged["voxel"].update({f"{k}{suffix}": v for k, v in ev["voxel"].items() if k != "intensity"})
    return merged


def mri_markdown(result: dict) -> str:
    lesion = result["lesion"]
    lines = [f"### LGG FLAIR lesions: {lesion['scans']} test patients, {lesion['slices']} scored slices "
             f"({lesion['lesion_slices']} with lesion)", "", *slice_table(lesion["slice"])]
    lines += ["", f"| voxel map | AUPRC | Dice at {lesion['fpr']:.0%} healthy FPR | test healthy voxels flagged there "
              "| best Dice (optimistic) |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {m['auprc']:.3f} | {m['dice_at_healthy_fpr']:.3f} | "
              f"{m.get('healthy_fpr_realised', float('nan')):.3f} | {m['best_dice_optimistic']:.3f} |"
              for n, m in lesion["voxel"].items()]
    if result["tumor_2d"]:
        tumor = result["tumor_2d"]
        lines += ["", f"### 2D brain tumour MRI: notumor (Testing, n={tumor['notumor_test']}) against each class "
                  f"({tumor['dropped_duplicates']} Testing images with a Training twin dropped)", "",
                  "| class | n | " + " | ".join(tumor["scores"]) + " |", "|---|---|" + "---|" * len(tumor["scores"])]
        for cls, row in tumor["classes"].items():
            lines.append(f"| {cls} | {row['n']} | " + " | ".join(f"{row[s]:.3f}" for s in tumor["scores"]) + " |")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in result["timings"].items())]
    return "\n".join(lines) + "\n"


def _tumor_2d(medical: Path, out: Path, config, steps: int, show_progress: bool, device: str, echo) -> dict:
    """notumor (Training) as in-distribution, fine-tuned from the FLAIR run's general model."""
    archive_path = medical / TUMOR_ZIP
    twins = _testing_with_training_twin(medical / "brain_tumor_mri_2d_duplicates.tsv")
    folder = out / "tumor2d"
    slices = folder / "notumor_train"
    if not (slices / "manifest.json").exists():
        echo("preparing the 2D notumor training set")
        build_pool([f"{archive_path}::Training/notumor"], slices, config.preprocessing)
    model_dir = folder / "model"
    run = mri_run_config(dataclasses.replace(config, device=device), str(slices), steps, config.in_lr,
                         init_from=str(out / "flair" / "general"))
    if not (model_dir / "model.safetensors").exists():
        echo("fine-tuning the 2D notumor model")
    train(run, model_dir, show_progress=show_progress)
    in_model = load_model(model_dir, resolve_device(device))[0]
    general = load_model(out / "flair" / "general", resolve_device(device))[0]

    scores: dict[str, dict[str, list]] = {}
    dropped = 0
    with zipfile.ZipFile(archive_path) as archive:
        for member in sorted(archive.namelist()):
            parts = member.split("/")
            if len(parts) != 3 or parts[0] != "Testing" or not member.lower().endswith(".png"):
                continue
            if member in twins:
                dropped += 1
                continue
            with Image.open(io.BytesIO(archive.read(member))) as img:
                prepared = prepare_image_2d(np.asarray(img.convert("L"), dtype=np.float32), config.preprocessing)
            if prepared is None:
                continue
            scores.setdefault(parts[1], {}).setdefault("_slices", []).append(prepared)
    names = ("llr", "last_scale", "nll")
    per_class: dict[str, dict[str, np.ndarray]] = {}
    for cls, entry in scores.items():
        slice_scores, _ = analyse_slices(torch.stack(entry["_slices"]), in_model, general)
        per_class[cls] = {n: slice_scores[n] for n in names}
    if "notumor" not in per_class:
        raise ValueError(f"{archive_path}: no notumor Testing images")
    normal = per_class["notumor"]
    classes = {}
    for cls, values in per_class.items():
        if cls == "notumor":
            continue
        labels = np.r_[np.zeros(len(normal["llr"])), np.ones(len(values["llr"]))]
        classes[cls] = {"n": len(values["llr"]),
                        **{n: float(roc_auc_score(labels, np.r_[normal[n], values[n]])) for n in names}}
    return {"notumor_test": len(normal["llr"]), "dropped_duplicates": dropped, "scores": list(names),
            "classes": classes}


def _testing_with_training_twin(path: Path) -> set[str]:
    """Testing files whose duplicate group also holds a Training file."""
    groups: dict[str, list[str]] = {}
    with open(path, newline="") as fh:
        for row in csv.reader(fh, delimiter="\t"):
            if len(row) == 2 and row[0] != "group":
                groups.setdefault(row[0], []).append(row[1])
    twins = set()
    for files in groups.values():
        if any(f.startswith("Training/") for f in files):
            twins |= {f for f in files if f.startswith("Testing/")}
    return twins
