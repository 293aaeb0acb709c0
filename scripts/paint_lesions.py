"""Paint lesions into healthy scans (PROTOCOL.md part D), seeded, keeping the unpainted scans as they are.

    python scripts/paint_lesions.py SCAN [SCAN ...] -o OUT --brain-masks _T1=_dlmuse [--copies 2] [--seed 0]

For every scan and copy k (1..copies) writes ``<stem>-painted<k>`` and ``<stem>-painted<k>_mask`` (uint8
0/1) into OUT on the scan's own grid and affine, and ``lesions.json`` listing each lesion's kind, tissue,
centre and diameter (:func:`medflowad.data.painting.paint_scan_file`). The brain mask (any label > 0) is
the file beside each scan whose name has OLD replaced by NEW. Scan i uses seeds ``seed + 100 * i + k``, so
adding scans at the end leaves the earlier ones as they were.
"""

import argparse
import json
from pathlib import Path

from medflowad.data.painting import paint_scan_file
from medflowad.storage import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scans", nargs="+", type=Path)
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--brain-masks", required=True, help="OLD=NEW: the brain mask beside each scan")
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--lesions", type=int, default=2, help="lesions per painted copy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modality-tag", default="_t1", help="name ending kept last in painted names")
    args = parser.parse_args()
    old, new = args.brain_masks.split("=", 1)
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, scan in enumerate(args.scans):
        brain = scan.with_name(scan.name.replace(old, new))
        if brain == scan or not brain.is_file():
            raise SystemExit(f"{scan}: no brain mask {brain.name} beside it")
        for record in paint_scan_file(scan, brain, args.out, args.copies, args.seed + 100 * i, args.lesions,
                                      args.modality_tag):
            records.append(record)
            print(f"{record['painted']}: {record['lesion_voxels']} lesion voxels ("
                  + ", ".join(f"{x['kind']} {x['tissue']} {x['diameter_mm']:.0f} mm" for x in record["lesions"]) + ")")
    write_json(args.out / "lesions.json", {"seed": args.seed, "copies": args.copies, "scans": records})
    print(json.dumps({"written": len(records), "out": str(args.out)}))


if __name__ == "__main__":
    main()
