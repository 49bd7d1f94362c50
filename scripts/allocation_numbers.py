"""Print the adaptive-allocation numbers (paper Eq. 2-4) of the shipped photos with the DINOv2 stand-in.

For every photo and for score="logits" (the official code: pre-softmax [CLS] logits, head mean) and score="softmax"
(paper Eq. 1: attention probabilities): the crops' richness S_j, the gap between the two richest crops against
tau, sigma_j = softmax(S/tau)_j and r_j, with a check that r_j equals the library's Plan.crop_ratios. The table in
docs/allocation.md is this script's output.

Usage (offline, ~1-2 min on 2 CPU cores)::

    export HF_HUB_OFFLINE=1
    python scripts/allocation_numbers.py                    # all 8 shipped photos, R = 0.1, tau = 10
    python scripts/allocation_numbers.py --photos astronaut,rocket --tau 100 --ratio 0.25
    python scripts/allocation_numbers.py --json numbers.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from globalcom2.core.scores import SCORE_KINDS
    from globalcom2.demo.photos import PHOTOS, load_photo
    from globalcom2.evaluation.allocation import allocation_numbers, markdown_table
    from globalcom2.loading import load_standin

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--photos", default=",".join(PHOTOS), help="comma-separated shipped photos (default: all)"
    )
    parser.add_argument("--ratio", type=float, default=0.1, help="R (default 0.1)")
    parser.add_argument("--tau", type=float, default=10.0, help="softmax temperature of Eq. 3 (default 10)")
    parser.add_argument("--scores", default=",".join(SCORE_KINDS), help="logits,softmax (default: both)")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    names = [p.strip() for p in args.photos.split(",") if p.strip()]
    unknown = [p for p in names if p not in PHOTOS]
    if unknown:
        parser.error(f"unknown photo(s) {unknown}; available: {', '.join(PHOTOS)}")

    model, processor = load_standin()
    rows = allocation_numbers(
        model, processor, [(name, load_photo(name)) for name in names], ratio=args.ratio, tau=args.tau,
        scores=[s.strip() for s in args.scores.split(",") if s.strip()],
    )  # fmt: skip
    print(markdown_table(rows))
    if args.json:
        data = [{**asdict(r), "gap": r.gap, "spread": r.spread} for r in rows]
        Path(args.json).write_text(json.dumps(data, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
