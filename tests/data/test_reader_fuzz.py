"""Property-based tests of the scan readers and the preparation (hypothesis): random bytes, truncated and
bit-flipped NIfTI headers and gzip streams, random shapes, dtypes and affines (singular, huge, NaN), random DICOM
geometry tags, absurd sizes. The only failure allowed is medflowad's ScanError with a message naming the file;
never another exception, and never an allocation of the size a damaged header claims."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from medflowad.data.readers import MAX_SCAN_VOXELS, ScanError, load_scan
from medflowad.data.scans import ScanPreprocessing
from medflowad.prep import prepare_volume

# The same examples on every run, so CI is reproducible; MEDFLOWAD_FUZZ_RANDOM=1 draws new ones (how the DICOM
# test's @example was found) and MEDFLOWAD_FUZZ_EXAMPLES sets how many.
FUZZ = settings(max_examples=int(os.environ.get("MEDFLOWAD_FUZZ_EXAMPLES", "40")), deadline=None,
                derandomize=not os.environ.get("MEDFLOWAD_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.function_scoped_fixture])
PREPARATION = ScanPreprocessing(image_size=32, min_foreground=0.05)


def _read_and_prepare(path: Path) -> None:
    """load_scan then the native-grid preparation; a ScanError must name the file and say something."""
    try:
        prepare_volume(load_scan(path), PREPARATION)
    except ScanError as exc:
        message = str(exc)
        assert message.startswith(str(path)) and len(message) > len(str(path)) + 5, message
        assert "\n" not in message and len(message) < len(str(path)) + 400, message  # one readable line


def _valid_nifti(path: Path, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    volume = np.zeros((20, 22, 6), np.int16)
    volume[4:16, 5:18, 1:5] = rng.integers(100, 400, (12, 13, 4))
    nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 3.0, 1.0])), str(path))
    return path.read_bytes()


@FUZZ
@given(data=st.binary(min_size=0, max_size=2048),
       suffix=st.sampled_from([".nii", ".nii.gz", ".nrrd", ".mha", ".mhd", ".dcm", ""]))
def test_random_bytes_are_refused_with_a_scan_error(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("bytes") / f"scan{suffix}"
    path.write_bytes(data)
    _read_and_prepare(path)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 351), st.integers(0, 7)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 5000)), gzipped=st.booleans())
def test_bit_flipped_and_truncated_nifti_is_read_or_refused(tmp_path_factory, flips, cut, gzipped):
    folder = tmp_path_factory.mktemp("flip")
    raw = bytearray(_valid_nifti(folder / "valid.nii"))
    for position, bit in flips:  # the 348-byte header and the extension flag
        raw[position] ^= 1 << bit
    raw = raw[:cut] if cut is not None else raw
    path = folder / ("scan.nii.gz" if gzipped else "scan.nii")
    path.write_bytes(gzip.compress(bytes(raw)) if gzipped else bytes(raw))
    _read_and_prepare(path)


@FUZZ
@given(cut=st.integers(0, 400), flip=st.one_of(st.none(), st.integers(0, 399)))
def test_damaged_gzip_streams_are_refused(tmp_path_factory, cut, flip):
    folder = tmp_path_factory.mktemp("gz")
    _valid_nifti(folder / "valid.nii.gz")
    stream = bytearray((folder / "valid.nii.gz").read_bytes())
    if flip is not None and flip < len(stream):
        stream[flip] ^= 0x5A
    path = folder / "scan.nii.gz"
    path.write_bytes(bytes(stream[: min(cut, len(stream) - 1)] if flip is None else stream))
    _read_and_prepare(path)


AFFINES = st.one_of(
    st.just(np.zeros((4, 4))),  # singular
    st.just(np.diag([1e30, 1e30, 1e30, 1.0])),  # huge voxels
    st.just(np.diag([1e-30, 1e-30, 1e-30, 1.0])),  # tiny voxels
    st.just(np.full((4, 4), np.nan)),
    st.just(np.diag([1.0, 1.0, np.inf, 1.0])),
    st.builds(lambda m: np.vstack([m, [0, 0, 0, 1]]),
              st.lists(st.floats(-50, 50, allow_nan=False), min_size=12, max_size=12).map(
                  lambda v: np.array(v).reshape(3, 4))),
)


@FUZZ
@given(shape=st.lists(st.integers(1, 24), min_size=1, max_size=4),
       dtype=st.sampled_from([np.uint8, np.int16, np.int32, np.float32, np.float64, np.int64, np.uint16, np.int8]),
       affine=AFFINES, fill=st.sampled_from(["random", "constant", "nan", "inf", "extreme"]))
def test_random_shapes_dtypes_affines_and_values_are_prepared_or_refused(tmp_path_factory, shape, dtype, affine,
                                                                         fill):
    rng = np.random.default_rng(len(shape))
    if fill == "random":
        volume = rng.uniform(0, 1000, shape)
    elif fill == "constant":
        volume = np.full(shape, 7.0)
    elif fill == "extreme":
        volume = np.where(rng.random(shape) > 0.5, np.finfo(np.float32).max / 2, 0.0)
    else:
        volume = rng.uniform(0, 1000, shape)
        volume[tuple(0 for _ in shape)] = np.nan if fill == "nan" else np.inf
    if not np.issubdtype(dtype, np.floating):
        volume = np.nan_to_num(volume, nan=0, posinf=0).clip(np.iinfo(dtype).min, np.iinfo(dtype).max)
    path = tmp_path_factory.mktemp("shapes") / "scan.nii.gz"
    with np.errstate(invalid="ignore", over="ignore"):
        stored = volume.astype(dtype)
    image = nib.Nifti1Image(stored, np.eye(4), dtype=dtype)  # int64 only when asked for by name
    image.header.set_sform(affine, code=1)  # written as it is: nibabel would refuse some as a constructor affine
    image.header.set_qform(None, code=0)
    nib.save(image, str(path))
    _read_and_prepare(path)


@FUZZ
@given(tags=st.dictionaries(
    st.sampled_from(["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                     "RescaleSlope", "RescaleIntercept", "InstanceNumber"]),
    st.lists(st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.just(0.0)), min_size=1, max_size=6),
    min_size=1, max_size=3),
    which=st.integers(0, 3))
@example(tags={"SliceThickness": [0.0], "PixelSpacing": [0.0, 8.844352569174403e-236]}, which=0)  # found by CI
def test_random_dicom_geometry_tags_are_read_or_refused(tmp_path_factory, tags, which):
    import pydicom

    from tests.data.test_readers import AXIAL, _write_series

    folder = _write_series(tmp_path_factory.mktemp("dicom") / "series", [(AXIAL, 2.0 * k) for k in range(4)])
    target = sorted(folder.iterdir())[which]
    ds = pydicom.dcmread(str(target))
    for keyword, values in tags.items():
        if keyword == "InstanceNumber":
            setattr(ds, keyword, int(values[0]))
        elif keyword in ("SliceThickness", "RescaleSlope", "RescaleIntercept"):
            setattr(ds, keyword, f"{values[0]:.6g}")
        else:
            setattr(ds, keyword, [f"{v:.6g}" for v in values])
    ds.save_as(str(target))
    _read_and_prepare(folder)


@pytest.mark.parametrize("kind", ["nii", "nii.gz", "nrrd"])
def test_absurd_sizes_are_refused_from_the_header_before_allocation(tmp_path, kind):
    """A header claiming 4096^3 voxels (128 GiB as float32) on a file of a few hundred bytes."""
    path = tmp_path / f"huge.{kind}"
    if kind == "nrrd":
        header = b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4096 4096 4096\nendian: little\nencoding: raw\n\n"
        path.write_bytes(header + b"\0" * 64)
    else:
        header = nib.Nifti1Header()
        header.set_data_shape((4096, 4096, 4096))
        header.set_data_dtype(np.int16)
        header["vox_offset"] = 352
        raw = header.binaryblock + b"\0" * 4 + b"\0" * 64
        path.write_bytes(gzip.compress(raw) if kind == "nii.gz" else raw)
    with pytest.raises(ScanError, match=r"4096 x 4096 x 4096 = 68,719,476,736 voxels, more than the 536,870,912"):
        load_scan(path)
    assert MAX_SCAN_VOXELS == 2**29
