r"""Lesions painted into real healthy heads, with known ground truth (PROTOCOL.md part D).

A painted lesion is a smooth ellipsoid of 10-25 mm diameter, centred in grey or white matter, blended
into the scan with a logistic edge about 2 mm wide:

.. math:: w(x) = \sigma\big((1 - d(x)) \cdot r / e\big),\qquad
          \text{painted}(x) = (1 - w(x))\,I(x) + w(x)\,(t + n(x)),

where :math:`d(x)` is the ellipsoid's normalised distance (1 on its surface), r its mean radius, e the
edge width, t the target intensity and n a little noise of the scan's own white-matter spread, so that
the inside is not unnaturally flat. ``hyper`` lesions are brighter than white matter
(:math:`t = \mu_{WM} + 0.8(\mu_{WM} - \mu_{GM})`), ``hypo`` lesions darker than grey matter, between it
and CSF (:math:`t = \mu_{CSF} + 0.4(\mu_{GM} - \mu_{CSF})`). Tissue means come from a three-class
k-means of the intensities inside the brain. The lesion mask is where :math:`w > 0.5`; the weight is cut
to the brain, so nothing is painted outside it.
"""

from __future__ import annotations

import gzip
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from sklearn.cluster import KMeans

from medflowad.storage import atomic_write

LESION_KINDS = ("hyper", "hypo")
TISSUES = ("grey", "white")
DIAMETER_MM = (10.0, 25.0)
EDGE_MM = 2.0


@dataclass(frozen=True)
class PaintedLesion:
    kind: str
    tissue: str  # the tissue class at the lesion's centre
    centre_voxel: tuple[int, int, int]
    centre_mm: tuple[float, float, float]  # world coordinates (the scan's affine)
    diameter_mm: float  # mean of the ellipsoid's three axes, times two
    voxels: int  # voxels of the painted mask (w > 0.5) that only this lesion covers or shares

    def to_dict(self) -> dict:
        return asdict(self)


def tissue_classes(image: np.ndarray, brain: np.ndarray, seed: int = 0) -> tuple[np.ndarray, dict[str, float]]:
    """(labels, means): 0 outside the brain, 1 CSF, 2 grey, 3 white matter by a 3-class k-means of the
    brain's intensities (T1 contrast: CSF darkest, white matter brightest); means per class."""
    values = image[brain].reshape(-1, 1).astype(np.float64)
    if values.size < 30:
        raise ValueError(f"the brain mask holds {values.size} voxels, too few to find tissue classes")
    kmeans = KMeans(n_clusters=3, n_init=4, random_state=seed).fit(values)
    order = np.argsort(kmeans.cluster_centers_[:, 0])
    rank = np.empty(3, dtype=np.int64)
    rank[order] = np.arange(1, 4)
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[brain] = rank[kmeans.labels_]
    means = {name: float(kmeans.cluster_centers_[order[i], 0]) for i, name in enumerate(("csf", "grey", "white"))}
    return labels, means


def paint_lesions(
    image: np.ndarray, affine: np.ndarray, brain: np.ndarray, seed: int, count: int = 2,
    kinds: tuple[str, ...] = LESION_KINDS, diameter_mm: tuple[float, float] = DIAMETER_MM,
) -> tuple[np.ndarray, np.ndarray, list[PaintedLesion]]:
    """Paint ``count`` lesions into ``image`` (3D, any intensity scale) inside ``brain`` (3D bool).

    Returns (painted image as float32, lesion mask as uint8, the lesions). Kind, tissue (grey or white
    matter, alternating from a random start), diameter and shape are drawn from ``seed``; centres lie at
    least half a diameter inside the brain, so lesions stay in it. Voxels outside every lesion's edge keep
    their values exactly.
    """
    if image.ndim != 3 or image.shape != brain.shape:
        raise ValueError(f"image {image.shape} and brain mask {brain.shape} must be 3D of the same shape")
    unknown = set(kinds) - set(LESION_KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be among {', '.join(LESION_KINDS)}, got {kinds}")
    brain = brain.astype(bool)
    rng = np.random.default_rng(seed)
    spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    labels, means = tissue_classes(image, brain, seed)
    depth_mm = ndimage.distance_transform_edt(brain, sampling=spacing)
    white_noise = float(image[labels == 3].std())
    targets = {"hyper": means["white"] + 0.8 * (means["white"] - means["grey"]),
               "hypo": means["csf"] + 0.4 * (means["grey"] - means["csf"])}

    # centres only where the intensity is typical of the tissue (within a quarter of the grey-white gap of
    # its mean) and the neighbours agree, not at partial-volume borders or in deep grey matter as bright as white
    gap = means["white"] - means["grey"]
    typical = {name: ndimage.binary_erosion(labels == label) & (np.abs(image - means[name]) < 0.25 * gap)
               for label, name in ((2, "grey"), (3, "white"))}
    axes_mm = [np.arange(n) * d for n, d in zip(image.shape, spacing, strict=True)]
    weight = np.zeros(image.shape, dtype=np.float64)
    target = np.zeros(image.shape, dtype=np.float64)
    lesions: list[tuple[str, str, np.ndarray, float]] = []
    first_tissue = int(rng.integers(2))
    for i in range(count):
        kind = kinds[int(rng.integers(len(kinds)))]
        tissue = TISSUES[(first_tissue + i) % 2]
        diameter = float(rng.uniform(*diameter_mm))
        radii = diameter / 2 * rng.uniform(0.8, 1.2, 3)
        radii *= diameter / 2 / radii.mean()
        candidates = np.argwhere(typical[tissue] & (depth_mm >= diameter / 2 + EDGE_MM))
        if len(candidates) == 0:
            raise ValueError(f"no {tissue}-matter voxel lies {diameter / 2 + EDGE_MM:.1f} mm inside the brain "
                             f"for a {diameter:.1f} mm lesion")
        centre = candidates[int(rng.integers(len(candidates)))]
        rotation = _random_rotation(rng)
        offsets = np.stack(np.meshgrid(*[a - a[c] for a, c in zip(axes_mm, centre, strict=True)], indexing="ij"),
                           axis=-1)
        distance = np.sqrt((((offsets @ rotation) / radii) ** 2).sum(axis=-1))
        w = 1.0 / (1.0 + np.exp(np.clip((distance - 1.0) * radii.mean() / (EDGE_MM / 4), -50, 50)))
        newer = w > weight
        target[newer] = targets[kind]
        weight = np.maximum(weight, w)
        lesions.append((kind, tissue, centre, diameter))
    weight *= brain
    weight[weight < 1e-3] = 0.0  # a compact painted region: every other voxel keeps its value exactly
    noise = rng.normal(0.0, 0.5 * white_noise, image.shape)
    painted = np.where(weight > 0, (1 - weight) * image + weight * (target + noise), image)
    mask = (weight > 0.5).astype(np.uint8)
    found = [
        PaintedLesion(kind, tissue, tuple(int(c) for c in centre),
                      tuple(float(v) for v in (np.asarray(affine) @ np.append(centre, 1.0))[:3]), round(diameter, 2),
                      int(_component_at(mask, centre)))
        for kind, tissue, centre, diameter in lesions
    ]
    return painted.astype(np.float32), mask, found


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _component_at(mask: np.ndarray, voxel: np.ndarray) -> int:
    """Voxels of the mask's connected component through ``voxel`` (0 if the voxel is not in the mask)."""
    components, _ = ndimage.label(mask)
    label = components[tuple(voxel)]
    return int((components == label).sum()) if label else 0


NIFTI_SUFFIXES = (".nii.gz", ".nii")


def painted_name(stem: str, copy: int, modality_tag: str | None) -> str:
    """``IXI048_t1`` -> ``IXI048-painted1_t1``: the modality tag stays last, where scan naming expects it."""
    if modality_tag and stem.endswith(modality_tag):
        return f"{stem[: -len(modality_tag)]}-painted{copy}{modality_tag}"
    return f"{stem}-painted{copy}"


def paint_scan_file(scan: Path, brain: Path, out: Path, copies: int, seed: int, lesions: int = 2,
                    modality_tag: str | None = "_t1") -> list[dict]:
    """Write ``copies`` painted versions of the NIfTI ``scan`` and their lesion masks into ``out``.

    ``brain``: a mask or label map on the scan's grid (any label > 0 is brain). Copy k (1..copies) uses
    seed ``seed + k`` and is named by :func:`painted_name`, its mask with ``_mask`` appended; both keep
    the scan's header and affine (intensities as int16 in the scan's units, the mask as uint8 0/1), and are
    written atomically. Returns one record per copy: file names, seed, lesion voxels and the lesions.
    """
    stem = next((scan.name[: -len(s)] for s in NIFTI_SUFFIXES if scan.name.endswith(s)), None)
    if stem is None:
        raise ValueError(f"{scan}: not a NIfTI file (.nii or .nii.gz)")
    source = nib.load(str(scan))
    image = np.asarray(source.get_fdata(dtype=np.float32))
    brain_mask = np.asarray(nib.load(str(brain)).dataobj) > 0
    if brain_mask.shape != image.shape:
        raise ValueError(f"{brain}: brain mask {brain_mask.shape} is not on the grid of {scan.name} {image.shape}")
    records = []
    for copy in range(1, copies + 1):
        painted, mask, found = paint_lesions(image, source.affine, brain_mask, seed + copy, count=lesions)
        name = painted_name(stem, copy, modality_tag)
        suffix = scan.name[len(stem):]
        _save_like(source, np.round(painted).clip(-32768, 32767).astype(np.int16), out / f"{name}{suffix}")
        _save_like(source, mask, out / f"{name}_mask{suffix}")
        records.append({"source": scan.name, "painted": f"{name}{suffix}", "mask": f"{name}_mask{suffix}",
                        "seed": seed + copy, "lesion_voxels": int(mask.sum()), "lesions": [x.to_dict() for x in found]})
    return records


def _save_like(reference: nib.Nifti1Image, data: np.ndarray, path: Path) -> None:
    header = reference.header.copy()
    header.set_data_dtype(data.dtype)
    image = nib.Nifti1Image(data, reference.affine, header)
    image.header.set_slope_inter(1.0, 0.0)
    payload = image.to_bytes()
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=6)
    atomic_write(path, lambda tmp: tmp.write_bytes(payload))


def world_x(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """The world x coordinate (mm, left-right) of every voxel of a grid ``shape[:3]`` under ``affine``."""
    ijk = np.indices(shape[:3]).reshape(3, -1).T
    return nib.affines.apply_affine(affine, ijk)[:, 0].reshape(shape[:3])


def linear_bias_field(shape: tuple[int, ...], affine: np.ndarray, strength: float,
                      half_width_mm: float = 70.0) -> np.ndarray:
    r"""A smooth multiplicative inhomogeneity along the world x axis (left-right), as uncorrected scanners leave.

    .. math:: f(v) = 1 + s\,\mathrm{clip}(x(v) / w, -1, 1)

    with :math:`x(v)` the world x coordinate (mm) of voxel v under ``affine``, s the ``strength`` and w
    ``half_width_mm``. Returns float32 of ``shape[:3]``.
    """
    return (1 + strength * np.clip(world_x(shape, affine) / half_width_mm, -1, 1)).astype(np.float32)


def bias_scan_file(scan: Path, out: Path, strength: float) -> Path:
    """Write ``scan`` multiplied by :func:`linear_bias_field` to ``out`` (float32, same grid and header)."""
    source = nib.load(str(scan))
    data = np.asarray(source.dataobj, dtype=np.float32)
    field = linear_bias_field(data.shape, source.affine, strength)
    _save_like(source, data * field.reshape(field.shape + (1,) * (data.ndim - 3)), out)
    return out
