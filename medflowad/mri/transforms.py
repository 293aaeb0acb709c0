"""MONAI transforms: read scans and compute their anomaly maps inside a MONAI pipeline.

Array transforms take and return ``MetaTensor``; the dictionary versions (suffix ``d``) work on the
keys given, MONAI style::

    from monai.transforms import Compose, SaveImaged
    from medflowad.mri.transforms import AnomalyMapd, LoadScand

    pipeline = Compose([
        LoadScand(keys="image"),                                   # NIfTI, DICOM folder, NRRD, MHA
        AnomalyMapd(keys="image", model="models/flair"),           # adds "image_anomaly"
        SaveImaged(keys="image_anomaly", output_dir="maps", output_postfix="anomaly"),
    ])
    result = pipeline({"image": "scan.nii.gz"})
    result["image_anomaly"].meta["anomaly_scores"]                 # {"llr": ..., "llr_p": ..., "llr_flag": ...}

The maps are those ``medflowad score`` writes: on the input scan's own voxel grid, with its affine.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from medflowad.data.readers import load_scan
from medflowad.data.scans import to_native
from medflowad.mri.analysis import map_names
from medflowad.mri.model import MriModel, analyse, load_mri_model
from medflowad.mri.normative import calibrated_normative_maps
from medflowad.mri.score import scan_scores
from medflowad.prep import prepare_volume


class LoadScan(Transform):
    """Path -> MetaTensor (1, X, Y, Z) with its RAS affine (see :func:`medflowad.data.readers.load_scan`):
    NIfTI, DICOM folders (``folder::UID`` for one series of several), NRRD, MHA/MHD."""

    def __call__(self, path: str | Path) -> MetaTensor:
        return load_scan(path)


class LoadScand(MapTransform):
    """Dictionary version of :class:`LoadScan`: replaces each key's path with the scan."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadScan()

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d


class AnomalyMap(Transform):
    """Scan MetaTensor (1, X, Y, Z) or (X, Y, Z) -> MetaTensor (len(maps), X, Y, Z) of anomaly maps on the
    scan's grid, with the scan's affine.

    ``maps`` are any of ``llr`` (log p_general - log p_in per location, nats), ``last_scale`` (-c_L per
    location), ``llr_c1``.. (each scale's share of ``llr``), ``intensity`` (the normalised image, the
    baseline), ``intensity_abs_z`` (its two-sided robust z against the scan's brain), ``intensity_scan_z``
    (the signed z of the image before its clip at 1, smoothed within the brain: bright lesions on FLAIR),
    ``scan_z_and_llr`` (the smaller of that and the llr's robust z against the same brain) and, for models with
    normative calibration, ``<map>_normative`` (llr, last_scale, intensity; the demo's map is
    ``intensity_normative``). The output's meta holds ``anomaly_maps`` (their names) and ``anomaly_scores``:
    the scan scores, conformal p-values against the model's healthy calibration scans and flags at ``fpr``
    (default: the model's), as in ``medflowad score``'s scores.csv. The scan needs a real affine: read it with
    :class:`LoadScan` or MONAI's ``LoadImage`` (+ ``EnsureChannelFirst``).
    """

    def __init__(self, model: str | Path | MriModel, maps: Sequence[str] = ("llr",), fpr: float | None = None,
                 device: str = "auto", batch_size: int = 64) -> None:
        self.model = model if isinstance(model, MriModel) else load_mri_model(model, device)
        known = map_names(self.model.config.model.levels) + calibrated_normative_maps(self.model.calibration)
        unknown = [name for name in maps if name not in known]
        if unknown or not maps:
            raise ValueError(f"unknown anomaly map {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}")
        self.maps = tuple(maps)
        self.fpr = self.model.config.fpr if fpr is None else fpr
        self.batch_size = batch_size

    def __call__(self, scan: MetaTensor) -> MetaTensor:
        if not isinstance(scan, MetaTensor):
            raise TypeError(f"AnomalyMap needs a MetaTensor with the scan's affine, got {type(scan).__name__} "
                            "(read scans with LoadScan or MONAI's LoadImage)")
        if scan.ndim == 3:
            scan = scan[None]
        if scan.ndim != 4 or scan.shape[0] != 1:
            raise ValueError(f"AnomalyMap needs one 3D scan, shape (1, X, Y, Z) or (X, Y, Z); got {tuple(scan.shape)}")
        prepared = prepare_volume(scan, self.model.config.preprocessing)
        analysis = analyse(self.model, prepared, self.batch_size)
        maps = np.stack([to_native(analysis.maps[name], prepared) for name in self.maps])
        out = MetaTensor(torch.from_numpy(maps), affine=scan.affine.clone(),
                         meta={k: v for k, v in scan.meta.items() if k != "affine"})
        out.meta["anomaly_maps"] = list(self.maps)
        out.meta["anomaly_scores"] = scan_scores(self.model, analysis, self.fpr)
        return out


class AnomalyMapd(MapTransform):
    """Dictionary version of :class:`AnomalyMap`: each key's maps go to ``f"{key}_{output_postfix}"``."""

    def __init__(self, keys: KeysCollection, model: str | Path | MriModel, maps: Sequence[str] = ("llr",),
                 output_postfix: str = "anomaly", fpr: float | None = None, device: str = "auto",
                 batch_size: int = 64, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = AnomalyMap(model, maps, fpr, device, batch_size)
        self.output_postfix = output_postfix

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[f"{key}_{self.output_postfix}"] = self.transform(d[key])
        return d


__all__ = ["AnomalyMap", "AnomalyMapd", "LoadScan", "LoadScand"]
