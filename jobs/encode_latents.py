"""Encode clip shards into latent shards with the stage-1 EMA encoder (Ray Data actor pool).

python jobs/encode_latents.py stage1=outputs/train_ae/r1 data.root=outputs/data/sim out=outputs/latents/r1
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cadiff.cli import main_for  # noqa: E402

if __name__ == "__main__":
    main_for("encode_latents")
