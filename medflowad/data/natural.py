"""Natural-image data sets in the formats the field uses, loaded into memory as uint8 tensors.

A data set is named by a *spec*: a path, optionally followed by ``::SUBDIR`` to pick one split::

    cifar10.zip::train          image folder inside a zip (class sub-folders)
    images/::test               image folder on disk
    cifar-10-batches-py::test   CIFAR-10 python batches (``::train`` = data_batch_1..5)
    cifar-100-python::train     CIFAR-100 python batches
    test_32x32.mat              SVHN cropped digits (format 2)
    $MEDFLOWAD_DATA/natural/flowers32.zip::all   environment variables are expanded
    pool/                       a slice set (medflowad pool build, MRI model data)
    arrays.npz                  ``images`` or ``x`` (N,H,W[,C] or N,C,H,W uint8), optional ``labels``/``y``

CIFAR batches are Python pickles: they are read with an unpickler that only admits the plain
containers and numpy array reconstruction they need, never arbitrary objects.

In image folders, a file that cannot be decoded is skipped with a warning that names it
(``ImageSet.skipped`` keeps the reasons); a folder where no image can be decoded is an error.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import typing
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from medflowad.data.slice_sets import is_slice_set, load_slice_tensors

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
log = logging.getLogger("medflowad.data")


class DataError(ValueError):
    """A data set that cannot be read; the message names the file and the problem."""


@dataclass
class ImageSet:
    """Images as uint8 (N, C, H, W), integer labels (N,) (-1 where unknown) and class names."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str] = field(default_factory=list)
    source: str = ""
    skipped: list[str] = field(default_factory=list)  # files that could not be decoded, each with its reason
    # uint8 (N, 1, H, W), 1 where a pixel's likelihood counts in training, 0 where it is left out (lesions)
    masks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"{self.source}: images must be uint8 (N, C, H, W), got {self.images.dtype} "
                            f"{tuple(self.images.shape)}")
        if len(self.labels) != len(self.images):
            raise DataError(f"{self.source}: {len(self.images)} images but {len(self.labels)} labels")
        if self.masks is not None and (self.masks.shape[0] != len(self.images) or self.masks.shape[1] != 1
                                       or self.masks.shape[2:] != self.images.shape[2:]):
            raise DataError(f"{self.source}: masks of shape {tuple(self.masks.shape)} do not fit images of shape "
                            f"{tuple(self.images.shape)}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def random_subset(self, limit: int | None, seed: int) -> ImageSet:
        """At most ``limit`` images drawn without replacement (seeded); all of them if ``limit`` is falsy."""
        if not limit or len(self) <= limit:
            return self
        pick = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:limit]
        masks = self.masks[pick] if self.masks is not None else None
        return ImageSet(self.images[pick], self.labels[pick], self.class_names, self.source, self.skipped, masks)


def split_spec(spec: str) -> tuple[Path, str]:
    """``PATH[::SUBDIR]`` -> (path, subdir); environment variables such as $MEDFLOWAD_DATA are expanded."""
    expanded = os.path.expandvars(str(spec))
    if "$" in expanded:
        raise DataError(f"{spec}: environment variable not set ({expanded})")
    path, _, subdir = expanded.partition("::")
    return Path(path).expanduser(), subdir.strip("/")


def load_image_set(spec: str, channels: int | None = None, size: tuple[int, int] | None = None) -> ImageSet:
    """Load any supported data set (see module doc) and convert it to ``channels`` and ``size``."""
    path, subdir = split_spec(spec)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    name = path.name.lower()
    if name.endswith(".mat"):
        data = _load_svhn(path)
    elif name.endswith(".npz"):
        data = _load_npz(path)
    elif name.endswith(".zip"):
        data = _load_zip_folder(path, subdir, size)
    elif is_slice_set(path):
        tensors = load_slice_tensors(path)
        images = tensors["images"]
        labels = tensors.get("labels", torch.full((len(images),), -1, dtype=torch.long))
        data = ImageSet(images, labels, masks=tensors.get("masks"))
    elif path.is_dir() and _is_cifar_dir(path):
        data = _load_cifar_dir(path, subdir or "train")
    elif path.is_file() and _looks_like_cifar_batch(path):
        data = _load_cifar_files([path])
    elif path.is_dir():
        data = _load_disk_folder(path / subdir if subdir else path, size)
    else:
        raise DataError(f"{path}: not a supported data set (image folder, .zip, CIFAR batches, SVHN .mat, .npz)")
    data.source = str(spec)
    return convert(data, channels, size)


def convert(data: ImageSet, channels: int | None, size: tuple[int, int] | None) -> ImageSet:
    """Grey <-> RGB (ITU-R 601 luma) and resizing (bilinear, antialiased) to the model's input."""
    images = data.images
    if channels is not None and images.shape[1] != channels:
        if images.shape[1] == 1 and channels == 3:
            images = images.expand(-1, 3, -1, -1).contiguous()
        elif images.shape[1] == 3 and channels == 1:
            weights = torch.tensor([299, 587, 114], dtype=torch.int32).view(1, 3, 1, 1)
            images = ((images.int() * weights).sum(1, keepdim=True) + 500).div(1000, rounding_mode="floor")
            images = images.clamp(0, 255).to(torch.uint8)
        else:
            raise DataError(f"{data.source}: cannot convert {images.shape[1]} channels to {channels}")
    if size is not None and tuple(images.shape[2:]) != tuple(size):
        if data.masks is not None:
            raise DataError(f"{data.source}: a set with likelihood masks must already have the model's size {size}")
        resized = torch.nn.functional.interpolate(images.float(), size=tuple(size), mode="bilinear",
                                                  antialias=True, align_corners=False)
        images = resized.round().clamp(0, 255).to(torch.uint8)
    return ImageSet(images, data.labels, data.class_names, data.source, data.skipped, data.masks)


def _decode(blob: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(blob)) as img:
            img = img.convert("L") if img.mode in ("L", "I;16", "I", "F", "1") else img.convert("RGB")
            return np.asarray(img)
    except UnidentifiedImageError as exc:
        raise DataError(f"{where}: not an image in a format that can be read") from exc
    except OSError as exc:  # truncated or damaged
        raise DataError(f"{where}: cannot decode image ({exc})") from exc


def _stack_images(arrays: list[np.ndarray], names: list[str], source: str) -> torch.Tensor:
    if not arrays:
        raise DataError(f"{source}: no images found ({', '.join(IMAGE_SUFFIXES)})")
    as_rgb = any(a.ndim == 3 for a in arrays)
    fixed = [np.repeat(a[..., None], 3, axis=2) if (as_rgb and a.ndim == 2) else a for a in arrays]
    first = fixed[0].shape
    for arr, name in zip(fixed, names, strict=True):
        if arr.shape != first:
            raise DataError(f"{name}: image is {arr.shape[:2]}, the others are {first[:2]}; "
                            "pass an image size to resize")
    stacked = np.stack(fixed)
    stacked = stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(stacked))


def _resize_if_needed(arr: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    if size is None or arr.shape[:2] == tuple(size):
        return arr
    mode = "L" if arr.ndim == 2 else "RGB"
    return np.asarray(Image.fromarray(arr, mode).resize((size[1], size[0]), Image.BILINEAR))


def _folder_set(entries: list[tuple[str, bytes | Path]], root_name: str, size) -> ImageSet:
    """entries: (relative path, bytes or file path); the first path component is the class."""
    entries = sorted(entries, key=lambda e: e[0])
    class_names = sorted({rel.split("/")[0] for rel, _ in entries if "/" in rel})
    index = {name: i for i, name in enumerate(class_names)}
    arrays, names, labels, skipped = [], [], [], []
    for rel, content in entries:
        blob = content.read_bytes() if isinstance(content, Path) else content
        where = f"{root_name}/{rel}"
        try:
            arrays.append(_resize_if_needed(_decode(blob, where), size))
        except DataError as exc:  # one damaged file does not cost the whole set
            skipped.append(str(exc))
            continue
        names.append(where)
        labels.append(index[rel.split("/")[0]] if "/" in rel else -1)
    if skipped and not arrays:
        raise DataError(f"{root_name}: none of its {len(skipped)} image files could be decoded ({skipped[0]})")
    if skipped:
        log.warning("%s: skipped %d image file(s) that could not be decoded: %s", root_name, len(skipped),
                    "; ".join(skipped[:5]) + ("; ..." if len(skipped) > 5 else ""))
    images = _stack_images(arrays, names, root_name)
    return ImageSet(images, torch.tensor(labels, dtype=torch.long), class_names, skipped=skipped)


def _load_zip_folder(path: Path, subdir: str, size) -> ImageSet:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{path}: not a readable zip archive ({exc})") from exc
    prefix = f"{subdir}/" if subdir else ""
    with archive:
        members = [m for m in archive.namelist()
                   if m.startswith(prefix) and m.lower().endswith(IMAGE_SUFFIXES) and "__MACOSX" not in m]
        if not members and subdir:
            tops = sorted({m.split("/")[0] for m in archive.namelist() if "/" in m})
            raise DataError(f"{path}: no images under '{subdir}/' (top-level folders: {', '.join(tops)})")
        entries = [(m[len(prefix):], archive.read(m)) for m in members]
    return _folder_set(entries, f"{path}::{subdir}" if subdir else str(path), size)


def _load_disk_folder(root: Path, size) -> ImageSet:
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    entries = [(p.relative_to(root).as_posix(), p) for p in files]
    return _folder_set(entries, str(root), size)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Admits only what CIFAR batches contain: builtin containers and numpy array reconstruction."""

    _ALLOWED: typing.ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _read_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            content = _ArrayOnlyUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise DataError(f"{path}: not a CIFAR python batch ({exc})") from exc
    if not isinstance(content, dict):
        raise DataError(f"{path}: not a CIFAR python batch (top level is {type(content).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}


def _looks_like_cifar_batch(path: Path) -> bool:
    return path.name.startswith(("data_batch", "test_batch")) or path.name in ("train", "test")


def _is_cifar_dir(path: Path) -> bool:
    return (path / "data_batch_1").exists() or (path / "test_batch").exists() or (
        (path / "meta").exists() and (path / "train").is_file()
    )


def _load_cifar_dir(path: Path, split: str) -> ImageSet:
    if (path / "data_batch_1").exists() or (path / "test_batch").exists():
        files = sorted(path.glob("data_batch_*")) if split == "train" else [path / "test_batch"]
        meta_file, names_key = path / "batches.meta", "label_names"
    else:
        files, meta_file, names_key = [path / split], path / "meta", "fine_label_names"
    if split not in ("train", "test"):
        raise DataError(f"{path}: CIFAR split must be 'train' or 'test', got '{split}'")
    missing = [f for f in files if not f.exists()]
    if missing or not files:
        raise DataError(f"{path}: missing CIFAR batch file(s) {', '.join(str(m) for m in missing) or split}")
    data = _load_cifar_files(files)
    if meta_file.exists():
        meta = _read_batch(meta_file)
        data.class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(names_key, [])]
    return data


def _load_cifar_files(files: list[Path]) -> ImageSet:
    images, labels = [], []
    for f in files:
        batch = _read_batch(f)
        if "data" not in batch:
            raise DataError(f"{f}: CIFAR batch without 'data'")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{f}: expected data of shape (N, 3072), got {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32))
        key = "labels" if "labels" in batch else "fine_labels"
        labels.append(np.asarray(batch.get(key, [-1] * len(data)), dtype=np.int64))
    return ImageSet(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


def _load_svhn(path: Path) -> ImageSet:
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
    except Exception as exc:  # scipy raises several unrelated types for bad files
        raise DataError(f"{path}: cannot read MATLAB file ({exc})") from exc
    if "X" not in mat:
        raise DataError(f"{path}: SVHN .mat file without 'X' (keys: {sorted(k for k in mat if not k.startswith('_'))})")
    x = np.asarray(mat["X"])
    if x.ndim != 4 or x.shape[2] != 3:
        raise DataError(f"{path}: expected X of shape (32, 32, 3, N), got {x.shape}")
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1).astype(np.uint8)))
    y = np.asarray(mat.get("y", np.full((x.shape[3], 1), -1))).reshape(-1).astype(np.int64)
    y[y == 10] = 0  # SVHN stores the digit 0 as label 10
    return ImageSet(images, torch.from_numpy(y), [str(d) for d in range(10)])


def _load_npz(path: Path) -> ImageSet:
    try:
        arrays = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read .npz ({exc})") from exc
    with arrays:
        key = next((k for k in ("images", "x") if k in arrays), None)
        if key is None:
            raise DataError(f"{path}: .npz needs an 'images' or 'x' array (has {', '.join(arrays.files)})")
        x = arrays[key]
        label_key = next((k for k in ("labels", "y") if k in arrays), None)
        y = arrays[label_key].reshape(-1).astype(np.int64) if label_key else np.full(len(x), -1, np.int64)
    if x.dtype != np.uint8:
        raise DataError(f"{path}: '{key}' must be uint8 pixels, got {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4:
        raise DataError(f"{path}: '{key}' must be (N,H,W), (N,H,W,C) or (N,C,H,W), got {x.shape}")
    return ImageSet(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y))
