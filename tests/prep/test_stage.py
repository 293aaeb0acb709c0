"""The preparation stage: geometry there and back, registration against a known head motion, brain
extraction against DLMUSE, failures as per-scan errors, and the cache."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813

from medflowad.data.readers import LPS_TO_RAS, ScanError, load_scan
from medflowad.data.scans import ScanPreprocessing, display_to_volume, to_native
from medflowad.prep import prepare, stage
from medflowad.prep.batch import prepare_scans
from medflowad.prep.brain import extract_brain
from medflowad.prep.template import load_template, standard_grid
from tests.conftest import data_root
from tests.prep.conftest import head_motion, moved_template_scan, oblique_head_grid

STANDARD = ScanPreprocessing(space="standard", brain="auto", percentiles=(0.0, 100.0))
POINT_MM = np.array([24.0, -20.0, 22.0])  # template world (RAS): deep white matter of the right hemisphere


def _centroid(volume: np.ndarray, level: float) -> np.ndarray:
    index = np.argwhere(volume >= level)
    return np.average(index, axis=0, weights=volume[tuple(index.T)])


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """An oblique, LPS-stored, anisotropic head with a bright ball; (path, motion, ball's native index)."""
    folder = tmp_path_factory.mktemp("planted")
    affine, shape = oblique_head_grid()
    motion = head_motion()
    path = moved_template_scan(folder / "head.nii.gz", motion, affine, shape, point_mm=POINT_MM)
    native_index = (np.linalg.inv(affine) @ motion @ np.append(POINT_MM, 1.0))[:3]
    return path, motion, native_index


def test_planted_point_lands_within_one_native_voxel(planted, tmp_path):
    """Native -> standard grid -> native again: the ball's centre moves by less than one native voxel on each
    axis, and in standard space it sits where the known head motion puts it (within one standard voxel)."""
    path, _, native_index = planted
    prepared = prepare(path, STANDARD, cache=tmp_path)
    grid = display_to_volume(prepared.slices[:, 0].numpy().astype(np.float32) / 255)
    grid_affine, grid_shape = standard_grid(STANDARD.image_size, STANDARD.slice_mm)
    assert grid.shape == grid_shape and np.allclose(prepared.grid.affine.numpy(), grid_affine)
    in_standard = nib.affines.apply_affine(grid_affine, _centroid(grid, 0.75))
    assert np.all(np.abs(in_standard - POINT_MM) <= np.diag(grid_affine)[:3]), (in_standard, POINT_MM)

    back = to_native(prepared.slices[:, 0].numpy().astype(np.float32) / 255, prepared)
    assert back.shape == tuple(load_scan(path).shape[1:])
    found = _centroid(back, 0.75 * back.max())
    assert np.all(np.abs(found - native_index) <= 1.0), (found, native_index)


def test_registration_recovers_a_known_head_motion(planted, tmp_path):
    path, motion, _ = planted
    preparation = stage.run_preparation(load_scan(path), STANDARD, cache=tmp_path)
    assert preparation.info["template_overlap"] > 0.95
    low = np.argwhere(load_template().brain).min(axis=0)
    high = np.argwhere(load_template().brain).max(axis=0)
    corners = np.array([[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])
    world = nib.affines.apply_affine(load_template().affine, corners)
    error = nib.affines.apply_affine(preparation.transform, world) - nib.affines.apply_affine(motion, world)
    assert np.linalg.norm(error, axis=1).max() < 2.0  # mm, at the corners of the brain's bounding box


def test_stored_transform_file_is_the_same_transform(planted, tmp_path):
    """transform.tfm, read by SimpleITK, maps template points as preparation.json's RAS matrix does."""
    path, _, _ = planted
    rows = prepare_scans([path], STANDARD, tmp_path / "out", cache=tmp_path / "cache")
    folder = tmp_path / "out" / rows[0]["folder"]
    matrix = np.array(json.loads((folder / "preparation.json").read_text())["template_to_scan_ras"])
    transform = sitk.ReadTransform(str(folder / "transform.tfm"))
    for point in ([0.0, 0.0, 0.0], [40.0, -60.0, 30.0], [-55.0, 20.0, -10.0]):
        lps = (LPS_TO_RAS @ np.append(point, 1.0))[:3]
        moved = (LPS_TO_RAS @ np.append(transform.TransformPoint(lps.tolist()), 1.0))[:3]
        assert np.allclose(moved, (matrix @ np.append(point, 1.0))[:3], atol=1e-4)
    standard = nib.load(str(folder / "standard.nii.gz"))
    assert int(standard.header["sform_code"]) == 4 and standard.shape == standard_grid(64, 3.0)[1]


def test_failed_registration_is_that_scans_error_and_the_batch_goes_on(planted, tmp_path, monkeypatch):
    """A registration forced to fail (a transform 40 mm off) fails its scan with the reason; the others pass."""
    path, _, _ = planted
    bad = tmp_path / "bad_head.nii.gz"
    bad.write_bytes(Path(path).read_bytes())
    broken = nib.load(str(bad))
    nib.save(nib.Nifti1Image(np.asarray(broken.dataobj) * 1.01, broken.affine, broken.header), str(bad))
    register = stage.register_affine

    def sometimes_wrong(template, template_affine, brain, brain_affine):
        transform = register(template, template_affine, brain, brain_affine)
        if brain.max() > 1.005 * 2 * load_template().image.max():  # the scaled copy: bad_head
            transform = transform.copy()
            transform[0, 3] += 40.0
        return transform

    monkeypatch.setattr(stage, "register_affine", sometimes_wrong)
    rows = prepare_scans([bad, path], STANDARD, tmp_path / "out", cache=tmp_path / "cache")
    status = {row["scan_id"]: row for row in rows}
    assert status["bad_head"]["status"] == "error"
    assert "registration to the MNI template failed" in status["bad_head"]["error"]
    assert str(bad) in status["bad_head"]["error"]
    assert status["head"]["status"] == "ok" and (tmp_path / "out" / "head" / "standard.nii.gz").is_file()
    assert not (tmp_path / "out" / "bad_head").exists()
    table = (tmp_path / "out" / "preparation.csv").read_text()
    assert "bad_head,error," in table and "head,ok," in table


def test_second_run_reads_the_cache_without_registering(planted, tmp_path, monkeypatch):
    path, _, _ = planted
    first = prepare(path, STANDARD, cache=tmp_path)

    def no_registration(*args, **kwargs):
        raise AssertionError("registered again although the cache holds the result")

    monkeypatch.setattr(stage, "register_affine", no_registration)
    monkeypatch.setattr(stage, "extract_brain", no_registration)
    second = prepare(path, STANDARD, cache=tmp_path)
    assert np.array_equal(first.slices.numpy(), second.slices.numpy())
    assert np.array_equal(first.foreground, second.foreground) and np.array_equal(first.brain, second.brain)
    assert np.allclose(first.transform, second.transform, atol=1e-12)
    entries = list((tmp_path / "prepared").iterdir())
    assert len(entries) == 1 and not list(tmp_path.glob("prepared/.*"))  # one entry, no staging left
    # Other settings that shape the result are another entry (and would register).
    with pytest.raises(AssertionError, match="registered again"):
        prepare(path, STANDARD.overridden(slice_mm=4.0), cache=tmp_path)


def test_implausible_brain_mask_is_refused(planted, tmp_path):
    path, _, _ = planted
    scan = load_scan(path)
    tiny = np.zeros(scan.shape[1:], dtype=bool)
    tiny[70:75, 90:95, 28:31] = True  # 75 voxels, 0.24 mL
    config = STANDARD.overridden(brain="deepbet")
    with pytest.raises(ScanError, match=r"implausible brain mask: 0 mL, outside the expected 400-2500 mL"):
        stage.run_preparation(scan, config, given_brain=tiny, cache=tmp_path)
    with pytest.raises(ScanError, match="empty brain mask"):
        stage.run_preparation(scan, config, given_brain=np.zeros_like(tiny), cache=tmp_path)


@pytest.mark.skipif(data_root() is None, reason="real data not found: set MEDFLOWAD_DATA")
def test_deepbet_brain_extraction_on_ixi_heads_against_dlmuse():
    """Dice >= 0.90 against DLMUSE (label > 0) for each of the 7 IXI T1 heads (skull and neck on)."""
    folder = data_root() / "medical" / "ixi_t1_2mm"
    heads = sorted(folder.glob("*_T1.nii.gz"))
    assert len(heads) == 7
    for head in heads:
        image = nib.load(str(head))
        reference = np.asarray(nib.load(str(head).replace("_T1", "_dlmuse")).dataobj) > 0
        mask = extract_brain(np.asarray(image.dataobj, dtype=np.float32), image.affine, "deepbet", 0.1)
        dice = 2 * np.logical_and(mask, reference).sum() / (mask.sum() + reference.sum())
        assert dice >= 0.90, (head.name, dice)


def test_prepare_command_goes_on_past_a_broken_scan(planted, tmp_path, monkeypatch):
    from medflowad.cli.app import app
    from typer.testing import CliRunner

    path, _, _ = planted
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a scan")
    monkeypatch.setenv("MEDFLOWAD_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["prepare", str(broken), str(path), "-o", str(tmp_path / "out"),
                                      "--space", "standard", "--brain", "auto", "-q"])
    assert result.exit_code == 1, result.output
    assert "1 of 2 scans failed" in result.output
    rows = json.loads((tmp_path / "out" / "preparation.json").read_text())["scans"]
    assert [(r["scan_id"], r["status"]) for r in rows] == [("broken", "error"), ("head", "ok")]
    assert str(broken) in rows[0]["error"] and "cannot read scan" in rows[0]["error"]
    assert (tmp_path / "out" / "head" / "transform.tfm").is_file()
    again = CliRunner().invoke(app, ["prepare", str(path), "-o", str(tmp_path / "again"), "--space", "standard",
                                     "--brain", "auto", "-q"])
    assert again.exit_code == 0 and "(1 from the cache)" in " ".join(again.output.split())


def test_prepare_command_takes_a_bundled_model_name(planted, tmp_path, monkeypatch):
    """`prepare -c demo` runs the bundled demo model's preparation (as `score --model demo` reads it)."""
    from medflowad.cli.app import app
    from typer.testing import CliRunner

    from medflowad.mri.config import load_mri_config
    from medflowad.mri.model import resolve_model_dir

    path, _, _ = planted
    monkeypatch.setenv("MEDFLOWAD_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["prepare", str(path), "-o", str(tmp_path / "out"), "-c", "demo",
                                      "--brain", "auto", "-q"])
    assert result.exit_code == 0, result.output
    prepared = nib.load(str(tmp_path / "out" / "head" / "standard.nii.gz"))
    demo = load_mri_config(str(resolve_model_dir("demo") / "mri.yaml")).preprocessing
    assert prepared.shape[:2] == (demo.image_size, demo.image_size)


def test_registration_that_stretches_the_brain_is_refused(planted, tmp_path):
    """A header whose slice distance is 4x too small (as LGG's nominal 1 mm) gives an affine that stretches the
    brain far beyond any head size: refused by max_template_scaling even where the masks overlap well."""
    path, _, _ = planted
    image = nib.load(str(path))
    squashed = image.affine.copy()
    squashed[:3, 2] /= 4  # the third axis' voxel size written as 0.75 mm instead of 3 mm
    wrong = tmp_path / "wrong_header.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), squashed), str(wrong))
    with pytest.raises(ScanError, match=r"scales the brain by .* outside 0.67-1.5 \(preprocessing.max_template"):
        prepare(wrong, STANDARD, cache=tmp_path)
    entry = json.loads(next((tmp_path / "prepared").glob("*/preparation.json")).read_text())
    assert min(entry["template_scalings"]) < 1 / 1.5  # stored, so a wider bound needs no new registration


def test_standard_image_keeps_a_ball_brighter_than_the_brain(planted, tmp_path):
    """The planted ball is twice the brain's maximum: the slices saturate at 255 there, while the unclipped image
    (and the cached standard.nii.gz, as written) keeps it far above 1 at the ball's place in the template."""
    path, _, _ = planted
    config = ScanPreprocessing(space="standard", brain="auto")  # percentiles 0.5-99.5
    prepared = prepare(path, config, cache=tmp_path)
    unclipped = prepared.unclipped
    peak = np.unravel_index(np.argmax(unclipped), unclipped.shape)
    assert unclipped[peak] > 1.5 and prepared.slices[peak[0], 0][peak[1:]] == 255
    grid_affine, _ = standard_grid(config.image_size, config.slice_mm)
    volume = display_to_volume(unclipped)
    at = nib.affines.apply_affine(grid_affine, np.unravel_index(np.argmax(volume), volume.shape))
    assert np.all(np.abs(at - POINT_MM) <= 1.5 * np.abs(np.diag(grid_affine)[:3])), (at, POINT_MM)
    # the model's input is that image clipped at 1
    clipped = np.round(np.minimum(unclipped, 1.0) * 255).astype(np.uint8)
    assert np.array_equal(prepared.slices[:, 0].numpy(), clipped)
    (entry,) = [p for p in (tmp_path / "prepared").iterdir() if (p / "standard.nii.gz").exists()]
    assert np.allclose(nib.load(str(entry / "standard.nii.gz")).get_fdata(), volume, atol=1e-6)


def test_standard_space_maps_resampled_together_equal_maps_resampled_alone(planted, tmp_path):
    path, _, _ = planted
    prepared = prepare(path, STANDARD, cache=tmp_path)
    maps = np.random.default_rng(3).normal(size=(2, *prepared.foreground.shape)).astype(np.float32)
    together = to_native(maps, prepared)
    for k in range(2):
        assert np.array_equal(together[k], to_native(maps[k], prepared))


def test_a_z_scored_scan_gives_the_slices_of_the_scan_itself(planted, tmp_path):
    """Percentile normalisation ignores a scan's offset and scale, so a z-scored copy of a scan (negative values in
    half its brain) must give the model the same slices. The skull was removed by multiplying by the brain mask,
    which put the outside at 0, about a z-scored brain's mean: mid-grey around the brain after normalisation."""
    head = nib.load(planted[0])
    data = head.get_fdata(dtype=np.float32)
    brain = data > 0.05 * data.max()
    z_scored = np.where(brain, (data - data[brain].mean()) / data[brain].std(), 0.0).astype(np.float32)
    assert (z_scored[brain] < 0).mean() > 0.3
    paths = {}
    for name, array in (("head", data), ("z_scored", z_scored), ("brain", brain.astype(np.uint8))):
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(array, head.affine), str(paths[name]))
    config = ScanPreprocessing(space="native", brain="deepbet")  # a given mask: no extraction runs
    mask = load_scan(paths["brain"])
    plain, shifted = (stage.prepare_volume(load_scan(paths[name]), config, brain_mask=mask, cache=tmp_path / "cache")
                      for name in ("head", "z_scored"))
    assert shifted.slices[plain.slices == 0].max() == 0  # was mid-grey around the brain
    assert (plain.slices.int() - shifted.slices.int()).abs().max() <= 1  # 8-bit rounding of equal values


def test_standard_image_puts_the_brain_s_median_at_upper_level():
    """The standard grid's normalisation, by hand: 0.4 (v - p0.5) / (median - p0.5) inside the brain, 0 outside."""
    rng = np.random.default_rng(1)
    image = rng.uniform(50.0, 250.0, (12, 10, 8)).astype(np.float32)
    brain = np.zeros(image.shape, bool)
    brain[2:10, 2:8, 1:7] = True
    config = ScanPreprocessing(space="standard", percentiles=(0.5, 50.0), upper_level=0.4)
    low, median = np.percentile(image[brain], [0.5, 50.0])
    expected = np.where(brain, np.maximum(0.4 * (image - low) / (median - low), 0.0), 0.0)
    assert np.allclose(stage._normalised(image, brain, config, "x"), expected, atol=1e-6)


def test_standard_slices_carry_a_linear_field_onto_the_grid_through_the_transform():
    """A native volume whose value is world x (RAS mm) on an oblique 1 mm grid, put onto the 3 mm standard grid
    through a known shift: each standard pixel is the mean of samples inside it, and the mean of a linear field is
    its value at the pixel's centre, that centre's x in the native world (nibabel's apply_affine)."""
    native_affine = np.array([[0.0, -1.0, 0.0, 100.0], [1.0, 0.0, 0.0, -120.0], [0.0, 0.0, 1.0, -80.0], [0, 0, 0, 1]])
    shape = (240, 240, 200)
    index = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1).reshape(-1, 3)
    field = nib.affines.apply_affine(native_affine, index)[:, 0].reshape(shape).astype(np.float32)
    grid_affine, grid_shape = standard_grid(64, 3.0)
    shift = np.eye(4)
    shift[:3, 3] = [4.0, -2.5, 1.0]  # grid world -> native world
    slices = stage.standard_slices(field, native_affine, grid_affine, grid_shape, shift)
    centres = np.stack(np.meshgrid(*(np.arange(n) for n in grid_shape), indexing="ij"), axis=-1).reshape(-1, 3)
    expected = nib.affines.apply_affine(shift @ grid_affine, centres)[:, 0].reshape(grid_shape)
    values = display_to_volume(slices)
    inside = values != 0  # the native volume covers the grid's middle, not its corners
    assert inside.mean() > 0.5
    checked = inside & (np.abs(expected) > 5)  # away from x = 0, where a value of 0 would pass for outside
    np.testing.assert_allclose(values[checked], expected[checked], atol=0.05)
