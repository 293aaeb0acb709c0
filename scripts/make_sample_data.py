"""Regenerate sample_data/ (procedural images, no third-party data): python scripts/make_sample_data.py"""

from pathlib import Path

import numpy as np

from medflowad.data.synthetic import synthetic_images

OUT = Path(__file__).resolve().parents[1] / "sample_data"


def main() -> None:
    OUT.mkdir(exist_ok=True)
    np.savez_compressed(OUT / "shapes_train.npz", images=synthetic_images(1024, seed=1))
    np.savez_compressed(OUT / "shapes_test.npz", images=synthetic_images(256, seed=2))
    np.savez_compressed(OUT / "stripes.npz", images=synthetic_images(256, seed=3, kind="stripes"))
    for f in sorted(OUT.glob("*.npz")):
        print(f, f.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
