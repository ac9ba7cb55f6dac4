"""Where the bits go: decompose a checkpoint's bound into its T + 1 terms and write the report.

    python analysis/bound_report.py runs/digits/checkpoint.pt --split test --num-samples 4 --out reports/digits

The same as ``pyrodiff report``; writes bound.json, terms.csv, rate_distortion.csv, summary.md,
terms.png, cumulative_rate.png and rate_distortion.png.
"""

import sys

from pyrodiff.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
