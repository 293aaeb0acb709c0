"""Regenerate the packaged registration template medflowad/templates/ from sample_data/mni_icbm152/.

    python scripts/make_template.py

The MNI ICBM152 2009a T1 (1 mm, brain-extracted) reduced to 2 mm by 2x2x2 block means and stored as
uint8: small enough to ship inside the package (the standard-space preparation registers every scan to
it, so it must exist wherever medflowad is installed), fine enough for an affine registration.
"""

from pathlib import Path

import nibabel as nib
import numpy as np

from medflowad.data.phantoms import load_template

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "medflowad" / "templates"

template = load_template(ROOT / "sample_data" / "mni_icbm152", factor=2)
image = nib.Nifti1Image(np.round(template.t1 * 255).astype(np.uint8), template.affine)
image.header.set_xyzt_units("mm")
image.set_sform(template.affine, code=4)  # 4: MNI152 space
image.set_qform(template.affine, code=4)
OUT.mkdir(parents=True, exist_ok=True)
nib.save(image, str(OUT / "mni_icbm152_t1_2mm.nii.gz"))
(OUT / "LICENSE.txt").write_text((ROOT / "sample_data" / "mni_icbm152" / "LICENSE.txt").read_text()
                                 + "\nmni_icbm152_t1_2mm.nii.gz: the T1 above reduced to 2 mm by 2x2x2 block means "
                                 "(scripts/make_template.py).\n")
print(OUT / "mni_icbm152_t1_2mm.nii.gz", image.shape)
