"""Ray Tune sweep over a search space; every trial is a TorchTrainer run.

python jobs/sweep.py space=noise_schedule stage=ae num_samples=4 trainer.max_steps=3
python jobs/sweep.py space=noise_schedule stage=ae metric=val_loss   # rank by each trial's own loss (default: score)
python jobs/sweep.py space=latent_size stage=ae chain.enabled=true metric=chain_score   # score stage 1 + stage 2 per trial
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cadiff.cli import main_for  # noqa: E402

if __name__ == "__main__":
    main_for("sweep")
