"""Prepare clip shards: read/simulate movies, calibrate noise, tile clips, split by recording, write shards.

python jobs/prepare_data.py source=sim out=outputs/data/sim
python jobs/prepare_data.py source=tiff source.path=movie.tif out=outputs/data/x clip.frames=17 clip.height=64 clip.width=64
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cadiff.cli import main_for  # noqa: E402

if __name__ == "__main__":
    main_for("prepare_data")
