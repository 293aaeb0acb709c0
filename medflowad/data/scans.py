"""Scan preprocessing for 2D-slice models, and the way back to the scan's native grid.

Geometry steps are MONAI transforms on a MetaTensor, so the affine of the model grid is tracked
exactly; maps computed on the model grid go back to the native grid by resampling through world
coordinates (MONAI ``ResampleToMatch``), which inverts every step at once.

Steps: orient to RAS -> optional resampling to a target spacing -> foreground mask (given or
automatic) -> percentile normalisation inside the foreground (``upper_level`` at the upper percentile) ->
in-plane square crop around the foreground -> resize to ``image_size`` x ``image_size`` -> 8-bit quantisation ->
axial slices.
Slices are laid out in radiological display orientation (anterior up, patient right on the left),
the orientation of 2D image sets, so volumes and pictures can share one general pool.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, ResampleToMatch, Resize, ResizeWithPadOrCrop, Spacing, SpatialCrop
from scipy import ndimage

from medflowad.config import ConfigError
from medflowad.data.readers import ScanError


@dataclass(frozen=True)
class ScanPreprocessing:
    """Preprocessing settings; stored in every MRI model folder so scoring repeats them exactly."""

    image_size: int = 64
    target_spacing: tuple[float, float, float] | None = None
    percentiles: tuple[float, float] = (0.5, 99.5)
    # The value the upper percentile takes (the lower takes 0). 1: the percentiles span 0-1. Below 1 the upper
    # percentile can be a healthy one: percentiles [0.5, 50] with upper_level 0.4 put every brain's median at 0.4,
    # so a large bright lesion no longer sets its own scan's scale (it does when it holds the 99.5th percentile).
    upper_level: float = 1.0
    # A fixed intensity range mapped to 0-1 instead of the percentiles, for scans with a physical scale: CT in
    # HU, e.g. [0, 80], the brain window (percentiles of a head CT squeeze the brain into a few grey levels
    # under the bone). The automatic foreground is then everything above the window's lower edge.
    intensity_window: tuple[float, float] | None = None
    foreground_threshold: float = 0.1  # automatic mask: fraction of the 99th intensity percentile
    min_foreground: float = 0.1  # slices with a smaller foreground share are not scored
    margin: float = 0.05  # in-plane crop margin, fraction of the foreground extent
    # Standard-space preparation (medflowad.prep). "native": slices on the scan's own grid, cropped to its
    # foreground (models made before standard space read as such); "standard": affinely registered to the MNI
    # template and resampled onto its fixed grid (medflowad.prep.template), so a slice index is a brain level.
    space: str = "native"
    brain: str = "auto"  # "deepbet": brain extraction; "auto": the intensity foreground, skull included
    n4: bool = False  # N4 bias-field correction (SimpleITK) before anything else
    # N4's fitting levels: each one halves the B-spline mesh spacing of the field; fewer levels fit a smoother
    # field, one too coarse to take a lesion's brightness for shading (3: SimpleITK's usual schedule).
    n4_levels: int = 3
    slice_mm: float = 3.0  # standard space: distance between axial slices
    brain_volume_ml: tuple[float, float] | None = (400.0, 2500.0)  # plausible extracted brains; None: any
    min_template_overlap: float = 0.85  # standard space: Dice of the registered brain and the template's
    # Standard space: the registration may scale the brain by at most this factor (or its inverse) along any
    # axis. A wrong header (nominal voxel sizes, swapped axes) shows as a far larger stretch.
    max_template_scaling: float = 1.5

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_spacing"] = list(self.target_spacing) if self.target_spacing else None
        d["percentiles"] = list(self.percentiles)
        d["intensity_window"] = list(self.intensity_window) if self.intensity_window else None
        d["brain_volume_ml"] = list(self.brain_volume_ml) if self.brain_volume_ml else None
        return d

    @classmethod
    def from_dict(cls, values: dict) -> ScanPreprocessing:
        values = dict(values)
        if values.get("target_spacing") is not None:
            values["target_spacing"] = tuple(values["target_spacing"])
        values["percentiles"] = tuple(values.get("percentiles", cls.percentiles))
        if values.get("intensity_window") is not None:
            window = tuple(float(v) for v in values["intensity_window"])
            if len(window) != 2 or not window[1] > window[0]:
                raise ConfigError(f"preprocessing.intensity_window must be [low, high] with high > low, got {window}")
            values["intensity_window"] = window
        if values.get("brain_volume_ml") is not None:
            values["brain_volume_ml"] = tuple(float(v) for v in values["brain_volume_ml"])
        config = cls(**values)
        config.validate()
        return config

    def overridden(self, **values: object) -> ScanPreprocessing:
        """A copy with the given settings changed (None leaves a setting as it is), validated."""
        changed = replace(self, **{k: v for k, v in values.items() if v is not None})
        changed.validate()
        return changed

    def validate(self) -> None:
        if not 0 < self.upper_level <= 1:
            raise ConfigError(f"preprocessing.upper_level must lie in (0, 1], got {self.upper_level}")
        if not 1 <= self.n4_levels <= 4:
            raise ConfigError(f"preprocessing.n4_levels must be 1 to 4, got {self.n4_levels}")
        if self.space not in SPACES:
            raise ConfigError(f"preprocessing.space must be one of {', '.join(SPACES)}, got {self.space!r}")
        if self.space == "standard" and self.intensity_window is not None:
            # standard space normalises by the extracted brain's percentiles; a window would be ignored silently
            raise ConfigError("preprocessing.intensity_window applies to native space only (standard space "
                              "normalises by the brain's percentiles): set intensity_window: null or space: native")
        if self.brain not in ("auto", "deepbet"):
            raise ConfigError(f"preprocessing.brain must be auto or deepbet, got {self.brain!r}")
        if not self.slice_mm > 0 or not 0 <= self.min_template_overlap <= 1 or not self.max_template_scaling >= 1:
            raise ConfigError("preprocessing.slice_mm must be positive, min_template_overlap within [0, 1] and "
                              "max_template_scaling at least 1")
        if self.brain_volume_ml is not None and (len(self.brain_volume_ml) != 2
                                                 or not 0 <= self.brain_volume_ml[0] < self.brain_volume_ml[1]):
            raise ConfigError(f"preprocessing.brain_volume_ml must be [low, high] mL, got {self.brain_volume_ml}")


SPACES = ("native", "standard")


@dataclass
class PreparedScan:
    """A scan ready for a slice model, with what is needed to map results back."""

    slices: torch.Tensor  # uint8 (Z, 1, S, S), display orientation
    foreground: np.ndarray  # bool (Z, S, S)
    keep: np.ndarray  # bool (Z,): slices with enough foreground
    lesion_slices: np.ndarray | None  # bool (Z,) when a lesion mask was given
    lesion: np.ndarray | None  # float (Z, S, S) lesion mask on the model grid (share of each pixel), if given
    grid: MetaTensor  # (1, S, S, Z) model-grid reference carrying the affine
    native: MetaTensor | None  # the scan as read (native shape and affine); None once no longer needed
    # Standard space: grid world -> native world (RAS, 4x4); None when the grid lies in the scan's own world.
    transform: np.ndarray | None = None
    brain: np.ndarray | None = None  # bool brain mask on the native grid, when the brain was extracted or given
    # float32 (Z, S, S): the normalised image before its clip at 1 (above the upper percentile it keeps rising),
    # for maps that must tell a lesion brighter than all tissue from the brightest healthy voxels; None when
    # the preparation does not keep it.
    unclipped: np.ndarray | None = None

    @property
    def num_slices(self) -> int:
        return len(self.slices)

    @property
    def scored(self) -> np.ndarray:
        """bool (Z, S, S): the foreground of the scored slices, where maps are measured and calibrated."""
        return self.foreground & self.keep[:, None, None]


def orient_ras(volume: MetaTensor) -> MetaTensor:
    """Reorient a (C, X, Y, Z) MetaTensor to RAS; explicit labels keep MONAI from reinterpreting axes."""
    return Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(volume)


def volume_to_display(volume: np.ndarray) -> np.ndarray:
    """RAS (X, Y, Z) volume -> (Z, rows, cols) images, anterior up and patient right on the left."""
    return np.ascontiguousarray(np.flip(volume, axis=(0, 1)).transpose(2, 1, 0))


def display_to_volume(slices: np.ndarray) -> np.ndarray:
    """Inverse of :func:`volume_to_display`."""
    return np.ascontiguousarray(np.flip(slices.transpose(2, 1, 0), axis=(0, 1)))


# 4-connected cross in the plane of the first two axes (slices along the last, as scans are read): opens and
# dilates within each slice only
IN_PLANE_CROSS = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE_CROSS[:, :, 1] = ndimage.generate_binary_structure(2, 1)
IN_PLANE_CROSS.flags.writeable = False

MIN_BACKGROUND_SHARE = 0.1  # a zero region this large, at the border, is a stripped scan's background


def dark_background(volume: np.ndarray) -> np.ndarray:
    """``volume`` with its zero background at its minimum when it has negative values.

    A scan skull-stripped and then z-scored inside the brain keeps 0 outside it, about its brain's mean: brain
    extraction and the automatic foreground read that as tissue (deepbet lost 5 % of a z-scored FLAIR's brain;
    the foreground took the whole volume). The background is each region of exact zeros that touches the volume's
    border and fills at least ``MIN_BACKGROUND_SHARE`` of it; small ones (water in CT's Hounsfield units) stay.
    Scans without negative values are returned as they are.
    """
    if volume.size == 0 or volume.min() >= 0:
        return volume
    labels, count = ndimage.label(volume == 0)
    if count == 0:
        return volume
    faces = [labels.take(i, axis=a) for a in range(labels.ndim) for i in (0, -1)]
    border = np.unique(np.concatenate([f.ravel() for f in faces]))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    wide = [label for label in border if label > 0 and sizes[label] >= MIN_BACKGROUND_SHARE * volume.size]
    if not wide:
        return volume
    return np.where(np.isin(labels, wide), volume.min(), volume).astype(volume.dtype, copy=False)


def automatic_foreground(volume: np.ndarray, threshold: float, level: float | None = None) -> np.ndarray:
    """Voxels above ``level``; opened in-plane, largest 3D component, holes filled per slice.

    By default ``level = b + threshold * (p99 - b)``, p99 the 99th percentile of the voxels above the
    background intensity b. b is 0, or for scans with negative values (z-scored, offset) their 0.5th
    percentile, the background of such scans (a zero background of such a scan first goes to its minimum,
    :func:`dark_background`); a shifted scan therefore gets the same mask.
    """
    if level is None:
        volume = dark_background(volume)
        background = min(0.0, float(np.percentile(volume, 0.5)))
        tissue = volume[volume > background]
        if tissue.size == 0:
            return np.zeros(volume.shape, dtype=bool)
        level = background + threshold * (np.percentile(tissue, 99) - background)
    mask = volume > level
    # In-plane opening only: a 3D element would erode away the first and last slices (and 2D images).
    mask = ndimage.binary_opening(mask, structure=IN_PLANE_CROSS)
    labels, count = ndimage.label(mask)
    if count > 1:
        sizes = ndimage.sum(mask, labels, index=range(1, count + 1))
        mask = labels == (int(np.argmax(sizes)) + 1)
    for k in range(mask.shape[2]):
        mask[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    return mask


def percentile_normalised(image: np.ndarray, region: np.ndarray, config: ScanPreprocessing, name: str,
                          where: str) -> np.ndarray:
    """``image`` with ``region``'s ``config.percentiles`` at 0 and ``config.upper_level``, floored at 0 and not
    clipped above (brighter voxels keep rising): the normalisation of the native and the standard grid alike."""
    lo, hi = (float(v) for v in np.percentile(image[region], config.percentiles))
    if not hi > lo:
        raise ScanError(f"{name}: no intensity contrast inside {where}")
    return np.maximum((image - lo) / (hi - lo) * config.upper_level, 0.0)


def _as_channel(array: np.ndarray, like: MetaTensor) -> MetaTensor:
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None], affine=like.affine)


def prepare_scan(
    scan: MetaTensor, config: ScanPreprocessing, brain_mask: MetaTensor | None = None,
    lesion_mask: MetaTensor | None = None,
) -> PreparedScan:
    """Run the preprocessing chain on a scan read by :func:`medflowad.data.readers.load_scan`."""
    name = scan.meta.get("filename_or_obj", "scan")
    # NaN/inf voxels (outside a scanner's field of view, or from a reader that keeps them) count as background.
    channels = [torch.nan_to_num(scan.as_tensor().float(), nan=0.0, posinf=0.0, neginf=0.0)]
    for extra in (brain_mask, lesion_mask):
        if extra is not None:
            channels.append(ResampleToMatch(mode="nearest")(extra, scan).as_tensor())
    stacked = MetaTensor(torch.cat(channels), affine=scan.affine)
    stacked = orient_ras(stacked)
    if config.target_spacing is not None:
        stacked = Spacing(pixdim=config.target_spacing, mode="bilinear")(stacked)
    image = dark_background(stacked[0].numpy())
    index = 1
    if brain_mask is not None:
        foreground = stacked[index].numpy() > 0.5
        index += 1
    else:
        window_low = config.intensity_window[0] if config.intensity_window else None
        foreground = automatic_foreground(image, config.foreground_threshold, window_low)
    lesion = stacked[index].numpy() > 0.5 if lesion_mask is not None else None
    if foreground.sum() < 16:
        raise ScanError(f"{name}: no foreground found (empty mask or blank scan)")

    if config.intensity_window is not None:
        lo, hi = config.intensity_window
        normalised = np.maximum((image - lo) / (hi - lo), 0.0)
    else:
        normalised = percentile_normalised(image, foreground, config, name, "the foreground")

    # Square in-plane crop around the foreground, all slices kept.
    xs, ys = np.nonzero(foreground.any(axis=2))
    extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    side = int(np.ceil(extent * (1 + 2 * config.margin)))
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    start = [max(0, round(cx - side / 2)), max(0, round(cy - side / 2)), 0]
    end = [min(image.shape[0], start[0] + side), min(image.shape[1], start[1] + side), image.shape[2]]
    # The model's input is clipped before resizing and the unclipped image resized beside it, so the slices are
    # those of a clip at full resolution.
    channels = [np.minimum(normalised, 1.0), foreground.astype(np.float32), normalised]
    channels += [lesion.astype(np.float32)] if lesion is not None else []
    geometry = MetaTensor(torch.from_numpy(np.stack(channels).astype(np.float32)), affine=stacked.affine)
    geometry = SpatialCrop(roi_start=start, roi_end=end)(geometry)
    geometry = ResizeWithPadOrCrop(spatial_size=(side, side, -1))(geometry)
    size = config.image_size
    # Box averaging when shrinking (alias-free and ~10x faster than Gaussian anti-aliasing), bilinear otherwise.
    geometry = Resize(spatial_size=(size, size, -1), mode="area" if side > size else "bilinear")(geometry)

    grid_image = np.clip(geometry[0].numpy(), 0.0, 1.0)
    grid_foreground = geometry[1].numpy() > 0.5
    slices = torch.from_numpy(np.round(volume_to_display(grid_image) * 255).astype(np.uint8))[:, None]
    display_fg = volume_to_display(grid_foreground)
    keep = display_fg.mean(axis=(1, 2)) >= config.min_foreground
    lesion_slices = lesion.any(axis=(0, 1)) if lesion is not None else None
    lesion_grid = volume_to_display(geometry[3].numpy()) if lesion is not None else None
    unclipped = volume_to_display(np.maximum(geometry[2].numpy(), 0.0)).astype(np.float32)
    grid = MetaTensor(torch.zeros(1, size, size, grid_image.shape[2]), affine=geometry.affine)
    return PreparedScan(slices, display_fg, keep, lesion_slices, lesion_grid, grid, scan, unclipped=unclipped)


def to_native(maps: np.ndarray, prepared: PreparedScan, mode: str = "bilinear") -> np.ndarray:
    """(Z, S, S) display-oriented maps on the model grid -> float32 array on the scan's native grid; a stack
    (C, Z, S, S) of several maps -> (C, ...) in one resampling pass (about half the time of C passes).

    Through world coordinates: directly when the grid lies in the scan's world, through the inverse of the
    registration (``prepared.transform``) in standard space. Zero outside the brain when its mask is known.
    """
    stack = np.asarray(maps, dtype=np.float32)
    single = stack.ndim == 3
    volumes = np.stack([display_to_volume(m) for m in (stack[None] if single else stack)])
    if prepared.transform is None:
        on_grid = MetaTensor(torch.from_numpy(volumes), affine=prepared.grid.affine)
        native = ResampleToMatch(mode=mode, padding_mode="zeros")(on_grid, prepared.native).numpy()
    else:
        from medflowad.prep.registration import resample  # prep builds on this module

        grid_affine, native_affine = prepared.grid.affine.numpy(), prepared.native.affine.numpy()
        native_to_standard = np.linalg.inv(prepared.transform)
        native = np.stack([resample(v, grid_affine, native_affine, tuple(prepared.native.shape[1:]), native_to_standard,
                                    order=0 if mode == "nearest" else 1) for v in volumes])
    if prepared.brain is not None:
        native = native * prepared.brain
    native = native.astype(np.float32, copy=False)
    return native[0] if single else native


def prepare_image_2d(image: np.ndarray, config: ScanPreprocessing) -> torch.Tensor | None:
    """A 2D picture (already in display orientation) -> uint8 (1, S, S), or None without foreground.

    Pictures are display images with no physical intensity scale, so an ``intensity_window`` does not
    apply to them: they are normalised by percentiles like MRI."""
    volume = display_to_volume(np.asarray(image, dtype=np.float32)[None])
    scan = MetaTensor(torch.from_numpy(volume)[None], affine=torch.eye(4, dtype=torch.float64))
    try:
        prepared = prepare_scan(scan, replace(config, intensity_window=None))
    except ScanError:
        return None
    return prepared.slices[0] if prepared.keep[0] else None
