"""Sample movies from a stage-2 run (mode=generate) or reconstruct val clips with a stage-1 run (mode=reconstruct).

python jobs/sample.py stage2=outputs/train_latent/d1 num_samples=4 seed=0 out=outputs/samples/d1
python jobs/sample.py mode=reconstruct stage1=outputs/train_ae/r1 data.root=outputs/data/sim out=outputs/recon/r1
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cadiff.cli import main_for  # noqa: E402

if __name__ == "__main__":
    main_for("sample")
