"""suite2p as a downstream judge: its F1 on the simulator presets (the ceiling) and its figures on the demo's samples.

The benchmark lives in :mod:`cadiff.bench.suite2p_judge`; this script is its command line
(``--quick``: ~2 min; the full run ~10 min on 2 cores). Needs the judge extra (``make setup`` installs it).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cadiff.bench.suite2p_judge import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
