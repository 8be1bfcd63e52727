"""cadiff: latent flow matching for calcium-imaging video synthesis, distributed on Ray."""

__version__ = "0.1.0"
