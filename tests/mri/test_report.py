"""score --report: report.html content, its figures, and rendering in a real browser (headless Chromium)."""

import base64
import io
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medflowad.mri.analysis import conformal_p_value, flag_resolution_problem
from medflowad.mri.report import pick_slices
from medflowad.mri.score import score_scans
from tests.mri.conftest import brain_like, oblique_lps_affine, save_nifti

HISTOGRAM_RED = (214, 39, 40)  # the "this scan" line


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[dict] = []
        self.ids: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])


@pytest.fixture(scope="module")
def report_dir(tiny_mri_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    save_nifti(root / "healthy.nii.gz", brain_like(seed=31), oblique_lps_affine())
    save_nifti(root / "blob.nii.gz", brain_like(seed=32, blob=(24, 28, 7)), oblique_lps_affine())
    (root / "broken.nii.gz").write_bytes(b"not a nifti")
    result = score_scans([root / "healthy.nii.gz", root / "blob.nii.gz", root / "broken.nii.gz"], tiny_mri_model,
                         root / "out", device="cpu", report=True)
    assert result.report == root / "out" / "report.html"
    return root / "out"


def _png(src: str) -> Image.Image:
    assert src.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")


def test_report_has_every_scan_and_decodable_figures(report_dir):
    text = (report_dir / "report.html").read_text()
    parser = _Images()
    parser.feed(text)
    assert parser.ids == ["healthy", "blob"]  # one section per scored scan
    assert re.search(r"<td>broken</td><td class=\"error\">failed</td>.*broken\.nii\.gz", text)
    assert len(parser.images) == 4
    for attrs in parser.images:
        image = _png(attrs["src"])
        assert min(image.size) > 100
    for attrs in parser.images[1::2]:  # histograms carry this scan's red line
        pixels = np.asarray(_png(attrs["src"])).reshape(-1, 3)
        assert (np.abs(pixels.astype(int) - HISTOGRAM_RED).sum(axis=1) < 30).sum() > 50
    for attrs in parser.images[0::2]:  # montages: a grey scan on black, not an empty canvas
        pixels = np.asarray(_png(attrs["src"]))
        assert pixels.std() > 20


def test_pick_slices_spans_the_head_and_keeps_the_worst_slice():
    image = np.zeros((40, 8, 8))
    image[5:35] = 1.0
    anomaly = np.zeros_like(image, dtype=bool)
    anomaly[17, 2:5, 2:5] = True
    chosen = pick_slices(image, anomaly, count=6)
    assert len(chosen) == 6 and chosen == sorted(chosen)
    assert 17 in chosen and chosen[0] == 5 and chosen[-1] == 34


def test_flag_resolution_problem_matches_the_smallest_p_value():
    for n, fpr in ((8, 0.05), (19, 0.05), (18, 0.05), (99, 0.01), (50, 0.01)):
        calibration = np.arange(n, dtype=float)
        smallest = conformal_p_value(1e9, calibration)  # a score above every healthy scan
        assert (flag_resolution_problem(n, fpr) is None) == (smallest <= fpr)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


@pytest.mark.skipif(_chromium() is None, reason="no Chromium on this machine (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    # A copy with a probe script: after load it writes how many images the browser decoded into the title.
    probe = ("<script>window.addEventListener('load', () => { const all = [...document.images]; "
             "document.title = 'decoded ' + all.filter(i => i.complete && i.naturalWidth > 0).length + ' of ' "
             "+ all.length; });</script></body>")
    page = tmp_path / "probe.html"
    page.write_text((report_dir / "report.html").read_text().replace("</body>", probe))
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", page.as_uri()], capture_output=True,
                         timeout=180).stdout.decode("utf-8", errors="replace")  # its log lines are not always UTF-8
    assert re.search(r"<title>decoded 4 of 4</title>", dom), dom[:500]
    shot = tmp_path / "shot.png"
    subprocess.run([_chromium(), *flags, f"--screenshot={shot}", "--window-size=1280,2400",
                    (report_dir / "report.html").as_uri()], capture_output=True, timeout=180)
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    dark = (pixels.sum(axis=1) < 60).mean()  # the montages' black background
    assert dark > 0.05, f"screenshot shows no figure ({dark:.1%} dark pixels)"


def test_bundled_demo_model_scores_a_sample_scan_onto_its_grid(tmp_path):
    import nibabel as nib

    from medflowad.mri.model import bundled_models, resolve_model_dir

    assert "demo" in bundled_models()
    folder = tmp_path / "demo"
    folder.mkdir()
    assert resolve_model_dir(folder) == folder  # a folder of that name wins over the bundled model
    # a real IXI head, stored PSR (not RAS): the maps must come back onto that grid
    scan = Path(__file__).resolve().parents[2] / "sample_data" / "mri" / "IXI048-HH-1326_t1.nii.gz"
    result = score_scans([scan], "demo", tmp_path / "out", device="cpu")
    # five healthy IXI subjects calibrate the demo: no p-value can reach 5 %, and the batch says so
    assert result.all_ok and "no scan can be flagged at FPR 0.05" in result.warning
    written, source = nib.load(str(tmp_path / "out" / "IXI048-HH-1326_t1_anomaly.nii.gz")), nib.load(str(scan))
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    np.testing.assert_allclose(written.header.get_qform(), source.header.get_qform(), atol=1e-5)


def test_the_demo_map_peaks_on_bright_blobs_planted_in_a_real_healthy_head(tmp_path):
    """12 mm blobs at 2.5 times the brain's maximum (as in the issue that asked for this check), painted one
    at a time at six seeded places into a healthy sample head the demo never trained on: the written map's
    peak lies within 4 mm of the blob in at least 5 of 6. Measured (benchmarks/t1_blob_peaks.py
    --times-max 2.5): 5 of 6 here, 11 of 12 over both healthy heads; the miss (seed 3, frontal base) sits
    where the healthy heads' own intensities reach the normalisation's ceiling, so nothing can exceed them."""
    import nibabel as nib
    from scipy import ndimage

    from medflowad.data.painting import paint_lesions
    from medflowad.mri.model import load_mri_model
    from medflowad.prep import prepare

    healthy = Path(__file__).resolve().parents[2] / "sample_data" / "mri" / "IXI048-HH-1326_t1.nii.gz"
    source = nib.load(str(healthy))
    image = source.get_fdata(dtype=np.float32)
    brain = prepare(healthy, load_mri_model("demo", "cpu").config.preprocessing).brain > 0.5  # deepbet's mask
    spacing = np.sqrt((source.affine[:3, :3] ** 2).sum(axis=0))
    masks = {}
    for seed in range(6):
        _, mask, _ = paint_lesions(image, source.affine, brain, seed=seed, count=1, kinds=("hyper",),
                                   diameter_mm=(12.0, 12.0))
        blob = image.copy()
        blob[mask > 0] = 2.5 * image[brain].max()
        nib.save(nib.Nifti1Image(blob, source.affine, source.header), str(tmp_path / f"blob{seed}_t1.nii.gz"))
        masks[seed] = mask.astype(bool)
    result = score_scans([tmp_path], "demo", tmp_path / "out", device="cpu", pattern="blob*")
    assert result.all_ok and len(result.rows) == 6, result.rows
    found = 0
    for seed, mask in masks.items():
        anomaly = np.asarray(nib.load(str(tmp_path / "out" / f"blob{seed}_t1_normative.nii.gz")).dataobj)
        peak = np.unravel_index(np.argmax(anomaly), anomaly.shape)
        found += ndimage.distance_transform_edt(~mask, sampling=spacing)[peak] <= 4.0
    assert found >= 5


def test_report_states_the_models_top_fraction_and_the_llr_direction(tmp_path):
    from medflowad.mri.report import write_report

    rows = [{"scan_id": "a", "status": "ok", "flagged_voxels": 0, "scored_slices": 3, "slices": 4,
             **{f"{name}{part}": value for name in ("llr", "last_scale")
                for part, value in (("", 1.0), ("_p", 0.5), ("_flag", False))}}]
    for top_fraction, words in ((0.25, "top 25%"), (0.1, "top 10%")):
        write_report(tmp_path / "r.html", rows, {}, "m", "flair", 0.05, 20, "llr", top_fraction)
        text = (tmp_path / "r.html").read_text()
        assert words in text and "log p of the general model minus log p of the in-distribution model" in text
    write_report(tmp_path / "r.html", rows, {}, "m", "flair", 0.05, 20, "last_scale", 0.2)
    assert "aggregated over the top 20% of slices" in (tmp_path / "r.html").read_text()
