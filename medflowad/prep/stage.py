"""The preparation stage: a scan as read -> the slices a model sees, and what is needed to map results back.

``preprocessing.space`` chooses the way:

- ``native`` with ``brain: auto``: the scan's own grid and intensity foreground (medflowad's first
  preparation, :func:`medflowad.data.scans.prepare_scan`); nothing to cache.
- ``native`` with ``brain: deepbet`` (or a given mask): the same grid, cropped to the extracted brain, the
  skull removed. This is the in-plane standardisation for scans whose geometry cannot be trusted (LGG's
  nominal affine).
- ``standard``: optional N4 bias-field correction, brain extraction, 12-parameter affine registration of
  the brain to the MNI template, resampling onto the standard grid (:mod:`medflowad.prep.template`), and
  normalisation inside the brain. Maps return through the inverse transform (:func:`to_native`).

The expensive results (brain mask, transform, standard-space image) are cached on disk, keyed by the scan's
voxels and affine and by the settings that shape them, in readable files: NIfTI, an ITK text transform and
JSON (never pickles). A rerun, or another command that prepares the same scan, reads them back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk  # noqa: N813 (the library's own convention)
import torch
from monai.data import MetaTensor
from monai.transforms import ResampleToMatch

from medflowad.data.readers import ScanError, absolute_scan_path, load_scan
from medflowad.data.scans import (
    PreparedScan,
    ScanPreprocessing,
    percentile_normalised,
    prepare_scan,
    volume_to_display,
)
from medflowad.prep.brain import check_brain_mask, extract_brain
from medflowad.prep.n4 import N4_VERSION, n4_correct
from medflowad.prep.registration import ras_to_itk, register_affine, resample, supersampling
from medflowad.prep.template import TEMPLATE_FILE, load_template, standard_grid
from medflowad.storage import current_umask

# part of every cache key: bump when brain extraction or normalisation change (2: scans with negative values, such as
# z-scored ones, get their zero background at their minimum before brain extraction, and the skull is removed to the
# brain's darkest value instead of 0)
PREP_VERSION = 2
REGISTRATION_VERSION = 2  # part of standard-space keys: bump when registration or resampling change
STANDARD_IMAGE_VERSION = 2  # part of standard-space keys: bump when the cached image changes (2: not clipped at 1)
CACHE_ENV = "MEDFLOWAD_CACHE"
ENTRY_FILES = {  # file -> what it holds (also written into preparation.json)
    "brain_mask.nii.gz": "brain mask on the scan's own grid (uint8)",
    "n4.nii.gz": "the scan after N4 bias-field correction (float32, scan grid; only with n4)",
    "standard.nii.gz": "the prepared scan on the standard grid in MNI space, normalised inside the brain: 0 and "
                       "upper_level (1 by default) at the percentiles, brighter voxels above 1 (float32; models "
                       "see it clipped at 1)",
    "standard_brain_mask.nii.gz": "brain mask on the standard grid (uint8)",
    "transform.tfm": "ITK affine transform (LPS): maps template points to scan points; resamples the scan "
                     "into the template",
    "preparation.json": "settings, checks, timings, and the same transform as a 4x4 RAS matrix",
}


def default_cache_dir() -> Path:
    """Where prepared scans are cached: $MEDFLOWAD_CACHE, else ~/.cache/medflowad."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "medflowad")


@dataclass
class Preparation:
    """The expensive, cached part of preparing one scan."""

    key: str
    brain: np.ndarray  # bool, native grid
    brain_ml: float
    info: dict  # preparation.json
    image: np.ndarray | None = None  # N4-corrected native image (only with n4)
    standard: np.ndarray | None = None  # float32 standard grid, >= 0 inside the brain, 1 at the upper percentile
    standard_brain: np.ndarray | None = None
    transform: np.ndarray | None = None  # template world -> scan world (RAS)
    cached: bool = False
    seconds: dict[str, float] = field(default_factory=dict)


def _key_settings(config: ScanPreprocessing) -> dict:
    """The settings that shape the cached results (checks such as brain_volume_ml are re-applied instead)."""
    settings = {"version": PREP_VERSION, "space": config.space, "brain": config.brain, "n4": config.n4,
                "foreground_threshold": config.foreground_threshold}
    if config.n4:
        settings["n4_version"] = N4_VERSION
        if config.n4_levels != 3:  # the usual schedule adds nothing to the key
            settings["n4_levels"] = config.n4_levels
    if config.space == "standard":
        settings.update(registration=REGISTRATION_VERSION, standard_image=STANDARD_IMAGE_VERSION,
                        template=TEMPLATE_FILE, image_size=config.image_size, slice_mm=config.slice_mm,
                        percentiles=list(config.percentiles))
        if config.upper_level != 1:  # the usual level adds nothing to the key, so caches made before it stay valid
            settings["upper_level"] = config.upper_level
    return settings


def cache_key(scan: MetaTensor, config: ScanPreprocessing, given_brain: np.ndarray | None) -> str:
    digest = hashlib.sha256()
    array = np.ascontiguousarray(scan.as_tensor().numpy(), dtype=np.float32)
    digest.update(str(array.shape).encode() + array.tobytes())
    digest.update(np.asarray(scan.affine.numpy(), dtype=np.float64).tobytes())
    if given_brain is not None:
        digest.update(np.packbits(given_brain).tobytes())
    digest.update(json.dumps(_key_settings(config), sort_keys=True).encode())
    return digest.hexdigest()[:32]


def skull_removed(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """``image`` with everything outside ``brain`` set to 0, or to the brain's darkest value where that is negative
    (a z-scored scan): after the percentile normalisation the outside then lies at or below the brain's darkest
    voxels, never at mid-grey (0 is about a z-scored brain's mean)."""
    fill = min(0.0, float(np.nanmin(image[brain]))) if brain.any() else 0.0
    return np.ascontiguousarray(np.where(brain, image, fill), dtype=np.float32)


def _normalised(image: np.ndarray, brain: np.ndarray, config: ScanPreprocessing, name: str) -> np.ndarray:
    if brain.sum() < 16:
        raise ScanError(f"{name}: the brain covers almost none of the standard grid (registration failed?)")
    return (percentile_normalised(image, brain, config, name, "the brain") * brain).astype(np.float32)


def template_overlap(brain: np.ndarray, affine: np.ndarray, transform: np.ndarray) -> float:
    """Dice of the scan's brain mask carried into the template and the template's own brain."""
    template = load_template()
    warped = resample(brain.astype(np.float32), affine, template.affine, template.image.shape, transform) > 0.5
    reference = template.brain
    return float(2 * np.logical_and(warped, reference).sum() / (warped.sum() + reference.sum()))


def _compute(scan: MetaTensor, config: ScanPreprocessing, given_brain: np.ndarray | None, key: str,
             name: str) -> Preparation:
    affine = scan.affine.numpy().astype(np.float64)
    image = np.nan_to_num(scan.as_tensor()[0].numpy().astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    if given_brain is not None:
        brain = given_brain
    else:
        try:
            brain = extract_brain(image, affine, config.brain, config.foreground_threshold,
                               use_gpu=torch.cuda.is_available())
        except ScanError as exc:
            raise ScanError(f"{name}: {exc}") from exc
    seconds["brain"] = time.perf_counter() - started
    brain_ml = _checked_volume(brain, affine, config, name, given_brain is not None)
    info: dict = {"key": key, "settings": _key_settings(config), "source": absolute_scan_path(name),
                  "shape": list(image.shape), "affine": affine.tolist(), "brain_ml": round(brain_ml, 1), "files": {}}
    preparation = Preparation(key, brain, brain_ml, info, seconds=seconds)
    if config.n4:
        started = time.perf_counter()
        image = n4_correct(image, affine, brain, config.n4_levels)
        preparation.image = image
        seconds["n4"] = time.perf_counter() - started
    if config.space == "standard":
        template = load_template()
        started = time.perf_counter()
        try:
            transform = register_affine(template.image, template.affine, image * brain, affine)
        except RuntimeError as exc:  # ITK's exceptions (e.g. all samples map outside the scan)
            raise ScanError(f"{name}: registration to the MNI template failed ({str(exc).strip()[-300:]})") from exc
        seconds["registration"] = time.perf_counter() - started
        info["template_to_scan_ras"] = transform.tolist()
        info["template_overlap"] = round(template_overlap(brain, affine, transform), 4)
        info["template_scalings"] = [round(float(v), 4) for v in template_scalings(transform)]
        started = time.perf_counter()
        grid_affine, grid_shape = standard_grid(config.image_size, config.slice_mm)
        factor = supersampling(grid_affine, affine)
        moved = resample(skull_removed(image, brain), affine, grid_affine, grid_shape, transform, factor=factor)
        standard_brain = resample(brain.astype(np.float32), affine, grid_affine, grid_shape, transform,
                                  factor=factor) > 0.5
        preparation.standard = _normalised(moved, standard_brain, config, name)
        preparation.standard_brain = standard_brain
        preparation.transform = transform
        info["grid_affine"] = grid_affine.tolist()
        seconds["resampling"] = time.perf_counter() - started
    info["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return preparation


def _checked_volume(brain: np.ndarray, affine: np.ndarray, config: ScanPreprocessing, name: str,
                    given: bool) -> float:
    """The brain's volume, checked against ``brain_volume_ml`` when it is a brain (extracted or given)."""
    bounds = config.brain_volume_ml if (given or config.brain != "auto") else None
    try:
        return check_brain_mask(brain, affine, bounds)
    except ScanError as exc:
        raise ScanError(f"{name}: {exc}") from exc


def template_scalings(transform: np.ndarray) -> np.ndarray:
    """How much a registration stretches the brain along its main axes: the singular values of its 3x3 part."""
    return np.linalg.svd(np.asarray(transform)[:3, :3], compute_uv=False)


def _check_registration(preparation: Preparation, config: ScanPreprocessing, name: str) -> None:
    """Refuse a registration that stretches the brain implausibly, or whose brain overlaps the template's too
    little (the overlap alone passed LGG scans whose nominal header left them turned by 90 degrees)."""
    if preparation.transform is not None:
        scalings = template_scalings(preparation.transform)
        bound = config.max_template_scaling
        if scalings.max() > bound or scalings.min() < 1 / bound:
            raise ScanError(f"{name}: registration to the MNI template failed: it scales the brain by "
                            f"{', '.join(f'{s:.2f}' for s in scalings)} along its main axes, outside "
                            f"{1 / bound:.2f}-{bound:g} (preprocessing.max_template_scaling); the voxel sizes or "
                            "axes in the scan's header are probably wrong (prepare it with --space native)")
    overlap = preparation.info.get("template_overlap")
    if overlap is not None and overlap < config.min_template_overlap:
        raise ScanError(f"{name}: registration to the MNI template failed: the registered brain overlaps the "
                        f"template's with Dice {overlap:.3f}, below {config.min_template_overlap:g} "
                        "(preprocessing.min_template_overlap); check the scan's orientation in its header, or "
                        "prepare it with --space native")


def _nifti(data: np.ndarray, affine: np.ndarray, code: int = 1) -> nib.Nifti1Image:
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units("mm")
    image.set_sform(affine, code=code)
    image.set_qform(affine, code=code)
    return image


def write_entry(preparation: Preparation, folder: Path, native_affine: np.ndarray) -> None:
    """Write a preparation's files into ``folder`` (created whole: a temporary folder renamed into place)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp creates 0700; prepared scans are for sharing
        files = {"brain_mask.nii.gz": _nifti(preparation.brain.astype(np.uint8), native_affine)}
        if preparation.image is not None:
            files["n4.nii.gz"] = _nifti(preparation.image, native_affine)
        if preparation.standard is not None:
            grid_affine = np.asarray(preparation.info["grid_affine"])
            files["standard.nii.gz"] = _nifti(preparation.standard, grid_affine, code=4)  # 4: MNI152 space
            files["standard_brain_mask.nii.gz"] = _nifti(preparation.standard_brain.astype(np.uint8), grid_affine,
                                                         code=4)
            sitk.WriteTransform(ras_to_itk(preparation.transform), str(staging / "transform.tfm"))
        for file, image in files.items():
            nib.save(image, str(staging / file))
        info = dict(preparation.info, files={f: ENTRY_FILES[f] for f in [*files, "transform.tfm"]
                                             if (staging / f).exists()})
        (staging / "preparation.json").write_text(json.dumps(info, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_entry(folder: Path, key: str) -> Preparation | None:
    """A cached preparation, or None when there is none (or an unreadable one, which is then recomputed)."""
    try:
        info = json.loads((folder / "preparation.json").read_text())
        if info.get("key") != key:
            return None
        brain = np.asarray(nib.load(str(folder / "brain_mask.nii.gz")).dataobj) > 0
        preparation = Preparation(key, brain, float(info["brain_ml"]), info, cached=True)
        if (folder / "n4.nii.gz").is_file():
            preparation.image = np.asarray(nib.load(str(folder / "n4.nii.gz")).dataobj, dtype=np.float32)
        if "template_to_scan_ras" in info:
            preparation.standard = np.asarray(nib.load(str(folder / "standard.nii.gz")).dataobj, dtype=np.float32)
            preparation.standard_brain = np.asarray(
                nib.load(str(folder / "standard_brain_mask.nii.gz")).dataobj) > 0
            preparation.transform = np.asarray(info["template_to_scan_ras"], dtype=np.float64)
        return preparation
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None


def run_preparation(scan: MetaTensor, config: ScanPreprocessing, given_brain: np.ndarray | None = None,
                    cache: Path | None = None) -> Preparation:
    """The cached part of preparing ``scan``: read from ``cache`` (default :func:`default_cache_dir`) when
    there, else computed and stored. The brain-volume and registration checks apply either way."""
    name = str(scan.meta.get("filename_or_obj", "scan"))
    key = cache_key(scan, config, given_brain)
    folder = (Path(cache) if cache is not None else default_cache_dir()) / "prepared" / key
    preparation = read_entry(folder, key)
    if preparation is None:
        preparation = _compute(scan, config, given_brain, key, name)
        # Stored before the registration check, so that a rerun with another bound needs no new registration.
        write_entry(preparation, folder, scan.affine.numpy().astype(np.float64))
    else:
        _checked_volume(preparation.brain, scan.affine.numpy(), config, name, given_brain is not None)
    _check_registration(preparation, config, name)
    preparation.info["cache"] = str(folder)
    return preparation


def mask_on_scan(mask: MetaTensor, scan: MetaTensor) -> np.ndarray:
    return ResampleToMatch(mode="nearest")(mask, scan)[0].numpy() > 0.5


def standard_slices(volume: np.ndarray, affine: np.ndarray, grid_affine: np.ndarray, grid_shape: tuple[int, ...],
                    transform: np.ndarray | None) -> np.ndarray:
    """(Z, S, S) a volume on its own grid (``affine``) as the standard grid's slices, the way a lesion mask goes
    onto it: each grid voxel the mean of samples spread inside it where the grid is coarser; ``transform`` maps
    grid world to the volume's world (None: one world)."""
    return volume_to_display(resample(volume, affine, grid_affine, grid_shape, transform,
                                      factor=supersampling(grid_affine, affine)))


def prepare_volume(scan: MetaTensor, config: ScanPreprocessing, brain_mask: MetaTensor | None = None,
                   lesion_mask: MetaTensor | None = None, cache: Path | None = None) -> PreparedScan:
    """Prepare a scan read by :func:`medflowad.data.readers.load_scan` as ``config`` says (module docstring).

    ``brain_mask`` (a mask the user gives) replaces brain extraction; ``lesion_mask`` comes along onto the
    model grid (``PreparedScan.lesion``, share of each pixel).
    """
    if config.space == "native" and config.brain == "auto" and not config.n4:
        return prepare_scan(scan, config, brain_mask=brain_mask, lesion_mask=lesion_mask)
    given = mask_on_scan(brain_mask, scan) if brain_mask is not None else None
    preparation = run_preparation(scan, config, given, cache)
    native_brain = preparation.brain
    if config.space == "native":
        image = scan.as_tensor()[0].numpy() if preparation.image is None else preparation.image
        skull_stripped = torch.from_numpy(skull_removed(image, native_brain))[None]
        meta = {k: v for k, v in scan.meta.items() if k != "affine"}
        source = MetaTensor(skull_stripped, affine=scan.affine, meta=meta)
        brain = MetaTensor(torch.from_numpy(native_brain.astype(np.float32))[None], affine=scan.affine)
        prepared = prepare_scan(source, config, brain_mask=brain, lesion_mask=lesion_mask)
        prepared.native, prepared.brain = scan, native_brain
        return prepared
    grid_affine, grid_shape = standard_grid(config.image_size, config.slice_mm)
    lesion = None
    if lesion_mask is not None:
        on_scan = mask_on_scan(lesion_mask, scan).astype(np.float32)
        affine = scan.affine.numpy().astype(np.float64)
        lesion = standard_slices(on_scan, affine, grid_affine, grid_shape, preparation.transform)
    foreground = volume_to_display(preparation.standard_brain)
    unclipped = volume_to_display(preparation.standard).astype(np.float32)
    slices = torch.from_numpy(np.round(np.minimum(unclipped, 1.0) * 255).astype(np.uint8))[:, None]
    grid = MetaTensor(torch.zeros(1, *grid_shape), affine=torch.as_tensor(grid_affine))
    return PreparedScan(
        slices=slices, foreground=foreground, keep=foreground.mean(axis=(1, 2)) >= config.min_foreground,
        lesion_slices=(lesion > 0).any(axis=(1, 2)) if lesion is not None else None, lesion=lesion, grid=grid,
        native=scan, transform=preparation.transform, brain=native_brain, unclipped=unclipped,
    )


def companion_path(scan: Path, replace: tuple[str, str] | None) -> Path | None:
    """A mask beside the scan whose name has ``old`` replaced by ``new`` (e.g. _flair -> _mask)."""
    if replace is None:
        return None
    old, new = replace
    if old not in scan.name:
        raise ScanError(f"{scan}: name does not contain '{old}' to derive its mask's name")
    return scan.with_name(scan.name.replace(old, new))


def prepare(path: Path, config: ScanPreprocessing, lesion_replace: tuple[str, str] | None = None,
            brain_replace: tuple[str, str] | None = None, cache: Path | None = None) -> PreparedScan:
    """Read and prepare a scan; masks beside it are found by name replacement (see :func:`companion_path`)."""
    lesion_path = companion_path(Path(path), lesion_replace)
    lesion = load_scan(lesion_path) if lesion_path is not None else None
    brain_path = companion_path(Path(path), brain_replace)
    brain = load_scan(brain_path) if brain_path is not None else None
    return prepare_volume(load_scan(path), config, brain_mask=brain, lesion_mask=lesion, cache=cache)
