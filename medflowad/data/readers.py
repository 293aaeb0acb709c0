"""Reading scans into MONAI MetaTensors whose ``affine`` maps voxel indices to RAS world millimetres.

Readers are chosen by format, MONAI style: NIfTI through MONAI's ``NibabelReader``; DICOM series
folders, NRRD and MetaImage through :class:`SimpleITKReader`, a MONAI ``ImageReader`` built on
SimpleITK (whose LPS geometry is converted to RAS). Slice order comes from the image geometry (GDCM),
never from file names.

A DICOM folder holding several series (a PACS export of a whole study, say) is several scans: each
series is named ``folder::SeriesInstanceUID`` and gets its own scan id from the folder name, series
number and description (``study_3_AX_FLAIR``), so that none is read in place of another unseen.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813 (the library's own convention)
import torch
from monai.data import MetaTensor
from monai.data.image_reader import ImageReader, NibabelReader

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Masks and segmentations: generic names, and the label maps of common segmenters (DLMUSE, FreeSurfer's
# aseg/aparc), which a folder of healthy scans often holds beside them
LABEL_PATTERNS = ("*mask*", "*roi*", "*seg*", "*label*", "*dlmuse*", "*aparc*")
# The maps `medflowad score` writes (<scan-id> + suffix): never scans, so folder expansion skips them too.
MAP_SUFFIXES = ("_anomaly.nii.gz", "_last_scale.nii.gz", "_anomaly_mask.nii.gz")
NORMATIVE_SUFFIX = "_normative.nii.gz"  # written for models with normative calibration
SCAN_Z_SUFFIX = "_scan_z.nii.gz"  # written when intensity_scan_z is the mask map
SCAN_Z_AND_LLR_SUFFIX = "_scan_z_and_llr.nii.gz"  # written when scan_z_and_llr is the mask map
OUTPUT_SUFFIXES = (*MAP_SUFFIXES, NORMATIVE_SUFFIX, SCAN_Z_SUFFIX, SCAN_Z_AND_LLR_SUFFIX)
SERIES_SEPARATOR = "::"
# Largest scan read, in voxels: 2^29 (2 GiB as float32; a 1 mm head holds 2^24). Preparation keeps a few
# float32 copies, so a scan beyond this could not be processed on a typical machine; it is refused from its
# header, before any voxel is allocated.
MAX_SCAN_VOXELS = 2**29


class ScanError(ValueError):
    """A scan that cannot be read or processed; the message starts with the file name."""


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def is_dicom_file(path: Path) -> bool:
    """DICOM part-10 files carry 'DICM' at byte 128; extension-less exports are common."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_folder(path: Path) -> bool:
    return path.is_dir() and any(is_dicom_file(f) for f in sorted(path.iterdir())[:20] if f.is_file())


def split_series(path: str | Path) -> tuple[Path, str | None]:
    """``folder::UID`` names one series of a DICOM folder; any other path names itself (UID None)."""
    text = str(path)
    folder, separator, uid = text.rpartition(SERIES_SEPARATOR)
    if separator and uid and Path(folder).is_dir():
        return Path(folder), uid
    return Path(text), None


def absolute_scan_path(path: str | Path) -> str:
    """The scan's path made absolute (``folder::UID`` keeps its UID): one name per scan whatever the working
    folder it was given from."""
    folder, uid = split_series(path)
    absolute = str(folder.resolve())
    return f"{absolute}{SERIES_SEPARATOR}{uid}" if uid is not None else absolute


def _series_ids(folder: str) -> tuple[str, ...]:
    return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder))


@functools.lru_cache(maxsize=1024)
def series_description(folder: str, uid: str) -> tuple[int | None, str]:
    """(SeriesNumber, SeriesDescription) from the series' first file; (None, "") where absent."""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid)
    if not files:
        return None, ""
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None, ""

    def tag(key: str) -> str:
        return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""

    number = tag("0020|0011")
    return (int(number) if number.lstrip("-").isdigit() else None), tag("0008|103e")


def dicom_scans(folder: Path) -> list[Path]:
    """A DICOM folder as scans: the folder itself when it holds one series, else ``folder::UID`` per
    series, ordered by series number."""
    series = _series_ids(str(folder))
    if len(series) <= 1:
        return [folder]

    def order(uid: str) -> tuple[int, str]:
        number, _ = series_description(str(folder), uid)
        return (number if number is not None else 1 << 31, uid)

    return [Path(f"{folder}{SERIES_SEPARATOR}{uid}") for uid in sorted(series, key=order)]


def find_scans(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand files and folders into scan paths: volume files, DICOM folders as one scan per series
    (see :func:`dicom_scans`), and ``folder::UID`` series names as given.

    Inside folders, names matching :data:`LABEL_PATTERNS` (masks, ROIs, segmentations) and medflowad's own
    maps (:data:`MAP_SUFFIXES`) are skipped.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if split_series(item)[1] is not None or path.is_file():
            found.append(path)
        elif not path.exists():
            found.append(path)  # reported as unreadable by the caller, with its name
        elif is_dicom_folder(path):
            found += dicom_scans(path)
        else:
            for child in sorted(path.rglob("*")):
                if is_label_name(child.name) or child.name.endswith(OUTPUT_SUFFIXES):
                    continue
                if child.is_file() and _suffix(child) in NIFTI_SUFFIXES + ITK_SUFFIXES:
                    found.append(child)
                elif child.is_dir() and is_dicom_folder(child):
                    found += dicom_scans(child)
    return list(dict.fromkeys(found))


def is_label_name(name: str, patterns: Sequence[str] = LABEL_PATTERNS) -> bool:
    """Masks and segmentations found while expanding folders are not scans (explicit files always are)."""
    return any(fnmatch.fnmatch(name.lower(), p.lower()) for p in patterns)


def scan_id(path: Path) -> str:
    """Names outputs: the file name without its volume suffix; for one series of a DICOM folder, the
    folder name, series number and description (``study_3_AX_FLAIR``; the UID's end where both are absent)."""
    folder, uid = split_series(path)
    if uid is not None:
        number, description = series_description(str(folder), uid)
        label = "_".join(part for part in (str(number) if number is not None else "", description) if part)
        label = re.sub(r"[^A-Za-z0-9.+-]+", "_", label).strip("_") or uid.rsplit(".", 1)[-1]
        return f"{folder.name}_{label}"
    name = path.name
    for suffix in NIFTI_SUFFIXES + ITK_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def unique_scan_ids(paths: Sequence[Path], earlier: dict[str, str] | None = None) -> list[str]:
    """Output ids: a scan scored into the folder before keeps its id (``earlier``: absolute path to id);
    any other gets its file's id, with ``_2``, ``_3``, ... when that is taken in the folder or the batch."""
    earlier = earlier or {}
    taken = set(earlier.values())
    ids = []
    for path in paths:
        known = earlier.get(absolute_scan_path(path))
        if known is not None:
            ids.append(known)
            continue
        base = sid = scan_id(path)
        number = 1
        while sid in taken:
            number += 1
            sid = f"{base}_{number}"
        taken.add(sid)
        ids.append(sid)
    return ids


def sitk_affine_ras(image: sitk.Image) -> np.ndarray:
    """4x4 affine from voxel (i, j, k) = SimpleITK index (x, y, z) to RAS millimetres."""
    dim = image.GetDimension()
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    spacing = np.array(image.GetSpacing(), dtype=np.float64)
    origin = np.array(image.GetOrigin(), dtype=np.float64)
    affine = np.eye(4)
    affine[:dim, :dim] = direction * spacing[None, :]
    affine[:dim, 3] = origin
    return LPS_TO_RAS @ affine


def check_series_geometry(reader: sitk.ImageSeriesReader, count: int, name: str) -> None:
    """Refuse a DICOM series that is not one evenly sampled volume, which the series reader would still stack.

    Per-slice ImageOrientationPatient must agree (a localiser's three planes do not), and
    ImagePositionPatient along the slice normal must advance in equal steps: repeated positions mean
    several volumes in one series (echoes, time points, b-values), uneven steps missing slices. Slices that
    do not state their geometry, and single (multi-frame) files, are left to the reader.
    """
    if count < 2:
        return
    geometry = []
    for i in range(count):
        if not (reader.HasMetaDataKey(i, "0020|0037") and reader.HasMetaDataKey(i, "0020|0032")):
            return
        try:
            geometry.append([float(v) for v in reader.GetMetaData(i, "0020|0037").split("\\")]
                            + [float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")])
        except ValueError:
            return
    values = np.array(geometry)
    if values.shape[1] != 9:
        return
    if np.abs(values[:, :6] - values[0, :6]).max() > 1e-3:  # direction cosines: 1e-3 is about 0.06 degrees
        planes = len({tuple(np.round(o, 1)) for o in values[:, :6]})
        raise ScanError(f"{name}: slices in {planes} orientations, not one volume (a localiser?)")
    normal = np.cross(values[0, :3], values[0, 3:6])
    steps = np.diff(np.sort(values[:, 6:] @ normal))
    spacing = steps.mean()
    if steps.min() < 1e-3 * max(spacing, 1e-3):
        positions = 1 + int((steps >= 1e-3 * max(spacing, 1e-3)).sum())
        raise ScanError(f"{name}: {count} slices at {positions} positions: several volumes in one series "
                        "(echoes, time points, b-values?), not one 3D scan")
    if np.abs(steps - spacing).max() > 0.05 * spacing:
        raise ScanError(f"{name}: uneven slice spacing ({steps.min():.3g} to {steps.max():.3g} mm): missing slices?")


class SimpleITKReader(ImageReader):
    """MONAI reader for DICOM series folders, NRRD and MetaImage files, via SimpleITK."""

    def __init__(self, series_uid: str | None = None) -> None:
        """``series_uid`` picks one series of a DICOM folder; a folder with several needs one."""
        super().__init__()
        self.series_uid = series_uid

    def verify_suffix(self, filename: Sequence[str] | str) -> bool:
        names = [filename] if isinstance(filename, (str, Path)) else list(filename)
        return all(_suffix(Path(n)) in ITK_SUFFIXES or Path(n).is_dir() for n in names)

    def read(self, data: Sequence[str] | str, **kwargs) -> sitk.Image:
        path = Path(data if isinstance(data, (str, Path)) else data[0])
        if path.is_dir():
            return self._read_series(path)
        check_size(path, _itk_size(str(path)))
        return sitk.ReadImage(str(path))

    def _read_series(self, folder: Path) -> sitk.Image:
        series = _series_ids(str(folder))
        if not series:
            raise ScanError(f"{folder}: no DICOM image series found")
        if self.series_uid is not None:
            if self.series_uid not in series:
                raise ScanError(f"{folder}: series {self.series_uid} not found (has {', '.join(series)})")
            chosen = self.series_uid
        elif len(series) == 1:
            chosen = series[0]
        else:
            names = "; ".join(f"{folder}{SERIES_SEPARATOR}{uid} "
                              f"({series_description(str(folder), uid)[1] or 'no description'})" for uid in series)
            raise ScanError(f"{folder}: holds {len(series)} DICOM series; name one as FOLDER::UID: {names}")
        files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), chosen)
        check_size(folder, [*_itk_size(files[0])[:2], len(files)])
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        reader.MetaDataDictionaryArrayUpdateOn()
        image = reader.Execute()
        name = f"{folder}{SERIES_SEPARATOR}{chosen}" if self.series_uid is not None else str(folder)
        check_series_geometry(reader, len(files), name)
        return image

    def get_data(self, img: sitk.Image) -> tuple[np.ndarray, dict]:
        if img.GetNumberOfComponentsPerPixel() != 1:
            raise ScanError(f"expected a single-component image, got {img.GetNumberOfComponentsPerPixel()}")
        array = sitk.GetArrayFromImage(img)  # (z, y, x)
        array = np.ascontiguousarray(array.transpose(tuple(reversed(range(array.ndim)))))
        affine = sitk_affine_ras(img)
        meta = {
            "affine": affine, "original_affine": affine.copy(), "spatial_shape": np.array(array.shape),
            "original_channel_dim": float("nan"), "space": "RAS",
        }
        return array, meta


def _last_line(exc: Exception, most: int = 240) -> str:
    """The last non-empty line of an error (ITK's errors run over many lines, the reason last), shortened."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[-1] if lines else type(exc).__name__
    return text if len(text) <= most else text[: most - 3] + "..."


def check_size(path: str | Path, shape: Sequence[int]) -> None:
    """Refuse a scan of more than MAX_SCAN_VOXELS voxels (or a shape that is not one) from its header."""
    if any(int(n) < 0 for n in shape):
        raise ScanError(f"{path}: the header gives a negative size {tuple(int(n) for n in shape)}")
    voxels = int(np.prod([int(n) for n in shape], dtype=object))
    if voxels > MAX_SCAN_VOXELS:
        raise ScanError(f"{path}: {' x '.join(str(int(n)) for n in shape)} = {voxels:,} voxels, more than the "
                        f"{MAX_SCAN_VOXELS:,} medflowad reads ({MAX_SCAN_VOXELS * 4 / 2**30:.0f} GiB as float32); "
                        "a damaged header, or crop/downsample the scan first")


def _itk_size(filename: str) -> list[int]:
    """Size (and components) of an ITK-readable file from its header alone."""
    info = sitk.ImageFileReader()
    info.SetFileName(filename)
    info.ReadImageInformation()
    components = info.GetNumberOfComponents()
    return [*info.GetSize(), *([components] if components > 1 else [])]


def _nifti_size(path: Path) -> list[int]:
    import nibabel as nib

    return list(nib.load(str(path)).header.get_data_shape())


def load_scan(path: str | Path) -> MetaTensor:
    """Read a 3D scan as a float32 MetaTensor of shape (1, X, Y, Z) with its RAS affine.

    ``path`` is a volume file, a DICOM folder with one series, or ``folder::UID`` for one series of a
    folder with several. A 2D image stored as a volume file (X, Y) becomes (1, X, Y, 1).
    """
    source, series_uid = split_series(path)
    path = Path(path)
    if not source.exists():
        raise ScanError(f"{path}: no such file or folder")
    suffix = _suffix(source)
    try:
        if suffix in NIFTI_SUFFIXES:
            check_size(path, _nifti_size(source))
            reader: ImageReader = NibabelReader()
        elif suffix in ITK_SUFFIXES or source.is_dir() or is_dicom_file(source):
            reader = SimpleITKReader(series_uid)
        else:
            raise ScanError(f"{path}: unsupported scan format '{suffix or 'no extension'}' "
                            "(NIfTI, DICOM folder, NRRD, MHA/MHD)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("nibabel").setLevel(logging.ERROR)
            array, meta = reader.get_data(reader.read(str(source)))
    except ScanError as exc:
        message = str(exc)
        raise ScanError(message if message.startswith(str(path)) else f"{path}: {message}") from exc
    except Exception as exc:  # readers raise many unrelated types on damaged files
        raise ScanError(f"{path}: cannot read scan ({type(exc).__name__}: {_last_line(exc)})") from exc
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim == 4:
        raise ScanError(f"{path}: a 4D image of {array.shape[3]} volumes (a time series, diffusion directions or "
                        "echoes?); medflowad scores single 3D volumes: save the one to score as its own file")
    if array.ndim != 3:
        raise ScanError(f"{path}: expected a 3D volume, got array of shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise ScanError(f"{path}: non-numeric voxel type {array.dtype}")
    if np.iscomplexobj(array):  # casting would silently keep the real part only
        raise ScanError(f"{path}: complex voxels ({array.dtype}); give the magnitude image")
    data = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    if not torch.isfinite(data).all():
        data = torch.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    affine = np.asarray(meta["affine"], dtype=np.float64)
    check_geometry(path, affine)
    return MetaTensor(data, torch.as_tensor(affine), meta={"filename_or_obj": str(path)})


def check_geometry(path: str | Path, affine: np.ndarray) -> None:
    """Refuse a voxel-to-world affine no image can have: non-finite, voxel sizes outside 1 um .. 1 m, or axes
    that do not span three dimensions (a damaged header; nothing downstream could place the voxels)."""
    linear = affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0) if np.isfinite(affine).all() else None
    if spacing is None or not ((spacing >= 1e-3) & (spacing <= 1e3)).all():
        shown = "non-finite" if spacing is None else " x ".join(f"{v:.3g}" for v in spacing) + " mm"
        raise ScanError(f"{path}: impossible voxel geometry (voxel size {shown}): a damaged header?")
    if abs(np.linalg.det(linear / spacing)) < 1e-3:
        raise ScanError(f"{path}: impossible voxel geometry (the voxel axes are parallel): a damaged header?")


def load_image_2d(path: str | Path) -> np.ndarray:
    """A 2D picture (PNG/JPEG/...) or single-frame DICOM as a float32 (H, W) grey array, display orientation."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        if is_dicom_file(path):
            import pydicom

            ds = pydicom.dcmread(str(path))
            array = ds.pixel_array.astype(np.float32)
            if array.ndim == 3:  # multi-frame: middle frame, or colour: luma
                array = array[len(array) // 2] if array.shape[-1] not in (3, 4) else array[..., :3].mean(-1)
            return array * float(getattr(ds, "RescaleSlope", 1.0)) + float(getattr(ds, "RescaleIntercept", 0.0))
        with Image.open(path) as img:
            return np.asarray(img.convert("L"), dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError, AttributeError) as exc:
        raise ScanError(f"{path}: cannot read image ({exc})") from exc
