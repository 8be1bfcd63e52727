"""Weights-free evaluation of generated movies against a reference set: metrics.json, report.md and PNG figures.

python jobs/evaluate.py gen=outputs/samples/d1 ref=outputs/data/sim out=outputs/eval/d1
(`gen`/`ref`: a shard folder with index.json, or a folder of TIFF/HDF5 movies)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cadiff.cli import main_for  # noqa: E402

if __name__ == "__main__":
    main_for("evaluate")
