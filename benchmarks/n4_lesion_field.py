"""How far N4 bends its bias field towards a painted lesion, on the development subjects of protocol D.

    MEDFLOWAD_DATA=/path/to/data python benchmarks/n4_lesion_field.py [IXI033-HH-1259 ...]

For each subject (default: IXI033-HH-1259, a training subject of the fixed split; never the held-apart ones),
three seeds and each lesion kind (two lesions painted into the 2 mm head inside its DLMUSE brain, seeds
5001-5003), N4 as the preparation runs it (:func:`medflowad.prep.n4.n4_correct`, 3 levels, inside the brain)
is fitted to the painted head and to the same head unpainted. The ratio of the two fields, scaled to a median
of 1 over the brain, is printed inside the lesions and in a 12 mm shell around them: 1 where the lesion leaves
the field alone, above 1 where the correction dims the lesion's place (the field took some of a bright
lesion's brightness for shading), below 1 where it brightens it.
"""

import sys

import nibabel as nib
import numpy as np
from data_root import data_root
from scipy import ndimage

from medflowad.data.painting import paint_lesions
from medflowad.prep.n4 import n4_correct


def field(image: np.ndarray, affine: np.ndarray, brain: np.ndarray) -> np.ndarray:
    return np.maximum(image, 0) / np.maximum(n4_correct(image, affine, brain), 1e-6)


def main() -> None:
    ixi = data_root() / "medical" / "ixi_t1_2mm"
    for subject in sys.argv[1:] or ["IXI033-HH-1259"]:
        scan = nib.load(str(ixi / f"{subject}_T1.nii.gz"))
        image = np.asarray(scan.get_fdata(dtype=np.float32))
        brain = np.asarray(nib.load(str(ixi / f"{subject}_dlmuse.nii.gz")).dataobj) > 0
        plain = field(image, scan.affine, brain)
        for seed in (5001, 5002, 5003):
            for kind in ("hyper", "hypo"):
                painted, mask, lesions = paint_lesions(image, scan.affine, brain, seed, count=2, kinds=(kind,))
                inside = mask > 0
                shell = ndimage.binary_dilation(inside, iterations=6) & brain & ~inside  # 12 mm at 2 mm voxels
                ratio = field(painted, scan.affine, brain) / np.where(plain > 0, plain, 1)
                ratio /= np.median(ratio[brain])
                sizes = ", ".join(f"{lesion.diameter_mm:.0f}" for lesion in lesions)
                print(f"{subject} seed {seed} {kind} ({sizes} mm): field ratio in the lesions "
                      f"{ratio[inside].mean():.3f}, around them {ratio[shell].mean():.3f}", flush=True)


if __name__ == "__main__":
    main()
