"""Regenerate sample_data/mri/ from the MNI ICBM152 template in sample_data/mni_icbm152/.

    python scripts/make_sample_mri.py

Five simulated subjects on a 2 mm grid (see medflowad.data.phantoms), each with a lesion mask (empty
for the healthy ones). sub-02 is stored left-right and anterior-posterior flipped (LPS) with a 10 degree
tilt in its affine, as scanners often write, so the demo also shows that maps land on each scan's grid.
"""

from pathlib import Path

import numpy as np

from medflowad.data.phantoms import insert_lesions, load_template, save_scan, simulate_subject

ROOT = Path(__file__).resolve().parents[1] / "sample_data"

# scan id -> (seed, lesion radii in mm, lesion kind); seeds differ from the demo model's training subjects
SUBJECTS = {
    "sub-01": (1001, [], ""),
    "sub-02": (1002, [], ""),
    "sub-03": (1003, [14.0], "ring"),
    "sub-04": (1004, [7.0, 9.0, 11.0], "hyper"),
    "sub-05": (1005, [12.0], "hypo"),
}


def tilted_lps(affine: np.ndarray, shape: tuple[int, ...], degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """The affine of the same world image stored with x and y flipped, then tilted about the x axis.

    Returns (affine for the flipped array, the world rotation applied), so the array is flipped with
    ``[::-1, ::-1]`` and the tilt rotates the head in the scanner, as an oblique acquisition does.
    """
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = shape[0] - 1, shape[1] - 1
    angle = np.deg2rad(degrees)
    tilt = np.eye(4)
    tilt[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return tilt @ affine @ flip, tilt


def main() -> None:
    template = load_template(ROOT / "mni_icbm152")
    out = ROOT / "mri"
    out.mkdir(exist_ok=True)
    for sid, (seed, radii, kind) in SUBJECTS.items():
        subject = simulate_subject(template, seed)
        if radii:
            t1, mask = insert_lesions(subject, radii, seed, kind)
        else:
            t1, mask = subject.t1, np.zeros(subject.t1.shape, dtype=np.uint8)
        affine = template.affine
        if sid == "sub-02":
            affine, _ = tilted_lps(affine, t1.shape, 10.0)
            t1, mask = t1[::-1, ::-1].copy(), mask[::-1, ::-1].copy()
        save_scan(out / f"{sid}_t1.nii.gz", t1, affine)
        save_scan(out / f"{sid}_mask.nii.gz", mask, affine)
        print(f"{sid}: seed {seed}, lesions {radii or 'none'} {kind}, {int(mask.sum())} lesion voxels")
    for f in sorted(out.glob("*.nii.gz")):
        print(f.relative_to(ROOT.parent), f.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
