"""Slice scores from the gated map: does the llr's gate help the scan z's slice score too?

    MEDFLOWAD_DATA=/path/to/data python benchmarks/lgg_gate_slice.py -m runs/flair_v14            # development
    MEDFLOWAD_DATA=/path/to/data python benchmarks/lgg_gate_slice.py -m runs/flair_v14 --split test  # once
    MEDFLOWAD_DATA=/path/to/data python benchmarks/lgg_gate_slice.py --crossfit runs/lgg_crossfit      # 60 patients

FLAIR models flag scans by ``intensity_scan_z``'s slice score: the share of a slice's pixels where the scan z
exceeds 2, averaged with the scored slices beside it (``analysis.scan_z_area``). The same area of
``scan_z_and_llr`` (the scan z where the llr's z agrees, min of the two) counts only pixels the flow calls unlike
healthy tissue too. Printed: slice AUROC and AUROC within position eighths (as ``evaluate``: lesion slices against
lesion-free slices of the same relative brain level) for both areas, the llr's slice score and the position alone.
The development split is the model's calibration patients (their lesion slices never entered calibration);
``--crossfit`` (``lgg_crossfit.py``'s folder) reads every train patient by the fold model that left it out.
"""

import argparse

import numpy as np
from lgg_flow_map_dev import add_reader_arguments, reading_pairs
from sklearn.metrics import roc_auc_score

from medflowad.bench.mri import LESION_MASKS
from medflowad.data.readers import load_scan
from medflowad.metrics import stratified_auroc
from medflowad.mri.analysis import SCAN_Z_AND_LLR_MAP, SCAN_Z_MAP, scan_z_area
from medflowad.mri.evaluate import position_strata, slice_centrality
from medflowad.mri.model import analyse
from medflowad.prep.stage import companion_path, prepare_volume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_reader_arguments(parser)
    args = parser.parse_args()
    pairs, split = reading_pairs(args), "crossfit" if args.crossfit else args.split
    scores: dict[str, list[np.ndarray]] = {}
    labels = []
    for model, path in pairs:
        prepared = prepare_volume(load_scan(path), model.config.preprocessing,
                                  lesion_mask=load_scan(companion_path(path, LESION_MASKS)))
        analysis = analyse(model, prepared)
        keep = prepared.keep
        per_slice = {f"{SCAN_Z_MAP} area": analysis.slice_scores[SCAN_Z_MAP],
                     f"{SCAN_Z_AND_LLR_MAP} area": scan_z_area(analysis.maps[SCAN_Z_AND_LLR_MAP], keep),
                     "llr": analysis.slice_scores["llr"], "position": slice_centrality(keep)}
        for name, values in per_slice.items():
            scores.setdefault(name, []).append(values[keep])
        labels.append(prepared.lesion_slices[keep])
    truth = np.concatenate(labels)
    strata = position_strata(np.concatenate(scores["position"]))
    print(f"{split}: {len(labels)} patients, {truth.size} slices, {int(truth.sum())} with lesion")
    for name, parts in scores.items():
        values = np.concatenate(parts)
        print(f"{name:24s} AUROC {roc_auc_score(truth, values):.3f}  "
              f"within position {stratified_auroc(truth, values, strata):.3f}")


if __name__ == "__main__":
    main()
