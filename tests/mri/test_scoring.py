"""Batch scoring robustness, calibration arithmetic, pool building and lesion metrics."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from medflowad.cli.app import app
from typer.testing import CliRunner

from medflowad.data.scans import ScanPreprocessing
from medflowad.mri.analysis import aggregate, conformal_p_value, threshold_at_fpr
from medflowad.mri.evaluate import best_dice, dice, slice_centrality
from medflowad.mri.pool import build_pool
from tests.mri.conftest import brain_like, oblique_lps_affine, save_nifti


def test_corrupt_scan_does_not_stop_the_batch(tiny_mri_model, tmp_path):
    good_a = save_nifti(tmp_path / "a.nii.gz", brain_like(seed=21), oblique_lps_affine())
    good_b = save_nifti(tmp_path / "b.nii.gz", brain_like(seed=22), np.diag([0.8, 0.8, 5.0, 1.0]))
    corrupt = tmp_path / "c.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08" + b"truncated gzip")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["score", str(good_a), str(corrupt), str(good_b),
                                      "-m", str(tiny_mri_model), "-o", str(out), "-q", "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "c.nii.gz" in result.output and "1 of 3 scans failed" in result.output
    for sid, path in (("a", good_a), ("b", good_b)):
        written = nib.load(str(out / f"{sid}_anomaly.nii.gz"))
        assert written.shape == nib.load(str(path)).shape
        assert np.isfinite(np.asarray(written.dataobj)).all()
    assert not list(out.glob("c_*"))
    assert not [p for p in out.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    rows = {r["scan_id"]: r for r in json.loads((out / "scores.json").read_text())["scans"]}
    assert rows["c"]["status"] == "error" and "c.nii.gz" in rows["c"]["error"]
    assert rows["a"]["status"] == rows["b"]["status"] == "ok"
    assert 0 < rows["a"]["llr_p"] <= 1
    csv_lines = (out / "scores.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("scan_id,status,error,path")


def test_conformal_p_values_and_thresholds_by_hand():
    calibration = np.array([1.0, 2.0, 3.0, 4.0])
    assert conformal_p_value(5.0, calibration) == pytest.approx(1 / 5)
    assert conformal_p_value(3.0, calibration) == pytest.approx(3 / 5)  # 3 and 4 are >= 3
    assert conformal_p_value(0.0, calibration) == pytest.approx(1.0)
    assert np.isnan(conformal_p_value(float("nan"), calibration))
    values = np.arange(1, 101, dtype=float)
    t = threshold_at_fpr(values, 0.05)
    assert (values > t).mean() <= 0.05 and (values >= t).mean() > 0.05


def test_scan_aggregation_is_mean_of_top_fraction():
    scores = np.array([1.0, np.nan, 5.0, 3.0, 4.0, 2.0, np.nan, 0.0, 6.0, 7.0, 8.0, 9.0])
    # 10 finite values, top 20 % = 2 slices: 9 and 8
    assert aggregate(scores, 0.2) == pytest.approx(8.5)
    assert aggregate(scores, 0.01) == pytest.approx(9.0)  # at least one slice
    assert np.isnan(aggregate(np.array([np.nan]), 0.1))


def test_dice_and_best_dice_against_brute_force():
    rng = np.random.default_rng(0)
    truth = rng.random(500) < 0.2
    scores = truth * 1.0 + rng.normal(0, 0.7, 500)
    assert dice(np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool)) == pytest.approx(0.5)
    brute = max(dice(scores >= t, truth) for t in np.unique(scores))
    assert best_dice(scores, truth)[0] == pytest.approx(brute)


def test_slice_centrality_by_hand():
    keep = np.array([False, True, True, False, True, True, True, False])  # scored slices 1..6, gap at 3
    expected = [np.nan, 0.0, 0.4, np.nan, 0.8, 0.4, 0.0, np.nan]  # 1 - 2|(k - 1)/5 - 0.5|
    np.testing.assert_allclose(slice_centrality(keep), expected)
    np.testing.assert_array_equal(slice_centrality(np.array([False, True])), [np.nan, 1.0])
    assert np.isnan(slice_centrality(np.zeros(3, bool))).all()


def test_pool_manifest_lists_sources_and_skips_labels(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    save_nifti(src / "scan.nii.gz", brain_like(), np.eye(4))
    save_nifti(src / "scan_mask.nii.gz", (brain_like() > 0).astype(np.uint8), np.eye(4))
    for segmentation in ("scan_DLMUSE.nii.gz", "aparc+aseg.nii.gz"):  # segmenters' label maps beside scans
        save_nifti(src / segmentation, (brain_like() > 0).astype(np.uint8) * 4, np.eye(4))
    save_nifti(src / "scan_anomaly.nii.gz", brain_like(seed=5), np.eye(4))  # a map score wrote: not a scan
    from PIL import Image

    picture = (np.clip(brain_like(shape=(40, 40, 1))[..., 0], 0, 255)).astype(np.uint8)
    Image.fromarray(picture).save(src / "slice.png")
    (src / "broken.png").write_bytes(b"nope")
    manifest = build_pool([src], tmp_path / "pool", ScanPreprocessing(image_size=32, min_foreground=0.05))
    by_name = {Path(s["path"]).name: s for s in manifest["sources"]}
    assert not {"scan_mask.nii.gz", "scan_anomaly.nii.gz", "scan_DLMUSE.nii.gz", "aparc+aseg.nii.gz"} & set(by_name)
    assert by_name["scan.nii.gz"]["slices"] > 5 and by_name["slice.png"]["slices"] == 1
    assert "broken.png" in by_name["broken.png"]["error"]
    from medflowad.data import load_image_set

    pool = load_image_set(str(tmp_path / "pool"))
    assert pool.images.shape[1:] == (1, 32, 32)
    assert len(pool) == manifest["total_slices"]
    config = ScanPreprocessing(image_size=32, min_foreground=0.05)
    with pytest.raises(FileExistsError, match=r"pool already holds a pool \(\d+ slices from 3 sources\)"):
        build_pool([src / "scan.nii.gz"], tmp_path / "pool", config)
    assert len(build_pool([src / "scan.nii.gz"], tmp_path / "pool", config, overwrite=True)["sources"]) == 1


def test_given_brain_mask_limits_the_map(tiny_mri_model, tmp_path):
    from scipy import ndimage

    from medflowad.mri.score import score_scans

    volume = brain_like(seed=31)
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    save_nifti(tmp_path / "p.nii.gz", volume, affine)
    mask = np.zeros(volume.shape, np.uint8)
    mask[8:30, 10:40, :] = 1
    save_nifti(tmp_path / "p_brain.nii.gz", mask, affine)
    result = score_scans([tmp_path / "p.nii.gz"], tiny_mri_model, tmp_path / "out", device="cpu",
                         brain_masks=(".nii.gz", "_brain.nii.gz"))
    assert result.all_ok, result.rows
    written = np.asarray(nib.load(str(tmp_path / "out" / "p_anomaly.nii.gz")).dataobj)
    outside = ~ndimage.binary_dilation(mask.astype(bool), iterations=3)
    assert np.abs(written[outside]).max() == 0
    assert np.abs(written[mask.astype(bool)]).max() > 0


def test_scoring_into_a_folder_adds_to_earlier_results(tiny_mri_model, tmp_path, monkeypatch):
    from medflowad.mri.score import score_scans

    first, second = tmp_path / "site1" / "x.nii.gz", tmp_path / "site2" / "x.nii.gz"
    first.parent.mkdir()
    second.parent.mkdir()
    save_nifti(first, brain_like(seed=41), np.eye(4))
    save_nifti(second, brain_like(shape=(40, 50, 9), seed=42), np.eye(4))
    other = save_nifti(tmp_path / "a.nii.gz", brain_like(seed=43), np.eye(4))
    out = tmp_path / "out"
    score_scans([first, other], tiny_mri_model, out, device="cpu")
    first_map = (out / "x_anomaly.nii.gz").read_bytes()
    # another scan with the same file name gets its own id instead of overwriting x's maps
    result = score_scans([second], tiny_mri_model, out, device="cpu")
    assert [r["scan_id"] for r in result.rows] == ["x_2"]
    assert (out / "x_anomaly.nii.gz").read_bytes() == first_map
    assert nib.load(str(out / "x_2_anomaly.nii.gz")).shape == (40, 50, 9)
    rows = {r["scan_id"]: r for r in json.loads((out / "scores.json").read_text())["scans"]}
    assert sorted(rows) == ["a", "x", "x_2"]
    assert rows["x"]["path"] == str(first.resolve()) and rows["x_2"]["path"] == str(second.resolve())
    slice_ids = [line.split(",")[0] for line in (out / "slices.csv").read_text().splitlines()[1:]]
    assert {sid: slice_ids.count(sid) for sid in rows} == {"a": 14, "x": 14, "x_2": 9}
    assert len((out / "scores.csv").read_text().splitlines()) == 4
    slices_before = (out / "slices.csv").read_text().splitlines()

    def interrupt(sid, row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # stopped after scoring a again, before x_2
        score_scans([other, second], tiny_mri_model, out, device="cpu", on_scan=interrupt)
    rows = json.loads((out / "scores.json").read_text())["scans"]
    assert sorted(r["scan_id"] for r in rows) == ["a", "x", "x_2"]  # nothing lost, nothing twice
    # a scored again gives the same rows (scoring is deterministic), the others are kept as they were
    assert sorted((out / "slices.csv").read_text().splitlines()) == sorted(slices_before)
    # the same file named another way is the same scan; when it now fails, its old maps go
    first.write_bytes(b"\x1f\x8b\x08" + b"truncated gzip")
    relative = Path("..") / first.relative_to(tmp_path)
    monkeypatch.chdir(out)
    result = score_scans([relative], tiny_mri_model, Path("."), device="cpu")
    assert [(r["scan_id"], r["status"]) for r in result.rows] == [("x", "error")]
    assert not list(out.glob("x_anomaly*")) and (out / "x_2_anomaly.nii.gz").exists()
    rows = {r["scan_id"]: r["status"] for r in json.loads((out / "scores.json").read_text())["scans"]}
    assert rows == {"a": "ok", "x_2": "ok", "x": "error"}


def test_continue_skips_scans_already_scored(tiny_mri_model, tmp_path):
    scans = [save_nifti(tmp_path / f"{name}.nii.gz", brain_like(seed=50 + i), np.eye(4))
             for i, name in enumerate("ab")]
    out = tmp_path / "out"
    command = ["score", "-m", str(tiny_mri_model), "-o", str(out), "-q", "--device", "cpu", "--report"]
    assert CliRunner().invoke(app, [*command, str(scans[0])]).exit_code == 0
    before = {p.name: p.stat().st_ino for p in out.glob("a_*.nii.gz")}
    result = CliRunner().invoke(app, [*command, "--continue", *map(str, scans)])
    assert result.exit_code == 0, result.output
    assert "1 scans were scored before" in result.output
    assert {p.name: p.stat().st_ino for p in out.glob("a_*.nii.gz")} == before  # not written again
    assert (out / "b_anomaly.nii.gz").exists()
    report = (out / "report.html").read_text()
    assert '<section id="a">' in report and '<section id="b">' in report
    slice_ids = [line.split(",")[0] for line in (out / "slices.csv").read_text().splitlines()[1:]]
    assert slice_ids.count("a") == slice_ids.count("b") == 14
    # without --continue a scan is scored again: new files
    assert CliRunner().invoke(app, [*command, str(scans[0])]).exit_code == 0
    assert {p.name: p.stat().st_ino for p in out.glob("a_*.nii.gz")}.keys() == before.keys()
    assert all(p.stat().st_ino != before[p.name] for p in out.glob("a_*.nii.gz"))
    assert '<section id="b">' in (out / "report.html").read_text()  # earlier scans keep their figures
    scans[1].unlink()
    result = CliRunner().invoke(app, [*command, str(scans[0])])
    assert result.exit_code == 0 and "b: no report figures" in result.output
    report = (out / "report.html").read_text()
    assert '<section id="a">' in report and '<section id="b">' not in report and "<td>b</td><td>ok" in report


def test_results_of_another_model_or_fpr_are_not_mixed(tiny_mri_model, tmp_path):
    import shutil

    from medflowad.mri.score import score_scans

    scan = save_nifti(tmp_path / "a.nii.gz", brain_like(seed=61), np.eye(4))
    out = tmp_path / "out"
    score_scans([scan], tiny_mri_model, out, device="cpu")
    copy = shutil.copytree(tiny_mri_model, tmp_path / "same_model_elsewhere")
    assert score_scans([scan], copy, out, device="cpu").all_ok  # same files: the same model
    before = (out / "scores.json").read_bytes()
    with pytest.raises(ValueError, match="another model or false-positive rate"):
        score_scans([scan], copy, out, device="cpu", fpr=0.2)
    calibration = copy / "calibration.json"
    calibration.write_text(calibration.read_text() + " ")
    result = CliRunner().invoke(app, ["score", str(scan), "-m", str(copy), "-o", str(out), "-q", "--device", "cpu"])
    assert result.exit_code == 2 and "another model" in result.output
    assert (out / "scores.json").read_bytes() == before
    old_version = json.loads(before)
    del old_version["model_sha256"]
    (out / "scores.json").write_text(json.dumps(old_version))
    with pytest.raises(ValueError, match="an older medflowad's scores"):
        score_scans([scan], tiny_mri_model, out, device="cpu")


def test_maps_of_earlier_runs_are_not_scored_as_scans(tiny_mri_model, tmp_path, monkeypatch):
    import shutil

    from medflowad.data.readers import find_scans
    from medflowad.mri.score import score_scans

    save_nifti(tmp_path / "a.nii.gz", brain_like(seed=71), np.eye(4))
    monkeypatch.chdir(tmp_path)
    first = score_scans(["."], tiny_mri_model, Path("results"), device="cpu")  # the output inside the input
    assert [r["scan_id"] for r in first.rows] == ["a"]
    (tmp_path / "results" / "scores_notes.nii.gz").write_bytes((tmp_path / "a.nii.gz").read_bytes())
    again = score_scans(["."], tiny_mri_model, Path("results"), device="cpu")
    assert [r["scan_id"] for r in again.rows] == ["a"]  # neither its maps nor anything else in results/
    shutil.copy(tmp_path / "results" / "a_anomaly.nii.gz", tmp_path / "old_anomaly.nii.gz")
    assert [p.name for p in find_scans(["."])] == ["a.nii.gz", "scores_notes.nii.gz"]  # maps skipped anywhere
    assert [p.name for p in find_scans(["old_anomaly.nii.gz"])] == ["old_anomaly.nii.gz"]  # named: a scan


def test_interrupted_score_says_how_to_continue(tiny_mri_model, tmp_path, monkeypatch):
    import medflowad.mri.score

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(medflowad.mri.score, "score_scans", interrupted)
    scan = save_nifti(tmp_path / "a.nii.gz", brain_like(seed=81), np.eye(4))
    result = CliRunner().invoke(app, ["score", str(scan), "-m", str(tiny_mri_model), "-o", str(tmp_path / "o"), "-q"])
    assert result.exit_code == 130 and "with --continue scores the rest" in result.output


def test_scans_named_as_another_modality_get_a_warning(tiny_mri_model, tmp_path):
    from medflowad.mri.model import load_mri_model
    from medflowad.mri.score import score_scans

    modality = load_mri_model(tiny_mri_model, "cpu").config.modality
    other = "T1w" if modality != "t1" else "T2w"
    (tmp_path / "in").mkdir()
    for name in (f"sub-1_{other}", f"sub-1_{modality}", "sub-2"):
        save_nifti(tmp_path / "in" / f"{name}.nii.gz", brain_like(seed=91), np.eye(4))
    result = score_scans([tmp_path / "in"], tiny_mri_model, tmp_path / "out", device="cpu")
    assert result.all_ok and len(result.rows) == 3
    assert f"1 scans are named as another modality than the model's {modality} (sub-1_{other})" in result.warning
    assert json.loads((tmp_path / "out" / "scores.json").read_text())["warning"] == result.warning


def test_tables_are_rewritten_sparingly_and_always_at_the_end(tiny_mri_model, tmp_path, monkeypatch):
    import medflowad.mri.score as score
    import medflowad.mri.tables as tables

    writes = []
    original = tables.write_tables
    monkeypatch.setattr(tables, "write_tables", lambda result: (writes.append(len(result.rows)), original(result)))
    monkeypatch.setattr(tables, "TABLE_INTERVAL_S", 3600.0)
    scans = [save_nifti(tmp_path / f"{n}.nii.gz", brain_like(seed=100 + i), np.eye(4)) for i, n in enumerate("abc")]
    score.score_scans(scans, tiny_mri_model, tmp_path / "out", device="cpu")
    assert writes == [1, 3]  # after the first scan, then at the end: not after every scan
    assert len(json.loads((tmp_path / "out" / "scores.json").read_text())["scans"]) == 3
    writes.clear()

    def interrupt_second(sid, row):
        if sid == "b":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        score.score_scans(scans, tiny_mri_model, tmp_path / "out2", device="cpu", on_scan=interrupt_second)
    assert writes == [1, 2]  # the interruption still writes the scans finished
    assert [r["scan_id"] for r in json.loads((tmp_path / "out2" / "scores.json").read_text())["scans"]] == ["a", "b"]


def test_scans_that_trained_or_calibrated_the_model_get_a_warning(tiny_mri_model, tmp_path):
    from medflowad.mri.score import score_scans

    healthy = [tiny_mri_model.parent / f"healthy_{i}.nii.gz" for i in range(3)]  # the fixture's healthy scans
    val = json.loads((tiny_mri_model / "data" / "healthy_val" / "manifest.json").read_text())["sources"]
    calibrating = {Path(s["path"]).name for s in val}
    fresh = save_nifti(tmp_path / "new.nii.gz", brain_like(seed=111), np.eye(4))
    result = score_scans([*healthy, fresh], tiny_mri_model, tmp_path / "out", device="cpu")
    assert f"{3 - len(calibrating)} of these scans trained the model and {len(calibrating)} calibrated it" \
        in result.warning
    leaked = next(part for part in result.warning.split("; ") if "trained the model" in part)
    assert "new" not in leaked.split("trained the model")[1]
    assert "trained the model" not in score_scans([fresh], tiny_mri_model, tmp_path / "out2", device="cpu").warning


def test_evaluating_on_training_scans_is_pointed_out(tiny_mri_model, tmp_path):
    import shutil

    from medflowad.mri.evaluate import evaluate_scans, metrics_markdown

    scan = tiny_mri_model.parent / "healthy_0.nii.gz"  # trained or calibrated the fixture's model
    affine = nib.load(str(scan)).affine
    lesion = np.zeros(nib.load(str(scan)).shape, np.uint8)
    lesion[20:26, 20:28, 5:8] = 1
    fresh = shutil.copy(scan, tmp_path / "fresh.nii.gz")
    shared_mask = scan.parent / "healthy_0_mask.nii.gz"  # beside the fixture's scan, removed again below
    for target in (tmp_path / "fresh_mask.nii.gz", shared_mask):
        save_nifti(target, lesion, affine)
    masks = (".nii.gz", "_mask.nii.gz")
    try:
        result = evaluate_scans(tiny_mri_model, [scan, fresh], masks, device="cpu")
    finally:
        shared_mask.unlink()
    assert result["scans"] == 2 and result["trained_or_calibrated"] == [str(scan)]
    assert "1 of these scans trained or calibrated the model" in metrics_markdown(result)
    assert evaluate_scans(tiny_mri_model, [fresh], masks, device="cpu")["trained_or_calibrated"] == []


@pytest.mark.parametrize("fpr", ["0", "1.5", "-0.1", "nan"])
def test_false_positive_rate_outside_zero_one_is_refused(tiny_mri_model, tmp_path, fpr):
    scan = save_nifti(tmp_path / "a.nii.gz", brain_like(seed=121), np.eye(4))
    result = CliRunner().invoke(app, ["score", str(scan), "-m", str(tiny_mri_model), "-o", str(tmp_path / "o"),
                                      "-q", "--fpr", fpr])
    assert result.exit_code == 2 and "--fpr must lie strictly between 0 and 1" in result.output
    assert not (tmp_path / "o").exists()


def test_evaluate_reports_the_healthy_and_lesion_share_its_threshold_flags(tiny_mri_model, tmp_path):
    from scipy import ndimage

    from medflowad.data.readers import load_scan
    from medflowad.data.scans import to_native
    from medflowad.mri.evaluate import evaluate_scans, metrics_markdown
    from medflowad.mri.model import analyse, load_mri_model
    from medflowad.prep.stage import mask_on_scan, prepare_volume

    scan = save_nifti(tmp_path / "p.nii.gz", brain_like(seed=131), np.eye(4))
    lesion = np.zeros(nib.load(str(scan)).shape, np.uint8)
    lesion[18:26, 20:30, 4:9] = 1
    save_nifti(tmp_path / "p_mask.nii.gz", lesion, np.eye(4))
    result = evaluate_scans(tiny_mri_model, [scan], (".nii.gz", "_mask.nii.gz"), device="cpu", fpr=0.05)

    # the same voxels by hand: the native brain voxels of scored slices, "healthy" = taxicab distance > 2
    model = load_mri_model(tiny_mri_model, "cpu")
    lesion_file = load_scan(tmp_path / "p_mask.nii.gz")
    prepared = prepare_volume(load_scan(scan), model.config.preprocessing, lesion_mask=lesion_file)
    truth_full = mask_on_scan(lesion_file, prepared.native)
    region = to_native(prepared.scored.astype(np.float32), prepared, mode="nearest") > 0.5
    distance = ndimage.distance_transform_cdt(~truth_full, metric="taxicab")
    healthy, truth = (distance > 2)[region], truth_full[region]
    assert truth.any() and healthy.any() and not (healthy & truth).any()
    maps = analyse(model, prepared).maps
    for name in ("intensity", "llr"):
        row = result["voxel"][name]
        scores = to_native(maps[name], prepared)[region]
        calibration = np.sort(model.calibration[f"voxel/{name}"])
        # threshold_at_fpr by brute force: the smallest calibration value with at most 5 % strictly above it
        threshold = next(t for t in calibration if np.mean(calibration > t) <= 0.05)
        assert row["threshold"] == pytest.approx(threshold)
        assert row["healthy_fpr_realised"] == pytest.approx(np.mean(scores[healthy] > threshold))
        assert row["lesion_share_flagged"] == pytest.approx(np.mean(scores[truth] > threshold))
    assert "healthy / lesion voxels flagged there" in metrics_markdown(result)
