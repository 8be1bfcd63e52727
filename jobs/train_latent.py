"""Stage 2: train the DiT with flow matching (or DDPM) on precomputed latents with Ray Train.

python jobs/train_latent.py experiment=dit_tiny latents.root=outputs/latents/r1 run_name=d1 trainer.max_steps=20
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cadiff.cli import main_for  # noqa: E402

if __name__ == "__main__":
    main_for("train_latent")
