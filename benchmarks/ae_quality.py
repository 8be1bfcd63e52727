"""Stage-1 reconstruction quality: DiffAE vs regression AE on simulated and real movies.

The benchmark itself lives in :mod:`cadiff.bench.ae_quality` (so tests import it as a module); this script
is its command line. ``python benchmarks/ae_quality.py --help`` lists the options.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cadiff.bench.ae_quality import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
