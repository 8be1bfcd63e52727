"""Stage 1: train the diffusion autoencoder (or model=regression_ae) on clip shards with Ray Train.

python jobs/train_ae.py experiment=ae_tiny data.root=outputs/data/sim run_name=r1 trainer.num_workers=2 strategy=ddp
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cadiff.cli import main_for  # noqa: E402

if __name__ == "__main__":
    main_for("train_ae")
