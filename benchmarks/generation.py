"""Stage-2 sample quality at a CPU budget: MMD^2, gain ratio, sampler table, long movie, activity statistics.

The benchmark lives in :mod:`cadiff.bench.generation` (so tests import it as a module); this script is its
command line. ``python benchmarks/generation.py --help`` lists the options; ``--quick`` runs in < 10 min.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cadiff.bench.generation import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
