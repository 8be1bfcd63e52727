"""Runtime shared by training, inference and sweeps: Ray start-up, model exports, preview videos."""
