"""Export simulated movies with their ground truth: ImageJ TIFF + NPZ, NWB, and a suite2p layout (one folder per movie).

python jobs/export.py source=sim out=outputs/export/sim
python jobs/export.py source=sim_two_photon source.num_movies=2 formats=[nwb] out=outputs/export/2p
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cadiff.cli import main_for  # noqa: E402

if __name__ == "__main__":
    main_for("export")
